"""`train(config, workdir)`: one training sequence for every dictionary.

The sequence, the same for one dictionary and for a group of them (a group
is the vmapped case of the one-dictionary step, `training.group`):
1. The multi-host runtime starts (if asked); `plans.make` validates the
   config once and reads it into frozen plans; nothing below reads the
   ConfigDict.
2. The run's pieces: a `step.Run` (module, optimiser, mesh, shardings, the
   jitted step) or a `group.GroupRun` (one vmapped step per stack of
   same-shaped dictionaries).
3. The workdir: a checkpoint there is checked against the plan
   (`workdir.FROZEN_FIELDS`) and the config saved as config.json.
4. Gemma's weights and the activation batches (`sources`: live Gemma, an
   on-disk cache, or lockstep data shards across processes).
5. The newest checkpoint is restored (the stream moved to its position),
   or a fresh state starts from the first bucket's scales and means (a CLT
   with `dictionary.init_from`: then from its transcoders, `init_from`).
6. The loop (`loop.run_steps`): step, log, checkpoint every
   `checkpoint_every_steps`; a non-finite loss stops with
   `TrainingDiverged`, keeping the last good checkpoint.
7. The end: the state gathered on the host; process 0 exports the
   dictionaries (`export`) and evaluates them on held-out text
   (`heldout`, metrics.json).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import ml_collections

from gemscope_jax import assets, errors, safe_write
from gemscope_jax.parallel import distributed
from gemscope_jax.text.tokenizer import default_tokenizer
from gemscope_jax.training import checkpoints as ckpt_lib
from gemscope_jax.training import export as export_lib
from gemscope_jax.training import group as group_lib
from gemscope_jax.training import heldout, init_from, loop, plans, schema
from gemscope_jax.training import sources
from gemscope_jax.training import workdir as workdir_lib
from gemscope_jax.training.step import Run, TrainingDiverged
from gemscope_jax.training.overrides import apply_overrides

__all__ = ["TrainingDiverged", "evaluate_workdir", "make_run", "train"]


def make_run(plan: plans.Plan, devices=None) -> Run | group_lib.GroupRun:
  """The run `plan` describes: a `group.GroupRun` for several
  dictionaries, else a `step.Run`."""
  if plan.group:
    return group_lib.GroupRun(plan, devices)
  return Run(plan, devices=devices)


def export_run(run, state, workdir: pathlib.Path) -> None:
  """workdir/export/: one dictionary's, or each member's of a group."""
  if isinstance(run, group_lib.GroupRun):
    export_lib.export_group(run, state, workdir)
  else:
    export_lib.export(run, state, workdir)


def evaluate_run(run, state, gemma_params, tokenizer, workdir: pathlib.Path,
                 *, progress: bool) -> dict[str, Any]:
  """The held-out evaluation of a run or a group -> workdir/metrics.json."""
  evaluate = (heldout.evaluate_group if isinstance(run, group_lib.GroupRun)
              else heldout.evaluate_run)
  return evaluate(run, state, gemma_params, tokenizer, workdir,
                  progress=progress)


def _start_from(run: Run, state, transcoders, workdir: pathlib.Path, *,
                progress: bool):
  """A fresh CLT's state started from its transcoders (`init_from`); the
  per-layer report goes to workdir/init_from.json and, with progress, to
  the terminal."""
  state, report = init_from.apply(run, state, transcoders)
  if distributed.is_main_process():
    with assets.atomic_path(workdir / "init_from.json") as tmp:
      tmp.write_text(json.dumps(report, indent=1))
  if progress:
    for r in report:
      print(f"layer {r['layer']}: {r['kept']} of the first {r['taken']} "
            f"latents of {r['source']} ({r['duplicates']} near-duplicates "
            f"dropped), {r['fresh']} fresh", flush=True)
  return state


def train(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          progress: bool = True, devices=None,
          restart: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the dictionaries `c` describes in `workdir`.

  Args:
    c: a config (see `config.default_config`).
    workdir: where checkpoints, logs, the export and metrics go; rerunning
      with the same workdir resumes.
    progress: show progress bars.
    devices: the devices to build the mesh over; all of them if None.
    restart: when every checkpoint in `workdir` is unreadable, start again
      from step 0 (otherwise that stops the run, `errors.RunError`).

  Returns:
    The final metrics: training metrics of the last step
    (`train_{metric}`; for a group also `train_{member}/{metric}`), plus
    the held-out evaluation's when `c.eval.at_end`.

  Raises:
    ValueError / FileNotFoundError: a bad config, naming the field.
    errors.OutputError: the workdir is a file, read-only, or a folder of
      other files (checked before any work).
    errors.RunError: no readable checkpoint and not `restart`.
    TrainingDiverged: non-finite loss or gradients.
    distributed.DistributedError: the multi-host runtime did not start.
  """
  # Before anything touches a device: a multi-host run fixes the process
  # layout here. Only process 0 shows progress and prints.
  distributed.initialize(plans.distributed_plan(c))
  progress = progress and distributed.is_main_process()
  plan = plans.make(c)
  run = make_run(plan, devices)
  workdir, ckpts, latest = workdir_lib.open_workdir(plan, workdir)
  # A CLT started from transcoders: they are read and checked before the
  # harvest, so that a bad source fails at launch.
  starts_from = plan.dictionaries[0].init_from
  transcoders = (init_from.load(plan.dictionaries[0])
                 if starts_from and latest is None else None)

  tokenizer = default_tokenizer()
  gemma_params = sources.load_gemma(plan, run.mesh)
  batches = sources.make_batches(plan, run.mesh, gemma_params, tokenizer,
                                 progress=progress, hookpoints=run.harvest)
  # acts_per_s counts from here: the first bucket's harvest (or its refill
  # on resume) is part of the end-to-end rate.
  t0 = time.perf_counter()

  start_step, state = workdir_lib.restore(ckpts, latest, run, batches,
                                          restart=restart)
  if state is None:
    if progress:
      what = (f"{len(run.harvest)} hookpoints (scales and means)"
              if plan.group else f"{', '.join(run.harvest)} (scales and mean)")
      print(f"harvesting the first {plan.data.bucket_tokens:,} activations "
            f"of {what}...", flush=True)
    state = run.initial_state(batches.peek_bucket())
    if starts_from:
      state = _start_from(run, state, transcoders or init_from.load(
          plan.dictionaries[0]), workdir, progress=progress)

  step, state, last = loop.run_steps(
      plan.loop, run, state, batches, ckpts, dict(plan.config_json),
      workdir, start_step=start_step, t0=t0, progress=progress)

  # The end: the final state whole on the host, then process 0 exports and
  # (with eval.at_end) evaluates.
  result = {"step": step, **{f"train_{k}": v for k, v in last.items()}}
  state = distributed.host_tree(state)
  if plan.eval.at_end and sources.global_harvest(plan):
    # The weights span every process; process 0 evaluates alone, on a
    # whole copy (a collective, so every process takes part).
    gemma_params = distributed.host_tree(gemma_params)
  if not distributed.is_main_process():
    return result  # process 0 exports and evaluates
  export_run(run, state, workdir)
  if plan.eval.at_end:
    result.update(evaluate_run(run, state, gemma_params, tokenizer, workdir,
                            progress=progress))
  return result


