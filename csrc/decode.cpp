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

#include <algorithm>
#include <vector>

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

// Pixels per tile of the CPU loop: the inner loops run over a tile's pixels, which the compiler vectorises.
constexpr int64_t kTile = 64;

template <typename scalar_t>
void decode_cpu_loop(const at::Tensor& logits, const at::Tensor& path_nodes, int64_t act, int64_t score,
                     at::Tensor& out) {
  using A = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  const int64_t C = logits.size(1), H = logits.size(2), W = logits.size(3);
  const int64_t sn = logits.stride(0), sc = logits.stride(1), sh = logits.stride(2), sw = logits.stride(3);
  const int64_t L = path_nodes.size(0), D = path_nodes.size(1);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const int32_t* path = path_nodes.data_ptr<int32_t>();
  int64_t* y = out.data_ptr<int64_t>();
  const int64_t HW = H * W;
  // Per tile: every channel's activations for the tile's pixels (one exp per node and pixel, however
  // many leaves lie below the node), then the path sums leaf by leaf. The arithmetic per pixel is
  // decode_math's, in the same order as the CUDA kernel's.
  at::parallel_for(0, out.numel(), 4 * kTile, [&](int64_t begin, int64_t end) {
    std::vector<A> a(C * kTile), s(kTile), best(kTile), m(kTile), z(kTile);
    std::vector<int64_t> off(kTile), best_l(kTile);
    for (int64_t q0 = begin; q0 < end; q0 += kTile) {
      const int64_t np = std::min(kTile, end - q0);
      for (int64_t p = 0; p < np; ++p) {
        const int64_t q = q0 + p, n = q / HW, r = q % HW;
        off[p] = n * sn + (r / W) * sh + (r % W) * sw;
      }
      for (int64_t p = 0; p < np; ++p) {
        const decode_math::StridedPixel<scalar_t, A> pixel{x + off[p], sc};
        decode_math::softmax_stats<A>(pixel, C, act, m[p], z[p]);
      }
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* xc = x + c * sc;
        A* ac = a.data() + c * kTile;
        // One loop per activation: no branch on `act` (or on the sign, see decode_math) per element.
        if (act == decode_math::kSigmoid) {
          for (int64_t p = 0; p < np; ++p) ac[p] = decode_math::sigmoid<A>(static_cast<A>(xc[off[p]]));
        } else if (act == decode_math::kSoftmax) {
          for (int64_t p = 0; p < np; ++p) ac[p] = decode_math::dexp(static_cast<A>(xc[off[p]]) - m[p]) / z[p];
        } else {
          for (int64_t p = 0; p < np; ++p) ac[p] = static_cast<A>(xc[off[p]]);
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        std::fill(s.begin(), s.begin() + np, A(0));
        int64_t len = 0;
        for (int64_t d = 0; d < D; ++d) {
          const int32_t node = path[l * D + d];
          if (node < 0 || node >= C) break;
          const A* an = a.data() + node * kTile;
          for (int64_t p = 0; p < np; ++p) s[p] += an[p];
          ++len;
        }
        if (score == decode_math::kMean && len > 0)
          for (int64_t p = 0; p < np; ++p) s[p] = s[p] / A(len);
        for (int64_t p = 0; p < np; ++p) {
          if (l == 0 || s[p] > best[p]) {  // strict: an earlier (lower) leaf keeps a tie
            best[p] = s[p];
            best_l[p] = l;
          }
        }
      }
      std::copy(best_l.begin(), best_l.begin() + np, y + q0);
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
