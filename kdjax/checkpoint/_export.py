"""Exporting the student for inference; restoring a teacher read-only.

:func:`export_student` writes the student's variables alone (no loss-term
connectors or heads, no optimizer state) as a plain orbax PyTree checkpoint:
``ocp.StandardCheckpointer().restore(path)`` reads it without kdjax.

:func:`restore_teacher` reads a teacher's variables (params and other
collections, never optimizer state) from such an export, from any orbax PyTree
checkpoint of a variables dict, or from a kdjax run directory (the student of
an earlier run as the teacher of the next), directly into the shardings the
current mesh needs. It never writes.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import jax
import orbax.checkpoint as ocp
from etils import epath

from kdjax.checkpoint import _integrity
from kdjax.checkpoint._integrity import CheckpointCorruptedError
from kdjax.checkpoint._integrity import TeacherMismatchError
from kdjax.checkpoint._layout import STATE_ITEM
from kdjax.checkpoint._layout import Shardings
from kdjax.checkpoint._layout import abstract_like
from kdjax.checkpoint._layout import absolute as _absolute
from kdjax.checkpoint._layout import short_error as _short


def export_student(state: Any,
                   directory: Union[str, epath.PathLike],
                   *,
                   use_ema: bool = False,
                   overwrite: bool = False) -> epath.Path:
  """Writes the student's variables alone, for inference.

  Saves ``{"params": state.params, **state.model_state}`` (the apply
  function's ``variables``; with ``use_ema`` the EMA params instead) and
  nothing else: no ``loss_params`` (connectors, CRD heads), no optimizer or
  loss state, no RNG. The custom metadata records the step and the
  fingerprint of the exported variables.

  Args:
    state: a :class:`kdjax.train.DistillState`.
    directory: where to write (must not exist unless ``overwrite``).
    use_ema: export ``state.ema_params``.
    overwrite: replace an existing export.

  Returns:
    The export directory.
  """
  variables = state.ema_variables() if use_ema else state.student_variables()
  path = _absolute(directory)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
  custom = {"kdjax_export": {
      "step": int(jax.device_get(state.step)), "use_ema": bool(use_ema),
      "fingerprint": _integrity.tree_fingerprint(variables)}}
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    checkpointer.save(path, args=ocp.args.StandardSave(variables),
                      custom_metadata=custom, force=overwrite)
  return path


def _is_pytree_checkpoint(path: epath.Path) -> bool:
  return (path / "_METADATA").exists() or (path / "manifest.ocdbt").exists()


def _resolve(path: epath.Path, step: Optional[int]) -> tuple[epath.Path, bool]:
  """Returns ``(pytree directory, is_kdjax_run_state)``."""
  if not path.exists():
    raise FileNotFoundError(f"no teacher checkpoint at {path}.")
  if step is None and _is_pytree_checkpoint(path):
    return path, False
  if step is None and _is_pytree_checkpoint(path / STATE_ITEM):
    return path / STATE_ITEM, True
  steps = sorted(int(p.name) for p in path.iterdir()
                 if p.name.isdigit() and p.is_dir())
  if not steps:
    raise FileNotFoundError(
        f"{path} is neither an orbax PyTree checkpoint nor a kdjax run "
        "directory (no step subdirectories).")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no step {step} in {path}; steps: {steps}.")
  step_dir = path / str(step)
  if _is_pytree_checkpoint(step_dir / STATE_ITEM):
    return step_dir / STATE_ITEM, True
  if _is_pytree_checkpoint(step_dir):
    return step_dir, False
  raise FileNotFoundError(f"{step_dir} holds no PyTree checkpoint.")


def restore_teacher(directory: Union[str, epath.PathLike],
                    target: Mapping[str, Any],
                    *,
                    shardings: Shardings = None,
                    step: Optional[int] = None) -> dict:
  """Reads a teacher's variables read-only, into the target shardings.

  Args:
    directory: an :func:`export_student` directory or any orbax PyTree
      checkpoint of a variables dict; or a kdjax run directory / step
      directory, whose student (``params`` and ``model_state``) is read,
      never its optimizer state.
    target: the teacher's variables ``{"params": ..., other collections}``
      as arrays or ``jax.ShapeDtypeStruct`` s (``jax.eval_shape(model.init,
      ...)``); fixes the structure, shapes and dtypes (stored values are cast
      to the target dtype).
    shardings: see :func:`abstract_like` (e.g. ``NamedSharding(mesh, P())``
      to replicate the teacher on the current mesh).
    step: for a run directory, the step to read (default: the latest).

  Returns:
    The variables, in ``target`` 's structure.

  Raises:
    TeacherMismatchError: the checkpoint's leaves do not match ``target``
      (every mismatched leaf is listed, with both shapes).
    CheckpointCorruptedError: the files cannot be read.
  """
  if not isinstance(target, Mapping) or "params" not in target:
    raise TypeError("target must be the teacher's variables "
                    "{'params': ..., ...}; got "
                    f"{type(target).__name__}.")
  path, is_run = _resolve(_absolute(directory), step)
  abstract = abstract_like(dict(target), shardings)
  if is_run:
    rest = {k: v for k, v in abstract.items() if k != "params"}
    stored_item = {"params": abstract["params"]}
    if rest:
      stored_item["model_state"] = rest
  else:
    stored_item = abstract
  handler = ocp.PyTreeCheckpointHandler()
  try:
    stored = _integrity.metadata_shapes(handler.metadata(path).tree)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptedError(
        f"the teacher checkpoint at {path} cannot be read: {_short(e)}",
        path=str(path)) from e
  finally:
    handler.close()
  mismatch = _integrity.describe_mismatch(
      _integrity.flat_with_paths(stored_item), stored, check_dtype=False,
      allow_extra=True)
  if mismatch:
    raise TeacherMismatchError(
        f"the teacher checkpoint at {path} does not match the teacher model:\n"
        + "\n".join(mismatch))
  restore_args = ocp.checkpoint_utils.construct_restore_args(stored_item)
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(
          path, args=ocp.args.PyTreeRestore(item=stored_item,
                                            restore_args=restore_args,
                                            partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptedError(
        f"the teacher checkpoint at {path} is corrupted or truncated: "
        f"{_short(e)}", path=str(path)) from e
  if is_run:
    variables = {"params": restored["params"],
                 **dict(restored.get("model_state", {}))}
  else:
    variables = dict(restored)
  for name, leaf in _integrity.flat_with_paths(variables).items():
    if not isinstance(leaf, jax.Array):
      raise CheckpointCorruptedError(
          f"the teacher checkpoint at {path} did not restore leaf {name!r} "
          f"as an array (got {type(leaf).__name__}).", path=str(path))
  return variables
