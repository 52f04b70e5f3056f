"""Architecture names -> module classes, and `make_dictionary`.

A plain dict: the names are what configs and exported folders carry.
"""

from __future__ import annotations

from gemscope_jax.dictionaries._base import Dictionary
from gemscope_jax.dictionaries._config import DictConfig
from gemscope_jax.dictionaries.clt import CrossLayerTranscoder
from gemscope_jax.dictionaries.crosscoder import Crosscoder
from gemscope_jax.dictionaries.jumprelu import JumpReLU, JumpReLUTranscoder
from gemscope_jax.dictionaries.matryoshka import Matryoshka
from gemscope_jax.dictionaries.relu_l1 import ReLU
from gemscope_jax.dictionaries.topk import BatchTopK, TopK, TopKTranscoder

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
