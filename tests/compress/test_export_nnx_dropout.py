"""Exporting an NNX model whose state holds typed PRNG keys (dropout).

``from_nnx`` puts the model's RNG streams (``nnx.Dropout``'s key and count)
into ``variables["state"]``; a typed key has no NumPy form, so the export
stores its key data and wraps it again inside the exported function.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import compress
from kdjax import models
from kdjax.compress import _export


def load_exported(directory: str):
  """The ``predict`` of an export, read by its own ``run_exported.py``."""
  spec = importlib.util.spec_from_file_location(
      "run_exported", os.path.join(directory, _export.LOADER))
  loader = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loader)
  return loader.load(directory)


class DropoutNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(48, 64, rngs=rngs)
    self.bn = nnx.BatchNorm(64, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc2 = nnx.Linear(64, 5, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return self.fc2(self.drop(jax.nn.relu(self.bn(self.fc1(x)))))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_export_of_an_nnx_model_with_dropout(tmp_path, quantize):
  apply, variables = models.from_nnx(DropoutNet(nnx.Rngs(0, dropout=1)))
  keys = [x for x in jax.tree.leaves(variables["state"])
          if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
  assert keys, "the model's state should hold its dropout key"
  quant = None if quantize is None else compress.QuantConfig.parse(quantize)
  out = compress.export_for_inference(
      apply, variables, str(tmp_path / "export"), input_shape=(4, 4, 3),
      quantize=quant, int8_min_depth=1)
  with open(os.path.join(out, _export.MANIFEST)) as f:
    manifest = json.load(f)
  assert list(manifest["prng_key_arrays"].values()) == ["threefry2x32"]

  x = np.random.default_rng(0).normal(size=(6, 4, 4, 3)).astype(np.float32)
  predict = load_exported(out)
  got = np.asarray(predict(x))
  want = np.asarray(apply(variables, {"image": jnp.asarray(x)},
                          train=False).logits)
  assert got.shape == (6, 5)
  if quant is None:  # eval mode: dropout off, the float model exactly
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_allclose(got, want, atol=0.1 * np.abs(want).max())
  # Deterministic: the stored key is data, not a fresh draw per call.
  np.testing.assert_array_equal(got, np.asarray(predict(x)))


@pytest.mark.slow
def test_kdjax_export_of_an_nnx_run_with_dropout(tmp_path, monkeypatch):
  """`kdjax export` of a run whose model is a user's NNX class with dropout
  (this failed with "JAX array with PRNGKey dtype cannot be converted")."""
  from kdjax.cli.main import main  # pylint: disable=g-import-not-at-top
  package = tmp_path / "kdjax_test_dropout_nets"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "nets.py").write_text(
      "from flax import nnx\n\n"
      "class Net(nnx.Module):\n"
      "  def __init__(self, input_shape, num_classes, *, rngs):\n"
      "    h, w, c = input_shape\n"
      "    self.fc = nnx.Linear(h * w * c, 8, rngs=rngs)\n"
      "    self.drop = nnx.Dropout(0.2, rngs=rngs)\n"
      "    self.head = nnx.Linear(8, num_classes, rngs=rngs)\n\n"
      "  def __call__(self, x):\n"
      "    x = nnx.relu(self.fc(x.reshape(x.shape[0], -1)))\n"
      "    return self.head(self.drop(x))\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  rng = np.random.default_rng(0)
  for split, n in (("train", 32), ("eval", 16)):
    np.savez(tmp_path / f"{split}.npz",
             image=rng.integers(0, 256, (n, 6, 6, 1), dtype=np.uint8),
             label=rng.integers(0, 3, n))
  run_dir = tmp_path / "runs" / "teacher"
  config = tmp_path / "c.yaml"
  config.write_text(json.dumps({  # JSON is YAML
      "output_dir": str(tmp_path / "runs"),
      "data": {"source": "arrays", "train_path": str(tmp_path / "train.npz"),
               "eval_path": str(tmp_path / "eval.npz"), "batch_size": 16,
               "eval_batch_size": 16},
      "teacher": {"arch": "kdjax_test_dropout_nets.nets:Net", "steps": 2},
      "train": {"progress": False}}))
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main(["train-teacher", "--config", str(config)])
    assert rc == 0, err.getvalue()
    rc = main(["export", str(run_dir), str(tmp_path / "export")])
  assert rc == 0, err.getvalue()
  predict = load_exported(str(tmp_path / "export" / "inference"))
  logits = np.asarray(predict(np.zeros((2, 6, 6, 1), np.float32)))
  assert logits.shape == (2, 3) and np.isfinite(logits).all()
