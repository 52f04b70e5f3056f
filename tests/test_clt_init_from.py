"""A CLT started from trained single-layer transcoders
(`dictionary.init_from`, `training/init_from.py`).

Tiny transcoders made here (one trained a few steps by the trainer's own
step and exported, others written directly with uneven decoder norms and
real thresholds); no Gemma forward. At step 0 the CLT predicts each layer's
mlp_out from its own mlp_in exactly as its transcoder does, in raw units,
with the CLT's scales unlike the transcoders'; a Matryoshka prefix takes
the first latents only; a planted near-duplicate is dropped and its slot
refilled; bad sources name the field and the file.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax import errors, interop
from gemscope_jax.training import config as config_lib
from gemscope_jax.training import export, init_from, trainer
from gemscope_jax.training.step import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
D = 640  # Gemma 3 270M's width: the layouts come from its config
ARG = ("runlocal,checkpoint=random,batch=64,tokens=640,eval.at_end=False,"
       "dictionary.target_l0=16")


def _bucket(rng, layers, scales, n=512):
  """Synthetic activations: each hookpoint at its own scale and offset."""
  out = {}
  for layer, (s_in, s_out) in zip(layers, scales):
    out[f"layer_{layer}/mlp_in"] = (rng.normal(size=(n, D)) * s_in
                                    ).astype(np.float32)
    out[f"layer_{layer}/mlp_out"] = (rng.normal(size=(n, D)) * s_out + 0.3
                                     ).astype(np.float32)
  return out


def _trained_transcoder(workdir: pathlib.Path, layer: int, width: int):
  """A JumpReLU transcoder trained 4 steps by `Run.step` and exported to
  workdir/export, and (run, state) to compute its own forward."""
  c = config_lib.load(f"{ROOT}/experiments/transcoder_270m.py:{ARG},"
                      f"layer={layer},width={width},train.lr=1e-2,"
                      "train.lr_warmup_steps=1")
  run = Run.from_config(c, devices=jax.devices()[:1])
  rng = np.random.default_rng(layer)
  state = run.initial_state(_bucket(rng, [layer], [(4.0, 0.5)]))
  for _ in range(4):
    state, _ = run.step(state, run.batch(_bucket(rng, [layer], [(4.0, 0.5)],
                                                 n=64)))
  state = jax.device_get(state)
  export.export(run, state, workdir)
  return run, state


def _written_transcoder(folder: pathlib.Path, layer: int, width: int, rng,
                        duplicate_of: dict[int, int] | None = None,
                        **changes) -> interop.InferenceDictionary:
  """A raw-unit JumpReLU transcoder with thresholds that matter (about a
  third of latents fire on N(0, 4^2) inputs) and decoder rows of norms 0.5
  to 2; `duplicate_of` {j: i} makes latent j a near-copy of latent i."""
  w_enc = rng.normal(size=(D, width)) / np.sqrt(D * 16)
  w_dec = (rng.normal(size=(width, D)) / np.sqrt(D)
           * rng.uniform(0.5, 2.0, (width, 1)))
  for j, i in (duplicate_of or {}).items():
    w_enc[:, j] = w_enc[:, i] * 1.1 + rng.normal(size=D) * 1e-4
    w_dec[j] = w_dec[i] * 0.9 + rng.normal(size=D) * 1e-4
  fields = dict(w_enc=w_enc, w_dec=w_dec,
                b_enc=rng.normal(size=width) * 0.3,
                b_dec=rng.normal(size=D) * 0.2,
                threshold=rng.uniform(0.0, 1.0, width),
                architecture="jumprelu", hookpoint=f"layer_{layer}/mlp_in",
                hookpoint_out=f"layer_{layer}/mlp_out",
                model_name="google/gemma-3-270m")
  fields.update(changes)
  d = interop.InferenceDictionary(**fields)
  interop.save_gemmascope2(d, folder, release_layout=False)
  return d


def _clt_run(init, width: int, extra: str = "") -> Run:
  c = config_lib.load(f"{ROOT}/experiments/clt_270m.py:{ARG},"
                      f"clt_layers='1-2',width={width},dictionary.k=16"
                      f"{extra}")
  c.dictionary.init_from = init
  return Run.from_config(c, devices=jax.devices()[:1])


def _started(run: Run, seed: int = 9):
  """(fresh state, state started from the transcoders, report); the CLT's
  scales (from its own bucket) differ from every transcoder's."""
  rng = np.random.default_rng(seed)
  fresh = run.initial_state(_bucket(rng, [1, 2], [(3.0, 0.8), (6.0, 0.2)]))
  fresh = jax.device_get(fresh)
  state, report = init_from.apply(run, fresh, init_from.load(run.dictionary))
  return fresh, jax.device_get(state), report


