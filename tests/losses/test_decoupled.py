"""Tests of DKD (Zhao et al., CVPR 2022) and DIST (Huang et al., NeurIPS 2022).

References are NumPy (float64) transcriptions of the papers' formulas and of
their official implementations' structure (mdistiller's ``dkd_loss`` with the
``-1000 * gt_mask`` trick for the non-target distribution; DIST's Pearson
correlation per row and per column), written independently of kdjax.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses

C = 5
SHAPES = [(4, C), (2, 3, C)]
ATOL = RTOL = 1e-5


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  z = x - np.max(x, axis=-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_kl(p, log_p, log_q):
  return np.where(p > 0, p * (np.where(p > 0, log_p, 0) - log_q), 0.0).sum(-1)


def np_dkd_terms(s, t, y, temperature):
  """Per-position (TCKD, NCKD), each times T^2, as in mdistiller's dkd_loss."""
  gt = np.eye(s.shape[-1])[y]
  ps = np_softmax(s / temperature)
  pt = np_softmax(t / temperature)
  bs = np.stack([(ps * gt).sum(-1), (ps * (1 - gt)).sum(-1)], -1)
  bt = np.stack([(pt * gt).sum(-1), (pt * (1 - gt)).sum(-1)], -1)
  with np.errstate(divide="ignore"):
    tckd = np_kl(bt, np.log(bt), np.log(bs))
  log_ps2 = np_log_softmax(s / temperature - 1000.0 * gt)
  log_pt2 = np_log_softmax(t / temperature - 1000.0 * gt)
  nckd = np_kl(np.exp(log_pt2), log_pt2, log_ps2)
  return tckd * temperature**2, nckd * temperature**2


def np_pearson(a, b):
  return np.corrcoef(a, b)[0, 1]


def np_dist_parts(s, t, temperature):
  """(inter [N], intra scalar) of DIST on rows s, t of shape [N, C]."""
  ys = np_softmax(s / temperature)
  yt = np_softmax(t / temperature)
  inter = np.array([1 - np_pearson(ys[i], yt[i]) for i in range(len(ys))])
  intra = np.mean([1 - np_pearson(ys[:, c], yt[:, c])
                   for c in range(ys.shape[1])])
  return inter * temperature**2, intra * temperature**2


