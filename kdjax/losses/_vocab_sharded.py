"""The losses from hidden states with the vocabulary split over a mesh axis.

:func:`vocab_sharded_divergence_from_hidden` wraps the ``jax.shard_map`` that
runs :func:`kdjax.losses.divergence_from_hidden` (or its top-k and
cross-entropy twins) with ``axis_name``: each device holds a
``[D, V / M]`` slice of the unembedding and the logits of its slice only;
nothing of shape ``[tokens, V]`` is ever all-gathered (see the module
docstring of :mod:`kdjax.losses._large_vocab`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp

from kdjax.losses import _divergences
from kdjax.losses import _utils
from kdjax.losses._large_vocab import Unembedding
from kdjax.losses._large_vocab import cross_entropy_from_hidden
from kdjax.losses._large_vocab import divergence_from_hidden
from kdjax.losses._large_vocab import top_k_divergence_from_hidden


def vocab_sharded_divergence_from_hidden(
    mesh: jax.sharding.Mesh,
    student_hidden: chex.Array,
    student_unembedding: Unembedding,
    teacher_hidden: Optional[chex.Array] = None,
    teacher_unembedding: Optional[Unembedding] = None,
    temperature: chex.Numeric = 1.0,
    *,
    teacher_top_k: Optional[_divergences.TopKTeacher] = None,
    labels: Optional[chex.Array] = None,
    vocab_axis: str = "model",
    token_axis: Union[str, Sequence[str], None] = None,
    mask: Optional[chex.Array] = None,
    reduction: str = "mean",
    **kwargs: Any) -> chex.Array:
  """:func:`divergence_from_hidden` with the vocabulary split over a mesh axis.

  Runs ``jax.shard_map`` over ``mesh``: the unembedding kernels
  ``[D, V]`` are split along ``V`` over ``vocab_axis`` (``P(None,
  vocab_axis)``; biases ``P(vocab_axis)``), the hidden states ``[B, ..., D]``
  (and mask, teacher top-k) along their first axis over ``token_axis`` (data
  parallelism; ``None``: replicated). Each device computes its chunks' logits
  for its slice of the vocabulary only; softmax statistics and per-position
  divergences are combined with ``pmax``/``psum`` over ``vocab_axis``, sums
  and token counts with ``psum`` over ``token_axis``. No ``[tokens, V]``
  array is ever all-gathered.

  Args:
    mesh: the device mesh.
    teacher_hidden, teacher_unembedding: a dense teacher; or
    teacher_top_k: a :class:`TopKTeacher` with global vocabulary indices; or
    labels: ``[B, ...]`` int targets: the student's cross-entropy
      (:func:`cross_entropy_from_hidden`; ``temperature`` and the divergence
      options are then unused). Checked as there (on the global array,
      before sharding): outside ``[0, V)`` raises ``ValueError`` eagerly when
      concrete, and under jit only under :func:`kdjax.losses.runtime_checks`.
    vocab_axis: mesh axis of the vocabulary; ``V`` must divide evenly (pad the
      vocabulary and pass ``vocab_size`` for the real size).
    token_axis: mesh axis (or axes) of the batch, or ``None``.
    mask: ``[B, ...]`` mask or weights.
    reduction: ``"mean"`` (over all unmasked tokens of all shards) or
      ``"sum"``.
    **kwargs: ``divergence``, ``beta``, ``alpha``, ``tail_bucket`` (top-k),
      ``scale_by_temperature``, ``vocab_size``, ``chunk_size``,
      ``memory_budget_bytes``, ``implementation`` (only the last four with
      ``labels``).

  Returns:
    The scalar loss (replicated).
  """
  P = jax.sharding.PartitionSpec
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum' here, got "
                     f"{reduction!r}.")
  given = [name for name, x in (("teacher_hidden", teacher_hidden),
                                 ("teacher_top_k", teacher_top_k),
                                 ("labels", labels)) if x is not None]
  if len(given) != 1:
    raise ValueError("pass exactly one of teacher_hidden (with "
                     "teacher_unembedding), teacher_top_k or labels; got "
                     f"{given or 'none'}.")
  kind = {"teacher_hidden": "dense", "teacher_top_k": "top_k",
          "labels": "labels"}[given[0]]
  if kind == "dense" and teacher_unembedding is None:
    raise ValueError("teacher_hidden needs teacher_unembedding.")
  # Value checks run here, on the global arrays: inside shard_map the
  # temperature and labels are traced (and the vocabulary is a shard's).
  if kind == "labels":
    _utils.check_labels(
        labels, kwargs.get("vocab_size") or jnp.shape(student_unembedding[0])[-1],
        tuple(jnp.shape(student_hidden)[:-1]),
        "vocab_sharded_divergence_from_hidden")
  else:
    _utils.check_temperature(temperature)
  shards = mesh.shape[vocab_axis]
  kernels = [student_unembedding[0]]
  if kind == "dense":
    kernels.append(teacher_unembedding[0])
  for kernel in kernels:
    if jnp.shape(kernel)[-1] % shards:
      raise ValueError(
          f"the vocabulary ({jnp.shape(kernel)[-1]} columns) does not divide "
          f"over the {shards} devices of mesh axis {vocab_axis!r}; pad the "
          "unembedding to a multiple and pass vocab_size=<real size>.")
  if mask is None:
    mask = jnp.ones(jnp.shape(student_hidden)[:-1], jnp.float32)
  tok = P(token_axis)
  emb_spec = lambda e: Unembedding(P(None, vocab_axis),
                                   None if e[1] is None else P(vocab_axis))
  student_unembedding = Unembedding(*student_unembedding)
  in_specs = [tok, emb_spec(student_unembedding), tok]
  args = [student_hidden, student_unembedding, mask]
  if kind == "dense":
    teacher_unembedding = Unembedding(*teacher_unembedding)
    in_specs += [tok, emb_spec(teacher_unembedding)]
    args += [teacher_hidden, teacher_unembedding]
  elif kind == "labels":
    in_specs.append(tok)
    args.append(jnp.asarray(labels, jnp.int32))
  else:
    # The temperature check needs the stored (scalar) temperature: run it
    # here; the per-token arrays are split along the batch.
    _divergences.check_top_k_temperature(
        teacher_top_k, temperature, kwargs.get("tail_bucket", True))
    # Concrete indices outside the (real) vocabulary raise here, as unsharded.
    _divergences.check_top_k_shapes(
        teacher_top_k, tuple(jnp.shape(student_hidden)[:-1]),
        kwargs.get("vocab_size") or jnp.shape(student_unembedding[0])[-1])
    teacher_top_k = teacher_top_k._replace(temperature=None)
    in_specs.append(jax.tree.map(lambda _: tok, teacher_top_k))
    args.append(teacher_top_k)
  in_specs.append(P())
  args.append(jnp.asarray(temperature, jnp.float32))

  def local(*local_args):
    with _utils.runtime_checks(False):  # checked above, before shard_map
      return local_sums(*local_args)

  def local_sums(*local_args):
    h_s, emb_s, m = local_args[:3]
    t = local_args[-1]
    if kind == "dense":
      h_t, emb_t = local_args[3:5]
      total = divergence_from_hidden(h_s, emb_s, h_t, emb_t, t, mask=m,
                                     reduction="sum", axis_name=vocab_axis,
                                     **kwargs)
    elif kind == "labels":
      total = cross_entropy_from_hidden(h_s, emb_s, local_args[3], mask=m,
                                        reduction="sum", axis_name=vocab_axis,
                                        **kwargs)
    else:
      total = top_k_divergence_from_hidden(h_s, emb_s, local_args[3], t,
                                           mask=m, reduction="sum",
                                           axis_name=vocab_axis, **kwargs)
    count = jnp.sum(m.astype(jnp.float32))
    if token_axis is not None:
      total = jax.lax.psum(total, token_axis)
      count = jax.lax.psum(count, token_axis)
    return total, count

  if any(t == jax.sharding.AxisType.Explicit
         for t in getattr(mesh, "axis_types", ())):
    # Explicit-sharding meshes need the inputs laid out as the specs say.
    args = jax.tree.map(
        lambda x, spec: jax.reshard(x, jax.sharding.NamedSharding(mesh, spec)),
        args, in_specs, is_leaf=lambda x: isinstance(x, P))
  total, count = jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs),
                               out_specs=(P(), P()))(*args)
  if reduction == "sum":
    return total
  return total / jnp.maximum(count, 1.0)
