"""The run configuration of the ``kdjax`` command line: schema, defaults, overrides.

A run is configured by a YAML file (``--config path.yaml``) whose keys are
those of :data:`SCHEMA` (any key may be left out: its default applies), then
by command-line overrides ``--set section.key=value`` (dotted keys; values are
read as YAML scalars, so ``8``, ``0.5``, ``1e-3``, ``true``, ``null``,
``[32, 64]`` and ``dkd`` all work). The result is validated:

* an unknown key names itself, suggests the closest valid key and lists the
  valid keys of its section;
* a value of the wrong type or outside its choices names the key, the
  expected type and the value;
* ``distill.method`` must be a method of :mod:`kdjax.methods` and
  ``distill.hparams`` its hyper-parameters (both errors list the valid names).

Every such problem raises :class:`ConfigError` (the command line prints its
message and exits with status 2, without a traceback).

``kdjax`` prints the full schema with ``kdjax config --schema`` (defaults) and
the resolved config of a file with ``kdjax config --config f.yaml``.

The module is split by topic: the schema is :mod:`kdjax.cli.config.image_schema`, the
schema-driven machinery (fields, merging, overrides, coercion)
:mod:`kdjax.cli.config.base`; this module loads the image commands' config,
checks the method and the keys that depend on each other, and derives the
run paths. Their public names are all reachable from here.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from kdjax.cli.config import base as _config_base
from kdjax.cli.image.arch import import_arch
from kdjax.cli.config.base import ConfigError
from kdjax.cli.config.base import Field
from kdjax.cli.config.base import _suggest
from kdjax.cli.config.base import _type_name
from kdjax.cli.config.base import dump
from kdjax.cli.config.base import parse_override
from kdjax.cli.config.base import read_yaml
from kdjax.cli.config.base import to_json
from kdjax.cli.config.image_schema import BUILTIN_ARCHS
from kdjax.cli.config.image_schema import SCHEMA
from kdjax.cli.config.image_schema import SUPPORTED_RECIPES

__all__ = ("BUILTIN_ARCHS", "ConfigError", "Field", "SCHEMA",
           "SUPPORTED_RECIPES", "apply_override", "cache_dir",
           "default_config", "describe_schema", "distill_run_dir", "dump",
           "feature_defaults", "load_config", "method_spec", "parse_override",
           "read_yaml", "teacher_run_dir", "to_json", "validate")


def default_config() -> dict:
  """The configuration with every default (a fresh nested dict)."""
  return _config_base.defaults(SCHEMA)


def apply_override(config: dict, text: str) -> None:
  """Applies one ``KEY=VALUE`` override to ``config`` (in place, checked)."""
  _config_base.apply_override(config, text, SCHEMA)


def describe_schema(schema: Mapping[str, Any] = SCHEMA, indent: int = 0) -> str:
  """The schema as commented YAML: every key, its default and its meaning."""
  return _config_base.describe_schema(schema, indent)


# -----------------------------------------------------------------------------
# Loading and validation.
# -----------------------------------------------------------------------------


def validate(config: dict) -> dict:
  """Checks and normalises a merged config (in place); returns it.

  Raises:
    ConfigError: a type, a choice or the method and its hyper-parameters.
  """
  _config_base.validate_fields("", SCHEMA, config)
  _validate_models(config)
  _validate_data(config)
  _validate_method(config)
  _validate_combinations(config)
  return config


def load_config(paths: Sequence[str] = (),
                overrides: Sequence[str] = ()) -> dict:
  """Defaults, updated by each YAML file in ``paths``, then by ``overrides``.

  Args:
    paths: YAML files, applied in order.
    overrides: ``"section.key=value"`` strings, applied in order.

  ``null`` ``data.num_classes``, ``data.mean`` and ``data.std`` are then
  filled from the data (:func:`kdjax.cli.image.data.resolve`: this reads the
  training labels and images once).

  Returns:
    The validated config (nested dicts of plain values).

  Raises:
    ConfigError: naming the offending key or value.
  """
  config = default_config()
  for path in paths:
    data = read_yaml(path)
    try:
      _config_base.merge("", SCHEMA, config, data)
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from None
  for text in overrides:
    apply_override(config, text)
  validate(config)
  from kdjax.cli.image import data as _data  # pylint: disable=g-import-not-at-top
  _data.resolve(config["data"])
  return config



# -----------------------------------------------------------------------------
# The method and cross-key checks.
# -----------------------------------------------------------------------------


_HPARAM_KINDS = ((bool, "bool"), (int, "int"), (float, "float"))


def _coerce_hparam(method: str, name: str, default: Any, value: Any) -> Any:
  """``value`` of ``distill.hparams.<name>`` as the kind of the method's
  default (a bool, int, float, string or nested tuple); other defaults
  (None, a function) take the value as it is."""
  key = f"distill.hparams.{name}"
  context = f" (method {method!r})"
  if default is None or callable(default):
    return value
  if isinstance(default, str):
    if not isinstance(value, str):
      raise ConfigError(f"config key {key!r}{context} must be a string, got "
                        f"{value!r} ({_type_name(value)}).")
    return value
  if isinstance(default, tuple):
    def to_tuple(v):
      return tuple(to_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"config key {key!r}{context} must be a list like "
                        f"{list(default)!r}, got {value!r}.")
    return to_tuple(value)
  for kind_type, kind in _HPARAM_KINDS:
    if isinstance(default, kind_type):
      return _config_base.coerce(key, Field(default=default, kind=kind,
                                            doc=""), value, context=context)
  return value


def method_spec(config: Mapping[str, Any]):
  """The :class:`kdjax.methods.MethodSpec` of ``config['distill']``.

  ``distill.temperature`` overrides the method's ``temperature`` (methods
  without one ignore it), the models' ``features`` its feature names
  (:func:`feature_defaults`), then ``distill.hparams`` its hyper-parameters.
  """
  from kdjax import methods  # pylint: disable=g-import-not-at-top
  d = config["distill"]
  name = d["method"]
  if name not in methods.METHODS:
    raise ConfigError(
        f"config key 'distill.method': unknown method {name!r}"
        f"{_suggest(name, methods.METHODS)}; known methods: "
        f"{', '.join(sorted(methods.METHODS))}.")
  base = methods.METHODS[name]
  overrides = feature_defaults(config, base.hparams)
  for key, value in d["hparams"].items():
    if key not in base.hparams:
      raise ConfigError(
          f"config key 'distill.hparams.{key}': method {name!r} has no "
          f"hyper-parameter {key!r}{_suggest(str(key), base.hparams)}; its "
          f"hyper-parameters: {', '.join(sorted(base.hparams))}.")
    overrides[key] = _coerce_hparam(name, key, base.hparams[key], value)
  if d["temperature"] is not None and "temperature" in base.hparams:
    overrides["temperature"] = d["temperature"]
  return methods.get_method(name, **overrides)


def feature_defaults(config: Mapping[str, Any],
                     hparams: Mapping[str, Any]) -> dict:
  """The feature names a method reads, from ``student.features`` and
  ``teacher.features`` (as torchdistill's configs name a model's hooks):
  ``student_feature``/``teacher_feature`` are the last listed feature,
  ``pairs`` the listed features zipped (``distill.hparams`` still win)."""
  s = list(config["student"].get("features") or ())
  t = list(config["teacher"].get("features") or ())
  out: dict = {}
  if "student_feature" in hparams:
    if s:
      out["student_feature"] = s[-1]
    if t:
      out["teacher_feature"] = t[-1]
  if "pairs" in hparams and s and t and "pairs" not in config["distill"][
      "hparams"]:
    if len(s) != len(t):
      raise ConfigError(
          f"config keys 'student.features' ({s}) and 'teacher.features' "
          f"({t}) pair up for method {config['distill']['method']!r}: list "
          "as many of each (or set distill.hparams.pairs).")
    out["pairs"] = tuple(zip(s, t))
  return out


def _validate_models(config: dict) -> None:
  """Each arch is built in or a module class that imports (ConfigError)."""
  for side in ("teacher", "student"):
    arch = config[side]["arch"]
    if arch in BUILTIN_ARCHS:
      continue
    if ":" not in arch:
      hint = _suggest(arch, BUILTIN_ARCHS)
      if "." in arch and not hint:
        hint = f" (did you mean {':'.join(arch.rsplit('.', 1))!r}?)"
      raise ConfigError(
          f"config key '{side}.arch' must be one of {', '.join(BUILTIN_ARCHS)} "
          f"or an import path 'package.module:ClassName' of a Flax linen or "
          f"NNX module, got {arch!r}{hint}.")
    import_arch(arch, f"{side}.arch")


def _validate_data(config: dict) -> None:
  data = config["data"]
  if data["source"] != "arrays":
    return
  for side in ("train", "eval"):
    path, labels = data[f"{side}_path"], data[f"{side}_labels_path"]
    if path is None:
      raise ConfigError(
          f"config key 'data.{side}_path' is needed by data.source: arrays (a "
          ".npz of images and labels, or a .npy of images).")
    for key, p in ((f"{side}_path", path), (f"{side}_labels_path", labels)):
      if p is not None and not p.endswith((".npz", ".npy")):
        raise ConfigError(f"config key 'data.{key}' must name a .npz or .npy "
                          f"file, got {p!r}.")
    if path.endswith(".npy") and labels is None:
      raise ConfigError(
          f"config key 'data.{side}_labels_path' is needed: data.{side}_path "
          f"({path!r}) is a .npy of images only.")


def _validate_method(config: dict) -> None:
  spec = method_spec(config)
  if spec.recipe not in SUPPORTED_RECIPES:
    raise ConfigError(
        f"config key 'distill.method': method {spec.name!r} (recipe "
        f"{spec.recipe!r}) is not run by the command line; use the Python API "
        f"(see kdjax.methods). Command-line recipes: "
        f"{', '.join(SUPPORTED_RECIPES)}.")


def _validate_combinations(config: dict) -> None:
  d = config["distill"]
  if d["teacher"] == "cache":
    if config["data"]["augment"]["enabled"]:
      raise ConfigError(
          "config keys 'distill.teacher: cache' and 'data.augment.enabled: "
          "true' conflict: the cached teacher outputs are those of the "
          "un-augmented images; disable augmentation or distill from the "
          "teacher run (distill.teacher: run).")
    if method_spec(config).recipe != "distill":
      raise ConfigError(
          f"config key 'distill.teacher: cache': method {d['method']!r} does "
          "not read a separate teacher; use distill.teacher: run.")
  k = config["train"]["accumulation_steps"]
  if config["data"]["batch_size"] % k:
    raise ConfigError(
        f"config key 'data.batch_size' ({config['data']['batch_size']}) must "
        f"be divisible by 'train.accumulation_steps' ({k}).")
  for side in ("teacher", "student"):
    m = config[side]
    if m["arch"] == "cnn" and not m["channels"]:
      raise ConfigError(f"config key '{side}.channels' must list at least one "
                        "conv block for a cnn.")


# -----------------------------------------------------------------------------
# Derived paths.
# -----------------------------------------------------------------------------


def teacher_run_dir(config: Mapping[str, Any]) -> str:
  """``teacher.run_dir`` or ``<output_dir>/teacher``."""
  return config["teacher"]["run_dir"] or os.path.join(config["output_dir"],
                                                      "teacher")


def cache_dir(config: Mapping[str, Any]) -> str:
  """``cache.dir`` or ``<output_dir>/teacher_cache``."""
  return config["cache"]["dir"] or os.path.join(config["output_dir"],
                                                "teacher_cache")


def distill_run_dir(config: Mapping[str, Any]) -> str:
  """``<output_dir>/<distill.run_name>`` (default ``student_<method>[_cached]``)."""
  d = config["distill"]
  name = d["run_name"]
  if not name:
    name = f"student_{d['method']}"
    if d["teacher"] == "cache":
      name += "_cached"
  return os.path.join(config["output_dir"], name)

