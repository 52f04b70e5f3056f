"""The circuit viewer: its view model in Python, then the page itself in
headless Chromium opened from file:// (tests/chromium.py drives it over
the DevTools pipe; browser tests skip, saying so, without Chromium).

Graphs are synthetic, in circuit-tracer's frontend schema: a small one
built by hand (its weights chosen so sums and thresholds are known) and a
large one of 500 nodes and 5,000 edges (the page must open it quickly).
Screenshots go to $GEMSCOPE_SCREENSHOTS, else
/tmp/gemscope-circuit-screenshots (printed), to be looked at.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
import tempfile
import time

import pytest

import chromium
from gemscope_jax import errors
from gemscope_jax.circuits import viewer

SHOTS = pathlib.Path(os.environ.get("GEMSCOPE_SCREENSHOTS") or (
    pathlib.Path(tempfile.gettempdir()) / "gemscope-circuit-screenshots"))

# ------------------------------------------------------------ synthetic data

TOKENS = ["<bos>", "The", "\u2581capital", "\u2581of", "\u2581France",
          "\u2581is"]
LAYERS = 4                 # logits sit at layer LAYERS
# (layer, latent, position, activation, influence, label)
FEATURES = [(0, 101, 1, 3.5, 0.11, "the word The"),
            (0, 102, 4, 7.25, 0.32, "France"),
            (1, 201, 4, 2.125, 0.21, "countries"),
            (1, 202, 2, 1.75, 0.08, ""),
            (2, 301, 5, 4.5, 0.44, "say a capital"),
            (2, 302, 5, 0.875, 0.18, "</script><b>not bold</b>"),
            (2, 303, 4, 5.5, 0.27, "French things"),
            (3, 401, 5, 6.75, 0.51, "Paris"),
            (3, 402, 5, 1.5, 0.09, "article next"),
            (3, 403, 3, 0.625, 0.05, "of")]
LOGITS = [(" Paris", 0.4), (" the", 0.2), (" a", 0.1)]
A, B = "2_301_5", "2_302_5"     # grouped in the tests
PARIS = "L_0_5"
# A -> Paris and B -> Paris sum to 0.75; A and B share the source E_5.
CHOSEN = {(A, PARIS): 1.25, (B, PARIS): -0.5, ("E_5", A): 0.3,
          ("E_5", B): 0.2, (A, "3_401_5"): 0.9, (B, "3_401_5"): 0.0625,
          ("3_401_5", PARIS): 2.3127}


def feature_id(layer, latent, pos):
  return f"{layer}_{latent}_{pos}"


def make_graph(seed: int = 0) -> dict:
  rng = random.Random(seed)
  nodes = []
  for p, _ in enumerate(TOKENS):
    nodes.append({"node_id": f"E_{p}", "feature": None, "layer": "E",
                  "ctx_idx": p, "feature_type": "embedding",
                  "token_prob": 0.0, "is_target_logit": False,
                  "influence": None, "activation": None, "clerp": ""})
  for layer, latent, pos, act, infl, label in FEATURES:
    nodes.append({"node_id": feature_id(layer, latent, pos),
                  "feature": latent, "layer": layer, "ctx_idx": pos,
                  "feature_type": "cross layer transcoder",
                  "token_prob": 0.0, "is_target_logit": False,
                  "influence": infl, "activation": act, "clerp": label})
  for layer in (1, 3):
    nodes.append({"node_id": f"Err_{layer}_5", "feature": None,
                  "layer": layer, "ctx_idx": 5,
                  "feature_type": "mlp reconstruction error",
                  "token_prob": 0.0, "is_target_logit": False,
                  "influence": 0.02, "activation": None, "clerp": ""})
  for k, (token, prob) in enumerate(LOGITS):
    nodes.append({"node_id": f"L_{k}_5", "feature": 1000 + k,
                  "layer": LAYERS, "ctx_idx": 5, "feature_type": "logit",
                  "token_prob": prob, "is_target_logit": k == 0,
                  "influence": None, "activation": None,
                  "clerp": f'Output "{token}" (p={prob:.3f})'})
  rank = {n["node_id"]: (-1 if n["layer"] == "E" else n["layer"])
          for n in nodes}
  links = [{"source": s, "target": t, "weight": w}
           for (s, t), w in CHOSEN.items()]
  for s in nodes:
    for t in nodes:
      pair = (s["node_id"], t["node_id"])
      if (rank[pair[0]] < rank[pair[1]] and pair not in CHOSEN
          and s["feature_type"] != "logit" and rng.random() < 0.35):
        # Weights of a few distinct sizes, none a rounding tie.
        w = rng.choice([1, -1]) * round(rng.uniform(0.011, 1.9), 4) + 1e-5
        links.append({"source": pair[0], "target": pair[1],
                      "weight": round(w, 5)})
  return {"metadata": {"slug": "capital-of-france", "scan": "synthetic",
                       "prompt_tokens": list(TOKENS),
                       "prompt": "<bos>The capital of France is",
                       "node_threshold": 0.8, "schema_version": 1},
          "qParams": {"pinnedIds": [], "supernodes": [],
                      "linkType": "both"},
          "nodes": nodes, "links": links}


def make_large_graph(n_nodes: int = 500, n_links: int = 5000,
                     positions: int = 24, layers: int = 18,
                     seed: int = 1) -> dict:
  """A graph the size of a pruned real one: embeddings, 10 logits at the
  last position, errors and features spread over layers and positions
  (more at later positions, as real graphs are)."""
  rng = random.Random(seed)
  tokens = ["<bos>"] + [f"\u2581tok{p}" for p in range(1, positions)]
  nodes = [{"node_id": f"E_{p}", "feature": None, "layer": "E",
            "ctx_idx": p, "feature_type": "embedding", "token_prob": 0.0,
            "is_target_logit": False, "influence": None,
            "activation": None, "clerp": ""} for p in range(positions)]
  nodes += [{"node_id": f"L_{k}", "feature": 500 + k, "layer": layers,
             "ctx_idx": positions - 1, "feature_type": "logit",
             "token_prob": round(0.3 / (k + 1), 4), "is_target_logit": True,
             "influence": None, "activation": None,
             "clerp": f'Output " word{k}"'} for k in range(10)]
  seen = set()
  while len(nodes) < n_nodes:
    layer = rng.randrange(layers)
    pos = min(positions - 1, int(positions * rng.random() ** 0.5))
    if rng.random() < 0.12:
      nid, latent, kind = f"Err_{layer}_{pos}", None, "mlp reconstruction error"
    else:
      latent = rng.randrange(16384)
      nid, kind = feature_id(layer, latent, pos), "cross layer transcoder"
    if nid in seen:
      continue
    seen.add(nid)
    nodes.append({"node_id": nid, "feature": latent, "layer": layer,
                  "ctx_idx": pos, "feature_type": kind, "token_prob": 0.0,
                  "is_target_logit": False,
                  "influence": round(rng.random(), 4),
                  "activation": round(rng.uniform(0, 20), 3), "clerp": ""})

  def rank(n):
    return -1 if n["layer"] == "E" else n["layer"]

  pairs = set()
  while len(pairs) < n_links:
    s, t = rng.sample(range(len(nodes)), 2)
    if rank(nodes[s]) < rank(nodes[t]) and \
        nodes[s]["feature_type"] != "logit" and \
        nodes[s]["ctx_idx"] <= nodes[t]["ctx_idx"]:
      pairs.add((s, t))
  links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"],
            "weight": round(rng.choice([1, -1]) * rng.lognormvariate(-2, 1.2),
                            6)} for s, t in sorted(pairs)]
  return {"metadata": {"slug": "large", "scan": "synthetic",
                       "prompt_tokens": tokens, "prompt": "".join(tokens),
                       "node_threshold": 0.8, "schema_version": 1},
          "qParams": {}, "nodes": nodes, "links": links}


def fmt(x: float) -> str:
  """The page's number format (viewer.js fmt)."""
  if x == 0:
    return "0"
  if abs(x) >= 1e4 or abs(x) < 1e-3:
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant}e{int(exp):+d}"
  text = repr(float(f"{x:.4g}"))
  return text[:-2] if text.endswith(".0") else text


