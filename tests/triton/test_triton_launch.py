"""How the Triton backend launches: every kernel through ``_common.launch``, compiled on CUDA tensors inside
``device_guard`` (Triton launches on the current CUDA device, not on its arguments': triton-lang/triton#2441),
under the interpreter on CPU tensors; tile sizes follow the tensors' device (never GPU tiles under the
interpreter nor interpreter tiles on a GPU)."""
import contextlib

import pytest
import torch

import hss_kernels
from hss_kernels import trees

import helpers as H

C = pytest.importorskip("hss_kernels.triton._common")
triton_mod = pytest.importorskip("hss_kernels.triton")


class _Probe:
    def __init__(self, device):
        self.device = torch.device(device)


def test_guard_selects_the_tensors_device():
    guard = C.device_guard(_Probe("cuda:1"))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(C.device_guard(_Probe("cpu")), contextlib.nullcontext)


def test_compiled_launches_are_guarded(monkeypatch):
    """A compiled launch (CUDA tensors) runs inside device_guard(like); an interpreted one needs none."""
    events = []

    @contextlib.contextmanager
    def recording_guard(t):
        events.append(("enter", t))
        yield
        events.append(("exit", t))

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: events.append(("run", grid, args, kw))

    monkeypatch.setattr(C, "device_guard", recording_guard)
    monkeypatch.setattr(C, "interpreted", lambda device: False)
    like = _Probe("cuda:1")
    C.launch(Kernel(), (3,), like, 1, 2, BLOCK=4, num_warps=8)
    assert events == [("enter", like), ("run", (3,), (1, 2), {"BLOCK": 4, "num_warps": 8}), ("exit", like)]


def test_held_guard_is_entered_once_for_a_loop_of_launches(monkeypatch):
    """held_device_guard(t) enters device_guard(t) once; launches on t's device inside it run without entering
    it again, a launch on another device still enters its own; on the CPU it is a no-op."""
    events = []

    @contextlib.contextmanager
    def recording_guard(t):
        events.append(("enter", t.device))
        yield
        events.append(("exit", t.device))

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: events.append(("run", grid))

    monkeypatch.setattr(C, "device_guard", recording_guard)
    monkeypatch.setattr(C, "interpreted", lambda device: False)
    like, other = _Probe("cuda:1"), _Probe("cuda:0")
    with C.held_device_guard(like):
        for g in range(3):
            C.launch(Kernel(), (g,), like)
        C.launch(Kernel(), (9,), other)
    C.launch(Kernel(), (5,), like)
    d1, d0 = like.device, other.device
    assert events == [("enter", d1), ("run", (0,)), ("run", (1,)), ("run", (2,)), ("enter", d0), ("run", (9,)),
                      ("exit", d0), ("exit", d1), ("enter", d1), ("run", (5,)), ("exit", d1)]
    events.clear()
    with C.held_device_guard(_Probe("cpu")):
        pass
    assert events == []


def test_interpreted_only_off_cuda():
    assert C.interpreted("cpu") and C.interpreted(torch.device("cpu"))
    assert not C.interpreted("cuda") and not C.interpreted(torch.device("cuda", 1))


def test_every_kernel_goes_through_launch(backend, device, monkeypatch):
    """Each op launches its kernels through _common.launch, on the logits (so on their device)."""
    launches = []
    real = C.launch

    def recording_launch(kernel, grid, like, *args, **kw):
        launches.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, like, args[0]))
        return real(kernel, grid, like, *args, **kw)

    monkeypatch.setattr(C, "launch", recording_launch)
    tree = trees.load("cityscapes")
    xl, y = H.inputs(tree, "hierarchical_softmax_loss", (1, 3, 4), device=device)
    xn, _ = H.inputs(tree, "tree_min_loss", (1, 3, 4), device=device)
    hss_kernels.hierarchical_softmax_loss(xl.requires_grad_(), y, tree, backend="triton").backward()
    hss_kernels.tree_min_loss(xn.requires_grad_(), y, tree, backend="triton").backward()
    triton_mod.OPS["decode"](xn.detach(), tree)
    names = [n for n, _, _ in launches]
    assert names.count("_hierarchical_softmax_kernel") == 2 and names.count("_tree_min_kernel") == 2 and "_decode_kernel" in names
    # the device comes from the logits (the first argument), never from the current device
    assert all(like is first and like.device == torch.device(device) for _, like, first in launches)


