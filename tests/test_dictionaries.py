"""Sparse dictionaries against closed forms computed independently in NumPy.

Every expected value here is re-derived from the published formulas (the
Gemma Scope 2 encode `pre = x @ w_enc + b_enc`, `f = relu(pre) *
(pre > threshold)`, decode `f @ w_dec + b_dec`, and the JumpReLU
straight-through estimators with a rectangle kernel), never by calling the
code under test a second way; shapes are tiny so the whole file runs in
seconds on a busy 2-core CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemscope_jax import dictionaries as D
from gemscope_jax.dictionaries import jumprelu, matryoshka

D_IN, D_SAE, B = 8, 16, 6


def _random_params(seed=0, *, d_in=D_IN, d_sae=D_SAE, d_out=None,
                   threshold=(0.05, 0.6)):
  d_out = d_in if d_out is None else d_out
  r = np.random.default_rng(seed)
  return {
      "w_enc": r.normal(size=(d_in, d_sae)).astype(np.float32) * 0.5,
      "w_dec": r.normal(size=(d_sae, d_out)).astype(np.float32) * 0.5,
      "b_enc": r.normal(size=(d_sae,)).astype(np.float32) * 0.2,
      "b_dec": r.normal(size=(d_out,)).astype(np.float32) * 0.3,
      "threshold": r.uniform(*threshold, size=(d_sae,)).astype(np.float32),
  }


def _x(seed=1, n=B, d=D_IN):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _apply(module, params, x, method=None, **kw):
  return module.apply({"params": params}, x, method=method, **kw)


def _loss(module, params, x, coeff=1.0):
  return D.compute_loss(module, params, x, sparsity_coeff=coeff)[0]


# ----------------------------------------------------------------- JumpReLU


def test_jumprelu_forward_matches_numpy():
  p, x = _random_params(), _x()
  out = _apply(D.JumpReLU(D_IN, D_SAE, target_l0=3.0), p, x)
  pre = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
  f = pre * (pre > p["threshold"])
  assert 0 < np.count_nonzero(f) < f.size
  np.testing.assert_allclose(out.pre_acts, pre, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.latents, f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.recon, f @ p["w_dec"] + p["b_dec"],
                             rtol=1e-5, atol=1e-5)


def _pre_near_threshold(eps, seed=2):
  """Pre-activations of which about half lie inside the STE window."""
  r = np.random.default_rng(seed)
  th = r.uniform(0.1, 1.0, size=(D_SAE,)).astype(np.float32)
  near = th + eps * r.uniform(-0.45, 0.45, size=(B, D_SAE))
  far = r.normal(size=(B, D_SAE))
  pre = np.where(r.random((B, D_SAE)) < 0.5, near, far).astype(np.float32)
  return pre, th


def test_jump_relu_and_step_custom_vjp_closed_forms():
  eps = 0.01
  pre, th = _pre_near_threshold(eps)
  g = np.random.default_rng(3).normal(size=pre.shape).astype(np.float32)
  rect = (np.abs((pre - th) / eps) < 0.5).astype(np.float32)
  assert rect.sum() > 10

  out, vjp = jax.vjp(lambda p, t: jumprelu.jump_relu(p, t, eps), pre, th)
  g_pre, g_th = vjp(g)
  np.testing.assert_allclose(out, pre * (pre > th))
  np.testing.assert_allclose(g_pre, g * (pre > th))
  np.testing.assert_allclose(g_th, np.sum(g * -(th / eps) * rect, axis=0),
                             rtol=1e-5)

  out, vjp = jax.vjp(lambda p, t: jumprelu.step(p, t, eps), pre, th)
  g_pre, g_th = vjp(g)
  np.testing.assert_allclose(out, (pre > th).astype(np.float32))
  np.testing.assert_array_equal(g_pre, np.zeros_like(pre))
  np.testing.assert_allclose(g_th, np.sum(g * -(1 / eps) * rect, axis=0),
                             rtol=1e-5)

  # The two-sided estimator: the mirror image reaches pre.
  wide = 4 * eps
  rect_wide = (np.abs((pre - th) / wide) < 0.5).astype(np.float32)
  assert rect_wide.sum() > rect.sum()
  out, vjp = jax.vjp(lambda p, t: jumprelu.step(p, t, eps, wide), pre, th)
  g_pre2, g_th2 = vjp(g)
  np.testing.assert_allclose(out, (pre > th).astype(np.float32))
  np.testing.assert_allclose(g_pre2, g * (1 / wide) * rect_wide, rtol=1e-6)
  np.testing.assert_array_equal(g_th2, g_th)


@pytest.mark.parametrize("penalty,preact_bandwidth", [
    ("quadratic", 0.0), ("l0", 0.0), ("quadratic", 0.6)])
def test_jumprelu_loss_gradients_closed_form(penalty, preact_bandwidth):
  """d loss / d {threshold, w_enc, w_dec, b_enc, b_dec} derived by hand
  (with `l0_preact_bandwidth` w, the penalty's d L0 / d pre =
  rect_w / w / B joins the reconstruction's d_pre)."""
  eps, target, coeff = 0.3, 3.0, 0.7
  p, x = _random_params(threshold=(0.1, 0.5)), _x()
  module = D.JumpReLU(D_IN, D_SAE, bandwidth=eps, target_l0=target,
                      sparsity_penalty=penalty, l0_preact_bandwidth=preact_bandwidth)
  grads = jax.grad(lambda q: _loss(module, q, x, coeff).total)(p)

  xc = x - p["b_dec"]
  pre = xc @ p["w_enc"] + p["b_enc"]
  th = p["threshold"]
  mask = (pre > th).astype(np.float32)
  rect = (np.abs((pre - th) / eps) < 0.5).astype(np.float32)
  assert rect.sum() > 5  # the STE terms below are not all zero
  f = pre * mask
  err = f @ p["w_dec"] + p["b_dec"] - x
  d_recon = 2 * err / B
  d_f = d_recon @ p["w_dec"].T
  l0 = mask.sum(1).mean()
  d_l0 = coeff * ((2 / target) * 2 * (l0 - target) if penalty == "quadratic"
                  else 1.0)
  d_pre = d_f * mask
  if preact_bandwidth:
    wide = (np.abs((pre - th) / preact_bandwidth) < 0.5).astype(np.float32)
    d_pre = d_pre + d_l0 * wide / preact_bandwidth / B
  want = {
      "threshold": (np.sum(d_f * -(th / eps) * rect, 0)
                    + d_l0 * np.sum(-(1 / eps) * rect, 0) / B),
      "w_enc": xc.T @ d_pre,
      "w_dec": f.T @ d_recon,
      "b_enc": d_pre.sum(0),
      "b_dec": d_recon.sum(0) - (d_pre @ p["w_enc"].T).sum(0),
  }
  for name, value in want.items():
    np.testing.assert_allclose(grads[name], value, rtol=2e-4, atol=1e-5,
                               err_msg=name)


def test_sparsity_penalties_equal_formulas():
  p, x = _random_params(), _x()
  pre = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
  l0 = (pre > p["threshold"]).sum(1).mean()
  coeff, target = 0.25, 2.0
  quad = _loss(D.JumpReLU(D_IN, D_SAE, target_l0=target), p, x, coeff)
  plain = _loss(D.JumpReLU(D_IN, D_SAE, sparsity_penalty="l0"), p, x, coeff)
  np.testing.assert_allclose(quad.aux["l0"], l0)
  np.testing.assert_allclose(quad.sparsity,
                             coeff * (2 / target) * (l0 - target) ** 2,
                             rtol=1e-6)
  np.testing.assert_allclose(plain.sparsity, coeff * l0, rtol=1e-6)
  f = pre * (pre > p["threshold"])
  mse = np.mean(np.sum((f @ p["w_dec"] + p["b_dec"] - x) ** 2, 1))
  np.testing.assert_allclose(quad.mse, mse, rtol=1e-5)
  np.testing.assert_allclose(quad.total, mse + quad.sparsity, rtol=1e-6)


def test_preact_loss_value_and_its_gradient_on_silent_latents():
  """coeff * mean_t sum_i relu(th_i - pre_ti): value and d/d{b_enc, th}."""
  coeff, eps = 0.01, 1e-4  # a tiny bandwidth: no STE terms in the gradient
  p, x = _random_params(threshold=(0.1, 0.5)), _x()
  p["b_enc"][:3] = -50.0  # three latents that never fire
  base = D.JumpReLU(D_IN, D_SAE, bandwidth=eps, sparsity_penalty="l0")
  with_pre = D.JumpReLU(D_IN, D_SAE, bandwidth=eps, sparsity_penalty="l0",
                        preact_coeff=coeff)
  pre = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
  gap = np.maximum(p["threshold"] - pre, 0.0)
  a, b = _loss(base, p, x, 0.0), _loss(with_pre, p, x, 0.0)
  np.testing.assert_allclose(b.aux["preact_loss"], gap.sum(1).mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(b.total - a.total, coeff * gap.sum(1).mean(),
                             rtol=1e-4)
  g = jax.grad(lambda q: _loss(with_pre, q, x, 0.0).total)(p)
  below = (pre < p["threshold"]).astype(np.float32)
  # Silent latents: no reconstruction gradient, only the pre-act term,
  # which pushes b_enc up and the threshold down at every token.
  np.testing.assert_allclose(g["b_enc"][:3], -coeff * below[:, :3].sum(0) / B,
                             rtol=1e-5)
  np.testing.assert_allclose(g["threshold"][:3], coeff * np.ones(3),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="preact_coeff"):
    D.DictConfig(d_in=4, d_sae=8, target_l0=2.0, preact_coeff=-1.0)


def test_threshold_stays_fp32_under_bf16_compute():
  module = D.JumpReLU(D_IN, D_SAE, target_l0=3.0, dtype=jnp.bfloat16)
  params = nn.unbox(D.init_params(module, jax.random.key(0)))
  assert all(v.dtype == jnp.float32 for v in params.values())
  x = jnp.asarray(_x(), jnp.bfloat16)
  out = _apply(module, params, x)
  assert out.recon.dtype == jnp.bfloat16
  assert out.pre_acts.dtype == out.latents.dtype == jnp.float32
  # Thresholds a bf16 ulp apart from the pre-activations still separate.
  th = out.pre_acts[0] - 1e-5
  params = {**params, "threshold": th}
  out = _apply(module, params, x)
  assert np.all(np.asarray(out.latents[0]) == np.asarray(out.pre_acts[0]))
  grads = jax.grad(lambda q: _loss(module, q, x).total)(params)
  assert grads["threshold"].dtype == jnp.float32
  opt = optax.adam(1e-3, b1=0.0)
  updates, _ = opt.update(grads, opt.init(params), params)
  assert optax.apply_updates(params, updates)["threshold"].dtype == jnp.float32


@pytest.mark.parametrize("pre_enc_bias,d_out,out_scale",
                         [(True, None, None), (False, 5, 0.4)])
def test_to_inference_reproduces_training_module_on_raw_inputs(
    pre_enc_bias, d_out, out_scale):
  s = 3.7
  p = _random_params(4, d_out=d_out)
  x_raw = _x(5) * s + 2.0
  module = D.JumpReLU(D_IN, D_SAE, d_out=d_out, pre_enc_bias=pre_enc_bias,
                      sparsity_penalty="l0")
  out = _apply(module, p, x_raw / s)
  s_out = s if out_scale is None else out_scale
  inf = {k: np.asarray(v) for k, v in
         module.to_inference(p, s, out_norm_scale=out_scale).items()}
  # The Gemma Scope 2 encode and decode, on raw activations.
  pre = x_raw @ inf["w_enc"] + inf["b_enc"]
  f = np.maximum(pre, 0) * (pre > inf["threshold"])
  recon = f @ inf["w_dec"] + inf["b_dec"]
  assert 0 < np.count_nonzero(f) < f.size
  np.testing.assert_array_equal(f > 0, np.asarray(out.latents) > 0)
  np.testing.assert_allclose(f, s_out * np.asarray(out.latents), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(recon, s_out * np.asarray(out.recon), rtol=1e-5,
                             atol=1e-5)
  # The module-free form agrees.
  again = jumprelu.to_inference(p, s, pre_enc_bias=pre_enc_bias,
                                out_norm_scale=out_scale)
  for k in inf:
    np.testing.assert_allclose(again[k], inf[k])


# ------------------------------------------------- shared parameter handling


def test_init_tied_unit_rows_threshold_and_biases():
  module = D.JumpReLU(D_IN, D_SAE, target_l0=3.0)
  p = nn.unbox(D.init_params(module, jax.random.key(0)))
  np.testing.assert_array_equal(p["w_enc"], p["w_dec"].T)
  np.testing.assert_allclose(np.linalg.norm(p["w_dec"], axis=1), 1, rtol=1e-6)
  np.testing.assert_array_equal(p["threshold"], np.full(D_SAE, 0.001,
                                                        np.float32))
  assert not np.any(p["b_enc"]) and not np.any(p["b_dec"])
  mean = np.arange(D_IN, dtype=np.float32)
  boxed = D.init_params(module, jax.random.key(0), b_dec=mean)
  np.testing.assert_array_equal(nn.unbox(boxed)["b_dec"], mean)
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["w_enc"]) == ("embed", "latent")
  assert tuple(specs["w_dec"]) == ("latent", "embed")
  assert tuple(specs["threshold"]) == ("latent",)


def test_normalize_decoder_and_project_grads():
  r = np.random.default_rng(6)
  p = _random_params(6)
  g = {k: r.normal(size=v.shape).astype(np.float32) for k, v in p.items()}
  unit = D.normalize_decoder(p)["w_dec"]
  np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-6)
  np.testing.assert_allclose(unit * np.linalg.norm(p["w_dec"], axis=1)[:, None],
                             p["w_dec"], rtol=1e-5)
  proj = D.project_decoder_grads(p, g)
  w = p["w_dec"]
  np.testing.assert_allclose(np.sum(proj["w_dec"] * w, 1), 0, atol=1e-5)
  # A direction orthogonal to row i sees the same gradient before and after.
  v = r.normal(size=w.shape)
  v -= np.sum(v * w, 1, keepdims=True) / np.sum(w * w, 1, keepdims=True) * w
  np.testing.assert_allclose(np.sum(proj["w_dec"] * v, 1),
                             np.sum(g["w_dec"] * v, 1), rtol=1e-4, atol=1e-5)
  for k in ("w_enc", "b_enc", "b_dec", "threshold"):
    np.testing.assert_array_equal(proj[k], g[k])
  # Boxed trees keep their boxes (and logical names) through both.
  boxed = D.init_params(D.TopK(D_IN, D_SAE, k=2), jax.random.key(1))
  assert isinstance(D.normalize_decoder(boxed)["w_dec"],
                    nn.LogicallyPartitioned)
  assert isinstance(D.project_decoder_grads(boxed, boxed)["w_dec"],
                    nn.LogicallyPartitioned)


def test_sparse_decode_hook_equals_dense():
  p, k = _random_params(7), 3
  module = D.TopK(D_IN, D_SAE, k=k)
  r = np.random.default_rng(8)
  idx = np.stack([r.choice(D_SAE, k, replace=False) for _ in range(B)])
  vals = r.uniform(0.1, 2, size=(B, k)).astype(np.float32)
  dense = np.zeros((B, D_SAE), np.float32)
  np.put_along_axis(dense, idx, vals, axis=1)
  np.testing.assert_allclose(
      _apply(module, p, vals, method="decode", indices=idx),
      dense @ p["w_dec"] + p["b_dec"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------- TopK/BatchTopK


def _positive_pre_params(seed):
  p = _random_params(seed)
  p["b_enc"] = p["b_enc"] + 5.0  # every pre-activation positive
  return p


def test_topk_keeps_k_largest_per_token():
  k, p, x = 3, _positive_pre_params(9), _x(10)
  out = _apply(D.TopK(D_IN, D_SAE, k=k), p, x)
  pre = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
  lat = np.asarray(out.latents)
  assert np.all(np.count_nonzero(lat, axis=1) == k)
  top = np.argsort(-pre, axis=1)[:, :k]
  for row in range(B):
    assert set(np.flatnonzero(lat[row])) == set(top[row])
  np.testing.assert_allclose(lat[lat > 0], np.maximum(pre, 0)[lat > 0],
                             rtol=1e-5)


def test_batchtopk_keeps_k_times_batch_largest():
  k, p, x = 2, _positive_pre_params(11), _x(12)
  out = _apply(D.BatchTopK(D_IN, D_SAE, k=k), p, x)
  pre = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
  lat = np.asarray(out.latents)
  assert np.count_nonzero(lat) == k * B
  assert len(set(np.count_nonzero(lat, axis=1))) > 1  # not per token
  kept = lat > 0
  assert pre[kept].min() > pre[~kept].max()
  np.testing.assert_allclose(lat[kept], pre[kept], rtol=1e-5)


def test_batchtopk_to_jumprelu_differs_only_between_threshold_and_batch_min():
  """The documented property of `global_threshold` / `to_inference`."""
  k, s = 3, 2.5
  p = _random_params(13)
  module = D.BatchTopK(D_IN, D_SAE, k=k)
  batches = [_x(20 + i, n=16) for i in range(4)]
  t = float(D.global_threshold(module, p, batches))
  mins = []
  for x in batches:
    lat = np.asarray(_apply(module, p, x).latents)
    mins.append(lat[lat > 0].min())
  np.testing.assert_allclose(t, np.mean(mins), rtol=1e-6)

  inf = {k_: np.asarray(v) for k_, v in
         module.to_inference(p, s, threshold=t).items()}
  for x, m_b in zip(batches, mins):
    x_raw = x * s
    pre = x_raw @ inf["w_enc"] + inf["b_enc"]
    f = np.maximum(pre, 0) * (pre > inf["threshold"])
    btk = s * np.asarray(_apply(module, p, x).latents)
    lo, hi = s * min(t, m_b), s * max(t, m_b)
    band = (np.maximum(pre, 0) >= lo * (1 - 1e-5)) & (
        np.maximum(pre, 0) <= hi * (1 + 1e-5))
    np.testing.assert_allclose(f[~band], btk[~band], rtol=1e-5, atol=1e-5)
  # On one batch the threshold is its own minimum: the strict '>' drops
  # exactly that one entry.
  one = D.global_threshold(module, p, batches[:1])
  lat = np.asarray(_apply(module, p, batches[0]).latents)
  inf = module.to_inference(p, 1.0, threshold=one)
  pre = batches[0] @ np.asarray(inf["w_enc"]) + np.asarray(inf["b_enc"])
  f = np.maximum(pre, 0) * (pre > np.asarray(inf["threshold"]))
  assert np.count_nonzero(f) == np.count_nonzero(lat) - 1


# ------------------------------------------------------- ReLU, Matryoshka


def test_relu_l1_loss_equals_formula():
  p, x, coeff = _random_params(14), _x(15), 0.3
  loss = _loss(D.ReLU(D_IN, D_SAE), p, x, coeff)
  pre = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
  f = np.maximum(pre, 0)
  mse = np.mean(np.sum((f @ p["w_dec"] + p["b_dec"] - x) ** 2, 1))
  l1 = np.mean(np.sum(f * np.linalg.norm(p["w_dec"], axis=1), 1))
  np.testing.assert_allclose(loss.mse, mse, rtol=1e-5)
  np.testing.assert_allclose(loss.sparsity, coeff * l1, rtol=1e-5)
  np.testing.assert_allclose(loss.total, mse + coeff * l1, rtol=1e-5)
  assert not D.ReLU.unit_decoder


@pytest.mark.parametrize("inner,reduction", [
    (D.JumpReLU(D_IN, D_SAE, target_l0=3.0), "mean"),
    (D.BatchTopK(D_IN, D_SAE, k=3), "sum"),
])
def test_matryoshka_loss_is_sum_over_prefixes(inner, reduction):
  prefixes, coeff = (2, 6, D_SAE), 0.5
  p, x = _random_params(16), _x(17)
  module = D.Matryoshka(inner, prefixes, reduction=reduction)
  loss = _loss(module, p, x, coeff)
  lat = np.asarray(_apply(inner, p, x).latents)
  assert np.count_nonzero(lat[:, :2]) and np.count_nonzero(lat[:, 6:])
  mses = [np.mean(np.sum((lat[:, :m] @ p["w_dec"][:m] + p["b_dec"] - x) ** 2,
                         1)) for m in prefixes]
  want = np.mean(mses) if reduction == "mean" else np.sum(mses)
  np.testing.assert_allclose(loss.aux["prefix_mse"], mses, rtol=1e-5)
  np.testing.assert_allclose(loss.mse, want, rtol=1e-5)
  plain = _loss(inner, p, x, coeff)
  np.testing.assert_allclose(loss.sparsity, plain.sparsity, rtol=1e-6)
  np.testing.assert_allclose(loss.total, want + plain.sparsity, rtol=1e-5)
  # Parameter names stay flat (the wrapper shares the inner scope).
  assert set(D.init_params(module, jax.random.key(0))) == set(
      D.init_params(inner, jax.random.key(0)))


# ------------------------------------------------------------ training run


def test_jumprelu_learns_synthetic_sparse_data():
  """x = sparse codes @ a unit dictionary; the published recipe recovers it."""
  d_in, d_sae, n_atoms, true_l0, batch, steps = 32, 64, 32, 4, 256, 500
  r = np.random.default_rng(0)
  atoms = r.normal(size=(n_atoms, d_in))
  atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
  n = batch * steps + 2048
  idx = np.argsort(r.random((n, n_atoms)), axis=1)[:, :true_l0]
  codes = np.zeros((n, n_atoms))
  np.put_along_axis(codes, idx, r.uniform(0.5, 1.5, (n, true_l0)), axis=1)
  data = codes @ atoms
  data = (data / np.sqrt(np.mean(np.sum(data ** 2, 1)))).astype(np.float32)
  train, held_out = data[:-2048], data[-2048:]

  module = D.JumpReLU(d_in, d_sae, target_l0=float(true_l0))
  params = nn.unbox(D.init_params(module, jax.random.key(0),
                                  b_dec=train.mean(0)))
  opt = optax.adam(3e-3, b1=0.0, b2=0.999)

  @jax.jit
  def step(params, opt_state, x):
    grads = jax.grad(lambda q: _loss(module, q, x).total)(params)
    grads = D.project_decoder_grads(params, grads)
    updates, opt_state = opt.update(grads, opt_state, params)
    return D.normalize_decoder(optax.apply_updates(params, updates)), opt_state

  opt_state = opt.init(params)
  for i in range(steps):
    x = train[i * batch:(i + 1) * batch]
    params, opt_state = step(params, opt_state, x)
  final = _loss(module, params, held_out)
  assert final.aux["fvu"] < 0.1, final.aux
  assert abs(final.aux["l0"] - true_l0) <= 0.3 * true_l0, final.aux


# ---------------------------------------------------------------- config


def test_registry_and_make_dictionary():
  assert set(D.DICTIONARIES) == set(D.ARCHITECTURES)
  cfg = D.DictConfig(d_in=D_IN, d_sae=D_SAE, architecture="batchtopk", k=4,
                     dtype="bfloat16")
  module = D.make_dictionary(cfg)
  assert type(module) is D.BatchTopK and module.k == 4
  assert module.dtype == jnp.bfloat16
  cfg = D.DictConfig(d_in=D_IN, d_sae=D_SAE, target_l0=3.0,
                     matryoshka_prefixes=[4, D_SAE])
  module = D.make_dictionary(cfg)
  assert isinstance(module, D.Matryoshka) and module.prefixes == (4, D_SAE)
  assert module.dictionary.target_l0 == 3.0


@pytest.mark.parametrize("field,kwargs", [
    ("k", dict(architecture="topk", k=D_SAE + 1)),
    ("k", dict(architecture="batchtopk")),
    ("target_l0", dict(target_l0=0.0)),
    ("target_l0", dict(target_l0=float(D_SAE))),
    ("target_l0", dict()),
    ("d_sae", dict(d_sae=0, target_l0=1.0)),
    ("sparsity_penalty", dict(sparsity_penalty="l1", target_l0=1.0)),
    ("bandwidth", dict(bandwidth=0.0, target_l0=1.0)),
    ("architecture", dict(architecture="gated")),
    ("pre_enc_bias", dict(d_out=4, target_l0=1.0)),
    ("dtype", dict(dtype="int8", target_l0=1.0)),
    ("matryoshka_prefixes", dict(matryoshka_prefixes=(8, 4, D_SAE),
                                 target_l0=1.0)),
])
def test_config_validation_names_the_field(field, kwargs):
  kwargs = {"d_in": D_IN, "d_sae": D_SAE, **kwargs}
  with pytest.raises(ValueError, match=rf"DictConfig\.{field}\b"):
    D.DictConfig(**kwargs)
