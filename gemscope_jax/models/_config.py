"""Gemma 3 text-decoder configurations, one frozen dataclass per family size.

The numbers are the published hyper-parameters of the Gemma 3 text decoders
(the vision tower of 4B/12B/27B is not modelled). Every derived quantity the
model needs (which layers are global, the RoPE base and scale of each layer,
the query scale) is a method here, so the module code never switches on names.
"""

from __future__ import annotations

import dataclasses
import enum
import math


class AttentionKind(enum.Enum):
  LOCAL = "local"
  GLOBAL = "global"


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """Hyper-parameters of one Gemma 3 text decoder.

  Attributes:
    name: Human-readable size name, e.g. "gemma3_270m".
    num_layers: Number of transformer blocks.
    d_model: Width of the residual stream.
    mlp_dim: Hidden width of the gated MLP.
    num_heads: Number of query heads.
    num_kv_heads: Number of key/value heads (grouped-query attention).
    head_dim: Width of one attention head.
    vocab_size: Rows of the (tied) embedding table.
    sliding_window: Local layers attend to keys with query_pos - key_pos < this.
    global_every: Every `global_every`-th layer (1-based) is global: 6 gives
      the 5 local : 1 global pattern.
    rope_base_local: RoPE base frequency of local layers.
    rope_base_global: RoPE base frequency of global layers.
    rope_scale_global: Linear position scaling of global layers (positions
      are divided by it); 1.0 means none.
    query_pre_attn_scalar: Queries are multiplied by this ** -0.5.
    norm_eps: Epsilon of every RMSNorm.
  """

  name: str
  num_layers: int
  d_model: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int = 262_144
  sliding_window: int = 512
  global_every: int = 6
  rope_base_local: float = 10_000.0
  rope_base_global: float = 1_000_000.0
  rope_scale_global: float = 1.0
  query_pre_attn_scalar: float = 256.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"{self.name}: num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    for field in ("num_layers", "d_model", "mlp_dim", "num_heads",
                  "num_kv_heads", "head_dim", "vocab_size", "sliding_window",
                  "global_every"):
      if getattr(self, field) <= 0:
        raise ValueError(f"{self.name}: {field} must be positive, "
                         f"got {getattr(self, field)}")

  def attention_kind(self, layer: int) -> AttentionKind:
    """Local (sliding-window) or global attention for block `layer` (0-based)."""
    if (layer + 1) % self.global_every == 0:
      return AttentionKind.GLOBAL
    return AttentionKind.LOCAL

  def global_layers(self) -> tuple[int, ...]:
    return tuple(l for l in range(self.num_layers)
                 if self.attention_kind(l) is AttentionKind.GLOBAL)

  def rope(self, layer: int) -> tuple[float, float]:
    """(base, scale) of the rotary embedding of block `layer`."""
    if self.attention_kind(layer) is AttentionKind.GLOBAL:
      return self.rope_base_global, self.rope_scale_global
    return self.rope_base_local, 1.0

  @property
  def query_scale(self) -> float:
    return self.query_pre_attn_scalar ** -0.5

  @property
  def embed_scale(self) -> float:
    return math.sqrt(self.d_model)

  @property
  def attn_out_dim(self) -> int:
    """Width of the `attn_out` hookpoint (concatenated heads)."""
    return self.num_heads * self.head_dim

  def num_params(self) -> int:
    """Parameter count of the text decoder in closed form (tied embedding)."""
    d, h = self.d_model, self.head_dim
    per_layer = (
        self.num_heads * d * h            # q_einsum
        + 2 * self.num_kv_heads * d * h   # kv_einsum
        + self.num_heads * h * d          # attn_vec_einsum
        + 2 * h                           # query/key norms
        + 3 * self.mlp_dim * d            # gating_einsum (2x) + linear
        + 4 * d)                          # four block norms
    return self.vocab_size * d + self.num_layers * per_layer + d

  def replace(self, **changes) -> "Gemma3Config":
    return dataclasses.replace(self, **changes)


# Published sizes. mlp_dim, heads and head_dim follow the official releases;
# 4B and larger use sliding window 1024 and linear RoPE scaling 8 on global
# layers; 27B uses head_dim 128 with query scale (d_model / num_heads) ** -0.5.
Gemma3_270M = Gemma3Config(
    name="gemma3_270m", num_layers=18, d_model=640, mlp_dim=2048,
    num_heads=4, num_kv_heads=1, head_dim=256, sliding_window=512)

Gemma3_1B = Gemma3Config(
    name="gemma3_1b", num_layers=26, d_model=1152, mlp_dim=6912,
    num_heads=4, num_kv_heads=1, head_dim=256, sliding_window=512)

Gemma3_4B = Gemma3Config(
    name="gemma3_4b", num_layers=34, d_model=2560, mlp_dim=10240,
    num_heads=8, num_kv_heads=4, head_dim=256, sliding_window=1024,
    rope_scale_global=8.0)

Gemma3_12B = Gemma3Config(
    name="gemma3_12b", num_layers=48, d_model=3840, mlp_dim=15360,
    num_heads=16, num_kv_heads=8, head_dim=256, sliding_window=1024,
    rope_scale_global=8.0)

Gemma3_27B = Gemma3Config(
    name="gemma3_27b", num_layers=62, d_model=5376, mlp_dim=21504,
    num_heads=32, num_kv_heads=16, head_dim=128, sliding_window=1024,
    rope_scale_global=8.0, query_pre_attn_scalar=5376 / 32)

CONFIGS: dict[str, Gemma3Config] = {
    c.name: c for c in (Gemma3_270M, Gemma3_1B, Gemma3_4B, Gemma3_12B,
                        Gemma3_27B)
}


def get_config(name: str) -> Gemma3Config:
  """Looks up a family size by name ("gemma3_270m", "270m", "1b", ...)."""
  key = name.lower().replace("-", "_")
  if not key.startswith("gemma3_"):
    key = "gemma3_" + key
  if key not in CONFIGS:
    raise ValueError(f"unknown Gemma 3 size {name!r}; known: "
                     f"{', '.join(sorted(CONFIGS))}")
  return CONFIGS[key]
