"""interop: Gemma Scope 2 and SAELens folders against independent readers.

SAELens folders we write are loaded with SAELens's own `SAE.load_from_disk`
(torch, CPU) and must encode and decode as our training modules do on the
same raw activations. A Gemma Scope 2 folder written here by hand from the
spec (numpy, `safetensors.numpy.save_file`) must encode as the Gemma Scope
2 formulas (`pre = x @ w_enc + b_enc`, `f = relu(pre) * (pre > threshold)`,
`x_hat = f @ w_dec + b_dec`) computed in float64. Round trips must be
bit-exact, an imported dictionary spliced into a tiny random Gemma must give
the metrics of the module it came from, and every bad input must name what
is wrong.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gemscope_jax import cli, dictionaries, interop, models
from gemscope_jax.text.windows import Windows
from gemscope_jax.interop import gemmascope2, saelens
from gemscope_jax.evals import evaluate as ev

D_IN, D_SAE, K = 16, 48, 6
HP = "layer_1/resid_post"
ARCHS = ("jumprelu", "topk", "batchtopk", "relu")


def _trained(arch: str, seed: int = 0):
  """(module, params, norm_scale, batchtopk threshold): random 'trained'
  parameters with nonzero b_dec, pre_enc_bias=True, a random input scale."""
  rng = np.random.default_rng(seed)
  cls = {"jumprelu": dictionaries.JumpReLU, "topk": dictionaries.TopK,
         "batchtopk": dictionaries.BatchTopK, "relu": dictionaries.ReLU}[arch]
  kw = {"sparsity_penalty": "l0"} if arch == "jumprelu" else (
      {"k": K} if arch in ("topk", "batchtopk") else {})
  module = cls(d_in=D_IN, d_sae=D_SAE, pre_enc_bias=True, **kw)
  params = dictionaries.init_params(module, jax.random.key(seed))
  params = {k: np.asarray(dictionaries._base.leaf_value(v))  # pylint: disable=protected-access
            for k, v in params.items()}
  params["w_enc"] = rng.normal(size=(D_IN, D_SAE)).astype(np.float32) * 0.5
  params["b_enc"] = rng.normal(size=D_SAE).astype(np.float32) * 0.2
  params["b_dec"] = rng.normal(size=D_IN).astype(np.float32) * 0.3
  if "threshold" in params:
    params["threshold"] = rng.uniform(0.05, 0.5, D_SAE).astype(np.float32)
  return module, params, float(rng.uniform(2.0, 9.0)), 0.3


def _inference(arch: str, seed: int = 0) -> interop.InferenceDictionary:
  """The raw-unit form, built as the trainer's export builds it."""
  module, params, s, t = _trained(arch, seed)
  threshold = {"jumprelu": params.get("threshold"), "batchtopk": t}.get(
      arch, 0.0)
  a = dictionaries.fold_for_inference(params, s, threshold=threshold,
                                      pre_enc_bias=True)
  a = {k: np.asarray(v) for k, v in a.items()}
  return interop.InferenceDictionary(
      w_enc=a["w_enc"], w_dec=a["w_dec"], b_enc=a["b_enc"], b_dec=a["b_dec"],
      threshold=a["threshold"] if arch in ("jumprelu", "batchtopk") else None,
      architecture={"batchtopk": "jumprelu"}.get(arch, arch),
      k=K if arch == "topk" else None, hookpoint=HP, model_name="tiny",
      metadata={"target_l0": 20.0 if arch != "topk" else None})


def _reference(arch: str, x: np.ndarray, seed: int = 0):
  """Our training module on x / s: (raw-unit latents, raw recon).
  BatchTopK's export is its JumpReLU form, so its reference is a JumpReLU
  module with the same parameters and the global threshold."""
  module, params, s, t = _trained(arch, seed)
  if arch == "batchtopk":
    module = dictionaries.JumpReLU(d_in=D_IN, d_sae=D_SAE,
                                   sparsity_penalty="l0")
    params = {**params, "threshold": np.full(D_SAE, t, np.float32)}
  out = module.apply({"params": params}, jnp.asarray(x / s))
  return np.asarray(out.latents) * s, np.asarray(out.recon) * s


def _x(n: int = 64, seed: int = 1) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, D_IN)) * 4 + 1).astype(np.float32)


