"""Device meshes and sharding rules for distillation.

A mesh names the device axes; the rules say which arrays are split over which
axis:

* the batch's leading axis over ``batch_axes`` (data parallelism; with FSDP
  the batch is split over the FSDP axis too, as in ZeRO-3);
* the student's params, optimizer state, EMA and loss-term params over
  ``student_axis`` (FSDP: each leaf split along its largest dimension
  divisible by the axis size; small leaves replicated), or replicated;
* the teacher's variables over ``teacher_axis``, independently of the
  student (a large teacher can be split while a small student is
  replicated), or replicated.

Only ``jax.sharding`` is used (``Mesh``, ``NamedSharding``, ``PartitionSpec``);
the step is a ``jax.jit`` with in/out shardings, and XLA inserts the
collectives (all-gathers of sharded params, gradient all-reduces or
reduce-scatters).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"


def make_mesh(axes: Optional[Mapping[str, int]] = None,
              *,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds a ``jax.sharding.Mesh`` with the given named axis sizes.

  Args:
    axes: ``{axis name: size}`` in mesh order, e.g. ``{"data": 8}`` (the
      default: every device on a ``data`` axis) or ``{"data": 2, "fsdp": 4}``.
      One size may be ``-1``: the remaining devices.
    devices: the devices to use (default ``jax.devices()``, all processes'
      devices in a multi-host run). A mesh smaller than the device list uses
      its first devices.

  Returns:
    A mesh whose axes have ``AxisType.Auto`` (classic ``jax.jit`` sharding
    propagation).

  Raises:
    ValueError: the mesh needs more devices than there are, or a size is
      invalid.
  """
  devices = list(jax.devices() if devices is None else devices)
  if axes is None:
    axes = {DATA: len(devices)}
  axes = dict(axes)
  if not axes:
    raise ValueError("make_mesh needs at least one axis, e.g. {'data': 8}.")
  sizes = list(axes.values())
  for name, size in axes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"mesh axis {name!r} has invalid size {size!r}; sizes "
                       "are ints >= 1 (or one -1 for the remaining devices).")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may have size -1, got {axes}.")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(
          f"cannot infer the -1 axis of mesh {axes}: {len(devices)} devices "
          f"are not divisible by {known}.")
    axes = {n: (len(devices) // known if s == -1 else s)
            for n, s in axes.items()}
  needed = math.prod(axes.values())
  if needed > len(devices):
    raise ValueError(
        f"the mesh {axes} needs {needed} devices but only {len(devices)} are "
        f"available ({jax.device_count()} in total on platform "
        f"{jax.default_backend()!r}). Use a smaller mesh; on CPU, simulate "
        "devices with XLA_FLAGS=--xla_force_host_platform_device_count=N set "
        "before importing jax.")
  return jax.make_mesh(tuple(axes.values()), tuple(axes.keys()),
                       axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices[:needed])


def _as_axes(axes: Union[None, str, Sequence[str]]) -> tuple:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Which mesh axes split the batch, the student state and the teacher.

  Attributes:
    batch_axes: mesh axes the batch's leading (example) axis is split over.
    student_axis: mesh axis (or axes) the student's params, optimizer state,
      EMA and loss params are split over (FSDP); ``None``: replicated.
    teacher_axis: mesh axis (or axes) the teacher's variables are split
      over; ``None``: replicated. Independent of ``student_axis``.
    min_shard_size: leaves with fewer elements stay replicated (biases,
      scalars: splitting them saves nothing and costs collectives).
    gather_params: FSDP: all-gather the student's params at the start of the
      step (a sharding constraint to replicated, so the forward/backward is
      plain data parallelism and the gradients are reduce-scattered back to
      the shards). ``False`` lets XLA's partitioner choose.
  """
  batch_axes: tuple = (DATA,)
  student_axis: Optional[Union[str, tuple]] = None
  teacher_axis: Optional[Union[str, tuple]] = None
  min_shard_size: int = 1024
  gather_params: bool = True

  def __post_init__(self):
    object.__setattr__(self, "batch_axes", _as_axes(self.batch_axes))
    if not self.batch_axes:
      raise ValueError("batch_axes must name at least one mesh axis.")

  @classmethod
  def data_parallel(cls, *, axis: str = DATA,
                    teacher_axis: Optional[str] = None) -> "ShardingRules":
    """Batch split over ``axis``; student replicated; teacher replicated or split."""
    return cls(batch_axes=(axis,), student_axis=None,
               teacher_axis=teacher_axis)

  @classmethod
  def fsdp(cls, *, data_axis: Optional[str] = DATA, fsdp_axis: str = FSDP,
           teacher_axis: Optional[str] = FSDP,
           min_shard_size: int = 1024) -> "ShardingRules":
    """Batch over ``(data_axis, fsdp_axis)``; student state split over ``fsdp_axis``.

    The teacher is split over ``teacher_axis`` too by default (``None``:
    replicated). ``data_axis=None`` for a mesh with the FSDP axis alone.
    """
    batch = (data_axis, fsdp_axis) if data_axis else (fsdp_axis,)
    return cls(batch_axes=batch, student_axis=fsdp_axis,
               teacher_axis=teacher_axis, min_shard_size=min_shard_size)

  def check(self, mesh: Mesh) -> None:
    """Raises ``ValueError`` if an axis named here is not in ``mesh``."""
    named = list(self.batch_axes) + list(_as_axes(self.student_axis)) + list(
        _as_axes(self.teacher_axis))
    missing = list(dict.fromkeys(a for a in named if a not in mesh.shape))
    if missing:
      raise ValueError(
          f"sharding rules name mesh axes {missing} that the mesh does not "
          f"have; mesh axes: {dict(mesh.shape)}.")

  def batch_size_divisor(self, mesh: Mesh) -> int:
    """The number of batch shards (product of the batch axes' sizes)."""
    return math.prod(mesh.shape[a] for a in self.batch_axes)


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that keeps a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def fsdp_gather_fn(mesh: Mesh) -> Callable[[Any], Any]:
  """``gather(tree)``: every leaf constrained to be replicated over ``mesh``.

  The ``gather_fn`` of :func:`kdjax.train.build_step` for FSDP: the sharded
  parameters are all-gathered at the start of the step (and their gradients
  reduce-scattered back to the shards).
  """
  sharding = replicated(mesh)

  def gather(tree):
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)

  return gather


def leaf_partition_spec(shape: Sequence[int],
                        axis: Union[str, Sequence[str], None], mesh: Mesh,
                        min_shard_size: int = 1024) -> P:
  """FSDP spec of one array: its largest dimension divisible by the axis size.

  ``P()`` (replicated) when ``axis`` is ``None``, the leaf has fewer than
  ``min_shard_size`` elements, or no dimension is divisible. Ties go to the
  leading dimension.
  """
  axes = _as_axes(axis)
  if not axes or not shape or math.prod(shape) < min_shard_size:
    return P()
  size = math.prod(mesh.shape[a] for a in axes)
  best = None
  for dim, extent in enumerate(shape):
    if extent % size == 0 and (best is None or extent > shape[best]):
      best = dim
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = axes if len(axes) > 1 else axes[0]
  return P(*spec)


def tree_sharding(tree: Any, mesh: Mesh,
                  axis: Union[str, Sequence[str], None] = None,
                  min_shard_size: int = 1024) -> Any:
  """A ``NamedSharding`` per leaf of ``tree`` (arrays or ShapeDtypeStructs) by the FSDP rule."""

  def one(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(
        mesh, leaf_partition_spec(shape, axis, mesh, min_shard_size))

  return jax.tree.map(one, tree)


def state_sharding(state: Any, mesh: Mesh, rules: ShardingRules) -> Any:
  """Shardings of a :class:`kdjax.train.DistillState` (params, opt state, EMA, ...).

  Every leaf follows the same shape-based rule, so an optimizer moment is
  split exactly like its parameter; scalars (step, Adam's count) and the RNG
  key are replicated.
  """
  return tree_sharding(state, mesh, rules.student_axis, rules.min_shard_size)


def teacher_sharding(teacher_variables: Any, mesh: Mesh,
                     rules: ShardingRules) -> Any:
  """Shardings of the teacher's variables (``rules.teacher_axis``)."""
  return tree_sharding(teacher_variables, mesh, rules.teacher_axis,
                       rules.min_shard_size)


def batch_sharding(mesh: Mesh, rules: ShardingRules) -> NamedSharding:
  """Leading (example) axis split over ``rules.batch_axes``, the rest replicated."""
  axes = rules.batch_axes
  return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def check_batch(batch: Any, mesh: Mesh, rules: ShardingRules,
                global_batch: bool = True) -> None:
  """Raises ``ValueError`` if a batch leaf's leading axis does not split evenly.

  Args:
    batch: the batch pytree (arrays or anything with ``.shape``).
    mesh: the mesh.
    rules: the sharding rules.
    global_batch: the leading axis is the global batch (``False``: a
      process-local batch, checked against this process's share).
  """
  divisor = rules.batch_size_divisor(mesh)
  if not global_batch:
    divisor = max(divisor // jax.process_count(), 1)
  for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
    shape = np.shape(leaf)
    name = jax.tree_util.keystr(path)
    if not shape:
      raise ValueError(
          f"batch{name} is a scalar; every batch leaf needs a leading example "
          f"axis to split over mesh axes {rules.batch_axes}.")
    if shape[0] % divisor:
      raise ValueError(
          f"batch size {shape[0]} (batch{name}, shape {tuple(shape)}) is not "
          f"divisible by {divisor}, the number of devices along the batch "
          f"axes {rules.batch_axes} of mesh {dict(mesh.shape)}; use a batch "
          f"size that is a multiple of {divisor} (pad and mask the last "
          "batch).")


def _put_leaf(x, sharding: NamedSharding):
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  # Multi-host: every process holds the same full value (same seed); each
  # builds its addressable shards from it.
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    data = _put_leaf(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def put_global(tree: Any, shardings: Any) -> Any:
  """``jax.device_put`` that also works for multi-host shardings.

  In a multi-process run every process must pass the same full value (e.g.
  parameters initialised from the same seed); each process then places the
  shards its devices hold (``jax.make_array_from_callback``).
  """
  return jax.tree.map(_put_leaf, tree, shardings)


def shard_batch(batch: Any, mesh: Mesh, rules: ShardingRules) -> Any:
  """Places a (single-process, global) batch on the mesh, split over the batch axes."""
  rules.check(mesh)
  check_batch(batch, mesh, rules)
  sharding = batch_sharding(mesh, rules)
  return put_global(batch, jax.tree.map(lambda _: sharding, batch))


def shard_state(state: Any, mesh: Mesh, rules: ShardingRules) -> Any:
  """Places a train state on the mesh by :func:`state_sharding`."""
  rules.check(mesh)
  return put_global(state, state_sharding(state, mesh, rules))


def shard_teacher(teacher_variables: Any, mesh: Mesh,
                  rules: ShardingRules) -> Any:
  """Places the teacher's variables on the mesh by :func:`teacher_sharding`."""
  rules.check(mesh)
  return put_global(teacher_variables,
                    teacher_sharding(teacher_variables, mesh, rules))
