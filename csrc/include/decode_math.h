// Per-pixel hierarchical decoding (docs/MATH.md §4.3), shared by the CUDA kernels (csrc/cuda/decode.cu)
// and the CPU's float64 path (and its float path with HSS_CPU_PIXEL_PATH=1) so that the CPU tests
// exercise the arithmetic the GPU runs (the CPU's float path scores the paths' shared prefixes row by
// row over a block of pixels instead, csrc/cpu/decode.cpp).
//
// A leaf's path score is the sum of a(x_v) over the nodes v on its root-to-leaf path, times the inverse
// of the path length (the leaf's depth) for the mean score. The winner is the leaf with the highest
// score, ties going to the lowest leaf id; a pixel with a NaN in any of its channels gets ignore_index
// instead.
//
// The tree is runtime data: a walk, one WalkNode per node in pre-order (channel, depth, leaf id or -1).
// Walking it, each node is activated once and its path score is its parent's score plus its activation,
// root side first (the summation order of every backend, so that leaves with equal activations along
// equal-length paths tie exactly); the parent's score is the last one written at depth - 1, so one
// running score per depth suffices. O(V) per pixel. Leaves are met in pre-order, not by id, so a tie
// goes to the met leaf only if its id is lower, unless the walk is `ordered` (leaf ids increase along
// it), where a strict > alone keeps the lowest id.
//
// Two walks: decode_pixel, one pixel (walk_step; the CUDA kernel for layouts that cannot be read 16
// bytes at a time, the CPU's float64 path), and the lanes, V neighbouring pixels of a channel plane at
// once (walk_step_lanes; the CUDA kernel on NCHW, 16 bytes of logits per load, and its CPU mirror under
// HSS_CPU_PIXEL_PATH=1). Both compute the same numbers, in the same order, with the same activations.
#pragma once

#include "common.h"

