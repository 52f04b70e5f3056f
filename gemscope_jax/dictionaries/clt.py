"""Cross-layer transcoder (CLT): per-layer encoders, writes to later layers.

Input x = mlp_in of n layers (..., n_layers, d); target = mlp_out of the same
layers (..., n_layers, d), each divided by its own scalar per layer. Layer n
has d_sae latents read from its own mlp_in only; they write to mlp_out of
layer n and of every later layer (Anthropic's "circuit tracing" CLTs; Gemma
Scope 2's CLTs):
  pre[n, l]  = x[n] . w_enc[n, :, l] + b_enc[n, l]
  f          = JumpReLU(pre) or TopK(relu(pre)) over all n * d_sae latents
  recon[o]   = sum_{n <= o} sum_l f[n, l] w_dec[n, l, o] + b_dec[o]
with w_enc (n_layers, d, d_sae), w_dec (n_layers_src, d_sae, n_layers_out,
d), b_enc and threshold (n_layers, d_sae), b_dec (n_layers_out, d).

Causal mask: the blocks w_dec[n, :, o] with n > o (writing into an earlier
layer) are zero at init, multiplied by zero in the forward pass (so their
gradients are exactly zero) and set back to zero by `apply_update`.
Decoder norm: each latent's writes to all its output layers together,
w_dec[n, l, n:], have unit norm.

L0 is the total over layers: the number of latents of a token firing at any
layer, so `target_l0` (and TopK's `k`) is a budget for the whole CLT, e.g.
n_layers times a per-layer SAE's L0. The quadratic penalty sees that one
total; layers may trade latents among themselves (and a short run spends
most of it on the first layers, whose latents write to every later one).
With `l0_targets` (one per layer) each layer's L0 gets its own quadratic
penalty instead, (2 coeff / L0*_n) (L0_n - L0*_n)^2 summed over layers.
`loss(...).aux` has 'l0_per_layer' for monitoring.

Caveat: the decoder is stored full size (about half of it the masked zero
blocks) and computed densely; memory and FLOPs are twice what the causal
structure needs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax.dictionaries import _base
from gemscope_jax.dictionaries import _multilayer
from gemscope_jax.dictionaries import jumprelu as jumprelu_lib

AXES = {
    "w_enc": ("layer", "embed", "latent"),
    "w_dec": ("layer", "latent", "layer_out", "embed"),
    "b_enc": ("layer", "latent"),
    "b_dec": ("layer_out", "embed"),
}


def causal_mask(n_layers: int) -> np.ndarray:
  """(n_layers_src, n_layers_out) 1 where a source layer may write (n <= o)."""
  layers = np.arange(n_layers)
  return (layers[:, None] <= layers[None, :]).astype(np.float32)


class CrossLayerTranscoder(_multilayer.MultiLayer):
  """Cross-layer transcoder (see the module docstring).

  Attributes (as `MultiLayer`): d_sae is the number of latents PER LAYER;
  the whole CLT has n_layers * d_sae. `target_l0` and `k` count latents per
  token over all layers.
  """
  latent_axes_names = ("layer", "latent")
  l0_targets: tuple[float, ...] | None = None

  @property
  def latent_shape(self) -> tuple[int, ...]:
    return (self.n_layers, self.d_sae)

  @nn.nowrap
  def masks(self) -> dict[str, np.ndarray | None]:
    return {"w_enc": None,
            "w_dec": causal_mask(self.n_layers)[:, None, :, None]}

  def setup(self):
    self.check_fields()
    mask = self.masks()["w_dec"]
    self.w_dec = _base.param(
        self, "w_dec", _multilayer.masked_unit_init(mask, (-2, -1)),
        (self.n_layers, self.d_sae, self.n_layers, self.d_in), AXES["w_dec"])
    w_dec, n = self.w_dec, self.n_layers

    def enc_init(*_):
      # Each layer's encoder tied to its same-layer decoder block at init,
      # columns rescaled to unit norm.
      diag = jnp.asarray(w_dec)[np.arange(n), :, np.arange(n), :]  # (n, s, d)
      return jnp.transpose(_multilayer.unit_norm(diag, (-1,)), (0, 2, 1))
    self.w_enc = _base.param(self, "w_enc", enc_init,
                             (self.n_layers, self.d_in, self.d_sae),
                             AXES["w_enc"])
    self.b_enc = _base.param(self, "b_enc", nn.initializers.zeros_init(),
                             (self.n_layers, self.d_sae), AXES["b_enc"])
    self.b_dec = _base.param(self, "b_dec", nn.initializers.zeros_init(),
                             (self.n_layers, self.d_in), AXES["b_dec"])
    self.setup_threshold()

  def pre_acts(self, x: jax.Array) -> jax.Array:
    """(..., n_layers, d) mlp_in -> (..., n_layers, d_sae) fp32."""
    return jnp.einsum("...nd,ndl->...nl", x.astype(self.dtype),
                      self.w_enc.astype(self.dtype),
                      preferred_element_type=jnp.float32) + self.b_enc

  def decode(self, latents: jax.Array) -> jax.Array:
    """(..., n_layers, d_sae) -> (..., n_layers_out, d) in the compute dtype."""
    recon = jnp.einsum("...nl,nlod->...od", latents.astype(self.dtype),
                       self.masked("w_dec").astype(self.dtype),
                       preferred_element_type=jnp.float32)
    return (recon + self.b_dec).astype(self.dtype)

  def default_target(self, x: jax.Array) -> jax.Array:
    raise ValueError("CrossLayerTranscoder.loss needs target= (mlp_out of "
                     "each layer); its input is mlp_in")

  def layer_targets(self) -> tuple[float, ...] | None:
    return self.l0_targets

  def penalty(self, out: _base.DictOutput, sparsity_coeff):
    sparsity, aux = super().penalty(out, sparsity_coeff)
    fired = (out.latents != 0).astype(jnp.float32)
    per_layer = jnp.sum(fired, axis=-1).reshape(-1, self.n_layers)
    return sparsity, {**aux, "l0_per_layer": jnp.mean(per_layer, axis=0)}

  @nn.nowrap
  def to_inference(self, params: _base.Params, norm_scale, out_norm_scale
                   ) -> dict[str, jax.Array]:
    """Raw-unit arrays: with x_raw (..., n_layers, d) mlp_in,
    `pre = einsum('...nd,ndl->...nl', x_raw, w_enc) + b_enc`,
    `f = relu(pre) * (pre > threshold)` (TopK: the k largest of relu(pre)
    over all n_layers * d_sae), `recon_raw = einsum('...nl,nlod->...od', f,
    w_dec) + b_dec` (mlp_out, raw units).

    Latents stay in training units (so TopK's ranking across layers is
    unchanged); masked blocks (n > o) are exact zeros.

    Args:
      params: trained parameters (boxed or not).
      norm_scale: scalar or (n_layers,) each layer's mlp_in was divided by.
      out_norm_scale: scalar or (n_layers,) for each layer's mlp_out.
    """
    p = {k: jnp.asarray(_base.leaf_value(v), jnp.float32)
         for k, v in params.items()}
    s_in = _multilayer.layer_scales(norm_scale, self.n_layers)
    s_out = _multilayer.layer_scales(out_norm_scale, self.n_layers)
    threshold = p.get("threshold", jnp.zeros(self.latent_shape, jnp.float32))
    return {
        "w_enc": p["w_enc"] / s_in[:, None, None],
        "w_dec": p["w_dec"] * self.masks()["w_dec"] * s_out[None, None, :,
                                                             None],
        "b_enc": p["b_enc"],
        "b_dec": p["b_dec"] * s_out[:, None],
        "threshold": threshold,
    }

  @classmethod
  def from_config(cls, config) -> CrossLayerTranscoder:
    return cls(**cls.common_kwargs(config), l0_targets=config.l0_targets)
