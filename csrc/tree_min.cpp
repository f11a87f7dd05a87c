// Focal tree-min loss (MATH.md §3) and the multi-label tree BCE (§4): op schemas and the CPU
// implementation. One pair of ops serves both: `extrema` true routes every node's term through the
// min over its ancestors (target path) or the max over its descendants (elsewhere), false is plain BCE.
//
// tree_loss_fwd(logits (N, V, H, W), target (N, H, W) int64, tree_index int32 (4V + L*D, see
//               hss_kernels/native.py), node_weights (V,), num_leaves, depth, gamma, eps, ignore_index,
//               per_pixel, extrema)
//   -> loss: (N, H, W) per pixel if per_pixel, else the 0-dim sum; float32/float64,
//      count: 0-dim int64, the number of non-ignored pixels. A label neither ignore_index nor in
//      [0, L) gives a NaN loss (counted) and a NaN gradient row, never a table read (hss_math.h).
// tree_loss_bwd(grad (0-dim or (N, H, W)), logits, target, tree_index, node_weights, num_leaves, depth,
//               gamma, eps, ignore_index, extrema) -> grad_logits, same dtype and strides as logits.
// The backward needs no saved statistics: the extrema are recomputed from the logits it reads anyway.
#include "ops.h"
#include "cpu_loop.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <type_traits>

