"""Loaders (and writers) for foreign checkpoint formats, one module each."""

from gemscope_jax.convert._errors import CheckpointError
from gemscope_jax.convert.gguf import load_gguf
from gemscope_jax.convert.hf import config_from_hf, load_hf
from gemscope_jax.convert.hf_write import export_model, hf_config, save_hf
from gemscope_jax.convert.orbax import load_orbax, save_orbax

__all__ = ["CheckpointError", "config_from_hf", "export_model", "hf_config",
           "load_gguf", "load_hf", "load_orbax", "save_hf", "save_orbax"]
