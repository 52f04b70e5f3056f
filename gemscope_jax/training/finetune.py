"""`finetune(c, workdir)`: end-to-end (KL) fine-tuning of a trained SAE,
transcoder or JumpReLU CLT, or of a group's dictionaries as one
replacement model.

A CLT is fine-tuned as the replacement model it is: every layer's mlp_out
replaced at once, each layer's latents read from the mlp_in its pass
computed (`finetune_step.FinetuneStep`), so the KL's gradient reaches
each layer through every later one.

A group (`group.layers`, e.g. a transcoder per layer) is fine-tuned with
every member spliced in at once (`finetune_step.GroupFinetuneStep`): for
transcoders the KL is that of the replacement model, each transcoder
reading the `mlp_in` the earlier ones produced, which is what its
held-out evaluation reports as `replacement_loss`. Transcoders trained on
clean activations alone extrapolate badly to those inputs (README:
18 layers diverge to 480 nats in-pass); this is the fix.

With `finetune.splice='alone'` each member is instead spliced alone into
the clean model (a pass and a KL each, `GroupSettings.alone`): what each
member's own `spliced_loss` and circuit tracing's local replacement
measure (README: four transcoders at L0* 20 went from 59/75/76/31 % to
87/88/84/68 % of their MLP's loss recovered in 60 steps).

The sequence (the `gemscope finetune` command, `experiments/
jumprelu_270m_kl.py` for the main job's SAE, `experiments/
replacement_270m_kl.py` for 18 transcoders):
1. The config: the source run's saved config (its newest checkpoint's) with
   this run's `finetune` section and any `eval` overrides
   (`load_config`); `finetune_plan` reads and checks the new section.
2. The source's newest checkpoint is restored (its parameters and input
   scale; a fresh Adam state on the fine-tuning schedule), or this
   workdir's own newest checkpoint when it has one (a rerun resumes).
3. "Before": the source's held-out evaluation, reused from its
   metrics.json when that was written for the same checkpoint with the same
   eval settings, else run now (`training.heldout`, the main job's own
   evaluation); kept in workdir/before/metrics.json.
4. The loop: batches of whole token windows of the source's training text
   (`OrdinaryWindows`: every position after BOS an ordinary token), one
   `finetune_step.FinetuneStep` each; progress bar (tokens/s, ETA, KL,
   L0), metrics.jsonl, Orbax checkpoints every `checkpoint_every_steps`.
5. The end: export/ (Gemma Scope 2 layout) and the same held-out
   evaluation -> workdir/metrics.json, with the "before" figures beside it
   (`before_l0`, `before_delta_lm_loss`, ...). metrics.json is written
   last and atomically: a workdir without it is unfinished.

The workdir is an ordinary training workdir (the checkpoints hold a
`TrainState` of the source's shape), so `gemscope eval`, `export`,
`dashboard` and `--steer` read it as they read the source.

Caveat: one device (no mesh), the plain-text corpora (`data.format`
'text'); crosscoders and TopK CLTs (spliced from the clean pass) are not
taken. About 15 s per step of 4 x 127 tokens for the 270M on 2 CPU cores
(two full passes with the 262k-token unembedding, and a backward pass
through the later layers; for 18 transcoders through all of them, 10-15
s).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from gemscope_jax import assets, errors
from gemscope_jax.data import pipeline
from gemscope_jax.evals import evaluate as eval_lib
from gemscope_jax.text import corpora
from gemscope_jax.text.tokenizer import default_tokenizer
from gemscope_jax.text.windows import ordinary_mask, special_mask
from gemscope_jax.training import checkpoints as ckpt_lib
from gemscope_jax.training import export as export_lib
from gemscope_jax.training import heldout, optim, plans, schema, sources
from gemscope_jax.training import workdir as workdir_lib
from gemscope_jax.training import trainer
from gemscope_jax.training.finetune_step import (
    FinetuneStep, GroupFinetuneStep, GroupSettings, StepSettings)
from gemscope_jax.training.loop import MetricsLog
from gemscope_jax.training.overrides import apply_overrides
from gemscope_jax.training.step import Run, TrainingDiverged

# What may change when a fine-tuning run resumes (the rest of `finetune`
# decides what the saved state means).
RESUMABLE_FIELDS = ("num_tokens", "checkpoint_every_steps", "log_every_steps")

# The metrics a "before" and "after" comparison shows.
COMPARED = ("l0", "fvu", "delta_lm_loss", "loss_recovered", "dead_fraction",
            "dense_fraction", "dense_l0", "clean_loss", "spliced_loss",
            "replacement_loss", "replacement_loss_recovered",
            "clean_input_spliced_loss", "clean_input_loss_recovered")


@dataclasses.dataclass(frozen=True)
class FinetunePlan:
  """The `finetune` section, read and checked.

  Attributes:
    source: the trained workdir it starts from.
    beta: the KL term's weight (0: MSE and sparsity only).
    splice: a group's members spliced 'together' (one KL, the
      replacement model's) or each 'alone' (a KL each).
    windows_per_step: token windows per step.
    tokens_per_step: ordinary tokens per step (windows x (seq_len - 1)).
    num_steps: steps in the run.
    optimizer: Adam and its schedule (the source's beta2 and clipping,
      this section's beta1, learning rate and schedule).
    optimizer_state: 'source' (continue the source's Adam moments, the
      schedule restarted) or 'fresh'.
    checkpoint_every_steps, log_every_steps, keep_checkpoints: as named.
  """
  source: str
  beta: float
  splice: str
  windows_per_step: int
  tokens_per_step: int
  num_steps: int
  optimizer: plans.OptimizerPlan
  optimizer_state: str
  checkpoint_every_steps: int
  log_every_steps: int
  keep_checkpoints: int


def _need(ok: bool, field: str, message: str, value: Any) -> None:
  if not ok:
    raise ValueError(f"config.finetune.{field}: {message}, got {value!r}")


def finetune_plan(c: ml_collections.ConfigDict) -> FinetunePlan:
  """Reads `c.finetune` (with the source's `data.seq_len`, `train.beta2`
  and clipping); raises ValueError naming a bad field."""
  f, t = c.finetune, c.train
  _need(bool(f.source), "source", "is required: the trained workdir to "
        "start from", f.source)
  _need(f.beta >= 0, "beta", "must be >= 0", f.beta)
  _need(f.get("splice", "together") in ("together", "alone"), "splice",
        "must be 'together' or 'alone'", f.get("splice"))
  for name in ("windows_per_step", "num_tokens", "checkpoint_every_steps",
               "log_every_steps"):
    _need(isinstance(f[name], int) and f[name] > 0, name,
          "must be a positive integer", f[name])
  _need(f.lr > 0, "lr", "must be > 0", f.lr)
  _need(0 <= f.beta1 < 1, "beta1", "must be in [0, 1)", f.beta1)
  _need(f.optimizer_state in ("source", "fresh"), "optimizer_state",
        "must be 'source' or 'fresh'", f.optimizer_state)
  _need(0 <= f.lr_decay_fraction <= 1, "lr_decay_fraction",
        "must be in [0, 1]", f.lr_decay_fraction)
  tokens_per_step = f.windows_per_step * (c.data.seq_len - 1)
  num_steps = f.num_tokens // tokens_per_step
  _need(num_steps >= 1, "num_tokens", f"must cover one step "
        f"({tokens_per_step} tokens)", f.num_tokens)
  return FinetunePlan(
      source=str(f.source), beta=float(f.beta),
      splice=str(f.get("splice", "together")),
      windows_per_step=f.windows_per_step, tokens_per_step=tokens_per_step,
      num_steps=num_steps,
      optimizer=plans.OptimizerPlan(
          lr=float(f.lr), lr_warmup_steps=f.lr_warmup_steps,
          lr_decay_fraction=float(f.lr_decay_fraction),
          beta1=float(f.beta1),
          beta2=t.beta2, grad_clip_norm=float(t.get("grad_clip_norm", 0.0)),
          num_steps=num_steps),
      optimizer_state=str(f.optimizer_state),
      checkpoint_every_steps=f.checkpoint_every_steps,
      log_every_steps=f.log_every_steps,
      keep_checkpoints=t.keep_checkpoints)


def _saved_config(workdir: pathlib.Path, verb: str) -> dict:
  ckpts = ckpt_lib.open_existing(workdir, verb)
  try:
    saved = ckpts.newest_config()
  finally:
    ckpts.close()
  if saved is None:
    raise errors.RunError(f"{workdir}: no readable checkpoint (every "
                          "checkpoint's config is damaged)")
  return saved[1]


def load_config(source: str | pathlib.Path,
                finetune: ml_collections.ConfigDict | dict | None = None,
                overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The fine-tuning run's config.

  Args:
    source: the trained workdir (its newest checkpoint's config is the
      base: model, hookpoint, dictionary, data, eval).
    finetune: the `finetune` section (default: the schema's); its
      `source` is set to `source`.
    overrides: `finetune.*` and `eval.*` changes ({'finetune.beta': 0});
      any other field would change what the restored state means.

  Raises:
    errors.MissingInputError / InputError: no such workdir or checkpoint.
    errors.UsageError: an override outside finetune.* and eval.*.
  """
  source = pathlib.Path(source)
  c = schema.from_json(_saved_config(source, "fine-tune"))
  if finetune is not None:
    c.finetune.update(dict(finetune))
  c.finetune.source = str(source)
  for key in overrides or {}:
    if not key.startswith(("finetune.", "eval.")):
      raise errors.UsageError(
          f"--set {key}: fine-tuning changes only finetune.* and eval.* "
          f"fields; the rest comes from the source run {source}")
  if overrides:
    c = apply_overrides(c, overrides)
  return c


class OrdinaryWindows:
  """The windows of a `pipeline.TokenWindowSource` whose every position
  after BOS holds an ordinary token (no padding, no special token), so
  every batch has the same number of ordinary tokens (a static shape for
  the step's MSE rows). Drops the stream's last, short window and any
  window with a special token inside."""

  def __init__(self, source: pipeline.TokenWindowSource, tokenizer):
    body = source.seq_len - 1
    n = source.ids.size // body
    special = special_mask(tokenizer, source.ids[:n * body]).reshape(n, body)
    self.source = source
    self.indices = np.flatnonzero(~special.any(axis=1))
    if not self.indices.size:
      raise ValueError("the training text holds no whole window of "
                       f"{source.seq_len} tokens without special tokens")

  def __len__(self) -> int:
    return int(self.indices.size)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.source[int(self.indices[index])]


def _batches(plan: plans.Plan, ft: FinetunePlan, tokenizer, progress: bool):
  """Random access to step i's batch: {'tokens', 'mask', 'keep', 'rows'}."""
  if plan.data.format != "text":
    raise errors.UsageError(f"config.data.format: fine-tuning reads plain "
                            f"text only, got {plan.data.format!r}")
  files = corpora.text_files(plan.data.text, "config.data.text")
  source = pipeline.TokenWindowSource.from_files(
      tokenizer, files, plan.data.seq_len, progress=progress)
  ds = pipeline.make_window_dataset(
      OrdinaryWindows(source, tokenizer), batch_size=ft.windows_per_step,
      seed=plan.data.seed, shuffle=plan.data.shuffle_windows,
      num_epochs=None)

  def batch(i: int) -> dict[str, jax.Array]:
    b = ds[i]
    keep = ordinary_mask(tokenizer, b["tokens"], b["mask"])
    rows = np.flatnonzero(keep).astype(np.int32)
    assert rows.size == ft.tokens_per_step, (rows.size, ft.tokens_per_step)
    return {"tokens": jnp.asarray(b["tokens"]), "mask": jnp.asarray(b["mask"]),
            "keep": jnp.asarray(keep), "rows": jnp.asarray(rows)}
  return batch


def _check_resumable(saved: dict, config_json: dict,
                     workdir: pathlib.Path) -> None:
  workdir_lib.check_resumable(saved, config_json, workdir)
  old, new = saved.get("finetune", {}), config_json["finetune"]
  default = schema.default_config().finetune  # fields older runs lack
  for key in sorted(set(old) | set(new)):
    if key not in RESUMABLE_FIELDS and (
        old.get(key, default.get(key)) != new.get(key, default.get(key))):
      raise errors.UsageError(
          f"config.finetune.{key}: {workdir} holds a fine-tuning run with "
          f"{key}={old.get(key)!r}, this one has {new.get(key)!r}; resume "
          "with the original value or use a new workdir")


def _source_state(run: Run, source: pathlib.Path):
  step, state, _, saved = ckpt_lib.restore_existing(
      source, run.abstract_state, "fine-tune")
  return step, state, saved


def same_eval(theirs: dict, ours: dict) -> bool:
  """Whether two configs' `eval` blocks (JSON) describe one evaluation;
  a field added to eval.* since one of them was written counts as its
  default (`eval.loss_windows`: 'leading', what every earlier run did)."""
  defaults = schema.to_json(schema.default_config())["eval"]
  canonical = lambda e: json.dumps({**defaults, **e}, sort_keys=True)
  return canonical(theirs) == canonical(ours)


def _before(run: Run, state, source_step: int, source_config: dict,
            source: pathlib.Path, gemma_params, tokenizer,
            workdir: pathlib.Path, progress: bool) -> dict[str, Any]:
  """The source's held-out metrics (workdir/before/metrics.json)."""
  folder = workdir / "before"
  path = folder / "metrics.json"
  if path.is_file():
    return json.loads(path.read_text())
  folder.mkdir(exist_ok=True)
  theirs = source / "metrics.json"
  if theirs.is_file():
    metrics = json.loads(theirs.read_text())
    if (metrics.get("step") == source_step
        and same_eval(source_config.get("eval", {}),
                      run.plan.config_json["eval"])):
      if progress:
        print(f"before: {theirs} (the same checkpoint, the same evaluation)",
              flush=True)
      eval_lib.write_metrics(metrics, path)
      return metrics
  return trainer.evaluate_run(run, state, gemma_params, tokenizer, folder,
                              progress=progress)


def _initial_state(source_state, tx, optimizer_state: str, *,
                   stacked: bool = False):
  """The source's parameters and scales at step 0, with the source's Adam
  moments and a restarted learning-rate schedule ('source'), or a fresh
  optimiser state ('fresh'); `stacked`: a group's stack, every array with
  a leading member axis (one optimiser state per member)."""
  if optimizer_state == "fresh":
    init = jax.vmap(tx.init) if stacked else tx.init
    opt_state = init(source_state.params)
  else:
    is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)
    opt_state = jax.tree.map(
        lambda s: (s._replace(count=jnp.zeros_like(s.count))
                   if is_schedule(s) else s),
        source_state.opt_state, is_leaf=is_schedule)
  return source_state.replace(
      step=jnp.zeros_like(source_state.step), opt_state=opt_state,
      last_fired=jnp.zeros_like(source_state.last_fired))


