"""A `ScanResult` as JSON-ready records: one `meta` dict for the scan and
one dict per latent, the data model the dashboard site (`site.write_site`)
renders.

  meta    {title, model, hookpoint, kind, width, num_tokens, num_windows,
           seq_len, k, quantile_bins, per_bin, text_source, created, lens}
  latent  {id, dead, count, density, mean, max, top, quantiles, histogram,
           logit_lens, neighbours, [input_neighbours], top_tokens}
  example {window, pos, value, tokens, acts, peak}

An example's `tokens` are the real tokens of its window from pos - before to
pos + after (`ScanResult.before/after`, 24 and 8 by default), `acts` the
latent there (0 at special tokens), `peak` the index of pos in them.
Token strings concatenate to the text: SentencePiece's U+2581 is a space,
byte-fallback pieces are decoded as UTF-8 across neighbouring byte tokens
(a character split over several appears on its last one, the others are
''), special tokens are their piece ('<bos>'). Quantile bins hold their
sample largest value first. Floats are rounded to 6 significant digits
(activations in `acts` to 4), which keeps a 16k-wide site's files small.

Caveat: `records` yields latents one at a time (a 262k-wide scan's records
do not fit in memory at once); token texts are cached per vocabulary id.
"""

from __future__ import annotations

import codecs
import collections
import datetime
import re
from typing import Iterable, Iterator, Sequence

import numpy as np

from gemscope_jax import errors
from gemscope_jax.dashboards.scan import ScanResult
from gemscope_jax.text.windows import Windows

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_WORD = "\u2581"
_INPUT_SIDE = ("transcoder", "skip_transcoder", "clt")


def _f(x, digits: int = 6) -> float:
  return float(f"{float(x):.{digits}g}")


def _fs(values: np.ndarray, digits: int) -> list[float]:
  """`_f` of every value (most are exactly 0 in a context: kept as is)."""
  spec = f".{digits}g"
  return [float(format(v, spec)) if v else 0.0
          for v in np.asarray(values, np.float64).tolist()]


class TokenText:
  """Per-token strings of a tokenizer's ids (module docstring), cached."""

  def __init__(self, tokenizer):
    self._tok = tokenizer
    self._special = tokenizer.special_ids
    self._cache: dict[int, str | int] = {}

  def _piece(self, i: int) -> str | int:
    """The text of id i, or its byte value (an int) for a byte piece."""
    got = self._cache.get(i)
    if got is None:
      piece = self._tok.id_to_piece(i)
      m = _BYTE.match(piece) if i not in self._special else None
      got = int(m.group(1), 16) if m else (
          piece if i in self._special else piece.replace(_WORD, " "))
      self._cache[i] = got
    return got

  def strings(self, ids: Iterable[int]) -> list[str]:
    """One string per id; their concatenation reads as the text."""
    out: list[str] = []
    decoder = None
    for i in ids:
      piece = self._piece(int(i))
      if isinstance(piece, int):
        if decoder is None:
          decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out.append(decoder.decode(bytes([piece])))
        continue
      if decoder is not None:         # an unfinished character: U+FFFD
        tail = decoder.decode(b"", final=True)
        if tail and out:
          out[-1] += tail
        decoder = None
      out.append(piece)
    if decoder is not None:
      tail = decoder.decode(b"", final=True)
      if tail and out:
        out[-1] += tail
    return out

  def token(self, i: int) -> str:
    """A single token's text (a lone byte piece as its piece)."""
    piece = self._piece(int(i))
    return self._tok.id_to_piece(int(i)) if isinstance(piece, int) else piece


def meta_record(result: ScanResult, *, title: str | None = None,
                text_source: str = "") -> dict:
  """The scan's `meta` record."""
  hookpoint = ", ".join(result.hookpoints)
  return {
      "title": title or (f"{result.model} {hookpoint} {result.kind} "
                         f"({result.width} latents)"),
      "model": result.model, "hookpoint": hookpoint, "kind": result.kind,
      "width": int(result.width), "num_tokens": int(result.num_tokens),
      "num_windows": int(result.num_windows),
      "seq_len": int(result.seq_len), "k": int(result.k),
      "quantile_bins": int(result.quantile_bins),
      "per_bin": int(result.per_bin), "text_source": str(text_source),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "lens": (result.lens.description if result.lens is not None
               else "not computed"),
  }


