"""Config overrides: `file.py:runlocal,layer=6,width=16384` and `--set`.

`parse_arg` splits the argument string; `apply_overrides` applies it:
shorthands (`width`, `lr`, `layers`, ...), `layer`/`site` (which rewrite
`hookpoint`), `runlocal` (shrinks the run), and full dotted paths
(`train.lr=3e-4`).

Values are parsed as Python literals where they parse, else kept as
strings, then checked against the field's type (`_typed`): an int given
for a float field becomes a float, an integral float (1e6) an int, a list
a tuple; a key without a value, a boolean for a number, or text for a
number is refused naming the field and the type it takes (`UsageError`).
The same parser serves `--config=FILE:ARG` and `--set`.
"""

from __future__ import annotations

import ast
import difflib
from typing import Any, Mapping

import ml_collections

from gemscope_jax import models
from gemscope_jax.errors import UsageError

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
    "cache_tokens": "data.cache_tokens",
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


class Overrides(dict):
  """{key: value} parsed from `key=value,...`, remembering what was typed.

  `bare` holds the keys given without `=VALUE` (flags such as `runlocal`,
  or a mistake when the key is a field); `raw` the text of each value, so
  a string field keeps '007' as typed rather than the literal 7.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.bare: set[str] = set()
    self.raw: dict[str, str] = {}

  def merge(self, other: Mapping[str, Any]) -> "Overrides":
    """Adds `other` (later keys win), keeping what was typed."""
    for key, value in other.items():
      self[key] = value
      self.bare.discard(key)
      self.raw.pop(key, None)
    self.bare |= set(getattr(other, "bare", ()))
    self.raw.update(getattr(other, "raw", {}))
    return self


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError):
    return text


def parse_arg(arg: str | None) -> Overrides:
  """`'runlocal,layer=6,width=16384'` -> {'runlocal': True, 'layer': 6, ...}.

  Values are Python literals where they parse, else strings; a key without
  a value is True (a flag) and is recorded in `.bare`, so that
  `apply_overrides` refuses it for a field. Commas inside brackets (tuples,
  lists) do not split.
  """
  out = Overrides()
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
    key = key.strip()
    if not key:
      raise UsageError(f"config override {part!r}: no key before '='")
    if sep:
      out[key] = _literal(value.strip())
      out.raw[key] = value.strip()
    else:
      out[key] = True
      out.bare.add(key)
  return out


def _type_name(t: type) -> str:
  return {bool: "a boolean (True or False)", int: "an integer",
          float: "a number", str: "a string",
          tuple: "a tuple such as (1, 2)"}.get(t, t.__name__)


def _example(t: type) -> str:
  return {bool: "True", int: "512", float: "3e-4", str: "NAME",
          tuple: "(1,2)"}.get(t, "VALUE")


def _typed(path: str, node: ml_collections.ConfigDict, key: str, value: Any,
           raw: str | None) -> Any:
  """`value` as the type the field `path` holds; UsageError naming the
  field and its type otherwise. Booleans must be written as booleans, and
  an integral float (1e6) may fill an int field."""
  old = node[key]
  if isinstance(old, ml_collections.ConfigDict):
    raise UsageError(f"config override {path}: is a section; set one of "
                     f"its fields ({', '.join(list(old.keys())[:4])}, ...)")
  want = node.get_ref(key).get_type()
  typed = raw if raw is not None else repr(value)
  bad = UsageError(f"config override {path}={typed}: {path} takes "
                   f"{_type_name(want)}, e.g. {path}={_example(want)}")
  if value is None:
    if old is not None and want is not object:
      raise bad  # only placeholders (fields that default to None) take None
    return None
  if want is object:
    return tuple(value) if isinstance(value, list) else value
  if want is bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
    if not isinstance(value, bool):
      raise bad
    return value
  if isinstance(value, bool):
    raise bad  # True is an int to Python, never a size or a rate here
  if want is int:
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if not isinstance(value, int):
      raise bad
    return value
  if want is float:
    if not isinstance(value, (int, float)):
      raise bad
    return float(value)
  if want is str:
    if isinstance(value, str):
      return value
    if raw is not None and isinstance(value, (int, float)):
      return raw  # a path or name that looks like a number, as typed
    raise bad
  if want is tuple:
    if not isinstance(value, (list, tuple)):
      raise bad
    return tuple(value)
  if not isinstance(value, want):
    raise bad
  return value


def _set_path(c: ml_collections.ConfigDict, path: str, value: Any, *,
              bare: bool = False, raw: str | None = None) -> None:
  node = c
  keys = path.split(".")
  for i, key in enumerate(keys):
    known = list(node.keys()) if isinstance(
        node, ml_collections.ConfigDict) else []
    if key not in known:
      where = ".".join(keys[:i]) or "config"
      candidates = known + (list(SHORTHANDS) + ["runlocal", "layer", "site"]
                            if i == 0 else [])
      hint = difflib.get_close_matches(key, candidates, n=1)
      raise UsageError(f"config override {path!r}: {where} has no field "
                       f"{key!r}" + (f" (did you mean {hint[0]!r}?)"
                                     if hint else ""))
    if i < len(keys) - 1:
      node = node[key]
      continue
    if bare:
      want = node.get_ref(key).get_type()
      raise UsageError(f"config override {path!r}: needs a value, "
                       f"{_type_name(want)}, e.g. {path}={_example(want)}")
    try:
      node[key] = _typed(path, node, key, value, raw)
    except TypeError as e:
      raise UsageError(f"config override {path}={value!r}: {e}") from None


def apply_overrides(c: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                    ) -> ml_collections.ConfigDict:
  """c with `overrides` applied: shorthands, `layer`/`site`, dotted paths.

  `runlocal` (a flag) shrinks the run to a few minutes on a CPU.
  """
  bare = set(getattr(overrides, "bare", ()))
  raw = dict(getattr(overrides, "raw", {}))
  overrides = dict(overrides)
  runlocal = overrides.pop("runlocal", False)
  if runlocal is not True and runlocal is not False:
    raise UsageError(f"config override runlocal={runlocal!r}: runlocal is a "
                     "flag; write it alone (FILE.py:runlocal)")
  if runlocal:
    for path, value in RUNLOCAL.items():
      _set_path(c, path, value)
  hp = models.hooks.parse(c.hookpoint)
  for key in ("layer", "site"):
    if key in bare:
      raise UsageError(f"config override {key!r}: needs a value, e.g. "
                       f"{key}={'6' if key == 'layer' else 'resid_post'}")
  layer = overrides.pop("layer", hp.layer)
  site = overrides.pop("site", hp.site)
  if isinstance(layer, bool) or not isinstance(layer, int):
    raise UsageError(f"config override layer={layer!r}: takes an integer "
                     "(a layer index), e.g. layer=6")
  if not isinstance(site, str):
    raise UsageError(f"config override site={site!r}: takes a site name, "
                     f"one of {', '.join(models.hooks.SITES)}")
  c.hookpoint = models.hooks.Hookpoint(layer, site).name
  for key, value in overrides.items():
    _set_path(c, SHORTHANDS.get(key, key), value, bare=key in bare,
              raw=raw.get(key))
  return c


