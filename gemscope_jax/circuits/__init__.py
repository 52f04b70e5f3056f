"""Circuit tracing: attribution graphs through a replacement model, and
their viewer.

  viewer.write_html(graph_json, out)   the graph as one HTML page that opens
                                       from file:// (no network)
  attribute(prompt, dictionaries, config, params)   the attribution graph
                                       (Graph) through transcoders or a CLT
  prune(graph) -> (node_mask, edge_mask); scores(graph) -> (replacement,
                                       completeness); node_influence(graph)
  to_json(graph)                       circuit-tracer's frontend schema
  Graph.save(path) / Graph.load(path)  one .npz, lossless
"""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "write_html": "gemscope_jax.circuits.viewer",
    "read_html": "gemscope_jax.circuits.viewer",
    "attribute": "gemscope_jax.circuits._attribute",
    "salient_logits": "gemscope_jax.circuits._attribute",
    "Graph": "gemscope_jax.circuits._graph",
    "prune": "gemscope_jax.circuits._prune",
    "scores": "gemscope_jax.circuits._prune",
    "node_influence": "gemscope_jax.circuits._prune",
    "to_json": "gemscope_jax.circuits._json",
    "LocalReplacement": "gemscope_jax.circuits._replacement",
    "build_replacement": "gemscope_jax.circuits._replacement",
}, submodules=("viewer",))
