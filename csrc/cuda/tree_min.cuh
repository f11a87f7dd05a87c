// Internal to the CUDA tree-min / tree BCE (csrc/cuda/tree_min.cu, csrc/cuda/tree_min_up.cu; two
// translation units so that nvcc compiles them in parallel): the device pieces both files' kernels use (the
// block's node table, the per-thread depth slots in shared memory, the lanes' offsets, a backward group's labels
// and upstream gradients, the shared memory sizes), and the host entry points of the fused-upsampling paths
// (defined in tree_min_up.cu for float, double, Half and BFloat16) that the op functions in tree_min.cu call.
#pragma once

#include "checks.h"
#include "common.cuh"
#include "tree_min_math.h"

#include <ATen/OpMathType.h>

#include <cstdint>

namespace hss {
namespace cuda {
namespace {

// Shared memory of a block: the pre-order node table (V TreeNodes, read by every thread of a warp at
// once: a broadcast), then the per-depth scratch (group_smem_bytes, min_bwd_group_smem_bytes).
template <typename A>
__host__ __device__ inline size_t node_table_bytes(int V) {
  return static_cast<size_t>(V) * sizeof(TreeNode<A>);
}
// The group forward's shared memory: the node table, then (tree-min) D + 1 depth slots of G lanes per
// thread, laid out (slot, thread).
template <typename A, int G>
inline size_t group_smem_bytes(int V, int D, int threads, bool extrema) {
  return node_table_bytes<A>(V) + (extrema ? static_cast<size_t>(D + 1) * threads * sizeof(Lanes<A, G>) : 0);
}

// Fills the block's node table; every thread of the block calls it (it synchronises the block).
template <typename A>
__device__ inline NodeTable<A> load_node_table(unsigned char* smem, const TreeIndex& ti, const A* k) {
  TreeNode<A>* nodes = reinterpret_cast<TreeNode<A>*>(smem);
  for (int p = threadIdx.x; p < ti.V; p += blockDim.x) nodes[p] = tree_node(ti, k, p);  // sm90: trips=cdiv(V, threads)
  __syncthreads();
  return NodeTable<A>{nodes};
}

// Per-thread depth slots in shared memory, (slot, thread), a Lanes each: the thread's slot 0 and the
// distance between slots, in bytes.
template <typename A, int G>
struct SharedLanes {
  unsigned char* p;
  int sb;
  __device__ Lanes<A, G>& operator()(int d) const { return *reinterpret_cast<Lanes<A, G>*>(p + d * sb); }
};

// The offsets of pixels i0 .. i0 + G - 1 through g (one division for the group, unrolled so that they stay
// in registers); lanes j >= n (past the last pixel, n >= 1) repeat lane n - 1's offset.
template <int G>
__device__ inline void lane_offsets(const PixelGeom& g, int64_t i0, int64_t n, int64_t* out) {
  const int64_t hw = g.H * g.W;
  int64_t b = i0 / hw;
  const int64_t r = i0 - b * hw;
  int64_t h = r / g.W;
  int64_t w = r - h * g.W;
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    out[j] = j == 0 || j < n ? b * g.sN + h * g.sH + w * g.sW : out[j > 0 ? j - 1 : 0];
    if (++w == g.W) {
      w = 0;
      if (++h == g.H) {
        h = 0;
        ++b;
      }
    }
  }
}

// A backward group's G labels (valid / bad / y, y = 0 for the others: never a table read) and upstream
// gradients (0 past the n pixels), each labelled lane's gradient times its weight when kW.
template <bool kW, int G, typename A>
__device__ inline void load_group_rows(const int64_t* __restrict__ tgt, PixelGeom gt, const A* __restrict__ grad,
                                       PixelGeom gg, int64_t i0, int64_t n, int L, int64_t ignore_index,
                                       const PixelWeights<A>& w, int (&y)[G], bool (&valid)[G], bool (&bad)[G],
                                       A (&g)[G]) {
  int64_t toff[G], goff[G];
  lane_offsets<G>(gt, i0, n, toff);
  lane_offsets<G>(gg, i0, n, goff);
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    const int64_t yj = j < n ? tgt[toff[j]] : ignore_index;
    const LabelKind kind = label_kind(yj, L, ignore_index);
    valid[j] = kind == kLabelValid;
    bad[j] = kind == kLabelBad;
    y[j] = valid[j] ? static_cast<int>(yj) : 0;  // see common.h: never a table read
    g[j] = j < n ? grad[goff[j]] : A(0);
  }
  if constexpr (kW) {  // each labelled lane's upstream gradient times its weight
    int64_t woff[G];
    if (w.pw) lane_offsets<G>(w.gw, i0, n, woff);
    HSS_UNROLL
    for (int j = 0; j < G; ++j)
      if (valid[j]) {
        const A cy = w.of_class(y[j]);
        g[j] *= w.pw ? cy * w.pw[woff[j]] : cy;
      }
  }
}

// A forward group's G labels at the target pixels i0 .. i0 + n - 1 (kind: ignored past n; y = 0 but for a
// valid label: never a table read); whether any lane is labelled.
template <int G>
__device__ __forceinline__ bool load_group_labels(const int64_t* __restrict__ tgt, PixelGeom gt, int64_t i0,
                                                  int64_t n, int L, int64_t ignore_index, int (&y)[G],
                                                  LabelKind (&kind)[G]) {
  int64_t toff[G];
  lane_offsets<G>(gt, i0, n, toff);
  bool any = false;
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    const int64_t yj = j < n ? tgt[toff[j]] : ignore_index;
    kind[j] = j < n ? label_kind(yj, L, ignore_index) : kLabelIgnored;
    y[j] = kind[j] == kLabelValid ? static_cast<int>(yj) : 0;  // see common.h: never a table read
    any |= kind[j] == kLabelValid;
  }
  return any;
}

