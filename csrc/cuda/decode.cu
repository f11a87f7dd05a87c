// Hierarchical decoding (docs/MATH.md §4.3): the CUDA implementation of decode (schema and contract in
// csrc/ops.cpp).
//
// On NCHW logits (float32/float16/bfloat16 planes that decode_math::lanes_layout accepts, without size=)
// a thread owns V = 16 / sizeof(T) neighbouring pixels (decode_lanes_kernel below): one 16-byte load per
// node brings the node's logit of all V, the walk table read from shared memory once for the V, the
// running scores of the V in shared memory; its per-lane arithmetic is decode_math.h's walk_step_lanes,
// which the CPU runs under HSS_CPU_PIXEL_PATH=1 (csrc/cpu/decode.cpp decode_lanes). With size= (fused bilinear
// upsampling) and logits of at most 4 bytes, a thread owns G = 16 / sizeof(T) neighbouring destination pixels of
// one row (decode_up_lanes_kernel), each node's logits interpolated for the G at once (upsample_math.h UpLanes),
// the same walk (the CPU: decode_up_lanes under HSS_CPU_PIXEL_PATH=1).
//
// Anything else runs one thread per pixel, in raster order, so that with NCHW logits a warp's loads of
// one channel are 32 consecutive elements (coalesced). The per-pixel arithmetic is decode_math.h's, the
// code the CPU tests run: the softmax's max (one pass over the channels), then one walk over the tree's
// nodes in pre-order, each node's logit read and activated once (and tested for NaN: a pixel with a NaN
// logit gets ignore_index), its path score its parent's plus its activation. Both walks compute the same
// numbers, so the labels do not depend on the layout.
// The walk table sits in shared memory, kWalkChunk nodes at a time (a 16-byte entry per node that every
// thread of the block reads at once, a broadcast; the channel already multiplied by the channel stride);
// the running path scores, one per depth, in shared memory laid out [depth][thread] (no local memory, no
// bank conflicts). Instantiated for each activation, ordered and unordered leaf ids, and the sum and mean
// scores, so that the walk's loop is one straight body, and with and without fused bilinear upsampling
// (decode(size=) of float64 logits: each channel interpolated from its four source values as it is read,
// upsample_math.h).
// Nothing of size N x L x H x W exists, nor the upsampled logits.
#include "checks.h"
#include "common.cuh"
#include "decode_math.h"
#include "upsample_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

