r"""Device memory of each Gemma 3 size's harvest, train and decode steps.

No TPU needed: everything is compiled for simulated CPU devices.

  python scripts/memory_plan.py                 # all sizes -> docs/memory_plan.md
  python scripts/memory_plan.py --quick --json=plan.json --out=-   # 270M, 1B

For each Gemma 3 size and a representative JumpReLU SAE at the preset's
middle layer, on several ('data', 'model') meshes of simulated CPU devices
(`--xla_force_host_platform_device_count`, set here before jax is imported),
the script builds everything abstractly (`jax.eval_shape`, ShapeDtypeStructs
carrying NamedShardings; no weights exist), lowers and compiles

- the harvest step: bf16 Gemma (`models.forward`, weights laid out by
  `parallel/gemma_layout.py` as config.mesh.gemma says) run to the
  hookpoint's layer on a batch of windows of 1024 tokens split over 'data';
- the dictionary train step: `training.step.Run(plans.make(c), ...).step`
  (the trainer's own jitted step) of the config `config_lib.preset(size)`
  with the width and mesh set, with its own shardings and donated state;
- generation (a second table): the decode step (`generate._loop.decode_step`,
  one token per row through bf16 Gemma with a bf16 KV cache) with the
  weights and the cache laid out over the mesh
  (`gemma_layout.cache_shardings`), the cache donated as `decode` carries it;
  `generate._loop.decode`'s whole loop; beside them the cache's bytes by
  formula (`models.cache_bytes`) per batch and context, against a cache
  without the local layers' ring buffers;

and reads `compiled.memory_analysis()`: bytes per device = arguments +
outputs + temporaries - aliased (donated) bytes. Parameter and optimizer
bytes are also computed exactly from the shard shapes. The peak a device
holds is the larger of (harvest step + the resident train state) and
(train step + the resident Gemma weights): both live on the device for the
whole run. A slice fits when peak x (1 + margin) <= HBM per chip.

Caveat: the compiler is XLA's CPU backend, whose temporaries and fusion
differ from TPU's and GPU's (TPU pads small minor dimensions to 128 lanes;
GPU adds cuBLAS/cuDNN workspace). Weights, optimizer state and batches are
exact; temporaries are estimates, which is what the margin (default 25%)
is for. XLA's CPU backend runs with its concurrency-optimized scheduler
off (`--xla_cpu_enable_concurrency_optimized_scheduler=false`): that
scheduler, the CPU default, starts every independent op at once, so it
gathers or re-lays every layer's weights at the program's start and keeps
them all alive (a 4B 'fsdp' harvest on 4 x 1 counted 10.3 GB, 2.6 GB
without it); TPU and GPU schedule with memory in mind. The harvest pass is
compiled at full depth by default (27B to layer 31 takes seconds);
`--max-compiled-layers` compiles fewer blocks and puts the full model's
exact weight bytes back, which may underestimate the temporaries.
`--sections=generation` compiles only the decode steps (27B: about a
minute per mesh).
"""

from __future__ import annotations

import os
import sys

_DEVICES = 64
if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count="
                             f"{_DEVICES}"
                             " --xla_cpu_enable_concurrency_optimized_"
                             "scheduler=false")
  os.environ["JAX_PLATFORMS"] = "cpu"
  # Plain XLA matmuls, as on TPU/GPU (the oneDNN call has no SPMD rule).
  os.environ["GEMSCOPE_CPU_KERNELS"] = "0"

# pylint: disable=wrong-import-position
import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemscope_jax import models  # noqa: E402
from gemscope_jax.generate import _loop  # noqa: E402
from gemscope_jax.generate.sampling import GREEDY  # noqa: E402
from gemscope_jax.parallel import gemma_layout  # noqa: E402
from gemscope_jax.training import config as config_lib  # noqa: E402
from gemscope_jax.training import plans  # noqa: E402
from gemscope_jax.training.step import Run  # noqa: E402

