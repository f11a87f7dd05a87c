// Per-pixel math of the focal tree-min loss (docs/MATH.md §3) and of the multi-label tree BCE (§4.1),
// which share one kernel family: `extrema` true routes every node's term through the min over its
// ancestors (target path) or the max over its descendants (elsewhere), false is plain BCE. Shared by
// the CPU loops (csrc/cpu/tree_min.cpp) and the CUDA kernels (csrc/cuda/tree_min.cu, tree_min_up.cu): the
// CUDA kernels, the CPU's float64 path and, with HSS_CPU_PIXEL_PATH=1 (cpu/loop.h), its float path call the group
// functions (G pixels at a time; with fused upsampling through upsample_math.h's UpLanes) as they are, and
// the CPU's float64 path with upsampling tree_forward_pixel and tree_backward_pixel; the CPU's row passes keep the same tie rules (§3.7)
// and NaN rule (§5.3).
//
// A pixel costs O(V): one pass over the nodes in reverse pre-order with a running maximum per depth
// (plus, for the gradient, one pass in pre-order), and a walk of at most D steps down the label's path.
// Per-pixel state is D + 1 values of a per-depth scratch and, for the tree-min gradient, 2 bits per
// node; nothing of size V in the accumulation type.
//
// Every function works on one pixel, reading channel c through an accessor `x(c)` as the accumulation
// type A.
#pragma once

#include "common.h"
#include "upsample_math.h"

#include <string.h>

#include <type_traits>

