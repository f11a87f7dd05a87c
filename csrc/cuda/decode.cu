// Hierarchical decoding (docs/MATH.md §4.3): the CUDA implementation of decode (schema and contract in
// csrc/ops.cpp).
//
// One thread per pixel, in raster order, so that with NCHW logits a warp's loads of one channel are 32
// consecutive elements (coalesced). The per-pixel arithmetic is decode_math.h's, the code the CPU tests
// run; a node's logit is re-read for every leaf below it, from L1/L2 after the first touch, so DRAM sees
// each logit once and nothing of size N x L x H x W exists.
#include "checks.h"
#include "common.cuh"
#include "decode_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>

namespace hss {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ path, int64_t* __restrict__ out,
                  int64_t total, int64_t HW, int64_t W, int64_t C, int64_t L, int64_t D, int64_t sn, int64_t sc,
                  int64_t sh, int64_t sw, int64_t act, int64_t score) {
  using A = at::opmath_type<scalar_t>;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (q >= total) return;
  const int64_t n = q / HW, r = q % HW;
  const GlobalCol<scalar_t, A> pixel{x + n * sn + (r / W) * sh + (r % W) * sw, sc};
  out[q] = decode_math::decode_pixel<A>(pixel, C, L, D, path, act, score);
}

at::Tensor decode_cuda(const at::Tensor& logits, const at::Tensor& path_nodes, int64_t activation, int64_t score) {
  check_decode("decode", logits, path_nodes);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = at::empty({logits.size(0), logits.size(2), logits.size(3)}, logits.options().dtype(at::kLong));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t blocks = num_blocks(total, kThreads);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "decode: too many pixels (", total, ")");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decode_cuda", [&] {
    decode_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), path_nodes.data_ptr<int32_t>(), out.data_ptr<int64_t>(), total,
        logits.size(2) * logits.size(3), logits.size(3), logits.size(1), path_nodes.size(0), path_nodes.size(1),
        logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3), activation, score);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace hss

TORCH_LIBRARY_IMPL(hss_kernels, CUDA, m) {
  m.impl("decode", &hss::cuda::decode_cuda);
}
