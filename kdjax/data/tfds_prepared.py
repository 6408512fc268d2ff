"""Any TFDS dataset already prepared in ``array_record`` (or ``parquet``) format.

:func:`open_prepared` opens ``name`` (``"name[/config][:version]"``) in
``data_dir`` without downloading or preparing anything, whether its builder
class is registered (a TFDS dataset such as ``mnist``, or a user's own
builder imported first) or not (read from the ``dataset_info.json`` that TFDS
wrote next to the records). A dataset that is absent, or prepared as
``tfrecord`` (TFDS's default, not random access), is a clear
``FileNotFoundError`` / :class:`kdjax.data.DataError` saying how to prepare
it. Reading needs no TensorFlow.

This module imports ``tensorflow_datasets``; ``import kdjax.data`` does not
import it.
"""

from __future__ import annotations

import os
from typing import Optional

import tensorflow_datasets as tfds

from kdjax.data._idx import DataError

_RANDOM_ACCESS = ("array_record", "parquet")


def _prepare_hint(name: str, data_dir: Optional[str]) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  return (f"prepare it once in array_record format, e.g. `tfds build "
          f"{name.split(':')[0]}{where} --file_format=array_record` (TFDS "
          "datasets need TensorFlow and network access to prepare), or give "
          "your arrays as .npz/.npy files (data.source: arrays)")


def open_prepared(name: str, data_dir: Optional[str] = None):
  """The prepared builder of ``name`` in ``data_dir`` (default TFDS's).

  Raises:
    FileNotFoundError: no prepared copy in ``data_dir``.
    kdjax.data.DataError: prepared in a format without random access.
  """
  shown = data_dir or os.path.expanduser("~/tensorflow_datasets")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is neither prepared in {shown} nor a known "
        f"builder; {_prepare_hint(name, data_dir)}.") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {shown} (no "
        f"{builder.data_dir}/dataset_info.json); kdjax never downloads: "
        f"{_prepare_hint(name, data_dir)}.")
  file_format = str(getattr(builder.info.file_format, "value",
                            builder.info.file_format))
  if file_format not in _RANDOM_ACCESS:
    raise DataError(
        f"TFDS dataset {name!r} in {builder.data_dir} is prepared as "
        f"{file_format}, which has no random access; "
        f"{_prepare_hint(name, data_dir)}.")
  return builder


def num_classes(builder, label_key: str = "label") -> Optional[int]:
  """The number of classes of the ``label_key`` ClassLabel (None if none)."""
  features = builder.info.features
  if label_key not in features:
    raise KeyError(f"TFDS dataset {builder.name!r} has no feature "
                   f"{label_key!r}; its features: {', '.join(features)}.")
  feature = features[label_key]
  if isinstance(feature, tfds.features.ClassLabel):
    return int(feature.num_classes)
  return None


def split_names(builder) -> list[str]:
  """The prepared splits."""
  return sorted(builder.info.splits)


__all__ = ["num_classes", "open_prepared", "split_names"]
