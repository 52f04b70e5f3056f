"""Shared conversion from PyTorch-Linear-layout checkpoints to our tree.

GGUF files and Hugging Face `Gemma3ForCausalLM` state dicts store the same
tensors the same way: 2-D (out, in) matrices with heads flattened into rows,
one tensor per projection. They differ only in tensor names and in how norm
weights are stored (GGUF adds 1). `SourceNames` captures the naming, and
`from_linear_layout` does the reshaping and validation once for both.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from gemscope_jax.convert._errors import CheckpointError
from gemscope_jax.models._config import Gemma3Config


@dataclasses.dataclass(frozen=True)
class SourceNames:
  """Tensor names of one checkpoint format; `{i}` is the layer index."""
  embedding: str
  final_norm: str
  q: str
  k: str
  v: str
  o: str
  q_norm: str
  k_norm: str
  gate: str
  up: str
  down: str
  pre_attention_norm: str
  post_attention_norm: str
  pre_ffw_norm: str
  post_ffw_norm: str

  def layer_names(self, i: int) -> list[str]:
    return [getattr(self, f.name).format(i=i)
            for f in dataclasses.fields(self)
            if "{i}" in getattr(self, f.name)]


def source_shapes(config: Gemma3Config, names: SourceNames
                  ) -> dict[str, tuple[int, ...]]:
  """Expected (numpy-order) shape of every tensor a checkpoint must hold."""
  c = config
  d, h = c.d_model, c.head_dim
  shapes = {names.embedding: (c.vocab_size, d), names.final_norm: (d,)}
  for i in range(c.num_layers):
    f = lambda n: n.format(i=i)
    shapes.update({
        f(names.q): (c.num_heads * h, d),
        f(names.k): (c.num_kv_heads * h, d),
        f(names.v): (c.num_kv_heads * h, d),
        f(names.o): (d, c.num_heads * h),
        f(names.q_norm): (h,),
        f(names.k_norm): (h,),
        f(names.gate): (c.mlp_dim, d),
        f(names.up): (c.mlp_dim, d),
        f(names.down): (d, c.mlp_dim),
        f(names.pre_attention_norm): (d,),
        f(names.post_attention_norm): (d,),
        f(names.pre_ffw_norm): (d,),
        f(names.post_ffw_norm): (d,),
    })
  return shapes


def from_linear_layout(get: Callable[[str], np.ndarray], config: Gemma3Config,
                       names: SourceNames, *, source: str,
                       norm_offset: float = 0.0,
                       dtype: np.dtype = np.float32) -> dict:
  """Builds the official-layout parameter tree.

  Args:
    get: Returns the tensor stored under a name (numpy order), or raises
      KeyError if the checkpoint lacks it.
    config: The model size the tensors must fit.
    names: The checkpoint format's tensor names.
    source: File or directory, named in error messages.
    norm_offset: Subtracted from norm weights (1.0 for GGUF, which stores
      the `1 + scale` that the model multiplies by).
    dtype: Output dtype of every leaf.

  Returns:
    Nested dict {"embedder": ..., "final_norm": ..., "layer_N": ...}.
  """
  expected = source_shapes(config, names)
  c = config

  def load(name: str) -> np.ndarray:
    try:
      x = get(name)
    except KeyError:
      raise CheckpointError(source, name, "tensor is missing") from None
    x = np.asarray(x)
    if tuple(x.shape) != expected[name]:
      raise CheckpointError(
          source, name, f"shape {tuple(x.shape)} does not fit {c.name}, "
          f"which needs {expected[name]}")
    if not np.issubdtype(x.dtype, np.floating):
      raise CheckpointError(source, name, f"dtype {x.dtype} is not a float")
    return x.astype(np.float32, copy=False)

  def norm(name: str) -> dict:
    return {"scale": (load(name) - norm_offset).astype(dtype)}

  n, k, d, h = c.num_heads, c.num_kv_heads, c.d_model, c.head_dim
  # Leaves are made C-contiguous: writers such as safetensors' numpy
  # save_file store a strided view's raw memory, i.e. silently transposed.
  params = {
      "embedder": {"input_embedding": load(names.embedding).astype(dtype)},
      "final_norm": norm(names.final_norm),
  }
  for i in range(c.num_layers):
    f = lambda name: name.format(i=i)
    q = load(f(names.q)).reshape(n, h, d).transpose(0, 2, 1)
    kv = np.stack([load(f(names.k)).reshape(k, h, d).transpose(0, 2, 1),
                   load(f(names.v)).reshape(k, h, d).transpose(0, 2, 1)])
    o = load(f(names.o)).T.reshape(n, h, d)
    params[f"layer_{i}"] = {
        "attn": {
            "q_einsum": {"w": q.astype(dtype)},
            "kv_einsum": {"w": kv.astype(dtype)},
            "attn_vec_einsum": {"w": o.astype(dtype)},
            "_query_norm": norm(f(names.q_norm)),
            "_key_norm": norm(f(names.k_norm)),
        },
        "mlp": {
            "gating_einsum": np.stack([load(f(names.gate)),
                                       load(f(names.up))]).astype(dtype),
            "linear": load(f(names.down)).T.astype(dtype),
        },
        "pre_attention_norm": norm(f(names.pre_attention_norm)),
        "post_attention_norm": norm(f(names.post_attention_norm)),
        "pre_ffw_norm": norm(f(names.pre_ffw_norm)),
        "post_ffw_norm": norm(f(names.post_ffw_norm)),
    }
  return jax.tree.map(lambda x: np.ascontiguousarray(x, dtype), params)


def to_linear_layout(params: dict, config: Gemma3Config, names: SourceNames,
                     *, norm_offset: float = 0.0,
                     dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
  """The inverse of `from_linear_layout`: {tensor name: numpy array}."""
  c = config
  n, k, d, h = c.num_heads, c.num_kv_heads, c.d_model, c.head_dim
  a = lambda x: np.asarray(x, np.float32)
  out = {names.embedding: a(params["embedder"]["input_embedding"]),
         names.final_norm: a(params["final_norm"]["scale"]) + norm_offset}
  for i in range(c.num_layers):
    f = lambda name: name.format(i=i)
    p = params[f"layer_{i}"]
    kv = a(p["attn"]["kv_einsum"]["w"])
    gate_up = a(p["mlp"]["gating_einsum"])
    out.update({
        f(names.q): a(p["attn"]["q_einsum"]["w"]).transpose(0, 2, 1)
                    .reshape(n * h, d),
        f(names.k): kv[0].transpose(0, 2, 1).reshape(k * h, d),
        f(names.v): kv[1].transpose(0, 2, 1).reshape(k * h, d),
        f(names.o): a(p["attn"]["attn_vec_einsum"]["w"]).reshape(n * h, d).T,
        f(names.q_norm): a(p["attn"]["_query_norm"]["scale"]) + norm_offset,
        f(names.k_norm): a(p["attn"]["_key_norm"]["scale"]) + norm_offset,
        f(names.gate): gate_up[0],
        f(names.up): gate_up[1],
        f(names.down): a(p["mlp"]["linear"]).T,
    })
    for site in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm",
                 "post_ffw_norm"):
      out[f(getattr(names, site))] = a(p[site]["scale"]) + norm_offset
  return {key: np.ascontiguousarray(v.astype(dtype)) for key, v in out.items()}
