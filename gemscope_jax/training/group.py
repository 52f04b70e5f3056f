"""Many dictionaries from one Gemma pass: e.g. a resid_post SAE per layer.

`train(config, workdir)` is what `trainer.train` runs when the config sets
`group.layers` / `group.sites` (see `config.hookpoints`). The pieces:

- Members: one dictionary per hookpoint. Members whose dictionaries have
  the same shape (the same input width) form a *stack*: every array of
  their train states gains a leading 'dict' axis, and the single-dictionary
  step of `trainer.Run` is `jax.vmap`ped over it, so one jitted, donated
  step trains the whole stack. The 'dict' axis is replicated (rule
  ('dict', None)); the latent axis stays on the mesh's 'model' axis and the
  batch on 'data', as for one dictionary. Each member has its own input
  scale and initial b_dec (from its hookpoint's part of the first bucket),
  its own Adam state and its own last-fired counters.
- Data: one `stream.HarvestSource` over all hookpoints, so each batch of
  windows costs one Gemma forward (to the deepest layer needed). A bucket's
  rows are the same tokens at every hookpoint and one permutation shuffles
  them all, so each member sees exactly the batches a single-dictionary
  run at its hookpoint would see.
- Checkpoints: one Orbax checkpoint {stack: stacked TrainState} plus the
  stream position and the config; rerunning resumes as for one dictionary.
- Metrics: metrics.jsonl rows hold `{hookpoint}/{metric}` per member (e.g.
  `layer_6/resid_post/l0`) and the mean over members under the plain name
  (`l0`, `fvu`, ...), which the progress bar shows.
- Export: member `layer_L/site` goes to `workdir/export/{site}/layer_{L}/`
  (a Gemma Scope 2 params folder, as `interop.from_state` builds it).
- Evaluation: one forward per eval batch records every hookpoint for the
  reconstruction statistics; the loss passes edit all hookpoints with one
  compiled program whose masks splice or zero one member at a time (clean
  once, then two passes per member). metrics.json holds
  `{hookpoint}/{metric}` entries and the means.

Caveat: every member is initialised from the same key (`config.seed`), as
a single run at its hookpoint would be, so members of a stack start with
identical encoder/decoder weights (their b_dec and scales differ); and the
loss passes of evaluation cost 1 + 2 x members full forwards per batch.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gemscope_jax import models
from gemscope_jax.data import stream
from gemscope_jax.training import checkpoints as ckpt_lib
from gemscope_jax.training import config as config_lib
from gemscope_jax.training import trainer

# Means over members shown in the progress bar and logged under plain names.
MEAN_KEYS = ("loss", "mse", "l0", "fvu", "dead_fraction", "grad_norm")


def member_config(c: ml_collections.ConfigDict, hookpoint: str
                  ) -> ml_collections.ConfigDict:
  """The single-dictionary config of one member: `c` at `hookpoint`."""
  m = config_lib.from_json(config_lib.to_json(c))
  m.hookpoint = hookpoint
  m.group.layers = None
  m.group.sites = None
  return m


def _stacked(spec: PartitionSpec) -> PartitionSpec:
  return PartitionSpec("dict", *spec)


@dataclasses.dataclass
class Stack:
  """Members of one shape, trained by one vmapped step.

  Attributes:
    names: the members' hookpoints, in stack order.
    template: a `trainer.Run` for the first member (module, optimizer,
      mesh, unbatched step); every member shares its shapes.
    state_sharding, abstract_state: of the stacked TrainState.
    batch_sharding: of a (members, batch, d_in) input.
    step: jitted, donated (state, x) -> (state, {metric: (members,)}).
    init: jitted (key, b_decs, scales) -> stacked state.
  """
  names: list[str]
  template: trainer.Run
  state_sharding: Any = None
  abstract_state: Any = None
  batch_sharding: Any = None
  step: Any = None
  init: Any = None

  def __post_init__(self):
    run = self.template
    n = len(self.names)
    d_in = run.dict_config.d_in
    abstract = jax.eval_shape(
        run._boxed_state, jax.random.key(0),  # pylint: disable=protected-access
        jax.ShapeDtypeStruct((d_in,), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32))
    specs = jax.tree.map(_stacked, nn.get_partition_spec(abstract),
                         is_leaf=lambda x: isinstance(x, PartitionSpec))
    rules = run.rules + (("dict", None),)
    self.state_sharding = nn.logical_to_mesh_sharding(specs, run.mesh, rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct((n, *a.shape), a.dtype, sharding=s),
        nn.unbox(abstract), self.state_sharding)
    self.batch_sharding = NamedSharding(
        run.mesh, PartitionSpec(None, dict(run.rules).get("batch"), None))
    self.step = jax.jit(jax.vmap(run._step),  # pylint: disable=protected-access
                        in_shardings=(self.state_sharding,
                                      self.batch_sharding),
                        out_shardings=(self.state_sharding, None),
                        donate_argnums=0)

    def init(key, b_decs, scales):
      one = lambda b, s: nn.unbox(run._boxed_state(key, b, s))  # pylint: disable=protected-access
      return jax.vmap(one)(b_decs, scales)
    self.init = jax.jit(init, out_shardings=self.state_sharding)

  def member_state(self, state, i: int) -> trainer.TrainState:
    """Member i's (unstacked, host) TrainState."""
    return jax.tree.map(lambda a: np.asarray(a)[i], jax.device_get(state))

  def member_run(self, i: int):
    """What `interop.from_state` reads of a Run, for member i."""
    run = self.template
    return types.SimpleNamespace(
        c=member_config(run.c, self.names[i]), module=run.module,
        model_config=run.model_config, dict_config=run.dict_config)