def same(a, b) -> bool:
  """Equal as JSON, NaN included (NaN != NaN in Python)."""
  return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# ---------------------------------------------------------------- the model


def test_write_refuses_an_existing_file_unless_overwrite(tmp_path):
  out = tmp_path / "graph.html"
  assert viewer.write_html(make_graph(), out) == out
  first = out.read_text()
  with pytest.raises(errors.OutputError, match="already exists.*overwrite"):
    viewer.write_html(make_graph(seed=5), out)
  assert out.read_text() == first
  viewer.write_html(make_graph(seed=5), out, overwrite=True)
  assert viewer.read_html(out) == make_graph(seed=5)
  assert [p.name for p in tmp_path.iterdir()] == ["graph.html"]
  with pytest.raises(errors.OutputError, match="is a folder"):
    viewer.write_html(make_graph(), tmp_path)


def test_the_graph_is_embedded_losslessly_and_nothing_is_fetched(tmp_path):
  graph = make_graph()
  odd = graph["nodes"][7]
  odd["activation"] = float("nan")
  odd["influence"] = 0.1 + 0.2               # 0.30000000000000004
  odd["clerp"] = "<!-- </script> & \u2028 \u00e9 \"q\" \\"
  graph["metadata"]["prompt_tokens"][1] = "</script>"
  graph["qParams"]["nested"] = {"big": 2 ** 60, "tiny": 5e-324,
                               "list": [1, None]}
  graph["links"][0]["weight"] = -1.0000000000000002
  out = viewer.write_html(graph, tmp_path / "g.html")
  back = viewer.read_html(out)
  assert same(back, graph)
  assert math.isnan(back["nodes"][7]["activation"])
  assert back["nodes"][7]["influence"] == 0.1 + 0.2
  assert back["qParams"]["nested"]["big"] == 2 ** 60
  assert back["links"][0]["weight"] == -1.0000000000000002
  page = out.read_text(encoding="utf-8")
  # One file: the project's script and style inlined, nothing loaded.
  assert "<script src" not in page and 'rel="stylesheet"' not in page
  assert "@import" not in page and "url(" not in page
  assert page.count("</script>") == 4 and "GEMSCOPE_CIRCUIT.start" in page
  assert "<title>circuit: capital-of-france</title>" in page
  view = viewer.read_html(out, "view")
  assert view == json.loads(json.dumps(viewer.view_model(graph,
                                                         page_dir=tmp_path)))
  with pytest.raises(errors.InputError, match="not a circuit viewer page"):
    (tmp_path / "x.html").write_text("<html></html>")
    viewer.read_html(tmp_path / "x.html")