def finetune(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
             progress: bool = True, evaluate: bool = True) -> dict[str, Any]:
  """Fine-tunes the SAE of `c.finetune.source` end to end into `workdir`.

  Args:
    c: a config from `load_config` (the source's, with `finetune` set).
    workdir: where checkpoints, logs, export/, before/metrics.json and
      metrics.json go; rerunning resumes.
    progress: show progress bars.
    evaluate: run the held-out evaluations before and after.

  Returns:
    {'step', 'train_{metric}' of the last logged step, and with `evaluate`
    the after metrics plus 'before_{metric}' for `COMPARED`}.

  Raises:
    ValueError: a bad `finetune` field (named).
    errors.UsageError: a group, a non-SAE source, or a resume that changes
      a fine-tuning field.
    errors.OutputError: the workdir is the source, a file, or someone
      else's folder.
    TrainingDiverged: a non-finite loss or gradient.
  """
  ft = finetune_plan(c)
  plan = plans.make(c)
  source = pathlib.Path(ft.source)
  first = plan.dictionaries[0]
  clean_mode = (not plan.group and first.layout.kind == "clt"
                and first.architecture != "jumprelu_clt")
  if plan.kind not in (("sae", "transcoder") if plan.group
                       else ("sae", "transcoder", "clt")) or clean_mode:
    raise errors.UsageError(
        f"{source}: fine-tuning takes one SAE, transcoder or JumpReLU CLT, "
        f"or a group of SAEs or transcoders; this run trains "
        f"{'a group of ' if plan.group else 'a '}"
        f"{first.architecture if clean_mode else plan.kind}")
  workdir = pathlib.Path(workdir)
  if workdir.resolve() == source.resolve():
    raise errors.OutputError(f"--workdir {workdir}: the source run itself; "
                             "fine-tune into a new folder")
  workdir = workdir_lib.check_workdir(workdir)
  run = trainer.make_run(plan)
  tx = optim.make_optimizer(ft.optimizer)
  config_json = dict(plan.config_json)

  source_step, source_state, source_config = _source_state(run, source)
  ckpts = ckpt_lib.Checkpoints(workdir, max_to_keep=ft.keep_checkpoints)
  saved = ckpts.newest_config() if ckpts.latest_step() is not None else None
  if saved is not None:
    _check_resumable(saved[1], config_json, workdir)
  with assets.atomic_path(workdir / "config.json") as tmp:
    tmp.write_text(json.dumps(config_json, indent=2))

  tokenizer = default_tokenizer()
  gemma_params = sources.load_gemma(plan)
  before = {}
  if evaluate:
    before = _before(run, source_state, source_step, source_config, source,
                     gemma_params, tokenizer, workdir, progress)

  restored = (ckpts.restore_latest(run.abstract_state) if saved is not None
              else None)
  if restored is None:
    start, state = 0, (
        {k: _initial_state(st, tx, ft.optimizer_state, stacked=True)
         for k, st in source_state.items()} if plan.group
        else _initial_state(source_state, tx, ft.optimizer_state))
  else:
    start, state = restored[0], restored[1]
    if progress:
      print(f"resuming from step {start} in {ckpts.directory}", flush=True)
  # The source's state (with its Adam moments: 4x the parameters, 7.6 GB
  # for an 18-layer CLT of width 2048) is not needed past this point.
  del source_state, restored
  batch = _batches(plan, ft, tokenizer, progress)
  if plan.group:
    fstep = GroupFinetuneStep(run, tx, GroupSettings(
        beta=ft.beta, sparsity_coeff=plan.step.sparsity_coeff,
        unit_decoder=plan.step.unit_decoder, dtype=plan.model.dtype,
        alone=ft.splice == "alone"))
  else:
    fstep = FinetuneStep(run.module, tx, plan.model.config, StepSettings(
        hookpoint=plan.hookpoint, beta=ft.beta,
        sparsity_coeff=plan.step.sparsity_coeff,
        unit_decoder=plan.step.unit_decoder, dtype=plan.model.dtype,
        layout=run.layout))

  step, state, last = _run_steps(ft, fstep, state, gemma_params, batch,
                                 ckpts, config_json, workdir, start=start,
                                 progress=progress)
  result = {"step": step, **{f"train_{k}": v for k, v in last.items()}}
  state = jax.device_get(state)
  trainer.export_run(run, state, workdir)
  if not evaluate:
    return result
  after = trainer.evaluate_run(run, state, gemma_params, tokenizer, workdir,
                               progress=progress)
  # Latents silent over the last dead_after_tokens of fine-tuning (NaN for
  # a run shorter than that).
  last_fired = (np.concatenate([np.asarray(st.last_fired).reshape(-1)
                                for st in state.values()]) if plan.group
                else np.asarray(state.last_fired))
  silent = (step - last_fired) * ft.tokens_per_step
  dead = (float(np.mean(silent >= plan.step.dead_after_tokens))
          if step * ft.tokens_per_step >= plan.step.dead_after_tokens
          else math.nan)
  after.update({
      "train_dead_fraction": dead,
      "trained_tokens": step * ft.tokens_per_step,
      "finetune_source": str(source), "finetune_source_step": source_step,
      "finetune_beta": ft.beta, "finetune_steps": step,
      "finetune_tokens": step * ft.tokens_per_step,
      **{f"before_{k}": before.get(k) for k in COMPARED if k in before}})
  eval_lib.write_metrics(after, workdir / "metrics.json")
  result.update(after)
  return result


