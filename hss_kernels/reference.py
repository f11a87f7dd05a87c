"""Pure-PyTorch reference of every loss and of decoding: the executable form of ``docs/MATH.md``.

Plain, vectorised PyTorch whose gradients come from autograd. Every fast backend is tested against
these functions. They never modify their inputs. Shapes: logits ``(N, C, *spatial)``, target
``(N, *spatial)`` of leaf label ids, ``ignore_index`` marking pixels that count for nothing.

Arithmetic runs in float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs; the
loss comes back in that accumulation dtype (float32, or float64), the gradient in the input's dtype.

These functions assume valid inputs (the public API in :mod:`hss_kernels.functional` checks them),
with two exceptions that every backend shares on every device: a labelled pixel (not ``ignore_index``)
whose label is outside ``[0, L)`` (which reaches a backend when the label check is off, or under
``torch.compile``), or whose logits hold a NaN anywhere, has a NaN loss and a NaN gradient row, so that
a mean or sum is NaN rather than a plausible number. An ignored pixel counts for nothing whatever its
logits: loss 0, gradient 0.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._checks import acc_dtype, mean_denominator
from .tables import level_weight_vector, node_weight_vector
from .tree import Tree

__all__ = [
    "hierarchical_softmax_loss",
    "tree_min_loss",
    "tree_bce_loss",
    "tree_triplet_loss",
    "decode",
    "labels_at_depth",
    "reduce_loss",
    "tree_min_extrema",
    "path_scores",
    "upsample_logits",
    "weigh_loss",
]


def _flatten(logits: torch.Tensor, target: torch.Tensor):
    """(N, C, *S) → float (N, C, P) in the accumulation dtype; target → (N, P) int64."""
    N, C = logits.shape[:2]
    P = math.prod(logits.shape[2:])
    x = logits.to(acc_dtype(logits.dtype)).reshape(N, C, P)  # explicit P: -1 cannot be inferred when empty
    y = target.reshape(N, P).long()
    return x, y


def _labels(x: torch.Tensor, y: torch.Tensor, ignore_index: int, L: int):
    """For (N, C, P) logits and (N, P) labels: (x with the ignored pixels' logits set to 0, so that a NaN
    there reaches no gradient; valid: not ignored; bad: valid but outside [0, L) or with a NaN logit;
    y with both set to 0 so that it indexes safely)."""
    valid = y != ignore_index
    bad = valid & ((y < 0) | (y >= L) | torch.isnan(x).any(dim=1))
    x = torch.where(valid[:, None, :], x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x, valid, bad, torch.where(valid & ~bad, y, torch.zeros_like(y))


def _poison(loss: torch.Tensor, bad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """NaN at the bad pixels (see :func:`_labels`): the loss (N, P), and the whole gradient row of x
    (N, C, P), since the NaN term depends on every channel."""
    # Both wheres mask (never multiply) the gradient, so no NaN leaks into the other pixels' rows.
    row = torch.where(bad, x.sum(dim=1), torch.zeros_like(loss))
    return torch.where(bad, row * float("nan"), loss)


def reduce_loss(per_pixel: torch.Tensor, valid: torch.Tensor, reduction: str, spatial_shape) -> torch.Tensor:
    """Reduce a (N, P) per-pixel loss that is 0 at ignored pixels.

    ``mean`` divides by the number of non-ignored pixels, and gives 0 (with zero gradient) when every
    pixel is ignored; ``none`` returns shape ``(N, *spatial)``.
    """
    if reduction == "none":
        return per_pixel.reshape(per_pixel.shape[0], *spatial_shape)
    total = per_pixel.sum()
    if reduction == "sum":
        return total
    return total / mean_denominator(valid.sum(), None, total.dtype)


def weigh_loss(per_pixel: torch.Tensor, target: torch.Tensor, reduction: str, class_weight=None, pixel_weight=None,
               ignore_index: int = 255) -> torch.Tensor:
    """Class and pixel weights on a per-pixel loss (0 at ignored pixels), then the reduction (docs/MATH.md §6.6).

    ``class_weight`` (L,): pixel p's loss times the weight of its label w_{y_p}, and ``"mean"`` divides by the
    sum of the weights of the non-ignored pixels, as ``F.cross_entropy(weight=...)``; ``pixel_weight`` (the
    target's shape, mmsegmentation's weight map): times v_p, and ``"mean"`` divides by the number of
    non-ignored pixels (by the sum of their class weights when both are given). ``"mean"`` of no labelled
    pixel is 0. Every backend's loss goes through this (``hss_kernels.functional``)."""
    valid = target != ignore_index
    loss = per_pixel
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    weight_sum = None
    if class_weight is not None:
        w = class_weight.to(device=loss.device, dtype=loss.dtype)
        cw = torch.where(valid, w[target.long().clamp(0, w.numel() - 1)], zero)
        loss = loss * cw
        weight_sum = cw.sum()
    if pixel_weight is not None:
        loss = torch.where(valid, loss * pixel_weight.to(loss.dtype), zero)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / mean_denominator(valid.sum(), weight_sum, total.dtype)


