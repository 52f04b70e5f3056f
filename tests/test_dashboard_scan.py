"""dashboards.scan / lens / records against brute force in numpy.

A tiny random Gemma (2 layers, width 32, the real 262k vocabulary so the
real tokenizer reads the windows) over Shakespeare windows of 24 tokens,
some positions excluded as a chat template's would be. The dictionary is a
random JumpReLU whose thresholds make most latents fire on 5-20% of the
tokens, plus a latent equal to 1 on every token (all ties: the tie rule), a
dead one and a rare one (fewer firings than top-k slots). numpy recomputes
the latents in float64 from activations of one separate forward pass, and
every statistic from them: top-k (with the tie rule), count, mean, max,
histograms with the scan's edges, the quantile samples (from an
independent numpy copy of the sampling hash), contexts, the logit lens and
the neighbour tables. Resuming is checked after an exception and after a
simulated kill (the state file rolled back to an earlier save).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from gemscope_jax import errors, interop, models, parallel, text
from gemscope_jax.dashboards import _dictionary as dl
from gemscope_jax.dashboards import records as rec
from gemscope_jax.dashboards import scan as scan_mod
from gemscope_jax.text.tokenizer import default_tokenizer
from gemscope_jax.text.windows import Windows, ordinary_mask, windows_from_ids

TINY = models.Gemma3Config(
    name="tiny_dash", num_layers=2, d_model=32, mlp_dim=64, num_heads=2,
    num_kv_heads=1, head_dim=16, sliding_window=8)
HP = "layer_1/resid_post"
WIDTH = 48
TIE, DEAD, RARE = 0, 1, 2
SETTINGS = dict(k=6, quantile_bins=4, per_bin=3, hist_bins=8, before=5,
                after=3, batch_size=4, seed=7, progress=False)


@pytest.fixture(scope="module")
def tok():
  return default_tokenizer()


def build(tok, scan: bool = True) -> dict:
  """The tiny model, windows, dictionary, numpy latents and a scan."""
  rng = np.random.default_rng(0)
  # NumPy draws in abstract_params' shapes (init_params is slow).
  params = jax.tree.map(
      lambda s: (rng.normal(0, 0.1, s.shape) * (len(s.shape) > 1) + 0.05
                 * (len(s.shape) == 1)).astype(s.dtype),
      models.abstract_params(TINY))
  ids = tok.encode(text.read_text(text.shakespeare_files()[:1])[5000:8000])
  w = windows_from_ids(np.asarray(ids), 24, tok.bos_id, max_tokens=240)
  exclude = np.zeros_like(w.mask)
  exclude[2, 3:6] = True                  # a chat template's tokens, say
  windows = Windows(w.tokens, w.mask, exclude)
  acts = models.forward(params, windows.tokens, windows.mask, config=TINY,
                        hookpoints=(HP,), logits=False).activations[HP]
  x = np.asarray(acts, np.float64)                          # (N, T, d)
  keep = ordinary_mask(tok, windows.tokens, windows.mask, exclude)
  w_enc = rng.normal(size=(32, WIDTH)) / np.sqrt(32)
  b_enc = np.zeros(WIDTH)
  w_enc[:, TIE], b_enc[TIE] = 0.0, 1.0
  pre = x[keep] @ w_enc + b_enc
  rate = rng.uniform(0.05, 0.2, WIDTH)
  threshold = np.array([np.quantile(pre[:, j], 1 - rate[j])
                        for j in range(WIDTH)])
  threshold[TIE], threshold[DEAD] = 0.5, 1e9
  threshold[RARE] = np.sort(pre[:, RARE])[-3] - 1e-3     # fires 3 times
  d = interop.InferenceDictionary(
      w_enc=w_enc, w_dec=rng.normal(size=(WIDTH, 32)), b_enc=b_enc,
      b_dec=np.zeros(32), threshold=threshold, hookpoint=HP)
  pre = x @ d.w_enc.astype(np.float64) + d.b_enc
  f = np.where((pre > d.threshold) & keep[..., None], pre, 0.0)
  result = (scan_mod.scan(TINY, params, d, windows, tok, **SETTINGS)
            if scan else None)
  return dict(params=params, windows=windows, d=d, f=f, keep=keep,
              result=result)


@pytest.fixture(scope="module")
def env(tok):
  return build(tok)


def _flat(f):
  return f.reshape(-1, f.shape[-1])                    # (N * T, width)


def np_priority(index, latent, seed):
  """The sampling hash, independently in numpy uint32 arithmetic."""
  def mix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))
  with np.errstate(over="ignore"):
    s = np.uint32(seed)
    a = mix(index.astype(np.uint32) * np.uint32(0x9E3779B1) ^ s)
    b = mix(latent.astype(np.uint32) * np.uint32(0x85EBCA77)
            + (s ^ np.uint32(0x27D4EB2F)))
    h = mix(a[:, None] ^ b[None, :])
  return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def test_counts_mean_max_density(env):
  r, f = env["result"], _flat(env["f"])
  fired = f > 0
  assert r.num_tokens == int(env["keep"].sum())
  np.testing.assert_array_equal(r.count, fired.sum(0))
  np.testing.assert_allclose(r.max, f.max(0), rtol=1e-5)
  np.testing.assert_allclose(r.mean, f.sum(0) / np.maximum(fired.sum(0), 1),
                             rtol=1e-5)
  np.testing.assert_allclose(r.density, fired.mean(0) * f.shape[0]
                             / r.num_tokens, rtol=1e-12)
  live = ~r.dead
  assert r.dead[DEAD] and live.sum() == WIDTH - 1
  rates = r.density[3:]
  assert 0.04 < np.median(rates) < 0.25, rates
  assert r.count[TIE] == r.num_tokens and r.count[RARE] == 3


def test_top_k_equal_brute_force_with_the_tie_rule(env):
  r, f = env["result"], _flat(env["f"])
  index = np.arange(f.shape[0])
  for j in range(WIDTH):
    fired = np.flatnonzero(f[:, j] > 0)
    order = fired[np.lexsort((index[fired], -f[fired, j]))][:r.k]
    want = np.full(r.k, -1)
    want[:len(order)] = order
    np.testing.assert_array_equal(r.top_index[j], want, err_msg=f"latent {j}")
    np.testing.assert_allclose(r.top_values[j][:len(order)], f[order, j],
                               rtol=1e-5)
    assert np.all(r.top_values[j][len(order):] == 0)
  # Every ordinary token ties at 1.0: the smallest flat indices win.
  np.testing.assert_array_equal(r.top_index[TIE],
                                np.flatnonzero(env["keep"].reshape(-1))[:r.k])
  assert np.all(r.top_index[DEAD] == -1)


def test_contexts_are_the_latent_around_each_example(env):
  r, f = env["result"], env["f"]
  t_len = f.shape[1]
  for j in range(WIDTH):
    for slot, idx in enumerate(r.top_index[j]):
      if idx < 0:
        continue
      w, p = r.locate(idx)
      pos = p + np.arange(-r.before, r.after + 1)
      ok = (pos >= 0) & (pos < t_len)
      want = np.where(ok, f[w, np.clip(pos, 0, t_len - 1), j], 0.0)
      np.testing.assert_allclose(r.top_context[j, slot], want, rtol=1e-5,
                                 atol=1e-6)


def test_histograms_equal_numpy_with_the_same_edges(env):
  r, f = env["result"], _flat(env["f"])
  for j in np.flatnonzero(~r.dead):
    edges = r.hist_edges[j]
    # float32 like the scan's; a latent's largest value is its max (float64
    # rounding can put it an ulp above the top edge).
    v = np.minimum(f[f[:, j] > 0, j].astype(np.float32), edges[-1])
    assert edges[0] == 0 and edges[-1] == np.float32(r.max[j])
    np.testing.assert_allclose(edges[1], r.max[j] * 1e-3, rtol=1e-6)
    assert np.all(np.diff(edges) > 0)
    np.testing.assert_array_equal(r.hist_counts[j],
                                  np.histogram(v, edges)[0])
    assert r.hist_counts[j].sum() == r.count[j]
    np.testing.assert_array_equal(
        r.quantile_counts[j], np.histogram(v, r.quantile_edges[j])[0])
  assert r.hist_counts[TIE][-1] == r.count[TIE]
  assert not r.hist_counts[DEAD].any() and not r.quantile_counts[DEAD].any()


def test_quantile_samples_are_the_hash_sample_of_their_bin(env):
  r, f = env["result"], _flat(env["f"])
  index = np.arange(f.shape[0])
  prio = np_priority(index, np.arange(WIDTH), SETTINGS["seed"])
  for j in np.flatnonzero(~r.dead):
    edges = r.quantile_edges[j]
    col = f[:, j]
    q = np.clip(np.searchsorted(edges, col, side="right") - 1, 0,
                r.quantile_bins - 1)
    for b in range(r.quantile_bins):
      members = np.flatnonzero((col > 0) & (q == b))
      want = members[np.lexsort((members, -prio[members, j]))][:r.per_bin]
      got = r.quantile_index[j, b]
      np.testing.assert_array_equal(got[:len(want)], want,
                                    err_msg=f"latent {j} bin {b}")
      assert np.all(got[len(want):] == -1)
      taken = got[got >= 0]
      v = r.quantile_values[j, b][:len(taken)]
      np.testing.assert_allclose(v, col[taken], rtol=1e-5)
      assert np.all(v > 0) and np.all(v >= edges[b])
      assert np.all(v < edges[b + 1]) or b == r.quantile_bins - 1
      assert np.all(v <= edges[-1])


def test_logit_lens_and_neighbours_equal_numpy(env):
  r, d, params = env["result"], env["d"], env["params"]
  table = np.asarray(params["embedder"]["input_embedding"], np.float64)
  scale = np.asarray(params["final_norm"]["scale"], np.float64)
  logits = (d.w_dec * (1 + scale)) @ table.T
  top = np.argsort(-logits, axis=1, kind="stable")[:, :10]
  bottom = np.argsort(logits, axis=1, kind="stable")[:, :10]
  np.testing.assert_array_equal(r.lens.top_ids, top)
  np.testing.assert_array_equal(r.lens.bottom_ids, bottom)
  np.testing.assert_allclose(r.lens.top_values,
                             np.take_along_axis(logits, top, 1), rtol=1e-4)
  np.testing.assert_allclose(r.lens.bottom_values,
                             np.take_along_axis(logits, bottom, 1),
                             rtol=1e-4)
  unit = d.w_dec / np.linalg.norm(d.w_dec, axis=1, keepdims=True)
  cos = unit @ unit.T
  np.fill_diagonal(cos, -np.inf)
  near = np.argsort(-cos, axis=1, kind="stable")[:, :10]
  ids, values = r.neighbours
  np.testing.assert_array_equal(ids, near)
  np.testing.assert_allclose(values, np.take_along_axis(cos, near, 1),
                             atol=1e-6)
  assert r.input_neighbours is None         # an SAE
  # Blockwise, in blocks that do not divide the width.
  ids7, values7 = scan_mod.lens_lib.neighbours(d.w_dec, n=10, block=7)
  np.testing.assert_array_equal(ids7, ids)


def _equal(a, b):
  for field in ("count", "total", "max", "top_values", "top_index",
                "top_context", "hist_edges", "hist_counts",
                "quantile_counts", "quantile_values", "quantile_index",
                "quantile_context"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field),
                                  err_msg=field)


class _Stop(Exception):
  pass


def test_resume_after_an_exception_and_after_a_kill(env, tok, tmp_path):
  kw = dict(SETTINGS, lens=False)
  args = (TINY, env["params"], env["d"], env["windows"], tok)
  state = tmp_path / "state"
  file = state / scan_mod.STATE_FILE
  seen = []

  def stop_in_pass_1(number, next_window):
    seen.append((number, next_window))
    if (number, next_window) == (1, 4):
      raise _Stop

  with pytest.raises(_Stop):
    scan_mod.scan(*args, state_dir=state, on_chunk=stop_in_pass_1, **kw)
  assert file.is_file()
  calls = []
  resumed = scan_mod.scan(*args, state_dir=state,
                          on_chunk=lambda *a: calls.append(a), **kw)
  assert calls[0] == (1, 8)                 # continued after window 4
  _equal(resumed, env["result"])

  # A kill: saves after every chunk; roll the file back to pass 2's first
  # save, as if the process died before it saved again.
  shutil.rmtree(state)
  snapshot = tmp_path / "snapshot.npz"

  def kill_in_pass_2(number, next_window):
    if (number, next_window) == (2, 4):
      shutil.copy(file, snapshot)
    if (number, next_window) == (2, 10):
      raise _Stop

  with pytest.raises(_Stop):
    scan_mod.scan(*args, state_dir=state, save_every_s=0.0,
                  on_chunk=kill_in_pass_2, **kw)
  shutil.copy(snapshot, file)
  calls.clear()
  resumed = scan_mod.scan(*args, state_dir=state,
                          on_chunk=lambda *a: calls.append(a), **kw)
  assert calls[0] == (2, 8)
  _equal(resumed, env["result"])
  # Finished: a rerun returns the result without scanning.
  calls.clear()
  _equal(scan_mod.scan(*args, state_dir=state,
                       on_chunk=lambda *a: calls.append(a), **kw),
         env["result"])
  assert not calls
  # Another scan in the same folder is refused.
  with pytest.raises(errors.UsageError, match="top_k"):
    scan_mod.scan(*args, state_dir=state, **dict(kw, k=5))


def _counting_steps(monkeypatch) -> dict:
  """Counts pass 2's chunks encoded from Gemma and from the activation
  file, by wrapping the compiled steps."""
  calls = {"gemma": 0, "file": 0}
  steps = scan_mod._steps  # pylint: disable=protected-access

  def counted(st):
    pass1, pass2, pass2_cached = steps(st)

    def gemma(*a):
      calls["gemma"] += 1
      return pass2(*a)

    def file(*a):
      calls["file"] += 1
      return pass2_cached(*a)
    return pass1, gemma, file

  monkeypatch.setattr(scan_mod, "_steps", counted)
  return calls


def test_activation_file_equals_rerunning_gemma(env, tok, tmp_path,
                                                monkeypatch):
  """Pass 2 reads pass 1's activations back from a file (a temporary one
  without state_dir, ACTS_FILE in it with one) and gets the result of
  running Gemma again, bit for bit; the file goes once the scan is done."""
  kw = dict(SETTINGS, lens=False)
  args = (TINY, env["params"], env["d"], env["windows"], tok)
  calls = _counting_steps(monkeypatch)
  gemma = scan_mod.scan(*args, cache_bytes=0, **kw)
  assert calls == {"gemma": 3, "file": 0}      # 10 windows in chunks of 4
  _equal(gemma, env["result"])                # env's scan used the file
  calls.update(gemma=0, file=0)
  state = tmp_path / "state"
  acts = state / scan_mod.ACTS_FILE
  window_bytes = 24 * 1 * TINY.d_model * 4
  sizes = []

  def on_chunk(number, next_window):
    sizes.append((number, next_window, acts.stat().st_size))

  _equal(scan_mod.scan(*args, state_dir=state, on_chunk=on_chunk, **kw),
         gemma)
  assert calls == {"gemma": 0, "file": 3}
  # Pass 1 writes a chunk late (no stall); pass 2 finds all 10 windows.
  assert sizes[:3] == [(1, 4, 0), (1, 8, 4 * window_bytes),
                       (1, 10, 8 * window_bytes)]
  assert all(size == 10 * window_bytes for n, _, size in sizes if n == 2)
  assert not acts.exists() and (state / scan_mod.STATE_FILE).is_file()


def test_activation_file_resumes_with_the_scan(env, tok, tmp_path,
                                               monkeypatch):
  """A scan killed in pass 1 keeps the windows its last save counted and
  appends the rest; killed in pass 2 it reads the file on; without the
  file pass 2 runs Gemma. Every resumed result is the uninterrupted one."""
  kw = dict(SETTINGS, lens=False)
  args = (TINY, env["params"], env["d"], env["windows"], tok)
  state = tmp_path / "state"
  file, acts = state / scan_mod.STATE_FILE, state / scan_mod.ACTS_FILE
  snapshot = tmp_path / "snapshot.npz"
  calls = _counting_steps(monkeypatch)

  def kill_at(save_at, stop_at):
    def on_chunk(number, next_window):
      if (number, next_window) == save_at:
        shutil.copy(file, snapshot)
      if (number, next_window) == stop_at:
        raise _Stop
    return on_chunk

  def resume():
    shutil.copy(snapshot, file)      # as if killed right after that save
    calls.update(gemma=0, file=0)
    seen = []
    result = scan_mod.scan(*args, state_dir=state,
                           on_chunk=lambda *a: seen.append(a), **kw)
    _equal(result, env["result"])
    return seen[0]

  # Killed in pass 1 after 8 windows were written, the last save at 4.
  with pytest.raises(_Stop):
    scan_mod.scan(*args, state_dir=state, save_every_s=0.0,
                  on_chunk=kill_at((1, 4), (1, 8)), **kw)
  assert acts.stat().st_size > 4 * 24 * TINY.d_model * 4
  assert resume() == (1, 8)
  assert calls == {"gemma": 0, "file": 3} and not acts.exists()

  # Killed in pass 2: the file is read on.
  shutil.rmtree(state)
  with pytest.raises(_Stop):
    scan_mod.scan(*args, state_dir=state, save_every_s=0.0,
                  on_chunk=kill_at((2, 4), (2, 8)), **kw)
  assert resume() == (2, 8)
  assert calls == {"gemma": 0, "file": 2}

  # The same without the file: Gemma runs for the rest of pass 2.
  shutil.rmtree(state)
  with pytest.raises(_Stop):
    scan_mod.scan(*args, state_dir=state, save_every_s=0.0,
                  on_chunk=kill_at((2, 4), (2, 8)), **kw)
  acts.unlink()
  assert resume() == (2, 8)
  assert calls == {"gemma": 2, "file": 0}


def test_blocks_needed(env, tok):
  d = env["d"]
  assert scan_mod.blocks_needed(d) == 2                  # layer_1/resid_post
  assert scan_mod.blocks_needed(d, "layer_0/mlp_in") == 1
  # A transcoder writing attn_out: the lens reads that block's projection.
  t = dataclasses.replace(d, hookpoint="layer_0/resid_pre",
                          hookpoint_out="layer_1/attn_out")
  assert scan_mod.blocks_needed(t) == 2
  t = dataclasses.replace(d, hookpoint="layer_0/mlp_in",
                          hookpoint_out="layer_1/mlp_out")
  assert scan_mod.blocks_needed(t) == 1
  assert scan_mod.blocks_needed(dataclasses.replace(d, hookpoint=None)
                                ) is None
  assert scan_mod.blocks_needed(d, "somewhere") is None
  clt = interop.MultiLayerInference(
      kind="clt", w_enc=np.zeros((2, 32, 3)), w_dec=np.zeros((2, 3, 2, 32)),
      b_enc=np.zeros((2, 3)), b_dec=np.zeros((2, 32)),
      threshold=np.zeros((2, 3)), hookpoints=("layer_0/mlp_in",
                                              "layer_3/mlp_in"))
  assert scan_mod.blocks_needed(clt) == 4
  # A scan (lens included) runs on params holding only those blocks.
  few = {k: v for k, v in env["params"].items() if k != "layer_1"}
  hp = "layer_0/resid_post"
  assert scan_mod.blocks_needed(d, hp) == 1
  a, b = (scan_mod.scan(TINY, p, d, env["windows"], tok, hookpoint=hp,
                        **SETTINGS) for p in (few, env["params"]))
  _equal(a, b)
  np.testing.assert_array_equal(a.lens.top_ids, b.lens.top_ids)


def test_records_schema_and_text(env, tok):
  r, windows = env["result"], env["windows"]
  meta, latents = rec.records(r, windows, tok, text_source="shakespeare")
  latents = list(latents)
  json.dumps([meta, latents])
  assert set(meta) == {"title", "model", "hookpoint", "kind", "width",
                       "num_tokens", "num_windows", "seq_len", "k",
                       "quantile_bins", "per_bin", "text_source", "created",
                       "lens"}
  assert meta["hookpoint"] == HP and meta["kind"] == "sae"
  assert [x["id"] for x in latents] == list(range(WIDTH))
  keys = {"id", "dead", "count", "density", "mean", "max", "top",
          "quantiles", "histogram", "logit_lens", "neighbours", "top_tokens"}
  special = tok.special_ids
  for x in latents:
    assert set(x) == keys
    j = x["id"]
    assert x["count"] == r.count[j] and x["dead"] == bool(r.dead[j])
    assert len(x["top"]) == min(r.k, r.count[j])
    for e in x["top"] + [e for q in x["quantiles"] for e in q["examples"]]:
      ids = windows.tokens[e["window"]]
      lo = e["pos"] - e["peak"]
      seg = ids[lo:lo + len(e["tokens"])]
      assert len(e["acts"]) == len(e["tokens"]) and lo >= 0
      assert e["acts"][e["peak"]] == pytest.approx(e["value"], rel=1e-3)
      assert e["value"] == pytest.approx(env["f"][e["window"], e["pos"], j],
                                         rel=1e-5)
      plain = [t for t, i in zip(e["tokens"], seg) if i not in special]
      assert "".join(plain) == tok.decode([i for i in seg
                                           if i not in special])
    if x["dead"]:
      assert x["quantiles"] == [] and x["histogram"]["counts"] == []
    else:
      assert sum(x["histogram"]["counts"]) == x["count"]
      assert sum(q["count"] for q in x["quantiles"]) == x["count"]
      assert len(x["histogram"]["edges"]) == r.hist_bins + 1
    assert len(x["logit_lens"]["top"]) == 10
    assert [n for n, _ in x["neighbours"]] == list(r.neighbours[0][j])
    assert len(x["top_tokens"]) <= 5
  assert latents[TIE]["top"][0]["window"] == 0
  assert latents[TIE]["top_tokens"]


def test_token_text_concatenates_to_the_text(tok):
  sample = "na\u00efve \u6771\u4eac \U0001D54F\U00013000 x\n\u0f00 end"
  ids = tok.encode(sample, add_bos=False)
  strings = rec.TokenText(tok).strings(ids)
  assert len(strings) == len(ids) and "".join(strings) == sample


def test_clt_scan_equals_numpy(tok, env):
  rng = np.random.default_rng(3)
  n, s, d = 2, 12, 32
  hps = ("layer_0/mlp_in", "layer_1/mlp_in")
  w_enc = rng.normal(size=(n, d, s)) / np.sqrt(d)
  w_dec = np.zeros((n, s, n, d))
  for i in range(n):
    w_dec[i, :, i:] = rng.normal(size=(s, n - i, d))
  windows = env["windows"]
  out = models.forward(env["params"], windows.tokens, windows.mask,
                       config=TINY, hookpoints=hps, logits=False)
  x = np.stack([np.asarray(out.activations[h], np.float64) for h in hps],
               axis=-2)
  keep = env["keep"]
  pre = np.einsum("Nnd,nds->Nns", x[keep], w_enc)
  threshold = np.quantile(pre, 0.85, axis=0)
  clt = interop.MultiLayerInference(
      kind="clt", w_enc=w_enc, w_dec=w_dec, b_enc=np.zeros((n, s)),
      b_dec=np.zeros((n, d)), threshold=threshold, hookpoints=hps,
      hookpoints_out=("layer_0/mlp_out", "layer_1/mlp_out"))
  r = scan_mod.scan(TINY, env["params"], clt, windows, tok,
                    **dict(SETTINGS, k=4))
  f = clt.encode(x).reshape(*x.shape[:2], n * s) * keep[..., None]
  f = _flat(f)
  assert r.kind == "clt" and r.width == n * s
  np.testing.assert_array_equal(r.count, (f > 0).sum(0))
  np.testing.assert_allclose(r.max, f.max(0), rtol=1e-5)
  idx = np.arange(len(f))
  for j in range(r.width):
    fired = np.flatnonzero(f[:, j] > 0)
    order = fired[np.lexsort((idx[fired], -f[fired, j]))][:4]
    np.testing.assert_array_equal(r.top_index[j][:len(order)], order)
  # Lens: writes summed over output layers; input neighbours exist.
  rows = dl.write_rows(dl.source(clt, TINY), TINY, env["params"])
  np.testing.assert_allclose(rows[s + 1], w_dec[1, 1, 1], rtol=1e-6)
  np.testing.assert_allclose(rows[1], w_dec[0, 1, 0] + w_dec[0, 1, 1],
                             rtol=1e-6, atol=1e-6)
  ids, cos = r.input_neighbours
  assert ids.shape == (n * s, 10)
  # Encoder columns of different layers are orthogonal by construction.
  other = (ids // s) != (np.arange(n * s) // s)[:, None]
  assert other.any() and np.all(np.abs(cos[other]) < 1e-6)
  _, latents = rec.records(r, windows, tok, latents=[0, s])
  assert [x["id"] for x in latents] == [0, s]


def test_bad_inputs_are_named(env, tok):
  args = (TINY, env["params"])
  d, windows = env["d"], env["windows"]
  with pytest.raises(errors.InputError, match="layer_5/resid_post"):
    scan_mod.scan(*args, d.replace(hookpoint="layer_5/resid_post"), windows,
                  tok, progress=False)
  with pytest.raises(errors.InputError, match="16-wide"):
    scan_mod.scan(*args, interop.InferenceDictionary(
        w_enc=np.zeros((16, 4)), w_dec=np.zeros((4, 16)), b_enc=np.zeros(4),
        b_dec=np.zeros(16), threshold=np.zeros(4), hookpoint=HP), windows,
        tok, progress=False)
  with pytest.raises(errors.UsageError, match="hookpoint"):
    scan_mod.scan(*args, d.replace(hookpoint=None), windows, tok,
                  progress=False)
  empty = windows_from_ids(np.zeros(0, np.int32), 24, tok.bos_id)
  with pytest.raises(errors.InputError, match="no windows"):
    scan_mod.scan(*args, d, empty, tok, progress=False)
  only_bos = Windows(windows.tokens[:2, :1], windows.mask[:2, :1])
  with pytest.raises(errors.InputError, match="no ordinary tokens"):
    scan_mod.scan(*args, d, only_bos, tok, progress=False)
  with pytest.raises(errors.UsageError, match="per_bin"):
    scan_mod.scan(*args, d, windows, tok, per_bin=0, progress=False)
  with pytest.raises(errors.UsageError, match="shape"):
    rec.records(env["result"], Windows(windows.tokens[:3],
                                       windows.mask[:3]), tok)


@pytest.mark.slow
def test_real_270m_layer_6(real_model, tok):
  config, params = real_model
  ids = tok.encode(text.read_text(text.shakespeare_files()[:1])[:20000])
  windows = windows_from_ids(np.asarray(ids), 64, tok.bos_id,
                             max_tokens=64 * 16)
  rng = np.random.default_rng(0)
  hp, width = "layer_6/resid_post", 256
  w_enc = rng.normal(size=(config.d_model, width)) / np.sqrt(config.d_model)
  x = np.asarray(models.forward(params, windows.tokens, windows.mask,
                                config=config, hookpoints=(hp,),
                                logits=False).activations[hp], np.float64)
  keep = ordinary_mask(tok, windows.tokens, windows.mask)
  pre = x @ w_enc
  threshold = np.quantile(pre[keep], 0.9, axis=0)
  d = interop.InferenceDictionary(
      w_enc=w_enc, w_dec=rng.normal(size=(width, config.d_model)),
      b_enc=np.zeros(width), b_dec=np.zeros(config.d_model),
      threshold=threshold, hookpoint=hp)
  r = scan_mod.scan(config, params, d, windows, tok, batch_size=4,
                    progress=False)
  f = _flat(np.where((pre > threshold) & keep[..., None],
                     np.maximum(pre, 0.0), 0.0))
  assert np.abs(r.count - (f > 0).sum(0)).max() <= 2   # float32 vs 64
  np.testing.assert_allclose(r.max, f.max(0), rtol=1e-3)
  np.testing.assert_array_equal(r.top_index[:, 0],
                                np.where(f.max(0) > 0, f.argmax(0), -1))
  live = np.flatnonzero(~r.dead)[:4]
  _, latents = rec.records(r, windows, tok, latents=live)
  latents = list(latents)
  assert [x["id"] for x in latents] == list(live)
  assert all(x["top"] and x["logit_lens"]["top"] for x in latents)


# --- sharded over a mesh (a subprocess with 4 CPU devices) -----------------

def _mesh_worker(out: str) -> None:
  """Scans on 2 x 2 and 1 x 4 ('data', 'model') meshes and saves each
  result's arrays."""
  tok = default_tokenizer()
  env = build(tok, scan=False)
  got = {}
  for data, model in ((2, 2), (1, 4)):
    mesh = parallel.make_mesh(parallel.MeshPlan(data=data, model=model))
    got[f"{data}x{model}"] = scan_mod.scan(
        TINY, env["params"], env["d"], env["windows"], tok, mesh=mesh,
        lens=False, **SETTINGS)
  np.savez(out, **{f"{name}.{field}": getattr(r, field)
                   for name, r in got.items() for field in _FIELDS})


_FIELDS = ("count", "total", "max", "top_values", "top_index", "top_context",
           "hist_edges", "hist_counts", "quantile_counts", "quantile_values",
           "quantile_index", "quantile_context")


def test_sharded_scans_equal_the_unsharded_one(env, tmp_path):
  out = tmp_path / "mesh.npz"
  proc = subprocess.run(
      [sys.executable, str(pathlib.Path(__file__)), str(out)],
      cwd=pathlib.Path(__file__).parents[1], capture_output=True, text=True,
      timeout=600, env={
          **os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  z = np.load(out)
  for mesh in ("2x2", "1x4"):
    for field in _FIELDS:
      a, b = getattr(env["result"], field), z[f"{mesh}.{field}"]
      if field in ("total", "max", "top_values", "top_context",
                   "quantile_values", "quantile_context", "hist_edges"):
        # Gemma's matmuls split over devices round in another order.
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{mesh} {field}")
      else:
        np.testing.assert_array_equal(b, a, err_msg=f"{mesh} {field}")


if __name__ == "__main__":
  _mesh_worker(sys.argv[1])