def _run_steps(ft: FinetunePlan, fstep: FinetuneStep, state, gemma_params,
               batch, ckpts: ckpt_lib.Checkpoints, config_json: dict,
               workdir: pathlib.Path, *, start: int, progress: bool
               ) -> tuple[int, Any, dict]:
  """Steps from `start` to the end, logging and checkpointing.

  Returns:
    (final step, final state, last logged metrics).
  """
  metrics_log = MetricsLog(workdir, start)
  n = ft.tokens_per_step
  bar = tqdm(total=ft.num_steps * n, initial=start * n, unit="tok",
             unit_scale=True, desc="finetune", disable=not progress,
             dynamic_ncols=True, smoothing=0.3)
  step, last, t0 = start, {}, time.perf_counter()
  try:
    while step < ft.num_steps:
      state, metrics = fstep.step(state, gemma_params, batch(step))
      step += 1
      bar.update(n)
      save = step % ft.checkpoint_every_steps == 0 or step == ft.num_steps
      if step % ft.log_every_steps == 0 or save:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not last.pop("finite"):
          raise TrainingDiverged(
              f"loss {last['loss']} / gradient norm {last['grad_norm']} at "
              f"step {step}: fine-tuning stopped; the last good checkpoint "
              f"is step {ckpts.latest_step()} in {ckpts.directory}")
        last["lr"] = float(optim.lr_schedule(ft.optimizer)(step - 1))
        last["tokens_per_s"] = (step - start) * n / (time.perf_counter()
                                                     - t0)
        metrics_log.write(step, last)
        bar.set_postfix(kl=f"{last.get('kl', math.nan):.3f}",
                        mse=f"{last['mse']:.4f}",
                        l0=f"{last.get('l0', 0):.1f}")
      if save:
        ckpts.save(step, state, {"step": step}, config_json)
  finally:
    bar.close()
    metrics_log.close()
    ckpts.wait()
  ckpts.close()
  return step, state, last
