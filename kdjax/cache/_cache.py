"""Offline distillation: precompute the teacher's outputs once, train from the cache.

Format (a directory)::

  <path>/manifest.json        # written last: a cache without it is incomplete
  <path>/shard-00000.npz      # numpy .npz, uncompressed
  <path>/shard-00001.npz
  ...

Each shard holds a contiguous run of examples, in dataset order, with every
array stored example-major (axis 0 = examples):

* ``example/<key>``: the dataset's own arrays (``image``, ``label``, ...),
  stored next to the teacher's outputs so that a batch of the cache is a
  complete training batch;
* ``teacher/logits``: ``[n, C]`` float32 full logits (``k=None``), or
* ``teacher/values`` ``[n, k]`` float32, ``teacher/indices`` ``[n, k]`` int32
  and ``teacher/logsumexp`` ``[n]`` float32 (the teacher's top-k logits and
  ``logsumexp(logits / T)`` over all classes, as
  :func:`kdjax.losses.top_k_teacher` computes them);
* ``teacher/features/<name>``: named intermediate features (float32).

A teacher output whose examples lie on another axis is moved to example-major
order when it is stored, and moved back when it is read (``load``,
``batches``, and so the cache's ``teacher_apply``), so training sees exactly
the teacher's own layout. The stacked ``[M, B, C]`` logits of
:func:`kdjax.models.ensemble_apply` (feature ``"teacher_logits"``, what
:func:`kdjax.losses.multi_teacher_term` reads) are stored ``[n, M, C]`` with
original axis 1; other layouts are named with
``build_teacher_cache(..., example_axes={name: axis})``.

``manifest.json``::

  {"format": "kdjax.teacher_cache", "version": 1 | 2,
   "num_examples": N, "num_classes": C, "k": k | null, "temperature": T,
   "mode": "full" | "top_k", "feature_names": [...], "teacher_name": "...",
   "example_keys": {key: {"shape": [...], "dtype": "..."}},
   "example_axes": {"teacher/features/teacher_logits": 1, <array key>: 0, ...},
   "fingerprint": {"teacher": "sha256:...", "dataset": "sha256:..." | "<name>",
                   "k": k, "temperature": T, "combined": "sha256:..."},
   "shards": [{"file": "shard-00000.npz", "start": 0, "num_examples": n}, ...]}

The teacher fingerprint is the SHA-256 of its variables (paths, dtypes, shapes,
bytes); the dataset's, of the example arrays in order (or a name given by the
user). Opening a cache with the wrong teacher, dataset or ``k`` raises
:class:`CacheMismatchError`. ``example_axes`` gives, for every stored array,
the axis that holds the examples in the teacher's own layout; a cache without
it (written before it existed) has axis 0 everywhere. A cache with a non-zero
axis is written as version 2, so that a reader that does not know
``example_axes`` refuses it instead of reading the arrays in the wrong
layout; one without, as version 1.

Training from the cache needs no teacher in memory: ``cache.teacher_apply()``
is an apply function that reads the teacher's outputs from
``batch["teacher"]``, so the usual :func:`kdjax.train.make_train_step` (or a
sharded step) works unchanged, with ``teacher_variables=None``. With
``k = C`` (or ``k=None``) and no augmentation the cached run reproduces the
online run's losses: the cached logits are the online ones, bit for bit, when
the cache was built with the same batch size (XLA's matmul kernels may round
differently for another batch shape).
"""

from __future__ import annotations

import hashlib
import json
import os

import tempfile
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.cache import _fingerprint
from kdjax.losses import TopKTeacher
from kdjax.losses import top_k_teacher
from kdjax.losses._ensemble import TEACHER_LOGITS_KEY
from kdjax.train._step import READS_TEACHER_FROM_BATCH
from kdjax.train._step import teacher_forward

FORMAT = "kdjax.teacher_cache"
VERSION = 2              # written when an array's example axis is not 0
SUPPORTED_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
TEACHER_KEY = "teacher"


class CacheMismatchError(ValueError):
  """The cache was built with another teacher, dataset, k or temperature."""