GB = 1e9
SEQ_LEN = 1024           # tokens per window, as published
TRAIN_BATCH = 4096       # activations per train step, as published
# (HBM per chip in GB, name) of the slices considered.
HARDWARE = (("TPU v5e", 16.0), ("TPU v5p", 95.0), ("GPU 80 GB (H100)", 80.0))

# Per size: dictionary width and the meshes (data, model, Gemma layout) to
# compile, smallest first.
PLANS = {
    "gemma3_270m": (65_536, [(1, 1, "replicated"), (4, 1, "replicated"),
                             (4, 1, "fsdp")]),
    "gemma3_1b": (65_536, [(1, 1, "replicated"), (4, 1, "fsdp"),
                           (8, 1, "fsdp")]),
    "gemma3_4b": (262_144, [(1, 1, "replicated"), (4, 1, "fsdp"),
                            (4, 2, "fsdp_tp"), (8, 2, "fsdp_tp"),
                            (2, 4, "fsdp_tp"), (4, 4, "fsdp_tp")]),
    "gemma3_12b": (262_144, [(1, 4, "fsdp_tp"), (2, 4, "fsdp_tp"),
                             (4, 4, "fsdp_tp"), (8, 4, "fsdp_tp")]),
    "gemma3_27b": (262_144, [(1, 8, "fsdp_tp"), (2, 8, "fsdp_tp"),
                             (4, 8, "fsdp_tp"), (8, 8, "fsdp_tp")]),
}
QUICK = ("gemma3_270m", "gemma3_1b")

# Generation: (batch, context) pairs of the cache-by-formula table, and per
# size the decode steps to compile: (data, model, Gemma layout, batch,
# context). The first row of each size uses the preset's layout.
GEN_SHAPES = ((1, 8192), (8, 8192), (1, 32768), (8, 32768))
GEN_NEW_TOKENS = 256     # token slots of the compiled decode loop
GEN_PLANS = {
    "gemma3_270m": [(1, 1, "replicated", 8, 8192)],
    "gemma3_1b": [(4, 1, "fsdp", 8, 8192)],
    "gemma3_4b": [(4, 1, "fsdp", 8, 8192), (4, 2, "fsdp_tp", 8, 32768)],
    "gemma3_12b": [(1, 4, "fsdp_tp", 8, 8192), (2, 4, "fsdp_tp", 8, 32768)],
    "gemma3_27b": [(1, 8, "fsdp_tp", 8, 8192), (2, 4, "fsdp_tp", 8, 32768),
                   (8, 1, "fsdp", 1, 32768)],
}


@dataclasses.dataclass
class Row:
  """One (size, mesh, layout): bytes per device."""
  size: str
  width: int
  layer: int
  data: int
  model: int
  layout: str
  gemma_param_bytes: int      # exact: this device's shard of the weights
  train_state_bytes: int      # exact: params + Adam state + counters
  harvest_bytes: int          # compiled harvest step (args+out+temp-alias)
  harvest_temp_bytes: int
  train_bytes: int            # compiled train step
  train_temp_bytes: int
  compiled_layers: int        # blocks in the compiled harvest pass
  seconds: float

  @property
  def peak_bytes(self) -> int:
    return max(self.harvest_bytes + self.train_state_bytes,
               self.train_bytes + self.gemma_param_bytes)


def _bytes(compiled) -> tuple[int, int]:
  """(args + outputs + temporaries - aliased, temporaries) of one device."""
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes +
           m.temp_size_in_bytes - m.alias_size_in_bytes)
  return int(total), int(m.temp_size_in_bytes)


def _config(size: str, width: int, data: int, model: int, layout: str):
  c = config_lib.preset(size)
  c.model.checkpoint = "random"
  c.dictionary.width = width
  c.train.batch_size = TRAIN_BATCH
  c.mesh.data, c.mesh.model, c.mesh.gemma = data, model, layout
  return c


