"""Restoring a step of a distillation run: items, checks, fallback, quarantine.

:class:`StepReader` reads the steps of one checkpoint root for
:meth:`kdjax.checkpoint.DistillCheckpointer.restore`: a step's JSON items and
its state (read directly into the target shardings), checked against the
template's structure, the teacher's fingerprint and the per-leaf checksums
saved with it. With several processes each reads its own shards; they agree
on each step's outcome (:mod:`kdjax.checkpoint._agreement`) before moving on.
:func:`quarantine` moves corrupted steps to ``<root>/corrupted/`` (process 0
moves, the others wait), so the run can save those steps again.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

from kdjax.checkpoint import _agreement
from kdjax.checkpoint import _integrity
from kdjax.checkpoint._integrity import CheckpointCorruptedError
from kdjax.checkpoint._integrity import CheckpointError
from kdjax.checkpoint._integrity import StructureMismatchError
from kdjax.checkpoint._integrity import TeacherMismatchError
from kdjax.checkpoint._layout import CONFIG_ITEM
from kdjax.checkpoint._layout import DATA_ITEM
from kdjax.checkpoint._layout import META_ITEM
from kdjax.checkpoint._layout import PER_PROCESS_KEY
from kdjax.checkpoint._layout import QUARANTINE_DIR
from kdjax.checkpoint._layout import STATE_ITEM
from kdjax.checkpoint._layout import short_error
from kdjax.checkpoint._layout import step_path

log = logging.getLogger("kdjax.checkpoint")


class RestoredRun(NamedTuple):
  """What :meth:`DistillCheckpointer.restore` returns.

  Attributes:
    state: the restored state, in the template's structure and the requested
      shardings.
    step: the checkpoint step restored.
    config: the run config saved with it (``None`` if none was).
    data_state: the data iterator state saved with it (``None`` if none).
    metrics: the eval metrics saved with it (``None`` if none).
    extra: the user ``extra`` JSON saved with it (``None`` if none).
    skipped_steps: newer steps found corrupted and moved to
      ``<root>/corrupted/`` (only with ``fallback=True``).
  """
  state: Any
  step: int
  config: Optional[dict]
  data_state: Optional[dict]
  metrics: Optional[dict]
  extra: Optional[dict]
  skipped_steps: tuple = ()


@dataclasses.dataclass(frozen=True)
class StepReader:
  """Reads and checks the committed steps of one checkpoint root.

  Attributes:
    directory: the checkpoint root (absolute).
    teacher_fingerprint: the current teacher's, or ``None`` (not checked).
    metrics_of: ``step -> saved eval metrics`` (the orbax manager's
      ``metrics``), or ``None`` when the run keeps no best metric.
  """
  directory: epath.Path
  teacher_fingerprint: Optional[str] = None
  metrics_of: Optional[Callable[[int], Any]] = None

  def step_path(self, step: int) -> epath.Path:
    return step_path(self.directory, step)

  def read_json(self, step: int, item: str) -> dict:
    """A step's JSON item (``meta``, ``config``, ``data_iterator``)."""
    path = self.step_path(step) / item
    try:
      return dict(ocp.JsonCheckpointHandler().restore(path))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorruptedError(
          f"the checkpoint at step {step} ({self.step_path(step)}) is "
          f"corrupted or incomplete: its {item!r} item cannot be read "
          f"({short_error(e)}).", step=step,
          path=str(self.step_path(step))) from e

  def first_restorable(self, candidates: Sequence[int], abstract: Any,
                       verify: bool, allow_teacher_change: bool,
                       fallback: bool):
    """``(RestoredRun, skipped steps)``: the newest candidate that restores.

    Each corrupted step but the last is logged once (with the next step
    tried); the last one's error is raised (without ``fallback``: as is),
    naming the others.
    """
    skipped = []
    for i, candidate in enumerate(candidates):
      result, error = self.restore_agreed(candidate, abstract, verify,
                                          allow_teacher_change)
      if error is None:
        return result, tuple(skipped)
      if i + 1 == len(candidates):
        break
      log.warning("%s Falling back to step %d.", error, candidates[i + 1])
      skipped.append(candidate)
    if not fallback:
      raise error
    others = (f"steps {skipped + [candidate]} are all corrupted or unreadable "
              "(the newer ones are logged above); the oldest: " if skipped
              else "")
    raise CheckpointCorruptedError(
        f"no restorable checkpoint in {self.directory}: {others}{error}",
        step=candidate, path=str(self.directory)) from error

  def restore_agreed(self, step: int, abstract: Any, verify: bool,
                     allow_teacher_change: bool):
    """``(RestoredRun, None)`` or ``(None, CheckpointCorruptedError)``.

    With several processes each reads its own shards, so one may fail where
    the others succeed (e.g. a damaged chunk of its shard): the processes
    exchange their outcome before the checksums (a collective) and all take
    the worst one. Errors other than corruption are raised on every process.
    """
    path = self.step_path(step)
    result, error, outcome = None, None, _agreement.OK
    try:
      with _integrity.draining_event_loops():
        result = self.restore_step(step, abstract, allow_teacher_change)
    except CheckpointCorruptedError as e:
      error, outcome = e, _agreement.CORRUPTED
    except Exception as e:  # pylint: disable=broad-except
      if not _agreement.is_multiprocess():
        raise
      error, outcome = e, _agreement.FAILED
    worst = _agreement.worst_outcome(outcome)
    if worst == _agreement.FAILED:
      if outcome == _agreement.FAILED:
        raise error
      raise CheckpointError(
          f"restoring the checkpoint at step {step} ({path}) failed on another "
          "process (see its log).")
    if worst == _agreement.CORRUPTED:
      if error is None:
        error = CheckpointCorruptedError(
            f"the checkpoint at step {step} ({path}) is corrupted or truncated:"
            " another process could not read its part of the state.",
            step=step, path=str(path))
      return None, error
    saved_sums = (self.read_json(step, META_ITEM).get("checksums") if verify
                  else None)
    if saved_sums:
      sums = _integrity.tree_checksums(result.state)  # equal on every process
      bad = sorted(n for n in sums if saved_sums.get(n) != sums[n])
      if bad:
        return None, CheckpointCorruptedError(
            f"the checkpoint at step {step} ({path}) is corrupted: {len(bad)} "
            "leaf/leaves do not match the checksums recorded at save time: "
            f"{bad[:10]}", step=step, path=str(path))
    return result, None

  def restore_step(self, step: int, abstract: Any,
                   allow_teacher_change: bool) -> RestoredRun:
    """Reads one step (this process's shards); the checksums are not checked."""
    path = self.step_path(step)
    where = f"the checkpoint at step {step} ({path})"
    meta = self.read_json(step, META_ITEM)
    saved_fp = meta.get("teacher_fingerprint")
    current_fp = self.teacher_fingerprint
    if saved_fp and current_fp and saved_fp != current_fp:
      if not allow_teacher_change:
        raise TeacherMismatchError(
            f"{where} was trained against teacher {saved_fp[:16]}..., but the "
            f"current teacher is {current_fp[:16]}...; resuming "
            "would mix two teachers. Pass allow_teacher_change=True to resume "
            "anyway.")
      log.warning("%s: resuming with a changed teacher (forced).", where)
    elif saved_fp and not current_fp:
      log.warning("%s: cannot verify the teacher (no teacher given to the "
                  "DistillCheckpointer).", where)
    config = self.read_json(step, CONFIG_ITEM) if meta.get("has_config") else None
    data_state = (self.read_json(step, DATA_ITEM)
                  if meta.get("has_data_state") else None)
    if data_state is not None and PER_PROCESS_KEY in data_state:
      per_process = data_state[PER_PROCESS_KEY]
      if len(per_process) == jax.process_count():
        data_state = per_process[jax.process_index()]

    handler = ocp.PyTreeCheckpointHandler()
    try:
      stored = _integrity.metadata_shapes(
          handler.metadata(path / STATE_ITEM).tree)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorruptedError(
          f"{where} is corrupted or incomplete: its state metadata cannot be "
          f"read ({short_error(e)}).", step=step, path=str(path)) from e
    finally:
      handler.close()
    mismatch = _integrity.describe_mismatch(
        _integrity.flat_with_paths(abstract), stored)
    if mismatch:
      raise StructureMismatchError(
          f"{where} does not match the template state:\n" + "\n".join(mismatch))
    # The item's handler directly, not the manager: the manager's restore ends
    # with a barrier that a process whose read failed would never reach.
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(path / STATE_ITEM,
                              args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorruptedError(
          f"{where} is corrupted or truncated: {short_error(e)}", step=step,
          path=str(path)) from e
    finally:
      handler.close()
    metrics = None if self.metrics_of is None else self.metrics_of(step)
    return RestoredRun(state=state, step=step, config=config,
                       data_state=data_state,
                       metrics=None if metrics is None else dict(metrics),
                       extra=meta.get("extra"))


def quarantine(directory: epath.Path, steps: Sequence[int],
               manager: ocp.CheckpointManager) -> None:
  """Moves ``steps`` to ``<root>/corrupted/``: process 0 moves, all wait."""
  if jax.process_index() == 0:
    _move_aside(directory, steps)
  _agreement.barrier(f"quarantine:{','.join(map(str, steps))}")
  manager.reload()


def _move_aside(directory: epath.Path, steps: Sequence[int]) -> None:
  target_root = directory / QUARANTINE_DIR
  target_root.mkdir(parents=True, exist_ok=True)
  for step in steps:
    src = step_path(directory, step)
    dst = target_root / str(step)
    n = 1
    while dst.exists():
      dst = target_root / f"{step}.{n}"
      n += 1
    src.rename(dst)
    log.warning("moved the corrupted step %d to %s", step, dst)