@flax.struct.dataclass
class CachedTeacherOutput:
  """A teacher output read from a cache (duck-types ``kdjax.models.ModelOutput``).

  Attributes:
    dense_logits: ``[..., C]`` full logits (full-logit cache), else ``None``.
    top_k: :class:`kdjax.losses.TopKTeacher` (top-k cache), else ``None``.
    features: named features, ``{name: array}``.
    state: always ``None`` (the teacher is frozen).
    num_classes: ``C`` (static).
  """
  dense_logits: Optional[chex.Array] = None
  top_k: Optional[TopKTeacher] = None
  features: Mapping[str, chex.Array] = flax.struct.field(default_factory=dict)
  state: Optional[Any] = None
  num_classes: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def logits(self) -> chex.Array:
    """The full ``[..., C]`` logits: stored, or rebuilt exactly from a top-k with k = C.

    Raises:
      ValueError: the cache keeps only ``k < C`` logits; use
        :func:`kdjax.cache.top_k_term` (``kdjax.losses.top_k_divergence``).
    """
    if self.dense_logits is not None:
      return self.dense_logits
    k = self.top_k.values.shape[-1]
    if k != self.num_classes:
      raise ValueError(
          f"this teacher cache keeps only the top k={k} of {self.num_classes} "
          "logits, so full teacher logits are not available; use a top-k "
          "loss term (kdjax.cache.top_k_term / kdjax.losses.top_k_divergence) "
          "or build the cache with k=None.")
    # k == C: the indices are a permutation; invert it (exact, no arithmetic).
    inverse = jnp.argsort(self.top_k.indices, axis=-1)
    return jnp.take_along_axis(self.top_k.values, inverse, axis=-1)

  def feature(self, name: str) -> chex.Array:
    if name not in self.features:
      raise KeyError(
          f"the teacher cache holds no feature named {name!r}; cached "
          f"features: {sorted(self.features)}. Rebuild the cache with "
          f"feature_names=[..., {name!r}].")
    return self.features[name]


def cached_teacher_apply(*, num_classes: int, temperature: float = 1.0,
                         key: str = TEACHER_KEY):
  """An apply function that returns the teacher output stored in ``batch[key]``.

  ``batch[key]`` is ``{"logits": [B, C]}`` or ``{"values", "indices",
  "logsumexp"}`` (``[B, k]``, ``[B, k]``, ``[B]``), plus an optional
  ``"features": {name: array}``, each in the teacher's own layout (as
  :meth:`TeacherCache.batches` yields them: e.g. ``[M, B, C]`` for the
  ``"teacher_logits"`` of an ensemble). The ``variables`` argument is ignored.
  """

  def apply(variables, batch, *, train: bool = False, rng=None):
    del variables, train, rng
    if key not in batch:
      raise KeyError(
          f"the batch has no {key!r} entry with cached teacher outputs; keys "
          f"present: {sorted(batch)}. Iterate batches from a TeacherCache.")
    entry = batch[key]
    features = dict(entry.get("features", {}))
    if "logits" in entry:
      return CachedTeacherOutput(dense_logits=entry["logits"],
                                 features=features, num_classes=num_classes)
    top = TopKTeacher(entry["values"], entry["indices"],
                      entry.get("logsumexp"),
                      jnp.asarray(temperature, jnp.float32))
    return CachedTeacherOutput(top_k=top, features=features,
                               num_classes=num_classes)

  setattr(apply, READS_TEACHER_FROM_BATCH, True)
  return apply


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
                        teacher_apply,
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
                        policy=None,
                        teacher_name: str = "teacher",
                        check_finite: bool = True,
                        overwrite: bool = False) -> "TeacherCache":
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
  fd, tmp = tempfile.mkstemp(dir=path, suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(path, MANIFEST))
  return TeacherCache(path, manifest)


_UNSET = object()


