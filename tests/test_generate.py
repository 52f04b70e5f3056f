"""Generation with the KV cache against full forward passes and transformers.

A tiny random Gemma 3 (sliding window 8, so the ring buffers wrap many times)
checks the cache's logits and recordings against `models.forward` over the
same tokens for 640 steps, the samplers against closed forms, stop tokens,
edit scopes and streaming. The real Gemma 3 270M checks greedy continuations
against transformers' `generate` token for token, including a batch of
prompts of different lengths and a prompt longer than the 512-token window.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax import errors, generate, models
from gemscope_jax.generate import _loop

TINY = models.Gemma3_270M.replace(
    num_layers=4, d_model=32, mlp_dim=64, num_heads=2, num_kv_heads=1,
    head_dim=16, vocab_size=97, sliding_window=8, global_every=2)
HPS = ("layer_1/resid_post", "layer_3/attn_out")


@pytest.fixture(scope="module")
def tiny_params():
  rng = np.random.default_rng(0)
  # Large weights so the logits are far from uniform (clear argmaxes).
  return jax.tree.map(
      lambda s: np.asarray(rng.normal(size=s.shape) * (0.3 if len(s.shape) > 1
                                                      else 0.2), np.float32),
      models.abstract_params(TINY))


def _prompts(rng, lengths):
  rows = []
  for n in lengths:
    r = rng.integers(3, TINY.vocab_size, n).astype(np.int32)
    r[0] = 2
    rows.append(r)
  return rows


def _forward_rows(params, rows, **kw):
  """A full forward per row over exactly its tokens (no padding)."""
  return [models.forward(params, r[None], config=TINY, **kw) for r in rows]


def test_cache_logits_and_recordings_equal_forward_over_640_steps(
    tiny_params):
  rows = _prompts(np.random.default_rng(1), (5, 13, 2))
  g = generate.generate(tiny_params, rows, config=TINY, max_new_tokens=640,
                        stop_tokens=(), return_logits=True, hookpoints=HPS)
  assert [len(t) for t in g.tokens] == [640] * 3 and not any(g.stopped)
  fulls = [np.concatenate([r, t]) for r, t in zip(rows, g.tokens)]
  refs = _forward_rows(tiny_params, fulls, hookpoints=HPS)
  for r, t, lg, ref in zip(rows, g.tokens, g.logits, refs):
    want = np.asarray(ref.logits[0, len(r) - 1:-1])
    assert lg.shape == want.shape == (640, TINY.vocab_size)
    np.testing.assert_allclose(lg, want, atol=2e-4, rtol=1e-4)
    # Greedy: each token is the argmax of the logits it came from.
    np.testing.assert_array_equal(t, want.argmax(-1))
  for name in HPS:
    for b, ref in enumerate(refs):
      want = np.asarray(ref.activations[name][0, :-1])
      assert g.activations[name][b].shape == want.shape
      np.testing.assert_allclose(g.activations[name][b], want, atol=2e-4,
                                 rtol=1e-4, err_msg=name)


def test_cache_holds_only_the_window_on_local_layers():
  cache = models.init_cache(TINY, 2, 1024)
  sizes = [k.shape[1] for k in cache.keys]
  assert sizes == [8, 1024, 8, 1024]  # local, global, local, global
  per_slot = 2 * 2 * TINY.num_kv_heads * TINY.head_dim * 4
  assert models.cache_bytes(TINY, 2, 1024) == per_slot * (8 + 1024) * 2
  assert models.cache_bytes(TINY, 2, 1024) == sum(
      x.nbytes for x in (*cache.keys, *cache.values))


def test_one_compilation_per_bucket(tiny_params):
  rows = _prompts(np.random.default_rng(2), (6, 9))
  generate.generate(tiny_params, rows, config=TINY, max_new_tokens=5)
  before = (_loop.prefill._cache_size(), _loop.decode._cache_size())
  # Same batch, prompt bucket (16) and cache bucket (128): no new program,
  # whatever the prompt lengths and number of new tokens.
  rows = _prompts(np.random.default_rng(3), (12, 3))
  generate.generate(tiny_params, rows, config=TINY, max_new_tokens=40)
  assert (_loop.prefill._cache_size(), _loop.decode._cache_size()) == before


def test_sampler_closed_forms():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  key = jax.random.key(0)
  top1 = generate.sample(logits, key, generate.Sampling(1.0, top_k=1))
  np.testing.assert_array_equal(top1, 0)
  counts = np.bincount(generate.sample(logits, key, generate.Sampling(1.0)),
                       minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  # Temperature 2 flattens to p ** 0.5 renormalised.
  flat = np.sqrt([0.5, 0.3, 0.15, 0.05])
  counts = np.bincount(generate.sample(logits, key, generate.Sampling(2.0)),
                       minlength=4) / 4000
  np.testing.assert_allclose(counts, flat / flat.sum(), atol=0.03)
  # Top-p 0.75: mass before token 2 is 0.8 >= 0.75, so only {0, 1} remain,
  # renormalised to 0.625 / 0.375.
  for rule in (generate.Sampling(1.0, top_p=0.75),
               generate.Sampling(1.0, top_k=3, top_p=0.75)):
    counts = np.bincount(generate.sample(logits, key, rule), minlength=4)
    assert counts[2] == counts[3] == 0
    np.testing.assert_allclose(counts[:2] / 4000, [0.625, 0.375], atol=0.03)
  counts = np.bincount(generate.sample(
      logits, key, generate.Sampling(1.0, top_k=2)), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.03)
  with pytest.raises(ValueError, match="top_p"):
    generate.Sampling(1.0, top_p=0)


def test_greedy_argmax_equals_numpys():
  rng = np.random.default_rng(4)
  for v in (262144, 1000, 513, 97, 7):
    logits = rng.normal(size=(7, v)).astype(np.float32)
    logits[1] = 0  # all tied: the first index
    logits[2, [v // 3, v - 1]] = 50  # a tie across chunks
    logits[3] = -np.inf
    logits[4, v // 2] = np.nan  # NaN counts as the largest
    logits[5, [1, v - 1]] = np.inf
    logits[6, v - 1] = 50  # the largest in the padded last chunk
    got = jax.jit(generate.sampling.argmax)(jnp.asarray(logits))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.argmax(logits, -1), err_msg=v)
    np.testing.assert_array_equal(
        generate.sample(jnp.asarray(logits), jax.random.key(0),
                        generate.GREEDY), np.argmax(logits, -1))


def test_bfloat16_cache_logits_equal_forward(tiny_params):
  # bfloat16 decodes through other kernels than a forward over many rows
  # (the unembedding of a few rows, the embedding gather behind barriers).
  rows = _prompts(np.random.default_rng(5), (5, 11))
  g = generate.generate(tiny_params, rows, config=TINY, max_new_tokens=24,
                        stop_tokens=(), return_logits=True,
                        dtype=jnp.bfloat16)
  for r, t, lg in zip(rows, g.tokens, g.logits):
    full = np.concatenate([r, t])[None]
    ref = models.forward(tiny_params, full, config=TINY, dtype=jnp.bfloat16)
    want = np.asarray(ref.logits[0, len(r) - 1:-1], np.float32)
    scale = np.abs(want).max()
    np.testing.assert_allclose(lg, want, atol=0.02 * scale)
    np.testing.assert_array_equal(t, np.asarray(lg).argmax(-1))


def test_sampling_is_reproducible_from_its_key(tiny_params):
  rows = _prompts(np.random.default_rng(4), (4, 7))
  rule = generate.Sampling(temperature=1.0, top_k=20)
  run = lambda k: generate.generate(
      tiny_params, rows, config=TINY, max_new_tokens=20, sampling=rule,
      key=jax.random.key(k), stop_tokens=()).tokens
  a, b, c = run(0), run(0), run(1)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  with pytest.raises(ValueError, match="PRNG key"):
    generate.generate(tiny_params, rows, config=TINY, sampling=rule)


def test_stop_tokens_end_each_row_on_its_own(tiny_params):
  rows = _prompts(np.random.default_rng(5), (3, 8, 5))
  free = generate.generate(tiny_params, rows, config=TINY, max_new_tokens=30,
                           stop_tokens=())
  stop = int(free.tokens[0][3])
  g = generate.generate(tiny_params, rows, config=TINY, max_new_tokens=30,
                        stop_tokens=(stop,))
  for t_free, t, s in zip(free.tokens, g.tokens, g.stopped):
    hits = np.flatnonzero(t_free == stop)
    if hits.size:  # ends on its first stop token, kept
      assert s and np.array_equal(t, t_free[:hits[0] + 1])
    else:
      assert not s and np.array_equal(t, t_free)
  assert g.stopped[0] and len(g.tokens[0]) <= 4


def _add(x, args):
  return x + args


def _add_where(x, args, ctx, *, generated):
  keep = ctx.positions >= args["prompt_length"][:, None]
  if not generated:
    keep = ~keep
  return x + jnp.where(keep[..., None], args["delta"], 0)


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_edits_act_on_the_scope_asked_for(tiny_params, scope):
  import functools
  rows = _prompts(np.random.default_rng(6), (6, 10))
  delta = np.random.default_rng(7).normal(size=TINY.d_model).astype(
      np.float32) * 2
  hp = "layer_1/resid_post"
  g = generate.generate(tiny_params, rows, config=TINY, max_new_tokens=12,
                        stop_tokens=(), return_logits=True, edits={hp: _add},
                        edit_args={hp: jnp.asarray(delta)}, edit_scope=scope)
  for r, t, lg in zip(rows, g.tokens, g.logits):
    full = np.concatenate([r, t])[None]
    if scope == "all":
      edit, args = _add, jnp.asarray(delta)
    else:
      edit = models.ContextEdit(functools.partial(
          _add_where, generated=scope == "generated"))
      args = {"prompt_length": jnp.asarray([len(r)]),
              "delta": jnp.asarray(delta)}
    ref = models.forward(tiny_params, full, config=TINY, edits={hp: edit},
                         edit_args={hp: args})
    np.testing.assert_allclose(lg, np.asarray(ref.logits[0, len(r) - 1:-1]),
                               atol=2e-4, rtol=1e-4)


def test_tokens_stream_in_order(tiny_params):
  rows = _prompts(np.random.default_rng(8), (5, 9))
  seen = []
  g = generate.generate(
      tiny_params, rows, config=TINY, max_new_tokens=15, stop_tokens=(),
      on_token=lambda i, tok, done: seen.append((int(i), np.array(tok))))
  assert [i for i, _ in seen] == list(range(15))
  np.testing.assert_array_equal(np.stack([t for _, t in seen], 1),
                                np.stack(g.tokens))


def test_bad_arguments_are_refused(tiny_params):
  rows = _prompts(np.random.default_rng(9), (4,))
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate.generate(tiny_params, rows, config=TINY, max_new_tokens=0)
  with pytest.raises(ValueError, match="edit_scope"):
    generate.generate(tiny_params, rows, config=TINY, edit_scope="both")
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
    generate.generate(tiny_params, [[2, 500]], config=TINY)
  with pytest.raises(ValueError, match="need a tokenizer"):
    generate.generate(tiny_params, "hello", config=TINY)
  with pytest.raises(ValueError, match="cache_length"):
    generate.generate(tiny_params, rows, config=TINY, max_new_tokens=40,
                      cache_length=32)


# --- the real Gemma 3 270M against transformers ------------------------------


def _hf_greedy(hf_model, rows, new):
  import torch
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
  with torch.no_grad():
    out = hf_model.generate(input_ids=torch.tensor(ids),
                            attention_mask=torch.tensor(mask), do_sample=False,
                            max_new_tokens=new, min_new_tokens=new,
                            pad_token_id=0)
  return out[:, length:].numpy()


@pytest.mark.slow
def test_real_greedy_batch_matches_transformers(real_model, hf_real_model):
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  tok = default_tokenizer()
  prompts = ["The capital of France is",
             "Once upon a time, in a small village by the sea, there lived",
             "def fibonacci(n):\n"]
  g = generate.generate(params, prompts, config=config, tokenizer=tok,
                        max_new_tokens=32, stop_tokens=())
  want = _hf_greedy(hf_real_model, g.prompt_tokens, 32)
  for i in range(3):
    np.testing.assert_array_equal(g.tokens[i], want[i], err_msg=prompts[i])
  assert g.text[0].startswith(" the capital of")


@pytest.mark.slow
def test_real_prompt_longer_than_the_window(real_model, hf_real_model):
  """A 560-token prompt: the local layers' ring buffers have wrapped. The
  continuation equals transformers' token for token, and every step's
  logits and a recorded hookpoint equal one forward over the sequence."""
  from gemscope_jax.text import corpora
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  tok = default_tokenizer()
  text = corpora.read_text(corpora.shakespeare_files()[3:4])[4000:9000]
  row = np.asarray(tok.encode(text)[:560], np.int32)
  hp = "layer_5/resid_post"  # a global layer, after local ones
  g = generate.generate(params, [row], config=config, max_new_tokens=48,
                        stop_tokens=(), return_logits=True, hookpoints=[hp])
  np.testing.assert_array_equal(g.tokens[0], _hf_greedy(hf_real_model,
                                                         [row], 48)[0])
  full = np.concatenate([row, g.tokens[0]])[None]
  ref = models.forward(params, full, config=config, hookpoints=[hp])
  want = np.asarray(ref.logits[0, len(row) - 1:-1])
  scale = np.abs(want).max()
  np.testing.assert_allclose(g.logits[0], want, atol=2e-4 * scale, rtol=0)
  acts = np.asarray(ref.activations[hp][0, :-1])
  np.testing.assert_allclose(g.activations[hp][0], acts,
                             atol=2e-4 * np.abs(acts).max(), rtol=0)


@pytest.mark.slow
def test_cli_streams_and_writes_what_the_library_generates(
    real_model, tmp_path, capsys):
  """`gemscope generate` with a steering vector: the streamed text and the
  JSONL equal `generate` with the same `AddDirection` edit."""
  import json
  from gemscope_jax import cli, surgery
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  tok = default_tokenizer()
  direction = np.asarray(
      params["embedder"]["input_embedding"][tok.encode(" Paris",
                                                       add_bos=False)[0]])
  np.save(tmp_path / "paris.npy", direction)
  hp, coef = "layer_6/resid_post", 60.0
  argv = ["generate", "--prompt", "My favourite city is",
          "--max-new-tokens", "12", "--steer",
          f"{hp}:{tmp_path / 'paris.npy'}*{coef:g}@generated",
          f"--out={tmp_path / 'g.jsonl'}"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  edits, args = surgery.steering_edits(
      [surgery.AddDirection(hp, direction, coef, "generated")], config)
  want = generate.generate(params, "My favourite city is", config=config,
                           tokenizer=tok, max_new_tokens=12, edits=edits,
                           edit_args=args)
  clean = generate.generate(params, "My favourite city is", config=config,
                            tokenizer=tok, max_new_tokens=12)
  row = json.loads((tmp_path / "g.jsonl").read_text())
  assert row["tokens"] == [int(t) for t in want.tokens[0]]
  assert printed == "My favourite city is" + want.text[0] + "\n"
  assert want.text[0] != clean.text[0]  # the steering did something
  # A second run refuses to replace the JSONL without --overwrite.
  assert cli.main(argv) == errors.OUTPUT
  # --chat: the prompt is the one-turn conversation in the chat format,
  # the system prompt folded in, ending in the model's generation prompt.
  from gemscope_jax.text import chat
  assert cli.main(["generate", "--prompt", "Name a city.", "--chat",
                   "--system", "Be brief.", "--max-new-tokens", "3",
                   "--quiet", f"--out={tmp_path / 'c.jsonl'}"]) == 0
  row = json.loads((tmp_path / "c.jsonl").read_text())
  want_ids, _ = chat.encode_chat(tok, [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Name a city."}], add_generation_prompt=True)
  assert row["prompt_tokens"] == [int(t) for t in want_ids]
  assert row["prompt_text"].endswith("<start_of_turn>model\n")