# --------------------------------------------------------------------------- upsampling
UPSAMPLE_MODES = ("bilinear",)


def upsample_logits(logits: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """``(N, C, h, w)`` logits bilinearly interpolated to ``size = (H, W)`` in the accumulation dtype
    (docs/MATH.md §6): ``F.interpolate(logits.float(), size, mode="bilinear", align_corners=...)``
    (float64 stays float64). What every op's ``upsample="bilinear"`` means; the fused kernels compute
    the same interpolation pixel by pixel without storing it."""
    return F.interpolate(logits.to(acc_dtype(logits.dtype)), size=tuple(int(s) for s in size), mode="bilinear",
                         align_corners=bool(align_corners))


def _maybe_upsample(logits, target, upsample, align_corners):
    return logits if upsample is None else upsample_logits(logits, target.shape[-2:], align_corners)


# --------------------------------------------------------------------------- hierarchical softmax
def hierarchical_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Tree,
    level_weights: Optional[Sequence[float]] = None,
    eps: float = 0.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    upsample: Optional[str] = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Hierarchical softmax loss (Muller & Smith 2020), docs/MATH.md §2.

    ``logits``: leaf logits ``(N, L, *S)`` in label-id order. Per pixel with label y,
    ``loss = sum_d w_d (lse - lse_d)`` where lse is the log-sum-exp over all leaves and lse_d over the
    leaves of y's group at depth d. With ``eps > 0`` each level is ``-log(P_d + eps)`` with
    ``P_d = exp(lse_d - lse)``, the paper code's form.

    ``upsample="bilinear"``: ``logits`` are ``(N, L, h, w)`` and ``target`` ``(N, H, W)``; the loss is that
    of :func:`upsample_logits` ``(logits, (H, W), align_corners)`` (the same for every loss below).
    """
    logits = _maybe_upsample(logits, target, upsample, align_corners)
    x, y = _flatten(logits, target)
    x, valid, bad, y = _labels(x, y, ignore_index, tree.num_leaves)
    tabs = tree.tables(x.device)
    groups = tabs.leaf_group.long()  # (D, L)
    w = level_weight_vector(tree, level_weights, x.dtype, x.device)
    lse = torch.logsumexp(x, dim=1)  # (N, P)
    loss = torch.zeros_like(lse)
    for d in range(tree.depth):
        g = groups[d]
        in_group = g[:, None, None] == g[y][None]  # (L, N, P): is leaf k in y's group at depth d
        masked = torch.where(in_group.permute(1, 0, 2), x, torch.full_like(x, float("-inf")))
        lse_d = torch.logsumexp(masked, dim=1)
        if eps > 0:
            level = -torch.log(torch.exp(lse_d - lse) + eps)
        else:
            level = lse - lse_d
        loss = loss + w[d] * level
    loss = _poison(torch.where(valid, loss, torch.zeros_like(loss)), bad, x)
    return reduce_loss(loss, valid, reduction, target.shape[1:])


# --------------------------------------------------------------------------- tree-min and BCE
@torch.no_grad()
def tree_min_extrema(x: torch.Tensor, tree: Tree):
    """Argmin over ancestors-or-self and argmax over descendants-or-self of node logits x (N, V, P).

    Returns int64 channel indices ``m`` and ``M`` of shape (N, V, P). Ties go to the node that comes
    first in depth-first pre-order (the shallower ancestor; the node itself before its descendants).
    """
    V = tree.num_nodes
    dev = x.device
    m = torch.arange(V, device=dev).view(1, V, 1).expand_as(x).clone()
    best = x.clone()
    for d in range(2, tree.depth + 1):  # running min from the root down, level by level
        nodes = torch.tensor([c for c in range(V) if tree.depths[c] == d], device=dev, dtype=torch.long)
        if nodes.numel() == 0:
            continue
        par = torch.tensor([tree.parents[c] for c in nodes.tolist()], device=dev, dtype=torch.long)
        take_parent = best[:, par] <= x[:, nodes]  # tie → the shallower node
        best[:, nodes] = torch.where(take_parent, best[:, par], x[:, nodes])
        m[:, nodes] = torch.where(take_parent, m[:, par], m[:, nodes])
    M = torch.arange(V, device=dev).view(1, V, 1).expand_as(x).clone()
    order = torch.tensor(tree.dfs_order, device=dev, dtype=torch.long)
    x_dfs = x[:, order]  # desc-or-self of a node is a contiguous run in pre-order
    for c in range(V):
        size = tree.subtree_size[c]
        if size > 1:
            pos = tree.dfs_pos[c]
            idx = x_dfs[:, pos:pos + size].argmax(dim=1)  # first maximum: earliest in pre-order
            M[:, c] = order[pos + idx]
    return m, M


def _target_path(tree: Tree, y: torch.Tensor) -> torch.Tensor:
    """(N, P) leaf labels → (N, V, P) bool: is node v on the target's root-to-leaf path."""
    path = tree.tables(y.device).path.bool()  # (V, L)
    return path[:, y].permute(1, 0, 2)


def _node_losses(z: torch.Tensor, positive: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """Focal binary losses of logits ``z``: ``-(1-s)^g log s`` where positive, ``-s^g log(1-s)`` elsewhere.

    Written with logsigmoid so that nothing takes the log of 0 or computes 1 - 1.
    """
    zs = torch.where(positive, z, -z)  # the positive-class logit of each term
    if eps > 0:
        log_p = torch.log(torch.sigmoid(zs) + eps)
    else:
        log_p = F.logsigmoid(zs)
    if gamma == 0:
        return -log_p
    return -torch.exp(gamma * F.logsigmoid(-zs)) * log_p


def _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, use_extrema,
               upsample=None, align_corners=False):
    logits = _maybe_upsample(logits, target, upsample, align_corners)
    x, y = _flatten(logits, target)
    x, valid, bad, y = _labels(x, y, ignore_index, tree.num_leaves)
    on_path = _target_path(tree, y)
    if use_extrema:
        m, M = tree_min_extrema(x.detach(), tree)
        z = torch.where(on_path, x.gather(1, m), x.gather(1, M))
    else:
        z = x
    k = node_weight_vector(tree, scale, normalize, x.dtype, x.device)
    loss = (_node_losses(z, on_path, gamma, eps) * k[None, :, None]).sum(dim=1)
    loss = _poison(torch.where(valid, loss, torch.zeros_like(loss)), bad, x)
    return reduce_loss(loss, valid, reduction, target.shape[1:])


def tree_min_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Tree,
    gamma: float = 2.0,
    scale: float = 1.0,
    eps: float = 0.0,
    normalize: str = "level",
    ignore_index: int = 255,
    reduction: str = "mean",
    upsample: Optional[str] = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Focal tree-min loss (HSSN, Li et al. 2022), docs/MATH.md §3.

    ``logits``: node logits ``(N, V, *S)`` in node-channel order. A node on the target's path scores
    ``q = min`` of the sigmoid over its ancestors-or-self and costs ``-(1-q)^gamma log q``; any other
    node scores ``r = max`` over its descendants-or-self and costs ``-r^gamma log(1-r)``. A pixel's loss
    is ``scale * sum_d mean_{v at depth d} loss_v`` (``normalize="level"``, HSSN) or
    ``scale * mean_v loss_v`` (``"node"``). ``eps`` is added inside each log (HSSN uses 1e-8).
    """
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, True,
                      upsample, align_corners)


def tree_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Tree,
    gamma: float = 0.0,
    scale: float = 1.0,
    eps: float = 0.0,
    normalize: str = "level",
    ignore_index: int = 255,
    reduction: str = "mean",
    upsample: Optional[str] = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Multi-label BCE baseline over every node channel (docs/MATH.md §4.1): target ``t_v = [v on y's path]``,
    optionally focal (``gamma``), with the same normalisation choices as :func:`tree_min_loss`."""
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, False,
                      upsample, align_corners)


