"""``kdjax lm distill``'s Hugging Face export (``distill.hf_out``).

:func:`check_hf_out` refuses, before anything runs, a directory the export
would overwrite without having written it; :func:`write_hf` writes the
trained student (its config, ``model.safetensors`` in ``distill.hf_dtype`` or
the teacher's dtype, the run's ``tokenizer.json`` and the files serving tools
read beside it: the Hugging Face teacher's ``tokenizer_config.json``, chat
template, ``generation_config.json``, ..., or for a tokenizer of kdjax's own a
``tokenizer_config.json`` and ``generation_config.json`` naming its special
tokens; see :func:`kdjax.lm.save_hf_checkpoint`) and records the export in
``<run_dir>/hf_export.json`` first, so that an export cut short may be retried
by the same command.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping

from kdjax.cli import errors
from kdjax.cli import runs
from kdjax.cli.config.base import ConfigError
from kdjax.cli.lm import models as _lm_models

if TYPE_CHECKING:
  from kdjax import lm


HF_EXPORT_FILE = "hf_export.json"


def check_hf_out(config: Mapping[str, Any], run_dir: str) -> None:
  """A ConfigError, before anything runs, when ``distill.hf_out`` would
  overwrite a Hugging Face directory this run did not write: one holding a
  ``config.json`` that is not this run's earlier export (recorded in
  ``<run_dir>/hf_export.json``), unless ``distill.hf_overwrite``. (The
  teacher's own directory is refused by the config's validation.)"""
  d = config["distill"]
  path = d["hf_out"]
  if not path or d["hf_overwrite"]:
    return
  if not os.path.exists(os.path.join(path, "config.json")):
    return
  record = os.path.join(run_dir, HF_EXPORT_FILE)
  if os.path.exists(record):
    try:
      with open(record) as f:
        if runs.same_path(json.load(f)["path"], path):
          return
    except (OSError, ValueError, KeyError, TypeError):
      pass
  raise ConfigError(
      f"config key 'distill.hf_out': {path} already holds a config.json that "
      f"this run ({run_dir}) did not write; choose another directory, or set "
      "distill.hf_overwrite=true to replace its config.json, "
      "model.safetensors and tokenizer files.")


def write_hf(config: Mapping[str, Any], run_dir: str, student: "lm.LMModel",
             tokenizer: "lm.Tokenizer",
             out: Callable[[str], None] = print) -> None:
  """Writes the trained student as a Hugging Face directory (distill.hf_out).

  With a Hugging Face teacher (``teacher.hf_path``) whose ``tokenizer.json``
  is the run's (same vocabulary and pipeline), the teacher's tokenizer and
  generation files are carried (``tokenizer_files_from``); otherwise the
  run's own tokenizer names the special tokens (a teacher tokenizer that
  splits text differently from the run's is said so, and its files are not
  carried).
  """
  try:
    from kdjax.lm import save_hf_checkpoint  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingDependencyError(
        "distill.hf_out needs kdjax.lm.save_hf_checkpoint (safetensors)."
    ) from e
  # pylint: disable=g-import-not-at-top
  from kdjax.lm import check_same_tokenizer
  from kdjax.lm import load_hf_tokenizer
  from kdjax.lm import rebuild_model
  from kdjax.lm import TokenizerMismatchError
  from tokenizers import Tokenizer
  # pylint: enable=g-import-not-at-top
  path = config["distill"]["hf_out"]
  hf = config["teacher"]["hf_path"]
  hf_config = None
  files_from = None
  dtype = config["distill"]["hf_dtype"]
  if hf:
    ck = _lm_models.load_hf(hf)
    if ck.family == student.family:
      hf_config = ck.hf_config
    if dtype is None:  # a bfloat16 teacher gives a bfloat16 student
      dtype = _lm_models.param_dtype(ck.model)
  variables = _lm_models.restore_variables(run_dir, student)
  model = rebuild_model(student.tunix_model,
                        student.to_nnx(variables)["params"])
  if hf and tokenizer.json_text is not None and os.path.isfile(
      os.path.join(hf, "tokenizer.json")):
    try:
      check_same_tokenizer(load_hf_tokenizer(hf),
                           Tokenizer.from_str(tokenizer.json_text))
      files_from = hf
    except TokenizerMismatchError:
      out(f"[lm distill] the run's tokenizer splits text differently from "
          f"the teacher's ({hf}): the export gets the run's tokenizer, not "
          "the teacher's tokenizer files")
  # Recorded first: an export cut short may be retried by the same command.
  runs.write_json(os.path.join(run_dir, HF_EXPORT_FILE),
                  {"path": os.path.abspath(path), "dtype": dtype}, indent=None)
  save_hf_checkpoint(path, student.family, model, hf_config=hf_config,
                     dtype=dtype, tokenizer=tokenizer,
                     tokenizer_files_from=files_from)
  out(f"[lm distill] wrote the student as a Hugging Face checkpoint"
      f"{'' if dtype is None else f' ({dtype})'}: {path}")
