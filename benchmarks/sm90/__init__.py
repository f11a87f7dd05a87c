"""A static model of every GPU kernel on an H100 (sm_90), computed on the CPU: ``python -m benchmarks.sm90``.

For each op × backend × dtype × pass × layout at B = 8, 1024×1024 it compiles the kernels for sm_90 as a
GPU run would, reads from the compiled code what no timer needs a GPU for, and estimates the time the
kernels need to *issue* their instructions, next to the time the pass needs to *move* its bytes. The
upsampling factor s (``--upsample``, default 1, 4, 8) adds the rows of the kernels that fuse bilinear
upsampling: logits (8, C, 1024/s, 1024/s), labels 1024×1024, the call made with ``upsample="bilinear"``
(Triton: the registry functions with ``takes_upsample``; CUDA: the pairs in
``cuda_side.FUSED_UPSAMPLE``, whose launches :func:`.cuda_side.launches` restates); the others are
listed as not fused.

* **Triton** (:mod:`.triton_side`): the launchers themselves run on ``meta`` tensors of the real shape and
  layout, with a recorder in place of ``_common.launch``; each recorded launch is bound by the JIT's own
  binder (the runtime's specialisation: divisibility by 16, integers equal to 1 as constants) and
  compiled with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``.
* **CUDA** (:mod:`.cuda_side`): ``nvcc -cubin -arch=sm_90`` on each ``csrc/cuda/*.cu`` with setup.py's
  ``NVCC_FLAGS`` and torch's nvcc flags (cu130 venv of ``.ci/cuda-venv``), plus ``-lineinfo``; the
  launches (grid, block, dynamic shared memory, scalar arguments) restate the host code.
* **Reading the code**: ``cuobjdump --dump-resource-usage`` (registers, STACK + LOCAL bytes as
  ``spill_bytes``, static shared memory, which on sm_90 includes 1 KiB reserved per block) plus the
  launch's dynamic shared memory; ``nvdisasm -gi -c`` for the SASS with line chains.
* **Counting** (:mod:`.sass`): instructions one thread issues per launch = sum over basic blocks of
  instructions × frequency × the trips of every enclosing loop:

  - *launch constants*: kernel parameters (sizes, strides, flags such as ``extrema``, null pointers)
    are propagated through integer and predicate instructions; a branch they decide never runs its other
    side. nvcc versions loops on runtime values (``D == 1``) and unrolls ``kMaxDepth`` loops with exits at
    ``d >= D``: only the version and the copies that run are counted;
  - *loops*: natural loops of the back edges. Each maps to a source loop through the line chain of its
    back edge (else its header): the ``sm90: trips=<expr>`` annotation found there (see
    :mod:`.source`) gives its trips. A SASS loop without one is an error naming the kernel and the chain
    (``--unannotated warn`` counts it once per entry instead). Several SASS loops of one source loop in
    the same enclosing loop, inlined at the same call sites, are unrolled copies: each one's factor u is
    its memory instructions over the smallest copy's (body sizes where no memory is touched), the trips T
    are split greedily, largest u first (``T // u`` for an integer T, else ``(T - (u - 1) / 2) / u``), the
    rest to the next copy; copies inlined at different call sites (a helper called twice, such as
    upsample_math.h's bisection per axis) are separate loops, each with the full trips;
  - *branches*: both sides of an ordinary branch count (a warp whose threads diverge issues both); the
    side of a branch on an ``sm90: cold`` line that does not read the logits (or the code the branch
    skips) counts 0; code reached only by ``CALL`` (64-bit division and similar slow paths) is not
    counted, the inline fast path is; a block never counts more than its dominator (a join issues once);
  - ``global_load_bits``: the widest ``LDG`` on a line marked ``sm90: logits``.

* **Times**: warp-instructions = Σ instructions per thread × warps launched (Triton: num_warps ×
  programs; CUDA: blocks × threads / 32; the CUDA forward's one-block ``finish_weighted_kernel``
  (csrc/cuda/common.cuh) is included, a few thousand warp-instructions); ``issue_ms`` =
  warp-instructions / (4 per clock per SM × 132 SMs × 1.755 GHz); ``floor_ms`` = the bytes the pass must
  move (docs/MATH.md §5.6 and §6.5, formulas in
  :data:`.model.FLOOR_FORMULAS` and :data:`.model.UP_FLOOR_FORMULAS`: with upsampling the logits and their
  gradient count at the low resolution) / 3.0 TB/s; ``sass_per_element`` = instructions per thread ×
  threads / (P × C), P the labels' pixels.

Trip-count variables (:func:`.source.tree_variables`, labels uniform over the leaves): ``L`` leaves,
``V`` nodes, ``D`` depth, ``I`` internal nodes, ``DI`` depth of the deepest internal node, ``C`` channels
of the op (L or V), ``PATH`` mean path length, ``PATH_ITERS`` iterations of a ``for d < D`` loop that
breaks at the path's end (min(length + 1, D) per label), ``WALK`` nodes visited per label by the
subtree walks of the off-path internal nodes (Σ size − 1); Triton adds the launch's numeric constexprs
(``BLOCK_C``, ``BLOCK_L``, ``KY``, ...), CUDA the launch's named scalars (``P``, ``nb``, ``n`` low-resolution
pixels, ...) and ``threads``; both the sizes ``H``, ``W`` (labels) and ``h``, ``w`` (logits).
Functions: ``ceil``, ``floor``, ``log2``, ``min``, ``max``, ``cdiv``. A trip count is the iterations per
execution of the code around the loop, averaged (a subtree walk inside a loop over V nodes is
``WALK / V``), so nested loops multiply out to the right total.

What it cannot see: latency, occupancy and memory stalls, bank conflicts, caches; data-dependent branches
are counted on both sides; label distributions other than uniform; the PyTorch ops around the kernels
(Triton's second-stage ``partials.sum()``). It is a guide, not the truth: when a GPU measures a kernel,
the measured time is written beside the model's (``benchmarks/gpu_session.py`` matches rows by op,
backend, dtype, pass and layout).
"""
