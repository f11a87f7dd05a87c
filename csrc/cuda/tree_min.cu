// Focal tree-min loss (docs/MATH.md §3) and the tree BCE (§4.1), one kernel family: the CUDA
// implementation of tree_min_fwd and tree_min_bwd (schemas and contracts in csrc/ops.cpp; registered here),
// running the O(V) per-pixel code of tree_min_math.h, the kernels at the labels' size in this file and the
// fused-upsampling ones in tree_min_up.cu. Each block first copies the tree's node table in pre-order
// into shared memory (one broadcast read per node afterwards; tree_min.cuh).
// * The forward (tree_fwd_group_kernel): G = 16 / sizeof(T) consecutive pixels per thread
//   (tree_forward_group), one 16-byte load per channel on NCHW when the layout allows (vec_groups), the
//   D + 1 per-depth slots of the G pixels in shared memory laid out (slot, thread); bfloat16 tree-min: the
//   maxima on bfloat16 pairs and the terms two lanes at a time (focal_pair).
// * The tree BCE backward (tree_bce_bwd_group_kernel): G pixels per thread as the forward
//   (tree_bce_backward_group), 16-byte loads and stores on NCHW.
// * The tree-min backward (tree_min_bwd_group_kernel): G pixels per thread as the forward
//   (tree_min_backward_group), 16-byte loads and stores on NCHW; the D + 1 per-depth slots of the G pixels
//   and their 2 bits per node, packed 16 nodes and two pixels to a 32-bit word, in shared memory laid out
//   (slot or word, thread). bfloat16 logits: the bottom-up pass on bfloat16 pairs (VecCol / LaneCols
//   load_pairs).
// * Fused upsampling: tree_min_up.cu (the two files share tree_min.cuh).
// Every kernel is instantiated per focal mode (focal_k: gamma 2 / gamma 0 with eps 0, or any), picked from
// the call's options, and the forwards and the upsampled rows kernel per extrema (tree-min or tree BCE).
// Class and pixel weights (docs/MATH.md §6.6) are fused into every kernel: the forwards multiply a labelled
// pixel's loss by cw[y] * pw[p] and, with class weights, sum cw[y] into a third per-block partial (the
// weighted mean's denominator); the backwards multiply its upstream gradient by the same weight. pw is read
// once per labelled pixel, at the target's (full-resolution) pixel. Every kernel takes a template flag kW,
// picked on the host (with_weights): a call without weights runs the kW = false instantiation, which has
// none of that code.
#include "tree_min.cuh"

#include <ATen/Dispatch.h>

#include <type_traits>

