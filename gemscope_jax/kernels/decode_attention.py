"""One decoding token's attention over a layer's KV cache, on the CPU.

Written as XLA ops, a decode step writes the token's key and value into the
loop-carried cache and attends over it; XLA's CPU backend then copies the
updated cache into the layouts its dots want (about four 256 KB copies a
layer a step for Gemma 3 270M: 2.6 of a 31 ms float32 step at batch 1).
`attend` does both in one C++ call (`decode_attention.cc`) that writes the
new slot in place and reads each cache row once.

The values are those of `reference` (the model's einsum path) up to the
order of the f32 sums and exp's last bit. On the CPU backend, when the
handler builds (g++), it runs as one call; elsewhere, and for dtypes other
than float32 and bfloat16, `reference` runs. The choice is made at
lowering time.

Caveat: the custom call has no sharding rule; callers use it only in
programs that are not partitioned over several devices.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax.kernels import _build

FFI_TARGET = "gemscope_decode_attention"

_LIBRARY = _build.gxx_library(
    pathlib.Path(__file__).with_name("decode_attention.cc"), FFI_TARGET,
    "GemscopeDecodeAttention", what="the decode attention CPU kernel",
    fallback=("Decoding then attends with XLA ops (the same values up to "
              "summation order, slower on the CPU)."),
    headers=("simd_rows.h", "xla_pool.h"))


def available() -> bool:
  """Whether the kernel is built and loaded (the first call builds it)."""
  return _LIBRARY.load() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False, or None when the kernel is loaded."""
  return _LIBRARY.unavailable_reason()


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      allowed: jax.Array, *, mask_value: float) -> jax.Array:
  """Grouped-query attention as XLA ops (the model's path everywhere but a
  CPU decode step): q (B, T, K, G, H) against k, v (B, S, K, H) where
  `allowed` (B, T, S); f32 logits and softmax, the probabilities rounded
  to q's dtype, f32 sums. Returns (B, T, K, G, H) in q's dtype."""
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k,
                      preferred_element_type=jnp.float32)
  logits = jnp.where(allowed[:, None, None], logits, mask_value)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  # A float32 result is faster than a bf16 one on CPU (XLA converts a bf16
  # dot's output in a separate pass) and costs nothing elsewhere.
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v,
                    preferred_element_type=jnp.float32).astype(q.dtype)


def reference(q, k_new, v_new, k_buf, v_buf, slot, allowed, mask_value):
  """`attend` as XLA ops: the write, then `softmax_attention`."""
  k_buf = jax.lax.dynamic_update_slice_in_dim(
      k_buf, k_new[:, None].astype(k_buf.dtype), slot, axis=1)
  v_buf = jax.lax.dynamic_update_slice_in_dim(
      v_buf, v_new[:, None].astype(v_buf.dtype), slot, axis=1)
  out = softmax_attention(q[:, None], k_buf, v_buf, allowed[:, None],
                          mask_value=mask_value)
  return out[:, 0], k_buf, v_buf


def _ffi(q, k_new, v_new, k_buf, v_buf, slot, allowed, mask_value):
  call = jax.ffi.ffi_call(
      FFI_TARGET,
      (jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct(k_buf.shape, k_buf.dtype),
       jax.ShapeDtypeStruct(v_buf.shape, v_buf.dtype)),
      input_output_aliases={3: 1, 4: 2}, vmap_method="sequential")
  return call(q, k_new, v_new, k_buf, v_buf, slot, allowed,
              mask_value=np.float32(mask_value))


def attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array,
           k_buf: jax.Array, v_buf: jax.Array, slot: jax.Array,
           allowed: jax.Array, *, mask_value: float,
           use_kernel: bool = True):
  """Writes one token's key and value at `slot` and attends over the cache.

  Args:
    q: (B, K, G, H) the token's queries (normed, rotated and scaled), G
      query heads per KV head.
    k_new, v_new: (B, K, H) its key (normed, rotated) and value.
    k_buf, v_buf: (B, S, K, H) the layer's cache buffers; donate them (or
      let them be loop-carried) for the write to happen in place.
    slot: int32 scalar in [0, S), where the token goes.
    allowed: (B, S) bool, the slots each row may attend to (the new slot
      included).
    mask_value: the logit of a slot that is not allowed.
    use_kernel: allow the C++ kernel on the CPU.

  Returns:
    (out (B, K, G, H) in q's dtype, k_buf, v_buf with the token written).

  Raises:
    ValueError: on shapes or dtypes that do not match.
  """
  b, k, g, h = q.shape if q.ndim == 4 else (None,) * 4
  if (q.ndim != 4 or k_buf.ndim != 4 or k_buf.shape != v_buf.shape
      or k_buf.shape[0] != b or k_buf.shape[2:] != (k, h)
      or k_new.shape != (b, k, h) or v_new.shape != (b, k, h)
      or allowed.shape != (b, k_buf.shape[1])):
    raise ValueError(
        f"decode_attention.attend expects q (B, K, G, H), k_new and v_new "
        f"(B, K, H), k_buf and v_buf (B, S, K, H), allowed (B, S); got q "
        f"{q.shape}, k_new {k_new.shape}, v_new {v_new.shape}, k_buf "
        f"{k_buf.shape}, v_buf {v_buf.shape}, allowed {allowed.shape}")
  slot = jnp.asarray(slot, jnp.int32)
  allowed = allowed.astype(bool)
  fallback = functools.partial(reference, mask_value=mask_value)
  dtypes = {x.dtype for x in (q, k_new, v_new, k_buf, v_buf)}
  if (not use_kernel or len(dtypes) != 1
      or dtypes.pop() not in (jnp.float32, jnp.bfloat16) or not available()):
    return fallback(q, k_new, v_new, k_buf, v_buf, slot, allowed)
  return jax.lax.platform_dependent(
      q, k_new, v_new, k_buf, v_buf, slot, allowed,
      cpu=functools.partial(_ffi, mask_value=mask_value),
      default=fallback)
