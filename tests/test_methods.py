"""Tests of the method registry (kdjax/methods.py): every method trains.

For every registered method a tiny CNN student distils from a tiny CNN teacher
(briefly trained here) on generated 16x16x1 images for 24 steps with
``kdjax.train.make_train_step`` (or the method's recipe built on it); the loss
must stay finite and decrease.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods
from kdjax.losses import Term
from kdjax.losses import compose
from kdjax.losses import label_term
from kdjax.models import CNN
from kdjax.models import MLP
from kdjax.models import from_linen
from kdjax.models._ensemble import ensemble_apply
from kdjax.train import create_state
from kdjax.train import fit
from kdjax.train import make_train_step
from kdjax.train._self_distillation import born_again

NUM_DATA, BATCH, CLASSES, STEPS = 64, 16, 5, 24
FEATURES = ("block_0", "block_1", "penultimate")

# Hyper-parameters scaled to the tiny problem (the paper defaults assume
# CIFAR-size data and epochs).
TEST_OVERRIDES = {
    "dkd": {"warmup_steps": 0},
    "crd": {"nce_k": 32, "feat_dim": 16},
    "cc": {"feat_dim": 16},
    "mean_teacher": {"rampup_steps": 0},
    "born_again": {"generations": 2},
}


def _make_data():
  rng = np.random.default_rng(0)
  labels = np.arange(NUM_DATA) % CLASSES
  prototypes = rng.normal(size=(CLASSES, 16, 16, 1))
  images = prototypes[labels] + 0.7 * rng.normal(size=(NUM_DATA, 16, 16, 1))
  return images.astype(np.float32), labels.astype(np.int32)


def _batches(images, labels, steps):
  out = []
  for s in range(steps):
    start = (s * BATCH) % NUM_DATA
    idx = np.arange(start, start + BATCH)
    out.append({"image": jnp.asarray(images[idx]),
                "label": jnp.asarray(labels[idx]),
                "index": jnp.asarray(idx, jnp.int32)})
  return out


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """Compile with most XLA optimisations off: this file compiles ~25 steps.

  Halves the compile time; the numbers are the same up to rounding. Restored
  after the module, and JAX's caches cleared: the flag is not in JAX's cache
  keys, so the unoptimised executables of eager ops (a flax init's) would
  otherwise serve later tests in this process, whose inits would then differ
  in the last bits from a fresh process's.
  """
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
  jax.clear_caches()


STUDENT = CNN(channels=(4, 8), dense=16, num_classes=CLASSES)
TEACHER = CNN(channels=(8, 16), dense=32, num_classes=CLASSES)
TEACHER_2 = MLP(hidden=(24,), num_classes=CLASSES)


@pytest.fixture(scope="module")
def setup():
  images, labels = _make_data()
  batches = _batches(images, labels, STEPS)
  x0 = jnp.zeros((1, 16, 16, 1))
  # The CNN teacher is trained briefly on the labels; the second teacher of the
  # ensemble (another architecture) stays at its random initialisation.
  t_apply = from_linen(TEACHER, feature_names=FEATURES)
  optimizer = optax.adam(1e-2)
  loss_fn = compose([Term("ce", label_term(), 1.0, needs_teacher=False)])
  state = create_state(TEACHER.init(jax.random.PRNGKey(10), x0), optimizer,
                       rng=jax.random.PRNGKey(0))
  step = make_train_step(t_apply, None, loss_fn, optimizer)
  state, _ = fit(step, state, None, batches, log_every=STEPS)
  t2_apply = from_linen(TEACHER_2, feature_names=("penultimate",))
  t2_vars = TEACHER_2.init(jax.random.PRNGKey(11), x0)
  teachers = [(t_apply, state.student_variables()), (t2_apply, t2_vars)]
  return {"batches": batches, "teachers": teachers, "labels": labels}


def _student_init(key):
  return STUDENT.init(key, jnp.zeros((1, 16, 16, 1)))


STUDENT_APPLY = from_linen(STUDENT, feature_names=FEATURES)


def _init_loss(loss_fn, variables, teacher_apply, teacher_vars, batch):
  s_out = STUDENT_APPLY(variables, batch)
  t_out = None if teacher_apply is None else teacher_apply(teacher_vars, batch)
  return (loss_fn.init_params(jax.random.PRNGKey(1), s_out, t_out, batch),
          loss_fn.init_state(jax.random.PRNGKey(2), s_out, t_out, batch))


def _check_decreasing(history, name):
  losses = np.array([m["loss"] for _, m in history])
  assert np.all(np.isfinite(losses)), (name, losses)
  for _, m in history:
    assert all(np.isfinite(v) for v in m.values()), (name, m)
  first, last = losses[:3].mean(), losses[-3:].mean()
  assert last < first, f"{name}: loss did not decrease ({first} -> {last})"


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_trains(name, setup):
  spec = methods.get_method(name, **TEST_OVERRIDES.get(name, {}))
  loss_fn = methods.build_loss(spec, num_data=NUM_DATA,
                               dataset_labels=setup["labels"])
  batches = setup["batches"]
  optimizer = optax.adam(3e-3)
  (t_apply, t_vars), (t2_apply, t2_vars) = setup["teachers"]

  if spec.recipe == "born_again":
    results = born_again(STUDENT_APPLY, _student_init, optimizer, batches,
                         generations=spec.hparams["generations"],
                         rng=jax.random.PRNGKey(0), loss_fn=loss_fn,
                         log_every=1)
    assert [r.generation for r in results] == [0, 1, 2]
    for r in results:
      _check_decreasing(r.history, f"{name}/generation {r.generation}")
    return

  if spec.recipe == "ensemble":
    teacher_apply = ensemble_apply([t_apply, t2_apply])
    teacher_vars = (t_vars, t2_vars)
  elif spec.recipe == "distill":
    teacher_apply, teacher_vars = t_apply, t_vars
  else:  # student_only, mean_teacher
    teacher_apply, teacher_vars = None, None

  variables = _student_init(jax.random.PRNGKey(3))
  loss_params, loss_state = _init_loss(
      loss_fn, variables,
      STUDENT_APPLY if spec.recipe == "mean_teacher" else teacher_apply,
      variables if spec.recipe == "mean_teacher" else teacher_vars, batches[0])
  state = create_state(variables, optimizer, rng=jax.random.PRNGKey(4),
                       loss_params=loss_params, loss_state=loss_state,
                       ema=spec.recipe == "mean_teacher")
  step = make_train_step(STUDENT_APPLY, teacher_apply, loss_fn, optimizer,
                         **spec.train_step_kwargs())
  state, history = fit(step, state, teacher_vars, batches, log_every=1)
  assert len(history) == STEPS
  _check_decreasing(history, name)
  if name == "crd":
    memory = state.loss_state["crd"]
    assert float(memory.z_student) > 0 and float(memory.z_teacher) > 0


def test_unknown_names_and_overrides():
  with pytest.raises(ValueError, match="known methods") as e:
    methods.get_method("kd2")
  assert "'crd'" in str(e.value) and "'kd'" in str(e.value)
  with pytest.raises(ValueError, match="temprature") as e:
    methods.get_method("kd", temprature=2.0)
  assert "temperature" in str(e.value) and "ce_weight" in str(e.value)


def test_overrides_do_not_touch_the_registry():
  spec = methods.get_method("kd", temperature=2.0)
  assert spec.hparams["temperature"] == 2.0
  assert methods.get_method("kd").hparams["temperature"] == 4.0
  assert methods.METHODS["kd"].hparams["temperature"] == 4.0


def test_paper_defaults():
  h = {n: methods.get_method(n).hparams for n in methods.METHODS}
  assert (h["kd"]["temperature"], h["kd"]["ce_weight"],
          h["kd"]["kd_weight"]) == (4.0, 0.1, 0.9)
  assert (h["dkd"]["alpha"], h["dkd"]["beta"], h["dkd"]["temperature"]) == (
      1.0, 8.0, 4.0)
  assert h["at"]["at_weight"] == 1000.0
  assert (h["rkd"]["distance_weight"], h["rkd"]["angle_weight"]) == (25.0, 50.0)
  assert h["sp"]["sp_weight"] == 3000.0 and h["pkt"]["pkt_weight"] == 30000.0
  assert h["cc"]["cc_weight"] == 0.02 and h["crd"]["crd_weight"] == 0.8
  assert (h["crd"]["feat_dim"], h["crd"]["nce_k"], h["crd"]["nce_t"],
          h["crd"]["nce_m"]) == (128, 16384, 0.07, 0.5)
  assert (h["dist"]["beta"], h["dist"]["gamma"], h["dist"]["temperature"]) == (
      1.0, 1.0, 1.0)
  assert methods.get_method("crd").needs_index
  assert not methods.get_method("ce").needs_teacher


def _softmax(z, t=1.0):
  z = np.asarray(z, np.float64) / t
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


class _Out:

  def __init__(self, logits):
    self.logits = jnp.asarray(logits, jnp.float32)
    self.features = {}


def test_kd_loss_value_against_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 6, 5)) * 3
  y = rng.integers(0, 5, size=6)
  loss_fn = methods.build_loss("kd")
  total, _ = loss_fn(_Out(s), _Out(t), {"label": jnp.asarray(y)})
  p, q = _softmax(t, 4.0), _softmax(s, 4.0)
  kl = np.sum(p * np.log(p / q), -1).mean()
  ce = -np.log(_softmax(s)[np.arange(6), y]).mean()
  np.testing.assert_allclose(float(total), 0.1 * ce + 0.9 * 16 * kl, rtol=1e-5)


def test_dkd_warmup_schedule():
  spec = methods.get_method("dkd", warmup_steps=10)
  loss_fn = methods.build_loss(spec)
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 4, 5))
  batch = {"label": jnp.array([0, 1, 2, 3])}
  weights = [float(loss_fn(_Out(s), _Out(t), batch, step=k)[1].terms[
      "weight/dkd"]) for k in (0, 5, 10, 50)]
  np.testing.assert_allclose(weights, [0.0, 0.5, 1.0, 1.0], rtol=1e-6)


def test_crd_needs_num_data():
  with pytest.raises(ValueError, match="num_data"):
    methods.build_loss("crd")


def test_feature_names_and_step_kwargs():
  assert methods.get_method("at").feature_names() == {
      "student": ("block_0", "block_1"), "teacher": ("block_0", "block_1")}
  assert methods.get_method("crd", student_feature="emb").feature_names()[
      "student"] == ("emb",)
  assert methods.get_method("kd").train_step_kwargs() == {}
  kwargs = methods.get_method("mean_teacher", ema_decay=0.9).train_step_kwargs()
  assert kwargs["teacher_is_ema"]
  np.testing.assert_allclose(float(kwargs["ema_decay"](100)), 0.9)


def test_methods_table():
  table = methods.methods_table()
  lines = table.splitlines()
  assert lines[0] == "| Method | Paper | Defaults | Import |"
  assert len(lines) == 2 + len(methods.METHODS)
  for name in methods.METHODS:
    assert f"| `{name}` |" in table
  assert "arxiv.org/abs/1910.10699" in table  # CRD's paper
