"""The sparse step for transcoders and cross-layer transcoders.

`sparse.sparse_loss_and_grads` against `jax.value_and_grad` of
`dictionaries.compute_loss` (the autodiff reference) with a separate target:
JumpReLU transcoders with and without the affine skip, TopK transcoders,
JumpReLU CLTs (one total L0 target, or per-layer targets with the
pre-activation loss) and TopK CLTs; every loss entry and every parameter
gradient, on the sparse path and on the dense fallback that a list longer
than the capacity triggers. Thresholds sit at per-latent quantiles of the
pre-activations and the bandwidth is wide, so active, silent and in-window
pairs all occur (asserted). A CLT's masked decoder blocks are given
nonzero values: the step must ignore them and give them zero gradient.
The step vmapped over two dictionaries (as a group run does), the
trainer's `Run.step` with train.step='sparse' against 'autodiff' for a few
steps, and the config check.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax.dictionaries import _base
from gemscope_jax.dictionaries import clt as clt_lib
from gemscope_jax.dictionaries import jumprelu as jumprelu_lib
from gemscope_jax.dictionaries import topk as topk_lib
from gemscope_jax.training import config as config_lib
from gemscope_jax.training import grads as grads_lib
from gemscope_jax.training.grads import sparse
from gemscope_jax.training.step import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, D_IN, D_OUT, D_SAE = 48, 24, 16, 128
N_LAYERS, D_LAYER, D_SAE_LAYER = 3, 16, 64
EPS = 0.05
COEFF = 0.7

CASES = {
    "jumprelu_transcoder": lambda: jumprelu_lib.JumpReLUTranscoder(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, bandwidth=EPS, target_l0=10.0),
    "jumprelu_transcoder_skip_preact": lambda: jumprelu_lib.JumpReLUTranscoder(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, bandwidth=EPS, target_l0=10.0,
        affine_skip=True, preact_coeff=0.01),
    "jumprelu_transcoder_skip_l0": lambda: jumprelu_lib.JumpReLUTranscoder(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, bandwidth=EPS,
        sparsity_penalty="l0", affine_skip=True),
    "topk_transcoder": lambda: topk_lib.TopKTranscoder(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, k=8),
    "topk_transcoder_skip": lambda: topk_lib.TopKTranscoder(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, k=8, affine_skip=True),
    # More kept than positive pre-activations: zero latents among the k.
    "topk_transcoder_zeros_kept": lambda: topk_lib.TopKTranscoder(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, k=100),
    "jumprelu_clt": lambda: clt_lib.CrossLayerTranscoder(
        n_layers=N_LAYERS, d_in=D_LAYER, d_sae=D_SAE_LAYER, bandwidth=EPS,
        target_l0=20.0),
    "jumprelu_clt_layer_targets_preact": lambda: clt_lib.CrossLayerTranscoder(
        n_layers=N_LAYERS, d_in=D_LAYER, d_sae=D_SAE_LAYER, bandwidth=EPS,
        target_l0=20.0, l0_targets=(9.0, 7.0, 4.0), preact_coeff=0.01),
    "topk_clt": lambda: clt_lib.CrossLayerTranscoder(
        n_layers=N_LAYERS, d_in=D_LAYER, d_sae=D_SAE_LAYER,
        activation="topk", k=12),
}
JUMPRELU = [name for name in CASES if name.startswith("jumprelu")]


def _case(name, seed=0):
  """(module, unboxed params, x, target) with every gradient term live."""
  module = CASES[name]()
  rng = np.random.default_rng(seed)
  clt = isinstance(module, clt_lib.CrossLayerTranscoder)
  x_shape = (B, N_LAYERS, D_LAYER) if clt else (B, D_IN)
  y_shape = (B, N_LAYERS, D_LAYER) if clt else (B, D_OUT)
  x = jnp.asarray(rng.normal(size=x_shape) + 0.3, jnp.float32)
  y = jnp.asarray(rng.normal(size=y_shape), jnp.float32)
  params = {k: _base.leaf_value(v) for k, v in
            _base.init_params(module, jax.random.PRNGKey(seed)).items()}

  def noise(shape, scale):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  params["b_enc"] = noise(params["b_enc"].shape, 0.1)
  params["b_dec"] = noise(params["b_dec"].shape, 0.1)
  if "w_skip" in params:
    params["w_skip"] = noise(params["w_skip"].shape, 0.1)
  if clt:  # Garbage in the masked blocks: the step must not read it.
    params["w_dec"] = params["w_dec"] + noise(params["w_dec"].shape, 0.3) * (
        1 - clt_lib.causal_mask(N_LAYERS)[:, None, :, None])
  if "threshold" in params:
    pre = np.asarray(module.apply({"params": params}, x, method="pre_acts"))
    params["threshold"] = jnp.asarray(
        np.maximum(np.quantile(pre, 0.85, axis=0), 0.0), jnp.float32)
  return module, params, x, y


def _reference(module, params, x, y):
  def loss_fn(p):
    lo, out = _base.compute_loss(module, p, x, sparsity_coeff=COEFF, target=y)
    return lo.total, (lo, out)
  (_, (lo, out)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return lo, out, g


def _assert_matches(name, capacity):
  """The sparse step equals autodiff; returns (sparse loss, reference out)."""
  module, params, x, y = _case(name)
  want, out, want_g = _reference(module, params, x, y)
  got, sp_out, got_g = jax.jit(lambda p, x, y: sparse.sparse_loss_and_grads(
      module, p, x, sparsity_coeff=COEFF, target=y, capacity=capacity)
  )(params, x, y)

  pre = np.asarray(out.pre_acts)
  if "threshold" in params:  # Firing, silent and in-window pairs all occur.
    th = np.asarray(params["threshold"])
    assert 0.05 < (pre > th).mean() < 0.4
    assert (np.abs(pre - th) < EPS / 2).sum() > 100
  elif name.endswith("zeros_kept"):
    assert ((np.asarray(out.latents) > 0).sum(-1) < module.k).all()
  for k in ("total", "mse", "sparsity"):
    np.testing.assert_allclose(float(getattr(got, k)), float(getattr(want, k)),
                               rtol=2e-5, atol=1e-7, err_msg=k)
  assert set(want.aux) <= set(got.aux)
  for k in want.aux:
    np.testing.assert_allclose(np.asarray(got.aux[k]), np.asarray(want.aux[k]),
                               rtol=2e-5, err_msg=k)
  np.testing.assert_allclose(np.asarray(sp_out.recon), np.asarray(out.recon),
                             rtol=1e-5, atol=1e-5)
  assert set(got_g) == set(want_g) == set(params)
  for k in want_g:
    scale = float(jnp.max(jnp.abs(want_g[k])))
    assert scale > 0, k
    np.testing.assert_allclose(np.asarray(got_g[k]), np.asarray(want_g[k]),
                               rtol=1e-4, atol=2e-5 * scale, err_msg=k)
  if isinstance(module, clt_lib.CrossLayerTranscoder):
    masked = 1 - clt_lib.causal_mask(N_LAYERS)[:, None, :, None]
    assert not np.any(np.asarray(got_g["w_dec"]) * masked)
  return got


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_step_matches_autodiff(name):
  module = CASES[name]()
  n_latents = module.d_sae * getattr(module, "n_layers", 1)
  got = _assert_matches(name, capacity=B * n_latents)  # everything fits
  assert float(got.aux["overflow"]) == 0.0
  if name in JUMPRELU:  # The list held fewer than all entries.
    assert 0 < float(got.aux["n_selected"]) < 0.5 * B * n_latents


@pytest.mark.parametrize("name", JUMPRELU)
def test_overflow_falls_back_to_the_exact_dense_step(name):
  got = _assert_matches(name, capacity=2 * B)
  assert float(got.aux["overflow"]) == 1.0
  assert float(got.aux["n_selected"]) > 2 * B


@pytest.mark.parametrize("name", ["jumprelu_clt", "topk_clt"])
def test_dispatcher_passes_the_target_and_shapes_the_fired_mask(name):
  """`grads.loss_and_grads` (what the trainer calls): the sparse method's
  loss, fired-latent mask (the latent shape: (n_layers, d_sae) for a CLT)
  and gradients equal the autodiff method's."""
  module, params, x, y = _case(name)
  n_latents = module.d_sae * getattr(module, "n_layers", 1)
  # The first 5 latents (of each layer) never fire.
  if "threshold" in params:
    params["threshold"] = params["threshold"].at[..., :5].set(1e3)
  else:
    params["b_enc"] = params["b_enc"].at[..., :5].set(-1e3)
  results = {
      method: jax.jit(lambda p, x, y, m=method: grads_lib.loss_and_grads(
          module, p, x, method=m, sparsity_coeff=COEFF, target=y,
          sparse_capacity=n_latents))(params, x, y)
      for method in ("sparse", "autodiff")}
  (lo, fired, g), (want, want_fired, want_g) = (results["sparse"],
                                                results["autodiff"])
  np.testing.assert_allclose(float(lo.total), float(want.total), rtol=2e-5)
  assert fired.shape == want_fired.shape == (
      getattr(module, "latent_shape", (module.d_sae,)))
  np.testing.assert_array_equal(np.asarray(fired), np.asarray(want_fired))
  assert not np.asarray(fired)[..., :5].any()
  assert np.asarray(fired)[..., 5:].mean() > 0.5
  for k in want_g:
    scale = float(jnp.max(jnp.abs(want_g[k])))
    np.testing.assert_allclose(np.asarray(g[k]), np.asarray(want_g[k]),
                               rtol=1e-4, atol=2e-5 * scale, err_msg=k)


