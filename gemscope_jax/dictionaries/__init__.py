"""Sparse dictionaries as Flax linen modules sharing one interface.

`encode(x) -> latents`, `decode(latents) -> recon`, `__call__(x) ->
DictOutput`, `loss(x, out, *, sparsity_coeff, target=None) -> LossOutput`,
called through `module.apply({'params': params}, ..., method=...)`.
Parameters follow the Gemma Scope 2 names and carry logical axis names.
Transcoders (`JumpReLUTranscoder`, `TopKTranscoder`), `Crosscoder` and
`CrossLayerTranscoder` share the interface; the multi-layer ones read and
write (..., n_layers, d).
"""

from __future__ import annotations

from gemscope_jax.dictionaries._base import (AXES, DictOutput, Dictionary,
                                             apply_update,
                                             LossOutput, compute_loss,
                                             fold_for_inference, fvu,
                                             init_params, mse_loss,
                                             normalize_decoder,
                                             project_decoder_grads)
from gemscope_jax.dictionaries._config import (ARCHITECTURES, CLTS,
                                               CROSSCODERS, MULTILAYER, SAES,
                                               TRANSCODERS, DictConfig)
from gemscope_jax.dictionaries.clt import CrossLayerTranscoder
from gemscope_jax.dictionaries.crosscoder import Crosscoder
from gemscope_jax.dictionaries.jumprelu import JumpReLU, JumpReLUTranscoder
from gemscope_jax.dictionaries.matryoshka import Matryoshka
from gemscope_jax.dictionaries.relu_l1 import ReLU
from gemscope_jax.dictionaries.topk import (BatchTopK, TopK, TopKTranscoder,
                                            global_threshold)

DICTIONARIES = {
    "jumprelu": JumpReLU,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "relu": ReLU,
    "jumprelu_transcoder": JumpReLUTranscoder,
    "topk_transcoder": TopKTranscoder,
    # One class per structure; `from_config` reads the activation from the
    # architecture's prefix.
    "jumprelu_crosscoder": Crosscoder,
    "topk_crosscoder": Crosscoder,
    "jumprelu_clt": CrossLayerTranscoder,
    "topk_clt": CrossLayerTranscoder,
}


def make_dictionary(config: DictConfig) -> Dictionary | Matryoshka:
  """The module `config` describes, Matryoshka-wrapped if it asks for it."""
  module = DICTIONARIES[config.architecture].from_config(config)
  if config.matryoshka_prefixes is not None:
    module = Matryoshka(module, config.matryoshka_prefixes)
  return module


__all__ = [
    "ARCHITECTURES", "CLTS", "CROSSCODERS", "MULTILAYER", "SAES",
    "TRANSCODERS", "AXES", "apply_update", "BatchTopK", "DICTIONARIES", "DictConfig",
    "CrossLayerTranscoder", "Crosscoder", "DictOutput", "Dictionary",
    "JumpReLU", "JumpReLUTranscoder", "LossOutput", "Matryoshka", "ReLU",
    "TopK", "TopKTranscoder", "compute_loss", "fold_for_inference", "fvu",
    "global_threshold",
    "init_params", "make_dictionary", "mse_loss", "normalize_decoder",
    "project_decoder_grads",
]
