"""Compiling, caching and registering one C++ XLA FFI handler library.

A `Library` compiles its source with g++ at first use, into
`assets.cache_dir() / "kernels"`, under a name keyed by a hash of the
source, the jax/jaxlib versions, the flags, the compiler and (for sources
built with -march=native) the CPU's instruction-set flags; then it loads the
shared object and registers its handlers as XLA FFI targets on the CPU.
Concurrent first builds (pytest-xdist, several notebooks) share the cache:
one process compiles under a file lock while the others wait. A cached build
that no longer loads (a system library changed under it) is rebuilt once.

Every failure (no compiler, missing headers, a compile error, the
GEMSCOPE_CPU_KERNELS=0 switch) is caught: `load()` returns None, the reason
is kept for `unavailable_reason()`, and one warning is logged, so callers fall
back to plain XLA ops and never fail for want of a toolchain.

Caveat: the cache key covers what changes the binary that this module can
see; a compiler upgraded in place under the same `--version` string reuses
the old build.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Callable

import jax
import jaxlib

from gemscope_jax import assets

logger = logging.getLogger(__name__)

CXX = "g++"
ENV_SWITCH = "GEMSCOPE_CPU_KERNELS"


def disabled_by_env() -> bool:
  """Whether GEMSCOPE_CPU_KERNELS turns every CPU kernel off."""
  return os.environ.get(ENV_SWITCH, "1").strip().lower() in (
      "0", "false", "no", "off")


def _compiler_version() -> str:
  try:
    out = subprocess.run([CXX, "--version"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return out.splitlines()[0] if out else "unknown"


def _cpu_flags() -> str:
  """The CPU's instruction-set flags (what -march=native compiles for)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor()


@dataclasses.dataclass
class Library:
  """One handler library: its source, build flags and FFI targets.

  Attributes:
    stem: file-name stem of the cached build.
    source: the C++ file.
    cxxflags: compiler flags (-shared -fPIC are added).
    libs: linker arguments after the object, e.g. ("-ldnnl",).
    targets: FFI target name -> exported handler symbol.
    warning: first words of the warning logged when the build fails, e.g.
      "the oneDNN CPU matmul kernel is unavailable".
    how_to_enable: the sentence that ends that warning.
    explain: optional map of compiler stderr -> a short reason, or None to
      keep the compiler's own message.
    headers: local headers the source includes (part of the cache key).
  """
  stem: str
  source: pathlib.Path
  cxxflags: tuple[str, ...]
  libs: tuple[str, ...] = ()
  targets: dict[str, str] = dataclasses.field(default_factory=dict)
  warning: str = "a CPU kernel is unavailable"
  how_to_enable: str = ""
  explain: Callable[[str], str | None] | None = None
  headers: tuple[pathlib.Path, ...] = ()

  def __post_init__(self):
    self._lock = threading.Lock()
    self._lib: ctypes.CDLL | None = None
    self._reason: str | None = None

  def path(self) -> pathlib.Path:
    """Cache path of the compiled library for this source and toolchain."""
    digest = hashlib.sha256()
    parts = [self.source.read_bytes(),
             *(h.read_bytes() for h in self.headers), jax.__version__.encode(),
             jaxlib.__version__.encode(), " ".join(self.cxxflags).encode(),
             " ".join(self.libs).encode(), _compiler_version().encode(),
             platform.machine().encode()]
    if "-march=native" in self.cxxflags:
      parts.append(_cpu_flags().encode())
    for part in parts:
      digest.update(part)
      digest.update(b"\0")
    return (assets.cache_dir() / "kernels" /
            f"{self.stem}-{digest.hexdigest()[:20]}.so")

  def _compile(self, target: pathlib.Path) -> None:
    """Compiles into `target` atomically; raises RuntimeError."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial",
                               dir=target.parent)
    os.close(fd)
    try:
      cmd = [CXX, *self.cxxflags, "-shared", "-fPIC",
             f"-I{jax.ffi.include_dir()}", str(self.source), "-o", tmp,
             *self.libs]
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=600)
      except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"running {CXX} failed: {e}") from e
      if proc.returncode != 0:
        err = proc.stderr.strip()
        short = self.explain(err) if self.explain else None
        if short:
          raise RuntimeError(short)
        tail = "\n".join(err.splitlines()[-15:])
        raise RuntimeError(f"compiling {self.source.name} failed:\n{tail}")
      # mkstemp made it private; a shared cache should be loadable by others.
      os.chmod(tmp, 0o755)
      os.replace(tmp, target)
    finally:
      pathlib.Path(tmp).unlink(missing_ok=True)

  def _build_and_load(self) -> ctypes.CDLL:
    if shutil.which(CXX) is None:
      raise RuntimeError(f"no C++ compiler ({CXX}) on PATH")
    target = self.path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w", encoding="utf-8") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        if not target.exists():
          logger.info("compiling %s into %s", self.source.name, target)
          self._compile(target)
        try:
          return ctypes.CDLL(str(target))
        except OSError as e:
          logger.info("cached kernel %s failed to load (%s); rebuilding",
                      target, e)
          target.unlink(missing_ok=True)
          self._compile(target)
          try:
            return ctypes.CDLL(str(target))
          except OSError as e2:
            raise RuntimeError(
                f"loading the compiled kernel failed: {e2}") from e2
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)

  def load(self) -> ctypes.CDLL | None:
    """Builds, loads and registers the library once per process, or None."""
    with self._lock:
      if self._lib is not None:
        return self._lib
      if self._reason is not None:
        return None
      if disabled_by_env():
        self._reason = f"disabled by {ENV_SWITCH}=0"
        return None
      try:
        lib = self._build_and_load()
        for target, symbol in self.targets.items():
          jax.ffi.register_ffi_target(
              target, jax.ffi.pycapsule(getattr(lib, symbol)),
              platform="cpu")
      except Exception as e:  # pylint: disable=broad-except
        # Never let a missing toolchain break a run: XLA's ops still work.
        self._reason = str(e)
        logger.warning("gemscope_jax: %s (%s); %s", self.warning, e,
                       self.how_to_enable)
        return None
      self._lib = lib
      return lib

  def unavailable_reason(self) -> str | None:
    """Why `load()` returns None, or None when the library is loaded."""
    if self.load() is not None:
      return None
    return str(self._reason)


def gxx_library(source: pathlib.Path, target: str, symbol: str, *,
                what: str, fallback: str,
                headers: tuple[str, ...] = ()) -> Library:
  """A handler library that needs only g++ (and its OpenMP, for the kernels
  that use it), built for this CPU.

  Args:
    source: the C++ file; its stem names the cached build.
    target: the FFI target name; symbol: the handler it exports.
    what: the kernel in a few words ("the fused JumpReLU CPU kernel").
    fallback: the sentence saying what runs without it.
    headers: names of local headers beside `source` that it includes.
  """
  return Library(
      stem=source.stem, source=source,
      cxxflags=("-O3", "-march=native", "-fopenmp", "-std=c++17"),
      targets={target: symbol}, warning=f"{what} is unavailable",
      how_to_enable=(f"{fallback} Install g++ to enable it; set "
                     f"{ENV_SWITCH}=0 to turn it off without this warning."),
      headers=tuple(source.with_name(h) for h in headers))

