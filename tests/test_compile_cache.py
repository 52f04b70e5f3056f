"""`assets.enable_compile_cache`: a second process finds the programs the
first compiled, including those that compile in well under a second (the
half-second programs of a short attribution's first call)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# f, a program of a few dozen operations, compiles in a few tenths of a
# second on 2 CPU cores: over the cache's 0.1 s floor, under JAX's default
# of a second.
_CHILD = r"""
import json, sys
from gemscope_jax import assets
folder = assets.enable_compile_cache(sys.argv[1])
import jax, jax.numpy as jnp

@jax.jit
def f(x):
  for i in range(20):
    x = jnp.sin(x * (1.0 + i / 1000.0)) + jnp.roll(x, i % 7)
  return x

events, inside = [], [False]
jax.monitoring.register_event_listener(
    lambda name, **kw: inside[0] and events.append(name))
x = jax.block_until_ready(jnp.arange(64.0))
inside[0] = True
y = jax.block_until_ready(f(x))
inside[0] = False
print(json.dumps({
    "min_s": jax.config.jax_persistent_cache_min_compile_time_secs,
    "dir": jax.config.jax_compilation_cache_dir, "value": float(y.sum()),
    "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def _run(folder, env):
  out = subprocess.run([sys.executable, "-c", _CHILD, str(folder)],
                       capture_output=True, text=True, env=env, timeout=300,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_reads_short_compiles_from_the_cache(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_PERSISTENT_CACHE", "JAX_COMPILATION"))}
  env.pop("GEMSCOPE_COMPILE_CACHE", None)
  folder = tmp_path / "xla"
  first = _run(folder, env)
  assert first["min_s"] == 0.1 and first["dir"] == str(folder)
  assert first["hits"] == 0
  assert any(p.name.startswith("jit_f-") for p in folder.iterdir())
  second = _run(folder, env)
  assert second["hits"] == 1  # f read back, not compiled
  assert second["value"] == first["value"]
  # Turned off, nothing is written.
  off = tmp_path / "off"
  env_off = dict(env, GEMSCOPE_COMPILE_CACHE="0")
  out = subprocess.run([sys.executable, "-c", _CHILD, str(off)],
                       capture_output=True, text=True, env=env_off,
                       timeout=300, check=True)
  assert json.loads(out.stdout.strip().splitlines()[-1])["value"] == (
      first["value"])
  assert not off.exists()
