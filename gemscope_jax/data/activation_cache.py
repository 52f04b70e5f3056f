"""An on-disk activation cache: harvest activations once, train many dictionaries.

Layout of a cache directory:

  manifest.json            the index (below), rewritten atomically per shard
  shard_00000.safetensors  one shard per harvested bucket: one float32 tensor
  shard_00001.safetensors  of shape (rows, width) per hookpoint, named by the
  ...                      hookpoint ("layer_6/resid_post")

`manifest.json` holds: "format" and "version"; "metadata" (the caller's dict:
model, hookpoints, seq_len, text files...; a resumed write must pass an equal
one); "num_tokens" (the requested row count, or null for "until the source is
exhausted"); "hookpoints" and "widths" (from the first bucket); "dtype"
("float32"); "shards", the completed shards in order, each {"file", "rows",
"bytes"}; "total_rows"; "stats", per hookpoint the float64 running "sum" of
the rows (a vector) and "sum_squared_norm" (sum over rows of ||x||^2), exact
in JSON; "source_state", the source's `get_state()` after the last completed
shard; and "complete", true only once every row is written.

Every file is written under a temporary name and renamed into place (shard
first, then the manifest that lists it), so a killed writer leaves at worst
an unlisted shard or a `.*.partial` file, both discarded when `write_cache`
resumes from the manifest's source state. Shards hold rows in the order the
source produced them; `CacheBuckets` shuffles the shard order per epoch, not
the rows inside a shard.

Caveat: resuming replays the source from its saved state, so shards are
byte-identical to an uninterrupted write only if the source is deterministic
given its state; and the rename is not followed by a directory fsync, so a
power loss (unlike a killed process) may lose the last shard or two.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np
import safetensors.numpy
import tqdm

from gemscope_jax.assets import atomic_path

FORMAT = "gemscope_jax.activation_cache"
VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"shard_\d+\.safetensors")
_STATS_CHUNK = 8192  # rows per float64 block when accumulating statistics


def _shard_name(i: int) -> str:
  return f"shard_{i:05d}.safetensors"


def _jsonable(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists, ...)."""
  return json.loads(json.dumps(value))


def _write_json(path: pathlib.Path, obj: dict) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=1)
      f.flush()
      os.fsync(f.fileno())


def _read_manifest(directory: pathlib.Path) -> dict | None:
  path = directory / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise ValueError(f"{path}: not a valid JSON manifest ({e})") from e
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ValueError(
        f"{path}: not a {FORMAT} manifest of version {VERSION} (format="
        f"{manifest.get('format')!r}, version={manifest.get('version')!r})")
  return manifest


def _check_shard_file(directory: pathlib.Path, entry: dict) -> None:
  """Raises if a listed shard is missing or not the size it was written at."""
  path = directory / entry["file"]
  if not path.is_file():
    raise FileNotFoundError(f"{path}: shard listed in {MANIFEST} is missing")
  size = path.stat().st_size
  if size != entry["bytes"]:
    raise ValueError(
        f"{path}: shard is {size} bytes, {MANIFEST} says {entry['bytes']} "
        "(truncated or overwritten)")


def _clean_strays(directory: pathlib.Path, listed: set[str]) -> None:
  """Removes temporary files and unlisted shards left by an interrupted run."""
  for path in directory.iterdir():
    name = path.name
    stray_tmp = name.startswith(".") and name.endswith(".partial") and (
        name.startswith(".shard_") or name.startswith(f".{MANIFEST}."))
    stray_shard = _SHARD_RE.fullmatch(name) and name not in listed
    if stray_tmp or stray_shard:
      path.unlink(missing_ok=True)


