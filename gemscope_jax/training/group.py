"""Many dictionaries from one Gemma pass: e.g. a resid_post SAE per layer,
or a transcoder per layer (mlp_in -> mlp_out), i.e. a replacement model.

`trainer.train` builds a `GroupRun` instead of a `step.Run` when the config
sets `group.layers` / `group.sites` (`members.hookpoints`); the training
sequence is the same. The pieces:

- Members: one dictionary per hookpoint. Members whose dictionaries have
  the same shape (the same input width) form a *stack*: every array of
  their train states gains a leading 'dict' axis, and the single-dictionary
  step of `step.Run` is `jax.vmap`ped over it, so one jitted, donated
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
- Export (`training.export`): member `layer_L/site` goes to
  `workdir/export/{site}/layer_{L}/` (a Gemma Scope 2 params folder).
- Evaluation (`training.heldout`): one forward per eval batch records every
  hookpoint for the reconstruction statistics; the loss passes edit all
  hookpoints with one compiled program whose masks splice or zero one
  member at a time (clean once, then two passes per member).

Caveat: every member is initialised from the same key (`config.seed`), as
a single run at its hookpoint would be, so members of a stack start with
identical encoder/decoder weights (their b_dec and scales differ); and the
loss passes of evaluation cost 1 + 2 x members full forwards per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gemscope_jax import models
from gemscope_jax.data import stream
from gemscope_jax.dictionaries import Layout
from gemscope_jax.parallel import distributed
from gemscope_jax.training import plans, state as state_lib
from gemscope_jax.training.step import Run, TrainingDiverged

# Means over members shown in the progress bar and logged under plain names.
MEAN_KEYS = ("loss", "mse", "l0", "fvu", "dead_fraction", "grad_norm")


def _stacked(spec: PartitionSpec) -> PartitionSpec:
  return PartitionSpec("dict", *spec)


@dataclasses.dataclass
class Stack:
  """Members of one shape, trained by one vmapped step.

  Attributes:
    members: each member's `plans.DictionaryPlan`, in stack order.
    template: a `step.Run` for the first member (module, optimizer, mesh,
      unbatched step); every member shares its shapes.
    state_sharding, abstract_state: of the stacked TrainState.
    batch_sharding: of the stacked step input {'x': (members, batch, d_in),
      'target': (members, batch, d_out) for transcoders}.
    step: jitted, donated (state, batch) -> (state, {metric: (members,)}).
    init: jitted (key, b_decs, scales, target_scales) -> stacked state.
  """
  members: list[plans.DictionaryPlan]
  template: Run
  state_sharding: Any = None
  abstract_state: Any = None
  batch_sharding: Any = None
  step: Any = None
  init: Any = None

  def __post_init__(self):
    run = self.template
    n = len(self.members)
    abstract = jax.eval_shape(run.boxed_state, jax.random.key(0),
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
    self.step = jax.jit(jax.vmap(run.step_fn),
                        in_shardings=(self.state_sharding,
                                      self.batch_sharding),
                        out_shardings=(self.state_sharding, None),
                        donate_argnums=0)

    def init(key, b_decs, scales, target_scales):
      one = lambda b, s, t: nn.unbox(run.boxed_state(key, b, s, t))
      return jax.vmap(one)(b_decs, scales, target_scales)
    self.init = jax.jit(init, out_shardings=self.state_sharding)

  @property
  def layouts(self) -> list[Layout]:
    return [m.layout for m in self.members]

  @property
  def names(self) -> list[str]:
    """The members' input hookpoints, in stack order."""
    return [m.layout.inputs[0] for m in self.members]

  def member_state(self, state, i: int) -> state_lib.TrainState:
    """Member i's (unstacked, host) TrainState."""
    return jax.tree.map(lambda a: np.asarray(a)[i], jax.device_get(state))

  def batch(self, rows: stream.Bucket) -> dict[str, np.ndarray]:
    """The stacked step input from rows holding every member's hookpoints."""
    out = {"x": np.stack([rows[lay.inputs[0]] for lay in self.layouts])}
    if "target" in self.batch_sharding:
      out["target"] = np.stack([rows[lay.targets[0]]
                                for lay in self.layouts])
    return out


