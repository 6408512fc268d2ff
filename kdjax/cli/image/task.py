"""``kdjax train-teacher`` and ``kdjax distill``: the image commands' phases.

:func:`train` reads top to bottom, one phase per function::

  image_data        source (kdjax.data) -> InputPipeline (grain, shuffled by
                    seed, resumable) [-> teacher outputs gathered from the
                    teacher cache, offline]; the run's number of steps
  build_student     the model, its apply function (the features the method
                    reads) and initial variables
  build_objective   the method's loss, the optimizer, the state and the
                    jitted step: augment_batch once (shared by teacher and
                    student) -> kdjax.train's step (teacher frozen);
                    train.checks adds its checkify checks
  write_run         config.yaml and run.json of the run directory
  ImageEvaluator    accuracy (and teacher agreement, KL) on the eval split
  _trainer.run      restore, loop, evaluate, save (shared with ``kdjax lm``,
                    see :mod:`kdjax.cli.trainer`)

On start the run resumes from its newest checkpoint (state, RNG, optimizer,
loss state, data position and the sums of the metrics window it stopped in),
so the same command after an interrupt continues where the last checkpoint
left off and logs the records an uninterrupted run logs; SIGINT/SIGTERM stop
the loop at a step boundary, save a checkpoint (no partial window is logged)
and exit with status 130/143.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.cli import runs
from kdjax.cli.image import data as _data
from kdjax.cli.image import models as _models
from kdjax.cli import trainer as _trainer
from kdjax.cli.config import image as cfg
from kdjax.cli import errors
from kdjax.cli.trainer import Objective
from kdjax.cli.config.base import ConfigError

# Shared with kdjax lm (kept here for the modules that read them from _train).
EXIT_INTERRUPTED = _trainer.EXIT_INTERRUPTED
build_optimizer = _trainer.build_optimizer
build_policy = _trainer.build_policy


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
  if runs.is_run_dir(path):
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
    raise errors.MissingRunError(
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
    raise errors.MissingRunError(
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
# Phases.
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class ImageData:
  """The training data of a run: the source, its image shape, the resumable
  batches (with the cached teacher's outputs for an offline teacher) and the
  run's number of steps."""
  source: Any
  image_shape: tuple
  pipeline: Any
  batches: Any
  total: int
  batch_size: int


def image_data(config: Mapping[str, Any], source, teacher: "Teacher",
               steps: Optional[int], epochs: float) -> ImageData:
  """The data phase: the training source, pipeline and step count."""
  data = config["data"]
  source = source if source is not None else _data.build_source(data, "train")
  pipeline = _data.train_pipeline(data, source, config["seed"])
  batches = (CachedBatches(pipeline, teacher.cache) if teacher.kind == "cache"
             else pipeline)
  total = steps or max(1, math.ceil(epochs * pipeline.steps_per_epoch))
  return ImageData(source=source, image_shape=image_shape_of(source),
                   pipeline=pipeline, batches=batches, total=total,
                   batch_size=data["batch_size"])


@dataclasses.dataclass
class Student:
  """The model being trained: its module, apply function and variables."""
  module: Any
  apply: Callable
  variables: Any


def build_student(config: Mapping[str, Any], model_key: str, spec,
                  image_shape: Sequence[int], key) -> Student:
  """The models phase: ``config[model_key]`` built, initialised and checked
  to produce the features the method reads."""
  module = _models.build_module(config[model_key],
                                config["data"]["num_classes"])
  features = spec.feature_names()
  apply = _models.make_apply(module, features["student"]
                             if spec.recipe == "distill" else ())
  variables = _models.init_variables(module, key, image_shape)
  _check_features(apply, variables, image_shape, model_key, config)
  return Student(module=module, apply=apply, variables=variables)



def build_objective(config: Mapping[str, Any], spec, student: Student,
                    teacher: "Teacher", data: ImageData, lr: Optional[float],
                    keys) -> Objective:
  """The objective phase: the method's loss (its hyper-parameters checked on
  an example batch: a value the loss rejects is a ConfigError), the
  optimizer, the state and the jitted train step."""
  from kdjax import methods  # pylint: disable=g-import-not-at-top
  from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
  k_state, k_loss, k_aug = keys
  loss_fn = methods.build_loss(spec, num_data=len(data.source))
  example = data.batches.batch_at(0)
  teacher_apply = teacher.apply if teacher.kind in ("online", "cache") else None

  def outputs(variables, batch):
    s_out = student.apply(variables, batch, train=False)
    if teacher_apply is not None:
      t_out = ktrain.teacher_forward(teacher_apply, teacher.variables, batch)
    else:
      t_out = s_out if teacher.kind == "ema" else None
    return s_out, t_out

  loss_params, loss_state = {}, {}
  if any(t.init_params or t.init_state for t in loss_fn.terms):
    s_out, t_out = outputs(student.variables, example)
    loss_params = loss_fn.init_params(k_loss, s_out, t_out, example)
    loss_state = loss_fn.init_state(k_loss, s_out, t_out, example)

  def loss_on(variables, batch):
    return loss_fn(*outputs(variables, batch), batch, params=loss_params,
                   state=loss_state, rng=k_loss)

  _trainer.check_objective(
      lambda: jax.eval_shape(loss_on, student.variables, example), spec.name)

  tc = config["train"]
  optimizer, schedule = _trainer.build_optimizer(config["optimizer"],
                                                 data.total, lr)
  policy = _trainer.build_policy(tc["precision"])
  state = ktrain.create_state(student.variables, optimizer, rng=k_state,
                              loss_params=loss_params, loss_state=loss_state,
                              ema=spec.recipe == "mean_teacher", policy=policy)
  step_kwargs = dict(accumulation_steps=tc["accumulation_steps"],
                     policy=policy, checks=tc["checks"],
                     **spec.train_step_kwargs())
  if teacher.kind == "cache":
    from kdjax import cache as kcache  # pylint: disable=g-import-not-at-top
    kcache.check_loss_compatible(teacher.cache, loss_fn)
  raw_step = ktrain.build_step_fn(student.apply, teacher_apply, loss_fn,
                                  optimizer, **step_kwargs)
  train_step = _trainer.finalize(
      _with_augmentation(raw_step, config["data"], k_aug), checks=tc["checks"])
  return Objective(loss_fn=loss_fn, state=state, train_step=train_step,
                   schedule=schedule, policy=policy)


def run_meta(command: str, model_key: str, spec, teacher: "Teacher",
             data: ImageData) -> dict:
  """run.json: what the run trains (read back by eval, export, report)."""
  return {"command": command, "model": model_key, "method": spec.name,
          "teacher_source": teacher.kind,
          "teacher_run": (teacher.path if teacher.kind == "online" else
                          (teacher.cache.manifest.get("teacher_name")
                           if teacher.kind == "cache" else None)),
          "teacher_cache": teacher.path if teacher.kind == "cache" else None,
          "image_shape": list(data.image_shape),
          "num_train_examples": len(data.source),
          "batch_size": data.batch_size, "steps": data.total}


class ImageEvaluator:
  """``evaluate(state)``: the student's accuracy on the eval split (and, with
  an online teacher, the teacher's, their agreement and KL); the eval batches
  are read on first use."""

  def __init__(self, config: Mapping[str, Any], student: Student,
               teacher: "Teacher", policy):
    from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
    self._data = config["data"]
    self.source = _data.build_source(self._data, "eval")
    self._teacher_vars = (teacher.variables if teacher.kind == "online"
                          else None)
    self._step = ktrain.make_eval_step(
        student.apply, teacher.apply if teacher.kind == "online" else None,
        policy=policy)
    self._batches = None

  def __call__(self, state) -> dict:
    from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
    if self._batches is None:
      self._batches = _data.eval_batches(self._data, self.source)
    report = ktrain.evaluate(self._step, state.student_variables(),
                             self._teacher_vars, self._batches)
    report.pop("count")
    return {"accuracy": report.pop("student_accuracy"), **report}


# -----------------------------------------------------------------------------
# The command.
# -----------------------------------------------------------------------------


def train(config: dict, *, command: str, run_dir: str, model_key: str,
          spec, teacher: Optional[Teacher], steps: Optional[int],
          epochs: float, lr: Optional[float],
          source=None, out: Callable[[str], None] = print) -> int:
  """Trains ``config[model_key]`` with ``spec``'s loss; resumes ``run_dir``.

  Returns the exit status (0, or 130/143 after an interrupt).
  """
  if teacher is None:
    teacher = Teacher(kind="ema" if spec.recipe == "mean_teacher" else "none")
  data = image_data(config, source, teacher, steps, epochs)
  _trainer.check_run_kind(run_dir, model_key, command)
  k_init, *keys = jax.random.split(jax.random.PRNGKey(config["seed"]), 4)
  student = build_student(config, model_key, spec, data.image_shape, k_init)
  objective = build_objective(config, spec, student, teacher, data, lr, keys)
  _models.write_run(run_dir, config, run_meta(command, model_key, spec,
                                              teacher, data))
  evaluate = ImageEvaluator(config, student, teacher, objective.policy)
  ckpt = _trainer.open_checkpointer(
      run_dir, config,
      teacher=teacher.variables if teacher.kind == "online" else None,
      teacher_fingerprint=(teacher.cache.fingerprint["teacher"]
                           if teacher.kind == "cache" else None))
  epochs_done = data.total / data.pipeline.steps_per_epoch
  describe = (
      f"[{command}] {model_key} {config[model_key]['arch']} "
      f"({_models.param_count(student.variables):,} params), method "
      f"{spec.name}"
      + (f", teacher {teacher.kind} {teacher.path}" if teacher.path else "")
      + f"; {data.total} steps of {data.batch_size} ({epochs_done:.2f} "
      f"epochs of {len(data.source)} examples); run dir {run_dir}")
  job = _trainer.Job(
      command=command, run_dir=run_dir, model=model_key, method=spec.name,
      state=objective.state, train_step=objective.train_step,
      teacher_variables=(teacher.variables if teacher.kind == "online"
                         else None),
      batches=data.batches, total=data.total, batch_size=data.batch_size,
      schedule=objective.schedule, evaluate=evaluate,
      train_config=config["train"], describe=describe,
      eval_description=(f"{len(evaluate.source)} "
                        f"{config['data']['eval_split']} examples"))
  return _trainer.run(job, ckpt, out)


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
