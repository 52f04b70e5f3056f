"""The one way gemscope writes files and folders: atomic, never clobbering.

Every writer goes through `atomic_path` (one file) or `atomic_dir` (a
folder of files), and commands check their destinations up front with
`check_file_output` / `check_dir_output` / `check_workdir`, before hours of
work rather than after. The rules:

- Nothing is written in place: a file or folder is built under a hidden
  temporary name (`.NAME.gemscope-HOST-PID-XXXX.partial`) and renamed into
  place when complete, so a killed writer never leaves something that
  looks finished.
- A destination that exists is refused unless `overwrite` is given; a
  folder that is a file (or a file that is a folder) always is.
- With `overwrite`, a folder writer replaces only what it owns (the names
  it writes and the patterns in `owns`, such as stale shards of an older
  export); anything else in the folder is left alone.
- Temporaries left by a killed writer (its process gone) are removed by
  the next writer of the same destination.

Errors are `errors.OutputError` (exit code 4), naming the path and, for
`overwrite`, the option as the user spells it (`--overwrite` on the
command line).

Caveat: replacing an existing folder with `overwrite` moves the new files
in one by one (each rename atomic); a writer killed in that moment leaves
old and new files side by side, which the next `--overwrite` run replaces.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import pathlib
import re
import shutil
import signal
import socket
import tempfile
from typing import Iterable, Iterator

from gemscope_jax import errors

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"
_TEMP = re.compile(r"^\..*gemscope-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-"
                   r"[^.]*\.partial$")


def _where(flag: str, path: pathlib.Path) -> str:
  """A destination as messages name it: with the flag that gave it."""
  return f"{flag} {path}" if flag else str(path)


def _temp_prefix(name: str) -> str:
  return f".{name}.gemscope-{_HOST}-{os.getpid()}-"


def _is_temp(name: str) -> bool:
  return _TEMP.match(name) is not None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  return True


def clean_stale(folder: str | os.PathLike) -> list[pathlib.Path]:
  """Removes temporaries in `folder` that a writer on this host left
  behind when it was killed (its process is gone); returns them."""
  folder = pathlib.Path(folder)
  removed = []
  try:
    entries = list(folder.iterdir())
  except OSError:
    return removed
  for entry in entries:
    m = _TEMP.match(entry.name)
    if not m or m["host"] != _HOST or _alive(int(m["pid"])):
      continue
    if entry.is_dir() and not entry.is_symlink():
      shutil.rmtree(entry, ignore_errors=True)
    else:
      entry.unlink(missing_ok=True)
    removed.append(entry)
  return removed


def _content(folder: pathlib.Path) -> list[str]:
  """What `folder` holds, without our own temporaries."""
  return sorted(p.name for p in folder.iterdir() if not _is_temp(p.name))


def _check_parent(path: pathlib.Path, flag: str) -> None:
  """The nearest existing ancestor of `path` is a writable folder."""
  parent = path.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise errors.OutputError(
        f"{_where(flag, path)}: {parent} is a file, not a folder")
  if not _writable(parent):
    raise errors.OutputError(f"{_where(flag, path)}: {parent} is not "
                             "writable (read-only or no permission)")


def _writable(folder: pathlib.Path) -> bool:
  """Whether a file can be created in `folder`: tried for real (a probe,
  removed at once), since permission bits do not tell root about a
  read-only disk."""
  if not os.access(folder, os.W_OK | os.X_OK):
    return False
  try:
    fd, probe = tempfile.mkstemp(prefix=_temp_prefix("probe"),
                                 suffix=".partial", dir=folder)
  except OSError:
    return False
  os.close(fd)
  os.unlink(probe)
  return True


def _overwrite_hint() -> str:
  return errors.option("overwrite=True", "--overwrite")


def check_file_output(path: str | os.PathLike, *, overwrite: bool = False,
                      flag: str = "") -> pathlib.Path:
  """Raises OutputError if `atomic_path(path, overwrite=...)` would refuse.

  Args:
    path: the file to write.
    overwrite: an existing file may be replaced.
    flag: how messages name the destination (the flag that gave it).
  """
  path = pathlib.Path(path)
  if path.is_dir():
    raise errors.OutputError(
        f"{_where(flag, path)}: is a folder; give a file name")
  if path.exists() and not overwrite:
    raise errors.OutputError(f"{_where(flag, path)}: already exists; pass "
                             f"{_overwrite_hint()} to replace it")
  if path.exists() and not _writable(path.parent):
    raise errors.OutputError(
        f"{_where(flag, path)}: {path.parent} is not writable")
  _check_parent(path, flag)
  return path


def check_dir_output(path: str | os.PathLike, *, overwrite: bool = False,
                     flag: str = "") -> pathlib.Path:
  """Raises OutputError if `atomic_dir(path, overwrite=...)` would refuse."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise errors.OutputError(
        f"{_where(flag, path)}: is a file; give a folder")
  if path.is_dir():
    held = _content(path)
    if held and not overwrite:
      shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
      raise errors.OutputError(
          f"{_where(flag, path)}: is not empty ({shown}); give a new or "
          f"empty folder, or pass {_overwrite_hint()} to replace what gemscope "
          "writes there (other files are kept)")
    if not _writable(path):
      raise errors.OutputError(f"{_where(flag, path)}: is not writable "
                               "(read-only or no permission)")
    return path
  _check_parent(path, flag)
  return path


