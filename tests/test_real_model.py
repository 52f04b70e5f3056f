"""The real Gemma 3 270M: ours and transformers' read the same GGUF.

Both implementations dequantise the same file independently (ours with
gguf.quants, transformers with its own GGUF integration), so this checks
the loader as well as the forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax import models

import hf_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def both(real_model, hf_real_model, real_text_tokens):
  config, params = real_model
  tokens, mask = real_text_tokens
  layers = range(config.num_layers)
  ref_logits, ref = hf_reference.run(hf_real_model, tokens, mask,
                                     layers=layers)
  names = [f"layer_{l}/{s}" for l in layers
           for s in ("resid_post", "attn_out", "mlp_in")]
  ours = models.forward(params, tokens, mask, config=config, hookpoints=names)
  return tokens, mask, ref_logits, ref, ours


def test_logits_agree_on_real_text(both):
  _, mask, ref_logits, _, ours = both
  valid = np.asarray(mask)
  got = np.asarray(ours.logits)[valid]
  want = ref_logits[valid]
  assert np.abs(got - want).max() < 1e-3
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_residual_stream_agrees_at_every_layer(both):
  _, mask, _, ref, ours = both
  valid = np.asarray(mask)
  for name in ours.activations:
    got = np.asarray(ours.activations[name])[valid]
    want = ref[name][valid]
    # Residual norms reach ~1e5 at BOS: compare relative to each row's norm.
    err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert err.max() < 1e-4, (name, err.max())


def test_known_prediction(real_model):
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  tok = default_tokenizer()
  ids = np.asarray([tok.encode("The capital of France is")], np.int32)
  logits = np.asarray(models.forward(params, ids, config=config).logits)[0, -1]
  top = [tok.decode([i]) for i in np.argsort(-logits)[:3]]
  assert " Paris" in top, top


def test_loss_on_real_text_is_that_of_a_language_model(both):
  _, _, _, _, ours = both
  # A trained LM on English: far below uniform (ln 262144 = 12.5 nats).
  assert 1.0 < float(ours.loss) < 5.0


def test_bfloat16_forward_tracks_float32(real_model, real_text_tokens, both):
  config, params = real_model
  tokens, mask = real_text_tokens
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = models.forward(bf16, tokens, mask, config=config, dtype=jnp.bfloat16)
  f32 = both[4]
  valid = np.asarray(mask)
  agree = (np.asarray(out.logits, np.float32)[valid].argmax(-1)
           == np.asarray(f32.logits)[valid].argmax(-1)).mean()
  assert agree > 0.9, agree
  assert float(out.loss) == pytest.approx(float(f32.loss), abs=0.1)


def test_harvest_stops_early_and_agrees(real_model, real_text_tokens, both):
  config, params = real_model
  tokens, mask = real_text_tokens
  out = models.forward(params, tokens, mask, config=config, logits=False,
                       hookpoints=["layer_6/resid_post"])
  np.testing.assert_allclose(np.asarray(out.activations["layer_6/resid_post"]),
                             np.asarray(both[4].activations["layer_6/resid_post"]),
                             rtol=1e-5, atol=1e-3)


def test_cached_default_equals_a_fresh_gguf_read(real_model, real_gguf_path):
  from gemscope_jax.convert import pretrained
  from gemscope_jax.convert import load_gguf
  pretrained.load_model("default")  # makes sure the cache exists
  _, cached = pretrained._load_default()  # pylint: disable=protected-access
  _, direct = load_gguf(real_gguf_path)
  for a, b, c in zip(jax.tree.leaves(cached), jax.tree.leaves(direct),
                     jax.tree.leaves(real_model[1])):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(c), b)


def test_default_with_num_blocks_is_the_first_blocks(real_model):
  from gemscope_jax.convert import pretrained
  _, few = pretrained.load_model("default", num_blocks=7)
  assert sorted(few) == sorted(["embedder", "final_norm",
                                *(f"layer_{i}" for i in range(7))])
  for a, b in zip(jax.tree.leaves(few),
                  jax.tree.leaves({k: real_model[1][k] for k in few})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
