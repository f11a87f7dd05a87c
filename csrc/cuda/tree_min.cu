// Focal tree-min loss (docs/MATH.md §3) and the tree BCE (§4.1), one kernel family: the CUDA
// implementation of tree_min_fwd and tree_min_bwd (schemas and contracts in csrc/ops.cpp). One thread
// per pixel runs the O(V) per-pixel code of tree_min_math.h. Each block first copies the tree's node
// table in pre-order into shared memory (one broadcast read per node afterwards); each thread keeps its
// D + 1 per-depth values there, laid out (depth, thread), and the tree-min backward its 2 bits per node
// packed in 32-bit words, laid out (word, thread). With fused upsampling (kUp) the forward reads each
// channel from four source values (upsample_math.h) and the backward runs one thread per source pixel,
// gathering the gradient rows of the destination pixels whose stencil holds it.
#include "checks.h"
#include "common.cuh"
#include "tree_min_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace hss {
namespace cuda {
namespace {

// Shared memory of a block: the pre-order node table (V TreeNodes, read by every thread of a warp at
// once: a broadcast), then the per-depth scratch, (D + 1) slots laid out (slot, thread), then for the
// tree-min backward its packed node bits, tree_bit_words(V) words laid out (word, thread); a thread's
// slot or word sits in its own bank.
template <typename A>
__host__ __device__ inline size_t node_table_bytes(int V) {
  return static_cast<size_t>(V) * sizeof(TreeNode<A>);
}
template <typename A>
inline size_t tree_smem_bytes(int V, int D, int threads, bool extrema, bool backward) {
  return node_table_bytes<A>(V) + (extrema ? static_cast<size_t>(D + 1) * threads * sizeof(A) : 0) +
         (extrema && backward ? static_cast<size_t>(tree_bit_words(V)) * threads * sizeof(uint32_t) : 0);
}

// Fills the block's node table; every thread of the block calls it (it synchronises the block).
template <typename A>
__device__ inline NodeTable<A> load_node_table(unsigned char* smem, const TreeIndex& ti, const A* k) {
  TreeNode<A>* nodes = reinterpret_cast<TreeNode<A>*>(smem);
  for (int p = threadIdx.x; p < ti.V; p += blockDim.x) nodes[p] = tree_node(ti, k, p);  // sm90: trips=cdiv(V, threads)
  __syncthreads();
  return NodeTable<A>{nodes};
}

template <typename T, typename A, bool kUp>
__global__ void __launch_bounds__(kThreads)
tree_min_fwd_kernel(const T* __restrict__ x, PixelGeom gx, int64_t sC, const int64_t* __restrict__ tgt,
                    PixelGeom gt, int64_t P, const int32_t* __restrict__ tree_index, int V, int L, int D,
                    const A* __restrict__ k, A gamma, A eps, int64_t ignore_index, bool extrema, A* __restrict__ lp,
                    double* part, int64_t* cnt, UpsampleGeom<A> u) {
  extern __shared__ __align__(16) unsigned char smem[];
  const TreeIndex ti = unpack_tree(tree_index, V, L, D);
  const NodeTable<A> nodes = load_node_table<A>(smem, ti, k);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  A l = A(0);
  int64_t c = 0;
  if (i < P) {
    const int64_t y = tgt[gt.offset(i)];
    const LabelKind kind = label_kind(y, L, ignore_index);
    if (kind == kLabelValid) {  // sm90: cold
      SharedCol<A> acc{reinterpret_cast<A*>(smem + node_table_bytes<A>(V)) + threadIdx.x,
                       static_cast<int>(blockDim.x)};
      if constexpr (kUp)
        l = tree_forward_pixel<A>(bilinear_col<T, A>(x, sC, u.stencil(i)), nodes, acc, ti, static_cast<int>(y), k,
                                  gamma, eps, extrema);
      else
        l = tree_forward_pixel<A>(GlobalCol<T, A>{x + gx.offset(i), sC}, nodes, acc, ti, static_cast<int>(y), k,
                                  gamma, eps, extrema);
    } else if (kind == kLabelBad) {  // sm90: cold
      l = quiet_nan<A>();  // see common.h: never a table read
    }
    c = kind != kLabelIgnored;
    if (lp) lp[i] = l;
  }
  block_partial(static_cast<double>(l), c, part, cnt);
}

template <typename T, typename A>
__global__ void tree_min_bwd_kernel(const A* __restrict__ grad, PixelGeom gg, const T* __restrict__ x,
                                    T* __restrict__ out, PixelGeom gx, int64_t sC, const int64_t* __restrict__ tgt,
                                    PixelGeom gt, int64_t P, const int32_t* __restrict__ tree_index, int V, int L,
                                    int D, const A* __restrict__ k, A gamma, A eps, int64_t ignore_index,
                                    bool extrema) {
  extern __shared__ __align__(16) unsigned char smem[];
  const TreeIndex ti = unpack_tree(tree_index, V, L, D);
  const NodeTable<A> nodes = load_node_table<A>(smem, ti, k);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= P) return;
  const int64_t y = tgt[gt.offset(i)];
  const int64_t off = gx.offset(i);
  const LabelKind kind = label_kind(y, L, ignore_index);
  if (kind != kLabelValid) {  // sm90: cold
    write_unlabelled_column<T, A>(out + off, sC, V, kind);
    return;
  }
  const int threads = static_cast<int>(blockDim.x);
  A* acc0 = reinterpret_cast<A*>(smem + node_table_bytes<A>(V));
  uint32_t* bits0 = reinterpret_cast<uint32_t*>(acc0 + static_cast<size_t>(D + 1) * threads);
  tree_backward_pixel<A>(GlobalCol<T, A>{x + off, sC}, nodes, SharedCol<A>{acc0 + threadIdx.x, threads},
                         SharedCol<uint32_t>{bits0 + threadIdx.x, threads}, GlobalOut<T, A>{out + off, sC}, ti,
                         static_cast<int>(y), k, gamma, eps, extrema, grad[gg.offset(i)]);
}

// Fused upsampling: one thread per source pixel q of the (N, V, h, w) logits, its V gradient values in acc
// ((N, V, h, w) contiguous, zero) gathered from the destination pixels around it; shared memory as
// tree_min_bwd_kernel's.
template <typename T, typename A>
__global__ void tree_min_bwd_up_kernel(const A* __restrict__ grad, PixelGeom gg, const T* __restrict__ x, int64_t sC,
                                       UpsampleGeom<A> u, int64_t n, const int64_t* __restrict__ tgt, PixelGeom gt,
                                       const int32_t* __restrict__ tree_index, int V, int L, int D,
                                       const A* __restrict__ k, A gamma, A eps, int64_t ignore_index, bool extrema,
                                       A* __restrict__ acc) {
  extern __shared__ __align__(16) unsigned char smem[];
  const TreeIndex ti = unpack_tree(tree_index, V, L, D);
  const NodeTable<A> nodes = load_node_table<A>(smem, ti, k);
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= n) return;
  const int threads = static_cast<int>(blockDim.x);
  A* acc0 = reinterpret_cast<A*>(smem + node_table_bytes<A>(V));
  uint32_t* bits0 = reinterpret_cast<uint32_t*>(acc0 + static_cast<size_t>(D + 1) * threads);
  const int64_t lo = u.h * u.w, b = q / lo, r = q - b * lo, i = r / u.w, j = r - i * u.w;
  gather_source_pixel(u, b, i, j, acc + b * V * lo + r, lo,
                      TreeMinUpsampledRow<T, A, NodeTable<A>, SharedCol<A>, SharedCol<uint32_t>>{
                          {x, sC, u, tgt, gt, grad, gg}, nodes, SharedCol<A>{acc0 + threadIdx.x, threads},
                          SharedCol<uint32_t>{bits0 + threadIdx.x, threads}, ti, k, gamma, eps, ignore_index,
                          extrema});
}

