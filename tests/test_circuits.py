"""Attribution graphs (gemscope_jax.circuits): the replacement model, exact
edges, completeness, feature selection, pruning and scores, save/load, JSON.

A tiny random Gemma 3 (3 layers, one global, a sliding window of 3 so local
masks matter, random norm scales) with random JumpReLU transcoders (with and
without affine skip) and a random CLT whose thresholds sit at the 80th
percentile of their pre-activations on the prompt (about 20% fire).
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemscope_jax import circuits, interop, models
from gemscope_jax.circuits import _graph, _host_pass, _prune, _replacement

TINY = models.Gemma3Config(
    name="tiny_circuits", num_layers=3, d_model=32, mlp_dim=64, num_heads=2,
    num_kv_heads=1, head_dim=16, vocab_size=97, sliding_window=3,
    global_every=2)
TOKENS = np.array([2, 5, 17, 33, 8, 61, 40], np.int32)
WIDTH = 40
run_linear = jax.jit(_replacement.run_linear)


@pytest.fixture(scope="module")
def tiny():
  rng = np.random.default_rng(0)
  # NumPy draws in abstract_params' shapes (init_params is slow); norm
  # scales random too, so every frozen gain is exercised.
  params = jax.tree.map(
      lambda s: rng.normal(0, 0.3 if len(s.shape) > 1 else 0.2,
                           s.shape).astype(s.dtype),
      models.abstract_params(TINY))
  out = models.forward(params, TOKENS[None], config=TINY, hookpoints=[
      f"layer_{l}/mlp_in" for l in range(TINY.num_layers)])
  x = [np.asarray(out.activations[f"layer_{l}/mlp_in"][0])
       for l in range(TINY.num_layers)]
  return params, x, np.asarray(out.logits[0, -1])


def _transcoders(x, skip: bool, seed: int = 1):
  rng = np.random.default_rng(seed)
  d = TINY.d_model
  out = {}
  for l, xl in enumerate(x):
    w_enc = (rng.normal(size=(d, WIDTH)) / np.sqrt(d)).astype(np.float32)
    b_enc = rng.normal(size=WIDTH).astype(np.float32) * 0.1
    thr = np.quantile(xl @ w_enc + b_enc, 0.8, axis=0)
    out[l] = interop.InferenceDictionary(
        w_enc=w_enc, w_dec=rng.normal(size=(WIDTH, d)) * 0.3, b_enc=b_enc,
        b_dec=rng.normal(size=d) * 0.1, threshold=thr,
        affine_skip=rng.normal(size=(d, d)) * 0.1 if skip else None)
  return out


def _clt(x, seed: int = 2):
  rng = np.random.default_rng(seed)
  n, d = TINY.num_layers, TINY.d_model
  w_enc = (rng.normal(size=(n, d, WIDTH)) / np.sqrt(d)).astype(np.float32)
  b_enc = rng.normal(size=(n, WIDTH)) * 0.1
  thr = np.stack([np.quantile(x[l] @ w_enc[l] + b_enc[l], 0.8, axis=0)
                  for l in range(n)])
  w_dec = rng.normal(size=(n, WIDTH, n, d)) * 0.2
  w_dec *= np.triu(np.ones((n, n)))[:, None, :, None]  # source <= output
  return interop.MultiLayerInference(
      kind="clt", w_enc=w_enc, w_dec=w_dec, b_enc=b_enc,
      b_dec=rng.normal(size=(n, d)) * 0.1, threshold=thr)


KINDS = ("transcoders", "skip_transcoders", "clt")


def _dicts(kind, x):
  if kind == "clt":
    return _clt(x)
  return _transcoders(x, skip=kind == "skip_transcoders")


@pytest.fixture(scope="module", params=KINDS)
def case(request, tiny):
  params, x, logits = tiny
  dicts = _dicts(request.param, x)
  rep = _replacement.build(params, TINY, TOKENS, dicts)
  graph = circuits.attribute(TOKENS, dicts, TINY, params, batch_size=64)
  return request.param, rep, graph, logits


def _values(rep, graph, mlp_in, final):
  """Each node's target quantity in a run of the linear model: feature
  pre-activation without b_enc, demeaned logit; 0 for tokens and errors."""
  mlp_in, final = np.asarray(mlp_in, np.float64), np.asarray(final, np.float64)
  out = np.zeros(graph.num_nodes)
  for i in np.nonzero(graph.kind == _graph.FEATURE)[0]:
    l, p, f = graph.layer[i], graph.position[i], graph.latent[i]
    out[i] = mlp_in[l, p] @ rep.dicts.w_enc[l][:, f]
  emb = np.asarray(rep.embedding, np.float64)
  logit = graph.kind == _graph.LOGIT
  out[logit] = (emb[graph.latent[logit]] - emb.mean(0)) @ final
  return out


def test_replacement_reproduces_logits(case):
  kind, rep, graph, logits = case
  n_latents = TINY.num_layers * (len(TOKENS) - 1) * WIDTH
  assert 0.1 < len(rep.features) / n_latents < 0.3
  assert (rep.features[:, 1] >= 1).all()          # no BOS features
  mlp_in, final = run_linear(rep.frozen, rep.clean["embed"], rep.writes())
  np.testing.assert_allclose(np.asarray(rep.logits(final)), logits,
                             atol=2e-5 * np.abs(logits).max())
  np.testing.assert_allclose(mlp_in, rep.clean["mlp_in"], atol=1e-5)
  # Without the error nodes the replacement does not reproduce them.
  _, off = run_linear(rep.frozen, rep.clean["embed"],
                      rep.writes(error_scale=np.zeros((3, len(TOKENS)))))
  assert np.abs(np.asarray(rep.logits(off)) - logits).max() > 1e-2


def _assert_same_pass(got, want, rtol: float):
  """Two clean passes' (frozen, clean) agree field by field, each within
  rtol of its largest value."""
  (f_got, c_got), (f_want, c_want) = got, want
  pairs = [(n, getattr(f_got, n), getattr(f_want, n)) for n in (
      "g_pre_attn", "g_post_attn", "g_pre_ffw", "g_final", "probs", "w_v",
      "w_o", "skip")]
  pairs += [(n, c_got[n], c_want[n]) for n in c_want]
  for name, a, b in pairs:
    b = np.asarray(b)
    assert np.asarray(a).shape == b.shape, name
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max(),
                               err_msg=name)


def test_host_pass_equals_the_jitted_pass(tiny):
  """The clean pass in NumPy (`_host_pass`, no compile) computes what the
  jitted programs do, to float32 rounding, local masks included (a window
  of 3 on 7 tokens); its logits are the model's own; `freeze_shapes`
  gives the jitted pass's shapes without tracing; a bfloat16 embedding
  table is left to the jitted pass."""
  params, _, logits = tiny
  d = TINY.d_model
  skip = jax.device_put(np.random.default_rng(3).normal(
      size=(TINY.num_layers, d, d)).astype(np.float32))
  assert _host_pass.usable(params)
  fields, clean = _host_pass.freeze(params, TINY, TOKENS)
  host = (_replacement.Frozen(**fields, skip=skip), clean)
  jitted = _replacement.freeze(params, TINY, TOKENS, skip)
  _assert_same_pass(host, jitted, 2e-6)
  np.testing.assert_allclose(host[1]["logits"][TOKENS[-1]],
                             logits[TOKENS[-1]], rtol=1e-5)
  np.testing.assert_allclose(host[1]["logits"], logits,
                             atol=1e-5 * np.abs(logits).max())
  shape_of = lambda tree: jax.tree.map(  # noqa: E731
      lambda s: (tuple(s.shape), np.dtype(s.dtype)), tree)
  _, lowered = _replacement.lower_freeze(params, TINY, len(TOKENS), skip.shape)
  assert shape_of(_replacement.freeze_shapes(
      TINY, len(TOKENS), skip.shape)) == shape_of(lowered)
  bf16 = jax.tree.map(lambda w: jnp.asarray(w, jnp.bfloat16), params)
  assert not _host_pass.usable(bf16)


def test_backward_is_the_vjp_of_the_linear_model(case):
  """The hand-written transpose equals `jax.vjp(run_linear)` row by row,
  for feature rows at every layer and logit rows, and for a batch whose
  highest row sits below the top layer (the layers above are skipped)."""
  _, rep, _, _ = case
  L, T, D = rep.errors.shape
  rng = np.random.default_rng(7)
  zeros = jnp.zeros((L, T, D), jnp.float32)
  _, vjp = jax.vjp(functools.partial(_replacement.run_linear, rep.frozen),
                   rep.clean["embed"], zeros)
  backward = jax.jit(_replacement.backward)
  for layers in ([0, 1, 2, 0, 2, 1], [0, 1, 0, 1], [0, 0, 0]):
    r = len(layers)
    layer = np.asarray(layers, np.int32)
    pos = rng.integers(0, T, r).astype(np.int32)
    read = rng.normal(size=(r, D)).astype(np.float32)
    final = np.zeros((r, D), np.float32)
    if max(layers) == L - 1:  # the last row is a logit row
      final[-1], read[-1] = rng.normal(size=D), 0.0
    g_e, g_w = backward(rep.frozen, layer, pos, read, final)
    for i in range(r):
      want_e, want_w = vjp((zeros.at[layer[i], pos[i]].set(read[i]),
                            jnp.asarray(final[i])))
      scale = max(np.abs(want_w).max(), np.abs(want_e).max())
      np.testing.assert_allclose(g_e[i], want_e, atol=1e-5 * scale)
      np.testing.assert_allclose(g_w[:, i], want_w, atol=1e-5 * scale)
      # nothing flows back to a feature row from its own layer or above
      if not final[i].any():
        assert not np.asarray(g_w[layer[i]:, i]).any()


def test_every_kind_of_edge_is_exact(case):
  """Doubling one source in the frozen linear model changes every target by
  exactly A[:, source] (feature, error and token sources; feature and logit
  targets)."""
  kind, rep, graph, _ = case
  n_feat = graph.num_features
  assert n_feat == len(rep.features)      # all active features are nodes
  np.testing.assert_array_equal(graph.layer[:n_feat], rep.features[:, 0])
  base = _values(rep, graph, *run_linear(rep.frozen, rep.clean["embed"],
                                         rep.writes()))
  scale = np.abs(base).max()
  rng = np.random.default_rng(3)
  L, T = TINY.num_layers, len(TOKENS)
  checked = {"feature": 0, "error": 0, "token": 0}
  # features of the first layers (they have feature targets downstream)
  early = np.nonzero(rep.features[:, 0] < L - 1)[0]
  for s in rng.choice(early, 5, replace=False):
    fs = np.ones(n_feat, np.float32)
    fs[s] = 2.0
    new = _values(rep, graph, *run_linear(
        rep.frozen, rep.clean["embed"], rep.writes(feature_scale=fs)))
    np.testing.assert_allclose(new - base, graph.adjacency[:, s],
                               atol=1e-5 * scale)
    assert np.abs(graph.adjacency[:, s]).max() > 1e-3
    checked["feature"] += 1
  for l, p in [(0, 0), (0, 3), (1, 5), (L - 1, T - 1), (1, 2)]:
    es = np.ones((L, T), np.float32)
    es[l, p] = 2.0
    new = _values(rep, graph, *run_linear(
        rep.frozen, rep.clean["embed"], rep.writes(error_scale=es)))
    col = n_feat + l * T + p
    assert graph.kind[col] == _graph.ERROR
    assert (graph.layer[col], graph.position[col]) == (l, p)
    np.testing.assert_allclose(new - base, graph.adjacency[:, col],
                               atol=1e-5 * scale)
    checked["error"] += 1
  for p in range(T):
    embed = rep.clean["embed"].at[p].multiply(2.0)
    new = _values(rep, graph, *run_linear(rep.frozen, embed, rep.writes()))
    col = n_feat + L * T + p
    assert graph.kind[col] == _graph.TOKEN
    np.testing.assert_allclose(new - base, graph.adjacency[:, col],
                               atol=1e-5 * scale)
    checked["token"] += 1
  # every kind of edge was nonzero somewhere: into features and into logits
  feat_rows = graph.kind == _graph.FEATURE
  logit_rows = graph.kind == _graph.LOGIT
  for rows in (feat_rows, logit_rows):
    for kind_ in (_graph.FEATURE, _graph.ERROR, _graph.TOKEN):
      block = graph.adjacency[np.ix_(rows, graph.kind == kind_)]
      assert np.abs(block).max() > 1e-3
  assert checked == {"feature": 5, "error": 5, "token": T}


@pytest.mark.parametrize("budget", [None, 60])
def test_prefix_buckets_give_the_same_graph(case, tiny, budget, monkeypatch):
  """Rows run on the prompt prefix up to their position (buckets 2, 4, 7
  here instead of 64, 128, ...) give the graph the whole prompt gives."""
  from gemscope_jax.circuits import _attribute
  kind, _, _, _ = case
  params, x, _ = tiny
  dicts = _dicts(kind, x)
  kw = dict(batch_size=4, max_feature_nodes=budget, update_interval=1)
  whole = circuits.attribute(TOKENS, dicts, TINY, params, **kw)
  monkeypatch.setattr(_attribute, "_MIN_PREFIX", 2)
  assert [_attribute.prefix_bucket(n, 7) for n in (1, 2, 3, 5, 7)] == [
      2, 2, 4, 7, 7]
  cut = circuits.attribute(TOKENS, dicts, TINY, params, **kw)
  assert cut.node_ids() == whole.node_ids()
  assert (cut.position[cut.kind == _graph.FEATURE] < 4).any()  # cut rows
  np.testing.assert_allclose(cut.adjacency, whole.adjacency, atol=1e-6)
  np.testing.assert_allclose(cut.bias, whole.bias, atol=1e-6)


def test_small_batches_give_the_same_graph(case, tiny, monkeypatch):
  """A batch padded to the smallest power of two that holds its rows (a
  lone logit row, a round's last few rows) gives the edges a full padded
  batch gives; the padding rule follows its cost model."""
  from gemscope_jax.circuits import _attribute
  pad = _attribute._padded_size
  work = _attribute._COMPILE_WORK
  # A lone row on 256 tokens through 18 layers saves more than a compile;
  # on 6 tokens it does not, until that size has been compiled.
  assert pad(1, 16, 256, 18, set()) == 1
  assert pad(3, 16, 256, 18, set()) == 4
  assert pad(1, 64, 6, 18, set()) == 64
  assert pad(1, 64, 6, 18, {(1, 6)}) == 1
  assert pad(9, 16, 256, 1, set()) == 16   # one layer: not worth it
  assert pad(20, 16, 256, 18, set()) == 16
  seen = set()
  size = pad(5, 64, 64, 18, seen)
  assert size == (8 if 56 * 64 * 18 >= work else 64) and (size, 64) in seen
  kind, _, _, _ = case
  params, x, _ = tiny
  dicts = _dicts(kind, x)
  kw = dict(batch_size=8, max_feature_nodes=30, update_interval=1)
  # The jitted rows (the NumPy rows on a CPU backend compile nothing).
  monkeypatch.setattr(_attribute, "_host_rows", lambda params: False)
  monkeypatch.setattr(_attribute, "_COMPILE_WORK", 10**12)
  monkeypatch.setattr(_attribute, "_COMPILED_SIZES", set())
  full = circuits.attribute(TOKENS, dicts, TINY, params, **kw)
  monkeypatch.setattr(_attribute, "_COMPILE_WORK", 0)
  sizes = []
  real = _attribute._rows

  def record(*args):
    sizes.append(args[5].shape[0])
    return real(*args)
  monkeypatch.setattr(_attribute, "_rows", record)
  small = circuits.attribute(TOKENS, dicts, TINY, params, **kw)
  assert min(sizes) < 8  # some batch ran unpadded
  assert small.node_ids() == full.node_ids()
  np.testing.assert_allclose(small.adjacency, full.adjacency, atol=1e-6)
  np.testing.assert_allclose(small.bias, full.bias, atol=1e-6)



def test_rounds_keep_their_size_when_batches_shrink(tiny, monkeypatch):
  """Features are re-ranked every update_interval * batch_size rows, as
  circuit-tracer's queue does, also when a long prompt's batches hold
  fewer rows (memory cap): the same features are chosen, with the same
  edges, and the number of rankings does not grow with the prompt."""
  from gemscope_jax.circuits import _attribute
  params, x, _ = tiny
  dicts = _transcoders(x, skip=True)
  kw = dict(batch_size=8, max_feature_nodes=20, update_interval=1)
  calls = []
  real = _attribute._partial_influence

  def counted(*args, **kwargs):
    calls.append(len(args[1]))
    return real(*args, **kwargs)
  monkeypatch.setattr(_attribute, "_partial_influence", counted)
  full = circuits.attribute(TOKENS, dicts, TINY, params, **kw)
  rankings = len(calls)
  # logit rows, then rounds of 8, 8 and 4 features: three rankings
  assert rankings == 3
  monkeypatch.setattr(_attribute, "_BATCH_BYTES", 1)  # one row a batch
  assert _attribute.rows_per_batch(8, TINY.num_layers, len(TOKENS),
                                   TINY.d_model) == 1
  calls.clear()
  capped = circuits.attribute(TOKENS, dicts, TINY, params, **kw)
  assert len(calls) == rankings
  assert capped.node_ids() == full.node_ids()
  np.testing.assert_allclose(capped.adjacency, full.adjacency, atol=1e-6)


@pytest.mark.parametrize("budget", [None, 12])
def test_host_rows_equal_the_jitted_rows(case, tiny, budget, monkeypatch):
  """On a CPU backend the rows run in NumPy (`_host_pass.backward_rows`,
  `feature_edges`); elsewhere, as the jitted programs. Both give the same
  graph (the exactness tests above check the NumPy one) for transcoders
  with and without skips and for a CLT, with a feature budget and with
  prefix buckets shorter than the prompt; and the NumPy rows' gradients
  are `_replacement.backward`'s, row by row."""
  from gemscope_jax.circuits import _attribute
  kind, rep, _, _ = case
  params, x, _ = tiny
  dicts = _dicts(kind, x)
  monkeypatch.setattr(_attribute, "_MIN_PREFIX", 2)
  kw = dict(batch_size=6, max_feature_nodes=budget, update_interval=1)
  assert _attribute._host_rows(params)  # a CPU backend, float32 weights
  host = circuits.attribute(TOKENS, dicts, TINY, params, **kw)
  monkeypatch.setattr(_attribute, "_host_rows", lambda params: False)
  jitted = circuits.attribute(TOKENS, dicts, TINY, params, **kw)
  assert host.node_ids() == jitted.node_ids()
  scale = np.abs(jitted.adjacency).max()
  np.testing.assert_allclose(host.adjacency, jitted.adjacency,
                             atol=1e-6 * scale)
  np.testing.assert_allclose(host.bias, jitted.bias, atol=1e-6 * scale)
  # The gradients themselves, for feature rows and a logit row.
  L, T, D = rep.errors.shape
  rows = np.arange(0, len(rep.features), max(1, len(rep.features) // 5))
  layer = np.append(rep.features[rows, 0], L - 1).astype(np.int32)
  pos = np.append(rep.features[rows, 1], 0).astype(np.int32)
  read = np.stack([rep.dicts.w_enc[l][:, f] for l, _, f in
                   rep.features[rows]] + [np.zeros(D)]).astype(np.float32)
  final = np.zeros_like(read)
  final[-1] = np.asarray(rep.embedding)[3] - rep.embedding_mean
  frozen, embed, errors = _attribute._host_prefix(rep, T)
  g_w, err, tok, bias = _host_pass.backward_rows(
      frozen, embed, errors, rep.dicts.b_dec, layer, pos, read, final)
  want = _attribute._backward_rows(rep.frozen, rep.clean["embed"],
                                   rep.errors, rep.dicts.b_dec, layer, pos,
                                   read, final)
  for got, ref in zip((g_w.transpose(0, 2, 1, 3), err, tok, bias), want):
    ref = np.asarray(ref)
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())

# Prompts of one length; with blocks of 4 features, their feature blocks
# number differently but fall in the same buckets (see the test).
_SAME_LENGTH = ([2, 5, 17, 33, 8, 61, 40], [2, 5, 17, 9, 34, 61, 40],
                [2, 7, 17, 33, 8, 60, 41], [2, 50, 51, 52, 53, 54, 55])


@pytest.mark.parametrize("kind", ["skip_transcoders", "clt"])
def test_block_buckets_pad_without_changing_the_graph(tiny, kind,
                                                       monkeypatch):
  """Feature blocks padded to buckets give the exact graph, and a prompt of
  the same length with other block counts in the same buckets reuses the
  compiled program instead of compiling its own."""
  from gemscope_jax.circuits import _attribute, _replacement
  sizes = [_attribute.block_bucket(n) for n in range(1, 3000)]
  assert sizes[:16] == [16] * 16 and sizes[16] == 20 and sizes[32] == 40
  assert all(n <= b <= max(16, 1.25 * n) for n, b in enumerate(sizes, 1))
  params, x, _ = tiny
  dicts = _dicts(kind, x)
  # Blocks of 4 features, so that block counts vary between prompts; the
  # jitted rows, whose blocks these are.
  monkeypatch.setattr(_attribute, "_BLOCK", 4)
  monkeypatch.setattr(_attribute, "_host_rows", lambda params: False)

  def blocks(tokens):
    rep = _replacement.build(params, TINY, tokens, dicts)
    groups = _attribute._Blocks(rep).for_prefix(len(tokens))[0]
    return tuple(len(g[1]) for g in groups)

  prompts = [np.array(t, np.int32) for t in _SAME_LENGTH]
  padded = [blocks(t) for t in prompts]
  with monkeypatch.context() as m:
    m.setattr(_attribute, "block_bucket", lambda n: n)
    exact = [blocks(t) for t in prompts]
  a, b = next((i, j) for i in range(len(prompts)) for j in range(i)
              if padded[i] == padded[j] and exact[i] != exact[j])
  graph = circuits.attribute(prompts[a], dicts, TINY, params, batch_size=4)
  programs = lambda: (_attribute._backward_rows._cache_size(),  # noqa: E731
                      _attribute._feature_rows._cache_size())
  compiled = programs()
  circuits.attribute(prompts[b], dicts, TINY, params, batch_size=4)
  assert programs() == compiled
  monkeypatch.setattr(_attribute, "block_bucket", lambda n: n)
  unpadded = circuits.attribute(prompts[a], dicts, TINY, params,
                                batch_size=4)
  assert graph.node_ids() == unpadded.node_ids()
  np.testing.assert_allclose(graph.adjacency, unpadded.adjacency, atol=1e-6)


def test_completeness(case):
  """With every source a node, each row's edges plus its bias (the b_dec
  terms propagated through the frozen model) sum to its value: a logit's
  demeaned logit, a feature's pre-activation without b_enc."""
  kind, rep, graph, logits = case
  rows = (graph.kind == _graph.FEATURE) | (graph.kind == _graph.LOGIT)
  total = graph.adjacency.sum(axis=1) + graph.bias
  np.testing.assert_allclose(total[rows], graph.value[rows],
                             atol=2e-5 * np.abs(graph.value).max())
  logit_nodes = graph.kind == _graph.LOGIT
  np.testing.assert_allclose(
      graph.value[logit_nodes],
      (logits - logits.mean())[graph.logit_tokens], rtol=1e-5, atol=1e-5)
  # the targets: likeliest tokens to 0.95 probability, at most 10
  p = np.exp(logits - logits.max())
  p /= p.sum()
  top = np.argsort(-p)
  np.testing.assert_array_equal(graph.logit_tokens,
                                top[:len(graph.logit_tokens)])
  assert len(graph.logit_tokens) == 10 or (
      p[graph.logit_tokens].sum() >= 0.95 > p[graph.logit_tokens[:-1]].sum())


def test_feature_budget_and_targets(tiny):
  params, x, _ = tiny
  dicts = _transcoders(x, skip=True)
  full = circuits.attribute(TOKENS, dicts, TINY, params, batch_size=16)
  small = circuits.attribute(TOKENS, dicts, TINY, params, batch_size=16,
                             max_feature_nodes=20, update_interval=1,
                             target_tokens=[3, 7])
  assert small.num_features == 20
  assert small.num_nodes == 20 + 3 * len(TOKENS) + len(TOKENS) + 2
  np.testing.assert_array_equal(small.logit_tokens, [3, 7])
  # the same edges among the nodes both graphs hold
  ids_full = {n: i for i, n in enumerate(full.node_ids())}
  idx = [ids_full[n] for n in small.node_ids()[:-2]]
  np.testing.assert_allclose(small.adjacency[:20, :-2],
                             full.adjacency[np.ix_(idx[:20], idx)],
                             atol=1e-6)
  # the kept features have the largest influence among the first ranks:
  # each kept feature has an edge path to a logit
  b = _prune.normalize(small.adjacency)
  infl = _prune.influence(b, _prune.logit_weights(small))
  assert (infl[:20] > 0).all()


def _hand_graph():
  """f0, f1, e0, t0, t1, logit (p = 0.5); A[target, source]."""
  a = np.zeros((6, 6), np.float32)
  a[0, 3], a[0, 4] = 2.0, -2.0           # f0 <- t0, t1
  a[1, 0], a[1, 3] = 1.0, 3.0            # f1 <- f0, t0
  a[5, 1], a[5, 2], a[5, 4] = 6.0, -2.0, 2.0   # logit <- f1, e0, t1
  n = 6
  return _graph.Graph(
      tokens=np.array([2, 9], np.int32),
      kind=np.array([0, 0, 1, 2, 2, 3], np.int8),
      layer=np.array([0, 1, 0, -1, -1, 2], np.int32),
      position=np.array([1, 1, 1, 0, 1, 1], np.int32),
      latent=np.array([4, 7, -1, 2, 9, 11], np.int32),
      activation=np.ones(n, np.float32), value=np.zeros(n, np.float32),
      bias=np.zeros(n, np.float32), adjacency=a,
      logit_tokens=np.array([11], np.int32),
      logit_probabilities=np.array([0.5], np.float32),
      metadata={"num_layers": 2})


def test_influence_pruning_and_scores_by_hand():
  g = _hand_graph()
  infl = circuits.node_influence(g)
  # closed form: w ((I - B)^-1 - I)
  b = _prune.normalize(g.adjacency)
  w = np.array([0, 0, 0, 0, 0, 0.5])
  closed = w @ (np.linalg.inv(np.eye(6) - b) - np.eye(6))
  np.testing.assert_allclose(infl, closed, atol=1e-12)
  np.testing.assert_allclose(infl, [0.075, 0.3, 0.1, 0.2625, 0.1375, 0],
                             atol=1e-12)
  # nodes to 0.75 of 0.875: f1, t0, t1 (+ tokens and logit always)
  node_mask, edge_mask = circuits.prune(g, node_threshold=0.75,
                                        edge_threshold=0.98)
  np.testing.assert_array_equal(node_mask, [0, 1, 0, 1, 1, 1])
  kept = {(int(t), int(s)) for t, s in zip(*np.nonzero(edge_mask))}
  assert kept == {(5, 1), (1, 3), (5, 4)}
  # edge scores .375 (logit<-f1), .375 (f1<-t0), .125 (logit<-t1)
  node_mask, edge_mask = circuits.prune(g, node_threshold=0.75,
                                        edge_threshold=0.8)
  kept = {(int(t), int(s)) for t, s in zip(*np.nonzero(edge_mask))}
  assert kept == {(5, 1), (1, 3)}
  np.testing.assert_array_equal(node_mask, [0, 1, 0, 1, 1, 1])
  # a feature whose only input is pruned away goes too
  node_mask, _ = circuits.prune(g, node_threshold=0.3, edge_threshold=0.98)
  np.testing.assert_array_equal(node_mask, [0, 1, 0, 1, 1, 1])
  replacement, completeness = circuits.scores(g)
  assert replacement == pytest.approx(0.4 / 0.5)
  assert completeness == pytest.approx((1.375 - 0.2 * 0.5) / 1.375)


def test_partial_influence_is_the_influence_through_computed_rows():
  """`_partial_influence` on a random acyclic graph where only some nodes'
  rows are computed equals w ((I - B)^-1 - I) of the square matrix that
  holds those rows (and zeros for every other node)."""
  from gemscope_jax.circuits import _attribute
  rng = np.random.default_rng(0)
  n = 300                          # nodes in topological order; 5 logits last
  row_node = np.concatenate([np.arange(n - 5, n),
                             rng.choice(n - 5, 120, replace=False)])
  matrix = np.zeros((len(row_node), n), np.float32)
  for i, t in enumerate(row_node):   # edges only from earlier nodes
    src = rng.choice(t, min(t, 40), replace=False)
    matrix[i, src] = rng.normal(size=len(src))
  matrix[7] = 0.0                    # a row with no edges stays 0
  weights = np.zeros(n)
  weights[n - 5:] = rng.dirichlet(np.ones(5))
  square = np.zeros((n, n))
  square[row_node] = matrix
  b = _prune.normalize(square)
  closed = weights @ (np.linalg.inv(np.eye(n) - b) - np.eye(n))
  got = _attribute._partial_influence(matrix, row_node, weights, chunk=32)
  # The last pass over the rows is float32 (it only ranks features).
  np.testing.assert_allclose(got, closed, rtol=2e-6, atol=1e-9)
  assert (got[row_node[5:]] > 0).any()
  sums = np.abs(matrix.astype(np.float64)).sum(axis=1)  # the caller's sums
  np.testing.assert_allclose(
      _attribute._partial_influence(matrix, row_node, weights, sums), got,
      rtol=1e-6)


def test_save_load_and_json(case, tmp_path):
  kind, rep, graph, _ = case
  graph.token_strings = [f"t{t}" for t in graph.tokens]
  graph.prompt = "a prompt"
  path = graph.save(tmp_path / "g.npz")
  back = circuits.Graph.load(path)
  for name in _graph._ARRAYS:
    a, b = getattr(graph, name), getattr(back, name)
    assert a.dtype == b.dtype and np.array_equal(a, b), name
  assert (back.prompt, back.token_strings, back.metadata) == (
      graph.prompt, graph.token_strings, graph.metadata)
  ids = graph.node_ids()
  assert len(set(ids)) == len(ids)
  data = json.loads(json.dumps(circuits.to_json(graph, slug="t")))
  node_ids = [n["node_id"] for n in data["nodes"]]
  assert len(set(node_ids)) == len(node_ids)
  assert {l["source"] for l in data["links"]} <= set(node_ids)
  assert {l["target"] for l in data["links"]} <= set(node_ids)
  meta = data["metadata"]
  assert meta["schema_version"] == 1 and meta["prompt"] == "a prompt"
  assert meta["prompt_tokens"] == graph.token_strings
  assert 0 < meta["replacement_score"] <= 1
  assert 0 < meta["completeness_score"] <= 1
  kinds = {n["feature_type"] for n in data["nodes"]}
  assert {"embedding", "logit"} <= kinds
  logit_nodes = [n for n in data["nodes"] if n["is_target_logit"]]
  assert len(logit_nodes) == len(graph.logit_tokens)
  assert all(n["layer"] == str(TINY.num_layers + 1) for n in logit_nodes)


@pytest.mark.slow
def test_real_model_replacement(real_model):
  """Random transcoders at all 18 layers of the real 270M (thresholds at the
  85th percentile of pre-activations on the prompt): the replacement
  reproduces the real logits, and logit rows are complete."""
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  tok = default_tokenizer()
  tokens = np.asarray(tok.encode("The capital of France is"), np.int32)
  L, d = config.num_layers, config.d_model
  out = models.forward(params, tokens[None], config=config, hookpoints=[
      f"layer_{l}/mlp_in" for l in range(L)])
  rng = np.random.default_rng(0)
  width = 256
  dicts = {}
  for l in range(L):
    x = np.asarray(out.activations[f"layer_{l}/mlp_in"][0])
    w_enc = rng.normal(size=(d, width)).astype(np.float32) / np.sqrt(d)
    w_enc /= x.std() + 1e-6
    thr = np.quantile(x[1:] @ w_enc, 0.85, axis=0)
    dicts[l] = interop.InferenceDictionary(
        w_enc=w_enc, w_dec=rng.normal(size=(width, d)) * 0.05,
        b_enc=np.zeros(width), b_dec=rng.normal(size=d) * 0.01,
        threshold=thr, affine_skip=rng.normal(size=(d, d)) * 0.01)
  rep = _replacement.build(params, config, tokens, dicts)
  _, final = run_linear(rep.frozen, rep.clean["embed"], rep.writes())
  real = np.asarray(out.logits[0, -1])
  # The clean pass in NumPy (the one `build` takes here) is the jitted one.
  skip = jax.device_put(rep.dicts.skip)
  _assert_same_pass((rep.frozen, rep.clean),
                    _replacement.freeze(params, config, tokens, skip), 2e-5)
  np.testing.assert_allclose(np.asarray(rep.logits(final)), real,
                             atol=1e-4 * np.abs(real).max())
  start = time.perf_counter()
  graph = circuits.attribute(tokens, dicts, config, params, tokenizer=tok,
                             max_feature_nodes=200, batch_size=128)
  seconds = time.perf_counter() - start
  logit = graph.kind == _graph.LOGIT
  total = graph.adjacency[logit].sum(1) + graph.bias[logit]
  # only 200 of the active features are nodes: logit rows are complete
  # once the features left out are added back (their columns).
  assert graph.num_features == 200
  assert np.isfinite(total).all()
  print(f"real 270M, {len(tokens)} tokens, "
        f"{graph.metadata['n_active_features']} active: {seconds:.1f} s")


@pytest.mark.slow
def test_cli_attribute_writes_the_library_graph(real_model, tmp_path,
                                                capsys):
  """`gemscope attribute` over a folder of 18 Gemma Scope 2 transcoder
  folders writes the JSON that `to_json(attribute(...))` gives, and the
  viewer page embeds it unchanged."""
  import json
  from gemscope_jax import cli
  from gemscope_jax.circuits import sources, viewer
  from gemscope_jax.text.tokenizer import default_tokenizer
  config, params = real_model
  tok = default_tokenizer()
  prompt = "The capital of France is"
  tokens = np.asarray(tok.encode(prompt), np.int32)
  L, d, width = config.num_layers, config.d_model, 128
  out = models.forward(params, tokens[None], config=config, hookpoints=[
      f"layer_{l}/mlp_in" for l in range(L)], logits=False)
  rng = np.random.default_rng(3)
  root = tmp_path / "transcoders"
  for l in range(L):
    x = np.asarray(out.activations[f"layer_{l}/mlp_in"][0])
    w_enc = (rng.normal(size=(d, width)) / np.sqrt(d) / (x.std() + 1e-6)
             ).astype(np.float32)
    interop.save_gemmascope2(interop.InferenceDictionary(
        w_enc=w_enc, w_dec=(rng.normal(size=(width, d)) * 0.05).astype(
            np.float32), b_enc=np.zeros(width, np.float32),
        b_dec=np.zeros(d, np.float32),
        threshold=np.quantile(x[1:] @ w_enc, 0.85, axis=0).astype(
            np.float32), hookpoint=f"layer_{l}/mlp_in",
        hookpoint_out=f"layer_{l}/mlp_out"), root / f"layer_{l}",
                              release_layout=False)
  dicts = sources.load_dictionaries(str(root), config)
  assert sorted(dicts) == list(range(L))
  want = circuits.to_json(circuits.attribute(
      prompt, dicts, config, params, tokenizer=tok, max_feature_nodes=60,
      batch_size=64), slug="graph", tokenizer=tok)
  argv = ["attribute", "--prompt", prompt, f"--dictionaries={root}",
          "--max-feature-nodes=60", "--batch-size=64",
          f"--out={tmp_path / 'g.json'}", f"--html={tmp_path / 'g.html'}"]
  assert cli.main(argv) == 0
  assert "replacement score" in capsys.readouterr().out
  got = json.loads((tmp_path / "g.json").read_text())
  assert [n["node_id"] for n in got["nodes"]] == [
      n["node_id"] for n in want["nodes"]]
  np.testing.assert_allclose([l["weight"] for l in got["links"]],
                             [l["weight"] for l in want["links"]],
                             rtol=1e-5, atol=1e-6)
  assert viewer.read_html(tmp_path / "g.html") == got
  # A second run refuses to replace the outputs without --overwrite.
  assert cli.main(argv) == 4
