"""The project's Fashion-MNIST teacher: one command trains it and writes its artifact.

::

  python experiments/fashion_mnist_teacher.py            # -> experiments/teacher/
  python experiments/fashion_mnist_teacher.py --out DIR  # elsewhere

The teacher is a batch-norm CNN (``kdjax.models.CNN(channels=(32, 64),
dense=256, batch_norm=True, dropout_rate=0.25)``, 824k parameters) trained on
all 60,000 training images with random crops (2-pixel padding) and horizontal
flips, SGD with Nesterov momentum 0.9, weight decay 5e-4, a one-epoch linear
warm-up to 0.05 and a cosine decay over 20 epochs, batch 128. The recipe was
fixed before training (nothing was chosen on the test set); the test
accuracy is measured once, at the end.

The artifact directory holds

* ``checkpoint/``: the variables (``params`` and ``batch_stats``), an orbax
  checkpoint written by :func:`kdjax.checkpoint.export_student`;
* ``teacher.json``: the recipe (:data:`TEACHER_RECIPE`), the test accuracy,
  the parameter and FLOP counts, the training time, the command, the
  versions, and the variables' fingerprint (``kdjax.checkpoint.tree_fingerprint``).

:func:`load_teacher` restores it, recomputes the fingerprint and refuses an
artifact whose fingerprint or recipe does not match, saying how to rebuild it.
The main job (``fashion_mnist_kd.py``) loads it, or retrains it with
``--retrain-teacher``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import checkpoint
from kdjax import losses
from kdjax import models
from kdjax import train
from kdjax.data import augment
from kdjax.data import load_fashion_mnist_split

EXPERIMENTS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARTIFACT = os.path.join(EXPERIMENTS_DIR, "teacher")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics

# Fixed before training; a change here makes the committed artifact stale
# (load_teacher refuses it and says how to rebuild).
TEACHER_RECIPE = {
    "model": {"arch": "cnn", "channels": [32, 64], "dense": 256,
              "batch_norm": True, "dropout_rate": 0.25},
    "epochs": 20, "batch_size": 128, "optimizer": "sgd_nesterov",
    "momentum": 0.9, "peak_lr": 0.05, "warmup_epochs": 1,
    "schedule": "warmup_cosine", "weight_decay": 5e-4,
    "augment": {"crop_padding": 2, "flip": True},
    "train_examples": 60000, "seed": 0,
}

REBUILD_HINT = ("rebuild it with `python experiments/fashion_mnist_teacher.py` "
                "(or `python experiments/fashion_mnist_kd.py --retrain-teacher`; "
                "about 25 minutes on 2 CPU cores)")


# -----------------------------------------------------------------------------
# Data.
# -----------------------------------------------------------------------------


def load(data_dir: Optional[str] = None) -> dict:
  """``{"train": (x [60000,28,28,1] f32, y i32), "test": (x [10000,...], y)}``, normalised."""
  splits = {}
  for split in ("train", "test"):
    images, labels = load_fashion_mnist_split(split, data_dir)
    images = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[..., None]
    splits[split] = (images, labels.astype(np.int32))
  return splits


def epoch_batches(images, labels, batch_size, rng: np.random.Generator):
  """One epoch of shuffled full batches (the remainder is dropped)."""
  order = rng.permutation(len(labels))
  for i in range(len(order) // batch_size):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {"image": images[idx], "label": labels[idx]}


def eval_batches(images, labels, batch_size=1000):
  for i in range(0, len(labels), batch_size):
    yield {"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}


@jax.jit
def _augment(key, images):
  return augment.augment(key, images, crop_padding=2, flip=True,
                         fill=-MEAN / STD)  # pad with black pixels


def augmented(batches: Iterable[dict], seed: int) -> Iterator[dict]:
  """``batches`` with random crops (2-pixel black padding) and flips, one key a batch."""
  key = jax.random.PRNGKey(seed)
  for i, batch in enumerate(batches):
    yield {**batch, "image": _augment(jax.random.fold_in(key, i),
                                      batch["image"])}


# -----------------------------------------------------------------------------
# Progress bars and counts.
# -----------------------------------------------------------------------------


def progress(iterable: Iterable, total: int, desc: str, *,
             enabled: bool = True):
  """A tqdm bar (ETA, rate) over ``iterable``; ``bar.set_postfix`` shows metrics."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
              disable=not enabled, mininterval=0.5, file=sys.stderr)


