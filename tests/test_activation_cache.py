"""Tests of the on-disk activation cache (write, resume, read, shuffle)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from gemscope_jax.data.activation_cache import (MANIFEST, ActivationCache,
                                                CacheBuckets, write_cache)

WIDTHS = {"layer_1/resid_post": 8, "layer_3/mlp_out": 12}
META = {"model": "synthetic", "hookpoints": list(WIDTHS), "seq_len": 16,
        "dtype": "float32", "text_files": ["a.txt", "b.txt"]}
ROOT = pathlib.Path(__file__).resolve().parents[1]


class SyntheticSource:
  """A deterministic bucket source: bucket i depends only on (seed, i).

  Buckets have varying row counts; `fail_after` raises after that many
  buckets (a simulated crash); `delay` sleeps before each bucket.
  """

  def __init__(self, seed=0, num_buckets=None, fail_after=None, delay=0.0):
    self.seed, self.num_buckets = seed, num_buckets
    self.fail_after, self.delay = fail_after, delay
    self.index, self.served = 0, 0

  def bucket(self, i):
    rng = np.random.default_rng([self.seed, i])
    n = int(rng.integers(20, 90))
    return {k: (rng.standard_normal((n, w)) * (1 + j) + 0.5 * j - 0.25)
            .astype(np.float32) for j, (k, w) in enumerate(WIDTHS.items())}

  def next_bucket(self):
    if self.fail_after is not None and self.served >= self.fail_after:
      raise RuntimeError("simulated crash")
    if self.num_buckets is not None and self.index >= self.num_buckets:
      raise StopIteration
    time.sleep(self.delay)
    out = self.bucket(self.index)
    self.index += 1
    self.served += 1
    return out

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def expected_rows(num_tokens, seed=0):
  """Concatenated rows a writer of `num_tokens` must store, per hookpoint."""
  source, parts = SyntheticSource(seed), []
  while sum(len(p[next(iter(WIDTHS))]) for p in parts) < num_tokens:
    parts.append(source.next_bucket())
  return {k: np.concatenate([p[k] for p in parts])[:num_tokens] for k in WIDTHS}


def read_all(cache):
  shards = [cache.shard(i) for i in range(cache.num_shards)]
  return {k: np.concatenate([s[k] for s in shards]) for k in cache.hookpoints}


def shard_bytes(directory):
  return {p.name: p.read_bytes()
          for p in sorted(pathlib.Path(directory).iterdir())
          if p.name.startswith("shard_")}


def assert_same_cache(a, b):
  assert shard_bytes(a) == shard_bytes(b)
  ma = json.loads((pathlib.Path(a) / MANIFEST).read_text())
  mb = json.loads((pathlib.Path(b) / MANIFEST).read_text())
  assert ma == mb
  assert sorted(os.listdir(a)) == sorted(os.listdir(b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted write of 1000 rows (the last bucket cut)."""
  directory = tmp_path_factory.mktemp("reference")
  write_cache(directory, SyntheticSource(), num_tokens=1000, metadata=META,
              progress=False)
  return directory


def test_round_trip_is_bit_exact_and_cuts_last_bucket(reference):
  cache = ActivationCache(reference)
  assert cache.num_tokens == 1000
  assert cache.hookpoints == tuple(WIDTHS) and cache.widths == WIDTHS
  assert cache.metadata == META
  got, want = read_all(cache), expected_rows(1000)
  for k in WIDTHS:
    assert got[k].dtype == np.float32 and got[k].shape == (1000, WIDTHS[k])
    np.testing.assert_array_equal(got[k], want[k])
  # Shards are whole buckets except the last, which is cut to hit 1000.
  source = SyntheticSource()
  sizes = [len(source.next_bucket()[next(iter(WIDTHS))])
           for _ in range(cache.num_shards)]
  rows = [cache.shard_rows(i) for i in range(cache.num_shards)]
  assert rows[:-1] == sizes[:-1] and 0 < rows[-1] < sizes[-1]
  assert sum(rows) == 1000


