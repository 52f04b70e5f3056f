"""Tokens/s training a resid_post SAE at every layer of Gemma 3 270M: one
group run (one Gemma forward per window batch feeds all 18 dictionaries)
against 18 single-dictionary runs (each its own Gemma forward, stopped
after its layer), measured in the same run of this script.

  group     `trainer.train` with group.layers='all' (training/group.py):
            JumpReLU width --width, batch 256, --tokens activations per
            dictionary, harvested live from the embedded English in windows
            of 8 x 128, one bucket, no eval.
  separate  `trainer.train` once per layer with the same config at
            hookpoint layer_L/resid_post.
Gemma's weights and the tokenized corpus are loaded once and shared by all
runs (the trainer's loaders are wrapped), so the times cover harvesting,
jit compilation, the steps, the checkpoint and the export. Reported rate:
activations per dictionary / wall seconds, i.e. how fast the whole
all-layers job advances; the issue's target is a ratio of at least 5.

  .venv/bin/python benchmarks/all_layers.py [--tokens 16384] [--width 1024]
  .venv/bin/python benchmarks/all_layers.py --quick    # 4096 tokens

Caveat: the CPU (2 cores here) may be shared with other processes; figures
move by tens of percent between runs, so compare the ratio within one run.
With few tokens both sides pay their jit compilations inside the measured
time (the separate runs compile 18 forwards), which favours the group.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from gemscope_jax.training import config as config_lib  # pylint: disable=wrong-import-position
from gemscope_jax.training import plans, sources, trainer  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "jumprelu_270m.py"


def make_config(tokens: int, width: int, extra: str = ""):
  arg = (f"width={width},tokens={tokens},batch=256,"
         f"data.bucket_tokens={tokens},train.checkpoint_every_steps=100000,"
         "train.log_every_steps=8,train.lr_warmup_steps=8,"
         "train.sparsity_warmup_steps=8" + (f",{extra}" if extra else ""))
  c = config_lib.load(f"{CONFIG}:{arg}")
  c.eval.at_end = False
  return c


def share_loaders() -> None:
  """Loads Gemma and tokenizes the corpus once for every run (the trainer
  calls both through the `training.sources` module, so they are wrapped
  there)."""
  load, windows = sources.load_gemma, sources.window_dataset
  cache = {}

  def load_gemma(plan, mesh=None):
    if "gemma" not in cache:
      cache["gemma"] = load(plan, mesh)
    return cache["gemma"]
  sources.load_gemma = load_gemma

  def window_dataset(plan, tokenizer, *, progress, shard_index=0,
                     shard_count=1):
    key = ("ds", shard_index, shard_count)
    if key not in cache:
      cache[key] = windows(plan, tokenizer, progress=progress,
                           shard_index=shard_index, shard_count=shard_count)
    return cache[key]
  sources.window_dataset = window_dataset


def timed_train(c, workdir: pathlib.Path) -> float:
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.perf_counter()
  trainer.train(c, workdir, progress=False)
  return time.perf_counter() - t0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=16384,
                 help="activations per dictionary")
  p.add_argument("--width", type=int, default=1024, help="latents per SAE")
  p.add_argument("--quick", action="store_true", help="4096 tokens")
  args = p.parse_args()
  tokens = 4096 if args.quick else args.tokens
  share_loaders()
  plan = plans.make(make_config(tokens, args.width))
  layers = list(range(plan.model.config.num_layers))
  # Warm the shared loaders so that neither side pays for them.
  from gemscope_jax.text.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel
  sources.load_gemma(plan)
  sources.window_dataset(plan, default_tokenizer(), progress=False)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    t_group = timed_train(make_config(tokens, args.width, "layers=all"),
                          tmp / "group")
    print(f"group: {len(layers)} SAEs x {tokens:,} activations in "
          f"{t_group:.1f} s", flush=True)
    t_sep = 0.0
    for layer in layers:
      t = timed_train(make_config(tokens, args.width, f"layer={layer}"),
                      tmp / f"layer_{layer}")
      t_sep += t
      print(f"  separate layer {layer}: {t:.1f} s", flush=True)
  r_group, r_sep = tokens / t_group, tokens / t_sep
  print(f"width {args.width}, batch 256, {tokens:,} activations per SAE, "
        f"{len(layers)} layers")
  print(f"group (one pass):      {r_group:8.1f} tokens/s "
        f"({t_group:.1f} s)")
  print(f"separate (18 passes):  {r_sep:8.1f} tokens/s ({t_sep:.1f} s)")
  print(f"ratio:                 {r_group / r_sep:8.2f}x (target >= 5x)")


if __name__ == "__main__":
  main()
