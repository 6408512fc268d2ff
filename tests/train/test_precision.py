"""Tests of the mixed-precision Policy and its use in the train/eval steps."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax import models
from kdjax import train

F, C, B = 32, 10, 16
T = 4.0
# Stated tolerance: a bfloat16 teacher (8-bit mantissa, relative rounding
# 2^-9 of its logits) changes the KD loss by < 1% of its value.
BF16_RTOL = 1e-2


def linear(params, x):
  return x @ params["w"] + params["b"]


def recording_linear(log):
  def fn(params, x):
    log.append((params["w"].dtype, x.dtype))
    return x @ params["w"] + params["b"]
  return fn


def variables(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"params": {"w": (scale * rng.normal(size=(F, C))).astype(np.float32),
                     "b": (0.1 * rng.normal(size=(C,))).astype(np.float32)}}


def batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(B, F)).astype(np.float32),
          "label": rng.integers(0, C, size=(B,)).astype(np.int32)}


def kd_loss():
  return losses.compose(
      [losses.Term("ce", losses.label_term(), 0.1, needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence), 0.9)],
      temperature=T)


def copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def test_policy_validation_and_presets():
  p = train.Policy(compute_dtype="bfloat16")
  assert p.compute_dtype == jnp.bfloat16 and p.param_dtype == jnp.float32
  assert train.Policy().is_identity and not p.is_identity
  assert train.Policy.bf16_teacher().teacher_compute_dtype == jnp.bfloat16
  assert train.Policy.bf16_teacher().compute_dtype == jnp.float32
  assert train.Policy.bf16().compute_dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="floating point"):
    train.Policy(compute_dtype=jnp.int32)
  with pytest.raises(TypeError, match="Policy"):
    train.make_train_step(models.from_function(linear),
                          models.from_function(linear), kd_loss(),
                          optax.sgd(0.1), policy="bf16")


def test_cast_floating_leaves_ints_and_keys_alone():
  tree = {"x": jnp.ones(3), "y": jnp.arange(3), "k": jax.random.key(0),
          "h": jnp.ones(2, jnp.float16)}
  out = train.cast_floating(tree, jnp.bfloat16)
  assert out["x"].dtype == jnp.bfloat16 and out["h"].dtype == jnp.bfloat16
  assert out["y"].dtype == jnp.int32
  assert jax.dtypes.issubdtype(out["k"].dtype, jax.dtypes.prng_key)
  assert train.cast_floating(tree, None) is tree


def _first_loss(policy, log_t=None, log_s=None):
  teacher_fn = recording_linear(log_t) if log_t is not None else linear
  student_fn = recording_linear(log_s) if log_s is not None else linear
  opt = optax.sgd(0.1)
  state = train.create_state(copy(variables(1)), opt, rng=jax.random.key(0),
                             policy=policy)
  step = train.make_train_step(models.from_function(student_fn),
                               models.from_function(teacher_fn), kd_loss(),
                               opt, policy=policy)
  state, metrics = step(state, variables(2, scale=3.0), batch())
  return state, metrics


def test_bf16_teacher_loss_within_tolerance_of_float32():
  _, m32 = _first_loss(None)
  log_t, log_s = [], []
  state, m16 = _first_loss(train.Policy.bf16_teacher(), log_t, log_s)
  # The teacher really ran in bfloat16 (params and inputs), the student not.
  assert log_t == [(jnp.bfloat16, jnp.bfloat16)]
  assert log_s == [(jnp.float32, jnp.float32)]
  for key in ("loss", "kd"):
    assert m16[key].dtype == jnp.float32
    np.testing.assert_allclose(m16[key], m32[key], rtol=BF16_RTOL)
  assert abs(float(m16["kd"]) - float(m32["kd"])) > 0  # not silently float32
  # Exact: the student-only CE term does not depend on the teacher.
  np.testing.assert_allclose(m16["ce"], m32["ce"], rtol=1e-6)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_bf16_student_compute_keeps_float32_master_weights():
  log_s = []
  state, m16 = _first_loss(train.Policy.bf16(), log_s=log_s)
  assert log_s == [(jnp.bfloat16, jnp.bfloat16)]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))
  _, m32 = _first_loss(None)
  assert m16["loss"].dtype == jnp.float32
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
  # The gradient flows through the cast: params moved, in float32.
  assert not np.allclose(state.params["w"], variables(1)["params"]["w"])


def test_create_state_casts_to_param_dtype():
  bf16_vars = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16),
                           variables(1))
  state = train.create_state(bf16_vars, optax.adam(1e-3),
                             rng=jax.random.key(0), policy=train.Policy())
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


class _BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(C)(nn.relu(x))


def test_bf16_student_batch_stats_keep_their_dtype():
  net = _BNNet()
  x = batch()["image"]
  student_vars = net.init(jax.random.key(0), x)
  apply = models.from_linen(net, train_kwarg="train")
  opt = optax.sgd(0.1)
  state = train.create_state(copy(student_vars), opt, rng=jax.random.key(0))
  step = train.make_train_step(apply, models.from_function(linear), kd_loss(),
                               opt, policy=train.Policy.bf16())
  new, metrics = step(state, variables(2), batch())
  stats = new.model_state["batch_stats"]
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(stats))
  assert not np.allclose(stats["BatchNorm_0"]["mean"], 0.0)
  assert np.isfinite(metrics["loss"])


def test_eval_step_with_bf16_policy():
  eval_step = train.make_eval_step(models.from_function(linear),
                                   models.from_function(linear),
                                   temperature=T,
                                   policy=train.Policy.bf16_teacher())
  sums = eval_step(variables(1), variables(1), batch())
  # Same model as student and teacher: top-1 agreement up to bf16 ties.
  assert float(sums["agreement"]) >= B - 1
  assert 0 <= float(sums["kl"]) < 1e-2 * B
