"""The command line's trainer: the phases every training command shares.

A training command (``kdjax train-teacher``/``distill`` for images,
``kdjax lm train-teacher``/``distill`` for language models) builds its own
data, models and objective, then hands a :class:`Job` to :func:`run`, which
reads top to bottom::

  check_run_kind            the run directory holds no run of another kind
  open_checkpointer         kdjax.checkpoint.DistillCheckpointer of the run
  resume                    state, step, data position and metrics window of
                            the newest good checkpoint (fresh: step 0)
  TrainingLoop.run          jitted steps; metrics summed on the device and
                            fetched every train.log_every steps
                            (metrics.jsonl, TensorBoard, tqdm bar); eval every
                            train.eval_every steps; a checkpoint every
                            checkpoint.save_every steps; SIGINT/SIGTERM stop
                            at a step boundary after a forced save
  finish                    the final eval, summary.json, the closing lines

A run interrupted and run again continues where its last checkpoint left off
and logs the records an uninterrupted run logs (a checkpoint saved inside a
log window carries the window's sums). Whatever fails once :func:`run` has
started (a NaN, a checkpoint that vanished) leaves through
:func:`kdjax.cli.errors.during_run`: a failure during the run, exit status 1;
a corrupt checkpoint found by the resume is one too (its error type says so).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional

import optax

from kdjax.cli import _logging
from kdjax.cli import _models
from kdjax.cli import config as cfg
from kdjax.cli import errors
from kdjax.cli.config import ConfigError

SUMMARY_FILE = "summary.json"
WINDOW_KEY = "metrics_window"
EXIT_INTERRUPTED = {signal.SIGINT: errors.EXIT_SIGINT,
                    signal.SIGTERM: errors.EXIT_SIGTERM}


# -----------------------------------------------------------------------------
# Optimizer and precision.
# -----------------------------------------------------------------------------


def build_optimizer(opt: Mapping[str, Any], total_steps: int,
                    lr: Optional[float] = None):
  """``(optax transformation, learning-rate schedule)`` of ``optimizer``."""
  lr = opt["lr"] if lr is None else lr
  warmup = min(opt["warmup_steps"], max(total_steps - 1, 0))
  if opt["schedule"] == "cosine":
    if warmup:
      schedule = optax.warmup_cosine_decay_schedule(
          0.0, lr, warmup, max(total_steps, warmup + 1))
    else:
      schedule = optax.cosine_decay_schedule(lr, max(total_steps, 1))
  else:
    schedule = (optax.linear_schedule(0.0, lr, warmup) if warmup
                else optax.constant_schedule(lr))
    if warmup:
      schedule = optax.join_schedules(
          [schedule, optax.constant_schedule(lr)], [warmup])
  if opt["name"] == "adamw":
    tx = optax.adamw(schedule, weight_decay=opt["weight_decay"])
  elif opt["name"] == "adam":
    tx = optax.adam(schedule)
  else:
    tx = optax.sgd(schedule, momentum=opt["momentum"] or None)
  if opt["grad_clip"] is not None:
    tx = optax.chain(optax.clip_by_global_norm(opt["grad_clip"]), tx)
  return tx, schedule


def build_policy(name: str):
  """The :class:`kdjax.train.Policy` of ``train.precision`` (None: float32)."""
  from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
  return {"float32": None, "bf16_teacher": ktrain.Policy.bf16_teacher(),
          "bf16": ktrain.Policy.bf16()}[name]


def finalize(step: Callable, *, checks: bool) -> Callable:
  """``step`` jitted with the state donated; with ``checks`` (``train.checks``)
  checkified first, so that its ``checkify`` checks raise ``ValueError`` /
  ``FloatingPointError`` (``kdjax.train.make_train_step(checks=True)``)."""
  # pylint: disable-next=g-import-not-at-top
  from kdjax.train import compile_step
  return compile_step(step, jit=True, donate=True, checks=checks)


def check_objective(trace: Callable[[], Any], method: str) -> None:
  """Runs ``trace`` (an ``eval_shape`` of the loss on an example batch) and
  turns the ``ValueError`` of a hyper-parameter the loss rejects (e.g. a
  generalised JSD ``beta`` outside ``[0, 1]``) into a ConfigError (exit 2)."""
  try:
    trace()
  except ValueError as e:
    message = " ".join(str(e).split("\n-----")[0].split())
    raise ConfigError(
        f"config key 'distill.hparams' (method {method!r}): the loss rejects "
        f"its hyper-parameters: {message}") from None


# -----------------------------------------------------------------------------
# The run directory and its checkpoints.
# -----------------------------------------------------------------------------


def check_run_kind(run_dir: str, model_key: str, command: str) -> None:
  """A ConfigError if ``run_dir`` holds a run that trained another model."""
  meta_path = os.path.join(run_dir, _models.RUN_META)
  if not os.path.exists(meta_path):
    return
  with open(meta_path) as f:
    previous = json.load(f)
  if previous.get("model") != model_key:
    raise ConfigError(
        f"{run_dir} holds a run that trained the {previous.get('model')} "
        f"(by `kdjax {previous.get('command')}`); give this {command} run "
        "its own directory.")


def open_checkpointer(run_dir: str, config: Mapping[str, Any], *,
                      teacher: Any = None,
                      teacher_fingerprint: Optional[str] = None):
  """The run's :class:`kdjax.checkpoint.DistillCheckpointer` (``checkpoint``
  section; ``teacher`` variables or a fingerprint pin the teacher)."""
  from kdjax import checkpoint as kckpt  # pylint: disable=g-import-not-at-top
  ck = config["checkpoint"]
  return kckpt.DistillCheckpointer(
      os.path.join(run_dir, _models.CHECKPOINTS),
      save_every=ck["save_every"] or None, keep_last=ck["keep"],
      async_save=ck["async"], config=cfg.to_json(config), teacher=teacher,
      teacher_fingerprint=teacher_fingerprint)


def resume(ckpt, state, batches, log_every: int):
  """``(state, step, metrics window)`` of ``ckpt``'s newest good step.

  A fresh run (no checkpoint) gets ``(state, 0, empty window)``; the data
  iterator ``batches`` is moved to the restored position. If the restore
  fails (every step corrupted), ``ckpt`` is closed before the error goes up.
  """
  if ckpt.latest_step() is None:
    return state, 0, _logging.MetricsWindow()
  try:
    restored = ckpt.restore(state, data_iterator=batches, fallback=True)
  except BaseException:
    ckpt.close()
    raise
  return (restored.state, restored.step,
          restored_window(restored.extra, restored.step, log_every))


def restored_window(extra: Optional[Mapping[str, Any]], start: int,
                    log_every: int) -> _logging.MetricsWindow:
  """The metrics window saved with the checkpoint of step ``start``.

  Empty when the checkpoint holds none (saved by an older kdjax) or one that
  does not end at ``start`` on this ``log_every`` grid (the config changed).
  """
  window = _logging.MetricsWindow.from_json((extra or {}).get(WINDOW_KEY))
  if window.steps != start % log_every:
    window.reset()
  return window


# -----------------------------------------------------------------------------
# Interrupts.
# -----------------------------------------------------------------------------


class StopRequest:
  """Turns SIGINT/SIGTERM into a flag the loop checks at each step boundary
  (a second SIGINT aborts at once)."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# The job and the loop.
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Objective:
  """The loss, the initial state and the jitted step of a run."""
  loss_fn: Any
  state: Any
  train_step: Callable
  schedule: Callable
  policy: Any


