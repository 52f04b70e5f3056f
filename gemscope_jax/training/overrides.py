"""Config overrides: `file.py:runlocal,layer=6,width=16384` and `--set`.

`parse_arg` splits the argument string; `apply_overrides` applies it:
shorthands (`width`, `lr`, `layers`, ...), `layer`/`site` (which rewrite
`hookpoint`), `runlocal` (shrinks the run), and full dotted paths
(`train.lr=3e-4`).

Caveat: values are parsed as Python literals where they parse, else kept as
strings; an int given for a float field becomes a float, a list a tuple.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Mapping

import ml_collections

from gemscope_jax import models

# Shorthands accepted in `file.py:key=value,...` and by `apply_overrides`.
SHORTHANDS = {
    "width": "dictionary.width",
    "target_l0": "dictionary.target_l0",
    "k": "dictionary.k",
    "arch": "dictionary.architecture",
    "architecture": "dictionary.architecture",
    "lr": "train.lr",
    "batch": "train.batch_size",
    "batch_size": "train.batch_size",
    "tokens": "train.num_tokens",
    "num_tokens": "train.num_tokens",
    "step": "train.step",
    "text": "data.text",
    "cache_dir": "data.cache_dir",
    "model": "model.name",
    "checkpoint": "model.checkpoint",
    "dtype": "model.dtype",
    "seed": "seed",
    "layers": "group.layers",
    "sites": "group.sites",
}

# What `runlocal` shrinks a config to: minutes on a laptop CPU.
RUNLOCAL = {"train.num_tokens": 65_536, "train.batch_size": 256,
            "train.checkpoint_every_steps": 64,
            "train.sparsity_warmup_steps": 64, "train.lr_warmup_steps": 50,
            "dictionary.width": 1024, "eval.num_tokens": 8192,
            "eval.loss_tokens": 1024, "data.bucket_tokens": 16_384}


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(arg: str | None) -> dict[str, Any]:
  """`'runlocal,layer=6,width=16384'` -> {'runlocal': True, 'layer': 6, ...}.

  Commas inside brackets (tuples, lists) do not split.
  """
  out: dict[str, Any] = {}
  if not arg:
    return out
  parts, depth, cur = [], 0, ""
  for ch in arg:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append(cur)
      cur = ""
    else:
      cur += ch
  parts.append(cur)
  for part in (p.strip() for p in parts):
    if not part:
      continue
    key, sep, value = part.partition("=")
    out[key.strip()] = _literal(value.strip()) if sep else True
  return out


def _set_path(c: ml_collections.ConfigDict, path: str, value: Any) -> None:
  node = c
  keys = path.split(".")
  for i, key in enumerate(keys):
    known = list(node.keys())
    if key not in known:
      where = ".".join(keys[:i]) or "config"
      hint = difflib.get_close_matches(key, known + list(SHORTHANDS), n=1)
      raise ValueError(f"config override {path!r}: {where} has no field "
                       f"{key!r}" + (f" (did you mean {hint[0]!r}?)"
                                     if hint else ""))
    if i == len(keys) - 1:
      old = node[key]
      if isinstance(old, float) and isinstance(value, int) and not isinstance(
          value, bool):
        value = float(value)
      if isinstance(value, list):
        value = tuple(value)
      try:
        node[key] = value
      except TypeError as e:
        raise ValueError(f"config override {path}={value!r}: expected "
                         f"{type(old).__name__}") from e
    else:
      node = node[key]


def apply_overrides(c: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                    ) -> ml_collections.ConfigDict:
  """c with `overrides` applied: shorthands, `layer`/`site`, dotted paths.

  `runlocal` (a flag) shrinks the run to a few minutes on a CPU.
  """
  overrides = dict(overrides)
  if overrides.pop("runlocal", False):
    for path, value in RUNLOCAL.items():
      _set_path(c, path, value)
  hp = models.hooks.parse(c.hookpoint)
  layer = overrides.pop("layer", hp.layer)
  site = overrides.pop("site", hp.site)
  if not isinstance(layer, int):
    raise ValueError(f"config override layer={layer!r}: must be an int")
  c.hookpoint = models.hooks.Hookpoint(layer, site).name
  for key, value in overrides.items():
    _set_path(c, SHORTHANDS.get(key, key), value)
  return c


