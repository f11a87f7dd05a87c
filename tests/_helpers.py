"""Kept for tests/test_bad_labels.py and tests/test_nonfinite_logits.py (being changed on other branches):
the skip helper now lives in helpers.py."""
from helpers import backend_or_skip  # noqa: F401
