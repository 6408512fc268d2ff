"""Expected calibration error against an independent NumPy reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import metrics


def numpy_ece(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
  """Guo et al. 2017, Eq. 3, written per bin: sum_m |B_m|/N |acc_m - conf_m|."""
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  n = len(conf)
  ece = 0.0
  for m in range(num_bins):
    lo, hi = m / num_bins, (m + 1) / num_bins
    in_bin = (conf > lo) & (conf <= hi)
    if m == 0:
      in_bin |= conf == 0.0
    if in_bin.any():
      ece += in_bin.sum() / n * abs(correct[in_bin].mean() - conf[in_bin].mean())
  return ece


def _logits_from_probs(rows) -> np.ndarray:
  return np.log(np.asarray(rows, np.float64)).astype(np.float32)


def test_hand_computed_case():
  # Confidences 0.9 (right), 0.75 (wrong), 0.62 (right) and 0.64 (wrong):
  # bins (13/15, 14/15], (11/15, 12/15], and (9/15, 10/15] twice.
  probs = [[0.9, 0.1], [0.75, 0.25], [0.62, 0.38], [0.36, 0.64]]
  labels = np.array([0, 1, 0, 0])
  expected = (0.25 * abs(1 - 0.9) + 0.25 * abs(0 - 0.75)
              + 0.5 * abs(0.5 - (0.62 + 0.64) / 2))
  assert expected == pytest.approx(0.2775)
  got = metrics.expected_calibration_error(_logits_from_probs(probs),
                                               jnp.asarray(labels))
  assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_matches_numpy_reference_and_jit(num_bins):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (300, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 300)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = numpy_ece(probs.astype(np.float64), labels, num_bins)
  sums = metrics.calibration_sums(jnp.asarray(logits), jnp.asarray(labels),
                                      num_bins=num_bins)
  jitted = jax.jit(lambda l, y: metrics.calibration_sums(
      l, y, num_bins=num_bins))(jnp.asarray(logits), jnp.asarray(labels))
  chex.assert_trees_all_close(sums, jitted, rtol=1e-6, atol=1e-5)
  assert metrics.ece_from_sums(jax.device_get(sums)) == pytest.approx(
      expected, abs=1e-5)
  assert float(jnp.sum(sums["count"])) == 300


def test_batches_add_up_and_mask_excludes_padding():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (50, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 50)
  whole = metrics.calibration_sums(jnp.asarray(logits), jnp.asarray(labels))
  # Two batches, the second padded with 14 junk rows masked out.
  pad_logits = np.concatenate([logits[30:], rng.normal(0, 9, (14, 4))]).astype(
      np.float32)
  pad_labels = np.concatenate([labels[30:], np.zeros(14, int)])
  mask = np.concatenate([np.ones(20), np.zeros(14)])
  a = metrics.calibration_sums(jnp.asarray(logits[:30]),
                                   jnp.asarray(labels[:30]))
  b = metrics.calibration_sums(jnp.asarray(pad_logits),
                                   jnp.asarray(pad_labels),
                                   mask=jnp.asarray(mask))
  total = jax.tree.map(lambda x, y: x + y, a, b)
  chex.assert_trees_all_close(total, whole, atol=1e-5)


def test_reliability_bins_and_extremes():
  # Every example correct at confidence 1: perfectly calibrated, ECE 0.
  logits = np.array([[30.0, 0.0], [0.0, 30.0]], np.float32)
  labels = jnp.array([0, 1])
  sums = jax.device_get(metrics.calibration_sums(logits, labels))
  assert metrics.ece_from_sums(sums) == pytest.approx(0.0, abs=1e-6)
  rel = metrics.reliability_from_sums(sums)
  assert rel["count"][-1] == 2 and sum(rel["count"]) == 2
  assert rel["accuracy"][0] is None and rel["accuracy"][-1] == 1.0
  assert rel["bin_lower"][0] == 0.0 and rel["bin_upper"][-1] == 1.0
  # Uniform predictions over 4 classes: confidence 0.25, accuracy 0 or 1.
  sums = jax.device_get(metrics.calibration_sums(
      np.zeros((4, 4), np.float32), jnp.array([0, 1, 2, 3])))
  # argmax is class 0: one right of four -> acc 0.25 = conf 0.25.
  assert metrics.ece_from_sums(sums) == pytest.approx(0.0, abs=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="labels"):
    metrics.calibration_sums(jnp.zeros((3, 4)), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="num_bins"):
    metrics.calibration_sums(jnp.zeros((3, 4)), jnp.zeros((3,), jnp.int32),
                                 num_bins=0)
  with pytest.raises(ValueError, match="no examples"):
    metrics.ece_from_sums({"count": np.zeros(3), "correct": np.zeros(3),
                               "confidence": np.zeros(3)})
