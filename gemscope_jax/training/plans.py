"""The config read once: `make(c)` validates a `ConfigDict` and turns it into
small frozen plans that everything below receives as plain values.

  plan = plans.make(c)          # one validation pass; errors name the field
  plan.model.config             # the Gemma3Config
  plan.dictionaries[0].layout   # what the dictionary reads and predicts
  plan.optimizer.lr, plan.step.grads, plan.mesh, plan.eval.num_tokens ...

Nothing below `training/trainer.py` reads the ConfigDict: the jitted step
closes over plans (frozen dataclasses of numbers and strings), so what a
compiled program depends on is visible in its arguments.

Caveat: a plan is derived, never saved; workdirs keep the ConfigDict as JSON
(`schema.to_json`) and rebuild the plan on resume, so a change to how a
field is read changes resumed runs too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from gemscope_jax import dictionaries, models
from gemscope_jax.dictionaries import layout as layout_lib
from gemscope_jax.parallel.distributed import DistributedPlan
from gemscope_jax.parallel.mesh import MeshPlan
from gemscope_jax.training import checks, members, schema


@dataclasses.dataclass(frozen=True)
class ModelPlan:
  """Which Gemma (config `model.*`).

  Attributes:
    config: the Gemma 3 size.
    checkpoint: 'default' (the embedded real 270M), a path (GGUF,
      transformers directory or Orbax) or 'random'.
    dtype: Gemma's compute dtype name ('float32' or 'bfloat16').
  """
  config: models.Gemma3Config
  checkpoint: str
  dtype: str

  @property
  def name(self) -> str:
    return self.config.name


@dataclasses.dataclass(frozen=True)
class DataPlan:
  """Where activations come from (config `data.*`, and `seed`).

  Attributes:
    text: a corpus name or text files / folders / globs, comma separated.
    seq_len: tokens per window, BOS included.
    model_batch_size: windows per Gemma forward.
    bucket_tokens: activations shuffled together.
    cache_dir: '' streams live; a path harvests there once.
    cache_tokens: rows harvested into `cache_dir` (0: the run's num_tokens;
      fewer: the run reads the cache in epochs).
    shuffle_windows: shuffle the window order.
    num_shards: data shards of the stream (0: one per process).
    seed: the run's seed (window order, bucket permutations).
    format: how `text` reads: 'text' or 'chat_jsonl' (conversations).
  """
  text: str
  seq_len: int
  model_batch_size: int
  bucket_tokens: int
  cache_dir: str
  shuffle_windows: bool
  num_shards: int
  seed: int
  format: str = "text"
  cache_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class DictionaryPlan:
  """One dictionary: what it reads and predicts, and its module config.

  Attributes:
    layout: inputs and targets (`dictionaries.Layout`).
    config: the module's `dictionaries.DictConfig`.
    init_norm: initial norm of decoder rows / encoder columns.
    b_dec_init: 'mean' (the target's normalised mean) or 'zeros'.
    l0_per_token: JumpReLU's penalty per token (SAELens's form).
    init_from: a CLT's trained transcoders, one source path per layer
      (`training.init_from`); empty: its own random init.
    init_prefix: latents taken from each (None: all).
    init_dedup_cosine: the cosine above which a taken latent duplicates an
      earlier one.
  """
  layout: layout_lib.Layout
  config: dictionaries.DictConfig
  init_norm: float = 1.0
  b_dec_init: str = "mean"
  l0_per_token: bool = False
  init_from: tuple[str, ...] = ()
  init_prefix: int | None = None
  init_dedup_cosine: float = 0.95

  @property
  def architecture(self) -> str:
    return self.config.architecture


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
  """Adam and its schedule (config `train.*`).

  Attributes:
    lr: peak learning rate.
    lr_warmup_steps: linear warm-up from 0.
    lr_decay_fraction: linear decay to 0 over this last fraction of steps.
    beta1, beta2: Adam's moment decays.
    grad_clip_norm: clip the global gradient norm (0: off).
    num_steps: steps in the run.
  """
  lr: float
  lr_warmup_steps: int
  lr_decay_fraction: float
  beta1: float
  beta2: float
  grad_clip_norm: float
  num_steps: int


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What one train step does besides the optimiser (config `train.*`).

  Attributes:
    grads: 'dense', 'sparse' or 'autodiff' (`training.grads`).
    sparse_capacity: active entries per token the sparse step holds.
    sparsity_coeff: the sparsity penalty's coefficient after warm-up.
    sparsity_warmup_steps: its linear warm-up.
    unit_decoder: keep decoder rows at unit norm.
    dead_after_tokens: a latent silent this long counts as dead.
    batch_size: activations per step.
    num_steps: steps in the run.
    l0_target_decay_steps: steps over which the L0 target falls from
      l0_target_start times its goal to the goal (0: off).
    l0_target_start: that starting multiple.
    freq_start_step: > 0: the high-frequency term is off before this step
      and ramps in over sparsity_warmup_steps (`optim.freq_scale`).
  """
  grads: str
  sparse_capacity: int
  sparsity_coeff: float
  sparsity_warmup_steps: int
  unit_decoder: bool
  dead_after_tokens: int
  batch_size: int
  num_steps: int
  l0_target_decay_steps: int = 0
  l0_target_start: float = 4.0
  freq_start_step: int = 0


