"""Which transcoders a graph goes through: `--dictionaries SPEC` read.

A spec is one of
  - a CLT folder (multi-layer Gemma Scope 2, `params_layer_{i}.safetensors`);
  - a folder holding one transcoder folder per layer at any depth (a group
    run's `export/`, a Gemma Scope 2 `transcoder/` tree), each read with
    `interop.load_dictionary` and keyed by the layer of its hookpoint;
  - folders or release names separated by commas;
  - a release name with `{L}` in it, expanded for every layer of the model
    (`gemma-scope-2-270m-pt-transcoders/layer_{L}_width_16k_l0_medium`).
Training workdirs are read by the command line, which passes `load=`.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

from gemscope_jax import errors, interop, models

_WEIGHTS = ("params.safetensors", "sae_weights.safetensors")


def _layer_of(d: Any, where: str) -> int:
  hp = getattr(d, "hookpoint", None)
  if not hp:
    raise errors.InputError(f"{where}: its config names no hookpoint, so "
                            "its layer is unknown")
  point = models.hooks.parse(hp)
  if point.site != "mlp_in":
    raise errors.InputError(f"{where}: reads {hp}; a transcoder for a "
                            "circuit reads layer_L/mlp_in")
  return point.layer


def _folders_below(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted({p.parent for name in _WEIGHTS for p in path.rglob(name)})


def load_dictionaries(spec: str, config: models.Gemma3Config, *,
                      load: Callable[[str], Any] = interop.load_dictionary,
                      flag: str = "dictionaries") -> Any:
  """{layer: transcoder} or one CLT, as `attribute` takes them.

  Raises:
    UsageError: an empty spec, or two transcoders for one layer.
    InputError / MissingInputError: a folder or name that does not hold
      transcoders.
  """
  spec = str(spec).strip()
  if not spec:
    raise errors.UsageError(f"{flag}: give a folder, a CLT or release names")
  if "{L}" in spec:
    parts = [spec.replace("{L}", str(l)) for l in range(config.num_layers)]
  else:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
  found: list[tuple[str, Any]] = []
  for part in parts:
    path = pathlib.Path(part)
    if path.is_dir() and not any((path / w).is_file() for w in _WEIGHTS):
      if (path / interop.multilayer.params_file(0)).is_file():
        found.append((part, load(part)))
        continue
      below = _folders_below(path)
      if not below:
        raise errors.InputError(f"{flag} {part}: holds no dictionary folder "
                                f"({' or '.join(_WEIGHTS)})")
      found.extend((str(p), load(str(p))) for p in below)
    else:
      found.append((part, load(part)))
  clts = [(w, d) for w, d in found
          if isinstance(d, interop.MultiLayerInference)]
  if clts:
    if len(found) != 1 or clts[0][1].kind != "clt":
      raise errors.UsageError(f"{flag} {spec}: give one cross-layer "
                              "transcoder, or transcoders only")
    return clts[0][1]
  by_layer: dict[int, Any] = {}
  for where, d in found:
    layer = _layer_of(d, where)
    if layer in by_layer:
      raise errors.UsageError(f"{flag} {spec}: two transcoders for layer "
                              f"{layer} ({where} and another)")
    by_layer[layer] = d
  return by_layer
