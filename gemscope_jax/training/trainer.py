"""`train(config, workdir)`: one sharded optax loop for every dictionary.

The loop, in order:
1. `config.check` validates the config; Gemma and the tokenizer load.
2. A `Mesh` with axes ('data', 'model') is built over the devices; the
   config's logical-axis rules map the dictionary's axes ('latent', 'embed')
   and the activation batch ('batch') onto it, and every array of the train
   state gets an explicit `NamedSharding`.
3. Activations stream from `data.stream` (live Gemma or an on-disk cache).
   A fresh run estimates the input scale (E||x||^2 = 1 after dividing by it)
   and the data mean (the initial b_dec) from the first bucket.
4. One jitted, state-donating step: forward, loss, gradients (the decoder
   rows' parallel component removed), Adam (beta1 = 0 by default) with
   warm-up and a linear decay, decoder rows back to unit norm, JumpReLU
   thresholds kept >= 0, the sparsity coefficient warmed up linearly.
5. Every `checkpoint_every_steps` an Orbax checkpoint holds the state, the
   stream's position and the config; rerunning the same command resumes
   there and continues the same data order. A non-finite loss or gradient
   stops the run with `TrainingDiverged`, leaving the last good checkpoint.
6. Metrics go to a progress bar (activations/s, ETA, L0, FVU), a JSONL log
   and TensorBoard; at the end the dictionary is exported in the Gemma
   Scope 2 layout and evaluated on held-out text (`metrics.json`).

Caveat: the finiteness check runs at log and checkpoint steps (reading a
scalar every step would serialise the device queue), so a run may compute up
to `log_every_steps` steps past a NaN before it stops; none is saved.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemscope_jax import assets, dictionaries, models, pretrained
from gemscope_jax.data import pipeline, stream
from gemscope_jax.dictionaries import dense as dense_lib
from gemscope_jax.dictionaries import sparse as sparse_lib
from gemscope_jax.training import checkpoints as ckpt_lib
from gemscope_jax.training import config as config_lib
from gemscope_jax.training import distributed

log = logging.getLogger(__name__)

# Changing these between a checkpoint and a resumed run changes what the
# saved state means; everything else (logging, eval, num_tokens) may change.
FROZEN_FIELDS = ("seed", "model.name", "model.checkpoint", "model.dtype",
                 "hookpoint", "target", "group", "data.text", "data.seq_len",
                 "data.model_batch_size", "data.bucket_tokens",
                 "data.cache_dir", "data.shuffle_windows",
                 "data.num_shards", "dictionary",
                 "train.batch_size")


class TrainingDiverged(FloatingPointError):
  """The loss or gradient went non-finite; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole.

  Attributes:
    step: steps taken.
    params: the dictionary's parameters (float32).
    opt_state: optax state.
    norm_scale: the scalar inputs are divided by (E||x / s||^2 = 1); one
      per layer, (n_layers,), for crosscoders and CLTs.
    target_scale: the same for the target (transcoders, CLTs); equal to
      norm_scale where the dictionary reconstructs its input.
    last_fired: (latent shape) the step count when each latent last fired.
    min_kept_sum, min_kept_count: BatchTopK's running smallest kept
      activation over the last fifth of training (its export threshold).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  norm_scale: jax.Array
  target_scale: jax.Array
  last_fired: jax.Array
  min_kept_sum: jax.Array
  min_kept_count: jax.Array


def make_mesh(c: ml_collections.ConfigDict,
              devices: list | None = None) -> Mesh:
  """The ('data', 'model') mesh the config asks for over `devices`.

  With several processes the devices are ordered by process, so each
  process's devices hold a contiguous block of the batch's rows, and a
  'model' group must not span processes (each process feeds whole rows).
  """
  procs = jax.process_count()
  if devices is None:
    devices = jax.devices()
    if procs > 1:
      devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  n = len(devices)
  model = c.mesh.model
  data = n // model if c.mesh.data == -1 else c.mesh.data
  where = (f"the {n} device(s) of {procs} processes "
           f"({jax.local_device_count()} per process)" if procs > 1 else
           f"the {n} available device(s)")
  if data * model != n:
    raise ValueError(f"config.mesh: data={c.mesh.data} x model={model} does "
                     f"not cover {where}")
  if procs > 1 and jax.local_device_count() % model:
    raise ValueError(f"config.mesh.model: {model} does not divide the "
                     f"{jax.local_device_count()} devices of each process "
                     f"({procs} processes); a model group must sit in one "
                     "process")
  if c.train.batch_size % data:
    raise ValueError(f"config.train.batch_size: {c.train.batch_size} is not "
                     f"divisible by the mesh's data axis ({data})")
  return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def dictionary_config(c: ml_collections.ConfigDict,
                      model_config: models.Gemma3Config
                      ) -> dictionaries.DictConfig:
  return config_lib.layout(c, None, model_config).config(c, model_config)


