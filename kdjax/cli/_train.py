"""``kdjax train-teacher`` and ``kdjax distill``: one resumable training loop.

The loop (for either command)::

  source (kdjax.data) -> InputPipeline (grain, shuffled by seed, resumable)
    [-> teacher outputs gathered from the teacher cache, offline]
    -> jitted step: augment_batch once (shared by teacher and student)
                    -> kdjax.train.make_train_step (teacher frozen)
    -> metrics summed on the device, fetched every train.log_every steps
       (metrics.jsonl, TensorBoard, tqdm bar)
    -> DistillCheckpointer.save(state, data position, metrics window) every
       save_every steps

On start the run resumes from its newest checkpoint (state, RNG, optimizer,
loss state, data position and the sums of the metrics window it stopped in),
so the same command after an interrupt continues where the last checkpoint
left off and logs the records an uninterrupted run logs; SIGINT/SIGTERM stop
the loop at a step boundary, save a checkpoint (no partial window is logged)
and exit with status 130/143.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.cli import _data
from kdjax.cli import _logging
from kdjax.cli import _models
from kdjax.cli import config as cfg
from kdjax.cli.config import ConfigError

SUMMARY_FILE = "summary.json"
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


# -----------------------------------------------------------------------------
# Optimizer and precision.
# -----------------------------------------------------------------------------


def build_optimizer(opt: Mapping[str, Any], total_steps: int,
                    lr: Optional[float] = None):
  """``(optax transformation, learning-rate schedule)`` of the ``optimizer`` section."""
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
  from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
  return {"float32": None, "bf16_teacher": ktrain.Policy.bf16_teacher(),
          "bf16": ktrain.Policy.bf16()}[name]


# -----------------------------------------------------------------------------
# The teacher: none, the student's EMA, a teacher run, or a teacher cache.
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Teacher:
  """Where the teacher's outputs come from.

  Attributes:
    kind: ``"none"`` (student alone), ``"ema"`` (mean teacher), ``"online"``
      (a teacher model in memory) or ``"cache"`` (a teacher cache).
    apply: the online teacher's apply function.
    variables: the online teacher's variables.
    cache: the :class:`kdjax.cache.TeacherCache`.
    path: the teacher run / export / cache directory.
    model_config: the teacher's model section.
  """
  kind: str
  apply: Any = None
  variables: Any = None
  cache: Any = None
  path: Optional[str] = None
  model_config: Optional[dict] = None


def image_shape_of(source) -> tuple:
  image = np.asarray(source[0]["image"])
  return tuple(image.shape) if image.ndim == 3 else (*image.shape, 1)


def load_online_teacher(config: Mapping[str, Any], feature_names: Sequence[str],
                        image_shape: Sequence[int]) -> Teacher:
  """The teacher of ``teacher.run_dir`` (a kdjax run, or an export / any orbax
  checkpoint of the configured ``teacher`` model)."""
  path = cfg.teacher_run_dir(config)
  num_classes = config["data"]["num_classes"]
  if _models.is_run_dir(path):
    run = _models.read_run(path)
    if run.num_classes != num_classes:
      raise ConfigError(
          f"the teacher run at {path} has {run.num_classes} classes but "
          f"data.num_classes is {num_classes}.")
    model_config = run.model_config
    module = run.module()
    variables = run.restore_variables()
  elif os.path.exists(path):
    from kdjax import checkpoint  # pylint: disable=g-import-not-at-top
    model_config = dict(config["teacher"])
    module = _models.build_module(model_config, num_classes)
    target = _models.abstract_variables(module, image_shape)
    variables = checkpoint.restore_teacher(path, target)
  else:
    raise FileNotFoundError(
        f"no teacher run at {path}: train one with `kdjax train-teacher "
        "--config ...` (same config), or set teacher.run_dir.")
  apply = _models.make_apply(module, feature_names)
  _check_features(apply, variables, image_shape, "teacher", config)
  return Teacher(kind="online", apply=apply, variables=variables,
                 path=os.path.abspath(path), model_config=model_config)


def _check_features(apply, variables, image_shape, side: str,
                    config: Mapping[str, Any]) -> None:
  """A ConfigError when the method reads a feature the model lacks."""
  batch = {"image": jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)}
  try:
    jax.eval_shape(lambda v, b: apply(v, b, train=False), variables, batch)
  except KeyError as e:
    message = str(e.args[0] if e.args else e).rstrip(".")
    raise ConfigError(
        f"config key 'distill.method' ({config['distill']['method']!r}) reads "
        f"a feature the {side} ({config[side]['arch']}) does not produce: "
        f"{message}. Set the method's student_feature/teacher_feature "
        "(distill.hparams) or change the "
        "model.") from None


def load_cache_teacher(config: Mapping[str, Any], feature_names: Sequence[str],
                       num_examples: int) -> Teacher:
  """The teacher cache of ``cache.dir``, checked against the training data."""
  from kdjax import cache as kcache  # pylint: disable=g-import-not-at-top
  path = cfg.cache_dir(config)
  if not os.path.exists(os.path.join(path, "manifest.json")):
    raise FileNotFoundError(
        f"no teacher cache at {path}: build it with `kdjax cache-teacher "
        "--config ...` (same config), or set cache.dir.")
  tc = kcache.open_teacher_cache(
      path, dataset_fingerprint=_data.dataset_name(config["data"], "train"))
  missing = [n for n in feature_names if n not in tc.feature_names]
  if missing:
    raise ConfigError(
        f"config key 'distill.method' ({config['distill']['method']!r}) reads "
        f"teacher feature(s) {missing}, which the teacher cache at {path} does "
        f"not hold (it holds {list(tc.feature_names)}); rebuild it with "
        "`kdjax cache-teacher` and the same distill.method.")
  arrays = tc.load()
  index = arrays.get("example/index")
  if (tc.num_examples != num_examples or index is None
      or not np.array_equal(index, np.arange(num_examples))):
    raise kcache.CacheMismatchError(
        f"the teacher cache at {path} holds {tc.num_examples} examples in "
        f"another order than the {num_examples} training examples; rebuild "
        "it with `kdjax cache-teacher`.")
  return Teacher(kind="cache", cache=tc, path=os.path.abspath(path),
                 apply=tc.teacher_apply())


class CachedBatches:
  """The training pipeline's batches plus the cached teacher outputs.

  ``batch["teacher"]`` holds the cache's rows ``batch["index"]``, so the
  batches (and their order) are exactly those of the online run; the
  position is the pipeline's.
  """

  def __init__(self, pipeline, cache):
    self._pipeline = pipeline
    self._cache = cache
    self._labels = cache.load(example_major=True)["example/label"]

  def _attach(self, batch: dict) -> dict:
    rows = batch["index"]
    if not np.array_equal(self._labels[rows], batch["label"]):
      from kdjax.cache import CacheMismatchError  # pylint: disable=g-import-not-at-top
      raise CacheMismatchError(
          "the teacher cache's labels differ from the training data's: the "
          "cache was built from other data; rebuild it.")
    # take() returns the teacher's own layout (e.g. an ensemble's [M, B, C]).
    return {**batch, "teacher": self._cache.take(rows)["teacher"]}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return self._attach(next(self._pipeline))

  def batch_at(self, step: int) -> dict:
    return self._attach(self._pipeline.batch_at(step))

  def get_state(self) -> dict:
    return self._pipeline.get_state()

  def set_state(self, state) -> None:
    self._pipeline.set_state(state)

  @property
  def steps_per_epoch(self) -> int:
    return self._pipeline.steps_per_epoch


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


WINDOW_KEY = "metrics_window"


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
# The loop.
# -----------------------------------------------------------------------------


def train(config: dict, *, command: str, run_dir: str, model_key: str,
          spec, teacher: Optional[Teacher], steps: Optional[int],
          epochs: float, lr: Optional[float],
          source=None, out: Callable[[str], None] = print) -> int:
  """Trains ``config[model_key]`` with ``spec``'s loss; resumes from ``run_dir``.

  Returns the exit status (0, or 130/143 after an interrupt).
  """
  from kdjax import checkpoint as kckpt  # pylint: disable=g-import-not-at-top
  from kdjax import methods  # pylint: disable=g-import-not-at-top
  from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
  tag = f"[{command}]"
  data = config["data"]
  seed = config["seed"]
  num_classes = data["num_classes"]

  train_source = source if source is not None else _data.build_source(data,
                                                                      "train")
  image_shape = image_shape_of(train_source)
  pipeline = _data.train_pipeline(data, train_source, seed)
  if teacher is None:
    teacher = Teacher(kind="ema" if spec.recipe == "mean_teacher" else "none")
  batches = (CachedBatches(pipeline, teacher.cache) if teacher.kind == "cache"
             else pipeline)
  total = steps or max(1, math.ceil(epochs * pipeline.steps_per_epoch))
  batch_size = data["batch_size"]

  # Existing run of another kind?
  meta_path = os.path.join(run_dir, _models.RUN_META)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      previous = json.load(f)
    if previous.get("model") != model_key:
      raise ConfigError(
          f"{run_dir} holds a run that trained the {previous.get('model')} "
          f"(by `kdjax {previous.get('command')}`); give this {command} run "
          "its own directory.")

  # Models and loss.
  module = _models.build_module(config[model_key], num_classes)
  features = spec.feature_names()
  student_apply = _models.make_apply(module, features["student"]
                                     if spec.recipe == "distill" else ())
  k_init, k_state, k_loss, k_aug = jax.random.split(jax.random.PRNGKey(seed), 4)
  variables = _models.init_variables(module, k_init, image_shape)
  _check_features(student_apply, variables, image_shape, model_key, config)
  loss_fn = methods.build_loss(spec, num_data=len(train_source))
  example = batches.batch_at(0)
  loss_params, loss_state = {}, {}
  if any(t.init_params or t.init_state for t in loss_fn.terms):
    s_out = student_apply(variables, example, train=False)
    if teacher.kind in ("online", "cache"):
      t_out = ktrain.teacher_forward(teacher.apply, teacher.variables, example)
    else:
      t_out = s_out if teacher.kind == "ema" else None
    loss_params = loss_fn.init_params(k_loss, s_out, t_out, example)
    loss_state = loss_fn.init_state(k_loss, s_out, t_out, example)

  optimizer, schedule = build_optimizer(config["optimizer"], total, lr)
  policy = build_policy(config["train"]["precision"])
  state = ktrain.create_state(variables, optimizer, rng=k_state,
                              loss_params=loss_params, loss_state=loss_state,
                              ema=spec.recipe == "mean_teacher", policy=policy)
  step_kwargs = dict(jit=False,
                     accumulation_steps=config["train"]["accumulation_steps"],
                     policy=policy, **spec.train_step_kwargs())
  if teacher.kind == "cache":
    from kdjax import cache as kcache  # pylint: disable=g-import-not-at-top
    raw_step = kcache.make_cached_train_step(student_apply, teacher.cache,
                                             loss_fn, optimizer, **step_kwargs)
  else:
    raw_step = ktrain.make_train_step(
        student_apply, teacher.apply if teacher.kind == "online" else None,
        loss_fn, optimizer, **step_kwargs)
  train_step = jax.jit(_with_augmentation(raw_step, data, k_aug),
                       donate_argnums=(0,))
  teacher_vars = teacher.variables if teacher.kind == "online" else None

  # Run directory, checkpoints, resume.
  meta = {"command": command, "model": model_key, "method": spec.name,
          "teacher_source": teacher.kind,
          "teacher_run": (teacher.path if teacher.kind == "online" else
                          (teacher.cache.manifest.get("teacher_name")
                           if teacher.kind == "cache" else None)),
          "teacher_cache": teacher.path if teacher.kind == "cache" else None,
          "image_shape": list(image_shape),
          "num_train_examples": len(train_source), "batch_size": batch_size,
          "steps": total}
  _models.write_run(run_dir, config, meta)
  eval_source = _data.build_source(data, "eval")
  ck = config["checkpoint"]
  fingerprint = None
  if teacher.kind == "cache":
    fingerprint = teacher.cache.fingerprint["teacher"]
  ckpt = kckpt.DistillCheckpointer(
      os.path.join(run_dir, _models.CHECKPOINTS),
      save_every=ck["save_every"] or None, keep_last=ck["keep"],
      async_save=ck["async"], config=cfg.to_json(config),
      teacher=teacher_vars, teacher_fingerprint=fingerprint)
  tc = config["train"]
  state, start, window = resume(ckpt, state, batches, tc["log_every"])
  if start:
    out(f"{tag} resuming {run_dir} from step {start} (checkpoint "
        f"{ckpt.step_path(start)})")
  epochs_done = total / pipeline.steps_per_epoch
  out(f"{tag} {model_key} {config[model_key]['arch']} "
      f"({_models.param_count(variables):,} params), method {spec.name}"
      + (f", teacher {teacher.kind} {teacher.path}" if teacher.path else "")
      + f"; {total} steps of {batch_size} ({epochs_done:.2f} epochs of "
      f"{len(train_source)} examples); run dir {run_dir}")

  # Evaluation.
  eval_data = None
  eval_step = ktrain.make_eval_step(
      student_apply, teacher.apply if teacher.kind == "online" else None,
      policy=policy)

  def evaluate(current) -> dict:
    nonlocal eval_data
    if eval_data is None:
      eval_data = _data.eval_batches(data, eval_source)
    report = ktrain.evaluate(eval_step, current.student_variables(),
                             teacher_vars, eval_data)
    report.pop("count")
    return {"accuracy": report.pop("student_accuracy"), **report}

  logger = _logging.MetricsLogger(run_dir, start)
  progress = _logging.Progress(total, start, f"{command} {spec.name}",
                               tc["progress"] and start < total)
  status = 0
  done = start
  t_start = t_last = time.perf_counter()
  last_train: dict = {}
  report: dict = {}

  def flush(step: int) -> None:
    """Fetches the window's summed metrics; logs their mean."""
    nonlocal t_last, last_train
    means = window.means()
    now = time.perf_counter()
    rate = window.local_steps * batch_size / max(now - t_last, 1e-9)
    last_train = logger.log(step, "train", {
        **means, "samples_per_s": rate, "lr": float(schedule(step - 1))})
    progress.update(window.local_steps, means["loss"], rate)
    window.reset()
    t_last = now

  def save(step: int, force: bool = False) -> None:
    """Saves a checkpoint if due (or ``force``), with the metrics window
    (fetched only then)."""
    ckpt.save(state, step=step, data_iterator=batches, force=force,
              extra=lambda: {WINDOW_KEY: window.to_json()})

  try:
    with StopRequest() as stop:
      for step in range(start, total):
        batch = next(batches)
        state, metrics = train_step(state, teacher_vars, batch)
        window.add(metrics)
        done = step + 1
        # Windows end on multiples of log_every (whatever the start step), so
        # a resumed run logs the same records as an uninterrupted one.
        if done % tc["log_every"] == 0 or done == total:
          flush(done)
        if tc["eval_every"] and done % tc["eval_every"] == 0 and done < total:
          report = evaluate(state)
          logger.log(done, "eval", report)
          progress.write(f"{tag} step {done}: " + _fmt(report))
          t_last = time.perf_counter()
        save(done)
        if stop.signum is not None:
          # The window's sums go into the checkpoint, not into a record: the
          # resumed run completes the window.
          save(done, force=True)
          status = EXIT_INTERRUPTED.get(stop.signum, 130)
          break
    progress.close()
    wall = time.perf_counter() - t_start
    if not status:
      report = evaluate(state)
      if start < total:
        logger.log(total, "eval", report)
        save(total, force=True)
  finally:
    progress.close()
    try:
      ckpt.close()
    finally:
      logger.close()
  if status:
    out(f"{tag} interrupted at step {done}/{total}; checkpoint saved in "
        f"{ckpt.directory}. Run the same command again to continue.")
    return status

  summary_path = os.path.join(run_dir, SUMMARY_FILE)
  if start < total:
    trained = total - start
    out(f"{tag} trained steps {start}..{total} in {wall:.1f} s "
        f"({trained * batch_size / max(wall, 1e-9):,.0f} samples/s); final "
        f"train loss {last_train.get('loss', float('nan')):.4f}")
    summary = {"command": command, "model": model_key, "method": spec.name,
               "step": total, "resumed_from": start, "wall_s": wall,
               "train": {k: v for k, v in last_train.items() if k != "split"},
               "eval": report}
  else:
    out(f"{tag} {run_dir} is already trained to step {start} (of {total}).")
    summary = {}
    if os.path.exists(summary_path):
      with open(summary_path) as f:
        summary = json.load(f)
    summary["eval"] = report
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  out(f"{tag} eval on {len(eval_source)} {data['eval_split']} examples: "
      + _fmt(report))
  out(f"{tag} run dir: {run_dir}")
  return 0


def _fmt(report: Mapping[str, float]) -> str:
  return "  ".join(f"{k} {v:.4f}" for k, v in report.items())


def _with_augmentation(step, data: Mapping[str, Any], key):
  """``step`` with :func:`kdjax.data.augment_batch` applied first (one view,
  shared by teacher and student; its key is ``fold_in(key, state.step)``, so a
  resumed run draws the same augmentations)."""
  aug = data["augment"]
  if not aug["enabled"]:
    return step
  from kdjax.data import augment_batch  # pylint: disable=g-import-not-at-top
  fill = -data["mean"] / data["std"]  # a black pixel, normalised

  def augmented(state, teacher_variables, batch):
    batch = augment_batch(jax.random.fold_in(key, state.step), batch,
                          crop_padding=aug["crop_padding"], flip=aug["flip"],
                          mixup_alpha=aug["mixup_alpha"], fill=fill)
    return step(state, teacher_variables, batch)

  return augmented
