"""A sparsity-aware training step: the dense loss and gradients, sparsely.

A dense step is usually counted as 12 * B * d * d_sae FLOPs: six
(B, d, d_sae) matmuls (encoder and decoder forward, dL/df = g_recon @
w_dec^T, the two weight gradients, and dL/dx, which a gradient w.r.t. the
parameters skips, so 10 in practice). With an L0 of a few dozen out of
d_sae ~ 16k latents, only the encoder forward x @ w_enc has to be dense
(2 * B * d_in * d_sae). Everything downstream of the activation only
touches the n = B * L0 listed (token, latent) pairs:

  recon[b]      = b_dec + sum_{(b,i) listed} f[b,i] w_dec[i]    2 n d_out
  g_f[b,i]      = g_recon[b] . w_dec[i]                         2 n d_out
  g_w_dec[i]   += f[b,i] g_recon[b]                             2 n d_out
  g_w_enc[:,i] += g_pre[b,i] (x[b] - b_dec)                     2 n d_in
  g_b_enc[i]   += g_pre[b,i];  g_b_dec = sum_b g_recon[b] - w_enc g_b_enc

so a step costs ~2 B d_in d_sae + 8 n d (+ a few elementwise passes over the
(B, d_sae) pre-activations), i.e. ~1/6 of the dense FLOPs once L0 << d_sae.
JumpReLU lists the active pairs and those inside the straight-through
window |pre - threshold| < bandwidth / 2 (the threshold gradient needs g_f
there); TopK and BatchTopK list the kept pairs (`lax.top_k`, as the module).

Transcoders: x (B, d_in) in, target y (B, d_out) out, no pre-encoder bias;
the affine skip recon += x @ w_skip is dense but has no d_sae factor (its
gradient is x^T g_recon).

Cross-layer transcoders: the pairs are (token, source layer, latent), and
the list is ordered by source layer (the mask is packed layer-major), so
each source layer n is a block of its own: its latents read x[:, n] and
write only the output layers it may, n..n_layers-1, through the contiguous
rows of w_dec[n, :, n:, :]. The masked blocks are never read or written
(their gradient is exactly 0, as autodiff's through the mask), so a pair
costs (n_layers - n) * d, not n_layers * d.

JumpReLU's list is the listed mask's set entries, compacted once through
bit-packed words (`_pairs.compact`, ~15x faster than `jnp.nonzero` on XLA
CPU); TopK's comes from `lax.top_k` (a CLT's regrouped by source layer).
It is walked CHUNK pairs at a time, in a loop per source layer whose trip
count is that layer's pair count: each iteration gathers (CHUNK, d) rows
and scatter-adds into the accumulated gradients in place, so no (n, d)
array is ever built and the work follows the list's actual length. Lists
longer than `capacity` (JumpReLU early in training, when most latents
fire) fall back to the dense `jax.value_and_grad` of `compute_loss`,
which is faster there; the result is exact either way and
`aux['overflow']` says which ran.

Caveat: the sparse path computes the decoder side in fp32 whatever the
module's compute dtype (exactly the dense result only for fp32 modules).
XLA's CPU gathers and scatters run at a few GB/s, so the sparse ops, not
FLOPs, bound the step, and its win over the dense one grows with
d_sae / L0 (README, "Benchmarks", has measured figures; at a few % of
latents firing the dense step is faster). Matryoshka dictionaries,
crosscoders, the per-token L0 penalty, `l0_preact_bandwidth` and
`freq_coeff` are not supported here.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from gemscope_jax.dictionaries import _base
from gemscope_jax.dictionaries import clt as clt_lib
from gemscope_jax.dictionaries import jumprelu as jumprelu_lib
from gemscope_jax.dictionaries import topk as topk_lib
from gemscope_jax.training.grads import _pairs
from gemscope_jax.training.grads import dense as dense_lib

Params = dict[str, jax.Array]

# Re-exported: the compaction is part of this step's public surface.
compact = _pairs.compact

# Pairs per loop iteration. Gathering (CHUNK, d) rows and scatter-adding
# them in place ran the decoder side about 3x faster on a 2-core CPU than
# whole-list gathers, whose fresh (n, d) buffers cost more than the
# arithmetic (256 to 1024 measured alike, 2048 slower).
CHUNK = 512


@flax.struct.dataclass
class SparseOutput:
  """The forward pass of a sparse step.

  Attributes:
    recon: (B, d_out) fp32 reconstruction ((B, n_layers, d) for a CLT).
    fired: latent-shape bool, the latents > 0 on some token of the batch.
  """
  recon: jax.Array
  fired: jax.Array


class _Flat:
  """A dictionary along one flat latent axis (a CLT's (n_layers, d_sae)
  flattened, layer-major), split into source-layer blocks.

  Attributes:
    module, p: the dictionary and its unboxed parameters.
    clt: whether it is a cross-layer transcoder.
    n_layers: source layers (1 for an SAE or transcoder).
    per_layer: latents per source layer (d_sae).
    n_latents: n_layers * per_layer.
    latent_shape: the module's shape of one token's latents.
  """

  def __init__(self, module, p: Params):
    self.module, self.p = module, p
    self.clt = isinstance(module, clt_lib.CrossLayerTranscoder)
    self.n_layers = module.n_layers if self.clt else 1
    self.per_layer = module.d_sae
    self.n_latents = self.n_layers * self.per_layer
    self.latent_shape = ((self.n_layers, self.per_layer) if self.clt
                         else (self.per_layer,))

  def pre_acts(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(encoder input in fp32, (B, n_latents) fp32 pre-activations), as the
    module's own `pre_acts` computes them."""
    m, p = self.module, self.p
    xc = x.astype(jnp.float32)
    if self.clt:
      pre = jnp.einsum("bnd,ndl->bnl", xc.astype(m.dtype),
                       p["w_enc"].astype(m.dtype),
                       preferred_element_type=jnp.float32) + p["b_enc"]
      return xc, pre.reshape(x.shape[0], -1)
    if m.pre_enc_bias:
      xc = xc - p["b_dec"]
    pre = jnp.einsum("bd,dl->bl", xc.astype(m.dtype),
                     p["w_enc"].astype(m.dtype),
                     preferred_element_type=jnp.float32) + p["b_enc"]
    return xc, pre

  def layer_of(self, lat: jax.Array) -> jax.Array:
    """Source layer of flat latent ids."""
    return lat // self.per_layer

  def block(self, n: int, xc: jax.Array) -> tuple[jax.Array, jax.Array, int]:
    """Source layer n's (encoder input (B, d_in), decoder rows (d_sae, D_n),
    first output column): a CLT's layer writes columns n * d onwards."""
    if not self.clt:
      return xc, self.p["w_dec"], 0
    d = self.module.d_in
    rows = self.p["w_dec"][n, :, n:, :].reshape(self.per_layer, -1)
    return xc[:, n], rows, n * d

  def decoder_out(self, x: jax.Array, summed: jax.Array) -> jax.Array:
    """recon (B, D) from the pairs' summed decoder rows: + b_dec, + skip."""
    recon = summed + self.p["b_dec"].reshape(-1)
    if getattr(self.module, "affine_skip", False):
      m = self.module
      recon = recon + jnp.einsum("bd,de->be", x.astype(m.dtype),
                                 self.p["w_skip"].astype(m.dtype),
                                 preferred_element_type=jnp.float32)
    return recon

  def param_grads(self, x, xc, sums: list[dict[str, jax.Array]], g_recon,
                  g_pre_everywhere: float) -> Params:
    """Gradients in the parameters' shapes from each block's sums.

    Args:
      x, xc: the batch and the encoder input.
      sums: per source layer, 'enc' (d_sae, d_in) sum of g_pre x over each
        latent's pairs, 'b_enc' (d_sae,) sum of g_pre, 'w_dec' (d_sae, D_n)
        sum of f g_recon and optionally 'threshold' (d_sae,).
      g_recon: (B, D) dL/d recon.
      g_pre_everywhere: a d loss / d pre at every (token, latent).
    """
    p = self.p
    def stacked(key):
      return jnp.stack([s[key] for s in sums]).reshape(p[key].shape)
    if self.clt:
      n, s, d = self.n_layers, self.per_layer, self.module.d_in
      g_w_enc = jnp.stack([jnp.transpose(b["enc"]) for b in sums])
      # Each source layer's rows, zeros in front for the earlier (masked)
      # output layers.
      g_w_dec = jnp.stack([
          jnp.concatenate([jnp.zeros((s, i, d), jnp.float32),
                           b["w_dec"].reshape(s, n - i, d)], axis=1)
          for i, b in enumerate(sums)])
    else:
      g_w_enc, g_w_dec = sums[0]["enc"].T, sums[0]["w_dec"]
    g_b_enc = stacked("b_enc")
    if g_pre_everywhere:  # Rank-one: every latent's pre sees every token.
      g_w_enc = g_w_enc + g_pre_everywhere * jnp.sum(xc, axis=0)[..., None]
      g_b_enc = g_b_enc + g_pre_everywhere * x.shape[0]
    g_b_dec = jnp.sum(g_recon, axis=0).reshape(p["b_dec"].shape)
    if getattr(self.module, "pre_enc_bias", False):
      g_b_dec = g_b_dec - p["w_enc"] @ g_b_enc
    grads = {"w_enc": g_w_enc, "w_dec": g_w_dec, "b_enc": g_b_enc,
             "b_dec": g_b_dec}
    if "threshold" in sums[0]:
      grads["threshold"] = stacked("threshold")
    if "w_skip" in p:
      grads["w_skip"] = jnp.einsum("bd,be->de", x.astype(jnp.float32),
                                   g_recon)
    return grads


