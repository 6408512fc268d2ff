"""Models of the command line and reading them back from run directories.

A run directory holds::

  config.yaml     the resolved config of the run
  run.json        what was trained: {"command", "model": "teacher"|"student",
                  "method", "teacher_run", "teacher_cache", "image_shape"}
  checkpoints/    kdjax.checkpoint.DistillCheckpointer steps
  metrics.jsonl   one JSON record per log / eval
  tb/             TensorBoard event files
  eval.json       written by ``kdjax eval``
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

RUN_META = "run.json"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"


def build_module(model: Mapping[str, Any], num_classes: int):
  """The linen module of a ``teacher``/``student`` config section."""
  from kdjax import models  # pylint: disable=g-import-not-at-top
  if model["arch"] == "cnn":
    return models.CNN(channels=tuple(model["channels"]), dense=model["dense"],
                      num_classes=num_classes, dropout_rate=model["dropout"])
  return models.MLP(hidden=tuple(model["hidden"]), num_classes=num_classes,
                    dropout_rate=model["dropout"])


def make_apply(module, feature_names: Sequence[str] = ()):
  """``kdjax.models.from_linen`` with the reference models' train flag."""
  from kdjax import models  # pylint: disable=g-import-not-at-top
  return models.from_linen(module, feature_names=tuple(feature_names),
                           train_kwarg="train")


def _strip(variables: Mapping[str, Any]) -> dict:
  # Values sown during init are not variables of the model.
  return {k: v for k, v in variables.items() if k != "intermediates"}


def init_variables(module, rng, image_shape: Sequence[int]) -> dict:
  """``module.init`` on one zero image of ``image_shape`` ([H, W, C])."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  return _strip(module.init(rng, x, train=False))


def abstract_variables(module, image_shape: Sequence[int]) -> dict:
  """The variables' shapes and dtypes, without computing them."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return _strip(jax.eval_shape(
      lambda r, v: module.init(r, v, train=False), jax.random.PRNGKey(0), x))


def param_count(variables: Mapping[str, Any]) -> int:
  """Number of trainable parameters (``variables["params"]``)."""
  return int(sum(np.prod(np.shape(x)) for x in
                 jax.tree.leaves(variables["params"])))


@dataclasses.dataclass
class Run:
  """A run directory read back: its config, what it trained, its model."""
  path: str
  config: dict
  meta: dict

  @property
  def model_config(self) -> dict:
    return self.config[self.meta.get("model", "student")]

  @property
  def num_classes(self) -> int:
    return self.config["data"]["num_classes"]

  @property
  def image_shape(self) -> tuple:
    return tuple(self.meta["image_shape"])

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.path, CHECKPOINTS)

  def module(self):
    return build_module(self.model_config, self.num_classes)

  def latest_step(self) -> Optional[int]:
    steps = _steps(self.checkpoint_dir)
    return steps[-1] if steps else None

  def restore_variables(self, shardings: Any = None) -> dict:
    """The trained model's variables (latest checkpoint), read-only."""
    from kdjax import checkpoint  # pylint: disable=g-import-not-at-top
    if self.latest_step() is None:
      raise FileNotFoundError(
          f"the run at {self.path} has no checkpoint yet (in "
          f"{self.checkpoint_dir}); train it first.")
    target = abstract_variables(self.module(), self.image_shape)
    return checkpoint.restore_teacher(self.checkpoint_dir, target,
                                      shardings=shardings)


def _steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def is_run_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, RUN_META))


def read_run(path: str) -> Run:
  """Reads ``path``'s config.yaml and run.json.

  Raises:
    FileNotFoundError: ``path`` is not a kdjax run directory.
  """
  from kdjax.cli import config as cfg  # pylint: disable=g-import-not-at-top
  meta_path = os.path.join(path, RUN_META)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f"{path} is not a kdjax run directory (no {RUN_META}); runs are "
        "written by `kdjax train-teacher` and `kdjax distill`.")
  with open(meta_path) as f:
    meta = json.load(f)
  # The saved config is complete and valid; load_config re-checks it.
  config = cfg.load_config([os.path.join(path, CONFIG_FILE)])
  return Run(path=path, config=config, meta=meta)


def write_run(path: str, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """Writes config.yaml and run.json (atomically)."""
  from kdjax.cli import config as cfg  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  for name, text in ((CONFIG_FILE, cfg.dump(config)),
                     (RUN_META, json.dumps(dict(meta), indent=1))):
    tmp = os.path.join(path, name + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(path, name))
