"""The gradient of one batch, by one of three methods (config `train.step`):

  dense     hand-derived gradients of JumpReLU and TopK SAEs and
            transcoders (`grads.dense`; on the CPU a fused C++ pass);
            other dictionaries fall back to autodiff
  sparse    the sparsity-aware step (`grads.sparse`): only the active
            (token, latent) pairs enter the decoder and its backward
            (JumpReLU and TopK SAEs, transcoders and cross-layer
            transcoders)
  autodiff  `jax.value_and_grad` of `dictionaries.compute_loss`: the
            reference the other two are tested against

`loss_and_grads` is the one dispatcher the trainer's step calls.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemscope_jax import dictionaries
from gemscope_jax.training.grads import dense as dense_lib
from gemscope_jax.training.grads import sparse as sparse_lib

METHODS = ("dense", "sparse", "autodiff")


def loss_and_grads(module, params: Any, x: jax.Array, *, method: str,
                   sparsity_coeff, target: jax.Array | None = None,
                   sparse_capacity: int = 256, use_kernel: bool = True
                   ) -> tuple[dictionaries.LossOutput, jax.Array, Any]:
  """(LossOutput, fired-in-this-batch mask of the latent shape, grads).

  Args:
    module: the dictionary module.
    params: its parameters.
    x: (batch, ...) inputs in training units.
    method: 'dense', 'sparse' or 'autodiff' (`METHODS`).
    sparsity_coeff: the penalty's coefficient at this step.
    target: what a transcoder predicts (None: x).
    sparse_capacity: active entries per token the sparse step holds.
    use_kernel: the dense step's fused CPU kernel (one device only: the
      custom calls have no sharding rule).
  """
  if method not in METHODS:
    raise ValueError(f"gradient method must be one of {METHODS}, got "
                     f"{method!r}")
  if method == "sparse":
    lo, out, grads = sparse_lib.sparse_loss_and_grads(
        module, params, x, sparsity_coeff=sparsity_coeff, target=target,
        capacity=sparse_capacity * x.shape[0])
    return lo, out.fired, grads

  if method == "dense" and dense_lib.supported(module):
    lo, _, grads, fired = dense_lib.loss_and_grads(
        module, params, x, sparsity_coeff=sparsity_coeff, target=target,
        use_kernel=use_kernel)
    return lo, fired > 0, grads

  def loss_fn(p):
    lo, out = dictionaries.compute_loss(module, p, x,
                                        sparsity_coeff=sparsity_coeff,
                                        target=target)
    return lo.total, (lo, out)

  (_, (lo, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return lo, jnp.any(out.latents > 0, axis=0), grads
