"""The decode attention kernel (kernels/decode_attention.cc): one token
written into a layer's KV cache and attended over, against a float64
computation of the same formula and against the model's XLA path.

The generation tests (test_generate.py: greedy continuations token for
token against transformers, per-step logits against a full forward over
600+ positions) run through this kernel on the CPU as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax.kernels import decode_attention

MASK = -2.3819763e38

# (B, S, K, G, H): Gemma 3 270M's layer at batch 1; odd sizes with several
# rows and KV heads; a one-slot cache.
SHAPES = [(1, 256, 1, 4, 256), (3, 37, 2, 3, 70), (2, 1, 1, 2, 16)]


def _bf16(x):
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)
                    .astype(jnp.float32), np.float64)


def _problem(b, s, k, g, h, dtype, seed=0):
  r = np.random.default_rng(seed)
  def make(*shape, scale=1.0):
    return jnp.asarray(r.normal(size=shape) * scale, dtype)
  q = make(b, k, g, h, scale=h ** -0.5)  # spread softmaxes, not one-hot
  slot = int(r.integers(s))
  allowed = r.random((b, s)) < 0.6
  allowed[:, slot] = True
  return (q, make(b, k, h), make(b, k, h), make(b, s, k, h),
          make(b, s, k, h), jnp.int32(slot), jnp.asarray(allowed))


def _float64(q, k_new, v_new, k_buf, v_buf, slot, allowed, dtype):
  """The formula in float64, rounding where the model rounds (the
  probabilities and the output to the dtype)."""
  f = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  k_buf, v_buf = f(k_buf).copy(), f(v_buf).copy()
  k_buf[:, int(slot)] = f(k_new)
  v_buf[:, int(slot)] = f(v_new)
  logits = np.einsum("bkgh,bskh->bkgs", f(q), k_buf)
  logits = np.where(np.asarray(allowed)[:, None, None], logits, MASK)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  if dtype == jnp.bfloat16:
    p = _bf16(p)
  out = np.einsum("bkgs,bskh->bkgh", p, v_buf)
  return out, k_buf, v_buf


def _attend(*args, use_kernel=True):
  return jax.jit(lambda *a: decode_attention.attend(
      *a, mask_value=MASK, use_kernel=use_kernel))(*args)


def test_kernel_available():
  assert decode_attention.available(), (
      "the decode attention kernel did not build: "
      f"{decode_attention.unavailable_reason()}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64(shape, dtype):
  args = _problem(*shape, dtype)
  out, k_buf, v_buf = _attend(*args)
  want, want_k, want_v = _float64(*args, dtype)
  assert out.dtype == dtype and out.shape == args[0].shape
  # The cache: the input with exactly the new slot replaced.
  np.testing.assert_array_equal(np.asarray(k_buf, np.float64), want_k)
  np.testing.assert_array_equal(np.asarray(v_buf, np.float64), want_v)
  got = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  # f32 sums of at most max(S, H) terms of |p v| <= |v|, then the output
  # rounding; in bfloat16 a probability may round the other way too.
  scale = np.abs(want_v).max()
  if dtype == jnp.float32:
    tol = 1e-5 * scale
  else:
    tol = 2 * 2.0 ** -8 * (np.abs(want) + scale * 2.0 ** -8 * shape[1])
  np.testing.assert_array_less(np.abs(got - want), tol + 1e-30)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_the_xla_path(dtype):
  args = _problem(*SHAPES[0], dtype, seed=3)
  got = _attend(*args)
  want = _attend(*args, use_kernel=False)
  for a, b in zip(got[1:], want[1:]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  a = np.asarray(jnp.asarray(got[0], jnp.float32))
  b = np.asarray(jnp.asarray(want[0], jnp.float32))
  step = 1e-5 if dtype == jnp.float32 else 2.0 ** -6
  np.testing.assert_allclose(a, b, rtol=step, atol=step)


def test_only_allowed_slots_count():
  """A slot that is not allowed contributes nothing, however large its
  key; a row that may see only the new slot returns that slot's value."""
  q, k_new, v_new, k_buf, v_buf, slot, allowed = _problem(
      2, 9, 1, 2, 32, jnp.float32, seed=5)
  only_new = np.zeros((2, 9), bool)
  only_new[:, int(slot)] = True
  k_huge = k_buf * 1e6
  out, _, _ = _attend(q, k_new, v_new, k_huge, v_buf, slot,
                      jnp.asarray(only_new))
  np.testing.assert_allclose(
      np.asarray(out), np.broadcast_to(np.asarray(v_new)[:, :, None],
                                       out.shape), rtol=1e-6)


def test_the_cache_is_written_in_place_when_donated():
  args = _problem(*SHAPES[0], jnp.float32, seed=1)
  before = [args[i].unsafe_buffer_pointer() for i in (3, 4)]
  fn = jax.jit(lambda *a: decode_attention.attend(*a, mask_value=MASK),
               donate_argnums=(3, 4))
  _, k_buf, v_buf = fn(*args)
  assert [k_buf.unsafe_buffer_pointer(),
          v_buf.unsafe_buffer_pointer()] == before


def test_an_undonated_cache_is_left_as_it_was():
  args = _problem(*SHAPES[1], jnp.float32, seed=2)
  k_copy, v_copy = np.asarray(args[3]).copy(), np.asarray(args[4]).copy()
  _, k_buf, _ = _attend(*args)
  np.testing.assert_array_equal(np.asarray(args[3]), k_copy)
  np.testing.assert_array_equal(np.asarray(args[4]), v_copy)
  assert not np.array_equal(np.asarray(k_buf), k_copy)


def test_kernel_on_cpu_only():
  args = _problem(*SHAPES[1], jnp.float32)
  fn = jax.jit(lambda *a: decode_attention.attend(*a, mask_value=MASK))
  assert "gemscope_decode_attention" in fn.trace(*args).lower(
      lowering_platforms=("cpu",)).as_text()
  for platform in ("cuda", "tpu"):
    assert "gemscope_decode_attention" not in fn.trace(*args).lower(
        lowering_platforms=(platform,)).as_text()
  # Mixed dtypes take the XLA path everywhere.
  mixed = (args[0].astype(jnp.bfloat16),) + args[1:]
  assert "gemscope_decode_attention" not in fn.trace(*mixed).lower(
      lowering_platforms=("cpu",)).as_text()


def test_shapes_are_checked():
  q, k_new, v_new, k_buf, v_buf, slot, allowed = _problem(*SHAPES[1],
                                                          jnp.float32)
  with pytest.raises(ValueError, match=r"allowed \(3, 36\)"):
    decode_attention.attend(q, k_new, v_new, k_buf, v_buf, slot,
                            allowed[:, 1:], mask_value=MASK)
  with pytest.raises(ValueError, match=r"k_new \(3, 2, 69\)"):
    decode_attention.attend(q, k_new[..., 1:], v_new, k_buf, v_buf, slot,
                            allowed, mask_value=MASK)