def test_numpy_values_are_written_as_numbers(tmp_path):
  np = pytest.importorskip("numpy")
  graph = make_graph()
  graph["nodes"][6]["activation"] = np.float32(3.5)
  graph["nodes"][6]["feature"] = np.int64(101)
  graph["links"][0]["weight"] = np.float32(1.25)
  back = viewer.read_html(viewer.write_html(graph, tmp_path / "g.html"))
  assert back["nodes"][6]["activation"] == 3.5
  assert back["nodes"][6]["feature"] == 101
  assert back["links"][0]["weight"] == 1.25


def test_layout_rows_columns_and_cells():
  graph = make_graph()
  view = viewer.view_model(graph)
  assert [r["label"] for r in view["rows"]] == [
      "Emb", "L0", "L1", "L2", "L3", "Logit"]
  assert [c["token"] for c in view["columns"]] == [
      "<bos>", "The", " capital", " of", " France", " is"]
  ids = [n["node_id"] for n in graph["nodes"]]
  place = dict(zip(ids, view["place"]))
  kinds = dict(zip(ids, view["kinds"]))
  names = dict(zip(ids, view["names"]))
  assert place["E_0"][:2] == [0, 0] and place["E_5"][:2] == [5, 0]
  assert place["L_0_5"][:2] == [5, 5] and place["1_201_4"][:2] == [4, 2]
  # Every node has its own spot, and its cell is its (position, layer).
  spots = [tuple(p) for p in view["place"]]
  assert len(set(spots)) == len(spots)
  # Features before errors in a cell, by influence; logits by probability.
  assert place["3_401_5"][2] == 0 and place["3_402_5"][2] == 1
  assert place["Err_3_5"][2] == 2
  assert [place[f"L_{k}_5"][2] for k in range(3)] == [0, 1, 2]
  assert kinds["E_0"] == "embedding" and kinds["Err_1_5"] == "error"
  assert kinds[A] == "feature" and kinds[PARIS] == "logit"
  assert names[A] == "L2 #301 @5" and names["Err_1_5"] == "error L1 @5"
  assert names["E_2"] == 'emb " capital" @2'
  assert names[PARIS] == 'Output " Paris" (p=0.400)'
  assert view["hrefs"] == [None] * len(ids)
  assert view["threshold"] == 0.0
  assert view["max_weight"] == max(abs(l["weight"]) for l in graph["links"])
  # Column widths: the widest cell, or the token's text.
  assert view["columns"][5]["slots"] == 3    # three logits at ' is'
  assert view["columns"][2]["slots"] == 4    # ' capital': 8 characters


def test_a_crowded_cell_wraps_and_layers_may_be_strings():
  graph = make_graph()
  for k in range(30):      # as circuit-tracer writes layers: strings
    graph["nodes"].append({"node_id": f"x{k}", "feature": k, "layer": "2",
                           "ctx_idx": 1, "feature_type":
                           "cross layer transcoder", "influence": k / 100,
                           "activation": 1.0, "clerp": ""})
  view = viewer.view_model(graph)
  assert view["columns"][1]["slots"] == viewer.MAX_SLOTS
  assert view["rows"][3]["label"] == "L2" and view["rows"][3]["lines"] == 3
  spots = [tuple(p) for p in view["place"]]
  assert len(set(spots)) == len(spots)
  assert view["place"][-1] == [1, 3, 0, 0]   # highest influence first


def test_dashboard_links(tmp_path):
  graph = make_graph()
  ids = [n["node_id"] for n in graph["nodes"]]
  out = tmp_path / "pages"
  out.mkdir()
  view = viewer.view_model(graph, dashboard=tmp_path / "dash",
                           page_dir=out)
  hrefs = dict(zip(ids, view["hrefs"]))
  assert hrefs[A] == "../dash/index.html#latent=301"
  assert hrefs["Err_1_5"] is None and hrefs["E_1"] is None
  assert hrefs[PARIS] is None    # logits are not latents
  view = viewer.view_model(graph, dashboard="https://x.org/site/")
  assert dict(zip(ids, view["hrefs"]))[A] == \
      "https://x.org/site/index.html#latent=301"
  view = viewer.view_model(graph, dashboard={2: "file:///sites/l2",
                                             3: "https://x.org/l3"})
  hrefs = dict(zip(ids, view["hrefs"]))
  assert hrefs[A] == "file:///sites/l2/index.html#latent=301"
  assert hrefs["3_401_5"] == "https://x.org/l3/index.html#latent=401"
  assert hrefs["0_101_1"] is None


def test_the_default_threshold_shows_a_readable_number_of_edges():
  graph = make_large_graph(n_links=2400)
  view = viewer.view_model(graph)
  weights = sorted((abs(l["weight"]) for l in graph["links"]), reverse=True)
  assert view["threshold"] == weights[viewer.DEFAULT_EDGES - 1]
  assert sum(w >= view["threshold"] for w in weights) == viewer.DEFAULT_EDGES


@pytest.mark.parametrize("change, message", [
    (lambda g: g.pop("nodes"), "'nodes' must be a list"),
    (lambda g: g["nodes"].append(dict(g["nodes"][0])), "'E_0' appears twice"),
    (lambda g: g["links"].append({"source": "E_0", "target": "nope",
                                  "weight": 1.0}), "target 'nope' is not"),
    (lambda g: g["links"][3].update(weight=float("nan")), "not a finite"),
    (lambda g: g["links"][3].update(weight="1"), "not a finite"),
    (lambda g: g["nodes"][7].update(ctx_idx=-1), "ctx_idx must be an int"),
    (lambda g: g["nodes"][7].update(layer="mlp"), "'mlp' is not a layer"),
    (lambda g: g.update(metadata=[]), "'metadata' must be a dict"),
])
def test_bad_graphs_are_refused_and_nothing_is_written(tmp_path, change,
                                                       message):
  graph = make_graph()
  change(graph)
  with pytest.raises(errors.InputError, match=message):
    viewer.write_html(graph, tmp_path / "g.html")
  assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  binary = chromium.find_binary()
  if binary is None:
    pytest.skip(chromium.SKIP_REASON)
  b = chromium.Chromium(binary, tmp_path_factory.mktemp("chromium-profile"),
                        width=1440, height=1000)
  print(f"\nscreenshots: {SHOTS}")
  yield b
  b.close()


