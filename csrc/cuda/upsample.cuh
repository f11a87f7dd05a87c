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
// and NCHW's contiguous axis), kUpGatherCh warps on the channels; a thread sums kUpGatherK channels (c,
// c + kUpGatherCh, ...) at once, the interpolation weights computed once for them.
constexpr int kUpGatherPix = 32;
constexpr int kUpGatherCh = 8;
constexpr int kUpGatherK = 8;

// The band [Y0, Y1)'s source pixels: ns = N x (I1 - I0) x w of them, bw = (I1 - I0) x w per image, from
// source row I0; thread (p, c) of a block runs up_gather_band for channels c, c + kUpGatherCh, ... of one
// pixel, kUpGatherK of them at a time. The scratch: image stride ssn, channel stride ssc, row stride ssy; the
// carry: image stride can, channel stride am w. out has the logits' strides (oN, oC, oh, ow).
template <typename T, typename A>
__global__ void __launch_bounds__(kUpGatherPix * kUpGatherCh)
up_gather_kernel(const A* __restrict__ scratch, A* __restrict__ carry, T* __restrict__ out, UpsampleGeom<A> u,
                 int64_t Y0, int64_t Y1, int64_t I0, int64_t ns, int64_t bw, int C, int64_t ssn, int64_t ssc,
                 int64_t ssy, int64_t am, int64_t oN, int64_t oC, int64_t oh, int64_t ow) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kUpGatherPix + threadIdx.x;
  if (t >= ns) return;
  const int64_t b = t / bw, r = t - b * bw, di = r / u.w, i = I0 + di, j = r - di * u.w;
  const UpBandWindow wd = up_band_window(u, i, j, Y0, Y1);
  const A* s = scratch + b * ssn;
  const int64_t ca = am * u.w;
  A* cp = carry + b * C * ca + (i % am) * u.w + j;
  T* o = out + b * oN + i * oh + j * ow;
  for (int c0 = threadIdx.y; c0 < C; c0 += kUpGatherCh * kUpGatherK)  // sm90: trips=cdiv(C, 64)
    up_gather_band<kUpGatherK, A, T>(u, wd, i, j, Y0, s, ssy, ssc, cp, ca, o, oC, c0, kUpGatherCh, C);
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
  for (const UpBand& bd : bands) {  // (host)
    rows_kernel(bd, scratch.data_ptr<A>(), ssn, ssc, Wp);
    const int64_t bw = (bd.I1 - bd.I0) * w, ns = N * bw;
    up_gather_kernel<T, A><<<num_blocks(ns, kUpGatherPix), dim3(kUpGatherPix, kUpGatherCh), 0, stream>>>(
        scratch.data_ptr<A>(), carry.data_ptr<A>(), out.data_ptr<T>(), u, bd.Y0, bd.Y1, bd.I0, ns, bw,
        static_cast<int>(C), ssn, ssc, Wp, am, out.stride(0), out.stride(1), out.stride(2), out.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace cuda
}  // namespace hss
