"""The Gemma 3 text decoder as a Flax module.

`Gemma3(config).apply({"params": p}, tokens, ...)` runs the decoder; the
jitted entry points that users call live in `_api.py`. The module runs only
the blocks it needs: with `num_blocks=L + 1` and `unembed=False` it stops
after block L, which is how activations are harvested cheaply.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemscope_jax.models._config import AttentionKind, Gemma3Config
from gemscope_jax.models._modules import (Block, Intervene, RMSNorm, _identity,
                                          project, rope_table)


def attention_masks(config: Gemma3Config, mask: jax.Array
                    ) -> dict[AttentionKind, jax.Array]:
  """(B, T, S) boolean masks of allowed keys for global and local layers.

  Causal over token indices, keys restricted to non-padding tokens; local
  layers also need query_idx - key_idx < sliding_window. Valid tokens are
  contiguous, so index differences equal position differences.
  """
  t = mask.shape[1]
  idx = jnp.arange(t)
  causal = idx[:, None] >= idx[None, :]
  window = (idx[:, None] - idx[None, :]) < config.sliding_window
  glob = causal[None] & mask[:, None, :]
  return {AttentionKind.GLOBAL: glob,
          AttentionKind.LOCAL: glob & window[None]}


class Gemma3(nn.Module):
  """Gemma 3 text decoder.

  Attributes:
    config: The family size.
    dtype: Compute dtype (float32 or bfloat16); parameters are cast to it.
  """
  config: Gemma3Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.embedder = Embedder(c.vocab_size, c.d_model, self.dtype)
    self.blocks = [Block(c, i, self.dtype, name=f"layer_{i}")
                   for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.norm_eps)

  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None, *,
               num_blocks: int | None = None, unembed: bool = True,
               intervene: Intervene = _identity) -> jax.Array:
    """Runs the decoder.

    Args:
      tokens: (B, T) int token ids.
      mask: (B, T) bool, True for real tokens; defaults to tokens != 0 (pad).
      positions: (B, T) int positions; defaults to the count of real tokens
        before each one, so left and right padding both work.
      num_blocks: Run only blocks 0 .. num_blocks - 1.
      unembed: Apply the final norm and tied unembedding (logits, B x T x V).
        Otherwise the residual stream after the last block run is returned.
      intervene: Called as intervene("layer_L/site", x) at every hookpoint of
        every block run; its return value replaces x.

    Returns:
      Logits (B, T, V) in the compute dtype, or the residual (B, T, D).
    """
    c = self.config
    if mask is None:
      mask = tokens != 0
    mask = mask.astype(bool)
    # Default positions count real tokens, so they lie in [0, T).
    max_position = tokens.shape[1] if positions is None else None
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    n = c.num_layers if num_blocks is None else num_blocks
    if unembed and n != c.num_layers:
      raise ValueError("logits need every block: num_blocks must be None "
                       f"or {c.num_layers} when unembed=True, got {n}")

    masks = attention_masks(c, mask)
    ropes = {}  # One (sin, cos) table per distinct (base, scale).
    x = self.embedder.encode(tokens)
    for i in range(n):
      key = c.rope(i)
      if key not in ropes:
        ropes[key] = rope_table(positions, c.head_dim, *key, max_position)
      prefix = f"layer_{i}/"
      hook = lambda site, v, prefix=prefix: intervene(prefix + site, v)
      x = self.blocks[i](x, ropes[key], masks[c.attention_kind(i)], hook)
    if not unembed:
      return x
    return self.embedder.decode(self.final_norm(x))


class Embedder(nn.Module):
  """Token embedding scaled by sqrt(d_model), tied with the unembedding."""
  vocab_size: int
  d_model: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.input_embedding = self.param(
        "input_embedding", nn.initializers.normal(0.02),
        (self.vocab_size, self.d_model))

  def encode(self, tokens: jax.Array) -> jax.Array:
    table = self.input_embedding.astype(self.dtype)
    # The scale is rounded to the compute dtype first, as the reference does.
    return table[tokens] * jnp.asarray(self.d_model ** 0.5, self.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    table = self.input_embedding.astype(self.dtype)
    return project(x, table[None], w_transposed=True)[..., 0, :]
