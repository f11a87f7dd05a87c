// Fused bilinear upsampling for the per-pixel code of the ops (docs/MATH.md §6), on the CPU
// (HSS_CPU_PIXEL_PATH=1) and in the CUDA kernels: the logits are (N, C, h, w), the pixels (N, H, W).
//
// Forward: a destination pixel's channels are read through BilinearCol (the tree losses and the hierarchical
// softmax's lanes: G pixels of a row through UpLanes), four source values per channel.
// Backward, deterministic without atomics, banded: over bands of destination rows [Y0, Y1) (up_band_plan),
// each destination pixel's gradient row is computed once by the op's backward into a scratch [N, C, rows, Wp]
// (the hierarchical softmax's *UpsampledRow with StoreOut or its V-pixel backward, and the tree losses' group
// backwards, through UpLanes with ScratchLanes), then up_gather_band adds it onto the source pixels in the order
// (Y, X), carrying the partial sums of the source rows whose window goes on past the band (docs/MATH.md §6.3).
#pragma once

#include <cstdlib>
#include <vector>

#include "common.h"

namespace hss {

// A destination pixel's four source values: at o00, o00 + dx, o00 + dy, o00 + dy + dx (element
// offsets), with weights lx on the dx column and ly on the dy row.
template <typename A>
struct Stencil {
  int64_t o00, dx, dy;
  A lx, ly;
};

template <typename A>
struct UpsampleGeom {
  int64_t h, w, H, W;      // source and destination sizes
  int64_t sN, sh, sw;      // the logits' strides (batch, row, column)
  BilinearAxis<A> ay, ax;  // rows, columns

  static UpsampleGeom make(const int64_t* sizes, const int64_t* strides, int64_t H, int64_t W, bool align_corners) {
    return UpsampleGeom{sizes[2], sizes[3], H, W, strides[0], strides[2], strides[3],
                        BilinearAxis<A>::make(sizes[2], H, align_corners),
                        BilinearAxis<A>::make(sizes[3], W, align_corners)};
  }

  // The stencil of destination pixel q (flat over N x H x W).
  HSS_HOST_DEVICE inline Stencil<A> stencil(int64_t q) const {
    const int64_t hw = H * W;
    const int64_t b = q / hw;
    const int64_t r = q - b * hw;
    const int64_t Y = r / W, X = r - (r / W) * W;
    int64_t y0, y1, x0, x1;
    A ly, lx;
    ay.at(Y, y0, y1, ly);
    ax.at(X, x0, x1, lx);
    return Stencil<A>{b * sN + y0 * sh + x0 * sw, (x1 - x0) * sw, (y1 - y0) * sh, lx, ly};
  }

  // The first destination index o in [0, out) whose first source index exceeds t (out if none).
  HSS_HOST_DEVICE static int64_t first_after(const BilinearAxis<A>& a, int64_t out, int64_t t) {
    int64_t lo = 0, hi = out;
    while (lo < hi) {  // sm90: trips=floor(log2(max(H, W))) + 1
      const int64_t m = lo + (hi - lo) / 2;
      int64_t i0, i1;
      A l;
      a.at(m, i0, i1, l);
      if (i0 > t)
        hi = m;
      else
        lo = m + 1;
    }
    return lo;
  }

  // The destination indices [lo, hi) of an axis whose stencils hold source index i: those whose first
  // source index is i - 1 or i (the first index never decreases along the axis).
  HSS_HOST_DEVICE static void window(const BilinearAxis<A>& a, int64_t out, int64_t i, int64_t& lo, int64_t& hi) {
    lo = first_after(a, out, i - 2);
    hi = first_after(a, out, i);
  }

