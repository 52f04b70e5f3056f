"""End-to-end activations/s of the main job (live harvest + training) vs a
PyTorch pipeline doing the same work, in one run on the same CPU.

  ours    `trainer.train` on experiments/jumprelu_270m.py (JumpReLU width
          4096, batch 512, Gemma 3 270M `layer_6/resid_post` harvested live
          from its data.text in windows of 8 x 128, no cache), with
          train.num_tokens=--tokens and eval.at_end=False (data.bucket_tokens
          cut to --tokens when smaller, else a whole 65,536-row bucket is
          harvested for a smaller run). Timed phases (by wrapping the
          trainer's own functions, nothing changed in them): Gemma
          loading, tokenization of the corpus, every `HarvestSource.next_bucket`
          (the Gemma forwards) and the export; end-to-end rate = trained
          activations / (wall time - loading - tokenization - export), so the
          jit compilations, the train state's init and the checkpoint stay in.
          (The trainer's own `acts_per_s` in metrics.jsonl starts its clock
          after the first bucket is harvested, so with one bucket it is the
          step rate alone; it is shown too.)
  anchor  transformers' Gemma3ForCausalLM read from the same GGUF (float32,
          eager attention, as tests/conftest.py's `hf_real_model`), run on the
          same kind of windows (8 x 128 tokens of the job's data.text, BOS
          first, in file order rather than shuffled) and
          stopped after block 6 by a forward hook that raises; ordinary-token
          rows kept. Then SAELens 6.54's `JumpReLUTrainingSAE` trained by its
          `SAETrainer.step` (quadratic L0 penalty, target 60, width 4096,
          batch 512, inputs at unit mean squared norm) on those rows for the
          same number of steps. Reported: harvest tokens/s (positions through
          the model) and rows/s, step activations/s, and the pipeline rate
          1 / (1/harvest rows/s + 1/step act/s).

  .venv/bin/python benchmarks/end_to_end.py [--tokens 65536] [--quick]

Caveat: the CPU (2 cores here) may be shared with other processes; figures
move by tens of percent between runs, compare the ratio within one run. With
few tokens ours pays its jit compilations (Gemma forward, train step) inside
the measured time; more --tokens amortise them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import shutil
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # pylint: disable=wrong-import-position

from gemscope_jax import assets  # pylint: disable=wrong-import-position
from gemscope_jax.data import pipeline, stream  # pylint: disable=wrong-import-position
from gemscope_jax.text import corpora  # pylint: disable=wrong-import-position
from gemscope_jax.text import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position
from gemscope_jax.text.windows import windows_from_files  # pylint: disable=wrong-import-position
from gemscope_jax.training import config as config_lib  # pylint: disable=wrong-import-position
from gemscope_jax.training import export as export_lib  # pylint: disable=wrong-import-position
from gemscope_jax.training import sources, trainer  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "jumprelu_270m.py"
BATCH, SEQ, STOP_LAYER = 8, 128, 6


class _Timers:
  """Accumulated seconds (and counts) of wrapped callables."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.calls: dict[str, int] = {}

  def wrap(self, name, fn):
    @functools.wraps(fn)
    def timed(*a, **kw):
      t0 = time.perf_counter()
      try:
        return fn(*a, **kw)
      finally:
        self.seconds[name] = (self.seconds.get(name, 0.0)
                              + time.perf_counter() - t0)
        self.calls[name] = self.calls.get(name, 0) + 1
    return timed


