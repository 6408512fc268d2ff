"""DistillCheckpointer with two processes (jax.distributed, gloo, 2 x 2 CPUs).

The state's arrays are sharded over a 4-device mesh spanning both processes
(see ``_mp_worker.py``). One pair of processes saves two steps; a fresh pair
restores them, then meets a flipped byte and an unreadable file in process
1's part of the newest step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import _mp_worker  # noqa: E402  (only its NumPy value generator is used here)

GOLDEN = 0x9E3779B1


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(phase: str, directory) -> list[dict]:
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "_mp_worker.py"), phase, str(port),
       str(i), str(directory)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{phase}: the two checkpoint workers timed out")
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]
  reports = []
  for i in range(2):
    with open(os.path.join(directory, f"{phase}_{i}.json")) as f:
      reports.append(json.load(f))
  return reports


def _reference_checksum(value: np.ndarray) -> int:
  """Independent NumPy version: sum_i u_i * ((i * golden) | 1) mod 2^32."""
  value = np.ascontiguousarray(value)
  words = value.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[
      value.dtype.itemsize]).reshape(-1).astype(np.uint64)
  index = np.arange(words.size, dtype=np.uint64)
  weights = ((index * GOLDEN) % 2**32) | 1
  return int(np.sum((words * weights) % 2**32) % 2**32)


def test_two_processes_save_restore_and_detect_corruption(tmp_path):
  saved = _run_pair("save", tmp_path)
  expected_sums = {name: _reference_checksum(value) for name, value in
                   _mp_worker.global_values(2).items()}
  for report in saved:
    assert report["saved"] == [True, True]
    # The global checksums of the sharded state (no all-gather: each device
    # sums its shard, one all-reduce adds them) match NumPy on the whole
    # arrays, on both processes; process 0 wrote them.
    assert report["checksums"] == expected_sums
    assert report["meta_checksums"] == expected_sums
    assert not report["checksum_all_gather"] and report["checksum_all_reduce"]
  assert sorted(os.listdir(tmp_path / "2" / "state" / "array_metadatas")) == [
      "process_0", "process_1"]

  restored = _run_pair("restore", tmp_path)
  for pid, report in enumerate(restored):
    assert report["steps"] == [1, 2]
    assert not report["fully_addressable"]
    # [step, addressable shards equal to the saved ones, own data position].
    assert report["latest"] == [2, True, 200 + pid, {"lr": 0.1}]
    assert report["step1"] == [1, True, 100 + pid]
    # A byte flipped in process 1's data file: both processes see the same
    # checksum failure, fall back to step 1, and step 2 is set aside once.
    assert report["error"] is not None
    assert report["error"][:2] == ["CheckpointCorruptedError", 2]
    assert "loss_state/bank" in report["error"][2]
    assert report["fallback"] == [1, [2], True, 100 + pid]
    assert report["after_quarantine"] == [[1], True]
    # Process 1's data file truncated: only process 1's read fails, both
    # processes still skip step 2 and restore step 1.
    assert report["unreadable"] == [1, [2], True, 100 + pid, [1]]
  assert restored[0]["error"] == restored[1]["error"]
  assert restored[0]["flipped"].startswith(
      str(tmp_path / "2" / "state" / "ocdbt.process_1"))
  assert sorted(os.listdir(tmp_path / "corrupted")) == ["2", "2.1"]