def test_tiles_follow_the_device(backend, device, monkeypatch):
    """Every kernel takes its tile sizes for its tensors' device: interpreter tiles for CPU tensors, the
    compiled kernels' (gpu_blocks) for CUDA tensors."""
    asked = []
    monkeypatch.setattr(C, "interpreter_pixels", lambda p, _f=C.interpreter_pixels: asked.append("interpreter") or _f(p))
    for mod in (triton_mod.tree_min, triton_mod.decode):
        monkeypatch.setattr(mod, "gpu_blocks", lambda *a, _f=mod.gpu_blocks, _m=mod.__name__: asked.append(_m) or _f(*a))
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, "tree_min_loss", (1, 3, 4), device=device)
    hss_kernels.tree_min_loss(x.requires_grad_(), y, tree, backend="triton").backward()
    hss_kernels.decode(x.detach(), tree, backend="triton")
    if device == "cpu":
        assert asked == ["interpreter"] * 3
    else:
        assert "interpreter" not in asked
        assert asked.count("hss_kernels.triton.tree_min") == 2 and asked.count("hss_kernels.triton.decode") == 1


def test_decode_walks_the_tree_in_pre_order():
    """The decode kernel's compiled-in tree: channels in pre-order with their depths and leaf ids, and
    whether the leaf ids increase along it (then a strict > keeps the lowest id of a tie; the shipped trees
    have both kinds, and tests/test_decode.py checks ties on both); leaf logits as a flat tree."""
    kinds = set()
    for name in trees.names():
        tree = trees.load(name)
        V, ch, dep, lid, D, ordered = triton_mod.decode._compiled_walk(triton_mod.decode._walk(tree, False))
        assert V == tree.num_nodes and list(ch) == tree.dfs_order and D == tree.depth
        assert [dep[i] for i in range(V)] == [tree.depths[c] for c in ch]
        assert [l for l in lid if l >= 0] == [tree.channel_labels[c] for c in ch if tree.is_leaf(c)]
        assert all((l >= 0) == tree.is_leaf(c) for c, l in zip(ch, lid))
        leaves = [l for l in lid if l >= 0]
        assert ordered == (leaves == sorted(leaves))
        kinds.add(ordered)
        L = tree.num_leaves
        assert triton_mod.decode._compiled_walk(triton_mod.decode._walk(tree, True)) == \
            (L, tuple(range(L)), (1,) * L, tuple(range(L)), 1, True)
    assert kinds == {True, False}
    x = torch.randn(1, 5, 2, 2)
    with pytest.raises(ValueError, match="walk has 26 nodes"):
        torch.ops.hss_triton.decode(x, triton_mod.decode._walk(trees.load("cityscapes"), False), 0, False, 255, [], False)


def test_the_interpreter_leaves_triton_language_as_it_found_it():
    """An interpreted launch puts triton.language back as it was, helper calls included (Triton 3.6's
    interpreter re-patches tl.core on every @triton.jit helper call and never restores it, and the next
    compile in the process then fails: 'ir.value' object has no attribute 'dtype')."""
    import triton.language as tl

    objs = (tl, tl.core, tl.tensor, tl.math)
    before = [dict(vars(o)) for o in objs]
    tree = trees.load("cityscapes")
    x = torch.randn(2, tree.num_nodes, 3, 5)
    hss_kernels.decode(x, tree, backend="triton")  # decode calls @triton.jit helpers
    y = torch.randint(0, tree.num_leaves, (2, 3, 5))
    hss_kernels.tree_min_loss(x, y, tree, backend="triton")
    for obj, old in zip(objs, before):
        changed = sorted(n for n, v in vars(obj).items() if n not in old or v is not old[n])
        assert not changed, f"{obj.__name__}: {changed[:5]}"


