"""Crosscoder: one dictionary over the same site at n layers.

Input x (..., n_layers, d), each layer divided by its own scalar in training.
The encoder reads the concatenation of the layers and the decoder writes
every layer (Lindsey et al. 2024, "Sparse crosscoders"):
  pre[l]   = sum_n x[n] . w_enc[n, :, l] + b_enc[l]        (l a latent)
  f        = JumpReLU(pre) or TopK(relu(pre))
  recon[n] = sum_l f[l] w_dec[l, n] + b_dec[n]
with w_enc (n_layers, d, d_sae), w_dec (d_sae, n_layers, d), b_enc (d_sae,),
b_dec (n_layers, d). The loss sums the squared error over layers. Each
latent's decoder row, w_dec[l] over all layers together, has unit norm.

Acausal (`causal=False`): every latent reads and writes every layer.
Weakly causal (`causal=True`): latents are split evenly over layers in
order, latent l having source layer src(l) = l * n_layers // d_sae; it reads
only layers <= src(l) and writes only layers >= src(l), so it can be computed
during a forward pass by the time its source layer is reached and never
writes into the past. Both restrictions are fixed masks: masked blocks are
zero at init, multiplied by zero in the forward pass (so their gradients are
exactly zero) and set back to zero by `apply_update`.

Caveat: no pre-encoder bias (b_dec is not subtracted from x); exported
latents stay in training units (see `to_inference`), unlike the single-layer
export, which scales them by the input's scalar.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax.dictionaries import _base
from gemscope_jax.dictionaries import _multilayer

AXES = {
    "w_enc": ("layer", "embed", "latent"),
    "w_dec": ("latent", "layer", "embed"),
    "b_enc": ("latent",),
    "b_dec": ("layer", "embed"),
}


def source_layers(d_sae: int, n_layers: int) -> np.ndarray:
  """(d_sae,) source layer of each latent: an even split, in order."""
  return (np.arange(d_sae) * n_layers) // d_sae


class Crosscoder(_multilayer.MultiLayer):
  """Acausal or weakly causal crosscoder (see the module docstring).

  Attributes:
    causal: weakly causal masks (read layers <= source, write >= source).
    (others: `MultiLayer`.)
  """
  causal: bool = False

  @property
  def latent_shape(self) -> tuple[int, ...]:
    return (self.d_sae,)

  @nn.nowrap
  def masks(self) -> dict[str, np.ndarray | None]:
    if not self.causal:
      return {"w_enc": None, "w_dec": None}
    src = source_layers(self.d_sae, self.n_layers)
    layers = np.arange(self.n_layers)
    reads = (layers[:, None] <= src[None, :]).astype(np.float32)
    writes = (layers[None, :] >= src[:, None]).astype(np.float32)
    return {"w_enc": reads[:, None, :], "w_dec": writes[:, :, None]}

  def setup(self):
    self.check_fields()
    if self.causal and self.d_sae < self.n_layers:
      raise ValueError(f"causal needs d_sae >= n_layers (a latent per layer),"
                       f" got d_sae={self.d_sae}, n_layers={self.n_layers}")
    masks = self.masks()
    self.w_dec = _base.param(
        self, "w_dec", _multilayer.masked_unit_init(masks["w_dec"], (-2, -1)),
        (self.d_sae, self.n_layers, self.d_in), AXES["w_dec"])
    w_dec = self.w_dec
    enc_mask = masks["w_enc"]

    def enc_init(*_):
      # Tied at init (w_enc[n, :, l] = w_dec[l, n]), then masked.
      w = jnp.transpose(w_dec, (1, 2, 0))
      return w if enc_mask is None else w * jnp.asarray(enc_mask, w.dtype)
    self.w_enc = _base.param(self, "w_enc", enc_init,
                             (self.n_layers, self.d_in, self.d_sae),
                             AXES["w_enc"])
    self.b_enc = _base.param(self, "b_enc", nn.initializers.zeros_init(),
                             (self.d_sae,), AXES["b_enc"])
    self.b_dec = _base.param(self, "b_dec", nn.initializers.zeros_init(),
                             (self.n_layers, self.d_in), AXES["b_dec"])
    self.setup_threshold()

  def pre_acts(self, x: jax.Array) -> jax.Array:
    """(..., n_layers, d) -> (..., d_sae) fp32."""
    return jnp.einsum("...nd,ndl->...l", x.astype(self.dtype),
                      self.masked("w_enc").astype(self.dtype),
                      preferred_element_type=jnp.float32) + self.b_enc

  def decode(self, latents: jax.Array) -> jax.Array:
    """(..., d_sae) -> (..., n_layers, d) in the compute dtype."""
    recon = jnp.einsum("...l,lnd->...nd", latents.astype(self.dtype),
                       self.masked("w_dec").astype(self.dtype),
                       preferred_element_type=jnp.float32)
    return (recon + self.b_dec).astype(self.dtype)

  @nn.nowrap
  def to_inference(self, params: _base.Params, norm_scale
                   ) -> dict[str, jax.Array]:
    """Raw-unit arrays: with x_raw (..., n_layers, d),
    `pre = einsum('...nd,ndl->...l', x_raw, w_enc) + b_enc`,
    `f = relu(pre) * (pre > threshold)` (TopK: the k largest of relu(pre)),
    `recon_raw = einsum('...l,lnd->...nd', f, w_dec) + b_dec`.

    Latents stay in training units (layers have different scales, so no one
    scale fits all of a latent's layers); masked blocks are exact zeros.

    Args:
      params: trained parameters (boxed or not).
      norm_scale: scalar or (n_layers,) each layer was divided by.
    """
    p = {k: jnp.asarray(_base.leaf_value(v), jnp.float32)
         for k, v in params.items()}
    s = _multilayer.layer_scales(norm_scale, self.n_layers)
    masks = self.masks()
    w_enc, w_dec = p["w_enc"], p["w_dec"]
    if masks["w_enc"] is not None:
      w_enc = w_enc * masks["w_enc"]
      w_dec = w_dec * masks["w_dec"]
    threshold = p.get("threshold", jnp.zeros((self.d_sae,), jnp.float32))
    return {
        "w_enc": w_enc / s[:, None, None],
        "w_dec": w_dec * s[None, :, None],
        "b_enc": p["b_enc"],
        "b_dec": p["b_dec"] * s[:, None],
        "threshold": threshold,
    }

  @classmethod
  def from_config(cls, config) -> Crosscoder:
    return cls(**cls.common_kwargs(config), causal=config.causal)
