"""``python -m hss_kernels.train``: the same command as ``hss-train`` (see :mod:`hss_kernels.train.cli`)."""
import sys

from .cli import main

sys.exit(main())
