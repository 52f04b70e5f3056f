"""The circuit viewer: an attribution graph as one HTML file that opens
from `file://` (no network, no server, nothing beside it).

`write_html(graph_json, out)` takes a graph in circuit-tracer's frontend
schema (`{metadata, qParams, nodes, links}`, DESIGN.md section 8) and writes
one page: the project's own `static/viewer.js` and `viewer.css` inlined,
then the graph exactly as given and the view model below, each as one line
of a script (`GEMSCOPE_CIRCUIT.graph = {...};`), which `read_html` parses
back. The view model is computed here and tested in Python; the page only
draws it and handles the rest: hovering (a node's details, an edge's
weight), pinning (a node's edges listed), grouping pinned nodes into a
supernode (edges summed) and back, and a slider over the edges' |weight|
quantiles that hides weaker edges.

View model (`view_model`):
  rows       bottom first: embeddings, each layer that has nodes, logits
  columns    one per prompt position: its token and its width in slots
  place      per node (graph order): [column, row, slot, line]; a cell
             (layer x position) holds `MAX_SLOTS` nodes a line, more wrap
  names      per node: a short name ('L3 #1234 @5', 'error L3 @5', ...)
  kinds      per node: feature | error | embedding | logit | other
  hrefs      per node: its dashboard page or null
  threshold  the starting edge threshold on |weight|: the page first shows
             at most `DEFAULT_EDGES` edges

Only the schema's fields are read (node ids are opaque strings). Caveat:
the page holds the whole graph in memory and draws every edge as an SVG
path; it stays quick to about 1,000 nodes and 10,000 edges (prune first).
Floats are written as Python writes them, so NaN and infinities survive
(JavaScript reads them; strict JSON readers would not).
"""

from __future__ import annotations

import html
import json
import math
import numbers
import os
import pathlib
import re
from typing import Any, Mapping

from gemscope_jax import errors, safe_write
from gemscope_jax.models import hooks

STATIC = pathlib.Path(__file__).resolve().parent / "static"
PAGE_FILES = ("viewer.html", "viewer.js", "viewer.css")

FEATURE = "cross layer transcoder"
ERROR = "mlp reconstruction error"
EMBEDDING = "embedding"
LOGIT = "logit"
KINDS = {FEATURE: "feature", ERROR: "error", EMBEDDING: "embedding",
         LOGIT: "logit"}
# Order of kinds inside a cell, left to right.
_KIND_ORDER = {"embedding": 0, "logit": 0, "feature": 1, "other": 2,
               "error": 3}

MAX_SLOTS = 12       # nodes a line in one cell (layer x position)
TOKEN_SLOTS = 6      # a column is widened for its token up to this
CHARS_PER_SLOT = 2   # how much token text one slot holds
DEFAULT_EDGES = 1500  # edges the page shows when it opens

_MARK = re.compile(r"__GC_(STYLE|SCRIPT|GRAPH|VIEW|TITLE)__")
_DATA = re.compile(r"^GEMSCOPE_CIRCUIT\.(graph|view) = (.*);$", re.MULTILINE)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def display_token(token: Any) -> str:
  """A token as the page shows it: SentencePiece's word mark as a space,
  a newline as a visible mark (as the dashboards do)."""
  return str(token).replace("\u2581", " ").replace("\n", "\u21b5")


def _kind(node: dict) -> str:
  kind = KINDS.get(node.get("feature_type"))
  if kind is None:
    kind = "embedding" if node.get("layer") == "E" else "other"
  return kind


def _layer(node: dict, kind: str, where: str) -> int | None:
  """The node's layer as an int (None for embeddings and logits, which
  have rows of their own)."""
  if kind in ("embedding", "logit"):
    return None
  layer = node.get("layer")
  if isinstance(layer, bool):
    layer = None
  try:
    return int(layer)
  except (TypeError, ValueError):
    raise errors.InputError(
        f"{where}: layer {layer!r} is not a layer number (or 'E' for an "
        "embedding)") from None


