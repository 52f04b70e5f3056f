"""The ('data', 'model') device mesh and the logical-axis rules over it.

Dictionaries name their axes logically ('latent', 'embed'; 'batch' for the
activation rows); `MeshPlan.rules` maps those names onto mesh axes, so the
same module trains on one CPU, a GPU host or a TPU pod slice.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class MeshPlan:
  """The mesh a run asks for (config fields `mesh.*`).

  Attributes:
    data: devices on the 'data' axis (activation rows); -1: all that
      remain after `model`.
    model: devices on the 'model' axis (the dictionary's latents).
    rules: logical-axis rules, ((logical name, mesh axis or None), ...).
    gemma: Gemma's parameter layout: 'replicated', 'fsdp' or 'fsdp_tp'
      (`parallel.gemma_layout`).
  """
  data: int = -1
  model: int = 1
  rules: tuple[tuple[str, str | None], ...] = (
      ("batch", "data"), ("latent", "model"), ("embed", None))
  gemma: str = "replicated"

  @property
  def batch_axis(self) -> str | None:
    """The mesh axis activation rows are split over."""
    return dict(self.rules).get("batch")


def make_mesh(plan: MeshPlan, devices: list | None = None, *,
              batch_size: int | None = None) -> Mesh:
  """The ('data', 'model') mesh `plan` asks for over `devices`.

  With several processes the devices are ordered by process, so each
  process's devices hold a contiguous block of the batch's rows, and a
  'model' group must not span processes (each process feeds whole rows).
  `batch_size`, when given, must split evenly over the 'data' axis.
  Errors name the config field.
  """
  procs = jax.process_count()
  if devices is None:
    devices = jax.devices()
    if procs > 1:
      devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  n = len(devices)
  model = plan.model
  data = n // model if plan.data == -1 else plan.data
  where = (f"the {n} device(s) of {procs} processes "
           f"({jax.local_device_count()} per process)" if procs > 1 else
           f"the {n} available device(s)")
  if data * model != n:
    raise ValueError(f"config.mesh: data={plan.data} x model={model} does "
                     f"not cover {where}")
  if procs > 1 and jax.local_device_count() % model:
    raise ValueError(f"config.mesh.model: {model} does not divide the "
                     f"{jax.local_device_count()} devices of each process "
                     f"({procs} processes); a model group must sit in one "
                     "process")
  if batch_size is not None and batch_size % data:
    raise ValueError(f"config.train.batch_size: {batch_size} is not "
                     f"divisible by the mesh's data axis ({data})")
  return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))
