"""Run by test_training in a process with 8 simulated CPU devices: the same
train steps from the same state on 1 device, an 8x1 and a 4x2 mesh.

  python tests/mesh_parity.py CONFIG_ARG OUT.json
"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from gemscope_jax.training import config as config_lib
from gemscope_jax.training.step import Run
T = sys.argv[1]
out = {}
rng = np.random.default_rng(0)
offset = rng.normal(size=640).astype(np.float32) * 3
xs = [rng.normal(size=(256, 640)).astype(np.float32) * 2 + offset for _ in range(3)]
for name, mesh in (("one", None), ("dp", (8, 1)), ("dpmp", (4, 2))):
  c = config_lib.load(f"experiments/jumprelu_270m.py:{T}")
  if mesh: c.mesh.data, c.mesh.model = mesh
  devices = [jax.devices()[0]] if mesh is None else None
  run = Run.from_config(c, devices)
  state = run.init(jax.random.key(0), jnp.asarray(offset / 8), jnp.float32(8.0),
                   jnp.float32(8.0))
  losses = []
  for x in xs:
    state, m = run.step(state, {"x": x})
    losses.append(float(m["loss"]))
  p = jax.device_get(state.params)
  out[name] = {"losses": losses, **{k: np.asarray(v).tolist() for k, v in p.items()}}
json.dump(out, open(sys.argv[2], "w"))
