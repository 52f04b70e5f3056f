"""Expected failures and how the command line reports them.

Every `gemscope` command ends an expected failure (a wrong flag, a missing
or malformed input, an output that would destroy something, a run that
cannot go on) with one line on stderr and an exit code that says which:

  0   done
  1   a bug: an unexpected exception, shown with its traceback
  2   USAGE   a flag, a --set / --config value or a config field is wrong
              (argparse's own errors use 2 as well)
  3   INPUT   an input file or folder is missing, unreadable, or not what
              it should be (format, architecture, shape)
  4   OUTPUT  an output cannot be written without destroying something
              (exists, is a file, is not empty) or cannot be written at all
              (read-only, no permission, disk full)
  5   RUN     the work itself stopped: diverged, no readable checkpoint,
              the multi-host runtime did not start
  130 interrupted (Ctrl-C); rerunning a train command resumes

Library code raises the classes below (each also a ValueError, OSError or
RuntimeError, so older `except` clauses still catch them); `exit_code`
also classifies the standard exceptions the package and its libraries
raise for bad input. Messages should name the file, field, flag or shape
and say what would be accepted. Hints that name an option use `option`,
which spells it as the user typed it: the flag under the command line,
the Python argument elsewhere.

Caveat: this module imports nothing of the package or beyond the standard
library; every layer may import it.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import traceback
from typing import Iterator

OK, BUG, USAGE, INPUT, OUTPUT, RUN, INTERRUPTED = 0, 1, 2, 3, 4, 5, 130


class GemscopeError(Exception):
  """An expected failure; `exit_code` is what the command line returns."""
  exit_code = BUG


class UsageError(GemscopeError, ValueError):
  """A flag, override or config field is wrong (names it and its type)."""
  exit_code = USAGE


class InputError(GemscopeError, ValueError):
  """An input file or folder is not what it should be (names it)."""
  exit_code = INPUT


class MissingInputError(InputError, FileNotFoundError):
  """An input file or folder does not exist (names it)."""
  exit_code = INPUT


class OutputError(GemscopeError, FileExistsError):
  """An output would clobber something, or cannot be written (names it)."""
  exit_code = OUTPUT


class RunError(GemscopeError, RuntimeError):
  """The work itself stopped (diverged, nothing to resume from, ...)."""
  exit_code = RUN


# Set while the command line runs a command: `option` then spells flags.
_COMMAND_LINE = contextvars.ContextVar("gemscope_command_line", default=False)


@contextlib.contextmanager
def command_line() -> Iterator[None]:
  """Messages raised inside name command-line flags (see `option`)."""
  token = _COMMAND_LINE.set(True)
  try:
    yield
  finally:
    _COMMAND_LINE.reset(token)


def option(python: str, flag: str) -> str:
  """How a hint names an option: `flag` ('--overwrite') under the command
  line, else `python` ('overwrite=True')."""
  return flag if _COMMAND_LINE.get() else python


# OSError numbers that mean "cannot write here" rather than "no such input".
_OUTPUT_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENOSPC, errno.EDQUOT, errno.EEXIST,
                            errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR})
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _raised_by_package(e: BaseException) -> bool:
  """Whether the innermost frame of `e`'s traceback is this package's."""
  frames = traceback.extract_tb(e.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(
      _PACKAGE_DIR + os.sep)


def exit_code(e: BaseException) -> int:
  """The exit code for `e`; BUG when it is not an expected failure.

  A ValueError (or TypeError) counts as bad input only when this package
  raised it: ours name the field or file, while one from deep inside a
  library (an einsum's shape message) means a check is missing, a bug.
  """
  if isinstance(e, GemscopeError):
    return e.exit_code
  if isinstance(e, KeyboardInterrupt):
    return INTERRUPTED
  if isinstance(e, (FileNotFoundError, NotADirectoryError)):
    # Writers turn these into OutputError for their outputs.
    return INPUT
  if isinstance(e, (FileExistsError, PermissionError)):
    return OUTPUT
  if isinstance(e, OSError):
    return OUTPUT if e.errno in _OUTPUT_ERRNOS else INPUT
  if isinstance(e, FloatingPointError):
    return RUN  # training.TrainingDiverged
  if isinstance(e, ValueError) and _raised_by_package(e):
    return USAGE
  return BUG


def one_line(e: BaseException) -> str:
  """`e`'s message on one line (an OSError's file name included)."""
  if isinstance(e, OSError) and not isinstance(e, GemscopeError) and \
      e.strerror:
    text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
  else:
    text = str(e) or type(e).__name__
  if isinstance(e, KeyError) and not isinstance(e, GemscopeError):
    text = f"missing key {text}"
  return " ".join(text.split())
