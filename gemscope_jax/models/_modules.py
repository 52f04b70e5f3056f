"""Flax building blocks of the Gemma 3 text decoder.

Parameter names and shapes are those of the official Gemma checkpoints
(`layer_N/attn/q_einsum/w`, `layer_N/mlp/gating_einsum`, ...), so official
parameter trees apply without renaming. Every weight matmul goes through
`project`, one (M, K) x (Bw, K, N) form that each official layout fits
without a copy. Axis letters in attention einsums: B batch, T query time,
S key time, K kv heads, G query heads per kv head, H head_dim.

Parameters may be stored in any float dtype; every op casts them to the
module's compute `dtype`. Norms, RoPE and the softmax run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemscope_jax import kernels
from gemscope_jax.models._config import Gemma3Config

# A finite stand-in for -inf: fully masked rows (left padding) stay finite.
_MASK_VALUE = -2.3819763e38

# (site name, value) -> value. Blocks call it at every hookpoint, which is how
# activations are recorded and edited; the identity costs nothing under jit.
Intervene = Callable[[str, jax.Array], jax.Array]


def _identity(_: str, x: jax.Array) -> jax.Array:
  return x


@dataclasses.dataclass(frozen=True)
class LayerKV:
  """One layer's cache buffers for one pass (see models/_cache.py).

  Attributes:
    keys, values: (B, S, K, H) buffers.
    write: prefill: fn(buffer, new (B, T, K, H)) -> buffer with the new
      tokens in; queries attend over the pass's own keys. None when
      decoding.
    slot: decoding: where the single decoded token goes (int32 scalar); it
      is written and attended over the buffers in one call
      (`kernels.decode_attention`). None in prefill.
  """
  keys: jax.Array
  values: jax.Array
  write: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  slot: jax.Array | None = None


def project(x: jax.Array, w: jax.Array, *, w_transposed: bool,
            out_dtype: jnp.dtype | None = None) -> jax.Array:
  """Every weight matmul of the model: out[..., b, n] = sum_k x[..., k] w[b, k, n].

  x (..., K); w (Bw, K, N), or (Bw, N, K) with w_transposed. The official
  weight layouts all fit this form without a copy, which lets one fast
  matmul serve every projection: oneDNN on CPU (XLA's CPU dot upcasts bf16
  to f32), XLA's own dot elsewhere (see gemscope_jax.kernels).
  """
  lead = x.shape[:-1]
  out = kernels.matmul(x.reshape(-1, x.shape[-1]), w.astype(x.dtype),
                       w_transposed=w_transposed,
                       out_dtype=out_dtype or x.dtype)
  return out.reshape(*lead, *out.shape[1:])


class RMSNorm(nn.Module):
  """RMSNorm multiplying by (1 + scale), scale initialised to zero."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Einsum(nn.Module):
  """Holds a weight `w` of a fixed shape; `fn(x, w)` applies it."""
  shape: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, fn) -> jax.Array:
    w = self.param("w", nn.initializers.normal(0.02), self.shape)
    return fn(x, w.astype(self.dtype))


