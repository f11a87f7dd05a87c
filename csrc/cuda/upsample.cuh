// The banded backward with fused upsampling (upsample_math.h, docs/MATH.md §6), shared by the ops whose
// CUDA backward runs it: per band of destination rows [Y0, Y1), the op's rows kernel computes each
// destination pixel's gradient row once into a scratch [N, C, rows, Wp] (accumulation type, destination
// pixels innermost, Wp = up_scratch_width(W)), then up_gather_kernel adds it onto the source pixels of the
// band's source rows, carrying the partial sums of rows whose window goes on past the band in a carry
// [N, C, am, w]. Two launches per band, no host synchronisation, no atomics: the same bits on every run and
// for every band height.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "common.cuh"
#include "upsample_math.h"

#include <limits>
#include <vector>

namespace hss {
namespace cuda {
namespace {

// up_gather_kernel's block: kUpGatherPix consecutive source pixels across a warp (the scratch's, the carry's
// and NCHW's contiguous axis), up_gather_warps(C) warps on the channels (the fewest passes of at most
// kUpGatherChMax warps, then the fewest warps); a thread sums kUpGatherK channels (c, c + warps, ...), the
// interpolation weights computed once for them. The column weights of the block's source pixels' windows are a
// table in shared memory, up_gather_xw columns of kUpGatherPix pixels, computed once per block by all its warps.
// Two blocks of up to kUpGatherChMax warps fit an SM (__launch_bounds__): ptxas keeps the kernel in 96 registers
// without a spill, where alone it took 128 (one block of 9 or 10 warps per SM; the sm_90 model, float32 and bfloat16).
constexpr int kUpGatherPix = 32;
constexpr int kUpGatherK = 8;
constexpr int kUpGatherChMax = 10;
// The table's bytes at most: 48 KiB (a block's static and dynamic shared memory without opting in to more) less
// 2 KiB, which hold the kernel's static array of its pixels' windows (kUpGatherPix UpBandWindow, 1.25 KiB).
constexpr int64_t kUpGatherSmem = 46 * 1024;

inline int up_gather_warps(int64_t C) {
  const int64_t n = C > 0 ? (C + kUpGatherK - 1) / kUpGatherK : 1, passes = (n + kUpGatherChMax - 1) / kUpGatherChMax;
  return static_cast<int>((n + passes - 1) / passes);  // (66 channels: 9 warps, one pass; 147: 10 warps, two)
}

// The table's columns: the widest window of destination columns of a source column, or 0 (the weights computed
// in the loop instead) when that table would pass kUpGatherSmem. Host code.
template <typename A>
inline int up_gather_xw(const UpsampleGeom<A>& u) {
  int64_t xw = 0;
  for (int64_t j = 0; j < u.w; ++j) {
    int64_t lo, hi;
    UpsampleGeom<A>::window(u.ax, u.W, j, lo, hi);
    if (hi - lo > xw) xw = hi - lo;
  }
  return xw * kUpGatherPix * static_cast<int64_t>(sizeof(A)) <= kUpGatherSmem ? static_cast<int>(xw) : 0;
}

// The band [Y0, Y1)'s source pixels: ns = N x (I1 - I0) x w of them, bw = (I1 - I0) x w per image, from
// source row I0; thread (p, c) of a block runs up_gather_band for channels c, c + blockDim.y, ... of one
// pixel, kUpGatherK of them at a time. The scratch: image stride ssn, channel stride ssc, row stride ssy; the
// carry: image stride can, channel stride am w. out has the logits' strides (oN, oC, oh, ow). xw: the column
// table's width (up_gather_xw; dynamic shared memory xw kUpGatherPix sizeof(A)), 0 for none.
template <typename T, typename A>
__global__ void __launch_bounds__(kUpGatherPix * kUpGatherChMax, 2)
up_gather_kernel(const A* __restrict__ scratch, A* __restrict__ carry, T* __restrict__ out, UpsampleGeom<A> u,
                 int64_t Y0, int64_t Y1, int64_t I0, int64_t ns, int64_t bw, int C, int64_t ssn, int64_t ssc,
                 int64_t ssy, int64_t am, int64_t oN, int64_t oC, int64_t oh, int64_t ow, int xw) {
  extern __shared__ __align__(16) unsigned char up_gather_smem[];
  A* const table = reinterpret_cast<A*>(up_gather_smem);
  const int cs = blockDim.y;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kUpGatherPix + threadIdx.x;
  const bool live = t < ns;
  const int64_t tt = live ? t : ns - 1;  // (a thread past the band fills its table column, then leaves)
  const int64_t b = tt / bw, r = tt - b * bw, di = r / u.w, i = I0 + di, j = r - di * u.w;
  // The block's windows (four bisections each) found by its first warp, shared with the others.
  __shared__ UpBandWindow windows[kUpGatherPix];
  static_assert(sizeof(windows) <= 48 * 1024 - kUpGatherSmem, "the windows and the table pass 48 KiB");
  if (threadIdx.y == 0) windows[threadIdx.x] = up_band_window(u, i, j, Y0, Y1);  // sm90: share=1/CH
  __syncthreads();
  const UpBandWindow wd = windows[threadIdx.x];
  for (int k = threadIdx.y; k < xw; k += cs)  // sm90: trips=cdiv(XW, CH)
    table[k * kUpGatherPix + threadIdx.x] =
        wd.xlo + k < wd.xhi ? UpsampleGeom<A>::weight(u.ax, wd.xlo + k, j) : A(0);
  if (xw > 0) __syncthreads();  // (xw is the same for the whole grid)
  if (!live) return;
  const A* s = scratch + b * ssn;
  const int64_t ca = am * u.w;
  A* cp = carry + b * C * ca + (i % am) * u.w + j;
  T* o = out + b * oN + i * oh + j * ow;
  if (xw == 0) {  // a window too wide for the table; sm90: cold
    const UpColWeight<A> wx{u.ax, j};
    for (int c0 = threadIdx.y; c0 < C; c0 += cs * kUpGatherK)  // sm90: trips=cdiv(C, 8 * CH)
      up_gather_band<kUpGatherK, A, T>(u, wd, i, wx, Y0, s, ssy, ssc, cp, ca, o, oC, c0, cs, C);
    return;
  }
  const UpColTable<A> wx{table + threadIdx.x, kUpGatherPix, wd.xlo};
  for (int c0 = threadIdx.y; c0 < C; c0 += cs * kUpGatherK)  // sm90: trips=cdiv(C, 8 * CH)
    up_gather_band<kUpGatherK, A, T>(u, wd, i, wx, Y0, s, ssy, ssc, cp, ca, o, oC, c0, cs, C);
}

// Runs the banded backward of x's (N, C, h, w) logits to the target's (N, H, W) pixels into out (x's strides):
// per band, rows(band, scratch, ssn, ssc, ssy) launches the op's rows kernel (pixel (Y, X) of image b of the
// band writes channel c of its row at scratch[b ssn + c ssc + (Y - Y0) ssy + X]), then up_gather_kernel. The band and
// window tables are computed on the host (up_band_plan): the kernels take scalars only.
template <typename T, typename A, typename Rows>
void up_backward_bands(const at::Tensor& x, const at::Tensor& target, at::Tensor& out, bool align_corners,
                       const char* op, cudaStream_t stream, const Rows& rows_kernel) {
  const int64_t N = x.size(0), C = x.size(1), H = target.size(1), W = target.size(2), w = x.size(3);
  const UpsampleGeom<A> u = UpsampleGeom<A>::make(x.sizes().data(), x.strides().data(), H, W, align_corners);
  const int64_t Wp = up_scratch_width(W);
  const int64_t rows = up_band_rows(N, C, H, W, sizeof(A), x.element_size());
  int64_t am = 1;
  const std::vector<UpBand> bands = up_band_plan(u, rows, &am);
  // the grids are 1-D: at most 2^31 - 1 blocks (of at least 32 destination pixels; of 32 source pixels)
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(
      num_blocks(N * rows * W, 32) <= kMaxBlocks && num_blocks(N * am * w, kUpGatherPix) <= kMaxBlocks, op,
      " with upsample='bilinear' on CUDA: ", N, " images of ", H, " x ", W,
      " pixels are past the backward's grid limit (", kMaxBlocks, " blocks per band)");
  at::Tensor scratch = at::empty({N * C * rows * Wp}, x.options().dtype(acc_type(x)));
  at::Tensor carry = at::empty({N * C * am * w}, x.options().dtype(acc_type(x)));
  const int64_t ssc = rows * Wp, ssn = C * ssc;
  const int warps = up_gather_warps(C), xw = up_gather_xw(u);
  const size_t smem = static_cast<size_t>(xw) * kUpGatherPix * sizeof(A);
  for (const UpBand& bd : bands) {  // (host)
    rows_kernel(bd, scratch.data_ptr<A>(), ssn, ssc, Wp);
    const int64_t bw = (bd.I1 - bd.I0) * w, ns = N * bw;
    up_gather_kernel<T, A><<<num_blocks(ns, kUpGatherPix), dim3(kUpGatherPix, warps), smem, stream>>>(
        scratch.data_ptr<A>(), carry.data_ptr<A>(), out.data_ptr<T>(), u, bd.Y0, bd.Y1, bd.I0, ns, bw,
        static_cast<int>(C), ssn, ssc, Wp, am, out.stride(0), out.stride(1), out.stride(2), out.stride(3), xw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace cuda
}  // namespace hss
