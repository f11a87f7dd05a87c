// The CPU pixel loop shared by the ops: OpenMP over blocks of kBlock pixels. Each block's channels are
// gathered once through the strides into a (C, kBlock) tile of the accumulation type, so that the
// per-pixel math of hss_math.h reads a pixel's channels from cache whatever the layout, and nothing is
// allocated per pixel.
#pragma once

#include <algorithm>
#include <vector>

#include "hss_math.h"

namespace hss {
namespace cpu {

constexpr int64_t kBlock = 64;

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

// body(first_pixel, n, offsets, tile, scratch): offsets[p] is lane p's offset in x; scratch holds
// `scratch_size` values of the thread. Blocks are numbered first_pixel / kBlock.
template <typename T, typename A, typename Body>
void for_each_block(const T* x, int64_t C, int64_t sC, const PixelGeom& g, int64_t P, int64_t scratch_size,
                    const Body& body) {
  const int64_t nb = (P + kBlock - 1) / kBlock;
#pragma omp parallel if (nb > 1)
  {
    std::vector<A> tile(C * kBlock + scratch_size);
    int64_t offs[kBlock];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i0 = b * kBlock;
      const int64_t n = std::min(kBlock, P - i0);
      for (int64_t p = 0; p < n; ++p) offs[p] = g.offset(i0 + p);
      for (int64_t c = 0; c < C; ++c) {
        const T* xc = x + c * sC;
        A* tc = tile.data() + c * kBlock;
        for (int64_t p = 0; p < n; ++p) tc[p] = static_cast<A>(xc[offs[p]]);
      }
      body(i0, n, offs, tile.data(), tile.data() + C * kBlock);
    }
  }
}

// Writes a (C, kBlock) tile of gradients to y (same strides as x) for the block's n lanes.
template <typename T, typename A>
inline void scatter(T* y, int64_t C, int64_t sC, const int64_t* offs, int64_t n, const A* tile) {
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