def check_workdir(path: str | os.PathLike, *, flag: str = ""
                  ) -> pathlib.Path:
  """Creates the folder `path` if needed and checks that files can be
  written there (a probe file, removed): a workdir on a read-only disk or
  one that is a file fails here, not at the first checkpoint."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise errors.OutputError(
        f"{_where(flag, path)}: is a file; give a folder")
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=_temp_prefix("probe"),
                                 suffix=".partial", dir=path)
    os.close(fd)
    os.unlink(probe)
  except (FileExistsError, NotADirectoryError):
    raise errors.OutputError(
        f"{_where(flag, path)}: a parent of it is a file") from None
  except OSError as e:
    raise errors.OutputError(f"{_where(flag, path)}: cannot write there "
                             f"({e.strerror})") from None
  return path


def _mkdtemp(name: str, where: pathlib.Path, flag: str) -> pathlib.Path:
  try:
    return pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(name),
                                         suffix=".partial", dir=where))
  except OSError as e:
    raise errors.OutputError(f"{_where(flag, where)}: cannot write there "
                             f"({e.strerror})") from None


def _mkdirs(path: pathlib.Path, flag: str) -> None:
  try:
    path.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise errors.OutputError(
        f"{_where(flag, path)}: it or a parent of it is a file") from None
  except OSError as e:
    raise errors.OutputError(f"{_where(flag, path)}: cannot create it "
                             f"({e.strerror})") from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, overwrite: bool = True,
                flag: str = "") -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `target`; renames it there on success.

  The default `overwrite=True` is for files the package owns (caches, a
  workdir's logs); writers of a user's output pass the user's choice.
  """
  target = pathlib.Path(target)
  check_file_output(target, overwrite=overwrite, flag=flag)
  _mkdirs(target.parent, flag)
  clean_stale(target.parent)
  try:
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target.name),
                               suffix=".partial", dir=target.parent)
  except OSError as e:
    raise errors.OutputError(f"{_where(flag, target)}: cannot write there "
                             f"({e.strerror})") from None
  os.close(fd)
  tmp = pathlib.Path(tmp)
  try:
    yield tmp
    _maybe_killed(target)
    if not overwrite and target.exists():
      raise errors.OutputError(f"{_where(flag, target)}: appeared while "
                               "writing; left as it was")
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)


# Tests set this to a destination's name to kill its writer (SIGKILL, no
# clean-up) once the files are complete under their temporary name, before
# the rename: the moment a killed export leaves a stray temporary behind.
_KILL_ENV = "GEMSCOPE_TEST_KILL_BEFORE_RENAME"


def _maybe_killed(target: pathlib.Path) -> None:
  if os.environ.get(_KILL_ENV) == target.name:
    os.kill(os.getpid(), signal.SIGKILL)


def _owned(name: str, owns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in owns)


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  else:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False,
               owns: Iterable[str] = (), flag: str = ""
               ) -> Iterator[pathlib.Path]:
  """Yields an empty folder; its files become `target`'s on success.

  Args:
    target: the folder to write. A new one is built beside it and renamed
      into place. An existing empty one is filled; a non-empty one is
      refused unless `overwrite`.
    overwrite: fill a non-empty `target`, replacing the entries the writer
      writes and removing those matching `owns` that it no longer writes;
      nothing else in `target` is touched.
    owns: glob patterns of what this writer writes (e.g.
      'model-*.safetensors'), so a rerun removes its own stale files.
    flag: how messages name the destination.

  On any exception the temporary folder is removed and `target` is left
  as it was.
  """
  target = pathlib.Path(target)
  owns = tuple(owns)
  if target.is_dir():
    clean_stale(target)
  check_dir_output(target, overwrite=overwrite, flag=flag)
  if target.is_dir():
    # Built inside the destination: the same disk, and a destination such
    # as '.' whose parent may not be writable still works.
    tmp = _mkdtemp("", target, flag)
  else:
    _mkdirs(target.parent, flag)
    clean_stale(target.parent)
    tmp = _mkdtemp(target.name, target.parent, flag)
  try:
    yield tmp
    _maybe_killed(target)
    if not target.exists():
      os.replace(tmp, target)
      return
    written = sorted(p.name for p in tmp.iterdir())
    for name in written:
      dest = target / name
      if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)  # one of ours: replaced by its new version
      os.replace(tmp / name, dest)
    for entry in target.iterdir():
      if (entry.name not in written and not _is_temp(entry.name)
          and _owned(entry.name, owns)):
        _remove(entry)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
