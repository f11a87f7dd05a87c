// Hierarchical softmax loss (docs/MATH.md §2): the CUDA implementation of hierarchical_softmax_fwd and
// hierarchical_softmax_bwd (schemas and contracts in csrc/ops.cpp). On NCHW logits (float32/float16/bfloat16,
// trees up to 4 deep) a thread owns V = 16 / sizeof(T) neighbouring pixels (the *_lanes kernels below,
// docs/MATH.md §2.9); otherwise one thread per pixel runs the per-pixel code of hierarchical_softmax_math.h.
// float32 accumulation for float16/bfloat16/float32 logits, float64 for float64. With fused upsampling the
// forward reads each channel from four source values (upsample_math.h) and the backward runs band by band
// (upsample.cuh): each destination pixel's gradient row once into a scratch, then gathered onto the source
// pixels; for float types of at most 4 bytes and trees up to 4 deep the V-pixel math on G destination pixels of
// a row per thread (hierarchical_softmax_fwd_up_lanes_kernel, hierarchical_softmax_up_rows_lanes_kernel),
// otherwise one pixel per thread (the kUp forward, hierarchical_softmax_up_rows_kernel). Class and pixel
// weights (common.h PixelWeights, docs/MATH.md §6.6): every forward kernel multiplies a labelled pixel's loss by
// its weight and, with class weights, sums them for the "mean" (finish_weighted_kernel); every backward kernel
// multiplies its upstream gradient. Every kernel has a compile-time kW, chosen on the host (with_weights): kW false, the
// instantiation of a call without weights, compiles the weight code out (its PixelWeights argument is passed but
// never read).
#include "checks.h"
#include "common.cuh"
#include "hierarchical_softmax_math.h"
#include "upsample.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <type_traits>

