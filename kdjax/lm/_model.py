"""A small decoder-only transformer (Flax linen) for language-model distillation.

``DecoderLM(config)`` is a pre-LayerNorm GPT-style decoder: token and learned
position embeddings, ``num_layers`` blocks of causal multi-head
self-attention (``jax.nn.dot_product_attention``, which picks cuDNN's fused
flash attention on GPUs that have it and XLA elsewhere) and a GELU MLP, a
final LayerNorm and an untied unembedding ``logits = h @ W_U + b_U``.

Shapes: ``tokens [B, T]`` int32 -> ``logits [B, T, V]`` (``V =
config.vocab_size`` rows, which may be larger than the tokenizer's vocabulary:
padded rows, see ``kdjax.lm.align_vocab``), final hidden states ``[B, T, D]``
(after the final LayerNorm, so ``logits == hidden @ kernel + bias`` exactly
with :func:`unembedding`; the memory-lean losses use these two).

KV cache: ``init_cache(config, batch_size, max_len)`` gives per-layer
``{"k", "v"}`` buffers ``[B, max_len, H, D / H]``; calling the module with
``cache=..., cache_index=i`` writes the keys/values of the ``T`` new tokens at
positions ``i .. i + T - 1`` and attends over positions ``<= `` each query's,
returning the updated cache. Every example of the batch shares ``cache_index``
(prompts of different lengths are handled by the generation loop, see
``kdjax.lm.generate``).

Packed rows (``kdjax.lm.make_packed_batch``): with ``segment_ids`` and
``positions`` ``[B, T]`` the attention is block-diagonal causal
(``kdjax.lm.packed_attention_mask``: a token attends to its own segment only)
and the position embedding is read at ``positions`` (restarting at 0 in each
segment), so each packed example gets the logits it has alone. Without them
the model is exactly the plain causal one.

Compute dtype follows the parameters (``dtype=None`` layers): the train step's
``kdjax.train.Policy`` casts float32 master weights to bfloat16 for compute.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from kdjax.lm._packing import packed_attention_mask
from kdjax.lm._packing import packing_inputs
from kdjax.lm._packing import segment_key_prefix
from kdjax.lm._packing import segment_positions
from kdjax.models import ApplyFn
from kdjax.models import ModelOutput


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes of a :class:`DecoderLM`.

  Attributes:
    vocab_size: rows of the embedding and unembedding (may exceed the
      tokenizer's vocabulary: padding rows).
    num_layers: number of transformer blocks.
    num_heads: attention heads; ``d_model`` must be divisible by it.
    d_model: residual width ``D``.
    d_ff: MLP hidden width (default ``4 * d_model``).
    max_len: longest sequence (learned position embeddings).
    unembed_bias: whether the unembedding has a bias.
    attention_implementation: ``None`` (auto: cuDNN where available),
      ``"xla"`` or ``"cudnn"``; passed to ``jax.nn.dot_product_attention``.
  """
  vocab_size: int = 259
  num_layers: int = 2
  num_heads: int = 4
  d_model: int = 128
  d_ff: Optional[int] = None
  max_len: int = 256
  unembed_bias: bool = True
  attention_implementation: Optional[str] = None

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "num_heads", "d_model", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"TransformerConfig.{name} must be an int >= 1, got "
                         f"{value!r}.")
    if self.d_model % self.num_heads:
      raise ValueError(
          f"d_model={self.d_model} is not divisible by num_heads="
          f"{self.num_heads}.")

  @property
  def ff_width(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def num_params(self) -> int:
    """Number of parameters (embeddings included)."""
    d, f, v = self.d_model, self.ff_width, self.vocab_size
    block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    return (v * d + self.max_len * d + self.num_layers * block + 2 * d
            + d * v + (v if self.unembed_bias else 0))

  def matmul_flops_per_token(self, seq_len: int) -> int:
    """Forward matmul FLOPs per token (``2 * params_in_matmuls + attention``)."""
    d, f, v = self.d_model, self.ff_width, self.vocab_size
    dense = 2 * (self.num_layers * (4 * d * d + 2 * d * f) + d * v)
    attention = 2 * 2 * self.num_layers * seq_len * d  # QK^T and AV (causal: /2 useful)
    return dense + attention


def _causal_cache_mask(query_positions: chex.Array, key_len: int) -> chex.Array:
  """``[1, 1, Tq, S]`` boolean: key position ``<=`` query position."""
  keys = jnp.arange(key_len)
  return (keys[None, :] <= query_positions[:, None])[None, None]


class _Attention(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, cache=None, cache_index=None, mask=None):
    cfg = self.config
    b, t, _ = x.shape
    qkv = nn.DenseGeneral((3, cfg.num_heads, cfg.head_dim), name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
    if cache is None and mask is not None:  # packed rows: [B, 1, T, T]
      out = jax.nn.dot_product_attention(
          q, k, v, mask=mask, is_causal=True,
          implementation=cfg.attention_implementation)
      new_cache = None
    elif cache is None:
      out = jax.nn.dot_product_attention(
          q, k, v, is_causal=True,
          implementation=cfg.attention_implementation)
      new_cache = None
    else:
      index = jnp.asarray(cache_index, jnp.int32)
      zero = jnp.zeros((), jnp.int32)
      k_all = jax.lax.dynamic_update_slice(
          cache["k"], k.astype(cache["k"].dtype), (zero, index, zero, zero))
      v_all = jax.lax.dynamic_update_slice(
          cache["v"], v.astype(cache["v"].dtype), (zero, index, zero, zero))
      mask = _causal_cache_mask(index + jnp.arange(t), k_all.shape[1])
      out = jax.nn.dot_product_attention(
          q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask=mask,
          implementation="xla")
      new_cache = {"k": k_all, "v": v_all}
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), name="out")(out)
    return out, new_cache


