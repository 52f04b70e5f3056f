"""Open any dictionary folder, and evaluate it spliced into Gemma.

`load_dictionary` tells the formats apart by their files: a Gemma Scope 2
folder holds `params.safetensors`, a SAELens one `sae_weights.safetensors`.
`evaluate_dictionary` runs `training.evaluate.evaluate` on it through
`as_module` (norm_scale 1: the weights are already in raw units), on the
real model and held-out text the CLI's `gemscope eval` uses.

Caveat: evaluation splices an SAE (it reconstructs its own input); a
transcoder is refused here, and a folder whose hook name does not map to
one of our hookpoints needs `hookpoint=`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from gemscope_jax.interop import gemmascope2, saelens
from gemscope_jax.interop._inference import InferenceDictionary, as_module

LOADERS = {
    gemmascope2.PARAMS: gemmascope2.load_gemmascope2,
    saelens.WEIGHTS: saelens.load_saelens,
}


def detect_format(path: str | os.PathLike) -> str:
  """'gemmascope2' or 'saelens', from the files in or below `path`."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such dictionary folder")
  found = {name for name in LOADERS
           if (path / name).exists() or any(path.rglob(name))}
  if len(found) != 1:
    raise ValueError(f"{path}: expected a Gemma Scope 2 folder "
                     f"({gemmascope2.PARAMS}) or a SAELens one "
                     f"({saelens.WEIGHTS}), found "
                     f"{' and '.join(sorted(found)) or 'neither'}")
  return "gemmascope2" if gemmascope2.PARAMS in found else "saelens"


def load_dictionary(path: str | os.PathLike) -> InferenceDictionary:
  """Reads a Gemma Scope 2 or SAELens folder, whichever `path` holds."""
  fmt = detect_format(path)
  if fmt == "gemmascope2":
    return gemmascope2.load_gemmascope2(path)
  return saelens.load_saelens(path)


def evaluate_dictionary(source: str | os.PathLike | InferenceDictionary, *,
                        model: str = "default", text: str = "english_heldout",
                        num_tokens: int = 131_072,
                        loss_tokens: int | None = 8_192, seq_len: int = 128,
                        batch_size: int = 8, dtype: str = "float32",
                        hookpoint: str | None = None,
                        dense_threshold: float = 0.1,
                        progress: bool = True) -> dict[str, Any]:
  """Held-out metrics (L0, FVU, delta LM loss, ...) of a dictionary folder.

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
    progress: show progress bars.

  A transcoder (a folder with an output hook) is spliced in place of its
  output hookpoint (e.g. replacing the MLP), reading its input in the same
  pass.

  Returns:
    The metrics of `training.evaluate.evaluate`, plus `hookpoint`,
    `hookpoint_out`, `eval_text` and `source`.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gemscope_jax import pretrained  # pylint: disable=import-outside-toplevel
  from gemscope_jax.data.windows import windows_from_files  # pylint: disable=import-outside-toplevel
  from gemscope_jax.tokenizer import default_tokenizer  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  d = (source if isinstance(source, InferenceDictionary)
       else load_dictionary(source))
  hp = hookpoint or d.hookpoint
  if hp is None:
    raise ValueError(f"{source}: its hook name maps to none of our "
                     "hookpoints; pass hookpoint=")
  layout = None
  if d.is_transcoder:
    out = d.hookpoint_out
    if out is None:
      raise ValueError(f"{source}: a transcoder whose output hook maps to "
                       "none of our hookpoints")
    layout = config_lib.Layout("transcoder", (hp,), (out,))
  module, params, norm_scale = as_module(d)
  files = config_lib.text_files(text, "eval.text")
  model_config, model_params = pretrained.load_model(model,
                                                     dtype=jnp.dtype(dtype))
  tokenizer = default_tokenizer()
  windows = windows_from_files(tokenizer, files, seq_len, num_tokens)
  result = eval_lib.evaluate(
      model_config=model_config, model_params=model_params, hookpoint=hp,
      module=module, params=params, norm_scale=norm_scale, windows=windows,
      tokenizer=tokenizer, batch_size=batch_size, dtype=jnp.dtype(dtype),
      dense_threshold=dense_threshold, progress=progress,
      loss_tokens=loss_tokens, layout=layout)
  return {**result.metrics, "hookpoint": hp,
          "hookpoint_out": d.hookpoint_out, "eval_text": text,
          "source": str(source) if not isinstance(
              source, InferenceDictionary) else None}
