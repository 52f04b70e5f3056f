"""The rank-k dense path (`dictionary.dense_rank`).

Its forward value against numpy; its export as k antipodal latent pairs
computing exactly the same map (SAE with the pre-encoder bias, transcoder
with separate scales), through the Gemma Scope 2 and SAELens files, the
PyTorch port and SAELens itself; its config errors; and on a synthetic problem with a known
continuous dense direction (what the residual stream's massive coordinates
are), what it is for: the high-frequency penalty alone removes the dense
latents at an FVU cost, with a rank-1 path beside it no latent fires on
more than 10 % of tokens and FVU is no worse than the plain SAE's.
(The dense and autodiff training steps agree on it in test_dense_step.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from gemscope_jax import dictionaries as D
from gemscope_jax.interop import gemmascope2, saelens
from gemscope_jax.interop._inference import InferenceDictionary
from gemscope_jax import torch_dictionary

from step_helpers import jitted_update


def _params(module, seed=0):
  rng = np.random.default_rng(seed)
  p = {k: np.asarray(D.leaf_value(v)) for k, v in
       D.init_params(module, jax.random.PRNGKey(seed)).items()}
  p["b_enc"] = rng.normal(size=p["b_enc"].shape).astype(np.float32) * 0.1
  p["b_dec"] = rng.normal(size=p["b_dec"].shape).astype(np.float32) * 0.3
  p["w_dense_out"] = rng.normal(
      size=p["w_dense_out"].shape).astype(np.float32) * 0.5
  p["w_dense_out"][-1] = 0.0  # a direction the path does not use
  p["threshold"] = np.abs(rng.normal(size=p["threshold"].shape)).astype(
      np.float32) * 0.2
  return {k: jnp.asarray(v) for k, v in p.items()}


def test_forward_adds_the_low_rank_path():
  module = D.JumpReLU(12, 40, target_l0=5.0, dense_rank=3)
  p = _params(module)
  x = np.random.default_rng(1).normal(size=(7, 12)).astype(np.float32)
  out = module.apply({"params": p}, jnp.asarray(x))
  n = {k: np.asarray(v, np.float64) for k, v in p.items()}
  pre = (x - n["b_dec"]) @ n["w_enc"] + n["b_enc"]
  f = pre * (pre > n["threshold"])
  want = f @ n["w_dec"] + n["b_dec"] + x @ n["w_dense_in"] @ n["w_dense_out"]
  np.testing.assert_allclose(np.asarray(out.recon), want, rtol=1e-5,
                             atol=1e-5)
  # The latents are the sparse code alone: the path adds none.
  assert out.latents.shape == (7, 40)
  # w_dense_in starts as unit-norm columns, w_dense_out at zero.
  init = {k: np.asarray(D.leaf_value(v)) for k, v in
          D.init_params(module, jax.random.PRNGKey(3)).items()}
  np.testing.assert_allclose(np.linalg.norm(init["w_dense_in"], axis=0), 1.0,
                             rtol=1e-5)
  assert not init["w_dense_out"].any()


def _inference(module, p, s_in, s_out=None):
  arrays = D.fold_for_inference(p, s_in, threshold=p["threshold"],
                                pre_enc_bias=module.pre_enc_bias,
                                out_norm_scale=s_out)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  return InferenceDictionary(
      w_enc=arrays["w_enc"], w_dec=arrays["w_dec"], b_enc=arrays["b_enc"],
      b_dec=arrays["b_dec"], threshold=arrays["threshold"],
      hookpoint="layer_6/resid_post",
      hookpoint_out=None if s_out is None else "layer_6/mlp_out",
      model_name="gemma-3-270m")


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_export_as_antipodal_pairs_is_exact(kind, tmp_path):
  """The exported dictionary (k pairs more latents, threshold 0) computes
  the trained map on raw activations, in our loader, the SAELens and Gemma
  Scope 2 files and the PyTorch port; each pair fires one of its two
  latents wherever the path's coordinate is nonzero."""
  d, width, k = 12, 40, 3
  if kind == "sae":
    module = D.JumpReLU(d, width, target_l0=5.0, dense_rank=k)
    s_in, s_out = 2.5, None
  else:
    module = D.JumpReLUTranscoder(d, width, d_out=10, target_l0=5.0,
                                  dense_rank=k)
    s_in, s_out = 2.5, 0.7
  p = _params(module)
  x_raw = np.random.default_rng(2).normal(size=(9, d)).astype(np.float32) * 3
  trained = module.apply({"params": p}, jnp.asarray(x_raw / s_in))
  want = np.asarray(trained.recon) * (s_in if s_out is None else s_out)
  inf = _inference(module, p, s_in, s_out)
  assert inf.d_sae == width + 2 * k
  assert not inf.is_transcoder if kind == "sae" else inf.is_transcoder
  np.testing.assert_allclose(np.asarray(inf(x_raw)), want, rtol=2e-5,
                             atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(inf.w_dec[width:width + 4],
                                            axis=1), 1.0, rtol=1e-5)
  lat = np.asarray(inf.encode(x_raw))
  # The trained latents come first, unchanged (in raw units).
  np.testing.assert_allclose(
      lat[:, :width],
      np.asarray(trained.latents) * (s_in if s_out is None else s_out),
      rtol=2e-5, atol=2e-5)
  pairs = lat[:, width:].reshape(9, k, 2)
  live = (pairs[:, :-1] > 0).sum(-1)  # the last direction is unused
  np.testing.assert_array_equal(live, 1)
  assert not pairs[:, -1].any()
  for i, (save, load) in enumerate([
      (lambda o: saelens.save_saelens(inf, o), saelens.load_saelens),
      (lambda o: gemmascope2.save_gemmascope2(inf, o, l0=5),
       gemmascope2.load_gemmascope2)]):
    folder = save(tmp_path / str(i))
    back = load(folder)
    assert back.d_sae == width + 2 * k
    np.testing.assert_allclose(np.asarray(back(x_raw)), want, rtol=2e-5,
                               atol=2e-5)
    port = torch_dictionary.TorchDictionary.from_folder(folder)
    got = port(torch.from_numpy(x_raw)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    if i == 0 and kind == "sae":  # SAELens itself, an independent reader
      from sae_lens import SAE  # pylint: disable=import-outside-toplevel
      sae = SAE.load_from_disk(str(folder), device="cpu")
      with torch.no_grad():
        got = sae.decode(sae.encode(torch.from_numpy(x_raw))).numpy()
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fields,match", [
    (dict(dense_rank=-1), "dense_rank"),
    (dict(dense_rank=12), r"\[0, d_in=12\)"),
    (dict(dense_rank=True), "dense_rank"),
    (dict(dense_rank=2, architecture="topk", k=4), "'jumprelu'"),
    (dict(dense_rank=2, architecture="jumprelu_transcoder", d_out=8,
          affine_skip=True), "affine_skip"),
    (dict(dense_rank=2, matryoshka_prefixes=(8, 40)), "matryoshka"),
])
def test_bad_dense_rank_is_refused_by_name(fields, match):
  kw = dict(d_in=12, d_sae=40, target_l0=5.0, **fields)
  with pytest.raises(ValueError, match=r"DictConfig\.dense_rank") as e:
    D.DictConfig(**kw)
  assert e.match(match)


