"""The options of a distillation train step, as one frozen object.

Every way of building a step (``kdjax.train.make_train_step``, the LM, cached,
sharded and pmap variants, GKD, sequence-level KD, the mean teacher) reads the
same :class:`StepOptions`: the options are written down once, checked once
(when the object is made) and passed along whole, instead of a dozen keyword
arguments repeated by each builder. The object is frozen, so a step built from
it cannot change under the caller's feet, and hashable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

from kdjax.train import _accumulation
from kdjax.train._precision import Policy
from kdjax.train._precision import resolve_policy


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What a train step does besides the loss and the optimizer update.

  Attributes:
    accumulation_steps: ``k >= 1``; the batch (leading axis ``B``, divisible
      by ``k``) is split into ``k`` micro-batches whose gradients are summed
      with weights ``n_i / N`` in a ``lax.scan`` before one optimizer update.
      Equal to the full-batch step for mean-reduced losses (see
      ``kdjax/train/_accumulation.py``).
    accumulation_weighting: ``"auto"`` (by the mask's total weight per
      micro-batch when ``batch[mask_key]`` exists, else ``1/k``), ``"mask"``
      or ``"equal"``. Also how data-parallel devices are weighted under
      ``pmap``.
    mask_key: the batch key of the (token) mask used by the weighting.
    policy: a :class:`kdjax.train.Policy` (mixed precision); ``None`` is all
      float32.
    ema_decay: if set (float or schedule of the step), ``state.ema_params``
      tracks ``decay * ema + (1 - decay) * params`` after each update.
    teacher_is_ema: the teacher is the student's own EMA (mean teacher):
      ``teacher_variables`` is ignored and ``state.ema_variables()`` is run
      through ``student_apply`` (or ``teacher_apply`` when given). Needs
      ``ema_decay``.
    log_grad_norm: add ``"grad_norm"`` (global norm of the student's
      gradient) to the metrics.
    checks: the step's run-time checks (a debugging option, off by default;
      off, the compiled step is unchanged). Inside the jitted step the
      temperature (a schedule of the step), the labels and the teacher's
      output are traced, so the losses cannot check them eagerly; with
      ``checks=True`` they are ``jax.experimental.checkify`` checks and the
      compiled step raises ``ValueError`` for a temperature ``<= 0`` (or
      NaN), a label outside ``[0, C)``, a negative loss weight or a mixing
      coefficient outside ``[0, 1]``, and ``FloatingPointError`` naming
      ``teacher_name`` for NaN/inf in the teacher's logits or features. Each
      call then waits for the device; the state passed to a step that raises
      is donated (gone): restart from a checkpoint or build with
      ``donate=False``. Implies ``check_teacher_finite``.
    check_teacher_finite: the teacher check of ``checks`` alone.
    teacher_name: the teacher's name in error messages.
  """
  accumulation_steps: int = 1
  accumulation_weighting: str = "auto"
  mask_key: Optional[str] = "mask"
  policy: Optional[Policy] = None
  ema_decay: Optional[Union[float, Callable[[Any], Any]]] = None
  teacher_is_ema: bool = False
  log_grad_norm: bool = False
  checks: bool = False
  check_teacher_finite: bool = False
  teacher_name: str = "teacher"

  def __post_init__(self):
    if self.teacher_is_ema and self.ema_decay is None:
      raise ValueError("teacher_is_ema=True needs ema_decay.")
    _accumulation.check_accumulation(self.accumulation_steps,
                                     self.accumulation_weighting)
    resolve_policy(self.policy)  # a TypeError for anything but a Policy

  @property
  def teacher_checks(self) -> bool:
    """Whether the step checks the teacher's output (``checks`` implies it)."""
    return bool(self.check_teacher_finite or self.checks)

  def replace(self, **changes: Any) -> "StepOptions":
    """A copy with ``changes`` (checked again); an unknown name is a ``TypeError``."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def of(cls, options: Optional["StepOptions"] = None,
         **changes: Any) -> "StepOptions":
    """``options`` (default: ``StepOptions()``) with ``changes``.

    The step builders take an options object and/or its fields as keywords
    (``make_train_step(..., accumulation_steps=2)``); this merges the two.
    """
    if options is None:
      return cls(**changes)
    if not isinstance(options, cls):
      raise TypeError(f"options must be a kdjax.train.StepOptions, got "
                      f"{type(options).__name__}.")
    return options.replace(**changes) if changes else options
