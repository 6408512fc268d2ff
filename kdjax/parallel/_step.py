"""Sharded (``jax.jit`` + ``NamedSharding``) and legacy ``pmap`` distillation steps."""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from kdjax.losses import ComposedLoss
from kdjax.models import ApplyFn
from kdjax.parallel import _mesh
from kdjax.parallel._mesh import ShardingRules
from kdjax.train import StepFn
from kdjax.train import StepOptions
from kdjax.train import build_step
from kdjax.train import compile_step


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def make_sharded_train_step(student_apply: ApplyFn,
                            teacher_apply: Optional[ApplyFn],
                            loss_fn: ComposedLoss,
                            optimizer: optax.GradientTransformation,
                            options: Optional[StepOptions] = None,
                            *,
                            mesh: Mesh,
                            state: Any,
                            teacher_variables: Any = None,
                            rules: Optional[ShardingRules] = None,
                            donate: bool = True,
                            **step_kwargs: Any) -> StepFn:
  """A distillation step jitted over ``mesh`` with explicit in/out shardings.

  The step is :func:`kdjax.train.build_step` 's, compiled
  (:func:`kdjax.train.compile_step`) with
  ``in_shardings = (state_sharding, teacher_sharding, batch_sharding)`` and
  ``out_shardings = (state_sharding, replicated metrics)``. The batch's
  leading axis is split over ``rules.batch_axes`` (data parallelism: each
  device runs the models on its shard, the mean loss's gradient is all-reduced
  by XLA). With ``rules.student_axis`` (FSDP) every state leaf is split along
  one axis, all-gathered for the forward/backward pass and updated shard by
  shard. The teacher follows ``rules.teacher_axis``, independently.

  Args:
    student_apply, teacher_apply, loss_fn, optimizer, options: as for
      ``kdjax.train.make_train_step``.
    mesh: from :func:`make_mesh`.
    state: the initial ``DistillState`` (or its ``jax.eval_shape``), used for
      its structure and shapes only.
    teacher_variables: the teacher's variables (or shapes); ``None`` for a
      step without a teacher (offline cache, student alone).
    rules: :class:`ShardingRules` (default: data parallel over ``"data"``).
    donate: donate the state's buffers.
    **step_kwargs: :class:`kdjax.train.StepOptions` fields (``policy``,
      ``accumulation_steps``, ``ema_decay``, ``check_teacher_finite``, ...).

  Returns:
    ``step(state, teacher_variables, batch) -> (state, metrics)``; place the
    inputs with :func:`shard_state`, :func:`shard_teacher` and
    :func:`shard_batch` (or :func:`global_batch` in a multi-host run).
    Inputs placed otherwise are resharded by ``jax.jit``. A batch whose size
    does not split over the batch axes raises ``ValueError``. The step has
    attributes ``state_sharding``, ``teacher_sharding``, ``batch_sharding``.
  """
  options = StepOptions.of(options, **step_kwargs)
  rules = rules or ShardingRules.data_parallel()
  rules.check(mesh)
  state_sh = _mesh.state_sharding(_abstract(state), mesh, rules)
  teacher_sh = (None if teacher_variables is None else
                _mesh.teacher_sharding(_abstract(teacher_variables), mesh,
                                       rules))
  batch_sh = _mesh.batch_sharding(mesh, rules)
  gather_fn = None
  if rules.student_axis is not None and rules.gather_params:
    gather_fn = _mesh.fsdp_gather_fn(mesh)

  step = build_step(student_apply, teacher_apply, loss_fn, optimizer, options,
                    gather_fn=gather_fn)
  jitted = compile_step(step, donate=donate,
                        in_shardings=(state_sh, teacher_sh, batch_sh),
                        out_shardings=(state_sh, _mesh.replicated(mesh)))

  @functools.wraps(jitted)
  def run(state, teacher_variables, batch):
    _mesh.check_batch(batch, mesh, rules)
    return jitted(state, teacher_variables, batch)

  run.jitted = jitted
  run.state_sharding = state_sh
  run.teacher_sharding = teacher_sh
  run.batch_sharding = batch_sh
  run.lower = getattr(jitted, "lower", None)
  return run


# -----------------------------------------------------------------------------
# Legacy: jax.pmap.
# -----------------------------------------------------------------------------


def replicate(tree: Any, num_devices: Optional[int] = None) -> Any:
  """Adds a leading device axis of size ``num_devices`` (default: local devices)."""
  n = jax.local_device_count() if num_devices is None else num_devices
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)),
                      tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated (pmap) pytree."""
  return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Any, num_devices: Optional[int] = None) -> Any:
  """``[B, ...]`` leaves -> ``[num_devices, B // num_devices, ...]`` for ``pmap``.

  Raises:
    ValueError: ``B`` is not divisible by the number of devices.
  """
  n = jax.local_device_count() if num_devices is None else num_devices

  def split(path, x):
    shape = np.shape(x)
    if not shape or shape[0] % n:
      raise ValueError(
          f"batch size {shape[0] if shape else '(scalar)'} (batch"
          f"{jax.tree_util.keystr(path)}, shape {tuple(shape)}) is not "
          f"divisible by the {n} devices of the pmap step.")
    return np.reshape(x, (n, shape[0] // n) + tuple(shape[1:])) if isinstance(
        x, np.ndarray) else jnp.reshape(x, (n, shape[0] // n) + shape[1:])

  return jax.tree_util.tree_map_with_path(split, batch)


def make_pmap_train_step(student_apply: ApplyFn,
                         teacher_apply: Optional[ApplyFn],
                         loss_fn: ComposedLoss,
                         optimizer: optax.GradientTransformation,
                         options: Optional[StepOptions] = None,
                         *,
                         axis_name: str = "data",
                         devices: Optional[Sequence[jax.Device]] = None,
                         donate: bool = True,
                         **step_kwargs: Any) -> StepFn:
  """The distillation step under ``jax.pmap`` (for code built around pmap).

  Every device holds a replica of the state and the teacher (leading device
  axis, :func:`replicate`) and its slice of the batch (:func:`split_batch`);
  gradients, BatchNorm statistics and metrics are averaged with
  ``lax.pmean`` over ``axis_name``, so with equal shards the update equals the
  single-device full-batch update. The dropout/loss RNG is folded with the
  device index (different masks per device). Stateful loss terms (a CRD
  memory bank) keep a per-device state. New code should prefer
  :func:`make_sharded_train_step`. ``options`` and ``**step_kwargs``
  (:class:`kdjax.train.StepOptions` fields) as for
  ``kdjax.train.make_train_step``; the step's checks are not supported.

  Returns:
    ``step(replicated_state, replicated_teacher, split_batch) ->
    (replicated_state, replicated_metrics)``.
  """
  options = StepOptions.of(options, **step_kwargs)
  if options.check_teacher_finite:
    raise ValueError("check_teacher_finite is not supported by the pmap step; "
                     "use make_sharded_train_step or make_train_step.")
  step = build_step(student_apply, teacher_apply, loss_fn, optimizer, options,
                    axis_name=axis_name)
  return jax.pmap(step, axis_name=axis_name, devices=devices,
                  donate_argnums=(0,) if donate else ())
