"""`data.lockstep`: shared bucket boundaries and exact resume, with a fake
Gemma (activations made from the token ids) so no model runs.

Caveat: the multi-process global forward is tested in test_multihost.py.
"""

from __future__ import annotations

import types

import numpy as np

from gemscope_jax import models
from gemscope_jax.data import lockstep, pipeline, stream

SEQ_LEN = 9
HOOK = "layer_0/resid_post"


def _group(num_shards=2, rows=20):
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 500, 4000).astype(np.int32)
  ids[rng.random(ids.size) < 0.2] = 1  # a "special" id: dropped, uneven rows
  src = pipeline.TokenWindowSource(ids, SEQ_LEN, bos_id=2)
  datasets = {s: pipeline.make_window_dataset(
      src, batch_size=3, seed=1, num_epochs=None, shard_index=s,
      shard_count=num_shards) for s in range(num_shards)}
  tok = types.SimpleNamespace(special_ids={1, 2})
  group = lockstep.LockstepHarvest(
      models.Gemma3_270M, None, datasets,
      [HOOK], tok, rows_per_bucket=rows, mesh=None)
  group._forward = lambda t, m: {HOOK: np.stack(  # pylint: disable=protected-access
      [t, t * 2], -1).astype(np.float32)}
  shards = {s: stream.ActivationBatches(group.shard(s), batch_size=4, seed=3)
            for s in datasets}
  return stream.ShardedBatches(shards, num_shards, group=group)


def test_buckets_are_exact_and_resume_matches():
  ref = _group()
  got_all = [next(ref)[HOOK] for _ in range(13)]
  for shard in ref.shards.values():
    assert len(shard._bucket[HOOK]) == 20  # pylint: disable=protected-access
  for cut in (0, 3, 5, 7):
    a = _group()
    for _ in range(cut):
      next(a)
    state = a.get_state()
    b = _group()
    b.set_state(state)
    for i in range(cut, 13):
      np.testing.assert_array_equal(next(b)[HOOK], got_all[i])
