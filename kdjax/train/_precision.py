"""Mixed-precision policy for distillation steps.

A :class:`Policy` names four dtypes, and the train step applies them at fixed
places (never ad-hoc casts inside models or losses)::

  master params  (param_dtype, float32)  --cast-->  student compute (compute_dtype)
  teacher params (as stored)             --cast-->  teacher compute (teacher_compute_dtype)
  model inputs   (batch floats)          --cast-->  the compute dtype of each model
  logits/features                        --cast-->  output_dtype (float32) -> loss

* The optimizer updates the float32 master weights: the cast to the compute
  dtype is inside the differentiated function, so gradients come back in
  ``param_dtype``.
* The loss always sees ``output_dtype`` outputs and the *uncast* batch
  (labels, masks and weights keep their dtype), so it is computed in float32.
* Only floating-point leaves are cast; integer labels, indices and PRNG keys
  are left alone. Only the ``"params"`` collection of a model's variables is
  cast; other collections (BatchNorm statistics) keep their dtype.

A Flax module with a fixed ``dtype=jnp.float32`` attribute casts its inputs and
parameters back to float32 itself, which undoes the policy; build such
modules with ``dtype=None`` (follow the inputs) or with the compute dtype.

Example (teacher forward in bfloat16, student in float32)::

  policy = Policy(teacher_compute_dtype=jnp.bfloat16)
  step = make_train_step(student_apply, teacher_apply, loss_fn, optimizer,
                         policy=policy)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _canonical(dtype) -> Optional[np.dtype]:
  if dtype is None:
    return None
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"policy dtypes must be floating point, got {dtype}.")
  return dtype


def cast_floating(tree: Any, dtype: Optional[jax.typing.DTypeLike]) -> Any:
  """Casts every floating-point array leaf of ``tree`` to ``dtype`` (others unchanged).

  ``dtype=None`` returns ``tree`` unchanged. PRNG key arrays and integer or
  boolean leaves are never cast.
  """
  if dtype is None:
    return tree
  dtype = jnp.dtype(dtype)

  def cast(x):
    if not hasattr(x, "dtype"):
      return x
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return jnp.asarray(x).astype(dtype)
    return x

  return jax.tree.map(cast, tree)


def _cast_params_collection(variables: Any, dtype) -> Any:
  """Casts ``variables["params"]`` (or a bare params tree) to ``dtype``."""
  if dtype is None:
    return variables
  if isinstance(variables, Mapping) and "params" in variables:
    return {**variables, "params": cast_floating(variables["params"], dtype)}
  return cast_floating(variables, dtype)


@dataclasses.dataclass(frozen=True)
class Policy:
  """Which dtype is used where in a distillation step.

  Attributes:
    param_dtype: dtype of the stored (master) student parameters and of the
      optimizer state; float32 in mixed precision. ``create_state(...,
      policy=policy)`` casts the initial params to it.
    compute_dtype: dtype of the student's forward/backward pass (its params
      and floating inputs are cast to it inside the step).
    teacher_compute_dtype: dtype of the teacher's forward pass; bfloat16
      halves its memory traffic with no effect on the student's gradients
      beyond the rounding of the teacher's outputs.
    output_dtype: dtype the logits and features of both models are cast to
      before the loss (float32: the loss is always computed in float32).

  The default policy is all float32 (the step then does no cast at all).
  Dtypes may be given as strings (``"bfloat16"``) or NumPy/JAX dtypes.
  """
  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  teacher_compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32

  def __post_init__(self):
    for field in dataclasses.fields(self):
      object.__setattr__(self, field.name,
                         _canonical(getattr(self, field.name)))

  @classmethod
  def bf16_teacher(cls) -> "Policy":
    """Teacher forward in bfloat16; student, master weights and loss in float32."""
    return cls(teacher_compute_dtype=jnp.bfloat16)

  @classmethod
  def bf16(cls) -> "Policy":
    """Teacher and student compute in bfloat16; float32 master weights and loss."""
    return cls(compute_dtype=jnp.bfloat16, teacher_compute_dtype=jnp.bfloat16)

  @property
  def is_identity(self) -> bool:
    return all(d == jnp.float32 for d in (self.param_dtype, self.compute_dtype,
                                          self.teacher_compute_dtype,
                                          self.output_dtype))

  def cast_to_param(self, tree: Any) -> Any:
    """Floating leaves -> ``param_dtype`` (used on the initial params)."""
    return cast_floating(tree, self.param_dtype)

  def student_variables(self, variables: Any) -> Any:
    """Student ``variables["params"]`` -> ``compute_dtype``."""
    return _cast_params_collection(variables, self.compute_dtype)

  def teacher_variables(self, variables: Any) -> Any:
    """Teacher ``variables["params"]`` -> ``teacher_compute_dtype``."""
    return _cast_params_collection(variables, self.teacher_compute_dtype)

  def student_inputs(self, batch: Any) -> Any:
    """Floating batch leaves -> ``compute_dtype`` (what the student reads)."""
    return cast_floating(batch, self.compute_dtype)

  def teacher_inputs(self, batch: Any) -> Any:
    """Floating batch leaves -> ``teacher_compute_dtype``."""
    return cast_floating(batch, self.teacher_compute_dtype)

  def cast_output(self, output: Any) -> Any:
    """A model output's floating leaves (logits, features) -> ``output_dtype``; ``state`` untouched.

    Except the operands of a memory-lean loss: when the features hold an
    ``"unembedding_kernel"`` (``kdjax.lm.make_lm_apply(...,
    compute_logits=False)``), that kernel, ``"unembedding_bias"`` and
    ``"hidden"`` keep the compute dtype. The lean losses
    (``kdjax.losses.divergence_from_hidden``) run their vocabulary-sized
    matmuls on them with float32 accumulation and float32 softmax statistics;
    upcasting first would make those matmuls float32 (measured: 1.2x slower
    on the CPU, and off the bf16 tensor cores on a GPU) with no gain in
    accuracy, since the upcast values are the same bf16 numbers.
    """
    if output is None:
      return None
    state = getattr(output, "state", None)
    if state is not None:
      output = output.replace(state=None)
    features = getattr(output, "features", None) or {}
    kept = {}
    if LEAN_KERNEL_FEATURE in features:
      kept = {k: features[k] for k in LEAN_FEATURES if k in features}
    output = cast_floating(output, self.output_dtype)
    if kept:
      output = output.replace(features={**output.features, **kept})
    if state is not None:
      output = output.replace(state=state)
    return output


# Features of a memory-lean output that stay in the compute dtype (cast_output).
LEAN_KERNEL_FEATURE = "unembedding_kernel"
LEAN_FEATURES = ("hidden", LEAN_KERNEL_FEATURE, "unembedding_bias")


def resolve_policy(policy: Optional[Policy]) -> Optional[Policy]:
  """``None`` or the all-float32 policy -> ``None`` (the step adds no cast)."""
  if policy is None:
    return None
  if not isinstance(policy, Policy):
    raise TypeError(
        f"policy must be a kdjax.train.Policy, got {type(policy).__name__}.")
  return None if policy.is_identity else policy
