"""A released sparse dictionary as a plain PyTorch module, without JAX.

`TorchDictionary.from_folder(path)` reads either layout a dictionary is
published in and evaluates it with nothing but torch:

* Gemma Scope 2 (`config.json` + `params.safetensors`): keys `w_enc`
  (d_in, d_sae), `w_dec` (d_sae, d_out), `b_enc`, `b_dec`, `threshold`,
  optionally `affine_skip_connection` (d_in, d_out); `architecture` is
  "jump_relu", or "topk" with a `k` field (written by this project).
* SAELens (`cfg.json` + `sae_weights.safetensors`): `W_enc`, `W_dec`,
  `b_enc`, `b_dec`, plus `threshold` (jumprelu) or `W_skip` (d_out, d_in)
  for skip transcoders; architectures "standard", "jumprelu", "topk",
  "batchtopk" (saved with a threshold, evaluated as JumpReLU) and the
  "transcoder" / "skip_transcoder" / "jumprelu_transcoder" /
  "jumprelu_skip_transcoder" variants. SAELens's `apply_b_dec_to_input`
  (default True) subtracts b_dec from x before the encoder, and topk's
  `rescale_acts_by_decoder_norm` is honoured.

The formulas (those of the Gemma Scope 2 and SAELens releases):
`pre = x @ w_enc + b_enc` (x - b_dec when
apply_b_dec_to_input), then JumpReLU `relu(pre) * (pre > threshold)`, TopK
the k largest of `relu(pre)` per token, standard `relu(pre)`; `decode(f) =
f @ w_dec + b_dec (+ x @ affine_skip)`.

This file imports only torch, safetensors and the standard library, and uses
no relative imports, so it works when copied on its own next to a
dictionary release.

Caveat: `encode` returns dense (..., d_sae) latents, so a batch costs
B * d_sae floats (a 1M-latent dictionary: 4 MB per token in fp32). SAELens
activation normalisation other than "none" (layer_norm, constant norm
rescale, expected-average scaling not folded in) is refused, not emulated,
and `hook_z` inputs must be flattened to (..., n_heads * d_head) by the
caller.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import torch
from safetensors.torch import load_file

GS2_FILES = ("config.json", "params.safetensors")
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")

# Folder architecture name -> (activation, is a transcoder).
_GS2_ARCHITECTURES = {"jump_relu": "jumprelu", "jumprelu": "jumprelu",
                      "topk": "topk", "relu": "relu", "standard": "relu"}
_SAELENS_ARCHITECTURES = {
    "standard": "relu", "jumprelu": "jumprelu", "topk": "topk",
    "batchtopk": "jumprelu", "transcoder": "relu", "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
}
ACTIVATIONS = ("jumprelu", "topk", "relu")


class DictionaryFormatError(ValueError):
  """A dictionary folder is unreadable; the message names file and key."""

  def __init__(self, source: str | os.PathLike, item: str | None,
               problem: str):
    where = f"{source}: {item}" if item else str(source)
    super().__init__(f"{where}: {problem}")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    cfg = json.loads(path.read_text())
  except ValueError as e:
    raise DictionaryFormatError(path, None, f"invalid JSON: {e}") from e
  if not isinstance(cfg, dict):
    raise DictionaryFormatError(path, None, "expected a JSON object")
  return cfg


def _read_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
  try:
    return load_file(str(path))
  except Exception as e:  # safetensors raises its own SafetensorError.
    raise DictionaryFormatError(path, None, f"not a readable safetensors "
                                f"file (truncated or corrupt?): {e}") from e


class TorchDictionary(torch.nn.Module):
  """An inference-only sparse dictionary (SAE or transcoder) in PyTorch.

  Attributes:
    w_enc: (d_in, d_sae) encoder.
    w_dec: (d_sae, d_out) decoder.
    b_enc: (d_sae,) encoder bias.
    b_dec: (d_out,) decoder bias.
    threshold: (d_sae,) JumpReLU thresholds, or None.
    affine_skip: (d_in, d_out) linear skip connection, or None.
    activation: "jumprelu", "topk" or "relu".
    k: latents kept per token (topk only).
    apply_b_dec_to_input: subtract b_dec from x before encoding (SAELens).
    rescale_acts_by_decoder_norm: SAELens topk option: pre-activations are
      multiplied by the decoder row norms, latents divided by them in decode.
  """

  def __init__(self, w_enc: torch.Tensor, w_dec: torch.Tensor,
               b_enc: torch.Tensor, b_dec: torch.Tensor, *,
               activation: str = "jumprelu",
               threshold: torch.Tensor | None = None,
               k: int | None = None,
               affine_skip: torch.Tensor | None = None,
               apply_b_dec_to_input: bool = False,
               rescale_acts_by_decoder_norm: bool = False,
               source: str = "<tensors>"):
    super().__init__()
    if activation not in ACTIVATIONS:
      raise DictionaryFormatError(source, "architecture", f"unknown "
                                  f"activation {activation!r}; known: "
                                  f"{', '.join(ACTIVATIONS)}")
    d_in, d_sae = tuple(w_enc.shape) if w_enc.ndim == 2 else (None, None)
    if d_in is None:
      raise DictionaryFormatError(source, "w_enc", f"shape "
                                  f"{tuple(w_enc.shape)} is not (d_in, d_sae)")
    d_out = w_dec.shape[-1] if w_dec.ndim == 2 else None
    want = {"w_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,)}
    got = {"w_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec}
    if activation == "jumprelu":
      if threshold is None:
        raise DictionaryFormatError(source, "threshold", "tensor is missing "
                                    "(a JumpReLU dictionary needs it)")
      want["threshold"], got["threshold"] = (d_sae,), threshold
    if affine_skip is not None:
      want["affine_skip"], got["affine_skip"] = (d_in, d_out), affine_skip
    for name, tensor in got.items():
      if tuple(tensor.shape) != want[name]:
        raise DictionaryFormatError(source, name, f"shape "
                                    f"{tuple(tensor.shape)} does not fit "
                                    f"w_enc {tuple(w_enc.shape)}: expected "
                                    f"{want[name]}")
    if activation == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
      raise DictionaryFormatError(source, "k", f"topk needs an integer k in "
                                  f"[1, d_sae={d_sae}], got {k!r}")
    if apply_b_dec_to_input and d_out != d_in:
      raise DictionaryFormatError(source, "apply_b_dec_to_input", f"needs "
                                  f"d_out == d_in, got {d_out} != {d_in}")
    for name, tensor in {"w_enc": w_enc, **got}.items():
      if not torch.isfinite(tensor).all():
        raise DictionaryFormatError(source, name, "holds NaN or infinite "
                                    "values")
    param = lambda t: torch.nn.Parameter(t, requires_grad=False)
    self.w_enc, self.w_dec = param(w_enc), param(w_dec)
    self.b_enc, self.b_dec = param(b_enc), param(b_dec)
    self.threshold = None if threshold is None else param(threshold)
    self.affine_skip = None if affine_skip is None else param(affine_skip)
    self.activation = activation
    self.k = k
    self.apply_b_dec_to_input = apply_b_dec_to_input
    self.rescale_acts_by_decoder_norm = rescale_acts_by_decoder_norm
    self.source = source

  @property
  def d_in(self) -> int:
    return self.w_enc.shape[0]

  @property
  def d_sae(self) -> int:
    return self.w_enc.shape[1]

  @property
  def d_out(self) -> int:
    return self.w_dec.shape[1]

  # -- loading --

  @classmethod
  def from_folder(cls, path: str | os.PathLike,
                  device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> TorchDictionary:
    """Loads a Gemma Scope 2 or SAELens dictionary folder.

    Args:
      path: the folder (holding config.json + params.safetensors, or
        cfg.json + sae_weights.safetensors).
      device: where the parameters go (default: torch's default device).
      dtype: parameter dtype; tensors are read in float32 first.

    Returns:
      The module, in eval mode.

    Raises:
      FileNotFoundError: neither layout's files are there.
      DictionaryFormatError: a missing or misshapen tensor, an unknown
        architecture, NaN values, ...; the message names file and key.
    """
    folder = pathlib.Path(path)
    if all((folder / f).is_file() for f in GS2_FILES):
      kwargs = _gemma_scope_kwargs(folder)
    elif all((folder / f).is_file() for f in SAELENS_FILES):
      kwargs = _saelens_kwargs(folder)
    else:
      raise FileNotFoundError(
          f"{folder}: not a dictionary folder; expected {' + '.join(GS2_FILES)}"
          f" (Gemma Scope 2) or {' + '.join(SAELENS_FILES)} (SAELens)")
    module = cls(**kwargs)
    return module.to(device=device, dtype=dtype).eval()

  # -- evaluation --

  def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
    """(..., d_in) -> (..., d_sae): x @ w_enc + b_enc (see class doc)."""
    x = x.to(self.w_enc.dtype)
    if self.apply_b_dec_to_input:
      x = x - self.b_dec
    pre = x @ self.w_enc + self.b_enc
    if self.rescale_acts_by_decoder_norm:
      pre = pre * self.w_dec.norm(dim=-1)
    return pre

  def encode(self, x: torch.Tensor) -> torch.Tensor:
    """(..., d_in) activations -> (..., d_sae) dense latents."""
    pre = self.pre_acts(x)
    acts = torch.relu(pre)
    if self.activation == "jumprelu":
      return acts * (pre > self.threshold).to(acts.dtype)
    if self.activation == "topk":
      values, indices = torch.topk(acts, self.k, dim=-1, sorted=False)
      return torch.zeros_like(acts).scatter(-1, indices, values)
    return acts

  def decode(self, f: torch.Tensor, x: torch.Tensor | None = None
             ) -> torch.Tensor:
    """(..., d_sae) latents -> (..., d_out) reconstruction.

    Args:
      f: latents from `encode`.
      x: the encoded input; needed only by an affine skip connection.
    """
    f = f.to(self.w_dec.dtype)
    if self.rescale_acts_by_decoder_norm:
      f = f / self.w_dec.norm(dim=-1)
    out = f @ self.w_dec + self.b_dec
    if self.affine_skip is not None:
      if x is None:
        raise ValueError(f"{self.source}: decode needs x for the affine "
                         "skip connection")
      out = out + x.to(self.affine_skip.dtype) @ self.affine_skip
    return out

  def forward(self, x: torch.Tensor, return_latents: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction of x, or (reconstruction, latents) if asked."""
    f = self.encode(x)
    recon = self.decode(f, x)
    return (recon, f) if return_latents else recon

  def extra_repr(self) -> str:
    extra = f", k={self.k}" if self.activation == "topk" else ""
    return (f"{self.activation}, d_in={self.d_in}, d_sae={self.d_sae}, "
            f"d_out={self.d_out}{extra}, source={self.source!r}")


def _take(tensors: dict[str, torch.Tensor], key: str, file: pathlib.Path,
          required: bool = True) -> torch.Tensor | None:
  if key not in tensors:
    if not required:
      return None
    raise DictionaryFormatError(file, key, f"tensor is missing (present: "
                                f"{', '.join(sorted(tensors)) or 'none'})")
  t = tensors[key]
  if not t.is_floating_point():
    raise DictionaryFormatError(file, key, f"dtype {t.dtype} is not a float")
  return t.to(torch.float32)


def _check_dims(cfg: dict[str, Any], cfg_file: pathlib.Path,
                tensors: dict[str, torch.Tensor], weights: pathlib.Path,
                fields: dict[str, tuple[str, int]]) -> None:
  """Config sizes (d_in, d_sae, ...) against the stored tensors' shapes."""
  for field, (key, axis) in fields.items():
    if field in cfg and key in tensors and tensors[key].ndim > axis:
      if int(cfg[field]) != tensors[key].shape[axis]:
        raise DictionaryFormatError(
            weights, key, f"shape {tuple(tensors[key].shape)} does not fit "
            f"{cfg_file.name} {field}={cfg[field]}")


def _gemma_scope_kwargs(folder: pathlib.Path) -> dict[str, Any]:
  cfg_file, weights = folder / GS2_FILES[0], folder / GS2_FILES[1]
  cfg = _read_json(cfg_file)
  arch = cfg.get("architecture", "jump_relu")
  if arch not in _GS2_ARCHITECTURES:
    raise DictionaryFormatError(cfg_file, "architecture", f"unknown "
                                f"architecture {arch!r}; known: "
                                f"{', '.join(_GS2_ARCHITECTURES)}")
  activation = _GS2_ARCHITECTURES[arch]
  tensors = _read_tensors(weights)
  return dict(
      w_enc=_take(tensors, "w_enc", weights),
      w_dec=_take(tensors, "w_dec", weights),
      b_enc=_take(tensors, "b_enc", weights),
      b_dec=_take(tensors, "b_dec", weights),
      threshold=_take(tensors, "threshold", weights,
                      required=activation == "jumprelu"),
      affine_skip=_take(tensors, "affine_skip_connection", weights,
                        required=bool(cfg.get("affine_connection", False))),
      activation=activation, k=cfg.get("k"), source=str(folder))


def _saelens_kwargs(folder: pathlib.Path) -> dict[str, Any]:
  cfg_file, weights = folder / SAELENS_FILES[0], folder / SAELENS_FILES[1]
  cfg = _read_json(cfg_file)
  # Pre-6.0 configs name topk through activation_fn (+ its kwargs).
  kwargs = cfg.get("activation_fn_kwargs") or {}
  arch = cfg.get("architecture")
  if arch is None:
    arch = "topk" if cfg.get("activation_fn") == "topk" else "standard"
  if arch not in _SAELENS_ARCHITECTURES:
    raise DictionaryFormatError(cfg_file, "architecture", f"unknown or "
                                f"unsupported architecture {arch!r}; known: "
                                f"{', '.join(_SAELENS_ARCHITECTURES)}")
  norm = cfg.get("normalize_activations", "none")
  if norm not in ("none", None, False):
    raise DictionaryFormatError(cfg_file, "normalize_activations", f"{norm!r}"
                                " is not supported; fold the normalisation "
                                "into the weights first")
  activation = _SAELENS_ARCHITECTURES[arch]
  transcoder = "transcoder" in arch
  tensors = _read_tensors(weights)
  _check_dims(cfg, cfg_file, tensors, weights,
              {"d_in": ("W_enc", 0), "d_sae": ("W_enc", 1),
               "d_out": ("W_dec", 1)})
  threshold = None
  if activation == "jumprelu":
    threshold = _take(tensors, "threshold", weights,
                      required="topk_threshold" not in tensors)
    if threshold is None:  # A BatchTopK training checkpoint: one scalar.
      threshold = _take(tensors, "topk_threshold", weights).reshape(())
      threshold = threshold.expand(tensors["W_enc"].shape[1]).clone()
  skip = _take(tensors, "W_skip", weights, required="skip" in arch)
  k = cfg.get("k", kwargs.get("k"))
  return dict(
      w_enc=_take(tensors, "W_enc", weights),
      w_dec=_take(tensors, "W_dec", weights),
      b_enc=_take(tensors, "b_enc", weights),
      b_dec=_take(tensors, "b_dec", weights),
      threshold=threshold,
      affine_skip=None if skip is None else skip.T.contiguous(),
      activation=activation,
      k=int(k) if isinstance(k, float) and k.is_integer() else k,
      apply_b_dec_to_input=(not transcoder and
                            bool(cfg.get("apply_b_dec_to_input", True))),
      rescale_acts_by_decoder_norm=bool(
          cfg.get("rescale_acts_by_decoder_norm", False)),
      source=str(folder))