class TeacherCache:
  """A teacher cache on disk (see the module docstring for the format).

  Open it with :func:`open_teacher_cache` (which verifies the fingerprint).
  """

  def __init__(self, path: str, manifest: Mapping[str, Any]):
    self.path = path
    self.manifest = dict(manifest)
    self._arrays = None

  num_examples = property(lambda self: self.manifest["num_examples"])
  num_classes = property(lambda self: self.manifest["num_classes"])
  k = property(lambda self: self.manifest["k"])
  temperature = property(lambda self: self.manifest["temperature"])
  feature_names = property(lambda self: tuple(self.manifest["feature_names"]))
  fingerprint = property(lambda self: dict(self.manifest["fingerprint"]))

  @property
  def example_axes(self) -> dict[str, int]:
    """``{array key: axis}``: where each array's examples lie in the teacher's layout.

    An array not named (every array of a cache written before this existed)
    has its examples on axis 0.
    """
    return dict(self.manifest.get("example_axes") or {})

  def verify(self, *, teacher_variables: Any = None,
             dataset: Any = None,
             dataset_fingerprint: Optional[str] = None,
             k: Any = _UNSET,
             temperature: Optional[float] = None) -> None:
    """Raises :class:`CacheMismatchError` naming each part that differs.

    Only the parts given are checked: the teacher (by its variables), the
    dataset (its arrays, or its name/fingerprint), ``k`` and the temperature.
    """
    fp = self.manifest["fingerprint"]
    problems = []
    if teacher_variables is not None:
      got = _fingerprint.fingerprint_tree(teacher_variables)
      if got != fp["teacher"]:
        problems.append(
            f"teacher: the cache was built with another teacher "
            f"({self.manifest['teacher_name']!r}, fingerprint {fp['teacher']}"
            f"; the given variables have {got})")
    if dataset is not None or dataset_fingerprint is not None:
      got = dataset_fingerprint
      if got is None:
        got = _fingerprint.fingerprint_dataset(dataset)
      if got != fp["dataset"]:
        problems.append(
            f"dataset: the cache was built from another dataset (fingerprint "
            f"{fp['dataset']}; the given dataset has {got})")
    if k is not _UNSET and k != fp["k"]:
      problems.append(f"k: the cache keeps k={fp['k']} "
                      f"({'full logits' if fp['k'] is None else 'top-k'}), "
                      f"{k} was asked for")
    if temperature is not None and not np.isclose(temperature,
                                                  fp["temperature"]):
      problems.append(f"temperature: the cache's logsumexp is at T="
                      f"{fp['temperature']}, {temperature} was asked for")
    if problems:
      raise CacheMismatchError(
          f"teacher cache at {self.path!r} does not match: "
          + "; ".join(problems) + ". Rebuild it with build_teacher_cache(...).")

  def _to_layout(self, key: str, value: np.ndarray) -> np.ndarray:
    """An example-major array moved back to the teacher's layout."""
    axis = (self.manifest.get("example_axes") or {}).get(key, 0)
    if axis == 0:
      return value
    if axis >= value.ndim:
      raise ValueError(
          f"teacher cache at {self.path!r} is corrupt: the manifest puts the "
          f"examples of {key!r} on axis {axis}, but the array has only "
          f"{value.ndim} axes (shape {tuple(value.shape)}).")
    return np.moveaxis(value, 0, axis)

  def load(self, *, example_major: bool = False) -> dict:
    """Every shard, concatenated: ``{"example/...": [N, ...], "teacher/...": ...}``.

    Each array is in the teacher's own layout (e.g. the ensemble's
    ``"teacher/features/teacher_logits"`` as ``[M, N, C]``: see
    :attr:`example_axes`), or, with ``example_major=True``, as stored, with
    the examples on axis 0 (index it by rows; :meth:`take` does both).
    """
    arrays = self._load_example_major()
    if example_major:
      return arrays
    return {key: self._to_layout(key, v) for key, v in arrays.items()}

  def _load_example_major(self) -> dict:
    if self._arrays is None:
      parts = []
      for shard in self.manifest["shards"]:
        with np.load(os.path.join(self.path, shard["file"])) as data:
          parts.append({key: data[key] for key in data.files})
      self._arrays = {key: np.concatenate([p[key] for p in parts])
                      for key in parts[0]}
      n = self._arrays[next(iter(self._arrays))].shape[0]
      if n != self.num_examples:
        raise ValueError(
            f"teacher cache at {self.path!r} is corrupt: the shards hold {n} "
            f"examples, the manifest says {self.num_examples}.")
    return self._arrays

  def _nest(self, flat: Mapping[str, np.ndarray]) -> dict:
    batch, teacher, features = {}, {}, {}
    for key, value in flat.items():
      if key.startswith("example/"):
        batch[key[len("example/"):]] = value
      elif key.startswith("teacher/features/"):
        features[key[len("teacher/features/"):]] = value
      elif key.startswith("teacher/"):
        teacher[key[len("teacher/"):]] = value
    if features:
      teacher["features"] = features
    batch[TEACHER_KEY] = teacher
    return batch

  def take(self, indices: Any) -> dict:
    """The examples ``indices`` (ints, in that order) as one training batch.

    ``{**examples, "teacher": {"logits" | "values", "indices", "logsumexp",
    "features": {...}}}`` (NumPy), every array in the teacher's own layout
    with ``len(indices)`` examples on its example axis (what
    :meth:`teacher_apply` reads).
    """
    idx = np.asarray(indices)
    arrays = self._load_example_major()
    out = {}
    for key, v in arrays.items():
      part = self._to_layout(key, v[idx])
      out[key] = part if part.flags.c_contiguous else np.ascontiguousarray(part)
    return self._nest(out)

  def batches(self, batch_size: int, *,
              shuffle: bool = False,
              seed: int = 0,
              epoch: int = 0,
              drop_remainder: bool = True,
              process_index: Optional[int] = None,
              process_count: Optional[int] = None) -> Iterator[dict]:
    """Yields training batches ``{**examples, "teacher": {...}}`` (NumPy).

    Every array is in the teacher's own layout (see :meth:`take`).

    Args:
      batch_size: the *global* batch size.
      shuffle: permute the examples (by ``seed`` and ``epoch``).
      drop_remainder: drop a last, smaller batch.
      process_index, process_count: in a multi-host run, yield only this
        process's contiguous block of each global batch (feed it to
        ``kdjax.parallel.global_batch``).
    """
    self._load_example_major()
    n = self.num_examples
    order = np.arange(n)
    if shuffle:
      order = np.random.default_rng([seed, epoch]).permutation(n)
    count = 1 if process_count is None else process_count
    index = 0 if process_index is None else process_index
    if batch_size % count:
      raise ValueError(f"global batch size {batch_size} is not divisible by "
                       f"{count} processes.")
    local = batch_size // count
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
      idx = order[start:start + batch_size]
      idx = idx[index * local:(index + 1) * local] if count > 1 else idx
      yield self.take(idx)

  def teacher_apply(self, key: str = TEACHER_KEY):
    """The apply function reading this cache's teacher outputs from ``batch[key]``."""
    return cached_teacher_apply(num_classes=self.num_classes,
                                temperature=self.temperature, key=key)

  def __repr__(self) -> str:
    return (f"TeacherCache({self.path!r}, num_examples={self.num_examples}, "
            f"num_classes={self.num_classes}, k={self.k}, "
            f"features={list(self.feature_names)})")