def _close(a, b, scale=1.0):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                             atol=1e-5 * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_our_export_and_encodes_as_we_do(tmp_path, arch):
  import torch
  from sae_lens import SAE
  x = _x()
  folder = interop.save_saelens(_inference(arch), tmp_path / arch)
  sae = SAE.load_from_disk(str(folder), device="cpu")
  want_arch = {"relu": "standard", "topk": "topk"}.get(arch, "jumprelu")
  assert sae.cfg.architecture() == want_arch
  with torch.no_grad():
    f = sae.encode(torch.from_numpy(x))
    recon = sae.decode(f)
  f_ref, recon_ref = _reference(arch, x)
  assert (np.asarray(f) > 0).sum() > 0
  np.testing.assert_array_equal(np.asarray(f) > 0, f_ref > 0)
  _close(f.numpy(), f_ref, scale=np.abs(f_ref).max())
  _close(recon.numpy(), recon_ref, scale=np.abs(recon_ref).max())
  cfg = json.loads((folder / "cfg.json").read_text())
  assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"



@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pre_enc_bias", [True, False])
def test_numpy_encode_is_the_jitted_encode(arch, pre_enc_bias):
  """`encode_numpy` (attribution's host path) gives `encode`'s latents:
  the same active set and values to fp32 rounding, for every architecture,
  with the input subtraction kept or folded, against our training
  module."""
  d = _inference(arch)
  d = d if pre_enc_bias else d.folded()
  x = _x(256)
  got = d.encode_numpy(x)
  assert isinstance(got, np.ndarray) and got.dtype == np.float32
  want = np.asarray(d.encode(x))
  f_ref, _ = _reference(arch, x)
  assert (got > 0).sum() > 0
  np.testing.assert_array_equal(got > 0, want > 0)
  np.testing.assert_array_equal(got > 0, f_ref > 0)
  _close(got, want, scale=np.abs(want).max())
  if arch == "topk":
    assert ((got > 0).sum(axis=-1) <= K).all()

def test_saelens_keeps_apply_b_dec_to_input(tmp_path):
  """An unfolded dictionary (b_dec subtracted from the input) stays so."""
  import torch
  from sae_lens import SAE
  _, params, s, _ = _trained("jumprelu")
  d = interop.InferenceDictionary(
      w_enc=params["w_enc"], w_dec=params["w_dec"], b_enc=params["b_enc"] * s,
      b_dec=params["b_dec"] * s, threshold=params["threshold"] * s,
      pre_enc_bias=True, hookpoint=HP)
  sae = SAE.load_from_disk(str(interop.save_saelens(d, tmp_path / "s")))
  assert sae.cfg.apply_b_dec_to_input
  x = _x()
  with torch.no_grad():
    f = sae.encode(torch.from_numpy(x)).numpy()
  f_ref, _ = _reference("jumprelu", x)
  _close(f, f_ref, scale=np.abs(f_ref).max())
  _close(d.encode(x), f_ref, scale=np.abs(f_ref).max())


def _spec_folder(root, *, affine: bool, seed: int = 3):
  """A Gemma Scope 2 transcoder/SAE folder written straight from the
  published layout (`params.safetensors` + `config.json`)."""
  rng = np.random.default_rng(seed)
  d_out = 12 if affine else D_IN
  arrays = {
      "w_enc": rng.normal(size=(D_IN, D_SAE)).astype(np.float32),
      "w_dec": rng.normal(size=(D_SAE, d_out)).astype(np.float32),
      "b_enc": rng.normal(size=D_SAE).astype(np.float32),
      "b_dec": rng.normal(size=d_out).astype(np.float32),
      "threshold": rng.uniform(0, 2, D_SAE).astype(np.float32),
  }
  cfg = {"width": D_SAE, "model_name": "google/gemma-3-270m",
         "architecture": "jump_relu", "l0": 60, "affine_connection": affine}
  if affine:
    arrays["affine_skip_connection"] = rng.normal(
        size=(D_IN, d_out)).astype(np.float32)
    name = "transcoder/layer_1_width_48_l0_medium_affine"
    layer = "model.layers.1."
    cfg.update(type="transcoder",
               hf_hook_point_in=layer + "pre_feedforward_layernorm.output",
               hf_hook_point_out=layer + "post_feedforward_layernorm.output")
  else:
    name = "resid_post/layer_1_width_48_l0_medium"
    cfg.update(type="sae", hf_hook_point_in="model.layers.1.output",
               hf_hook_point_out="model.layers.1.output")
  folder = root / name
  folder.mkdir(parents=True)
  save_file(arrays, str(folder / "params.safetensors"))
  (folder / "config.json").write_text(json.dumps(cfg))
  return folder, arrays


