"""Transcoders, crosscoders and cross-layer transcoders against NumPy.

Expected values are re-derived in NumPy from the formulas in the modules'
docstrings (masks rebuilt here from their definitions, gradients derived by
hand), never by calling the code under test a second way. Sizes are tiny so
the file runs in well under a minute on a busy 2-core CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemscope_jax import dictionaries as D
from gemscope_jax import interop
from gemscope_jax.interop import multilayer
from gemscope_jax.training.update import apply_update

D_IN, D_OUT, D_SAE, N_LAYERS, B = 8, 6, 12, 3, 7
EPS = 0.001


def _rng(seed):
  return np.random.default_rng(seed)


def _apply(module, params, x, method=None, **kw):
  return module.apply({"params": params}, x, method=method, **kw)


def _loss(module, params, x, target=None, coeff=1.0):
  return D.compute_loss(module, params, x, sparsity_coeff=coeff,
                        target=target)[0]


def _f32(a):
  return np.asarray(a, np.float32)


def _multi_params(seed, kind, *, n=N_LAYERS, d=D_IN, s=D_SAE):
  """Random parameters, masked blocks included (nonzero on purpose)."""
  r = _rng(seed)
  clt = kind == "clt"
  return {
      "w_enc": _f32(r.normal(size=(n, d, s)) * 0.5),
      "w_dec": _f32(r.normal(size=(n, s, n, d) if clt else (s, n, d)) * 0.5),
      "b_enc": _f32(r.normal(size=(n, s) if clt else (s,)) * 0.2),
      "b_dec": _f32(r.normal(size=(n, d)) * 0.3),
      "threshold": _f32(r.uniform(0.05, 0.6, size=(n, s) if clt else (s,))),
  }


def _src(s=D_SAE, n=N_LAYERS):
  # The documented even split: latent l has source layer floor(l * n / s).
  return np.array([l * n // s for l in range(s)])


def _np_topk(acts, k):
  flat = acts.reshape(acts.shape[0], -1)
  out = np.zeros_like(flat)
  for b in range(flat.shape[0]):
    idx = np.argsort(-flat[b])[:k]
    out[b, idx] = flat[b, idx]
  return out.reshape(acts.shape)


# -------------------------------------------------------------- transcoders


def _transcoder_params(seed=0, skip=True):
  r = _rng(seed)
  p = {
      "w_enc": _f32(r.normal(size=(D_IN, D_SAE)) * 0.5),
      "w_dec": _f32(r.normal(size=(D_SAE, D_OUT)) * 0.5),
      "b_enc": _f32(r.normal(size=(D_SAE,)) * 0.2),
      "b_dec": _f32(r.normal(size=(D_OUT,)) * 0.3),
      "threshold": _f32(r.uniform(0.05, 0.6, size=(D_SAE,))),
  }
  if skip:
    p["w_skip"] = _f32(r.normal(size=(D_IN, D_OUT)) * 0.3)
  return p


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_transcoder_forward_and_loss_match_numpy(arch, skip):
  p = _transcoder_params(skip=skip)
  if arch == "topk":
    del p["threshold"]
    module = D.TopKTranscoder(D_IN, D_SAE, d_out=D_OUT, affine_skip=skip, k=3)
  else:
    module = D.JumpReLUTranscoder(D_IN, D_SAE, d_out=D_OUT, affine_skip=skip,
                                  target_l0=3.0)
  assert not module.pre_enc_bias
  x = _f32(_rng(1).normal(size=(B, D_IN)))
  t = _f32(_rng(2).normal(size=(B, D_OUT)))
  out = _apply(module, p, x)
  pre = x @ p["w_enc"] + p["b_enc"]  # no b_dec subtraction
  f = (pre * (pre > p["threshold"]) if arch == "jumprelu"
       else _np_topk(np.maximum(pre, 0), 3))
  recon = f @ p["w_dec"] + p["b_dec"] + (x @ p["w_skip"] if skip else 0)
  np.testing.assert_allclose(out.latents, f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.recon, recon, rtol=1e-5, atol=1e-5)
  loss = _loss(module, p, x, target=t, coeff=0.0)
  np.testing.assert_allclose(loss.mse, np.sum((recon - t) ** 2) / B,
                             rtol=1e-5)
  if skip:  # d mse / d w_skip = x^T 2 (recon - t) / B, by hand.
    g = jax.grad(lambda q: _loss(module, q, x, target=t, coeff=0.0).total)(p)
    np.testing.assert_allclose(g["w_skip"], x.T @ (2 * (recon - t) / B),
                               rtol=1e-4, atol=1e-5)


def test_transcoder_init_and_update():
  module = D.JumpReLUTranscoder(D_IN, D_SAE, d_out=D_OUT, affine_skip=True,
                                target_l0=3.0)
  boxed = D.init_params(module, jax.random.key(0))
  assert boxed["w_skip"].names == ("embed", "embed_out")
  params = nn.unbox(boxed)
  assert params["w_skip"].shape == (D_IN, D_OUT)
  assert not np.any(params["w_skip"])  # zero init: starts as a plain TC
  assert params["w_enc"].dtype == params["w_skip"].dtype == jnp.float32
  x = _f32(_rng(1).normal(size=(64, D_IN)))
  t = _f32(_rng(2).normal(size=(64, D_OUT)))
  opt = optax.adam(1e-2)
  grads = jax.grad(lambda q: _loss(module, q, x, t).total)(params)
  new, _ = apply_update(module, opt, params, opt.init(params), grads)
  assert np.any(new["w_skip"])
  np.testing.assert_allclose(np.linalg.norm(new["w_dec"], axis=-1), 1.0,
                             rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_inference_round_trip(skip, tmp_path):
  """to_inference on raw activations = the module on scaled ones, rescaled;
  Gemma Scope 2 write/read is bit-exact and keeps the skip."""
  p = _transcoder_params(3, skip=skip)
  module = D.JumpReLUTranscoder(D_IN, D_SAE, d_out=D_OUT, affine_skip=skip,
                                target_l0=3.0)
  s_in, s_out = 2.5, 0.4
  x_raw = _f32(_rng(4).normal(size=(B, D_IN)) * s_in)
  want = np.asarray(_apply(module, p, x_raw / s_in).recon) * s_out
  a = {k: np.asarray(v) for k, v in
       module.to_inference(p, s_in, out_norm_scale=s_out).items()}
  assert ("affine_skip_connection" in a) == skip
  pre = x_raw @ a["w_enc"] + a["b_enc"]
  f = np.maximum(pre, 0) * (pre > a["threshold"])
  got = f @ a["w_dec"] + a["b_dec"]
  if skip:
    assert a["affine_skip_connection"].shape == (D_IN, D_OUT)
    got = got + x_raw @ a["affine_skip_connection"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  d = interop.InferenceDictionary(
      w_enc=a["w_enc"], w_dec=a["w_dec"], b_enc=a["b_enc"], b_dec=a["b_dec"],
      threshold=a["threshold"], affine_skip=a.get("affine_skip_connection"))
  np.testing.assert_allclose(np.asarray(d(x_raw)), want, rtol=1e-4,
                             atol=1e-4)
  folder = interop.save_gemmascope2(d, tmp_path / "tc", l0=3,
                                    release_layout=False)
  back = interop.load_gemmascope2(folder)
  for key in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
    np.testing.assert_array_equal(getattr(back, key), getattr(d, key))
  if skip:
    np.testing.assert_array_equal(back.affine_skip, d.affine_skip)
  else:
    assert back.affine_skip is None


# -------------------------------------------------------------- crosscoders


def _crosscoder_numpy(p, x, causal, arch="jumprelu", k=None):
  w_enc, w_dec = p["w_enc"].copy(), p["w_dec"].copy()
  if causal:
    src = _src()
    for l in range(D_SAE):
      w_enc[src[l] + 1:, :, l] = 0  # reads layers <= src
      w_dec[l, :src[l]] = 0  # writes layers >= src
  pre = np.einsum("bnd,ndl->bl", x, w_enc) + p["b_enc"]
  f = (pre * (pre > p["threshold"]) if arch == "jumprelu"
       else _np_topk(np.maximum(pre, 0), k))
  recon = np.einsum("bl,lnd->bnd", f, w_dec) + p["b_dec"]
  return pre, f, recon, w_enc, w_dec


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
@pytest.mark.parametrize("causal", [False, True])
def test_crosscoder_forward_and_loss_match_numpy(causal, arch):
  p = _multi_params(0, "crosscoder")
  if arch == "topk":
    del p["threshold"]
  module = D.Crosscoder(N_LAYERS, D_IN, D_SAE, causal=causal,
                        activation=arch, k=4, target_l0=3.0)
  x = _f32(_rng(1).normal(size=(B, N_LAYERS, D_IN)))
  out = _apply(module, p, x)
  pre, f, recon, _, _ = _crosscoder_numpy(p, x, causal, arch, 4)
  assert 0 < np.count_nonzero(f) < f.size
  np.testing.assert_allclose(out.pre_acts, pre, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.latents, f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.recon, recon, rtol=1e-5, atol=1e-5)
  loss = _loss(module, p, x, coeff=0.0)
  # Sum over layers of each layer's MSE (squared error summed over d).
  np.testing.assert_allclose(loss.mse, np.sum((recon - x) ** 2) / B,
                             rtol=1e-5)
  per_layer = np.sum((recon - x) ** 2, axis=(0, 2)) / B
  np.testing.assert_allclose(loss.aux["mse_per_layer"], per_layer, rtol=1e-5)
  flat_x, flat_r = x.reshape(B, -1), recon.reshape(B, -1)
  fvu = np.sum((flat_r - flat_x) ** 2) / np.sum((flat_x - flat_x.mean(0)) ** 2)
  np.testing.assert_allclose(loss.aux["fvu"], fvu, rtol=1e-5)
  np.testing.assert_allclose(loss.aux["l0"], np.mean(np.sum(f != 0, -1)),
                             rtol=1e-6)


def test_crosscoder_gradients_match_hand_derivation():
  """mse + quadratic L0 penalty, STE threshold gradients, causal masks."""
  p = _multi_params(5, "crosscoder")
  module = D.Crosscoder(N_LAYERS, D_IN, D_SAE, causal=True, target_l0=3.0,
                        bandwidth=0.5)  # wide so the STE window is hit
  x = _f32(_rng(6).normal(size=(B, N_LAYERS, D_IN)))
  coeff, eps, l0_star = 0.7, 0.5, 3.0
  g = jax.grad(lambda q: _loss(module, q, x, coeff=coeff).total)(p)
  pre, f, recon, w_enc, w_dec = _crosscoder_numpy(p, x, causal=True)
  th = p["threshold"]
  g_r = 2 * (recon - x) / B
  g_f = np.einsum("bnd,lnd->bl", g_r, w_dec)
  hard = (pre > th).astype(np.float64)
  rect = (np.abs((pre - th) / eps) < 0.5).astype(np.float64)
  assert rect.any()
  g_pre = g_f * hard
  enc_mask = (w_enc != 0) | (np.arange(N_LAYERS)[:, None, None]
                             <= _src()[None, None, :])
  dec_mask = np.arange(N_LAYERS)[None, :, None] >= _src()[:, None, None]
  l0 = np.mean(np.sum(hard, -1))
  dpen_dl0 = coeff * (2 / l0_star) * 2 * (l0 - l0_star)
  want = {
      "w_dec": np.einsum("bl,bnd->lnd", f, g_r) * dec_mask,
      "b_dec": g_r.sum(0),
      "w_enc": np.einsum("bnd,bl->ndl", x, g_pre) * enc_mask,
      "b_enc": g_pre.sum(0),
      "threshold": (np.sum(g_f * -(th / eps) * rect, 0)
                    + dpen_dl0 * np.sum(-(1 / eps) * rect, 0) / B),
  }
  for key, value in want.items():
    np.testing.assert_allclose(g[key], value, rtol=1e-4, atol=1e-5,
                               err_msg=key)
  # Masked blocks: exactly zero, not merely small.
  assert np.all(np.asarray(g["w_dec"])[~np.broadcast_to(
      dec_mask, g["w_dec"].shape)] == 0)


# ----------------------------------------------------- cross-layer transcoder


def _clt_numpy(p, x, arch="jumprelu", k=None):
  n = N_LAYERS
  pre = np.einsum("bnd,ndl->bnl", x, p["w_enc"]) + p["b_enc"]
  f = (pre * (pre > p["threshold"]) if arch == "jumprelu"
       else _np_topk(np.maximum(pre, 0), k))
  recon = np.zeros((x.shape[0], n, D_IN)) + p["b_dec"]
  for o in range(n):
    for src in range(o + 1):  # only earlier-or-same layers write to o
      recon[:, o] += f[:, src] @ p["w_dec"][src, :, o]
  return pre, f, recon


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_clt_forward_and_loss_match_numpy(arch):
  p = _multi_params(0, "clt")
  if arch == "topk":
    del p["threshold"]
  module = D.CrossLayerTranscoder(N_LAYERS, D_IN, D_SAE, activation=arch,
                                  k=5, target_l0=6.0)
  x = _f32(_rng(1).normal(size=(B, N_LAYERS, D_IN)))
  t = _f32(_rng(2).normal(size=(B, N_LAYERS, D_IN)))
  out = _apply(module, p, x)
  pre, f, recon = _clt_numpy(p, x, arch, 5)
  assert 0 < np.count_nonzero(f) < f.size
  np.testing.assert_allclose(out.latents, f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.recon, recon, rtol=1e-5, atol=1e-5)
  loss = _loss(module, p, x, target=t, coeff=0.0)
  np.testing.assert_allclose(loss.mse, np.sum((recon - t) ** 2) / B,
                             rtol=1e-5)
  # L0 is the total over layers; l0_per_layer splits it.
  np.testing.assert_allclose(loss.aux["l0"], np.sum(f != 0) / B, rtol=1e-6)
  np.testing.assert_allclose(loss.aux["l0_per_layer"],
                             np.sum(f != 0, axis=(0, 2)) / B, rtol=1e-6)
  if arch == "topk":
    assert np.all(np.sum(np.asarray(out.latents) != 0, axis=(1, 2)) <= 5)
  with pytest.raises(ValueError, match="target="):
    _loss(module, p, x)


def test_clt_gradients_match_hand_derivation():
  p = _multi_params(7, "clt")
  module = D.CrossLayerTranscoder(N_LAYERS, D_IN, D_SAE, target_l0=6.0,
                                  bandwidth=0.5)
  x = _f32(_rng(8).normal(size=(B, N_LAYERS, D_IN)))
  t = _f32(_rng(9).normal(size=(B, N_LAYERS, D_IN)))
  coeff, eps, l0_star = 0.3, 0.5, 6.0
  g = jax.grad(lambda q: _loss(module, q, x, target=t, coeff=coeff).total)(p)
  pre, f, recon = _clt_numpy(p, x)
  th = p["threshold"]
  mask = np.triu(np.ones((N_LAYERS, N_LAYERS)))  # [src, out], src <= out
  g_r = 2 * (recon - t) / B
  g_f = np.einsum("bod,nlod,no->bnl", g_r, p["w_dec"], mask)
  hard = (pre > th).astype(np.float64)
  rect = (np.abs((pre - th) / eps) < 0.5).astype(np.float64)
  assert rect.any()
  g_pre = g_f * hard
  l0 = np.mean(np.sum(hard, axis=(1, 2)))  # total over layers
  dpen_dl0 = coeff * (2 / l0_star) * 2 * (l0 - l0_star)
  want = {
      "w_dec": np.einsum("bnl,bod,no->nlod", f, g_r, mask),
      "b_dec": g_r.sum(0),
      "w_enc": np.einsum("bnd,bnl->ndl", x, g_pre),
      "b_enc": g_pre.sum(0),
      "threshold": (np.sum(g_f * -(th / eps) * rect, 0)
                    + dpen_dl0 * np.sum(-(1 / eps) * rect, 0) / B),
  }
  for key, value in want.items():
    np.testing.assert_allclose(g[key], value, rtol=1e-4, atol=1e-5,
                               err_msg=key)


@pytest.mark.parametrize("preact_bandwidth", [0.0, 1.5])
def test_clt_per_layer_l0_targets_match_hand_derivation(preact_bandwidth):
  """`l0_targets`: sum_n (2 c / L0*_n) (L0_n - L0*_n)^2 and its gradients
  (each layer's threshold sees its own layer's L0; with `l0_preact_bandwidth`
  the pre-activations see it too)."""
  p = _multi_params(7, "clt")
  targets = (3.0, 2.0, 1.5)[:N_LAYERS]
  assert len(targets) == N_LAYERS
  coeff, eps = 0.3, 0.5
  module = D.CrossLayerTranscoder(N_LAYERS, D_IN, D_SAE, bandwidth=eps,
                                  target_l0=sum(targets), l0_targets=targets,
                                  l0_preact_bandwidth=preact_bandwidth)
  x = _f32(_rng(8).normal(size=(B, N_LAYERS, D_IN)))
  t = _f32(_rng(9).normal(size=(B, N_LAYERS, D_IN)))
  lo = _loss(module, p, x, target=t, coeff=coeff)
  g = jax.grad(lambda q: _loss(module, q, x, target=t, coeff=coeff).total)(p)
  pre, f, recon = _clt_numpy(p, x)
  th = p["threshold"]
  hard = (pre > th).astype(np.float64)
  rect = (np.abs((pre - th) / eps) < 0.5).astype(np.float64)
  assert rect.any()
  l0 = hard.sum(2).mean(0)                            # (n_layers,)
  tgt = np.asarray(targets)
  np.testing.assert_allclose(lo.sparsity,
                             np.sum(coeff * (2 / tgt) * (l0 - tgt) ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(lo.aux["l0_per_layer"], l0, rtol=1e-6)
  mask = np.triu(np.ones((N_LAYERS, N_LAYERS)))
  g_r = 2 * (recon - t) / B
  g_f = np.einsum("bod,nlod,no->bnl", g_r, p["w_dec"], mask)
  dpen = coeff * (2 / tgt) * 2 * (l0 - tgt)           # d P / d L0_n
  g_pre = g_f * hard
  if preact_bandwidth:
    wide = (np.abs((pre - th) / preact_bandwidth) < 0.5).astype(np.float64)
    g_pre = g_pre + dpen[None, :, None] * wide / preact_bandwidth / B
  want = {
      "threshold": (np.sum(g_f * -(th / eps) * rect, 0)
                    + dpen[:, None] * np.sum(-(1 / eps) * rect, 0) / B),
      "b_enc": g_pre.sum(0),
      "w_enc": np.einsum("bnd,bnl->ndl", x, g_pre),
  }
  for key, value in want.items():
    np.testing.assert_allclose(g[key], value, rtol=1e-4, atol=1e-5,
                               err_msg=key)


# ------------------------------------------------------------------ causality


def _causal_cases():
  clt = D.CrossLayerTranscoder(N_LAYERS, D_IN, D_SAE, target_l0=6.0)
  cc = D.Crosscoder(N_LAYERS, D_IN, D_SAE, causal=True, target_l0=3.0)
  # (module, params kind, masked w_dec entries as a boolean array)
  n = np.arange(N_LAYERS)
  clt_masked = np.broadcast_to((n[:, None] > n[None, :])[:, None, :, None],
                               (N_LAYERS, D_SAE, N_LAYERS, D_IN))
  cc_masked = np.broadcast_to((n[None, :] < _src()[:, None])[:, :, None],
                              (D_SAE, N_LAYERS, D_IN))
  return [(clt, "clt", clt_masked), (cc, "crosscoder", cc_masked)]


@pytest.mark.parametrize("case", [0, 1], ids=["clt", "causal_crosscoder"])
def test_causal_latents_never_write_earlier_layers(case):
  module, kind, masked = _causal_cases()[case]
  p = _multi_params(11, kind)  # masked blocks deliberately nonzero
  for layer in range(N_LAYERS):
    latents = np.zeros((1,) + module.latent_shape, np.float32)
    if kind == "clt":
      latents[0, layer, :] = 1.0  # every latent of source layer `layer`
    else:
      latents[0, _src() == layer] = 1.0
    recon = np.asarray(_apply(module, p, latents, method="decode"))
    # Layers before the source see b_dec only, bit for bit.
    np.testing.assert_array_equal(recon[0, :layer], p["b_dec"][:layer])
    assert np.all(recon[0, layer] != p["b_dec"][layer])
  x = _f32(_rng(12).normal(size=(B, N_LAYERS, D_IN)))
  t = _f32(_rng(13).normal(size=(B, N_LAYERS, D_IN)))
  g = jax.grad(lambda q: _loss(module, q, x, target=t).total)(p)
  assert np.all(np.asarray(g["w_dec"])[masked] == 0)
  assert np.any(np.asarray(g["w_dec"])[~masked] != 0)
  if kind == "crosscoder":  # a latent never reads a layer after its source
    reads_later = np.arange(N_LAYERS)[:, None] > _src()[None, :]
    g_enc = np.asarray(g["w_enc"]).transpose(0, 2, 1)  # (n, l, d)
    assert np.all(g_enc[reads_later] == 0)


@pytest.mark.parametrize("case", [0, 1], ids=["clt", "causal_crosscoder"])
def test_apply_update_keeps_masks_and_joint_unit_norm(case):
  module, kind, masked = _causal_cases()[case]
  params = nn.unbox(D.init_params(module, jax.random.key(0)))
  assert np.all(np.asarray(params["w_dec"])[masked] == 0)
  norms = np.sqrt(np.sum(np.asarray(params["w_dec"]) ** 2, axis=(-2, -1)))
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  # Corrupt the masked blocks: apply_update must zero them again, even
  # under weight decay.
  params["w_dec"] = jnp.where(masked, 1.0, params["w_dec"])
  opt = optax.adamw(1e-2, weight_decay=0.1)
  opt_state = opt.init(params)
  x = _f32(_rng(14).normal(size=(32, N_LAYERS, D_IN)))
  t = _f32(_rng(15).normal(size=(32, N_LAYERS, D_IN)))
  for _ in range(3):
    grads = jax.grad(lambda q: _loss(module, q, x, target=t).total)(params)
    params, opt_state = apply_update(module, opt, params, opt_state, grads)
    w = np.asarray(params["w_dec"])
    assert np.all(w[masked] == 0)
    np.testing.assert_allclose(np.sqrt(np.sum(w ** 2, axis=(-2, -1))), 1.0,
                               rtol=1e-5)
  if kind == "crosscoder":
    reads_later = np.arange(N_LAYERS)[:, None] > _src()[None, :]
    assert np.all(np.asarray(params["w_enc"]).transpose(0, 2, 1)
                  [reads_later] == 0)


def test_project_decoder_grads_is_joint_over_layers():
  r = _rng(16)
  w = _f32(r.normal(size=(N_LAYERS, D_SAE, N_LAYERS, D_IN)))
  g = _f32(r.normal(size=w.shape))
  proj = np.asarray(D.project_decoder_grads({"w_dec": w}, {"w_dec": g})
                    ["w_dec"])
  unit = w / np.sqrt(np.sum(w ** 2, axis=(-2, -1), keepdims=True))
  np.testing.assert_allclose(np.sum(proj * unit, axis=(-2, -1)), 0.0,
                             atol=1e-5)
  np.testing.assert_allclose(
      proj, g - np.sum(g * unit, axis=(-2, -1), keepdims=True) * unit,
      rtol=1e-5, atol=1e-5)


def test_logical_axis_names():
  clt = D.init_params(D.CrossLayerTranscoder(2, 4, 6, target_l0=2.0),
                      jax.random.key(0))
  assert clt["w_dec"].names == ("layer", "latent", "layer_out", "embed")
  assert clt["threshold"].names == ("layer", "latent")
  cc = D.init_params(D.Crosscoder(2, 4, 6, target_l0=2.0), jax.random.key(0))
  assert cc["w_enc"].names == ("layer", "embed", "latent")
  assert cc["w_dec"].names == ("latent", "layer", "embed")
  for p in (clt, cc):
    assert all(v.unbox().dtype == jnp.float32 for v in p.values())


# ----------------------------------------------------------- training runs


def _train(module, xs, ts, *, steps, batch, lr=1e-2, coeff=1.0):
  params = nn.unbox(D.init_params(module, jax.random.key(0),
                                  b_dec=ts.mean(0)))
  opt = optax.adam(lr, b1=0.0, b2=0.999)

  def loss_fn(q, x, t):
    return _loss(module, q, x, target=t, coeff=coeff).total

  @jax.jit
  def step(params, opt_state, x, t):
    grads = jax.grad(loss_fn)(params, x, t)
    return apply_update(module, opt, params, opt_state, grads)

  opt_state = opt.init(params)
  for i in range(steps):
    sl = slice(i * batch, (i + 1) * batch)
    params, opt_state = step(params, opt_state, xs[sl], ts[sl])
  return params


def _codes(r, n, n_atoms, l0):
  idx = np.argsort(r.random((n, n_atoms)), axis=1)[:, :l0]
  codes = np.zeros((n, n_atoms))
  np.put_along_axis(codes, idx, r.uniform(0.5, 1.5, (n, l0)), axis=1)
  return codes


def _unit_atoms(r, *shape):
  a = r.normal(size=shape)
  return a / np.sqrt(np.sum(a ** 2, axis=tuple(range(1, a.ndim)),
                            keepdims=True))


def _normalise(a):
  """Each layer (axis -2, if any) to unit mean squared norm, as in training."""
  scale = np.sqrt(np.mean(np.sum(a ** 2, -1), axis=0))
  return _f32(a / (scale[..., None] if a.ndim == 3 else scale))


STEPS, BATCH, HELD = 300, 256, 1024


@pytest.mark.parametrize("arch", ["jumprelu_skip", "topk"])
def test_transcoder_learns_synthetic_data(arch):
  """mlp_in = codes @ A, mlp_out = codes @ C (+ a linear map of mlp_in)."""
  d, n_atoms, l0 = 16, 16, 3
  r = _rng(0)
  n = STEPS * BATCH + HELD
  codes = _codes(r, n, n_atoms, l0)
  x = _normalise(codes @ _unit_atoms(r, n_atoms, d))
  t = codes @ _unit_atoms(r, n_atoms, d)
  if arch == "jumprelu_skip":
    t = t + x @ (0.3 * r.normal(size=(d, d)) / np.sqrt(d))
    module = D.JumpReLUTranscoder(d, 48, affine_skip=True,
                                  target_l0=float(l0))
  else:
    module = D.TopKTranscoder(d, 48, k=l0)
  t = _normalise(t)
  params = _train(module, x[:-HELD], t[:-HELD], steps=STEPS, batch=BATCH)
  final = _loss(module, params, x[-HELD:], target=t[-HELD:])
  assert final.aux["fvu"] < 0.15, final.aux  # predicting the mean: 1.0
  if arch == "jumprelu_skip":
    assert np.any(np.asarray(params["w_skip"]))


@pytest.mark.parametrize("arch,causal", [("jumprelu", False),
                                         ("jumprelu", True),
                                         ("topk", False)])
def test_crosscoder_learns_synthetic_data(arch, causal):
  """Atoms span all layers; source-0 latents of a causal one read layer 0,
  which already carries every code, so both variants can fit it."""
  n_layers, d, n_atoms, l0 = 3, 12, 16, 3
  r = _rng(1)
  n = STEPS * BATCH + HELD
  codes = _codes(r, n, n_atoms, l0)
  x = _normalise(np.einsum("ba,and->bnd", codes,
                           _unit_atoms(r, n_atoms, n_layers, d)))
  module = D.Crosscoder(n_layers, d, 48, causal=causal, activation=arch,
                        k=l0, target_l0=float(l0))
  params = _train(module, x[:-HELD], x[:-HELD], steps=STEPS, batch=BATCH)
  final = _loss(module, params, x[-HELD:])
  assert final.aux["fvu"] < 0.15, final.aux
  assert np.all(np.asarray(final.aux["fvu_per_layer"]) < 0.3), final.aux


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_clt_learns_synthetic_data(arch):
  """mlp_in[n] = codes_n @ A_n; mlp_out[o] = sum_{n <= o} codes_n @ C_{n,o}."""
  n_layers, d, n_atoms, l0 = 3, 12, 12, 2
  r = _rng(2)
  n = STEPS * BATCH + HELD
  codes = np.stack([_codes(r, n, n_atoms, l0) for _ in range(n_layers)], 1)
  a_in = np.stack([_unit_atoms(r, n_atoms, d) for _ in range(n_layers)])
  c_out = np.stack([_unit_atoms(r, n_atoms, n_layers, d)
                    for _ in range(n_layers)])  # (src, atom, out, d)
  c_out = c_out * np.triu(np.ones((n_layers, n_layers)))[:, None, :, None]
  x = _normalise(np.einsum("bna,nad->bnd", codes, a_in))
  t = _normalise(np.einsum("bna,naod->bod", codes, c_out))
  total_l0 = n_layers * l0
  module = D.CrossLayerTranscoder(n_layers, d, 32, activation=arch,
                                  k=total_l0, target_l0=float(total_l0))
  params = _train(module, x[:-HELD], t[:-HELD], steps=STEPS, batch=BATCH)
  final = _loss(module, params, x[-HELD:], target=t[-HELD:])
  assert final.aux["fvu"] < 0.15, final.aux
  w = np.asarray(params["w_dec"])
  for src in range(n_layers):
    assert not np.any(w[src, :, :src])


# ----------------------------------------------- inference forms and export


@pytest.mark.parametrize("kind,arch", [("crosscoder", "jumprelu"),
                                       ("crosscoder", "topk"),
                                       ("clt", "jumprelu"), ("clt", "topk")])
def test_multilayer_inference_round_trip(kind, arch, tmp_path):
  p = _multi_params(20, kind)
  if arch == "topk":
    del p["threshold"]
  s_in = np.array([0.5, 2.0, 3.0], np.float32)
  s_out = np.array([1.5, 0.25, 4.0], np.float32)
  x_raw = _f32(_rng(21).normal(size=(B, N_LAYERS, D_IN)) * s_in[:, None])
  if kind == "clt":
    module = D.CrossLayerTranscoder(N_LAYERS, D_IN, D_SAE, activation=arch,
                                    k=5, target_l0=6.0)
    arrays = module.to_inference(p, s_in, s_out)
    scale_out = s_out
  else:
    module = D.Crosscoder(N_LAYERS, D_IN, D_SAE, causal=True,
                          activation=arch, k=4, target_l0=3.0)
    arrays = module.to_inference(p, s_in)
    scale_out = s_in
  want = (np.asarray(_apply(module, p, x_raw / s_in[:, None]).recon)
          * scale_out[:, None])
  d = multilayer.MultiLayerInference.from_arrays(
      kind, arrays, architecture=arch, k=module.k if arch == "topk" else None,
      hookpoints=tuple(f"layer_{i}/mlp_in" for i in range(N_LAYERS)),
      model_name="gemma-3-270m", metadata={"norm_scale": s_in.tolist()})
  np.testing.assert_allclose(d(x_raw), want, rtol=1e-4, atol=1e-4)
  folder = interop.save_multilayer_gemmascope2(d, tmp_path / kind)
  files = sorted(q.name for q in folder.iterdir())
  assert files == ["config.json"] + [f"params_layer_{i}.safetensors"
                                     for i in range(N_LAYERS)]
  from safetensors.numpy import load_file
  last = load_file(str(folder / f"params_layer_{N_LAYERS - 1}.safetensors"))
  assert last["w_dec"].shape == ((D_SAE, 1, D_IN) if kind == "clt"
                                 else (D_SAE, D_IN))
  back = interop.load_multilayer_gemmascope2(folder)
  for key in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
    np.testing.assert_array_equal(getattr(back, key), getattr(d, key))
  assert (back.kind, back.architecture, back.k) == (d.kind, d.architecture,
                                                    d.k)
  assert back.hookpoints == d.hookpoints and back.model_name == "gemma-3-270m"
  assert back.metadata["norm_scale"] == s_in.tolist()
  np.testing.assert_array_equal(back(x_raw), d(x_raw))


def test_multilayer_load_errors_are_named(tmp_path):
  d = multilayer.MultiLayerInference.from_arrays(
      "crosscoder", D.Crosscoder(N_LAYERS, D_IN, D_SAE, target_l0=3.0)
      .to_inference(_multi_params(0, "crosscoder"), 1.0))
  folder = interop.save_multilayer_gemmascope2(d, tmp_path / "cc")
  from safetensors.numpy import load_file, save_file
  f1 = folder / "params_layer_1.safetensors"
  arrays = load_file(str(f1))
  save_file({**arrays, "b_enc": arrays["b_enc"] + 1}, str(f1))
  with pytest.raises(interop.FormatError, match="params_layer_1.*b_enc"):
    interop.load_multilayer_gemmascope2(folder)
  save_file({**arrays, "w_enc": arrays["w_enc"][:, :3]}, str(f1))
  with pytest.raises(interop.FormatError, match="params_layer_1.*w_enc"):
    interop.load_multilayer_gemmascope2(folder)
  f1.unlink()
  with pytest.raises(FileNotFoundError, match="params_layer_1"):
    interop.load_multilayer_gemmascope2(folder)
  bad = d.w_dec.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(interop.FormatError, match="non-finite"):
    interop.save_multilayer_gemmascope2(
        multilayer.MultiLayerInference.from_arrays(
            "crosscoder", {"w_enc": d.w_enc, "w_dec": bad, "b_enc": d.b_enc,
                           "b_dec": d.b_dec, "threshold": d.threshold}),
        tmp_path / "nan")
  assert not (tmp_path / "nan").exists()


# ------------------------------------------------------------------- config


@pytest.mark.parametrize("arch,kwargs,cls,attrs", [
    ("jumprelu_transcoder", dict(target_l0=3.0, affine_skip=True, d_out=6),
     D.JumpReLUTranscoder, dict(affine_skip=True, pre_enc_bias=False,
                                d_out=6)),
    ("topk_transcoder", dict(k=3), D.TopKTranscoder,
     dict(k=3, pre_enc_bias=False)),
    ("jumprelu_crosscoder", dict(target_l0=3.0, n_layers=3, causal=True),
     D.Crosscoder, dict(n_layers=3, causal=True, activation="jumprelu")),
    ("topk_crosscoder", dict(k=3, n_layers=2), D.Crosscoder,
     dict(activation="topk", k=3, causal=False)),
    ("jumprelu_clt", dict(target_l0=30.0, n_layers=4), D.CrossLayerTranscoder,
     dict(n_layers=4, target_l0=30.0)),
    ("topk_clt", dict(k=30, n_layers=4), D.CrossLayerTranscoder,
     dict(activation="topk", k=30)),
])
def test_registry_builds_new_architectures(arch, kwargs, cls, attrs):
  assert set(D.DICTIONARIES) == set(D.ARCHITECTURES)
  cfg = D.DictConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, **kwargs)
  module = D.make_dictionary(cfg)
  assert type(module) is cls
  for key, value in attrs.items():
    assert getattr(module, key) == value, key
  params = D.init_params(module, jax.random.key(0))  # builds at these shapes
  assert "w_enc" in params


@pytest.mark.parametrize("field,kwargs", [
    ("pre_enc_bias", dict(architecture="jumprelu_transcoder", target_l0=1.0,
                          pre_enc_bias=True)),
    ("affine_skip", dict(architecture="jumprelu", target_l0=1.0,
                         affine_skip=True)),
    ("affine_skip", dict(architecture="jumprelu_clt", target_l0=1.0,
                         n_layers=2, affine_skip=True)),
    ("n_layers", dict(architecture="jumprelu_crosscoder", target_l0=1.0)),
    ("n_layers", dict(architecture="topk_clt", k=2, n_layers=0)),
    ("n_layers", dict(architecture="jumprelu", target_l0=1.0, n_layers=2)),
    ("causal", dict(architecture="jumprelu_clt", target_l0=1.0, n_layers=2,
                    causal=True)),
    ("causal", dict(architecture="topk_crosscoder", k=2, n_layers=D_SAE + 1,
                    causal=True)),
    ("d_out", dict(architecture="topk_crosscoder", k=2, n_layers=2,
                   d_out=D_IN + 1)),
    ("target_l0", dict(architecture="jumprelu_crosscoder", n_layers=2,
                       target_l0=float(D_SAE))),
    ("target_l0", dict(architecture="jumprelu_clt", n_layers=2,
                       target_l0=float(2 * D_SAE))),
    ("target_l0", dict(architecture="jumprelu_transcoder")),
    ("k", dict(architecture="topk_clt", n_layers=2, k=2 * D_SAE + 1)),
    ("k", dict(architecture="topk_transcoder")),
    ("l0_targets", dict(architecture="jumprelu_clt", n_layers=2,
                        l0_targets=(1.0,))),
    ("l0_targets", dict(architecture="jumprelu_clt", n_layers=2,
                        l0_targets=(1.0, float(D_SAE)))),
    ("l0_targets", dict(architecture="topk_clt", n_layers=2, k=2,
                        l0_targets=(1.0, 1.0))),
    ("l0_targets", dict(architecture="jumprelu_crosscoder", n_layers=2,
                        target_l0=1.0, l0_targets=(1.0, 1.0))),
    ("matryoshka_prefixes", dict(architecture="topk_crosscoder", k=2,
                                 n_layers=2, matryoshka_prefixes=(4, D_SAE))),
])
def test_bad_multilayer_configs_name_the_field(field, kwargs):
  with pytest.raises(ValueError, match=rf"DictConfig\.{field}:"):
    D.DictConfig(d_in=D_IN, d_sae=D_SAE, **kwargs)


def test_sae_configs_keep_their_defaults():
  assert D.DictConfig(d_in=D_IN, d_sae=D_SAE, target_l0=2.0).pre_enc_bias
  assert not D.DictConfig(d_in=D_IN, d_sae=D_SAE, target_l0=2.0,
                          pre_enc_bias=False).pre_enc_bias
  cfg = D.DictConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk_transcoder",
                     k=2)
  assert cfg.pre_enc_bias is False and cfg.n_layers is None
