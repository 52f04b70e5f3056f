"""The L0 target that decays from a multiple of its goal to the goal
(`train.l0_target_decay_steps`, `train.l0_target_start`).

The penalty's value and threshold gradient at a mid-decay step equal the
hand formula with the decayed target under every gradient method (SAE,
transcoder, CLT with one total target and with per-layer targets); a short
training loop on synthetic data has its L0 follow the decaying target (and
not without the decay); a run resumed from a checkpoint continues on the
same schedule, bit for bit; bad settings name the field.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax import dictionaries
from gemscope_jax.dictionaries import clt as clt_lib
from gemscope_jax.training import checkpoints as ckpt_lib
from gemscope_jax.training import config as config_lib
from gemscope_jax.training import grads as grads_lib
from gemscope_jax.training.grads import sparse as sparse_lib
from gemscope_jax.training import optim, plans
from gemscope_jax.training.step import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
EPS = 0.5  # a wide straight-through window: many (token, latent) pairs in it
COEFF = 0.7


def _step_plan(decay_steps: int, start: float) -> plans.StepPlan:
  return plans.StepPlan(
      grads="dense", sparse_capacity=1, sparsity_coeff=COEFF,
      sparsity_warmup_steps=1, unit_decoder=True, dead_after_tokens=1,
      batch_size=1, num_steps=1000, l0_target_decay_steps=decay_steps,
      l0_target_start=start)


def test_schedule_is_linear_from_start_to_goal():
  p = _step_plan(100, 4.0)
  got = [float(optim.l0_target_scale(p, jnp.int32(s)))
         for s in (0, 25, 50, 100, 150)]
  assert got == [4.0, 3.25, 2.5, 1.0, 1.0]
  assert float(optim.l0_target_scale(_step_plan(0, 4.0), jnp.int32(7))) == 1


def _random_params(module, key, rng):
  """Init, then biases and thresholds random so that L0 is off target."""
  params = {k: np.asarray(v, np.float32) for k, v in
            nn.unbox(dictionaries.init_params(module, key)).items()}
  params["b_enc"] = rng.normal(size=params["b_enc"].shape).astype(
      np.float32) * 0.2
  params["threshold"] = rng.uniform(0.1, 0.4, params["threshold"].shape
                                    ).astype(np.float32)
  if getattr(module, "pre_enc_bias", False):
    params["b_dec"] = rng.normal(size=params["b_dec"].shape).astype(
        np.float32) * 0.3
  return {k: jnp.asarray(v) for k, v in params.items()}


def _hand_penalty(module, params, x, goal_scale):
  """(penalty value, its threshold gradient) in float64 numpy, from the
  formula with the decayed target(s)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  if isinstance(module, clt_lib.CrossLayerTranscoder):
    pre = np.einsum("bnd,ndl->bnl", x, p["w_enc"]) + p["b_enc"]
  else:
    xc = x - p["b_dec"] if module.pre_enc_bias else x
    pre = xc @ p["w_enc"] + p["b_enc"]
  th = p["threshold"]
  fired = (pre > th).astype(np.float64)
  window = (np.abs((pre - th) / EPS) < 0.5).astype(np.float64)
  targets = getattr(module, "l0_targets", None)
  if targets is not None:  # one quadratic penalty per layer
    t = np.asarray(targets) * goal_scale
    l0 = fired.sum(axis=(0, 2)) / n
    value = np.sum(COEFF * (2 / t) * (l0 - t) ** 2)
    d_pen = (COEFF * (4 / t) * (l0 - t))[:, None]
  else:
    t = module.target_l0 * goal_scale
    l0 = fired.reshape(n, -1).sum(axis=1).mean()
    value = COEFF * (2 / t) * (l0 - t) ** 2
    d_pen = COEFF * (4 / t) * (l0 - t)
  g_th = d_pen * (-(1 / EPS)) * window.sum(axis=0) / n
  return value, g_th


CASES = {
    "sae": (lambda: dictionaries.JumpReLU(d_in=8, d_sae=16, target_l0=3.0,
                                          bandwidth=EPS),
            (64, 8), None),
    "transcoder": (lambda: dictionaries.JumpReLUTranscoder(
        d_in=8, d_sae=16, d_out=6, target_l0=3.0, bandwidth=EPS),
                   (64, 8), (64, 6)),
    "clt_total": (lambda: clt_lib.CrossLayerTranscoder(
        n_layers=2, d_in=6, d_sae=8, target_l0=5.0, bandwidth=EPS),
                  (64, 2, 6), (64, 2, 6)),
    "clt_per_layer": (lambda: clt_lib.CrossLayerTranscoder(
        n_layers=2, d_in=6, d_sae=8, target_l0=5.0, l0_targets=(1.5, 3.5),
        bandwidth=EPS), (64, 2, 6), (64, 2, 6)),
}