namespace hss {

// NaN logits. One rule on every backend and device: a NaN logit anywhere in a labelled pixel's channels
// gives that pixel a NaN loss and a NaN gradient row (ignored pixels stay 0). The hierarchical softmax
// needs nothing for it: every term and every gradient entry goes through lse, which the NaN reaches
// through the sum of exponentials. The tree losses reach a NaN only through the nodes it touches (a max
// or min skips it on a GPU, whose max.f32/min.f32 drop NaN), so their node pass keeps a flag
// `nan |= z != z` over the channels it reads anyway.

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

// The focal term with gamma and eps known at compile time: kFocalAny is `focal` itself (any gamma and
// eps, read at run time); kFocalG0 (gamma = 0) and kFocalG2 (gamma = 2), both with eps = 0, are the
// defaults of the tree BCE and of the tree-min (HSSN). They take three special functions per node,
// e = 2^(-|z| log2 e), log2(1 + e) and 1 / (1 + e), with q = sigma(z), s = sigma(-z) = 1 - q and
// -log q = max(-z, 0) + ln 2 log2(1 + e):
//   gamma = 0: loss = -log q,      dloss = -s
//   gamma = 2: loss = -s^2 log q,  dloss = -s^2 (2 q (-log q) + s)
// On a GPU and for float they are the hardware's approximations (ex2/lg2/rcp.approx, as the Triton kernel
// uses); everywhere else the library functions, so that the CPU (HSS_CPU_PIXEL_PATH=1) checks the formula.
// One node per iteration of the group pass (the body is G pixels wide already).
#ifdef __CUDACC__
#define HSS_NO_UNROLL _Pragma("unroll 1")
#else
#define HSS_NO_UNROLL
#endif

enum FocalMode { kFocalAny = 0, kFocalG0 = 1, kFocalG2 = 2 };

// The mode a call's options select. float64 always takes the general formula: its speed does not matter
// (gradcheck, references), and one instantiation of each kernel instead of three keeps the build smaller.
template <typename A>
inline int focal_mode(A gamma, A eps) {
  if constexpr (std::is_same_v<A, double>) return kFocalAny;
  return eps > A(0) || eps < A(0) ? kFocalAny : gamma == A(0) ? kFocalG0 : gamma == A(2) ? kFocalG2 : kFocalAny;
}

// Host code: runs f(std::integral_constant<int, kF>{}) with kF = focal_mode(gamma, eps), the instantiation of a
// group function (or kernel) for a call's options; the CUDA launchers and the CPU pixel path pick alike.
template <typename A, typename F>
inline void with_focal_mode(A gamma, A eps, F&& f) {
  if constexpr (std::is_same_v<A, double>) {
    f(std::integral_constant<int, kFocalAny>{});
  } else {
    const int mode = focal_mode(gamma, eps);
    if (mode == kFocalG2)
      f(std::integral_constant<int, kFocalG2>{});
    else if (mode == kFocalG0)
      f(std::integral_constant<int, kFocalG0>{});
    else
      f(std::integral_constant<int, kFocalAny>{});
  }
}

template <typename A>
HSS_HOST_DEVICE inline A habs(A v) { return v < A(0) ? -v : v; }
#ifdef __CUDA_ARCH__
HSS_HOST_DEVICE inline float habs(float v) { return fabsf(v); }
#endif

template <int kF, typename A>
HSS_HOST_DEVICE inline void focal_k(A z, A gamma, A eps, A* loss, A* dloss) {
  if constexpr (kF == kFocalAny) {
    focal(z, gamma, eps, loss, dloss);
  } else {
    const A log2e = A(1.4426950408889634), ln2 = A(0.6931471805599453);
    if constexpr (kF == kFocalG0) {
      const A e = fast_exp2(-habs(z) * log2e);
      const A p = A(1) + e;
      *loss = hmax(-z, A(0)) + ln2 * fast_log2(p);  // -log q
      if (dloss) {
        const A r = fast_rcp(p);
        *dloss = z >= A(0) ? -(e * r) : -r;  // -s
      }
    } else {
      // e' = e^z, s = 1 / (1 + e'), -log q = log(1 + e') - z, with z clamped at 87 (e' stays finite in float;
      // past it the term and its derivative are below 1e-113, 0 in float) and a NaN z kept (min_nan). The
      // cancellation in -log q for large z is multiplied by s^2 (tiny).
      const A zc = min_nan(z, A(87));
      if (!dloss) {
        const A ez = fast_exp2(zc * log2e);
        const A p = A(1) + ez;
        const A s = fast_rcp(p);
        const A nlq = ln2 * fast_log2(p) - zc;
        *loss = s * s * nlq;
      } else {
        // With the derivative: e2 = 2 e' straight from the exponential (2^(z log2 e + 1), one FMA as the
        // product was), so that 2 q = e2 s costs one multiply: dloss = -s^2 (e2 s (-log q) + s).
        const A e2 = fast_exp2(zc * log2e + A(1));
        const A p = e2 * A(0.5) + A(1);
        const A s = fast_rcp(p);
        const A nlq = ln2 * fast_log2(p) - zc;
        const A s2 = s * s;
        *loss = s2 * nlq;
        *dloss = -(s2 * ((e2 * s) * nlq + s));
      }
    }
  }
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

// What the node passes read at pre-order position p: the channel c = dfs_order[p], its depth, its
// subtree size (desc-or-self(c) is positions [p, p + size)) and its weight k_c. Built once per call
// (CPU) or per block into shared memory (CUDA), so that a node costs one broadcast read, not a chain of
// dependent table loads.
template <typename A>
struct alignas(16) TreeNode {
  int c, depth, size;
  A k;
};

template <typename A>
HSS_HOST_DEVICE inline TreeNode<A> tree_node(const TreeIndex& t, const A* k, int p) {
  TreeNode<A> n;
  n.c = t.dfs_order[p];
  n.depth = t.depth[n.c];
  n.size = t.size[n.c];
  n.k = k[n.c];
  return n;
}

// The node table in pre-order: nodes(p).
template <typename A>
struct NodeTable {
  const TreeNode<A>* p;
  HSS_HOST_DEVICE inline const TreeNode<A>& operator()(int i) const { return p[i]; }
};

// The label's leaf: the last valid entry of its path row.
HSS_HOST_DEVICE inline int path_leaf(const TreeIndex& t, int y) {
  int leaf = 0;
  for (int d = 0; d < t.D; ++d) {  // sm90: trips=PATH_ITERS
    const int v = t.path[y * t.D + d];
    if (v < 0) break;
    leaf = v;
  }
  return leaf;
}

// Tree-min (extrema = true) or multi-label BCE (extrema = false) loss of one pixel with label y.
// `nodes` is the pre-order node table, `acc(s)` a scratch of D + 1 values (slot s for depth s + 1).
//
// Tree-min: the on-path terms come from a walk down the path with a running minimum (a strict <
// keeps the shallower node on ties). The off-path terms come from one pass over the nodes in reverse
// pre-order with a running maximum per depth: acc(d) holds the maximum M of the finished children of
// the open node at depth d, so a node at depth d has M_v = max(x_v, acc(d)), clears acc(d) and folds
// M_v into acc(d - 1). v is on the path iff pos(v) <= pos(leaf) < pos(v) + size(v). The same pass
// keeps the NaN flag. The tree BCE makes the same pass without the maxima.
template <typename A, int kF = kFocalAny, typename X, typename N, typename S>
HSS_HOST_DEVICE inline A tree_forward_pixel(const X& x, const N& nodes, const S& acc, const TreeIndex& t, int y,
                                            const A* k, A gamma, A eps, bool extrema) {
  A loss = A(0), l;
  int leaf = 0;
  if (extrema) {
    A cur = static_cast<A>(INFINITY);
    for (int d = 0; d < t.D; ++d) {  // sm90: trips=PATH_ITERS
      const int v = t.path[y * t.D + d];
      if (v < 0) break;
      leaf = v;
      cur = hmin(cur, x(v));
      focal_k<kF>(cur, gamma, eps, &l, (A*)nullptr);
      loss += k[v] * l;
    }
    for (int s = 0; s <= t.D; ++s) acc(s) = neg_inf<A>();  // sm90: trips=D + 1
  } else {
    leaf = path_leaf(t, y);
  }
  const int lp = t.dfs_pos[leaf];
  bool nan = false;
  for (int p = t.V - 1; p >= 0; --p) {  // sm90: trips=V
    const TreeNode<A> n = nodes(p);
    const A z = x(n.c);
    nan |= z != z;
    const bool on = p <= lp && lp < p + n.size;
    if (extrema) {
      A& below = acc(n.depth);
      const A m = hmax(z, below);
      below = neg_inf<A>();
      A& here = acc(n.depth - 1);
      here = hmax(here, m);
      focal_k<kF>(-m, gamma, eps, &l, (A*)nullptr);
      loss += on ? A(0) : n.k * l;
    } else {
      focal_k<kF>(on ? z : -z, gamma, eps, &l, (A*)nullptr);
      loss += n.k * l;
    }
  }
  return nan ? quiet_nan<A>() : loss;
}

// G pixels of one thread ("lanes"): G = 16 / sizeof(T) for logits of type T, so that on NCHW one
// 16-byte load brings a channel of all G pixels (float: 4, bfloat16/float16: 8, double: 2).
template <typename T>
HSS_HOST_DEVICE constexpr int lanes_for() { return 16 / static_cast<int>(sizeof(T)) > 0 ? 16 / static_cast<int>(sizeof(T)) : 1; }

template <typename A, int G>
struct alignas(16) Lanes {
  A v[G];
};

// bfloat16 logits two lanes to a 32-bit word (lane 2i in the low half, lane 2i + 1 in the high half), for the
// tree-min backward's bottom-up pass, which only takes maxima and compares: exact on the bfloat16 values
// (the float of a bfloat16 is the same number), one instruction per two lanes on the GPU (max.NaN.bf16x2,
// set.ge.u32.bf16x2: 0xffff in each half where it holds), the same per half through float on the CPU.
HSS_HOST_DEVICE inline float bf16_half_as_float(uint32_t u, int half) {
  const uint32_t b = half ? (u & 0xffff0000u) : (u << 16);
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
#endif
}
HSS_HOST_DEVICE inline uint32_t bf16x2_max_nan(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r;
  asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  uint32_t r = 0;
  for (int h = 0; h < 2; ++h) {
    const float x = bf16_half_as_float(a, h), y = bf16_half_as_float(b, h);
    const uint32_t pick = x != x || y != y ? 0x7fffu : ((x > y ? a : b) >> (16 * h)) & 0xffffu;
    r |= pick << (16 * h);
  }
  return r;
#endif
}
HSS_HOST_DEVICE inline uint32_t bf16x2_ge(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r;
  asm("set.ge.u32.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  return (bf16_half_as_float(a, 0) >= bf16_half_as_float(b, 0) ? 0x0000ffffu : 0u) |
         (bf16_half_as_float(a, 1) >= bf16_half_as_float(b, 1) ? 0xffff0000u : 0u);
#endif
}
HSS_HOST_DEVICE inline bool bf16_half_is_nan(uint32_t u, int half) {
  return ((u >> (16 * half)) & 0x7fffu) > 0x7f80u;
}

// Whether an accessor X loads bfloat16 pairs (X::kBf16Pairs and x.load_pairs(c, Lanes<uint32_t, G / 2>&)).
template <typename X, typename = void>
struct Bf16Pairs {
  static constexpr bool value = false;
};
template <typename X>
struct Bf16Pairs<X, decltype(void(X::kBf16Pairs))> {
  static constexpr bool value = X::kBf16Pairs;
};

// Whether an accessor X keeps what its load gave for a later pass (X::kReload and x.reload(c, out): the same
// values, read back instead of computed again; upsample_math.h UpLanesKept).
template <typename X, typename = void>
struct Reloads {
  static constexpr bool value = false;
};
template <typename X>
struct Reloads<X, decltype(void(X::kReload))> {
  static constexpr bool value = X::kReload;
};

// The depth slots acc(s) (Lanes of G values) seen as H = G / 2 bfloat16 pairs, their first 4 H bytes.
template <typename S, int H>
struct SlotPairs {
  S acc;
  HSS_HOST_DEVICE Lanes<uint32_t, H>& operator()(int s) const {
    return *reinterpret_cast<Lanes<uint32_t, H>*>(&acc(s));
  }
};

// Stops the compiler from moving memory accesses across it: the depth slots change type between the passes
// of tree_min_backward_group (bfloat16 pairs, then float weights).
HSS_HOST_DEVICE inline void memory_fence_compiler() {
#if defined(__CUDA_ARCH__) || defined(__GNUC__)
  asm volatile("" ::: "memory");
#endif
}

// 1 / v for v in [1, 2^126) with FMAs only (no special-function instruction): the exponent-flip estimate
// (relative error below 1/8) and two cubic Newton steps, r (1 + e + e^2) with e = 1 - v r (error cubed
// each: below 1e-8, then the steps' rounding).
HSS_HOST_DEVICE inline float rcp_fma(float v) {
#ifdef __CUDA_ARCH__
  float r = __uint_as_float(0x7ef311c3u - __float_as_uint(v));
#else
  uint32_t b;
  memcpy(&b, &v, sizeof(b));
  b = 0x7ef311c3u - b;
  float r;
  memcpy(&r, &b, sizeof(r));
#endif
  for (int i = 0; i < 2; ++i) {
    const float e = fmaf(-v, r, 1.f);
    r = fmaf(r, fmaf(e, e, e), r);
  }
  return r;
}

// The focal losses of two lanes' logits u0, u1 (focal_k without the derivative). gamma = 2: one reciprocal
// for both, 1 / (p0 p1), so two special functions per lane and a half (the forward's bound on the GPU is its
// special-function unit), the exponent clamped at 43 instead of 87 so that p0 p1 <= (1 + e^43)^2 stays finite
// (past 43 a term is below 1e-56, 0 in float, either way); kFma: that reciprocal with FMAs (rcp_fma), none
// of the unit's. Otherwise focal_k per lane.
template <int kF, bool kFma, typename A>
HSS_HOST_DEVICE inline void focal_pair(A u0, A u1, A gamma, A eps, A* l0, A* l1) {
  if constexpr (kF == kFocalG2 && std::is_same<A, float>::value) {
    const A log2e = A(1.4426950408889634), ln2 = A(0.6931471805599453);
    // hmin: a NaN lane's exponent is 43 (its loss becomes NaN by the NaN rule): never a NaN in the other's
    const A zc0 = hmin(u0, A(43)), zc1 = hmin(u1, A(43));
    const A p0 = A(1) + fast_exp2(zc0 * log2e), p1 = A(1) + fast_exp2(zc1 * log2e);
    const A pp = p0 * p1;
    const A r = kFma ? rcp_fma(pp) : fast_rcp(pp);
    const A s0 = p1 * r, s1 = p0 * r;
    *l0 = s0 * s0 * (ln2 * fast_log2(p0) - zc0);
    *l1 = s1 * s1 * (ln2 * fast_log2(p1) - zc1);
  } else {
    focal_k<kF>(u0, gamma, eps, l0, (A*)nullptr);
    focal_k<kF>(u1, gamma, eps, l1, (A*)nullptr);
  }
}

// tree_forward_pixel for G pixels at once, in the same order of operations per pixel (so the same
// loss up to the focal mode's formula): each node-table entry and each depth slot is read once for the
// G pixels. The tree-min with bfloat16 lanes (an accessor with kBf16Pairs) takes the maxima on bfloat16 pairs
// and the terms two lanes at a time (focal_pair). x.load(c, out) fills
// out.v[j] with channel c of lane j, x(c, j) reads one value (the path walks); acc(s) is the slot of
// depth s + 1 for the G lanes (D + 1 Lanes). y[j] is lane j's label, a valid leaf id: the caller puts 0
// in lanes it will discard. loss[j] gets lane j's loss (NaN for a NaN logit, §5.3).
template <int kF, bool kExtrema, typename A, int G, typename X, typename N, typename S>
HSS_HOST_DEVICE inline void tree_forward_group(const X& x, const N& nodes, const S& acc, const TreeIndex& t,
                                               const int* y, const A* k, A gamma, A eps, A* loss) {
  int lp[G];
  A l;
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    loss[j] = A(0);
    int leaf = 0;
    if constexpr (kExtrema) {
      A cur = static_cast<A>(INFINITY);
      for (int d = 0; d < t.D; ++d) {  // sm90: trips=PATH_ITERS
        const int v = t.path[y[j] * t.D + d];
        if (v < 0) break;
        leaf = v;
        cur = hmin(cur, x(v, j));
        focal_k<kF>(cur, gamma, eps, &l, (A*)nullptr);
        loss[j] += k[v] * l;
      }
    } else {
      leaf = path_leaf(t, y[j]);
    }
    lp[j] = t.dfs_pos[leaf];
  }
  if constexpr (kExtrema && Bf16Pairs<X>::value) {
    // bfloat16 lanes: the maxima as bfloat16 pairs (as tree_min_backward_group's bottom-up pass), each pair's
    // two terms through focal_pair (pair 0's reciprocal with FMAs: fewer special functions).
    constexpr int H = G / 2;
    static_assert(G % 2 == 0, "tree_forward_group: bfloat16 lanes in pairs");
    const SlotPairs<S, H> pairs{acc};
    Lanes<uint32_t, H> ninf;
    HSS_UNROLL
    for (int i = 0; i < H; ++i) ninf.v[i] = 0xff80ff80u;
    for (int s = 0; s <= t.D; ++s) pairs(s) = ninf;  // sm90: trips=D + 1
    HSS_NO_UNROLL
    for (int p = t.V - 1; p >= 0; --p) {  // sm90: trips=V
      const TreeNode<A> n = nodes(p);
      Lanes<uint32_t, H> z;
      x.load_pairs(n.c, z);
      const Lanes<uint32_t, H> below = pairs(n.depth);
      pairs(n.depth) = ninf;
      Lanes<uint32_t, H> here = pairs(n.depth - 1);
      HSS_UNROLL
      for (int i = 0; i < H; ++i) {
        const uint32_t m = bf16x2_max_nan(z.v[i], below.v[i]);
        here.v[i] = bf16x2_max_nan(here.v[i], m);
        A l0, l1;
        if (i == 0)
          focal_pair<kF, true>(-bf16_half_as_float(m, 0), -bf16_half_as_float(m, 1), gamma, eps, &l0, &l1);
        else
          focal_pair<kF, false>(-bf16_half_as_float(m, 0), -bf16_half_as_float(m, 1), gamma, eps, &l0, &l1);
        if (static_cast<unsigned>(lp[2 * i] - p) >= static_cast<unsigned>(n.size)) loss[2 * i] += n.k * l0;
        if (static_cast<unsigned>(lp[2 * i + 1] - p) >= static_cast<unsigned>(n.size)) loss[2 * i + 1] += n.k * l1;
      }
      pairs(n.depth - 1) = here;
    }
    const Lanes<uint32_t, H> top = pairs(0);
    HSS_UNROLL
    for (int j = 0; j < G; ++j)
      if (bf16_half_is_nan(top.v[j / 2], j % 2)) loss[j] = quiet_nan<A>();
  } else {
    Lanes<A, G> ninf;
    HSS_UNROLL
    for (int j = 0; j < G; ++j) ninf.v[j] = neg_inf<A>();
    if constexpr (kExtrema)
      for (int s = 0; s <= t.D; ++s) acc(s) = ninf;  // sm90: trips=D + 1
    HSS_NO_UNROLL
    for (int p = t.V - 1; p >= 0; --p) {  // sm90: trips=V
      const TreeNode<A> n = nodes(p);
      Lanes<A, G> z;
      x.load(n.c, z);
      if constexpr (kExtrema) {
        const Lanes<A, G> below = acc(n.depth);
        acc(n.depth) = ninf;
        Lanes<A, G> here = acc(n.depth - 1);
        HSS_UNROLL
        for (int j = 0; j < G; ++j) {
          const A m = max_nan(z.v[j], below.v[j]);
          here.v[j] = max_nan(here.v[j], m);
          focal_k<kF>(-m, gamma, eps, &l, (A*)nullptr);
          // p <= lp < p + size, in one unsigned comparison
          const bool on = static_cast<unsigned>(lp[j] - p) < static_cast<unsigned>(n.size);
          if (!on) loss[j] += n.k * l;  // a predicated add
        }
        acc(n.depth - 1) = here;
      } else {
        HSS_UNROLL
        for (int j = 0; j < G; ++j) {
          const bool on = static_cast<unsigned>(lp[j] - p) < static_cast<unsigned>(n.size);
          focal_k<kF>(on ? z.v[j] : -z.v[j], gamma, eps, &l, (A*)nullptr);
          loss[j] += n.k * l;
        }
      }
    }
    // The NaN rule (§5.3): the maxima propagate NaN (max_nan) and every node folds into slot 0, so slot 0 is
    // NaN iff a logit is. The BCE needs no flag: every logit reaches the loss through its own term, and a
    // NaN there gives a NaN term.
    if constexpr (kExtrema) {
      const Lanes<A, G> top = acc(0);
      HSS_UNROLL
      for (int j = 0; j < G; ++j)
        if (top.v[j] != top.v[j]) loss[j] = quiet_nan<A>();
    }
  }
}

// The tree BCE's gradient (tree_backward_pixel with extrema false) for G pixels at once, in the same
// order of operations per pixel: one pass in pre-order; node u of lane j gets
// g[j] * k_u * (on ? f'(x_u) : -f'(-x_u)). x as in tree_forward_group; out.store(c, v, lanes) writes
// channel c of the lanes that exist; y[j] a valid leaf id (0 in lanes to discard); valid[j] false gives lane
// j the unlabelled row, 0 or (bad[j]) NaN, whatever its logits. A lane with a NaN logit gets a NaN row
// (§5.3): its NaN-propagating maximum of the logits is NaN, and the row is rewritten (cold).
template <int kF, typename A, int G, typename X, typename N, typename O>
HSS_HOST_DEVICE inline void tree_bce_backward_group(const X& x, const N& nodes, const O& out, const TreeIndex& t,
                                                    const int* y, const bool* valid, const bool* bad, const A* k,
                                                    A gamma, A eps, const A* g) {
  int lp[G];
  A big[G], none[G];
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    lp[j] = t.dfs_pos[path_leaf(t, y[j])];
    big[j] = neg_inf<A>();
    none[j] = bad[j] ? quiet_nan<A>() : A(0);
  }
  A l, dl;
  HSS_NO_UNROLL
  for (int p = 0; p < t.V; ++p) {  // sm90: trips=V
    const TreeNode<A> n = nodes(p);
    Lanes<A, G> z, o;
    x.load(n.c, z);
    HSS_UNROLL
    for (int j = 0; j < G; ++j) {
      big[j] = max_nan(big[j], z.v[j]);
      const bool on = static_cast<unsigned>(lp[j] - p) < static_cast<unsigned>(n.size);
      focal_k<kF>(on ? z.v[j] : -z.v[j], gamma, eps, &l, &dl);
      const A v = g[j] * n.k * (on ? dl : -dl);
      o.v[j] = valid[j] ? v : none[j];
    }
    out.store(n.c, o);
  }
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    if (valid[j] && big[j] != big[j]) {  // sm90: cold
      for (int c = 0; c < t.V; ++c) out.store_lane(c, j, quiet_nan<A>());  // sm90: trips=V
    }
  }
}

