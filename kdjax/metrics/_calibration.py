"""Expected calibration error and reliability diagrams (Guo et al. 2017).

A classifier's confidence on an example is its top-1 probability
``conf_i = max_c softmax(z_i)_c``; it is correct when ``argmax_c z_i = y_i``.
The confidences are split into ``M`` equal-width bins
``B_m = {i : conf_i in ((m - 1) / M, m / M]}``, ``m = 1..M`` (a confidence of
exactly 0 goes to the first bin), and

  ``ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|``

with ``acc(B_m)`` the fraction of correct examples in the bin and
``conf(B_m)`` their mean confidence (Guo, Pleiss, Sun & Weinberger, "On
Calibration of Modern Neural Networks", ICML 2017, Eq. 3, ``M = 15``).

:func:`calibration_sums` returns per-bin *sums* for one batch (jit-safe, with
an optional mask), so that batches add up exactly; :func:`ece_from_sums` and
:func:`reliability_from_sums` finish on the host.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np


def calibration_sums(logits: chex.Array,
                     labels: chex.Array,
                     *,
                     num_bins: int = 15,
                     mask: Optional[chex.Array] = None) -> dict:
  """Per-bin counts, confidence sums and correct counts of one batch.

  Args:
    logits: ``[..., C]`` (any float dtype; computed in float32).
    labels: ``[...]`` int class indices.
    num_bins: ``M``, equal-width bins on ``[0, 1]``.
    mask: optional ``[...]`` weights (0 excludes an example, e.g. padding).

  Returns:
    ``{"count": [M], "confidence": [M], "correct": [M]}`` float32 sums
    (``confidence`` is the sum of the confidences in each bin).
  """
  if int(num_bins) != num_bins or num_bins < 1:
    raise ValueError(f"num_bins must be a positive int, got {num_bins}.")
  logits = jnp.asarray(logits, jnp.float32)
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels {labels.shape} must have the logits' shape "
                     f"without the class axis, {logits.shape[:-1]}.")
  probs = jax.nn.softmax(logits, axis=-1)
  confidence = jnp.max(probs, axis=-1).reshape(-1)
  correct = (jnp.argmax(logits, axis=-1) == labels).reshape(-1)
  weights = (jnp.ones_like(confidence) if mask is None
             else jnp.asarray(mask, jnp.float32).reshape(-1))
  # conf in ((m - 1) / M, m / M]  <=>  m = ceil(conf * M); 0 -> bin 1.
  index = jnp.clip(jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1, 0,
                   num_bins - 1)
  one_hot = jax.nn.one_hot(index, num_bins, dtype=jnp.float32) * weights[:, None]
  return {"count": jnp.sum(one_hot, axis=0),
          "confidence": confidence @ one_hot,
          "correct": correct.astype(jnp.float32) @ one_hot}


def ece_from_sums(sums: Mapping[str, Any]) -> float:
  """``ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|`` from summed bins."""
  count = np.asarray(sums["count"], np.float64)
  total = count.sum()
  if total <= 0:
    raise ValueError("ece_from_sums got no examples.")
  gap = np.abs(np.asarray(sums["correct"], np.float64)
               - np.asarray(sums["confidence"], np.float64))
  # |B_m| / N * |acc - conf| = |correct_sum - conf_sum| / N.
  return float(gap.sum() / total)


def reliability_from_sums(sums: Mapping[str, Any]) -> dict:
  """The reliability diagram's data: per bin its edges, count, accuracy and
  mean confidence (``None`` for empty bins), as JSON-ready lists."""
  count = np.asarray(sums["count"], np.float64)
  m = count.shape[0]
  safe = np.maximum(count, 1e-12)
  acc = np.asarray(sums["correct"], np.float64) / safe
  conf = np.asarray(sums["confidence"], np.float64) / safe
  empty = count <= 0
  return {
      "bin_lower": [i / m for i in range(m)],
      "bin_upper": [(i + 1) / m for i in range(m)],
      "count": [int(round(c)) for c in count],
      "accuracy": [None if e else float(a) for a, e in zip(acc, empty)],
      "confidence": [None if e else float(c) for c, e in zip(conf, empty)],
  }


def expected_calibration_error(logits: chex.Array,
                               labels: chex.Array,
                               *,
                               num_bins: int = 15,
                               mask: Optional[chex.Array] = None) -> float:
  """ECE of one set of predictions (see the module docstring); a float."""
  return ece_from_sums(jax.device_get(
      calibration_sums(logits, labels, num_bins=num_bins, mask=mask)))
