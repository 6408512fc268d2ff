"""Every loss that takes class labels rejects labels outside [0, C) (eagerly; traced: runtime_checks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from kdjax import losses
from kdjax.models import ModelOutput

B, D, C = 3, 4, 10


def rand(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


S, T = rand(0, (B, C)), rand(1, (B, C))
H, W, BIAS = rand(2, (B, D)), rand(3, (D, C)), rand(4, (C,))


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))


# name in the error -> loss(labels); labels are [B] except for ULD ([1, B]).
LOSSES = {
    "hard_label_cross_entropy":
        lambda y: losses.hard_label_cross_entropy(S, y),
    "dkd": lambda y: losses.dkd(S, T, y),
    "dkd_terms": lambda y: sum(losses.dkd_terms(S, T, y)).sum(),
    "cross_entropy_from_hidden":
        lambda y: losses.cross_entropy_from_hidden(H, (W, BIAS), y),
    "vocab_sharded_divergence_from_hidden":
        lambda y: losses.vocab_sharded_divergence_from_hidden(
            _mesh(), H, losses.Unembedding(W, BIAS), labels=y),
    "universal_logit_distillation":
        lambda y: losses.universal_logit_distillation_loss(
            S[None], y[None], np.ones((1, B)), T[None], np.ones((1, B))),
}
# The composed-loss terms reach the same checks.
TERMS = {
    "hard_label_cross_entropy": losses.label_term(),
    "dkd": losses.dkd_term(),
}
VALID = np.array([0, 9, 4], np.int32)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("bad", [12, 10, -1])
def test_out_of_range_labels_raise_eagerly(name, bad):
  labels = VALID.copy()
  labels[1] = bad
  with pytest.raises(ValueError,
                     match=rf"{name}: .*must lie in \[0, 10\) for 10 classes"):
    LOSSES[name](labels)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_composed_terms_check_labels(name):
  loss = losses.compose([losses.Term("t", TERMS[name])], temperature=2.0)
  student, teacher = ModelOutput(logits=S), ModelOutput(logits=T)
  loss(student, teacher, {"label": VALID})
  with pytest.raises(ValueError, match=rf"{name}: labels must lie in \[0, 10\)"):
    loss(student, teacher, {"label": np.array([0, 12, 1], np.int32)})


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_valid_labels_work_under_jit(name):
  eager = LOSSES[name](VALID)
  jitted = jax.jit(LOSSES[name])(jnp.asarray(VALID))
  assert np.isfinite(jitted)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float_labels_are_rejected(name):
  with pytest.raises(ValueError, match=f"{name}: .*must be integers"):
    LOSSES[name](VALID.astype(np.float32))


# ----------------------------------------------------------------------------
# Traced labels and temperatures: checkify checks inside runtime_checks().
# ----------------------------------------------------------------------------


def _checked(fn):
  def inner(*args):
    with losses.runtime_checks():
      return fn(*args)
  return jax.jit(checkify.checkify(inner))


@pytest.mark.parametrize("name", ["hard_label_cross_entropy", "dkd",
                                  "cross_entropy_from_hidden"])
def test_traced_labels_are_checked_under_runtime_checks(name):
  err, value = _checked(LOSSES[name])(jnp.asarray(VALID))
  err.throw()
  err, _ = _checked(LOSSES[name])(jnp.asarray([0, 12, 1], jnp.int32))
  with pytest.raises(checkify.JaxRuntimeError,
                     match=rf"{name}: labels must lie in \[0, 10\).*\[0, 12\]"):
    err.throw()
  err, _ = _checked(LOSSES[name])(jnp.asarray([0, -1, 1], jnp.int32))
  with pytest.raises(checkify.JaxRuntimeError, match=r"\[-1, 1\]"):
    err.throw()


@pytest.mark.parametrize("bad_t", [0.0, -1.0, float("nan")])
def test_traced_temperature_is_checked_under_runtime_checks(bad_t):
  fn = lambda t: losses.dkd(S, T, VALID, temperature=t)
  err, _ = _checked(fn)(1.0)
  err.throw()
  err, _ = _checked(fn)(bad_t)
  with pytest.raises(checkify.JaxRuntimeError,
                     match="temperature must be > 0, got"):
    err.throw()


def test_without_runtime_checks_the_program_is_unchanged():
  fn = lambda y, t: losses.dkd(S, T, y, temperature=t)
  plain = str(jax.make_jaxpr(fn)(jnp.asarray(VALID), 2.0))
  assert "check" not in plain
  # Outside the context a traced bad label gives a (silently wrong) value.
  assert np.isfinite(jax.jit(fn)(jnp.asarray([0, 12, 1], jnp.int32), 2.0))