def harvest_bytes(mc: models.Gemma3Config, layer: int, mesh: Mesh,
                  layout: str, windows: int, max_layers: int
                  ) -> tuple[int, int, int]:
  """(total, temp, compiled blocks) of one sharded harvest pass."""
  full = layer + 1
  compiled_cfg, hook = mc, layer
  if full > max_layers:
    compiled_cfg, hook = mc.replace(num_layers=max_layers), max_layers - 1
  dtype = jnp.bfloat16
  abstract = models.abstract_params(compiled_cfg, dtype)
  shardings = gemma_layout.gemma_param_shardings(compiled_cfg, mesh,
                                                 layout, abstract)
  params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  rows = NamedSharding(mesh, PartitionSpec("data"))
  b = windows * mesh.shape["data"]
  tokens = jax.ShapeDtypeStruct((b, SEQ_LEN), jnp.int32, sharding=rows)
  mask = jax.ShapeDtypeStruct((b, SEQ_LEN), jnp.bool_, sharding=rows)
  name = f"layer_{hook}/resid_post"

  def step(p, t, m):
    return models.forward(p, t, m, config=compiled_cfg, hookpoints=(name,),
                          logits=False, dtype=dtype).activations[name]

  compiled = jax.jit(step, out_shardings=rows).lower(
      params, tokens, mask).compile()
  total, temp = _bytes(compiled)
  if compiled_cfg is not mc:
    # Swap the reduced model's weights for the full model's (exact).
    full_params = gemma_layout.sharded_bytes(
        models.abstract_params(mc, dtype),
        gemma_layout.gemma_param_shardings(
            mc, mesh, layout, models.abstract_params(mc, dtype)))
    total += full_params - gemma_layout.sharded_bytes(abstract, shardings)
  return total, temp, compiled_cfg.num_layers if compiled_cfg is not mc \
      else full


def plan_row(size: str, width: int, data: int, model: int, layout: str, *,
             windows: int, max_layers: int) -> Row:
  t0 = time.perf_counter()
  plan = plans.make(_config(size, width, data, model, layout))
  mc = plan.model.config
  layer = models.hooks.parse(plan.hookpoint).layer
  devices = jax.devices()[:data * model]
  run = Run(plan, devices=devices)
  gemma_mesh = run.mesh
  abstract = models.abstract_params(mc, jnp.bfloat16)
  gemma_bytes = gemma_layout.sharded_bytes(
      abstract, gemma_layout.gemma_param_shardings(mc, gemma_mesh, layout))
  state_bytes = gemma_layout.sharded_bytes(run.abstract_state,
                                           run.state_sharding)
  h_total, h_temp, compiled_layers = harvest_bytes(
      mc, layer, gemma_mesh, layout, windows, max_layers)
  d = mc.d_model
  batch = {"x": jax.ShapeDtypeStruct((TRAIN_BATCH, d), jnp.float32,
                                     sharding=run.batch_sharding["x"])}
  t_total, t_temp = _bytes(run.step.lower(run.abstract_state, batch).compile())
  return Row(size, width, layer, data, model, layout, gemma_bytes,
             state_bytes, h_total, h_temp, t_total, t_temp, compiled_layers,
             time.perf_counter() - t0)


@dataclasses.dataclass
class GenRow:
  """One compiled decode step (size, mesh, layout, batch, context)."""
  size: str
  data: int
  model: int
  layout: str
  batch: int
  context: int
  gemma_param_bytes: int      # exact: this device's shard of the weights
  cache_bytes: int            # exact: this device's shard of the KV cache
  step_bytes: int             # compiled decode step (args+out+temp-alias)
  step_temp_bytes: int
  loop_bytes: int             # compiled decode loop (`generate._loop.decode`)
  loop_temp_bytes: int
  seconds: float

  @property
  def peak_bytes(self) -> int:
    return max(self.step_bytes, self.loop_bytes)


