"""Open any single-layer dictionary folder, whichever format it holds.

`load_dictionary` tells the formats apart by their files: a Gemma Scope 2
folder holds `params.safetensors`, a SAELens one `sae_weights.safetensors`.
`FORMATS` maps each format name to its writer. Evaluating a folder spliced
into Gemma is `evals.dictionary.evaluate_dictionary`.

Caveat: the format is detected anywhere below `path`, so a folder holding
both kinds of file (at any depth) is refused rather than guessed; multi-layer
folders (`params_layer_{i}.safetensors`) are read by
`multilayer.load_multilayer_gemmascope2` instead.
"""

from __future__ import annotations

import os
import pathlib

from gemscope_jax.interop import gemmascope2, saelens
from gemscope_jax.interop._inference import InferenceDictionary

LOADERS = {
    gemmascope2.PARAMS: gemmascope2.load_gemmascope2,
    saelens.WEIGHTS: saelens.load_saelens,
}
# Format name -> writer (`writer(d, out, ...)` returns the folder written).
FORMATS = {"gemmascope2": gemmascope2.save_gemmascope2,
           "saelens": saelens.save_saelens}


def detect_format(path: str | os.PathLike) -> str:
  """'gemmascope2' or 'saelens', from the files in or below `path`.

  Raises:
    FileNotFoundError: no such path.
    ValueError: neither format's weights file, or both, in or below it.
  """
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
  """Reads a Gemma Scope 2 or SAELens folder, whichever `path` holds.

  Args:
    path: the folder, or a folder holding exactly one dictionary below it.

  Returns:
    The dictionary in raw units.
  """
  fmt = detect_format(path)
  if fmt == "gemmascope2":
    return gemmascope2.load_gemmascope2(path)
  return saelens.load_saelens(path)