def test_sparse_step_refuses_the_dense_path():
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import checks  # pylint: disable=import-outside-toplevel
  c = config_lib.load("experiments/jumprelu_270m.py:step=sparse")
  c.dictionary.dense_rank = 4
  with pytest.raises(ValueError, match=r"config\.dictionary\.dense_rank.*"
                     "'dense' or 'autodiff'"):
    checks.validate(c)


def _massive_coordinate_problem(t=1024, d=16, n_sparse=24):
  """24 sparse features (4 % of tokens each) plus a continuous coordinate
  on every token, g u with g ~ N(4, 1.5): the shape of Gemma's massive
  residual dimensions."""
  rng = np.random.default_rng(0)
  dirs = rng.normal(size=(n_sparse + 1, d))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)

  def batch(r):
    mag = r.uniform(0.5, 1.5, (t, n_sparse)) * (r.random((t, n_sparse))
                                                 < 0.04)
    g = r.normal(4.0, 1.5, (t, 1))
    x = mag @ dirs[:-1] + g * dirs[-1] * 0.5
    return jnp.asarray(x / 2.0, jnp.float32)
  return batch


def _train(batch, width=32, **kw):
  module = D.JumpReLU(16, width, bandwidth=0.01, target_l0=2.0,
                      max_freq=0.1, **kw)
  params = {k: D.leaf_value(v) for k, v in
            D.init_params(module, jax.random.PRNGKey(0)).items()}
  opt = optax.adam(3e-3, b1=0.0, b2=0.999)
  state, update = opt.init(params), jitted_update(module, opt, method="dense")
  r = np.random.default_rng(1)
  for i in range(1500):
    params, state, _ = update(params, state, batch(r),
                              jnp.float32(min(1.0, i / 300)))
  x = batch(np.random.default_rng(99))
  out = module.apply({"params": params}, x)
  freq = np.asarray((out.latents > 0).mean(0))
  fvu = float(D.fvu(x, out.recon))
  return freq, fvu


