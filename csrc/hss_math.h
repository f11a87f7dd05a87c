// Per-pixel math of the hss_kernels losses (shared/MATH.md §2-4), shared by the CPU loops and the CUDA
// kernels so that the CPU tests exercise the arithmetic the GPU runs: the CUDA kernels and the CPU's
// float64 path call the *_pixel functions as they are; the CPU's float32 path (float16/bfloat16 too)
// vectorises the channel loops across pixels in csrc/*.cpp but keeps hsm_finish, hsm_backward_coefs,
// subtree_argmax and the tie rules from here. HSS_CPU_PIXEL_PATH=1 (cpu_loop.h) sends the CPU's float
// path through the *_pixel functions too, so that the tests check their float instantiation (the one
// the CUDA kernels run for float, float16 and bfloat16) without a GPU.
//
// Every function works on one pixel. Channel values are read through an accessor `x(c)` (a tile column
// on the CPU, a strided global pointer on the GPU) and converted to the accumulation type A (float or
// double). The index tables are the int32 arrays of hss_kernels.tree.TreeTables.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define HSS_HOST_DEVICE __host__ __device__
#define HSS_UNROLL _Pragma("unroll")
#else
#define HSS_HOST_DEVICE
#define HSS_UNROLL
#endif

namespace hss {

// Per-level state lives in fixed-size arrays (registers on the GPU): the ops reject deeper trees.
constexpr int kMaxDepth = 8;

// A group whose max logit is within this of the global max reuses exp(z - max) (no underflow is
// possible: e^-kShareShift is far above the smallest normal float); farther groups get their own shift.
constexpr double kShareShift = 30.0;

HSS_HOST_DEVICE inline float hexp(float v) { return expf(v); }
HSS_HOST_DEVICE inline double hexp(double v) { return exp(v); }
HSS_HOST_DEVICE inline float hlog(float v) { return logf(v); }
HSS_HOST_DEVICE inline double hlog(double v) { return log(v); }
HSS_HOST_DEVICE inline float hlog1p(float v) { return log1pf(v); }
HSS_HOST_DEVICE inline double hlog1p(double v) { return log1p(v); }
template <typename A>
HSS_HOST_DEVICE inline A hmax(A a, A b) { return a > b ? a : b; }
template <typename A>
HSS_HOST_DEVICE inline A hmin(A a, A b) { return a < b ? a : b; }
template <typename A>
HSS_HOST_DEVICE inline A neg_inf() { return -static_cast<A>(INFINITY); }
template <typename A>
HSS_HOST_DEVICE inline A quiet_nan() { return static_cast<A>(NAN); }

// Labels. The public API rejects a label that is neither ignore_index nor a leaf id in [0, L), but it
// skips that check (a host sync) under torch.compile or when switched off, so the kernels guard
// themselves: such a pixel never indexes a table (no out-of-bounds read), counts as a labelled pixel,
// and gets a NaN loss and a NaN gradient row, so that a mean or sum over it is NaN (loud), never a
// plausible number.
enum LabelKind { kLabelIgnored = 0, kLabelValid = 1, kLabelBad = 2 };
HSS_HOST_DEVICE inline LabelKind label_kind(int64_t y, int64_t L, int64_t ignore_index) {
  return y == ignore_index ? kLabelIgnored : (y >= 0 && y < L) ? kLabelValid : kLabelBad;
}

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

// ------------------------------------------------------------------------------------------------
// The loss of one pixel from its sums: s = sum_j exp(z_j - m) over all leaves, gsum[d] = the sum over
// y's group at depth d shifted by shift[d]. Writes the stats (lse, lse_1..lse_D at stride ss).
template <typename A>
HSS_HOST_DEVICE inline A hsm_finish(A m, A s, const A* shift, const A* gsum, int D, const A* w, A eps, A* stats,
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

// The backward's per-pixel coefficients (see hsm_backward_pixel) from the stats and the upstream
// gradient g: returns g * sum_d a_d; coef[d] = g * c_d, times exp(lse - b_d) unless own[d] (then the
// caller computes exp(z - base[d]) itself, the factor being huge).
template <typename A>
HSS_HOST_DEVICE inline A hsm_backward_coefs(const A* stats, int64_t ss, int D, const A* w, A eps, A g, A* coef,
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

// Hierarchical softmax (MATH.md §2). `group` is leaf_group (D x L, row-major). `stats` receives D + 1
// values at stride `ss`: lse over all leaves, then lse_d for d = 1..D over y's group at depth d.
// Returns the pixel's loss sum_d w_d * level_d.
template <typename A, typename X>
HSS_HOST_DEVICE inline A hsm_forward_pixel(const X& x, int L, int D, const int32_t* group, int y,
                                           const A* w, A eps, A* stats, int64_t ss) {
  int gy[kMaxDepth];
  A gmax[kMaxDepth];
  A gsum[kMaxDepth];
  bool own[kMaxDepth];
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) {
    gy[d] = d < D ? group[d * L + y] : -1;
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
      gmax[d] = group[d * L + j] == gy[d] ? hmax(gmax[d], z) : gmax[d];
    }
  }
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) own[d] = d < D && gmax[d] < m - A(kShareShift);
  A s = A(0);
  for (int j = 0; j < L; ++j) {  // sm90: trips=L
    const A z = x(j);
    const A e = hexp(z - m);
    s += e;
    HSS_UNROLL
    for (int d = 0; d < kMaxDepth; ++d) {
      if (d >= D) break;
      A t = e;
      if (own[d]) t = hexp(z - gmax[d]);  // rare: a group far below the global max; sm90: cold
      gsum[d] += group[d * L + j] == gy[d] ? t : A(0);
    }
  }
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) gmax[d] = own[d] ? gmax[d] : m;  // the shift each sum used
  return hsm_finish(m, s, gmax, gsum, D, w, eps, stats, ss);
}

