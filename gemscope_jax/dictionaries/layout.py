"""What a dictionary reads and predicts: `Layout`, and the layer and site
specs ('all', '3-6', '2+6+9') configs use to name them.

The layout follows from the architecture's kind:
- SAE: reconstructs its hookpoint.
- Transcoder: reads a hookpoint (usually `layer_L/mlp_in`) and predicts
  another at the same or a later layer (default `layer_L/mlp_out`).
- Crosscoder: one site at each of several layers, reconstructed together.
- CLT (cross-layer transcoder): `mlp_in` -> `mlp_out` at each of its layers.

Errors name the config field at fault (`field=` arguments), so a bad
`dictionary.layers` fails at launch as `config.dictionary.layers: ...`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gemscope_jax import models
from gemscope_jax.dictionaries._config import CLTS, CROSSCODERS, TRANSCODERS

KINDS = ("sae", "transcoder", "crosscoder", "clt")


def _need(ok: bool, field: str, message: str, value: Any) -> None:
  if not ok:
    raise ValueError(f"config.{field}: {message}, got {value!r}")


def kind_of(architecture: str) -> str:
  """The layout kind of an architecture name."""
  if architecture in TRANSCODERS:
    return "transcoder"
  if architecture in CROSSCODERS:
    return "crosscoder"
  if architecture in CLTS:
    return "clt"
  return "sae"


@dataclasses.dataclass(frozen=True)
class Layout:
  """What one dictionary reads and predicts.

  Attributes:
    kind: 'sae', 'transcoder', 'crosscoder' or 'clt'.
    inputs: hookpoints read, in layer order (one, or one per layer).
    targets: hookpoints predicted, aligned with `inputs`; equal to `inputs`
      for SAEs and crosscoders.
  """
  kind: str
  inputs: tuple[str, ...]
  targets: tuple[str, ...]

  @property
  def multilayer(self) -> bool:
    return self.kind in ("crosscoder", "clt")

  @property
  def reconstructs_input(self) -> bool:
    return self.inputs == self.targets

  @property
  def hookpoints(self) -> list[str]:
    """Every hookpoint a batch must hold (inputs, then new targets)."""
    return list(dict.fromkeys(self.inputs + self.targets))

  @property
  def name(self) -> str:
    """How metrics and progress name it: the hookpoint (SAEs),
    'layer_L/transcoder', or the kind with its layers."""
    first = models.hooks.parse(self.inputs[0])
    if self.kind == "sae":
      return first.name
    if self.kind == "transcoder":
      return f"layer_{first.layer}/transcoder"
    layers = [models.hooks.parse(h).layer for h in self.inputs]
    return f"{self.kind}_layers_{layers[0]}-{layers[-1]}"

  @property
  def family(self) -> str:
    """The Gemma Scope 2 folder family: the site (SAEs), 'transcoder',
    'crosscoder' or 'clt'."""
    if self.kind == "sae":
      return models.hooks.parse(self.inputs[0]).site
    return self.kind

  def widths(self, mc: models.Gemma3Config) -> tuple[int, int]:
    """(input width, target width) in model `mc`."""
    return (models.hooks.parse(self.inputs[0]).width(mc),
            models.hooks.parse(self.targets[0]).width(mc))


def parse_layers(spec: Any, num_layers: int, field: str) -> list[int]:
  """Sorted layers of a spec: 'all', 'a-b' (inclusive), 'a+b+c', an int or
  a tuple of ints; errors name `field`."""
  if isinstance(spec, bool):
    _need(False, field, "must be 'all', 'a-b', 'a+b', an int or ints", spec)
  if isinstance(spec, int):
    layers = [spec]
  elif isinstance(spec, str):
    text = spec.strip()
    try:
      if text == "all":
        layers = list(range(num_layers))
      elif "-" in text:
        lo, hi = (int(t) for t in text.split("-"))
        layers = list(range(lo, hi + 1))
        if not layers:
          raise ValueError
      else:
        layers = [int(t) for t in text.split("+")]
    except ValueError:
      _need(False, field, "must be 'all', 'a-b' (a <= b), 'a+b', an int or "
            "ints", spec)
  elif isinstance(spec, (tuple, list)) and spec and all(
      isinstance(v, int) and not isinstance(v, bool) for v in spec):
    layers = list(spec)
  else:
    _need(False, field, "must be 'all', 'a-b', 'a+b', an int or ints", spec)
  for layer in layers:
    _need(0 <= layer < num_layers, field,
          f"the model has layers 0..{num_layers - 1}", spec)
  return sorted(set(layers))


def parse_sites(spec: Any, field: str) -> list[str]:
  """Sites of a spec: a site, 'a+b' or a tuple of sites; errors name
  `field`."""
  if isinstance(spec, str):
    sites = [t.strip() for t in spec.split("+")]
  elif isinstance(spec, (tuple, list)) and spec and all(
      isinstance(v, str) for v in spec):
    sites = list(spec)
  else:
    _need(False, field, "must be a site, 'a+b' or a tuple of sites", spec)
  for site in sites:
    _need(site in models.hooks.SITES, field,
          f"unknown site {site!r}; sites are {', '.join(models.hooks.SITES)}",
          spec)
  return list(dict.fromkeys(sites))


def make_layout(architecture: str, hookpoint: str, mc: models.Gemma3Config,
                *, target: str | None = None, layers: Any = None,
                member: bool = False) -> Layout:
  """The layout of an `architecture` dictionary at `hookpoint` in `mc`.

  Args:
    architecture: a `dictionaries.ARCHITECTURES` name.
    hookpoint: the input hookpoint (config field `hookpoint`).
    mc: the Gemma config the hookpoints must exist in.
    target: transcoders only: the predicted hookpoint (field `target`);
      default `mlp_out` of the input's layer.
    layers: crosscoders and CLTs only: the layers spanned (field
      `dictionary.layers`; None: all).
    member: the dictionary is one member of a group at `hookpoint`: a
      transcoder predicts `target`'s site at its own layer.
  """
  try:
    hp = models.hooks.parse(hookpoint).check(mc)
  except ValueError as e:
    raise ValueError(f"config.hookpoint: {e}") from None
  k = kind_of(architecture)
  if target is not None and k != "transcoder":
    _need(False, "target", "is only for transcoder architectures "
          f"{TRANSCODERS} (an SAE reconstructs its input)", target)
  if layers is not None and k not in ("crosscoder", "clt"):
    _need(False, "dictionary.layers", "is only for crosscoders and CLTs "
          "(many dictionaries, one per layer: group.layers)", layers)
  if k == "sae":
    return Layout(k, (hp.name,), (hp.name,))
  if k == "transcoder":
    out = models.hooks.Hookpoint(hp.layer, "mlp_out")
    if target is not None:
      try:
        t = models.hooks.parse(target).check(mc)
      except ValueError as e:
        raise ValueError(f"config.target: {e}") from None
      out = models.hooks.Hookpoint(hp.layer, t.site) if member else t
    _need(out.layer >= hp.layer, "target", f"must be at or after the "
          f"input's layer ({hp.name})", out.name)
    _need(out != hp, "target", "must differ from the hookpoint (that is "
          "an SAE)", out.name)
    return Layout(k, (hp.name,), (out.name,))
  spec = "all" if layers is None else layers
  spanned = parse_layers(spec, mc.num_layers, "dictionary.layers")
  if k == "crosscoder":
    names = tuple(models.hooks.Hookpoint(l, hp.site).name for l in spanned)
    return Layout(k, names, names)
  return Layout(k, tuple(f"layer_{l}/mlp_in" for l in spanned),
                tuple(f"layer_{l}/mlp_out" for l in spanned))
