"""Training options that depart from the published recipe (the SAELens
comparison, benchmarks/quality_vs_saelens.py), checked against closed forms
or an independent optax computation: the per-token quadratic L0 penalty,
global gradient clipping, free decoder rows and the initial encoder /
decoder norm. Tiny shapes, no Gemma weights: seconds on a CPU."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemscope_jax import dictionaries as D
from gemscope_jax.dictionaries import jumprelu
from gemscope_jax.training import config as config_lib
from gemscope_jax.training import optim, plans
from gemscope_jax.training.step import Run
from gemscope_jax.training.update import apply_update

ROOT = pathlib.Path(__file__).resolve().parents[1]
D_IN, D_SAE, B = 8, 16, 6


def _params(seed=0):
  r = np.random.default_rng(seed)
  return {
      "w_enc": r.normal(size=(D_IN, D_SAE)).astype(np.float32) * 0.5,
      "w_dec": r.normal(size=(D_SAE, D_IN)).astype(np.float32) * 0.5,
      "b_enc": r.normal(size=(D_SAE,)).astype(np.float32) * 0.2,
      "b_dec": r.normal(size=(D_IN,)).astype(np.float32) * 0.3,
      "threshold": r.uniform(0.1, 0.5, size=(D_SAE,)).astype(np.float32),
  }


def _x(seed=1):
  return np.random.default_rng(seed).normal(size=(B, D_IN)).astype(np.float32)


def test_per_token_quadratic_penalty_value_and_threshold_grad():
  """mean_t c (2/L*) (l0_t - L*)^2 and its straight-through threshold
  gradient c (4/L*) / B sum_t (l0_t - L*) (-(1/eps) rect_tj), by hand."""
  eps, target, coeff = 0.3, 3.0, 0.7
  p, x = _params(), _x()
  pre = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
  th = p["threshold"]

  def pen(t, per_token):
    return jumprelu.penalty_terms(
        jnp.asarray(pre), t, bandwidth=eps, kind="quadratic",
        sparsity_coeff=coeff, target_l0=target, preact_coeff=0.0,
        per_token=per_token)[0]

  l0_t = (pre > th).sum(1).astype(np.float64)
  rect = (np.abs((pre - th) / eps) < 0.5).astype(np.float64)
  assert rect.sum() > 5 and l0_t.std() > 0.5  # the two forms differ here
  want = np.mean(coeff * (2 / target) * (l0_t - target) ** 2)
  np.testing.assert_allclose(pen(jnp.asarray(th), True), want, rtol=1e-5)
  # The batch-mean form is smaller by exactly c (2/L*) Var_t(l0_t).
  np.testing.assert_allclose(pen(jnp.asarray(th), False),
                             want - coeff * (2 / target) * l0_t.var(),
                             rtol=1e-5)
  grad = jax.grad(lambda t: pen(t, True))(jnp.asarray(th))
  want_g = (coeff * (4 / target) / B
            * np.sum((l0_t - target)[:, None] * -(1 / eps) * rect, 0))
  np.testing.assert_allclose(grad, want_g, rtol=1e-5, atol=1e-6)


def test_per_token_module_loss_matches_penalty_terms():
  """JumpReLU(l0_per_token=True).loss adds the per-token penalty."""
  eps, target, coeff = 0.3, 3.0, 0.7
  p, x = _params(), _x()
  module = D.JumpReLU(D_IN, D_SAE, bandwidth=eps, target_l0=target,
                      l0_per_token=True)
  lo, _ = D.compute_loss(module, p, jnp.asarray(x), sparsity_coeff=coeff)
  pre = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
  l0_t = (pre > p["threshold"]).sum(1)
  np.testing.assert_allclose(
      lo.sparsity, np.mean(coeff * (2 / target) * (l0_t - target) ** 2),
      rtol=1e-5)


def _config(extra=""):
  c = config_lib.load(f"{ROOT}/experiments/jumprelu_270m.py")
  return config_lib.apply_overrides(c, config_lib.parse_arg(
      "train.num_tokens=5120,train.batch_size=512,train.lr_warmup_steps=0,"
      + extra))


def test_grad_clip_equals_adam_on_clipped_gradients():
  """Two steps: Adam(b1=0) on g / max(1, |g|/clip), by hand."""
  c = _config("train.grad_clip_norm=1.0")
  tx = optim.make_optimizer(plans.make(c).optimizer)
  r = np.random.default_rng(3)
  grads = [{"a": r.normal(size=(5,)).astype(np.float32) * s,
            "b": r.normal(size=(3,)).astype(np.float32) * s}
           for s in (10.0, 0.1)]
  params = {"a": np.zeros(5, np.float32), "b": np.zeros(3, np.float32)}
  state = tx.init(params)
  lr, b2, eps = c.train.lr, c.train.beta2, 1e-8
  v = {k: 0.0 for k in params}
  for i, g in enumerate(grads):
    updates, state = tx.update(g, state, params)
    norm = np.sqrt(sum(np.sum(np.square(a)) for a in g.values()))
    for k in params:
      gc = g[k] * min(1.0, 1.0 / norm)
      v[k] = b2 * v[k] + (1 - b2) * gc.astype(np.float64) ** 2
      vhat = v[k] / (1 - b2 ** (i + 1))
      want = -lr * gc / (np.sqrt(vhat) + eps)
      np.testing.assert_allclose(updates[k], want, rtol=1e-5, err_msg=k)
  # The second step's gradient was not clipped but the first's was: without
  # clipping the second update would be ~100x smaller in this Adam state.
  assert np.max(np.abs(updates["a"])) > 0.1 * lr


def test_free_decoder_update_is_plain_optax():
  """unit_decoder=False: no gradient projection, no renormalisation (the
  threshold is still kept >= 0); the default keeps unit rows."""
  p, x = _params(), _x()
  module = D.JumpReLU(D_IN, D_SAE, bandwidth=0.3, target_l0=3.0)
  grads = jax.grad(lambda q: D.compute_loss(
      module, q, jnp.asarray(x), sparsity_coeff=0.5)[0].total)(p)
  opt = optax.sgd(0.1)
  free, _ = apply_update(module, opt, p, opt.init(p), grads,
                           unit_decoder=False)
  for k in ("w_enc", "w_dec", "b_enc", "b_dec"):
    np.testing.assert_allclose(free[k], p[k] - 0.1 * np.asarray(grads[k]),
                               rtol=1e-6, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(
      free["threshold"],
      np.maximum(p["threshold"] - 0.1 * np.asarray(grads["threshold"]), 0))
  unit, _ = apply_update(module, opt, p, opt.init(p), grads)
  np.testing.assert_allclose(np.linalg.norm(unit["w_dec"], axis=1), 1.0,
                             rtol=1e-6)


def test_init_norm_scales_encoder_and_decoder():
  """train.init_norm: every decoder row and encoder column has that norm at
  init, still tied (W_enc = W_dec^T); the main job uses 0.3."""
  c = _config("width=64")
  assert c.train.init_norm == 0.3
  run = Run.from_config(c, devices=jax.devices()[:1])
  d = run.dict_config.d_in
  state = run.init(jax.random.key(0), jnp.zeros((d,)), jnp.asarray(1.0),
                   jnp.asarray(1.0))
  w_enc, w_dec = np.asarray(state.params["w_enc"]), np.asarray(
      state.params["w_dec"])
  np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 0.3, rtol=1e-5)
  np.testing.assert_allclose(w_enc, w_dec.T)
  c1 = _config("width=64,train.init_norm=1.0")
  run1 = Run.from_config(c1, devices=jax.devices()[:1])
  state1 = run1.init(jax.random.key(0), jnp.zeros((d,)), jnp.asarray(1.0),
                     jnp.asarray(1.0))
  np.testing.assert_allclose(np.asarray(state1.params["w_dec"]) * 0.3, w_dec,
                             rtol=1e-5, atol=1e-7)


def test_high_frequency_penalty_value_and_threshold_grad():
  """c * sum_i (relu(f_i - m) / m)^2 with f_i latent i's batch firing
  frequency, and its straight-through threshold gradient
  c * 2 relu(f_i - m) / m^2 * (1 / B) sum_t -(1/eps) rect_ti, by hand;
  latents at or below m get no gradient from it."""
  eps, coeff, fc, m = 0.3, 0.7, 4.0, 0.3
  p, x = _params(), _x()
  pre = (x - p["b_dec"]) @ p["w_enc"] + p["b_enc"]
  th = p["threshold"]

  def pen(t, freq_coeff):
    return jumprelu.penalty_terms(
        jnp.asarray(pre), t, bandwidth=eps, kind="l0", sparsity_coeff=coeff,
        target_l0=None, preact_coeff=0.0, freq_coeff=freq_coeff,
        max_freq=m)

  f = (pre > th).mean(0)
  rect = (np.abs((pre - th) / eps) < 0.5).astype(np.float64)
  over = np.maximum(f - m, 0) / m
  # Some latents above m with pairs in their window, some below.
  assert ((over > 0) & (rect.sum(0) > 0)).sum() >= 2 and (over == 0).sum() >= 2
  base, _ = pen(jnp.asarray(th), 0.0)
  total, aux = pen(jnp.asarray(th), fc)
  np.testing.assert_allclose(aux["high_freq_loss"], np.sum(over ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(total - base, coeff * fc * np.sum(over ** 2),
                             rtol=1e-5)
  grad = (jax.grad(lambda t: pen(t, fc)[0])(jnp.asarray(th))
          - jax.grad(lambda t: pen(t, 0.0)[0])(jnp.asarray(th)))
  want = coeff * fc * 2 * over / m * (-(1 / eps) * rect.mean(0))
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(grad)[over == 0] == 0)


def test_high_frequency_penalty_removes_a_known_dense_latent():
  """A tiny synthetic problem: 24 sparse features (each on 4 % of tokens)
  and one dense feature (on 50 %). Trained without the penalty, the SAE
  gives the dense feature a latent that fires on about half the tokens;
  with freq_coeff=10, max_freq=0.1, no latent fires on more than 10 %, and
  L0 stays at its target."""
  d, n_sparse, width, t = 16, 24, 32, 1024
  rng = np.random.default_rng(0)
  dirs = rng.normal(size=(n_sparse + 1, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  rates = np.r_[np.full(n_sparse, 0.04), 0.5]

  def batch(r):
    mag = r.uniform(0.5, 1.5, (t, n_sparse + 1)) * (r.random(
        (t, n_sparse + 1)) < rates)
    x = mag @ dirs
    return jnp.asarray(x / np.sqrt(np.mean(np.sum(x ** 2, 1))), jnp.float32)

  from step_helpers import jitted_update  # pylint: disable=import-outside-toplevel
  results = {}
  for fc in (0.0, 10.0):
    module = D.JumpReLU(d, width, bandwidth=0.01, target_l0=1.5,
                        freq_coeff=fc, max_freq=0.1)
    params = {k: D.leaf_value(v) for k, v in
              D.init_params(module, jax.random.PRNGKey(0)).items()}
    opt = optax.adam(3e-3, b1=0.0, b2=0.999)
    state, update = opt.init(params), jitted_update(module, opt,
                                                    method="dense")
    r = np.random.default_rng(1)
    for i in range(1500):
      params, state, _ = update(params, state, batch(r),
                                jnp.float32(min(1.0, i / 300)))
    out = module.apply({"params": params}, batch(np.random.default_rng(99)))
    freq = np.asarray((out.latents > 0).mean(0))
    w = np.asarray(params["w_dec"])
    cos = w @ dirs[-1] / np.linalg.norm(w, axis=1)
    results[fc] = freq, cos
  freq, cos = results[0.0]
  top = int(np.argmax(freq))
  assert freq[top] > 0.4 and cos[top] > 0.95  # the dense feature's latent
  freq, cos = results[10.0]
  assert freq.max() <= 0.105, freq.max()
  assert abs(freq.sum() - 1.5) < 0.2


def test_freq_scale_is_off_then_a_linear_ramp():
  """train.freq_start_step: 0 for the steps before the start (`step`
  counts the steps taken), then (step + 1 - start) / sparsity_warmup_steps
  up to 1."""
  sp = plans.make(_config(
      "dictionary.freq_coeff=0.1,train.freq_start_step=40,"
      "train.sparsity_warmup_steps=20")).step
  got = [float(optim.freq_scale(sp, jnp.int32(s))) for s in
         (0, 38, 39, 40, 49, 58, 59, 500)]
  assert got == pytest.approx([0, 0, 0, 1 / 20, 10 / 20, 19 / 20, 1, 1])


def test_late_frequency_term_leaves_earlier_steps_exactly_alone():
  """With freq_start_step = S, the steps before S are bit for bit those of
  a run without the term (its coefficient is 0 there, not merely small),
  and the steps after it differ; with the term from step 0 the first
  steps already differ."""
  rng = np.random.default_rng(0)
  offset = rng.normal(size=640).astype(np.float32) * 3
  xs = [rng.normal(size=(512, 640)).astype(np.float32) * 2 + offset
        for _ in range(6)]

  def params_after(extra, steps):
    c = _config("width=64,train.sparsity_warmup_steps=2" + extra)
    run = Run.from_config(c, devices=jax.devices()[:1])
    state = run.init(jax.random.key(0), jnp.asarray(offset / 8),
                     jnp.float32(8.0), jnp.float32(8.0))
    out = []
    for i in range(steps):
      state, _ = run.step(state, {"x": xs[i]})
      out.append(jax.device_get(state.params))
    return out

  plain = params_after("", 6)
  late = params_after(",dictionary.freq_coeff=5.0,train.freq_start_step=3", 6)
  early = params_after(",dictionary.freq_coeff=5.0", 1)
  for i in range(3):  # steps 0-2: the term is off
    for k in plain[i]:
      np.testing.assert_array_equal(late[i][k], plain[i][k], err_msg=(i, k))
  assert not np.array_equal(late[5]["threshold"], plain[5]["threshold"])
  assert not np.array_equal(early[0]["threshold"], plain[0]["threshold"])