def _number(x: Any) -> bool:
  """A real number (numpy's scalars included), not a bool."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_graph(graph: Any) -> None:
  """Raises InputError unless `graph` has the fields the viewer reads:
  nodes with unique `node_id`, an int `ctx_idx` >= 0 and a layer, links
  between known nodes with finite weights."""
  if not isinstance(graph, dict):
    raise errors.InputError(
        f"graph: expected a dict, got {type(graph).__name__}")
  for key in ("nodes", "links"):
    if not isinstance(graph.get(key), list):
      raise errors.InputError(f"graph: {key!r} must be a list (circuit-"
                              "tracer's {metadata, qParams, nodes, links})")
  if not isinstance(graph.get("metadata", {}), dict):
    raise errors.InputError("graph: 'metadata' must be a dict")
  seen = set()
  for i, node in enumerate(graph["nodes"]):
    where = f"graph node {i}"
    if not isinstance(node, dict) or "node_id" not in node:
      raise errors.InputError(f"{where}: expected a dict with a node_id")
    nid = str(node["node_id"])
    if nid in seen:
      raise errors.InputError(f"{where}: node_id {nid!r} appears twice")
    seen.add(nid)
    pos = node.get("ctx_idx")
    if isinstance(pos, bool) or not isinstance(pos, numbers.Integral) or \
        pos < 0:
      raise errors.InputError(
          f"{where} ({nid}): ctx_idx must be an int >= 0, got {pos!r}")
    _layer(node, _kind(node), f"{where} ({nid})")
  for i, link in enumerate(graph["links"]):
    if not isinstance(link, dict):
      raise errors.InputError(f"graph link {i}: expected a dict")
    for end in ("source", "target"):
      if str(link.get(end)) not in seen:
        raise errors.InputError(
            f"graph link {i}: {end} {link.get(end)!r} is not a node_id")
    w = link.get("weight")
    if not _number(w) or not math.isfinite(w):
      raise errors.InputError(
          f"graph link {i} ({link['source']} -> {link['target']}): weight "
          f"{w!r} is not a finite number")


def node_name(node: dict, tokens: list) -> str:
  """A node's short name, as the page's lists and tooltips show it."""
  kind = _kind(node)
  pos = node["ctx_idx"]
  if kind == "feature":
    return f"L{node.get('layer')} #{node.get('feature')} @{pos}"
  if kind == "error":
    return f"error L{node.get('layer')} @{pos}"
  if kind == "embedding":
    tok = display_token(tokens[pos]) if pos < len(tokens) else ""
    return f"emb {json.dumps(tok, ensure_ascii=False)} @{pos}"
  if kind == "logit":
    label = node.get("clerp") or ""
    return label if label else f"logit @{pos}"
  feature = node.get("feature")
  extra = f" #{feature}" if feature is not None else ""
  return f"{node.get('feature_type') or 'node'} L{node.get('layer')}" \
         f"{extra} @{pos}"


def _dashboard_base(dashboard: str | os.PathLike, page_dir: pathlib.Path
                    ) -> str:
  """A dashboard site as the page links it: a URL as given, a folder
  relative to the page (so the two can move together)."""
  text = os.fspath(dashboard)
  if _URL.match(text):
    return text.rstrip("/")
  folder = pathlib.Path(text).resolve()
  try:
    return pathlib.PurePath(os.path.relpath(folder, page_dir)).as_posix()
  except ValueError:  # another drive (Windows): no relative path
    return folder.as_uri()


def dashboard_href(base: str, feature: Any) -> str:
  """A latent's page in a dashboard site (its hash route)."""
  return f"{base}/index.html#latent={feature}"


