"""Group training (training/group.py): several SAEs from one Gemma pass on
the real Gemma 3 270M equal single-dictionary runs on the same stream, resume
exactly, export per hookpoint, evaluate per hookpoint, and bad group configs
fail at start naming the field."""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from gemscope_jax.training import config as config_lib
from gemscope_jax.training import export, group, plans
from gemscope_jax.training import trainer

from test_training import run_cli, tiny_config

pytestmark = pytest.mark.slow

LAYERS = (1, 2, 3)
# lr 1e-4 rather than the TINY 1e-3: a vmapped step differs from the single
# step by an ulp, and Adam with beta1 = 0 turns such differences on
# near-zero gradient coordinates into +-lr steps that the JumpReLU dynamics
# at lr 1e-3 amplify (test_training notes the same for meshes). At 1e-4 the
# runs agree to fp tolerance.
GROUP = ["group.layers='1-3'", "train.lr=1e-4"]


def member_export(workdir, layer: int) -> dict[str, np.ndarray]:
  return load_file(str(pathlib.Path(workdir) / "export" / "resid_post"
                       / f"layer_{layer}" / "params.safetensors"))


@pytest.fixture(scope="module")
def group_run(tmp_path_factory):
  """One uninterrupted group run through the CLI (`gemscope train`)."""
  workdir = tmp_path_factory.mktemp("group")
  run_cli(workdir, GROUP)
  return workdir


def test_config_syntax_expands_hookpoints():
  mc = config_lib.check(tiny_config())
  want = {"all": list(range(18)), "0-2": [0, 1, 2], "6+2+9": [2, 6, 9],
          7: [7], (9, 3): [3, 9]}
  for spec, layers in want.items():
    c = tiny_config()
    c.group.layers = spec
    assert config_lib.hookpoints(c, mc) == [
        f"layer_{l}/resid_post" for l in layers]
  c = tiny_config("sites=('resid_post','attn_out')")
  assert config_lib.hookpoints(c, mc) == ["layer_1/attn_out",
                                          "layer_1/resid_post"]
  assert config_lib.hookpoints(tiny_config(), mc) == ["layer_1/resid_post"]
  assert not config_lib.is_group(tiny_config())


