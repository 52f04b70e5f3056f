"""The hand-derived dense JumpReLU step and its fused CPU kernel.

`kernels.jumprelu_grad` (C++) against its jnp form and against float64
numpy; `dense.loss_and_grads` against `jax.value_and_grad(compute_loss)` for
JumpReLU SAEs (both penalties, with and without the pre-activation loss),
JumpReLU transcoders (with and without the affine skip), both with the
rank-k dense path, and TopK SAEs and transcoders, with the kernel and
without.
Thresholds are put at per-latent quantiles of the pre-activations and the
bandwidth is wide, so every case has active pairs, inactive pairs and pairs
inside the straight-through window (asserted), i.e. every gradient term is
exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax import kernels
from gemscope_jax.dictionaries import _base
from gemscope_jax.training.grads import dense
from gemscope_jax.dictionaries import jumprelu as jumprelu_lib
from gemscope_jax.dictionaries import topk as topk_lib
from gemscope_jax.kernels import jumprelu as jumprelu_kernel

from step_helpers import jitted_update

T, D_IN, D_SAE = 96, 24, 600  # 600 latents: a partial 512-latent block


def _numpy_grad(g_f, pre, th, bandwidth, below_grad):
  g_f, pre, th = (np.asarray(a, np.float64) for a in (g_f, pre, th))
  act, below = pre > th, pre < th
  win = np.abs((pre - th) / bandwidth) < 0.5
  g_pre = np.where(act, g_f, np.where(below, below_grad, 0.0))
  sums = np.stack([(win * g_f).sum(0), win.sum(0), act.sum(0), g_pre.sum(0),
                   below.sum(0), (below * (th - pre)).sum(0)])
  return g_pre, sums


def test_kernel_is_built():
  assert jumprelu_kernel.available(), (
      f"fused JumpReLU kernel unavailable: "
      f"{jumprelu_kernel.unavailable_reason()}. The setup must install g++.")


@pytest.mark.parametrize("shape", [(T, D_SAE), (5, 3), (1, 1030)])
def test_kernel_matches_numpy_and_reference(shape):
  rng = np.random.default_rng(0)
  xw = rng.normal(size=shape).astype(np.float32)
  bias = rng.normal(size=shape[1:]).astype(np.float32) * 0.1
  th = np.abs(rng.normal(size=shape[1:])).astype(np.float32) * 0.5
  n = min(3, shape[1])
  xw[0, :n] = th[:n] - bias[:n]  # pre == threshold (up to rounding)
  pre = xw + bias  # float32, as the kernel adds them
  g_f = rng.normal(size=shape).astype(np.float32)
  bw, below = 0.4, -0.01
  fn = jax.jit(lambda g, p, t, b: kernels.jumprelu_grad(
      g, p, t, bandwidth=bw, below_grad=below, bias=b))
  assert jumprelu_kernel.FFI_TARGET in fn.lower(g_f, xw, th, bias).as_text()
  g_pre, sums = fn(g_f, xw, th, bias)
  want_g, want_s = _numpy_grad(g_f, pre, th, bw, below)
  np.testing.assert_array_equal(np.asarray(g_pre), want_g.astype(np.float32))
  np.testing.assert_allclose(np.asarray(sums), want_s, rtol=1e-5, atol=1e-5)
  ref_g, ref_s = jumprelu_kernel.reference(g_f, xw, th, bias, bandwidth=bw,
                                           below_grad=below)
  np.testing.assert_array_equal(np.asarray(g_pre), np.asarray(ref_g))
  np.testing.assert_allclose(np.asarray(sums), np.asarray(ref_s), rtol=1e-5,
                             atol=1e-5)
  # The counts are exact.
  np.testing.assert_array_equal(np.asarray(sums)[[1, 2, 4]], want_s[[1, 2, 4]])


def test_kernel_rejects_bad_shapes():
  with pytest.raises(ValueError, match="threshold"):
    kernels.jumprelu_grad(jnp.ones((4, 5)), jnp.ones((4, 5)), jnp.ones(4),
                          bandwidth=0.1)
  with pytest.raises(ValueError, match="g_f"):
    kernels.jumprelu_grad(jnp.ones((4, 6)), jnp.ones((4, 5)), jnp.ones(5),
                          bandwidth=0.1)
  with pytest.raises(ValueError, match="bias"):
    kernels.jumprelu_grad(jnp.ones((4, 5)), jnp.ones((4, 5)), jnp.ones(5),
                          bandwidth=0.1, bias=jnp.ones(4))


def _quantile_thresholds(module, params, x, frac):
  """Each latent's threshold at its (1 - frac) quantile over the batch."""
  pre = np.asarray(module.apply({"params": params}, x, method="pre_acts"))
  return jnp.asarray(np.maximum(np.quantile(pre, 1 - frac, axis=0), 0.0),
                     jnp.float32)