def fit_with_progress(step, state, teacher_variables, batches, *, total: int,
                      desc: str, log_every: int = 50, enabled: bool = True,
                      postfix: Callable[[dict], dict] = lambda m: m):
  """``kdjax.train.fit`` with a progress bar whose postfix is the running metrics.

  Metrics stay on the device and are fetched every ``log_every`` steps (as
  ``fit`` does); returns ``(state, history)``.
  """
  bar = progress(batches, total, desc, enabled=enabled)

  def on_log(step_number, means):
    bar.set_postfix({k: f"{v:.4g}" for k, v in postfix(means).items()},
                    refresh=False)

  with contextlib.closing(bar):
    return train.fit(step, state, teacher_variables, bar, log_every=log_every,
                     on_log=on_log)


def param_count(variables) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(variables["params"]))


def flops_per_example(apply, variables, example: np.ndarray) -> float:
  """Forward FLOPs of one example, from XLA's cost analysis of the compiled apply."""
  fn = jax.jit(lambda v, x: apply(v, {"image": x}).logits)
  cost = fn.lower(variables, example[None]).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


# -----------------------------------------------------------------------------
# The teacher.
# -----------------------------------------------------------------------------


def teacher_module(recipe: dict = TEACHER_RECIPE) -> models.CNN:
  m = recipe["model"]
  return models.CNN(channels=tuple(m["channels"]), dense=m["dense"],
                    batch_norm=m["batch_norm"], dropout_rate=m["dropout_rate"],
                    num_classes=10)


def teacher_optimizer(recipe: dict, steps_per_epoch: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, recipe["peak_lr"], recipe["warmup_epochs"] * steps_per_epoch,
      recipe["epochs"] * steps_per_epoch)
  return optax.chain(
      optax.add_decayed_weights(recipe["weight_decay"]),
      optax.sgd(schedule, momentum=recipe["momentum"], nesterov=True))


def accuracy(apply, variables, data: tuple, batch_size: int = 1000) -> float:
  report = train.evaluate(train.make_eval_step(apply), variables, None,
                          eval_batches(*data, batch_size=batch_size))
  return float(report["student_accuracy"])


def smoke_recipe(train_examples: int) -> dict:
  """The recipe, cut to 2 epochs on ``train_examples`` images (smoke runs and tests)."""
  recipe = json.loads(json.dumps(TEACHER_RECIPE))
  recipe.update(epochs=2, train_examples=train_examples)
  return recipe


def train_teacher(data: dict, recipe: dict = TEACHER_RECIPE, *,
                  progress_bars: bool = True) -> tuple[dict, dict]:
  """Trains the teacher by ``recipe`` on the first ``recipe["train_examples"]``
  training images; returns ``(variables, info)`` (``info["state"]`` is the
  final :class:`kdjax.train.DistillState`)."""
  module = teacher_module(recipe)
  apply = models.from_linen(module, train_kwarg="train")
  x, y = data["train"]
  x, y = x[:recipe["train_examples"]], y[:recipe["train_examples"]]
  bs, epochs, seed = recipe["batch_size"], recipe["epochs"], recipe["seed"]
  steps_per_epoch = len(y) // bs
  optimizer = teacher_optimizer(recipe, steps_per_epoch)
  variables = module.init(jax.random.PRNGKey(seed), x[:2])
  state = train.create_state(variables, optimizer, rng=jax.random.PRNGKey(seed))
  ce = losses.compose(
      [losses.Term("ce", losses.label_term(), 1.0, needs_teacher=False)])
  step = train.make_train_step(apply, None, ce, optimizer)
  rng = np.random.default_rng(seed)
  tick = time.perf_counter()
  curve = []
  for epoch in range(epochs):
    batches = augmented(epoch_batches(x, y, bs, rng), seed=1000 * seed + epoch)
    state, history = fit_with_progress(
        step, state, None, batches, total=steps_per_epoch,
        desc=f"teacher epoch {epoch + 1}/{epochs}", enabled=progress_bars,
        postfix=lambda m: {"loss": m["loss"]})
    curve.append({"epoch": epoch + 1,
                  "train_loss": float(np.mean([h["loss"] for _, h in history]))})
  elapsed = time.perf_counter() - tick
  variables = state.student_variables()
  info = {"train_time_s": elapsed, "train_curve": curve, "state": state}
  return variables, info


