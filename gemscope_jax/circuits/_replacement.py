"""The local replacement model of one prompt, and its frozen linear part.

One clean pass of Gemma 3 fixes, for one prompt, every attention pattern and
every RMSNorm denominator (pre-attention, post-attention, pre-FFW, final).
With those frozen, the map from what is written into the residual stream
(the scaled token embeddings, and at each layer the MLP's output) to what
is read from it (each layer's `mlp_in`, the final-norm output) is linear:
`LocalReplacement.run`. Each MLP output is then written as
    mlp_out[l, p] = skip_l(mlp_in[l, p]) + sum_features a * W_dec row
                    + b_dec[l] + error[l, p],
the skip (an affine transcoder's `x @ affine_skip`) staying inside the
linear map, so gradients flow through it. The error is what makes the
replacement reproduce the clean pass exactly. A CLT latent of layer l
writes rows to every output layer m >= l. Position 0 (BOS) holds no
feature nodes (as circuit-tracer): its latents' writes are part of its
error nodes.

Caveat: everything is float32 and held for the whole prompt, (L, T, D)
arrays and (L, heads, T, T) patterns: fine for prompts of hundreds of
tokens, not tens of thousands.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import models
from gemscope_jax.circuits import _host_pass
# The same RoPE and mask helpers the model uses, so the recomputed attention
# patterns round exactly as the model's own.
from gemscope_jax.models import _modules, _transformer
from gemscope_jax.interop import _inference, multilayer

_HIGHEST = jax.lax.Precision.HIGHEST
_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out")


@flax.struct.dataclass
class Frozen:
  """What the clean pass fixes: the linear model's coefficients.

  Attributes:
    g_pre_attn, g_post_attn, g_pre_ffw: (L, T, D) gains: each RMSNorm as a
      per-(position, channel) multiplier, 1/rms(clean input) * (1 + scale).
    g_final: (D,) the final norm's gain at the last position.
    probs: (L, K, G, T, S) attention patterns.
    w_v: (L, K, D, H) value weights; w_o: (L, N * H, D) output weights.
    skip: (L, D, D) affine skips (zeros where a layer has none), or None.
  """
  g_pre_attn: jax.Array
  g_post_attn: jax.Array
  g_pre_ffw: jax.Array
  g_final: jax.Array
  probs: jax.Array
  w_v: jax.Array
  w_o: jax.Array
  skip: jax.Array | None


def run_linear(frozen: Frozen, embed: jax.Array, writes: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """The frozen linear model: (embed (T, D), writes (L, T, D)) ->
  (mlp_in (L, T, D), final-norm output at the last position (D,)).

  `writes[l]` is added to the residual stream after layer l's attention
  and `mlp_in`, beside the (linear) skip term; it stands for everything
  else the replaced MLP writes.
  """
  def layer(x, per_layer):
    g_pre, probs, w_v, w_o, g_post, g_ffw, skip, write = per_layer
    v = jnp.einsum("td,kdh->tkh", x * g_pre, w_v, precision=_HIGHEST)
    heads = jnp.einsum("kgts,skh->tkgh", probs, v, precision=_HIGHEST)
    h = jnp.einsum("tn,nd->td", heads.reshape(x.shape[0], -1), w_o,
                   precision=_HIGHEST)
    x = x + h * g_post
    mlp_in = x * g_ffw
    x = x + write
    if skip is not None:
      x = x + jnp.matmul(mlp_in, skip, precision=_HIGHEST)
    return x, mlp_in

  x, mlp_in = jax.lax.scan(
      layer, embed,
      (frozen.g_pre_attn, frozen.probs, frozen.w_v, frozen.w_o,
       frozen.g_post_attn, frozen.g_pre_ffw, frozen.skip, writes))
  return mlp_in, x[-1] * frozen.g_final


def backward(frozen: Frozen, layer: jax.Array, pos: jax.Array,
             read: jax.Array, final: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`run_linear` transposed by hand for R target rows at once.

  Row r reads `read[r]` (D,) at mlp_in[layer[r], pos[r]] and `final[r]`
  (D,) at the final-norm output (a logit row has read 0 and
  layer L - 1; a feature row has final 0). Returns each row's gradient at
  every write site: (embed (R, T, D), writes (L, R, T, D)), what
  `jax.vjp(run_linear)` gives row by row.

  Layers above the batch's highest row are skipped (`lax.cond`): nothing
  flows back from them (their cotangent is still zero), so a batch of
  rows at layer l costs l + 1 layers, not L. Rows sorted by layer make
  most batches cheap; this is the backward pass that hooks and autograd
  give circuit-tracer for free, and `vmap(vjp)` does not.
  """
  L, T, D = frozen.g_pre_ffw.shape
  r = layer.shape[0]
  top = jnp.max(layer)
  ct = jnp.zeros((r, T, D), jnp.float32).at[:, T - 1].set(
      final * frozen.g_final)
  at_pos = jnp.arange(T)[None, :] == pos[:, None]                # (R, T)

  def step(ct, per_layer):
    l, g_pre, probs, w_v, w_o, g_post, g_ffw, skip = per_layer

    def transpose(ct):
      reads = (at_pos & (layer == l)[:, None])[..., None] * read[:, None]
      if skip is not None:  # mlp_in also feeds the skip's write
        reads = reads + jnp.einsum("rte,de->rtd", ct, skip,
                                   precision=_HIGHEST)
      mid = ct + reads * g_ffw
      heads = jnp.einsum("rtd,nd->rtn", mid * g_post, w_o,
                         precision=_HIGHEST).reshape(r, T, *probs.shape[:2], -1)
      v = jnp.einsum("rtkgh,kgts->rskh", heads, probs, precision=_HIGHEST)
      x = jnp.einsum("rskh,kdh->rsd", v, w_v, precision=_HIGHEST)
      return mid + x * g_pre, ct

    return jax.lax.cond(l <= top, transpose, lambda ct: (ct, ct), ct)

  ct, g_writes = jax.lax.scan(
      step, ct,
      (jnp.arange(L), frozen.g_pre_attn, frozen.probs, frozen.w_v,
       frozen.w_o, frozen.g_post_attn, frozen.g_pre_ffw, frozen.skip),
      reverse=True)
  return ct, g_writes


