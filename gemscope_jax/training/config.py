"""Training configs: the ml_collections schema, presets, loading and checking.

A run is described by one `ml_collections.ConfigDict` (see `default_config`
for every field and its meaning). Config files (`configs/*.py`,
`experiments/*.py`) define `get_config(arg)`; `load("file.py:arg")` imports
one and calls it, and `parse_arg` turns the `arg` string
(`runlocal,layer=6,width=16384,target_l0=60`) into overrides. `check` then
validates every field up front and names the bad one, so a typo or an
impossible value fails at launch, not hours later as a NaN or a shape error.

Caveat: shorthand override keys (`layer`, `site`, `width`, ...) are resolved
by `apply_overrides`; any other key must be a full dotted path
(`train.lr=3e-4`). Values are parsed as Python literals where they parse,
else kept as strings.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from gemscope_jax import dictionaries, models

# Shorthands accepted in `file.py:key=value,...` and by `apply_overrides`.
SHORTHANDS = {
    "width": "dictionary.width",
    "target_l0": "dictionary.target_l0",
    "k": "dictionary.k",
    "arch": "dictionary.architecture",
    "architecture": "dictionary.architecture",
    "lr": "train.lr",
    "batch": "train.batch_size",
    "batch_size": "train.batch_size",
    "tokens": "train.num_tokens",
    "num_tokens": "train.num_tokens",
    "step": "train.step",
    "text": "data.text",
    "cache_dir": "data.cache_dir",
    "model": "model.name",
    "checkpoint": "model.checkpoint",
    "dtype": "model.dtype",
    "seed": "seed",
    "layers": "group.layers",
    "sites": "group.sites",
}

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
      seq_len=128,              # tokens per window, BOS included
      model_batch_size=8,       # windows per Gemma forward pass
      bucket_tokens=65536,      # activations shuffled together
      cache_dir="",             # '' streams; a path harvests there once
      shuffle_windows=True,
      # Data shards the activation stream is split into (each its own
      # windows or cache files, batch_size / num_shards rows of every global
      # batch); 0: one per process. The global batch depends on this, not on
      # the process count (training/distributed.py).
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
      dtype="float32",
      matryoshka_prefixes=config_dict.placeholder(tuple),
      affine_skip=False,        # transcoders: learn x @ w_skip as well
      # Crosscoders and CLTs: the layers one dictionary spans ('all',
      # 'a-b', 'a+b', ints), reading the hookpoint's site (crosscoder) or
      # mlp_in -> mlp_out (CLT) at each.
      layers=config_dict.placeholder(object),
      causal=False,             # crosscoders: weakly causal masks
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
  # or the GEMSCOPE_* variables); see training/distributed.py.
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
      num_tokens=131_072,       # L0, FVU, dead/dense latents
      loss_tokens=8_192,        # delta LM loss (3 full passes: the cost)
      seq_len=128,
      batch_size=8,
      dense_threshold=0.1,
      at_end=True,
  ))
  return c


# Per-size starting points for `preset`: a middle layer, a width and batch
# that suit the model, and a dtype. Larger models shard the latent axis.
PRESETS: dict[str, dict[str, Any]] = {
    "gemma3_270m": dict(layer=6, width=4096, batch=512, dtype="float32",
                        model_axis=1),
    "gemma3_1b": dict(layer=13, width=16384, batch=4096, dtype="bfloat16",
                      model_axis=1),
    "gemma3_4b": dict(layer=17, width=16384, batch=4096, dtype="bfloat16",
                      model_axis=1),
    "gemma3_12b": dict(layer=24, width=65536, batch=4096, dtype="bfloat16",
                       model_axis=4),
    "gemma3_27b": dict(layer=31, width=65536, batch=4096, dtype="bfloat16",
                       model_axis=8),
}

# What `runlocal` shrinks a preset to: minutes on a laptop CPU.
RUNLOCAL = {"train.num_tokens": 65_536, "train.batch_size": 256,
            "train.checkpoint_every_steps": 64, "train.sparsity_warmup_steps":
            64, "train.lr_warmup_steps": 50, "dictionary.width": 1024, "eval.num_tokens": 8192,
            "eval.loss_tokens": 1024,
            "data.bucket_tokens": 16_384}


def preset(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`default_config` set up for model size `name`, then `arg` applied.

  Model sizes other than 270M have no embedded checkpoint: set
  `model.checkpoint` to a path (or 'random' to try the mechanics).
  """
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
  p = PRESETS[name]
  c = default_config()
  c.model.name = name
  c.model.dtype = p["dtype"]
  if name != "gemma3_270m":
    c.model.checkpoint = ""  # must be given
  c.hookpoint = f"layer_{p['layer']}/resid_post"
  c.dictionary.width = p["width"]
  c.train.batch_size = p["batch"]
  c.mesh.model = p["model_axis"]
  if name != "gemma3_270m":
    # Published scale: Gemma Scope's lr, warm-ups and token counts.
    c.train.lr = 7e-5
    c.train.lr_warmup_steps = 1000
    c.dictionary.preact_coeff = 0.0  # the published recipe has none
    c.train.sparsity_warmup_steps = 10_000
    c.train.num_tokens = 4096 * 100_000
    c.train.checkpoint_every_steps = 2000
    c.train.log_every_steps = 100
    c.data.bucket_tokens = 1 << 20
    c.eval.num_tokens = 1 << 20
    c.eval.loss_tokens = 1 << 17
  return apply_overrides(c, parse_arg(arg))


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arg(arg: str | None) -> dict[str, Any]:
  """`'runlocal,layer=6,width=16384'` -> {'runlocal': True, 'layer': 6, ...}.

  Commas inside brackets (tuples, lists) do not split.
  """
  out: dict[str, Any] = {}
  if not arg:
    return out
  parts, depth, cur = [], 0, ""
  for ch in arg:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append(cur)
      cur = ""
    else:
      cur += ch
  parts.append(cur)
  for part in (p.strip() for p in parts):
    if not part:
      continue
    key, sep, value = part.partition("=")
    out[key.strip()] = _literal(value.strip()) if sep else True
  return out


