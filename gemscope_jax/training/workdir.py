"""A run's work directory: created, checked for a resumable checkpoint,
its config saved as config.json, and the newest checkpoint restored.

Rerunning the same command resumes. What may not change between a
checkpoint and the resumed run is `FROZEN_FIELDS` (what the saved state
means); logging, evaluation and `train.num_tokens` may change.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

from gemscope_jax import assets
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
      raise ValueError(
          f"config.{key}: {workdir} holds a run with {key}={a!r}, this config "
          f"has {b!r}; resume with the original value or use a new workdir")


def open_workdir(plan: Plan, workdir: str | pathlib.Path):
  """Creates `workdir`, checks a checkpoint there may be resumed with
  `plan`, and saves the config as workdir/config.json.

  Returns:
    (workdir as a Path, its `Checkpoints`, the newest step or None).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpts = ckpt_lib.Checkpoints(workdir,
                               max_to_keep=plan.loop.keep_checkpoints)
  latest = ckpts.latest_step()
  if latest is not None:
    check_resumable(ckpts.read_config(latest), plan.config_json, workdir)
  if distributed.is_main_process():
    with assets.atomic_path(workdir / "config.json") as tmp:
      tmp.write_text(json.dumps(dict(plan.config_json), indent=2))
  return workdir, ckpts, latest


def restore(ckpts: ckpt_lib.Checkpoints, latest: int | None, run,
            batches) -> tuple[int, Any]:
  """(step, state) of the newest readable checkpoint, the stream moved to
  its position; (0, None) when there is none (the caller initialises)."""
  restored = ckpts.restore_latest(run.abstract_state) if latest is not None \
      else None
  if restored is None:
    return 0, None
  start_step, state, data_state, _ = restored
  batches.set_state(data_state)
  if distributed.is_main_process():
    print(f"resuming from step {start_step} in {ckpts.directory}")
  return start_step, state
