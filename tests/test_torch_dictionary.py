"""The JAX-free PyTorch dictionary against NumPy, our JAX modules and SAELens.

Folders are written by hand here (Gemma Scope 2 and SAELens layouts, numpy
arrays through safetensors), so the reader is checked against the formats as
the releases document them (Gemma Scope 2: `params.safetensors` with
`w_enc`, `b_enc`, `w_dec`, `b_dec`, `threshold` and `config.json`;
SAELens: `cfg.json` and `sae_weights.safetensors`), not against this
project's own writers.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from gemscope_jax import dictionaries as D
from gemscope_jax import torch_dictionary
from gemscope_jax.torch_dictionary import DictionaryFormatError, TorchDictionary

D_IN, D_SAE, N = 12, 40, 9


def _arrays(seed=0, d_in=D_IN, d_sae=D_SAE, d_out=D_IN, threshold=(0.1, 0.8)):
  r = np.random.default_rng(seed)
  return {
      "w_enc": (r.normal(size=(d_in, d_sae)) * 0.5).astype(np.float32),
      "w_dec": (r.normal(size=(d_sae, d_out)) * 0.5).astype(np.float32),
      "b_enc": (r.normal(size=(d_sae,)) * 0.3).astype(np.float32),
      "b_dec": (r.normal(size=(d_out,)) * 0.3).astype(np.float32),
      "threshold": r.uniform(*threshold, size=(d_sae,)).astype(np.float32),
  }


def _x(seed=1, d=D_IN, scale=1.0):
  x = np.random.default_rng(seed).normal(size=(3, N // 3, d)) * scale
  return x.astype(np.float32)


def _write_gs2(folder: pathlib.Path, arrays, **config) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in
             arrays.items()}, str(folder / "params.safetensors"))
  cfg = {"architecture": "jump_relu", "model_name": "gemma-3-270m",
         "hf_hook_point_in": "model.layers.6.output", **config}
  (folder / "config.json").write_text(json.dumps(cfg))
  return folder


def _write_saelens(folder: pathlib.Path, arrays, **config) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in
             arrays.items()}, str(folder / "sae_weights.safetensors"))
  cfg = {"d_in": arrays["W_enc"].shape[0], "d_sae": arrays["W_enc"].shape[1],
         "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
         "normalize_activations": "none", "reshape_activations": "none",
         "metadata": {"sae_lens_version": "6.54.12",
                      "hook_name": "blocks.6.hook_resid_post"}, **config}
  (folder / "cfg.json").write_text(json.dumps(cfg))
  return folder


def _run(module, x):
  with torch.no_grad():
    recon, f = module(torch.from_numpy(x), return_latents=True)
  return f.numpy(), recon.numpy()


# ------------------------------------------------ Gemma Scope 2 vs. formula


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_jumprelu_equals_formula_in_float64(tmp_path, affine):
  d_out = 7 if affine else D_IN
  a = _arrays(d_out=d_out)
  if affine:
    a["affine_skip_connection"] = (np.random.default_rng(3).normal(
        size=(D_IN, d_out)) * 0.2).astype(np.float32)
  folder = _write_gs2(tmp_path / "gs2", a, affine_connection=affine)
  module = TorchDictionary.from_folder(folder)
  x = _x()
  f, recon = _run(module, x)
  w = {k: v.astype(np.float64) for k, v in a.items()}
  pre = x.astype(np.float64) @ w["w_enc"] + w["b_enc"]
  want_f = np.maximum(pre, 0) * (pre > w["threshold"])
  want = want_f @ w["w_dec"] + w["b_dec"]
  if affine:
    want = want + x @ w["affine_skip_connection"]
  assert 0 < np.count_nonzero(want_f) < want_f.size
  np.testing.assert_array_equal(f > 0, want_f > 0)
  np.testing.assert_allclose(f, want_f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want, rtol=1e-5, atol=1e-5)
  # decode(encode(x)) is forward; encode alone gives the same latents.
  with torch.no_grad():
    np.testing.assert_array_equal(module.encode(torch.from_numpy(x)).numpy(), f)
  assert module.d_in == D_IN and module.d_sae == D_SAE
  assert module.d_out == d_out


def test_gemma_scope_topk_keeps_k_largest_and_follows_dtype(tmp_path):
  a = _arrays()
  del a["threshold"]
  folder = _write_gs2(tmp_path / "gs2", a, architecture="topk", k=5)
  x = _x()
  f, recon = _run(TorchDictionary.from_folder(folder), x)
  pre = x.astype(np.float64) @ a["w_enc"] + a["b_enc"]
  acts = np.maximum(pre, 0)
  kth = np.sort(acts, axis=-1)[..., -5][..., None]
  want_f = np.where(acts >= kth, acts, 0.0)
  assert (np.count_nonzero(f, axis=-1) == 5).all()
  np.testing.assert_allclose(f, want_f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(recon, want_f @ a["w_dec"] + a["b_dec"],
                             rtol=1e-5, atol=1e-5)
  half = TorchDictionary.from_folder(folder, dtype=torch.bfloat16)
  assert half.w_enc.dtype == torch.bfloat16
  assert half(torch.from_numpy(x)).dtype == torch.bfloat16


# ---------------------------------------------- parity with our JAX modules


@pytest.mark.parametrize("arch", ["jumprelu", "jumprelu_transcoder", "topk"])
def test_matches_our_jax_module_after_folding(tmp_path, arch):
  s, s_out = 3.7, 0.6
  transcoder = arch == "jumprelu_transcoder"
  d_out = 7 if transcoder else D_IN
  p = {k: jnp.asarray(v) for k, v in _arrays(4, d_out=d_out).items()}
  x_raw = _x(5, scale=s) + 1.5
  if arch == "topk":
    module = D.TopK(D_IN, D_SAE, k=6)
    folded = D.fold_for_inference(p, s, threshold=0.0, pre_enc_bias=True)
    config = {"architecture": "topk", "k": 6}
  else:
    module = D.JumpReLU(D_IN, D_SAE, d_out=d_out if transcoder else None,
                        pre_enc_bias=not transcoder, sparsity_penalty="l0")
    folded = module.to_inference(p, s,
                                 out_norm_scale=s_out if transcoder else None)
    config = {}
  scale_out = s_out if transcoder else s
  out = module.apply({"params": p}, jnp.asarray(x_raw / s))
  folder = _write_gs2(tmp_path / arch,
                      {k: np.asarray(v) for k, v in folded.items()}, **config)
  f, recon = _run(TorchDictionary.from_folder(folder), x_raw)
  latents = scale_out * np.asarray(out.latents)
  assert 0 < np.count_nonzero(f) < f.size
  np.testing.assert_array_equal(f > 0, latents > 0)
  np.testing.assert_allclose(f, latents, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(recon, scale_out * np.asarray(out.recon),
                             rtol=1e-5, atol=2e-5)


# ------------------------------------------------------------ SAELens parity


def _saelens_arrays(arch, seed=6):
  a = _arrays(seed, d_out=7 if "transcoder" in arch else D_IN)
  out = {"W_enc": a["w_enc"], "W_dec": a["w_dec"], "b_enc": a["b_enc"],
         "b_dec": a["b_dec"]}
  if arch.startswith("jumprelu"):
    out["threshold"] = a["threshold"]
  if "skip" in arch:
    out["W_skip"] = (np.random.default_rng(9).normal(size=(7, D_IN)) *
                     0.2).astype(np.float32)
  return out


@pytest.mark.parametrize("arch,extra", [
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("standard", {}),
    ("topk", {"k": 5}),
    ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu_skip_transcoder", {"d_out": 7, "apply_b_dec_to_input": False}),
])
def test_saelens_folder_matches_saelens_own_loader(tmp_path, arch, extra):
  from sae_lens import SAE  # pylint: disable=import-outside-toplevel
  folder = _write_saelens(tmp_path / arch, _saelens_arrays(arch),
                          architecture=arch, **extra)
  theirs = SAE.load_from_disk(str(folder), device="cpu")
  ours = TorchDictionary.from_folder(folder)
  x = torch.from_numpy(_x(7))
  with torch.no_grad():
    f_theirs = theirs.encode(x)
    f_ours = ours.encode(x)
    recon_theirs = theirs(x)
    recon_ours = ours(x)
    if "skip" not in arch:  # SAELens adds the skip term in decode(f, x).
      np.testing.assert_allclose(ours.decode(f_ours).numpy(),
                                 theirs.decode(f_theirs).numpy(),
                                 rtol=1e-5, atol=1e-5)
  assert 0 < int((f_ours > 0).sum()) < f_ours.numel()
  np.testing.assert_array_equal(f_ours.numpy() > 0, f_theirs.numpy() > 0)
  np.testing.assert_allclose(f_ours.numpy(), f_theirs.numpy(), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(recon_ours.numpy(), recon_theirs.numpy(),
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------- importable without JAX


_NO_JAX = """
import sys
for name in ("jax", "jaxlib", "flax", "optax"):
  sys.modules[name] = None  # Any import of them now raises ImportError.
{import_line}
import torch
m = td.TorchDictionary.from_folder(sys.argv[1])
f = m.encode(torch.ones(2, {d_in}))
assert f.shape == (2, {d_sae}), f.shape
loaded = sorted(n for n in sys.modules if n.split(".")[0] in
                ("jax", "jaxlib", "flax", "optax", "numpy_jax")
                and sys.modules[n] is not None)
