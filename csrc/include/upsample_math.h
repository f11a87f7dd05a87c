// Fused bilinear upsampling for the per-pixel code of the ops (docs/MATH.md §6), on the CPU
// (HSS_CPU_PIXEL_PATH=1) and in the CUDA kernels: the logits are (N, C, h, w), the pixels (N, H, W).
//
// Forward: a destination pixel's channels are read through BilinearCol, four source values per channel.
// Backward, deterministic without atomics: the gradient of one source pixel (b, i, j) gathers, in a fixed
// order, the gradient rows of the destination pixels whose stencil holds it (gather_source_pixel), each
// row computed by the op's per-pixel backward with AddOut as its output.
#pragma once

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

// out(c, v) of a per-pixel backward: adds w v to channel c of one source pixel's gradient.
template <typename A>
struct AddOut {
  A* p;
  int64_t s;
  A w;
  HSS_HOST_DEVICE void operator()(int c, A v) const { p[c * s] += w * v; }
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
  // Pixel q's label when its row is to be computed; otherwise -1, having added what the composition's
  // gradient holds there: nothing for an ignored pixel, NaN to each of the C channels for a bad label.
  template <typename O>
  HSS_HOST_DEVICE int label(int64_t q, int64_t L, int64_t ignore_index, int C, const O& out) const {
    const int64_t y = tgt[gt.offset(q)];
    const LabelKind kind = label_kind(y, L, ignore_index);
    if (kind == kLabelBad)
      for (int c = 0; c < C; ++c) out(c, quiet_nan<A>());  // sm90: trips=0
    return kind == kLabelValid ? static_cast<int>(y) : -1;
  }
};

// The gradient of source pixel (b, i, j), channel c at acc[c * s] (already zero): for every destination
// pixel q whose stencil holds it, rows first, then columns, grad_of(q, AddOut{acc, s, weight}) adds that
// pixel's gradient row times its weight. A fixed order: the same bits whatever the threads.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <typename A, typename GradOf>
HSS_HOST_DEVICE void gather_source_pixel(const UpsampleGeom<A>& u, int64_t b, int64_t i, int64_t j, A* acc, int64_t s,
                                         const GradOf& grad_of) {
  int64_t y_lo, y_hi, x_lo, x_hi;
  UpsampleGeom<A>::window(u.ay, u.H, i, y_lo, y_hi);
  UpsampleGeom<A>::window(u.ax, u.W, j, x_lo, x_hi);
  for (int64_t Y = y_lo; Y < y_hi; ++Y) {  // sm90: trips=2 * H / h
    const A wy = UpsampleGeom<A>::weight(u.ay, Y, i);
    for (int64_t X = x_lo; X < x_hi; ++X) {  // sm90: trips=2 * W / w
      const A wx = UpsampleGeom<A>::weight(u.ax, X, j);
      grad_of((b * u.H + Y) * u.W + X, AddOut<A>{acc, s, wy * wx});
    }
  }
}

}  // namespace hss
