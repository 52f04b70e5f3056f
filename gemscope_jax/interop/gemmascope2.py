"""Gemma Scope 2 release folders: write and read.

A release folder is `{site}/layer_{L}_width_{W}_l0_{N}[_affine]/` holding
`params.safetensors` (float32 `w_enc` (d_in, d_sae), `w_dec` (d_sae, d_out),
`b_enc`, `b_dec`, `threshold`, plus `affine_skip_connection` (d_in, d_out)
for affine transcoders) and `config.json`. The published config.json holds
`architecture: "jump_relu"`, `model_name`, `width` (an int), `l0` (an int),
`affine_connection`, `type` ("sae" or "transcoder"), `hf_hook_point_in` and
`hf_hook_point_out` (equal to the input for an SAE). We write those and add
ours beside them: `hookpoint`, `hookpoint_out`, `d_in`, `d_sae`, `d_out`,
`k`, and the dictionary's metadata (e.g. `norm_scale`, `trained_tokens`).

Names in the folder:
- width: the published names for 16384/65536/262144/1048576 (16k, 65k, 262k,
  1m); other multiples of 1024 follow the same truncated-decimal rule
  (4096 -> 4k, 131072 -> 131k); any other width is its exact number.
- l0: the published words where the target is exactly the published typical
  value (20 -> small, 60 -> medium, 150 -> big); any other target is its
  rounded number (l0_37). The target is the `l0=` argument, else the
  dictionary's metadata `target_l0`, else its `k`, else the `l0` of the
  config.json it was read from.
- site: resid_post, attn_out, mlp_out; a transcoder (mlp_in -> mlp_out)
  goes under `transcoder`; other sites keep our site name (not published).

Caveat: Gemma Scope 2 has only JumpReLU. A TopK dictionary (per-token
selection, not a threshold) is written with `architecture: "topk"` and `k`,
an extension that only this package reads; ReLU and BatchTopK dictionaries
are written as JumpReLU (zero thresholds, the global threshold) and read
back as JumpReLU.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np
import safetensors.numpy

from gemscope_jax import assets
from gemscope_jax.interop import _inference
from gemscope_jax.interop._inference import FormatError, InferenceDictionary
from gemscope_jax.models import hooks

PARAMS = "params.safetensors"
CONFIG = "config.json"
PUBLISHED_WIDTHS = {16384: "16k", 65536: "65k", 262144: "262k",
                    1048576: "1m"}
PUBLISHED_L0 = {20: "small", 60: "medium", 150: "big"}
# config.json architecture -> ours; "topk" is this package's extension.
ARCH_FROM_FILE = {"jump_relu": "jumprelu", "topk": "topk"}


def width_name(width: int) -> str:
  """16384 -> '16k', 4096 -> '4k', 1048576 -> '1m', 1000 -> '1000'."""
  if width in PUBLISHED_WIDTHS:
    return PUBLISHED_WIDTHS[width]
  if width % (1 << 20) == 0:
    return f"{width // 1_000_000}m"
  if width % 1024 == 0:
    return f"{width // 1000}k"
  return str(width)


def l0_name(l0: float) -> str:
  """20 -> 'small', 60 -> 'medium', 150 -> 'big', 37.4 -> '37'."""
  rounded = int(round(float(l0)))
  if float(l0) == rounded and rounded in PUBLISHED_L0:
    return PUBLISHED_L0[rounded]
  return str(rounded)


def _hf_name(hookpoint: str) -> str:
  return hooks.parse(hookpoint).hf_name


def hookpoint_from_hf(name: str | None) -> str | None:
  """'model.layers.6.output' -> 'layer_6/resid_post'; None if unknown."""
  if not name:
    return None
  for site, template in hooks.HF_HOOKS.items():
    pattern = re.escape(template).replace(r"\{layer\}", r"(\d+)")
    m = re.fullmatch(pattern, name)
    if m:
      return f"layer_{int(m.group(1))}/{site}"
  return None


def _target_l0(d: InferenceDictionary, l0):
  for value in (l0, d.metadata.get("target_l0"), d.k, d.metadata.get("l0")):
    if value is not None:
      return value
  return None


def folder_name(d: InferenceDictionary, *, l0=None) -> str:
  """'resid_post/layer_6_width_16k_l0_medium' (see the module docstring)."""
  if d.hookpoint is None:
    raise ValueError("save_gemmascope2: the dictionary has no hookpoint; "
                     "set one (d.replace(hookpoint='layer_6/resid_post'))")
  hp = hooks.parse(d.hookpoint)
  target = _target_l0(d, l0)
  if target is None:
    raise ValueError("save_gemmascope2: no target L0 for the folder name; "
                     "pass l0=")
  site = "transcoder" if d.is_transcoder else hp.site
  affine = "_affine" if d.affine_skip is not None else ""
  return (f"{site}/layer_{hp.layer}_width_{width_name(d.d_sae)}"
          f"_l0_{l0_name(target)}{affine}")


def _file_arrays(d: InferenceDictionary) -> dict[str, np.ndarray]:
  d = d.folded()
  arrays = {"w_enc": d.w_enc, "w_dec": d.w_dec, "b_enc": d.b_enc,
            "b_dec": d.b_dec}
  if d.architecture == "jumprelu":
    arrays["threshold"] = d.threshold
  elif d.architecture == "relu":
    arrays["threshold"] = np.zeros((d.d_sae,), np.float32)
  if d.affine_skip is not None:
    arrays["affine_skip_connection"] = d.affine_skip
  return {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}


def _config(d: InferenceDictionary, l0) -> dict:
  target = _target_l0(d, l0)
  cfg = {
      "architecture": "topk" if d.architecture == "topk" else "jump_relu",
      "model_name": d.model_name,
      "width": d.d_sae,
      "l0": None if target is None else (
          int(target) if float(target) == int(target) else float(target)),
      "affine_connection": d.affine_skip is not None,
      "type": "transcoder" if d.is_transcoder else "sae",
  }
  if d.hookpoint is not None:
    cfg["hf_hook_point_in"] = _hf_name(d.hookpoint)
    cfg["hf_hook_point_out"] = _hf_name(d.hookpoint_out or d.hookpoint)
  cfg.update({k: v for k, v in d.metadata.items() if k not in cfg})
  cfg.update({"hookpoint": d.hookpoint, "hookpoint_out": d.hookpoint_out,
              "d_in": d.d_in, "d_sae": d.d_sae, "d_out": d.d_out, "k": d.k})
  return cfg


def save_gemmascope2(d: InferenceDictionary, out: str | os.PathLike, *,
                     l0=None, release_layout: bool = True,
                     overwrite: bool = False) -> pathlib.Path:
  """Writes `d` as a Gemma Scope 2 params folder; returns the folder.

  Args:
    d: the dictionary (a `pre_enc_bias` one is folded first).
    out: the release root (the folder goes to out/{site}/{name}), or with
      `release_layout=False` the params folder itself.
    l0: target L0 for config.json and the folder name; default the
      metadata's `target_l0`, else `k`.
    release_layout: place the folder under its release name.
    overwrite: write into a non-empty folder, replacing only this writer's
      files (`safe_write.atomic_dir`); otherwise that is refused.

  Raises:
    FormatError: a non-finite array (nothing is written). Any failure
    leaves no partial folder: it is built beside the destination and
    renamed into place.
  """
  out = pathlib.Path(out)
  folder = out / folder_name(d, l0=l0) if release_layout else out
  arrays = _file_arrays(d)
  _inference.check_finite(f"{folder / PARAMS} (not written)", arrays)
  config = _config(d, l0)
  with assets.atomic_dir(folder, overwrite=overwrite,
                         owns=(PARAMS, CONFIG)) as tmp:
    safetensors.numpy.save_file(arrays, str(tmp / PARAMS))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return folder


def find_params_folder(path: str | os.PathLike, marker: str) -> pathlib.Path:
  """`path` if it holds `marker`, else the one folder below it that does."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such dictionary folder")
  if path.is_file():
    path = path.parent
  if (path / marker).exists():
    return path
  found = sorted(p.parent for p in path.rglob(marker))
  if not found:
    raise FileNotFoundError(f"{path}: no {marker} in it or below it")
  if len(found) > 1:
    names = ", ".join(str(p.relative_to(path)) for p in found[:5])
    raise ValueError(f"{path}: holds {len(found)} dictionaries ({names}"
                     f"{', ...' if len(found) > 5 else ''}); name one")
  return found[0]