@pytest.fixture
def page(browser):
  browser.errors.clear()
  yield browser
  assert browser.errors == [], "console errors:\n" + "\n".join(browser.errors)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("circuit")
  return viewer.write_html(make_graph(), folder / "pages" / "graph.html",
                           dashboard=folder / "dash")


def _open(b, path: pathlib.Path) -> None:
  b.open(path.as_uri())
  b.wait("document.getElementById('gc-root').dataset.ready === '1'")


def _node(nid: str) -> str:
  return f"document.querySelector('.gc-node[data-id=\"{nid}\"]')"


def _visible_edges(b) -> list[tuple[str, str, float]]:
  return [tuple(e) for e in b.eval(
      "[...document.querySelectorAll('#gc-edges .gc-edge')]"
      ".filter(e => getComputedStyle(e).display !== 'none')"
      ".map(e => [e.dataset.s, e.dataset.t, +e.dataset.w])")]


def _links(graph) -> list[tuple[str, str, float]]:
  return [(l["source"], l["target"], l["weight"]) for l in graph["links"]]


def _tip(b) -> str:
  return b.eval("(() => { const t = document.getElementById('gc-tip');"
                " return t.hidden ? '' : t.innerText; })()")


def _hover(b, selector_js: str) -> str:
  x, y = chromium.client_point(b, selector_js)
  chromium.mouse_move(b, x, y)
  return _tip(b)


def _click(b, selector_js: str) -> None:
  chromium.click(b, *chromium.client_point(b, selector_js))


def _rows(b, nid: str, table: str) -> list[tuple[str, str, float]]:
  return sorted(tuple(r) for r in b.eval(
      f"[...document.querySelectorAll('.gc-card[data-id=\"{nid}\"] "
      f".{table} tr')].map(r => [r.dataset.s, r.dataset.t, +r.dataset.w])"))


def test_page_draws_every_node_and_edge(page, small):
  graph = make_graph()
  _open(page, small)
  assert page.eval("document.querySelectorAll('.gc-node').length") == len(
      graph["nodes"])
  assert sorted(page.eval("[...document.querySelectorAll('.gc-node')]"
                          ".map(e => e.dataset.id)")) == sorted(
      n["node_id"] for n in graph["nodes"])
  # One path per link; the starting threshold (0 here) shows them all.
  assert sorted(_visible_edges(page)) == sorted(_links(graph))
  assert page.eval("document.getElementById('gc-threshold-text')"
                   ".dataset.shown") == str(len(graph["links"]))
  assert page.eval("[...document.querySelectorAll('.gc-row-label')]"
                   ".map(e => e.textContent)") == [
      "Emb", "L0", "L1", "L2", "L3", "Logit"]
  assert page.eval("[...document.querySelectorAll('.gc-token')]"
                   ".map(e => e.firstChild.nodeValue)") == [
      "<bos>", "The", " capital", " of", " France", " is"]
  # Layers go up the page: embeddings lowest, logits highest.
  ys = page.eval("[...document.querySelectorAll('.gc-node')].map(e => "
                 "[e.dataset.id, e.getBoundingClientRect().y])")
  y = dict(ys)
  assert y["E_5"] > y["Err_1_5"] > y[A] > y["3_401_5"] > y[PARIS]
  # Label text with markup is text, not markup.
  assert page.eval("document.querySelectorAll('#gc-root b').length") == 0
  page.screenshot(SHOTS / "graph.png")


def test_hovering_shows_node_details_and_edge_weights(page, small):
  _open(page, small)
  tip = _hover(page, _node(A))
  assert tip.splitlines()[:8] == [
      "L2 #301 @5", "type: cross layer transcoder", "layer: 2",
      'position: 5 " is"', "latent: 301", "activation: 4.5",
      "influence: 0.44", "label: say a capital"]
  assert "click to pin" in tip
  # Hovering highlights the node's edges.
  assert page.eval("document.getElementById('gc-svg').classList"
                   ".contains('gc-focus')")
  hl = page.eval("[...document.querySelectorAll('.gc-edge.gc-hl')]"
                 ".map(e => [e.dataset.s, e.dataset.t])")
  graph = make_graph()
  assert sorted(map(tuple, hl)) == sorted(
      (s, t) for s, t, _ in _links(graph) if A in (s, t))
  tip = _hover(page, _node(PARIS))
  assert "probability: 0.4" in tip and "target: yes" in tip
  tip = _hover(page, _node("E_2"))
  assert tip.splitlines()[:2] == ['emb " capital" @2', "type: embedding"]
  # The strongest edge is drawn last, on top: hover it.
  tip = _hover(page, "document.querySelector('.gc-edge[data-s=\"3_401_5\"]"
                     "[data-t=\"L_0_5\"]')")
  assert tip.splitlines() == ['L3 #401 @5 \u2192 Output " Paris" (p=0.400)',
                              "weight 2.313"]
  assert fmt(2.3127) == "2.313"
  chromium.mouse_move(page, 2, 2)
  assert _tip(page) == ""
  assert not page.eval("document.getElementById('gc-svg').classList"
                       ".contains('gc-focus')")
  page.screenshot(SHOTS / "hover.png")


