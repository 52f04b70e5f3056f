"""Every family size, shaped without memory: jax.eval_shape of init."""

from __future__ import annotations

import math

import jax
import pytest

from gemscope_jax import models
from gemscope_jax.convert import _tree


@pytest.mark.parametrize("name", sorted(models.CONFIGS))
def test_eval_shape_count_equals_closed_form(name):
  config = models.CONFIGS[name]
  tree = models.abstract_params(config)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
  assert models.count_params(tree) == config.num_params()
  # One block of every layer, named as the official checkpoints are.
  assert sorted(k for k in tree if k.startswith("layer_")) == sorted(
      f"layer_{i}" for i in range(config.num_layers))


def test_270m_count_equals_the_real_checkpoint(real_gguf_path):
  """The GGUF's own tensors, counted by gguf, independent of our code."""
  import gguf
  reader = gguf.GGUFReader(str(real_gguf_path))
  real = sum(math.prod(int(d) for d in t.shape) for t in reader.tensors)
  assert real == 268_098_176
  tree = models.abstract_params(models.Gemma3_270M)
  assert models.count_params(tree) == real
  # GGUF keeps k/v and gate/up apart; our tree stacks each pair.
  assert len(jax.tree.leaves(tree)) == len(reader.tensors) - 2 * 18


def test_published_attention_layout():
  assert models.Gemma3_270M.global_layers() == (5, 11, 17)
  assert models.Gemma3_1B.global_layers() == (5, 11, 17, 23)
  assert len(models.Gemma3_27B.global_layers()) == 10
  for c in models.CONFIGS.values():
    g = c.global_layers()[0]
    assert c.rope(g) == (1_000_000.0, c.rope_scale_global)
    assert c.rope(0) == (10_000.0, 1.0)
  assert models.Gemma3_27B.query_scale == pytest.approx(168 ** -0.5)
  assert models.Gemma3_4B.query_scale == pytest.approx(256 ** -0.5)


def test_official_parameter_names():
  flat = _tree.flatten(models.abstract_params(models.Gemma3_270M))
  expect = {
      "embedder/input_embedding": (262144, 640),
      "final_norm/scale": (640,),
      "layer_0/attn/q_einsum/w": (4, 640, 256),
      "layer_0/attn/kv_einsum/w": (2, 1, 640, 256),
      "layer_0/attn/attn_vec_einsum/w": (4, 256, 640),
      "layer_0/attn/_query_norm/scale": (256,),
      "layer_0/attn/_key_norm/scale": (256,),
      "layer_0/mlp/gating_einsum": (2, 2048, 640),
      "layer_0/mlp/linear": (2048, 640),
      "layer_17/pre_attention_norm/scale": (640,),
      "layer_17/post_attention_norm/scale": (640,),
      "layer_17/pre_ffw_norm/scale": (640,),
      "layer_17/post_ffw_norm/scale": (640,),
  }
  for key, shape in expect.items():
    assert flat[key].shape == shape, key
  assert len(flat) == 2 + 18 * 11


def test_get_config_names():
  assert models.get_config("270m") is models.Gemma3_270M
  assert models.get_config("gemma3-27b") is models.Gemma3_27B
  with pytest.raises(ValueError, match="unknown Gemma 3 size '3b'"):
    models.get_config("3b")