def _example(result: ScanResult, windows: Windows, text: TokenText,
             index: int, value: float, context: np.ndarray) -> dict:
  w, p = divmod(int(index), result.seq_len)
  real = np.flatnonzero(windows.mask[w])
  lo = max(p - result.before, 0)
  hi = min(p + result.after + 1, int(real.max()) + 1)
  ids = windows.tokens[w, lo:hi]
  acts = context[lo - (p - result.before):hi - (p - result.before)]
  return {"window": w, "pos": p, "value": _f(value),
          "tokens": text.strings(ids), "acts": _fs(acts, 4),
          "peak": p - lo}


def _pairs(ids: np.ndarray, values: np.ndarray) -> list[list]:
  return [[int(i), _f(v)] for i, v in zip(ids, values)]


def latent_record(result: ScanResult, latent: int, windows: Windows,
                  text: TokenText) -> dict:
  """The record of one latent (module docstring)."""
  i = int(latent)
  count = int(result.count[i])
  dead = count == 0
  top = [_example(result, windows, text, idx, v, c)
         for idx, v, c in zip(result.top_index[i], result.top_values[i],
                              result.top_context[i]) if idx >= 0]
  quantiles, histogram = [], {"edges": [], "counts": []}
  if not dead:
    for b in range(result.quantile_bins):
      got = [(v, idx, c) for idx, v, c in zip(
          result.quantile_index[i, b], result.quantile_values[i, b],
          result.quantile_context[i, b]) if idx >= 0]
      got.sort(key=lambda e: (-e[0], e[1]))
      quantiles.append({
          "lo": _f(result.quantile_edges[i, b]),
          "hi": _f(result.quantile_edges[i, b + 1]),
          "count": int(result.quantile_counts[i, b]),
          "examples": [_example(result, windows, text, idx, v, c)
                       for v, idx, c in got]})
    histogram = {"edges": _fs(result.hist_edges[i], 6),
                 "counts": [int(c) for c in result.hist_counts[i]]}
  lens = {"top": [], "bottom": []}
  if result.lens is not None:
    lens = {side: [[text.token(t), _f(v)] for t, v in zip(ids[i], vals[i])]
            for side, ids, vals in (
                ("top", result.lens.top_ids, result.lens.top_values),
                ("bottom", result.lens.bottom_ids,
                 result.lens.bottom_values))}
  peaks = collections.Counter(e["tokens"][e["peak"]] for e in top)
  record = {
      "id": i, "dead": dead, "count": count,
      "density": _f(result.density[i]), "mean": _f(result.mean[i]),
      "max": _f(result.max[i]), "top": top, "quantiles": quantiles,
      "histogram": histogram, "logit_lens": lens,
      "neighbours": ([] if result.neighbours is None else
                     _pairs(result.neighbours[0][i], result.neighbours[1][i])),
      "top_tokens": [t for t, _ in peaks.most_common(5)],
  }
  if result.kind in _INPUT_SIDE:
    nb = result.input_neighbours
    record["input_neighbours"] = [] if nb is None else _pairs(nb[0][i],
                                                              nb[1][i])
  return record


def records(result: ScanResult, windows: Windows, tokenizer, *,
            title: str | None = None, text_source: str = "",
            latents: Sequence[int] | None = None
            ) -> tuple[dict, Iterator[dict]]:
  """(meta, latent records in ascending id order, made as consumed).

  Args:
    result: the scan.
    windows: the windows it scanned (their token ids give the text).
    tokenizer: the model's tokenizer.
    title: the site's title; default names model, hookpoint, kind, width.
    text_source: where the text came from, as the page should say it.
    latents: which latents (default all); sorted, de-duplicated.

  Raises:
    UsageError: windows of another shape than the scan's, or a latent id
      outside the width.
  """
  shape = (result.num_windows, result.seq_len)
  if tuple(windows.tokens.shape) != shape:
    raise errors.UsageError(
        f"records: the scan covered windows of shape {shape}, these are "
        f"{tuple(windows.tokens.shape)}")
  ids = range(result.width) if latents is None else sorted(
      {int(i) for i in latents})
  bad = [i for i in ids if not 0 <= i < result.width]
  if bad:
    raise errors.UsageError(f"records: latent ids {bad[:5]} outside [0, "
                            f"{result.width})")
  text = TokenText(tokenizer)
  meta = meta_record(result, title=title, text_source=text_source)
  return meta, (latent_record(result, i, windows, text) for i in ids)

