"""Transcoders, crosscoders and CLTs spliced into the real Gemma 3 270M.

Our one-pass edits (`surgery.splice`) against an independent computation:
the dictionary's prediction in float64 numpy from the raw-unit arrays
(`to_inference`), put in by plain fixed-value edits one layer at a time,
each pass recording the next layer's input from the previous replacements.
That is the replacement model by definition; ours computes it in one pass
with `models.ReadingEdit`s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax import dictionaries, models
from gemscope_jax.text.windows import special_mask
from gemscope_jax.text.windows import Windows
from gemscope_jax.evals import evaluate as ev
from gemscope_jax.surgery import splice

pytestmark = pytest.mark.slow

SEQ = 24


@pytest.fixture(scope="module")
def env(real_model, real_text_tokens):
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  tok = default_tokenizer()
  tokens, mask = real_text_tokens
  tokens = np.asarray(tokens, np.int32)[:2, :SEQ]
  mask = np.asarray(mask, bool)[:2, :SEQ]
  keep = mask & ~special_mask(tok, tokens)
  return {"config": config, "params": params, "tok": tok, "tokens": tokens,
          "mask": mask, "keep": keep}


def _fixed(x, args):
  """A plain edit: positions in args['m'] take args['v']."""
  return jnp.where(args["m"][..., None], args["v"].astype(x.dtype), x)


def _forward(env, fixed: dict[str, np.ndarray], record=(), **kwargs):
  edits = {h: _fixed for h in fixed}
  args = {h: {"m": jnp.asarray(env["keep"]), "v": jnp.asarray(v, jnp.float32)}
          for h, v in fixed.items()}
  return models.forward(env["params"], env["tokens"], env["mask"],
                        config=env["config"], hookpoints=record, edits=edits,
                        edit_args=args, **kwargs)


def _random_params(module, key, in_shape, *, scale_enc=0.2):
  """Module params with nonzero biases and thresholds that let latents fire."""
  p = dictionaries.init_params(module, key)
  p = jax.tree.map(np.asarray, jax.device_get(nn_unbox(p)))
  rng = np.random.default_rng(0)
  p["b_enc"] = rng.normal(0, 0.05, p["b_enc"].shape).astype(np.float32)
  p["b_dec"] = rng.normal(0, 0.1, p["b_dec"].shape).astype(np.float32)
  p["w_enc"] = (p["w_enc"] * scale_enc * 5).astype(np.float32)
  if "threshold" in p:
    p["threshold"] = rng.uniform(0.0, 0.1, p["threshold"].shape).astype(
        np.float32)
  if "w_skip" in p:
    p["w_skip"] = rng.normal(0, 0.02, p["w_skip"].shape).astype(np.float32)
  del in_shape
  return p


def nn_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def _scales(env, names):
  out = _forward(env, {}, record=names, logits=False, loss=False)
  keep = env["keep"]
  return {h: float(np.sqrt(np.mean(np.sum(
      np.asarray(out.activations[h], np.float64)[keep] ** 2, -1))))
          for h in names}


def _jumprelu64(pre, threshold):
  return pre * (pre > threshold)


def test_clt_replacement_model_equals_layer_by_layer(env):
  """A JumpReLU CLT over layers 1-3 replacing all three MLPs in one pass
  equals the replacement computed layer by layer in numpy."""
  layers = (1, 2, 3)
  lay = dictionaries.Layout("clt",
                            tuple(f"layer_{l}/mlp_in" for l in layers),
                            tuple(f"layer_{l}/mlp_out" for l in layers))
  module = dictionaries.CrossLayerTranscoder(
      n_layers=3, d_in=640, d_sae=48, target_l0=20.0)
  params = _random_params(module, jax.random.key(1), (3, 640))
  sc = _scales(env, lay.hookpoints)
  s_in = np.asarray([sc[h] for h in lay.inputs], np.float32)
  s_out = np.asarray([sc[h] for h in lay.targets], np.float32)
  member = splice.Member("clt", lay, module, params, s_in, s_out)
  assert member.mode == "in_pass"
  keep = env["keep"]
  ours = models.forward(
      env["params"], env["tokens"], env["mask"], config=env["config"],
      hookpoints=lay.hookpoints, edits=splice.member_edits(member),
      edit_args=splice.member_args(member, splice=keep,
                                   zero=np.zeros_like(keep)))
  # Independent: raw-unit arrays, float64, one layer per pass.
  inf = {k: np.asarray(v, np.float64)
         for k, v in module.to_inference(params, s_in, s_out).items()}
  fixed: dict[str, np.ndarray] = {}
  for o, target in enumerate(lay.targets):
    out = _forward(env, fixed, record=lay.inputs[:o + 1], logits=False,
                   loss=False)
    pred = inf["b_dec"][o]
    for n in range(o + 1):
      x = np.asarray(out.activations[lay.inputs[n]], np.float64)
      pre = x @ inf["w_enc"][n] + inf["b_enc"][n]
      pred = pred + _jumprelu64(pre, inf["threshold"][n]) @ inf["w_dec"][
          n, :, o]
    fixed[target] = pred
  want = _forward(env, fixed, record=lay.hookpoints)
  for h in lay.targets:  # the replaced MLP outputs themselves
    got_h = np.asarray(ours.activations[h])[keep]
    want_h = np.asarray(want.activations[h])[keep]
    np.testing.assert_allclose(got_h, want_h, rtol=2e-3,
                               atol=2e-3 * np.abs(want_h).max(), err_msg=h)
  np.testing.assert_allclose(np.asarray(ours.logits),
                             np.asarray(want.logits), atol=5e-3)
  # The replacement really changed the model (the test can fail).
  clean = _forward(env, {}, record=())
  assert np.abs(np.asarray(clean.logits) - np.asarray(want.logits)).max() > 0.1
  # Masks off: exactly the clean model.
  off = models.forward(
      env["params"], env["tokens"], env["mask"], config=env["config"],
      edits=splice.member_edits(member),
      edit_args=splice.member_args(member, splice=np.zeros_like(keep),
                                   zero=np.zeros_like(keep)))
  np.testing.assert_array_equal(np.asarray(off.logits),
                                np.asarray(clean.logits))


def test_transcoder_replacement_loss_equals_layer_by_layer(env):
  """Two transcoders (one with the affine skip) replacing the MLPs of layers
  2 and 4 at once: `evaluate_members(replacement=True)` losses equal the
  layer-by-layer numpy computation; each one alone likewise."""
  cfg = env["config"]
  members, arrays = [], []
  for i, (layer, skip) in enumerate(((2, False), (4, True))):
    lay = dictionaries.Layout("transcoder", (f"layer_{layer}/mlp_in",),
                              (f"layer_{layer}/mlp_out",))
    module = dictionaries.JumpReLUTranscoder(
        d_in=640, d_sae=64, d_out=None, affine_skip=skip, target_l0=20.0)
    params = _random_params(module, jax.random.key(10 + i), (640,))
    sc = _scales(env, lay.hookpoints)
    s_in, s_out = sc[lay.inputs[0]], sc[lay.targets[0]]
    members.append(splice.Member(lay.name, lay, module, params, s_in, s_out))
    inf = module.to_inference(params, s_in, out_norm_scale=s_out)
    arrays.append({k: np.asarray(v, np.float64) for k, v in inf.items()})

  def predict(j, x):
    a = arrays[j]
    pre = np.asarray(x, np.float64) @ a["w_enc"] + a["b_enc"]
    y = _jumprelu64(pre, a["threshold"]) @ a["w_dec"] + a["b_dec"]
    if "affine_skip_connection" in a:
      y = y + np.asarray(x, np.float64) @ a["affine_skip_connection"]
    return y

  def loss_sum(out):
    return float(np.asarray(out.token_loss, np.float64).sum())

  mask = env["mask"]
  pairs = int((mask[:, 1:] & mask[:, :-1]).sum())
  # Layer by layer: layer 2's prediction, then layer 4's input after it.
  fixed = {}
  for j, m in enumerate(members):
    out = _forward(env, fixed, record=m.layout.inputs, logits=False,
                   loss=False)
    fixed[m.layout.targets[0]] = predict(j, out.activations[
        m.layout.inputs[0]])
  want_repl = loss_sum(_forward(env, fixed)) / pairs
  zero_all = {m.layout.targets[0]: np.zeros((*mask.shape, 640))
              for m in members}
  want_zero = loss_sum(_forward(env, zero_all)) / pairs
  clean_out = _forward(env, {}, record=[m.layout.inputs[0] for m in members])
  want_single = [loss_sum(_forward(env, {m.layout.targets[0]: predict(
      j, clean_out.activations[m.layout.inputs[0]])})) / pairs
                 for j, m in enumerate(members)]
  results, shared = ev.evaluate_members(
      members, model_config=cfg, model_params=env["params"],
      windows=Windows(env["tokens"], mask), tokenizer=env["tok"],
      batch_size=2, progress=False, replacement=True)
  want_ci = loss_sum(_forward(env, {
      m.layout.targets[0]: predict(j, clean_out.activations[
          m.layout.inputs[0]]) for j, m in enumerate(members)})) / pairs
  assert shared["replacement_clean_input_loss"] == pytest.approx(want_ci,
                                                                 abs=2e-4)
  assert shared["num_pairs"] == pairs
  assert shared["replacement_loss"] == pytest.approx(want_repl, abs=2e-4)
  assert shared["replacement_zero_loss"] == pytest.approx(want_zero,
                                                          abs=2e-4)
  for j, m in enumerate(members):
    assert results[m.name].metrics["spliced_loss"] == pytest.approx(
        want_single[j], abs=2e-4)
  # Compounding: both at once differ from either alone.
  assert abs(want_repl - max(want_single)) > 1e-3
  # FVU of mlp_out from the clean pass, in numpy.
  for j, m in enumerate(members):
    keep = env["keep"]
    x = np.asarray(clean_out.activations[m.layout.inputs[0]],
                   np.float64)[keep]
    t = np.asarray(_forward(env, {}, record=m.layout.targets, logits=False,
                            loss=False).activations[m.layout.targets[0]],
                   np.float64)[keep]
    fvu = np.sum((t - predict(j, x)) ** 2) / np.sum((t - t.mean(0)) ** 2)
    assert results[m.name].metrics["fvu"] == pytest.approx(fvu, rel=1e-3)


def test_crosscoder_splice_uses_clean_reconstruction(env):
  """An acausal crosscoder over resid_post of layers 2-4 spliced at all
  three at once: the clean pass's reconstruction (numpy, raw units) put in
  by fixed edits gives the same loss."""
  lay = dictionaries.Layout("crosscoder",
                            tuple(f"layer_{l}/resid_post" for l in (2, 3, 4)),
                            tuple(f"layer_{l}/resid_post" for l in (2, 3, 4)))
  module = dictionaries.Crosscoder(n_layers=3, d_in=640, d_sae=64,
                                   target_l0=20.0)
  params = _random_params(module, jax.random.key(3), (3, 640))
  sc = _scales(env, lay.inputs)
  s = np.asarray([sc[h] for h in lay.inputs], np.float32)
  member = splice.Member(lay.name, lay, module, params, s, s)
  assert member.mode == "clean"
  inf = {k: np.asarray(v, np.float64)
         for k, v in module.to_inference(params, s).items()}
  clean = _forward(env, {}, record=lay.inputs)
  x = np.stack([np.asarray(clean.activations[h], np.float64)
                for h in lay.inputs], axis=-2)
  pre = np.einsum("btnd,ndl->btl", x, inf["w_enc"]) + inf["b_enc"]
  recon = np.einsum("btl,lnd->btnd", _jumprelu64(pre, inf["threshold"]),
                    inf["w_dec"]) + inf["b_dec"]
  mask = env["mask"]
  pairs = int((mask[:, 1:] & mask[:, :-1]).sum())
  want = float(np.asarray(_forward(env, {h: recon[..., i, :] for i, h in
                                         enumerate(lay.inputs)}).token_loss,
                          np.float64).sum()) / pairs
  results, _ = ev.evaluate_members(
      [member], model_config=env["config"], model_params=env["params"],
      windows=Windows(env["tokens"], mask), tokenizer=env["tok"],
      batch_size=2, progress=False)
  m = results[member.name].metrics
  assert m["spliced_loss"] == pytest.approx(want, abs=2e-4)
  keep = env["keep"]
  for i, h in enumerate(lay.inputs):
    t = x[..., i, :][keep]
    fvu = np.sum((t - recon[..., i, :][keep]) ** 2) / np.sum(
        (t - t.mean(0)) ** 2)
    assert m[f"{h}/fvu"] == pytest.approx(fvu, rel=1e-3)