class GroupRun:
  """The data-independent pieces of a group run: its stacks and mesh.

  Attributes:
    c: the group config.
    model_config: the Gemma config.
    hookpoints: all members, sorted by (layer, site).
    stacks: {'d_in_{width}': Stack}.
    mesh, num_steps: as `trainer.Run`'s.
  """

  def __init__(self, c: ml_collections.ConfigDict,
               model_config: models.Gemma3Config, devices=None):
    self.c = c
    self.model_config = model_config
    self.hookpoints = config_lib.hookpoints(c, model_config)
    by_width: dict[int, list[str]] = {}
    for h in self.hookpoints:
      by_width.setdefault(models.hooks.parse(h).width(model_config),
                          []).append(h)
    self.stacks = {
        f"d_in_{w}": Stack(names, trainer.Run(member_config(c, names[0]),
                                              model_config, devices))
        for w, names in sorted(by_width.items())}
    first = next(iter(self.stacks.values())).template
    self.mesh = first.mesh
    self.num_steps = first.num_steps

  @property
  def abstract_state(self) -> dict:
    return {k: s.abstract_state for k, s in self.stacks.items()}

  def init(self, bucket: stream.Bucket) -> dict:
    """The initial stacked states: scales and b_dec from `bucket`."""
    stats = stream.bucket_stats(bucket)
    state = {}
    for key, stack in self.stacks.items():
      scales, b_decs = [], []
      for h in stack.names:
        mean, sq = stats[h]
        scale = float(np.sqrt(sq))
        b_decs.append((mean / scale if self.c.train.b_dec_init == "mean"
                       else np.zeros_like(mean)).astype(np.float32))
        scales.append(np.float32(scale))
      state[key] = stack.init(jax.random.key(self.c.seed),
                              jnp.asarray(np.stack(b_decs)),
                              jnp.asarray(np.stack(scales)))
    return state

  def step(self, state: dict, batch: stream.Bucket) -> tuple[dict, dict]:
    """One step of every stack; metrics {hookpoint: {metric: value}}."""
    new, metrics = {}, {}
    for key, stack in self.stacks.items():
      x = np.stack([batch[h] for h in stack.names])
      new[key], m = stack.step(state[key],
                               jax.device_put(x, stack.batch_sharding))
      metrics[key] = m
    return new, metrics

  def host_metrics(self, metrics: dict) -> dict[str, dict[str, float]]:
    out = {}
    for key, m in jax.device_get(metrics).items():
      for i, h in enumerate(self.stacks[key].names):
        out[h] = {k: float(np.asarray(v)[i]) for k, v in m.items()}
    return out


