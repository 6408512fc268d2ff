"""Magnitude pruning on a sparsity schedule, with masks kept through optimizer updates.

* Sparsity schedule (Zhu & Gupta, "To prune, or not to prune", 2017, eq. 1)::

    s_t = s_f + (s_i - s_f) (1 - (t - t_0) / n)^p    for t_0 <= t <= t_0 + n

  (``p = 3`` in the paper) is ``optax.polynomial_schedule``.
* Unstructured magnitude pruning: in each kernel the ``floor(s * size)``
  weights of smallest ``|w|`` are zero (per layer, Zhu & Gupta).
* Structured pruning: in each kernel the ``floor(s * C_out)`` output
  neurons/channels (last axis) of smallest L2 norm are zero, with their bias
  (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

Only kernels are pruned (floating leaves with ``ndim >= 2``; under a
``{"student": ..., "loss": ...}`` tree the student's only). :func:`prune` is an
optax transformation chained after the optimizer: every ``frequency`` steps it
recomputes the masks from the params at the scheduled sparsity and returns
updates such that ``params + updates = (params + u) * mask``: a pruned weight
is exactly 0 after every update, whatever the optimizer (momentum, weight
decay) does.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import optax

Schedule = Union[float, Callable[[chex.Numeric], chex.Numeric]]


def check_sparsity(sparsity: Any, what: str = "sparsity") -> float:
  """Returns ``float(sparsity)`` if it lies in ``[0, 1)``, else raises ``ValueError``."""
  try:
    value = float(sparsity)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}.") from None
  if not 0.0 <= value < 1.0:
    raise ValueError(f"{what}={value!r} is outside [0, 1): a sparsity is the "
                     "fraction of weights set to zero (1 would remove every "
                     "weight).")
  return value


def sparsity_schedule(final_sparsity: float,
                      *,
                      begin_step: int = 0,
                      end_step: int,
                      initial_sparsity: float = 0.0,
                      power: float = 3.0) -> optax.Schedule:
  """Zhu & Gupta (2017)'s gradual schedule: ``s_f + (s_i - s_f)(1 - (t - t_0)/n)^p``.

  ``s_i`` before ``begin_step`` (``t_0``), ``s_f`` from ``end_step``
  (``t_0 + n``) on. Both sparsities must lie in ``[0, 1)``.
  """
  s_f = check_sparsity(final_sparsity, "final_sparsity")
  s_i = check_sparsity(initial_sparsity, "initial_sparsity")
  if end_step <= begin_step:
    raise ValueError(f"end_step ({end_step}) must be > begin_step "
                     f"({begin_step}).")
  return optax.polynomial_schedule(init_value=s_i, end_value=s_f, power=power,
                                   transition_steps=end_step - begin_step,
                                   transition_begin=begin_step)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _kernel_paths(params: Any, exclude: Sequence[str] = ()
                  ) -> Callable[[tuple, Any], bool]:
  scoped = isinstance(params, dict) and set(params) == {"student", "loss"}
  patterns = [re.compile(e) for e in exclude]

  def is_pruned(path, leaf) -> bool:
    if scoped and getattr(path[0], "key", None) != "student":
      return False
    if patterns and any(p.search(_path_name(path)) for p in patterns):
      return False
    return (hasattr(leaf, "ndim") and leaf.ndim >= 2
            and jnp.issubdtype(leaf.dtype, jnp.floating))

  return is_pruned


def _keep_largest(scores: chex.Array, sparsity: chex.Numeric) -> chex.Array:
  """1.0 on the ``n - floor(s n)`` largest scores (ties: the earlier index is pruned first)."""
  n = scores.size
  flat = scores.reshape(-1)
  k = jnp.floor(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
  return (rank >= k).astype(jnp.float32).reshape(scores.shape)


def kernel_mask(kernel: chex.Array, sparsity: chex.Numeric, *,
                structured: bool = False) -> chex.Array:
  """The 0/1 mask of one kernel at ``sparsity`` (shape of ``kernel``).

  Unstructured: zero the ``floor(s * size)`` smallest ``|w|``. Structured:
  zero the ``floor(s * C_out)`` output channels (last axis) of smallest
  ``||w[..., c]||_2``. ``sparsity`` may be traced (jit-safe); a Python
  number outside ``[0, 1)`` raises ``ValueError``.
  """
  if isinstance(sparsity, (int, float)):
    check_sparsity(sparsity)
  w = jnp.abs(jnp.asarray(kernel, jnp.float32))
  if not structured:
    return _keep_largest(w, sparsity)
  norms = jnp.sqrt(jnp.sum(w * w, axis=tuple(range(w.ndim - 1))))
  return jnp.broadcast_to(_keep_largest(norms, sparsity), w.shape)


def compute_masks(params: Any, sparsity: chex.Numeric, *,
                  structured: bool = False,
                  exclude: Sequence[str] = ()) -> Any:
  """Masks for every kernel of ``params`` at ``sparsity`` (per layer).

  Returns a pytree like ``params`` whose kernel leaves are 0/1 float32 masks
  (the kernel's shape) and whose other leaves are ``1.0`` scalars, except that with
  ``structured=True`` a linen bias (the ``"bias"`` sibling of a ``"kernel"``)
  gets its kernel's output-channel mask, so that a pruned neuron outputs 0.
  ``exclude``: regular expressions of leaf paths (``"dense_0/kernel"``) left
  dense, e.g. ``("head",)``: structured pruning of the classifier's outputs
  would delete classes.
  """
  is_pruned = _kernel_paths(params, exclude)
  masks = jax.tree_util.tree_map_with_path(
      lambda p, x: kernel_mask(x, sparsity, structured=structured)
      if is_pruned(p, x) else jnp.ones((), jnp.float32), params)
  if structured:
    masks = _mask_biases(params, masks)
  return masks


def _mask_biases(params, masks):
  if not isinstance(params, dict):
    return masks
  out = {}
  for key, value in params.items():
    out[key] = _mask_biases(value, masks[key]) if isinstance(value, dict) \
        else masks[key]
  kernel, bias = params.get("kernel"), params.get("bias")
  if (kernel is not None and bias is not None and hasattr(kernel, "ndim")
      and kernel.ndim >= 2 and getattr(bias, "shape", None) == kernel.shape[-1:]
      and masks["kernel"].ndim >= 2):
    out["bias"] = masks["kernel"].reshape(-1, kernel.shape[-1])[0]
  return out


def apply_masks(params: Any, masks: Any) -> Any:
  """``params * mask`` leaf by leaf (dtypes kept)."""
  return jax.tree.map(lambda p, m: (p * m).astype(p.dtype)
                      if hasattr(p, "dtype") else p, params, masks)


def prune_params(params: Any, sparsity: float, *,
                 structured: bool = False,
                 exclude: Sequence[str] = ()) -> Any:
  """One-shot magnitude pruning: ``apply_masks(params, compute_masks(...))``."""
  check_sparsity(sparsity)
  return apply_masks(params, compute_masks(params, sparsity,
                                           structured=structured,
                                           exclude=exclude))


def sparsity_of(params: Any, exclude: Sequence[str] = ()) -> float:
  """Fraction of exact zeros over the kernels (``ndim >= 2`` floating leaves)."""
  is_pruned = _kernel_paths(params, exclude)
  leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(params)
            if is_pruned(p, x)]
  total = sum(x.size for x in leaves)
  zeros = sum(int(jnp.sum(x == 0)) for x in leaves)
  return zeros / max(total, 1)


class PruneState(NamedTuple):
  """``count``: updates seen; ``masks``: the current masks (pytree like params)."""
  count: chex.Array
  masks: Any


def prune(schedule: Schedule, *, structured: bool = False,
          frequency: int = 1,
          exclude: Sequence[str] = ()) -> optax.GradientTransformation:
  """An optax transformation that prunes to ``schedule(step)`` and keeps pruned weights at 0.

  Chain it last: ``optax.chain(optax.adamw(...), prune(schedule))``. At
  update ``t`` (every ``frequency`` updates; Zhu & Gupta's ``Δt``) the masks
  are recomputed from the current params at sparsity ``schedule(t)``; the
  returned updates are ``(params + u) * mask - params``, so that
  ``optax.apply_updates`` leaves pruned weights exactly 0. Needs ``params``
  in ``update``. Pair with :func:`masked_params` (or check with
  :func:`sparsity_of`).

  Args:
    schedule: a sparsity in ``[0, 1)`` or an optax schedule of the step
      (:func:`sparsity_schedule`); non-decreasing for masks to be monotone.
    structured: prune output neurons/channels instead of single weights.
    frequency: recompute masks every this many updates (``>= 1``).
    exclude: regular expressions of leaf paths never pruned (``("head",)``).
  """
  if not callable(schedule):
    check_sparsity(schedule)
  if int(frequency) < 1:
    raise ValueError(f"frequency must be >= 1, got {frequency}.")
  sched = schedule if callable(schedule) else (lambda _: schedule)

  def init_fn(params):
    return PruneState(count=jnp.zeros((), jnp.int32),
                      masks=compute_masks(params, 0.0, structured=structured,
                                          exclude=exclude))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("prune() needs params: call update(updates, state, "
                       "params).")
    refresh = (state.count % frequency) == 0
    new = compute_masks(apply_masks(params, state.masks),
                        sched(state.count), structured=structured,
                        exclude=exclude)
    masks = jax.tree.map(lambda n, o: jnp.where(refresh, n, o), new,
                         state.masks)
    updates = jax.tree.map(
        lambda u, p, m: ((p + u) * m - p).astype(u.dtype), updates, params,
        masks)
    return updates, PruneState(count=state.count + 1, masks=masks)

  return optax.GradientTransformation(init_fn, update_fn)


def current_masks(opt_state: Any) -> Optional[Any]:
  """The masks held by the :func:`prune` state inside an (optax-chained) ``opt_state``."""
  found = []

  def visit(node):
    if isinstance(node, PruneState):
      found.append(node.masks)
      return
    if isinstance(node, (tuple, list)):
      for child in node:
        visit(child)

  visit(opt_state)
  return found[-1] if found else None
