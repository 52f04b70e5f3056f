"""Reading a config's dictionary fields: the kind, the dictionaries a run
trains (one, or one per member of a group) and what each reads and predicts.

Errors name the config field (`config.group.layers: ...`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from gemscope_jax import dictionaries, models
from gemscope_jax.dictionaries import layout as layout_lib


def kind(c: ml_collections.ConfigDict) -> str:
  """The layout kind of `c.dictionary.architecture`."""
  return layout_lib.kind_of(c.dictionary.architecture)


def is_group(c: ml_collections.ConfigDict) -> bool:
  """Whether `c` asks for several dictionaries (`group.layers`/`sites`)."""
  g = c.get("group")
  return g is not None and (g.layers is not None or g.sites is not None)


def sites(spec: Any) -> list[str]:
  """The sites of a `group.sites` spec; errors name the field."""
  return layout_lib.parse_sites(spec, "group.sites")


def hookpoints(c: ml_collections.ConfigDict,
               mc: models.Gemma3Config | None = None) -> list[str]:
  """The hookpoint names `c` trains dictionaries at, sorted (layer, site).

  `[c.hookpoint]` unless `group.layers` or `group.sites` is set; then every
  (layer, site) pair of the two, the unset one taken from `hookpoint`.
  Errors name the field.
  """
  if not is_group(c):
    return [c.hookpoint]
  mc = mc or models.get_config(c.model.name)
  try:
    default = models.hooks.parse(c.hookpoint)
  except ValueError as e:
    raise ValueError(f"config.hookpoint: {e}") from None
  g = c.group
  layers = ([default.layer] if g.layers is None
            else layout_lib.parse_layers(g.layers, mc.num_layers,
                                         "group.layers"))
  group_sites = [default.site] if g.sites is None else sites(g.sites)
  return [h.name for h in models.hooks.parse_all(
      models.hooks.Hookpoint(layer, site) for layer in layers
      for site in group_sites)]


def layout(c: ml_collections.ConfigDict, hookpoint: str | None = None,
           mc: models.Gemma3Config | None = None) -> layout_lib.Layout:
  """What the dictionary of `c` at `hookpoint` (default `c.hookpoint`) reads
  and predicts (`dictionaries.make_layout`; a group member when
  `hookpoint` is given). Errors name the field."""
  mc = mc or models.get_config(c.model.name)
  return layout_lib.make_layout(
      c.dictionary.architecture,
      c.hookpoint if hookpoint is None else hookpoint, mc, target=c.target,
      layers=c.dictionary.layers, member=hookpoint is not None)


def dict_config(c: ml_collections.ConfigDict, lay: layout_lib.Layout,
                mc: models.Gemma3Config) -> dictionaries.DictConfig:
  """The `DictConfig` of `c.dictionary` over `lay`'s widths in `mc`."""
  d_in, d_out = lay.widths(mc)
  d = c.dictionary
  n_layers = len(lay.inputs) if lay.multilayer else None
  targets, target_l0 = d.get("l0_targets"), d.target_l0
  if isinstance(targets, str):
    if targets != "even":
      raise ValueError(f"DictConfig.l0_targets: 'even' or one number per "
                       f"layer, got {targets!r}")
    # The total target_l0 split evenly over the layers.
    targets = (None if n_layers is None or target_l0 is None
               else (target_l0 / n_layers,) * n_layers)
  elif targets is not None:
    targets = tuple(targets)
    target_l0 = float(sum(targets))  # the total they add up to
  return dictionaries.DictConfig(
      d_in=d_in, d_sae=d.width, architecture=d.architecture,
      d_out=None if d_out == d_in else d_out, l0_targets=targets,
      bandwidth=d.bandwidth, target_l0=target_l0, k=d.k,
      sparsity_penalty=d.sparsity_penalty, dtype=d.dtype,
      matryoshka_prefixes=d.matryoshka_prefixes,
      preact_coeff=d.preact_coeff, affine_skip=bool(d.affine_skip),
      dense_rank=d.get("dense_rank", 0),
      l0_preact_bandwidth=float(d.l0_preact_bandwidth),
      freq_coeff=float(d.freq_coeff), max_freq=float(d.max_freq),
      n_layers=n_layers,
      causal=bool(d.causal))


def layouts(c: ml_collections.ConfigDict, mc: models.Gemma3Config
            ) -> list[layout_lib.Layout]:
  """The layout of every dictionary `c` trains: one per member of a group
  (in `hookpoints` order), else the one at `c.hookpoint`."""
  if is_group(c):
    return [layout(c, h, mc) for h in hookpoints(c, mc)]
  return [layout(c, None, mc)]


INIT_FROM_FIELD = "config.dictionary.init_from"


def init_from_paths(spec: Any, layout: layout_lib.Layout) -> tuple[str, ...]:
  """One source path per layer of `layout` (a CLT's) from the config value.

  Args:
    spec: None (no init), a tuple or list of paths in layer order, a string
      holding '{layer}' (filled with each layer number), or one path (a
      group run's workdir or export, read at each layer's
      transcoder/layer_L).
    layout: the CLT's layout.

  Raises:
    ValueError: naming `config.dictionary.init_from`.
  """
  if spec is None:
    return ()
  layers = [models.hooks.parse(h).layer for h in layout.inputs]
  if isinstance(spec, str) and spec:
    return tuple(spec.replace("{layer}", str(layer)) for layer in layers)
  if (isinstance(spec, (tuple, list)) and spec
      and all(isinstance(p, str) and p for p in spec)):
    if len(spec) != len(layers):
      raise ValueError(f"{INIT_FROM_FIELD}: {len(spec)} path(s) for the CLT's "
                       f"{len(layers)} layers {tuple(layers)}, got {spec!r}")
    return tuple(spec)
  raise ValueError(f"{INIT_FROM_FIELD}: one path per CLT layer, a pattern with "
                   f"'{{layer}}' or one group run's workdir, got {spec!r}")
