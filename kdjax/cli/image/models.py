"""Models of the command line and reading them back from run directories.

A run directory holds::

  config.yaml     the resolved config of the run (data.num_classes, mean and
                  std filled from the data)
  run.json        what was trained: {"command", "model": "teacher"|"student",
                  "method", "teacher_run", "teacher_cache", "image_shape"}
  checkpoints/    kdjax.checkpoint.DistillCheckpointer steps
  metrics.jsonl   one JSON record per log / eval
  tb/             TensorBoard event files
  eval.json       written by ``kdjax eval``
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.cli import errors
from kdjax.cli import runs
from kdjax.cli.image.arch import import_arch
from kdjax.cli.config.base import ConfigError



def _parameters(fn) -> dict:
  try:
    return dict(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return {}


@dataclasses.dataclass(frozen=True)
class UserModel:
  """A user's module class, built for the data by :func:`make_apply` and
  :func:`init_variables`.

  Linen modules are built at once (they infer input shapes); NNX modules
  create their parameters eagerly, so they are built once the image shape is
  known: ``input_shape`` ([H, W, C]) and ``rngs`` are passed when the
  constructor takes them; ``num_classes`` for either when it takes one and
  ``kwargs`` do not set it.
  """
  arch: str
  cls: type
  kind: str
  kwargs: Mapping[str, Any]
  num_classes: int

  def _kwargs(self, **extra) -> dict:
    init = self.cls if self.kind == "linen" else self.cls.__init__
    out = dict(self.kwargs)
    for name, value in {"num_classes": self.num_classes, **extra}.items():
      if name not in out and name in _parameters(init):
        out[name] = value
    return out

  def linen(self):
    """The linen module (``kind == "linen"``)."""
    return _construct(self.arch, self.cls, self._kwargs())

  def nnx(self, image_shape: Sequence[int], rngs):
    """The NNX module for images ``[H, W, C]`` (``kind == "nnx"``)."""
    return _construct(self.arch, self.cls, self._kwargs(
        input_shape=tuple(int(d) for d in image_shape), rngs=rngs))

  def abstract_nnx(self, image_shape: Sequence[int]):
    """The NNX module's structure, its arrays as shapes only."""
    from flax import nnx  # pylint: disable=g-import-not-at-top
    return nnx.eval_shape(lambda: self.nnx(image_shape, nnx.Rngs(0)))


def _construct(arch: str, cls: type, kwargs: Mapping[str, Any]):
  try:
    return cls(**kwargs)
  except TypeError as e:
    given = {k: v for k, v in kwargs.items() if k != "rngs"}
    raise ConfigError(
        f"{arch} does not take the arguments {given} (kwargs of its model "
        f"section plus num_classes / input_shape / rngs where its "
        f"constructor names them): {e}") from None


def build_module(model: Mapping[str, Any], num_classes: int):
  """The module of a ``teacher``/``student`` config section: a linen module
  (cnn, mlp) or a :class:`UserModel` (a user's linen or NNX class)."""
  from kdjax import models  # pylint: disable=g-import-not-at-top
  kwargs = dict(model.get("kwargs") or {})
  arch = model["arch"]
  if arch == "cnn":
    return _construct("cnn", models.CNN, {
        "channels": tuple(model["channels"]), "dense": model["dense"],
        "num_classes": num_classes, "dropout_rate": model["dropout"],
        **kwargs})
  if arch == "mlp":
    return _construct("mlp", models.MLP, {
        "hidden": tuple(model["hidden"]), "num_classes": num_classes,
        "dropout_rate": model["dropout"], **kwargs})
  cls, kind = import_arch(arch)
  user = UserModel(arch=arch, cls=cls, kind=kind, kwargs=kwargs,
                   num_classes=num_classes)
  if kind == "linen":
    user.linen()  # its arguments are checked now
  return user


def make_apply(module, feature_names: Sequence[str] = ()):
  """The model's apply function: ``kdjax.models.from_linen`` (with the
  ``train`` flag where ``__call__`` takes one) or, for an NNX
  :class:`UserModel`, ``kdjax.models.from_nnx`` of the module built for the
  batch's image shape."""
  from kdjax import models  # pylint: disable=g-import-not-at-top
  names = tuple(feature_names)
  if isinstance(module, UserModel) and module.kind == "linen":
    module = module.linen()
  if not isinstance(module, UserModel):
    train = "train" if "train" in _parameters(module.__call__) else None
    return models.from_linen(module, feature_names=names, train_kwarg=train)
  applies = {}

  def apply(variables, batch, *, train: bool = False, rng=None):
    shape = tuple(batch["image"].shape[1:])
    if shape not in applies:
      applies[shape] = models.from_nnx(module.abstract_nnx(shape),
                                       feature_names=names)[0]
    return applies[shape](variables, batch, train=train, rng=rng)

  return apply


