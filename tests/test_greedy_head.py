"""The int8-screened greedy token against the full logits' argmax.

`greedy_head.greedy_tokens` must give `sampling.argmax` of the full logits
(rounded to the table's dtype) whatever the inputs: on the real Gemma 3
270M's final-norm outputs over real text (where it computes only a few
dozen of 262,144 logits), on exact ties (first index), on ties that only
bfloat16 rounding makes, on NaN and zero rows (the fallback), and on
tables built so that the screen's bound is tight. The bound itself is
checked in float64. Generation with the screen equals generation without
it (full logits kept) on the real model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax import generate, models
from gemscope_jax.generate import _loop, sampling
from gemscope_jax.kernels import greedy_head


def _tokens(h, table, **kw):
  scr = jax.jit(greedy_head.screen)(table)
  fn = jax.jit(lambda h, t, s: greedy_head.greedy_tokens(h, t, s, **kw))
  tok, cand = fn(h, table, scr)
  return np.asarray(tok), np.asarray(cand)


def _argmax(h, table):
  """The full logits' argmax as decoding takes it, in numpy: float64 sums
  rounded to the table's dtype (first index on ties, NaN as +inf)."""
  t = np.asarray(table.astype(jnp.float32), np.float64)
  logits = np.asarray(h, np.float64) @ t.T
  logits = np.asarray(jnp.asarray(logits, jnp.float32).astype(table.dtype)
                      .astype(jnp.float32))
  return np.asarray(sampling.argmax(jnp.asarray(logits)))


def test_kernel_available():
  assert greedy_head.available(), greedy_head.unavailable_reason()