def _check_metadata(directory: pathlib.Path, manifest: dict, metadata: dict,
                    num_tokens: int | None, size_name: str) -> None:
  old, new = manifest["metadata"], _jsonable(metadata)
  differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  if differing:
    details = "; ".join(f"{k!r}: cache has {old.get(k)!r}, got {new.get(k)!r}"
                        for k in differing)
    raise ValueError(f"{directory}: metadata field(s) {', '.join(differing)} "
                     f"differ from the existing cache ({details})")
  if manifest["num_tokens"] != num_tokens:
    raise ValueError(
        f"{directory}: {size_name} differs from the existing cache: cache "
        f"has {manifest['num_tokens']!r} rows, asked for {num_tokens!r} "
        "(use the cache's size or another directory)")


def _validate_bucket(bucket: dict, widths: dict | None) -> dict[str, np.ndarray]:
  """Float32, C-contiguous (rows, width) arrays, consistent with `widths`."""
  if not bucket:
    raise ValueError("the source returned an empty bucket (no hookpoints)")
  out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in bucket.items()}
  rows = {k: v.shape[0] if v.ndim == 2 else None for k, v in out.items()}
  if None in rows.values() or len(set(rows.values())) != 1:
    raise ValueError("bucket arrays must be 2-D with the same row count, got "
                     f"shapes { {k: v.shape for k, v in out.items()} }")
  if widths is not None:
    got = {k: v.shape[1] for k, v in out.items()}
    if got != widths:
      raise ValueError(f"bucket hookpoints/widths {got} differ from the "
                       f"cache's {widths}")
  return out


def _bucket_stats(x: np.ndarray) -> tuple[np.ndarray, float]:
  """(sum of rows, sum of squared row norms), in float64, blockwise."""
  total = np.zeros(x.shape[1], np.float64)
  sq = 0.0
  for start in range(0, x.shape[0], _STATS_CHUNK):
    block = x[start:start + _STATS_CHUNK].astype(np.float64)
    total += block.sum(axis=0)
    sq += float(np.einsum("ij,ij->", block, block))
  return total, sq


