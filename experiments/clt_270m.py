r"""A cross-layer transcoder (CLT) over Gemma 3 270M's MLPs.

  gemscope train --config=experiments/clt_270m.py --workdir=out/clt
  gemscope train --config=experiments/clt_270m.py:clt_layers=all \
      --workdir=out/clt_all

Started from trained transcoders of the same layers (Gemma Scope 2's
recipe: each layer's first 1024 latents, near-duplicates dropped), with the
L0 target falling from 4x to its goal over the first 200 steps:

  gemscope train --config=experiments/transcoder_270m.py:layers=3-6 \
      --workdir=out/tc_3_6
  gemscope train --config=experiments/clt_270m.py --workdir=out/clt_init \
      --set dictionary.init_from=out/tc_3_6 \
      --set dictionary.init_prefix=1024 \
      --set train.l0_target_decay_steps=200

Latents read mlp_in of layer n and write mlp_out of layer n and every later
layer (causal); trained jointly on all the chosen layers from one Gemma pass,
each layer's mlp_in and mlp_out divided by its own scalar. The L0 budget is
the total over layers (target_l0 = 60 per layer by default). metrics.json:
FVU of every layer's mlp_out (`layer_L/mlp_out/fvu`) and pooled, L0 per
layer, and the replacement model's LM loss: the CLT's outputs replacing
every one of those MLPs at once, each layer's latents read from the
replaced stream (against all those MLP outputs zeroed).

Expected: see README ("Transcoders, crosscoders and CLTs"); `runlocal` is a
smoke run.
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  overrides = config_lib.parse_arg(arg)
  c = config_lib.preset("gemma3_270m")
  c.dictionary.architecture = "jumprelu_clt"
  if overrides.pop("topk", False):
    c.dictionary.architecture = "topk_clt"
    c.train.sparsity_coeff = 0.0
  c.dictionary.layers = overrides.pop("clt_layers", "3-6")
  n = len(config_lib.layout(c).inputs)
  c.dictionary.target_l0 = 60.0 * n
  c.dictionary.k = 60 * n
  c.hookpoint = "layer_3/mlp_in"
  return config_lib.apply_overrides(c, overrides)
