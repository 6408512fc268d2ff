"""Jitted autoregressive generation with a KV cache, and rollouts into batches.

:func:`generate` fills a ``[B, S]`` token buffer whose first ``prompt_len[b]``
entries are the prompt of example ``b``. One ``lax.while_loop`` step feeds the
token at position ``t`` (all examples at the same position, so they share the
cache index), gets the logits of position ``t + 1`` and writes either the next
prompt token (``t + 1 < prompt_len[b]``: the prompt is teacher-forced) or a
sample. An optional parallel prefill of the first ``prefill_length`` tokens
(at most the shortest prompt) saves those steps. The loop stops when every
example has produced EOS or the buffer is full; positions after an example's
EOS hold PAD.

Sampling (:func:`sample_logits`): ``logits / temperature``, keep the ``top_k``
largest, keep the smallest set of tokens whose probability reaches ``top_p``
(nucleus sampling, Holtzman et al. 2020), then a categorical draw; greedy
(argmax) when ``temperature == 0``. ``vocab_size`` drops padded vocabulary
rows and ``suppress_ids`` (PAD, BOS) are never sampled.

``use_cache=False`` runs the full forward pass over the buffer at every step
(quadratic; a reference to test the cache against).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp

from kdjax.lm._model import DecoderLM
from kdjax.lm._model import init_cache
from kdjax.lm._packing import check_unpacked


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick the next token.

  Attributes:
    temperature: ``0`` for greedy decoding, else the softmax temperature.
    top_k: keep the ``k`` most likely tokens (``None``: all).
    top_p: nucleus mass in ``(0, 1]`` (``None`` or ``1``: all).
    vocab_size: sample among ids ``< vocab_size`` only (padded rows off).
    suppress_ids: ids never sampled (e.g. PAD and BOS).
    eos_id: the end-of-sequence id (``None``: run to the buffer's end).
    pad_id: written after EOS.
    prefill_length: tokens run in one parallel prefill (``1 <=`` it ``<=``
      every prompt's length).
  """
  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  vocab_size: Optional[int] = None
  suppress_ids: Sequence[int] = ()
  eos_id: Optional[int] = None
  pad_id: int = 0
  prefill_length: int = 1

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}.")
    if self.prefill_length < 1:
      raise ValueError(f"prefill_length must be >= 1, got "
                       f"{self.prefill_length}.")


def sample_logits(logits: chex.Array, rng: chex.PRNGKey,
                  config: SamplingConfig) -> chex.Array:
  """Draws ``[B]`` token ids from ``[B, V]`` logits (see :class:`SamplingConfig`)."""
  logits = jnp.asarray(logits, jnp.float32)
  if config.vocab_size is not None:
    logits = logits[..., :config.vocab_size]
  if config.suppress_ids:
    ids = [int(i) for i in config.suppress_ids if 0 <= i < logits.shape[-1]]
    if ids:
      logits = logits.at[..., jnp.asarray(ids, jnp.int32)].set(-jnp.inf)
  if config.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / config.temperature
  if config.top_k is not None and config.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if config.top_p is not None and config.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < config.top_p  # the top-1 always kept
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1,
                        keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class GenerationOutput(NamedTuple):
  """``tokens [B, S]`` (prompt, continuation, EOS, then PAD) and ``lengths [B]``
  (valid ids: prompt + continuation, EOS included)."""
  tokens: chex.Array
  lengths: chex.Array


def _valid_lengths(tokens, prompt_len, eos_id):
  s = tokens.shape[1]
  if eos_id is None:
    return jnp.full(tokens.shape[:1], s, jnp.int32)
  pos = jnp.arange(s)[None]
  is_eos = (tokens == eos_id) & (pos >= prompt_len[:, None])
  first = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, s)
  return first.astype(jnp.int32)


