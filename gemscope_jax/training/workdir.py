"""A run's work directory: created, checked for a resumable checkpoint,
its config saved as config.json, and the newest checkpoint restored.

Rerunning the same command resumes. What may not change between a
checkpoint and the resumed run is `FROZEN_FIELDS` (what the saved state
means); logging, evaluation and `train.num_tokens` may change.

A workdir is checked before any work: it must be a writable folder, and a
non-empty one must already be a gemscope workdir (`WORKDIR_NAMES`): a run
never writes its config.json, logs and export over a user's own files.
When every checkpoint is unreadable the run stops (`errors.RunError`)
unless told to start again (`restart`, the `--restart` flag).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

from gemscope_jax import assets, errors, safe_write
from gemscope_jax.parallel import distributed
from gemscope_jax.training import checkpoints as ckpt_lib
from gemscope_jax.training.plans import Plan

# Changing these between a checkpoint and a resumed run changes what the
# saved state means; everything else (logging, eval, num_tokens) may change.
FROZEN_FIELDS = ("seed", "model.name", "model.checkpoint", "model.dtype",
                 "hookpoint", "target", "group", "data.text", "data.seq_len",
                 "data.model_batch_size", "data.bucket_tokens",
                 "data.cache_dir", "data.shuffle_windows",
                 "data.num_shards", "dictionary",
                 "train.batch_size")


# What a run writes into its workdir (a folder holding only these, or
# holding a checkpoint or a run's config.json, is a gemscope workdir).
WORKDIR_NAMES = frozenset({
    "checkpoints", "config.json", "metrics.jsonl", "tensorboard", "export",
    "metrics.json", "latent_frequency.png", "corrupt", "init_from.json"})


def _is_run_config(path: pathlib.Path) -> bool:
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  return isinstance(saved, dict) and {"dictionary", "train"} <= set(saved)


def check_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
  """Creates `workdir` if needed; OutputError if it is a file, cannot be
  written, or holds files but is not a gemscope workdir."""
  workdir = pathlib.Path(workdir)
  flag = errors.option("workdir", "--workdir")
  if workdir.is_dir():
    held = {p.name for p in workdir.iterdir()
            if not p.name.startswith(".")}
    ours = (held <= WORKDIR_NAMES or (workdir / "checkpoints").is_dir()
            or _is_run_config(workdir / "config.json"))
    if not ours:
      shown = ", ".join(sorted(held)[:3]) + (", ..." if len(held) > 3
                                              else "")
      raise errors.OutputError(
          f"{flag} {workdir}: holds other files ({shown}) and is not a "
          "gemscope workdir; give a new or empty folder (a run writes "
          "config.json, checkpoints/, metrics and export/ there)")
  return safe_write.check_workdir(workdir, flag=flag)


def _flat(d: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_resumable(saved: Mapping, config_json: Mapping,
                    workdir: pathlib.Path) -> None:
  """Raises if `config_json` changes a field the checkpoint in `workdir`
  (whose config was `saved`) depends on."""
  old, new = _flat(saved), _flat(config_json)
  for key in sorted(set(old) | set(new)):
    if not any(key == f or key.startswith(f + ".") for f in FROZEN_FIELDS):
      continue
    a, b = old.get(key), new.get(key)
    if json.dumps(a) != json.dumps(b):
      raise errors.UsageError(
          f"config.{key}: {workdir} holds a run with {key}={a!r}, this config "
          f"has {b!r}; resume with the original value or use a new workdir")


def open_workdir(plan: Plan, workdir: str | pathlib.Path):
  """Creates `workdir`, checks a checkpoint there may be resumed with
  `plan`, and saves the config as workdir/config.json.

  Returns:
    (workdir as a Path, its `Checkpoints`, the newest step or None).
  """
  workdir = check_workdir(workdir)
  ckpts = ckpt_lib.Checkpoints(workdir,
                               max_to_keep=plan.loop.keep_checkpoints)
  latest = ckpts.latest_step()
  saved = ckpts.newest_config() if latest is not None else None
  if saved is not None:
    check_resumable(saved[1], plan.config_json, workdir)
  if distributed.is_main_process():
    with assets.atomic_path(workdir / "config.json") as tmp:
      tmp.write_text(json.dumps(dict(plan.config_json), indent=2))
  return workdir, ckpts, latest


def restore(ckpts: ckpt_lib.Checkpoints, latest: int | None, run,
            batches, *, restart: bool = False) -> tuple[int, Any]:
  """(step, state) of the newest readable checkpoint, the stream moved to
  its position; (0, None) when there is none (the caller initialises).

  Raises:
    errors.RunError: every checkpoint is unreadable (they were set aside in
      workdir/corrupt/) and `restart` is False: starting again from step 0
      is the user's choice, not a silent one.
  """
  restored = ckpts.restore_latest(run.abstract_state) if latest is not None \
      else None
  corrupt = ckpts.workdir / "corrupt"
  if restored is None and (latest is not None or (
      corrupt.is_dir() and any(corrupt.iterdir()))):
    if not restart:
      raise errors.RunError(
          f"{ckpts.directory}: no readable checkpoint (the unreadable ones "
          f"are in {corrupt}); pass "
          f"{errors.option('restart=True', '--restart')} to start again "
          "from step 0")
    if distributed.is_main_process():
      print(f"no readable checkpoint in {ckpts.directory} (unreadable ones "
            f"in {corrupt}); starting again from step 0", flush=True)
  if restored is None:
    return 0, None
  start_step, state, data_state, _ = restored
  batches.set_state(data_state)
  if distributed.is_main_process():
    print(f"resuming from step {start_step} in {ckpts.directory}")
  return start_step, state
