"""How Gemma 3's parameters are laid out over the ('data', 'model') mesh.

`config.mesh.gemma` picks one of three layouts:

- 'replicated': every device holds every parameter (the default; right for
  270M and 1B, whose bf16 weights are at most about 2 GB).
- 'fsdp': every weight matrix is split over the 'data' axis along its
  d_model axis (the embedding table along its vocabulary axis); XLA gathers
  each layer's weights just before that layer runs and frees them after, so a
  device holds 1/data of the weights plus one layer's worth in flight.
- 'fsdp_tp': 'fsdp' plus Megatron-style tensor parallelism over 'model':
  query/key/value heads, the output projection's heads and the MLP hidden
  axis are split over 'model' (the embedding table's d_model axis too).

The rules go by parameter name (the official checkpoint's names, see
`gemscope_jax.models`), one `PartitionSpec` per weight, written with the
same axis letters as the model's einsums:

  parameter                  shape         'fsdp'           'fsdp_tp'
  embedder/input_embedding   (V, D)        (data, -)        (data, model)
  attn/q_einsum/w            (N, D, H)     (-, data, -)     (model, data, -)
  attn/kv_einsum/w           (2, K, D, H)  (-, -, data, -)  (-, model, data, -)
  attn/attn_vec_einsum/w     (N, H, D)     (-, -, data)     (model, -, data)
  mlp/gating_einsum          (2, F, D)     (-, -, data)     (-, model, data)
  mlp/linear                 (F, D)        (-, data)        (model, data)
  every */scale (norms)      replicated

An axis is split only when its size is a multiple of the mesh axis's size;
otherwise that axis stays whole (replicated over that mesh axis) and the
rest of the rule still applies. For example Gemma 3 270M and 1B have one
key/value head, so with mesh.model = 2 their kv_einsum is split over 'data'
only; `describe` lists every such fallback.

With several processes (multi-host) and live activations, Gemma runs once
over the global mesh for every process's windows (`data.lockstep`), so the
weights are laid out over the run's whole mesh, across hosts
(`training.sources.load_gemma`). Only when process 0 writes an activation cache
alone are they laid out over its own devices (`gemma_mesh`): a
(local_devices / model, model) mesh.

The key/value cache of generation (`models.KVCache`, one (B, S, K, H)
buffer per layer) follows the same layout (`cache_shardings`): under
'fsdp' and 'fsdp_tp' its batch axis B is split over 'data' when B is a
multiple of it, else its slot axis S (so one long prompt of a big model
still spreads its cache), and under 'fsdp_tp' the key/value heads K over
'model', matching kv_einsum's head split; `length` and `start` are
replicated, and 'replicated' keeps the whole cache on every device like the
weights. Each buffer falls back on its own (a local layer's ring may divide
where a global layer's cache does not); `describe_cache` lists the
fallbacks.

Caveat: the sharding saves memory, not time. Each layer's weights are
all-gathered over 'data' at every forward pass, which costs interconnect
bandwidth on a pod and a copy on simulated CPU devices; with 'fsdp_tp', the
model code's reshape of the stacked (gate, up) weights to (1, 2F, D) makes
XLA re-lay the MLP's gate/up shards once per layer. Use 'replicated'
whenever the weights fit (docs/memory_plan.md says when they do).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gemscope_jax import models

# The values `config.mesh.gemma` may take.
LAYOUTS = ("replicated", "fsdp", "fsdp_tp")

# Per-parameter rules: (path suffix, fsdp spec, fsdp_tp spec). A spec entry is
# a mesh axis name or None; the first suffix that matches wins.
_RULES: tuple[tuple[str, tuple, tuple], ...] = (
    ("embedder/input_embedding", ("data", None), ("data", "model")),
    ("attn/q_einsum/w", (None, "data", None), ("model", "data", None)),
    ("attn/kv_einsum/w", (None, None, "data", None),
     (None, "model", "data", None)),
    ("attn/attn_vec_einsum/w", (None, None, "data"), ("model", None, "data")),
    ("mlp/gating_einsum", (None, None, "data"), (None, "model", "data")),
    ("mlp/linear", (None, "data"), ("model", "data")),
)


def check_layout(mode: str) -> str:
  """Returns `mode` if it is a known layout, else raises naming the field.

  Raises:
    ValueError: "config.mesh.gemma: must be one of ..., got ...".
  """
  if mode not in LAYOUTS:
    raise ValueError(f"config.mesh.gemma: must be one of {LAYOUTS}, "
                     f"got {mode!r}")
  return mode


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def param_spec(name: str, shape: tuple[int, ...], mesh_shape: Mapping[str, int],
               mode: str) -> tuple[PartitionSpec, list[str]]:
  """The PartitionSpec of one parameter, and the fallbacks taken.

  Args:
    name: "/"-joined path, e.g. "layer_3/attn/q_einsum/w".
    shape: the parameter's shape.
    mesh_shape: {axis name: size} of the mesh.
    mode: one of LAYOUTS.

  Returns:
    (spec, notes): notes say which axes stayed whole because their size is
    not a multiple of the mesh axis's size.
  """
  check_layout(mode)
  if mode == "replicated":
    return PartitionSpec(), []
  for suffix, fsdp, fsdp_tp in _RULES:
    if name.endswith(suffix):
      rule = fsdp if mode == "fsdp" else fsdp_tp
      break
  else:
    return PartitionSpec(), []  # norms and anything unknown: replicated
  if len(rule) != len(shape):
    raise ValueError(f"{name}: shape {shape} does not match the sharding "
                     f"rule {rule}")
  spec, notes = [], []
  for size, axis in zip(shape, rule):
    n = 1 if axis is None else mesh_shape.get(axis, 1)
    if axis is not None and size % n:
      notes.append(f"{name}: axis of size {size} not split over {axis!r} "
                   f"({n} devices)")
      axis = None
    spec.append(axis if n > 1 else None)
  return PartitionSpec(*spec), notes


def gemma_mesh(mesh: Mesh) -> Mesh:
  """The mesh Gemma's weights live on: `mesh` itself in one process; with
  several, this process's devices as a (local / model, model) mesh."""
  if jax.process_count() == 1:
    return mesh
  local = [d for d in mesh.devices.flat
           if d.process_index == jax.process_index()]
  model = mesh.shape["model"]
  return Mesh(np.asarray(local).reshape(len(local) // model, model),
              ("data", "model"))


def gemma_param_specs(model_config: models.Gemma3Config,
                      mesh_shape: Mapping[str, int], mode: str,
                      params: Any = None) -> Any:
  """PartitionSpecs matching `models.abstract_params(model_config)` (or the
  tree `params`, e.g. one with fewer layers)."""
  tree = models.abstract_params(model_config) if params is None else params
  return jax.tree_util.tree_map_with_path(
      lambda p, x: param_spec(_path_name(p), tuple(x.shape), mesh_shape,
                              mode)[0], tree)


def gemma_param_shardings(model_config: models.Gemma3Config, mesh: Mesh,
                          mode: str, params: Any = None) -> Any:
  """A pytree of NamedSharding matching `models.abstract_params`.

  Args:
    model_config: the Gemma size.
    mesh: a mesh with axes 'data' and 'model' (use `gemma_mesh(run.mesh)`
      with several processes).
    mode: 'replicated', 'fsdp' or 'fsdp_tp' (config.mesh.gemma).
    params: the tree to match, if not the full model's abstract params.

  Returns:
    The shardings, one per parameter (see the module docstring's rules).

  Raises:
    ValueError: an unknown `mode`, naming config.mesh.gemma.
  """
  specs = gemma_param_specs(model_config, dict(mesh.shape), mode, params)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def describe(model_config: models.Gemma3Config,
             mesh_shape: Mapping[str, int], mode: str) -> list[str]:
  """Every fallback the rules take for this size and mesh (human-readable)."""
  notes = []
  for path, x in jax.tree_util.tree_flatten_with_path(
      models.abstract_params(model_config))[0]:
    notes += param_spec(_path_name(path), tuple(x.shape), mesh_shape,
                        mode)[1]
  return notes


def shard_gemma_params(params: Any, model_config: models.Gemma3Config,
                       mesh: Mesh, mode: str) -> Any:
  """`params` placed on `mesh` with `gemma_param_shardings` (device_put).

  Arrays already on devices are resharded by XLA; numpy arrays go straight
  from the host to their shards.
  """
  shardings = gemma_param_shardings(model_config, mesh, mode, params)
  return jax.device_put(params, shardings)


def sharded_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of `abstract` (ShapeDtypeStructs) laid out with
  `shardings`: exact, from the shard shapes (the largest shard per array)."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(
      shardings, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))):
    total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(
        x.dtype).itemsize
  return total


