"""The training loop: resumable, with the metrics kept on the device.

:func:`run_loop` steps ``train_step(state, teacher_variables, batch)`` over
``batches`` and reads top to bottom::

  resume        with a checkpointer: the newest good checkpoint's state, step,
                data position and open metrics window (:func:`resume`)
  each step     the jitted step; its metrics summed on the device
                (:class:`MetricsWindow`), fetched every ``log_every`` steps
                into a train record (``on_log``); ``evaluate`` every
                ``eval_every`` steps (``on_eval``); the checkpointer's
                ``save`` (it decides whether the step is due); a SIGINT or
                SIGTERM stops here after a forced save (:class:`StopRequest`)
  the end       the final record, eval and forced save

Train records are the means of windows ending on multiples of ``log_every``,
whatever the start step, and a checkpoint saved inside a window carries the
window's sums: a run killed (or stopped) and run again logs exactly the
records of an uninterrupted run. :func:`fit` is the loop without a
checkpointer.

``kdjax.train`` imports nothing of ``kdjax.checkpoint``: the checkpointer is
any object with :class:`Checkpointer`'s methods, e.g.
:class:`kdjax.checkpoint.DistillCheckpointer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import (Any, Callable, Iterable, Mapping, NamedTuple, Optional,
                    Protocol, Sequence, Union)

import jax

from kdjax.train._state import DistillState
from kdjax.train._stop import StopRequest
from kdjax.train._window import MetricsWindow

# The key of the open metrics window in a checkpoint's ``extra`` JSON.
WINDOW_KEY = "metrics_window"
FINISHED, STOPPED = "finished", "stopped"

Record = dict[str, float]
LogHook = Callable[[int, Record], None]
Hooks = Union[None, LogHook, Sequence[LogHook]]


class Checkpointer(Protocol):
  """What the loop needs of a checkpointer
  (:class:`kdjax.checkpoint.DistillCheckpointer` has it).

  ``save`` is called after every step and decides itself whether the step
  is due (``force``: save anyway); ``extra`` is a function returning JSON
  kept with the step, called only when the step is saved. ``restore``
  returns an object with ``state``, ``step`` and ``extra``. The loop never
  closes the checkpointer: its owner does (``with DistillCheckpointer(...)
  as ckpt:``), which also waits for an asynchronous last save.
  """

  def latest_step(self) -> Optional[int]:
    ...

  def restore(self, template: Any, *, data_iterator: Any = None,
              fallback: bool = False) -> Any:
    ...

  def save(self, state: Any, *, step: int, data_iterator: Any = None,
           metrics: Optional[Mapping[str, float]] = None,
           extra: Optional[Callable[[], Mapping[str, Any]]] = None,
           force: bool = False) -> bool:
    ...


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """How :func:`run_loop` runs.

  Attributes:
    num_steps: train until the state's step is ``num_steps`` (``None``:
      until ``batches`` runs out).
    log_every: a train record every ``log_every`` steps (and at the end).
    eval_every: call ``evaluate`` every ``eval_every`` steps (``0``: only at
      the end).
    batch_size: examples per step; if set, each train record also holds the
      throughput ``samples_per_s`` (wall clock, so not reproducible; the
      step that compiles is left out).
    progress: show a tqdm progress bar (on stderr).
    description: the progress bar's label.
    handle_signals: a SIGINT/SIGTERM stops the loop at the next step
      boundary, after a forced save (:class:`StopRequest`); a second SIGINT
      aborts. ``False`` leaves the signal handlers alone.
    log_from_start: count the ``log_every`` windows from the step the loop
      starts at (each call logs its own windows: :func:`fit`, e.g. called
      once per epoch) instead of from step 0. Not with a checkpointer: a
      resumed run must keep the absolute grid to log what a straight run logs.
  """
  num_steps: Optional[int] = None
  log_every: int = 100
  eval_every: int = 0
  batch_size: Optional[int] = None
  progress: bool = False
  description: str = "train"
  handle_signals: bool = True
  log_from_start: bool = False

  def __post_init__(self):
    if self.log_every < 1:
      raise ValueError(f"log_every must be >= 1, got {self.log_every}.")
    if self.eval_every < 0:
      raise ValueError(f"eval_every must be >= 0, got {self.eval_every}.")
    if self.num_steps is not None and self.num_steps < 0:
      raise ValueError(f"num_steps must be >= 0, got {self.num_steps}.")


class LoopStart(NamedTuple):
  """Where a loop starts (:func:`resume`): the state, its step and the open
  metrics window (a restored one holds the interrupted run's sums)."""
  state: Any
  step: int
  window: MetricsWindow


@dataclasses.dataclass(frozen=True)
class LoopResult:
  """How :func:`run_loop` ended.

  Attributes:
    state: the final state.
    status: ``"finished"`` (``num_steps`` reached or ``batches`` exhausted)
      or ``"stopped"`` (a SIGINT/SIGTERM; a checkpoint of ``step`` was
      saved).
    signal: the signal number that stopped it (``None`` if finished).
    start_step: the step it started (or resumed) at.
    step: the step it ended at.
    history: ``(step, train record)`` of the records this call logged.
    evals: ``(step, eval report)`` of the evaluations this call ran.
    wall_s: the wall time of the steps (the final eval left out).
    first_step_s: the wall time of the first step (it compiles).
  """
  state: Any
  status: str
  signal: Optional[int]
  start_step: int
  step: int
  history: list[tuple[int, Record]]
  evals: list[tuple[int, Record]]
  wall_s: float
  first_step_s: float

  @property
  def steps_run(self) -> int:
    return self.step - self.start_step

  @property
  def last_train(self) -> Record:
    """The last train record (``{}`` if none)."""
    return self.history[-1][1] if self.history else {}

  @property
  def last_eval(self) -> Record:
    """The last eval report (``{}`` if none)."""
    return self.evals[-1][1] if self.evals else {}


def resume(checkpointer: Optional[Checkpointer], state: Any,
           batches: Any) -> LoopStart:
  """Where a run continues: ``checkpointer``'s newest good step, or ``state``.

  With a checkpoint, its state is restored into ``state``'s structure (the
  template), ``batches`` (a resumable iterator: ``get_state``/``set_state``)
  is moved to the saved position, and the metrics window saved with it comes
  back; a corrupted newest step falls back to an older one
  (``restore(fallback=True)``). Without one (or without a checkpointer) the
  run starts at ``state.step`` (0 for a state without one) with an empty
  window.
  """
  if checkpointer is None or checkpointer.latest_step() is None:
    return LoopStart(state, _step_of(state), MetricsWindow())
  restored = checkpointer.restore(state, data_iterator=batches, fallback=True)
  window = MetricsWindow.from_json((restored.extra or {}).get(WINDOW_KEY))
  return LoopStart(restored.state, int(restored.step), window)


def run_loop(train_step: Callable[[Any, Any, Any], tuple[Any, Mapping]],
             state: Union[Any, LoopStart],
             teacher_variables: Any,
             batches: Iterable,
             options: LoopOptions = LoopOptions(),
             *,
             checkpointer: Optional[Checkpointer] = None,
             evaluate: Optional[Callable[[Any], Mapping[str, float]]] = None,
             on_log: Hooks = None,
             on_eval: Hooks = None) -> LoopResult:
  """Runs ``train_step(state, teacher_variables, batch)`` over ``batches``.

  Args:
    train_step: the (jitted) step; its metrics are a flat ``{name: scalar}``
      of device arrays.
    state: the initial state (with a checkpointer, the restore template: the
      loop first resumes from the newest checkpoint, see :func:`resume`), or
      the :class:`LoopStart` :func:`resume` returned (for a caller that needs
      to know the start step before the loop runs).
    teacher_variables: the step's second argument (``None`` for a step
      without a teacher).
    batches: an iterable of batches; with a checkpointer, a resumable
      iterator (``get_state``/``set_state``, e.g.
      :class:`kdjax.checkpoint.ArrayBatchIterator`).
    options: a :class:`LoopOptions`.
    checkpointer: saves after every step (when due), with the data position
      and the open metrics window; forced on a stop request and at the end.
      ``None``: a plain loop.
    evaluate: ``evaluate(state) -> {name: float}``, run every ``eval_every``
      steps and once at the end (if the call ran a step); a report of a
      saved step goes to ``save(metrics=...)``.
    on_log: ``on_log(step, record)`` (or a sequence of them) for each train
      record: ``{name: mean over the window}`` (plus ``samples_per_s`` with
      ``options.batch_size``).
    on_eval: ``on_eval(step, report)`` (or a sequence of them) for each eval.

  Returns:
    A :class:`LoopResult`.
  """
  if options.log_from_start and checkpointer is not None:
    raise ValueError("LoopOptions(log_from_start=True) cannot be used with "
                     "a checkpointer: a resumed run logs on the absolute "
                     "log_every grid.")
  if checkpointer is not None and not (hasattr(batches, "get_state")
                                       and hasattr(batches, "set_state")):
    raise TypeError(
        "a checkpointed loop needs a resumable batch iterator (get_state/"
        f"set_state, e.g. kdjax.checkpoint.ArrayBatchIterator); got "
        f"{type(batches).__name__}.")
  if not isinstance(state, LoopStart):
    state = resume(checkpointer, state, batches)
  return _Run(train_step, teacher_variables, batches, options, checkpointer,
              evaluate, _as_hooks(on_log), _as_hooks(on_eval), state).run()


def fit(train_step: Callable[[DistillState, Any, Any],
                             tuple[DistillState, Mapping[str, Any]]],
        state: DistillState,
        teacher_variables: Any,
        batches: Iterable,
        *,
        log_every: int = 100,
        on_log: Optional[Callable[[int, dict], None]] = None) -> tuple[DistillState, list]:
  """Runs ``train_step(state, teacher_variables, batch)`` over ``batches``.

  :func:`run_loop` without a checkpointer, evaluation or signal handling.
  ``teacher_variables`` may be ``None`` for a step that needs no teacher (a
  student alone, or an offline cache whose teacher outputs are in the batch).

  Metrics are summed on the device and fetched once every ``log_every`` steps
  (a host sync per step would cost most of a small step's time). Returns the
  final state and the list of ``(step, mean metrics)`` logged.
  """
  result = run_loop(train_step, state, teacher_variables, batches,
                    LoopOptions(log_every=log_every, handle_signals=False,
                                log_from_start=True),
                    on_log=on_log)
  return result.state, result.history


# -----------------------------------------------------------------------------
# The run.
# -----------------------------------------------------------------------------


def _step_of(state: Any) -> int:
  """``state.step`` as an int (0 for a state without one)."""
  step = getattr(state, "step", None)
  return 0 if step is None else int(jax.device_get(step))


def _as_hooks(hooks: Hooks) -> tuple[LogHook, ...]:
  if hooks is None:
    return ()
  return (hooks,) if callable(hooks) else tuple(hooks)


class _Progress:
  """A tqdm bar over the steps, updated when metrics are fetched."""

  def __init__(self, total: Optional[int], initial: int, desc: str,
               enabled: bool):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       dynamic_ncols=True, file=sys.stderr, leave=True)

  def update(self, steps: int, record: Record) -> None:
    if self._bar is not None:
      postfix = {}
      if "loss" in record:
        postfix["loss"] = f"{record['loss']:.4f}"
      if "samples_per_s" in record:
        postfix["samples/s"] = f"{record['samples_per_s']:,.0f}"
      self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(steps)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


