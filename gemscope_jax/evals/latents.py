"""What a latent means: its top-activating text, and how often it fires.

`top_examples` runs Gemma up to a hookpoint over token windows, encodes the
activations with any dictionary (`encode(x) -> latents`, e.g. an imported
`interop.InferenceDictionary` or a module bound to trained parameters) and
keeps, for each chosen latent, the k token positions where it is largest,
with the latent's value at every position of those windows (so a snippet
can shade its neighbours too), plus every latent's firing frequency.
`render_html` turns that into a page of highlighted snippets for a notebook
(`IPython.display.HTML`) or a file (`save_html`).

Special tokens (BOS, EOS, control) are never counted or ranked: dictionaries
are not trained on them and their activations are outliers.

Caveat: ranking is exact but ties are broken by scan order (earlier windows
first); a latent that fires fewer than k times gets its zero positions as
filler, flagged by `values == 0`.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gemscope_jax import assets, models
from gemscope_jax.text.windows import Windows


@dataclasses.dataclass(frozen=True)
class TopExamples:
  """The top-k token positions of each chosen latent.

  Attributes:
    latents: (L,) the latent ids, in the order asked for.
    values: (L, k) activation at each example, largest first.
    window: (L, k) window index of each example.
    position: (L, k) position in its window.
    context: (L, k, T) the latent's activation at every position of the
      example's window (0 at special and padding positions).
    frequency: (d_sae,) fraction of ordinary tokens where each latent fires.
    num_tokens: ordinary tokens scanned.
  """
  latents: np.ndarray
  values: np.ndarray
  window: np.ndarray
  position: np.ndarray
  context: np.ndarray
  frequency: np.ndarray
  num_tokens: int


def _merge(best: tuple[np.ndarray, ...], cand: tuple[np.ndarray, ...], k: int
           ) -> tuple[np.ndarray, ...]:
  """Per-row top-k of the concatenation (values first), stable on ties."""
  joined = tuple(np.concatenate([b, c], axis=1) for b, c in zip(best, cand))
  order = np.argsort(-joined[0], axis=1, kind="stable")[:, :k]
  return tuple(np.take_along_axis(a, order if a.ndim == 2 else
                                  order[..., None], axis=1) for a in joined)


def top_examples(model_config: models.Gemma3Config, model_params,
                 windows: Windows, hookpoint: str,
                 encode: Callable[[jax.Array], jax.Array], tokenizer, *,
                 latents: Sequence[int] | None = None, k: int = 8,
                 batch_size: int = 8, dtype=jnp.float32,
                 progress: bool = True) -> TopExamples:
  """Scans `windows` and keeps each latent's k largest activations.

  Args:
    model_config, model_params: the Gemma 3 model.
    windows: token windows (e.g. `windows_from_files` of held-out text).
    hookpoint: where the dictionary reads, "layer_L/site".
    encode: (..., d_in) raw activations -> (..., d_sae) latents.
    tokenizer: gives the special ids (excluded).
    latents: which latents to keep examples for; None means 0..15 (the
      frequencies of all latents come back either way, to choose from).
    k: examples per latent.
    batch_size: windows per forward pass.
    dtype: the model's compute dtype.
    progress: show a progress bar.

  Returns:
    A `TopExamples`.
  """
  name = models.hooks.parse(hookpoint).check(model_config).name
  chosen = np.asarray(list(range(16)) if latents is None else list(latents),
                      np.int64)
  if chosen.ndim != 1 or chosen.size == 0:
    raise ValueError(f"latents must be a non-empty list of ids, got {latents}")
  seq = windows.tokens.shape[1]
  n_lat = len(chosen)
  best = (np.full((n_lat, 0), -np.inf, np.float32),
          np.zeros((n_lat, 0), np.int64), np.zeros((n_lat, 0), np.int64),
          np.zeros((n_lat, 0, seq), np.float32))

  @jax.jit
  def scan(tokens, mask, keep):
    out = models.forward(model_params, tokens, mask, config=model_config,
                         hookpoints=(name,), logits=False, loss=False,
                         dtype=dtype)
    f = encode(out.activations[name]).astype(jnp.float32)
    f = jnp.where(keep[..., None], f, 0.0)
    return jnp.sum(f > 0, axis=(0, 1)), f[..., chosen]

  counts = None
  n_tok = 0
  start = 0
  bar = tqdm(total=windows.num_tokens, unit="tok", unit_scale=True,
             disable=not progress, desc=f"top examples {name}",
             dynamic_ncols=True)
  for tokens, mask, keep in windows.ordinary_batches(tokenizer, batch_size):
    batch_counts, sel = jax.device_get(scan(tokens, mask, keep))
    counts = batch_counts if counts is None else counts + batch_counts
    n_real = min(batch_size, len(windows.tokens) - start)
    sel = np.asarray(sel[:n_real], np.float32)          # (B, T, L)
    flat = sel.transpose(2, 0, 1).reshape(n_lat, -1)    # (L, B*T)
    top = min(k, flat.shape[1])
    idx = np.argsort(-flat, axis=1, kind="stable")[:, :top]
    b, t = np.divmod(idx, seq)
    ctx = sel.transpose(2, 0, 1)[np.arange(n_lat)[:, None], b]  # (L, top, T)
    cand = (np.take_along_axis(flat, idx, axis=1), b + start, t, ctx)
    best = _merge(best, cand, k)
    n_tok += int(keep[:n_real].sum())
    start += n_real
    bar.update(int(mask.sum()))
  bar.close()
  if n_tok == 0:
    raise ValueError("top_examples: the windows hold no ordinary tokens")
  values, window, position, context = best
  return TopExamples(latents=chosen, values=values, window=window,
                     position=position, context=context,
                     frequency=np.asarray(counts, np.float64) / n_tok,
                     num_tokens=n_tok)


def _token_text(tokenizer, token_id: int) -> str:
  piece = tokenizer.id_to_piece(int(token_id))
  return piece.replace("\u2581", " ")


def _snippet(tokenizer, tokens: np.ndarray, acts: np.ndarray, pos: int,
             peak: float, before: int, after: int) -> str:
  lo, hi = max(pos - before, 0), min(pos + after + 1, len(tokens))
  special = tokenizer.special_ids
  spans = []
  for i in range(lo, hi):
    tid = int(tokens[i])
    if tid in special:
      continue
    text = html.escape(_token_text(tokenizer, tid)).replace("\n", "\u21b5")
    a = float(acts[i])
    alpha = 0.0 if peak <= 0 else min(max(a / peak, 0.0), 1.0)
    border = "border-bottom:2px solid #c0392b;" if i == pos else ""
    spans.append(f'<span title="{a:.3g}" style="background:rgba(231,76,60,'
                 f'{alpha:.2f});{border}white-space:pre">{text}</span>')
  return "".join(spans)


def render_html(top: TopExamples, windows: Windows, tokenizer, *,
                before: int = 12, after: int = 4,
                title: str | None = None) -> str:
  """An HTML page: per latent, its frequency and highlighted snippets.

  Each snippet shows `before` tokens before the example and `after` after;
  every token is shaded by the latent's activation there relative to the
  latent's largest example, and the example itself is underlined. Hovering
  a token shows its activation.
  """
  parts = ['<div style="font-family:sans-serif;font-size:13px">']
  if title:
    parts.append(f"<h3>{html.escape(title)}</h3>")
  for j, latent in enumerate(top.latents):
    freq = float(top.frequency[latent])
    peak = float(top.values[j, 0]) if top.values.shape[1] else 0.0
    parts.append(f"<h4 style='margin:10px 0 4px'>latent {int(latent)} "
                 f"&middot; fires on {100 * freq:.3g}% of tokens &middot; "
                 f"max {peak:.3g}</h4>")
    rows = []
    for e in range(top.values.shape[1]):
      value = float(top.values[j, e])
      if value <= 0:
        continue
      w, p = int(top.window[j, e]), int(top.position[j, e])
      snippet = _snippet(tokenizer, windows.tokens[w], top.context[j, e], p,
                         peak, before, after)
      rows.append(f"<tr><td style='color:#666;padding-right:8px'>"
                  f"{value:.3g}</td><td style='font-family:monospace'>"
                  f"{snippet}</td></tr>")
    parts.append("<table>" + "".join(rows) + "</table>" if rows else
                 "<p style='color:#999'>never fires on this text</p>")
  parts.append("</div>")
  return "\n".join(parts)


def save_html(page: str, path: str | os.PathLike) -> None:
  """Writes an HTML fragment as a standalone page (atomically)."""
  doc = ("<!doctype html><html><head><meta charset='utf-8'>"
         f"<title>gemscope_jax latents</title></head><body>{page}"
         "</body></html>")
  with assets.atomic_path(path) as tmp:
    tmp.write_text(doc, encoding="utf-8")
