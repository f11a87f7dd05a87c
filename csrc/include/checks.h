// Host-side helpers shared by the CPU and CUDA implementations of the ops: argument checks and output
// allocation. The ops can be called directly through torch.ops, so they check what would otherwise
// read or write out of bounds (shapes, dtypes, devices, table sizes); options are validated by the
// public API (hss_kernels/functional.py).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common.h"

namespace hss {

inline at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline PixelGeom geom(const at::Tensor& t) {  // t is (N, C, H, W) or (N, H, W)
  const int o = t.dim() == 4 ? 1 : 0;
  return PixelGeom{t.size(1 + o), t.size(2 + o), t.stride(0), t.stride(1 + o), t.stride(2 + o)};
}

// Per-pixel upstream gradient: a 0-dim tensor (reduction sum) reads as stride 0 everywhere. like: the
// target (N, H, W) or logits at the target's size.
inline PixelGeom grad_geom(const at::Tensor& grad, const at::Tensor& like) {
  if (grad.dim() == 0) return PixelGeom{like.size(like.dim() - 2), like.size(like.dim() - 1), 0, 0, 0};
  return geom(grad);
}

// upsample: 0, the target is (N, H, W) of the logits (N, C, H, W); 1 (bilinear, fused), any
// (N, H, W) with H >= h and W >= w for logits (N, C, h, w) of at least one pixel.
inline void check_common(const char* op, const at::Tensor& logits, const at::Tensor& target, int64_t upsample = 0) {
  TORCH_CHECK(logits.dim() == 4, op, ": logits must be (N, C, H, W), got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(upsample == 0 || upsample == 1, op, ": upsample must be 0 (none) or 1 (bilinear), got ", upsample);
  if (upsample == 0) {
    TORCH_CHECK(target.dim() == 3 && target.size(0) == logits.size(0) && target.size(1) == logits.size(2) &&
                    target.size(2) == logits.size(3),
                op, ": target must be (N, H, W) = (", logits.size(0), ", ", logits.size(2), ", ", logits.size(3),
                "), got ", target.sizes());
  } else {
    TORCH_CHECK(target.dim() == 3 && target.size(0) == logits.size(0) && target.size(1) >= logits.size(2) &&
                    target.size(2) >= logits.size(3) && logits.size(2) >= 1 && logits.size(3) >= 1,
                op, ": with upsampling, target must be (N, H, W) with N = ", logits.size(0), ", H >= ",
                logits.size(2), " and W >= ", logits.size(3), " (logits of at least one pixel), got ",
                target.sizes());
  }
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), op, ": target and logits are on different devices");
}

inline void check_table(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits,
                        int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", t.device(), ", logits on ",
              logits.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() == numel, op, ": ", name, " must be contiguous with ", numel,
              " elements, got shape ", t.sizes());
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(grad.device() == logits.device(), op, ": grad is on another device than logits");
  TORCH_CHECK(grad.scalar_type() == acc_type(logits), op, ": grad must be ", acc_type(logits), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grad.dim() == 0 || grad.sizes() == target.sizes(), op, ": grad must be 0-dim or (N, H, W) = ",
              target.sizes(), " (the target's shape), got ", grad.sizes());
}

// Returns D.
inline int64_t check_hierarchical_softmax(const char* op, const at::Tensor& logits, const at::Tensor& target,
                                          const at::Tensor& leaf_group, const at::Tensor& level_weights,
                                          int64_t upsample = 0) {
  check_common(op, logits, target, upsample);
  TORCH_CHECK(leaf_group.dim() == 2 && leaf_group.size(1) == logits.size(1), op,
              ": leaf_group must be (D, L) with L = ", logits.size(1), " channels, got ", leaf_group.sizes());
  const int64_t D = leaf_group.size(0);
  TORCH_CHECK(D >= 1 && D <= kMaxDepth, op, ": trees of depth 1..", kMaxDepth, " are supported, got ", D);
  check_table(op, "leaf_group", leaf_group, logits, D * logits.size(1), at::kInt);
  check_table(op, "level_weights", level_weights, logits, D, acc_type(logits));
  return D;
}

