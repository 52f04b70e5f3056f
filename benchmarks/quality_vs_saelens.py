"""SAE quality at an equal budget: our JumpReLU trainer vs SAELens 6.54's.

Both train a JumpReLU SAE (width 4096, batch 512, Gemma Scope 2 quadratic L0
penalty with target L0* = 60) on the SAME activations, in the SAME order: Gemma
3 270M `layer_6/resid_post` over Shakespeare (minus the two files
`english_heldout` keeps back), special tokens dropped, harvested
once into an on-disk activation cache (`data.cache_dir`) and read back through
`ActivationBatches(CacheBuckets(...))` with the run seed, for the same number
of training steps (`--tokens` // 512).

  ours              `trainer.train` on experiments/jumprelu_270m.py with
                    train.num_tokens=--tokens, data.cache_dir set and
                    eval.at_end=False (lr 1e-3 with 150 warm-up steps and a
                    linear decay over the last 20 %, Adam b1=0, sparsity
                    coefficient 1 warmed up over 300 steps, bandwidth 1e-3,
                    inputs scaled to unit mean squared norm, b_dec at the
                    mean, unit-norm decoder rows, encoder columns started at
                    norm 0.3: train.init_norm).
  saelens-default   SAELens's `JumpReLUTrainingSAE` + `SAETrainer` with its
                    own defaults (lr 3e-4 constant, Adam b1=0.9, bandwidth
                    0.05, initial threshold 0.01, decoder init norm 0.1, no
                    warm-ups, normalize_activations="expected_average_only_in",
                    i.e. E||x|| = sqrt(d_in)), jumprelu_sparsity_loss_mode=
                    "quadratic", target_l0=60, l0_coefficient=1.
  saelens-ourhp@c   SAELens's trainer with our hyper-parameters: lr 1e-3, 150
                    warm-up steps, linear decay over the last 20 % of steps,
                    Adam b1=0, l0 warm-up 300 steps, bandwidth and initial
                    threshold 1e-3, inputs scaled to unit mean squared norm
                    (its `ActivationScaler.scaling_factor` set to
                    1/sqrt(E||x||^2)
                    from the cache's statistics; `fit` folds it back), b_dec
                    started at the (scaled) data mean; one run per
                    l0_coefficient c in --saelens-coeffs.
SAELens keeps its own per-step machinery (gradient clipping at norm 1, its
initialisation: decoder rows of norm 0.1 and W_enc = W_dec^T, no decoder
renormalisation, and its quadratic penalty taken per token and averaged,
E_t[(2/L0*)(l0_t - L0*)^2], where ours takes it of the batch-mean L0).
Our trainer reproduces SAELens's run with train.grad_clip_norm=1,
train.unit_decoder=False, train.init_norm=0.1, train.l0_per_token=True,
train.sparsity_coeff=0.03, dictionary.preact_coeff=0 (held-out Shakespeare
FVU 0.082 vs SAELens's 0.089 at L0 61, about 78 % of latents dead in both);
of these, the encoder's initial scale alone accounts for the FVU gap.

Every SAE is then written in inference form (raw units: pre = x @ w_enc +
b_enc, f = pre * (pre > threshold), recon = f @ w_dec + b_dec), wrapped in our
`dictionaries.JumpReLU` with pre_enc_bias=False, and evaluated by
`evals.evaluate.evaluate` on the same held-out windows of two texts,
`--eval-tokens` each: the Python docs (a shifted domain) and the held-out
Shakespeare files (in domain): L0, FVU, dead fraction, delta LM loss and
loss recovered, one table per text.
FVU is compared at matched L0: the saelens-ourhp sweep's FVU is interpolated
(linearly in log L0) at our L0 when its L0s bracket ours; otherwise the table
says the L0s are not matched.

  .venv/bin/python benchmarks/quality_vs_saelens.py [--tokens 204800]
      [--eval-tokens 16384] [--saelens-coeffs 1,3,10] [--saelens-targets 70,80]
      [--set train.init_norm=1.0 ...]
      [--quick]

Caveat: on a shared CPU the wall times are indicative only; the quality
metrics do not depend on load. One seed per run: differences of a few
hundredths of FVU are within seed noise at this scale. Dead fractions are
counted on the eval tokens only, so a latent that fires rarely in domain
reads as dead on 8k tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import safetensors.numpy  # pylint: disable=wrong-import-position

from gemscope_jax import dictionaries  # pylint: disable=wrong-import-position
from gemscope_jax.convert import pretrained  # pylint: disable=wrong-import-position
from gemscope_jax.data import activation_cache, stream  # pylint: disable=wrong-import-position
from gemscope_jax.text import corpora as text_lib  # pylint: disable=wrong-import-position
from gemscope_jax.text.windows import windows_from_files  # pylint: disable=wrong-import-position
from gemscope_jax.training import config as config_lib  # pylint: disable=wrong-import-position
from gemscope_jax.evals import evaluate as eval_lib  # pylint: disable=wrong-import-position
from gemscope_jax.training import trainer  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "jumprelu_270m.py"


def split_shakespeare() -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """(training, held-out) Shakespeare files: the held-out ones are those
  `english_heldout` keeps back (`text.is_heldout`)."""
  files = text_lib.shakespeare_files()
  return ([f for f in files if not text_lib.is_heldout(f)],
          [f for f in files if text_lib.is_heldout(f)])


def our_config(tokens: int, cache_dir: pathlib.Path, overrides=None):
  """The main job's config, cut to `tokens`, on Shakespeare, reading a cache.

  The training text is pinned to the Shakespeare files `english_heldout`
  does not keep back, so that every Python-docs file and the held-out
  Shakespeare files stay unseen (the main job's default `english` mixes
  most Python docs in). `overrides` (dotted config keys) are applied last.
  """
  c = config_lib.load(str(CONFIG))
  train_files, _ = split_shakespeare()
  return config_lib.apply_overrides(c, {
      "train.num_tokens": tokens, "data.cache_dir": str(cache_dir),
      "data.text": ",".join(str(f) for f in train_files),
      "eval.at_end": False, **(overrides or {})})


def train_ours(c, workdir: pathlib.Path) -> tuple[dict, dict, float]:
  """Trains ours from scratch; (inference arrays, train metrics, seconds)."""
  if workdir.exists():
    shutil.rmtree(workdir)  # a fresh run, not a resume
  t0 = time.perf_counter()
  result = trainer.train(c, workdir, progress=False)
  seconds = time.perf_counter() - t0
  arrays = safetensors.numpy.load_file(
      str(workdir / "export" / "params.safetensors"))
  return arrays, result, seconds


def cache_batches(c, cache: activation_cache.ActivationCache):
  """The shuffled (batch, d_in) batches ours trains on, in the same order."""
  return stream.ActivationBatches(
      activation_cache.CacheBuckets(cache, seed=c.seed),
      batch_size=c.train.batch_size, seed=c.seed)


def train_saelens(c, cache: activation_cache.ActivationCache, *, variant: str,
                  coeff: float, steps: int, target_l0: float | None = None
                  ) -> tuple[dict, float, dict]:
  """Trains SAELens's JumpReLU with its own `SAETrainer` on the cache.

  Args:
    c: our config (hookpoint, width, batch, target L0, seed, schedule).
    cache: the activation cache ours trained on.
    variant: 'default' (SAELens's defaults) or 'ourhp' (our
      hyper-parameters and unit mean-squared-norm inputs).
    coeff: SAELens's l0_coefficient.
    steps: training steps (batches of c.train.batch_size).
    target_l0: SAELens's quadratic-penalty target; None means ours.

  Returns:
    (inference arrays in raw units, the final step's training stats, seconds).
  """
  # pylint: disable=import-outside-toplevel
  import torch
  from sae_lens.config import SAETrainerConfig
  from sae_lens.saes.jumprelu_sae import (JumpReLUTrainingSAE,
                                          JumpReLUTrainingSAEConfig)
  from sae_lens.training.sae_trainer import SAETrainer
  torch.manual_seed(c.seed)
  hp = c.hookpoint
  d_in, width, batch = cache.widths[hp], c.dictionary.width, c.train.batch_size
  common = dict(d_in=d_in, d_sae=width, dtype="float32", device="cpu",
                jumprelu_sparsity_loss_mode="quadratic",
                target_l0=float(c.dictionary.target_l0 if target_l0 is None
                                else target_l0), l0_coefficient=coeff)
  if variant == "default":
    sae_cfg = JumpReLUTrainingSAEConfig(
        normalize_activations="expected_average_only_in", **common)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch,
        lr_end=3e-4 / 10,  # what its runner config fills in (unused:
        n_batches_for_norm_estimate=min(100, steps))  # constant schedule)
  elif variant == "ourhp":
    t = c.train
    sae_cfg = JumpReLUTrainingSAEConfig(
        normalize_activations="none", jumprelu_bandwidth=c.dictionary.bandwidth,
        jumprelu_init_threshold=0.001, l0_warm_up_steps=t.sparsity_warmup_steps,
        **common)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch,
        lr=t.lr, lr_end=t.lr, lr_warm_up_steps=min(t.lr_warmup_steps, steps),
        lr_decay_steps=int(round(t.lr_decay_fraction * steps)),
        adam_beta1=t.beta1, adam_beta2=t.beta2)
  else:
    raise ValueError(f"unknown SAELens variant {variant!r}")
  sae = JumpReLUTrainingSAE(sae_cfg)
  data = (torch.from_numpy(b[hp]) for b in cache_batches(c, cache))
  sae_trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data)
  if variant == "ourhp":
    scale = 1.0 / math.sqrt(cache.mean_squared_norm(hp))
    sae_trainer.activation_scaler.scaling_factor = scale
    with torch.no_grad():
      sae.b_dec.copy_(torch.from_numpy(
          (cache.mean(hp) * scale).astype(np.float32)))
  else:
    # Its own norm estimate, on a separate pass over the cache so that the
    # training batches are the same as everyone else's.
    probe = (torch.from_numpy(b[hp]) for b in cache_batches(c, cache))
    sae_trainer.activation_scaler.estimate_scaling_factor(
        d_in, probe, trainer_cfg.n_batches_for_norm_estimate)

  last = {}
  step_fn = sae_trainer.step

  def recording_step(x):
    out = step_fn(x)
    with torch.no_grad():
      last["l0"] = float((out.feature_acts != 0).float().sum(-1).mean())
      err = (out.sae_out.float() - out.sae_in.float()).pow(2).sum()
      var = (out.sae_in.float() - out.sae_in.float().mean(0)).pow(2).sum()
      last["fvu"] = float(err / var)
      last["loss"] = float(out.loss)
    return out
  sae_trainer.step = recording_step  # observe the step; train as it does
  t0 = time.perf_counter()
  sae = sae_trainer.fit()
  seconds = time.perf_counter() - t0
  last["dead_fraction"] = float(sae_trainer.dead_neurons.float().mean())
  with torch.no_grad():
    w_enc = sae.W_enc.detach().float().numpy()
    b_dec = sae.b_dec.detach().float().numpy()
    arrays = {
        "w_enc": w_enc,
        # SAELens subtracts b_dec before the encoder: fold it into b_enc.
        "b_enc": sae.b_enc.detach().float().numpy() - b_dec @ w_enc,
        "w_dec": sae.W_dec.detach().float().numpy(),
        "b_dec": b_dec,
        "threshold": sae.threshold.detach().float().numpy(),
    }
  return arrays, last, seconds


def evaluate_arrays(arrays: dict, *, model_config, model_params, hookpoint,
                    windows, tokenizer, target_l0: float) -> dict:
  """Held-out metrics of inference-form JumpReLU weights (raw units)."""
  d_in, d_sae = arrays["w_enc"].shape
  module = dictionaries.JumpReLU(d_in=d_in, d_sae=d_sae, pre_enc_bias=False,
                                 target_l0=target_l0)
  params = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
  result = eval_lib.evaluate(
      model_config=model_config, model_params=model_params,
      hookpoint=hookpoint, module=module, params=params, norm_scale=1.0,
      windows=windows, tokenizer=tokenizer, batch_size=8, progress=False)
  return result.metrics


def interpolate_at(l0s: list[float], fvus: list[float], at: float):
  """FVU at L0 `at`, linear in log L0 between the bracketing runs; None if
  `at` is outside the runs' L0 range."""
  pts = sorted(zip(l0s, fvus))
  for (l0a, fa), (l0b, fb) in zip(pts, pts[1:]):
    if l0a <= at <= l0b and l0a > 0:
      if l0b == l0a:
        return 0.5 * (fa + fb)
      w = (math.log(at) - math.log(l0a)) / (math.log(l0b) - math.log(l0a))
      return fa + w * (fb - fa)
  return None


def report(rows: list[dict], set_name: str, args) -> float | None:
  """Prints one eval set's table and matched-L0 line; the SAELens sweep's
  FVU interpolated at our L0 (None when its L0s do not bracket ours)."""
  ours = rows[0]["eval"][set_name]
  print()
  print(f"Held-out {set_name} ({ours['num_tokens']} tokens; clean loss "
        f"{ours['clean_loss']:.3f}, zero-ablation "
        f"{ours['zero_ablation_loss']:.2f} nats):")
  print(f"{'run':26s} {'L0':>7s} {'FVU':>7s} {'dead':>6s} {'dLM':>7s} "
        f"{'recov':>6s} {'cos':>6s} {'FVU/ours':>8s} {'train s':>8s}")
  for row in rows:
    m = row["eval"][set_name]
    print(f"{row['name']:26s} {m['l0']:7.1f} {m['fvu']:7.3f} "
          f"{m['dead_fraction']:6.1%} {m['delta_lm_loss']:7.3f} "
          f"{m['loss_recovered']:6.1%} {m['cosine_sim']:6.3f} "
          f"{m['fvu'] / ours['fvu']:7.2f}x {row['train_s']:8.0f}")
  print("(train s: wall seconds of training; ours' includes harvesting the "
        "cache from Gemma when it is not there yet, the SAELens runs read it)")
  sweep = [r for r in rows if r["name"].startswith("saelens-ourhp")]
  matched = interpolate_at([r["eval"][set_name]["l0"] for r in sweep],
                           [r["eval"][set_name]["fvu"] for r in sweep],
                           ours["l0"])
  if matched is not None:
    print(f"{set_name}, at matched L0 {ours['l0']:.1f}: SAELens (our "
          f"hyper-parameters, interpolated over l0_coefficient "
          f"{args.saelens_coeffs}, targets {args.saelens_targets or 'ours'}) "
          f"FVU {matched:.3f} vs ours {ours['fvu']:.3f}: SAELens/ours FVU "
          f"ratio {matched / ours['fvu']:.2f}x")
  else:
    span = ", ".join(f"{r['eval'][set_name]['l0']:.1f}" for r in sweep)
    print(f"{set_name}: L0s NOT matched: our L0 {ours['l0']:.1f} lies "
          f"outside the saelens-ourhp sweep's L0s [{span}]; the FVU ratios "
          "above compare different sparsities (add --saelens-targets to "
          "bracket it: under the quadratic penalty the coefficient sets how "
          "hard L0 is pulled to the target, so it moves L0 little)")
  return matched


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=204_800,
                  help="training activations, for every SAE")
  ap.add_argument("--eval-tokens", type=int, default=16_384,
                  help="held-out tokens of each eval text")
  ap.add_argument("--saelens-coeffs", default="1,3,10",
                  help="l0_coefficient values of the saelens-ourhp sweep")
  ap.add_argument("--saelens-targets", default="",
                  help="also sweep SAELens's target_l0 (comma list; each "
                  "with every coefficient): the way to bracket our L0, since "
                  "its coefficient barely moves L0")
  ap.add_argument("--skip-default", action="store_true",
                  help="skip the SAELens-defaults run")
  ap.add_argument("--workdir", default="/tmp/gemscope_quality_vs_saelens",
                  help="cache and run directories (the cache is reused)")
  ap.add_argument("--json", help="also write the results here")
  ap.add_argument("--set", action="append", default=[],
                  help="override our config, e.g. train.init_norm=1.0 (the "
                  "published init); repeatable")
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: 16k tokens, 1k eval tokens, one coeff")
  args = ap.parse_args()
  if args.quick:
    args.tokens, args.eval_tokens, args.saelens_coeffs = 16_384, 1024, "1"
  coeffs = [float(v) for v in args.saelens_coeffs.split(",") if v.strip()]
  work = pathlib.Path(args.workdir)
  # The training split of Shakespeare (an older cache_{tokens} held all of
  # it, the held-out files included).
  cache_dir = work / f"cache_split_{args.tokens}"
  c = our_config(args.tokens, cache_dir,
                 config_lib.parse_arg(",".join(args.set)) if args.set else None)
  steps = args.tokens // c.train.batch_size
  import sae_lens  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  print(f"{c.hookpoint} of {c.model.name}, width {c.dictionary.width}, batch "
        f"{c.train.batch_size}, target L0 {c.dictionary.target_l0:g}, "
        f"{args.tokens:,} training activations ({steps} steps) from "
        f"Shakespeare (minus the held-out files), eval on "
        f"{args.eval_tokens:,} tokens each of python_docs and held-out "
        "Shakespeare; "
        f"SAELens {sae_lens.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs",
        flush=True)

  rows = []
  t0 = time.perf_counter()
  arrays, res, secs = train_ours(c, work / f"ours_{args.tokens}")
  print(f"ours: trained in {secs:.0f} s (incl. any harvest into the cache) "
        f"(train L0 {res.get('train_l0', float('nan')):.1f}, FVU "
        f"{res.get('train_fvu', float('nan')):.3f})", flush=True)
  rows.append({"name": "ours", "arrays": arrays, "train_s": secs,
               "train": {"l0": res.get("train_l0"),
                         "fvu": res.get("train_fvu")}})
  cache = activation_cache.ActivationCache(cache_dir)
  runs = [] if args.skip_default else [("saelens-default", "default", 1.0)]
  runs = [(n, v, cf, None) for n, v, cf in runs]
  runs += [(f"saelens-ourhp@{v:g}", "ourhp", v, None) for v in coeffs]
  targets = [float(t) for t in args.saelens_targets.split(",") if t.strip()]
  runs += [(f"saelens-ourhp@{v:g}/L0*{t:g}", "ourhp", v, t)
           for t in targets for v in coeffs]
  for name, variant, coeff, target in runs:
    arrays, last, secs = train_saelens(c, cache, variant=variant, coeff=coeff,
                                       steps=steps, target_l0=target)
    print(f"{name}: trained in {secs:.0f} s (last batch L0 "
          f"{last.get('l0', float('nan')):.1f}, FVU "
          f"{last.get('fvu', float('nan')):.3f})", flush=True)
    rows.append({"name": name, "arrays": arrays, "train_s": secs,
                 "coeff": coeff, "train": last})

  from gemscope_jax.text.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = default_tokenizer()
  model_config, model_params = pretrained.load_model("default")
  eval_sets = {
      # Shifted domain: Python documentation (never trained on).
      "python_docs": text_lib.corpus_files("python_docs"),
      # In domain: the Shakespeare files the training text leaves out.
      "shakespeare_heldout": split_shakespeare()[1],
  }
  matched_all = {}
  for set_name, files in eval_sets.items():
    windows = windows_from_files(tokenizer, files, c.eval.seq_len,
                                 args.eval_tokens)
    for row in rows:
      t1 = time.perf_counter()
      row.setdefault("eval", {})[set_name] = evaluate_arrays(
          row["arrays"], model_config=model_config, model_params=model_params,
          hookpoint=c.hookpoint, windows=windows, tokenizer=tokenizer,
          target_l0=c.dictionary.target_l0)
      m = row["eval"][set_name]
      print(f"eval {row['name']} on {set_name}: L0 {m['l0']:.1f} FVU "
            f"{m['fvu']:.3f} ({time.perf_counter() - t1:.0f} s)", flush=True)
    matched_all[set_name] = report(rows, set_name, args)
  if args.json:
    out = {"tokens": args.tokens, "eval_tokens": args.eval_tokens,
           "matched_fvu_saelens": matched_all,
           "runs": [{k: v for k, v in r.items() if k != "arrays"}
                    for r in rows]}
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2, default=str))
  print(f"(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  main()
