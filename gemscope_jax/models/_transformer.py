"""The Gemma 3 text decoder as a Flax module.

`Gemma3(config).apply({"params": p}, tokens, ...)` runs the decoder; the
jitted entry points that users call live in `_api.py`. The module runs only
the blocks it needs: with `num_blocks=L + 1` and `unembed=False` it stops
after block L, which is how activations are harvested cheaply.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemscope_jax.models import _cache
from gemscope_jax.models._config import AttentionKind, Gemma3Config
from gemscope_jax.models._modules import (Block, Intervene, LayerKV, RMSNorm,
                                          _identity, project, rope_table)


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
               intervene: Intervene = _identity,
               cache: _cache.KVCache | None = None, decode: bool = False,
               last_only: bool = False):
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
      cache: A `KVCache` to fill (prefill: `decode=False`, the prompt
        left-padded, times 0..T-1; the cache must be empty) or to extend by
        one token per row (`decode=True`, T = 1, at time `cache.length`;
        `mask` and `positions` are then ignored: they follow from the cache).
      decode: See `cache`.
      last_only: With a cache, unembed only the last position (a prompt's
        next-token logits, without a (B, T, V) array).
      (With a cache, `unembed=False` returns the residual after the last
      block in place of the logits; `num_blocks` is not taken.)

    Returns:
      Logits (B, T, V) in the compute dtype, or the residual (B, T, D); with
      a cache, (that, the updated cache).
    """
    c = self.config
    if cache is not None:
      return self._with_cache(tokens, mask, cache, decode, intervene,
                              last_only, unembed)
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


  def _with_cache(self, tokens, mask, cache, decode, intervene, last_only,
                  unembed=True):
    c = self.config
    b, t = tokens.shape
    if decode:
      if t != 1:
        raise ValueError(f"decoding takes one token per row, got {t}")
      time = cache.length
      positions = jnp.broadcast_to(time - cache.start, (b,))[:, None]
      start = cache.start
    else:
      if mask is None:
        mask = tokens != 0
      mask = mask.astype(bool)
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
      masks = attention_masks(c, mask)
      start = (t - mask.sum(axis=1)).astype(jnp.int32)
    keys, values, ropes = [], [], {}
    x = self.embedder.encode(tokens)
    for i in range(c.num_layers):
      key, kind = c.rope(i), c.attention_kind(i)
      size = cache.keys[i].shape[1]
      if key not in ropes:
        # Prefill positions lie in [0, T): gather RoPE from a small table,
        # as `forward` does, so both compute the same values.
        ropes[key] = rope_table(positions, c.head_dim, *key,
                                None if decode else t)
      if decode:
        allowed = _cache.decode_allowed(c, kind, size, time, start)
        kv = LayerKV(cache.keys[i], cache.values[i],
                     slot=_cache.decode_slot(time, size))
      else:
        allowed = masks[kind]
        kv = LayerKV(cache.keys[i], cache.values[i],
                     write=_cache.prefill_writer(t, size))
      prefix = f"layer_{i}/"
      hook = lambda site, v, prefix=prefix: intervene(prefix + site, v)
      x, (k_buf, v_buf) = self.blocks[i](x, ropes[key], allowed, hook, kv)
      keys.append(k_buf)
      values.append(v_buf)
    new_cache = _cache.KVCache(keys=tuple(keys), values=tuple(values),
                               length=(cache.length + t).astype(jnp.int32),
                               start=start)
    if last_only:
      x = x[:, -1:]
    if not unembed:
      return x, new_cache
    return self.embedder.decode(self.final_norm(x)), new_cache


# At most this many rows are unembedded as table @ x.T (see Embedder.decode).
_FEW_ROWS = 8


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
    if table.dtype != jnp.float32:
      # XLA's CPU backend computes the bfloat16 multiply below in float32
      # and moves that conversion before the gather: it converts the whole
      # (V, D) table (a 671 MB write) and, in the decode loop, hoists it out
      # of the loop (measured: 200 ms a generate call). The barriers keep
      # the gather on the table as it is, and the conversion on its rows.
      table, tokens = jax.lax.optimization_barrier((table, tokens))
      rows = jax.lax.optimization_barrier(table[tokens])
    else:
      rows = table[tokens]
    # The scale is rounded to the compute dtype first, as the reference does.
    return rows * jnp.asarray(self.d_model ** 0.5, self.dtype)

  def decode(self, x: jax.Array) -> jax.Array:
    table = self.input_embedding.astype(self.dtype)
    lead = x.shape[:-1]
    if math.prod(lead) <= _FEW_ROWS:
      # Decoding: a few rows against the whole (V, D) table. With the table
      # as the left operand the CPU reads it once in order (a matrix-vector
      # product), about twice as fast as x @ table.T (measured: 52 vs 100
      # ms per token at batch 1, float32); the table is the largest read of
      # a decode step. In bfloat16, XLA's CPU dot first converts the whole
      # table to float32 (a 671 MB write and read per call: measured 287
      # against 31 ms for one row), so there the oneDNN kernel, which reads
      # bfloat16 and accumulates in float32, takes the table as its left
      # operand too (one or eight rows: 14 against 22.5-24 ms as
      # x @ table.T; in float32 XLA's product is the faster, 28 against
      # 42 ms for one row).
      rows = x.reshape(-1, x.shape[-1])
      if table.dtype == jnp.float32:
        out = jax.lax.dot_general(table, rows, (((1,), (1,)), ((), ())))
      else:
        out = project(table, rows[None], w_transposed=True)[:, 0]
      return out.T.reshape(*lead, -1).astype(x.dtype)
    return project(x, table[None], w_transposed=True)[..., 0, :]
