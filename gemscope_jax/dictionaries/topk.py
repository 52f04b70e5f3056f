"""TopK and BatchTopK sparse autoencoders.

TopK keeps, per token, the k largest ReLU'd pre-activations; BatchTopK keeps
the k * N largest over all N tokens of the batch, so L0 is k on average but
varies per token. Sparsity is enforced by the selection, so the penalty is 0.
Gradients reach only the kept latents (the selection mask is constant).

BatchTopK's selection depends on the batch, so it is exported as a JumpReLU:
following Bussmann et al. (2024), one global threshold, the mean over batches
of the smallest kept activation, serves every latent and every token.

Caveat: `jax.lax.top_k` over all N * d_sae activations (BatchTopK) is a large
sort-like op; at N=4096, d_sae=16k it can rival the matmuls on CPU.
"""

from __future__ import annotations

from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemscope_jax.dictionaries import _base


def keep_top(acts: jax.Array, k: int) -> jax.Array:
  """acts with all but its k largest entries along the last axis zeroed."""
  _, idx = jax.lax.top_k(acts, k)
  mask = jnp.put_along_axis(jnp.zeros_like(acts), idx,
                            jnp.ones(idx.shape, acts.dtype), axis=-1,
                            inplace=False)
  # A constant mask: gradients flow to the kept entries only.
  return acts * jax.lax.stop_gradient(mask)


def min_kept(latents: jax.Array) -> jax.Array:
  """Smallest nonzero latent of a batch (inf if there is none)."""
  return jnp.min(jnp.where(latents > 0, latents, jnp.inf))


class TopK(_base.Dictionary):
  """Per-token TopK SAE.

  Attributes:
    k: latents kept per token (fewer if fewer pre-activations are positive).
  """
  k: int = 32

  def activate(self, pre: jax.Array) -> jax.Array:
    return keep_top(jax.nn.relu(pre.astype(jnp.float32)), self.k)

  def penalty(self, out: _base.DictOutput, sparsity_coeff):
    del sparsity_coeff  # The selection is the sparsity.
    l0 = jnp.mean(jnp.sum(out.latents > 0, axis=-1, dtype=jnp.float32))
    return jnp.zeros((), jnp.float32), {"l0": l0}

  @classmethod
  def from_config(cls, config) -> TopK:
    return cls(d_in=config.d_in, d_sae=config.d_sae, d_out=config.d_out,
               pre_enc_bias=config.pre_enc_bias, dtype=jnp.dtype(config.dtype),
               k=config.k)


class TopKTranscoder(TopK):
  """Per-token TopK transcoder (mlp_in -> mlp_out; see `JumpReLUTranscoder`).

  Exported as a Gemma Scope 2 folder with `architecture: "topk"` (this
  package's extension), optionally with `affine_skip_connection`.
  """
  pre_enc_bias: bool = False

  @nn.nowrap
  def to_inference(self, params: _base.Params, norm_scale,
                   out_norm_scale=None) -> dict[str, jax.Array]:
    """Raw-unit arrays (`fold_for_inference`); `threshold` is all zeros and
    means nothing for TopK (the selection is per token, keep `k`)."""
    return _base.fold_for_inference(
        params, norm_scale, threshold=0.0, pre_enc_bias=self.pre_enc_bias,
        out_norm_scale=out_norm_scale)

  @classmethod
  def from_config(cls, config) -> TopKTranscoder:
    return cls(d_in=config.d_in, d_sae=config.d_sae, d_out=config.d_out,
               pre_enc_bias=config.pre_enc_bias,
               affine_skip=config.affine_skip, dtype=jnp.dtype(config.dtype),
               k=config.k)


class BatchTopK(TopK):
  """BatchTopK SAE: keeps the k * N largest activations of N tokens.

  `loss(...).aux['min_kept']` is the batch's smallest kept activation; its
  mean over (late) training batches is the export threshold, see
  `global_threshold`.
  """

  def activate(self, pre: jax.Array) -> jax.Array:
    acts = jax.nn.relu(pre.astype(jnp.float32))
    n_tokens = acts.size // acts.shape[-1]
    flat = keep_top(acts.reshape(-1), self.k * n_tokens)
    return flat.reshape(acts.shape)

  def penalty(self, out: _base.DictOutput, sparsity_coeff):
    sparsity, aux = super().penalty(out, sparsity_coeff)
    return sparsity, {**aux, "min_kept": min_kept(out.latents)}

  @nn.nowrap
  def to_inference(self, params: _base.Params, norm_scale, *, threshold,
                   out_norm_scale=None) -> dict[str, jax.Array]:
    """Gemma Scope 2 (JumpReLU) arrays for raw activations.

    Args:
      params: trained BatchTopK parameters.
      norm_scale: the scalar the inputs were divided by in training.
      threshold: scalar in training units, e.g. from `global_threshold`.
      out_norm_scale: see `fold_for_inference`.
    """
    return _base.fold_for_inference(
        params, norm_scale, threshold=threshold,
        pre_enc_bias=self.pre_enc_bias, out_norm_scale=out_norm_scale)


def global_threshold(module: BatchTopK, params: _base.Params,
                     batches: Iterable[jax.Array]) -> jax.Array:
  """Mean over `batches` of each batch's smallest kept activation.

  The JumpReLU `relu(pre) * (pre > t)` with this t differs from BatchTopK on
  a batch b only at entries whose activation lies between t and that batch's
  own smallest kept value m_b (inclusive): it adds those in (t, m_b) when
  t < m_b and drops those in [m_b, t] when t >= m_b. Everything else matches
  exactly. Feed normalised training-distribution batches.
  """
  @jax.jit
  def one(p, x):
    return min_kept(module.apply({"params": p}, x).latents)
  return jnp.mean(jnp.stack([one(params, x) for x in batches]))