CASES = {
    "sae_quadratic": dict(cls=jumprelu_lib.JumpReLU, kw=dict(
        sparsity_penalty="quadratic", target_l0=40.0)),
    "sae_quadratic_preact": dict(cls=jumprelu_lib.JumpReLU, kw=dict(
        sparsity_penalty="quadratic", target_l0=40.0, preact_coeff=1e-3)),
    "sae_l0": dict(cls=jumprelu_lib.JumpReLU, kw=dict(sparsity_penalty="l0")),
    # Thresholds at each latent's 90th percentile: every latent fires on
    # about 10 % of tokens, above max_freq.
    "sae_high_freq": dict(cls=jumprelu_lib.JumpReLU, kw=dict(
        target_l0=40.0, freq_coeff=3.0, max_freq=0.05)),
    "transcoder_high_freq": dict(cls=jumprelu_lib.JumpReLUTranscoder, kw=dict(
        d_out=16, target_l0=40.0, freq_coeff=3.0, max_freq=0.08)),
    "transcoder": dict(cls=jumprelu_lib.JumpReLUTranscoder, kw=dict(
        d_out=16, target_l0=40.0)),
    "transcoder_skip_preact": dict(cls=jumprelu_lib.JumpReLUTranscoder, kw=dict(
        d_out=16, target_l0=40.0, affine_skip=True, preact_coeff=1e-3)),
    # The rank-k dense path (`Dictionary.dense`), with the high-frequency
    # term it is meant to go with.
    "sae_dense_path_high_freq": dict(cls=jumprelu_lib.JumpReLU, kw=dict(
        target_l0=40.0, dense_rank=3, freq_coeff=3.0, max_freq=0.05)),
    "transcoder_dense_path": dict(cls=jumprelu_lib.JumpReLUTranscoder, kw=dict(
        d_out=16, target_l0=40.0, dense_rank=2, preact_coeff=1e-3)),
    "topk": dict(cls=topk_lib.TopK, kw=dict(k=30)),
    "topk_transcoder_skip": dict(cls=topk_lib.TopKTranscoder, kw=dict(
        k=30, d_out=16, affine_skip=True)),
    # More latents than positive pre-activations: zeros among the k kept.
    "topk_sparse_rows": dict(cls=topk_lib.TopK, kw=dict(k=400)),
}


