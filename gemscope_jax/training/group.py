"""Many dictionaries from one Gemma pass: e.g. a resid_post SAE per layer,
or a transcoder per layer (mlp_in -> mlp_out), i.e. a replacement model.

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
from gemscope_jax.training import config as config_lib
from gemscope_jax.training import distributed
from gemscope_jax.training import trainer

# Means over members shown in the progress bar and logged under plain names.
MEAN_KEYS = ("loss", "mse", "l0", "fvu", "dead_fraction", "grad_norm")


def member_config(c: ml_collections.ConfigDict, hookpoint: str
                  ) -> ml_collections.ConfigDict:
  """The single-dictionary config of one member: `c` at `hookpoint` (a
  transcoder predicting the target site at the same layer)."""
  m = config_lib.from_json(config_lib.to_json(c))
  layout = config_lib.layout(c, hookpoint)
  m.hookpoint = hookpoint
  if layout.kind == "transcoder":
    m.target = layout.targets[0]
  m.group.layers = None
  m.group.sites = None
  return m


def _stacked(spec: PartitionSpec) -> PartitionSpec:
  return PartitionSpec("dict", *spec)


@dataclasses.dataclass
class Stack:
  """Members of one shape, trained by one vmapped step.

  Attributes:
    names: the members' input hookpoints, in stack order.
    layouts: what each member reads and predicts (`config.Layout`).
    template: a `trainer.Run` for the first member (module, optimizer,
      mesh, unbatched step); every member shares its shapes.
    state_sharding, abstract_state: of the stacked TrainState.
    batch_sharding: of the stacked step input {'x': (members, batch, d_in),
      'target': (members, batch, d_out) for transcoders}.
    step: jitted, donated (state, batch) -> (state, {metric: (members,)}).
    init: jitted (key, b_decs, scales, target_scales) -> stacked state.
  """
  names: list[str]
  layouts: list[config_lib.Layout]
  template: trainer.Run
  state_sharding: Any = None
  abstract_state: Any = None
  batch_sharding: Any = None
  step: Any = None
  init: Any = None

  def __post_init__(self):
    run = self.template
    n = len(self.names)
    abstract = jax.eval_shape(
        run._boxed_state, jax.random.key(0),  # pylint: disable=protected-access
        *run.init_shapes)
    specs = jax.tree.map(_stacked, nn.get_partition_spec(abstract),
                         is_leaf=lambda x: isinstance(x, PartitionSpec))
    rules = run.rules + (("dict", None),)
    self.state_sharding = nn.logical_to_mesh_sharding(specs, run.mesh, rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct((n, *a.shape), a.dtype, sharding=s),
        nn.unbox(abstract), self.state_sharding)
    self.batch_sharding = {
        k: NamedSharding(run.mesh, PartitionSpec(None, *v.spec))
        for k, v in run.batch_sharding.items()}
    self.step = jax.jit(jax.vmap(run._step),  # pylint: disable=protected-access
                        in_shardings=(self.state_sharding,
                                      self.batch_sharding),
                        out_shardings=(self.state_sharding, None),
                        donate_argnums=0)

    def init(key, b_decs, scales, target_scales):
      one = lambda b, s, t: nn.unbox(run._boxed_state(key, b, s, t))  # pylint: disable=protected-access
      return jax.vmap(one)(b_decs, scales, target_scales)
    self.init = jax.jit(init, out_shardings=self.state_sharding)

  def member_state(self, state, i: int) -> trainer.TrainState:
    """Member i's (unstacked, host) TrainState."""
    return jax.tree.map(lambda a: np.asarray(a)[i], jax.device_get(state))

  def member_run(self, i: int):
    """What `interop.from_state` reads of a Run, for member i."""
    run = self.template
    return types.SimpleNamespace(
        c=member_config(run.c, self.names[i]), module=run.module,
        model_config=run.model_config, dict_config=run.dict_config,
        layout=self.layouts[i])

  def batch(self, rows: stream.Bucket) -> dict[str, np.ndarray]:
    """The stacked step input from rows holding every member's hookpoints."""
    out = {"x": np.stack([rows[lay.inputs[0]] for lay in self.layouts])}
    if "target" in self.batch_sharding:
      out["target"] = np.stack([rows[lay.targets[0]]
                                for lay in self.layouts])
    return out


