"""The training loop end to end on the real Gemma 3 270M (early layer, small
dictionary): resume after SIGKILL, a corrupt newest checkpoint, a diverging
run, the data stream's position, the export, and 1 vs 8 devices."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from gemscope_jax import dictionaries
from gemscope_jax.training import checkpoints as ckpt_lib
from gemscope_jax.training import config as config_lib
from gemscope_jax.training import optim, plans, sources, trainer
from gemscope_jax.training.step import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
GEMSCOPE = [sys.executable, "-m", "gemscope_jax.cli"]

# A run of 24 steps of 256 layer-1 activations: seconds on a CPU.
TINY = ("runlocal,layer=1,width=256,tokens=6144,batch=256,"
        "data.bucket_tokens=2048,data.seq_len=64,"
        "train.checkpoint_every_steps=8,train.log_every_steps=4,"
        "train.sparsity_warmup_steps=8,train.lr_warmup_steps=4")

pytestmark = pytest.mark.slow


def tiny_config(extra: str = "") -> config_lib.ml_collections.ConfigDict:
  c = config_lib.load(f"{ROOT}/experiments/jumprelu_270m.py:{TINY}")
  c = config_lib.apply_overrides(c, config_lib.parse_arg(extra))
  c.eval.at_end = False
  return c


def run_cli(workdir, extra_sets=(), *, env=None, check=True, **kwargs):
  cmd = GEMSCOPE + ["train", f"--config=experiments/jumprelu_270m.py:{TINY}",
                    f"--workdir={workdir}", "--no-eval", "--quiet"]
  cmd += [f"--set={s}" for s in extra_sets]
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  if kwargs.pop("background", False):
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True,
                        text=True, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def exported(workdir) -> dict[str, np.ndarray]:
  return load_file(str(pathlib.Path(workdir) / "export" / "params.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted CLI run; other tests compare against its export."""
  workdir = tmp_path_factory.mktemp("reference")
  run_cli(workdir)
  return workdir


