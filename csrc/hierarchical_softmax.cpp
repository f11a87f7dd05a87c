// Hierarchical softmax loss (MATH.md §2): op schemas and the CPU implementation.
//
// hsoftmax_fwd(logits (N, L, H, W), target (N, H, W) int64, leaf_group (D, L) int32, level_weights (D,),
//              eps, ignore_index, per_pixel)
//   -> loss: (N, H, W) per pixel (0 where ignored) if per_pixel, else the 0-dim sum; float32/float64,
//      stats: (D + 1, N, H, W) lse and lse_1..lse_D, what the backward needs,
//      count: 0-dim int64, the number of non-ignored pixels.
// hsoftmax_bwd(grad (0-dim or (N, H, W), any strides), logits, target, stats, leaf_group, level_weights,
//              eps, ignore_index) -> grad_logits, same dtype and strides as logits.
#include "ops.h"
#include "cpu_loop.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace hss {
namespace {

template <typename T>
void hsoftmax_fwd_cpu_impl(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& leaf_group,
                           const at::Tensor& level_weights, double eps_, int64_t ignore_index, at::Tensor& loss,
                           bool per_pixel, at::Tensor& stats, at::Tensor& count) {
  using A = at::opmath_type<T>;
  const int L = logits.size(1), D = leaf_group.size(0);
  const int64_t P = target.numel();
  const PixelGeom gx = geom(logits), gt = geom(target);
  const T* x = logits.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int32_t* group = leaf_group.data_ptr<int32_t>();
  const A* w = level_weights.data_ptr<A>();
  const A eps = static_cast<A>(eps_);
  A* st = stats.data_ptr<A>();
  A* lp = per_pixel ? loss.data_ptr<A>() : nullptr;
  const int64_t nb = (P + cpu::kBlock - 1) / cpu::kBlock;
  std::vector<double> part(nb, 0.0);
  std::vector<int64_t> cnt(nb, 0);
  std::vector<char> bad(nb, 0);
  cpu::for_each_block<T, A>(x, L, logits.stride(1), gx, P, 0,
                            [&](int64_t i0, int64_t n, const int64_t*, const A* tile, A*) {
    double s = 0;
    int64_t c = 0;
    for (int64_t p = 0; p < n; ++p) {
      const int64_t i = i0 + p;
      const int64_t y = tgt[gt.offset(i)];
      A l = A(0);
      if (y != ignore_index && (y < 0 || y >= L)) bad[i0 / cpu::kBlock] = 1;
      if (y == ignore_index || y < 0 || y >= L) {
        for (int d = 0; d <= D; ++d) st[d * P + i] = A(0);  // defined outputs, never read
      } else {
        l = hsm_forward_pixel<A>(cpu::Column<A>{tile + p}, L, D, group, static_cast<int>(y), w, eps, st + i, P);
        s += l;
        ++c;
      }
      if (lp) lp[i] = l;
    }
    part[i0 / cpu::kBlock] = s;
    cnt[i0 / cpu::kBlock] = c;
  });
  TORCH_CHECK(std::find(bad.begin(), bad.end(), 1) == bad.end(),
              "hsoftmax_fwd: target holds a label outside [0, ", L, ") that is not ignore_index=", ignore_index);
  cpu::finish_reduction<A>(part, cnt, per_pixel ? nullptr : loss.data_ptr<A>(), count.data_ptr<int64_t>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hsoftmax_fwd_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                                const at::Tensor& leaf_group,
                                                                const at::Tensor& level_weights, double eps,
                                                                int64_t ignore_index, bool per_pixel) {
  const int64_t D = check_hsoftmax("hsoftmax_fwd", logits, target, leaf_group, level_weights);
  at::Tensor loss, count;
  std::tie(loss, count) = new_loss(logits, per_pixel);
  at::Tensor stats = at::empty({D + 1, logits.size(0), logits.size(2), logits.size(3)},
                               logits.options().dtype(acc_type(logits)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "hsoftmax_fwd_cpu", [&] {
    hsoftmax_fwd_cpu_impl<scalar_t>(logits, target, leaf_group, level_weights, eps, ignore_index, loss, per_pixel,
                                    stats, count);
  });
  return {loss, stats, count};
}

template <typename T>
void hsoftmax_bwd_cpu_impl(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                           const at::Tensor& stats, const at::Tensor& leaf_group, const at::Tensor& level_weights,
                           double eps_, int64_t ignore_index, at::Tensor& out) {
  using A = at::opmath_type<T>;
  const int L = logits.size(1), D = leaf_group.size(0);
  const int64_t P = target.numel();
  const PixelGeom gx = geom(logits), gt = geom(target), gg = grad_geom(grad, logits);
  const T* x = logits.data_ptr<T>();
  T* y_out = out.data_ptr<T>();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const A* gp = grad.data_ptr<A>();
  const int32_t* group = leaf_group.data_ptr<int32_t>();
  const A* w = level_weights.data_ptr<A>();
  const A eps = static_cast<A>(eps_);
  const A* st = stats.data_ptr<A>();
  const int64_t sC = logits.stride(1);
  cpu::for_each_block<T, A>(x, L, sC, gx, P, L * cpu::kBlock,
                            [&](int64_t i0, int64_t n, const int64_t* offs, const A* tile, A* gtile) {
    for (int64_t p = 0; p < n; ++p) {
      const int64_t i = i0 + p;
      const int64_t y = tgt[gt.offset(i)];
      if (y == ignore_index || y < 0 || y >= L) {
        for (int j = 0; j < L; ++j) gtile[j * cpu::kBlock + p] = A(0);
        continue;
      }
      hsm_backward_pixel<A>(cpu::Column<A>{tile + p}, cpu::ColumnOut<A>{gtile + p}, L, D, group,
                            static_cast<int>(y), w, eps, st + i, P, gp[gg.offset(i)]);
    }
    cpu::scatter<T, A>(y_out, L, sC, offs, n, gtile);
  });
}

at::Tensor hsoftmax_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& stats, const at::Tensor& leaf_group, const at::Tensor& level_weights,
                            double eps, int64_t ignore_index) {
  const int64_t D = check_hsoftmax("hsoftmax_bwd", logits, target, leaf_group, level_weights);
  check_grad("hsoftmax_bwd", grad, logits);
  check_table("hsoftmax_bwd", "stats", stats, logits, (D + 1) * target.numel(), acc_type(logits));
  // The gradient takes the logits' strides (empty_like keeps a dense layout: channels_last stays
  // channels_last), so both are walked with the same offsets.
  const at::Tensor x = dense_logits(logits);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hsoftmax_bwd_cpu", [&] {
    hsoftmax_bwd_cpu_impl<scalar_t>(grad, x, target, stats, leaf_group, level_weights, eps, ignore_index, out);
  });
  return out;
}

}  // namespace
}  // namespace hss

TORCH_LIBRARY_FRAGMENT(hss_kernels, m) {
  m.def("hsoftmax_fwd(Tensor logits, Tensor target, Tensor leaf_group, Tensor level_weights, float eps, "
        "int ignore_index, bool per_pixel) -> (Tensor, Tensor, Tensor)");
  m.def("hsoftmax_bwd(Tensor grad, Tensor logits, Tensor target, Tensor stats, Tensor leaf_group, "
        "Tensor level_weights, float eps, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(hss_kernels, CPU, m) {
  m.impl("hsoftmax_fwd", &hss::hsoftmax_fwd_cpu);
  m.impl("hsoftmax_bwd", &hss::hsoftmax_bwd_cpu);
}
