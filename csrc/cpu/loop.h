// The CPU pixel loop shared by the ops: OpenMP over blocks of kBlock pixels. Each block's channels are
// gathered once through the strides into a (C, kBlock) tile of the accumulation type, so that the
// per-pixel math of csrc/include/*_math.h reads a pixel's channels from cache whatever the layout, and
// nothing is allocated per pixel.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common.h"
#include "upsample_math.h"

namespace hss {
namespace cpu {

constexpr int64_t kBlock = 64;

// HSS_CPU_PIXEL_PATH=1 sends float, float16 and bfloat16 inputs through the per-pixel functions of
// csrc/include/*_math.h in float (what the CUDA kernels run for those dtypes) instead of the
// vectorised row passes, so that the tests can check the GPU's float arithmetic without a GPU. Read
// once per op call; off by default (the row passes are the fast path).
inline bool pixel_path_forced() {
  const char* v = std::getenv("HSS_CPU_PIXEL_PATH");
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

// A pixel's channels in a tile: channel c of lane p at tile[c * kBlock + p].
template <typename A>
struct Column {
  const A* p;
  A operator()(int c) const { return p[c * kBlock]; }
};

template <typename A>
struct ColumnOut {
  A* p;
  void operator()(int c, A v) const { p[c * kBlock] = v; }
};

template <typename A>
struct Scratch {
  A* p;
  A& operator()(int c) const { return p[c]; }
};

inline bool unit_stride(const int64_t* offs, int64_t n) {
  bool unit = true;
  for (int64_t p = 1; p < n; ++p) unit &= offs[p] == offs[0] + p;
  return unit;
}

// OpenMP over the blocks of kBlock pixels (static schedule: a thread takes consecutive blocks):
// visit(first_pixel, n, offsets, tile) with this thread's (C, kBlock) tile followed by scratch_size values.
template <typename A, typename Visit>
void parallel_blocks(int64_t C, const PixelGeom& g, int64_t P, int64_t scratch_size, const Visit& visit) {
  const int64_t nb = (P + kBlock - 1) / kBlock;
#pragma omp parallel if (nb > 1)
  {
    std::vector<A> tile(C * kBlock + scratch_size);
    int64_t offs[kBlock];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i0 = b * kBlock;
      const int64_t n = std::min(kBlock, P - i0);
      g.offsets(i0, n, offs);
      visit(i0, n, offs, tile.data());
    }
  }
}

// A thread's block after next is likely 2 * kBlock pixels on (static schedule): for a full block of
// contiguous pixels at x + off0, ask for it now, C short runs that the hardware prefetcher would find late.
template <typename T>
inline void prefetch_block_after_next(const T* x, int64_t C, int64_t sC, int64_t off0, int64_t i0, int64_t P) {
  if (i0 + 3 * kBlock <= P)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < kBlock; k += 64 / static_cast<int64_t>(sizeof(T)))
        __builtin_prefetch(x + c * sC + off0 + 2 * kBlock + k);
}

// Copies the block's n lanes (offsets offs, contiguous when unit) of every channel into the (C, kBlock) tile.
template <typename T, typename A>
inline void gather(const T* x, int64_t C, int64_t sC, const int64_t* offs, int64_t n, bool unit, A* tile) {
  for (int64_t c = 0; c < C; ++c) {
    const T* xc = x + c * sC;
    A* tc = tile + c * kBlock;
    if (unit)  // NCHW within a row block: contiguous, vectorisable copies
      for (int64_t p = 0; p < n; ++p) tc[p] = static_cast<A>(xc[offs[0] + p]);
    else
      for (int64_t p = 0; p < n; ++p) tc[p] = static_cast<A>(xc[offs[p]]);
  }
}

// body(first_pixel, n, offsets, tile, scratch): offsets[p] is lane p's offset in x; scratch holds
// `scratch_size` values of the thread. Blocks are numbered first_pixel / kBlock.
template <typename T, typename A, typename Body>
void for_each_block(const T* x, int64_t C, int64_t sC, const PixelGeom& g, int64_t P, int64_t scratch_size,
                    const Body& body) {
  parallel_blocks<A>(C, g, P, scratch_size, [&](int64_t i0, int64_t n, int64_t* offs, A* tile) {
    const bool unit = unit_stride(offs, n);
    if (unit && n == kBlock) prefetch_block_after_next(x, C, sC, offs[0], i0, P);
    gather(x, C, sC, offs, n, unit, tile);
    body(i0, n, offs, tile, tile + C * kBlock);
  });
}

// A pixel's channels at stride ld (a tile column, ld = kBlock, or the input itself).
template <typename A>
struct StridedColumn {
  const A* p;
  int64_t ld;
  A operator()(int c) const { return p[c * ld]; }
};

// Fused bilinear upsampling: the op reads (N, C, h, w) logits x at the target's N x H x W pixels, each
// pixel's channels interpolated from its four source pixels (BilinearAxis, common.h) as the block is
// gathered, so that the full-resolution logits never exist. The per-row and per-column stencils are
// tabulated once per call.
template <typename A>
struct Upsample {
  int64_t N, C, h, w, H, W;  // logits (N, C, h, w), pixels (N, H, W)
  int64_t sN, sC, sh, sw;    // the logits' strides
  std::vector<int64_t> y0, y1, x0, x1;
  std::vector<A> ly, lx;  // the weights of y1 and x1
  // The destination rows whose first source row is y: [row_begin[y], row_begin[y + 1]).
  std::vector<int64_t> row_begin;
  UpsampleGeom<A> geom;  // the same for the per-pixel path (HSS_CPU_PIXEL_PATH=1), as the CUDA kernels use it

