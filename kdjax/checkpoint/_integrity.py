"""Fingerprints, checksums and structure checks for checkpointed pytrees.

* :func:`tree_fingerprint`: a SHA-256 over leaf paths, shapes, dtypes and
  bytes, identifying a teacher (is the run resumed against the same teacher?).
* :func:`tree_checksums`: one position-weighted 32-bit checksum per leaf,
  computed on the device at save time and re-checked at restore time. Orbax
  and TensorStore detect a truncated file or a damaged index, but not a bit
  flipped inside a compressed data chunk (the restore returns wrong values
  silently); these checksums do.
* :func:`describe_mismatch`: the leaves where a target tree and a checkpoint's
  metadata differ, for clear error messages.
* :func:`draining_event_loops`: orbax reads of a broken checkpoint that end
  without stray asyncio tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np


class CheckpointError(ValueError):
  """Base class of kdjax checkpoint errors."""
  # A ``kdjax`` command that stops on this error exits with status 1 (a
  # failure, not a usage error), even before its first step.
  exit_code: int = 1


class CheckpointCorruptedError(CheckpointError):
  """A checkpoint's files cannot be read or do not hold what was saved."""

  def __init__(self, message: str, *, step: int | None = None,
               path: str | None = None):
    super().__init__(message)
    self.step = step
    self.path = path


class TeacherMismatchError(CheckpointError):
  """A teacher's checkpoint or fingerprint does not match the teacher model."""


class StructureMismatchError(CheckpointError):
  """A checkpoint's tree does not match the target (template) tree."""


def key_name(key: Any) -> str:
  """The name of one pytree key entry (``DictKey``, ``GetAttrKey``, ...)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple) -> str:
  """A key path as ``"params/dense_0/kernel"``."""
  return "/".join(key_name(k) for k in path)


def is_prng_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def stored_shape_dtype(x: Any) -> tuple[tuple, np.dtype]:
  """Shape and dtype of a leaf as stored (typed PRNG keys as their key data)."""
  if is_prng_key(x):
    data = jax.eval_shape(jax.random.key_data,
                          jax.ShapeDtypeStruct(x.shape, x.dtype))
    return tuple(data.shape), np.dtype(data.dtype)
  return tuple(np.shape(x)), np.dtype(x.dtype)


def host_value(x: Any) -> np.ndarray:
  """The whole value of a leaf as a NumPy array, in any process.

  Fully addressable and fully replicated arrays are read locally; an array
  sharded across processes is gathered with
  ``multihost_utils.process_allgather`` (a collective: every process must
  call it, in the same order).
  """
  if isinstance(x, jax.Array) and not (x.is_fully_addressable
                                       or x.is_fully_replicated):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def flat_with_paths(tree: Any) -> dict[str, Any]:
  """``{"a/b/c": leaf}`` for every leaf (``None`` and empty nodes dropped)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(p): leaf for p, leaf in leaves}


# -----------------------------------------------------------------------------
# Teacher fingerprint.
# -----------------------------------------------------------------------------


