"""One latent (or a site's index) as notebook output.

`show(record)` or `show(site_folder, latent=12)` returns a `Shown` whose
`_repr_html_` is self-contained HTML: the site's own style.css and app.js
inlined, the data as a JSON literal, so notebooks render it with no files
or network. The same renderer as the site draws it, so both look alike.

Caveat: the output needs JavaScript (Jupyter runs it in trusted
notebooks); where it does not run, a plain-text summary shows instead.
"""

from __future__ import annotations

import html
import itertools
import json
import os
import pathlib
import uuid
from typing import Any

from gemscope_jax import errors, safe_write
from gemscope_jax.dashboards import site as site_lib

INDEX_ROWS = 500  # an inline index shows at most this many latents


def _script_json(value: Any) -> str:
  """JSON safe inside a <script> element (no '</script>' or '<!--')."""
  text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
  return (text.replace("<", "\\u003c").replace(">", "\\u003e")
          .replace("&", "\\u0026").replace("\u2028", "\\u2028")
          .replace("\u2029", "\\u2029"))


class Shown:
  """HTML for a notebook: `_repr_html_`, `html`, and `save(path)`."""

  def __init__(self, html_text: str, summary: str):
    self.html = html_text
    self._summary = summary

  def _repr_html_(self) -> str:
    return self.html

  def __repr__(self) -> str:
    return self._summary

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes a standalone page (opens from file://)."""
    path = pathlib.Path(path)
    with safe_write.atomic_path(path) as tmp:
      tmp.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'>"
                     "<title>gemscope</title></head><body>" + self.html +
                     "</body></html>\n", encoding="utf-8")
    return path


def _summary_text(site: dict, record: dict | None, rows: list | None) -> str:
  meta = site.get("meta") or {}
  head = " \u00b7 ".join(str(meta[k]) for k in ("model", "hookpoint")
                         if meta.get(k))
  if record is not None:
    state = "dead" if record.get("dead") else (
        f"max {record.get('max')}, density {record.get('density')}")
    tops = ", ".join(repr(t) for t in (record.get("top_tokens") or [])[:8])
    return f"latent {record['id']} ({head}): {state}; top tokens {tops}"
  return f"{len(rows or [])} latents ({head})"


def _page(site: dict, what: dict, summary: str) -> str:
  static = site_lib.STATIC
  css = (static / "style.css").read_text(encoding="utf-8")
  js = (static / "app.js").read_text(encoding="utf-8")
  uid = "gemscope-" + uuid.uuid4().hex[:12]
  return (
      # The style sits outside the root, which the renderer empties.
      f"<div><style>{css}</style>"
      f'<div class="gemscope" id="{uid}">'
      f'<pre class="gs-note">{html.escape(summary)}</pre></div></div>'
      # Scripts keep their text as is: app.js has no '</script>'.
      f"<script>{js}\n</script>"
      f"<script>GEMSCOPE.inline(document.getElementById({json.dumps(uid)}),"
      f"{_script_json(site)},{_script_json(what)});</script>")


def show(record_or_site: dict | str | os.PathLike, latent: int | None = None,
         *, meta: dict | None = None) -> Shown:
  """Notebook output of one latent, or of a site's index.

  Args:
    record_or_site: a latent record (a dict as `records.py` makes it), or
      a site folder that `write_site` wrote.
    latent: with a site, the latent to show; None shows the site's index
      (its first `INDEX_ROWS` latents).
    meta: with a record, the scan's meta (model, hookpoint, ...), shown in
      the header; optional.
  """
  if isinstance(record_or_site, dict):
    if latent is not None and latent != record_or_site.get("id"):
      raise errors.UsageError(
          f"show: latent={latent} but the record is latent "
          f"{record_or_site.get('id')}; give the record or a site folder")
    site = {"meta": meta or {}, "stats": {},
            "layout": {"columns": list(site_lib.INDEX_COLUMNS)}}
    record = record_or_site
    return Shown(_page(site, {"record": record},
                       _summary_text(site, record, None)),
                 _summary_text(site, record, None))
  if not isinstance(record_or_site, (str, os.PathLike)):
    raise errors.UsageError(
        "show: expected a latent record (dict) or a site folder, got "
        f"{type(record_or_site).__name__}")
  folder = pathlib.Path(record_or_site)
  site = site_lib.read_site(folder)
  if latent is not None:
    record = site_lib.read_latent(folder, latent)
    text = _summary_text(site, record, None)
    return Shown(_page(site, {"record": record}, text), text)
  columns = site["layout"]["columns"]
  rows = [[row[c] for c in columns] for row in
          itertools.islice(site_lib.read_index(folder), INDEX_ROWS)]
  text = _summary_text(site, None, rows)
  return Shown(_page(site, {"rows": rows}, text), text)
