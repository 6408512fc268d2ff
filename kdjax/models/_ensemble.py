"""Several teachers as one apply function, so one jitted step runs them all."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import chex
import jax
import jax.numpy as jnp

from kdjax.models._output import ApplyFn
from kdjax.models._output import ModelOutput

# The feature under which :func:`ensemble_apply` stacks the teachers' logits
# (``kdjax.losses.teacher_logits_of`` reads it; a teacher cache stores it).
TEACHER_LOGITS_KEY = "teacher_logits"


def ensemble_apply(apply_fns: Sequence[ApplyFn]) -> ApplyFn:
  """Combines ``M`` teachers' apply functions into one.

  The returned ``apply(variables, batch, *, train=False, rng=None)`` takes
  ``variables`` as a tuple (or list) with one entry per teacher, each in the
  form its own apply function takes (so architectures may differ: a linen
  CNN beside an NNX MLP), runs every teacher on the batch and returns one
  :class:`ModelOutput`:

  * ``features["teacher_logits"]``: the teachers' logits stacked,
    ``[M, ..., C]`` float32 (what ``kdjax.losses.multi_teacher_term`` reads);
  * ``features["teacher_{i}/{name}"]``: each teacher's own features (they
    may differ in shape between teachers, so they are not stacked);
  * ``logits``: the ensemble's prediction at temperature 1,
    ``log((1/M) sum_i softmax(z_i))`` (normalised log-probabilities, ``[..., C]``),
    so that evaluation and any single-teacher loss see the ensemble as one
    teacher. Note that ``softmax(logits / T)`` at ``T != 1`` is *not* the
    average of the teachers' tempered distributions; the multi-teacher losses
    temper each teacher separately;
  * ``state``: a tuple of the teachers' states when any is not ``None``.

  ``rng`` (dropout) is split into one key per teacher. All teachers must
  predict the same number of classes (a ``ValueError`` names each teacher's
  count otherwise). The teachers' variables are an argument, never baked into
  the compiled step.

  Args:
    apply_fns: the ``M >= 1`` teachers' apply functions.

  Returns:
    The ensemble's apply function.
  """
  apply_fns = tuple(apply_fns)
  if not apply_fns:
    raise ValueError("ensemble_apply needs at least one apply function.")
  for i, fn in enumerate(apply_fns):
    if not callable(fn):
      raise TypeError(f"apply_fns[{i}] is not callable ({type(fn).__name__}).")
  num = len(apply_fns)

  def apply(variables: Sequence[Any], batch: Any, *, train: bool = False,
            rng: Optional[chex.PRNGKey] = None) -> ModelOutput:
    if not isinstance(variables, (tuple, list)) or len(variables) != num:
      raise ValueError(
          f"ensemble of {num} teachers takes a tuple of {num} variables (one "
          f"per teacher), got {type(variables).__name__}"
          + (f" of length {len(variables)}" if isinstance(
              variables, (tuple, list)) else "") + ".")
    rngs = [None] * num if rng is None else list(jax.random.split(rng, num))
    outputs = [fn(v, batch, train=train, rng=r)
               for fn, v, r in zip(apply_fns, variables, rngs)]
    shapes = [tuple(jnp.shape(o.logits)) for o in outputs]
    counts = [s[-1] if s else None for s in shapes]
    if len(set(counts)) > 1:
      detail = ", ".join(f"teacher {i} has {c}" for i, c in enumerate(counts))
      raise ValueError(
          f"the ensemble's teachers disagree on the class count ({detail} "
          "classes); every teacher must predict the same classes.")
    if len(set(shapes)) > 1:
      raise ValueError(f"the teachers' logits shapes disagree: {shapes}.")
    stacked = jnp.stack([
        jnp.asarray(o.logits).astype(
            jnp.promote_types(jnp.asarray(o.logits).dtype, jnp.float32))
        for o in outputs])
    log_mean = (jax.nn.logsumexp(jax.nn.log_softmax(stacked, axis=-1), axis=0)
                - jnp.log(float(num)))
    features = {TEACHER_LOGITS_KEY: stacked}
    for i, out in enumerate(outputs):
      for name, value in (out.features or {}).items():
        features[f"teacher_{i}/{name}"] = value
    states = tuple(o.state for o in outputs)
    state = states if any(s is not None for s in states) else None
    return ModelOutput(logits=log_mean, features=features, state=state)

  return apply
