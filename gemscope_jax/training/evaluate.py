"""Evaluate trained sparse dictionaries on held-out text.

A dictionary predicts its targets from its inputs (`config.Layout`): an
SAE reconstructs its hookpoint, a transcoder predicts mlp_out from mlp_in,
a crosscoder reconstructs one site at several layers, a CLT predicts every
layer's mlp_out from the mlp_ins. Every real, ordinary token of the eval
windows (padding and special tokens, see `activations.special_mask`,
excluded) contributes to:
  l0               mean number of nonzero latents per token (all layers'
                   for a CLT; l0_std: its standard deviation over tokens)
  fvu              fraction of variance unexplained, pooled over all tokens
                   (and layers): sum ||t - pred||^2 / sum ||t - mean(t)||^2
                   for target t, raw units; `{target}/fvu` per layer
  explained_variance  1 - fvu
  mse              mean over tokens of ||t - pred||^2 in raw units
                   (mse_normalized: the same in training units)
  cosine_sim       mean over tokens of cos(t, pred)
  dead_fraction    latents that never fire on the eval tokens
  dense_fraction   latents firing on more than `dense_threshold` of them
The model's next-token loss (nats, over the (token, next token) pairs of real
tokens, as `models.forward` computes it) is measured three ways:
  clean_loss          the unmodified model
  spliced_loss        every target replaced by the dictionary's prediction
                      (a transcoder replacing its MLP; a CLT replacing every
                      MLP: the replacement model, see `splice`)
  zero_ablation_loss  every target replaced by zeros
  delta_lm_loss = spliced - clean
  loss_recovered = (zero - spliced) / (zero - clean)
`evaluate_members(..., replacement=True)` adds the same for all members
spliced at once (e.g. one transcoder per layer replacing every MLP):
replacement_loss, replacement_zero_loss, replacement_delta_lm_loss,
replacement_loss_recovered. Where a later replacement reads an earlier
one's output (a CLT; several transcoders at once) the same splice with
predictions from the clean pass's inputs is reported beside it
(clean_input_spliced_loss, clean_input_loss_recovered;
replacement_clean_input_loss, replacement_clean_input_loss_recovered): the
gap between the two is what compounding errors cost.
Only ordinary tokens are replaced in the spliced and zero-ablated passes:
special tokens (BOS's residual is a huge outlier the dictionary never saw)
keep their activations. All passes run one program (`splice.member_edits`)
whose per-batch masks say which positions to replace or zero, so they share
one compilation and the same rounding.
With `loss_tokens`, only the leading windows get the loss passes (full
model and logits: most of the cost); the statistics above use all windows.
Plus num_tokens (ordinary tokens), num_special, num_pairs (loss pairs),
loss_tokens (window positions in the loss passes),
num_latents. The dictionary sees x / norm_scale, as in training.

Caveat: dead_fraction depends on the number of eval tokens (a latent firing
once per 10^6 tokens looks dead on 10^5), and a BatchTopK module selects over
the whole padded (batch, time) block here; evaluate its JumpReLU export."""

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
from gemscope_jax.training import splice as splice_lib


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """metrics: {name: float} (see the module docstring); frequency: (d_sae,)
  float64 fraction of eval tokens on which each latent fired."""
  metrics: dict[str, float]
  frequency: np.ndarray


def splice_edit(module: nn.Module) -> models.EditFn:
  """The `EditFn` that splices SAE `module` at its own hookpoint, with
  `edit_args(...)` as its arguments (`splice.member_edits` for any
  dictionary). Cached per (hashable, field-equal) module, so evaluating
  same-shaped dictionaries again reuses the compiled forward pass."""
  return splice_lib._edit_for(module, "sae", "in_pass", 0, ())  # pylint: disable=protected-access