namespace hss {
namespace cuda {
namespace {

// The block's copy of leaf_group, leaf-major: leaf j's group id at depth d + 1 is p[j * kMaxDepth + d].
// Every thread of a warp reads the same leaf at the same time: one broadcast shared load per depth, at
// an immediate offset from the leaf's row, instead of a dependent global load.
struct SharedGroups {
  const int32_t* p;
  __device__ int operator()(int d, int j) const { return p[j * kMaxDepth + d]; }
};

inline size_t group_smem_bytes(int64_t L) { return static_cast<size_t>(L) * kMaxDepth * sizeof(int32_t); }

// Copies the (D x L) table into the block's leaf-major one; ends with a barrier.
__device__ inline SharedGroups load_groups(const int32_t* __restrict__ group, int L, int D) {
  extern __shared__ __align__(16) unsigned char smem[];
  int32_t* t = reinterpret_cast<int32_t*>(smem);
  for (int k = threadIdx.x; k < D * L; k += blockDim.x) {  // sm90: trips=cdiv(D * L, threads)
    const int d = k / L;
    t[(k - d * L) * kMaxDepth + d] = group[k];
  }
  __syncthreads();
  return SharedGroups{t};
}

// The forward's per-block partials: the weighted loss and count (block_partial) and, with class weights
// (kW and wpart non-null), the sum of the labelled pixels' class weights (block_weight_partial).
template <bool kW>
__device__ inline void block_partials(double v, int64_t c, double wv, double* part, int64_t* cnt, double* wpart) {
  block_partial(v, c, part, cnt);
  if constexpr (kW) {
    if (wpart) block_weight_partial(wv, wpart);
  }
}

template <typename T, typename A, bool kUp, bool kW>
__global__ void __launch_bounds__(kThreads)
hierarchical_softmax_fwd_kernel(const T* __restrict__ x, PixelGeom gx, int64_t sC, const int64_t* __restrict__ tgt,
                                PixelGeom gt, int64_t P, int L, int D, const int32_t* __restrict__ group,
                                const A* __restrict__ w, A eps, int64_t ignore_index, A* __restrict__ lp,
                                A* __restrict__ st, double* part, int64_t* cnt, UpsampleGeom<A> u,
                                PixelWeights<A> wts, double* wpart) {
  const SharedGroups groups = load_groups(group, L, D);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  A l = A(0);
  double ws = 0;
  int64_t c = 0;
  if (i < P) {
    const int64_t y = tgt[gt.offset(i)];
    const LabelKind kind = label_kind(y, L, ignore_index);
    if (kind == kLabelValid) {  // sm90: cold
      if constexpr (kUp)
        l = hierarchical_softmax_forward_pixel<A>(bilinear_col<T, A>(x, sC, u.stencil(i)), L, D, groups,
                                                  static_cast<int>(y), w, eps, st + i, P);
      else
        l = hierarchical_softmax_forward_pixel<A>(GlobalCol<T, A>{x + gx.offset(i), sC}, L, D, groups,
                                                  static_cast<int>(y), w, eps, st + i, P);
      if constexpr (kW) {  // the pixel's weight, at the target's pixel i (also with upsampling)
        l *= wts.at(i, y);
        ws = static_cast<double>(wts.of_class(y));
      }
    } else {
      // ignored: 0; a bad label (see common.h): NaN, never a table read
      l = kind == kLabelBad ? quiet_nan<A>() : A(0);
      for (int d = 0; d <= D; ++d) st[d * P + i] = l;  // sm90: trips=D + 1
    }
    c = kind != kLabelIgnored;
    if (lp) lp[i] = l;
  }
  block_partials<kW>(static_cast<double>(l), c, ws, part, cnt, wpart);
}

template <typename T, typename A, bool kW>
__global__ void __launch_bounds__(kThreads)
hierarchical_softmax_bwd_kernel(const A* __restrict__ grad, PixelGeom gg, const T* __restrict__ x, T* __restrict__ out,
                                PixelGeom gx, int64_t sC, const int64_t* __restrict__ tgt, PixelGeom gt, int64_t P,
                                int L, int D, const int32_t* __restrict__ group, const A* __restrict__ w, A eps,
                                int64_t ignore_index, const A* __restrict__ st, PixelWeights<A> wts) {
  const SharedGroups groups = load_groups(group, L, D);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= P) return;
  const int64_t y = tgt[gt.offset(i)];
  const int64_t off = gx.offset(i);
  const LabelKind kind = label_kind(y, L, ignore_index);
  if (kind != kLabelValid) {  // sm90: cold
    write_unlabelled_column<T, A>(out + off, sC, L, kind);
    return;
  }
  const A g = grad[gg.offset(i)];
  hierarchical_softmax_backward_pixel<A>(GlobalCol<T, A>{x + off, sC}, GlobalOut<T, A>{out + off, sC}, L, D, groups,
                        static_cast<int>(y), w, eps, st + i, P, kW ? g * wts.at(i, y) : g);
}

// Fused upsampling, the banded backward's rows kernel (upsample.cuh): one thread per destination pixel of the
// band [Y0, Y0 + bp / W) of every image (nq = N bp threads), its gradient row written to the scratch (zeros
// for an ignored pixel, NaN for a bad label; upsample.cuh's layout: a warp's stores of a channel coalesce).
template <typename T, typename A, bool kW>
__global__ void __launch_bounds__(kThreads)
hierarchical_softmax_up_rows_kernel(const A* __restrict__ grad, PixelGeom gg, const T* __restrict__ x, int64_t sC,
                                    UpsampleGeom<A> u, int64_t Y0, int64_t bp, int64_t nq,
                                    const int64_t* __restrict__ tgt, PixelGeom gt, int64_t P, int L, int D,
                                    const int32_t* __restrict__ group, const A* __restrict__ w, A eps,
                                    int64_t ignore_index, const A* __restrict__ st, A* __restrict__ scratch,
                                    int64_t ssn, int64_t ssc, int64_t ssy, PixelWeights<A> wts) {
  const SharedGroups groups = load_groups(group, L, D);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= nq) return;
  const int64_t b = t / bp, r = t - b * bp, Y = r / u.W;
  HierarchicalSoftmaxUpsampledRow<T, A, SharedGroups, kW>{{x, sC, u, tgt, gt, grad, gg}, L, D, groups, w, eps,
                                                          ignore_index, st, P, wts}(
      (b * u.H + Y0) * u.W + r, StoreOut<A>{scratch + b * ssn + Y * ssy + (r - Y * u.W), ssc});
}

// ---------------------------------------------------------------------------------------------------
// The NCHW path (docs/MATH.md §2.9): V = 16 / sizeof(T) neighbouring pixels per thread (4 float32, 8
// float16/bfloat16), one 16-byte load (store) per channel, the lanes' math in hierarchical_softmax_math.h's
// hierarchical_softmax_forward_pixels / _backward_pixels. Taken when vec_lanes() says the layout allows it: every channel plane of an image
// contiguous (sW = 1, sH = W), H * W, sN and sC multiples of V (so a thread's V pixels lie in one image,
// with no partial group) and 16-byte aligned data; anything else runs the one-pixel kernels above.

// The block's copy of leaf_group for the lanes: leaf j's group ids at depths 1 .. kPackedDepth in one
// int4 (-1 past depth D): one 16-byte broadcast shared load per channel and thread.
struct PackedGroups {
  const int4* p;
  __device__ int operator()(int d, int j) const { return reinterpret_cast<const int*>(p + j)[d]; }
  __device__ void row(int j, int (&g)[kPackedDepth]) const {
    const int4 v = p[j];
    g[0] = v.x;
    g[1] = v.y;
    g[2] = v.z;
    g[3] = v.w;
  }
};
static_assert(kPackedDepth == 4, "PackedGroups holds four depths in an int4");

inline size_t packed_smem_bytes(int64_t L) { return static_cast<size_t>(L) * sizeof(int4); }

// Copies the (D x L) table into the block's packed one; ends with a barrier.
__device__ inline PackedGroups load_packed_groups(const int32_t* __restrict__ group, int L, int D) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* t = reinterpret_cast<int*>(smem);
  for (int k = threadIdx.x; k < L * kPackedDepth; k += blockDim.x) {  // sm90: trips=cdiv(L * 4, threads)
    const int j = k / kPackedDepth, d = k - j * kPackedDepth;
    t[k] = d < D ? group[d * L + j] : -1;
  }
  __syncthreads();
  return PackedGroups{reinterpret_cast<const int4*>(t)};
}