@pytest.mark.parametrize("affine", [False, True])
def test_gemmascope2_spec_folder_encodes_as_the_formulas(tmp_path, affine):
  folder, a = _spec_folder(tmp_path, affine=affine)
  d = interop.load_gemmascope2(tmp_path)  # the root holds exactly one
  assert d.architecture == "jumprelu" and not d.pre_enc_bias
  assert d.hookpoint == ("layer_1/mlp_in" if affine else HP)
  assert d.hookpoint_out == ("layer_1/mlp_out" if affine else None)
  assert interop.load_dictionary(folder).d_out == a["w_dec"].shape[1]
  x = _x().astype(np.float64)
  a64 = {k: v.astype(np.float64) for k, v in a.items()}
  pre = x @ a64["w_enc"] + a64["b_enc"]
  f = np.maximum(pre, 0) * (pre > a64["threshold"])
  recon = f @ a64["w_dec"] + a64["b_dec"]
  if affine:
    recon += x @ a64["affine_skip_connection"]
  got_f = np.asarray(d.encode(x))
  np.testing.assert_array_equal(got_f > 0, f > 0)
  _close(got_f, f, scale=np.abs(f).max())
  _close(d(x), recon, scale=np.abs(recon).max())


def _assert_same(a: interop.InferenceDictionary,
                 b: interop.InferenceDictionary):
  for name in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold",
               "affine_skip"):
    u, v = getattr(a, name), getattr(b, name)
    assert (u is None) == (v is None), name
    if u is not None:
      np.testing.assert_array_equal(u, v, err_msg=name)
      assert u.dtype == v.dtype == np.float32
  for name in ("architecture", "k", "pre_enc_bias", "hookpoint",
               "hookpoint_out", "model_name"):
    assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trips_are_bit_exact(tmp_path, arch):
  d = _inference(arch)
  g = interop.load_gemmascope2(interop.save_gemmascope2(d, tmp_path / "g"))
  s = interop.load_saelens(interop.save_saelens(d, tmp_path / "s"))
  if arch == "relu":  # Gemma Scope 2 has JumpReLU only: zero thresholds.
    np.testing.assert_array_equal(g.threshold, np.zeros(D_SAE, np.float32))
    g = g.replace(architecture="relu", threshold=None)
  _assert_same(d, g)
  _assert_same(d, s)
  again = interop.load_saelens(interop.save_saelens(g, tmp_path / "s2"))
  _assert_same(d, again)
  assert g.metadata["target_l0"] == d.metadata["target_l0"]


def test_affine_transcoder_round_trips_and_loads_in_saelens(tmp_path):
  import torch
  from sae_lens import SAE
  _spec_folder(tmp_path / "src", affine=True)
  d = interop.load_gemmascope2(tmp_path / "src")
  g = interop.load_gemmascope2(interop.save_gemmascope2(d, tmp_path / "g"))
  folder = interop.save_saelens(d, tmp_path / "s")
  _assert_same(d, g)
  _assert_same(d, interop.load_saelens(folder))
  assert (tmp_path / "g" / "transcoder" /
          "layer_1_width_48_l0_medium_affine").is_dir()
  sae = SAE.load_from_disk(str(folder))
  assert sae.cfg.architecture() == "jumprelu_skip_transcoder"
  x = _x()
  with torch.no_grad():
    f = sae.encode(torch.from_numpy(x)).numpy()
    recon = sae(torch.from_numpy(x)).numpy()  # forward adds x @ W_skip.T
  want_f, want = np.asarray(d.encode(x)), np.asarray(d(x))
  _close(f, want_f, scale=np.abs(want_f).max())
  _close(recon, want, scale=np.abs(want).max())