def _set_path(c: ml_collections.ConfigDict, path: str, value: Any) -> None:
  node = c
  keys = path.split(".")
  for i, key in enumerate(keys):
    known = list(node.keys())
    if key not in known:
      where = ".".join(keys[:i]) or "config"
      hint = difflib.get_close_matches(key, known + list(SHORTHANDS), n=1)
      raise ValueError(f"config override {path!r}: {where} has no field "
                       f"{key!r}" + (f" (did you mean {hint[0]!r}?)"
                                     if hint else ""))
    if i == len(keys) - 1:
      old = node[key]
      if isinstance(old, float) and isinstance(value, int) and not isinstance(
          value, bool):
        value = float(value)
      if isinstance(value, list):
        value = tuple(value)
      try:
        node[key] = value
      except TypeError as e:
        raise ValueError(f"config override {path}={value!r}: expected "
                         f"{type(old).__name__}") from e
    else:
      node = node[key]


def apply_overrides(c: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                    ) -> ml_collections.ConfigDict:
  """c with `overrides` applied: shorthands, `layer`/`site`, dotted paths.

  `runlocal` (a flag) shrinks the run to a few minutes on a CPU.
  """
  overrides = dict(overrides)
  if overrides.pop("runlocal", False):
    for path, value in RUNLOCAL.items():
      _set_path(c, path, value)
  hp = models.hooks.parse(c.hookpoint)
  layer = overrides.pop("layer", hp.layer)
  site = overrides.pop("site", hp.site)
  if not isinstance(layer, int):
    raise ValueError(f"config override layer={layer!r}: must be an int")
  c.hookpoint = models.hooks.Hookpoint(layer, site).name
  for key, value in overrides.items():
    _set_path(c, SHORTHANDS.get(key, key), value)
  return c


def load(spec: str) -> ml_collections.ConfigDict:
  """Imports `path.py[:arg]` and returns its `get_config(arg)`."""
  path_text, _, arg = spec.partition(":")
  path = pathlib.Path(path_text)
  if not path.is_file():
    raise FileNotFoundError(f"--config: no such config file {path}")
  module_spec = importlib.util.spec_from_file_location(
      f"gemscope_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path}: a config file must define get_config(arg)")
  return module.get_config(arg or None)


def _is_dict(x) -> bool:
  return isinstance(x, (Mapping, ml_collections.ConfigDict))


def _unknown_fields(c: Mapping, schema: Mapping, prefix: str) -> list[str]:
  bad = []
  for key in c.keys():
    path = f"{prefix}{key}"
    if key not in schema:
      hint = difflib.get_close_matches(key, list(schema.keys()), n=1)
      bad.append(path + (f" (did you mean {prefix}{hint[0]}?)" if hint
                         else ""))
    elif _is_dict(schema[key]) and _is_dict(c[key]):
      bad += _unknown_fields(c[key], schema[key], path + ".")
  return bad


