"""make_train_step(checks=True): traced T <= 0, bad labels and a NaN teacher raise, not NaN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax import models
from kdjax import train

B, F, C = 4, 3, 5


def linear(params, x):
  return x @ params["w"] + params["b"]


APPLY = models.from_function(linear)


def variables(seed):
  rng = np.random.default_rng(seed)
  return {"params": {"w": rng.normal(size=(F, C)).astype(np.float32),
                     "b": rng.normal(size=(C,)).astype(np.float32)}}


def batch(labels=(0, 1, 4, 2)):
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(B, F)).astype(np.float32),
          "label": np.asarray(labels, np.int32)}


def loss_fn(temperature=2.0, kd=losses.kl_divergence):
  return losses.compose(
      [losses.Term("ce", losses.label_term(), 0.5, needs_teacher=False),
       losses.Term("kd", losses.logit_term(kd), 0.5)],
      temperature=temperature)


def dkd_loss():
  return losses.compose([losses.Term("dkd", losses.dkd_term())],
                        temperature=2.0)


def run(loss, teacher=None, labels=(0, 1, 4, 2), steps=1, **options):
  """``steps`` steps from the same state; returns (state, metrics)."""
  opt = optax.sgd(0.1)
  step = train.make_train_step(APPLY, APPLY, loss, opt, **options)
  state = train.create_state(variables(1), opt, rng=jax.random.key(0))
  for _ in range(steps):
    state, metrics = step(state, teacher or variables(2), batch(labels))
  return state, metrics


# T is 1 at step 0 and 0 from step 1: traced inside the step.
FALLING_T = optax.linear_schedule(1.0, 0.0, 1)
NEGATIVE_T = lambda step: 1.0 - 2.0 * step


@pytest.mark.parametrize("schedule", [FALLING_T, NEGATIVE_T])
def test_checked_step_raises_for_a_traced_temperature_at_or_below_zero(
    schedule):
  run(loss_fn(schedule), checks=True)  # step 0: T = 1, fine
  with pytest.raises(ValueError, match=r"temperature.*must be > 0, got"):
    run(loss_fn(schedule), steps=2, checks=True)
  # Unchecked, the step silently returns NaN (T = 0) or a wrong value (T < 0).
  _, metrics = run(loss_fn(schedule), steps=2)
  if schedule is FALLING_T:
    assert not np.isfinite(metrics["loss"])


@pytest.mark.parametrize("bad", [12, -1, 5])
@pytest.mark.parametrize("loss", [loss_fn, dkd_loss])
def test_checked_step_raises_for_an_out_of_range_label(loss, bad):
  labels = (0, bad, 1, 2)
  with pytest.raises(ValueError,
                     match=r"labels must lie in \[0, 5\) for 5 classes"):
    run(loss(), labels=labels, checks=True)
  # Unchecked: no error (NaN for the CE, a silently wrong value for DKD).
  run(loss(), labels=labels)


def test_checked_step_raises_for_a_nan_teacher():
  bad = variables(2)
  bad["params"]["b"][3] = np.nan
  with pytest.raises(FloatingPointError,
                     match=r"teacher 'my-teacher'.*non-finite"):
    run(loss_fn(), teacher=bad, checks=True, teacher_name="my-teacher")


@pytest.mark.parametrize("options", [{}, {"accumulation_steps": 2}])
def test_unchecked_and_checked_steps_agree_on_valid_input(options):
  plain_state, plain = run(loss_fn(FALLING_T), steps=1, **options)
  checked_state, checked = run(loss_fn(FALLING_T), steps=1, checks=True,
                               **options)
  jax.tree.map(np.testing.assert_array_equal, plain, checked)
  jax.tree.map(np.testing.assert_array_equal, plain_state.params,
               checked_state.params)


def test_checks_under_accumulation_raise():
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
    run(loss_fn(), labels=(0, 1, 7, 2), checks=True, accumulation_steps=2)


def test_unchecked_step_holds_no_checks():
  opt = optax.sgd(0.1)
  args = (train.create_state(variables(1), opt, rng=jax.random.key(0)),
          variables(2), batch())
  step = train.build_step_fn(APPLY, APPLY, loss_fn(FALLING_T), opt)
  assert not step.kdjax_checks
  assert "check" not in str(jax.make_jaxpr(step)(*args))
  checked = train.build_step_fn(APPLY, APPLY, loss_fn(FALLING_T), opt,
                                checks=True)
  assert checked.kdjax_checks


def test_sharded_step_takes_checks_too():
  """``make_sharded_train_step(..., checks=True)`` (one device) checks as well."""
  from kdjax import parallel  # pylint: disable=g-import-not-at-top
  opt = optax.sgd(0.1)
  mesh = parallel.make_mesh({"data": 1})
  rules = parallel.ShardingRules.data_parallel()
  state = train.create_state(variables(1), opt, rng=jax.random.key(0))
  step = parallel.make_sharded_train_step(
      APPLY, APPLY, loss_fn(), opt, mesh=mesh, state=state,
      teacher_variables=variables(2), rules=rules, checks=True)
  state = parallel.shard_state(state, mesh, rules)
  bad = parallel.global_batch(batch((0, 9, 1, 2)), mesh, rules)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
    step(state, variables(2), bad)
