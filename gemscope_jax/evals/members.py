"""Several dictionaries evaluated on one held-out stream: the spliced and
zeroed LM-loss passes, beside each one's reconstruction statistics.

Every real, ordinary token of the eval windows (padding, special tokens and
a chat template's tokens excluded: `text.windows.ordinary_mask`) contributes
to the statistics of `reconstruction.MemberStats` (l0, fvu, mse,
cosine_sim, dead/dense fractions, ...). The model's next-token loss (nats,
over the (token, next token) pairs of real tokens, as `models.forward`
computes it) is measured three ways:
  clean_loss          the unmodified model
  spliced_loss        every target replaced by the dictionary's prediction
                      (a transcoder replacing its MLP; a CLT replacing every
                      MLP: the replacement model, see `surgery.splice`)
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
Plus num_special, num_pairs (loss pairs), loss_tokens (window positions in
the loss passes) and seconds.

Caveat: with `loss_tokens`, only the leading windows get the loss passes
(full model and logits: most of the cost) while the statistics use all
windows, so the losses and the statistics may describe different tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gemscope_jax import models
from gemscope_jax.evals.reconstruction import MemberStats
from gemscope_jax.surgery import splice as splice_lib
from gemscope_jax.text.windows import Windows


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """One dictionary's evaluation.

  Attributes:
    metrics: {name: float}, named as in this module's and
      `reconstruction`'s docstrings.
    frequency: (d_sae,) float64 fraction of eval tokens on which each
      latent fired.
  """
  metrics: dict[str, float]
  frequency: np.ndarray


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
                     replacement: bool = False,
                     prefixes: tuple[int, ...] | None = None
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
    prefixes: latent counts M whose `prefix_fvu/M` each one-layer member
      reports (`MemberStats`); None: a Matryoshka member's own prefixes.

  Returns:
    ({member name: EvalResult}, shared metrics): each member's metrics as
    the module docstrings list (plus `{target}/fvu` per layer for
    multi-layer members); shared: clean_loss, num_pairs, loss_tokens,
    num_special, seconds and with `replacement` the replacement_* losses.

  Raises:
    ValueError: two members predict the same hookpoint, or the windows
      hold no ordinary tokens.
  """
  targets = [t for m in members for t in m.layout.targets]
  dup = sorted({t for t in targets if targets.count(t) > 1})
  if dup:
    raise ValueError(f"evaluate_members: two dictionaries predict "
                     f"{', '.join(dup)}")
  names = sorted({h for m in members for h in m.layout.hookpoints},
                 key=models.hooks.parse)
  stats = [MemberStats(m, None if m.layout.multilayer else prefixes)
           for m in members]
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
  for tokens, mask, keep_np in windows.ordinary_batches(tokenizer,
                                                        batch_size):
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