namespace hss {
namespace cuda {
namespace {

constexpr int kWalkChunk = 512;  // walk nodes in shared memory at a time (8 KiB)

// One pixel's label: the softmax's max through `stats` (x(c), c the channel), then the walk through
// `pixel` (x(v), v = channel * sc, the walk's offsets), the walk's chunks staged in `nodes` by the whole
// block (every thread of the block must call it: it synchronises the block).
template <typename A, int kAct, bool kOrdered, bool kMean, typename Stats, typename Pixel>
__device__ __forceinline__ int64_t decode_walk(const Stats& stats, const Pixel& pixel, const int32_t* __restrict__ walk,
                                               int64_t C, int64_t sc, int64_t ignore_index,
                                               decode_math::WalkNode* nodes, A* scores) {
  const A m = decode_math::softmax_max<A>(stats, C, kAct);
  const decode_math::RunScores<A, kThreads> run{scores + threadIdx.x};
  HSS_UNROLL
  for (int d = 0; d < decode_math::kRunSlots; ++d) run(d) = A(0);  // sm90: trips=10
  decode_math::Best<A> best{neg_inf<A>(), 0, false};
  for (int64_t c0 = 0; c0 < C; c0 += kWalkChunk) {  // sm90: trips=cdiv(C, 512)
    const int k = static_cast<int>(C - c0 < kWalkChunk ? C - c0 : kWalkChunk);
    __syncthreads();  // the previous chunk's readers are done
    for (int i = threadIdx.x; i < k; i += kThreads)  // sm90: trips=cdiv(min(C, 512), threads)
      nodes[i] = decode_math::walk_node(walk, C, c0 + i, C, sc);
    __syncthreads();
#pragma unroll 1  // one node per iteration: unrolled copies gain little (the logit loads are independent anyway)
    for (int i = 0; i < k; ++i)  // sm90: trips=min(C, 512)
      decode_math::walk_step<A>(pixel, nodes[i], run, kAct, m, kMean ? decode_math::kMean : decode_math::kSum,
                                kOrdered, best);
  }
  return decode_math::label_of(best, ignore_index);
}

// kOrdered: the leaf ids increase along the walk, so that a strict > keeps the lowest id of a tie.
// kAct: the activation; kMean: score = mean (a division per leaf), else the sum. kUp: fused bilinear
// upsampling: the pixels are the output's (N, H, W), each channel read through BilinearCol from the four
// source values of the pixel's stencil in the (N, C, h, w) logits (upsample_math.h, docs/MATH.md §6.3);
// HW and W are then the output's, u the geometry.
template <typename scalar_t, int kAct, bool kOrdered, bool kMean, bool kUp>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ walk, int64_t* __restrict__ out,
                  int64_t total, int64_t HW, int64_t W, int64_t C, int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                  int64_t ignore_index, UpsampleGeom<at::opmath_type<scalar_t>> u) {
  using A = at::opmath_type<scalar_t>;
  __shared__ decode_math::WalkNode nodes[kWalkChunk];
  __shared__ A scores[decode_math::kRunSlots * kThreads];
  // Threads past the last pixel walk the last pixel too (every thread takes part in the block's syncs)
  // and write nothing.
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t qp = q < total ? q : total - 1;
  int64_t label;
  if constexpr (kUp) {
    const Stencil<A> st = u.stencil(qp);
    // the walk's x is channel * sc: the stencil's values at x + o00 + v (+ dx, dy)
    label = decode_walk<A, kAct, kOrdered, kMean>(bilinear_col<scalar_t, A>(x, sc, st),
                                                  BilinearCol<scalar_t, A>{x + st.o00, 1, st.dx, st.dy, st.lx, st.ly},
                                                  walk, C, sc, ignore_index, nodes, scores);
  } else {
    const int64_t n = qp / HW, r = qp % HW;
    const scalar_t* px = x + n * sn + (r / W) * sh + (r % W) * sw;
    label = decode_walk<A, kAct, kOrdered, kMean>(GlobalCol<scalar_t, A>{px, sc}, GlobalCol<scalar_t, A>{px, 1},
                                                  walk, C, sc, ignore_index, nodes, scores);
  }
  if (q < total) out[q] = label;
}


// ---------------------------------------------------------------------------------------------------
// The lanes (docs/MATH.md §4.3): thread t owns pixels i0 = t * V .. i0 + V - 1 (flat over N x H x W), all
// in image n = i0 / HW (H * W is a multiple of V), at element offset n * sN + (i0 - n * HW) of channel
// 0; every channel plane contiguous, the strides multiples of V and the data 16-byte aligned
// (decode_math::lanes_layout), so that a node's V logits are one 16-byte load.
constexpr int kLaneThreads = 128;  // the running scores take (kMaxDepth + 1) * 4 * V bytes per thread
constexpr int kLaneChunk = 256;    // walk nodes in shared memory at a time (4 KiB)

template <typename T>
constexpr int lanes_of() { return static_cast<int>(16 / sizeof(T)); }

// V neighbouring pixels' logits at walk offset o from p, in bytes (the lanes' walk offsets are channel *
// sC * sizeof(T): one add per address): one 16-byte load.
template <typename T, int V>
struct LaneLogits {
  const char* p;
  __device__ void load(int64_t o, float (&z)[V]) const {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p + o));  // sm90: logits
    T t[V];
    memcpy(t, &q, sizeof q);
    HSS_UNROLL
    for (int k = 0; k < V; ++k) z[k] = static_cast<float>(t[k]);
  }
};

