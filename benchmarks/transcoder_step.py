"""Activations/s of a transcoder's and a CLT's training step: sparse vs dense.

One step = the trainer's own jitted, state-donating `training.step.Run.step`
(forward, gradients, decoder-gradient projection, Adam, renormalisation,
threshold clip, counters and metrics), fp32, one CPU device, for:

  jumprelu_transcoder  layer_6/mlp_in -> mlp_out (d 640 -> 640), affine skip,
                       quadratic L0 penalty, width --width
  topk_transcoder      the same with TopK (k = --l0), affine skip
  jumprelu_clt         mlp_in -> mlp_out of layers 3-6 (4 layers, d 640),
                       --clt-width latents per layer, L0 --l0 per layer
  topk_clt             the same with TopK (k = 4 * --l0 over all layers)

each by train.step='dense' and 'sparse' in the same process, and the ratio.
'dense' is the default step: hand-derived gradients for the transcoders
(`training/grads/dense.py`, fused CPU kernel and oneDNN matmuls); a CLT has
no hand-derived dense step, so its 'dense' is `jax.value_and_grad` of
`compute_loss` (what `train.step=dense` runs for it). 'sparse' is
`training/grads/sparse.py`, JumpReLU's pair list capped at
`sparse.default_capacity` pairs per token (4 * the L0 target; a longer
list would run the dense fallback, which the printed overflow shows).

Inputs and targets are standard normal. JumpReLU thresholds are set before
timing to each latent's quantile of one batch's pre-activations so that it
fires on L0/width of the tokens (L0 ~ --l0 per layer; the measured L0 is
printed); the learning rate (1e-5) keeps it there over the timed steps.
The config is `config.preset('gemma3_270m')` with model.checkpoint='random'
(the model is never run: the batches are given).

  .venv/bin/python benchmarks/transcoder_step.py [--width 16384]
      [--batch 4096] [--clt-width 4096] [--clt-batch 1024] [--steps 5]
      [--quick]

Caveat: on a small shared CPU figures move by tens of percent between runs;
compare the ratios within one run.
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

from gemscope_jax.training import config as config_lib  # pylint: disable=wrong-import-position
from gemscope_jax.training.grads import sparse  # pylint: disable=wrong-import-position
from gemscope_jax.training.step import Run  # pylint: disable=wrong-import-position

LR = 1e-5
CLT_LAYERS = "3-6"


def _median_time(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def make_run(arch: str, method: str, width: int, batch: int, l0: float,
             bandwidth: float) -> Run:
  """The trainer's Run of `arch` on one device."""
  c = config_lib.preset("gemma3_270m")
  c.model.checkpoint = "random"
  d = c.dictionary
  d.architecture = arch
  d.width = width
  d.bandwidth = bandwidth
  d.sparsity_penalty = "quadratic"
  d.preact_coeff = 0.0
  if arch.endswith("_clt"):
    c.hookpoint = "layer_3/mlp_in"
    d.layers = CLT_LAYERS
    n = len(config_lib.layout(c).inputs)
  else:
    c.hookpoint = "layer_6/mlp_in"
    d.affine_skip = True
    n = 1
  d.target_l0 = l0 * n
  d.k = int(l0 * n)
  t = c.train
  t.step = method
  t.batch_size = batch
  t.num_tokens = batch * 1_000_000
  t.lr, t.lr_warmup_steps, t.lr_decay_fraction = LR, 0, 0.0
  t.sparsity_coeff = 1.0 if arch.startswith("jumprelu") else 0.0
  t.sparsity_warmup_steps = 1
  t.init_norm = 1.0
  run = Run.from_config(c, devices=jax.devices()[:1])
  if method != "sparse" or not arch.startswith("jumprelu"):
    return run
  # The list length `sparse.default_capacity` gives (per token).
  t.sparse_capacity = sparse.default_capacity(run.module, batch) // batch
  return Run.from_config(c, devices=jax.devices()[:1])


def fresh_state(run: Run, threshold=None):
  """`run.init`'s state (b_dec 0, scales 1), thresholds replaced if given."""
  b_dec, scale, target_scale = (jnp.zeros(s.shape, s.dtype) if i == 0
                                else jnp.ones(s.shape, s.dtype)
                                for i, s in enumerate(run.init_shapes))
  state = run.init(jax.random.key(0), b_dec, scale, target_scale)
  if threshold is not None:
    old = state.params["threshold"]
    new = jax.device_put(jnp.asarray(threshold, old.dtype).reshape(old.shape),
                         old.sharding)
    state = state.replace(params={**state.params, "threshold": new})
  return state


