"""Training with the hierarchical losses: ``hss-train`` (``python -m hss_kernels.train``).

One module per job:

* :mod:`~hss_kernels.train.cli`: the options, their checks and ``main``;
* :mod:`~hss_kernels.train.loop`: one training job (data, model, loss, optimiser loop, evaluation, files);
* :mod:`~hss_kernels.train.distributed`: several processes under ``torchrun``;
* :mod:`~hss_kernels.train.checkpoint`: ``checkpoint.pt`` and ``log.json``;
* :mod:`~hss_kernels.train.demo`: ``hss-train --demo``, flat cross-entropy against the hierarchical losses;
* :mod:`~hss_kernels.train.data`: the synthetic data set and the real data sets' folder layouts;
* :mod:`~hss_kernels.train.models`: a small U-Net and torchvision's DeepLabV3.
"""
from .cli import build_parser, main
from .demo import demo
from .loop import train

__all__ = ["main", "train", "build_parser", "demo"]
