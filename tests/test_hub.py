"""Models and Gemma Scope 2 dictionaries by Hub name, without a network.

A Hugging Face cache is built here exactly as huggingface_hub lays it out
(`hub/models--owner--name/{blobs,refs/main,snapshots/<commit>,trees}`: files
in a snapshot are relative symlinks to blobs named by their sha256 (LFS
files) or git blob sha1 (others), refs/main holds the commit, trees/ the
file listing), filled from our own exports: the real Gemma 3 270M written by
`hf_write.save_hf` (sharded), Gemma Scope 2 folders written by `interop`,
and a tiny random multimodal Gemma 3 saved by transformers. Every load runs
with HF_HUB_OFFLINE=1, so only that cache is read.

huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, when imported; the
in-process tests therefore set the environment and the module's constants
both, and one test runs a fresh process with the environment alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from gemscope_jax import interop, models
from gemscope_jax.convert import CheckpointError, hf, hf_write, hub, pretrained
from gemscope_jax.interop import multilayer, releases
from gemscope_jax.parallel import gemma_layout

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DICT_NAME = "gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_medium"
DICT_REPO = "google/gemma-scope-2-270m-pt"
DICT_FOLDER = "resid_post/layer_12_width_16k_l0_medium"
MM_REPO = "tests/gemma-3-tiny-multimodal"
VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
          "model.multi_modal_projector.")


def _digest(path: pathlib.Path, kind: str) -> str:
  """huggingface_hub's blob name: sha256 for LFS files, else the git sha1."""
  data = path.read_bytes()
  if kind == "sha256":
    return hashlib.sha256(data).hexdigest()
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_cache(hub_dir: pathlib.Path, repo: str, files: dict, *,
                 listed: tuple[str, ...] = (), commit: str = COMMIT) -> None:
  """Puts `files` ({path in repo: local file, moved}) into the cache.

  `listed` names more files of the repo that were not downloaded: they go
  into the cached tree listing only, as after a partial download.
  """
  storage = hub_dir / ("models--" + repo.replace("/", "--"))
  snap = storage / "snapshots" / commit
  tree = {}
  for rel, src in files.items():
    src = pathlib.Path(src)
    lfs = rel.endswith(".safetensors")
    sha = _digest(src, "sha256") if lfs else None
    blob_id = _digest(src, "sha1")
    blob = storage / "blobs" / (sha or blob_id)
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(src, blob)
    link = snap / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    tree[rel] = {"size": blob.stat().st_size, "blob_id": blob_id,
                 **({"lfs_sha256": sha, "lfs_size": blob.stat().st_size}
                    if lfs else {})}
  for rel in listed:
    tree[rel] = {"size": 1, "blob_id": "0" * 40}
  (storage / "refs").mkdir(parents=True, exist_ok=True)
  (storage / "refs" / "main").write_text(commit)  # no newline, as it writes
  (storage / "trees").mkdir(exist_ok=True)
  (storage / "trees" / f"{commit}.json").write_text(json.dumps(
      {"format_version": 1, "files": tree}, indent=1))


def add_folder(hub_dir, repo, folder: pathlib.Path, *, prefix: str = "",
               skip=lambda rel: False) -> None:
  """Every file of `folder` (as `prefix/<name>`) into the cache; files for
  which `skip` is true are only listed."""
  files, listed = {}, []
  for p in sorted(folder.rglob("*")):
    if p.is_file():
      rel = prefix + p.relative_to(folder).as_posix()
      (listed.append(rel) if skip(rel) else files.__setitem__(rel, p))
  add_to_cache(hub_dir, repo, files, listed=tuple(listed))


def random_sae(seed: int, d_in: int, d_sae: int, layer: int,
               transcoder: bool = False) -> interop.InferenceDictionary:
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return interop.InferenceDictionary(
      w_enc=f(d_in, d_sae), w_dec=f(d_sae, d_in), b_enc=f(d_sae),
      b_dec=f(d_in), threshold=np.abs(f(d_sae)),
      hookpoint=f"layer_{layer}/{'mlp_in' if transcoder else 'resid_post'}",
      hookpoint_out=f"layer_{layer}/mlp_out" if transcoder else None,
      model_name="google/gemma-3-270m", metadata={"target_l0": 60})


