"""The dashboard site: its data model in Python, then the real page in
headless Chromium.

The data model (index rows, paging, snippets, the atomic write) is tested
on synthetic records of `records.py`'s schema. The page is opened from
file:// in Chromium, driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: JSON messages ended by NUL on file descriptors
3 and 4, standard library only, no port and no driver package). Browser
tests skip, saying so, where no Chromium is installed (scripts/setup.sh
installs Debian's `chromium` where it can).

Screenshots of every page go to $GEMSCOPE_SCREENSHOTS, else
/tmp/gemscope-dashboard-screenshots (printed), to be looked at.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from chromium import SKIP_REASON, Chromium, find_binary
from gemscope_jax import errors, safe_write
from gemscope_jax.dashboards import notebook, server
from gemscope_jax.dashboards import site as site_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHOTS = pathlib.Path(os.environ.get("GEMSCOPE_SCREENSHOTS") or (
    pathlib.Path(tempfile.gettempdir()) / "gemscope-dashboard-screenshots"))

# ------------------------------------------------------------ synthetic data

WORDS = ["the", " cat", " sat", " on", " a", " mat", ".", "\n", " and",
         " then", " it", " ran", " far", " away", " from", " home"]
WIDTH = 40
DEAD = {3, 17, 30}
TOP_MAX_ID = 21            # the latent with the largest max
ZEBRA_ID = 9               # " zebra" is among its top tokens
QUOKKA_ID = 26             # " quokka" is in its top example's text


def _example(rng_seed: int, value: float, n: int = 16, peak: int = 11,
             extra: str | None = None) -> dict:
  tokens = [WORDS[(rng_seed * 7 + 3 * i) % len(WORDS)] for i in range(n)]
  if extra:
    tokens[peak] = extra
  acts = [0.0] * n
  acts[peak] = value
  acts[peak - 1] = round(value * 0.4, 4)
  acts[min(n - 1, peak + 1)] = round(value * 0.1, 4)
  return {"window": rng_seed, "pos": peak, "value": value, "tokens": tokens,
          "acts": acts, "peak": peak}


def make_record(i: int, *, k: int = 5, bins: int = 3, per_bin: int = 2,
                tokens: int = 16) -> dict:
  """A record as records.py makes it; latent i's max is 1 + i/4 (rounded),
  except TOP_MAX_ID's (123.456); DEAD ids never fired."""
  dead = i in DEAD
  mx = 0.0 if dead else (123.456 if i == TOP_MAX_ID else round(1 + i / 4, 3))
  density = 0.0 if dead else round(0.0005 * (1 + (i * 37) % WIDTH), 6)
  mean = 0.0 if dead else round(mx / 3, 4)
  extra = " quokka" if i == QUOKKA_ID else None
  top = [] if dead else [
      _example(i + j, round(mx * (1 - j / (2 * k)), 4), n=tokens,
               peak=min(11, tokens - 1), extra=extra if j == 0 else None)
      for j in range(k)]
  quantiles = [] if dead else [
      {"lo": round(mx * b / bins, 4), "hi": round(mx * (b + 1) / bins, 4),
       "count": 10 * (bins - b),
       "examples": [_example(100 + i + b * per_bin + e,
                             round(mx * (b + 0.5) / bins, 4), n=tokens,
                             peak=min(11, tokens - 1))
                    for e in range(per_bin)]}
      for b in range(bins)]
  # As scan.py bins: 0, then log-spaced from max / 1000 to max.
  edges = [] if dead else [0.0] + [
      float(f"{mx * 10 ** (3 * (e / 19 - 1)):.6g}") for e in range(20)]
  counts = [] if dead else [max(0, 50 - 3 * e + (i % 5)) for e in range(20)]
  top_tokens = [] if dead else (
      [" zebra" if i == ZEBRA_ID else WORDS[(i + t) % len(WORDS)]
       for t in range(6)])
  record = {
      "id": i, "dead": dead, "count": int(density * 20000), "density": density,
      "mean": mean, "max": mx, "top": top, "quantiles": quantiles,
      "histogram": {"edges": edges, "counts": counts},
      "logit_lens": {"top": [[f" up{i}_{t}", round(2.5 - t * 0.2, 3)]
                             for t in range(10)],
                     "bottom": [[f" down{i}_{t}", round(-2.5 + t * 0.2, 3)]
                                for t in range(10)]},
      "neighbours": [[(i + d) % WIDTH, round(0.9 - d / 10, 3)]
                     for d in (1, 2, 3)],
      "input_neighbours": [[(i + 5) % WIDTH, 0.5]],
      "top_tokens": top_tokens,
  }
  if i % 4 == 1:  # as an SAE's records: no input-side neighbours at all
    del record["input_neighbours"]
  return record


