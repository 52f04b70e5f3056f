"""Training configs: the public face for writing, loading and checking them.

A run is described by one `ml_collections.ConfigDict` (`default_config`
lists every field). Config files (`configs/*.py`, `experiments/*.py`)
define `get_config(arg)`; `load("file.py:arg")` imports one and calls it,
and `parse_arg` / `apply_overrides` turn the `arg` string
(`runlocal,layer=6,width=16384`) into changes. `check` validates every field
up front, naming the bad one; `plans.make` does the same and reads the
config into the frozen plans the trainer runs on.

  c = config.load("experiments/jumprelu_270m.py:runlocal")
  c = config.preset("gemma3_1b", "layer=13")

Where each piece lives: `schema` (fields, JSON), `overrides`, `presets`,
`members` (kinds, layouts, groups), `checks`, `plans`.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from gemscope_jax import errors
from gemscope_jax.training.checks import validate
from gemscope_jax.training.members import (dict_config, hookpoints, is_group,
                                           kind, layout)
from gemscope_jax.training.overrides import (RUNLOCAL, SHORTHANDS,
                                             Overrides, apply_overrides,
                                             parse_arg)
from gemscope_jax.training.presets import PRESETS, SIZES, preset
from gemscope_jax.training.schema import (DTYPES, STEPS, default_config,
                                          from_json, to_json)

__all__ = [
    "DTYPES", "Overrides", "PRESETS", "RUNLOCAL", "SHORTHANDS", "SIZES",
    "STEPS",
    "apply_overrides", "check", "default_config", "dict_config",
    "finetune_config", "from_json", "hookpoints", "is_group", "kind", "layout", "load",
    "parse_arg", "preset", "to_json",
]


# The shorthands of fine-tuning experiments (experiments/*_kl.py):
# finetune fields (other keys: dotted paths, e.g. finetune.beta1=0.9).
FINETUNE_SHORTHANDS = {"beta": "finetune.beta", "lr": "finetune.lr",
                       "tokens": "finetune.num_tokens",
                       "windows": "finetune.windows_per_step",
                       "source": "finetune.source",
                       "splice": "finetune.splice"}


def finetune_config(arg: str | None, **fields) -> ml_collections.ConfigDict:
  """A fine-tuning experiment's config: the schema's defaults with
  `fields` set in its finetune section, then the arguments after the
  colon: `control` (beta = 0), `runlocal` (2 steps of 2 windows),
  FINETUNE_SHORTHANDS and dotted paths."""
  overrides = parse_arg(arg)
  c = default_config()
  f = c.finetune
  f.update(fields)
  if overrides.pop("control", False):
    f.beta = 0.0
  if overrides.pop("runlocal", False):
    f.num_tokens, f.windows_per_step = 2 * 2 * 127, 2
    f.checkpoint_every_steps = f.log_every_steps = 1
  renamed = Overrides()
  for key, value in overrides.items():
    renamed[FINETUNE_SHORTHANDS.get(key, key)] = value
  return apply_overrides(c, renamed)


def check(c: ml_collections.ConfigDict):
  """Validates `c`; returns the Gemma config it names. Raises ValueError
  (FileNotFoundError for missing text) naming the field."""
  return validate(c)[0]


def load(spec: str) -> ml_collections.ConfigDict:
  """Imports `path.py[:arg]` and returns its `get_config(arg)`."""
  path_text, _, arg = spec.partition(":")
  path = pathlib.Path(path_text)
  flag = errors.option("config", "--config")
  if not path.is_file():
    raise errors.MissingInputError(f"{flag} {path}: no such config file")
  module_spec = importlib.util.spec_from_file_location(
      f"gemscope_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise errors.InputError(f"{flag} {path}: a config file must define "
                            "get_config(arg)")
  c = module.get_config(arg or None)
  if not isinstance(c, ml_collections.ConfigDict):
    raise errors.InputError(f"{flag} {path}: get_config returned "
                            f"{type(c).__name__}, not a ConfigDict")
  return c
