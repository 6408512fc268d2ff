"""``kdjax lm``'s models: config sections -> :class:`kdjax.lm.LMModel`.

:func:`build_lm` turns a model section (``family``, ``size``, ``kwargs``) into
an :class:`kdjax.lm.LMModel` (:func:`kdjax.lm.decoder_lm_model` for kdjax's
DecoderLM, :func:`kdjax.lm.tunix_lm_model` for Tunix's Qwen3 / Llama 3 /
Gemma 3, whose ``nnx.State`` becomes a plain nested dict through
:class:`kdjax.lm.NNXParams`), naming the config keys in errors; and reads
and writes LM run directories; loads the teacher (a Hugging Face checkpoint
or a teacher run).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Mapping, Optional

import jax
import jax.numpy as jnp

from kdjax.cli.config import lm as _lm_config
from kdjax.cli import errors
from kdjax.cli import runs
from kdjax.cli.config.base import ConfigError

if TYPE_CHECKING:
  from kdjax import lm



def model_rows(section: Mapping[str, Any], vocab_size: int, side: str) -> int:
  """The embedding rows: ``kwargs.vocab_size`` or the tokenizer's; a
  tokenizer larger than the model's vocabulary is a ConfigError."""
  rows = section["kwargs"].get("vocab_size", vocab_size)
  if not isinstance(rows, int) or rows < vocab_size:
    raise ConfigError(
        f"config key '{side}.kwargs.vocab_size' ({rows}) is smaller than the "
        f"tokenizer's vocabulary ({vocab_size} ids): a tokenizer larger than "
        "the model's vocabulary cannot be used with it; raise vocab_size or "
        "use a smaller tokenizer (tokenizer.vocab_size).")
  return rows


def build_lm(section: Mapping[str, Any], vocab_size: int, seq_len: int,
             seed: int, side: str, *, abstract: bool = False
             ) -> "lm.LMModel":
  """The :class:`LMModel` of a ``teacher``/``student`` section
  (``abstract``: its variables are shapes, nothing allocated)."""
  rows = model_rows(section, vocab_size, side)
  if section["family"] == "kdjax":
    return _build_kdjax(section, rows, vocab_size, seq_len, seed, side,
                        abstract)
  return _build_tunix(section, rows, vocab_size, seed, side, abstract)


def _build_kdjax(section, rows, vocab_size, seq_len, seed, side,
                 abstract=False) -> "lm.LMModel":
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  fields = {**_lm_config.KDJAX_SIZES[section["size"]],
            "max_len": max(256, seq_len), **section["kwargs"],
            "vocab_size": rows}
  try:
    config = lm.TransformerConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config key '{side}.kwargs': {e}") from None
  if config.max_len < seq_len:
    raise ConfigError(f"config key '{side}.kwargs.max_len' ({config.max_len}) "
                      f"is shorter than data.seq_len ({seq_len}).")
  return lm.decoder_lm_model(config, seed=seed, name=section["size"],
                             abstract=abstract)


