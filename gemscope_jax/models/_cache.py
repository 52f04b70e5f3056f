"""The key/value cache that lets Gemma 3 decode one token at a time.

Each layer keeps its keys and values after qk-norm and RoPE, (B, S, K, H).
Global layers keep the whole context (S = cache length); the sliding-window
layers (5 of every 6) keep only their window (S = min(window, cache length)),
written as a ring buffer: the token at time t goes to slot t % S, so once
the buffer is full each new token overwrites the one that just left the
window. Memory for a long generation is therefore bounded by the window for
most layers, as in the official implementation (`cache_bytes` gives the
formula).

Prompts are left-padded to a common length: every row shares one time axis,
`length` counts the time steps written, and `start[b]` is the time of row
b's first real token (its BOS), so a token's position is `t - start[b]` and
padding keys are those with time < start[b].

Caveat: the cache assumes left padding (real tokens contiguous up to the
last column); `prefill` is the only way to fill it.
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax.models._config import AttentionKind, Gemma3Config


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, and where the sequence is.

  Attributes:
    keys: per layer, (B, S_layer, K, H) in the compute dtype.
    values: per layer, same shapes as `keys`.
    length: () int32, time steps written so far (the next token's time).
    start: (B,) int32, time of each row's first real token.
  """
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  length: jax.Array
  start: jax.Array

  @property
  def batch_size(self) -> int:
    return self.keys[0].shape[0]

  @property
  def max_length(self) -> int:
    """The longest sequence the cache can hold (its global layers' size)."""
    return max(k.shape[1] for k in self.keys)


def layer_sizes(config: Gemma3Config, cache_length: int) -> tuple[int, ...]:
  """Slots each layer keeps: the window for local layers, else everything."""
  return tuple(
      min(config.sliding_window, cache_length)
      if config.attention_kind(i) == AttentionKind.LOCAL else cache_length
      for i in range(config.num_layers))


def init_cache(config: Gemma3Config, batch_size: int, cache_length: int,
               dtype: jnp.dtype = jnp.float32) -> KVCache:
  """An empty cache for `batch_size` rows of up to `cache_length` tokens."""
  shape = lambda s: (batch_size, s, config.num_kv_heads, config.head_dim)
  sizes = layer_sizes(config, cache_length)
  return KVCache(keys=tuple(jnp.zeros(shape(s), dtype) for s in sizes),
                 values=tuple(jnp.zeros(shape(s), dtype) for s in sizes),
                 length=jnp.zeros((), jnp.int32),
                 start=jnp.zeros((batch_size,), jnp.int32))


def cache_bytes(config: Gemma3Config, batch_size: int, cache_length: int,
                dtype: jnp.dtype = jnp.float32) -> int:
  """Bytes of a cache: 2 (k, v) x B x K x H x itemsize x sum of layer sizes."""
  per_slot = (2 * batch_size * config.num_kv_heads * config.head_dim
              * jnp.dtype(dtype).itemsize)
  return per_slot * sum(layer_sizes(config, cache_length))


# --- how one pass reads and writes a layer's buffers ---------------------------

# (buffer (B, S, K, H), new (B, T, K, H)) -> buffer with `new` written.
Writer = Callable[[jax.Array, jax.Array], jax.Array]


def prefill_writer(num_tokens: int, size: int) -> Writer:
  """Writes the last min(T, S) of T prompt tokens (times 0..T-1) at t % S.

  Older tokens would be overwritten anyway: writing only the survivors keeps
  the scatter free of duplicate slots (whose winner XLA leaves unspecified).
  """
  keep = min(num_tokens, size)
  slots = np.arange(num_tokens - keep, num_tokens) % size

  def write(buf, new):
    return buf.at[:, slots].set(new[:, num_tokens - keep:].astype(buf.dtype))
  return write


def decode_slot(time: jax.Array, size: int) -> jax.Array:
  """The slot (int32) one decoded token at time `time` goes to: time % S
  (written by `kernels.decode_attention.attend`)."""
  return (time % size).astype(jnp.int32)


def decode_allowed(config: Gemma3Config, kind: AttentionKind, size: int,
                   time: jax.Array, start: jax.Array) -> jax.Array:
  """(B, 1, S) keys a token at `time` may attend to, by slot.

  Slot s last received the token at time `time - ((time - s) mod S)`; it is
  allowed if that time is a real token of the row (>= start[b]) and, for a
  local layer, inside the window (always true once the ring holds exactly
  the window, kept for caches shorter than the window).
  """
  slots = jnp.arange(size)
  held = time - jnp.mod(time - slots, size)
  ok = (held >= 0)[None, :] & (held[None, :] >= start[:, None])
  if kind == AttentionKind.LOCAL:
    ok &= (time - held < config.sliding_window)[None, :]
  return ok[:, None, :]
