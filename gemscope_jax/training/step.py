"""The sharded train step of one dictionary: `Run`.

A `Run` holds what a step needs and nothing that depends on data: the
module, the optimiser, the ('data', 'model') mesh, the train state's
shardings (from the parameters' logical axis names and the plan's rules),
and the jitted, state-donating step:

  forward, loss and gradients (`training.grads`, by the plan's method) ->
  decoder-row gradients projected, Adam with warm-up and decay, decoder
  rows back to unit norm, thresholds >= 0 (`training.update`) -> counters
  (last step each latent fired, BatchTopK's export threshold) and metrics.

The step closes over frozen plans only (never the ConfigDict), so what the
compiled program depends on is visible. A group of dictionaries of one
shape vmaps this same step (`training.group`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gemscope_jax import dictionaries
from gemscope_jax.data import stream
from gemscope_jax.parallel import distributed, make_mesh
from gemscope_jax.training import grads as grads_lib
from gemscope_jax.training import optim, plans, state as state_lib
from gemscope_jax.training.state import TrainState
from gemscope_jax.training.update import apply_update


class TrainingDiverged(FloatingPointError):
  """The loss or gradient went non-finite; the last good checkpoint is kept."""


def train_update(module, tx: optax.GradientTransformation, params, opt_state,
                 x: jax.Array, sparsity_coeff, *, method: str,
                 target: jax.Array | None = None, sparse_capacity: int = 256,
                 use_kernel: bool = True, unit_decoder: bool | None = None):
  """The parameter update of one step, as `Run.step` does it: loss and
  gradients by `method` (`training.grads`), then `update.apply_update`.

  Returns:
    (params, opt_state, LossOutput, fired-in-this-batch mask, grads).
  """
  lo, fired, grads = grads_lib.loss_and_grads(
      module, params, x, method=method, sparsity_coeff=sparsity_coeff,
      target=target, sparse_capacity=sparse_capacity, use_kernel=use_kernel)
  params, opt_state = apply_update(module, tx, params, opt_state, grads,
                                   unit_decoder=unit_decoder)
  return params, opt_state, lo, fired, grads


class Run:
  """One dictionary's module, optimiser, mesh, shardings and jitted step.

  Attributes:
    plan: the run's `plans.Plan`.
    dictionary: this dictionary's `plans.DictionaryPlan`.
    layout, dict_config, model_config: shorthands into the plans.
    module, tx, mesh, rules, num_steps: as named.
    init_shapes: (b_dec, norm_scale, target_scale) ShapeDtypeStructs of
      `init`'s arguments after the key.
    state_sharding, abstract_state: of the TrainState.
    batch_sharding: {'x': ..., 'target': ...} of the step's input (no
      'target' where the dictionary reconstructs its input).
    step: jitted, donated (state, batch) -> (state, metrics).
    init: jitted (key, b_dec, norm_scale, target_scale) -> state.
  """

  def __init__(self, plan: plans.Plan,
               dictionary: plans.DictionaryPlan | None = None, devices=None):
    self.plan = plan
    self.dictionary = dictionary or plan.dictionaries[0]
    self.model_config = plan.model.config
    self.layout = self.dictionary.layout
    self.dict_config = self.dictionary.config
    self.module = dictionaries.make_dictionary(self.dict_config)
    if self.dictionary.l0_per_token:
      self.module = self.module.clone(l0_per_token=True)
    self.tx = optim.make_optimizer(plan.optimizer)
    self.mesh = make_mesh(plan.mesh, devices,
                          batch_size=plan.step.batch_size)
    self.rules = plan.mesh.rules
    self.num_steps = plan.step.num_steps
    self.init_shapes = state_lib.init_shapes(self.dictionary)
    abstract = jax.eval_shape(self.boxed_state, jax.random.key(0),
                              *self.init_shapes)
    specs = nn.get_partition_spec(abstract)
    self.state_sharding = nn.logical_to_mesh_sharding(specs, self.mesh,
                                                      self.rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract), self.state_sharding)
    multi = self.layout.multilayer
    rows = PartitionSpec(plan.mesh.batch_axis,
                         *([None] * (2 if multi else 1)))
    self.batch_sharding = {"x": NamedSharding(self.mesh, rows)}
    if not self.layout.reconstructs_input:
      self.batch_sharding["target"] = NamedSharding(self.mesh, rows)
    self.step = jax.jit(self.step_fn, in_shardings=(self.state_sharding,
                                                    self.batch_sharding),
                        out_shardings=(self.state_sharding, None),
                        donate_argnums=0)
    self.init = jax.jit(
        lambda k, b, s, t: nn.unbox(self.boxed_state(k, b, s, t)),
        out_shardings=self.state_sharding)

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, devices=None) -> Run:
    """The Run of a single-dictionary config (validated by `plans.make`)."""
    return cls(plans.make(c), devices=devices)

  # --- Host side: batches, fresh states, metrics. ---

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

  def feed(self, bucket_rows: stream.Bucket) -> dict[str, jax.Array]:
    """The step's global device input from this process's rows."""
    return distributed.global_batch(self.batch(bucket_rows),
                                    self.batch_sharding)

  def initial_state(self, bucket: stream.Bucket) -> TrainState:
    """A fresh state: scales and b_dec from `bucket` (`state.init_args`)."""
    b_dec, scale, target_scale = state_lib.init_args(self.dictionary, bucket)
    return self.init(jax.random.key(self.plan.seed), jnp.asarray(b_dec),
                     jnp.asarray(scale), jnp.asarray(target_scale))

  def host_metrics(self, metrics: dict, step: int) -> dict[str, float]:
    """The step's metrics as floats; raises `TrainingDiverged` (naming the
    step) on a non-finite loss or gradient."""
    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not last.pop("finite"):
      raise TrainingDiverged(
          f"loss {last['loss']} / gradient norm {last['grad_norm']} at "
          f"step {step}: training stopped")
    return last

  @property
  def harvest(self) -> list[str]:
    """The hookpoints a batch must hold."""
    return self.layout.hookpoints

  # --- Traced: the state's construction and the step. ---

  def boxed_state(self, key, b_dec, norm_scale, target_scale) -> TrainState:
    return state_lib.boxed_state(self.module, self.tx, self.dictionary, key,
                                 b_dec, norm_scale, target_scale)

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

  def step_fn(self, state: TrainState, batch: dict):
    """One step (unjitted; `step` is its jitted, donated form)."""
    sp = self.plan.step
    x, target = self.normalised(state, batch)
    coeff = optim.sparsity_coeff(sp, state.step)
    module = self.module
    if sp.l0_target_decay_steps:  # this step's L0 target (a traced value)
      module = optim.with_l0_targets_scaled(
          module, optim.l0_target_scale(sp, state.step))
    if sp.freq_start_step:  # the high-frequency term's late start
      module = optim.with_freq_scaled(module,
                                      optim.freq_scale(sp, state.step))
    # One device: the dense step's fused CPU kernel; partitioned: jnp ops.
    params, opt_state, lo, fired, grads = train_update(
        module, self.tx, state.params, state.opt_state, x, coeff,
        method=sp.grads, target=target, sparse_capacity=sp.sparse_capacity,
        use_kernel=self.mesh.size == 1, unit_decoder=sp.unit_decoder)
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
        "sparsity_coeff": coeff,
        "lr": optim.lr_schedule(self.plan.optimizer)(state.step),
        "grad_norm": grad_norm,
        "finite": jnp.isfinite(lo.total) & jnp.isfinite(grad_norm),
        "dead_fraction": jnp.mean(
            (silent_tokens >= sp.dead_after_tokens).astype(jnp.float32)),
        **{k: v for k, v in lo.aux.items() if jnp.ndim(v) == 0},
    }
    inner = dictionaries.unwrapped(module)  # this step's values
    if sp.l0_target_decay_steps:
      metrics["l0_target"] = inner.target_l0
    if sp.freq_start_step:
      metrics["freq_coeff"] = inner.freq_coeff
    for k, v in lo.aux.items():
      if k.endswith("_per_layer"):  # multi-layer: one entry per target
        for i, h in enumerate(self.layout.targets):
          metrics[f"{h}/{k[:-len('_per_layer')]}"] = v[i]
    new = TrainState(step=step, params=params, opt_state=opt_state,
                     norm_scale=state.norm_scale,
                     target_scale=state.target_scale, last_fired=last_fired,
                     min_kept_sum=kept_sum, min_kept_count=kept_count)
    return new, metrics