def init_args(c: ml_collections.ConfigDict, layout: config_lib.Layout,
              bucket: stream.Bucket) -> tuple[np.ndarray, ...]:
  """(b_dec, norm_scale, target_scale) of a fresh run, from a bucket.

  Each input (and target) hookpoint is divided by the root of its mean
  squared norm; b_dec starts at the target's normalised mean (or zeros).
  Multi-layer layouts get one scale per layer and a (n_layers, d) b_dec.
  """
  stats = stream.bucket_stats({h: bucket[h] for h in layout.hookpoints})
  scales = {h: np.sqrt(stats[h][1]) for h in layout.hookpoints}
  s_in = np.asarray([scales[h] for h in layout.inputs], np.float32)
  s_out = np.asarray([scales[h] for h in layout.targets], np.float32)
  b_dec = np.stack([stats[h][0] / scales[h] for h in layout.targets])
  if c.train.b_dec_init != "mean":
    b_dec = np.zeros_like(b_dec)
  if not layout.multilayer:
    return b_dec[0].astype(np.float32), s_in[0], s_out[0]
  return b_dec.astype(np.float32), s_in, s_out


def num_steps(c: ml_collections.ConfigDict) -> int:
  return c.train.num_tokens // c.train.batch_size


def lr_schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up, constant, then a linear decay to 0 at the end."""
  total = num_steps(c)
  t = c.train
  warmup = min(t.lr_warmup_steps, total)
  decay = int(round(t.lr_decay_fraction * total))
  flat = max(total - warmup - decay, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0 if warmup else t.lr, t.lr, max(warmup, 1)),
       optax.constant_schedule(t.lr),
       optax.linear_schedule(t.lr, 0.0, max(decay, 1))],
      [warmup, warmup + flat])


def make_optimizer(c: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  parts = []
  if c.train.get("grad_clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(c.train.grad_clip_norm))
  return optax.chain(
      *parts,
      optax.scale_by_adam(b1=c.train.beta1, b2=c.train.beta2),
      optax.scale_by_learning_rate(lr_schedule(c)))


class Run:
  """The pieces of a run that do not depend on data: module, optimizer,
  mesh, shardings and the jitted step.

  Attributes:
    layout: what the dictionary reads and predicts (`config.Layout`).
    init_shapes: (b_dec, norm_scale, target_scale) ShapeDtypeStructs of
      `init`'s arguments after the key.
    batch_sharding: {'x': ..., 'target': ...} of the step's input (no
      'target' where the dictionary reconstructs its input).
  """

  def __init__(self, c: ml_collections.ConfigDict,
               model_config: models.Gemma3Config, devices=None):
    self.c = c
    self.model_config = model_config
    self.layout = config_lib.layout(c, None, model_config)
    self.dict_config = self.layout.config(c, model_config)
    self.module = dictionaries.make_dictionary(self.dict_config)
    if c.train.get("l0_per_token", False):
      self.module = self.module.clone(l0_per_token=True)
    self.tx = make_optimizer(c)
    self.mesh = make_mesh(c, devices)
    self.rules = tuple((a, b) for a, b in c.mesh.rules)
    self.num_steps = num_steps(c)
    dc = self.dict_config
    d_out = dc.d_out or dc.d_in
    n = len(self.layout.inputs)
    multi = self.layout.multilayer
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    self.init_shapes = (f32(n, d_out) if multi else f32(d_out),
                        f32(n) if multi else f32(), f32(n) if multi else f32())
    abstract = jax.eval_shape(self._boxed_state, jax.random.key(0),
                              *self.init_shapes)
    specs = nn.get_partition_spec(abstract)
    self.state_sharding = nn.logical_to_mesh_sharding(specs, self.mesh,
                                                      self.rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract), self.state_sharding)
    batch_axis = dict(self.rules).get("batch")
    rows = PartitionSpec(batch_axis, *([None] * (2 if multi else 1)))
    self.batch_sharding = {"x": NamedSharding(self.mesh, rows)}
    if not self.layout.reconstructs_input:
      self.batch_sharding["target"] = NamedSharding(self.mesh, rows)
    self.step = jax.jit(self._step, in_shardings=(self.state_sharding,
                                                  self.batch_sharding),
                        out_shardings=(self.state_sharding, None),
                        donate_argnums=0)
    self.init = jax.jit(
        lambda k, b, s, t: nn.unbox(self._boxed_state(k, b, s, t)),
        out_shardings=self.state_sharding)

  def batch(self, bucket_rows: stream.Bucket) -> dict[str, np.ndarray]:
    """The step's host input from rows of a bucket: {'x': (B, d) or
    (B, n_layers, d), 'target': the same for the targets}."""
    def gather(names):
      if not self.layout.multilayer:
        return bucket_rows[names[0]]
      return np.stack([bucket_rows[h] for h in names], axis=1)
    out = {"x": gather(self.layout.inputs)}
    if not self.layout.reconstructs_input:
      out["target"] = gather(self.layout.targets)
    return out

  def initial_state(self, bucket: stream.Bucket) -> TrainState:
    """A fresh state: scales and b_dec from `bucket` (`init_args`)."""
    b_dec, scale, target_scale = init_args(self.c, self.layout, bucket)
    return self.init(jax.random.key(self.c.seed), jnp.asarray(b_dec),
                     jnp.asarray(scale), jnp.asarray(target_scale))

  def _boxed_state(self, key, b_dec, norm_scale, target_scale) -> TrainState:
    params = dictionaries.init_params(self.module, key, b_dec=b_dec)
    scale = self.c.train.get("init_norm", 1.0)
    if scale != 1.0:  # both are unit-norm per latent at init
      params = {k: (v.replace_boxed(v.unbox() * scale)
                    if k in ("w_enc", "w_dec") else v)
                for k, v in params.items()}
    inner = getattr(self.module, "dictionary", self.module)
    shape = getattr(inner, "latent_shape", (self.dict_config.d_sae,))
    names = getattr(inner, "latent_axes_names", ("latent",))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state=self.tx.init(params), norm_scale=norm_scale,
        target_scale=target_scale,
        last_fired=nn.LogicallyPartitioned(jnp.zeros(shape, jnp.int32),
                                           names),
        min_kept_sum=jnp.zeros((), jnp.float32),
        min_kept_count=jnp.zeros((), jnp.int32))

  def normalised(self, state: TrainState, batch: dict) -> tuple:
    """(x, target or None) of a step input in training units."""
    def scaled(a, s):
      s = s[:, None] if self.layout.multilayer else s
      return a.astype(jnp.float32) / s
    x = scaled(batch["x"], state.norm_scale)
    target = batch.get("target")
    if target is not None:
      target = scaled(target, state.target_scale)
    return x, target

  def sparsity_coeff(self, step):
    t = self.c.train
    ramp = jnp.minimum(1.0, (step + 1) / max(t.sparsity_warmup_steps, 1))
    return t.sparsity_coeff * ramp

  def _loss_and_grads(self, params, x, coeff, target=None):
    """(LossOutput, (latent shape) fired-in-this-batch mask, grads)."""
    if self.c.train.step == "sparse":
      lo, out, grads = sparse_lib.sparse_loss_and_grads(
          self.module, params, x, sparsity_coeff=coeff,
          capacity=self.c.train.sparse_capacity * x.shape[0])
      fired = jnp.zeros((self.dict_config.d_sae,), bool).at[
          out.latent_ids].max(out.values > 0)
      return lo, fired, grads

    if self.c.train.step == "dense" and dense_lib.supported(self.module):
      # One device: the fused CPU kernel; a partitioned program: jnp ops.
      lo, _, grads, fired = dense_lib.loss_and_grads(
          self.module, params, x, sparsity_coeff=coeff, target=target,
          use_kernel=self.mesh.size == 1)
      return lo, fired > 0, grads

    def loss_fn(p):
      lo, out = dictionaries.compute_loss(self.module, p, x,
                                          sparsity_coeff=coeff, target=target)
      return lo.total, (lo, out)

    (_, (lo, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return lo, jnp.any(out.latents > 0, axis=0), grads

  def _step(self, state: TrainState, batch: dict):
    x, target = self.normalised(state, batch)
    coeff = self.sparsity_coeff(state.step)
    lo, fired, grads = self._loss_and_grads(state.params, x, coeff, target)
    params, opt_state = dictionaries.apply_update(
        self.module, self.tx, state.params, state.opt_state, grads,
        unit_decoder=self.c.train.get("unit_decoder", True))
    step = state.step + 1
    last_fired = jnp.where(fired, step, state.last_fired)
    silent_tokens = (step - last_fired) * x.shape[0]
    late = step > int(0.8 * self.num_steps)
    min_kept = lo.aux.get("min_kept")
    kept_sum, kept_count = state.min_kept_sum, state.min_kept_count
    if min_kept is not None:
      ok = late & jnp.isfinite(min_kept)
      kept_sum = kept_sum + jnp.where(ok, min_kept, 0.0)
      kept_count = kept_count + ok.astype(jnp.int32)
    grad_norm = optax.global_norm(grads)
    metrics = {
        "loss": lo.total, "mse": lo.mse, "sparsity": lo.sparsity,
        "sparsity_coeff": coeff, "lr": lr_schedule(self.c)(state.step),
        "grad_norm": grad_norm,
        "finite": jnp.isfinite(lo.total) & jnp.isfinite(grad_norm),
        "dead_fraction": jnp.mean(
            (silent_tokens >= self.c.train.dead_after_tokens
             ).astype(jnp.float32)),
        **{k: v for k, v in lo.aux.items() if jnp.ndim(v) == 0},
    }
    for k, v in lo.aux.items():
      if k.endswith("_per_layer"):  # multi-layer: one entry per target
        for i, h in enumerate(self.layout.targets):
          metrics[f"{h}/{k[:-len('_per_layer')]}"] = v[i]
    new = TrainState(step=step, params=params, opt_state=opt_state,
                     norm_scale=state.norm_scale,
                     target_scale=state.target_scale, last_fired=last_fired,
                     min_kept_sum=kept_sum, min_kept_count=kept_count)
    return new, metrics


def global_harvest(c: ml_collections.ConfigDict) -> bool:
  """Whether Gemma runs over the global mesh across processes: several
  processes and a live source (an activation cache is written by process 0
  alone, with weights on its own devices)."""
  return jax.process_count() > 1 and not c.data.cache_dir


def load_gemma(c: ml_collections.ConfigDict, model_config: models.Gemma3Config,
               mesh: Mesh | None = None) -> dict:
  """Gemma's parameters in `c.model.dtype`, laid out as `c.mesh.gemma` says.

  Args:
    c: the config (model.checkpoint, model.dtype, mesh.gemma, seed,
      data.cache_dir).
    model_config: the Gemma size.
    mesh: the run's mesh; needed for 'fsdp' / 'fsdp_tp' (built from the
      config over all devices when None). With several processes and a
      live source (`global_harvest`) the weights are laid out over this
      global mesh (replicated or split over every process's devices); with
      an activation cache, over this process's devices (`sharding.gemma_mesh`).

  Returns:
    The parameter tree: replicated arrays, or arrays sharded by
    `sharding.gemma_param_shardings`. Random weights are created directly
    in their shards; a checkpoint is read whole first (by every process),
    then placed.
  """
  from gemscope_jax.training import sharding  # pylint: disable=import-outside-toplevel
  dtype = jnp.dtype(c.model.dtype)
  mode = sharding.check_layout(c.mesh.gemma)
  shardings = None
  if global_harvest(c):
    mesh = make_mesh(c) if mesh is None else mesh
    shardings = sharding.gemma_param_shardings(model_config, mesh, mode)
  elif mode != "replicated":
    mesh = sharding.gemma_mesh(make_mesh(c) if mesh is None else mesh)
    shardings = sharding.gemma_param_shardings(model_config, mesh, mode)
  if c.model.checkpoint == "random":
    init = lambda key: models.init_params(model_config, key, dtype)
    return jax.jit(init, out_shardings=shardings)(jax.random.key(c.seed))
  _, params = pretrained.load_model(c.model.checkpoint, model_config, dtype)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  return params


def _window_dataset(c: ml_collections.ConfigDict, tokenizer, *, progress,
                    shard_index: int = 0, shard_count: int = 1):
  files = config_lib.text_files(c.data.text, "data.text")
  source = pipeline.TokenWindowSource.from_files(
      tokenizer, files, c.data.seq_len, progress=progress)
  return pipeline.make_window_dataset(
      source, batch_size=c.data.model_batch_size, seed=c.seed,
      shuffle=c.data.shuffle_windows, num_epochs=None,
      shard_index=shard_index, shard_count=shard_count)


def _harvest_sharding(c: ml_collections.ConfigDict, run: Run):
  """How a single shard's Gemma token batches are split: over the run's
  'data' axis on one process; over this process's own devices on several
  (only when process 0 alone writes an activation cache; live multi-process
  shards go through `_lockstep_batches`)."""
  if jax.process_count() == 1:
    mesh = run.mesh
  else:
    mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
  data_size = mesh.shape["data"]
  if data_size > 1 and c.data.model_batch_size % data_size == 0:
    return NamedSharding(mesh, PartitionSpec("data", None))
  return None


def make_source(c: ml_collections.ConfigDict, run: Run, gemma_params,
                tokenizer, *, progress: bool,
                hookpoints: list[str] | None = None, shard_index: int = 0,
                shard_count: int = 1) -> stream.BucketSource:
  """The bucket source the config asks for: live Gemma, or a disk cache.

  `hookpoints` (default `[c.hookpoint]`) are all harvested by each forward.
  With `shard_count` > 1 the source is data shard `shard_index`: every
  `shard_count`-th window (buckets of bucket_tokens / shard_count rows), or
  every `shard_count`-th cache shard. A cache is written whole, by process
  0 alone from the unsharded stream, so it does not depend on the layout.
  """
  hookpoints = [c.hookpoint] if hookpoints is None else list(hookpoints)

  def live(index, count):
    return stream.HarvestSource(
        run.model_config, gemma_params,
        _window_dataset(c, tokenizer, progress=progress, shard_index=index,
                        shard_count=count),
        hookpoints, tokenizer,
        bucket_tokens=-(-c.data.bucket_tokens // count),
        dtype=jnp.dtype(c.model.dtype), sharding=_harvest_sharding(c, run))

  if not c.data.cache_dir:
    return live(shard_index, shard_count)
  from gemscope_jax.data import activation_cache  # pylint: disable=import-outside-toplevel
  meta = {"model": c.model.name, "checkpoint": str(c.model.checkpoint),
          "dtype": c.model.dtype, "hookpoints": hookpoints,
          "text": str(c.data.text), "seq_len": c.data.seq_len,
          "seed": c.seed}
  if distributed.is_main_process():
    activation_cache.write_cache(c.data.cache_dir, live(0, 1),
                                 num_tokens=c.train.num_tokens,
                                 metadata=meta, progress=progress)
  # Every process passes here once per local shard: number the barriers.
  per_process = max(1, shard_count // jax.process_count())
  distributed.barrier(f"gemscope_cache_{shard_index % per_process}")
  cache = activation_cache.ActivationCache(c.data.cache_dir)
  return activation_cache.CacheBuckets(cache, seed=c.seed,
                                       shard_index=shard_index,
                                       shard_count=shard_count)


def _lockstep_batches(c: ml_collections.ConfigDict, run: Run, gemma_params,
                      tokenizer, *, progress: bool, hookpoints: list[str],
                      num_shards: int) -> stream.ShardedBatches:
  """Live data shards harvested together (`lockstep.LockstepHarvest`):
  every forward takes model_batch_size windows of every shard, over the
  global mesh when there are several processes."""
  from gemscope_jax.data import lockstep  # pylint: disable=import-outside-toplevel
  local = distributed.local_shards(num_shards)
  rows = len(local) * c.data.model_batch_size
  per_process = run.mesh.shape["data"] // jax.process_count()
  if jax.process_count() > 1 and rows % per_process:
    raise ValueError(
        f"config.data.model_batch_size: {c.data.model_batch_size} windows x "
        f"{len(local)} data shard(s) per process is not divisible by the "
        f"{per_process} rows of the mesh's data axis each process holds")
  group = lockstep.LockstepHarvest(
      run.model_config, gemma_params,
      {s: _window_dataset(c, tokenizer, progress=progress, shard_index=s,
                          shard_count=num_shards) for s in local},
      hookpoints, tokenizer,
      rows_per_bucket=-(-c.data.bucket_tokens // num_shards),
      mesh=run.mesh, dtype=jnp.dtype(c.model.dtype))
  shards = {s: stream.ActivationBatches(
      group.shard(s), batch_size=c.train.batch_size // num_shards,
      seed=c.seed) for s in local}
  return stream.ShardedBatches(shards, num_shards, group=group)


def make_batches(c: ml_collections.ConfigDict, run: Run, gemma_params,
                 tokenizer, *, progress: bool,
                 hookpoints: list[str] | None = None):
  """This process's training batches: `stream.ActivationBatches` over
  `make_source` for one data shard (the single-process default), else a
  `stream.ShardedBatches` over the data shards this process serves (live
  ones harvested in lockstep, see `_lockstep_batches`)."""
  num_shards = distributed.num_data_shards(c)
  if num_shards == 1:
    return stream.ActivationBatches(
        make_source(c, run, gemma_params, tokenizer, progress=progress,
                    hookpoints=hookpoints),
        batch_size=c.train.batch_size, seed=c.seed)
  if not c.data.cache_dir:
    return _lockstep_batches(
        c, run, gemma_params, tokenizer, progress=progress,
        hookpoints=[c.hookpoint] if hookpoints is None else list(hookpoints),
        num_shards=num_shards)
  shards = {}
  for s in distributed.local_shards(num_shards):
    source = make_source(c, run, gemma_params, tokenizer, progress=progress,
                         hookpoints=hookpoints, shard_index=s,
                         shard_count=num_shards)
    shards[s] = stream.ActivationBatches(
        source, batch_size=c.train.batch_size // num_shards, seed=c.seed)
  return stream.ShardedBatches(shards, num_shards)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resumable(saved: dict, c: ml_collections.ConfigDict,
                    workdir: pathlib.Path) -> None:
  """Raises if `c` changes a field the checkpoint in `workdir` depends on."""
  old, new = _flat(saved), _flat(config_lib.to_json(c))
  for key in sorted(set(old) | set(new)):
    if not any(key == f or key.startswith(f + ".") for f in FROZEN_FIELDS):
      continue
    a, b = old.get(key), new.get(key)
    if json.dumps(a) != json.dumps(b):
      raise ValueError(
          f"config.{key}: {workdir} holds a run with {key}={a!r}, this config "
          f"has {b!r}; resume with the original value or use a new workdir")


class _MetricsLog:
  """metrics.jsonl in the workdir, plus TensorBoard if tensorboardX exists."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self.file = self.tb = None
    if not distributed.is_main_process():
      return  # process 0 writes the run's metrics
    if self.path.exists():
      # Rows past the resumed step describe a timeline that is replayed.
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      with assets.atomic_path(self.path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
    self.file = open(self.path, "a", encoding="utf-8")
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
      self.tb = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
    except ImportError:
      self.tb = None

  def write(self, step: int, row: dict) -> None:
    if self.file is None:
      return
    self.file.write(json.dumps({"step": step, **row}) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(f"train/{k}", v, step)

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


def _progress_bar(run: Run, start_step: int, progress: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  b = run.c.train.batch_size
  return tqdm(total=run.num_steps * b, initial=start_step * b, unit="act",
              unit_scale=True, desc="train",
              disable=not (progress and distributed.is_main_process()),
              dynamic_ncols=True, smoothing=0.1)


def open_workdir(c: ml_collections.ConfigDict, workdir: str | pathlib.Path):
  """Creates `workdir`, checks a checkpoint there may be resumed with `c`,
  and saves `c` as workdir/config.json.

  Returns:
    (workdir as a Path, its `Checkpoints`, the newest step or None, the
    config as JSON).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpts = ckpt_lib.Checkpoints(workdir, max_to_keep=c.train.keep_checkpoints)
  latest = ckpts.latest_step()
  if latest is not None:
    check_resumable(ckpts.read_config(latest), c, workdir)
  config_json = config_lib.to_json(c)
  if distributed.is_main_process():
    with assets.atomic_path(workdir / "config.json") as tmp:
      tmp.write_text(json.dumps(config_json, indent=2))
  return workdir, ckpts, latest, config_json


def restore(ckpts, latest: int | None, run, batches):
  """(step, state) of the newest readable checkpoint, the stream moved to
  its position; (0, None) when there is none (the caller initialises)."""
  restored = ckpts.restore_latest(run.abstract_state) if latest is not None \
      else None
  if restored is None:
    return 0, None
  start_step, state, data_state, _ = restored
  batches.set_state(data_state)
  if distributed.is_main_process():
    print(f"resuming from step {start_step} in {ckpts.directory}")
  return start_step, state


def run_steps(c: ml_collections.ConfigDict, run, state, batches, ckpts,
              config_json: dict, workdir: pathlib.Path, *, start_step: int,
              t0: float, feed, read, progress: bool):
  """The loop shared by single and group runs: step, log, checkpoint.

  Args:
    c: the config.
    run: a `Run` or `group.GroupRun` (`step`, `num_steps`, `c`).
    state: the train state at `start_step`.
    batches: the activation batches (restorable position); with several
      processes every one saves the union of their positions.
    ckpts: the workdir's `Checkpoints`; closed on return.
    config_json: the config as saved beside each checkpoint.
    workdir: where metrics.jsonl goes.
    start_step: the step `state` is at.
    t0: when the end-to-end activations/s clock started.
    feed: batch dict -> the step's input.
    read: (device metrics, step) -> flat float metrics; raises
      `TrainingDiverged` on a non-finite loss or gradient.
    progress: show the progress bar.

  Returns:
    (final step, final state, last logged metrics).
  """
  metrics_log = _MetricsLog(workdir, start_step)
  bar = _progress_bar(run, start_step, progress)
  acts_done, last, step = 0, {}, start_step
  try:
    while step < run.num_steps:
      state, metrics = run.step(state, feed(next(batches)))
      step += 1
      acts_done += c.train.batch_size
      bar.update(c.train.batch_size)
      save = (step % c.train.checkpoint_every_steps == 0
              or step == run.num_steps)
      if step % c.train.log_every_steps == 0 or save:
        last = read(metrics, step)
        elapsed = time.perf_counter() - t0
        last["acts_per_s"] = acts_done / max(elapsed, 1e-9)
        last["tokens"] = step * c.train.batch_size
        metrics_log.write(step, last)
        bar.set_postfix(l0=f"{last.get('l0', 0):.1f}",
                        fvu=f"{last.get('fvu', 0):.3f}",
                        dead=f"{last['dead_fraction']:.2f}")
      if save:
        ckpts.save(step, state,
                   distributed.gather_data_state(batches.get_state()),
                   config_json)
  finally:
    bar.close()
    metrics_log.close()
    ckpts.wait()
  ckpts.close()
  return step, state, last


def train(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          progress: bool = True, devices=None) -> dict[str, Any]:
  """Trains (or resumes) the dictionary `c` describes in `workdir`.

  Args:
    c: a config (see `config.default_config`).
    workdir: where checkpoints, logs, the export and metrics go; rerunning
      with the same workdir resumes.
    progress: show progress bars.
    devices: the devices to build the mesh over; all of them if None.

  Returns:
    The final metrics: training metrics of the last step, plus the
    held-out evaluation's when `c.eval.at_end`.

  Raises:
    ValueError / FileNotFoundError: a bad config, naming the field.
    TrainingDiverged: non-finite loss or gradients.
    distributed.DistributedError: the multi-host runtime did not start.
  """
  # Before anything touches a device: a multi-host run fixes the process
  # layout here. Only process 0 shows progress and prints.
  distributed.initialize(c)
  progress = progress and distributed.is_main_process()
  if config_lib.is_group(c):
    from gemscope_jax.training import group  # pylint: disable=import-outside-toplevel
    return group.train(c, workdir, progress=progress, devices=devices)
  model_config = config_lib.check(c)
  run = Run(c, model_config, devices)
  workdir, ckpts, latest, config_json = open_workdir(c, workdir)

  from gemscope_jax.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = default_tokenizer()
  gemma_params = load_gemma(c, model_config, run.mesh)
  batches = make_batches(c, run, gemma_params, tokenizer, progress=progress,
                         hookpoints=run.layout.hookpoints)
  # acts_per_s counts from here: the first bucket's harvest (or its refill
  # on resume) is part of the end-to-end rate.
  t0 = time.perf_counter()

  start_step, state = restore(ckpts, latest, run, batches)
  if state is None:
    if progress:
      print(f"harvesting the first {c.data.bucket_tokens:,} activations of "
            f"{', '.join(run.layout.hookpoints)} (scales and mean)...",
            flush=True)
    state = run.initial_state(batches.peek_bucket())

  def feed(batch):
    return distributed.global_batch(run.batch(batch), run.batch_sharding)

  def read(metrics, step):
    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not last.pop("finite"):
      raise TrainingDiverged(
          f"loss {last['loss']} / gradient norm {last['grad_norm']} at "
          f"step {step}: training stopped; the last good checkpoint is "
          f"step {ckpts.latest_step()} in {ckpts.directory}")
    return last

  step, state, last = run_steps(c, run, state, batches, ckpts, config_json,
                                workdir, start_step=start_step, t0=t0,
                                feed=feed, read=read, progress=progress)
  return finish(c, run, state, gemma_params, tokenizer, workdir, step, last,
                export_fn=export, evaluate_fn=evaluate_state,
                progress=progress)


def finish(c: ml_collections.ConfigDict, run, state, gemma_params,
           tokenizer, workdir: pathlib.Path, step: int, last: dict, *,
           export_fn, evaluate_fn, progress: bool) -> dict[str, Any]:
  """The end shared by single and group runs: the final state whole on
  the host, then process 0 exports and (with `eval.at_end`) evaluates.

  Returns:
    {'step', 'train_{metric}'...} plus the evaluation's metrics.
  """
  result = {"step": step, **{f"train_{k}": v for k, v in last.items()}}
  state = distributed.host_tree(state)
  if c.eval.at_end and global_harvest(c):
    # The weights span every process; process 0 evaluates alone, on a
    # whole copy (a collective, so every process takes part).
    gemma_params = distributed.host_tree(gemma_params)
  if not distributed.is_main_process():
    return result  # process 0 exports and evaluates
  export_fn(run, state, workdir)
  if c.eval.at_end:
    result.update(evaluate_fn(run, state, gemma_params, tokenizer, workdir,
                              progress=progress))
  return result


def export(run: Run, state: TrainState, workdir: pathlib.Path) -> pathlib.Path:
  """Writes the Gemma Scope 2 params folder (raw-unit weights) to
  workdir/export (per-layer files for crosscoders and CLTs); see
  `interop.from_state` for what each architecture becomes."""
  from gemscope_jax import interop  # pylint: disable=import-outside-toplevel
  d = interop.from_state(run, state)
  out = pathlib.Path(workdir) / "export"
  if isinstance(d, interop.MultiLayerInference):
    return interop.save_multilayer_gemmascope2(d, out)
  return interop.save_gemmascope2(d, out, release_layout=False)


def _eval_windows(c: ml_collections.ConfigDict, tokenizer):
  from gemscope_jax.data.windows import windows_from_files  # pylint: disable=import-outside-toplevel
  files = config_lib.text_files(c.eval.text, "eval.text")
  return windows_from_files(tokenizer, files, c.eval.seq_len,
                            c.eval.num_tokens)


def evaluate_state(run: Run, state: TrainState, gemma_params, tokenizer,
                   workdir: pathlib.Path, *, progress: bool = True
                   ) -> dict[str, Any]:
  """Held-out evaluation -> workdir/metrics.json and the frequency plot."""
  from gemscope_jax.training import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  c = run.c
  params = jax.device_get(state.params)
  result = eval_lib.evaluate(
      model_config=run.model_config, model_params=gemma_params,
      hookpoint=c.hookpoint, module=run.module, params=params,
      norm_scale=np.asarray(state.norm_scale),
      target_scale=np.asarray(state.target_scale), layout=run.layout,
      windows=_eval_windows(c, tokenizer), tokenizer=tokenizer,
      batch_size=c.eval.batch_size, dtype=jnp.dtype(c.model.dtype),
      dense_threshold=c.eval.dense_threshold, progress=progress,
      loss_tokens=c.eval.loss_tokens)
  silent = (int(state.step) - np.asarray(state.last_fired)) * c.train.batch_size
  metrics = {**result.metrics, "step": int(state.step),
             # Latents silent over the last dead_after_tokens of training.
             "train_dead_fraction": float(np.mean(
                 silent >= c.train.dead_after_tokens)),
             "trained_tokens": int(state.step) * c.train.batch_size,
             "target_l0": c.dictionary.target_l0, "eval_text": c.eval.text,
             "hookpoint": c.hookpoint, "kind": run.layout.kind,
             "inputs": ",".join(run.layout.inputs),
             "targets": ",".join(run.layout.targets)}
  eval_lib.plot_frequency_histogram(
      result.frequency, workdir / "latent_frequency.png",
      title=f"{run.layout.name} {c.dictionary.architecture} "
      f"{c.dictionary.width}: latent firing frequency")
  eval_lib.write_metrics(metrics, workdir / "metrics.json")
  return metrics


def evaluate_workdir(workdir: str | pathlib.Path, *, progress: bool = True,
                     overrides: dict | None = None) -> dict[str, Any]:
  """Evaluates the newest checkpoint in `workdir` (the `gemscope eval` job),
  a single dictionary or a group."""
  workdir = pathlib.Path(workdir)
  ckpts = ckpt_lib.Checkpoints(workdir, asynchronous=False)
  latest = ckpts.latest_step()
  if latest is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint to evaluate (train "
                            "first, or check the path)")
  c = config_lib.from_json(ckpts.read_config(latest))
  if overrides:
    c = config_lib.apply_overrides(c, overrides)
  model_config = config_lib.check(c)
  if config_lib.is_group(c):
    from gemscope_jax.training import group  # pylint: disable=import-outside-toplevel
    run, evaluate = group.GroupRun(c, model_config), group.evaluate_state
  else:
    run, evaluate = Run(c, model_config), evaluate_state
  restored = ckpts.restore_latest(run.abstract_state)
  ckpts.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}: no readable checkpoint")
  _, state, _, _ = restored
  from gemscope_jax.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = default_tokenizer()
  gemma_params = load_gemma(c, model_config, run.mesh)
  return evaluate(run, state, gemma_params, tokenizer, workdir,
                  progress=progress)
