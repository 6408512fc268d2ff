"""Exit statuses of the ``kdjax`` command line and the errors that select them.

======  ==================================================================
status  meaning
======  ==================================================================
0       success
1       a failure during a run: a NaN/inf, a corrupt or mismatched
        checkpoint or teacher cache, an unreadable data file, a value a loss
        rejects, anything unexpected (one line; ``KDJAX_TRACEBACK=1`` adds
        the traceback; an unexpected error prints its traceback)
2       a usage or config error, fixable before the run starts: a bad
        argument, an unknown config key or method, bad YAML, a missing config
        file, teacher run, teacher cache, run directory or data directory, a
        malformed or too long data row (file and line named), an impossible
        batch size, a missing optional package (one line, no traceback)
130     interrupted by SIGINT (Ctrl-C); training saved a checkpoint first
143     stopped by SIGTERM; training saved a checkpoint first
======  ==================================================================

:func:`kdjax.cli.main.exit_status` maps an exception to its status. kdjax's
error classes carry it as a class attribute ``exit_code``
(:func:`exit_code_of`): :class:`UsageError` and its subclasses (``ConfigError``
among them) 2; :class:`RunError` and the library's errors of state on disk
(``kdjax.checkpoint.CheckpointError``, ``kdjax.cache.CacheMismatchError``,
``kdjax.data.DataError``) 1. Python's own: ``FileNotFoundError`` and the other
path errors, ``ImportError``: 2; the rest: 1. An exception raised inside
:func:`during_run` (the training loop) is always a failure during the run (1).
This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# The attribute :func:`during_run` sets on the exceptions it lets through.
DURING_RUN_ATTR = "kdjax_during_run"


class UsageError(Exception):
  """A problem the user fixes before the run starts (exit status 2).

  Raise it (or a subclass) for a bad command-line argument, a missing input
  path, or a value that makes the run impossible; its message is printed as
  one line, without a traceback, and should say how to fix it.
  """
  exit_code: int = EXIT_USAGE


class MissingRunError(UsageError, FileNotFoundError):
  """A run directory, teacher run, teacher cache or checkpoint to read is
  missing (e.g. distilling before ``kdjax train-teacher``)."""


class MissingDataError(UsageError, FileNotFoundError):
  """The configured data directory or data file does not exist."""


class BadRowError(UsageError, ValueError):
  """A row of the data that cannot be used (malformed, a field missing, a
  prompt longer than ``data.seq_len``), found before the run starts: the
  message names its file and line and the key to change (e.g.
  ``data.on_error=skip``). (An unreadable data file found while training is
  ``kdjax.data.DataError``, status 1.)"""


class BatchSizeError(UsageError, ValueError):
  """A batch size the data or devices cannot serve: larger than the dataset
  (or a process's shard), or not divisible by the number of devices."""


class MissingDependencyError(UsageError, ImportError):
  """An optional package the command needs is not installed (e.g.
  matplotlib for ``kdjax report``)."""


class RunError(Exception):
  """A failure during a run (exit status 1), e.g. a loss that turned NaN."""
  exit_code: int = EXIT_FAILURE


def exit_code_of(exc: BaseException) -> Optional[int]:
  """The exit status that ``exc``'s class declares (``exit_code``), or None.

  The library's error classes (``kdjax.checkpoint.CheckpointError``, ...)
  carry one too; reading it needs no import of their modules (which import
  JAX), so the error path of the command line stays light.
  """
  code = getattr(type(exc), "exit_code", None)
  return code if isinstance(code, int) else None


@contextlib.contextmanager
def during_run() -> Iterator[None]:
  """Marks the exceptions raised inside as failures during the run.

  Wrap the training loop in it: a ``FileNotFoundError`` (a checkpoint file
  vanished), even a :class:`UsageError`, raised once steps run then exits
  with status 1, not 2. ``KeyboardInterrupt`` and ``SystemExit`` pass
  unmarked.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    try:
      setattr(e, DURING_RUN_ATTR, True)
    except AttributeError:  # an exception type with __slots__
      pass
    raise


def raised_during_run(exc: BaseException) -> bool:
  """Whether ``exc`` (or an exception it was raised from) left
  :func:`during_run`."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    if getattr(exc, DURING_RUN_ATTR, False):
      return True
    seen.add(id(exc))
    exc = exc.__cause__ or exc.__context__
  return False
