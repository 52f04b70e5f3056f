"""Weight matmuls that run on oneDNN on the CPU and on XLA's dot elsewhere.

`matmul(x, w)` computes out[m, b, n] = sum_k x[m, k] w[b, k, n] (or
w[b, n, k] with `w_transposed=True`). On the CPU backend it calls a small C++
XLA FFI handler (`onednn_matmul.cc`) that runs the product with oneDNN, whose
kernels use the CPU's bf16 dot-product instructions: XLA's CPU backend upcasts
bf16 dots to f32 and so gains nothing from bf16. The choice is made per
platform at lowering time (`jax.lax.platform_dependent`), so the same jitted
code uses XLA's own dot on GPU and TPU. Gradients go through a `custom_vjp`
whose backward pass is plain `jnp.einsum`.

The handler is compiled with g++ against Debian's libdnnl-dev at first use and
cached under `assets.cache_dir() / "kernels"` (see `_build.Library`); set
GEMSCOPE_CPU_KERNELS=0 to turn it off.

Caveat: oneDNN parallelizes with OpenMP, beside (not inside) XLA's thread
pool; each call uses every core OpenMP sees (OMP_NUM_THREADS), and calls are
serialized in C++ so concurrent custom calls do not oversubscribe the cores.
When the kernel cannot be built, one warning is logged and everything falls
back to `jnp.einsum` (correct, but bf16 then runs at f32 speed on the CPU).
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax.kernels import _build

FFI_TARGET = "gemscope_onednn_matmul"
_IMPL_NAME_SYMBOL = "gemscope_onednn_impl_name"
_KERNEL_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))
# Rows up to which a float32 product with one weight matrix runs on XLA.
_FEW_ROWS = 8


def _explain(stderr: str) -> str | None:
  if "dnnl.hpp" in stderr and "No such file" in stderr:
    return "oneDNN headers (dnnl.hpp) not found"
  if "-ldnnl" in stderr or "cannot find -ldnnl" in stderr:
    return "oneDNN library (libdnnl.so) not found"
  return None


_LIBRARY = _build.Library(
    stem="onednn_matmul",
    source=pathlib.Path(__file__).with_name("onednn_matmul.cc"),
    cxxflags=("-O3", "-std=c++17"), libs=("-ldnnl",),
    targets={FFI_TARGET: "GemscopeOnednnMatmul"},
    warning="the oneDNN CPU matmul kernel is unavailable",
    how_to_enable=(
        "CPU matmuls fall back to XLA's dot, where bf16 runs no faster than "
        "f32. To enable it, install a C++ compiler and oneDNN, e.g. on "
        "Debian/Ubuntu `apt-get install -y g++ libdnnl-dev`; set "
        "GEMSCOPE_CPU_KERNELS=0 to turn it off without this warning."),
    explain=_explain)
_load = _LIBRARY.load

FEW_ROWS_TARGET = "gemscope_few_rows"
_FEW_ROWS_LIBRARY = _build.gxx_library(
    pathlib.Path(__file__).with_name("few_rows.cc"), FEW_ROWS_TARGET,
    "GemscopeFewRows", what="the few-row CPU matmul kernel",
    fallback=("Decoding then multiplies its few rows on oneDNN or XLA's dot "
              "(the same values up to summation order, slower)."),
    headers=("simd_rows.h", "xla_pool.h"))


def few_rows_available() -> bool:
  """Whether the few-row kernel (`few_rows.cc`) is built and loaded."""
  return _FEW_ROWS_LIBRARY.load() is not None


def available() -> bool:
  """Whether the oneDNN kernel is built and loaded in this process.

  The first call compiles the kernel if it is not cached yet (seconds).
  """
  return _load() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False, or None when the kernel is loaded."""
  return _LIBRARY.unavailable_reason()


