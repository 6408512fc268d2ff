"""Tests of multi-teacher losses (kdjax/losses/_ensemble.py) and ensemble_apply."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import _ensemble as ens
from kdjax.losses import compose
from kdjax.models import MLP
from kdjax.models import from_function
from kdjax.models import from_linen
from kdjax.models._ensemble import ensemble_apply


def _softmax(z, t=1.0):
  z = np.asarray(z, np.float64) / t
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _kl(p, q):
  return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)),
                         0.0), -1)


def _entropy(p):
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0), -1)


@pytest.fixture(scope="module")
def logits():
  rng = np.random.default_rng(0)
  teachers = [rng.normal(size=(5, 7)).astype(np.float32) * s
              for s in (1.0, 3.0, 0.5)]
  student = rng.normal(size=(5, 7)).astype(np.float32)
  return student, teachers


def test_ensemble_probabilities_uniform_and_weighted(logits):
  _, teachers = logits
  probs = [_softmax(z, 2.0) for z in teachers]
  got = ens.ensemble_probabilities(teachers, temperature=2.0)
  np.testing.assert_allclose(np.asarray(got), np.mean(probs, 0), rtol=1e-5)
  got_w = ens.ensemble_probabilities(teachers, jnp.array([2.0, 1.0, 1.0]), 2.0)
  np.testing.assert_allclose(
      np.asarray(got_w), 0.5 * probs[0] + 0.25 * probs[1] + 0.25 * probs[2],
      rtol=1e-5)
  # Stacked input is the same as a list.
  np.testing.assert_allclose(
      ens.ensemble_probabilities(np.stack(teachers), temperature=2.0), got,
      rtol=1e-6)
  # Per-example weights [M, B].
  w = np.random.default_rng(1).uniform(size=(3, 5)).astype(np.float32)
  wn = w / w.sum(0)
  got_pe = ens.ensemble_probabilities(teachers, w, 2.0)
  np.testing.assert_allclose(np.asarray(got_pe),
                             np.einsum("mb,mbc->bc", wn, np.stack(probs)),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_pe).sum(-1), 1.0, rtol=1e-6)


def test_confidence_weights_match_numpy(logits):
  _, teachers = logits
  for t, tau in ((1.0, 1.0), (2.0, 0.5)):
    h = np.stack([_entropy(_softmax(z, t)) for z in teachers])  # [M, B]
    expected = _softmax((-h / tau).T).T
    got = ens.confidence_weights(teachers, t, weight_temperature=tau)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


def test_confidence_weights_hand_case():
  confident = np.array([[10.0, 0.0, 0.0]], np.float32)
  uniform = np.zeros((1, 3), np.float32)
  w = np.asarray(ens.confidence_weights([confident, uniform]))
  assert w[0, 0] > w[1, 0]
  # A uniform teacher has entropy log 3; the confident one nearly 0.
  h_c = _entropy(_softmax(confident))[0]
  expected = 1 / (1 + np.exp(-(np.log(3) - h_c)))
  np.testing.assert_allclose(w[0, 0], expected, rtol=1e-5)
  # tau -> large: uniform weights; equal teachers: equal weights.
  np.testing.assert_allclose(
      ens.confidence_weights([confident, uniform], weight_temperature=1e6),
      0.5, rtol=1e-4)
  np.testing.assert_allclose(ens.confidence_weights([confident, confident]),
                             0.5, rtol=1e-6)


@pytest.mark.parametrize("mode", ens.MODES)
def test_multi_teacher_kl_matches_numpy(logits, mode):
  student, teachers = logits
  t = 2.0
  probs = np.stack([_softmax(z, t) for z in teachers])
  q = _softmax(student, t)
  weights = None
  if mode == "mean_probs":
    expected = _kl(probs.mean(0), q)
  elif mode == "weighted":
    weights = jnp.array([1.0, 2.0, 5.0])
    wn = np.array([1.0, 2.0, 5.0]) / 8.0
    expected = _kl(np.einsum("m,mbc->bc", wn, probs), q)
  elif mode == "confidence":
    h = np.stack([_entropy(p) for p in probs])
    w = _softmax(-h.T).T
    expected = _kl(np.einsum("mb,mbc->bc", w, probs), q)
  else:
    expected = np.mean([_kl(p, q) for p in probs], 0)
  expected = expected * t**2
  got = ens.multi_teacher_kl(student, teachers, mode=mode, weights=weights,
                             temperature=t, reduction="none")
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-6)
  mean = ens.multi_teacher_kl(student, teachers, mode=mode, weights=weights,
                              temperature=t)
  np.testing.assert_allclose(float(mean), expected.mean(), rtol=1e-4)
  mask = np.array([1, 0, 1, 1, 0], bool)
  masked = ens.multi_teacher_kl(student, teachers, mode=mode, weights=weights,
                                temperature=t, mask=mask)
  np.testing.assert_allclose(float(masked), expected[mask].mean(), rtol=1e-4)


def test_per_teacher_sum_with_weights(logits):
  student, teachers = logits
  q = _softmax(student)
  expected = sum(w * _kl(_softmax(z), q) for w, z in zip((1.0, 0.0, 2.0),
                                                         teachers))
  got = ens.multi_teacher_kl(student, teachers, mode="per_teacher_sum",
                             weights=jnp.array([1.0, 0.0, 2.0]),
                             reduction="none")
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4)


def test_single_teacher_is_plain_kl(logits):
  student, teachers = logits
  q, p = _softmax(student, 4.0), _softmax(teachers[0], 4.0)
  for mode in ("mean_probs", "confidence", "per_teacher_sum"):
    got = ens.multi_teacher_kl(student, [teachers[0]], mode=mode,
                               temperature=4.0)
    np.testing.assert_allclose(float(got), 16 * _kl(p, q).mean(), rtol=1e-4)


def test_identical_teachers_zero_loss(logits):
  _, teachers = logits
  for mode in ens.MODES:
    w = jnp.ones(3) if mode == "weighted" else None
    got = ens.multi_teacher_kl(teachers[1], [teachers[1]] * 3, mode=mode,
                               weights=w, temperature=3.0)
    np.testing.assert_allclose(float(got), 0.0, atol=1e-5)


def test_jit_equals_eager_and_grads_finite(logits):
  student, teachers = logits
  stacked = jnp.asarray(np.stack(teachers))
  for mode in ("mean_probs", "confidence", "per_teacher_sum"):
    f = lambda s, t: ens.multi_teacher_kl(s, t, mode=mode, temperature=t_)
    t_ = 4.0
    eager = f(student, stacked)
    jitted = jax.jit(f)(student, stacked)
    np.testing.assert_allclose(float(eager), float(jitted), rtol=1e-5)
    grad = jax.jit(jax.grad(f))(jnp.asarray(student), stacked)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.abs(np.asarray(grad)).max() > 0
  # A traced temperature (schedule) works too.
  got = jax.jit(lambda t: ens.multi_teacher_kl(student, stacked,
                                               temperature=t))(2.0)
  np.testing.assert_allclose(
      float(got), float(ens.multi_teacher_kl(student, stacked,
                                             temperature=2.0)), rtol=1e-6)


def test_extreme_logits_finite():
  student = jnp.array([[1e4, -1e4, 0.0]])
  teachers = [jnp.array([[-1e4, 1e4, 0.0]]), jnp.array([[0.0, -jnp.inf, 1.0]])]
  for mode in ens.MODES:
    w = jnp.array([1.0, 1.0]) if mode == "weighted" else None
    val, grad = jax.value_and_grad(
        lambda s: ens.multi_teacher_kl(s, teachers, mode=mode, weights=w))(
            student)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))


def test_errors(logits):
  student, teachers = logits
  bad = teachers[:1] + [np.zeros((5, 9), np.float32), teachers[2]]
  with pytest.raises(ValueError,
                     match="teacher 0 has 7, teacher 1 has 9, teacher 2 has 7"):
    ens.multi_teacher_kl(student, bad)
  with pytest.raises(ValueError, match="class-count mismatch"):
    ens.multi_teacher_kl(student[:, :5], teachers)
  with pytest.raises(ValueError, match="needs weights"):
    ens.multi_teacher_kl(student, teachers, mode="weighted")
  with pytest.raises(ValueError, match="one entry per teacher"):
    ens.multi_teacher_kl(student, teachers, mode="weighted",
                         weights=jnp.ones(2))
  with pytest.raises(ValueError, match="unknown multi-teacher mode"):
    ens.multi_teacher_kl(student, teachers, mode="max")
  with pytest.raises(ValueError, match="at least one teacher"):
    ens.multi_teacher_kl(student, [])


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1)))
    self.sow("intermediates", "penultimate", h)
    return nn.Dense(4)(h)


def test_ensemble_apply_different_architectures():
  x = np.random.default_rng(0).normal(size=(3, 2, 2)).astype(np.float32)
  batch = {"image": jnp.asarray(x), "label": jnp.array([0, 1, 3])}
  mlp = MLP(hidden=(5,), num_classes=4)
  a_apply = from_linen(mlp, feature_names=("penultimate",))
  a_vars = mlp.init(jax.random.PRNGKey(0), x)
  b_apply = from_function(lambda p, x: x.reshape(x.shape[0], -1) @ p["w"])
  b_vars = {"params": {"w": jnp.asarray(
      np.random.default_rng(1).normal(size=(4, 4)), jnp.float32)}}
  apply = ensemble_apply([a_apply, b_apply])
  out = jax.jit(apply)((a_vars, b_vars), batch)
  za = np.asarray(a_apply(a_vars, batch).logits)
  zb = np.asarray(b_apply(b_vars, batch).logits)
  stacked = np.asarray(out.features["teacher_logits"])
  assert stacked.shape == (2, 3, 4)
  np.testing.assert_allclose(stacked, np.stack([za, zb]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.logits),
                             np.log((_softmax(za) + _softmax(zb)) / 2),
                             rtol=1e-5, atol=1e-6)
  assert out.features["teacher_0/penultimate"].shape == (3, 5)
  assert out.state is None
  # The multi-teacher term reads the stacked logits.
  s_logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)),
                         jnp.float32)

  class S:
    logits = s_logits
    features = {}

  loss_fn = compose([ens.multi_teacher_term("mt", mode="confidence")],
                    temperature=2.0)
  total, _ = loss_fn(S, out, batch)
  direct = ens.multi_teacher_kl(s_logits, [za, zb], mode="confidence",
                                temperature=2.0)
  np.testing.assert_allclose(float(total), float(direct), rtol=1e-5)
  with pytest.raises(ValueError, match="tuple of 2 variables"):
    apply(a_vars, batch)


def test_ensemble_apply_class_mismatch_names_counts():
  x = jnp.ones((2, 3))
  apply = ensemble_apply([
      from_function(lambda p, x: x @ p["w"]),
      from_function(lambda p, x: x @ p["w"])])
  variables = ({"params": {"w": jnp.ones((3, 10))}},
               {"params": {"w": jnp.ones((3, 12))}})
  with pytest.raises(ValueError, match="teacher 0 has 10, teacher 1 has 12"):
    apply(variables, {"image": x})
  with pytest.raises(ValueError, match="at least one"):
    ensemble_apply([])


def test_multi_teacher_term_missing_logits():
  class T:
    logits = jnp.zeros((2, 3))
    features = {}

  class S:
    logits = jnp.zeros((2, 3))
    features = {}

  loss_fn = compose([ens.multi_teacher_term()])
  with pytest.raises(KeyError, match="teacher_logits"):
    loss_fn(S, T, {})
