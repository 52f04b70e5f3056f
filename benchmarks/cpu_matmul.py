"""GFLOP/s of the oneDNN matmul kernel against XLA's dot and torch, on the CPU.

For each Gemma 3 270M weight matmul at 1024 tokens (plus one large square-ish
GEMM) and each of float32 / bfloat16, times in the same process:
  kernel  gemscope_jax.kernels.matmul (oneDNN through the XLA FFI), jitted
  xla     jnp.dot / jnp.einsum, jitted (XLA's CPU dot)
  torch   torch.matmul (oneDNN/MKL inside PyTorch)
All three produce the (M, Bw, N) layout the model wants (torch and xla get the
weights pre-arranged so that this needs no transpose). The three are timed
round-robin, repeat by repeat, so load from other processes hits them alike;
the best repeat is reported. A last row times a whole MLP block
(gate/up, gelu * up, down) to show the kernel's cost inside a jitted graph.

  .venv/bin/python benchmarks/cpu_matmul.py [--repeats 3] [--dtypes float32,bfloat16]

Caveat: on a small shared machine the absolute numbers move by tens of
percent from run to run; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position

from gemscope_jax import kernels  # pylint: disable=wrong-import-position

# (label, M, K, N, Bw, w_transposed)
SHAPES = [
    ("gate|up 640->2x2048 (W^T)", 1024, 640, 4096, 1, True),
    ("down 2048->640", 1024, 2048, 640, 1, False),
    ("q 640->4x256", 1024, 640, 256, 4, False),
    ("o 1024->640", 1024, 1024, 640, 1, False),
    ("square 4096x2048x4096", 4096, 2048, 4096, 1, False),
]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _make(m, k, n, bw, w_transposed, dtype_name, seed=0):
  """Inputs for the three implementations, holding the same values."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k), dtype=np.float32)
  w = rng.standard_normal((bw, n, k) if w_transposed else (bw, k, n),
                          dtype=np.float32) / np.sqrt(k)
  dtype = jnp.dtype(dtype_name)
  jx, jw = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  # XLA and torch: one (K, Bw*N) matrix (or its (Bw*N, K) transpose), so
  # x @ w is already laid out as (M, Bw, N).
  if w_transposed:
    w2 = w.reshape(bw * n, k)
  else:
    w2 = np.ascontiguousarray(w.transpose(1, 0, 2).reshape(k, bw * n))
  jw2 = jnp.asarray(w2, dtype)
  tdt = _TORCH_DTYPES[dtype_name]
  tx = torch.from_numpy(x).to(tdt)
  tw2 = torch.from_numpy(w2).to(tdt)
  return jx, jw, jw2, tx, tw2


def _impls(m, k, n, bw, w_transposed, dtype_name):
  jx, jw, jw2, tx, tw2 = _make(m, k, n, bw, w_transposed, dtype_name)
  kernel = jax.jit(lambda x, w: kernels.matmul(x, w, w_transposed=w_transposed))
  if w_transposed:
    xla = jax.jit(lambda x, w: jnp.dot(x, w.T).reshape(m, bw, n))
    tfn = lambda: torch.matmul(tx, tw2.t())
  else:
    xla = jax.jit(lambda x, w: jnp.dot(x, w).reshape(m, bw, n))
    tfn = lambda: torch.matmul(tx, tw2)
  return {
      "kernel": lambda: kernel(jx, jw).block_until_ready(),
      "xla": lambda: xla(jx, jw2).block_until_ready(),
      "torch": tfn,
  }


def _mlp_impls(dtype_name, tokens=1024, d=640, f=2048):
  """A Gemma MLP block: down(gelu(x W_gate) * (x W_up))."""
  rng = np.random.default_rng(0)
  dtype = jnp.dtype(dtype_name)
  x = rng.standard_normal((tokens, d), dtype=np.float32)
  wgu = rng.standard_normal((2, f, d), dtype=np.float32) / np.sqrt(d)
  wd = rng.standard_normal((1, f, d), dtype=np.float32) / np.sqrt(f)
  jx, jgu, jd = (jnp.asarray(a, dtype) for a in (x, wgu, wd))

  @jax.jit
  def kernel(x, wgu, wd):
    gu = kernels.matmul(x, wgu, w_transposed=True)
    h = jax.nn.gelu(gu[:, 0], approximate=True) * gu[:, 1]
    return kernels.matmul(h, wd, w_transposed=False)[:, 0]

  @jax.jit
  def xla(x, wgu, wd):
    gu = jnp.einsum("md,bfd->mbf", x, wgu)
    h = jax.nn.gelu(gu[:, 0], approximate=True) * gu[:, 1]
    return jnp.dot(h, wd[0])

  tdt = _TORCH_DTYPES[dtype_name]
  tx = torch.from_numpy(x).to(tdt)
  tgu = torch.from_numpy(wgu.reshape(2 * f, d)).to(tdt)
  td = torch.from_numpy(wd[0]).to(tdt)

  def tfn():
    with torch.no_grad():
      gu = torch.nn.functional.linear(tx, tgu).view(tokens, 2, f)
      h = torch.nn.functional.gelu(gu[:, 0], approximate="tanh") * gu[:, 1]
      return h @ td

  flops = 2 * tokens * d * 2 * f + 2 * tokens * f * d
  return flops, {
      "kernel": lambda: kernel(jx, jgu, jd).block_until_ready(),
      "xla": lambda: xla(jx, jgu, jd).block_until_ready(),
      "torch": tfn,
  }


def _time(impls: dict, repeats: int) -> dict:
  """Best seconds per implementation, timed round-robin after a warm-up."""
  for fn in impls.values():
    fn()
  best = {name: float("inf") for name in impls}
  for _ in range(repeats):
    for name, fn in impls.items():
      # Let the previous library's spinning worker threads go to sleep.
      time.sleep(0.02)
      t = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - t)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  args = parser.parse_args()

  if not kernels.available():
    raise SystemExit(f"kernel unavailable: {kernels.unavailable_reason()}")
  print(f"jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
        f"best of {args.repeats}; GFLOP/s (higher is better)")
  header = (f"{'shape':<28}{'dtype':<10}{'kernel':>8}{'xla':>8}{'torch':>8}"
            f"{'k/xla':>7}{'k/torch':>8}  oneDNN impl")
  print(header)
  print("-" * len(header))
  for dtype_name in args.dtypes.split(","):
    rows = []
    for label, m, k, n, bw, t in SHAPES:
      impl = kernels.impl_name(m, k, n, bw, w_transposed=t,
                               dtype=jnp.dtype(dtype_name))
      rows.append((label, 2.0 * m * k * n * bw,
                   _time(_impls(m, k, n, bw, t, dtype_name), args.repeats),
                   impl))
    flops, impls = _mlp_impls(dtype_name)
    rows.append(("MLP block 1024 tok", flops, _time(impls, args.repeats), ""))
    for label, flops, best, impl in rows:
      g = {name: flops / s / 1e9 for name, s in best.items()}
      print(f"{label:<28}{dtype_name:<10}{g['kernel']:>8.0f}{g['xla']:>8.0f}"
            f"{g['torch']:>8.0f}{g['kernel'] / g['xla']:>7.2f}"
            f"{g['kernel'] / g['torch']:>8.2f}  {impl}", flush=True)


if __name__ == "__main__":
  main()
