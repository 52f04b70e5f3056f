"""Serves a dashboard site over local HTTP.

A site opens from `file://` without any server; `serve` is for a site on
another machine (an SSH tunnel to the port) or a browser that refuses
local files. It binds 127.0.0.1 only and serves the site's folder, read-only.
"""

from __future__ import annotations

import functools
import http.server
import os
import pathlib
import threading
import webbrowser

from gemscope_jax import errors


class _Handler(http.server.SimpleHTTPRequestHandler):
  extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                    ".js": "text/javascript; charset=utf-8",
                    ".json": "application/json; charset=utf-8",
                    ".html": "text/html; charset=utf-8",
                    ".css": "text/css; charset=utf-8"}

  def log_message(self, format, *args):  # noqa: A002 (the base's name)
    pass  # one line per data file would drown the terminal


class Server:
  """A running server: `url`, `port`, `close()`; a context manager."""

  def __init__(self, httpd: http.server.ThreadingHTTPServer,
               site: pathlib.Path):
    self.httpd = httpd
    self.site = site
    self.port = httpd.server_address[1]
    self.url = f"http://127.0.0.1:{self.port}/"
    self._thread: threading.Thread | None = None

  def start(self) -> "Server":
    """Serves in a background (daemon) thread; returns at once."""
    self._thread = threading.Thread(target=self.httpd.serve_forever,
                                    name="gemscope-serve", daemon=True)
    self._thread.start()
    return self

  def close(self) -> None:
    if self._thread is not None:
      self.httpd.shutdown()
      self._thread.join()
      self._thread = None
    self.httpd.server_close()

  def __enter__(self) -> "Server":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def serve(site: str | os.PathLike, port: int = 0, open_browser: bool = False,
          *, block: bool = True) -> Server:
  """Serves the site folder `site` at http://127.0.0.1:PORT/.

  Args:
    site: a folder `write_site` wrote.
    port: the port; 0 picks a free one (printed, and in `Server.url`).
    open_browser: open the index in the default browser.
    block: serve until Ctrl-C (the command line); False starts a
      background thread and returns the running `Server` (call close()).
  """
  site = pathlib.Path(site)
  if not (site / "index.html").is_file() or not (
      site / "data" / "site.js").is_file():
    raise errors.MissingInputError(
        f"{site}: not a dashboard site (needs index.html and data/site.js); "
        "write one with write_site")
  handler = functools.partial(_Handler, directory=str(site.resolve()))
  try:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), handler)
  except OSError as e:
    raise errors.UsageError(
        f"port {port}: cannot serve there ({e.strerror}); give another, or "
        "0 for a free one") from None
  server = Server(httpd, site)
  if open_browser:
    webbrowser.open(server.url)
  if not block:
    return server.start()
  print(f"serving {site} at {server.url} (Ctrl-C to stop)", flush=True)
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    httpd.server_close()
  return server
