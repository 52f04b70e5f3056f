"""Steering and latent interventions as edits for `models.forward`.

An intervention is a small frozen dataclass:
  AddDirection(hookpoint, direction, coef)  x += coef * direction
  AddLatent(dictionary, latent, coef)       x += coef * W_dec[latent] where
                                            the dictionary writes
  ClampLatents(dictionary, latents, values) x += (f_clamped - f) @ W_dec
  ablate(dictionary, latents)               ClampLatents to 0
each with `positions` (a `Positions`: all tokens, the prompt, the generated
tokens, explicit positions or a range). `steering_edits(interventions)`
turns any number of them, at any hookpoints, into `(edits, edit_args)` for
`models.forward(edits=..., edit_args=...)`; several at one hookpoint become
one edit that applies them in the order given.

Clamps are error-preserving (Gemma Scope / Neuronpedia practice): f is the
dictionary's latents of the activation it reads, and only the chosen
latents' decoder rows are added, so whatever the dictionary does not
reconstruct stays. Where the dictionary reads and writes:
- an SAE reads and writes its hookpoint (any site; attn_out is heads *
  head_dim wide);
- a transcoder (skip transcoders included: the skip term cancels in
  f_clamped - f) reads `hookpoint` (layer_L/mlp_in) as the pass computed it
  and writes `hookpoint_out` (layer_L/mlp_out);
- a CLT latent of source layer L reads mlp_in of layer L and writes mlp_out
  of every layer o >= L through that layer's decoder slice
  w_dec[L, latent, o]; a crosscoder latent (additive steering only) writes
  every layer.

Every edit is a `models.ContextEdit`: it selects tokens from the
`EditContext` (positions, generated, valid) and never assumes more than one
token, so the same edits run in `forward` and at each decode step of a
generation loop ((B, 1, width) activations). The edits are static and equal
whenever the interventions have the same structure (kind, dictionary
architecture, number of latents, positions); directions, coefficients,
values and dictionary columns travel in `edit_args`, so a coefficient sweep
or a different latent reuses the compiled pass.

Caveats: the BOS token (position 0) is left alone by `all`, `prompt` and
`generated`: its residual is the attention sink, orders of magnitude larger
than other tokens', and steering or clamping it mostly damages every later
token; name position 0 explicitly (`Positions.at(0)`, `Positions.span(0)`)
to include it. A TopK dictionary's clamp computes all latents' pre-
activations to know whether a latent is among the k largest; a JumpReLU or
ReLU one only the chosen latents'. A TopK CLT selects over all layers'
latents at once, which later layers' inputs decide, so it cannot be
clamped inside the pass (additive steering works).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import models
from gemscope_jax.interop import InferenceDictionary, MultiLayerInference

_HIGHEST = jax.lax.Precision.HIGHEST
POSITION_WORDS = ("all", "prompt", "generated")
POSITIONS_HELP = ("all, prompt, generated, a position (5), a list (3,5,8) "
                  "or a range (3:9, 3:, :9; the stop is excluded)")


# ---------------------------------------------------------------- positions

@dataclasses.dataclass(frozen=True)
class Positions:
  """Which tokens an intervention edits, by `EditContext.positions` (real
  tokens before the token: BOS is 0, left padding does not count).

  Attributes:
    kind: 'all', 'prompt', 'generated' (these three skip BOS, see the
      module docstring), 'at' (exactly `indices`) or 'span' (start <= p <
      stop; stop None: no end).
    indices: the positions of 'at'.
    start, stop: the range of 'span'.
  """
  kind: str = "all"
  indices: tuple[int, ...] = ()
  start: int = 0
  stop: int | None = None

  def __post_init__(self):
    if self.kind not in (*POSITION_WORDS, "at", "span"):
      raise ValueError(f"Positions.kind: {self.kind!r} is none of "
                       f"{', '.join(POSITION_WORDS)}, at, span")
    object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
    if self.kind == "at" and (not self.indices or min(self.indices) < 0):
      raise ValueError(f"Positions.at: needs positions >= 0, got "
                       f"{self.indices}")
    if self.kind == "span" and (self.start < 0 or (
        self.stop is not None and self.stop <= self.start)):
      raise ValueError(f"Positions.span: needs 0 <= start < stop, got "
                       f"{self.start}:{'' if self.stop is None else self.stop}")

  @classmethod
  def at(cls, *indices: int) -> Positions:
    return cls("at", indices=indices)

  @classmethod
  def span(cls, start: int = 0, stop: int | None = None) -> Positions:
    return cls("span", start=start, stop=stop)

  @classmethod
  def parse(cls, text: str) -> Positions:
    """From `all`, `prompt`, `generated`, `5`, `3,5,8` or `3:9` (`3:`,
    `:9`); ValueError saying what is accepted otherwise."""
    t = text.strip()
    if t in POSITION_WORDS:
      return cls(t)
    if re.fullmatch(r"\d+(,\d+)*", t):
      return cls.at(*(int(i) for i in t.split(",")))
    m = re.fullmatch(r"(\d*):(\d*)", t)
    if m:
      start = int(m.group(1) or 0)
      stop = int(m.group(2)) if m.group(2) else None
      if stop is not None and stop <= start:
        raise ValueError(f"empty range {t!r}: the stop is excluded, so it "
                         "must be larger than the start (e.g. 3:9)")
      return cls.span(start, stop)
    raise ValueError(f"unknown positions {t!r}: expected {POSITIONS_HELP}")

  def __str__(self) -> str:
    """The `parse` form (`parse(str(p)) == p`)."""
    if self.kind == "at":
      return ",".join(map(str, self.indices))
    if self.kind == "span":
      return f"{self.start}:{'' if self.stop is None else self.stop}"
    return self.kind

  def mask(self, ctx: models.EditContext) -> jax.Array:
    """(B, T) bool: the tokens of `ctx` to edit (padding never)."""
    p, sel = ctx.positions, ctx.valid
    if self.kind == "prompt":
      sel = sel & ~ctx.generated
    elif self.kind == "generated":
      sel = sel & ctx.generated
    if self.kind in POSITION_WORDS:
      return sel & (p > 0)
    if self.kind == "at":
      return sel & jnp.isin(p, jnp.asarray(self.indices, p.dtype))
    sel = sel & (p >= self.start)
    return sel if self.stop is None else sel & (p < self.stop)


def as_positions(p: Positions | str | int | slice | Sequence[int]
                 ) -> Positions:
  """A `Positions` from itself, its string form, one position, a list of
  them or a slice (stop excluded, no step)."""
  if isinstance(p, Positions):
    return p
  if isinstance(p, str):
    return Positions.parse(p)
  if isinstance(p, slice):
    if p.step not in (None, 1):
      raise ValueError(f"positions: a slice with a step ({p}) is not "
                       "supported")
    return Positions.span(p.start or 0, p.stop)
  if isinstance(p, (int, np.integer)):
    return Positions.at(int(p))
  return Positions.at(*p)


# ------------------------------------------------------------ edit parts

@dataclasses.dataclass(frozen=True)
class _Add:
  """x + coef * direction at the selected tokens (args: direction, coef)."""
  positions: Positions
  # For error messages only: parts that differ in label alone are equal, so
  # steering along another latent reuses the compiled pass.
  label: str = dataclasses.field(compare=False)
  at: str  # the hookpoint it edits
  reads: tuple[str, ...] = ()

  def __call__(self, x, args, ctx):
    d = args["direction"]
    _check_width(self.label, "the direction", d.shape[-1], self.at,
                 x.shape[-1])
    m = self.positions.mask(ctx)[..., None]
    # where(), not x + mask * coef * d: untouched tokens stay bit-identical.
    return jnp.where(m, x + args["coef"] * d, x)


@dataclasses.dataclass(frozen=True)
class _Clamp:
  """x + (values - f) @ w_dec at the selected tokens, f the chosen latents
  of `source` (None: of x itself). Args: w_enc, b_enc, threshold (chosen
  columns; a TopK's are all columns, with `latents`), w_dec (chosen rows),
  values."""
  positions: Positions
  label: str = dataclasses.field(compare=False)
  at: str
  source: str | None = None
  topk: int | None = None

  @property
  def reads(self) -> tuple[str, ...]:
    return () if self.source is None else (self.source,)

  def __call__(self, x, args, ctx):
    xin = x if self.source is None else ctx.seen[self.source]
    _check_width(self.label, "the dictionary's input", args["w_enc"].shape[0],
                 self.source or self.at, xin.shape[-1])
    _check_width(self.label, "the dictionary's output", args["w_dec"].shape[1],
                 self.at, x.shape[-1])
    f = _chosen_latents(xin.astype(jnp.float32), args, self.topk)
    delta = jnp.matmul(args["values"] - f, args["w_dec"], precision=_HIGHEST)
    return jnp.where(self.positions.mask(ctx)[..., None], x + delta, x)


def _chosen_latents(x, args, topk):
  """The chosen latents' values in x, as `InferenceDictionary.encode`."""
  pre = jnp.matmul(x, args["w_enc"], precision=_HIGHEST) + args["b_enc"]
  acts = jax.nn.relu(pre)
  if topk is None:  # JumpReLU; ReLU is threshold 0
    return acts * (pre > args["threshold"]).astype(acts.dtype)
  kth = jax.lax.top_k(acts, topk)[0][..., -1:]
  chosen = jnp.take(acts, args["latents"], axis=-1)
  return jnp.where(chosen >= kth, chosen, 0.0)


def _check_width(label, what, want, where, got):
  # Shapes are static, so this raises while tracing, before any compute.
  if want != got:
    raise ValueError(f"{label}: {what} has width {want}, but {where} has "
                     f"width {got}")


@dataclasses.dataclass(frozen=True)
class _Composed:
  """Several parts at one hookpoint, applied in order, in float32."""
  parts: tuple[Any, ...]

  def __call__(self, x, args, ctx):
    dtype, x = x.dtype, x.astype(jnp.float32)
    for part, a in zip(self.parts, args):
      x = part(x, a, ctx)
    return x.astype(dtype)


# ------------------------------------------------------------ interventions

Dictionary = InferenceDictionary | MultiLayerInference


def _hp(name: str | None) -> str | None:
  return None if name is None else models.hooks.parse(name).name


def _f32(value) -> jax.Array:
  return jnp.asarray(value, jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class AddDirection:
  """Adds `coef * direction` to `hookpoint` at `positions`.

  Attributes:
    hookpoint: e.g. 'layer_6/resid_post' (attn_out: heads * head_dim wide).
    direction: (width,) vector, used as given (not normalised).
    coef: the coefficient (a float or a traced scalar).
    positions: see `as_positions`.
  """
  hookpoint: str
  direction: Any
  coef: Any = 1.0
  positions: Any = "all"

  def __post_init__(self):
    object.__setattr__(self, "hookpoint", _hp(self.hookpoint))
    object.__setattr__(self, "positions", as_positions(self.positions))
    if np.ndim(self.direction) != 1:
      raise ValueError(f"AddDirection at {self.hookpoint}: direction must be "
                       f"a vector, got shape {np.shape(self.direction)}")

  def parts(self):
    """[(hookpoint, part, args)] (see `steering_edits`)."""
    part = _Add(self.positions, "steering direction", self.hookpoint)
    return [(self.hookpoint, part, {"direction": _f32(self.direction),
                                    "coef": _f32(self.coef)})]


@dataclasses.dataclass(frozen=True, eq=False)
class AddLatent:
  """Adds `coef * W_dec[latent]` wherever the dictionary writes.

  Attributes:
    dictionary: an `InferenceDictionary` (SAE or transcoder) or a
      `MultiLayerInference` (CLT: `layer` names the source layer; the row
      of each output layer o >= layer is added to o's mlp_out; crosscoder:
      its row for each layer is added there).
    latent: the latent's index (within its layer for a CLT).
    coef: the coefficient (raw decoder rows, not normalised).
    positions: see `as_positions`.
    layer: a CLT latent's source layer.
    hookpoint, hookpoint_out: where the dictionary reads and writes, where
      its config does not say (see `dictionary_hookpoints`).
  """
  dictionary: Dictionary
  latent: int
  coef: Any = 1.0
  positions: Any = "all"
  layer: int | None = None
  hookpoint: str | None = None
  hookpoint_out: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "positions", as_positions(self.positions))
    _check_latents(self.dictionary, (self.latent,), self.layer)
    _writes(self.dictionary, self.layer, self.hookpoint, self.hookpoint_out)

  def parts(self):
    d, i, out = self.dictionary, int(self.latent), []
    coef = _f32(self.coef)
    for hp, w_dec in _writes(d, self.layer, self.hookpoint,
                             self.hookpoint_out):
      part = _Add(self.positions, f"steering along latent {i}", hp)
      out.append((hp, part, {"direction": _f32(w_dec[i]), "coef": coef}))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class ClampLatents:
  """Sets latents to values, error-preserving: x + (f_clamped - f) @ W_dec.

  Attributes:
    dictionary: an `InferenceDictionary` (SAE, transcoder, skip
      transcoder) or a JumpReLU CLT (`MultiLayerInference`, with `layer`).
    latents: one index or several (within `layer` for a CLT).
    values: one value for all or one per latent (0: ablation).
    positions: see `as_positions`.
    layer: a CLT's source layer.
    hookpoint, hookpoint_out: as `AddLatent`.
  """
  dictionary: Dictionary
  latents: Any
  values: Any = 0.0
  positions: Any = "all"
  layer: int | None = None
  hookpoint: str | None = None
  hookpoint_out: str | None = None

  def __post_init__(self):
    latents = ((int(self.latents),) if np.ndim(self.latents) == 0
               else tuple(int(i) for i in self.latents))
    object.__setattr__(self, "latents", latents)
    object.__setattr__(self, "positions", as_positions(self.positions))
    d = self.dictionary
    if isinstance(d, MultiLayerInference) and (
        d.kind != "clt" or d.architecture != "jumprelu"):
      raise ValueError(
          f"ClampLatents: a {d.architecture} {d.kind} cannot be clamped "
          "inside the pass (its latents depend on other layers' inputs); "
          "use AddLatent, or a JumpReLU CLT")
    _check_latents(d, latents, self.layer)
    _writes(d, self.layer, self.hookpoint, self.hookpoint_out)

  def parts(self):
    d, idx = self.dictionary, np.asarray(self.latents)
    values = jnp.broadcast_to(_f32(self.values), idx.shape)
    name = ",".join(map(str, self.latents))
    if isinstance(d, MultiLayerInference):
      src = self.layer
      enc = {"w_enc": d.w_enc[src][:, idx], "b_enc": d.b_enc[src][idx],
             "threshold": d.threshold[src][idx]}
      topk, source = None, _multi_hookpoints(d)[0][src]
    else:
      topk = d.k if d.architecture == "topk" else None
      source, _ = dictionary_hookpoints(d, self.hookpoint, self.hookpoint_out)
      d = d.folded()  # encoder as x @ w_enc + b_enc
      cols = slice(None) if topk else idx  # TopK needs every latent
      enc = {"w_enc": d.w_enc[:, cols], "b_enc": d.b_enc[cols],
             "threshold": (np.zeros(len(idx)) if d.threshold is None
                           else d.threshold[idx])}
      if topk:
        enc["latents"] = jnp.asarray(idx, jnp.int32)
    enc = {k: v if k == "latents" else _f32(v) for k, v in enc.items()}
    out = []
    for hp, w_dec in _writes(self.dictionary, self.layer, self.hookpoint,
                             self.hookpoint_out):
      part = _Clamp(self.positions, f"clamp of latent(s) {name}", hp,
                    None if hp == source else source, topk)
      out.append((hp, part, {**enc, "w_dec": _f32(w_dec[idx]),
                             "values": values}))
    return out


def ablate(dictionary: Dictionary, latents, positions: Any = "all",
           **kwargs) -> ClampLatents:
  """Clamps `latents` to 0 (error-preserving); kwargs as `ClampLatents`."""
  return ClampLatents(dictionary, latents, 0.0, positions, **kwargs)


def _check_latents(d: Dictionary, latents, layer):
  n = d.d_sae
  bad = [i for i in latents if not 0 <= i < n]
  if bad:
    raise ValueError(f"latent {bad[0]} is out of range: the dictionary has "
                     f"{n} latents{' per layer' if _is_clt(d) else ''} "
                     f"(0..{n - 1})")
  if _is_clt(d):
    if layer is None or not 0 <= layer < d.n_layers:
      raise ValueError(f"a CLT latent needs its source layer, 0.."
                       f"{d.n_layers - 1} (layer=), got {layer!r}")
  elif layer is not None:
    raise ValueError(f"layer={layer}: only a CLT's latents have a source "
                     "layer")


def _is_clt(d) -> bool:
  return isinstance(d, MultiLayerInference) and d.kind == "clt"


def dictionary_hookpoints(d: InferenceDictionary, hookpoint: str | None = None,
                          hookpoint_out: str | None = None
                          ) -> tuple[str, str]:
  """(where `d` reads, where it writes): the arguments, else its config.

  A transcoder that names only one side gets the other from the same
  layer's MLP (mlp_in <-> mlp_out). ValueError if either stays unknown.
  """
  read = _hp(hookpoint or d.hookpoint)
  if not d.is_transcoder:
    if read is None:
      raise ValueError("the dictionary's config names no hookpoint; pass "
                       "hookpoint= (in a --steer spec: DICT:HOOKPOINT:"
                       "LATENT...)")
    return read, read
  write = _hp(hookpoint_out or d.hookpoint_out)
  pair = {"mlp_in": "mlp_out", "mlp_out": "mlp_in"}
  if (read is None) != (write is None):
    known = models.hooks.parse(read or write)
    if known.site in pair:
      other = models.hooks.Hookpoint(known.layer, pair[known.site]).name
      read, write = read or other, write or other
  if read is None or write is None:
    raise ValueError(f"a transcoder needs the hookpoints it reads and writes"
                     f" (read {read}, write {write}); pass hookpoint= and "
                     "hookpoint_out= (in a --steer spec: DICT:IN,OUT:"
                     "LATENT...)")
  return read, write


def _multi_hookpoints(d: MultiLayerInference
                      ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(inputs, outputs) per layer; a CLT without names reads mlp_in and
  writes mlp_out of the model layer with its index."""
  n = d.n_layers
  if d.kind == "clt":
    ins = d.hookpoints or tuple(f"layer_{i}/mlp_in" for i in range(n))
    outs = d.hookpoints_out or tuple(f"layer_{i}/mlp_out" for i in range(n))
  else:
    if d.hookpoints is None:
      raise ValueError("the crosscoder's config names no hookpoints")
    ins = outs = d.hookpoints
  return tuple(map(_hp, ins)), tuple(map(_hp, outs))


def _writes(d: Dictionary, layer, hookpoint, hookpoint_out):
  """[(hookpoint written, its (d_sae, width) decoder)]."""
  if isinstance(d, InferenceDictionary):
    return [(dictionary_hookpoints(d, hookpoint, hookpoint_out)[1], d.w_dec)]
  _, outs = _multi_hookpoints(d)
  if d.kind == "clt":
    return [(outs[o], d.w_dec[layer, :, o]) for o in range(layer, d.n_layers)]
  return [(outs[i], d.w_dec[:, i]) for i in range(d.n_layers)]


# ---------------------------------------------------------------- assembly

def steering_edits(interventions: Iterable[Any],
                   config: models.Gemma3Config | None = None
                   ) -> tuple[dict[str, models.ContextEdit], dict[str, Any]]:
  """(edits, edit_args) for `models.forward` applying every intervention.

  Interventions at the same hookpoint become one edit applying them in the
  order given (each sees the previous ones' result). The dicts can be
  merged with other edits at other hookpoints (`{**a, **b}`).

  Args:
    interventions: `AddDirection`, `AddLatent`, `ClampLatents`.
    config: if given, hookpoint layers and widths are checked here;
      otherwise a width mismatch is raised when the pass is traced.

  Returns:
    ({hookpoint: models.ContextEdit}, {hookpoint: tuple of part args}).
  """
  grouped: dict[str, list] = {}
  for iv in interventions:
    for hp, part, args in iv.parts():
      if config is not None:
        _check_config(config, hp, part, args)
      grouped.setdefault(hp, []).append((part, args))
  edits, edit_args = {}, {}
  for hp, items in grouped.items():
    reads = tuple(dict.fromkeys(r for part, _ in items for r in part.reads))
    edits[hp] = models.ContextEdit(_Composed(tuple(p for p, _ in items)),
                                   reads)
    edit_args[hp] = tuple(a for _, a in items)
  return edits, edit_args


def _check_config(config, hp, part, args):
  def width(name):
    return models.hooks.parse(name).check(config).width(config)
  if isinstance(part, _Add):
    _check_width(part.label, "the direction", args["direction"].shape[-1],
                 hp, width(hp))
    return
  _check_width(part.label, "the dictionary's output",
               args["w_dec"].shape[-1], hp, width(hp))
  src = part.source or hp
  _check_width(part.label, "the dictionary's input", args["w_enc"].shape[0],
               src, width(src))
