"""Tunix's Qwen3, Llama 3 and Gemma 3 (Flax NNX) as kdjax teachers and students.

``google-tunix`` (the ``.[tunix]`` extra) is imported here only, when one of
these functions is first called. The adapter turns a Tunix model into a kdjax
apply function with the conventions of :func:`kdjax.lm.make_lm_apply`::

  config = tunix_model_config("qwen3", "tiny", vocab_size=320)
  model = init_tunix_model("qwen3", config, seed=0)
  apply, variables = make_tunix_lm_apply(model, vocab_size=300)
  out = apply(variables, batch)          # out.logits [B, T, 300]

``variables = {"params": nnx.State}`` (the ``nnx.Param`` s; a pytree that
``jax.jit``/``jax.grad``/optax take as is) and ``apply(variables, batch)``
merges them into the model's graph afresh on every call
(``nnx.merge``), so the function is pure and the parameters are arguments
of the jitted step. :func:`rebuild_model` merges trained variables back into
a Tunix module (for export or Tunix's own sampler).

Forward pass
------------
The apply function runs the model's own submodules: ``embedder.encode``
(Gemma 3 multiplies the embeddings by ``sqrt(D)`` there), every decoder layer
with ``(x, positions, cache=None, attention_mask)``, ``final_norm``, then
the unembedding: the transposed input embedding for tied models (Gemma 3
always; Qwen3 with ``use_tied_embedding``; Llama 3 with ``weight_tying``),
else ``lm_head``. Neither family of Tunix 0.1.7 has a final logit soft-cap.
The logits equal the model's own ``model(tokens, positions, None, mask)``
(tested); stopping at ``final_norm`` gives the final hidden states without
ever forming ``[B, T, V]`` logits (``compute_logits=False``), and
:func:`tunix_unembedding` gives ``(kernel [D, V], None)`` with ``logits ==
hidden @ kernel`` exactly, for ``kdjax.lm.lean_token_kd_term``.

Positions and masks
-------------------
kdjax's LM batches (:func:`kdjax.lm.make_lm_batch`) are right-padded: real
tokens at ``0 .. len - 1``, PAD after. Then ``positions = 0 .. T - 1`` and
the causal mask alone already keeps every real token from attending to
padding (padding comes after it); the padded positions' outputs are excluded
from every loss by ``batch["loss_mask"]`` (:data:`kdjax.lm.MASK_KEY`, the
completion tokens). A batch that carries ``input_mask`` ``[B, T]`` (1 = real
token, 0 = padding; Tunix's ``TrainingInput.input_mask``, e.g. left-padded
prompts as Tunix's sampler makes them) gets Tunix's conventions instead:
``positions = cumsum(input_mask) - 1`` (clipped at 0,
``tunix.generate.utils.build_positions_from_mask``) and the attention mask
``causal & input_mask[:, None, :]`` (``make_causal_attn_mask``).

Packed rows (``kdjax.lm.make_packed_batch``: ``segment_ids`` and
``positions``, several examples a row) are passed straight through: every
family's decoder layer takes per-token ``positions [B, T]`` (rotary
embeddings, so each segment's RoPE restarts at 0) and a full ``[B, T, T]``
attention mask, here ``kdjax.lm.packed_attention_mask`` (block-diagonal
causal). All three families of Tunix 0.1.7 support it: Qwen3 and Llama 3
apply the mask as given; Gemma 3's local layers AND it with their sliding
window, taken over slot indices, which within a (contiguous) segment are the
positions' differences, so the window is the unpacked one. Qwen3 with
``use_flash_attention`` (TPU splash attention) ignores the mask and reads
``segment_ids`` instead, which the adapter then passes. A batch may not be
both packed and carry ``input_mask``.

Generation
----------
:func:`tunix_generate` / :func:`make_tunix_rollout_fn` are kdjax's jitted
KV-cache sampler (:func:`kdjax.lm.generate`'s loop, :class:`kdjax.lm.
SamplingConfig`) driving the Tunix model through its own cache API (per layer
``{"k", "v": [B, S, K, H], "end_index": [B]}``, written at ``end_index``); the
rollout is traceable, so it runs inside kdjax's jitted GKD step
(``make_gkd_train_step(..., rollout_fn=make_tunix_rollout_fn(...))``).
Tunix's ``tunix.generate.sampler.Sampler`` is host-driven (strings in,
tokenizer, ``device_get``) and cannot run inside a jitted step; see
BUILD_NOTES.md for the speed of both.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping, Optional, Union

import chex
import jax
import jax.numpy as jnp

from kdjax.lm._generate import GenerationOutput
from kdjax.lm._generate import SamplingConfig
from kdjax.lm._generate import _valid_lengths
from kdjax.lm._generate import batch_from_generation
from kdjax.lm._generate import prepare_token_buffer
from kdjax.lm._generate import sample_logits
from kdjax.lm._packing import check_unpacked
from kdjax.lm._packing import packed_attention_mask
from kdjax.lm._packing import packing_inputs
from kdjax.lm._packing import segment_key_prefix
from kdjax.models import ApplyFn
from kdjax.models import ModelOutput

FAMILIES = ("qwen3", "llama3", "gemma3")
TUNIX_FAMILIES = FAMILIES

INPUT_MASK_KEY = "input_mask"

_CLASS_NAMES = {"qwen3": "Qwen3", "llama3": "Llama3", "gemma3": "Gemma3"}

# Tiny configurations for CPU tests: 2 layers, width 32, 4 query heads over 2
# KV heads (grouped-query attention), head width 8, vocabulary 320. Qwen3 is
# tied (as its 0.6B-4B presets), Llama 3 untied (as 3.1 8B), Gemma 3 always
# ties; Gemma 3's sliding window (4) is shorter than the test sequences.
_TINY = {
    "qwen3": dict(num_layers=2, vocab_size=320, embed_dim=32, hidden_dim=64,
                  num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=10_000,
                  norm_eps=1e-6, use_tied_embedding=True),
    "llama3": dict(num_layers=2, vocab_size=320, embed_dim=32, hidden_dim=64,
                   num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=10_000,
                   norm_eps=1e-5, weight_tying=False),
    "gemma3": dict(num_layers=2, num_embed=320, embed_dim=32, hidden_dim=64,
                   num_heads=4, head_dim=8, num_kv_heads=2,
                   sliding_window_size=4, local_base_frequency=10_000,
                   global_base_frequency=10_000, param_dtype=jnp.float32),
}


def _check_family(family: str) -> str:
  if family not in FAMILIES:
    raise ValueError(f"unknown Tunix model family {family!r}; expected one of "
                     f"{FAMILIES}.")
  return family


def _model_module(family: str):
  """``tunix.models.<family>.model`` (imports tunix)."""
  _check_family(family)
  try:
    return importlib.import_module(f"tunix.models.{family}.model")
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kdjax's Tunix adapter needs google-tunix: pip install "
        "'kdjax[tunix]' (or pip install google-tunix).") from e


def _config_fields(cls) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls))


def tunix_presets(family: str) -> tuple[str, ...]:
  """The preset names of the family's Tunix ``ModelConfig`` (its classmethods), plus ``"tiny"``."""
  cls = _model_module(family).ModelConfig
  names = [n for n in dir(cls) if not n.startswith("_")
           and inspect.ismethod(getattr(cls, n))
           and getattr(cls, n).__self__ is cls]
  return ("tiny",) + tuple(sorted(names))