@dataclasses.dataclass
class Job:
  """What a training command hands to :func:`run`.

  Attributes:
    command: the command's name (``"distill"``, ``"lm distill"``, ...).
    run_dir: the run directory (config.yaml and run.json already written).
    model: ``"teacher"`` or ``"student"`` (summary.json).
    method: the objective's name (summary.json, progress bar).
    state: the fresh :class:`kdjax.train.DistillState` (the restore template).
    train_step: jitted ``step(state, teacher_variables, batch) -> (state,
      metrics)`` (metrics: device scalars, ``"loss"`` among them).
    teacher_variables: the step's second argument.
    batches: the resumable training iterator (``next``, ``get_state``,
      ``set_state``).
    total: the run's optimizer steps.
    batch_size: examples (or sequences) per step, for the throughput.
    schedule: the learning-rate schedule (logged as ``lr``).
    evaluate: ``evaluate(state) -> {name: float}`` on the held-out data.
    train_config: the ``train`` section (log_every, eval_every, progress).
    describe: the line printed when training starts.
    eval_description: what ``evaluate`` measures on (``"1000 test
      examples"``), for the closing line.
  """
  command: str
  run_dir: str
  model: str
  method: str
  state: Any
  train_step: Callable
  teacher_variables: Any
  batches: Any
  total: int
  batch_size: int
  schedule: Callable[[int], Any]
  evaluate: Callable[[Any], dict]
  train_config: Mapping[str, Any]
  describe: str
  eval_description: str

  @property
  def tag(self) -> str:
    return f"[{self.command}]"