@dataclasses.dataclass(frozen=True)
class LoopPlan:
  """Logging and checkpoints (config `train.*`).

  Attributes:
    num_tokens: activations seen in training.
    batch_size: activations per step.
    num_steps: steps in the run.
    checkpoint_every_steps, keep_checkpoints, log_every_steps: as named.
  """
  num_tokens: int
  batch_size: int
  num_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  log_every_steps: int


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """The held-out evaluation at the end (config `eval.*`).

  Attributes:
    text: a corpus name or text files.
    num_tokens: tokens for L0, FVU and dead/dense latents.
    loss_tokens: tokens for the spliced LM loss.
    seq_len: tokens per window.
    batch_size: windows per forward.
    dense_threshold: a latent firing more often than this is dense.
    at_end: evaluate when training ends.
    format: how `text` reads: 'text' or 'chat_jsonl' (conversations).
    prefixes: latent counts M whose prefix_fvu/M is reported; None: a
      Matryoshka dictionary's own prefixes.
    loss_windows: which windows the loss passes read, 'leading' or
      'spread' (`text.windows.for_loss`).
  """
  text: str
  num_tokens: int
  loss_tokens: int
  seq_len: int
  batch_size: int
  dense_threshold: float
  at_end: bool
  format: str = "text"
  prefixes: tuple[int, ...] | None = None
  loss_windows: str = "leading"


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a run reads, validated.

  Attributes:
    seed: the run's seed.
    hookpoint: the config's `hookpoint` (a group's default site/layer).
    group: several dictionaries from one pass (`group.layers`/`sites`).
    dictionaries: one plan per dictionary, ordered by (layer, site) of its
      input; a single run has one.
    model, data, optimizer, step, loop, mesh, distributed, eval: as named.
    config_json: the config as JSON (saved beside checkpoints, compared
      on resume).
  """
  seed: int
  hookpoint: str
  group: bool
  dictionaries: tuple[DictionaryPlan, ...]
  model: ModelPlan
  data: DataPlan
  optimizer: OptimizerPlan
  step: StepPlan
  loop: LoopPlan
  mesh: MeshPlan
  distributed: DistributedPlan
  eval: EvalPlan
  config_json: Mapping[str, Any] = dataclasses.field(compare=False,
                                                      repr=False)

  @property
  def kind(self) -> str:
    """'sae', 'transcoder', 'crosscoder' or 'clt'."""
    return self.dictionaries[0].layout.kind

  @property
  def harvest(self) -> list[str]:
    """Every hookpoint a batch must hold (all inputs and targets), sorted
    by (layer, site)."""
    return [h.name for h in models.hooks.parse_all(
        n for d in self.dictionaries for n in d.layout.hookpoints)]


def make(c: ml_collections.ConfigDict) -> Plan:
  """Validates `c` once and reads it into a `Plan`. Raises ValueError (or
  FileNotFoundError for missing text), naming the field."""
  mc, dicts = checks.validate(c)
  t, d = c.train, c.dictionary
  num_steps = t.num_tokens // t.batch_size
  dicts = tuple(
      DictionaryPlan(layout=lay, config=dc,
                     init_norm=float(t.get("init_norm", 1.0)),
                     b_dec_init=t.b_dec_init,
                     l0_per_token=bool(t.get("l0_per_token", False)),
                     init_from=members.init_from_paths(d.get("init_from"),
                                                      lay),
                     init_prefix=d.get("init_prefix"),
                     init_dedup_cosine=float(d.get("init_dedup_cosine",
                                                   0.95)))
      for lay, dc in dicts)
  m = c.mesh
  return Plan(
      seed=int(c.seed), hookpoint=c.hookpoint, group=members.is_group(c),
      dictionaries=dicts,
      model=ModelPlan(config=mc, checkpoint=str(c.model.checkpoint),
                      dtype=c.model.dtype),
      data=DataPlan(text=str(c.data.text), seq_len=c.data.seq_len,
                    model_batch_size=c.data.model_batch_size,
                    bucket_tokens=c.data.bucket_tokens,
                    cache_dir=c.data.cache_dir,
                    shuffle_windows=bool(c.data.shuffle_windows),
                    num_shards=int(c.data.get("num_shards", 0) or 0),
                    seed=int(c.seed),
                    format=str(c.data.get("format", "text")),
                    cache_tokens=int(c.data.get("cache_tokens", 0) or 0)),
      optimizer=OptimizerPlan(
          lr=t.lr, lr_warmup_steps=t.lr_warmup_steps,
          lr_decay_fraction=t.lr_decay_fraction, beta1=t.beta1,
          beta2=t.beta2, grad_clip_norm=float(t.get("grad_clip_norm", 0.0)),
          num_steps=num_steps),
      step=StepPlan(
          grads=t.step, sparse_capacity=t.sparse_capacity,
          sparsity_coeff=t.sparsity_coeff,
          sparsity_warmup_steps=t.sparsity_warmup_steps,
          unit_decoder=bool(t.get("unit_decoder", True)),
          dead_after_tokens=t.dead_after_tokens, batch_size=t.batch_size,
          num_steps=num_steps,
          l0_target_decay_steps=int(t.get("l0_target_decay_steps", 0)),
          l0_target_start=float(t.get("l0_target_start", 4.0)),
          freq_start_step=int(t.get("freq_start_step", 0))),
      loop=LoopPlan(num_tokens=t.num_tokens, batch_size=t.batch_size,
                    num_steps=num_steps,
                    checkpoint_every_steps=t.checkpoint_every_steps,
                    keep_checkpoints=t.keep_checkpoints,
                    log_every_steps=t.log_every_steps),
      mesh=MeshPlan(data=m.data, model=m.model,
                    rules=tuple((a, b) for a, b in m.rules), gemma=m.gemma),
      distributed=distributed_plan(c),
      eval=EvalPlan(text=str(c.eval.text), num_tokens=c.eval.num_tokens,
                    loss_tokens=c.eval.loss_tokens, seq_len=c.eval.seq_len,
                    batch_size=c.eval.batch_size,
                    dense_threshold=c.eval.dense_threshold,
                    at_end=bool(c.eval.at_end),
                    format=str(c.eval.get("format", "text")),
                    prefixes=(tuple(int(m) for m in c.eval.prefixes)
                              if c.eval.get("prefixes") else None),
                    loss_windows=str(c.eval.get("loss_windows", "leading"))),
      config_json=schema.to_json(c))


def distributed_plan(c: ml_collections.ConfigDict) -> DistributedPlan:
  """`c.distributed` as a plan (read before anything else: a multi-host
  run starts its runtime before the rest of the config is checked)."""
  g = c.distributed
  return DistributedPlan(
      coordinator_address=g.coordinator_address,
      num_processes=g.num_processes, process_id=g.process_id,
      initialization_timeout_s=g.initialization_timeout_s,
      heartbeat_timeout_s=g.heartbeat_timeout_s)
