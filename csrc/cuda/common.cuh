// Pieces shared by the CUDA kernels: strided channel accessors for csrc/include/*_math.h, and the
// deterministic two-stage batch reduction (per-block partials in a fixed tree order, then one block
// summing them in a fixed order: no float atomics, the same bits on every run).
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would need the cuSPARSE headers, which a CUDA toolkit
// without its math libraries lacks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"

#include <type_traits>

namespace hss {
namespace cuda {

constexpr int kThreads = 256;  // forward kernels; a power of two for the block reduction

// Raises a kernel's dynamic shared memory limit past the default 48 KiB when smem (dynamic) plus
// static_smem needs it; past the GPU's opt-in maximum, an error naming the op and its tree ("a tree of
// <n> <unit>").
template <typename K>
void allow_smem(K kernel, size_t smem, size_t static_smem, int device, const char* op, int64_t n, const char* unit) {
  constexpr size_t kDefaultSmem = 48 * 1024;
  if (smem + static_smem <= kDefaultSmem) return;
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem + static_smem <= static_cast<size_t>(limit), op, ": a tree of ", n, " ", unit, " needs ",
              smem + static_smem, " bytes of shared memory per block, more than this GPU's ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

// One pixel's channel c at p[c * s]: neighbouring threads hold neighbouring pixels, so a warp reading
// the same channel reads contiguous memory (NCHW). The losses count channels in int, decode in int64_t.
template <typename T, typename A>
struct GlobalCol {
  const T* p;
  int64_t s;
  template <typename I>
  __device__ A operator()(I c) const { return static_cast<A>(p[c * s]); }  // sm90: logits
};

template <typename T, typename A>
struct GlobalOut {
  T* p;
  int64_t s;
  __device__ void operator()(int c, A v) const { p[c * s] = static_cast<T>(v); }
};

// Per-thread scratch in shared memory laid out (c, thread): bank-conflict free whatever c each thread
// of a warp touches, since the bank is the thread's lane.
template <typename A>
struct SharedCol {
  A* p;
  int s;
  __device__ A& operator()(int c) const { return p[c * s]; }
};

// Sums v and c over the block (blockDim.x == kThreads) in a fixed tree order; thread 0 gets the totals
// in v and c (the other threads keep their own values).
__device__ inline void block_sum(double& v, int64_t& c) {
  __shared__ double sv[kThreads];
  __shared__ int64_t sc[kThreads];
  const int t = threadIdx.x;
  sv[t] = v;
  sc[t] = c;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) {
      sv[t] += sv[t + s];
      sc[t] += sc[t + s];
    }
    __syncthreads();
  }
  if (t == 0) {
    v = sv[0];
    c = sc[0];
  }
}

// Sums v and c over the block (blockDim.x == kThreads) in a fixed order into part/cnt[blockIdx.x].
__device__ inline void block_partial(double v, int64_t c, double* part, int64_t* cnt) {
  block_sum(v, c);
  if (threadIdx.x == 0) {
    part[blockIdx.x] = v;
    cnt[blockIdx.x] = c;
  }
}

// The gradient column of a pixel that is not kLabelValid: 0 when ignored, NaN for a bad label (common.h).
template <typename T, typename A>
__device__ void write_unlabelled_column(T* out, int64_t sC, int channels, LabelKind kind) {
  const T v = static_cast<T>(kind == kLabelBad ? quiet_nan<A>() : A(0));
  for (int j = 0; j < channels; ++j) out[j * sC] = v;  // sm90: trips=C
}

// The class weights' per-block partial (the weighted mean's denominator), summed in block_sum's fixed order;
// every thread of the block calls it, or none (wpart is the same for the whole grid).
__device__ inline void block_weight_partial(double v, double* wpart) {
  int64_t unused = 0;
  block_sum(v, unused);
  if (threadIdx.x == 0) wpart[blockIdx.x] = v;
}

// The second stage (Partials::finish): loss_sum (unless null) and count from the
// partials, weight_sum from the class weights' partials wpart in the same order, or the count without them.
template <typename A>
__global__ void finish_weighted_kernel(const double* part, const int64_t* cnt, const double* wpart, int64_t nb,
                                       A* loss_sum, int64_t* count, A* weight_sum) {
  double v = 0, wv = 0;
  int64_t c = 0;
  for (int64_t b = threadIdx.x; b < nb; b += kThreads) {  // sm90: trips=nb / threads
    v += part[b];
    c += cnt[b];
    if (wpart) wv += wpart[b];
  }
  block_sum(v, c);
  if (wpart) {
    int64_t unused = 0;
    block_sum(wv, unused);
  }
  if (threadIdx.x == 0) {
    if (loss_sum) *loss_sum = static_cast<A>(v);
    *count = c;
    *weight_sum = wpart ? static_cast<A>(wv) : static_cast<A>(c);
  }
}

// A forward's partial buffers for nb blocks (loss, count and, with class weights, the weight sum) and the
// launch of the second stage, which writes loss (unless per_pixel), count and weight_sum.
struct Partials {
  at::Tensor part, cnt, wpart;
  Partials(const at::Tensor& like, int64_t nb, bool class_weights)
      : part(at::empty({nb}, like.options().dtype(at::kDouble))),
        cnt(at::empty({nb}, like.options().dtype(at::kLong))) {
    if (class_weights) wpart = at::empty({nb}, like.options().dtype(at::kDouble));
  }
  double* p() { return part.data_ptr<double>(); }
  int64_t* c() { return cnt.data_ptr<int64_t>(); }
  double* w() { return wpart.defined() ? wpart.data_ptr<double>() : nullptr; }
  template <typename A>
  void finish(at::Tensor& loss, at::Tensor& count, at::Tensor& weight_sum, bool per_pixel, cudaStream_t stream) {
    finish_weighted_kernel<A><<<1, kThreads, 0, stream>>>(p(), c(), w(), part.numel(),
                                                          per_pixel ? nullptr : loss.data_ptr<A>(),
                                                          count.data_ptr<int64_t>(), weight_sum.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The forward's result on an empty batch: the scalar loss (unless per_pixel) and the count are 0.
inline void zero_empty_loss(at::Tensor& loss, at::Tensor& count, bool per_pixel) {
  if (!per_pixel) loss.zero_();
  count.zero_();
}

inline int64_t num_blocks(int64_t P, int threads) { return (P + threads - 1) / threads; }

// Runs f(std::bool_constant<kW>{}) with kW = weighted: the host's choice between a kernel's weighted and
// unweighted instantiation (kW false compiles the weight code out).
template <typename F>
void with_weights(bool weighted, F&& f) {
  if (weighted)
    f(std::true_type{});
  else
    f(std::false_type{});
}

}  // namespace cuda
}  // namespace hss
