r"""A crosscoder over Gemma 3 270M's residual stream at several layers.

  gemscope train --config=experiments/crosscoder_270m.py --workdir=out/xc
  gemscope train --config=experiments/crosscoder_270m.py:causal \
      --workdir=out/xc_causal                   weakly causal variant

One dictionary reads resid_post of layers 4-8 together (each divided by its
own scalar) and reconstructs each of them; `causal` gives every latent a
source layer it may not read past nor write before. metrics.json: pooled
and per-layer FVU (`layer_L/resid_post/fvu`), L0, dead/dense latents and
the LM loss with every layer's reconstruction (computed from the clean
pass) spliced in at once.

Expected: see README ("Transcoders, crosscoders and CLTs"); `runlocal` is a
smoke run.
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  overrides = config_lib.parse_arg(arg)
  c = config_lib.preset("gemma3_270m")
  c.dictionary.architecture = "jumprelu_crosscoder"
  if overrides.pop("topk", False):
    c.dictionary.architecture = "topk_crosscoder"
    c.dictionary.k = 60
    c.train.sparsity_coeff = 0.0
  c.dictionary.causal = bool(overrides.pop("causal", False))
  c.dictionary.layers = overrides.pop("xc_layers", "4-8")
  c.hookpoint = "layer_6/resid_post"
  return config_lib.apply_overrides(c, overrides)
