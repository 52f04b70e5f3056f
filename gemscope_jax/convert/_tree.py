"""Checks a parameter tree against the one a Gemma 3 size must have."""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from gemscope_jax.convert._errors import CheckpointError
from gemscope_jax.models._api import abstract_params
from gemscope_jax.models._config import Gemma3Config


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b": x} -> {"a": {"b": x}}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def check_params(params: Mapping[str, Any], config: Gemma3Config,
                 source: str) -> None:
  """Raises CheckpointError naming the first missing, extra or misshapen leaf."""
  want = {k: v.shape for k, v in flatten(abstract_params(config)).items()}
  have = flatten(params)
  for key in sorted(want):
    if key not in have:
      raise CheckpointError(source, key, f"parameter is missing ({config.name}"
                            f" needs shape {want[key]})")
    shape = tuple(np.shape(have[key]))
    if shape != tuple(want[key]):
      raise CheckpointError(source, key, f"shape {shape} does not fit "
                            f"{config.name}, which needs {tuple(want[key])}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise CheckpointError(source, extra[0], f"unexpected parameter for "
                          f"{config.name} ({len(extra)} unexpected in all)")
  for key, value in have.items():
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise CheckpointError(source, key, f"dtype {value.dtype} is not a float")