def decode_row(size: str, data: int, model: int, layout: str, batch: int,
               context: int, loop: bool = True) -> GenRow:
  """Compiles one bf16 decode step on a (data, model) mesh, abstractly.

  The weights are laid out by `gemma_param_shardings`, the cache by
  `cache_shardings` and donated (as `generate._loop.decode` carries it, it
  is updated in place); the tokens are split over 'data' when the batch
  divides. With `loop`, also the whole decode loop (else its bytes are 0).
  """
  t0 = time.perf_counter()
  mc = models.get_config(size)
  mesh = Mesh(np.asarray(jax.devices()[:data * model]).reshape(data, model),
              ("data", "model"))
  abstract = models.abstract_params(mc, jnp.bfloat16)
  shardings = gemma_layout.gemma_param_shardings(mc, mesh, layout, abstract)
  params = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  cache_sh = gemma_layout.cache_shardings(mc, mesh, layout, batch, context)
  cache = gemma_layout.abstract_cache(mc, cache_sh, batch, context,
                                      jnp.bfloat16)
  rows = NamedSharding(mesh, PartitionSpec(
      "data" if batch % data == 0 else None))
  tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)

  def step(p, c, t):
    return _loop.decode_step(p, c, t, {}, config=mc, dtype=jnp.bfloat16)[:2]

  # The logits' layout is XLA's choice, as in `decode`: asking for them
  # split by rows makes it gather the vocabulary-split embedding table.
  compiled = jax.jit(step, out_shardings=(None, cache_sh),
                     donate_argnums=1).lower(params, cache, tokens).compile()
  total, temp = _bytes(compiled)
  loop_total = loop_temp = 0
  if loop:  # the whole loop, as `generate` runs it (greedy)
    replicated = NamedSharding(mesh, PartitionSpec())
    arg = lambda shape, dtype, s=replicated: jax.ShapeDtypeStruct(
        shape, dtype, sharding=s)
    compiled = _loop.decode.lower(
        params, cache, arg((batch, mc.vocab_size), jnp.float32, rows),
        jax.eval_shape(lambda: jax.random.key(0)), arg((), jnp.int32),
        arg((2,), jnp.int32), {}, config=mc, dtype=jnp.dtype(jnp.bfloat16),
        sampling=GREEDY, num_slots=GEN_NEW_TOKENS,
        cache_sharding=cache_sh).compile()
    loop_total, loop_temp = _bytes(compiled)
  return GenRow(size, data, model, layout, batch, context,
                gemma_layout.sharded_bytes(abstract, shardings),
                gemma_layout.sharded_bytes(cache, cache_sh), total, temp,
                loop_total, loop_temp, time.perf_counter() - t0)


def full_cache_bytes(mc: models.Gemma3Config, batch: int, context: int,
                     itemsize: int = 2) -> int:
  """A cache whose every layer keeps the whole context (no ring buffers)."""
  return (2 * batch * mc.num_kv_heads * mc.head_dim * itemsize
          * mc.num_layers * context)


def fits(row, hbm_gb: float, margin: float) -> bool:
  return row.peak_bytes * (1 + margin) <= hbm_gb * GB