namespace hss {
namespace cuda {
namespace {

// The forward without upsampling: G = lanes_for<T>() consecutive pixels per thread (tree_forward_group).
// kVec: the host checked that every group's G pixels are contiguous and 16-byte aligned in every channel
// (NCHW, H*W, the strides and the pointer multiples of G elements / 16 bytes): one 16-byte load per channel.
// Otherwise each lane reads its own element through the strides (channels_last, odd sizes, views); the
// lanes past the last pixel read the last pixel again and are discarded.
// kVec also asks that the channel stride fit 32 bits in bytes: a channel's address is then one 32 x 32 -> 64
// bit multiply-add.
template <typename T, typename A, int G>
struct VecCol {
  const unsigned char* p;  // lane 0's channel 0
  uint32_t sb;             // the channel stride in bytes
  __device__ const T* at(int c) const {
    return reinterpret_cast<const T*>(p + static_cast<uint64_t>(static_cast<uint32_t>(c)) * sb);
  }
  __device__ void load(int c, Lanes<A, G>& out) const {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(at(c)));  // sm90: logits
    if constexpr (std::is_same<T, c10::BFloat16>::value) {  // bfloat16 -> float: a shift or a mask
      const uint32_t* e = reinterpret_cast<const uint32_t*>(&u);
      HSS_UNROLL
      for (int i = 0; i < G / 2; ++i) {
        out.v[2 * i] = __uint_as_float(e[i] << 16);
        out.v[2 * i + 1] = __uint_as_float(e[i] & 0xffff0000u);
      }
    } else {
      const T* e = reinterpret_cast<const T*>(&u);
      HSS_UNROLL
      for (int j = 0; j < G; ++j) out.v[j] = static_cast<A>(e[j]);
    }
  }
  // bfloat16: the G lanes as G / 2 pairs (tree_min_backward_group's bottom-up pass)
  static constexpr bool kBf16Pairs = std::is_same<T, c10::BFloat16>::value;
  __device__ void load_pairs(int c, Lanes<uint32_t, G / 2>& out) const {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(at(c)));  // sm90: logits
    const uint32_t* e = reinterpret_cast<const uint32_t*>(&u);
    HSS_UNROLL
    for (int i = 0; i < G / 2; ++i) out.v[i] = e[i];
  }
  __device__ A operator()(int c, int j) const { return static_cast<A>(at(c)[j]); }
};

// The backwards write the gradient through the same object (it has the logits' strides: one copy of the offsets),
// o. store writes the lanes from the last down: a lane past the last pixel repeats the last pixel's offset
// (lane_offsets) and comes first, so the last pixel's own value is the one that stays, with no test per lane.
// store_lane is only called for labelled lanes, which exist.
template <typename T, typename A, int G>
struct LaneCols {
  const T* p;
  int64_t off[G];
  int64_t s;
  T* o = nullptr;
  __device__ void store(int c, const Lanes<A, G>& v) const {
    T* q = o + c * s;
    HSS_UNROLL
    for (int j = G - 1; j >= 0; --j) q[off[j]] = static_cast<T>(v.v[j]);
  }
  __device__ void store_lane(int c, int j, A v) const { o[c * s + off[j]] = static_cast<T>(v); }
  __device__ void load(int c, Lanes<A, G>& out) const {
    const T* q = p + c * s;
    HSS_UNROLL
    for (int j = 0; j < G; ++j) out.v[j] = static_cast<A>(q[off[j]]);  // sm90: logits
  }
  static constexpr bool kBf16Pairs = std::is_same<T, c10::BFloat16>::value;
  __device__ void load_pairs(int c, Lanes<uint32_t, G / 2>& out) const {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p + c * s);
    HSS_UNROLL
    for (int i = 0; i < G / 2; ++i)
      out.v[i] = static_cast<uint32_t>(q[off[2 * i]]) | static_cast<uint32_t>(q[off[2 * i + 1]]) << 16;  // sm90: logits
  }
  __device__ A operator()(int c, int j) const { return static_cast<A>(p[c * s + off[j]]); }
};

template <typename T, typename A, int kF, bool kExtrema, bool kVec, bool kW>
__global__ void __launch_bounds__(kThreads)
tree_fwd_group_kernel(const T* __restrict__ x, PixelGeom gx, int64_t sC, const int64_t* __restrict__ tgt,
                      PixelGeom gt, int64_t P, const int32_t* __restrict__ tree_index, int V, int L, int D,
                      const A* __restrict__ k, A gamma, A eps, int64_t ignore_index, A* __restrict__ lp,
                      double* part, int64_t* cnt, PixelWeights<A> w, double* wpart) {
  constexpr int G = lanes_for<T>();
  extern __shared__ __align__(16) unsigned char smem[];
  const TreeIndex ti = unpack_tree(tree_index, V, L, D);
  const NodeTable<A> nodes = load_node_table<A>(smem, ti, k);
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * G;
  double sum = 0, ws = 0;
  int64_t c = 0;
  if (i0 < P) {
    const int64_t n = P - i0 < G ? P - i0 : G;
    int y[G];
    LabelKind kind[G];
    const bool any = load_group_labels<G>(tgt, gt, i0, n, L, ignore_index, y, kind);
    A l[G];
    if (any) {
      SharedLanes<A, G> acc{smem + node_table_bytes<A>(V) + threadIdx.x * sizeof(Lanes<A, G>),
                            static_cast<int>(blockDim.x * sizeof(Lanes<A, G>))};
      if constexpr (kVec) {
        const VecCol<T, A, G> col{reinterpret_cast<const unsigned char*>(x + gx.offset(i0)),
                                  static_cast<uint32_t>(sC * static_cast<int64_t>(sizeof(T)))};
        tree_forward_group<kF, kExtrema, A, G>(col, nodes, acc, ti, y, k, gamma, eps, l);
      } else {
        LaneCols<T, A, G> col{x, {}, sC};
        lane_offsets<G>(gx, i0, n, col.off);
        tree_forward_group<kF, kExtrema, A, G>(col, nodes, acc, ti, y, k, gamma, eps, l);
      }
    }
    add_group_losses<kW, G, A>(l, y, kind, i0, n, w, lp, sum, c, ws);
  }
  block_partial(sum, c, part, cnt);
  if constexpr (kW)
    if (wpart) block_weight_partial(ws, wpart);
}