class _Block(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, cache=None, cache_index=None, mask=None):
    cfg = self.config
    h, new_cache = _Attention(cfg, name="attn")(
        nn.LayerNorm(name="ln_attn")(x), cache, cache_index, mask)
    x = x + h
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(cfg.ff_width, name="mlp_in")(h)
    h = nn.gelu(h)
    h = nn.Dense(cfg.d_model, name="mlp_out")(h)
    return x + h, new_cache


class DecoderLM(nn.Module):
  """Decoder-only causal transformer; see the module docstring.

  ``__call__(tokens [B, T], *, cache=None, cache_index=None,
  return_hidden=False, compute_logits=True, segment_ids=None,
  positions=None)`` returns ``logits [B, T, V]``
  (``None`` with ``compute_logits=False``: the unembedding is not applied),
  plus a dict with ``"hidden"`` (``[B, T, D]``, when ``return_hidden``) and
  ``"cache"`` (when a cache is passed): ``(logits, extras)``. ``segment_ids``
  (int ``[B, T]``, 0 = padding) makes the attention block-diagonal causal
  and ``positions`` (int ``[B, T]``, default: restarting at 0 in each
  segment) index the position embedding: packed rows, see the module
  docstring (not with a cache).
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: chex.Array, *, cache=None, cache_index=None,
               return_hidden: bool = False, compute_logits: bool = True,
               segment_ids: Optional[chex.Array] = None,
               positions: Optional[chex.Array] = None):
    cfg = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}.")
    b, t = tokens.shape
    start = 0 if cache is None else cache_index
    if cache is None and t > cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len={cfg.max_len}.")
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed",
                     embedding_init=nn.initializers.normal(0.02))
    pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                           (cfg.max_len, cfg.d_model))
    x = embed(tokens)
    mask = None
    if segment_ids is not None:
      if cache is not None:
        raise ValueError("segment_ids (packed rows) cannot be used with a KV "
                         "cache.")
      if positions is None:
        positions = segment_positions(segment_ids)
      mask = packed_attention_mask(segment_ids, positions)[:, None]
      x = x + jnp.take(pos_embed, jnp.asarray(positions, jnp.int32),
                       axis=0).astype(x.dtype)
    elif positions is not None:
      raise ValueError("positions without segment_ids: pass both (packed "
                       "rows) or neither.")
    else:
      positions = jnp.asarray(start, jnp.int32) + jnp.arange(t)
      x = x + jnp.take(pos_embed, positions, axis=0).astype(x.dtype)[None]
    new_caches = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else cache[i]
      x, c = _Block(cfg, name=f"block_{i}")(x, layer_cache, cache_index, mask)
      new_caches.append(c)
    hidden = nn.LayerNorm(name="ln_final")(x)
    if compute_logits or self.is_initializing():
      logits = nn.Dense(cfg.vocab_size, use_bias=cfg.unembed_bias,
                        name="unembed")(hidden)
    else:  # memory-lean losses form the logits chunk by chunk themselves
      logits = None
    extras = {}
    if return_hidden:
      extras["hidden"] = hidden
    if cache is not None:
      extras["cache"] = new_caches
    if extras:
      return logits, extras
    return logits


def init_lm(config: TransformerConfig, rng: chex.PRNGKey,
            seq_len: int = 8) -> dict:
  """Initial ``{"params": ...}`` of a :class:`DecoderLM` (float32)."""
  return DecoderLM(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))


def init_cache(config: TransformerConfig, batch_size: int, max_len: int,
               dtype: jax.typing.DTypeLike = jnp.float32) -> list:
  """An empty KV cache: per layer ``{"k", "v"}`` of ``[B, max_len, H, D / H]``."""
  if max_len > config.max_len:
    raise ValueError(f"cache length {max_len} exceeds max_len={config.max_len}.")
  shape = (batch_size, max_len, config.num_heads, config.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(config.num_layers)]


def unembedding(params: Mapping[str, Any]) -> tuple[chex.Array, Optional[chex.Array]]:
  """The unembedding ``(kernel [D, V], bias [V] or None)`` of a :class:`DecoderLM`.

  ``logits = hidden @ kernel + bias`` with ``hidden`` the final (normalised)
  hidden states the apply function returns as feature ``"hidden"``. Accepts
  ``variables`` or ``variables["params"]``.
  """
  if "params" in params:
    params = params["params"]
  if "unembed" not in params:
    raise KeyError(f"no 'unembed' in the params; keys: {sorted(params)}.")
  layer = params["unembed"]
  return layer["kernel"], layer.get("bias")


def make_lm_apply(config: TransformerConfig, *, input_key: str = "tokens",
                  return_hidden: bool = False,
                  compute_logits: bool = True) -> ApplyFn:
  """The ``kdjax`` apply function of a :class:`DecoderLM`.

  ``apply(variables, batch, *, train=False, rng=None) -> ModelOutput`` with
  ``logits [B, T, V]`` from ``batch[input_key]`` and, when ``return_hidden``,
  ``features["hidden"] [B, T, D]`` (the final normalised hidden states). The
  model has no dropout: ``train`` and ``rng`` are accepted and ignored.

  ``compute_logits=False`` (implies ``return_hidden``) is the memory-lean
  mode for large vocabularies: ``logits`` is ``None`` and the features add
  the unembedding, ``"unembedding_kernel" [D, V]`` and (with a bias)
  ``"unembedding_bias" [V]``, taken from ``variables`` so that gradients
  reach them; ``kdjax.lm.lean_token_kd_term`` and ``lean_token_ce_term``
  compute the losses chunk by chunk from these (``kdjax.losses.
  divergence_from_hidden``) without ever forming ``[B, T, V]``.

  A packed batch (``kdjax.lm.make_packed_batch``: ``segment_ids`` and
  ``positions``; with ``input_key="teacher_tokens"``, ``teacher_segment_ids``
  and ``teacher_positions``) is run with the block-diagonal causal mask, in
  both modes.
  """
  module = DecoderLM(config)
  return_hidden = return_hidden or not compute_logits
  prefix = segment_key_prefix(input_key)

  def apply(variables, batch, *, train: bool = False,
            rng: Optional[chex.PRNGKey] = None) -> ModelOutput:
    del train, rng
    if input_key not in batch:
      raise KeyError(f"the batch has no key {input_key!r}; keys present: "
                     f"{sorted(batch)}.")
    tokens = jnp.asarray(batch[input_key])
    packed = packing_inputs(batch, tokens.shape, prefix)
    segments = {} if packed is None else dict(zip(("segment_ids",
                                                   "positions"), packed))
    out = module.apply(variables, tokens, return_hidden=return_hidden,
                       compute_logits=compute_logits, **segments)
    if return_hidden:
      logits, extras = out
      features = {"hidden": extras["hidden"]}
      if not compute_logits:
        kernel, bias = unembedding(variables)
        features["unembedding_kernel"] = kernel.astype(extras["hidden"].dtype)
        if bias is not None:
          features["unembedding_bias"] = bias.astype(extras["hidden"].dtype)
      return ModelOutput(logits=logits, features=features)
    return ModelOutput(logits=out)

  apply.module = module
  apply.config = config
  return apply
