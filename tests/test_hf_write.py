"""Writing Gemma 3 as a transformers checkpoint, checked by transformers itself.

A tiny random Gemma 3 built in our own parameter layout (local and global
layers, a sliding window shorter than the sequence, grouped-query attention,
linear RoPE scaling, non-zero norm scales) is written with `save_hf` and read
back by `transformers.Gemma3ForCausalLM.from_pretrained`; its logits must
equal our forward pass. The real Gemma 3 270M is checked the same way
(marked slow).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from gemscope_jax import models
from gemscope_jax.convert import (CheckpointError, config_from_hf,
                                  export_model, hf_write, load_hf, save_hf)

import hf_reference

TINY = models.Gemma3Config(
    name="gemma3_custom", num_layers=6, d_model=64, mlp_dim=128, num_heads=4,
    num_kv_heads=2, head_dim=16, vocab_size=512, sliding_window=5,
    global_every=3, rope_scale_global=8.0, query_pre_attn_scalar=16.0)
T = 16


@pytest.fixture(scope="module")
def tiny():
  params = models.init_params(TINY, jax.random.key(0))
  params = jax.tree.map(np.asarray, params)
  rng = np.random.default_rng(0)
  # Norm scales start at zero; make `1 + scale` matter. Every other leaf
  # gets a random perturbation so no tensor is accidentally symmetric.
  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return rng.normal(0.0, 0.5, x.shape).astype(np.float32)
    return (x + rng.normal(0.0, 0.02, x.shape)).astype(np.float32)
  params = jax.tree_util.tree_map_with_path(perturb, params)
  tokens = rng.integers(3, TINY.vocab_size, size=(3, T)).astype(np.int32)
  tokens[:, 0] = 2
  logits = np.asarray(models.forward(jax.tree.map(jnp.asarray, params),
                                     tokens, config=TINY).logits)
  return params, tokens, logits


def _hf_logits(directory, tokens):
  model = transformers.Gemma3ForCausalLM.from_pretrained(
      str(directory), dtype=torch.float32, attn_implementation="eager").eval()
  return hf_reference.run(model, tokens)[0]


def _leaves(params):
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def _no_leftovers(parent: pathlib.Path):
  """No hidden temporary siblings remain after a write."""
  assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("config", list(models.CONFIGS.values()) + [TINY],
                         ids=lambda c: c.name)
def test_config_json_reads_back_in_transformers_and_here(config):
  hf = hf_write.hf_config(config)
  assert config_from_hf(hf) == config
  cfg = transformers.Gemma3TextConfig(**json.loads(json.dumps(hf)))
  assert cfg.model_type == "gemma3_text"
  assert [t == "full_attention" for t in cfg.layer_types] == [
      l in config.global_layers() for l in range(config.num_layers)]
  full = cfg.rope_parameters["full_attention"]
  assert full["rope_theta"] == config.rope_base_global
  assert full.get("factor", 1.0) == config.rope_scale_global
  assert full["rope_type"] == ("linear" if config.rope_scale_global != 1.0
                               else "default")
  local = cfg.rope_parameters["sliding_attention"]
  assert (local["rope_type"], local["rope_theta"]) == (
      "default", config.rope_base_local)
  assert cfg.query_pre_attn_scalar == config.query_pre_attn_scalar
  assert (cfg.sliding_window, cfg.head_dim, cfg.num_key_value_heads) == (
      config.sliding_window, config.head_dim, config.num_kv_heads)
  assert cfg.final_logit_softcapping is None
  assert cfg.attn_logit_softcapping is None
  assert cfg.tie_word_embeddings
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, 1, 0)


def test_transformers_logits_match_ours_and_round_trip_is_exact(tiny,
                                                                tmp_path):
  params, tokens, ours = tiny
  out = save_hf(TINY, params, tmp_path / "hf")
  assert sorted(p.name for p in out.iterdir()) == ["config.json",
                                                    "model.safetensors"]
  _no_leftovers(tmp_path)
  theirs = _hf_logits(out, tokens)
  np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=1e-5)

  config, back = load_hf(out)
  assert config == TINY
  want, got = _leaves(params), _leaves(back)
  assert set(want) == set(got)
  for key in want:
    assert got[key].dtype == np.float32
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_export_model_reads_any_source_and_writes_the_same_files(tiny,
                                                                 tmp_path):
  params, _, _ = tiny
  first = save_hf(TINY, params, tmp_path / "first")
  # A transformers directory is one of the sources load_model accepts.
  again = export_model(first, tmp_path / "again")
  for name in ("config.json", "model.safetensors"):
    assert (again / name).read_bytes() == (first / name).read_bytes(), name


def test_bfloat16_export_loads_and_matches(tiny, tmp_path):
  params, tokens, ours = tiny
  out = save_hf(TINY, params, tmp_path / "bf16", dtype="bfloat16")
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(out / "model.safetensors"), framework="pt") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  # Reading back gives exactly the bf16-rounded parameters.
  rounded = jax.tree.map(
      lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  _, back = load_hf(out)
  for key, want in _leaves(rounded).items():
    np.testing.assert_array_equal(_leaves(back)[key], want, err_msg=key)
  theirs = _hf_logits(out, tokens)
  # Against our forward on the same rounded weights: fp32 agreement.
  ours_rounded = np.asarray(models.forward(
      jax.tree.map(jnp.asarray, rounded), tokens, config=TINY).logits)
  np.testing.assert_allclose(theirs, ours_rounded, atol=2e-5, rtol=1e-5)
  # Against the unrounded model: bf16 weight rounding only.
  scale = np.abs(ours).max()
  assert np.abs(theirs - ours).max() < 2e-2 * scale


def test_sharded_export_loads_in_transformers(tiny, tmp_path):
  params, tokens, ours = tiny
  out = save_hf(TINY, params, tmp_path / "sharded", max_shard_bytes=60_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 3
  assert files == sorted(p.name for p in out.glob("model-*.safetensors"))
  assert not (out / "model.safetensors").exists()
  n = len(files)
  assert files[0] == f"model-00001-of-{n:05d}.safetensors"
  total = sum(x.nbytes for x in _leaves(params).values())
  assert index["metadata"]["total_size"] == total
  np.testing.assert_allclose(_hf_logits(out, tokens), ours, atol=2e-5,
                             rtol=1e-5)
  _, back = load_hf(out)
  for key, want in _leaves(params).items():
    np.testing.assert_array_equal(_leaves(back)[key], want, err_msg=key)


def test_existing_destination_refused_unless_overwrite(tiny, tmp_path):
  params, _, _ = tiny
  dest = tmp_path / "out"
  dest.mkdir()  # An empty directory is fine.
  save_hf(TINY, params, dest)
  with pytest.raises(FileExistsError, match="not empty"):
    save_hf(TINY, params, dest)
  (dest / "user.txt").write_text("old")
  save_hf(TINY, params, dest, dtype="bfloat16", overwrite=True)
  # Only what an export writes is replaced: the user's file stays.
  assert (dest / "user.txt").read_text() == "old"
  assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
  _no_leftovers(tmp_path)
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileExistsError, match="is a file"):
    save_hf(TINY, params, tmp_path / "file")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_half_written(tiny, tmp_path, monkeypatch,
                                                  existing):
  params, _, _ = tiny
  dest = tmp_path / "out"
  if existing:
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
  calls = []
  real = hf_write._write_safetensors  # pylint: disable=protected-access

  def failing(tensors, path):
    calls.append(path)
    if len(calls) == 2:  # The first shard is already on disk.
      raise OSError("disk full")
    real(tensors, path)

  monkeypatch.setattr(hf_write, "_write_safetensors", failing)
  with pytest.raises(OSError, match="disk full"):
    save_hf(TINY, params, dest, max_shard_bytes=60_000, overwrite=existing)
  assert len(calls) == 2
  if existing:
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
  else:
    assert not dest.exists()
  _no_leftovers(tmp_path)


def test_missing_or_misshapen_parameter_is_named(tiny, tmp_path):
  params, _, _ = tiny
  missing = jax.tree.map(lambda x: x, params)
  del missing["layer_4"]["mlp"]["linear"]
  with pytest.raises(CheckpointError, match=r"layer_4/mlp/linear.*missing.*"
                     r"\(128, 64\)"):
    save_hf(TINY, missing, tmp_path / "a")
  bad = jax.tree.map(lambda x: x, params)
  bad["layer_2"]["attn"]["q_einsum"]["w"] = np.zeros((4, 64, 8), np.float32)
  with pytest.raises(CheckpointError, match=r"layer_2/attn/q_einsum/w.*"
                     r"\(4, 64, 8\).*\(4, 64, 16\)"):
    save_hf(TINY, bad, tmp_path / "b")
  with pytest.raises(ValueError, match="dtype"):
    save_hf(TINY, params, tmp_path / "c", dtype="float16")
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_real_270m_export_matches_transformers(real_model, tmp_path):
  from gemscope_jax.text.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel
  config, params = real_model
  out = export_model("default", tmp_path / "gemma3_270m")
  tokens = np.asarray([default_tokenizer().encode(
      "The capital of France is Paris. It lies on the Seine.")], np.int32)
  ours = np.asarray(models.forward(params, tokens, config=config).logits)
  theirs = _hf_logits(out, tokens)
  diff = np.abs(theirs - ours).max()
  print(f"real 270M: max |logit diff| = {diff:.3g} "
        f"(logit scale {np.abs(ours).max():.3g})")
  assert diff < 5e-4  # measured 5.0e-5 on logits of magnitude about 26
  top5 = lambda logits: set(logits[0, -1].argsort()[-5:])
  assert top5(theirs) == top5(ours)
  _, back = load_hf(out)
  got = _leaves(back)
  for key, want in _leaves(params).items():
    assert np.array_equal(got[key], want), key
