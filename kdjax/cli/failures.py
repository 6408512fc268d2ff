"""How a command's exception reaches the user: one line and an exit status.

:func:`exit_status` maps an exception to the process's status (the classes of
:mod:`kdjax.cli.errors` carry theirs); :func:`report_error` prints it in one
line (``KDJAX_TRACEBACK=1`` adds the traceback). Used by ``main.py`` and by
the commands that run part of their work in a child process (``kdjax lm
plan``). Imports no JAX.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

from kdjax.cli import errors
from kdjax.cli.config.base import ConfigError

# Python's errors that are fixable before the run starts: a path the user
# gave (a run directory, teacher run or cache, data directory or file, an
# export target) or a package to install. kdjax's own errors carry their
# status (``exit_code``: ConfigError and the other UsageErrors 2).
_USAGE_TYPES = (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                FileExistsError, ImportError)

# Checks during a run (a value a loss rejects, a shape, a NaN): one line, as
# for kdjax's errors whose class declares a failure (``exit_code`` 1).
_ONE_LINE_TYPES = (ValueError, TypeError, KeyError, FloatingPointError)


def exit_status(exc: BaseException) -> int:
  """The exit status of a command that raised ``exc`` (:mod:`kdjax.cli.errors`).

  Anything raised inside :func:`kdjax.cli.errors.during_run` is a failure
  during the run (1); else the ``exit_code`` that kdjax's error classes carry
  (:func:`kdjax.cli.errors.exit_code_of`: 2 for a config error or another
  :class:`~kdjax.cli.errors.UsageError`, 1 for a corrupt or mismatched
  checkpoint or cache, an unreadable data file, a
  :class:`~kdjax.cli.errors.RunError`); 2 for a missing path or package; 1
  for anything else; 130 for an interrupt.
  """
  if isinstance(exc, KeyboardInterrupt):
    return errors.EXIT_SIGINT
  if isinstance(exc, SystemExit):
    return exc.code if isinstance(exc.code, int) else errors.EXIT_USAGE
  if errors.raised_during_run(exc):
    return errors.EXIT_FAILURE
  code = errors.exit_code_of(exc)
  if code is not None:
    return code
  if isinstance(exc, _USAGE_TYPES):
    return errors.EXIT_USAGE
  return errors.EXIT_FAILURE


def _one_line(exc: BaseException) -> str:
  """``exc``'s message on one line (JAX's traceback-filtering note cut)."""
  text = str(exc)
  if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
    text = exc.args[0]  # str(KeyError) quotes its message
  return " ".join(text.split("\n-----")[0].split())


def report_error(command: str, exc: Exception) -> Optional[int]:
  """Prints ``exc`` for the user in one line; returns the exit status.

  Usage and config errors print their message alone; kdjax's own checks
  during a run their type and message (``KDJAX_TRACEBACK=1`` prints the
  traceback first). Returns None for anything else: the caller re-raises it
  and Python prints its traceback (exit status 1).
  """
  status = exit_status(exc)
  if isinstance(exc, ConfigError):
    line = f"kdjax {command}: config error: {_one_line(exc)}"
  elif status == errors.EXIT_USAGE:
    line = f"kdjax {command}: error: {_one_line(exc)}"
  elif (isinstance(exc, _ONE_LINE_TYPES)
        or errors.exit_code_of(exc) == errors.EXIT_FAILURE):
    line = f"kdjax {command}: error: {type(exc).__name__}: {_one_line(exc)}"
    if not os.environ.get("KDJAX_TRACEBACK"):
      line += " (set KDJAX_TRACEBACK=1 for the traceback)"
  else:
    return None
  if os.environ.get("KDJAX_TRACEBACK"):
    traceback.print_exception(exc)
  print(line, file=sys.stderr)
  return status
