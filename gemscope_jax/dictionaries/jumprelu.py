"""JumpReLU sparse autoencoder, trained as Gemma Scope 1 and 2 published.

f = pre * H(pre - threshold), with a learned per-latent threshold. The step
H has no useful gradient, so the threshold learns through straight-through
estimators with a rectangle kernel of width `bandwidth`, as Gemma Scope
published them:
  d f / d threshold  = -(threshold / eps) * rect((pre - threshold) / eps)
  d H / d threshold  = -(1 / eps) * rect((pre - threshold) / eps)
  d f / d pre        = H(pre - threshold)       (the hard mask)
  d H / d pre        = 0
where rect(u) = 1 for |u| < 1/2. With `l0_preact_bandwidth` = eps' > 0 the
L0 estimator also reaches the pre-activations,
  d H / d pre = (1 / eps') * rect((pre - threshold) / eps'),
the mirror image of its threshold gradient with a kernel of its own width:
the penalty can then move the encoder, not only the thresholds. An
experiment, off by default: on the layer-6 transcoder's `runlocal` run
every width tried (0.001, 0.05, 0.3) reached the L0 target but left FVU
near 1 (README, "Transcoders, crosscoders and CLTs").

The threshold is a plain fp32 parameter (init 0.001), not a
log-parameter: under Adam a log-threshold freezes.

`JumpReLUTranscoder` is the same module read as a transcoder (mlp_in of a
layer -> its mlp_out): no pre-encoder bias, input and target each divided by
their own scalar, optionally an affine skip `x @ w_skip`.

Caveat: the training form `pre * H(pre - threshold)` equals the exported
`relu(pre) * H(pre - threshold)` only while thresholds are >= 0; a negative
threshold (never seen at the published settings) would let small negative
latents through in training that the export zeroes.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gemscope_jax.dictionaries import _base

PENALTIES = ("l0", "quadratic")


def rect_window(pre, threshold, eps):
  """The straight-through estimator's rectangle kernel: 1 where
  |pre - threshold| / eps < 1/2, else 0 (in pre's dtype)."""
  return (jnp.abs((pre - threshold) / eps) < 0.5).astype(pre.dtype)


def _sum_to_latents(g, threshold):
  # The threshold was broadcast over every leading (token) axis.
  return jnp.sum(g, axis=tuple(range(g.ndim - threshold.ndim)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump_relu(pre: jax.Array, threshold: jax.Array, eps: float) -> jax.Array:
  """pre * H(pre - threshold), with the straight-through threshold gradient."""
  return pre * (pre > threshold).astype(pre.dtype)


def _jump_relu_fwd(pre, threshold, eps):
  return jump_relu(pre, threshold, eps), (pre, threshold)


def _jump_relu_bwd(eps, res, g):
  pre, threshold = res
  g_pre = g * (pre > threshold).astype(g.dtype)
  g_th = g * (-(threshold / eps) * rect_window(pre, threshold, eps))
  return g_pre, _sum_to_latents(g_th, threshold)


jump_relu.defvjp(_jump_relu_fwd, _jump_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def step(pre: jax.Array, threshold: jax.Array, eps: float,
         preact_bandwidth: float = 0.0) -> jax.Array:
  """H(pre - threshold), with the straight-through threshold gradient (and
  its mirror image, of width `preact_bandwidth`, for `pre` when that is
  > 0)."""
  return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre, threshold, eps, preact_bandwidth):
  return step(pre, threshold, eps, preact_bandwidth), (pre, threshold)


def _step_bwd(eps, preact_bandwidth, res, g):
  pre, threshold = res
  g_th = g * (-(1.0 / eps) * rect_window(pre, threshold, eps))
  if preact_bandwidth:
    g_pre = g * ((1.0 / preact_bandwidth)
                 * rect_window(pre, threshold, preact_bandwidth))
  else:
    g_pre = jnp.zeros_like(pre)
  return g_pre, _sum_to_latents(g_th, threshold)


step.defvjp(_step_fwd, _step_bwd)


def sparsity_penalty(l0: jax.Array, kind: str, sparsity_coeff,
                     target_l0: float | None = None) -> jax.Array:
  """The sparsity term from the batch-mean (STE) L0.

  'l0' (Gemma Scope 1): coeff * L0.
  'quadratic' (Gemma Scope 2): coeff * (2 / L0*) * (L0 - L0*)^2.
  """
  if kind == "l0":
    return sparsity_coeff * l0
  if kind == "quadratic":
    return sparsity_coeff * (2.0 / target_l0) * jnp.square(l0 - target_l0)
  raise ValueError(f"sparsity_penalty must be one of {PENALTIES}, got {kind!r}")


def term_on(coeff) -> bool:
  """Whether a loss term with this coefficient is computed: a Python
  number only when non-zero; a traced value (a coefficient scheduled per
  step, `training.optim.with_freq_scaled`) always."""
  return not isinstance(coeff, (int, float)) or coeff != 0


def frequency_penalty(freq: jax.Array, max_freq: float) -> jax.Array:
  """The high-frequency term: sum_i (relu(freq_i - max_freq) / max_freq)^2.

  freq_i is latent i's firing frequency in the batch, the token mean of its
  straight-through indicator, so the term's gradient reaches the threshold
  of each latent firing on more than `max_freq` of tokens, and only those:
    d / d threshold_i = 2 relu(freq_i - max_freq) / max_freq^2
                        * -(1 / eps) * (fraction of tokens in i's window).
  Squared so that it grows with the overshoot, relative to max_freq so that
  one coefficient suits any max_freq. The Gemma Scope 2 report describes
  such a penalty in words only ("latents firing on more than 10 % of
  tokens disappear" at an aggressive setting); this form is ours.
  """
  return jnp.sum(jnp.square(jax.nn.relu(freq - max_freq) / max_freq))


def penalty_terms(pre: jax.Array, threshold: jax.Array, *, bandwidth: float,
                  kind: str, sparsity_coeff, target_l0: float | None,
                  preact_coeff: float, latent_axes: tuple[int, ...] = (-1,),
                  per_token: bool = False, preact_bandwidth: float = 0.0,
                  layer_targets: tuple[float, ...] | None = None,
                  freq_coeff: float = 0.0, max_freq: float = 0.1
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """JumpReLU's (coeff * penalty [+ pre-activation loss], metrics).

  Args:
    pre: (..., *latent_shape) fp32 pre-activations.
    threshold: latent_shape thresholds (broadcast over the token axes).
    bandwidth, kind, target_l0, preact_coeff: as the `JumpReLU` attributes.
    sparsity_coeff: penalty weight.
    latent_axes: the trailing axes one token's L0 counts over; a cross-layer
      transcoder passes (-2, -1) so its L0 is the total over layers.
    per_token: apply the penalty to each token's L0 and average (SAELens's
      quadratic form, E_t[(2/L0*)(l0_t - L0*)^2], which also penalises the
      spread of L0 over tokens) instead of to the batch-mean L0 (Gemma
      Scope 2's form, the default). The same for 'l0'.
    preact_bandwidth: > 0: the L0 estimator's gradient also reaches `pre`,
      with a kernel of this width (`step`).
    layer_targets: a CLT's per-layer targets (pre is (..., n_layers,
      d_sae)): the quadratic penalty of each layer's batch-mean L0 against
      its own target, summed over layers, in place of one penalty on the
      total.
    freq_coeff, max_freq: the high-frequency term (`frequency_penalty`),
      times sparsity_coeff so that it warms up with the L0 penalty; 0: off.
  """
  pre = pre.astype(jnp.float32)
  threshold = threshold.astype(jnp.float32)
  counts = step(pre, threshold, bandwidth, preact_bandwidth)
  token_axes = tuple(range(pre.ndim - threshold.ndim))
  if layer_targets is not None:
    layer_l0 = jnp.mean(jnp.sum(counts, axis=-1), axis=token_axes)
    sparsity = jnp.sum(sparsity_penalty(
        layer_l0, "quadratic", sparsity_coeff,
        jnp.asarray(layer_targets, jnp.float32)))
    l0 = jnp.sum(layer_l0)
  else:
    token_l0 = jnp.sum(counts, axis=latent_axes)
    l0 = jnp.mean(token_l0)
    if per_token:
      sparsity = jnp.mean(sparsity_penalty(token_l0, kind, sparsity_coeff,
                                           target_l0))
    else:
      sparsity = sparsity_penalty(l0, kind, sparsity_coeff, target_l0)
  aux = {"l0": l0}
  if preact_coeff:
    gap = jax.nn.relu(threshold - pre)
    aux["preact_loss"] = jnp.mean(jnp.sum(gap, axis=latent_axes))
    sparsity = sparsity + preact_coeff * aux["preact_loss"]
  if term_on(freq_coeff):
    freq = jnp.mean(counts, axis=token_axes)
    aux["high_freq_loss"] = frequency_penalty(freq, max_freq)
    sparsity = sparsity + sparsity_coeff * freq_coeff * aux["high_freq_loss"]
  return sparsity, aux


class JumpReLU(_base.Dictionary):
  """JumpReLU SAE (or transcoder, with d_out and pre_enc_bias=False).

  Attributes:
    bandwidth: straight-through kernel width eps, for inputs normalised to
      unit mean squared norm.
    sparsity_penalty: 'l0' (Gemma Scope 1) or 'quadratic' (Gemma Scope 2).
    target_l0: L0* of the quadratic penalty.
    threshold_init: initial threshold of every latent.
    preact_coeff: weight of the pre-activation loss
      `mean_tokens sum_latents relu(threshold - pre)` (decoder rows are unit
      norm), 0 for the published recipe. A latent that stops firing gets no
      other gradient, so without it a dead latent stays dead; with it, Adam
      moves a silent latent's encoder and threshold towards firing at the
      full learning rate, while for live latents the term is negligible
      beside the reconstruction gradient.
    l0_per_token: take the penalty of each token's L0 and average
      (`penalty_terms(per_token=True)`, SAELens's form); False (published):
      the penalty of the batch-mean L0. The trainer sets it from
      `train.l0_per_token` (the fused dense step handles only False, so the
      trainer differentiates with autodiff then).
    l0_preact_bandwidth: > 0: the penalty's L0 estimator also passes its
      gradient to the pre-activations, (1 / w) * rect((pre - threshold) / w)
      with w this width (see the module docstring); 0: the published
      estimator. Autodiff only (the dense and sparse steps implement the
      published one).
    freq_coeff: weight (relative to the L0 penalty's coefficient) of the
      high-frequency term `frequency_penalty`; 0 (published: no form given)
      turns it off.
    max_freq: the firing frequency above which `freq_coeff` penalises a
      latent.
  """
  bandwidth: float = 0.001
  sparsity_penalty: str = "quadratic"
  target_l0: float | None = None
  threshold_init: float = 0.001
  preact_coeff: float = 0.0
  l0_per_token: bool = False
  l0_preact_bandwidth: float = 0.0
  freq_coeff: float = 0.0
  max_freq: float = 0.1

  def setup(self):
    super().setup()
    if self.sparsity_penalty == "quadratic" and self.target_l0 is None:
      raise ValueError("sparsity_penalty='quadratic' needs target_l0")
    # Always fp32: thresholds near 1e-3 must be compared at fp32 resolution.
    self.threshold = _base.param(
        self, "threshold", nn.initializers.constant(self.threshold_init),
        (self.d_sae,))

  def activate(self, pre: jax.Array) -> jax.Array:
    return jump_relu(pre.astype(jnp.float32),
                     self.threshold.astype(jnp.float32), self.bandwidth)

  def penalty(self, out: _base.DictOutput, sparsity_coeff):
    return penalty_terms(
        out.pre_acts, self.threshold, bandwidth=self.bandwidth,
        kind=self.sparsity_penalty, sparsity_coeff=sparsity_coeff,
        target_l0=self.target_l0, preact_coeff=self.preact_coeff,
        per_token=self.l0_per_token, preact_bandwidth=self.l0_preact_bandwidth,
        freq_coeff=self.freq_coeff, max_freq=self.max_freq)

  @nn.nowrap
  def to_inference(self, params: _base.Params, norm_scale,
                   out_norm_scale=None) -> dict[str, jax.Array]:
    """Gemma Scope 2 arrays for raw activations; see `fold_for_inference`."""
    return _base.fold_for_inference(
        params, norm_scale, threshold=_base.leaf_value(params["threshold"]),
        pre_enc_bias=self.pre_enc_bias, out_norm_scale=out_norm_scale)

  @classmethod
  def from_config(cls, config) -> JumpReLU:
    return cls(d_in=config.d_in, d_sae=config.d_sae, d_out=config.d_out,
               pre_enc_bias=config.pre_enc_bias, dtype=jnp.dtype(config.dtype),
               dense_rank=config.dense_rank, bandwidth=config.bandwidth,
               sparsity_penalty=config.sparsity_penalty,
               target_l0=config.target_l0, preact_coeff=config.preact_coeff,
               l0_preact_bandwidth=config.l0_preact_bandwidth,
               freq_coeff=config.freq_coeff, max_freq=config.max_freq)


class JumpReLUTranscoder(JumpReLU):
  """JumpReLU transcoder: reads mlp_in of a layer, predicts its mlp_out.

  Gemma Scope 2's published JumpReLU recipe adapted: no pre-encoder bias
  (input and target are different tensors), input and target each divided
  by their own scalar (`to_inference(..., out_norm_scale=)` folds both), and
  optionally the affine skip `x @ w_skip` (`affine_skip=True`, exported as
  `affine_skip_connection`). Call `loss(x, out, target=mlp_out, ...)`.
  """
  pre_enc_bias: bool = False

  @classmethod
  def from_config(cls, config) -> JumpReLUTranscoder:
    return cls(d_in=config.d_in, d_sae=config.d_sae, d_out=config.d_out,
               pre_enc_bias=config.pre_enc_bias,
               affine_skip=config.affine_skip, dtype=jnp.dtype(config.dtype),
               dense_rank=config.dense_rank, bandwidth=config.bandwidth,
               sparsity_penalty=config.sparsity_penalty,
               target_l0=config.target_l0, preact_coeff=config.preact_coeff,
               l0_preact_bandwidth=config.l0_preact_bandwidth,
               freq_coeff=config.freq_coeff, max_freq=config.max_freq)


def to_inference(params: _base.Params, norm_scale, *, pre_enc_bias: bool = True,
                 out_norm_scale=None) -> dict[str, jax.Array]:
  """Module-free form of `JumpReLU.to_inference` (say how b_dec was used)."""
  return _base.fold_for_inference(
      params, norm_scale, threshold=_base.leaf_value(params["threshold"]),
      pre_enc_bias=pre_enc_bias, out_norm_scale=out_norm_scale)