// Gradient of g * loss with respect to the L leaf logits, from the forward's stats; `out(j, v)` stores
// it. dl/dz_j = p_j * sum_d a_d - sum_{d : j in G_d(y)} c_d * exp(z_j - b_d), where (eps = 0) a_d = w_d,
// c_d = w_d, b_d = lse_d, or (eps > 0, P_d = exp(lse_d - lse)) a_d = w_d P_d / (P_d + eps),
// c_d = w_d / (P_d + eps), b_d = lse.
template <typename A, typename X, typename O>
HSS_HOST_DEVICE inline void hsm_backward_pixel(const X& x, const O& out, int L, int D, const int32_t* group,
                                               int y, const A* w, A eps, const A* stats, int64_t ss, A g) {
  const A lse = stats[0];
  int gy[kMaxDepth];
  A base[kMaxDepth];
  A coef[kMaxDepth];
  bool own[kMaxDepth];
  const A a = hsm_backward_coefs(stats, ss, D, w, eps, g, coef, base, own);
  HSS_UNROLL
  for (int d = 0; d < kMaxDepth; ++d) gy[d] = d < D ? group[d * L + y] : -1;
  for (int j = 0; j < L; ++j) {  // sm90: trips=L
    const A z = x(j);
    const A p = hexp(z - lse);
    A r = a * p;
    HSS_UNROLL
    for (int d = 0; d < kMaxDepth; ++d) {
      if (d >= D) break;
      A t = p;
      if (own[d]) t = hexp(z - base[d]);  // sm90: cold
      r -= group[d * L + j] == gy[d] ? coef[d] * t : A(0);
    }
    out(j, r);
  }
}

// ------------------------------------------------------------------------------------------------
// Focal binary loss of a positive-class logit z (MATH.md §3): loss = -(1-q)^gamma log(q [+ eps]),
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

// Tree tables packed by hss_kernels/native.py (tree_index) into one int32 array.
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
    // there left arg = -1, an out-of-bounds K(-1) (on the GPU, outside the block's shared memory).
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

// Where pixel i (flat over N x H x W) of an (N, *, H, W) tensor lives, through its strides: 64-bit
// offsets, channels_last or any other layout without a copy.
struct PixelGeom {
  int64_t H, W, sN, sH, sW;
  HSS_HOST_DEVICE inline int64_t offset(int64_t i) const {
    const int64_t hw = H * W;
    const int64_t n = i / hw;
    const int64_t r = i - n * hw;
    const int64_t h = r / W;
    return n * sN + h * sH + (r - h * W) * sW;
  }
  // offsets of pixels i0 .. i0 + count - 1, with one division for the run instead of three per pixel.
  HSS_HOST_DEVICE inline void offsets(int64_t i0, int64_t count, int64_t* out) const {
    const int64_t hw = H * W;
    int64_t n = i0 / hw;
    int64_t r = i0 - n * hw;
    int64_t h = r / W;
    int64_t w = r - h * W;
    for (int64_t p = 0; p < count; ++p) {
      out[p] = n * sN + h * sH + w * sW;
      if (++w == W) {
        w = 0;
        if (++h == H) {
          h = 0;
          ++n;
        }
      }
    }
  }
};

}  // namespace hss
