"""A user's own data through the command line.

``data.source: arrays`` (``.npz`` / ``.npy`` files of any image size and
channel count; classes and normalisation from the data) and ``data.source:
tfds`` with a dataset other than Fashion-MNIST, prepared in ``array_record``
format by a tiny ``GeneratorBasedBuilder`` this test writes and runs in a
subprocess (as a dataset prepared elsewhere), then read by name and
``data_dir``. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from kdjax.cli.image import data as _data
from kdjax.cli.config import image as cfg
from kdjax.cli.main import main


def run_main(args) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main([str(a) for a in args])
  return rc, out.getvalue(), err.getvalue()


def _write_yaml(path, data) -> str:
  path.write_text(yaml.safe_dump(data))
  return str(path)


def _tiny_run(root, data: dict) -> dict:
  return {
      "output_dir": str(root / "runs"), "seed": 0,
      "data": {"batch_size": 16, "eval_batch_size": 16, **data},
      "teacher": {"arch": "cnn", "channels": [4], "dense": 8, "steps": 4},
      "student": {"arch": "mlp", "hidden": [8]},
      "train": {"steps": 4, "log_every": 2, "progress": False},
      "checkpoint": {"save_every": 0},
      "eval": {"latency_runs": 1, "latency_batch_sizes": [1]},
  }


def _head_outputs(run_dir) -> int:
  from kdjax.cli.image import models as _models
  variables = _models.read_run(str(run_dir)).restore_variables()
  return int(np.shape(variables["params"]["head"]["bias"])[0])


# -----------------------------------------------------------------------------
# data.source: arrays
# -----------------------------------------------------------------------------


@pytest.fixture
def rgb_npz(tmp_path):
  """64 + 24 random 10x6 RGB images of 5 classes, under custom keys."""
  rng = np.random.default_rng(0)
  paths = {}
  for split, n in (("train", 64), ("eval", 24)):
    images = rng.integers(0, 256, (n, 10, 6, 3), dtype=np.uint8)
    labels = np.arange(n) % 5
    paths[split] = str(tmp_path / f"{split}.npz")
    np.savez(paths[split], x=images, y=labels)
  return paths


def test_arrays_infer_classes_and_statistics(rgb_npz):
  c = cfg.load_config([], ["data.source=arrays",
                           f"data.train_path={rgb_npz['train']}",
                           f"data.eval_path={rgb_npz['eval']}",
                           "data.image_key=x", "data.label_key=y"])
  d = c["data"]
  assert d["num_classes"] == 5
  images = np.load(rgb_npz["train"])["x"] / 255.0
  assert d["mean"] == pytest.approx(images.mean(), rel=1e-5)
  assert d["std"] == pytest.approx(images.std(), rel=1e-5)
  source = _data.build_source(d, "train")
  assert len(source) == 64 and source[3]["image"].shape == (10, 6, 3)
  assert source[3]["label"] == 3
  assert len(_data.build_source(d, "eval")) == 24
  # The normalised training batches are centred and scaled.
  batch = _data.train_pipeline(d, source, seed=0, batch_size=64).batch_at(0)
  assert batch["image"].shape == (64, 10, 6, 3)
  assert abs(float(batch["image"].mean())) < 1e-3
  assert float(batch["image"].std()) == pytest.approx(1.0, abs=1e-3)
  # max_train_examples slices before the statistics and the fingerprint.
  c2 = cfg.load_config([], ["data.source=arrays",
                            f"data.train_path={rgb_npz['train']}",
                            f"data.eval_path={rgb_npz['eval']}",
                            "data.image_key=x", "data.label_key=y",
                            "data.max_train_examples=32"])
  assert len(_data.build_source(c2["data"], "train")) == 32
  assert c2["data"]["mean"] != d["mean"]
  assert (_data.dataset_name(c2["data"], "train")
          != _data.dataset_name(d, "train"))


@pytest.mark.slow
def test_arrays_train_teacher_and_distill(rgb_npz, tmp_path):
  config = _tiny_run(tmp_path, {"source": "arrays",
                                "train_path": rgb_npz["train"],
                                "eval_path": rgb_npz["eval"],
                                "image_key": "x", "label_key": "y"})
  path = _write_yaml(tmp_path / "c.yaml", config)
  rc, out, err = run_main(["train-teacher", "--config", path])
  assert rc == 0, out + err
  rc, out, err = run_main(["distill", "--config", path])
  assert rc == 0, out + err
  runs = tmp_path / "runs"
  for name in ("teacher", "student_kd"):
    meta = json.loads((runs / name / "run.json").read_text())
    assert meta["image_shape"] == [10, 6, 3]
    saved = yaml.safe_load((runs / name / "config.yaml").read_text())
    assert saved["data"]["num_classes"] == 5
    assert _head_outputs(runs / name) == 5
  assert "eval on 24 " in out


def test_npy_images_hw_with_label_files_and_given_statistics(tmp_path):
  rng = np.random.default_rng(1)
  paths = {}
  for split, n in (("train", 40), ("eval", 12)):
    np.save(tmp_path / f"{split}_x.npy",
            rng.uniform(0, 1, (n, 7, 9)).astype(np.float32))
    np.save(tmp_path / f"{split}_y.npy", (np.arange(n) % 3)[:, None])
    paths[split] = (str(tmp_path / f"{split}_x.npy"),
                    str(tmp_path / f"{split}_y.npy"))
  c = cfg.load_config([], [
      "data.source=arrays", f"data.train_path={paths['train'][0]}",
      f"data.train_labels_path={paths['train'][1]}",
      f"data.eval_path={paths['eval'][0]}",
      f"data.eval_labels_path={paths['eval'][1]}",
      "data.num_classes=4", "data.mean=0.5", "data.std=0.25"])
  d = c["data"]
  assert (d["num_classes"], d["mean"], d["std"]) == (4, 0.5, 0.25)
  source = _data.build_source(d, "train")
  assert source[0]["image"].shape == (7, 9, 1) and source[5]["label"] == 2
  # Float pixels are normalised as they are (no / 255).
  batch = _data.train_pipeline(d, source, seed=0, batch_size=8).batch_at(0)
  raw = np.load(paths["train"][0])[batch["index"]]
  np.testing.assert_allclose(batch["image"][..., 0], (raw - 0.5) / 0.25,
                             rtol=1e-5, atol=1e-5)


def test_integer_pixels_are_read_as_uint8(tmp_path):
  images = np.random.default_rng(2).integers(0, 256, (20, 4, 4))  # int64
  np.savez(tmp_path / "d.npz", image=images, label=np.arange(20) % 2)
  path = str(tmp_path / "d.npz")
  c = cfg.load_config([], ["data.source=arrays", f"data.train_path={path}",
                           f"data.eval_path={path}"])
  assert c["data"]["num_classes"] == 2
  assert c["data"]["mean"] == pytest.approx((images / 255.0).mean(), rel=1e-5)
  assert _data.build_source(c["data"], "eval")[0]["image"].dtype == np.uint8


@pytest.mark.parametrize("overrides, pieces", [
    ([], ["'data.train_path' is needed"]),
    (["data.train_path=TRAIN"], ["'data.eval_path' is needed"]),
    (["data.train_path=IMAGES_NPY", "data.eval_path=EVAL"],
     ["'data.train_labels_path' is needed", ".npy of images only"]),
    (["data.train_path=TRAIN.csv", "data.eval_path=EVAL"],
     ["'data.train_path' must name a .npz or .npy"]),
    (["data.train_path=MISSING", "data.eval_path=EVAL"],
     ["'data.train_path'", "not found"]),
    (["data.train_path=TRAIN", "data.eval_path=EVAL", "data.image_key=pixels"],
     ["'data.image_key'", "no array 'pixels'", "its arrays: x, y"]),
    (["data.train_path=TRAIN", "data.eval_path=EVAL", "data.image_key=x",
      "data.label_key=y", "data.num_classes=3"],
     ["'data.num_classes' (3) is too small", "labels reach 4"]),
])
def test_arrays_config_errors(rgb_npz, tmp_path, overrides, pieces):
  np.save(tmp_path / "images.npy", np.zeros((4, 2, 2), np.uint8))
  subs = {"TRAIN": rgb_npz["train"], "EVAL": rgb_npz["eval"],
          "IMAGES_NPY": str(tmp_path / "images.npy"),
          "MISSING": str(tmp_path / "missing.npz")}
  args = ["data.source=arrays"]
  for o in overrides:
    key, _, value = o.partition("=")
    for name, sub in sorted(subs.items(), key=lambda kv: -len(kv[0])):
      value = value.replace(name, sub)
    args.append(f"{key}={value}")
  with pytest.raises(cfg.ConfigError) as info:
    cfg.load_config([], args)
  for piece in pieces:
    assert piece in str(info.value)
  rc, _, err = run_main(["config", "--config",
                         _write_yaml(tmp_path / "c.yaml", {})] +
                        sum((["--set", a] for a in args), []))
  assert rc == 2 and "config error" in err and "Traceback" not in err


def test_schema_documents_the_data_keys():
  rc, out, _ = run_main(["config", "--schema"])
  assert rc == 0
  for key in ("source:", "arrays", "train_path:", "train_labels_path:",
              "eval_path:", "eval_labels_path:", "image_key:", "label_key:",
              "data_dir:", "num_classes: null", "mean: null", "std: null"):
    assert key in out, key


# -----------------------------------------------------------------------------
# data.source: tfds, a prepared dataset other than Fashion-MNIST
# -----------------------------------------------------------------------------

_BUILDER = '''
"""A tiny image-classification TFDS builder (array_record, no TensorFlow)."""
import numpy as np
import tensorflow_datasets as tfds


class KdjaxTinyShapes(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "picture": tfds.features.Image(shape=(12, 10, 3)),
            "target": tfds.features.ClassLabel(num_classes=6)}),
        supervised_keys=("picture", "target"), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(48, 0),
            "validation": self._generate_examples(18, 1)}

  def _generate_examples(self, n, seed):
    from PIL import Image  # Pillow encodes the PNG: no TensorFlow.
    rng = np.random.default_rng(seed)
    for i in range(n):
      image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
      yield i, {"picture": Image.fromarray(image), "target": i % 6}
'''


@pytest.fixture(scope="module")
def prepared_tfds(tmp_path_factory):
  """``(data_dir, name)`` of a tiny dataset prepared by another process."""
  root = tmp_path_factory.mktemp("tfds")
  pkg = root / "tinyshapes_pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "builder.py").write_text(_BUILDER)
  data_dir = root / "data"
  script = textwrap.dedent(f"""
      import tensorflow_datasets as tfds
      from tinyshapes_pkg import builder
      b = builder.KdjaxTinyShapes(data_dir={str(data_dir)!r},
                                  file_format="array_record")
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False))
  """)
  env = {**os.environ, "PYTHONPATH": str(root)}
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (data_dir / "kdjax_tiny_shapes" / "1.0.0" /
          "dataset_info.json").exists()
  return str(data_dir), "kdjax_tiny_shapes"


def _tfds_overrides(data_dir, name, *extra):
  return ["data.source=tfds", f"data.name={name}", f"data.data_dir={data_dir}",
          "data.image_key=picture", "data.label_key=target",
          "data.eval_split=validation", *extra]


def test_prepared_tfds_dataset_reads_by_name(prepared_tfds):
  data_dir, name = prepared_tfds
  c = cfg.load_config([], _tfds_overrides(data_dir, name))
  d = c["data"]
  assert d["num_classes"] == 6  # the ClassLabel
  train = _data.build_source(d, "train")
  assert len(train) == 48 and len(_data.build_source(d, "eval")) == 18
  assert np.asarray(train[7]["image"]).shape == (12, 10, 3)
  assert int(train[7]["label"]) == 1
  pixels = np.stack([np.asarray(train[i]["image"]) for i in range(48)]) / 255.0
  assert d["mean"] == pytest.approx(pixels.mean(), rel=1e-5)
  assert d["std"] == pytest.approx(pixels.std(), rel=1e-5)
  # The older key name still works; slices apply.
  c2 = cfg.load_config([], _tfds_overrides(
      data_dir, name, "data.data_dir=null", f"data.tfds_data_dir={data_dir}",
      "data.max_train_examples=20"))
  assert len(_data.build_source(c2["data"], "train")) == 20


def test_tfds_errors(prepared_tfds, tmp_path):
  data_dir, name = prepared_tfds
  with pytest.raises(cfg.ConfigError, match="no split 'test'.*train, "
                     "validation"):
    c = cfg.load_config([], _tfds_overrides(data_dir, name, "data.mean=0.5",
                                            "data.std=0.2",
                                            "data.eval_split=test"))
    _data.build_source(c["data"], "eval")
  with pytest.raises(cfg.ConfigError, match="no feature 'label'"):
    cfg.load_config([], _tfds_overrides(data_dir, name, "data.label_key=label"))
  # A TFDS dataset that is not prepared: a clear error, no download.
  rc, _, err = run_main(["config", "--config",
                         _write_yaml(tmp_path / "c.yaml", {}),
                         "--set", "data.name=mnist",
                         "--set", f"data.data_dir={tmp_path}"])
  # (exit status 1 or 2 as kdjax.cli.main maps a missing dataset)
  assert rc in (1, 2) and "'mnist' is not prepared" in err
  assert "array_record" in err and "Traceback" not in err


@pytest.mark.slow
def test_prepared_tfds_dataset_trains_through_the_cli(prepared_tfds, tmp_path):
  data_dir, name = prepared_tfds
  config = _tiny_run(tmp_path, {
      "source": "tfds", "name": name, "data_dir": data_dir,
      "image_key": "picture", "label_key": "target",
      "eval_split": "validation"})
  path = _write_yaml(tmp_path / "c.yaml", config)
  rc, out, err = run_main(["train-teacher", "--config", path])
  assert rc == 0, out + err
  assert "eval on 18 validation examples" in out
  run_dir = tmp_path / "runs" / "teacher"
  assert json.loads((run_dir / "run.json").read_text())["image_shape"] == [
      12, 10, 3]
  assert _head_outputs(run_dir) == 6
