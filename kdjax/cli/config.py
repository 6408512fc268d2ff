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

``kdjax`` prints the full schema with ``kdjax config --show`` (defaults) and
the resolved config of a file with ``kdjax config --config f.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from typing import Any, Mapping, Optional, Sequence

import yaml


class ConfigError(ValueError):
  """An invalid run configuration (unknown key, wrong type, unknown method)."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One configuration value.

  Attributes:
    default: the value used when the key is absent.
    kind: ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"ints"`` (a list
      of ints), ``"strs"`` (a list of strings) or ``"dict"`` (a free-form
      mapping, validated elsewhere).
    doc: one line for ``kdjax config --show``.
    choices: the allowed values (strings), if restricted.
    nullable: ``null`` is allowed.
    minimum: the smallest allowed number (ints, floats and list items).
  """
  default: Any
  kind: str
  doc: str
  choices: Optional[tuple] = None
  nullable: bool = False
  minimum: Optional[float] = None


BUILTIN_ARCHS = ("cnn", "mlp")


def _model_section(arch: str, channels, dense, hidden, doc: str) -> dict:
  return {
      "arch": Field(arch, "str", f"{doc} architecture: cnn "
                    "(kdjax.models.CNN), mlp (kdjax.models.MLP), or your own "
                    "Flax linen or NNX module class as 'package.module:"
                    "ClassName' (importable from sys.path, PYTHONPATH or the "
                    "current directory; built with kwargs, plus num_classes "
                    "and, for NNX, input_shape [H, W, C] and rngs when its "
                    "constructor takes them)"),
      "kwargs": Field({}, "dict", "keyword arguments of the model's "
                      "constructor, e.g. {width: 16} (for cnn/mlp: over the "
                      "keys below, e.g. {batch_norm: true})"),
      "features": Field([], "strs", "intermediate features of this model "
                        "(submodule paths or sown names, e.g. [block1]); the "
                        "feature-based methods read them by default "
                        "(student_feature/teacher_feature: the last one, "
                        "pairs: zipped)"),
      "channels": Field(list(channels), "ints", "CNN: channels of the conv "
                        "blocks (features block_0, block_1, ...)", minimum=1),
      "dense": Field(dense, "int", "CNN: width of the penultimate dense layer",
                     minimum=1),
      "hidden": Field(list(hidden), "ints", "MLP: widths of the hidden layers",
                      minimum=1),
      "dropout": Field(0.0, "float", "dropout rate (train mode only)",
                       minimum=0.0),
  }


