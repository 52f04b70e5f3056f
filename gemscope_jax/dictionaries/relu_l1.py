"""Standard ReLU SAE with an L1 penalty weighted by decoder row norms.

f = relu(pre); sparsity = coeff * mean over tokens of sum_i f_i * ||w_dec_i||.
Weighting by the row norm makes the penalty invariant to trading scale between
encoder and decoder, so decoder rows are left free (`unit_decoder` is False:
the training loop should not renormalise them).

Caveat: L1 shrinks every active latent towards 0, so at equal L0 it
reconstructs worse than JumpReLU or TopK; it is here as the classic baseline.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemscope_jax.dictionaries import _base


class ReLU(_base.Dictionary):
  """ReLU SAE; exported as a JumpReLU with zero thresholds."""

  unit_decoder = False

  def activate(self, pre: jax.Array) -> jax.Array:
    return jax.nn.relu(pre.astype(jnp.float32))

  def penalty(self, out: _base.DictOutput, sparsity_coeff):
    row_norms = jnp.linalg.norm(self.w_dec, axis=-1)
    l1 = jnp.mean(jnp.sum(out.latents * row_norms, axis=-1))
    l0 = jnp.mean(jnp.sum(out.latents > 0, axis=-1, dtype=jnp.float32))
    return sparsity_coeff * l1, {"l0": l0, "l1": l1}

  @nn.nowrap
  def to_inference(self, params: _base.Params, norm_scale,
                   out_norm_scale=None) -> dict[str, jax.Array]:
    """Gemma Scope 2 arrays; relu(pre) * (pre > 0) is the ReLU itself."""
    return _base.fold_for_inference(
        params, norm_scale, threshold=0.0, pre_enc_bias=self.pre_enc_bias,
        out_norm_scale=out_norm_scale)

  @classmethod
  def from_config(cls, config) -> ReLU:
    return cls(d_in=config.d_in, d_sae=config.d_sae, d_out=config.d_out,
               pre_enc_bias=config.pre_enc_bias, dtype=jnp.dtype(config.dtype))