def _strip(variables: Mapping[str, Any]) -> dict:
  # Values sown during init are not variables of the model.
  return {k: v for k, v in variables.items() if k != "intermediates"}


def _check_image_size(module, image_shape: Sequence[int]) -> None:
  from kdjax import models  # pylint: disable=g-import-not-at-top
  if not isinstance(module, models.CNN):
    return
  blocks = len(module.channels)
  if 2 ** blocks > min(image_shape[:2]):
    raise ConfigError(
        f"a cnn with {blocks} conv blocks (channels {list(module.channels)}) "
        f"halves the image {blocks} times: too many for "
        f"{image_shape[0]}x{image_shape[1]} images; list fewer channels.")


def _init_kwargs(module) -> dict:
  return {"train": False} if "train" in _parameters(module.__call__) else {}


def _check_logits(module: "UserModel", logits_shape) -> None:
  if logits_shape[-1] == module.num_classes:
    return
  raise ConfigError(
      f"{module.arch} returns logits of shape {tuple(logits_shape)} but the "
      f"data have {module.num_classes} classes: give its constructor a "
      "num_classes argument (kdjax passes it) or set it in the model's "
      "kwargs.")


def init_variables(module, rng, image_shape: Sequence[int]) -> dict:
  """The initial variables for images of ``image_shape`` ([H, W, C]).

  Raises:
    ConfigError: a cnn with too many blocks for the images, or a user's
      model whose logits do not have the data's number of classes.
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  if not isinstance(module, UserModel):  # cnn, mlp
    _check_image_size(module, image_shape)
    return _strip(module.init(rng, x, train=False))
  k_params, k_dropout = jax.random.split(rng)
  if module.kind == "linen":
    linen = module.linen()
    out, variables = linen.init_with_output(
        {"params": k_params, "dropout": k_dropout}, x, **_init_kwargs(linen))
    _check_logits(module, np.shape(_logits_of(out)))
    return _strip(variables)
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from kdjax import models  # pylint: disable=g-import-not-at-top
  model = module.nnx(image_shape, nnx.Rngs(k_params, dropout=k_dropout))
  apply, variables = models.from_nnx(model)
  logits = jax.eval_shape(lambda v: apply(v, {"image": x}).logits, variables)
  _check_logits(module, logits.shape)
  return variables


def _logits_of(out):
  # The outputs the adapters accept: logits, (logits, features), a
  # ModelOutput or {"logits": ...}.
  if isinstance(out, tuple):
    return out[0]
  if isinstance(out, Mapping) and "logits" in out:
    return out["logits"]
  return getattr(out, "logits", out)


def abstract_variables(module, image_shape: Sequence[int]) -> dict:
  """The variables' shapes and dtypes, without computing them."""
  if isinstance(module, UserModel) and module.kind == "linen":
    module = module.linen()
  if isinstance(module, UserModel):
    from kdjax import models  # pylint: disable=g-import-not-at-top
    return models.from_nnx(module.abstract_nnx(image_shape))[1]
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  kwargs = _init_kwargs(module)
  return _strip(jax.eval_shape(
      lambda r, v: module.init(r, v, **kwargs), jax.random.PRNGKey(0), x))


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
    return os.path.join(self.path, runs.CHECKPOINTS)

  def module(self):
    return build_module(self.model_config, self.num_classes)

  def latest_step(self) -> Optional[int]:
    return runs.latest_step(self.path)

  def restore_variables(self, shardings: Any = None) -> dict:
    """The trained model's variables (latest checkpoint), read-only.

    Raises:
      kdjax.cli.errors.MissingRunError: the run has no checkpoint yet (exit
        status 2).
    """
    from kdjax import checkpoint  # pylint: disable=g-import-not-at-top
    if self.latest_step() is None:
      raise errors.MissingRunError(
          f"the run at {self.path} has no checkpoint yet (in "
          f"{self.checkpoint_dir}); train it first.")
    target = abstract_variables(self.module(), self.image_shape)
    return checkpoint.restore_teacher(self.checkpoint_dir, target,
                                      shardings=shardings)


def read_run(path: str) -> Run:
  """Reads ``path``'s config.yaml and run.json (errors:
  :func:`kdjax.cli.runs.read_meta`)."""
  from kdjax.cli.config import base as _config_base  # pylint: disable=g-import-not-at-top
  from kdjax.cli.config import image as cfg  # pylint: disable=g-import-not-at-top
  meta = runs.read_meta(path)
  config = _config_base.load_saved(os.path.join(path, runs.CONFIG_FILE),
                                   cfg.SCHEMA)
  return Run(path=path, config=config, meta=meta)


def write_run(path: str, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """Writes config.yaml and run.json (atomically)."""
  from kdjax.cli.config import image as cfg  # pylint: disable=g-import-not-at-top
  runs.write(path, cfg.dump(config), meta)