def evaluate_workdir(workdir: str | pathlib.Path, *, progress: bool = True,
                     overrides: dict | None = None) -> dict[str, Any]:
  """Evaluates the newest checkpoint in `workdir` (the `gemscope eval` job),
  a single dictionary or a group; `overrides` change the saved config
  (e.g. {'eval.num_tokens': 262144})."""
  workdir = pathlib.Path(workdir)
  ckpts = ckpt_lib.open_existing(workdir, "evaluate")
  # metrics.json and the histogram go into the workdir: checked now, not
  # after the evaluation.
  safe_write.check_workdir(workdir, flag=errors.option("workdir",
                                                       "--workdir"))
  saved = ckpts.newest_config()
  if saved is None:
    ckpts.close()
    raise errors.RunError(f"{workdir}: no readable checkpoint (every "
                          "checkpoint's config is damaged)")
  c = schema.from_json(saved[1])
  if overrides:
    c = apply_overrides(c, overrides)
  plan = plans.make(c)
  run = make_run(plan)
  restored = ckpts.restore_latest(run.abstract_state)
  ckpts.close()
  if restored is None:
    raise errors.RunError(f"{workdir}: no readable checkpoint (the "
                          f"unreadable ones are in {workdir / 'corrupt'})")
  _, state, _, _ = restored
  tokenizer = default_tokenizer()
  gemma_params = sources.load_gemma(plan, run.mesh)
  return evaluate_run(run, state, gemma_params, tokenizer, workdir,
                   progress=progress)