// bfloat16 is float32's upper half: the pair packed in word u (lane 2i in the low half, 2i + 1 in the high)
// as two floats with one instruction each (a shift, a mask), exactly static_cast<float>'s values.
__device__ inline float bf16_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ inline float bf16_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

// V neighbouring pixels of one channel plane: the current channel at p (16-byte aligned), the next at p + s.
template <typename T, typename A, int V>
struct LaneCols {
  const T* p;
  int64_t s;
  __device__ void load(A (&z)[V]) const {
    const uint4 q = *reinterpret_cast<const uint4*>(p);  // sm90: logits
    if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
      const uint32_t u[4] = {q.x, q.y, q.z, q.w};
      HSS_UNROLL
      for (int k = 0; k < 4; ++k) {
        z[2 * k] = bf16_lo(u[k]);
        z[2 * k + 1] = bf16_hi(u[k]);
      }
    } else {
      T t[V];
      memcpy(t, &q, sizeof q);
      HSS_UNROLL
      for (int k = 0; k < V; ++k) z[k] = static_cast<A>(t[k]);
    }
  }
  __device__ void next() { p += s; }
  __device__ A at(int k, int64_t c) const { return static_cast<A>(p[k + c * s]); }
};

// The forward's first pass (hierarchical_softmax_math.h lane_maxima) on bfloat16 lanes: the maxima of the raw
// pairs (max.bf16x2, one instruction per two lanes and channel, no conversion: bfloat16 -> float is exact and
// monotonic, so the maximum is the same number), converted once at the end. A NaN logit never ends in m (the
// second pass's sum carries it into the loss).
__device__ inline void lane_maxima(const LaneCols<c10::BFloat16, float, 8>& x, int L, float (&m)[8]) {
  uint32_t r[4] = {0xff80ff80u, 0xff80ff80u, 0xff80ff80u, 0xff80ff80u};  // -inf, -inf
  const c10::BFloat16* p = x.p;
  for (int j = 0; j < L; ++j) {  // sm90: trips=L
    const uint4 q = *reinterpret_cast<const uint4*>(p);  // sm90: logits
    p += x.s;
    const uint32_t u[4] = {q.x, q.y, q.z, q.w};
    HSS_UNROLL
    for (int k = 0; k < 4; ++k) asm("max.bf16x2 %0, %0, %1;" : "+r"(r[k]) : "r"(u[k]));
  }
  HSS_UNROLL
  for (int k = 0; k < 4; ++k) {
    m[2 * k] = hmax(m[2 * k], bf16_lo(r[k]));
    m[2 * k + 1] = hmax(m[2 * k + 1], bf16_hi(r[k]));
  }
}

template <typename T, typename A, int V>
struct LaneOut {
  T* p;
  int64_t s;
  __device__ void next() { p += s; }
  __device__ void store(const A (&v)[V]) const {
    T t[V];
    HSS_UNROLL
    for (int k = 0; k < V; ++k) t[k] = static_cast<T>(v[k]);
    uint4 q;
    memcpy(&q, t, sizeof q);
    *reinterpret_cast<uint4*>(p) = q;
  }
};

template <typename T>
constexpr int lanes_of() { return static_cast<int>(16 / sizeof(T)); }

// Whether the lanes kernels can read (and write, out) t: see above. D <= kPackedDepth, float types of
// at most 4 bytes.
inline bool vec_lanes(const at::Tensor& t, const at::Tensor* out, int64_t D) {
  if (D > kPackedDepth || t.element_size() > 4) return false;
  const int64_t V = 16 / t.element_size();
  const int64_t H = t.size(2), W = t.size(3);
  const bool plane = t.stride(3) == 1 && (H == 1 || t.stride(2) == W);
  const auto aligned = [](const at::Tensor& a) { return reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0; };
  return plane && (H * W) % V == 0 && t.stride(0) % V == 0 && t.stride(1) % V == 0 && aligned(t) &&
         (!out || (out->strides() == t.strides() && aligned(*out)));
}

// Thread t owns pixels i0 = t * V .. i0 + V - 1 (flat over N x H x W), all in image n = i0 / HW, at
// element offset n * sN + (i0 - n * HW) of channel 0 (the plane is contiguous).
template <int V>
__device__ inline bool lane_pixels(int64_t P, int64_t HW, int64_t sN, int64_t& i0, int64_t& off) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  i0 = t * V;
  if (i0 >= P) return false;
  const int64_t n = i0 / HW;
  off = n * sN + (i0 - n * HW);
  return true;
}

// a[k] for a k known only at run time, by selects: the array stays in registers.
template <typename U, int V>
__device__ inline U lane(const U (&a)[V], int k) {
  U r = a[0];
  HSS_UNROLL
  for (int q = 1; q < V; ++q) r = q == k ? a[q] : r;
  return r;
}

