"""Multi-layer dictionaries (crosscoders, CLTs) as Gemma Scope 2 stores them.

A multi-layer dictionary is one folder holding `config.json` and one
`params_layer_{i}.safetensors` per layer i (float32):
- crosscoder: `w_enc` (d, d_sae) = layer i's encoder block, `w_dec` (d_sae,
  d) = every latent's write to layer i, `b_dec` (d,), and the shared `b_enc`
  (d_sae,) and `threshold` (d_sae,) repeated in every file (the reader checks
  that the copies agree);
- CLT: layer i's `w_enc` (d, d_sae), `b_enc` (d_sae,), `threshold` (d_sae,),
  `w_dec` (d_sae, n_layers_out, d) with n_layers_out = n_layers - i (its
  writes to layers i, ..., n_layers - 1; the never-written earlier layers
  are not stored) and `b_dec` (d,) of mlp_out at layer i.
config.json: `architecture` ("jump_relu" or our "topk" with `k`), `type`
("crosscoder" or "clt"), `n_layers`, `d_in`, `d_sae` (per layer for a CLT),
`width`, `hookpoints` (and `hookpoints_out`), `model_name`, metadata.

In memory the arrays are stacked over layers as the modules' `to_inference`
returns them (`MultiLayerInference`), which also computes the raw-unit
forward pass in numpy for checks.

Caveat: a crosscoder's b_enc and threshold are repeated in every layer file
(n_layers copies, small beside w_enc/w_dec); w_dec of a CLT is stored
without its masked blocks, so a reader that wants the full (n, d_sae, n, d)
array pads zeros back in (`load_multilayer_gemmascope2` does).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np
import safetensors.numpy

from gemscope_jax import assets
from gemscope_jax.interop import _inference
from gemscope_jax.interop._inference import FormatError
from gemscope_jax.interop import gemmascope2

KINDS = ("crosscoder", "clt")
ARCHITECTURES = ("jumprelu", "topk")
CONFIG = "config.json"
ARCH_FROM_FILE = {"jump_relu": "jumprelu", "topk": "topk"}


def params_file(i: int) -> str:
  """The file name of layer i's arrays."""
  return f"params_layer_{i}.safetensors"


