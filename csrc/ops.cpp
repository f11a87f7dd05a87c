// The extension module hss_kernels._C and the schemas of its ops, torch.ops.hss_kernels.*. Each op's
// implementations register under the CPU and CUDA keys next to their code: csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu. The Python side (fake kernels, autograd) is hss_kernels/native/<op>.py.
//
// Float16/bfloat16/float32 logits accumulate in float32, float64 in float64; losses and statistics come
// back in the accumulation dtype, gradients in the logits' dtype and strides. A label neither
// ignore_index nor in [0, L) reads no table: that pixel's loss is NaN (and counts as labelled), its
// gradient row NaN (docs/MATH.md §5.3).
//
// hierarchical_softmax_fwd(logits (N, L, H, W), target (N, H, W) int64, leaf_group (D, L) int32,
//                          level_weights (D,), eps, ignore_index, per_pixel, upsample, align_corners,
//                          class_weight (L,) or None, pixel_weight (N, H, W) any strides or None)
//   -> loss: (N, H, W) per pixel (0 where ignored) if per_pixel, else the 0-dim sum, each labelled
//            pixel's loss times its weight cw[y] * pw[i] (docs/MATH.md §6.6; a missing one reads as 1),
//      stats: (D + 1, N, H, W) lse and lse_1..lse_D, what the backward needs (unweighted),
//      count: 0-dim int64, the number of non-ignored pixels,
//      weight_sum: 0-dim, the sum of cw[y] over the labelled pixels (the count without class_weight).
// hierarchical_softmax_bwd(grad (0-dim or (N, H, W), any strides), logits, target, stats, leaf_group,
//                          level_weights, eps, ignore_index, upsample, align_corners, class_weight,
//                          pixel_weight) -> grad_logits (a labelled pixel's grad times its weight).
// The weights are of the accumulation dtype, on the logits' device.
//
// tree_min_fwd / tree_min_bwd: the focal tree-min loss (extrema = true) and the multi-label tree BCE
// (extrema = false), one kernel family.
// tree_min_fwd(logits (N, V, H, W), target (N, H, W) int64, tree_index int32 (4V + L*D, docs/MATH.md
//              §1.7), node_weights (V,), num_leaves, depth, gamma, eps, ignore_index, per_pixel, extrema,
//              upsample, align_corners, class_weight (L,)?, pixel_weight (N, H, W)?)
//   -> loss: (N, H, W) per pixel if per_pixel, else the 0-dim sum, each labelled pixel's loss times its
//            weight cw[y] * pw[p] (docs/MATH.md §6.6; a missing table reads as 1),
//      count: 0-dim int64, the number of non-ignored pixels,
//      weight_sum: 0-dim (accumulation dtype), the sum of cw[y] over the labelled pixels (the count
//            without class_weight): a weighted mean's denominator.
//   class_weight: contiguous, pixel_weight: the target's shape, any strides; both of the accumulation
//   dtype on the logits' device.
// tree_min_bwd(grad (0-dim or (N, H, W)), logits, target, tree_index, node_weights, num_leaves, depth,
//              gamma, eps, ignore_index, extrema, upsample, align_corners, class_weight?, pixel_weight?)
//   -> grad_logits, each labelled pixel's upstream gradient times its weight. It needs no saved
//   statistics: the extrema are recomputed from the logits it reads anyway.
//
// decode(logits (N, C, H, W), walk (3, C) int32, ordered, activation, score, size, align_corners,
//        ignore_index) -> (N, H, W) int64: the leaf
//   label of the best root-to-leaf path per pixel (docs/MATH.md §4.3), ties to the lowest leaf id.
//   walk: the tree's nodes in pre-order, rows channel, depth (1..8) and leaf id (-1: internal)
//   (tables.decode_walk; a flat walk of the L channels, depth 1, leaf id = channel, with activation 2
//   decodes leaf logits). ordered: the leaf ids increase along the walk (ties then need no id compare;
//   the CPU checks this and the walk's values, the CUDA kernel clamps bad entries into range).
//   activation: 0 sigmoid, 1 softmax over all C channels, 2 identity; score: 0 sum, 1 mean over the path.
//   size: [] (labels at the logits' size) or [H, W] >= (h, w): labels of the logits upsampled bilinearly.
//   ignore_index: the label of a pixel with a NaN in any of the C channels it reads (upsampled, with a size).
//
// Fused upsampling (upsample = 1, bilinear; align_corners as in F.interpolate): the losses' logits are
// (N, C, h, w) and the target, the per-pixel loss, stats and grad are (N, H, W) with H >= h, W >= w;
// the result is the op on F.interpolate(logits, size=(H, W), mode="bilinear", align_corners) computed
// in the accumulation dtype, and the backward returns the gradient of the (N, C, h, w) logits. The
// full-resolution logits and their gradient are never stored. The CPU and CUDA kernels of the losses and of
// decode fuse it.
#include <Python.h>
#include <torch/library.h>

// Importing hss_kernels._C loads this library, whose static initialisers register the ops with the
// PyTorch dispatcher; the module itself defines no Python functions.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hss_kernels, m) {
  m.def("hierarchical_softmax_fwd(Tensor logits, Tensor target, Tensor leaf_group, Tensor level_weights, "
        "float eps, int ignore_index, bool per_pixel, int upsample=0, bool align_corners=False, "
        "Tensor? class_weight=None, Tensor? pixel_weight=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("hierarchical_softmax_bwd(Tensor grad, Tensor logits, Tensor target, Tensor stats, Tensor leaf_group, "
        "Tensor level_weights, float eps, int ignore_index, int upsample=0, bool align_corners=False, "
        "Tensor? class_weight=None, Tensor? pixel_weight=None) -> Tensor");
  m.def("tree_min_fwd(Tensor logits, Tensor target, Tensor tree_index, Tensor node_weights, int num_leaves, "
        "int depth, float gamma, float eps, int ignore_index, bool per_pixel, bool extrema, int upsample=0, "
        "bool align_corners=False, Tensor? class_weight=None, Tensor? pixel_weight=None) -> (Tensor, Tensor, Tensor)");
  m.def("tree_min_bwd(Tensor grad, Tensor logits, Tensor target, Tensor tree_index, Tensor node_weights, "
        "int num_leaves, int depth, float gamma, float eps, int ignore_index, bool extrema, int upsample=0, "
        "bool align_corners=False, Tensor? class_weight=None, Tensor? pixel_weight=None) -> Tensor");
  m.def("decode(Tensor logits, Tensor walk, bool ordered, int activation, int score, int[] size=[], "
        "bool align_corners=False, int ignore_index=255) -> Tensor");
}