// Lane k's label: its leaf (y[k]) or -1 (ignored or bad); returns the mask (bit k) of the bad labels.
// (A mask, not an array of kinds: one register across the channel loops rather than V predicates.)
template <int V>
__device__ inline unsigned lane_labels(const int64_t* __restrict__ tgt, const PixelGeom& gt, int64_t i0, int L,
                                       int64_t ignore_index, int (&y)[V]) {
  int64_t toff[V];
  gt.offsets(i0, V, toff);
  unsigned bad = 0;
  HSS_UNROLL
  for (int k = 0; k < V; ++k) {
    const int64_t v = tgt[toff[k]];
    const LabelKind kind = label_kind(v, L, ignore_index);
    y[k] = kind == kLabelValid ? static_cast<int>(v) : -1;
    bad |= static_cast<unsigned>(kind == kLabelBad) << k;
  }
  return bad;
}

// The lanes forward's lanes flagged far (hierarchical_softmax_math.h) recomputed one pixel at a time, lane k
// through its own column col(k).
template <int V, typename A, typename Col, typename Groups>
__device__ inline void redo_far_lanes(unsigned far, A (&l)[V], const int (&y)[V], const Col& col, int L, int D,
                                      const Groups& groups, const A* __restrict__ w, A eps, A* __restrict__ st,
                                      int64_t i0, int64_t P) {
  for (int k = 0; k < V; ++k) {  // sm90: trips=0
    if (!(far >> k & 1u)) continue;
    const A lk = hierarchical_softmax_forward_pixel<A>(col(k), L, D, groups, lane(y, k), w, eps, st + i0 + k, P);
    HSS_UNROLL
    for (int q = 0; q < V; ++q) l[q] = q == k ? lk : l[q];
  }
}

// The lanes forward's last step, lanes 0 .. n - 1 (n < V past a row's end) of pixels i0 ..: each lane's loss (0
// where ignored, NaN for a bad label, never a table read; times its weight at its target pixel) into lp, the
// unlabelled lanes' statistics rows, and the thread's sums in lane order (the same sum on every run).
template <bool kW, int V, typename A>
__device__ inline void finish_lanes(A (&l)[V], const int (&y)[V], unsigned bad, int n, int64_t i0, int D, int64_t P,
                                    A* __restrict__ st, A* __restrict__ lp, const PixelWeights<A>& wts,
                                    double& l_sum, double& w_sum, int64_t& c) {
  HSS_UNROLL
  for (int k = 0; k < V; ++k) {
    if (k >= n) break;
    const bool is_bad = bad >> k & 1u;
    if (y[k] < 0) {  // sm90: cold
      l[k] = is_bad ? quiet_nan<A>() : A(0);
      for (int d = 0; d <= D; ++d) st[d * P + i0 + k] = l[k];  // sm90: trips=D + 1
    } else if constexpr (kW) {
      l[k] *= wts.at(i0 + k, y[k]);
      w_sum += static_cast<double>(wts.of_class(y[k]));
    }
    if (lp) lp[i0 + k] = l[k];
    l_sum += static_cast<double>(l[k]);
    c += y[k] >= 0 || is_bad;
  }
}

template <typename T, typename A, bool kW>
__global__ void __launch_bounds__(kThreads)
hierarchical_softmax_fwd_lanes_kernel(const T* __restrict__ x, int64_t HW, int64_t sN, int64_t sC,
                                      const int64_t* __restrict__ tgt, PixelGeom gt, int64_t P, int L, int D,
                                      const int32_t* __restrict__ group, const A* __restrict__ w, A eps,
                                      int64_t ignore_index, A* __restrict__ lp, A* __restrict__ st, double* part,
                                      int64_t* cnt, PixelWeights<A> wts, double* wpart) {
  constexpr int V = lanes_of<T>();
  const PackedGroups groups = load_packed_groups(group, L, D);
  int64_t i0, off;
  double l_sum = 0, w_sum = 0;
  int64_t c = 0;
  if (lane_pixels<V>(P, HW, sN, i0, off)) {
    int y[V];
    const unsigned bad = lane_labels<V>(tgt, gt, i0, L, ignore_index, y);
    A l[V];
    const unsigned far = hierarchical_softmax_forward_pixels<V, A>(LaneCols<T, A, V>{x + off, sC}, L, D, groups, y, w,
                                                                   eps, st + i0, P, l);
    if (far)  // rare: a group far below the pixel's max (hierarchical_softmax_math.h); sm90: cold
      redo_far_lanes(far, l, y, [&](int k) { return GlobalCol<T, A>{x + off + k, sC}; }, L, D, groups, w, eps, st,
                     i0, P);
    finish_lanes<kW>(l, y, bad, V, i0, D, P, st, lp, wts, l_sum, w_sum, c);
  }
  block_partials<kW>(l_sum, c, w_sum, part, cnt, wpart);
}

