"""Multi-host training on JAX's multi-controller runtime.

`initialize(plan)` starts `jax.distributed` from a `DistributedPlan` (the
config's `distributed.*` fields) or, where a field is left at its default,
from the environment:

  GEMSCOPE_COORDINATOR    host:port of process 0 (or 'auto': let JAX detect
                          Cloud TPU / SLURM / Open MPI itself)
  GEMSCOPE_NUM_PROCESSES  how many processes take part
  GEMSCOPE_PROCESS_ID     this process's index, 0 .. n - 1

No coordinator and at most one process means a plain single-process run and
nothing is started, so every single-host path is unchanged. It must run
before anything touches a device (the backends freeze their process layout
when first used); `trainer.train` and `gemscope train` call it first.

The rest are the small pieces the trainer needs across processes: whether
this is process 0 (the one that logs and writes metrics), the global batch
from each process's rows (`global_batch`), the data shards a process serves,
and the union of every process's stream position for a checkpoint
(`gather_data_state`).

Caveat: JAX cannot shut a half-started runtime down and start it again, so
a failed `initialize` leaves the process unusable for another attempt; and a
process that dies is noticed by the others only through the runtime's
heartbeat (`heartbeat_timeout_s`) or a failed collective, so the survivors
stop with an error after up to that long, never sooner.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

ENV_COORDINATOR = "GEMSCOPE_COORDINATOR"
ENV_NUM_PROCESSES = "GEMSCOPE_NUM_PROCESSES"
ENV_PROCESS_ID = "GEMSCOPE_PROCESS_ID"

_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+?\]?:(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class DistributedPlan:
  """How this process joins a multi-host run (config `distributed.*`).

  Attributes:
    coordinator_address: host:port of process 0; '' falls back to
      GEMSCOPE_COORDINATOR; 'auto' lets JAX detect Cloud TPU / SLURM.
    num_processes: processes taking part; 0 falls back to the environment.
    process_id: this process's index; -1 falls back to the environment.
    initialization_timeout_s: how long to wait for the coordinator.
    heartbeat_timeout_s: a process silent this long fails the others.
  """
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1
  initialization_timeout_s: int = 300
  heartbeat_timeout_s: int = 60


class DistributedError(RuntimeError):
  """The multi-host runtime could not start (unreachable coordinator, ...)."""


def _env_int(name: str, field: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} (config.distributed.{field}) is not "
                     "an integer") from None


def settings(d: DistributedPlan) -> dict[str, Any]:
  """The resolved {coordinator_address, num_processes, process_id, auto}.

  Config fields win; a field at its default (``""``, 0, -1) falls back to
  the GEMSCOPE_* variable. Raises ValueError for inconsistent values,
  naming the config field and the variable.
  """
  address = d.coordinator_address or os.environ.get(ENV_COORDINATOR, "")
  address = address.strip()
  n = d.num_processes if d.num_processes else _env_int(ENV_NUM_PROCESSES,
                                                       "num_processes")
  pid = d.process_id if d.process_id >= 0 else _env_int(ENV_PROCESS_ID,
                                                        "process_id")
  auto = address == "auto"
  if n is not None and n < 0:
    raise ValueError(f"config.distributed.num_processes ({ENV_NUM_PROCESSES}"
                     f"): must be >= 0, got {n}")
  if pid is not None and pid < -1:
    raise ValueError(f"config.distributed.process_id ({ENV_PROCESS_ID}): "
                     f"must be >= 0, got {pid}")
  if pid == -1:
    pid = None
  if not auto:
    if (n or 0) > 1 and not address:
      raise ValueError(
          f"config.distributed.coordinator_address ({ENV_COORDINATOR}): "
          f"required for num_processes={n} (host:port of process 0)")
    if address and not n:
      raise ValueError(
          f"config.distributed.num_processes ({ENV_NUM_PROCESSES}): "
          f"required with coordinator_address={address!r}")
    if address and not _ADDRESS.match(address):
      raise ValueError(
          f"config.distributed.coordinator_address ({ENV_COORDINATOR}): "
          f"{address!r} is not host:port")
    if (n or 0) > 1 and pid is None:
      raise ValueError(f"config.distributed.process_id ({ENV_PROCESS_ID}): "
                       f"required for num_processes={n}")
  if n and pid is not None and not 0 <= pid < n:
    raise ValueError(f"config.distributed.process_id ({ENV_PROCESS_ID}): "
                     f"{pid} is not in [0, num_processes={n})")
  return {"coordinator_address": address, "num_processes": n or 0,
          "process_id": pid, "auto": auto}


def _wait_for_coordinator(address: str, timeout_s: float) -> bool:
  """Whether a TCP connection to `address` opens within `timeout_s`."""
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2.0):
        return True
    except OSError:
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.2)


def is_initialized() -> bool:
  # pylint: disable=protected-access
  return jax._src.distributed.global_state.client is not None


def initialize(d: DistributedPlan) -> bool:
  """Starts the multi-controller runtime if `d` / the environment ask.

  Returns:
    True when this is (now) a multi-process run.

  Raises:
    ValueError: inconsistent settings, or a runtime already started with
      another process count.
    DistributedError: the coordinator could not be reached within
      `initialization_timeout_s` (the message names the address).
  """
  s = settings(d)
  if is_initialized():
    if s["num_processes"] and s["num_processes"] != jax.process_count():
      raise ValueError(
          f"config.distributed.num_processes: {s['num_processes']}, but the "
          f"runtime already runs {jax.process_count()} processes")
    return jax.process_count() > 1
  if not s["auto"] and s["num_processes"] <= 1:
    return False
  kwargs = dict(initialization_timeout=int(d.initialization_timeout_s),
                heartbeat_timeout_seconds=int(d.heartbeat_timeout_s))
  if not s["auto"]:
    kwargs.update(coordinator_address=s["coordinator_address"],
                  num_processes=s["num_processes"],
                  process_id=s["process_id"])
  where = ("the auto-detected coordinator" if s["auto"] else
           f"the coordinator at {s['coordinator_address']} "
           "(config.distributed.coordinator_address / "
           f"{ENV_COORDINATOR})")
  # A client that cannot connect aborts the whole process from C++ (no
  # Python exception), so the other processes first check that process 0
  # is listening, within the same timeout, and fail here with a message.
  if (not s["auto"] and s["process_id"] != 0 and not _wait_for_coordinator(
      s["coordinator_address"], d.initialization_timeout_s)):
    raise DistributedError(
        f"could not reach {where} as process {s['process_id']} of "
        f"{s['num_processes']} within {d.initialization_timeout_s}s "
        "(config.distributed.initialization_timeout_s); is process 0 "
        "running, and is the address right?")
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
    raise DistributedError(
        f"could not join {where} as process {s['process_id']} of "
        f"{s['num_processes']} within {d.initialization_timeout_s}s "
        f"(config.distributed.initialization_timeout_s): "
        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  if s["num_processes"] and jax.process_count() != s["num_processes"]:
    raise ValueError(
        f"config.distributed.num_processes: {s['num_processes']}, but "
        f"{jax.process_count()} processes joined")
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Process 0: the one that prints, logs metrics and writes side files."""
  return jax.process_index() == 0


