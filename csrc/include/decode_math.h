// Per-pixel hierarchical decoding (docs/MATH.md §4.3), shared by the CUDA kernel (csrc/cuda/decode.cu)
// and the CPU's float64 path (and its float path with HSS_CPU_PIXEL_PATH=1) so that the CPU tests
// exercise the arithmetic the GPU runs (the CPU's float path scores the paths' shared prefixes row by
// row over a block of pixels instead, csrc/cpu/decode.cpp).
//
// A leaf's path score is the sum of a(x_v) over the nodes v on its root-to-leaf path (root side first,
// as the Triton kernel sums, so that leaves with equal activations on equal-length paths tie exactly),
// divided by the path length for the mean score. The winner is the first leaf with the highest score:
// ties go to the lowest leaf id.
#pragma once

#include "common.h"

namespace hss {
namespace decode_math {

enum Activation : int64_t { kSigmoid = 0, kSoftmax = 1, kIdentity = 2 };
enum Score : int64_t { kSum = 0, kMean = 1 };

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

// The best leaf given a(node) for every node: path is (L, D) row-major int32 node channels, -1 past a
// leaf's depth; an entry outside [0, C) also ends the path, so a bad table never reads outside the
// pixel's channels.
template <typename A, typename Act>
HSS_HOST_DEVICE inline int64_t best_leaf(const Act& a, int64_t C, int64_t L, int64_t D, const int32_t* path,
                                       int64_t score) {
  A best = A(0);
  int64_t best_l = 0;
  for (int64_t l = 0; l < L; ++l) {  // sm90: trips=L
    A s = A(0);
    int64_t len = 0;
    for (int64_t d = 0; d < D; ++d) {  // sm90: trips=PATH_ITERS
      const int32_t node = path[l * D + d];
      if (node < 0 || node >= C) break;
      s += a(node);
      ++len;
    }
    if (score == kMean && len > 0) s = s / A(len);
    if (l == 0 || s > best) {  // strict: an earlier (lower) leaf keeps a tie
      best = s;
      best_l = l;
    }
  }
  return best_l;
}

// a(node) computed from the logit when asked (the GPU: no per-pixel array, re-reads hit the cache).
template <typename A, typename X>
struct Activated {
  const X& x;
  int64_t act;
  A m, z;
  HSS_HOST_DEVICE A operator()(int64_t c) const { return activate<A>(x(c), act, m, z); }
};

// One pixel: the leaf label of its best path.
template <typename A, typename X>
HSS_HOST_DEVICE inline int64_t decode_pixel(const X& x, int64_t C, int64_t L, int64_t D, const int32_t* path,
                                          int64_t act, int64_t score) {
  A m, z;
  softmax_stats<A>(x, C, act, m, z);
  const Activated<A, X> a{x, act, m, z};
  return best_leaf<A>(a, C, L, D, path, score);
}

}  // namespace decode_math
}  // namespace hss