template <typename T, typename A, bool kW>
__global__ void __launch_bounds__(kThreads)
hierarchical_softmax_bwd_lanes_kernel(const A* __restrict__ grad, PixelGeom gg, const T* __restrict__ x,
                                      T* __restrict__ out, int64_t HW, int64_t sN, int64_t sC,
                                      const int64_t* __restrict__ tgt, PixelGeom gt, int64_t P, int L, int D,
                                      const int32_t* __restrict__ group, const A* __restrict__ w, A eps,
                                      int64_t ignore_index, const A* __restrict__ st, PixelWeights<A> wts) {
  constexpr int V = lanes_of<T>();
  const PackedGroups groups = load_packed_groups(group, L, D);
  int64_t i0, off;
  if (!lane_pixels<V>(P, HW, sN, i0, off)) return;
  int y[V];
  const unsigned bad = lane_labels<V>(tgt, gt, i0, L, ignore_index, y);
  int64_t goff[V];
  gg.offsets(i0, V, goff);
  A g[V], fill[V];
  HSS_UNROLL
  for (int k = 0; k < V; ++k) {
    g[k] = grad[goff[k]];
    fill[k] = bad >> k & 1u ? quiet_nan<A>() : A(0);
  }
  if constexpr (kW) {  // a labelled lane's upstream gradient times its weight
    HSS_UNROLL
    for (int k = 0; k < V; ++k)
      if (y[k] >= 0) g[k] *= wts.at(i0 + k, y[k]);
  }
  const unsigned far = hierarchical_softmax_backward_pixels<V, A>(LaneCols<T, A, V>{x + off, sC},
                                                                  LaneOut<T, A, V>{out + off, sC}, L, D, groups, y,
                                                                  fill, w, eps, st + i0, P, g);
  if (far) {  // rare: a level whose factor exp(lse - b_d) would be huge; sm90: cold
    for (int k = 0; k < V; ++k)  // sm90: trips=0
      if (far >> k & 1u)
        hierarchical_softmax_backward_pixel<A>(GlobalCol<T, A>{x + off + k, sC}, GlobalOut<T, A>{out + off + k, sC},
                                               L, D, groups, lane(y, k), w, eps, st + i0 + k, P, lane(g, k));
  }
}

// ---------------------------------------------------------------------------------------------------
// Fused upsampling on the lanes (docs/MATH.md §2.9, §6): G = lanes_of<T>() destination pixels of one row per
// thread, X0 = G gx (gw groups per row), each channel of the G lanes interpolated through upsample_math.h's
// UpLanes (each lane's stencil computed once; lanes past the row's end, n < G, repeat its last pixel and are
// not computed), the V-pixel math of the lanes kernels above. Any layout of the logits (scalar loads), trees
// up to kPackedDepth deep, float types of at most 4 bytes; otherwise the one-pixel kUp forward and
// hierarchical_softmax_up_rows_kernel.

// The labels of the first n lanes of one destination row from pixel i0 (lane k's target at offset
// gt.offset(i0) + k sW): y[k] the leaf or -1 (ignored, bad, past n); returns the mask of the bad labels.
template <int G>
__device__ inline unsigned row_lane_labels(const int64_t* __restrict__ tgt, const PixelGeom& gt, int64_t i0, int n,
                                           int L, int64_t ignore_index, int (&y)[G]) {
  const int64_t o = gt.offset(i0);
  unsigned bad = 0;
  HSS_UNROLL
  for (int k = 0; k < G; ++k) {
    const int64_t v = k < n ? tgt[o + k * gt.sW] : ignore_index;
    const LabelKind kind = label_kind(v, L, ignore_index);
    y[k] = kind == kLabelValid ? static_cast<int>(v) : -1;
    bad |= static_cast<unsigned>(kind == kLabelBad) << k;
  }
  return bad;
}

// The forward: ng = N H gw threads; the unlabelled lanes' stats and losses as hierarchical_softmax_fwd_lanes_kernel's.
template <typename T, typename A, bool kW>
__global__ void __launch_bounds__(kThreads)
hierarchical_softmax_fwd_up_lanes_kernel(const T* __restrict__ x, int64_t sC, UpsampleGeom<A> u,
                                         const int64_t* __restrict__ tgt, PixelGeom gt, int64_t P, int64_t ng,
                                         int64_t gw, int L, int D, const int32_t* __restrict__ group,
                                         const A* __restrict__ w, A eps, int64_t ignore_index, A* __restrict__ lp,
                                         A* __restrict__ st, double* part, int64_t* cnt, PixelWeights<A> wts,
                                         double* wpart) {
  constexpr int G = lanes_of<T>();
  const PackedGroups groups = load_packed_groups(group, L, D);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double l_sum = 0, w_sum = 0;
  int64_t c = 0;
  if (t < ng) {
    const int64_t rr = t / gw, X0 = (t - rr * gw) * G, i0 = rr * u.W + X0;
    const int n = u.W - X0 < G ? static_cast<int>(u.W - X0) : G;
    int y[G];
    const unsigned bad = row_lane_labels<G>(tgt, gt, i0, n, L, ignore_index, y);
    A l[G];
    const unsigned far = hierarchical_softmax_forward_pixels<G, A>(up_lanes<T, A, G>(x, sC, u, rr, X0, n), L, D,
                                                                   groups, y, w, eps, st + i0, P, l);
    if (far)  // rare: a group far below the pixel's max (hierarchical_softmax_math.h); sm90: cold
      redo_far_lanes(far, l, y, [&](int k) { return bilinear_col<T, A>(x, sC, u.stencil(i0 + k)); }, L, D, groups, w,
                     eps, st, i0, P);
    finish_lanes<kW>(l, y, bad, n, i0, D, P, st, lp, wts, l_sum, w_sum, c);
  }
  block_partials<kW>(l_sum, c, w_sum, part, cnt, wpart);
}

