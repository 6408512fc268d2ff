"""Adapters: Flax linen modules, Flax NNX modules and plain functions as apply functions.

Every adapter returns an apply function with one signature::

  apply(variables, batch, *, train=False, rng=None) -> ModelOutput

``variables`` is a mapping with the trainable parameters under ``"params"``
and any other collections (linen ``batch_stats``; NNX non-parameter state
under ``"state"``) beside them; the train step differentiates
``variables["params"]`` only and writes ``ModelOutput.state`` back. ``batch``
is a mapping; the model's input is ``batch[input_key]`` (or
``input_fn(batch)``).

Named intermediate features are captured as the user names them:

* linen: the output of a submodule by its path (``"conv2"``,
  ``"block1/conv"``; ``capture_intermediates``), or a value the module sows
  with ``self.sow("intermediates", "name", x)`` (named ``"path/name"``, or
  ``"name"`` at the top level).
* NNX: a submodule's output by its attribute path (``"conv2"``, ``"blocks/0"``;
  ``nnx.capture(..., method_outputs=nnx.Intermediate)``) or a value sown with
  ``self.sow(nnx.Intermediate, "name", x)``.
* plain functions: ``fn`` returns ``(logits, {name: feature})`` or a
  :class:`ModelOutput`.

A requested name the model does not produce raises a ``KeyError`` that lists
the names it does produce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import chex
import jax
from flax import linen as nn

from kdjax.models._output import ModelOutput

if TYPE_CHECKING:
  # Imported where NNX is used: ``flax.nnx`` costs ~0.7 s that a linen run
  # does not need.
  from flax import nnx


def _make_input_fn(input_key: Optional[str],
                   input_fn: Optional[Callable[[Any], Any]]):
  if input_fn is not None:
    return input_fn
  if input_key is None:
    return lambda batch: batch

  def get(batch):
    if isinstance(batch, Mapping):
      if input_key not in batch:
        raise KeyError(f"the batch has no key {input_key!r} (the model's "
                       f"input_key); keys present: {sorted(batch)}.")
      return batch[input_key]
    return batch  # an array passed directly

  return get


def _split_output(out) -> tuple[chex.Array, dict]:
  if isinstance(out, ModelOutput):
    return out.logits, dict(out.features)
  if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
    return out[0], dict(out[1])
  if isinstance(out, Mapping) and "logits" in out:
    rest = {k: v for k, v in out.items() if k != "logits"}
    return out["logits"], dict(rest.get("features", rest))
  return out, {}


def _select(available: Mapping[str, Any], names: Sequence[str], who: str):
  missing = [n for n in names if n not in available]
  if missing:
    raise KeyError(
        f"{who} does not produce the intermediate feature(s) {missing}; "
        f"available names: {sorted(available)}.")
  return {n: available[n] for n in names}


def _flatten_linen_intermediates(tree: Mapping, prefix=()) -> dict:
  """``{"conv1": {"__call__": (x,)}, "feat": (y,)}`` -> ``{"conv1": x, "feat": y}``."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, tuple):
      path = prefix if key == "__call__" else prefix + (key,)
      if path:  # the top-level __call__ output is the logits themselves
        flat["/".join(path)] = value[-1]
    elif isinstance(value, Mapping):
      flat.update(_flatten_linen_intermediates(value, prefix + (key,)))
  return flat