# --------------------------------------------------------------------------- triplet
def tree_triplet_loss(
    embedding: torch.Tensor,
    target: torch.Tensor,
    tree: Tree,
    margin: float = 0.6,
    max_triplets: int = 200,
    sampling: str = "random",
    generator: Optional[torch.Generator] = None,
    ignore_index: int = 255,
    normalize: bool = True,
) -> torch.Tensor:
    """HSSN's tree-triplet loss on a pixel embedding (docs/MATH.md §4.2).

    ``embedding``: ``(N, E, h, w)``; ``target``: ``(N, H, W)`` leaf labels, downsampled to ``h×w`` by
    nearest neighbour. ``normalize`` L2-normalises the embedding over E first (HSSN feeds a normalised
    one). For each leaf class c present: anchors are pixels of c, positives pixels of another leaf under
    c's parent, negatives pixels of a leaf outside c's parent (ignored pixels are never used);
    ``loss_c = mean relu((1 - <a,p>) - (1 - <a,n>) + margin)`` over ``k = min(max_triplets, #a, #p, #n)``
    triplets, chosen at random (``sampling="random"``, from ``generator``) or as the first ``k`` in raster
    order (``"first"``, HSSN's code). The loss is the mean over the classes that had triplets (0 if none);
    NaN if a label is neither ``ignore_index`` nor in ``[0, L)`` (docs/MATH.md §5.3).
    """
    N, E = embedding.shape[:2]
    e = embedding.to(acc_dtype(embedding.dtype))
    if normalize:
        e = F.normalize(e, p=2, dim=1)
    lab = F.interpolate(target[:, None].to(torch.float64), size=embedding.shape[2:], mode="nearest")
    lab = lab[:, 0].long().reshape(-1)
    feats = e.permute(0, 2, 3, 1).reshape(-1, E)
    L = tree.num_leaves
    # leaves sharing the parent of each leaf (all leaves when the parent is the root)
    parent_of = [tree.parents[c] for c in tree.leaf_channels]
    labelled = lab != ignore_index
    bad = labelled & ((lab < 0) | (lab >= L))  # never indexes a table; makes the loss NaN
    valid = labelled & ~bad
    losses = []
    for c in torch.unique(lab[valid]).tolist():
        sib = torch.tensor([parent_of[k] == parent_of[c] for k in range(L)], device=lab.device)
        lab_safe = torch.where(valid, lab, torch.zeros_like(lab))
        in_parent = sib[lab_safe] & valid
        anchor = lab == c
        pos = in_parent & ~anchor
        neg = valid & ~in_parent
        k = min(max_triplets, int(anchor.sum()), int(pos.sum()), int(neg.sum()))
        if k == 0:
            continue
        picks = []
        for mask in (anchor, pos, neg):
            idx = mask.nonzero().squeeze(1)
            if sampling == "random":
                idx = idx[torch.randperm(idx.numel(), generator=generator, device="cpu")[:k].to(idx.device)]
            else:
                idx = idx[:k]
            picks.append(feats[idx])
        a, p, n = picks
        d_ap = 1 - (a * p).sum(1)
        d_an = 1 - (a * n).sum(1)
        losses.append(F.relu(d_ap - d_an + margin).mean())
    loss = torch.stack(losses).mean() if losses else (feats.sum() * 0).to(e.dtype)
    return torch.where(bad.any(), torch.full_like(loss, float("nan")), loss)


