"""surgery.steer and surgery.steer_spec on a tiny random Gemma 3.

Closed forms, each from a real pass, for an SAE (resid_post), a skip
transcoder (mlp_in -> mlp_out) and a CLT latent (mlp_out of every layer
from its own on), against float64 numpy: a zero coefficient and the
ablation of a latent that never fires leave the logits bit-identical;
additive steering moves each written hookpoint by coef * d at the selected
tokens only; a clamp moves it by (v - f_i) * W_dec[i] and keeps output
minus the reconstruction with the clamped latents equal to the error
before the edit (also SAEs at attn_out), and on an SAE whose encoder
inverts its decoder the edited activation encodes to v. The spec
parser round-trips and names the part of a bad spec. One test runs the
real Gemma 3 270M (attn_out is wider than the residual there).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import pytest

from gemscope_jax import interop, models, surgery
from gemscope_jax.surgery import steer, steer_spec

TINY = models.Gemma3Config(
    name="tiny", num_layers=3, d_model=16, mlp_dim=32, num_heads=2,
    num_kv_heads=1, head_dim=16, vocab_size=64, sliding_window=8)
D, D_ATTN = 16, 32  # resid width; attn_out width (2 heads * 16)
RESID, ATTN = "layer_1/resid_post", "layer_1/attn_out"
MLP_IN, MLP_OUT = "layer_1/mlp_in", "layer_1/mlp_out"
ALL_HPS = (RESID, ATTN, MLP_IN, MLP_OUT, *(f"layer_{i}/mlp_{s}"
                                           for i in range(3)
                                           for s in ("in", "out")))
KINDS = ("sae", "transcoder", "clt")  # see `_make_case`


def _f32(x):
  return np.asarray(x, np.float32)


@pytest.fixture(scope="module")
def env():
  """(params, tokens, mask, positions, clean output): row 1 left-padded by
  two tokens, so token positions differ from array indices there."""
  rng = np.random.default_rng(0)
  # Random weights in the abstract tree's shapes: `init_params` runs op by
  # op, which costs far more than the whole test file on a busy CPU.
  params = jax.tree.map(lambda s: _f32(rng.normal(size=s.shape) * 0.02),
                        models.abstract_params(TINY))
  tokens = rng.integers(3, TINY.vocab_size, (2, 9)).astype(np.int32)
  tokens[0, 0] = 2
  tokens[1, :2], tokens[1, 2] = 0, 2
  mask = tokens != 0
  pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  clean = models.forward(params, tokens, mask, config=TINY,
                         hookpoints=ALL_HPS)
  return params, tokens, mask, pos, clean


def _run(env, interventions, hookpoints=ALL_HPS, logits=False):
  params, tokens, mask, _, _ = env
  edits, args = surgery.steering_edits(interventions, config=TINY)
  return models.forward(params, tokens, mask, config=TINY, edits=edits,
                        edit_args=args, hookpoints=hookpoints, logits=logits)


def _sae(rng, x, d_sae=12, arch="jumprelu", **kw):
  """A random dictionary for activations like x (N, d_in): thresholds at
  each latent's median pre-activation over x, so latents fire about half
  the time there."""
  d_in = x.shape[-1]
  d_out = kw.pop("d_out", d_in)
  w_enc = _f32(rng.normal(size=(d_in, d_sae)) / np.abs(x).mean() / d_in**.5)
  b_enc = _f32(rng.normal(size=d_sae) * 0.1)
  pre = np.sort(x @ w_enc + b_enc, axis=0)
  mid = len(pre) // 2  # halfway between two samples: none sits on it
  return interop.InferenceDictionary(
      w_enc=w_enc, w_dec=_f32(rng.normal(size=(d_sae, d_out)) * 0.3),
      b_enc=b_enc, b_dec=_f32(rng.normal(size=d_out) * np.abs(x).mean()),
      threshold=(_f32(np.maximum((pre[mid - 1] + pre[mid]) / 2, 0.01))
                 if arch == "jumprelu" else None),
      architecture=arch, **kw)


def _flat(a, mask):
  return np.asarray(a)[np.asarray(mask)]


# ------------------------------------------------------------ closed forms

@pytest.mark.parametrize("kind", ["vector", *KINDS])
def test_coefficient_zero_is_bit_identical(env, kind):
  """A raw vector at resid_post, and a latent's decoder row of an SAE (at
  resid_post), a skip transcoder (into mlp_out) and a CLT (into mlp_out
  of layers 1 and 2). See `_assert_unchanged` for mlp_out."""
  params, tokens, mask, _, clean = env
  if kind == "vector":
    d = np.random.default_rng(1).normal(size=D)
    iv = surgery.AddDirection(RESID, d, 0.0, "all")
  else:
    c = _case(kind, env)
    iv = surgery.AddLatent(c.d, c.latent, 0.0, "all", **c.kw)
  edits, args = surgery.steering_edits([iv])
  assert len(edits) == (2 if kind == "clt" else 1)
  out = models.forward(params, tokens, mask, config=TINY, edits=edits,
                       edit_args=args, hookpoints=ALL_HPS)
  _assert_unchanged(env, out, sorted(edits))
  # A nonzero coefficient through the same program does change them.
  for hp in args:
    args[hp][0]["coef"] = np.float32(3.0)
  out = models.forward(params, tokens, mask, config=TINY, edits=edits,
                       edit_args=args)
  assert not np.allclose(np.asarray(out.logits), np.asarray(clean.logits))


def _order(name):
  """(layer, site in the order the pass computes it)."""
  h = models.hooks.parse(name)
  return h.layer, models.hooks.SITES.index(h.site)


def _noop(x, args):
  return x + 0.0 * args


def _assert_unchanged(env, out, edited):
  """`out` (logits, ALL_HPS) is the clean pass, bit for bit.

  At resid_post that holds against the pass without edits. At mlp_out it
  cannot: without an edit there XLA (CPU) fuses the post-FFW norm into the
  residual add and rounds resid_post differently (up to a few ulps) than
  when any edit sits between, even `x + 0 * a`. There the pass must be
  bit-identical to one with that plain no-op at the same hookpoints, and
  every hookpoint up to the first edited one (included) to the clean pass.
  """
  params, tokens, mask, _, clean = env
  ref = clean
  if any(models.hooks.parse(hp).site == "mlp_out" for hp in edited):
    ref = models.forward(
        params, tokens, mask, config=TINY, edits={hp: _noop for hp in edited},
        edit_args={hp: np.ones(D, np.float32) for hp in edited},
        hookpoints=ALL_HPS)
    first = min(map(_order, edited))
    for hp in ALL_HPS:
      if _order(hp) <= first:
        assert np.array_equal(np.asarray(out.activations[hp]),
                              np.asarray(clean.activations[hp])), hp
    np.testing.assert_allclose(np.asarray(out.logits),
                               np.asarray(clean.logits), rtol=1e-5,
                               atol=1e-7)
  assert np.array_equal(np.asarray(out.logits), np.asarray(ref.logits))
  for hp in ALL_HPS:
    assert np.array_equal(np.asarray(out.activations[hp]),
                          np.asarray(ref.activations[hp])), hp


def test_additive_moves_selected_tokens_by_coef_times_d(env):
  """Two interventions at one hookpoint (a raw direction on the prompt,
  a latent's decoder row at explicit positions), against the clean pass;
  then a coefficient sweep and another latent reuse the compiled pass."""
  params, tokens, mask, pos, clean = env
  rng = np.random.default_rng(2)
  x = np.asarray(clean.activations[RESID])
  sae = _sae(rng, _flat(x, mask), hookpoint=RESID)
  d = _f32(rng.normal(size=D))
  sweep = []

  def steered(c1, c2, latent):
    return np.asarray(_run(
        env, [surgery.AddDirection(RESID, d, c1, "prompt"),
              surgery.AddLatent(sae, latent, c2, [2, 5, 40])],
        hookpoints=(RESID,)).activations[RESID])

  for c1, c2, latent in [(2.5, -4.0, 3), (0.5, 7.0, 5)]:
    out = steered(c1, c2, latent)
    prompt = mask & (pos > 0)  # BOS and padding untouched
    at = mask & np.isin(pos, [2, 5])
    want = (prompt[..., None] * c1 * d
            + at[..., None] * c2 * sae.w_dec[latent])
    np.testing.assert_allclose(out - x, want, atol=1e-6)
    # Exactly nothing is added elsewhere: against the same program with
    # zero coefficients (another program, the clean pass, may round the
    # padding rows' empty attention differently: 3e-8 on an AMD Zen 4).
    untouched = ~(prompt | at)
    assert np.array_equal(out[untouched],
                          steered(0.0, 0.0, latent)[untouched])
    np.testing.assert_allclose(out[untouched], x[untouched], atol=1e-7)
    compiled = models._api._forward  # pylint: disable=protected-access
    sweep.append(compiled._cache_size())  # pylint: disable=protected-access
  assert sweep[1] == sweep[0], "a new coefficient or latent recompiled"


def test_clamp_encodes_to_value_with_the_error_kept(env):
  """A tied dictionary with orthonormal rows whose latents all fire: the
  encoder inverts the decoder, so clamping latent i to v (above its
  threshold) must encode back to exactly v there, leave the other latents,
  and keep x - decode(encode(x))."""
  _, _, mask, pos, clean = env
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.normal(size=(D, 8)))
  sae = interop.InferenceDictionary(
      w_enc=q, w_dec=q.T, b_enc=np.full(8, 50.0), b_dec=rng.normal(size=D),
      threshold=np.full(8, 0.1), hookpoint=RESID)
  x = np.asarray(clean.activations[RESID])
  f = np.asarray(sae.encode(x))
  assert (f[mask] > 0).all()
  out = _run(env, [surgery.ClampLatents(sae, 2, 9.0, "prompt")],
             hookpoints=(RESID,))
  xe = np.asarray(out.activations[RESID])
  fe = np.asarray(sae.encode(xe))
  sel = mask & (pos > 0)
  np.testing.assert_allclose(fe[sel][:, 2], 9.0, rtol=1e-5)
  np.testing.assert_allclose(np.delete(fe, 2, -1)[sel],
                             np.delete(f, 2, -1)[sel], rtol=1e-5, atol=1e-5)
  err = lambda a: a - np.asarray(sae(a))  # noqa: E731
  np.testing.assert_allclose(err(xe)[sel], err(x)[sel], atol=1e-4)
  assert np.array_equal(xe[~sel], x[~sel])  # BOS, padding


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_clamp_at_attn_out_moves_by_v_minus_f_times_row(env, arch):
  """SAEs at attn_out (heads * head_dim wide), with b_dec subtracted before
  the encoder (folded by the edit), several latents, one value each."""
  _, _, mask, pos, clean = env
  rng = np.random.default_rng(4)
  x = np.asarray(clean.activations[ATTN])
  sae = _sae(rng, _flat(x, mask), arch=arch, pre_enc_bias=True,
             hookpoint=ATTN, k=3 if arch == "topk" else None)
  # The two latents firing most often and the one firing least.
  counts = (np.asarray(sae.encode(x))[mask] > 0).sum(0)
  latents = [int(i) for i in np.argsort(-counts, kind="stable")[[0, 1, -1]]]
  values = np.array([1.5, 0.0, -2.0], np.float32)
  out = _run(env, [surgery.ClampLatents(sae, latents, values,
                                        slice(2, 6))], hookpoints=(ATTN,))
  f = np.asarray(sae.encode(x))[..., latents]
  assert f[..., :2].all(-1).any()
  sel = (mask & (pos >= 2) & (pos < 6))[..., None]
  want = x + sel * ((values - f) @ sae.w_dec[latents])
  np.testing.assert_allclose(np.asarray(out.activations[ATTN]), want,
                             atol=1e-5)


def test_skip_transcoder_clamp_moves_mlp_out(env):
  """Encoded from mlp_in of the same pass, written into mlp_out; the skip
  term cancels in f_clamped - f."""
  _, _, mask, pos, clean = env
  rng = np.random.default_rng(6)
  x_in = np.asarray(clean.activations[MLP_IN])
  tc = _sae(rng, _flat(x_in, mask), hookpoint=MLP_IN, hookpoint_out=MLP_OUT,
            affine_skip=_f32(rng.normal(size=(D, D)) * 0.1))
  out = _run(env, [surgery.ClampLatents(tc, 1, 4.0)],
             hookpoints=(MLP_IN, MLP_OUT))
  assert np.array_equal(np.asarray(out.activations[MLP_IN]), x_in)
  f = np.asarray(tc.encode(x_in))[..., 1]
  sel = (mask & (pos > 0))[..., None]
  want = (np.asarray(clean.activations[MLP_OUT])
          + sel * (4.0 - f)[..., None] * tc.w_dec[1])
  np.testing.assert_allclose(np.asarray(out.activations[MLP_OUT]), want,
                             atol=1e-5)


def _add_given(x, args):
  return x + args


def _clt(rng, clean, mask):
  n, s = TINY.num_layers, 8
  xs = [_flat(clean.activations[f"layer_{i}/mlp_in"], mask) for i in range(n)]
  w_enc = np.stack([rng.normal(size=(D, s)) / np.abs(x).mean() / D**.5
                    for x in xs])
  b_enc = rng.normal(size=(n, s)) * 0.1
  pre = np.sort(np.einsum("mnd,ndl->mnl", np.stack(xs, 1), w_enc) + b_enc,
                axis=0)
  mid = len(pre) // 2  # thresholds halfway between samples, as `_sae`'s
  w_dec = rng.normal(size=(n, s, n, D)) * 0.3
  for src in range(n):
    w_dec[src, :, :src] = 0
  return interop.MultiLayerInference(
      kind="clt", w_enc=w_enc, w_dec=w_dec, b_enc=b_enc,
      b_dec=rng.normal(size=(n, D)) * 0.1,
      threshold=np.maximum((pre[mid - 1] + pre[mid]) / 2, 0.01))


def test_clt_clamp_moves_each_output_layer(env):
  """A latent of source layer 1: mlp_out 1 and 2 move by (v - f_i) *
  w_dec[1, i, o] (f from mlp_in 1), layer 0 not at all. Against a pass
  that adds those deltas as plain arrays."""
  params, tokens, mask, pos, clean = env
  clt = _clt(np.random.default_rng(7), clean, mask)
  i, v = 3, 6.0
  f = clt.encode(np.stack([np.asarray(clean.activations[f"layer_{n}/mlp_in"])
                           for n in range(3)], axis=-2))[..., 1, i]
  assert f.any() and not f.all()
  sel = (mask & (pos > 0))[..., None]
  deltas = {f"layer_{o}/mlp_out": _f32(sel * (v - f)[..., None]
                                       * clt.w_dec[1, i, o])
            for o in (1, 2)}
  want = models.forward(params, tokens, mask, config=TINY,
                        edits={k: _add_given for k in deltas},
                        edit_args=deltas, hookpoints=ALL_HPS, logits=False)
  got = _run(env, [surgery.ClampLatents(clt, i, v, layer=1)])
  assert np.array_equal(np.asarray(got.activations["layer_0/mlp_out"]),
                        np.asarray(clean.activations["layer_0/mlp_out"]))
  for o in (1, 2):
    name = f"layer_{o}/mlp_out"
    np.testing.assert_allclose(np.asarray(got.activations[name]),
                               np.asarray(want.activations[name]), atol=1e-5)
  # Additive steering along the same latent writes the same rows.
  edits, args = surgery.steering_edits([surgery.AddLatent(clt, i, 2.0,
                                                          layer=1)])
  assert sorted(edits) == ["layer_1/mlp_out", "layer_2/mlp_out"]
  np.testing.assert_array_equal(args["layer_2/mlp_out"][0]["direction"],
                                _f32(clt.w_dec[1, i, 2]))


# ------------------------- closed forms for every kind of dictionary (numpy)
#
# Each case: a dictionary, one of its latents that fires on some of the
# edited tokens but not all, where it reads and writes, and its encoder and
# reconstruction written again here in float64 numpy (not the code under
# test). A CLT latent of source layer 1 writes mlp_out 1 and 2; mlp_out 2 is
# computed after the edit of mlp_out 1 changed its input, so what it is
# moved from is read off a pass that adds the edit of mlp_out 1 as a plain
# array (`_before`).

@dataclasses.dataclass
class _Case:
  d: Any
  kw: dict
  read: str
  writes: list  # [(hookpoint, (d_sae, width) decoder rows it writes with)]
  unchanged: tuple  # hookpoints before every write: bit-identical to clean
  encode: Callable  # activations -> (B, T, d_sae) latents of the source
  recon: Callable  # (hookpoint, source latents, activations) -> (B, T, D)
  threshold: np.ndarray  # of the source layer's latents
  latent: int = -1


def _np_jumprelu(x, w_enc, b_enc, threshold):
  pre = np.asarray(x, np.float64) @ np.float64(w_enc) + b_enc
  return np.maximum(pre, 0.0) * (pre > threshold)


def _make_case(kind, clean, mask):
  rng = np.random.default_rng({"sae": 20, "transcoder": 21, "clt": 22}[kind])
  a = clean.activations
  if kind == "clt":
    clt = _clt(rng, clean, mask)

    def enc(acts, s=1):
      return _np_jumprelu(acts[f"layer_{s}/mlp_in"], clt.w_enc[s],
                          clt.b_enc[s], clt.threshold[s])

    def clt_recon(hp, f_src, acts):
      o = models.hooks.parse(hp).layer
      fs = [f_src if s == 1 else enc(acts, s) for s in range(o + 1)]
      return sum(f @ np.float64(clt.w_dec[s, :, o])
                 for s, f in enumerate(fs)) + clt.b_dec[o]
    return _Case(clt, {"layer": 1}, "layer_1/mlp_in",
                 [(f"layer_{o}/mlp_out", clt.w_dec[1, :, o]) for o in (1, 2)],
                 ("layer_0/mlp_out", "layer_1/mlp_in", ATTN), enc, clt_recon,
                 clt.threshold[1])
  if kind == "sae":
    d = _sae(rng, _flat(a[RESID], mask), hookpoint=RESID)
    case = _Case(d, {}, RESID, [(RESID, d.w_dec)],
                 (ATTN, MLP_IN, MLP_OUT, "layer_0/mlp_out"), None, None,
                 d.threshold)
  else:  # a skip transcoder, mlp_in -> mlp_out of layer 1
    d = _sae(rng, _flat(a[MLP_IN], mask), hookpoint=MLP_IN,
             hookpoint_out=MLP_OUT,
             affine_skip=_f32(rng.normal(size=(D, D)) * 0.1))
    case = _Case(d, {}, MLP_IN, [(MLP_OUT, d.w_dec)],
                 (ATTN, MLP_IN, "layer_0/mlp_out"), None, None, d.threshold)
  case.encode = lambda acts: _np_jumprelu(acts[case.read], d.w_enc, d.b_enc,
                                          d.threshold)

  def recon(hp, f, acts):
    del hp
    out = f @ np.float64(d.w_dec) + d.b_dec
    if d.affine_skip is not None:
      out = out + np.asarray(acts[case.read], np.float64) @ np.float64(
          d.affine_skip)
    return out
  case.recon = recon
  return case


def _case(kind, env):
  _, _, mask, pos, clean = env
  c = _make_case(kind, clean, mask)
  sel = mask & (pos > 0)
  f = c.encode(clean.activations)[sel]
  np.testing.assert_array_equal(  # the numpy encoder is the dictionary's
      f > 0, np.asarray(c.d.encode(
          np.stack([np.asarray(clean.activations[f"layer_{s}/mlp_in"])
                    for s in range(3)], -2)))[sel][:, 1] > 0
      if kind == "clt" else np.asarray(c.d.encode(
          clean.activations[c.read]))[sel] > 0)
  fires = (f > 0).mean(0)
  c.latent = int(np.flatnonzero((fires > 0.2) & (fires < 0.8))[0])
  return c


def _before(env, c, deltas, k):
  """The activations of the pass in which the edits of the hookpoints
  written before `c.writes[k]` are added as plain arrays: what the k-th
  written hookpoint is computed as before its own edit."""
  params, tokens, mask, _, clean = env
  if k == 0:
    return clean.activations
  hps = [hp for hp, _ in c.writes[:k]]
  out = models.forward(params, tokens, mask, config=TINY,
                       edits={hp: _add_given for hp in hps},
                       edit_args={hp: _f32(dl) for hp, dl in
                                  zip(hps, deltas)},
                       hookpoints=ALL_HPS, logits=False)
  return out.activations


def _np(acts):
  return {k: np.asarray(v) for k, v in acts.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_add_latent_moves_every_written_hookpoint_by_coef_times_row(env,
                                                                   kind):
  """At explicit positions: each hookpoint the dictionary writes moves by
  coef * its decoder row there and not elsewhere; what comes before is
  untouched."""
  _, _, mask, pos, clean = env
  c = _case(kind, env)
  coef = -3.5
  got = _np(_run(env, [surgery.AddLatent(c.d, c.latent, coef, "1,3,4",
                                         **c.kw)]).activations)
  sel = (mask & np.isin(pos, [1, 3, 4]))[..., None]
  deltas = [sel * coef * np.float64(rows[c.latent]) for _, rows in c.writes]
  for k, (hp, _) in enumerate(c.writes):
    before = np.asarray(_before(env, c, deltas, k)[hp])
    np.testing.assert_allclose(got[hp] - before, deltas[k], rtol=0,
                               atol=2e-6, err_msg=hp)
    assert np.abs(deltas[k]).max() > 0.1
  first = c.writes[0][0]
  off = ~sel[..., 0]
  assert np.array_equal(got[first][off],
                        np.asarray(clean.activations[first])[off])
  for hp in c.unchanged:
    assert np.array_equal(got[hp], np.asarray(clean.activations[hp])), hp


@pytest.mark.parametrize("kind", KINDS)
def test_clamp_moves_by_v_minus_f_and_keeps_the_error(env, kind):
  """Clamping latent i to v (above its threshold) on the prompt: each
  written hookpoint moves by (v - f_i) * its row, f from what the
  dictionary reads in the same pass (for a transcoder or CLT, mlp_in,
  which the edit at mlp_out leaves as it was), and output minus the
  reconstruction with the clamped latents equals the error before the
  edit: x + (f_clamped - f) @ W_dec."""
  _, _, mask, pos, clean = env
  c = _case(kind, env)
  i = c.latent
  v = float(c.threshold[i]) + 2.0
  assert v > c.threshold[i]
  got = _np(_run(env, [surgery.ClampLatents(c.d, i, v, "prompt",
                                            **c.kw)]).activations)
  sel = mask & (pos > 0)
  f = c.encode(clean.activations)
  if kind != "sae":
    assert np.array_equal(got[c.read], np.asarray(clean.activations[c.read]))
  fc = f.copy()
  fc[..., i] = np.where(sel, v, f[..., i])
  change = fc[..., i] - f[..., i]
  assert (change[sel] != 0).all() and (f[..., i][sel] == 0).any()
  deltas = [change[..., None] * np.float64(rows[i]) for _, rows in c.writes]
  for k, (hp, _) in enumerate(c.writes):
    acts = _before(env, c, deltas, k)
    before = np.asarray(acts[hp], np.float64)
    np.testing.assert_allclose(got[hp] - before, deltas[k], rtol=0,
                               atol=2e-6, err_msg=hp)
    # f of the other source layers (a CLT's layer 2) from the same pass.
    err_before = before - c.recon(hp, f, _np(acts))
    err_after = got[hp] - c.recon(hp, fc, got)
    np.testing.assert_allclose(err_after, err_before, rtol=0, atol=1e-5,
                               err_msg=hp)
    assert np.abs(deltas[k]).max() > 0.1
  for hp in c.unchanged:
    assert np.array_equal(got[hp], np.asarray(clean.activations[hp])), hp


@pytest.mark.parametrize("kind", KINDS)
def test_ablating_a_latent_that_never_fires_changes_nothing(env, kind):
  """Its threshold raised out of reach: ablating it leaves the logits and
  every recorded hookpoint bit-identical (see `_assert_unchanged`)."""
  params, tokens, mask, _, clean = env
  c = _case(kind, env)
  if kind == "clt":
    threshold = c.d.threshold.copy()
    threshold[1, c.latent] = 1e9
    d = dataclasses.replace(c.d, threshold=threshold)
    f = np.asarray(d.encode(np.stack(
        [np.asarray(clean.activations[f"layer_{s}/mlp_in"])
         for s in range(3)], -2)))[..., 1, c.latent]
  else:
    threshold = c.d.threshold.copy()
    threshold[c.latent] = 1e9
    d = c.d.replace(threshold=threshold)
    f = np.asarray(d.encode(clean.activations[c.read]))[..., c.latent]
  assert not f.any()
  edits, args = surgery.steering_edits([surgery.ablate(d, c.latent, **c.kw)])
  out = models.forward(params, tokens, mask, config=TINY, edits=edits,
                       edit_args=args, hookpoints=ALL_HPS)
  _assert_unchanged(env, out, sorted(edits))
  # The latent that does fire, ablated the same way, changes them.
  edits, args = surgery.steering_edits([surgery.ablate(c.d, c.latent,
                                                       **c.kw)])
  out = models.forward(params, tokens, mask, config=TINY, edits=edits,
                       edit_args=args)
  assert not np.allclose(np.asarray(out.logits), np.asarray(clean.logits),
                         rtol=1e-5, atol=1e-6)


# ------------------------------------------- positions, decoding, errors

def test_one_token_decode_step_selects_generated_tokens():
  """What a generation loop does: x is (B, 1, width), `generated` set."""
  d = np.arange(D, dtype=np.float32)
  edits, args = surgery.steering_edits(
      [surgery.AddDirection(RESID, d, 2.0, "generated"),
       surgery.AddDirection(RESID, d, 100.0, "4:")])
  x = np.ones((3, 1, D), np.float32)
  ctx = models.EditContext(
      seen={}, positions=np.array([[3], [4], [0]]),
      generated=np.array([[True], [False], [True]]),
      valid=np.array([[True], [True], [True]]))
  out = np.asarray(edits[RESID](x, args[RESID], ctx))
  np.testing.assert_array_equal(out[0, 0], 1 + 2 * d)
  np.testing.assert_array_equal(out[1, 0], 1 + 100 * d)
  np.testing.assert_array_equal(out[2, 0], 1)  # position 0 skipped


def test_generation_steers_the_generated_tokens(env):
  """`generate` runs the same edits one token at a time: steering the
  generated tokens gives the logits of one forward pass over prompt and
  continuation that steers positions 5 on (the generated ones)."""
  from gemscope_jax import generate  # pylint: disable=g-import-not-at-top
  params = env[0]
  d = _f32(np.random.default_rng(13).normal(size=D))
  prompt = [2, 5, 9, 11, 7]
  edits, args = surgery.steering_edits(
      [surgery.AddDirection(RESID, d, 3.0, "generated")])
  g = generate.generate(params, [prompt], config=TINY, max_new_tokens=4,
                        edits=edits, edit_args=args, stop_tokens=[-1],
                        return_logits=True)
  full = np.array([prompt + [int(t) for t in g.tokens[0]]], np.int32)
  edits, args = surgery.steering_edits(
      [surgery.AddDirection(RESID, d, 3.0, "5:")])
  want = models.forward(params, full, config=TINY, edits=edits,
                        edit_args=args).logits[0, 4:8]
  np.testing.assert_allclose(np.asarray(g.logits[0]), np.asarray(want),
                             rtol=1e-4, atol=1e-5)


def test_width_mismatch_names_both_widths(env):
  params, tokens, mask, _, clean = env
  x = _flat(clean.activations[RESID], mask)
  sae = _sae(np.random.default_rng(8), x, hookpoint=ATTN)  # 16 wide
  with pytest.raises(ValueError, match="width 16, but layer_1/attn_out has "
                     "width 32"):
    surgery.steering_edits([surgery.ClampLatents(sae, 0, 1.0)], config=TINY)
  # Without a config the pass raises the same while it is traced.
  edits, args = surgery.steering_edits([surgery.AddLatent(sae, 0, 1.0)])
  with pytest.raises(ValueError, match="width 16, but layer_1/attn_out"):
    models.forward(params, tokens, mask, config=TINY, edits=edits,
                   edit_args=args)


def test_intervention_errors():
  rng = np.random.default_rng(9)
  sae = _sae(rng, rng.normal(size=(20, D)))
  with pytest.raises(ValueError, match="names no hookpoint.*hookpoint="):
    surgery.AddLatent(sae, 0, 1.0)
  with pytest.raises(ValueError, match="latent 12 is out of range.*12 "
                     "latents"):
    surgery.ClampLatents(sae, 12, hookpoint=RESID)
  tc = sae.replace(hookpoint_out="layer_2/mlp_out")
  assert steer.dictionary_hookpoints(tc) == ("layer_2/mlp_in",
                                             "layer_2/mlp_out")
  clt = _clt_stub()
  with pytest.raises(ValueError, match="source layer"):
    surgery.ClampLatents(clt, 0, 1.0)
  with pytest.raises(ValueError, match="cannot be clamped"):
    surgery.ClampLatents(clt.__class__(**{**vars(clt), "kind":
                                          "crosscoder",
                                          "w_dec": clt.w_dec[0],
                                          "b_enc": clt.b_enc[0],
                                          "threshold": clt.threshold[0]}),
                         0, 1.0)
  assert surgery.as_positions(slice(3, 9)) == surgery.Positions.span(3, 9)
  assert surgery.as_positions(5) == surgery.Positions.at(5)


def _clt_stub(n=3, s=4):
  z = np.zeros
  return interop.MultiLayerInference(
      kind="clt", w_enc=z((n, D, s)), w_dec=z((n, s, n, D)), b_enc=z((n, s)),
      b_dec=z((n, D)), threshold=z((n, s)))


# ---------------------------------------------------------------- the spec

@pytest.mark.parametrize("text", [
    "runs/sae6:layer_6/resid_post:77=20@prompt",
    "gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_medium:1234+8",
    "layer_6/resid_post:dirs/honesty.npy*-4.5@generated",
    "clt:3/120=-2.5@3:9",
    "odd+name@v2:5-3@2,4,7",
    "tc:layer_6/mlp_in,layer_6/mlp_out:5+1@0:",
    "sae:0=0@12",
])
def test_spec_round_trips(text):
  spec = surgery.parse_steer(text)
  assert str(spec) == text
  assert surgery.parse_steer(str(spec)) == spec


def test_spec_fields():
  s = surgery.parse_steer("my/sae:blocks.6.hook_attn_out:12*-2@:5")
  assert (s.source, s.hookpoint, s.latent, s.op, s.value) == (
      "my/sae", "layer_6/attn_out", 12, "add", -2.0)
  assert s.positions == surgery.Positions.span(0, 5)
  s = surgery.parse_steer("x:4/9-0.5")
  assert (s.layer, s.latent, s.value, s.positions.kind) == (4, 9, -0.5,
                                                            "all")


@pytest.mark.parametrize("text,match", [
    ("", "empty spec; expected DICT:LATENT"),
    ("sae", "no ':'"),
    (":1+2", "the dictionary '' is not valid"),
    ("sae:abc+1", "the latent 'abc' is not valid; expected a latent index"),
    ("sae:12", "the latent and operation '12' is not valid; expected "
     "LATENT followed by \\+COEF"),
    ("sae:1+x", "the coefficient 'x' is not valid; expected a finite"),
    ("sae:1=nan", "the clamp value 'nan' is not valid"),
    ("sae:1+8@foo", "positions part: unknown positions 'foo': expected all, "
     "prompt, generated"),
    ("sae:1+8@9:3", "positions part: empty range '9:3'"),
    ("sae:layer_6/resid:1+2", "the hookpoint 'layer_6/resid' is not valid; "
     "expected layer_<L>/<site>"),
    ("layer_6/resid_post:v.npy=3", "a raw vector can only be added"),
    ("layer_6/resid_post:v.np*3", "the latent 'v.np' is not valid"),
])
def test_bad_specs_say_what_is_wrong(text, match):
  with pytest.raises(ValueError, match=match) as e:
    surgery.parse_steer(text)
  assert "\n" not in str(e.value)


def test_specs_load_dictionaries_and_vectors(tmp_path):
  rng = np.random.default_rng(10)
  sae = _sae(rng, rng.normal(size=(20, D)), hookpoint=RESID)
  folder = interop.save_gemmascope2(sae, tmp_path / "sae",
                                    release_layout=False)
  clt = _clt_stub()
  clt_folder = interop.save_multilayer_gemmascope2(clt, tmp_path / "clt")
  vec = _f32(rng.normal(size=D))
  np.save(tmp_path / "v.npy", vec)
  ivs = steer_spec.load_interventions([
      f"{folder}:3+8@prompt", f"{folder}:layer_2/resid_post:4=0",
      f"{clt_folder}:1/2=5", f"layer_0/resid_post:{tmp_path}/v.npy*-2"])
  add, clamp, clt_clamp, direction = ivs
  assert isinstance(add, surgery.AddLatent) and add.coef == 8
  np.testing.assert_array_equal(add.parts()[0][2]["direction"],
                                sae.w_dec[3])
  assert clamp.parts()[0][0] == "layer_2/resid_post"
  assert clamp.latents == (4,) and clamp.values == 0
  assert [hp for hp, _, _ in clt_clamp.parts()] == ["layer_1/mlp_out",
                                                    "layer_2/mlp_out"]
  np.testing.assert_array_equal(direction.direction, vec)
  assert direction.coef == -2
  with pytest.raises(ValueError, match="needs its latent as SOURCE_LAYER"):
    steer_spec.load_interventions([f"{clt_folder}:2=5"])
  with pytest.raises(ValueError, match="one index"):
    steer_spec.load_interventions([f"{folder}:1/2=5"])


# ----------------------------------------------------------- the real model

@pytest.mark.slow
def test_real_model_attn_out_clamp(real_model):
  """Gemma 3 270M: attn_out is 4 * 256 = 1024 wide, the residual 640; a
  clamp there moves it by (v - f_i) * W_dec[i], and a residual-width SAE
  named at attn_out is refused with both widths."""
  config, params = real_model
  tokens = np.array([[2, 651, 6037, 529, 7001, 563, 9079]], np.int32)
  hp = "layer_3/attn_out"
  clean = models.forward(params, tokens, config=config, hookpoints=(hp,),
                         logits=False)
  x = np.asarray(clean.activations[hp])
  assert x.shape[-1] == 1024 != config.d_model
  sae = _sae(np.random.default_rng(11), x[0], d_sae=32, hookpoint=hp)
  edits, args = surgery.steering_edits(
      [surgery.ClampLatents(sae, [0, 1], 3.0, "1:")], config=config)
  out = models.forward(params, tokens, config=config, hookpoints=(hp,),
                       logits=False, edits=edits, edit_args=args)
  f = np.asarray(sae.encode(x))[..., [0, 1]]
  want = x.copy()
  want[:, 1:] += ((3.0 - f) @ sae.w_dec[[0, 1]])[:, 1:]
  np.testing.assert_allclose(np.asarray(out.activations[hp]), want,
                             rtol=1e-5, atol=1e-4)
  narrow = _sae(np.random.default_rng(12), np.ones((4, config.d_model)),
                hookpoint=hp)
  with pytest.raises(ValueError, match="width 640, but layer_3/attn_out has "
                     "width 1024"):
    surgery.steering_edits([surgery.AddLatent(narrow, 0, 1.0)],
                           config=config)
