"""What crosscoders and cross-layer transcoders share: activation, loss, masks.

A multi-layer dictionary reads (..., n_layers, d) activations (one site at
n_layers layers, each layer divided by its own scalar in training) and
reconstructs (..., n_layers, d). Subclasses define the parameters, the encoder
(`pre_acts`), the decoder (`decode`), the shape of one token's latents
(`latent_shape`) and optional causal `masks()`; this base adds JumpReLU or
TopK activation, the loss (squared error summed over layers and features,
averaged over tokens) and the shared `DictOutput` forward pass, so
`dictionaries.compute_loss`, `init_params` and `apply_update` work unchanged.

Logical axis names: 'layer' for a layer axis an encoder reads or a decoder's
source, 'layer_out' for a decoder's output-layer axis, plus the usual
'embed' and 'latent'; rules that do not name 'layer' leave it unsharded.

Caveat: masked (causal) blocks are stored as zeros in full-size parameters,
so a cross-layer transcoder holds about twice the decoder it needs, and the
dense einsum spends the same FLOPs on the zero blocks.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax.dictionaries import _base
from gemscope_jax.dictionaries import jumprelu as jumprelu_lib
from gemscope_jax.dictionaries import topk as topk_lib

ACTIVATIONS = ("jumprelu", "topk")


def unit_norm(w: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
  return w / jnp.maximum(norm, jnp.finfo(w.dtype).tiny)


def masked_unit_init(mask: np.ndarray | None, row_axes: tuple[int, ...]):
  """He-uniform, times `mask`, then each latent's row (`row_axes`) unit."""
  def init(key, shape, dtype=jnp.float32):
    w = nn.initializers.he_uniform()(key, shape, dtype)
    if mask is not None:
      w = w * jnp.asarray(mask, dtype)
    return unit_norm(w, row_axes)
  return init


