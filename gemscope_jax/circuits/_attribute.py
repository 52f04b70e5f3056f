"""`attribute`: the attribution graph of one prompt through transcoders/CLTs.

Edges are direct effects in the frozen linear model of
`_replacement.LocalReplacement`, where features are sources only (their
nonlinearity is not differentiated). A target row is a cotangent on the
model's read sites: a feature's encoder column (without b_enc) at its
`mlp_in` (layer, position), or a logit's demeaned unembedding
E[v] - mean_v E at the final-norm output of the last position. The
linear model transposed by hand (`_replacement.backward`, equal to its
`jax.vjp` row by row) takes a batch of such rows at once and gives each
row's gradient at every write site (the scaled embeddings, and each
layer's MLP output), and then
  feature edge = gradient . (activation * decoder row)   (summed over the
                 output layers a CLT latent writes to)
  error edge   = gradient . error vector
  token edge   = gradient . sqrt(d_model) * embedding row
  bias         = gradient . b_dec (every layer, every position)
so that a row's edges plus its bias sum to its value when every active
feature is a node (the linear model has no other constant).

When there are more active features than `max_feature_nodes`, features are
chosen as circuit-tracer does: logit rows first, then repeatedly the
unvisited features of highest partial influence (computed from the rows so
far) until the budget is spent.

Cost: a batch of R rows costs one backward pass through the layers up to
its highest row (`_replacement.backward`), on the prompt's prefix up to
its last row's position rounded up to 64, 128, 256, ... tokens
(`prefix_bucket`: a row's gradient is zero after its own position, so the
edges are the same); rows are sorted by prefix bucket, then layer, and a
batch short of its cap runs at the smallest power of two that holds it
when that saves more than a compile costs (`_padded_size`: a lone logit
row on a long prompt no longer carries 15 rows of padding through every
layer). Feature
edges are one (R, k * D) x (k * D, 32) product per block of 32 features
that share a layer and a position (R x features x D work, no gather of
gradients). Rows per batch shrink for long prefixes (`rows_per_batch`),
so memory grows linearly with prompt length: (rows, L, T, D) gradients of
one batch, plus the (rows, columns) edge matrix of the features kept.
On a CPU backend (float32 weights) the clean pass and the rows run in
NumPy (`_host_pass`: `freeze`, `backward_rows`, `feature_edges`), with
the same arithmetic and the same graph (tested against the jitted
programs), and nothing compiles: a short prompt's first call had spent
most of its time compiling, and at 64 and 256 tokens the NumPy rows run
as fast as the jitted ones (same-run timings on 2 cores: 12.3-13.3
against 13.5-14.9 s warm, and 52 against 53-54 s). Elsewhere the rows
are the jitted programs below, compiled in a thread while the clean pass
runs.

Feature selection re-ranks by partial influence in the computed rows'
own dimensions (`_partial_influence`), one pass over the rows per ranking,
every `update_interval * batch_size` rows whatever the prompt's length, so
that the number of rankings does not grow as long prompts' batches shrink.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import models
from gemscope_jax.circuits import _graph, _host_pass, _prune, _replacement

_HIGHEST = jax.lax.Precision.HIGHEST
# Feature edges are computed in blocks of this many features of one layer
# and one position (each (layer, position) group padded to a multiple).
_BLOCK = 32
# One batch of rows holds each row's gradient at every write site,
# (rows, L, T, D) floats, and about as much again inside the backward pass:
# rows per batch are capped so that this stays under _BATCH_BYTES, which
# keeps memory linear in prompt length.
_BATCH_BYTES = 512 << 20
# Batches smaller than their cap are padded to a power of two, and each
# (size, prefix) compiles `_backward_rows` once (`_padded_size`). A compile
# costs about as much as this much backward pass, in rows x tokens x
# layers: on 2 CPU cores 0.6-0.9 s, against about 25 us a unit (a batch of
# 21 rows on 256 tokens through 18 layers takes 2.4 s).
_COMPILE_WORK = 28_000
# The (rows, prefix) sizes `_backward_rows` has run at in this process:
# reusing one costs no compile.
_COMPILED_SIZES: set = set()
# The shortest prompt prefix a batch of rows runs on (`prefix_bucket`).
_MIN_PREFIX = 64


def rows_per_batch(batch_size: int, num_layers: int, num_tokens: int,
                   d_model: int) -> int:
  """Target rows per backward pass: `batch_size`, or fewer for a long
  prompt, so that a batch's gradients stay near _BATCH_BYTES."""
  per_row = 2 * num_layers * num_tokens * d_model * 4
  return int(max(1, min(batch_size, _BATCH_BYTES // per_row)))


def _feature_edges(g, w_dec, block_pos, rows, act):
  """Edges from a group of layers' features to R target rows.

  g: (L, R, T, D) the rows' gradients at every layer's write site;
  w_dec: (G * S, k, D) the decoders of the group's G layers, one after
  the other (a latent of model layer l writes layers l .. l + k - 1);
  per block of _BLOCK features: block_pos (B, 2) its (model layer,
  position), rows and act (B, _BLOCK) its latents' rows of w_dec and
  activations (padding has act 0). Returns (R, B * _BLOCK):
  act * sum_{k, d} g[layer + k, r, pos, d] * w_dec[row, k, d], one
  (R, k * D) x (k * D, _BLOCK) product per block (R x features x k x D).
  w_dec comes flat, as the caller holds it: a reshape here made XLA copy
  the whole stack into the loop's state on every call (47 MB for 18
  width-1024 transcoders).
  """
  r, d = g.shape[1], g.shape[3]
  k = w_dec.shape[1]

  def block(args):
    at, f, a = args
    grads = jax.lax.dynamic_slice(g, (at[0], 0, at[1], 0), (k, r, 1, d))
    vecs = jnp.take(w_dec, f, axis=0) * a[:, None, None]  # (C, k, D)
    return jnp.einsum("krd,ckd->rc", grads[:, :, 0], vecs,
                      precision=_HIGHEST)

  out = jax.lax.map(block, (block_pos, rows, act))  # (B, R, C)
  return jnp.swapaxes(out, 0, 1).reshape(r, -1)


@jax.jit
def _backward_rows(frozen, embed, errors, b_dec, layer, pos, read, final):
  """A batch of R target rows (`_replacement.backward`'s arguments; best
  sorted by layer, which sets the batch's cost) through the transposed
  model: (their gradients at every layer's write site (L, R, T, D), error
  edges (R, L * T), token edges (R, T), bias (R,)). Its program depends
  only on the prompt's length and R, so that it can compile while the
  clean pass runs (`_compile_in_background`)."""
  g_e, g_w = _replacement.backward(frozen, layer, pos, read, final)
  tok = jnp.einsum("rtd,td->rt", g_e, embed, precision=_HIGHEST)
  err = jnp.einsum("lrtd,ltd->rlt", g_w, errors, precision=_HIGHEST)
  bias = jnp.einsum("lrtd,ld->r", g_w, b_dec, precision=_HIGHEST)
  return g_w, err.reshape(err.shape[0], -1), tok, bias


@jax.jit
def _feature_rows(g_w, groups):
  """Feature edges (R, the groups' block slots) of the rows whose
  gradients `_backward_rows` gave; groups: the features in blocks, per
  group of layers whose decoders share a shape (`_Blocks`), as
  `_feature_edges` takes them."""
  feats = [_feature_edges(g_w, *group) for group in groups]
  return (jnp.concatenate(feats, axis=1) if feats
          else jnp.zeros((g_w.shape[1], 0), jnp.float32))


def _rows(frozen, embed, errors, b_dec, groups, layer, pos, read, final):
  """Edges of a batch of R target rows: (features, errors, tokens, bias)
  as `_backward_rows` and `_feature_rows` give them (two programs; JAX
  dispatches the second while the first runs)."""
  g_w, err, tok, bias = _backward_rows(frozen, embed, errors, b_dec, layer,
                                       pos, read, final)
  return _feature_rows(g_w, groups), err, tok, bias


def _on_prefix(frozen, embed, errors, prefix: int):
  """The linear model's inputs (`_backward_rows`' first three) cut to the
  first `prefix` positions."""
  if prefix >= embed.shape[0]:
    return frozen, embed, errors
  cut = slice(0, prefix)
  frozen = frozen.replace(g_pre_attn=frozen.g_pre_attn[:, cut],
                          g_post_attn=frozen.g_post_attn[:, cut],
                          g_pre_ffw=frozen.g_pre_ffw[:, cut],
                          probs=frozen.probs[..., cut, cut])
  return frozen, embed[cut], errors[:, cut]


def _host_rows(params) -> bool:
  """Whether the rows run in NumPy (`_host_pass.backward_rows`): where the
  clean pass does (a CPU backend, float32 weights)."""
  return _host_pass.usable(params)


def _host_prefix(rep, prefix: int):
  """`_on_prefix` for the host's rows: the linear model's inputs as NumPy
  views (no copy on a CPU backend), cut to the first `prefix` positions."""
  f = rep.frozen
  frozen = {name: None if getattr(f, name) is None
            else np.asarray(getattr(f, name))
            for name in ("g_pre_attn", "g_post_attn", "g_pre_ffw", "g_final",
                         "probs", "w_v", "w_o", "skip")}
  cut = slice(0, prefix)
  for name in ("g_pre_attn", "g_post_attn", "g_pre_ffw"):
    frozen[name] = frozen[name][:, cut]
  frozen["probs"] = frozen["probs"][..., cut, cut]
  return (frozen, np.asarray(rep.clean["embed"])[cut],
          np.asarray(rep.errors)[:, cut])


def _lower_backward(frozen, clean, sizes: Sequence[tuple[int, int]]) -> list:
  """`_backward_rows` lowered (traced, not compiled) for each (rows,
  prefix) of `sizes`, from the clean pass's output shapes."""
  L, T, D = frozen.g_pre_ffw.shape
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  errors = f32(L, T, D)
  out = []
  for size, prefix in sizes:
    cut = jax.eval_shape(functools.partial(_on_prefix, prefix=prefix),
                         frozen, clean["embed"], errors)
    i32 = jax.ShapeDtypeStruct((size,), jnp.int32)
    out.append(_backward_rows.lower(*cut, f32(L, D), i32, i32, f32(size, D),
                                    f32(size, D)))
  return out


def _compile_in_background(params, config, tokens, dicts,
                           sizes: Sequence[tuple[int, int]]
                           ) -> tuple[threading.Event, threading.Thread]:
  """Compiles in a thread, from shapes alone, the clean pass's programs
  (`_replacement.lower_freeze`) and then `_backward_rows` for each (rows,
  prefix) of `sizes` (the clean pass's output shapes are its inputs). XLA
  compiles without Python's lock: on a first call the caller does other
  work meanwhile, and the backward programs compile while the clean pass
  runs and its features are encoded. One after the other, not side by
  side: on 2 CPU cores the clean pass is the critical path, and it
  compiles in 0.6 s alone against 1.3 s beside the backward program (6
  tokens: first call 3.2 -> 2.8 s).

  `attribute` calls this only for jitted rows. Where those run beside a
  NumPy clean pass (`_host_pass`; on a CPU backend only when the jitted
  rows are forced, as the tests do) the clean pass needs no program, and
  the backward programs are traced here, before the thread starts
  (tracing is Python and holds Python's lock; XLA's compile does not), so
  the thread only compiles beside the NumPy pass; the pass's weights are
  prepared (`_host_pass.prepare`, once per model) after the thread starts.

  Returns (clean pass ready, thread): wait for the first before calling
  `freeze`, join the second before the batches that use these sizes. A
  compile that fails here is left to the call, which then raises the
  error where it belongs."""
  freeze_ready = threading.Event()
  skip_shape = None if dicts.skip is None else dicts.skip.shape
  lowered = None
  host = _host_pass.usable(params)
  if host:
    freeze_ready.set()
    try:
      lowered = _lower_backward(*_replacement.freeze_shapes(
          config, len(tokens), skip_shape), sizes)
    except Exception:  # pylint: disable=broad-except
      lowered = []  # the batches call `_backward_rows`, which raises it

  def compile_all():
    backward = lowered
    if backward is None:
      try:
        programs, shapes = _replacement.lower_freeze(
            params, config, len(tokens), skip_shape)
        for program in programs:
          program.compile()
      except Exception:  # pylint: disable=broad-except
        return  # `build` calls freeze, which raises it
      finally:
        freeze_ready.set()
      backward = _lower_backward(*shapes, sizes)
    for program in backward:
      program.compile()

  thread = threading.Thread(target=compile_all, daemon=True)
  thread.start()
  if host:
    _host_pass.prepare(params, config)
  return freeze_ready, thread


def _padded_size(rows: int, cap: int, num_tokens: int, layers: int,
                 compiled: set) -> int:
  """Rows a batch of `rows` is padded to: `cap`, or the smallest power of
  two that holds them when that size is already compiled for this prefix
  (`compiled`, a set of (size, num_tokens) that this records into) or when
  the padding it saves, (cap - size) x num_tokens x `layers` (the layers
  its backward pass runs), costs more than compiling it (_COMPILE_WORK).
  A short prompt keeps one size; a long one pays one more compile to run a
  lone logit row or the few rows one re-ranking round leaves on a long
  prefix without 15 rows of padding through every layer."""
  size = 1 << max(rows - 1, 0).bit_length()
  if size >= cap:
    size = cap
  elif ((size, num_tokens) not in compiled
        and (cap - size) * num_tokens * layers < _COMPILE_WORK):
    size = cap
  compiled.add((size, num_tokens))
  return size


class _Blocks:
  """The active features in blocks of _BLOCK features of one layer and one
  position (each (layer, position) group padded with act-0 slots), as
  `_rows` reads them, for the prompt or for a prefix of it.

  Layers whose decoders share a shape (every layer of a transcoder set of
  one width; each layer of a CLT alone, as its latents write L - l layers)
  form one group: one stacked decoder and one loop over its blocks, so a
  transcoder set compiles one loop instead of one per layer. `for_prefix`
  keeps the blocks at positions < P and says which column of `_rows`'
  output holds each feature there (features at later positions have no
  edge into rows on that prefix).
  """

  def __init__(self, rep, decoders: list | None = None):
    """`decoders`: `decoder_groups(rep.dicts)`, when the caller has them."""
    self.groups = []  # per group: (w_dec, block_pos, rows, act)
    feature_slot = np.zeros(len(rep.features), np.int64)
    feature_group = np.zeros(len(rep.features), np.int64)
    by_layer = rep.features_by_layer()
    first_row = np.searchsorted(rep.features[:, 0],
                                np.arange(len(by_layer)))
    for gi, (layers, w_dec) in enumerate(decoders or
                                         decoder_groups(rep.dicts)):
      pos_all, lat_all, act_all = [], [], []
      size = 0
      s = rep.dicts.w_dec[layers[0]].shape[0]  # decoder rows per layer
      for i, l in enumerate(layers):
        f_l, a_l = by_layer[l]
        if not len(f_l):
          continue
        pos, start, count = np.unique(f_l[:, 1], return_index=True,
                                      return_counts=True)
        blocks = -(-count // _BLOCK)
        first = np.concatenate([[0], np.cumsum(blocks)[:-1]]) * _BLOCK
        # Slot of each feature: its group's first slot + its rank in it.
        group = np.repeat(np.arange(len(pos)), count)
        slot = first[group] + np.arange(len(f_l)) - start[group]
        lat = np.zeros(blocks.sum() * _BLOCK, np.int32)
        act = np.zeros(blocks.sum() * _BLOCK, np.float32)
        lat[slot], act[slot] = f_l[:, 2], a_l
        rows = first_row[l] + np.arange(len(f_l))
        feature_slot[rows] = size + slot
        feature_group[rows] = gi
        size += len(lat)
        pos_all.append(np.stack([np.full(blocks.sum(), l),
                                 np.repeat(pos, blocks)], 1).astype(np.int32))
        lat_all.append((i * s + lat).reshape(-1, _BLOCK))
        act_all.append(act.reshape(-1, _BLOCK))
      if not pos_all:
        continue
      self.groups.append((w_dec, *(np.concatenate(x) for x in (
          pos_all, lat_all, act_all))))
    self.feature_slot, self.feature_group = feature_slot, feature_group
    self._cache = {}

  def for_prefix(self, prefix: int):
    """(groups as `_rows` takes them; features (indices into
    rep.features) with a column there; their columns)."""
    if prefix not in self._cache:
      groups, have, cols = [], [], []
      offset = 0
      for gi, (w_dec, pos, lat, act) in enumerate(self.groups):
        keep = pos[:, 1] < prefix
        if not keep.any():
          continue
        # Block j of the group -> its slot in the kept blocks' output.
        new_block = np.cumsum(keep) - 1
        mine = np.nonzero(self.feature_group == gi)[0]
        block = self.feature_slot[mine] // _BLOCK
        inside = keep[block]
        have.append(mine[inside])
        cols.append(offset + new_block[block[inside]] * _BLOCK
                    + self.feature_slot[mine[inside]] % _BLOCK)
        # Padded to a bucket of blocks (`block_bucket`), so that another
        # prompt of this length usually reuses the compiled program. A
        # padding block reads the first block's (layer, position) with
        # activation 0, and its columns are never read.
        kept = [x[keep] for x in (pos, lat, act)]
        extra = block_bucket(len(kept[0])) - len(kept[0])
        fill = [kept[0][:1], np.zeros_like(kept[1][:1]),
                np.zeros_like(kept[2][:1])]
        kept = [np.concatenate([x, np.repeat(f, extra, axis=0)])
                for x, f in zip(kept, fill)]
        offset += len(kept[0]) * _BLOCK
        groups.append((w_dec, *jax.device_put(kept)))
      cat = lambda xs: (np.concatenate(xs) if xs  # noqa: E731
                        else np.zeros(0, np.int64))
      self._cache[prefix] = (tuple(groups), cat(have), cat(cols))
    return self._cache[prefix]


def decoder_groups(dicts: _replacement.Dictionaries) -> list:
  """(layers, their decoders stacked on the device (G * S, k, D)) per group
  of layers whose decoders share a shape (`_Blocks`). They depend only on
  the dictionaries, so `attribute` stacks them while the clean pass
  compiles (a fresh 47 MB copy for 18 width-1024 transcoders: 0.2 s of a
  first call)."""
  shapes = {}
  for l, w in enumerate(dicts.w_dec):
    if w is not None:
      shapes.setdefault(tuple(w.shape), []).append(l)
  return [(layers, jax.device_put(np.concatenate(
      [dicts.w_dec[l] for l in layers]).astype(np.float32)))
          for layers in shapes.values()]


def block_bucket(n: int) -> int:
  """Blocks a group of features is padded to: 16, then steps of an eighth
  to a quarter of n (17 -> 20, 33 -> 40, 300 -> 320), at most 25% more."""
  if n <= 16:
    return 16
  step = 1 << (n.bit_length() - 3)
  return -(-n // step) * step


def prefix_bucket(need: int, num_tokens: int) -> int:
  """Tokens a batch of rows reading positions < `need` runs on: 64, 128,
  256, ... (one compile each), or the whole prompt. A row's gradient is
  zero after its own position (attention looks back only), so a prefix
  gives the same edges at a fraction of the work on long prompts."""
  size = _MIN_PREFIX
  while size < need:
    size *= 2
  return min(size, num_tokens)


def salient_logits(logits: np.ndarray, *, desired_prob: float = 0.95,
                   max_logits: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """(token ids, probabilities): the most likely tokens until their
  cumulative probability reaches `desired_prob`, at most `max_logits`."""
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")[:max_logits]
  cut = int(np.searchsorted(np.cumsum(p[order]), desired_prob)) + 1
  order = order[:cut]
  return order.astype(np.int32), p[order].astype(np.float32)


def attribute(tokens_or_prompt: str | Sequence[int], dictionaries,
              config: models.Gemma3Config, params: Any, *,
              tokenizer=None, max_feature_nodes: int | None = None,
              target_tokens: Sequence[int] | None = None,
              batch_size: int = 256, desired_logit_prob: float = 0.95,
              max_n_logits: int = 10, update_interval: int = 4,
              verbose: bool = False) -> _graph.Graph:
  """The attribution graph of one prompt (module docstring).

  Args:
    tokens_or_prompt: token ids (BOS first), or text (needs `tokenizer`).
    dictionaries: {layer: InferenceDictionary} transcoders reading
      `layer_L/mlp_in` and writing `layer_L/mlp_out` (a list of num_layers,
      None for a layer left whole, also works), or one CLT
      (`interop.MultiLayerInference` of kind 'clt').
    config, params: the model.
    tokenizer: encodes a prompt and names the tokens.
    max_feature_nodes: most features kept as nodes (default all active).
    target_tokens: logit targets; default the likeliest next tokens up to
      `desired_logit_prob` cumulative probability, at most `max_n_logits`.
    batch_size: target rows per backward pass.
    update_interval: re-rank the features after this many times
      `batch_size` rows (batches of a long prompt hold fewer rows; the
      rounds keep their size).
    verbose: print timings.

  Returns:
    A `Graph`.
  """
  t0 = time.perf_counter()
  prompt = None
  if isinstance(tokens_or_prompt, str):
    if tokenizer is None:
      raise ValueError("attribute: a text prompt needs a tokenizer")
    prompt = tokens_or_prompt
    tokens = np.asarray(tokenizer.encode(prompt), np.int32)
  else:
    tokens = np.asarray(tokens_or_prompt, np.int32).reshape(-1)
  if len(tokens) < 2:
    raise ValueError("attribute: needs at least 2 tokens (BOS and one more)")
  dicts = (dictionaries if isinstance(dictionaries, _replacement.Dictionaries)
           else _replacement.Dictionaries.of(dictionaries, config))
  L, T, D = config.num_layers, len(tokens), config.d_model
  # Rows per batch on the whole prompt; batches on a shorter prefix hold
  # more (`rows_per_batch` of their prefix), up to batch_size.
  full_batch = rows_per_batch(batch_size, L, T, D)
  # The clean pass's programs, and the backward program of a full batch on
  # each prefix bucket, compile side by side in threads; the backward ones
  # go on while the clean pass runs (on a short prompt they are every
  # batch).
  # On a CPU backend both the clean pass and the rows run in NumPy
  # (`_host_pass`): nothing compiles.
  host = _host_rows(params)
  if host:
    freeze_ready, rows_ready = None, None
    _host_pass.prepare(params, config)
  else:
    buckets = sorted({prefix_bucket(n, T) for n in range(1, T + 1)})
    sizes = [(rows_per_batch(batch_size, L, p, D), p) for p in buckets]
    freeze_ready, rows_ready = _compile_in_background(params, config, tokens,
                                                      dicts, sizes)
    _COMPILED_SIZES.update(sizes)
  # For jitted rows, while the clean pass compiles: their decoders
  # stacked, and the encoders' programs compiled by a run on zeros (the
  # NumPy rows read each layer's decoder as it is, and encode in NumPy).
  if not host:
    decoders = decoder_groups(dicts)
    dicts.encode(np.zeros((L, T, D), np.float32))
  rep = _replacement.build(
      params, config, tokens, dicts,
      before_freeze=None if freeze_ready is None else freeze_ready.wait)
  logits = np.asarray(rep.clean["logits"], np.float64)
  if target_tokens is None:
    logit_ids, logit_p = salient_logits(logits, desired_prob=desired_logit_prob,
                                        max_logits=max_n_logits)
  else:
    logit_ids = np.asarray(target_tokens, np.int32).reshape(-1)
    p = np.exp(logits - logits.max())
    logit_p = (p / p.sum())[logit_ids].astype(np.float32)
  n_act, n_err, n_log = len(rep.features), L * T, len(logit_ids)
  n_cols = n_act + n_err + T + n_log
  budget = n_act if max_feature_nodes is None else min(max_feature_nodes,
                                                       n_act)

  # On the host: as eager jnp ops each of these compiles a program first
  # (about half a second of a short prompt's first call). The embedding
  # mean is the model's, computed once (`_replacement.embedding_mean`).
  emb = np.asarray(rep.embedding)
  demeaned = emb[logit_ids] - rep.embedding_mean
  blocks = None if host else _Blocks(rep, decoders)
  # Arrays go to the device with `jax.device_put` or as NumPy straight
  # into the jitted functions: `jnp.asarray` outside a trace compiles a
  # program per shape and dtype (0.1-0.2 s of a short prompt's first call).
  b_dec = jax.device_put(np.asarray(rep.dicts.b_dec, np.float32))
  prefixes = {}

  def on_prefix(prefix: int):
    """The linear model's inputs cut to the first `prefix` positions (as
    NumPy views for the host's rows)."""
    if prefix not in prefixes:
      if host:
        prefixes[prefix] = _host_prefix(rep, prefix)
      else:
        prefixes[prefix] = _on_prefix(rep.frozen, rep.clean["embed"],
                                      rep.errors, prefix)
    return prefixes[prefix]

  def prefix_of(rows: np.ndarray) -> np.ndarray:
    """Each row's prefix bucket (logit rows read the last position)."""
    need = np.where(rows < 0, T,
                    rep.features[np.maximum(rows, 0), 1].astype(int) + 1)
    sizes = {n: prefix_bucket(n, T) for n in np.unique(need)}
    return np.array([sizes[n] for n in need], np.int64)

  # Every computed row (logit rows first, then features as they are
  # visited) is written once, straight into this buffer.
  buf = np.zeros((n_log + budget, n_cols), np.float32)
  buf_bias = np.zeros(n_log + budget, np.float32)
  buf_sums = np.zeros(n_log + budget)  # sum of |edges| of each row

  def run(rows: np.ndarray, at: int) -> None:
    """Edges of `rows` (feature indices, or -1 - k for logit k; rows of
    one prefix bucket together) into buf[at:] and buf_bias[at:]."""
    rows = np.asarray(rows, np.int64)
    prefix = prefix_of(rows)
    s = 0
    while s < len(rows):
      p_len = int(prefix[s])
      cap = rows_per_batch(batch_size, L, p_len, D)
      # This bucket's rows end where another bucket's start.
      other = np.flatnonzero(prefix[s:] != p_len)
      end = min(s + cap, s + int(other[0]) if len(other) else len(rows))
      chunk = rows[s:end]
      r = len(chunk)
      top = max(L - 1 if row < 0 else int(rep.features[row, 0])
                for row in chunk)
      size = r if host else _padded_size(r, cap, p_len, top + 1,
                                         _COMPILED_SIZES)
      layer = np.zeros(size, np.int32)
      pos = np.zeros(size, np.int32)
      read = np.zeros((size, D), np.float32)
      final = np.zeros((size, D), np.float32)
      for i, row in enumerate(chunk):
        if row < 0:  # logit -1 - k
          final[i] = demeaned[-1 - row]
          layer[i] = L - 1
        else:
          l, p, f = rep.features[row]
          layer[i], pos[i] = l, p
          read[i] = rep.dicts.w_enc[l][:, f]
      block = buf[at + s:at + end]
      if host:
        g_w, err, tok, bias = _host_pass.backward_rows(
            *on_prefix(p_len), rep.dicts.b_dec, layer, pos, read, final)
        have, feats = _host_pass.feature_edges(
            g_w, rep.features, rep.activations, rep.dicts.w_dec, p_len)
        del g_w
        block[:, have] = feats
      else:
        groups, have, fcols = blocks.for_prefix(p_len)
        feats, err, tok, bias = _rows(
            *on_prefix(p_len), b_dec, groups, layer, pos, read, final)
        block[:, have] = np.asarray(feats)[:r, fcols]
      err = np.asarray(err)[:r].reshape(r, L, p_len)
      for l in range(L):
        block[:, n_act + l * T:n_act + l * T + p_len] = err[:, l]
      block[:, n_act + n_err:n_act + n_err + p_len] = np.asarray(tok)[:r]
      buf_bias[at + s:at + end] = np.asarray(bias)[:r]
      buf_sums[at + s:at + end] = np.abs(block).sum(1, dtype=np.float64)
      s = end

  if rows_ready is not None:
    rows_ready.join()
  run(np.arange(-1, -1 - n_log, -1), 0)
  t1 = time.perf_counter()
  # The node (column) each filled row of buf stands for.
  row_node = np.concatenate([n_act + n_err + T + np.arange(n_log),
                             np.zeros(budget, np.int64)])
  filled = n_log
  visited = np.zeros(n_act, bool)
  weights = np.zeros(n_cols)
  weights[n_act + n_err + T:] = logit_p
  while filled < n_log + budget:
    if budget == n_act:
      pending = np.nonzero(~visited)[0]
    else:
      part = _partial_influence(buf[:filled], row_node[:filled], weights,
                                buf_sums[:filled])
      rank = np.argsort(-part[:n_act], kind="stable")
      rank = rank[~visited[rank]]
      # A round is update_interval * batch_size rows whatever the
      # prompt's length (circuit-tracer's queue): counting it in the
      # shrunken rows of a long prompt's batches would re-rank every few
      # rows, and the rankings' host work (each a pass over the rows so
      # far) would grow with the square of the prompt's length.
      pending = rank[:min(update_interval * batch_size,
                          n_log + budget - filled)]
    # Rows of one prefix bucket, and in it of one layer, together: a
    # batch's backward pass runs on its bucket's prefix and stops at its
    # highest layer (`_replacement.backward`).
    pending = pending[np.lexsort((rep.features[pending, 0],
                                  prefix_of(pending)))]
    run(pending, filled)
    row_node[filled:filled + len(pending)] = pending
    visited[pending] = True
    filled += len(pending)
  t2 = time.perf_counter()

  selected = np.nonzero(visited)[0]
  row_of = np.empty(n_cols, np.int64)
  row_of[row_node] = np.arange(len(row_node))
  keep_cols = np.concatenate([selected, np.arange(n_act, n_cols)])
  n = len(keep_cols)
  n_sel = len(selected)
  # Target rows in node order: selected features, then (empty) error and
  # token rows, then logits; copied in slices to bound the temporaries.
  sources = np.concatenate([row_of[selected], row_of[n_cols - n_log:]])
  targets = np.concatenate([np.arange(n_sel), np.arange(n - n_log, n)])
  adjacency = np.zeros((n, n), np.float32)
  bias = np.zeros(n, np.float32)
  all_cols = n == n_cols
  for i in range(0, len(targets), 1024):
    rows = buf[sources[i:i + 1024]]
    adjacency[targets[i:i + 1024]] = rows if all_cols else rows[:, keep_cols]
  bias[targets] = buf_bias[sources]
  del buf

  feats = rep.features[selected]
  mlp_in = np.asarray(rep.clean["mlp_in"])
  value = np.zeros(n, np.float32)
  value[:n_sel] = [mlp_in[l, p] @ rep.dicts.w_enc[l][:, f] for l, p, f in feats]
  logits_c = logits - logits.mean()
  value[n - n_log:] = logits_c[logit_ids]
  err_norm = np.linalg.norm(np.asarray(rep.errors), axis=-1).reshape(-1)
  ll, pp = np.meshgrid(np.arange(L), np.arange(T), indexing="ij")
  cat = np.concatenate
  token_strings = None
  if tokenizer is not None:
    token_strings = [tokenizer.decode([int(t)]) for t in tokens]
  graph = _graph.Graph(
      tokens=tokens,
      kind=cat([np.full(n_sel, _graph.FEATURE), np.full(n_err, _graph.ERROR),
                np.full(T, _graph.TOKEN),
                np.full(n_log, _graph.LOGIT)]).astype(np.int8),
      layer=cat([feats[:, 0], ll.ravel(), np.full(T, -1),
                 np.full(n_log, L)]).astype(np.int32),
      position=cat([feats[:, 1], pp.ravel(), np.arange(T),
                    np.full(n_log, T - 1)]).astype(np.int32),
      latent=cat([feats[:, 2], np.full(n_err, -1), tokens,
                  logit_ids]).astype(np.int32),
      activation=cat([rep.activations[selected], err_norm, np.zeros(T),
                      logits[logit_ids]]).astype(np.float32),
      value=value, bias=bias, adjacency=adjacency,
      logit_tokens=logit_ids.astype(np.int32),
      logit_probabilities=np.asarray(logit_p, np.float32),
      prompt=prompt, token_strings=token_strings,
      metadata={"model": config.name, "num_layers": L,
                "d_model": config.d_model,
                "dictionaries": rep.dicts.kind,
                "n_active_features": int(n_act),
                "max_feature_nodes": max_feature_nodes,
                "batch_size": full_batch,
                "seconds": {"setup_and_logit_rows": round(t1 - t0, 3),
                            "feature_rows": round(t2 - t1, 3)}})
  if verbose:
    print(f"attribute: {n_act} active features, {n_sel} kept; "
          f"{t1 - t0:.1f} s setup + logits, {t2 - t1:.1f} s features")
  return graph


def _partial_influence(matrix: np.ndarray, row_node: np.ndarray,
                       weights: np.ndarray, row_sums: np.ndarray | None = None,
                       chunk: int = 64, max_iter: int = 10_000
                       ) -> np.ndarray:
  """circuit-tracer's partial influence: influence through the rows
  computed so far (`matrix` (R, n_cols), row i standing for node
  row_node[i]), starting from the logit probabilities `weights`.

  With B = the row-normalised |matrix|, the power series is
  w B + (w B)[row_node] B + ...: each term after the first only reads
  B's columns at `row_node`, the (R, R) matrix S = B[:, row_node]. So
  z_0 = w[row_node], z_k+1 = z_k S is iterated in R dimensions until it
  vanishes (S is nilpotent: the graph is acyclic), and B is applied once,
  to their sum: total = (sum_k z_k) B, read a slice of rows at a time
  (one pass over `matrix`, never copied whole). `row_sums`, each row's
  sum of |entries| (float64), saves a second pass when the caller has it.
  """
  matrix = matrix[:len(row_node)]
  if row_sums is None:
    row_sums = np.concatenate([
        np.abs(matrix[i:i + chunk]).sum(axis=1, dtype=np.float64)
        for i in range(0, len(matrix), chunk)] or [np.zeros(0)])
  inv = 1.0 / np.maximum(row_sums[:len(row_node)], 1e-10)
  square = np.abs(matrix[:, row_node].astype(np.float64)) * inv[:, None]
  z = np.asarray(weights, np.float64)[row_node]
  acc = z.copy()
  for _ in range(max_iter):
    z = z @ square
    if not z.any():
      break
    acc += z
  else:
    raise RuntimeError("partial influence: no convergence")
  # The pass over `matrix` is float32 (a BLAS matrix-vector product per
  # slice, no float64 copy of it): the totals only rank features, and the
  # pass is most of a ranking's time on long prompts (measured at 256
  # tokens, 295k active features: 0.55 s -> 0.15 s per ranking).
  scaled = (acc * inv).astype(np.float32)
  total = np.zeros(matrix.shape[1])
  for i in range(0, len(matrix), chunk):
    total += scaled[i:i + chunk] @ np.abs(matrix[i:i + chunk])
  return total
