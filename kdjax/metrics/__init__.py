"""kdjax.metrics: evaluation metrics beyond accuracy.

Expected calibration error and reliability diagrams (Guo et al. 2017):
per-batch sums that add up exactly across batches (``calibration_sums``, jit-
and mask-safe), finished on the host (``ece_from_sums``,
``reliability_from_sums``), or in one call (``expected_calibration_error``).
"""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._calibration": ("calibration_sums", "ece_from_sums",
        "expected_calibration_error", "reliability_from_sums"),
})

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.metrics._calibration import (
      calibration_sums, ece_from_sums, expected_calibration_error,
      reliability_from_sums)
