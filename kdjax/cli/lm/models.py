"""``kdjax lm``'s models: one interface over kdjax's DecoderLM and Tunix's.

:func:`build_lm` turns a model section (``family``, ``size``, ``kwargs``) into
an :class:`LMModel`: the apply function with logits (sliced to the
tokenizer's vocabulary), the memory-lean apply function (final hidden states
plus the unembedding, no ``[B, T, V]`` logits), fresh variables, and
generation (a KV-cached sampler inside ``jit``: :func:`kdjax.lm.generate`,
or :func:`kdjax.lm.tunix_generate` for Tunix models).

Tunix's models keep their parameters in an ``nnx.State``; here they are a
plain nested dict of arrays (string keys, the state's paths), which
``kdjax.checkpoint`` saves and restores like any pytree; the apply functions
turn it back into the state's structure (:class:`_NNXParams`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from kdjax.cli.config import lm as _lm_config
from kdjax.cli import errors
from kdjax.cli.config.base import ConfigError

RUN_META = "run.json"
CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass
class LMModel:
  """A language model as the LM commands use it.

  Attributes:
    family: ``"kdjax"``, ``"qwen3"``, ``"llama3"`` or ``"gemma3"``.
    apply: ``apply(variables, batch) -> ModelOutput`` with ``logits [B, T,
      V]`` (``V`` the tokenizer's vocabulary for Tunix models; the model's
      rows for kdjax's, sliced by the losses' ``vocab_size``).
    lean_apply: the same model with ``compute_logits=False``: features
      ``hidden`` and ``unembedding_kernel`` (and bias).
    variables: ``{"params": ...}`` (fresh initialisation).
    rows: the model's embedding rows (>= the tokenizer's vocabulary).
    max_len: the longest sequence it takes (kdjax: learned positions).
    description: e.g. ``"kdjax DecoderLM small (2 layers, d_model 64)"``.
    rollout: ``rollout(sampling) -> rollout_fn(variables, batch, rng)``.
    generate: ``generate(variables, tokens, prompt_len, rng, sampling) ->
      GenerationOutput`` (jit-safe).
    tunix_model: the Tunix ``nnx.Module`` (for the HF export), else None.
  """
  family: str
  apply: Callable
  lean_apply: Callable
  variables: Any
  rows: int
  max_len: Optional[int]
  description: str
  rollout: Callable
  generate: Callable
  tunix_model: Any = None
  to_nnx: Optional[Callable] = None


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
             seed: int, side: str) -> LMModel:
  """The :class:`LMModel` of a ``teacher``/``student`` section."""
  rows = model_rows(section, vocab_size, side)
  if section["family"] == "kdjax":
    return _build_kdjax(section, rows, vocab_size, seq_len, seed, side)
  return _build_tunix(section, rows, vocab_size, seed, side)


def _build_kdjax(section, rows, vocab_size, seq_len, seed, side) -> LMModel:
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
  apply = lm.make_lm_apply(config)
  lean = lm.make_lm_apply(config, compute_logits=False)
  # One compiled init (op by op, flax's init compiles every op).
  variables = jax.jit(lambda key: lm.init_lm(config, key))(
      jax.random.PRNGKey(seed))

  def generate(variables, tokens, prompt_len, rng, sampling):
    return lm.generate(apply.module, variables, tokens, prompt_len, rng,
                       sampling)

  return LMModel(
      family="kdjax", apply=apply, lean_apply=lean, variables=variables,
      rows=rows, max_len=config.max_len,
      description=(f"kdjax DecoderLM {section['size']} ({config.num_layers} "
                   f"layers, d_model {config.d_model}, {config.num_heads} "
                   f"heads, vocabulary {rows})"),
      rollout=lambda sampling: lm.make_rollout_fn(apply.module, sampling),
      generate=generate)


class _NNXParams:
  """Plain nested dicts <-> a Tunix model's ``nnx.State`` of parameters."""

  def __init__(self, state):
    leaves, self._treedef = jax.tree_util.tree_flatten_with_path(state)
    self._paths = [tuple(_key_name(k) for k in path) for path, _ in leaves]
    self.plain = {}
    for path, (_, leaf) in zip(self._paths, leaves):
      node = self.plain
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = leaf

  def to_state(self, plain):
    leaves = []
    for path in self._paths:
      node = plain
      for name in path:
        node = node[name]
      leaves.append(node)
    return jax.tree_util.tree_unflatten(self._treedef, leaves)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


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


def _build_tunix(section, rows, vocab_size, seed, side) -> LMModel:
  lm = _tunix_lm()
  family = section["family"]
  kwargs = dict(section["kwargs"])
  size = section["size"]
  if size == "tiny" or "vocab_size" in kwargs:
    kwargs["vocab_size"] = rows
  try:
    config = lm.tunix_model_config(family, size, **kwargs)
    model = lm.init_tunix_model(family, config, seed)
  except ImportError as e:
    raise errors.MissingDependencyError(str(e)) from None
  except (TypeError, ValueError) as e:
    raise ConfigError(
        f"config keys '{side}.size'/'{side}.kwargs': {e}") from None
  return lm_from_tunix(model, family, vocab_size, f"{family} {size}", side)