def make_meta(width: int = WIDTH) -> dict:
  return {"title": "Synthetic dashboard", "model": "gemma-3-270m",
          "hookpoint": "layer_6/resid_post", "kind": "jumprelu",
          "width": width, "num_tokens": 20000, "num_windows": 160,
          "seq_len": 128, "k": 5, "quantile_bins": 3, "per_bin": 2,
          "text_source": "synthetic", "created": "2026-01-01T00:00:00Z",
          "lens": "decoder row x final norm scale x unembedding (W_U)"}


def fmt(x: float) -> str:
  """The page's number format (app.js fmt), for values in [0.001, 1e4)."""
  if x == 0:
    return "0"
  assert 1e-3 <= abs(x) < 1e4
  text = f"{float(f'{x:.4g}'):.10f}".rstrip("0").rstrip(".")
  return text


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("dash") / "site"
  records = (make_record(i) for i in range(WIDTH))
  # Small pages and files, so paging and chunking are exercised.
  site_lib.write_site(out, make_meta(), records, per_file=8, page_size=16)
  return out


# ---------------------------------------------------------------- data model


def test_layout_and_files(site):
  info = site_lib.read_site(site)
  assert info["meta"] == make_meta()
  layout = info["layout"]
  assert layout["pages"] == 3 and layout["page_size"] == 16
  assert layout["per_file"] == 8 and layout["chunks"] == [[0, 4]]
  assert info["stats"] == {"latents": WIDTH, "dead": len(DEAD),
                           "max": 123.456, "first_id": 0,
                           "last_id": WIDTH - 1}
  assert sorted(p.name for p in site.iterdir()) == [
      "app.js", "data", "index.html", "style.css"]
  assert sorted(p.name for p in (site / "data" / "index").iterdir()) == [
      "0000.js", "0001.js", "0002.js"]
  assert len(list((site / "data" / "latents").iterdir())) == WIDTH // 8
  # The data are scripts calling the registration functions.
  text = (site / "data" / "latents" / "00001.js").read_text()
  assert text.startswith("GEMSCOPE.latents(1,[")
  assert (site / "data" / "site.js").read_text().startswith("GEMSCOPE.site(")


def test_index_rows_equal_the_records(site):
  rows = list(site_lib.read_index(site))
  assert [r["id"] for r in rows] == list(range(WIDTH))
  for row in rows:
    rec = make_record(row["id"])
    for key in ("dead", "count", "density", "max", "mean"):
      assert row[key] == rec[key], (row["id"], key)
    assert row["top_tokens"] == rec["top_tokens"][:site_lib.INDEX_TOP_TOKENS]
    assert row["lens"] == [t for t, _ in rec["logit_lens"]["top"][:3]]
    assert row["snippet"] == site_lib.snippet(rec["top"][0] if rec["top"]
                                              else None)
  assert " quokka " in rows[QUOKKA_ID]["snippet"]


def test_latent_records_round_trip(site):
  for i in (0, 7, 8, 3, WIDTH - 1):
    assert site_lib.read_latent(site, i) == make_record(i)
  with pytest.raises(errors.InputError, match="no record of latent 999"):
    site_lib.read_latent(site, 999)


def test_snippet_cuts_around_the_peak():
  ex = {"tokens": [f"\u2581w{i}" for i in range(40)] + ["\n", "end"],
        "peak": 30, "acts": [0.0] * 42}
  text = site_lib.snippet(ex)
  assert text.startswith("\u2026") and "w30" in text and "w34" in text
  assert "w19" not in text and "w35" not in text
  assert text == "\u2026" + " ".join(f"w{i}" for i in range(20, 35))
  long = {"tokens": ["x" * 50] * 12, "peak": 11}
  cut = site_lib.snippet(long)
  assert len(cut) == site_lib.SNIPPET_CHARS and cut.endswith("x")
  assert site_lib.snippet(None) == "" and site_lib.snippet({"tokens": []}) == ""
  assert site_lib.display_token("\u2581a\nb") == " a\u21b5b"