# The embedding mean of the newest model seen: (its embedding table, the
# mean), instead of a pass over the 262k-row table per prompt (0.15-0.2 s
# of a short prompt's call on 2 CPU cores).
_EMBEDDING_MEAN: list = []


def embedding_mean(params: Any) -> np.ndarray:
  """(D,) float32 mean of the embedding rows (float64 sums), kept for the
  newest `params` seen."""
  table = params["embedder"]["input_embedding"]
  if not (_EMBEDDING_MEAN and _EMBEDDING_MEAN[0] is table):
    mean = np.asarray(table, np.float32).mean(axis=0, dtype=np.float64)
    _EMBEDDING_MEAN[:] = [table, mean.astype(np.float32)]
  return _EMBEDDING_MEAN[1]


def _inv_rms(x, eps):
  x = x.astype(jnp.float32)
  return jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1) + eps)


def _rms_norm(x, scale, eps):
  return x * _inv_rms(x, eps)[..., None] * (1.0 + scale)


# The clean pass is three programs, the middle one called once per layer
# from Python: it compiles one block and reads each layer's weights where
# they are. One program with a scan over the layers needed them stacked
# first, a copy of every layer (0.2 s a call on the 270M, and a compile of
# its own), and at -O0 its scan's slicing ran twice as slow. All three
# compile at LLVM's -O0, and run about as fast as optimised (their work is
# matmuls): measured on the 270M at 6 tokens, 2 CPU cores, compiles 0.84
# -> 0.54 s, runs 0.145 -> 0.16 s. Against the scan: a first call's clean
# pass (tracing, compiles, runs) 1.8 -> 1.1 s, a later call's 0.5 -> 0.15 s.
_CLEAN_PASS = functools.partial(
    jax.jit, static_argnums=(0,),
    compiler_options={"xla_backend_optimization_level": 0})


@_CLEAN_PASS
def _clean_start(config: models.Gemma3Config, embedder: Any,
                 tokens: jax.Array):
  """The residual stream's start (1, T, D), the scaled embeddings (T, D)
  float32, and per attention kind (in `_kinds` order) its RoPE table and
  mask: (sin, cos) (T, 1, H/2) and allowed (T, S)."""
  c = config
  T = tokens.shape[0]
  emb = _transformer.Embedder(c.vocab_size, c.d_model)
  x = emb.apply({"params": embedder}, tokens[None], method="encode")
  table = jnp.asarray(embedder["input_embedding"], jnp.float32)
  embed = table[tokens] * jnp.float32(c.embed_scale)
  masks = _transformer.attention_masks(c, jnp.ones((1, T), bool))
  kinds = []
  for layer, kind in _kinds(c):
    sin, cos = _modules.rope_table(jnp.arange(T)[None], c.head_dim,
                                   *c.rope(layer), T)
    kinds.append((sin[0], cos[0], masks[kind][0]))
  return x, embed, tuple(kinds)


