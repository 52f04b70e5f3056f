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


def _layer_of(d: Any, where: str, config: models.Gemma3Config) -> int:
  """The layer of transcoder `d`, checked against the model."""
  hp = getattr(d, "hookpoint", None)
  if not hp:
    raise errors.InputError(f"{where}: its config names no hookpoint, so "
                            "its layer is unknown")
  point = models.hooks.parse(hp)
  if point.site != "mlp_in":
    raise errors.InputError(f"{where}: reads {hp}; a transcoder for a "
                            "circuit reads layer_L/mlp_in")
  L, D = config.num_layers, config.d_model
  if point.layer >= L:
    raise errors.InputError(f"{where}: reads {hp}; the model has layers "
                            f"0-{L - 1}")
  if d.d_in != D or d.d_out != D:
    raise errors.InputError(f"{where}: a transcoder of width {d.d_in} -> "
                            f"{d.d_out}; the model's MLP is {D} -> {D}")
  return point.layer


# Expected failures re-raised naming the flag, most specific first.
_KINDS = (errors.MissingInputError, errors.InputError, errors.UsageError,
          errors.OutputError, errors.RunError, errors.GemscopeError)


def _read(part: str, load: Callable[[str], Any], flag: str) -> Any:
  """`load(part)`; its expected failures (whose messages start with the
  folder or name) prefixed with `flag`, of the same kind."""
  try:
    return load(part)
  except errors.GemscopeError as e:
    kind = next(k for k in _KINDS if isinstance(e, k))
    raise kind(f"{flag} {e}") from e


def _folders_below(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted({p.parent for name in _WEIGHTS for p in path.rglob(name)})


def load_dictionaries(spec: str, config: models.Gemma3Config, *,
                      load: Callable[[str], Any] = interop.load_dictionary,
                      flag: str = "dictionaries") -> Any:
  """{layer: transcoder} or one CLT, as `attribute` takes them, checked
  against `config`; every error message names `flag`.

  Raises:
    UsageError: an empty spec, a release name with an unknown part, or two
      transcoders for one layer.
    InputError / MissingInputError: a folder or name that does not hold
      transcoders, or transcoders (a CLT) that do not fit `config`: its
      layers, its width.
  """
  spec = str(spec).strip()
  if "{L}" in spec:
    parts = [spec.replace("{L}", str(l)) for l in range(config.num_layers)]
  else:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise errors.UsageError(f"{flag} {spec!r}: give a folder, a CLT or "
                            "release names")
  found: list[tuple[str, Any]] = []
  for part in parts:
    path = pathlib.Path(part)
    if path.is_dir() and not any((path / w).is_file() for w in _WEIGHTS):
      if (path / interop.multilayer.params_file(0)).is_file():
        found.append((part, _read(part, load, flag)))
        continue
      below = _folders_below(path)
      if not below:
        raise errors.InputError(f"{flag} {part}: holds no dictionary folder "
                                f"({' or '.join(_WEIGHTS)})")
      found.extend((str(p), _read(str(p), load, flag)) for p in below)
    else:
      found.append((part, _read(part, load, flag)))
  clts = [(w, d) for w, d in found
          if isinstance(d, interop.MultiLayerInference)]
  if clts:
    if len(found) != 1 or clts[0][1].kind != "clt":
      raise errors.UsageError(f"{flag} {spec}: give one cross-layer "
                              "transcoder, or transcoders only")
    d, L, D = clts[0][1], config.num_layers, config.d_model
    if d.n_layers != L or d.d_in != D:
      raise errors.InputError(f"{flag} {clts[0][0]}: a CLT of {d.n_layers} "
                              f"layers of width {d.d_in}; the model has {L} "
                              f"of width {D}")
    return d
  by_layer: dict[int, Any] = {}
  for where, d in found:
    layer = _layer_of(d, f"{flag} {where}", config)
    if layer in by_layer:
      raise errors.UsageError(f"{flag} {spec}: two transcoders for layer "
                              f"{layer} ({where} and another)")
    by_layer[layer] = d
  return by_layer
