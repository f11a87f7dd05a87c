// What the per-pixel math of every op (hierarchical_softmax_math.h, tree_min_math.h, decode_math.h)
// shares, on the CPU and in CUDA device code: the host/device macros, scalar math for the accumulation
// type A (float or double), the label rule and PixelGeom.
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

// max(a, b), NaN if either is NaN (max.NaN on sm_80+; hmax drops a NaN b).
template <typename A>
HSS_HOST_DEVICE inline A max_nan(A a, A b) { return a > b || a != a ? a : b; }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
HSS_HOST_DEVICE inline float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
#endif
// min(a, b), NaN if either is NaN.
template <typename A>
HSS_HOST_DEVICE inline A min_nan(A a, A b) { return a < b || a != a ? a : b; }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
HSS_HOST_DEVICE inline float min_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
#endif

// The special-function unit's forms (one MUFU instruction each on the GPU, .approx.ftz: results below 2^-126
// flush to 0; the CPU's library functions elsewhere), float64 exact.
HSS_HOST_DEVICE inline float fast_exp2(float v) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return exp2f(v);
#endif
}
HSS_HOST_DEVICE inline double fast_exp2(double v) { return exp2(v); }
HSS_HOST_DEVICE inline float fast_log2(float v) {
#ifdef __CUDA_ARCH__
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return log2f(v);
#endif
}
HSS_HOST_DEVICE inline double fast_log2(double v) { return log2(v); }
HSS_HOST_DEVICE inline float fast_rcp(float v) {
#ifdef __CUDA_ARCH__
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return 1.0f / v;
#endif
}
HSS_HOST_DEVICE inline double fast_rcp(double v) { return 1.0 / v; }
// e^v as 2^(v log2 e), results below 2^-126 flushed to 0 on both sides (the GPU's ex2.approx.ftz; the CPU
// exp2f of the same product, flushed explicitly), so that saturated inputs give the exact 0 on both; +inf
// for large v. The product's rounding adds |v| 2^-24 of relative error. float64: exp.
HSS_HOST_DEVICE inline float fast_exp(float v) {
  const float t = v * 1.44269504088896341f;
#ifdef __CUDA_ARCH__
  return fast_exp2(t);
#else
  return t < -126.f ? 0.f : exp2f(t);
#endif
}
HSS_HOST_DEVICE inline double fast_exp(double v) { return exp(v); }


// Labels. The public API rejects a label that is neither ignore_index nor a leaf id in [0, L), but it
// skips that check (a host sync) under torch.compile or when switched off, so the kernels guard
// themselves: such a pixel never indexes a table (no out-of-bounds read), counts as a labelled pixel,
// and gets a NaN loss and a NaN gradient row, so that a mean or sum over it is NaN (loud), never a
// plausible number.
enum LabelKind { kLabelIgnored = 0, kLabelValid = 1, kLabelBad = 2 };
HSS_HOST_DEVICE inline LabelKind label_kind(int64_t y, int64_t L, int64_t ignore_index) {
  return y == ignore_index ? kLabelIgnored : (y >= 0 && y < L) ? kLabelValid : kLabelBad;
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


// Class and pixel weights (docs/MATH.md §6.6), fused into the losses: labelled pixel i (flat over N x H x W
// of the target) with leaf label y in [0, L) has weight cw[y] * pw[i], a missing table reading as 1. The
// forward multiplies the pixel's loss by it and sums cw[y] over the labelled pixels (the "mean"'s
// denominator); the backward multiplies the pixel's upstream gradient by it.
template <typename A>
struct PixelWeights {
  const A* cw;    // (L,) by label id, or nullptr
  const A* pw;    // (N, H, W) at gw's strides, or nullptr
  PixelGeom gw;
  HSS_HOST_DEVICE inline bool any() const { return cw != nullptr || pw != nullptr; }
  HSS_HOST_DEVICE inline A of_class(int64_t y) const { return cw ? cw[y] : A(1); }
  HSS_HOST_DEVICE inline A at(int64_t i, int64_t y) const {
    const A w = of_class(y);
    return pw ? w * pw[gw.offset(i)] : w;
  }
};


// Bilinear upsampling along one axis, as F.interpolate(mode="bilinear") computes it (ATen's
// area_pixel_compute_scale / area_pixel_compute_source_index / guard_index_and_lambda): destination
// index dst reads source i0 with weight 1 - lambda and i1 (= i0 + 1, or i0 at the last source index)
// with weight lambda, src = align_corners ? dst (in-1)/(out-1) : max((dst + 1/2) in/out - 1/2, 0).
template <typename A>
struct BilinearAxis {
  int64_t in;
  A scale;
  bool align_corners;
  HSS_HOST_DEVICE static BilinearAxis make(int64_t in, int64_t out, bool align_corners) {
    const A scale = align_corners ? (out > 1 ? static_cast<A>(in - 1) / static_cast<A>(out - 1) : A(0))
                                  : static_cast<A>(in) / static_cast<A>(out);
    return BilinearAxis{in, scale, align_corners};
  }
  HSS_HOST_DEVICE inline void at(int64_t dst, int64_t& i0, int64_t& i1, A& lambda) const {
    A src = align_corners ? scale * static_cast<A>(dst) : scale * (static_cast<A>(dst) + A(0.5)) - A(0.5);
    if (src < A(0)) src = A(0);
    i0 = static_cast<int64_t>(src);  // src >= 0: the cast floors
    if (i0 > in - 1) i0 = in - 1;
    lambda = hmin(hmax(src - static_cast<A>(i0), A(0)), A(1));
    i1 = i0 + (i0 < in - 1 ? 1 : 0);
  }
};

}  // namespace hss
