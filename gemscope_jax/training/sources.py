"""Where a run's activations come from: Gemma's weights laid out over the
mesh, token windows of the plan's text, and the activation batches (live
Gemma, an on-disk cache, or live data shards harvested in lockstep across
processes).

Caveat: a cache is written whole, by process 0 alone, from the unsharded
stream (so it does not depend on the process layout); every other process
waits at a barrier until it is complete.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemscope_jax import models
from gemscope_jax.convert import pretrained
from gemscope_jax.data import activation_cache, lockstep, pipeline, stream
from gemscope_jax.parallel import distributed, gemma_layout, make_mesh
from gemscope_jax.text import conversations, corpora
from gemscope_jax.training.plans import Plan


def global_harvest(plan: Plan) -> bool:
  """Whether Gemma runs over the global mesh across processes: several
  processes and a live source (an activation cache is written by process 0
  alone, with weights on its own devices)."""
  return jax.process_count() > 1 and not plan.data.cache_dir


def load_gemma(plan: Plan, mesh: Mesh | None = None) -> dict:
  """Gemma's parameters in the plan's dtype, laid out as `mesh.gemma` says.

  Args:
    plan: the run's plan (model checkpoint and dtype, mesh.gemma, seed,
      data.cache_dir).
    mesh: the run's mesh; needed for 'fsdp' / 'fsdp_tp' (built from the
      plan over all devices when None). With several processes and a live
      source (`global_harvest`) the weights are laid out over this global
      mesh (replicated or split over every process's devices); with an
      activation cache, over this process's devices
      (`gemma_layout.gemma_mesh`).

  Returns:
    The parameter tree: replicated arrays, or arrays sharded by
    `gemma_layout.gemma_param_shardings`. Random weights are created
    directly in their shards; a transformers checkpoint (folder or Hub
    name) is placed tensor by tensor as it is read (by every process), a
    GGUF or Orbax one is read whole first, then placed.
  """
  mc, dtype = plan.model.config, jnp.dtype(plan.model.dtype)
  mode = gemma_layout.check_layout(plan.mesh.gemma)
  shardings = None
  if global_harvest(plan):
    mesh = make_mesh(plan.mesh) if mesh is None else mesh
    shardings = gemma_layout.gemma_param_shardings(mc, mesh, mode)
  elif mode != "replicated":
    mesh = gemma_layout.gemma_mesh(make_mesh(plan.mesh) if mesh is None
                                   else mesh)
    shardings = gemma_layout.gemma_param_shardings(mc, mesh, mode)
  if plan.model.checkpoint == "random":
    init = lambda key: models.init_params(mc, key, dtype)
    return jax.jit(init, out_shardings=shardings)(jax.random.key(plan.seed))
  # Each tensor goes to its shards as it is read (no host copy of the
  # whole model for a transformers checkpoint or Hub name).
  _, params = pretrained.load_model(plan.model.checkpoint, mc, dtype,
                                    shardings=shardings)
  return params


def window_dataset(plan: Plan, tokenizer, *, progress: bool,
                   shard_index: int = 0, shard_count: int = 1):
  """Batches of `data.model_batch_size` token windows of the plan's text
  (a grain dataset; shuffled, endless, one data shard of `shard_count`);
  with data.format 'chat_jsonl' they also carry "exclude", the chat
  template's tokens."""
  d = plan.data
  files = corpora.text_files(d.text, "config.data.text")
  if d.format == "chat_jsonl":
    source = conversations.ConversationWindowSource.from_files(
        tokenizer, files, d.seq_len)
  else:
    source = pipeline.TokenWindowSource.from_files(
        tokenizer, files, d.seq_len, progress=progress)
  return pipeline.make_window_dataset(
      source, batch_size=d.model_batch_size, seed=d.seed,
      shuffle=d.shuffle_windows, num_epochs=None,
      shard_index=shard_index, shard_count=shard_count)


def _harvest_sharding(plan: Plan, mesh: Mesh):
  """How a single shard's Gemma token batches are split: over the run's
  'data' axis on one process; over this process's own devices on several
  (only when process 0 alone writes an activation cache; live multi-process
  shards go through `_lockstep_batches`)."""
  if jax.process_count() > 1:
    mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
  data_size = mesh.shape["data"]
  if data_size > 1 and plan.data.model_batch_size % data_size == 0:
    return NamedSharding(mesh, PartitionSpec("data", None))
  return None


def make_source(plan: Plan, mesh: Mesh, gemma_params, tokenizer, *,
                progress: bool, hookpoints: list[str], shard_index: int = 0,
                shard_count: int = 1) -> stream.BucketSource:
  """The bucket source the plan asks for: live Gemma, or a disk cache.

  `hookpoints` are all harvested by each forward. With `shard_count` > 1
  the source is data shard `shard_index`: every `shard_count`-th window
  (buckets of bucket_tokens / shard_count rows), or every
  `shard_count`-th cache shard.
  """
  hookpoints, d = list(hookpoints), plan.data

  def live(index, count):
    return stream.HarvestSource(
        plan.model.config, gemma_params,
        window_dataset(plan, tokenizer, progress=progress, shard_index=index,
                       shard_count=count),
        hookpoints, tokenizer, bucket_tokens=-(-d.bucket_tokens // count),
        dtype=jnp.dtype(plan.model.dtype),
        sharding=_harvest_sharding(plan, mesh))

  if not d.cache_dir:
    return live(shard_index, shard_count)
  meta = {"model": plan.model.name, "checkpoint": plan.model.checkpoint,
          "dtype": plan.model.dtype, "hookpoints": hookpoints,
          "text": d.text, "seq_len": d.seq_len, "seed": d.seed}
  if d.format != "text":
    meta["format"] = d.format  # only then, so older caches still resume
  if distributed.is_main_process():
    activation_cache.write_cache(
        d.cache_dir, live(0, 1),
        num_tokens=d.cache_tokens or plan.loop.num_tokens, metadata=meta,
        progress=progress, size_name=("data.cache_tokens" if d.cache_tokens
                                      else "train.num_tokens"))
  # Every process passes here once per local shard: number the barriers.
  per_process = max(1, shard_count // jax.process_count())
  distributed.barrier(f"gemscope_cache_{shard_index % per_process}")
  cache = activation_cache.ActivationCache(d.cache_dir)
  return activation_cache.CacheBuckets(cache, seed=d.seed,
                                       shard_index=shard_index,
                                       shard_count=shard_count)


def _lockstep_batches(plan: Plan, mesh: Mesh, gemma_params, tokenizer, *,
                      progress: bool, hookpoints: list[str],
                      num_shards: int) -> stream.ShardedBatches:
  """Live data shards harvested together (`lockstep.LockstepHarvest`):
  every forward takes model_batch_size windows of every shard, over the
  global mesh when there are several processes."""
  d = plan.data
  local = distributed.local_shards(num_shards)
  rows = len(local) * d.model_batch_size
  per_process = mesh.shape["data"] // jax.process_count()
  if jax.process_count() > 1 and rows % per_process:
    raise ValueError(
        f"config.data.model_batch_size: {d.model_batch_size} windows x "
        f"{len(local)} data shard(s) per process is not divisible by the "
        f"{per_process} rows of the mesh's data axis each process holds")
  group = lockstep.LockstepHarvest(
      plan.model.config, gemma_params,
      {s: window_dataset(plan, tokenizer, progress=progress, shard_index=s,
                         shard_count=num_shards) for s in local},
      hookpoints, tokenizer,
      rows_per_bucket=-(-d.bucket_tokens // num_shards),
      mesh=mesh, dtype=jnp.dtype(plan.model.dtype))
  shards = {s: stream.ActivationBatches(
      group.shard(s), batch_size=plan.loop.batch_size // num_shards,
      seed=d.seed) for s in local}
  return stream.ShardedBatches(shards, num_shards, group=group)


def make_batches(plan: Plan, mesh: Mesh, gemma_params, tokenizer, *,
                 progress: bool, hookpoints: list[str]):
  """This process's training batches: `stream.ActivationBatches` over
  `make_source` for one data shard (the single-process default), else a
  `stream.ShardedBatches` over the data shards this process serves (live
  ones harvested in lockstep, see `_lockstep_batches`)."""
  batch_size, seed = plan.loop.batch_size, plan.data.seed
  num_shards = distributed.num_data_shards(plan.data.num_shards, batch_size)
  if num_shards == 1:
    return stream.ActivationBatches(
        make_source(plan, mesh, gemma_params, tokenizer, progress=progress,
                    hookpoints=hookpoints),
        batch_size=batch_size, seed=seed)
  if not plan.data.cache_dir:
    return _lockstep_batches(plan, mesh, gemma_params, tokenizer,
                             progress=progress, hookpoints=list(hookpoints),
                             num_shards=num_shards)
  shards = {}
  for s in distributed.local_shards(num_shards):
    source = make_source(plan, mesh, gemma_params, tokenizer,
                         progress=progress, hookpoints=hookpoints,
                         shard_index=s, shard_count=num_shards)
    shards[s] = stream.ActivationBatches(
        source, batch_size=batch_size // num_shards, seed=seed)
  return stream.ShardedBatches(shards, num_shards)