def global_batch(batch: Any, sharding: Any) -> Any:
  """The step's global input from this process's rows.

  Single process: `jax.device_put(batch, sharding)`. Several: each leaf is
  this process's slice of the global rows (process p holds rows
  [p B / P, (p + 1) B / P), the rows its devices hold under the batch
  sharding) and becomes one global array.
  """
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(jax.make_array_from_process_local_data, sharding, batch)


def num_data_shards(num_shards: int, batch_size: int) -> int:
  """S, the data shards the global stream is made of.

  `num_shards` (config `data.num_shards`) when > 0, else one per process.
  The global batch (`batch_size` rows) depends on S, never on the process
  count, so the same S on 1 x 8 and 2 x 4 devices gives the same run.
  """
  s = int(num_shards or 0) or jax.process_count()
  p = jax.process_count()
  if s % p:
    raise ValueError(f"config.data.num_shards: {s} shards cannot be split "
                     f"evenly over {p} processes")
  if batch_size % s:
    raise ValueError(f"config.train.batch_size: {batch_size} is not "
                     f"divisible by the {s} data shards (data.num_shards)")
  return s


def local_shards(num_shards: int) -> list[int]:
  """The data shards this process serves: a contiguous block, so that the
  concatenation over processes is shard order (and row order)."""
  per = num_shards // jax.process_count()
  start = jax.process_index() * per
  return list(range(start, start + per))


def _allgather_bytes(data: bytes) -> list[bytes]:
  n = np.asarray([len(data)], np.int32)
  sizes = np.asarray(multihost_utils.process_allgather(n)).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  got = np.asarray(multihost_utils.process_allgather(buf))
  return [got[i, :sizes[i]].tobytes() for i in range(len(sizes))]


def gather_data_state(state: dict) -> dict:
  """The stream position every process saves: the union of the processes'
  per-shard positions ({'shards': {shard: position}}), so any process can
  restore its own shards. A single process's state is returned as is."""
  if jax.process_count() == 1 or "shards" not in state:
    return state
  merged = dict(state, shards={})
  for raw in _allgather_bytes(json.dumps(state, sort_keys=True).encode()):
    merged["shards"].update(json.loads(raw)["shards"])
  return merged


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
  """Waits until every process reaches `name` (no device collective, so a
  long wait, such as process 0 writing an activation cache, is fine)."""
  if jax.process_count() == 1:
    return
  # pylint: disable=protected-access
  jax._src.distributed.global_state.client.wait_at_barrier(
      name, int(timeout_s * 1000))


__all__ = ["DistributedError", "ENV_COORDINATOR", "ENV_NUM_PROCESSES",
           "ENV_PROCESS_ID", "barrier", "gather_data_state", "global_batch",
           "initialize", "is_initialized", "is_main_process", "local_shards",
           "num_data_shards", "settings"]


def host_tree(tree: Any) -> Any:
  """`tree` with every array whole on the host (numpy), on every process.

  One process: `jax.device_get`. Several: arrays sharded across processes
  are gathered with `multihost_utils.process_allgather`, a collective every
  process must call (at the end of training, before process 0 exports).
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