def _pre_acts(module, p: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(encoder input in fp32, (B, n_latents) pre-activations) of `module`."""
  return _Flat(module, p).pre_acts(x)


class _List:
  """The listed (token, latent) pairs of a batch, grouped by source layer.

  Attributes:
    flat: the dictionary.
    tok, lat: (length + CHUNK,) int32 token and flat latent id of each pair;
      the pairs of each source layer lie together, sorted by token. Entries
      past a layer's count are padding.
    starts, counts: (n_layers,) int32 position of each source layer's first
      pair and its number of pairs.
    pair_fn: (tok, lat, valid) -> the per-pair values (`_backward`'s) at
      flat latent ids lat; zero where not valid.
  """

  def __init__(self, flat: _Flat, tok, lat, counts, pair_fn):
    self.flat, self.pair_fn = flat, pair_fn
    self.length = tok.shape[0]
    self.tok = jnp.pad(tok.astype(jnp.int32), (0, CHUNK))
    self.lat = jnp.pad(lat.astype(jnp.int32), (0, CHUNK))
    self.counts = counts
    self.starts = jnp.cumsum(counts) - counts

  @classmethod
  def from_mask(cls, flat: _Flat, listed: jax.Array, capacity: int, pair_fn
                ) -> _List:
    """The first `capacity` True entries of a (B, n_latents) mask (packed
    layer-major, `_pairs.compact`)."""
    n_tokens = listed.shape[0]
    by_layer = listed.reshape(n_tokens, flat.n_layers, flat.per_layer)
    counts = jnp.sum(by_layer, axis=(0, 2), dtype=jnp.int32)
    q, _ = _pairs.compact(jnp.swapaxes(by_layer, 0, 1), capacity)
    size = n_tokens * flat.per_layer
    tok = (q % size) // flat.per_layer
    lat = (q // size) * flat.per_layer + q % flat.per_layer
    return cls(flat, tok, lat, counts, pair_fn)

  @classmethod
  def from_pairs(cls, flat: _Flat, tok, lat, pair_fn) -> _List:
    """Pairs sorted by token, regrouped by source layer (a stable counting
    sort, so each group stays sorted)."""
    if flat.n_layers == 1:
      return cls(flat, tok, lat, jnp.full((1,), tok.shape[0], jnp.int32),
                 pair_fn)
    layer = flat.layer_of(lat)
    onehot = (layer[:, None] == jnp.arange(flat.n_layers)).astype(jnp.int32)
    counts = jnp.sum(onehot, axis=0)
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), layer[:, None],
                               axis=1)[:, 0] - 1
    pos = (jnp.cumsum(counts) - counts)[layer] + rank
    def regroup(a):
      return jnp.zeros_like(a).at[pos].set(a, unique_indices=True)
    return cls(flat, regroup(tok), regroup(lat), counts, pair_fn)

  def walk(self, n: int, body, init):
    """`body(carry, tok, lat, local, pairs)` over source layer n's pairs,
    CHUNK at a time (padding has zero values, tok 0 and the layer's first
    latent); lat is the flat latent id, local the layer's."""
    start = self.starts[n]
    # At most the list's length (a JumpReLU list cut at its capacity).
    count = jnp.minimum(self.counts[n], self.length - start)
    first = n * self.flat.per_layer

    def step(j, carry):
      at = start + j * CHUNK
      valid = at + jnp.arange(CHUNK, dtype=jnp.int32) < start + count
      tok = jnp.where(valid, lax.dynamic_slice(self.tok, (at,), (CHUNK,)), 0)
      lat = jnp.where(valid, lax.dynamic_slice(self.lat, (at,), (CHUNK,)),
                      first)
      return body(carry, tok, lat, lat - first,
                  self.pair_fn(tok, lat, valid))
    return lax.fori_loop(0, (count + CHUNK - 1) // CHUNK, step, init)


def _decode(lst: _List, x, xc) -> jax.Array:
  """recon (B, D): each block's listed val * decoder row, summed per token."""
  flat = lst.flat
  parts = []
  for n in range(flat.n_layers):
    _, rows, col = flat.block(n, xc)

    def body(acc, tok, lat, local, pairs, rows=rows):
      del lat
      got = jnp.take(rows, local, axis=0, mode="clip")
      return acc.at[tok].add(pairs["val"][:, None] * got,
                             indices_are_sorted=True)
    init = jnp.zeros((x.shape[0], rows.shape[1]), jnp.float32)
    parts.append(jnp.pad(lst.walk(n, body, init), ((0, 0), (col, 0))))
  return flat.decoder_out(x, sum(parts))


def _backward(lst: _List, x, xc, g_recon, g_pre_everywhere: float = 0.0
              ) -> Params:
  """Parameter gradients from the pair list, block by block.

  The per-pair values (`lst.pair_fn`): 'val' (latent value, 0 where
  inactive or padding), 'd_act' (d f / d pre, 0/1), optionally 'pre_extra'
  (more d loss / d pre) and 'th_slope', 'th_const' (the threshold
  gradient th_slope * g_f + th_const).

  Args:
    lst: the pair list.
    x: the batch; xc: its encoder input.
    g_recon: (B, D) dL/d recon.
    g_pre_everywhere: a d loss / d pre added at every (token, latent), as
      rank-one updates (the pre-activation loss's dense part).
  """
  flat = lst.flat
  sums = []
  for n in range(flat.n_layers):
    x_n, rows, col = flat.block(n, xc)
    g_n = g_recon[:, col:]
    s = flat.per_layer
    init = {"w_dec": jnp.zeros(rows.shape, jnp.float32),
            "enc": jnp.zeros((s, x_n.shape[-1]), jnp.float32),
            "b_enc": jnp.zeros((s,), jnp.float32)}
    if "threshold" in flat.p:
      init["threshold"] = jnp.zeros((s,), jnp.float32)

    def body(acc, tok, lat, local, c, rows=rows, g_n=g_n, x_n=x_n):
      del lat
      g_rows = jnp.take(g_n, tok, axis=0, mode="clip")
      g_f = jnp.sum(g_rows * jnp.take(rows, local, axis=0, mode="clip"), -1)
      g_pre = g_f * c["d_act"] + c.get("pre_extra", 0.0)
      x_rows = jnp.take(x_n, tok, axis=0, mode="clip")
      out = {"w_dec": acc["w_dec"].at[local].add(c["val"][:, None] * g_rows),
             "enc": acc["enc"].at[local].add(g_pre[:, None] * x_rows),
             "b_enc": acc["b_enc"].at[local].add(g_pre)}
      if "threshold" in acc:
        out["threshold"] = acc["threshold"].at[local].add(
            c["th_slope"] * g_f + c["th_const"])
      return out
    sums.append(lst.walk(n, body, init))
  return flat.param_grads(x, xc, sums, g_recon, g_pre_everywhere)


def _dense(module, p: Params, x: jax.Array, y, sparsity_coeff):
  """Dense loss, (B, D) fp32 recon and gradients (reference and fallback)."""
  def loss_fn(q):
    loss, out = _base.compute_loss(module, q, x, sparsity_coeff=sparsity_coeff,
                                   target=y)
    return loss.total, (loss, out)
  (_, (loss, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
  recon = out.recon.astype(jnp.float32).reshape(x.shape[0], -1)
  return loss, recon, grads


def _finish(flat: _Flat, y, recon, sparsity, aux):
  """LossOutput (as the module's `loss`) and dL/d recon from recon (B, D)."""
  n_tokens = y.shape[0]
  yf = y.astype(jnp.float32).reshape(n_tokens, -1)
  err = recon - yf
  if flat.clt:  # The multi-layer loss: per-layer sums and FVUs too.
    sq = jnp.sum(jnp.square(err).reshape(n_tokens, flat.n_layers, -1), -1)
    mse_per_layer = jnp.mean(sq, axis=0)
    mse = jnp.sum(mse_per_layer)
    y3 = yf.reshape(n_tokens, flat.n_layers, -1)
    var = jnp.sum(jnp.square(y3 - jnp.mean(y3, axis=0)), axis=(0, 2))
    aux = {"fvu_per_layer": jnp.sum(sq, axis=0) / var,
           "mse_per_layer": mse_per_layer, **aux}
  else:
    mse = jnp.mean(jnp.sum(jnp.square(err), axis=-1))
  aux = {"fvu": _base.fvu(yf, recon), **aux}
  loss = _base.LossOutput(total=mse + sparsity, mse=mse, sparsity=sparsity,
                          aux=aux)
  return loss, (2.0 / n_tokens) * err


def _sparse(lst: _List, x, xc, y, sparsity, extra, g_pre_everywhere=0.0):
  """(loss, recon, grads) through the pair list."""
  recon = _decode(lst, x, xc)
  loss, g_recon = _finish(lst.flat, y, recon, sparsity, extra)
  grads = _backward(lst, x, xc, g_recon, g_pre_everywhere)
  return loss, recon, grads


def _penalty(module, l0_per_layer, sparsity_coeff):
  """JumpReLU's (coeff * penalty, d penalty / d L0 per layer (n_layers,)).

  One penalty of the total L0, or (a CLT's `l0_targets`) one quadratic
  penalty per layer summed.
  """
  targets = getattr(module, "l0_targets", None)
  if targets is not None:
    def penalty(l0):
      return jnp.sum(jumprelu_lib.sparsity_penalty(
          l0, "quadratic", sparsity_coeff, jnp.asarray(targets, jnp.float32)))
    return jax.value_and_grad(penalty)(l0_per_layer)

  def total_penalty(l0):
    return jumprelu_lib.sparsity_penalty(l0, module.sparsity_penalty,
                                         sparsity_coeff, module.target_l0)
  sparsity, d_pen = jax.value_and_grad(total_penalty)(jnp.sum(l0_per_layer))
  return sparsity, jnp.broadcast_to(d_pen, l0_per_layer.shape)


def _jumprelu(flat: _Flat, x, y, sparsity_coeff, capacity):
  module, p = flat.module, flat.p
  eps = module.bandwidth
  th = p["threshold"].astype(jnp.float32).reshape(-1)
  xc, pre = flat.pre_acts(x)
  n_tokens = pre.shape[0]
  active = pre > th
  by_layer = (n_tokens, flat.n_layers, flat.per_layer)
  counts = jnp.sum(active.reshape(by_layer), axis=(0, 2), dtype=jnp.int32)
  l0_layers = counts.astype(jnp.float32) / n_tokens
  sparsity, d_pen = _penalty(module, l0_layers, sparsity_coeff)
  # The pre-activation loss c * mean_b sum_i relu(th_i - pre_bi) has
  # d/dpre = -c/B wherever pre < th: everywhere (a rank-one update) except
  # at the active pairs, which are listed and get +c/B back.
  c_pre = module.preact_coeff / n_tokens
  extra = {"l0": jnp.sum(l0_layers)}
  if module.preact_coeff:
    preact = jnp.sum(jax.nn.relu(th - pre)) / n_tokens
    sparsity = sparsity + module.preact_coeff * preact
    extra["preact_loss"] = preact
  if flat.clt:  # What the module reports: latents != 0 per layer.
    extra["l0_per_layer"] = jnp.sum(
        (active & (pre != 0)).reshape(by_layer), axis=(0, 2),
        dtype=jnp.float32) / n_tokens
  fired = jnp.any(active & (pre > 0), axis=0).reshape(flat.latent_shape)
  pre_flat = pre.reshape(-1)

  def pair_fn(tok, lat, valid):
    p_val = pre_flat[tok * flat.n_latents + lat]
    th_val = th[lat]
    a_val = (valid & (p_val > th_val)).astype(jnp.float32)
    w_val = (valid & (jumprelu_lib.rect_window(p_val, th_val, eps) > 0)
             ).astype(jnp.float32)
    d_pen_val = d_pen[flat.layer_of(lat)] if flat.clt else d_pen[0]
    # d loss / d th at a pair: the window's straight-through terms of f
    # (times g_f) and of the L0 count, and the pre-activation loss's -c/B
    # at the active pairs (its +c/B elsewhere is added below).
    pairs = {"val": p_val * a_val, "d_act": a_val,
             "th_slope": w_val * (-(th_val / eps)),
             "th_const": -w_val * d_pen_val / (n_tokens * eps) - c_pre * a_val}
    if c_pre:
      pairs["pre_extra"] = c_pre * a_val
    return pairs

  listed = active | (jumprelu_lib.rect_window(pre, th, eps) > 0)
  n_sel = jnp.sum(listed, dtype=jnp.int32)
  overflow = n_sel > capacity
  extra["overflow"] = overflow.astype(jnp.float32)
  extra["n_selected"] = n_sel.astype(jnp.float32)

  def sparse_branch(_):
    lst = _List.from_mask(flat, listed, capacity, pair_fn)
    loss, recon, grads = _sparse(lst, x, xc, y, sparsity, extra,
                                 g_pre_everywhere=-c_pre)
    if c_pre:  # d/dth = +c/B at every pair below the threshold.
      grads["threshold"] = grads["threshold"] + module.preact_coeff
    return loss, recon, grads

  def dense_branch(_):
    loss, recon, grads = _dense(module, p, x, y, sparsity_coeff)
    return loss.replace(aux={**loss.aux, **extra}), recon, grads

  loss, recon, grads = lax.cond(overflow, dense_branch, sparse_branch, None)
  return loss, SparseOutput(recon=recon.reshape(y.shape), fired=fired), grads


def _topk(flat: _Flat, x, y, k: int, batch: bool):
  xc, pre = flat.pre_acts(x)
  n_tokens = pre.shape[0]
  acts = jax.nn.relu(pre)
  # The module's own selection (`topk.keep_top`), in token order.
  if batch:
    _, idx = lax.top_k(acts.reshape(-1), k * n_tokens)
    idx = jnp.sort(idx)
    tok, lat = idx // flat.n_latents, idx % flat.n_latents
  else:
    _, lat = lax.top_k(acts, k)
    lat = lat.reshape(-1)
    tok = jnp.repeat(jnp.arange(n_tokens, dtype=lat.dtype), k)
  pre_flat = pre.reshape(-1)
  vals = pre_flat[tok * flat.n_latents + lat]
  live = vals > 0  # Kept but not positive: a zero latent, no gradient.

  def pair_fn(tok, lat, valid):
    p_val = pre_flat[tok * flat.n_latents + lat]
    on = (valid & (p_val > 0)).astype(jnp.float32)
    return {"val": p_val * on, "d_act": on}

  extra = {"l0": jnp.sum(live, dtype=jnp.float32) / n_tokens,
           "overflow": jnp.zeros((), jnp.float32)}
  if batch:
    extra["min_kept"] = jnp.min(jnp.where(live, vals, jnp.inf))
  if flat.clt:
    extra["l0_per_layer"] = jax.ops.segment_sum(
        live.astype(jnp.float32), flat.layer_of(lat),
        flat.n_layers) / n_tokens
  lst = _List.from_pairs(flat, tok, lat, pair_fn)
  loss, recon, grads = _sparse(lst, x, xc, y, jnp.zeros((), jnp.float32),
                               extra)
  fired = jnp.zeros((flat.n_latents,), bool).at[lat].max(live)
  out = SparseOutput(recon=recon.reshape(y.shape),
                     fired=fired.reshape(flat.latent_shape))
  return loss, out, grads


def unsupported(module) -> str | None:
  """Why `sparse_loss_and_grads` cannot take `module`, or None if it can."""
  if not isinstance(module, (jumprelu_lib.JumpReLU, topk_lib.TopK,
                             clt_lib.CrossLayerTranscoder)):
    return (f"no sparse step for {type(module).__name__} (JumpReLU, TopK and "
            "BatchTopK SAEs, transcoders and cross-layer transcoders have "
            "one)")
  # Penalty options the pair list does not implement (read with getattr:
  # not every module has every one).
  for option in ("l0_per_token", "l0_preact_bandwidth", "freq_coeff"):
    if getattr(module, option, None):
      return (f"{option} is not implemented here (train.step 'dense' or "
              "'autodiff' has it)")
  return None


def sparse_loss_and_grads(module, params: Params, x: jax.Array, *,
                          sparsity_coeff, target: jax.Array | None = None,
                          capacity: int | None = None
                          ) -> tuple[_base.LossOutput, SparseOutput, Params]:
  """Loss and parameter gradients of one batch through the sparse pair list.

  Equal (to fp32 rounding) to `jax.value_and_grad` of `compute_loss` for an
  fp32 module; the gradient w.r.t. x is not computed.

  Args:
    module: a `JumpReLU`, `TopK` or `BatchTopK` SAE, a `JumpReLUTranscoder`
      or `TopKTranscoder` (affine skip or not), or a `CrossLayerTranscoder`
      (JumpReLU or TopK).
    params: parameters, boxed or not.
    x: (B, d_in) batch ((B, n_layers, d) for a CLT).
    sparsity_coeff: penalty weight (JumpReLU; ignored by TopK).
    target: what to reconstruct, (B, d_out) ((B, n_layers, d) for a CLT,
      required there); None means x.
    capacity: JumpReLU only: the most (token, latent) pairs, active or
      in-window, the list may hold; more run the dense computation instead
      (faster at such densities). None means `default_capacity`.

  Returns:
    (loss, output, grads): `loss.aux` holds what the module's `loss` reports
    ('fvu', 'l0', a CLT's per-layer entries, ...), 'overflow' (1.0 if the
    dense fallback ran) and, for JumpReLU, 'n_selected'.

  Raises:
    ValueError: for an unsupported module or option, or mis-shaped inputs.
  """
  why = unsupported(module)
  if why is not None:
    raise ValueError(f"sparse step: {why}")
  flat = _Flat(module, {k: _base.leaf_value(v) for k, v in params.items()})
  if x.ndim != (3 if flat.clt else 2):
    raise ValueError(f"x must be (B, {'n_layers, d' if flat.clt else 'd_in'})"
                     f", got shape {x.shape}")
  if target is None:
    if flat.clt:
      raise ValueError("a cross-layer transcoder's sparse step needs target= "
                       "(mlp_out of each layer)")
    target = x
  out_shape = (flat.n_layers, module.d_in) if flat.clt else (module.out_dim,)
  if target.shape != (x.shape[0], *out_shape):
    raise ValueError(f"target must have shape {(x.shape[0], *out_shape)}, got "
                     f"{target.shape}")
  jumprelu = (module.activation == "jumprelu" if flat.clt
              else isinstance(module, jumprelu_lib.JumpReLU))
  if jumprelu:
    if capacity is None:
      capacity = default_capacity(module, x.shape[0])
    return _jumprelu(flat, x, target, sparsity_coeff, int(capacity))
  return _topk(flat, x, target, module.k,
               batch=isinstance(module, topk_lib.BatchTopK))


def default_capacity(module, batch_size: int) -> int:
  """A JumpReLU list length: 4 * target_l0 per token (256 without a target;
  a CLT's target counts all its layers, or sums its `l0_targets`)."""
  target = module.target_l0
  if target is None and getattr(module, "l0_targets", None) is not None:
    target = sum(module.l0_targets)
  n_latents = module.d_sae * getattr(module, "n_layers", 1)
  per_token = 256 if target is None else int(4 * target)
  return max(32, min(per_token, n_latents)) * batch_size


def dense_loss_and_grads(module, params: Params, x: jax.Array, *,
                         sparsity_coeff, target: jax.Array | None = None,
                         autodiff: bool = False
                         ) -> tuple[_base.LossOutput, jax.Array, Params]:
  """The dense step's (loss, (B, D) fp32 recon, grads).

  Hand-derived (`dense.loss_and_grads`) for the modules it supports, else
  (or with `autodiff=True`) `jax.value_and_grad` of `compute_loss`.
  """
  if not autodiff and dense_lib.supported(module):
    loss, recon, grads, _ = dense_lib.loss_and_grads(
        module, params, x, sparsity_coeff=sparsity_coeff, target=target)
    return loss, recon, grads
  params = {k: _base.leaf_value(v) for k, v in params.items()}
  return _dense(module, params, x, target, sparsity_coeff)