def read_json(file: pathlib.Path) -> dict:
  """The JSON object in `file`; FormatError if it is not one."""
  if not file.is_file():
    raise FileNotFoundError(f"{file}: missing")
  try:
    value = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise FormatError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise FormatError(f"{file}: expected a JSON object")
  return value


def read_arrays(file: pathlib.Path) -> dict[str, np.ndarray]:
  """The arrays of a safetensors file; FormatError if it is unreadable."""
  if not file.is_file():
    raise FileNotFoundError(f"{file}: missing")
  try:
    return safetensors.numpy.load_file(str(file))
  except Exception as e:  # safetensors raises its own error types.
    raise FormatError(f"{file}: not a readable safetensors file ({e})"
                      ) from None


def load_gemmascope2(path: str | os.PathLike) -> InferenceDictionary:
  """Reads a Gemma Scope 2 params folder (or a folder holding exactly one).

  Raises:
    FileNotFoundError: no such folder, or a missing params/config file.
    FormatError: a missing key, a shape that disagrees with the others or
      with config.json, an unknown architecture, non-finite weights.
  """
  folder = find_params_folder(path, PARAMS)
  cfg_file, params_file = folder / CONFIG, folder / PARAMS
  cfg = read_json(cfg_file)
  arch = cfg.get("architecture")
  if arch not in ARCH_FROM_FILE:
    raise FormatError(f"{cfg_file}: field 'architecture' is {arch!r}, "
                      f"expected one of {sorted(ARCH_FROM_FILE)}")
  arch = ARCH_FROM_FILE[arch]
  arrays = read_arrays(params_file)
  affine = bool(cfg.get("affine_connection", False))
  needed = ["w_enc", "w_dec", "b_enc", "b_dec"]
  needed += ["threshold"] if arch == "jumprelu" else []
  needed += ["affine_skip_connection"] if affine else []
  _inference.require_keys(str(params_file), arrays, needed)
  p = str(params_file)
  for key in ("w_enc", "w_dec"):
    if arrays[key].ndim != 2:
      raise FormatError(f"{p}: {key} has shape {arrays[key].shape}, expected"
                        " a matrix")
  d_in, d_sae = arrays["w_enc"].shape
  d_out = arrays["w_dec"].shape[1]
  for field, got in (("width", d_sae), ("d_sae", d_sae), ("d_in", d_in),
                     ("d_out", d_out)):
    want = cfg.get(field)
    if isinstance(want, int) and want != got:
      key = "w_dec" if field == "d_out" else "w_enc"
      shape = arrays[key].shape
      expected = ((d_in, want) if field in ("width", "d_sae") else
                  (want, d_sae) if field == "d_in" else (d_sae, want))
      _inference.check_shape(p, key, shape, expected,
                             f"{cfg_file.name} says {field}={want}")
  expected = {"w_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
              "threshold": (d_sae,), "affine_skip_connection": (d_in, d_out)}
  for key, shape in expected.items():
    if key in needed:
      _inference.check_shape(p, key, arrays[key].shape, shape,
                             f"w_enc is {arrays['w_enc'].shape}")
  _inference.check_finite(p, {k: arrays[k] for k in needed})
  if arch == "topk" and not isinstance(cfg.get("k"), int):
    raise FormatError(f"{cfg_file}: field 'k' is {cfg.get('k')!r}; a topk "
                      "dictionary needs an int")
  hp_in = cfg.get("hookpoint") or hookpoint_from_hf(cfg.get("hf_hook_point_in"))
  hp_out = cfg.get("hookpoint_out")
  if hp_out is None and cfg.get("type") == "transcoder":
    hp_out = hookpoint_from_hf(cfg.get("hf_hook_point_out"))
  ours = {"architecture", "model_name", "hookpoint", "hookpoint_out", "k",
          "d_in", "d_sae", "d_out"}
  return InferenceDictionary(
      w_enc=arrays["w_enc"], w_dec=arrays["w_dec"], b_enc=arrays["b_enc"],
      b_dec=arrays["b_dec"],
      threshold=arrays["threshold"] if arch == "jumprelu" else None,
      affine_skip=arrays.get("affine_skip_connection") if affine else None,
      architecture=arch, k=cfg.get("k") if arch == "topk" else None,
      hookpoint=hp_in, hookpoint_out=hp_out, model_name=cfg.get("model_name"),
      metadata={k: v for k, v in cfg.items() if k not in ours})
