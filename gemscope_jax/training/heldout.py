"""The held-out evaluation at the end of a run (and of `gemscope eval
--workdir`): the trained state handed to `evals`, the result written as
workdir/metrics.json with a latent-frequency plot.

A single run reports the metrics of `evals.evaluate.evaluate`; a group
reports `{member}/{metric}` per member, the means under the plain names,
and for a group of transcoders the replacement model (every member in
place of its MLP at once).

Caveat: the loss passes are full forwards with the unembedding: the cost of
an evaluation is mostly `eval.loss_tokens`, not `eval.num_tokens`.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import models
from gemscope_jax.evals import evaluate as eval_lib
from gemscope_jax.surgery import splice as splice_lib
from gemscope_jax.text import conversations, corpora
from gemscope_jax.text.windows import Windows, for_loss, windows_from_files
from gemscope_jax.training import export as export_lib
from gemscope_jax.training.plans import Plan
from gemscope_jax.training.step import Run


def eval_windows(plan: Plan, tokenizer) -> Windows:
  """The held-out windows the plan's `eval` fields name."""
  e = plan.eval
  files = corpora.text_files(e.text, "config.eval.text")
  if e.format == "chat_jsonl":
    windows = conversations.windows_from_conversations(
        tokenizer, files, e.seq_len, e.num_tokens)
  else:
    windows = windows_from_files(tokenizer, files, e.seq_len, e.num_tokens)
  return for_loss(windows, e.loss_tokens, e.loss_windows, e.batch_size)


def _dead_fraction(plan: Plan, step: int, last_fired) -> float:
  """Latents silent over the last dead_after_tokens of training."""
  silent = (step - np.asarray(last_fired)) * plan.step.batch_size
  return float(np.mean(silent >= plan.step.dead_after_tokens))


def evaluate_run(run: Run, state, gemma_params, tokenizer,
                 workdir: pathlib.Path, *, progress: bool = True
                 ) -> dict[str, Any]:
  """Held-out evaluation of one dictionary -> workdir/metrics.json and
  workdir/latent_frequency.png."""
  plan, d, e = run.plan, run.dictionary, run.plan.eval
  result = eval_lib.evaluate(
      model_config=run.model_config, model_params=gemma_params,
      hookpoint=plan.hookpoint, module=run.module,
      params=jax.device_get(state.params),
      norm_scale=np.asarray(state.norm_scale),
      target_scale=np.asarray(state.target_scale), layout=run.layout,
      windows=eval_windows(plan, tokenizer), tokenizer=tokenizer,
      batch_size=e.batch_size, dtype=jnp.dtype(plan.model.dtype),
      dense_threshold=e.dense_threshold, progress=progress,
      loss_tokens=e.loss_tokens, prefixes=e.prefixes)
  step = int(state.step)
  metrics = {**result.metrics, "step": step,
             "train_dead_fraction": _dead_fraction(plan, step,
                                                   state.last_fired),
             "trained_tokens": step * plan.step.batch_size,
             "target_l0": d.config.target_l0, "eval_text": e.text,
             "loss_windows": e.loss_windows,
             "hookpoint": plan.hookpoint, "kind": run.layout.kind,
             "inputs": ",".join(run.layout.inputs),
             "targets": ",".join(run.layout.targets)}
  eval_lib.plot_frequency_histogram(
      result.frequency, workdir / "latent_frequency.png",
      title=f"{run.layout.name} {d.architecture} {d.config.d_sae}: latent "
      "firing frequency")
  eval_lib.write_metrics(metrics, workdir / "metrics.json")
  return metrics


def evaluate_group(run, state: dict, gemma_params, tokenizer,
                   workdir: pathlib.Path, *, progress: bool = True
                   ) -> dict[str, Any]:
  """Held-out evaluation of every member of a `group.GroupRun` ->
  workdir/metrics.json, and a firing-frequency plot beside each member's
  export.

  Entries `{member}/{metric}` (the metrics of `evals.evaluate`; members
  named as `Layout.name`), the means over members under the plain names,
  and for a group of transcoders the replacement model (every member
  replacing its MLP at once): `replacement_loss`,
  `replacement_delta_lm_loss`, `replacement_loss_recovered` (against every
  MLP output zeroed).
  """
  plan, e = run.plan, run.plan.eval
  members, trained = [], {}
  for stack, _, member, s in run.members(state):
    lay = member.layout
    members.append(splice_lib.Member(
        name=lay.name, layout=lay, module=stack.template.module,
        params=s.params, norm_scale=s.norm_scale,
        target_scale=s.target_scale))
    trained[lay.name] = (member, s.last_fired, int(s.step))
  members.sort(key=lambda m: [models.hooks.parse(h)
                              for h in m.layout.inputs])
  results, shared = eval_lib.evaluate_members(
      members, model_config=run.model_config, model_params=gemma_params,
      windows=eval_windows(plan, tokenizer), tokenizer=tokenizer,
      batch_size=e.batch_size, dtype=jnp.dtype(plan.model.dtype),
      dense_threshold=e.dense_threshold, progress=progress,
      loss_tokens=e.loss_tokens, prefixes=e.prefixes,
      replacement=plan.kind == "transcoder" and len(members) > 1)
  per = {}
  for name, r in results.items():
    member, last_fired, step = trained[name]
    per[name] = {**r.metrics,
                 "train_dead_fraction": _dead_fraction(plan, step,
                                                       last_fired)}
    folder = export_lib.export_dir(workdir, member.layout)
    folder.mkdir(parents=True, exist_ok=True)
    eval_lib.plot_frequency_histogram(
        r.frequency, folder / "latent_frequency.png",
        title=f"{name} {member.architecture} {member.config.d_sae}: "
        "latent firing frequency")
  metrics: dict[str, Any] = {}
  for k in ("l0", "fvu", "dead_fraction", "delta_lm_loss",
            "loss_recovered"):
    vals = [m[k] for m in per.values() if not math.isnan(m[k])]
    metrics[k] = float(np.mean(vals)) if vals else math.nan
  for name, m in per.items():
    metrics.update({f"{name}/{k}": v for k, v in m.items()})
  step = next(iter(trained.values()))[2]
  first = plan.dictionaries[0]
  metrics.update(shared)
  metrics.update({
      "step": step, "trained_tokens": step * plan.step.batch_size,
      "target_l0": first.config.target_l0, "eval_text": e.text,
      "loss_windows": e.loss_windows,
      "hookpoints": ",".join(run.hookpoints),
      "members": ",".join(m.name for m in members)})
  eval_lib.write_metrics(metrics, workdir / "metrics.json")
  return metrics