def open_teacher_cache(path: str, *,
                       teacher_variables: Any = None,
                       dataset: Any = None,
                       dataset_fingerprint: Optional[str] = None,
                       k: Any = _UNSET,
                       temperature: Optional[float] = None) -> TeacherCache:
  """Opens the cache at ``path`` and verifies what is given (see :meth:`TeacherCache.verify`).

  Raises:
    FileNotFoundError: no (complete) cache at ``path``.
    ValueError: not a kdjax teacher cache, or an unknown version.
    CacheMismatchError: another teacher, dataset, ``k`` or temperature.
  """
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.exists(manifest_path):
    raise FileNotFoundError(
        f"no teacher cache at {path!r} (no {MANIFEST}; an interrupted build "
        "leaves none): build it with kdjax.cache.build_teacher_cache(...).")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{manifest_path} is not a kdjax teacher cache "
                     f"(format {manifest.get('format')!r}).")
  if manifest.get("version") not in SUPPORTED_VERSIONS:
    raise ValueError(f"teacher cache version {manifest.get('version')} is not "
                     f"supported (this kdjax reads versions "
                     f"{list(SUPPORTED_VERSIONS)}).")
  axes = manifest.get("example_axes")  # absent (version 1): axis 0 for all.
  valid = isinstance(axes, dict) and all(
      isinstance(key, str) and isinstance(a, int) and not isinstance(a, bool)
      and a >= 0 for key, a in axes.items())
  if axes is not None and not valid:
    raise ValueError(
        f"{manifest_path} is corrupt: 'example_axes' must map array keys to "
        f"non-negative ints, got {axes!r}.")
  cache = TeacherCache(path, manifest)
  cache.verify(teacher_variables=teacher_variables, dataset=dataset,
               dataset_fingerprint=dataset_fingerprint, k=k,
               temperature=temperature)
  return cache


