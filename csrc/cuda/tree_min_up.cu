// The CUDA tree-min and tree BCE with fused upsampling (docs/MATH.md §3, §4.1, §6), the host entry points
// tree_fwd_up_group / tree_bwd_up_group that tree_min.cu's op functions call (tree_min.cuh; compiled on
// its own so that nvcc builds it beside tree_min.cu). Focal modes, extrema and weights as in tree_min.cu's
// kernels.
// * Fused upsampling (kernels *_up_*): the same group functions on G destination pixels of one row per
//   thread, each channel of the G lanes interpolated from four source values (UpLanes, upsample_math.h): the
//   forward (tree_fwd_up_group_kernel) and the banded backward (upsample.cuh): per band of destination rows,
//   tree_up_rows_group_kernel writes each pixel's gradient row once to a scratch (G lanes a store, the warp's
//   stores contiguous), then up_gather_kernel adds the rows onto the source pixels.
#include "tree_min.cuh"
#include "upsample.cuh"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace hss {
namespace cuda {
namespace {

// The forward with fused upsampling: G = lanes_for<T>() destination pixels of one row per thread, X0 = G gx ..
// (gw groups per row, ng = N H gw threads), each channel of the G lanes interpolated through UpLanes, then
// tree_forward_group as without upsampling; lanes past the row's end repeat its last pixel and are discarded.
template <typename T, typename A, int kF, bool kExtrema, bool kW>
__global__ void __launch_bounds__(kThreads)
tree_fwd_up_group_kernel(const T* __restrict__ x, int64_t sC, UpsampleGeom<A> u, const int64_t* __restrict__ tgt,
                         PixelGeom gt, int64_t ng, int64_t gw, const int32_t* __restrict__ tree_index, int V, int L,
                         int D, const A* __restrict__ k, A gamma, A eps, int64_t ignore_index, A* __restrict__ lp,
                         double* part, int64_t* cnt, PixelWeights<A> w, double* wpart) {
  constexpr int G = lanes_for<T>();
  extern __shared__ __align__(16) unsigned char smem[];
  const TreeIndex ti = unpack_tree(tree_index, V, L, D);
  const NodeTable<A> nodes = load_node_table<A>(smem, ti, k);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double sum = 0, ws = 0;
  int64_t c = 0;
  if (t < ng) {
    const int64_t rr = t / gw, X0 = (t - rr * gw) * G;
    const int64_t n = u.W - X0 < G ? u.W - X0 : G;
    const int64_t i0 = rr * u.W + X0;
    int y[G];
    LabelKind kind[G];
    const bool any = load_group_labels<G>(tgt, gt, i0, n, L, ignore_index, y, kind);
    A l[G];
    if (any) {
      SharedLanes<A, G> acc{smem + node_table_bytes<A>(V) + threadIdx.x * sizeof(Lanes<A, G>),
                            static_cast<int>(blockDim.x * sizeof(Lanes<A, G>))};
      tree_forward_group<kF, kExtrema, A, G>(up_lanes<T, A, G>(x, sC, u, rr, X0, n), nodes, acc, ti, y, k, gamma,
                                             eps, l);
    }
    add_group_losses<kW, G, A>(l, y, kind, i0, n, w, lp, sum, c, ws);
  }
  block_partial(sum, c, part, cnt);
  if constexpr (kW)
    if (wpart) block_weight_partial(ws, wpart);
}

// Fused upsampling, the banded backward's rows kernel (upsample.cuh): G = lanes_for<T>() destination pixels of
// one row of the band [Y0, Y0 + rows) per thread, X0 = G gx (gw groups per row, nq = N rows gw threads), their
// channels interpolated through UpLanes (the tree-min: UpLanesKept, its top-down pass reading the bottom-up
// pass's values back from the lanes' scratch rows), their gradient rows (tree_min_backward_group, or the tree
// BCE's tree_bce_backward_group; the unlabelled lanes' rows 0 or NaN) stored to the scratch G lanes at a time
// (ScratchLanes: on float one 16-byte store per channel, the warp's stores contiguous). Shared memory as the
// backwards without upsampling: the node table, then (tree-min) the depth slots and node bits of the G lanes.
// (__launch_bounds__ with one block per SM: ptxas otherwise held some 8-lane (16-bit logits) instantiations at
// 128 registers with spills.)
template <typename T, typename A, int kF, bool kExtrema, bool kW>
__global__ void __launch_bounds__(kThreads, 1)
tree_up_rows_group_kernel(const A* __restrict__ grad, PixelGeom gg, const T* __restrict__ x, int64_t sC,
                          UpsampleGeom<A> u, int64_t Y0, int64_t bg, int64_t gw, int64_t nq,
                          const int64_t* __restrict__ tgt, PixelGeom gt, const int32_t* __restrict__ tree_index, int V,
                          int L, int D, const A* __restrict__ k, A gamma, A eps, int64_t ignore_index,
                          A* __restrict__ scratch, int64_t ssn, int64_t ssc, int64_t ssy, PixelWeights<A> w) {
  constexpr int G = lanes_for<T>();
  extern __shared__ __align__(16) unsigned char smem[];
  const TreeIndex ti = unpack_tree(tree_index, V, L, D);
  const NodeTable<A> nodes = load_node_table<A>(smem, ti, k);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= nq) return;
  const int64_t b = t / bg, r = t - b * bg, yr = r / gw, X0 = (r - yr * gw) * G;
  const int64_t n = u.W - X0 < G ? u.W - X0 : G;
  const int64_t rr = b * u.H + Y0 + yr, i0 = rr * u.W + X0;
  int y[G];
  bool valid[G], bad[G];
  A g[G];
  load_group_rows<kW, G>(tgt, gt, grad, gg, i0, n, L, ignore_index, w, y, valid, bad, g);
  const UpLanes<T, A, G> col = up_lanes<T, A, G>(x, sC, u, rr, X0, n);
  const ScratchLanes<A, G> out{scratch + b * ssn + yr * ssy + X0, ssc};
  if constexpr (kExtrema) {
    const int threads = static_cast<int>(blockDim.x);
    unsigned char* slots = smem + node_table_bytes<A>(V);
    const SharedLanes<A, G> acc{slots + threadIdx.x * sizeof(Lanes<A, G>),
                                static_cast<int>(threads * sizeof(Lanes<A, G>))};
    unsigned char* words = slots + static_cast<size_t>(D + 1) * threads * sizeof(Lanes<A, G>);
    const SharedLanes<uint32_t, G> bits{words + threadIdx.x * sizeof(Lanes<uint32_t, G>),
                                        static_cast<int>(threads * sizeof(Lanes<uint32_t, G>))};
    // the bottom-up pass's interpolated logits kept in the lanes' scratch rows for the top-down pass
    tree_min_backward_group<kF, A, G>(UpLanesKept<T, A, G>{col, out.p, ssc}, nodes, acc, bits, out, ti, y, valid,
                                      bad, k, gamma, eps, g);
  } else {
    tree_bce_backward_group<kF, A, G>(col, nodes, out, ti, y, valid, bad, k, gamma, eps, g);
  }
}

template <typename F>
void with_extrema(bool extrema, F&& f) {
  if (extrema)
    f(std::true_type{});
  else
    f(std::false_type{});
}

}  // namespace

