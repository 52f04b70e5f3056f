"""Released dictionaries in foreign formats: Gemma Scope 2 and SAELens.

Every reader returns, and every writer takes, one `InferenceDictionary`
(raw-unit arrays and the encode/decode they define), or a
`MultiLayerInference` for crosscoders and CLTs; `as_module` turns an
`InferenceDictionary` into one of our Flax modules, which the evaluation
code (`evals`) splices into Gemma. A training run's export lives with the
training code (`training.export`).

Caveat: writers refuse non-finite weights and write atomically (a folder
built beside the destination, then renamed), but they replace an existing
destination folder whole.
"""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "FormatError": "gemscope_jax.interop._inference",
    "InferenceDictionary": "gemscope_jax.interop._inference",
    "as_module": "gemscope_jax.interop._inference",
    "folder_name": "gemscope_jax.interop.gemmascope2",
    "load_gemmascope2": "gemscope_jax.interop.gemmascope2",
    "save_gemmascope2": "gemscope_jax.interop.gemmascope2",
    "FORMATS": "gemscope_jax.interop.load",
    "detect_format": "gemscope_jax.interop.load",
    "load_dictionary": "gemscope_jax.interop.load",
    "locate": "gemscope_jax.interop.load",
    "MultiLayerInference": "gemscope_jax.interop.multilayer",
    "load_multilayer_gemmascope2": "gemscope_jax.interop.multilayer",
    "save_multilayer_gemmascope2": "gemscope_jax.interop.multilayer",
    "load_saelens": "gemscope_jax.interop.saelens",
    "save_saelens": "gemscope_jax.interop.saelens",
}, submodules=("gemmascope2", "load", "multilayer", "releases", "saelens"))