def _no_sparse_step(module) -> str | None:
  """Why the sparse step cannot take `module` (None: it can); before
  `sparse.unsupported` it took JumpReLU SAEs only."""
  unsupported = getattr(sparse_lib, "unsupported", None)
  if unsupported is not None:
    return unsupported(module)
  sae = isinstance(module, dictionaries.JumpReLU) and not isinstance(
      module, dictionaries.JumpReLUTranscoder)
  return None if sae else "this sparse step takes SAEs only"


@pytest.mark.parametrize("method", ["dense", "sparse", "autodiff"])
@pytest.mark.parametrize("case", list(CASES))
def test_mid_decay_penalty_and_threshold_grad_match_the_formula(case,
                                                                method):
  make, x_shape, y_shape = CASES[case]
  module = make()
  if method == "sparse" and _no_sparse_step(module):
    pytest.skip(_no_sparse_step(module))
  rng = np.random.default_rng(3)
  params = _random_params(module, jax.random.key(1), rng)
  x = jnp.asarray(rng.normal(size=x_shape).astype(np.float32))
  y = (None if y_shape is None
       else jnp.asarray(rng.normal(size=y_shape).astype(np.float32)))
  scale = optim.l0_target_scale(_step_plan(100, 4.0), jnp.int32(50))
  assert float(scale) == 2.5
  n_latents = int(np.prod(params["threshold"].shape))

  @jax.jit
  def run(coeff):
    scaled = optim.with_l0_targets_scaled(module, scale)
    lo, _, grads = grads_lib.loss_and_grads(
        scaled, params, x, method=method, sparsity_coeff=coeff, target=y,
        sparse_capacity=n_latents, use_kernel=True)
    return lo, grads

  lo, grads = run(jnp.float32(COEFF))
  _, grads0 = run(jnp.float32(0.0))  # the same step without the penalty
  if method == "sparse":
    assert float(lo.aux["overflow"]) == 0.0  # the pair list, not the fallback
  value, g_th = _hand_penalty(module, params, x, 2.5)
  assert abs(value) > 1e-3 and np.abs(g_th).max() > 1e-3  # not vacuous
  np.testing.assert_allclose(float(lo.sparsity), value, rtol=2e-5)
  got = np.asarray(grads["threshold"]) - np.asarray(grads0["threshold"])
  np.testing.assert_allclose(got, g_th, rtol=1e-4,
                             atol=1e-5 * np.abs(g_th).max())
  # The undecayed target gives another value: the decay is what is tested.
  goal_value, _ = _hand_penalty(module, params, x, 1.0)
  assert abs(goal_value - value) > 1e-2 * abs(value)


def test_scaling_reaches_a_matryoshka_inner_dictionary():
  inner = dictionaries.JumpReLU(d_in=4, d_sae=8, target_l0=3.0)
  m = dictionaries.Matryoshka(dictionary=inner, prefixes=(4, 8))
  scaled = optim.with_l0_targets_scaled(m, jnp.float32(2.0))
  assert isinstance(scaled, dictionaries.Matryoshka)
  assert float(scaled.dictionary.target_l0) == 6.0
  topk = dictionaries.TopK(d_in=4, d_sae=8, k=2)
  assert optim.with_l0_targets_scaled(topk, jnp.float32(2.0)) is topk


# --- The trainer's step on synthetic data. ---

N_FEATURES, BATCH, D = 256, 256, 640


def _config(decay_steps: int, num_steps: int):
  return config_lib.load(
      f"{ROOT}/experiments/jumprelu_270m.py:runlocal,checkpoint=random,"
      f"width=128,batch={BATCH},tokens={BATCH * num_steps},train.lr=1e-2,"
      "train.lr_warmup_steps=1,train.sparsity_warmup_steps=1,"
      "train.lr_decay_fraction=0.0,dictionary.target_l0=8.0,"
      "dictionary.bandwidth=0.01,train.l0_target_start=4.0,"
      f"train.l0_target_decay_steps={decay_steps}")


class _SparseData:
  """Tokens that are sums of about 24 of 256 random unit directions with
  exponential coefficients: L0 can be anything from a handful to dozens."""

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)
    f = self.rng.normal(size=(N_FEATURES, D))
    self.features = f / np.linalg.norm(f, axis=1, keepdims=True)

  def batch(self) -> dict[str, np.ndarray]:
    on = self.rng.random((BATCH, N_FEATURES)) < 24 / N_FEATURES
    codes = on * self.rng.exponential(1.0, (BATCH, N_FEATURES))
    return {"x": (codes @ self.features).astype(np.float32)}