def _kinds(config: models.Gemma3Config) -> list:
  """(first layer, kind) of each attention kind, in first-seen order."""
  first = {}
  for l in range(config.num_layers):
    first.setdefault(config.attention_kind(l), l)
  return [(l, k) for k, l in first.items()]


@_CLEAN_PASS
def _clean_layer(config: models.Gemma3Config, weights: Any, x: jax.Array,
                 sin: jax.Array, cos: jax.Array, allowed: jax.Array):
  """One layer of the clean pass (the model's own Block), and what it
  freezes: (block output (1, T, D), (g_pre_attn, g_post_attn, g_pre_ffw
  (T, D) gains, probs (K, G, T, S), w_v (K, D, H), w_o (N * H, D), mlp_in,
  mlp_out (T, D))). The layers differ only in the mask and RoPE table
  they are given."""
  c = config
  T = x.shape[1]
  seen = {}

  def record(site, value):
    seen[site] = value
    return value

  out = _modules.Block(c, 0, jnp.float32).apply(
      {"params": weights}, x, (sin[None], cos[None]), allowed[None], record)
  rec = {site: seen[site][0].astype(jnp.float32) for site in _SITES}
  f32 = lambda w: jnp.asarray(w, jnp.float32)  # noqa: E731
  attn = weights["attn"]
  w_o = f32(attn["attn_vec_einsum"]["w"]).reshape(-1, c.d_model)
  kv = f32(attn["kv_einsum"]["w"])                       # (2, K, D, H)
  eps = c.norm_eps
  g = lambda x, name: (_inv_rms(x, eps)[..., None]  # noqa: E731
                       * (1.0 + f32(weights[name]["scale"])))
  g_pre_attn = g(rec["resid_pre"], "pre_attention_norm")
  h = jnp.einsum("tn,nd->td", rec["attn_out"], w_o, precision=_HIGHEST)
  g_post_attn = g(h, "post_attention_norm")
  g_pre_ffw = g(rec["resid_mid"], "pre_ffw_norm")

  # The attention pattern, recomputed from the frozen pre-attention input.
  normed = rec["resid_pre"] * g_pre_attn
  q = jnp.einsum("td,ndh->tnh", normed, f32(attn["q_einsum"]["w"]),
                 precision=_HIGHEST)
  k = jnp.einsum("td,kdh->tkh", normed, kv[0], precision=_HIGHEST)
  q = _rms_norm(q, f32(attn["_query_norm"]["scale"]), eps)
  k = _rms_norm(k, f32(attn["_key_norm"]["scale"]), eps)
  q = _modules.apply_rope(q[None], (sin[None], cos[None]))[0] * c.query_scale
  k = _modules.apply_rope(k[None], (sin[None], cos[None]))[0]
  q = q.reshape(T, c.num_kv_heads, -1, c.head_dim)
  logits = jnp.einsum("tkgh,skh->kgts", q, k, precision=_HIGHEST)
  probs = jax.nn.softmax(
      jnp.where(allowed, logits, _modules._MASK_VALUE), axis=-1)
  return out, (g_pre_attn, g_post_attn, g_pre_ffw, probs, kv[1], w_o,
               rec["mlp_in"], rec["mlp_out"])


@_CLEAN_PASS
def _clean_end(config: models.Gemma3Config, outer: Any, x: jax.Array,
               embed: jax.Array, layers: tuple, skip: jax.Array | None):
  """(Frozen, clean) from the last block's output and each layer's
  `_clean_layer` coefficients, stacked on a leading layer axis."""
  g_pre_attn, g_post_attn, g_pre_ffw, probs, w_v, w_o, mlp_in, mlp_out = (
      jnp.stack(field) for field in zip(*layers))
  final = _modules.RMSNorm(config.norm_eps).apply(
      {"params": outer["final_norm"]}, x[:, -1:])
  emb = _transformer.Embedder(config.vocab_size, config.d_model)
  last_logits = emb.apply({"params": outer["embedder"]}, final,
                          method="decode")[0, -1]
  g_final = _inv_rms(x[0, -1], config.norm_eps) * (
      1.0 + jnp.asarray(outer["final_norm"]["scale"], jnp.float32))
  frozen = Frozen(g_pre_attn=g_pre_attn, g_post_attn=g_post_attn,
                  g_pre_ffw=g_pre_ffw, g_final=g_final, probs=probs,
                  w_v=w_v, w_o=w_o, skip=skip)
  clean = {"embed": embed, "mlp_in": mlp_in, "mlp_out": mlp_out,
           "logits": last_logits.astype(jnp.float32)}
  return frozen, clean