def write_cache(directory: str | os.PathLike, source, *,
                num_tokens: int | None, metadata: dict,
                progress: bool = True, size_name: str = "num_tokens") -> dict:
  """Harvests buckets from `source` into a cache directory (resumable).

  An existing manifest is resumed (its metadata and num_tokens must match);
  `.shard_*`/`.manifest.json.*` `.partial` files and `shard_*.safetensors`
  files it does not list are deleted first. One writer per directory.

  Args:
    directory: the cache directory (created if needed).
    source: a bucket source (`next_bucket`, `get_state`, `set_state`).
    num_tokens: rows to store; the last bucket is cut to hit it exactly.
      None stores every bucket until the source raises StopIteration.
    metadata: JSON-serialisable description of what is cached (model,
      hookpoints, seq_len, text files...). Resuming requires an equal dict.
    progress: show a tqdm bar (rows/s and ETA).
    size_name: what the caller calls `num_tokens` (a config field), named
      when it differs from an existing cache's.

  Returns:
    The final manifest (a dict, as in `manifest.json`).

  Raises:
    ValueError: the directory holds a cache with other metadata or
      num_tokens, a listed shard is damaged, a bucket is malformed, or the
      source ran out before `num_tokens` rows.
  """
  if num_tokens is not None and num_tokens <= 0:
    raise ValueError(f"num_tokens must be positive, got {num_tokens}")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  manifest = _read_manifest(directory)
  if manifest is not None:
    _check_metadata(directory, manifest, metadata, num_tokens, size_name)
    for entry in manifest["shards"]:
      _check_shard_file(directory, entry)
    _clean_strays(directory, {e["file"] for e in manifest["shards"]})
    if manifest["complete"]:
      return manifest
    source.set_state(manifest["source_state"])
  else:
    _clean_strays(directory, set())
    manifest = {
        "format": FORMAT, "version": VERSION, "metadata": _jsonable(metadata),
        "num_tokens": num_tokens, "hookpoints": None, "widths": None,
        "dtype": "float32", "shards": [], "total_rows": 0, "stats": None,
        "source_state": _jsonable(source.get_state()), "complete": False,
    }
    _write_json(directory / MANIFEST, manifest)

  stats = None
  if manifest["stats"] is not None:
    stats = {k: (np.asarray(v["sum"], np.float64), float(v["sum_squared_norm"]))
             for k, v in manifest["stats"].items()}
  bar = tqdm.tqdm(total=num_tokens, initial=manifest["total_rows"], unit="tok",
                  unit_scale=True, desc=f"caching {directory.name}",
                  disable=not progress, smoothing=0.1)
  try:
    while num_tokens is None or manifest["total_rows"] < num_tokens:
      try:
        raw = source.next_bucket()
      except StopIteration:
        if num_tokens is None:
          break
        raise ValueError(
            f"{directory}: the source ran out after {manifest['total_rows']} "
            f"of {num_tokens} rows") from None
      state = _jsonable(source.get_state())
      bucket = _validate_bucket(raw, manifest["widths"])
      rows = next(iter(bucket.values())).shape[0]
      if num_tokens is not None:
        rows = min(rows, num_tokens - manifest["total_rows"])
        bucket = {k: np.ascontiguousarray(v[:rows]) for k, v in bucket.items()}
      if rows == 0:
        manifest["source_state"] = state
        continue
      if manifest["widths"] is None:
        manifest["hookpoints"] = list(bucket)
        manifest["widths"] = {k: int(v.shape[1]) for k, v in bucket.items()}
        stats = {k: (np.zeros(w, np.float64), 0.0)
                 for k, w in manifest["widths"].items()}

      name = _shard_name(len(manifest["shards"]))
      with atomic_path(directory / name) as tmp:
        safetensors.numpy.save_file(bucket, str(tmp))
        with open(tmp, "rb+") as f:
          os.fsync(f.fileno())
        size = tmp.stat().st_size
      for k, x in bucket.items():
        s, sq = _bucket_stats(x)
        stats[k] = (stats[k][0] + s, stats[k][1] + sq)

      manifest["shards"].append({"file": name, "rows": rows, "bytes": size})
      manifest["total_rows"] += rows
      manifest["stats"] = {k: {"sum": s.tolist(), "sum_squared_norm": sq}
                           for k, (s, sq) in stats.items()}
      manifest["source_state"] = state
      _write_json(directory / MANIFEST, manifest)
      bar.update(rows)
  finally:
    bar.close()
  if manifest["total_rows"] == 0:
    raise ValueError(f"{directory}: the source yielded no rows")
  manifest["complete"] = True
  _write_json(directory / MANIFEST, manifest)
  return manifest