def _tunix_lm():
  """``kdjax.lm`` with its Tunix families imported (MissingDependencyError
  when they cannot be)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  try:
    lm.tunix_model_config  # pylint: disable=pointless-statement
  except ImportError as e:
    raise errors.MissingDependencyError(
        "the model families qwen3, llama3 and gemma3 need google-tunix: pip "
        "install 'kdjax[tunix]'.") from e
  return lm


def _build_tunix(section, rows, vocab_size, seed, side, abstract=False
                 ) -> "lm.LMModel":
  lm = _tunix_lm()
  family = section["family"]
  kwargs = dict(section["kwargs"])
  size = section["size"]
  if size == "tiny" or "vocab_size" in kwargs:
    kwargs["vocab_size"] = rows
  try:
    config = lm.tunix_model_config(family, size, **kwargs)
    model = lm.init_tunix_model(family, config, seed, abstract=abstract)
  except ImportError as e:
    raise errors.MissingDependencyError(str(e)) from None
  except (TypeError, ValueError) as e:
    raise ConfigError(
        f"config keys '{side}.size'/'{side}.kwargs': {e}") from None
  return lm_from_tunix(model, family, vocab_size, f"{family} {size}", side)


def lm_from_tunix(model, family: str, vocab_size: int, name: str,
                  side: str) -> "lm.LMModel":
  """:func:`kdjax.lm.tunix_lm_model` of a Tunix model instance (random, or
  loaded from a Hugging Face checkpoint), its errors naming ``side``."""
  lm = _tunix_lm()
  try:
    return lm.tunix_lm_model(model, family, vocab_size, name)
  except lm.VocabularySizeError as e:
    raise ConfigError(f"the {side}: {e}") from None


_HF_CACHE: dict = {}


def load_hf(path: str):
  """The :class:`kdjax.lm.HFCheckpoint` at ``path`` (read once per
  process; a missing directory is a MissingRunError)."""
  if path not in _HF_CACHE:
    if not os.path.isdir(path):
      raise errors.MissingRunError(
          f"config key 'teacher.hf_path': no Hugging Face checkpoint "
          f"directory at {path}.")
    lm = _tunix_lm()
    _check_hf_tokenizer(path)
    try:
      _HF_CACHE[path] = lm.load_hf_checkpoint(path)
    except lm.HFCheckpointError as e:
      # Found before the run starts: the teacher directory is the config's
      # to fix (a truncated file, tensors that contradict config.json, a
      # feature Tunix cannot run), exit 2 as for any bad teacher.
      raise ConfigError(f"config key 'teacher.hf_path': {e}") from None
  return _HF_CACHE[path]


def _check_hf_tokenizer(path: str) -> None:
  """A ConfigError (exit 2, as for any model) when the checkpoint's
  tokenizer.json emits ids beyond its config's vocabulary (checked before
  the tensors are read)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  tok_path = os.path.join(path, "tokenizer.json")
  cfg_path = os.path.join(path, "config.json")
  if not (os.path.exists(tok_path) and os.path.exists(cfg_path)):
    return  # the loader names what is missing
  try:
    with open(cfg_path) as f:
      hf_config = json.load(f)
    text = hf_config.get("text_config") or hf_config
    vocab = text.get("vocab_size")
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = Tokenizer.from_file(tok_path)
  except Exception:  # pylint: disable=broad-except
    return  # unreadable: the loader reports it
  if not isinstance(vocab, int):
    return
  try:
    lm.check_tokenizer_fits(tokenizer, vocab,
                            what=f"the checkpoint at {path}")
  except lm.HFCheckpointError as e:
    raise ConfigError(f"config key 'teacher.hf_path': {e}") from None


def model_of(config: Mapping[str, Any], side: str, vocab_size: int, *,
             abstract: bool = False) -> "lm.LMModel":
  """The model of ``config[side]``: a Hugging Face teacher
  (``teacher.hf_path``), a student made of its layers
  (``student.init: teacher_layers``, in ``student.dtype``: float32 master
  weights by default, whatever the teacher's dtype), or a fresh model of the
  section. ``abstract`` (``kdjax lm plan``): a fresh model's variables as
  shapes, nothing allocated (a Hugging Face teacher is read as it is)."""
  hf = config["teacher"]["hf_path"]
  if side == "teacher" and hf:
    ck = load_hf(hf)
    return lm_from_tunix(ck.model, ck.family, vocab_size,
                         f"{ck.family} from {hf}", side)
  s = config["student"]
  if side == "student" and s["init"] == "teacher_layers":
    from kdjax import lm  # pylint: disable=g-import-not-at-top
    ck = load_hf(hf)
    keep = list(s["keep_layers"]) or "every_other"
    try:
      model = lm.student_from_teacher(ck, keep_layers=keep,
                                      dtype=s["dtype"])
    except ValueError as e:
      raise ConfigError(f"config key 'student.keep_layers': {e}") from None
    return lm_from_tunix(model, ck.family, vocab_size,
                         f"{ck.family}, layers {keep} of {hf}", side)
  return build_lm(config[side], vocab_size, config["data"]["seq_len"],
                  config["seed"], side, abstract=abstract)


