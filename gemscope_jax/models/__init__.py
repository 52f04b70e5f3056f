"""Gemma 3 text decoder in Flax: configs, the module, and jitted entry points."""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "ContextEdit": "gemscope_jax.models._api",
    "EditContext": "gemscope_jax.models._api",
    "EditFn": "gemscope_jax.models._api",
    "Gemma3Output": "gemscope_jax.models._api",
    "ReadingEdit": "gemscope_jax.models._api",
    "abstract_params": "gemscope_jax.models._api",
    "count_params": "gemscope_jax.models._api",
    "forward": "gemscope_jax.models._api",
    "init_params": "gemscope_jax.models._api",
    "next_token_loss": "gemscope_jax.models._api",
    "KVCache": "gemscope_jax.models._cache",
    "cache_bytes": "gemscope_jax.models._cache",
    "init_cache": "gemscope_jax.models._cache",
    "layer_sizes": "gemscope_jax.models._cache",
    "default_positions": "gemscope_jax.models._api",
    "make_intervene": "gemscope_jax.models._api",
    "CONFIGS": "gemscope_jax.models._config",
    "AttentionKind": "gemscope_jax.models._config",
    "Gemma3Config": "gemscope_jax.models._config",
    "Gemma3_270M": "gemscope_jax.models._config",
    "Gemma3_1B": "gemscope_jax.models._config",
    "Gemma3_4B": "gemscope_jax.models._config",
    "Gemma3_12B": "gemscope_jax.models._config",
    "Gemma3_27B": "gemscope_jax.models._config",
    "get_config": "gemscope_jax.models._config",
    "Gemma3": "gemscope_jax.models._transformer",
    "SITES": "gemscope_jax.models.hooks",
    "Hookpoint": "gemscope_jax.models.hooks",
}, submodules=("hooks",))