def test_pinning_a_node_lists_exactly_its_edges(page, small):
  graph = make_graph()
  links = _links(graph)
  _open(page, small)
  _click(page, _node("3_401_5"))
  assert page.eval("[...document.querySelectorAll('.gc-card')]"
                   ".map(c => c.dataset.id)") == ["3_401_5"]
  assert _rows(page, "3_401_5", "gc-in") == sorted(
      l for l in links if l[1] == "3_401_5")
  assert _rows(page, "3_401_5", "gc-out") == sorted(
      l for l in links if l[0] == "3_401_5")
  weights = page.eval("[...document.querySelectorAll("
                      "'.gc-card .gc-in td.gc-num')].map(e => e.textContent)")
  want = sorted((l for l in links if l[1] == "3_401_5"),
                key=lambda l: -abs(l[2]))
  assert weights == [fmt(l[2]) for l in want]
  assert page.eval("[...document.querySelectorAll('.gc-pinned')]"
                   ".map(e => e.dataset.id)") == ["3_401_5"]
  # Pinned edges stay highlighted when the mouse leaves.
  chromium.mouse_move(page, 2, 2)
  hl = page.eval("document.querySelectorAll('.gc-edge.gc-hl').length")
  assert hl == sum("3_401_5" in (s, t) for s, t, _ in links)
  # A name in the list pins that node too; a second click unpins.
  page.eval("document.querySelector('.gc-card [data-goto=\"2_301_5\"]')"
            ".click()")
  assert page.eval("[...document.querySelectorAll('.gc-card')]"
                   ".map(c => c.dataset.id)") == [A, "3_401_5"]
  page.screenshot(SHOTS / "pinned.png")
  _click(page, _node("3_401_5"))
  assert page.eval("[...document.querySelectorAll('.gc-card')]"
                   ".map(c => c.dataset.id)") == [A]
  page.eval("document.getElementById('gc-clear').click()")
  assert page.eval("document.querySelectorAll('.gc-card').length") == 0


def test_grouping_pinned_nodes_sums_their_edges(page, small):
  graph = make_graph()
  links = _links(graph)
  _open(page, small)
  assert page.eval("document.getElementById('gc-group').disabled")
  _click(page, _node(A))
  _click(page, _node(B))
  page.eval("document.getElementById('gc-group').click()")
  group = page.eval("document.querySelector('.gc-super').dataset.id")
  assert page.eval("document.querySelectorAll('.gc-super').length") == 1
  assert page.eval("[...document.querySelectorAll('.gc-grouped')]"
                   ".map(e => e.dataset.id).sort()") == [A, B]
  assert page.eval("document.querySelector('.gc-super text').textContent"
                   ) == "Group 1 (2)"
  # One edge from the supernode to each target, its weight the sum.
  out = {}
  for s, t, w in links:
    if s in (A, B) and t not in (A, B):
      out[t] = out.get(t, 0.0) + w
  drawn = {t: w for s, t, w in _visible_edges(page) if s == group}
  assert drawn.keys() == out.keys()
  for t, w in out.items():
    assert drawn[t] == pytest.approx(w, abs=1e-12)
  assert drawn[PARIS] == pytest.approx(0.75)
  tip = _hover(page, f"document.querySelector('.gc-edge[data-s=\"{group}\"]"
                     f"[data-t=\"{PARIS}\"]')")
  assert tip.splitlines() == ['Group 1 \u2192 Output " Paris" (p=0.400)',
                              "weight 0.75"]
  # Edges into the group are summed too (E_5 feeds both).
  into = {s: w for s, t, w in _visible_edges(page) if t == group}
  assert into["E_5"] == pytest.approx(0.5)
  # The supernode is pinned, its card lists the summed edges.
  assert page.eval("[...document.querySelectorAll('.gc-card')]"
                   ".map(c => c.dataset.id)") == [group]
  rows = {t: w for _, t, w in _rows(page, group, "gc-out")}
  assert rows[PARIS] == pytest.approx(0.75)
  assert page.eval(
      f"document.querySelector('.gc-card .gc-out tr[data-t=\"{PARIS}\"] "
      "td.gc-num').textContent") == "0.75"
  assert "members\n2: L2 #301 @5, L2 #302 @5" in page.eval(
      "document.querySelector('.gc-card').innerText")
  untouched = [l for l in links if A not in l[:2] and B not in l[:2]]
  assert len(_visible_edges(page)) == len(untouched) + len(out) + len(into)
  page.screenshot(SHOTS / "grouped.png")
  # Ungrouping gives the nodes and their own edges back.
  page.eval("document.getElementById('gc-ungroup').click()")
  assert page.eval("document.querySelectorAll('.gc-super').length") == 0
  assert page.eval("document.querySelectorAll('.gc-grouped').length") == 0
  assert sorted(_visible_edges(page)) == sorted(links)


def test_the_slider_hides_weak_edges(page, small):
  graph = make_graph()
  links = _links(graph)
  _open(page, small)
  _click(page, _node("3_401_5"))
  k = len(links) * 2 // 3
  page.eval(f"(() => {{ const s = document.getElementById('gc-threshold');"
            f" s.value = {k}; s.dispatchEvent(new Event('input')); }})()")
  thr = float(page.eval("document.getElementById('gc-threshold-text')"
                        ".dataset.threshold"))
  assert thr == sorted(abs(w) for _, _, w in links)[k]
  want = sorted(l for l in links if abs(l[2]) >= thr)
  assert sorted(_visible_edges(page)) == want
  assert page.eval("document.getElementById('gc-threshold-text')"
                   ".dataset.shown") == str(len(want))
  # The pinned card still lists every edge, the hidden ones greyed.
  below = page.eval("[...document.querySelectorAll('.gc-card .gc-below')]"
                    ".map(r => +r.dataset.w)")
  assert sorted(below) == sorted(
      w for s, t, w in links if "3_401_5" in (s, t) and abs(w) < thr)
  page.screenshot(SHOTS / "threshold.png")