// Words of packed node bits the tree-min backward needs per pixel: 2 bits per node, 16 nodes a word.
HSS_HOST_DEVICE inline int tree_bit_words(int V) { return (V + 15) / 16; }

// Gradient of g * loss with respect to the V node logits; `out(c, v)` stores it. Every node u gets
// g * K_u * f'(x_u) on the path and -g * K_u * f'(-x_u) off it (docs/MATH.md §3.6), with K_u the sum of
// the weights k_v of the terms whose extremum is u (0 skips the focal: exactly 0).
//
// Tree-min scratch: `acc(s)`, D + 1 values; `bits(w)`, tree_bit_words(V) 32-bit words.
// * bottom-up (reverse pre-order), the forward's running maxima; for each node two bits: selfwin
//   (x_v >= the maximum of its children, always for a leaf: v is its own subtree's argmax) and cand
//   (M_v >= the maximum of its later siblings, before folding it in). The argmax child of a parent is
//   then its first child in pre-order with cand set: ties go to the earliest in pre-order.
// * top-down (pre-order): acc(d) is the weight the open node at depth d still owes its winning child.
//   Node u takes its parent's owed weight if cand(u) (clearing it), adds k_u off the path, keeps it
//   all if selfwin(u) (K_u) or else owes it on; u's off-path gradient is written in the same step.
// * the path: one walk down it (registers, fully unrolled) keeps the running argmin (strict <, the
//   first node always taken); a path node that sets a new minimum receives its own k and those of the
//   deeper path nodes up to the next new minimum, summed in depth order.
template <typename A, int kF = kFocalAny, typename X, typename N, typename S, typename B, typename O>
HSS_HOST_DEVICE inline void tree_backward_pixel(const X& x, const N& nodes, const S& acc, const B& bits, const O& out,
                                                const TreeIndex& t, int y, const A* k, A gamma, A eps, bool extrema,
                                                A g) {
  A l, dl;
  bool nan = false;
  if (!extrema) {
    const int lp = t.dfs_pos[path_leaf(t, y)];
    for (int p = 0; p < t.V; ++p) {  // sm90: trips=V
      const TreeNode<A> n = nodes(p);
      const A z = x(n.c);
      nan |= z != z;
      const bool pos = p <= lp && lp < p + n.size;
      focal_k<kF>(pos ? z : -z, gamma, eps, &l, &dl);
      out(n.c, g * n.k * (pos ? dl : -dl));
    }
  } else {
    // The path, in registers: channel, logit, whether it sets a new minimum, and the running sum of
    // k from the last new minimum down to it.
    int pv[kMaxDepth];
    A pz[kMaxDepth], run[kMaxDepth];
    bool arg[kMaxDepth];
    int np = 0, leaf = 0;
    A cur = static_cast<A>(INFINITY);
    HSS_UNROLL
    for (int d = 0; d < kMaxDepth; ++d) {  // sm90: trips=PATH_ITERS
      if (d >= t.D) break;
      const int v = t.path[y * t.D + d];
      if (v < 0) break;
      const A z = x(v);
      // d == 0 takes the root-side node whatever its value (a +inf or NaN logit there included).
      const bool a = d == 0 || z < cur;
      cur = a ? z : cur;
      const A before = d > 0 ? run[d > 0 ? d - 1 : 0] : A(0);
      run[d] = a ? k[v] : before + k[v];
      pv[d] = v;
      pz[d] = z;
      arg[d] = a;
      np = d + 1;
      leaf = v;
    }
    const int lp = t.dfs_pos[leaf];
    // bottom-up: maxima and the two bits per node
    for (int s = 0; s <= t.D; ++s) acc(s) = neg_inf<A>();  // sm90: trips=D + 1
    uint32_t w = 0;
    for (int p = t.V - 1; p >= 0; --p) {  // sm90: trips=V
      const TreeNode<A> n = nodes(p);
      const A z = x(n.c);
      nan |= z != z;
      A& below = acc(n.depth);
      const A ch = below;
      below = neg_inf<A>();
      const A m = hmax(z, ch);
      A& here = acc(n.depth - 1);
      const uint32_t b = (z >= ch ? 1u : 0u) | (m >= here ? 2u : 0u);
      here = hmax(here, m);
      w |= b << (2 * (p & 15));
      if ((p & 15) == 0) {
        bits(p >> 4) = w;
        w = 0;
      }
    }
    // top-down: owed weights, off-path gradients
    for (int s = 0; s <= t.D; ++s) acc(s) = A(0);  // sm90: trips=D + 1
    HSS_NO_UNROLL
    for (int p = 0; p < t.V; ++p) {  // sm90: trips=V
      if ((p & 15) == 0) w = bits(p >> 4);
      const TreeNode<A> n = nodes(p);
      const uint32_t b = w >> (2 * (p & 15));
      A& parent = acc(n.depth - 1);
      const A in = (b & 2u) ? parent : A(0);
      parent = (b & 2u) ? A(0) : parent;
      const bool on = p <= lp && lp < p + n.size;
      const A owed = on ? A(0) : in + n.k;
      const bool self = (b & 1u) != 0;
      acc(n.depth) = self ? A(0) : owed;
      const A ku = self ? owed : A(0);
      const A z = x(n.c);
      focal_k<kF>(-z, gamma, eps, &l, &dl);
      if (!on) out(n.c, ku != A(0) ? g * ku * -dl : A(0));
    }
    // the path nodes: K_u is the run of the last node before the next new minimum
    A kk = A(0);
    HSS_UNROLL
    for (int d = kMaxDepth - 1; d >= 0; --d) {  // sm90: trips=PATH
      if (d < np) {
        kk = (d + 1 >= np || arg[d + 1 < kMaxDepth ? d + 1 : d]) ? run[d] : kk;
        const A ku = arg[d] ? kk : A(0);
        focal_k<kF>(pz[d], gamma, eps, &l, &dl);
        out(pv[d], ku != A(0) ? g * ku * dl : A(0));
      }
    }
  }
  if (nan) {  // sm90: cold
    for (int v = 0; v < t.V; ++v) out(v, quiet_nan<A>());  // sm90: trips=V
  }
}

