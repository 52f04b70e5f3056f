"""Loads Gemma 3 weights saved by Hugging Face transformers.

Accepts a directory (`config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json`), a single .safetensors file, or an in-memory
state dict of numpy arrays or torch tensors (torch is not imported here).
Both the text-only `Gemma3ForCausalLM` naming (`model.layers.N...`) and the
multimodal `Gemma3ForConditionalGeneration` naming
(`model.language_model.layers.N...`, `language_model.model...`) are read;
vision-tower tensors are ignored. HF stores RMSNorm weights as the raw
`scale` of `(1 + scale)`, as we do.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open

from gemscope_jax.convert._errors import CheckpointError
from gemscope_jax.convert._linear import SourceNames, from_linear_layout
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


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
  index = directory / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
      raise CheckpointError(index, "weight_map", f"unreadable index: {e}"
                            ) from e
    return sorted({directory / f for f in weight_map.values()})
  single = directory / "model.safetensors"
  if single.exists():
    return [single]
  raise FileNotFoundError(f"{directory}: no model.safetensors or "
                          "model.safetensors.index.json")


def _read_safetensors(files: list[pathlib.Path]) -> dict[str, Any]:
  """{canonical name: lazy getter}; nothing is read until a tensor is asked."""
  getters = {}
  for f in files:
    try:
      handle = safe_open(str(f), framework="flax")
      keys = list(handle.keys())
    except Exception as e:  # safetensors raises its own SafetensorError.
      raise CheckpointError(f, None, f"not a readable safetensors file "
                            f"(truncated or corrupt?): {e}") from e
    for key in keys:
      getters[_canonical(key)] = (f, handle, key)
  return getters


def load_hf(source: str | os.PathLike | Mapping[str, Any],
            config: Gemma3Config | None = None,
            dtype: np.dtype = np.float32) -> tuple[Gemma3Config, dict]:
  """Reads a transformers Gemma 3 checkpoint into the official parameter tree.

  Args:
    source: A directory, a .safetensors file, or a state dict.
    config: The size the weights must fit; read from config.json if None
      (required for a bare file or state dict without a directory).
    dtype: numpy dtype of the returned leaves.

  Returns:
    (config, params).
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
    directory = path if path.is_dir() else path.parent
    files = _safetensors_files(path) if path.is_dir() else [path]
    if config is None:
      cfg_file = directory / "config.json"
      if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file}: needed to know the model size "
                                "(or pass config=)")
      try:
        hf_cfg = json.loads(cfg_file.read_text())
      except ValueError as e:
        raise CheckpointError(cfg_file, None, f"invalid JSON: {e}") from e
      config = config_from_hf(hf_cfg, str(cfg_file))
    getters = _read_safetensors(files)

    def get(key):
      f, handle, raw = getters[key]
      try:
        return np.asarray(handle.get_tensor(raw), np.float32)
      except Exception as e:
        raise CheckpointError(f, raw, f"cannot read tensor: {e}") from e
  if config is None:
    raise ValueError(f"{name}: pass config= to load a bare state dict")
  params = from_linear_layout(get, config, HF_NAMES, source=name, dtype=dtype)
  return config, params