def test_features_link_to_their_dashboard_pages(page, small):
  _open(page, small)
  _click(page, _node(A))
  link = page.eval("(() => { const a = document.querySelector('.gc-dash');"
                   " return [a.getAttribute('href'), a.href]; })()")
  dash = small.parent.parent / "dash"
  assert link == ["../dash/index.html#latent=301",
                  (dash / "index.html").as_uri() + "#latent=301"]
  _click(page, _node("Err_1_5"))
  assert page.eval("document.querySelectorAll('.gc-dash').length") == 1


def _site(folder, hookpoint: str, width: int, kind: str = "transcoder"):
  """A dashboard site of `width` synthetic latents reading `hookpoint`."""
  from gemscope_jax.dashboards import site as site_lib
  from test_dashboard_site import make_meta, make_record
  meta = dict(make_meta(width), hookpoint=hookpoint, kind=kind)
  return site_lib.write_site(folder, meta,
                             (make_record(i) for i in range(width)))


def _small_latents(graph, width: int = 40) -> dict:
  """The graph with every feature's latent id below `width`."""
  for n in graph["nodes"]:
    if n["feature_type"] == "cross layer transcoder":
      n["feature"] = n["feature"] % width
  return graph


def test_links_follow_what_each_site_covers(tmp_path):
  """A site's data/site.json decides the links: a single-layer site links
  only its layer's features, a CLT site numbers latents layer-major, a
  folder of per-layer sites links each layer to its own."""
  graph = _small_latents(make_graph())
  ids = [n["node_id"] for n in graph["nodes"]]
  pages = tmp_path / "pages"
  pages.mkdir()
  _site(tmp_path / "sites" / "layer_2", "layer_2/mlp_in", 40)
  _site(tmp_path / "sites" / "layer_3", "layer_3/mlp_in", 40)
  _site(tmp_path / "clt", ", ".join(f"layer_{l}/mlp_in" for l in range(4)),
        160, kind="clt")
  hrefs = lambda d: dict(zip(ids, viewer.view_model(  # noqa: E731
      graph, dashboard=d, page_dir=pages)["hrefs"]))
  one = hrefs(tmp_path / "sites" / "layer_2")
  assert one[A] == "../sites/layer_2/index.html#latent=21"
  assert one["3_401_5"] is None and one["0_101_1"] is None
  per_layer = hrefs(tmp_path / "sites")
  assert per_layer[A] == "../sites/layer_2/index.html#latent=21"
  assert per_layer["3_401_5"] == "../sites/layer_3/index.html#latent=1"
  assert per_layer["0_101_1"] is None
  clt = hrefs(tmp_path / "clt")
  assert clt[A] == f"../clt/index.html#latent={2 * 40 + 21}"
  assert clt["0_101_1"] == "../clt/index.html#latent=21"
  assert clt["3_401_5"] == f"../clt/index.html#latent={3 * 40 + 1}"
  # A mapping to a CLT site takes its offsets too.
  assert hrefs({2: tmp_path / "clt"})[A] == \
      f"../clt/index.html#latent={2 * 40 + 21}"
  _site(tmp_path / "sites" / "again", "layer_3/resid_post", 40, kind="sae")
  with pytest.raises(errors.InputError, match="two dashboard sites for "
                     "layer 3"):
    hrefs(tmp_path / "sites")


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_a_dashboard_link_opens_the_latent_page(page, tmp_path, kind):
  if kind == "clt":
    _site(tmp_path / "dash", ", ".join(f"layer_{l}/mlp_in"
                                       for l in range(4)), 160, kind="clt")
    want = 2 * 40 + 301 % 40
  else:
    _site(tmp_path / "dash", "layer_2/mlp_in", 40)
    want = 301 % 40
  graph = _small_latents(make_graph())
  out = viewer.write_html(graph, tmp_path / "g.html",
                          dashboard=tmp_path / "dash")
  _open(page, out)
  _click(page, _node(A))
  page.eval("location.href = document.querySelector('.gc-dash').href")
  page.wait("(document.getElementById('gs-latent-title') || {})"
            f".textContent === 'Latent {want}'")