def _vocab_field(family: str) -> str:
  return "num_embed" if family == "gemma3" else "vocab_size"


def tunix_model_config(family: str,
                       size: Union[str, Mapping[str, Any]] = "tiny",
                       **overrides: Any) -> Any:
  """Tunix's ``ModelConfig`` of ``family``.

  Args:
    family: ``"qwen3"``, ``"llama3"`` or ``"gemma3"`` (:data:`FAMILIES`).
    size: a preset of the family's Tunix ``ModelConfig`` (its classmethods,
      e.g. ``"qwen3_0p6b"``, ``"llama3p2_1b"``, ``"gemma3_270m"``; see
      :func:`tunix_presets`), ``"tiny"`` (2 layers, width 32, vocabulary 320,
      float32: for CPU tests), or a mapping of fields laid over ``"tiny"``.
    **overrides: fields replaced afterwards, e.g. ``num_layers=4``;
      ``vocab_size`` is accepted for every family (Gemma 3 calls it
      ``num_embed``).

  Returns:
    The family's ``tunix.models.<family>.model.ModelConfig``.

  Raises:
    ValueError: an unknown family, preset or field (the message lists the
      valid ones).
  """
  module = _model_module(family)
  cls = module.ModelConfig
  fields = _config_fields(cls)
  if isinstance(size, str):
    if size == "tiny":
      config = cls(**_TINY[family])
    else:
      maker = getattr(cls, size, None)
      if size.startswith("_") or maker is None or not callable(maker):
        raise ValueError(
            f"unknown {family} size {size!r}; expected 'tiny', a mapping of "
            f"ModelConfig fields, or one of Tunix's presets: "
            f"{tunix_presets(family)[1:]}.")
      config = maker()
  elif isinstance(size, Mapping):
    unknown = sorted(set(size) - set(fields) - {"vocab_size"})
    if unknown:
      raise ValueError(f"unknown {family} ModelConfig field(s) {unknown}; "
                       f"fields: {fields}.")
    config = cls(**_TINY[family])
    overrides = {**dict(size), **overrides}
  else:
    raise TypeError(f"size must be a preset name or a mapping, got "
                    f"{type(size).__name__}.")
  if "vocab_size" in overrides and family == "gemma3":
    overrides["num_embed"] = overrides.pop("vocab_size")
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"unknown {family} ModelConfig field(s) {unknown}; "
                     f"fields: {fields}.")
  if overrides:
    config = dataclasses.replace(config, **overrides)
  _check_config(family, config)
  return config


