r"""Device memory of each Gemma 3 size's harvest and train steps, without TPUs.

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
is for. The harvest pass is compiled at full depth by default (27B to layer
31 takes seconds); `--max-compiled-layers` compiles fewer blocks and puts
the full model's exact weight bytes back, but that underestimates: with
'fsdp' the CPU compiler keeps gathered weights of several blocks alive, so
temporaries grow with depth (4B, 4 x 1 fsdp: 6.6 GB at 8 blocks, 10.3 GB at
all 18).
"""

from __future__ import annotations

import os
import sys

_DEVICES = 64
if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count="
                             f"{_DEVICES}")
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


def fits(row: Row, hbm_gb: float, margin: float) -> bool:
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
      "('compiled' column: blocks compiled). With 'fsdp' the CPU compiler "
      "keeps gathered weights of several blocks alive, so its harvest "
      "temporaries can exceed the replicated layout's; TPU/GPU schedulers "
      "gather block by block and should need less.",
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
  p.add_argument("--max-compiled-layers", type=int, default=1000,
                 help="compile at most this many harvest blocks (an "
                 "underestimate; see the module docstring)")
  a = p.parse_args(argv)
  sizes = ([s if s.startswith("gemma3_") else f"gemma3_{s}"
            for s in a.sizes.split(",")] if a.sizes else
           list(QUICK if a.quick else PLANS))
  rows = []
  for size in sizes:
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
  text = markdown(rows, margin=a.margin, windows=a.windows_per_device,
                  max_layers=a.max_compiled_layers)
  if a.out == "-":
    print(text)
  else:
    pathlib.Path(a.out).write_text(text, encoding="utf-8")
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(
        [{**dataclasses.asdict(r), "peak_bytes": r.peak_bytes} for r in rows],
        indent=1), encoding="utf-8")
  return 0


if __name__ == "__main__":
  sys.exit(main())
