"""A language model with everything distillation needs, in one bundle.

:class:`LMModel` holds a model's apply function (with logits), its memory-lean
apply function (final hidden states plus the unembedding, no ``[B, T, V]``
logits: ``kdjax.lm.lean_token_kd_term``), fresh variables, and generation
(a KV-cached sampler inside ``jit``). Two constructors:

* :func:`decoder_lm_model`: kdjax's :class:`kdjax.lm.DecoderLM` of a
  :class:`kdjax.lm.TransformerConfig`;
* :func:`tunix_lm_model`: a Tunix Qwen3 / Llama 3 / Gemma 3 model instance
  (random, e.g. ``kdjax.lm.init_tunix_model``, or loaded from a Hugging Face
  checkpoint, ``kdjax.lm.load_hf_checkpoint``).

Tunix's models keep their parameters in an ``nnx.State``; an :class:`LMModel`
keeps them as a plain nested dict of arrays (string keys: the state's
paths), which ``kdjax.checkpoint`` saves and restores like any pytree, and its
functions turn them back into the state's structure (:class:`NNXParams`).
``google-tunix`` is imported only when a Tunix model is used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax

from kdjax.lm._generate import generate as _generate
from kdjax.lm._generate import make_rollout_fn
from kdjax.lm._generate import SamplingConfig
from kdjax.lm._model import init_lm
from kdjax.lm._model import make_lm_apply
from kdjax.lm._model import TransformerConfig
from kdjax.lm._tunix import make_tunix_lm_apply
from kdjax.lm._tunix import make_tunix_rollout_fn
from kdjax.lm._tunix import tunix_generate
from kdjax.lm._tunix import tunix_vocab_rows


class VocabularySizeError(ValueError):
  """A model with fewer embedding rows than its tokenizer has ids."""


@dataclasses.dataclass
class LMModel:
  """A language model as distillation uses it.

  Attributes:
    family: ``"kdjax"``, ``"qwen3"``, ``"llama3"`` or ``"gemma3"``.
    apply: ``apply(variables, batch, *, train=False, rng=None) ->
      ModelOutput`` with ``logits [B, T, V]`` (``V`` the tokenizer's
      vocabulary for Tunix models; the model's rows for kdjax's, sliced by the
      losses' ``vocab_size``).
    lean_apply: the same model with ``compute_logits=False``: features
      ``hidden`` and ``unembedding_kernel`` (and bias).
    variables: ``{"params": ...}`` (fresh or loaded; for Tunix models a plain
      nested dict, see :class:`NNXParams`).
    rows: the model's embedding rows (>= the tokenizer's vocabulary).
    max_len: the longest sequence it takes (kdjax: learned positions), or
      None (Tunix: rotary positions).
    description: e.g. ``"kdjax DecoderLM small (2 layers, d_model 64, 4
      heads, vocabulary 264)"``.
    rollout: ``rollout(sampling: SamplingConfig) -> rollout_fn(variables,
      batch, rng) -> batch`` (for GKD, ``kdjax.lm.make_gkd_train_step``).
    generate: ``generate(variables, tokens, prompt_len, rng, sampling) ->
      GenerationOutput`` (jit-safe).
    tunix_model: the Tunix ``nnx.Module`` (e.g. for the Hugging Face export),
      else None.
    to_nnx: Tunix models: ``to_nnx(variables) -> {"params": nnx.State}``
      (the variables Tunix's functions and ``kdjax.lm.rebuild_model`` take);
      else None.
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


def decoder_lm_model(config: TransformerConfig, *, seed: int,
                     name: str = "custom", abstract: bool = False) -> LMModel:
  """The :class:`LMModel` of kdjax's :class:`kdjax.lm.DecoderLM`.

  The variables are ``init_lm(config, PRNGKey(seed))`` run as one jitted
  function (op by op, flax's init would compile every op).

  Args:
    config: the model; ``config.vocab_size`` is its embedding rows (may
      exceed the tokenizer's vocabulary).
    seed: the initialisation seed.
    name: names the model in ``description`` (e.g. a size preset).
    abstract: the variables are ``jax.ShapeDtypeStruct`` s (``jax.eval_shape``
      of the initialisation: nothing is allocated), e.g. for
      ``kdjax.parallel.plan_train_step_memory``.

  Returns:
    The model, ``family="kdjax"``, ``max_len=config.max_len``.
  """
  apply = make_lm_apply(config)
  lean = make_lm_apply(config, compute_logits=False)
  init = lambda key: init_lm(config, key)
  key = jax.random.PRNGKey(seed)
  variables = jax.eval_shape(init, key) if abstract else jax.jit(init)(key)

  def generate(variables, tokens, prompt_len, rng, sampling):
    return _generate(apply.module, variables, tokens, prompt_len, rng,
                     sampling)

  def rollout(sampling: SamplingConfig) -> Callable:
    return make_rollout_fn(apply.module, sampling)

  return LMModel(
      family="kdjax", apply=apply, lean_apply=lean, variables=variables,
      rows=config.vocab_size, max_len=config.max_len,
      description=(f"kdjax DecoderLM {name} ({config.num_layers} layers, "
                   f"d_model {config.d_model}, {config.num_heads} heads, "
                   f"vocabulary {config.vocab_size})"),
      rollout=rollout, generate=generate)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


class NNXParams:
  """Plain nested dicts <-> the structure of an ``nnx.State`` (or any pytree).

  ``NNXParams(state).plain`` is the state's leaves in nested dicts keyed by
  the names of their key paths (attribute names, list indices as strings, and
  each ``nnx.Variable``'s own ``"value"`` last: ``{"layers": {"0":
  {"kernel": {"value": array}}}}``);
  ``to_state(plain)`` puts the leaves of any dict of that layout (e.g. the
  trained or restored one) back into the state's structure.

  Attributes:
    plain: the state's own leaves as a nested dict.
  """

  def __init__(self, state: Any):
    """Reads the structure (and leaves) of ``state``.

    Args:
      state: an ``nnx.State`` of parameters (e.g. ``nnx.split(model,
        nnx.Param)[1]``), or any pytree.
    """
    leaves, self._treedef = jax.tree_util.tree_flatten_with_path(state)
    self._paths = tuple(tuple(_key_name(k) for k in path)
                        for path, _ in leaves)
    self.plain: dict = {}
    for path, (_, leaf) in zip(self._paths, leaves):
      node = self.plain
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = leaf

  @property
  def paths(self) -> tuple[tuple[str, ...], ...]:
    """Each leaf's key path (names), in the state's leaf order."""
    return self._paths

  def to_state(self, plain: Mapping[str, Any]) -> Any:
    """The state of the leaves of ``plain`` (the layout of :attr:`plain`).

    Args:
      plain: a nested dict with every path of :attr:`paths` (arrays or
        tracers; other keys are ignored).

    Returns:
      A pytree of the original state's structure.

    Raises:
      KeyError: a path missing from ``plain``.
    """
    leaves = []
    for path in self._paths:
      node = plain
      for name in path:
        node = node[name]
      leaves.append(node)
    return jax.tree_util.tree_unflatten(self._treedef, leaves)


def tunix_lm_model(model: Any, family: str, vocab_size: int,
                   name: str) -> LMModel:
  """The :class:`LMModel` of a Tunix model instance.

  Its variables are the model's current parameters as a plain nested dict
  (:class:`NNXParams`); its functions take that layout.

  Args:
    model: a Tunix ``Qwen3``, ``Llama3`` or ``Gemma3`` (``nnx.Module``).
    family: its family: ``"qwen3"``, ``"llama3"`` or ``"gemma3"``
      (``kdjax.lm.tunix_family(model)``).
    vocab_size: the tokenizer's vocabulary (the logits' ``V``).
    name: names the model in ``description`` and errors (e.g. ``"qwen3
      tiny"``).

  Returns:
    The model, ``max_len=None``, with ``tunix_model=model`` and ``to_nnx``.

  Raises:
    VocabularySizeError: the model has fewer embedding rows than
      ``vocab_size``.
    ValueError: an unknown family.
    ImportError: ``google-tunix`` (or flax's NNX) cannot be imported.
  """
  config = model.config
  rows = tunix_vocab_rows(family, config)
  if rows < vocab_size:
    raise VocabularySizeError(
        f"{name} has {rows} vocabulary rows but the tokenizer has "
        f"{vocab_size} ids: a tokenizer larger than the model's vocabulary "
        "cannot be used with it.")
  apply_nnx, variables = make_tunix_lm_apply(model, vocab_size=vocab_size)
  lean_nnx, _ = make_tunix_lm_apply(model, compute_logits=False,
                                    vocab_size=vocab_size)
  params = NNXParams(variables["params"])

  def to_nnx(variables):
    return {"params": params.to_state(variables["params"])}

  def wrap(fn):
    def apply(variables, batch, *, train=False, rng=None):
      return fn(to_nnx(variables), batch, train=train, rng=rng)
    return apply

  def rollout(sampling: SamplingConfig) -> Callable:
    inner = make_tunix_rollout_fn(apply_nnx, sampling)
    return lambda variables, batch, rng: inner(to_nnx(variables), batch, rng)

  def generate(variables, tokens, prompt_len, rng, sampling):
    return tunix_generate(apply_nnx, to_nnx(variables), tokens, prompt_len,
                          rng, sampling)

  return LMModel(
      family=family, apply=wrap(apply_nnx), lean_apply=wrap(lean_nnx),
      variables={"params": params.plain}, rows=rows, max_len=None,
      description=(f"tunix {name} ({config.num_layers} layers, width "
                   f"{config.embed_dim}, vocabulary {rows})"),
      rollout=rollout, generate=generate, tunix_model=model, to_nnx=to_nnx)