def tiny_multimodal():
  import torch  # pylint: disable=import-outside-toplevel  (test extra)
  import transformers  # pylint: disable=import-outside-toplevel  (test extra)
  text = dict(vocab_size=300, hidden_size=64, intermediate_size=128,
              num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=8,
              query_pre_attn_scalar=16)
  vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, image_size=56, patch_size=14)
  config = transformers.Gemma3Config(
      text_config=text, vision_config=vision, mm_tokens_per_image=4,
      image_token_index=299, boi_token_index=297, eoi_token_index=298)
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(config)
  with torch.no_grad():  # non-zero norms, so a missed `1 + scale` shows
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory, real_model):
  """$HF_HOME/hub with the real 270M, one Gemma Scope 2 repo and a tiny
  multimodal Gemma 3 whose vision-only shards were never downloaded."""
  home = tmp_path_factory.mktemp("hf_home")
  hub_dir = home / "hub"
  work = tmp_path_factory.mktemp("exports")
  config, params = real_model
  hf_write.save_hf(config, params, work / "gemma", max_shard_bytes=300 << 20)
  add_folder(hub_dir, "google/gemma-3-270m", work / "gemma")

  sae = random_sae(0, config.d_model, 16384, 12)
  written = interop.save_gemmascope2(sae, work / "scope")
  assert written == work / "scope" / DICT_FOLDER
  interop.save_gemmascope2(random_sae(1, config.d_model, 16384, 9, True),
                           work / "scope", l0=20)
  rng = np.random.default_rng(2)
  n, d, s = 4, 8, 16
  cc = multilayer.MultiLayerInference(
      kind="crosscoder", w_enc=rng.standard_normal((n, d, s)),
      w_dec=rng.standard_normal((s, n, d)), b_enc=np.zeros(s),
      b_dec=np.zeros((n, d)), threshold=np.ones(s))
  interop.save_multilayer_gemmascope2(
      cc, work / "scope" / "crosscoder/layer_5_9_12_15_width_65k_l0_medium")
  add_folder(hub_dir, DICT_REPO, work / "scope")

  model = tiny_multimodal()
  for name in ("mm", "mm_hub"):
    model.save_pretrained(work / name, max_shard_size="200KB")
  weight_map = hf.read_index(work / "mm" / hf.INDEX)
  text_shards = {weight_map[k] for k in weight_map
                 if not k.startswith(VISION)}
  vision_only = {f for f in weight_map.values() if f not in text_shards}
  assert vision_only, "the test needs a shard holding only vision tensors"
  add_folder(hub_dir, MM_REPO, work / "mm_hub",
             skip=lambda rel: rel in vision_only)
  return {"home": home, "hub": hub_dir, "sae": sae, "crosscoder": cc,
          "mm_model": model, "mm_local": work / "mm",
          "vision_only": vision_only}


