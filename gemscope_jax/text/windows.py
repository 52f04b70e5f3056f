"""Text -> fixed-length token windows, each starting with BOS.

A window holds `seq_len` positions: BOS then `seq_len - 1` consecutive tokens
of the text stream; the last window of a stream is right-padded with the pad
id (0) and its mask marks the real tokens. Windows of conversations
(`text.conversations`) also carry `exclude`, the chat template's tokens:
dictionaries skip those as they skip special tokens (`ordinary_mask`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable, Iterator

import numpy as np


def special_mask(tokenizer, tokens: np.ndarray) -> np.ndarray:
  """True where a token id is special (BOS, EOS, control, unknown)."""
  return np.isin(tokens, np.fromiter(tokenizer.special_ids, np.int32))


def ordinary_mask(tokenizer, tokens: np.ndarray, mask: np.ndarray,
                  exclude: np.ndarray | None = None) -> np.ndarray:
  """True at the positions dictionaries train and evaluate on: real tokens
  that are neither special nor excluded (a chat template's tokens)."""
  keep = mask & ~special_mask(tokenizer, tokens)
  return keep if exclude is None else keep & ~exclude


@dataclasses.dataclass(frozen=True)
class Windows:
  """tokens (W, T) int32; mask (W, T) bool, True for real tokens; exclude
  (W, T) bool or None, True at real tokens to leave out beside the special
  ones (the chat template's, see `text.conversations`)."""
  tokens: np.ndarray
  mask: np.ndarray
  exclude: np.ndarray | None = None

  @property
  def num_tokens(self) -> int:
    return int(self.mask.sum())

  def spread_first(self, n: int) -> Windows:
    """The same windows with `n` of them, evenly spaced over the whole
    sample, moved to the front (the others keep their order after them).

    A consumer that treats the leading windows apart (an evaluation's
    LM-loss passes, `eval.loss_windows='spread'`) then sees the mixture of
    the whole sample rather than its first files: the held-out stream is
    read file by file, so its first 32k tokens can all come from one
    corpus. Statistics summed over every window are unchanged.
    """
    total = len(self.tokens)
    if n <= 0 or n >= total:
      return self
    picked = np.unique(np.round(np.linspace(0, total - 1, n))
                       .astype(np.int64))
    order = np.concatenate([picked, np.setdiff1d(np.arange(total), picked)])
    return Windows(self.tokens[order], self.mask[order],
                   None if self.exclude is None else self.exclude[order])

  def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, mask) of batch_size windows; the last batch is padded with
    empty windows, so a jitted consumer compiles one program only."""
    n, seq_len = self.tokens.shape
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      tokens = np.zeros((batch_size, seq_len), np.int32)
      mask = np.zeros((batch_size, seq_len), bool)
      tokens[:stop - start] = self.tokens[start:stop]
      mask[:stop - start] = self.mask[start:stop]
      yield tokens, mask

  def ordinary_batches(self, tokenizer, batch_size: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray,
                                           np.ndarray]]:
    """`batches` with a third array: `ordinary_mask` of the batch (False on
    the padding windows)."""
    for start, (tokens, mask) in zip(range(0, len(self.tokens), batch_size),
                                     self.batches(batch_size)):
      exclude = None
      if self.exclude is not None:
        exclude = np.zeros_like(mask)
        part = self.exclude[start:start + batch_size]
        exclude[:len(part)] = part
      yield tokens, mask, ordinary_mask(tokenizer, tokens, mask, exclude)


LOSS_WINDOWS = ("leading", "spread")


def for_loss(windows: Windows, loss_tokens: int | None, how: str,
             batch_size: int = 1) -> Windows:
  """`windows` as an evaluation whose LM-loss passes cover `loss_tokens`
  positions of its leading batches of `batch_size` windows should read
  them: as they are ('leading'), or with that many whole batches' worth
  of windows spread evenly over the whole sample moved to the front
  ('spread', `Windows.spread_first`)."""
  if how not in LOSS_WINDOWS:
    raise ValueError(f"loss_windows must be one of {LOSS_WINDOWS}, got "
                     f"{how!r}")
  if how == "leading" or loss_tokens is None:
    return windows
  n_batches = -(-loss_tokens // (windows.tokens.shape[1] * batch_size))
  return windows.spread_first(n_batches * batch_size)


def windows_from_ids(ids: np.ndarray, seq_len: int, bos_id: int,
                     max_tokens: int | None = None) -> Windows:
  """Cuts one token stream (no BOS) into BOS-led windows of seq_len."""
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2 (BOS + 1 token), got "
                     f"{seq_len}")
  ids = np.asarray(ids, np.int32)
  body = seq_len - 1
  n_windows = -(-len(ids) // body)
  if max_tokens is not None:
    n_windows = min(n_windows, -(-max_tokens // seq_len))
  tokens = np.zeros((n_windows, seq_len), np.int32)
  tokens[:, 0] = bos_id
  for w in range(n_windows):
    chunk = ids[w * body:(w + 1) * body]
    tokens[w, 1:1 + len(chunk)] = chunk
  mask = np.zeros_like(tokens, bool)
  lengths = np.minimum(len(ids) - np.arange(n_windows) * body, body) + 1
  mask[np.arange(seq_len)[None, :] < lengths[:, None]] = True
  if max_tokens is not None and mask.sum() > max_tokens:
    # Trim the last window so exactly max_tokens positions are real.
    flat = mask.reshape(-1)
    flat[np.flatnonzero(flat)[max_tokens:]] = False
    tokens = np.where(mask, tokens, 0)
  return Windows(tokens, mask)


def windows_from_files(tokenizer, files: Iterable[str | pathlib.Path],
                       seq_len: int, max_tokens: int | None = None) -> Windows:
  """Reads text files in order and windows their tokens.

  Raises FileNotFoundError naming a missing file, ValueError naming an empty
  one. Only as much text as max_tokens needs (about 8 characters per token,
  with margin) is tokenized.
  """
  ids: list[int] = []
  budget = None if max_tokens is None else max_tokens * 12 + 1000
  for f in files:
    path = pathlib.Path(f)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
      raise ValueError(f"{path}: the text file is empty")
    if budget is not None:
      text = text[:budget]
      budget -= len(text)
    ids.extend(tokenizer.encode(text, add_bos=False))
    if budget is not None and budget <= 0:
      break
  return windows_from_ids(np.asarray(ids), seq_len, tokenizer.bos_id,
                          max_tokens)
