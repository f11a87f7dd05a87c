// Focal tree-min loss (MATH.md §3) and the multi-label tree BCE (§4): op schemas and the CPU
// implementation. One pair of ops serves both: `extrema` true routes every node's term through the
// min over its ancestors (target path) or the max over its descendants (elsewhere), false is plain BCE.
//
// tree_loss_fwd(logits (N, V, H, W), target (N, H, W) int64, tree_index int32 (4V + L*D, see
//               hss_kernels/native.py), node_weights (V,), num_leaves, depth, gamma, eps, ignore_index,
//               per_pixel, extrema)
//   -> loss: (N, H, W) per pixel if per_pixel, else the 0-dim sum; float32/float64,
//      count: 0-dim int64, the number of non-ignored pixels.
// tree_loss_bwd(grad (0-dim or (N, H, W)), logits, target, tree_index, node_weights, num_leaves, depth,
//               gamma, eps, ignore_index, extrema) -> grad_logits, same dtype and strides as logits.
// The backward needs no saved statistics: the extrema are recomputed from the logits it reads anyway.
#include "ops.h"
#include "cpu_loop.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace hss {
namespace {

template <typename T>
void tree_fwd_cpu_impl(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& tree_index,
                       const at::Tensor& node_weights, int64_t L, int64_t D, double gamma_, double eps_,
                       int64_t ignore_index, bool extrema, at::Tensor& loss, bool per_pixel, at::Tensor& count) {
  using A = at::opmath_type<T>;
  const int V = logits.size(1);
  const int64_t P = target.numel();
  const PixelGeom gx = geom(logits), gt = geom(target);
  const TreeIndex ti = unpack_tree(tree_index.data_ptr<int32_t>(), V, L, D);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const A* k = node_weights.data_ptr<A>();
  const A gamma = static_cast<A>(gamma_), eps = static_cast<A>(eps_);
  A* lp = per_pixel ? loss.data_ptr<A>() : nullptr;
  const int64_t nb = (P + cpu::kBlock - 1) / cpu::kBlock;
  std::vector<double> part(nb, 0.0);
  std::vector<int64_t> cnt(nb, 0);
  std::vector<char> bad(nb, 0);
  cpu::for_each_block<T, A>(logits.data_ptr<T>(), V, logits.stride(1), gx, P, 0,
                            [&](int64_t i0, int64_t n, const int64_t*, const A* tile, A*) {
    double s = 0;
    int64_t c = 0;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t i = i0 + p;
      const int64_t y = tgt[gt.offset(i)];
      A l = A(0);
      if (y != ignore_index) {
        if (y < 0 || y >= L) {
          bad[i0 / cpu::kBlock] = 1;
        } else {
          l = tree_forward_pixel<A>(cpu::Column<A>{tile + p}, ti, static_cast<int>(y), k, gamma, eps, extrema);
          s += l;
          ++c;
        }
      }
      if (lp) lp[i] = l;
    }
    part[i0 / cpu::kBlock] = s;
    cnt[i0 / cpu::kBlock] = c;
  });
  TORCH_CHECK(std::find(bad.begin(), bad.end(), 1) == bad.end(),
              "tree_loss_fwd: target holds a label outside [0, ", L, ") that is not ignore_index=", ignore_index);
  cpu::finish_reduction<A>(part, cnt, per_pixel ? nullptr : loss.data_ptr<A>(), count.data_ptr<int64_t>());
}

std::tuple<at::Tensor, at::Tensor> tree_loss_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                     const at::Tensor& tree_index, const at::Tensor& node_weights,
                                                     int64_t L, int64_t D, double gamma, double eps,
                                                     int64_t ignore_index, bool per_pixel, bool extrema) {
  check_tree("tree_loss_fwd", logits, target, tree_index, node_weights, L, D);
  at::Tensor loss, count;
  std::tie(loss, count) = new_loss(logits, per_pixel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tree_loss_fwd_cpu", [&] {
    tree_fwd_cpu_impl<scalar_t>(logits, target, tree_index, node_weights, L, D, gamma, eps, ignore_index, extrema,
                                loss, per_pixel, count);
  });
  return {loss, count};
}

template <typename T>
void tree_bwd_cpu_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                       const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D,
                       double gamma_, double eps_, int64_t ignore_index, bool extrema, at::Tensor& out) {
  using A = at::opmath_type<T>;
  const int V = logits.size(1);
  const int64_t P = target.numel();
  const PixelGeom gx = geom(logits), gt = geom(target), gg = grad_geom(grad, logits);
  const TreeIndex ti = unpack_tree(tree_index.data_ptr<int32_t>(), V, L, D);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const A* gp = grad.data_ptr<A>();
  const A* k = node_weights.data_ptr<A>();
  const A gamma = static_cast<A>(gamma_), eps = static_cast<A>(eps_);
  const int64_t sC = logits.stride(1);
  T* y_out = out.data_ptr<T>();
  // Thread scratch: the gradient tile (V, kBlock), then V accumulators K of tree_backward_pixel.
  cpu::for_each_block<T, A>(logits.data_ptr<T>(), V, sC, gx, P, V * cpu::kBlock + V,
                            [&](int64_t i0, int64_t n, const int64_t* offs, const A* tile, A* scratch) {
    A* gtile = scratch;
    A* K = scratch + V * cpu::kBlock;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t i = i0 + p;
      const int64_t y = tgt[gt.offset(i)];
      if (y == ignore_index || y < 0 || y >= L) {
        for (int v = 0; v < V; ++v) gtile[v * cpu::kBlock + p] = A(0);
        continue;
      }
      tree_backward_pixel<A>(cpu::Column<A>{tile + p}, cpu::Scratch<A>{K}, cpu::ColumnOut<A>{gtile + p}, ti,
                             static_cast<int>(y), k, gamma, eps, extrema, gp[gg.offset(i)]);
    }
    cpu::scatter<T, A>(y_out, V, sC, offs, n, gtile);
  });
}

at::Tensor tree_loss_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                             const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D,
                             double gamma, double eps, int64_t ignore_index, bool extrema) {
  check_tree("tree_loss_bwd", logits, target, tree_index, node_weights, L, D);
  check_grad("tree_loss_bwd", grad, logits);
  const at::Tensor x = dense_logits(logits);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tree_loss_bwd_cpu", [&] {
    tree_bwd_cpu_impl<scalar_t>(grad, x, target, tree_index, node_weights, L, D, gamma, eps, ignore_index, extrema,
                                out);
  });
  return out;
}

}  // namespace
}  // namespace hss

TORCH_LIBRARY_FRAGMENT(hss_kernels, m) {
  m.def("tree_loss_fwd(Tensor logits, Tensor target, Tensor tree_index, Tensor node_weights, int num_leaves, "
        "int depth, float gamma, float eps, int ignore_index, bool per_pixel, bool extrema) -> (Tensor, Tensor)");
  m.def("tree_loss_bwd(Tensor grad, Tensor logits, Tensor target, Tensor tree_index, Tensor node_weights, "
        "int num_leaves, int depth, float gamma, float eps, int ignore_index, bool extrema) -> Tensor");
}

TORCH_LIBRARY_IMPL(hss_kernels, CPU, m) {
  m.impl("tree_loss_fwd", &hss::tree_loss_fwd_cpu);
  m.impl("tree_loss_bwd", &hss::tree_loss_bwd_cpu);
}