  Upsample(const int64_t* sizes, const int64_t* strides, int64_t H_, int64_t W_, bool align_corners)
      : N(sizes[0]), C(sizes[1]), h(sizes[2]), w(sizes[3]), H(H_), W(W_), sN(strides[0]), sC(strides[1]),
        sh(strides[2]), sw(strides[3]), y0(H), y1(H), x0(W), x1(W), ly(H), lx(W), row_begin(h + 1, H),
        geom(UpsampleGeom<A>::make(sizes, strides, H_, W_, align_corners)) {
    const auto ay = BilinearAxis<A>::make(h, H, align_corners), ax = BilinearAxis<A>::make(w, W, align_corners);
    for (int64_t Y = 0; Y < H; ++Y) ay.at(Y, y0[Y], y1[Y], ly[Y]);
    for (int64_t X = 0; X < W; ++X) ax.at(X, x0[X], x1[X], lx[X]);
    for (int64_t Y = H - 1; Y >= 0; --Y) row_begin[y0[Y]] = Y;  // y0 never decreases with Y
    for (int64_t y = h - 1; y >= 0; --y) row_begin[y] = std::min(row_begin[y], row_begin[y + 1]);
  }
};

// The (C, kBlock) tile of pixels i0 .. i0 + n - 1 (flat over N x H x W), a run of lanes in one
// destination row at a time, separably: per channel, the run's source columns interpolated between
// the two source rows into r, then each lane interpolated between two entries of r. (F.interpolate
// takes the columns first; the results differ in rounding only.)
template <typename T, typename A>
inline void gather_upsampled(const T* x, const Upsample<A>& u, int64_t i0, int64_t n, A* tile) {
  const int64_t hw = u.H * u.W;
  int64_t b = i0 / hw, Y = (i0 - b * hw) / u.W, X = i0 - b * hw - Y * u.W;
  A r[kBlock + 1];
  for (int64_t p0 = 0; p0 < n;) {
    const int64_t m = std::min(n - p0, u.W - X);  // lanes p0 .. p0 + m - 1 lie in row Y
    const int64_t xs = u.x0[X], span = u.x1[X + m - 1] - xs + 1;  // at most m + 1 source columns
    const A ly = u.ly[Y];
    const T* s0 = x + b * u.sN + u.y0[Y] * u.sh + xs * u.sw;
    const T* s1 = x + b * u.sN + u.y1[Y] * u.sh + xs * u.sw;
    const int64_t* x0 = u.x0.data() + X;
    const int64_t* x1 = u.x1.data() + X;
    const A* lx = u.lx.data() + X;
    for (int64_t c = 0; c < u.C; ++c) {
      const T* a0 = s0 + c * u.sC;
      const T* a1 = s1 + c * u.sC;
      for (int64_t j = 0; j < span; ++j)
        r[j] = (A(1) - ly) * static_cast<A>(a0[j * u.sw]) + ly * static_cast<A>(a1[j * u.sw]);
      A* tc = tile + c * kBlock + p0;
      for (int64_t p = 0; p < m; ++p) tc[p] = (A(1) - lx[p]) * r[x0[p] - xs] + lx[p] * r[x1[p] - xs];
    }
    p0 += m;
    X += m;
    if (X == u.W) {
      X = 0;
      if (++Y == u.H) {
        Y = 0;
        ++b;
      }
    }
  }
}

// Adds the gradient tile of a run of n pixels of one destination row (flat index i0) to the gradient of
// the low-resolution logits, acc (N, C, h, w) contiguous, in a fixed order: the transpose of
// gather_upsampled (each channel's lanes summed into their source columns r, then r added to the two
// source rows).
template <typename A>
inline void scatter_upsampled(A* acc, const Upsample<A>& u, int64_t i0, int64_t n, const A* gtile) {
  const int64_t hw = u.H * u.W;
  const int64_t b = i0 / hw, Y = (i0 - b * hw) / u.W, X = i0 - b * hw - Y * u.W;
  const A ly = u.ly[Y];
  const int64_t lo = u.h * u.w;
  const int64_t xs = u.x0[X], span = u.x1[X + n - 1] - xs + 1;
  A* r0 = acc + b * u.C * lo + u.y0[Y] * u.w + xs;
  A* r1 = acc + b * u.C * lo + u.y1[Y] * u.w + xs;
  const int64_t* x0 = u.x0.data() + X;
  const int64_t* x1 = u.x1.data() + X;
  const A* lx = u.lx.data() + X;
  A r[kBlock + 1];
  for (int64_t c = 0; c < u.C; ++c) {
    const A* g = gtile + c * kBlock;
    for (int64_t j = 0; j < span; ++j) r[j] = A(0);
    for (int64_t p = 0; p < n; ++p) {
      r[x0[p] - xs] += (A(1) - lx[p]) * g[p];
      r[x1[p] - xs] += lx[p] * g[p];
    }
    A* a0 = r0 + c * lo;
    A* a1 = r1 + c * lo;
    for (int64_t j = 0; j < span; ++j) a0[j] += (A(1) - ly) * r[j];
    for (int64_t j = 0; j < span; ++j) a1[j] += ly * r[j];
  }
}

// The backward's loop with upsampling: body(first_pixel, n, offsets, tile, kBlock, scratch) as in
// for_each_block_direct, over runs of at most kBlock pixels within one destination row, the tile
// interpolated; the body hands its gradient to scatter_upsampled. Deterministic without atomics: a task
// is one source row y of one image, the destination rows whose first source row is y; it adds to rows y
// and y + 1 only, so the tasks of even y run in parallel, then those of odd y, and every sum of the
// low-resolution gradient is taken in the same order whatever the number of threads.
template <typename T, typename A, typename Body>
void for_each_upsampled_run(const T* x, const Upsample<A>& u, const PixelGeom& g, int64_t scratch_size,
                            const Body& body) {
  for (int parity = 0; parity < 2; ++parity) {
    const int64_t rows = (u.h - parity + 1) / 2;  // source rows y = parity, parity + 2, ...
    const int64_t tasks = u.N * rows;
#pragma omp parallel if (tasks > 1)
    {
      std::vector<A> tile(u.C * kBlock + scratch_size);
      int64_t offs[kBlock];
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t b = t / rows, y = parity + 2 * (t - b * rows);
        for (int64_t Y = u.row_begin[y]; Y < u.row_begin[y + 1]; ++Y)
          for (int64_t X = 0; X < u.W; X += kBlock) {
            const int64_t i0 = (b * u.H + Y) * u.W + X, n = std::min(kBlock, u.W - X);
            g.offsets(i0, n, offs);
            gather_upsampled(x, u, i0, n, tile.data());
            body(i0, n, offs, static_cast<const A*>(tile.data()), kBlock, tile.data() + u.C * kBlock);
          }
      }
    }
  }
}

