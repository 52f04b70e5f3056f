r"""The main job: a JumpReLU SAE on Gemma 3 270M's layer-6 residual stream.

  gemscope train --config=experiments/jumprelu_270m.py --workdir=out/main

Trains on the embedded Shakespeare (real Gemma 3 270M weights, live
activations, no cache) with the Gemma Scope 2 recipe scaled to a 2-core
CPU: width 4096, quadratic L0 penalty towards L0* = 60, Adam(beta1=0),
inputs scaled to unit mean squared norm, b_dec started at the data mean,
smaller batches and more steps than the published 4096. Then evaluates on
held-out text (the Python documentation) and writes metrics.json.

Expected (2 CPU cores, about 10 minutes): L0 about 60, FVU about 0.1, a few
per cent dead latents, about 97% of the LM loss recovered; see README.

Arguments after the colon override fields, e.g.
  experiments/jumprelu_270m.py:runlocal               a 2-minute smoke run
  experiments/jumprelu_270m.py:layer=9,target_l0=20   another layer / L0
  experiments/jumprelu_270m.py:width=16384,step=sparse
  experiments/jumprelu_270m.py:gs2                    the published scale
                                                      (batch 4096, lr 7e-5)
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  overrides = config_lib.parse_arg(arg)
  if overrides.pop("gs2", False):
    # Gemma Scope 2's own schedule: needs a GPU/TPU and ~100M tokens.
    c = config_lib.preset("gemma3_1b")
    c.model.name, c.model.checkpoint = "gemma3_270m", "default"
    c.hookpoint = "layer_6/resid_post"
  else:
    c = config_lib.preset("gemma3_270m")
  return config_lib.apply_overrides(c, overrides)
