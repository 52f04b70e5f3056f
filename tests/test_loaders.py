"""Loaders: exact round trips through GGUF and HF files, and clear errors.

GGUF files here are written with gguf's own GGUFWriter from a tiny random
model, the way llama.cpp's converter lays a Gemma 3 out.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from gemscope_jax import models
from gemscope_jax.convert import pretrained
from gemscope_jax.convert import CheckpointError, _linear, load_gguf, load_hf
from gemscope_jax.convert.gguf import GGUF_NAMES
from gemscope_jax.convert import hf as hf_convert
from gemscope_jax.convert.hf import HF_NAMES

TINY = models.Gemma3Config(
    name="tiny", num_layers=2, d_model=32, mlp_dim=64, num_heads=2,
    num_kv_heads=1, head_dim=16, vocab_size=128, sliding_window=8)


@pytest.fixture(scope="module")
def tiny_params():
  params = models.init_params(TINY, jax.random.key(1))
  # Non-zero norms, so the GGUF `1 + w` offset is checked.
  return jax.tree.map(
      lambda x: np.asarray(x) + np.float32(0.25) * (x.ndim == 1), params)


def write_gguf(path, params, config=TINY, *, arch="gemma3", drop=(),
               replace=None):
  tensors = _linear.to_linear_layout(params, config, GGUF_NAMES,
                                     norm_offset=1.0)
  tensors.update(replace or {})
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.num_layers)
  writer.add_embedding_length(config.d_model)
  writer.add_feed_forward_length(config.mlp_dim)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_sliding_window(config.sliding_window)
  writer.add_rope_freq_base(config.rope_base_global)
  for name, x in tensors.items():
    if name not in drop:
      writer.add_tensor(name, x)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return pathlib.Path(path)


def write_hf(directory, params, config=TINY, drop=(), replace=None):
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = _linear.to_linear_layout(params, config, HF_NAMES)
  tensors.update(replace or {})
  save_file({k: v for k, v in tensors.items() if k not in drop},
            directory / "model.safetensors")
  (directory / "config.json").write_text(json.dumps({
      "model_type": "gemma3_text", "num_hidden_layers": config.num_layers,
      "hidden_size": config.d_model, "intermediate_size": config.mlp_dim,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "vocab_size": config.vocab_size,
      "sliding_window": config.sliding_window,
      "query_pre_attn_scalar": config.query_pre_attn_scalar,
      "layer_types": ["sliding_attention" if config.attention_kind(i).value
                      == "local" else "full_attention"
                      for i in range(config.num_layers)],
      "rope_parameters": {
          "sliding_attention": {"rope_type": "default",
                                "rope_theta": config.rope_base_local},
          "full_attention": {"rope_type": "default",
                             "rope_theta": config.rope_base_global}},
  }))
  return directory


def assert_same_tree(a, b):
  fa, fb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=str(path))


def test_gguf_round_trip_is_exact(tmp_path, tiny_params):
  path = write_gguf(tmp_path / "tiny.gguf", tiny_params)
  config, params = load_gguf(path, TINY)
  assert config == TINY
  assert_same_tree(params, tiny_params)


def test_gguf_config_inferred_from_metadata(tmp_path, tiny_params):
  path = write_gguf(tmp_path / "tiny.gguf", tiny_params)
  config, _ = load_gguf(path)
  for field in ("num_layers", "d_model", "mlp_dim", "num_heads",
                "num_kv_heads", "head_dim", "vocab_size", "sliding_window"):
    assert getattr(config, field) == getattr(TINY, field), field


def test_hf_directory_round_trip_is_exact(tmp_path, tiny_params):
  directory = write_hf(tmp_path / "hf", tiny_params)
  config, params = load_hf(directory)
  assert (config.num_layers, config.d_model, config.global_every) == (2, 32, 6)
  assert_same_tree(params, tiny_params)
  # The generic entry point dispatches on what the path holds.
  config2, params2 = pretrained.load_model(directory, config)
  assert_same_tree(jax.tree.map(np.asarray, params2), tiny_params)


def test_truncated_gguf_names_the_file(tmp_path, real_gguf_path):
  cut = tmp_path / "cut.gguf"
  with open(real_gguf_path, "rb") as src, open(cut, "wb") as dst:
    dst.write(src.read(40_000_000))
  with pytest.raises(CheckpointError, match=r"cut\.gguf") as e:
    load_gguf(cut)
  assert "truncated" in str(e.value) or "token_embd" in str(e.value)


def test_truncated_tiny_gguf_names_the_file(tmp_path, tiny_params):
  path = write_gguf(tmp_path / "tiny.gguf", tiny_params)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 3000])
  with pytest.raises(CheckpointError, match=r"tiny\.gguf"):
    load_gguf(path, TINY)


def test_gguf_of_another_architecture(tmp_path, tiny_params):
  path = write_gguf(tmp_path / "llama.gguf", tiny_params, arch="llama")
  with pytest.raises(CheckpointError,
                     match=r"llama\.gguf: general\.architecture: is 'llama'"):
    load_gguf(path)


def test_gguf_missing_tensor_is_named(tmp_path, tiny_params):
  path = write_gguf(tmp_path / "t.gguf", tiny_params,
                    drop=("blk.1.ffn_up.weight",))
  with pytest.raises(CheckpointError,
                     match=r"t\.gguf: blk\.1\.ffn_up\.weight: tensor is missing"):
    load_gguf(path, TINY)


def test_gguf_that_does_not_fit_the_chosen_size(tmp_path, tiny_params):
  path = write_gguf(tmp_path / "t.gguf", tiny_params)
  with pytest.raises(CheckpointError, match=r"t\.gguf: .*gemma3_270m needs"):
    load_gguf(path, models.Gemma3_270M)


def test_gguf_tensor_with_a_wrong_shape_is_named(tmp_path, tiny_params):
  bad = np.zeros((16, 32), np.float32)  # attn_q needs (2 * 16, 32)
  path = write_gguf(tmp_path / "t.gguf", tiny_params,
                    replace={"blk.0.attn_q.weight": bad})
  with pytest.raises(CheckpointError,
                     match=r"blk\.0\.attn_q\.weight: shape \(16, 32\) does "
                     r"not fit tiny, which needs \(32, 32\)"):
    load_gguf(path, TINY)


def test_hf_errors_name_file_and_tensor(tmp_path, tiny_params):
  missing = write_hf(tmp_path / "missing", tiny_params,
                     drop=("model.layers.1.mlp.down_proj.weight",))
  with pytest.raises(CheckpointError,
                     match=r"missing: model\.layers\.1\.mlp\.down_proj\.weight:"
                     r" tensor is missing"):
    load_hf(missing)

  shaped = write_hf(tmp_path / "shaped", tiny_params, replace={
      "model.norm.weight": np.zeros(31, np.float32)})
  with pytest.raises(CheckpointError, match=r"model\.norm\.weight: shape"):
    load_hf(shaped)

  cut = write_hf(tmp_path / "cut", tiny_params)
  data = (cut / "model.safetensors").read_bytes()
  (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=r"model\.safetensors"):
    load_hf(cut)

  no_config = tmp_path / "no_config"
  shutil.copytree(missing, no_config)
  (no_config / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf(no_config)

  with pytest.raises(FileNotFoundError, match="nowhere"):
    pretrained.load_model(tmp_path / "nowhere")


def test_hf_config_defaults_are_transformers_own():
  """A config.json that omits fields means transformers' class defaults."""
  import transformers
  minimal = {"hidden_size": 2560, "intermediate_size": 10240,
             "num_hidden_layers": 34, "sliding_window": 1024,
             "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
  ours = hf_convert.config_from_hf({"text_config": minimal})
  full = transformers.Gemma3TextConfig(**minimal).to_dict()
  assert ours == hf_convert.config_from_hf(full)
  assert ours == models.Gemma3_4B.replace(vocab_size=262_208)


def test_orbax_directory_loads_through_load_model(tmp_path, tiny_params):
  from gemscope_jax.convert import save_orbax
  save_orbax(tiny_params, tmp_path / "ckpt")
  config, params = pretrained.load_model(tmp_path / "ckpt", TINY)
  assert config == TINY
  assert_same_tree(jax.tree.map(np.asarray, params), tiny_params)


def test_cache_reader_places_each_tensor_from_an_aligned_buffer(
    tmp_path, tiny_params):
  """The default model's cache is read tensor by tensor into 64-byte
  aligned buffers, which the CPU backend adopts without a copy (so the
  load never holds the model twice); a damaged file is refused."""
  from gemscope_jax.convert import _tree
  file = tmp_path / "cache.safetensors"
  flat = {k: np.ascontiguousarray(v)
          for k, v in _tree.flatten(tiny_params).items()}
  save_file(flat, file, metadata={"config": "tiny"})
  read = pretrained._read_safetensors  # pylint: disable=protected-access
  keeps = pretrained._keeps  # pylint: disable=protected-access
  host = read(file, keeps(None), None)
  assert_same_tree(host, tiny_params)
  assert all(x.ctypes.data % 64 == 0 for x in jax.tree.leaves(host))
  placed = []

  def place(path, x):
    y = jax.device_put(x)
    placed.append((path, y.unsafe_buffer_pointer() == x.ctypes.data))
    return y

  assert_same_tree(jax.tree.map(np.asarray, read(file, keeps(1), place)),
                   {k: v for k, v in tiny_params.items() if k != "layer_1"})
  assert placed and all(same for _, same in placed)     # no copy on CPU
  assert not any(p.startswith("layer_1/") for p, _ in placed)
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(file.read_bytes()[:-100])
  unreadable = pretrained._Unreadable  # pylint: disable=protected-access
  with pytest.raises(unreadable, match="truncated|fit"):
    read(cut, keeps(None), None)


def test_num_blocks_keeps_the_first_blocks(tmp_path, tiny_params):
  """load_model(num_blocks=n) holds blocks 0 .. n - 1 (with the embedding
  and final norm) from every source; a pass that stops there gives what
  the whole model gives."""
  sources = {"hf": write_hf(tmp_path / "hf", tiny_params),
             "gguf": write_gguf(tmp_path / "tiny.gguf", tiny_params)}
  tokens = np.arange(1, 17).reshape(2, 8) % TINY.vocab_size
  hp = "layer_0/resid_post"
  want = models.forward(tiny_params, tokens, config=TINY, hookpoints=(hp,),
                        logits=False).activations[hp]
  expect = {"hf": None, "gguf": TINY}   # a folder's config is its own
  for name, source in sources.items():
    config, params = pretrained.load_model(source, expect[name],
                                           num_blocks=1)
    assert config.num_layers == 2
    assert sorted(params) == ["embedder", "final_norm", "layer_0"], name
    got = models.forward(params, tokens, config=TINY, hookpoints=(hp,),
                         logits=False).activations[hp]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _, whole = pretrained.load_model(source, expect[name], num_blocks=5)
    assert_same_tree(jax.tree.map(np.asarray, whole), tiny_params)
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="num_blocks"):
      pretrained.load_model(sources["hf"], num_blocks=bad)
