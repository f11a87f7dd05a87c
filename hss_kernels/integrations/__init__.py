"""Integrations with training frameworks; each is an optional dependency and is imported on its own.

* :mod:`hss_kernels.integrations.mmseg`: mmsegmentation 1.x (losses, a hierarchical segmentor, a
  per-depth IoU metric). Importing it registers them; importing ``hss_kernels`` never imports mmseg.
* :mod:`hss_kernels.integrations.torchmetrics`: ``HierarchicalMetric``, the per-depth metrics as a
  ``torchmetrics.Metric`` (Lightning logging, DDP sums).
"""