def test_uninterrupted_run_learns_and_logs(reference_run):
  rows = [json.loads(l) for l in
          (reference_run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(4, 25, 4))
  # The loss falls and L0 comes down from its dense start towards L0*=60.
  assert rows[-1]["mse"] < rows[0]["mse"]
  assert rows[-1]["l0"] < rows[0]["l0"]
  assert all(np.isfinite(r["loss"]) for r in rows)
  steps = sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [16, 24]  # every 8 steps, keep 2


def test_sigkill_then_resume_matches_uninterrupted(reference_run, tmp_path):
  rng = np.random.default_rng()
  proc = run_cli(tmp_path, background=True)
  ckpt = tmp_path / "checkpoints" / "8"
  deadline = time.time() + 300
  while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  # An arbitrary moment after the first checkpoint, possibly mid-save.
  time.sleep(rng.uniform(0.0, 1.0))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
  resumed = run_cli(tmp_path)
  assert "resuming from step" in resumed.stdout
  ref, got = exported(reference_run), exported(tmp_path)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_corrupt_newest_checkpoint_falls_back(reference_run, tmp_path):
  import shutil
  shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
  newest = tmp_path / "checkpoints" / "24"
  files = sorted(p for p in (newest / "state").rglob("*") if p.is_file()
                 and p.stat().st_size > 1000)
  assert files, "no array data in the checkpoint"
  for f in files:
    f.write_bytes(f.read_bytes()[:100])  # truncated, as by a full disk
  proc = run_cli(tmp_path)
  assert "unreadable" in proc.stdout and "24" in proc.stdout
  assert "resuming from step 16" in proc.stdout
  # One line about the damaged checkpoint, not the libraries' tracebacks.
  said = [l for l in (proc.stdout + proc.stderr).splitlines()
          if "24" in l and "unreadable" in l]
  assert len(said) == 1, said
  assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
  assert any((tmp_path / "corrupt").iterdir())  # kept, not deleted
  ref, got = exported(reference_run), exported(tmp_path)
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_divergence_stops_with_last_good_checkpoint(tmp_path):
  c = tiny_config("train.lr=1e30,train.lr_warmup_steps=0,"
                  "train.checkpoint_every_steps=1,train.log_every_steps=1")
  with pytest.raises(trainer.TrainingDiverged, match="last good checkpoint"):
    trainer.train(c, tmp_path, progress=False)
  ckpts = ckpt_lib.Checkpoints(tmp_path)
  last = ckpts.latest_step()
  assert last is not None and last >= 1
  run = Run.from_config(c)
  step, state, _, _ = ckpts.restore_latest(run.abstract_state)
  assert step == last
  assert all(np.isfinite(np.asarray(v)).all()
             for v in jax.tree.leaves(state.params))


def test_changed_config_refuses_to_resume(reference_run, tmp_path):
  import shutil
  shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
  proc = run_cli(tmp_path, ["dictionary.width=512"], check=False)
  assert proc.returncode == 2
  assert "config.dictionary.width" in proc.stderr


def test_export_reproduces_training_reconstruction(reference_run):
  """The folded Gemma Scope 2 arrays on raw activations equal the trained
  module on normalised ones (times the scale)."""
  c = tiny_config()
  run = Run.from_config(c)
  ckpts = ckpt_lib.Checkpoints(reference_run)
  _, state, _, _ = ckpts.restore_latest(run.abstract_state)
  x = np.random.default_rng(0).normal(size=(64, run.dict_config.d_in)) * 5
  x = x.astype(np.float32)
  s = float(state.norm_scale)
  out = run.module.apply({"params": state.params}, x / s)
  ex = exported(reference_run)
  pre = x @ ex["w_enc"] + ex["b_enc"]
  f = np.maximum(pre, 0) * (pre > ex["threshold"])
  np.testing.assert_allclose(f @ ex["w_dec"] + ex["b_dec"],
                             np.asarray(out.recon) * s, rtol=1e-4, atol=1e-3)
  meta = json.loads((reference_run / "export" / "config.json").read_text())
  assert meta["architecture"] == "jump_relu"
  assert meta["hf_hook_point_in"] == "model.layers.1.output"


def _batch_maker(c, real_model):
  """A function making a new `ActivationBatches` over config `c`'s
  source (live Gemma, or its activation cache) at each call."""
  from gemscope_jax.data import stream
  from gemscope_jax.text.tokenizer import default_tokenizer
  _, params = real_model
  run = Run.from_config(c)
  tok = default_tokenizer()
  return lambda: stream.ActivationBatches(
      sources.make_source(run.plan, run.mesh, params, tok, progress=False,
                          hookpoints=run.harvest),
      batch_size=c.train.batch_size, seed=c.seed)


def test_stream_position_restores_exactly(real_model):
  """ActivationBatches resumed from a saved position yields the same
  batches as the original stream, including across a bucket boundary."""
  make = _batch_maker(tiny_config(), real_model)

  a = make()
  first = [next(a)["layer_1/resid_post"] for _ in range(5)]
  state = json.loads(json.dumps(a.get_state()))
  rest = [next(a)["layer_1/resid_post"] for _ in range(10)]
  b = make()
  b.set_state(state)
  again = [next(b)["layer_1/resid_post"] for _ in range(10)]
  for x, y in zip(rest, again):
    np.testing.assert_array_equal(x, y)
  # Buckets are shuffled: consecutive rows are not consecutive tokens, and
  # every activation is an ordinary token's (no BOS outlier norms).
  norms = np.linalg.norm(np.concatenate(first + rest), axis=-1)
  assert norms.max() < 20 * np.median(norms)


def test_cache_tokens_reads_the_cache_in_epochs(real_model, tmp_path):
  """data.cache_tokens=N harvests N rows once; a run reading 3N then reads
  every cached row exactly three times (a reshuffled order each epoch),
  and a second source over the same folder harvests nothing new."""
  from gemscope_jax.data import activation_cache
  rows = 2048
  c = tiny_config(f"data.cache_dir={tmp_path / 'cache'},"
                  f"data.cache_tokens={rows}")
  make = _batch_maker(c, real_model)
  hook = "layer_1/resid_post"

  a = make()
  cache = activation_cache.ActivationCache(tmp_path / "cache")
  assert cache.num_tokens == rows
  cached = np.concatenate([cache.shard(i)[hook] for i in
                           range(cache.num_shards)])
  steps = c.train.num_tokens // c.train.batch_size
  assert steps * c.train.batch_size == 3 * rows
  seen = np.concatenate([np.asarray(next(a)[hook]) for _ in range(steps)])
  # Each epoch is a permutation of the cache's rows; the epochs' orders
  # differ.
  key = lambda x: np.lexsort(x.T[::-1])
  epochs = seen.reshape(3, rows, -1)
  for e in epochs:
    np.testing.assert_array_equal(e[key(e)], cached[key(cached)])
  assert not np.array_equal(epochs[0], epochs[1])
  def mtimes():
    return [f.stat().st_mtime_ns
            for f in sorted((tmp_path / "cache").iterdir())]
  before = mtimes()
  make()
  assert mtimes() == before
  # Another size over the same folder is refused by its config name.
  other = tiny_config(f"data.cache_dir={tmp_path / 'cache'},"
                      f"data.cache_tokens={2 * rows}")
  with pytest.raises(ValueError, match=r"data\.cache_tokens differs.*"
                     f"has {rows} rows, asked for {2 * rows}"):
    _batch_maker(other, real_model)()
  assert mtimes() == before


def test_eight_devices_match_one(tmp_path):
  """Data-parallel (8x1) and data x model (4x2) meshes over 8 simulated CPU
  devices compute the single-device steps: from one state, three steps give
  the same losses and parameters within fp tolerance."""
  out = tmp_path / "mesh.json"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "tests" / "mesh_parity.py"), TINY,
       str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  got = json.loads(out.read_text())
  ref = got.pop("one")
  for name, run in got.items():
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5,
                               err_msg=name)
    for k in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
      np.testing.assert_allclose(run[k], ref[k], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name}: {k}")