// The backward's loop with upsampling and its scatter, for_each_upsampled_run's tasks with the transpose of
// gather_upsampled taken rows first: body(first_pixel, n, offsets, tile, kBlock, scratch) writes the
// gradient of its run's n lanes into scratch as a (C, kBlock) tile (and nothing else); every destination
// row of a task has the same two source rows y0, y1, so the task adds (1 - ly) g and ly g of its rows
// into two full-width rows b0, b1 (C, W) (lanes contiguous: vector FMAs), and only at its end sums b0,
// b1 into their source columns (grouped once per call: x0 and x1 never decrease along a row) and
// adds them to acc's rows y0 and y1. The horizontal sums, the costly part, are then taken once per task
// instead of once per destination row. Deterministic as for_each_upsampled_run: the same tasks, each
// summing in a fixed order. acc (N, C, h, w) contiguous.
template <typename T, typename A, typename Body>
void for_each_upsampled_run_rows(const T* x, const Upsample<A>& u, const PixelGeom& g, A* acc, const Body& body) {
  const int64_t C = u.C, W = u.W, lo = u.h * u.w;
  // a destination row's 2W (lane, weight) terms grouped by source column j: terms beg[j] .. beg[j + 1] - 1
  std::vector<int32_t> lane(2 * W), beg(u.w + 1);
  std::vector<A> wt(2 * W);
  {
    int64_t k = 0, p0 = 0, p1 = 0;
    for (int64_t j = 0; j < u.w; ++j) {
      beg[j] = static_cast<int32_t>(k);
      for (; p1 < W && u.x1[p1] == j; ++p1, ++k) {
        lane[k] = static_cast<int32_t>(p1);
        wt[k] = u.lx[p1];
      }
      for (; p0 < W && u.x0[p0] == j; ++p0, ++k) {
        lane[k] = static_cast<int32_t>(p0);
        wt[k] = A(1) - u.lx[p0];
      }
    }
    beg[u.w] = static_cast<int32_t>(k);
  }
  for (int parity = 0; parity < 2; ++parity) {
    const int64_t rows = (u.h - parity + 1) / 2;  // source rows y = parity, parity + 2, ...
    const int64_t tasks = u.N * rows;
#pragma omp parallel if (tasks > 1)
    {
      std::vector<A> tile(2 * C * kBlock), b0(C * W), b1(C * W);
      int64_t offs[kBlock];
      A* gt = tile.data() + C * kBlock;
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t b = t / rows, y = parity + 2 * (t - b * rows);
        if (u.row_begin[y] == u.row_begin[y + 1]) continue;
        std::fill(b0.begin(), b0.end(), A(0));
        std::fill(b1.begin(), b1.end(), A(0));
        for (int64_t Y = u.row_begin[y]; Y < u.row_begin[y + 1]; ++Y) {
          const A ly = u.ly[Y], ky = A(1) - ly;
          for (int64_t X = 0; X < W; X += kBlock) {
            const int64_t i0 = (b * u.H + Y) * W + X, n = std::min(kBlock, W - X);
            g.offsets(i0, n, offs);
            gather_upsampled(x, u, i0, n, tile.data());
            body(i0, n, offs, static_cast<const A*>(tile.data()), kBlock, gt);
            for (int64_t c = 0; c < C; ++c) {
              const A* gc = gt + c * kBlock;
              A* r0 = b0.data() + c * W + X;
              A* r1 = b1.data() + c * W + X;
              for (int64_t p = 0; p < n; ++p) {
                r0[p] += ky * gc[p];
                r1[p] += ly * gc[p];
              }
            }
          }
        }
        const int64_t Y0 = u.row_begin[y];
        A* a0 = acc + b * C * lo + u.y0[Y0] * u.w;
        A* a1 = acc + b * C * lo + u.y1[Y0] * u.w;
        for (int64_t c = 0; c < C; ++c) {
          const A* r0 = b0.data() + c * W;
          const A* r1 = b1.data() + c * W;
          A* o0 = a0 + c * lo;
          A* o1 = a1 + c * lo;
          for (int64_t j = 0; j < u.w; ++j) {
            A s0 = A(0), s1 = A(0);
            for (int32_t k = beg[j]; k < beg[j + 1]; ++k) {
              s0 += wt[k] * r0[lane[k]];
              s1 += wt[k] * r1[lane[k]];
            }
            o0[j] += s0;
            o1[j] += s1;
          }
        }
      }
    }
  }
}