class GroupRun:
  """The data-independent pieces of a group run: its stacks and mesh.

  Attributes:
    c: the group config.
    model_config: the Gemma config.
    hookpoints: all members' inputs, sorted by (layer, site).
    layouts: {input hookpoint: `config.Layout`} (SAEs or transcoders).
    harvest: every hookpoint a batch must hold (inputs and targets).
    stacks: {'d_in_{width}' (SAEs) or 'd_{in}_to_{out}': Stack}.
    mesh, num_steps: as `trainer.Run`'s.
  """

  def __init__(self, c: ml_collections.ConfigDict,
               model_config: models.Gemma3Config, devices=None):
    self.c = c
    self.model_config = model_config
    self.hookpoints = config_lib.hookpoints(c, model_config)
    self.layouts = {h: config_lib.layout(c, h, model_config)
                    for h in self.hookpoints}
    self.harvest = [h.name for h in models.hooks.parse_all(
        n for lay in self.layouts.values() for n in lay.hookpoints)]
    by_shape: dict[tuple[int, int], list[str]] = {}
    for h, lay in self.layouts.items():
      by_shape.setdefault((models.hooks.parse(h).width(model_config),
                           models.hooks.parse(lay.targets[0]).width(
                               model_config)), []).append(h)
    def key(w_in, w_out):
      return f"d_in_{w_in}" if config_lib.kind(c) == "sae" else (
          f"d_{w_in}_to_{w_out}")
    self.stacks = {
        key(*shape): Stack(names, [self.layouts[h] for h in names],
                           trainer.Run(member_config(c, names[0]),
                                       model_config, devices))
        for shape, names in sorted(by_shape.items())}
    first = next(iter(self.stacks.values())).template
    self.mesh = first.mesh
    self.num_steps = first.num_steps

  @property
  def abstract_state(self) -> dict:
    return {k: s.abstract_state for k, s in self.stacks.items()}

  def init(self, bucket: stream.Bucket) -> dict:
    """The initial stacked states: scales and b_dec from `bucket`."""
    state = {}
    for key, stack in self.stacks.items():
      args = [trainer.init_args(self.c, lay, bucket) for lay in stack.layouts]
      state[key] = stack.init(jax.random.key(self.c.seed),
                              *(jnp.asarray(np.stack(a)) for a in zip(*args)))
    return state

  def step(self, state: dict, batch: stream.Bucket) -> tuple[dict, dict]:
    """One step of every stack; metrics {stack: {metric: (members,)}}."""
    new, metrics = {}, {}
    for key, stack in self.stacks.items():
      new[key], m = stack.step(state[key], distributed.global_batch(
          stack.batch(batch), stack.batch_sharding))
      metrics[key] = m
    return new, metrics

  def host_metrics(self, metrics: dict) -> dict[str, dict[str, float]]:
    """{member name: {metric: value}} (names: `config.Layout.name`)."""
    out = {}
    for key, m in jax.device_get(metrics).items():
      for i, lay in enumerate(self.stacks[key].layouts):
        out[lay.name] = {k: float(np.asarray(v)[i]) for k, v in m.items()}
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
  gemma_params = trainer.load_gemma(c, model_config, run.mesh)
  first = next(iter(run.stacks.values())).template
  batches = trainer.make_batches(c, first, gemma_params, tokenizer,
                                 progress=progress, hookpoints=run.harvest)
  t0 = time.perf_counter()
  start_step, state = trainer.restore(ckpts, latest, run, batches)
  if state is None:
    if progress:
      print(f"harvesting the first {c.data.bucket_tokens:,} activations of "
            f"{len(run.harvest)} hookpoints (scales and means)...",
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
  return trainer.finish(c, run, state, gemma_params, tokenizer, workdir,
                        step, last, export_fn=export,
                        evaluate_fn=evaluate_state, progress=progress)


def export_dir(workdir: str | pathlib.Path,
               member: str | config_lib.Layout) -> pathlib.Path:
  """Where a member is exported: export/{family}/layer_{L}, the family
  being the site of an SAE (a hookpoint name) or 'transcoder'."""
  if isinstance(member, str):
    hp = models.hooks.parse(member)
    family, layer = hp.site, hp.layer
  else:
    family = member.family
    layer = models.hooks.parse(member.inputs[0]).layer
  return pathlib.Path(workdir) / "export" / family / f"layer_{layer}"


def export(run: GroupRun, state: dict, workdir: pathlib.Path
           ) -> dict[str, pathlib.Path]:
  """Writes each member's Gemma Scope 2 params folder (raw units)."""
  from gemscope_jax import interop  # pylint: disable=import-outside-toplevel
  out = {}
  for key, stack in run.stacks.items():
    for i, lay in enumerate(stack.layouts):
      d = interop.from_state(stack.member_run(i), stack.member_state(
          state[key], i))
      out[lay.name] = interop.save_gemmascope2(d, export_dir(workdir, lay),
                                               release_layout=False)
  return out


def evaluate_state(run: GroupRun, state: dict, gemma_params, tokenizer,
                   workdir: pathlib.Path, *, progress: bool = True
                   ) -> dict[str, Any]:
  """Held-out evaluation of every member -> workdir/metrics.json.

  Entries `{member}/{metric}` (the metrics of `evaluate.evaluate`; members
  named as `config.Layout.name`), the means over members under the plain
  names, and for a group of transcoders the replacement model (every
  member replacing its MLP at once): `replacement_loss`,
  `replacement_delta_lm_loss`, `replacement_loss_recovered` (against every
  MLP output zeroed). A firing-frequency plot per member beside its export.
  """
  from gemscope_jax.training import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import splice as splice_lib  # pylint: disable=import-outside-toplevel
  c, mc = run.c, run.model_config
  members, trained = [], {}
  for key, stack in run.stacks.items():
    for i, lay in enumerate(stack.layouts):
      s = stack.member_state(state[key], i)
      members.append(splice_lib.Member(
          name=lay.name, layout=lay, module=stack.template.module,
          params=s.params, norm_scale=s.norm_scale,
          target_scale=s.target_scale))
      trained[lay.name] = (lay, s.last_fired, int(s.step))
  members.sort(key=lambda m: [models.hooks.parse(h)
                              for h in m.layout.inputs])
  results, shared = eval_lib.evaluate_members(
      members, model_config=mc, model_params=gemma_params,
      windows=trainer._eval_windows(c, tokenizer),  # pylint: disable=protected-access
      tokenizer=tokenizer, batch_size=c.eval.batch_size,
      dtype=jnp.dtype(c.model.dtype), dense_threshold=c.eval.dense_threshold,
      progress=progress, loss_tokens=c.eval.loss_tokens,
      replacement=config_lib.kind(c) == "transcoder" and len(members) > 1)
  per = {}
  for name, r in results.items():
    lay, last_fired, step = trained[name]
    silent = (step - np.asarray(last_fired)) * c.train.batch_size
    per[name] = {**r.metrics, "train_dead_fraction": float(np.mean(
        silent >= c.train.dead_after_tokens))}
    folder = export_dir(workdir, lay)
    folder.mkdir(parents=True, exist_ok=True)
    eval_lib.plot_frequency_histogram(
        r.frequency, folder / "latent_frequency.png",
        title=f"{name} {c.dictionary.architecture} {c.dictionary.width}: "
        "latent firing frequency")
  metrics: dict[str, Any] = {}
  for k in ("l0", "fvu", "dead_fraction", "delta_lm_loss",
            "loss_recovered"):
    vals = [m[k] for m in per.values() if not math.isnan(m[k])]
    metrics[k] = float(np.mean(vals)) if vals else math.nan
  for name, m in per.items():
    metrics.update({f"{name}/{k}": v for k, v in m.items()})
  step = next(iter(trained.values()))[2]
  metrics.update(shared)
  metrics.update({
      "step": step, "trained_tokens": step * c.train.batch_size,
      "target_l0": c.dictionary.target_l0, "eval_text": c.eval.text,
      "hookpoints": ",".join(run.hookpoints),
      "members": ",".join(m.name for m in members)})
  eval_lib.write_metrics(metrics, workdir / "metrics.json")
  return metrics