def freeze(params: Any, config: models.Gemma3Config, tokens,
           skip: jax.Array | None, call=None):
  """The clean pass of one prompt (tokens (T,)) and its frozen
  coefficients: `_clean_start`, `_clean_layer` per layer, `_clean_end`.

  `call(fn, *args)` runs each program (default `fn(*args)`); `lower_freeze`
  passes one that lowers them from shapes instead.

  Returns:
    (frozen, clean) with clean = {"embed": (T, D) scaled embeddings,
    "mlp_in", "mlp_out": (L, T, D), "logits": (V,) at the last position}.
  """
  call = call or (lambda fn, *args: fn(*args))
  c = config
  outer = {k: params[k] for k in ("embedder", "final_norm")}
  x, embed, tables = call(_clean_start, c, outer["embedder"], tokens)
  kind_of = {k: i for i, (_, k) in enumerate(_kinds(c))}
  layers = []
  for l in range(c.num_layers):
    x, coefficients = call(_clean_layer, c, params[f"layer_{l}"], x,
                           *tables[kind_of[c.attention_kind(l)]])
    layers.append(coefficients)
  return call(_clean_end, c, outer, x, embed, tuple(layers), skip)


def lower_freeze(params: Any, config: models.Gemma3Config, num_tokens: int,
                 skip_shape: tuple | None) -> tuple[list, tuple]:
  """`freeze`'s programs for a prompt of `num_tokens`, lowered from shapes
  alone (nothing runs; each program once, as every layer has the same
  shapes): (the `jax.stages.Lowered` to compile, `freeze`'s output shapes
  (frozen, clean))."""
  lowered = {}

  def call(fn, *args):
    if fn not in lowered:
      low = fn.lower(*args)
      lowered[fn] = (low, jax.tree.map(
          lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), low.out_info))
    return lowered[fn][1]

  skip = (None if skip_shape is None
          else jax.ShapeDtypeStruct(skip_shape, jnp.float32))
  shapes = freeze(params, config,
                  jax.ShapeDtypeStruct((num_tokens,), jnp.int32), skip, call)
  return [low for low, _ in lowered.values()], shapes


