"""Loads Gemma 3 weights from a GGUF file (any quantisation gguf can read).

GGUF conventions undone here: tensors are (out, in) like PyTorch Linear, norm
weights are stored as `1 + scale`, the output layer is tied (no
`output.weight`), and Gemma's q/k are not permuted. The metadata lacks the
local RoPE base, the attention pattern and the query scale; those come from
the matching family size.

Caveat: `gguf.GGUFReader` parses the 262k-entry vocabulary in Python (about
13 s for Gemma 3); dequantising all tensors takes a few seconds more and
peaks at about 2 GB for 270M. `gemscope_jax.convert.pretrained` caches the result.
"""

from __future__ import annotations

import os
import pathlib

import gguf
import numpy as np

from gemscope_jax.convert._errors import CheckpointError
from gemscope_jax.convert._linear import SourceNames, from_linear_layout
from gemscope_jax.models._config import CONFIGS, Gemma3Config

GGUF_NAMES = SourceNames(
    embedding="token_embd.weight",
    final_norm="output_norm.weight",
    q="blk.{i}.attn_q.weight",
    k="blk.{i}.attn_k.weight",
    v="blk.{i}.attn_v.weight",
    o="blk.{i}.attn_output.weight",
    q_norm="blk.{i}.attn_q_norm.weight",
    k_norm="blk.{i}.attn_k_norm.weight",
    gate="blk.{i}.ffn_gate.weight",
    up="blk.{i}.ffn_up.weight",
    down="blk.{i}.ffn_down.weight",
    pre_attention_norm="blk.{i}.attn_norm.weight",
    post_attention_norm="blk.{i}.post_attention_norm.weight",
    pre_ffw_norm="blk.{i}.ffn_norm.weight",
    post_ffw_norm="blk.{i}.post_ffw_norm.weight",
)


def open_reader(path: str | os.PathLike):
  """A gguf.GGUFReader, with unreadable files turned into CheckpointError."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such GGUF file")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # gguf raises ValueError/IndexError/struct errors.
    raise CheckpointError(path, None, f"not a readable GGUF file "
                          f"(truncated or corrupt?): {type(e).__name__}: {e}"
                          ) from e


def _field(reader, path, key: str, required: bool = True):
  field = reader.fields.get(key)
  if field is None:
    if required:
      raise CheckpointError(path, key, "metadata field is missing")
    return None
  return field.contents()


def config_from_gguf(reader, path: str | os.PathLike,
                     config: Gemma3Config | None = None) -> Gemma3Config:
  """The Gemma 3 size a GGUF holds, read from its metadata and checked."""
  arch = _field(reader, path, "general.architecture")
  if arch != "gemma3":
    raise CheckpointError(path, "general.architecture",
                          f"is {arch!r}; only Gemma 3 ('gemma3') is supported")
  dims = dict(
      num_layers=_field(reader, path, "gemma3.block_count"),
      d_model=_field(reader, path, "gemma3.embedding_length"),
      mlp_dim=_field(reader, path, "gemma3.feed_forward_length"),
      num_heads=_field(reader, path, "gemma3.attention.head_count"),
      num_kv_heads=_field(reader, path, "gemma3.attention.head_count_kv"),
      head_dim=_field(reader, path, "gemma3.attention.key_length"),
      sliding_window=_field(reader, path, "gemma3.attention.sliding_window"),
  )
  dims = {k: int(v) for k, v in dims.items()}
  embed = next((t for t in reader.tensors if t.name == GGUF_NAMES.embedding),
               None)
  if embed is None:
    raise CheckpointError(path, GGUF_NAMES.embedding, "tensor is missing")
  dims["vocab_size"] = int(embed.shape[-1])  # ggml order: (d_model, vocab)
  base = _field(reader, path, "gemma3.rope.freq_base", required=False)
  if base is not None:
    dims["rope_base_global"] = float(base)
  factor = _field(reader, path, "gemma3.rope.scaling.factor", required=False)
  if factor is not None:
    dims["rope_scale_global"] = float(factor)

  candidates = [config] if config is not None else list(CONFIGS.values())
  for c in candidates:
    if all(getattr(c, k) == v for k, v in dims.items()):
      return c
  if config is not None:
    bad = {k: (v, getattr(config, k)) for k, v in dims.items()
           if getattr(config, k) != v}
    field, (got, want) = next(iter(bad.items()))
    raise CheckpointError(path, field, f"file has {got}, {config.name} "
                          f"needs {want} (mismatches: {sorted(bad)})")
  # An unpublished size: take what the metadata says, the rest from 270M.
  return CONFIGS["gemma3_270m"].replace(name="gemma3_custom", **dims)


def load_gguf(path: str | os.PathLike, config: Gemma3Config | None = None,
              dtype: np.dtype = np.float32, reader=None
              ) -> tuple[Gemma3Config, dict]:
  """Reads and dequantises a Gemma 3 GGUF into the official parameter tree.

  Args:
    path: The .gguf file.
    config: The size it must hold; inferred from the metadata if None.
    dtype: numpy dtype of the returned leaves.
    reader: An already open gguf.GGUFReader of `path`, to avoid re-parsing.

  Returns:
    (config, params) with params a nested dict of numpy arrays.

  Raises:
    FileNotFoundError: `path` does not exist.
    CheckpointError: the file is unreadable, not Gemma 3, lacks a tensor, or
      holds a tensor whose shape does not fit.
  """
  reader = reader if reader is not None else open_reader(path)
  config = config_from_gguf(reader, path, config)
  tensors = {t.name: t for t in reader.tensors}

  def get(name: str) -> np.ndarray:
    t = tensors[name]
    try:
      return gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise CheckpointError(path, name, f"cannot dequantise "
                            f"{t.tensor_type.name} data: {e}") from e

  params = from_linear_layout(get, config, GGUF_NAMES, source=str(path),
                              norm_offset=1.0, dtype=dtype)
  return config, params
