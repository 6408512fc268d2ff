"""Crash tests of kdjax.checkpoint, in subprocesses running tests/checkpoint/_worker.py.

* a run SIGKILLed right after a save resumes bit-exactly (params, optimizer
  state, loss state, EMA, RNG and every logged loss equal to a straight run);
* a run killed in the middle of writing a step keeps the previous step, which
  is the one restored, and the run still ends bit-exactly;
* a state saved on 8 simulated devices restores on 1, and back on 8, with
  equal values and the requested shardings.

The subprocesses share a persistent compilation cache (same programs, less
compile time on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")
STEPS, SAVE_EVERY = 12, 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _env(cache_dir: str, devices: int = 1) -> dict:
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      "PYTHONPATH": REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""),
      "JAX_COMPILATION_CACHE_DIR": cache_dir,
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  })
  return env


def _run(cache_dir, *args, devices=1, timeout=300) -> str:
  proc = subprocess.run([sys.executable, WORKER, *map(str, args)],
                        capture_output=True, text=True, timeout=timeout,
                        env=_env(cache_dir, devices), cwd=REPO_ROOT)
  if proc.returncode != 0:
    raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout}\n"
                         f"{proc.stderr[-5000:]}")
  return proc.stdout


def _run_until_then_kill(cache_dir, marker: str, *args, timeout=300) -> str:
  """Starts the worker, SIGKILLs it as soon as it prints ``marker``."""
  proc = subprocess.Popen([sys.executable, WORKER, *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=_env(cache_dir), cwd=REPO_ROOT)
  timer = threading.Timer(timeout, proc.kill)  # never hang the suite
  timer.start()
  seen, killed = [], False
  try:
    for line in proc.stdout:
      seen.append(line)
      if line.strip() == marker:
        os.kill(proc.pid, signal.SIGKILL)
        killed = True
        break
  finally:
    timer.cancel()
    if not killed:
      proc.kill()
    proc.wait(timeout=60)
  assert seen and seen[-1].strip() == marker, f"never saw {marker!r}: {seen}"
  assert proc.returncode == -signal.SIGKILL, proc.returncode
  return "".join(seen)


def _read_log(path) -> list[tuple[int, str]]:
  with open(path) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _committed_steps(directory) -> list[int]:
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _assert_bitwise_equal(a_path, b_path):
  a, b = np.load(a_path), np.load(b_path)
  assert sorted(a.files) == sorted(b.files)
  for name in a.files:
    x, y = a[name], b[name]
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert x.tobytes() == y.tobytes(), f"leaf {name} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
  """An uninterrupted run of STEPS steps: (log, final state npz)."""
  d = tmp_path_factory.mktemp("straight")
  out = _run(cache_dir, "train", "--dir", d / "ckpt", "--steps", STEPS,
             "--save-every", SAVE_EVERY, "--log", d / "log.jsonl",
             "--out", d / "final.npz")
  assert "RESTORED" not in out
  log = _read_log(d / "log.jsonl")
  assert [s for s, _ in log] == list(range(1, STEPS + 1))
  return dict(log), d / "final.npz"


def _merge_logs(first, second) -> dict:
  merged = dict(first)
  for step, loss in second:
    if step in merged:  # the killed run got past the checkpoint: replayed
      assert merged[step] == loss, f"replayed step {step} logged another loss"
    merged[step] = loss
  return merged


def test_sigkill_after_save_resumes_bit_exactly(straight, tmp_path, cache_dir):
  straight_log, straight_final = straight
  ckpt = tmp_path / "ckpt"
  _run_until_then_kill(cache_dir, "SAVED 6", "train", "--dir", ckpt,
                       "--steps", STEPS, "--save-every", SAVE_EVERY,
                       "--log", tmp_path / "log1.jsonl",
                       "--out", tmp_path / "unused.npz", "--kill-after", 6)
  assert _committed_steps(ckpt) == [3, 6]
  assert not (tmp_path / "unused.npz").exists()
  out = _run(cache_dir, "train", "--dir", ckpt, "--steps", STEPS,
             "--save-every", SAVE_EVERY, "--log", tmp_path / "log2.jsonl",
             "--out", tmp_path / "final.npz")
  assert "RESTORED 6" in out
  second = _read_log(tmp_path / "log2.jsonl")
  assert second[0][0] == 7
  assert _merge_logs(_read_log(tmp_path / "log1.jsonl"), second) == straight_log
  _assert_bitwise_equal(tmp_path / "final.npz", straight_final)


def test_kill_during_write_keeps_previous_step(straight, tmp_path, cache_dir):
  straight_log, straight_final = straight
  ckpt = tmp_path / "ckpt"
  _run_until_then_kill(cache_dir, "WRITING 6", "train", "--dir", ckpt,
                       "--steps", STEPS, "--save-every", SAVE_EVERY,
                       "--log", tmp_path / "log1.jsonl",
                       "--out", tmp_path / "unused.npz", "--hang-at", 6)
  # Step 6 was being written (its temporary directory holds data) when the
  # process died; step 3 is the latest complete one.
  names = os.listdir(ckpt)
  partial = [n for n in names if n.startswith("6.")]
  assert partial and "6" not in names, names
  assert any(files for _, _, files in os.walk(ckpt / partial[0]))
  assert _committed_steps(ckpt) == [3]

  from kdjax import checkpoint as kc  # pylint: disable=g-import-not-at-top
  with kc.DistillCheckpointer(ckpt) as manager:
    assert manager.latest_step() == 3
    assert manager.read_meta(3)["step"] == 3

  out = _run(cache_dir, "train", "--dir", ckpt, "--steps", STEPS,
             "--save-every", SAVE_EVERY, "--log", tmp_path / "log2.jsonl",
             "--out", tmp_path / "final.npz")
  assert "RESTORED 3" in out
  # The half-written step 6 was cleaned up and written again.
  assert not [n for n in os.listdir(ckpt) if ".orbax-checkpoint-tmp" in n]
  assert _committed_steps(ckpt)[-1] == STEPS
  merged = _merge_logs(_read_log(tmp_path / "log1.jsonl"),
                       _read_log(tmp_path / "log2.jsonl"))
  assert merged == straight_log
  _assert_bitwise_equal(tmp_path / "final.npz", straight_final)


def test_restore_across_8_1_8_devices(tmp_path, cache_dir):
  d = tmp_path
  _run(cache_dir, "layout", "--phase", "save8", "--devices", 8,
       "--dir", d / "run8", "--out", d / "saved8.npz",
       "--report", d / "r0.json", devices=8)
  _run(cache_dir, "layout", "--phase", "restore1", "--devices", 1,
       "--src", d / "run8", "--dir", d / "run1", "--out", d / "restored1.npz",
       "--out2", d / "saved1.npz", "--export", d / "export1",
       "--report", d / "r1.json", devices=1)
  _run(cache_dir, "layout", "--phase", "restore8", "--devices", 8,
       "--src", d / "run1", "--out", d / "restored8.npz",
       "--out2", d / "teacher8.npz", "--export", d / "export1",
       "--report", d / "r2.json", devices=8)
  r1 = json.loads((d / "r1.json").read_text())
  r2 = json.loads((d / "r2.json").read_text())
  assert r1["step"] == 2 and r1["num_devices"] == [1]
  assert r2["step"] == 4 and r2["num_devices"] == [8]
  assert r2["sharded_leaves"] > 10  # kernels, moments, EMA split over 8 devices
  assert r2["teacher_devices"] == [8]
  _assert_bitwise_equal(d / "restored1.npz", d / "saved8.npz")
  _assert_bitwise_equal(d / "restored8.npz", d / "saved1.npz")
  # The exported student (restored as a teacher, replicated on 8 devices)
  # holds exactly the student params of step 4.
  teacher, saved = np.load(d / "teacher8.npz"), np.load(d / "saved1.npz")
  params = [k for k in saved.files if k.startswith(".params")]
  assert params
  for key in params:
    t_key = "['params']" + key[len(".params"):]
    assert teacher[t_key].tobytes() == saved[key].tobytes(), key