def markdown(rows: list[Row], *, margin: float, windows: int,
             max_layers: int) -> str:
  """The doc: method, the per-mesh table, the smallest slice per chip."""
  g = lambda b: f"{b / GB:.2f}"
  out = [
      "# Memory plan: Gemma 3 + one dictionary per device",
      "",
      "Generated by `python scripts/memory_plan.py` (do not edit by hand; "
      "rerun it). Bytes per device, in GB (10^9 bytes), from XLA's "
      "`compiled.memory_analysis()` of the sharded steps compiled for "
      "simulated CPU meshes, and exact shard sizes of the weights and the "
      "train state. Nothing is allocated: all arrays are abstract.",
      "",
      f"- **Harvest step**: bf16 Gemma run to the hookpoint's layer on "
      f"{windows} windows x {SEQ_LEN} tokens per 'data' shard "
      f"(`data.seq_len={SEQ_LEN}`, `data.model_batch_size={windows} x "
      "data`), weights laid out as `mesh.gemma` says "
      "(`gemscope_jax/parallel/gemma_layout.py`).",
      "- **Train step**: `training.step.Run(...).step` (the trainer's own "
      f"jitted step) of a JumpReLU SAE (fp32 weights, Adam), batch "
      f"{TRAIN_BATCH} activations, latent axis on 'model', batch on 'data' "
      "(the preset's `mesh.rules`); the state is donated.",
      "- **Peak** = max(harvest + resident train state, train step + "
      "resident Gemma weights): both stay on the device for the whole run.",
      f"- **Fits** when peak x {1 + margin:.2f} <= HBM per chip (a "
      f"{margin:.0%} margin for what the CPU compiler does not model: TPU "
      "lane padding, GPU workspaces, XLA's runtime, fragmentation).",
      "- The harvest pass is compiled at full depth, blocks 0 .. layer "
      "('compiled' column: blocks compiled). XLA's CPU backend runs with "
      "its concurrency-optimized scheduler off (`--xla_cpu_enable_"
      "concurrency_optimized_scheduler=false`), which gathers an 'fsdp' "
      "layer's weights when the layer runs, as TPU/GPU schedulers do; "
      "with it on (the CPU default) every layer's gathered weights are "
      "alive at once.",
      "- The CPU backend's temporaries are an estimate of TPU/GPU ones; "
      "weights, optimizer state and batches are exact.",
      '- **Multi-host slices** (e.g. v5e-16 = 4 hosts x 4 chips): with '
      'live activations the harvest runs Gemma over the global mesh in '
      'lockstep (data/lockstep.py), its weights laid out over every '
      "host's chips, so the Gemma weights column holds as computed for "
      'the whole mesh. With data.cache_dir process 0 writes the cache '
      "alone, with Gemma over its own chips only (Gemma / (chips per "
      "host) for 'fsdp_tp'); evaluation at the end gathers the weights "
      "whole on process 0's host.",
      "",
      "| size | dict width | layer | mesh data x model | Gemma layout | "
      "Gemma weights | train state | harvest step | train step | peak | "
      "compiled | " + " | ".join(f"fits {h}" for h, _ in HARDWARE) + " |",
      "|" + "---|" * (11 + len(HARDWARE)),
  ]
  for r in rows:
    out.append(
        f"| {r.size.removeprefix('gemma3_')} | {r.width:,} | {r.layer} | "
        f"{r.data} x {r.model} | {r.layout} | {g(r.gemma_param_bytes)} | "
        f"{g(r.train_state_bytes)} | {g(r.harvest_bytes)} | "
        f"{g(r.train_bytes)} | {g(r.peak_bytes)} | {r.compiled_layers} | " +
        " | ".join("yes" if fits(r, hbm, margin) else "no"
                   for _, hbm in HARDWARE) + " |")
  out += ["", "## Smallest slice per chip", "",
          "The fewest chips among the meshes above that fit (peak x "
          f"{1 + margin:.2f} <= HBM); '>' means none of the meshes tried "
          "fits and a larger 'data' axis (or a narrower dictionary) is "
          "needed.", "",
          "| size | dict width | " + " | ".join(
              f"{h} ({hbm:g} GB)" for h, hbm in HARDWARE) + " |",
          "|---|---|" + "---|" * len(HARDWARE)]
  for size in dict.fromkeys(r.size for r in rows):
    mine = [r for r in rows if r.size == size]
    cells = []
    for _, hbm in HARDWARE:
      ok = [r for r in mine if fits(r, hbm, margin)]
      if ok:
        r = min(ok, key=lambda r: (r.data * r.model, r.peak_bytes))
        cells.append(f"{r.data * r.model} ({r.data} x {r.model}, "
                     f"{r.layout})")
      else:
        big = max(mine, key=lambda r: r.data * r.model)
        cells.append(f"> {big.data * big.model}")
    out.append(f"| {size.removeprefix('gemma3_')} | {mine[0].width:,} | " +
               " | ".join(cells) + " |")
  out += ["", "Choose a slice with at least that many chips, set "
          "`mesh.data` x `mesh.model` and `mesh.gemma` to the row's, and "
          "launch as docs/launch.md describes. A bigger `data` axis always "
          "lowers the per-device Gemma weights ('fsdp') and activations; "
          "the dictionary's state shrinks only with `mesh.model`.", ""]
  return "\n".join(out)