def _check_config(family: str, config) -> None:
  for name in ("num_layers", _vocab_field(family), "embed_dim", "hidden_dim",
               "num_heads", "head_dim", "num_kv_heads"):
    value = getattr(config, name)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{family} ModelConfig.{name} must be an int >= 1, got "
                       f"{value!r}.")
  if config.num_heads % config.num_kv_heads:
    raise ValueError(
        f"{family}: num_heads={config.num_heads} is not a multiple of "
        f"num_kv_heads={config.num_kv_heads} (grouped-query attention).")
  if config.head_dim % 2:
    raise ValueError(f"{family}: head_dim={config.head_dim} must be even "
                     "(rotary embeddings).")


def tunix_vocab_rows(family: str, config: Any) -> int:
  """The number of embedding rows of a family's config."""
  return int(getattr(config, _vocab_field(_check_family(family))))


def tunix_family(model: Any) -> str:
  """The family (``"qwen3"``, ``"llama3"``, ``"gemma3"``) of a Tunix model instance."""
  module = type(model).__module__
  for family in FAMILIES:
    if module == f"tunix.models.{family}.model":
      return family
  raise TypeError(
      f"{type(model).__module__}.{type(model).__name__} is not one of Tunix's "
      f"{FAMILIES} models (tunix.models.<family>.model).")