def lm_from_tunix(model, family: str, vocab_size: int, name: str,
                  side: str) -> LMModel:
  """The :class:`LMModel` of a Tunix model instance (random, or loaded from
  a Hugging Face checkpoint)."""
  lm = _tunix_lm()
  config = model.config
  rows = int(getattr(config, "num_embed" if family == "gemma3"
                     else "vocab_size"))
  if rows < vocab_size:
    raise ConfigError(
        f"the {side} ({name}) has {rows} vocabulary rows but the tokenizer "
        f"has {vocab_size} ids: a tokenizer larger than the model's "
        "vocabulary cannot be used with it.")
  apply_nnx, variables = lm.make_tunix_lm_apply(model, vocab_size=vocab_size)
  lean_nnx, _ = lm.make_tunix_lm_apply(model, compute_logits=False,
                                       vocab_size=vocab_size)
  params = _NNXParams(variables["params"])

  def wrap(fn):
    def apply(variables, batch, *, train=False, rng=None):
      return fn({"params": params.to_state(variables["params"])}, batch,
                train=train, rng=rng)
    return apply

  def to_nnx(variables):
    return {"params": params.to_state(variables["params"])}

  def rollout(sampling):
    inner = lm.make_tunix_rollout_fn(apply_nnx, sampling)
    return lambda variables, batch, rng: inner(to_nnx(variables), batch, rng)

  def generate(variables, tokens, prompt_len, rng, sampling):
    return lm.tunix_generate(apply_nnx, to_nnx(variables), tokens,
                             prompt_len, rng, sampling)

  return LMModel(
      family=family, apply=wrap(apply_nnx), lean_apply=wrap(lean_nnx),
      variables={"params": params.plain}, rows=rows, max_len=None,
      description=(f"tunix {name} ({config.num_layers} layers, width "
                   f"{config.embed_dim}, vocabulary {rows})"),
      rollout=rollout, generate=generate, tunix_model=model, to_nnx=to_nnx)


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


def model_of(config: Mapping[str, Any], side: str, vocab_size: int
             ) -> LMModel:
  """The model of ``config[side]``: a Hugging Face teacher
  (``teacher.hf_path``), a student made of its layers
  (``student.init: teacher_layers``, in ``student.dtype``: float32 master
  weights by default, whatever the teacher's dtype), or a fresh model of the
  section."""
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
                  config["seed"], side)


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
    return os.path.join(self.path, CHECKPOINTS)

  def latest_step(self) -> Optional[int]:
    d = self.checkpoint_dir
    if not os.path.isdir(d):
      return None
    steps = sorted(int(n) for n in os.listdir(d)
                   if n.isdigit() and os.path.isdir(os.path.join(d, n)))
    return steps[-1] if steps else None

  def model(self, vocab_size: int) -> LMModel:
    return model_of(self.config, self.side, vocab_size)

  def restore(self, model: LMModel):
    """The trained variables (newest checkpoint), read-only."""
    from kdjax import checkpoint  # pylint: disable=g-import-not-at-top
    if self.latest_step() is None:
      raise errors.MissingRunError(
          f"the run at {self.path} has no checkpoint yet (in "
          f"{self.checkpoint_dir}); train it first.")
    return checkpoint.restore_teacher(self.checkpoint_dir,
                                      abstract(model.variables))


def is_lm_run(path: str) -> bool:
  meta = os.path.join(path, RUN_META)
  if not os.path.exists(meta):
    return False
  with open(meta) as f:
    return json.load(f).get("kind") == "lm"


def read_lm_run(path: str) -> LMRun:
  """Reads an LM run directory; a MissingRunError if it is none."""
  from kdjax.cli.image import models as _models  # pylint: disable=g-import-not-at-top
  meta = _models.read_run_meta(
      path, written_by="LM runs are written by `kdjax lm train-teacher` and "
      "`kdjax lm distill`")
  if meta.get("kind") != "lm":
    raise errors.UsageError(
        f"{path} holds an image run (by `kdjax {meta.get('command')}`), not an "
        "LM run; use `kdjax eval` for it.")
  config = _lm_config.load_config([os.path.join(path, CONFIG_FILE)])
  return LMRun(path=path, config=config, meta=meta)


def write_lm_run(path: str, config: Mapping[str, Any],
                 meta: Mapping[str, Any]) -> None:
  """Writes config.yaml and run.json (atomically)."""
  from kdjax.cli.config import base as _config_base  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  for name, text in ((CONFIG_FILE, _config_base.dump(config)),
                     (RUN_META, json.dumps({"kind": "lm", **meta}, indent=1))):
    tmp = os.path.join(path, name + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(path, name))