template <typename T>
void tree_fwd_up_group(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tree_index,
                       const at::Tensor& node_weights, int64_t L, int64_t D, double gamma, double eps,
                       int64_t ignore_index, bool per_pixel, bool extrema, bool align_corners, at::Tensor& loss,
                       at::Tensor& count, const PixelWeights<at::opmath_type<T>>& w, at::Tensor& weight_sum,
                       cudaStream_t stream) {
  using A = at::opmath_type<T>;
  constexpr int G = lanes_for<T>();
  const int V = logits.size(1);
  const int64_t gw = (target.size(2) + G - 1) / G, ng = target.size(0) * target.size(1) * gw;
  const int64_t nb = num_blocks(ng, kThreads);
  Partials partials(logits, nb, w.cw != nullptr);
  const UpsampleGeom<A> u = UpsampleGeom<A>::make(logits.sizes().data(), logits.strides().data(), target.size(1),
                                                  target.size(2), align_corners);
  with_focal_mode(static_cast<A>(gamma), static_cast<A>(eps), [&](auto f) {
    with_extrema(extrema, [&](auto e) {
      with_weights(w.any(), [&](auto weighted) {
        auto kernel = tree_fwd_up_group_kernel<T, A, decltype(f)::value, decltype(e)::value,
                                               decltype(weighted)::value>;
        const size_t smem = group_smem_bytes<A, G>(V, D, kThreads, extrema);
        allow_smem(kernel, smem, kThreads * (sizeof(double) + sizeof(int64_t)), logits.get_device(), "tree_min", V,
                   "nodes");
        kernel<<<nb, kThreads, smem, stream>>>(
            logits.data_ptr<T>(), logits.stride(1), u, target.data_ptr<int64_t>(), geom(target), ng, gw,
            tree_index.data_ptr<int32_t>(), V, L, D, node_weights.data_ptr<A>(), static_cast<A>(gamma),
            static_cast<A>(eps), ignore_index, per_pixel ? loss.data_ptr<A>() : nullptr, partials.p(), partials.c(),
            w, partials.w());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  partials.finish<A>(loss, count, weight_sum, per_pixel, stream);
}

template <typename T>
void tree_bwd_up_group(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& target,
                       const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D, double gamma,
                       double eps, int64_t ignore_index, bool extrema, bool align_corners,
                       const PixelWeights<at::opmath_type<T>>& w, at::Tensor& out, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  const int V = x.size(1);
  constexpr int G = lanes_for<T>();
  // the node table and, for the tree-min, the G lanes' depth slots and node bits: fewer threads per block
  // while that is over 48 KiB
  int threads = kThreads;
  while (extrema && threads > 32 && min_bwd_group_smem_bytes<A, G>(V, D, threads) > kDefaultSmem) threads /= 2;
  const size_t smem = extrema ? min_bwd_group_smem_bytes<A, G>(V, D, threads) : node_table_bytes<A>(V);
  const UpsampleGeom<A> u =
      UpsampleGeom<A>::make(x.sizes().data(), x.strides().data(), target.size(1), target.size(2), align_corners);
  const int64_t gw = (u.W + G - 1) / G;
  with_focal_mode(static_cast<A>(gamma), static_cast<A>(eps), [&](auto f) {
    with_extrema(extrema, [&](auto e) {
      with_weights(w.any(), [&](auto weighted) {
        auto kernel = tree_up_rows_group_kernel<T, A, decltype(f)::value, decltype(e)::value,
                                                decltype(weighted)::value>;
        allow_smem(kernel, smem, 0, x.get_device(), "tree_min", V, "nodes");
        up_backward_bands<T, A>(
            x, target, out, align_corners, extrema ? "tree_min_loss" : "tree_bce_loss", stream,
            [&](const UpBand& bd, A* scratch, int64_t ssn, int64_t ssc, int64_t ssy) {
              const int64_t bg = (bd.Y1 - bd.Y0) * gw, nq = x.size(0) * bg;
              kernel<<<num_blocks(nq, threads), threads, smem, stream>>>(
                  grad.data_ptr<A>(), grad_geom(grad, target), x.data_ptr<T>(), x.stride(1), u, bd.Y0, bg,
                  gw, nq, target.data_ptr<int64_t>(), geom(target), tree_index.data_ptr<int32_t>(), V, L, D,
                  node_weights.data_ptr<A>(), static_cast<A>(gamma), static_cast<A>(eps), ignore_index, scratch,
                  ssn, ssc, ssy, w);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            });
      });
    });
  });
}

#define HSS_TREE_MIN_UP(T)                                                                                            \
  template void tree_fwd_up_group<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,     \
                                     int64_t, int64_t, double, double, int64_t, bool, bool, bool, at::Tensor&,       \
                                     at::Tensor&, const PixelWeights<at::opmath_type<T>>&, at::Tensor&, cudaStream_t); \
  template void tree_bwd_up_group<T>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,     \
                                     const at::Tensor&, int64_t, int64_t, double, double, int64_t, bool, bool,       \
                                     const PixelWeights<at::opmath_type<T>>&, at::Tensor&, cudaStream_t);
HSS_TREE_MIN_UP(float)
HSS_TREE_MIN_UP(double)
HSS_TREE_MIN_UP(c10::Half)
HSS_TREE_MIN_UP(c10::BFloat16)
#undef HSS_TREE_MIN_UP

}  // namespace cuda
}  // namespace hss
