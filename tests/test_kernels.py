"""The oneDNN CPU matmul kernel against float64 numpy, and its fallbacks.

References are float64 einsums of the exact inputs the kernel sees (for bf16,
the bf16-rounded values), so the tolerances only cover f32 summation error
and, for a bf16 result, its single final rounding. The kernel must be
available here: the project's setup installs g++ and libdnnl-dev, and a
missing toolchain is a failure, not a skip.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from gemscope_jax import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]
F32_EPS = 2.0**-24
BF16_EPS = 2.0**-8  # relative rounding error bound of bfloat16

# (M, K, N, Bw): odd sizes, a single row (the few-row kernel, with tails
# after its 64- and 16-wide steps), one and several weight batches.
SHAPES = [(7, 33, 5, 1), (7, 33, 5, 3), (1, 16, 8, 2), (64, 128, 96, 4),
          (130, 70, 257, 1), (1, 201, 131, 3), (1, 640, 1024, 1)]


def _inputs(m, k, n, bw, w_transposed, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((m, k), dtype=np.float32)
  w_shape = (bw, n, k) if w_transposed else (bw, k, n)
  w = rng.standard_normal(w_shape, dtype=np.float32)
  return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _reference(x, w, w_transposed):
  """float64 result and the float64 sum of |terms| (scales the error bound)."""
  spec = "mk,bnk->mbn" if w_transposed else "mk,bkn->mbn"
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  w64 = np.asarray(w.astype(jnp.float32), np.float64)
  return (np.einsum(spec, x64, w64),
          np.einsum(spec, np.abs(x64), np.abs(w64)))


def _check(out, ref, scale, k, rounded_to_bf16: bool):
  out = np.asarray(out.astype(jnp.float32), np.float64)
  # f32 accumulation: at most about k roundings of partial sums of |terms|.
  bound = 2 * k * F32_EPS * scale + 1e-30
  if rounded_to_bf16:
    bound = bound + BF16_EPS * np.abs(ref)
  err = np.abs(out - ref)
  worst = np.unravel_index(np.argmax(err - bound), err.shape)
  assert np.all(err <= bound), (
      f"max error {err.max():.3g}; at {worst}: {out[worst]} vs {ref[worst]} "
      f"(bound {bound[worst]:.3g})")


def test_kernel_available():
  assert kernels.available(), (
      "the oneDNN CPU matmul kernel did not build: "
      f"{kernels.unavailable_reason()}. The setup must run "
      "`apt-get install -y g++ libdnnl-dev`.")


def test_kernel_is_used_on_cpu_only():
  x, w = _inputs(7, 33, 5, 3, True, jnp.float32)
  fn = jax.jit(lambda x, w: kernels.matmul(x, w, w_transposed=True))
  cpu = fn.trace(x, w).lower(lowering_platforms=("cpu",)).as_text()
  assert "gemscope_onednn_matmul" in cpu
  # Other platforms get XLA's own dot and never see the custom call.
  for platform in ("cuda", "tpu"):
    text = fn.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
    assert "gemscope_onednn_matmul" not in text
    assert "dot_general" in text


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_which_kernel_takes_a_few_rows(dtype):
  """One row: the few-row kernel; 2-8 rows against one float32 weight:
  XLA's dot; otherwise oneDNN (what the decode benchmark measured)."""
  def lowered(m, bw):
    x, w = _inputs(m, 64, 32, bw, True, dtype)
    fn = jax.jit(lambda x, w: kernels.matmul(x, w, w_transposed=True))
    return fn.trace(x, w).lower(lowering_platforms=("cpu",)).as_text()
  assert "gemscope_few_rows" in lowered(1, 3)
  assert "gemscope_onednn_matmul" not in lowered(1, 3)
  assert "gemscope_onednn_matmul" in lowered(4, 3)
  few = lowered(4, 1)
  assert ("gemscope_onednn_matmul" in few) == (dtype == jnp.bfloat16)
  assert "gemscope_few_rows" not in lowered(9, 1)


@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_parity(shape, w_transposed):
  m, k, n, bw = shape
  x, w = _inputs(m, k, n, bw, w_transposed, jnp.float32)
  out = jax.jit(lambda x, w: kernels.matmul(x, w, w_transposed=w_transposed)
                )(x, w)
  assert out.shape == (m, bw, n) and out.dtype == jnp.float32
  ref, scale = _reference(x, w, w_transposed)
  _check(out, ref, scale, k, rounded_to_bf16=False)