def edit_args(params, norm_scale, *, splice: jax.Array, zero: jax.Array
              ) -> dict[str, Any]:
  """Arguments of `splice_edit(module)`: (B, T) bool masks of the positions
  to reconstruct and to zero (neither: left as they are)."""
  s = jnp.asarray(norm_scale, jnp.float32)
  return {"params": nn.meta.unbox(params), "norm_scale": s,
          "target_scale": s, "splice": jnp.asarray(splice, bool),
          "zero": jnp.asarray(zero, bool)}


@functools.partial(jax.jit, static_argnames=("module", "multilayer"))
def _batch_stats(module, params, norm_scale, target_scale, x, target, keep,
                 counts, *, multilayer):
  """Per-batch sums over the `keep` tokens, and updated firing counts.

  x, target: (B, T, d) or (B, T, n, d) raw. Errors and centred sums of
  squares are per target layer (n,) ((1,) for one hookpoint).
  """
  recon, latents = splice_lib.predict(module, params, norm_scale,
                                      target_scale, x, multilayer=multilayer)
  t = target.astype(jnp.float32)
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
          "cos": jnp.sum(w * cos), "m2": m2}
  return counts + jnp.sum(active, axis=(0, 1), dtype=jnp.int32), sums, mean


class _Stats:
  """Running reconstruction statistics of one member over eval batches."""

  def __init__(self, member: splice_lib.Member):
    self.member = member
    inner = getattr(member.module, "dictionary", member.module)
    shape = getattr(inner, "latent_shape",
                    (int(np.shape(member.params["w_enc"])[-1]),))
    self.counts = jnp.zeros(shape, jnp.int32)
    self.n = 0
    self.acc = {k: 0.0 for k in ("l0", "l0_sq", "cos")}
    n_targets = len(member.layout.targets)
    self.err = np.zeros((n_targets,), np.float64)
    self.m2 = np.zeros((n_targets,), np.float64)
    self.mean = np.zeros((), np.float64)

  def add(self, activations: dict, keep: jax.Array, nb: int) -> None:
    m = self.member
    x, target = splice_lib.stacked_inputs(m, activations)
    self.counts, sums, batch_mean = _batch_stats(
        m.module, m.params, m.norm_scale, m.target_scale, x, target, keep,
        self.counts, multilayer=m.layout.multilayer)
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
    for k in ("l0", "l0_sq", "cos"):
      self.acc[k] += float(sums[k])
    self.n = total

  def metrics(self, dense_threshold: float
              ) -> tuple[dict[str, float], np.ndarray]:
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
        "num_tokens": self.n, "num_latents": int(freq.size),
        "dense_threshold": float(dense_threshold),
        "norm_scale": float(s_in) if s_in.ndim == 0 else s_in.tolist(),
    }
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


def _pair_loss_sum(out: models.Gemma3Output) -> float:
  # token_loss is (B, T - 1), zero outside the (real, real) pairs.
  return float(np.asarray(out.token_loss, np.float64).sum())


def _recovered(clean: float, spliced: float, zero: float) -> float:
  return (zero - spliced) / (zero - clean) if zero != clean else math.nan


