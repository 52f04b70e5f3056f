"""Shared conversion from PyTorch-Linear-layout checkpoints to our tree.

GGUF files and Hugging Face `Gemma3ForCausalLM` state dicts store the same
tensors the same way: 2-D (out, in) matrices with heads flattened into rows,
one tensor per projection. They differ only in tensor names and in how norm
weights are stored (GGUF adds 1). `SourceNames` captures the naming, and
`from_linear_layout` does the reshaping and validation once for both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
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
                       dtype: np.dtype = np.float32,
                       place: Callable[[str, np.ndarray], Any] | None = None
                       ) -> dict:
  """Builds the official-layout parameter tree, one leaf at a time.

  Args:
    get: Returns the tensor stored under a name (numpy order), or raises
      KeyError if the checkpoint lacks it.
    config: The model size the tensors must fit.
    names: The checkpoint format's tensor names.
    source: File or directory, named in error messages.
    norm_offset: Subtracted from norm weights (1.0 for GGUF, which stores
      the `1 + scale` that the model multiplies by).
    dtype: Output dtype of every leaf.
    place: If given, called as `place(path, array)` on each finished leaf
      ("layer_3/attn/q_einsum/w", C-contiguous, `dtype`) as soon as it is
      built; its result becomes the leaf. Lets a caller move leaves to
      devices while later ones are still being read.

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
    # jnp's check also counts ml_dtypes' bfloat16 (how numpy holds the
    # released bf16 weights) as a float; numpy's does not.
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise CheckpointError(source, name, f"dtype {x.dtype} is not a float")
    return x.astype(np.float32, copy=False)

  # Leaves are made C-contiguous: writers such as safetensors' numpy
  # save_file store a strided view's raw memory, i.e. silently transposed.
  def leaf(path: str, x: np.ndarray):
    x = np.ascontiguousarray(x, dtype)
    return x if place is None else place(path, x)

  def norm(path: str, name: str) -> dict:
    return {"scale": leaf(path + "/scale", load(name) - norm_offset)}

  n, k, d, h = c.num_heads, c.num_kv_heads, c.d_model, c.head_dim
  params = {
      "embedder": {"input_embedding": leaf("embedder/input_embedding",
                                           load(names.embedding))},
      "final_norm": norm("final_norm", names.final_norm),
  }
  for i in range(c.num_layers):
    f = lambda name: name.format(i=i)
    p = f"layer_{i}"
    q = load(f(names.q)).reshape(n, h, d).transpose(0, 2, 1)
    q = leaf(f"{p}/attn/q_einsum/w", q)
    kv = np.stack([load(f(names.k)).reshape(k, h, d).transpose(0, 2, 1),
                   load(f(names.v)).reshape(k, h, d).transpose(0, 2, 1)])
    kv = leaf(f"{p}/attn/kv_einsum/w", kv)
    o = leaf(f"{p}/attn/attn_vec_einsum/w",
             load(f(names.o)).T.reshape(n, h, d))
    attn = {
        "q_einsum": {"w": q},
        "kv_einsum": {"w": kv},
        "attn_vec_einsum": {"w": o},
        "_query_norm": norm(f"{p}/attn/_query_norm", f(names.q_norm)),
        "_key_norm": norm(f"{p}/attn/_key_norm", f(names.k_norm)),
    }
    mlp = {
        "gating_einsum": leaf(f"{p}/mlp/gating_einsum", np.stack(
            [load(f(names.gate)), load(f(names.up))])),
        "linear": leaf(f"{p}/mlp/linear", load(f(names.down)).T),
    }
    params[p] = {"attn": attn, "mlp": mlp}
    for site in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm",
                 "post_ffw_norm"):
      params[p][site] = norm(f"{p}/{site}", f(getattr(names, site)))
  return params


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