// The banded backward with upsampling as the CUDA kernels run it (HSS_CPU_PIXEL_PATH=1; upsample_math.h):
// per band of destination rows, make_rows(scratch)'s rows(rr, X0, n, p, sc) for every group of G destination
// pixels of the band, G at a time from each row's start as the CUDA rows kernel groups them (row rr = b H + Y,
// columns X0 .. X0 + n - 1, n <= G), writing channel c of lane j at p[c sc + j] of the band's scratch
// [N, C, rows, Wp] (lanes j >= n: the row's padding); then up_gather_band for every source pixel of the band's
// source rows and every channel, onto out (the logits' type and strides, os[0..3]; written once per element)
// or the carry [N, C, am, w].
template <int G, typename T, typename A, typename MakeRows>
void up_backward_bands(const Upsample<A>& u, T* out, const int64_t* os, int64_t scratch_size,
                       const MakeRows& make_rows) {
  const UpsampleGeom<A>& g = u.geom;
  const int64_t C = u.C, Wp = up_scratch_width(u.W);
  const int64_t rows = up_band_rows(u.N, C, u.H, u.W, sizeof(A), sizeof(T));
  int64_t am = 1;
  const std::vector<UpBand> bands = up_band_plan(g, rows, &am);
  std::vector<A> scratch(static_cast<size_t>(u.N * C * rows * Wp));
  std::vector<A> carry(static_cast<size_t>(u.N * C * am * u.w));
  const int64_t ssc = rows * Wp, ssn = C * ssc, ca = am * u.w, can = C * ca;
  const int64_t gw = (u.W + G - 1) / G;
  for (const UpBand& bd : bands) {
    const int64_t bg = (bd.Y1 - bd.Y0) * gw, nq = u.N * bg;
#pragma omp parallel if (nq > 1)
    {
      std::vector<A> scr(scratch_size + 1);
      const auto row = make_rows(scr.data());
#pragma omp for schedule(static)
      for (int64_t t = 0; t < nq; ++t) {
        const int64_t b = t / bg, r = t - b * bg, yr = r / gw, X0 = (r - yr * gw) * G;
        row(b * u.H + bd.Y0 + yr, X0, std::min<int64_t>(G, u.W - X0), scratch.data() + b * ssn + yr * Wp + X0, ssc);
      }
    }
    const int64_t bw = (bd.I1 - bd.I0) * u.w, ns = u.N * bw;
#pragma omp parallel for schedule(static) if (ns > 1)
    for (int64_t t = 0; t < ns; ++t) {
      const int64_t b = t / bw, r = t - b * bw, i = bd.I0 + r / u.w, j = r - (r / u.w) * u.w;
      const UpBandWindow wd = up_band_window(g, i, j, bd.Y0, bd.Y1);
      const A* s = scratch.data() + b * ssn;
      A* cp = carry.data() + b * can + (i % am) * u.w + j;
      T* o = out + b * os[0] + i * os[2] + j * os[3];
      const UpColWeight<A> wx{g.ax, j};
      for (int c0 = 0; c0 < C; c0 += 8)  // (8 consecutive channels at a time; per channel the CUDA kernel's sum)
        up_gather_band<8, A, T>(g, wd, i, wx, bd.Y0, s, Wp, ssc, cp, ca, o, os[1], c0, 1, static_cast<int>(C));
    }
  }
}