// The banded backward's rows kernel (upsample.cuh): G destination pixels of one row of the band [Y0, Y0 + rows)
// per thread (bg = rows gw groups per image, nq = N bg threads), their gradient rows stored to the scratch G
// lanes at a time (ScratchLanes: the warp's stores of a channel contiguous; lanes past the row's end write its
// padding, which nothing reads), the unlabelled lanes' rows 0 (ignored) or NaN (bad label).
template <typename T, typename A, bool kW>
__global__ void __launch_bounds__(kThreads)
hierarchical_softmax_up_rows_lanes_kernel(const A* __restrict__ grad, PixelGeom gg, const T* __restrict__ x,
                                          int64_t sC, UpsampleGeom<A> u, int64_t Y0, int64_t bg, int64_t gw,
                                          int64_t nq, const int64_t* __restrict__ tgt, PixelGeom gt, int64_t P, int L,
                                          int D, const int32_t* __restrict__ group, const A* __restrict__ w, A eps,
                                          int64_t ignore_index, const A* __restrict__ st, A* __restrict__ scratch,
                                          int64_t ssn, int64_t ssc, int64_t ssy, PixelWeights<A> wts) {
  constexpr int G = lanes_of<T>();
  const PackedGroups groups = load_packed_groups(group, L, D);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= nq) return;
  const int64_t b = t / bg, r = t - b * bg, yr = r / gw, X0 = (r - yr * gw) * G;
  const int64_t rr = b * u.H + Y0 + yr, i0 = rr * u.W + X0;
  const int n = u.W - X0 < G ? static_cast<int>(u.W - X0) : G;
  int y[G];
  const unsigned bad = row_lane_labels<G>(tgt, gt, i0, n, L, ignore_index, y);
  const int64_t go = gg.offset(i0);
  A g[G], fill[G];
  HSS_UNROLL
  for (int k = 0; k < G; ++k) {
    g[k] = k < n ? grad[go + k * gg.sW] : A(0);
    fill[k] = bad >> k & 1u ? quiet_nan<A>() : A(0);
  }
  if constexpr (kW) {  // a labelled lane's upstream gradient times its weight, at its target pixel
    HSS_UNROLL
    for (int k = 0; k < G; ++k)
      if (y[k] >= 0) g[k] *= wts.at(i0 + k, y[k]);
  }
  const ScratchLanes<A, G> out{scratch + b * ssn + yr * ssy + X0, ssc};
  const unsigned far = hierarchical_softmax_backward_pixels<G, A>(up_lanes<T, A, G>(x, sC, u, rr, X0, n), out, L, D,
                                                                  groups, y, fill, w, eps, st + i0, P, g);
  if (far) {  // rare: a level whose factor exp(lse - b_d) would be huge; sm90: cold
    for (int k = 0; k < G; ++k)  // sm90: trips=0
      if (far >> k & 1u)
        hierarchical_softmax_backward_pixel<A>(bilinear_col<T, A>(x, sC, u.stencil(i0 + k)),
                                               StoreOut<A>{out.p + k, ssc}, L, D, groups, lane(y, k), w, eps,
                                               st + i0 + k, P, lane(g, k));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hierarchical_softmax_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& leaf_group, const at::Tensor& level_weights,
    double eps, int64_t ignore_index, bool per_pixel, int64_t upsample, bool align_corners,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& pixel_weight) {
  const int64_t D = check_hierarchical_softmax("hierarchical_softmax_fwd", logits, target, leaf_group, level_weights,
                                               upsample);
  check_weights("hierarchical_softmax_fwd", class_weight, pixel_weight, logits, target, logits.size(1));
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor loss, count;
  std::tie(loss, count) = new_loss(logits, target, per_pixel);
  at::Tensor weight_sum = new_weight_sum(logits);
  const int64_t P = target.numel();
  at::Tensor stats = at::empty({D + 1, target.size(0), target.size(1), target.size(2)},
                               logits.options().dtype(acc_type(logits)));
  if (P == 0) {
    zero_empty_loss(loss, count, per_pixel);
    weight_sum.zero_();
    return {loss, stats, count, weight_sum};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool lanes = !upsample && vec_lanes(logits, nullptr, D);
  const bool fused_lanes = upsample && D <= kPackedDepth;  // (and float types of at most 4 bytes)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "hierarchical_softmax_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const PixelWeights<A> wts = pixel_weights<A>(class_weight, pixel_weight);
    with_weights(wts.any(), [&](auto weighted) {
      constexpr bool kW = decltype(weighted)::value;
      if constexpr (sizeof(scalar_t) <= 4) {
        if (lanes) {
          const auto kernel = hierarchical_softmax_fwd_lanes_kernel<scalar_t, A, kW>;
          const int64_t nb = num_blocks(P / lanes_of<scalar_t>(), kThreads);
          Partials partials(logits, nb, wts.cw != nullptr);
          const size_t smem = packed_smem_bytes(logits.size(1));
          allow_smem(kernel, smem, kThreads * (sizeof(double) + sizeof(int64_t)), logits.get_device(),
                     "hierarchical_softmax", logits.size(1), "leaves");
          kernel<<<nb, kThreads, smem, stream>>>(
              logits.data_ptr<scalar_t>(), logits.size(2) * logits.size(3), logits.stride(0), logits.stride(1),
              target.data_ptr<int64_t>(), geom(target), P, logits.size(1), D, leaf_group.data_ptr<int32_t>(),
              level_weights.data_ptr<A>(), static_cast<A>(eps), ignore_index, per_pixel ? loss.data_ptr<A>() : nullptr,
              stats.data_ptr<A>(), partials.p(), partials.c(), wts, partials.w());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          partials.finish<A>(loss, count, weight_sum, per_pixel, stream);
          return;
        }
        if (fused_lanes) {
          const auto kernel = hierarchical_softmax_fwd_up_lanes_kernel<scalar_t, A, kW>;
          constexpr int G = lanes_of<scalar_t>();
          const int64_t gw = (target.size(2) + G - 1) / G, ng = target.size(0) * target.size(1) * gw;
          const int64_t nb = num_blocks(ng, kThreads);
          Partials partials(logits, nb, wts.cw != nullptr);
          const size_t smem = packed_smem_bytes(logits.size(1));
          allow_smem(kernel, smem, kThreads * (sizeof(double) + sizeof(int64_t)), logits.get_device(),
                     "hierarchical_softmax", logits.size(1), "leaves");
          kernel<<<nb, kThreads, smem, stream>>>(
              logits.data_ptr<scalar_t>(), logits.stride(1),
              UpsampleGeom<A>::make(logits.sizes().data(), logits.strides().data(), target.size(1), target.size(2),
                                    align_corners),
              target.data_ptr<int64_t>(), geom(target), P, ng, gw, logits.size(1), D, leaf_group.data_ptr<int32_t>(),
              level_weights.data_ptr<A>(), static_cast<A>(eps), ignore_index, per_pixel ? loss.data_ptr<A>() : nullptr,
              stats.data_ptr<A>(), partials.p(), partials.c(), wts, partials.w());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          partials.finish<A>(loss, count, weight_sum, per_pixel, stream);
          return;
        }
      }
      const int64_t nb = num_blocks(P, kThreads);
      Partials partials(logits, nb, wts.cw != nullptr);
      const auto kernel = upsample ? hierarchical_softmax_fwd_kernel<scalar_t, A, true, kW>
                                   : hierarchical_softmax_fwd_kernel<scalar_t, A, false, kW>;
      const size_t smem = group_smem_bytes(logits.size(1));
      allow_smem(kernel, smem, kThreads * (sizeof(double) + sizeof(int64_t)), logits.get_device(),
                 "hierarchical_softmax", logits.size(1), "leaves");
      kernel<<<nb, kThreads, smem, stream>>>(
          logits.data_ptr<scalar_t>(), geom(logits), logits.stride(1), target.data_ptr<int64_t>(), geom(target), P,
          logits.size(1), D, leaf_group.data_ptr<int32_t>(), level_weights.data_ptr<A>(), static_cast<A>(eps),
          ignore_index, per_pixel ? loss.data_ptr<A>() : nullptr, stats.data_ptr<A>(), partials.p(), partials.c(),
          UpsampleGeom<A>::make(logits.sizes().data(), logits.strides().data(), target.size(1), target.size(2),
                                align_corners),
          wts, partials.w());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      partials.finish<A>(loss, count, weight_sum, per_pixel, stream);
    });
  });
  return {loss, stats, count, weight_sum};
}