def test_folder_names():
  assert [gemmascope2.width_name(w) for w in (16384, 65536, 262144, 1048576,
                                              4096, 1000)] == [
                                                  "16k", "65k", "262k", "1m",
                                                  "4k", "1000"]
  assert [gemmascope2.l0_name(v) for v in (20, 60, 150, 37.4, 61)] == [
      "small", "medium", "big", "37", "61"]
  d = _inference("topk").replace(hookpoint="layer_3/mlp_out")
  assert interop.folder_name(d) == "mlp_out/layer_3_width_48_l0_6"
  assert interop.folder_name(d, l0=150) == "mlp_out/layer_3_width_48_l0_big"
  assert saelens.tl_hook_name("layer_2/attn_out") == "blocks.2.attn.hook_z"
  for site in models.hooks.SITES:
    name = saelens.tl_hook_name(f"layer_4/{site}")
    assert saelens.hookpoint_from_tl(name) == f"layer_4/{site}"
  assert saelens.hookpoint_from_tl("blocks.5.hook_mlp_in") == "layer_5/mlp_in"


# --- splicing into a tiny random Gemma -------------------------------------

TINY = models.Gemma3Config(
    name="tiny", num_layers=2, d_model=D_IN, mlp_dim=32, num_heads=2,
    num_kv_heads=1, head_dim=8, vocab_size=64, sliding_window=8)


class _Tokenizer:
  special_ids = frozenset({0, 1, 2})


@pytest.mark.parametrize("arch,fmt", [("jumprelu", "gemmascope2"),
                                      ("topk", "saelens"),
                                      ("relu", "saelens")])
def test_imported_dictionary_splices_like_the_original(tmp_path, arch, fmt):
  rng = np.random.default_rng(5)
  gemma = models.init_params(TINY, jax.random.key(2))
  tokens = rng.integers(3, TINY.vocab_size, size=(4, 12)).astype(np.int32)
  tokens[:, 0] = 2  # BOS: special, kept out of the statistics
  mask = np.ones_like(tokens, bool)
  mask[3, 9:] = False
  windows = Windows(tokens, mask)
  run = lambda module, params, s: ev.evaluate(
      model_config=TINY, model_params=gemma, hookpoint=HP, module=module,
      params=params, norm_scale=s, windows=windows, tokenizer=_Tokenizer(),
      batch_size=2, progress=False).metrics
  module, params, s, _ = _trained(arch)
  want = run(module, params, s)
  save = interop.FORMATS[fmt]
  folder = save(_inference(arch), tmp_path / fmt)
  got = run(*interop.as_module(interop.load_dictionary(folder)))
  assert want["l0"] > 0
  for key in ("l0", "fvu", "mse", "cosine_sim", "dead_fraction",
              "clean_loss", "spliced_loss", "zero_ablation_loss",
              "delta_lm_loss"):
    assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key


# --- bad inputs ------------------------------------------------------------

def _gs2(tmp_path):
  return interop.save_gemmascope2(_inference("jumprelu"), tmp_path / "g",
                                  release_layout=False)


def _sl(tmp_path):
  return interop.save_saelens(_inference("jumprelu"), tmp_path / "s")


def _edit_arrays(file, fn):
  arrays = load_file(str(file))
  fn(arrays)
  save_file(arrays, str(file))


def _edit_json(file, fn):
  cfg = json.loads(file.read_text())
  fn(cfg)
  file.write_text(json.dumps(cfg))


def test_missing_key_is_named(tmp_path):
  g, s = _gs2(tmp_path), _sl(tmp_path)
  _edit_arrays(g / "params.safetensors", lambda a: a.pop("threshold"))
  _edit_arrays(s / "sae_weights.safetensors", lambda a: a.pop("W_dec"))
  with pytest.raises(interop.FormatError,
                     match=r"params\.safetensors: missing key\(s\) threshold"):
    interop.load_gemmascope2(g)
  with pytest.raises(interop.FormatError,
                     match=r"sae_weights\.safetensors: missing key\(s\) W_dec"):
    interop.load_saelens(s)


def test_shape_mismatch_names_file_key_and_both_shapes(tmp_path):
  g, s = _gs2(tmp_path), _sl(tmp_path)
  _edit_json(g / "config.json", lambda c: c.update(width=32))
  with pytest.raises(interop.FormatError) as e:
    interop.load_gemmascope2(g)
  msg = str(e.value)
  assert "params.safetensors: w_enc" in msg and "(16, 48)" in msg
  assert "(16, 32)" in msg and "width=32" in msg
  _edit_json(s / "cfg.json", lambda c: c.update(d_in=20))
  with pytest.raises(interop.FormatError) as e:
    interop.load_saelens(s)
  msg = str(e.value)
  assert "sae_weights.safetensors: W_enc" in msg and "(16, 48)" in msg
  assert "(20, 48)" in msg and "d_in=20" in msg
  # Arrays that disagree with each other.
  g2 = interop.save_gemmascope2(_inference("jumprelu"), tmp_path / "g2",
                                release_layout=False)
  _edit_arrays(g2 / "params.safetensors",
               lambda a: a.update(b_enc=np.zeros(47, np.float32)))
  with pytest.raises(interop.FormatError, match=r"b_enc has shape \(47,\), "
                     r"expected \(48,\)"):
    interop.load_gemmascope2(g2)


