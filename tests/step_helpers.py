"""The trainer's parameter update (`training.step.train_update`) as a jitted
(params, opt_state, x, coeff) -> (params, opt_state, metrics) function, for
tests that drive a bare module without a `Run`."""

from __future__ import annotations

import jax

from gemscope_jax.training import step as step_lib


def jitted_update(module, optimizer, *, method: str, **kwargs):
  """`train_update` by `method` ('dense', 'sparse', 'autodiff'), jitted with
  params and opt_state donated; metrics: loss, mse, sparsity and aux."""
  def step(params, opt_state, x, sparsity_coeff):
    params, opt_state, lo, _, _ = step_lib.train_update(
        module, optimizer, params, opt_state, x, sparsity_coeff,
        method=method, **kwargs)
    return params, opt_state, {"loss": lo.total, "mse": lo.mse,
                               "sparsity": lo.sparsity, **lo.aux}
  return jax.jit(step, donate_argnums=(0, 1))