def gen_markdown(rows: list[GenRow], sizes: list[str], *,
                 margin: float) -> str:
  """The generation section: cache by formula, compiled decode steps."""
  g = lambda b: f"{b / GB:.2f}"
  shapes = " | ".join(f"B={b}, {c // 1024}k" for b, c in GEN_SHAPES)
  out = [
      "## Generation: weights and KV cache per device", "",
      "Decoding (`gemscope_jax.generate`) holds the bf16 weights and the "
      "bf16 key/value cache (`generate(..., dtype=jnp.bfloat16)`). The "
      "cache keeps, per layer, (B, S, K, H) keys and values: S is the "
      "context for the global layers and the sliding window for the local "
      "ones (5 of every 6, written as ring buffers), so its bytes are "
      "2 x B x K x H x 2 bytes x (global layers x context + local layers x "
      "window) (`models.cache_bytes`). It is laid out like the weights "
      "(`gemma_layout.cache_shardings`): batch over 'data' when it "
      "divides, else the slot axis; under 'fsdp_tp' the KV heads over "
      "'model'.", "",
      "### KV cache by formula (whole cache, GB)", "",
      "Each cell: with ring buffers / every layer keeping the whole context "
      "(what the ring buffers save).", "",
      "| size | layers (global) | K x H | bf16 weights | " + shapes + " |",
      "|---|---|---|---|" + "---|" * len(GEN_SHAPES)]
  for size in sizes:
    mc = models.get_config(size)
    n_global = sum(1 for n in models.layer_sizes(mc, 10 ** 9) if n == 10 ** 9)
    cells = []
    for b, c in GEN_SHAPES:
      ring = models.cache_bytes(mc, b, c, jnp.bfloat16)
      full = full_cache_bytes(mc, b, c)
      cells.append(f"{g(ring)} / {g(full)} (-{1 - ring / full:.0%})")
    out.append(f"| {size.removeprefix('gemma3_')} | {mc.num_layers} "
               f"({n_global}) | {mc.num_kv_heads} x {mc.head_dim} | "
               f"{g(2 * mc.num_params())} | " + " | ".join(cells) + " |")
  out += [
      "", "### Compiled decode step per device", "",
      "Compiled for the mesh, weights as `mesh.gemma` says, the cache laid "
      "out by `cache_shardings`: the **decode step** "
      "(`generate._loop.decode_step`, one token per row, the cache donated "
      "and updated in place) and the **decode loop** "
      "(`generate._loop.decode`, greedy, as `generate` runs it: the step in "
      f"a `while_loop`, {GEN_NEW_TOKENS} token slots, the cache donated). "
      "Each is XLA's per-device arguments + outputs + temporaries - "
      "aliased ('temp': the temporaries); the weights and cache columns "
      "are exact shard sizes. The first row of each size is its preset's "
      f"layout. Fits when the larger of the two x {1 + margin:.2f} <= HBM, "
      "for decoding alone.", "",
      "| size | mesh data x model | Gemma layout | batch | context | "
      "Gemma weights | KV cache | decode step (temp) | decode loop (temp) "
      "| " + " | ".join(f"fits {h}" for h, _ in HARDWARE) + " |",
      "|" + "---|" * (9 + len(HARDWARE))]
  for r in rows:
    out.append(
        f"| {r.size.removeprefix('gemma3_')} | {r.data} x {r.model} | "
        f"{r.layout} | {r.batch} | {r.context:,} | {g(r.gemma_param_bytes)} "
        f"| {g(r.cache_bytes)} | {g(r.step_bytes)} ({g(r.step_temp_bytes)})"
        f" | {g(r.loop_bytes)} ({g(r.loop_temp_bytes)}) | " +
        " | ".join("yes" if fits(r, hbm, margin) else "no"
                   for _, hbm in HARDWARE) + " |")
  out += [
      "", "- The step's temporaries are mostly the CPU backend's: its dot "
      "emitter re-lays the unembedding's shard of the embedding table "
      "(V x D / devices), which TPU and GPU read in place.",
      "- The loop's extra temporaries are weight re-lays and gathers that "
      "XLA's loop-invariant code motion hoists out of the `while_loop` "
      "(they do not change between tokens), so they stay alive for the "
      "whole loop: the CPU dot emitter's transposes (absent on TPU and "
      "GPU); under 'fsdp_tp', the MLP's (gate, up) shards re-laid from the "
      "hidden axis to d_model, because the model reshapes the stacked "
      "(2, F, D) weight to (1, 2F, D) (see `gemma_layout`'s caveat); and "
      "under 'fsdp', the all-gathered weights of every layer, which undoes "
      "'fsdp' for the loop (27B on 8 x 1: 14 GB of temporaries). The last "
      "two come from the partitioner and the pass, not the CPU backend, "
      "and may appear on TPU/GPU too: until the loop keeps them inside "
      "(not yet done), read the loop column as the bound for 'fsdp' and "
      "'fsdp_tp' and the step column as the target.",
      "- The whole generation adds the prompt's prefill (its activations "
      "scale with the prompt bucket, not the context) and, with "
      "`return_logits`, B x new tokens x V float32.", ""]
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="270M and 1B only (a minute or two)")
  p.add_argument("--sizes", default="",
                 help="comma-separated sizes (default: all, or --quick's)")
  p.add_argument("--out", default=str(ROOT / "docs" / "memory_plan.md"),
                 help="Markdown output; '-' prints it")
  p.add_argument("--json", default="", help="also write the rows as JSON")
  p.add_argument("--margin", type=float, default=0.25,
                 help="safety margin on the peak (0.25 = 25%%)")
  p.add_argument("--windows-per-device", type=int, default=4,
                 help="harvest windows per 'data' shard per forward pass")
  p.add_argument("--sections", default="harvest,generation",
                 help="comma-separated: harvest (harvest and train "
                 "steps), generation (decode steps)")
  p.add_argument("--max-compiled-layers", type=int, default=1000,
                 help="compile at most this many harvest blocks (an "
                 "underestimate; see the module docstring)")
  a = p.parse_args(argv)
  sizes = ([s if s.startswith("gemma3_") else f"gemma3_{s}"
            for s in a.sizes.split(",")] if a.sizes else
           list(QUICK if a.quick else PLANS))
  sections = set(a.sections.split(","))
  rows, gen_rows = [], []
  for size in sizes if "harvest" in sections else ():
    width, meshes = PLANS[size]
    for data, model, layout in meshes:
      if data * model > len(jax.devices()):
        raise SystemExit(f"{data} x {model} needs more than the "
                         f"{len(jax.devices())} simulated devices")
      r = plan_row(size, width, data, model, layout,
                   windows=a.windows_per_device,
                   max_layers=a.max_compiled_layers)
      print(f"{size} {data}x{model} {layout}: harvest "
            f"{r.harvest_bytes / GB:.2f} GB, train {r.train_bytes / GB:.2f} "
            f"GB, peak {r.peak_bytes / GB:.2f} GB ({r.seconds:.0f} s)",
            file=sys.stderr, flush=True)
      rows.append(r)
  for size in sizes if "generation" in sections else ():
    for data, model, layout, batch, context in GEN_PLANS[size]:
      r = decode_row(size, data, model, layout, batch, context)
      print(f"{size} {data}x{model} {layout} B={batch} ctx={context}: "
            f"decode step {r.step_bytes / GB:.2f} GB "
            f"({r.seconds:.0f} s)", file=sys.stderr, flush=True)
      gen_rows.append(r)
  parts = []
  if "harvest" in sections:
    parts.append(markdown(rows, margin=a.margin,
                          windows=a.windows_per_device,
                          max_layers=a.max_compiled_layers))
  if "generation" in sections:
    parts.append(gen_markdown(gen_rows, sizes, margin=a.margin))
  text = "\n".join(parts)
  if a.out == "-":
    print(text)
  else:
    pathlib.Path(a.out).write_text(text, encoding="utf-8")
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps({
        "harvest": [{**dataclasses.asdict(r), "peak_bytes": r.peak_bytes}
                    for r in rows],
        "generation": [dataclasses.asdict(r) for r in gen_rows]},
        indent=1), encoding="utf-8")
  return 0


if __name__ == "__main__":
  sys.exit(main())
