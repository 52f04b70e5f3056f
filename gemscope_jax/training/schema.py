"""The training config's schema: every field, its default and its unit.

A run is described by one `ml_collections.ConfigDict`; `default_config` lists
every field with a one-line comment. `to_json` / `from_json` are the round
trip that workdirs save beside each checkpoint (`config.json`).

Caveat: the schema is the contract with saved workdirs: renaming a field
breaks resuming and evaluating older runs (`from_json` refuses unknown
fields at `plans.make`).
"""

from __future__ import annotations

from typing import Mapping

import ml_collections
from ml_collections import config_dict

STEPS = ("dense", "sparse", "autodiff")
DTYPES = ("float32", "bfloat16")

def default_config() -> ml_collections.ConfigDict:
  """Every field a training run reads, with CPU-sized defaults.

  The defaults are the main job: a JumpReLU SAE on Gemma 3 270M's layer-6
  residual stream, trained on the embedded Shakespeare and evaluated on the
  held-out Python documentation.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Which Gemma: `name` is a size (models.CONFIGS); `checkpoint` is
  # 'default' (the embedded real 270M), a path (GGUF, transformers dir or
  # Orbax), or 'random' (random weights of that size: tests, benchmarks).
  c.model = ml_collections.ConfigDict(dict(
      name="gemma3_270m", checkpoint="default", dtype="float32"))
  c.hookpoint = "layer_6/resid_post"
  # What the dictionary predicts: None reconstructs its input (an SAE); a
  # transcoder architecture defaults to mlp_out of the hookpoint's layer
  # (its hookpoint is that layer's mlp_in).
  c.target = config_dict.placeholder(str)
  # Many dictionaries from one Gemma pass (training/group.py): one per
  # (layer, site). Both None: the one dictionary at `hookpoint`.
  c.group = ml_collections.ConfigDict(dict(
      # 'all', 'a-b' (inclusive), 'a+b+c', an int or a tuple of ints;
      # None with sites set: hookpoint's layer.
      layers=config_dict.placeholder(object),
      # A site, 'site+site' or a tuple of sites (models.hooks.SITES);
      # None with layers set: hookpoint's site.
      sites=config_dict.placeholder(object),
  ))
  c.data = ml_collections.ConfigDict(dict(
      # A corpus name (english, shakespeare, python_docs: data.text) or
      # text files, directories, globs and parquet/array_record shards
      # separated by commas.
      text="english",
      # How data.text reads: 'text' (plain text) or 'chat_jsonl' (JSONL
      # conversations in the Gemma 3 chat template, one per line; its
      # template tokens are left out like special tokens).
      format="text",
      seq_len=128,              # tokens per window, BOS included
      model_batch_size=8,       # windows per Gemma forward pass
      bucket_tokens=65536,      # activations shuffled together
      cache_dir="",             # '' streams; a path harvests there once
      # Rows the cache holds: 0, train.num_tokens (one epoch); fewer, and
      # training reads the cache in epochs (a reshuffled shard order each).
      cache_tokens=0,
      shuffle_windows=True,
      # Data shards the activation stream is split into (each its own
      # windows or cache files, batch_size / num_shards rows of every global
      # batch); 0: one per process. The global batch depends on this, not on
      # the process count (parallel/distributed.py).
      num_shards=0,
  ))
  c.dictionary = ml_collections.ConfigDict(dict(
      architecture="jumprelu",  # jumprelu, topk, batchtopk, relu
      width=4096,
      target_l0=60.0,           # JumpReLU quadratic penalty's L0*
      k=config_dict.placeholder(int),  # TopK / BatchTopK
      bandwidth=0.001,          # JumpReLU STE kernel width (normalised units)
      sparsity_penalty="quadratic",  # JumpReLU: quadratic (GS2) or l0 (GS1)
      preact_coeff=3e-6,        # JumpReLU pre-activation loss (0: published)
      # JumpReLU: > 0, the L0 penalty's estimator also moves the
      # pre-activations with a kernel this wide (0: published, thresholds
      # only).
      l0_preact_bandwidth=0.0,
      # JumpReLU: the high-frequency penalty freq_coeff * sum_i (relu(f_i -
      # max_freq) / max_freq)^2 over each latent's batch firing frequency
      # f_i (times the warmed-up sparsity coefficient); 0: off. Its
      # gradients spike: with it, long runs want train.grad_clip_norm
      # (README: 0.1 blew up at step 1,250 of 3,600 on the main job
      # unclipped, and was stable clipped at 300).
      freq_coeff=0.0,
      max_freq=0.1,
      dtype="float32",
      matryoshka_prefixes=config_dict.placeholder(tuple),
      affine_skip=False,        # transcoders: learn x @ w_skip as well
      # JumpReLU SAEs and transcoders: k > 0 adds a rank-k linear path
      # x @ w_dense_in @ w_dense_out to the reconstruction, for the dense
      # subspace (the massive residual coordinates) that otherwise turns
      # into latents firing on nearly every token; exported as k antipodal
      # latent pairs with threshold 0 (each pair adds 1 to the exported
      # L0). 0: off.
      dense_rank=0,
      # Crosscoders and CLTs: the layers one dictionary spans ('all',
      # 'a-b', 'a+b', ints), reading the hookpoint's site (crosscoder) or
      # mlp_in -> mlp_out (CLT) at each.
      layers=config_dict.placeholder(object),
      causal=False,             # crosscoders: weakly causal masks
      # JumpReLU CLTs: per-layer L0 targets, each with its own quadratic
      # penalty: 'even' (target_l0 split evenly) or one number per layer;
      # None: one penalty on the total target_l0 (layers share it freely).
      l0_targets=config_dict.placeholder(object),
      # JumpReLU CLTs: start from trained JumpReLU transcoders, one per
      # layer (training/init_from.py): a tuple of their workdirs or export
      # folders in layer order, a pattern with '{layer}', or one group
      # run's workdir (its export/transcoder/layer_L); None: random init.
      init_from=config_dict.placeholder(object),
      init_prefix=config_dict.placeholder(int),  # latents taken from each
                                # (its Matryoshka prefix); None: all
      # Drop a taken latent whose decoder and encoder cosines with an
      # earlier kept one of its layer both exceed this (>= 1: keep all).
      init_dedup_cosine=0.95,
  ))
  c.train = ml_collections.ConfigDict(dict(
      num_tokens=614_400,       # activations seen in training
      batch_size=512,
      lr=1e-3,
      lr_warmup_steps=150,
      lr_decay_fraction=0.2,    # linear decay to 0 over the last fraction
      beta1=0.0,
      beta2=0.999,
      sparsity_coeff=1.0,
      sparsity_warmup_steps=300,
      # JumpReLU quadratic penalty: its L0* (dictionary.target_l0, a CLT's
      # l0_targets) starts at l0_target_start times itself and falls
      # linearly to it over this many steps (0: off, the goal throughout).
      l0_target_decay_steps=0,
      l0_target_start=4.0,      # that starting multiple of the goal (>= 1)
      # > 0: the high-frequency term (dictionary.freq_coeff) is off before
      # this step, then ramps in linearly over sparsity_warmup_steps; 0: it
      # warms up with the L0 penalty from step 0. Early in training almost
      # every latent fires on most tokens, so a term on from step 0 acts on
      # all of them at once.
      freq_start_step=0,
      b_dec_init="mean",        # 'mean' of the first bucket, or 'zeros'
      # Initial norm of every latent's decoder row and encoder column (W_enc
      # = W_dec^T at init); with unit_decoder the rows go back to unit norm
      # after the first step, so this sets the encoder's initial scale.
      # 1.0: the published init.
      init_norm=1.0,
      # Departures from the published recipe, for comparison with SAELens
      # (its defaults: grad_clip_norm=1, unit_decoder=False, init_norm=0.1,
      # l0_per_token=True with sparsity_coeff ~0.03).
      grad_clip_norm=0.0,       # clip the global gradient norm (0: off)
      unit_decoder=True,        # unit-norm decoder rows (False: free)
      l0_per_token=False,       # JumpReLU: penalty of each token's L0,
                                # averaged (else of the batch-mean L0)
      step="dense",             # 'dense', 'sparse' (sparsity-aware) or
                                # 'autodiff' (jax.grad; the reference)
      sparse_capacity=256,      # active entries per token the sparse step holds
      checkpoint_every_steps=200,
      keep_checkpoints=2,
      log_every_steps=10,
      dead_after_tokens=100_000,  # a latent silent this long counts as dead
  ))
  # Logical axes: 'batch' (activations), 'latent' (dictionary width),
  # 'embed' (activation width). -1 = all remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, model=1,
      rules=(("batch", "data"), ("latent", "model"), ("embed", None)),
      # How Gemma's parameters are laid out over the mesh: 'replicated'
      # (every device holds all), 'fsdp' (sharded over 'data', gathered
      # per layer) or 'fsdp_tp' (also tensor-parallel over 'model').
      gemma="replicated",
  ))
  # Multi-host runs (JAX's multi-controller runtime). num_processes 0: a
  # single process unless the environment says otherwise (Cloud TPU, SLURM,
  # or the GEMSCOPE_* variables); see parallel/distributed.py.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="",   # host:port of process 0
      num_processes=0,
      process_id=-1,
      initialization_timeout_s=300,
      # A process that stops heartbeating for this long fails the others.
      heartbeat_timeout_s=60,
  ))
  c.eval = ml_collections.ConfigDict(dict(
      text="english_heldout",   # files the 'english' corpus leaves out
      format="text",            # how eval.text reads, as data.format
      num_tokens=131_072,       # L0, FVU, dead/dense latents
      loss_tokens=8_192,        # delta LM loss (3 full passes: the cost)
      # Which windows the loss passes read: 'leading' (the sample's first
      # loss_tokens, i.e. its first files) or 'spread' (that many spread
      # evenly over all num_tokens, so they hold the sample's mixture).
      loss_windows="leading",
      seq_len=128,
      batch_size=8,
      dense_threshold=0.1,
      at_end=True,
      # prefix_fvu/M for these latent counts M (None: a Matryoshka
      # dictionary's own prefixes), e.g. (256, 1024) on a plain SAE to
      # compare it with a Matryoshka one.
      prefixes=config_dict.placeholder(tuple),
  ))
  # End-to-end fine-tuning of a trained SAE (`gemscope finetune`,
  # training/finetune.py): Gemma Scope 2's loss (MSE + alpha * beta * KL)
  # / (1 + beta) + the usual sparsity penalty, alpha = MSE / KL held
  # constant. Unused by `gemscope train`.
  c.finetune = ml_collections.ConfigDict(dict(
      source="",                # the trained workdir it starts from
      beta=1.0,                 # the KL term's weight (0: MSE only)
      # A group's members: spliced 'together' (the KL of the replacement
      # model) or each 'alone' into the clean model (a KL each).
      splice="together",
      num_tokens=20_320,        # ordinary tokens seen (40 steps of 4 x 127)
      windows_per_step=4,       # token windows of data.seq_len per step
      lr=5e-5,
      beta1=0.0,                # Adam's first-moment decay (beta2: train's)
      lr_warmup_steps=4,
      lr_decay_fraction=0.2,    # linear decay to 0 over the last fraction
      # Adam's moments: 'fresh', or 'source' (the trained run's, schedule
      # restarted: its second moments fit the MSE's small gradients, so the
      # KL's first steps come out up to 30x lr; measured harmful).
      optimizer_state="fresh",
      checkpoint_every_steps=10,
      log_every_steps=2,
  ))
  return c


def is_dict(x) -> bool:
  """Whether `x` is a mapping or a ConfigDict (a config node)."""
  return isinstance(x, (Mapping, ml_collections.ConfigDict))


def to_json(c: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict (tuples become lists)."""
  return ml_collections.ConfigDict(c).to_dict()


def from_json(d: Mapping) -> ml_collections.ConfigDict:
  """Inverse of `to_json`, restoring tuple-valued fields as tuples."""
  c = default_config()

  def fill(node, values):
    for key, value in values.items():
      if is_dict(value) and key in node and isinstance(
          node[key], ml_collections.ConfigDict):
        fill(node[key], value)
      else:
        if isinstance(value, list):
          value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        node[key] = value
  fill(c, d)
  return c
