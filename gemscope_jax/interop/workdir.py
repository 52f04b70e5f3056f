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


# Our model names -> the Hugging Face ids Gemma Scope 2 and SAELens use.
HF_MODEL_IDS = {"gemma3_270m": "google/gemma-3-270m",
                "gemma3_1b": "google/gemma-3-1b-pt",
                "gemma3_4b": "google/gemma-3-4b-pt",
                "gemma3_12b": "google/gemma-3-12b-pt",
                "gemma3_27b": "google/gemma-3-27b-pt"}


def from_state(run, state) -> InferenceDictionary:
  """The inference form of a trainer `Run`'s `TrainState`."""
  c = run.c
  module = getattr(run.module, "dictionary", run.module)
  params = jax.device_get(state.params)
  scale = np.float32(jax.device_get(state.norm_scale))
  trained = c.dictionary.architecture
  arch, k = {"jumprelu": ("jumprelu", None), "batchtopk": ("jumprelu", None),
             "topk": ("topk", c.dictionary.k), "relu": ("relu", None)}[trained]
  if trained == "batchtopk":
    count = max(int(state.min_kept_count), 1)
    threshold = float(state.min_kept_sum) / count
  elif trained == "jumprelu":
    threshold = dictionaries._base.leaf_value(params["threshold"])  # pylint: disable=protected-access
  else:
    threshold = 0.0
  arrays = dictionaries.fold_for_inference(
      params, scale, threshold=threshold, pre_enc_bias=module.pre_enc_bias)
  arrays = {key: np.asarray(v, np.float32) for key, v in arrays.items()}
  hp = models.hooks.parse(c.hookpoint)
  return InferenceDictionary(
      w_enc=arrays["w_enc"], w_dec=arrays["w_dec"], b_enc=arrays["b_enc"],
      b_dec=arrays["b_dec"],
      threshold=arrays["threshold"] if arch == "jumprelu" else None,
      architecture=arch, k=k, hookpoint=hp.name,
      # The released files name the Hugging Face model (pre-trained).
      model_name=HF_MODEL_IDS.get(run.model_config.name,
                                  run.model_config.name),
      metadata={
          "model": run.model_config.name,
          "trained_architecture": trained,
          "norm_scale": float(scale),
          "target_l0": c.dictionary.target_l0,
          "trained_tokens": int(state.step) * c.train.batch_size,
      })


def from_workdir(workdir: str | os.PathLike) -> InferenceDictionary:
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
