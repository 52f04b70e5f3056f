"""Generation with a KV cache: prefill, a compiled decode loop, samplers.

`generate(params, prompts, config=...)` continues prompts token by token,
with the same edits and hookpoints as `models.forward` (steering, latent
clamps, recordings) over the prompt, the generated tokens, or both.
"""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "GREEDY": "gemscope_jax.generate.sampling",
    "Sampling": "gemscope_jax.generate.sampling",
    "sample": "gemscope_jax.generate.sampling",
    "Generation": "gemscope_jax.generate._api",
    "SCOPES": "gemscope_jax.generate._api",
    "cache_bucket": "gemscope_jax.generate._api",
    "generate": "gemscope_jax.generate._api",
    "left_pad": "gemscope_jax.generate._api",
    "prompt_bucket": "gemscope_jax.generate._api",
    "stop_ids_of": "gemscope_jax.generate._api",
}, submodules=("sampling",))
