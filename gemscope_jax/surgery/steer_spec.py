"""`--steer SPEC`: one intervention written on the command line.

  DICT:LATENT+COEF[@POSITIONS]     add COEF * the latent's decoder row
  DICT:LATENT-COEF[@POSITIONS]     (the same with -COEF; also *COEF)
  DICT:LATENT=VALUE[@POSITIONS]    clamp the latent to VALUE (=0 ablates)
  DICT:HOOKPOINT:LATENT...         name where DICT reads, if its config
                                   does not (a transcoder: IN,OUT)
  DICT:LAYER/LATENT...             a CLT latent of source layer LAYER
  HOOKPOINT:FILE.npy*COEF[@POS]    add COEF * a raw (width,) vector
                                   (also +COEF, -COEF)
  POSITIONS: all | prompt | generated | 5 | 3,5,8 | 3:9 | 3: | :9
             (default all; the three words skip BOS at position 0; in a
             range the stop is excluded)

DICT is a dictionary folder (Gemma Scope 2, SAELens, or a multi-layer
folder of `params_layer_{i}.safetensors`), a training workdir (its newest
checkpoint; read by the command line, which passes `load=`), or anything else
`interop.load_dictionary` accepts (e.g. a Gemma Scope 2 release name,
`gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_medium`). Examples:

  --steer 'gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_medium:1234+8'
  --steer 'runs/sae6:layer_6/resid_post:77=20@prompt'
  --steer 'layer_6/resid_post:honesty.npy*4@generated'

`parse_steer` only reads the text (no files); `load_interventions` opens
the dictionaries (each once) and builds `steer` interventions.

Caveat: DICT is everything before the last `:` of the part without
`@POSITIONS` (or before a `:HOOKPOINT`), so it may hold `+`, `@` or `-` but
no `:`; a vector's file is everything after the hookpoint's `:` up to the
last `.npy`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable

import numpy as np

from gemscope_jax import interop
from gemscope_jax import models
from gemscope_jax.surgery import steer

FORMS = ("DICT:LATENT+COEF, DICT:LATENT-COEF, DICT:LATENT=VALUE or "
         "HOOKPOINT:FILE.npy*COEF, each optionally @POSITIONS")
OPS = "+COEF, -COEF, *COEF (add) or =VALUE (clamp)"
_HP_START = re.compile(r"^(layer_|blocks\.)")


@dataclasses.dataclass(frozen=True)
class SteerSpec:
  """One parsed `--steer` spec (see the module docstring).

  Attributes:
    source: the dictionary (folder, workdir or release name), or None for
      a raw vector.
    latent: the latent's index (None for a vector).
    layer: a CLT latent's source layer.
    vector: the .npy file of a raw direction.
    hookpoint: where the dictionary reads (None: its config's), or where
      the vector is added.
    hookpoint_out: where a transcoder writes, if named.
    op: 'add' or 'clamp'.
    value: the coefficient (add) or the value (clamp).
    positions: a `steer.Positions`.
  """
  source: str | None
  latent: int | None
  op: str
  value: float
  positions: steer.Positions = steer.Positions()
  layer: int | None = None
  vector: str | None = None
  hookpoint: str | None = None
  hookpoint_out: str | None = None

  def __str__(self) -> str:
    """The canonical spec (`parse_steer(str(s)) == s`)."""
    where = f"@{self.positions}" if self.positions.kind != "all" else ""
    if self.vector is not None:
      return f"{self.hookpoint}:{self.vector}*{_num(self.value)}{where}"
    hps = ",".join(h for h in (self.hookpoint, self.hookpoint_out) if h)
    latent = (str(self.latent) if self.layer is None
              else f"{self.layer}/{self.latent}")
    op = (f"={_num(self.value)}" if self.op == "clamp"
          else f"{'-' if self.value < 0 else '+'}{_num(abs(self.value))}")
    return f"{self.source}{':' + hps if hps else ''}:{latent}{op}{where}"


def _num(v: float) -> str:
  """Shortest text that reads back as v (8.0 -> '8')."""
  text = repr(float(v))
  return text[:-2] if text.endswith(".0") else text


def _error(spec: str, part: str, got: str, want: str) -> ValueError:
  return ValueError(f"--steer {spec!r}: the {part} {got!r} is not valid; "
                    f"expected {want}")


def _hookpoint(spec: str, text: str, part: str) -> str:
  try:
    return models.hooks.parse(text).name
  except ValueError:
    raise _error(spec, part, text, "layer_<L>/<site> with site one of "
                 + ", ".join(models.hooks.SITES)) from None


def _number(spec: str, text: str, part: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value):
    raise _error(spec, part, text, "a finite number, e.g. +8, -2.5, *0.5, "
                 "=20")
  return value


def parse_steer(spec: str) -> SteerSpec:
  """Parses one `--steer` spec (module docstring); ValueError naming the
  part that is wrong and what it accepts."""
  text = spec.strip()
  if not text:
    raise ValueError(f"--steer: empty spec; expected {FORMS}")
  positions, body = steer.Positions(), text
  at = text.rfind("@")
  # Positions use only letters, digits, ':' and ','; an '@' followed by
  # anything else belongs to the dictionary's name.
  if at >= 0 and re.fullmatch(r"[A-Za-z0-9:,\s]*", text[at + 1:]):
    body = text[:at]
    try:
      positions = steer.Positions.parse(text[at + 1:])
    except ValueError as e:
      raise ValueError(f"--steer {spec!r}: the positions part: {e}") from None
  head, colon, rest = body.partition(":")
  if colon and ".npy" in rest and _HP_START.match(head):
    return _parse_vector(spec, head, rest, positions)
  source, colon, tail = body.rpartition(":")
  if not colon:
    raise ValueError(f"--steer {spec!r}: no ':' between a dictionary (or "
                     f"hookpoint) and a latent (or .npy file); expected "
                     f"{FORMS}")
  m = re.fullmatch(r"([^+\-=*]*)([+\-=*])(.*)", tail)
  if not m:
    raise _error(spec, "latent and operation", tail,
                 f"LATENT followed by {OPS}, e.g. 123+8 or 123=20")
  latent_text, op, num = m.groups()
  value = _number(spec, num, "coefficient" if op != "=" else "clamp value")
  value = -value if op == "-" else value
  lm = re.fullmatch(r"(?:(\d+)/)?(\d+)", latent_text.strip())
  if not lm:
    raise _error(spec, "latent", latent_text, "a latent index (e.g. 123) or, "
                 "for a CLT, SOURCE_LAYER/INDEX (e.g. 3/123)")
  layer = None if lm.group(1) is None else int(lm.group(1))
  hookpoint = hookpoint_out = None
  pre, colon, last = source.rpartition(":")
  if colon and _HP_START.match(last.strip()):
    names = last.split(",")
    if len(names) > 2:
      raise _error(spec, "hookpoint part", last, "HOOKPOINT or, for a "
                   "transcoder, IN,OUT")
    hookpoint = _hookpoint(spec, names[0], "hookpoint")
    if len(names) == 2:
      hookpoint_out = _hookpoint(spec, names[1], "output hookpoint")
    source = pre
  if not source.strip():
    raise _error(spec, "dictionary", source, "a folder, training workdir or "
                 "release name before the ':'")
  return SteerSpec(source=source, latent=int(lm.group(2)),
                   op="clamp" if op == "=" else "add", value=value,
                   positions=positions, layer=layer, hookpoint=hookpoint,
                   hookpoint_out=hookpoint_out)


def _parse_vector(spec, head, rest, positions) -> SteerSpec:
  hookpoint = _hookpoint(spec, head, "hookpoint")
  m = re.fullmatch(r"(.+\.npy)\s*([+\-=*])(.*)", rest)
  if not m:
    raise _error(spec, "vector part", rest, "FILE.npy followed by *COEF, "
                 "+COEF or -COEF, e.g. direction.npy*4")
  vector, op, num = m.groups()
  if op == "=":
    raise ValueError(f"--steer {spec!r}: a raw vector can only be added "
                     "(*COEF, +COEF, -COEF), not clamped (=); clamp a "
                     "dictionary latent instead (DICT:LATENT=VALUE)")
  value = _number(spec, num, "coefficient")
  return SteerSpec(source=None, latent=None, op="add",
                   value=-value if op == "-" else value, positions=positions,
                   vector=vector, hookpoint=hookpoint)


# ------------------------------------------------------------------ loading

def load_steer_source(source: str) -> Any:
  """The dictionary a spec names: an `interop.InferenceDictionary` or
  `interop.MultiLayerInference`.

  Folders and release names only: a training workdir is read by the layer
  that knows training (`gemscope generate` passes `load=` a function that
  tries `training.export.from_workdir` first).
  """
  return interop.load_dictionary(source)  # multi-layer folders too


def to_intervention(spec: SteerSpec, dictionary: Any = None) -> Any:
  """The `steer` intervention of a parsed spec.

  Args:
    spec: from `parse_steer`.
    dictionary: what `spec.source` names (`load_steer_source`); unused for a
      vector.

  Raises:
    ValueError: a latent form that does not fit the dictionary, a vector
      file that is not one vector, or a clamp a dictionary cannot do.
  """
  if spec.vector is not None:
    direction = np.load(spec.vector)
    if direction.ndim != 1:
      raise ValueError(f"--steer {spec}: {spec.vector} holds an array of "
                       f"shape {direction.shape}; expected one vector "
                       "(width,)")
    return steer.AddDirection(spec.hookpoint, direction, spec.value,
                              spec.positions)
  is_clt = (isinstance(dictionary, interop.MultiLayerInference)
            and dictionary.kind == "clt")
  if is_clt != (spec.layer is not None):
    want = ("SOURCE_LAYER/INDEX (a CLT latent)" if is_clt
            else "one index (not a CLT)")
    raise ValueError(f"--steer {spec}: {spec.source} needs its latent as "
                     f"{want}")
  kw = dict(positions=spec.positions, layer=spec.layer,
            hookpoint=spec.hookpoint, hookpoint_out=spec.hookpoint_out)
  try:
    if spec.op == "clamp":
      return steer.ClampLatents(dictionary, spec.latent, spec.value, **kw)
    return steer.AddLatent(dictionary, spec.latent, spec.value, **kw)
  except ValueError as e:
    raise ValueError(f"--steer {spec}: {e}") from None


def load_interventions(specs: Iterable[str],
                       load: Callable[[str], Any] = load_steer_source
                       ) -> list[Any]:
  """Parses every spec, loads each dictionary once, and returns the
  interventions for `steer.steering_edits` in the order given."""
  parsed = [parse_steer(s) for s in specs]  # all syntax errors before I/O
  cache: dict[str, Any] = {}
  out = []
  for spec in parsed:
    if spec.source is not None and spec.source not in cache:
      cache[spec.source] = load(spec.source)
    out.append(to_intervention(spec, cache.get(spec.source)))
  return out