def from_linen(module: nn.Module,
               *,
               input_key: Optional[str] = "image",
               input_fn: Optional[Callable[[Any], Any]] = None,
               feature_names: Sequence[str] = (),
               train_kwarg: Optional[str] = None,
               mutable_collections: Sequence[str] = ("batch_stats",),
               rng_collection: str = "dropout") -> Callable[..., ModelOutput]:
  """Turns a linen module into an apply function.

  Args:
    module: the linen module; ``module.apply(variables, x, **kw)`` returns
      logits, ``(logits, features)`` or a :class:`ModelOutput`.
    input_key: the batch key holding the model's input.
    input_fn: alternatively, ``batch -> input``.
    feature_names: intermediate features to capture, returned in
      ``ModelOutput.features`` under the same names: a submodule's output by
      its path (``"conv_1"``, ``"block1/conv"``; captured with
      ``capture_intermediates``), or a value the module sows with
      ``self.sow("intermediates", "name", x)`` (named ``"name"`` at the top
      level, ``"path/name"`` inside a submodule). A name the module does not
      produce raises a ``KeyError`` listing those it does.
    train_kwarg: name of the module's train/deterministic flag argument
      (``"train"``), or ``None`` if it takes none.
    mutable_collections: collections updated in training mode (``batch_stats``)
      when present in ``variables``; returned in ``ModelOutput.state``.
    rng_collection: the RNG stream the ``rng`` argument feeds (dropout).

  Returns:
    ``apply(variables, batch, *, train=False, rng=None) -> ModelOutput``.
  """
  get_input = _make_input_fn(input_key, input_fn)
  names = tuple(feature_names)
  submodule_names = frozenset(names)

  def capture_filter(mdl: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and "/".join(mdl.path) in submodule_names

  def apply(variables, batch, *, train: bool = False,
            rng: Optional[chex.PRNGKey] = None) -> ModelOutput:
    x = get_input(batch)
    kwargs = {train_kwarg: train} if train_kwarg else {}
    rngs = {rng_collection: rng} if rng is not None else None
    mutable = [c for c in mutable_collections if train and c in variables]
    if names:
      mutable.append("intermediates")
    if mutable:
      out, updates = module.apply(
          variables, x, rngs=rngs, mutable=mutable,
          capture_intermediates=capture_filter if names else False, **kwargs)
      updates = dict(updates)
    else:
      out, updates = module.apply(variables, x, rngs=rngs, **kwargs), {}
    logits, features = _split_output(out)
    if names:
      produced = _flatten_linen_intermediates(updates.pop("intermediates", {}))
      produced.update(features)
      if any(n not in produced for n in names):
        produced = _available_linen_names(module, variables, x, rngs, kwargs)
        produced.update(features)
      features = {**features, **_select(produced, names, type(module).__name__)}
    return ModelOutput(logits=logits, features=features,
                       state=updates if updates else None)

  return apply


def _available_linen_names(module, variables, x, rngs, kwargs) -> dict:
  """Every submodule output and sown value, by name (for error messages)."""

  def run(v, inp):
    _, upd = module.apply(v, inp, rngs=rngs, mutable=["intermediates"],
                          capture_intermediates=True, **kwargs)
    return upd.get("intermediates", {})

  shapes = jax.eval_shape(run, variables, x)
  return _flatten_linen_intermediates(shapes)


def _flatten_nnx_state(state) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  flat = {}
  for path, leaf in nnx.to_flat_state(state):
    value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
    parts = [str(p) for p in path]
    if parts and parts[-1] == "__call__":
      parts = parts[:-1]
    if parts:  # the top-level __call__ output is the logits themselves
      flat["/".join(parts)] = value[-1] if isinstance(value, tuple) else value
  return flat


def from_nnx(model: nnx.Module,
             *,
             input_key: Optional[str] = "image",
             input_fn: Optional[Callable[[Any], Any]] = None,
             feature_names: Sequence[str] = (),
             rng_stream: str = "dropout"
             ) -> tuple[Callable[..., ModelOutput], dict[str, Any]]:
  """Turns an NNX module into a pure apply function and its variables.

  The module is split once into a static graph definition, its
  ``nnx.Param`` s (``variables["params"]``) and its other state
  (``variables["state"]``: BatchNorm statistics, RNG counters); each call
  merges them into a fresh module, so the apply function is pure and its
  arrays are arguments of any jitted step, never baked-in constants.

  Args:
    model: the NNX module (its ``__call__`` takes the input and returns logits,
      ``(logits, features)`` or a :class:`ModelOutput`).
    input_key: the batch key holding the model's input.
    input_fn: alternatively, ``batch -> input``.
    feature_names: intermediate features to capture: submodule paths or names
      sown with ``self.sow(nnx.Intermediate, name, x)``.
    rng_stream: the stream reseeded from the ``rng`` argument (dropout).

  Returns:
    ``(apply, variables)`` with ``apply(variables, batch, *, train=False,
    rng=None) -> ModelOutput``.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  get_input = _make_input_fn(input_key, input_fn)
  names = tuple(feature_names)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(variables, batch, *, train: bool = False,
            rng: Optional[chex.PRNGKey] = None) -> ModelOutput:
    # copy=True: fresh Variables created in the current trace, so that train
    # mode (BatchNorm statistics, RNG counters) can update them inside
    # jax.grad / jax.jit.
    module = nnx.merge(graphdef, variables["params"],
                       variables.get("state", rest), copy=True)
    if train:
      module.train()
    else:
      module.eval()
    if rng is not None:
      nnx.reseed(module, **{rng_stream: rng})
    x = get_input(batch)
    # Always run under nnx.capture: a model that sows must not write the sown
    # values into its own state (and sowing outside capture is deprecated).
    out, intermediates = nnx.capture(
        module, nnx.Intermediate,
        method_outputs=nnx.Intermediate if names else None)(x)
    logits, features = _split_output(out)
    if names:
      produced = _flatten_nnx_state(intermediates)
      produced.update(features)
      features = {**features, **_select(produced, names, type(model).__name__)}
    # Keyed like `variables`, so that `{**variables, **output.state}` (what the
    # train step does) writes the updated BatchNorm statistics back.
    state = {"state": nnx.state(module, nnx.Not(nnx.Param))} if train else None
    return ModelOutput(logits=logits, features=features, state=state)

  return apply, {"params": params, "state": rest}


def from_function(fn: Callable[..., Any],
                  *,
                  input_key: Optional[str] = "image",
                  input_fn: Optional[Callable[[Any], Any]] = None,
                  feature_names: Sequence[str] = (),
                  pass_train: bool = False) -> Callable[..., ModelOutput]:
  """Turns ``fn(params, x) -> logits | (logits, features) | ModelOutput`` into an apply function.

  ``variables["params"]`` is passed to ``fn`` as ``params``. With
  ``pass_train=True``, ``fn`` is called as ``fn(params, x, train=..., rng=...)``.
  """
  get_input = _make_input_fn(input_key, input_fn)
  names = tuple(feature_names)

  def apply(variables, batch, *, train: bool = False,
            rng: Optional[chex.PRNGKey] = None) -> ModelOutput:
    if not isinstance(variables, Mapping) or "params" not in variables:
      raise TypeError(
          "apply functions take variables={'params': ...}; wrap your params "
          "as {'params': params}.")
    x = get_input(batch)
    if pass_train:
      out = fn(variables["params"], x, train=train, rng=rng)
    else:
      out = fn(variables["params"], x)
    logits, features = _split_output(out)
    if names:
      features = {**features, **_select(features, names,
                                        getattr(fn, "__name__", "fn"))}
    return ModelOutput(logits=logits, features=features)

  return apply
