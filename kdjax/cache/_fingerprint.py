"""Fingerprints (SHA-256) of parameter trees and datasets for the teacher cache."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Union

import jax
import numpy as np


def _host_array(x) -> np.ndarray:
  if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def _update_with_tree(digest, tree: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = _host_array(leaf)
    header = json.dumps([jax.tree_util.keystr(path), str(array.dtype),
                         list(array.shape)])
    digest.update(header.encode())
    digest.update(array.tobytes())


def fingerprint_tree(tree: Any) -> str:
  """``"sha256:<hex>"`` of a pytree's leaf paths, dtypes, shapes and bytes.

  Two trees have the same fingerprint iff they hold bitwise-equal arrays
  under the same paths (up to SHA-256 collisions). Used for the teacher's
  variables.
  """
  digest = hashlib.sha256()
  _update_with_tree(digest, tree)
  return "sha256:" + digest.hexdigest()


def fingerprint_dataset(dataset: Union[Mapping[str, Any], Iterable[Any]]) -> str:
  """Fingerprint of a dataset: a mapping of arrays, or an iterable of batches.

  For an iterable, the batches are hashed in order (so the same data in the
  same order and batching gives the same fingerprint). A dataset that cannot
  be re-read cheaply (a tfds pipeline) can instead be named by a string such
  as ``"mnist:3.0.1/train"``, passed as ``dataset_fingerprint``.
  """
  digest = hashlib.sha256()
  if isinstance(dataset, Mapping):
    _update_with_tree(digest, dict(dataset))
  else:
    for batch in dataset:
      _update_with_tree(digest, batch)
  return "sha256:" + digest.hexdigest()


def combine_fingerprints(**parts: Any) -> str:
  """``"sha256:<hex>"`` of the named parts (teacher, dataset, k, temperature, ...)."""
  text = json.dumps({k: parts[k] for k in sorted(parts)}, sort_keys=True,
                    default=str)
  return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
