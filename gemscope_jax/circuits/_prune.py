"""Influence, pruning and scores of an attribution graph (numpy, float64).

The definitions are circuit-tracer's (`graph.py`), restated:
- B = row-normalised |A|: B[t, s] = |A[t, s]| / sum_s' |A[t, s']| (rows
  summing to 0 stay 0).
- w: logit probabilities on the logit nodes, 0 elsewhere.
- influence = w (B + B^2 + ...) = w ((I - B)^-1 - I): each node's share of
  the (probability-weighted) logits, through every path. B is nilpotent
  (the graph is acyclic), so the power series ends; `influence` sums it by
  power iteration until the term is exactly zero.
- prune: keep nodes whose influence reaches the cumulative `node_threshold`
  fraction (sorted descending), always tokens and logits; zero the others'
  rows and columns to get A'; edge score = B'[t, s] * (influence'(t) +
  w(t)) with B', influence' from A'; keep edges to the cumulative
  `edge_threshold`; then repeatedly drop feature and error nodes without a
  kept outgoing edge and feature nodes without a kept incoming edge (and
  their edges).
- replacement score = token influence / (token influence + error
  influence): how much of the logits' (normalised) dependence ends at
  tokens rather than at errors.
- completeness score = sum_t (1 - sum_{s error} B[t, s]) (influence(t) +
  w(t)) / sum_t (influence(t) + w(t)): the influence-weighted fraction of
  each node's normalised input that does not come from error nodes.
"""

from __future__ import annotations

import numpy as np

from gemscope_jax.circuits import _graph


def normalize(adjacency: np.ndarray) -> np.ndarray:
  """Row-normalised |A| (float64)."""
  a = np.abs(np.asarray(adjacency, np.float64))
  return a / np.maximum(a.sum(axis=1, keepdims=True), 1e-10)


def influence(b: np.ndarray, weights: np.ndarray,
              max_iter: int = 10_000) -> np.ndarray:
  """w (B + B^2 + ...) by power iteration (B nilpotent: a DAG)."""
  current = np.asarray(weights, np.float64) @ b
  total = current.copy()
  for _ in range(max_iter):
    if not current.any():
      return total
    current = current @ b
    total += current
  raise RuntimeError("influence: no convergence (is the graph acyclic?)")


def logit_weights(graph: _graph.Graph) -> np.ndarray:
  w = np.zeros(graph.num_nodes)
  w[graph.kind == _graph.LOGIT] = graph.logit_probabilities
  return w


def node_influence(graph: _graph.Graph) -> np.ndarray:
  """(n,) each node's influence on the probability-weighted logits."""
  return influence(normalize(graph.adjacency), logit_weights(graph))


def _threshold(scores: np.ndarray, fraction: float) -> float:
  """The smallest score among the top ones that reach `fraction` of the
  total (circuit-tracer's `find_threshold`)."""
  s = np.sort(scores.ravel())[::-1]
  total = s.sum()
  if total <= 0:
    return 0.0
  cum = np.cumsum(s) / total
  i = min(int(np.searchsorted(cum, fraction)), len(s) - 1)
  return float(s[i])


def prune(graph: _graph.Graph, node_threshold: float = 0.8,
          edge_threshold: float = 0.98) -> tuple[np.ndarray, np.ndarray]:
  """(node_mask (n,), edge_mask (n, n) [target, source]) of kept nodes and
  edges (see the module docstring)."""
  w = logit_weights(graph)
  kind = graph.kind
  always = (kind == _graph.TOKEN) | (kind == _graph.LOGIT)
  infl = node_influence(graph)
  node_mask = (infl >= _threshold(infl, node_threshold)) | always
  pruned = np.where(node_mask[:, None] & node_mask[None, :],
                    np.asarray(graph.adjacency, np.float64), 0.0)
  b = normalize(pruned)
  scores = b * (influence(b, w) + w)[:, None]
  edge_mask = scores >= _threshold(scores, edge_threshold)
  edge_mask &= scores > 0
  inner = (kind == _graph.FEATURE) | (kind == _graph.ERROR)
  feat = kind == _graph.FEATURE
  while True:
    old = node_mask.copy()
    edge_mask &= node_mask[:, None] & node_mask[None, :]
    node_mask &= ~inner | edge_mask.any(axis=0)
    node_mask &= ~feat | edge_mask.any(axis=1)
    if np.array_equal(old, node_mask):
      return node_mask, edge_mask


def scores(graph: _graph.Graph) -> tuple[float, float]:
  """(replacement score, completeness score) (module docstring)."""
  w = logit_weights(graph)
  b = normalize(graph.adjacency)
  infl = influence(b, w)
  err = graph.kind == _graph.ERROR
  tok = infl[graph.kind == _graph.TOKEN].sum()
  replacement = tok / max(tok + infl[err].sum(), 1e-30)
  out = infl + w
  non_error = 1.0 - b[:, err].sum(axis=1)
  completeness = float((non_error * out).sum() / out.sum())
  return float(replacement), completeness


def cumulative_influence(graph: _graph.Graph) -> np.ndarray:
  """(n,) each node's cumulative influence fraction when nodes are sorted
  by influence, descending (what the frontend's `influence` field holds)."""
  infl = node_influence(graph)
  order = np.argsort(-infl, kind="stable")
  out = np.zeros_like(infl)
  total = infl.sum()
  out[order] = np.cumsum(infl[order]) / (total if total > 0 else 1.0)
  return out