SCHEMA: dict = {
    "output_dir": Field("runs/fashion_mnist", "str",
                        "experiment directory: holds the teacher run, the "
                        "teacher cache and one directory per distill run"),
    "seed": Field(0, "int", "seed of the initialisation, data order, dropout "
                  "and augmentation", minimum=0),
    "data": {
        "source": Field("tfds", "str",
                        "tfds: a TFDS dataset by name (the Fashion-MNIST "
                        "builder, or any dataset already prepared in "
                        "array_record format); arrays: your own .npz/.npy "
                        "files (train_path, eval_path); idx: the "
                        "Fashion-MNIST IDX arrays in memory; synthetic: "
                        "generated class patterns (smoke tests)",
                        choices=("tfds", "arrays", "idx", "synthetic")),
        "name": Field("kdjax_fashion_mnist", "str",
                      "TFDS dataset name[/config][:version] (source: tfds); "
                      "kdjax_fashion_mnist is built from the IDX files, any "
                      "other is read as prepared in data_dir, never "
                      "downloaded"),
        "data_dir": Field(None, "str", "TFDS data directory holding the "
                          "prepared datasets (default ~/tensorflow_datasets)",
                          nullable=True),
        "tfds_data_dir": Field(None, "str", "older name of data_dir",
                               nullable=True),
        "dir": Field(None, "str", "directory of the Fashion-MNIST IDX files "
                     "(default $KDJAX_FASHION_MNIST_DIR or "
                     "/usr/share/datasets/fashion-mnist)", nullable=True),
        "train_path": Field(None, "str", "source: arrays: training images "
                            "and labels (.npz), or images (.npy: [N, H, W] or "
                            "[N, H, W, C], uint8 pixels or floats)",
                            nullable=True),
        "train_labels_path": Field(None, "str", "source: arrays: training "
                                   "labels (.npy [N] of class indices, or a "
                                   ".npz holding label_key) when train_path "
                                   "holds only the images", nullable=True),
        "eval_path": Field(None, "str", "source: arrays: evaluation images "
                           "and labels (.npz) or images (.npy)",
                           nullable=True),
        "eval_labels_path": Field(None, "str", "source: arrays: evaluation "
                                  "labels (.npy or .npz)", nullable=True),
        "image_key": Field("image", "str", "the images' name in a .npz "
                           "(arrays) or the image feature (tfds)"),
        "label_key": Field("label", "str", "the labels' name in a .npz "
                           "(arrays) or the label feature (tfds)"),
        "train_split": Field("train", "str", "training split (tfds, idx)"),
        "eval_split": Field("test", "str", "evaluation split (tfds, idx)"),
        "max_train_examples": Field(None, "int", "use only the first N "
                                    "training examples", nullable=True,
                                    minimum=1),
        "max_eval_examples": Field(None, "int", "use only the first N "
                                   "evaluation examples", nullable=True,
                                   minimum=1),
        "num_classes": Field(None, "int", "number of classes; null: from the "
                             "data (arrays: the largest label + 1; tfds: "
                             "the label ClassLabel; Fashion-MNIST and "
                             "synthetic: 10)", nullable=True, minimum=2),
        "mean": Field(None, "float", "image = (pixels / 255 - mean) / std "
                      "(float images: (pixels - mean) / std); null: computed "
                      "from the training split (Fashion-MNIST: 0.286)",
                      nullable=True),
        "std": Field(None, "float", "see mean; null: computed from the "
                     "training split (Fashion-MNIST: 0.353)", nullable=True,
                     minimum=1e-12),
        "batch_size": Field(128, "int", "training batch size", minimum=1),
        "eval_batch_size": Field(1000, "int", "evaluation batch size",
                                 minimum=1),
        "read_threads": Field(0, "int", "grain reader threads (0: read in "
                              "the training thread)", minimum=0),
        "augment": {
            "enabled": Field(False, "bool", "augment each batch once, for "
                             "teacher and student alike (consistent "
                             "teaching, kdjax.data.augment_batch)"),
            "crop_padding": Field(2, "int", "random crop after padding by "
                                  "this many pixels (0: none)", minimum=0),
            "flip": Field(True, "bool", "random horizontal flip"),
            "mixup_alpha": Field(None, "float", "mixup Beta(alpha, alpha) of "
                                 "the shared view (null: none)",
                                 nullable=True, minimum=1e-12),
        },
    },
    "teacher": {
        **_model_section("cnn", (32, 64), 256, (800, 800), "teacher"),
        "run_dir": Field(None, "str", "the teacher run (train-teacher writes "
                         "it, distill/cache-teacher read it; an export "
                         "directory also works); default "
                         "<output_dir>/teacher", nullable=True),
        "steps": Field(None, "int", "train-teacher: optimizer steps (default "
                       "train.steps)", nullable=True, minimum=1),
        "epochs": Field(None, "float", "train-teacher: epochs (default "
                        "train.epochs)", nullable=True, minimum=0.0),
        "lr": Field(None, "float", "train-teacher: peak learning rate "
                    "(default optimizer.lr)", nullable=True, minimum=0.0),
    },
    "student": _model_section("mlp", (16, 32), 64, (128,), "student"),
    "optimizer": {
        "name": Field("adamw", "str", "optax optimizer",
                      choices=("adamw", "adam", "sgd")),
        "lr": Field(2e-3, "float", "peak learning rate", minimum=0.0),
        "weight_decay": Field(1e-4, "float", "adamw weight decay",
                              minimum=0.0),
        "momentum": Field(0.9, "float", "sgd momentum (0: none)",
                          minimum=0.0),
        "schedule": Field("cosine", "str", "learning-rate schedule over the "
                          "run's steps", choices=("cosine", "constant")),
        "warmup_steps": Field(0, "int", "linear warm-up steps", minimum=0),
        "grad_clip": Field(None, "float", "clip the global gradient norm "
                           "(null: no clipping)", nullable=True,
                           minimum=0.0),
    },
    "train": {
        "steps": Field(None, "int", "optimizer steps (default: epochs x "
                       "steps per epoch)", nullable=True, minimum=1),
        "epochs": Field(6.0, "float", "epochs, when steps is null",
                        minimum=0.0),
        "log_every": Field(50, "int", "fetch metrics from the device, log "
                           "and update the progress bar every N steps",
                           minimum=1),
        "eval_every": Field(0, "int", "evaluate every N steps (0: only at "
                            "the end)", minimum=0),
        "accumulation_steps": Field(1, "int", "gradient accumulation "
                                    "micro-batches per step", minimum=1),
        "precision": Field("float32", "str", "kdjax.train.Policy: float32, "
                           "bf16_teacher or bf16",
                           choices=("float32", "bf16_teacher", "bf16")),
        "progress": Field(True, "bool", "show a tqdm progress bar"),
    },
    "distill": {
        "method": Field("kd", "str", "a kdjax.methods registry name "
                        "(ce: the student alone)"),
        "temperature": Field(None, "float", "the temperature of methods that "
                             "have one (ignored by the others; null: the "
                             "method's default)", nullable=True,
                             minimum=1e-12),
        "hparams": Field({}, "dict", "overrides of the method's "
                         "hyper-parameters, e.g. {beta: 4.0}"),
        "teacher": Field("run", "str", "where the teacher's outputs come "
                         "from: the teacher run (online) or the teacher "
                         "cache (offline)", choices=("run", "cache")),
        "run_name": Field(None, "str", "the run's directory under "
                          "output_dir (default student_<method>, plus "
                          "_cached for a cache)", nullable=True),
    },
    "cache": {
        "dir": Field(None, "str", "teacher cache directory (default "
                     "<output_dir>/teacher_cache)", nullable=True),
        "k": Field(None, "int", "keep the top-k logits (null: all; the "
                   "registry's methods need all)", nullable=True, minimum=1),
        "batch_size": Field(256, "int", "teacher batch size while caching",
                            minimum=1),
        "features": Field(None, "str", "comma-separated teacher features to "
                          "store (default: those distill.method reads)",
                          nullable=True),
    },
    "checkpoint": {
        "save_every": Field(500, "int", "save every N steps (0: only at the "
                            "end)", minimum=0),
        "keep": Field(3, "int", "keep the newest N checkpoints", minimum=1),
        "async": Field(True, "bool", "write checkpoints in the background"),
    },
    "eval": {
        "ece_bins": Field(15, "int", "bins of the expected calibration error",
                          minimum=1),
        "latency_batch_sizes": Field([1, 256], "ints", "batch sizes of the "
                                     "latency measurement", minimum=1),
        "latency_runs": Field(30, "int", "timed runs per batch size (median "
                              "reported)", minimum=1),
    },
}

