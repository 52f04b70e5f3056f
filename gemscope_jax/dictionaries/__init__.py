"""Sparse dictionaries as Flax linen modules sharing one interface.

`encode(x) -> latents`, `decode(latents) -> recon`, `__call__(x) ->
DictOutput`, `loss(x, out, *, sparsity_coeff, target=None) -> LossOutput`,
called through `module.apply({'params': params}, ..., method=...)`.
Parameters follow the Gemma Scope 2 names and carry logical axis names.
"""

from __future__ import annotations

from gemscope_jax.dictionaries._base import (AXES, DictOutput, Dictionary,
                                             apply_update,
                                             LossOutput, compute_loss,
                                             fold_for_inference, fvu,
                                             init_params, mse_loss,
                                             normalize_decoder,
                                             project_decoder_grads)
from gemscope_jax.dictionaries._config import ARCHITECTURES, DictConfig
from gemscope_jax.dictionaries.jumprelu import JumpReLU
from gemscope_jax.dictionaries.matryoshka import Matryoshka
from gemscope_jax.dictionaries.relu_l1 import ReLU
from gemscope_jax.dictionaries.topk import BatchTopK, TopK, global_threshold

DICTIONARIES = {
    "jumprelu": JumpReLU,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "relu": ReLU,
}


def make_dictionary(config: DictConfig) -> Dictionary | Matryoshka:
  """The module `config` describes, Matryoshka-wrapped if it asks for it."""
  module = DICTIONARIES[config.architecture].from_config(config)
  if config.matryoshka_prefixes is not None:
    module = Matryoshka(module, config.matryoshka_prefixes)
  return module


__all__ = [
    "ARCHITECTURES", "AXES", "apply_update", "BatchTopK", "DICTIONARIES", "DictConfig",
    "DictOutput", "Dictionary", "JumpReLU", "LossOutput", "Matryoshka", "ReLU",
    "TopK", "compute_loss", "fold_for_inference", "fvu", "global_threshold",
    "init_params", "make_dictionary", "mse_loss", "normalize_decoder",
    "project_decoder_grads",
]
