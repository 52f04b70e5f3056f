"""`to_json`: a pruned graph in circuit-tracer's frontend schema.

`{metadata: {slug, scan, prompt_tokens, prompt, node_threshold,
schema_version: 1, ...}, qParams: {...}, nodes: [...], links: [{source,
target, weight}]}` as circuit-tracer 0.5.0's `create_graph_files` writes
it (node fields `node_id, feature, layer, ctx_idx, feature_type,
token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp,
influence, activation`), with our extra fields for our viewer: `kind`,
`layer_index` (int; -1 tokens), `position`, `token` (the position's token
text) and `value`. Error node ids are `ERR_L_p` (see `Graph.node_ids`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gemscope_jax.circuits import _graph, _prune

_FEATURE_TYPE = {_graph.FEATURE: "cross layer transcoder",
                 _graph.ERROR: "mlp reconstruction error",
                 _graph.TOKEN: "embedding", _graph.LOGIT: "logit"}


def _text(graph, i):
  return graph.token_strings[i] if graph.token_strings else str(
      int(graph.tokens[i]))


def to_json(graph: _graph.Graph, *, slug: str = "graph",
            scan: str | None = None, node_threshold: float = 0.8,
            edge_threshold: float = 0.98, tokenizer=None) -> dict[str, Any]:
  """The pruned graph as a JSON-ready dict (module docstring).

  Args:
    graph: an attribution graph.
    slug: its name in the frontend.
    scan: the feature set's name (circuit-tracer's `scan`); default the
      graph's dictionaries kind.
    node_threshold, edge_threshold: pruning (see `prune`).
    tokenizer: names logit tokens (else the graph's token strings, or ids).
  """
  node_mask, edge_mask = _prune.prune(graph, node_threshold, edge_threshold)
  cumulative = _prune.cumulative_influence(graph)
  ids = graph.node_ids()
  n_layers = graph.num_layers
  logit_index = {int(t): i for i, t in enumerate(graph.logit_tokens)}
  nodes = []
  for i in np.nonzero(node_mask)[0]:
    k, l = int(graph.kind[i]), int(graph.layer[i])
    p, f = int(graph.position[i]), int(graph.latent[i])
    node = {"node_id": ids[i], "feature": None, "layer": str(l),
            "ctx_idx": p, "feature_type": _FEATURE_TYPE[k],
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": "", "clerp": "",
            "influence": float(cumulative[i]),
            "activation": float(graph.activation[i]),
            "kind": _graph.KIND_NAMES[k], "layer_index": l, "position": p,
            "token": _text(graph, p), "value": float(graph.value[i])}
    if k == _graph.FEATURE:
      node.update(feature=f, jsNodeId=f"{l}_{f}-0")
    elif k == _graph.ERROR:
      node.update(jsNodeId=f"{l}_{p}-0", activation=None,
                  clerp=f"error, layer {l}")
    elif k == _graph.TOKEN:
      node.update(layer="E", feature=p, jsNodeId=f"E_{f}-{p}",
                  activation=None, clerp=f'Emb: "{_text(graph, p)}"')
    else:
      prob = float(graph.logit_probabilities[logit_index[f]])
      name = tokenizer.decode([f]) if tokenizer is not None else str(f)
      node.update(layer=str(n_layers + 1), feature=f, jsNodeId=f"L_{f}-{p}",
                  token_prob=prob, is_target_logit=True,
                  clerp=f'Output "{name}" (p={prob:.3f})', token=name)
    nodes.append(node)
  targets, sources = np.nonzero(edge_mask & node_mask[:, None]
                                & node_mask[None, :])
  links = [{"source": ids[s], "target": ids[t],
            "weight": float(graph.adjacency[t, s])}
           for t, s in zip(targets, sources)]
  prompt_tokens = [_text(graph, i) for i in range(len(graph.tokens))]
  replacement, completeness = _prune.scores(graph)
  metadata = {"slug": slug,
              "scan": scan or graph.metadata.get("dictionaries"),
              "prompt_tokens": prompt_tokens,
              "prompt": graph.prompt if graph.prompt is not None
              else "".join(prompt_tokens),
              "node_threshold": node_threshold,
              "schema_version": 1,
              "edge_threshold": edge_threshold,
              "replacement_score": replacement,
              "completeness_score": completeness,
              "num_layers": n_layers,
              "info": {k: v for k, v in graph.metadata.items()}}
  q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both",
              "clickedId": "", "sg_pos": ""}
  return {"metadata": metadata, "qParams": q_params, "nodes": nodes,
          "links": links}
