// Per-pixel math of the focal tree-min loss (docs/MATH.md §3) and of the multi-label tree BCE (§4.1),
// which share one kernel family: `extrema` true routes every node's term through the min over its
// ancestors (target path) or the max over its descendants (elsewhere), false is plain BCE. Shared by
// the CPU loops (csrc/cpu/tree_min.cpp) and the CUDA kernels (csrc/cuda/tree_min.cu): the CUDA kernels,
// the CPU's float64 path and, with HSS_CPU_PIXEL_PATH=1 (cpu/loop.h), its float path call
// tree_forward_pixel and tree_backward_pixel as they are; the CPU's row passes keep subtree_argmax's
// tie rule and this NaN rule.
//
// Every function works on one pixel, reading channel c through an accessor `x(c)` as the accumulation
// type A.
#pragma once

#include "common.h"

namespace hss {

// NaN logits. One rule on every backend and device: a NaN logit anywhere in a labelled pixel's channels
// gives that pixel a NaN loss and a NaN gradient row (ignored pixels stay 0). The hierarchical softmax
// needs nothing for it: every term and every gradient entry goes through lse, which the NaN reaches
// through the sum of exponentials. The tree losses reach a NaN only through the nodes it touches (a max
// or min skips it on a GPU, whose max.f32/min.f32 drop NaN), so they scan the pixel first.
template <typename A, typename X>
HSS_HOST_DEVICE inline bool column_has_nan(const X& x, int C) {
  bool nan = false;
  for (int c = 0; c < C; ++c) {  // sm90: trips=C
    const A z = x(c);
    nan |= z != z;
  }
  return nan;
}

// Focal binary loss of a positive-class logit z (docs/MATH.md §3.2, §3.3): loss = -(1-q)^gamma log(q [+ eps]),
// q = sigmoid(z), and dloss/dz. A negative-class term with logit x is focal(-x), derivative -dloss.
template <typename A>
HSS_HOST_DEVICE inline void focal(A z, A gamma, A eps, A* loss, A* dloss) {
  const A az = z < A(0) ? -z : z;
  const A e = hexp(-az);
  const A l1 = hlog1p(e);
  const A log_q = hmin(z, A(0)) - l1;      // log sigmoid(z), no log of 0
  const A log_1mq = hmin(-z, A(0)) - l1;   // log sigmoid(-z)
  const A inv = A(1) / (A(1) + e);
  const A q = z >= A(0) ? inv : e * inv;
  const A one_m_q = z >= A(0) ? e * inv : inv;
  A log_p, dlog_p;
  if (eps > A(0)) {
    log_p = hlog(q + eps);
    dlog_p = q * one_m_q / (q + eps);
  } else {
    log_p = log_q;
    dlog_p = one_m_q;
  }
  // (1 - q)^gamma; HSSN's gamma = 2 (and 1) by products, saving an exp per node
  const A fw = gamma == A(0) ? A(1) : gamma == A(1) ? one_m_q : gamma == A(2) ? one_m_q * one_m_q
                                                              : hexp(gamma * log_1mq);
  *loss = -fw * log_p;
  if (dloss) *dloss = gamma * q * fw * log_p - fw * dlog_p;
}

// The tree tables packed into one int32 array by tree_index (hss_kernels/native/tree_min.py;
// docs/MATH.md §1.7).
struct TreeIndex {
  const int32_t* depth;      // (V,) 1 for children of the root
  const int32_t* dfs_order;  // (V,)
  const int32_t* dfs_pos;    // (V,)
  const int32_t* size;       // (V,) descendants-or-self
  const int32_t* path;       // (L, D) channel at each depth of a leaf's path, -1 past its depth
  int V, L, D;

