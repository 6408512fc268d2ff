"""Fashion-MNIST as a tensorflow-datasets builder that needs no TensorFlow.

:class:`KdjaxFashionMnist` is a ``tfds.core.GeneratorBasedBuilder`` that
prepares Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747) from
the gzipped IDX files of Debian's ``dataset-fashion-mnist`` package (read by
:func:`kdjax.data.read_idx`, never downloaded), writes ``array_record`` files
and is read back with ``builder.as_data_source()`` / ``tfds.data_source`` as a
random-access source (``len(source)``, ``source[i] -> {"image": uint8
[28, 28, 1], "label": int}``). Its features are those of TFDS's own
``fashion_mnist`` (``Image(shape=(28, 28, 1))``, ``ClassLabel`` of 10 names),
so the two are interchangeable.

TensorFlow-free path (checked with tensorflow-datasets 4.9.10, TensorFlow not
installed): the only piece of the build that calls TensorFlow is
``tfds.features.Image`` encoding a NumPy array to PNG
(``tf.image.encode_png``); a ``PIL.Image`` is encoded by Pillow instead, so
:meth:`KdjaxFashionMnist._generate_examples` yields ``PIL.Image`` objects.
Reading decodes the PNG with OpenCV or Pillow (``decode_example_np``), and the
``array_record`` reader and writer need no TensorFlow. Records keep the IDX
order (``disable_shuffling=True``), so record ``i`` of a split is example
``i`` of the IDX file and the record position is a stable dataset index.

The IDX directory is, in order of precedence: the builder's ``source_dir=``
argument, the manual dir of ``tfds.download.DownloadConfig(manual_dir=...)`` when it
holds the IDX files, ``$KDJAX_FASHION_MNIST_DIR``, then
``/usr/share/datasets/fashion-mnist``.

This module imports ``tensorflow_datasets``; ``import kdjax.data`` does not
import it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from kdjax.data import _idx

BUILDER_NAME = "kdjax_fashion_mnist"

_CITATION = """@article{xiao2017fashion,
  title   = {Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
             Learning Algorithms},
  author  = {Xiao, Han and Rasul, Kashif and Vollgraf, Roland},
  journal = {arXiv preprint arXiv:1708.07747},
  year    = {2017}
}"""


@dataclasses.dataclass
class FashionMnistConfig(tfds.core.BuilderConfig):
  """Builder config of :class:`KdjaxFashionMnist`.

  Attributes:
    max_examples: keep only the first ``max_examples`` examples of each split
      (``None``: all; 60,000 train and 10,000 test). Give such a config its own
      ``name``: the prepared data live under ``data_dir/kdjax_fashion_mnist/
      <name>/<version>``.
  """
  max_examples: Optional[int] = None


class KdjaxFashionMnist(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST prepared from local IDX files (no download, no TensorFlow).

  Args (besides TFDS's ``data_dir``, ``config``, ...):
    source_dir: directory of the (gzipped) IDX files; ``None`` falls back to
      the manual dir, ``$KDJAX_FASHION_MNIST_DIR``, then
      ``/usr/share/datasets/fashion-mnist``. Prepared data are reused by
      config name, whatever their source.
    file_format: ``"array_record"`` (random access; the default).

  Example::

    builder = KdjaxFashionMnist(data_dir="/tmp/tfds")
    builder.download_and_prepare()
    train = builder.as_data_source(split="train")   # len 60000
    train[0]  # {"image": uint8 [28, 28, 1], "label": int64 in [0, 10)}
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Prepared from the IDX files of "
                            "dataset-fashion-mnist (Debian)."}
  BUILDER_CONFIGS = [
      FashionMnistConfig(name="full", description="All 60,000 + 10,000 "
                         "examples."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "full"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Nothing is downloaded: the IDX files (train-images-idx3-ubyte.gz, "
      "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
      "t10k-labels-idx1-ubyte.gz) are read from the builder's "
      "source_dir, this manual dir, $KDJAX_FASHION_MNIST_DIR, or "
      f"{_idx.DEFAULT_FASHION_MNIST_DIR}; " + _idx._INSTALL_HINT + ".")

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's default resolves a package's path through
    # ``importlib_resources``, a dependency it declares only for Python < 3.9,
    # and fails with ModuleNotFoundError for a builder defined in a package
    # on Python 3.11 (tensorflow/datasets#11212). This file is the code path.
    return epath.Path(__file__)

  def __init__(self, *, source_dir: Optional[str] = None,
               file_format: Any = "array_record", **kwargs):
    self._source_dir_arg = None if source_dir is None else os.fspath(source_dir)
    super().__init__(file_format=file_format, **kwargs)

  def download_and_prepare(self, *, download_config=None, **kwargs) -> None:
    """Prepares the dataset from the IDX files; never contacts GCS."""
    if download_config is None:
      download_config = tfds.download.DownloadConfig()
    # Nothing to fetch: skip TFDS's look-up of a prepared copy on GCS.
    download_config = dataclasses.replace(download_config,
                                          try_download_gcs=False)
    super().download_and_prepare(download_config=download_config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Fashion-MNIST: 28x28 grayscale images of 10 classes of "
                     "clothing (Zalando), read from local IDX files."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(
                names=list(_idx.FASHION_MNIST_CLASSES)),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage="https://github.com/zalandoresearch/fashion-mnist",
        citation=_CITATION,
    )

  def _source_dir(self, dl_manager) -> str:
    if self._source_dir_arg is not None:
      return _idx.resolve_fashion_mnist_dir(self._source_dir_arg)
    try:
      manual = os.fspath(dl_manager.manual_dir)
    except (AssertionError, ValueError):  # TFDS: manual dir absent or empty.
      manual = None
    if manual is not None and any(
        os.path.exists(os.path.join(manual, "train-images-idx3-ubyte" + ext))
        for ext in (".gz", "")):
      return manual
    return _idx.resolve_fashion_mnist_dir(None)

  def _split_generators(self, dl_manager):
    source_dir = self._source_dir(dl_manager)
    max_examples = getattr(self.builder_config, "max_examples", None)
    if max_examples is not None and (int(max_examples) != max_examples
                                     or max_examples < 1):
      raise ValueError(f"max_examples must be a positive int or None, got "
                       f"{max_examples}.")
    return {split: self._generate_examples(split, source_dir, max_examples)
            for split in ("train", "test")}

  def _generate_examples(self, split: str, source_dir: str,
                         max_examples: Optional[int]):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    images, labels = _idx.load_fashion_mnist_split(
        split, source_dir, num_classes=len(_idx.FASHION_MNIST_CLASSES))
    if images.shape[1:] != (28, 28):
      raise _idx.DataError(f"{split}: Fashion-MNIST images must be 28x28, "
                           f"got {images.shape[1:]}.")
    n = images.shape[0] if max_examples is None else min(max_examples,
                                                         images.shape[0])
    for i in range(n):
      # A PIL image is PNG-encoded by Pillow; a NumPy array would need TF.
      yield i, {"image": Image.fromarray(images[i]),  # 2-D uint8: mode "L".
                "label": int(labels[i])}


def _split_name(name: str) -> tuple[str, Optional[str]]:
  # TFDS syntax "name[/config][:version]"; ours has one version.
  base, _, config = name.partition(":")[0].partition("/")
  return base, (config or None)


def prepare_fashion_mnist(data_dir: Optional[str] = None, *,
                          source_dir: Optional[str] = None,
                          max_examples: Optional[int] = None,
                          config_name: Optional[str] = None
                         ) -> KdjaxFashionMnist:
  """Builds (once) and returns the prepared :class:`KdjaxFashionMnist`.

  Args:
    data_dir: TFDS data directory to write into (default: TFDS's, e.g.
      ``~/tensorflow_datasets``).
    source_dir: IDX directory (see the module docstring for the fallbacks).
    max_examples: keep the first ``max_examples`` of each split.
    config_name: name of the config; defaults to ``"full"``, or
      ``"first_<max_examples>"`` when ``max_examples`` is given (and a name
      ``"first_<n>"`` alone means ``max_examples=n``). Prepared data are
      reused by name: a name already built is not rebuilt.

  Raises:
    FileNotFoundError: the IDX directory or a file is missing (says how to
      install it).
    kdjax.data.DataError: a file is corrupt or a label is out of range.
  """
  if config_name is None:
    config_name = "full" if max_examples is None else f"first_{max_examples}"
  elif max_examples is None and re.fullmatch(r"first_[1-9][0-9]*", config_name):
    max_examples = int(config_name[len("first_"):])
  if config_name == "full" and max_examples is None:
    config: Any = "full"
  else:
    config = FashionMnistConfig(name=config_name, max_examples=max_examples)
  builder = KdjaxFashionMnist(config=config, data_dir=data_dir,
                              source_dir=source_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def load_source(name: str = BUILDER_NAME,
                split: str = "train",
                data_dir: Optional[str] = None,
                *,
                source_dir: Optional[str] = None,
                max_examples: Optional[int] = None,
                download: bool = True,
                **data_source_kwargs: Any) -> Any:
  """Returns a random-access source (``len``, ``[i]``) of ``name``'s ``split``.

  ``name == "kdjax_fashion_mnist"`` (optionally ``".../<config>"``) builds the
  local Fashion-MNIST builder if needed (see :func:`prepare_fashion_mnist`)
  and returns ``builder.as_data_source(split)``; ``split`` may use TFDS slicing
  (``"train[:1000]"``). Any other name is passed to
  ``tfds.data_source(name, split=split, data_dir=data_dir, download=download,
  **data_source_kwargs)``: a standard TFDS dataset already prepared in
  ``array_record`` format reads without TensorFlow, but preparing most image
  datasets (``download=True``) needs TensorFlow and network access.

  Examples are dicts, e.g. ``{"image": uint8 [28, 28, 1], "label": int}``.
  """
  base, config_name = _split_name(name)
  if base != BUILDER_NAME:
    if source_dir is not None or max_examples is not None:
      raise ValueError(f"source_dir/max_examples apply only to {BUILDER_NAME!r}"
                       f", not to {name!r}.")
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=download, **data_source_kwargs)
  builder = prepare_fashion_mnist(data_dir, source_dir=source_dir,
                                  max_examples=max_examples,
                                  config_name=config_name)
  return builder.as_data_source(split=split, **data_source_kwargs)


__all__ = ["BUILDER_NAME", "FashionMnistConfig", "KdjaxFashionMnist",
           "load_source", "prepare_fashion_mnist"]