def test_a_large_graph_opens_quickly(page, tmp_path):
  graph = make_large_graph()
  assert len(graph["nodes"]) == 500 and len(graph["links"]) == 5000
  t = time.perf_counter()
  out = viewer.write_html(graph, tmp_path / "large.html")
  written = time.perf_counter() - t
  t = time.perf_counter()
  _open(page, out)
  opened = time.perf_counter() - t
  drawn = page.eval("GEMSCOPE_CIRCUIT.readyMs") / 1000
  threshold = viewer.read_html(out, "view")["threshold"]
  links = _links(graph)
  assert page.eval("document.querySelectorAll('.gc-node').length") == 500
  assert page.eval("document.querySelectorAll('.gc-edge').length") == 5000
  visible = _visible_edges(page)
  assert sorted(visible) == sorted(l for l in links if abs(l[2]) >= threshold)
  assert len(visible) == viewer.DEFAULT_EDGES
  page.screenshot(SHOTS / "large.png")
  # Interaction stays quick: pin the busiest node, group two, unpin.
  busiest = max(graph["nodes"], key=lambda n: sum(
      n["node_id"] in (s, t) for s, t, _ in links))["node_id"]
  t = time.perf_counter()
  _click(page, _node(busiest))
  pinned = time.perf_counter() - t
  assert len(_rows(page, busiest, "gc-in")) + len(
      _rows(page, busiest, "gc-out")) == sum(
          busiest in (s, t) for s, t, _ in links)
  page.screenshot(SHOTS / "large-pinned.png")
  others = [n["node_id"] for n in graph["nodes"]
            if n["feature_type"] == "cross layer transcoder"][:1]
  _click(page, _node(others[0]))
  t = time.perf_counter()
  page.eval("document.getElementById('gc-group').click()")
  grouped = time.perf_counter() - t
  assert page.eval("document.querySelectorAll('.gc-super').length") == 1
  print(f"\n500 nodes, 5000 edges: written in {written:.2f} s, "
        f"{out.stat().st_size / 1e6:.2f} MB; drawn {drawn:.2f} s after the "
        f"script started ({opened:.2f} s from navigation seen from here); "
        f"pin {pinned:.2f} s, group {grouped:.2f} s")
  assert drawn < 2.0 and opened < 6.0 and pinned < 2.0 and grouped < 2.0


# Of the token labels horizontally in view (right of the row labels), how
# many are hidden: below or above the graph box, or under something else.
_TOKENS_HIDDEN = """(() => {
  const box = document.getElementById('gc-graph').getBoundingClientRect();
  const shown = [...document.querySelectorAll('.gc-token')].filter(t => {
    const r = t.getBoundingClientRect(), x = r.x + r.width / 2;
    return x > box.left + 60 && x < box.right - 10;
  });
  if (!shown.length) throw new Error('no token label in view');
  return shown.filter(t => {
    const r = t.getBoundingClientRect();
    const x = r.x + r.width / 2, y = r.y + r.height / 2;
    return !(r.top >= box.top && r.bottom <= box.bottom
             && document.elementFromPoint(x, y) === t);
  }).length;
})()"""


def test_a_tall_graph_fits_and_keeps_its_tokens_in_sight(page, tmp_path):
  """All 18 layers of a tall graph fit a 1000-px window without
  scrolling, no two nodes of a column overlapping; in a window too short
  for that, the graph scrolls and the token axis stays at the bottom of
  what is shown, scrolled to the top or not."""
  # As the real CLT graph of "The capital of France is" is: 26 features
  # in each of layers 1-8 at the last position (three lines a cell).
  graph = make_large_graph(n_nodes=120, n_links=600, positions=6)
  for layer in range(1, 9):
    for latent in range(26):
      graph["nodes"].append({
          "node_id": feature_id(layer, 20000 + latent, 5), "feature": latent,
          "layer": layer, "ctx_idx": 5,
          "feature_type": "cross layer transcoder", "token_prob": 0.0,
          "is_target_logit": False, "influence": 0.5, "activation": 1.0,
          "clerp": ""})
  rows = viewer.view_model(graph)["rows"]
  assert len(rows) == 20 and sum(r["lines"] for r in rows) >= 34
  out = viewer.write_html(graph, tmp_path / "tall.html")
  _open(page, out)
  box = "document.getElementById('gc-graph')"
  height = "+document.getElementById('gc-svg').getAttribute('height')"
  assert page.eval(height) <= page.eval(f"{box}.clientHeight")
  assert page.eval(f"{box}.scrollHeight <= {box}.clientHeight")
  closest = page.eval("""(() => {
    const by = new Map();
    for (const e of document.querySelectorAll('.gc-node')) {
      const r = e.getBoundingClientRect(), x = Math.round(r.x + r.width / 2);
      if (!by.has(x)) by.set(x, []);
      by.get(x).push([r.top, r.bottom]);
    }
    let gap = Infinity;
    for (const v of by.values()) {
      v.sort((a, b) => a[0] - b[0]);
      for (let i = 1; i < v.length; i++) gap = Math.min(gap, v[i][0] - v[i - 1][1]);
    }
    return gap;
  })()""")
  assert closest >= 0
  assert page.eval(_TOKENS_HIDDEN) == 0
  page.screenshot(SHOTS / "tall.png")
  try:
    page.call("Emulation.setDeviceMetricsOverride", session=True,
              width=page.width, height=520, deviceScaleFactor=1,
              mobile=False)
    page.wait(f"{height} > {box}.clientHeight + 100")
    for top in (0, 10**6, 137):
      page.eval(f"{box}.scrollTop = {top}")
      page.wait("document.querySelector('.gc-tokens').getAttribute("
                "'transform') === 'translate(0 ' + Math.min(0, "
                f"{box}.scrollTop + {box}.clientHeight - {height}) + ')'")
      assert page.eval(_TOKENS_HIDDEN) == 0, top
    page.screenshot(SHOTS / "tall-scrolled.png")
  finally:
    page.call("Emulation.setDeviceMetricsOverride", session=True,
              width=page.width, height=page.height, deviceScaleFactor=1,
              mobile=False)