def site_layers(site: str | os.PathLike) -> dict[int, int] | None:
  """{layer: the site's id of that layer's latent 0} for a dashboard site
  folder, from its data/site.json: a single-layer site (SAE, transcoder)
  holds one layer at offset 0; a CLT site numbers its latents layer-major
  (layer i's latent j is i * d_sae + j, `dashboards._dictionary`). None
  when the folder holds no site, or a site not tied to layers (a
  crosscoder's latents span them all)."""
  path = pathlib.Path(site) / "data" / "site.json"
  if not path.is_file():
    return None
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))["meta"]
    layers = [hooks.parse(h).layer for h in meta["hookpoint"].split(",")
              if h.strip()]
    width = int(meta["width"])
  except (ValueError, KeyError, TypeError) as e:
    raise errors.InputError(f"{path}: not a dashboard site's meta ({e})"
                            ) from None
  if meta.get("kind") == "clt" and layers:
    return {l: i * (width // len(layers)) for i, l in enumerate(layers)}
  return {layers[0]: 0} if len(layers) == 1 else None


def _links(dashboard: Any, page_dir: pathlib.Path) -> dict:
  """{layer or None: (base, offset)}: where a feature of a layer links, at
  latent id feature + offset (None: every layer, ids as they are)."""
  if dashboard is None:
    return {}
  if isinstance(dashboard, Mapping):
    out = {}
    for k, v in dashboard.items():
      layers = None if _URL.match(os.fspath(v)) else site_layers(v)
      out[int(k)] = (_dashboard_base(v, page_dir),
                     (layers or {}).get(int(k), 0))
    return out
  if _URL.match(os.fspath(dashboard)):
    return {None: (_dashboard_base(dashboard, page_dir), 0)}
  folder = pathlib.Path(dashboard)
  layers = site_layers(folder)
  if layers is not None:
    base = _dashboard_base(folder, page_dir)
    return {l: (base, off) for l, off in layers.items()}
  # A folder of sites, one per layer (per-layer transcoders).
  subs = sorted(p for p in folder.iterdir() if p.is_dir()) \
      if folder.is_dir() else []
  out = {}
  for sub in subs:
    for l, off in (site_layers(sub) or {}).items():
      if l in out:
        raise errors.InputError(
            f"{folder}: two dashboard sites for layer {l} ({sub.name} and "
            "another); keep one per layer")
      out[l] = (_dashboard_base(sub, page_dir), off)
  if out:
    return out
  return {None: (_dashboard_base(folder, page_dir), 0)}


def view_model(graph: dict, *, dashboard: Any = None,
               page_dir: str | os.PathLike = ".") -> dict:
  """What the page draws (module docstring); `graph` is checked first.

  Args:
    graph: the graph JSON.
    dashboard: None; a dashboard site folder (its data/site.json says
      which layers it covers: one, or all of a CLT's, whose latent ids it
      numbers layer-major), a folder of such sites (one per layer, for
      per-layer transcoders), a URL (every feature, ids as they are), or
      {layer: site folder or URL}.
    page_dir: the folder the page is written to (folder links are made
      relative to it).
  """
  check_graph(graph)
  nodes = graph["nodes"]
  tokens = list((graph.get("metadata") or {}).get("prompt_tokens") or [])
  kinds = [_kind(n) for n in nodes]
  layers = [_layer(n, k, "") for n, k in zip(nodes, kinds)]
  row_keys = sorted({l for l in layers if l is not None})
  has_emb, has_logit = "embedding" in kinds, "logit" in kinds
  rows = ([{"label": "Emb", "kind": "embedding"}] if has_emb else []) + [
      {"label": f"L{l}", "kind": "layer"} for l in row_keys] + (
      [{"label": "Logit", "kind": "logit"}] if has_logit else [])
  row_of = {l: i + has_emb for i, l in enumerate(row_keys)}
  logit_row = len(rows) - 1

  cells: dict[tuple[int, int], list[int]] = {}
  for i, (node, kind, layer) in enumerate(zip(nodes, kinds, layers)):
    row = 0 if kind == "embedding" else (
        logit_row if kind == "logit" else row_of[layer])
    cells.setdefault((int(node["ctx_idx"]), row), []).append(i)
  n_cols = max([len(tokens)] + [int(n["ctx_idx"]) + 1 for n in nodes])
  col_slots = [1] * n_cols
  row_lines = [1] * len(rows)
  place: list[list[int]] = [[]] * len(nodes)

  def order(i: int) -> tuple:
    node = nodes[i]
    weight = node.get("token_prob") if kinds[i] == "logit" else \
        node.get("influence")
    weight = weight if _number(weight) and math.isfinite(weight) else 0.0
    return (_KIND_ORDER[kinds[i]], -weight, i)

  for (col, row), members in cells.items():
    members.sort(key=order)
    col_slots[col] = max(col_slots[col], min(len(members), MAX_SLOTS))
    row_lines[row] = max(row_lines[row], -(-len(members) // MAX_SLOTS))
    for k, i in enumerate(members):
      place[i] = [col, row, k % MAX_SLOTS, k // MAX_SLOTS]
  columns = []
  for col in range(n_cols):
    tok = display_token(tokens[col]) if col < len(tokens) else ""
    want = min(TOKEN_SLOTS, -(-len(tok) // CHARS_PER_SLOT))
    columns.append({"token": tok, "slots": max(col_slots[col], want, 1)})
  for row, lines in zip(rows, row_lines):
    row["lines"] = lines

  links = _links(dashboard, pathlib.Path(page_dir).resolve())
  hrefs = []
  for node, kind, layer in zip(nodes, kinds, layers):
    base, offset = links.get(None, links.get(layer, (None, 0)))
    feature = node.get("feature")
    ok = kind in ("feature", "other") and isinstance(feature, int) and \
        not isinstance(feature, bool)
    hrefs.append(dashboard_href(base, feature + offset) if ok and base
                 else None)

  weights = sorted((abs(l["weight"]) for l in graph["links"]), reverse=True)
  threshold = weights[DEFAULT_EDGES - 1] if len(weights) > DEFAULT_EDGES \
      else 0.0
  return {"rows": rows, "columns": columns, "place": place,
          "names": [node_name(n, tokens) for n in nodes], "kinds": kinds,
          "hrefs": hrefs, "threshold": threshold,
          "max_weight": weights[0] if weights else 0.0}


def _plain(value: Any) -> Any:
  """json.dumps' fallback: numpy and JAX scalars and arrays as Python."""
  if hasattr(value, "tolist"):
    return value.tolist()
  if hasattr(value, "item"):
    return value.item()
  raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _script_json(value: Any) -> str:
  """One line of JSON that is also JavaScript, safe inside <script>: no
  '</script>' or '<!--', line separators escaped (all only in strings)."""
  text = json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                    default=_plain)
  return (text.replace("<", "\\u003c").replace(">", "\\u003e")
          .replace("&", "\\u0026").replace("\u2028", "\\u2028")
          .replace("\u2029", "\\u2029"))


def page_html(graph: dict, view: dict) -> str:
  """The whole page as text."""
  parts = {name: (STATIC / name).read_text(encoding="utf-8")
           for name in PAGE_FILES}
  for name in ("viewer.js", "viewer.css"):
    if re.search(r"</(script|style)", parts[name], re.IGNORECASE):
      raise errors.InputError(f"{STATIC / name}: may not contain a closing "
                              "</script> or </style> (it is inlined)")
  meta = graph.get("metadata") or {}
  title = "circuit: " + str(meta.get("slug") or meta.get("prompt") or "graph")
  values = {"STYLE": parts["viewer.css"], "SCRIPT": parts["viewer.js"],
            "GRAPH": _script_json(graph), "VIEW": _script_json(view),
            "TITLE": html.escape(title)}
  # One pass: a value that happens to hold a marker is left as it is.
  return _MARK.sub(lambda m: values[m[1]], parts["viewer.html"])


def write_html(graph_json: dict, out: str | os.PathLike, *,
               dashboard: Any = None, overwrite: bool = False,
               flag: str = "") -> pathlib.Path:
  """Writes the graph's viewer as one self-contained HTML file.

  Args:
    graph_json: the graph in circuit-tracer's frontend schema (module
      docstring); embedded exactly, `read_html` gives it back.
    out: the HTML file to write.
    dashboard: feature links (`view_model`): a dashboard site folder
      (linked relative to `out`), a folder of per-layer sites, a URL, or
      {layer: folder or URL}; None for no links. A feature links to
      `<site>/index.html#latent=<id>`, its id in that site.
    overwrite: replace an existing `out` (else it is refused).
    flag: how error messages name `out` (the command line's flag).

  Returns:
    `out`, written atomically (`safe_write.atomic_path`).
  """
  out = pathlib.Path(out)
  safe_write.check_file_output(out, overwrite=overwrite, flag=flag)
  view = view_model(graph_json, dashboard=dashboard, page_dir=out.parent)
  text = page_html(graph_json, view)
  with safe_write.atomic_path(out, overwrite=overwrite, flag=flag) as tmp:
    tmp.write_text(text, encoding="utf-8")
  return out


def read_html(path: str | os.PathLike, what: str = "graph") -> dict:
  """The graph (or, with what='view', the view model) a viewer page holds."""
  path = pathlib.Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise errors.MissingInputError(f"{path}: no such file") from None
  for m in _DATA.finditer(text):
    if m[1] == what:
      return json.loads(m[2])
  raise errors.InputError(f"{path}: not a circuit viewer page (no "
                          f"GEMSCOPE_CIRCUIT.{what})")
