"""Evaluate one trained or imported sparse dictionary on held-out text.

`evaluate` scores a single dictionary (an SAE at a hookpoint, or any
`dictionaries.Layout`: transcoder, crosscoder, CLT) spliced into Gemma:
reconstruction and sparsity statistics (`evals.reconstruction`) and the
clean, spliced and zero-ablated LM losses (`evals.members`, whose
docstrings name every metric). This module is also the one-stop import the
training loop and tests use (`from gemscope_jax.evals import evaluate as
ev`): it re-exports `evaluate_members`, `EvalResult`, the SAE splice edit
(`splice_edit`, `edit_args`), `plot_frequency_histogram` and
`write_metrics` from the modules that define them.

Caveat: the dictionary sees x / norm_scale, as in training, and its
prediction is multiplied back by target_scale (norm_scale unless given); an
imported dictionary in raw units is evaluated with norm_scale 1.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from gemscope_jax import dictionaries
from gemscope_jax import models
from gemscope_jax.evals.histogram import plot_frequency_histogram
from gemscope_jax.evals.members import EvalResult
from gemscope_jax.evals.members import evaluate_members
from gemscope_jax.evals.metrics_file import write_metrics
from gemscope_jax.surgery import splice as splice_lib
from gemscope_jax.surgery.splice import edit_args
from gemscope_jax.surgery.splice import splice_edit
from gemscope_jax.text.windows import Windows

__all__ = ["EvalResult", "edit_args", "evaluate", "evaluate_members",
           "plot_frequency_histogram", "splice_edit", "write_metrics"]


def evaluate(*, model_config: models.Gemma3Config, model_params, hookpoint,
             module: nn.Module, params, norm_scale, windows: Windows,
             tokenizer, batch_size: int = 8, dtype=jnp.float32,
             dense_threshold: float = 0.1, progress: bool = True,
             loss_tokens: int | None = None, layout=None,
             target_scale=None, prefixes=None) -> EvalResult:
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
    layout: a `dictionaries.Layout` for transcoders, crosscoders and CLTs
      (what the dictionary reads and predicts); None: an SAE at `hookpoint`.
    target_scale: what the targets were divided by; None: norm_scale.
    prefixes: latent counts M whose `prefix_fvu/M` is reported; None: a
      Matryoshka dictionary's own prefixes (`evals.reconstruction`).

  Returns:
    An EvalResult: metrics (named in the docstrings of `evals.members` and
    `evals.reconstruction`) and frequencies.

  Raises:
    ValueError: a bad hookpoint, or windows without ordinary tokens.
  """
  if layout is None:
    name = models.hooks.parse(hookpoint).check(model_config).name
    layout = dictionaries.Layout("sae", (name,), (name,))
  member = splice_lib.Member(
      name=layout.name,
      layout=layout, module=module, params=params, norm_scale=norm_scale,
      target_scale=norm_scale if target_scale is None else target_scale)
  results, _ = evaluate_members(
      [member], model_config=model_config, model_params=model_params,
      windows=windows, tokenizer=tokenizer, batch_size=batch_size,
      dtype=dtype, dense_threshold=dense_threshold, progress=progress,
      loss_tokens=loss_tokens, prefixes=prefixes)
  return results[member.name]
