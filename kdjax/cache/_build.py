"""Building a teacher cache: the teacher run once over a dataset, into shards.

:func:`build_teacher_cache` runs the teacher's jitted forward pass over the
dataset in fixed-size (padded) batches, keeps its full or top-k logits and
the named features (moved to example-major order, see
:mod:`kdjax.cache._format`), writes them next to the examples in ``.npz``
shards and writes the manifest, with the fingerprints of the teacher, the
dataset, ``k`` and the temperature, last.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.cache import _fingerprint
from kdjax.cache._cache import TeacherCache
from kdjax.cache._format import FORMAT
from kdjax.cache._format import MANIFEST
from kdjax.cache._format import VERSION
from kdjax.cache._format import write_manifest
from kdjax.losses import top_k_teacher
from kdjax.models import ApplyFn
from kdjax.models import TEACHER_LOGITS_KEY
from kdjax.train import Policy
from kdjax.train import teacher_forward


def _teacher_entries(out, k: Optional[int], temperature: float,
                     feature_names: Sequence[str], who: str) -> dict:
  logits = jnp.asarray(out.logits, jnp.float32)
  if k is None:
    entries = {"logits": logits}
  else:
    top = top_k_teacher(logits, k, temperature)
    entries = {"values": top.values,
               "indices": top.indices.astype(jnp.int32),
               "logsumexp": top.logsumexp}
  for name in feature_names:
    if name not in out.features:
      raise KeyError(
          f"the {who} does not produce the feature {name!r}; features it "
          f"produces: {sorted(out.features)} (capture more with the adapter's "
          "feature_names=...).")
    entries[f"features/{name}"] = jnp.asarray(out.features[name], jnp.float32)
  return entries


def _logit_entry_keys(k: Optional[int]) -> tuple[str, ...]:
  return ("logits",) if k is None else ("values", "indices", "logsumexp")


def _resolve_example_axes(example_axes: Optional[Mapping[str, int]],
                          out_shape: Any, k: Optional[int],
                          feature_names: Sequence[str]) -> dict[str, int]:
  """``{entry key: non-negative example axis}`` of the teacher's stored outputs.

  ``example_axes`` maps ``"logits"`` or a stored feature's name to the axis
  (negative counts from the end) that holds the examples; the feature
  ``"teacher_logits"`` defaults to axis 1 when it has one more axis than the
  teacher's logits (the ``[M, ..., C]`` stack of
  :func:`kdjax.models.ensemble_apply`), every other array to axis 0.
  ``out_shape`` is the teacher's output as ``jax.eval_shape`` gives it.
  """
  given = dict(example_axes or {})
  allowed = ("logits",) + tuple(feature_names)
  for name in given:
    if name not in allowed:
      raise ValueError(
          f"example_axes names {name!r}, which the cache does not store; it "
          f"stores 'logits' and the features {list(feature_names)}.")
  logits_ndim = len(out_shape.logits.shape)
  features = dict(getattr(out_shape, "features", None) or {})
  axes = {}
  for name in allowed:
    if name == "logits":
      ndim, what = logits_ndim, "the teacher's logits"
      # The class axis (last) cannot hold the examples.
      limit = ndim - 1
    elif name in features:
      ndim, what = len(features[name].shape), f"the feature {name!r}"
      limit = ndim
    else:
      continue  # a missing feature: the forward pass raises a KeyError.
    if name in given:
      axis = given[name]
      if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"example_axes[{name!r}] must be an int, got "
                         f"{axis!r}.")
      axis = int(axis)
    elif name == TEACHER_LOGITS_KEY and ndim == logits_ndim + 1:
      axis = 1  # ensemble_apply's [M, ..., C] stack.
    else:
      axis = 0
    shape = (tuple(out_shape.logits.shape) if name == "logits"
             else tuple(features[name].shape))
    normalized = axis + ndim if axis < 0 else axis
    if not 0 <= normalized < limit:
      raise ValueError(
          f"example_axes[{name!r}] = {axis} is out of range for {what} of "
          f"shape {shape} ({ndim} axes"
          + ("; the last one holds the classes" if name == "logits" else "")
          + f"): the example axis must lie in [{-ndim}, {limit - 1}].")
    keys = (_logit_entry_keys(k) if name == "logits"
            else (f"features/{name}",))
    for key in keys:
      axes[key] = normalized
  return axes


def _example_major(key: str, value: np.ndarray, axis: int, size: int,
                   teacher_name: str) -> np.ndarray:
  """``value`` with its example axis moved first (checked to hold ``size`` examples)."""
  if value.ndim <= axis or value.shape[axis] != size:
    name = key[len("features/"):] if key.startswith("features/") else "logits"
    raise ValueError(
        f"the teacher {teacher_name!r} output {key!r} has shape "
        f"{tuple(value.shape)}: its example axis {axis} does not hold the "
        f"batch's {size} examples. Name the axis that does with "
        f"build_teacher_cache(..., example_axes={{{name!r}: axis}}).")
  return value if axis == 0 else np.ascontiguousarray(
      np.moveaxis(value, axis, 0))


def _iter_dataset(dataset, batch_size: int) -> Iterator[dict]:
  if isinstance(dataset, Mapping):
    arrays = {k: np.asarray(v) for k, v in dataset.items()}
    sizes = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
      raise ValueError(
          "every dataset array needs the same leading (example) axis; got "
          f"leading sizes {sizes}.")
    n = next(iter(sizes.values()))
    for start in range(0, n, batch_size):
      yield {k: v[start:start + batch_size] for k, v in arrays.items()}
  else:
    for batch in dataset:
      yield {k: np.asarray(v) for k, v in batch.items()}


def _pad(batch: dict, size: int) -> tuple[dict, int]:
  n = next(iter(batch.values())).shape[0]
  if n == size:
    return batch, n
  return {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)])
          for k, v in batch.items()}, n


def build_teacher_cache(path: str,
                        teacher_apply: ApplyFn,
                        teacher_variables: Any,
                        dataset: Union[Mapping[str, Any], Iterable[Mapping[str, Any]]],
                        *,
                        k: Optional[int] = None,
                        temperature: float = 1.0,
                        feature_names: Sequence[str] = (),
                        example_axes: Optional[Mapping[str, int]] = None,
                        batch_size: int = 256,
                        examples_per_shard: int = 16384,
                        dataset_fingerprint: Optional[str] = None,
                        policy: Optional[Policy] = None,
                        teacher_name: str = "teacher",
                        check_finite: bool = True,
                        overwrite: bool = False) -> TeacherCache:
  """Runs the teacher once over ``dataset`` and writes a cache to ``path``.

  Args:
    path: the cache directory (created).
    teacher_apply: the teacher's apply function (eval mode is used).
    teacher_variables: its variables (an argument of the jitted forward, and
      fingerprinted).
    dataset: a mapping ``{key: [N, ...] array}`` (read in order, in batches
      of ``batch_size``), or an iterable of such batches (a data pipeline
      without augmentation or shuffling: the cache stores what it yields).
    k: keep the top ``k`` logits (values, indices and the full ``logsumexp``
      at ``temperature``, as :func:`kdjax.losses.top_k_teacher`); ``None``
      keeps the full logits.
    temperature: the temperature of the stored ``logsumexp`` (top-k only);
      the training loss must use the same temperature for the tail bucket.
    feature_names: teacher features to store (their adapter must capture
      them).
    example_axes: ``{name: axis}`` for ``"logits"`` or a stored feature
      whose examples are not on axis 0 (negative axes count from the end).
      The array is stored with that axis moved first and read back in its
      original layout. The feature ``"teacher_logits"`` defaults to axis 1
      when it has one more axis than the teacher's logits (the stacked
      ``[M, B, C]`` of :func:`kdjax.models.ensemble_apply`, read by
      :func:`kdjax.losses.multi_teacher_term`); give
      ``{"teacher_logits": 0}`` for a ``[B, M, C]`` one. Every array's
      example axis must hold the batch's examples (a ``ValueError`` names
      the array otherwise).
    batch_size: teacher batch size (the last batch is padded, so one
      compilation serves all).
    examples_per_shard: examples per ``.npz`` shard.
    dataset_fingerprint: a name for the dataset (``"mnist:3.0.1/train"``)
      instead of hashing its arrays.
    policy: a :class:`kdjax.train.Policy` for the teacher's forward pass.
    teacher_name: the teacher's name (manifest, errors).
    check_finite: raise ``FloatingPointError`` naming the teacher and the
      examples when an output is NaN/inf.
    overwrite: replace an existing cache at ``path``.

  Returns:
    The :class:`TeacherCache`.

  Raises:
    ValueError: a bad ``k``, ``batch_size`` or ``example_axes`` (an unknown
      name, or an axis out of range for the named array).
  """
  if os.path.exists(os.path.join(path, MANIFEST)) and not overwrite:
    raise FileExistsError(
        f"a teacher cache already exists at {path!r}; pass overwrite=True to "
        "replace it.")
  if k is not None and (not isinstance(k, int) or k < 1):
    raise ValueError(f"k must be a positive int or None (full logits), got "
                     f"{k!r}.")
  if batch_size < 1 or examples_per_shard < 1:
    raise ValueError("batch_size and examples_per_shard must be >= 1.")
  feature_names = tuple(feature_names)

  @jax.jit
  def forward(variables, batch):
    out = teacher_forward(teacher_apply, variables, batch, policy=policy)
    return _teacher_entries(out, k, temperature, feature_names, teacher_name)

  os.makedirs(path, exist_ok=True)
  for name in os.listdir(path):
    if name.startswith("shard-") or name == MANIFEST:
      os.remove(os.path.join(path, name))
  teacher_fp = _fingerprint.fingerprint_tree(teacher_variables)
  # A mapping is hashed whole (independent of batch_size); an iterable batch
  # by batch as it is read.
  digest = None
  if dataset_fingerprint is None:
    if isinstance(dataset, Mapping):
      dataset_fingerprint = _fingerprint.fingerprint_dataset(dataset)
    else:
      digest = hashlib.sha256()
  shards, pending, pending_n, total, num_classes = [], [], 0, 0, None
  example_keys, axes, teacher_keys = None, None, ()

  def flush():
    nonlocal pending, pending_n
    if not pending_n:
      return
    arrays = {key: np.concatenate([p[key] for p in pending])
              for key in pending[0]}
    name = f"shard-{len(shards):05d}.npz"
    np.savez(os.path.join(path, name), **arrays)
    shards.append({"file": name, "start": total - pending_n,
                   "num_examples": pending_n})
    pending, pending_n = [], 0

  padded_size = None
  for batch in _iter_dataset(dataset, batch_size):
    if digest is not None:
      _fingerprint._update_with_tree(digest, batch)  # pylint: disable=protected-access
    if example_keys is None:
      example_keys = {key: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)}
                      for key, v in batch.items()}
      padded_size = max(next(iter(batch.values())).shape[0], 1)
    padded, n = _pad(batch, max(padded_size,
                                next(iter(batch.values())).shape[0]))
    if num_classes is None:
      out_shape = jax.eval_shape(
          lambda v, b: teacher_forward(teacher_apply, v, b, policy=policy),
          teacher_variables, padded)
      num_classes = int(out_shape.logits.shape[-1])
      if k is not None and k > num_classes:
        raise ValueError(f"k={k} exceeds the teacher's {num_classes} classes "
                         "(k must lie in [1, num_classes]).")
      axes = _resolve_example_axes(example_axes, out_shape, k, feature_names)
    padded_n = next(iter(padded.values())).shape[0]
    entries = jax.device_get(forward(teacher_variables, padded))
    # Example-major (the example axis moved first), then the padding cut off.
    entries = {key: _example_major(key, np.asarray(v), axes.get(key, 0),
                                   padded_n, teacher_name)[:n]
               for key, v in entries.items()}
    teacher_keys = tuple(entries)
    if check_finite:
      for key, v in entries.items():
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
          bad = np.flatnonzero(~np.all(np.isfinite(v.reshape(n, -1)), axis=1))
          raise FloatingPointError(
              f"the teacher {teacher_name!r} produced NaN/inf in {key!r} for "
              f"examples {(total + bad[:5]).tolist()} (of a batch starting at "
              f"{total}); check its parameters and inputs.")
    pending.append({**{f"example/{key}": v for key, v in batch.items()},
                    **{f"teacher/{key}": v for key, v in entries.items()}})
    pending_n += n
    total += n
    if pending_n >= examples_per_shard:
      flush()
  flush()
  if total == 0:
    raise ValueError("the dataset is empty: nothing to cache.")
  dataset_fp = dataset_fingerprint or "sha256:" + digest.hexdigest()
  fingerprint = {"teacher": teacher_fp, "dataset": dataset_fp, "k": k,
                 "temperature": float(temperature)}
  fingerprint["combined"] = _fingerprint.combine_fingerprints(**fingerprint)
  stored_axes = {f"example/{key}": 0 for key in example_keys}
  stored_axes.update({f"teacher/{key}": axes.get(key, 0)
                      for key in teacher_keys})
  manifest = {
      "format": FORMAT,
      # Version 1 (readable by a kdjax without example_axes) unless an array
      # is stored with a moved axis.
      "version": VERSION if any(stored_axes.values()) else 1,
      "num_examples": total,
      "num_classes": num_classes, "k": k, "temperature": float(temperature),
      "mode": "full" if k is None else "top_k",
      "feature_names": list(feature_names), "teacher_name": teacher_name,
      "example_keys": example_keys, "example_axes": stored_axes,
      "fingerprint": fingerprint, "shards": shards,
  }
  write_manifest(path, manifest)
  return TeacherCache(path, manifest)
