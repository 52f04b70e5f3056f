"""Generation speed: our compiled decode loop against transformers' generate.

Both run the real Gemma 3 270M from the same GGUF on the same CPU: batch 1
and 8 of a 128-token real-text prompt, then 128 new tokens (greedy, stop
tokens off so every run takes all 128), in float32 and bfloat16.
  prefill   tokens/s of reading the prompts into a fresh cache
            (ours: `generate._loop.prefill`; transformers: one forward
            with `use_cache=True`)
  decode    new tokens/s over the whole generation, prefill excluded
            (ours: `generate.generate`, one compiled while-loop, greedy
            tokens through the exact int8 screen of the unembedding where
            `generate._loop.screens_greedy` takes it;
            transformers: `model.generate` with its dynamic cache, a
            Python loop that dispatches every op of every token)
Each (framework, precision, batch) runs in its own subprocess so peak RSS is
its own; the cache-size formula (`models.cache_bytes`) is printed beside it.

  .venv/bin/python benchmarks/generate_decode.py [--repeats 3] [--rounds 1]
      [--batches 1,8] [--json out.json]

Targets (issue 15): decode >= 2x at batch 1, >= 1x everywhere; prefill
>= 1x. Ratios from one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

PROMPT, NEW = 128, 128


def prompts(batch: int) -> np.ndarray:
  from gemscope_jax.text import corpora as text_lib
  from gemscope_jax.text.windows import windows_from_files
  from gemscope_jax.text.tokenizer import default_tokenizer
  w = windows_from_files(default_tokenizer(), text_lib.shakespeare_files()[:2],
                         PROMPT, batch * PROMPT)
  assert w.tokens.shape == (batch, PROMPT) and w.mask.all()
  return w.tokens


def best(fn, repeats: int, warm_up: bool = True) -> float:
  """Fastest seconds of fn(), after one warm-up call (compilation) unless
  `warm_up` is False (transformers' generate compiles nothing; its warm-up
  would only double the benchmark's longest part)."""
  if warm_up:
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(min(times))


def worker_ours(dtype_name: str, batch: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from gemscope_jax import generate, models
  from gemscope_jax.convert import pretrained
  from gemscope_jax.generate import _loop
  dtype = jnp.dtype(dtype_name)
  config, params = pretrained.load_model("default", dtype=dtype)
  rows = prompts(batch)
  length = generate.cache_bucket(PROMPT, NEW)
  tokens, mask = generate.left_pad(list(rows), PROMPT)

  def prefill():
    jax.block_until_ready(_loop.prefill(
        params, jnp.asarray(tokens), jnp.asarray(mask), {}, config=config,
        dtype=dtype, cache_length=length))

  def whole():
    g = generate.generate(params, list(rows), config=config,
                          max_new_tokens=NEW, stop_tokens=(), dtype=dtype)
    assert all(len(t) == NEW for t in g.tokens)

  # The floor of a decode step: reading every weight once (what a step of
  # any implementation must do at batch 1), as one jitted sum per array.
  read_all = jax.jit(lambda p: sum(jnp.sum(x, dtype=jnp.float32)
                                   for x in jax.tree.leaves(p)))

  def read_weights():
    jax.block_until_ready(read_all(params))

  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return {"prefill": best(prefill, repeats), "whole": best(whole, repeats),
          "read_weights": best(read_weights, 3 * repeats),
          "weight_bytes": weight_bytes,
          "cache_bytes": models.cache_bytes(config, batch, length, dtype),
          "cache_length": length}


def worker_hf(dtype_name: str, batch: int, repeats: int) -> dict:
  import torch
  import transformers
  from gemscope_jax import assets
  path = assets.default_gguf_path()
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=dtype).eval()
  ids = torch.as_tensor(prompts(batch), dtype=torch.long)

  def prefill():
    model(input_ids=ids, use_cache=True)

  def whole():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         do_sample=False, max_new_tokens=NEW,
                         min_new_tokens=NEW, pad_token_id=0)
    assert out.shape[1] == PROMPT + NEW

  with torch.inference_mode():
    return {"prefill": best(prefill, repeats),
            "whole": best(whole, repeats, warm_up=False)}


