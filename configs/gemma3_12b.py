r"""Preset: a JumpReLU SAE on Gemma 3 12B (see gemscope_jax.training.config).

  gemscope train --config=configs/gemma3_12b.py:layer=L,site=S,width=W \
      --workdir=DIR [--set model.checkpoint=PATH]

Sites: resid_pre, attn_out, resid_mid, mlp_in, mlp_out, resid_post. Every
field of the config can be overridden as key=value after the colon or with
--set (e.g. train.lr=3e-4); `runlocal` shrinks the run to CPU minutes.
No checkpoint ships for this size: set model.checkpoint to a GGUF file, a
transformers directory or an Orbax checkpoint (or "random" to try the
mechanics).
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  c = config_lib.preset("gemma3_12b")
  # Gemma's bf16 weights split over 'data' (FSDP), heads and MLP hidden
  # units over 'model' (tensor parallel);
  # see gemscope_jax/training/sharding.py and docs/memory_plan.md.
  c.mesh.gemma = "fsdp_tp"
  return config_lib.apply_overrides(c, config_lib.parse_arg(arg))
