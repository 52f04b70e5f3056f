"""Headless Chromium for page tests: the DevTools protocol over a pipe
(`--remote-debugging-pipe`: JSON messages ended by NUL on file descriptors
3 and 4), standard library only, no port and no driver package. Console
errors and uncaught exceptions are kept in `Chromium.errors`.

  binary = find_binary()          # None: skip, saying so (SKIP_REASON)
  b = Chromium(binary, profile_dir)
  b.open(path.as_uri()); b.wait("document.querySelector('#x')")
  b.eval("..."); b.screenshot(png_path); b.close()

(The same driver as tests/test_dashboard_site.py's, which predates this
module.)
"""

from __future__ import annotations

import base64
import json
import math
import os
import pathlib
import select
import shutil
import subprocess
import time

SKIP_REASON = ("no Chromium found (chromium, chromium-browser or "
               "google-chrome on PATH, or $GEMSCOPE_CHROMIUM); "
               "scripts/setup.sh installs Debian's chromium as root")


def find_binary() -> str | None:
  for name in (os.environ.get("GEMSCOPE_CHROMIUM"), "chromium",
               "chromium-browser", "google-chrome", "google-chrome-stable"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


# What Chromium answers an evaluation that lands while the page navigates.
_NAVIGATING = ("Inspected target navigated or closed",
               "Cannot find context with specified id",
               "Execution context was destroyed")


class Chromium:
  """Headless Chromium over the DevTools protocol on a pipe (fd 3 in,
  fd 4 out, messages ended by NUL): one page, its console errors kept
  (`errors`), a viewport of `width` x `height` CSS pixels."""

  def __init__(self, binary: str, profile: pathlib.Path, width: int = 1280,
               height: int = 900):
    self.width, self.height = width, height
    to_browser_r, self._to_browser = os.pipe()
    self._from_browser, from_browser_w = os.pipe()

    def fds():  # runs in the child: the protocol's fixed descriptors
      os.dup2(to_browser_r, 3)
      os.dup2(from_browser_w, 4)

    args = [binary, "--headless", "--remote-debugging-pipe",
            f"--user-data-dir={profile}", "--disable-gpu",
            "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking",
            "--hide-scrollbars", f"--window-size={width},{height}",
            "about:blank"]
    if os.geteuid() == 0:
      args.insert(1, "--no-sandbox")  # Chromium refuses root otherwise
    self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=fds,
                                 stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    os.close(to_browser_r)
    os.close(from_browser_w)
    self._buf = b""
    self._id = 0
    self.events: list[dict] = []
    self.errors: list[str] = []
    target = self.call("Target.createTarget", url="about:blank")["targetId"]
    self.session = self.call("Target.attachToTarget", targetId=target,
                             flatten=True)["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
      self.call(f"{domain}.enable", session=True)
    self.call("Emulation.setDeviceMetricsOverride", session=True,
              width=width, height=height, deviceScaleFactor=1, mobile=False)

  def _read(self, deadline: float) -> dict:
    while b"\0" not in self._buf:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
        raise TimeoutError("Chromium did not answer")
      chunk = os.read(self._from_browser, 1 << 20)
      if not chunk:
        raise EOFError("Chromium closed the pipe")
      self._buf += chunk
    msg, _, self._buf = self._buf.partition(b"\0")
    return json.loads(msg)

  def _note(self, msg: dict) -> None:
    method, p = msg.get("method"), msg.get("params", {})
    if method == "Runtime.consoleAPICalled" and p["type"] in ("error",
                                                              "assert"):
      self.errors.append("console: " + " ".join(
          str(a.get("value", a.get("description"))) for a in p["args"]))
    elif method == "Runtime.exceptionThrown":
      d = p["exceptionDetails"]
      self.errors.append("exception: " + d.get("exception", {}).get(
          "description", d.get("text", "")))
    elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
      self.errors.append("log: " + p["entry"]["text"] + " " +
                         p["entry"].get("url", ""))
    self.events.append(msg)

  def call(self, method: str, session: bool = False, timeout: float = 30,
           **params) -> dict:
    self._id += 1
    msg = {"id": self._id, "method": method, "params": params}
    if session:
      msg["sessionId"] = self.session
    os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
    deadline = time.monotonic() + timeout
    while True:
      reply = self._read(deadline)
      if reply.get("id") == self._id:
        if "error" in reply:
          raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]
      self._note(reply)

  def eval(self, expression: str):
    r = self.call("Runtime.evaluate", session=True, expression=expression,
                  returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in r:
      raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
    return r["result"].get("value")

  def wait(self, expression: str, timeout: float = 20) -> None:
    """Polls until `expression` is truthy in the page."""
    deadline = time.monotonic() + timeout
    while True:
      try:
        if self.eval(f"!!({expression})"):
          return
      except RuntimeError as e:
        # A page that is navigating has no context to evaluate in for a
        # moment: poll again rather than fail (anything else still raises).
        if not any(m in str(e) for m in _NAVIGATING):
          raise
      if time.monotonic() > deadline:
        raise TimeoutError(f"waited {timeout} s for {expression}")
      time.sleep(0.03)

  def open(self, url: str, wait_load: bool = True) -> None:
    """Navigates; waits for the load event unless told not to (the index
    keeps loading its pages behind the first, which delays it)."""
    self.call("Page.navigate", session=True, url=url)
    if wait_load:
      self.wait("document.readyState === 'complete'")

  def screenshot(self, path: pathlib.Path) -> pathlib.Path:
    size = self.call("Page.getLayoutMetrics", session=True)["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": self.width,
            "height": min(4000, max(200, math.ceil(size["height"]))),
            "scale": 1}
    # Capturing beyond the viewport resizes the page for a moment (and
    # fires `resize`): only ask for it when the page is taller.
    shot = self.call("Page.captureScreenshot", session=True, format="png",
                     clip=clip,
                     captureBeyondViewport=clip["height"] > self.height)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path

  def close(self) -> None:
    try:
      self.call("Browser.close", timeout=5)
    except Exception:  # pylint: disable=broad-except  # already gone
      pass
    try:
      self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    os.close(self._to_browser)
    os.close(self._from_browser)


def client_point(b: Chromium, selector_js: str) -> list[float]:
  """The viewport point where the element `selector_js` (a JavaScript
  expression) is topmost, after scrolling it into view: a node's centre,
  or a point along an SVG path that no other element covers."""
  return b.eval(f"""(() => {{
    const e = {selector_js};
    e.scrollIntoView({{block: 'center', inline: 'center'}});
    if (e.getTotalLength) {{
      const len = e.getTotalLength(), m = e.getScreenCTM();
      for (const f of [0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8, 0.45, 0.55, 0.35,
                       0.65, 0.25, 0.75, 0.15, 0.85]) {{
        const p = e.getPointAtLength(len * f);
        const x = p.x * m.a + p.y * m.c + m.e, y = p.x * m.b + p.y * m.d + m.f;
        if (document.elementFromPoint(x, y) === e) return [x, y];
      }}
      throw new Error('no uncovered point on the path');
    }}
    const r = e.getBoundingClientRect();
    return [r.x + r.width / 2, r.y + r.height / 2];
  }})()""")


def mouse_move(b: Chromium, x: float, y: float) -> None:
  """Moves the real mouse pointer (hover events as a user makes them)."""
  b.call("Input.dispatchMouseEvent", session=True, type="mouseMoved",
         x=x, y=y)


def click(b: Chromium, x: float, y: float) -> None:
  """A real left click at (x, y) in the viewport."""
  mouse_move(b, x, y)
  for kind in ("mousePressed", "mouseReleased"):
    b.call("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y,
           button="left", clickCount=1)