def _need(ok: bool, field: str, message: str, value: Any) -> None:
  if not ok:
    raise ValueError(f"config.{field}: {message}, got {value!r}")


def dict_config(c: ml_collections.ConfigDict, d_in: int, *,
                d_out: int | None = None, n_layers: int | None = None
                ) -> dictionaries.DictConfig:
  """The validated `DictConfig` of `c.dictionary` for inputs of width d_in
  (targets of width d_out; n_layers for crosscoders and CLTs)."""
  d = c.dictionary
  return dictionaries.DictConfig(
      d_in=d_in, d_sae=d.width, architecture=d.architecture,
      d_out=None if d_out == d_in else d_out,
      bandwidth=d.bandwidth, target_l0=d.target_l0, k=d.k,
      sparsity_penalty=d.sparsity_penalty, dtype=d.dtype,
      matryoshka_prefixes=d.matryoshka_prefixes,
      preact_coeff=d.preact_coeff, affine_skip=bool(d.affine_skip),
      n_layers=n_layers, causal=bool(d.causal))


@dataclasses.dataclass(frozen=True)
class Layout:
  """What one dictionary reads and predicts.

  Attributes:
    kind: 'sae', 'transcoder', 'crosscoder' or 'clt'.
    inputs: hookpoints read, in layer order (one, or one per layer).
    targets: hookpoints predicted, aligned with `inputs`; equal to `inputs`
      for SAEs and crosscoders.
  """
  kind: str
  inputs: tuple[str, ...]
  targets: tuple[str, ...]

  @property
  def multilayer(self) -> bool:
    return self.kind in ("crosscoder", "clt")

  @property
  def reconstructs_input(self) -> bool:
    return self.inputs == self.targets

  @property
  def hookpoints(self) -> list[str]:
    """Every hookpoint a batch must hold (inputs, then new targets)."""
    return list(dict.fromkeys(self.inputs + self.targets))

  @property
  def name(self) -> str:
    """How metrics and progress name it: the hookpoint (SAEs),
    'layer_L/transcoder', or the kind with its layers."""
    first = models.hooks.parse(self.inputs[0])
    if self.kind == "sae":
      return first.name
    if self.kind == "transcoder":
      return f"layer_{first.layer}/transcoder"
    layers = [models.hooks.parse(h).layer for h in self.inputs]
    return f"{self.kind}_layers_{layers[0]}-{layers[-1]}"

  @property
  def family(self) -> str:
    """The Gemma Scope 2 folder family: the site (SAEs), 'transcoder',
    'crosscoder' or 'clt'."""
    if self.kind == "sae":
      return models.hooks.parse(self.inputs[0]).site
    return self.kind

  def config(self, c: ml_collections.ConfigDict,
             mc: models.Gemma3Config) -> dictionaries.DictConfig:
    """The `DictConfig` of `c.dictionary` over this layout's widths."""
    d_in = models.hooks.parse(self.inputs[0]).width(mc)
    d_out = models.hooks.parse(self.targets[0]).width(mc)
    return dict_config(c, d_in, d_out=d_out, n_layers=(
        len(self.inputs) if self.multilayer else None))


def kind(c: ml_collections.ConfigDict) -> str:
  """The layout kind of `c.dictionary.architecture`."""
  arch = c.dictionary.architecture
  if arch in dictionaries.TRANSCODERS:
    return "transcoder"
  if arch in dictionaries.CROSSCODERS:
    return "crosscoder"
  if arch in dictionaries.CLTS:
    return "clt"
  return "sae"


