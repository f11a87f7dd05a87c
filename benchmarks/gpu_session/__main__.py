"""``python -m benchmarks.gpu_session``: see :mod:`benchmarks.gpu_session`."""
import sys

from .stages import main

sys.exit(main())
