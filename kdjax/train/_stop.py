"""Stop requests: SIGINT/SIGTERM turned into a flag checked between steps."""

from __future__ import annotations

import signal
import threading
from typing import Optional


class StopRequest:
  """Turns SIGINT/SIGTERM into a flag the loop checks at each step boundary.

  Inside ``with StopRequest() as stop:`` a first SIGINT or SIGTERM sets
  ``stop.signum`` (the loop then saves a checkpoint and returns); a second
  SIGINT raises ``KeyboardInterrupt`` at once (to abort a stuck save). The
  previous handlers come back on exit. Outside the main thread (where Python
  cannot install signal handlers) it installs nothing and never fires.
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous: dict = {}

  @property
  def requested(self) -> bool:
    """Whether a stop was requested."""
    return self.signum is not None

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
