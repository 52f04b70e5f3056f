r"""TopK and BatchTopK SAEs on Gemma 3 270M, comparable to jumprelu_270m.

  gemscope train --config=experiments/topk_270m.py --workdir=out/topk
  gemscope train --config=experiments/topk_270m.py:arch=batchtopk \
      --workdir=out/batchtopk

k = 60 latents per token (BatchTopK: on average over each batch; exported
as a JumpReLU with one global threshold). Same data, width and budget as
the main job, so metrics.json files compare directly with it.
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  c = config_lib.preset("gemma3_270m")
  c.dictionary.architecture = "topk"
  c.dictionary.k = 60
  c.train.sparsity_coeff = 0.0
  return config_lib.apply_overrides(c, config_lib.parse_arg(arg))