def evaluate_members(members: list[splice_lib.Member], *,
                     model_config: models.Gemma3Config, model_params,
                     windows: Windows, tokenizer, batch_size: int = 8,
                     dtype=jnp.float32, dense_threshold: float = 0.1,
                     progress: bool = True, loss_tokens: int | None = None,
                     replacement: bool = False
                     ) -> tuple[dict[str, EvalResult], dict[str, float]]:
  """Statistics and spliced losses of several dictionaries on one stream.

  One pass per eval batch records every hookpoint the members read or
  predict (the reconstruction statistics); on the loss batches, the
  clean pass, then for each member a pass with its prediction spliced in
  at all its targets and one with them zeroed, all one compiled program.

  Args:
    members: the dictionaries (`splice.Member`); no two may predict the
      same hookpoint.
    model_config, model_params: Gemma.
    windows: held-out token windows.
    tokenizer: gives the special ids (those positions are excluded).
    batch_size: windows per forward pass (the last batch is padded).
    dtype: the model's compute dtype.
    dense_threshold: firing frequency above which a latent is dense.
    progress: show a tqdm bar (tokens/s).
    loss_tokens: run the loss passes only on the leading batches until
      this many window positions are covered; None: all windows.
    replacement: also run every member spliced at once and every target
      zeroed at once (the replacement model, e.g. a transcoder per layer).

  Returns:
    ({member name: EvalResult}, shared metrics): each member's metrics as
    the module docstring lists (plus `{target}/fvu` per layer for
    multi-layer members); shared: clean_loss, num_pairs, loss_tokens,
    num_special, seconds and with `replacement` the replacement_* losses.
  """
  targets = [t for m in members for t in m.layout.targets]
  dup = sorted({t for t in targets if targets.count(t) > 1})
  if dup:
    raise ValueError(f"evaluate_members: two dictionaries predict "
                     f"{', '.join(dup)}")
  names = sorted({h for m in members for h in m.layout.hookpoints},
                 key=models.hooks.parse)
  stats = [_Stats(m) for m in members]
  # A CLT (or a replacement of several members) is also spliced with
  # predictions from the clean pass's inputs: the gap to the in-pass
  # replacement is what compounding errors cost.
  compounding = [i for i, m in enumerate(members)
                 if m.mode == "in_pass" and len(m.layout.targets) > 1]
  passes = [(i, how) for i in range(len(members))
            for how in ("spliced", "zero")]
  passes += [(i, "clean_input") for i in compounding]
  if replacement:
    passes += [("all", "spliced"), ("all", "zero")]
    if any(m.mode == "in_pass" for m in members):
      passes.append(("all", "clean_input"))
  losses = {key: 0.0 for key in passes}
  clean_loss, n_special, n_pairs, n_loss_tok = 0.0, 0, 0, 0
  label = members[0].name if len(members) == 1 else f"{len(members)} dicts"
  bar = tqdm(total=windows.num_tokens, unit="tok", unit_scale=True,
             disable=not progress, desc=f"eval {label}", dynamic_ncols=True)
  t0 = time.perf_counter()
  for tokens, mask in windows.batches(batch_size):
    keep_np = mask & ~special_mask(tokenizer, tokens)
    keep = jnp.asarray(keep_np)
    none = jnp.zeros_like(keep)
    if loss_tokens is None or n_loss_tok < loss_tokens:
      recons = [None] * len(members)

      def run(target=None, how=None):
        edits, args = {}, {}
        for i, m in enumerate(members):
          on = target in (i, "all")
          mode = "clean" if on and how == "clean_input" else None
          edits.update(splice_lib.member_edits(m, mode))
          args.update(splice_lib.member_args(
              m, splice=keep if on and how != "zero" else none,
              zero=keep if on and how == "zero" else none, recon=recons[i],
              mode=mode))
        return models.forward(model_params, tokens, mask,
                              config=model_config, hookpoints=names,
                              logits=False, loss=True, edits=edits,
                              edit_args=args, dtype=dtype)
      clean = run()
      for i, m in enumerate(members):
        if m.mode == "clean" or i in compounding or (
            ("all", "clean_input") in losses):
          x, _ = splice_lib.stacked_inputs(m, clean.activations)
          recons[i], _ = splice_lib.predict(
              m.module, m.params, m.norm_scale, m.target_scale, x,
              multilayer=m.layout.multilayer)
      clean_loss += _pair_loss_sum(clean)
      for key in passes:
        losses[key] += _pair_loss_sum(run(*key))
      n_pairs += int((mask[:, 1:] & mask[:, :-1]).sum())
      n_loss_tok += int(mask.sum())
    else:
      clean = models.forward(model_params, tokens, mask, config=model_config,
                             hookpoints=names, logits=False, loss=False,
                             dtype=dtype)
    nb = int(keep_np.sum())
    for st in stats:
      st.add(clean.activations, keep, nb)
    n_special += int((mask & ~keep_np).sum())
    bar.update(int(mask.sum()))
  bar.close()
  if stats[0].n == 0:
    raise ValueError("evaluate: the windows hold no ordinary tokens")
  pairs = max(n_pairs, 1)
  clean_l = clean_loss / pairs
  results = {}
  for i, (m, st) in enumerate(zip(members, stats)):
    metrics, freq = st.metrics(dense_threshold)
    spliced_l = losses[(i, "spliced")] / pairs
    zero_l = losses[(i, "zero")] / pairs
    metrics.update({
        "clean_loss": clean_l, "spliced_loss": spliced_l,
        "zero_ablation_loss": zero_l, "delta_lm_loss": spliced_l - clean_l,
        "loss_recovered": _recovered(clean_l, spliced_l, zero_l),
        "num_special": n_special, "num_pairs": n_pairs,
        "loss_tokens": n_loss_tok})
    if i in compounding:
      ci = losses[(i, "clean_input")] / pairs
      metrics.update({"clean_input_spliced_loss": ci,
                      "clean_input_loss_recovered": _recovered(clean_l, ci,
                                                               zero_l)})
    results[m.name] = EvalResult(metrics=metrics, frequency=freq)
  shared = {"clean_loss": clean_l, "num_pairs": n_pairs,
            "loss_tokens": n_loss_tok, "num_special": n_special,
            "seconds": time.perf_counter() - t0}
  if replacement:
    repl, zero_all = (losses[("all", how)] / pairs
                      for how in ("spliced", "zero"))
    shared.update({
        "replacement_loss": repl, "replacement_zero_loss": zero_all,
        "replacement_delta_lm_loss": repl - clean_l,
        "replacement_loss_recovered": _recovered(clean_l, repl, zero_all)})
    if ("all", "clean_input") in losses:
      ci = losses[("all", "clean_input")] / pairs
      shared.update({
          "replacement_clean_input_loss": ci,
          "replacement_clean_input_loss_recovered": _recovered(
              clean_l, ci, zero_all)})
  for r in results.values():
    r.metrics["seconds"] = shared["seconds"]
  return results, shared