def layout(c: ml_collections.ConfigDict, hookpoint: str | None = None,
           mc: models.Gemma3Config | None = None) -> Layout:
  """What the dictionary of `c` at `hookpoint` (default `c.hookpoint`) reads
  and predicts. Errors name the field.

  - SAE: the hookpoint itself.
  - Transcoder: reads the hookpoint (usually `layer_L/mlp_in`), predicts
    `c.target`'s site at the same layer (default `mlp_out`); in a single
    run `c.target` may name another layer at or after the input's.
  - Crosscoder: the hookpoint's site at each of `dictionary.layers`.
  - CLT: `mlp_in` -> `mlp_out` at each of `dictionary.layers`.
  """
  mc = mc or models.get_config(c.model.name)
  name = c.hookpoint if hookpoint is None else hookpoint
  try:
    hp = models.hooks.parse(name).check(mc)
  except ValueError as e:
    raise ValueError(f"config.hookpoint: {e}") from None
  k = kind(c)
  if c.target is not None and k != "transcoder":
    _need(False, "target", "is only for transcoder architectures "
          f"{dictionaries.TRANSCODERS} (an SAE reconstructs its input)",
          c.target)
  if c.dictionary.layers is not None and k not in ("crosscoder", "clt"):
    _need(False, "dictionary.layers", "is only for crosscoders and CLTs "
          "(many dictionaries, one per layer: group.layers)",
          c.dictionary.layers)
  if k == "sae":
    return Layout(k, (hp.name,), (hp.name,))
  if k == "transcoder":
    target = models.hooks.Hookpoint(hp.layer, "mlp_out")
    if c.target is not None:
      try:
        t = models.hooks.parse(c.target).check(mc)
      except ValueError as e:
        raise ValueError(f"config.target: {e}") from None
      target = t if hookpoint is None else models.hooks.Hookpoint(
          hp.layer, t.site)
    _need(target.layer >= hp.layer, "target", f"must be at or after the "
          f"input's layer ({hp.name})", target.name)
    _need(target != hp, "target", "must differ from the hookpoint (that is "
          "an SAE)", target.name)
    return Layout(k, (hp.name,), (target.name,))
  spec = "all" if c.dictionary.layers is None else c.dictionary.layers
  layers = _group_layers(spec, mc.num_layers, "dictionary.layers")
  if k == "crosscoder":
    names = tuple(models.hooks.Hookpoint(l, hp.site).name for l in layers)
    return Layout(k, names, names)
  return Layout(k, tuple(f"layer_{l}/mlp_in" for l in layers),
                tuple(f"layer_{l}/mlp_out" for l in layers))


