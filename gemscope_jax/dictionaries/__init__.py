"""Sparse dictionaries as Flax linen modules sharing one interface.

`encode(x) -> latents`, `decode(latents) -> recon`, `__call__(x) ->
DictOutput`, `loss(x, out, *, sparsity_coeff, target=None) -> LossOutput`,
called through `module.apply({'params': params}, ..., method=...)`.
Parameters follow the Gemma Scope 2 names and carry logical axis names.
Transcoders (`JumpReLUTranscoder`, `TopKTranscoder`), `Crosscoder` and
`CrossLayerTranscoder` share the interface; the multi-layer ones read and
write (..., n_layers, d).
"""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "AXES": "gemscope_jax.dictionaries._base",
    "DictOutput": "gemscope_jax.dictionaries._base",
    "Dictionary": "gemscope_jax.dictionaries._base",
    "LossOutput": "gemscope_jax.dictionaries._base",
    "compute_loss": "gemscope_jax.dictionaries._base",
    "constrain": "gemscope_jax.dictionaries._base",
    "fold_for_inference": "gemscope_jax.dictionaries._base",
    "fvu": "gemscope_jax.dictionaries._base",
    "has_unit_decoder": "gemscope_jax.dictionaries._base",
    "init_params": "gemscope_jax.dictionaries._base",
    "leaf_value": "gemscope_jax.dictionaries._base",
    "mse_loss": "gemscope_jax.dictionaries._base",
    "normalize_decoder": "gemscope_jax.dictionaries._base",
    "project_decoder_grads": "gemscope_jax.dictionaries._base",
    "unwrapped": "gemscope_jax.dictionaries._base",
    "ARCHITECTURES": "gemscope_jax.dictionaries._config",
    "CLTS": "gemscope_jax.dictionaries._config",
    "CROSSCODERS": "gemscope_jax.dictionaries._config",
    "MULTILAYER": "gemscope_jax.dictionaries._config",
    "SAES": "gemscope_jax.dictionaries._config",
    "TRANSCODERS": "gemscope_jax.dictionaries._config",
    "DictConfig": "gemscope_jax.dictionaries._config",
    "CrossLayerTranscoder": "gemscope_jax.dictionaries.clt",
    "Crosscoder": "gemscope_jax.dictionaries.crosscoder",
    "JumpReLU": "gemscope_jax.dictionaries.jumprelu",
    "JumpReLUTranscoder": "gemscope_jax.dictionaries.jumprelu",
    "Matryoshka": "gemscope_jax.dictionaries.matryoshka",
    "ReLU": "gemscope_jax.dictionaries.relu_l1",
    "BatchTopK": "gemscope_jax.dictionaries.topk",
    "TopK": "gemscope_jax.dictionaries.topk",
    "TopKTranscoder": "gemscope_jax.dictionaries.topk",
    "global_threshold": "gemscope_jax.dictionaries.topk",
    "DICTIONARIES": "gemscope_jax.dictionaries.registry",
    "make_dictionary": "gemscope_jax.dictionaries.registry",
    "Layout": "gemscope_jax.dictionaries.layout",
    "KINDS": "gemscope_jax.dictionaries.layout",
    "kind_of": "gemscope_jax.dictionaries.layout",
    "make_layout": "gemscope_jax.dictionaries.layout",
    "parse_layers": "gemscope_jax.dictionaries.layout",
    "parse_sites": "gemscope_jax.dictionaries.layout",
}, submodules=("clt", "crosscoder", "jumprelu", "layout", "matryoshka",
                "registry", "relu_l1", "topk"))
