"""Tests of the self-distillation recipes (kdjax/train/_self_distillation.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.models import MLP
from kdjax.models import from_linen
from kdjax.train import create_state
from kdjax.train._self_distillation import born_again
from kdjax.train._self_distillation import mean_teacher_decay
from kdjax.train._self_distillation import mean_teacher_loss
from kdjax.train._self_distillation import mean_teacher_step
from kdjax.train._self_distillation import sigmoid_rampup
from kdjax.train._self_distillation import softmax_mse

NUM_CLASSES = 3


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _data(n=32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  w = rng.normal(size=(4, NUM_CLASSES))
  y = np.argmax(x @ w, -1).astype(np.int32)
  return x, y


def _batches(x, y, batch=8):
  return [{"image": jnp.asarray(x[i:i + batch]), "label": jnp.asarray(y[i:i + batch])}
          for i in range(0, len(x), batch)]


MODEL = MLP(hidden=(8,), num_classes=NUM_CLASSES)
APPLY = from_linen(MODEL)


def _init(key):
  return MODEL.init(key, jnp.zeros((1, 4)))


def test_schedules():
  decay = mean_teacher_decay(0.9)
  np.testing.assert_allclose(
      [float(decay(s)) for s in (0, 1, 2, 8, 100)],
      [0.5, 2 / 3, 0.75, 0.9, 0.9], rtol=1e-6)
  ramp = sigmoid_rampup(10.0, 100)
  np.testing.assert_allclose(
      [float(ramp(s)) for s in (0, 50, 100, 500)],
      [10 * np.exp(-5), 10 * np.exp(-5 * 0.25), 10.0, 10.0], rtol=1e-6)
  assert float(sigmoid_rampup(3.0, 0)(0)) == 3.0
  with pytest.raises(ValueError, match="decay"):
    mean_teacher_decay(1.5)


def test_softmax_mse_matches_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 5, 4)).astype(np.float32)
  expected = np.mean((_softmax(s / 2) - _softmax(t / 2))**2, -1)
  np.testing.assert_allclose(
      np.asarray(softmax_mse(s, t, 2.0, reduction="none")), expected,
      rtol=1e-5)
  grad = jax.grad(lambda z: softmax_mse(z, t))(jnp.asarray(s))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_mean_teacher_ema_follows_formula():
  x, y = _data()
  batches = _batches(x, y)
  optimizer = optax.sgd(0.5)
  loss_fn = mean_teacher_loss(consistency_weight=5.0, rampup_steps=0)
  step = mean_teacher_step(APPLY, optimizer, loss_fn=loss_fn, ema_decay=0.6)
  state = create_state(_init(jax.random.PRNGKey(0)), optimizer,
                       rng=jax.random.PRNGKey(1), ema=True)
  ema = jax.device_get(state.ema_params)
  for i, batch in enumerate(batches):
    params_before = jax.device_get(state.params)
    ema_before = jax.device_get(state.ema_params)
    # The consistency term compares the student with its EMA (the teacher).
    s_logits = np.asarray(APPLY({"params": params_before}, batch).logits)
    t_logits = np.asarray(APPLY({"params": ema_before}, batch).logits)
    expected_cons = np.mean(np.mean((_softmax(s_logits) - _softmax(t_logits))**2,
                                    -1))
    state, metrics = step(state, None, batch)
    np.testing.assert_allclose(float(metrics["consistency"]), expected_cons,
                               rtol=1e-4, atol=1e-9)
    a = min(1 - 1 / (i + 2), 0.6)
    params = jax.device_get(state.params)
    ema = jax.tree.map(lambda e, p: a * e + (1 - a) * p, ema, params)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(
        got, want, rtol=1e-5, atol=1e-6), jax.device_get(state.ema_params), ema)
  # After the first update the EMA is the mean of params_0 and params_1, not
  # the params themselves: the teacher lags the student.
  assert not np.allclose(jax.tree.leaves(state.ema_params)[0],
                         jax.tree.leaves(state.params)[0])


def test_mean_teacher_needs_ema_state():
  x, y = _data(8)
  optimizer = optax.sgd(0.1)
  step = mean_teacher_step(APPLY, optimizer, jit=False)
  state = create_state(_init(jax.random.PRNGKey(0)), optimizer,
                       rng=jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="ema=True"):
    step(state, None, _batches(x, y)[0])


def _kl_np(s_logits, t_logits):
  p, q = _softmax(t_logits), _softmax(s_logits)
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def test_born_again_generations_chain_teachers():
  x, y = _data(32)
  batches = _batches(x, y) * 4  # 16 steps per generation
  eval_batches = _batches(*_data(16, seed=1))
  results = born_again(APPLY, _init, optax.adam(0.05), batches,
                       generations=2, rng=jax.random.PRNGKey(0),
                       eval_batches=eval_batches, log_every=8)
  assert [r.generation for r in results] == [0, 1, 2]
  assert results[0].teacher_variables is None
  for prev, cur in zip(results, results[1:]):
    # The teacher of generation k is generation k-1's trained variables.
    assert cur.teacher_variables is prev.variables
    for a, b in zip(jax.tree.leaves(cur.teacher_variables),
                    jax.tree.leaves(prev.variables)):
      assert a is b
    # The evaluation compared the student with that teacher.
    s = np.concatenate([np.asarray(APPLY(cur.variables, b).logits)
                        for b in eval_batches])
    t = np.concatenate([np.asarray(APPLY(prev.variables, b).logits)
                        for b in eval_batches])
    np.testing.assert_allclose(cur.eval["mean_kl"], _kl_np(s, t).mean(),
                               rtol=1e-4, atol=1e-7)
    # Each generation starts afresh and ends elsewhere than its teacher.
    assert not np.allclose(jax.tree.leaves(cur.variables)[0],
                           jax.tree.leaves(prev.variables)[0])
  for r in results:
    losses = [m["loss"] for _, m in r.history]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
  assert "teacher_accuracy" not in results[0].eval
  assert 0.0 <= results[2].eval["student_accuracy"] <= 1.0


def test_born_again_from_given_teacher_and_iterator_error():
  x, y = _data(16)
  teacher = _init(jax.random.PRNGKey(9))
  calls = []

  def batches_for(generation):
    calls.append(generation)
    return iter(_batches(x, y))  # a fresh one-shot iterator per generation

  results = born_again(APPLY, _init, optax.sgd(0.1), batches_for,
                       generations=2, rng=jax.random.PRNGKey(0),
                       teacher_variables=teacher, log_every=1)
  assert [r.generation for r in results] == [1, 2]
  assert calls == [1, 2]
  assert results[0].teacher_variables is teacher
  assert results[1].teacher_variables is results[0].variables
  assert results[0].eval is None
  # The first batch is not lost while peeking: 2 batches -> 2 steps logged.
  assert len(results[0].history) == 2
  with pytest.raises(TypeError, match="re-iterable"):
    born_again(APPLY, _init, optax.sgd(0.1), iter(_batches(x, y)),
               generations=1, rng=jax.random.PRNGKey(0),
               teacher_variables=teacher)
  with pytest.raises(ValueError, match="generations"):
    born_again(APPLY, _init, optax.sgd(0.1), _batches(x, y), generations=0,
               rng=jax.random.PRNGKey(0))