def cache_specs(model_config: models.Gemma3Config,
                mesh_shape: Mapping[str, int], mode: str, batch_size: int,
                cache_length: int) -> tuple[models.KVCache, list[str]]:
  """PartitionSpecs of a `models.init_cache(config, B, cache_length)`.

  Args:
    model_config: the Gemma size.
    mesh_shape: {axis name: size} of the mesh.
    mode: one of LAYOUTS (config.mesh.gemma).
    batch_size: B, the cache's rows.
    cache_length: the global layers' slots (see `models.layer_sizes`).

  Returns:
    (a `KVCache` whose leaves are PartitionSpecs, notes): each (B, S, K, H)
    buffer gets (data, -, model, -) with its fallbacks (see the module
    docstring); the notes name every axis left whole that the rule wanted
    split.
  """
  check_layout(mode)
  data, model = mesh_shape.get("data", 1), mesh_shape.get("model", 1)
  k = model_config.num_kv_heads
  notes: list[str] = []

  def spec(i: int, size: int) -> PartitionSpec:
    if mode == "replicated":
      return PartitionSpec()
    b_axis = s_axis = k_axis = None
    if data > 1:
      if batch_size % data == 0:
        b_axis = "data"
      elif size % data == 0:
        s_axis = "data"
      else:
        notes.append(f"cache layer_{i}: neither batch {batch_size} nor "
                     f"{size} slots split over 'data' ({data} devices)")
    if mode == "fsdp_tp" and model > 1:
      if k % model == 0:
        k_axis = "model"
      else:
        notes.append(f"cache layer_{i}: {k} key/value heads not split over "
                     f"'model' ({model} devices)")
    axes = [b_axis, s_axis, k_axis]
    while axes and axes[-1] is None:  # P('data'), not P('data', None, None)
      axes.pop()
    return PartitionSpec(*axes)

  specs = tuple(spec(i, s) for i, s in enumerate(
      models.layer_sizes(model_config, cache_length)))
  tree = models.KVCache(keys=specs, values=specs, length=PartitionSpec(),
                        start=PartitionSpec())
  return tree, notes


