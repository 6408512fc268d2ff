"""Saving and resuming a distillation run with an orbax ``CheckpointManager``.

One checkpoint step is a directory ``<root>/<step>/`` holding four items,
committed together by one atomic rename (orbax writes to
``<step>.orbax-checkpoint-tmp`` first), so a crash at any moment leaves
either the whole step or nothing:

* ``state``: the :class:`kdjax.train.DistillState` (student params,
  connector/head params of loss terms, optax state, step, RNG, loss-term state
  such as a CRD memory bank, EMA params) as an orbax PyTree;
* ``data_iterator``: the data iterator's ``get_state()`` (JSON);
* ``config``: the run's config (JSON);
* ``meta``: format version, the teacher's fingerprint, one checksum per state
  leaf and user ``extra`` JSON.

Old steps are deleted only after a newer one is committed, so a checkpoint
that was saved is never lost to a crash.

Several processes (``jax.distributed``): every process calls ``save`` and
``restore`` with the same arguments (they are collectives). Orbax writes each
process's shards of the arrays itself; the JSON items are written by process 0
only, inside the same atomic commit, after the processes checked that they
agree on them (the checksums are global sums, equal on every process, see
:func:`kdjax.checkpoint.tree_checksums`; each process's data iterator
position is gathered and kept by process index). On restore the processes
agree on every step's outcome before moving on, and process 0 alone moves a
corrupted step aside while the others wait.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kdjax.checkpoint import _integrity
from kdjax.checkpoint._integrity import CheckpointCorruptedError
from kdjax.checkpoint._integrity import CheckpointError
from kdjax.checkpoint._integrity import StructureMismatchError
from kdjax.checkpoint._integrity import TeacherMismatchError

log = logging.getLogger("kdjax.checkpoint")

FORMAT_VERSION = 1
STATE_ITEM = "state"
DATA_ITEM = "data_iterator"
CONFIG_ITEM = "config"
META_ITEM = "meta"
QUARANTINE_DIR = "corrupted"
_BYTES_KEY = "__kdjax_bytes_b64__"
_PER_PROCESS_KEY = "__kdjax_per_process__"

Shardings = Union[None, jax.sharding.Sharding, Any]


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


def abstract_like(tree: Any, shardings: Shardings = None) -> Any:
  """``jax.ShapeDtypeStruct`` s with shardings, the restore target of ``tree``.

  Args:
    tree: a pytree of arrays or ShapeDtypeStructs (e.g. a freshly built state,
      or ``jax.eval_shape`` of its constructor).
    shardings: ``None`` (each leaf's own ``.sharding``; the first local device
      for leaves without one), one ``jax.sharding.Sharding`` for every leaf
      (e.g. ``NamedSharding(mesh, P())``), or a pytree of shardings matching
      ``tree``.

  Returns:
    The abstract tree, for ``ocp.args.StandardRestore``.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(x, sharding):
    if sharding is None:
      sharding = getattr(x, "sharding", None) or default
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  try:
    return jax.tree.map(one, tree, shardings)
  except ValueError as e:
    raise ValueError("`shardings` must be None, one Sharding, or a pytree "
                     f"matching the template: {e}") from e


def _absolute(directory) -> epath.Path:
  """Local paths made absolute (orbax requires it); URLs kept."""
  text = str(directory)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _jsonable(value: Any, what: str) -> Any:
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what} must be JSON-serialisable: {e}") from e
  return value


def _encode_iterator_state(state: Any) -> dict:
  if isinstance(state, (bytes, bytearray)):  # grain's DataLoader iterators
    return {_BYTES_KEY: base64.b64encode(bytes(state)).decode("ascii")}
  if not isinstance(state, Mapping):
    raise TypeError("data_iterator.get_state() must return a dict or bytes, "
                    f"got {type(state).__name__}.")
  return _jsonable(dict(state), "data_iterator.get_state()")


def _decode_iterator_state(state: Any) -> Any:
  if isinstance(state, Mapping) and set(state) == {_BYTES_KEY}:
    return base64.b64decode(state[_BYTES_KEY])
  return state


