"""Tokens/s of our Gemma 3 270M forward against transformers, same CPU, same run.

Both read the real Gemma 3 270M from the same GGUF and run the same batch of
real text (8 windows x 128 tokens). For each framework and precision:
  logits    the full model with the unembedding (262k-way logits)
  backbone  all 18 blocks, no unembedding
  layer 6   stop after block 6 (what harvesting resid_post at layer 6 costs)
Each (framework, precision) runs in its own subprocess, so peak memory
(max RSS, weights included) is measured per configuration, and one
framework's threads or caches never slow the other.

  .venv/bin/python benchmarks/gemma_forward.py [--repeats 5] [--rounds 2]
      [--json out.json]

Anchor measured when the project started: transformers 752
tok/s fp32 and 1436 tok/s bf16 for the backbone; ratios from one run are
what to compare.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

BATCH, SEQ = 8, 128
STOP_LAYER = 6


def real_tokens() -> np.ndarray:
  from gemscope_jax.text import corpora as text_lib
  from gemscope_jax.text.windows import windows_from_files
  from gemscope_jax.text.tokenizer import default_tokenizer
  w = windows_from_files(default_tokenizer(), text_lib.shakespeare_files()[:2],
                         SEQ, BATCH * SEQ)
  assert w.tokens.shape == (BATCH, SEQ) and w.mask.all()
  return w.tokens


def timed(fn, repeats: int) -> float:
  """Median seconds of fn() after two warm-up calls (compilation, caches)."""
  fn()
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def worker_ours(dtype_name: str, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from gemscope_jax import models
  from gemscope_jax.convert import pretrained
  dtype = jnp.dtype(dtype_name)
  config, params = pretrained.load_model("default", dtype=dtype)
  tokens = jnp.asarray(real_tokens())
  mask = tokens != 0
  def run(**kw):
    out = models.forward(params, tokens, mask, config=config, dtype=dtype,
                         **kw)
    jax.block_until_ready(out)
  last = f"layer_{config.num_layers - 1}/resid_post"
  return {
      "logits": timed(lambda: run(logits=True, loss=False), repeats),
      "backbone": timed(lambda: run(logits=False, hookpoints=[last]), repeats),
      "layer6": timed(lambda: run(
          logits=False, hookpoints=[f"layer_{STOP_LAYER}/resid_post"]),
                      repeats),
  }


class _Stop(Exception):
  pass


def worker_hf(dtype_name: str, repeats: int) -> dict:
  import torch
  import transformers
  from gemscope_jax import assets
  path = assets.default_gguf_path()
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=dtype).eval()
  ids = torch.as_tensor(real_tokens(), dtype=torch.long)

  def stop(*_):
    raise _Stop

  def layer6():
    handle = model.model.layers[STOP_LAYER].register_forward_hook(stop)
    try:
      model.model(input_ids=ids, use_cache=False)
    except _Stop:
      pass
    finally:
      handle.remove()

  with torch.inference_mode():
    return {
        "logits": timed(lambda: model(input_ids=ids, use_cache=False).logits,
                        repeats),
        "backbone": timed(lambda: model.model(input_ids=ids, use_cache=False),
                          repeats),
        "layer6": timed(layer6, repeats),
    }


def run_worker(framework: str, dtype: str, repeats: int) -> dict:
  out = subprocess.run(
      [sys.executable, __file__, "--worker", framework, "--dtype", dtype,
       "--repeats", str(repeats)], capture_output=True, text=True, check=False)
  if out.returncode:
    sys.stderr.write(out.stderr[-4000:])
    raise RuntimeError(f"{framework}/{dtype} worker failed")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=2,
                      help="alternate the frameworks this many times and keep"
                      " each one's best round (a shared CPU drifts)")
  parser.add_argument("--json", help="also write the results here")
  parser.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    fn = worker_ours if args.worker == "ours" else worker_hf
    seconds = fn(args.dtype, args.repeats)
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gib": rss_gib}))
    return

  tokens = BATCH * SEQ
  results = {}
  for r in range(args.rounds):
    for dtype in ("float32", "bfloat16"):
      for framework in ("hf", "ours"):
        print(f"[bench] round {r + 1}: {framework} {dtype} ...",
              file=sys.stderr, flush=True)
        new = run_worker(framework, dtype, args.repeats)
        old = results.setdefault(f"{framework}/{dtype}", new)
        for work, sec in new["seconds"].items():
          old["seconds"][work] = min(old["seconds"][work], sec)
        old["peak_rss_gib"] = max(old["peak_rss_gib"], new["peak_rss_gib"])

  print(f"\nGemma 3 270M forward, batch {BATCH} x {SEQ} real tokens, "
        f"tokens/s (median of {args.repeats} calls, best of {args.rounds} "
        f"alternating rounds)")
  print(f"{'precision':<9} {'work':<9} {'transformers':>13} {'ours':>9} "
        f"{'ratio':>6}   ours: cost vs backbone (ideal layer 6: "
        f"{(STOP_LAYER + 1) / 18:.2f})")
  for dtype in ("float32", "bfloat16"):
    hf, ours = results[f"hf/{dtype}"], results[f"ours/{dtype}"]
    for work in ("logits", "backbone", "layer6"):
      a = tokens / hf["seconds"][work]
      b = tokens / ours["seconds"][work]
      rel = ours["seconds"][work] / ours["seconds"]["backbone"]
      print(f"{dtype:<9} {work:<9} {a:>13,.0f} {b:>9,.0f} {b / a:>5.2f}x"
            f"   {rel:.2f}")
  print(f"\npeak RSS (GiB, weights included): " + ", ".join(
      f"{k} {v['peak_rss_gib']:.2f}" for k, v in results.items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