namespace hss {
namespace decode_math {

enum Activation : int64_t { kSigmoid = 0, kSoftmax = 1, kIdentity = 2 };
enum Score : int64_t { kSum = 0, kMean = 1 };

// One pre-order position of the walk. `x` is what the pixel accessor takes for the node's logit: the
// channel on the CPU, the channel times the channel stride in the CUDA kernel. depth in [1, kMaxDepth];
// leaf: the leaf id, -1 (any negative) for an internal node. 16 bytes: one shared-memory read.
struct alignas(16) WalkNode {
  int64_t x;
  int32_t depth, leaf;
};

// The node at pre-order position i of a (3, V) walk table (rows: channel, depth, leaf id), its channel
// mapped to x = channel * stride. An entry out of range is clamped into it (channel into [0, C), depth
// into [1, kMaxDepth]): a bad table gives wrong labels, but never reads outside the pixel's channels or
// the running scores. (The CPU host rejects such tables before any pixel; the CUDA host cannot read them.)
HSS_HOST_DEVICE inline WalkNode walk_node(const int32_t* walk, int64_t V, int64_t i, int64_t C, int64_t stride) {
  int64_t c = walk[i];
  int32_t d = walk[V + i];
  c = (c < 0 || c >= C) ? 0 : c;
  d = d < 1 ? 1 : (d > kMaxDepth ? kMaxDepth : d);
  return WalkNode{c * stride, d, walk[2 * V + i]};
}

// The softmax's shift of one pixel: m = max_c x(c) (0 for the other activations). The scores leave out
// the division by the pixel's sum of exponentials, a positive factor common to all of its paths: the
// argmax is that of the normalised scores (up to rounding, docs/MATH.md §4.3).
template <typename A, typename X>
HSS_HOST_DEVICE inline A softmax_max(const X& x, int64_t C, int64_t act) {
  if (act != kSoftmax) return A(0);
  A m = x(0);
  for (int64_t c = 1; c < C; ++c) {  // sm90: trips=C - 1
    const A v = x(c);
    m = v > m ? v : m;
  }
  return m;
}

// The activations' e^v and 1 / v are common.h fast_exp (flushed below 2^-126 on both sides, so that
// saturated logits give the exact 0 that ties need) and fast_rcp (1 / inf = 0).
// The sigmoid. float: 1 / (1 + e^-v), where e^-v may overflow to +inf (v < -88.7), giving the exact 0
// that the true value (below 2^-126) is flushed to anyway; two special-function instructions and an add.
// double: exp(-|v|) never overflows, the two cases are selects, not branches (the sign of a logit is
// random).
HSS_HOST_DEVICE inline float sigmoid(float v) { return fast_rcp(1.f + fast_exp(-v)); }
HSS_HOST_DEVICE inline double sigmoid(double v) {
  const bool pos = v >= 0.0;
  const double e = exp(pos ? -v : v);
  return (pos ? 1.0 : e) / (1.0 + e);
}

// a(v): the node's activation, the value summed along paths (m: softmax_max's shift).
template <typename A>
HSS_HOST_DEVICE inline A activate(A v, int64_t act, A m) {
  if (act == kSigmoid) return sigmoid(v);
  if (act == kSoftmax) return fast_exp(v - m);
  return v;
}

// A leaf's score from its path sum s: s, or s times 1 / depth (computed once per node, the same for
// every pixel) for the mean.
template <typename A>
HSS_HOST_DEVICE inline A inv_depth(int32_t depth) { return A(1) / A(depth); }

// The running path scores of one pixel, one per depth 0..kMaxDepth (depth 0, the root, holds 0), and
// slot kLeafSlot where leaves write theirs (so that a step has no branch on the node's kind): run(d) is
// element d * kStride of p (the CPU: a local array; the GPU: shared memory laid out [depth][thread]).
constexpr int kLeafSlot = kMaxDepth + 1;
constexpr int kRunSlots = kMaxDepth + 2;
template <typename A, int kStride>
struct RunScores {
  A* p;
  HSS_HOST_DEVICE A& operator()(int32_t d) const { return p[d * kStride]; }
};

// The best leaf so far, and whether any logit read so far was NaN: start from {-inf, 0, false}.
template <typename A>
struct Best {
  A score;
  int32_t leaf;
  bool nan;
};

// One step of the walk: node v's path score from its parent's (root side first: 0 + a_1 + a_2 + ...);
// an internal node records it for its children, a leaf competes (its score times the inverse of its
// depth, the path length, for the mean score). Selects, no branch on the node's kind. The walk reads
// every channel once, so ORing `logit != logit` here flags a pixel with a NaN in any channel
// (docs/MATH.md §4.3).
template <typename A, typename X, typename Run>
HSS_HOST_DEVICE inline void walk_step(const X& x, const WalkNode& v, const Run& run, int64_t act, A m,
                                      int64_t score, bool ordered, Best<A>& best) {
  const A xv = x(v.x);
  best.nan = best.nan | (xv != xv);
  const A s = run(v.depth - 1) + activate<A>(xv, act, m);
  const bool leaf = v.leaf >= 0;
  run(leaf ? kLeafSlot : v.depth) = s;
  const A t = score == kMean ? s * inv_depth<A>(v.depth) : s;
  const bool take = leaf && (t > best.score || (!ordered && t == best.score && v.leaf < best.leaf));
  best.score = take ? t : best.score;
  best.leaf = take ? v.leaf : best.leaf;
}

// The label of a walked pixel: its best leaf, or ignore_index if a logit was NaN.
template <typename A>
HSS_HOST_DEVICE inline int64_t label_of(const Best<A>& best, int64_t ignore_index) {
  return best.nan ? ignore_index : static_cast<int64_t>(best.leaf);
}

// One pixel (the CPU): the leaf label of its best path (ignore_index if it has a NaN logit). nodes: the V
// walk nodes, x taking the channel.
template <typename A, typename X>
HSS_HOST_DEVICE inline int64_t decode_pixel(const X& x, int64_t C, const WalkNode* nodes, int64_t V, bool ordered,
                                          int64_t act, int64_t score, int64_t ignore_index) {
  const A m = softmax_max<A>(x, C, act);
  A scores[kRunSlots];
  for (int d = 0; d < kRunSlots; ++d) scores[d] = A(0);  // sm90: trips=10
  const RunScores<A, 1> run{scores};
  Best<A> best{neg_inf<A>(), 0, false};
  for (int64_t i = 0; i < V; ++i) walk_step<A>(x, nodes[i], run, act, m, score, ordered, best);  // sm90: trips=C
  return label_of(best, ignore_index);
}


// ---------------------------------------------------------------------------------------------------
// The lanes: V neighbouring pixels of one channel plane at once (docs/MATH.md §4.3). Every lane walks
// the same node at the same time, so the node's depth and kind are the same for all lanes (a uniform
// branch on the GPU, never a divergent one) and one load brings the node's logit of all V pixels.
//
// X, the lanes' logits: x.load(o, z) puts in z[k] the logit of lane k at walk offset o (a WalkNode's x,
// or the channel times the channel stride). Run, the lanes' running scores: run.load(d, s) and
// run.store(d, s) for depth d in [0, kMaxDepth], depth 0 (the root) holding zeros, never stored.

// The NaN rule without a test per logit where the activation lets a NaN through to a number the walk
// keeps anyway (docs/MATH.md §4.3): the softmax's shift m is a NaN-propagating max of the lane's logits,
// NaN exactly when one is (±inf are not NaN); a NaN logit's sigmoid is NaN, so the path score of every
// leaf at or below its node (a node of a tree has one; ±inf logits have sigmoids 0 and 1, never NaN), and
// the best score is then a NaN-propagating max of the leaf scores. The identity (leaf logits) keeps a
// NaN-propagating max of the logits of its own. One max.NaN instruction each on the GPU, which replaces the
// select of the best score (the values are the same: a leaf is taken only with a score >= the best): common.h
// max_nan.

// The best leaf of each lane so far; `nan`, the NaN-propagating max of the logits read (kIdentity only).
template <typename A, int V>
struct LaneBest {
  A score[V];
  int32_t leaf[V];
  A nan[V];
};

template <typename A, int V>
HSS_HOST_DEVICE inline void lanes_start(LaneBest<A, V>& best) {
  HSS_UNROLL
  for (int k = 0; k < V; ++k) {
    best.score[k] = neg_inf<A>();
    best.leaf[k] = 0;
    best.nan[k] = A(0);
  }
}

// The lanes' softmax shifts m[k] over the C channels (walk offsets c * sc), NaN-propagating; 0 for the
// other activations.
template <int V, typename A, typename X>
HSS_HOST_DEVICE inline void softmax_max_lanes(const X& x, int64_t C, int64_t sc, int64_t act, A (&m)[V]) {
  HSS_UNROLL
  for (int k = 0; k < V; ++k) m[k] = act == kSoftmax ? neg_inf<A>() : A(0);
  if (act != kSoftmax) return;
  for (int64_t c = 0; c < C; ++c) {  // sm90: trips=C
    A z[V];
    x.load(c * sc, z);
    HSS_UNROLL
    for (int k = 0; k < V; ++k) m[k] = max_nan(m[k], z[k]);
  }
}

// One step of the lanes' walk, walk_step for V pixels: xv, the node's logits (x.load(v.x, xv)). The
// same sums in the same order as walk_step, so the same labels.
template <int V, typename A, typename Run>
HSS_HOST_DEVICE inline void walk_step_lanes(const A (&xv)[V], const WalkNode& v, const Run& run, int64_t act,
                                            const A (&m)[V], int64_t score, bool ordered, LaneBest<A, V>& best) {
  A s[V];
  run.load(v.depth - 1, s);
  HSS_UNROLL
  for (int k = 0; k < V; ++k) {
    if (act == kIdentity) best.nan[k] = max_nan(best.nan[k], xv[k]);
    s[k] = s[k] + activate<A>(xv[k], act, m[k]);
  }
  if (v.leaf < 0) {  // the same node in every lane
    run.store(v.depth, s);
    return;
  }
  const A r = inv_depth<A>(v.depth);
  HSS_UNROLL
  for (int k = 0; k < V; ++k) {
    const A t = score == kMean ? s[k] * r : s[k];
    const bool take = t > best.score[k] || (!ordered && t == best.score[k] && v.leaf < best.leaf[k]);
    best.score[k] = act == kSigmoid ? max_nan(best.score[k], t) : (take ? t : best.score[k]);
    best.leaf[k] = take ? v.leaf : best.leaf[k];
  }
}

// Lane k's label: its best leaf, or ignore_index if it read a NaN (see nan_max).
template <typename A, int V>
HSS_HOST_DEVICE inline int64_t lane_label(const LaneBest<A, V>& best, const A (&m)[V], int64_t act, int k,
                                          int64_t ignore_index) {
  const A f = act == kSoftmax ? m[k] : act == kSigmoid ? best.score[k] : best.nan[k];
  return f != f ? ignore_index : static_cast<int64_t>(best.leaf[k]);
}

// Whether the lanes can read an (N, C, H, W) tensor of elem_size-byte values at `data` (sizes and
// strides in elements), V = 16 / elem_size pixels per load: at most 4-byte values, every channel plane
// contiguous (sW = 1, sH = W), H * W, sN and sC multiples of V (a lane group lies in one image, no partial
// group) and 16-byte aligned data. Anything else takes the one-pixel walk.
HSS_HOST_DEVICE inline bool lanes_layout(const int64_t* sizes, const int64_t* strides, int64_t elem_size,
                                         const void* data) {
  if (elem_size > 4) return false;
  const int64_t V = 16 / elem_size, H = sizes[2], W = sizes[3];
  const bool plane = strides[3] == 1 && (H == 1 || strides[2] == W);
  return plane && (H * W) % V == 0 && strides[0] % V == 0 && strides[1] % V == 0 &&
         reinterpret_cast<uintptr_t>(data) % 16 == 0;
}
}  // namespace decode_math
}  // namespace hss