def impl_name(m: int, k: int, n: int, bw: int = 1, *,
              w_transposed: bool = False, dtype=jnp.float32,
              out_dtype=None) -> str:
  """oneDNN's name for the kernel it picks for a problem (diagnostics).

  Raises:
    RuntimeError: the kernel is unavailable or oneDNN rejects the problem.
  """
  lib = _load()
  if lib is None:
    raise RuntimeError(f"kernel unavailable: {unavailable_reason()}")
  fn = getattr(lib, _IMPL_NAME_SYMBOL)
  fn.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int] * 3 + [
      ctypes.c_char_p, ctypes.c_size_t]
  fn.restype = ctypes.c_int
  bf16 = np.dtype(jnp.bfloat16)
  out_dtype = np.dtype(dtype if out_dtype is None else out_dtype)
  buf = ctypes.create_string_buffer(512)
  rc = fn(m, k, n, bw, int(w_transposed), int(np.dtype(dtype) == bf16),
          int(out_dtype == bf16), buf, len(buf))
  text = buf.value.decode(errors="replace")
  if rc != 0:
    raise RuntimeError(f"oneDNN rejects the problem: {text}")
  return text


def _w_spec(w_transposed: bool) -> str:
  return "bnk" if w_transposed else "bkn"


def _acc_dtype(dtype) -> np.dtype:
  # f32 accumulation, or wider when the inputs are wider (x64 mode).
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _xla_matmul(x, w, w_transposed: bool, out_dtype: np.dtype):
  return jnp.einsum(f"mk,{_w_spec(w_transposed)}->mbn", x, w,
                    preferred_element_type=_acc_dtype(x.dtype)
                    ).astype(out_dtype)


def _ffi_matmul(x, w, w_transposed: bool, out_dtype: np.dtype):
  m = x.shape[0]
  bw, n = w.shape[0], w.shape[1] if w_transposed else w.shape[2]
  # oneDNN 2.6 has no f32 x f32 -> bf16 matmul; rounding the f32 result once
  # afterwards is the same arithmetic.
  kernel_out = np.dtype(jnp.float32) if x.dtype == np.float32 else out_dtype
  call = jax.ffi.ffi_call(
      FFI_TARGET, jax.ShapeDtypeStruct((m, bw, n), kernel_out),
      vmap_method="sequential")
  return call(x, w, w_transposed=bool(w_transposed)).astype(out_dtype)


def _xla_few_rows(x, w, w_transposed: bool, out_dtype: np.dtype):
  # One weight matrix against a few rows, as XLA's CPU backend does it
  # fastest: x @ w, or for an (N, K) weight the weight as the left operand
  # (N dot products of contiguous rows); jnp.einsum of the transposed form
  # took 15x longer.
  if w_transposed:
    out = jax.lax.dot_general(w[0], x, (((1,), (1,)), ((), ())),
                              preferred_element_type=_acc_dtype(x.dtype)).T
  else:
    out = jnp.matmul(x, w[0], preferred_element_type=_acc_dtype(x.dtype))
  return out[:, None].astype(out_dtype)


def _ffi_few_rows(x, w, w_transposed: bool, out_dtype: np.dtype):
  m = x.shape[0]
  bw, n = w.shape[0], w.shape[1] if w_transposed else w.shape[2]
  call = jax.ffi.ffi_call(
      FEW_ROWS_TARGET, jax.ShapeDtypeStruct((m, bw, n), jnp.float32),
      vmap_method="sequential")
  return call(x, w, w_transposed=bool(w_transposed)).astype(out_dtype)


