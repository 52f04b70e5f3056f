"""The one validation pass over a training config: every field checked up
front, each error naming the field, so a typo or an impossible value fails
at launch rather than hours later as a NaN or a shape error.

Caveat: checks what can be checked without loading anything big or touching
devices; the mesh against the device count and the multi-host settings are
checked where those exist (`parallel.make_mesh`, `parallel.distributed`).
"""

from __future__ import annotations

import difflib
import pathlib
from typing import Any, Mapping

import ml_collections

from gemscope_jax import models
from gemscope_jax.convert import hub
from gemscope_jax.text import conversations, corpora, windows
from gemscope_jax.training import members, schema

# The architectures `training.grads.sparse` has a step for.
SPARSE_ARCHITECTURES = ("jumprelu", "topk", "batchtopk", "jumprelu_transcoder",
                        "topk_transcoder", "jumprelu_clt", "topk_clt")


def _need(ok: bool, field: str, message: str, value: Any) -> None:
  if not ok:
    raise ValueError(f"config.{field}: {message}, got {value!r}")


def _unknown_fields(c: Mapping, schema_: Mapping, prefix: str) -> list[str]:
  bad = []
  for key in c.keys():
    path = f"{prefix}{key}"
    if key not in schema_:
      hint = difflib.get_close_matches(key, list(schema_.keys()), n=1)
      bad.append(path + (f" (did you mean {prefix}{hint[0]}?)" if hint
                         else ""))
    elif schema.is_dict(schema_[key]) and schema.is_dict(c[key]):
      bad += _unknown_fields(c[key], schema_[key], path + ".")
  return bad


def _is_count(x) -> bool:
  """An int >= 0 (not a bool)."""
  return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_l0_decay(t, d) -> None:
  """train.l0_target_decay_steps / l0_target_start."""
  steps = t.get("l0_target_decay_steps", 0)
  start = t.get("l0_target_start", 4.0)
  _need(_is_count(steps), "train.l0_target_decay_steps",
        "must be an int >= 0 (0: off)", steps)
  _need(isinstance(start, (int, float)) and start >= 1,
        "train.l0_target_start", "must be a number >= 1 (the multiple of "
        "the L0 target it falls from)", start)
  _need(not steps or (d.architecture.startswith("jumprelu")
                      and d.sparsity_penalty == "quadratic"),
        "train.l0_target_decay_steps", "decays the quadratic penalty's L0 "
        "target: it needs a jumprelu architecture with "
        "dictionary.sparsity_penalty 'quadratic' (not "
        f"{d.architecture!r} / {d.sparsity_penalty!r}), or 0", steps)


def _check_freq_start(t, d) -> None:
  """train.freq_start_step."""
  start = t.get("freq_start_step", 0)
  _need(_is_count(start), "train.freq_start_step",
        "must be an int >= 0 (0: from the start)", start)
  _need(not start or d.get("freq_coeff"), "train.freq_start_step",
        "delays the high-frequency term: set dictionary.freq_coeff > 0 too, "
        "or leave it at 0", start)


def _check_init_from(d, dictionaries: list) -> None:
  """dictionary.init_from / init_prefix / init_dedup_cosine (the form
  only: the files are read when a fresh run starts, `init_from.load`)."""
  spec, prefix = d.get("init_from"), d.get("init_prefix")
  cosine = d.get("init_dedup_cosine", 0.95)
  _need(spec is None or d.architecture == "jumprelu_clt",
        "dictionary.init_from", "starts a CLT from JumpReLU transcoders: it "
        f"needs architecture 'jumprelu_clt' (not {d.architecture!r})", spec)
  if spec is not None:
    members.init_from_paths(spec, dictionaries[0][0])
  _need(prefix is None or spec is not None, "dictionary.init_prefix",
        "needs dictionary.init_from", prefix)
  _need(prefix is None or (isinstance(prefix, int)
                           and 1 <= prefix <= d.width),
        "dictionary.init_prefix", f"must be None (all) or an int in [1, "
        f"dictionary.width={d.width}]", prefix)
  _need(isinstance(cosine, (int, float)) and cosine > 0,
        "dictionary.init_dedup_cosine", "must be a number > 0 (>= 1 keeps "
        "every latent)", cosine)


