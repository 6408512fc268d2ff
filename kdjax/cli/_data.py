"""Data for the command line: the configured sources and their pipelines.

``data.source`` selects the random-access source (``len``, ``[i]``):

* ``tfds``: :func:`kdjax.data.load_source` (the Fashion-MNIST TFDS builder,
  prepared once from Debian's IDX files without TensorFlow, or any other TFDS
  dataset already prepared in ``array_record`` format); ``max_*_examples``
  slice the splits (``"train[:N]"``) and, for the Fashion-MNIST builder,
  prepare only that many examples;
* ``idx``: the Fashion-MNIST IDX arrays in memory
  (:class:`kdjax.data.ArraySource`);
* ``synthetic``: generated 28x28 class patterns plus noise (smoke tests on a
  machine without the dataset).

Training batches come from :class:`kdjax.data.InputPipeline` (grain; shuffled
by ``seed``; its position is saved with every checkpoint); evaluation batches
are read in order and padded to a fixed size with a ``mask``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

SYNTHETIC_TRAIN, SYNTHETIC_EVAL = 2048, 512


def _limit(data: Mapping[str, Any], which: str) -> Optional[int]:
  return data["max_train_examples" if which == "train" else "max_eval_examples"]


def _split(data: Mapping[str, Any], which: str) -> str:
  return data["train_split" if which == "train" else "eval_split"]


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


def build_source(data: Mapping[str, Any], which: str):
  """The random-access source of the ``"train"`` or ``"eval"`` split."""
  from kdjax import data as kdata  # pylint: disable=g-import-not-at-top
  split, limit = _split(data, which), _limit(data, which)
  source = data["source"]
  if source == "synthetic":
    n = limit or (SYNTHETIC_TRAIN if which == "train" else SYNTHETIC_EVAL)
    images, labels = synthetic_arrays(n, data["num_classes"],
                                      0 if which == "train" else 1)
    return kdata.ArraySource(images, labels)
  if source == "idx":
    images, labels = kdata.load_fashion_mnist_split(split, data["dir"])
    if limit is not None:
      images, labels = images[:limit], labels[:limit]
    return kdata.ArraySource(images, labels)
  # tfds
  from kdjax.data import tfds_fashion_mnist  # pylint: disable=g-import-not-at-top
  name = data["name"]
  is_builder = name.split("/")[0].split(":")[0] == tfds_fashion_mnist.BUILDER_NAME
  kwargs = {}
  if is_builder:
    kwargs["source_dir"] = data["dir"]
    limits = [data["max_train_examples"], data["max_eval_examples"]]
    if all(v is not None for v in limits):
      kwargs["max_examples"] = max(limits)
  split_arg = split if limit is None else f"{split}[:{limit}]"
  return tfds_fashion_mnist.load_source(name, split_arg,
                                        data_dir=data["tfds_data_dir"],
                                        **kwargs)


def dataset_name(data: Mapping[str, Any], which: str) -> str:
  """A name identifying the examples of a split (the teacher cache's
  dataset fingerprint)."""
  limit = _limit(data, which)
  sliced = "" if limit is None else f"[:{limit}]"
  name = data["name"] if data["source"] == "tfds" else "fashion_mnist_idx"
  if data["source"] == "synthetic":
    name = f"synthetic{data['num_classes']}"
  return (f"{data['source']}:{name}:{_split(data, which)}{sliced}:"
          f"mean={data['mean']}:std={data['std']}")


def train_pipeline(data: Mapping[str, Any], source, seed: int,
                   batch_size: Optional[int] = None):
  """The shuffled, endlessly repeating, resumable training pipeline."""
  from kdjax.data import InputPipeline  # pylint: disable=g-import-not-at-top
  batch_size = batch_size or data["batch_size"]
  if batch_size > len(source):
    from kdjax.cli.config import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(
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
