"""Hookpoints: named sites in the Gemma 3 residual computation.

A hookpoint is written `layer_{L}/{site}` (the same prefix as the parameter
tree), e.g. `layer_6/resid_post`. Sites, in the order a block computes them:

  resid_pre   input of block L
  attn_out    concatenated per-head outputs before the output projection
              (width num_heads * head_dim)
  resid_mid   residual stream after attention's residual add
  mlp_in      output of the pre-FFW norm (what a transcoder reads)
  mlp_out     output of the post-FFW norm (what the MLP adds to the stream)
  resid_post  output of block L (= resid_pre of block L + 1)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from gemscope_jax.models._config import Gemma3Config

SITES: tuple[str, ...] = (
    "resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")

# The same tensor in transformers' Gemma3ForCausalLM, as Gemma Scope 2
# names it: the input or output of a module of decoder layer `layer`.
HF_HOOKS: dict[str, str] = {
    "resid_pre": "model.layers.{layer}.input",
    "attn_out": "model.layers.{layer}.self_attn.o_proj.input",
    "resid_mid": "model.layers.{layer}.pre_feedforward_layernorm.input",
    "mlp_in": "model.layers.{layer}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{layer}.post_feedforward_layernorm.output",
    "resid_post": "model.layers.{layer}.output",
}

_NAME_RE = re.compile(r"^layer_(\d+)/([a-z_]+)$")


@dataclasses.dataclass(frozen=True, order=True)
class Hookpoint:
  """One site of one block."""
  layer: int
  site: str

  def __post_init__(self):
    if self.site not in SITES:
      raise ValueError(f"unknown hookpoint site {self.site!r}; sites are "
                       f"{', '.join(SITES)}")
    if self.layer < 0:
      raise ValueError(f"hookpoint layer must be >= 0, got {self.layer}")

  @property
  def name(self) -> str:
    return f"layer_{self.layer}/{self.site}"

  @property
  def hf_name(self) -> str:
    return HF_HOOKS[self.site].format(layer=self.layer)

  def width(self, config: Gemma3Config) -> int:
    return config.attn_out_dim if self.site == "attn_out" else config.d_model

  def check(self, config: Gemma3Config) -> "Hookpoint":
    if self.layer >= config.num_layers:
      raise ValueError(
          f"hookpoint {self.name}: {config.name} has layers 0.."
          f"{config.num_layers - 1}")
    return self

  def __str__(self) -> str:
    return self.name


def parse(name: "str | Hookpoint") -> Hookpoint:
  """Parses `layer_6/resid_post` (also accepts `blocks.6.resid_post`)."""
  if isinstance(name, Hookpoint):
    return name
  text = name.strip()
  m = _NAME_RE.match(text) or re.match(r"^blocks\.(\d+)\.(?:hook_)?([a-z_]+)$",
                                       text)
  if not m:
    raise ValueError(f"cannot parse hookpoint {name!r}: expected "
                     f"'layer_<L>/<site>' with site one of {', '.join(SITES)}")
  return Hookpoint(int(m.group(1)), m.group(2))


def parse_all(names: Iterable["str | Hookpoint"],
              config: Gemma3Config | None = None) -> tuple[Hookpoint, ...]:
  """Parses, de-duplicates and sorts hookpoints; checks layers if given a config."""
  points = sorted({parse(n) for n in names})
  if config is not None:
    for p in points:
      p.check(config)
  return tuple(points)