  // The weight of source index i in destination index o (both weights when the stencil's two indices
  // coincide, at the last source index).
  HSS_HOST_DEVICE static A weight(const BilinearAxis<A>& a, int64_t o, int64_t i) {
    int64_t i0, i1;
    A l;
    a.at(o, i0, i1, l);
    return (i0 == i ? A(1) - l : A(0)) + (i1 == i ? l : A(0));
  }
};

// A destination pixel's channel c, interpolated in F.interpolate's order:
// (1 - ly) ((1 - lx) x00 + lx x01) + ly ((1 - lx) x10 + lx x11).
template <typename T, typename A>
struct BilinearCol {
  const T* p;  // the pixel's x00 at channel 0
  int64_t s, dx, dy;
  A lx, ly;
  template <typename I>
  HSS_HOST_DEVICE A operator()(I c) const {
    const T* q = p + c * s;
    const A a00 = static_cast<A>(q[0]), a01 = static_cast<A>(q[dx]);  // sm90: logits
    const A a10 = static_cast<A>(q[dy]), a11 = static_cast<A>(q[dy + dx]);  // sm90: logits
    return (A(1) - ly) * ((A(1) - lx) * a00 + lx * a01) + ly * ((A(1) - lx) * a10 + lx * a11);
  }
};

template <typename T, typename A>
HSS_HOST_DEVICE inline BilinearCol<T, A> bilinear_col(const T* x, int64_t sC, const Stencil<A>& st) {
  return BilinearCol<T, A>{x + st.o00, sC, st.dx, st.dy, st.lx, st.ly};
}

// G destination pixels of one row, X0 .. X0 + G - 1, as the group functions of the ops read them (tree_min_math.h
// tree_forward_group and the tree backwards: load(c, out) fills the G lanes of channel c, x(c, j) one lane):
// each lane's channel interpolated as BilinearCol does (the same value), the lanes' column offsets and weights
// computed once (up_lanes); the lanes share the source rows (o = row y0 of the image, dy to row y1, ly).
template <typename T, typename A, int G>
struct UpLanes {
  const T* p;  // the lanes' image at source row y0, column 0, channel 0
  int64_t s, dy;
  int64_t ox[G], dx[G];  // lane j's x0 column offset and its x1 - x0 step, in elements
  A ly, lx[G];
  HSS_HOST_DEVICE A lerp(const T* q, int j) const {
    const T* r = q + ox[j];
    const A a00 = static_cast<A>(r[0]), a01 = static_cast<A>(r[dx[j]]);  // sm90: logits
    const A a10 = static_cast<A>(r[dy]), a11 = static_cast<A>(r[dy + dx[j]]);  // sm90: logits
    return (A(1) - ly) * ((A(1) - lx[j]) * a00 + lx[j] * a01) + ly * ((A(1) - lx[j]) * a10 + lx[j] * a11);
  }
  template <typename L>
  HSS_HOST_DEVICE void load(int c, L& out) const {
    const T* q = p + c * s;
    HSS_UNROLL
    for (int j = 0; j < G; ++j) out.v[j] = lerp(q, j);
  }
  HSS_HOST_DEVICE A operator()(int c, int j) const { return lerp(p + c * s, j); }
  // The channel walk of hierarchical_softmax_math.h's V-pixel functions (G = V lanes): load(z) fills z with
  // the current channel of the G lanes, next() moves a copy to the next channel (a pointer bump), at(k, c) is
  // lane k's channel c (of an accessor not moved). Each lane's value rows first: its two source columns
  // interpolated between the source rows, then across, (1 - lx) ((1 - ly) x00 + ly x10) + lx ((1 - ly) x01 +
  // ly x11), which differs from lerp's order (BilinearCol's, F.interpolate's) in rounding only. With pairs
  // (up_lanes: every odd lane's columns are its even neighbour's, as at upsampling factors of 2 and more but at
  // a row's end) load reads a pair's four source values and interpolates its two columns once for both lanes.
  bool pairs;
  A mx[G], my;  // 1 - lx, 1 - ly
  HSS_HOST_DEVICE void load(A (&z)[G]) const {
    static_assert(G % 2 == 0, "UpLanes::load(z) reads the lanes in pairs");
    if (!pairs) {  // a pair of lanes on different columns; sm90: cold
      HSS_UNROLL
      for (int j = 0; j < G; ++j) z[j] = at_row(p, j);
      return;
    }
    HSS_UNROLL
    for (int j = 0; j < G; j += 2) {
      const T* r = p + ox[j];
      const A a00 = static_cast<A>(r[0]), a01 = static_cast<A>(r[dx[j]]);  // sm90: logits
      const A a10 = static_cast<A>(r[dy]), a11 = static_cast<A>(r[dy + dx[j]]);  // sm90: logits
      const A c0 = my * a00 + ly * a10, c1 = my * a01 + ly * a11;
      z[j] = mx[j] * c0 + lx[j] * c1;
      z[j + 1] = mx[j + 1] * c0 + lx[j + 1] * c1;
    }
  }
  // Lane j's value rows first at channel pointer q (the loads on lines not marked as the hot side's logits loads).
  HSS_HOST_DEVICE A at_row(const T* q, int j) const {
    const T* r = q + ox[j];
    const A c0 = my * static_cast<A>(r[0]) + ly * static_cast<A>(r[dy]);
    const A c1 = my * static_cast<A>(r[dx[j]]) + ly * static_cast<A>(r[dy + dx[j]]);
    return mx[j] * c0 + lx[j] * c1;
  }
  HSS_HOST_DEVICE void next() { p += s; }
  HSS_HOST_DEVICE A at(int k, int64_t c) const { return at_row(p + c * s, k); }
};

// The lanes of destination row rr = b H + Y (flat over N x H), columns X0 .. X0 + G - 1; lanes j >= n (past
// the row's end, n >= 1) repeat lane n - 1's stencil.
template <typename T, typename A, int G>
HSS_HOST_DEVICE inline UpLanes<T, A, G> up_lanes(const T* x, int64_t sC, const UpsampleGeom<A>& u, int64_t rr,
                                                 int64_t X0, int64_t n) {
  const int64_t b = rr / u.H, Y = rr - b * u.H;
  int64_t y0, y1, x0, x1;
  UpLanes<T, A, G> l;
  u.ay.at(Y, y0, y1, l.ly);
  l.p = x + b * u.sN + y0 * u.sh;
  l.s = sC;
  l.dy = (y1 - y0) * u.sh;
  l.pairs = true;
  l.my = A(1) - l.ly;
  HSS_UNROLL
  for (int j = 0; j < G; ++j) {
    u.ax.at(X0 + (j < n ? j : n - 1), x0, x1, l.lx[j]);
    l.mx[j] = A(1) - l.lx[j];
    l.ox[j] = x0 * u.sw;
    l.dx[j] = (x1 - x0) * u.sw;
    if (j % 2) l.pairs = l.pairs && l.ox[j] == l.ox[j - 1] && l.dx[j] == l.dx[j - 1];
  }
  return l;
}

// UpLanes as decode_math.h's lanes read their logits: load(o, z) fills z with the G lanes' values at element
// offset o from channel 0 (a walk node's channel times sC), as UpLanes::load(z) interpolates them.
template <typename T, typename A, int G>
struct UpLanesAt {
  UpLanes<T, A, G> up;
  HSS_HOST_DEVICE void load(int64_t o, A (&z)[G]) const {
    UpLanes<T, A, G> l = up;
    l.p += o;
    l.load(z);
  }
};

// UpLanes whose load also keeps the G interpolated values at k[c sc + j] (in the banded backward: the lanes'
// own gradient rows in the scratch, which the backward overwrites channel by channel afterwards), and reload
// reads them back: tree_min_backward_group's top-down pass reads its channels there instead of interpolating
// them a second time (the same values). x(c, j) (the path walk, after the rows are overwritten) interpolates.
template <typename T, typename A, int G>
struct UpLanesKept {
  UpLanes<T, A, G> up;
  A* k;
  int64_t sc;
  static constexpr bool kReload = true;
  template <typename L>
  HSS_HOST_DEVICE void load(int c, L& out) const {
    up.load(c, out);
    *reinterpret_cast<L*>(k + c * sc) = out;
  }
  template <typename L>
  HSS_HOST_DEVICE void reload(int c, L& out) const { out = *reinterpret_cast<const L*>(k + c * sc); }
  HSS_HOST_DEVICE A operator()(int c, int j) const { return up(c, j); }
};

// out(c, v) of a per-pixel backward into the banded scratch (up_scratch_width): writes channel c of one
// destination pixel's gradient row (channel stride sc); an ignored pixel's row is written as zeros
// (UpsampledPixels::label).
template <typename A>
struct StoreOut {
  A* p;
  int64_t sc;
  HSS_HOST_DEVICE void operator()(int c, A v) const { p[c * sc] = v; }
};

// The output of a group backward into the banded scratch: lane j of channel c at p[c sc + j], the G lanes
// one aligned Lanes store (a group starts at a multiple of G in a row of up_scratch_width(W) columns; lanes
// past the row's end write its padding, which nothing reads).
template <typename A, int G>
struct ScratchLanes {
  A* p;
  int64_t sc;
  template <typename L>
  HSS_HOST_DEVICE void store(int c, const L& v) const { *reinterpret_cast<L*>(p + c * sc) = v; }
  HSS_HOST_DEVICE void store_lane(int c, int j, A v) const { p[c * sc + j] = v; }
  // The channel walk of hierarchical_softmax_math.h's V-pixel backward (G = V lanes): store(v) writes the
  // current channel's G lanes (aligned stores of up to 16 bytes), next() moves a copy to the next channel.
  HSS_HOST_DEVICE void store(const A (&v)[G]) const {
    struct alignas(sizeof(A) * G < 16 ? sizeof(A) * G : 16) Row {
      A v[G];
    } r;
    HSS_UNROLL
    for (int j = 0; j < G; ++j) r.v[j] = v[j];
    *reinterpret_cast<Row*>(p) = r;
  }
  HSS_HOST_DEVICE void next() { p += sc; }
};

// What every op's backward row reads of a destination pixel q with fused upsampling: the low-resolution
// logits (x, channel stride sC) through its stencil, its label and its upstream gradient.
template <typename T, typename A>
struct UpsampledPixels {
  const T* x;
  int64_t sC;
  UpsampleGeom<A> u;
  const int64_t* tgt;
  PixelGeom gt;
  const A* grad;
  PixelGeom gg;

