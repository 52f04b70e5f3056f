"""Pass 1's activations at a dictionary's input, kept in a file for pass 2.

The dashboard scan (`scan.scan`) encodes every chunk twice; rather than run
Gemma again in pass 2 it reads back what pass 1 wrote here: window w's
(seq_len, n_hookpoints, d) values, raw, at byte w * window_bytes, windows
written in order from 0. Written and read with pwrite/preadv, never
memory-mapped, so the data lies in the kernel's page cache (or on disk),
not in the process's resident memory: 671 MB at 262,144 tokens of a
640-wide hookpoint in float32 that the scan used to hold in RAM.

The bytes read back are the bytes written, so pass 2 sees exactly pass 1's
activations. A chunk is copied to the host one chunk late (`put`), so the
copy never waits for the device.

Caveat: what a crash of the machine (not of the process) leaves in the
file is only trusted up to the last `sync`, which the scan calls before
each save of its state.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np


class ActivationFile:
  """Windows 0 .. `windows` - 1 of pass 1's activations, in a file.

  Attributes:
    window_shape: (seq_len, n_hookpoints, d) of one window.
    dtype: the activations' dtype.
    window_bytes: bytes of one window.
    windows: how many windows the file holds (those written or flushed).
  """

  def __init__(self, path: str | os.PathLike | None,
               window_shape: tuple[int, ...], dtype, keep: int = 0):
    """Opens `path` (created if absent) keeping its first `keep` windows,
    or an anonymous temporary file (`path` None, `keep` 0).

    Raises:
      OSError: the file cannot be opened, or holds fewer than `keep`
        windows.
    """
    self.window_shape = tuple(int(n) for n in window_shape)
    self.dtype = np.dtype(dtype)
    self.window_bytes = int(np.prod(self.window_shape)) * self.dtype.itemsize
    self.path = None if path is None else pathlib.Path(path)
    if self.path is None:
      self._file = tempfile.TemporaryFile(prefix="gemscope-acts-")
      self._fd = self._file.fileno()
    else:
      self._file = None
      self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      size = os.fstat(self._fd).st_size
      if size < keep * self.window_bytes:
        raise OSError(f"{self.path}: holds {size // self.window_bytes} "
                      f"windows of activations, not {keep}")
      os.ftruncate(self._fd, keep * self.window_bytes)
    except BaseException:
      self.close()
      raise
    self.windows = keep
    self._pending = None

  def put(self, w0: int, n: int, acts) -> None:
    """Queues the first `n` rows of `acts` ((B, *window_shape), a device
    array) as windows w0 .. w0 + n - 1, and writes the chunk queued before.
    """
    self.flush()
    self._pending = (w0, n, acts)

  def flush(self) -> None:
    """Writes the queued chunk, if any."""
    if self._pending is None:
      return
    w0, n, acts = self._pending
    self._pending = None
    host = np.ascontiguousarray(np.asarray(acts)[:n])
    if w0 != self.windows or host.shape[1:] != self.window_shape:
      raise ValueError(f"activation file: got windows {w0}.. of shape "
                       f"{host.shape[1:]}, expected {self.windows}.. of "
                       f"{self.window_shape}")
    if host.dtype != self.dtype:
      raise ValueError(f"activation file: got {host.dtype}, expected "
                       f"{self.dtype}")
    view = memoryview(host.view(np.uint8).reshape(-1))
    offset = w0 * self.window_bytes
    while view:
      written = os.pwrite(self._fd, view, offset)
      view, offset = view[written:], offset + written
    self.windows = w0 + n

  def sync(self) -> None:
    """Flushes, then makes the file's contents durable (fsync)."""
    self.flush()
    os.fsync(self._fd)

  def read(self, w0: int, stop: int, rows: int) -> np.ndarray:
    """(rows, *window_shape): windows w0 .. stop - 1, then zeros.

    Raises:
      OSError: windows not in the file, or a short read.
    """
    if stop > self.windows:
      raise OSError(f"activation file: window {stop - 1} not written")
    out = np.zeros((rows, *self.window_shape), self.dtype)
    view = memoryview(out.view(np.uint8).reshape(-1))[
        :(stop - w0) * self.window_bytes]
    offset = w0 * self.window_bytes
    while view:
      got = os.preadv(self._fd, [view], offset)
      if got <= 0:
        raise OSError(f"activation file: short read at byte {offset}")
      view, offset = view[got:], offset + got
    return out

  def close(self, remove: bool = False) -> None:
    """Closes the file (a temporary one disappears); `remove` deletes a
    named one."""
    if self._fd is not None:
      if self._file is not None:
        self._file.close()
      else:
        os.close(self._fd)
      self._fd = None
    self._pending = None
    if remove and self.path is not None:
      self.path.unlink(missing_ok=True)