@pytest.mark.parametrize("name", ["jumprelu_transcoder_skip_preact",
                                  "topk_clt"])
def test_vmapped_step_equals_each_member(name):
  """A group run vmaps the step over stacked dictionaries: the per-layer
  loops then run to the longest member's list; each member's loss and
  gradients still equal its own autodiff."""
  module = CASES[name]()
  members = [_case(name, seed=s)[1:] for s in (0, 1)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
  n_latents = module.d_sae * getattr(module, "n_layers", 1)
  lo, _, g = jax.jit(jax.vmap(lambda p, x, y: sparse.sparse_loss_and_grads(
      module, p, x, sparsity_coeff=COEFF, target=y,
      capacity=B * n_latents)))(*stacked)
  assert not np.asarray(lo.aux["overflow"]).any()
  for i, (params, x, y) in enumerate(members):
    want, _, want_g = _reference(module, params, x, y)
    np.testing.assert_allclose(float(lo.total[i]), float(want.total),
                               rtol=2e-5)
    for k in want_g:
      scale = float(jnp.max(jnp.abs(want_g[k])))
      np.testing.assert_allclose(np.asarray(g[k][i]), np.asarray(want_g[k]),
                                 rtol=1e-4, atol=2e-5 * scale, err_msg=k)


def test_unsupported_inputs_are_refused():
  module, params, x, _ = _case("jumprelu_clt")
  with pytest.raises(ValueError, match="target"):
    sparse.sparse_loss_and_grads(module, params, x, sparsity_coeff=1.0)
  tc, tc_params, tx, ty = _case("topk_transcoder")
  with pytest.raises(ValueError, match="target must have shape"):
    sparse.sparse_loss_and_grads(tc, tc_params, tx, sparsity_coeff=1.0,
                                 target=ty[:, :3])
  per_token = jumprelu_lib.JumpReLUTranscoder(
      d_in=4, d_sae=8, d_out=3, target_l0=2.0, l0_per_token=True)
  with pytest.raises(ValueError, match="l0_per_token"):
    sparse.sparse_loss_and_grads(per_token, {}, jnp.ones((2, 4)),
                                 sparsity_coeff=1.0, target=jnp.ones((2, 3)))


# The trainer's own step (`Run.step`) for a few steps: sparse against
# autodiff, from one state, on the same batches (random model weights are
# never read: the batches are given).
RUNS = {
    "jumprelu_clt": ("clt_270m.py", "clt_layers='1-3'", 3),
    "topk_clt": ("clt_270m.py", "topk,clt_layers='1-2',k=24", 2),
    "jumprelu_transcoder_skip": ("transcoder_270m.py", "skip", 1),
}
RUN_ARG = ("runlocal,checkpoint=random,width=64,batch=64,tokens=640,"
           "train.lr=1e-3,train.sparsity_warmup_steps=2,"
           "train.lr_warmup_steps=1,dictionary.bandwidth=0.05")


def _run(experiment: str, extra: str, step: str) -> Run:
  c = config_lib.load(f"{ROOT}/experiments/{experiment}:{RUN_ARG},{extra},"
                      f"train.step={step}")
  layers = c.dictionary.layers
  n = 1 if layers is None else len(config_lib.layout(c).inputs)
  c.train.sparse_capacity = 64 * n  # every latent fits: the sparse path runs
  return Run.from_config(c, devices=jax.devices()[:1])


@pytest.mark.parametrize("case", list(RUNS))
def test_trainer_sparse_steps_track_autodiff(case):
  experiment, extra, n = RUNS[case]
  rng = np.random.default_rng(1)
  shape = (64, n, 640) if n > 1 else (64, 640)
  batches = [{"x": rng.normal(size=shape).astype(np.float32) * 3,
              "target": rng.normal(size=shape).astype(np.float32) * 5 + 1}
             for _ in range(4)]
  finals, losses = {}, {}
  for step in ("sparse", "autodiff"):
    run = _run(experiment, extra, step)
    scale = jnp.full((n,), 3.0) if n > 1 else jnp.float32(3.0)
    b_dec = np.full(run.init_shapes[0].shape, 0.2, np.float32)
    state = run.init(jax.random.key(0), jnp.asarray(b_dec), scale, scale * 2)
    losses[step] = []
    for batch in batches:
      state, m = run.step(state, batch)
      losses[step].append(float(m["loss"]))
      if step == "sparse":
        assert float(m["overflow"]) == 0.0
    finals[step] = jax.device_get(state)
  assert losses["autodiff"][-1] != losses["autodiff"][0]  # it trained
  np.testing.assert_allclose(losses["sparse"], losses["autodiff"], rtol=1e-4)
  want = finals["autodiff"]
  for k in want.params:
    np.testing.assert_allclose(finals["sparse"].params[k], want.params[k],
                               rtol=1e-3, atol=1e-5, err_msg=k)
  np.testing.assert_array_equal(finals["sparse"].last_fired, want.last_fired)


def test_config_check_names_the_field_for_what_has_no_sparse_step():
  c = config_lib.load(f"{ROOT}/experiments/crosscoder_270m.py:runlocal,"
                      "checkpoint=random,width=64,train.step=sparse")
  with pytest.raises(ValueError, match=r"config\.train\.step: .*crosscoder"):
    config_lib.check(c)
  for experiment, extra in (("clt_270m.py", "clt_layers='1-2'"),
                            ("transcoder_270m.py", "topk,skip")):
    config_lib.check(config_lib.load(
        f"{ROOT}/experiments/{experiment}:runlocal,checkpoint=random,"
        f"width=64,{extra},train.step=sparse"))