inline void check_tree_min(const char* op, const at::Tensor& logits, const at::Tensor& target,
                           const at::Tensor& tree_index, const at::Tensor& node_weights, int64_t L, int64_t D,
                           int64_t upsample = 0) {
  check_common(op, logits, target, upsample);
  const int64_t V = logits.size(1);
  TORCH_CHECK(L >= 1 && L <= V && D >= 1 && D <= V, op, ": bad tree sizes L=", L, ", D=", D, " for ", V,
              " node channels");
  check_table(op, "tree_index", tree_index, logits, 4 * V + L * D, at::kInt);
  check_table(op, "node_weights", node_weights, logits, V, acc_type(logits));
}

// size: [] (labels at the logits' size) or [H, W] with H >= h, W >= w (labels of the upsampled logits).
inline void check_decode(const char* op, const at::Tensor& logits, const at::Tensor& walk, at::IntArrayRef size = {}) {
  TORCH_CHECK(logits.dim() == 4, op, ": logits must be (N, C, H, W), got ", logits.sizes());
  TORCH_CHECK(size.empty() || (size.size() == 2 && size[0] >= logits.size(2) && size[1] >= logits.size(3) &&
                               logits.size(2) >= 1 && logits.size(3) >= 1),
              op, ": size must be [] or [H, W] with H >= ", logits.size(2), " and W >= ", logits.size(3),
              " (logits of at least one pixel), got ", size);
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits have no channels");
  TORCH_CHECK(walk.dim() == 2 && walk.size(0) == 3 && walk.size(1) == logits.size(1), op,
              ": walk must be (3, C) = (3, ", logits.size(1), "), got ", walk.sizes());
  TORCH_CHECK(walk.scalar_type() == at::kInt, op, ": walk must be int32, got ", walk.scalar_type());
  TORCH_CHECK(walk.is_contiguous(), op, ": walk must be contiguous");
  TORCH_CHECK(walk.device() == logits.device(), op, ": walk is on ", walk.device(), ", logits on ",
              logits.device());
}

// class_weight: (L,) contiguous; pixel_weight: the target's shape (N, H, W), any strides; both of the
// accumulation dtype on the logits' device, or absent.
inline void check_weights(const char* op, const std::optional<at::Tensor>& class_weight,
                          const std::optional<at::Tensor>& pixel_weight, const at::Tensor& logits,
                          const at::Tensor& target, int64_t L) {
  if (class_weight) check_table(op, "class_weight", *class_weight, logits, L, acc_type(logits));
  if (pixel_weight) {
    const at::Tensor& pw = *pixel_weight;
    TORCH_CHECK(pw.device() == logits.device(), op, ": pixel_weight is on ", pw.device(), ", logits on ",
                logits.device());
    TORCH_CHECK(pw.scalar_type() == acc_type(logits), op, ": pixel_weight must be ", acc_type(logits), ", got ",
                pw.scalar_type());
    TORCH_CHECK(pw.sizes() == target.sizes(), op, ": pixel_weight must have the target's shape ", target.sizes(),
                ", got ", pw.sizes());
  }
}

template <typename A>
inline PixelWeights<A> pixel_weights(const std::optional<at::Tensor>& class_weight,
                                     const std::optional<at::Tensor>& pixel_weight) {
  PixelWeights<A> w{nullptr, nullptr, PixelGeom{1, 1, 0, 0, 0}};
  if (class_weight) w.cw = class_weight->data_ptr<A>();
  if (pixel_weight) {
    w.pw = pixel_weight->data_ptr<A>();
    w.gw = geom(*pixel_weight);
  }
  return w;
}

// The forward's sum over labelled pixels of their class weight (the count when there is none): the
// denominator of a weighted "mean" (hss_kernels/native/_common.py reduce).
inline at::Tensor new_weight_sum(const at::Tensor& logits) {
  return at::empty({}, logits.options().dtype(acc_type(logits)));
}

// Logits as the backward walks them: any dense layout as is, anything else (overlapping, expanded,
// sliced) as a contiguous copy.
inline at::Tensor dense_logits(const at::Tensor& logits) {
  return logits.is_non_overlapping_and_dense() ? logits : logits.contiguous();
}

// The forward's loss, (N, H, W) per pixel (the target's shape) or 0-dim, and the count of labelled pixels.
inline std::tuple<at::Tensor, at::Tensor> new_loss(const at::Tensor& logits, const at::Tensor& target, bool per_pixel) {
  auto opt = logits.options().dtype(acc_type(logits));
  at::Tensor loss = per_pixel ? at::empty(target.sizes(), opt) : at::empty({}, opt);
  at::Tensor count = at::empty({}, logits.options().dtype(at::kLong));
  return {loss, count};
}

}  // namespace hss