def init_tunix_model(family: str, config: Any, seed: int = 0, *,
                     redraw_zero_kernels: bool = True,
                     abstract: bool = False) -> Any:
  """A randomly initialised Tunix model (``nnx.Module``).

  Tunix initialises the MLP kernels (``gate_proj``, ``up_proj``,
  ``down_proj``) with zeros: it expects checkpoints to be loaded. A
  zero-initialised gated MLP has zero output *and* zero gradient (each kernel's
  gradient goes through another zero kernel), so it would never train from
  scratch. With ``redraw_zero_kernels`` (the default) every all-zero kernel of
  rank >= 2 is redrawn from ``N(0, 1 / fan_in)`` (LeCun normal, fan_in =
  first axis); the other parameters keep Tunix's initialisers.

  Args:
    family: one of :data:`FAMILIES`.
    config: from :func:`tunix_model_config`.
    seed: the ``nnx.Rngs`` seed.
    redraw_zero_kernels: see above.
    abstract: a model whose parameters are ``jax.ShapeDtypeStruct`` s
      (``nnx.eval_shape``: nothing is allocated, e.g. an 8B model's shapes
      for ``kdjax.parallel.plan_train_step_memory``); no kernel is redrawn.
  """
  from flax import nnx
  module = _model_module(family)
  if not isinstance(config, module.ModelConfig):
    raise TypeError(f"config must be tunix.models.{family}.model.ModelConfig, "
                    f"got {type(config).__module__}.{type(config).__name__}.")
  _check_config(family, config)
  cls = getattr(module, _CLASS_NAMES[family])
  if abstract:
    return nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(seed)))
  model = cls(config, rngs=nnx.Rngs(seed))
  if redraw_zero_kernels:
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    key = jax.random.key(seed + 0x5EED)
    for i, (path, var) in enumerate(flat):
      value = var.get_value() if hasattr(var, "get_value") else var.value
      if value.ndim >= 2 and not bool(jnp.any(value)):
        std = 1.0 / float(value.shape[0]) ** 0.5
        new = std * jax.random.normal(jax.random.fold_in(key, i), value.shape,
                                      jnp.float32)
        var.set_value(new.astype(value.dtype))
    nnx.update(model, state)
  return model


def _attention_inputs(batch, tokens, prefix=""):
  """``(positions [B, T], attention_mask [B, T, T] bool, segment_ids or None)``
  (module docstring)."""
  b, t = tokens.shape
  packed = packing_inputs(batch, tokens.shape, prefix)
  if packed is not None:
    if INPUT_MASK_KEY in batch:
      raise ValueError(f"a packed batch ({sorted(batch)}) cannot also carry "
                       f"{INPUT_MASK_KEY!r}.")
    segment_ids, positions = packed
    return positions, packed_attention_mask(segment_ids, positions), segment_ids
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  if INPUT_MASK_KEY in batch:
    valid = jnp.asarray(batch[INPUT_MASK_KEY]).astype(jnp.bool_)
    if valid.shape != tokens.shape:
      raise ValueError(f"batch[{INPUT_MASK_KEY!r}] has shape {valid.shape}, "
                       f"the tokens {tokens.shape}.")
    positions = jnp.cumsum(valid.astype(jnp.int32), axis=-1)
    positions = positions - (positions >= 1)
    mask = causal[None] & valid[:, None, :]
  else:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = jnp.broadcast_to(causal[None], (b, t, t))
  return positions, mask, None


def _hidden_states(model, tokens, positions, attention_mask, cache=None,
                   segment_ids=None):
  """Final normalised hidden states ``[B, T, D]`` (and the updated cache).

  ``segment_ids`` (packed rows) reach the layers only where the mask alone
  would be ignored: Qwen3 with ``use_flash_attention``.
  """
  x = model.embedder.encode(tokens)
  new_cache = None if cache is None else {}
  extra = {}
  if (segment_ids is not None
      and getattr(model.config, "use_flash_attention", False)):
    extra["segment_ids"] = segment_ids
  for i, layer in enumerate(model.layers):
    name = f"layer_{i}"
    layer_cache, x = layer(x, positions, None if cache is None else cache[name],
                           attention_mask, **extra)
    if cache is not None:
      new_cache[name] = layer_cache
  return model.final_norm(x), new_cache


def _is_tied(params) -> bool:
  return "lm_head" not in params


def _logits(model, family: str, hidden):
  """The model's own unembedding of ``hidden`` (float32, as Qwen3 returns)."""
  if hasattr(model, "lm_head"):
    logits = model.lm_head(hidden)
  else:
    logits = model.embedder.decode(hidden)
  del family
  return jnp.asarray(logits, jnp.float32)