def _data(shape, seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  s = (scale * rng.standard_normal(shape)).astype(np.float32)
  t = (scale * rng.standard_normal(shape)).astype(np.float32)
  y = rng.integers(0, shape[-1], size=shape[:-1])
  return s, t, y


def _reduce(per, reduction):
  return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


# -----------------------------------------------------------------------------
# DKD.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BLC"])
def test_dkd_terms_and_dkd_match_reference(shape, temperature):
  s, t, y = _data(shape, seed=1)
  tckd_ref, nckd_ref = np_dkd_terms(s, t, y, temperature)
  tckd, nckd = losses.dkd_terms(s, t, y, temperature=temperature)
  np.testing.assert_allclose(tckd, tckd_ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(nckd, nckd_ref, rtol=RTOL, atol=ATOL)
  per = 1.0 * tckd_ref + 8.0 * nckd_ref  # paper defaults alpha=1, beta=8
  for reduction in ("none", "mean", "sum"):
    got = losses.dkd(s, t, y, temperature=temperature, reduction=reduction)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _reduce(per, reduction), rtol=RTOL,
                               atol=ATOL)
  got = losses.dkd(s, t, y, alpha=0.5, beta=2.0, temperature=temperature)
  np.testing.assert_allclose(got, (0.5 * tckd_ref + 2.0 * nckd_ref).mean(),
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_decomposes_classic_kd(temperature):
  # Zhao et al. eq. (1)-(5): KD = TCKD + (1 - p^t_target) * NCKD per example.
  s, t, y = _data((2, 3, C), seed=2)
  tckd, nckd = losses.dkd_terms(s, t, y, temperature=temperature)
  kd = losses.kl_divergence(s, t, temperature, reduction="none")
  p_target = np.take_along_axis(np_softmax(t / temperature), y[..., None],
                                -1)[..., 0]
  np.testing.assert_allclose(kd, np.asarray(tckd) + (1 - p_target) * nckd,
                             rtol=1e-5, atol=1e-5)


def test_dkd_zero_for_identical_and_nckd_zero_with_two_classes():
  s, _, y = _data((4, C), seed=3)
  np.testing.assert_allclose(losses.dkd(s, s, y), 0.0, atol=1e-6)
  s2, t2, y2 = _data((4, 2), seed=4)
  _, nckd = losses.dkd_terms(s2, t2, y2)
  np.testing.assert_allclose(nckd, 0.0, atol=1e-6)


# -----------------------------------------------------------------------------
# DIST.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BLC"])
def test_dist_inter_intra_match_pearson_reference(shape, temperature):
  s, t, _ = _data(shape, seed=5)
  inter, intra = np_dist_parts(s.reshape(-1, C), t.reshape(-1, C), temperature)
  got_inter = losses.dist(s, t, beta=1.0, gamma=0.0, temperature=temperature)
  got_intra = losses.dist(s, t, beta=0.0, gamma=1.0, temperature=temperature)
  np.testing.assert_allclose(got_inter, inter.mean(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got_intra, intra, rtol=RTOL, atol=ATOL)
  per = (2.0 * inter + 0.5 * intra).reshape(shape[:-1])
  for reduction in ("none", "mean", "sum"):
    got = losses.dist(s, t, beta=2.0, gamma=0.5, temperature=temperature,
                      reduction=reduction)
    np.testing.assert_allclose(got, _reduce(per, reduction), rtol=RTOL,
                               atol=ATOL, err_msg=reduction)


def test_dist_zero_for_identical_inputs():
  s, _, _ = _data((2, 3, C), seed=6)
  np.testing.assert_allclose(losses.dist(s, s), 0.0, atol=1e-5)
  np.testing.assert_allclose(losses.dist(s, s, temperature=4.0), 0.0,
                             atol=1e-4)  # T^2 = 16 times the eps effect
  # Pearson is invariant to affine maps: a positive affine map of the
  # probabilities is not a softmax, but shifting logits is the identity.
  np.testing.assert_allclose(losses.dist(s + 5.0, s), 0.0, atol=1e-5)


def test_dist_vmap_is_per_slice():
  # DIST is not separable per position: vmapping it over an extra axis gives
  # one DIST per slice (intra-class correlation within each slice).
  s, t, _ = _data((2, 3, C), seed=7)
  got = jax.jit(jax.vmap(losses.dist))(s, t)
  for i in range(2):
    inter, intra = np_dist_parts(s[i], t[i], 1.0)
    np.testing.assert_allclose(got[i], inter.mean() + intra, rtol=RTOL,
                               atol=ATOL)


# -----------------------------------------------------------------------------
# Shared behaviour: jit, vmap, bfloat16, masks, NaN safety, errors.
# -----------------------------------------------------------------------------


def _dkd(s, t, y, **kw):
  return losses.dkd(s, t, y, temperature=2.0, **kw)


def _dist(s, t, y, **kw):
  del y
  return losses.dist(s, t, temperature=2.0, **kw)


LOSSES = {"dkd": _dkd, "dist": _dist}


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_dkd_and_dist_with_traced_temperature(self):
    s, t, y = _data((4, C), seed=8)

    @self.variant
    def f(s, t, y, temperature):
      return (losses.dkd(s, t, y, temperature=temperature),
              losses.dist(s, t, temperature=temperature))

    got_dkd, got_dist = f(s, t, y, jnp.float32(3.0))
    tckd, nckd = np_dkd_terms(s, t, y, 3.0)
    np.testing.assert_allclose(got_dkd, (tckd + 8 * nckd).mean(), rtol=RTOL)
    inter, intra = np_dist_parts(s, t, 3.0)
    np.testing.assert_allclose(got_dist, inter.mean() + intra, rtol=RTOL)


@pytest.mark.parametrize("name", list(LOSSES))
def test_jit_equals_eager_and_grad_finite(name):
  fn = LOSSES[name]
  s, t, y = _data((2, 3, C), seed=9)
  np.testing.assert_allclose(jax.jit(fn)(s, t, y), fn(s, t, y), rtol=1e-6,
                             atol=1e-6)
  grad = jax.jit(jax.grad(fn))(jnp.asarray(s), t, y)
  assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


def test_dkd_vmap_equals_batched_call():
  s, t, y = _data((2, 3, C), seed=10)
  batched = _dkd(s, t, y, reduction="none")
  mapped = jax.jit(jax.vmap(lambda a, b, c: _dkd(a, b, c, reduction="none")))(
      s, t, y)
  np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_bfloat16_inputs(name):
  fn = LOSSES[name]
  s, t, y = _data((2, 3, C), seed=11, scale=1.0)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  value_and_grad = jax.jit(jax.value_and_grad(fn))
  got, grad = value_and_grad(s16, t16, y)
  assert got.dtype == jnp.float32 and np.isfinite(got)
  assert grad.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  ref_rounded, _ = value_and_grad(s16.astype(jnp.float32),
                                  t16.astype(jnp.float32), y)
  np.testing.assert_allclose(got, ref_rounded, rtol=1e-6, atol=1e-6)
  # Stated tolerance for bfloat16 rounding of the inputs (measured ~1e-3).
  np.testing.assert_allclose(got, fn(s, t, y), rtol=1e-2, atol=1e-2)


def test_masks_dkd():
  s, t, y = _data((2, 3, C), seed=12)
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  tckd, nckd = np_dkd_terms(s, t, y, 2.0)
  per = tckd + 8 * nckd
  np.testing.assert_allclose(_dkd(s, t, y, mask=mask), per[mask].mean(),
                             rtol=RTOL)
  np.testing.assert_allclose(_dkd(s, t, y, mask=mask, reduction="sum"),
                             per[mask].sum(), rtol=RTOL)
  np.testing.assert_allclose(_dkd(s, t, y, mask=mask, reduction="none"),
                             np.where(mask, per, 0), rtol=RTOL, atol=ATOL)


def test_masks_dist_exclude_padding_from_both_relations():
  s, t, _ = _data((2, 3, C), seed=13)
  mask = np.array([[1, 1, 0], [1, 0, 1]], bool)
  inter, intra = np_dist_parts(s[mask], t[mask], 2.0)  # unmasked rows only
  np.testing.assert_allclose(_dist(s, t, None, mask=mask),
                             inter.mean() + intra, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(_dist(s, t, None, mask=mask, reduction="sum"),
                             (inter + intra).sum(), rtol=RTOL, atol=ATOL)
  # Padding never dilutes: garbage in padded rows changes nothing.
  garbage = 100 * np.random.default_rng(14).standard_normal(s.shape)
  s2 = np.where(mask[..., None], s, garbage).astype(np.float32)
  np.testing.assert_allclose(_dist(s2, t, None, mask=mask),
                             inter.mean() + intra, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", list(LOSSES))
def test_fully_masked_is_zero_with_finite_gradient(name):
  fn = LOSSES[name]
  s, t, y = _data((2, 3, C), seed=15)
  mask = np.zeros((2, 3), bool)
  value, grad = jax.jit(jax.value_and_grad(
      lambda a, b, c, m: fn(a, b, c, mask=m)))(s, t, y, mask)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0)


def test_dist_single_example_gradient_finite():
  # One example: each class is constant over the batch (zero variance).
  s, t, _ = _data((1, C), seed=16)
  value, grad = jax.jit(jax.value_and_grad(losses.dist))(s, t)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", list(LOSSES))
def test_huge_logits_and_zero_probability_teacher_finite(name):
  fn = LOSSES[name]
  rng = np.random.default_rng(17)
  s = np.clip(1e4 * rng.standard_normal((4, C)), -1e4, 1e4).astype(np.float32)
  t = np.clip(1e4 * rng.standard_normal((4, C)), -1e4, 1e4).astype(np.float32)
  y = np.array([0, 1, 2, 3])
  value_and_grad = jax.jit(jax.value_and_grad(fn))
  value, grad = value_and_grad(s, t, y)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  s, t, y = _data((4, C), seed=18)
  t[0, 1] = -np.inf  # non-target class
  t[1, y[1]] = -np.inf  # the target class itself
  value, grad = value_and_grad(s, t, y)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  if name == "dkd":
    tckd, nckd = np_dkd_terms(s, t, y, 2.0)
    np.testing.assert_allclose(value, (tckd + 8 * nckd).mean(), rtol=RTOL)


def test_errors():
  s, t, y = _data((4, C), seed=19)
  for fn in (lambda *a, **k: losses.dkd(*a, y, **k), losses.dist):
    with pytest.raises(ValueError, match="class-count mismatch"):
      fn(s, t[:, :-1])
    with pytest.raises(ValueError, match="shape mismatch"):
      fn(s, t[:2])
    with pytest.raises(ValueError, match="temperature must be > 0"):
      fn(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
      fn(s, t, temperature=-2.0)
    with pytest.raises(ValueError, match="mask shape"):
      fn(s, t, mask=np.ones((4, 1)))
    with pytest.raises(ValueError, match="reduction must be one of"):
      fn(s, t, reduction="median")
  with pytest.raises(ValueError, match="labels shape"):
    losses.dkd(s, t, y[:3])
  with pytest.raises(ValueError, match="labels shape"):
    losses.dkd_terms(s, t, y[:, None])
  with pytest.raises(ValueError, match="labels must be integers"):
    losses.dkd(s, t, y.astype(np.float32))
  with pytest.raises(ValueError, match="DKD alpha must be >= 0"):
    losses.dkd(s, t, y, alpha=-1.0)
  with pytest.raises(ValueError, match="DKD beta must be >= 0"):
    losses.dkd(s, t, y, beta=-8.0)
  with pytest.raises(ValueError, match="at least 2 classes"):
    losses.dkd(s[:, :1], t[:, :1], np.zeros(4, np.int32))
