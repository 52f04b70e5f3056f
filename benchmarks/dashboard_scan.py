"""Dashboard scan speed: `dashboards.scan.scan` on the real Gemma 3 270M.

Scans `--tokens` tokens of Shakespeare in BOS + (seq_len - 1) windows with
a dictionary folder (default: the main job's 4096-wide layer-6 JumpReLU
SAE in out/main/export, else a random one of `--width`), and prints the
steady tokens/s of both passes together (after a warm-up call that
compiles), the compile time, the lens time, the records time and the peak RSS.

  .venv/bin/python benchmarks/dashboard_scan.py [--tokens 16384]
      [--batch 8] [--seq-len 128] [--dictionary out/main/export]

DESIGN.md §9's anchor: SAEDashboard 0.8 took 345 s (182 s of forward
passes) for 4096 latents over 262k tokens on 2 cores.
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=16384)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--dictionary", default=str(ROOT / "out/main/export"))
  ap.add_argument("--width", type=int, default=4096)
  ap.add_argument("--records", type=int, default=256,
                  help="latents to make records of (timed)")
  args = ap.parse_args()

  from gemscope_jax import interop, text
  from gemscope_jax.convert import pretrained
  from gemscope_jax.dashboards import records, scan
  from gemscope_jax.text.tokenizer import default_tokenizer
  from gemscope_jax.text.windows import windows_from_ids

  config, params = pretrained.load_model("default")
  tok = default_tokenizer()
  body = text.read_text(text.shakespeare_files())[:args.tokens * 8]
  windows = windows_from_ids(np.asarray(tok.encode(body)), args.seq_len,
                             tok.bos_id, max_tokens=args.tokens)
  if pathlib.Path(args.dictionary).is_dir():
    d = interop.load_dictionary(args.dictionary)
  else:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(config.d_model, args.width)) / 30
    d = interop.InferenceDictionary(
        w_enc=w, w_dec=w.T, b_enc=np.zeros(args.width),
        b_dec=np.zeros(config.d_model), threshold=np.full(args.width, 3.0),
        hookpoint="layer_6/resid_post")
  # Warm up on the first batch of windows (the same compiled programs).
  first = text.windows.Windows(windows.tokens[:args.batch],
                               windows.mask[:args.batch])
  t0 = time.perf_counter()
  scan.scan(config, params, d, first, tok, batch_size=args.batch,
            progress=False, lens=False)
  t_compile = time.perf_counter() - t0
  passes = []
  t0 = time.perf_counter()
  r = scan.scan(config, params, d, windows, tok, batch_size=args.batch,
                progress=False, lens=False,
                on_chunk=lambda n, w: passes.append(n))
  t_scan = time.perf_counter() - t0
  t1 = time.perf_counter()
  extras = scan.lens_lib.compute(scan.dl.source(d, config), config, params)
  t_lens = time.perf_counter() - t1
  print(f"{windows.num_tokens} tokens ({windows.tokens.shape[0]} windows of "
        f"{args.seq_len}), width {r.width}, batch {args.batch}")
  rate = windows.num_tokens / t_scan
  print(f"scan (both passes): {t_scan:.1f} s, {rate:,.0f} tokens/s "
        f"({2 * rate:,.0f} tokens/s per pass); first call with compiles "
        f"{t_compile:.1f} s; lens + neighbours {t_lens:.1f} s")
  r = scan.dataclasses.replace(r, **extras)
  t2 = time.perf_counter()
  _, latents = records.records(r, windows, tok,
                               latents=range(min(args.records, r.width)))
  n = sum(1 for _ in latents)
  print(f"records: {n / (time.perf_counter() - t2):,.0f} latents/s; alive "
        f"{int((~r.dead).sum())}/{r.width}; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
  main()
