"""The training loop: step, log, checkpoint, for single and group runs.

Metrics go to a progress bar (activations/s, ETA, L0, FVU, dead latents),
workdir/metrics.jsonl and TensorBoard (when tensorboardX is installed).

Caveat: the finiteness check runs at log and checkpoint steps (reading a
scalar every step would serialise the device queue), so a run may compute
up to `log_every_steps` steps past a NaN before it stops; none is saved.
"""

from __future__ import annotations

import json
import pathlib
import time

from tqdm.auto import tqdm

from gemscope_jax import assets
from gemscope_jax.parallel import distributed
from gemscope_jax.training import checkpoints as ckpt_lib
from gemscope_jax.training.plans import LoopPlan
from gemscope_jax.training.step import TrainingDiverged


class MetricsLog:
  """metrics.jsonl in the workdir, plus TensorBoard if tensorboardX exists."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self.file = self.tb = None
    if not distributed.is_main_process():
      return  # process 0 writes the run's metrics
    if self.path.exists():
      # Rows past the resumed step describe a timeline that is replayed.
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      with assets.atomic_path(self.path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
    self.file = open(self.path, "a", encoding="utf-8")
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel  (optional: tensorboardX)
      self.tb = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
    except ImportError:
      self.tb = None

  def write(self, step: int, row: dict) -> None:
    if self.file is None:
      return
    self.file.write(json.dumps({"step": step, **row}) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in row.items():
        if isinstance(v, (int, float)):
          self.tb.add_scalar(f"train/{k}", v, step)

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
    if self.tb is not None:
      self.tb.close()


def _progress_bar(p: LoopPlan, start_step: int, progress: bool):
  b = p.batch_size
  return tqdm(total=p.num_steps * b, initial=start_step * b, unit="act",
              unit_scale=True, desc="train",
              disable=not (progress and distributed.is_main_process()),
              dynamic_ncols=True, smoothing=0.1)


def run_steps(p: LoopPlan, run, state, batches, ckpts: ckpt_lib.Checkpoints,
              config_json: dict, workdir: pathlib.Path, *, start_step: int,
              t0: float, progress: bool):
  """Steps `run` from `start_step` to the end, logging and checkpointing.

  Args:
    p: the loop's plan (steps, batch size, log and checkpoint cadence).
    run: a `step.Run` or `group.GroupRun` (`feed`, `step`, `host_metrics`).
    state: the train state at `start_step`.
    batches: the activation batches (restorable position); with several
      processes every one saves the union of their positions.
    ckpts: the workdir's `Checkpoints`; closed on return.
    config_json: the config as saved beside each checkpoint.
    workdir: where metrics.jsonl goes.
    start_step: the step `state` is at.
    t0: when the end-to-end activations/s clock started.
    progress: show the progress bar.

  Returns:
    (final step, final state, last logged metrics).

  Raises:
    TrainingDiverged: a non-finite loss or gradient, naming the last good
      checkpoint.
  """
  metrics_log = MetricsLog(workdir, start_step)
  bar = _progress_bar(p, start_step, progress)
  acts_done, last, step = 0, {}, start_step
  try:
    while step < p.num_steps:
      state, metrics = run.step(state, run.feed(next(batches)))
      step += 1
      acts_done += p.batch_size
      bar.update(p.batch_size)
      save = step % p.checkpoint_every_steps == 0 or step == p.num_steps
      if step % p.log_every_steps == 0 or save:
        try:
          last = run.host_metrics(metrics, step)
        except TrainingDiverged as e:
          raise TrainingDiverged(
              f"{e}; the last good checkpoint is step {ckpts.latest_step()} "
              f"in {ckpts.directory}") from None
        elapsed = time.perf_counter() - t0
        last["acts_per_s"] = acts_done / max(elapsed, 1e-9)
        last["tokens"] = step * p.batch_size
        metrics_log.write(step, last)
        bar.set_postfix(l0=f"{last.get('l0', 0):.1f}",
                        fvu=f"{last.get('fvu', 0):.3f}",
                        dead=f"{last['dead_fraction']:.2f}")
      if save:
        ckpts.save(step, state,
                   distributed.gather_data_state(batches.get_state()),
                   config_json)
  finally:
    bar.close()
    metrics_log.close()
    ckpts.wait()
  ckpts.close()
  return step, state, last