@dataclasses.dataclass
class LoopResult:
  """How :class:`TrainingLoop` ended: ``status`` 0 or 130/143, the steps
  ``start..done`` it ran of ``total``, their wall time, the last train record
  and the last eval report."""
  status: int
  start: int
  done: int
  wall: float
  last_train: dict
  report: dict
  first_step_s: float = 0.0  # the first step of this invocation (compiles)


class TrainingLoop:
  """Steps ``job.train_step`` from ``start`` to ``job.total``.

  Train records are the means of windows ending on multiples of
  ``train.log_every`` (whatever the start step, so a resumed run logs the
  same records as an uninterrupted one); a checkpoint is saved when due,
  with the open window's sums.
  """

  def __init__(self, job: Job, ckpt, state, start: int,
               window: _logging.MetricsWindow):
    self.job, self.ckpt, self.state = job, ckpt, state
    self.start, self.window = start, window
    tc = job.train_config
    self.log_every, self.eval_every = tc["log_every"], tc["eval_every"]
    self.logger = _logging.MetricsLogger(job.run_dir, start)
    self.progress = _logging.Progress(job.total, start,
                                      f"{job.command} {job.method}",
                                      tc["progress"] and start < job.total)
    self.last_train: dict = {}
    self._t_last = time.perf_counter()
    self._rate_steps = 0  # steps since _t_last (the throughput's numerator)

  def flush(self, step: int) -> None:
    """Fetches the window's summed metrics; logs their mean."""
    window = self.window
    means = window.means()
    now = time.perf_counter()
    # Steps timed since _t_last: the first step (compilation) is left out of
    # the throughput, unless it is the only step of the record.
    steps = self._rate_steps or 1
    elapsed = now - (self._t_last if self._rate_steps else self._t_first)
    rate = steps * self.job.batch_size / max(elapsed, 1e-9)
    self.last_train = self.logger.log(step, "train", {
        **means, "samples_per_s": rate,
        "lr": float(self.job.schedule(step - 1))})
    self.progress.update(window.local_steps, means["loss"], rate)
    window.reset()
    self._t_last, self._rate_steps = now, 0

  def save(self, step: int, force: bool = False) -> None:
    """Saves a checkpoint if due (or ``force``), with the metrics window
    (fetched only then)."""
    self.ckpt.save(self.state, step=step, data_iterator=self.job.batches,
                   force=force,
                   extra=lambda: {WINDOW_KEY: self.window.to_json()})

  def evaluate(self, step: int) -> dict:
    """Evaluates the current state; logs the report at ``step``."""
    report = self.job.evaluate(self.state)
    self.logger.log(step, "eval", report)
    return report

  def run(self) -> LoopResult:
    """The loop, the final eval and save; closes the checkpointer and logs."""
    job = self.job
    status, done, report = 0, self.start, {}
    t_start = self._t_first = self._t_last = time.perf_counter()
    first_step_s = 0.0
    try:
      with StopRequest() as stop:
        for step in range(self.start, job.total):
          batch = next(job.batches)
          self.state, metrics = job.train_step(self.state,
                                               job.teacher_variables, batch)
          self.window.add(metrics)
          done = step + 1
          self._rate_steps += 1
          if step == self.start:
            import jax  # pylint: disable=g-import-not-at-top
            jax.block_until_ready(metrics)
            self._t_last = time.perf_counter()
            first_step_s, self._rate_steps = self._t_last - t_start, 0
          if done % self.log_every == 0 or done == job.total:
            self.flush(done)
          if (self.eval_every and done % self.eval_every == 0
              and done < job.total):
            report = self.evaluate(done)
            self.progress.write(f"{job.tag} step {done}: " + fmt(report))
            self._t_last, self._rate_steps = time.perf_counter(), 0
          self.save(done)
          if stop.signum is not None:
            # The window's sums go into the checkpoint, not into a record:
            # the resumed run completes the window.
            self.save(done, force=True)
            status = EXIT_INTERRUPTED.get(stop.signum, errors.EXIT_SIGINT)
            break
      self.progress.close()
      wall = time.perf_counter() - t_start
      if not status:
        if self.start < job.total:
          report = self.evaluate(job.total)
          self.save(job.total, force=True)
        else:
          report = job.evaluate(self.state)
    finally:
      self.progress.close()
      try:
        self.ckpt.close()
      finally:
        self.logger.close()
    return LoopResult(status=status, start=self.start, done=done, wall=wall,
                      last_train=self.last_train, report=report,
                      first_step_s=first_step_s)