def validate(c: ml_collections.ConfigDict
             ) -> tuple[models.Gemma3Config, list[tuple[Any, Any]]]:
  """Validates `c`. Raises ValueError (FileNotFoundError for text).

  Returns:
    (the Gemma config it names, [(Layout, DictConfig)] of every dictionary
    it trains), read while checking so that `plans.make` reads them once.

  Checks what can be checked without loading anything big: field names,
  ranges, the model size and hookpoint, the dictionary (through
  `dictionaries.DictConfig`), the mesh and the text files' existence.
  """
  bad = _unknown_fields(c, schema.default_config(), "")
  if bad:
    raise ValueError("config has unknown field(s): " + ", ".join(bad))
  _need(c.model.name in models.CONFIGS, "model.name",
        f"must be one of {', '.join(models.CONFIGS)}", c.model.name)
  mc = models.get_config(c.model.name)
  _need(c.model.dtype in schema.DTYPES, "model.dtype",
        f"must be one of {schema.DTYPES}",
        c.model.dtype)
  _need(bool(c.model.checkpoint), "model.checkpoint",
        "is required: 'default' (270M only), a checkpoint path, a Hub repo "
        "id or 'random'", c.model.checkpoint)
  _need(c.model.checkpoint != "default" or c.model.name == "gemma3_270m",
        "model.checkpoint", "'default' is the embedded Gemma 3 270M only",
        c.model.checkpoint)
  if c.model.checkpoint not in ("default", "random"):
    _need(pathlib.Path(c.model.checkpoint).exists()
          or hub.parse_repo_id(c.model.checkpoint) is not None,
          "model.checkpoint", "no such file or directory, nor a Hub repo id "
          "'owner/name[@revision]'", c.model.checkpoint)
  try:
    models.hooks.parse(c.hookpoint).check(mc)
  except ValueError as e:
    raise ValueError(f"config.hookpoint: {e}") from None
  d = c.dictionary
  group, kind = members.is_group(c), members.kind(c)
  _need(not (group and kind in ("crosscoder", "clt")), "group",
        f"a {d.architecture} is one dictionary over many layers: set "
        "dictionary.layers, not group.layers/group.sites",
        (c.group.layers, c.group.sites))
  _need(not (group and kind == "transcoder" and c.group.sites is not None
             and len(members.sites(c.group.sites)) > 1),
        "group.sites", "a group of transcoders reads one site (each "
        "predicts mlp_out of its layer)", c.group.sites)
  dictionaries = []
  for lay in members.layouts(c, mc):
    try:
      dictionaries.append((lay, members.dict_config(c, lay, mc)))
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
  _need(t.step in schema.STEPS, "train.step",
        f"must be one of {schema.STEPS}", t.step)
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
  _need(not d.get("l0_preact_bandwidth")
        or (d.architecture.startswith("jumprelu") and t.step != "sparse"),
        "dictionary.l0_preact_bandwidth", "needs a jumprelu architecture and "
        "train.step 'dense' or 'autodiff' (it runs on autodiff)",
        d.get("l0_preact_bandwidth"))
  _need(not d.get("freq_coeff") or (d.architecture.startswith("jumprelu")
                                    and t.step != "sparse"),
        "dictionary.freq_coeff", "needs a jumprelu architecture and "
        "train.step 'dense' or 'autodiff'", d.get("freq_coeff"))
  _need(not d.get("dense_rank") or t.step != "sparse",
        "dictionary.dense_rank", "needs train.step 'dense' or 'autodiff'",
        d.get("dense_rank"))
  _check_l0_decay(t, d)
  _check_freq_start(t, d)
  _check_init_from(d, dictionaries)
  _need(t.step != "sparse" or (d.architecture in SPARSE_ARCHITECTURES
                              and d.matryoshka_prefixes is None),
        "train.step", f"'sparse' supports {', '.join(SPARSE_ARCHITECTURES)} "
        f"without matryoshka_prefixes (not dictionary.architecture="
        f"{d.architecture!r}, matryoshka_prefixes={d.matryoshka_prefixes!r}):"
        " use 'dense' or 'autodiff'", t.step)
  _need(c.data.seq_len >= 2, "data.seq_len", "must be at least 2",
        c.data.seq_len)
  _need(c.data.bucket_tokens >= t.batch_size, "data.bucket_tokens",
        f"must be at least train.batch_size={t.batch_size}",
        c.data.bucket_tokens)
  _need(_is_count(c.data.num_shards),
        "data.num_shards", "must be an int >= 0 (0: one per process)",
        c.data.num_shards)
  cache_tokens = c.data.get("cache_tokens", 0)
  _need(_is_count(cache_tokens), "data.cache_tokens",
        "must be an int >= 0 (0: train.num_tokens)", cache_tokens)
  _need(not cache_tokens or c.data.cache_dir, "data.cache_tokens",
        "sizes an activation cache: set data.cache_dir too", cache_tokens)
  _need(not cache_tokens or cache_tokens >= t.batch_size,
        "data.cache_tokens",
        f"must be at least train.batch_size={t.batch_size}", cache_tokens)
  _need(c.data.num_shards == 0 or t.batch_size % c.data.num_shards == 0,
        "data.num_shards", f"must divide train.batch_size={t.batch_size}",
        c.data.num_shards)
  _need(c.data.model_batch_size > 0, "data.model_batch_size",
        "must be positive", c.data.model_batch_size)
  _need(c.eval.num_tokens > 0, "eval.num_tokens", "must be positive",
        c.eval.num_tokens)
  _need(c.eval.loss_tokens > 0, "eval.loss_tokens", "must be positive",
        c.eval.loss_tokens)
  _need(c.eval.get("loss_windows", "leading") in windows.LOSS_WINDOWS,
        "eval.loss_windows", f"must be one of {windows.LOSS_WINDOWS}",
        c.eval.get("loss_windows"))
  _need(0 < c.eval.dense_threshold < 1, "eval.dense_threshold",
        "must be in (0, 1)", c.eval.dense_threshold)
  prefixes = c.eval.get("prefixes")
  _need(not prefixes or (
      all(isinstance(m, int) and 0 < m < d.width for m in prefixes)
      and list(prefixes) == sorted(set(prefixes))), "eval.prefixes",
        f"must be increasing latent counts in [1, dictionary.width={d.width})",
        prefixes)
  _need(c.mesh.model >= 1, "mesh.model", "must be >= 1", c.mesh.model)
  _need(c.mesh.data == -1 or c.mesh.data >= 1, "mesh.data",
        "must be >= 1 or -1 (all remaining devices)", c.mesh.data)
  _need(d.width % c.mesh.model == 0, "dictionary.width",
        f"must be divisible by mesh.model={c.mesh.model}", d.width)
  _need(c.mesh.gemma in ("replicated", "fsdp", "fsdp_tp"), "mesh.gemma",
        "must be 'replicated', 'fsdp' or 'fsdp_tp'", c.mesh.gemma)
  for part in ("data", "eval"):
    fmt = conversations.check_format(c[part].get("format", "text"),
                                     f"config.{part}.format")
    _need(fmt == "text" or c[part].text not in corpora.CORPORA,
          f"{part}.text", f"{part}.format 'chat_jsonl' reads JSONL files, "
          "not a plain-text corpus", c[part].text)
  corpora.text_files(c.data.text, "config.data.text")
  if c.eval.num_tokens and c.eval.at_end:
    corpora.text_files(c.eval.text, "config.eval.text")
  return mc, dictionaries