  HSS_HOST_DEVICE inline bool on_path(int v, int y) const { return path[y * D + depth[v] - 1] == v; }
};

HSS_HOST_DEVICE inline TreeIndex unpack_tree(const int32_t* t, int V, int L, int D) {
  TreeIndex ti;
  ti.depth = t;
  ti.dfs_order = t + V;
  ti.dfs_pos = t + 2 * V;
  ti.size = t + 3 * V;
  ti.path = t + 4 * V;
  ti.V = V;
  ti.L = L;
  ti.D = D;
  return ti;
}

// argmax over desc-or-self(v): a contiguous run of the pre-order; the first maximum wins, so ties go
// to the node earliest in pre-order (v itself before its descendants).
template <typename A, typename X>
HSS_HOST_DEVICE inline int subtree_argmax(const X& x, const TreeIndex& t, int v) {
  const int n = t.size[v];
  if (n == 1) return v;
  const int p0 = t.dfs_pos[v];
  int best = v;
  A bv = x(v);
  for (int i = 1; i < n; ++i) {  // sm90: trips=WALK / V
    const int c = t.dfs_order[p0 + i];
    const A z = x(c);
    if (z > bv) {
      bv = z;
      best = c;
    }
  }
  return best;
}

// Tree-min (extrema = true) or multi-label BCE (extrema = false) loss of one pixel with label y.
// `k` holds the per-node weights k_v.
template <typename A, typename X>
HSS_HOST_DEVICE inline A tree_forward_pixel(const X& x, const TreeIndex& t, int y, const A* k, A gamma, A eps,
                                            bool extrema) {
  if (column_has_nan<A>(x, t.V)) return quiet_nan<A>();
  A loss = A(0), l;
  if (!extrema) {
    for (int v = 0; v < t.V; ++v) {  // sm90: trips=V
      const A z = x(v);
      focal(t.on_path(v, y) ? z : -z, gamma, eps, &l, (A*)nullptr);
      loss += k[v] * l;
    }
    return loss;
  }
  // On the target path: a running min from the root; a strict < keeps the shallower node on ties.
  A cur = static_cast<A>(INFINITY);
  for (int d = 0; d < t.D; ++d) {  // sm90: trips=PATH_ITERS
    const int v = t.path[y * t.D + d];
    if (v < 0) break;
    cur = hmin(cur, x(v));
    focal(cur, gamma, eps, &l, (A*)nullptr);
    loss += k[v] * l;
  }
  for (int v = 0; v < t.V; ++v) {  // sm90: trips=V
    if (t.on_path(v, y)) continue;
    focal(-x(subtree_argmax<A>(x, t, v)), gamma, eps, &l, (A*)nullptr);
    loss += k[v] * l;
  }
  return loss;
}

// Gradient of g * loss with respect to the V node logits; `out(c, v)` stores it. For tree-min, `K(c)`
// is a scratch of V accumulators: K_u = sum of k_v over the nodes v whose extremum is u; then
// dl/dx_u = K_u * focal'(+-x_u) since every term routed to u is evaluated at x_u.
template <typename A, typename X, typename S, typename O>
HSS_HOST_DEVICE inline void tree_backward_pixel(const X& x, const S& K, const O& out, const TreeIndex& t, int y,
                                                const A* k, A gamma, A eps, bool extrema, A g) {
  if (column_has_nan<A>(x, t.V)) {
    for (int v = 0; v < t.V; ++v) out(v, quiet_nan<A>());  // sm90: trips=V
    return;
  }
  A l, dl;
  if (!extrema) {
    for (int v = 0; v < t.V; ++v) {  // sm90: trips=V
      const bool pos = t.on_path(v, y);
      const A z = x(v);
      focal(pos ? z : -z, gamma, eps, &l, &dl);
      out(v, g * k[v] * (pos ? dl : -dl));
    }
    return;
  }
  for (int v = 0; v < t.V; ++v) K(v) = A(0);  // sm90: trips=V
  A cur = static_cast<A>(INFINITY);
  int arg = -1;
  for (int d = 0; d < t.D; ++d) {  // sm90: trips=PATH_ITERS
    const int v = t.path[y * t.D + d];
    if (v < 0) break;
    const A z = x(v);
    // d == 0 takes the root-side node whatever its value: with `z < cur` alone a +inf or NaN logit
    // there would leave arg = -1, an out-of-bounds K(-1) (on the GPU, outside the block's shared memory).
    if (d == 0 || z < cur) {
      cur = z;
      arg = v;
    }
    K(arg) += k[v];
  }
  for (int v = 0; v < t.V; ++v)  // sm90: trips=V
    if (!t.on_path(v, y)) K(subtree_argmax<A>(x, t, v)) += k[v];
  for (int u = 0; u < t.V; ++u) {  // sm90: trips=V
    const A ku = K(u);
    A r = A(0);
    if (ku != A(0)) {
      const bool pos = t.on_path(u, y);
      const A z = x(u);
      focal(pos ? z : -z, gamma, eps, &l, &dl);
      r = g * ku * (pos ? dl : -dl);
    }
    out(u, r);
  }
}

}  // namespace hss
