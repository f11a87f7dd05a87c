// Per-pixel math of the hierarchical softmax loss (docs/MATH.md §2), shared by the CPU loops
// (csrc/cpu/hierarchical_softmax.cpp) and the CUDA kernels (csrc/cuda/hierarchical_softmax.cu) so that
// the CPU tests exercise the arithmetic the GPU runs: the CUDA kernels and the CPU's float64 path call
// hierarchical_softmax_forward_pixel and hierarchical_softmax_backward_pixel as they are; the CPU's float32 path (float16/bfloat16 too)
// vectorises the channel loops across pixels but keeps hierarchical_softmax_finish and hierarchical_softmax_backward_coefs from here.
// HSS_CPU_PIXEL_PATH=1 (cpu/loop.h) sends the CPU's float path through the *_pixel functions too, so
// that the tests check their float instantiation (the one the CUDA kernels run for float, float16 and
// bfloat16) without a GPU.
//
// Every function works on one pixel. Channel values are read through an accessor `x(c)` (a tile column
// on the CPU, a strided global pointer on the GPU) and converted to the accumulation type A. Group ids
// are read through an accessor `group(d, j)` (leaf j's class id at depth d + 1): LeafGroups below over
// the int32 (D x L) leaf_group table of hss_kernels.tree.TreeTables (docs/MATH.md §1.7) on the CPU, a
// leaf-major copy of it in shared memory on the GPU (cuda/hierarchical_softmax.cu).
#pragma once

#include "common.h"
#include "upsample_math.h"

namespace hss {

// A group whose max logit is within this of the global max reuses exp(z - max) (no underflow is
// possible: e^-kShareShift is far above the smallest normal float); farther groups get their own shift.
constexpr double kShareShift = 30.0;

// group(d, j) over the leaf_group table as the ops receive it: D x L, row-major.
struct LeafGroups {
  const int32_t* p;
  int L;
  HSS_HOST_DEVICE int operator()(int d, int j) const { return p[d * L + j]; }
};

// The loss of one pixel from its sums: s = sum_j exp(z_j - m) over all leaves, gsum[d] = the sum over
// y's group at depth d shifted by shift[d]. Writes the stats (lse, lse_1..lse_D at stride ss).
template <typename A>
HSS_HOST_DEVICE inline A hierarchical_softmax_finish(A m, A s, const A* shift, const A* gsum, int D, const A* w, A eps, A* stats,
                                    int64_t ss) {
  const A lse = m + hlog(s);
  stats[0] = lse;
  A loss = A(0);
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) {
    if (d >= D) break;
    const A lse_d = shift[d] + hlog(gsum[d]);
    stats[(d + 1) * ss] = lse_d;
    const A level = eps > A(0) ? -hlog(hexp(lse_d - lse) + eps) : lse - lse_d;
    loss += w[d] * level;
  }
  return loss;
}

// The backward's per-pixel coefficients (see hierarchical_softmax_backward_pixel) from the stats and the upstream
// gradient g: returns g * sum_d a_d; coef[d] = g * c_d, times exp(lse - b_d) unless own[d] (then the
// caller computes exp(z - base[d]) itself, the factor being huge).
template <typename A>
HSS_HOST_DEVICE inline A hierarchical_softmax_backward_coefs(const A* stats, int64_t ss, int D, const A* w, A eps, A g, A* coef,
                                            A* base, bool* own) {
  const A lse = stats[0];
  A a = A(0);
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) {
    base[d] = A(0);
    coef[d] = A(0);
    own[d] = false;
    if (d >= D) continue;
    const A lse_d = stats[(d + 1) * ss];
    if (eps > A(0)) {
      const A p = hexp(lse_d - lse);
      a += w[d] * p / (p + eps);
      coef[d] = g * w[d] / (p + eps);
      base[d] = lse;
    } else {
      a += w[d];
      coef[d] = g * w[d];
      base[d] = lse_d;
    }
    // exp(z - b) = exp(z - lse) * exp(lse - b): one exp per channel unless the factor would be huge.
    own[d] = lse - base[d] > A(kShareShift);
    if (!own[d]) coef[d] *= hexp(lse - base[d]);
  }
  return a * g;
}

