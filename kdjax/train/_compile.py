"""From a pure step function to the step a training loop calls.

:func:`kdjax.train.build_step` returns a pure function
``step(state, teacher_variables, batch) -> (state, metrics)``; three wrappers,
applied in this order by :func:`compile_step`, make it the step to call:

1. **checks**: a step holding ``jax.experimental.checkify`` checks (built with
   ``StepOptions(checks=True)`` or ``check_teacher_finite=True``) is
   functionalised by ``checkify.checkify``: it then returns ``(error, out)``;
2. **jit, donation and shardings**: ``jax.jit`` with the state's buffers
   donated and, for ``kdjax.parallel``, explicit in/out shardings;
3. **raising**: outside the jitted function, a failed check raises
   ``FloatingPointError`` (the teacher's output is not finite) or
   ``ValueError`` (a loss's value check).

A step without checks is just ``jax.jit(step, donate_argnums=(0,))``: the
compiled program and the cost of a call are those of a hand-written step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import checkify

# The attribute of a step function that holds checkify checks.
HOLDS_CHECKS = "kdjax_checks"

# The teacher check's message starts so; the step raises FloatingPointError for
# it and ValueError for the losses' value checks.
_TEACHER_CHECK_PREFIX = "the teacher "


def _floating_leaves(tree) -> list:
  return [x for x in jax.tree.leaves(tree)
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]


def check_teacher_finite(output: Any, teacher_name: str, step: Any) -> None:
  """A checkify check (inside a step) that the teacher's logits and features are finite."""
  leaves = _floating_leaves((output.logits, output.features))
  if not leaves:
    return
  bad = sum(jnp.sum(~jnp.isfinite(x)) for x in leaves)
  name = teacher_name.replace("{", "{{").replace("}", "}}")
  checkify.check(
      bad == 0,
      f"{_TEACHER_CHECK_PREFIX}{name!r} produced {{bad}} non-finite (NaN/inf) value(s) in "
      "its logits/features at step {step}; check its parameters, inputs and "
      "compute dtype.", bad=bad, step=step)


def _raising(checked_step: Callable) -> Callable:
  """Calls a checkified step and raises on a failed check.

  ``FloatingPointError`` for the teacher's non-finite output, ``ValueError``
  for the losses' value checks (temperature, labels, ...). The checkified
  step itself is the ``checked`` attribute.
  """

  @functools.wraps(checked_step)
  def run(*args, **kwargs):
    err, out = checked_step(*args, **kwargs)
    try:
      err.throw()
    except checkify.JaxRuntimeError as e:
      message = str(e).split("\n")[0]
      if message.startswith(_TEACHER_CHECK_PREFIX):
        raise FloatingPointError(message) from e
      raise ValueError(message) from e
    return out

  run.checked = checked_step
  return run


def compile_step(step: Callable, *, jit: bool = True, donate: bool = True,
                 checks: bool = False, **jit_kwargs: Any) -> Callable:
  """Checks, then ``jax.jit`` with donation (and shardings): the step to call.

  Args:
    step: a pure ``step(state, teacher_variables, batch) -> (state,
      metrics)``, e.g. from :func:`kdjax.train.build_step`.
    jit: jit the step (``False``: run it op by op, for debugging).
    donate: donate the state's buffers (argument 0) to the step.
    checks: checkify the step. A step built with checks (its
      ``kdjax_checks`` attribute is true) is checkified in any case;
      ``checks=True`` is for a function that wraps such a step.
    **jit_kwargs: more ``jax.jit`` arguments: ``in_shardings`` and
      ``out_shardings`` (for the outputs ``(state, metrics)``; a checkified
      step's error value gets ``None``).

  Returns:
    The step; a checked one raises ``FloatingPointError`` or ``ValueError``
    on a failed check and has the checkified function as ``.checked``.
  """
  checks = checks or getattr(step, HOLDS_CHECKS, False)
  if checks:
    step = checkify.checkify(step, errors=checkify.user_checks)
    if "out_shardings" in jit_kwargs:
      jit_kwargs["out_shardings"] = (None, jit_kwargs["out_shardings"])
  if jit:
    step = jax.jit(step, donate_argnums=(0,) if donate else (), **jit_kwargs)
  return _raising(step) if checks else step
