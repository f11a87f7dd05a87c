// Hierarchical softmax loss (docs/MATH.md §2): the CPU implementation of hierarchical_softmax_fwd and
// hierarchical_softmax_bwd (schemas and contracts in csrc/ops.cpp). Float inputs run the lane loops
// below; float64, bad labels, far groups and HSS_CPU_PIXEL_PATH=1 run the per-pixel code of
// hierarchical_softmax_math.h, as the CUDA kernels do (with HSS_CPU_PIXEL_PATH=1, float types and trees up to
// kPackedDepth deep, its V-pixel functions, also with fused upsampling: forward_vec, up_forward_vec and the
// lanes rows of the banded backward). Class and pixel weights (common.h PixelWeights,
// docs/MATH.md §6.6) touch no path's inner loops: the forward multiplies each labelled pixel's loss by its
// weight where the block's losses are summed, the backward its upstream gradient before any path runs.
#include "checks.h"
#include "hierarchical_softmax_math.h"
#include "loop.h"
#include "vmath.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>

namespace hss {
namespace {

using cpu::kBlock;

// The float path runs a block in chunks of 16 pixels ("lanes"), one GCC vector each, with every
// running max and sum of the chunk held in registers across the channel loop (D is a template
// argument for that); the per-level bookkeeping is hierarchical_softmax_math.h's. Channel c of lane p is
// z[c * ld + p]: the input itself or a gathered tile. gy[d][p] is lane p's group at depth d (-1 for a
// lane that is ignored or past the block's end, which then matches nothing).
// The helpers on these types are always inlined into the multiversioned functions, so GCC's note that
// passing a 64-byte vector by value depends on AVX-512 (-Wpsabi) concerns no real call.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int kV = 16;

__attribute__((always_inline)) inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline vi vload(const int32_t* p) {
  vi v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
__attribute__((always_inline)) inline vf vsplat(float x) { return vf{} + x; }
__attribute__((always_inline)) inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// cpu::vexp on a vector (same clamp, polynomial and rounding, so the same values lane by lane).
__attribute__((always_inline)) inline vf vexp16(vf v) {
  v = v < vsplat(-87.0f) ? vsplat(-87.0f) : v;
  v = v > vsplat(88.0f) ? vsplat(88.0f) : v;
  const vf n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vf r = v - n * 0.693359375f + n * 2.12194440e-4f;
  const vf r2 = r * r;
  const vf p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                 1.6666665459e-1f) * r + 5.0000001201e-1f) * r2 + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Returns false, having written nothing, when a lane has a group far below its max (see
// kShareShift): the caller runs the per-pixel path. The lane loops of this one are left to the
// auto-vectoriser, which does better here than vector types with per-depth register arrays.
HSS_LANES_TARGETS bool hierarchical_softmax_forward_lanes(const float* tile, int64_t ld, int64_t n, int L, int D, const int32_t* group,
                                         const int32_t (*gy)[kBlock], const bool* valid, const float* w, float eps,
                                         float* st, int64_t P, int64_t i0, float* loss) {
  alignas(64) float m[kBlock], s[kBlock], e[kBlock], gmax[kMaxDepth][kBlock], gsum[kMaxDepth][kBlock];
  for (int64_t p = 0; p < kBlock; ++p) {
    m[p] = neg_inf<float>();
    s[p] = 0.f;
  }
  for (int d = 0; d < D; ++d)
    for (int64_t p = 0; p < kBlock; ++p) {
      gmax[d][p] = neg_inf<float>();
      gsum[d][p] = 0.f;
    }
  for (int c = 0; c < L; ++c) {
    const float* z = tile + c * ld;
    for (int64_t p = 0; p < kBlock; ++p) m[p] = z[p] > m[p] ? z[p] : m[p];
    for (int d = 0; d < D; ++d) {
      const int32_t gc = group[d * L + c];
      const int32_t* g = gy[d];
      float* gm = gmax[d];
      for (int64_t p = 0; p < kBlock; ++p) {
        const float hi = z[p] > gm[p] ? z[p] : gm[p];
        gm[p] = g[p] == gc ? hi : gm[p];
      }
    }
  }
  for (int64_t p = 0; p < n; ++p)
    for (int d = 0; d < D; ++d)
      if (valid[p] && gmax[d][p] < m[p] - float(kShareShift)) return false;
  for (int c = 0; c < L; ++c) {
    const float* z = tile + c * ld;
    for (int64_t p = 0; p < kBlock; ++p) {
      e[p] = cpu::vexp(z[p] - m[p]);
      s[p] += e[p];
    }
    for (int d = 0; d < D; ++d) {
      const int32_t gc = group[d * L + c];
      const int32_t* g = gy[d];
      float* gs = gsum[d];
      for (int64_t p = 0; p < kBlock; ++p) gs[p] += e[p] * static_cast<float>(g[p] == gc);
    }
  }
  for (int64_t p = 0; p < n; ++p) {
    if (!valid[p]) continue;
    float shift[kMaxDepth], sums[kMaxDepth];
    for (int d = 0; d < D; ++d) {
      shift[d] = m[p];
      sums[d] = gsum[d][p];
    }
    loss[p] = hierarchical_softmax_finish(m[p], s[p], shift, sums, D, w, eps, st + i0 + p, P);
  }
  return true;
}

template <int D>
__attribute__((always_inline)) inline void hierarchical_softmax_backward_chunks(const float* z, int64_t ld, float* o, int64_t ldo,
                                                               int L, const int32_t* group,
                                                               const int32_t (*gy)[kBlock], const float* lse,
                                                               const float* a, const float (*coef)[kBlock],
                                                               const int32_t* live) {
  for (int64_t q = 0; q < kBlock; q += kV) {
    vi g[D];
    vf cf[D];
    for (int d = 0; d < D; ++d) {
      g[d] = vload(gy[d] + q);
      cf[d] = vload(coef[d] + q);
    }
    const vf l = vload(lse + q), av = vload(a + q);
    const vi on = vload(live + q);
    for (int c = 0; c < L; ++c) {
      vf k = av;
      for (int d = 0; d < D; ++d) k -= g[d] == group[d * L + c] ? cf[d] : vsplat(0.f);
      // a select, not a product with 0: an ignored lane's logits may be NaN or inf
      vstore(o + c * ldo + q, on != 0 ? vexp16(vload(z + c * ld + q) - l) * k : vsplat(0.f));
    }
  }
}

// The backward of a block, lanes innermost, into o[c * ldo + p]; `g` is each lane's upstream gradient.
// Returns false, having written nothing, when a lane needs exp(z - b_d) computed on its own (see
// hierarchical_softmax_backward_coefs).
HSS_LANES_TARGETS bool hierarchical_softmax_backward_lanes(const float* z, int64_t ld, float* o, int64_t ldo, int64_t n, int L, int D,
                                          const int32_t* group, const int32_t (*gy)[kBlock], const bool* valid,
                                          const float* w, float eps, const float* st, int64_t P, int64_t i0,
                                          const float* g) {
  alignas(64) float lse[kBlock], a[kBlock], coef[kMaxDepth][kBlock];
  alignas(64) int32_t live[kBlock];
  for (int64_t p = 0; p < kBlock; ++p) {
    a[p] = 0.f;
    lse[p] = 0.f;
    live[p] = p < n && valid[p] ? -1 : 0;
    for (int d = 0; d < D; ++d) coef[d][p] = 0.f;
    if (p >= n || !valid[p]) continue;
    float cf[kMaxDepth], base[kMaxDepth];
    bool own[kMaxDepth];
    a[p] = hierarchical_softmax_backward_coefs(st + i0 + p, P, D, w, eps, g[p], cf, base, own);
    lse[p] = st[i0 + p];
    for (int d = 0; d < D; ++d) {
      if (own[d]) return false;
      coef[d][p] = cf[d];
    }
  }
  switch (D) {
#define HSS_CASE(k) \
  case k: hierarchical_softmax_backward_chunks<k>(z, ld, o, ldo, L, group, gy, lse, a, coef, live); break;
    HSS_CASE(1) HSS_CASE(2) HSS_CASE(3) HSS_CASE(4) HSS_CASE(5) HSS_CASE(6) HSS_CASE(7) HSS_CASE(8)
#undef HSS_CASE
  }
  return true;
}

// HSS_CPU_PIXEL_PATH=1 with float types and trees up to kPackedDepth deep: what the CUDA kernels' NCHW
// path runs, V = 16 / sizeof(T) pixels at a time (hierarchical_softmax_forward_pixels and
// hierarchical_softmax_backward_pixels), here over lanes q0 .. q0 + n - 1 of a tile, the last group of a
// block partial (lanes past n read 0 and are not computed).
template <int V>
struct TileLanes {
  const float* p;
  int64_t ld;
  int n;
  void load(float (&z)[V]) const {
    for (int k = 0; k < V; ++k) z[k] = k < n ? p[k] : 0.f;
  }
  void next() { p += ld; }
  float at(int k, int64_t c) const { return p[c * ld + k]; }
};

template <int V>
struct TileLanesOut {
  float* p;
  int64_t ld;
  int n;
  void store(const float (&v)[V]) const {
    for (int k = 0; k < n; ++k) p[k] = v[k];
  }
  void next() { p += ld; }
};

template <typename T>
constexpr int vec_width() { return static_cast<int>(16 / sizeof(T)); }

// The forward of a block's valid pixels into loss[p], V at a time (see TileLanes).
template <int V>
void forward_vec(const float* tile, int64_t ld, int64_t n, int L, int D, const int32_t* group, const bool* valid,
                 const int64_t* ys, const float* w, float eps, float* st, int64_t P, int64_t i0, float* loss) {
  const LeafGroupRows rows{group, L, D};
  for (int64_t q0 = 0; q0 < n; q0 += V) {
    const int cnt = static_cast<int>(std::min<int64_t>(V, n - q0));
    int y[V];
    float l[V];
    for (int k = 0; k < V; ++k) y[k] = k < cnt && valid[q0 + k] ? static_cast<int>(ys[q0 + k]) : -1;
    const unsigned far = hierarchical_softmax_forward_pixels<V, float>(TileLanes<V>{tile + q0, ld, cnt}, L, D, rows, y,
                                                                       w, eps, st + i0 + q0, P, l);
    for (int k = 0; k < cnt; ++k) {
      if (y[k] < 0) continue;
      loss[q0 + k] = far >> k & 1u ? hierarchical_softmax_forward_pixel<float>(
                                          cpu::StridedColumn<float>{tile + q0 + k, ld}, L, D, rows, y[k], w, eps,
                                          st + i0 + q0 + k, P)
                                    : l[k];
    }
  }
}

// The backward of a block into the gradient tile o (channel c of lane p at o[c * kBlock + p]), V at a time.
template <int V>
void backward_vec(const float* tile, int64_t ld, float* o, int64_t n, int L, int D, const int32_t* group,
                  const bool* valid, const int64_t* ys, int64_t ignore_index, const float* w, float eps,
                  const float* st, int64_t P, int64_t i0, const float* g) {
  const LeafGroupRows rows{group, L, D};
  for (int64_t q0 = 0; q0 < n; q0 += V) {
    const int cnt = static_cast<int>(std::min<int64_t>(V, n - q0));
    int y[V];
    float fill[V], gl[V];
    for (int k = 0; k < V; ++k) {
      const bool in = k < cnt;
      y[k] = in && valid[q0 + k] ? static_cast<int>(ys[q0 + k]) : -1;
      fill[k] = in && label_kind(ys[q0 + k], L, ignore_index) == kLabelBad ? quiet_nan<float>() : 0.f;
      gl[k] = in ? g[q0 + k] : 0.f;
    }
    const unsigned far = hierarchical_softmax_backward_pixels<V, float>(
        TileLanes<V>{tile + q0, ld, cnt}, TileLanesOut<V>{o + q0, kBlock, cnt}, L, D, rows, y, fill, w, eps,
        st + i0 + q0, P, gl);
    for (int k = 0; k < cnt; ++k)
      if (far >> k & 1u)
        hierarchical_softmax_backward_pixel<float>(cpu::StridedColumn<float>{tile + q0 + k, ld},
                                                   cpu::ColumnOut<float>{o + q0 + k}, L, D, rows, y[k], w, eps,
                                                   st + i0 + q0 + k, P, gl[k]);
  }
}

// HSS_CPU_PIXEL_PATH=1 with fused upsampling, float types and trees up to kPackedDepth deep: what the CUDA
// forward runs (hierarchical_softmax_fwd_up_lanes_kernel), G = 16 / sizeof(T) destination pixels of a row per
// group from the row's start, each channel interpolated through UpLanes, the far lanes again one pixel at a
// time through BilinearCol. A group the block shares with its neighbour runs with the lanes outside the block
// not computed (each lane's results are its own). The losses of the block's valid pixels into loss[p].
template <typename T>
void up_forward_vec(const T* x, int64_t sC, const UpsampleGeom<float>& u, int64_t i0, int64_t n, int L, int D,
                    const int32_t* group, const bool* valid, const int64_t* ys, const float* w, float eps, float* st,
                    int64_t P, float* loss) {
  constexpr int G = vec_width<T>();
  const LeafGroupRows rows{group, L, D};
  for (int64_t p = 0; p < n;) {
    const int64_t q = i0 + p, rr = q / u.W, X = q - rr * u.W, X0 = X / G * G;
    const int64_t gn = std::min<int64_t>(G, u.W - X0);      // the group's pixels
    const int64_t m = std::min<int64_t>(X0 + gn - X, n - p);  // those in the block, from X
    int y[G];
    for (int j = 0; j < G; ++j) {
      const int64_t pj = p + (X0 + j - X);
      const bool in = X0 + j >= X && X0 + j < X + m && valid[pj];
      y[j] = in ? static_cast<int>(ys[pj]) : -1;
    }
    const int64_t g0 = rr * u.W + X0;
    float l[G];
    const unsigned far = hierarchical_softmax_forward_pixels<G, float>(up_lanes<T, float, G>(x, sC, u, rr, X0, gn), L,
                                                                       D, rows, y, w, eps, st + g0, P, l);
    for (int64_t j = X - X0; j < X - X0 + m; ++j) {
      if (y[j] < 0) continue;
      loss[p + (j - (X - X0))] =
          far >> j & 1u ? hierarchical_softmax_forward_pixel<float>(bilinear_col<T, float>(x, sC, u.stencil(g0 + j)), L,
                                                                     D, rows, y[j], w, eps, st + g0 + j, P)
                        : l[j];
    }
    p += m;
  }
}

// Labels of a block: gy[d][p] (-1 where ignored or out of range, also past the block's end). Returns
// whether a lane holds a bad label (see common.h), which then takes the per-pixel path.
inline bool block_groups(const int64_t* tgt, const PixelGeom& gt, int64_t i0, int64_t n, int L, int D,
                         const int32_t* group, int64_t ignore_index, int32_t (*gy)[kBlock], bool* valid,
                         int64_t* ys) {
  int64_t toff[kBlock];
  gt.offsets(i0, n, toff);
  bool bad = false;
  for (int64_t p = 0; p < kBlock; ++p) {
    const int64_t y = p < n ? tgt[toff[p]] : ignore_index;
    const LabelKind kind = label_kind(y, L, ignore_index);
    valid[p] = kind == kLabelValid;
    bad |= kind == kLabelBad;
    ys[p] = y;
    for (int d = 0; d < D; ++d) gy[d][p] = valid[p] ? group[d * L + y] : -1;
  }
  return bad;
}

// The weights (common.h PixelWeights) of a block's valid lanes into wv[p]: cw[y] pw[i], pw read through
// its strides at the block's pixels (the target's, also with upsampling). Ignored and bad lanes are not
// read (wv[p] is left as it is).
template <typename A>
inline void block_weights(const PixelWeights<A>& wts, int64_t i0, int64_t n, const bool* valid, const int64_t* ys,
                          A* wv) {
  int64_t woff[kBlock];
  if (wts.pw) wts.gw.offsets(i0, n, woff);
  for (int64_t p = 0; p < n; ++p)
    if (valid[p]) wv[p] = wts.pw ? wts.of_class(ys[p]) * wts.pw[woff[p]] : wts.of_class(ys[p]);
}

template <typename T>
void hierarchical_softmax_fwd_cpu_impl(const at::Tensor& logits, const at::Tensor& target,
                                       const at::Tensor& leaf_group, const at::Tensor& level_weights, double eps_,
                                       int64_t ignore_index, at::Tensor& loss, bool per_pixel, at::Tensor& stats,
                                       at::Tensor& count, at::Tensor& weight_sum,
                                       const PixelWeights<at::opmath_type<T>>& wts,
                                       const cpu::Upsample<at::opmath_type<T>>* up) {
  using A = at::opmath_type<T>;
  const int L = logits.size(1), D = leaf_group.size(0);
  const int64_t P = target.numel();
  const PixelGeom gx = up ? geom(target) : geom(logits), gt = geom(target);
  const T* x = logits.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int32_t* group = leaf_group.data_ptr<int32_t>();
  const A* w = level_weights.data_ptr<A>();
  const A eps = static_cast<A>(eps_);
  A* st = stats.data_ptr<A>();
  A* lp = per_pixel ? loss.data_ptr<A>() : nullptr;
  const int64_t nb = (P + kBlock - 1) / kBlock;
  std::vector<double> part(nb, 0.0), wpart(wts.cw ? nb : 0, 0.0);
  std::vector<int64_t> cnt(nb, 0);
  const bool forced = cpu::pixel_path_forced();
  const bool weighted = wts.any();
  cpu::for_each_block_direct<T, A>(x, L, logits.stride(1), gx, P, 0,
                                   [&](int64_t i0, int64_t n, const int64_t*, const A* tile, int64_t ld, A*) {
    int32_t gy[kMaxDepth][kBlock];
    bool valid[kBlock];
    int64_t ys[kBlock];
    A lane_loss[kBlock], wv[kBlock];
    const bool bad = block_groups(tgt, gt, i0, n, L, D, group, ignore_index, gy, valid, ys);
    if (weighted) block_weights(wts, i0, n, valid, ys, wv);
    bool lanes = false;
    if constexpr (std::is_same_v<A, float>) {
      if (forced && !up && D <= kPackedDepth) {  // the CUDA kernels' NCHW path
        forward_vec<vec_width<T>()>(tile, ld, n, L, D, group, valid, ys, w, eps, st, P, i0, lane_loss);
        lanes = true;
      } else if (forced && up && D <= kPackedDepth) {  // the CUDA kernels' fused-upsampling lanes
        up_forward_vec<T>(x, logits.stride(1), up->geom, i0, n, L, D, group, valid, ys, w, eps, st, P, lane_loss);
        lanes = true;
      } else {
        lanes = !forced && !bad && hierarchical_softmax_forward_lanes(tile, ld, n, L, D, group, gy, valid, w, eps, st, P, i0, lane_loss);
      }
    }
    double s = 0, ws = 0;
    int64_t c = 0;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t i = i0 + p;
      A l = A(0);
      if (!valid[p]) {
        const bool counted = label_kind(ys[p], L, ignore_index) == kLabelBad;
        l = counted ? quiet_nan<A>() : A(0);  // a bad label: NaN (common.h)
        for (int d = 0; d <= D; ++d) st[d * P + i] = l;  // defined outputs, never read
        s += l;
        c += counted;
      } else {
        if (lanes)
          l = lane_loss[p];
        else if (up && forced)  // the CUDA kernels' one-pixel reads (float64, D > kPackedDepth): four source values
          l = hierarchical_softmax_forward_pixel<A>(bilinear_col<T, A>(x, logits.stride(1), up->geom.stencil(i)), L, D,
                                                    LeafGroups{group, L}, static_cast<int>(ys[p]), w, eps, st + i, P);
        else
          l = hierarchical_softmax_forward_pixel<A>(cpu::StridedColumn<A>{tile + p, ld}, L, D, LeafGroups{group, L},
                                                    static_cast<int>(ys[p]), w, eps, st + i, P);
        if (weighted) {
          l *= wv[p];
          if (wts.cw) ws += wts.cw[ys[p]];
        }
        s += l;
        ++c;
      }
      if (lp) lp[i] = l;
    }
    part[i0 / kBlock] = s;
    cnt[i0 / kBlock] = c;
    if (wts.cw) wpart[i0 / kBlock] = ws;
  }, up);
  cpu::finish_reduction<A>(part, cnt, per_pixel ? nullptr : loss.data_ptr<A>(), count.data_ptr<int64_t>());
  // The "mean"'s denominator: the class weights' fixed-order sum, or the count.
  double wsum = 0;
  for (const double v : wpart) wsum += v;
  *weight_sum.data_ptr<A>() = wts.cw ? static_cast<A>(wsum) : static_cast<A>(*count.data_ptr<int64_t>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hierarchical_softmax_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& leaf_group, const at::Tensor& level_weights,
    double eps, int64_t ignore_index, bool per_pixel, int64_t upsample, bool align_corners,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& pixel_weight) {
  const int64_t D = check_hierarchical_softmax("hierarchical_softmax_fwd", logits, target, leaf_group,
                                               level_weights, upsample);
  check_weights("hierarchical_softmax_fwd", class_weight, pixel_weight, logits, target, logits.size(1));
  at::Tensor loss, count;
  std::tie(loss, count) = new_loss(logits, target, per_pixel);
  at::Tensor weight_sum = new_weight_sum(logits);
  at::Tensor stats = at::empty({D + 1, target.size(0), target.size(1), target.size(2)},
                               logits.options().dtype(acc_type(logits)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "hierarchical_softmax_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    std::optional<cpu::Upsample<A>> up;
    if (upsample) up.emplace(logits.sizes().data(), logits.strides().data(), target.size(1), target.size(2), align_corners);
    hierarchical_softmax_fwd_cpu_impl<scalar_t>(logits, target, leaf_group, level_weights, eps, ignore_index, loss,
                                                per_pixel, stats, count, weight_sum,
                                                pixel_weights<A>(class_weight, pixel_weight), up ? &*up : nullptr);
  });
  return {loss, stats, count, weight_sum};
}

template <typename T>
void hierarchical_softmax_bwd_cpu_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                       const at::Tensor& stats, const at::Tensor& leaf_group,
                                       const at::Tensor& level_weights, double eps_, int64_t ignore_index,
                                       const PixelWeights<at::opmath_type<T>>& wts, at::Tensor& out,
                                       const cpu::Upsample<at::opmath_type<T>>* up, at::opmath_type<T>* acc) {
  using A = at::opmath_type<T>;
  const int L = logits.size(1), D = leaf_group.size(0);
  const int64_t P = target.numel();
  const PixelGeom gx = up ? geom(target) : geom(logits), gt = geom(target), gg = grad_geom(grad, target);
  const T* x = logits.data_ptr<T>();
  T* y_out = out.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const A* gp = grad.data_ptr<A>();
  const int32_t* group = leaf_group.data_ptr<int32_t>();
  const A* w = level_weights.data_ptr<A>();
  const A eps = static_cast<A>(eps_);
  const A* st = stats.data_ptr<A>();
  const int64_t sC = logits.stride(1);
  const bool forced = cpu::pixel_path_forced();
  const bool weighted = wts.any();
  // The gradient tile's way out: to the logits' strides, or (upsampling) left in the scratch tile, which
  // cpu::for_each_upsampled_run_rows adds to the low-resolution gradient.
  const auto emit = [&](int64_t, int64_t n, const int64_t* offs, const A* gtile) {
    if (!up) cpu::scatter<T, A>(y_out, L, sC, offs, n, gtile);
  };
  const auto body = [&](int64_t i0, int64_t n, const int64_t* offs, const A* tile, int64_t ld, A* gtile) {
    int32_t gy[kMaxDepth][kBlock];
    bool valid[kBlock];
    int64_t ys[kBlock];
    A g[kBlock];
    const bool bad = block_groups(tgt, gt, i0, n, L, D, group, ignore_index, gy, valid, ys);
    int64_t goff[kBlock];
    gg.offsets(i0, n, goff);
    for (int64_t p = 0; p < n; ++p) g[p] = gp[goff[p]];
    if (weighted) {  // a labelled pixel's upstream gradient times its weight
      A wv[kBlock];
      block_weights(wts, i0, n, valid, ys, wv);
      for (int64_t p = 0; p < n; ++p)
        if (valid[p]) g[p] *= wv[p];
    }
    if constexpr (std::is_same_v<A, float>) {
      if (forced && !up && D <= kPackedDepth) {  // the CUDA kernels' NCHW path
        backward_vec<vec_width<T>()>(tile, ld, gtile, n, L, D, group, valid, ys, ignore_index, w, eps, st, P, i0, g);
        emit(i0, n, offs, gtile);
        return;
      }
      // Read from the input itself (not the tile, which lies just before the scratch): a full block
      // of contiguous float pixels, so the gradient, with the same strides, is written in place too.
      const bool direct = tile != gtile - L * kBlock;
      if (!forced && !bad && hierarchical_softmax_backward_lanes(tile, ld, direct ? reinterpret_cast<A*>(y_out) + offs[0] : gtile,
                             direct ? sC : kBlock, n, L, D, group, gy, valid, w, eps, st, P, i0, g)) {
        if (!direct) emit(i0, n, offs, gtile);
        return;
      }
    }
    {
      for (int64_t p = 0; p < n; ++p) {
        if (!valid[p]) {
          const A v = label_kind(ys[p], L, ignore_index) == kLabelBad ? quiet_nan<A>() : A(0);
          for (int j = 0; j < L; ++j) gtile[j * kBlock + p] = v;
          continue;
        }
        hierarchical_softmax_backward_pixel<A>(cpu::StridedColumn<A>{tile + p, ld}, cpu::ColumnOut<A>{gtile + p}, L, D,
                              LeafGroups{group, L}, static_cast<int>(ys[p]), w, eps, st + i0 + p, P, g[p]);
      }
    }
    emit(i0, n, offs, gtile);
  };
  if constexpr (std::is_same_v<A, float>) {  // the CUDA rows kernel on the lanes (float types, D <= kPackedDepth)
    if (up && forced && D <= kPackedDepth) {
      constexpr int G = vec_width<T>();
      const LeafGroupRows rows{group, L, D};
      // as hierarchical_softmax_up_rows_lanes_kernel: G destination pixels of a row, their rows G lanes a store
      cpu::up_backward_bands<G, T, A>(*up, y_out, out.strides().data(), 0, [&](A*) {
        return [&, rows](int64_t rr, int64_t X0, int64_t n, A* p, int64_t sc) {
          const int64_t i0 = rr * up->W + X0;
          int y[G];
          A g[G], fill[G];
          for (int k = 0; k < G; ++k) {
            const int64_t v = k < n ? tgt[gt.offset(i0 + k)] : ignore_index;
            const LabelKind kind = label_kind(v, L, ignore_index);
            y[k] = kind == kLabelValid ? static_cast<int>(v) : -1;
            fill[k] = kind == kLabelBad ? quiet_nan<A>() : A(0);
            g[k] = k < n ? gp[gg.offset(i0 + k)] : A(0);
            if (weighted && y[k] >= 0) g[k] *= wts.at(i0 + k, y[k]);
          }
          const unsigned far = hierarchical_softmax_backward_pixels<G, A>(
              up_lanes<T, A, G>(x, sC, up->geom, rr, X0, n), ScratchLanes<A, G>{p, sc}, L, D, rows, y, fill, w, eps,
              st + i0, P, g);
          for (int k = 0; k < n; ++k)
            if (far >> k & 1u)
              hierarchical_softmax_backward_pixel<A>(bilinear_col<T, A>(x, sC, up->geom.stencil(i0 + k)),
                                                     StoreOut<A>{p + k, sc}, L, D, rows, y[k], w, eps, st + i0 + k, P,
                                                     g[k]);
        };
      });
      return;
    }
  }
  if (up && forced)  // float64, D > kPackedDepth: the CUDA one-pixel rows kernel
    cpu::up_backward_bands<1, T, A>(*up, y_out, out.strides().data(), 0, [&](A*) {
      const HierarchicalSoftmaxUpsampledRow<T, A, LeafGroups> row{{x, sC, up->geom, tgt, gt, gp, gg}, L, D,
                                                                  LeafGroups{group, L}, w, eps, ignore_index, st, P,
                                                                  wts};
      // one pixel per thread (rows of one pixel), as the CUDA rows kernel
      return [row, up](int64_t rr, int64_t X0, int64_t, A* p, int64_t sc) { row(rr * up->W + X0, StoreOut<A>{p, sc}); };
    });
  else if (up)
    cpu::for_each_upsampled_run_rows<T, A>(x, *up, gx, acc, body);
  else
    cpu::for_each_block_direct<T, A>(x, L, sC, gx, P, L * kBlock, body);
}

at::Tensor hierarchical_softmax_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                        const at::Tensor& stats, const at::Tensor& leaf_group,
                                        const at::Tensor& level_weights, double eps, int64_t ignore_index,
                                        int64_t upsample, bool align_corners,
                                        const std::optional<at::Tensor>& class_weight,
                                        const std::optional<at::Tensor>& pixel_weight) {
  const int64_t D = check_hierarchical_softmax("hierarchical_softmax_bwd", logits, target, leaf_group,
                                               level_weights, upsample);
  check_grad("hierarchical_softmax_bwd", grad, logits, target);
  check_weights("hierarchical_softmax_bwd", class_weight, pixel_weight, logits, target, logits.size(1));
  check_table("hierarchical_softmax_bwd", "stats", stats, logits, (D + 1) * target.numel(), acc_type(logits));
  // The gradient takes the logits' strides (empty_like keeps a dense layout: channels_last stays
  // channels_last), so both are walked with the same offsets.
  const at::Tensor x = dense_logits(logits);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hierarchical_softmax_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const PixelWeights<A> wts = pixel_weights<A>(class_weight, pixel_weight);
    if (!upsample) {
      hierarchical_softmax_bwd_cpu_impl<scalar_t>(grad, x, target, stats, leaf_group, level_weights, eps,
                                                  ignore_index, wts, out, nullptr, nullptr);
      return;
    }
    const cpu::Upsample<A> up(x.sizes().data(), x.strides().data(), target.size(1), target.size(2), align_corners);
    // the banded pixel path (cpu::up_backward_bands) writes out itself; the row runs scatter into acc
    const bool banded = cpu::pixel_path_forced();
    at::Tensor acc = banded ? at::Tensor() : at::zeros(x.sizes(), x.options().dtype(acc_type(x)));
    hierarchical_softmax_bwd_cpu_impl<scalar_t>(grad, x, target, stats, leaf_group, level_weights, eps, ignore_index,
                                                wts, out, &up, banded ? nullptr : acc.data_ptr<A>());
    if (!banded) out.copy_(acc);
  });
  return out;
}

}  // namespace
}  // namespace hss

TORCH_LIBRARY_IMPL(hss_kernels, CPU, m) {
  m.impl("hierarchical_softmax_fwd", &hss::hierarchical_softmax_fwd_cpu);
  m.impl("hierarchical_softmax_bwd", &hss::hierarchical_softmax_bwd_cpu);
}