def cache_shardings(model_config: models.Gemma3Config, mesh: Mesh, mode: str,
                    batch_size: int, cache_length: int) -> models.KVCache:
  """A `KVCache` of NamedShardings for `batch_size` rows of `cache_length`
  slots on `mesh`, laid out like the weights of layout `mode`.

  Pass it to `generate.generate(..., cache_sharding=...)` (as a function of
  (batch, cache length)) or give it to ShapeDtypeStructs to plan memory.
  """
  specs = cache_specs(model_config, dict(mesh.shape), mode, batch_size,
                      cache_length)[0]
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def describe_cache(model_config: models.Gemma3Config,
                   mesh_shape: Mapping[str, int], mode: str, batch_size: int,
                   cache_length: int) -> list[str]:
  """Every fallback `cache_specs` takes (human-readable, one per layer)."""
  return cache_specs(model_config, mesh_shape, mode, batch_size,
                     cache_length)[1]


def abstract_cache(model_config: models.Gemma3Config, shardings: Any,
                   batch_size: int, cache_length: int,
                   dtype=jnp.bfloat16) -> models.KVCache:
  """ShapeDtypeStructs of a cache carrying `shardings` (nothing allocated)."""
  shapes = jax.eval_shape(lambda: models.init_cache(
      model_config, batch_size, cache_length, dtype))
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      shapes, shardings)