def run(job: Job, ckpt, out: Callable[[str], None] = print) -> int:
  """Resumes ``job`` from ``ckpt``, trains it to ``job.total``, writes
  summary.json; returns the exit status (0, or 130/143 after an interrupt)."""
  state, start, window = resume(ckpt, job.state, job.batches,
                                job.train_config["log_every"])
  with errors.during_run():
    if start:
      out(f"{job.tag} resuming {job.run_dir} from step {start} (checkpoint "
          f"{ckpt.step_path(start)})")
    out(job.describe)
    result = TrainingLoop(job, ckpt, state, start, window).run()
    return finish(job, result, ckpt, out)


def finish(job: Job, result: LoopResult, ckpt,
           out: Callable[[str], None] = print) -> int:
  """The closing lines and summary.json of a run; returns its exit status."""
  if result.status:
    out(f"{job.tag} interrupted at step {result.done}/{job.total}; checkpoint "
        f"saved in {ckpt.directory}. Run the same command again to continue.")
    return result.status
  summary_path = os.path.join(job.run_dir, SUMMARY_FILE)
  start, total, wall = result.start, job.total, result.wall
  if start < total:
    trained = total - start
    first = result.first_step_s
    if trained > 1 and wall > first:
      rate = (f"first step {first:.1f} s with compilation, then "
              f"{(trained - 1) * job.batch_size / (wall - first):,.0f} samples/s")
    else:
      rate = f"{trained * job.batch_size / max(wall, 1e-9):,.0f} samples/s"
    out(f"{job.tag} trained steps {start}..{total} in {wall:.1f} s ({rate}); "
        f"final train loss {result.last_train.get('loss', float('nan')):.4f}")
    summary = {"command": job.command, "model": job.model,
               "method": job.method, "step": total, "resumed_from": start,
               "wall_s": wall, "first_step_s": result.first_step_s,
               "train": {k: v for k, v in result.last_train.items()
                         if k != "split"},
               "eval": result.report}
  else:
    out(f"{job.tag} {job.run_dir} is already trained to step {start} (of "
        f"{total}).")
    summary = {}
    if os.path.exists(summary_path):
      with open(summary_path) as f:
        summary = json.load(f)
    summary["eval"] = result.report
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  out(f"{job.tag} eval on {job.eval_description}: " + fmt(result.report))
  out(f"{job.tag} run dir: {job.run_dir}")
  return 0


def fmt(report: Mapping[str, float]) -> str:
  return "  ".join(f"{k} {v:.4f}" for k, v in report.items())