def _short(e: BaseException, limit: int = 400) -> str:
  """``"Type: message"`` on one line, without TensorStore's spec dumps."""
  text = " ".join(str(e).split())
  for dump in (" See full TensorStore details", " [tensorstore_spec="):
    text = text.split(dump)[0]
  if len(text) > limit:
    text = text[:limit] + " ..."
  return f"{type(e).__name__}: {text}"


# -----------------------------------------------------------------------------
# Multi-process agreement (no-ops with one process).
# -----------------------------------------------------------------------------


def _multiprocess() -> bool:
  return jax.process_count() > 1


def _allgather_host(value: np.ndarray) -> np.ndarray:
  """``[process_count, *value.shape]``: every process's ``value`` (collective)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def _allgather_text(text: str) -> list[str]:
  """Every process's ``text``, by process index (collective)."""
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = _allgather_host(np.asarray([data.size], np.int32))[:, 0]
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[:data.size] = data
  rows = _allgather_host(padded)
  return [bytes(row[:n]).decode() for row, n in zip(rows, lengths)]


def _barrier(name: str) -> None:
  if _multiprocess():
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"kdjax.checkpoint:{name}")


def _digest_words(value: Any) -> np.ndarray:
  text = json.dumps(value, sort_keys=True, default=str).encode()
  return np.frombuffer(hashlib.sha256(text).digest(), np.uint32).copy()


def _check_processes_agree(value: Any, what: str) -> None:
  """Raises ValueError on every process if ``value`` differs across them."""
  if not _multiprocess():
    return
  rows = _allgather_host(_digest_words(value))
  differ = [i for i in range(rows.shape[0]) if not np.array_equal(rows[i],
                                                                   rows[0])]
  if differ:
    raise ValueError(f"the processes disagree on the {what}: processes "
                     f"{differ} differ from process 0 (pass the same config, "
                     "teacher, extra and step on every process).")


_OK, _CORRUPTED, _FAILED = 0, 1, 2


