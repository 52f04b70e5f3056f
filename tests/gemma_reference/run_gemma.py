"""Runs Google DeepMind's `gemma` library as an independent reference.

Run only with the interpreter of the separate environment that
`scripts/gemma_reference_env.sh` builds (`.venv-gemma/bin/python`); pytest
never imports this file. Data crosses the process boundary through files:
parameters as an .npz of '/'-joined keys in the official Gemma layout (ours),
token ids as .npy, logits back as float32 .npy, and JSON on stdout.

Subcommands:
  logits  build gm.nn.Gemma3_<size>, load parameters (from an .npz or, with
          --ckpt, from an Orbax checkpoint through gm.ckpts.load_params), run
          it on the tokens and save the logits.
  save    write the parameters with gm.ckpts.save_params, in the nested
          layout a gemma user gets, or in the flat / stacked layouts of the
          released checkpoints (rewritten by the library's own converters);
          --also writes more checkpoints in the same process; --check reads
          each back with gm.ckpts.load_params.
  count   parameter counts of the library's models from jax.eval_shape of
          their init, split into text decoder and vision tower.

Main caveat: importing `gemma` (through kauldron) monkeypatches flax and
imports tensorflow, so this must stay a separate process with its own
environment; it also fetches its tokenizer from a bucket at run time, so the
tokenizer is never used here (token ids come from the caller).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

# tensorflow, imported by kauldron, is noisy on stderr at import time.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# On a GPU, float32 matmuls default to reduced (TF32) precision; the CPU
# gives the full-precision reference.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # pylint: disable=g-import-not-at-top

_SIZES = {
    "270m": "Gemma3_270M",
    "1b": "Gemma3_1B",
    "4b": "Gemma3_4B",
    "12b": "Gemma3_12B",
    "27b": "Gemma3_27B",
}
_LAYOUTS = ("nested", "flat", "stacked")
_DTYPES = ("float32", "bfloat16")
# Vision tower and multimodal projection, as the library names them.
_VISION_PREFIXES = ("vision_encoder/", "embedder/mm_")


def _size_key(size: str) -> str:
  key = size.lower().removeprefix("gemma3_").removeprefix("gemma3-")
  if key not in _SIZES:
    raise SystemExit(f"unknown size {size!r}; known: {', '.join(_SIZES)}")
  return key


def _model(size: str, text_only: bool = True):
  """The library's model class for `size`, with float32 parameters."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gemma import gm  # pylint: disable=import-outside-toplevel
  cls = getattr(gm.nn, _SIZES[_size_key(size)])
  kwargs = {"dtype": jnp.float32}
  # Only the multimodal sizes take `text_only`; it drops the vision tower.
  if "text_only" in getattr(cls, "__dataclass_fields__", {}):
    kwargs["text_only"] = text_only
  return cls(**kwargs)


def _flatten(tree, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _abstract_params(model) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  return dict(variables["params"])


def _load_npz(path: str) -> dict:
  """The nested parameter tree (jax arrays, as a gemma user has them)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  with np.load(path) as data:
    flat = {k: jnp.asarray(data[k]) for k in data.files}
  return _unflatten(flat)


def _check_structure(params: dict, model) -> None:
  """Fails unless `params` has exactly the model's parameter names/shapes."""
  want = {k: tuple(v.shape) for k, v in _flatten(_abstract_params(model)).items()}
  have = {k: tuple(v.shape) for k, v in _flatten(params).items()}
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  if missing or extra or wrong:
    raise SystemExit(
        f"parameters do not fit {type(model).__name__}: missing {missing[:5]}, "
        f"unexpected {extra[:5]}, wrong shape "
        f"{[(k, have[k], want[k]) for k in wrong[:5]]}")


def cmd_logits(args) -> dict:
  from gemma import gm  # pylint: disable=import-outside-toplevel
  model = _model(args.size)
  if args.ckpt:
    params = gm.ckpts.load_params(args.ckpt, text_only=True)
  else:
    params = _load_npz(args.params)
  _check_structure(params, model)
  tokens = np.load(args.tokens).astype(np.int32)
  if tokens.ndim == 1:
    tokens = tokens[None]
  out = model.apply({"params": params}, tokens)
  logits = np.asarray(out.logits, np.float32)
  np.save(args.out, logits)
  return {"model": type(model).__name__, "logits_shape": list(logits.shape),
          "params_dtypes": sorted({str(v.dtype)
                                   for v in _flatten(params).values()})}


def _to_layout(params: dict, layout: str) -> dict:
  """The nested tree rewritten by gemma's converters into `layout`."""
  if layout == "nested":
    return params
  # The released checkpoints use these layouts; the library keeps its
  # converters private, but they define what it reads.
  from gemma.gm.ckpts import _checkpoint  # pylint: disable=import-outside-toplevel
  if layout == "flat":
    return _checkpoint._nested_to_flat(params)  # pylint: disable=protected-access
  if layout == "stacked":
    from gemma.gm.nn import _gemma  # pylint: disable=import-outside-toplevel
    pattern = len(_gemma.GEMMA3_ATTENTION_PATTERN)
    return _checkpoint._nested_to_stacked(params, pattern)  # pylint: disable=protected-access
  raise SystemExit(f"unknown layout {layout!r}")


def _save_one(params: dict, out: str, layout: str, dtype: str,
              check: bool) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gemma import gm  # pylint: disable=import-outside-toplevel
  from gemma.gm.ckpts import _checkpoint  # pylint: disable=import-outside-toplevel
  if dtype != "float32":
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
  tree = _to_layout(params, layout)
  gm.ckpts.save_params(tree, out, wait_until_finished=True)
  report = {"out": out, "layout": layout, "dtype": dtype,
            "top_level_keys": sorted(tree)[:4]}
  if check:
    # What the library itself makes of the checkpoint, and its values.
    meta = _checkpoint._CheckpointTree(tree=tree)  # pylint: disable=protected-access
    loaded = gm.ckpts.load_params(out)
    a, b = _flatten(loaded), _flatten(params)
    equal = set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and bool(jnp.array_equal(a[k], b[k]))
        for k in b)
    report.update(detected_by_gemma=str(meta.type), gemma_reload_equal=equal)
    if not equal:
      raise SystemExit(f"gm.ckpts.load_params did not give the params back: "
                       f"{json.dumps(report)}")
  return report


