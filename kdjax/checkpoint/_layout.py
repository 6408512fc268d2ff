"""What one checkpoint step of a distillation run holds on disk.

A step is a directory ``<root>/<step>/`` of four items, committed together
by one atomic rename (orbax writes to ``<step>.orbax-checkpoint-tmp`` first):

* ``state`` (:data:`STATE_ITEM`): the :class:`kdjax.train.DistillState` as an
  orbax PyTree;
* ``data_iterator`` (:data:`DATA_ITEM`): the data iterator's ``get_state()``
  (JSON; bytes as base64, one entry per process in a multi-process run);
* ``config`` (:data:`CONFIG_ITEM`): the run's config (JSON);
* ``meta`` (:data:`META_ITEM`): format version, the teacher's fingerprint, one
  checksum per state leaf and user ``extra`` JSON.

Corrupted steps moved aside on restore go to ``<root>/corrupted/``
(:data:`QUARANTINE_DIR`). Also here: the restore target of a state
(:func:`abstract_like`), and the small conversions the items need.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Mapping, Union

import jax
import numpy as np
from etils import epath

FORMAT_VERSION = 1
STATE_ITEM = "state"
DATA_ITEM = "data_iterator"
CONFIG_ITEM = "config"
META_ITEM = "meta"
QUARANTINE_DIR = "corrupted"
_BYTES_KEY = "__kdjax_bytes_b64__"
# The data_iterator item of a multi-process run: {PER_PROCESS_KEY: [state of
# process 0, of process 1, ...]}.
PER_PROCESS_KEY = "__kdjax_per_process__"

Shardings = Union[None, jax.sharding.Sharding, Any]


def abstract_like(tree: Any, shardings: Shardings = None) -> Any:
  """``jax.ShapeDtypeStruct`` s with shardings, the restore target of ``tree``.

  Args:
    tree: a pytree of arrays or ShapeDtypeStructs (e.g. a freshly built state,
      or ``jax.eval_shape`` of its constructor).
    shardings: ``None`` (each leaf's own ``.sharding``; the first local device
      for leaves without one), one ``jax.sharding.Sharding`` for every leaf
      (e.g. ``NamedSharding(mesh, P())``), or a pytree of shardings matching
      ``tree``.

  Returns:
    The abstract tree, for ``ocp.args.StandardRestore``.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(x, sharding):
    if sharding is None:
      sharding = getattr(x, "sharding", None) or default
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  try:
    return jax.tree.map(one, tree, shardings)
  except ValueError as e:
    raise ValueError("`shardings` must be None, one Sharding, or a pytree "
                     f"matching the template: {e}") from e


def absolute(directory) -> epath.Path:
  """Local paths made absolute (orbax requires it); URLs kept."""
  text = str(directory)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def jsonable(value: Any, what: str) -> Any:
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{what} must be JSON-serialisable: {e}") from e
  return value


def encode_iterator_state(state: Any) -> dict:
  if isinstance(state, (bytes, bytearray)):  # grain's DataLoader iterators
    return {_BYTES_KEY: base64.b64encode(bytes(state)).decode("ascii")}
  if not isinstance(state, Mapping):
    raise TypeError("data_iterator.get_state() must return a dict or bytes, "
                    f"got {type(state).__name__}.")
  return jsonable(dict(state), "data_iterator.get_state()")


def decode_iterator_state(state: Any) -> Any:
  if isinstance(state, Mapping) and set(state) == {_BYTES_KEY}:
    return base64.b64decode(state[_BYTES_KEY])
  return state


def short_error(e: BaseException, limit: int = 400) -> str:
  """``"Type: message"`` on one line, without TensorStore's spec dumps."""
  text = " ".join(str(e).split())
  for dump in (" See full TensorStore details", " [tensorstore_spec="):
    text = text.split(dump)[0]
  if len(text) > limit:
    text = text[:limit] + " ..."
  return f"{type(e).__name__}: {text}"


def step_path(directory: epath.Path, step: int) -> epath.Path:
  """The directory of step ``step`` under the checkpoint root ``directory``."""
  return directory / str(step)
