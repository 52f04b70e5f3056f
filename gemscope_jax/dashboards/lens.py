"""A dictionary's latents seen through its weights alone: the logit lens and
the nearest latents by decoder (and encoder) direction.

Logit lens, exactly: for latent i with residual-stream write w_i
(`_dictionary.write_rows`: the decoder row; a CLT latent's writes summed
over its output layers, a crosscoder's row at its last layer, an `attn_out`
row times the attention output projection),

  lens_i = (w_i * (1 + final_norm.scale)) @ W_E.T        (vocab,)

with W_E the tied (vocab, d_model) embedding table, unscaled. That is the
change of the logits when w_i is added to the last residual stream, up to
the final RMSNorm's 1/rms factor (positive, so the ranking of tokens is
exact). Gemma Scope / Neuronpedia's `W_dec[i] @ W_U` is the same product:
TransformerLens folds the final norm's weight (1 + scale) into W_U.

Neighbours: the n largest cosines between decoder rows (self excluded); for
transcoders and CLTs also between encoder columns ("input neighbours").

Both run blockwise on the device, a (block, vocab) or (block, width) matrix
at a time, so a 262k-wide dictionary never builds a width x width matrix.
Ties: the smaller token or latent id first.

Caveat: the lens costs 2 x width x vocab x d_model FLOPs in float32 (4096
latents of Gemma 3 270M: 1.4 TFLOP, about 40 s on 2 CPU cores; 262k
latents: 88 TFLOP, seconds on a GPU but hours on a CPU, where
`scan(..., lens=False)` skips it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import models
from gemscope_jax.dashboards import _dictionary as dl

DESCRIPTION = ("decoder row (for a CLT summed over output layers, for a "
               "crosscoder its last layer) x (1 + final_norm.scale) @ "
               "embedding.T: logits up to the final norm's 1/rms, as "
               "Neuronpedia's W_dec @ W_U")

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Lens:
  """Per latent, the tokens its write promotes and suppresses most.

  Attributes:
    top_ids, top_values: (width, n) largest lens logits, largest first.
    bottom_ids, bottom_values: (width, n) smallest, smallest first.
    description: what was multiplied (`DESCRIPTION`).
  """
  top_ids: np.ndarray
  top_values: np.ndarray
  bottom_ids: np.ndarray
  bottom_values: np.ndarray
  description: str = DESCRIPTION


def _blocks(width: int, block: int) -> tuple[int, int]:
  block = max(1, min(block, width))
  return block, -(-width // block) * block


@functools.partial(jax.jit, static_argnames=("n", "block"))
def _lens_block(rows, start, table, scale, *, n, block):
  w = jax.lax.dynamic_slice_in_dim(rows, start, block) * (1.0 + scale)
  logits = jnp.matmul(w, table.T, precision=_HIGHEST)     # (block, vocab)
  top_v, top_i = jax.lax.top_k(logits, n)
  low_v, low_i = jax.lax.top_k(-logits, n)
  return top_i, top_v, low_i, -low_v


def logit_lens(rows: np.ndarray, params, *, n: int = 10,
               block: int = 64) -> Lens:
  """The logit lens of residual-stream writes `rows` (width, d_model).

  Args:
    rows: `_dictionary.write_rows(...)`.
    params: the model's parameters (the embedding and final norm are read).
    n: tokens per side.
    block: latents per device matmul ((block, vocab) floats at a time:
      64 MB of Gemma 3's vocabulary; 256 took 256 MB, no faster on CPU).
  """
  table = jnp.asarray(params["embedder"]["input_embedding"], jnp.float32)
  scale = jnp.asarray(params["final_norm"]["scale"], jnp.float32)
  width = rows.shape[0]
  n = min(n, table.shape[0])
  block, padded = _blocks(width, block)
  dev = jnp.asarray(np.pad(np.asarray(rows, np.float32),
                           ((0, padded - width), (0, 0))))
  parts = [jax.device_get(_lens_block(dev, s, table, scale, n=n,
                                      block=block))
           for s in range(0, padded, block)]
  top_i, top_v, low_i, low_v = (np.concatenate(p)[:width]
                                for p in zip(*parts))
  return Lens(top_i.astype(np.int32), top_v, low_i.astype(np.int32), low_v)


@functools.partial(jax.jit, static_argnames=("n", "block"))
def _cos_block(unit, start, *, n, block):
  q = jax.lax.dynamic_slice_in_dim(unit, start, block)
  sim = jnp.matmul(q, unit.T, precision=_HIGHEST)          # (block, width)
  own = start + jnp.arange(block)
  sim = jnp.where(jnp.arange(unit.shape[0])[None, :] == own[:, None],
                  -jnp.inf, sim)
  values, ids = jax.lax.top_k(sim, n)
  return ids, values


def neighbours(vectors: np.ndarray, *, n: int = 10, block: int = 1024
               ) -> tuple[np.ndarray, np.ndarray]:
  """(ids, cosines), each (width, n): every row's n nearest other rows.

  A zero row has cosine 0 with everything. `n` is capped at width - 1.

  Args:
    vectors: (width, D) decoder rows or encoder columns.
    n: neighbours per latent.
    block: rows per device matmul ((block, width) floats at a time).
  """
  v = np.asarray(vectors, np.float64)
  width = v.shape[0]
  n = min(n, width - 1)
  if n <= 0:
    return (np.zeros((width, 0), np.int32), np.zeros((width, 0), np.float32))
  norms = np.linalg.norm(v, axis=1, keepdims=True)
  unit = (v / np.where(norms > 0, norms, 1.0)).astype(np.float32)
  block, padded = _blocks(width, block)
  dev = jnp.asarray(unit)
  parts = []
  for s in range(0, padded, block):
    start = min(s, width - block)   # the last block overlaps: no padding
    ids, values = jax.device_get(_cos_block(dev, start, n=n, block=block))
    parts.append((ids[s - start:], values[s - start:]))
  ids = np.concatenate([p[0] for p in parts])[:width]
  values = np.concatenate([p[1] for p in parts])[:width]
  return ids.astype(np.int32), values.astype(np.float32)


def compute(src, config: models.Gemma3Config, params, *, n_tokens: int = 10,
            n_neighbours: int = 10) -> dict[str, np.ndarray | Lens | None]:
  """{'lens': Lens, 'neighbours': (ids, cos), 'input_neighbours': (ids,
  cos) for transcoders and CLTs else None} of a `_dictionary.Source`."""
  rows = dl.write_rows(src, config, params)
  out = {"lens": logit_lens(rows, params, n=n_tokens),
         "neighbours": neighbours(dl.decoder_rows(src), n=n_neighbours),
         "input_neighbours": None}
  if src.spec.kind in ("transcoder", "skip_transcoder", "clt"):
    out["input_neighbours"] = neighbours(dl.encoder_columns(src),
                                         n=n_neighbours)
  return out
