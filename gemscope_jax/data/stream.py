"""The activation stage: text windows -> Gemma -> shuffled activation batches.

Two layers, both with a JSON-able position so that a resumed run continues
the same data order exactly:

- A *bucket source* yields buckets, dicts {hookpoint: (n, width) float32} of
  n ordinary-token activations (`next_bucket`, `get_state`, `set_state`).
  `HarvestSource` computes them live: a grain iterator over shuffled
  BOS-led windows, one jitted Gemma forward per batch of windows (stopping
  after the last block a hookpoint needs), special-token and padding
  positions (and a chat template's, the batches' "exclude") dropped, until
  a bucket holds at least `bucket_tokens` rows.
  `data.activation_cache.CacheBuckets` reads the same buckets from disk.
- `ActivationBatches` shuffles each bucket (a permutation seeded by the run
  seed and the bucket's index) and serves it as training batches. Its state
  is the source's state at the start of the current bucket, the bucket's
  index and the batches already served from it: restoring refills that
  bucket (recomputing it, for a live source) and skips what was served.

Multi-host runs (and `data.num_shards` > 1) split the stream into S data
shards, each its own `ActivationBatches`; `ShardedBatches` serves a
process's shards and makes global batches that do not depend on the
process count. Live shards are harvested together, in lockstep, by
`data.lockstep.LockstepHarvest` (one Gemma forward over the global mesh
for all shards of all processes).

Gemma Scope shuffled activations in buckets of about a million tokens; the
bucket size is the memory/shuffle-quality trade-off here too.

Caveat: rows of a bucket that do not fill a whole batch are dropped (fewer
than one batch per bucket), and resuming a live source recomputes up to one
bucket of Gemma forwards.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gemscope_jax.text.windows import ordinary_mask
from gemscope_jax import models
from gemscope_jax.data import pipeline

Bucket = dict[str, np.ndarray]

# Window batches are cheap to cut; a few threads keep Gemma fed.
_READ = pipeline.grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class BucketSource(Protocol):
  """Yields buckets of activations from a restorable position."""

  def next_bucket(self) -> Bucket:
    ...

  def get_state(self) -> dict[str, Any]:
    ...

  def set_state(self, state: dict[str, Any]) -> None:
    ...


class HarvestSource:
  """Live buckets: Gemma run over a grain window dataset.

  Attributes:
    hookpoints: the hookpoint names every bucket holds.
    tokens_seen: real (non-padding) token positions run through Gemma so far
      by this object (not restored by `set_state`), for throughput figures.
  """

  def __init__(self, model_config: models.Gemma3Config, params,
               window_dataset, hookpoints: Sequence[str], tokenizer, *,
               bucket_tokens: int, dtype=jnp.float32,
               sharding: jax.sharding.Sharding | None = None):
    """Sets up the source; nothing runs until `next_bucket`.

    Args:
      model_config: the Gemma configuration.
      params: the Gemma parameters.
      window_dataset: a grain MapDataset of {'tokens', 'mask'} window batches
        (`pipeline.make_window_dataset`), usually repeating forever.
      hookpoints: names such as 'layer_6/resid_post'.
      tokenizer: gives the special-token ids dropped from buckets.
      bucket_tokens: minimum rows per bucket.
      dtype: Gemma's compute dtype; activations are stored as float32.
      sharding: optional sharding for the (B, T) token batches (a data-
        parallel forward over a mesh).
    """
    self.config = model_config
    self.params = params
    self.dataset = window_dataset
    self.hookpoints = [h.name for h in
                       models.hooks.parse_all(hookpoints, model_config)]
    self.tokenizer = tokenizer
    self.bucket_tokens = int(bucket_tokens)
    self.dtype = dtype
    self.sharding = sharding
    self.tokens_seen = 0
    self._it = pipeline.iterate(window_dataset, _READ)

  def _forward(self, tokens: np.ndarray, mask: np.ndarray,
               exclude: np.ndarray | None = None) -> Bucket:
    t, m = tokens, mask
    if self.sharding is not None:
      t = jax.device_put(tokens, self.sharding)
      m = jax.device_put(mask, self.sharding)
    out = models.forward(self.params, t, m, config=self.config,
                         hookpoints=self.hookpoints, logits=False,
                         loss=False, dtype=self.dtype)
    keep = ordinary_mask(self.tokenizer, tokens, mask, exclude)
    self.tokens_seen += int(mask.sum())
    return {n: np.asarray(out.activations[n], np.float32)[keep]
            for n in self.hookpoints}

  def next_bucket(self) -> Bucket:
    parts: dict[str, list[np.ndarray]] = {n: [] for n in self.hookpoints}
    rows = 0
    while rows < self.bucket_tokens:
      batch = next(self._it)
      acts = self._forward(batch["tokens"], batch["mask"],
                           batch.get("exclude"))
      for n in self.hookpoints:
        parts[n].append(acts[n])
      rows += len(acts[self.hookpoints[0]])
    return {n: np.concatenate(p) for n, p in parts.items()}

  def get_state(self) -> dict[str, Any]:
    return {"windows": self._it.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it = pipeline.iterate(self.dataset, _READ)
    self._it.set_state(state["windows"])


def bucket_permutation(seed: int, index: int, n: int) -> np.ndarray:
  """The shuffle of bucket `index`: fixed by (seed, index), any platform."""
  return np.random.default_rng([int(seed), int(index)]).permutation(n)


class ActivationBatches:
  """Shuffled training batches of a bucket source, with a restorable position.

  Every batch is a dict {hookpoint: (batch_size, width) float32}.
  """

  def __init__(self, source: BucketSource, *, batch_size: int, seed: int):
    self.source = source
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self._bucket_index = -1
    self._bucket_start_state = source.get_state()
    self._bucket: Bucket | None = None
    self._order: np.ndarray | None = None
    self._offset = 0  # batches served from the current bucket

  def _load_bucket(self) -> None:
    self._bucket_start_state = self.source.get_state()
    self._bucket_index += 1
    bucket = self.source.next_bucket()
    n = len(next(iter(bucket.values())))
    if n < self.batch_size:
      raise ValueError(f"a bucket of {n} activations is smaller than one "
                       f"batch ({self.batch_size}); raise the bucket size")
    self._bucket = bucket
    self._order = bucket_permutation(self.seed, self._bucket_index, n)
    self._offset = 0

  def peek_bucket(self) -> Bucket:
    """The current bucket (loading the first if needed), unshuffled."""
    if self._bucket is None:
      self._load_bucket()
    return self._bucket

  def __iter__(self) -> Iterator[Bucket]:
    return self

  def __next__(self) -> Bucket:
    if (self._bucket is None
        or (self._offset + 1) * self.batch_size > len(self._order)):
      self._load_bucket()
    rows = self._order[self._offset * self.batch_size:
                       (self._offset + 1) * self.batch_size]
    self._offset += 1
    return {n: a[rows] for n, a in self._bucket.items()}

  def get_state(self) -> dict[str, Any]:
    """JSON-able position: the next batch after this one is restored."""
    return {"source": self._bucket_start_state,
            "bucket_index": self._bucket_index, "offset": self._offset,
            "loaded": self._bucket is not None}

  def set_state(self, state: dict[str, Any]) -> None:
    self.source.set_state(state["source"])
    self._bucket_index = int(state["bucket_index"]) - 1
    self._bucket = None
    if state.get("loaded", True):
      self._load_bucket()
      self._offset = int(state["offset"])
    else:
      self._bucket_start_state = state["source"]
      self._bucket_index = int(state["bucket_index"])


class ShardedBatches:
  """Global batches made of S data shards, of which this process serves some.

  Shard s is its own `ActivationBatches` (its own windows or cache shards,
  batch_size / S rows a batch); a global batch is the concatenation over
  shards 0 .. S-1 of their batches, so it does not depend on how the shards
  are spread over processes. `next` returns this process's rows: the
  concatenation over its (contiguous) shards.

  The state is {'shards': {str(s): position}} for the local shards;
  `set_state` reads the local ones out of a union over all processes.

  `group` is the `lockstep.LockstepHarvest` the shards' sources belong to
  (live shards harvested together), if any: it is then restored whole, and
  `peek_bucket` loads every local shard's first bucket on every process
  (each harvest is a collective of all processes).
  """

  def __init__(self, shards: dict[int, ActivationBatches], num_shards: int,
               group=None):
    self.shards = dict(sorted(shards.items()))
    self.num_shards = int(num_shards)
    self.group = group

  def __iter__(self) -> Iterator[Bucket]:
    return self

  def __next__(self) -> Bucket:
    parts = [next(b) for b in self.shards.values()]
    if len(parts) == 1:
      return parts[0]
    return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

  def peek_bucket(self) -> Bucket:
    """Shard 0's first bucket, on every process (sent from the process that
    serves shard 0): the same initial scales and mean for any layout."""
    if self.group is not None:
      for b in self.shards.values():
        b.peek_bucket()
    local = self.shards[0].peek_bucket() if 0 in self.shards else None
    if jax.process_count() == 1:
      return local
    names = sorted(local) if local is not None else None
    names = _broadcast_json(names)
    shapes = np.zeros((len(names), 2), np.int64)
    if local is not None:
      shapes[:] = [local[n].shape for n in names]
    shapes = np.asarray(multihost_utils.broadcast_one_to_all(shapes))
    tree = local if local is not None else {
        n: np.zeros(tuple(int(v) for v in sh), np.float32)
        for n, sh in zip(names, shapes)}
    got = multihost_utils.broadcast_one_to_all(tree)
    return {n: np.asarray(got[n], np.float32) for n in names}

  def get_state(self) -> dict[str, Any]:
    return {"num_shards": self.num_shards,
            "shards": {str(s): b.get_state() for s, b in self.shards.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    if int(state.get("num_shards", -1)) != self.num_shards:
      raise ValueError(f"the saved stream has {state.get('num_shards')} data "
                       f"shards, this run {self.num_shards} (data.num_shards)")
    if self.group is not None:
      self.group.set_states({s: state["shards"][str(s)]["source"]
                             for s in self.shards})
    for s, b in self.shards.items():
      b.set_state(state["shards"][str(s)])


def _broadcast_json(value):
  """`value` (JSON-able) of process 0, on every process."""
  raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
  n = int(np.asarray(multihost_utils.broadcast_one_to_all(
      np.asarray([raw.size], np.int32)))[0])
  buf = np.zeros(n, np.uint8)
  buf[:min(n, raw.size)] = raw[:n]
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  return json.loads(buf.tobytes())


def bucket_stats(bucket: Bucket) -> dict[str, tuple[np.ndarray, float]]:
  """{hookpoint: (mean vector, mean squared norm)} of a bucket, in float64."""
  out = {}
  for n, a in bucket.items():
    a64 = a.astype(np.float64)
    out[n] = (a64.mean(0), float(np.square(a64).sum(-1).mean()))
  return out


__all__ = ["ActivationBatches", "Bucket", "BucketSource", "HarvestSource",
           "ShardedBatches", "bucket_permutation", "bucket_stats"]
