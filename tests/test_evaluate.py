"""evals.evaluate against independent numpy computations and closed forms.

The real Gemma 3 270M at layer_1/resid_post, on the shared real-text windows
cut to 32 tokens (4 windows, evaluated in 2 batches of 2 so accumulation
across batches is exercised). Dictionaries are built by hand so the answers
are known: an exact SAE (w_enc = [I, -I], w_dec = [I; -I], threshold 0 so
the JumpReLU is a plain ReLU), a zero dictionary, and a random JumpReLU whose
statistics numpy recomputes from harvested activations. All three share one
module shape, so the spliced forward pass compiles once.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from gemscope_jax import models
from gemscope_jax.data.harvest import harvest
from gemscope_jax.text.windows import special_mask
from gemscope_jax.text.windows import Windows
from gemscope_jax.dictionaries import JumpReLU
from gemscope_jax.evals import evaluate as ev

HP = "layer_1/resid_post"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEQ = 32


@pytest.fixture(scope="module")
def env(real_model, real_text_tokens):
  """Model, windows, and numpy ground truth: ordinary-token activations."""
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  tok = default_tokenizer()
  tokens, mask = real_text_tokens
  windows = Windows(np.asarray(tokens, np.int32)[:, :SEQ],
                    np.asarray(mask, bool)[:, :SEQ])
  acts, _ = harvest(config, params, windows, [HP], batch_size=4,
                    progress=False)
  ordinary = ~special_mask(tok, windows.tokens[windows.mask])
  x = acts[HP][ordinary].astype(np.float64)
  scale = float(np.sqrt(np.mean(np.sum(x * x, axis=-1))))
  return dict(config=config, params=params, tok=tok, windows=windows, x=x,
              scale=scale, d=config.d_model)


def _run(env, module, params, **kw):
  return ev.evaluate(model_config=env["config"], model_params=env["params"],
                     hookpoint=HP, module=module, params=params,
                     norm_scale=env["scale"], windows=env["windows"],
                     tokenizer=env["tok"], batch_size=2, progress=False, **kw)


def _module(d):
  return JumpReLU(d_in=d, d_sae=2 * d, sparsity_penalty="l0")


def _params(w_enc, w_dec, b_enc=None, b_dec=None, threshold=None):
  d, d_sae = w_enc.shape
  zeros = lambda n: np.zeros(n, np.float32)
  return {"w_enc": w_enc, "w_dec": w_dec,
          "b_enc": zeros(d_sae) if b_enc is None else b_enc,
          "b_dec": zeros(d) if b_dec is None else b_dec,
          "threshold": zeros(d_sae) if threshold is None else threshold}


@pytest.fixture(scope="module")
def exact(env):
  d = env["d"]
  eye = np.eye(d, dtype=np.float32)
  params = _params(np.concatenate([eye, -eye], 1),
                   np.concatenate([eye, -eye], 0))
  return _run(env, _module(d), params)


@pytest.fixture(scope="module")
def zero_dict(env):
  d = env["d"]
  params = _params(np.zeros((d, 2 * d), np.float32),
                   np.zeros((2 * d, d), np.float32))
  return params, _run(env, _module(d), params)


def _numpy_loss(logits, tokens, mask):
  """Mean next-token NLL over (real, real) pairs, float64, window by window."""
  total, pairs = 0.0, 0
  for lg, tk, mk in zip(logits, tokens, mask):
    lg = np.asarray(lg[:-1], np.float64)
    top = lg.max(-1, keepdims=True)
    logp = lg - top - np.log(np.exp(lg - top).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(tk) - 1), tk[1:]]
    valid = mk[1:] & mk[:-1]
    total += nll[valid].sum()
    pairs += int(valid.sum())
  return total / pairs, pairs


def _zero_where(x, keep):
  return jnp.where(keep[..., None], 0.0, x)


@pytest.fixture(scope="module")
def hand(env):
  """Clean and zero-ablated logits computed without `evaluate`."""
  w = env["windows"]
  keep = w.mask & ~special_mask(env["tok"], w.tokens)
  run = lambda **kw: np.asarray(models.forward(
      env["params"], w.tokens, w.mask, config=env["config"], **kw).logits)
  clean = run()
  zero_ordinary = run(edits={HP: _zero_where}, edit_args={HP: keep})
  zero_all = run(edits={HP: _zero_where}, edit_args={HP: w.mask})
  return dict(keep=keep, clean=clean, zero_ordinary=zero_ordinary,
              zero_all=zero_all)


@pytest.mark.slow
def test_exact_dictionary_reconstructs_perfectly(env, exact):
  m = exact.metrics
  assert m["fvu"] < 1e-10
  assert m["explained_variance"] == pytest.approx(1.0, abs=1e-10)
  assert m["cosine_sim"] == pytest.approx(1.0, abs=1e-6)
  assert m["mse"] < 1e-8 * np.mean(np.sum(env["x"] ** 2, -1))
  assert m["spliced_loss"] == pytest.approx(m["clean_loss"], abs=1e-4)
  assert m["delta_lm_loss"] == pytest.approx(0.0, abs=1e-4)
  assert m["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
  assert m["zero_ablation_loss"] > m["clean_loss"] + 1.0


@pytest.mark.slow
def test_exact_dictionary_latent_counts_match_numpy(env, exact):
  x, d = env["x"], env["d"]
  m = exact.metrics
  # relu(x_i) fires where x_i > 0, relu(-x_i) where x_i < 0.
  nonzero = (x != 0).sum(-1)
  freq = np.concatenate([(x > 0).mean(0), (x < 0).mean(0)])
  assert m["num_tokens"] == len(x)
  assert m["num_latents"] == 2 * d
  assert m["l0"] == pytest.approx(nonzero.mean(), abs=1e-9)
  assert m["l0_std"] == pytest.approx(nonzero.std(), abs=1e-6)
  np.testing.assert_allclose(exact.frequency, freq, atol=1e-12)
  assert m["dead_fraction"] == pytest.approx((freq == 0).mean(), abs=1e-12)
  assert m["dense_fraction"] == pytest.approx((freq > 0.1).mean(), abs=1e-12)
  # The dense latents' share of L0, counted token by token.
  dense = np.concatenate([x > 0, x < 0], axis=-1)[:, freq > 0.1]
  assert m["dense_l0"] == pytest.approx(dense.sum(-1).mean(), abs=1e-9)
  assert 0 < m["dense_l0"] < m["l0"]
  # A coordinate of constant sign makes one of its two latents dead.
  assert m["dead_fraction"] > 0


@pytest.mark.slow
def test_zero_dictionary_equals_zero_ablation(env, zero_dict):
  _, result = zero_dict
  m = result.metrics
  x = env["x"]
  assert m["spliced_loss"] == pytest.approx(m["zero_ablation_loss"], abs=1e-5)
  assert m["loss_recovered"] == pytest.approx(0.0, abs=1e-5)
  want_fvu = (x ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
  assert m["fvu"] == pytest.approx(want_fvu, rel=1e-5)
  assert m["mse"] == pytest.approx((x ** 2).sum(-1).mean(), rel=1e-5)
  assert (m["l0"], m["cosine_sim"]) == (0.0, 0.0)
  assert (m["dead_fraction"], m["dense_fraction"], m["dense_l0"]) == (
      1.0, 0.0, 0.0)


@pytest.mark.slow
def test_losses_match_hand_computation(env, hand, exact):
  w = env["windows"]
  m = exact.metrics
  clean, pairs = _numpy_loss(hand["clean"], w.tokens, w.mask)
  zero, _ = _numpy_loss(hand["zero_ordinary"], w.tokens, w.mask)
  zero_all, _ = _numpy_loss(hand["zero_all"], w.tokens, w.mask)
  assert m["num_pairs"] == pairs
  assert m["clean_loss"] == pytest.approx(clean, abs=1e-4)
  assert m["zero_ablation_loss"] == pytest.approx(zero, abs=1e-4)
  # Zeroing BOS as well is a different (worse-defined) ablation.
  assert abs(zero_all - zero) > 1e-2


@pytest.mark.slow
def test_splice_leaves_special_positions_untouched(env, hand, zero_dict):
  params, _ = zero_dict
  w = env["windows"]
  keep = hand["keep"]
  assert not keep[:, 0].any() and keep.sum() == len(env["x"])
  logits = np.asarray(models.forward(
      env["params"], w.tokens, w.mask, config=env["config"],
      edits={HP: ev.splice_edit(_module(env["d"]))},
      edit_args={HP: ev.edit_args(params, env["scale"], splice=keep,
                                  zero=np.zeros_like(keep))}).logits)
  # Position 0 (BOS) sees only itself: untouched, so exactly clean.
  np.testing.assert_allclose(logits[:, 0], hand["clean"][:, 0], atol=1e-4)
  # Later positions are zeroed: identical to the hand zero ablation.
  real = w.mask
  np.testing.assert_allclose(logits[real], hand["zero_ordinary"][real],
                             atol=1e-3)
  assert np.abs(logits[:, 1] - hand["clean"][:, 1]).max() > 1.0


@pytest.mark.slow
def test_exact_dictionary_in_bfloat16_has_no_loss_delta(env):
  # A bf16 model keeps excess precision through an unedited hookpoint; the
  # clean pass must round exactly as the spliced one does.
  d = env["d"]
  eye = np.eye(d, dtype=np.float32)
  params = _params(np.concatenate([eye, -eye], 1),
                   np.concatenate([eye, -eye], 0))
  w = env["windows"]
  m = ev.evaluate(model_config=env["config"], model_params=env["params"],
                  hookpoint=HP, module=_module(d), params=params,
                  norm_scale=env["scale"], windows=Windows(w.tokens[:2],
                                                           w.mask[:2]),
                  tokenizer=env["tok"], batch_size=2, dtype=jnp.bfloat16,
                  progress=False).metrics
  assert m["delta_lm_loss"] == 0.0 and m["loss_recovered"] == 1.0
  assert m["fvu"] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.slow
def test_random_jumprelu_matches_numpy(env):
  x, d, s = env["x"], env["d"], env["scale"]
  d_sae = 2 * d
  rng = np.random.default_rng(0)
  w_enc = rng.normal(size=(d, d_sae)).astype(np.float32)
  w_dec = (rng.normal(size=(d_sae, d)) / np.sqrt(d)).astype(np.float32)
  b_dec = (0.1 * rng.normal(size=d) / np.sqrt(d)).astype(np.float32)
  b_enc = np.zeros(d_sae, np.float32)
  threshold = rng.uniform(0.0, 3.0, d_sae).astype(np.float32)
  threshold[:16] = 1e9           # dead by construction
  b_enc[16:32] = threshold[16:32] + 1e6   # fire on every token: dense
  params = _params(w_enc, w_dec, b_enc, b_dec, threshold)
  m = _run(env, _module(d), params, dense_threshold=0.2, prefixes=(100, 700))
  pre = (x / s - b_dec) @ w_enc.astype(np.float64) + b_enc
  f = pre * (pre > threshold)
  recon = s * (f @ w_dec.astype(np.float64) + b_dec)
  n = len(x)
  l0 = (f != 0).sum(-1)
  freq = (f != 0).mean(0)
  err = ((x - recon) ** 2).sum(-1)
  cos = (x * recon).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(
      recon, axis=-1)
  got = m.metrics
  # Rounding may flip a latent within ~1e-6 of its threshold: allow 2.
  assert got["l0"] == pytest.approx(l0.mean(), abs=2 / n)
  assert got["l0_std"] == pytest.approx(l0.std(), abs=0.05)
  np.testing.assert_allclose(m.frequency, freq, atol=2 / n)
  assert got["dead_fraction"] == pytest.approx((freq == 0).mean(),
                                               abs=1 / d_sae)
  assert got["dense_fraction"] == pytest.approx((freq > 0.2).mean(),
                                                abs=1 / d_sae)
  assert 16 / d_sae <= got["dead_fraction"] < 1
  assert 16 / d_sae <= got["dense_fraction"] < 1
  var = ((x - x.mean(0)) ** 2).sum()
  fvu = err.sum() / var
  assert got["fvu"] == pytest.approx(fvu, rel=1e-4)
  for size in (100, 700):      # the first `size` latents only
    part = s * (f[:, :size] @ w_dec[:size].astype(np.float64) + b_dec)
    assert got[f"prefix_fvu/{size}"] == pytest.approx(
        ((x - part) ** 2).sum() / var, rel=1e-4)
  assert got["explained_variance"] == pytest.approx(1 - fvu, rel=1e-4,
                                                    abs=1e-6)
  assert got["mse"] == pytest.approx(err.mean(), rel=1e-4)
  assert got["mse_normalized"] == pytest.approx(err.mean() / s ** 2, rel=1e-4)
  assert got["cosine_sim"] == pytest.approx(cos.mean(), abs=1e-5)
  assert got["delta_lm_loss"] == pytest.approx(
      got["spliced_loss"] - got["clean_loss"], abs=1e-12)
  zero, clean = got["zero_ablation_loss"], got["clean_loss"]
  assert got["loss_recovered"] == pytest.approx(
      (zero - got["spliced_loss"]) / (zero - clean), rel=1e-9)


def test_frequency_histogram_is_a_png(tmp_path):
  freq = np.concatenate([np.zeros(37), 10.0 ** np.linspace(-5, -0.1, 200)])
  path = tmp_path / "sub" / "freq.png"
  ev.plot_frequency_histogram(freq, path, title="test", dense_threshold=0.1)
  assert path.read_bytes()[:8] == PNG_MAGIC
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  # All dead: nothing to take the logarithm of, still a valid image.
  ev.plot_frequency_histogram(np.zeros(8), tmp_path / "dead.png", title="x")
  assert (tmp_path / "dead.png").read_bytes()[:8] == PNG_MAGIC
  assert [p.name for p in tmp_path.rglob("*.partial")] == []


def test_metrics_json_round_trips(tmp_path):
  metrics = {"fvu": 0.125, "l0": np.float32(12.5), "num_tokens": np.int64(7),
             "loss_recovered": float("nan"), "name": "layer_1"}
  path = tmp_path / "metrics.json"
  ev.write_metrics(metrics, path)
  back = json.loads(path.read_text())
  assert back == {"fvu": 0.125, "l0": 12.5, "num_tokens": 7,
                  "loss_recovered": None, "name": "layer_1"}
  assert isinstance(back["num_tokens"], int)
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.slow
def test_loss_tokens_limits_only_the_loss_passes(env):
  """With loss_tokens covering the first batch, the losses are the first
  batch's (checked against a run on that batch alone) while the statistics
  still cover every window."""
  d = env["d"]
  rng = np.random.default_rng(3)
  w_dec = (rng.normal(size=(2 * d, d)) / np.sqrt(d)).astype(np.float32)
  params = _params(w_dec.T.copy(), w_dec,
                   threshold=np.full(2 * d, 0.05, np.float32))
  module = _module(d)
  full = _run(env, module, params).metrics
  part = _run(env, module, params, loss_tokens=1).metrics
  w = env["windows"]
  first = ev.evaluate(
      model_config=env["config"], model_params=env["params"], hookpoint=HP,
      module=module, params=params, norm_scale=env["scale"],
      windows=Windows(w.tokens[:2], w.mask[:2]), tokenizer=env["tok"],
      batch_size=2, progress=False).metrics
  for k in ("l0", "fvu", "dead_fraction", "num_tokens"):
    assert part[k] == full[k], k
  assert part["loss_tokens"] == int(w.mask[:2].sum()) < full["loss_tokens"]
  for k in ("clean_loss", "spliced_loss", "zero_ablation_loss", "num_pairs"):
    assert part[k] == pytest.approx(first[k], rel=1e-6), k


def test_prefix_fvu_of_transcoders():
  """prefix_fvu/M is the FVU of the prediction from the first M latents
  (bias and affine skip kept, raw units), on synthetic activations in two
  batches: a Matryoshka transcoder reports its own prefixes, a transcoder
  with the affine skip the ones asked for."""
  from gemscope_jax import dictionaries
  from gemscope_jax.dictionaries import JumpReLUTranscoder, Matryoshka
  from gemscope_jax.evals.reconstruction import MemberStats
  from gemscope_jax.surgery import splice as splice_lib
  d, d_sae, s_in, s_out = 8, 24, 3.0, 0.5
  rng = np.random.default_rng(1)
  params = {"w_enc": rng.normal(size=(d, d_sae)), "b_enc": rng.normal(
      size=d_sae) * 0.1, "threshold": rng.uniform(0, 0.5, d_sae),
            "w_dec": rng.normal(size=(d_sae, d)) / 4,
            "b_dec": rng.normal(size=d) * 0.1,
            "w_skip": rng.normal(size=(d, d)) / 4}
  params = {k: np.asarray(v, np.float32) for k, v in params.items()}
  lay = dictionaries.Layout("transcoder", ("layer_2/mlp_in",),
                            ("layer_2/mlp_out",))
  x = rng.normal(size=(2, 3, 5, d)).astype(np.float32) * s_in
  t = rng.normal(size=(2, 3, 5, d)).astype(np.float32) * s_out
  keep = rng.random((2, 3, 5)) < 0.8
  xs, ts = x[keep].astype(np.float64) / s_in, t[keep].astype(np.float64)
  pre = xs @ params["w_enc"] + params["b_enc"]
  f = pre * (pre > params["threshold"])
  assert 0 < np.count_nonzero(f[:, :4]) < f[:, :4].size
  var = ((ts - ts.mean(0)) ** 2).sum()

  def stats(module, p, prefixes=None):
    member = splice_lib.Member(name="tc", layout=lay, module=module,
                               params=p, norm_scale=s_in, target_scale=s_out)
    st = MemberStats(member, prefixes)
    for b in range(2):
      st.add({"layer_2/mlp_in": x[b], "layer_2/mlp_out": t[b]},
             keep[b], int(keep[b].sum()))
    got = st.metrics(0.1)[0]
    return {k: v for k, v in got.items() if k.startswith("prefix")}, got

  def fvu(m, skip):
    pred = f[:, :m] @ params["w_dec"][:m] + params["b_dec"]
    if skip:
      pred = pred + xs @ params["w_skip"]
    return ((ts - s_out * pred) ** 2).sum() / var

  no_skip = {k: v for k, v in params.items() if k != "w_skip"}
  inner = JumpReLUTranscoder(d_in=d, d_sae=d_sae, d_out=d, target_l0=3.0)
  got, all_ = stats(Matryoshka(inner, (4, 12, d_sae)), no_skip)
  assert sorted(got) == ["prefix_fvu/12", "prefix_fvu/4"]
  for m in (4, 12):
    assert got[f"prefix_fvu/{m}"] == pytest.approx(fvu(m, False), rel=1e-5)
  assert all_["fvu"] == pytest.approx(fvu(d_sae, False), rel=1e-5)
  assert stats(inner, no_skip)[0] == {}
  skip = JumpReLUTranscoder(d_in=d, d_sae=d_sae, d_out=d, target_l0=3.0,
                            affine_skip=True)
  got, all_ = stats(skip, params, (6,))
  assert got == {"prefix_fvu/6": pytest.approx(fvu(6, True), rel=1e-5)}
  assert all_["fvu"] == pytest.approx(fvu(d_sae, True), rel=1e-5)
  with pytest.raises(ValueError, match="increasing latent counts"):
    stats(skip, params, (12, 4))
