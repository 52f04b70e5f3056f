"""The optimiser and the schedules a step follows: Adam (beta1 = 0 by
default, as published) with a linear warm-up and a linear decay to 0, and
the sparsity coefficient's linear warm-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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
