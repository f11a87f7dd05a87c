"""hss_kernels: fast hierarchical semantic-segmentation losses.

The public API: class trees (:class:`Tree`, :mod:`hss_kernels.trees`), the losses in functional and
``nn.Module`` form, hierarchical decoding, and the backends that run them (``backend="auto"``,
``"reference"``, ``"triton"``, ``"native"``).
"""
from . import trees
from .backends import available_backends
from .functional import (
    decode,
    hierarchical_softmax_loss,
    label_check_enabled,
    labels_at_depth,
    set_label_check,
    tree_bce_loss,
    tree_min_loss,
    tree_triplet_loss,
)
from .modules import HierarchicalSoftmaxLoss, TreeBCELoss, TreeMinLoss, TreeTripletLoss
from .tables import TreeTables
from .tree import Tree

from . import backends as _backends

# Import the Triton and native backends now (each may be missing; that only makes it unavailable), so
# that torch.compile never traces a lazy import.
_backends.load_all()

__version__ = "0.1.0"

__all__ = [
    "Tree",
    "TreeTables",
    "trees",
    "available_backends",
    "hierarchical_softmax_loss",
    "tree_min_loss",
    "tree_bce_loss",
    "tree_triplet_loss",
    "decode",
    "labels_at_depth",
    "set_label_check",
    "label_check_enabled",
    "HierarchicalSoftmaxLoss",
    "TreeMinLoss",
    "TreeBCELoss",
    "TreeTripletLoss",
]
