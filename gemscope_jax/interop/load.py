"""Open any dictionary folder, whichever format it holds, or a released one
by name.

`load_dictionary` tells the formats apart by their files: a Gemma Scope 2
folder holds `params.safetensors`, a SAELens one `sae_weights.safetensors`,
a Gemma Scope 2 multi-layer one (CLT, crosscoder) `params_layer_0.safetensors`.
A path that does not exist but reads as a release name
(`gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_medium`, see
`releases`) is fetched from the Hugging Face Hub first. `FORMATS` maps each
format name to its writer. Evaluating a folder spliced into Gemma is
`evals.dictionary.evaluate_dictionary`.

Caveat: the format is detected anywhere below `path`, so a folder holding
both kinds of file (at any depth) is refused rather than guessed; a
multi-layer folder is recognised only as the folder itself.
"""

from __future__ import annotations

import os
import pathlib

from gemscope_jax import errors
from gemscope_jax.interop import gemmascope2, multilayer, releases, saelens
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
    errors.InputError: (a ValueError) neither format's weights file, or
      both, in or below it.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such dictionary folder")
  found = {name for name in LOADERS
           if (path / name).exists() or any(path.rglob(name))}
  if len(found) != 1:
    raise errors.InputError(f"{path}: expected a Gemma Scope 2 folder "
                            f"({gemmascope2.PARAMS}) or a SAELens one "
                            f"({saelens.WEIGHTS}), found "
                            f"{' and '.join(sorted(found)) or 'neither'}")
  return "gemmascope2" if gemmascope2.PARAMS in found else "saelens"


def locate(source: str | os.PathLike) -> pathlib.Path:
  """The local folder of `source`: itself if it exists, else the folder a
  release name stands for, fetched (see `releases.fetch`).

  Raises:
    FileNotFoundError: neither an existing path nor a fetchable name.
    ValueError: a release name with an unknown part (lists the valid ones).
  """
  path = pathlib.Path(source)
  if path.exists() or not releases.is_name(str(source)):
    if not path.exists():
      raise errors.MissingInputError(
          f"{path}: no such dictionary folder (nor a release name: "
          f"{releases.grammar()})")
    return path
  return releases.fetch(str(source))


def load_dictionary(source: str | os.PathLike
                    ) -> InferenceDictionary | multilayer.MultiLayerInference:
  """Reads a dictionary folder of any format, or a released one by name.

  Args:
    source: the folder, a folder holding exactly one single-layer
      dictionary below it, or a release name such as
      'gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_medium' or
      'google/gemma-scope-2-270m-pt/resid_post/layer_12_width_16k_l0_medium'
      (`releases` lists the grammar).

  Returns:
    The dictionary in raw units: an `InferenceDictionary`, or a
    `MultiLayerInference` for a CLT or crosscoder folder.

  Raises:
    FileNotFoundError: no such folder; a name whose repo or folder is not
      on the Hub (or in the local cache when offline), naming both.
    errors.UsageError: (a ValueError) an unknown release name (the message
      lists what is valid).
    errors.InputError: (a ValueError) a folder of neither format, or both.
  """
  path = locate(source)
  if (path / multilayer.params_file(0)).exists() and not (
      path / gemmascope2.PARAMS).exists():
    return multilayer.load_multilayer_gemmascope2(path)
  fmt = detect_format(path)
  if fmt == "gemmascope2":
    return gemmascope2.load_gemmascope2(path)
  return saelens.load_saelens(path)