def _params_of(variables_or_model):
  from flax import nnx
  if isinstance(variables_or_model, nnx.Module):
    return nnx.state(variables_or_model, nnx.Param)
  if isinstance(variables_or_model, Mapping) and "params" in variables_or_model:
    return variables_or_model["params"]
  return variables_or_model


def _value(x):
  return x.get_value() if hasattr(x, "get_value") else getattr(x, "value", x)


def tunix_unembedding(variables_or_model: Any, family: Optional[str] = None
                      ) -> tuple[chex.Array, None]:
  """The unembedding ``(kernel [D, V], None)`` of a Tunix model.

  ``logits == hidden @ kernel`` with ``hidden`` the final normalised hidden
  states (feature ``"hidden"`` of :func:`make_tunix_lm_apply`): the
  transposed input embedding ``[V, D] -> [D, V]`` for tied models, else
  ``lm_head.w`` ``[D, V]``. None of the three families has a bias.

  Args:
    variables_or_model: the apply function's ``variables``, their
      ``["params"]`` (an ``nnx.State``) or the ``nnx.Module`` itself.
    family: optional, checked against :data:`FAMILIES` (tiedness is read from
      the parameters: a model without ``lm_head`` ties).
  """
  if family is not None:
    _check_family(family)
  params = _params_of(variables_or_model)
  try:
    if _is_tied(params):
      return jnp.transpose(_value(params["embedder"]["input_embedding"])), None
    return _value(params["lm_head"]["w"]), None
  except KeyError as e:
    keys = sorted(params) if isinstance(params, Mapping) else type(params)
    raise KeyError(f"not the parameters of a Tunix {FAMILIES} model: no "
                   f"{e} (top-level keys: {keys}).") from e


def make_tunix_lm_apply(model: Any, *, input_key: str = "tokens",
                        return_hidden: bool = False,
                        compute_logits: bool = True,
                        vocab_size: Optional[int] = None
                        ) -> tuple[ApplyFn, dict[str, Any]]:
  """The kdjax apply function of a Tunix Qwen3 / Llama 3 / Gemma 3 model.

  ``apply(variables, batch, *, train=False, rng=None) -> ModelOutput`` as
  :func:`kdjax.lm.make_lm_apply`: ``logits [B, T, V]`` (float32; ``V =
  vocab_size`` when given, the padded rows sliced off) from
  ``batch[input_key]``; with ``return_hidden``, ``features["hidden"] [B, T,
  D]`` (after the final RMSNorm). ``compute_logits=False`` (implies
  ``return_hidden``) never forms the logits: ``logits`` is ``None`` and the
  features add ``"unembedding_kernel" [D, V]`` (sliced to ``vocab_size``
  likewise, in the hidden states' dtype) for
  :func:`kdjax.lm.lean_token_kd_term` / ``lean_token_ce_term``. Positions and
  the attention mask follow the module docstring (right padding, or
  ``batch["input_mask"]``, or packed rows: ``segment_ids`` and
  ``positions``, block-diagonal causal). The models have no dropout: ``train``/``rng`` are
  accepted and ignored.

  Returns:
    ``(apply, variables)`` with ``variables = {"params": nnx.State}``;
    ``apply.family``, ``apply.config``, ``apply.graphdef`` and
    ``apply.vocab_size`` describe the model (:func:`rebuild_model`,
    :func:`make_tunix_rollout_fn` read them).
  """
  from flax import nnx
  family = tunix_family(model)
  rows = tunix_vocab_rows(family, model.config)
  if vocab_size is not None and not 1 <= vocab_size <= rows:
    raise ValueError(f"vocab_size={vocab_size} must lie in [1, {rows}] (the "
                     f"model's embedding rows); a tokenizer larger than the "
                     "model's vocabulary cannot be used with it.")
  return_hidden = return_hidden or not compute_logits
  graphdef, params = nnx.split(model, nnx.Param)
  extra = nnx.state(model, nnx.Not(nnx.Param))
  if jax.tree.leaves(extra):
    raise ValueError(f"{type(model).__name__} has non-parameter state "
                     f"{extra}; kdjax's Tunix adapter expects parameters only.")

  def apply(variables, batch, *, train: bool = False,
            rng: Optional[chex.PRNGKey] = None) -> ModelOutput:
    del train, rng
    if input_key not in batch:
      raise KeyError(f"the batch has no key {input_key!r}; keys present: "
                     f"{sorted(batch)}.")
    tokens = jnp.asarray(batch[input_key])
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, time], got shape "
                       f"{tokens.shape}.")
    module = nnx.merge(graphdef, _params_of(variables))
    positions, mask, segment_ids = _attention_inputs(
        batch, tokens, segment_key_prefix(input_key))
    hidden, _ = _hidden_states(module, tokens, positions, mask,
                               segment_ids=segment_ids)
    logits = None
    if compute_logits:
      logits = _logits(module, family, hidden)
      if vocab_size is not None and logits.shape[-1] != vocab_size:
        logits = logits[..., :vocab_size]
    if not return_hidden:
      return ModelOutput(logits=logits)
    features = {"hidden": hidden}
    if not compute_logits:
      kernel, _ = tunix_unembedding(variables)
      if vocab_size is not None and kernel.shape[-1] != vocab_size:
        kernel = kernel[:, :vocab_size]
      features["unembedding_kernel"] = kernel.astype(hidden.dtype)
    return ModelOutput(logits=logits, features=features)

  apply.family = family
  apply.config = model.config
  apply.graphdef = graphdef
  apply.vocab_size = vocab_size
  return apply, {"params": params}