@dataclasses.dataclass(frozen=True, eq=False)
class MultiLayerInference:
  """A crosscoder or CLT in raw units, arrays stacked over layers.

  Attributes:
    kind: 'crosscoder' or 'clt'.
    w_enc: (n_layers, d, d_sae).
    w_dec: crosscoder (d_sae, n_layers, d); CLT (n_layers, d_sae, n_layers,
      d) with zero blocks where source > output layer.
    b_enc: crosscoder (d_sae,); CLT (n_layers, d_sae).
    b_dec: (n_layers, d).
    threshold: shaped as b_enc (zeros for topk).
    architecture: 'jumprelu' or 'topk'.
    k: latents per token (topk; a CLT's total over layers).
    hookpoints: per-layer input hookpoints, if known.
    hookpoints_out: per-layer output hookpoints (a CLT), if known.
    model_name: the model it was trained on.
    metadata: other plain JSON values.
  """
  kind: str
  w_enc: np.ndarray
  w_dec: np.ndarray
  b_enc: np.ndarray
  b_dec: np.ndarray
  threshold: np.ndarray
  architecture: str = "jumprelu"
  k: int | None = None
  hookpoints: tuple[str, ...] | None = None
  hookpoints_out: tuple[str, ...] | None = None
  model_name: str | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"MultiLayerInference.kind: must be one of {KINDS}, "
                       f"got {self.kind!r}")
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"MultiLayerInference.architecture: must be one of "
                       f"{ARCHITECTURES}, got {self.architecture!r}")
    for name in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
      object.__setattr__(self, name, np.asarray(getattr(self, name),
                                                np.float32))
    if self.w_enc.ndim != 3:
      raise ValueError(f"MultiLayerInference.w_enc: shape {self.w_enc.shape}"
                       ", expected (n_layers, d, d_sae)")
    n, d, s = self.w_enc.shape
    clt = self.kind == "clt"
    want = {"w_dec": (n, s, n, d) if clt else (s, n, d),
            "b_enc": (n, s) if clt else (s,), "b_dec": (n, d),
            "threshold": (n, s) if clt else (s,)}
    for name, shape in want.items():
      _inference.check_shape("MultiLayerInference", name,
                             getattr(self, name).shape, shape,
                             f"w_enc is {self.w_enc.shape}")
    if self.architecture == "topk" and not isinstance(self.k, int):
      raise ValueError(f"MultiLayerInference.k: topk needs an int, got "
                       f"{self.k!r}")

  @property
  def n_layers(self) -> int:
    return int(self.w_enc.shape[0])

  @property
  def d_in(self) -> int:
    return int(self.w_enc.shape[1])

  @property
  def d_sae(self) -> int:
    return int(self.w_enc.shape[2])

  @classmethod
  def from_arrays(cls, kind: str, arrays: dict[str, Any], **kwargs
                  ) -> MultiLayerInference:
    """From a module's `to_inference` dict."""
    return cls(kind=kind, **{k: np.asarray(v) for k, v in arrays.items()},
               **kwargs)

  def encode(self, x) -> np.ndarray:
    """(..., n_layers, d) raw -> latents (..., d_sae) or (..., n, d_sae)."""
    x = np.asarray(x, np.float64)
    eq = "...nd,ndl->...nl" if self.kind == "clt" else "...nd,ndl->...l"
    pre = np.einsum(eq, x, self.w_enc.astype(np.float64)) + self.b_enc
    acts = np.maximum(pre, 0.0)
    if self.architecture == "jumprelu":
      return acts * (pre > self.threshold)
    flat = acts.reshape(*x.shape[:-2], -1)
    kth = -np.sort(-flat, axis=-1)[..., self.k - 1:self.k]
    return (flat * (flat >= kth)).reshape(acts.shape)

  def decode(self, latents) -> np.ndarray:
    eq = "...nl,nlod->...od" if self.kind == "clt" else "...l,lnd->...nd"
    return np.einsum(eq, np.asarray(latents, np.float64),
                     self.w_dec.astype(np.float64)) + self.b_dec

  def __call__(self, x) -> np.ndarray:
    return self.decode(self.encode(x))


def _layer_arrays(d: MultiLayerInference, i: int) -> dict[str, np.ndarray]:
  if d.kind == "crosscoder":
    arrays = {"w_enc": d.w_enc[i], "w_dec": d.w_dec[:, i], "b_enc": d.b_enc,
              "b_dec": d.b_dec[i], "threshold": d.threshold}
  else:
    arrays = {"w_enc": d.w_enc[i], "w_dec": d.w_dec[i, :, i:],
              "b_enc": d.b_enc[i], "b_dec": d.b_dec[i],
              "threshold": d.threshold[i]}
  return {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}


def save_multilayer_gemmascope2(d: MultiLayerInference,
                                out: str | os.PathLike, *,
                                overwrite: bool = False) -> pathlib.Path:
  """Writes `d` as a folder of per-layer files (module docstring); returns it.

  A non-empty `out` is refused unless `overwrite`, which replaces only this
  writer's files, stale layers of an older export included
  (`safe_write.atomic_dir`).

  Raises:
    FormatError: a non-finite array (nothing is written). The folder is
    built beside `out` and renamed into place.
  """
  folder = pathlib.Path(out)
  per_layer = [_layer_arrays(d, i) for i in range(d.n_layers)]
  for i, arrays in enumerate(per_layer):
    _inference.check_finite(f"{folder / params_file(i)} (not written)",
                            arrays)
  config = {
      "architecture": "topk" if d.architecture == "topk" else "jump_relu",
      "type": d.kind, "model_name": d.model_name, "n_layers": d.n_layers,
      "d_in": d.d_in, "d_sae": d.d_sae,
      "width": d.d_sae * (d.n_layers if d.kind == "clt" else 1),
      "k": d.k,
      "hookpoints": None if d.hookpoints is None else list(d.hookpoints),
      "hookpoints_out": (None if d.hookpoints_out is None
                         else list(d.hookpoints_out)),
  }
  config.update({k: v for k, v in d.metadata.items() if k not in config})
  with assets.atomic_dir(folder, overwrite=overwrite,
                         owns=(params_file("*"), CONFIG)) as tmp:
    for i, arrays in enumerate(per_layer):
      safetensors.numpy.save_file(arrays, str(tmp / params_file(i)))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return folder


