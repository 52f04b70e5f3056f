"""Devices: the ('data', 'model') mesh and its logical-axis rules, Gemma's
parameter layouts over it (replicated, fsdp, fsdp_tp), and the multi-host
runtime (start-up, data shards, global batches)."""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "MeshPlan": "gemscope_jax.parallel.mesh",
    "make_mesh": "gemscope_jax.parallel.mesh",
}, submodules=("distributed", "gemma_layout", "mesh"))