def rebuild_model(model_like: Any, variables: Mapping[str, Any]) -> Any:
  """A Tunix ``nnx.Module`` holding ``variables`` (e.g. a trained student).

  Args:
    model_like: an apply function of :func:`make_tunix_lm_apply`, an
      ``nnx.GraphDef`` or a Tunix model of the same architecture.
    variables: ``{"params": nnx.State}`` (``state.student_variables()``) or
      the ``nnx.State`` itself.
  """
  from flax import nnx
  graphdef = getattr(model_like, "graphdef", None)
  if graphdef is None:
    if isinstance(model_like, nnx.Module):
      graphdef = nnx.graphdef(model_like)
    elif isinstance(model_like, nnx.GraphDef):
      graphdef = model_like
    else:
      raise TypeError("model_like must be an apply function of "
                      "make_tunix_lm_apply, an nnx.GraphDef or a Tunix model; "
                      f"got {type(model_like).__name__}.")
  return nnx.merge(graphdef, _params_of(variables))


def init_tunix_cache(family: str, config: Any, batch_size: int, cache_size: int,
                     dtype: jax.typing.DTypeLike = jnp.float32) -> dict:
  """An empty Tunix KV cache: ``{"layer_i": {"k", "v": [B, S, K, H], "end_index": [B]}}``."""
  _check_family(family)
  shape = (batch_size, cache_size, config.num_kv_heads, config.head_dim)
  return {f"layer_{i}": {"k": jnp.zeros(shape, dtype),
                         "v": jnp.zeros(shape, dtype),
                         "end_index": jnp.zeros((batch_size,), jnp.int32)}
          for i in range(config.num_layers)}