def run_ours(tokens: int, workdir: pathlib.Path) -> dict:
  """The main job, cut to `tokens` activations, with its phases timed."""
  c = config_lib.load(str(CONFIG))
  # A run smaller than one bucket would still harvest a whole bucket (the
  # trainer fills its first bucket before the first step): shrink it then.
  c = config_lib.apply_overrides(c, {
      "train.num_tokens": tokens, "eval.at_end": False,
      "data.bucket_tokens": min(c.data.bucket_tokens, tokens)})
  if workdir.exists():
    shutil.rmtree(workdir)  # a fresh run, not a resume
  timers = _Timers()
  seen = {"tokens": 0, "rows": 0}
  # The trainer calls these through their modules (`sources.load_gemma`,
  # `export_lib.export`) or by the name it imported (`default_tokenizer`).
  originals = (sources.load_gemma, export_lib.export,
               pipeline.TokenWindowSource.from_files,
               stream.HarvestSource.next_bucket,
               trainer.default_tokenizer)

  def next_bucket(self):
    before = self.tokens_seen
    bucket = originals[3](self)
    seen["tokens"] += self.tokens_seen - before
    seen["rows"] += len(next(iter(bucket.values())))
    return bucket

  sources.load_gemma = timers.wrap("load", originals[0])
  export_lib.export = timers.wrap("export", originals[1])
  pipeline.TokenWindowSource.from_files = timers.wrap(
      "tokenize", originals[2])
  stream.HarvestSource.next_bucket = timers.wrap("harvest", next_bucket)
  trainer.default_tokenizer = timers.wrap("load_tokenizer", originals[4])
  try:
    t0 = time.perf_counter()
    result = trainer.train(c, workdir, progress=False)
    wall = time.perf_counter() - t0
  finally:
    (sources.load_gemma, export_lib.export,
     pipeline.TokenWindowSource.from_files, stream.HarvestSource.next_bucket,
     trainer.default_tokenizer) = originals
  s = timers.seconds
  setup = sum(s.get(k, 0.0) for k in ("load", "tokenize", "export",
                                      "load_tokenizer"))
  acts = result["step"] * c.train.batch_size
  harvest = s.get("harvest", 0.0)
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return {
      "acts": acts, "wall_s": wall, "setup_s": setup, "phases": dict(s),
      "e2e_s": wall - setup, "e2e_act_s": acts / (wall - setup),
      "harvest_s": harvest, "harvest_tokens": seen["tokens"],
      "harvest_rows": seen["rows"],
      "harvest_tok_s": seen["tokens"] / max(harvest, 1e-9),
      "harvest_rows_s": seen["rows"] / max(harvest, 1e-9),
      "train_s": wall - setup - harvest,
      "train_act_s": acts / max(wall - setup - harvest, 1e-9),
      "logged_acts_per_s": rows[-1].get("acts_per_s") if rows else None,
      "l0": result.get("train_l0"), "fvu": result.get("train_fvu"),
      "batch": c.train.batch_size, "width": c.dictionary.width,
      "target_l0": c.dictionary.target_l0, "hookpoint": c.hookpoint,
      "text": c.data.text,
  }


class _Stop(Exception):
  """Raised by the hook after block STOP_LAYER: the forward ends there."""