def param_dtype(model) -> Optional[str]:
  """The dtype of a Tunix model's floating-point parameters (None if mixed)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  return dtypes.pop() if len(dtypes) == 1 else None


def param_count(variables) -> int:
  return int(sum(x.size for x in jax.tree.leaves(variables["params"])))


def abstract(variables):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x),
                                                     jnp.asarray(x).dtype),
                      variables)


# -----------------------------------------------------------------------------
# LM run directories.
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class LMRun:
  """An LM run directory read back (config.yaml, run.json, checkpoints)."""
  path: str
  config: dict
  meta: dict

  @property
  def side(self) -> str:
    return self.meta["model"]

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.path, runs.CHECKPOINTS)

  def latest_step(self) -> Optional[int]:
    return runs.latest_step(self.path)

  def model(self, vocab_size: int) -> "lm.LMModel":
    return model_of(self.config, self.side, vocab_size)

  def restore(self, model: "lm.LMModel"):
    """The trained variables (newest checkpoint), read-only."""
    return restore_variables(self.path, model)


def restore_variables(run_dir: str, model: "lm.LMModel"):
  """``model``'s trained variables from the newest checkpoint of the run in
  ``run_dir``, read-only (a MissingRunError if it has none)."""
  from kdjax import checkpoint  # pylint: disable=g-import-not-at-top
  template = abstract(model.variables)
  directory = os.path.join(run_dir, runs.CHECKPOINTS)
  if runs.latest_step(run_dir) is None:
    raise errors.MissingRunError(
        f"the run at {run_dir} has no checkpoint yet (in {directory}); train "
        "it first.")
  return checkpoint.restore_teacher(directory, template)


def read_lm_run(path: str) -> LMRun:
  """Reads an LM run directory; a MissingRunError if it is none."""
  meta = runs.read_meta(path, written_by=runs.LM_WRITERS)
  if not runs.is_lm_meta(meta):
    raise errors.UsageError(
        f"{path} holds an image run (by `kdjax {meta.get('command')}`), not an "
        "LM run; use `kdjax eval` for it.")
  from kdjax.cli.config import base as _config_base  # pylint: disable=g-import-not-at-top
  config = _config_base.load_saved(os.path.join(path, runs.CONFIG_FILE),
                                   _lm_config.LM_SCHEMA)
  return LMRun(path=path, config=config, meta=meta)


def write_lm_run(path: str, config: Mapping[str, Any],
                 meta: Mapping[str, Any]) -> None:
  """Writes config.yaml and run.json (``"kind": "lm"``), atomically."""
  from kdjax.cli.config import base as _config_base  # pylint: disable=g-import-not-at-top
  runs.write(path, _config_base.dump(config),
                {"kind": runs.LM_KIND, **meta})


# -----------------------------------------------------------------------------
# The teacher.
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class LMTeacher:
  """A trained teacher: its run, model and variables."""
  path: str
  model: "lm.LMModel"
  variables: Any


def load_run_teacher(run_dir: str, vocab_size: int) -> LMTeacher:
  """The teacher trained in ``run_dir`` (``kdjax lm train-teacher``; its
  tokenizer is checked by :func:`kdjax.cli.lm.data.check_teacher_tokenizer`
  before)."""
  run = read_lm_run(run_dir)
  model = run.model(vocab_size)
  return LMTeacher(path=os.path.abspath(run_dir), model=model,
                   variables=run.restore(model))


def load_teacher(config: Mapping[str, Any], vocab_size: int,
                 run_dir: Optional[str] = None) -> LMTeacher:
  """The Hugging Face teacher of ``teacher.hf_path``, or the teacher run in
  ``run_dir`` (its existence and tokenizer checked by the data phase,
  :func:`kdjax.cli.lm.data.load_data`)."""
  hf = config["teacher"]["hf_path"]
  if hf:
    model = model_of(config, "teacher", vocab_size)
    return LMTeacher(path=os.path.abspath(hf), model=model,
                     variables=model.variables)
  return load_run_teacher(run_dir, vocab_size)