// The running scores of a thread's V lanes in shared memory laid out [depth][V / 4][thread] as float4:
// each access of a warp is 512 contiguous bytes (no bank conflicts). p = the block's array + threadIdx.x.
template <int V>
struct SharedRunLanes {
  float4* p;
  __device__ void load(int32_t d, float (&s)[V]) const {
    HSS_UNROLL
    for (int j = 0; j < V / 4; ++j) {
      const float4 q = p[(d * (V / 4) + j) * kLaneThreads];
      s[4 * j] = q.x;
      s[4 * j + 1] = q.y;
      s[4 * j + 2] = q.z;
      s[4 * j + 3] = q.w;
    }
  }
  __device__ void store(int32_t d, const float (&s)[V]) const {
    HSS_UNROLL
    for (int j = 0; j < V / 4; ++j)
      p[(d * (V / 4) + j) * kLaneThreads] = make_float4(s[4 * j], s[4 * j + 1], s[4 * j + 2], s[4 * j + 3]);
  }
};

// Stages walk nodes c0 .. c0 + k - 1 of a chunk (offsets: channel times stride) into nodes[0 .. k), and with
// stand_in a node at k that the lanes kernel's one-node-ahead load reads (offset 0) but never steps, between the
// block's barriers (the previous chunk's readers done before, every node written after).
__device__ inline void stage_walk_chunk(decode_math::WalkNode* nodes, const int32_t* __restrict__ walk, int64_t C,
                                        int64_t c0, int k, int64_t stride, bool stand_in) {
  __syncthreads();
  for (int i = threadIdx.x; i < k + stand_in; i += kLaneThreads)  // sm90: trips=cdiv(min(C, 256) + 1, threads)
    nodes[i] = i < k ? decode_math::walk_node(walk, C, c0 + i, C, stride) : decode_math::WalkNode{0, 1, -1};
  __syncthreads();
}

// The lanes walk's start: the root's running scores (zeros, never stored again), the lanes' softmax shifts m over
// the C channels (walk offsets c * stride), no best leaf yet.
template <int V, typename X>
__device__ inline void lanes_walk_start(const X& px, const SharedRunLanes<V>& run, int64_t C, int64_t stride, int kAct,
                                        float (&m)[V], decode_math::LaneBest<float, V>& best) {
  float zero[V];
  HSS_UNROLL
  for (int k = 0; k < V; ++k) zero[k] = 0.f;
  run.store(0, zero);
  decode_math::softmax_max_lanes<V>(px, C, stride, kAct, m);
  decode_math::lanes_start(best);
}

// groups = P / V. Threads past the last group walk the last group too (every thread takes part in the
// block's syncs) and write nothing. The logits are loaded one node ahead of the step (two loads in flight
// per thread; the chunk's table ends with a stand-in node, read only to be loaded from), the loop body
// two nodes long so that the two logit buffers swap roles without copies.
template <typename T, int kAct, bool kOrdered, bool kMean>
__global__ void __launch_bounds__(kLaneThreads)
    decode_lanes_kernel(const T* __restrict__ x, const int32_t* __restrict__ walk, int64_t* __restrict__ out,
                        int64_t groups, int64_t HW, int64_t C, int64_t sn, int64_t sc, int64_t ignore_index) {
  constexpr int V = lanes_of<T>();
  static_assert(V % 4 == 0, "the lanes' running scores are float4s");
  __shared__ decode_math::WalkNode nodes[kLaneChunk + 1];
  __shared__ float4 runs[(kMaxDepth + 1) * (V / 4) * kLaneThreads];
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kLaneThreads + threadIdx.x;
  const int64_t i0 = (g < groups ? g : groups - 1) * V;
  const int64_t n = i0 / HW;
  const LaneLogits<T, V> px{reinterpret_cast<const char*>(x + n * sn + (i0 - n * HW))};
  const int64_t sb = sc * static_cast<int64_t>(sizeof(T));  // the channel stride in bytes
  const SharedRunLanes<V> run{runs + threadIdx.x};
  float m[V];
  decode_math::LaneBest<float, V> best;
  lanes_walk_start<V>(px, run, C, sb, kAct, m, best);
  const int64_t score = kMean ? decode_math::kMean : decode_math::kSum;
  for (int64_t c0 = 0; c0 < C; c0 += kLaneChunk) {  // sm90: trips=cdiv(C, 256)
    const int k = static_cast<int>(C - c0 < kLaneChunk ? C - c0 : kLaneChunk);
    stage_walk_chunk(nodes, walk, C, c0, k, sb, true);
    float xa[V], xb[V];
    px.load(nodes[0].x, xa);
#pragma unroll 1  // two nodes per iteration (the loads are one node ahead)
    for (int i = 0; i < k; i += 2) {  // sm90: trips=cdiv(min(C, 256), 2)
      px.load(nodes[i + 1].x, xb);
      decode_math::walk_step_lanes<V>(xa, nodes[i], run, kAct, m, score, kOrdered, best);
      if (i + 1 == k) break;
      px.load(nodes[i + 2].x, xa);
      decode_math::walk_step_lanes<V>(xb, nodes[i + 1], run, kAct, m, score, kOrdered, best);
    }
  }
  if (g >= groups) return;
  HSS_UNROLL
  for (int k = 0; k < V; k += 2)  // out + i0 is 16-byte aligned (V even, out aligned)
    *reinterpret_cast<longlong2*>(out + i0 + k) =
        make_longlong2(decode_math::lane_label(best, m, kAct, k, ignore_index),
                       decode_math::lane_label(best, m, kAct, k + 1, ignore_index));
}

