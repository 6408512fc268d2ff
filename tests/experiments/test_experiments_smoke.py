"""Smoke tests of the experiment scripts (experiments/*.py) in their --smoke mode.

Each script's ``main(["--smoke", ...])`` runs in-process on a small generated
Fashion-MNIST directory (class-prototype images in the IDX format, so that
the run needs no installed dataset and the classes are learnable), with its
teachers, caches and outputs in a temporary work directory; the tests check
the JSON payload, the written files and the properties that must hold at any
size (e.g. a student trained offline from the cached full logits makes the
same test predictions as the same student trained with the teacher online).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import sys

import jax  # noqa: F401  (imported before experiments/ joins sys.path)
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = os.path.join(REPO_ROOT, "experiments")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_idx(path: str, array: np.ndarray) -> None:
  """An independent IDX writer: magic 0x08 (uint8), ndim, big-endian dims."""
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
      struct.pack(">I", d) for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A generated dataset, a shared work directory, and the scripts as modules."""
  root = tmp_path_factory.mktemp("experiments_smoke")
  data_dir = root / "fashion"
  data_dir.mkdir()
  rng = np.random.default_rng(0)
  prototypes = rng.integers(0, 256, (10, 28, 28))
  for split, n, stems in (
      ("train", 1200, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
      ("test", 500, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))):
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    noise = rng.normal(0, 60, (n, 28, 28))
    images = np.clip(prototypes[labels] + noise, 0, 255)
    _write_idx(str(data_dir / (stems[0] + ".gz")), images)
    _write_idx(str(data_dir / (stems[1] + ".gz")), labels)

  saved_path, saved_modules = list(sys.path), set(sys.modules)
  sys.path.insert(0, EXPERIMENTS)
  scripts = {}
  for name in ("hinton_temperature", "method_comparison", "ensemble_born_again",
               "online_vs_offline"):
    spec = importlib.util.spec_from_file_location(
        f"_kdjax_experiment_{name}", os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scripts[name] = module
  yield {"root": root, "data_dir": str(data_dir), "scripts": scripts}
  sys.path[:] = saved_path
  for name in set(sys.modules) - saved_modules:
    if name in ("common", "fashion_mnist_kd", "fashion_mnist_teacher") or name.startswith("_kdjax_experiment_"):
      del sys.modules[name]


def _run(env, name, *extra):
  out = env["root"] / "out"
  argv = ["--smoke", "--data-dir", env["data_dir"], "--workdir",
          str(env["root"] / "work"), "--out-dir", str(out), *extra]
  payload = env["scripts"][name].main(argv)
  with open(out / f"{name}.json") as f:
    saved = json.load(f)
  with open(out / f"{name}.png", "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert saved["experiment"] == name
  # The teacher caches (which also store the images) are removed after a run.
  caches = env["root"] / "work" / "caches"
  assert not caches.exists() or not any(caches.iterdir())
  assert any((env["root"] / "work" / "teachers").glob("*.msgpack"))
  assert saved["command"].startswith(f"python experiments/{name}.py --smoke")
  return payload, saved


def _check_accuracy(values):
  values = np.asarray(values, np.float64)
  assert values.size and np.all(np.isfinite(values))
  assert np.all((values >= 0) & (values <= 1)), values


def test_hinton_temperature_smoke(env):
  payload, saved = _run(env, "hinton_temperature")
  assert [r["regime"] for r in saved["regimes"]] == ["full", "subset"]
  for regime in saved["regimes"]:
    assert list(regime["runs"]) == ["alone", "T=1", "T=4"]
    for runs in regime["runs"].values():
      _check_accuracy([r["accuracy"] for r in runs])
      _check_accuracy([r["agreement"] for r in runs])
    # The gain is paired by seed: distilled minus alone.
    s = regime["summary"]["T=4"]
    alone = regime["summary"]["alone"]["accuracy"]["mean"]
    assert s["gain"]["mean"] == pytest.approx(s["accuracy"]["mean"] - alone)
    assert "| student alone" in saved["tables"][regime["regime"]]
  assert 0.0 <= payload["teacher"]["accuracy"] <= 1.0


def test_method_comparison_smoke(env):
  names = ["ce", "kd", "fitnets", "crd", "mean_teacher"]
  _, saved = _run(env, "method_comparison", "--methods", *names)
  assert list(saved["summary"]) == names
  assert saved["summary"]["fitnets"]["teacher"] == "online"   # reads block_1
  assert saved["summary"]["crd"]["teacher"] == "cache"        # penultimate only
  assert saved["summary"]["kd"]["teacher"] == "cache"
  assert saved["summary"]["mean_teacher"]["teacher"] == "EMA of student"
  assert saved["summary"]["crd"]["changed"] == {"nce_k": 64}
  for name in names:
    _check_accuracy([r["accuracy"] for r in saved["runs"][name]])
  assert saved["summary"]["ce"]["gain_vs_ce"] is None
  kd = saved["summary"]["kd"]
  assert kd["gain_vs_ce"]["mean"] == pytest.approx(
      kd["accuracy"]["mean"] - saved["summary"]["ce"]["accuracy"]["mean"])


def test_method_comparison_rejects_unknown_method(env):
  with pytest.raises(ValueError, match="known methods"):
    env["scripts"]["method_comparison"].main(
        ["--smoke", "--methods", "kd", "not_a_method", "--workdir",
         str(env["root"] / "work")])


def test_ensemble_born_again_refuses_the_single_artifact_teacher(env):
  argv = ["--smoke", "--teacher", "artifact", "--data-dir", env["data_dir"],
          "--workdir", str(env["root"] / "work"),
          "--out-dir", str(env["root"] / "refused")]
  with pytest.raises(SystemExit, match="trains its own teachers"):
    env["scripts"]["ensemble_born_again"].main(argv)
  assert not (env["root"] / "refused" / "ensemble_born_again.json").exists()


def test_ensemble_born_again_smoke(env):
  _, saved = _run(env, "ensemble_born_again")
  ens = saved["ensemble"]
  assert len(ens["teachers"]) == 3
  assert ens["best_teacher"] == max(ens["teachers"], key=lambda t: t["accuracy"])["name"]
  _check_accuracy([ens["ensemble_accuracy"]])
  for regime in ("subset", "full"):
    runs = ens["runs"][regime]
    assert len(runs) == 3 and "student alone" in runs
    for rs in runs.values():
      _check_accuracy([r["accuracy"] for r in rs])
    ban = saved["born_again"]["runs"][regime]
    assert len(ban[0]["accuracy"]) == 3     # generation 0 + 2 generations
    _check_accuracy(ban[0]["accuracy"] + [ban[0]["bane_accuracy"]])
  assert saved["born_again"]["hparams"]["temperature"] == 1.0


def test_online_vs_offline_smoke(env):
  _, saved = _run(env, "online_vs_offline")
  summary = saved["summary"]
  online = summary["online (teacher forward each step)"]
  full = summary["offline, cached full logits"]
  top2 = summary["offline, cached top-2 + tail"]
  # The cache holds the online teacher's logits: the offline student follows
  # the online one (same init, batches and order).
  run_online = saved["runs"]["online (teacher forward each step)"][0]
  run_full = saved["runs"]["offline, cached full logits"][0]
  assert run_full["same_predictions_as_online"] >= 0.99
  assert run_full["max_abs_logit_diff_vs_online"] < 1e-2
  assert abs(run_full["accuracy"] - run_online["accuracy"]) <= 0.01
  assert online["cache_build_s"] is None and full["cache_build_s"] > 0
  # 4 bytes per logit; top-k: 8 bytes per kept entry + 4 for the logsumexp.
  assert full["teacher_outputs_mb"] == pytest.approx(512 * 10 * 4 / 2**20)
  assert top2["teacher_outputs_mb"] == pytest.approx(512 * 20 / 2**20)
  _check_accuracy([top2["accuracy"]["mean"] / 100])
  for s in summary.values():
    assert s["step_ms"] > 0 and s["time_s"] > 0


def test_lm_distill_tiny(tmp_path):
  """The LM experiment end to end at --tiny size (a subprocess, ~25 s)."""
  import subprocess
  out = tmp_path / "lm.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(EXPERIMENTS, "lm_distill.py"), "--tiny",
       "--seeds", "0", "--json", str(out)],
      capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())["results"]["0"]
  for name in ("teacher", "student alone", "token KD", "on-policy GKD"):
    assert np.isfinite(result[name]["ppl"]) and result[name]["ppl"] > 1.0
  assert result["teacher"]["kl_to_teacher"] == 0.0
  # Distillation moves the student towards the teacher even at this size.
  assert (result["token KD"]["kl_to_teacher"]
          < result["student alone"]["kl_to_teacher"])
  assert "held-out ppl" in proc.stdout


