"""Data for the command line: the configured sources and their pipelines.

``data.source`` selects the random-access source (``len``, ``[i]``):

* ``tfds``: a TFDS dataset by ``data.name`` in ``data.data_dir``: the
  Fashion-MNIST builder (``kdjax_fashion_mnist``, prepared once from Debian's
  IDX files without TensorFlow, :func:`kdjax.data.load_source`), or any other
  dataset already prepared in ``array_record`` format
  (:mod:`kdjax.data.tfds_prepared`; nothing is downloaded); ``max_*_examples``
  slice the splits (``"train[:N]"``) and, for the Fashion-MNIST builder,
  prepare only that many examples;
* ``arrays``: the user's own ``.npz`` / ``.npy`` files (``data.train_path``,
  ``data.eval_path``; :func:`kdjax.data.arrays.load_arrays`), any image size
  and channel count;
* ``idx``: the Fashion-MNIST IDX arrays in memory
  (:class:`kdjax.data.ArraySource`);
* ``synthetic``: generated 28x28 class patterns plus noise (smoke tests on a
  machine without the dataset).

:func:`resolve` fills what the config leaves ``null`` from the data:
``num_classes`` (the labels' maximum + 1 for arrays, the ``ClassLabel`` of a
TFDS dataset, 10 for Fashion-MNIST and synthetic data) and ``mean``/``std``
(computed from the training split; Fashion-MNIST's own statistics for the
Fashion-MNIST sources), so the models are built for the data's classes and
the resolved values are saved with each run.

Training batches come from :class:`kdjax.data.InputPipeline` (grain; shuffled
by ``seed``; its position is saved with every checkpoint); evaluation batches
are read in order and padded to a fixed size with a ``mask``.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Mapping, Optional

import numpy as np

from kdjax.cli import errors
from kdjax.cli.config.base import ConfigError

SYNTHETIC_TRAIN, SYNTHETIC_EVAL = 2048, 512
FASHION_MNIST_BUILDER = "kdjax_fashion_mnist"
IDX_SPLITS = ("train", "test")  # kdjax.data.load_fashion_mnist_split's
_ARRAY_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_ARRAY_CACHE_SIZE = 4


def _limit(data: Mapping[str, Any], which: str) -> Optional[int]:
  return data["max_train_examples" if which == "train" else "max_eval_examples"]


def _split(data: Mapping[str, Any], which: str) -> str:
  return data["train_split" if which == "train" else "eval_split"]


def _side(which: str) -> str:
  return "train" if which == "train" else "eval"


def tfds_data_dir(data: Mapping[str, Any]) -> Optional[str]:
  """``data.data_dir`` (or its older name ``data.tfds_data_dir``)."""
  return data.get("data_dir") or data.get("tfds_data_dir")


def is_fashion_mnist_builder(data: Mapping[str, Any]) -> bool:
  """Whether ``data`` reads the Fashion-MNIST TFDS builder of kdjax."""
  return (data["source"] == "tfds" and
          data["name"].split("/")[0].split(":")[0] == FASHION_MNIST_BUILDER)


def synthetic_arrays(n: int, num_classes: int, split_id: int,
                     size: int = 28) -> tuple[np.ndarray, np.ndarray]:
  """``n`` uint8 images ``[n, size, size]``: a fixed pattern per class plus noise.

  The class patterns are shared by every split (seeded by a constant); the
  labels and noise differ per ``split_id``.
  """
  proto_rng = np.random.default_rng(0x6B646A78)
  protos = proto_rng.uniform(0, 1, (num_classes, size, size))
  # A little spatial smoothing: shapes, not pixel noise.
  protos = (protos + np.roll(protos, 1, 1) + np.roll(protos, 1, 2)) / 3.0
  rng = np.random.default_rng([0x6B646A78, split_id])
  labels = rng.integers(0, num_classes, n)
  noise = rng.normal(0.0, 0.25, (n, size, size))
  images = np.clip(protos[labels] + noise, 0.0, 1.0) * 255.0
  return images.astype(np.uint8), labels.astype(np.int64)


# -----------------------------------------------------------------------------
# The user's arrays (data.source: arrays).
# -----------------------------------------------------------------------------


def _array_paths(data: Mapping[str, Any], which: str) -> tuple:
  side = _side(which)
  return data[f"{side}_path"], data[f"{side}_labels_path"]


def array_split(data: Mapping[str, Any], which: str
                ) -> tuple[np.ndarray, np.ndarray]:
  """``(images, labels)`` of the ``"train"``/``"eval"`` arrays, sliced to
  ``max_*_examples`` (cached: the config's resolution and the source share
  one read)."""
  from kdjax.data import arrays  # pylint: disable=g-import-not-at-top
  side = _side(which)
  path, labels_path = _array_paths(data, which)
  stamp = []
  for p in (path, labels_path):
    if p is None:
      stamp.append(None)
      continue
    if not os.path.exists(p):
      key = f"data.{side}_path" if p == path else f"data.{side}_labels_path"
      raise ConfigError(f"config key {key!r}: file {p!r} not found.")
    st = os.stat(p)
    stamp.append((os.path.abspath(p), st.st_mtime_ns, st.st_size))
  key = (*stamp, data["image_key"], data["label_key"])
  if key not in _ARRAY_CACHE:
    try:
      _ARRAY_CACHE[key] = arrays.load_arrays(
          path, labels_path, image_key=data["image_key"],
          label_key=data["label_key"])
    except KeyError as e:
      name = "image_key" if data["image_key"] in str(e) else "label_key"
      raise ConfigError(f"config key 'data.{name}': "
                        f"{e.args[0] if e.args else e}") from None
    while len(_ARRAY_CACHE) > _ARRAY_CACHE_SIZE:
      _ARRAY_CACHE.popitem(last=False)
  _ARRAY_CACHE.move_to_end(key)
  images, labels = _ARRAY_CACHE[key]
  limit = _limit(data, which)
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  return images, labels


def _resolve_arrays(data: dict) -> None:
  from kdjax.data import arrays  # pylint: disable=g-import-not-at-top
  train_images, train_labels = array_split(data, "train")
  _, eval_labels = array_split(data, "eval")
  top = int(max(train_labels.max(), eval_labels.max()))
  if data["num_classes"] is None:
    if top < 1:
      raise ConfigError(
          "config key 'data.num_classes': the labels hold a single class (0); "
          "give data.num_classes.")
    data["num_classes"] = top + 1
  elif top >= data["num_classes"]:
    raise ConfigError(
        f"config key 'data.num_classes' ({data['num_classes']}) is too small: "
        f"the labels reach {top} (null infers {top + 1}).")
  if data["mean"] is None or data["std"] is None:
    mean, std = arrays.array_pixel_stats(train_images)
    _set_stats(data, mean, std)


# -----------------------------------------------------------------------------
# TFDS datasets.
# -----------------------------------------------------------------------------


class _Renamed:
  """A source whose examples' ``image_key``/``label_key`` read as
  ``"image"``/``"label"``."""

  def __init__(self, source, image_key: str, label_key: str):
    self._source, self._keys = source, (image_key, label_key)

  def _rename(self, example) -> dict:
    return {"image": example[self._keys[0]], "label": example[self._keys[1]]}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return self._rename(self._source[index])

  def __getitems__(self, indices) -> list:
    getitems = getattr(self._source, "__getitems__", None)
    examples = (getitems(list(indices)) if getitems is not None
                else [self._source[i] for i in indices])
    return [self._rename(e) for e in examples]


def _prepared_builder(data: Mapping[str, Any]):
  """The prepared TFDS builder of ``data.name``.

  Raises:
    kdjax.cli.errors.MissingDataError: not prepared in ``data.data_dir`` (the
      message says how to prepare it; TFDS's own warning about the missing
      folder is not printed beside it).
  """
  from kdjax.data import tfds_prepared  # pylint: disable=g-import-not-at-top
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(max(level, logging.ERROR))
  try:
    return tfds_prepared.open_prepared(data["name"], tfds_data_dir(data))
  except FileNotFoundError as e:
    raise errors.MissingDataError(str(e)) from None
  finally:
    absl_logger.setLevel(level)


def _tfds_source(data: Mapping[str, Any], which: str):
  """A split of a prepared TFDS dataset other than the Fashion-MNIST builder."""
  from kdjax.data import tfds_prepared  # pylint: disable=g-import-not-at-top
  builder = _prepared_builder(data)
  split, limit = _split(data, which), _limit(data, which)
  splits = tfds_prepared.split_names(builder)
  base = split.split("[")[0]
  if "+" not in split and base not in splits:
    key = "data.train_split" if which == "train" else "data.eval_split"
    raise ConfigError(f"config key {key!r}: TFDS dataset {data['name']!r} has "
                      f"no split {base!r}; its splits: {', '.join(splits)}.")
  features = builder.info.features
  for name in ("image_key", "label_key"):
    if data[name] not in features:
      raise ConfigError(
          f"config key 'data.{name}': TFDS dataset {data['name']!r} has no "
          f"feature {data[name]!r}; its features: {', '.join(features)}.")
  split_arg = split if limit is None else f"{split}[:{limit}]"
  source = builder.as_data_source(split=split_arg)
  if (data["image_key"], data["label_key"]) != ("image", "label"):
    source = _Renamed(source, data["image_key"], data["label_key"])
  return source


def _resolve_tfds(data: dict) -> None:
  from kdjax.data import arrays  # pylint: disable=g-import-not-at-top
  from kdjax.data import tfds_prepared  # pylint: disable=g-import-not-at-top
  if data["num_classes"] is None:
    builder = _prepared_builder(data)
    try:
      n = tfds_prepared.num_classes(builder, data["label_key"])
    except KeyError as e:
      raise ConfigError(f"config key 'data.label_key': {e.args[0]}") from None
    if n is None:
      raise ConfigError(
          f"config key 'data.num_classes': the {data['label_key']!r} feature "
          f"of TFDS dataset {data['name']!r} is not a ClassLabel; give "
          "data.num_classes.")
    data["num_classes"] = n
  if data["mean"] is None or data["std"] is None:
    mean, std = arrays.pixel_stats(_tfds_source(data, "train"))
    _set_stats(data, mean, std)


# -----------------------------------------------------------------------------
# Resolution and sources.
# -----------------------------------------------------------------------------


def _set_stats(data: dict, mean: float, std: float) -> None:
  if data["mean"] is None:
    data["mean"] = mean
  if data["std"] is None:
    data["std"] = std


def resolve(data: dict) -> dict:
  """Fills ``data``'s ``null`` ``num_classes``, ``mean`` and ``std`` from the
  data (in place; a no-op once filled); returns ``data``.

  Raises:
    ConfigError: a missing file or key, or labels beyond ``num_classes``.
    FileNotFoundError: a TFDS dataset that is not prepared.
  """
  if all(data[k] is not None for k in ("num_classes", "mean", "std")):
    return data
  source = data["source"]
  if source == "arrays":
    _resolve_arrays(data)
  elif source == "tfds" and not is_fashion_mnist_builder(data):
    _resolve_tfds(data)
  else:  # Fashion-MNIST (IDX, its TFDS builder) and the synthetic patterns.
    from kdjax.data import pipeline  # pylint: disable=g-import-not-at-top
    if data["num_classes"] is None:
      data["num_classes"] = 10
    _set_stats(data, pipeline.FASHION_MNIST_MEAN, pipeline.FASHION_MNIST_STD)
  return data


def _idx_split(data: Mapping[str, Any], which: str
               ) -> tuple[np.ndarray, np.ndarray]:
  """The Fashion-MNIST IDX arrays of a split (``data.source: idx``)."""
  from kdjax.data import load_fashion_mnist_split  # pylint: disable=g-import-not-at-top
  split = _split(data, which)
  if split not in IDX_SPLITS:
    key = "data.train_split" if which == "train" else "data.eval_split"
    raise ConfigError(f"config key {key!r}: the Fashion-MNIST IDX files hold "
                      f"the splits {', '.join(IDX_SPLITS)}, not {split!r}.")
  try:
    return load_fashion_mnist_split(split, data["dir"])
  except FileNotFoundError as e:
    raise errors.MissingDataError(
        f"config key 'data.dir' ({data['dir']}): {e}") from None


def build_source(data: Mapping[str, Any], which: str):
  """The random-access source of the ``"train"`` or ``"eval"`` split.

  Raises:
    kdjax.cli.config.image.ConfigError: a split, file or key the data lack.
    kdjax.cli.errors.MissingDataError: the data directory, or the prepared
      TFDS dataset, is missing (exit status 2).
  """
  from kdjax import data as kdata  # pylint: disable=g-import-not-at-top
  resolve(data)
  split, limit = _split(data, which), _limit(data, which)
  source = data["source"]
  if source == "synthetic":
    n = limit or (SYNTHETIC_TRAIN if which == "train" else SYNTHETIC_EVAL)
    images, labels = synthetic_arrays(n, data["num_classes"],
                                      0 if which == "train" else 1)
    return kdata.ArraySource(images, labels)
  if source == "idx":
    images, labels = _idx_split(data, which)
    if limit is not None:
      images, labels = images[:limit], labels[:limit]
    return kdata.ArraySource(images, labels)
  if source == "arrays":
    return kdata.ArraySource(*array_split(data, which))
  if not is_fashion_mnist_builder(data):
    return _tfds_source(data, which)
  from kdjax.data import tfds_fashion_mnist  # pylint: disable=g-import-not-at-top
  kwargs = {"source_dir": data["dir"]}
  limits = [data["max_train_examples"], data["max_eval_examples"]]
  if all(v is not None for v in limits):
    kwargs["max_examples"] = max(limits)
  split_arg = split if limit is None else f"{split}[:{limit}]"
  try:
    return tfds_fashion_mnist.load_source(data["name"], split_arg,
                                          data_dir=tfds_data_dir(data),
                                          **kwargs)
  except FileNotFoundError as e:
    raise errors.MissingDataError(
        f"config key 'data.dir' ({data['dir']}): {e}") from None


def split_name(data: Mapping[str, Any], which: str) -> str:
  """What the ``"train"``/``"eval"`` examples are called in messages: the
  split (``tfds``, ``idx``), the file name (``arrays``: ``data.train_path`` /
  ``data.eval_path``) or ``"synthetic train"``/``"synthetic eval"``."""
  if data["source"] == "arrays":
    return os.path.basename(_array_paths(data, which)[0])
  if data["source"] == "synthetic":
    return f"synthetic {_side(which)}"
  return _split(data, which)


def dataset_name(data: Mapping[str, Any], which: str) -> str:
  """A name identifying the examples of a split (the teacher cache's
  dataset fingerprint)."""
  limit = _limit(data, which)
  sliced = "" if limit is None else f"[:{limit}]"
  name = data["name"] if data["source"] == "tfds" else "fashion_mnist_idx"
  split = _split(data, which)
  if data["source"] == "synthetic":
    name = f"synthetic{data['num_classes']}"
  elif data["source"] == "arrays":
    name = ",".join(os.path.abspath(p) for p in _array_paths(data, which)
                    if p is not None)
    split = _side(which)
  return (f"{data['source']}:{name}:{split}{sliced}:"
          f"mean={data['mean']}:std={data['std']}")


def train_pipeline(data: Mapping[str, Any], source, seed: int,
                   batch_size: Optional[int] = None):
  """The shuffled, endlessly repeating, resumable training pipeline."""
  from kdjax.data import InputPipeline  # pylint: disable=g-import-not-at-top
  batch_size = batch_size or data["batch_size"]
  if batch_size > len(source):
    raise errors.BatchSizeError(
        f"config key 'data.batch_size' ({batch_size}) exceeds the "
        f"{len(source)} training examples.")
  return InputPipeline(source, batch_size, seed=seed, shuffle=True,
                       num_classes=data["num_classes"], mean=data["mean"],
                       std=data["std"], read_threads=data["read_threads"],
                       process_index=0, process_count=1)


def ordered_batches(data: Mapping[str, Any], source, batch_size: int):
  """One pass over ``source`` in order (the last batch may be smaller)."""
  from kdjax.data import InputPipeline  # pylint: disable=g-import-not-at-top
  return InputPipeline(source, min(batch_size, len(source)), shuffle=False,
                       num_epochs=1, drop_remainder=False,
                       num_classes=data["num_classes"], mean=data["mean"],
                       std=data["std"], read_threads=data["read_threads"],
                       process_index=0, process_count=1)


def eval_batches(data: Mapping[str, Any], source) -> list[dict]:
  """The evaluation split as fixed-size batches; the last is padded and
  ``batch["mask"]`` is 0 on the padding."""
  size = min(data["eval_batch_size"], len(source))
  out = []
  for batch in ordered_batches(data, source, size):
    n = batch["label"].shape[0]
    batch = {k: v for k, v in batch.items() if k != "index"}
    mask = np.ones((size,), np.float32)
    if n < size:
      batch = {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)])
               for k, v in batch.items()}
      mask[n:] = 0.0
    batch["mask"] = mask
    out.append(batch)
  return out