def test_eight_device_cli_run_follows_one_device_run(reference_run,
                                                      tmp_path):
  """The whole job (sharded harvest, sharded steps) on a 4x2 mesh: the
  first logged metrics equal the single-device run's. Later steps are not
  compared parameter by parameter: Adam with beta1 = 0 turns rounding-level
  gradient differences on near-zero coordinates into +-lr steps, so long
  trajectories drift apart by about the learning rate."""
  run_cli(tmp_path, ["mesh.data=4", "mesh.model=2"],
          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  first = lambda wd: json.loads(
      (wd / "metrics.jsonl").read_text().splitlines()[0])
  ref, got = first(reference_run), first(tmp_path)
  assert got["step"] == ref["step"] == 4
  for k in ("loss", "mse", "l0", "fvu", "grad_norm"):
    assert got[k] == pytest.approx(ref[k], rel=1e-5), k
  assert all(np.isfinite(v).all() for v in exported(tmp_path).values())


def test_bad_configs_name_the_field(tmp_path):
  cases = {
      "dictionary.widht=5": "did you mean 'width'",
      "layer=40": "config.hookpoint",
      "site=resid_postt": "resid_postt",
      "target_l0=5000,width=256": "config.dictionary.target_l0",
      "data.text=/no/such/file.txt": "config.data.text",
      "arch=topk": "config.dictionary.k",
      "mesh.model=3": "mesh.model=3",
      "mesh.data=3": "config.mesh",
      "train.batch_size=0": "config.train.batch_size",
      "eval.prefixes=(64,16)": "config.eval.prefixes",
      "eval.loss_windows=first": "config.eval.loss_windows",
      "train.freq_start_step=5": "config.train.freq_start_step",
      "data.cache_tokens=4096": "set data.cache_dir too",
      "data.cache_tokens=-1": "config.data.cache_tokens",
  }
  for override, expected in cases.items():
    with pytest.raises((ValueError, FileNotFoundError)) as e:
      c = tiny_config(override)
      trainer.train(c, tmp_path / "never", progress=False)
    assert expected in str(e.value), (override, str(e.value))
  # Nothing was written for a config rejected at start.
  assert not (tmp_path / "never" / "checkpoints").exists()


def test_bool_count_in_file_is_rejected():
  """A config file may set True where a count belongs (ml_collections takes
  it, bool being an int); the check refuses it by name."""
  c = tiny_config()
  c.data.num_shards = True
  with pytest.raises(ValueError, match=r"config\.data\.num_shards.*got True"):
    config_lib.check(c)


def test_unknown_config_field_in_file_is_rejected():
  c = tiny_config()
  c.train.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r"train\.learning_rate"):
    config_lib.check(c)