def test_dense_path_takes_the_dense_coordinate_without_fvu_cost():
  batch = _massive_coordinate_problem()
  plain_freq, plain_fvu = _train(batch)
  pen_freq, pen_fvu = _train(batch, freq_coeff=10.0)
  path_freq, path_fvu = _train(batch, freq_coeff=10.0, dense_rank=1)
  # The plain SAE tiles the coordinate with latents on 10-50 % of tokens.
  assert (plain_freq > 0.1).sum() >= 2 and plain_freq.max() > 0.3, plain_freq
  # The penalty removes them, and the reconstruction pays for it.
  assert pen_freq.max() <= 0.105, pen_freq.max()
  assert pen_fvu > plain_fvu * 1.5, (pen_fvu, plain_fvu)
  # With the path: no dense latent and no FVU cost.
  assert path_freq.max() <= 0.105, path_freq.max()
  assert path_fvu <= plain_fvu, (path_fvu, plain_fvu)


def test_training_run_exports_the_pairs_with_their_place():
  """A run with `dictionary.dense_rank` (the main job's config): its state
  has the path's parameters, and its export carries 2k more latents that
  `metadata['dense_path_latents']` locates, computing the trained map."""
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import export as export_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training.step import Run  # pylint: disable=import-outside-toplevel
  c = config_lib.load("experiments/jumprelu_270m.py:width=64")
  c.dictionary.dense_rank, c.dictionary.target_l0 = 4, 16.0
  run = Run.from_config(c, devices=jax.devices()[:1])
  d = run.dict_config.d_in
  scale = 37.0
  state = run.init(jax.random.key(0), jnp.zeros((d,)), jnp.asarray(scale),
                   jnp.asarray(scale))
  assert state.params["w_dense_in"].shape == (d, 4)
  rng = np.random.default_rng(0)
  params = dict(state.params)
  params["w_dense_out"] = jnp.asarray(rng.normal(size=(4, d)), jnp.float32)
  params["b_dec"] = jnp.asarray(rng.normal(size=d), jnp.float32)
  state = state.replace(params=params)
  inf = export_lib.from_state(run, state)
  assert inf.d_sae == 64 + 8
  assert inf.metadata["dense_path_rank"] == 4
  assert inf.metadata["dense_path_latents"] == [64, 72]
  # The exported L0 target counts one latent of each pair.
  assert inf.metadata["target_l0"] == 20.0
  assert inf.metadata["dense_path_sparse_target_l0"] == 16.0
  x_raw = rng.normal(size=(5, d)).astype(np.float32) * scale
  want = run.module.apply({"params": {k: D.leaf_value(v) for k, v in
                                      params.items()}},
                          jnp.asarray(x_raw / scale)).recon
  np.testing.assert_allclose(np.asarray(inf(x_raw)),
                             np.asarray(want) * scale, rtol=1e-4,
                             atol=1e-4 * scale)


@pytest.mark.parametrize("arg,rank,target", [
    ("dense_path", 16, 44.0), ("dense_path=8", 8, 52.0),
    ("target_l0=20,dense_path=4", 4, 16.0)])
def test_experiment_flag_keeps_the_exported_l0(arg, rank, target):
  """`experiments/jumprelu_270m.py:dense_path[=K]`: the penalty, a rank-K
  path and a sparse target lowered by K (the pairs add K to the exported
  L0)."""
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.load(f"experiments/jumprelu_270m.py:{arg}")
  assert (c.dictionary.dense_rank, c.dictionary.target_l0) == (rank, target)
  assert c.dictionary.freq_coeff == 0.1 and c.train.grad_clip_norm == 300
  config_lib.check(c)
  with pytest.raises(ValueError, match=r"dense_path=60.*target_l0=60"):
    config_lib.load("experiments/jumprelu_270m.py:dense_path=60")
