r"""Preset: a JumpReLU SAE on any Gemma 3 size (gemscope_jax/training/presets.py).

  gemscope train --config=configs/gemma3.py:size=1b,layer=L,site=S,width=W \
      --workdir=DIR [--set model.checkpoint=PATH]

`size` is 270m (the default), 1b, 4b, 12b or 27b; each gets a middle layer,
a width, batch and dtype that suit it, and its Gemma parameter layout over
the mesh (1B/4B: bf16 weights split over 'data'; 12B/27B also heads and MLP
units over 'model'; see docs/memory_plan.md). Sites: resid_pre, attn_out,
resid_mid, mlp_in, mlp_out, resid_post. Every field can be overridden as
key=value after the colon or with --set (e.g. train.lr=3e-4); `runlocal`
shrinks the run to CPU minutes. Only 270M ships a checkpoint (the embedded
real model); for the others set model.checkpoint to a GGUF file, a
transformers directory or an Orbax checkpoint (or "random" to try the
mechanics).
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  overrides = config_lib.parse_arg(arg)
  size = str(overrides.pop("size", "270m"))
  return config_lib.apply_overrides(config_lib.preset(size), overrides)
