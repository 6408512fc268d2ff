"""The step core: StepOptions, build_step + compile_step, and the wrappers that share them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import cache
from kdjax import losses
from kdjax import models
from kdjax import train

B, F, C = 8, 6, 5


def linear(params, x):
  return x @ params["w"] + params["b"]


APPLY = models.from_function(linear)


def variables(seed):
  rng = np.random.default_rng(seed)
  return {"params": {"w": rng.normal(size=(F, C)).astype(np.float32),
                     "b": (0.1 * rng.normal(size=(C,))).astype(np.float32)}}


def batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(B, F)).astype(np.float32),
          "label": rng.integers(0, C, size=(B,)).astype(np.int32),
          "mask": (rng.uniform(size=(B,)) > 0.3).astype(np.float32)}


def loss_fn(temperature=2.0):
  return losses.compose(
      [losses.Term("ce", losses.label_term(), 0.3, needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence), 0.7)],
      temperature=temperature)


OPT = optax.adam(1e-2)


def run(step, steps=2, ema=False, teacher=True):
  state = train.create_state(variables(1), OPT, rng=jax.random.key(0),
                             ema=ema)
  teacher_variables = variables(2) if teacher else None
  for i in range(steps):
    state, metrics = step(state, teacher_variables, batch(i))
  return jax.device_get((state.params, state.ema_params, metrics))


def assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def one_step(step, teacher_variables, batch):
  """``(params, metrics)`` after one step from a fresh state."""
  state = train.create_state(variables(1), OPT, rng=jax.random.key(0))
  state, metrics = step(state, teacher_variables, batch)
  return jax.device_get((state.params, metrics))


# -----------------------------------------------------------------------------
# StepOptions.
# -----------------------------------------------------------------------------


def test_options_are_frozen_hashable_and_checked():
  options = train.StepOptions(accumulation_steps=2)
  with pytest.raises(dataclasses.FrozenInstanceError):
    options.accumulation_steps = 4
  assert hash(options) == hash(train.StepOptions(accumulation_steps=2))
  assert options.replace(log_grad_norm=True).log_grad_norm
  assert not options.log_grad_norm  # replace made a copy
  with pytest.raises(ValueError, match="accumulation_steps must be an int"):
    train.StepOptions(accumulation_steps=0)
  with pytest.raises(ValueError, match="weighting must be one of"):
    train.StepOptions(accumulation_weighting="tokens")
  with pytest.raises(ValueError, match="teacher_is_ema=True needs ema_decay"):
    train.StepOptions(teacher_is_ema=True)
  with pytest.raises(TypeError, match="kdjax.train.Policy"):
    train.StepOptions(policy="bf16")
  with pytest.raises(ValueError, match="accumulation_steps"):
    options.replace(accumulation_steps=-1)


def test_options_of_merges_an_object_and_keywords():
  base = train.StepOptions(accumulation_steps=2, teacher_name="t")
  assert train.StepOptions.of() == train.StepOptions()
  assert train.StepOptions.of(base) is base
  merged = train.StepOptions.of(base, log_grad_norm=True)
  assert (merged.accumulation_steps, merged.teacher_name,
          merged.log_grad_norm) == (2, "t", True)
  assert train.StepOptions.of(checks=True).teacher_checks
  assert train.StepOptions.of(check_teacher_finite=True).teacher_checks
  assert not train.StepOptions().teacher_checks
  with pytest.raises(TypeError, match="no_such_option"):
    train.StepOptions.of(base, no_such_option=1)
  with pytest.raises(TypeError, match="StepOptions"):
    train.StepOptions.of({"accumulation_steps": 2})


# -----------------------------------------------------------------------------
# One builder: every spelling gives the same step, bit for bit.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {},
    {"accumulation_steps": 2},
    {"accumulation_steps": 4, "accumulation_weighting": "equal",
     "log_grad_norm": True},
    {"ema_decay": 0.9},
    {"policy": train.Policy.bf16_teacher()},
])
def test_options_object_keywords_and_parts_agree(fields):
  ema = "ema_decay" in fields
  options = train.StepOptions(**fields)
  by_keywords = run(train.make_train_step(APPLY, APPLY, loss_fn(), OPT,
                                          **fields), ema=ema)
  by_object = run(train.make_train_step(APPLY, APPLY, loss_fn(), OPT,
                                        options), ema=ema)
  by_parts = run(train.compile_step(
      train.build_step(APPLY, APPLY, loss_fn(), OPT, options)), ema=ema)
  legacy = run(jax.jit(train.build_step_fn(APPLY, APPLY, loss_fn(), OPT,
                                           **fields)), ema=ema)
  for other in (by_object, by_parts, legacy):
    assert_same(by_keywords, other)
  if fields.get("log_grad_norm"):
    assert "grad_norm" in by_keywords[2]


def test_keywords_change_an_options_object():
  options = train.StepOptions(accumulation_steps=2)
  changed = run(train.make_train_step(APPLY, APPLY, loss_fn(), OPT, options,
                                      log_grad_norm=True))
  direct = run(train.make_train_step(APPLY, APPLY, loss_fn(), OPT,
                                     accumulation_steps=2,
                                     log_grad_norm=True))
  assert_same(changed, direct)


def test_mean_teacher_step_is_the_core_with_the_ema_as_teacher():
  decay = train.mean_teacher_decay(0.99)
  ours = run(train.mean_teacher_step(APPLY, OPT, loss_fn=loss_fn(),
                                     ema_decay=decay), ema=True,
             teacher=False)
  core = run(train.make_train_step(
      APPLY, None, loss_fn(), OPT,
      train.StepOptions(ema_decay=decay, teacher_is_ema=True)), ema=True,
             teacher=False)
  assert_same(ours, core)


# -----------------------------------------------------------------------------
# compile_step: checks, jit and donation.
# -----------------------------------------------------------------------------


def test_compile_step_checkifies_a_step_with_checks():
  pure = train.build_step(APPLY, APPLY, loss_fn(), OPT,
                          train.StepOptions(checks=True, teacher_name="T0"))
  assert pure.kdjax_checks
  step = train.compile_step(pure, donate=False)
  assert hasattr(step, "checked")
  bad = variables(2)
  bad["params"]["b"][0] = np.nan
  state = train.create_state(variables(1), OPT, rng=jax.random.key(0))
  with pytest.raises(FloatingPointError, match="teacher 'T0'"):
    step(state, bad, batch())
  # No checks: the plain jitted step, no wrapper.
  plain = train.compile_step(train.build_step(APPLY, APPLY, loss_fn(), OPT))
  assert not hasattr(plain, "checked") and hasattr(plain, "lower")


def test_compile_step_checks_a_wrapper_of_a_checked_step():
  """``checks=True`` checkifies a function around a checked step (the CLI's
  augmentation wrapper) that does not carry the ``kdjax_checks`` mark."""
  pure = train.build_step(APPLY, APPLY, loss_fn(), OPT,
                          train.StepOptions(checks=True))

  def wrapper(state, teacher_variables, batch):
    return pure(state, teacher_variables, batch)

  step = train.compile_step(wrapper, checks=True, donate=False)
  state = train.create_state(variables(1), OPT, rng=jax.random.key(0))
  bad_labels = {**batch(), "label": np.full((B,), C + 3, np.int32)}
  with pytest.raises(ValueError, match="labels must lie in"):
    step(state, variables(2), bad_labels)


def test_compile_step_donates_the_state_only_when_asked():
  pure = train.build_step(APPLY, APPLY, loss_fn(), OPT)
  state = jax.device_put(
      train.create_state(variables(1), OPT, rng=jax.random.key(0)))
  kept = train.compile_step(pure, donate=False)
  kept(state, variables(2), batch())
  assert not state.params["w"].is_deleted()
  train.compile_step(pure)(state, variables(2), batch())
  assert state.params["w"].is_deleted()


def test_unjitted_compile_step_runs_eagerly():
  pure = train.build_step(APPLY, APPLY, loss_fn(), OPT)
  eager = train.compile_step(pure, jit=False)
  assert eager is pure
  # Op by op: equal up to XLA's fusion of the jitted step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               run(eager), run(train.compile_step(pure)))


# -----------------------------------------------------------------------------
# The offline teacher: its check is a function, its apply function a mark.
# -----------------------------------------------------------------------------


def test_cache_compatibility_is_checked_without_building_a_step(tmp_path):
  data = {"image": np.concatenate([batch(i)["image"] for i in range(2)]),
          "label": np.concatenate([batch(i)["label"] for i in range(2)])}
  top = cache.build_teacher_cache(str(tmp_path / "top"), APPLY, variables(2),
                                  data, k=2, temperature=2.0, batch_size=B)
  full = cache.build_teacher_cache(str(tmp_path / "full"), APPLY,
                                   variables(2), data, batch_size=B)
  cache.check_loss_compatible(top, loss_fn(2.0))
  cache.check_loss_compatible(full, loss_fn(5.0))  # any T for full logits
  cache.check_loss_compatible(top, loss_fn(lambda step: 5.0))  # a schedule
  with pytest.raises(ValueError, match="temperature 3.0.*temperature 2.0"):
    cache.check_loss_compatible(top, loss_fn(3.0))
  assert getattr(top.teacher_apply(), "kdjax_reads_teacher_from_batch")


def test_reads_teacher_from_batch_marks_the_apply_function():

  def apply(variables, batch, *, train=False, rng=None):
    del variables, train, rng
    return models.ModelOutput(logits=batch["teacher_logits"])

  assert train.reads_teacher_from_batch(apply) is apply
  policy = train.Policy.bf16()
  logits = np.linspace(-1, 1, B * C, dtype=np.float32).reshape(B, C)
  out = train.teacher_forward(apply, None, {"teacher_logits": logits},
                              policy=policy)
  # Not rounded to bfloat16 on the way in (the batch is not cast).
  np.testing.assert_array_equal(out.logits, logits)


def test_cached_step_takes_options(tmp_path):
  data = {"image": batch(0)["image"], "label": batch(0)["label"]}
  tc = cache.build_teacher_cache(str(tmp_path / "c"), APPLY, variables(2),
                                 data, batch_size=B)
  cached = list(tc.batches(B))[0]
  options = train.StepOptions(accumulation_steps=2, log_grad_norm=True)
  a = cache.make_cached_train_step(APPLY, tc, loss_fn(), OPT, options)
  b = cache.make_cached_train_step(APPLY, tc, loss_fn(), OPT,
                                   accumulation_steps=2, log_grad_norm=True)
  assert_same(one_step(a, None, cached), one_step(b, None, cached))


# -----------------------------------------------------------------------------
# The parallel wrappers take the same options.
# -----------------------------------------------------------------------------


def test_sharded_and_pmap_steps_take_options():
  from kdjax import parallel  # pylint: disable=g-import-not-at-top
  options = train.StepOptions(accumulation_steps=2)
  state = lambda: train.create_state(variables(1), OPT,
                                     rng=jax.random.key(0))
  mesh = parallel.make_mesh({"data": 1})
  a = parallel.make_sharded_train_step(APPLY, APPLY, loss_fn(), OPT, options,
                                       mesh=mesh, state=state(),
                                       teacher_variables=variables(2))
  b = parallel.make_sharded_train_step(APPLY, APPLY, loss_fn(), OPT,
                                       mesh=mesh, state=state(),
                                       teacher_variables=variables(2),
                                       accumulation_steps=2)
  assert_same(one_step(a, variables(2), batch()),
              one_step(b, variables(2), batch()))
  pmapped = parallel.make_pmap_train_step(APPLY, APPLY, loss_fn(), OPT,
                                          options, donate=False)
  split = parallel.split_batch(batch(), 1)
  new_state, _ = pmapped(parallel.replicate(state(), 1),
                         parallel.replicate(variables(2), 1), split)
  single, _ = train.make_train_step(APPLY, APPLY, loss_fn(), OPT, options)(
      state(), variables(2), batch())
  np.testing.assert_allclose(parallel.unreplicate(new_state).params["w"],
                             single.params["w"], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="not supported by the pmap step"):
    parallel.make_pmap_train_step(APPLY, APPLY, loss_fn(), OPT,
                                  options.replace(check_teacher_finite=True))


def test_the_student_alone_needs_no_teacher_but_teacher_terms_do():
  with pytest.raises(ValueError, match=r"\['kd'\] need a teacher"):
    train.build_step(APPLY, None, loss_fn(), OPT)
  alone = losses.compose(
      [losses.Term("ce", losses.label_term(), 1.0, needs_teacher=False)])
  params, _, metrics = run(train.make_train_step(APPLY, None, alone, OPT),
                           teacher=False)
  assert set(metrics) >= {"loss", "ce"} and jnp.isfinite(metrics["loss"])
  assert params["w"].shape == (F, C)
