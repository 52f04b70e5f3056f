"""Reads and writes Gemma 3 parameters as Orbax checkpoints, the gemma format.

`load_orbax` reads what Google DeepMind's `gemma` library writes with
`gm.ckpts.save_params` (the nested `model.init()` tree, which is also our
tree) and the layouts of the released Gemma checkpoints that the library
reads: the older flat one (`{'transformer/layer_0/attn/q_einsum': {'w': ...},
'transformer/layer_0/mlp/linear': {'w': ...}, ...}`) and the stacked one
(`transformer/stacked_layers/attention_type_{i}/...`, layers of one attention
type stacked on a leading axis). Only orbax-checkpoint is used; the `gemma`
library is never imported. The vision tower and multimodal projection of the
4B/12B/27B checkpoints are skipped and never read from disk. Kauldron
training checkpoints (params beside an optimizer state) are not supported.

`save_orbax` writes the nested layout, as `gm.ckpts.save_params` does, into a
temporary directory that is renamed into place once complete.

Main caveat: the whole text decoder is restored into host memory as numpy
arrays in the requested dtype (a 27B in float32 is about 108 GB); pass
`dtype=None` to keep the stored dtype (bfloat16 for the released weights).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import uuid
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import errors
from gemscope_jax.convert._errors import CheckpointError
from gemscope_jax.convert._tree import check_params, flatten, unflatten
from gemscope_jax.models._config import CONFIGS, Gemma3Config

# Files at least one of which every Orbax PyTree checkpoint directory has
# (`checkpoint` is the pre-OCDBT msgpack of very old releases).
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt",
                  "checkpoint")
_FLAT_TEXT = "transformer/"
_FLAT_VISION = "SigLiPFromPatches_0/"
_STACKED = re.compile(r"^transformer/stacked_layers/attention_type_(\d+)/(.+)$")
# In the flat layouts the MLP matrices sit under an extra 'w' that the nested
# layout does not have (gemma's `param_remapper`).
_MLP_SUFFIXES = ("mlp/linear", "mlp/gating_einsum")
_LAYER = re.compile(r"^layer_(\d+)/")

# (checkpoint path, index on the stacked axis or None).
_Source = tuple[tuple[str, ...], int | None]


def _is_vision(key: str) -> bool:
  return key.startswith(("vision_encoder/", "embedder/mm_"))


def _orbax():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel  (heavy: orbax pulls in tensorstore, only for Orbax folders)
  return ocp


def _check_directory(path: pathlib.Path) -> None:
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  if not path.is_dir():
    raise CheckpointError(path, None, "not a directory; an Orbax checkpoint "
                          "is a directory")
  if any((path / m).exists() for m in _ORBAX_MARKERS):
    return
  inner = sorted(p.name for p in path.iterdir() if p.is_dir() and any(
      (p / m).exists() or (p / "default" / m).exists() for m in _ORBAX_MARKERS))
  hint = (f"; it holds checkpoints in {', '.join(inner[:5])}: pass one of "
          "those" if inner else "")
  raise CheckpointError(path, None, "not an Orbax checkpoint (none of "
                        f"{', '.join(_ORBAX_MARKERS)} is in it){hint}")


def _walk(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
          ) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    path = (*prefix, str(key))
    if isinstance(value, Mapping):
      out.update(_walk(value, path))
    else:
      out[path] = value
  return out


def _read_metadata(path: pathlib.Path) -> dict[tuple[str, ...], Any]:
  """{checkpoint path: array metadata (shape, dtype)} without reading data."""
  try:
    meta = _orbax().PyTreeCheckpointer().metadata(path)
  except Exception as e:  # orbax raises many types for a damaged directory.
    raise CheckpointError(path, None, f"cannot read the Orbax metadata "
                          f"({type(e).__name__}: {e})") from e
  # Newer orbax wraps the tree in StepMetadata.item_metadata.tree.
  meta = getattr(meta, "item_metadata", meta)
  tree = getattr(meta, "tree", meta)
  if not isinstance(tree, Mapping) or not tree:
    raise CheckpointError(path, None, "no readable parameter tree (its "
                          "_METADATA is missing, empty or damaged)")
  leaves = _walk(tree)
  for p, leaf in leaves.items():
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      raise CheckpointError(path, "/".join(p), f"not an array but "
                            f"{type(leaf).__name__}; not a parameter "
                            "checkpoint")
  return leaves


def _layout(top_keys: set[str]) -> str:
  # The same tests, in the same order, as gemma's own reader.
  if any(k.startswith(_FLAT_TEXT + "stacked_layers") for k in top_keys):
    return "stacked"
  if all(k.startswith((_FLAT_TEXT, _FLAT_VISION)) for k in top_keys):
    return "flat"
  return "nested"


def _flat_name(module: str, leaf: tuple[str, ...]) -> str:
  if module.endswith(_MLP_SUFFIXES) and leaf == ("w",):
    return module
  return "/".join((module, *leaf))


def _plan(leaves: Mapping[tuple[str, ...], Any], source: str
          ) -> tuple[dict[str, _Source], dict[str, tuple[int, ...]], str]:
  """Maps our parameter names to checkpoint entries, vision entries dropped.

  Returns:
    ({our key: source}, {our key: shape}, layout name).
  """
  layout = _layout({p[0] for p in leaves})
  if layout == "stacked":
    period = 1 + max(int(m.group(1)) for p in leaves
                     if (m := _STACKED.match(p[0])))
  sources: dict[str, _Source] = {}
  shapes: dict[str, tuple[int, ...]] = {}
  for path, leaf in leaves.items():
    shape = tuple(int(n) for n in leaf.shape)
    top, rest = path[0], path[1:]
    if layout == "nested":
      named = {"/".join(path): (None, shape)}
    elif top.startswith(_FLAT_VISION):
      continue
    elif layout == "stacked" and (m := _STACKED.match(top)):
      if not shape:
        raise CheckpointError(source, "/".join(path), "a stacked entry "
                              "is a scalar")
      index, module = int(m.group(1)), m.group(2)
      named = {_flat_name(f"layer_{j * period + index}/{module}", rest):
               (j, shape[1:]) for j in range(shape[0])}
    elif top.startswith(_FLAT_TEXT):
      named = {_flat_name(top[len(_FLAT_TEXT):], rest): (None, shape)}
    else:
      named = {"/".join(path): (None, shape)}  # check_params will name it.
    for key, (index, sub_shape) in named.items():
      if _is_vision(key):
        continue
      sources[key] = (path, index)
      shapes[key] = sub_shape
  return sources, shapes, layout


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int,
          source: str) -> tuple[int, ...]:
  if key not in shapes:
    raise CheckpointError(source, key, "parameter is missing (it is needed "
                          "to tell the model size)")
  if len(shapes[key]) != ndim:
    raise CheckpointError(source, key, f"shape {shapes[key]} is not {ndim}-D")
  return shapes[key]


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]],
                       source: str = "<params>") -> Gemma3Config:
  """The published Gemma 3 size whose parameter shapes these are.

  Args:
    shapes: {'/'-joined parameter name: shape} in the official layout.
    source: Named in errors.

  Returns:
    The matching entry of `models.CONFIGS` (its vocab_size replaced if the
    embedding has another number of rows).

  Raises:
    CheckpointError: a parameter the dimensions are read from is missing or
      has the wrong rank, or the dimensions match no published size.
  """
  vocab, d_model = _need(shapes, "embedder/input_embedding", 2, source)
  heads, _, head_dim = _need(shapes, "layer_0/attn/q_einsum/w", 3, source)
  _, kv_heads, _, _ = _need(shapes, "layer_0/attn/kv_einsum/w", 4, source)
  _, mlp_dim, _ = _need(shapes, "layer_0/mlp/gating_einsum", 3, source)
  layers = {int(m.group(1)) for k in shapes if (m := _LAYER.match(k))}
  dims = dict(num_layers=max(layers) + 1, d_model=d_model, mlp_dim=mlp_dim,
              num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
  for config in CONFIGS.values():
    if all(getattr(config, k) == v for k, v in dims.items()):
      if config.vocab_size != vocab:
        config = config.replace(vocab_size=vocab)
      return config
  raise CheckpointError(source, None, f"the parameter shapes ({dims}) match "
                        f"no published Gemma 3 size ({', '.join(CONFIGS)}); "
                        + errors.option(
                            "pass config=", "a custom size loads from "
                            "Python only (convert.load_orbax(path, "
                            "config=...))"))


def load_orbax(path: str | os.PathLike, config: Gemma3Config | None = None,
               dtype: Any = np.float32) -> tuple[Gemma3Config, dict]:
  """Reads a Gemma 3 Orbax checkpoint into our (the official) parameter tree.

  Args:
    path: The checkpoint directory (the one holding `_METADATA`).
    config: The size the weights must fit; inferred from the shapes if None.
    dtype: numpy dtype of the returned leaves, or None for the stored one.

  Returns:
    (config, params) with params a nested dict of numpy arrays on the host.

  Raises:
    FileNotFoundError: `path` does not exist.
    CheckpointError: `path` is not an Orbax checkpoint, or its parameters do
      not fit `config` (missing, misshapen, unexpected or non-float), naming
      the directory and the parameter.
  """
  path = pathlib.Path(path)
  source = str(path)
  _check_directory(path)
  leaves = _read_metadata(path)
  sources, shapes, layout = _plan(leaves, source)
  if config is None:
    config = config_from_shapes(shapes, source)
  # Validate on shapes and dtypes alone, so a bad checkpoint fails before
  # gigabytes are read.
  abstract = {k: jax.ShapeDtypeStruct(shapes[k], leaves[p].dtype)
              for k, (p, _) in sources.items()}
  check_params(unflatten(abstract), config, source)

  ocp = _orbax()
  wanted = sorted({p for p, _ in sources.values()})
  restore_type = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
  # Built by path tuples: keys of the flat layouts themselves hold '/'.
  item: dict[str, Any] = {}
  for p in wanted:
    node = item
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = leaves[p]
  restore_args = jax.tree.map(lambda _: restore_type, item)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                          partial_restore=True))
  except Exception as e:  # tensorstore and orbax raise many types.
    raise CheckpointError(path, None, f"cannot restore the {layout} layout "
                          f"({type(e).__name__}: {e})") from e
  arrays = _walk(restored)
  flat = {}
  for key, (p, index) in sources.items():
    value = np.asarray(arrays[p])
    flat[key] = value if index is None else value[index]
  params = unflatten(flat)
  check_params(params, config, source)
  return config, params


def save_orbax(params: Mapping[str, Any], path: str | os.PathLike, *,
               config: Gemma3Config | None = None,
               overwrite: bool = False) -> pathlib.Path:
  """Writes params as `gm.ckpts.save_params` does: one nested Orbax tree.

  The checkpoint is written to a hidden temporary directory beside `path`
  and renamed to `path` only once complete, so an interrupted save leaves
  nothing at `path`.

  Args:
    params: Nested parameter tree (numpy or jax arrays), any dtype.
    path: The checkpoint directory to create.
    config: If given, params are checked against it before anything is
      written.
    overwrite: Replace an existing `path`; otherwise it is an error.

  Returns:
    `path` as a pathlib.Path.

  Raises:
    FileExistsError: `path` exists and overwrite is False.
    CheckpointError: params do not fit `config`.
  """
  path = pathlib.Path(path)
  if config is not None:
    check_params(params, config, str(path))
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path}: already exists (pass overwrite=True)")
  path.parent.mkdir(parents=True, exist_ok=True)
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp = path.parent / f".{path.name}.partial-{tag}"
  # gemma saves jax arrays; saving the same types keeps the metadata equal.
  tree = jax.tree.map(jnp.asarray, unflatten(flatten(params)))
  ocp = _orbax()
  try:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(tmp, tree)
      ckpt.wait_until_finished()
    if path.exists():
      old = path.parent / f".{path.name}.old-{tag}"
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return path