def run_worker(framework: str, dtype: str, batch: int, repeats: int) -> dict:
  out = subprocess.run(
      [sys.executable, __file__, "--worker", framework, "--dtype", dtype,
       "--batch", str(batch), "--repeats", str(repeats)],
      capture_output=True, text=True, check=False)
  if out.returncode:
    sys.stderr.write(out.stderr[-4000:])
    raise RuntimeError(f"{framework}/{dtype}/batch {batch} worker failed")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=1,
                      help="alternate the frameworks this many times and keep"
                      " each one's best round (a shared CPU drifts)")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--json", help="also write the results here")
  parser.add_argument("--worker", choices=("ours", "hf"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker:
    fn = worker_ours if args.worker == "ours" else worker_hf
    result = fn(args.dtype, args.batch, args.repeats)
    result["peak_rss_gib"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(json.dumps(result))
    return

  batches = [int(b) for b in args.batches.split(",")]
  dtypes = args.dtypes.split(",")
  results = {}
  for r in range(args.rounds):
    for dtype in dtypes:
      for batch in batches:
        for framework in ("hf", "ours"):
          print(f"[bench] round {r + 1}: {framework} {dtype} batch {batch}",
                file=sys.stderr, flush=True)
          new = run_worker(framework, dtype, batch, args.repeats)
          key = f"{framework}/{dtype}/{batch}"
          old = results.setdefault(key, new)
          for k in ("prefill", "whole", "read_weights"):
            if k not in new:
              continue
            old[k] = min(old[k], new[k])
          old["peak_rss_gib"] = max(old["peak_rss_gib"], new["peak_rss_gib"])

  print(f"\nGemma 3 270M generation, {PROMPT}-token prompt + {NEW} new "
        f"tokens, greedy (best of {args.repeats} calls x {args.rounds} "
        "rounds)")
  print(f"{'precision':<9} {'batch':>5} {'work':<8} {'transformers':>13} "
        f"{'ours':>9} {'ratio':>6}   tokens/s")
  for dtype in dtypes:
    for batch in batches:
      hf = results[f"hf/{dtype}/{batch}"]
      ours = results[f"ours/{dtype}/{batch}"]
      for work in ("prefill", "decode"):
        if work == "prefill":
          a, b = (batch * PROMPT / x["prefill"] for x in (hf, ours))
        else:
          a, b = (batch * NEW / (x["whole"] - x["prefill"])
                  for x in (hf, ours))
        print(f"{dtype:<9} {batch:>5} {work:<8} {a:>13,.0f} {b:>9,.0f} "
              f"{b / a:>5.2f}x")
  print("\nthe floor of a decode step at batch 1: reading every weight once"
        " (a jitted sum, this machine, this run):")
  for dtype in dtypes:
    ours = results[f"ours/{dtype}/{batches[0]}"]
    hf = results[f"hf/{dtype}/{batches[0]}"]
    floor = ours["read_weights"]
    hf_step = (hf["whole"] - hf["prefill"]) / NEW
    print(f"  {dtype}: {ours['weight_bytes'] / 2**30:.2f} GiB in "
          f"{floor * 1e3:.1f} ms ({ours['weight_bytes'] / floor / 1e9:.0f} "
          f"GB/s): at most {1 / floor:.0f} tokens/s, "
          f"{hf_step / floor:.2f}x transformers' step")
  print("\npeak RSS (GiB, weights included) and our KV cache by formula:")
  for dtype in dtypes:
    for batch in batches:
      hf = results[f"hf/{dtype}/{batch}"]
      ours = results[f"ours/{dtype}/{batch}"]
      print(f"  {dtype} batch {batch}: transformers {hf['peak_rss_gib']:.2f},"
            f" ours {ours['peak_rss_gib']:.2f}; cache "
            f"{ours['cache_bytes'] / 2**20:.1f} MiB "
            f"({ours['cache_length']} slots on global layers)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