def prepare_token_buffer(tokens: chex.Array, prompt_len: chex.Array,
                         config: "SamplingConfig") -> tuple:
  """Checks a generation buffer; ``(tokens, prompt_len, prefill_length)``.

  ``tokens [B, S]`` (``S >= 2``) with every entry at or past ``prompt_len[b]``
  replaced by ``config.pad_id``; ``config.prefill_length < S`` is required.
  Shared by :func:`generate` and ``kdjax.lm.tunix_generate``.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  prompt_len = jnp.asarray(prompt_len, jnp.int32)
  s = tokens.shape[1]
  if s < 2:
    raise ValueError(f"the token buffer needs >= 2 positions, got {s}.")
  p0 = config.prefill_length
  if p0 > s - 1:
    raise ValueError(f"prefill_length={p0} must be < the buffer length {s}.")
  pos = jnp.arange(s)[None]
  tokens = jnp.where(pos < prompt_len[:, None], tokens, config.pad_id)
  return tokens, prompt_len, p0


def generate(module: DecoderLM,
             variables: Mapping[str, Any],
             tokens: chex.Array,
             prompt_len: chex.Array,
             rng: chex.PRNGKey,
             config: SamplingConfig,
             *,
             use_cache: bool = True,
             cache_dtype: jax.typing.DTypeLike = jnp.float32
             ) -> GenerationOutput:
  """Continues each prompt until EOS or the end of the buffer (jit-safe).

  Args:
    module: the :class:`DecoderLM`.
    variables: its ``{"params": ...}``.
    tokens: ``[B, S]`` int buffer; entries ``< prompt_len[b]`` are the prompt
      (the rest is ignored). ``S - 1 <= config.max_len``.
    prompt_len: ``[B]`` ints in ``[prefill_length, S]``.
    rng: PRNG key (unused when greedy).
    config: :class:`SamplingConfig`.
    use_cache: KV cache (``O(S)`` per token) or full recompute (reference).

  Returns:
    :class:`GenerationOutput`.
  """
  tokens, prompt_len, p0 = prepare_token_buffer(tokens, prompt_len, config)
  b, s = tokens.shape
  steps = s - 1  # positions fed: 0 .. s-2

  if use_cache:
    cache = init_cache(module.config, b, steps, cache_dtype)
    if p0 > 1:
      _, extras = module.apply(variables, tokens[:, :p0 - 1], cache=cache,
                               cache_index=0)
      cache = extras["cache"]
  else:
    cache = None

  def next_logits(t, buf, cache):
    if use_cache:
      x = jax.lax.dynamic_slice_in_dim(buf, t, 1, axis=1)
      logits, extras = module.apply(variables, x, cache=cache, cache_index=t)
      return logits[:, 0], extras["cache"]
    logits = module.apply(variables, buf[:, :steps])
    return jax.lax.dynamic_index_in_dim(logits, t, axis=1,
                                        keepdims=False), cache

  def cond(carry):
    t, _, _, done, _ = carry
    return (t < steps) & ~jnp.all(done)

  def body(carry):
    t, buf, cache, done, key = carry
    key, sub = jax.random.split(key)
    logits, cache = next_logits(t, buf, cache)
    sampled = sample_logits(logits, sub, config)
    in_prompt = t + 1 < prompt_len
    forced = jax.lax.dynamic_index_in_dim(buf, t + 1, axis=1, keepdims=False)
    new = jnp.where(in_prompt, forced, jnp.where(done, config.pad_id, sampled))
    if config.eos_id is not None:
      done = done | (~in_prompt & (new == config.eos_id))
    buf = jax.lax.dynamic_update_slice_in_dim(buf, new[:, None], t + 1, axis=1)
    return t + 1, buf, cache, done, key

  init = (jnp.asarray(p0 - 1, jnp.int32), tokens, cache,
          jnp.zeros((b,), bool), rng)
  _, tokens, _, _, _ = jax.lax.while_loop(cond, body, init)
  return GenerationOutput(tokens, _valid_lengths(tokens, prompt_len,
                                                 config.eos_id))


def batch_from_generation(out: GenerationOutput, prompt_len: chex.Array,
                          pad_id: int) -> dict:
  """``[B, L + 1]`` generated ids -> ``{"tokens", "targets", "loss_mask", "prompt_len"}``.

  ``loss_mask[b, t] = 1`` iff ``prompt_len[b] <= t + 1 < lengths[b]``: only
  the generated tokens (EOS included) are trained on; ids past ``lengths``
  are PAD.
  """
  ids, lengths = out.tokens, out.lengths
  pos = jnp.arange(ids.shape[1])[None]
  ids = jnp.where(pos < lengths[:, None], ids, pad_id)
  t1 = jnp.arange(1, ids.shape[1])[None]
  mask = (t1 >= prompt_len[:, None]) & (t1 < lengths[:, None])
  return {"tokens": ids[:, :-1], "targets": ids[:, 1:],
          "loss_mask": mask.astype(jnp.float32),
          "prompt_len": jnp.asarray(prompt_len, jnp.int32)}


def make_rollout_fn(module: DecoderLM, config: SamplingConfig, *,
                    use_cache: bool = True
                    ) -> Callable[..., dict]:
  """``rollout(variables, batch, rng) -> batch`` of the model's continuations.

  The prompt of example ``b`` is ``batch["tokens"][b, :prompt_len[b]]``; the
  model continues it to the batch's length ``L`` (a buffer of ``L + 1`` ids),
  and the result is a batch of the same keys, shapes and dtypes (other keys
  copied through) whose loss mask covers the generated tokens. Used for
  sequence-level KD (the teacher generates) and on-policy GKD (the student
  generates).
  """

  def rollout(variables, batch, rng) -> dict:
    check_unpacked(batch, "a rollout (kdjax.lm.make_rollout_fn)")
    tokens = jnp.asarray(batch["tokens"])
    buf = jnp.concatenate([tokens, jnp.asarray(batch["targets"])[:, -1:]],
                          axis=1)
    prompt_len = jnp.asarray(batch["prompt_len"], jnp.int32)
    out = generate(module, variables, buf, prompt_len, rng, config,
                   use_cache=use_cache)
    new = batch_from_generation(out, prompt_len, config.pad_id)
    merged = dict(batch)
    for key, value in new.items():
      merged[key] = value.astype(jnp.asarray(batch[key]).dtype) if key in batch else value
    return merged

  return rollout
