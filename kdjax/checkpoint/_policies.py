"""When a distillation run saves a step, and which steps it keeps.

:func:`manager_options` turns the policy arguments of
:class:`kdjax.checkpoint.DistillCheckpointer` into orbax
``CheckpointManagerOptions``: save every ``save_every`` steps (and on a
preemption signal), keep the newest ``keep_last`` steps and, with a
``best_metric``, also the ``keep_best`` best steps by that eval metric.
:func:`check_metrics` checks the ``metrics=`` given to ``save``: a step saved
without the best metric could never be ranked.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import orbax.checkpoint as ocp


def manager_options(*,
                    save_every: Optional[int],
                    keep_last: Optional[int],
                    best_metric: Optional[str],
                    best_mode: str,
                    keep_best: int,
                    async_save: bool,
                    async_timeout_s: int) -> ocp.CheckpointManagerOptions:
  """The orbax options of these policies (arguments as ``DistillCheckpointer``).

  Raises:
    ValueError: ``save_every`` is not an int >= 0 or ``None``, ``keep_last``
      < 1, ``best_mode`` not ``"max"``/``"min"``, or ``keep_best`` < 1.
  """
  if save_every is not None and (int(save_every) != save_every
                                 or save_every < 0):
    raise ValueError(f"save_every must be an int >= 0 or None, got {save_every}.")
  if keep_last is not None and keep_last < 1:
    raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}.")
  if best_mode not in ("max", "min"):
    raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
  if keep_best < 1:
    raise ValueError(f"keep_best must be >= 1, got {keep_best}.")
  cm = ocp.checkpoint_managers
  keep = [cm.LatestN(n=keep_last)]
  best_fn = None
  if best_metric is not None:
    worst = -math.inf if best_mode == "max" else math.inf

    def best_value(metrics):
      value = metrics.get(best_metric) if isinstance(metrics, Mapping) else None
      return worst if value is None else float(value)

    best_fn = best_value
    keep.append(cm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min",
                         n=keep_best, keep_checkpoints_without_metrics=False))
  save_policies = [cm.PreemptionCheckpointingPolicy()]
  if save_every:
    save_policies.insert(0, cm.FixedIntervalPolicy(int(save_every)))
  return ocp.CheckpointManagerOptions(
      save_decision_policy=cm.AnySavePolicy(save_policies),
      preservation_policy=cm.AnyPreservationPolicy(keep),
      # best_fn makes orbax write the metrics and answer best_step().
      best_fn=best_fn,
      best_mode=best_mode,
      enable_async_checkpointing=async_save,
      async_options=ocp.AsyncOptions(timeout_secs=async_timeout_s),
      # Half-written steps of a crashed run (``<step>.orbax-checkpoint-tmp``)
      # are removed: they are never restored, and would block re-saving.
      cleanup_tmp_directories=True,
      create=True)


def check_metrics(metrics: Optional[Mapping[str, Any]],
                  best_metric: Optional[str]) -> Optional[dict]:
  """``metrics`` as ``{str: float}`` (``None`` stays ``None``).

  Raises:
    KeyError: ``metrics`` lacks ``best_metric``.
  """
  if metrics is None:
    return None
  metrics = {str(k): float(v) for k, v in metrics.items()}
  if best_metric is not None and best_metric not in metrics:
    raise KeyError(f"metrics lack the best_metric {best_metric!r}; "
                   f"got {sorted(metrics)}.")
  return metrics