def _field(cfg_file, cfg, name, check):
  value = cfg.get(name)
  if not check(value):
    raise FormatError(f"{cfg_file}: field {name!r} is {value!r}")
  return value


def load_multilayer_gemmascope2(path: str | os.PathLike
                                ) -> MultiLayerInference:
  """Reads a folder written by `save_multilayer_gemmascope2`.

  Raises:
    FileNotFoundError: no such folder, or a missing config or layer file.
    FormatError: bad config fields, a missing key, a shape that disagrees
      with config.json or the other layers, crosscoder copies of b_enc or
      threshold that differ between files, non-finite weights.
  """
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: no such dictionary folder")
  cfg_file = folder / CONFIG
  cfg = gemmascope2.read_json(cfg_file)
  arch = _field(cfg_file, cfg, "architecture", lambda v: v in ARCH_FROM_FILE)
  kind = _field(cfg_file, cfg, "type", lambda v: v in KINDS)
  pos = lambda v: isinstance(v, int) and v > 0  # noqa: E731
  n = _field(cfg_file, cfg, "n_layers", pos)
  d = _field(cfg_file, cfg, "d_in", pos)
  s = _field(cfg_file, cfg, "d_sae", pos)
  arch = ARCH_FROM_FILE[arch]
  if arch == "topk":
    _field(cfg_file, cfg, "k", pos)
  keys = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
  layers = []
  for i in range(n):
    file = folder / params_file(i)
    arrays = gemmascope2.read_arrays(file)
    _inference.require_keys(str(file), arrays, keys)
    want = {"w_enc": (d, s), "b_dec": (d,), "b_enc": (s,), "threshold": (s,),
            "w_dec": (s, n - i, d) if kind == "clt" else (s, d)}
    for key, shape in want.items():
      _inference.check_shape(str(file), key, arrays[key].shape, shape,
                             f"{CONFIG} says n_layers={n}, d_in={d}, "
                             f"d_sae={s}")
    _inference.check_finite(str(file), {k: arrays[k] for k in keys})
    layers.append(arrays)
  stack = lambda key: np.stack([a[key] for a in layers])  # noqa: E731
  if kind == "crosscoder":
    for key in ("b_enc", "threshold"):
      for i, a in enumerate(layers[1:], 1):
        if not np.array_equal(a[key], layers[0][key]):
          raise FormatError(f"{folder / params_file(i)}: {key} differs from "
                            f"{params_file(0)}'s (a crosscoder shares it)")
    w_dec = np.stack([a["w_dec"] for a in layers], axis=1)
    b_enc, threshold = layers[0]["b_enc"], layers[0]["threshold"]
  else:
    w_dec = np.zeros((n, s, n, d), np.float32)
    for i, a in enumerate(layers):
      w_dec[i, :, i:] = a["w_dec"]
    b_enc, threshold = stack("b_enc"), stack("threshold")
  ours = {"architecture", "type", "n_layers", "d_in", "d_sae", "width", "k",
          "hookpoints", "hookpoints_out", "model_name"}
  hps = cfg.get("hookpoints")
  hps_out = cfg.get("hookpoints_out")
  return MultiLayerInference(
      kind=kind, w_enc=stack("w_enc"), w_dec=w_dec, b_enc=b_enc,
      b_dec=stack("b_dec"), threshold=threshold, architecture=arch,
      k=cfg.get("k") if arch == "topk" else None,
      hookpoints=None if hps is None else tuple(hps),
      hookpoints_out=None if hps_out is None else tuple(hps_out),
      model_name=cfg.get("model_name"),
      metadata={k: v for k, v in cfg.items() if k not in ours})