// The tree-min gradient (tree_backward_pixel with extrema true) for G pixels at once (G even), the same rules
// and sums per pixel: each node-table entry, each depth slot and each word of node bits is read once for the
// G lanes, and each channel is one x.load / out.store of the G lanes (one 16-byte access on NCHW).
// * bottom-up (reverse pre-order), 16 nodes (one word) at a time: the maxima per depth, acc(s) a Lanes slot
//   of depth s + 1 (D + 1), and each lane's two bits per node (selfwin, cand: as tree_backward_pixel). The
//   bits of 16 nodes lo .. lo + 15 and two lanes 2i, 2i + 1 share a word (node lo + b at bit b for lane 2i,
//   bit 16 + b for lane 2i + 1): bits(w).v[i] the selfwin words, bits(w).v[G / 2 + i] the cand words
//   (tree_bit_words(V) Lanes of uint32_t), so that a node's bit is one AND with a mask shared by the lanes.
//   bfloat16 lanes (an accessor with kBf16Pairs) keep the maxima as bfloat16 pairs in the slots (the same
//   numbers: a maximum of bfloat16 values is one of them) and take a pair's bits with one max / compare.
//   The maxima propagate NaN (max_nan) into slot 0, which is then NaN iff a lane's logit is (§5.3).
// * the path, per labelled lane: its nodes get selfwin set, and lanes that are not labelled get every
//   selfwin cleared. A path node then owes nothing to its children and takes no off-path weight from
//   its parent (an on-path parent's slot is 0), so the pass needs no on-path test: what it writes to a
//   path node's channel is overwritten by the path walk below, and an unlabelled lane writes its row's
//   value (0, or NaN for a bad label) everywhere.
// * top-down (pre-order), a word at a time: the owed weights in acc, every node's off-path gradient written
//   for the G lanes, with selects only; its logits read again through x.load, or (an accessor with kReload)
//   x.reload, which gives back what the bottom-up pass's x.load gave.
// * the path, per lane: one walk down it keeps the running argmin (strict <, the first node always
//   taken) and the sum of k since the last new minimum, in depth order; when a new minimum is set (and
//   at the path's end) the previous one's gradient is stored (store_lane), and each other path node gets
//   its 0, overwriting what the pass wrote.
// y[j] a valid leaf id (0 in lanes to discard); valid[j] false gives lane j the unlabelled row, 0 or
// (bad[j]) NaN; g[j] lane j's upstream gradient.
template <int kF, typename A, int G, typename X, typename N, typename S, typename B, typename O>
HSS_HOST_DEVICE inline void tree_min_backward_group(const X& x, const N& nodes, const S& acc, const B& bits,
                                                    const O& out, const TreeIndex& t, const int* y, const bool* valid,
                                                    const bool* bad, const A* k, A gamma, A eps, const A* g) {
  static_assert(G % 2 == 0, "tree_min_backward_group: G lanes in pairs");
  constexpr int H = G / 2;
  constexpr bool kPairs = Bf16Pairs<X>::value;
  uint32_t ws[H], wc[H];
  Lanes<A, G> zero;
  HSS_UNROLL
  for (int i = 0; i < H; ++i) ws[i] = wc[i] = 0;
  HSS_UNROLL
  for (int j = 0; j < G; ++j) zero.v[j] = A(0);
  const int nw = tree_bit_words(t.V);
  bool nan[G];
  if constexpr (kPairs) {
    // The slots as bfloat16 pairs (their first 16 bytes); -inf is 0xff80.
    const SlotPairs<S, H> pairs{acc};
    Lanes<uint32_t, H> ninf;
    HSS_UNROLL
    for (int i = 0; i < H; ++i) ninf.v[i] = 0xff80ff80u;
    for (int s = 0; s <= t.D; ++s) pairs(s) = ninf;  // sm90: trips=D + 1
    for (int wi = nw - 1; wi >= 0; --wi) {  // sm90: trips=cdiv(V, 16)
      const int lo = wi * 16, hi = t.V < lo + 16 ? t.V : lo + 16;
      HSS_NO_UNROLL
      for (int p = hi - 1; p >= lo; --p) {  // sm90: trips=V / cdiv(V, 16)
        const TreeNode<A> n = nodes(p);
        const uint32_t kb = 0x00010001u << (p - lo);
        Lanes<uint32_t, H> z;
        x.load_pairs(n.c, z);
        const Lanes<uint32_t, H> below = pairs(n.depth);
        pairs(n.depth) = ninf;
        Lanes<uint32_t, H> here = pairs(n.depth - 1);
        HSS_UNROLL
        for (int i = 0; i < H; ++i) {
          const uint32_t m = bf16x2_max_nan(z.v[i], below.v[i]);
          ws[i] |= bf16x2_ge(z.v[i], below.v[i]) & kb;
          wc[i] |= bf16x2_ge(m, here.v[i]) & kb;
          here.v[i] = bf16x2_max_nan(here.v[i], m);
        }
        pairs(n.depth - 1) = here;
      }
      Lanes<uint32_t, G> word;
      HSS_UNROLL
      for (int i = 0; i < H; ++i) {
        word.v[i] = ws[i];
        word.v[H + i] = wc[i];
        ws[i] = wc[i] = 0;
      }
      bits(wi) = word;
    }
    const Lanes<uint32_t, H> top = pairs(0);
    HSS_UNROLL
    for (int j = 0; j < G; ++j) nan[j] = valid[j] && bf16_half_is_nan(top.v[j / 2], j % 2);
    memory_fence_compiler();
  } else {
    Lanes<A, G> ninf;
    HSS_UNROLL
    for (int j = 0; j < G; ++j) ninf.v[j] = neg_inf<A>();
    for (int s = 0; s <= t.D; ++s) acc(s) = ninf;  // sm90: trips=D + 1
    for (int wi = nw - 1; wi >= 0; --wi) {  // sm90: trips=cdiv(V, 16)
      const int lo = wi * 16, hi = t.V < lo + 16 ? t.V : lo + 16;
      HSS_NO_UNROLL
      for (int p = hi - 1; p >= lo; --p) {  // sm90: trips=V / cdiv(V, 16)
        const TreeNode<A> n = nodes(p);
        const uint32_t kl = 1u << (p - lo), kh = kl << 16;
        Lanes<A, G> z;
        x.load(n.c, z);
        const Lanes<A, G> below = acc(n.depth);
        acc(n.depth) = ninf;
        Lanes<A, G> here = acc(n.depth - 1);
        HSS_UNROLL
        for (int j = 0; j < G; ++j) {
          const A ch = below.v[j];
          const A m = max_nan(z.v[j], ch);
          const uint32_t kj = j % 2 ? kh : kl;
          ws[j / 2] |= z.v[j] >= ch ? kj : 0u;
          wc[j / 2] |= m >= here.v[j] ? kj : 0u;
          here.v[j] = max_nan(here.v[j], m);
        }
        acc(n.depth - 1) = here;
      }
      Lanes<uint32_t, G> word;
      HSS_UNROLL
      for (int i = 0; i < H; ++i) {
        word.v[i] = ws[i];
        word.v[H + i] = wc[i];
        ws[i] = wc[i] = 0;
      }
      bits(wi) = word;
    }
    const Lanes<A, G> top = acc(0);
    HSS_UNROLL
    for (int j = 0; j < G; ++j) nan[j] = valid[j] && top.v[j] != top.v[j];
  }
  // A lane with a NaN logit (§5.3) gets the NaN row from the top-down pass, as a bad label does: no selfwin, and
  // no path walk. live: the lanes with a gradient to compute; vmask: their selfwin bits.
  uint32_t live = 0;  // bit j (one register through the passes)
  A none[G];          // what a lane's channel gets when it has no gradient: 0, or NaN
  uint32_t vmask[H];
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    live |= valid[j] && !nan[j] ? 1u << j : 0u;
    none[j] = bad[j] || nan[j] ? quiet_nan<A>() : A(0);
  }