def check(c: ml_collections.ConfigDict) -> models.Gemma3Config:
  """Validates `c`; returns the Gemma config it names. Raises ValueError.

  Checks what can be checked without loading anything big: field names,
  ranges, the model size and hookpoint, the dictionary (through
  `dictionaries.DictConfig`), the mesh and the text files' existence.
  """
  bad = _unknown_fields(c, default_config(), "")
  if bad:
    raise ValueError("config has unknown field(s): " + ", ".join(bad))
  _need(c.model.name in models.CONFIGS, "model.name",
        f"must be one of {', '.join(models.CONFIGS)}", c.model.name)
  mc = models.get_config(c.model.name)
  _need(c.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}",
        c.model.dtype)
  _need(bool(c.model.checkpoint), "model.checkpoint",
        "is required: 'default' (270M only), a checkpoint path or 'random'",
        c.model.checkpoint)
  _need(c.model.checkpoint != "default" or c.model.name == "gemma3_270m",
        "model.checkpoint", "'default' is the embedded Gemma 3 270M only",
        c.model.checkpoint)
  if c.model.checkpoint not in ("default", "random"):
    _need(pathlib.Path(c.model.checkpoint).exists(), "model.checkpoint",
          "no such file or directory", c.model.checkpoint)
  try:
    models.hooks.parse(c.hookpoint).check(mc)
  except ValueError as e:
    raise ValueError(f"config.hookpoint: {e}") from None
  d = c.dictionary
  _need(not (is_group(c) and kind(c) in ("crosscoder", "clt")), "group",
        f"a {d.architecture} is one dictionary over many layers: set "
        "dictionary.layers, not group.layers/group.sites",
        (c.group.layers, c.group.sites))
  _need(not (is_group(c) and kind(c) == "transcoder" and c.group.sites
             is not None and len(_group_sites(c.group.sites)) > 1),
        "group.sites", "a group of transcoders reads one site (each "
        "predicts mlp_out of its layer)", c.group.sites)
  layouts = ([layout(c, h, mc) for h in hookpoints(c, mc)] if is_group(c)
             else [layout(c, None, mc)])
  for lay in layouts:
    try:
      lay.config(c, mc)
    except ValueError as e:
      raise ValueError(str(e).replace("DictConfig.", "config.dictionary.")
                       .replace("d_sae", "width")) from None
  t = c.train
  for name in ("num_tokens", "batch_size", "checkpoint_every_steps",
               "keep_checkpoints", "log_every_steps", "sparse_capacity"):
    _need(isinstance(t[name], int) and t[name] > 0, f"train.{name}",
          "must be a positive int", t[name])
  _need(t.num_tokens >= t.batch_size, "train.num_tokens",
        f"must be at least train.batch_size={t.batch_size}", t.num_tokens)
  _need(t.lr > 0, "train.lr", "must be > 0", t.lr)
  _need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2",
        "must be in [0, 1)", (t.beta1, t.beta2))
  _need(0 <= t.lr_decay_fraction <= 1, "train.lr_decay_fraction",
        "must be in [0, 1]", t.lr_decay_fraction)
  _need(t.sparsity_coeff >= 0, "train.sparsity_coeff", "must be >= 0",
        t.sparsity_coeff)
  _need(t.b_dec_init in ("mean", "zeros"), "train.b_dec_init",
        "must be 'mean' or 'zeros'", t.b_dec_init)
  _need(t.step in STEPS, "train.step", f"must be one of {STEPS}", t.step)
  _need(t.init_norm > 0, "train.init_norm", "must be > 0", t.init_norm)
  _need(t.grad_clip_norm >= 0, "train.grad_clip_norm", "must be >= 0 (0: "
        "off)", t.grad_clip_norm)
  _need(not t.l0_per_token or (d.architecture in ("jumprelu",
                                                  "jumprelu_transcoder")
                               and d.matryoshka_prefixes is None
                               and t.step != "sparse"),
        "train.l0_per_token", "needs a jumprelu SAE or transcoder without "
        "matryoshka_prefixes and train.step 'dense' or 'autodiff'",
        t.l0_per_token)
  _need(t.step != "sparse" or (d.architecture in ("jumprelu", "topk",
                                                 "batchtopk")
                              and d.matryoshka_prefixes is None),
        "train.step", "'sparse' supports jumprelu/topk/batchtopk without "
        "matryoshka_prefixes", t.step)
  _need(c.data.seq_len >= 2, "data.seq_len", "must be at least 2",
        c.data.seq_len)
  _need(c.data.bucket_tokens >= t.batch_size, "data.bucket_tokens",
        f"must be at least train.batch_size={t.batch_size}",
        c.data.bucket_tokens)
  _need(isinstance(c.data.num_shards, int) and c.data.num_shards >= 0,
        "data.num_shards", "must be an int >= 0 (0: one per process)",
        c.data.num_shards)
  _need(c.data.num_shards == 0 or t.batch_size % c.data.num_shards == 0,
        "data.num_shards", f"must divide train.batch_size={t.batch_size}",
        c.data.num_shards)
  _need(c.data.model_batch_size > 0, "data.model_batch_size",
        "must be positive", c.data.model_batch_size)
  _need(c.eval.num_tokens > 0, "eval.num_tokens", "must be positive",
        c.eval.num_tokens)
  _need(c.eval.loss_tokens > 0, "eval.loss_tokens", "must be positive",
        c.eval.loss_tokens)
  _need(0 < c.eval.dense_threshold < 1, "eval.dense_threshold",
        "must be in (0, 1)", c.eval.dense_threshold)
  _need(c.mesh.model >= 1, "mesh.model", "must be >= 1", c.mesh.model)
  _need(c.mesh.data == -1 or c.mesh.data >= 1, "mesh.data",
        "must be >= 1 or -1 (all remaining devices)", c.mesh.data)
  _need(d.width % c.mesh.model == 0, "dictionary.width",
        f"must be divisible by mesh.model={c.mesh.model}", d.width)
  _need(c.mesh.gemma in ("replicated", "fsdp", "fsdp_tp"), "mesh.gemma",
        "must be 'replicated', 'fsdp' or 'fsdp_tp'", c.mesh.gemma)
  text_files(c.data.text, "data.text")
  if c.eval.num_tokens and c.eval.at_end:
    text_files(c.eval.text, "eval.text")
  return mc


# --- Groups: many hookpoints from one forward pass (training/group.py). ---


def is_group(c: ml_collections.ConfigDict) -> bool:
  """Whether `c` asks for several dictionaries (`group.layers`/`sites`)."""
  g = c.get("group")
  return g is not None and (g.layers is not None or g.sites is not None)


