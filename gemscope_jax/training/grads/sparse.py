"""A sparsity-aware training step: the dense loss and gradients, sparsely.

A dense SAE step is usually counted as 12 * B * d_in * d_sae FLOPs: six
(B, d_in, d_sae) matmuls (encoder and decoder forward, dL/df = g_recon @
w_dec^T, the two weight gradients, and dL/dx, which a gradient w.r.t. the
parameters skips, so 10 in practice). With an
L0 of a few dozen out of d_sae ~ 16k latents, only the encoder forward
x @ w_enc has to be dense (2 * B * d_in * d_sae). Everything downstream of the
activation only touches the n = B * L0 active (token, latent) pairs:

  recon[b]      = b_dec + sum_{(b,i) active} f[b,i] w_dec[i]    2 n d_out
  g_f[b,i]      = g_recon[b] . w_dec[i]                         2 n d_out
  g_w_dec[i]   += f[b,i] g_recon[b]                             2 n d_out
  g_w_enc[:,i] += g_pre[b,i] (x[b] - b_dec)                     2 n d_in
  g_b_enc[i]   += g_pre[b,i];  g_b_dec = sum_b g_recon[b] - w_enc g_b_enc

so a step costs ~2 B d_in d_sae + 8 n d (+ a few elementwise passes over the
(B, d_sae) pre-activations), i.e. ~1/6 of the dense FLOPs once L0 << d_sae.
JumpReLU's straight-through threshold gradient also needs g_f at the pairs
inside the rectangle window |pre - threshold| < bandwidth / 2, so for it the
list holds the union of active and in-window pairs.

The list comes from a fixed-capacity compaction of the flat (B * d_sae) mask
(`compact`): the mask is bit-packed into uint32 words (one fused pass), the
words' popcounts are prefix-summed, and each output slot finds its word by
binary search and its bit by a 5-step popcount bisection. On XLA CPU this is
~15x faster than `jnp.nonzero(size=...)` (whose cumsum+scatter over 67M
entries takes about a second). The list is in row-major order, i.e. sorted by
token, so the decoder forward is a sorted segment-sum. TopK needs no
compaction: `lax.top_k` already gives exactly k pairs per token (BatchTopK:
k * B pairs overall).

XLA's gathers and scatters cost as much on padding slots as on real pairs,
so the JumpReLU list length is picked per batch by `lax.switch` among a few
compiled lengths (`buckets(capacity)`, ratio 1.5 apart); when more pairs are
selected than `capacity`, the last branch runs the dense `jax.value_and_grad`
of `compute_loss` instead, so the result is always exact and
`aux['overflow']` says that it ran. For TopK the pairs are exactly k per
token, so the per-token rows are broadcasts instead of gathers.

Caveat: the sparse path computes the decoder side in fp32 whatever the
module's compute dtype (exactly the dense result only for fp32 modules), and
XLA's CPU gather/scatter run at a few GB/s, so the sparse ops, not FLOPs,
bound the step; the win over dense grows with d_sae / L0. Matryoshka and
transcoder targets are not supported here.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from gemscope_jax.dictionaries import _base
from gemscope_jax.training.grads import dense as dense_lib
from gemscope_jax.dictionaries import jumprelu as jumprelu_lib
from gemscope_jax.dictionaries import topk as topk_lib

Params = dict[str, jax.Array]


@flax.struct.dataclass
class SparseOutput:
  """The forward pass of a sparse step, without any (B, d_sae) array.

  Attributes:
    recon: (B, d_out) fp32 reconstruction.
    token_ids: (n,) int32 token of each listed pair (0 on padding).
    latent_ids: (n,) int32 latent of each listed pair (0 on padding).
    values: (n,) fp32 latent value of each pair; 0 on padding and on
      in-window-but-inactive JumpReLU pairs. If the overflow fallback ran,
      the list is truncated to its capacity (recon is still exact).
  """
  recon: jax.Array
  token_ids: jax.Array
  latent_ids: jax.Array
  values: jax.Array


def _pack(mask: jax.Array):
  """Bit-packed words of the flat mask, their popcounts and inclusive cumsum."""
  flat = mask.reshape(-1)
  pad = (-flat.size) % 32
  if pad:
    flat = jnp.concatenate([flat, jnp.zeros((pad,), flat.dtype)])
  shifts = jnp.arange(32, dtype=jnp.uint32)
  words = jnp.sum(flat.reshape(-1, 32).astype(jnp.uint32) << shifts, axis=-1,
                  dtype=jnp.uint32)
  counts = lax.population_count(words).astype(jnp.int32)
  return words, counts, jnp.cumsum(counts)


def _select(packed, capacity: int) -> jax.Array:
  """The first `capacity` set-bit positions of packed words (0 past the end)."""
  words, counts, incl = packed
  slot = jnp.arange(capacity, dtype=jnp.int32)
  word = jnp.minimum(jnp.searchsorted(incl, slot, side="right"),
                     words.size - 1).astype(jnp.int32)
  rank = slot - (incl[word] - counts[word])
  bits = words[word]
  pos = jnp.zeros_like(slot)
  for width in (16, 8, 4, 2, 1):
    low = (bits >> pos.astype(jnp.uint32)) & jnp.uint32((1 << width) - 1)
    c = lax.population_count(low).astype(jnp.int32)
    high = rank >= c
    rank = jnp.where(high, rank - c, rank)
    pos = jnp.where(high, pos + width, pos)
  return jnp.where(slot < incl[-1], word * 32 + pos, 0)


def compact(mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Flat indices of the first `capacity` True entries of `mask`, and the count.

  Same result as `jnp.nonzero(mask.ravel(), size=capacity, fill_value=0)`,
  but through bit-packed words (see the module docstring).

  Args:
    mask: boolean array (its flat form is padded to a multiple of 32).
    capacity: length of the returned index list.

  Returns:
    (idx, total): (capacity,) int32 flat indices in increasing order (0 past
    the end of the list), and the int32 number of True entries (may exceed
    `capacity`).
  """
  packed = _pack(mask)
  return _select(packed, capacity), packed[2][-1]