def test_the_engines_json_opens(page, tmp_path):
  """A small graph as circuits.to_json writes it (layers as strings,
  error ids ERR_L_p, extra fields) draws every kept node and edge."""
  np = pytest.importorskip("numpy")
  from gemscope_jax import circuits
  from gemscope_jax.circuits import _graph
  rng = np.random.default_rng(0)
  T, L = 4, 2
  feats = [(0, 7, 1), (0, 9, 3), (1, 3, 2), (1, 5, 3), (1, 8, 3)]
  kind = [_graph.FEATURE] * len(feats) + [_graph.ERROR] * (L * T) + \
      [_graph.TOKEN] * T + [_graph.LOGIT] * 2
  layer = [f[0] for f in feats] + [l for l in range(L) for _ in range(T)] \
      + [-1] * T + [L] * 2
  position = [f[2] for f in feats] + [p for _ in range(L) for p in range(T)] \
      + list(range(T)) + [T - 1] * 2
  latent = [f[1] for f in feats] + [-1] * (L * T) + [2, 11, 12, 13] + [40, 41]
  n = len(kind)
  kind_a = np.array(kind, np.int8)
  adj = rng.normal(size=(n, n)).astype(np.float32)
  adj[kind_a == _graph.TOKEN] = 0
  adj[kind_a == _graph.ERROR] = 0
  adj[:, kind_a == _graph.LOGIT] = 0
  layer_a = np.array(layer, np.int32)
  adj[layer_a[:, None] <= layer_a[None, :]] = 0   # sources lower only
  graph = _graph.Graph(
      tokens=np.array([2, 11, 12, 13], np.int32), kind=kind_a, layer=layer_a,
      position=np.array(position, np.int32),
      latent=np.array(latent, np.int32),
      activation=np.abs(rng.normal(size=n)).astype(np.float32),
      value=rng.normal(size=n).astype(np.float32),
      bias=np.zeros(n, np.float32), adjacency=adj,
      logit_tokens=np.array([40, 41], np.int32),
      logit_probabilities=np.array([0.6, 0.3], np.float32),
      prompt="<bos> a b c", token_strings=["<bos>", "\u2581a", "\u2581b",
                                           "\u2581c"],
      metadata={"num_layers": L, "dictionaries": "transcoders"})
  data = circuits.to_json(graph, slug="tiny")
  out = circuits.write_html(data, tmp_path / "tiny.html",
                            dashboard=tmp_path / "dash")
  assert same(circuits.read_html(out), data)
  _open(page, out)
  assert sorted(page.eval("[...document.querySelectorAll('.gc-node')]"
                          ".map(e => e.dataset.id)")) == sorted(
      n["node_id"] for n in data["nodes"])
  assert sorted(_visible_edges(page)) == sorted(_links(data))
  assert page.eval("[...document.querySelectorAll('.gc-row-label')]"
                   ".map(e => e.textContent)") == ["Emb", "L0", "L1", "Logit"]
  feature = next(n for n in data["nodes"]
                 if n["feature_type"] == "cross layer transcoder")
  _click(page, _node(feature["node_id"]))
  assert page.eval("document.querySelector('.gc-dash').getAttribute('href')"
                   ) == f"dash/index.html#latent={feature['feature']}"
  page.screenshot(SHOTS / "engine-json.png")


def test_a_resized_window_lays_the_graph_out_again(page, small):
  _open(page, small)
  _click(page, _node(A))
  _click(page, _node(B))
  page.eval("document.getElementById('gc-group').click()")
  wide = page.eval("+document.getElementById('gc-svg').getAttribute('width')")
  try:
    page.call("Emulation.setDeviceMetricsOverride", session=True, width=900,
              height=700, deviceScaleFactor=1, mobile=False)
    page.wait("+document.getElementById('gc-svg').getAttribute('width') < "
              f"{wide}")
    page.wait("document.querySelectorAll('.gc-super').length === 1")
    group = page.eval("document.querySelector('.gc-super').dataset.id")
    drawn = {t: w for s, t, w in _visible_edges(page) if s == group}
    assert drawn[PARIS] == pytest.approx(0.75)
    assert page.eval("[...document.querySelectorAll('.gc-card')]"
                     ".map(c => c.dataset.id)") == [group]
    # The supernode is drawn between its members' new places (hidden,
    # so read in the drawing's own coordinates).
    x, w = page.eval("(() => { const r = document.querySelector("
                     "'.gc-super rect'); return [+r.getAttribute('x'),"
                     " +r.getAttribute('width')]; })()")
    xs = page.eval(f"[{_node(A)}, {_node(B)}].map(e => +e.getAttribute('cx'))")
    assert x + w / 2 == pytest.approx(sum(xs) / 2)
    assert max(xs) < 900
    page.screenshot(SHOTS / "resized.png")
  finally:
    page.call("Emulation.setDeviceMetricsOverride", session=True,
              width=page.width, height=page.height, deviceScaleFactor=1,
              mobile=False)


def test_a_graph_without_links_or_tokens_opens(page, tmp_path):
  graph = {"metadata": {}, "qParams": {}, "links": [],
           "nodes": [{"node_id": "a", "feature": 1, "layer": 0, "ctx_idx": 0,
                      "feature_type": "cross layer transcoder"},
                     {"node_id": "b", "feature": None, "layer": 1,
                      "ctx_idx": 2,
                      "feature_type": "mlp reconstruction error"}]}
  view = viewer.view_model(graph)
  assert [c["token"] for c in view["columns"]] == ["", "", ""]
  assert view["threshold"] == 0.0 and view["max_weight"] == 0.0
  out = viewer.write_html(graph, tmp_path / "bare.html")
  _open(page, out)
  assert page.eval("document.querySelectorAll('.gc-node').length") == 2
  assert page.eval("document.getElementById('gc-threshold').disabled")
  _click(page, _node("a"))
  assert "Incoming (0)" in page.eval("document.getElementById('gc-panel')"
                                     ".innerText")