def test_sparse_ids_and_an_empty_site(tmp_path):
  ids = [2, 3, 40, 41, 1000]
  site_lib.write_site(tmp_path / "s", make_meta(2000),
                      (dict(make_record(i % WIDTH), id=i) for i in ids),
                      per_file=8, page_size=2)
  assert [r["id"] for r in site_lib.read_index(tmp_path / "s")] == ids
  assert site_lib.read_latent(tmp_path / "s", 1000)["id"] == 1000
  names = sorted(p.name for p in (tmp_path / "s/data/latents").iterdir())
  assert names == ["00000.js", "00005.js", "00125.js"]
  assert site_lib.read_site(tmp_path / "s")["layout"]["chunks"] == [
      [0, 0], [5, 5], [125, 125]]
  site_lib.write_site(tmp_path / "e", make_meta(0), iter(()))
  assert list(site_lib.read_index(tmp_path / "e")) == []
  assert site_lib.read_site(tmp_path / "e")["stats"]["latents"] == 0


def test_bad_records_are_refused_and_leave_nothing(tmp_path):
  out = tmp_path / "s"
  with pytest.raises(errors.InputError, match="ascending id order"):
    site_lib.write_site(out, make_meta(), [make_record(2), make_record(1)])
  with pytest.raises(errors.InputError, match="missing max"):
    rec = make_record(1)
    del rec["max"]
    site_lib.write_site(out, make_meta(), [rec])
  with pytest.raises(errors.InputError, match="id must be an int"):
    site_lib.write_site(out, make_meta(), [dict(make_record(1), id="1")])
  assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
  out = tmp_path / "s"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  consumed = []

  def records():
    for i in range(4):
      consumed.append(i)
      yield make_record(i)

  with pytest.raises(errors.OutputError, match="not empty.*overwrite=True"):
    site_lib.write_site(out, make_meta(), records())
  assert consumed == []  # refused before reading any record
  site_lib.write_site(out, make_meta(), records(), overwrite=True)
  assert (out / "notes.txt").read_text() == "mine"
  assert [r["id"] for r in site_lib.read_index(out)] == [0, 1, 2, 3]
  # A rewrite replaces the data wholesale (no stale chunk of the old one).
  site_lib.write_site(out, make_meta(), [make_record(30)], overwrite=True,
                      per_file=4)
  assert sorted(p.name for p in (out / "data/latents").iterdir()) == [
      "00007.js"]
  assert (out / "notes.txt").exists()
  # An empty folder is filled without overwrite.
  (tmp_path / "empty").mkdir()
  site_lib.write_site(tmp_path / "empty", make_meta(), [make_record(0)])
  assert (tmp_path / "empty" / "index.html").is_file()


_KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_dashboard_site import make_meta, make_record
from gemscope_jax.dashboards import site
def records():
  for i in range(40):
    if i == {kill_at}:
      os.kill(os.getpid(), signal.SIGKILL)
    yield make_record(i)
