"""The TensorFlow-free TFDS builder of Fashion-MNIST and load_source."""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest

from _data_helpers import HAVE_REAL, REAL_DIR, needs_real, read_real_idx, \
    write_fashion_dir, write_idx  # noqa: E402

tfds = pytest.importorskip("tensorflow_datasets")
from kdjax.data import DataError, load_fashion_mnist_split  # noqa: E402
from kdjax.data import pipeline as pipeline_lib  # noqa: E402
from kdjax.data import tfds_fashion_mnist as tfm  # noqa: E402

N_REAL = 48


def _arrays(source):
  ex = [source[i] for i in range(len(source))]
  return (np.stack([e["image"] for e in ex]),
          np.asarray([e["label"] for e in ex]))


@pytest.fixture(scope="module")
def real_builder(tmp_path_factory):
  if not HAVE_REAL:
    pytest.skip(f"real Fashion-MNIST not installed at {REAL_DIR}")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return tfm.prepare_fashion_mnist(data_dir, source_dir=REAL_DIR,
                                   max_examples=N_REAL)


@pytest.fixture(scope="module")
def real_test_split():
  if not HAVE_REAL:
    pytest.skip(f"real Fashion-MNIST not installed at {REAL_DIR}")
  return load_fashion_mnist_split("test", REAL_DIR)


@needs_real
def test_real_slice_reads_back_equal_to_idx(real_builder, real_test_split):
  info = real_builder.info
  assert info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert glob.glob(os.path.join(real_builder.data_dir, "*.array_record*"))
  assert info.features["image"].shape == (28, 28, 1)
  assert info.features["label"].num_classes == 10
  assert info.features["label"].names[0] == "T-shirt/top"
  assert info.splits["train"].num_examples == N_REAL
  assert info.splits["test"].num_examples == N_REAL
  sources = real_builder.as_data_source()
  # Test split against kdjax's IDX reader.
  images, labels = _arrays(sources["test"])
  assert images.shape == (N_REAL, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[..., 0], real_test_split[0][:N_REAL])
  np.testing.assert_array_equal(labels, real_test_split[1][:N_REAL])
  # Train split against an independent reader of the raw gzip bytes.
  images, labels = _arrays(sources["train"])
  ref_images = read_real_idx("train-images-idx3-ubyte")[:N_REAL]
  ref_labels = read_real_idx("train-labels-idx1-ubyte")[:N_REAL]
  np.testing.assert_array_equal(images[..., 0], ref_images)
  np.testing.assert_array_equal(labels, ref_labels)
  assert len(set(labels.tolist())) > 3  # real labels, not a constant.


@needs_real
def test_no_tensorflow_and_tfds_data_source(real_builder, real_test_split):
  # Built and read above (module fixture): TensorFlow was never imported.
  assert "tensorflow" not in sys.modules
  source = tfds.data_source(f"kdjax_fashion_mnist/first_{N_REAL}",
                            split="test[5:9]", data_dir=real_builder.data_dir_root,
                            download=False)
  images, labels = _arrays(source)
  np.testing.assert_array_equal(images[..., 0], real_test_split[0][5:9])
  np.testing.assert_array_equal(labels, real_test_split[1][5:9])
  assert "tensorflow" not in sys.modules


@needs_real
def test_load_source_reuses_prepared_and_slices(real_builder, real_test_split):
  data_dir = real_builder.data_dir_root
  mtime = os.path.getmtime(real_builder.data_dir)
  source = tfm.load_source(f"kdjax_fashion_mnist/first_{N_REAL}",
                           split="test[10:20]", data_dir=data_dir)
  assert os.path.getmtime(real_builder.data_dir) == mtime  # not rebuilt.
  assert len(source) == 10
  np.testing.assert_array_equal(_arrays(source)[1], real_test_split[1][10:20])