def _row(per: dict[str, dict[str, float]]) -> dict[str, float]:
  """Flat metrics: `{hookpoint}/{metric}` plus the mean of MEAN_KEYS."""
  row = {}
  for k in MEAN_KEYS:
    vals = [m[k] for m in per.values() if k in m]
    if vals:
      row[k] = float(np.mean(vals))
  for h, m in per.items():
    row.update({f"{h}/{k}": v for k, v in m.items()})
  return row


def train(c: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          progress: bool = True, devices=None) -> dict[str, Any]:
  """Trains (or resumes) every dictionary of the group config `c`.

  Args and errors as `trainer.train`; returns the last step's training
  metrics (`train_{hookpoint}/{metric}` and the means `train_{metric}`)
  plus the evaluation's when `c.eval.at_end`.
  """
  model_config = config_lib.check(c)
  run = GroupRun(c, model_config, devices)
  workdir, ckpts, latest, config_json = trainer.open_workdir(c, workdir)

  from gemscope_jax.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = default_tokenizer()
  gemma_params = trainer.load_gemma(c, model_config)
  first = next(iter(run.stacks.values())).template
  source = trainer.make_source(c, first, gemma_params, tokenizer,
                               progress=progress, hookpoints=run.hookpoints)
  batches = stream.ActivationBatches(source, batch_size=c.train.batch_size,
                                     seed=c.seed)
  t0 = time.perf_counter()
  start_step, state = trainer.restore(ckpts, latest, run, batches)
  if state is None:
    if progress:
      print(f"harvesting the first {c.data.bucket_tokens:,} activations of "
            f"{len(run.hookpoints)} hookpoints (input scales and means)...",
            flush=True)
    state = run.init(batches.peek_bucket())

  def read(metrics, step):
    per = run.host_metrics(metrics)
    bad = [h for h, m in per.items() if not m.pop("finite")]
    if bad:
      raise trainer.TrainingDiverged(
          f"{', '.join(bad)}: non-finite loss or gradient at step "
          f"{step}: training stopped; the last good checkpoint is step "
          f"{ckpts.latest_step()} in {ckpts.directory}")
    return _row(per)

  step, state, last = trainer.run_steps(
      c, run, state, batches, ckpts, config_json, workdir,
      start_step=start_step, t0=t0, feed=lambda batch: batch, read=read,
      progress=progress)

  result = {"step": step, **{f"train_{k}": v for k, v in last.items()}}
  export(run, state, workdir)
  if c.eval.at_end:
    result.update(evaluate_state(run, state, gemma_params, tokenizer,
                                 workdir, progress=progress))
  return result


def export_dir(workdir: str | pathlib.Path, hookpoint: str) -> pathlib.Path:
  """Where member `hookpoint` is exported: export/{site}/layer_{L}."""
  hp = models.hooks.parse(hookpoint)
  return pathlib.Path(workdir) / "export" / hp.site / f"layer_{hp.layer}"


def export(run: GroupRun, state: dict, workdir: pathlib.Path
           ) -> dict[str, pathlib.Path]:
  """Writes each member's Gemma Scope 2 params folder (raw units)."""
  from gemscope_jax import interop  # pylint: disable=import-outside-toplevel
  out = {}
  for key, stack in run.stacks.items():
    for i, h in enumerate(stack.names):
      d = interop.from_state(stack.member_run(i), stack.member_state(
          state[key], i))
      out[h] = interop.save_gemmascope2(d, export_dir(workdir, h),
                                        release_layout=False)
  return out