# --------------------------------------------------------------------------- decoding
def path_scores(logits: torch.Tensor, tree: Tree, activation: str = "sigmoid", score: str = "sum") -> torch.Tensor:
    """Score of every leaf's root-to-leaf path per pixel → ``(N, L, *S)`` (see :func:`decode`)."""
    N, C = logits.shape[:2]
    # explicit pixel count: reshape cannot infer -1 when N == 0
    x = logits.detach().to(acc_dtype(logits.dtype)).reshape(N, C, math.prod(logits.shape[2:]))
    if C == tree.num_leaves and C != tree.num_nodes:
        return x.reshape(N, C, *logits.shape[2:])
    a = torch.sigmoid(x) if activation == "sigmoid" else torch.softmax(x, dim=1)
    path = tree.tables(x.device).path.to(x.dtype)  # (V, L)
    if score == "mean":
        path = path / path.sum(dim=0, keepdim=True)
    s = torch.einsum("vl,nvp->nlp", path, a)
    return s.reshape(N, tree.num_leaves, *logits.shape[2:])


def decode(logits: torch.Tensor, tree: Tree, activation: str = "sigmoid", score: str = "sum",
           size: Optional[Sequence[int]] = None, align_corners: bool = False, ignore_index: int = 255) -> torch.Tensor:
    """Leaf label of the best root-to-leaf path per pixel (docs/MATH.md §4.3) → int64 ``(N, *S)``.

    Node logits (``V`` channels): a path's score is the sum (``score="sum"``) or mean (``"mean"``) over
    its nodes of ``sigmoid(x)`` (``activation="sigmoid"``) or of the softmax over all node channels
    (``"softmax"``). Leaf logits (``L`` channels, ``L != V``): the argmax leaf. Ties go to the lowest
    leaf id. A pixel with a NaN in any of its channels gets ``ignore_index``. ``size = (H, W)``: the
    labels of :func:`upsample_logits` ``(logits, size, align_corners)`` (the NaN rule applies to those).
    """
    if size is not None:
        logits = upsample_logits(logits.detach(), size, align_corners)
    labels = path_scores(logits, tree, activation, score).argmax(dim=1)
    nan = torch.isnan(logits.detach()).any(dim=1)
    return torch.where(nan, torch.full_like(labels, ignore_index), labels)


def labels_at_depth(leaf_labels: torch.Tensor, tree: Tree, depth: int, ignore_index: int = 255) -> torch.Tensor:
    """Map leaf labels to class ids at ``depth`` (1..D; see ``Tree.class_names``); ``ignore_index``
    stays ``ignore_index``; a label outside ``[0, L)`` (docs/MATH.md §5.3) becomes -1, no class id. At depth D
    the classes are the leaf labels themselves."""
    tree._check_depth(depth)
    table = tree.tables(leaf_labels.device).leaf_group[depth - 1].long()
    valid = leaf_labels != ignore_index
    ok = valid & (leaf_labels >= 0) & (leaf_labels < tree.num_leaves)
    out = table[torch.where(ok, leaf_labels, torch.zeros_like(leaf_labels)).long()]
    out = torch.where(ok, out, torch.full_like(out, -1))
    return torch.where(valid, out, torch.full_like(out, ignore_index)).to(leaf_labels.dtype)


# The functions that take ``upsample``/``align_corners`` (``size`` for decode) themselves; for a backend's
# function without this mark, hss_kernels.functional interpolates the logits first.
for _fn in (hierarchical_softmax_loss, tree_min_loss, tree_bce_loss, decode):
    _fn.takes_upsample = True
