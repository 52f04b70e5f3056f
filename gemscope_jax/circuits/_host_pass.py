"""The clean pass of one prompt in NumPy, on the host: `freeze` without XLA.

`_replacement.freeze` runs the clean pass as three jitted programs; on a
first call in a fresh process compiling them is most of the clean pass's
cost (on 2 CPU cores at 6 tokens: 0.35 s tracing and 0.6 s compiling
against 0.16 s running), and the compile sits on the critical path of the
whole attribution. On a CPU backend the same arithmetic in NumPy needs no
compile, and its work is the same BLAS matmuls (reading the weights where
they lie: float32 parameters are viewed, not copied). The backward
programs then compile from t = 0, while this runs.

It computes what `_replacement.freeze` does, in the same order and in
float32 (the model's own pass, `_modules.Block`, with float32 compute): the
tests hold the two to float32 rounding (`test_host_pass_equals_the_jitted_pass`).
Used where the model's parameters live on the CPU with a float32 embedding
table (`usable`); elsewhere (GPU, TPU, a bfloat16 table whose
262k-row unembedding NumPy cannot multiply fast) the jitted pass serves.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from gemscope_jax import models
from gemscope_jax.models import AttentionKind


def usable(params: Any) -> bool:
  """Whether the host pass serves these parameters: a float32 embedding
  table on a CPU device."""
  table = params["embedder"]["input_embedding"]
  devices = getattr(table, "devices", lambda: set())()
  on_cpu = all(d.platform == "cpu" for d in devices) if devices else True
  return on_cpu and np.dtype(table.dtype) == np.float32


def _f32(a) -> np.ndarray:
  return np.asarray(a, np.float32)


def _inv_rms(x: np.ndarray, eps: float) -> np.ndarray:
  """1 / sqrt(mean(x^2) + eps) over the last axis, float32."""
  return (1.0 / np.sqrt(np.mean(np.square(x), axis=-1, dtype=np.float32)
                        + np.float32(eps))).astype(np.float32)


def _gain(x: np.ndarray, scale, eps: float) -> np.ndarray:
  """An RMSNorm as a per-(position, channel) multiplier (`Frozen`)."""
  return _inv_rms(x, eps)[..., None] * (np.float32(1.0) + _f32(scale))


def _rope(x: np.ndarray, sin: np.ndarray, cos: np.ndarray) -> np.ndarray:
  """Half-split rotary embedding of x (T, heads, H); sin, cos (T, 1, H/2)."""
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rope_table(config: models.Gemma3Config, layer: int, T: int):
  base, scale = config.rope(layer)
  h = config.head_dim
  fraction = np.float32(2.0) * np.arange(h // 2, dtype=np.float32) / np.float32(h)
  inv_freq = (np.float32(1.0) / (np.float32(base) ** fraction)).astype(
      np.float32)
  angles = (np.arange(T, dtype=np.float32) / np.float32(scale))[:, None]
  angles = (angles * inv_freq).astype(np.float32)
  return np.sin(angles)[:, None], np.cos(angles)[:, None]


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
  c = np.float32(np.sqrt(2.0 / np.pi))
  return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(
      c * (x + np.float32(0.044715) * x * x * x)))


def _layer(config: models.Gemma3Config, w: Any, x: np.ndarray,
           sin: np.ndarray, cos: np.ndarray, allowed: np.ndarray):
  """One block on x (T, D) and its frozen coefficients, as
  `_replacement._clean_layer` returns them."""
  c, eps = config, config.norm_eps
  T = x.shape[0]
  attn = w["attn"]
  g_pre_attn = _gain(x, w["pre_attention_norm"]["scale"], eps)
  normed = x * g_pre_attn
  # Every product reads its weight in its stored, C-contiguous layout (a
  # transposed view makes NumPy's matmul 40x slower at a few rows).
  q = np.swapaxes(normed @ _f32(attn["q_einsum"]["w"]), 0, 1)   # (T, N, H)
  kv = _f32(attn["kv_einsum"]["w"])                       # (2, K, D, H)
  k = np.swapaxes(normed @ kv[0], 0, 1)
  v = np.swapaxes(normed @ kv[1], 0, 1)
  q = q * _gain(q, attn["_query_norm"]["scale"], eps)
  k = k * _gain(k, attn["_key_norm"]["scale"], eps)
  q = _rope(q, sin, cos) * np.float32(c.query_scale)
  k = _rope(k, sin, cos)
  q = q.reshape(T, c.num_kv_heads, -1, c.head_dim)
  logits = np.einsum("tkgh,skh->kgts", q, k)
  logits = np.where(allowed, logits, np.float32(-np.inf))
  logits = logits - logits.max(axis=-1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(axis=-1, keepdims=True)
  heads = np.einsum("kgts,skh->tkgh", probs, v).reshape(T, -1)
  w_o = _f32(attn["attn_vec_einsum"]["w"]).reshape(-1, c.d_model)
  h = heads @ w_o
  g_post_attn = _gain(h, w["post_attention_norm"]["scale"], eps)
  mid = x + h * g_post_attn
  g_pre_ffw = _gain(mid, w["pre_ffw_norm"]["scale"], eps)
  mlp_in = mid * g_pre_ffw
  gate_up = _f32(w["mlp"]["gating_einsum"])               # (2, F, D)
  hidden = (_gelu_tanh(gate_up[0] @ mlp_in.T) * (gate_up[1] @ mlp_in.T)).T
  down = hidden @ _f32(w["mlp"]["linear"])
  mlp_out = down * _gain(down, w["post_ffw_norm"]["scale"], eps)
  return mid + mlp_out, (g_pre_attn, g_post_attn, g_pre_ffw, probs, mlp_in,
                         mlp_out)


def freeze(params: Any, config: models.Gemma3Config, tokens):
  """The clean pass in NumPy: (the fields of `_replacement.Frozen` but the
  skip, as a dict; clean) as `_replacement.freeze` gives them, on the
  default device (one transfer at the end)."""
  c = config
  weights, (w_v, w_o) = prepare(params, config)
  tokens = np.asarray(tokens, np.int64)
  T = len(tokens)
  table = weights["embedder"]["input_embedding"]
  embed = table[tokens].astype(np.float32) * np.float32(c.d_model ** 0.5)
  idx = np.arange(T)
  causal = idx[:, None] >= idx[None, :]
  allowed = {AttentionKind.GLOBAL: causal,
             AttentionKind.LOCAL: causal & (
                 (idx[:, None] - idx[None, :]) < c.sliding_window)}
  tables = {}
  x, layers = embed, []
  for l in range(c.num_layers):
    kind = c.attention_kind(l)
    if kind not in tables:
      tables[kind] = _rope_table(c, l, T)
    x, coefficients = _layer(c, weights[f"layer_{l}"], x, *tables[kind],
                             allowed[kind])
    layers.append(coefficients)
  g_pre_attn, g_post_attn, g_pre_ffw, probs, mlp_in, mlp_out = (
      np.stack(field) for field in zip(*layers))
  g_final = _gain(x[-1], weights["final_norm"]["scale"], c.norm_eps)
  logits = table @ (x[-1] * g_final)
  fields, clean = jax.device_put((
      {"g_pre_attn": g_pre_attn, "g_post_attn": g_post_attn,
       "g_pre_ffw": g_pre_ffw, "g_final": g_final, "probs": probs},
      {"embed": embed, "mlp_in": mlp_in, "mlp_out": mlp_out,
       "logits": logits.astype(np.float32)}))
  fields["w_v"], fields["w_o"] = w_v, w_o
  return fields, clean


# The newest model's weights as the host pass reads them: (its parameter
# tree, (NumPy float32 views of every weight, (w_v, w_o) stacked over the
# layers on the device)). Taken once per model: by `attribute` first
# thing when its rows run in NumPy too (nothing compiles then), and just
# after it starts its compile thread when they are jitted (taken before
# the thread, it had delayed the compile by its 0.2 s: first calls at 6
# tokens, four interleaved pairs, 3.2-4.3 s before, 2.7-3.2 s after). The
# stacks depend on the weights alone (per prompt they copied 60 MB,
# 0.1-0.2 s).
_PREPARED: list = []


def prepare(params: Any, config: models.Gemma3Config):
  """(NumPy float32 weights, (w_v (L, K, D, H), w_o (L, N * H, D)) on the
  device) of `params`, kept for the newest `params` seen (see above for
  when `attribute` takes it)."""
  if not (_PREPARED and _PREPARED[0] is params):
    weights = jax.tree.map(_f32, params)
    attn = [weights[f"layer_{l}"]["attn"] for l in range(config.num_layers)]
    w_v = np.stack([a["kv_einsum"]["w"][1] for a in attn])
    w_o = np.stack([a["attn_vec_einsum"]["w"].reshape(-1, config.d_model)
                    for a in attn])
    _PREPARED[:] = [params, (weights, jax.device_put((w_v, w_o)))]
  return _PREPARED[1]


# The transposed linear model in NumPy: on a CPU backend, a short prompt's
# first attribution call spent most of its time compiling the programs
# below (`_attribute._backward_rows`, `_feature_rows`), whose work is a
# few hundred milliseconds of matrix products that NumPy runs as fast.

def backward_rows(frozen: dict, embed: np.ndarray, errors: np.ndarray,
                  b_dec: np.ndarray, layer: np.ndarray, pos: np.ndarray,
                  read: np.ndarray, final: np.ndarray):
  """`_attribute._backward_rows` in NumPy: R target rows through the
  transposed linear model (`_replacement.backward`), position-major.

  Args:
    frozen: `_replacement.Frozen`'s fields as float32 NumPy arrays (skip
      None when no layer has one), cut to the batch's prefix of T tokens.
    embed: (T, D) scaled embeddings; errors: (L, T, D); b_dec: (L, D).
    layer, pos: (R,) each row's read site (a logit row: L - 1, any).
    read: (R, D) encoder columns (0 for logit rows); final: (R, D)
      demeaned unembedding rows (0 for feature rows).

  Returns:
    (gradients at every write site (L, T, R, D): position before row, so
    that one (layer, position)'s rows are one contiguous block for
    `feature_edges`; error edges (R, L * T), token edges (R, T), bias
    (R,)), float32.
  """
  g_pre, g_post, g_ffw = (frozen[k] for k in ("g_pre_attn", "g_post_attn",
                                              "g_pre_ffw"))
  probs, w_v, w_o, skip = (frozen[k] for k in ("probs", "w_v", "w_o",
                                                "skip"))
  L, T, D = g_pre.shape
  K, G = probs.shape[1:3]
  H = w_v.shape[-1]
  r = len(layer)
  top = int(layer.max())
  ct = np.zeros((T, r, D), np.float32)
  ct[T - 1] = final * frozen["g_final"]
  g_w = np.empty((L, T, r, D), np.float32)
  at_pos = np.arange(T)[:, None] == pos[None, :]                  # (T, R)
  for l in range(L - 1, -1, -1):
    g_w[l] = ct  # the gradient at layer l's write site (after its MLP)
    if l > top:  # nothing flows back from above the highest row
      continue
    reads = (at_pos & (layer == l)[None, :])[..., None] * read[None]
    if skip is not None:  # mlp_in also feeds the skip's write
      reads += (ct.reshape(-1, D) @ skip[l].T).reshape(T, r, D)
    mid = ct + reads * g_ffw[l][:, None]
    heads = ((mid * g_post[l][:, None]).reshape(-1, D) @ w_o[l].T)
    # v[s, r, k, h] = sum_{t, g} probs[k, g, t, s] heads[t, r, k, g, h]:
    # one (S, T) x (T, R * H) product per head.
    heads = heads.reshape(T, r, K * G, H).transpose(2, 0, 1, 3).copy()
    v = np.zeros((T, r, K, H), np.float32)
    for k in range(K):
      for g in range(G):
        v[:, :, k] += (probs[l, k, g].T @ heads[k * G + g].reshape(T, -1)
                       ).reshape(T, r, H)
    x = v.reshape(-1, K * H) @ w_v[l].transpose(0, 2, 1).reshape(K * H, D)
    ct = mid + x.reshape(T, r, D) * g_pre[l][:, None]
  tok = np.matmul(ct, embed[:, :, None])[..., 0].T                # (R, T)
  err = np.empty((r, L, T), np.float32)
  bias = np.zeros(r, np.float64)
  for l in range(L):
    err[:, l] = np.matmul(g_w[l], errors[l][:, :, None])[..., 0].T
    bias += (g_w[l].reshape(-1, D) @ b_dec[l]).reshape(T, r).sum(0)
  return g_w, err.reshape(r, -1), tok, bias.astype(np.float32)


def feature_edges(g_w: np.ndarray, features: np.ndarray,
                  activations: np.ndarray, w_dec: list, prefix: int):
  """Edges from the active features at positions < `prefix` into R rows,
  from the rows' gradients g_w (L, T, R, D) (`backward_rows`): what
  `_attribute._feature_rows` gives, per feature rather than per block
  slot.

  A feature (l, p, i) with activation a writes a * w_dec[l][i, j] into
  layer l + j (j < k: 1 for a transcoder, L - l for a CLT), so its edge
  into row r is a * sum_j g_w[l + j, p, r] . w_dec[l][i, j]: one product
  (R, k * D) x (k * D, n) per (layer, position), whose features are
  contiguous in `features` (sorted by layer, then position).

  Args:
    features: (n, 3) (layer, position, latent), sorted; activations (n,).
    w_dec: per layer (S, k, D) decoders (`_replacement.Dictionaries`).

  Returns:
    (indices into `features` of those at positions < prefix (m,),
    their edges (R, m)).
  """
  idx = np.flatnonzero(features[:, 1] < prefix)
  r = g_w.shape[2]
  out = np.empty((r, len(idx)), np.float32)
  f, act = features[idx], activations[idx]
  key = f[:, 0].astype(np.int64) * prefix + f[:, 1]
  starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
  for a, b in zip(starts, np.r_[starts[1:], len(idx)]):
    l, p = int(f[a, 0]), int(f[a, 1])
    w = w_dec[l]
    k = w.shape[1]
    vecs = w[f[a:b, 2]].reshape(b - a, -1) * act[a:b, None]       # (n, k*D)
    if k == 1:
      grads = g_w[l, p]                                             # (R, D)
    else:
      grads = g_w[l:l + k, p].transpose(1, 0, 2).reshape(r, -1)
    out[:, a:b] = grads @ vecs.T
  return idx, out