// A forward group's G losses l (read for the labelled lanes only) into the thread's sums: NaN for a bad label,
// 0 for an ignored one; times the class and pixel weights when kW (pw read at the target pixel i0 + j, the
// class weights summed into ws); the first n lanes counted and, with lp, written per pixel.
template <bool kW, int G, typename A>
__device__ __forceinline__ void add_group_losses(const A (&l)[G], const int (&y)[G], const LabelKind (&kind)[G],
                                                 int64_t i0, int64_t n, const PixelWeights<A>& w,
                                                 A* __restrict__ lp, double& sum, int64_t& c, double& ws) {
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    A v = kind[j] == kLabelValid ? l[j] : kind[j] == kLabelBad ? quiet_nan<A>() : A(0);
    if constexpr (kW) {
      if (kind[j] == kLabelValid) {  // the weights: one pw read per labelled lane, at its target pixel
        const A cy = w.of_class(y[j]);
        v *= w.pw ? cy * w.pw[w.gw.offset(i0 + j)] : cy;
        ws += static_cast<double>(cy);
      }
    }
    if (j < n) {
      sum += static_cast<double>(v);
      c += kind[j] != kLabelIgnored;
      if (lp) lp[i0 + j] = v;
    }
  }
}

// The tree-min backward's shared memory: the node table, then D + 1 depth slots of G lanes per thread, then
// tree_bit_words(V) words of node bits of G lanes per thread, both laid out (slot or word, thread).
template <typename A, int G>
inline size_t min_bwd_group_smem_bytes(int V, int D, int threads) {
  return node_table_bytes<A>(V) + static_cast<size_t>(D + 1) * threads * sizeof(Lanes<A, G>) +
         static_cast<size_t>(tree_bit_words(V)) * threads * sizeof(Lanes<uint32_t, G>);
}

// The backwards' shared memory above which they run fewer threads per block (the default dynamic limit).
constexpr size_t kDefaultSmem = 48 * 1024;

}  // namespace

// The forward with fused upsampling for logits of type T (tree_min_up.cu): tree_fwd_up_group_kernel, then the
// per-block partials' finish into loss, count and weight_sum.
template <typename T>
void tree_fwd_up_group(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tree_index,
                       const at::Tensor& node_weights, int64_t L, int64_t D, double gamma, double eps,
                       int64_t ignore_index, bool per_pixel, bool extrema, bool align_corners, at::Tensor& loss,
                       at::Tensor& count, const PixelWeights<at::opmath_type<T>>& w, at::Tensor& weight_sum,
                       cudaStream_t stream);

// The banded backward with fused upsampling for logits x (dense) of type T (tree_min_up.cu):
// tree_up_rows_group_kernel and the gather (upsample.cuh), the gradient into out (empty_like(x)).
template <typename T>
void tree_bwd_up_group(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& target,
                       const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D, double gamma,
                       double eps, int64_t ignore_index, bool extrema, bool align_corners,
                       const PixelWeights<at::opmath_type<T>>& w, at::Tensor& out, cudaStream_t stream);

}  // namespace cuda
}  // namespace hss
