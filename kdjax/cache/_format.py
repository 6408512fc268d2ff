"""The on-disk format of a teacher cache: ``.npz`` shards and a JSON manifest.

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

:func:`write_manifest` writes the manifest atomically (last, after every
shard); :func:`read_manifest` reads it back and checks the format, the
version and ``example_axes``.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

FORMAT = "kdjax.teacher_cache"
VERSION = 2              # written when an array's example axis is not 0
SUPPORTED_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
TEACHER_KEY = "teacher"


def write_manifest(path: str, manifest: Mapping[str, Any]) -> None:
  """Writes ``<path>/manifest.json`` atomically (a temporary file renamed)."""
  fd, tmp = tempfile.mkstemp(dir=path, suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
  """The manifest of the cache at ``path``, checked.

  Raises:
    FileNotFoundError: no (complete) cache at ``path``.
    ValueError: not a kdjax teacher cache, an unknown version, or a corrupt
      ``example_axes``.
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
  return manifest