class _Run:
  """The mutable bookkeeping of one :func:`run_loop` call."""

  def __init__(self, train_step, teacher_variables, batches,
               options: LoopOptions, checkpointer: Optional[Checkpointer],
               evaluate, on_log, on_eval, start: LoopStart):
    self.train_step, self.teacher_variables = train_step, teacher_variables
    self.batches, self.options = batches, options
    self.checkpointer, self.evaluate_fn = checkpointer, evaluate
    self.on_log, self.on_eval = on_log, on_eval
    self.state, self.start = start.state, start.step
    # A window saved on another log_every grid (the options changed) is
    # dropped: its steps were never part of a record of this grid.
    # The step the log_every grid counts from.
    self.grid_origin = self.start if options.log_from_start else 0
    self.window = start.window
    if self.window.steps != (self.start - self.grid_origin) % options.log_every:
      self.window = MetricsWindow()
    self.history: list = []
    self.evals: list = []
    self.eval_step: Optional[int] = None  # the step of the last eval
    self.progress = _Progress(
        options.num_steps, self.start, options.description,
        options.progress and (options.num_steps is None
                              or self.start < options.num_steps))
    self._t_first = self._t_last = time.perf_counter()
    self._rate_steps = 0  # steps since _t_last (the throughput's numerator)

  def flush(self, step: int) -> None:
    """Fetches the window's sums; logs their means as a train record."""
    record = self.window.means()
    now = time.perf_counter()
    if self.options.batch_size:
      # The steps timed since _t_last: the first step (compilation) is left
      # out of the throughput, unless it is the only step of the record.
      steps = self._rate_steps or 1
      elapsed = now - (self._t_last if self._rate_steps else self._t_first)
      record["samples_per_s"] = (steps * self.options.batch_size
                                 / max(elapsed, 1e-9))
    self.history.append((step, record))
    for hook in self.on_log:
      hook(step, record)
    self.progress.update(self.window.local_steps, record)
    self.window.reset()
    self._t_last, self._rate_steps = now, 0

  def evaluate(self, step: int) -> None:
    """Evaluates the state; reports it at ``step``."""
    report = dict(self.evaluate_fn(self.state))
    self.evals.append((step, report))
    self.eval_step = step
    for hook in self.on_eval:
      hook(step, report)

  def save(self, step: int, force: bool = False) -> None:
    """Saves a checkpoint if due (or ``force``), with the open window (fetched
    only then) and the eval report of ``step`` (if one ran)."""
    if self.checkpointer is None:
      return
    self.checkpointer.save(
        self.state, step=step, data_iterator=self.batches, force=force,
        metrics=self.evals[-1][1] if self.eval_step == step else None,
        extra=lambda: {WINDOW_KEY: self.window.to_json()})

  def run(self) -> LoopResult:
    opts, end = self.options, self.options.num_steps
    status, signum, done, first_step_s = FINISHED, None, self.start, 0.0
    t_start = self._t_first = self._t_last = time.perf_counter()
    try:
      stop = StopRequest() if opts.handle_signals else None
      with stop or contextlib.nullcontext():
        batches = iter(self.batches)
        while end is None or done < end:
          try:
            batch = next(batches)
          except StopIteration:
            break
          self.state, metrics = self.train_step(self.state,
                                                self.teacher_variables, batch)
          self.window.add(metrics)
          done += 1
          self._rate_steps += 1
          if done == self.start + 1:
            jax.block_until_ready(metrics)
            self._t_last = time.perf_counter()
            first_step_s, self._rate_steps = self._t_last - t_start, 0
          if (done - self.grid_origin) % opts.log_every == 0 or done == end:
            self.flush(done)
          if (self.evaluate_fn is not None and opts.eval_every
              and done % opts.eval_every == 0 and done != end):
            self.evaluate(done)
            self._t_last, self._rate_steps = time.perf_counter(), 0
          if done != end:  # the last step is saved after the final eval
            self.save(done)
          if stop is not None and stop.requested:
            # The window's sums go into the checkpoint, not into a record:
            # the resumed run completes the window.
            self.save(done, force=True)
            status, signum = STOPPED, stop.signum
            break
      finished = status == FINISHED and done > self.start
      if finished and self.window.steps:  # batches ran out off the log grid
        self.flush(done)
      self.progress.close()
      wall_s = time.perf_counter() - t_start
      if finished:
        if self.evaluate_fn is not None and self.eval_step != done:
          self.evaluate(done)
        self.save(done, force=True)
    finally:
      self.progress.close()
    return LoopResult(state=self.state, status=status, signal=signum,
                      start_step=self.start, step=done, history=self.history,
                      evals=self.evals, wall_s=wall_s,
                      first_step_s=first_step_s)
