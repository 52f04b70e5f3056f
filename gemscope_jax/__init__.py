"""gemscope_jax: sparse dictionaries on Gemma 3, in JAX/Flax.

Packages, lowest layer first (a package imports only from those before it):

  text          tokenizer, corpora, BOS-led windows, special tokens (no JAX)
  models        Gemma 3 in Flax: configs, modules, `forward` with hookpoints
  kernels       CPU custom calls (oneDNN matmul, fused JumpReLU backward)
  convert       Gemma weights in and out (GGUF, transformers, Orbax),
                `load_model`
  parallel      device mesh, logical-axis rules, Gemma layouts, multi-host
  dictionaries  sparse dictionaries as Flax modules, their invariants, and
                `Layout` (the hookpoints a dictionary reads and writes)
  surgery       dictionaries put into the forward pass (splices, ablations)
  data          activation harvest, shuffled streams, on-disk caches
  interop       dictionary folders in and out (Gemma Scope 2, SAELens)
  evals         held-out metrics of any dictionary, top-activating examples
  training      configs and plans, gradient steps, the sharded loop, export
  cli           the `gemscope` command

Every package's `__init__` is a lazy face: `import gemscope_jax` is cheap
and `gemscope_jax.models.forward` imports what it needs on first use.
"""

from gemscope_jax import _lazy

__version__ = "0.1.0"

__getattr__, __dir__, _ = _lazy.attach(__name__, {}, submodules=(
    "assets", "cli", "convert", "data", "dictionaries", "errors", "evals",
    "interop", "kernels", "models", "parallel", "safe_write", "surgery",
    "text", "torch_dictionary", "training"))