@pytest.fixture(scope="module")
def real_rows(real_model, real_text_tokens):
  """Final-norm outputs of the real 270M at every real token (float32)."""
  config, params = real_model
  tokens, mask = real_text_tokens
  model = models.Gemma3(config, jnp.float32)
  x = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                  unembed=False)
  h = model.apply({"params": params}, x, method=lambda m, x: m.final_norm(x))
  return np.asarray(h)[np.asarray(mask)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_real_rows_give_the_full_argmax(real_model, real_rows, dtype):
  _, params = real_model
  table = params["embedder"]["input_embedding"].astype(dtype)
  h = jnp.asarray(real_rows).astype(dtype).astype(jnp.float32)
  want = np.asarray(jax.jit(greedy_head.reference)(h, table))
  for start in range(0, len(h), 8):  # decoding's batches: up to 8 rows
    got, cand = _tokens(h[start:start + 8], table)
    np.testing.assert_array_equal(got, want[start:start + 8])
    # The screen leaves few tokens to compute exactly (measured: a median
    # of 13-14 and at most a few hundred of 262,144).
    assert np.all(cand < 5000), cand
  assert np.median(_tokens(h[:64], table)[1]) < 100


def test_real_rows_agree_with_a_float64_argmax(real_model, real_rows):
  _, params = real_model
  table = params["embedder"]["input_embedding"]
  got, _ = _tokens(jnp.asarray(real_rows[:48]), table)
  np.testing.assert_array_equal(got, _argmax(real_rows[:48], table))


def test_the_bound_holds_in_float64():
  rng = np.random.default_rng(0)
  # Rows of very different scales and an outlier element each: loose and
  # tight int8 roundings.
  table = rng.normal(size=(4096, 96)) * rng.uniform(0.01, 3, (4096, 1))
  table[np.arange(4096), rng.integers(0, 96, 4096)] *= 20
  table = jnp.asarray(table, jnp.float32)
  scr = greedy_head.screen(table)
  q = np.asarray(greedy_head.unpack(scr.packed, table.shape), np.float64)
  scale = np.asarray(scr.scale, np.float64)
  t64 = np.asarray(table, np.float64)
  for h in rng.normal(size=(16, 96)) * rng.uniform(0.1, 100, (16, 1)):
    exact = t64 @ h
    screened = scale * (q @ h)
    bound = np.linalg.norm(h) * np.asarray(scr.radius, np.float64)
    assert np.all(np.abs(exact - screened) <= bound)
    # ... and it is not vacuous: within 3x of the worst error.
    assert np.max(np.abs(exact - screened) / bound) > 1 / 3 / np.sqrt(96)


@pytest.mark.parametrize("shape", [(4096, 96), (3000, 37), (70, 5), (1, 1)])
def test_the_packed_screen_holds_every_int8_row(shape):
  """The kernel's tiled layout keeps q = round(row / scale) (checked in
  numpy), and padding rows and dimensions past the table are zero."""
  rng = np.random.default_rng(5)
  table = rng.normal(size=shape).astype(np.float32)
  scr = greedy_head.screen(jnp.asarray(table))
  scale = np.abs(table).max(axis=1) / 127
  q = np.clip(np.round(table / np.where(scale > 0, scale, 1)[:, None]),
              -127, 127)
  np.testing.assert_array_equal(
      np.asarray(greedy_head.unpack(scr.packed, shape), np.int64), q)
  v, d = shape
  packed = np.asarray(scr.packed)
  assert packed.shape == (-(-v // 64), -(-d // 4), 256)
  full = np.asarray(greedy_head.unpack(
      scr.packed, (packed.shape[0] * 64, packed.shape[1] * 4)))
  assert not full[v:].any() and not full[:, d:].any()
  # Row 64 t + 16 k + r, dimension 4 g + j sits at [t, g, 64 k + 4 r + j].
  t, k, r, g, j = 0, min(3, (v - 1) // 16), 0, 0, 0
  row = 16 * k + r
  if row < v:
    assert int(packed[t, g, 64 * k + 4 * r + j]) - 128 == q[row, 4 * g + j]


def test_odd_shapes_give_the_full_argmax():
  """Rows and dimensions that fill no whole tile or group (padding)."""
  rng = np.random.default_rng(6)
  for v, d in ((70, 5), (129, 37), (1, 3), (5000, 61)):
    table = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(3, d)) * 4, jnp.float32)
    got, cand = _tokens(h, table)
    np.testing.assert_array_equal(got, _argmax(h, table))
    assert np.all(cand >= 1)


def test_exact_ties_take_the_first_index():
  rng = np.random.default_rng(1)
  table = rng.normal(size=(3000, 64)).astype(np.float32)
  table[2500] = table[700] = table[1900] = rng.normal(size=64) * 3
  h = table[700][None] * 2
  got, cand = _tokens(jnp.asarray(h), jnp.asarray(table))
  assert got[0] == 700 and cand[0] < 3000


def test_bfloat16_rounding_ties_take_the_first_index():
  """Two rows whose float32 logits differ below a bfloat16 step: rounded,
  they tie, and the first wins even though the later one is larger."""
  rng = np.random.default_rng(2)
  d = 64
  table = (rng.normal(size=(2048, d)) * 0.05).astype(np.float32)
  h = np.zeros(d, np.float32)
  h[:2] = 1.0
  table[100, :2] = [40.0, 0.0]      # logit 40
  table[1500, :2] = [40.0, 0.125]   # logit 40.125: same bfloat16 (step 0.25)
  table = jnp.asarray(table, jnp.bfloat16)
  logits = np.asarray(table.astype(jnp.float32)) @ h
  assert logits[1500] > logits[100]
  got, _ = _tokens(jnp.asarray(h[None]), table)
  assert got[0] == 100 == _argmax(h[None], table)[0]
  # In float32 the larger one wins.
  got32, _ = _tokens(jnp.asarray(h[None]), table.astype(jnp.float32))
  assert got32[0] == 1500


def test_rows_the_screen_cannot_narrow_fall_back_to_every_logit():
  rng = np.random.default_rng(3)
  table = jnp.asarray(rng.normal(size=(3000, 32)), jnp.float32)
  h = np.stack([np.zeros(32), np.full(32, np.nan), rng.normal(size=32)])
  h[1, 5] = 0.0
  got, cand = _tokens(jnp.asarray(h, jnp.float32), table)
  # Zero logits everywhere: index 0. NaN logits count as +inf: index 0.
  assert got[0] == 0 and got[1] == 0
  assert cand[0] == cand[1] == 3000
  assert got[2] == _argmax(h[2:], table)[0]
  # A cap below the candidates left also falls back, with the same answer.
  capped, cand_capped = _tokens(jnp.asarray(h[2:], jnp.float32), table,
                                max_candidates=1)
  assert capped[0] == got[2] and (cand_capped[0] == 3000 or cand[2] == 1)


def test_shapes_are_checked():
  table = jnp.zeros((10, 8), jnp.float32)
  scr = greedy_head.screen(table)
  with pytest.raises(ValueError, match="h \\(2, 7\\)"):
    greedy_head.greedy_tokens(jnp.zeros((2, 7)), table, scr)
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    greedy_head.greedy_tokens(jnp.zeros((2, 8)), table.astype(jnp.float16),
                              greedy_head.screen(table.astype(jnp.float16)))


def test_the_screen_is_built_once_per_table():
  table = jnp.asarray(np.random.default_rng(4).normal(size=(500, 16)),
                      jnp.float32)
  a = greedy_head.cached_screen(table, jnp.float32)
  assert greedy_head.cached_screen(table, jnp.float32) is a
  assert greedy_head.cached_screen(table, jnp.bfloat16) is not a
  key = id(table)
  del table
  assert key not in greedy_head._SCREENS  # pylint: disable=protected-access


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_generation_with_the_screen_equals_generation_without(real_model,
                                                              dtype):
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  prompts = ["The capital of France is", "In the beginning God created",
             "import numpy as np\n"]
  kw = dict(config=config, tokenizer=default_tokenizer(), max_new_tokens=24,
            stop_tokens=(), dtype=dtype)
  batches = [prompts[:1], prompts[1:2], prompts[2:]]
  if dtype == jnp.float32:  # float32 screens batches up to 8, bf16 just 1
    batches.append(prompts)
  for batch in batches:
    assert _loop.screens_greedy(
        sampling.GREEDY, False, None, len(batch), dtype)
    screened = generate.generate(params, batch, **kw)
    full = generate.generate(params, batch, return_logits=True, **kw)
    for row, (a, b) in enumerate(zip(screened.tokens, full.tokens)):
      if dtype == jnp.float32:
        np.testing.assert_array_equal(a, b)
        continue
      # bfloat16 logits tie often (8 bits: steps of 1/16 near 14), and
      # which of two tokens rounds up can depend on the order of the f32
      # sums (the screen's own dot against oneDNN's): the sequences may
      # part only where the full logits of the two tokens are one bfloat16
      # step apart or tie.
      parted = np.flatnonzero(a != b)
      if parted.size:
        i = parted[0]
        logits = np.asarray(full.logits[row][i], np.float64)
        step = 2.0 ** (np.floor(np.log2(abs(logits[b[i]]))) - 7)
        assert logits[b[i]] == logits.max()
        assert logits[b[i]] - logits[a[i]] <= step, (row, i, a[i], b[i])