def buckets(capacity: int, n_buckets: int = 5, ratio: float = 1.5
            ) -> tuple[int, ...]:
  """List lengths tried in turn: capacity, capacity / ratio, ... (ascending)."""
  sizes = {max(32, int(round(capacity / ratio**i))) for i in range(n_buckets)}
  return tuple(sorted(sizes))


def _pre_acts(module, p: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x centred or not in fp32, pre-activations), as `Dictionary.pre_acts`."""
  xc = x.astype(jnp.float32)
  if module.pre_enc_bias:
    xc = xc - p["b_dec"]
  pre = jnp.einsum("bd,dl->bl", xc.astype(module.dtype),
                   p["w_enc"].astype(module.dtype),
                   preferred_element_type=jnp.float32) + p["b_enc"]
  return xc, pre


def _decode(p: Params, tok, lat, val, n_tokens: int, sorted_tokens: bool):
  rows = val[:, None] * p["w_dec"][lat]
  return jax.ops.segment_sum(rows, tok, n_tokens,
                             indices_are_sorted=sorted_tokens) + p["b_dec"]


def _backward(module, p: Params, xc, tok, lat, f_val, g_f_mask, g_th_extra,
              recon_grad, n_tokens: int, per_token: int | None = None,
              g_pre_extra=None, g_pre_everywhere: float = 0.0):
  """Parameter gradients from the pair list.

  Args:
    module: the dictionary.
    p: parameters.
    xc: (B, d_in) encoder input (x - b_dec when pre_enc_bias).
    tok, lat: (n,) pair coordinates.
    f_val: (n,) latent values (0 where inactive or padding).
    g_f_mask: (n,) d f / d pre at each pair (0/1).
    g_th_extra: None, or a function (g_f) -> (n,) per-pair threshold grads.
    recon_grad: (B, d_out) dL/d recon.
    n_tokens: B.
    per_token: k when the pairs are exactly k per token in token order (TopK).
    g_pre_extra: None, or (n,) more d loss / d pre at the pairs.
    g_pre_everywhere: a d loss / d pre added at every (token, latent), as
      rank-one updates (the pre-activation loss's dense part).

  Returns:
    The gradient dict.
  """
  d_sae = p["w_enc"].shape[1]
  if per_token is None:
    def by_pair(a):  # (B, d) -> (n, d): the row of each pair's token.
      return a[tok]
  else:  # Pairs are k per token in token order: a broadcast, no gather.
    def by_pair(a):
      return jnp.broadcast_to(a[:, None, :], (n_tokens, per_token, a.shape[-1])
                              ).reshape(-1, a.shape[-1])
  g_f = jnp.sum(by_pair(recon_grad) * p["w_dec"][lat], axis=-1)
  g_pre = g_f * g_f_mask
  if g_pre_extra is not None:
    g_pre = g_pre + g_pre_extra
  g_w_dec = jax.ops.segment_sum(f_val[:, None] * by_pair(recon_grad), lat,
                                d_sae)
  g_w_enc = jax.ops.segment_sum(g_pre[:, None] * by_pair(xc), lat, d_sae).T
  g_b_enc = jax.ops.segment_sum(g_pre, lat, d_sae)
  if g_pre_everywhere:
    g_w_enc = g_w_enc + g_pre_everywhere * jnp.sum(xc, axis=0)[:, None]
    g_b_enc = g_b_enc + g_pre_everywhere * n_tokens
  g_b_dec = jnp.sum(recon_grad, axis=0)
  if module.pre_enc_bias:
    g_b_dec = g_b_dec - p["w_enc"] @ g_b_enc
  grads = {"w_enc": g_w_enc, "w_dec": g_w_dec, "b_enc": g_b_enc,
           "b_dec": g_b_dec}
  if g_th_extra is not None:
    grads["threshold"] = jax.ops.segment_sum(g_th_extra(g_f), lat, d_sae)
  return grads


def _dense(module, p: Params, x: jax.Array, sparsity_coeff):
  """Dense loss, metrics and gradients (the reference and the fallback)."""
  def loss_fn(q):
    loss, out = _base.compute_loss(module, q, x, sparsity_coeff=sparsity_coeff)
    return loss.total, (loss, out)
  (_, (loss, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
  return loss, out.recon.astype(jnp.float32), grads


def _finish(x, recon, sparsity, aux):
  """LossOutput and dL/d recon from the reconstruction."""
  xf = x.astype(jnp.float32)
  err = recon - xf
  mse = jnp.mean(jnp.sum(jnp.square(err), axis=-1))
  aux = {"fvu": _base.fvu(xf, recon), **aux}
  loss = _base.LossOutput(total=mse + sparsity, mse=mse, sparsity=sparsity,
                          aux=aux)
  return loss, (2.0 / x.shape[0]) * err


def _jumprelu(module, p, x, sparsity_coeff, capacity):
  eps = module.bandwidth
  th = p["threshold"].astype(jnp.float32)
  xc, pre = _pre_acts(module, p, x)
  n_tokens, d_sae = pre.shape
  active = pre > th
  window = jumprelu_lib.rect_window(pre, th, eps) > 0
  n_active = jnp.sum(active, dtype=jnp.int32)
  packed = _pack(active | window)
  n_sel = packed[2][-1]

  l0 = n_active.astype(jnp.float32) / n_tokens
  def penalty(l0):
    return jumprelu_lib.sparsity_penalty(l0, module.sparsity_penalty,
                                         sparsity_coeff, module.target_l0)
  sparsity, d_pen = jax.value_and_grad(penalty)(l0)
  # The pre-activation loss c * mean_b sum_i relu(th_i - pre_bi) has
  # d/dpre = -c/B wherever pre < th: everywhere (a rank-one update) except
  # at the active pairs, which are in the list and get +c/B back.
  c_pre = module.preact_coeff / n_tokens
  if module.preact_coeff:
    preact = jnp.sum(jax.nn.relu(th - pre)) / n_tokens
    sparsity = sparsity + module.preact_coeff * preact
  sizes = buckets(capacity)
  overflow = n_sel > sizes[-1]
  extra = {"l0": l0, "overflow": overflow.astype(jnp.float32),
           "n_selected": n_sel.astype(jnp.float32)}
  if module.preact_coeff:
    extra["preact_loss"] = preact
  # Every branch returns lists of the largest size (padded) so the
  # branches agree on shapes; the work runs on the bucket's length only.
  full = sizes[-1]

  def pad(a):
    return jnp.pad(a, (0, full - a.shape[0]))

  def sparse_branch(size):
    def run(_):
      idx = _select(packed, size)
      tok, lat = idx // d_sae, idx % d_sae
      valid = jnp.arange(size) < n_sel
      p_val = pre.reshape(-1)[idx]
      th_val = th[lat]
      a_val = (valid & (p_val > th_val)).astype(jnp.float32)
      w_val = (valid & (jumprelu_lib.rect_window(p_val, th_val, eps) > 0)
               ).astype(jnp.float32)
      f_val = p_val * a_val
      recon = _decode(p, tok, lat, f_val, n_tokens, True)
      loss, g_recon = _finish(x, recon, sparsity, extra)
      def g_th(g_f):
        per_count = d_pen / n_tokens * (-1.0 / eps)
        return w_val * (g_f * (-(th_val / eps)) + per_count) - c_pre * a_val
      grads = _backward(module, p, xc, tok, lat, f_val, a_val, g_th, g_recon,
                        n_tokens, g_pre_extra=c_pre * a_val if c_pre else None,
                        g_pre_everywhere=-c_pre)
      if c_pre:  # d/dth = +c/B at every pair below the threshold.
        grads["threshold"] = grads["threshold"] + module.preact_coeff
      return loss, recon, grads, (pad(tok), pad(lat), pad(f_val))
    return run

  def dense_branch(_):
    loss, recon, grads = _dense(module, p, x, sparsity_coeff)
    loss = loss.replace(aux={**loss.aux, **extra})
    idx = _select(packed, full)
    tok, lat = idx // d_sae, idx % d_sae
    f_val = pre.reshape(-1)[idx]
    f_val = jnp.where((f_val > th[lat]) & (jnp.arange(full) < n_sel), f_val,
                      0.0)
    return loss, recon, grads, (tok, lat, f_val)

  branch = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), n_sel)
  loss, recon, grads, (tok, lat, f_val) = lax.switch(
      branch, [sparse_branch(size) for size in sizes] + [dense_branch], None)
  out = SparseOutput(recon=recon, token_ids=tok, latent_ids=lat, values=f_val)
  return loss, out, grads


def _topk(module, p, x, batch: bool):
  xc, pre = _pre_acts(module, p, x)
  n_tokens, d_sae = pre.shape
  acts = jax.nn.relu(pre)
  k = module.k
  if batch:
    vals, idx = lax.top_k(acts.reshape(-1), k * n_tokens)
    tok, lat = idx // d_sae, idx % d_sae
  else:
    vals, lat = lax.top_k(acts, k)
    vals, lat = vals.reshape(-1), lat.reshape(-1)
    tok = jnp.repeat(jnp.arange(n_tokens, dtype=lat.dtype), k)
  live = (vals > 0).astype(jnp.float32)
  if batch:
    recon = _decode(p, tok, lat, vals, n_tokens, False)
  else:
    recon = jnp.einsum("bk,bkd->bd", vals.reshape(n_tokens, k),
                       p["w_dec"][lat].reshape(n_tokens, k, -1)) + p["b_dec"]
  extra = {"l0": jnp.sum(live) / n_tokens,
           "overflow": jnp.zeros((), jnp.float32)}
  if batch:
    extra["min_kept"] = jnp.min(jnp.where(vals > 0, vals, jnp.inf))
  loss, g_recon = _finish(x, recon, jnp.zeros((), jnp.float32), extra)
  grads = _backward(module, p, xc, tok, lat, vals, live, None, g_recon,
                    n_tokens, per_token=None if batch else k)
  out = SparseOutput(recon=recon, token_ids=tok, latent_ids=lat, values=vals)
  return loss, out, grads


def sparse_loss_and_grads(module, params: Params, x: jax.Array, *,
                          sparsity_coeff, capacity: int | None = None
                          ) -> tuple[_base.LossOutput, SparseOutput, Params]:
  """Loss and parameter gradients of one batch through the sparse pair list.

  Equal (to fp32 rounding) to `jax.value_and_grad` of `compute_loss` for an
  fp32 module; the gradient w.r.t. x is not computed.

  Args:
    module: a `JumpReLU`, `TopK` or `BatchTopK` SAE (d_out == d_in).
    params: unboxed parameters (w_enc, w_dec, b_enc, b_dec[, threshold]).
    x: (B, d_in) batch.
    sparsity_coeff: penalty weight (JumpReLU; ignored by TopK).
    capacity: JumpReLU only: the longest (token, latent) list, covering the
      active and in-window pairs; more falls back to the dense computation.
      None means 4 * target_l0 * B (or 256 * B without a target). Shorter
      lists (`buckets(capacity)`, each compiled) are used when they suffice,
      since XLA's gathers cost the same on padding as on real pairs.

  Returns:
    (loss, output, grads): `loss.aux` holds 'fvu', 'l0', 'overflow' (1.0 if
    the dense fallback ran) and, for JumpReLU, 'n_selected'.
  """
  if x.ndim != 2:
    raise ValueError(f"x must be (B, d_in), got shape {x.shape}")
  if module.out_dim != module.d_in:
    raise ValueError("sparse steps support SAEs only (d_out == d_in)")
  if getattr(module, "affine_skip", False):
    raise ValueError("sparse steps have no affine skip connection")
  params = {k: _base.leaf_value(v) for k, v in params.items()}
  if isinstance(module, jumprelu_lib.JumpReLU):
    if capacity is None:
      capacity = default_capacity(module, x.shape[0])
    return _jumprelu(module, params, x, sparsity_coeff, int(capacity))
  if isinstance(module, topk_lib.TopK):
    return _topk(module, params, x,
                 batch=isinstance(module, topk_lib.BatchTopK))
  raise TypeError(f"no sparse step for {type(module).__name__}")


def default_capacity(module, batch_size: int) -> int:
  """A JumpReLU list length: 4 * target_l0 per token (256 without a target)."""
  per_token = 256 if module.target_l0 is None else int(4 * module.target_l0)
  return max(32, min(per_token, module.d_sae)) * batch_size


def dense_loss_and_grads(module, params: Params, x: jax.Array, *,
                         sparsity_coeff, autodiff: bool = False
                         ) -> tuple[_base.LossOutput, jax.Array, Params]:
  """The dense step's (loss, recon, grads).

  Hand-derived (`dense.loss_and_grads`) for the modules it supports, else
  (or with `autodiff=True`) `jax.value_and_grad` of `compute_loss`.
  """
  if not autodiff and dense_lib.supported(module):
    loss, recon, grads, _ = dense_lib.loss_and_grads(
        module, params, x, sparsity_coeff=sparsity_coeff)
    return loss, recon, grads
  params = {k: _base.leaf_value(v) for k, v in params.items()}
  return _dense(module, params, x, sparsity_coeff)