class _Stats:
  """Running reconstruction statistics of one member (as evaluate.py)."""

  def __init__(self, d_sae: int):
    self.counts = jnp.zeros((d_sae,), jnp.int32)
    self.n = 0
    self.acc = {k: 0.0 for k in ("l0", "l0_sq", "err", "cos", "m2")}
    self.mean = np.zeros((), np.float64)

  def add(self, module, params, scale, x, keep, nb: int) -> None:
    from gemscope_jax.training import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
    self.counts, sums, batch_mean = eval_lib._batch_stats(  # pylint: disable=protected-access
        module, params, scale, x, keep, self.counts)
    if not nb:
      return
    sums = {k: float(v) for k, v in sums.items()}
    delta = np.asarray(batch_mean, np.float64) - self.mean
    total = self.n + nb
    self.acc["m2"] += sums["m2"] + float(delta @ delta) * self.n * nb / total
    self.mean = self.mean + delta * (nb / total)
    for k in ("l0", "l0_sq", "err", "cos"):
      self.acc[k] += sums[k]
    self.n = total

  def metrics(self, scale: float, dense_threshold: float
              ) -> tuple[dict[str, float], np.ndarray]:
    n, a = max(self.n, 1), self.acc
    freq = np.asarray(self.counts, np.float64) / n
    l0 = a["l0"] / n
    fvu = a["err"] / a["m2"] if a["m2"] > 0 else math.nan
    return {
        "l0": l0, "l0_std": math.sqrt(max(a["l0_sq"] / n - l0 * l0, 0.0)),
        "fvu": fvu, "explained_variance": 1.0 - fvu, "mse": a["err"] / n,
        "mse_normalized": a["err"] / n / (scale * scale),
        "cosine_sim": a["cos"] / n,
        "dead_fraction": float(np.mean(freq == 0)),
        "dense_fraction": float(np.mean(freq > dense_threshold)),
        "num_tokens": self.n, "num_latents": int(freq.size),
        "norm_scale": scale}, freq


