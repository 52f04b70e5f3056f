r"""Preset: a JumpReLU SAE on Gemma 3 270M (see gemscope_jax.training.config).

  gemscope train --config=configs/gemma3_270m.py:layer=L,site=S,width=W \
      --workdir=DIR [--set model.checkpoint=PATH]

Sites: resid_pre, attn_out, resid_mid, mlp_in, mlp_out, resid_post. Every
field of the config can be overridden as key=value after the colon or with
--set (e.g. train.lr=3e-4); `runlocal` shrinks the run to CPU minutes.
The embedded real checkpoint is used by default.
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  return config_lib.preset("gemma3_270m", arg)
