// Focal tree-min loss (docs/MATH.md §3) and the multi-label tree BCE (§4.1), one kernel family: the
// CPU implementation of tree_min_fwd and tree_min_bwd (schemas and contracts in csrc/ops.cpp).
// `extrema` true routes every node's term through the min over its ancestors (target path) or the max
// over its descendants (elsewhere), false is plain BCE.
//
// Two implementations, chosen per block of kBlock pixels by the ops at the end of this file:
// * the lane path (float32, and float16/bfloat16 computed in float): row passes over a (V, kBlock)
//   tile, vectorised across pixels (docs/MATH.md §3.9), the first section below;
// * the per-pixel path (float64, and every dtype with HSS_CPU_PIXEL_PATH=1): without upsampling
//   tree_forward_group, tree_min_backward_group and tree_bce_backward_group (G pixels at a time, grouped as
//   the CUDA kernels group them; with upsampling, G pixels of a row read through UpLanes, the backward
//   banded as the CUDA one), with the focal mode the CUDA kernels would pick: the code the CUDA kernels run,
//   so that the tests check the GPU's arithmetic without a GPU. (float64 with upsampling and not forced:
//   tree_forward_pixel and tree_backward_pixel of tree_min_math.h on the interpolated tile.)
#include "checks.h"
#include "loop.h"
#include "tree_min_math.h"
#include "vmath.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace hss {
namespace {

using cpu::kBlock;

// ================================================================================================
// The lane path: row passes over a (V, kBlock) tile (float)
// ================================================================================================

// log(1 + e) for e in [0, 1] (the focal's log1p(exp(-|z|))): cpu::vlog's Cephes polynomial on
// m = e (e below sqrt(2) - 1) or m = (e - 1) / 2 plus ln 2, the reduction vlog makes of 1 + e, but
// without rounding 1 + e first: no correction term, no exponent bits.
__attribute__((always_inline)) inline float vlog1p01(float e) {
  const bool big = e > 0.414213562373f;
  const float m = big ? (e - 1.0f) * 0.5f : e;
  const float k = big ? 1.0f : 0.0f;
  return cpu::vlog_reduced(m, k);
}

// Focal loss of a positive-class logit z and its derivative, as tree_min_math.h's focal() but branch-free
// for the vectoriser (vexp, vlog1p01, one division). G is the focal case (0, 1, 2: gamma 0, 1, 2 by
// products; 3: any gamma), E whether eps > 0: fixed per loop.
template <int G, bool E>
__attribute__((always_inline)) inline void vfocal(float z, float gamma, float eps, float* loss, float* dloss) {
  const float az = std::fabs(z);
  const float e = cpu::vexp(-az);
  const float inv = 1.0f / (1.0f + e);
  const float l1 = vlog1p01(e);
  const float log_q = std::min(z, 0.0f) - l1;
  const bool nonneg = z >= 0.0f;
  const float q = nonneg ? inv : e * inv;
  const float one_m_q = nonneg ? e * inv : inv;
  float log_p = log_q, dlog_p = one_m_q;
  if constexpr (E) {
    log_p = cpu::vlog(q + eps);
    dlog_p = q * one_m_q / (q + eps);
  }
  float fw = 1.0f;
  if constexpr (G == 1) fw = one_m_q;
  if constexpr (G == 2) fw = one_m_q * one_m_q;
  if constexpr (G == 3) fw = cpu::vexp(gamma * (std::min(-z, 0.0f) - l1));
  *loss = -fw * log_p;
  // gamma = 0: no log term (a backward-only caller then computes no log at all)
  *dloss = G == 0 ? -dlog_p : gamma * q * fw * log_p - fw * dlog_p;
}

inline int focal_case(float gamma) { return gamma == 0.0f ? 0 : gamma == 1.0f ? 1 : gamma == 2.0f ? 2 : 3; }

// The float path works on rows: a (V, kBlock) tile holds one node per row and one pixel per column,
// so that the tree walks become whole-row operations that the compiler vectorises across pixels:
// * the min over the ancestors on the target path is C[v] = min(C[parent(v)], x[v]), rows in pre-order
//   (the path's C is what its terms use: one row per node serves every label);
// * the max over desc-or-self(v) is M[v] = max(x[v], M[children of v]), rows in reverse pre-order;
// * node v's term is focal(on ? C[v] : -M[v]), on = whether v lies on the pixel's target path;
// * the backward runs the chain rule back through those selects: the min chain in reverse pre-order
//   (a node that did not take its own logit passes its gradient to its parent), the max chain in
//   pre-order (a node passes its gradient to the child whose max it took). The selects keep the tie
//   rule: strict comparisons keep the shallower ancestor for the min and, children being folded in
//   pre-order after the node itself, the node earliest in pre-order for the max.

// The tree's shape as the row passes walk it, built once per call from the packed tables.
struct TreeRows {
  std::vector<int32_t> order;   // pre-order
  std::vector<int32_t> parent;  // per node; -1 for the children of the root
  std::vector<int32_t> first;   // children of v: kids[first[v] .. first[v + 1]), in pre-order
  std::vector<int32_t> kids;
};

TreeRows tree_rows(const TreeIndex& t) {
  TreeRows r;
  const int V = t.V;
  r.order.assign(t.dfs_order, t.dfs_order + V);
  r.parent.assign(V, -1);
  std::vector<int32_t> nkids(V, 0);
  std::vector<char> seen(V, 0);
  // The tables come from hss_kernels.tree; checked here because the row passes index by them.
  for (int i = 0; i < V; ++i) {
    const int v = r.order[i];
    TORCH_CHECK(v >= 0 && v < V && !seen[v] && t.dfs_pos[v] == i && t.depth[v] >= 1 && t.depth[v] <= t.D &&
                    t.size[v] >= 1 && i + t.size[v] <= V,
                "tree_min: inconsistent tree_index tables at pre-order position ", i);
    seen[v] = 1;
  }
  for (int i = 0; i < V; ++i) {
    const int v = r.order[i];
    for (int j = i + 1; j < i + t.size[v]; j += t.size[r.order[j]]) {
      const int c = r.order[j];
      TORCH_CHECK(t.depth[c] == t.depth[v] + 1 && j + t.size[c] <= i + t.size[v],
                  "tree_min: inconsistent tree_index tables below node ", v);
      r.parent[c] = v;
      ++nkids[v];
    }
  }
  for (int v = 0; v < V; ++v)
    TORCH_CHECK((r.parent[v] < 0) == (t.depth[v] == 1), "tree_min: inconsistent tree_index tables at node ", v);
  r.first.assign(V + 1, 0);
  for (int v = 0; v < V; ++v) r.first[v + 1] = r.first[v] + nkids[v];
  r.kids.assign(r.first[V], 0);
  std::vector<int32_t> fill(r.first.begin(), r.first.end() - 1);
  for (int i = 0; i < V; ++i) {
    const int v = r.order[i];
    if (r.parent[v] >= 0) r.kids[fill[r.parent[v]]++] = v;
  }
  return r;
}

// Row pn[d] = the channel at depth d + 1 of each lane's target path, as float (exact below 2^24), -1
// past the path and for lanes that are ignored or past the block's end: `on` is then one compare.
inline void path_rows(const TreeIndex& t, const int64_t* ys, const bool* valid, float* pn) {
  for (int d = 0; d < t.D; ++d)
    for (int64_t p = 0; p < kBlock; ++p)
      pn[d * kBlock + p] = valid[p] ? static_cast<float>(t.path[ys[p] * t.D + d]) : -1.0f;
}

// Rows C (min over ancestors-or-self, pre-order) for every node; x[c * ld + p] is the input.
__attribute__((always_inline)) inline void min_rows(const float* x, int64_t ld, const TreeRows& tr, float* C) {
  for (const int v : tr.order) {
    const float* xv = x + v * ld;
    float* cv = C + v * kBlock;
    const int u = tr.parent[v];
    if (u < 0) {
      for (int64_t p = 0; p < kBlock; ++p) cv[p] = xv[p];
    } else {
      const float* cu = C + u * kBlock;
      // hmin(C[parent], x[v]) as the per-pixel code: a NaN logit makes its term NaN
      for (int64_t p = 0; p < kBlock; ++p) cv[p] = cu[p] < xv[p] ? cu[p] : xv[p];
    }
  }
}

// Row M[v] (max over desc-or-self) from x[v] and the children's rows; with W, the node whose row gave
// the max (v itself or a child, as float), ties to the earliest. Returns M[v]'s row: x[v]'s for a leaf,
// which has no W row (its max is always its own logit).
template <bool kWinner>
__attribute__((always_inline)) inline const float* max_row(const float* x, int64_t ld, const TreeRows& tr, int v,
                                                           float* M, float* W) {
  const float* xv = x + v * ld;
  const int k0 = tr.first[v], k1 = tr.first[v + 1];
  if (k0 == k1) return xv;
  float* mv = M + v * kBlock;
  for (int64_t p = 0; p < kBlock; ++p) mv[p] = xv[p];
  if constexpr (kWinner)
    for (int64_t p = 0; p < kBlock; ++p) W[v * kBlock + p] = static_cast<float>(v);
  for (int j = k0; j < k1; ++j) {
    const int c = tr.kids[j];
    const float* mc = tr.first[c] == tr.first[c + 1] ? x + c * ld : M + c * kBlock;
    const float fc = static_cast<float>(c);
    for (int64_t p = 0; p < kBlock; ++p) {
      const bool take = mc[p] > mv[p];  // strict: the earlier in pre-order keeps a tie
      mv[p] = take ? mc[p] : mv[p];
      if constexpr (kWinner) W[v * kBlock + p] = take ? fc : W[v * kBlock + p];
    }
  }
  return mv;
}

// Loss of every lane: sum over nodes of k_v * focal(Z_v). Scratch: D + 2V rows.
template <int G, bool E>
__attribute__((always_inline)) inline void tree_forward_rows(const float* x, int64_t ld, const TreeIndex& t,
                                                             const TreeRows& tr, const float* pn, const float* k,
                                                             float gamma, float eps, bool extrema, float* C,
                                                             float* M, float* acc) {
  for (int64_t p = 0; p < kBlock; ++p) acc[p] = 0.0f;
  if (extrema) min_rows(x, ld, tr, C);
  for (int i = t.V - 1; i >= 0; --i) {
    const int v = tr.order[i];
    const float* on_row = pn + (t.depth[v] - 1) * kBlock;
    const float fv = static_cast<float>(v);
    const float kv = k[v];
    const float* xv = x + v * ld;
    const float* mv = extrema ? max_row<false>(x, ld, tr, v, M, nullptr) : xv;
    const float* cv = extrema ? C + v * kBlock : xv;
    for (int64_t p = 0; p < kBlock; ++p) {
      const float z = on_row[p] == fv ? cv[p] : -mv[p];
      float l, dl;
      vfocal<G, E>(z, gamma, eps, &l, &dl);
      acc[p] += kv * l;
    }
  }
}

// Gradient of every lane into o[v * ldo + p]; gl[p] is the lane's upstream gradient, live[p] 1 for the
// lanes that count, else 0 (a float: GCC does not vectorise loads of bool). Scratch: D + 5V rows.
template <int G, bool E>
__attribute__((always_inline)) inline void tree_backward_rows(const float* x, int64_t ld, const TreeIndex& t,
                                                              const TreeRows& tr, const float* pn, const float* live,
                                                              const float* k, float gamma, float eps, bool extrema,
                                                              const float* gl, float* C, float* M, float* W,
                                                              float* Gc, float* Gm, float* o, int64_t ldo) {
  const int V = t.V;
  if (!extrema) {
    for (int v = 0; v < V; ++v) {
      const float* on_row = pn + (t.depth[v] - 1) * kBlock;
      const float fv = static_cast<float>(v);
      const float kv = k[v];
      const float* xv = x + v * ld;
      float* ov = o + v * ldo;
      for (int64_t p = 0; p < kBlock; ++p) {
        const bool on = on_row[p] == fv;
        float l, dl;
        vfocal<G, E>(on ? xv[p] : -xv[p], gamma, eps, &l, &dl);
        const float g = live[p] != 0.0f ? gl[p] * kv * dl : 0.0f;  // a select: dl of an unused lane may be NaN
        ov[p] = on ? g : -g;
      }
    }
    return;
  }
  min_rows(x, ld, tr, C);
  for (int v = 0; v < V; ++v)
    if (tr.first[v] != tr.first[v + 1])
      for (int64_t p = 0; p < kBlock; ++p) Gc[v * kBlock + p] = 0.0f;
  // Reverse pre-order: the max rows and the terms' gradients; the min chain's gradient, complete at v
  // since v's descendants came first, goes to x[v] if v's min is its own logit, else to the parent.
  // A leaf's row Gc[v] ends as its whole own share (its max is its own logit); an inner node's as the
  // min chain's share, Gm[v] holding what its max passes on.
  for (int i = V - 1; i >= 0; --i) {
    const int v = tr.order[i];
    const int u = tr.parent[v];
    const bool leaf = tr.first[v] == tr.first[v + 1];
    const float* on_row = pn + (t.depth[v] - 1) * kBlock;
    const float fv = static_cast<float>(v);
    const float kv = k[v];
    const float* xv = x + v * ld;
    const float* cv = C + v * kBlock;
    float* gc = Gc + v * kBlock;
    if (leaf) {
      for (int64_t p = 0; p < kBlock; ++p) {
        const bool on = on_row[p] == fv;
        float l, dl;
        vfocal<G, E>(on ? cv[p] : -xv[p], gamma, eps, &l, &dl);
        const float g = live[p] != 0.0f ? gl[p] * kv * dl : 0.0f;
        gc[p] = on ? g : -g;
      }
      if (u >= 0) {  // a loop of its own: GCC did not vectorise this fused with the one above
        const float* cu = C + u * kBlock;
        float* gcu = Gc + u * kBlock;
        for (int64_t p = 0; p < kBlock; ++p) {
          const float r = gc[p];
          const float mine = on_row[p] == fv ? r : 0.0f;  // the min chain's part
          const bool own = xv[p] < cu[p];  // as min_rows: a tie stays with the shallower ancestor
          gcu[p] += own ? 0.0f : mine;
          const float kept = own ? r : 0.0f;
          gc[p] = on_row[p] == fv ? kept : r;
        }
      }
      continue;
    }
    const float* mv = max_row<true>(x, ld, tr, v, M, W);
    float* gm = Gm + v * kBlock;
    for (int64_t p = 0; p < kBlock; ++p) {
      const bool on = on_row[p] == fv;
      float l, dl;
      vfocal<G, E>(on ? cv[p] : -mv[p], gamma, eps, &l, &dl);
      const float g = live[p] != 0.0f ? gl[p] * kv * dl : 0.0f;
      gc[p] += on ? g : 0.0f;
      gm[p] = on ? 0.0f : -g;
    }
    if (u >= 0) {  // (a node at depth 1 takes its own logit)
      const float* cu = C + u * kBlock;
      float* gcu = Gc + u * kBlock;
      for (int64_t p = 0; p < kBlock; ++p) {
        const bool own = xv[p] < cu[p];
        gcu[p] += own ? 0.0f : gc[p];
        gc[p] = own ? gc[p] : 0.0f;  // now the share of x[v]
      }
    }
  }
  // Pre-order: the max chain's gradient flows from each node to the child whose max it took.
  for (const int v : tr.order) {
    const int u = tr.parent[v];
    const float fv = static_cast<float>(v);
    const float* gc = Gc + v * kBlock;
    float* ov = o + v * ldo;
    if (tr.first[v] == tr.first[v + 1]) {
      if (u < 0) {
        for (int64_t p = 0; p < kBlock; ++p) ov[p] = gc[p];
      } else {
        const float* wu = W + u * kBlock;
        const float* gmu = Gm + u * kBlock;
        for (int64_t p = 0; p < kBlock; ++p) ov[p] = gc[p] + (wu[p] == fv ? gmu[p] : 0.0f);
      }
      continue;
    }
    float* gm = Gm + v * kBlock;
    const float* wv = W + v * kBlock;
    if (u >= 0) {
      const float* wu = W + u * kBlock;
      const float* gmu = Gm + u * kBlock;
      for (int64_t p = 0; p < kBlock; ++p) gm[p] += wu[p] == fv ? gmu[p] : 0.0f;
    }
    for (int64_t p = 0; p < kBlock; ++p) ov[p] = gc[p] + (wv[p] == fv ? gm[p] : 0.0f);
  }
}

// Runs F<G, E>(args...) for the focal case of (gamma, eps).
#define HSS_FOCAL_CASES(F, gamma, eps, ...)                                   \
  do {                                                                        \
    const int g_ = focal_case(gamma);                                         \
    const bool e_ = (eps) > 0.0f;                                             \
    if (g_ == 0) e_ ? F<0, true>(__VA_ARGS__) : F<0, false>(__VA_ARGS__);     \
    else if (g_ == 1) e_ ? F<1, true>(__VA_ARGS__) : F<1, false>(__VA_ARGS__); \
    else if (g_ == 2) e_ ? F<2, true>(__VA_ARGS__) : F<2, false>(__VA_ARGS__); \
    else e_ ? F<3, true>(__VA_ARGS__) : F<3, false>(__VA_ARGS__);             \
  } while (0)

// Float lanes of a block: x[c * ld + p] for lane p < n; scratch as tree_*_rows need.
HSS_LANES_TARGETS void tree_forward_lanes(const float* x, int64_t ld, float* scratch, const TreeIndex& t,
                                          const TreeRows& tr, const int64_t* ys, const bool* valid, const float* k,
                                          float gamma, float eps, bool extrema, float* loss) {
  float* pn = scratch;
  float* C = pn + t.D * kBlock;
  float* M = C + t.V * kBlock;
  path_rows(t, ys, valid, pn);
  HSS_FOCAL_CASES(tree_forward_rows, gamma, eps, x, ld, t, tr, pn, k, gamma, eps, extrema, C, M, loss);
}

// o[v * ldo + p]: the gradient's rows (the output itself, or a tile).
HSS_LANES_TARGETS void tree_backward_lanes(const float* x, int64_t ld, float* scratch, float* o, int64_t ldo,
                                           const TreeIndex& t, const TreeRows& tr, const int64_t* ys, const bool* valid,
                                           const float* k, float gamma, float eps, bool extrema, const float* g) {
  const int64_t R = t.V * kBlock;
  float* pn = scratch;
  float* C = pn + t.D * kBlock;
  path_rows(t, ys, valid, pn);
  alignas(64) float live[kBlock];
  for (int64_t p = 0; p < kBlock; ++p) live[p] = valid[p] ? 1.0f : 0.0f;
  HSS_FOCAL_CASES(tree_backward_rows, gamma, eps, x, ld, t, tr, pn, live, k, gamma, eps, extrema, g, C, C + R,
                  C + 2 * R, C + 3 * R, C + 4 * R, o, ldo);
}

// ================================================================================================
// What both paths share: a block's labels and the lanes that get a NaN
// ================================================================================================

// Labels of a block (ignore_index past its end); valid = neither ignored nor out of range; *bad set if
// a lane is neither (such a lane reads no table: it gets a NaN loss and a NaN gradient row).
inline void block_labels(const int64_t* tgt, const PixelGeom& gt, int64_t i0, int64_t n, int64_t L,
                         int64_t ignore_index, int64_t* ys, bool* valid, char* bad) {
  int64_t toff[kBlock];
  gt.offsets(i0, n, toff);
  for (int64_t p = 0; p < kBlock; ++p) {
    const int64_t y = p < n ? tgt[toff[p]] : ignore_index;
    valid[p] = y != ignore_index && y >= 0 && y < L;
    if (y != ignore_index && !valid[p]) *bad = 1;
    ys[p] = y;
  }
}

// Lanes with a NaN among their V logits x[v * ld + p] (p < n) count as bad too: a NaN loss and a NaN
// gradient row (tree_min_math.h's rule; the row passes' min and max would otherwise skip some NaNs).
template <int64_t kN, typename A>
__attribute__((always_inline)) inline void nan_scan(const A* x, int64_t ld, int V, int64_t n, int32_t* nan) {
  for (int v = 0; v < V; ++v) {
    const A* xv = x + v * ld;
    for (int64_t p = 0; p < (kN ? kN : n); ++p) nan[p] |= xv[p] != xv[p];  // vectorised: compare, or
  }
}

template <typename A>
HSS_LANES_TARGETS void nan_lanes(const A* x, int64_t ld, int V, int64_t n, bool* valid, char* bad) {
  alignas(64) int32_t nan[kBlock] = {};
  if (n == kBlock)
    nan_scan<kBlock>(x, ld, V, n, nan);
  else
    nan_scan<0>(x, ld, V, n, nan);
  for (int64_t p = 0; p < n; ++p)
    if (nan[p] && valid[p]) {
      valid[p] = false;
      *bad = 1;
    }
}

// NaN gradient rows o[v * ld + p] for the lanes with a bad label (see block_labels).
template <typename A>
void nan_rows(A* o, int64_t ld, int V, const int64_t* ys, const bool* valid, int64_t n, int64_t ignore_index) {
  for (int64_t p = 0; p < n; ++p)
    if (!valid[p] && ys[p] != ignore_index)
      for (int v = 0; v < V; ++v) o[v * ld + p] = quiet_nan<A>();
}

// ================================================================================================
// The ops: per block, the lane path or the per-pixel path (tree_min_math.h)
// ================================================================================================

// The pre-order node table of tree_forward_pixel and tree_backward_pixel.
template <typename A>
std::vector<TreeNode<A>> node_table(const TreeIndex& ti, const A* k) {
  std::vector<TreeNode<A>> nodes(ti.V);
  for (int p = 0; p < ti.V; ++p) nodes[p] = tree_node(ti, k, p);
  return nodes;
}

// The CUDA forward's per-thread body (tree_forward_group) on a block's tile: G lanes are tile columns,
// the lanes of a last partial group repeat its last column (their losses are discarded, as the CUDA
// kernel discards lanes past the last pixel).
// kPairs (bfloat16 logits, A = float): the lanes also load as bfloat16 pairs, as the CUDA accessors of bfloat16
// logits do (tree_min_backward_group's bottom-up pass); the tile's floats are the bfloat16 values, exactly.
template <typename A, int G, bool kPairs = false>
struct TileLanes {
  const A* x;
  int64_t ld;
  int64_t col[G];
  void load(int c, Lanes<A, G>& out) const {
    for (int j = 0; j < G; ++j) out.v[j] = x[c * ld + col[j]];
  }
  static constexpr bool kBf16Pairs = kPairs;
  void load_pairs(int c, Lanes<uint32_t, G / 2>& out) const {
    static_assert(std::is_same_v<A, float>, "TileLanes::load_pairs: float tiles of bfloat16 logits");
    for (int i = 0; i < G / 2; ++i) {
      uint32_t lo, hi;
      std::memcpy(&lo, x + c * ld + col[2 * i], sizeof(lo));
      std::memcpy(&hi, x + c * ld + col[2 * i + 1], sizeof(hi));
      out.v[i] = (lo >> 16) | (hi & 0xffff0000u);
    }
  }
  A operator()(int c, int j) const { return x[c * ld + col[j]]; }
};

template <typename A, int G>
struct LocalLanes {
  Lanes<A, G>* p;
  Lanes<A, G>& operator()(int s) const { return p[s]; }
};

// tree_forward_group with the focal mode and extrema the CUDA kernel would take for these options.
template <typename A, int G, typename X>
void forward_group(const X& x, const TreeNode<A>* nodes, const TreeIndex& ti, const int* y,
                   const A* k, A gamma, A eps, bool extrema, A* loss) {
  Lanes<A, G> slots[kMaxDepth + 1];
  const NodeTable<A> nt{nodes};
  const LocalLanes<A, G> acc{slots};
  with_focal_mode(gamma, eps, [&](auto f) {
    constexpr int kF = decltype(f)::value;
    if (extrema)
      tree_forward_group<kF, true, A, G>(x, nt, acc, ti, y, k, gamma, eps, loss);
    else
      tree_forward_group<kF, false, A, G>(x, nt, acc, ti, y, k, gamma, eps, loss);
  });
}

// The losses of a block's n pixels (x: its tile, column p at x + p, stride ld) through forward_group, G
// lanes at a time as the CUDA kernel groups them; lanes that are not valid get no loss written.
template <typename T, typename A>
void forward_groups(const A* x, int64_t ld, int64_t n, const int64_t* ys, const bool* valid, const TreeNode<A>* nodes,
                    const TreeIndex& ti, const A* k, A gamma, A eps, bool extrema, A* out) {
  constexpr int G = lanes_for<T>();
  for (int64_t g0 = 0; g0 < n; g0 += G) {
    const int64_t m = std::min<int64_t>(G, n - g0);
    TileLanes<A, G, std::is_same_v<T, c10::BFloat16>> col{x, ld, {}};
    int y[G];
    bool any = false;
    for (int j = 0; j < G; ++j) {
      const int64_t p = g0 + std::min<int64_t>(j, m - 1);
      col.col[j] = p;
      y[j] = j < m && valid[p] ? static_cast<int>(ys[p]) : 0;
      any |= j < m && valid[p];
    }
    if (!any) continue;
    A l[G];
    forward_group<A, G>(col, nodes, ti, y, k, gamma, eps, extrema, l);
    for (int j = 0; j < m; ++j) out[g0 + j] = l[j];
  }
}

// With fused upsampling, the losses of a block's n destination pixels (flat from i0) as the CUDA forward
// (tree_fwd_up_group_kernel) computes them: G pixels of a row per group from the row's start, each channel
// interpolated through UpLanes; a group the block shares with its neighbour runs with the lanes outside the
// block unlabelled (each lane's loss is its own).
template <typename T, typename A>
void up_forward_groups(const T* x, int64_t sC, const UpsampleGeom<A>& u, int64_t i0, int64_t n, const int64_t* ys,
                       const bool* valid, const TreeNode<A>* nodes, const TreeIndex& ti, const A* k, A gamma, A eps,
                       bool extrema, A* out) {
  constexpr int G = lanes_for<T>();
  for (int64_t p = 0; p < n;) {
    const int64_t q = i0 + p, rr = q / u.W, X = q - rr * u.W, X0 = X / G * G;
    const int64_t gn = std::min<int64_t>(G, u.W - X0);      // the group's pixels
    const int64_t m = std::min<int64_t>(X0 + gn - X, n - p);  // those in the block, from X
    int y[G];
    bool any = false;
    for (int j = 0; j < G; ++j) {
      const int64_t pj = p + (X0 + j - X);
      const bool in = X0 + j >= X && X0 + j < X + m && valid[pj];
      y[j] = in ? static_cast<int>(ys[pj]) : 0;
      any |= in;
    }
    if (any) {
      A l[G];
      forward_group<A, G>(up_lanes<T, A, G>(x, sC, u, rr, X0, gn), nodes, ti, y, k, gamma, eps, extrema, l);
      for (int64_t j = X - X0; j < X - X0 + m; ++j) out[p + (j - (X - X0))] = l[j];
    }
    p += m;
  }
}

// The gradient tile's columns of a group (the lanes that exist: m).
template <typename A, int G>
struct TileOut {
  A* t;
  int64_t col[G];
  int64_t m;
  void store(int c, const Lanes<A, G>& v) const {
    for (int j = 0; j < m; ++j) t[c * kBlock + col[j]] = v.v[j];
  }
  void store_lane(int c, int j, A v) const {
    if (j < m) t[c * kBlock + col[j]] = v;
  }
};

// A block's n pixels (x: its tile, column p at x + p, stride ld) G lanes at a time as the CUDA kernels group
// them: run(kF, col, out, y, valid, bad, g) per group with the focal mode kF of the options, the tile columns
// (the last pixel repeated past the group's m <= G), y = 0 unless valid (never a table read) and the upstream
// gradients (0 past m); out writes the group's columns of the (V, kBlock) gradient tile gtile.
template <int G, bool kPairs = false, typename A, typename Run>
void backward_groups(const A* x, int64_t ld, int64_t n, const int64_t* ys, const bool* valid, int64_t ignore_index,
                     const A* g, A gamma, A eps, A* gtile, Run&& run) {
  with_focal_mode(gamma, eps, [&](auto f) {
    for (int64_t g0 = 0; g0 < n; g0 += G) {
      const int64_t m = std::min<int64_t>(G, n - g0);
      TileLanes<A, G, kPairs> col{x, ld, {}};
      TileOut<A, G> out{gtile, {}, m};
      int y[G];
      bool v[G], bad[G];
      A gl[G];
      for (int j = 0; j < G; ++j) {
        const int64_t p = g0 + std::min<int64_t>(j, m - 1);
        col.col[j] = out.col[j] = p;
        v[j] = j < m && valid[p];
        bad[j] = j < m && !valid[p] && ys[p] != ignore_index;
        y[j] = v[j] ? static_cast<int>(ys[p]) : 0;
        gl[j] = j < m ? g[p] : A(0);
      }
      run(f, col, out, y, v, bad, gl);
    }
  });
}

// The tree BCE gradient of a block's n pixels into the (V, kBlock) tile gtile through
// tree_bce_backward_group, G lanes at a time as the CUDA kernel groups them.
template <typename T, typename A>
void bce_backward_groups(const A* x, int64_t ld, int64_t n, const int64_t* ys, const bool* valid,
                         int64_t ignore_index, const A* g, const TreeNode<A>* nodes, const TreeIndex& ti, const A* k,
                         A gamma, A eps, A* gtile) {
  constexpr int G = lanes_for<T>();
  const NodeTable<A> nt{nodes};
  backward_groups<G>(x, ld, n, ys, valid, ignore_index, g, gamma, eps, gtile,
                     [&](auto f, const auto& col, const auto& out, const int* y, const bool* v, const bool* bad,
                         const A* gl) {
                       tree_bce_backward_group<decltype(f)::value, A, G>(col, nt, out, ti, y, v, bad, k, gamma, eps,
                                                                         gl);
                     });
}

// The tree-min gradient of a block's n pixels into the (V, kBlock) tile gtile through tree_min_backward_group,
// G lanes at a time as the CUDA kernel groups them: the depth slots and the node bits (words * G) in local
// memory, as the kernel keeps them in shared memory.
template <typename T, typename A>
void min_backward_groups(const A* x, int64_t ld, int64_t n, const int64_t* ys, const bool* valid,
                         int64_t ignore_index, const A* g, const TreeNode<A>* nodes, const TreeIndex& ti, const A* k,
                         A gamma, A eps, A* gtile) {
  constexpr int G = lanes_for<T>();
  const NodeTable<A> nt{nodes};
  Lanes<A, G> slots[kMaxDepth + 1];
  std::vector<Lanes<uint32_t, G>> words(tree_bit_words(ti.V));
  const LocalLanes<A, G> acc{slots};
  const LocalLanes<uint32_t, G> bits{words.data()};
  backward_groups<G, std::is_same_v<T, c10::BFloat16>>(x, ld, n, ys, valid, ignore_index, g, gamma, eps, gtile,
                     [&](auto f, const auto& col, const auto& out, const int* y, const bool* v, const bool* bad,
                         const A* gl) {
                       tree_min_backward_group<decltype(f)::value, A, G>(col, nt, acc, bits, out, ti, y, v, bad, k,
                                                                         gamma, eps, gl);
                     });
}

template <typename T>
void tree_min_fwd_cpu_impl(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tree_index,
                           const at::Tensor& node_weights, int64_t L, int64_t D, double gamma_, double eps_,
                           int64_t ignore_index, bool extrema, at::Tensor& loss, bool per_pixel, at::Tensor& count,
                           const PixelWeights<at::opmath_type<T>>& w, at::Tensor& weight_sum,
                           const cpu::Upsample<at::opmath_type<T>>* up) {
  using A = at::opmath_type<T>;
  const int V = logits.size(1);
  const int64_t P = target.numel();
  const PixelGeom gx = up ? geom(target) : geom(logits), gt = geom(target);
  const TreeIndex ti = unpack_tree(tree_index.data_ptr<int32_t>(), V, L, D);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const A* k = node_weights.data_ptr<A>();
  const A gamma = static_cast<A>(gamma_), eps = static_cast<A>(eps_);
  A* lp = per_pixel ? loss.data_ptr<A>() : nullptr;
  const int64_t nb = (P + cpu::kBlock - 1) / cpu::kBlock;
  std::vector<double> part(nb, 0.0), wpart(w.cw ? nb : 0, 0.0);
  std::vector<int64_t> cnt(nb, 0);
  const bool weighted = w.any();
  const TreeRows tr = tree_rows(ti);
  constexpr bool vec = std::is_same_v<A, float>;
  const bool forced = cpu::pixel_path_forced();
  const bool lanes = vec && !forced;
  const int64_t scratch = vec ? (D + 2 * V) * kBlock : 0;
  const std::vector<TreeNode<A>> nodes = node_table<A>(ti, k);
  cpu::for_each_block_direct<T, A>(logits.data_ptr<T>(), V, logits.stride(1), gx, P, scratch,
                                   [&](int64_t i0, int64_t n, const int64_t*, const A* x, int64_t ld, A* scr) {
    int64_t ys[kBlock];
    bool valid[kBlock];
    A acc[kMaxDepth + 1];
    alignas(64) A lane_loss[kBlock];
    char bad = 0;
    block_labels(tgt, gt, i0, n, L, ignore_index, ys, valid, &bad);
    // The per-pixel path applies the NaN rule itself (tree_forward_pixel's flag), so that it is tested.
    if (lanes) nan_lanes(x, ld, V, n, valid, &bad);
    if constexpr (vec)
      if (lanes) tree_forward_lanes(x, ld, scr, ti, tr, ys, valid, k, gamma, eps, extrema, lane_loss);
    // What the CUDA kernels run without upsampling: G pixels per thread (tree_forward_group).
    // With upsampling (forced): the CUDA forward's groups of a row (up_forward_groups).
    const bool groups = !lanes && (!up || forced);
    if (groups && !up) forward_groups<T, A>(x, ld, n, ys, valid, nodes.data(), ti, k, gamma, eps, extrema, lane_loss);
    if (groups && up)
      up_forward_groups<T, A>(logits.data_ptr<T>(), logits.stride(1), up->geom, i0, n, ys, valid, nodes.data(), ti, k,
                              gamma, eps, extrema, lane_loss);
    double s = 0, ws = 0;
    int64_t c = 0;
    // The block's pixels, the weights (docs/MATH.md §6.6) compiled in only for a weighted call (the
    // unweighted loop is the plain one): pw at the target's pixel, one read per labelled pixel.
    const auto pixels = [&](auto weighted_c) {
      constexpr bool kW = decltype(weighted_c)::value;
      int64_t woff[kW ? kBlock : 1];
      if constexpr (kW)
        if (w.pw) w.gw.offsets(i0, n, woff);
      for (int64_t p = 0; p < n; ++p) {
        A l = A(0);
        if (valid[p]) {
          if (lanes || groups)
            l = lane_loss[p];
          else
            l = tree_forward_pixel<A>(cpu::StridedColumn<A>{x + p, ld}, NodeTable<A>{nodes.data()},
                                      cpu::Scratch<A>{acc}, ti, static_cast<int>(ys[p]), k, gamma, eps, extrema);
          if constexpr (kW) {
            const A cy = w.of_class(ys[p]);
            l *= w.pw ? cy * w.pw[woff[p]] : cy;
            ws += cy;
          }
          s += l;
          ++c;
        } else if (ys[p] != ignore_index) {  // a bad label: NaN, counted, so that a mean or sum is NaN too
          l = quiet_nan<A>();
          // (a lane path's NaN logits, label in range: its class weight, as the per-pixel path counts it)
          if constexpr (kW)
            if (w.cw && ys[p] >= 0 && ys[p] < L) ws += w.cw[ys[p]];
          s += l;
          ++c;
        }
        if (lp) lp[i0 + p] = l;
      }
    };
    if (weighted)
      pixels(std::true_type{});
    else
      pixels(std::false_type{});
    part[i0 / kBlock] = s;
    cnt[i0 / kBlock] = c;
    if (w.cw) wpart[i0 / kBlock] = ws;
  }, up);
  cpu::finish_reduction<A>(part, cnt, per_pixel ? nullptr : loss.data_ptr<A>(), count.data_ptr<int64_t>());
  // The weighted mean's denominator: the class weights' partials in the same fixed order, or the count.
  A* wsum = weight_sum.data_ptr<A>();
  if (w.cw) {
    int64_t unused = 0;
    cpu::finish_reduction<A>(wpart, cnt, wsum, &unused);
  } else {
    *wsum = static_cast<A>(*count.data_ptr<int64_t>());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_min_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tree_index, const at::Tensor& node_weights,
    int64_t L, int64_t D, double gamma, double eps, int64_t ignore_index, bool per_pixel, bool extrema,
    int64_t upsample, bool align_corners, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& pixel_weight) {
  check_tree_min("tree_min_fwd", logits, target, tree_index, node_weights, L, D, upsample);
  check_weights("tree_min_fwd", class_weight, pixel_weight, logits, target, L);
  at::Tensor loss, count;
  std::tie(loss, count) = new_loss(logits, target, per_pixel);
  at::Tensor weight_sum = new_weight_sum(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tree_min_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    std::optional<cpu::Upsample<A>> up;
    if (upsample) up.emplace(logits.sizes().data(), logits.strides().data(), target.size(1), target.size(2), align_corners);
    tree_min_fwd_cpu_impl<scalar_t>(logits, target, tree_index, node_weights, L, D, gamma, eps, ignore_index, extrema,
                                    loss, per_pixel, count, pixel_weights<A>(class_weight, pixel_weight), weight_sum,
                                    up ? &*up : nullptr);
  });
  return {loss, count, weight_sum};
}

// A weighted backward's block: each labelled pixel's upstream gradient g[p] times its weight cw[y] * pw[p]
// (pw at the target's pixel). Out of line, so that the unweighted body stays as it was.
template <typename A>
__attribute__((noinline)) void weigh_gradients(const PixelWeights<A>& w, int64_t i0, int64_t n, const int64_t* ys,
                                               const bool* valid, A* g) {
  int64_t woff[kBlock];
  if (w.pw) w.gw.offsets(i0, n, woff);
  for (int64_t p = 0; p < n; ++p)
    if (valid[p]) {
      const A cy = w.of_class(ys[p]);
      g[p] *= w.pw ? cy * w.pw[woff[p]] : cy;
    }
}

template <typename T>
void tree_min_bwd_cpu_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                           const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D,
                           double gamma_, double eps_, int64_t ignore_index, bool extrema, at::Tensor& out,
                           const PixelWeights<at::opmath_type<T>>& w, const cpu::Upsample<at::opmath_type<T>>* up,
                           at::opmath_type<T>* acc) {
  using A = at::opmath_type<T>;
  const int V = logits.size(1);
  const int64_t P = target.numel();
  const PixelGeom gx = up ? geom(target) : geom(logits), gt = geom(target), gg = grad_geom(grad, target);
  const TreeIndex ti = unpack_tree(tree_index.data_ptr<int32_t>(), V, L, D);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const A* gp = grad.data_ptr<A>();
  const A* k = node_weights.data_ptr<A>();
  const A gamma = static_cast<A>(gamma_), eps = static_cast<A>(eps_);
  const int64_t sC = logits.stride(1);
  T* y_out = out.data_ptr<T>();
  // Thread scratch: the gradient tile (V, kBlock), then the float path's rows (see tree_backward_rows)
  // or the V accumulators of tree_backward_pixel.
  const TreeRows tr = tree_rows(ti);
  constexpr bool vec = std::is_same_v<A, float>;
  const bool lanes = vec && !cpu::pixel_path_forced();
  const int64_t scratch = vec ? (D + 6 * V) * kBlock : V * kBlock + V;  // (float: one row per node spare; also
                                                                           // covers the per-pixel path's bits)
  const std::vector<TreeNode<A>> nodes = node_table<A>(ti, k);
  const T* xp = logits.data_ptr<T>();
  const auto body = [&](int64_t i0, int64_t n, const int64_t* offs, const A* x, int64_t ld, A* scr) {
    A* gtile = scr;
    int64_t ys[kBlock];
    bool valid[kBlock];
    alignas(64) A g[kBlock];
    char bad = 0;
    block_labels(tgt, gt, i0, n, L, ignore_index, ys, valid, &bad);
    if (lanes) nan_lanes(x, ld, V, n, valid, &bad);  // the per-pixel path: tree_backward_pixel's flag
    int64_t goff[kBlock];
    gg.offsets(i0, n, goff);
    for (int64_t p = 0; p < kBlock; ++p) g[p] = p < n ? gp[goff[p]] : A(0);
    if (w.any()) weigh_gradients(w, i0, n, ys, valid, g);
    bool rows_done = false;
    if constexpr (vec) {
      if (lanes) {
        // A block read straight from the input (see for_each_block_direct) is written straight to the
        // output, which has the input's strides: no tile to copy out.
        if (std::is_same_v<T, A> && !up && static_cast<const void*>(x) == static_cast<const void*>(xp + offs[0])) {
          A* o = reinterpret_cast<A*>(y_out) + offs[0];
          tree_backward_lanes(x, ld, scr + V * kBlock, o, sC, ti, tr, ys, valid, k, gamma, eps, extrema, g);
          if (bad) nan_rows(o, sC, V, ys, valid, n, ignore_index);
          return;
        }
        tree_backward_lanes(x, ld, scr + V * kBlock, gtile, kBlock, ti, tr, ys, valid, k, gamma, eps, extrema, g);
        rows_done = true;
      }
    }
    if (!rows_done && !up) {  // the CUDA backwards without upsampling: G pixels at a time
      if (extrema)
        min_backward_groups<T, A>(x, ld, n, ys, valid, ignore_index, g, nodes.data(), ti, k, gamma, eps, gtile);
      else
        bce_backward_groups<T, A>(x, ld, n, ys, valid, ignore_index, g, nodes.data(), ti, k, gamma, eps, gtile);
      rows_done = true;
    }
    if (!rows_done) {  // (with upsampling, not forced: float64) one pixel at a time, as the CUDA kernel's
      // tree_backward_pixel's 2 bits per node, packed in 32-bit words, in the thread's spare scratch.
      uint32_t* bits = reinterpret_cast<uint32_t*>(scr + V * kBlock);
      A acc[kMaxDepth + 1];
      for (int64_t p = 0; p < n; ++p) {
        if (!valid[p]) {
          for (int v = 0; v < V; ++v) gtile[v * kBlock + p] = A(0);
          continue;
        }
        const cpu::StridedColumn<A> xc{x + p, ld};
        const NodeTable<A> nt{nodes.data()};
        const cpu::Scratch<A> sc{acc};
        const cpu::Scratch<uint32_t> sb{bits};
        const cpu::ColumnOut<A> o{gtile + p};
        // the upsampled CUDA backward's focal mode: kFocalAny
        tree_backward_pixel<A>(xc, nt, sc, sb, o, ti, static_cast<int>(ys[p]), k, gamma, eps, extrema, g[p]);
      }
    }
    if (bad) nan_rows(gtile, kBlock, V, ys, valid, n, ignore_index);
    if (up)
      cpu::scatter_upsampled<A>(acc, *up, i0, n, gtile);
    else
      cpu::scatter<T, A>(y_out, V, sC, offs, n, gtile);
  };
  if (up && cpu::pixel_path_forced()) {  // what the CUDA kernels run: banded, each row once, then gathered
    constexpr int G = lanes_for<T>();
    // a thread's depth slots (kMaxDepth + 1 Lanes) and node bits (tree_bit_words(V) Lanes), as the CUDA rows
    // kernel's shared memory (min_bwd_group_smem_bytes): whole Lanes, 16-byte aligned (float64's two lanes of node
    // bits take 16 bytes, not 2 x 4)
    const int64_t slot_vals = (kMaxDepth + 1) * int64_t(sizeof(Lanes<A, G>) / sizeof(A));
    const int64_t bit_vals = (tree_bit_words(V) * int64_t(sizeof(Lanes<uint32_t, G>)) + sizeof(A) - 1) / sizeof(A);
    cpu::up_backward_bands<G, T, A>(*up, y_out, out.strides().data(), slot_vals + bit_vals, [&](A* scr) {
      const LocalLanes<A, G> acc{reinterpret_cast<Lanes<A, G>*>(scr)};
      const LocalLanes<uint32_t, G> bits{reinterpret_cast<Lanes<uint32_t, G>*>(scr + slot_vals)};
      return [&, acc, bits](int64_t rr, int64_t X0, int64_t n, A* p, int64_t sc) {
        // the group's labels and upstream gradients as the CUDA rows kernel's load_group_rows
        int y[G];
        bool v[G], bad[G];
        A gl[G];
        for (int j = 0; j < G; ++j) {
          const int64_t q = rr * up->W + X0 + j;
          const int64_t yj = j < n ? tgt[gt.offset(q)] : ignore_index;
          const LabelKind kind = label_kind(yj, L, ignore_index);
          v[j] = kind == kLabelValid;
          bad[j] = kind == kLabelBad;
          y[j] = v[j] ? static_cast<int>(yj) : 0;
          gl[j] = j < n ? gp[gg.offset(q)] : A(0);
          if (v[j] && w.any()) {
            const A cy = w.of_class(y[j]);
            gl[j] *= w.pw ? cy * w.pw[w.gw.offset(q)] : cy;
          }
        }
        const UpLanes<T, A, G> col = up_lanes<T, A, G>(xp, sC, up->geom, rr, X0, n);
        const ScratchLanes<A, G> o{p, sc};
        const NodeTable<A> nt{nodes.data()};
        with_focal_mode(gamma, eps, [&](auto f) {
          constexpr int kF = decltype(f)::value;
          if (extrema)  // as the CUDA kernel: the top-down pass reads the kept values back (UpLanesKept)
            tree_min_backward_group<kF, A, G>(UpLanesKept<T, A, G>{col, p, sc}, nt, acc, bits, o, ti, y, v, bad, k,
                                              gamma, eps, gl);
          else
            tree_bce_backward_group<kF, A, G>(col, nt, o, ti, y, v, bad, k, gamma, eps, gl);
        });
      };
    });
  } else if (up) {
    cpu::for_each_upsampled_run<T, A>(xp, *up, gx, scratch, body);
  } else {
    cpu::for_each_block_direct<T, A>(xp, V, sC, gx, P, scratch, body);
  }
}

