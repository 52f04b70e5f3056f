"""What `gemscope generate` does, as library calls a notebook can make too.

`prepare_prompts` turns text into token ids (plain, or in the Gemma 3 chat
format with the generation prompt), `steering` turns `--steer` specs into
edits, `TextStream` prints tokens as they come, and `write_jsonl` saves the
results. Each step checks its input before the model runs, so a bad spec or
output path fails in a second, not after minutes of generation.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterable, Sequence, TextIO

import numpy as np

from gemscope_jax import errors, models, safe_write
from gemscope_jax.generate._api import Generation
from gemscope_jax.surgery import steer, steer_spec
from gemscope_jax.text import chat


def prepare_prompts(tokenizer, prompts: Sequence[str], *, use_chat: bool,
                    system: str | None = None) -> list[np.ndarray]:
  """Token ids per prompt: BOS + text, or a one-turn chat (with `system`
  folded into the user turn as the official template does) ending in the
  model's generation prompt."""
  if not prompts:
    raise errors.UsageError(f"{errors.option('prompts', '--prompt')}: give "
                            "at least one prompt")
  if system is not None and not use_chat:
    raise errors.UsageError(f"{errors.option('system', '--system')} needs "
                            f"{errors.option('use_chat=True', '--chat')}")
  rows = []
  for text in prompts:
    if use_chat:
      messages = ([{"role": "system", "content": system}] if system else [])
      messages.append({"role": "user", "content": text})
      ids, _ = chat.encode_chat(tokenizer, messages,
                                add_generation_prompt=True)
    else:
      ids = np.asarray(tokenizer.encode(text, add_bos=True), np.int32)
    rows.append(np.asarray(ids, np.int32))
  return rows


def steering(specs: Iterable[str], config: models.Gemma3Config,
             load: Callable[[str], Any] = steer_spec.load_steer_source
             ) -> tuple[dict, dict]:
  """(edits, edit_args) from `--steer` specs, checked against the model.

  Raises:
    UsageError: a spec that does not parse, or does not fit the model
      (layer, width).
  """
  specs = list(specs)
  if not specs:
    return {}, {}
  try:
    interventions = steer_spec.load_interventions(specs, load=load)
    return steer.steering_edits(interventions, config=config)
  except errors.GemscopeError:
    raise
  except (ValueError, KeyError) as e:
    raise errors.UsageError(str(e)) from e


class TextStream:
  """Prints row 0's text as its tokens arrive (the `on_token` callback).

  Decodes the whole continuation each step and prints what was added, so
  multi-token characters (byte fallback) appear once complete.
  """

  def __init__(self, tokenizer, stop: Iterable[int],
               out: TextIO | None = None):
    # sys.stdout is looked up here, not bound at import: it may have been
    # replaced since (notebooks, pytest's capture).
    self._tok, self._stop = tokenizer, set(stop)
    self._out = sys.stdout if out is None else out
    self._ids: list[int] = []
    self._shown = ""

  def __call__(self, step, tokens, done):
    del step
    if bool(np.asarray(done)[0]):
      return
    t = int(np.asarray(tokens)[0])
    if t in self._stop:
      return
    self._ids.append(t)
    text = self._tok.decode(self._ids)
    if text.startswith(self._shown) and not text.endswith("\ufffd"):
      self._out.write(text[len(self._shown):])
      self._out.flush()
      self._shown = text

  @property
  def text(self) -> str:
    return self._shown


def records(g: Generation, prompts: Sequence[str], tokenizer
            ) -> list[dict[str, Any]]:
  """One JSON-ready dict per prompt."""
  return [{"prompt": p, "prompt_tokens": [int(t) for t in pt],
           "tokens": [int(t) for t in toks],
           "text": g.text[i] if g.text else None,
           "stopped": g.stopped[i],
           "prompt_text": tokenizer.decode([int(t) for t in pt])}
          for i, (p, pt, toks) in enumerate(zip(prompts, g.prompt_tokens,
                                               g.tokens))]


def write_jsonl(rows: list[dict[str, Any]], out: str | os.PathLike, *,
                overwrite: bool = False) -> None:
  """Writes one JSON object per line, atomically, never over a file it did
  not write unless `overwrite`."""
  with safe_write.atomic_path(out, overwrite=overwrite, flag="--out") as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