// The backwards' 16-byte stores, as VecCol reads: one per channel (LaneCols stores lane by lane itself).
template <typename T, typename A, int G>
struct VecOut {
  unsigned char* p;
  uint32_t sb;
  __device__ T* at(int c) const {
    return reinterpret_cast<T*>(p + static_cast<uint64_t>(static_cast<uint32_t>(c)) * sb);
  }
  __device__ void store(int c, const Lanes<A, G>& v) const {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
    HSS_UNROLL
    for (int j = 0; j < G; ++j) e[j] = static_cast<T>(v.v[j]);
    *reinterpret_cast<uint4*>(at(c)) = u;
  }
  __device__ void store_lane(int c, int j, A v) const { at(c)[j] = static_cast<T>(v); }
};

// The tree BCE backward without upsampling: G pixels per thread as the forward (tree_bce_backward_group),
// the gradient written with the logits' strides (out is empty_like of the dense logits).
template <typename T, typename A, int kF, bool kVec, bool kW>
__global__ void __launch_bounds__(kThreads)
tree_bce_bwd_group_kernel(const A* __restrict__ grad, PixelGeom gg, const T* __restrict__ x, T* __restrict__ out,
                          PixelGeom gx, int64_t sC, const int64_t* __restrict__ tgt, PixelGeom gt, int64_t P,
                          const int32_t* __restrict__ tree_index, int V, int L, int D, const A* __restrict__ k,
                          A gamma, A eps, int64_t ignore_index, PixelWeights<A> w) {
  constexpr int G = lanes_for<T>();
  extern __shared__ __align__(16) unsigned char smem[];
  const TreeIndex ti = unpack_tree(tree_index, V, L, D);
  const NodeTable<A> nodes = load_node_table<A>(smem, ti, k);
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * G;
  if (i0 >= P) return;
  const int64_t n = P - i0 < G ? P - i0 : G;
  int y[G];
  bool valid[G], bad[G];
  A g[G];
  load_group_rows<kW, G>(tgt, gt, grad, gg, i0, n, L, ignore_index, w, y, valid, bad, g);
  if constexpr (kVec) {
    const int64_t off = gx.offset(i0);
    const uint32_t sb = static_cast<uint32_t>(sC * static_cast<int64_t>(sizeof(T)));
    tree_bce_backward_group<kF, A, G>(VecCol<T, A, G>{reinterpret_cast<const unsigned char*>(x + off), sb}, nodes,
                                      VecOut<T, A, G>{reinterpret_cast<unsigned char*>(out + off), sb}, ti, y, valid,
                                      bad, k, gamma, eps, g);
  } else {
    LaneCols<T, A, G> col{x, {}, sC, out};
    lane_offsets<G>(gx, i0, n, col.off);
    tree_bce_backward_group<kF, A, G>(col, nodes, col, ti, y, valid, bad, k, gamma, eps, g);
  }
}

