// Per-pixel math of the hierarchical softmax loss (docs/MATH.md §2), shared by the CPU loops
// (csrc/cpu/hierarchical_softmax.cpp) and the CUDA kernels (csrc/cuda/hierarchical_softmax.cu) so that
// the CPU tests exercise the arithmetic the GPU runs: the CUDA kernels and the CPU's float64 path call
// hierarchical_softmax_forward_pixel and hierarchical_softmax_backward_pixel as they are; the CPU's float32 path (float16/bfloat16 too)
// vectorises the channel loops across pixels but keeps hierarchical_softmax_finish and hierarchical_softmax_backward_coefs from here.
// HSS_CPU_PIXEL_PATH=1 (cpu/loop.h) sends the CPU's float path through the *_pixel functions too, so
// that the tests check their float instantiation (the one the CUDA kernels run for float, float16 and
// bfloat16) without a GPU; for trees up to kPackedDepth deep through the V-pixel functions at the end
// (hierarchical_softmax_forward_pixels, hierarchical_softmax_backward_pixels), which the CUDA kernels
// run on NCHW logits, with the *_pixel ones for the rare pixels those hand back.
//
// Every function but the V-pixel ones works on one pixel. Channel values are read through an accessor `x(c)` (a tile column
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

// ---------------------------------------------------------------------------------------------------
// V pixels at once (the CUDA kernels' NCHW path, docs/MATH.md §2.9): one thread owns V neighbouring
// pixels ("lanes"), reads each channel of all of them with one load and each leaf's group ids with one
// load, so that the table read and the loop's bookkeeping are shared by V pixels. Trees up to
// kPackedDepth deep. The CPU runs the same functions under HSS_CPU_PIXEL_PATH=1 (cpu/hierarchical_softmax.cpp),
// with a partial last group of lanes, so the tests check this arithmetic without a GPU.
//
// Accessors, walked channel by channel from a copy (a pointer bump per channel, no index product):
// x.load(z) fills A z[V] with the current channel of the V lanes, x.next() moves to the next channel;
// x.at(k, j) is lane k's channel j (of the original). out.store(v) and out.next() likewise.
// groups.row(j, g) fills int g[kPackedDepth] with leaf j's group ids at depths 1..kPackedDepth
// (unused depths: anything), groups(d, j) one of them (for the per-pixel fallback). y[k] is lane k's
// leaf, or -1 for a lane that is not computed (ignored, bad label, past the end): its outputs are not
// written (forward) or are fill[k] (backward), and its logits may be anything (NaN, inf).
constexpr int kPackedDepth = 4;

// nvcc unrolls the forward's second channel loop by two on its own; kept rolled, so that the loop is
// what its `sm90: trips=` annotation says (the static model counts a body per annotated trip).
#ifdef __CUDACC__
#define HSS_ROLLED _Pragma("unroll 1")
#else
#define HSS_ROLLED
#endif

// v, hidden from the optimiser (CUDA): stops nvcc from folding the conditions v was made with into
// every later use (predicate juggling per element) or from branching around v's computation.
HSS_HOST_DEVICE inline float opaque(float v) {
#ifdef __CUDA_ARCH__
  asm volatile("" : "+f"(v));
#endif
  return v;
}
HSS_HOST_DEVICE inline double opaque(double v) {
#ifdef __CUDA_ARCH__
  asm volatile("" : "+d"(v));
#endif
  return v;
}

// e^v for the V-pixel forward's sums: common.h fast_exp (on the GPU one MUFU.EX2, at most 2 ulp of relative
// error, instead of expf's nine-instruction exact-range code, as the Triton kernel does, docs/MATH.md §2.6).
// No term that matters to s (|v| small, s >= 1) or to a group sum kept (>= e^-30, so |v| < 30 for its
// largest terms) loses more than a few ulps to the product's rounding.

// A level's shared-shift sum below this (e^-kShareShift) may have lost terms to underflow: the lane is
// recomputed by hierarchical_softmax_forward_pixel, with its own shifts where they are needed.
template <typename A>
HSS_HOST_DEVICE inline A far_sum() { return static_cast<A>(9.357622968840175e-14); }  // exp(-30)

