"""gemscope_jax: sparse dictionaries on Gemma 3, in JAX/Flax."""

__version__ = "0.1.0"