def _group_layers(spec: Any, num_layers: int,
                  field: str = "group.layers") -> list[int]:
  if isinstance(spec, bool):
    _need(False, field, "must be 'all', 'a-b', 'a+b', an int or ints", spec)
  if isinstance(spec, int):
    layers = [spec]
  elif isinstance(spec, str):
    text = spec.strip()
    try:
      if text == "all":
        layers = list(range(num_layers))
      elif "-" in text:
        lo, hi = (int(t) for t in text.split("-"))
        layers = list(range(lo, hi + 1))
        if not layers:
          raise ValueError
      else:
        layers = [int(t) for t in text.split("+")]
    except ValueError:
      _need(False, field, "must be 'all', 'a-b' (a <= b), 'a+b', an int or "
            "ints", spec)
  elif isinstance(spec, (tuple, list)) and spec and all(
      isinstance(v, int) and not isinstance(v, bool) for v in spec):
    layers = list(spec)
  else:
    _need(False, field, "must be 'all', 'a-b', 'a+b', an int or ints", spec)
  for layer in layers:
    _need(0 <= layer < num_layers, field,
          f"the model has layers 0..{num_layers - 1}", spec)
  return sorted(set(layers))


def _group_sites(spec: Any) -> list[str]:
  if isinstance(spec, str):
    sites = [t.strip() for t in spec.split("+")]
  elif isinstance(spec, (tuple, list)) and spec and all(
      isinstance(v, str) for v in spec):
    sites = list(spec)
  else:
    _need(False, "group.sites", "must be a site, 'a+b' or a tuple of sites",
          spec)
  for site in sites:
    _need(site in models.hooks.SITES, "group.sites",
          f"unknown site {site!r}; sites are {', '.join(models.hooks.SITES)}",
          spec)
  return list(dict.fromkeys(sites))


def hookpoints(c: ml_collections.ConfigDict,
               mc: models.Gemma3Config | None = None) -> list[str]:
  """The hookpoint names `c` trains dictionaries at, sorted (layer, site).

  `[c.hookpoint]` unless `group.layers` or `group.sites` is set; then every
  (layer, site) pair of the two, the unset one taken from `hookpoint`.
  Errors name the field.
  """
  if not is_group(c):
    return [c.hookpoint]
  mc = mc or models.get_config(c.model.name)
  try:
    default = models.hooks.parse(c.hookpoint)
  except ValueError as e:
    raise ValueError(f"config.hookpoint: {e}") from None
  g = c.group
  layers = ([default.layer] if g.layers is None
            else _group_layers(g.layers, mc.num_layers))
  sites = [default.site] if g.sites is None else _group_sites(g.sites)
  return [h.name for h in models.hooks.parse_all(
      models.hooks.Hookpoint(layer, site) for layer in layers
      for site in sites)]


def text_files(spec: str, field: str) -> list[pathlib.Path]:
  """The files a `data.text`-style spec names; errors name `field`."""
  from gemscope_jax.data import text as text_lib  # pylint: disable=import-outside-toplevel
  if spec in text_lib.CORPORA:
    try:
      return text_lib.corpus_files(spec)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.{field}: {e}") from None
  files: list[pathlib.Path] = []
  for part in (p.strip() for p in str(spec).split(",")):
    if not part:
      continue
    path = pathlib.Path(part)
    if path.is_dir():
      found = sorted(p for p in path.rglob("*") if p.is_file()
                     and not p.name.startswith("."))
    elif any(ch in part for ch in "*?["):
      found = sorted(p for p in pathlib.Path().glob(part) if p.is_file())
    elif path.is_file():
      found = [path]
    else:
      raise FileNotFoundError(f"config.{field}: no such text file or "
                              f"directory {part!r}")
    if not found:
      raise FileNotFoundError(f"config.{field}: {part!r} matches no files")
    files += found
  if not files:
    raise FileNotFoundError(f"config.{field}: names no text files "
                            f"({spec!r})")
  return files


def to_json(c: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict (tuples become lists)."""
  return ml_collections.ConfigDict(c).to_dict()


def from_json(d: Mapping) -> ml_collections.ConfigDict:
  """Inverse of `to_json`, restoring tuple-valued fields as tuples."""
  c = default_config()

  def fill(node, values):
    for key, value in values.items():
      if _is_dict(value) and key in node and isinstance(
          node[key], ml_collections.ConfigDict):
        fill(node[key], value)
      else:
        if isinstance(value, list):
          value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        node[key] = value
  fill(c, d)
  return c
