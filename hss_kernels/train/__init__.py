"""Training with the hierarchical losses: ``hss-train`` (``python -m hss_kernels.train``).

One module per job:

* :mod:`~hss_kernels.train.cli`: the options, their checks and ``main``;
* :mod:`~hss_kernels.train.loop`: one training job (data, model, loss, optimiser loop, evaluation, files);
* :mod:`~hss_kernels.train.inference`: evaluation on centre crops, whole images or sliding windows
  (``--eval-mode crop|whole|slide``);
* :mod:`~hss_kernels.train.distributed`: several processes under ``torchrun``;
* :mod:`~hss_kernels.train.checkpoint`: ``checkpoint.pt`` and ``log.json``;
* :mod:`~hss_kernels.train.demo`: ``hss-train --demo``, flat cross-entropy against the hierarchical losses;
* :mod:`~hss_kernels.train.data`: the synthetic data set and the real data sets' folder layouts;
* :mod:`~hss_kernels.train.models`: a small U-Net and torchvision's DeepLabV3.

Beyond torch it needs NumPy, Pillow, Matplotlib and tqdm (``pip install "hss_kernels[train]"``): importing
it without them fails at once, not an hour into a run at the first plot.
"""
from .._extras import require_train

require_train("hss_kernels.train (hss-train)")

from .cli import build_parser, main  # noqa: E402
from .demo import demo  # noqa: E402
from .loop import train  # noqa: E402

__all__ = ["main", "train", "build_parser", "demo"]