def _worst_outcome(local: int) -> int:
  """The worst of every process's outcome code (collective)."""
  if not _multiprocess():
    return local
  return int(_allgather_host(np.asarray([local], np.int32)).max())


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
      state, metrics = train_step(state, teacher_variables, next(batches))
      ckpt.save(state, step=step + 1, data_iterator=batches)  # every N steps
    ckpt.save(state, step=num_steps, data_iterator=batches, force=True)
    ckpt.close()                            # waits for the async write

  Args:
    directory: the run's checkpoint root.
    save_every: save when ``step % save_every == 0`` (``0``/``None``: only
      forced saves). ``save(..., force=True)`` saves regardless (end of run).
    keep_last: keep the newest ``keep_last`` steps (``None``: all).
    best_metric: name of an eval metric passed to ``save(metrics=...)``; the
      ``keep_best`` best steps by it are kept besides the newest ones.
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
    if save_every is not None and (int(save_every) != save_every
                                   or save_every < 0):
      raise ValueError(f"save_every must be an int >= 0 or None, got {save_every}.")
    if keep_last is not None and keep_last < 1:
      raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}.")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    if keep_best < 1:
      raise ValueError(f"keep_best must be >= 1, got {keep_best}.")
    if teacher is not None and teacher_fingerprint is not None:
      raise ValueError("pass teacher or teacher_fingerprint, not both.")
    self._config = None if config is None else _jsonable(dict(config), "config")
    self._teacher_fp = (_integrity.tree_fingerprint(teacher)
                        if teacher is not None else teacher_fingerprint)
    self._best_metric = best_metric
    self._best_mode = best_mode
    self._checksums = checksums
    self._directory = _absolute(directory)

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
    options = ocp.CheckpointManagerOptions(
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
    self._manager = ocp.CheckpointManager(self._directory, options=options)

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
    return self._directory / str(step)

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
    if metrics is not None:
      metrics = {str(k): float(v) for k, v in metrics.items()}
      if self._best_metric is not None and self._best_metric not in metrics:
        raise KeyError(f"metrics lack the best_metric {self._best_metric!r}; "
                       f"got {sorted(metrics)}.")
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
      data_state = _encode_iterator_state(data_iterator.get_state())
    if _multiprocess():
      # Each process reads its own part of the data: keep every position.
      _check_processes_agree(data_iterator is not None, "data_iterator")
      if data_state is not None:
        data_state = {_PER_PROCESS_KEY: [
            json.loads(text) for text in _allgather_text(json.dumps(
                data_state, sort_keys=True))]}
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "teacher_fingerprint": self._teacher_fp,
        "checksums": (_integrity.tree_checksums(state)
                      if self._checksums else None),
        "has_data_state": data_state is not None,
        "has_config": self._config is not None,
        "extra": None if extra is None else _jsonable(dict(extra), "extra"),
        "saved_at": time.time(),
    }
    _check_processes_agree(
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
    return self._read_json(step, META_ITEM)

  def _read_json(self, step: int, item: str) -> dict:
    path = self.step_path(step) / item
    try:
      return dict(ocp.JsonCheckpointHandler().restore(path))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorruptedError(
          f"the checkpoint at step {step} ({self.step_path(step)}) is "
          f"corrupted or incomplete: its {item!r} item cannot be read "
          f"({_short(e)}).", step=step, path=str(self.step_path(step))) from e

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
    result, skipped = self._first_restorable(candidates, abstract, verify,
                                             allow_teacher_change, fallback)
    if skipped:
      self._quarantine(skipped)
    if data_iterator is not None:
      if result.data_state is None:
        raise ValueError(
            f"the checkpoint at step {result.step} ({self.step_path(result.step)}) "
            "holds no data iterator state (saved without data_iterator=).")
      if _PER_PROCESS_KEY in result.data_state:
        raise ValueError(
            f"the checkpoint at step {result.step} holds the data positions of "
            f"{len(result.data_state[_PER_PROCESS_KEY])} processes, but this run "
            f"has {jax.process_count()}; restore without data_iterator= and "
            "position the data yourself.")
      data_iterator.set_state(_decode_iterator_state(result.data_state))
    if (self._config is not None and result.config is not None
        and result.config != self._config):
      changed = sorted(k for k in set(self._config) | set(result.config)
                       if self._config.get(k) != result.config.get(k))
      log.warning("resuming step %d with a changed config; keys: %s",
                  result.step, changed)
    return result._replace(skipped_steps=skipped)

  def _first_restorable(self, candidates: Sequence[int], abstract: Any,
                        verify: bool, allow_teacher_change: bool,
                        fallback: bool):
    """``(RestoredRun, skipped steps)``: the newest candidate that restores.

    Each corrupted step but the last is logged once (with the next step
    tried); the last one's error is raised (without ``fallback``: as is),
    naming the others.
    """
    skipped = []
    for i, candidate in enumerate(candidates):
      result, error = self._restore_agreed(candidate, abstract, verify,
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
        f"no restorable checkpoint in {self._directory}: {others}{error}",
        step=candidate, path=str(self._directory)) from error

  def _restore_agreed(self, step: int, abstract: Any, verify: bool,
                      allow_teacher_change: bool):
    """``(RestoredRun, None)`` or ``(None, CheckpointCorruptedError)``.

    With several processes each reads its own shards, so one may fail where
    the others succeed (e.g. a damaged chunk of its shard): the processes
    exchange their outcome before the checksums (a collective) and all take
    the worst one. Errors other than corruption are raised on every process.
    """
    path = self.step_path(step)
    result, error, outcome = None, None, _OK
    try:
      with _integrity.draining_event_loops():
        result = self._restore_step(step, abstract, allow_teacher_change)
    except CheckpointCorruptedError as e:
      error, outcome = e, _CORRUPTED
    except Exception as e:  # pylint: disable=broad-except
      if not _multiprocess():
        raise
      error, outcome = e, _FAILED
    worst = _worst_outcome(outcome)
    if worst == _FAILED:
      if outcome == _FAILED:
        raise error
      raise CheckpointError(
          f"restoring the checkpoint at step {step} ({path}) failed on another "
          "process (see its log).")
    if worst == _CORRUPTED:
      if error is None:
        error = CheckpointCorruptedError(
            f"the checkpoint at step {step} ({path}) is corrupted or truncated:"
            " another process could not read its part of the state.",
            step=step, path=str(path))
      return None, error
    saved_sums = self.read_meta(step).get("checksums") if verify else None
    if saved_sums:
      sums = _integrity.tree_checksums(result.state)  # equal on every process
      bad = sorted(n for n in sums if saved_sums.get(n) != sums[n])
      if bad:
        return None, CheckpointCorruptedError(
            f"the checkpoint at step {step} ({path}) is corrupted: {len(bad)} "
            "leaf/leaves do not match the checksums recorded at save time: "
            f"{bad[:10]}", step=step, path=str(path))
    return result, None

  def _restore_step(self, step: int, abstract: Any,
                    allow_teacher_change: bool) -> RestoredRun:
    """Reads one step (this process's shards); the checksums are not checked."""
    path = self.step_path(step)
    where = f"the checkpoint at step {step} ({path})"
    meta = self._read_json(step, META_ITEM)
    saved_fp = meta.get("teacher_fingerprint")
    if saved_fp and self._teacher_fp and saved_fp != self._teacher_fp:
      if not allow_teacher_change:
        raise TeacherMismatchError(
            f"{where} was trained against teacher {saved_fp[:16]}..., but the "
            f"current teacher is {self._teacher_fp[:16]}...; resuming "
            "would mix two teachers. Pass allow_teacher_change=True to resume "
            "anyway.")
      log.warning("%s: resuming with a changed teacher (forced).", where)
    elif saved_fp and not self._teacher_fp:
      log.warning("%s: cannot verify the teacher (no teacher given to the "
                  "DistillCheckpointer).", where)
    config = self._read_json(step, CONFIG_ITEM) if meta.get("has_config") else None
    data_state = (self._read_json(step, DATA_ITEM)
                  if meta.get("has_data_state") else None)
    if data_state is not None and _PER_PROCESS_KEY in data_state:
      per_process = data_state[_PER_PROCESS_KEY]
      if len(per_process) == jax.process_count():
        data_state = per_process[jax.process_index()]

    handler = ocp.PyTreeCheckpointHandler()
    try:
      stored = _integrity.metadata_shapes(
          handler.metadata(path / STATE_ITEM).tree)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointCorruptedError(
          f"{where} is corrupted or incomplete: its state metadata cannot be "
          f"read ({_short(e)}).", step=step, path=str(path)) from e
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
          f"{where} is corrupted or truncated: {_short(e)}", step=step,
          path=str(path)) from e
    finally:
      handler.close()
    metrics = self._manager.metrics(step) if self._best_metric else None
    return RestoredRun(state=state, step=step, config=config,
                       data_state=data_state,
                       metrics=None if metrics is None else dict(metrics),
                       extra=meta.get("extra"))

  def _quarantine(self, steps: Sequence[int]) -> None:
    """Moves ``steps`` to ``<root>/corrupted/``: process 0 moves, all wait."""
    if jax.process_index() == 0:
      self._move_aside(steps)
    _barrier(f"quarantine:{','.join(map(str, steps))}")
    self._manager.reload()

  def _move_aside(self, steps: Sequence[int]) -> None:
    target_root = self._directory / QUARANTINE_DIR
    target_root.mkdir(parents=True, exist_ok=True)
    for step in steps:
      src = self.step_path(step)
      dst = target_root / str(step)
      n = 1
      while dst.exists():
        dst = target_root / f"{step}.{n}"
        n += 1
      src.rename(dst)
      log.warning("moved the corrupted step %d to %s", step, dst)
