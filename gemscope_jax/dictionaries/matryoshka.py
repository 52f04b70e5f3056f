"""Matryoshka loss around any dictionary: nested prefixes must reconstruct too.

For prefix sizes m_1 < ... < m_n = d_sae, prefix j reconstructs from the
first m_j latents only: recon_j = latents[:, :m_j] @ w_dec[:m_j] + b_dec. The
reconstruction loss is the mean (or sum) of the n prefix MSEs, which pushes
general features into the early latents. The latents themselves are the
wrapped architecture's (a BatchTopK selects over the full width first).

The wrapper shares the wrapped module's scope, so parameter names stay
`w_enc`, `w_dec`, ... at the top level and export is unchanged.

Caveat: the prefix reconstructions are built chunk by chunk and summed, so
the cost is one dense decode, but n (B, d_out) fp32 partial sums stay live
for the backward pass.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemscope_jax.dictionaries import _base

REDUCTIONS = ("mean", "sum")


def prefix_mses(latents: jax.Array, w_dec: jax.Array, b_dec: jax.Array,
                target: jax.Array, prefixes: Sequence[int], dtype=jnp.float32
                ) -> jax.Array:
  """(n_prefixes,) MSE of each prefix reconstruction (as `_base.mse_loss`)."""
  recon = jnp.broadcast_to(b_dec.astype(jnp.float32),
                           target.shape).astype(jnp.float32)
  mses, start = [], 0
  for m in prefixes:
    # Each prefix adds its new chunk to the previous prefix's reconstruction.
    recon = recon + jnp.einsum(
        "...l,ld->...d", latents[..., start:m].astype(dtype),
        w_dec[start:m].astype(dtype), preferred_element_type=jnp.float32)
    mses.append(_base.mse_loss(target, recon))
    start = m
  return jnp.stack(mses)


class Matryoshka(nn.Module):
  """Matryoshka training loss on top of `dictionary`.

  Attributes:
    dictionary: any `_base.Dictionary` (JumpReLU, TopK, BatchTopK, ReLU).
    prefixes: strictly increasing prefix sizes ending at d_sae, e.g.
      (d_sae // 16, d_sae // 4, d_sae).
    reduction: 'mean' or 'sum' of the prefix MSEs.
  """
  dictionary: _base.Dictionary
  prefixes: tuple[int, ...]
  reduction: str = "mean"

  def setup(self):
    p = tuple(self.prefixes)
    if not p or p[-1] != self.dictionary.d_sae or any(
        a >= b for a, b in zip((0,) + p, p)):
      raise ValueError(f"prefixes must increase strictly from > 0 to d_sae="
                       f"{self.dictionary.d_sae}, got {p}")
    if getattr(self.dictionary, "affine_skip", False):
      raise ValueError("Matryoshka: the prefix losses leave out an affine "
                       "skip connection; use affine_skip=False")
    if self.reduction not in REDUCTIONS:
      raise ValueError(f"reduction must be one of {REDUCTIONS}, "
                       f"got {self.reduction!r}")
    nn.share_scope(self, self.dictionary)

  # Shape facts the training loop and `init_params` read from any dictionary.
  @property
  def d_in(self) -> int:
    return self.dictionary.d_in

  @property
  def d_sae(self) -> int:
    return self.dictionary.d_sae

  @property
  def unit_decoder(self) -> bool:
    return self.dictionary.unit_decoder

  def encode(self, x: jax.Array) -> jax.Array:
    return self.dictionary.encode(x)

  def decode(self, latents: jax.Array, indices: jax.Array | None = None
             ) -> jax.Array:
    return self.dictionary.decode(latents, indices)

  def __call__(self, x: jax.Array) -> _base.DictOutput:
    return self.dictionary(x)

  def loss(self, x: jax.Array, out: _base.DictOutput, *, sparsity_coeff,
           target: jax.Array | None = None) -> _base.LossOutput:
    """As `Dictionary.loss`, with the MSE replaced by the prefix MSEs.

    aux adds 'prefix_mse' (n_prefixes,) and 'mse_full' (the plain MSE of
    `out.recon`, for comparison with other architectures).
    """
    target = x if target is None else target
    d = self.dictionary
    per_prefix = prefix_mses(out.latents, d.w_dec, d.b_dec, target,
                             self.prefixes, d.dtype)
    mse = jnp.mean(per_prefix) if self.reduction == "mean" else jnp.sum(
        per_prefix)
    sparsity, aux = d.penalty(out, sparsity_coeff)
    aux = {"fvu": _base.fvu(target, out.recon),
           "mse_full": _base.mse_loss(target, out.recon),
           "prefix_mse": per_prefix, **aux}
    return _base.LossOutput(total=mse + sparsity, mse=mse, sparsity=sparsity,
                            aux=aux)

  @nn.nowrap
  def to_inference(self, params: _base.Params, norm_scale, **kwargs
                   ) -> dict[str, jax.Array]:
    """The wrapped dictionary's export; Matryoshka changes only training."""
    return self.dictionary.to_inference(params, norm_scale, **kwargs)