def test_group_equals_single_runs(group_run, tmp_path):
  """Each member's export equals a single-dictionary run at its layer on
  the same activation stream with the same seed."""
  rows = [json.loads(l) for l in
          (group_run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(4, 25, 4))
  for r in rows:
    per = [r[f"layer_{l}/resid_post/l0"] for l in LAYERS]
    assert r["l0"] == pytest.approx(np.mean(per))
  for layer in LAYERS:
    c = tiny_config(f"layer={layer},train.lr=1e-4")
    trainer.train(c, tmp_path / str(layer), progress=False)
    single = load_file(str(tmp_path / str(layer) / "export"
                           / "params.safetensors"))
    got = member_export(group_run, layer)
    assert set(got) == set(single)
    # A threshold learns only through the pairs inside its narrow
    # straight-through window: an ulp of difference in one pre-activation
    # (the group's vmapped step and its deeper harvest run their reductions
    # in another order) can move a pair in or out and give that latent a
    # different Adam step, after which a few dictionary entries drift a
    # little (measured: one threshold of 256 at 1e-3, 0.04 % of w_dec at
    # 1e-5 absolute). So 99.5 % of every array must agree to fp tolerance
    # and all of it loosely; a wrong gradient moves far more than that.
    for k in single:
      scale = float(np.abs(single[k]).max())
      close = np.isclose(got[k], single[k], rtol=1e-4, atol=1e-5 * scale)
      assert close.mean() >= 0.995, f"layer {layer}: {k} {close.mean()}"
      np.testing.assert_allclose(got[k], single[k], rtol=1e-2,
                                 atol=1e-3 * scale,
                                 err_msg=f"layer {layer}: {k}")
    meta = json.loads((group_run / "export" / "resid_post" / f"layer_{layer}"
                       / "config.json").read_text())
    assert meta["hf_hook_point_in"] == f"model.layers.{layer}.output"
    srows = [json.loads(l) for l in (tmp_path / str(layer) / "metrics.jsonl"
                                     ).read_text().splitlines()]
    np.testing.assert_allclose(
        [r[f"layer_{layer}/resid_post/loss"] for r in rows],
        [r["loss"] for r in srows], rtol=5e-4)  # the drift above


def test_resume_equals_uninterrupted(group_run, tmp_path):
  shutil.copytree(group_run / "checkpoints", tmp_path / "checkpoints")
  shutil.rmtree(tmp_path / "checkpoints" / "24")
  proc = run_cli(tmp_path, GROUP)
  assert "resuming from step 16" in proc.stdout
  for layer in LAYERS:
    ref, got = member_export(group_run, layer), member_export(tmp_path, layer)
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{layer} {k}")
  # A changed member list refuses to resume.
  proc = run_cli(tmp_path, ["group.layers='1-4'", "train.lr=1e-4"],
                 check=False)
  assert proc.returncode == 2 and "config.group.layers" in proc.stderr


def test_group_evaluation_per_hookpoint(group_run):
  metrics = trainer.evaluate_workdir(
      group_run, progress=False,
      overrides={"eval.num_tokens": 1024, "eval.loss_tokens": 256,
                 "eval.seq_len": 64})
  saved = json.loads((group_run / "metrics.json").read_text())
  for layer in LAYERS:
    h = f"layer_{layer}/resid_post"
    for k in ("l0", "fvu", "delta_lm_loss", "loss_recovered",
              "dead_fraction"):
      assert math.isfinite(metrics[f"{h}/{k}"]), (h, k)
      assert saved[f"{h}/{k}"] == pytest.approx(metrics[f"{h}/{k}"])
    assert metrics[f"{h}/delta_lm_loss"] > 0
  assert metrics["l0"] == pytest.approx(
      np.mean([metrics[f"layer_{l}/resid_post/l0"] for l in LAYERS]))
  assert (group_run / "export" / "resid_post" / "layer_2"
          / "latent_frequency.png").exists()


def test_bad_group_configs_name_the_field(tmp_path):
  cases = {
      "layers=40": "config.group.layers",
      "layers='3-1'": "config.group.layers",
      "layers='some'": "config.group.layers",
      "layers=(1,'a')": "config.group.layers",
      "sites=resid_postt": "config.group.sites",
      "sites='mlp_in->mlp_out'": "config.group.sites",
      "layers=all,target_l0=5000": "config.dictionary.target_l0",
  }
  for override, expected in cases.items():
    with pytest.raises((ValueError, FileNotFoundError)) as e:
      c = tiny_config(override)
      trainer.train(c, tmp_path / "never", progress=False)
    assert expected in str(e.value), (override, str(e.value))
  assert not (tmp_path / "never").exists()


def test_member_plans_are_single_run_plans():
  """Each member of a group plan is the dictionary plan a single run at its
  hookpoint has (SAEs and transcoders); reading the group leaves c as it
  was."""
  c = tiny_config("layers=all")
  before = config_lib.to_json(c)
  plan = plans.make(c)
  assert plan.group and len(plan.dictionaries) == 18
  single = tiny_config("layer=5")
  assert not config_lib.is_group(single)
  assert plan.dictionaries[5] == plans.make(single).dictionaries[0]
  assert plan.dictionaries[5].layout.inputs == ("layer_5/resid_post",)
  assert config_lib.to_json(c) == before and config_lib.is_group(c)
  tc = tiny_config("arch=jumprelu_transcoder,layers=all,site=mlp_in")
  single = tiny_config("arch=jumprelu_transcoder,layer=5,site=mlp_in")
  assert (plans.make(tc).dictionaries[5]
          == plans.make(single).dictionaries[0])
  assert plans.make(tc).dictionaries[5].layout.targets == (
      "layer_5/mlp_out",)


def test_stack_shardings_keep_latents_on_model_axis():
  c = tiny_config("layers=1-3")
  run = group.GroupRun(plans.make(c))
  assert list(run.stacks) == ["d_in_640"]
  stack = run.stacks["d_in_640"]
  assert stack.names == [f"layer_{l}/resid_post" for l in LAYERS]
  spec = lambda a: tuple(a.sharding.spec)
  p = stack.abstract_state.params
  assert p["w_enc"].shape == (3, 640, 256)
  assert spec(p["w_enc"]) == (None, None, "model")
  assert spec(p["w_dec"]) == (None, "model", None)
  assert spec(stack.abstract_state.last_fired) == (None, "model")
  assert stack.abstract_state.norm_scale.shape == (3,)


def test_member_exports_load_and_workdir_export_points_to_them(group_run):
  """Each member's export is a Gemma Scope 2 folder that loads; exporting
  the group workdir as one dictionary is refused with the way out named."""
  from gemscope_jax import interop
  d = interop.load_gemmascope2(group_run / "export" / "resid_post" / "layer_2")
  np.testing.assert_array_equal(d.w_enc, member_export(group_run, 2)["w_enc"])
  assert d.hookpoint == "layer_2/resid_post"
  with pytest.raises(ValueError, match=r"a group run .*layer_1/resid_post.*"
                     r"--dictionary"):
    export.from_workdir(group_run)
