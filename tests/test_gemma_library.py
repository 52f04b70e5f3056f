"""Our Gemma 3 and Orbax I/O against Google DeepMind's `gemma` library.

The library runs in its own virtualenv (scripts/gemma_reference_env.sh builds
it, about a minute the first time) through tests/gemma_reference/run_gemma.py,
never in this process: importing it monkeypatches flax and pulls in
tensorflow. Parameters, tokens and logits cross over as files in a temporary
directory. If the environment cannot be built the tests fail, they are not
skipped: a reference that silently disappears checks nothing.

Checked: the same real Gemma 3 270M weights give the same logits in both
implementations; checkpoints written by `gm.ckpts.save_params` (nested, and
the flat and stacked layouts of the released checkpoints, rewritten by the
library's own converters) load exactly with `load_orbax`, and ours load in
the library; the library's parameter counts equal ours for all five sizes;
bad checkpoints give clear errors.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import subprocess
from typing import Iterator

import jax
import ml_dtypes
import numpy as np
import pytest

from gemscope_jax import models
from gemscope_jax.convert import CheckpointError, load_orbax, save_orbax
from gemscope_jax.convert._tree import flatten, unflatten

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV_SCRIPT = ROOT / "scripts" / "gemma_reference_env.sh"
RUN_GEMMA = ROOT / "tests" / "gemma_reference" / "run_gemma.py"
SIZES = ("270m", "1b", "4b", "12b", "27b")


# --- the reference process ---------------------------------------------------

@pytest.fixture(scope="session")
def gemma_python() -> str:
  """The reference env's interpreter; builds the env if needed."""
  try:
    proc = subprocess.run(["bash", str(ENV_SCRIPT)], capture_output=True,
                          text=True, timeout=1800, check=False)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{ENV_SCRIPT} did not finish in {e.timeout} s")
  if proc.returncode != 0:
    pytest.fail(f"{ENV_SCRIPT} failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-6000:]}")
  python = proc.stdout.strip().splitlines()[-1]
  assert os.access(python, os.X_OK), python
  return python