namespace hss {
namespace {

using cpu::kBlock;

// The float path of a block: the tree walks (which node's logit each term uses, where its gradient
// goes) run per pixel, then the focal terms, which cost the transcendental functions, run with the
// pixels innermost so that the compiler vectorises them. hss_math.h's focal() is the per-pixel form.

// Focal loss of a positive-class logit z and its derivative, as focal() but branch-free for the
// vectoriser (vexp/vlog; log1p(e) as log(u) corrected by the rounding of u = 1 + e). G is the focal
// case (0, 1, 2: gamma 0, 1, 2 by products; 3: any gamma), E whether eps > 0: fixed per loop.
template <int G, bool E>
__attribute__((always_inline)) inline void vfocal(float z, float gamma, float eps, float* loss, float* dloss) {
  const float az = std::fabs(z);
  const float e = cpu::vexp(-az);
  const float u = 1.0f + e;
  const float l1 = cpu::vlog(u) - ((u - 1.0f) - e) / u;
  const float log_q = std::min(z, 0.0f) - l1;
  const float inv = 1.0f / u;
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
  *dloss = gamma * q * fw * log_p - fw * dlog_p;
}

inline int focal_case(float gamma) { return gamma == 0.0f ? 0 : gamma == 1.0f ? 1 : gamma == 2.0f ? 2 : 3; }

// Z(v) = the positive-class logit of node v's term: the ancestors' min on the target path, minus the
// descendants' max elsewhere (tree-min), or +-x_v (BCE).
template <typename X, typename O>
void tree_terms(const X& x, const TreeIndex& t, int y, bool extrema, const O& Z) {
  if (!extrema) {
    for (int v = 0; v < t.V; ++v) Z(v, t.on_path(v, y) ? x(v) : -x(v));
    return;
  }
  float cur = INFINITY;
  for (int d = 0; d < t.D; ++d) {
    const int v = t.path[y * t.D + d];
    if (v < 0) break;
    cur = hmin(cur, x(v));  // as tree_forward_pixel: a NaN logit makes the term NaN (std::min dropped it)
    Z(v, cur);
  }
  for (int v = 0; v < t.V; ++v)
    if (!t.on_path(v, y)) Z(v, -x(subtree_argmax<float>(x, t, v)));
}

// K(u) = +-(sum of k_v over the terms whose extremum is u), negative off the target path, and
// Z(u) = +-x_u: the gradient at u is g * K(u) * focal'(Z(u)) (see tree_backward_pixel).
template <typename X, typename O>
void tree_routes(const X& x, const TreeIndex& t, int y, bool extrema, const float* k, float* K, const O& Z) {
  if (!extrema) {
    for (int v = 0; v < t.V; ++v) K[v * kBlock] = k[v];
  } else {
    for (int v = 0; v < t.V; ++v) K[v * kBlock] = 0.0f;
    float cur = INFINITY;
    int arg = -1;
    for (int d = 0; d < t.D; ++d) {
      const int v = t.path[y * t.D + d];
      if (v < 0) break;
      const float z = x(v);
      if (d == 0 || z < cur) {  // see tree_backward_pixel: never K[-1] on a +inf/NaN logit
        cur = z;
        arg = v;
      }
      K[arg * kBlock] += k[v];
    }
    for (int v = 0; v < t.V; ++v)
      if (!t.on_path(v, y)) K[subtree_argmax<float>(x, t, v) * kBlock] += k[v];
  }
  for (int u = 0; u < t.V; ++u) {
    const bool on = t.on_path(u, y);
    Z(u, on ? x(u) : -x(u));
    if (!on) K[u * kBlock] = -K[u * kBlock];
  }
}

template <int G, bool E>
__attribute__((always_inline)) inline void focal_rows(const float* zt, const float* k, int V, float gamma, float eps,
                                                      float* acc) {
  for (int v = 0; v < V; ++v) {
    const float kv = k[v];
    const float* z = zt + v * kBlock;
    for (int64_t p = 0; p < kBlock; ++p) {
      float l, dl;
      vfocal<G, E>(z[p], gamma, eps, &l, &dl);
      acc[p] += kv * l;
    }
  }
}

template <int G, bool E>
__attribute__((always_inline)) inline void dfocal_rows(const float* zt, const float* Kt, const float* gl, int V,
                                                       float gamma, float eps, float* gtile) {
  for (int v = 0; v < V; ++v) {
    const float* z = zt + v * kBlock;
    const float* K = Kt + v * kBlock;
    float* o = gtile + v * kBlock;
    for (int64_t p = 0; p < kBlock; ++p) {
      float l, dl;
      vfocal<G, E>(z[p], gamma, eps, &l, &dl);
      o[p] = gl[p] * K[p] * dl;
    }
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

HSS_LANES_TARGETS void tree_forward_lanes(const float* tile, float* zt, int64_t n, const TreeIndex& t,
                                          const int64_t* ys, const bool* valid, const float* k, float gamma,
                                          float eps, bool extrema, float* loss) {
  for (int64_t p = 0; p < kBlock; ++p) {
    if (p < n && valid[p]) {
      tree_terms(cpu::Column<float>{tile + p}, t, static_cast<int>(ys[p]), extrema, cpu::ColumnOut<float>{zt + p});
    } else {
      for (int v = 0; v < t.V; ++v) zt[v * kBlock + p] = 0.0f;
    }
  }
  alignas(64) float acc[kBlock];
  for (int64_t p = 0; p < kBlock; ++p) acc[p] = 0.0f;
  HSS_FOCAL_CASES(focal_rows, gamma, eps, zt, k, t.V, gamma, eps, acc);
  for (int64_t p = 0; p < n; ++p) loss[p] = acc[p];
}

HSS_LANES_TARGETS void tree_backward_lanes(const float* tile, float* gtile, float* zt, float* Kt, int64_t n,
                                           const TreeIndex& t, const int64_t* ys, const bool* valid, const float* k,
                                           float gamma, float eps, bool extrema, const float* g) {
  alignas(64) float gl[kBlock];
  for (int64_t p = 0; p < kBlock; ++p) {
    const bool ok = p < n && valid[p];
    gl[p] = ok ? g[p] : 0.0f;
    if (ok) {
      tree_routes(cpu::Column<float>{tile + p}, t, static_cast<int>(ys[p]), extrema, k, Kt + p,
                  cpu::ColumnOut<float>{zt + p});
    } else {
      for (int v = 0; v < t.V; ++v) {
        Kt[v * kBlock + p] = 0.0f;
        zt[v * kBlock + p] = 0.0f;
      }
    }
  }
  HSS_FOCAL_CASES(dfocal_rows, gamma, eps, zt, Kt, gl, t.V, gamma, eps, gtile);
}

// Labels of a block (ignore_index past its end); valid = neither ignored nor out of range.
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

template <typename T>
void tree_fwd_cpu_impl(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tree_index,
                       const at::Tensor& node_weights, int64_t L, int64_t D, double gamma_, double eps_,
                       int64_t ignore_index, bool extrema, at::Tensor& loss, bool per_pixel, at::Tensor& count) {
  using A = at::opmath_type<T>;
  const int V = logits.size(1);
  const int64_t P = target.numel();
  const PixelGeom gx = geom(logits), gt = geom(target);
  const TreeIndex ti = unpack_tree(tree_index.data_ptr<int32_t>(), V, L, D);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const A* k = node_weights.data_ptr<A>();
  const A gamma = static_cast<A>(gamma_), eps = static_cast<A>(eps_);
  A* lp = per_pixel ? loss.data_ptr<A>() : nullptr;
  const int64_t nb = (P + cpu::kBlock - 1) / cpu::kBlock;
  std::vector<double> part(nb, 0.0);
  std::vector<int64_t> cnt(nb, 0);
  cpu::for_each_block<T, A>(logits.data_ptr<T>(), V, logits.stride(1), gx, P, V * kBlock,
                            [&](int64_t i0, int64_t n, const int64_t*, const A* tile, A* scratch) {
    int64_t ys[kBlock];
    bool valid[kBlock];
    A lane_loss[kBlock];
    char bad = 0;
    block_labels(tgt, gt, i0, n, L, ignore_index, ys, valid, &bad);
    constexpr bool lanes = std::is_same_v<A, float>;
    if constexpr (lanes)
      tree_forward_lanes(tile, scratch, n, ti, ys, valid, k, gamma, eps, extrema, lane_loss);
    double s = 0;
    int64_t c = 0;
    for (int64_t p = 0; p < n; ++p) {
      A l = A(0);
      if (valid[p]) {
        l = lanes ? lane_loss[p]
                  : tree_forward_pixel<A>(cpu::Column<A>{tile + p}, ti, static_cast<int>(ys[p]), k, gamma, eps,
                                          extrema);
        s += l;
        ++c;
      } else if (label_kind(ys[p], L, ignore_index) == kLabelBad) {
        l = quiet_nan<A>();  // see hss_math.h
        s += l;
        ++c;
      }
      if (lp) lp[i0 + p] = l;
    }
    part[i0 / kBlock] = s;
    cnt[i0 / kBlock] = c;
  });
  cpu::finish_reduction<A>(part, cnt, per_pixel ? nullptr : loss.data_ptr<A>(), count.data_ptr<int64_t>());
}

std::tuple<at::Tensor, at::Tensor> tree_loss_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     const at::Tensor& tree_index, const at::Tensor& node_weights,
                                                     int64_t L, int64_t D, double gamma, double eps,
                                                     int64_t ignore_index, bool per_pixel, bool extrema) {
  check_tree("tree_loss_fwd", logits, target, tree_index, node_weights, L, D);
  at::Tensor loss, count;
  std::tie(loss, count) = new_loss(logits, per_pixel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tree_loss_fwd_cpu", [&] {
    tree_fwd_cpu_impl<scalar_t>(logits, target, tree_index, node_weights, L, D, gamma, eps, ignore_index, extrema,
                                loss, per_pixel, count);
  });
  return {loss, count};
}

template <typename T>
void tree_bwd_cpu_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                       const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D,
                       double gamma_, double eps_, int64_t ignore_index, bool extrema, at::Tensor& out) {
  using A = at::opmath_type<T>;
  const int V = logits.size(1);
  const int64_t P = target.numel();
  const PixelGeom gx = geom(logits), gt = geom(target), gg = grad_geom(grad, logits);
  const TreeIndex ti = unpack_tree(tree_index.data_ptr<int32_t>(), V, L, D);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const A* gp = grad.data_ptr<A>();
  const A* k = node_weights.data_ptr<A>();
  const A gamma = static_cast<A>(gamma_), eps = static_cast<A>(eps_);
  const int64_t sC = logits.stride(1);
  T* y_out = out.data_ptr<T>();
  // Thread scratch: the gradient tile (V, kBlock), then the float path's term and route tiles (or the V
  // accumulators of tree_backward_pixel).
  cpu::for_each_block<T, A>(logits.data_ptr<T>(), V, sC, gx, P, 3 * V * kBlock,
                            [&](int64_t i0, int64_t n, const int64_t* offs, const A* tile, A* scratch) {
    A* gtile = scratch;
    int64_t ys[kBlock];
    bool valid[kBlock];
    A g[kBlock];
    char bad = 0;
    block_labels(tgt, gt, i0, n, L, ignore_index, ys, valid, &bad);
    int64_t goff[kBlock];
    gg.offsets(i0, n, goff);
    for (int64_t p = 0; p < n; ++p) g[p] = gp[goff[p]];
    if constexpr (std::is_same_v<A, float>) {
      tree_backward_lanes(tile, gtile, scratch + V * kBlock, scratch + 2 * V * kBlock, n, ti, ys, valid, k, gamma,
                          eps, extrema, g);
    } else {
      A* K = scratch + V * kBlock;
      for (int64_t p = 0; p < n; ++p) {
        if (!valid[p]) {
          for (int v = 0; v < V; ++v) gtile[v * kBlock + p] = A(0);
          continue;
        }
        tree_backward_pixel<A>(cpu::Column<A>{tile + p}, cpu::Scratch<A>{K}, cpu::ColumnOut<A>{gtile + p}, ti,
                               static_cast<int>(ys[p]), k, gamma, eps, extrema, g[p]);
      }
    }
    if (bad)  // NaN rows for bad labels (see hss_math.h)
      for (int64_t p = 0; p < n; ++p)
        if (label_kind(ys[p], L, ignore_index) == kLabelBad)
          for (int v = 0; v < V; ++v) gtile[v * kBlock + p] = quiet_nan<A>();
    cpu::scatter<T, A>(y_out, V, sC, offs, n, gtile);
  });
}

at::Tensor tree_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D,
                             double gamma, double eps, int64_t ignore_index, bool extrema) {
  check_tree("tree_loss_bwd", logits, target, tree_index, node_weights, L, D);
  check_grad("tree_loss_bwd", grad, logits);
  const at::Tensor x = dense_logits(logits);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tree_loss_bwd_cpu", [&] {
    tree_bwd_cpu_impl<scalar_t>(grad, x, target, tree_index, node_weights, L, D, gamma, eps, ignore_index, extrema,
                                out);
  });
  return out;
}

}  // namespace
}  // namespace hss

TORCH_LIBRARY_FRAGMENT(hss_kernels, m) {
  m.def("tree_loss_fwd(Tensor logits, Tensor target, Tensor tree_index, Tensor node_weights, int num_leaves, "
        "int depth, float gamma, float eps, int ignore_index, bool per_pixel, bool extrema) -> (Tensor, Tensor)");
  m.def("tree_loss_bwd(Tensor grad, Tensor logits, Tensor target, Tensor tree_index, Tensor node_weights, "
        "int num_leaves, int depth, float gamma, float eps, int ignore_index, bool extrema) -> Tensor");
}

TORCH_LIBRARY_IMPL(hss_kernels, CPU, m) {
  m.impl("tree_loss_fwd", &hss::tree_loss_fwd_cpu);
  m.impl("tree_loss_bwd", &hss::tree_loss_bwd_cpu);
}
