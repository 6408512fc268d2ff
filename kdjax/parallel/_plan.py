"""Per-device memory of a sharded train step, from its compilation alone.

:func:`plan_train_step_memory` jits a step with its in/out shardings, lowers
it on abstract inputs (``jax.ShapeDtypeStruct``: no array is allocated, so a
teacher of billions of parameters costs nothing) and compiles it; XLA's
``memory_analysis()`` of the compiled (per-device, SPMD-partitioned) program
gives the bytes of its arguments, outputs and temporary buffers. The
parameters and optimizer state per device are counted from the shardings
themselves (``sharding.shard_shape(global_shape)``).

The numbers are XLA's for the backend that compiled the step. Compiled for
simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``),
the argument and output sizes are exact for the target mesh but the
temporaries are an estimate: XLA's GPU and TPU compilers fuse, schedule and
rematerialise differently (and use fused attention kernels where the CPU
program materialises the attention matrix). Check the plan against a
measurement on the target accelerator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import Sharding

GIB = 2**30

ESTIMATE_NOTE = (
    "Compiled by XLA:{platform} for {devices} simulated devices: parameter, "
    "optimizer and batch bytes follow from the shardings; the temporaries are "
    "XLA:{platform}'s, an estimate (XLA's GPU/TPU fusion, scheduling and "
    "attention kernels differ): check it against a measurement on the GPU.")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one compiled train step.

  Attributes:
    devices: the number of devices of the mesh.
    mesh_shape: the mesh's ``{axis: size}``.
    platform: the backend that compiled the step (``"cpu"``, ``"gpu"``, ...).
    teacher_params: the teacher's variables held by one device.
    student_params: the student's parameters (``state.params``) per device.
    optimizer_state: the optimizer state (``state.opt_state``) per device.
    other_state: the rest of the train state (EMA, loss-term parameters and
      state, step, RNG) per device.
    batch: the batch's shard per device.
    argument_bytes: XLA's size of the step's arguments per device.
    output_bytes: of its outputs.
    alias_bytes: of the outputs that reuse (donated) argument buffers.
    temp_bytes: of its temporary buffers (activations, gradients, gathered
      parameters, collectives' buffers).
    code_bytes: of the generated code.
    device_memory_bytes: the memory of one device to compare with, or None.
  """
  devices: int
  mesh_shape: Mapping[str, int]
  platform: str
  teacher_params: int
  student_params: int
  optimizer_state: int
  other_state: int
  batch: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int = 0
  device_memory_bytes: Optional[int] = None

  @property
  def total_bytes(self) -> int:
    """The step's peak estimate per device: arguments, plus the outputs that
    do not reuse a donated argument, plus the temporaries."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes
            + self.temp_bytes)

  @property
  def fits(self) -> Optional[bool]:
    """Whether :attr:`total_bytes` fits :attr:`device_memory_bytes` (None
    when no device memory was given)."""
    if self.device_memory_bytes is None:
      return None
    return self.total_bytes <= self.device_memory_bytes

  def with_device_memory(self, gib: Optional[float]) -> "MemoryPlan":
    """This plan compared with a device of ``gib`` GiB (None: none)."""
    return dataclasses.replace(
        self, device_memory_bytes=None if gib is None else int(gib * GIB))

  def note(self) -> str:
    """The caveat printed under :meth:`table`."""
    return ESTIMATE_NOTE.format(platform=self.platform.upper(),
                                devices=self.devices)

  def table(self, title: Optional[str] = None) -> str:
    """The plan as a text table per device (GiB, or MiB / KiB for a total
    under 1 GiB / 1 MiB), with the caveat."""
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
    rows = [
        ("teacher parameters", self.teacher_params),
        ("student parameters", self.student_params),
        ("optimizer state", self.optimizer_state),
        ("other train state", self.other_state),
        ("batch", self.batch),
        ("step arguments (XLA)", self.argument_bytes),
        ("step outputs, not aliased (XLA)",
         self.output_bytes - self.alias_bytes),
        ("activations/temporaries (XLA)", self.temp_bytes),
        ("total", self.total_bytes),
    ]
    if self.device_memory_bytes is not None:
      rows.append(("device memory", self.device_memory_bytes))
    width = max(len(name) for name, _ in rows)
    unit, scale = _unit(self.total_bytes)
    lines = []
    if title:
      lines.append(title)
    lines.append(f"per device of {self.devices} (mesh {mesh}):")
    for name, value in rows:
      if name == "step arguments (XLA)" or name == "total":
        lines.append("  " + "-" * (width + 16))
      lines.append(f"  {name:<{width}}  {value / scale:11.3f} {unit}")
    if self.device_memory_bytes is not None:
      head = self.device_memory_bytes - self.total_bytes
      verdict = ("fits" if head >= 0 else "does NOT fit")
      lines.append(f"  {verdict}: {abs(head) / scale:.3f} {unit} "
                   f"{'to spare' if head >= 0 else 'over'} "
                   f"({100 * self.total_bytes / self.device_memory_bytes:.0f}%"
                   " of the device)")
    lines.append("note: " + self.note())
    return "\n".join(lines)


def _unit(nbytes: int) -> tuple[str, int]:
  for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
    if nbytes >= scale:
      return unit, scale
  return "KiB", 2**10


def _leaf_bytes(x: Any, sharding: Optional[Sharding]) -> int:
  shape = tuple(np.shape(x))
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    return 0
  if sharding is not None:
    shape = tuple(sharding.shard_shape(shape))
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data,
                          jax.ShapeDtypeStruct(shape, dtype))
    return int(math.prod(data.shape)) * np.dtype(data.dtype).itemsize
  return int(math.prod(shape)) * np.dtype(dtype).itemsize


def sharded_bytes(tree: Any, shardings: Any) -> int:
  """Bytes of ``tree``'s shards on one device (``shardings``: one per leaf,
  one for all, or None: whole)."""
  if tree is None:
    return 0
  leaves = jax.tree.leaves(tree)
  if shardings is None or isinstance(shardings, Sharding):
    return sum(_leaf_bytes(x, shardings) for x in leaves)
  shs = jax.tree.structure(tree).flatten_up_to(shardings)
  return sum(_leaf_bytes(x, s) for x, s in zip(leaves, shs))


def _field(tree: Any, shardings: Any, name: str) -> tuple[Any, Any]:
  if hasattr(tree, name) and hasattr(shardings, name):
    return getattr(tree, name), getattr(shardings, name)
  return None, None


def _abstract(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
      jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def plan_train_step_memory(step_fn: Callable[..., Any],
                           abstract_state: Any,
                           abstract_teacher_vars: Any,
                           abstract_batch: Any,
                           *,
                           mesh: Mesh,
                           state_shardings: Any,
                           teacher_shardings: Any,
                           batch_sharding: Any,
                           donate: bool = True,
                           device_memory_gib: Optional[float] = None
                           ) -> MemoryPlan:
  """Compiles ``step_fn`` for ``mesh`` on abstract inputs; its memory per device.

  Args:
    step_fn: the un-jitted ``step(state, teacher_variables, batch) ->
      (state, metrics)`` (e.g. :func:`kdjax.train.build_step` or
      :func:`kdjax.lm.build_lm_objective_step`).
    abstract_state: the train state's shapes (``jax.eval_shape`` of
      :func:`kdjax.train.create_state`), or arrays (only shapes are read).
    abstract_teacher_vars: the teacher's variables' shapes, or None.
    abstract_batch: the global batch's shapes.
    mesh: the target mesh (its devices are the ones that compile).
    state_shardings: :func:`state_sharding` of the state (a
      ``DistillState`` of shardings: ``params`` and ``opt_state`` are
      counted apart).
    teacher_shardings: :func:`teacher_sharding` of the teacher's variables
      (None for no teacher).
    batch_sharding: :func:`batch_sharding`, one sharding for every leaf (or
      a pytree of them).
    donate: donate the state (as the training step does): its outputs reuse
      the state's buffers.
    device_memory_gib: the device memory to compare with (the table says
      whether the step fits), or None.

  Returns:
    A :class:`MemoryPlan` (``plan.table()`` prints it).
  """
  abstract_state = _abstract(abstract_state)
  abstract_teacher_vars = (None if abstract_teacher_vars is None
                           else _abstract(abstract_teacher_vars))
  abstract_batch = _abstract(abstract_batch)
  if isinstance(batch_sharding, Sharding):
    batch_shs = jax.tree.map(lambda _: batch_sharding, abstract_batch)
  else:
    batch_shs = batch_sharding
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(step_fn, donate_argnums=(0,) if donate else (),
                   in_shardings=(state_shardings, teacher_shardings,
                                 batch_shs),
                   out_shardings=(state_shardings, replicated))
  compiled = jitted.lower(abstract_state, abstract_teacher_vars,
                          abstract_batch).compile()
  stats = compiled.memory_analysis()
  params, params_sh = _field(abstract_state, state_shardings, "params")
  opt, opt_sh = _field(abstract_state, state_shardings, "opt_state")
  student = sharded_bytes(params, params_sh)
  optimizer = sharded_bytes(opt, opt_sh)
  whole = sharded_bytes(abstract_state, state_shardings)
  plan = MemoryPlan(
      devices=int(mesh.devices.size),
      mesh_shape={str(k): int(v) for k, v in mesh.shape.items()},
      platform=str(mesh.devices.flat[0].platform),
      teacher_params=sharded_bytes(abstract_teacher_vars, teacher_shardings),
      student_params=student, optimizer_state=optimizer,
      other_state=whole - student - optimizer,
      batch=sharded_bytes(abstract_batch, batch_shs),
      argument_bytes=int(getattr(stats, "argument_size_in_bytes", 0)),
      output_bytes=int(getattr(stats, "output_size_in_bytes", 0)),
      alias_bytes=int(getattr(stats, "alias_size_in_bytes", 0)),
      temp_bytes=int(getattr(stats, "temp_size_in_bytes", 0)),
      code_bytes=int(getattr(stats, "generated_code_size_in_bytes", 0)))
  return plan.with_device_memory(device_memory_gib)
