"""Evaluate a released dictionary folder (Gemma Scope 2 or SAELens) spliced
into Gemma, on the real model and held-out text `gemscope eval --dictionary`
uses.

`evaluate_dictionary` reads the folder (`interop.load_dictionary`), turns it
into one of our Flax modules (`interop.as_module`, norm_scale 1: the weights
are already in raw units), builds the eval windows from a corpus name or
files, and runs `evals.evaluate.evaluate`. An SAE is spliced at its own
hookpoint; a transcoder replaces its output hookpoint (e.g. the MLP),
reading its input in the same pass.

Caveat: a folder whose hook name does not map to one of our hookpoints needs
`hookpoint=`, and a transcoder whose output hook maps to none is refused.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from gemscope_jax import dictionaries, errors, models
from gemscope_jax.convert import pretrained
from gemscope_jax.evals import evaluate as eval_lib
from gemscope_jax.interop import InferenceDictionary
from gemscope_jax.interop import as_module
from gemscope_jax.interop import load_dictionary
from gemscope_jax.text.corpora import text_files
from gemscope_jax.text.tokenizer import default_tokenizer
from gemscope_jax.text.windows import for_loss, windows_from_files


def _check_fits(source, d: InferenceDictionary, hp: str, model_config
                ) -> None:
  """InputError unless `d`'s input (and a transcoder's output) width is
  that of the hookpoints it is spliced at: a mismatch would otherwise
  surface as an einsum's shape error deep inside the forward pass."""
  pairs = [(hp, d.d_in, "input")]
  if d.is_transcoder and d.hookpoint_out is not None:
    pairs.append((d.hookpoint_out, d.d_out, "output"))
  for name, width, what in pairs:
    try:
      want = models.hooks.parse(name).check(model_config).width(model_config)
    except ValueError as e:
      raise errors.UsageError(f"{source}: {e}") from None
    if width != want:
      raise errors.InputError(
          f"{source}: its {what} width is {width}, but {name} of "
          f"{model_config.name} has width {want}; give the model it was "
          f"trained on ({errors.option('model=', '--model')}) or its "
          f"hookpoint ({errors.option('hookpoint=', '--hookpoint')})")


def evaluate_dictionary(source: str | os.PathLike | InferenceDictionary, *,
                        model: str = "default", text: str = "english_heldout",
                        num_tokens: int = 131_072,
                        loss_tokens: int | None = 8_192, seq_len: int = 128,
                        batch_size: int = 8, dtype: str = "float32",
                        hookpoint: str | None = None,
                        dense_threshold: float = 0.1,
                        loss_windows: str = "leading",
                        progress: bool = True) -> dict[str, Any]:
  """Held-out metrics (L0, FVU, delta LM loss, ...) of a dictionary folder.

  A transcoder (a folder with an output hook) is spliced in place of its
  output hookpoint (e.g. replacing the MLP), reading its input in the same
  pass.

  Args:
    source: a folder (either format) or an `InferenceDictionary`.
    model: what `pretrained.load_model` accepts ('default': Gemma 3 270M).
    text: a corpus name or files, as the config's `eval.text`.
    num_tokens: eval tokens for the statistics.
    loss_tokens: window positions for the three LM-loss passes.
    seq_len, batch_size: windows and windows per forward pass.
    dtype: the model's compute dtype name.
    hookpoint: overrides the folder's own ("layer_6/resid_post").
    dense_threshold: firing frequency counted as dense.
    loss_windows: which windows the loss passes read: 'leading' (the
      first loss_tokens of the text) or 'spread' (evenly over the sample).
    progress: show progress bars.

  Returns:
    The metrics of `evals.evaluate.evaluate`, plus `hookpoint`,
    `hookpoint_out`, `eval_text`, `loss_windows` and `source`.

  Raises:
    FileNotFoundError: no such folder or text.
    ValueError: no usable hookpoint (see the module docstring).
  """
  d = (source if isinstance(source, InferenceDictionary)
       else load_dictionary(source))
  hp = hookpoint or d.hookpoint
  if hp is None:
    raise errors.InputError(
        f"{source}: its hook name maps to none of our hookpoints; pass "
        f"{errors.option('hookpoint=', '--hookpoint')} (e.g. "
        "layer_6/resid_post)")
  layout = None
  if d.is_transcoder:
    out = d.hookpoint_out
    if out is None:
      raise ValueError(f"{source}: a transcoder whose output hook maps to "
                       "none of our hookpoints")
    layout = dictionaries.Layout("transcoder", (hp,), (out,))
  module, params, norm_scale = as_module(d)
  files = text_files(text, errors.option("text", "--text"))
  model_config, model_params = pretrained.load_model(model,
                                                     dtype=jnp.dtype(dtype))
  _check_fits(source, d, hp, model_config)
  tokenizer = default_tokenizer()
  windows = for_loss(windows_from_files(tokenizer, files, seq_len,
                                        num_tokens), loss_tokens, loss_windows,
                     batch_size)
  result = eval_lib.evaluate(
      model_config=model_config, model_params=model_params, hookpoint=hp,
      module=module, params=params, norm_scale=norm_scale, windows=windows,
      tokenizer=tokenizer, batch_size=batch_size, dtype=jnp.dtype(dtype),
      dense_threshold=dense_threshold, progress=progress,
      loss_tokens=loss_tokens, layout=layout)
  return {**result.metrics, "hookpoint": hp,
          "hookpoint_out": d.hookpoint_out, "eval_text": text,
          "loss_windows": loss_windows,
          "source": str(source) if not isinstance(
              source, InferenceDictionary) else None}