def test_lm_cross_tokenizer_tiny(tmp_path):
  """The ULD cross-tokenizer experiment end to end at --tiny size (~25 s)."""
  import subprocess
  out = tmp_path / "uld.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(EXPERIMENTS, "lm_cross_tokenizer.py"),
       "--tiny", "--seeds", "0", "--json", str(out)],
      capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  payload = json.loads(out.read_text())
  result = payload["results"]["0"]
  assert payload["bytes_per_student_token"] > 1.0  # the student's tokens merge bytes
  for name in ("student alone", "CE + ULD"):
    assert 0.0 < result[name]["bits_per_byte"] < 8.0
  # The ULD term pulls the student's sorted distribution towards the teacher's.
  assert (result["CE + ULD"]["uld_to_teacher"]
          < result["student alone"]["uld_to_teacher"])


def test_main_job_smoke(env, tmp_path):
  """The main job end to end (2-epoch teacher, tiny students): table, JSON, PNG."""
  import fashion_mnist_kd  # pylint: disable=g-import-not-at-top
  out_json, out_png = tmp_path / "main.json", tmp_path / "main.png"
  payload = fashion_mnist_kd.main(
      ["--smoke", "--schedules", "--no-progress", "--data-dir", env["data_dir"],
       "--workdir", str(tmp_path / "work"), "--json", str(out_json),
       "--png", str(out_png)])
  with open(out_json) as f:
    saved = json.load(f)
  runs = {(r["regime"].split(" (")[0], r["run"]) for r in saved["rows"]}
  assert ("full", "alone") in runs and ("full", "distilled") in runs
  assert {("full", f"distilled, w {s}") for s in ("linear", "cosine", "step")} <= runs
  for row in saved["rows"]:
    _check_accuracy(row["accuracy"])
    assert len(row["accuracy"]) == 2  # two seeds
    if row["run"] != "alone":
      alone = next(r for r in saved["rows"] if r["regime"] == row["regime"]
                   and r["run"] == "alone")
      gains = 100 * (np.asarray(row["accuracy"]) - np.asarray(alone["accuracy"]))
      np.testing.assert_allclose(row["gain"]["per_seed"], gains, atol=1e-9)
  assert saved["student"]["flops_per_example"] * 5 < saved["teacher"]["flops_per_example"]
  assert saved["student"]["params"] * 5 < saved["teacher"]["params"]
  with open(out_png, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  assert payload["table"].startswith("| training set |")


def test_main_job_defaults_are_the_validation_choice(env):
  """The main job's defaults are what fashion_mnist_select.py chose (its JSON)."""
  import fashion_mnist_kd  # pylint: disable=g-import-not-at-top
  with open(os.path.join(EXPERIMENTS, "results", "fashion_mnist_select.json")) as f:
    saved = json.load(f)
  d = fashion_mnist_kd.DEFAULTS
  assert saved["teacher_fingerprint"] == json.loads(open(os.path.join(
      EXPERIMENTS, "teacher", "teacher.json")).read())["fingerprint"]
  for regime in ("full", "subset"):
    choice = saved["choice"][f"{regime}/{d['student']}"]
    assert d[regime]["alone_epochs"] == choice["alone_epochs"]
    assert d[regime]["epochs"] == choice["kd"]["epochs"]
    assert d[regime]["temperature"] == choice["kd"]["temperature"]
    assert d[regime]["kd_weight"] == choice["kd"]["kd_weight"]
  # The choice is the best validation mean of the rows it was chosen from.
  rows = saved["regimes"][f"full/{d['student']}"]["rows"]
  best_kd = max((r for r in rows if r["run"] == "kd"), key=lambda r: r["mean"])
  assert best_kd["epochs"] == d["full"]["epochs"]


def test_select_smoke(env, tmp_path):
  """fashion_mnist_select.py end to end on a smoke teacher: a choice per regime."""
  import fashion_mnist_kd  # pylint: disable=g-import-not-at-top
  import fashion_mnist_select  # pylint: disable=g-import-not-at-top
  work = tmp_path / "work"
  fashion_mnist_kd.main(["--smoke", "--no-schedules", "--no-progress",
                         "--seeds", "0", "--data-dir", env["data_dir"],
                         "--workdir", str(work), "--json", "", "--png", ""])
  out = tmp_path / "select.json"
  payload = fashion_mnist_select.main(
      ["--data-dir", env["data_dir"], "--teacher-dir", str(work / "teacher"),
       "--max-train", "1024", "--seeds", "0", "--temperatures", "2",
       "--kd-weights", "0.5", "0.9", "--full-epochs", "1", "2",
       "--subset-size", "256", "--subset-epochs", "1", "2", "--no-progress",
       "--out", str(out)])
  saved = json.loads(out.read_text())
  assert set(saved["choice"]) == {"full/mlp128", "subset/mlp128"}
  for key, choice in saved["choice"].items():
    rows = saved["regimes"][key]["rows"]
    kd_rows = [r for r in rows if r["run"] == "kd"]
    assert max(r["mean"] for r in kd_rows) == pytest.approx(choice["kd_val"])
    alone = [r for r in rows if r["run"] == "alone"]
    assert max(r["mean"] for r in alone) == pytest.approx(choice["alone_val"])
    assert {r["epochs"] for r in alone} == {1, 2}
  assert payload["choice"] == saved["choice"]


def test_committed_teacher_artifact_verifies(env):  # env: experiments/ on sys.path
  """The committed teacher loads, its fingerprint matches, and it is >= 93%."""
  import fashion_mnist_teacher as ft  # pylint: disable=g-import-not-at-top
  teacher = ft.load_teacher()
  assert teacher["meta"]["test_accuracy"] >= 0.93
  assert teacher["meta"]["recipe"] == ft.TEACHER_RECIPE


def test_teacher_artifact_mismatch_says_how_to_rebuild(env, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  import fashion_mnist_teacher as ft  # pylint: disable=g-import-not-at-top
  art = tmp_path / "teacher"
  shutil.copytree(ft.DEFAULT_ARTIFACT, art)
  meta = json.loads((art / "teacher.json").read_text())
  meta["fingerprint"] = "sha256:" + "0" * 64
  (art / "teacher.json").write_text(json.dumps(meta))
  with pytest.raises(ft.TeacherArtifactError, match="--retrain-teacher"):
    ft.load_teacher(str(art))
  meta["recipe"] = {**meta["recipe"], "epochs": 3}
  (art / "teacher.json").write_text(json.dumps(meta))
  with pytest.raises(ft.TeacherArtifactError, match="epochs: 3"):
    ft.load_teacher(str(art))
  with pytest.raises(ft.TeacherArtifactError, match="no teacher artifact"):
    ft.load_teacher(str(tmp_path / "missing"))