// Fused upsampling on the lanes (decode(size=), docs/MATH.md §4.3, §6): G = lanes_of<T>() destination pixels of
// one row per thread, X0 = G gx (gw groups per row, ng = N H gw threads), each channel of the G lanes interpolated
// through upsample_math.h's UpLanes (each lane's stencil computed once; two lanes on the same source columns read
// their four source values once; lanes past the row's end, n < G, repeat its last pixel and are not written), then
// decode_lanes_kernel's walk (walk_step_lanes, the running scores in shared memory). Logits of float types of at
// most 4 bytes, any strides (scalar loads); float64 takes decode_kernel's kUp instantiation.
template <typename T, int kAct, bool kOrdered, bool kMean>
__global__ void __launch_bounds__(kLaneThreads)
    decode_up_lanes_kernel(const T* __restrict__ x, const int32_t* __restrict__ walk, int64_t* __restrict__ out,
                           int64_t ng, int64_t gw, int64_t C, int64_t sc, int64_t ignore_index, UpsampleGeom<float> u) {
  constexpr int G = lanes_of<T>();
  static_assert(G % 4 == 0, "the lanes' running scores are float4s");
  __shared__ decode_math::WalkNode nodes[kLaneChunk];
  __shared__ float4 runs[(kMaxDepth + 1) * (G / 4) * kLaneThreads];
  // Threads past the last group walk the last group too (every thread takes part in the block's syncs) and write
  // nothing.
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kLaneThreads + threadIdx.x;
  const int64_t tg = t < ng ? t : ng - 1;
  const int64_t rr = tg / gw, X0 = (tg - rr * gw) * G;
  const int n = u.W - X0 < G ? static_cast<int>(u.W - X0) : G;
  const UpLanesAt<T, float, G> px{up_lanes<T, float, G>(x, sc, u, rr, X0, n)};
  const SharedRunLanes<G> run{runs + threadIdx.x};
  float m[G];
  decode_math::LaneBest<float, G> best;
  lanes_walk_start<G>(px, run, C, sc, kAct, m, best);
  const int64_t score = kMean ? decode_math::kMean : decode_math::kSum;
  for (int64_t c0 = 0; c0 < C; c0 += kLaneChunk) {  // sm90: trips=cdiv(C, 256)
    const int k = static_cast<int>(C - c0 < kLaneChunk ? C - c0 : kLaneChunk);
    stage_walk_chunk(nodes, walk, C, c0, k, sc, false);
#pragma unroll 1  // one node per iteration: its G / 2 pairs' loads are in flight together
    for (int i = 0; i < k; ++i) {  // sm90: trips=min(C, 256)
      float xv[G];
      px.load(nodes[i].x, xv);
      decode_math::walk_step_lanes<G>(xv, nodes[i], run, kAct, m, score, kOrdered, best);
    }
  }
  if (t >= ng) return;
  int64_t* o = out + rr * u.W + X0;
  HSS_UNROLL
  for (int k = 0; k < G; ++k)
    if (k < n) o[k] = decode_math::lane_label(best, m, kAct, k, ignore_index);
}