def evaluate_state(run: GroupRun, state: dict, gemma_params, tokenizer,
                   workdir: pathlib.Path, *, progress: bool = True
                   ) -> dict[str, Any]:
  """Held-out evaluation of every member -> workdir/metrics.json.

  Entries `{hookpoint}/{metric}` (the metrics of `evaluate.evaluate`) and
  the means over members under the plain names; a firing-frequency plot per
  member beside its export.
  """
  from gemscope_jax.activations import special_mask  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  c, mc = run.c, run.model_config
  dtype = jnp.dtype(c.model.dtype)
  members = {}  # hookpoint -> (module, params, scale, last_fired, step)
  for key, stack in run.stacks.items():
    for i, h in enumerate(stack.names):
      s = stack.member_state(state[key], i)
      members[h] = (stack.template.module, s.params,
                    jnp.float32(s.norm_scale), s.last_fired, int(s.step))
  names = list(members)
  edits = {h: eval_lib.splice_edit(m[0]) for h, m in members.items()}
  stats = {h: _Stats(int(np.shape(m[3])[0])) for h, m in members.items()}
  losses = {h: {"spliced": 0.0, "zero": 0.0} for h in names}
  clean_loss, n_pairs, n_loss_tok = 0.0, 0, 0
  windows = trainer._eval_windows(c, tokenizer)  # pylint: disable=protected-access
  bar = eval_lib.tqdm(total=windows.num_tokens, unit="tok", unit_scale=True,
                      disable=not progress, desc=f"eval {len(names)} dicts",
                      dynamic_ncols=True)
  t0 = time.perf_counter()
  for tokens, mask in windows.batches(c.eval.batch_size):
    keep_np = mask & ~special_mask(tokenizer, tokens)
    keep = jnp.asarray(keep_np)
    none = jnp.zeros_like(keep)
    if n_loss_tok < c.eval.loss_tokens:
      def forward(target=None, how=None):
        args = {h: eval_lib.edit_args(
            members[h][1], members[h][2],
            splice=keep if (h == target and how == "spliced") else none,
            zero=keep if (h == target and how == "zero") else none)
                for h in names}
        return models.forward(gemma_params, tokens, mask, config=mc,
                              hookpoints=names, logits=False, loss=True,
                              edits=edits, edit_args=args, dtype=dtype)
      clean = forward()
      clean_loss += eval_lib._pair_loss_sum(clean)  # pylint: disable=protected-access
      for h in names:
        for how in ("spliced", "zero"):
          losses[h][how] += eval_lib._pair_loss_sum(forward(h, how))  # pylint: disable=protected-access
      n_pairs += int((mask[:, 1:] & mask[:, :-1]).sum())
      n_loss_tok += int(mask.sum())
    else:
      clean = models.forward(gemma_params, tokens, mask, config=mc,
                             hookpoints=names, logits=False, loss=False,
                             dtype=dtype)
    nb = int(keep_np.sum())
    for h, (module, params, scale, _, _) in members.items():
      stats[h].add(module, params, scale, clean.activations[h], keep, nb)
    bar.update(int(mask.sum()))
  bar.close()
  clean_l = clean_loss / max(n_pairs, 1)
  metrics: dict[str, Any] = {}
  per = {}
  for h, (_, _, scale, last_fired, step) in members.items():
    m, freq = stats[h].metrics(float(scale), c.eval.dense_threshold)
    spliced_l = losses[h]["spliced"] / max(n_pairs, 1)
    zero_l = losses[h]["zero"] / max(n_pairs, 1)
    silent = (step - np.asarray(last_fired)) * c.train.batch_size
    m.update({
        "clean_loss": clean_l, "spliced_loss": spliced_l,
        "zero_ablation_loss": zero_l, "delta_lm_loss": spliced_l - clean_l,
        "loss_recovered": ((zero_l - spliced_l) / (zero_l - clean_l)
                           if zero_l != clean_l else math.nan),
        "train_dead_fraction": float(np.mean(
            silent >= c.train.dead_after_tokens))})
    per[h] = m
    folder = export_dir(workdir, h)
    folder.mkdir(parents=True, exist_ok=True)
    eval_lib.plot_frequency_histogram(
        freq, folder / "latent_frequency.png",
        title=f"{h} {c.dictionary.architecture} {c.dictionary.width}: "
        "latent firing frequency")
  for k in ("l0", "fvu", "dead_fraction", "delta_lm_loss",
            "loss_recovered"):
    vals = [m[k] for m in per.values() if not math.isnan(m[k])]
    metrics[k] = float(np.mean(vals)) if vals else math.nan
  for h, m in per.items():
    metrics.update({f"{h}/{k}": v for k, v in m.items()})
  step = next(iter(members.values()))[4]
  metrics.update({
      "step": step, "trained_tokens": step * c.train.batch_size,
      "target_l0": c.dictionary.target_l0, "eval_text": c.eval.text,
      "hookpoints": ",".join(names), "num_pairs": n_pairs,
      "loss_tokens": n_loss_tok, "seconds": time.perf_counter() - t0})
  eval_lib.write_metrics(metrics, workdir / "metrics.json")
  return metrics


def evaluate_workdir(workdir: str | pathlib.Path, *, progress: bool = True,
                     overrides: dict | None = None) -> dict[str, Any]:
  """Evaluates the newest group checkpoint in `workdir`."""
  workdir = pathlib.Path(workdir)
  ckpts = ckpt_lib.Checkpoints(workdir, asynchronous=False)
  latest = ckpts.latest_step()
  if latest is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint to evaluate")
  c = config_lib.from_json(ckpts.read_config(latest))
  if overrides:
    c = config_lib.apply_overrides(c, overrides)
  model_config = config_lib.check(c)
  run = GroupRun(c, model_config)
  restored = ckpts.restore_latest(run.abstract_state)
  ckpts.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}: no readable checkpoint")
  from gemscope_jax.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = default_tokenizer()
  gemma_params = trainer.load_gemma(c, model_config)
  return evaluate_state(run, restored[1], gemma_params, tokenizer, workdir,
                        progress=progress)
