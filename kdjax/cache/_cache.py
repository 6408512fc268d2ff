"""Offline distillation: reading a teacher cache, and opening it with checks.

A teacher cache (written by :func:`kdjax.cache.build_teacher_cache`, format
in :mod:`kdjax.cache._format`) holds the teacher's outputs next to the
examples. :func:`open_teacher_cache` reads its manifest and verifies the
fingerprint of what is given (teacher, dataset, ``k``, temperature;
:class:`CacheMismatchError` names each part that differs);
:class:`TeacherCache` loads the shards and yields training batches, every
array in the teacher's own layout, whose ``"teacher"`` entry
:meth:`TeacherCache.teacher_apply` returns as the teacher's output
(:mod:`kdjax.cache._teacher_output`). With ``k = C`` (or ``k=None``) and no
augmentation the cached run reproduces the online run's losses: the cached
logits are the online ones, bit for bit, when the cache was built with the
same batch size (XLA's matmul kernels may round differently for another
batch shape).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from kdjax.cache import _fingerprint
from kdjax.cache._format import TEACHER_KEY
from kdjax.cache._format import read_manifest
from kdjax.cache._teacher_output import cached_teacher_apply


# Raised only here (TeacherCache.verify): kdjax.cli.main's exit status finds
# it as "kdjax.cache._cache:CacheMismatchError".
class CacheMismatchError(ValueError):
  """The cache was built with another teacher, dataset, k or temperature."""
  # A ``kdjax`` command that stops on this error exits with status 1 (a
  # failure, not a usage error), even before its first step.
  exit_code: int = 1


_UNSET = object()


class TeacherCache:
  """A teacher cache on disk (format: :mod:`kdjax.cache._format`).

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
    ValueError: not a kdjax teacher cache, an unknown version, or a corrupt
      manifest.
    CacheMismatchError: another teacher, dataset, ``k`` or temperature.
  """
  manifest = read_manifest(path)
  cache = TeacherCache(path, manifest)
  cache.verify(teacher_variables=teacher_variables, dataset=dataset,
               dataset_fingerprint=dataset_fingerprint, k=k,
               temperature=temperature)
  return cache


def check_loss_compatible(cache: TeacherCache, loss_fn: Any) -> None:
  """Checks that ``loss_fn`` can be trained from ``cache``; builds nothing.

  A top-k cache stores ``logsumexp(logits / T)`` at the cache's temperature
  (the tail mass of each row), so a loss with a constant temperature must
  use that one. A full-logit cache (``k=None``) works at any temperature, and
  a temperature schedule (a callable of the step) cannot be checked before
  the run. :func:`kdjax.cache.make_cached_train_step` calls this; so does the
  ``kdjax distill`` command for a cached teacher.

  Args:
    cache: an opened :class:`TeacherCache`.
    loss_fn: the objective (a ``kdjax.losses.ComposedLoss``; only its
      ``temperature`` is read).

  Raises:
    ValueError: the loss's temperature differs from a top-k cache's.
  """
  temperature = getattr(loss_fn, "temperature", None)
  if (cache.k is not None and temperature is not None
      and not callable(temperature)
      and abs(float(temperature) - cache.temperature) > 1e-6):
    raise ValueError(
        f"the loss uses temperature {float(temperature)} but the top-k teacher "
        f"cache at {cache.path!r} stores logsumexp at temperature "
        f"{cache.temperature}; rebuild the cache at that temperature (or with "
        "k=None: full logits work at any temperature).")
