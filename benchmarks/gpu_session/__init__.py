"""``python -m benchmarks.gpu_session --out DIR [--dry-run] [--budget-s 540]``: the one command for a GPU machine.

Stages, each a subprocess with its own time limit, a failed stage never stopping the later ones:
environment → build (+ the CUDA-kernel check of every op) → the GPU tests → ``hss-check`` in float32 and
bfloat16 (its Triton part in the background from the start) → the benchmark at ``vistas`` and ``vistas2``
→ ``compute-sanitizer`` → the static sm_90 model beside the measured times. Writes ``summary.json``,
``summary.md``, ``logs.tar.gz`` and the benchmark's JSON/MD/PNG into ``--out`` (at most 8 files), after
every stage. ``--dry-run`` runs every stage on the CPU at tiny sizes (CI runs it). See
``benchmarks/results/README.md``, "On a GPU machine", and :mod:`.stages`, :mod:`.runner`.
"""
from .stages import main  # noqa: F401
