"""A minimal training loop that keeps metrics on the device."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp

from kdjax.train._state import DistillState


@jax.jit
def _accumulate(running, metrics):
  """Adds two metric dicts in one dispatch (not one per metric)."""
  return jax.tree.map(jnp.add, running, metrics)


def fit(train_step,
        state: DistillState,
        teacher_variables: Any,
        batches: Iterable,
        *,
        log_every: int = 100,
        on_log: Optional[Callable[[int, dict], None]] = None) -> tuple[DistillState, list]:
  """Runs ``train_step(state, teacher_variables, batch)`` over ``batches``.

  ``teacher_variables`` may be ``None`` for a step that needs no teacher (a
  student alone, or an offline cache whose teacher outputs are in the batch).

  Metrics are summed on the device and fetched once every ``log_every`` steps
  (a host sync per step would cost most of a small step's time). Returns the
  final state and the list of ``(step, mean metrics)`` logged.
  """
  if log_every < 1:
    raise ValueError(f"log_every must be >= 1, got {log_every}.")
  history, running, n = [], None, 0
  for batch in batches:
    state, metrics = train_step(state, teacher_variables, batch)
    running = metrics if running is None else _accumulate(running, metrics)
    n += 1
    if n == log_every:
      means = {k: float(v) / n for k, v in jax.device_get(running).items()}
      step = int(state.step)
      history.append((step, means))
      if on_log is not None:
        on_log(step, means)
      running, n = None, 0
  if n:
    means = {k: float(v) / n for k, v in jax.device_get(running).items()}
    step = int(state.step)
    history.append((step, means))
    if on_log is not None:
      on_log(step, means)
  return state, history
