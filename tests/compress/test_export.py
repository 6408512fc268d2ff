"""Export: a jax.export artifact that a kdjax-free process runs to the student's outputs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.cli import runs
from kdjax import compress
from kdjax import models

pytest.importorskip("flatbuffers", reason="jax.export serialization needs "
                    "flatbuffers")

IMAGE_SHAPE = (28, 28, 1)
# float32 forward in XLA vs the same program deserialised: same ops, the
# differences are reassociation at most.
ATOL = 1e-5


def _run_without_kdjax(script: str, cwd: str) -> str:
  """Runs ``script`` in a fresh Python in which ``import kdjax`` fails."""
  blocker = os.path.join(cwd, "_block_kdjax")
  os.makedirs(os.path.join(blocker, "kdjax"), exist_ok=True)
  with open(os.path.join(blocker, "kdjax", "__init__.py"), "w") as f:
    f.write("raise ImportError('kdjax is blocked in this test')\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=blocker, JAX_PLATFORMS="cpu")
  prelude = textwrap.dedent("""\
      try:
        import kdjax
        raise SystemExit('kdjax was importable')
      except ImportError:
        pass
      """)
  proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)],
                        capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  return proc.stdout


@pytest.fixture(scope="module")
def student():
  m = models.CNN(channels=(4, 8), dense=16, num_classes=10)
  v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))
  return models.from_linen(m, train_kwarg="train"), jax.device_get(v)


def test_round_trip_in_a_kdjax_free_process(student, tmp_path):
  apply, variables = student
  x = np.random.default_rng(0).standard_normal((3, *IMAGE_SHAPE)).astype(
      np.float32)
  np.save(tmp_path / "x.npy", x)
  outs = {}
  for name, q in (("float", None), ("w8a8", compress.QuantConfig(8, 8)),
                  ("w4", compress.QuantConfig(4, None))):
    d = str(tmp_path / name)
    compress.export_for_inference(apply, variables, d, input_shape=IMAGE_SHAPE,
                                  quantize=q, platforms=("cpu",))
    assert set(os.listdir(d)) == {"model.jaxexport", "params.npz",
                                  "export.json", "run_exported.py"}
    ref = (compress.quantize_apply(apply, q) if q else apply)(
        variables, {"image": x}).logits
    outs[name] = np.asarray(ref)
  script = """
      import importlib.util, json, sys
      import numpy as np
      x = np.load("x.npy")
      res = {}
      for name in ("float", "w8a8", "w4"):
        spec = importlib.util.spec_from_file_location("loader", name + "/run_exported.py")
        loader = importlib.util.module_from_spec(spec); spec.loader.exec_module(loader)
        predict = loader.load(name)
        res[name] = np.asarray(predict(x)).tolist()
        res[name + "_b1"] = np.asarray(predict(x[:1])).tolist()
      assert "kdjax" not in sys.modules
      print(json.dumps(res))
      """
  got = json.loads(_run_without_kdjax(script, str(tmp_path)).strip().splitlines()[-1])
  for name, ref in outs.items():
    np.testing.assert_allclose(np.asarray(got[name]), ref, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[name + "_b1"]), ref[:1],
                               atol=ATOL, rtol=1e-5)
  # int8 storage is ~4x smaller than float32 for the kernels
  size = {n: os.path.getsize(tmp_path / n / "params.npz") for n in outs}
  assert size["w8a8"] < 0.45 * size["float"]
  # the loader also runs as a script
  out = _run_without_kdjax(
      "import runpy, sys; sys.argv = ['run_exported.py', 'float', '--batch', '2'];"
      " runpy.run_path('float/run_exported.py', run_name='__main__')",
      str(tmp_path))
  assert "logits (2, 10)" in out


def test_export_refuses_existing_directory_and_bad_bits(student, tmp_path):
  apply, variables = student
  d = str(tmp_path / "e")
  os.makedirs(d)
  with pytest.raises(FileExistsError):
    compress.export_for_inference(apply, variables, d, input_shape=IMAGE_SHAPE)
  with pytest.raises(ValueError, match="bit width"):
    compress.quantize_for_storage(variables["params"], 2)


# ---------------------------------------------------------------------------
# The `kdjax export` command.
# ---------------------------------------------------------------------------


def _make_run(root, *, with_checkpoint: bool):
  from kdjax import checkpoint as kckpt
  from kdjax import train
  from kdjax.cli.image import models as _models
  from kdjax.cli.config import image as cfg
  config = cfg.load_config([], [f"output_dir={root}", "student.arch=mlp",
                                "student.hidden=[8]"])
  run_dir = os.path.join(root, "student_kd")
  _models.write_run(run_dir, config, {"command": "distill", "model": "student",
                                      "method": "kd",
                                      "image_shape": list(IMAGE_SHAPE)})
  module = _models.build_module(config["student"], config["data"]["num_classes"])
  variables = _models.init_variables(module, jax.random.PRNGKey(3), IMAGE_SHAPE)
  if with_checkpoint:
    opt = optax.sgd(0.1)
    state = train.create_state(variables, opt, rng=jax.random.PRNGKey(0))
    ckpt = kckpt.DistillCheckpointer(os.path.join(run_dir, runs.CHECKPOINTS),
                                     save_every=1, async_save=False)
    ckpt.save(state, step=1, force=True)
    ckpt.close()
  return run_dir, module, variables


def _main(args):
  from kdjax.cli.main import main
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main([str(a) for a in args])
  return rc, out.getvalue(), err.getvalue()


def test_cli_export_of_a_run_without_checkpoint_is_a_clear_error(tmp_path):
  run_dir, _, _ = _make_run(str(tmp_path), with_checkpoint=False)
  # exit status 2: fixed before the run (kdjax.cli.errors)
  rc, _, err = _main(["export", run_dir, tmp_path / "out"])
  assert rc == 2
  assert "no student checkpoint" in err and "Traceback" not in err
  assert not os.path.exists(tmp_path / "out")
  rc, _, err = _main(["export", tmp_path / "nowhere", tmp_path / "out"])
  assert rc == 2 and "not a kdjax run directory" in err


def test_cli_export_bad_bit_width(tmp_path):
  run_dir, _, _ = _make_run(str(tmp_path), with_checkpoint=True)
  rc, _, err = _main(["export", run_dir, tmp_path / "out", "--quantize", "w3"])
  assert rc == 2 and "bit width" in err


def test_cli_export_writes_orbax_and_a_kdjax_free_artifact(tmp_path):
  import orbax.checkpoint as ocp
  run_dir, module, variables = _make_run(str(tmp_path), with_checkpoint=True)
  out = tmp_path / "export"
  rc, stdout, err = _main(["export", run_dir, out, "--quantize", "int8",
                           "--platforms", "cpu"])
  assert rc == 0, err
  restored = ocp.StandardCheckpointer().restore(str(out))
  assert set(restored) == {"params"}
  jax.tree.map(np.testing.assert_array_equal, dict(restored),
               jax.device_get(variables))
  manifest = json.loads((out / "inference" / "export.json").read_text())
  assert manifest["quantization"] == "w8a8" and manifest["model"] == "student"
  x = np.random.default_rng(1).standard_normal((4, *IMAGE_SHAPE)).astype(
      np.float32)
  np.save(tmp_path / "x.npy", x)
  ref = compress.quantize_apply(models.from_linen(module, train_kwarg="train"),
                                compress.QuantConfig(8, 8))(
                                    variables, {"image": x}).logits
  got = _run_without_kdjax("""
      import importlib.util, json
      import numpy as np
      spec = importlib.util.spec_from_file_location("l", "export/inference/run_exported.py")
      l = importlib.util.module_from_spec(spec); spec.loader.exec_module(l)
      print(json.dumps(np.asarray(l.load("export/inference")(np.load("x.npy"))).tolist()))
      """, str(tmp_path))
  np.testing.assert_allclose(np.asarray(json.loads(got.strip().splitlines()[-1])),
                             np.asarray(ref), atol=ATOL, rtol=1e-5)
  # --format jax: the artifact alone, in OUT
  rc, _, err = _main(["export", run_dir, tmp_path / "jax_only", "--format",
                      "jax", "--platforms", "cpu"])
  assert rc == 0, err
  assert os.path.exists(tmp_path / "jax_only" / "model.jaxexport")
  assert not os.path.exists(tmp_path / "jax_only" / "_METADATA")
