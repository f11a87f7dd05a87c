// Hierarchical decoding (docs/MATH.md §4.3): the CUDA implementation of decode (schema and contract in
// csrc/ops.cpp).
//
// One thread per pixel, in raster order, so that with NCHW logits a warp's loads of one channel are 32
// consecutive elements (coalesced). The per-pixel arithmetic is decode_math.h's, the code the CPU tests
// run: the softmax statistics (one pass over the channels), then one walk over the tree's nodes in
// pre-order, each node's logit read and activated once (and tested for NaN: a pixel with a NaN logit gets
// ignore_index), its path score its parent's plus its activation.
// The walk table sits in shared memory, kWalkChunk nodes at a time (a 16-byte entry per node that every
// thread of the block reads at once, a broadcast; the channel already multiplied by the channel stride);
// the running path scores, one per depth, in shared memory laid out [depth][thread] (no local memory, no
// bank conflicts). Instantiated for each activation, ordered and unordered leaf ids, and the sum and mean
// scores, so that the walk's loop is one straight body. Nothing of size N x L x H x W exists.
#include "checks.h"
#include "common.cuh"
#include "decode_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

namespace hss {
namespace cuda {
namespace {

constexpr int kWalkChunk = 512;  // walk nodes in shared memory at a time (8 KiB)

// kOrdered: the leaf ids increase along the walk, so that a strict > keeps the lowest id of a tie.
// kAct: the activation; kMean: score = mean (a division per leaf), else the sum.
template <typename scalar_t, int kAct, bool kOrdered, bool kMean>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ walk, int64_t* __restrict__ out,
                  int64_t total, int64_t HW, int64_t W, int64_t C, int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                  int64_t ignore_index) {
  using A = at::opmath_type<scalar_t>;
  __shared__ decode_math::WalkNode nodes[kWalkChunk];
  __shared__ A scores[decode_math::kRunSlots * kThreads];
  // Threads past the last pixel walk the last pixel too (every thread takes part in the block's syncs)
  // and write nothing.
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t qp = q < total ? q : total - 1;
  const int64_t n = qp / HW, r = qp % HW;
  const scalar_t* px = x + n * sn + (r / W) * sh + (r % W) * sw;
  A m, z;
  decode_math::softmax_stats<A>(GlobalCol<scalar_t, A>{px, sc}, C, kAct, m, z);
  const decode_math::RunScores<A, kThreads> run{scores + threadIdx.x};
  HSS_UNROLL
  for (int d = 0; d < decode_math::kRunSlots; ++d) run(d) = A(0);  // sm90: trips=10
  const GlobalCol<scalar_t, A> pixel{px, 1};  // the walk's x: channel * sc
  decode_math::Best<A> best{neg_inf<A>(), 0, false};
  for (int64_t c0 = 0; c0 < C; c0 += kWalkChunk) {  // sm90: trips=cdiv(C, 512)
    const int k = static_cast<int>(C - c0 < kWalkChunk ? C - c0 : kWalkChunk);
    __syncthreads();  // the previous chunk's readers are done
    for (int i = threadIdx.x; i < k; i += kThreads)  // sm90: trips=cdiv(min(C, 512), threads)
      nodes[i] = decode_math::walk_node(walk, C, c0 + i, C, sc);
    __syncthreads();
#pragma unroll 1  // one node per iteration: unrolled copies gain little (the logit loads are independent anyway)
    for (int i = 0; i < k; ++i)  // sm90: trips=min(C, 512)
      decode_math::walk_step<A>(pixel, nodes[i], run, kAct, m, z, kMean ? decode_math::kMean : decode_math::kSum,
                                kOrdered, best);
  }
  if (q < total) out[q] = decode_math::label_of(best, ignore_index);
}

template <typename scalar_t, int kAct, bool kOrdered, bool kMean>
void launch(const at::Tensor& logits, const at::Tensor& walk, at::Tensor& out, int64_t blocks, int64_t ignore_index,
            cudaStream_t stream) {
  decode_kernel<scalar_t, kAct, kOrdered, kMean><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      logits.data_ptr<scalar_t>(), walk.data_ptr<int32_t>(), out.data_ptr<int64_t>(), out.numel(),
      logits.size(2) * logits.size(3), logits.size(3), logits.size(1), logits.stride(0), logits.stride(1),
      logits.stride(2), logits.stride(3), ignore_index);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor decode_cuda(const at::Tensor& logits, const at::Tensor& walk, bool ordered, int64_t activation,
                       int64_t score, at::IntArrayRef size, bool align_corners, int64_t ignore_index) {
  check_decode("decode", logits, walk, size);
  check_no_upsample("decode", size.empty() ? 0 : 1);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = at::empty({logits.size(0), logits.size(2), logits.size(3)}, logits.options().dtype(at::kLong));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int64_t blocks = num_blocks(total, kThreads);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "decode: too many pixels (", total, ")");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decode_cuda", [&] {
    using namespace decode_math;
    const bool mean = score == kMean;
    auto go = [&](auto act) {
      constexpr int kAct = decltype(act)::value;
      if (ordered && mean)
        launch<scalar_t, kAct, true, true>(logits, walk, out, blocks, ignore_index, stream);
      else if (ordered)
        launch<scalar_t, kAct, true, false>(logits, walk, out, blocks, ignore_index, stream);
      else if (mean)
        launch<scalar_t, kAct, false, true>(logits, walk, out, blocks, ignore_index, stream);
      else
        launch<scalar_t, kAct, false, false>(logits, walk, out, blocks, ignore_index, stream);
    };
    if (activation == kSigmoid)
      go(std::integral_constant<int, kSigmoid>{});
    else if (activation == kSoftmax)
      go(std::integral_constant<int, kSoftmax>{});
    else
      go(std::integral_constant<int, kIdentity>{});
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace hss

TORCH_LIBRARY_IMPL(hss_kernels, CUDA, m) {
  m.impl("decode", &hss::cuda::decode_cuda);
}
