"""The static dashboard site: latent records written as pages that open
from `file://` with no network and no server.

`write_site(out, meta, latents)` streams records (as `records.py` makes
them, ascending latent id) into a folder:

  index.html, app.js, style.css   the page (from `static/`, one page with
                                  hash routing: `#latent=12`, `#sort=max`)
  data/site.js                    GEMSCOPE.site({meta, layout, stats})
  data/site.json                  the same object, for other tools
  data/index/0000.js              GEMSCOPE.index(0, [[row], ...]): one row
                                  per latent, `INDEX_COLUMNS`, `page_size`
                                  latents a page, in id order
  data/latents/00012.js           GEMSCOPE.latents(12, [record, ...]): the
                                  full records of ids 12*per_file ...
                                  (13*per_file - 1) that exist (the
                                  layout's `chunks` lists the files as
                                  [first, last] runs, so the page never
                                  asks for a missing one)

Data are JavaScript files that call a registration function, not JSON
fetched by the page: Chromium refuses fetch()/XHR of `file://` URLs, but
loads `<script src>` from them. Each file is `GEMSCOPE.<kind>(<n>,` JSON
`);`, so `read_index` / `read_latent` parse them back without a browser.

Caveats: memory holds one chunk of `per_file` records and one index page,
never the whole width. Records must come in ascending id order (ids may
skip, e.g. a subset of latents). Floats are written as Python writes them
(NaN stays NaN, which JavaScript reads but strict JSON readers refuse).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
from typing import Any, Iterable, Iterator

from gemscope_jax import errors, safe_write

STATIC = pathlib.Path(__file__).resolve().parent / "static"
# The page itself, copied from the package into every site.
PAGE_FILES = ("index.html", "app.js", "style.css")
# What a site writer owns in its folder (replaced with overwrite=True).
OWNS = PAGE_FILES + ("data",)

PAGE_SIZE = 4096  # latents per index page: one page renders the first view
PER_FILE = 32     # records per latent data file (one file loads per latent)

# One index row per latent, as a list in this order (the page reads the
# names from data/site.js, so a column can be added without breaking it).
INDEX_COLUMNS = ("id", "dead", "count", "density", "max", "mean",
                 "top_tokens", "lens", "snippet")
INDEX_TOP_TOKENS = 5   # of a record's top_tokens
INDEX_LENS = 3         # top logit-lens tokens
SNIPPET_BEFORE = 10    # tokens of the top example before its peak
SNIPPET_AFTER = 4      # and after it
SNIPPET_CHARS = 80     # at most, an ellipsis marking a cut

REQUIRED = ("id", "dead", "density", "max", "mean")

_DATA = re.compile(r"^GEMSCOPE\.(\w+)\((-?\d+),(.*)\);\s*$", re.DOTALL)


def display_token(token: str) -> str:
  """A token as pages show it: SentencePiece's word mark as a space and a
  newline as a visible mark (the page does the same, in app.js)."""
  return token.replace("\u2581", " ").replace("\n", "\u21b5")


def snippet(example: dict | None) -> str:
  """Text around an example's peak token, for the index and its search:
  `SNIPPET_BEFORE` tokens before the peak to `SNIPPET_AFTER` after, runs
  of whitespace as one space, cut to `SNIPPET_CHARS` from the left (the
  peak is at the end, so the cut keeps it)."""
  if not example or not example.get("tokens"):
    return ""
  tokens = example["tokens"]
  peak = int(example.get("peak", 0))
  lo = max(0, peak - SNIPPET_BEFORE)
  text = "".join(display_token(t) for t in tokens[lo:peak + SNIPPET_AFTER + 1])
  text = " ".join(text.split())
  if lo > 0:
    text = "\u2026" + text
  if len(text) > SNIPPET_CHARS:
    text = "\u2026" + text[len(text) - SNIPPET_CHARS + 1:]
  return text


def index_row(record: dict) -> list:
  """A record's row of the index, in `INDEX_COLUMNS` order (tokens as the
  record has them; the page shows them as `display_token` does)."""
  lens = (record.get("logit_lens") or {}).get("top") or []
  top = record.get("top") or []
  return [int(record["id"]), bool(record["dead"]),
          int(record.get("count", 0)), record["density"], record["max"],
          record["mean"],
          list((record.get("top_tokens") or [])[:INDEX_TOP_TOKENS]),
          [t for t, _ in lens[:INDEX_LENS]],
          snippet(top[0] if top else None)]


def _check(record: Any, last: int | None) -> int:
  if not isinstance(record, dict):
    raise errors.InputError(
        f"latent record: expected a dict, got {type(record).__name__}")
  missing = [k for k in REQUIRED if k not in record]
  if missing:
    raise errors.InputError(
        f"latent record {record.get('id', '?')}: missing "
        f"{', '.join(missing)} (fields: {', '.join(REQUIRED)}, ...)")
  lid = record["id"]
  if isinstance(lid, bool) or not isinstance(lid, int) or lid < 0:
    raise errors.InputError(
        f"latent record: id must be an int >= 0, got {lid!r}")
  if last is not None and lid <= last:
    raise errors.InputError(
        f"latent record {lid} after {last}: records must come in "
        "ascending id order, each id once")
  return lid


def _dumps(value: Any) -> str:
  return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _write_data(path: pathlib.Path, kind: str, n: int, items: list[str]
                ) -> None:
  """Writes `GEMSCOPE.kind(n,[item,...]);` (items already JSON)."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"GEMSCOPE.{kind}({n},[\n")
    f.write(",\n".join(items))
    f.write("\n]);\n")


def _file_name(n: int, digits: int) -> str:
  return f"{n:0{digits}d}.js"


def write_site(out: str | os.PathLike, meta: dict,
               latents: Iterable[dict], *, overwrite: bool = False,
               per_file: int = PER_FILE, page_size: int = PAGE_SIZE,
               flag: str = "") -> pathlib.Path:
  """Writes the dashboard site of `latents` into the folder `out`.

  Args:
    out: a new or empty folder (a non-empty one only with `overwrite`,
      which replaces the site's own files and leaves others alone).
    meta: what the pages say about the scan (`records.py`'s meta: title,
      model, hookpoint, kind, width, num_tokens, lens, ...).
    latents: records in ascending id order, consumed once, streaming.
    overwrite: replace an existing site in `out`.
    per_file: records per latent data file.
    page_size: latents per index page.
    flag: how error messages name `out` (the command line's `--out`).

  Returns:
    `out`, once complete. The site is built in a hidden temporary folder
    beside it and renamed into place, so a killed writer leaves nothing
    that looks like a site.
  """
  if not isinstance(meta, dict):
    raise errors.InputError(
        f"meta: expected a dict, got {type(meta).__name__}")
  if per_file < 1 or page_size < 1:
    raise errors.UsageError(
        f"per_file and page_size must be >= 1, got {per_file}, {page_size}")
  out = pathlib.Path(out)
  missing = [n for n in PAGE_FILES if not (STATIC / n).is_file()]
  if missing:
    raise errors.InputError(f"{STATIC}: the package lacks {missing}")
  with safe_write.atomic_dir(out, overwrite=overwrite, owns=OWNS,
                             flag=flag) as tmp:
    for name in PAGE_FILES:
      shutil.copyfile(STATIC / name, tmp / name)
    (tmp / "data" / "index").mkdir(parents=True)
    (tmp / "data" / "latents").mkdir()
    width = int(meta.get("width") or 0)
    # File names padded to the widest the scan can need, so they sort.
    file_digits = max(5, len(str(max(width - 1, 0) // per_file)))
    page_digits = max(4, len(str(max(width - 1, 0) // page_size)))
    stats = {"latents": 0, "dead": 0, "max": None, "first_id": None,
             "last_id": None}
    rows: list[str] = []
    pages = 0
    chunk, records = None, []
    chunks: list[list[int]] = []  # written chunk numbers, as [first, last]
    last = None
    for record in latents:
      lid = _check(record, last)
      last = lid
      if chunk is not None and lid // per_file != chunk:
        _write_data(tmp / "data" / "latents" / _file_name(chunk, file_digits),
                    "latents", chunk, records)
        records = []
      if chunk != lid // per_file:
        chunk = lid // per_file
        if chunks and chunks[-1][1] == chunk - 1:
          chunks[-1][1] = chunk
        else:
          chunks.append([chunk, chunk])
      records.append(_dumps(record))
      rows.append(_dumps(index_row(record)))
      if len(rows) == page_size:
        _write_data(tmp / "data" / "index" / _file_name(pages, page_digits),
                    "index", pages, rows)
        pages, rows = pages + 1, []
      stats["latents"] += 1
      stats["dead"] += bool(record["dead"])
      m = record["max"]
      if isinstance(m, (int, float)) and math.isfinite(m) and (
          stats["max"] is None or m > stats["max"]):
        stats["max"] = m
      if stats["first_id"] is None:
        stats["first_id"] = lid
      stats["last_id"] = lid
    if records:
      _write_data(tmp / "data" / "latents" / _file_name(chunk, file_digits),
                  "latents", chunk, records)
    if rows or pages == 0:
      _write_data(tmp / "data" / "index" / _file_name(pages, page_digits),
                  "index", pages, rows)
      pages += 1
    site = {"meta": meta,
            "layout": {"columns": list(INDEX_COLUMNS), "page_size": page_size,
                       "pages": pages, "page_digits": page_digits,
                       "per_file": per_file, "file_digits": file_digits,
                       "chunks": chunks},
            "stats": stats}
    text = json.dumps(site, indent=1, ensure_ascii=False)
    (tmp / "data" / "site.json").write_text(text + "\n", encoding="utf-8")
    # Written last: a site with data/site.js has all its data files.
    (tmp / "data" / "site.js").write_text(f"GEMSCOPE.site({text});\n",
                                          encoding="utf-8")
  return out


# Reading a site back (tests, `show`, other tools): no browser needed.


def _read_data(path: pathlib.Path, kind: str) -> tuple[int, Any]:
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise errors.MissingInputError(f"{path}: no such file") from None
  m = _DATA.match(text)
  if not m or m[1] != kind:
    raise errors.InputError(f"{path}: not a GEMSCOPE.{kind}(...) data file")
  return int(m[2]), json.loads(m[3])


def read_site(site: str | os.PathLike) -> dict:
  """The site's {meta, layout, stats} (data/site.json)."""
  site = pathlib.Path(site)
  path = site / "data" / "site.json"
  if not path.is_file():
    raise errors.MissingInputError(
        f"{site}: not a dashboard site (no data/site.json); write one with "
        "write_site")
  return json.loads(path.read_text(encoding="utf-8"))


def read_index(site: str | os.PathLike) -> Iterator[dict]:
  """The site's index rows as {column: value}, in id order."""
  site = pathlib.Path(site)
  layout = read_site(site)["layout"]
  for page in range(layout["pages"]):
    _, rows = _read_data(site / "data" / "index" / _file_name(
        page, layout["page_digits"]), "index")
    for row in rows:
      yield dict(zip(layout["columns"], row))


def read_latent(site: str | os.PathLike, latent: int) -> dict:
  """One latent's full record from the site."""
  site = pathlib.Path(site)
  layout = read_site(site)["layout"]
  chunk = int(latent) // layout["per_file"]
  path = site / "data" / "latents" / _file_name(chunk, layout["file_digits"])
  if path.is_file():
    _, records = _read_data(path, "latents")
    for record in records:
      if record["id"] == int(latent):
        return record
  raise errors.InputError(f"{site}: has no record of latent {latent}")