# Recipes of kdjax.methods the command line trains.
SUPPORTED_RECIPES = ("distill", "student_only", "mean_teacher")


# -----------------------------------------------------------------------------
# Defaults and walking the schema.
# -----------------------------------------------------------------------------


def _defaults(schema: Mapping[str, Any]) -> dict:
  return {k: (_defaults(v) if isinstance(v, Mapping)
              else copy.deepcopy(v.default)) for k, v in schema.items()}


def default_config() -> dict:
  """The configuration with every default (a fresh nested dict)."""
  return _defaults(SCHEMA)


def _suggest(name: str, candidates: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(path: str, name: str, section: Mapping[str, Any]) -> ConfigError:
  where = f"under {path!r}" if path else "at the top level"
  full = f"{path}.{name}" if path else name
  return ConfigError(
      f"unknown config key {full!r}{_suggest(name, section)}; valid keys "
      f"{where}: {', '.join(sorted(section))}.")


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _expected(field: Field) -> str:
  words = {"int": "an int", "float": "a number", "bool": "true or false",
           "str": "a string", "ints": "a list of ints",
           "strs": "a list of strings", "dict": "a mapping"}
  text = words[field.kind]
  if field.minimum is not None and field.kind in ("int", "float", "ints"):
    bound = (int(field.minimum) if float(field.minimum).is_integer()
             else field.minimum)
    text += f" >= {bound}"
  if field.choices:
    text = "one of " + ", ".join(field.choices)
  if field.nullable:
    text += " or null"
  return text


def _coerce(path: str, field: Field, value: Any) -> Any:
  """``value`` converted to ``field``'s kind, or a ConfigError naming ``path``."""

  def bad(extra: str = "") -> ConfigError:
    return ConfigError(
        f"config key {path!r} must be {_expected(field)}, got {value!r} "
        f"({_type_name(value)}){extra}.")

  if value is None:
    if field.nullable:
      return None
    raise bad()
  kind = field.kind
  if kind == "bool":
    if not isinstance(value, bool):
      raise bad()
    return value
  if kind == "int":
    out = _as_int(value)
    if out is None:
      raise bad()
  elif kind == "float":
    out = _as_float(value)
    if out is None:
      raise bad()
  elif kind == "str":
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
      raise bad()
    out = str(value)
    if field.choices and out not in field.choices:
      raise ConfigError(
          f"config key {path!r} must be one of {', '.join(field.choices)}; "
          f"got {out!r}{_suggest(out, field.choices)}.")
    return out
  elif kind == "ints":
    items = value if isinstance(value, (list, tuple)) else [value]
    out = [_as_int(v) for v in items]
    if any(v is None for v in out):
      raise bad()
    if field.minimum is not None and any(v < field.minimum for v in out):
      raise bad()
    return out
  elif kind == "strs":
    items = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in items):
      raise bad()
    return [str(v) for v in items]
  elif kind == "dict":
    if not isinstance(value, Mapping):
      raise bad()
    return dict(value)
  else:  # pragma: no cover - schema bug
    raise AssertionError(f"unknown field kind {kind!r}")
  if field.minimum is not None and out < field.minimum:
    raise bad()
  return out


