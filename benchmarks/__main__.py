"""``python -m benchmarks`` from the checkout (see :mod:`benchmarks.run`)."""
import sys

from .run import main

sys.exit(main())