def freeze_shapes(config: models.Gemma3Config, num_tokens: int,
                  skip_shape: tuple | None) -> tuple[Frozen, dict]:
  """`freeze`'s output shapes (frozen, clean) for a prompt of `num_tokens`,
  as `jax.ShapeDtypeStruct`s, without tracing anything."""
  c, T = config, num_tokens
  L, D, K = c.num_layers, c.d_model, c.num_kv_heads
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  frozen = Frozen(
      g_pre_attn=f32(L, T, D), g_post_attn=f32(L, T, D),
      g_pre_ffw=f32(L, T, D), g_final=f32(D),
      probs=f32(L, K, c.num_heads // K, T, T), w_v=f32(L, K, D, c.head_dim),
      w_o=f32(L, c.num_heads * c.head_dim, D),
      skip=None if skip_shape is None else f32(*skip_shape))
  clean = {"embed": f32(T, D), "mlp_in": f32(L, T, D),
           "mlp_out": f32(L, T, D), "logits": f32(c.vocab_size)}
  return frozen, clean


@dataclasses.dataclass(frozen=True, eq=False)
class Dictionaries:
  """Per-layer transcoders or one CLT, in the form attribution needs.

  Attributes:
    kind: 'transcoders' or 'clt'.
    w_enc: per layer (D, S_l) encoder (a transcoder's pre_enc_bias folded
      into its b_enc), or None for a layer without a dictionary.
    w_dec: per layer (S_l, k_l, D): latent rows written to layers
      l .. l + k_l - 1 (k_l = 1 for a transcoder, L - l for a CLT).
    b_dec: (L, D) decoder bias of each output layer.
    skip: (L, D, D) affine skips, or None when no layer has one.
    encode: fn(mlp_in (L, T, D), on_host=False) -> per layer (T, S_l)
      latents, or None; `on_host` encodes in NumPy (no compile).
  """
  kind: str
  w_enc: list
  w_dec: list
  b_dec: np.ndarray
  skip: np.ndarray | None
  encode: Any

  @classmethod
  def of(cls, dictionaries, config: models.Gemma3Config) -> Dictionaries:
    """From {layer: InferenceDictionary}, a per-layer sequence (None for a
    layer whose MLP stays whole: all of it is then error) or one CLT
    (`MultiLayerInference` of kind 'clt')."""
    L, D = config.num_layers, config.d_model
    if isinstance(dictionaries, multilayer.MultiLayerInference):
      d = dictionaries
      if d.kind != "clt" or d.n_layers != L or d.d_in != D:
        raise ValueError(f"attribute: needs a CLT with {L} layers of width "
                         f"{D}, got a {d.kind} of {d.n_layers} x {d.d_in}")
      def encode(x, on_host=True):  # pylint: disable=unused-argument
        # MultiLayerInference encodes in NumPy (float64) either way.
        acts = d.encode(np.swapaxes(np.asarray(x), 0, 1))  # (T, L, S)
        return [np.asarray(acts[:, l], np.float32) for l in range(L)]
      return cls("clt", list(d.w_enc), [d.w_dec[l, :, l:] for l in range(L)],
                 np.asarray(d.b_dec, np.float32), None, encode)
    if isinstance(dictionaries, Mapping):
      per_layer = [dictionaries.get(l) for l in range(L)]
      extra = set(dictionaries) - set(range(L))
      if extra:
        raise ValueError(f"attribute: no layers {sorted(extra)} in a "
                         f"{L}-layer model")
    elif isinstance(dictionaries, Sequence) and len(dictionaries) == L:
      per_layer = list(dictionaries)
    else:
      raise ValueError("attribute: dictionaries must be {layer: transcoder}, "
                       f"a list of {L} transcoders (None allowed) or a CLT")
    for l, d in enumerate(per_layer):
      if d is None:
        continue
      if not isinstance(d, _inference.InferenceDictionary):
        raise ValueError(f"attribute: layer {l}: not an InferenceDictionary")
      if d.d_in != D or d.d_out != D:
        raise ValueError(f"attribute: layer {l}: transcoder {d.d_in} -> "
                         f"{d.d_out}, the model's MLP is {D} -> {D}")
    per_layer = [None if d is None else d.folded() for d in per_layer]
    b_dec = np.stack([np.zeros(D, np.float32) if d is None else d.b_dec
                      for d in per_layer])
    skip = None
    if any(d is not None and d.affine_skip is not None for d in per_layer):
      skip = np.stack([np.zeros((D, D), np.float32)
                       if d is None or d.affine_skip is None
                       else d.affine_skip for d in per_layer])

    def encode(x, on_host=False):
      """Per layer (T, S) float32 latents of x (L, T, D): in NumPy with
      `on_host` (the CPU's clean pass, `_host_pass`), else jitted."""
      if on_host:
        return [None if d is None else d.encode_numpy(x[l])
                for l, d in enumerate(per_layer)]
      return [None if d is None else np.asarray(d.encode(x[l]), np.float32)
              for l, d in enumerate(per_layer)]
    return cls("transcoders",
               [None if d is None else d.w_enc for d in per_layer],
               [None if d is None else d.w_dec[:, None] for d in per_layer],
               b_dec, skip, encode)


@dataclasses.dataclass(frozen=True, eq=False)
class LocalReplacement:
  """The replacement model of one prompt (see the module docstring).

  Attributes:
    tokens: (T,) the prompt.
    frozen: the linear model's coefficients.
    clean: the clean pass (`freeze`).
    dicts: the dictionaries.
    features: (n, 3) int (layer, position, latent) of the active features,
      sorted; positions >= 1.
    activations: (n,) their activations.
    errors: (L, T, D) real MLP output - reconstruction (b_dec and skip
      included).
    embedding: (V, D) the (unscaled, tied) embedding table.
    embedding_mean: (D,) the mean of its rows.
  """
  tokens: np.ndarray
  frozen: Frozen
  clean: dict
  dicts: Dictionaries
  features: np.ndarray
  activations: np.ndarray
  errors: jax.Array
  embedding: jax.Array
  embedding_mean: np.ndarray

  @property
  def num_layers(self) -> int:
    return len(self.dicts.w_enc)

  def writes(self, feature_scale=None, error_scale=None) -> jax.Array:
    """(L, T, D) MLP writes outside the skip: features, b_dec and errors,
    each feature's and error's contribution times its scale (default 1)."""
    L, T, D = self.errors.shape
    n = len(self.features)
    fs = np.ones(n, np.float32) if feature_scale is None else feature_scale
    es = np.ones((L, T), np.float32) if error_scale is None else error_scale
    out = self.errors * jnp.asarray(es)[..., None] + jnp.asarray(
        self.dicts.b_dec)[:, None]
    start = 0
    for l, (f, a) in enumerate(self.features_by_layer()):
      if len(f):
        scale = fs[start:start + len(f)] * a
        vec = self.dicts.w_dec[l][f[:, 2]] * scale[:, None, None]
        k = vec.shape[1]
        out = out.at[l:l + k, f[:, 1]].add(jnp.swapaxes(vec, 0, 1))
      start += len(f)
    return out

  def features_by_layer(self) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (its rows of `features`, their activations)."""
    bounds = np.searchsorted(self.features[:, 0],
                             np.arange(self.num_layers + 1))
    return [(self.features[a:b], self.activations[a:b])
            for a, b in zip(bounds[:-1], bounds[1:])]

  def run(self, embed=None, writes=None):
    """(mlp_in (L, T, D), final-norm output (D,)) of the linear model."""
    embed = self.clean["embed"] if embed is None else embed
    writes = self.writes() if writes is None else writes
    return run_linear(self.frozen, embed, writes)

  def logits(self, final: jax.Array) -> jax.Array:
    """(V,) logits of a final-norm output (D,)."""
    return jnp.matmul(self.embedding, final, precision=_HIGHEST)


def build(params, config: models.Gemma3Config, tokens,
          dictionaries, before_freeze=None) -> LocalReplacement:
  """The local replacement model of `tokens` (T,) through `dictionaries`.
  The clean pass runs in NumPy where the parameters allow
  (`_host_pass.usable`: no compile), else as `freeze`'s jitted programs,
  after `before_freeze()` if given (`attribute` waits there for those
  programs, compiled in a thread beside the backward pass's)."""
  tokens = np.asarray(tokens, np.int32)
  dicts = dictionaries if isinstance(dictionaries, Dictionaries) else (
      Dictionaries.of(dictionaries, config))
  skip = None if dicts.skip is None else jax.device_put(dicts.skip)
  on_host = _host_pass.usable(params)
  if on_host:
    fields, clean = _host_pass.freeze(params, config, tokens)
    frozen = Frozen(**fields, skip=skip)
  else:
    if before_freeze is not None:
      before_freeze()
    frozen, clean = freeze(params, config, tokens, skip)
  L = config.num_layers
  acts = dicts.encode(np.asarray(clean["mlp_in"]), on_host=on_host)
  features, values = [], []
  recon = np.broadcast_to(dicts.b_dec[:, None], clean["mlp_out"].shape).copy()
  for l in range(L):
    if acts[l] is None:
      continue
    a = acts[l].copy()
    a[0] = 0.0  # BOS holds no feature nodes
    pos, lat = np.nonzero(a)
    w_dec = dicts.w_dec[l]
    k = w_dec.shape[1]
    recon[l:l + k] += np.einsum("ts,skd->ktd", a, w_dec)
    features.append(np.stack([np.full_like(pos, l), pos, lat], axis=1))
    values.append(a[pos, lat])
  if skip is not None:
    recon += np.einsum("ltd,lde->lte", np.asarray(clean["mlp_in"]),
                       dicts.skip)
  errors = jax.device_put(
      (np.asarray(clean["mlp_out"]) - recon).astype(np.float32))
  features = (np.concatenate(features) if features
              else np.zeros((0, 3), np.int64)).astype(np.int32)
  values = (np.concatenate(values) if values
            else np.zeros(0)).astype(np.float32)
  embedding = jnp.asarray(params["embedder"]["input_embedding"], jnp.float32)
  return LocalReplacement(
      tokens, frozen, clean, dicts, features, values, errors, embedding,
      embedding_mean(params))


# The public name of `build` (the package face cannot export a name that
# equals a submodule, and "build" reads too generically there).
build_replacement = build
