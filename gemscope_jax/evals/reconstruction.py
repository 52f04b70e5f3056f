"""Reconstruction and sparsity statistics of one dictionary over eval batches.

A dictionary predicts its targets from its inputs (`dictionaries.Layout`):
an SAE reconstructs its hookpoint, a transcoder predicts mlp_out from
mlp_in, a crosscoder reconstructs one site at several layers, a CLT predicts
every layer's mlp_out from the mlp_ins. `MemberStats` accumulates, over the
kept (real, ordinary) tokens of each batch, what these metrics need:
  l0               mean number of nonzero latents per token (all layers'
                   for a CLT; l0_std: its standard deviation over tokens;
                   `{input}/l0` per layer for a CLT)
  fvu              fraction of variance unexplained, pooled over all tokens
                   (and layers): sum ||t - pred||^2 / sum ||t - mean(t)||^2
                   for target t, raw units; `{target}/fvu` per layer
  explained_variance  1 - fvu
  mse              mean over tokens of ||t - pred||^2 in raw units
                   (mse_normalized: the same in training units)
  cosine_sim       mean over tokens of cos(t, pred)
  dead_fraction    latents that never fire on the eval tokens
  dense_fraction   latents firing on more than `dense_threshold` of them
  dense_l0         the part of l0 those dense latents make (their summed
                   frequencies): how much of the sparsity budget goes to
                   latents that fire on most tokens
  prefix_fvu/M     fvu of the prediction from the first M latents only
                   (the rest zeroed; a bias and an affine skip kept), for
                   each requested prefix M of a one-layer dictionary: what
                   a Matryoshka dictionary trains its prefixes for
plus num_tokens, num_latents, dense_threshold, norm_scale (and a
transcoder's target_scale). The dictionary sees x / norm_scale, as in
training; its prediction is multiplied back by target_scale.

Caveat: dead_fraction depends on the number of eval tokens (a latent firing
once per 10^6 tokens looks dead on 10^5), and a BatchTopK module selects
over the whole padded (batch, time) block here; evaluate its JumpReLU
export.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import dictionaries
from gemscope_jax.surgery import splice as splice_lib


def _prefix_errors(recon, latents, w_dec, target_scale, t, w, prefixes):
  """(len(prefixes),) kept sums of ||t - pred_M||^2, pred_M the raw
  prediction from the first M latents: the full prediction minus what the
  later latents decode (chunk by chunk, one decode in all)."""
  bounds = (*prefixes, latents.shape[-1])
  tails = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    tails.append(jnp.einsum("btl,ld->btd", latents[..., lo:hi],
                            w_dec[lo:hi].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST))
  errs, tail = [], jnp.zeros_like(recon)
  for chunk in reversed(tails):   # the longest prefix first
    tail = tail + chunk
    pred = recon - tail * target_scale
    errs.append(jnp.sum(w * jnp.sum(jnp.square(t - pred), axis=-1)))
  return jnp.stack(errs[::-1])


@functools.partial(jax.jit,
                   static_argnames=("module", "multilayer", "prefixes"))
def _batch_stats(module, params, norm_scale, target_scale, x, target, keep,
                 counts, *, multilayer, prefixes=()):
  """Per-batch sums over the `keep` tokens, and updated firing counts.

  x, target: (B, T, d) or (B, T, n, d) raw. Errors and centred sums of
  squares are per target layer (n,) ((1,) for one hookpoint); `prefixes`
  (one-layer only) adds the errors of each prefix's prediction.
  """
  recon, latents = splice_lib.predict(module, params, norm_scale,
                                      target_scale, x, multilayer=multilayer)
  t = target.astype(jnp.float32)
  prefix_err = (_prefix_errors(recon, latents.astype(jnp.float32),
                               params["w_dec"], target_scale, t,
                               keep.astype(jnp.float32), prefixes)
                if prefixes else jnp.zeros((0,), jnp.float32))
  if not multilayer:
    t, recon = t[..., None, :], recon[..., None, :]
  w = keep.astype(jnp.float32)
  n = jnp.sum(w)
  latent_axes = tuple(range(2, latents.ndim))
  active = (latents != 0) & keep.reshape(*keep.shape,
                                         *([1] * len(latent_axes)))
  l0 = jnp.sum(active, axis=latent_axes, dtype=jnp.float32)
  err = jnp.sum(jnp.square(t - recon), axis=-1)          # (B, T, n)
  # Mean and centred sum of squares of the batch; combined across batches
  # on the host (Chan et al.), which avoids sum x^2 - N mean^2 cancellation.
  mean = jnp.sum(t * w[..., None, None], axis=(0, 1)) / jnp.maximum(n, 1.0)
  m2 = jnp.sum(w[..., None] * jnp.sum(jnp.square(t - mean), axis=-1),
               axis=(0, 1))
  tf, rf = t.reshape(*t.shape[:2], -1), recon.reshape(*t.shape[:2], -1)
  tiny = jnp.finfo(jnp.float32).tiny
  cos = jnp.sum(tf * rf, axis=-1) / jnp.maximum(
      jnp.linalg.norm(tf, axis=-1) * jnp.linalg.norm(rf, axis=-1), tiny)
  sums = {"n": n, "l0": jnp.sum(w * l0), "l0_sq": jnp.sum(w * l0 * l0),
          "err": jnp.sum(w[..., None] * err, axis=(0, 1)),
          "cos": jnp.sum(w * cos), "m2": m2, "prefix_err": prefix_err}
  return counts + jnp.sum(active, axis=(0, 1), dtype=jnp.int32), sums, mean


class MemberStats:
  """Running reconstruction statistics of one member over eval batches.

  Attributes:
    member: the dictionary.
    counts: per-latent firing counts (a device array, the latent shape).
    n: kept tokens seen so far.
  """

  def __init__(self, member: splice_lib.Member,
               prefixes: tuple[int, ...] | None = None):
    """Starts empty.

    Args:
      member: the dictionary whose predictions are scored.
      prefixes: latent counts M whose prefix_fvu/M is reported (one-layer
        dictionaries; increasing, each below the width); None: a
        Matryoshka dictionary's own prefixes, else none.

    Raises:
      ValueError: prefixes for a multi-layer dictionary, or not increasing
        counts below the width.
    """
    self.member = member
    inner = dictionaries.unwrapped(member.module)
    shape = getattr(inner, "latent_shape",
                    (int(np.shape(member.params["w_enc"])[-1]),))
    self.counts = jnp.zeros(shape, jnp.int32)
    self.n = 0
    self.acc = {k: 0.0 for k in ("l0", "l0_sq", "cos")}
    n_targets = len(member.layout.targets)
    self.err = np.zeros((n_targets,), np.float64)
    self.m2 = np.zeros((n_targets,), np.float64)
    self.mean = np.zeros((), np.float64)
    width = int(np.prod(shape))
    if prefixes is None and not member.layout.multilayer:
      prefixes = tuple(getattr(member.module, "prefixes", ()))[:-1]
    prefixes = tuple(int(m) for m in prefixes or ())
    if prefixes and (member.layout.multilayer or list(prefixes) != sorted(
        set(prefixes)) or not 0 < prefixes[0] or prefixes[-1] >= width):
      raise ValueError(
          f"eval prefixes {prefixes} for {member.name}: need a one-layer "
          f"dictionary and increasing latent counts in [1, {width})")
    self.prefixes = prefixes
    self.prefix_err = np.zeros((len(prefixes),), np.float64)

  def add(self, activations: dict, keep: jax.Array, nb: int) -> None:
    """Adds one batch.

    Args:
      activations: {hookpoint: (B, T, d) raw activations}, holding every
        hookpoint the member reads or predicts.
      keep: (B, T) bool, the tokens that count.
      nb: the number of True entries of `keep` (0: only firing counts are
        updated, the host sums are skipped).
    """
    m = self.member
    x, target = splice_lib.stacked_inputs(m, activations)
    self.counts, sums, batch_mean = _batch_stats(
        m.module, m.params, m.norm_scale, m.target_scale, x, target, keep,
        self.counts, multilayer=m.layout.multilayer, prefixes=self.prefixes)
    if not nb:
      return
    sums = jax.device_get(sums)
    batch_mean = np.asarray(batch_mean, np.float64)   # (n, d)
    delta = batch_mean - self.mean
    total = self.n + nb
    self.m2 += (np.asarray(sums["m2"], np.float64)
                + np.sum(delta * delta, axis=-1) * self.n * nb / total)
    self.mean = self.mean + delta * (nb / total)
    self.err += np.asarray(sums["err"], np.float64)
    self.prefix_err += np.asarray(sums["prefix_err"], np.float64)
    for k in ("l0", "l0_sq", "cos"):
      self.acc[k] += float(sums[k])
    self.n = total

  def metrics(self, dense_threshold: float
              ) -> tuple[dict[str, float], np.ndarray]:
    """The statistics so far.

    Args:
      dense_threshold: firing frequency above which a latent is dense.

    Returns:
      (metrics named as in the module docstring, frequency): frequency is
      the float64 fraction of kept tokens on which each latent fired, in
      the latent shape.
    """
    m = self.member
    n, a = max(self.n, 1), self.acc
    freq = np.asarray(self.counts, np.float64) / n
    l0 = a["l0"] / n
    m2, err = float(self.m2.sum()), float(self.err.sum())
    fvu = err / m2 if m2 > 0 else math.nan
    s_out = np.broadcast_to(np.asarray(m.target_scale, np.float64),
                            self.err.shape)
    s_in = np.asarray(m.norm_scale, np.float64)
    out = {
        "l0": l0, "l0_std": math.sqrt(max(a["l0_sq"] / n - l0 * l0, 0.0)),
        "fvu": fvu, "explained_variance": 1.0 - fvu, "mse": err / n,
        "mse_normalized": float(np.sum(self.err / (s_out * s_out))) / n,
        "cosine_sim": a["cos"] / n,
        "dead_fraction": float(np.mean(freq == 0)),
        "dense_fraction": float(np.mean(freq > dense_threshold)),
        "dense_l0": float(np.sum(freq[freq > dense_threshold])),
        "num_tokens": self.n, "num_latents": int(freq.size),
        "dense_threshold": float(dense_threshold),
        "norm_scale": float(s_in) if s_in.ndim == 0 else s_in.tolist(),
    }
    for size, e in zip(self.prefixes, self.prefix_err):
      out[f"prefix_fvu/{size}"] = float(e) / m2 if m2 > 0 else math.nan
    if m.layout.kind == "transcoder":
      out["target_scale"] = float(s_out[0])
    if m.layout.multilayer:
      for i, t in enumerate(m.layout.targets):
        out[f"{t}/fvu"] = (float(self.err[i] / self.m2[i]) if self.m2[i] > 0
                           else math.nan)
      if m.layout.kind == "clt":
        for i, h in enumerate(m.layout.inputs):
          out[f"{h}/l0"] = float(np.sum(freq[i]))
    return out, freq
