"""Run directories of the command line, image and LM runs alike.

``<run>/config.yaml`` (the full, validated config), ``<run>/run.json`` (what
was trained: ``command``, ``model``, ...; LM runs add ``"kind": "lm"``),
``<run>/checkpoints/<step>/`` (orbax), ``metrics.jsonl``, ``summary.json``,
``eval.json``. config.yaml, run.json and the JSON files are written atomically (a temporary file, then
``os.replace``). Standard library only: ``main.py`` checks a directory before
it imports JAX.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from kdjax.cli import errors

RUN_META = "run.json"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
LM_KIND = "lm"
IMAGE_WRITERS = "`kdjax train-teacher` and `kdjax distill`"
LM_WRITERS = "`kdjax lm train-teacher` and `kdjax lm distill`"


def same_path(a: str, b: str) -> bool:
  """Whether two paths name the same file or directory (links resolved)."""
  return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(
      os.path.expanduser(b))


def is_run_dir(path: str) -> bool:
  """Whether ``path`` holds a run.json."""
  return os.path.exists(os.path.join(path, RUN_META))


def checkpoint_steps(run_dir: str) -> list[int]:
  """The steps saved under ``<run_dir>/checkpoints``, ascending."""
  directory = os.path.join(run_dir, CHECKPOINTS)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def latest_step(run_dir: str) -> Optional[int]:
  """The newest saved step, or None."""
  steps = checkpoint_steps(run_dir)
  return steps[-1] if steps else None


def read_meta(path: str, *, written_by: str = IMAGE_WRITERS) -> dict:
  """``path``'s run.json, read and parsed.

  Raises:
    kdjax.cli.errors.MissingRunError: ``path`` is not a kdjax run directory
      (exit status 2); the message names the commands that write runs
      (``written_by``).
    kdjax.cli.errors.RunError: its run.json is not valid JSON (exit status 1).
  """
  meta_path = os.path.join(path, RUN_META)
  if not os.path.exists(meta_path):
    raise errors.MissingRunError(
        f"{path} is not a kdjax run directory (no {RUN_META}); runs are "
        f"written by {written_by}.")
  with open(meta_path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise errors.RunError(f"{meta_path} is not valid JSON ({e}); the run "
                          "directory is damaged.") from None


def is_lm_meta(meta: Mapping[str, Any]) -> bool:
  return meta.get("kind") == LM_KIND


def check_kind(path: str, lm: Optional[bool] = None) -> None:
  """A MissingRunError unless ``path`` is a run directory; with ``lm``
  True/False, a UsageError for a run of the other kind (an LM run given to
  ``kdjax eval``, ...). A damaged run.json passes: its reader names it."""
  if not is_run_dir(path):
    raise errors.MissingRunError(
        f"{path} is not a kdjax run directory (no {RUN_META}); runs are "
        f"written by {IMAGE_WRITERS} ({LM_WRITERS} for language models).")
  if lm is None:
    return
  try:
    with open(os.path.join(path, RUN_META)) as f:
      is_lm = is_lm_meta(json.load(f))
  except (OSError, ValueError, AttributeError):
    return
  if is_lm and not lm:
    raise errors.UsageError(f"{path} is a language-model run; use `kdjax lm "
                            "eval` / `kdjax lm generate` for it.")
  if lm and not is_lm:
    raise errors.UsageError(f"{path} is an image run, not a language-model "
                            "run; use `kdjax eval` for it.")


def _write_atomically(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, value: Any, *, indent: Optional[int] = 1) -> None:
  """Writes ``value`` as JSON to the file ``path``, atomically."""
  _write_atomically(path, json.dumps(value, indent=indent))


def write(path: str, config_text: str, meta: Mapping[str, Any]) -> None:
  """Writes ``config.yaml`` (``config_text``) and ``run.json`` into ``path``,
  each atomically."""
  os.makedirs(path, exist_ok=True)
  _write_atomically(os.path.join(path, CONFIG_FILE), config_text)
  write_json(os.path.join(path, RUN_META), dict(meta))
