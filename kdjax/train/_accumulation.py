"""Gradient accumulation: one optimizer update from ``k`` micro-batches.

The batch (every leaf with leading axis ``B``) is split into ``k`` micro-batches
of ``B / k`` examples. Micro-batch ``i`` holds the examples ``i, i + k, i + 2k,
...`` (a strided split: ``x.reshape(B // k, k, ...)`` and the micro axis moved
to the front), so that with a batch sharded over a ``data`` axis every device
contributes to every micro-batch and no data moves between devices. A
``jax.lax.scan`` over the micro-batches sums the weighted gradients; the
optimizer then runs once.

Normalisation
-------------
A loss term with ``reduction="mean"`` is ``sum(l) / n`` over its micro-batch
(``n`` examples, or the total mask weight ``sum(mask)`` for a masked loss).
The full-batch mean is ``sum_i sum(l_i) / N`` with ``N = sum_i n_i``, so the
micro-batch ``i`` must be weighted by ``n_i / N``, not by ``1 / k``::

  grad = sum_i (n_i / N) * grad(mean_i) = grad(sum_i sum(l_i) / N)

With ``weighting="auto"`` (the default) ``n_i`` is ``sum(batch[mask_key])``
over the micro-batch when the batch has a mask (token losses with padding:
micro-batches hold different numbers of real tokens), and ``B / k`` otherwise
(then every weight is ``1 / k``). This is exact when every term is a mean
over the same mask (or every term is unmasked); a term normalised otherwise
(e.g. a per-sequence mean) should use ``weighting="equal"``. The logged
metrics are the same weighted averages. Stateful parts (BatchNorm statistics,
a CRD memory bank) are threaded through the micro-batches in order, so they
see ``k`` updates of ``B / k`` examples each.

:func:`accumulate` is that loop; the train step calls it with its gradient
function when ``StepOptions.accumulation_steps > 1``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp

WEIGHTINGS = ("auto", "equal", "mask")


def check_accumulation(accumulation_steps: int, weighting: str) -> None:
  if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
    raise ValueError(
        f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}.")
  if weighting not in WEIGHTINGS:
    raise ValueError(
        f"accumulation weighting must be one of {WEIGHTINGS}, got "
        f"{weighting!r}.")


def split_micro_batches(batch: Any, k: int) -> Any:
  """``[B, ...]`` leaves -> ``[k, B // k, ...]``; micro-batch ``i`` = examples ``i::k``.

  Raises:
    ValueError: if a leaf has no leading axis or ``B`` is not divisible by
      ``k``.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(batch)
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    name = jax.tree_util.keystr(path)
    if not shape:
      raise ValueError(
          f"gradient accumulation splits every batch leaf along axis 0, but "
          f"batch{name} is a scalar.")
    if shape[0] % k:
      raise ValueError(
          f"batch size {shape[0]} (batch{name}, shape {shape}) is not "
          f"divisible by accumulation_steps={k}.")

  def split(x):
    x = jnp.asarray(x)
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def _weighting_mask(batch: Any, weighting: str,
                    mask_key: Optional[str]) -> Optional[chex.Array]:
  """The mask that normalises the losses, or ``None`` for equal weights."""
  mask = None
  if (weighting in ("auto", "mask") and mask_key is not None
      and isinstance(batch, Mapping)):
    mask = batch.get(mask_key)
  if mask is None and weighting == "mask":
    raise KeyError(
        f"accumulation weighting='mask' needs batch[{mask_key!r}]; keys "
        f"present: {sorted(batch) if isinstance(batch, Mapping) else '-'}.")
  return mask


def device_weight(batch: Any, weighting: str, mask_key: Optional[str],
                  axis_name) -> Optional[chex.Array]:
  """This device's share ``n_d / N`` of a data-parallel batch's token count.

  Under ``pmap``/``shard_map`` each device computes the mean over its own
  unmasked tokens; the global mean needs ``sum_d (n_d / N) grad_d`` with
  ``N = psum(n_d)``, not ``pmean(grad_d)`` (which weights a device with few
  real tokens like one with many). ``None`` when the losses are not
  normalised by a mask (then ``pmean`` is exact).
  """
  mask = _weighting_mask(batch, weighting, mask_key)
  if mask is None:
    return None
  count = jnp.sum(jnp.asarray(mask, jnp.float32))
  total = jax.lax.psum(count, axis_name)
  devices = jax.lax.psum(1.0, axis_name)
  return jnp.where(total > 0, count / jnp.maximum(total, 1e-12), 1.0 / devices)


def micro_batch_weights(micro_batches: Any, k: int, weighting: str,
                        mask_key: Optional[str]) -> chex.Array:
  """The ``[k]`` weights ``n_i / N`` of the micro-batches (see module docstring)."""
  mask = _weighting_mask(micro_batches, weighting, mask_key)
  if mask is None:
    return jnp.full((k,), 1.0 / k, jnp.float32)
  counts = jnp.sum(jnp.asarray(mask, jnp.float32).reshape(k, -1), axis=1)
  total = jnp.sum(counts)
  # A fully masked batch: every micro loss is 0 (the losses' convention), any
  # weights do; avoid 0 / 0.
  return jnp.where(total > 0, counts / jnp.maximum(total, 1e-12), 1.0 / k)


def accumulate(grad_fn: Callable[..., tuple[Any, Any, Any]],
               params: Any,
               batch: Any,
               carry: Any,
               rngs: Any,
               *,
               k: int,
               weighting: str = "auto",
               mask_key: Optional[str] = "mask") -> tuple[Any, Any, Any]:
  """The ``n_i / N``-weighted sums of gradients and metrics over ``k`` micro-batches.

  Args:
    grad_fn: ``grad_fn(micro_batch, carry, rngs, check=True) -> (grads,
      metrics, carry)``; ``grads`` has the structure of ``params``, ``carry``
      (model and loss state) is threaded through the micro-batches in order.
      With ``check=False`` it must leave out its ``checkify`` checks: it is
      then only traced, for the metrics' shapes.
    params: the differentiated parameters (for the zero gradient sum).
    batch: the full batch (every leaf ``[B, ...]``).
    carry: the state threaded through the micro-batches.
    rngs: a pytree of PRNG keys; micro-batch ``i`` gets each folded with
      ``i``.
    k: the number of micro-batches.
    weighting, mask_key: see the module docstring.

  Returns:
    ``(grads, metrics, carry)`` as one full-batch ``grad_fn`` call would.
  """
  micro_batches = split_micro_batches(batch, k)
  weights = micro_batch_weights(micro_batches, k, weighting, mask_key)

  def body(acc, xs):
    grad_sum, metric_sum, carry = acc
    micro_batch, weight, i = xs
    grads, metrics, carry = grad_fn(
        micro_batch, carry,
        jax.tree.map(lambda r: jax.random.fold_in(r, i), rngs))
    grad_sum = jax.tree.map(lambda a, g: a + weight * g, grad_sum, grads)
    metric_sum = jax.tree.map(lambda a, m: a + weight * m, metric_sum, metrics)
    return (grad_sum, metric_sum, carry), None

  first = jax.tree.map(lambda x: x[0], micro_batches)
  metric_shapes = jax.eval_shape(
      lambda: grad_fn(first, carry, rngs, check=False)[1])
  init = (jax.tree.map(jnp.zeros_like, params),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
          carry)
  (grads, metrics, carry), _ = jax.lax.scan(
      body, init, (micro_batches, weights, jnp.arange(k)))
  return grads, metrics, carry
