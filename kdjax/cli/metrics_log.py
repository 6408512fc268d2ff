"""Metrics of a run: ``metrics.jsonl`` and TensorBoard event files.

Each record of ``metrics.jsonl`` is one JSON object ``{"step": int, "split":
"train" | "eval", "time": seconds since the run (re)started, name: value,
...}``. The same values go to TensorBoard (tensorboardX, no TensorFlow) under
``<split>/<name>`` in ``<run>/tb``.

A resumed run first drops the records written after its checkpoint (they are
written again) and opens the event writer with ``purge_step`` set to it, so
TensorBoard discards the stale events too.

Train records average the steps of one window, ``(k - 1) * log_every <
step <= k * log_every`` (:class:`kdjax.train.MetricsWindow`, summed by
:func:`kdjax.train.run_loop`). A checkpoint saved inside a window carries the
window's sums, so a run interrupted there and resumed writes the same records
as an uninterrupted one, except for the wall-clock fields ``time`` and
``samples_per_s``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_metrics(run_dir: str) -> list[dict]:
  """The records of ``<run_dir>/metrics.jsonl`` (``[]`` if none)."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          continue  # a line cut by a crash
  return records


def _import_summary_writer() -> type:
  """``tensorboardX.SummaryWriter``, imported without boto3.

  tensorboardX imports boto3 when it is installed (~0.4 s of start-up) only to
  offer ``s3://`` log directories; kdjax writes its event files into the local
  run directory. So, unless boto3 or tensorboardX is already imported,
  tensorboardX is imported with ``sys.modules["boto3"] = None`` (Python's
  marker for "this import fails"), which tensorboardX reads as "no S3
  support"; the marker is removed right after, so boto3 stays importable.

  Raises:
    ImportError: tensorboardX is not installed.
  """
  masked = "boto3" not in sys.modules and "tensorboardX" not in sys.modules
  if masked:
    sys.modules["boto3"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if masked and "boto3" in sys.modules and sys.modules["boto3"] is None:
      del sys.modules["boto3"]
  return SummaryWriter


class MetricsLogger:
  """Appends records to ``metrics.jsonl`` and TensorBoard event files.

  Args:
    run_dir: the run directory.
    start_step: the step the run (re)starts from; records with a larger step
      are dropped (a resumed run writes them again).
    tensorboard: write event files (needs ``tensorboardX``; without it a
      note is printed once and only ``metrics.jsonl`` is written).
  """

  def __init__(self, run_dir: str, start_step: int = 0,
               tensorboard: bool = True):
    self._path = os.path.join(run_dir, METRICS_FILE)
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= start_step]
    with open(self._path + ".tmp", "w") as f:
      for r in kept:
        f.write(json.dumps(r) + "\n")
    os.replace(self._path + ".tmp", self._path)
    self._file = open(self._path, "a")
    self._t0 = time.perf_counter()
    self._writer = None
    if tensorboard:
      try:
        SummaryWriter = _import_summary_writer()  # pylint: disable=invalid-name
      except ImportError:
        print("note: tensorboardX is not installed; writing metrics.jsonl "
              "only (pip install tensorboardX for TensorBoard event files).",
              file=sys.stderr)
      else:
        self._writer = SummaryWriter(
            os.path.join(run_dir, TB_DIR),
            purge_step=start_step if start_step else None)

  def log(self, step: int, split: str, values: Mapping[str, Any]) -> dict:
    """Writes one record; returns it."""
    record = {"step": int(step), "split": split,
              "time": round(time.perf_counter() - self._t0, 4)}
    for name, value in values.items():
      value = float(value)
      record[name] = value if math.isfinite(value) else str(value)
      if self._writer is not None:
        self._writer.add_scalar(f"{split}/{name}", value, int(step))
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    return record

  def close(self) -> None:
    self._file.close()
    if self._writer is not None:
      self._writer.close()
