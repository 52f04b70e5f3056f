"""Parity of the sparse training step with the dense `value_and_grad`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemscope_jax.dictionaries import BatchTopK, JumpReLU, TopK
from gemscope_jax.dictionaries import _base
from gemscope_jax.training.grads import sparse

from step_helpers import jitted_update

D_IN, D_SAE, B = 32, 256, 64
EPS = 0.05
CAP = B * 128  # Room for every selected pair at these settings.


def _params(module, seed=0):
  params = _base.init_params(module, jax.random.PRNGKey(seed))
  params = {k: _base.leaf_value(v) for k, v in params.items()}
  key = jax.random.PRNGKey(seed + 1)
  k1, k2, k3 = jax.random.split(key, 3)
  params["b_enc"] = 0.05 * jax.random.normal(k1, (D_SAE,))
  params["b_dec"] = 0.1 * jax.random.normal(k2, (D_IN,))
  if "threshold" in params:
    params["threshold"] = jax.random.uniform(k3, (D_SAE,), minval=0.2,
                                             maxval=0.5)
  return params


def _x(seed=2, n=B):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, D_IN)) * 0.5


def _set_window(module, params, x):
  """Thresholds moved so that many pre-activations sit inside the window."""
  _, pre = sparse._pre_acts(module, params, x)  # pylint: disable=protected-access
  # Put each latent's threshold just below one of its pre-activations, so
  # that entry (and any close neighbour) lies in |pre - th| < eps / 2.
  th = jnp.maximum(pre[3] - 0.3 * EPS, 0.05)
  return {**params, "threshold": th}


def _check(module, params, x, coeff, capacity=CAP):
  dense_loss, dense_recon, dense_grads = sparse.dense_loss_and_grads(
      module, params, x, sparsity_coeff=coeff)
  fn = jax.jit(lambda p, x: sparse.sparse_loss_and_grads(
      module, p, x, sparsity_coeff=coeff, capacity=capacity))
  loss, out, grads = fn(params, x)
  np.testing.assert_allclose(loss.total, dense_loss.total, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(loss.mse, dense_loss.mse, rtol=1e-5)
  np.testing.assert_allclose(loss.sparsity, dense_loss.sparsity, rtol=1e-5,
                             atol=1e-7)
  for name in ("l0", "fvu"):
    np.testing.assert_allclose(loss.aux[name], dense_loss.aux[name],
                               rtol=1e-5)
  np.testing.assert_allclose(out.recon, dense_recon, rtol=1e-5, atol=1e-5)
  assert set(grads) == set(dense_grads)
  for name, g in dense_grads.items():
    scale = float(jnp.max(jnp.abs(g))) + 1e-12
    np.testing.assert_allclose(grads[name], g, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=name)
  return loss, dense_grads


def test_compact_matches_nonzero():
  mask = jax.random.uniform(jax.random.PRNGKey(0), (37, 96)) < 0.07
  for cap in (5, 64, 400):
    idx, total = jax.jit(sparse.compact, static_argnums=1)(mask, cap)
    ref = jnp.nonzero(mask.reshape(-1), size=cap, fill_value=0)[0]
    assert int(total) == int(mask.sum())
    np.testing.assert_array_equal(idx, ref)


@pytest.mark.parametrize("penalty", ["quadratic", "l0"])
def test_jumprelu_parity(penalty):
  module = JumpReLU(d_in=D_IN, d_sae=D_SAE, bandwidth=EPS,
                    sparsity_penalty=penalty, target_l0=8.0)
  x = _x()
  params = _set_window(module, _params(module), x)
  loss, dense_grads = _check(module, params, x, coeff=0.3)
  # The list spans several chunks of the loop that walks it.
  assert float(loss.aux["n_selected"]) > 2 * sparse.CHUNK
  assert float(loss.aux["overflow"]) == 0.0
  # The window is populated: the threshold gradient is far from zero.
  assert float(jnp.max(jnp.abs(dense_grads["threshold"]))) > 1.0


def test_jumprelu_overflow_falls_back_exactly():
  module = JumpReLU(d_in=D_IN, d_sae=D_SAE, bandwidth=EPS, target_l0=8.0)
  x = _x()
  params = _set_window(module, _params(module), x)
  loss, _ = _check(module, params, x, coeff=0.3, capacity=B * 2)
  assert float(loss.aux["overflow"]) == 1.0
  assert float(loss.aux["n_selected"]) > B * 2


@pytest.mark.parametrize("cls", [TopK, BatchTopK])
def test_topk_parity(cls):
  module = cls(d_in=D_IN, d_sae=D_SAE, k=6)
  x = _x()
  _check(module, _params(module), x, coeff=0.0)


def test_train_steps_track_dense():
  module = JumpReLU(d_in=D_IN, d_sae=D_SAE, bandwidth=EPS, target_l0=8.0)
  opt = optax.adam(1e-3, b1=0.0, b2=0.999)
  x0 = _x()
  params = _set_window(module, _params(module), x0)
  dense_step = jitted_update(module, opt, method="dense")
  sparse_step = jitted_update(module, opt, method="sparse",
                              sparse_capacity=CAP // B)
  copy = lambda t: jax.tree.map(jnp.array, t)  # pylint: disable=unnecessary-lambda-assignment
  pd, sd = copy(params), opt.init(params)
  ps, ss = copy(params), opt.init(params)
  for i in range(5):
    x = _x(seed=10 + i)
    pd, sd, md = dense_step(pd, sd, x, 0.3)
    ps, ss, ms = sparse_step(ps, ss, x, 0.3)
    np.testing.assert_allclose(ms["loss"], md["loss"], rtol=1e-4)
    assert float(ms["overflow"]) == 0.0
  for name in pd:
    np.testing.assert_allclose(ps[name], pd[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)
  assert float(jnp.min(ps["threshold"])) >= 0.0
  norms = jnp.linalg.norm(ps["w_dec"], axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)



@pytest.mark.parametrize("capacity", [CAP, 2 * B])
def test_jumprelu_preact_loss_parity(capacity):
  """The pre-activation loss through the pair list (rank-one dense part plus
  per-pair corrections) equals autodiff; the small capacity overflows."""
  module = JumpReLU(d_in=D_IN, d_sae=D_SAE, bandwidth=EPS, target_l0=8.0,
                    preact_coeff=0.05)
  x = _x()
  params = _set_window(module, _params(module), x)
  loss, dense_grads = _check(module, params, x, coeff=0.3, capacity=capacity)
  assert float(loss.aux["preact_loss"]) > 0
  assert float(loss.aux["overflow"]) == float(capacity < CAP)