@pytest.mark.parametrize("out_dtype", [None, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("w_transposed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_parity(shape, w_transposed, out_dtype):
  m, k, n, bw = shape
  x, w = _inputs(m, k, n, bw, w_transposed, jnp.bfloat16)
  out = jax.jit(lambda x, w: kernels.matmul(
      x, w, w_transposed=w_transposed, out_dtype=out_dtype))(x, w)
  want = jnp.bfloat16 if out_dtype is None else out_dtype
  assert out.shape == (m, bw, n) and out.dtype == want
  ref, scale = _reference(x, w, w_transposed)
  _check(out, ref, scale, k, rounded_to_bf16=want == jnp.bfloat16)


@pytest.mark.parametrize("w_transposed", [False, True])
def test_float32_inputs_bfloat16_output(w_transposed):
  x, w = _inputs(7, 33, 5, 3, w_transposed, jnp.float32)
  out = kernels.matmul(x, w, w_transposed=w_transposed,
                       out_dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  ref, scale = _reference(x, w, w_transposed)
  _check(out, ref, scale, 33, rounded_to_bf16=True)


def test_mixed_input_dtypes_promote():
  x, w = _inputs(7, 33, 5, 2, False, jnp.float32)
  out = kernels.matmul(x, w.astype(jnp.bfloat16), w_transposed=False)
  assert out.dtype == jnp.float32
  ref, scale = _reference(x, w.astype(jnp.bfloat16), False)
  _check(out, ref, scale, 33, rounded_to_bf16=False)


def test_eager_matches_jit():
  x, w = _inputs(7, 33, 5, 3, False, jnp.float32)
  eager = kernels.matmul(x, w, w_transposed=False)
  jitted = jax.jit(lambda x, w: kernels.matmul(x, w, w_transposed=False))(x, w)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("w_transposed", [False, True])
def test_vmap(w_transposed, dtype):
  batch, (m, k, n, bw) = 3, (7, 33, 5, 2)
  xs = jnp.stack([_inputs(m, k, n, bw, w_transposed, dtype, seed=s)[0]
                  for s in range(batch)])
  ws = jnp.stack([_inputs(m, k, n, bw, w_transposed, dtype, seed=s)[1]
                  for s in range(batch)])
  fn = lambda x, w: kernels.matmul(x, w, w_transposed=w_transposed,
                                   out_dtype=jnp.float32)
  # Batched activations with shared weights, and both batched.
  shared = jax.jit(jax.vmap(fn, in_axes=(0, None)))(xs, ws[0])
  both = jax.jit(jax.vmap(fn))(xs, ws)
  for i in range(batch):
    ref, scale = _reference(xs[i], ws[0], w_transposed)
    _check(shared[i], ref, scale, k, rounded_to_bf16=False)
    ref, scale = _reference(xs[i], ws[i], w_transposed)
    _check(both[i], ref, scale, k, rounded_to_bf16=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("w_transposed", [False, True])
def test_gradients_match_einsum(w_transposed, dtype):
  m, k, n, bw = 7, 33, 5, 3
  x, w = _inputs(m, k, n, bw, w_transposed, dtype)
  cot = jnp.asarray(np.random.default_rng(1).standard_normal((m, bw, n)),
                    jnp.float32)
  spec = "mk,bnk->mbn" if w_transposed else "mk,bkn->mbn"

  def loss_kernel(x, w):
    out = kernels.matmul(x, w, w_transposed=w_transposed,
                         out_dtype=jnp.float32)
    return jnp.sum(out * cot)

  def loss_einsum(x, w):
    out = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    return jnp.sum(out * cot)

  got = jax.jit(jax.grad(loss_kernel, argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(loss_einsum, argnums=(0, 1)))(x, w)
  for g, h, a in zip(got, want, (x, w)):
    assert g.dtype == a.dtype and g.shape == a.shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(g, np.float32),
                               np.asarray(h, np.float32), rtol=tol, atol=tol)


def test_empty_dimensions():
  x, w = _inputs(4, 0, 5, 2, False, jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(kernels.matmul(x, w, w_transposed=False)),
      np.zeros((4, 2, 5), np.float32))
  x, w = _inputs(0, 8, 5, 2, True, jnp.bfloat16)
  assert kernels.matmul(x, w, w_transposed=True).shape == (0, 2, 5)


def test_shape_errors():
  x, w = _inputs(7, 33, 5, 2, False, jnp.float32)
  with pytest.raises(ValueError, match="contraction"):
    kernels.matmul(x, w, w_transposed=True)
  with pytest.raises(ValueError, match="expects"):
    kernels.matmul(x, w[0], w_transposed=False)


def test_ffi_rejects_bad_calls_with_an_error():
  """Called directly with bad operands, the handler errors instead of crashing."""
  assert kernels.available()
  # The submodule's name is shadowed by the function on the package.
  from gemscope_jax.kernels.matmul import FFI_TARGET  # pylint: disable=import-outside-toplevel
  x, w = _inputs(7, 33, 5, 2, False, jnp.float32)

  def call(x, w, out_shape, out_dtype=jnp.float32):
    return jax.ffi.ffi_call(FFI_TARGET,
                            jax.ShapeDtypeStruct(out_shape, out_dtype))(
                                x, w, w_transposed=False)

  with pytest.raises(Exception, match="both be float32 or both be bfloat16"):
    jax.block_until_ready(call(x, w.astype(jnp.bfloat16), (7, 2, 5)))
  with pytest.raises(Exception, match="shape mismatch"):
    jax.block_until_ready(call(x, w, (7, 2, 6)))
  with pytest.raises(Exception, match="out must be"):
    jax.block_until_ready(call(x, w, (7, 2, 5), jnp.float16))
  # The process is still healthy.
  assert kernels.matmul(x, w, w_transposed=False).shape == (7, 2, 5)


def test_concurrent_calls_from_threads():
  # Several rows (oneDNN) and one row (the few-row kernel on XLA's pool).
  shapes = [(7, 33, 5, 3), (64, 128, 96, 4), (130, 70, 257, 1),
            (1, 640, 257, 3)]
  problems = []
  for i, (m, k, n, bw) in enumerate(shapes * 2):
    x, w = _inputs(m, k, n, bw, i % 2 == 1, jnp.float32, seed=i)
    problems.append((x, w, i % 2 == 1))
  results = [None] * len(problems)

  def run(i):
    x, w, t = problems[i]
    fn = jax.jit(lambda x, w: kernels.matmul(x, w, w_transposed=t))
    for _ in range(5):
      results[i] = np.asarray(fn(x, w))

  threads = [threading.Thread(target=run, args=(i,))
             for i in range(len(problems))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for (x, w, t), out in zip(problems, results):
    ref, scale = _reference(x, w, t)
    _check(out, ref, scale, x.shape[1], rounded_to_bf16=False)


@pytest.mark.parametrize("w_transposed", [False, True])
def test_one_row_products_side_by_side_in_one_program(w_transposed):
  """Independent one-row products in one program, which XLA may run at
  once on its thread pool (each then splitting its work over the same
  pool), equal each product run alone, bit for bit, and the float64 sum
  within its bound: parts go to whichever thread is free, but each part
  sums the same range and the parts are added in a fixed order."""
  problems = [_inputs(1, 640, 1024, 3, w_transposed, jnp.float32, seed=s)
              for s in range(6)]
  one = jax.jit(lambda x, w: kernels.matmul(x, w, w_transposed=w_transposed))
  together = jax.jit(lambda ps: [kernels.matmul(x, w, w_transposed=w_transposed)
                                 for x, w in ps])
  lowered = together.trace(problems).lower(lowering_platforms=("cpu",))
  assert lowered.as_text().count("gemscope_few_rows") == len(problems)
  for _ in range(3):
    for (x, w), out in zip(problems, together(problems)):
      np.testing.assert_array_equal(np.asarray(out), np.asarray(one(x, w)))
      ref, scale = _reference(x, w, w_transposed)
      _check(out, ref, scale, x.shape[1], rounded_to_bf16=False)


def test_impl_name_is_not_the_reference_kernel():
  # oneDNN's reference kernels ("ref:any") are orders of magnitude slower.
  for dtype in (jnp.float32, jnp.bfloat16):
    name = kernels.impl_name(1024, 640, 256, 4, w_transposed=True,
                             dtype=dtype)
    assert name and not name.startswith("ref"), name


_FALLBACK_SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from gemscope_jax import kernels
    assert not kernels.available()
    assert "GEMSCOPE_CPU_KERNELS" in kernels.unavailable_reason()
    rng = np.random.default_rng(0)
    for t in (False, True):
      for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.standard_normal((7, 33)), dtype)
        w = jnp.asarray(rng.standard_normal((3, 5, 33) if t else (3, 33, 5)),
                        dtype)
        fn = jax.jit(lambda x, w: kernels.matmul(x, w, w_transposed=t,
                                                 out_dtype=jnp.float32))
        assert "gemscope_onednn_matmul" not in fn.lower(x, w).as_text()
        spec = "mk,bnk->mbn" if t else "mk,bkn->mbn"
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        w64 = np.asarray(w.astype(jnp.float32), np.float64)
        ref = np.einsum(spec, x64, w64)
        scale = np.einsum(spec, np.abs(x64), np.abs(w64))
        err = np.abs(np.asarray(fn(x, w), np.float64) - ref)
        assert np.all(err <= 2 * 33 * 2.0**-24 * scale), err.max()
        g = jax.grad(lambda x: kernels.matmul(x, w, w_transposed=t).astype(
            jnp.float32).sum())(x)
        assert g.shape == x.shape
    print("FALLBACK OK")
""")


def test_fallback_without_kernel():
  env = dict(os.environ, GEMSCOPE_CPU_KERNELS="0", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "FALLBACK OK" in proc.stdout, proc.stderr


_BUILD_SCRIPT = textwrap.dedent("""
    import numpy as np, jax.numpy as jnp
    from gemscope_jax import kernels
    assert kernels.available(), kernels.unavailable_reason()
    x = jnp.ones((3, 4), jnp.float32)
    w = jnp.ones((2, 4, 5), jnp.float32)
    assert np.all(np.asarray(kernels.matmul(x, w, w_transposed=False)) == 4)
    print("BUILD OK")
""")


def test_parallel_first_builds_share_one_cache(tmp_path):
  """Two processes building into an empty cache at once both succeed."""
  env = dict(os.environ, GEMSCOPE_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
  env.pop("GEMSCOPE_CPU_KERNELS", None)
  procs = [subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  for proc in procs:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "BUILD OK" in out, err
  built = [p.name for p in (tmp_path / "kernels").iterdir()
           if not p.name.startswith(".")]
  assert len(built) == 1 and built[0].endswith(".so"), built


_MISSING_SCRIPT = textwrap.dedent("""
    import logging
    import numpy as np, jax.numpy as jnp
    from gemscope_jax import kernels
    assert not kernels.available()
    x = jnp.ones((3, 4), jnp.bfloat16)
    w = jnp.ones((2, 4, 5), jnp.bfloat16)
    out = kernels.matmul(x, w, w_transposed=False)
    assert out.dtype == jnp.bfloat16 and np.all(np.asarray(out) == 4)
    print("REASON", kernels.unavailable_reason())
""")


@pytest.mark.parametrize("compiler", ["missing", "no_dnnl"])
def test_missing_toolchain_warns_and_falls_back(tmp_path, compiler):
  """Without g++ or oneDNN: one warning naming the fix, and einsum results."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  if compiler == "no_dnnl":
    fake = bin_dir / "g++"
    fake.write_text("#!/bin/sh\n"
                    "echo 'onednn_matmul.cc:31:10: fatal error: dnnl.hpp: "
                    "No such file or directory' >&2\nexit 1\n")
    fake.chmod(0o755)
  env = dict(os.environ, GEMSCOPE_CACHE=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu", PATH=str(bin_dir))
  env.pop("GEMSCOPE_CPU_KERNELS", None)
  proc = subprocess.run([sys.executable, "-c", _MISSING_SCRIPT], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  want = "no C++ compiler" if compiler == "missing" else "dnnl.hpp"
  assert want in proc.stdout
  warnings = [l for l in proc.stderr.splitlines() if "oneDNN CPU matmul" in l]
  assert len(warnings) == 1 and "apt-get install" in warnings[0], proc.stderr


def test_a_changed_header_is_a_new_build(tmp_path):
  """The cache key covers the local headers a source includes: a kernel
  whose shared header changed is rebuilt, not loaded stale."""
  from gemscope_jax.kernels import _build
  src, header = tmp_path / "k.cc", tmp_path / "k.h"
  src.write_text('#include "k.h"\nint f() { return K; }\n')
  header.write_text("#define K 1\n")
  lib = _build.Library(stem="k", source=src, cxxflags=("-O1",),
                       headers=(header,))
  before = lib.path()
  header.write_text("#define K 2\n")
  assert lib.path() != before
  assert _build.Library(stem="k", source=src, cxxflags=("-O1",)).path() != (
      lib.path())