def rope_table(positions: jax.Array, head_dim: int, base: float, scale: float,
               max_position: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """(sin, cos), each (B, T, 1, head_dim // 2) float32, for `apply_rope`.

  XLA's CPU sin/cos are slow (tens of ns each): evaluated per layer on every
  (batch, time, frequency) they cost a third of a bf16 attention layer. So
  the table is built once per forward pass and attention kind, and when all
  positions are known to lie in [0, max_position), only for those positions,
  then gathered.
  """
  fraction = 2.0 * jnp.arange(head_dim // 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (base ** fraction)
  if max_position is not None:
    angles = (jnp.arange(max_position, dtype=jnp.float32) / scale)[:, None]
    angles = angles * inv_freq
    sin, cos = jnp.sin(angles)[positions], jnp.cos(angles)[positions]
  else:
    angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq
    sin, cos = jnp.sin(angles), jnp.cos(angles)
  return sin[:, :, None, :], cos[:, :, None, :]


def apply_rope(x: jax.Array, table: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding on the last axis of x (B, T, heads, H), half-split form."""
  sin, cos = table
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query attention with qk-RMSNorm and per-layer RoPE."""
  config: Gemma3Config
  layer: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.q_einsum = Einsum((c.num_heads, c.d_model, c.head_dim), self.dtype)
    self.kv_einsum = Einsum((2, c.num_kv_heads, c.d_model, c.head_dim),
                            self.dtype)
    self.attn_vec_einsum = Einsum((c.num_heads, c.head_dim, c.d_model),
                                  self.dtype)
    self._query_norm = RMSNorm(c.norm_eps)
    self._key_norm = RMSNorm(c.norm_eps)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
               allowed: jax.Array, intervene: Intervene,
               layer_kv: "LayerKV | None" = None):
    """x (B, T, D), rope (sin, cos) of this layer's kind, allowed (B, T, S).

    With `layer_kv`, the new keys and values are written into its buffers
    and (out, (keys, values)) is returned; with its `slot` (decoding, T = 1)
    the query attends over the buffers (`allowed` is then (B, 1, S_buffer)),
    otherwise over this pass's own keys (prefill, exactly as without a
    cache).
    """
    c = self.config
    b, t, _ = x.shape
    q = self.q_einsum(x, lambda x, w: project(x, w, w_transposed=False))
    kv = self.kv_einsum(x, lambda x, w: project(
        x, w.reshape(2 * c.num_kv_heads, c.d_model, c.head_dim),
        w_transposed=False))
    kv = kv.reshape(b, t, 2, c.num_kv_heads, c.head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1]
    q = self._query_norm(q)
    k = self._key_norm(k)
    q = apply_rope(q, rope) * jnp.asarray(c.query_scale, self.dtype)
    k = apply_rope(k, rope)
    groups = c.num_heads // c.num_kv_heads
    q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
    new_kv = None
    if layer_kv is not None and layer_kv.slot is not None:
      # One decoded token: the write and the attention in one call, which
      # on the CPU spares XLA's copies of the updated cache.
      heads, *new_kv = kernels.decode_attention.attend(
          q[:, 0], k[:, 0], v[:, 0], layer_kv.keys, layer_kv.values,
          layer_kv.slot, allowed[:, 0], mask_value=_MASK_VALUE)
      heads, new_kv = heads[:, None], tuple(new_kv)
    else:
      if layer_kv is not None:
        new_kv = (layer_kv.write(layer_kv.keys, k),
                  layer_kv.write(layer_kv.values, v))
      heads = kernels.decode_attention.softmax_attention(
          q, k, v, allowed, mask_value=_MASK_VALUE)
    heads = heads.reshape(b, t, c.num_heads * c.head_dim)

    heads = intervene("attn_out", heads)
    out = self.attn_vec_einsum(heads, lambda x, w: project(
        x, w.reshape(1, c.num_heads * c.head_dim, c.d_model),
        w_transposed=False))[:, :, 0]
    return out if layer_kv is None else (out, new_kv)


class FeedForward(nn.Module):
  """GELU(tanh)-gated MLP; gating_einsum stacks (gate, up) as (2, F, D)."""
  config: Gemma3Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    init = nn.initializers.normal(0.02)
    w_gate_up = self.param("gating_einsum", init, (2, c.mlp_dim, c.d_model))
    w_down = self.param("linear", init, (c.mlp_dim, c.d_model))
    # The gate and up products stay float32 until the gating is done: bf16
    # elementwise math on CPU is slower than float32, and less exact.
    gate_up = project(x, w_gate_up.astype(self.dtype).reshape(
        1, 2 * c.mlp_dim, c.d_model), w_transposed=True,
                      out_dtype=jnp.float32)[..., 0, :]
    gate, up = gate_up[..., :c.mlp_dim], gate_up[..., c.mlp_dim:]
    hidden = (jax.nn.gelu(gate, approximate=True) * up).astype(self.dtype)
    return project(hidden, w_down.astype(self.dtype)[None],
                   w_transposed=False)[..., 0, :]


class Block(nn.Module):
  """One decoder block; calls `intervene` at each of its hookpoint sites."""
  config: Gemma3Config
  layer: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    eps = self.config.norm_eps
    self.pre_attention_norm = RMSNorm(eps)
    self.attn = Attention(self.config, self.layer, self.dtype)
    self.post_attention_norm = RMSNorm(eps)
    self.pre_ffw_norm = RMSNorm(eps)
    self.mlp = FeedForward(self.config, self.dtype)
    self.post_ffw_norm = RMSNorm(eps)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
               allowed: jax.Array, intervene: Intervene = _identity,
               kv: "LayerKV | None" = None):
    """The block's output; with `kv`, (output, (keys, values)) as Attention."""
    x = intervene("resid_pre", x)
    h = self.attn(self.pre_attention_norm(x), rope, allowed, intervene, kv)
    if kv is not None:
      h, new_kv = h
    x = intervene("resid_mid", x + self.post_attention_norm(h))
    h = intervene("mlp_in", self.pre_ffw_norm(x))
    h = intervene("mlp_out", self.post_ffw_norm(self.mlp(h)))
    x = intervene("resid_post", x + h)
    return x if kv is None else (x, new_kv)