@pytest.mark.parametrize("layout,dtype", [("nchw", torch.float32), ("nchw", torch.bfloat16), ("nchw", torch.float64),
                                          ("channels_last", torch.float32), ("strided", torch.bfloat16)])
def test_gpu_tiles_of_the_hierarchical_softmax_under_the_interpreter(layout, dtype, monkeypatch):
    """The hierarchical softmax kernel with the tiles a GPU launch takes (hierarchical_softmax.gpu_blocks:
    chunks of 8, 4, 2 or 1 leaves, 512-1024 pixels per program), run by the interpreter on the CPU against
    the reference: forward and backward, reduction "none", eps and the single pass, on an image wider
    than one program, with a leaf count that leaves a partial last chunk, the far-group branch included."""
    from hss_kernels.triton import hierarchical_softmax as hs

    monkeypatch.setattr(hs, "_blocks", hs.gpu_blocks)
    tree = trees.load("lip")  # 20 leaves: a partial last chunk of 8 (fp32)
    x, y = H.inputs(tree, "hierarchical_softmax_loss", (1, 5, 220), dtype=dtype)
    x[0, :, 0, 1] = -200.0  # a pixel whose groups sit far below its max: the cold branch
    x[0, 0, 0, 1] = 200.0
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # H and W not one pixel axis: the kernel's (n, h, w) indexing
        x, y = x[:, :, :, ::2], y[:, :, ::2]
    block_c = hs.gpu_blocks(x)[0]
    assert block_c == (1 if layout == "channels_last" else 32 // (16 // x.element_size()))
    H.check("hierarchical_softmax_loss", "triton", x, y, tree, reduction="none")
    if dtype == torch.float32:
        H.check("hierarchical_softmax_loss", "triton", x, y, tree, eps=1e-4)
    loss, grad = hs.hierarchical_softmax_loss_and_grad(x, y, tree, reduction="sum")
    ref_loss, ref_grad, _ = H.loss_and_grad(H.ref("hierarchical_softmax_loss"), x, y, tree,
                                            torch.ones((), dtype=loss.dtype), reduction="sum")
    torch.testing.assert_close(loss, ref_loss, **H.loss_tolerance("hierarchical_softmax_loss", x, tree))
    H.assert_grad_close(grad, ref_grad, x.dtype, 1.0)


@pytest.mark.parametrize("layout,dtype", [("nchw", torch.float32), ("nchw", torch.bfloat16), ("nchw", torch.float64),
                                          ("channels_last", torch.float32), ("strided", torch.bfloat16)])
def test_gpu_tiles_of_the_tree_min_under_the_interpreter(layout, dtype, monkeypatch):
    """The tree-min / tree-BCE kernel with the tiles a GPU launch takes (tree_min.gpu_blocks: 16 bytes of pixels
    per thread on NCHW, 512 float32 pixels per program; groups of 8 nodes per load, 4 in the bfloat16 tree BCE, a
    partial last group), run by the interpreter on the CPU against the
    reference: forward and backward, reduction "none", focal and plain, eps, ties, a NaN logit, and the
    single pass, on an image wider than one program, (n, h, w) indexing for the strided layout."""
    from hss_kernels.triton import tree_min as tm

    monkeypatch.setattr(tm, "_blocks", tm.gpu_blocks)
    tree = trees.load("helen")  # depth 4: a deep path, several internal nodes per depth
    x, y = H.inputs(tree, "tree_min_loss", (1, 5, 300), dtype=dtype)
    x[0, :, 0, 3] = x[0, 0, 0, 3]  # a pixel whose logits all tie
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x, y = x[:, :, :, ::2], y[:, :, ::2]
    assert tm.gpu_blocks(x)[1] == (128 if layout == "channels_last" else tm.NCHW_BYTES // x.element_size() * 128)
    assert tree.num_nodes % tm.T.GROUP != 0
    for op in ("tree_min_loss", "tree_bce_loss"):
        H.check(op, "triton", x, y, tree, reduction="none", gamma=2.0)
        if dtype == torch.float32:
            H.check(op, "triton", x, y, tree, gamma=0.0, eps=1e-3, normalize="node")
            H.check(op, "triton", x, y, tree, gamma=1.5, scale=5.0)
        fn = tm.tree_min_loss_and_grad if op == "tree_min_loss" else tm.tree_bce_loss_and_grad
        loss, grad = fn(x, y, tree, reduction="sum")
        ref_loss, ref_grad, _ = H.loss_and_grad(H.ref(op), x, y, tree, torch.ones((), dtype=loss.dtype),
                                                reduction="sum")
        torch.testing.assert_close(loss, ref_loss, **H.loss_tolerance(op, x, tree))
        H.assert_grad_close(grad, ref_grad, x.dtype, 1.0)
    xn = x.clone()
    xn[0, 2, 0, 5] = float("nan")  # a NaN logit: that pixel's loss and gradient row are NaN, the rest not
    for op in ("tree_min_loss", "tree_bce_loss"):
        fn = tm.tree_min_loss_and_grad if op == "tree_min_loss" else tm.tree_bce_loss_and_grad
        labelled = bool(y[0, 0, 5] != 255)
        loss, grad = fn(xn, y, tree, reduction="sum")
        assert torch.isnan(loss).item() == labelled
        assert torch.isnan(grad[0, :, 0, 5]).all().item() == labelled
        assert not torch.isnan(grad[0, :, 0, 6:]).any()


@pytest.mark.parametrize("layout,dtype", [("nchw", torch.float32), ("nchw", torch.bfloat16), ("nchw", torch.float64),
                                          ("channels_last", torch.float32), ("strided", torch.bfloat16)])
def test_gpu_tiles_of_decode_under_the_interpreter(layout, dtype, monkeypatch):
    """The decode kernel with the tiles a GPU launch takes (decode.gpu_blocks: 16 bytes of consecutive pixels
    per thread on NCHW, one pixel on channels_last; groups of 8 nodes per load, a partial last group), run
    by the interpreter against the reference on an image wider than one program: both activations and
    scores, sibling ties on a tree whose leaf ids do not follow the pre-order and on one whose do, leaf
    logits; (n, h, w) indexing for the strided layout."""
    from hss_kernels.triton import decode as dk

    monkeypatch.setattr(dk, "_blocks", dk.gpu_blocks)
    for name in ("helen", "cityscapes"):
        tree = trees.load(name)
        x = H.random_logits(tree.num_nodes, (1, 3, 1100), dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = x[:, :, :, ::2]
        block_p, _, vec = dk.gpu_blocks(x)
        vec_want = 1 if layout == "channels_last" else 16 // x.element_size()
        assert (block_p, vec) == (128 * vec_want, vec_want)
        assert tree.num_nodes % dk.T.GROUP != 0 and x.shape[2] * x.shape[3] > block_p
        for activation in H.ACTIVATIONS:
            for score in H.SCORES:
                H.assert_decodes_like_reference(dk.decode(x, tree, activation, score), x, tree, activation, score)
        xt, lowest = H.sibling_ties(tree, x)
        H.assert_lowest_of_ties(dk.decode(xt, tree), lowest)
        xs = H.saturated_logits(tree.num_nodes, (1, 3, 1100), dtype)  # ties across subtrees
        for activation in H.ACTIVATIONS:
            assert H.has_ties(xs, tree, activation, "sum")
            assert torch.equal(dk.decode(xs, tree, activation, "sum"), H.first_maximum(xs, tree, activation, "sum"))
        leaf = H.random_logits(tree.num_leaves, (1, 3, 1100), dtype)
        assert torch.equal(dk.decode(leaf, tree), leaf.float().argmax(dim=1))


@pytest.mark.parametrize("align_corners", [False, True])
def test_gpu_tiles_of_upsampled_decode_under_the_interpreter(align_corners, monkeypatch):
    """decode(size=) with the GPU's tile (decode._up_blocks compiled: 256 pixels, two a thread) run by the
    interpreter on an output wider than one program, channels_last, a partial last group of nodes, a NaN."""
    from hss_kernels.triton import decode as dk

    monkeypatch.setattr(dk, "_up_blocks", lambda logits, pixels: (256, 4, 1))
    tree = trees.load("helen")
    x = H.random_logits(tree.num_nodes, (1, 3, 90)).contiguous(memory_format=torch.channels_last)
    x[0, 2, 1, 40] = float("nan")
    assert tree.num_nodes % dk.T.GROUP != 0
    for activation in H.ACTIVATIONS:
        got = dk.decode(x, tree, activation, "mean", size=(5, 301), align_corners=align_corners)
        H.assert_decode_size_like_reference(got, x, tree, activation, "mean", (5, 301), align_corners)



def _wide_tree():
    """Depth 3, 72 nodes: node A with 33 leaf children (a 6-bit argmax field), node B with 12 internal
    children of 2 leaves each, a leaf C: 34 bits of fields, two words (tree_min.argmax_fields)."""
    parents = [-1] + [0] * 33 + [-1]  # A = 0, its leaves 1..33, B = 34
    for _ in range(12):
        parents += [34]
        parents += [len(parents) - 1] * 2
    parents += [-1]  # C
    return hss_kernels.Tree.from_parents(parents)


@pytest.mark.parametrize("name", trees.names() + ["wide"])
def test_argmax_fields_of_the_tree_min_gradient(name):
    """tree_min.argmax_fields against the tree itself: every node's ORD is its 1-based place among its parent's
    children (pre-order), every internal node's field holds 0 .. its number of children, inside one 32-bit word,
    and no two fields overlap."""
    from hss_kernels.triton import tree_min as tm

    tree = _wide_tree() if name == "wide" else trees.load(name)
    order = tree.dfs_order
    ords, word, shift, mask, nw = tm.argmax_fields(tuple(tree.depths[c] for c in order))
    internal = [c for c in order if tree.children[c]]
    assert len(word) == len(shift) == len(mask) == len(internal)
    for i, c in enumerate(order):
        p = tree.parents[c]
        if p >= 0:
            siblings = sorted(tree.children[p], key=lambda s: tree.dfs_pos[s])
            assert ords[i] == siblings.index(c) + 1
    used = {}
    for i, c in enumerate(internal):
        assert mask[i] >= len(tree.children[c]) and (mask[i] + 1) & mask[i] == 0
        assert 0 <= word[i] < nw and shift[i] + mask[i].bit_length() <= 32
        bits = mask[i] << shift[i]
        assert used.get(word[i], 0) & bits == 0
        used[word[i]] = used.get(word[i], 0) | bits
    if name == "wide":
        assert nw == 2


@pytest.mark.parametrize("shape", [(4, (2, 8), True), (8, (8, 2), True), (4, (8, 4), False)])
def test_tree_min_gradient_of_2_byte_logits_in_other_shapes(shape, monkeypatch):
    """The tree-min gradient of bfloat16 / float16 NCHW logits with the GPU's tiles in the shapes the sm_90 model
    tried without the stash (tree_min.GRAD_STASH off; NARROW_GRAD_VEC, NARROW_GRAD_GROUPS, NARROW_GRAD_PACKS: 4 or
    8 pixels per thread, a top-down group GT other than the bottom-up's G, packed argmax fields or M_v), run by the
    interpreter against the reference: ties, ignored pixels, focal and plain, eps, a random upstream gradient, a
    NaN logit."""
    from hss_kernels.triton import tree_min as tm

    vec, groups, packs = shape
    monkeypatch.setattr(tm, "_blocks", tm.gpu_blocks)
    monkeypatch.setattr(tm, "GRAD_STASH", False)
    monkeypatch.setattr(tm, "NARROW_GRAD_VEC", vec)
    monkeypatch.setattr(tm, "NARROW_GRAD_GROUPS", groups)
    monkeypatch.setattr(tm, "NARROW_GRAD_PACKS", packs)
    tree = trees.load("helen")  # depth 4
    assert tree.num_nodes % groups[0] != 0 or tree.num_nodes % groups[1] != 0
    for dtype in (torch.bfloat16, torch.float16):
        x, y = H.inputs(tree, "tree_min_loss", (1, 3, 83), dtype=dtype, ties=dtype == torch.float16)
        assert tm._packs(x, True) == packs and tm._shape(x, True, True) == (vec,) + groups
        H.check("tree_min_loss", "triton", x, y, tree, reduction="none", gamma=2.0)  # random grad_out
        H.check("tree_min_loss", "triton", x, y, tree, gamma=0.0, eps=1e-3)
        H.check("tree_min_loss", "triton", x, y, tree, gamma=1.5, normalize="node")
    xn = x.clone()
    xn[0, 3, 1, 7] = float("nan")
    labelled = bool(y[0, 1, 7] != 255)
    _, grad = tm.tree_min_loss_and_grad(xn, y, tree, reduction="sum")
    assert torch.isnan(grad[0, :, 1, 7]).all().item() == labelled
    assert not torch.isnan(grad[0, :, 1, 8:]).any()


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize("tiles", ["interpreter", "gpu_blocks"])  # not "gpu": conftest skips that keyword
def test_tree_min_gradient_routes_ties_through_wide_fields(tiles, stash, monkeypatch):
    """The tree-min gradient on a tree whose argmax fields take two words (one 6 bits wide), on logits that tie
    all the time (-1, 0, 1: children's maxima tie, a node ties its subtree's maximum), against the reference:
    "none" with a random upstream gradient, "mean", float64 and float32, focal and plain; with M_v stashed in the
    gradient (tree_min.GRAD_STASH) and without (the packed fields on NCHW)."""
    from hss_kernels.triton import tree_min as tm

    monkeypatch.setattr(tm, "GRAD_STASH", stash)
    if tiles == "gpu_blocks":
        monkeypatch.setattr(tm, "_blocks", tm.gpu_blocks)
    tree = _wide_tree()
    for dtype in (torch.float64, torch.float32):
        x, y = H.inputs(tree, "tree_min_loss", (2, 3, 37), dtype=dtype, ties=True)
        H.check("tree_min_loss", "triton", x, y, tree, reduction="none", gamma=2.0)  # random grad_out
        H.check("tree_min_loss", "triton", x, y, tree, gamma=0.0)


@pytest.mark.parametrize("dtype,vec,groups", [(torch.bfloat16, 8, (8, 4)), (torch.float16, 8, (8, 2)),
                                              (torch.bfloat16, 8, (4, 8)), (torch.float32, 4, (8, 8)),
                                              (torch.float32, 4, (8, 4)), (torch.float64, 2, (8, 8))])
@pytest.mark.parametrize("layout", ["nchw", "strided"])
def test_tree_min_gradient_stashes_its_maxima_in_the_gradient(dtype, vec, groups, layout, monkeypatch):
    """The tree-min gradient on NCHW keeps M_v of every internal node in the gradient's own element between its
    two passes (tree_min._stashes) with the GPU's tiles (VEC pixels per thread, the bottom-up and top-down groups
    G, GT: the shipped ones and others the sm_90 model tried), run by the interpreter against the reference on a
    tree of depth 4 (helen): logits that tie, ignored and bad labels, focal and plain, eps, a random upstream
    gradient, strided logits, a NaN logit, every pixel ignored. An element left holding its M_v, or read back
    after its gradient was written, would show as a wrong gradient."""
    from hss_kernels.triton import tree_min as tm

    monkeypatch.setattr(tm, "_blocks", tm.gpu_blocks)
    if dtype.itemsize == 2:
        monkeypatch.setattr(tm, "NARROW_STASH_GROUPS", groups)
    else:
        monkeypatch.setattr(tm, "_shape", lambda logits, use_extrema=False, two_pass=False, grad=None, _f=tm._shape:
                            (_f(logits, use_extrema, two_pass, grad)[0],) + groups)
    tree = trees.load("helen")  # depth 4
    shape = (1, 3, 2 * 83 if layout == "strided" else 83)
    for ties in (False, True):
        x, y = H.inputs(tree, "tree_min_loss", shape, dtype=dtype, ties=ties)
        if layout == "strided":
            x, y = x[:, :, :, ::2], y[:, :, ::2]
        assert tm._stashes(x, True) and not tm._packs(x, True)
        assert tm._shape(x, True, True) == (vec,) + groups
        assert tm.gpu_blocks(x, True, True)[1] == vec * 128
        H.check("tree_min_loss", "triton", x, y, tree, reduction="none", gamma=2.0)  # random grad_out
        H.check("tree_min_loss", "triton", x, y, tree, gamma=0.0, eps=1e-3)
        H.check("tree_min_loss", "triton", x, y, tree, gamma=1.5, normalize="node")
    yb = y.clone()
    yb[0, 0, 3] = tree.num_leaves + 7  # a bad label: that pixel's loss and gradient are NaN
    _, grad = tm.tree_min_loss_and_grad(x, yb, tree, reduction="sum")
    assert torch.isnan(grad[0, :, 0, 3]).all() and not torch.isnan(grad[0, :, 1:]).any()
    xn = x.clone()
    xn[0, 3, 1, 7] = float("nan")
    labelled = bool(y[0, 1, 7] != 255)
    loss, grad = tm.tree_min_loss_and_grad(xn, y, tree, reduction="sum")
    assert torch.isnan(loss).item() == labelled
    assert torch.isnan(grad[0, :, 1, 7]).all().item() == labelled
    assert not torch.isnan(grad[0, :, 1, 8:]).any()
    H.check("tree_min_loss", "triton", x, torch.full_like(y, 255), tree, reduction="sum")  # every pixel ignored


def test_tree_min_gradient_stashes_only_in_a_gradient_of_the_logits_dtype(monkeypatch):
    """tree_min._stashes: on NCHW (M_v exact in a gradient of the logits' dtype), not on channels_last, not into a
    gradient of another dtype (a float32 M_v would round in a bfloat16 one: the fields are packed then), not
    without GRAD_STASH (the float32 gradient packs its fields, 2-byte logits take NARROW_GRAD_VEC pixels)."""
    from hss_kernels.triton import tree_min as tm

    x = torch.zeros(1, 5, 3, 4, dtype=torch.float32)
    assert tm._stashes(x, True) and tm._stashes(x, True, torch.empty_like(x))
    assert not tm._stashes(x, False)
    assert not tm._stashes(x, True, torch.empty_like(x, dtype=torch.bfloat16))
    assert tm._packs(x, True, torch.empty_like(x, dtype=torch.bfloat16))
    assert not tm._stashes(x.contiguous(memory_format=torch.channels_last), True)
    xb = x.to(torch.bfloat16)
    assert tm._shape(xb, True, True) == (16 // 2,) + tuple(tm.NARROW_STASH_GROUPS)
    assert tm._shape(xb, True, True, torch.empty_like(xb)) == (16 // 2,) + tuple(tm.NARROW_STASH_GROUPS)
    # A float32 gradient of bfloat16 logits: no stash, so the shapes without it (M_v in registers at 8 pixels
    # per thread would spill).
    unstashed = (tm.NARROW_GRAD_VEC,) + tuple(tm.NARROW_GRAD_GROUPS)
    assert tm._shape(xb, True, True, torch.empty_like(x)) == unstashed
    assert tm.gpu_blocks(xb, True, True, torch.empty_like(x))[1] == tm.NARROW_GRAD_VEC * 128
    monkeypatch.setattr(tm, "GRAD_STASH", False)
    assert not tm._stashes(x, True) and tm._packs(x, True)
    assert tm._shape(x.to(torch.bfloat16), True, True) == (tm.NARROW_GRAD_VEC,) + tuple(tm.NARROW_GRAD_GROUPS)
