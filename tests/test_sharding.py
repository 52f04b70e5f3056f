"""Gemma 3 parameter layouts over a mesh (training/sharding.py) and the
memory plan (scripts/memory_plan.py).

The multi-device checks run this file as a script in a subprocess with 4
simulated CPU devices (XLA_FLAGS must be set before jax is imported):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python tests/test_sharding.py OUT.json

There the real Gemma 3 270M runs replicated, 'fsdp' on a 4 x 1 mesh and
'fsdp_tp' on a 2 x 2 mesh, and the script records activations, logits and
every parameter's shard shape for the tests to compare. Four devices, not
eight: simulated devices share the host's memory and an 'fsdp' forward
gathers weights on each of them (about 13 GB on eight).

Generation has its own workers (`python tests/test_sharding.py generate
OUT.json`, `... decode27b OUT.json`): the real 270M generating with
sharded weights and a sharded KV cache on eight simulated devices, and the
27B decode step compiled abstractly for a 1 x 8 mesh. Both run XLA's CPU
backend with its concurrency-optimized scheduler off, as
scripts/memory_plan.py does, so that a layer's weights are gathered when
the layer runs rather than all at the start.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOOKS = ("layer_3/resid_post", "layer_11/attn_out", "layer_17/mlp_out")
MESHES = {"fsdp": (4, 1), "fsdp_tp": (2, 2)}


def _worker(out_path: str) -> None:
  """The 4-device half: forward passes and shard shapes -> JSON."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  from gemscope_jax import models  # pylint: disable=import-outside-toplevel
  from gemscope_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.parallel import gemma_layout as sharding  # pylint: disable=import-outside-toplevel
  from gemscope_jax.parallel import make_mesh  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import plans, sources  # pylint: disable=import-outside-toplevel

  assert len(jax.devices()) == 4, jax.devices()
  mc, params = pretrained.load_model("default")
  params = jax.device_get(params)
  rng = np.random.default_rng(0)
  # Small: the full-vocabulary logits of every pass and XLA's temporaries
  # on 4 devices add up (this runs beside the rest of the suite).
  tokens = rng.integers(3, mc.vocab_size, size=(8, 24)).astype(np.int32)
  tokens[:, 0] = 2  # BOS
  tokens[5, 18:] = 0  # a right-padded window

  def run(p, sharding_=None):
    t = tokens if sharding_ is None else jax.device_put(tokens, sharding_)
    out = models.forward(p, t, config=mc, hookpoints=HOOKS)
    return {"logits": np.asarray(out.logits[:, :, :2048]).tolist(),
            "loss": float(out.loss),
            **{h: np.asarray(out.activations[h]).tolist() for h in HOOKS}}

  result = {"replicated": run(params)}
  for mode, shape in MESHES.items():
    mesh = Mesh(np.asarray(jax.devices()).reshape(shape), ("data", "model"))
    placed = sharding.shard_gemma_params(params, mc, mesh, mode)
    result[mode] = run(placed, NamedSharding(mesh, PartitionSpec("data")))
    flat = jax.tree_util.tree_flatten_with_path(placed)[0]
    result[mode]["shards"] = {
        sharding._path_name(p): [list(s.data.shape) for s in x.addressable_shards]  # pylint: disable=protected-access
        for p, x in flat}
    del placed, flat
    jax.clear_caches()

  # sources.load_gemma: random weights made in their shards equal the
  # replicated ones.
  c = config_lib.load(f"{ROOT}/configs/gemma3.py:size=270m,"
                      "checkpoint=random")
  c.mesh.data, c.mesh.model = 2, 2
  ref = sources.load_gemma(plans.make(c))
  c.mesh.gemma = "fsdp_tp"
  plan = plans.make(c)
  mesh = make_mesh(plan.mesh)
  got = sources.load_gemma(plan, mesh)
  emb = got["embedder"]["input_embedding"]
  result["load_gemma"] = {
      "equal": bool(jax.tree.all(jax.tree.map(
          lambda a, b: bool(jnp.array_equal(a, b)), ref, got))),
      "embedding_spec": [str(a) for a in emb.sharding.spec],
      "embedding_shard": list(emb.addressable_shards[0].data.shape)}
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(result, f)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding") / "out.json"
  proc = subprocess.run(
      [sys.executable, str(pathlib.Path(__file__)), str(out)], cwd=ROOT,
      capture_output=True, text=True, timeout=900,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return json.loads(out.read_text())


@pytest.mark.parametrize("mode", sorted(MESHES))
def test_sharded_forward_matches_replicated(four_devices, mode):
  """The real 270M with sharded weights computes the replicated pass's
  activations, logits and loss (float32; only summation order differs)."""
  ref, got = four_devices["replicated"], four_devices[mode]
  for h in HOOKS:
    a, b = np.asarray(ref[h]), np.asarray(got[h])
    scale = np.abs(a).max()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=f"{mode}: {h}")
  np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-4,
                             atol=1e-3, err_msg=mode)
  assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_shard_shapes_follow_the_rules(four_devices):
  """Each device's piece of each weight is what the rules say, including
  the fallback for the single key/value head on a 2-way 'model' axis."""
  fsdp, tp = four_devices["fsdp"]["shards"], four_devices["fsdp_tp"][
      "shards"]
  # 4 x 1: the embedding's vocabulary axis and every d_model axis over data.
  want_fsdp = {
      "embedder/input_embedding": [262144 // 4, 640],
      "layer_0/attn/q_einsum/w": [4, 640 // 4, 256],
      "layer_0/attn/kv_einsum/w": [2, 1, 640 // 4, 256],
      "layer_0/attn/attn_vec_einsum/w": [4, 256, 640 // 4],
      "layer_0/mlp/gating_einsum": [2, 2048, 640 // 4],
      "layer_0/mlp/linear": [2048, 640 // 4],
      "layer_0/pre_ffw_norm/scale": [640],
      "final_norm/scale": [640],
  }
  # 2 x 2: d_model over data (2), heads / MLP hidden / embedding width over
  # model (2); one KV head cannot be split, so kv_einsum is data-only.
  want_tp = {
      "embedder/input_embedding": [262144 // 2, 640 // 2],
      "layer_0/attn/q_einsum/w": [4 // 2, 640 // 2, 256],
      "layer_0/attn/kv_einsum/w": [2, 1, 640 // 2, 256],
      "layer_0/attn/attn_vec_einsum/w": [4 // 2, 256, 640 // 2],
      "layer_0/mlp/gating_einsum": [2, 2048 // 2, 640 // 2],
      "layer_0/mlp/linear": [2048 // 2, 640 // 2],
      "layer_0/attn/_query_norm/scale": [256],
  }
  for got, want in ((fsdp, want_fsdp), (tp, want_tp)):
    for name, shape in want.items():
      assert len(got[name]) == 4, name
      assert all(s == shape for s in got[name]), (name, got[name], shape)
  assert len(fsdp) == len(tp) == 2 + 18 * 11


def test_load_gemma_builds_random_weights_in_shards(four_devices):
  got = four_devices["load_gemma"]
  assert got["equal"]
  assert got["embedding_spec"] == ["data", "model"]
  assert got["embedding_shard"] == [262144 // 2, 640 // 2]


def test_rules_and_fallbacks_in_closed_form():
  """Shard bytes from the rules equal the closed-form parameter count /
  devices when every axis divides, and the fallbacks are reported."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from gemscope_jax import models  # pylint: disable=import-outside-toplevel
  from gemscope_jax.parallel import gemma_layout as sharding  # pylint: disable=import-outside-toplevel

  mc = models.Gemma3_27B
  abstract = models.abstract_params(mc, jnp.bfloat16)
  specs = sharding.gemma_param_specs(mc, {"data": 16, "model": 8}, "fsdp_tp",
                                     abstract)
  norms = mc.num_layers * (4 * mc.d_model + 2 * mc.head_dim) + mc.d_model
  sharded = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(
      specs, is_leaf=lambda v: isinstance(v, P))):
    n = 1
    for axis in s:
      n *= {"data": 16, "model": 8, None: 1}[axis]
    sharded += x.size // n
  assert sharded * 128 == (mc.num_params() - norms) + norms * 128
  assert sharding.describe(mc, {"data": 16, "model": 8}, "fsdp_tp") == []
  notes = sharding.describe(models.Gemma3_270M, {"data": 4, "model": 2},
                            "fsdp_tp")
  assert len(notes) == 18 and all("kv_einsum" in n for n in notes)
  assert sharding.param_spec("layer_0/mlp/linear", (2048, 640),
                             {"data": 3, "model": 1}, "fsdp")[0] == P(None,
                                                                      None)


def test_bad_layout_names_the_field():
  from gemscope_jax import models  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.parallel import gemma_layout as sharding  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match=r"config\.mesh\.gemma.*'zero3'"):
    sharding.check_layout("zero3")
  with pytest.raises(ValueError, match=r"config\.mesh\.gemma"):
    sharding.gemma_param_specs(models.Gemma3_270M, {"data": 2}, "tp")
  c = config_lib.load(f"{ROOT}/configs/gemma3.py")
  c.mesh.gemma = "sharded"
  with pytest.raises(ValueError, match=r"config\.mesh\.gemma"):
    config_lib.check(c)


def test_presets_choose_a_layout():
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  want = {"270m": "replicated", "1b": "fsdp", "4b": "fsdp", "12b": "fsdp_tp",
          "27b": "fsdp_tp"}
  for size, layout in want.items():
    c = config_lib.load(f"{ROOT}/configs/gemma3.py:size={size}")
    assert c.mesh.gemma == layout, size
    assert c.model.name == f"gemma3_{size}", size
  c = config_lib.load(f"{ROOT}/configs/gemma3.py:size=27b,mesh.gemma=fsdp")
  assert c.mesh.gemma == "fsdp"


def test_memory_plan_quick_path_counts_weights_exactly(tmp_path):
  """scripts/memory_plan.py for 270M (compiled abstractly on simulated
  devices): each row's per-device weight bytes equal the closed-form count
  x 2 bytes (bf16) / shards, the train state equals the SAE's parameters
  and two Adam moments in fp32 plus its counters, and the compiled harvest
  step holds at least the weights and the token batch."""
  from gemscope_jax import models  # pylint: disable=import-outside-toplevel
  out = tmp_path / "plan.json"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "scripts" / "memory_plan.py"), "--quick",
       "--sizes=270m", "--out", str(tmp_path / "plan.md"), "--json",
       str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = json.loads(out.read_text())["harvest"]
  mc = models.Gemma3_270M
  n = mc.num_params()
  norms = mc.num_layers * (4 * mc.d_model + 2 * mc.head_dim) + mc.d_model
  assert n == models.count_params(models.abstract_params(mc))
  assert {(r["data"], r["model"], r["layout"]) for r in rows} == {
      (1, 1, "replicated"), (4, 1, "replicated"), (4, 1, "fsdp")}
  for r in rows:
    shards = r["data"] if r["layout"] == "fsdp" else 1
    assert r["gemma_param_bytes"] == 2 * ((n - norms) // shards + norms), r
    d, w = mc.d_model, r["width"]
    sae = 2 * d * w + 2 * w + d  # w_enc, w_dec, b_enc, threshold, b_dec
    counters = r["train_state_bytes"] - 3 * 4 * sae - 4 * w  # + last_fired
    assert 0 <= counters < 64, r
    tokens = 4 * 1024 * (4 + 1)  # 4 windows per device: int32 ids + mask
    assert r["harvest_bytes"] >= r["gemma_param_bytes"] + tokens, r
    assert r["peak_bytes"] >= r["train_bytes"] > r["train_state_bytes"], r
  text = (tmp_path / "plan.md").read_text()
  assert "| 270m | 65,536 | 6 | 4 x 1 | fsdp |" in text


# --- generation: the KV cache laid out like the weights ------------------------

GEN_FLAGS = ("--xla_force_host_platform_device_count=8 "
             "--xla_cpu_enable_concurrency_optimized_scheduler=false")
# Greedy generation compared; (mesh, layout, prompt lengths): batch 4 splits
# the cache's batch over 'data'; batch 2 cannot, so its slots are split.
GEN_CASES = {"fsdp_4x1": ((4, 1), "fsdp", (5, 9, 12, 16)),
             "fsdp_tp_4x2": ((4, 2), "fsdp_tp", (7, 13))}
GEN_NEW = 6


def _generate_worker(out_path: str) -> None:
  """The 8-device half: greedy tokens replicated and sharded -> JSON."""
  import functools  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel

  from gemscope_jax import generate  # pylint: disable=import-outside-toplevel
  from gemscope_jax.convert import pretrained  # pylint: disable=import-outside-toplevel
  from gemscope_jax.generate import _loop  # pylint: disable=import-outside-toplevel
  from gemscope_jax.parallel import gemma_layout  # pylint: disable=import-outside-toplevel

  assert len(jax.devices()) == 8, jax.devices()
  mc, params = pretrained.load_model("default")
  params = jax.device_get(params)
  rng = np.random.default_rng(1)
  result = {}
  for name, (shape, layout, lengths) in GEN_CASES.items():
    rows = [np.concatenate([[2], rng.integers(3, mc.vocab_size, n - 1)])
            for n in lengths]
    ref = generate.generate(params, rows, config=mc,
                            max_new_tokens=GEN_NEW)
    mesh = Mesh(np.asarray(jax.devices()[:shape[0] * shape[1]]).reshape(
        shape), ("data", "model"))
    placed = gemma_layout.shard_gemma_params(params, mc, mesh, layout)
    layout_of = functools.partial(gemma_layout.cache_shardings, mc, mesh,
                                  layout)
    got = generate.generate(placed, rows, config=mc, max_new_tokens=GEN_NEW,
                            cache_sharding=layout_of)
    # The cache generate made: prefill again with the same static
    # arguments (a cache hit, no new compile).
    t0 = generate.prompt_bucket(max(lengths))
    length = generate.cache_bucket(t0, GEN_NEW)
    tokens, mask = generate.left_pad(rows, t0)
    _, cache, _ = _loop.prefill(
        placed, jnp.asarray(tokens), jnp.asarray(mask), {}, config=mc,
        dtype=jnp.dtype(jnp.float32), cache_length=length, edits=(),
        hookpoints=(), cache_sharding=layout_of(len(rows), length))
    result[name] = {
        "ref": [t.tolist() for t in ref.tokens],
        "got": [t.tolist() for t in got.tokens],
        "cache_length": length,
        "spec": [str(a) for a in cache.keys[0].sharding.spec],
        "shards": sorted({tuple(s.data.shape)
                          for s in cache.values[-1].addressable_shards}),
        "devices": len(cache.keys[0].sharding.device_set)}
    del placed, cache
    jax.clear_caches()
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(result, f)


def _decode27b_worker(out_path: str) -> None:
  """Compiles the 27B decode step on 1 x 8 (scripts/memory_plan.py's own
  `decode_row`, which sets its flags before importing jax)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(
      "memory_plan", ROOT / "scripts" / "memory_plan.py")
  plan = importlib.util.module_from_spec(spec)
  sys.modules["memory_plan"] = plan
  spec.loader.exec_module(plan)
  row = plan.decode_row("gemma3_27b", 1, 8, "fsdp_tp", 8, 8192, loop=False)
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(row), f)


def _run_worker(kind: str, tmp_path, env: dict) -> dict:
  out = tmp_path / f"{kind}.json"
  proc = subprocess.run(
      [sys.executable, str(pathlib.Path(__file__)), kind, str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      env={k: v for k, v in {**os.environ, **env}.items()
           if v is not None})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sharded_generation(tmp_path_factory):
  return _run_worker("generate", tmp_path_factory.mktemp("generate"),
                     {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": GEN_FLAGS})


@pytest.mark.parametrize("case", sorted(GEN_CASES))
def test_sharded_generation_matches_replicated(sharded_generation, case):
  """The real 270M, weights and KV cache laid out 'fsdp' on 4 x 1 (batch 4:
  the cache's batch over 'data') or 'fsdp_tp' on 4 x 2 (batch 2: the
  cache's slots over 'data'; one KV head, whole on 'model'), generates the
  replicated run's greedy tokens."""
  got = sharded_generation[case]
  assert got["got"] == got["ref"]
  assert all(len(t) == GEN_NEW for t in got["ref"])
  (data, model), _, lengths = GEN_CASES[case]
  length = got["cache_length"]
  assert got["devices"] == data * model
  spec = got["spec"]
  while spec and spec[-1] == "None":
    spec = spec[:-1]
  if len(lengths) % data == 0:
    assert spec == ["data"]
    assert got["shards"] == [[len(lengths) // data, length, 1, 256]]
  else:
    assert spec == ["None", "data"]
    assert got["shards"] == [[len(lengths), length // data, 1, 256]]


def test_cache_layout_in_closed_form():
  """`cache_specs` for the published sizes: batch over 'data' when it
  divides, else the slots, KV heads over 'model' under 'fsdp_tp'; one
  device's bytes are the formula's / devices; fallbacks are reported."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from gemscope_jax import models  # pylint: disable=import-outside-toplevel
  from gemscope_jax.parallel import gemma_layout  # pylint: disable=import-outside-toplevel

  mc = models.Gemma3_27B
  mesh = {"data": 4, "model": 8}
  specs, notes = gemma_layout.cache_specs(mc, mesh, "fsdp_tp", 8, 8192)
  assert notes == []
  assert set(specs.keys) == set(specs.values) == {P("data", None, "model")}
  assert specs.length == specs.start == P()
  specs, _ = gemma_layout.cache_specs(mc, mesh, "fsdp_tp", 1, 8192)
  assert set(specs.keys) == {P(None, "data", "model")}
  specs, _ = gemma_layout.cache_specs(mc, mesh, "fsdp", 8, 8192)
  assert set(specs.keys) == {P("data")}
  specs, _ = gemma_layout.cache_specs(mc, mesh, "replicated", 8, 8192)
  assert set(specs.keys) == {P()}
  # One device's shard of the bf16 cache: the formula / 32, exactly.
  abstract = jax.eval_shape(lambda: models.init_cache(mc, 8, 8192,
                                                      jnp.bfloat16))
  specs, _ = gemma_layout.cache_specs(mc, mesh, "fsdp_tp", 8, 8192)
  per_device = sum(
      int(np.prod(a.shape)) * 2 // (4 * 8)
      for a, s in zip(abstract.keys + abstract.values,
                      specs.keys + specs.values))
  assert per_device * 32 == models.cache_bytes(mc, 8, 8192, jnp.bfloat16)
  # Fallbacks: 270M's single KV head on 'model'; 3 rows and 130 slots on 4.
  notes = gemma_layout.describe_cache(models.Gemma3_270M,
                                      {"data": 2, "model": 2}, "fsdp_tp", 4,
                                      1024)
  assert len(notes) == 18 and all("key/value heads" in n for n in notes)
  specs, notes = gemma_layout.cache_specs(models.Gemma3_270M, {"data": 4},
                                          "fsdp", 3, 130)
  assert set(specs.keys) == {P()} and len(notes) == 18
  # 3 rows on 4: the local layers' 512-slot rings split, the global 1026 not.
  specs, notes = gemma_layout.cache_specs(models.Gemma3_270M, {"data": 4},
                                          "fsdp", 3, 1026)
  sizes = models.layer_sizes(models.Gemma3_270M, 1026)
  assert [s == P(None, "data") for s in specs.keys] == [
      n == 512 for n in sizes]
  assert len(notes) == sizes.count(1026) == 3


@pytest.fixture(scope="module")
def decode_27b(tmp_path_factory):
  return _run_worker("decode27b", tmp_path_factory.mktemp("decode27b"),
                     {"XLA_FLAGS": None})


def test_27b_decode_step_compiles_within_its_shards(decode_27b):
  """The Gemma 3 27B decode step (bf16 weights 'fsdp_tp' and a bf16 cache,
  batch 8, context 8192, laid out over a 1 x 8 mesh of simulated devices)
  lowers and compiles; per device it holds the exact shards of the weights
  (closed form / 8) and of the cache (`cache_bytes` / 8) and needs at most
  2% more besides the float32 logits and two copies of the unembedding's
  shard of the embedding table (the CPU backend re-lays it for its dot;
  how often depends on how the unembedding is written)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from gemscope_jax import models  # pylint: disable=import-outside-toplevel

  r = decode_27b
  mc = models.Gemma3_27B
  norms = mc.num_layers * (4 * mc.d_model + 2 * mc.head_dim) + mc.d_model
  weights = 2 * ((mc.num_params() - norms) // 8 + norms)
  cache = models.cache_bytes(mc, 8, 8192, jnp.bfloat16) // 8
  assert r["gemma_param_bytes"] == weights
  assert r["cache_bytes"] == cache + 4 + 4 * 8  # + length, start
  embedding_shard = 2 * mc.vocab_size * mc.d_model // 8
  logits = 4 * 8 * mc.vocab_size
  bound = 1.02 * (weights + cache) + 2 * embedding_shard + logits
  assert weights + cache <= r["step_bytes"] <= bound, (r, bound)


if __name__ == "__main__":
  if sys.argv[1] == "generate":
    _generate_worker(sys.argv[2])
  elif sys.argv[1] == "decode27b":
    _decode27b_worker(sys.argv[2])
  else:
    _worker(sys.argv[1])
