"""Our Flax Gemma 3 against transformers on a tiny random Gemma 3.

The tiny model exercises everything the real sizes use: local and global
layers (period 3), a sliding window (5) shorter than the sequence (16),
grouped-query attention (4 heads, 2 KV heads), linear RoPE scaling on global
layers, and random non-zero norm scales (so `1 + scale` is tested).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
import jax
import jax.numpy as jnp

from gemscope_jax import models
from gemscope_jax.convert import _linear, hf as hf_convert, load_hf

import hf_reference

LAYERS = 6
T = 16


@pytest.fixture(scope="module")
def tiny():
  hf_config = transformers.Gemma3TextConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128,
      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
      head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
      layer_types=["sliding_attention", "sliding_attention",
                   "full_attention"] * 2,
      rope_parameters={
          "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
          "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0,
                             "factor": 8.0}},
      attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.Gemma3ForCausalLM(hf_config).eval()
  with torch.no_grad():  # Norm scales start at zero; make them matter.
    for name, p in model.named_parameters():
      if "norm" in name:
        p.normal_(0.0, 0.5)
  config = hf_convert.config_from_hf(hf_config.to_dict())
  _, params = load_hf(model.state_dict(), config)
  params = jax.tree.map(jnp.asarray, params)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 512, size=(3, T)).astype(np.int32)
  tokens[:, 0] = 2
  return model, config, params, tokens


def test_config_read_from_hf(tiny):
  _, config, _, _ = tiny
  assert config.global_every == 3
  assert config.global_layers() == (2, 5)
  assert config.rope(2) == (1_000_000.0, 8.0)
  assert config.rope(0) == (10_000.0, 1.0)
  assert config.sliding_window == 5
  assert config.query_scale == pytest.approx(0.25)


def test_logits_and_every_hookpoint_match_transformers(tiny):
  model, config, params, tokens = tiny
  names = [f"layer_{l}/{s}" for l in range(LAYERS) for s in models.SITES]
  ref_logits, ref = hf_reference.run(model, tokens, layers=range(LAYERS))
  out = models.forward(params, tokens, config=config, hookpoints=names)
  np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=2e-5,
                             rtol=1e-5)
  assert set(out.activations) == set(names)
  for name in names:
    got = np.asarray(out.activations[name])
    scale = np.abs(ref[name]).max()
    np.testing.assert_allclose(got, ref[name], atol=1e-5 * max(scale, 1.0),
                               rtol=1e-5, err_msg=name)


def test_right_padding_matches_transformers_on_real_tokens(tiny):
  model, config, params, tokens = tiny
  lengths = np.array([T, 11, 7])
  mask = np.arange(T)[None] < lengths[:, None]
  padded = np.where(mask, tokens, 0).astype(np.int32)
  ref_logits, ref = hf_reference.run(model, padded, mask, layers=[4])
  out = models.forward(params, padded, mask, config=config,
                       hookpoints=["layer_4/resid_post"])
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(np.asarray(out.logits)[b, :n],
                               ref_logits[b, :n], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(out.activations["layer_4/resid_post"])[b, :n],
        ref["layer_4/resid_post"][b, :n], atol=2e-5, rtol=1e-5)


def test_left_padding_gives_the_unpadded_result(tiny):
  _, config, params, tokens = tiny
  seq = tokens[:1, :10]
  padded = np.concatenate([np.zeros((1, 6), np.int32), seq], axis=1)
  a = models.forward(params, seq, config=config,
                     hookpoints=["layer_5/resid_post"])
  b = models.forward(params, padded, config=config,
                     hookpoints=["layer_5/resid_post"])
  np.testing.assert_allclose(np.asarray(b.logits)[:, 6:], np.asarray(a.logits),
                             atol=2e-5, rtol=1e-5)
  assert np.isfinite(np.asarray(b.logits)).all()
  assert float(b.loss) == pytest.approx(float(a.loss), rel=1e-5)


def test_loss_is_next_token_cross_entropy(tiny):
  model, config, params, tokens = tiny
  out = models.forward(params, tokens, config=config)
  with torch.no_grad():
    ref = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                labels=torch.as_tensor(tokens, dtype=torch.long)).loss.item()
  assert float(out.loss) == pytest.approx(ref, rel=1e-5)


def test_early_stop_gives_the_same_activations(tiny):
  _, config, params, tokens = tiny
  full = models.forward(params, tokens, config=config,
                        hookpoints=["layer_1/mlp_out", "layer_3/attn_out"])
  short = models.forward(params, tokens, config=config, logits=False,
                         hookpoints=["layer_1/mlp_out", "layer_3/attn_out"])
  assert short.logits is None and short.loss is None
  for k in full.activations:
    np.testing.assert_array_equal(np.asarray(short.activations[k]),
                                  np.asarray(full.activations[k]))


def _zero(x, _):
  return jnp.zeros_like(x)


def _add(x, v):
  return x + v


def test_edit_matches_a_transformers_hook_that_does_the_same(tiny):
  model, config, params, tokens = tiny
  # Zero-ablate the MLP of layer 2 in both implementations.
  handle = model.model.layers[2].post_feedforward_layernorm.register_forward_hook(
      lambda _m, _a, out: torch.zeros_like(out))
  try:
    ref_logits, ref = hf_reference.run(model, tokens, layers=[4])
  finally:
    handle.remove()
  out = models.forward(params, tokens, config=config,
                       hookpoints=["layer_2/mlp_out", "layer_4/resid_pre"],
                       edits={"layer_2/mlp_out": _zero})
  np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=2e-5,
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.activations["layer_2/mlp_out"]),
                                0.0)
  np.testing.assert_allclose(np.asarray(out.activations["layer_4/resid_pre"]),
                             ref["layer_4/resid_pre"], atol=2e-5, rtol=1e-5)


def test_steering_edit_is_traced_not_baked_in(tiny):
  _, config, params, tokens = tiny
  name = "layer_1/resid_post"
  v1 = jnp.ones((config.d_model,)) * 0.1
  v2 = -v1
  a = models.forward(params, tokens, config=config, hookpoints=[name],
                     edits={name: _add}, edit_args={name: v1})
  b = models.forward(params, tokens, config=config, hookpoints=[name],
                     edits={name: _add}, edit_args={name: v2})
  clean = models.forward(params, tokens, config=config, hookpoints=[name])
  np.testing.assert_allclose(np.asarray(a.activations[name]),
                             np.asarray(clean.activations[name]) + 0.1,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(b.activations[name]),
                             np.asarray(clean.activations[name]) - 0.1,
                             rtol=1e-6, atol=1e-6)
  assert float(a.loss) != float(b.loss)


def test_bfloat16_tracks_float32(tiny):
  _, config, params, tokens = tiny
  f32 = models.forward(params, tokens, config=config)
  bf16 = models.forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
                        tokens, config=config, dtype=jnp.bfloat16)
  assert bf16.logits.dtype == jnp.bfloat16
  a = np.asarray(f32.logits)
  b = np.asarray(bf16.logits, np.float32)
  rel = np.linalg.norm(a - b) / np.linalg.norm(a)
  assert rel < 0.03, rel
  assert float(bf16.loss) == pytest.approx(float(f32.loss), rel=0.02)


def test_linear_layout_round_trip_is_exact(tiny):
  _, config, params, _ = tiny
  flat = _linear.to_linear_layout(params, config, hf_convert.HF_NAMES)
  _, back = load_hf(flat, config)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_bad_hookpoints_are_named(tiny):
  _, config, params, tokens = tiny
  with pytest.raises(ValueError, match="layer_9/resid_post"):
    models.forward(params, tokens, config=config,
                   hookpoints=["layer_9/resid_post"])
  with pytest.raises(ValueError, match="resid_postt"):
    models.forward(params, tokens, config=config,
                   hookpoints=["layer_1/resid_postt"])


def test_explicit_positions_take_the_direct_rope_path(tiny):
  """Default positions use a gathered RoPE table; explicit ones compute it."""
  _, config, params, tokens = tiny
  default = models.forward(params, tokens, config=config)
  explicit = models.forward(params, tokens, config=config,
                            positions=np.broadcast_to(np.arange(T), (3, T)))
  np.testing.assert_allclose(np.asarray(explicit.logits),
                             np.asarray(default.logits), atol=1e-5, rtol=1e-5)
  shifted = models.forward(params, tokens, config=config,
                           positions=np.broadcast_to(np.arange(T) + 7, (3, T)))
  # RoPE sees only relative positions: a shift changes nothing but rounding.
  np.testing.assert_allclose(np.asarray(shifted.logits),
                             np.asarray(default.logits), atol=1e-3, rtol=1e-3)
