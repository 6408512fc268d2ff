"""Shared setup of the parallel tests (imported by the tests and their subprocess workers).

Kept import-light: jax is imported by the caller first (so XLA_FLAGS and
jax.distributed take effect before the backend starts).
"""

from __future__ import annotations

import numpy as np

NUM_STEPS = 3
BATCH = 16
FEATURES = 12
CLASSES = 8


def data(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(BATCH, FEATURES)).astype(np.float32),
          "label": rng.integers(0, CLASSES, size=(BATCH,)).astype(np.int32)}


def setup():
  """Student/teacher apply fns and variables, loss, optimizer (SGD: linear in the grads)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from kdjax import losses, models  # pylint: disable=g-import-not-at-top
  student = models.MLP(hidden=(64,), num_classes=CLASSES)
  teacher = models.MLP(hidden=(96,), num_classes=CLASSES)
  x = np.zeros((1, FEATURES), np.float32)
  student_vars = lambda: student.init(jax.random.key(1), x)
  teacher_vars = teacher.init(jax.random.key(2), x)
  loss_fn = losses.compose(
      [losses.Term("ce", losses.label_term(), 0.3, needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence), 0.7)],
      temperature=2.0)
  optimizer = optax.sgd(0.1, momentum=0.9)
  return (models.from_linen(student), student_vars, models.from_linen(teacher),
          teacher_vars, loss_fn, optimizer)


def flat_params(params) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