def _as_int(value: Any) -> Optional[int]:
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, str):
    try:
      return int(value)
    except ValueError:
      return None
  return None


def _as_float(value: Any) -> Optional[float]:
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string.
    try:
      return float(value)
    except ValueError:
      return None
  return None


def _merge(path: str, schema: Mapping[str, Any], base: dict,
           update: Mapping[str, Any]) -> None:
  """Merges ``update`` into ``base`` (in place), checking the keys."""
  for key, value in update.items():
    key = str(key)
    full = f"{path}.{key}" if path else key
    if key not in schema:
      raise _unknown_key(path, key, schema)
    sub = schema[key]
    if isinstance(sub, Mapping):
      if value is None:
        continue  # an empty section in YAML ("data:") keeps the defaults
      if not isinstance(value, Mapping):
        raise ConfigError(
            f"config key {full!r} is a section; give it a mapping of its keys "
            f"({', '.join(sorted(sub))}), got {value!r}.")
      _merge(full, sub, base[key], value)
    elif sub.kind == "dict" and isinstance(value, Mapping):
      base[key] = {**base[key], **value}
    else:
      base[key] = value


# -----------------------------------------------------------------------------
# Overrides.
# -----------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
  """``"a.b=value"`` -> ``(["a", "b"], value read as a YAML scalar)``."""
  key, sep, raw = text.partition("=")
  key = key.strip()
  if not sep or not key:
    raise ConfigError(f"--set expects KEY=VALUE with a dotted KEY (e.g. "
                      f"optimizer.lr=1e-3), got {text!r}.")
  parts = key.split(".")
  if any(not p for p in parts):
    raise ConfigError(f"--set: malformed key {key!r} in {text!r}.")
  try:
    value = yaml.safe_load(raw) if raw.strip() else None
  except yaml.YAMLError as e:
    raise ConfigError(f"--set {key}: cannot read {raw!r} as a YAML value "
                      f"({' '.join(str(e).split())}).") from e
  return parts, value


def _nest(parts: Sequence[str], value: Any) -> dict:
  out: Any = value
  for p in reversed(parts):
    out = {p: out}
  return out


def apply_override(config: dict, text: str) -> None:
  """Applies one ``KEY=VALUE`` override to ``config`` (in place, checked)."""
  parts, value = parse_override(text)
  schema: Any = SCHEMA
  for i, p in enumerate(parts):
    path = ".".join(parts[:i])
    if not isinstance(schema, Mapping):
      # Below a leaf: only free-form mappings (distill.hparams) go deeper.
      if schema.kind == "dict":
        break
      raise ConfigError(f"--set {'.'.join(parts)}: {path!r} is a value, not a "
                        "section.")
    if p not in schema:
      raise _unknown_key(path, p, schema)
    schema = schema[p]
  if isinstance(schema, Mapping):
    raise ConfigError(
        f"--set {'.'.join(parts)}: {'.'.join(parts)!r} is a section; set one "
        f"of its keys ({', '.join(sorted(schema))}).")
  _merge("", SCHEMA, config, _nest(parts, value))