class ActivationCache:
  """A complete activation cache, opened for reading.

  Opening reads only the manifest and checks that every shard exists with
  the size it was written at; shards are read on demand by `shard(i)`.

  Attributes:
    directory: the cache directory.
    manifest: the parsed `manifest.json`.
    hookpoints: hookpoint names, in the order of the first bucket.
    widths: {hookpoint: width}.
    num_tokens: total rows (token activations) per hookpoint.
    num_shards: number of shards.
    metadata: the metadata dict passed to `write_cache`.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    manifest = _read_manifest(self.directory)
    path = self.directory / MANIFEST
    if manifest is None:
      raise FileNotFoundError(f"{path}: no activation cache manifest here "
                              "(write one with write_cache)")
    if not manifest.get("complete"):
      raise ValueError(
          f"{path}: the cache is incomplete ({manifest.get('total_rows')} of "
          f"{manifest.get('num_tokens')} rows); resume it with write_cache")
    for entry in manifest["shards"]:
      _check_shard_file(self.directory, entry)
    self.manifest = manifest
    self.hookpoints: tuple[str, ...] = tuple(manifest["hookpoints"])
    self.widths: dict[str, int] = dict(manifest["widths"])
    self.num_tokens: int = int(manifest["total_rows"])
    self.num_shards: int = len(manifest["shards"])
    self.metadata: dict = manifest["metadata"]

  def shard_rows(self, i: int) -> int:
    """Row count of shard `i`."""
    return int(self.manifest["shards"][i]["rows"])

  def shard(self, i: int) -> dict[str, np.ndarray]:
    """Shard `i` as {hookpoint: float32 array (rows, width)}."""
    if not 0 <= i < self.num_shards:
      raise IndexError(f"shard {i} out of range [0, {self.num_shards})")
    entry = self.manifest["shards"][i]
    path = self.directory / entry["file"]
    _check_shard_file(self.directory, entry)
    tensors = safetensors.numpy.load_file(str(path))
    out = {}
    for k in self.hookpoints:
      x = tensors.get(k)
      if x is None or x.shape != (entry["rows"], self.widths[k]):
        raise ValueError(
            f"{path}: expected tensor {k!r} of shape "
            f"{(entry['rows'], self.widths[k])}, got "
            f"{None if x is None else x.shape}")
      out[k] = x
    return out

  def mean(self, hookpoint: str) -> np.ndarray:
    """Float64 mean activation vector of `hookpoint` over every row."""
    return (np.asarray(self.manifest["stats"][hookpoint]["sum"], np.float64)
            / self.num_tokens)

  def mean_squared_norm(self, hookpoint: str) -> float:
    """Mean over rows of ||x||^2 for `hookpoint` (accumulated in float64)."""
    return (float(self.manifest["stats"][hookpoint]["sum_squared_norm"])
            / self.num_tokens)


class CacheBuckets:
  """A bucket source over a cache: every shard once per epoch, shuffled.

  Epoch `e` visits the shards in the order
  `np.random.default_rng([seed, e]).permutation(num_shards)`; each bucket is
  one whole shard. The state is {"epoch": e, "position": p}, p being the
  index into epoch e's order of the next shard to serve.

  With `shard_count` > 1 (a data shard of a multi-host run) it serves only
  the cache shards `shard_index, shard_index + shard_count, ...`, in that
  subset's own per-epoch order.

  Args:
    cache: an `ActivationCache`.
    seed: seed of the per-epoch shard orders.
    num_epochs: epochs to serve before StopIteration; None serves forever.
    shard_index: which data shard this source is, in [0, shard_count).
    shard_count: data shards the cache is split into.
  """

  def __init__(self, cache: ActivationCache, *, seed: int,
               num_epochs: int | None = None, shard_index: int = 0,
               shard_count: int = 1):
    if cache.num_shards == 0:
      raise ValueError(f"{cache.directory}: the cache has no shards")
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index must be in [0, {shard_count}), got "
                       f"{shard_index}")
    self.files = np.arange(shard_index, cache.num_shards, shard_count)
    if self.files.size == 0:
      raise ValueError(f"{cache.directory}: {cache.num_shards} cache shards "
                       f"leave data shard {shard_index} of {shard_count} "
                       "empty; cache more tokens or use fewer data shards")
    self.cache = cache
    self.seed = int(seed)
    self.num_epochs = num_epochs
    self._epoch = 0
    self._position = 0
    self._order_cache: tuple[int, np.ndarray] | None = None

  def order(self, epoch: int) -> np.ndarray:
    """Shard indices in the order epoch `epoch` visits them."""
    if self._order_cache is None or self._order_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._order_cache = (epoch, self.files[rng.permutation(
          self.files.size)])
    return self._order_cache[1]

  def next_bucket(self) -> dict[str, np.ndarray]:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    bucket = self.cache.shard(int(self.order(self._epoch)[self._position]))
    self._position += 1
    if self._position == self.files.size:
      self._epoch, self._position = self._epoch + 1, 0
    return bucket

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "position": self._position}

  def set_state(self, state: dict) -> None:
    epoch, position = int(state["epoch"]), int(state["position"])
    if epoch < 0 or not 0 <= position < self.files.size:
      raise ValueError(f"invalid CacheBuckets state {state} for "
                       f"{self.files.size} shards")
    self._epoch, self._position = epoch, position