// Hierarchical softmax (docs/MATH.md §2.1, §2.6). `group` is leaf_group (D x L, row-major). `stats` receives D + 1
// values at stride `ss`: lse over all leaves, then lse_d for d = 1..D over y's group at depth d.
// Returns the pixel's loss sum_d w_d * level_d.
template <typename A, typename X, typename G>
HSS_HOST_DEVICE inline A hierarchical_softmax_forward_pixel(const X& x, int L, int D, const G& group, int y,
                                           const A* w, A eps, A* stats, int64_t ss) {
  int gy[kMaxDepth];
  A gmax[kMaxDepth];
  A gsum[kMaxDepth];
  bool own[kMaxDepth];
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) {
    gy[d] = d < D ? group(d, y) : -1;
    gmax[d] = neg_inf<A>();
    gsum[d] = A(0);
  }
  A m = neg_inf<A>();
  for (int j = 0; j < L; ++j) {  // sm90: trips=L
    const A z = x(j);
    m = hmax(m, z);
    HSS_UNROLL
    for (int d = 0; d < kMaxDepth; ++d) {
      if (d >= D) break;
      // Selects, not branches: group membership is data-dependent and mispredicts.
      gmax[d] = group(d, j) == gy[d] ? hmax(gmax[d], z) : gmax[d];
    }
  }
  bool far = false;
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) {
    own[d] = d < D && gmax[d] < m - A(kShareShift);
    far = far || own[d];
  }
  A s = A(0);
  A osum[kMaxDepth];  // own levels' sums, shifted by gmax[d]
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) osum[d] = A(0);
  for (int j = 0; j < L; ++j) {  // sm90: trips=L
    const A z = x(j);
    const A e = hexp(z - m);
    s += e;
    HSS_UNROLL
    for (int d = 0; d < kMaxDepth; ++d) {
      if (d >= D) break;
      gsum[d] += group(d, j) == gy[d] ? e : A(0);
    }
    if (far) {  // rare: a group far below the global max gets its own shift; sm90: cold
      HSS_UNROLL
      for (int d = 0; d < kMaxDepth; ++d) {
        if (d >= D) break;
        if (own[d] && group(d, j) == gy[d]) osum[d] += hexp(z - gmax[d]);
      }
    }
  }
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) gsum[d] = own[d] ? osum[d] : gsum[d];
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) gmax[d] = own[d] ? gmax[d] : m;  // the shift each sum used
  return hierarchical_softmax_finish(m, s, gmax, gsum, D, w, eps, stats, ss);
}

// Gradient of g * loss with respect to the L leaf logits, from the forward's stats; `out(j, v)` stores
// it (docs/MATH.md §2.5). dl/dz_j = p_j * sum_d a_d - sum_{d : j in G_d(y)} c_d * exp(z_j - b_d), where
// (eps = 0) a_d = w_d, c_d = w_d, b_d = lse_d, or (eps > 0, P_d = exp(lse_d - lse))
// a_d = w_d P_d / (P_d + eps), c_d = w_d / (P_d + eps), b_d = lse.
template <typename A, typename X, typename O, typename G>
HSS_HOST_DEVICE inline void hierarchical_softmax_backward_pixel(const X& x, const O& out, int L, int D, const G& group,
                                               int y, const A* w, A eps, const A* stats, int64_t ss, A g) {
  const A lse = stats[0];
  int gy[kMaxDepth];
  A base[kMaxDepth];
  A coef[kMaxDepth];
  bool own[kMaxDepth];
  const A a = hierarchical_softmax_backward_coefs(stats, ss, D, w, eps, g, coef, base, own);
  bool far = false;
  A hot[kMaxDepth];  // coef[d], or 0 for an own level (added apart, with its own exponential)
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) {
    gy[d] = d < D ? group(d, y) : -1;
    far = far || own[d];
    hot[d] = own[d] ? A(0) : coef[d];
  }
  // dl/dz_j = p_j * (sum_d a_d - sum_{d : j in G_d(y), not own} coef_d) - sum_{own d ...} coef_d exp(z_j - b_d)
  for (int j = 0; j < L; ++j) {  // sm90: trips=L
    const A z = x(j);
    const A p = hexp(z - lse);
    A k = a;
    HSS_UNROLL
    for (int d = 0; d < kMaxDepth; ++d) {
      if (d >= D) break;
      k -= group(d, j) == gy[d] ? hot[d] : A(0);
    }
    A r = A(0);
    if (far) {  // rare: a level whose factor exp(lse - b_d) would be huge; sm90: cold
      HSS_UNROLL
      for (int d = 0; d < kMaxDepth; ++d) {
        if (d >= D) break;
        if (own[d] && group(d, j) == gy[d]) r -= coef[d] * hexp(z - base[d]);
      }
    }
    out(j, k * p + r);
  }
}

// With fused upsampling (upsample_math.h): the backward of destination pixel q for gather_source_pixel,
// its gradient row from the interpolated logits handed to out (an AddOut).
template <typename T, typename A, typename G>
struct HierarchicalSoftmaxUpsampledRow {
  UpsampledPixels<T, A> px;
  int L, D;
  G group;
  const A* w;
  A eps;
  int64_t ignore_index;
  const A* stats;
  int64_t P;
  template <typename O>
  HSS_HOST_DEVICE void operator()(int64_t q, const O& out) const {
    const int y = px.label(q, L, ignore_index, L, out);
    if (y >= 0)
      hierarchical_softmax_backward_pixel<A>(px.logits(q), out, L, D, group, y, w, eps, stats + q, P, px.grad_of(q));
  }
};

}  // namespace hss
