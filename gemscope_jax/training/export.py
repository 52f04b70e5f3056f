"""From a training run to an `InferenceDictionary` (raw activation units),
and the run's export folders (Gemma Scope 2 layout) in its workdir.

Training divides activations by `norm_scale` and, for SAEs, subtracts b_dec
before the encoder; `from_state` folds both into the weights
(`dictionaries.fold_for_inference`). Per architecture:
  jumprelu   its thresholds, times the scale
  batchtopk  a JumpReLU whose one threshold is the mean smallest kept
             activation over the last fifth of training (the train state's
             min_kept_sum / min_kept_count), times the scale
  topk       a TopK (per-token selection is scale-free: no threshold)
  relu       a ReLU
A Matryoshka run exports its inner dictionary.

Caveat: `from_workdir` rebuilds the run from the checkpoint's saved config,
so it needs the same package version's config fields; it restores the full
train state (optimizer included) on the host only to read the parameters.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np

from gemscope_jax import dictionaries, errors, interop, models
from gemscope_jax.interop import InferenceDictionary, MultiLayerInference
from gemscope_jax.training import checkpoints as ckpt_lib
from gemscope_jax.training import plans, schema
from gemscope_jax.training.step import Run


# Our model names -> the Hugging Face ids Gemma Scope 2 and SAELens use.
HF_MODEL_IDS = {"gemma3_270m": "google/gemma-3-270m",
                "gemma3_1b": "google/gemma-3-1b-pt",
                "gemma3_4b": "google/gemma-3-4b-pt",
                "gemma3_12b": "google/gemma-3-12b-pt",
                "gemma3_27b": "google/gemma-3-27b-pt"}


def _metadata(run: Run, d: plans.DictionaryPlan, state, trained: str
              ) -> dict:
  return {"model": run.model_config.name, "trained_architecture": trained,
          "norm_scale": np.asarray(jax.device_get(state.norm_scale),
                                   np.float64).tolist(),
          "target_scale": np.asarray(jax.device_get(state.target_scale),
                                     np.float64).tolist(),
          "target_l0": d.config.target_l0,
          "trained_tokens": int(state.step) * run.plan.step.batch_size,
          **_dense_path_metadata(d.config)}


def _dense_path_metadata(config) -> dict:
  """Where a dense path's antipodal pairs sit among the exported latents
  (`dictionaries.fold_for_inference`): after the trained ones. One latent
  of each pair fires per token, so the exported dictionary's target L0
  (what a release folder is named by) is the sparse code's plus k."""
  k = config.dense_rank
  if not k:
    return {}
  return {"dense_path_rank": k,
          "dense_path_latents": [config.d_sae, config.d_sae + 2 * k],
          "dense_path_sparse_target_l0": config.target_l0,
          "target_l0": config.target_l0 + k}


def _model_name(run: Run) -> str:
  # The released files name the Hugging Face model (pre-trained).
  return HF_MODEL_IDS.get(run.model_config.name, run.model_config.name)


