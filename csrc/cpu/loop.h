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

// for_each_block, except that a full block of contiguous pixels whose type is already A is not copied:
// body(first_pixel, n, offsets, channels, ld, scratch) reads channel c of lane p at channels[c * ld + p],
// from x itself (ld = sC) or from the gathered tile (ld = kBlock). Streaming from x saves a copy of
// every input byte; the tile stays for strided layouts, half types and the last, partial block.
template <typename T, typename A, typename Body>
void for_each_block_direct(const T* x, int64_t C, int64_t sC, const PixelGeom& g, int64_t P,
                           int64_t scratch_size, const Body& body) {
  parallel_blocks<A>(C, g, P, scratch_size, [&](int64_t i0, int64_t n, int64_t* offs, A* tile) {
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