# -----------------------------------------------------------------------------
# Loading and validation.
# -----------------------------------------------------------------------------


def read_yaml(path: str) -> dict:
  """Reads a YAML mapping; a missing or malformed file is a ConfigError."""
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} not found.")
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ConfigError(f"config file {path!r} is not valid YAML: "
                      f"{' '.join(str(e).split())}") from e
  if data is None:
    return {}
  if not isinstance(data, Mapping):
    raise ConfigError(f"config file {path!r} must hold a mapping of config "
                      f"keys at the top level, got {_type_name(data)}.")
  return dict(data)


def _validate(path: str, schema: Mapping[str, Any], config: dict) -> None:
  for key, sub in schema.items():
    full = f"{path}.{key}" if path else key
    if isinstance(sub, Mapping):
      _validate(full, sub, config[key])
    else:
      config[key] = _coerce(full, sub, config[key])


def validate(config: dict) -> dict:
  """Checks and normalises a merged config (in place); returns it.

  Raises:
    ConfigError: a type, a choice or the method and its hyper-parameters.
  """
  _validate("", SCHEMA, config)
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
  filled from the data (:func:`kdjax.cli._data.resolve`: this reads the
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
      _merge("", SCHEMA, config, data)
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from None
  for text in overrides:
    apply_override(config, text)
  validate(config)
  from kdjax.cli import _data  # pylint: disable=g-import-not-at-top
  _data.resolve(config["data"])
  return config


# -----------------------------------------------------------------------------
# The method and cross-key checks.
# -----------------------------------------------------------------------------


def _coerce_hparam(method: str, name: str, default: Any, value: Any) -> Any:
  key = f"distill.hparams.{name}"
  if default is None or callable(default):
    return value
  if isinstance(default, bool):
    if not isinstance(value, bool):
      raise ConfigError(f"config key {key!r} (method {method!r}) must be true "
                        f"or false, got {value!r}.")
    return value
  if isinstance(default, int):
    out = _as_int(value)
    if out is None:
      raise ConfigError(f"config key {key!r} (method {method!r}) must be an "
                        f"int, got {value!r} ({_type_name(value)}).")
    return out
  if isinstance(default, float):
    out = _as_float(value)
    if out is None:
      raise ConfigError(f"config key {key!r} (method {method!r}) must be a "
                        f"number, got {value!r} ({_type_name(value)}).")
    return out
  if isinstance(default, str):
    if not isinstance(value, str):
      raise ConfigError(f"config key {key!r} (method {method!r}) must be a "
                        f"string, got {value!r} ({_type_name(value)}).")
    return value
  if isinstance(default, tuple):
    def to_tuple(v):
      return tuple(to_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"config key {key!r} (method {method!r}) must be a "
                        f"list like {list(default)!r}, got {value!r}.")
    return to_tuple(value)
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
    from kdjax.cli import _models  # pylint: disable=g-import-not-at-top
    _models.import_arch(arch, f"{side}.arch")


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


def describe_schema(schema: Mapping[str, Any] = SCHEMA, indent: int = 0) -> str:
  """The schema as commented YAML: every key, its default and its meaning."""
  lines = []
  pad = "  " * indent
  for key, sub in schema.items():
    if isinstance(sub, Mapping):
      lines.append(f"{pad}{key}:")
      lines.append(describe_schema(sub, indent + 1))
    else:
      value = yaml.safe_dump(sub.default, default_flow_style=True).strip()
      if value.endswith("\n..."):
        value = value[:-4].strip()
      value = value.removesuffix("...").strip()
      lines.append(f"{pad}{key}: {value}  # {sub.doc}")
  return "\n".join(lines)


def dump(config: Mapping[str, Any]) -> str:
  """``config`` as YAML (the resolved config a run writes to its directory)."""
  return yaml.safe_dump(_plain(config), sort_keys=False,
                        default_flow_style=None)


def _plain(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def to_json(config: Mapping[str, Any]) -> dict:
  """A JSON-safe copy (tuples as lists), for checkpoints."""
  return _plain(config)