def test_unknown_architecture_names_file_and_field(tmp_path):
  g, s = _gs2(tmp_path), _sl(tmp_path)
  _edit_json(g / "config.json", lambda c: c.update(architecture="gated"))
  _edit_json(s / "cfg.json", lambda c: c.update(architecture="gated"))
  with pytest.raises(interop.FormatError,
                     match=r"config\.json: field 'architecture' is 'gated'"):
    interop.load_gemmascope2(g)
  with pytest.raises(interop.FormatError,
                     match=r"cfg\.json: field 'architecture' is 'gated'"):
    interop.load_saelens(s)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_named(tmp_path, bad):
  g, s = _gs2(tmp_path), _sl(tmp_path)
  def poison(key):
    return lambda a: a[key].__setitem__((0, 1), bad)
  _edit_arrays(g / "params.safetensors", poison("w_dec"))
  _edit_arrays(s / "sae_weights.safetensors", poison("W_enc"))
  with pytest.raises(interop.FormatError,
                     match=r"params\.safetensors: w_dec holds 1 non-finite"):
    interop.load_gemmascope2(g)
  with pytest.raises(interop.FormatError,
                     match=r"sae_weights\.safetensors: W_enc holds 1 non"):
    interop.load_saelens(s)


def test_missing_files_are_named(tmp_path):
  g, s = _gs2(tmp_path), _sl(tmp_path)
  (g / "config.json").unlink()
  (s / "cfg.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
    interop.load_gemmascope2(g)
  with pytest.raises(FileNotFoundError, match=r"cfg\.json: missing"):
    interop.load_saelens(s)
  with pytest.raises(FileNotFoundError, match="no such dictionary folder"):
    interop.load_dictionary(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="no params.safetensors"):
    interop.load_gemmascope2(tmp_path / "s")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="found neither"):
    interop.load_dictionary(tmp_path / "empty")


def test_non_finite_export_writes_nothing(tmp_path):
  d = _inference("jumprelu")
  w_dec = d.w_dec.copy()
  w_dec[3, 2] = np.nan
  bad = d.replace(w_dec=w_dec)
  with pytest.raises(interop.FormatError, match="w_dec holds 1 non-finite"):
    interop.save_gemmascope2(bad, tmp_path / "g")
  with pytest.raises(interop.FormatError, match="W_dec holds 1 non-finite"):
    interop.save_saelens(bad, tmp_path / "s")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["gemmascope2", "saelens"])
def test_failure_mid_write_leaves_no_partial_folder(tmp_path, monkeypatch,
                                                    fmt):
  import safetensors.numpy
  save = interop.FORMATS[fmt]
  d = _inference("jumprelu")
  kw = {"release_layout": False} if fmt == "gemmascope2" else {}
  dest = tmp_path / "out"

  def broken(tensors, filename, metadata=None):
    with open(filename, "wb") as f:  # a half-written file, then a failure
      f.write(b"\0" * 10)
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", broken)
  with pytest.raises(OSError, match="disk full"):
    save(d, dest, **kw)
  assert list(tmp_path.iterdir()) == []
  # An older export at the destination survives a failed rewrite whole.
  monkeypatch.undo()
  save(d, dest, **kw)
  before = {p.name: p.read_bytes() for p in dest.iterdir()}
  monkeypatch.setattr(safetensors.numpy, "save_file", broken)
  with pytest.raises(OSError):
    save(d.replace(b_enc=d.b_enc + 1), dest, **kw)
  assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
  assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert cli.main(["export", "--workdir", str(tmp_path / "none"), "--format",
                   "saelens", "--out", str(tmp_path / "o")]) == 3
  assert "no such training workdir" in capsys.readouterr().err
  assert cli.main(["eval", "--dictionary", str(tmp_path / "none")]) == 3
  assert "no such dictionary folder" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["eval", "--dictionary", "a", "--workdir", "b"])