def run_gemma(python: str, *args: str) -> dict:
  """Runs one run_gemma.py subcommand; returns its JSON report."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("PYTHONPATH", None)  # nothing of this env may leak into that one
  proc = subprocess.run([python, str(RUN_GEMMA), *map(str, args)],
                        capture_output=True, text=True, timeout=900,
                        env=env, cwd=ROOT, check=False)
  assert proc.returncode == 0, (
      f"run_gemma.py {' '.join(map(str, args))} failed:\n"
      f"{proc.stderr[-6000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --- shared data ---------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Iterator[pathlib.Path]:
  path = tmp_path_factory.mktemp("gemma_library")
  yield path
  # About 4 GB of parameters and checkpoints; pytest would keep three runs.
  shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def real_numpy(real_model):
  """(config, {'/'-joined name: float32 numpy array}) of the real 270M."""
  config, params = real_model
  return config, {k: np.asarray(v, np.float32)
                  for k, v in flatten(params).items()}


@pytest.fixture(scope="module")
def params_npz(real_numpy, workdir) -> pathlib.Path:
  path = workdir / "params.npz"
  np.savez(path, **real_numpy[1])
  return path


@pytest.fixture(scope="module")
def tokens_npy(real_text_tokens, workdir) -> pathlib.Path:
  tokens, _ = real_text_tokens
  path = workdir / "tokens.npy"
  np.save(path, np.asarray(tokens, np.int32))
  return path


@pytest.fixture(scope="module")
def our_logits(real_model, real_text_tokens) -> np.ndarray:
  config, params = real_model
  tokens, mask = real_text_tokens
  out = models.forward(params, tokens, mask, config=config)
  return np.asarray(out.logits, np.float32)


@pytest.fixture(scope="module")
def gemma_logits(gemma_python, params_npz, tokens_npy, workdir) -> np.ndarray:
  out = workdir / "gemma_logits.npy"
  report = run_gemma(gemma_python, "logits", "--params", params_npz,
                     "--tokens", tokens_npy, "--out", out, "--size", "270m")
  assert report["model"] == "Gemma3_270M"
  assert report["params_dtypes"] == ["float32"]
  return np.load(out)


def _assert_tree_equal(got: dict, want: dict) -> None:
  got = flatten(got)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


# --- same weights, same logits -------------------------------------------------

def test_same_params_give_same_logits(our_logits, gemma_logits,
                                      real_text_tokens):
  _, mask = real_text_tokens
  valid = np.asarray(mask)
  assert gemma_logits.shape == our_logits.shape
  ours, theirs = our_logits[valid], gemma_logits[valid]
  diff = np.abs(ours - theirs).max()
  # Measured about 1e-4 on logits of magnitude ~30 (float32 on CPU).
  assert diff < 1e-3, diff
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


# --- checkpoints the library writes ------------------------------------------

@pytest.fixture(scope="module")
def gemma_checkpoints(gemma_python, params_npz, workdir) -> dict[str, dict]:
  """{layout: report} of checkpoints written by gm.ckpts.save_params.

  'nested' is float32, as a gemma user saves the params they have; 'flat'
  and 'stacked' are bfloat16 like the released checkpoints, rewritten into
  those layouts by the library's own converters. The library reads each
  back itself (--check) before we do.
  """
  report = run_gemma(
      gemma_python, "save", "--params", params_npz,
      "--out", workdir / "gm_nested", "--layout", "nested", "--check",
      "--also", f"flat:bfloat16:{workdir / 'gm_flat'}",
      "--also", f"stacked:bfloat16:{workdir / 'gm_stacked'}")
  reports = [report, *report.pop("also")]
  return {r["layout"]: r for r in reports}


def test_gemma_checkpoint_loads_exactly(gemma_checkpoints, real_numpy,
                                        real_model, real_text_tokens,
                                        our_logits):
  report = gemma_checkpoints["nested"]
  assert report["detected_by_gemma"] == "nested"
  config, params = load_orbax(report["out"])
  assert config == real_model[0]
  _assert_tree_equal(params, real_numpy[1])
  tokens, mask = real_text_tokens
  logits = models.forward(params, tokens, mask, config=config).logits
  np.testing.assert_array_equal(np.asarray(logits), our_logits)


@pytest.mark.parametrize("layout", ["flat", "stacked"])
def test_released_layouts_load(gemma_checkpoints, real_numpy, layout):
  report = gemma_checkpoints[layout]
  assert report["detected_by_gemma"] == layout
  assert all(k.startswith("transformer/") for k in report["top_level_keys"])
  want = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
          for k, v in real_numpy[1].items()}
  config, params = load_orbax(report["out"])
  assert config == models.Gemma3_270M
  _assert_tree_equal(params, want)
  _, stored = load_orbax(report["out"], config=models.Gemma3_270M, dtype=None)
  leaf = stored["layer_0"]["attn"]["q_einsum"]["w"]
  assert leaf.dtype == ml_dtypes.bfloat16


def test_our_checkpoint_loads_in_gemma(gemma_python, real_numpy, tokens_npy,
                                       gemma_logits, workdir):
  ckpt = save_orbax(unflatten(real_numpy[1]), workdir / "ours",
                    config=models.Gemma3_270M)
  out = workdir / "gemma_logits_from_ckpt.npy"
  run_gemma(gemma_python, "logits", "--ckpt", ckpt, "--tokens", tokens_npy,
            "--out", out)
  np.testing.assert_array_equal(np.load(out), gemma_logits)


# --- parameter counts ----------------------------------------------------------

def test_parameter_counts_match_library(gemma_python):
  report = run_gemma(gemma_python, "count", "--size", *SIZES)
  assert report["gemma_version"] == "3.3.0"
  assert report["270m"]["text_params"] == 268_098_176
  for size in SIZES:
    ours = models.count_params(models.abstract_params(models.get_config(size)))
    assert report[size]["text_params"] == ours, size
  # The multimodal sizes do have a vision tower; it is what was left out.
  assert all(report[s]["vision_params"] > 0 for s in ("4b", "12b", "27b"))


# --- bad input (no reference needed) ---------------------------------------------

@functools.cache
def _shapes_270m() -> dict[str, tuple[int, ...]]:
  return {k: v.shape for k, v in
          flatten(models.abstract_params(models.Gemma3_270M)).items()}


def _zeros_270m() -> dict:
  # All zeros: the checkpoint compresses to almost nothing.
  return {k: np.zeros(s, ml_dtypes.bfloat16)
          for k, s in _shapes_270m().items()}


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    load_orbax(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"not orbax")
  with pytest.raises(CheckpointError, match="not an Orbax checkpoint") as e:
    load_orbax(tmp_path)
  assert str(tmp_path) in str(e.value)
  with pytest.raises(CheckpointError, match="not a directory"):
    load_orbax(tmp_path / "model.safetensors")


def test_checkpoint_manager_root_is_explained(tmp_path):
  save_orbax(unflatten(_zeros_270m()), tmp_path / "1000")
  with pytest.raises(CheckpointError, match="holds checkpoints in 1000"):
    load_orbax(tmp_path)


def test_deleted_parameter_is_named(tmp_path):
  flat = _zeros_270m()
  del flat["layer_5/mlp/linear"]
  ckpt = save_orbax(unflatten(flat), tmp_path / "ckpt")
  with pytest.raises(CheckpointError, match="layer_5/mlp/linear: parameter "
                     "is missing") as e:
    load_orbax(ckpt)
  assert e.value.source == str(ckpt)
  assert e.value.item == "layer_5/mlp/linear"


def test_reshaped_parameter_is_named(tmp_path):
  flat = _zeros_270m()
  flat["layer_2/attn/_key_norm/scale"] = np.zeros(128, ml_dtypes.bfloat16)
  ckpt = save_orbax(unflatten(flat), tmp_path / "ckpt")
  with pytest.raises(CheckpointError, match=r"layer_2/attn/_key_norm/scale: "
                     r"shape \(128,\) does not fit gemma3_270m") as e:
    load_orbax(ckpt)
  assert e.value.source == str(ckpt)


def test_parameter_needed_for_the_size_is_named(tmp_path):
  flat = _zeros_270m()
  del flat["embedder/input_embedding"]
  ckpt = save_orbax(unflatten(flat), tmp_path / "ckpt")
  with pytest.raises(CheckpointError, match="embedder/input_embedding: "
                     "parameter is missing"):
    load_orbax(ckpt)


def test_wrong_size_for_given_config(tmp_path):
  ckpt = save_orbax(unflatten(_zeros_270m()), tmp_path / "ckpt")
  with pytest.raises(CheckpointError, match="gemma3_1b"):
    load_orbax(ckpt, config=models.Gemma3_1B)


def test_vision_tower_is_ignored(tmp_path):
  flat = _zeros_270m()
  flat["vision_encoder/siglip_encoder/embedding/kernel"] = np.ones(
      (14, 14, 3, 8), np.float32)
  flat["embedder/mm_input_projection/w"] = np.ones((8, 640), np.float32)
  flat["embedder/mm_soft_embedding_norm/scale"] = np.ones(8, np.float32)
  ckpt = save_orbax(unflatten(flat), tmp_path / "ckpt")
  config, params = load_orbax(ckpt)
  assert config == models.Gemma3_270M
  assert "vision_encoder" not in params
  assert set(params["embedder"]) == {"input_embedding"}


def test_flat_layout_with_vision_tower(tmp_path):
  # The flat layout as released: '/'-joined module names with the leaf
  # underneath, the MLP under an extra 'w', SigLIP beside the transformer.
  tree = {}
  for key, value in _zeros_270m().items():
    module, leaf = key.rsplit("/", 1)
    if key.endswith(("mlp/linear", "mlp/gating_einsum")):
      module, leaf = key, "w"
    tree.setdefault(f"transformer/{module}", {})[leaf] = value
  tree["transformer/embedder"]["mm_input_projection"] = {
      "w": np.ones((8, 640), np.float32)}
  tree["SigLiPFromPatches_0/siglip_encoder/embedding"] = {
      "kernel": np.ones((14, 14, 3, 8), np.float32)}
  ckpt = tmp_path / "ckpt"
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.StandardCheckpointer() as writer:
    writer.save(ckpt, jax.tree.map(np.asarray, tree))
  config, params = load_orbax(ckpt)
  assert config == models.Gemma3_270M
  _assert_tree_equal(params, {k: v.astype(np.float32)
                              for k, v in _zeros_270m().items()})


def test_save_is_atomic(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  tree = {"a": {"b": np.arange(4, dtype=np.float32)}}
  target = tmp_path / "ckpt"

  def interrupted(self, directory, state, **kwargs):
    del self, state, kwargs
    pathlib.Path(directory).mkdir(parents=True)
    (pathlib.Path(directory) / "_METADATA").write_text("{")  # half written
    raise KeyboardInterrupt

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", interrupted)
  with pytest.raises(KeyboardInterrupt):
    save_orbax(tree, target)
  assert sorted(os.listdir(tmp_path)) == []
  monkeypatch.undo()

  save_orbax(tree, target)
  with pytest.raises(FileExistsError):
    save_orbax(tree, target)
  tree["a"]["b"] = tree["a"]["b"] + 1
  save_orbax(tree, target, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
  as_numpy = {"a": {"b": ocp.RestoreArgs(restore_type=np.ndarray)}}
  restored = ocp.PyTreeCheckpointer().restore(
      target, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  np.testing.assert_array_equal(np.asarray(restored["a"]["b"]),
                                np.arange(4) + 1)