def from_state(run: Run, state, dictionary: plans.DictionaryPlan | None = None
               ) -> InferenceDictionary | MultiLayerInference:
  """The inference form of a `step.Run`'s `TrainState`.

  SAEs and transcoders give an `InferenceDictionary` (a transcoder's input
  and target scales both folded in, its affine skip as `affine_skip`);
  crosscoders and CLTs a `MultiLayerInference`. `dictionary` names a
  group member (default: the run's own dictionary).
  """
  d = dictionary or run.dictionary
  module = dictionaries.unwrapped(run.module)
  params = jax.device_get(state.params)
  scale = np.asarray(jax.device_get(state.norm_scale), np.float32)
  target_scale = np.asarray(jax.device_get(state.target_scale), np.float32)
  trained = d.architecture
  layout = d.layout
  if layout.multilayer:
    arrays = (module.to_inference(params, scale, target_scale)
              if layout.kind == "clt" else module.to_inference(params, scale))
    return MultiLayerInference.from_arrays(
        layout.kind, arrays,
        architecture="topk" if trained.startswith("topk") else "jumprelu",
        k=d.config.k if trained.startswith("topk") else None,
        hookpoints=layout.inputs,
        hookpoints_out=layout.targets if layout.kind == "clt" else None,
        model_name=_model_name(run),
        metadata=_metadata(run, d, state, trained))
  base = trained.removesuffix("_transcoder")
  arch, k = {"jumprelu": ("jumprelu", None), "batchtopk": ("jumprelu", None),
             "topk": ("topk", d.config.k), "relu": ("relu", None)}[base]
  if base == "batchtopk":
    count = max(int(state.min_kept_count), 1)
    threshold = float(state.min_kept_sum) / count
  elif base == "jumprelu":
    threshold = dictionaries.leaf_value(params["threshold"])
  else:
    threshold = 0.0
  transcoder = layout.kind == "transcoder"
  arrays = dictionaries.fold_for_inference(
      params, scale, threshold=threshold, pre_enc_bias=module.pre_enc_bias,
      out_norm_scale=target_scale if transcoder else None)
  arrays = {key: np.asarray(v, np.float32) for key, v in arrays.items()}
  return InferenceDictionary(
      w_enc=arrays["w_enc"], w_dec=arrays["w_dec"], b_enc=arrays["b_enc"],
      b_dec=arrays["b_dec"],
      threshold=arrays["threshold"] if arch == "jumprelu" else None,
      affine_skip=arrays.get("affine_skip_connection"),
      architecture=arch, k=k, hookpoint=layout.inputs[0],
      hookpoint_out=layout.targets[0] if transcoder else None,
      model_name=_model_name(run),
      metadata=_metadata(run, d, state, trained))


def from_workdir(workdir: str | os.PathLike
                 ) -> InferenceDictionary | MultiLayerInference:
  """The inference form of the newest checkpoint in a training workdir."""
  workdir = pathlib.Path(workdir)
  ckpts = ckpt_lib.open_existing(workdir, "export")
  try:
    saved = ckpts.newest_config()
    if saved is None:
      raise errors.RunError(f"{workdir}: no readable checkpoint (every "
                            "checkpoint's config is damaged)")
    plan = plans.make(schema.from_json(saved[1]))
    if plan.group:
      names = ", ".join(d.layout.inputs[0] for d in plan.dictionaries)
      raise errors.UsageError(
          f"{workdir}: a group run ({names}); each member is exported to "
          f"{workdir / 'export'}/{{site}}/layer_{{L}}/ (Gemma Scope 2 "
          "layout): load or evaluate those folders with --dictionary")
  finally:
    ckpts.close()
  run = Run(plan)
  _, state, _, _ = ckpt_lib.restore_existing(workdir, run.abstract_state,
                                             "export")
  return from_state(run, state)


def export(run: Run, state, workdir: pathlib.Path) -> pathlib.Path:
  """Writes the Gemma Scope 2 params folder (raw-unit weights) to
  workdir/export (per-layer files for crosscoders and CLTs)."""
  d = from_state(run, state)
  out = pathlib.Path(workdir) / "export"
  # workdir/export is the run's own: each run's end replaces it.
  if isinstance(d, MultiLayerInference):
    return interop.save_multilayer_gemmascope2(d, out, overwrite=True)
  return interop.save_gemmascope2(d, out, release_layout=False,
                                  overwrite=True)


def export_dir(workdir: str | pathlib.Path,
               member: str | dictionaries.Layout) -> pathlib.Path:
  """Where a group member is exported: export/{family}/layer_{L}, the
  family being the site of an SAE (a hookpoint name) or 'transcoder'."""
  if isinstance(member, str):
    hp = models.hooks.parse(member)
    family, layer = hp.site, hp.layer
  else:
    family = member.family
    layer = models.hooks.parse(member.inputs[0]).layer
  return pathlib.Path(workdir) / "export" / family / f"layer_{layer}"


def export_group(run, state: dict, workdir: pathlib.Path
                 ) -> dict[str, pathlib.Path]:
  """Writes each member of a `group.GroupRun` as a Gemma Scope 2 params
  folder (raw units) at `export_dir`."""
  out = {}
  for stack, _, member, s in run.members(state):
    d = from_state(stack.template, s, member)
    out[member.layout.name] = interop.save_gemmascope2(
        d, export_dir(workdir, member.layout), release_layout=False,
        overwrite=True)
  return out