def _fresh(run: Run, first: np.ndarray):
  s = np.sqrt(np.mean(np.sum(np.square(first), axis=1)))
  return run.init(jax.random.key(0), jnp.asarray(first.mean(0) / s),
                  jnp.float32(s), jnp.float32(s))


def _l0_trace(decay_steps: int, num_steps: int = 300):
  run = Run.from_config(_config(decay_steps, num_steps),
                        devices=jax.devices()[:1])
  data = _SparseData(0)
  state = _fresh(run, data.batch()["x"])
  l0, target = [], []
  for _ in range(num_steps):
    state, m = run.step(state, data.batch())
    l0.append(float(m["l0"]))
    target.append(float(m.get("l0_target", 8.0)))
  return np.asarray(l0), np.asarray(target)


def test_training_l0_follows_the_decaying_target():
  """300 steps, target 32 -> 8 over 200: after a settling-in, L0 averaged
  over each 50 steps is within 15 % of the target averaged there; the
  same run without the decay sits well below it."""
  l0, target = _l0_trace(200)
  assert target[0] == 32.0 and target[100] == 20.0 and target[-1] == 8.0
  assert np.all(np.diff(target) <= 0)
  flat, _ = _l0_trace(0)
  for lo in range(50, 300, 50):
    got, want = l0[lo:lo + 50].mean(), target[lo:lo + 50].mean()
    assert abs(got - want) < 0.15 * want, (lo, got, want)
    if lo < 200:  # while the target is still above the goal
      assert flat[lo:lo + 50].mean() < 0.75 * got, (lo, flat[lo:lo + 50])


def test_resumed_run_continues_on_the_same_schedule(tmp_path):
  """12 steps straight against 6, a checkpoint, a new Run restoring it, and
  6 more: the same targets at every step and the same final parameters."""
  c = _config(10, 12)
  data = _SparseData(1)
  batches = [data.batch() for _ in range(13)]
  run = Run.from_config(c, devices=jax.devices()[:1])
  state = _fresh(run, batches[0]["x"])
  straight = []
  for b in batches[1:]:
    state, m = run.step(state, b)
    straight.append(float(m["l0_target"]))
  want = jax.device_get(state.params)

  run = Run.from_config(c, devices=jax.devices()[:1])
  state = _fresh(run, batches[0]["x"])
  resumed = []
  for b in batches[1:7]:
    state, m = run.step(state, b)
    resumed.append(float(m["l0_target"]))
  ckpts = ckpt_lib.Checkpoints(tmp_path, asynchronous=False)
  ckpts.save(6, state, {}, config_lib.to_json(c))
  ckpts.close()
  del state, run
  run = Run.from_config(c, devices=jax.devices()[:1])
  ckpts = ckpt_lib.Checkpoints(tmp_path, asynchronous=False)
  step, state, _, _ = ckpts.restore_latest(run.abstract_state)
  ckpts.close()
  assert step == 6 and int(state.step) == 6
  for b in batches[7:]:
    state, m = run.step(state, b)
    resumed.append(float(m["l0_target"]))
  assert resumed == straight
  assert straight[0] == 32.0 and straight[5] == 32.0 - 24.0 * 5 / 10
  assert straight[-2:] == [8.0, 8.0]
  got = jax.device_get(state.params)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("extra, field", [
    ("train.l0_target_decay_steps=-1", "config.train.l0_target_decay_steps"),
    ("train.l0_target_decay_steps=10,train.l0_target_start=0.5",
     "config.train.l0_target_start"),
    ("train.l0_target_decay_steps=10,dictionary.sparsity_penalty='l0'",
     "config.train.l0_target_decay_steps"),
])
def test_bad_settings_name_the_field(extra, field):
  c = config_lib.load(f"{ROOT}/experiments/jumprelu_270m.py:runlocal,"
                      f"checkpoint=random,{extra}")
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    config_lib.check(c)


def test_topk_refuses_a_decay():
  c = config_lib.load(f"{ROOT}/experiments/clt_270m.py:runlocal,"
                      "checkpoint=random,topk,clt_layers='1-2',"
                      "train.l0_target_decay_steps=10")
  with pytest.raises(ValueError, match=r"config\.train\.l0_target_decay_steps"
                     r": .*jumprelu"):
    config_lib.check(c)