def _forward(x, w, w_transposed: bool, out_dtype: np.dtype):
  in_dtype = np.dtype(jnp.promote_types(x.dtype, w.dtype))
  x, w = x.astype(in_dtype), w.astype(in_dtype)
  if (in_dtype not in _KERNEL_DTYPES or out_dtype not in _KERNEL_DTYPES
      or not available()):
    return _xla_matmul(x, w, w_transposed, out_dtype)
  cpu = functools.partial(_ffi_matmul, w_transposed=w_transposed,
                          out_dtype=out_dtype)
  if x.shape[0] == 1 and few_rows_available():
    # One row (decoding at batch 1): the weights streamed once, in order
    # (Gemma 3 270M's 18 layers, every projection: 14.6 against 23.5 ms
    # on oneDNN in float32, 11.5 against 18.3 in bfloat16). At 8 rows it
    # is slower than oneDNN (its row-at-a-time accumulation is compute
    # bound there).
    cpu = functools.partial(_ffi_few_rows, w_transposed=w_transposed,
                            out_dtype=out_dtype)
  elif (in_dtype == np.float32 and w.shape[0] == 1
      and x.shape[0] <= _FEW_ROWS):
    # Decoding in float32: XLA's matrix-vector products of one weight beat
    # oneDNN's at 1-8 rows (Gemma 3 270M, 18 layers, one row: the fused
    # gate/up 7.2 against 14.7 ms, down 3.5 against 4.8, o 1.5 against 3.2;
    # stacked weights (q, kv) stay on oneDNN, where XLA is slower).
    cpu = functools.partial(_xla_few_rows, w_transposed=w_transposed,
                            out_dtype=out_dtype)
  return jax.lax.platform_dependent(
      x, w,
      cpu=cpu,
      default=functools.partial(_xla_matmul, w_transposed=w_transposed,
                                out_dtype=out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, w_transposed: bool, out_dtype: np.dtype):
  return _forward(x, w, w_transposed, out_dtype)


def _matmul_fwd(x, w, w_transposed, out_dtype):
  return _forward(x, w, w_transposed, out_dtype), (x, w)


def _matmul_bwd(w_transposed, out_dtype, res, g):
  del out_dtype
  x, w = res
  acc = _acc_dtype(jnp.promote_types(x.dtype, w.dtype))
  spec = _w_spec(w_transposed)
  dx = jnp.einsum(f"mbn,{spec}->mk", g, w, preferred_element_type=acc)
  dw = jnp.einsum(f"mk,mbn->{spec}", x, g, preferred_element_type=acc)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, *, w_transposed: bool,
           out_dtype=None) -> jax.Array:
  """out[m, b, n] = sum_k x[m, k] w[b, k, n], accumulated in f32.

  On the CPU backend (when `available()`), float32 and bfloat16 products run
  on oneDNN; elsewhere, and for other dtypes, on `jnp.einsum` with
  `preferred_element_type=float32`. Both give the same values up to
  summation order. Differentiable (the backward pass uses `jnp.einsum`).

  Args:
    x: (M, K) activations.
    w: (Bw, K, N) weights, or (Bw, N, K) with `w_transposed=True`; the Bw
      weight matrices all multiply the same x.
    w_transposed: whether w is stored as (Bw, N, K).
    out_dtype: dtype of the result; defaults to the promoted input dtype. A
      bfloat16 result is rounded once from the f32 accumulator.

  Returns:
    (M, Bw, N) array of `out_dtype`.

  Raises:
    ValueError: on ranks or contraction sizes that do not match.
  """
  x, w = jnp.asarray(x), jnp.asarray(w)
  if x.ndim != 2 or w.ndim != 3:
    raise ValueError(
        f"matmul expects x of shape (M, K) and w of shape (Bw, K, N) or "
        f"(Bw, N, K); got x {x.shape}, w {w.shape}")
  k_w = w.shape[2] if w_transposed else w.shape[1]
  if x.shape[1] != k_w:
    layout = "(Bw, N, K)" if w_transposed else "(Bw, K, N)"
    raise ValueError(f"contraction sizes differ: x {x.shape} (M, K), "
                     f"w {w.shape} {layout}")
  if out_dtype is None:
    out_dtype = jnp.promote_types(x.dtype, w.dtype)
  return _matmul(x, w, bool(w_transposed), np.dtype(out_dtype))