def write_artifact(directory: str, state, info: dict, data: dict,
                   recipe: dict = TEACHER_RECIPE, command: str = "") -> dict:
  """Writes ``checkpoint/`` and ``teacher.json`` (replacing an old artifact)."""
  module = teacher_module(recipe)
  apply = models.from_linen(module, train_kwarg="train")
  variables = state.student_variables()
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.makedirs(directory)
  checkpoint.export_student(state, os.path.join(directory, "checkpoint"))
  meta = {
      "name": "Fashion-MNIST teacher: BN-CNN conv 32-64, dense 256",
      "recipe": recipe,
      "test_accuracy": accuracy(apply, variables, data["test"]),
      "params": param_count(variables),
      "flops_per_example": flops_per_example(apply, variables,
                                             data["test"][0][0]),
      "train_time_s": info["train_time_s"],
      "train_curve": info["train_curve"],
      "fingerprint": checkpoint.tree_fingerprint(variables),
      "command": command,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "versions": {"jax": jax.__version__, "machine": f"{os.cpu_count()} CPU cores"},
  }
  with open(os.path.join(directory, "teacher.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return meta


class TeacherArtifactError(RuntimeError):
  """The teacher artifact is missing, stale or corrupted (the message says how to rebuild)."""


def load_teacher(directory: str = DEFAULT_ARTIFACT,
                 recipe: dict = TEACHER_RECIPE) -> dict:
  """Restores the artifact and verifies it.

  Returns:
    ``{"module", "apply", "variables", "meta"}``.

  Raises:
    TeacherArtifactError: no artifact, a recipe other than ``recipe``, a
      checkpoint that cannot be read, or variables whose fingerprint differs
      from the one recorded when the artifact was written.
  """
  meta_path = os.path.join(directory, "teacher.json")
  if not os.path.exists(meta_path):
    raise TeacherArtifactError(f"no teacher artifact at {directory}; "
                               + REBUILD_HINT + ".")
  with open(meta_path) as f:
    meta = json.load(f)
  stored = meta.get("recipe") or {}
  if stored != recipe:
    diff = ", ".join(f"{k}: {stored.get(k)!r} (artifact) vs {recipe.get(k)!r}"
                     for k in sorted(set(stored) | set(recipe))
                     if stored.get(k) != recipe.get(k))
    raise TeacherArtifactError(
        f"the teacher artifact at {directory} was trained with another recipe "
        f"than this code's TEACHER_RECIPE ({diff}); " + REBUILD_HINT + ".")
  module = teacher_module(recipe)
  template = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jnp.zeros((2, 28, 28, 1), jnp.float32))
  try:
    variables = checkpoint.restore_teacher(
        os.path.join(directory, "checkpoint"), dict(template))
  except (checkpoint.CheckpointError, FileNotFoundError) as e:
    raise TeacherArtifactError(
        f"the teacher checkpoint in {directory} cannot be restored ({e}); "
        + REBUILD_HINT + ".") from e
  found = checkpoint.tree_fingerprint(variables)
  if found != meta["fingerprint"]:
    raise TeacherArtifactError(
        f"the teacher checkpoint in {directory} has fingerprint {found}, but "
        f"teacher.json records {meta['fingerprint']}: the files were changed "
        "or corrupted; " + REBUILD_HINT + ".")
  apply = models.from_linen(module, train_kwarg="train")
  return {"module": module, "apply": apply, "variables": variables,
          "meta": meta}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=DEFAULT_ARTIFACT,
                 help=f"artifact directory (default {DEFAULT_ARTIFACT}; replaced)")
  p.add_argument("--data-dir", default=None,
                 help="Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)")
  p.add_argument("--epochs", type=int, default=None,
                 help="override the recipe's 20 epochs (a non-default value is "
                 "recorded in the recipe, so the main job will not accept it)")
  p.add_argument("--max-train", type=int, default=0,
                 help="train on the first N images only (smoke tests)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  recipe = json.loads(json.dumps(TEACHER_RECIPE))
  if args.epochs is not None:
    recipe["epochs"] = args.epochs
  if args.max_train:
    recipe["train_examples"] = args.max_train
  data = load(args.data_dir)
  print(f"training the teacher on {recipe['train_examples']:,} images for "
        f"{recipe['epochs']} epochs ...", flush=True)
  _, info = train_teacher(data, recipe, progress_bars=not args.no_progress)
  command = "python experiments/fashion_mnist_teacher.py" + (
      " " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
  meta = write_artifact(args.out, info["state"], info, data, recipe, command)
  print(f"teacher: test accuracy {100 * meta['test_accuracy']:.2f}%, "
        f"{meta['params']:,} params, {meta['flops_per_example'] / 1e6:.1f} "
        f"MFLOP/image, {meta['train_time_s']:.0f} s; artifact {args.out}",
        flush=True)
  return meta


if __name__ == "__main__":
  main()
