"""One optimiser step with the dictionary's invariants around it."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import optax

from gemscope_jax import dictionaries

Params = Any


def apply_update(module: nn.Module, optimizer: optax.GradientTransformation,
                 params: Params, opt_state, grads: Params, *,
                 unit_decoder: bool | None = None) -> tuple[Params, Any]:
  """(params, opt_state) after one step of `optimizer`.

  Decoder-row gradients lose their component parallel to the row (for
  unit-decoder modules: with rows renormalised after the step, that
  component only fights the renormalisation), optax updates the
  parameters, and `dictionaries.constrain` restores the invariants (masked
  blocks zero, unit decoder rows, thresholds >= 0). `unit_decoder=False`
  leaves decoder rows free (no projection, no renormalisation: SAELens's
  way) for a module that would keep them unit; None follows the module.
  """
  unit = dictionaries.has_unit_decoder(module, unit_decoder)
  if unit:
    grads = dictionaries.project_decoder_grads(params, grads)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return dictionaries.constrain(module, params, unit_decoder=unit), opt_state
