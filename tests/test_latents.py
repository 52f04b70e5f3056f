"""latents.top_examples against a brute-force ranking of harvested latents.

The real Gemma 3 270M at layer_2/resid_post over the shared real-text
windows, encoded by a random JumpReLU in its inference form (numpy
recomputes it from independently harvested activations). The scan runs in
batches of 3 over 4 windows, so merging across batches and a short last
batch are both exercised.
"""

from __future__ import annotations

import html

import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax.evals import latents
from gemscope_jax.data.harvest import harvest
from gemscope_jax.text.windows import special_mask
from gemscope_jax.text.windows import Windows

HP = "layer_2/resid_post"
D_SAE = 96


@pytest.fixture(scope="module")
def env(real_model, real_text_tokens):
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  tok = default_tokenizer()
  tokens, mask = real_text_tokens
  windows = Windows(np.asarray(tokens, np.int32), np.asarray(mask, bool))
  rng = np.random.default_rng(0)
  d = config.d_model
  w_enc = rng.normal(size=(d, D_SAE)).astype(np.float32) / np.sqrt(d)
  acts, _ = harvest(config, params, windows, [HP], batch_size=4,
                    progress=False)
  x = acts[HP]
  scale = float(np.sqrt(np.mean(np.sum(x * x, -1))))
  b_enc = np.zeros(D_SAE, np.float32)
  # Thresholds at per-latent quantiles so latents fire at varied rates,
  # one latent never fires.
  pre = x @ w_enc
  threshold = np.quantile(pre, np.linspace(0.5, 0.99, D_SAE), axis=0
                          ).diagonal().astype(np.float32).copy()
  threshold[7] = np.inf
  def encode(a):
    p = a @ w_enc + b_enc
    return jnp.where(p > threshold, p, 0.0)
  f = np.where(pre > threshold, pre, 0.0)
  real = windows.mask
  keep = ~special_mask(tok, windows.tokens[real])
  win, pos = np.nonzero(real)
  del scale
  return dict(config=config, params=params, tok=tok, windows=windows,
              encode=encode, f=f, keep=keep, win=win, pos=pos)


def test_top_examples_equal_brute_force(env):
  chosen = [3, 7, 50, 95]
  top = latents.top_examples(env["config"], env["params"], env["windows"],
                             HP, env["encode"], env["tok"], latents=chosen,
                             k=5, batch_size=3, progress=False)
  f, keep = env["f"], env["keep"]
  np.testing.assert_allclose(top.frequency, (f[keep] > 0).mean(0),
                             rtol=0, atol=1e-12)
  assert top.num_tokens == int(keep.sum())
  for j, latent in enumerate(chosen):
    col = np.where(keep, f[:, latent], -np.inf)
    order = np.argsort(-col, kind="stable")[:5]
    want = np.where(np.isfinite(col[order]), col[order], 0.0)
    np.testing.assert_allclose(top.values[j], want, rtol=2e-4, atol=1e-4)
    fired = want > 0
    np.testing.assert_array_equal(top.window[j][fired], env["win"][order][fired])
    np.testing.assert_array_equal(top.position[j][fired],
                                  env["pos"][order][fired])
    # The context row is the latent over the example's whole window.
    for e in np.nonzero(fired)[0]:
      w = top.window[j, e]
      rows = env["win"] == w
      expect = np.zeros(env["windows"].tokens.shape[1], np.float32)
      expect[env["pos"][rows]] = np.where(keep[rows], f[rows, latent], 0.0)
      np.testing.assert_allclose(top.context[j, e], expect, rtol=2e-4,
                                 atol=1e-4)
  assert not np.any(top.values[chosen.index(7)] > 0)  # the latent that never fires


def test_render_html_escapes_and_marks_the_peak(env, tmp_path):
  top = latents.top_examples(env["config"], env["params"], env["windows"],
                             HP, env["encode"], env["tok"], latents=[50, 7],
                             k=3, batch_size=4, progress=False)
  page = latents.render_html(top, env["windows"], env["tok"], title="a<b")
  assert "a&lt;b" in page and "a<b" not in page
  assert page.count("border-bottom") == int((top.values[0] > 0).sum())
  assert "never fires on this text" in page  # latent 7
  w, p = int(top.window[0, 0]), int(top.position[0, 0])
  piece = env["tok"].id_to_piece(int(env["windows"].tokens[w, p]))
  shown = html.escape(piece.replace("\u2581", " ")).replace("\n", "\u21b5")
  assert f"{shown}</span>" in page
  latents.save_html(page, tmp_path / "l.html")
  text = (tmp_path / "l.html").read_text(encoding="utf-8")
  assert text.startswith("<!doctype html>") and page in text


def test_bad_latents_are_refused(env):
  with pytest.raises(ValueError, match="latents"):
    latents.top_examples(env["config"], env["params"], env["windows"], HP,
                         env["encode"], env["tok"], latents=[], k=2,
                         progress=False)