std::tuple<at::Tensor, at::Tensor> tree_min_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                     const at::Tensor& tree_index, const at::Tensor& node_weights,
                                                     int64_t L, int64_t D, double gamma, double eps,
                                                     int64_t ignore_index, bool per_pixel, bool extrema,
                                                     int64_t upsample, bool align_corners) {
  check_tree_min("tree_min_fwd", logits, target, tree_index, node_weights, L, D, upsample);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor loss, count;
  std::tie(loss, count) = new_loss(logits, target, per_pixel);
  const int64_t P = target.numel();
  if (P == 0) {
    zero_empty_loss(loss, count, per_pixel);
    return {loss, count};
  }
  const int64_t nb = num_blocks(P, kThreads);
  Partials partials(logits, nb);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tree_min_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    auto kernel = upsample ? tree_min_fwd_kernel<scalar_t, A, true> : tree_min_fwd_kernel<scalar_t, A, false>;
    const size_t smem = tree_smem_bytes<A>(logits.size(1), D, kThreads, extrema, false);
    // block_sum's static arrays
    allow_smem(kernel, smem, kThreads * (sizeof(double) + sizeof(int64_t)), logits.get_device(), "tree_min",
               logits.size(1), "nodes");
    kernel<<<nb, kThreads, smem, stream>>>(
        logits.data_ptr<scalar_t>(), geom(logits), logits.stride(1), target.data_ptr<int64_t>(), geom(target), P,
        tree_index.data_ptr<int32_t>(), logits.size(1), L, D, node_weights.data_ptr<A>(), static_cast<A>(gamma),
        static_cast<A>(eps), ignore_index, extrema, per_pixel ? loss.data_ptr<A>() : nullptr, partials.p(),
        partials.c(),
        UpsampleGeom<A>::make(logits.sizes().data(), logits.strides().data(), target.size(1), target.size(2),
                              align_corners));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    partials.finish<A>(loss, count, per_pixel, stream);
  });
  return {loss, count};
}