def test_stats_match_numpy(reference):
  cache = ActivationCache(reference)
  want = expected_rows(1000)
  for k in WIDTHS:
    x = want[k].astype(np.float64)
    np.testing.assert_allclose(cache.mean(k), x.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(cache.mean_squared_norm(k),
                               (x * x).sum(1).mean(), rtol=1e-12)


def test_complete_cache_returns_immediately(reference):
  before = shard_bytes(reference)
  source = SyntheticSource(fail_after=0)  # would raise if pulled from
  manifest = write_cache(reference, source, num_tokens=1000, metadata=META,
                         progress=False)
  assert manifest["complete"] and manifest["total_rows"] == 1000
  assert shard_bytes(reference) == before


def test_exhausted_source_with_num_tokens_none(tmp_path):
  write_cache(tmp_path, SyntheticSource(num_buckets=3), num_tokens=None,
              metadata=META, progress=False)
  cache = ActivationCache(tmp_path)
  source = SyntheticSource()
  want = [source.next_bucket() for _ in range(3)]
  assert cache.num_shards == 3
  for i in range(3):
    for k in WIDTHS:
      np.testing.assert_array_equal(cache.shard(i)[k], want[i][k])
  with pytest.raises(ValueError, match="ran out after"):
    write_cache(tmp_path / "short", SyntheticSource(num_buckets=2),
                num_tokens=10_000, metadata=META, progress=False)


def test_resume_after_exception_is_byte_identical(tmp_path, reference):
  with pytest.raises(RuntimeError, match="simulated crash"):
    write_cache(tmp_path, SyntheticSource(fail_after=4), num_tokens=1000,
                metadata=META, progress=False)
  manifest = json.loads((tmp_path / MANIFEST).read_text())
  assert not manifest["complete"] and len(manifest["shards"]) == 4
  with pytest.raises(ValueError, match="incomplete"):
    ActivationCache(tmp_path)
  write_cache(tmp_path, SyntheticSource(), num_tokens=1000, metadata=META,
              progress=False)
  assert_same_cache(tmp_path, reference)


def test_resume_ignores_stray_files(tmp_path, reference):
  with pytest.raises(RuntimeError):
    write_cache(tmp_path, SyntheticSource(fail_after=3), num_tokens=1000,
                metadata=META, progress=False)
  # A shard renamed into place whose manifest update never happened, and
  # temporary files of an interrupted shard and manifest write.
  (tmp_path / "shard_00003.safetensors").write_bytes(b"half a shard")
  (tmp_path / ".shard_00004.safetensors.x1y2.partial").write_bytes(b"junk")
  (tmp_path / ".manifest.json.z3.partial").write_text("{")
  write_cache(tmp_path, SyntheticSource(), num_tokens=1000, metadata=META,
              progress=False)
  assert_same_cache(tmp_path, reference)


def test_metadata_mismatch_names_field_and_directory(tmp_path, reference):
  with pytest.raises(RuntimeError):
    write_cache(tmp_path, SyntheticSource(fail_after=2), num_tokens=1000,
                metadata=META, progress=False)
  other = dict(META, seq_len=32)
  with pytest.raises(ValueError, match="seq_len") as info:
    write_cache(tmp_path, SyntheticSource(), num_tokens=1000, metadata=other,
                progress=False)
  assert str(tmp_path) in str(info.value) and "model" not in str(info.value)
  with pytest.raises(ValueError, match="num_tokens"):
    write_cache(tmp_path, SyntheticSource(), num_tokens=999, metadata=META,
                progress=False)
  with pytest.raises(ValueError, match="text_files"):
    write_cache(reference, SyntheticSource(), num_tokens=1000,
                metadata=dict(META, text_files=["c.txt"]), progress=False)


def test_damaged_shards_are_named(tmp_path):
  write_cache(tmp_path, SyntheticSource(), num_tokens=300, metadata=META,
              progress=False)
  shard = tmp_path / "shard_00001.safetensors"
  data = shard.read_bytes()
  shard.write_bytes(data[:-7])
  with pytest.raises(ValueError, match="shard_00001.safetensors.*truncated"):
    ActivationCache(tmp_path)
  shard.unlink()
  with pytest.raises(FileNotFoundError, match="shard_00001.safetensors"):
    ActivationCache(tmp_path)
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    ActivationCache(tmp_path / "nowhere")


def test_cache_buckets_epochs_and_state(reference):
  cache = ActivationCache(reference)
  n = cache.num_shards
  shards = [cache.shard(i) for i in range(n)]
  key = next(iter(WIDTHS))

  def index_of(bucket):
    hits = [i for i, s in enumerate(shards)
            if s[key].shape == bucket[key].shape
            and np.array_equal(s[key], bucket[key])]
    assert len(hits) == 1
    return hits[0]

  def drain(source):
    out = []
    while True:
      try:
        out.append(index_of(source.next_bucket()))
      except StopIteration:
        return out

  a = drain(CacheBuckets(cache, seed=7, num_epochs=3))
  assert len(a) == 3 * n
  epochs = [a[e * n:(e + 1) * n] for e in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(n))
  assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
  assert drain(CacheBuckets(cache, seed=7, num_epochs=3)) == a
  assert drain(CacheBuckets(cache, seed=8, num_epochs=3)) != a

  # Resume from every position, through epoch boundaries.
  for k in (0, 1, n - 1, n, n + 2, 3 * n - 1, 3 * n):
    src = CacheBuckets(cache, seed=7, num_epochs=3)
    for _ in range(k):
      src.next_bucket()
    state = json.loads(json.dumps(src.get_state()))
    assert set(state) == {"epoch", "position"}
    fresh = CacheBuckets(cache, seed=7, num_epochs=3)
    fresh.set_state(state)
    assert drain(fresh) == a[k:]

  forever = CacheBuckets(cache, seed=7)
  assert [index_of(forever.next_bucket()) for _ in range(3 * n + 1)][:3 * n] \
      == a


_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_activation_cache import META, SyntheticSource
    from gemscope_jax.data.activation_cache import write_cache
    write_cache({directory!r}, SyntheticSource(delay=0.05), num_tokens=1000,
                metadata=META, progress=False)
""")


def test_sigkill_mid_write_then_resume(tmp_path, reference):
  directory = tmp_path / "killed"
  code = _CHILD.format(tests=str(ROOT / "tests"), directory=str(directory))
  child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 60
  try:
    while True:
      assert child.poll() is None, child.stdout.read().decode()
      assert time.monotonic() < deadline, "child wrote no shard in 60 s"
      try:
        manifest = json.loads((directory / MANIFEST).read_text())
      except (FileNotFoundError, ValueError):
        manifest = {"shards": []}
      if len(manifest["shards"]) >= 2:
        break
      time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
  finally:
    if child.poll() is None:
      child.kill()
    child.stdout.close()
  assert child.returncode == -signal.SIGKILL
  manifest = json.loads((directory / MANIFEST).read_text())
  assert not manifest["complete"] and len(manifest["shards"]) >= 2
  write_cache(directory, SyntheticSource(), num_tokens=1000, metadata=META,
              progress=False)
  assert_same_cache(directory, reference)