// for_each_block, except that a full block of contiguous pixels whose type is already A is not copied:
// body(first_pixel, n, offsets, channels, ld, scratch) reads channel c of lane p at channels[c * ld + p],
// from x itself (ld = sC) or from the gathered tile (ld = kBlock). Streaming from x saves a copy of
// every input byte; the tile stays for strided layouts, half types and the last, partial block.
// With up (fused upsampling), every block's tile is interpolated from x (the low-resolution logits) and
// g, P describe the destination pixels.
template <typename T, typename A, typename Body>
void for_each_block_direct(const T* x, int64_t C, int64_t sC, const PixelGeom& g, int64_t P,
                           int64_t scratch_size, const Body& body, const Upsample<A>* up = nullptr) {
  parallel_blocks<A>(C, g, P, scratch_size, [&](int64_t i0, int64_t n, int64_t* offs, A* tile) {
    if (up) {
      gather_upsampled(x, *up, i0, n, tile);
      body(i0, n, offs, static_cast<const A*>(tile), kBlock, tile + C * kBlock);
      return;
    }
    const bool unit = unit_stride(offs, n);
    if constexpr (std::is_same_v<T, A>) {
      if (unit && n == kBlock) {
        prefetch_block_after_next(x, C, sC, offs[0], i0, P);
        body(i0, n, offs, x + offs[0], sC, tile + C * kBlock);
        return;
      }
    }
    gather(x, C, sC, offs, n, unit, tile);
    body(i0, n, offs, static_cast<const A*>(tile), kBlock, tile + C * kBlock);
  });
}

// Writes a (C, kBlock) tile of gradients to y (same strides as x) for the block's n lanes.
template <typename T, typename A>
inline void scatter(T* y, int64_t C, int64_t sC, const int64_t* offs, int64_t n, const A* tile) {
  if (unit_stride(offs, n)) {
    for (int64_t c = 0; c < C; ++c) {
      T* yc = y + c * sC + offs[0];
      const A* tc = tile + c * kBlock;
      for (int64_t p = 0; p < n; ++p) yc[p] = static_cast<T>(tc[p]);
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    T* yc = y + c * sC;
    const A* tc = tile + c * kBlock;
    for (int64_t p = 0; p < n; ++p) yc[offs[p]] = static_cast<T>(tc[p]);
  }
}

// The fixed-order sum of per-block partials: the result does not depend on the number of threads.
template <typename A>
inline void finish_reduction(const std::vector<double>& part, const std::vector<int64_t>& cnt, A* loss_sum,
                             int64_t* count) {
  double s = 0;
  int64_t c = 0;
  for (size_t b = 0; b < part.size(); ++b) {
    s += part[b];
    c += cnt[b];
  }
  if (loss_sum) *loss_sum = static_cast<A>(s);
  *count = c;
}

}  // namespace cpu
}  // namespace hss