def cmd_save(args) -> dict:
  params = _load_npz(args.params)
  report = _save_one(params, args.out, args.layout, args.dtype, args.check)
  # Further checkpoints of the same params, sparing a process start each.
  also = []
  for spec in args.also:
    try:
      layout, dtype, out = spec.split(":", 2)
    except ValueError:
      raise SystemExit(f"--also wants LAYOUT:DTYPE:DIR, got {spec!r}") from None
    if layout not in _LAYOUTS or dtype not in _DTYPES:
      raise SystemExit(f"--also {spec!r}: layout must be one of {_LAYOUTS}, "
                       f"dtype one of {_DTYPES}")
    also.append(_save_one(params, out, layout, dtype, args.check))
  if also:
    report["also"] = also
  return report


def cmd_count(args) -> dict:
  """Counts from the full (multimodal where it exists) model's init.

  The text decoder is everything except the vision tower ('vision_encoder')
  and the embedder's multimodal projection ('embedder/mm_*'); for the
  multimodal sizes this is cross-checked against the library's own
  `text_only=True` model, which must give the same number.
  """
  result = {}
  for size in args.size:
    model = _model(size, text_only=False)
    flat = _flatten(_abstract_params(model))
    numel = {k: math.prod(v.shape) for k, v in flat.items()}
    vision = sum(n for k, n in numel.items() if k.startswith(_VISION_PREFIXES))
    text = sum(numel.values()) - vision
    text_only = sum(math.prod(v.shape) for v in _flatten(
        _abstract_params(_model(size, text_only=True))).values())
    if text_only != text:
      raise SystemExit(f"{size}: text_only model has {text_only} parameters, "
                       f"the full model less its vision tower {text}")
    result[_size_key(size)] = {
        "model": type(model).__name__, "text_params": text,
        "vision_params": vision, "total_params": text + vision}
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("logits", help="logits of the gemma library's model")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--params", help=".npz of '/'-joined official-layout keys")
  src.add_argument("--ckpt", help="Orbax checkpoint, read by gm.ckpts")
  p.add_argument("--tokens", required=True, help=".npy of int token ids (B,T)")
  p.add_argument("--out", required=True, help=".npy for float32 logits")
  p.add_argument("--size", default="270m", choices=sorted(_SIZES))
  p.set_defaults(fn=cmd_logits)

  p = sub.add_parser("save", help="write params with gm.ckpts.save_params")
  p.add_argument("--params", required=True)
  p.add_argument("--out", required=True, help="checkpoint directory to create")
  p.add_argument("--layout", default="nested", choices=_LAYOUTS)
  p.add_argument("--dtype", default="float32", choices=_DTYPES)
  p.add_argument("--check", action="store_true",
                 help="read it back with gm.ckpts.load_params and compare")
  p.add_argument("--also", action="append", default=[],
                 metavar="LAYOUT:DTYPE:DIR",
                 help="write another checkpoint of the same params")
  p.set_defaults(fn=cmd_save)

  p = sub.add_parser("count", help="parameter counts from eval_shape(init)")
  p.add_argument("--size", nargs="+", default=list(_SIZES))
  p.set_defaults(fn=cmd_count)

  args = parser.parse_args(argv)
  result = args.fn(args)
  import gemma  # pylint: disable=import-outside-toplevel
  result["gemma_version"] = getattr(gemma, "__version__", "unknown")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