@pytest.fixture
def offline(hub_dir, monkeypatch):
  """HF_HOME = the test cache, HF_HUB_OFFLINE=1, for this test."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel  (test extra)
  monkeypatch.setenv("HF_HOME", str(hub_dir["home"]))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  c = huggingface_hub.constants
  monkeypatch.setattr(c, "HF_HOME", str(hub_dir["home"]))
  monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub_dir["hub"]))
  monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
  return hub_dir


def assert_same_tree(a, b):
  fa, fb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def test_the_cache_is_laid_out_as_huggingface_hub_does(offline):
  import huggingface_hub  # pylint: disable=import-outside-toplevel  (test extra)
  info = huggingface_hub.scan_cache_dir(offline["hub"])
  assert not info.warnings
  repos = {r.repo_id: r for r in info.repos}
  assert set(repos) == {"google/gemma-3-270m", DICT_REPO, MM_REPO}
  revision, = repos["google/gemma-3-270m"].revisions
  assert revision.commit_hash == COMMIT and revision.refs == {"main"}
  files = {f.file_name: f for f in revision.files}
  assert hf.INDEX in files and len(files) >= 4
  shard = next(f for f in files.values() if f.file_name.endswith(
      ".safetensors"))
  assert shard.blob_path.name == hashlib.sha256(
      shard.blob_path.read_bytes()).hexdigest()


def test_model_by_name_equals_the_folder(offline, real_model):
  config, params = pretrained.load_model("google/gemma-3-270m")
  snapshot = (offline["hub"] / "models--google--gemma-3-270m" / "snapshots"
              / COMMIT)
  direct_config, direct = pretrained.load_model(snapshot)
  assert config == direct_config == real_model[0]
  assert_same_tree(params, direct)
  del direct
  assert_same_tree(params, real_model[1])


def test_revision_and_size_check(offline, real_model):
  small = models.Gemma3Config(
      name="tiny", num_layers=2, d_model=32, mlp_dim=64, num_heads=2,
      num_kv_heads=1, head_dim=16, vocab_size=128, sliding_window=8)
  with pytest.raises(ValueError, match="gemma-3-270m.*expected tiny"):
    pretrained.load_model(f"google/gemma-3-270m@{COMMIT}", small)
  with pytest.raises(FileNotFoundError,
                     match=r"google/gemma-3-270m@v9: config\.json: not in "
                     "the local Hugging Face cache"):
    pretrained.load_model("google/gemma-3-270m@v9")


def test_multimodal_text_logits_match_transformers(offline, monkeypatch):
  import torch  # pylint: disable=import-outside-toplevel  (test extra)
  opened, read = [], []
  real_open = hf.safe_open

  class Recording:
    def __init__(self, path, **kw):
      opened.append(pathlib.Path(path).name)
      self._handle = real_open(path, **kw)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def keys(self):
      return self._handle.keys()

    def get_tensor(self, key):
      read.append(key)
      return self._handle.get_tensor(key)

  monkeypatch.setattr(hf, "safe_open", Recording)
  config, params = pretrained.load_model(MM_REPO)
  assert read and not [k for k in read if k.startswith(VISION)]
  assert not set(opened) & offline["vision_only"]
  assert all(k.startswith("language_model.model.") for k in read)
  assert config.num_layers == 6 and config.vocab_size == 300

  model = offline["mm_model"]
  tokens = np.random.default_rng(0).integers(3, 296, (2, 20))
  with torch.no_grad():
    want = model(input_ids=torch.tensor(tokens)).logits.float().numpy()
  got = models.forward(params, tokens, config=config).logits
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)

  # transformers 5 names the tensors `model.language_model.*` in memory.
  state = model.state_dict()
  assert any(k.startswith("model.language_model.") for k in state)
  _, from_state = hf.load_hf(state, config)
  assert_same_tree(params, from_state)


def test_leaves_go_straight_into_their_shardings(offline):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                           ("data", "model"))
  config, params = pretrained.load_model(MM_REPO, mesh=mesh, layout="fsdp")
  want = gemma_layout.gemma_param_shardings(config, mesh, "fsdp")
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(
      want, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))):
    assert isinstance(x, jax.Array) and x.sharding == s
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, same = pretrained.load_model(MM_REPO, shardings=one,
                                  dtype=jax.numpy.bfloat16)
  assert {str(x.dtype) for x in jax.tree.leaves(same)} == {"bfloat16"}
  assert_same_tree(jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16),
                                params), same)


def test_another_architecture_is_refused(tmp_path, offline):
  folder = tmp_path / "llama"
  shutil.copytree(offline["mm_local"], folder)
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**cfg,
                                                  "model_type": "llama"}))
  with pytest.raises(CheckpointError, match=r"llama/config\.json: "
                     r"model_type: is 'llama': not a Gemma 3 checkpoint"):
    pretrained.load_model(folder)
  cfg["text_config"]["model_type"] = "gemma2"
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="text_config.model_type: is "
                     "'gemma2'"):
    hf.load_hf(folder)
  # By name it is refused on config.json alone, before any weight is asked.
  (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
  add_to_cache(offline["hub"], "meta/llama-ish",
               {"config.json": folder / "config.json"})
  with pytest.raises(CheckpointError, match=r"config\.json: model_type: "
                     "is 'llama'"):
    pretrained.load_model("meta/llama-ish")


def test_missing_model_repo_or_shard_is_named(tmp_path, offline):
  with pytest.raises(FileNotFoundError, match=r"google/gemma-3-12b-it: "
                     r"config\.json: not in the local Hugging Face cache"):
    pretrained.load_model("google/gemma-3-12b-it")
  folder = tmp_path / "mm"
  shutil.copytree(offline["mm_local"], folder)
  weight_map = hf.read_index(folder / hf.INDEX)
  shard = weight_map["language_model.model.layers.3.mlp.up_proj.weight"]
  (folder / shard).unlink()
  with pytest.raises(CheckpointError, match=f"{shard}: shard is missing"):
    pretrained.load_model(folder)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    pretrained.load_model(tmp_path / "nowhere" / "x.gguf")


def test_repo_ids_and_paths():
  assert hub.parse_repo_id("google/gemma-3-1b-it") == ("google/gemma-3-1b-it",
                                                       None)
  assert hub.parse_repo_id("google/gemma-3-1b-it@refs/pr/1") is None
  assert hub.parse_repo_id("a/b@v1.0") == ("a/b", "v1.0")
  for not_an_id in ("default", "/abs/path", "./x/y", "a/b/c", "a--b/c",
                    "a/b.git"):
    assert hub.parse_repo_id(not_an_id) is None, not_an_id


@pytest.mark.parametrize("name, repo, revision, folder", [
    (DICT_NAME, DICT_REPO, None, DICT_FOLDER),
    ("gemma-scope-2-27b-it-res-all@v2/layer_61_width_262k_l0_big",
     "google/gemma-scope-2-27b-it", "v2",
     "resid_post_all/layer_61_width_262k_l0_big"),
    ("gemma-scope-2-1b-pt-transcoders/transcoder/"
     "layer_13_width_65k_l0_medium_affine", "google/gemma-scope-2-1b-pt",
     None, "transcoder/layer_13_width_65k_l0_medium_affine"),
    ("gemma-scope-2-4b-pt/mlp_out/layer_9_width_16k_l0_small",
     "google/gemma-scope-2-4b-pt", None, "mlp_out/layer_9_width_16k_l0_small"),
    ("google/gemma-scope-2-1b-it/clt/width_262k_l0_medium_affine",
     "google/gemma-scope-2-1b-it", None, "clt/width_262k_l0_medium_affine"),
    ("gemma-scope-2-270m-pt-res/layer_12_width_262k_l0_medium_seed_1",
     DICT_REPO, None, "resid_post/layer_12_width_262k_l0_medium_seed_1"),
    ("me/my-saes@main/runs/layer_6_width_4k_l0_37", "me/my-saes", "main",
     "runs/layer_6_width_4k_l0_37"),
])
def test_release_names_resolve(name, repo, revision, folder):
  r = releases.resolve(name)
  assert (r.repo, r.revision, r.folder) == (repo, revision, folder)
  assert releases.is_name(name)


def test_paths_are_not_names():
  for path in ("/data/sae", "./sae/x", "~/sae/x", "sae"):
    assert not releases.is_name(path), path


def test_dictionary_by_name_equals_the_one_written(offline):
  sae = offline["sae"]
  for name in (DICT_NAME, f"{DICT_REPO}/{DICT_FOLDER}",
               f"gemma-scope-2-270m-pt@{COMMIT}/{DICT_FOLDER}"):
    d = interop.load_dictionary(name)
    for key in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
      np.testing.assert_array_equal(getattr(d, key), getattr(sae, key))
    assert d.hookpoint == "layer_12/resid_post"
  # SAELens's transcoder ids repeat the family.
  tc = interop.load_dictionary("gemma-scope-2-270m-pt-transcoders/transcoder/"
                               "layer_9_width_16k_l0_small")
  assert tc.is_transcoder and tc.hookpoint_out == "layer_9/mlp_out"
  cc = interop.load_dictionary(
      "gemma-scope-2-270m-pt-crosscoder/layer_5_9_12_15_width_65k_l0_medium")
  assert isinstance(cc, multilayer.MultiLayerInference)
  np.testing.assert_array_equal(cc.w_dec, offline["crosscoder"].w_dec)


def test_steer_specs_by_release_name_equal_the_folder(offline):
  """`--steer` with release names resolves, through the cache, to the same
  dictionaries and edits as the snapshot's folders, with both loaders (the
  library's and the command line's, which also reads workdirs)."""
  from gemscope_jax import cli  # pylint: disable=import-outside-toplevel  (only here)
  from gemscope_jax import surgery  # pylint: disable=import-outside-toplevel  (only here)
  from gemscope_jax.surgery import steer_spec  # pylint: disable=import-outside-toplevel  (only here)
  snapshot = (offline["hub"] / ("models--" + DICT_REPO.replace("/", "--"))
              / "snapshots" / COMMIT)
  tc_name = ("gemma-scope-2-270m-pt-transcoders/transcoder/"
             "layer_9_width_16k_l0_small")
  sources = {DICT_NAME: snapshot / DICT_FOLDER,
             tc_name: snapshot / "transcoder/layer_9_width_16k_l0_small"}
  assert all(p.is_dir() for p in sources.values())
  specs = ["{sae}:1234+8@prompt", "{sae}:77=20@3:9", "{tc}:5=-2.5@generated"]
  folder_sae = interop.load_dictionary(sources[DICT_NAME])
  np.testing.assert_array_equal(folder_sae.w_dec, offline["sae"].w_dec)
  for load in (steer_spec.load_steer_source,
               cli._load_dictionary_source):  # pylint: disable=protected-access
    got = {}
    for how in ("name", "folder"):
      sae, tc = ((DICT_NAME, tc_name) if how == "name"
                 else map(str, sources.values()))
      got[how] = steer_spec.load_interventions(
          [s.format(sae=sae, tc=tc) for s in specs], load=load)
    add, clamp, tc_clamp = got["name"]
    assert isinstance(add, surgery.AddLatent) and add.coef == 8
    (hp, _, args), = add.parts()
    assert hp == "layer_12/resid_post"
    np.testing.assert_array_equal(args["direction"], folder_sae.w_dec[1234])
    assert isinstance(clamp, surgery.ClampLatents) and clamp.latents == (77,)
    assert [p[0] for p in tc_clamp.parts()] == ["layer_9/mlp_out"]
    assert tc_clamp.parts()[0][1].source == "layer_9/mlp_in"
    # The same edits, argument for argument, as from the folders.
    for a, b in zip(got["name"], got["folder"]):
      for (hp_a, part_a, args_a), (hp_b, part_b, args_b) in zip(a.parts(),
                                                                b.parts()):
        assert (hp_a, part_a) == (hp_b, part_b)
        assert sorted(args_a) == sorted(args_b)
        for key in args_a:
          np.testing.assert_array_equal(args_a[key], args_b[key],
                                        err_msg=key)
    edits_a, _ = surgery.steering_edits(got["name"])
    edits_b, _ = surgery.steering_edits(got["folder"])
    assert edits_a == edits_b and sorted(edits_a) == ["layer_12/resid_post",
                                                      "layer_9/mlp_out"]


@pytest.mark.parametrize("name, message", [
    ("gemma-scope-2-2b-pt-res/layer_1_width_16k_l0_small",
     "unknown model size '2b' (valid: 270m, 1b, 4b, 12b, 27b)"),
    ("gemma-scope-2-270m-pt-resid/layer_1_width_16k_l0_small",
     "unknown release alias 'resid' (valid: res, att, mlp, transcoders"),
    ("gemma-scope-2-270m-pt-res/layer_1_width_32k_l0_small",
     "unknown width '32k' (valid: 16k, 65k, 262k, 524k, 1m)"),
    ("gemma-scope-2-270m-pt-res/layer_1_width_16k_l0_huge",
     "unknown L0 label 'huge' (valid: small, medium, big)"),
    ("gemma-scope-2-270m-pt-res/layer_18_width_16k_l0_big",
     "layer 18 does not exist in Gemma 3 270m (layers 0-17)"),
    ("google/gemma-scope-2-270m-pt/resid/layer_1_width_16k_l0_big",
     "unknown family 'resid' (valid: resid_post, attn_out, mlp_out"),
    ("gemma-scope-2-270m-it-res/layer_1_width_16k_l0_big_affine",
     "only transcoder families have _affine folders"),
])
def test_unknown_names_say_what_is_valid(name, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    interop.load_dictionary(name)
  with pytest.raises(ValueError, match="sizes 270m, 1b, 4b, 12b, 27b"):
    interop.load_dictionary(name)


def test_missing_folder_or_repo_names_both(offline):
  with pytest.raises(FileNotFoundError, match=(
      r"google/gemma-scope-2-270m-pt: the repo has no folder "
      r"resid_post/layer_5_width_16k_l0_small; resid_post publishes widths "
      r"16k, 65k, 262k, 1m, L0 small, medium, big, layers 5, 9, 12, 15")):
    interop.load_dictionary(
        "gemma-scope-2-270m-pt-res/layer_5_width_16k_l0_small")
  with pytest.raises(FileNotFoundError, match=(
      r"google/gemma-scope-2-1b-it: folder "
      r"attn_out_all/layer_3_width_262k_l0_big: not in the local")):
    interop.load_dictionary(
        "gemma-scope-2-1b-it-att-all/layer_3_width_262k_l0_big")
  with pytest.raises(FileNotFoundError, match="no such dictionary folder"):
    interop.load_dictionary("/nowhere/resid_post")


def test_a_fresh_process_honours_hf_home_and_offline(offline, tmp_path):
  """The environment alone points huggingface_hub at the cache; on a 2x2
  mesh of CPU devices each weight lands split as gemma_layout says."""
  want = tmp_path / "want.npy"
  np.save(want, offline["sae"].w_dec)
  code = textwrap.dedent(f"""
      import jax, numpy as np
      from gemscope_jax import interop
      from gemscope_jax.convert import pretrained
      from gemscope_jax.parallel import gemma_layout
      d = interop.load_dictionary({DICT_NAME!r})
      np.testing.assert_array_equal(d.w_dec, np.load({str(want)!r}))
      mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2),
                               ("data", "model"))
      config, params = pretrained.load_model({MM_REPO!r}, mesh=mesh,
                                             layout="fsdp_tp")
      _, whole = pretrained.load_model({MM_REPO!r})
      specs = gemma_layout.gemma_param_specs(config, dict(mesh.shape),
                                             "fsdp_tp")
      split = 0
      for x, y, spec in zip(jax.tree.leaves(params), jax.tree.leaves(whole),
                            jax.tree.leaves(specs, is_leaf=lambda s: isinstance(
                                s, jax.sharding.PartitionSpec))):
        assert x.sharding.spec == spec, (x.sharding, spec)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        split += any(a is not None for a in spec)
      print("ok", d.d_sae, split)
  """)
  env = {**os.environ, "HF_HOME": str(offline["home"]),
         "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  env.pop("HF_HUB_CACHE", None)
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  ok, d_sae, split = out.stdout.split()
  # 6 layers x 5 weight matrices + the embedding are split.
  assert (ok, d_sae, split) == ("ok", "16384", "31")