class GroupRun:
  """The data-independent pieces of a group run: its stacks and mesh; the
  same interface as `step.Run` (`initial_state`, `feed`, `step`,
  `host_metrics`, `abstract_state`, `harvest`).

  Attributes:
    plan: the group's `plans.Plan` (one `DictionaryPlan` per member).
    model_config: the Gemma config.
    hookpoints: all members' inputs, sorted by (layer, site).
    harvest: every hookpoint a batch must hold (inputs and targets).
    stacks: {'d_in_{width}' (SAEs) or 'd_{in}_to_{out}': Stack}.
    mesh, num_steps: as `step.Run`'s.
  """

  def __init__(self, plan: plans.Plan, devices=None):
    self.plan = plan
    self.model_config = plan.model.config
    self.hookpoints = [d.layout.inputs[0] for d in plan.dictionaries]
    self.harvest = plan.harvest
    by_shape: dict[tuple[int, int], list[plans.DictionaryPlan]] = {}
    for d in plan.dictionaries:
      by_shape.setdefault(d.layout.widths(self.model_config), []).append(d)
    def key(w_in, w_out):
      return f"d_in_{w_in}" if plan.kind == "sae" else f"d_{w_in}_to_{w_out}"
    self.stacks = {key(*shape): Stack(members, Run(plan, members[0], devices))
                   for shape, members in sorted(by_shape.items())}
    first = next(iter(self.stacks.values())).template
    self.mesh = first.mesh
    self.num_steps = first.num_steps

  @property
  def abstract_state(self) -> dict:
    return {k: s.abstract_state for k, s in self.stacks.items()}

  def initial_state(self, bucket: stream.Bucket) -> dict:
    """The initial stacked states: scales and b_dec from `bucket`."""
    state = {}
    for key, stack in self.stacks.items():
      args = [state_lib.init_args(m, bucket) for m in stack.members]
      state[key] = stack.init(jax.random.key(self.plan.seed),
                              *(jnp.asarray(np.stack(a)) for a in zip(*args)))
    return state

  def feed(self, rows: stream.Bucket) -> stream.Bucket:
    """Host rows as they are: `step` builds each stack's input."""
    return rows

  def step(self, state: dict, batch: stream.Bucket) -> tuple[dict, dict]:
    """One step of every stack; metrics {stack: {metric: (members,)}}."""
    new, metrics = {}, {}
    for key, stack in self.stacks.items():
      new[key], m = stack.step(state[key], distributed.global_batch(
          stack.batch(batch), stack.batch_sharding))
      metrics[key] = m
    return new, metrics

  def member_metrics(self, metrics: dict) -> dict[str, dict[str, float]]:
    """{member name: {metric: value}} (names: `Layout.name`)."""
    out = {}
    for key, m in jax.device_get(metrics).items():
      for i, lay in enumerate(self.stacks[key].layouts):
        out[lay.name] = {k: float(np.asarray(v)[i]) for k, v in m.items()}
    return out

  def host_metrics(self, metrics: dict, step: int) -> dict[str, float]:
    """Flat metrics: `{member}/{metric}` plus the means of MEAN_KEYS;
    raises `TrainingDiverged` naming the members that went non-finite."""
    per = self.member_metrics(metrics)
    bad = [h for h, m in per.items() if not m.pop("finite")]
    if bad:
      raise TrainingDiverged(
          f"{', '.join(bad)}: non-finite loss or gradient at step "
          f"{step}: training stopped")
    return _row(per)

  def members(self, state: dict):
    """(stack, member index, DictionaryPlan, host TrainState) of every
    member, in stack order."""
    for key, stack in self.stacks.items():
      for i, member in enumerate(stack.members):
        yield stack, i, member, stack.member_state(state[key], i)


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
