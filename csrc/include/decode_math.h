// Per-pixel hierarchical decoding (docs/MATH.md §4.3), shared by the CUDA kernel (csrc/cuda/decode.cu)
// and the CPU's float64 path (and its float path with HSS_CPU_PIXEL_PATH=1) so that the CPU tests
// exercise the arithmetic the GPU runs (the CPU's float path scores the paths' shared prefixes row by
// row over a block of pixels instead, csrc/cpu/decode.cpp).
//
// A leaf's path score is the sum of a(x_v) over the nodes v on its root-to-leaf path, divided by the
// path length (the leaf's depth) for the mean score. The winner is the leaf with the highest score, ties
// going to the lowest leaf id; a pixel with a NaN in any of its channels gets ignore_index instead.
//
// The tree is runtime data: a walk, one WalkNode per node in pre-order (channel, depth, leaf id or -1).
// Walking it, each node is activated once and its path score is its parent's score plus its activation,
// root side first (the summation order of every backend, so that leaves with equal activations along
// equal-length paths tie exactly); the parent's score is the last one written at depth - 1, so one
// running score per depth suffices. O(V) per pixel. Leaves are met in pre-order, not by id, so a tie
// goes to the met leaf only if its id is lower, unless the walk is `ordered` (leaf ids increase along
// it), where a strict > alone keeps the lowest id.
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

// Softmax statistics of one pixel: m = max_c x(c), z = sum_c exp(x(c) - m). For the other activations
// m = 0 and z = 1 (unused).
template <typename A, typename X>
HSS_HOST_DEVICE inline void softmax_stats(const X& x, int64_t C, int64_t act, A& m, A& z) {
  m = A(0);
  z = A(1);
  if (act != kSoftmax) return;
  m = x(0);
  for (int64_t c = 1; c < C; ++c) {  // sm90: trips=C - 1
    const A v = x(c);
    m = v > m ? v : m;
  }
  z = A(0);
  for (int64_t c = 0; c < C; ++c) z += hexp(x(c) - m);  // sm90: trips=C
}

// exp(-|v|) never overflows; the two cases are selects, not branches (the sign of a logit is random).
template <typename A>
HSS_HOST_DEVICE inline A sigmoid(A v) {
  const bool pos = v >= A(0);
  const A e = hexp(pos ? -v : v);
  return (pos ? A(1) : e) / (A(1) + e);
}

// a(v): the node's activation, the value summed along paths.
template <typename A>
HSS_HOST_DEVICE inline A activate(A v, int64_t act, A m, A z) {
  if (act == kSigmoid) return sigmoid<A>(v);
  if (act == kSoftmax) return hexp(v - m) / z;
  return v;
}

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
// an internal node records it for its children, a leaf competes (its score divided by its depth, the
// path length, for the mean score). Selects, no branch on the node's kind. The walk reads every channel
// once, so ORing `logit != logit` here flags a pixel with a NaN in any channel (docs/MATH.md §4.3).
template <typename A, typename X, typename Run>
HSS_HOST_DEVICE inline void walk_step(const X& x, const WalkNode& v, const Run& run, int64_t act, A m, A z,
                                      int64_t score, bool ordered, Best<A>& best) {
  const A xv = x(v.x);
  best.nan = best.nan | (xv != xv);
  const A s = run(v.depth - 1) + activate<A>(xv, act, m, z);
  const bool leaf = v.leaf >= 0;
  run(leaf ? kLeafSlot : v.depth) = s;
  const A t = score == kMean ? s / A(v.depth) : s;
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
  A m, z;
  softmax_stats<A>(x, C, act, m, z);
  A scores[kRunSlots];
  for (int d = 0; d < kRunSlots; ++d) scores[d] = A(0);  // sm90: trips=10
  const RunScores<A, 1> run{scores};
  Best<A> best{neg_inf<A>(), 0, false};
  for (int64_t i = 0; i < V; ++i) walk_step<A>(x, nodes[i], run, act, m, z, score, ordered, best);  // sm90: trips=C
  return label_of(best, ignore_index);
}

}  // namespace decode_math
}  // namespace hss
