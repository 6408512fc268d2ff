"""Schema-driven YAML configs: fields, defaults, merging, ``--set`` overrides.

The machinery behind :mod:`kdjax.cli.config.image` (the image commands' config) and
:mod:`kdjax.cli.config.lm` (``kdjax lm``'s): a schema is a nested mapping of
sections whose leaves are :class:`Field` s. :func:`defaults` builds its
default config, :func:`merge` merges a YAML mapping into a config (unknown
keys name themselves and suggest the closest valid key), :func:`apply_override`
applies one ``--set KEY=VALUE``, :func:`validate_fields` coerces every value to
its field's kind (a wrong type names the key, the expected type and the
value), :func:`describe_schema` documents a schema as commented YAML. Every
problem raises :class:`ConfigError` (exit status 2). Standard library and
PyYAML only: configs are read before JAX is imported.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from typing import Any, Mapping, Optional, Sequence

import yaml

from kdjax.cli import errors


class ConfigError(errors.UsageError, ValueError):
  """An invalid run configuration (unknown key, wrong type, unknown method).

  A :class:`~kdjax.cli.errors.UsageError` (exit status 2) and a ``ValueError``.
  """


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



# -----------------------------------------------------------------------------
# Defaults and walking the schema.
# -----------------------------------------------------------------------------


def _defaults(schema: Mapping[str, Any]) -> dict:
  return {k: (_defaults(v) if isinstance(v, Mapping)
              else copy.deepcopy(v.default)) for k, v in schema.items()}


def defaults(schema: Mapping[str, Any]) -> dict:
  """The configuration of ``schema`` with every default (a fresh nested dict)."""
  return _defaults(schema)


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


def coerce(path: str, field: Field, value: Any, *, context: str = "") -> Any:
  """``value`` converted to ``field``'s kind, or a ConfigError naming ``path``
  (and ``context``, e.g. ``" (method 'dkd')"``, after it)."""

  def bad(extra: str = "") -> ConfigError:
    return ConfigError(
        f"config key {path!r}{context} must be {_expected(field)}, got "
        f"{value!r} ({_type_name(value)}){extra}.")

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


def merge(path: str, schema: Mapping[str, Any], base: dict,
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
      merge(full, sub, base[key], value)
    elif sub.kind == "dict" and isinstance(value, Mapping):
      base[key] = {**base[key], **value}
    else:
      base[key] = value



def load_saved(path: str, schema: Mapping[str, Any]) -> dict:
  """The config a run wrote into its directory: its YAML over ``schema``'s
  defaults (keys added since the run get their defaults).

  Not validated, and its data not resolved, again: the run validated it once
  when it started (the file holds the resolved values). Reading a run with
  ``--set`` overrides goes through the command's ``load_config`` instead.
  """
  config = defaults(schema)
  try:
    merge("", schema, config, read_yaml(path))
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return config


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


def apply_override(config: dict, text: str, schema: Mapping[str, Any]) -> None:
  """Applies one ``KEY=VALUE`` override to ``config`` (in place, checked
  against ``schema``)."""
  root = schema
  parts, value = parse_override(text)
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
  merge("", root, config, _nest(parts, value))



# -----------------------------------------------------------------------------
# Reading, validating and writing.
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


def validate_fields(path: str, schema: Mapping[str, Any], config: dict) -> None:
  """Coerces every value of ``config`` to its field's kind (in place)."""
  for key, sub in schema.items():
    full = f"{path}.{key}" if path else key
    if isinstance(sub, Mapping):
      validate_fields(full, sub, config[key])
    else:
      config[key] = coerce(full, sub, config[key])



def describe_schema(schema: Mapping[str, Any], indent: int = 0) -> str:
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

