"""Gemma 3 weights in foreign formats, one module each (GGUF,
transformers, official Orbax checkpoints), `hub` (transformers checkpoints by
Hugging Face Hub name), and `load_model`, which reads any of them (or the
embedded real 270M) by name or path."""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "CheckpointError": "gemscope_jax.convert._errors",
    "load_gguf": "gemscope_jax.convert.gguf",
    "config_from_hf": "gemscope_jax.convert.hf",
    "load_hf": "gemscope_jax.convert.hf",
    "export_model": "gemscope_jax.convert.hf_write",
    "hf_config": "gemscope_jax.convert.hf_write",
    "save_hf": "gemscope_jax.convert.hf_write",
    "download_model": "gemscope_jax.convert.hub",
    "parse_repo_id": "gemscope_jax.convert.hub",
    "load_orbax": "gemscope_jax.convert.orbax",
    "save_orbax": "gemscope_jax.convert.orbax",
    "load_model": "gemscope_jax.convert.pretrained",
}, submodules=("gguf", "hf", "hf_write", "hub", "orbax", "pretrained"))
