"""Tests of the train/eval steps: exact update vs NumPy, frozen teacher, accumulation, NaN check, HLO."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax import models
from kdjax import train

B, F, C = 8, 6, 5
T = 2.0
W_CE, W_KD = 0.3, 0.7


def linear(params, x):
  return x @ params["w"] + params["b"]


def linear_vars(seed, f=F, c=C, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"params": {"w": (scale * rng.normal(size=(f, c))).astype(np.float32),
                     "b": (0.1 * rng.normal(size=(c,))).astype(np.float32)}}


def make_batch(seed=0, b=B):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(b, F)).astype(np.float32),
          "label": rng.integers(0, C, size=(b,)).astype(np.int32)}


def loss_fn():
  return losses.compose(
      [losses.Term("ce", losses.label_term(), W_CE, needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence), W_KD)],
      temperature=T)


def copy(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


APPLY = models.from_function(linear)


# ----------------------------------------------------------------------------
# NumPy reference of one SGD step on linear student/teacher.
# ----------------------------------------------------------------------------


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_step(params, teacher, batch, lr):
  """Loss and SGD update of 0.3 CE + 0.7 T^2 KL(p_t || q_s), by hand."""
  x, y = batch["image"].astype(np.float64), batch["label"]
  zs = x @ params["w"] + params["b"]
  zt = x @ teacher["w"] + teacher["b"]
  onehot = np.eye(C)[y]
  ce = -np.mean(np.sum(onehot * np_log_softmax(zs), -1))
  lp, lq = np_log_softmax(zt / T), np_log_softmax(zs / T)
  kl = T**2 * np.mean(np.sum(np.exp(lp) * (lp - lq), -1))
  # d/dzs: CE -> (softmax(zs) - onehot) / B ; T^2 KL -> T (q_T - p_T) / B.
  dz = (W_CE * (np_softmax(zs) - onehot)
        + W_KD * T * (np_softmax(zs / T) - np_softmax(zt / T))) / len(y)
  grads = {"w": x.T @ dz, "b": dz.sum(0)}
  new = {k: params[k] - lr * grads[k] for k in params}
  return W_CE * ce + W_KD * kl, ce, kl, new, grads


@pytest.mark.parametrize("jit", [True, False])
def test_step_matches_numpy_sgd(jit):
  student, teacher = linear_vars(1), linear_vars(2, scale=2.0)
  batch = make_batch()
  opt = optax.sgd(0.5)
  state = train.create_state(copy(student), opt, rng=jax.random.key(0))
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt, jit=jit,
                               log_grad_norm=True)
  ref_params = {k: v.astype(np.float64) for k, v in student["params"].items()}
  for i in range(3):
    total, ce, kl, ref_new, grads = np_step(ref_params, teacher["params"],
                                            batch, 0.5)
    state, metrics = step(state, teacher, batch)
    np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["kd"], kl, rtol=1e-4, atol=1e-7)
    gnorm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
    np.testing.assert_allclose(metrics["grad_norm"], gnorm, rtol=1e-4)
    ref_params = ref_new
    for k in ref_params:
      np.testing.assert_allclose(state.params[k], ref_params[k], atol=1e-5)
    assert int(state.step) == i + 1
  assert set(metrics) == {"loss", "ce", "kd", "weight/ce", "weight/kd",
                          "temperature", "grad_norm"}


def test_teacher_frozen_no_grad_no_opt_state():
  student, teacher = linear_vars(1), linear_vars(2)
  teacher_before = copy(teacher)
  opt = optax.adam(1e-2)
  state = train.create_state(copy(student), opt, rng=jax.random.key(0))
  # The optimizer state covers the student (and loss params) only.
  opt_shapes = [x.shape for x in jax.tree.leaves(state.opt_state)]
  assert sorted(opt_shapes) == sorted(
      [(), (F, C), (C,), (F, C), (C,)])
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt)
  state, _ = step(state, teacher, make_batch())
  chex.assert_trees_all_equal(teacher, teacher_before)
  # teacher_forward stops the gradient: d(teacher logits)/d(teacher params) = 0.
  grad = jax.grad(lambda tv: jnp.sum(train.teacher_forward(
      APPLY, tv, make_batch()).logits))(teacher)
  chex.assert_trees_all_equal(grad, jax.tree.map(jnp.zeros_like, teacher))


def test_state_buffers_are_donated():
  opt = optax.sgd(0.1)
  state = train.create_state(copy(linear_vars(1)), opt, rng=jax.random.key(0))
  old_w = state.params["w"]
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt)
  state, _ = step(state, linear_vars(2), make_batch())
  assert old_w.is_deleted()
  step_nd = train.make_train_step(APPLY, APPLY, loss_fn(), opt, donate=False)
  old_w = state.params["w"]
  step_nd(state, linear_vars(2), make_batch())
  assert not old_w.is_deleted()


# ----------------------------------------------------------------------------
# Gradient accumulation.
# ----------------------------------------------------------------------------


def _run(step, state, teacher, batches):
  for b in batches:
    state, metrics = step(state, teacher, b)
  return state, metrics


def test_accumulation_four_micro_batches_equals_full_batch():
  teacher = linear_vars(2, scale=2.0)
  batches = [make_batch(s, b=16) for s in range(2)]
  opt = optax.adam(1e-2)
  results = {}
  for k in (1, 4):
    state = train.create_state(copy(linear_vars(1)), opt,
                               rng=jax.random.key(0))
    step = train.make_train_step(APPLY, APPLY, loss_fn(), opt,
                                 accumulation_steps=k)
    results[k] = _run(step, state, teacher, batches)
  (s1, m1), (s4, m4) = results[1], results[4]
  chex.assert_trees_all_close(s4.params, s1.params, atol=1e-6)
  chex.assert_trees_all_close(s4.opt_state, s1.opt_state, atol=1e-6)
  for key in m1:
    np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5)


def _token_setup(seed=0, b=8, length=5):
  """Token-level logits [B, L, C] with a padding mask of uneven length per row."""
  rng = np.random.default_rng(seed)
  lengths = np.array([5, 1, 2, 5, 3, 1, 4, 2])[:b]
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
  batch = {"image": rng.normal(size=(b, length, F)).astype(np.float32),
           "label": rng.integers(0, C, size=(b, length)).astype(np.int32),
           "mask": mask}
  return batch


def test_accumulation_masked_tokens_normalised_by_global_count():
  teacher = linear_vars(2, scale=2.0)
  batch = _token_setup()
  opt = optax.sgd(1.0)

  def run(k, weighting="auto"):
    state = train.create_state(copy(linear_vars(1)), opt,
                               rng=jax.random.key(0))
    step = train.make_train_step(APPLY, APPLY, loss_fn(), opt,
                                 accumulation_steps=k,
                                 accumulation_weighting=weighting)
    return step(state, teacher, batch)

  full, m_full = run(1)
  acc, m_acc = run(4)
  chex.assert_trees_all_close(acc.params, full.params, atol=1e-6)
  np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
  # Independent check of the full-batch loss: mean over the 23 real tokens.
  x, y, m = batch["image"], batch["label"], batch["mask"]
  zs = x @ linear_vars(1)["params"]["w"] + linear_vars(1)["params"]["b"]
  ce = -np.take_along_axis(np_log_softmax(zs.astype(np.float64)), y[..., None],
                           -1)[..., 0]
  np.testing.assert_allclose(m_full["ce"], (ce * m).sum() / m.sum(),
                             rtol=1e-5)
  # Equal weights (1/k) would weight micro-batches with few tokens too much.
  equal, _ = run(4, "equal")
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(equal.params), jax.tree.leaves(full.params)))
  assert diff > 1e-3


def test_accumulation_errors():
  opt = optax.sgd(0.1)
  with pytest.raises(ValueError, match="accumulation_steps"):
    train.make_train_step(APPLY, APPLY, loss_fn(), opt, accumulation_steps=0)
  with pytest.raises(ValueError, match="weighting"):
    train.make_train_step(APPLY, APPLY, loss_fn(), opt, accumulation_steps=2,
                          accumulation_weighting="tokens")
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt,
                               accumulation_steps=3)
  state = train.create_state(copy(linear_vars(1)), opt, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="not divisible by accumulation_steps=3"):
    step(state, linear_vars(2), make_batch())


# ----------------------------------------------------------------------------
# NaN teacher check.
# ----------------------------------------------------------------------------


def test_check_teacher_finite_names_the_teacher():
  opt = optax.sgd(0.1)
  teacher = linear_vars(2)
  bad = {"params": {**teacher["params"],
                    "b": teacher["params"]["b"].copy()}}
  bad["params"]["b"][2] = np.nan
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt,
                               check_teacher_finite=True,
                               teacher_name="resnet50-teacher")
  state = train.create_state(copy(linear_vars(1)), opt, rng=jax.random.key(0))
  state, metrics = step(state, teacher, make_batch())  # finite: no error
  assert np.isfinite(metrics["loss"])
  with pytest.raises(FloatingPointError,
                     match=r"resnet50-teacher.*8 non-finite.*step 1"):
    step(state, bad, make_batch())
  # Without the option the NaN silently flows into the loss.
  state = train.create_state(copy(linear_vars(1)), opt, rng=jax.random.key(0))
  plain = train.make_train_step(APPLY, APPLY, loss_fn(), opt)
  _, metrics = plain(state, bad, make_batch())
  assert not np.isfinite(metrics["loss"])


# ----------------------------------------------------------------------------
# The teacher is an argument of the compiled step, not a constant.
# ----------------------------------------------------------------------------

_DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i32": 4, "i64": 8,
                "ui32": 4, "i8": 1, "ui8": 1, "i1": 1}


def _largest_constant_bytes(hlo_text: str) -> int:
  largest = 0
  for match in re.finditer(r"stablehlo\.constant dense.*?: tensor<([^>]*)>",
                           hlo_text):
    *dims, dtype = match.group(1).split("x")
    size = int(np.prod([int(d) for d in dims])) if dims else 1
    largest = max(largest, size * _DTYPE_BYTES.get(dtype, 4))
  return largest


def test_teacher_params_are_step_arguments_not_constants():
  big = linear_vars(3, f=512, c=600)  # 1.2 MB kernel
  student = linear_vars(4, f=512, c=600)
  batch = {"image": np.ones((2, 512), np.float32),
           "label": np.zeros((2,), np.int32)}
  opt = optax.sgd(0.1)
  state = train.create_state(copy(student), opt, rng=jax.random.key(0))
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt)
  text = step.lower(state, big, batch).as_text()
  assert _largest_constant_bytes(text) < 2**20
  main = next(l for l in text.splitlines() if "func.func public @main" in l)
  # The teacher kernel appears as a parameter (the student's too: 2 of them).
  assert main.count("tensor<512x600xf32>") >= 2
  # The check can fail: a teacher closed over by the step is a constant.
  closed = lambda v, b, **kw: APPLY(big, b, **kw)
  step_closed = train.make_train_step(APPLY, closed, loss_fn(), opt)
  text = step_closed.lower(state, None, batch).as_text()
  assert _largest_constant_bytes(text) >= 2**20


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


def test_eval_step_and_evaluate_match_numpy():
  student, teacher = linear_vars(1), linear_vars(2, scale=2.0)
  batches = [make_batch(s, b=6) for s in range(3)]
  batches[-1]["mask"] = np.array([1, 1, 0, 1, 0, 1], np.float32)
  eval_step = train.make_eval_step(APPLY, APPLY, temperature=T)
  report = train.evaluate(eval_step, student, teacher, batches)
  s_ok = t_ok = agree = kl = count = 0.0
  for b in batches:
    w = b.get("mask", np.ones(6, np.float32))
    zs = b["image"] @ student["params"]["w"] + student["params"]["b"]
    zt = b["image"] @ teacher["params"]["w"] + teacher["params"]["b"]
    ps, pt = zs.argmax(-1), zt.argmax(-1)
    s_ok += np.sum(w * (ps == b["label"]))
    t_ok += np.sum(w * (pt == b["label"]))
    agree += np.sum(w * (ps == pt))
    lp, lq = np_log_softmax(zt / T), np_log_softmax(zs / T)
    kl += np.sum(w * np.sum(np.exp(lp) * (lp - lq), -1))
    count += w.sum()
  assert report["count"] == 16
  np.testing.assert_allclose(report["student_accuracy"], s_ok / count)
  np.testing.assert_allclose(report["teacher_accuracy"], t_ok / count)
  np.testing.assert_allclose(report["agreement"], agree / count)
  np.testing.assert_allclose(report["mean_kl"], kl / count, rtol=1e-5)
  with pytest.raises(ValueError, match="no batches"):
    train.evaluate(eval_step, student, teacher, [])


def test_fit_logs_means_every_n_steps():
  opt = optax.sgd(0.1)
  state = train.create_state(copy(linear_vars(1)), opt, rng=jax.random.key(0))
  step = train.make_train_step(APPLY, APPLY, loss_fn(), opt)
  logged = []
  state, history = train.fit(step, state, linear_vars(2),
                             [make_batch(s) for s in range(5)], log_every=2,
                             on_log=lambda s, m: logged.append(s))
  assert [s for s, _ in history] == [2, 4, 5] == logged
  assert int(state.step) == 5
  assert all(np.isfinite(m["loss"]) for _, m in history)


def test_ema_teacher_with_accumulation():
  """Mean teacher: the EMA follows decay * ema + (1 - decay) * params."""
  opt = optax.sgd(0.5)
  state = train.create_state(copy(linear_vars(1)), opt, rng=jax.random.key(0),
                             ema=True)
  step = train.make_train_step(APPLY, None, loss_fn(), opt, ema_decay=0.25,
                               teacher_is_ema=True, accumulation_steps=2)
  ema = {k: np.asarray(v, np.float64) for k, v in state.params.items()}
  batch = make_batch(b=8)
  for _ in range(2):
    params = {k: np.asarray(v) for k, v in state.ema_params.items()}
    # The teacher is the EMA itself: same as a NumPy step with that teacher.
    _, _, _, ref_new, _ = np_step(
        {k: np.asarray(v, np.float64) for k, v in state.params.items()},
        params, batch, 0.5)
    state, _ = step(state, None, batch)
    ema = {k: 0.25 * ema[k] + 0.75 * ref_new[k] for k in ema}
    for k in ema:
      np.testing.assert_allclose(state.params[k], ref_new[k], atol=1e-5)
      np.testing.assert_allclose(state.ema_params[k], ema[k], atol=1e-5)