// group(d, j) and row(j, g) over the (D x L) row-major leaf_group table (the CPU's copy of the packed rows).
struct LeafGroupRows {
  const int32_t* p;
  int L, D;
  HSS_HOST_DEVICE int operator()(int d, int j) const { return p[d * L + j]; }
  HSS_HOST_DEVICE void row(int j, int (&g)[kPackedDepth]) const {
    HSS_UNROLL
    for (int d = 0; d < kPackedDepth; ++d) g[d] = d < D ? p[d * L + j] : -1;
  }
};

// The forward's first pass: m[k] = max over the L channels of lane k (from -inf; a NaN logit may or may not
// end in m, the second pass's sum carries it into the loss either way). Called unqualified: an accessor's
// namespace may give a faster overload (the CUDA bfloat16 lanes compare packed pairs, hierarchical_softmax.cu).
template <int V, typename A, typename X>
HSS_HOST_DEVICE inline void lane_maxima(const X& x, int L, A (&m)[V]) {
  X xc = x;
  A z[V];
  for (int j = 0; j < L; ++j) {  // sm90: trips=L
    xc.load(z);
    xc.next();
    HSS_UNROLL
    for (int k = 0; k < V; ++k) m[k] = hmax(m[k], z[k]);
  }
}

// The forward of V lanes (D <= kPackedDepth). Two passes over the channels: the lanes' maxima m, then
// s = sum_j e^{z_j - m} and, from the same exponentials, the group sums of levels 1 .. D-1; level D's
// group is the leaf itself (docs/MATH.md §1.4), so lse_D = z_y, read once. Writes each live lane's loss
// to loss[k] and its statistics to stats[k + d * ss]; returns the mask (bit k) of the live lanes with a
// level sum below far_sum(): the caller recomputes those lanes with hierarchical_softmax_forward_pixel.
template <int V, typename A, typename X, typename G>
HSS_HOST_DEVICE inline unsigned hierarchical_softmax_forward_pixels(const X& x, int L, int D, const G& groups,
                                                                   const int* y, const A* w, A eps, A* stats,
                                                                   int64_t ss, A* loss) {
  int gy[kPackedDepth][V];
  A gsum[kPackedDepth][V];
  A m[V], s[V], z[V];
  HSS_UNROLL
  for (int k = 0; k < V; ++k) {
    int g[kPackedDepth];
    groups.row(y[k] >= 0 ? y[k] : 0, g);
    HSS_UNROLL
    for (int d = 0; d < kPackedDepth; ++d) {
      gy[d][k] = g[d];  // a lane that is not computed sums a group too, never read
      gsum[d][k] = A(0);
    }
    m[k] = neg_inf<A>();
    s[k] = A(0);
  }
  lane_maxima(x, L, m);
  X xc = x;
  HSS_ROLLED
  for (int j = 0; j < L; ++j) {  // sm90: trips=L
    xc.load(z);
    xc.next();
    int g[kPackedDepth];
    groups.row(j, g);
    A e[V];
    HSS_UNROLL
    for (int k = 0; k < V; ++k) {
      e[k] = fast_exp(z[k] - m[k]);
      s[k] += e[k];
    }
    HSS_UNROLL
    for (int d = 0; d < kPackedDepth - 1; ++d) {  // levels 1 .. D-1
      if (d >= D - 1) break;
      HSS_UNROLL
      for (int k = 0; k < V; ++k)
        if (g[d] == gy[d][k]) gsum[d][k] += e[k];  // a predicated add
    }
  }
  unsigned far = 0;
  HSS_UNROLL
  for (int k = 0; k < V; ++k) {
    if (y[k] < 0) continue;
    A shift[kMaxDepth], sums[kMaxDepth];
    bool low = false;
    const A zy = x.at(k, y[k]);
    HSS_UNROLL
    for (int d = 0; d < kPackedDepth; ++d) {  // fixed indices: the arrays stay in registers
      shift[d] = d == D - 1 ? zy : m[k];  // lse_D = z_y + log 1
      sums[d] = d == D - 1 ? A(1) : gsum[d][k];
      low = low || (d < D - 1 && !(gsum[d][k] >= far_sum<A>()));  // NaN too: recomputed, still NaN
    }
    if (low) far |= 1u << k;
    loss[k] = hierarchical_softmax_finish(m[k], s[k], shift, sums, D, w, eps, stats + k, ss);
  }
  return far;
}