at::Tensor tree_min_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D,
                             double gamma, double eps, int64_t ignore_index, bool extrema, int64_t upsample,
                             bool align_corners) {
  check_tree_min("tree_min_bwd", logits, target, tree_index, node_weights, L, D, upsample);
  check_grad("tree_min_bwd", grad, logits, target);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = dense_logits(logits);
  at::Tensor out = at::empty_like(x);
  const int64_t P = target.numel();
  if (P == 0) return out;
  const int V = x.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tree_min_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    // The node table, D + 1 scratch values per thread and, for tree-min, its packed node bits; fewer
    // threads per block for big trees.
    constexpr size_t kDefaultSmem = 48 * 1024;
    int threads = kThreads;
    while (threads > 32 && tree_smem_bytes<A>(V, D, threads, extrema, true) > kDefaultSmem) threads /= 2;
    const size_t smem = tree_smem_bytes<A>(V, D, threads, extrema, true);
    if (upsample) {
      auto kernel = tree_min_bwd_up_kernel<scalar_t, A>;
      allow_smem(kernel, smem, 0, x.get_device(), "tree_min", V, "nodes");
      at::Tensor acc = at::zeros(x.sizes(), x.options().dtype(acc_type(x)));
      const int64_t n = x.size(0) * x.size(2) * x.size(3);
      kernel<<<num_blocks(n, threads), threads, smem, stream>>>(
          grad.data_ptr<A>(), grad_geom(grad, target), x.data_ptr<scalar_t>(), x.stride(1),
          UpsampleGeom<A>::make(x.sizes().data(), x.strides().data(), target.size(1), target.size(2), align_corners),
          n, target.data_ptr<int64_t>(), geom(target), tree_index.data_ptr<int32_t>(), V, L, D,
          node_weights.data_ptr<A>(), static_cast<A>(gamma), static_cast<A>(eps), ignore_index, extrema,
          acc.data_ptr<A>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      out.copy_(acc);
      return;
    }
    auto kernel = tree_min_bwd_kernel<scalar_t, A>;
    allow_smem(kernel, smem, 0, x.get_device(), "tree_min", V, "nodes");
    kernel<<<num_blocks(P, threads), threads, smem, stream>>>(
        grad.data_ptr<A>(), grad_geom(grad, x), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), geom(x),
        x.stride(1), target.data_ptr<int64_t>(), geom(target), P, tree_index.data_ptr<int32_t>(), V, L, D,
        node_weights.data_ptr<A>(), static_cast<A>(gamma), static_cast<A>(eps), ignore_index, extrema);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace hss

TORCH_LIBRARY_IMPL(hss_kernels, CUDA, m) {
  m.impl("tree_min_fwd", &hss::cuda::tree_min_fwd_cuda);
  m.impl("tree_min_bwd", &hss::cuda::tree_min_bwd_cuda);
}
