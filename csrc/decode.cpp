// hss_kernels::decode: the leaf label of the best root-to-leaf path per pixel (shared/MATH.md §4).
//
//   decode(Tensor logits, Tensor path_nodes, int activation, int score) -> Tensor
//
// logits: (N, C, H, W), any strides, float16/bfloat16/float32 (computed in float32) or float64.
// path_nodes: (L, D) int32 on the logits' device, node channels of each leaf's path, root side first,
// -1 past its depth (TreeTables.path_nodes; a (L, 1) arange with activation=2 decodes leaf logits).
// activation: 0 sigmoid, 1 softmax over all C channels, 2 identity. score: 0 sum, 1 mean over the path.
// Returns int64 (N, H, W); ties go to the lowest leaf id.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "decode.h"
#include "decode_math.h"

namespace hss {

void check_decode_args(const at::Tensor& logits, const at::Tensor& path_nodes, int64_t activation, int64_t score) {
  TORCH_CHECK(logits.dim() == 4, "hss_kernels::decode: logits must be (N, C, H, W), got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "hss_kernels::decode: logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1, "hss_kernels::decode: logits have no channels");
  TORCH_CHECK(path_nodes.dim() == 2 && path_nodes.size(0) >= 1 && path_nodes.size(1) >= 1,
              "hss_kernels::decode: path_nodes must be (L, D) with L, D >= 1, got ", path_nodes.sizes());
  TORCH_CHECK(path_nodes.scalar_type() == at::kInt, "hss_kernels::decode: path_nodes must be int32, got ",
              path_nodes.scalar_type());
  TORCH_CHECK(path_nodes.is_contiguous(), "hss_kernels::decode: path_nodes must be contiguous");
  TORCH_CHECK(path_nodes.device() == logits.device(), "hss_kernels::decode: path_nodes is on ", path_nodes.device(),
              ", logits on ", logits.device());
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "hss_kernels::decode: activation must be 0 (sigmoid), 1 (softmax) or 2 (identity), got ", activation);
  TORCH_CHECK(score == 0 || score == 1, "hss_kernels::decode: score must be 0 (sum) or 1 (mean), got ", score);
}

namespace {

template <typename scalar_t>
void decode_cpu_loop(const at::Tensor& logits, const at::Tensor& path_nodes, int64_t act, int64_t score,
                     at::Tensor& out) {
  using A = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  const int64_t N = logits.size(0), C = logits.size(1), H = logits.size(2), W = logits.size(3);
  const int64_t sn = logits.stride(0), sc = logits.stride(1), sh = logits.stride(2), sw = logits.stride(3);
  const int64_t L = path_nodes.size(0), D = path_nodes.size(1);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const int32_t* path = path_nodes.data_ptr<int32_t>();
  int64_t* y = out.data_ptr<int64_t>();
  const int64_t HW = H * W;
  // Pixels in raster order per thread: with NCHW, neighbouring pixels share every channel's cache lines.
  at::parallel_for(0, N * HW, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q / HW, r = q % HW;
      const scalar_t* px = x + n * sn + (r / W) * sh + (r % W) * sw;
      const decode_math::StridedPixel<scalar_t, A> pixel{px, sc};
      y[q] = decode_math::decode_pixel<A>(pixel, C, L, D, path, act, score);
    }
  });
}

at::Tensor decode_cpu(const at::Tensor& logits, const at::Tensor& path_nodes, int64_t activation, int64_t score) {
  check_decode_args(logits, path_nodes, activation, score);
  auto out = at::empty({logits.size(0), logits.size(2), logits.size(3)}, logits.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "hss_kernels::decode", [&] {
    decode_cpu_loop<scalar_t>(logits, path_nodes, activation, score, out);
  });
  return out;
}

}  // namespace
}  // namespace hss

TORCH_LIBRARY_FRAGMENT(hss_kernels, m) {
  m.def("decode(Tensor logits, Tensor path_nodes, int activation, int score) -> Tensor");
}

TORCH_LIBRARY_IMPL(hss_kernels, CPU, m) {
  m.impl("decode", &hss::decode_cpu);
}
