"""The train metrics of one log window, summed on the device."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def _add(running: dict, metrics: dict) -> dict:
  """``running + metrics`` leaf by leaf, in one dispatch (not one a metric)."""
  return jax.tree.map(jnp.add, running, metrics)


class MetricsWindow:
  """The train metrics of the steps since the last record, summed on device.

  ``add`` sums each step's metrics (a flat ``{name: scalar}``) without a
  device sync; ``means`` fetches them once per record. ``steps`` counts the
  window's steps, ``local_steps`` those run by this process (a window
  restored from a checkpoint holds steps of the interrupted run), for the
  throughput and the progress bar. ``to_json``/``from_json`` carry the sums
  bit-exactly through a checkpoint, so that a run resumed inside a window
  logs the record an uninterrupted run logs.
  """

  def __init__(self):
    self.sums: Optional[dict] = None
    self.steps = 0
    self.local_steps = 0

  def add(self, metrics: Mapping[str, Any]) -> None:
    """Adds one step's metrics (device arrays) to the sums."""
    metrics = dict(metrics)
    self.sums = metrics if self.sums is None else _add(self.sums, metrics)
    self.steps += 1
    self.local_steps += 1

  def means(self) -> dict[str, float]:
    """``{name: sum / steps}`` as Python floats (one device fetch)."""
    return {k: float(v) / self.steps
            for k, v in jax.device_get(self.sums).items()}

  def reset(self) -> None:
    """Empties the window (after a record)."""
    self.sums, self.steps, self.local_steps = None, 0, 0

  def to_json(self) -> dict:
    """The sums, bit-exact (``float.hex`` of each value, with its dtype)."""
    sums = {}
    for name, value in jax.device_get(self.sums or {}).items():
      value = np.asarray(value)
      sums[name] = {"dtype": value.dtype.name, "shape": list(value.shape),
                    "hex": [float(x).hex() for x in value.ravel()]}
    return {"steps": self.steps, "sums": sums}

  @classmethod
  def from_json(cls, data: Optional[Mapping[str, Any]]) -> "MetricsWindow":
    """The window of :meth:`to_json` (empty for ``None`` or no steps)."""
    window = cls()
    if not data or not data.get("steps"):
      return window
    window.steps = int(data["steps"])
    window.sums = {
        name: jnp.asarray(np.asarray([float.fromhex(x) for x in v["hex"]],
                                     np.dtype(v["dtype"])).reshape(v["shape"]))
        for name, v in data["sums"].items()}
    return window