def tree_fingerprint(tree: Any) -> str:
  """SHA-256 hex digest of a pytree's leaf paths, shapes, dtypes and bytes.

  ``H = sha256(concat_i(path_i | shape_i | dtype_i | bytes_i))`` over the
  leaves sorted by path, so it does not depend on dict insertion order or on
  the device layout (arrays are gathered to the host once). Typed PRNG keys
  are hashed through their key data.

  With several processes, a leaf sharded across processes is gathered to
  every host (:func:`host_value`); call it on every process (it is then a
  collective), all get the same digest.

  Args:
    tree: a pytree of concrete arrays (e.g. the teacher's variables).

  Returns:
    64 hex characters.
  """
  digest = hashlib.sha256()
  flat = flat_with_paths(tree)
  for name in sorted(flat):
    leaf = flat[name]
    if isinstance(leaf, jax.ShapeDtypeStruct):
      raise TypeError(f"tree_fingerprint needs concrete arrays; leaf {name!r} "
                      "is a ShapeDtypeStruct.")
    if is_prng_key(leaf):
      leaf = jax.random.key_data(leaf)
    value = np.ascontiguousarray(host_value(leaf))
    digest.update(name.encode())
    digest.update(repr(tuple(value.shape)).encode())
    digest.update(value.dtype.str.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


# -----------------------------------------------------------------------------
# Per-leaf checksums (computed on the device).
# -----------------------------------------------------------------------------

_GOLDEN = np.uint32(0x9E3779B1)


def _as_uint32_words(x: jax.Array) -> jax.Array | None:
  """The bits of ``x`` as uint32 words, in ``x``'s shape (no reshape).

  8-byte dtypes get a trailing axis of 2 words. Keeping the shape (instead of
  flattening) lets the partitioner checksum a sharded array shard by shard.
  """
  if is_prng_key(x):
    x = jax.random.key_data(x)
  dtype = np.dtype(x.dtype)
  if dtype == np.bool_:
    return x.astype(jnp.uint32)
  if dtype.kind not in "fiu" and dtype.name not in ("bfloat16",) and not (
      dtype.name.startswith("float8")):
    return None  # complex, strings: no checksum
  size = dtype.itemsize
  if size == 4:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif size == 2:
    words = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif size == 1:
    words = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  elif size == 8:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # trailing dim of 2
  else:
    return None
  return words


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """The row-major flat index of every element, ``uint32`` (mod ``2^32``).

  ``i = sum_d iota_d * stride_d``, built from broadcasted iotas in ``shape``
  so that, for a sharded operand, each device computes only the indices of
  its own shard (no reshape, hence no resharding or gather).
  """
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in range(len(shape) - 1, -1, -1):
    iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    index = index + iota * jnp.uint32(stride % (1 << 32))
    stride *= shape[axis]
  return index


def _checksum_leaves(leaves):
  out = []
  for x in leaves:
    words = _as_uint32_words(x)
    if words is None:
      out.append(jnp.zeros((), jnp.uint32))
      continue
    weights = (_flat_index(words.shape) * _GOLDEN) | jnp.uint32(1)
    out.append(jnp.sum(words * weights, dtype=jnp.uint32))
  return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


_checksum_leaves_jit = jax.jit(_checksum_leaves)


def tree_checksums(tree: Any) -> dict[str, int]:
  """One 32-bit checksum per leaf: ``c = sum_i w_i * u_i mod 2^32``.

  ``u`` are the leaf's bits as unsigned 32-bit words (2- and 1-byte dtypes
  widened, 8-byte dtypes split), ``w_i = (i * 0x9E3779B1) | 1`` odd weights,
  so any single flipped bit changes ``c``, and so do swapped elements in
  general. Computed in one jitted call on the devices holding the tree
  (global, layout-independent: a state saved on 8 devices and restored on 1
  has equal checksums); only ``num_leaves`` words come back to the host.

  Multi-process: the sum is linear, so each device sums its own shard
  (weights from the shard's global indices, no reshape, no gather) and XLA
  adds the partial sums with one all-reduce; the result is replicated, so
  every process gets the same checksums and takes the same decisions. Call it
  on every process (it is a collective), with the leaves on one device set.

  Args:
    tree: a pytree of arrays (any sharding).

  Returns:
    ``{"a/b/c": checksum}`` for every leaf.
  """
  flat = flat_with_paths(tree)
  names = list(flat)
  if not names:
    return {}
  values = host_value(_checksum_leaves_jit([flat[n] for n in names]))
  return {n: int(v) for n, v in zip(names, values)}


# -----------------------------------------------------------------------------
# Structure comparison against checkpoint metadata.
# -----------------------------------------------------------------------------


def metadata_shapes(metadata_tree: Any) -> dict[str, tuple[tuple, np.dtype]]:
  """``{"a/b": (shape, dtype)}`` from an orbax metadata tree."""
  out = {}
  for name, leaf in flat_with_paths(metadata_tree).items():
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    out[name] = (tuple(shape) if shape is not None else (),
                 np.dtype(dtype) if dtype is not None else None)
  return out


def describe_mismatch(target: Mapping[str, Any],
                      stored: Mapping[str, tuple[tuple, Any]],
                      *,
                      check_dtype: bool = True,
                      allow_extra: bool = False,
                      limit: int = 20) -> list[str]:
  """Lines describing where ``target`` leaves and ``stored`` leaves differ.

  Args:
    target: ``{path: leaf}`` (arrays or ShapeDtypeStructs).
    stored: ``{path: (shape, dtype)}`` read from a checkpoint.
    check_dtype: also report dtype differences.
    allow_extra: do not report leaves only in the checkpoint.
    limit: at most this many lines per kind.

  Returns:
    ``[]`` when they match.
  """
  lines = []
  missing = [n for n in target if n not in stored]
  extra = [] if allow_extra else [n for n in stored if n not in target]
  changed = []
  for name, leaf in target.items():
    if name not in stored:
      continue
    shape, dtype = stored_shape_dtype(leaf)
    s_shape, s_dtype = stored[name]
    if tuple(s_shape) != shape or (check_dtype and s_dtype is not None
                                   and s_dtype != dtype):
      changed.append(f"{name}: checkpoint {tuple(s_shape)} {s_dtype}, "
                     f"model {shape} {dtype}")

  def add(title, items):
    if items:
      lines.append(f"{title} ({len(items)}):")
      lines.extend(f"  {x}" for x in items[:limit])
      if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")

  add("leaves with a different shape/dtype", changed)
  add("leaves missing from the checkpoint", missing)
  add("leaves in the checkpoint but not in the model", extra)
  return lines


# -----------------------------------------------------------------------------
# Reading a broken checkpoint without stray tracebacks.
# -----------------------------------------------------------------------------


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its pending tasks finish before it closes.

  Orbax runs its reads as ``asyncio.gather`` of TensorStore futures in a fresh
  loop (``asyncio_utils.run_sync``). When one read fails (a corrupted step),
  ``gather`` raises at once and orbax closes the loop while the other reads
  are still in flight; each of them, completing later on a TensorStore
  thread, calls ``loop.call_soon_threadsafe`` on the closed loop and prints a
  ``RuntimeError: Event loop is closed`` traceback (and their coroutines,
  destroyed pending, print more when collected). Closing this loop first
  runs it until those tasks are done (their exceptions collected, not
  raised), so nothing completes after the close.
  """

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      pending = asyncio.all_tasks(self)
      if pending:
        self.run_until_complete(
            asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  """The default policy, whose new loops are :class:`_DrainingEventLoop` s."""

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingEventLoop()


_POLICY_LOCK = threading.RLock()


@contextlib.contextmanager
def draining_event_loops() -> Iterator[None]:
  """Within it, new asyncio loops drain their tasks before closing.

  Wrap orbax reads that may fail (restoring a step that may be corrupted):
  the failure is then raised once, cleanly, with no read left running. The
  event loop policy is process-wide, so it is swapped under a lock and put
  back on exit; loops created meanwhile by other threads behave like the
  default ones except for the drain on close.
  """
  with _POLICY_LOCK:
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
      yield
    finally:
      asyncio.set_event_loop_policy(previous)
