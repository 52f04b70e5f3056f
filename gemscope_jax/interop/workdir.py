"""From a training run to an `InferenceDictionary` (raw activation units).

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

from gemscope_jax import dictionaries, models
from gemscope_jax.interop._inference import InferenceDictionary
from gemscope_jax.interop.multilayer import MultiLayerInference


# Our model names -> the Hugging Face ids Gemma Scope 2 and SAELens use.
HF_MODEL_IDS = {"gemma3_270m": "google/gemma-3-270m",
                "gemma3_1b": "google/gemma-3-1b-pt",
                "gemma3_4b": "google/gemma-3-4b-pt",
                "gemma3_12b": "google/gemma-3-12b-pt",
                "gemma3_27b": "google/gemma-3-27b-pt"}


def _metadata(run, state, trained: str) -> dict:
  c = run.c
  return {"model": run.model_config.name, "trained_architecture": trained,
          "norm_scale": np.asarray(jax.device_get(state.norm_scale),
                                   np.float64).tolist(),
          "target_scale": np.asarray(jax.device_get(state.target_scale),
                                     np.float64).tolist(),
          "target_l0": c.dictionary.target_l0,
          "trained_tokens": int(state.step) * c.train.batch_size}


def _model_name(run) -> str:
  # The released files name the Hugging Face model (pre-trained).
  return HF_MODEL_IDS.get(run.model_config.name, run.model_config.name)


def from_state(run, state) -> InferenceDictionary | MultiLayerInference:
  """The inference form of a trainer `Run`'s `TrainState`.

  SAEs and transcoders give an `InferenceDictionary` (a transcoder's input
  and target scales both folded in, its affine skip as `affine_skip`);
  crosscoders and CLTs a `MultiLayerInference`.
  """
  c = run.c
  module = getattr(run.module, "dictionary", run.module)
  params = jax.device_get(state.params)
  scale = np.asarray(jax.device_get(state.norm_scale), np.float32)
  target_scale = np.asarray(jax.device_get(state.target_scale), np.float32)
  trained = c.dictionary.architecture
  layout = getattr(run, "layout", None) or _layout(run)
  if layout.multilayer:
    arrays = (module.to_inference(params, scale, target_scale)
              if layout.kind == "clt" else module.to_inference(params, scale))
    return MultiLayerInference.from_arrays(
        layout.kind, arrays,
        architecture="topk" if trained.startswith("topk") else "jumprelu",
        k=c.dictionary.k if trained.startswith("topk") else None,
        hookpoints=layout.inputs,
        hookpoints_out=layout.targets if layout.kind == "clt" else None,
        model_name=_model_name(run),
        metadata=_metadata(run, state, trained))
  base = trained.removesuffix("_transcoder")
  arch, k = {"jumprelu": ("jumprelu", None), "batchtopk": ("jumprelu", None),
             "topk": ("topk", c.dictionary.k), "relu": ("relu", None)}[base]
  if base == "batchtopk":
    count = max(int(state.min_kept_count), 1)
    threshold = float(state.min_kept_sum) / count
  elif base == "jumprelu":
    threshold = dictionaries._base.leaf_value(params["threshold"])  # pylint: disable=protected-access
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
      metadata=_metadata(run, state, trained))


def _layout(run):
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.layout(run.c, None, run.model_config)


def from_workdir(workdir: str | os.PathLike
                 ) -> InferenceDictionary | MultiLayerInference:
  """The inference form of the newest checkpoint in a training workdir."""
  from gemscope_jax.training import checkpoints as ckpt_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import config as config_lib  # pylint: disable=import-outside-toplevel
  from gemscope_jax.training import trainer  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"{workdir}: no such training workdir")
  ckpts = ckpt_lib.Checkpoints(workdir, asynchronous=False)
  try:
    latest = ckpts.latest_step()
    if latest is None:
      raise FileNotFoundError(f"{workdir}: no checkpoint to export (train "
                              "first, or check the path)")
    c = config_lib.from_json(ckpts.read_config(latest))
    if config_lib.is_group(c):
      names = ", ".join(config_lib.hookpoints(c))
      raise ValueError(
          f"{workdir}: a group run ({names}); each member is exported to "
          f"{workdir / 'export'}/{{site}}/layer_{{L}}/ (Gemma Scope 2 "
          "layout): load or evaluate those folders with --dictionary")
    run = trainer.Run(c, config_lib.check(c))
    restored = ckpts.restore_latest(run.abstract_state)
  finally:
    ckpts.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}: no readable checkpoint")
  return from_state(run, restored[1])