def _clt_predict(run: Run, state, x_raw):
  s_in = np.asarray(state.norm_scale)[:, None]
  s_out = np.asarray(state.target_scale)[:, None]
  out = run.module.apply({"params": state.params}, jnp.asarray(x_raw / s_in))
  return np.asarray(out.recon) * s_out


def _own_forward(run: Run, state, x_raw):
  """A trained transcoder's module on its own training units, rescaled."""
  out = run.module.apply({"params": state.params},
                         jnp.asarray(x_raw / np.asarray(state.norm_scale)))
  return np.asarray(out.recon) * np.asarray(state.target_scale)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Layer 1: a trained transcoder's workdir (32 latents); layer 2: a
  written one of 48 latents, and a copy with planted duplicates."""
  root = tmp_path_factory.mktemp("transcoders")
  tc_run, tc_state = _trained_transcoder(root / "tc_1", 1, 32)
  rng = np.random.default_rng(5)
  written = _written_transcoder(root / "tc_2", 2, 48, rng)
  dup = _written_transcoder(root / "tc_2_dup", 2, 48,
                            np.random.default_rng(6),
                            duplicate_of={20: 5, 27: 20})
  return root, tc_run, tc_state, written, dup


def test_clt_predicts_what_its_transcoders_predict_at_step_0(sources):
  """Prefix 32: all of layer 1's transcoder, the first 32 of layer 2's;
  the CLT (32 latents a layer) predicts, in raw units, each layer's
  mlp_out as the transcoder (layer 2: its first 32 latents) does."""
  root, tc_run, tc_state, written, _ = sources
  run = _clt_run((str(root / "tc_1"), str(root / "tc_2")), 32,
                 ",dictionary.init_prefix=32")
  fresh, state, report = _started(run)
  assert [(r["layer"], r["taken"], r["duplicates"], r["kept"], r["fresh"])
          for r in report] == [(1, 32, 0, 32, 0), (2, 32, 0, 32, 0)]
  # The CLT's own scales, not the transcoders': the conversion is tested.
  assert not np.allclose(state.norm_scale, [tc_state.norm_scale] * 2,
                         rtol=0.1)
  np.testing.assert_array_equal(state.norm_scale, fresh.norm_scale)

  rng = np.random.default_rng(0)
  x = np.stack([rng.normal(size=(128, D)) * 4.0,
                rng.normal(size=(128, D)) * 4.0], axis=1).astype(np.float32)
  got = _clt_predict(run, state, x)
  want_1 = _own_forward(tc_run, tc_state, x[:, 0])
  prefix_2 = written.replace(w_dec=np.concatenate(
      [written.w_dec[:32], np.zeros_like(written.w_dec[32:])]))
  want_2 = np.asarray(prefix_2(x[:, 1]))
  fired = np.asarray(written.encode(x[:, 1]))[:, :32] > 0
  assert 0.1 < fired.mean() < 0.9  # thresholds decide which latents fire
  for layer, want in ((0, want_1), (1, want_2)):
    np.testing.assert_allclose(got[:, layer], want, rtol=1e-4,
                               atol=2e-5 * np.abs(want).max(),
                               err_msg=f"layer {layer + 1}")
  # Latents write only their own layer; decoder rows are unit norm.
  w_dec = np.asarray(state.params["w_dec"])
  assert np.all(w_dec[0, :, 1] == 0)
  np.testing.assert_allclose(np.linalg.norm(w_dec.reshape(2, 32, -1),
                                            axis=-1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(state.params["threshold"]) >= 0)


def test_a_planted_duplicate_is_dropped_and_its_slot_refilled(sources):
  root, _, _, _, dup = sources
  run = _clt_run((str(root / "tc_1"), str(root / "tc_2_dup")), 40,
                 ",dictionary.init_prefix=32")
  fresh, state, report = _started(run)
  # 20 copies 5: dropped. 27 copies 20, itself dropped, but so is 27 a
  # copy of 5, which is kept: dropped too.
  assert report[1]["dropped_ids"] == [20, 27]
  assert (report[1]["kept"], report[1]["fresh"]) == (30, 10)
  assert (report[0]["duplicates"], report[0]["kept"]) == (0, 32)
  w_enc = np.asarray(state.params["w_enc"])[1]
  kept = [i for i in range(32) if i not in (20, 27)]
  cos = [np.dot(w_enc[:, slot], dup.w_enc[:, i])
         / np.linalg.norm(w_enc[:, slot]) / np.linalg.norm(dup.w_enc[:, i])
         for slot, i in enumerate(kept)]
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
  # Slots past the kept latents keep the CLT's own init.
  for k in ("w_enc", "b_enc", "threshold"):
    np.testing.assert_array_equal(np.asarray(state.params[k])[1, ..., 30:],
                                  np.asarray(fresh.params[k])[1, ..., 30:],
                                  err_msg=k)
  np.testing.assert_array_equal(np.asarray(state.params["w_dec"])[1, 30:],
                                np.asarray(fresh.params["w_dec"])[1, 30:])


def test_duplicates_are_greedy_against_kept_latents():
  """b (15 degrees from a) duplicates a and is dropped; c (15 from b, 30
  from a) is near only b, which was dropped: c stays."""
  angles = np.radians([0.0, 15.0, 30.0, 90.0])
  rows = np.stack([np.cos(angles), np.sin(angles), np.zeros(4)], axis=1)
  dropped = init_from.duplicates(rows.T, rows, 0.95, block=2)
  assert dropped.tolist() == [False, True, False, False]
  # The encoder must agree as well: a different encoder keeps b.
  enc = rows.copy()
  enc[1] = [0.0, 0.0, 1.0]
  assert not init_from.duplicates(enc.T, rows, 0.95).any()
  assert not init_from.duplicates(rows.T, rows, 1.0).any()


def test_sources_by_pattern_and_by_group_root(sources, tmp_path):
  root = sources[0]
  group = tmp_path / "tc_all" / "export" / "transcoder"
  shutil.copytree(root / "tc_1" / "export", group / "layer_1")
  shutil.copytree(root / "tc_2", group / "layer_2")
  by_root = _clt_run(str(tmp_path / "tc_all"), 48)
  assert by_root.dictionary.init_from == (str(tmp_path / "tc_all"),) * 2
  by_pattern = _clt_run(str(root / "tc_{layer}"), 48)
  assert by_pattern.dictionary.init_from == (str(root / "tc_1"),
                                             str(root / "tc_2"))
  a = init_from.load(by_root.dictionary)
  b = init_from.load(by_pattern.dictionary)
  assert [t.d_sae for t in a] == [32, 48]
  for s, t in zip(a, b):
    np.testing.assert_array_equal(s.w_dec, t.w_dec)


def test_bad_sources_name_the_field_and_the_file(sources, tmp_path):
  root = sources[0]
  tc_1, tc_2 = str(root / "tc_1"), str(root / "tc_2")

  def refused(init, match, extra="", width=48, error=errors.InputError):
    run = _clt_run(init, width, extra)
    with pytest.raises(error, match=match):
      init_from.load(run.dictionary)

  refused((tc_1, str(tmp_path / "nope")), r"config\.dictionary\.init_from\[1]"
          r" \(CLT layer 2\): .*nope", error=errors.MissingInputError)
  refused((tc_2, tc_1), r"init_from\[0] \(CLT layer 1\): .*tc_2/params\."
          r"safetensors: reads layer_2/mlp_in, but CLT layer 1 reads "
          r"layer_1/mlp_in")
  narrow = _written_transcoder(tmp_path / "narrow", 2, 16,
                               np.random.default_rng(1),
                               w_enc=np.ones((320, 16)),
                               w_dec=np.ones((16, 320)),
                               b_dec=np.zeros(320))
  assert narrow.d_in == 320
  refused((tc_1, str(tmp_path / "narrow")), r"init_from\[1] .*narrow/params"
          r"\.safetensors: w_enc has shape \(320, 16\)")
  _written_transcoder(tmp_path / "skip", 2, 16, np.random.default_rng(1),
                      affine_skip=np.zeros((D, D)))
  refused((tc_1, str(tmp_path / "skip")), r"init_from\[1] .*affine skip")
  refused((tc_1, tc_2), r"config\.dictionary\.init_prefix: 40 latents, but "
          r".*tc_1/export/params\.safetensors .* has 32",
          extra=",dictionary.init_prefix=40")
  refused((tc_1, tc_2), r"config\.dictionary\.init_prefix: .*tc_2.* has 48 "
          r"latents, more than dictionary\.width=32", width=32,
          error=ValueError)


@pytest.mark.parametrize("experiment, extra, init, field", [
    ("clt_270m.py", "clt_layers='1-3'", ("a", "b"),
     r"config\.dictionary\.init_from: 2 path\(s\) for the CLT's 3 layers"),
    ("clt_270m.py", "clt_layers='1-2'", 7, r"config\.dictionary\.init_from"),
    ("transcoder_270m.py", "layer=1", "a",
     r"config\.dictionary\.init_from: .*jumprelu_clt"),
    ("clt_270m.py", "topk,clt_layers='1-2'", ("a", "b"),
     r"config\.dictionary\.init_from: .*jumprelu_clt"),
    ("clt_270m.py", "clt_layers='1-2',width=64,dictionary.init_prefix=65",
     ("a", "b"), r"config\.dictionary\.init_prefix: must be None"),
    ("clt_270m.py", "clt_layers='1-2',dictionary.init_prefix=8", None,
     r"config\.dictionary\.init_prefix: needs dictionary\.init_from"),
    ("clt_270m.py", "clt_layers='1-2',dictionary.init_dedup_cosine=0.0",
     ("a", "b"), r"config\.dictionary\.init_dedup_cosine"),
])
def test_bad_configs_name_the_field(experiment, extra, init, field):
  c = config_lib.load(f"{ROOT}/experiments/{experiment}:runlocal,"
                      f"checkpoint=random,{extra}")
  c.dictionary.init_from = init
  with pytest.raises(ValueError, match=field):
    config_lib.check(c)


# --- Through `trainer.train` (random Gemma weights: the harvest runs). ---

TRAIN = ("runlocal,checkpoint=random,clt_layers='1-2',width=32,"
         "dictionary.k=16,dictionary.target_l0=16,batch=64,"
         "data.bucket_tokens=64,data.seq_len=16,data.model_batch_size=4,"
         "eval.at_end=False,train.checkpoint_every_steps=1")


def _train_config(tokens: int, init):
  c = config_lib.load(f"{ROOT}/experiments/clt_270m.py:{TRAIN},"
                      f"tokens={tokens}")
  c.dictionary.init_from = init
  return c


def test_trainer_refuses_a_bad_source_before_loading_gemma(tmp_path,
                                                           monkeypatch):
  def no_gemma(*args, **kwargs):
    raise AssertionError("Gemma loaded before the sources were checked")
  monkeypatch.setattr(trainer.sources, "load_gemma", no_gemma)
  c = _train_config(128, (str(tmp_path / "nope_1"), str(tmp_path / "nope_2")))
  with pytest.raises(errors.MissingInputError,
                     match=r"init_from\[0\] \(CLT layer 1\): .*nope_1"):
    trainer.train(c, tmp_path / "clt", progress=False)


@pytest.mark.slow
def test_trainer_starts_from_transcoders_and_resumes_without_them(tmp_path):
  """A run started from two transcoders writes init_from.json; resumed
  after the transcoders are gone, it does not read them again."""
  rng = np.random.default_rng(2)
  for layer in (1, 2):
    _written_transcoder(tmp_path / "src" / f"tc_{layer}", layer, 32, rng)
  init = str(tmp_path / "src" / "tc_{layer}")
  trainer.train(_train_config(128, init), tmp_path / "clt", progress=False)
  report = json.loads((tmp_path / "clt" / "init_from.json").read_text())
  assert [(r["layer"], r["taken"], r["kept"], r["fresh"], r["source"])
          for r in report] == [
              (layer, 32, 32, 0, str(tmp_path / "src" / f"tc_{layer}"))
              for layer in (1, 2)]
  shutil.rmtree(tmp_path / "src")
  m = trainer.train(_train_config(192, init), tmp_path / "clt",
                    progress=False)
  assert m["step"] == 3
