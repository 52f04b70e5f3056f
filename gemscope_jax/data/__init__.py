"""Activations: harvested from Gemma at hookpoints, tokenised text as grain
datasets, shuffled buckets and batches with a restorable position, on-disk
activation caches, and multi-host lockstep harvests.
"""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "dump_activations": "gemscope_jax.data.harvest",
    "ActivationBatches": "gemscope_jax.data.stream",
    "HarvestSource": "gemscope_jax.data.stream",
    "ShardedBatches": "gemscope_jax.data.stream",
    "ActivationCache": "gemscope_jax.data.activation_cache",
    "write_cache": "gemscope_jax.data.activation_cache",
}, submodules=("activation_cache", "harvest", "lockstep", "pipeline",
                "stream"))
