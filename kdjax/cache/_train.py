"""Top-k loss term and the train step fed from a teacher cache."""

from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import optax

from kdjax.cache._cache import TeacherCache
from kdjax.cache._cache import check_loss_compatible
from kdjax.losses import ComposedLoss
from kdjax.losses import TermInputs
from kdjax.losses import top_k_divergence
from kdjax.losses import top_k_teacher
from kdjax.models import ApplyFn
from kdjax.train import StepFn
from kdjax.train import StepOptions
from kdjax.train import make_train_step


def top_k_term(*,
               k: Optional[int] = None,
               divergence: str = "kl",
               tail_bucket: bool = True,
               mask_key: Optional[str] = "mask",
               **kwargs: Any) -> Callable[[TermInputs], chex.Array]:
  r"""A loss term comparing the student with the teacher's top-k distribution.

  ``top_k_divergence(student_logits, teacher_top_k, T)`` (see
  :func:`kdjax.losses.top_k_divergence`): the divergence over the teacher's
  ``k`` largest entries, plus a tail bucket holding the remaining mass
  (``tail_bucket=True``). The teacher's top-k comes from a cached output
  (``inputs.teacher.top_k``, offline distillation) or, for an online teacher
  with dense logits, from ``top_k_teacher(teacher_logits, k, T)`` at the
  step's temperature; the same term thus serves both, and with ``k = C`` it
  equals the dense divergence.

  Args:
    k: top-k size for an online teacher (ignored for a cached top-k).
    divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ...
    tail_bucket: keep the tail mass as a ``(k+1)``-th bucket.
    mask_key: the batch key of the mask (``[B]`` or ``[B, T]``).
    **kwargs: passed to ``top_k_divergence`` (``beta``, ``alpha``).
  """

  def term(inputs: TermInputs) -> chex.Array:
    teacher = inputs.teacher
    top = getattr(teacher, "top_k", None)
    if top is None:
      if k is None:
        raise ValueError(
            "top_k_term got a teacher with dense logits but no k; pass "
            "top_k_term(k=...) or feed a top-k teacher cache.")
      top = top_k_teacher(teacher.logits, k, inputs.temperature)
    mask = None
    if mask_key is not None and hasattr(inputs.batch, "get"):
      mask = inputs.batch.get(mask_key)
    return top_k_divergence(inputs.student.logits, top, inputs.temperature,
                            divergence=divergence, tail_bucket=tail_bucket,
                            mask=mask, **kwargs)

  return term


def make_cached_train_step(student_apply: ApplyFn,
                           cache: TeacherCache,
                           loss_fn: ComposedLoss,
                           optimizer: optax.GradientTransformation,
                           options: Optional[StepOptions] = None,
                           **step_kwargs: Any) -> StepFn:
  """The train step of offline distillation: the teacher's outputs come from the batch.

  :func:`check_loss_compatible` (``cache``, ``loss_fn``), then
  ``make_train_step(student_apply, cache.teacher_apply(), loss_fn,
  optimizer, options, **step_kwargs)`` (``donate``, ``jit`` and
  :class:`kdjax.train.StepOptions` fields): call it as ``step(state, None,
  batch)`` with batches from ``cache.batches(...)``; no teacher is in memory.

  Raises:
    ValueError: the loss's temperature differs from a top-k cache's.
  """
  check_loss_compatible(cache, loss_fn)
  return make_train_step(student_apply, cache.teacher_apply(), loss_fn,
                         optimizer, options, **step_kwargs)
