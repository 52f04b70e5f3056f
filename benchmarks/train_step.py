"""Activations/s of a full SAE training step: SAELens vs ours dense vs ours sparse.

One step = forward, backward, Adam (b1=0, b2=0.999) and, for ours, decoder
gradient projection + renormalisation (and the threshold clip). Measured in
one process on the CPU, fp32, for JumpReLU (quadratic L0 penalty) and TopK:

  saelens   SAELens's own `JumpReLUTrainingSAE` / `TopKTrainingSAE`: its
            `training_forward_pass`, the trainer's firing statistics,
            `loss.backward()`, grad-norm clipping and a torch Adam step, as
            `SAETrainer._train_step` does them.
  autodiff  ours with train.step='autodiff': `jax.value_and_grad` of
            `dictionaries.compute_loss`.
  dense     ours with train.step='dense' (the default): the hand-derived
            gradients of `training/grads/dense.py` (for JumpReLU with the
            fused CPU kernel), the same five dense matmuls.
  sparse    ours with train.step='sparse': `sparse_loss_and_grads` of
            `training/grads/sparse.py`, JumpReLU's pair list holding
            train.sparse_capacity entries per token (4 * L0*, the length
            `sparse.default_capacity` gives).

Every "ours" row times the trainer's own step: `training.step.Run(plan).step`
of a config (`config.preset('gemma3_270m')`, hookpoint layer_6/resid_post, so
d_in = 640; model.checkpoint='random'; dictionary.width=--width,
train.batch_size=--batch, train.lr=1e-5 constant, sparsity coefficient 1
from the first step, dictionary.preact_coeff=0, train.init_norm=1), jitted
with the state donated, one device. So each step also includes what the
trainer's step does besides the gradients: the inputs divided by the
state's norm scale (1 here), the Adam update through the lr schedule, the
counters (last step each latent fired; BatchTopK's kept threshold) and the
logged metrics (loss, gradient norm, finiteness, dead fraction, lr, ...).
The state comes from `run.init` (b_dec 0, scales 1); the batch is put on
the device in `run.batch_sharding` once, outside the timing.

Inputs are standard normal (B, d_in). For a realistic JumpReLU sparsity the
thresholds are set, before timing, to each latent's (1 - L0*/width) quantile
of the pre-activations of one batch (the m-th largest of its B values, m =
B * L0* / width), so every latent fires on ~L0*/width of the tokens and L0 is
~L0* per token (the measured L0 is printed). A small learning rate keeps it
there over the timed steps. A JAX matmul (4096x2048x4096) gives the machine's
dense fp32 rate; each step's "dense-equivalent" rate 12*B*d_in*width / time
is shown as a fraction of it. "matmul floor" is the time the five dense
(B, d_in, width) matmuls of a step take at that rate (10*B*d_in*width
FLOPs), i.e. the fastest any dense step can be here.

  .venv/bin/python benchmarks/train_step.py [--width 16384] [--batch 4096]
      [--steps 5] [--quick]

Caveat: on a small shared CPU the figures move by tens of percent between
runs (other processes compete for the cores); the medians of a handful of
steps are indicative, compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position

from gemscope_jax.kernels import jumprelu as jumprelu_kernel  # pylint: disable=wrong-import-position
from gemscope_jax.training import config as config_lib  # pylint: disable=wrong-import-position
from gemscope_jax.training.grads import sparse  # pylint: disable=wrong-import-position
from gemscope_jax.training.step import Run  # pylint: disable=wrong-import-position

LR = 1e-5
HOOKPOINT = "layer_6/resid_post"  # Gemma 3 270M: d_in 640


def _median_time(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_rate(repeats: int = 5) -> float:
  """GFLOP/s of a jitted fp32 4096x2048x4096 jnp.dot."""
  a = jnp.ones((4096, 2048), jnp.float32)
  b = jnp.ones((2048, 4096), jnp.float32)
  f = jax.jit(jnp.dot)
  t = _median_time(lambda: f(a, b).block_until_ready(), repeats, 1)
  return 2 * 4096 * 2048 * 4096 / t / 1e9


def make_run(arch: str, method: str, args, *, sparse_capacity: int = 256
             ) -> Run:
  """The trainer's Run of the benchmark's config, on one device."""
  c = config_lib.preset("gemma3_270m")
  c.model.checkpoint = "random"
  c.hookpoint = HOOKPOINT
  c.dictionary.architecture = arch
  c.dictionary.width = args.width
  c.dictionary.target_l0 = args.target_l0
  c.dictionary.bandwidth = args.bandwidth
  c.dictionary.sparsity_penalty = "quadratic"
  c.dictionary.preact_coeff = 0.0
  if arch == "topk":
    c.dictionary.k = args.k
  t = c.train
  t.step = method
  t.batch_size = args.batch
  t.num_tokens = args.batch * 1_000_000
  t.lr, t.lr_warmup_steps, t.lr_decay_fraction = LR, 0, 0.0
  t.sparsity_coeff = 1.0 if arch == "jumprelu" else 0.0
  t.sparsity_warmup_steps = 1
  t.init_norm = 1.0
  t.sparse_capacity = sparse_capacity
  return Run.from_config(c, devices=jax.devices()[:1])


def fresh_state(run: Run, threshold=None):
  """`run.init`'s state (b_dec 0, scales 1), thresholds replaced if given."""
  d = run.dict_config.d_in
  one = jnp.ones((), jnp.float32)
  state = run.init(jax.random.key(0), jnp.zeros((d,), jnp.float32), one, one)
  if threshold is not None:
    old = state.params["threshold"]  # unboxed, as the step takes it
    new = jax.device_put(jnp.asarray(threshold, old.dtype).reshape(old.shape),
                         old.sharding)
    state = state.replace(params={**state.params, "threshold": new})
  return state