// Whether every group of G pixels of x (N, C, H, W) is one aligned 16-byte run in every channel, and the
// channel stride fits 32 bits in bytes (VecCol).
inline bool vec_groups(const at::Tensor& x, int G) {
  if (x.stride(3) != 1 || x.stride(2) != x.size(3)) return false;
  const int64_t hw = x.size(2) * x.size(3);
  return hw % G == 0 && x.stride(1) % G == 0 && x.stride(0) % G == 0 &&
         reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.stride(1) >= 0 &&
         x.stride(1) * static_cast<int64_t>(x.element_size()) <= static_cast<int64_t>(UINT32_MAX);
}

// The tree-min backward without upsampling: G pixels per thread as the tree BCE's (tree_min_backward_group),
// 16-byte loads and stores on NCHW (kVec), the gradient written with the logits' strides.
template <typename T, typename A, int kF, bool kVec, bool kW>
__global__ void __launch_bounds__(kThreads)
tree_min_bwd_group_kernel(const A* __restrict__ grad, PixelGeom gg, const T* __restrict__ x, T* __restrict__ out,
                          PixelGeom gx, int64_t sC, const int64_t* __restrict__ tgt, PixelGeom gt, int64_t P,
                          const int32_t* __restrict__ tree_index, int V, int L, int D, const A* __restrict__ k,
                          A gamma, A eps, int64_t ignore_index, PixelWeights<A> w) {
  constexpr int G = lanes_for<T>();
  extern __shared__ __align__(16) unsigned char smem[];
  const TreeIndex ti = unpack_tree(tree_index, V, L, D);
  const NodeTable<A> nodes = load_node_table<A>(smem, ti, k);
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * G;
  if (i0 >= P) return;
  const int64_t n = P - i0 < G ? P - i0 : G;
  int y[G];
  bool valid[G], bad[G];
  A g[G];
  load_group_rows<kW, G>(tgt, gt, grad, gg, i0, n, L, ignore_index, w, y, valid, bad, g);
  const int threads = static_cast<int>(blockDim.x);
  unsigned char* slots = smem + node_table_bytes<A>(V);
  const SharedLanes<A, G> acc{slots + threadIdx.x * sizeof(Lanes<A, G>),
                              static_cast<int>(threads * sizeof(Lanes<A, G>))};
  unsigned char* words = slots + static_cast<size_t>(D + 1) * threads * sizeof(Lanes<A, G>);
  const SharedLanes<uint32_t, G> bits{words + threadIdx.x * sizeof(Lanes<uint32_t, G>),
                                      static_cast<int>(threads * sizeof(Lanes<uint32_t, G>))};
  if constexpr (kVec) {
    const int64_t off = gx.offset(i0);
    const uint32_t sb = static_cast<uint32_t>(sC * static_cast<int64_t>(sizeof(T)));
    // The two base pointers, computed once: opaque to nvcc, which otherwise recomputed out + off (its
    // division included) in every iteration of the top-down pass.
    uint64_t xb = reinterpret_cast<uint64_t>(x + off), ob = reinterpret_cast<uint64_t>(out + off);
    asm("" : "+l"(xb));
    asm("" : "+l"(ob));
    tree_min_backward_group<kF, A, G>(VecCol<T, A, G>{reinterpret_cast<const unsigned char*>(xb), sb}, nodes, acc,
                                      bits, VecOut<T, A, G>{reinterpret_cast<unsigned char*>(ob), sb}, ti, y, valid,
                                      bad, k, gamma, eps, g);
  } else {
    LaneCols<T, A, G> col{x, {}, sC, out};
    lane_offsets<G>(gx, i0, n, col.off);
    tree_min_backward_group<kF, A, G>(col, nodes, acc, bits, col, ti, y, valid, bad, k, gamma, eps, g);
  }
}
// The group kernel for one dtype: its focal mode, extrema, kVec and kW picked from the call.
template <typename T, int kF, bool kExtrema, bool kVec, bool kW>
void launch_fwd_group(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tree_index,
                      const at::Tensor& node_weights, int64_t L, int64_t D, double gamma, double eps,
                      int64_t ignore_index, bool per_pixel, at::Tensor& loss, at::Tensor& count,
                      const PixelWeights<at::opmath_type<T>>& w, at::Tensor& weight_sum, cudaStream_t stream) {
  using A = at::opmath_type<T>;
  constexpr int G = lanes_for<T>();
  const int64_t P = target.numel();
  const int V = logits.size(1);
  const int64_t nb = num_blocks((P + G - 1) / G, kThreads);
  Partials partials(logits, nb, w.cw != nullptr);
  auto kernel = tree_fwd_group_kernel<T, A, kF, kExtrema, kVec, kW>;
  const size_t smem = group_smem_bytes<A, G>(V, D, kThreads, kExtrema);
  allow_smem(kernel, smem, kThreads * (sizeof(double) + sizeof(int64_t)), logits.get_device(), "tree_min", V,
             "nodes");
  kernel<<<nb, kThreads, smem, stream>>>(
      logits.data_ptr<T>(), geom(logits), logits.stride(1), target.data_ptr<int64_t>(), geom(target), P,
      tree_index.data_ptr<int32_t>(), V, L, D, node_weights.data_ptr<A>(), static_cast<A>(gamma),
      static_cast<A>(eps), ignore_index, per_pixel ? loss.data_ptr<A>() : nullptr, partials.p(), partials.c(), w,
      partials.w());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  partials.finish<A>(loss, count, weight_sum, per_pixel, stream);
}