at::Tensor tree_min_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D,
                            double gamma, double eps, int64_t ignore_index, bool extrema, int64_t upsample,
                            bool align_corners, const std::optional<at::Tensor>& class_weight,
                            const std::optional<at::Tensor>& pixel_weight) {
  check_tree_min("tree_min_bwd", logits, target, tree_index, node_weights, L, D, upsample);
  check_grad("tree_min_bwd", grad, logits, target);
  check_weights("tree_min_bwd", class_weight, pixel_weight, logits, target, L);
  const at::Tensor x = dense_logits(logits);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tree_min_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const PixelWeights<A> w = pixel_weights<A>(class_weight, pixel_weight);
    if (!upsample) {
      tree_min_bwd_cpu_impl<scalar_t>(grad, x, target, tree_index, node_weights, L, D, gamma, eps, ignore_index,
                                      extrema, out, w, nullptr, nullptr);
      return;
    }
    const cpu::Upsample<A> up(x.sizes().data(), x.strides().data(), target.size(1), target.size(2), align_corners);
    // the banded pixel path (cpu::up_backward_bands) writes out itself; the row passes scatter into acc
    const bool banded = cpu::pixel_path_forced();
    at::Tensor acc = banded ? at::Tensor() : at::zeros(x.sizes(), x.options().dtype(acc_type(x)));
    tree_min_bwd_cpu_impl<scalar_t>(grad, x, target, tree_index, node_weights, L, D, gamma, eps, ignore_index,
                                    extrema, out, w, &up, banded ? nullptr : acc.data_ptr<A>());
    if (!banded) out.copy_(acc);
  });
  return out;
}

}  // namespace
}  // namespace hss

TORCH_LIBRARY_IMPL(hss_kernels, CPU, m) {
  m.impl("tree_min_fwd", &hss::tree_min_fwd_cpu);
  m.impl("tree_min_bwd", &hss::tree_min_bwd_cpu);
}
