"""Loads Gemma 3 weights saved by Hugging Face transformers.

Accepts a directory (`config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json`), a single .safetensors file, or an in-memory
state dict of numpy arrays or torch tensors (torch is not imported here).
Both the text-only `Gemma3ForCausalLM` naming (`model.layers.N...`) and the
multimodal `Gemma3ForConditionalGeneration` naming
(`model.language_model.layers.N...` as transformers 5 names it in memory,
`language_model.model...` as it saves) are read. Only the text decoder's
tensors are read: the vision tower and projector of a multimodal checkpoint
never are, and a shard holding nothing else is never opened. A config.json
whose `model_type` is not Gemma 3's is refused. HF stores RMSNorm weights as
the raw `scale` of `(1 + scale)`, as we do.

Memory: tensors are read one at a time (memory-mapped, in layer order across
the shards the index names); with `place` each finished leaf is handed on at
once (e.g. `jax.device_put` into its sharding), so the host holds one layer's
tensors in flight rather than the whole model.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Mapping

import jax
import numpy as np
from safetensors import safe_open

from gemscope_jax.convert._errors import CheckpointError
from gemscope_jax.convert._linear import (SourceNames, from_linear_layout,
                                          source_shapes)
from gemscope_jax.models._config import CONFIGS, Gemma3Config

HF_NAMES = SourceNames(
    embedding="model.embed_tokens.weight",
    final_norm="model.norm.weight",
    q="model.layers.{i}.self_attn.q_proj.weight",
    k="model.layers.{i}.self_attn.k_proj.weight",
    v="model.layers.{i}.self_attn.v_proj.weight",
    o="model.layers.{i}.self_attn.o_proj.weight",
    q_norm="model.layers.{i}.self_attn.q_norm.weight",
    k_norm="model.layers.{i}.self_attn.k_norm.weight",
    gate="model.layers.{i}.mlp.gate_proj.weight",
    up="model.layers.{i}.mlp.up_proj.weight",
    down="model.layers.{i}.mlp.down_proj.weight",
    pre_attention_norm="model.layers.{i}.input_layernorm.weight",
    post_attention_norm="model.layers.{i}.post_attention_layernorm.weight",
    pre_ffw_norm="model.layers.{i}.pre_feedforward_layernorm.weight",
    post_ffw_norm="model.layers.{i}.post_feedforward_layernorm.weight",
)

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# config.json `model_type`s of Gemma 3: multimodal (4B-27B) and text-only.
MODEL_TYPES = ("gemma3", "gemma3_text")

# Multimodal checkpoints nest the text decoder under one of these.
_PREFIXES = (("model.language_model.", "model."),
             ("language_model.model.", "model."))


def _canonical(name: str) -> str:
  for old, new in _PREFIXES:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor; numpy has no bfloat16 interop.
    return x.detach().float().cpu().numpy()
  return np.asarray(x)


# transformers' Gemma3TextConfig defaults (checked against the installed
# class by tests/test_loaders.py).
_HF_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "rms_norm_eps": 1e-6,
}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json"
                   ) -> Gemma3Config:
  """Our config from a transformers Gemma3 (text) config dict."""
  # Saved configs omit fields equal to transformers' class defaults.
  hf = {**_HF_TEXT_DEFAULTS, **hf.get("text_config", hf)}
  dims = dict(
      num_layers=int(hf["num_hidden_layers"]),
      d_model=int(hf["hidden_size"]),
      mlp_dim=int(hf["intermediate_size"]),
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(hf["num_key_value_heads"]),
      head_dim=int(hf["head_dim"]),
      vocab_size=int(hf["vocab_size"]),
      sliding_window=int(hf["sliding_window"]),
      query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
      norm_eps=float(hf["rms_norm_eps"]),
  )

  # transformers >= 5 keeps RoPE settings per attention type.
  rope = hf.get("rope_parameters") or {}
  full = rope.get("full_attention") or {}
  local = rope.get("sliding_attention") or {}
  dims["rope_base_global"] = float(full.get("rope_theta",
                                            hf.get("rope_theta", 1e6)))
  dims["rope_base_local"] = float(local.get("rope_theta",
                                            hf.get("rope_local_base_freq", 1e4)))
  scaling = full if full.get("rope_type", "default") != "default" else (
      hf.get("rope_scaling") or {})
  if scaling.get("rope_type", scaling.get("type")) not in (None, "default",
                                                           "linear"):
    raise CheckpointError(source, "rope_scaling", f"unsupported RoPE scaling "
                          f"{scaling}; Gemma 3 uses linear")
  dims["rope_scale_global"] = float(scaling.get("factor", 1.0))

  pattern = int(hf.get("sliding_window_pattern",
                       hf.get("_sliding_window_pattern", 6)))
  layer_types = hf.get("layer_types")
  if layer_types:
    is_global = [t == "full_attention" for t in layer_types]
    fits = lambda every: all(((i + 1) % every == 0) == g
                             for i, g in enumerate(is_global))
    if not fits(pattern):
      pattern = is_global.index(True) + 1 if any(is_global) else 0
      if not pattern or not fits(pattern):
        raise CheckpointError(source, "layer_types", "only a periodic "
                              "local/global pattern ending each period with "
                              "a global layer is supported")
  dims["global_every"] = pattern

  for c in CONFIGS.values():
    if all(getattr(c, k) == v for k, v in dims.items() if k != "vocab_size"):
      return c.replace(vocab_size=dims["vocab_size"])
  return Gemma3Config(name="gemma3_custom", **dims)


def read_hf_config(cfg_file: pathlib.Path) -> dict[str, Any]:
  """config.json as a dict, refused unless it describes a Gemma 3.

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: invalid JSON, or `model_type` (or that of its
      `text_config`) is not Gemma 3's; the message names file and field.
  """
  cfg_file = pathlib.Path(cfg_file)
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{cfg_file}: needed to know the model size "
                            "(or pass config=)")
  try:
    hf_cfg = json.loads(cfg_file.read_text())
  except ValueError as e:
    raise CheckpointError(cfg_file, None, f"invalid JSON: {e}") from e
  if not isinstance(hf_cfg, dict):
    raise CheckpointError(cfg_file, None, "expected a JSON object")
  # Other architectures share most field names (hidden_size, ...), so
  # without this check a Llama or Gemma 2 config would be read as Gemma 3.
  checks = [("model_type", hf_cfg.get("model_type"), MODEL_TYPES)]
  if isinstance(hf_cfg.get("text_config"), dict):
    checks.append(("text_config.model_type",
                   hf_cfg["text_config"].get("model_type", "gemma3_text"),
                   ("gemma3_text",)))
  for field, value, allowed in checks:
    if value not in allowed:
      raise CheckpointError(
          cfg_file, field, f"is {value!r}: not a Gemma 3 checkpoint "
          f"(expected {' or '.join(map(repr, allowed))})")
  return hf_cfg


def read_index(index: pathlib.Path) -> dict[str, str]:
  """The `weight_map` ({tensor name: shard file}) of a sharded checkpoint."""
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
    if not isinstance(weight_map, dict):
      raise ValueError("not a JSON object")
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(index, "weight_map", f"unreadable index: {e}"
                          ) from e
  return weight_map


def needed_keys(names: Any, config: Gemma3Config) -> list[str]:
  """The stored names among `names` that the text decoder of `config` reads.

  Everything else (a multimodal checkpoint's `vision_tower.*` and
  `multi_modal_projector.*`, a tied `lm_head.weight`) is never read.
  """
  wanted = set(source_shapes(config, HF_NAMES))
  return [k for k in names if _canonical(k) in wanted]


class _Tensors:
  """Reads tensors by canonical name, opening each shard only when needed.

  A shard holding none of the wanted tensors is never opened (it may be
  absent: `hub.download_model` skips it); a shard's handle (a memory map)
  is dropped once its last wanted tensor has been read.
  """

  def __init__(self, directory: pathlib.Path, where: dict[str, str],
               wanted: list[str]):
    self._directory = directory
    self._where = {}        # canonical name -> (file, stored name)
    self._left = {}         # file -> stored names not yet read
    for raw in wanted:
      file = where[raw]
      self._where[_canonical(raw)] = (file, raw)
      self._left.setdefault(file, set()).add(raw)
    self._handles = {}

  def _open(self, file: str):
    if file not in self._handles:
      path = self._directory / file
      if not path.is_file():
        raise CheckpointError(path, None, "shard is missing (named by "
                              f"{INDEX})")
      try:
        self._handles[file] = safe_open(str(path), framework="numpy")
      except Exception as e:  # safetensors raises its own SafetensorError.
        raise CheckpointError(path, None, f"not a readable safetensors file "
                              f"(truncated or corrupt?): {e}") from e
    return self._handles[file]

  def __call__(self, name: str) -> np.ndarray:
    file, raw = self._where[name]  # KeyError: from_linear_layout names it.
    handle = self._open(file)
    try:
      x = handle.get_tensor(raw)
    except Exception:  # pylint: disable=broad-except
      # safetensors < 0.7 cannot give bfloat16 to numpy; its "flax" reader
      # can (on the host CPU device, so never via an accelerator).
      try:
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
          with safe_open(str(self._directory / file), framework="flax") as f:
            x = np.asarray(f.get_tensor(raw))
      except Exception as e:
        raise CheckpointError(self._directory / file, raw,
                              f"cannot read tensor: {e}") from e
    self._left[file].discard(raw)
    if not self._left[file]:
      del self._handles[file]
    return x


def _tensors(path: pathlib.Path, config: Gemma3Config) -> _Tensors:
  """The reader of a directory (index or single file) or one .safetensors."""
  if path.is_dir() and (path / INDEX).exists():
    where = read_index(path / INDEX)
    return _Tensors(path, where, needed_keys(where, config))
  file = path / SINGLE if path.is_dir() else path
  if not file.exists():
    raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX}")
  try:
    with safe_open(str(file), framework="numpy") as handle:
      keys = list(handle.keys())  # the header only; no tensor is read.
  except Exception as e:  # safetensors raises its own SafetensorError.
    raise CheckpointError(file, None, f"not a readable safetensors file "
                          f"(truncated or corrupt?): {e}") from e
  return _Tensors(file.parent, {k: file.name for k in keys},
                  needed_keys(keys, config))


def hf_directory_config(path: str | os.PathLike) -> Gemma3Config:
  """Our config from the config.json of a directory (or beside a file)."""
  path = pathlib.Path(path)
  directory = path if path.is_dir() else path.parent
  cfg_file = directory / CONFIG
  return config_from_hf(read_hf_config(cfg_file), str(cfg_file))


def load_hf(source: str | os.PathLike | Mapping[str, Any],
            config: Gemma3Config | None = None,
            dtype: np.dtype = np.float32,
            place: Callable[[str, np.ndarray], Any] | None = None
            ) -> tuple[Gemma3Config, dict]:
  """Reads a transformers Gemma 3 checkpoint into the official parameter tree.

  Only the text decoder's tensors are read (a multimodal checkpoint's vision
  tower and projector never are), one at a time, shard by shard as the
  index places them.

  Args:
    source: A directory, a .safetensors file, or a state dict.
    config: The size the weights must fit; read from config.json if None
      (required for a bare file or state dict without a directory).
    dtype: numpy dtype of the returned leaves (ml_dtypes' bfloat16 too).
    place: Called as `place("layer_3/attn/q_einsum/w", array)` on each leaf
      as soon as it is built; its result becomes the leaf (e.g. a
      `jax.device_put` into the leaf's sharding), so the host never holds
      the whole model at once.

  Returns:
    (config, params).

  Raises:
    FileNotFoundError: no such path, no config.json, no weights file.
    CheckpointError: config.json of another architecture (names the file
      and `model_type`), a missing, misshapen or unreadable tensor.
  """
  if isinstance(source, Mapping):
    tensors = {_canonical(k): v for k, v in source.items()}
    name = "<state dict>"
    get = lambda key: _to_numpy(tensors[key])
  else:
    path = pathlib.Path(source)
    name = str(path)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such file or directory")
    if config is None:
      config = hf_directory_config(path)
    get = _tensors(path, config)
  if config is None:
    raise ValueError(f"{name}: pass config= to load a bare state dict")
  params = from_linear_layout(get, config, HF_NAMES, source=name, dtype=dtype,
                              place=place)
  return config, params
