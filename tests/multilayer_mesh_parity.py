"""Run by test_multilayer_training in a process with 8 simulated CPU devices:
the same CLT and skip-transcoder train steps from the same state on 1 device
and on a 4x2 (data x model) mesh, latents sharded over 'model'.

  python tests/multilayer_mesh_parity.py OUT.json
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax.training import config as config_lib
from gemscope_jax.training.step import Run

ARG = ("runlocal,width=64,batch=64,tokens=640,train.lr=1e-4,"
       "train.sparsity_warmup_steps=2,train.lr_warmup_steps=1")
CASES = {"clt": ("clt_270m.py", "clt_layers='1-3'", 3),
         "transcoder": ("transcoder_270m.py", "skip", 1)}
out = {}
rng = np.random.default_rng(0)
for case, (experiment, extra, n) in CASES.items():
  shape = (64, n, 640) if n > 1 else (64, 640)
  batches = [{"x": rng.normal(size=shape).astype(np.float32) * 3,
              "target": rng.normal(size=shape).astype(np.float32) * 5 + 1}
             for _ in range(3)]
  for name, mesh in (("one", None), ("dpmp", (4, 2))):
    c = config_lib.load(f"experiments/{experiment}:{ARG},{extra}")
    if mesh:
      c.mesh.data, c.mesh.model = mesh
    devices = [jax.devices()[0]] if mesh is None else None
    run = Run.from_config(c, devices)
    scale = jnp.full((n,), 3.0) if n > 1 else jnp.float32(3.0)
    b_dec = np.full(run.init_shapes[0].shape, 0.2, np.float32)
    state = run.init(jax.random.key(0), jnp.asarray(b_dec), scale, scale * 2)
    if mesh:
      spec = state.params["w_enc"].sharding.spec
      assert spec[-1] == "model", spec   # latents on the model axis
    losses = []
    for b in batches:
      state, m = run.step(state, b)
      losses.append(float(m["loss"]))
    p = jax.device_get(state.params)
    out[f"{case}/{name}"] = {"losses": losses, **{
        k: np.asarray(v).tolist() for k, v in p.items()}}
json.dump(out, open(sys.argv[1], "w"))
