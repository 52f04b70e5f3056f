"""The dense JumpReLU training step with hand-derived gradients.

`jax.value_and_grad` of `compute_loss` is exact but leaves XLA's CPU backend
a graph in which the elementwise work around the five (tokens x d x latents)
matmuls is materialised as half a dozen (tokens, latents) arrays and reduced
over the token axis one at a time; on a 2-core CPU that costs about a third
of a step at width 16k. Here the same loss and gradients are written out:

  pre   = (x - b_dec) @ w_enc + b_enc         f = pre * (pre > threshold)
  recon = f @ w_dec + b_dec [+ x @ w_skip] [+ (x @ w_din) @ w_dout]
                                              g_r = dL/d recon = 2 (recon - y) / T
  g_f   = g_r @ w_dec^T
  g_pre, per-latent sums = one fused pass over (g_f, pre)  (kernels.jumprelu)
  (on the CPU the five matmuls run on oneDNN, `kernels.matmul`, about 10 %
  faster than XLA's dot at these shapes)
  dw_dec = (g_r^T f)^T    dw_enc = (x - b_dec)^T g_pre    db_enc = sum_t g_pre
  db_dec = sum_t g_r - w_enc db_enc   (the pre-encoder bias; without it sum_t g_r)
  dw_din = x^T (g_r @ w_dout^T)       dw_dout = (x @ w_din)^T g_r  (dense path)
  dthreshold = -(1/eps) (threshold * sum_t w g_f + dP/dL0 / T * sum_t w)
               + preact_coeff / T * sum_t [pre < threshold]
               [- (1/eps) 2 c relu(fired / T - m) / (m^2 T) * sum_t w,
                the high-frequency term, c its coefficient, m max_freq]

with w the straight-through window |pre - threshold| / eps < 1/2 and P the
sparsity penalty of the batch-mean L0 (Gemma Scope 2's quadratic
lambda (2 / L0*) (L0 - L0*)^2, or Gemma Scope 1's lambda L0). Everything is
dense (the same five matmuls as autodiff; `sparse.py` is the step that
skips work), in fp32, for `JumpReLU` SAEs and `JumpReLUTranscoder`s (with
or without the affine skip). TopK SAEs and transcoders get the same
treatment with their per-latent sums taken from the (tokens, k) selection;
other modules (BatchTopK, Matryoshka, ReLU+L1, multi-layer, bf16) use
autodiff. tests/test_dense_step.py checks values and gradients against
`jax.value_and_grad(compute_loss)`.

Caveat: sums are taken in a different order than autodiff's, so results
agree to float32 rounding, not bit for bit; a run switched between
`train.step='dense'` and `'autodiff'` mid-way resumes on a slightly different
trajectory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gemscope_jax import kernels
from gemscope_jax.dictionaries import _base
from gemscope_jax.dictionaries import jumprelu as jumprelu_lib
from gemscope_jax.dictionaries import topk as topk_lib

Params = dict[str, jax.Array]

_JUMPRELU = (jumprelu_lib.JumpReLU, jumprelu_lib.JumpReLUTranscoder)
_TOPK = (topk_lib.TopK, topk_lib.TopKTranscoder)


def supported(module) -> bool:
  """Whether `loss_and_grads` handles this module (else use autodiff)."""
  # The per-token L0 penalty (SAELens's form) and the L0 estimator's
  # pre-activation gradient are left to autodiff.
  return (type(module) in _JUMPRELU + _TOPK  # pylint: disable=unidiomatic-typecheck
          and jnp.dtype(module.dtype) == jnp.float32
          and not getattr(module, "l0_per_token", False)
          and not getattr(module, "l0_preact_bandwidth", 0.0))


class _Matmuls:
  """The step's three matmul forms, on oneDNN (CPU kernel) or XLA's dot.

  `kernels.matmul` runs f32 products on oneDNN on the CPU when its kernel is
  built (and on XLA's dot elsewhere); with `use_kernel=False` (programs
  partitioned over devices: the custom call has no sharding rule) XLA's dot
  runs everywhere.
  """

  def __init__(self, use_kernel: bool):
    self.onednn = use_kernel

  def ab(self, a, b):
    """a @ b: (T, k) x (k, n)."""
    if self.onednn:
      return kernels.matmul(a, b[None], w_transposed=False)[:, 0]
    return a @ b

  def abt(self, a, b):
    """a @ b^T: (T, k) x (n, k)."""
    if self.onednn:
      return kernels.matmul(a, b[None], w_transposed=True)[:, 0]
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())))

  def atb(self, a, b):
    """a^T b over the leading (token) axis: (T, m), (T, n) -> (m, n)."""
    if self.onednn:  # a is the narrow operand: its transpose is cheap.
      return kernels.matmul(a.T, b[None], w_transposed=False)[:, 0]
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def loss_and_grads(module, params: Params, x: jax.Array, *, sparsity_coeff,
                   target: jax.Array | None = None, use_kernel: bool = True
                   ) -> tuple[_base.LossOutput, jax.Array, Params, jax.Array]:
  """Loss, reconstruction, gradients and firing counts of one batch.

  Args:
    module: a fp32 JumpReLU or TopK SAE or transcoder (`supported(module)`).
    params: its parameters (boxed or not).
    x: (T, d_in) input batch in training units.
    sparsity_coeff: penalty weight, already warmed up.
    target: (T, d_out) what to reconstruct; None means x.
    use_kernel: allow the CPU kernels, the fused JumpReLU pass and oneDNN
      matmuls (pass False inside programs partitioned over several devices).

  Returns:
    (LossOutput as `compute_loss` gives it, recon (T, d_out) fp32, grads
    (same keys as params), (d_sae,) fp32 number of tokens each latent fired
    on).

  Raises:
    ValueError: for a module `supported` rejects or a non-2-D batch.
  """
  if not supported(module):
    raise ValueError(f"dense.loss_and_grads handles fp32 JumpReLU and TopK "
                     f"SAEs and transcoders, not {type(module).__name__} with "
                     f"dtype {jnp.dtype(module.dtype)}")
  if x.ndim != 2:
    raise ValueError(f"x must be (tokens, d_in), got shape {x.shape}")
  p = {k: _base.leaf_value(v).astype(jnp.float32) for k, v in params.items()}
  n = x.shape[0]
  x = x.astype(jnp.float32)
  y = x if target is None else target.astype(jnp.float32)
  xc = x - p["b_dec"] if module.pre_enc_bias else x
  mm = _Matmuls(use_kernel)
  xw = mm.ab(xc, p["w_enc"])
  if type(module) in _TOPK:  # pylint: disable=unidiomatic-typecheck
    return _topk(module, mm, p, params, x, y, xc, xw)

  eps = module.bandwidth
  th = p["threshold"]
  pre = xw + p["b_enc"]
  f = pre * (pre > th).astype(jnp.float32)
  recon, mse, g_r, g_f = _decode_and_backward(module, mm, p, x, y, f)
  c_pre = module.preact_coeff / n
  g_pre, sums = kernels.jumprelu_grad(g_f, xw, th, bandwidth=eps,
                                      below_grad=-c_pre, bias=p["b_enc"],
                                      use_kernel=use_kernel)
  window_g, window, fired, g_b_enc, below, gap = sums

  l0 = jnp.sum(fired) / n
  def penalty(l0):
    return jumprelu_lib.sparsity_penalty(l0, module.sparsity_penalty,
                                         sparsity_coeff, module.target_l0)
  sparsity, d_pen = jax.value_and_grad(penalty)(l0)
  aux = {"fvu": _base.fvu(y, recon), "l0": l0}
  g_th = -(1.0 / eps) * (th * window_g + (d_pen / n) * window)
  if jumprelu_lib.term_on(module.freq_coeff):
    # sparsity_coeff * freq_coeff * sum_i (relu(fired_i / n - m) / m)^2.
    m = module.max_freq
    over = jax.nn.relu(fired / n - m) / m
    aux["high_freq_loss"] = jumprelu_lib.frequency_penalty(fired / n, m)
    c_freq = sparsity_coeff * module.freq_coeff
    sparsity = sparsity + c_freq * aux["high_freq_loss"]
    g_th = g_th - (1.0 / eps) * (2.0 * c_freq * over / (m * n)) * window
  if module.preact_coeff:
    aux["preact_loss"] = jnp.sum(gap) / n
    sparsity = sparsity + module.preact_coeff * aux["preact_loss"]
    g_th = g_th + c_pre * below

  grads = _weight_grads(module, mm, p, x, xc, f, g_r, g_pre, g_b_enc)
  grads["threshold"] = g_th
  grads = {k: grads[k] for k in params}
  loss = _base.LossOutput(total=mse + sparsity, mse=mse, sparsity=sparsity,
                          aux=aux)
  return loss, recon, grads, fired


def _decode_and_backward(module, mm: _Matmuls, p, x, y, f):
  """(recon, mse, dL/d recon, dL/d latents) from the latents f."""
  recon = mm.ab(f, p["w_dec"]) + p["b_dec"]
  if module.affine_skip:
    recon = recon + mm.ab(x, p["w_skip"])
  if module.dense_rank:
    recon = recon + (x @ p["w_dense_in"]) @ p["w_dense_out"]
  err = recon - y
  mse = jnp.mean(jnp.sum(jnp.square(err), axis=-1))
  g_r = (2.0 / x.shape[0]) * err
  g_f = mm.abt(g_r, p["w_dec"])
  return recon, mse, g_r, g_f


def _weight_grads(module, mm: _Matmuls, p, x, xc, f, g_r, g_pre, g_b_enc
                  ) -> Params:
  grads = {
      "w_enc": mm.atb(xc, g_pre),
      # (g_r^T f)^T: f, not g_r, is the (T, d_sae) operand.
      "w_dec": mm.atb(g_r, f).T,
      "b_enc": g_b_enc,
      "b_dec": (jnp.sum(g_r, axis=0) - p["w_enc"] @ g_b_enc
                if module.pre_enc_bias else jnp.sum(g_r, axis=0)),
  }
  if module.affine_skip:
    grads["w_skip"] = mm.atb(x, g_r)
  if module.dense_rank:
    # Rank k is small: plain XLA dots (the (T, k) products are cheap).
    grads["w_dense_in"] = x.T @ (g_r @ p["w_dense_out"].T)
    grads["w_dense_out"] = (x @ p["w_dense_in"]).T @ g_r
  return grads


def _topk(module, mm: _Matmuls, p, params, x, y, xc, xw):
  """TopK: the k largest ReLU'd pre-activations per token, as `keep_top`.

  Per-latent sums come from the (T, k) selection (scatter-adds into d_sae
  entries) instead of reductions over the (T, d_sae) arrays.
  """
  n, d_sae = xw.shape
  acts = jax.nn.relu(xw + p["b_enc"])
  vals, idx = lax.top_k(acts, module.k)
  kept = vals > 0
  rows = jnp.arange(n)[:, None]
  f = jnp.zeros_like(acts).at[rows, idx].set(vals, unique_indices=True)
  recon, mse, g_r, g_f = _decode_and_backward(module, mm, p, x, y, f)
  g_kept = jnp.where(kept, jnp.take_along_axis(g_f, idx, axis=-1), 0.0)
  g_pre = jnp.zeros_like(acts).at[rows, idx].set(g_kept, unique_indices=True)
  g_b_enc = jnp.zeros((d_sae,), jnp.float32).at[idx].add(g_kept)
  fired = jnp.zeros((d_sae,), jnp.float32).at[idx].add(
      kept.astype(jnp.float32))
  grads = _weight_grads(module, mm, p, x, xc, f, g_r, g_pre, g_b_enc)
  grads = {k: grads[k] for k in params}
  aux = {"fvu": _base.fvu(y, recon),
         "l0": jnp.mean(jnp.sum(kept, axis=-1, dtype=jnp.float32))}
  zero = jnp.zeros((), jnp.float32)
  loss = _base.LossOutput(total=mse + zero, mse=mse, sparsity=zero, aux=aux)
  return loss, recon, grads, fired
