"""Multi-host training for real on one machine: 2 processes x 4 simulated
CPU devices (gloo collectives, coordinator on 127.0.0.1) against 1 process x
8 devices, a process killed mid-run, the resumed rerun, and the settings
that must fail at start.

The runs read one activation cache (harvested by the 1 x 8 run, the module
fixture), so no process runs Gemma twice over the same tokens.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from gemscope_jax.training import config as config_lib
from gemscope_jax.training import plans
from gemscope_jax.parallel import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(ROOT / "tests" / "multihost_worker.py")]
# lr 1e-4 as in test_group_training: at 1e-3 Adam with beta1 = 0 turns
# one-ulp differences of the collectives into +-lr steps.
LR = 1e-4
# 32 steps of 256 layer-1 activations in 2 data shards of 128 rows.
TINY = ("runlocal,layer=1,width=256,tokens=8192,batch=256,"
        "data.bucket_tokens=1024,data.seq_len=64,data.num_shards=2,"
        "train.checkpoint_every_steps=8,train.log_every_steps=4,"
        f"train.sparsity_warmup_steps=8,train.lr_warmup_steps=4,train.lr={LR},"
        "distributed.heartbeat_timeout_s=10,"
        "distributed.initialization_timeout_s=60")

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, cache, *, num_processes: int, devices: int, port=None,
          env=None, config: str | None = None) -> list[subprocess.Popen]:
  """Starts the worker processes of one run (stdout+stderr to files): the
  TINY config reading `cache`, or the overrides `config`."""
  config = f"{TINY},data.cache_dir={cache}" if config is None else config
  procs = []
  for pid in range(num_processes):
    e = {**os.environ, "JAX_PLATFORMS": "cpu",
         "MULTIHOST_DUMP_S": str(DUMP_S),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         **(env or {})}
    if num_processes > 1:
      e.update({distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
                distributed.ENV_NUM_PROCESSES: str(num_processes),
                distributed.ENV_PROCESS_ID: str(pid)})
    log = open(pathlib.Path(workdir).with_name(
        f"{pathlib.Path(workdir).name}.p{pid}.log"), "ab")
    procs.append(subprocess.Popen(
        WORKER + [str(workdir), config], cwd=ROOT,
        env=e, stdout=log, stderr=subprocess.STDOUT))
    log.close()
  return procs


def output(workdir, pid: int) -> str:
  p = pathlib.Path(workdir)
  return p.with_name(f"{p.name}.p{pid}.log").read_text(errors="replace")


# Every worker dumps all its threads' stacks (faulthandler, into its log)
# this long after it starts, so that a run killed at TIMEOUT shows where it
# hung.
TIMEOUT = 300
DUMP_S = TIMEOUT - 20


class Hung(Exception):
  """The processes of a run did not finish in time (their logs hold the
  stack dumps)."""


def finish(procs, workdir, timeout: float = TIMEOUT) -> None:
  """Waits for every process; kills all of them on a failure or timeout
  (raising Hung for a timeout)."""
  deadline = time.time() + timeout
  try:
    for pid, p in enumerate(procs):
      try:
        p.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired as e:
        raise Hung("\n".join(
            f"--- process {i} ---\n{output(workdir, i)[-6000:]}"
            for i in range(len(procs)))) from e
      assert p.returncode == 0, output(workdir, pid)[-4000:]
  finally:
    kill(procs)


def kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def run(workdir, cache, **kwargs) -> None:
  """One run to the end. A run that hangs (no progress until TIMEOUT; seen
  twice in full-suite runs under load, both times while the 2 x 4
  processes set up their first 8-rank gloo communicator, before any step)
  is started once more (it resumes from its last checkpoint, if any, which
  must give the same run), with the hung run's stack dumps printed; a
  second hang fails the test."""
  procs = start(workdir, cache, **kwargs)
  try:
    finish(procs, workdir)
  except Hung as hung:
    print(f"multihost run {workdir} hung; its stacks:\n{hung}\nrerunning once")
    procs = start(workdir, cache, **kwargs)
    finish(procs, workdir)


def exported(workdir) -> dict[str, np.ndarray]:
  return load_file(str(pathlib.Path(workdir) / "export" / "params.safetensors"))


def metrics(workdir) -> list[dict]:
  return [json.loads(l) for l in
          (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got_dir, ref_dir) -> None:
  """Same logged losses at every step, and parameters equal up to what
  rounding does to Adam with beta1 = 0: a coordinate whose gradient is
  rounding-level near zero may step +-lr either way (see test_training's
  eight-device test), so parameters are compared to a few lr (in normalised
  units, times the export's scale); a wrong shard or row order would be
  off by the parameters' own size."""
  got, ref = metrics(got_dir), metrics(ref_dir)
  assert [r["step"] for r in got] == [r["step"] for r in ref]
  for a, b in zip(got, ref):
    for k in ("loss", "mse", "l0", "fvu"):
      assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
  g, r = exported(got_dir), exported(ref_dir)
  assert sorted(g) == sorted(r)
  for k in r:
    scale = max(float(np.abs(r[k]).max()), 1e-6)
    np.testing.assert_allclose(g[k], r[k], rtol=0, atol=10 * LR * scale,
                               err_msg=k)


@pytest.fixture(scope="module")
def one_by_eight(tmp_path_factory):
  """(cache, workdir) of the 1 process x 8 devices run; writes the cache."""
  root = tmp_path_factory.mktemp("multihost")
  cache, workdir = root / "cache", root / "one"
  run(workdir, cache, num_processes=1, devices=8)
  return cache, workdir


@pytest.fixture(scope="module")
def two_by_four(one_by_eight):
  cache, one = one_by_eight
  workdir = one.with_name("two")
  run(workdir, cache, num_processes=2, devices=4, port=free_port())
  return workdir


def test_two_processes_match_one(one_by_eight, two_by_four):
  _, one = one_by_eight
  assert_same_run(two_by_four, one)
  # Process 0 alone logs; both took part (the stream was split).
  assert "process 1 done: step 32" in output(two_by_four, 1)
  assert not (two_by_four / "metrics.jsonl.p1").exists()
  saved = sorted(int(p.name) for p in (two_by_four / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert saved == [24, 32]


def test_killed_process_stops_the_other_and_rerun_resumes(one_by_eight,
                                                          two_by_four):
  cache, one = one_by_eight
  workdir = one.with_name("killed")
  procs = start(workdir, cache, num_processes=2, devices=4,
                port=free_port(), env={"MULTIHOST_STEP_DELAY_S": "0.3"})
  try:
    deadline = time.time() + 240
    ckpt = workdir / "checkpoints" / "8"
    while (not ckpt.exists() and time.time() < deadline
           and all(p.poll() is None for p in procs)):
      time.sleep(0.05)
    assert ckpt.exists(), output(workdir, 0)[-3000:]
    procs[1].send_signal(signal.SIGKILL)
    t = time.time()
    # The survivor notices (a broken collective or the 10 s heartbeat) and
    # stops with an error instead of waiting forever.
    procs[0].wait(timeout=120)
    assert procs[0].returncode != 0, output(workdir, 0)[-3000:]
    assert time.time() - t < 120
    assert "done" not in output(workdir, 0)
  finally:
    kill(procs)
  run(workdir, cache, num_processes=2, devices=4, port=free_port())
  assert "resuming from step" in output(workdir, 0)
  assert_same_run(workdir, two_by_four)


# Live Gemma (no cache), its weights FSDP-split over the global mesh: 16
# steps of 256 rows, 2 shards, one forward of 2 x 8 windows at a time.
LIVE = TINY.replace("tokens=8192", "tokens=4096") + (
    ",data.model_batch_size=8,mesh.gemma=fsdp")


def test_live_harvest_over_the_global_mesh_matches_one_process(tmp_path):
  one, two = tmp_path / "live_one", tmp_path / "live_two"
  run(one, None, num_processes=1, devices=8, config=LIVE)
  run(two, None, num_processes=2, devices=4, port=free_port(), config=LIVE)
  assert_same_run(two, one)
  assert "process 1 done: step 16" in output(two, 1)


def test_unreachable_coordinator_fails_in_time():
  port = free_port()  # nothing listens there
  code = ("from gemscope_jax.parallel import distributed\n"
          "from gemscope_jax.training import config, plans\n"
          "c = config.default_config()\n"
          f"c.distributed.coordinator_address = '127.0.0.1:{port}'\n"
          "c.distributed.num_processes = 2\n"
          "c.distributed.process_id = 1\n"
          "c.distributed.initialization_timeout_s = 3\n"
          "try:\n"
          "  distributed.initialize(plans.distributed_plan(c))\n"
          "except distributed.DistributedError as e:\n"
          "  print('ERROR', e)\n")
  t = time.time()
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert time.time() - t < 90
  assert "ERROR" in proc.stdout, proc.stdout + proc.stderr[-3000:]
  assert f"127.0.0.1:{port}" in proc.stdout
  assert "config.distributed.coordinator_address" in proc.stdout


@pytest.mark.parametrize("fields, env, expected", [
    ({"num_processes": 2, "process_id": 2,
      "coordinator_address": "127.0.0.1:1234"}, {}, "process_id"),
    ({"num_processes": 2, "process_id": 0}, {}, "coordinator_address"),
    ({"coordinator_address": "127.0.0.1:1234"}, {}, "num_processes"),
    ({"num_processes": 2, "coordinator_address": "127.0.0.1:1234"}, {},
     "process_id"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "nohost"},
     {}, "host:port"),
    ({}, {"GEMSCOPE_NUM_PROCESSES": "two"}, "GEMSCOPE_NUM_PROCESSES"),
    ({}, {"GEMSCOPE_NUM_PROCESSES": "4", "GEMSCOPE_PROCESS_ID": "5",
          "GEMSCOPE_COORDINATOR": "10.0.0.1:99"}, "GEMSCOPE_PROCESS_ID"),
])
def test_bad_settings_name_the_field(monkeypatch, fields, env, expected):
  for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
            distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  c = config_lib.default_config()
  for k, v in fields.items():
    c.distributed[k] = v
  with pytest.raises(ValueError, match=expected):
    distributed.settings(plans.distributed_plan(c))


def test_default_is_a_single_process(monkeypatch):
  for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
            distributed.ENV_PROCESS_ID):
    monkeypatch.delenv(k, raising=False)
  c = config_lib.default_config()
  settings = lambda c: distributed.settings(plans.distributed_plan(c))  # pylint: disable=unnecessary-lambda-assignment
  assert settings(c) == {"coordinator_address": "", "num_processes": 0,
                         "process_id": None, "auto": False}
  assert distributed.initialize(plans.distributed_plan(c)) is False
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "3")
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
  monkeypatch.setenv(distributed.ENV_COORDINATOR, "h:1")
  assert settings(c)["num_processes"] == 3
  c.distributed.num_processes, c.distributed.process_id = 1, 0  # config wins
  assert settings(c)["num_processes"] == 1


def test_shards_must_split_over_processes():
  with pytest.raises(ValueError, match="config.train.batch_size"):
    distributed.num_data_shards(3, 256)
  assert distributed.num_data_shards(4, 256) == 4
  assert distributed.local_shards(4) == [0, 1, 2, 3]
