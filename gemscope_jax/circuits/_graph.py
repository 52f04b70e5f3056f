"""`Graph`: an attribution graph as numpy arrays, saved losslessly.

Nodes come in circuit-tracer's order: the selected features, then one
error node per (layer, position) (layer-major, BOS included), then one
token node per position, then the target logits. `adjacency[t, s]` is the
direct linear effect of source s on target t (see `attribute`); token and
error rows, and logit columns, are zero.

Caveat: the adjacency is dense, n x n float32 (7,500 features on a short
prompt: about 250 MB).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np

from gemscope_jax import safe_write

FEATURE, ERROR, TOKEN, LOGIT = 0, 1, 2, 3
KIND_NAMES = ("feature", "error", "token", "logit")

_ARRAYS = ("tokens", "kind", "layer", "position", "latent", "activation",
           "value", "bias", "adjacency", "logit_tokens",
           "logit_probabilities")


@dataclasses.dataclass(eq=False)
class Graph:
  """An attribution graph of one prompt.

  Attributes:
    tokens: (T,) prompt token ids (BOS first).
    kind: (n,) int8 node kind: FEATURE, ERROR, TOKEN or LOGIT.
    layer: (n,) int32: a feature's or error's layer; -1 for tokens; the
      number of layers for logits.
    position: (n,) int32 position (logits: the last).
    latent: (n,) int32: a feature's latent; a token's or logit's token id;
      -1 for errors.
    activation: (n,) float32: a feature's activation; an error vector's
      norm; 0 for tokens; a logit's raw value.
    value: (n,) float32 the quantity each row explains: a feature's
      pre-activation without b_enc (w_enc column . mlp_in); a logit's
      demeaned logit; 0 for token and error nodes.
    bias: (n,) float32 the part of `value` no node carries: decoder biases
      (b_dec) propagated through the frozen linear model. With every
      active feature a node, value = adjacency.sum(1) + bias.
    adjacency: (n, n) float32, [target, source].
    logit_tokens: (n_logits,) int32 the target tokens.
    logit_probabilities: (n_logits,) float32 their probabilities.
    prompt: the prompt text, if known.
    token_strings: each position's token as text, if a tokenizer was given.
    metadata: plain JSON values (model, dictionaries, counts, settings).
  """
  tokens: np.ndarray
  kind: np.ndarray
  layer: np.ndarray
  position: np.ndarray
  latent: np.ndarray
  activation: np.ndarray
  value: np.ndarray
  bias: np.ndarray
  adjacency: np.ndarray
  logit_tokens: np.ndarray
  logit_probabilities: np.ndarray
  prompt: str | None = None
  token_strings: list[str] | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_nodes(self) -> int:
    return int(self.kind.shape[0])

  @property
  def num_features(self) -> int:
    return int(np.sum(self.kind == FEATURE))

  @property
  def num_layers(self) -> int:
    return int(self.metadata["num_layers"])

  def node_ids(self) -> list[str]:
    """Unique ids in circuit-tracer's spelling: features `L_f_p`, tokens
    `E_t_p`, logits `{L+1}_t_p`; error nodes `ERR_L_p` (circuit-tracer
    0.5.0's `0_L_p` collides with layer-0 features, and `E_L_p` would
    collide with token nodes)."""
    ids = []
    for k, l, p, f in zip(self.kind, self.layer, self.position,
                          self.latent):
      if k == FEATURE:
        ids.append(f"{l}_{f}_{p}")
      elif k == ERROR:
        ids.append(f"ERR_{l}_{p}")
      elif k == TOKEN:
        ids.append(f"E_{f}_{p}")
      else:
        ids.append(f"{self.num_layers + 1}_{f}_{p}")
    return ids

  def save(self, path: str | os.PathLike, *, overwrite: bool = True
           ) -> pathlib.Path:
    """Writes one .npz (arrays, and the rest as JSON inside it)."""
    path = pathlib.Path(path)
    text = json.dumps({"prompt": self.prompt,
                       "token_strings": self.token_strings,
                       "metadata": self.metadata})
    arrays = {k: getattr(self, k) for k in _ARRAYS}
    arrays["json"] = np.frombuffer(text.encode(), np.uint8)
    with safe_write.atomic_path(path, overwrite=overwrite) as tmp:
      with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> Graph:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in _ARRAYS}
      rest = json.loads(z["json"].tobytes().decode())
    return cls(**arrays, **rest)
