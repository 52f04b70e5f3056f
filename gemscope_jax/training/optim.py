"""The optimiser and the schedules a step follows: Adam (beta1 = 0 by
default, as published) with a linear warm-up and a linear decay to 0, the
sparsity coefficient's linear warm-up, and the L0 target's optional linear
decay from a multiple of its goal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gemscope_jax import dictionaries
from gemscope_jax.training.plans import OptimizerPlan, StepPlan


def lr_schedule(p: OptimizerPlan) -> optax.Schedule:
  """Linear warm-up, constant, then a linear decay to 0 at the end."""
  total = p.num_steps
  warmup = min(p.lr_warmup_steps, total)
  decay = int(round(p.lr_decay_fraction * total))
  flat = max(total - warmup - decay, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0 if warmup else p.lr, p.lr, max(warmup, 1)),
       optax.constant_schedule(p.lr),
       optax.linear_schedule(p.lr, 0.0, max(decay, 1))],
      [warmup, warmup + flat])


def make_optimizer(p: OptimizerPlan) -> optax.GradientTransformation:
  """Adam with `lr_schedule`, after optional global-norm clipping."""
  parts = []
  if p.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(p.grad_clip_norm))
  return optax.chain(
      *parts,
      optax.scale_by_adam(b1=p.beta1, b2=p.beta2),
      optax.scale_by_learning_rate(lr_schedule(p)))


def sparsity_coeff(p: StepPlan, step: jax.Array) -> jax.Array:
  """The sparsity coefficient at `step`: a linear ramp to its value."""
  ramp = jnp.minimum(1.0, (step + 1) / max(p.sparsity_warmup_steps, 1))
  return p.sparsity_coeff * ramp


def l0_target_scale(p: StepPlan, step: jax.Array) -> jax.Array:
  """What the L0 target is multiplied by at `step` (steps taken before it).

  `l0_target_start` at step 0, falling linearly to 1 at
  `l0_target_decay_steps` and 1 after it (Gemma Scope 2's "L0 target that
  decays", form unpublished: linear, as the other warm-ups here); 1
  throughout with the decay off.
  """
  if not p.l0_target_decay_steps:
    return jnp.ones((), jnp.float32)
  done = jnp.minimum(1.0, step / p.l0_target_decay_steps)
  return p.l0_target_start + (1.0 - p.l0_target_start) * done


def freq_scale(p: StepPlan, step: jax.Array) -> jax.Array:
  """What the high-frequency term's coefficient is multiplied by at `step`
  (steps taken before it): 0 before `freq_start_step`, then a linear ramp
  to 1 over `sparsity_warmup_steps` (on top of the sparsity coefficient,
  whose own warm-up is over by then when the start is after it)."""
  ramp = (step + 1 - p.freq_start_step) / max(p.sparsity_warmup_steps, 1)
  return jnp.clip(ramp, 0.0, 1.0).astype(jnp.float32)


def _with_inner(module, **changes):
  """`module` with those attributes of its unwrapped dictionary (a
  Matryoshka wrapper's inner one, else `module`) replaced."""
  inner = dictionaries.unwrapped(module)
  scaled = inner.clone(**changes)
  return module.clone(dictionary=scaled) if inner is not module else scaled


def with_freq_scaled(module, scale: jax.Array):
  """`module` with its `freq_coeff` times `scale` (a traced value), as
  `with_l0_targets_scaled` does for the L0 target."""
  inner = dictionaries.unwrapped(module)
  return _with_inner(module, freq_coeff=inner.freq_coeff * scale)


def with_l0_targets_scaled(module, scale: jax.Array):
  """`module` with its L0 target (and a CLT's per-layer `l0_targets`) times
  `scale`, a traced value: the penalty's L0* at this step.

  The targets are module attributes, read by `penalty_terms` and by the
  dense and sparse steps alike, so a clone carrying the step's values
  reaches all three gradient methods without another argument through
  them. A Matryoshka wrapper gets a clone of its inner dictionary.
  """
  inner = dictionaries.unwrapped(module)
  if getattr(inner, "target_l0", None) is None:
    return module
  changes = {"target_l0": inner.target_l0 * scale}
  if getattr(inner, "l0_targets", None) is not None:
    changes["l0_targets"] = tuple(t * scale for t in inner.l0_targets)
  return _with_inner(module, **changes)
