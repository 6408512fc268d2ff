"""Saving and resuming a distillation run with an orbax ``CheckpointManager``.

:class:`DistillCheckpointer` saves one checkpoint step as a directory
``<root>/<step>/`` of four items (the state, the data iterator's position,
the run config and a ``meta`` item with the teacher's fingerprint and
checksums; see :mod:`kdjax.checkpoint._layout`), committed together by one
atomic rename (orbax writes to ``<step>.orbax-checkpoint-tmp`` first), so a
crash at any moment leaves either the whole step or nothing. Which steps are
saved and kept is :mod:`kdjax.checkpoint._policies`; old steps are deleted
only after a newer one is committed, so a checkpoint that was saved is never
lost to a crash. Restoring (checks, fallback to an older step, quarantine of
corrupted ones) is :mod:`kdjax.checkpoint._restore`.

Several processes (``jax.distributed``): every process calls ``save`` and
``restore`` with the same arguments (they are collectives). Orbax writes each
process's shards of the arrays itself; the JSON items are written by process 0
only, inside the same atomic commit, after the processes checked that they
agree on them (the checksums are global sums, equal on every process, see
:func:`kdjax.checkpoint.tree_checksums`; each process's data iterator
position is gathered and kept by process index). On restore the processes
agree on every step's outcome before moving on, and process 0 alone moves a
corrupted step aside while the others wait (:mod:`kdjax.checkpoint._agreement`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Mapping, Optional, Union

import jax
import orbax.checkpoint as ocp
from etils import epath

from kdjax.checkpoint import _agreement
from kdjax.checkpoint import _integrity
from kdjax.checkpoint import _layout
from kdjax.checkpoint import _policies
from kdjax.checkpoint._layout import CONFIG_ITEM
from kdjax.checkpoint._layout import DATA_ITEM
from kdjax.checkpoint._layout import FORMAT_VERSION
from kdjax.checkpoint._layout import META_ITEM
from kdjax.checkpoint._layout import PER_PROCESS_KEY
from kdjax.checkpoint._layout import STATE_ITEM
from kdjax.checkpoint._layout import Shardings
from kdjax.checkpoint._layout import abstract_like
from kdjax.checkpoint import _restore
from kdjax.checkpoint._restore import RestoredRun
from kdjax.checkpoint._restore import StepReader

log = logging.getLogger("kdjax.checkpoint")


class DistillCheckpointer:
  """Checkpoints a distillation run: policies, resume, integrity checks.

  Multi-process runs (``jax.distributed``): every process constructs the
  checkpointer and calls ``save``/``restore`` with the same arguments (they
  run collectives: sharded checksums, an agreement on each restore's outcome,
  barriers around quarantine); process 0 writes the metadata files.

  Example::

    ckpt = DistillCheckpointer(workdir, save_every=1000, keep_last=3,
                               best_metric="student_accuracy",
                               config=config, teacher=teacher_variables)
    state = create_state(...)              # the restore template
    if ckpt.latest_step() is not None:
      state = ckpt.restore(state, data_iterator=batches).state
    for step in range(int(state.step), num_steps):
      state, _ = train_step(state, teacher_variables, next(batches))
      if ckpt.should_save(step + 1):       # every N steps: evaluate, save
        ckpt.save(state, step=step + 1, data_iterator=batches,
                  metrics=evaluate(state))  # {"student_accuracy": ..., ...}
    ckpt.save(state, step=num_steps, data_iterator=batches,
              metrics=evaluate(state), force=True)
    ckpt.close()                            # waits for the async write

  Args:
    directory: the run's checkpoint root.
    save_every: save when ``step % save_every == 0`` (``0``/``None``: only
      forced saves). ``save(..., force=True)`` saves regardless (end of run).
    keep_last: keep the newest ``keep_last`` steps (``None``: all).
    best_metric: name of an eval metric passed to ``save(metrics=...)``; the
      ``keep_best`` best steps by it are kept besides the newest ones. Pass
      ``metrics=`` holding it to every ``save``: a step saved without
      metrics is not ranked, and is kept only while it is among the newest
      ``keep_last``.
    best_mode: ``"max"`` or ``"min"``: which values of ``best_metric`` are
      better.
    keep_best: how many best steps to keep.
    async_save: write in a background thread; ``save`` returns once the
      arrays are copied to host memory, so the step loop (and buffer
      donation) proceeds during the write.
    config: the run's JSON config, saved with every step.
    teacher: the teacher's variables, to fingerprint (see
      :func:`tree_fingerprint`); resuming against another teacher is refused.
    teacher_fingerprint: alternatively, the fingerprint itself.
    checksums: store a per-leaf checksum of the state with every step and
      verify it on restore (detects silently corrupted data chunks). It is
      one jitted integer reduction over the state, in the blocking part of
      ``save``; on CPU it is most of that part (see
      ``benchmarks/bench_checkpoint.py``).
    async_timeout_s: how long a background write may take.
  """

  def __init__(self,
               directory: Union[str, epath.PathLike],
               *,
               save_every: Optional[int] = 1000,
               keep_last: Optional[int] = 3,
               best_metric: Optional[str] = None,
               best_mode: str = "max",
               keep_best: int = 1,
               async_save: bool = True,
               config: Optional[Mapping[str, Any]] = None,
               teacher: Any = None,
               teacher_fingerprint: Optional[str] = None,
               checksums: bool = True,
               async_timeout_s: int = 1200):
    options = _policies.manager_options(
        save_every=save_every, keep_last=keep_last, best_metric=best_metric,
        best_mode=best_mode, keep_best=keep_best, async_save=async_save,
        async_timeout_s=async_timeout_s)
    if teacher is not None and teacher_fingerprint is not None:
      raise ValueError("pass teacher or teacher_fingerprint, not both.")
    self._config = (None if config is None
                    else _layout.jsonable(dict(config), "config"))
    self._teacher_fp = (_integrity.tree_fingerprint(teacher)
                        if teacher is not None else teacher_fingerprint)
    self._best_metric = best_metric
    self._best_mode = best_mode
    self._checksums = checksums
    self._directory = _layout.absolute(directory)
    self._manager = ocp.CheckpointManager(self._directory, options=options)
    self._reader = StepReader(
        self._directory, self._teacher_fp,
        self._manager.metrics if best_metric is not None else None)

  # ---------------------------------------------------------------------------
  # Queries.
  # ---------------------------------------------------------------------------

  @property
  def directory(self) -> epath.Path:
    return self._directory

  @property
  def teacher_fingerprint(self) -> Optional[str]:
    return self._teacher_fp

  @property
  def manager(self) -> ocp.CheckpointManager:
    """The underlying orbax manager (for advanced use)."""
    return self._manager

  def all_steps(self) -> list[int]:
    """The committed steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or ``None``."""
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    """The best step by ``best_metric`` (the latest without one)."""
    return self._manager.best_step()

  def should_save(self, step: int) -> bool:
    """Whether ``save(step=step)`` would write (without ``force``)."""
    return step not in self._manager.all_steps() and self._manager.should_save(
        step)

  def step_path(self, step: int) -> epath.Path:
    """The directory of a committed step."""
    return _layout.step_path(self._directory, step)

  def delete(self, step: int) -> None:
    """Deletes one committed step."""
    self._manager.delete(step)

  # ---------------------------------------------------------------------------
  # Saving.
  # ---------------------------------------------------------------------------

  def save(self,
           state: Any,
           *,
           step: Optional[int] = None,
           data_iterator: Any = None,
           metrics: Optional[Mapping[str, Any]] = None,
           extra: Union[None, Mapping[str, Any],
                        Callable[[], Mapping[str, Any]]] = None,
           force: bool = False) -> bool:
    """Saves ``state`` (and the data position) if the policy says so.

    Call it after every step: it writes when ``step % save_every == 0`` (or
    on a preemption signal), or always with ``force=True`` (end of run).
    With ``async_save`` it returns once the arrays are on the host; a later
    ``save``/``restore``/``close`` waits for the write to commit.

    Args:
      state: a :class:`kdjax.train.DistillState` (any pytree of arrays).
      step: the step number; ``None`` reads ``state.step`` (a device sync:
        pass it in the step loop).
      data_iterator: a :class:`ResumableIterator` positioned after the
        batches that produced ``state``.
      metrics: eval metrics ``{name: number}``; must hold ``best_metric``
        when one was set.
      extra: JSON kept with the step (e.g. the log of losses), or a
        function returning it, called only when the step is saved (for
        values that cost a device fetch).
      force: save even off the ``save_every`` grid.

    Returns:
      Whether a save was started. ``False`` if the policy skipped the step or
      the step is already saved (e.g. re-saving the step a run resumed at).

    Raises:
      ValueError: ``step`` is older than the newest checkpoint (a run must
        continue from the latest step; delete the newer ones to branch).
      KeyError: ``metrics`` lacks ``best_metric``.
    """
    if step is None:
      step = int(_integrity.host_value(state.step))
    step = int(step)
    metrics = _policies.check_metrics(metrics, self._best_metric)
    self._manager.check_for_errors()
    steps = self._manager.all_steps()
    if step in steps:
      return False
    latest = max(steps) if steps else None
    if latest is not None and step < latest:
      raise ValueError(
          f"cannot save step {step}: {self._directory} already holds the newer "
          f"step {latest}. Resume from the latest step, or delete the newer "
          "steps (DistillCheckpointer.delete) to branch from an older one.")
    if not force and not self._manager.should_save(step):
      return False
    if callable(extra):
      extra = extra()
    data_state = None
    if data_iterator is not None:
      data_state = _layout.encode_iterator_state(data_iterator.get_state())
    if _agreement.is_multiprocess():
      # Each process reads its own part of the data: keep every position.
      _agreement.check_processes_agree(data_iterator is not None,
                                       "data_iterator")
      if data_state is not None:
        data_state = {PER_PROCESS_KEY: [
            json.loads(text) for text in _agreement.allgather_text(json.dumps(
                data_state, sort_keys=True))]}
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "teacher_fingerprint": self._teacher_fp,
        "checksums": (_integrity.tree_checksums(state)
                      if self._checksums else None),
        "has_data_state": data_state is not None,
        "has_config": self._config is not None,
        "extra": (None if extra is None
                  else _layout.jsonable(dict(extra), "extra")),
        "saved_at": time.time(),
    }
    _agreement.check_processes_agree(
        {k: v for k, v in meta.items() if k != "saved_at"} | {
            "config": self._config, "data_state": data_state,
            "metrics": metrics}, "checkpoint metadata")
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: ocp.args.JsonSave(data_state or {}),
        CONFIG_ITEM: ocp.args.JsonSave(self._config or {}),
        META_ITEM: ocp.args.JsonSave(meta),
    })
    # The policy was applied above; force skips orbax's second evaluation.
    return bool(self._manager.save(step, args=args, metrics=metrics,
                                   force=True))

  def wait_until_finished(self) -> None:
    """Blocks until a background write has committed (raises its error)."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.close()

  def __enter__(self) -> "DistillCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ---------------------------------------------------------------------------
  # Restoring.
  # ---------------------------------------------------------------------------

  def read_meta(self, step: int) -> dict:
    """The ``meta`` item of a step (fingerprint, checksums, extra)."""
    return self._reader.read_json(step, META_ITEM)

  def restore(self,
              template: Any,
              *,
              step: Optional[int] = None,
              data_iterator: Any = None,
              shardings: Shardings = None,
              fallback: bool = False,
              allow_teacher_change: bool = False,
              verify: bool = True) -> RestoredRun:
    """Restores a step into the template's structure and the wanted layout.

    The arrays are read directly into the target shardings (``shardings``,
    else each template leaf's own), so a state saved on 8 devices restores on
    1 and back.

    Args:
      template: a state of the same structure (e.g. the freshly created one,
        or ``jax.eval_shape`` of its constructor).
      step: the step to restore (default: the latest).
      data_iterator: a :class:`ResumableIterator` to move to the saved
        position.
      shardings: see :func:`abstract_like`.
      fallback: if the step cannot be read or fails its checksums, try the
        next older one; the broken newer steps are moved to
        ``<root>/corrupted/`` so the run can save those steps again.
      allow_teacher_change: resume even if the checkpoint was trained against
        another teacher (fingerprint mismatch).
      verify: check the per-leaf checksums.

    Returns:
      A :class:`RestoredRun`.

    Raises:
      FileNotFoundError: no checkpoint (or no such step).
      CheckpointCorruptedError: the step (with ``fallback``: every candidate)
        is unreadable or fails its checksums; the message names the step and
        its path.
      StructureMismatchError: the checkpoint's leaves differ from the
        template's (listed).
      TeacherMismatchError: the teacher changed and not
        ``allow_teacher_change``.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self._directory}.")
    if step is None:
      candidates = steps[::-1]
    else:
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in "
                                f"{self._directory}; available steps: {steps}.")
      candidates = [s for s in steps[::-1] if s <= step]
    if not fallback:
      candidates = candidates[:1]
    abstract = abstract_like(template, shardings)
    result, skipped = self._reader.first_restorable(
        candidates, abstract, verify, allow_teacher_change, fallback)
    if skipped:
      _restore.quarantine(self._directory, skipped, self._manager)
    if data_iterator is not None:
      if result.data_state is None:
        raise ValueError(
            f"the checkpoint at step {result.step} ({self.step_path(result.step)}) "
            "holds no data iterator state (saved without data_iterator=).")
      if PER_PROCESS_KEY in result.data_state:
        raise ValueError(
            f"the checkpoint at step {result.step} holds the data positions of "
            f"{len(result.data_state[PER_PROCESS_KEY])} processes, but this run "
            f"has {jax.process_count()}; restore without data_iterator= and "
            "position the data yourself.")
      data_iterator.set_state(_layout.decode_iterator_state(result.data_state))
    if (self._config is not None and result.config is not None
        and result.config != self._config):
      changed = sorted(k for k in set(self._config) | set(result.config)
                       if self._config.get(k) != result.config.get(k))
      log.warning("resuming step %d with a changed config; keys: %s",
                  result.step, changed)
    return result._replace(skipped_steps=skipped)