// The backward of V lanes (D <= kPackedDepth): out(j, v) stores channel j of the V lanes, g[k] is lane k's
// upstream gradient, fill[k] the value of a lane that is not computed (0 ignored, NaN bad label). One
// pass: per element one exponential and one select per level (docs/MATH.md §2.5). Returns the mask of
// the live lanes with an `own` level (hierarchical_softmax_backward_coefs), written as fill[k] here:
// the caller recomputes those with hierarchical_softmax_backward_pixel.
template <int V, typename A, typename X, typename O, typename G>
HSS_HOST_DEVICE inline unsigned hierarchical_softmax_backward_pixels(const X& x, const O& out, int L, int D,
                                                                    const G& groups, const int* y, const A* fill,
                                                                    const A* w, A eps, const A* stats, int64_t ss,
                                                                    const A* g) {
  int gy[kPackedDepth][V];
  A hot[kPackedDepth][V];
  A a[V], lse[V], z[V], v[V];
  bool live[V];
  unsigned far = 0;
  HSS_UNROLL
  for (int k = 0; k < V; ++k) {
    A coef[kMaxDepth], base[kMaxDepth];
    bool own[kMaxDepth];
    live[k] = y[k] >= 0;
    a[k] = live[k] ? hierarchical_softmax_backward_coefs(stats + k, ss, D, w, eps, g[k], coef, base, own) : A(0);
    lse[k] = live[k] ? stats[k] : A(0);
    bool any_own = false;
    HSS_UNROLL
    for (int d = 0; d < kPackedDepth; ++d) any_own = any_own || (live[k] && d < D && own[d]);
    if (any_own) far |= 1u << k;
    live[k] = live[k] && !any_own;
    int gr[kPackedDepth];
    groups.row(live[k] ? y[k] : 0, gr);
    HSS_UNROLL
    for (int d = 0; d < kPackedDepth; ++d) {
      gy[d][k] = gr[d];  // with hot 0 where the lane is not computed: the select adds nothing
      hot[d][k] = opaque(live[k] && d < D ? coef[d] : A(0));  // one select per level and element below
    }
  }
  X xc = x;
  O oc = out;
  for (int j = 0; j < L; ++j) {  // sm90: trips=L
    xc.load(z);
    xc.next();
    int gr[kPackedDepth];
    groups.row(j, gr);
    A c[V];
    HSS_UNROLL
    for (int k = 0; k < V; ++k) c[k] = a[k];
    HSS_UNROLL
    for (int d = 0; d < kPackedDepth; ++d) {
      if (d >= D) break;
      HSS_UNROLL
      for (int k = 0; k < V; ++k) c[k] -= gr[d] == gy[d][k] ? hot[d][k] : A(0);
    }
    HSS_UNROLL
    for (int k = 0; k < V; ++k) {
      const A p = opaque(hexp(z[k] - lse[k]));  // computed for every lane: a select, not a branch
      // a select, not a product: a lane that is not computed may hold NaN or inf logits
      v[k] = live[k] ? c[k] * p : fill[k];
    }
    oc.store(v);
    oc.next();
  }
  return far;
}

// With fused upsampling (upsample_math.h): the backward of destination pixel q for the banded backward,
// its gradient row from the interpolated logits written to out (a StoreOut; label() writes an unlabelled
// row). A labelled pixel's upstream gradient is multiplied by its weight (common.h PixelWeights, read at the
// destination pixel q); kW false compiles the weights out (a call without them: weights is then never read).
template <typename T, typename A, typename G, bool kW = true>
struct HierarchicalSoftmaxUpsampledRow {
  UpsampledPixels<T, A> px;
  int L, D;
  G group;
  const A* w;
  A eps;
  int64_t ignore_index;
  const A* stats;
  int64_t P;
  PixelWeights<A> weights;
  template <typename O>
  HSS_HOST_DEVICE void operator()(int64_t q, const O& out) const {
    const int y = px.label(q, L, ignore_index, L, out);
    if (y >= 0) {
      const A g = px.grad_of(q);
      hierarchical_softmax_backward_pixel<A>(px.logits(q), out, L, D, group, y, w, eps, stats + q, P,
                                             kW && weights.any() ? g * weights.at(q, y) : g);
    }
  }
};

}  // namespace hss
