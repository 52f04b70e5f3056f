"""Per-size starting points: `preset("gemma3_1b", arg)`.

One table, one function: a middle layer, a width and batch that suit the
model, a dtype, the mesh's model axis and Gemma's parameter layout, and for
the sizes past 270M the published recipe's scale (Gemma Scope's lr,
warm-ups and token counts). `RUNLOCAL` shrinks any config to minutes on a
laptop CPU.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from gemscope_jax.training import overrides
from gemscope_jax.training.schema import default_config

# Per-size starting points: a middle layer, a width and batch that suit the
# model, a dtype, the mesh's model axis (larger models shard the latent axis)
# and Gemma's parameter layout over the mesh (parallel/gemma_layout.py and
# docs/memory_plan.md: bf16 weights split over 'data' (fsdp), and for 12B and
# 27B also heads and MLP units over 'model' (fsdp_tp)).
PRESETS: dict[str, dict[str, Any]] = {
    "gemma3_270m": dict(layer=6, width=4096, batch=512, dtype="float32",
                        model_axis=1, gemma="replicated"),
    "gemma3_1b": dict(layer=13, width=16384, batch=4096, dtype="bfloat16",
                      model_axis=1, gemma="fsdp"),
    "gemma3_4b": dict(layer=17, width=16384, batch=4096, dtype="bfloat16",
                      model_axis=1, gemma="fsdp"),
    "gemma3_12b": dict(layer=24, width=65536, batch=4096, dtype="bfloat16",
                       model_axis=4, gemma="fsdp_tp"),
    "gemma3_27b": dict(layer=31, width=65536, batch=4096, dtype="bfloat16",
                       model_axis=8, gemma="fsdp_tp"),
}

# Short names accepted for the sizes (`configs/gemma3.py:size=1b`).
SIZES = {name.removeprefix("gemma3_"): name for name in PRESETS}


def preset(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`default_config` set up for model size `name`, then `arg` applied.

  Args:
    name: 'gemma3_270m' ... 'gemma3_27b', or the short size ('270m', '1b',
      '4b', '12b', '27b').
    arg: overrides as in `file.py:arg` (`runlocal,layer=9,width=16384`).

  Model sizes other than 270M have no embedded checkpoint: set
  `model.checkpoint` to a path (or 'random' to try the mechanics).
  """
  name = SIZES.get(name, name)
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)} "
                     f"(or {', '.join(SIZES)})")
  p = PRESETS[name]
  c = default_config()
  c.model.name = name
  c.model.dtype = p["dtype"]
  if name != "gemma3_270m":
    c.model.checkpoint = ""  # must be given
  c.hookpoint = f"layer_{p['layer']}/resid_post"
  c.dictionary.width = p["width"]
  c.train.batch_size = p["batch"]
  c.mesh.model = p["model_axis"]
  c.mesh.gemma = p["gemma"]
  if name == "gemma3_270m":
    # CPU-sized: lr 1e-3 for about a thousand steps. Encoder columns (and
    # decoder rows; W_enc = W_dec^T) start at norm 0.3 rather than the
    # published 1: at this lr and length a unit-scale random encoder is
    # unlearned too slowly. An SAE then reconstructs worse (FVU 0.131 ->
    # 0.077, benchmarks/quality_vs_saelens.py); a transcoder settles far
    # below its L0 target, because the reconstruction drives b_enc down to
    # silence the random encoder (b_enc median -14.9 against -4.4 at 0.3,
    # raw units) and the L0 penalty, which moves only the thresholds, cannot
    # bring those latents back (layer 6, `runlocal`: L0 33 at init_norm 1,
    # 57 at 0.3, 51 at 0.1, target 60; loss recovered 24 %, 51 %, 50 %).
    c.train.init_norm = 0.3
  else:
    # Published scale: Gemma Scope's lr, warm-ups and token counts.
    c.train.lr = 7e-5
    c.train.lr_warmup_steps = 1000
    c.dictionary.preact_coeff = 0.0  # the published recipe has none
    c.train.sparsity_warmup_steps = 10_000
    c.train.num_tokens = 4096 * 100_000
    c.train.checkpoint_every_steps = 2000
    c.train.log_every_steps = 100
    c.data.bucket_tokens = 1 << 20
    c.eval.num_tokens = 1 << 20
    c.eval.loss_tokens = 1 << 17
  return overrides.apply_overrides(c, overrides.parse_arg(arg))