// Runs f(std::bool_constant<kVec>{}) with kVec = vec, the 16-byte-load instantiation or not; float64 always the
// strided one (its speed does not matter: one instantiation instead of two).
template <typename T, typename F>
void with_vec(bool vec, F&& f) {
  if constexpr (sizeof(T) == 8) {
    f(std::false_type{});
  } else {
    if (vec)
      f(std::true_type{});
    else
      f(std::false_type{});
  }
}

// Runs f(kF, kVec, kW), integral constants: the instantiation of a group kernel for a call's focal mode
// (with_focal_mode), layout (with_vec) and weights (with_weights).
template <typename T, typename F>
void with_group_options(double gamma, double eps, bool vec, bool weighted, F&& f) {
  using A = at::opmath_type<T>;
  with_focal_mode(static_cast<A>(gamma), static_cast<A>(eps), [&](auto kf) {
    with_vec<T>(vec, [&](auto kv) { with_weights(weighted, [&](auto kw) { f(kf, kv, kw); }); });
  });
}

template <typename T>
void tree_fwd_group(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tree_index,
                    const at::Tensor& node_weights, int64_t L, int64_t D, double gamma, double eps,
                    int64_t ignore_index, bool per_pixel, bool extrema, at::Tensor& loss, at::Tensor& count,
                    const PixelWeights<at::opmath_type<T>>& w, at::Tensor& weight_sum, cudaStream_t stream) {
  const bool vec_ok = vec_groups(logits, lanes_for<T>());
  with_group_options<T>(gamma, eps, vec_ok, w.any(), [&](auto f, auto vec, auto weighted) {
    constexpr int kF = decltype(f)::value;
    constexpr bool kVec = decltype(vec)::value, kW = decltype(weighted)::value;
    auto launch = extrema ? launch_fwd_group<T, kF, true, kVec, kW> : launch_fwd_group<T, kF, false, kVec, kW>;
    launch(logits, target, tree_index, node_weights, L, D, gamma, eps, ignore_index, per_pixel, loss, count, w,
           weight_sum, stream);
  });
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_min_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tree_index, const at::Tensor& node_weights,
    int64_t L, int64_t D, double gamma, double eps, int64_t ignore_index, bool per_pixel, bool extrema,
    int64_t upsample, bool align_corners, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& pixel_weight) {
  check_tree_min("tree_min_fwd", logits, target, tree_index, node_weights, L, D, upsample);
  check_weights("tree_min_fwd", class_weight, pixel_weight, logits, target, L);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor loss, count;
  std::tie(loss, count) = new_loss(logits, target, per_pixel);
  at::Tensor weight_sum = new_weight_sum(logits);
  const int64_t P = target.numel();
  if (P == 0) {
    zero_empty_loss(loss, count, per_pixel);
    weight_sum.zero_();
    return {loss, count, weight_sum};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tree_min_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const PixelWeights<A> w = pixel_weights<A>(class_weight, pixel_weight);
    if (!upsample) {
      tree_fwd_group<scalar_t>(logits, target, tree_index, node_weights, L, D, gamma, eps, ignore_index, per_pixel,
                               extrema, loss, count, w, weight_sum, stream);
      return;
    }
    // fused upsampling (tree_min_up.cu)
    tree_fwd_up_group<scalar_t>(logits, target, tree_index, node_weights, L, D, gamma, eps, ignore_index,
                                per_pixel, extrema, align_corners, loss, count, w, weight_sum, stream);
  });
  return {loss, count, weight_sum};
}
at::Tensor tree_min_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D,
                             double gamma, double eps, int64_t ignore_index, bool extrema, int64_t upsample,
                             bool align_corners, const std::optional<at::Tensor>& class_weight,
                             const std::optional<at::Tensor>& pixel_weight) {
  check_tree_min("tree_min_bwd", logits, target, tree_index, node_weights, L, D, upsample);
  check_grad("tree_min_bwd", grad, logits, target);
  check_weights("tree_min_bwd", class_weight, pixel_weight, logits, target, L);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = dense_logits(logits);
  at::Tensor out = at::empty_like(x);
  const int64_t P = target.numel();
  if (P == 0) return out;
  const int V = x.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tree_min_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const PixelWeights<A> w = pixel_weights<A>(class_weight, pixel_weight);
    if (upsample) {  // banded (tree_min_up.cu)
      tree_bwd_up_group<scalar_t>(grad, x, target, tree_index, node_weights, L, D, gamma, eps, ignore_index,
                                  extrema, align_corners, w, out, stream);
      return;
    }
    // the group kernel for the options (tree_min_math.h: focal_k)
    with_group_options<scalar_t>(gamma, eps, vec_groups(x, lanes_for<scalar_t>()), w.any(),
                                 [&](auto f, auto vec, auto weighted) {
      constexpr int kF = decltype(f)::value;
      constexpr bool kVec = decltype(vec)::value, kW = decltype(weighted)::value;
      if (!extrema) {  // the tree BCE: G pixels per thread
        auto bce = tree_bce_bwd_group_kernel<scalar_t, A, kF, kVec, kW>;
        const size_t tsmem = node_table_bytes<A>(V);
        allow_smem(bce, tsmem, 0, x.get_device(), "tree_min", V, "nodes");
        constexpr int G = lanes_for<scalar_t>();
        bce<<<num_blocks((P + G - 1) / G, kThreads), kThreads, tsmem, stream>>>(
            grad.data_ptr<A>(), grad_geom(grad, x), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), geom(x),
            x.stride(1), target.data_ptr<int64_t>(), geom(target), P, tree_index.data_ptr<int32_t>(), V, L, D,
            node_weights.data_ptr<A>(), static_cast<A>(gamma), static_cast<A>(eps), ignore_index, w);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      // the tree-min: G pixels per thread, fewer threads per block while its shared memory is over 48 KiB
      constexpr int G = lanes_for<scalar_t>();
      int mthreads = kThreads;
      while (mthreads > 32 && min_bwd_group_smem_bytes<A, G>(V, D, mthreads) > kDefaultSmem) mthreads /= 2;
      const size_t msmem = min_bwd_group_smem_bytes<A, G>(V, D, mthreads);
      auto kernel = tree_min_bwd_group_kernel<scalar_t, A, kF, kVec, kW>;
      allow_smem(kernel, msmem, 0, x.get_device(), "tree_min", V, "nodes");
      kernel<<<num_blocks((P + G - 1) / G, mthreads), mthreads, msmem, stream>>>(
          grad.data_ptr<A>(), grad_geom(grad, x), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), geom(x),
          x.stride(1), target.data_ptr<int64_t>(), geom(target), P, tree_index.data_ptr<int32_t>(), V, L, D,
          node_weights.data_ptr<A>(), static_cast<A>(gamma), static_cast<A>(eps), ignore_index, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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