def _case(name, seed=0):
  spec = CASES[name]
  kw = dict(spec["kw"])
  if "topk" not in name:
    kw["bandwidth"] = 0.05
  module = spec["cls"](d_in=D_IN, d_sae=D_SAE, **kw)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(T, D_IN)) + 0.3, jnp.float32)
  target = None
  if module.d_out is not None:
    target = jnp.asarray(rng.normal(size=(T, module.d_out)), jnp.float32)
  params = {k: _base.leaf_value(v) for k, v in
            _base.init_params(module, jax.random.PRNGKey(seed)).items()}
  params["b_enc"] = jnp.asarray(rng.normal(size=D_SAE) * 0.1, jnp.float32)
  params["b_dec"] = jnp.asarray(rng.normal(size=module.out_dim) * 0.1,
                                jnp.float32)
  if module.affine_skip:
    params["w_skip"] = jnp.asarray(
        rng.normal(size=(D_IN, module.out_dim)) * 0.1, jnp.float32)
  if module.dense_rank:  # zero at init, which would hide w_dense_in's grad
    params["w_dense_out"] = jnp.asarray(
        rng.normal(size=(module.dense_rank, module.out_dim)) * 0.1,
        jnp.float32)
  if "threshold" in params:
    params["threshold"] = _quantile_thresholds(module, params, x, 0.1)
  return module, params, x, target


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_and_grads_match_autodiff(name, use_kernel):
  module, params, x, target = _case(name)
  coeff = 0.7

  def loss_fn(p):
    lo, out = _base.compute_loss(module, p, x, sparsity_coeff=coeff,
                                 target=target)
    return lo.total, (lo, out)
  (_, (want, out)), want_g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  got, recon, grads, fired = jax.jit(
      lambda p: dense.loss_and_grads(module, p, x, sparsity_coeff=coeff,
                                     target=target, use_kernel=use_kernel)
  )(params)

  # Every term is exercised: firing, silent and in-window pairs.
  pre = np.asarray(out.pre_acts)
  if "threshold" in params:
    th = np.asarray(params["threshold"])
    assert 0.02 < (pre > th).mean() < 0.5
    assert (np.abs(pre - th) < 0.025).sum() > 50
  elif name == "topk_sparse_rows":  # Some of the k kept are zero.
    assert ((np.asarray(out.latents) > 0).sum(-1) < module.k).all()

  for k in ("total", "mse", "sparsity"):
    np.testing.assert_allclose(float(getattr(got, k)), float(getattr(want, k)),
                               rtol=2e-5, err_msg=k)
  assert set(got.aux) == set(want.aux)
  for k in want.aux:
    np.testing.assert_allclose(float(got.aux[k]), float(want.aux[k]),
                               rtol=2e-5, err_msg=k)
  np.testing.assert_allclose(np.asarray(recon), np.asarray(out.recon),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(fired),
                                (np.asarray(out.latents) > 0).sum(0))
  assert set(grads) == set(want_g)
  for k in want_g:
    scale = float(jnp.max(jnp.abs(want_g[k])))
    assert scale > 0, k
    np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(want_g[k]),
                               rtol=1e-4, atol=2e-5 * scale, err_msg=k)


def test_train_step_uses_the_kernel_and_tracks_autodiff():
  """The trainer's dense update (kernel) follows the autodiff update."""
  import optax  # pylint: disable=import-outside-toplevel
  module, params, _, _ = _case("sae_quadratic_preact")
  opt = optax.adam(1e-3, b1=0.0, b2=0.999)
  fast = jitted_update(module, opt, method="dense")
  slow = jitted_update(module, opt, method="autodiff")
  x0 = jnp.asarray(np.random.default_rng(5).normal(size=(T, D_IN)),
                   jnp.float32)
  hlo = fast.lower(params, opt.init(params), x0, 0.5).as_text()
  assert jumprelu_kernel.FFI_TARGET in hlo
  assert "gemscope_onednn_matmul" in hlo  # the five matmuls on oneDNN
  assert jumprelu_kernel.FFI_TARGET not in slow.lower(
      params, opt.init(params), x0, 0.5).as_text()
  copy = lambda t: jax.tree.map(jnp.array, t)  # pylint: disable=unnecessary-lambda-assignment
  pf, sf = copy(params), opt.init(params)
  ps, ss = copy(params), opt.init(params)
  for i in range(5):
    x = jnp.asarray(np.random.default_rng(10 + i).normal(size=(T, D_IN)) + 0.3,
                    jnp.float32)
    pf, sf, mf = fast(pf, sf, x, 0.5)
    ps, ss, ms = slow(ps, ss, x, 0.5)
    for k in ms:
      np.testing.assert_allclose(float(mf[k]), float(ms[k]), rtol=1e-4,
                                 err_msg=k)
  for k in ps:
    np.testing.assert_allclose(np.asarray(pf[k]), np.asarray(ps[k]),
                               rtol=1e-4, atol=1e-5, err_msg=k)


def test_unsupported_modules_are_refused():
  bf16 = jumprelu_lib.JumpReLU(d_in=4, d_sae=8, target_l0=2.0,
                               dtype=jnp.bfloat16)
  assert not dense.supported(bf16)
  per_token = jumprelu_lib.JumpReLU(d_in=4, d_sae=8, target_l0=2.0,
                                    l0_per_token=True)
  assert not dense.supported(per_token)
  with pytest.raises(ValueError, match="bfloat16"):
    dense.loss_and_grads(bf16, {}, jnp.ones((2, 4)), sparsity_coeff=1.0)