#ifdef __CUDA_ARCH__
  asm("" : "+r"(live));  // one word through the passes, not G predicates (ptxas spilled those)
#endif
  HSS_UNROLL
  for (int i = 0; i < H; ++i)
    vmask[i] = ((live >> (2 * i)) & 1u ? 0x0000ffffu : 0u) | ((live >> (2 * i + 1)) & 1u ? 0xffff0000u : 0u);
  // A labelled lane's path nodes: selfwin (see above).
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    if (!((live >> j) & 1u)) continue;
    for (int d = 0; d < t.D; ++d) {  // sm90: trips=PATH_ITERS
      const int v = t.path[y[j] * t.D + d];
      if (v < 0) break;
      const int p = t.dfs_pos[v];
      bits(p >> 4).v[j / 2] |= 1u << ((p & 15) + 16 * (j % 2));
    }
  }
  for (int s = 0; s <= t.D; ++s) acc(s) = zero;  // sm90: trips=D + 1
  A l, dl;
  for (int wi = 0; wi < nw; ++wi) {  // sm90: trips=cdiv(V, 16)
    Lanes<uint32_t, G> word = bits(wi);
    HSS_UNROLL
    for (int i = 0; i < H; ++i) word.v[i] &= vmask[i];
    const int lo = wi * 16, hi = t.V < lo + 16 ? t.V : lo + 16;
    HSS_NO_UNROLL
    for (int p = lo; p < hi; ++p) {  // sm90: trips=V / cdiv(V, 16)
      const TreeNode<A> n = nodes(p);
      const uint32_t kl = 1u << (p - lo), kh = kl << 16;
      Lanes<A, G> z, own, o;
      if constexpr (Reloads<X>::value)
        x.reload(n.c, z);  // what the bottom-up pass loaded
      else
        x.load(n.c, z);
      Lanes<A, G> parent = acc(n.depth - 1);
      HSS_UNROLL
      for (int j = 0; j < G; ++j) {
        const uint32_t kj = j % 2 ? kh : kl;
        const bool self = (word.v[j / 2] & kj) != 0, cand = (word.v[H + j / 2] & kj) != 0;
        const A in = cand ? parent.v[j] : A(0);
        parent.v[j] = cand ? A(0) : parent.v[j];
        const A owed = in + n.k;
        own.v[j] = self ? A(0) : owed;
        focal_k<kF>(-z.v[j], gamma, eps, &l, &dl);
        const A v = g[j] * owed * -dl;
        // an unlabelled lane has no selfwin: its row's value; K_u = 0 skips the focal (exactly 0)
        o.v[j] = self && owed != A(0) ? v : none[j];
      }
      acc(n.depth - 1) = parent;
      acc(n.depth) = own;
      out.store(n.c, o);
    }
  }
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    if (!((live >> j) & 1u)) continue;
    // the path nodes: K_u, the sum of k from a new minimum u down to the node before the next one
    int cv = 0;
    A cz = A(0), cur = A(0), kk = A(0);
    for (int d = 0; d < t.D; ++d) {  // sm90: trips=PATH_ITERS
      const int v = t.path[y[j] * t.D + d];
      if (v < 0) break;
      const A z = x(v, j);
      // d == 0 takes the root-side node whatever its value (a +inf or NaN logit there included).
      if (d == 0 || z < cur) {
        if (d > 0) {
          focal_k<kF>(cz, gamma, eps, &l, &dl);
          out.store_lane(cv, j, kk != A(0) ? g[j] * kk * dl : A(0));
        }
        cv = v;
        cz = z;
        cur = z;
        kk = k[v];
      } else {
        kk += k[v];
        out.store_lane(v, j, A(0));
      }
    }
    focal_k<kF>(cz, gamma, eps, &l, &dl);
    out.store_lane(cv, j, kk != A(0) ? g[j] * kk * dl : A(0));
  }
}

}  // namespace hss
