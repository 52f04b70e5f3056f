"""Where a replacement model of transcoders diverges: the LM loss with
chosen sets of layers' MLPs replaced in-pass by their transcoders, and how
far the residual stream has moved.

  .venv/bin/python scripts/replacement_divergence.py EXPORT_DIR \\
      "3;0,1,2,3;4,5,6,7,8,9;10,11,12,13" [--fvu]

EXPORT_DIR holds Gemma Scope 2 transcoder folders layer_{L} (a
`layers=all` transcoder run's export/transcoder). Each ';'-separated set
is replaced at once, each transcoder reading the mlp_in its pass computed
(as `evals.members`' replacement model does; BOS keeps its own MLP
output), on 8 windows of 128 tokens of the embedded held-out text. Prints
the mean next-token loss and, at the set's highest layer and at the last
layer, the mean norm of the residual stream's change over the mean norm
of the clean residual (ordinary positions).

With --fvu, also the FVU of each set's highest-layer transcoder (its
error over the variance of the MLP output it predicts, ordinary
positions) on clean inputs and on the inputs its pass gives with the
rest of the set replaced: whether a transcoder that is good on clean
inputs stays good on the shifted ones its predecessors hand it.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from gemscope_jax import interop, models
from gemscope_jax.convert import pretrained
from gemscope_jax.text import corpora
from gemscope_jax.text.tokenizer import default_tokenizer


def _edit(d, layer: int, keep):
  """A ReadingEdit replacing layer_L/mlp_out by the transcoder's
  prediction from layer_L/mlp_in, where `keep` (B, T, 1) is true."""
  name = f"layer_{layer}/mlp_in"

  def fn(x, args, seen):
    del args
    y = d.decode(d.encode(seen[name]), seen[name]).astype(x.dtype)
    return jnp.where(keep, y, x)
  return models.ReadingEdit(fn=fn, reads=(name,))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("export_dir")
  ap.add_argument("sets", help="';'-separated comma lists of layers")
  ap.add_argument("--windows", type=int, default=8)
  ap.add_argument("--seq-len", type=int, default=128)
  ap.add_argument("--fvu", action="store_true",
                  help="also the top transcoder's FVU, clean and in-pass")
  args = ap.parse_args()
  config, params = pretrained.load_model("default")
  tok = default_tokenizer()
  ids = tok.encode(corpora.read_text(
      corpora.text_files("english_heldout", "--text")[:3])[:200_000])
  w, s = args.windows, args.seq_len
  tokens = np.array([[tok.bos_id] + ids[i * (s - 1):(i + 1) * (s - 1)]
                     for i in range(w)], np.int32)
  mask = np.ones_like(tokens, bool)
  keep = jnp.asarray(np.arange(s)[None, :, None] > 0)
  L = config.num_layers
  dicts = [interop.load_gemmascope2(f"{args.export_dir}/layer_{l}")
           for l in range(L)]
  names = [f"layer_{l}/resid_post" for l in range(L)]
  mlp = [f"layer_{l}/{site}" for l in range(L) for site in ("mlp_in",
                                                            "mlp_out")]

  def run(edits=None, hookpoints=names):
    return models.forward(params, tokens, mask, config=config,
                          hookpoints=hookpoints, logits=False, loss=True,
                          edits=edits)

  def fvu(layer: int, acts) -> float:
    """The layer's transcoder's FVU on the MLP input and output `acts`
    holds (BOS left out)."""
    x = acts[f"layer_{layer}/mlp_in"][:, 1:]
    y = np.asarray(acts[f"layer_{layer}/mlp_out"][:, 1:], np.float64)
    err = np.asarray(dicts[layer].decode(dicts[layer].encode(x), x)) - y
    return float((err ** 2).sum() / ((y - y.mean((0, 1))) ** 2).sum())

  clean = run(hookpoints=names + mlp if args.fvu else names)
  norm = [float(jnp.linalg.norm(clean.activations[n][:, 1:], axis=-1).mean())
          for n in names]
  print(f"clean loss {float(jnp.mean(clean.loss)):.3f}")
  for spec in args.sets.split(";"):
    layers = [int(a) for a in spec.split(",")]
    t = time.perf_counter()
    out = run({f"layer_{l}/mlp_out": _edit(dicts[l], l, keep)
               for l in layers})
    moved = [float(jnp.linalg.norm(
        (out.activations[n] - clean.activations[n])[:, 1:], axis=-1).mean())
             / norm[i] for i, n in enumerate(names)]
    top = max(layers)
    print(f"layers {spec}: loss {float(jnp.mean(out.loss)):.3f}, residual "
          f"moved {moved[top]:.3f} at layer {top}, {moved[-1]:.3f} at layer "
          f"{L - 1} ({time.perf_counter() - t:.0f} s)")
    if args.fvu and len(layers) > 1:
      rest = run({f"layer_{l}/mlp_out": _edit(dicts[l], l, keep)
                  for l in layers if l != top},
                 hookpoints=[f"layer_{top}/mlp_in", f"layer_{top}/mlp_out"])
      print(f"  layer {top}'s transcoder: FVU {fvu(top, clean.activations):.3f} "
            f"on clean inputs, {fvu(top, rest.activations):.3f} with the "
            f"rest of the set replaced")


if __name__ == "__main__":
  main()
