"""Agreement of the processes of a multi-process run (no-ops with one process).

Every process calls ``save`` and ``restore`` with the same arguments; these
collectives check that the processes agree on what is written
(:func:`check_processes_agree`), gather what differs by design (each
process's data position, :func:`allgather_text`) and combine the processes'
restore outcomes (:func:`worst_outcome`), so that all take the same decision.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def allgather_host(value: np.ndarray) -> np.ndarray:
  """``[process_count, *value.shape]``: every process's ``value`` (collective)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def allgather_text(text: str) -> list[str]:
  """Every process's ``text``, by process index (collective)."""
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = allgather_host(np.asarray([data.size], np.int32))[:, 0]
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[:data.size] = data
  rows = allgather_host(padded)
  return [bytes(row[:n]).decode() for row, n in zip(rows, lengths)]


def barrier(name: str) -> None:
  if is_multiprocess():
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"kdjax.checkpoint:{name}")


def _digest_words(value: Any) -> np.ndarray:
  text = json.dumps(value, sort_keys=True, default=str).encode()
  return np.frombuffer(hashlib.sha256(text).digest(), np.uint32).copy()


def check_processes_agree(value: Any, what: str) -> None:
  """Raises ValueError on every process if ``value`` differs across them."""
  if not is_multiprocess():
    return
  rows = allgather_host(_digest_words(value))
  differ = [i for i in range(rows.shape[0]) if not np.array_equal(rows[i],
                                                                   rows[0])]
  if differ:
    raise ValueError(f"the processes disagree on the {what}: processes "
                     f"{differ} differ from process 0 (pass the same config, "
                     "teacher, extra and step on every process).")


# The outcome of restoring a step on one process, worst last.
OK, CORRUPTED, FAILED = 0, 1, 2


def worst_outcome(local: int) -> int:
  """The worst of every process's outcome code (collective)."""
  if not is_multiprocess():
    return local
  return int(allgather_host(np.asarray([local], np.int32)).max())
