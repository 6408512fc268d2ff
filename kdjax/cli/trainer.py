"""The command line's trainer: the phases every training command shares.

A training command (``kdjax train-teacher``/``distill`` for images,
``kdjax lm train-teacher``/``distill`` for language models) builds its own
data, models and objective, then hands a :class:`Job` to :func:`run`, which
reads top to bottom::

  check_run_kind            the run directory holds no run of another kind
  open_checkpointer         kdjax.checkpoint.DistillCheckpointer of the run
  kdjax.train.resume        state, step, data position and metrics window of
                            the newest good checkpoint (fresh: step 0)
  kdjax.train.run_loop      the library's loop (see kdjax/train/_loop.py):
                            metrics summed on the device and fetched every
                            train.log_every steps; eval every
                            train.eval_every steps; a checkpoint every
                            checkpoint.save_every steps; SIGINT/SIGTERM stop
                            at a step boundary after a forced save; tqdm bar.
                            Its hooks (:class:`RunLog`) write metrics.jsonl
                            and TensorBoard
  finish                    summary.json, the closing lines

A run interrupted and run again continues where its last checkpoint left off
and logs the records an uninterrupted run logs (a checkpoint saved inside a
log window carries the window's sums). Whatever fails once :func:`run` has
started (a NaN, a checkpoint that vanished) leaves through
:func:`kdjax.cli.errors.during_run`: a failure during the run, exit status 1;
a corrupt checkpoint found by the resume is one too (its error type says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
from typing import Any, Callable, Mapping, Optional

import optax

from kdjax.cli import runs
from kdjax import train as ktrain
from kdjax.cli import metrics_log as _logging
from kdjax.cli.config import base as _config_base
from kdjax.cli import errors
from kdjax.cli.config.base import ConfigError

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
  meta_path = os.path.join(run_dir, runs.RUN_META)
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
      os.path.join(run_dir, runs.CHECKPOINTS),
      save_every=ck["save_every"] or None, keep_last=ck["keep"],
      async_save=ck["async"], config=_config_base.to_json(config), teacher=teacher,
      teacher_fingerprint=teacher_fingerprint)


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


class RunLog:
  """The loop's hooks of a run: each train record (with the learning rate
  ``lr``) and eval report goes to metrics.jsonl and TensorBoard; the
  evaluations before the last are printed too."""

  def __init__(self, job: Job, start: int):
    self.job = job
    self.logger = _logging.MetricsLogger(job.run_dir, start)
    self.last_train: dict = {}  # as written (step, time, ..., lr)

  def train(self, step: int, record: Mapping[str, float]) -> None:
    self.last_train = self.logger.log(step, "train", {
        **record, "lr": float(self.job.schedule(step - 1))})

  def eval(self, step: int, report: Mapping[str, float]) -> None:
    self.logger.log(step, "eval", report)
    if step < self.job.total:
      line = f"{self.job.tag} step {step}: " + fmt(report)
      if self.job.train_config["progress"]:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        tqdm.write(line, file=sys.stdout)  # above the progress bar
      else:
        print(line, flush=True)

  def close(self) -> None:
    self.logger.close()


def loop_options(job: Job) -> "ktrain.LoopOptions":
  """The :class:`kdjax.train.LoopOptions` of the ``train`` section."""
  tc = job.train_config
  return ktrain.LoopOptions(
      num_steps=job.total, log_every=tc["log_every"],
      eval_every=tc["eval_every"] or 0, batch_size=job.batch_size,
      progress=tc["progress"], description=f"{job.command} {job.method}")


def run(job: Job, ckpt, out: Callable[[str], None] = print) -> int:
  """Resumes ``job`` from ``ckpt``, trains it to ``job.total`` with
  :func:`kdjax.train.run_loop`, writes summary.json; closes ``ckpt``;
  returns the exit status (0, or 130/143 after an interrupt)."""
  try:
    start = ktrain.resume(ckpt, job.state, job.batches)
  except BaseException:
    ckpt.close()
    raise
  with errors.during_run():
    if start.step:
      out(f"{job.tag} resuming {job.run_dir} from step {start.step} "
          f"(checkpoint {ckpt.step_path(start.step)})")
    out(job.describe)
    with contextlib.closing(ckpt):
      log = RunLog(job, start.step)
      try:
        result = ktrain.run_loop(
            job.train_step, start, job.teacher_variables, job.batches,
            loop_options(job), checkpointer=ckpt, evaluate=job.evaluate,
            on_log=log.train, on_eval=log.eval)
        # A run already trained to the end is evaluated, not logged again.
        report = (result.last_eval if result.steps_run
                  else job.evaluate(result.state))
      finally:
        log.close()
    return finish(job, result, log.last_train, report, ckpt, out)


def finish(job: Job, result: "ktrain.LoopResult",
           last_train: Mapping[str, Any], report: Mapping[str, float], ckpt,
           out: Callable[[str], None] = print) -> int:
  """The closing lines and summary.json of a run; returns its exit status."""
  if result.status == "stopped":
    out(f"{job.tag} interrupted at step {result.step}/{job.total}; checkpoint "
        f"saved in {ckpt.directory}. Run the same command again to continue.")
    return EXIT_INTERRUPTED.get(result.signal, errors.EXIT_SIGINT)
  summary_path = os.path.join(job.run_dir, runs.SUMMARY_FILE)
  start, total, wall = result.start_step, job.total, result.wall_s
  if start < total:
    trained = total - start
    first = result.first_step_s
    if trained > 1 and wall > first:
      rate = (f"first step {first:.1f} s with compilation, then "
              f"{(trained - 1) * job.batch_size / (wall - first):,.0f} samples/s")
    else:
      rate = f"{trained * job.batch_size / max(wall, 1e-9):,.0f} samples/s"
    out(f"{job.tag} trained steps {start}..{total} in {wall:.1f} s ({rate}); "
        f"final train loss {last_train.get('loss', float('nan')):.4f}")
    summary = {"command": job.command, "model": job.model,
               "method": job.method, "step": total, "resumed_from": start,
               "wall_s": wall, "first_step_s": first,
               "train": {k: v for k, v in last_train.items()
                         if k != "split"},
               "eval": dict(report)}
  else:
    out(f"{job.tag} {job.run_dir} is already trained to step {start} (of "
        f"{total}).")
    summary = {}
    if os.path.exists(summary_path):
      with open(summary_path) as f:
        summary = json.load(f)
    summary["eval"] = dict(report)
  runs.write_json(summary_path, summary)
  out(f"{job.tag} eval on {job.eval_description}: " + fmt(report))
  out(f"{job.tag} run dir: {job.run_dir}")
  return 0


def fmt(report: Mapping[str, float]) -> str:
  return "  ".join(f"{k} {v:.4f}" for k, v in report.items())
