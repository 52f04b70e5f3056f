"""Lockstep harvest: the live data shards of a run filled by shared forwards.

With S > 1 data shards and a live source, one `LockstepHarvest` per process
drives all of the process's shards together. Every Gemma forward takes one
batch of `data.model_batch_size` windows from every shard (local shards
concatenated in shard order); with several processes the token batch is one
global array over the run's mesh (process p's rows are its shards' windows,
so the global batch is shards 0 .. S-1 in order) and Gemma runs once over
the global mesh, its weights laid out over all devices. Each process keeps
its own rows of the output and drops special, padding and chat-template
tokens locally.

Bucket boundaries are shared: forwards go on until every shard of every
process holds at least `rows_per_bucket` ordinary-token rows (a global
decision, an allgather of one integer per process), then each shard's
bucket is its first `rows_per_bucket` rows and the rest are dropped. So a
shard's bucket depends only on its own windows, every shard loads its next
bucket at the same step, and all processes make the same number of
collective forwards. A shard's position is its window iterator's state at
the start of its current bucket; all shards are restored together.

`shard(s)` is the `stream.BucketSource` of shard s for `ActivationBatches`.

Caveat: up to one forward's rows per shard are dropped at every bucket end
(a single-shard `HarvestSource` keeps them in its bucket), and every
forward waits for the slowest process.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemscope_jax.text.windows import ordinary_mask
from gemscope_jax import models
from gemscope_jax.data import pipeline
from gemscope_jax.data.stream import _READ, Bucket


class LockstepHarvest:
  """Buckets of several data shards, harvested by shared Gemma forwards.

  Attributes:
    hookpoints: the hookpoint names every bucket holds.
    rows_per_bucket: rows of every shard's bucket.
    tokens_seen: real (non-padding) token positions of this process run
      through Gemma so far (not restored), for throughput figures.
  """

  def __init__(self, model_config: models.Gemma3Config, params,
               window_datasets: dict[int, Any], hookpoints: Sequence[str],
               tokenizer, *, rows_per_bucket: int, mesh: Mesh | None,
               dtype=jnp.float32):
    """Sets up the harvest; nothing runs until a shard asks for a bucket.

    Args:
      model_config: the Gemma configuration.
      params: Gemma's parameters; with several processes laid out over
        `mesh` (all processes' devices).
      window_datasets: {shard index: grain window dataset} of this
        process's shards (`pipeline.make_window_dataset` per shard).
      hookpoints: names such as 'layer_6/resid_post'.
      tokenizer: gives the special-token ids dropped from buckets.
      rows_per_bucket: exact rows of every shard's bucket.
      mesh: the ('data', 'model') mesh the token batch is split over (its
        'data' axis); None runs unsharded (one process only).
      dtype: Gemma's compute dtype; activations are stored as float32.
    """
    self.config = model_config
    self.params = params
    self.datasets = dict(sorted(window_datasets.items()))
    self.hookpoints = [h.name for h in
                       models.hooks.parse_all(hookpoints, model_config)]
    self.tokenizer = tokenizer
    self.rows_per_bucket = int(rows_per_bucket)
    self.mesh = mesh
    self.dtype = dtype
    self.tokens_seen = 0
    self._its = {s: pipeline.iterate(d, _READ)
                 for s, d in self.datasets.items()}
    self._pending: dict[int, Bucket] = {}
    self._starts: dict[int, Any] = {}
    self._restored: dict[int, Any] = {}
    self._out = None
    if mesh is not None:
      self._rows = NamedSharding(mesh, PartitionSpec("data", None))
      self._out = jax.jit(lambda x: x, out_shardings=NamedSharding(
          mesh, PartitionSpec("data", None, None)))

  def shard(self, s: int) -> "ShardSource":
    """The bucket source of local shard `s`."""
    return ShardSource(self, s)

  def _local_rows(self, x: jax.Array) -> np.ndarray:
    """This process's rows of a global (B, T, D) array, in row order."""
    x = self._out(x)
    pieces = {}
    for sh in x.addressable_shards:
      pieces.setdefault(sh.index[0].start or 0, sh.data)
    return np.concatenate([np.asarray(pieces[k], np.float32)
                           for k in sorted(pieces)])

  def _forward(self, tokens: np.ndarray, mask: np.ndarray
               ) -> dict[str, np.ndarray]:
    """{hookpoint: (B, T, D) float32} of this process's (B, T) windows."""
    t, m = tokens, mask
    multi = jax.process_count() > 1
    if multi:
      t = jax.make_array_from_process_local_data(self._rows, tokens)
      m = jax.make_array_from_process_local_data(self._rows, mask)
    elif self.mesh is not None and len(tokens) % self.mesh.shape["data"] == 0:
      t = jax.device_put(tokens, self._rows)
      m = jax.device_put(mask, self._rows)
    out = models.forward(self.params, t, m, config=self.config,
                         hookpoints=self.hookpoints, logits=False,
                         loss=False, dtype=self.dtype)
    if multi:
      return {n: self._local_rows(out.activations[n])
              for n in self.hookpoints}
    return {n: np.asarray(out.activations[n], np.float32)
            for n in self.hookpoints}

  def _enough(self, rows: dict[int, int]) -> bool:
    least = min(rows.values())
    if jax.process_count() > 1:
      least = int(np.min(multihost_utils.process_allgather(
          np.asarray([least], np.int64))))
    return least >= self.rows_per_bucket

  def _harvest(self) -> None:
    """Fills every local shard's pending bucket (collective on several
    processes: all of them call it at the same step)."""
    self._starts = {s: it.get_state() for s, it in self._its.items()}
    parts = {s: {n: [] for n in self.hookpoints} for s in self._its}
    rows = {s: 0 for s in self._its}
    while not self._enough(rows):
      batches = {s: next(it) for s, it in self._its.items()}
      tokens = np.concatenate([b["tokens"] for b in batches.values()])
      mask = np.concatenate([b["mask"] for b in batches.values()])
      acts = self._forward(tokens, mask)
      # Every shard reads the same format: all have "exclude" or none.
      exclude = (np.concatenate([b["exclude"] for b in batches.values()])
                 if "exclude" in batches[min(batches)] else None)
      keep = ordinary_mask(self.tokenizer, tokens, mask, exclude)
      self.tokens_seen += int(mask.sum())
      start = 0
      for s, b in batches.items():
        k = keep[start:start + len(b["tokens"])]
        for n in self.hookpoints:
          parts[s][n].append(acts[n][start:start + len(k)][k])
        rows[s] += int(k.sum())
        start += len(k)
    self._pending = {
        s: {n: np.concatenate(p[n])[:self.rows_per_bucket]
            for n in self.hookpoints} for s, p in parts.items()}

  def next_bucket(self, s: int) -> Bucket:
    if s not in self._pending:
      if self._pending:
        raise RuntimeError(f"data shard {s} asked for a bucket before the "
                           "other shards took theirs")
      self._harvest()
    return self._pending.pop(s)

  def get_state(self, s: int) -> dict[str, Any]:
    if s in self._pending:
      return {"windows": self._starts[s]}
    return {"windows": self._its[s].get_state()}

  def set_states(self, states: dict[int, dict[str, Any]]) -> None:
    """Restores every local shard at once (their buckets' start states)."""
    for s in self._its:
      self._its[s] = pipeline.iterate(self.datasets[s], _READ)
      self._its[s].set_state(states[s]["windows"])
    self._pending, self._starts = {}, {}
    self._restored = dict(states)

  def set_state(self, s: int, state: dict[str, Any]) -> None:
    if self._restored.get(s) == state:
      del self._restored[s]  # already restored by `set_states`
      return
    if len(self._its) > 1:
      raise RuntimeError("restore lockstep shards together (set_states)")
    self.set_states({s: state})
    self._restored = {}


class ShardSource:
  """One shard of a `LockstepHarvest`, as a `stream.BucketSource`."""

  def __init__(self, group: LockstepHarvest, index: int):
    self.group = group
    self.index = int(index)
    self.hookpoints = group.hookpoints

  @property
  def tokens_seen(self) -> int:
    return self.group.tokens_seen

  def next_bucket(self) -> Bucket:
    return self.group.next_bucket(self.index)

  def get_state(self) -> dict[str, Any]:
    return self.group.get_state(self.index)

  def set_state(self, state: dict[str, Any]) -> None:
    self.group.set_state(self.index, state)


__all__ = ["LockstepHarvest", "ShardSource"]
