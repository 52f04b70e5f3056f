"""Writes Gemma 3 weights as a Hugging Face transformers checkpoint.

`save_hf(config, params, out_dir)` produces a directory that
`transformers.Gemma3ForCausalLM.from_pretrained(out_dir)` loads: a
`config.json` (model_type "gemma3_text") and `model.safetensors`, or
numbered shards plus `model.safetensors.index.json` when `max_shard_bytes` is
given. It is the exact inverse of `hf.load_hf`: the same tensor names
(`hf.HF_NAMES`) and the inverse reshapes (`_linear.to_linear_layout`), so
`load_hf(save_hf(c, p, d))` returns `p` bit for bit in float32. The
embedding is tied, so no `lm_head.weight` is written.

The config carries both the transformers >= 5 fields (`layer_types`,
`rope_parameters` per attention type, `dtype`) and their older spellings
(`sliding_window_pattern`, `rope_theta`, `rope_local_base_freq`,
`rope_scaling`, `torch_dtype`), so 4.x releases read the same file.

The directory is built in a hidden temporary sibling and renamed into place
only once complete (`safe_write.atomic_dir`); an existing non-empty
destination is refused unless `overwrite=True`, and then only the files a
model export writes (`OWNS`: config, weights, shards, index) are replaced or
removed, after the new ones are complete; anything else there is kept. A
killed export's temporary folder is removed by the next export to the
same place.

Caveat: every tensor of the model is materialised in host memory at once in
the output dtype (float32: 4 bytes per parameter, about 1.1 GB for 270M and
108 GB for 27B); shards are written one after another from that dictionary,
so sharding limits file sizes, not memory. No tokenizer files are written.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from gemscope_jax import assets, errors, safe_write
from gemscope_jax.convert import _tree
from gemscope_jax.convert import pretrained
from gemscope_jax.convert._linear import to_linear_layout
from gemscope_jax.convert.hf import HF_NAMES
from gemscope_jax.models._config import Gemma3Config

DTYPES = {"float32": np.dtype(np.float32),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# What an export writes: with overwrite, these are replaced or removed (a
# stale shard of an older export), nothing else.
OWNS = ("config.json", "model.safetensors", "model-*-of-*.safetensors",
        "model.safetensors.index.json")

# Gemma 3's SentencePiece special ids: <pad> 0, <eos> 1, <bos> 2.
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


def _number(x: float) -> int | float:
  """An int where the value is integral: transformers types some as int."""
  return int(x) if float(x).is_integer() else float(x)


def hf_config(config: Gemma3Config, dtype: str = "float32") -> dict[str, Any]:
  """The transformers `Gemma3TextConfig` dict of one of our configs.

  Args:
    config: the model size.
    dtype: "float32" or "bfloat16", recorded as the checkpoint's dtype.

  Returns:
    A JSON-serialisable dict for `config.json`.
  """
  c = config
  layer_types = ["full_attention" if (i + 1) % c.global_every == 0
                 else "sliding_attention" for i in range(c.num_layers)]
  full = {"rope_type": "default", "rope_theta": float(c.rope_base_global)}
  scaling = None
  if c.rope_scale_global != 1.0:
    scaling = {"rope_type": "linear", "factor": float(c.rope_scale_global)}
    full.update(scaling)
  # The published configs: 32k context up to 1B, 128k for the RoPE-scaled.
  max_positions = 131_072 if c.rope_scale_global != 1.0 else 32_768
  return {
      "architectures": ["Gemma3ForCausalLM"],
      "model_type": "gemma3_text",
      "vocab_size": c.vocab_size,
      "hidden_size": c.d_model,
      "intermediate_size": c.mlp_dim,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "hidden_activation": "gelu_pytorch_tanh",
      "max_position_embeddings": max_positions,
      "rms_norm_eps": float(c.norm_eps),
      "query_pre_attn_scalar": _number(c.query_pre_attn_scalar),
      "sliding_window": c.sliding_window,
      "layer_types": layer_types,
      "sliding_window_pattern": c.global_every,
      "rope_parameters": {
          "sliding_attention": {"rope_type": "default",
                                "rope_theta": float(c.rope_base_local)},
          "full_attention": full,
      },
      "rope_theta": float(c.rope_base_global),
      "rope_local_base_freq": float(c.rope_base_local),
      "rope_scaling": scaling,
      "final_logit_softcapping": None,
      "attn_logit_softcapping": None,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "use_bidirectional_attention": False,
      "tie_word_embeddings": True,
      "bos_token_id": BOS_ID,
      "eos_token_id": EOS_ID,
      "pad_token_id": PAD_ID,
      "use_cache": True,
      "initializer_range": 0.02,
      "dtype": dtype,
      "torch_dtype": dtype,
  }


def _shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int | None
            ) -> list[list[str]]:
  """Tensor names grouped in order so each group stays within the limit.

  A tensor larger than the limit gets a shard of its own (as transformers
  does); it cannot be split.
  """
  if max_shard_bytes is None:
    return [list(tensors)]
  groups, size = [[]], 0
  for name, x in tensors.items():
    if groups[-1] and size + x.nbytes > max_shard_bytes:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += x.nbytes
  return groups


def _write_safetensors(tensors: Mapping[str, np.ndarray],
                       path: pathlib.Path) -> None:
  # transformers refuses safetensors files without the "pt" format tag.
  save_file(dict(tensors), str(path), metadata={"format": "pt"})


def save_hf(config: Gemma3Config, params: Mapping[str, Any],
            out_dir: str | os.PathLike, *, dtype: str = "float32",
            max_shard_bytes: int | None = None,
            overwrite: bool = False) -> pathlib.Path:
  """Writes `params` as a transformers `Gemma3ForCausalLM` directory.

  Args:
    config: the model size `params` must fit.
    params: our official-layout tree (numpy or jax leaves, any float dtype).
    out_dir: destination directory; created with its parents.
    dtype: "float32" or "bfloat16", the dtype of the stored tensors.
    max_shard_bytes: if set, tensors are split over
      `model-0000i-of-0000n.safetensors` files of at most this many bytes
      (one larger tensor gets its own file) plus
      `model.safetensors.index.json`; otherwise one `model.safetensors`.
    overwrite: write into a non-empty `out_dir`, replacing only what a
      model export writes (`OWNS`).

  Returns:
    The written directory.

  Raises:
    CheckpointError: a parameter is missing, extra, misshapen or not a float
      (the message names the parameter and both shapes); nothing is written.
    errors.OutputError: `out_dir` is a file, is non-empty and `overwrite`
      is False, or cannot be written.
    ValueError: unknown dtype or a non-positive `max_shard_bytes`.
  """
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  if max_shard_bytes is not None and max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  flag = errors.option("out_dir", "--out")
  target = safe_write.check_dir_output(out_dir, overwrite=overwrite,
                                       flag=flag)
  _tree.check_params(params, config, source="params")
  tensors = to_linear_layout(params, config, HF_NAMES, dtype=DTYPES[dtype])

  with assets.atomic_dir(target, overwrite=overwrite, owns=OWNS,
                         flag=flag) as tmp:
    groups = _shards(tensors, max_shard_bytes)
    if len(groups) == 1:
      _write_safetensors(tensors, tmp / "model.safetensors")
    else:
      weight_map = {}
      for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        _write_safetensors({n: tensors[n] for n in names}, tmp / file)
        weight_map.update({n: file for n in names})
      index = {"metadata": {"total_size": int(sum(x.nbytes for x in
                                                  tensors.values()))},
               "weight_map": weight_map}
      (tmp / "model.safetensors.index.json").write_text(
          json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(
        json.dumps(hf_config(config, dtype), indent=2) + "\n")
  return target


def export_model(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: str = "float32", max_shard_bytes: int | None = None,
                 overwrite: bool = False) -> pathlib.Path:
  """Loads a Gemma 3 as `pretrained.load_model` does and writes it for HF.

  Args:
    source: anything `pretrained.load_model` accepts ("default", a .gguf
      file, a transformers directory, an Orbax checkpoint).
    out_dir: destination directory (see `save_hf`).
    dtype: "float32" or "bfloat16".
    max_shard_bytes: see `save_hf`.
    overwrite: write into a non-empty `out_dir` (see `save_hf`).

  Returns:
    The written directory.
  """
  # The destination before the model loads (minutes for the large sizes).
  safe_write.check_dir_output(out_dir, overwrite=overwrite,
                              flag=errors.option("out_dir", "--out"))
  config, params = pretrained.load_model(source)
  return save_hf(config, params, out_dir, dtype=dtype,
                 max_shard_bytes=max_shard_bytes, overwrite=overwrite)
