"""``python -m benchmarks``: the same command as ``hss-bench`` (see :mod:`benchmarks.run`)."""
import sys

from .run import main

sys.exit(main())
