"""Custom CPU kernels (XLA FFI) used by the model on the CPU backend only.

Each kernel falls back to plain XLA ops on other platforms, and on the CPU
when it cannot be built (see `matmul.available()`,
`matmul.few_rows_available()`, `greedy_head.available()`,
`decode_attention.available()`,
`jumprelu.available()`), so importing this package never requires a
compiler. `matmul` runs the model's products (oneDNN, or for one row
`few_rows.cc`); `greedy_head` takes decoding's greedy token through an
exact int8 screen of the unembedding; `decode_attention` writes a decoded
token into a layer's KV cache and attends over it in one call;
`jumprelu_grad` fuses the JumpReLU
backward pass. `available()` and `unavailable_reason()` here are the matmul
kernel's.

This face imports its modules eagerly (they are small and `models` needs
them at once): the functions `matmul` and `jumprelu_grad` must shadow the
submodules of the same name, which a lazy face cannot guarantee once a
submodule is imported directly.
"""

from __future__ import annotations

from gemscope_jax.kernels import decode_attention
from gemscope_jax.kernels.jumprelu import jumprelu_grad
from gemscope_jax.kernels.matmul import available
from gemscope_jax.kernels.matmul import impl_name
from gemscope_jax.kernels.matmul import matmul
from gemscope_jax.kernels.matmul import unavailable_reason

__all__ = ["available", "decode_attention", "impl_name", "jumprelu_grad",
           "matmul", "unavailable_reason"]
