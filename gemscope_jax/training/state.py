"""The train state of one dictionary, and how a fresh one starts.

A fresh run divides each input (and target) hookpoint by the root of its
mean squared norm over the first bucket (so E||x / s||^2 = 1), starts b_dec
at the target's normalised mean, and initialises the module (decoder rows
and encoder columns of norm `init_norm`).

Caveat: TrainState's fields are the checkpoint format; adding or renaming
one breaks resuming older workdirs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemscope_jax import dictionaries
from gemscope_jax.data import stream
from gemscope_jax.training.plans import DictionaryPlan


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


def init_args(d: DictionaryPlan, bucket: stream.Bucket
              ) -> tuple[np.ndarray, ...]:
  """(b_dec, norm_scale, target_scale) of a fresh run, from a bucket.

  Each input (and target) hookpoint is divided by the root of its mean
  squared norm; b_dec starts at the target's normalised mean (or zeros).
  Multi-layer layouts get one scale per layer and a (n_layers, d) b_dec.
  """
  layout = d.layout
  stats = stream.bucket_stats({h: bucket[h] for h in layout.hookpoints})
  scales = {h: np.sqrt(stats[h][1]) for h in layout.hookpoints}
  s_in = np.asarray([scales[h] for h in layout.inputs], np.float32)
  s_out = np.asarray([scales[h] for h in layout.targets], np.float32)
  b_dec = np.stack([stats[h][0] / scales[h] for h in layout.targets])
  if d.b_dec_init != "mean":
    b_dec = np.zeros_like(b_dec)
  if not layout.multilayer:
    return b_dec[0].astype(np.float32), s_in[0], s_out[0]
  return b_dec.astype(np.float32), s_in, s_out


def init_shapes(d: DictionaryPlan) -> tuple[jax.ShapeDtypeStruct, ...]:
  """ShapeDtypeStructs of `init_args`' results."""
  dc = d.config
  d_out = dc.d_out or dc.d_in
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  if d.layout.multilayer:
    n = len(d.layout.inputs)
    return f32(n, d_out), f32(n), f32(n)
  return f32(d_out), f32(), f32()


def boxed_state(module: nn.Module, tx: optax.GradientTransformation,
                d: DictionaryPlan, key: jax.Array, b_dec, norm_scale,
                target_scale) -> TrainState:
  """A fresh TrainState whose parameters and counters keep their logical
  axis names (`nn.LogicallyPartitioned`), for sharding by rules."""
  params = dictionaries.init_params(module, key, b_dec=b_dec)
  if d.init_norm != 1.0:  # both are unit-norm per latent at init
    params = {k: (v.replace_boxed(v.unbox() * d.init_norm)
                  if k in ("w_enc", "w_dec") else v)
              for k, v in params.items()}
  inner = dictionaries.unwrapped(module)
  shape = getattr(inner, "latent_shape", (d.config.d_sae,))
  names = getattr(inner, "latent_axes_names", ("latent",))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(params), norm_scale=norm_scale,
      target_scale=target_scale,
      last_fired=nn.LogicallyPartitioned(jnp.zeros(shape, jnp.int32), names),
      min_kept_sum=jnp.zeros((), jnp.float32),
      min_kept_count=jnp.zeros((), jnp.int32))