class MultiLayer(nn.Module):
  """Base of `Crosscoder` and `CrossLayerTranscoder` (not used directly).

  Attributes:
    n_layers: number of layers read and written.
    d_in: width d of one layer's activation (d_out == d_in).
    d_sae: number of latents (a crosscoder) or latents per layer (a CLT).
    activation: 'jumprelu' (STE threshold, as `JumpReLU`) or 'topk' (the k
      largest latents of a token, over all its latents).
    k: TopK latents per token.
    bandwidth, sparsity_penalty, target_l0, threshold_init, preact_coeff,
    l0_preact_bandwidth, freq_coeff, max_freq: as `JumpReLU` (target_l0
      counts one token's latents, see `latent_shape`; a frequency is one
      (layer, latent)'s).
    dtype: compute dtype of the matmul inputs; parameters are fp32.
  """
  n_layers: int
  d_in: int
  d_sae: int
  activation: str = "jumprelu"
  k: int | None = None
  bandwidth: float = 0.001
  sparsity_penalty: str = "quadratic"
  target_l0: float | None = None
  threshold_init: float = 0.001
  preact_coeff: float = 0.0
  l0_preact_bandwidth: float = 0.0
  freq_coeff: float = 0.0
  max_freq: float = 0.1
  dtype: Any = jnp.float32

  unit_decoder: ClassVar[bool] = True
  # Logical names of `threshold` (and b_enc), matching `latent_shape`.
  latent_axes_names: ClassVar[tuple[str, ...]] = ("latent",)

  @property
  def in_shape(self) -> tuple[int, ...]:
    return (self.n_layers, self.d_in)

  @property
  def out_dim(self) -> int:
    return self.d_in

  @property
  def latent_shape(self) -> tuple[int, ...]:
    """Shape of one token's latents."""
    raise NotImplementedError

  @nn.nowrap
  def masks(self) -> dict[str, np.ndarray | None]:
    """{'w_enc': mask or None, 'w_dec': mask or None}, broadcastable to the
    parameters; masked entries are zero in the forward pass and in
    `apply_update`'s result."""
    return {"w_enc": None, "w_dec": None}

  def check_fields(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {ACTIVATIONS}, got "
                       f"{self.activation!r}")
    n_latents = int(np.prod(self.latent_shape))
    if self.activation == "topk" and (not isinstance(self.k, int)
                                      or not 1 <= self.k <= n_latents):
      raise ValueError(f"k must be an int in [1, {n_latents}] for topk, got "
                       f"{self.k!r}")
    if (self.activation == "jumprelu" and self.sparsity_penalty == "quadratic"
        and self.target_l0 is None):
      raise ValueError("sparsity_penalty='quadratic' needs target_l0")

  def setup_threshold(self):
    """The fp32 JumpReLU threshold (latent_shape), if the activation has one."""
    if self.activation == "jumprelu":
      self.threshold = _base.param(
          self, "threshold", nn.initializers.constant(self.threshold_init),
          self.latent_shape, self.latent_axes_names)

  def masked(self, name: str) -> jax.Array:
    """Parameter `name` with its mask applied (zero gradient where masked)."""
    w = getattr(self, name)
    mask = self.masks()[name]
    return w if mask is None else w * jnp.asarray(mask, w.dtype)

  def pre_acts(self, x: jax.Array) -> jax.Array:
    raise NotImplementedError

  def decode(self, latents: jax.Array) -> jax.Array:
    raise NotImplementedError

  def activate(self, pre: jax.Array) -> jax.Array:
    pre = pre.astype(jnp.float32)
    if self.activation == "jumprelu":
      return jumprelu_lib.jump_relu(pre, self.threshold.astype(jnp.float32),
                                    self.bandwidth)
    # TopK over all of a token's latents (a CLT's layers together).
    n = len(self.latent_shape)
    flat = pre.reshape(*pre.shape[:pre.ndim - n], -1)
    kept = topk_lib.keep_top(jax.nn.relu(flat), self.k)
    return kept.reshape(pre.shape)

  def penalty(self, out: _base.DictOutput, sparsity_coeff
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    axes = tuple(range(-len(self.latent_shape), 0))
    if self.activation == "jumprelu":
      return jumprelu_lib.penalty_terms(
          out.pre_acts, self.threshold, bandwidth=self.bandwidth,
          kind=self.sparsity_penalty, sparsity_coeff=sparsity_coeff,
          target_l0=self.target_l0, preact_coeff=self.preact_coeff,
          latent_axes=axes, preact_bandwidth=self.l0_preact_bandwidth,
          layer_targets=self.layer_targets(), freq_coeff=self.freq_coeff,
          max_freq=self.max_freq)
    l0 = jnp.mean(jnp.sum(out.latents > 0, axis=axes, dtype=jnp.float32))
    return jnp.zeros((), jnp.float32), {"l0": l0}

  def layer_targets(self) -> tuple[float, ...] | None:
    """Per-layer L0 targets, each with its own penalty (a CLT's
    `l0_targets`); None: one penalty on the total."""
    return None

  def encode(self, x: jax.Array) -> jax.Array:
    return self.activate(self.pre_acts(x))

  def __call__(self, x: jax.Array) -> _base.DictOutput:
    pre = self.pre_acts(x)
    latents = self.activate(pre)
    return _base.DictOutput(latents=latents, recon=self.decode(latents),
                            pre_acts=pre)

  def default_target(self, x: jax.Array) -> jax.Array:
    """What `loss` reconstructs when no target is given."""
    return x

  def loss(self, x: jax.Array, out: _base.DictOutput, *, sparsity_coeff,
           target: jax.Array | None = None) -> _base.LossOutput:
    """Squared error summed over layers and features + sparsity.

    Args:
      x: (..., n_layers, d) input batch, each layer normalised.
      out: `self(x)` with the same parameters.
      sparsity_coeff: penalty weight.
      target: (..., n_layers, d) what to reconstruct (a CLT: mlp_out of each
        layer, required); None means x (a crosscoder).

    aux: 'fvu' pooled over all layers (per token, the n_layers * d features),
    'fvu_per_layer' (n_layers,), 'mse_per_layer' (n_layers,), 'l0' (latents
    per token, over all layers) and the activation's metrics.
    """
    target = self.default_target(x) if target is None else target
    err = out.recon.astype(jnp.float32) - target.astype(jnp.float32)
    sq = jnp.square(err)
    mse_per_layer = jnp.mean(jnp.sum(sq, axis=-1).reshape(
        -1, self.n_layers), axis=0)
    mse = jnp.sum(mse_per_layer)
    flat_t = target.reshape(-1, self.n_layers * self.d_in)
    flat_r = out.recon.reshape(-1, self.n_layers * self.d_in)
    t3 = target.astype(jnp.float32).reshape(-1, self.n_layers, self.d_in)
    var = jnp.sum(jnp.square(t3 - jnp.mean(t3, axis=0)), axis=(0, 2))
    fvu_per_layer = jnp.sum(sq.reshape(-1, self.n_layers, self.d_in),
                            axis=(0, 2)) / var
    sparsity, aux = self.penalty(out, sparsity_coeff)
    aux = {"fvu": _base.fvu(flat_t, flat_r), "fvu_per_layer": fvu_per_layer,
           "mse_per_layer": mse_per_layer, **aux}
    return _base.LossOutput(total=mse + sparsity, mse=mse, sparsity=sparsity,
                            aux=aux)

  @classmethod
  def common_kwargs(cls, config) -> dict[str, Any]:
    """Constructor arguments every multi-layer `from_config` shares."""
    activation = "topk" if config.architecture.startswith("topk") else (
        "jumprelu")
    return dict(n_layers=config.n_layers, d_in=config.d_in,
                d_sae=config.d_sae, activation=activation, k=config.k,
                bandwidth=config.bandwidth,
                sparsity_penalty=config.sparsity_penalty,
                target_l0=config.target_l0, preact_coeff=config.preact_coeff,
                l0_preact_bandwidth=config.l0_preact_bandwidth,
                freq_coeff=config.freq_coeff, max_freq=config.max_freq,
                dtype=jnp.dtype(config.dtype))


def layer_scales(scale, n_layers: int) -> jax.Array:
  """A scalar or (n_layers,) normalisation scale as an (n_layers,) array."""
  s = jnp.asarray(scale, jnp.float32)
  if s.ndim == 0:
    return jnp.full((n_layers,), s)
  if s.shape != (n_layers,):
    raise ValueError(f"norm scale must be a scalar or ({n_layers},), got "
                     f"shape {s.shape}")
  return s