template <typename scalar_t, int kAct, bool kOrdered, bool kMean>
void launch(const at::Tensor& logits, const at::Tensor& walk, at::Tensor& out, int64_t blocks, int64_t ignore_index,
            bool upsample, bool align_corners, cudaStream_t stream) {
  using A = at::opmath_type<scalar_t>;
  if constexpr (sizeof(scalar_t) <= 4) {
    if (!upsample &&
        decode_math::lanes_layout(logits.sizes().data(), logits.strides().data(), logits.element_size(),
                                  logits.data_ptr()) &&
        reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0) {
      const int64_t groups = out.numel() / lanes_of<scalar_t>();
      decode_lanes_kernel<scalar_t, kAct, kOrdered, kMean>
          <<<static_cast<unsigned int>(num_blocks(groups, kLaneThreads)), kLaneThreads, 0, stream>>>(
              logits.data_ptr<scalar_t>(), walk.data_ptr<int32_t>(), out.data_ptr<int64_t>(), groups,
              logits.size(2) * logits.size(3), logits.size(1), logits.stride(0), logits.stride(1), ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const auto u = UpsampleGeom<A>::make(logits.sizes().data(), logits.strides().data(), out.size(1), out.size(2),
                                       align_corners);
  if constexpr (sizeof(scalar_t) <= 4) {
    if (upsample) {
      constexpr int G = lanes_of<scalar_t>();
      const int64_t gw = (out.size(2) + G - 1) / G, ng = out.size(0) * out.size(1) * gw;
      decode_up_lanes_kernel<scalar_t, kAct, kOrdered, kMean>
          <<<static_cast<unsigned int>(num_blocks(ng, kLaneThreads)), kLaneThreads, 0, stream>>>(
              logits.data_ptr<scalar_t>(), walk.data_ptr<int32_t>(), out.data_ptr<int64_t>(), ng, gw, logits.size(1),
              logits.stride(1), ignore_index, u);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  auto kernel = upsample ? decode_kernel<scalar_t, kAct, kOrdered, kMean, true>
                         : decode_kernel<scalar_t, kAct, kOrdered, kMean, false>;
  kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      logits.data_ptr<scalar_t>(), walk.data_ptr<int32_t>(), out.data_ptr<int64_t>(), out.numel(),
      out.size(1) * out.size(2), out.size(2), logits.size(1), logits.stride(0), logits.stride(1), logits.stride(2),
      logits.stride(3), ignore_index, u);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor decode_cuda(const at::Tensor& logits, const at::Tensor& walk, bool ordered, int64_t activation,
                       int64_t score, at::IntArrayRef size, bool align_corners, int64_t ignore_index) {
  check_decode("decode", logits, walk, size);
  const bool upsample = !size.empty();
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = at::empty({logits.size(0), upsample ? size[0] : logits.size(2), upsample ? size[1] : logits.size(3)},
                       logits.options().dtype(at::kLong));
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
        launch<scalar_t, kAct, true, true>(logits, walk, out, blocks, ignore_index, upsample, align_corners, stream);
      else if (ordered)
        launch<scalar_t, kAct, true, false>(logits, walk, out, blocks, ignore_index, upsample, align_corners, stream);
      else if (mean)
        launch<scalar_t, kAct, false, true>(logits, walk, out, blocks, ignore_index, upsample, align_corners, stream);
      else
        launch<scalar_t, kAct, false, false>(logits, walk, out, blocks, ignore_index, upsample, align_corners, stream);
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