gemscope = sorted(n for n in sys.modules if n.startswith("gemscope_jax"))
print("OK", loaded, gemscope)
"""


@pytest.mark.parametrize("copied", [False, True])
def test_imports_and_encodes_without_jax(tmp_path, copied):
  folder = _write_gs2(tmp_path / "gs2", _arrays())
  if copied:  # The single file on its own, outside the package.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(torch_dictionary.__file__, alone / "torch_dictionary.py")
    line, cwd = "import torch_dictionary as td", alone
  else:
    line, cwd = "import gemscope_jax.torch_dictionary as td", tmp_path
  code = _NO_JAX.format(import_line=line, d_in=D_IN, d_sae=D_SAE)
  done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stderr
  # In the package: its root and lazy-face helper (stdlib only), nothing else.
  want = "[]" if copied else ("['gemscope_jax', 'gemscope_jax._lazy', "
                              "'gemscope_jax.torch_dictionary']")
  assert done.stdout.strip() == f"OK [] {want}"


# ---------------------------------------------------------------- bad input


def _gs2(tmp_path, change=None, **config):
  a = _arrays()
  if change:
    change(a)
  return _write_gs2(tmp_path / "bad", a, **config)


def test_bad_folders_name_file_and_key(tmp_path):
  load = TorchDictionary.from_folder
  with pytest.raises(FileNotFoundError, match="params.safetensors"):
    load(tmp_path)
  folder = _gs2(tmp_path, lambda a: a.pop("threshold"))
  with pytest.raises(DictionaryFormatError,
                     match=r"params\.safetensors: threshold: tensor is "
                     "missing"):
    load(folder)
  folder = _gs2(tmp_path, lambda a: a.update(b_enc=np.zeros(5, np.float32)))
  with pytest.raises(DictionaryFormatError,
                     match=r"b_enc: shape \(5,\) .*expected \(40,\)"):
    load(folder)
  folder = _gs2(tmp_path, architecture="gated")
  with pytest.raises(DictionaryFormatError,
                     match=r"config\.json: architecture: unknown.*'gated'"):
    load(folder)
  folder = _gs2(tmp_path, architecture="topk")
  with pytest.raises(DictionaryFormatError, match=r"k: topk needs an integer"):
    load(folder)

  def nan(a):
    a["w_dec"][3, 2] = np.nan
  with pytest.raises(DictionaryFormatError, match="w_dec: holds NaN"):
    load(_gs2(tmp_path, nan))
  folder = _gs2(tmp_path, affine_connection=True)
  with pytest.raises(DictionaryFormatError,
                     match="affine_skip_connection: tensor is missing"):
    load(folder)
  (folder / "config.json").write_text("{not json")
  with pytest.raises(DictionaryFormatError,
                     match=r"config\.json: invalid JSON"):
    load(folder)
  (folder / "params.safetensors").write_bytes(b"\x00" * 10)
  (folder / "config.json").write_text("{}")
  with pytest.raises(DictionaryFormatError, match="not a readable safetensors"):
    load(folder)


def test_bad_saelens_folders_name_file_and_key(tmp_path):
  load = TorchDictionary.from_folder
  a = _saelens_arrays("jumprelu")
  del a["threshold"]
  folder = _write_saelens(tmp_path / "a", a, architecture="jumprelu")
  with pytest.raises(DictionaryFormatError,
                     match=r"sae_weights\.safetensors: threshold: tensor is "
                     "missing"):
    load(folder)
  folder = _write_saelens(tmp_path / "b", _saelens_arrays("standard"),
                          architecture="standard", d_sae=41)
  with pytest.raises(DictionaryFormatError,
                     match=r"W_enc: shape \(12, 40\) does not fit cfg.json "
                     "d_sae=41"):
    load(folder)
  folder = _write_saelens(tmp_path / "c", _saelens_arrays("standard"),
                          architecture="matching_pursuit")
  with pytest.raises(DictionaryFormatError, match=r"cfg\.json: architecture"):
    load(folder)
  folder = _write_saelens(tmp_path / "d", _saelens_arrays("standard"),
                          architecture="standard",
                          normalize_activations="layer_norm")
  with pytest.raises(DictionaryFormatError, match="normalize_activations"):
    load(folder)
  module = load(_write_saelens(tmp_path / "e",
                               _saelens_arrays("jumprelu_skip_transcoder"),
                               architecture="jumprelu_skip_transcoder",
                               d_out=7, apply_b_dec_to_input=False))
  with pytest.raises(ValueError, match="needs x"):
    module.decode(torch.zeros(1, D_SAE))
