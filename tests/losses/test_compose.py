"""Tests of kdjax.losses.compose: weighted sums, schedules, aux, state, errors.

Totals are checked against sums of NumPy references (Hinton et al. 2015 KD:
``w_ce * CE + w_kd * T^2 KL``), with weights and temperature read from optax
schedules at the step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses

C = 5
RTOL = ATOL = 1e-5


class Out(NamedTuple):
  """Duck-typed model output (``.logits``, ``.features``), a pytree."""
  logits: Any
  features: Any = None


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  z = x - np.max(x, axis=-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_kl_t2(s, t, temperature):
  """Per-position T^2 KL(softmax(t/T) || softmax(s/T))."""
  log_p, log_q = np_log_softmax(t / temperature), np_log_softmax(s / temperature)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1) * temperature**2


def np_ce(s, y):
  return -np.take_along_axis(np_log_softmax(s), y[..., None], -1)[..., 0]


def _data(shape=(4, C), seed=0):
  rng = np.random.default_rng(seed)
  s = (2 * rng.standard_normal(shape)).astype(np.float32)
  t = (2 * rng.standard_normal(shape)).astype(np.float32)
  y = rng.integers(0, C, size=shape[:-1])
  return Out(s), Out(t), {"label": y}


def _kd_loss(w_ce=0.3, w_kd=0.7, temperature=2.0):
  return losses.compose(
      [losses.Term("ce", losses.label_term(), weight=w_ce, needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence), weight=w_kd)],
      temperature=temperature)


@pytest.mark.parametrize("shape", [(4, C), (2, 3, C)], ids=["BC", "BLC"])
def test_weighted_sum_equals_manual_sum(shape):
  student, teacher, batch = _data(shape)
  total, aux = _kd_loss()(student, teacher, batch)
  ce = np_ce(student.logits, batch["label"]).mean()
  kd = np_kl_t2(student.logits, teacher.logits, 2.0).mean()
  np.testing.assert_allclose(total, 0.3 * ce + 0.7 * kd, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(aux.terms["ce"], ce, rtol=RTOL)
  np.testing.assert_allclose(aux.terms["kd"], kd, rtol=RTOL)
  assert set(aux.terms) == {"ce", "kd", "weight/ce", "weight/kd",
                            "temperature"}
  assert float(aux.terms["weight/ce"]) == pytest.approx(0.3)
  assert float(aux.terms["weight/kd"]) == pytest.approx(0.7)
  assert float(aux.terms["temperature"]) == 2.0
  assert aux.state == {}
  assert total.dtype == jnp.float32 and total.shape == ()


def test_mapping_form_and_term_factories():
  student, teacher, batch = _data(seed=1)
  batch["mask"] = np.array([1, 0, 1, 1], bool)
  loss = losses.compose(
      {"kd": (losses.logit_term(losses.jensen_shannon_divergence, beta=0.5),
              1.0),
       "dkd": (losses.dkd_term(alpha=1.0, beta=2.0), 0.5),
       "dist": (losses.dist_term(beta=1.0, gamma=2.0), 0.25),
       "mse": (losses.logit_term(losses.logit_mse), 2.0)},
      temperature=3.0)
  total, aux = loss(student, teacher, batch)
  s, t, y, m = student.logits, teacher.logits, batch["label"], batch["mask"]
  expected = {
      "kd": losses.jensen_shannon_divergence(s, t, 3.0, beta=0.5, mask=m),
      "dkd": losses.dkd(s, t, y, alpha=1.0, beta=2.0, temperature=3.0, mask=m),
      "dist": losses.dist(s, t, beta=1.0, gamma=2.0, temperature=3.0, mask=m),
      "mse": np.mean((s[m].astype(np.float64) - t[m]) ** 2),
  }
  # dkd / dist / jsd are checked against NumPy in their own test files.
  for name, value in expected.items():
    np.testing.assert_allclose(aux.terms[name], value, rtol=RTOL, err_msg=name)
  np.testing.assert_allclose(
      total, sum(w * expected[n] for n, w in
                 (("kd", 1.0), ("dkd", 0.5), ("dist", 0.25), ("mse", 2.0))),
      rtol=RTOL)


def test_schedules_evaluated_at_step_eager_and_traced():
  w_kd = optax.linear_schedule(1.0, 0.0, transition_steps=10)
  temperature = optax.piecewise_constant_schedule(4.0, {5: 0.5})  # 4 -> 2
  loss = _kd_loss(w_ce=optax.constant_schedule(0.5), w_kd=w_kd,
                  temperature=temperature)
  student, teacher, batch = _data(seed=2)
  ce = np_ce(student.logits, batch["label"]).mean()
  jitted = jax.jit(lambda st, te, b, step: loss(st, te, b, step=step))
  for step, w, temp in ((0, 1.0, 4.0), (4, 0.6, 4.0), (7, 0.3, 2.0),
                        (20, 0.0, 2.0)):
    kd = np_kl_t2(student.logits, teacher.logits, temp).mean()
    for total, aux in (loss(student, teacher, batch, step=step),
                       jitted(student, teacher, batch, step)):
      np.testing.assert_allclose(total, 0.5 * ce + w * kd, rtol=RTOL,
                                 atol=ATOL, err_msg=str(step))
      np.testing.assert_allclose(aux.terms["weight/kd"], w, atol=1e-6)
      np.testing.assert_allclose(aux.terms["temperature"], temp, rtol=1e-6)
      np.testing.assert_allclose(aux.terms["kd"], kd, rtol=RTOL)
  assert jitted._cache_size() == 1  # pylint: disable=protected-access
  np.testing.assert_allclose(losses.evaluate_schedule(w_kd, 5), 0.5)
  assert losses.evaluate_schedule(0.25, 5).dtype == jnp.float32


def test_gradient_matches_references():
  student, teacher, batch = _data(seed=3)
  loss = _kd_loss(w_ce=0.3, w_kd=0.7, temperature=2.0)
  grad = jax.grad(lambda s: loss(Out(s), teacher, batch)[0])(
      jnp.asarray(student.logits))
  s, t, y = student.logits, teacher.logits, batch["label"]
  n = s.shape[0]
  q = np.exp(np_log_softmax(s))
  ce_grad = (q - np.eye(C)[y]) / n
  kd_grad = 2.0 * (np.exp(np_log_softmax(s / 2.0))
                   - np.exp(np_log_softmax(t / 2.0))) / n
  np.testing.assert_allclose(grad, 0.3 * ce_grad + 0.7 * kd_grad, rtol=1e-4,
                             atol=1e-6)


def test_stateful_term_params_rng_and_inputs():
  student, teacher, batch = _data(seed=4)
  seen = {}

  def counter(inputs):
    seen["counter"] = inputs
    scale = inputs.params["scale"]
    value = scale * jnp.mean(jnp.square(inputs.student.logits))
    return value, {"count": inputs.state["count"] + 1}

  def other(inputs):
    seen["other"] = inputs
    return jnp.float32(1.0)

  loss = losses.compose([
      losses.Term("counter", counter, weight=2.0, stateful=True,
                  init_params=lambda rng, s, t, b: {"scale": jnp.float32(3.0)},
                  init_state=lambda rng, s, t, b: {"count": jnp.int32(0)}),
      losses.Term("other", other, weight=1.0)], temperature=1.5)
  rng = jax.random.PRNGKey(0)
  params = loss.init_params(rng, student, teacher, batch)
  state = loss.init_state(rng, student, teacher, batch)
  assert set(params) == {"counter"} and set(state) == {"counter"}
  total, aux = loss(student, teacher, batch, step=3, params=params,
                    state=state, rng=rng, train=False)
  mean_sq = np.mean(student.logits.astype(np.float64) ** 2)
  np.testing.assert_allclose(total, 2.0 * 3.0 * mean_sq + 1.0, rtol=RTOL)
  assert int(aux.state["counter"]["count"]) == 1
  assert set(aux.state) == {"counter"}
  inputs = seen["counter"]
  assert int(inputs.step) == 3 and float(inputs.temperature) == 1.5
  assert inputs.train is False and inputs.batch is batch
  assert seen["other"].params is None and seen["other"].state is None
  # Each term gets its own key.
  assert not np.array_equal(jax.random.key_data(inputs.rng),
                            jax.random.key_data(seen["other"].rng))
  # Gradient w.r.t. the term's params flows; under jit the state threads.
  def objective(p, st):
    return loss(student, teacher, batch, params=p, state=st)

  (value, aux2), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      params, state)
  np.testing.assert_allclose(grad["counter"]["scale"], 2.0 * mean_sq,
                             rtol=RTOL)
  np.testing.assert_allclose(value, total, rtol=1e-6)
  assert int(aux2.state["counter"]["count"]) == 1


def test_teacherless_composition():
  student, _, batch = _data(seed=5)
  loss = losses.compose([losses.Term("ce", losses.label_term(),
                                     needs_teacher=False)])
  total, _ = loss(student, None, batch)
  np.testing.assert_allclose(total, np_ce(student.logits,
                                          batch["label"]).mean(), rtol=RTOL)
  with pytest.raises(ValueError, match="'kd' needs the teacher"):
    _kd_loss()(student, None, batch)


def test_errors():
  kd = losses.logit_term(losses.kl_divergence)
  with pytest.raises(ValueError, match=r"unique; \['kd'\] repeated"):
    losses.compose([losses.Term("kd", kd), losses.Term("kd", kd)])
  with pytest.raises(ValueError, match="weight of term 'kd' must be >= 0"):
    losses.compose([losses.Term("kd", kd, weight=-0.5)])
  with pytest.raises(ValueError, match="at least one term"):
    losses.compose([])
  with pytest.raises(TypeError, match="expected kdjax.losses.Term"):
    losses.compose([("kd", kd)])
  with pytest.raises(TypeError, match="fn of term 'kd' must be callable"):
    losses.compose([losses.Term("kd", "kl")])
  with pytest.raises(ValueError, match="reserved"):
    losses.compose([losses.Term("temperature", kd)])
  with pytest.raises(ValueError, match="reserved"):
    losses.compose([losses.Term("weight/kd", kd)])
  with pytest.raises(ValueError, match="non-empty strings"):
    losses.compose([losses.Term("", kd)])
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.compose([losses.Term("kd", kd)], temperature=0.0)
  student, teacher, batch = _data(seed=6)
  per_position = losses.logit_term(losses.kl_divergence, reduction="none")
  with pytest.raises(ValueError, match=r"'kd' returned shape \(4,\)"):
    losses.compose([losses.Term("kd", per_position)])(student, teacher, batch)
  bad_state = losses.Term("s", lambda inputs: jnp.float32(0.0), stateful=True)
  with pytest.raises(ValueError, match="must return \\(value, new_state\\)"):
    losses.compose([bad_state])(student, teacher, batch)
  # A schedule's weight is only known at the step: no error at compose time.
  losses.compose([losses.Term("kd", kd, weight=optax.linear_schedule(1, 0, 5))])
