"""Metrics of a run: ``metrics.jsonl``, TensorBoard event files, a progress bar.

Each record of ``metrics.jsonl`` is one JSON object ``{"step": int, "split":
"train" | "eval", "time": seconds since the run (re)started, name: value,
...}``. The same values go to TensorBoard (tensorboardX, no TensorFlow) under
``<split>/<name>`` in ``<run>/tb``.

A resumed run first drops the records written after its checkpoint (they are
written again) and opens the event writer with ``purge_step`` set to it, so
TensorBoard discards the stale events too.

Train records average the steps of one window, ``(k - 1) * log_every <
step <= k * log_every`` (:class:`MetricsWindow`). A checkpoint saved inside a
window carries the window's sums (:meth:`MetricsWindow.to_json`), so a run
interrupted there and resumed writes the same records as an uninterrupted
one, except for the wall-clock fields ``time`` and ``samples_per_s``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Optional

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


class MetricsWindow:
  """The train metrics of the steps since the last record, summed on device.

  ``add`` sums each step's metrics (a flat ``{name: scalar}``) without a
  device sync; ``means`` fetches them once per record. ``steps`` counts the
  window's steps, ``local_steps`` those run by this process (a window
  restored from a checkpoint holds steps of the interrupted run), for the
  throughput and the progress bar.
  """

  def __init__(self):
    self.sums = None
    self.steps = 0
    self.local_steps = 0

  def add(self, metrics: Mapping[str, Any]) -> None:
    """Adds one step's metrics (device arrays) to the sums."""
    self.sums = (dict(metrics) if self.sums is None
                 else _add_sums(self.sums, dict(metrics)))
    self.steps += 1
    self.local_steps += 1

  def means(self) -> dict:
    """``{name: sum / steps}`` as Python floats (one device fetch)."""
    import jax  # pylint: disable=g-import-not-at-top
    return {k: float(v) / self.steps
            for k, v in jax.device_get(self.sums).items()}

  def reset(self) -> None:
    self.sums, self.steps, self.local_steps = None, 0, 0

  def to_json(self) -> dict:
    """The sums, bit-exact (``float.hex`` of each value, with its dtype)."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    sums = {}
    for name, value in jax.device_get(self.sums or {}).items():
      value = np.asarray(value)
      sums[name] = {"dtype": value.dtype.name, "shape": list(value.shape),
                    "hex": [float(x).hex() for x in value.ravel()]}
    return {"steps": self.steps, "sums": sums}

  @classmethod
  def from_json(cls, data: Optional[Mapping[str, Any]]) -> "MetricsWindow":
    """The window of :meth:`to_json` (empty for ``None`` or no steps)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    window = cls()
    if not data or not data.get("steps"):
      return window
    window.steps = int(data["steps"])
    window.sums = {
        name: jnp.asarray(np.asarray(
            [float.fromhex(x) for x in v["hex"]],
            jnp.dtype(v["dtype"])).reshape(v["shape"]))
        for name, v in data["sums"].items()}
    return window


def _add_sums(running: dict, metrics: dict) -> dict:
  """``running + metrics`` leaf by leaf, in one jitted call."""
  global _ADD_JIT
  if _ADD_JIT is None:
    import jax  # pylint: disable=g-import-not-at-top
    _ADD_JIT = jax.jit(lambda a, b: jax.tree.map(lambda x, y: x + y, a, b))
  return _ADD_JIT(running, metrics)


_ADD_JIT = None


class Progress:
  """A tqdm bar over the run's steps, updated when metrics are fetched.

  It shows the step, the steps/s rate, the ETA, and as postfix the last
  fetched loss and the throughput in samples/s.
  """

  def __init__(self, total: int, initial: int, desc: str, enabled: bool):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       dynamic_ncols=True, file=sys.stderr, leave=True)

  def update(self, steps: int, loss: float, samples_per_s: float) -> None:
    if self._bar is not None:
      self._bar.set_postfix({"loss": f"{loss:.4f}",
                             "samples/s": f"{samples_per_s:,.0f}"},
                            refresh=False)
      self._bar.update(steps)

  def write(self, text: str) -> None:
    if self._bar is not None:
      self._bar.write(text, file=sys.stdout)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