  HSS_HOST_DEVICE BilinearCol<T, A> logits(int64_t q) const { return bilinear_col<T, A>(x, sC, u.stencil(q)); }
  HSS_HOST_DEVICE A grad_of(int64_t q) const { return grad[gg.offset(q)]; }
  // Pixel q's label when its row is to be computed; otherwise -1, having written the row the composition's
  // gradient holds there to the C channels: 0 for an ignored pixel, NaN for a bad label.
  template <typename O>
  HSS_HOST_DEVICE int label(int64_t q, int64_t L, int64_t ignore_index, int C, const O& out) const {
    const int64_t y = tgt[gt.offset(q)];
    const LabelKind kind = label_kind(y, L, ignore_index);
    if (kind != kLabelValid) {  // sm90: cold
      const A v = kind == kLabelBad ? quiet_nan<A>() : A(0);
      for (int c = 0; c < C; ++c) out(c, v);  // sm90: trips=C
    }
    return kind == kLabelValid ? static_cast<int>(y) : -1;
  }
};

// ---- the banded backward ----
// A band: destination rows [Y0, Y1) and the source rows [I0, I1) whose gradient up_gather_band adds them to
// (the rows whose window meets the band; a row with an empty window goes with the band of its window's start).
struct UpBand {
  int64_t Y0, Y1, I0, I1;
};

// The scratch of a band: [N, C, rows, Wp] in the accumulation type, Wp = W padded to a multiple of
// kUpScratchPad (up_scratch_width), destination pixels innermost: the threads of a warp, on consecutive
// pixels (or groups of G <= kUpScratchPad pixels, each group one aligned Lanes store), write a channel's
// contiguous run. At most kUpBwdScratchBytes (to stay in an H100's 50 MB L2 between the two kernels of a band)
// and a tenth of the full-resolution logits (at least 1 MiB); at least one row. HSS_UP_BAND_ROWS=<n> (n >= 1)
// sets the rows per band instead (the tests force small bands with it: the result is the same bits for any
// band height).
constexpr int64_t kUpBwdScratchBytes = int64_t(32) << 20;
constexpr int64_t kUpScratchPad = 8;

inline int64_t up_scratch_width(int64_t W) { return (W + kUpScratchPad - 1) / kUpScratchPad * kUpScratchPad; }

inline int64_t up_band_rows(int64_t N, int64_t C, int64_t H, int64_t W, int64_t acc_bytes, int64_t logit_bytes) {
  if (const char* v = std::getenv("HSS_UP_BAND_ROWS")) {
    char* end = nullptr;
    const long long r = std::strtoll(v, &end, 10);
    if (end != v && *end == '\0' && r >= 1) return r < H ? static_cast<int64_t>(r) : (H > 0 ? H : 1);
  }
  const int64_t row = N * up_scratch_width(W) * C * acc_bytes;
  int64_t budget = N * C * H * W * logit_bytes / 10;
  if (budget < (int64_t(1) << 20)) budget = int64_t(1) << 20;
  if (budget > kUpBwdScratchBytes) budget = kUpBwdScratchBytes;
  int64_t rows = row > 0 ? budget / row : H;
  if (rows > H) rows = H;
  return rows < 1 ? 1 : rows;
}

// The bands of rows destination rows each, in order, and (am) the most source rows of one band: the carry's
// height (the rows a band leaves open are distinct modulo am). Host code, once per call.
template <typename A>
inline std::vector<UpBand> up_band_plan(const UpsampleGeom<A>& u, int64_t rows, int64_t* am) {
  std::vector<int64_t> lo(u.h), hi(u.h);
  for (int64_t i = 0; i < u.h; ++i) UpsampleGeom<A>::window(u.ay, u.H, i, lo[i], hi[i]);
  std::vector<UpBand> bands;
  *am = 1;
  int64_t i = 0;
  for (int64_t Y0 = 0; Y0 < u.H; Y0 += rows) {
    const int64_t Y1 = Y0 + rows < u.H ? Y0 + rows : u.H;
    const auto mine = [&](int64_t r) {
      if (lo[r] < hi[r]) return lo[r] < Y1 && hi[r] > Y0;
      const int64_t anchor = lo[r] < u.H - 1 ? lo[r] : u.H - 1;
      return anchor >= Y0 && anchor < Y1;
    };
    while (i < u.h && !mine(i)) ++i;
    int64_t e = i;
    while (e < u.h && mine(e)) ++e;
    if (e > i) {
      bands.push_back(UpBand{Y0, Y1, i, e});
      if (e - i > *am) *am = e - i;
    }  // (the rows meeting a band are one run, and its start never moves back: the next scan starts at i)
  }
  return bands;
}

// Source row i's part of band [Y0, Y1): its window of destination rows clipped to the band, the window of
// destination columns of column j, whether no earlier band held a row of the window (first) and whether the
// window ends in this band (last).
struct UpBandWindow {
  int64_t ylo, yhi, xlo, xhi;
  bool first, last;
};

template <typename A>
HSS_HOST_DEVICE inline UpBandWindow up_band_window(const UpsampleGeom<A>& u, int64_t i, int64_t j, int64_t Y0,
                                                   int64_t Y1) {
  int64_t ys, ye, xs, xe;
  UpsampleGeom<A>::window(u.ay, u.H, i, ys, ye);
  UpsampleGeom<A>::window(u.ax, u.W, j, xs, xe);
  return UpBandWindow{ys > Y0 ? ys : Y0, ye < Y1 ? ye : Y1, xs, xe, ys >= Y0, ye <= Y1};
}

// The weight of destination column X in source column j's window, as up_gather_band reads it: computed
// (UpColWeight, the CPU pixel path) or read from a table of the window's columns computed once per source pixel
// (UpColTable, CUDA's gather kernel: p[(X - xlo) ld]); both hold UpsampleGeom::weight(ax, X, j), the same bits.
template <typename A>
struct UpColWeight {
  BilinearAxis<A> ax;
  int64_t j;
  HSS_HOST_DEVICE A operator()(int64_t X) const { return UpsampleGeom<A>::weight(ax, X, j); }
};

template <typename A>
struct UpColTable {
  const A* p;
  int ld;
  int64_t xlo;
  HSS_HOST_DEVICE A operator()(int64_t X) const { return p[static_cast<int>(X - xlo) * ld]; }
};

#ifdef __CUDACC__
#define HSS_UP_NO_UNROLL _Pragma("unroll 1")
#else
#define HSS_UP_NO_UNROLL
#endif

// Channels c = c0 + k cs (k < K, c < C) of source pixel (i, j): per channel the carried partial sum
// (carry[c * ca]; 0 if the window starts in this band) plus wy * wx(X) * s[(Y - Y0) * ssy + X + c * ssc] over
// the band's part of its window, rows then columns (wy * wx(X) computed once for the K channels; wx(X) the
// weight of column X for column j, UpColWeight or UpColTable); the sum goes to out[c * oC] if the window ends in
// this band, else back to carry[c * ca]. Per channel the same sum, in the same order, as one pass over the whole
// window: the same bits for any band height and any K. Each channel's scratch pointer is computed once (a
// channel c >= C reads channel C - 1's and its sum is never stored: no predicate in the loop), the columns four
// at a time (immediate offsets from those pointers), then the window's last nx mod 4. CUDA's gather kernel (32
// source pixels across a warp, channels c0, c0 + cs, ... per thread, the column weights from a table in shared
// memory) and the CPU pixel path (consecutive channels, the weights computed) both run it.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <int K, typename A, typename T, typename WX>
HSS_HOST_DEVICE inline void up_gather_band(const UpsampleGeom<A>& u, const UpBandWindow& wd, int64_t i, const WX& wx,
                                           int64_t Y0, const A* s, int64_t ssy, int64_t ssc, A* carry, int64_t ca,
                                           T* out, int64_t oC, int c0, int cs, int C) {
  A a[K];
  const A* sk[K];
  HSS_UNROLL
  for (int k = 0; k < K; ++k) {
    const int c = c0 + k * cs;
    a[k] = !wd.first && c < C ? carry[c * ca] : A(0);
    sk[k] = s + static_cast<int64_t>(c < C ? c : C - 1) * ssc + wd.xlo;
  }
  const int nx = static_cast<int>(wd.xhi - wd.xlo), n4 = nx - nx % 4;
  for (int64_t Y = wd.ylo; Y < wd.yhi; ++Y) {  // sm90: trips=2 * H / (h + (2 - 2 * h / H) * cdiv(H, ROWS))
    const A wy = UpsampleGeom<A>::weight(u.ay, Y, i);
    const int64_t oy = (Y - Y0) * ssy;
    HSS_UP_NO_UNROLL
    for (int x = 0; x < n4; x += 4) {  // sm90: trips=floor(2 * W / w / 4)
      HSS_UNROLL
      for (int e = 0; e < 4; ++e) {
        const A wyx = wy * wx(wd.xlo + x + e);
        HSS_UNROLL
        for (int k = 0; k < K; ++k) a[k] += wyx * sk[k][oy + x + e];
      }
    }
    HSS_UP_NO_UNROLL
    for (int x = n4; x < nx; ++x) {  // sm90: trips=2 * W / w - 4 * floor(2 * W / w / 4)
      const A wyx = wy * wx(wd.xlo + x);
      HSS_UNROLL
      for (int k = 0; k < K; ++k) a[k] += wyx * sk[k][oy + x];
    }
  }
  HSS_UNROLL
  for (int k = 0; k < K; ++k) {
    const int c = c0 + k * cs;
    if (c < C) {
      if (wd.last)
        out[c * oC] = static_cast<T>(a[k]);
      else
        carry[c * ca] = a[k];
    }
  }
}

}  // namespace hss
