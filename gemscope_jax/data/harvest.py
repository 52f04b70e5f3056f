"""Harvest activations at hookpoints and write them to a safetensors file.

The file holds, for every real (non-padding) token position, in text order:
  tokens    (N,) int32   token id
  special   (N,) bool    True at special tokens (BOS, EOS, control tokens)
                         and a chat template's tokens (`Windows.exclude`),
                         which dictionaries are not trained on
  window    (N,) int32   index of the window the token came from
  position  (N,) int32   position inside its window (0 = BOS)
  layer_L/site (N, width) float32, one tensor per hookpoint
and metadata (model, hookpoints, seq_len, dtype, source files). The file is
written under a temporary name and renamed when complete.

Caveat: everything is held in memory before writing, N x width x 4 bytes per
hookpoint (640 floats = 2.5 KB per token for Gemma 3 270M).
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from gemscope_jax import assets
from gemscope_jax import models
from gemscope_jax import safe_write
from gemscope_jax.text.windows import Windows, ordinary_mask


def harvest(config: models.Gemma3Config, params, windows: Windows,
            hookpoints: Sequence[str], *, batch_size: int = 8,
            dtype: jnp.dtype = jnp.float32, progress: bool = True,
            with_loss: bool = False, desc: str = "harvest"
            ) -> tuple[dict[str, np.ndarray], float | None]:
  """({hookpoint: (N, width) float32} over the real tokens, mean loss).

  One jitted pass per batch of windows runs only up to the last block the
  hookpoints need, unless `with_loss` asks for the next-token loss (nats per
  predicted token over all windows; None otherwise), which needs the whole
  model. The last batch is padded to `batch_size` so only one program is
  compiled.
  """
  names = [p.name for p in models.hooks.parse_all(hookpoints, config)]
  if not names:
    raise ValueError("harvest: give at least one hookpoint")
  chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
  loss_sum, pairs = 0.0, 0
  bar = tqdm(total=windows.num_tokens, unit="tok", disable=not progress,
             desc=desc, dynamic_ncols=True)
  for tokens, mask in windows.batches(batch_size):
    out = models.forward(params, tokens, mask, config=config,
                         hookpoints=names, logits=False, loss=with_loss,
                         dtype=dtype)
    for n in names:
      chunks[n].append(np.asarray(out.activations[n], np.float32)[mask])
    if with_loss:
      # out.loss is the mean over this batch's (token, next token) pairs.
      n_pairs = int((mask[:, 1:] & mask[:, :-1]).sum())
      loss_sum += float(out.loss) * n_pairs
      pairs += n_pairs
    bar.update(int(mask.sum()))
  bar.close()
  acts = {n: np.concatenate(c) for n, c in chunks.items()}
  return acts, (loss_sum / max(pairs, 1) if with_loss else None)


def dump_activations(config: models.Gemma3Config, params, tokenizer,
                     windows: Windows, hookpoints: Sequence[str],
                     out_path: str | os.PathLike, *, batch_size: int = 8,
                     dtype: jnp.dtype = jnp.float32,
                     metadata: dict[str, str] | None = None,
                     progress: bool = True, overwrite: bool = False) -> dict:
  """Harvests `hookpoints` over `windows` and writes the safetensors file.

  An existing `out_path` is refused before the harvest unless `overwrite`
  (`errors.OutputError`).

  Returns a summary: number of tokens, of special tokens, seconds, tokens/s.
  """
  safe_write.check_file_output(out_path, overwrite=overwrite)
  t0 = time.perf_counter()
  acts, _ = harvest(config, params, windows, hookpoints,
                    batch_size=batch_size, dtype=dtype, progress=progress)
  seconds = time.perf_counter() - t0
  real = windows.mask
  tokens = windows.tokens[real]
  special = ~ordinary_mask(tokenizer, windows.tokens, real,
                           windows.exclude)[real]
  win, pos = np.nonzero(real)
  tensors = {"tokens": tokens.astype(np.int32), "special": special,
             "window": win.astype(np.int32), "position": pos.astype(np.int32),
             **acts}
  meta = {"model": config.name, "hookpoints": json.dumps(list(acts)),
          "seq_len": str(windows.tokens.shape[1]),
          "dtype": jnp.dtype(dtype).name, **(metadata or {})}
  with assets.atomic_path(out_path, overwrite=overwrite) as tmp:
    save_file(tensors, tmp, metadata=meta)
  return {"tokens": int(len(tokens)), "special": int(special.sum()),
          "seconds": seconds, "tokens_per_s": len(tokens) / seconds,
          "path": str(out_path)}
