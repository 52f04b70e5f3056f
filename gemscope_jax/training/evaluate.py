"""Evaluate a trained sparse dictionary on held-out text.

Every real, ordinary token of the eval windows (padding and special tokens,
see `activations.special_mask`, excluded) contributes to:
  l0               mean number of nonzero latents per token (l0_std: its
                   standard deviation over tokens)
  fvu              fraction of variance unexplained, pooled over all tokens:
                   sum ||x - recon||^2 / sum ||x - mean(x)||^2, raw units
  explained_variance  1 - fvu
  mse              mean over tokens of ||x - recon||^2 in raw units
                   (mse_normalized: the same in training units, / norm_scale^2)
  cosine_sim       mean over tokens of cos(x, recon)
  dead_fraction    latents that never fire on the eval tokens
  dense_fraction   latents firing on more than `dense_threshold` of them
The model's next-token loss (nats, over the (token, next token) pairs of real
tokens, as `models.forward` computes it) is measured three ways:
  clean_loss          the unmodified model
  spliced_loss        x replaced by the dictionary's reconstruction
  zero_ablation_loss  x replaced by zeros
  delta_lm_loss = spliced - clean
  loss_recovered = (zero - spliced) / (zero - clean)
Only ordinary tokens are replaced in the spliced and zero-ablated passes:
special tokens (BOS's residual is a huge outlier the dictionary never saw)
keep their activations. All three passes run one program (`splice_edit`)
whose per-batch masks in `edit_args` say which positions to reconstruct or
zero, so they share one compilation and the same rounding.
With `loss_tokens`, only the leading windows get the three loss passes (full
model and logits: most of the cost); the statistics above use all windows.
Plus num_tokens (ordinary tokens), num_special, num_pairs (loss pairs),
loss_tokens (window positions in the loss passes),
num_latents. The dictionary sees x / norm_scale, as in training.

Caveat: dead_fraction depends on the number of eval tokens (a latent firing
once per 10^6 tokens looks dead on 10^5), and a BatchTopK module selects over
the whole padded (batch, time) block here; evaluate its JumpReLU export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gemscope_jax import assets
from gemscope_jax import models
from gemscope_jax.activations import special_mask
from gemscope_jax.data.windows import Windows


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """metrics: {name: float} (see the module docstring); frequency: (d_sae,)
  float64 fraction of eval tokens on which each latent fired."""
  metrics: dict[str, float]
  frequency: np.ndarray


def _edit(module: nn.Module, x: jax.Array, args: dict) -> jax.Array:
  """x with `splice` positions reconstructed and `zero` positions zeroed."""
  s = args["norm_scale"]
  out = module.apply({"params": args["params"]}, x.astype(jnp.float32) / s)
  recon = (out.recon.astype(jnp.float32) * s).astype(x.dtype)
  x = jnp.where(args["zero"][..., None], jnp.zeros_like(x), x)
  return jnp.where(args["splice"][..., None], recon, x)


@functools.lru_cache(maxsize=64)
def splice_edit(module: nn.Module) -> models.EditFn:
  """The `EditFn` evaluation runs at the hookpoint; args from `edit_args`.

  Clean, spliced and zero-ablated passes all run this one program with
  different masks, so they share one compilation and the same numerics (a
  bf16 model otherwise keeps excess precision through an unedited
  hookpoint and rounds at an edited one, faking a loss delta). Cached per
  (hashable, field-equal) module, so evaluating same-shaped dictionaries
  again reuses the compiled forward pass.
  """
  return functools.partial(_edit, module)


def edit_args(params, norm_scale, *, splice: jax.Array, zero: jax.Array
              ) -> dict[str, Any]:
  """Arguments of `splice_edit(module)`: (B, T) bool masks of the positions
  to reconstruct and to zero (neither: left as they are)."""
  return {"params": params, "norm_scale": jnp.asarray(norm_scale, jnp.float32),
          "splice": jnp.asarray(splice, bool), "zero": jnp.asarray(zero, bool)}


@functools.partial(jax.jit, static_argnames=("module",))
def _batch_stats(module, params, norm_scale, x, keep, counts):
  """Per-batch sums over the `keep` tokens, and updated firing counts."""
  x = x.astype(jnp.float32)
  out = module.apply({"params": params}, x / norm_scale)
  recon = out.recon.astype(jnp.float32) * norm_scale
  w = keep.astype(jnp.float32)
  n = jnp.sum(w)
  active = (out.latents != 0) & keep[..., None]
  l0 = jnp.sum(active, axis=-1, dtype=jnp.float32)
  err = jnp.sum(jnp.square(x - recon), axis=-1)
  # Mean and centred sum of squares of the batch; combined across batches
  # on the host (Chan et al.), which avoids sum x^2 - N mean^2 cancellation.
  mean = jnp.sum(x * w[..., None], axis=(0, 1)) / jnp.maximum(n, 1.0)
  m2 = jnp.sum(w * jnp.sum(jnp.square(x - mean), axis=-1))
  tiny = jnp.finfo(jnp.float32).tiny
  cos = jnp.sum(x * recon, axis=-1) / jnp.maximum(
      jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(recon, axis=-1), tiny)
  sums = {"n": n, "l0": jnp.sum(w * l0), "l0_sq": jnp.sum(w * l0 * l0),
          "err": jnp.sum(w * err), "cos": jnp.sum(w * cos), "m2": m2}
  return counts + jnp.sum(active, axis=(0, 1), dtype=jnp.int32), sums, mean


def _pair_loss_sum(out: models.Gemma3Output) -> float:
  # token_loss is (B, T - 1), zero outside the (real, real) pairs.
  return float(np.asarray(out.token_loss, np.float64).sum())


def evaluate(*, model_config: models.Gemma3Config, model_params, hookpoint,
             module: nn.Module, params, norm_scale, windows: Windows,
             tokenizer, batch_size: int = 8, dtype=jnp.float32,
             dense_threshold: float = 0.1, progress: bool = True,
             loss_tokens: int | None = None) -> EvalResult:
  """Reconstruction, sparsity and spliced-loss metrics over `windows`.

  Args:
    model_config: the model's configuration.
    model_params: the model's parameters.
    hookpoint: where the dictionary reads and is spliced, "layer_L/site".
    module: the dictionary module (an SAE: reconstructs its own input).
    params: its parameters (boxed or not), trained on x / norm_scale.
    norm_scale: the scalar the training inputs were divided by.
    windows: held-out token windows.
    tokenizer: gives the special ids (those positions are excluded).
    batch_size: windows per forward pass (the last batch is padded).
    dtype: the model's compute dtype.
    dense_threshold: firing frequency above which a latent counts as dense.
    progress: show a tqdm bar (tokens/s).
    loss_tokens: run the three LM-loss passes (full model with logits, the
      expensive part) only on the leading batches until this many window
      positions are covered; the reconstruction statistics use every window
      through a pass that stops at the hookpoint. None: all windows.

  Returns:
    An EvalResult: metrics (names in the module docstring) and frequencies.
  """
  name = models.hooks.parse(hookpoint).check(model_config).name
  params = nn.meta.unbox(params)
  d_sae = int(np.shape(params["w_enc"])[-1])
  scale = jnp.asarray(norm_scale, jnp.float32)
  edit = splice_edit(module)
  counts = jnp.zeros((d_sae,), jnp.int32)
  n_tok, n_special, n_pairs, n_loss_tok = 0, 0, 0, 0
  acc = {k: 0.0 for k in ("l0", "l0_sq", "err", "cos", "m2")}
  mean = np.zeros((), np.float64)
  losses = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
  bar = tqdm(total=windows.num_tokens, unit="tok", unit_scale=True,
             disable=not progress, desc=f"eval {name}", dynamic_ncols=True)
  t0 = time.perf_counter()
  for tokens, mask in windows.batches(batch_size):
    keep_np = mask & ~special_mask(tokenizer, tokens)
    keep = jnp.asarray(keep_np)
    none = jnp.zeros_like(keep)
    if loss_tokens is None or n_loss_tok < loss_tokens:
      run = lambda splice, zero: models.forward(
          model_params, tokens, mask, config=model_config,
          hookpoints=(name,), logits=False, loss=True, edits={name: edit},
          dtype=dtype, edit_args={name: edit_args(params, scale,
                                                  splice=splice, zero=zero)})
      clean, spliced, zeroed = run(none, none), run(keep, none), run(none,
                                                                    keep)
      for key, out in (("clean", clean), ("spliced", spliced),
                       ("zero", zeroed)):
        losses[key] += _pair_loss_sum(out)
      n_pairs += int((mask[:, 1:] & mask[:, :-1]).sum())
      n_loss_tok += int(mask.sum())
    else:
      clean = models.forward(model_params, tokens, mask, config=model_config,
                             hookpoints=(name,), logits=False, loss=False,
                             dtype=dtype)
    counts, sums, batch_mean = _batch_stats(
        module, params, scale, clean.activations[name], keep, counts)
    n_special += int((mask & ~keep_np).sum())
    nb = int(keep_np.sum())
    if nb:
      sums = {k: float(v) for k, v in sums.items()}
      batch_mean = np.asarray(batch_mean, np.float64)
      delta = batch_mean - mean
      total = n_tok + nb
      acc["m2"] += sums["m2"] + float(delta @ delta) * n_tok * nb / total
      mean = mean + delta * (nb / total)
      for k in ("l0", "l0_sq", "err", "cos"):
        acc[k] += sums[k]
      n_tok = total
    bar.update(int(mask.sum()))
  bar.close()
  if n_tok == 0:
    raise ValueError("evaluate: the windows hold no ordinary tokens")
  freq = np.asarray(counts, np.float64) / n_tok
  clean_l, spliced_l, zero_l = (losses[k] / max(n_pairs, 1)
                                for k in ("clean", "spliced", "zero"))
  l0 = acc["l0"] / n_tok
  fvu = acc["err"] / acc["m2"] if acc["m2"] > 0 else math.nan
  s = float(scale)
  metrics = {
      "l0": l0,
      "l0_std": math.sqrt(max(acc["l0_sq"] / n_tok - l0 * l0, 0.0)),
      "fvu": fvu,
      "explained_variance": 1.0 - fvu,
      "mse": acc["err"] / n_tok,
      "mse_normalized": acc["err"] / n_tok / (s * s),
      "cosine_sim": acc["cos"] / n_tok,
      "dead_fraction": float(np.mean(freq == 0)),
      "dense_fraction": float(np.mean(freq > dense_threshold)),
      "clean_loss": clean_l,
      "spliced_loss": spliced_l,
      "zero_ablation_loss": zero_l,
      "delta_lm_loss": spliced_l - clean_l,
      "loss_recovered": ((zero_l - spliced_l) / (zero_l - clean_l)
                         if zero_l != clean_l else math.nan),
      "num_tokens": n_tok,
      "num_special": n_special,
      "num_pairs": n_pairs,
      "loss_tokens": n_loss_tok,
      "num_latents": d_sae,
      "dense_threshold": float(dense_threshold),
      "norm_scale": s,
      "seconds": time.perf_counter() - t0,
  }
  return EvalResult(metrics=metrics, frequency=freq)


def plot_frequency_histogram(freq, path: str | os.PathLike, *, title: str,
                             dense_threshold: float = 0.1) -> None:
  """Writes a PNG histogram of log10 firing frequency of the live latents.

  Dead latents (frequency 0, no logarithm) are counted in an annotation, and
  the dense threshold is drawn as a dashed line.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  freq = np.asarray(freq, np.float64)
  live = freq[freq > 0]
  fig = Figure(figsize=(6.4, 4.0), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if live.size:
    ax.hist(np.log10(live), bins=50, color="tab:blue")
  ax.axvline(math.log10(dense_threshold), color="tab:red", linestyle="--",
             label=f"dense > {dense_threshold:g}")
  dead = int(freq.size - live.size)
  ax.text(0.02, 0.95, f"dead: {dead} / {freq.size} "
          f"({dead / max(freq.size, 1):.1%})", transform=ax.transAxes,
          va="top", ha="left",
          bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "gray"})
  ax.set_xlabel("log10 firing frequency")
  ax.set_ylabel("latents")
  ax.set_title(title)
  ax.legend(loc="upper right")
  fig.tight_layout()
  with assets.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png")


def _plain(value: Any) -> Any:
  # Strict JSON: numpy scalars to Python numbers, NaN/inf to null.
  if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
    return int(value)
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  return value


def write_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes `metrics` as JSON (NaN as null) under a temporary name, renamed."""
  plain = {str(k): _plain(v) for k, v in metrics.items()}
  with assets.atomic_path(path) as tmp:
    tmp.write_text(json.dumps(plain, indent=2, sort_keys=True,
                              allow_nan=False) + "\n", encoding="utf-8")