def run_anchor(tokens: int, *, text: str, batch: int, width: int,
               target_l0: float, seed: int = 0) -> dict:
  """transformers to layer 6 + SAELens JumpReLU training, timed apart."""
  # pylint: disable=import-outside-toplevel
  import torch
  import transformers
  from sae_lens.config import SAETrainerConfig
  from sae_lens.saes.jumprelu_sae import (JumpReLUTrainingSAE,
                                          JumpReLUTrainingSAEConfig)
  from sae_lens.training.sae_trainer import SAETrainer
  torch.manual_seed(seed)
  gguf = assets.default_gguf_path()
  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
      attn_implementation="eager").eval()
  load_s = time.perf_counter() - t0
  tok = tokenizer_lib.default_tokenizer()
  special = np.fromiter(tok.special_ids, np.int64)
  # Enough windows for `tokens` ordinary rows (BOS is dropped), plus margin.
  files = corpora.text_files(text, "config.data.text")
  windows = windows_from_files(tok, files, SEQ,
                               int(tokens * SEQ / (SEQ - 1)) + BATCH * SEQ)
  captured = {}

  def stop(_module, _inputs, output):
    captured["x"] = output[0] if isinstance(output, tuple) else output
    raise _Stop

  handle = model.model.layers[STOP_LAYER].register_forward_hook(stop)
  parts, rows, positions = [], 0, 0
  t0 = time.perf_counter()
  with torch.inference_mode():
    for ids, mask in windows.batches(BATCH):
      if rows >= tokens:
        break
      try:
        model(input_ids=torch.from_numpy(ids.astype(np.int64)),
              attention_mask=torch.from_numpy(mask.astype(np.int64)))
      except _Stop:
        pass
      keep = mask & ~np.isin(ids, special)
      x = captured.pop("x")[torch.from_numpy(keep)]
      parts.append(x.float())
      rows += x.shape[0]
      positions += int(mask.sum())
  harvest_s = time.perf_counter() - t0
  handle.remove()
  del model
  acts = torch.cat(parts)

  steps = tokens // batch
  sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
      d_in=acts.shape[1], d_sae=width, dtype="float32", device="cpu",
      jumprelu_sparsity_loss_mode="quadratic", target_l0=target_l0,
      jumprelu_bandwidth=0.001, jumprelu_init_threshold=0.001,
      l0_coefficient=1.0))
  sae_trainer = SAETrainer(
      cfg=SAETrainerConfig(total_training_samples=steps * batch,
                           train_batch_size_samples=batch, lr=1e-3,
                           lr_end=1e-3, adam_beta1=0.0),
      sae=sae, data_provider=iter(()))
  sae_trainer.activation_scaler.scaling_factor = float(
      1.0 / acts.pow(2).sum(-1).mean().sqrt())
  order = torch.randperm(acts.shape[0])
  t0 = time.perf_counter()
  l0 = float("nan")
  for i in range(steps):
    out = sae_trainer.step(acts[order[i * batch:(i + 1) * batch]])
    sae_trainer.n_training_steps += 1
    if i == steps - 1:
      l0 = float((out.feature_acts != 0).float().sum(-1).mean())
  train_s = time.perf_counter() - t0
  h_rows = rows / harvest_s
  t_rate = steps * batch / train_s
  return {
      "load_s": load_s, "harvest_s": harvest_s, "harvest_tokens": positions,
      "harvest_rows": rows, "harvest_tok_s": positions / harvest_s,
      "harvest_rows_s": h_rows, "train_s": train_s, "steps": steps,
      "acts": steps * batch, "train_act_s": t_rate,
      "pipeline_act_s": 1.0 / (1.0 / h_rows + 1.0 / t_rate), "l0": l0,
      "torch_threads": torch.get_num_threads(),
      "transformers": transformers.__version__,
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=65_536,
                  help="training activations (both pipelines)")
  ap.add_argument("--workdir", default="/tmp/gemscope_end_to_end")
  ap.add_argument("--skip-anchor", action="store_true")
  ap.add_argument("--json", help="also write the results here")
  ap.add_argument("--quick", action="store_true",
                  help="smoke run: 8,192 tokens")
  args = ap.parse_args()
  if args.quick:
    args.tokens = 8192
  import jax  # pylint: disable=import-outside-toplevel
  print(f"main job end to end: {args.tokens:,} activations, jax "
        f"{jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs", flush=True)
  tokenizer_lib.default_tokenizer()  # warm caches outside every timing
  ours = run_ours(args.tokens, pathlib.Path(args.workdir))
  p = ours["phases"]
  print(f"ours: wall {ours['wall_s']:.1f} s = load {p.get('load', 0):.1f} + "
        f"tokenize {p.get('tokenize', 0):.1f} + export "
        f"{p.get('export', 0):.1f} + harvest {ours['harvest_s']:.1f} + "
        f"train/compile/checkpoint {ours['train_s']:.1f} s; final L0 "
        f"{ours['l0']:.1f}, FVU {ours['fvu']:.3f}", flush=True)
  anchor = None
  if not args.skip_anchor:
    anchor = run_anchor(args.tokens, text=ours["text"], batch=ours["batch"],
                        width=ours["width"], target_l0=ours["target_l0"])
    print(f"anchor: transformers {anchor['transformers']} "
          f"({anchor['torch_threads']} torch threads), loaded in "
          f"{anchor['load_s']:.1f} s; harvest {anchor['harvest_s']:.1f} s, "
          f"SAELens {anchor['steps']} steps {anchor['train_s']:.1f} s; final "
          f"L0 {anchor['l0']:.1f}", flush=True)

  print()
  print(f"{ours['hookpoint']}, JumpReLU width {ours['width']}, batch "
        f"{ours['batch']}, windows {BATCH} x {SEQ}, fp32, "
        f"{ours['acts']:,} activations trained")
  print(f"{'pipeline':10s} {'harvest tok/s':>13s} {'harvest rows/s':>14s} "
        f"{'step act/s':>10s} {'end-to-end act/s':>16s}")
  print(f"{'ours':10s} {ours['harvest_tok_s']:13.0f} "
        f"{ours['harvest_rows_s']:14.0f} {ours['train_act_s']:10.0f} "
        f"{ours['e2e_act_s']:16.0f}   (measured wall, compile included)")
  if anchor:
    print(f"{'anchor':10s} {anchor['harvest_tok_s']:13.0f} "
          f"{anchor['harvest_rows_s']:14.0f} {anchor['train_act_s']:10.0f} "
          f"{anchor['pipeline_act_s']:16.0f}   (1/(1/h + 1/t))")
    ours_pipe = 1.0 / (1.0 / ours["harvest_rows_s"]
                       + 1.0 / ours["train_act_s"])

    def ratio(ours_key, anchor_key):
      return ours[ours_key] / anchor[anchor_key]
    print(f"{'ratio':10s} {ratio('harvest_tok_s', 'harvest_tok_s'):12.2f}x "
          f"{ours['harvest_rows_s'] / anchor['harvest_rows_s']:13.2f}x "
          f"{ours['train_act_s'] / anchor['train_act_s']:9.2f}x "
          f"{ratio('e2e_act_s', 'pipeline_act_s'):15.2f}x   ours / anchor")
    print(f"(ours as 1/(1/h + 1/t) from its phases: {ours_pipe:.0f} act/s; "
          f"the trainer's logged acts_per_s, which starts after the first "
          f"bucket's harvest: {ours['logged_acts_per_s'] or float('nan'):.0f})")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"ours": ours, "anchor": anchor}, indent=2, default=str))


if __name__ == "__main__":
  main()