def _quantile_thresholds(module, params, x, target_l0: float) -> jax.Array:
  """Per-latent threshold so each latent fires on ~target_l0/width tokens."""
  _, pre = sparse._pre_acts(module, params, x)  # pylint: disable=protected-access
  m = max(1, int(round(x.shape[0] * target_l0 / module.d_sae)))
  top, _ = jax.lax.top_k(pre.T, m + 1)
  return jnp.maximum(0.5 * (top[:, m - 1] + top[:, m]), 0.0)


def time_ours(run: Run, x, steps: int, threshold=None) -> tuple[float, dict]:
  """Median seconds per call of `run.step` (state donated each call), and
  the last step's metrics."""
  batch = jax.device_put({"x": x}, run.batch_sharding)
  held = {"state": fresh_state(run, threshold), "metrics": None}

  def one():
    held["state"], held["metrics"] = run.step(held["state"], batch)
    jax.block_until_ready(held["state"])
  t = _median_time(one, steps, warmup=2)
  return t, {k: float(v) for k, v in jax.device_get(held["metrics"]).items()}


def time_saelens(kind: str, params, x, *, k: int, target_l0: float,
                 bandwidth: float, steps: int) -> float:
  """Median seconds per SAELens training step (forward/backward/Adam)."""
  # pylint: disable=import-outside-toplevel
  from sae_lens.saes.jumprelu_sae import (JumpReLUTrainingSAE,
                                          JumpReLUTrainingSAEConfig)
  from sae_lens.saes.sae import TrainStepInput
  from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
  d_in, width = params["w_enc"].shape
  if kind == "jumprelu":
    cfg = JumpReLUTrainingSAEConfig(
        d_in=d_in, d_sae=width, dtype="float32", device="cpu",
        jumprelu_bandwidth=bandwidth, jumprelu_sparsity_loss_mode="quadratic",
        target_l0=target_l0, l0_coefficient=1.0)
    sae = JumpReLUTrainingSAE(cfg)
    coefficients = {"l0": 1.0}
  else:
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=width, k=k, dtype="float32",
                                device="cpu")
    sae = TopKTrainingSAE(cfg)
    coefficients = {}
  with torch.no_grad():  # Same starting point as ours.
    for ours, theirs in (("w_enc", "W_enc"), ("w_dec", "W_dec"),
                         ("b_enc", "b_enc"), ("b_dec", "b_dec"),
                         ("threshold", "threshold")):
      if hasattr(sae, theirs) and ours in params:
        getattr(sae, theirs).copy_(torch.from_numpy(np.array(params[ours])))
  opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.0, 0.999))
  xt = torch.from_numpy(np.array(x))
  dead = torch.zeros(width, dtype=torch.bool)
  act_freq = torch.zeros(width)

  def one():
    sae.train()
    out = sae.training_forward_pass(step_input=TrainStepInput(
        sae_in=xt, coefficients=coefficients, dead_neuron_mask=dead,
        n_training_steps=0, is_logging_step=False))
    with torch.no_grad():  # The trainer's firing statistics.
      act_freq.add_(out.feature_acts.bool().float().sum(-2))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
  return _median_time(one, steps, warmup=1)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--width", type=int, default=16384)
  ap.add_argument("--batch", type=int, default=4096)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--k", type=int, default=60)
  ap.add_argument("--target-l0", type=float, default=60.0)
  ap.add_argument("--bandwidth", type=float, default=0.001)
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: width 2048, batch 512, 2 steps")
  ap.add_argument("--skip-saelens", action="store_true")
  args = ap.parse_args()
  if args.quick:
    args.width, args.batch, args.steps = 2048, 512, 2
  b, w = args.batch, args.width
  runs = {m: make_run("jumprelu", m, args) for m in ("autodiff", "dense")}
  d = runs["dense"].dict_config.d_in
  flops = 12 * b * d * w
  print(f"d_in {d}, width {w}, batch {b}, fp32, {args.steps} timed steps "
        f"(median), jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        flush=True)
  rate = matmul_rate()
  print(f"matmul 4096x2048x4096 fp32 (jnp.dot): {rate:.1f} GFLOP/s",
        flush=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (b, d), jnp.float32)
  rows = []

  def add(arch, impl, t, note=""):
    eq = flops / t / 1e9
    rows.append((arch, impl, b / t, t, eq, eq / rate, note))
    print(f"  {arch:8s} {impl:8s} {b / t:9.0f} act/s  {t:7.3f} s/step  {note}",
          flush=True)

  # JumpReLU. The sparse list as long as `sparse.default_capacity` makes it
  # (the trainer's train.sparse_capacity counts entries per token).
  module = runs["dense"].module
  capacity = -(-sparse.default_capacity(module, b) // b)
  runs["sparse"] = make_run("jumprelu", "sparse", args,
                            sparse_capacity=capacity)
  params = jax.device_get(fresh_state(runs["dense"]).params)
  threshold = np.asarray(_quantile_thresholds(module, params, x,
                                              args.target_l0))
  params["threshold"] = threshold
  print(f"JumpReLU: thresholds at per-latent quantiles for L0 ~ "
        f"{args.target_l0:g}; sparse capacity {capacity}/token",
        flush=True)
  if not args.skip_saelens:
    add("jumprelu", "saelens",
        time_saelens("jumprelu", params, x, k=args.k,
                     target_l0=args.target_l0, bandwidth=args.bandwidth,
                     steps=args.steps))
  t, m = time_ours(runs["autodiff"], x, args.steps, threshold)
  add("jumprelu", "autodiff", t, f"L0 {m['l0']:.1f}")
  t, m = time_ours(runs["dense"], x, args.steps, threshold)
  add("jumprelu", "dense", t, f"L0 {m['l0']:.1f}, fused kernel "
      f"{'on' if jumprelu_kernel.available() else 'OFF'}")
  t, m = time_ours(runs["sparse"], x, args.steps, threshold)
  add("jumprelu", "sparse", t,
      f"L0 {m['l0']:.1f}, listed {m['n_selected'] / b:.1f}/token, "
      f"overflow {m['overflow']:.0f}")

  # TopK.
  runs = {m: make_run("topk", m, args)
          for m in ("autodiff", "dense", "sparse")}
  if not args.skip_saelens:
    params = jax.device_get(fresh_state(runs["dense"]).params)
    add("topk", "saelens",
        time_saelens("topk", params, x, k=args.k, target_l0=args.target_l0,
                     bandwidth=args.bandwidth, steps=args.steps))
  for method in ("autodiff", "dense", "sparse"):
    t, m = time_ours(runs[method], x, args.steps)
    add("topk", method, t, f"L0 {m['l0']:.1f}")

  anchors = {r[0]: r[2] for r in rows if r[1] == "saelens"}
  print()
  print(f"{'arch':8s} {'impl':8s} {'act/s':>9s} {'s/step':>8s} "
        f"{'dense-eq GF/s':>13s} {'of matmul':>9s} {'vs SAELens':>10s}  note")
  for arch, impl, acts, t, eq, frac, note in rows:
    ratio = f"{acts / anchors[arch]:.2f}x" if arch in anchors else "-"
    print(f"{arch:8s} {impl:8s} {acts:9.0f} {t:8.3f} {eq:13.1f} "
          f"{frac:9.2f} {ratio:>10s}  {note}")
  floor = 10 * b * d * w / (rate * 1e9)
  print(f"(matmul rate {rate:.1f} GFLOP/s; dense-eq = 12*B*d_in*width / "
        f"step time, so a sparse step can exceed 1.0)")
  print(f"matmul floor of a dense step: {floor:.3f} s = {b / floor:.0f} act/s"
        + "".join(f", {b / floor / a:.2f}x SAELens {arch}"
                  for arch, a in anchors.items()))


if __name__ == "__main__":
  main()
