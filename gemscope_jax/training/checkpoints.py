"""Orbax checkpoints of a training run: state, data position and config.

Each step directory under `workdir/checkpoints` holds three items: `state`
(the sharded train state), `data` (the activation stream's JSON position)
and `config` (the run's config as JSON). Orbax writes a step under a
temporary name and renames it when complete, so a run killed mid-save leaves
no half checkpoint that looks finished. A newest checkpoint that still fails
to restore (a damaged file) is moved aside to `workdir/corrupt/` with a
one-line message naming it and the error (the libraries' own tracebacks of
the failed attempt are kept out of the output), and the previous one is
used; nothing is deleted. When none is readable, the caller decides
(`workdir.restore`: stop, or start again when asked).

Caveat: restoring checks readability, not that the saved config matches the
one being run; `trainer` compares the fields that must not change.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil
import time
from typing import Any, Iterator

import orbax.checkpoint as ocp

from gemscope_jax import errors

ITEMS = ("state", "data", "config")


class Checkpoints:
  """A CheckpointManager with fallback past unreadable checkpoints."""

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2,
               asynchronous: bool = True, create: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.directory = (self.workdir / "checkpoints").absolute()
    self.max_to_keep = max_to_keep
    self.asynchronous = asynchronous
    self.create = create
    self._manager = self._make()

  def _make(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.max_to_keep, create=self.create,
        enable_async_checkpointing=self.asynchronous)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=ITEMS)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, data: dict, config: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(config)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def read_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def newest_config(self) -> tuple[int, dict] | None:
    """(step, saved config) of the newest checkpoint whose config reads;
    None if none does. A damaged one is left for `restore_latest` to set
    aside (this only reads)."""
    for step in reversed(self.steps()):
      try:
        with _quiet_libraries():
          return step, self.read_config(step)
      except Exception:  # pylint: disable=broad-except
        continue  # as restore_latest: any error means unusable
    return None

  def restore_latest(self, abstract_state) -> tuple[int, Any, dict, dict
                                                   ] | None:
    """(step, state, data, config) of the newest readable checkpoint.

    Unreadable newer checkpoints are moved to `workdir/corrupt/` (with a
    warning naming them and the error). None if there is no checkpoint.
    """
    steps = self.steps()
    for i, step in enumerate(reversed(steps)):
      try:
        with _quiet_libraries():
          r = self._manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        return step, r["state"], r["data"], r["config"]
      except Exception as e:  # pylint: disable=broad-except
        # Orbax raises many types for a damaged file (ValueError, OSError,
        # tensorstore errors); whichever it is, the step is unusable.
        moved = self._set_aside(step)
        left = len(steps) - i - 1
        print(f"warning: checkpoint {self.directory / str(step)} is "
              f"unreadable ({_reason(e)}); moved it to {moved}, "
              + ("using the previous one" if left else
                 "and no other checkpoint is left"), flush=True)
    return None

  def _set_aside(self, step: int) -> pathlib.Path:
    src = self.directory / str(step)
    dest = self.workdir / "corrupt" / f"{step}-{int(time.time())}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.exists():
      shutil.move(str(src), str(dest))
    self._manager.close()
    self._manager = self._make()
    return dest

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def open_existing(workdir: str | pathlib.Path, verb: str) -> Checkpoints:
  """The checkpoints of an existing run, to read (`verb`: what the caller
  does with them, for messages). Creates nothing.

  Raises:
    errors.MissingInputError: no such workdir.
    errors.InputError: it holds no checkpoint.
  """
  workdir = pathlib.Path(workdir)
  flag = errors.option("workdir", "--workdir")
  if not workdir.is_dir():
    raise errors.MissingInputError(f"{flag} {workdir}: no such training "
                                   "workdir")
  if not (workdir / "checkpoints").is_dir():
    raise errors.InputError(f"{flag} {workdir}: no checkpoint to {verb} "
                            "(train first, or check the path)")
  ckpts = Checkpoints(workdir, asynchronous=False, create=False)
  if ckpts.latest_step() is None:
    ckpts.close()
    raise errors.InputError(f"{flag} {workdir}: no checkpoint to {verb} "
                            "(train first, or check the path)")
  return ckpts


def restore_existing(workdir: str | pathlib.Path, abstract_state,
                     verb: str) -> tuple[int, Any, dict, dict]:
  """The newest readable checkpoint of an existing run (`open_existing`,
  then `Checkpoints.restore_latest`): (step, state, data, config).

  Raises:
    errors.RunError: every checkpoint is unreadable (they are set aside in
      workdir/corrupt).
  """
  workdir = pathlib.Path(workdir)
  ckpts = open_existing(workdir, verb)
  try:
    restored = ckpts.restore_latest(abstract_state)
  finally:
    ckpts.close()
  if restored is None:
    raise errors.RunError(f"{workdir}: no readable checkpoint (the "
                          f"unreadable ones are in {workdir / 'corrupt'})")
  return restored


def _reason(e: BaseException) -> str:
  """The first line of a restore error, short: tensorstore's messages run
  to several lines of paths and JSON."""
  text = " ".join((str(e) or type(e).__name__).split())
  if len(text) > 160:
    text = text[:157] + "..."
  return f"{type(e).__name__}: {text}"


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
  """Silences the libraries' logging of a failed restore (Orbax and absl
  log each failed read with its traceback, about a hundred lines); the
  fallback prints its own one-line warning instead."""
  loggers = [logging.getLogger(name) for name in ("absl", "orbax",
                                                   "jax", "tensorstore")]
  levels = [lg.level for lg in loggers]
  try:
    for lg in loggers:
      lg.setLevel(logging.CRITICAL)
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)