@needs_real
def test_pipeline_over_tfds_source_equals_array_source(real_builder,
                                                       real_test_split):
  images, labels = real_test_split
  kw = dict(batch_size=8, seed=5, num_epochs=2, process_index=0,
            process_count=1)
  from_tfds = list(pipeline_lib.InputPipeline(
      real_builder.as_data_source(split="test"), **kw))
  from_idx = list(pipeline_lib.InputPipeline(
      pipeline_lib.ArraySource(images[:N_REAL], labels[:N_REAL]), **kw))
  assert len(from_tfds) == 2 * (N_REAL // 8)
  for a, b in zip(from_tfds, from_idx):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(a[key], b[key])
    ref = (images[a["index"]].astype(np.float64) / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(a["image"][..., 0], ref, atol=1e-5)


def test_env_dir_and_manual_dir(tmp_path, monkeypatch):
  env_dir = str(tmp_path / "env")
  env_data = write_fashion_dir(env_dir, n_train=6, n_test=3, seed=1)
  monkeypatch.setenv("KDJAX_FASHION_MNIST_DIR", env_dir)
  source = tfm.load_source("kdjax_fashion_mnist/env_copy", split="train",
                           data_dir=str(tmp_path / "tfds"))
  images, labels = _arrays(source)
  np.testing.assert_array_equal(images[..., 0], env_data["train"][0])
  np.testing.assert_array_equal(labels, env_data["train"][1])

  # A manual dir holding the files wins over the environment variable.
  manual_dir = str(tmp_path / "manual")
  manual_data = write_fashion_dir(manual_dir, n_train=5, n_test=2, seed=2)
  builder = tfm.KdjaxFashionMnist(
      config=tfm.FashionMnistConfig(name="manual_copy"),
      data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  images, labels = _arrays(builder.as_data_source(split="test"))
  np.testing.assert_array_equal(images[..., 0], manual_data["test"][0])
  np.testing.assert_array_equal(labels, manual_data["test"][1])


def test_missing_directory_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setenv("KDJAX_FASHION_MNIST_DIR", str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError,
                     match="apt-get install -y dataset-fashion-mnist"):
    tfm.load_source(split="train", data_dir=str(tmp_path / "tfds"),
                    max_examples=4)
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    load_fashion_mnist_split("train", str(tmp_path / "absent"))
  # A directory missing one file.
  partial = str(tmp_path / "partial")
  write_fashion_dir(partial)
  os.remove(os.path.join(partial, "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    tfm.load_source(split="test", data_dir=str(tmp_path / "tfds2"),
                    source_dir=partial)


@pytest.mark.skipif(not HAVE_REAL, reason="needs the real IDX files to "
                    "truncate (apt-get install -y dataset-fashion-mnist)")
def test_truncated_real_file_is_a_clear_error(tmp_path):
  src_dir = str(tmp_path / "trunc")
  os.makedirs(src_dir)
  for name in os.listdir(REAL_DIR):
    shutil.copy(os.path.join(REAL_DIR, name), src_dir)
  path = os.path.join(src_dir, "t10k-labels-idx1-ubyte.gz")
  with open(path, "rb") as f:
    raw = f.read()
  with open(path, "wb") as f:
    f.write(raw[:len(raw) // 2])
  with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
    load_fashion_mnist_split("test", src_dir)
  with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
    tfm.load_source(split="test", data_dir=str(tmp_path / "tfds"),
                    source_dir=src_dir, max_examples=4)
  # An uncompressed file cut short: the payload disagrees with the header.
  plain = str(tmp_path / "plain-idx1-ubyte")
  write_idx(plain, np.arange(10, dtype=np.uint8))
  with open(plain, "rb") as f:
    raw = f.read()
  with open(plain, "wb") as f:
    f.write(raw[:-3])
  from kdjax.data import read_idx
  with pytest.raises(DataError, match="truncated or corrupt"):
    read_idx(plain)


def test_label_outside_class_range_is_a_clear_error(tmp_path):
  bad_dir = str(tmp_path / "bad")
  write_fashion_dir(bad_dir, n_train=6, bad_label=12)
  with pytest.raises(DataError, match=r"outside \[0, 10\).*label 12 at index 3"):
    load_fashion_mnist_split("train", bad_dir)
  with pytest.raises(DataError, match=r"label 12"):
    tfm.load_source(split="train", data_dir=str(tmp_path / "tfds"),
                    source_dir=bad_dir)


def test_other_names_defer_to_tfds_data_source(monkeypatch):
  calls = []

  def fake_data_source(name, **kwargs):
    calls.append((name, kwargs))
    return ["sentinel"]

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  out = tfm.load_source("mnist", split="test[:10]", data_dir="/somewhere",
                        download=False)
  assert out == ["sentinel"]
  assert calls == [("mnist", {"split": "test[:10]", "data_dir": "/somewhere",
                              "download": False})]
  with pytest.raises(ValueError, match="max_examples"):
    tfm.load_source("mnist", max_examples=3)


def test_import_kdjax_data_imports_neither_tfds_nor_grain(subprocess_runner):
  out = subprocess_runner(
      "import sys, json, kdjax.data, kdjax.data.pipeline, "
      "kdjax.data.augment\n"
      "print(json.dumps([m in sys.modules for m in "
      "('tensorflow_datasets', 'grain', 'tensorflow')]))", devices=1)
  assert json.loads(out.strip().splitlines()[-1]) == [False, False, False]