at::Tensor hierarchical_softmax_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                         const at::Tensor& stats, const at::Tensor& leaf_group,
                                         const at::Tensor& level_weights, double eps, int64_t ignore_index,
                                         int64_t upsample, bool align_corners,
                                         const std::optional<at::Tensor>& class_weight,
                                         const std::optional<at::Tensor>& pixel_weight) {
  const int64_t D = check_hierarchical_softmax("hierarchical_softmax_bwd", logits, target, leaf_group, level_weights,
                                               upsample);
  check_grad("hierarchical_softmax_bwd", grad, logits, target);
  check_weights("hierarchical_softmax_bwd", class_weight, pixel_weight, logits, target, logits.size(1));
  check_table("hierarchical_softmax_bwd", "stats", stats, logits, (D + 1) * target.numel(), acc_type(logits));
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = dense_logits(logits);
  at::Tensor out = at::empty_like(x);
  const int64_t P = target.numel();
  if (P == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hierarchical_softmax_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const PixelWeights<A> wts = pixel_weights<A>(class_weight, pixel_weight);
    with_weights(wts.any(), [&](auto weighted) {
      constexpr bool kW = decltype(weighted)::value;
      if constexpr (sizeof(scalar_t) <= 4) {
        if (upsample && D <= kPackedDepth) {
          const auto kernel = hierarchical_softmax_up_rows_lanes_kernel<scalar_t, A, kW>;
          constexpr int G = lanes_of<scalar_t>();
          const size_t smem = packed_smem_bytes(x.size(1));
          allow_smem(kernel, smem, 0, x.get_device(), "hierarchical_softmax", x.size(1), "leaves");
          const UpsampleGeom<A> u = UpsampleGeom<A>::make(x.sizes().data(), x.strides().data(), target.size(1),
                                                          target.size(2), align_corners);
          const int64_t gw = (u.W + G - 1) / G;
          up_backward_bands<scalar_t, A>(
              x, target, out, align_corners, "hierarchical_softmax_loss", stream,
              [&](const UpBand& bd, A* scratch, int64_t ssn, int64_t ssc, int64_t ssy) {
                const int64_t bg = (bd.Y1 - bd.Y0) * gw, nq = x.size(0) * bg;
                kernel<<<num_blocks(nq, kThreads), kThreads, smem, stream>>>(
                    grad.data_ptr<A>(), grad_geom(grad, target), x.data_ptr<scalar_t>(), x.stride(1), u, bd.Y0, bg,
                    gw, nq, target.data_ptr<int64_t>(), geom(target), P, x.size(1), D, leaf_group.data_ptr<int32_t>(),
                    level_weights.data_ptr<A>(), static_cast<A>(eps), ignore_index, stats.data_ptr<A>(), scratch,
                    ssn, ssc, ssy, wts);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
          return;
        }
      }
      if (upsample) {  // trees deeper than kPackedDepth, float64: one destination pixel per thread
        const auto kernel = hierarchical_softmax_up_rows_kernel<scalar_t, A, kW>;
        const size_t smem = group_smem_bytes(x.size(1));
        allow_smem(kernel, smem, 0, x.get_device(), "hierarchical_softmax", x.size(1), "leaves");
        const UpsampleGeom<A> u =
            UpsampleGeom<A>::make(x.sizes().data(), x.strides().data(), target.size(1), target.size(2), align_corners);
        up_backward_bands<scalar_t, A>(
            x, target, out, align_corners, "hierarchical_softmax_loss", stream,
            [&](const UpBand& bd, A* scratch, int64_t ssn, int64_t ssc, int64_t ssy) {
              const int64_t bp = (bd.Y1 - bd.Y0) * u.W, nq = x.size(0) * bp;
              kernel<<<num_blocks(nq, kThreads), kThreads, smem, stream>>>(
                  grad.data_ptr<A>(), grad_geom(grad, target), x.data_ptr<scalar_t>(), x.stride(1), u, bd.Y0, bp, nq,
                  target.data_ptr<int64_t>(), geom(target), P, x.size(1), D, leaf_group.data_ptr<int32_t>(),
                  level_weights.data_ptr<A>(), static_cast<A>(eps), ignore_index, stats.data_ptr<A>(), scratch, ssn,
                  ssc, ssy, wts);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
        return;
      }
      if constexpr (sizeof(scalar_t) <= 4) {
        if (vec_lanes(x, &out, D)) {
          const auto kernel = hierarchical_softmax_bwd_lanes_kernel<scalar_t, A, kW>;
          const size_t smem = packed_smem_bytes(x.size(1));
          allow_smem(kernel, smem, 0, x.get_device(), "hierarchical_softmax", x.size(1), "leaves");
          kernel<<<num_blocks(P / lanes_of<scalar_t>(), kThreads), kThreads, smem, stream>>>(
              grad.data_ptr<A>(), grad_geom(grad, x), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
              x.size(2) * x.size(3), x.stride(0), x.stride(1), target.data_ptr<int64_t>(), geom(target), P, x.size(1),
              D, leaf_group.data_ptr<int32_t>(), level_weights.data_ptr<A>(), static_cast<A>(eps), ignore_index,
              stats.data_ptr<A>(), wts);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      const auto kernel = hierarchical_softmax_bwd_kernel<scalar_t, A, kW>;
      const size_t smem = group_smem_bytes(x.size(1));
      allow_smem(kernel, smem, 0, x.get_device(), "hierarchical_softmax", x.size(1), "leaves");
      kernel<<<num_blocks(P, kThreads), kThreads, smem, stream>>>(
          grad.data_ptr<A>(), grad_geom(grad, x), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), geom(x),
          x.stride(1), target.data_ptr<int64_t>(), geom(target), P, x.size(1), D, leaf_group.data_ptr<int32_t>(),
          level_weights.data_ptr<A>(), static_cast<A>(eps), ignore_index, stats.data_ptr<A>(), wts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace hss

TORCH_LIBRARY_IMPL(hss_kernels, CUDA, m) {
  m.impl("hierarchical_softmax_fwd", &hss::cuda::hierarchical_softmax_fwd_cuda);
  m.impl("hierarchical_softmax_bwd", &hss::cuda::hierarchical_softmax_bwd_cuda);
}
