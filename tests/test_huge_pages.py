"""Large CPU buffers on huge pages (`kernels.huge_pages`).

Checked against the kernel's own account (/proc/self/smaps: how much of
the mapping holding a buffer is backed by transparent huge pages) and by
the contents, which must not change.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax.kernels import huge_pages

needs_thp = pytest.mark.skipif(
    not huge_pages.enabled(),
    reason="transparent huge pages unavailable here (not Linux, or 'never')")


def _huge_bytes(address: int, size: int) -> int:
  """AnonHugePages of this process's mappings that overlap [address,
  address + size) (marking splits a buffer's mapping at 2 MB bounds)."""
  total, inside, found = 0, False, False
  for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
    head = line.split()[0]
    if "-" in head and ":" not in head:
      lo, hi = (int(x, 16) for x in head.split("-"))
      inside = lo < address + size and address < hi
      found = found or inside
    elif inside and line.startswith("AnonHugePages:"):
      total += int(line.split()[1]) * 1024
  assert found, f"no mapping holds {address:#x}"
  return total


@needs_thp
def test_a_large_buffer_goes_on_huge_pages_and_keeps_its_contents():
  want = np.arange(24 << 20, dtype=np.float32) * 0.5  # 96 MiB
  x = jnp.asarray(want) + 0  # a buffer XLA allocated
  address = x.unsafe_buffer_pointer()
  marked = huge_pages.advise({"w": x, "small": jnp.ones(8)})
  aligned_start = -(-address // huge_pages.HUGE_PAGE) * huge_pages.HUGE_PAGE
  aligned_end = (address + x.nbytes) // huge_pages.HUGE_PAGE * huge_pages.HUGE_PAGE
  assert marked == aligned_end - aligned_start
  assert marked >= x.nbytes - 2 * huge_pages.HUGE_PAGE
  # MADV_COLLAPSE (Linux 6.1+) makes it immediate; older kernels only mark.
  assert _huge_bytes(address, x.nbytes) >= marked // 2
  np.testing.assert_array_equal(np.asarray(x), want)
  np.testing.assert_array_equal(np.asarray(x * 2), want * 2)


def test_small_buffers_and_other_leaves_are_left_alone():
  tree = {"a": jnp.ones((1000,)), "b": np.ones((4 << 20,), np.float32),
          "c": "text", "d": None}
  assert huge_pages.advise(tree) == 0


def test_the_switch_turns_it_off(monkeypatch):
  monkeypatch.setenv("GEMSCOPE_HUGE_PAGES", "0")
  assert not huge_pages.enabled()
  assert huge_pages.advise(jnp.zeros((8 << 20,), jnp.float32) + 1) == 0


@needs_thp
def test_load_model_puts_the_real_weights_on_huge_pages(real_model):
  _, params = real_model
  table = params["embedder"]["input_embedding"]  # 671 MB
  huge = _huge_bytes(table.unsafe_buffer_pointer(), table.nbytes)
  assert huge > table.nbytes // 2, huge
