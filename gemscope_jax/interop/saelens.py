"""SAELens folders: write and read `cfg.json` + `sae_weights.safetensors`.

Written against sae-lens 6.54.12 (`SAE.load_from_disk`). What its loader
needs, and so what we write:
- cfg.json: `architecture` (a key of its registry), `d_in`, `d_sae`,
  `dtype`, `apply_b_dec_to_input`, `normalize_activations` ("none": our
  arrays are in raw units), `reshape_activations` ("hook_z" for attn_out,
  whose TransformerLens hook has a heads axis), `metadata` with
  `sae_lens_version` >= 6 (older configs go through its legacy renaming),
  `model_name`, `hook_name`, `hook_head_index`, `prepend_bos`; `k` and
  `rescale_acts_by_decoder_norm` (false) for topk; `d_out` for transcoders.
- sae_weights.safetensors: exactly `W_enc` (d_in, d_sae), `W_dec`
  (d_sae, d_out), `b_enc`, `b_dec`, plus `threshold` (jumprelu) and `W_skip`
  (d_out, d_in: the transpose of Gemma Scope 2's affine skip); its loader
  is strict, so no other key may be present.
Architectures: ours 'jumprelu' -> "jumprelu" ("jumprelu_transcoder",
"jumprelu_skip_transcoder" for transcoders), 'topk' -> "topk", 'relu' ->
"standard". SAELens 6.54.12 has no inference class for "batchtopk" (its
trainer saves BatchTopK as "jumprelu" with one global threshold), so our
BatchTopK is exported as a JumpReLU too; reading accepts "batchtopk" only
with a threshold.

Hook names are TransformerLens's: resid_pre/mid/post ->
blocks.L.hook_resid_{pre,mid,post}, mlp_out -> blocks.L.hook_mlp_out,
attn_out -> blocks.L.attn.hook_z, mlp_in -> blocks.L.ln2.hook_normalized.

Caveat: the mapping of mlp_in is approximate: TransformerLens's RMSNorm
hook sits before the norm's weight, while ours (and Gemma Scope 2's) is the
norm's output; SAELens's own Gemma Scope 2 loader calls the transcoder input
`blocks.L.hook_mlp_in` (read here as mlp_in too). Normalisations other than
"none"/"expected_average_only_in" (which SAELens does not apply at
inference) are refused on reading.
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
from gemscope_jax.interop.gemmascope2 import (find_params_folder, read_arrays,
                                              read_json)
from gemscope_jax.models import hooks

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
# The SAELens whose loader this module was checked against; >= 6.0 keeps
# its legacy-config path out of the way.
SAELENS_VERSION = "6.54.12"

TL_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "attn_out": "blocks.{layer}.attn.hook_z",
    "mlp_in": "blocks.{layer}.ln2.hook_normalized",
}
# Read-only aliases: SAELens's Gemma Scope 2 loader names the transcoder
# input hook_mlp_in.
_TL_ALIASES = {"mlp_in": "blocks.{layer}.hook_mlp_in"}

# cfg.json architecture -> (ours, transcoder?)
ARCH_FROM_FILE = {
    "standard": ("relu", False), "jumprelu": ("jumprelu", False),
    "topk": ("topk", False), "batchtopk": ("jumprelu", False),
    "transcoder": ("relu", True), "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
_NORMS_OK = (None, "none", "expected_average_only_in")


def tl_hook_name(hookpoint: str) -> str:
  """'layer_6/resid_post' -> 'blocks.6.hook_resid_post'."""
  hp = hooks.parse(hookpoint)
  return TL_HOOKS[hp.site].format(layer=hp.layer)


def hookpoint_from_tl(name: str | None) -> str | None:
  """'blocks.6.hook_resid_post' -> 'layer_6/resid_post'; None if unknown."""
  if not name:
    return None
  for table in (TL_HOOKS, _TL_ALIASES):
    for site, template in table.items():
      pattern = re.escape(template).replace(r"\{layer\}", r"(\d+)")
      m = re.fullmatch(pattern, name)
      if m:
        return f"layer_{int(m.group(1))}/{site}"
  return None


def _architecture(d: InferenceDictionary) -> str:
  if not d.is_transcoder:
    return {"jumprelu": "jumprelu", "topk": "topk",
            "relu": "standard"}[d.architecture]
  if d.architecture == "topk":
    raise ValueError("save_saelens: SAELens has no TopK transcoder")
  skip = "skip_" if d.affine_skip is not None else ""
  return (f"jumprelu_{skip}transcoder" if d.architecture == "jumprelu"
          else f"{skip}transcoder")


def save_saelens(d: InferenceDictionary, out: str | os.PathLike, *,
                 overwrite: bool = False) -> pathlib.Path:
  """Writes `d` as the SAELens folder `out`; returns it.

  A `pre_enc_bias` SAE keeps it (`apply_b_dec_to_input: true`); transcoders
  are folded first, since SAELens refuses that flag for them. A non-empty
  `out` is refused unless `overwrite`, which replaces only this writer's
  files (`safe_write.atomic_dir`).

  Raises:
    FormatError: a non-finite array (nothing is written). The folder is
    built beside `out` and renamed into place, so a failure leaves none.
  """
  out = pathlib.Path(out)
  arch = _architecture(d)
  if d.is_transcoder:
    d = d.folded()
  arrays = {"W_enc": d.w_enc, "W_dec": d.w_dec, "b_enc": d.b_enc,
            "b_dec": d.b_dec}
  if d.threshold is not None:
    arrays["threshold"] = d.threshold
  if d.affine_skip is not None:
    arrays["W_skip"] = d.affine_skip.T
  arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
  _inference.check_finite(f"{out / WEIGHTS} (not written)", arrays)
  site = d.hookpoint.split("/")[-1] if d.hookpoint else None
  metadata = {
      "sae_lens_version": SAELENS_VERSION,
      "sae_lens_training_version": None,
      "model_name": d.model_name,
      "hook_name": tl_hook_name(d.hookpoint) if d.hookpoint else None,
      "hook_head_index": None,
      "prepend_bos": True,
      **({"hook_name_out": tl_hook_name(d.hookpoint_out)}
         if d.hookpoint_out else {}),
      # Ours, for reading back without loss.
      "gemscope_hookpoint": d.hookpoint,
      "gemscope_hookpoint_out": d.hookpoint_out,
      "gemscope": d.metadata,
  }
  cfg = {
      "architecture": arch, "d_in": d.d_in, "d_sae": d.d_sae,
      "dtype": "float32", "device": "cpu",
      "apply_b_dec_to_input": bool(d.pre_enc_bias),
      "normalize_activations": "none",
      "reshape_activations": "hook_z" if site == "attn_out" else "none",
      "metadata": metadata,
  }
  if d.is_transcoder:
    cfg["d_out"] = d.d_out
  if d.architecture == "topk":
    cfg.update(k=d.k, rescale_acts_by_decoder_norm=False)
  with assets.atomic_dir(out, overwrite=overwrite,
                         owns=(WEIGHTS, CONFIG)) as tmp:
    safetensors.numpy.save_file(arrays, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
  return out


def load_saelens(path: str | os.PathLike) -> InferenceDictionary:
  """Reads a SAELens folder (or a folder holding exactly one).

  Raises:
    FileNotFoundError: no such folder, or a missing cfg/weights file.
    FormatError: a missing or unexpected key, a shape that disagrees with
      cfg.json, an unknown architecture or normalisation, non-finite weights.
  """
  folder = find_params_folder(path, WEIGHTS)
  cfg_file, w_file = folder / CONFIG, folder / WEIGHTS
  cfg = read_json(cfg_file)
  meta = cfg.get("metadata") or {}
  arch_name = cfg.get("architecture")
  if arch_name is None and "metadata" not in cfg:
    # Configs before SAELens 6: standard unless a topk activation.
    arch_name = ("topk" if cfg.get("activation_fn", cfg.get(
        "activation_fn_str")) == "topk" else "standard")
  if arch_name not in ARCH_FROM_FILE:
    raise FormatError(f"{cfg_file}: field 'architecture' is {arch_name!r}, "
                      f"expected one of {sorted(ARCH_FROM_FILE)}")
  arch, transcoder = ARCH_FROM_FILE[arch_name]
  norm = cfg.get("normalize_activations")
  if norm not in _NORMS_OK:
    raise FormatError(f"{cfg_file}: field 'normalize_activations' is "
                      f"{norm!r}; only 'none' is supported")
  arrays = read_arrays(w_file)
  w = str(w_file)
  skip = "skip" in arch_name
  needed = ["W_enc", "W_dec", "b_enc", "b_dec"]
  needed += ["threshold"] if arch == "jumprelu" else []
  needed += ["W_skip"] if skip else []
  if arch_name == "batchtopk" and "threshold" not in arrays:
    raise FormatError(f"{w}: a 'batchtopk' SAE needs the global 'threshold' "
                      "of its JumpReLU form (SAELens saves it so)")
  _inference.require_keys(w, arrays, needed)
  extra = sorted(set(arrays) - set(needed) - {"scaling_factor"})
  if extra or ("scaling_factor" in arrays
               and not np.all(arrays["scaling_factor"] == 1)):
    raise FormatError(f"{w}: unexpected key(s) "
                      f"{', '.join(extra) or 'scaling_factor (not all 1)'}")
  for field in ("d_in", "d_sae"):
    if not isinstance(cfg.get(field), int):
      raise FormatError(f"{cfg_file}: field '{field}' is "
                        f"{cfg.get(field)!r}, expected an int")
  d_in, d_sae = cfg["d_in"], cfg["d_sae"]
  d_out = cfg.get("d_out", d_in) if transcoder else d_in
  expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out),
              "b_enc": (d_sae,), "b_dec": (d_out,), "threshold": (d_sae,),
              "W_skip": (d_out, d_in)}
  why = f"{cfg_file.name} says d_in={d_in}, d_sae={d_sae}" + (
      f", d_out={d_out}" if transcoder else "")
  for key in needed:
    _inference.check_shape(w, key, arrays[key].shape, expected[key], why)
  _inference.check_finite(w, {k: arrays[k] for k in needed})
  a = {k: np.asarray(arrays[k], np.float32) for k in needed}
  k = None
  if arch == "topk":
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if not isinstance(k, int):
      raise FormatError(f"{cfg_file}: field 'k' is {k!r}, expected an int")
    if cfg.get("rescale_acts_by_decoder_norm"):
      # Selecting on pre * |w_dec row| and decoding f / |row| is the plain
      # TopK of the folded weights.
      norms = np.linalg.norm(a["W_dec"], axis=-1)
      a["W_enc"] = a["W_enc"] * norms
      a["b_enc"] = a["b_enc"] * norms
      a["W_dec"] = a["W_dec"] / norms[:, None]
  hook = meta.get("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
  hook_out = meta.get("hook_name_out", cfg.get("hook_name_out"))
  hp = meta.get("gemscope_hookpoint") or hookpoint_from_tl(hook)
  hp_out = meta.get("gemscope_hookpoint_out") or hookpoint_from_tl(hook_out)
  extras = dict(meta.get("gemscope") or {})
  extras.update({"saelens_architecture": arch_name,
                 "saelens_hook_name": hook})
  return InferenceDictionary(
      w_enc=a["W_enc"], w_dec=a["W_dec"], b_enc=a["b_enc"], b_dec=a["b_dec"],
      threshold=a.get("threshold"),
      affine_skip=a["W_skip"].T if skip else None, architecture=arch, k=k,
      pre_enc_bias=bool(cfg.get("apply_b_dec_to_input", True)) and
      not transcoder,
      hookpoint=hp, hookpoint_out=hp_out,
      model_name=meta.get("model_name", cfg.get("model_name")),
      metadata=extras)