site.write_site({out!r}, make_meta(), records(), per_file=4)
"""


@pytest.mark.parametrize("when", ["midway", "before_rename"])
def test_a_killed_writer_leaves_no_complete_looking_site(tmp_path, when):
  out = tmp_path / "site"
  env = dict(os.environ)
  kill_at = 25 if when == "midway" else -1
  if when == "before_rename":
    env[safe_write._KILL_ENV] = out.name
  code = _KILLED_WRITER.format(tests=str(ROOT / "tests"), kill_at=kill_at,
                               out=str(out))
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
  assert not out.exists()
  left = list(tmp_path.iterdir())
  assert len(left) == 1 and left[0].name.startswith(".site.gemscope-")
  assert left[0].name.endswith(".partial")
  # The next writer removes the dead one's temporary.
  site_lib.write_site(out, make_meta(), (make_record(i) for i in range(3)))
  assert [p.name for p in tmp_path.iterdir()] == ["site"]


def test_show_is_self_contained(site):
  shown = notebook.show(site, latent=TOP_MAX_ID)
  page = shown._repr_html_()
  assert "<script src" not in page and "<link" not in page
  assert ".gemscope" in page and "GEMSCOPE.inline" in page
  assert "123.456" in page and "latent 21" in repr(shown)
  rec = make_record(5)
  rec["top"][0]["tokens"][0] = "</script><b>"
  page = notebook.show(rec, meta=make_meta())._repr_html_()
  assert "</script><b>" not in page  # escaped inside the script's JSON
  assert repr(notebook.show(site)).startswith(f"{WIDTH} latents")
  with pytest.raises(errors.UsageError, match="latent=4"):
    notebook.show(rec, latent=4)
  with pytest.raises(errors.MissingInputError, match="not a dashboard site"):
    notebook.show(site / "data", latent=1)


def test_serve_serves_the_site(site):
  with server.serve(site, port=0, block=False) as srv:
    with urllib.request.urlopen(srv.url + "index.html", timeout=10) as r:
      assert b"app.js" in r.read()
    with urllib.request.urlopen(srv.url + "data/site.json", timeout=10) as r:
      assert json.loads(r.read())["stats"]["latents"] == WIDTH
      assert r.headers["Content-Type"].startswith("application/json")
  with pytest.raises(errors.MissingInputError, match="not a dashboard site"):
    server.serve(site / "data", block=False)


# ------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  binary = find_binary()
  if binary is None:
    pytest.skip(SKIP_REASON)
  b = Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))
  print(f"\nscreenshots: {SHOTS}")
  yield b
  b.close()


@pytest.fixture
def page(browser):
  browser.errors.clear()
  yield browser
  assert browser.errors == [], "console errors:\n" + "\n".join(browser.errors)


def _ids(b: Chromium) -> list[int]:
  return b.eval("[...document.querySelectorAll('#gs-table tbody tr')]"
                ".map(r => +r.dataset.id)")


def _index(b: Chromium, site: pathlib.Path, hash_: str = "") -> None:
  b.open((site / "index.html").as_uri() + hash_)
  b.wait("(document.getElementById('gs-status') || {dataset: {}})"
         ".dataset.loaded === 'all'")


def _type(b: Chromium, element_id: str, value: str) -> None:
  """Sets an input as typing would (an input event)."""
  b.eval(f"(() => {{ const e = document.getElementById({element_id!r});"
         f" e.value = {value!r}; e.dispatchEvent(new Event('input'));"
         f" e.dispatchEvent(new Event('change')); }})()")


def test_index_lists_sorts_filters_and_searches(page, site):
  _index(page, site)
  assert _ids(page) == list(range(WIDTH))
  assert page.eval("document.querySelector('.gs-meta').textContent") == (
      "model gemma-3-270m \u00b7 hookpoint layer_6/resid_post \u00b7 jumprelu"
      " \u00b7 width 40 \u00b7 20,000 tokens scanned (160 windows of 128)"
      " \u00b7 3 dead of 40")
  page.screenshot(SHOTS / "index.png")
  # Sorting by max (a click on its column): the synthetic max first.
  page.eval("document.querySelector('th[data-sort=max]').click()")
  ids = _ids(page)
  assert ids[0] == TOP_MAX_ID
  maxes = [make_record(i)["max"] for i in ids]
  assert maxes == sorted(maxes, reverse=True)
  assert page.eval("document.querySelector('#gs-table tbody tr td.gs-max')"
                   ".textContent") == fmt(123.456) == "123.5"
  page.eval("document.querySelector('th[data-sort=max]').click()")  # asc
  assert _ids(page)[-1] == TOP_MAX_ID
  page.eval("document.querySelector('th[data-sort=density]').click()")
  dens = [make_record(i)["density"] for i in _ids(page)]
  assert dens == sorted(dens, reverse=True)
  # Hide dead, then a density range in percent.
  page.eval("document.getElementById('gs-live').click()")
  assert set(_ids(page)) == set(range(WIDTH)) - DEAD
  _type(page, "gs-dmin", "1")
  _type(page, "gs-dmax", "1.5")
  want = {i for i in range(WIDTH) if i not in DEAD
          and 1 <= make_record(i)["density"] * 100 <= 1.5}
  assert want and set(_ids(page)) == want
  page.screenshot(SHOTS / "index-filtered.png")
  # Search over top tokens, then over example text.
  _index(page, site)
  _type(page, "gs-search", "ZEBRA")
  assert _ids(page) == [ZEBRA_ID]
  _type(page, "gs-search", "quokka")
  assert _ids(page) == [QUOKKA_ID]
  assert page.eval("document.getElementById('gs-status').dataset.count") == "1"
  page.screenshot(SHOTS / "index-search.png")
  # The state is in the hash: a link reopens the same view.
  _index(page, site, "#sort=max&dir=desc&live=1")
  assert _ids(page)[0] == TOP_MAX_ID and not set(_ids(page)) & DEAD


def test_index_paging(page, tmp_path):
  out = tmp_path / "wide"
  site_lib.write_site(out, make_meta(250),
                      (dict(make_record(i % WIDTH), id=i) for i in range(250)),
                      page_size=64)
  _index(page, out)
  assert _ids(page) == list(range(100))
  page.eval("document.getElementById('gs-next').click()")
  assert _ids(page) == list(range(100, 200))
  page.eval("document.getElementById('gs-next').click()")
  assert _ids(page) == list(range(200, 250))
  assert page.eval("document.getElementById('gs-next').disabled")


def test_latent_page(page, site):
  _index(page, site)
  page.eval(f"document.querySelector('tr[data-id=\"{TOP_MAX_ID}\"] a')"
            ".click()")
  page.wait("document.getElementById('gs-latent-title')")
  rec = make_record(TOP_MAX_ID)
  assert page.eval("document.getElementById('gs-latent-title').textContent"
                   ) == f"Latent {TOP_MAX_ID}"
  assert page.eval("document.getElementById('gs-stat-max').textContent"
                   ) == fmt(rec["max"])
  first = page.eval("document.querySelector('#gs-top .gs-tokens')"
                    ".textContent")
  assert first == "".join(rec["top"][0]["tokens"]).replace("\n", "\u21b5")
  peak = page.eval("(() => { const p = document.querySelector("
                   "'#gs-top .gs-peak'); return [p.textContent, p.title,"
                   " getComputedStyle(p).backgroundColor]; })()")
  ex = rec["top"][0]
  assert peak[0] == ex["tokens"][ex["peak"]]
  assert peak[1] == json.dumps(ex["tokens"][ex["peak"]]) + ": " + fmt(
      ex["value"])
  assert peak[2] == "rgba(255, 120, 0, 0.9)"  # the latent's max: full shade
  assert page.eval("document.querySelectorAll('.gs-quantile').length") == 3
  assert page.eval("document.querySelectorAll('.gs-hist rect').length") == 20
  assert page.eval("document.querySelectorAll('.gs-lens-chart').length") == 2
  assert page.eval("[...document.querySelectorAll('.gs-pos .gs-lens-token')]"
                   ".map(t => t.textContent)") == [
      t for t, _ in rec["logit_lens"]["top"]]
  assert "decoder row x final norm" in page.eval("document.body.textContent")
  assert not page.eval("document.getElementById('gs-dead')")
  page.screenshot(SHOTS / "latent.png")
  # Neighbours link to their latents.
  n = rec["neighbours"][0][0]
  page.eval(f"document.querySelector('.gs-neighbours a[href=\"#latent={n}\"]')"
            ".click()")
  page.wait(f"(document.getElementById('gs-latent-title') || {{}})"
            f".textContent === 'Latent {n}'")
  # Back to the index.
  page.eval("document.getElementById('gs-back').click()")
  page.wait("document.querySelectorAll('#gs-table tbody tr').length > 0")


def test_dead_and_missing_latents(page, site):
  page.open((site / "index.html").as_uri() + "#latent=3")
  page.wait("document.getElementById('gs-latent-title')")
  assert page.eval("document.getElementById('gs-dead').textContent") == (
      "Dead latent: it never fired on the 20,000 tokens scanned.")
  assert page.eval("document.querySelectorAll('.gs-context').length") == 0
  page.screenshot(SHOTS / "latent-dead.png")
  page.eval("location.hash = '#latent=4000'")
  page.wait("document.querySelector('.gs-missing')")
  assert "no record of latent 4000" in page.eval(
      "document.querySelector('.gs-missing').textContent")
  # The header's box goes to a latent; the back link to the index, which
  # loads then (the page was opened on a latent).
  page.eval("document.getElementById('gs-go').value = '5';"
            "document.querySelector('.gs-go').requestSubmit()")
  page.wait("(document.getElementById('gs-latent-title') || {})"
            ".textContent === 'Latent 5'")
  page.eval("document.getElementById('gs-back').click()")
  page.wait("(document.getElementById('gs-status') || {dataset: {}})"
            ".dataset.loaded === 'all'")
  assert _ids(page) == list(range(WIDTH))


def test_show_renders_in_a_browser(page, site, tmp_path):
  path = notebook.show(site, latent=ZEBRA_ID).save(tmp_path / "one.html")
  page.open(path.as_uri())
  page.wait("document.getElementById('gs-stat-max')")
  assert page.eval("document.getElementById('gs-stat-max').textContent") == \
      fmt(make_record(ZEBRA_ID)["max"])
  # Styled by the inlined style.css: orange bars, shaded tokens.
  assert page.eval("getComputedStyle(document.querySelector('.gs-hist rect'))"
                   ".fill") == "rgb(255, 120, 0)"
  page.screenshot(SHOTS / "show-latent.png")
  path = notebook.show(site).save(tmp_path / "index.html")
  page.open(path.as_uri())
  page.wait("document.querySelectorAll('.gs-table tbody tr').length")
  assert page.eval("document.querySelectorAll('.gs-table tbody tr').length"
                   ) == WIDTH


def test_served_site_opens(page, site):
  with server.serve(site, block=False) as srv:
    page.open(srv.url + "index.html#sort=max")
    page.wait("(document.getElementById('gs-status') || {dataset: {}})"
              ".dataset.loaded === 'all'")
    assert _ids(page)[0] == TOP_MAX_ID


def test_a_wide_site_opens_quickly(page, tmp_path):
  width = 16384
  out = tmp_path / "wide"
  t = time.perf_counter()
  site_lib.write_site(out, make_meta(width), (
      make_record(i, k=2, bins=2, per_bin=1, tokens=12) for i in range(width)))
  written = time.perf_counter() - t
  t = time.perf_counter()
  page.open((out / "index.html").as_uri(), wait_load=False)
  page.wait("document.querySelectorAll('#gs-table tbody tr').length === 100")
  first = time.perf_counter() - t
  first_page = page.eval("GEMSCOPE.firstRowsMs") / 1000  # the page's clock
  page.wait("document.getElementById('gs-status').dataset.loaded === 'all'",
            timeout=60)
  every = time.perf_counter() - t
  page.eval("document.querySelector('th[data-sort=max]').click()")
  assert _ids(page)[0] == width - 1  # max 1 + id/4 grows with the id
  sorted_at = time.perf_counter() - t
  print(f"\n16k-wide site: written in {written:.1f} s; first rows drawn "
        f"{first_page:.2f} s after navigation ({first:.2f} s seen from here), "
        f"all {width} rows {every:.2f} s, sorted by max {sorted_at:.2f} s")
  page.screenshot(SHOTS / "index-16k.png")
  assert first < 5.0 and first_page < 3.0
  assert page.eval("document.getElementById('gs-status').dataset.count") \
      == str(width)


def test_records_as_records_py_writes_them(page, tmp_path):
  """Special and empty tokens (byte pieces of one character), a NaN mean,
  HTML in token text: shown as text, no errors."""
  live = make_record(0)
  ex = live["top"][0]
  ex["tokens"][:6] = ["<bos>", "<b>bold</b>", " caf", "", "\u00e9", "\n"]
  dead = dict(make_record(3), id=1, mean=float("nan"))
  out = tmp_path / "odd"
  site_lib.write_site(out, make_meta(2), [live, dead])
  assert math.isnan(site_lib.read_latent(out, 1)["mean"])
  _index(page, out)
  assert _ids(page) == [0, 1]
  assert page.eval("document.querySelector('tr[data-id=\"1\"] td:nth-child(4)')"
                   ".textContent") == "\u2013"
  page.eval("location.hash = '#latent=0'")
  page.wait("document.getElementById('gs-latent-title')")
  text = page.eval("document.querySelector('#gs-top .gs-tokens').textContent")
  assert text.startswith("<bos><b>bold</b> caf\u00e9\u21b5")
  assert page.eval("document.querySelectorAll('#gs-top b').length") == 0
  page.eval("location.hash = '#latent=1'")
  page.wait("document.getElementById('gs-dead')")
  assert page.eval("document.getElementById('gs-stat-mean').textContent") \
      == "\u2013"