def test_parse_arg_and_shorthands():
  got = config_lib.parse_arg("runlocal,layer=9,width=8192,lr=3e-4,"
                             "dictionary.matryoshka_prefixes=(64,256)")
  assert got == {"runlocal": True, "layer": 9, "width": 8192, "lr": 3e-4,
                 "dictionary.matryoshka_prefixes": (64, 256)}
  c = config_lib.apply_overrides(config_lib.default_config(),
                                 {"layer": 9, "site": "mlp_out",
                                  "width": 8192, "lr": 3e-4})
  assert c.hookpoint == "layer_9/mlp_out"
  assert (c.dictionary.width, c.train.lr) == (8192, 3e-4)
  back = config_lib.from_json(json.loads(json.dumps(config_lib.to_json(c))))
  assert back == c


def test_lr_schedule_shape():
  c = tiny_config("train.lr=1e-3,train.lr_warmup_steps=4,"
                  "train.lr_decay_fraction=0.25")
  sched = optim.lr_schedule(plans.make(c).optimizer)  # 24 steps: warm-up 4, flat 14, decay 6
  got = np.array([float(sched(i)) for i in range(25)])
  want = np.concatenate([np.arange(4) / 4 * 1e-3, np.full(14, 1e-3),
                         1e-3 * (1 - np.arange(7) / 6)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_sparsity_warmup_and_threshold_clip(real_model):
  """One step by hand: the coefficient ramps linearly, decoder rows stay
  unit norm, thresholds stay >= 0, and the step's loss equals
  dictionaries.compute_loss on the same batch."""
  c = tiny_config()
  run = Run.from_config(c)
  x = np.random.default_rng(1).normal(size=(256, 640)).astype(np.float32)
  state = run.init(jax.random.key(0), jnp.zeros(640), jnp.float32(2.0),
                   jnp.float32(2.0))
  params0 = jax.device_get(state.params)
  new, m = run.step(state, {"x": x})
  lo, _ = dictionaries.compute_loss(run.module, params0, x / 2.0,
                                    sparsity_coeff=1.0 / 8)
  np.testing.assert_allclose(float(m["loss"]), float(lo.total), rtol=1e-5)
  assert float(m["sparsity_coeff"]) == pytest.approx(1.0 / 8)
  p = jax.device_get(new.params)
  np.testing.assert_allclose(np.linalg.norm(p["w_dec"], axis=-1), 1.0,
                             rtol=1e-5)
  assert (p["threshold"] >= 0).all()


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_sparse_and_dense_steps_track_autodiff(real_model, arch):
  """train.step='sparse' and 'dense' (hand-derived for JumpReLU) run the same
  optimisation as jax.grad ('autodiff')."""
  extra = "step=sparse" + (",arch=topk,k=16" if arch == "topk" else "")
  steps = ("autodiff", "dense", "sparse")
  runs = {s: Run.from_config(tiny_config(extra.replace("step=sparse",
                                                      f"step={s}")))
          for s in steps}
  rng = np.random.default_rng(2)
  offset = rng.normal(size=640).astype(np.float32) * 3
  xs = [(rng.normal(size=(256, 640)).astype(np.float32) + offset)
        for _ in range(5)]
  finals, losses = {}, {}
  for name, run in runs.items():
    state = run.init(jax.random.key(0), jnp.asarray(offset / 4),
                     jnp.float32(4.0), jnp.float32(4.0))
    losses[name] = []
    for x in xs:
      state, m = run.step(state, {"x": x})
      losses[name].append(float(m["loss"]))
    finals[name] = jax.device_get(state)
  for step in ("dense", "sparse"):
    np.testing.assert_allclose(losses[step], losses["autodiff"], rtol=1e-4,
                               err_msg=step)
    for k in finals["autodiff"].params:
      np.testing.assert_allclose(finals[step].params[k],
                                 finals["autodiff"].params[k], rtol=1e-3,
                                 atol=1e-5, err_msg=f"{step} {k}")
    np.testing.assert_array_equal(finals[step].last_fired,
                                  finals["autodiff"].last_fired)


def test_cli_export_and_eval_of_released_folders_match_the_workdir(
    reference_run, tmp_path):
  """gemscope export (both formats) then eval --dictionary on each folder
  gives the metrics eval --workdir gives for the checkpoint."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  ev = ["--quiet"]
  small = dict(num_tokens=2048, loss_tokens=512)

  def run(args):
    proc = subprocess.run(GEMSCOPE + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout

  run(["eval", f"--workdir={reference_run}", "--set=eval.num_tokens=2048",
       "--set=eval.loss_tokens=512", "--set=eval.text=english_heldout"] + ev)
  want = json.loads((reference_run / "metrics.json").read_text())
  for fmt in ("gemmascope2", "saelens"):
    out = tmp_path / fmt
    run(["export", f"--workdir={reference_run}", f"--format={fmt}",
         f"--out={out}"])
    from gemscope_jax.evals import dictionary as eval_dictionary
    got = eval_dictionary.evaluate_dictionary(
        out, text="english_heldout", num_tokens=small["num_tokens"],
        loss_tokens=small["loss_tokens"], seq_len=want_seq_len(reference_run),
        progress=False)
    for key in ("l0", "fvu", "dead_fraction", "delta_lm_loss",
                "loss_recovered"):
      np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=2e-5,
                                 err_msg=f"{fmt} {key}")


def test_spread_loss_windows_measure_the_loss_of_those_windows(
    reference_run):
  """eval loss_windows='spread': the statistics still read every window,
  and the LM-loss figures are those of the windows spread evenly over the
  sample (the clean loss recomputed from exactly those windows), not of
  its first ones."""
  from gemscope_jax import models
  from gemscope_jax.convert import pretrained
  from gemscope_jax.evals import dictionary as eval_dictionary
  from gemscope_jax.text import corpora
  from gemscope_jax.text.tokenizer import default_tokenizer
  from gemscope_jax.text.windows import windows_from_files
  seq_len = want_seq_len(reference_run)
  kw = dict(text="english_heldout", num_tokens=4096, loss_tokens=512,
            seq_len=seq_len, progress=False)
  lead = eval_dictionary.evaluate_dictionary(reference_run / "export", **kw)
  spread = eval_dictionary.evaluate_dictionary(
      reference_run / "export", loss_windows="spread", **kw)
  for key in ("l0", "fvu", "dead_fraction", "dense_fraction"):
    np.testing.assert_allclose(spread[key], lead[key], rtol=1e-5, err_msg=key)
  assert (lead["loss_windows"], spread["loss_windows"]) == ("leading",
                                                            "spread")
  windows = windows_from_files(default_tokenizer(),
                               corpora.text_files("english_heldout", "text"),
                               seq_len, 4096)
  n = -(-512 // (seq_len * 8)) * 8  # whole batches of 8 windows
  picked = np.round(np.linspace(0, len(windows.tokens) - 1, n)).astype(int)
  config, params = pretrained.load_model("default")

  def clean_loss(rows):
    out = models.forward(params, windows.tokens[rows], windows.mask[rows],
                         config=config, logits=False, loss=True)
    pairs = (windows.mask[rows][:, 1:] & windows.mask[rows][:, :-1]).sum()
    return float(np.asarray(out.token_loss, np.float64).sum()) / pairs

  assert picked[-1] == len(windows.tokens) - 1 and len(set(picked)) == n
  np.testing.assert_allclose(spread["clean_loss"], clean_loss(picked),
                             rtol=1e-5)
  np.testing.assert_allclose(lead["clean_loss"], clean_loss(np.arange(n)),
                             rtol=1e-5)
  assert abs(spread["clean_loss"] - lead["clean_loss"]) > 1e-3


def want_seq_len(workdir) -> int:
  return json.loads((pathlib.Path(workdir) / "config.json").read_text()
                    )["eval"]["seq_len"]