def tunix_generate(apply: ApplyFn, variables: Mapping[str, Any],
                   tokens: chex.Array, prompt_len: chex.Array,
                   rng: chex.PRNGKey, config: SamplingConfig, *,
                   cache_dtype: jax.typing.DTypeLike = jnp.float32
                   ) -> GenerationOutput:
  """:func:`kdjax.lm.generate` for a Tunix model (jit-safe, KV-cached).

  Same contract as ``kdjax.lm.generate``: fills the ``[B, S]`` buffer after
  each prompt (``tokens[b, :prompt_len[b]]``) until EOS or the buffer's end;
  prompt tokens are teacher-forced, all examples share the cache position.
  Each step feeds one token with ``positions = t`` and the attention mask
  ``keys <= t`` over a cache of ``S - 1`` entries through the model's own
  attention (Gemma 3's local layers apply their sliding window to it).

  Args:
    apply: from :func:`make_tunix_lm_apply` (its ``graphdef``/``family``).
    variables: its variables.
    tokens, prompt_len, rng, config: as in ``kdjax.lm.generate``.
    cache_dtype: the KV cache's dtype.
  """
  from flax import nnx
  graphdef = getattr(apply, "graphdef", None)
  if graphdef is None:
    raise ValueError("apply must come from make_tunix_lm_apply.")
  tokens, prompt_len, p0 = prepare_token_buffer(tokens, prompt_len, config)
  b, s = tokens.shape
  steps = s - 1
  model = nnx.merge(graphdef, _params_of(variables))
  cache = init_tunix_cache(apply.family, apply.config, b, steps, cache_dtype)
  keys = jnp.arange(steps)

  def run(x, start, cache):
    t = x.shape[1]
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = keys[None, None, :] <= positions[:, :, None]
    hidden, cache = _hidden_states(model, x, positions, mask, cache)
    return hidden, cache

  if p0 > 1:
    _, cache = run(tokens[:, :p0 - 1], jnp.zeros((), jnp.int32), cache)

  def body(carry):
    t, buf, cache, done, key = carry
    key, sub = jax.random.split(key)
    x = jax.lax.dynamic_slice_in_dim(buf, t, 1, axis=1)
    hidden, cache = run(x, t, cache)
    logits = _logits(model, apply.family, hidden)[:, 0]
    sampled = sample_logits(logits, sub, config)
    in_prompt = t + 1 < prompt_len
    forced = jax.lax.dynamic_index_in_dim(buf, t + 1, axis=1, keepdims=False)
    new = jnp.where(in_prompt, forced, jnp.where(done, config.pad_id, sampled))
    if config.eos_id is not None:
      done = done | (~in_prompt & (new == config.eos_id))
    buf = jax.lax.dynamic_update_slice_in_dim(buf, new[:, None], t + 1, axis=1)
    return t + 1, buf, cache, done, key

  def cond(carry):
    t, _, _, done, _ = carry
    return (t < steps) & ~jnp.all(done)

  init = (jnp.asarray(p0 - 1, jnp.int32), tokens, cache,
          jnp.zeros((b,), bool), rng)
  _, tokens, _, _, _ = jax.lax.while_loop(cond, body, init)
  return GenerationOutput(tokens, _valid_lengths(tokens, prompt_len,
                                                 config.eos_id))


def make_tunix_rollout_fn(apply: ApplyFn, config: SamplingConfig, *,
                          cache_dtype: jax.typing.DTypeLike = jnp.float32
                          ) -> Callable[..., dict]:
  """``rollout(variables, batch, rng) -> batch`` of a Tunix model's continuations.

  :func:`kdjax.lm.make_rollout_fn` for :func:`make_tunix_lm_apply` models
  (:func:`tunix_generate`): pass it as ``rollout_fn=`` to
  ``kdjax.lm.make_gkd_train_step`` (the student generates) or
  ``make_sequence_kd_step`` (the teacher generates). The apply function may be
  the lean one (``compute_logits=False``): generation uses the same
  variables through the model's own unembedding.
  """
  if getattr(apply, "graphdef", None) is None:
    raise ValueError("apply must come from make_tunix_lm_apply.")

  def rollout(variables, batch, rng) -> dict:
    check_unpacked(batch, "a rollout (kdjax.lm.make_tunix_rollout_fn)")
    tokens = jnp.asarray(batch["tokens"])
    buf = jnp.concatenate([tokens, jnp.asarray(batch["targets"])[:, -1:]],
                          axis=1)
    prompt_len = jnp.asarray(batch["prompt_len"], jnp.int32)
    out = tunix_generate(apply, variables, buf, prompt_len, rng, config,
                         cache_dtype=cache_dtype)
    new = batch_from_generation(out, prompt_len, config.pad_id)
    merged = dict(batch)
    for key, value in new.items():
      merged[key] = (value.astype(jnp.asarray(batch[key]).dtype)
                     if key in batch else value)
    return merged

  return rollout
