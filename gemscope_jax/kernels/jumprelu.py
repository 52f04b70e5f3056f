"""The elementwise part of a JumpReLU backward pass, fused on the CPU.

`jumprelu_grad(g_f, pre, threshold, bandwidth=, below_grad=, bias=)` returns the
pre-activation gradient and six per-latent sums over the tokens (see
`jumprelu_grad.cc` for the formulas). On the CPU backend, when the handler
builds (g++ with OpenMP; no other library), it runs as one C++ pass over the
two (tokens, latents) inputs; elsewhere, and when `use_kernel=False`, the
same values come from `jnp` ops (`reference`), which XLA partitions over a
device mesh like any other op. The choice is made at lowering time
(`jax.lax.platform_dependent`).

Caveat: the custom call has no sharding rule, so inside a program
partitioned over several devices XLA would gather its operands; callers pass
`use_kernel=False` there (the trainer does whenever its mesh has more than
one device). The kernel is built with -march=native and cached per CPU
feature set.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax.kernels import _build

FFI_TARGET = "gemscope_jumprelu_grad"
N_SUMS = 6

_LIBRARY = _build.gxx_library(
    pathlib.Path(__file__).with_name("jumprelu_grad.cc"), FFI_TARGET,
    "GemscopeJumpReluGrad", what="the fused JumpReLU CPU kernel",
    fallback=("JumpReLU training steps fall back to XLA ops (the same "
              "values, slower on the CPU)."))


def available() -> bool:
  """Whether the fused kernel is built and loaded in this process."""
  return _LIBRARY.load() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False, or None when the kernel is loaded."""
  return _LIBRARY.unavailable_reason()


def reference(g_f: jax.Array, pre: jax.Array, threshold: jax.Array,
              bias: jax.Array | None = None, *, bandwidth: float,
              below_grad: float) -> tuple[jax.Array, jax.Array]:
  """The kernel's outputs from `jnp` ops (any platform, any sharding)."""
  if bias is not None:
    pre = pre + bias
  active = pre > threshold
  below = pre < threshold
  window = jnp.abs((pre - threshold) / jnp.float32(bandwidth)) < 0.5
  g_pre = jnp.where(active, g_f, jnp.where(below, below_grad, 0.0)
                    ).astype(jnp.float32)
  f32 = jnp.float32
  sums = jnp.stack([
      jnp.sum(jnp.where(window, g_f, 0.0), axis=0, dtype=f32),
      jnp.sum(window, axis=0, dtype=f32),
      jnp.sum(active, axis=0, dtype=f32),
      jnp.sum(g_pre, axis=0, dtype=f32),
      jnp.sum(below, axis=0, dtype=f32),
      jnp.sum(jnp.where(below, threshold - pre, 0.0), axis=0, dtype=f32),
  ])
  return g_pre, sums


def _ffi(g_f, pre, threshold, bias, *, bandwidth: float, below_grad: float):
  call = jax.ffi.ffi_call(
      FFI_TARGET,
      (jax.ShapeDtypeStruct(pre.shape, jnp.float32),
       jax.ShapeDtypeStruct((N_SUMS, pre.shape[1]), jnp.float32)),
      input_output_aliases={0: 0}, vmap_method="sequential")
  return call(g_f, pre, bias, threshold, bandwidth=np.float32(bandwidth),
              below_grad=np.float32(below_grad))


def jumprelu_grad(g_f: jax.Array, pre: jax.Array, threshold: jax.Array, *,
                  bandwidth: float, below_grad: float = 0.0,
                  bias: jax.Array | None = None, use_kernel: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
  """Pre-activation gradient and per-latent sums of a JumpReLU backward.

  Args:
    g_f: (T, L) dL/d latents.
    pre: (T, L) pre-activations, or with `bias` the encoder product they
      are `pre + bias` of (so XLA need not materialise the sum).
    threshold: (L,) thresholds.
    bandwidth: the straight-through window's width eps (pairs with
      |pre - threshold| / eps < 1/2 are in the window).
    below_grad: dL/dpre where pre < threshold (the pre-activation loss's
      -coeff / T); 0 without that loss.
    bias: optional (L,) added to `pre`.
    use_kernel: allow the C++ kernel on the CPU (False inside programs
      partitioned over several devices).

  Returns:
    (g_pre (T, L) f32, sums (6, L) f32): sums over tokens of
    [window * g_f, window, active, g_pre, below, below * (threshold - pre)].

  Raises:
    ValueError: on shapes that do not match.
  """
  g_f, pre, threshold = (jnp.asarray(a, jnp.float32)
                         for a in (g_f, pre, threshold))
  bias = (jnp.zeros_like(threshold) if bias is None
          else jnp.asarray(bias, jnp.float32))
  if (pre.ndim != 2 or g_f.shape != pre.shape
      or threshold.shape != (pre.shape[1],) or bias.shape != threshold.shape):
    raise ValueError(f"jumprelu_grad expects g_f and pre (T, L), threshold "
                     f"and bias (L,); got g_f {g_f.shape}, pre {pre.shape}, "
                     f"threshold {threshold.shape}, bias {bias.shape}")
  kw = dict(bandwidth=float(bandwidth), below_grad=float(below_grad))
  if not use_kernel or pre.size == 0 or not available():
    return reference(g_f, pre, threshold, bias, **kw)
  return jax.lax.platform_dependent(
      g_f, pre, threshold, bias, cpu=functools.partial(_ffi, **kw),
      default=functools.partial(reference, **kw))