def quantile_thresholds(run: Run, x, l0_per_layer: float) -> np.ndarray:
  """Each latent's threshold between its m-th and (m+1)-th largest
  pre-activation over the batch, m = B * L0 / width: L0 ~ l0 per layer."""
  params = jax.device_get(fresh_state(run).params)
  pre = run.module.apply({"params": params}, x, method="pre_acts")
  pre = np.asarray(pre).reshape(x.shape[0], -1)
  width = run.module.d_sae
  m = max(1, int(round(x.shape[0] * l0_per_layer / width)))
  top = -np.partition(-pre, m, axis=0)[:m + 1]
  top = -np.sort(-top, axis=0)
  return np.maximum(0.5 * (top[m - 1] + top[m]), 0.0)


def time_run(run: Run, batch: dict, steps: int, threshold=None):
  """Median seconds per `run.step` (state donated), last step's metrics."""
  batch = jax.device_put(batch, run.batch_sharding)
  held = {"state": fresh_state(run, threshold), "metrics": None}

  def one():
    held["state"], held["metrics"] = run.step(held["state"], batch)
    jax.block_until_ready(held["state"])
  t = _median_time(one, steps, warmup=2)
  return t, {k: float(v) for k, v in jax.device_get(held["metrics"]).items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--width", type=int, default=16384)
  ap.add_argument("--batch", type=int, default=4096)
  ap.add_argument("--clt-width", type=int, default=4096,
                  help="latents per layer")
  ap.add_argument("--clt-batch", type=int, default=1024)
  ap.add_argument("--l0", type=float, default=60.0, help="per layer")
  ap.add_argument("--bandwidth", type=float, default=0.001)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--arch", nargs="*", default=[
      "jumprelu_transcoder", "topk_transcoder", "jumprelu_clt", "topk_clt"])
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: widths 2048 / 512, batches 512 / 256, "
                  "2 steps")
  args = ap.parse_args()
  if args.quick:
    args.width, args.batch, args.clt_width, args.clt_batch = 2048, 512, 512, 256
    args.steps = 2
  print(f"fp32, {args.steps} timed steps (median), jax {jax.__version__} on "
        f"{jax.devices()[0].platform} ({os.cpu_count()} CPUs seen)",
        flush=True)
  rng = np.random.default_rng(0)
  rows = []
  for arch in args.arch:
    clt = arch.endswith("_clt")
    width, b = (args.clt_width, args.clt_batch) if clt else (args.width,
                                                             args.batch)
    runs = {m: make_run(arch, m, width, b, args.l0, args.bandwidth)
            for m in ("dense", "sparse")}
    n = runs["dense"].module.n_layers if clt else 1
    d = 640
    shape = (b, n, d) if clt else (b, d)
    batch = {"x": rng.normal(size=shape).astype(np.float32),
             "target": rng.normal(size=shape).astype(np.float32)}
    threshold = None
    if arch.startswith("jumprelu"):
      threshold = quantile_thresholds(runs["dense"], batch["x"], args.l0)
    size = (f"{n} layers x " if clt else "") + f"width {width}, batch {b}"
    print(f"{arch}: {size}, L0 target {args.l0 * n:g}"
          + (f", sparse capacity {runs['sparse'].plan.step.sparse_capacity}"
             "/token" if threshold is not None else ""), flush=True)
    times = {}
    for method, run in runs.items():
      t, m = time_run(run, batch, args.steps, threshold)
      times[method] = t
      note = f"L0 {m['l0']:.1f}"
      if method == "sparse" and "n_selected" in m:
        note += (f", listed {m['n_selected'] / b:.1f}/token, overflow "
                 f"{m['overflow']:.0f}")
      label = ("dense=autodiff" if clt and method == "dense" else method)
      print(f"  {label:15s} {b / t:9.0f} act/s  {t:7.3f} s/step  {note}",
            flush=True)
    rows.append((arch, size, b / times["dense"], b / times["sparse"]))

  print()
  print(f"{'arch':20s} {'size':28s} {'dense act/s':>11s} "
        f"{'sparse act/s':>12s} {'sparse/dense':>12s}")
  for arch, size, dense, sp in rows:
    print(f"{arch:20s} {size:28s} {dense:11.0f} {sp:12.0f} "
          f"{sp / dense:11.2f}x")


if __name__ == "__main__":
  main()