def evaluate(*, model_config: models.Gemma3Config, model_params, hookpoint,
             module: nn.Module, params, norm_scale, windows: Windows,
             tokenizer, batch_size: int = 8, dtype=jnp.float32,
             dense_threshold: float = 0.1, progress: bool = True,
             loss_tokens: int | None = None, layout=None,
             target_scale=None) -> EvalResult:
  """Reconstruction, sparsity and spliced-loss metrics of one dictionary.

  Args:
    model_config: the model's configuration.
    model_params: the model's parameters.
    hookpoint: where an SAE reads and is spliced, "layer_L/site" (ignored
      when `layout` is given).
    module: the dictionary module.
    params: its parameters (boxed or not), trained on x / norm_scale.
    norm_scale: the scalar (per layer: (n,)) the training inputs were
      divided by.
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
    layout: a `config.Layout` for transcoders, crosscoders and CLTs (what
      the dictionary reads and predicts); None: an SAE at `hookpoint`.
    target_scale: what the targets were divided by; None: norm_scale.

  Returns:
    An EvalResult: metrics (names in the module docstring) and frequencies.
  """
  if layout is None:
    from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
    name = models.hooks.parse(hookpoint).check(model_config).name
    layout = config_lib.Layout("sae", (name,), (name,))
  member = splice_lib.Member(
      name=layout.name,
      layout=layout, module=module, params=params, norm_scale=norm_scale,
      target_scale=norm_scale if target_scale is None else target_scale)
  results, _ = evaluate_members(
      [member], model_config=model_config, model_params=model_params,
      windows=windows, tokenizer=tokenizer, batch_size=batch_size,
      dtype=dtype, dense_threshold=dense_threshold, progress=progress,
      loss_tokens=loss_tokens)
  return results[member.name]


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
