"""Conversations in JSONL files -> BOS-led token windows whose chat-template
tokens are marked for exclusion (config `data.format = "chat_jsonl"`).

Each non-blank line of a file is one conversation: a JSON object with a
"messages" list, or a bare list of messages (`text.chat` says what a
message is). Conversations are rendered with the Gemma 3 chat template
(`chat.encode_chat`) and cut into windows of `seq_len` positions, the same
layout as `windows.windows_from_ids` but per conversation: the first window
of a conversation is its own ids (BOS first), later ones are BOS followed by
the next `seq_len - 1` ids, and the last is right-padded. So a window never
holds two conversations, and the model sees each conversation from its
start, as a chat model would. `exclude` is True at the template's tokens
(and at the BOS of every window); training and evaluation drop those
positions as they drop special tokens (`windows.ordinary_mask`).

Caveat: the padding of each conversation's last window is computed for
nothing (about half a window per conversation); conversations are
tokenized on every run (no token cache, unlike plain text).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Iterator

import numpy as np

from gemscope_jax.text import chat
from gemscope_jax.text.windows import Windows

FORMATS = ("text", "chat_jsonl")  # what config data.format / eval.format take

# Conversations tokenized per batched tokenizer call.
_CHUNK = 256


def check_format(fmt: str, field: str) -> str:
  """`fmt` if it is a known data format, else ValueError naming `field`."""
  if fmt not in FORMATS:
    raise ValueError(f"{field}: unknown format {fmt!r}; expected one of "
                     f"{', '.join(FORMATS)}")
  return fmt


def read_conversations(path: str | os.PathLike
                       ) -> Iterator[tuple[int, list[Any]]]:
  """(line number, messages) of every conversation in a JSONL file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a line that is not JSON, or neither an object with a
      "messages" list nor a list; the message names the file and line.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such JSONL file")
  # Bytes, decoded line by line, so a decoding error can name its line.
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte "
                         f"{e.start})") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}, "
                         f"column {e.colno})") from None
      if isinstance(record, dict):
        if not isinstance(record.get("messages"), list):
          raise ValueError(f"{path}:{lineno}: a JSON object needs a "
                           "'messages' list")
        record = record["messages"]
      elif not isinstance(record, list):
        raise ValueError(f"{path}:{lineno}: expected an object with "
                         "'messages' or a list of messages, got "
                         f"{type(record).__name__}")
      yield lineno, record


def encode_files(tokenizer, files: Iterable[str | os.PathLike], *,
                 max_tokens: int | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(ids, template_mask) of every conversation of `files`, in order.

  Args:
    tokenizer: a `text.tokenizer.Tokenizer`.
    files: JSONL files of conversations.
    max_tokens: stop after the conversation that brings the ids read to at
      least this many (None: read everything).

  Raises:
    FileNotFoundError, ValueError: a missing file, bad JSON, a malformed
      conversation (the message names the file and line), or a file with
      no conversations.
  """
  out: list[tuple[np.ndarray, np.ndarray]] = []
  total = 0

  def flush(path, chunk):
    nonlocal total
    try:
      encoded = chat.encode_chats(tokenizer, [m for _, m in chunk])
    except ValueError:
      # Find the culprit so that the error names its line.
      for lineno, messages in chunk:
        try:
          chat.segments(messages)
        except ValueError as e:
          raise ValueError(f"{path}:{lineno}: {e}") from None
      raise
    for item in encoded:
      out.append(item)
      total += len(item[0])

  for f in files:
    chunk: list[tuple[int, list[Any]]] = []
    n_before = len(out)
    for lineno, messages in read_conversations(f):
      chunk.append((lineno, messages))
      if len(chunk) == _CHUNK:
        flush(f, chunk)
        chunk = []
        if max_tokens is not None and total >= max_tokens:
          break
    if chunk:
      flush(f, chunk)
    if len(out) == n_before:
      raise ValueError(f"{f}: the JSONL file holds no conversations")
    if max_tokens is not None and total >= max_tokens:
      break
  return out


class ConversationWindowSource:
  """Random-access windows of conversations (grain's data source protocol).

  Item `i` is {"tokens": (T,) int32, "mask": (T,) bool, "exclude": (T,)
  bool} (see the module docstring for the layout). Windows are cut on
  access from one stream of conversation bodies (ids after BOS).
  """

  def __init__(self, conversations: list[tuple[np.ndarray, np.ndarray]],
               seq_len: int, bos_id: int):
    """Lays out encoded conversations.

    Args:
      conversations: (ids, template_mask) pairs from `chat.encode_chat`,
        each starting with BOS.
      seq_len: T, positions per window (BOS included); at least 2.
      bos_id: the BOS id.

    Raises:
      ValueError: seq_len < 2, no conversations, or one not led by BOS.
    """
    if seq_len < 2:
      raise ValueError(f"seq_len must be at least 2 (BOS + 1 token), got "
                       f"{seq_len}")
    if not conversations:
      raise ValueError("no conversations to window")
    body = seq_len - 1
    ids, excl, starts, lengths = [], [], [], []
    offset = 0
    for i, (c_ids, c_mask) in enumerate(conversations):
      if len(c_ids) < 2 or c_ids[0] != bos_id:
        raise ValueError(f"conversation {i} must be BOS and at least one "
                         "token")
      n = len(c_ids) - 1
      ids.append(np.asarray(c_ids[1:], np.int32))
      excl.append(np.asarray(c_mask[1:], bool))
      s = np.arange(0, n, body)
      starts.append(offset + s)
      lengths.append(np.minimum(n - s, body))
      offset += n
    self.ids = np.concatenate(ids)
    self.exclude = np.concatenate(excl)
    self.starts = np.concatenate(starts)
    self.lengths = np.concatenate(lengths)
    self.seq_len = int(seq_len)
    self.bos_id = int(bos_id)
    self.num_conversations = len(conversations)

  @classmethod
  def from_files(cls, tokenizer, files: Iterable[str | os.PathLike],
                 seq_len: int, *, max_tokens: int | None = None
                 ) -> ConversationWindowSource:
    """Reads and encodes JSONL files (see `encode_files`) and windows them."""
    return cls(encode_files(tokenizer, files, max_tokens=max_tokens),
               seq_len, tokenizer.bos_id)

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    index = int(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"window {index} out of range for {n} windows")
    start, length = int(self.starts[index]), int(self.lengths[index])
    tokens = np.zeros(self.seq_len, np.int32)
    exclude = np.zeros(self.seq_len, bool)
    tokens[0], exclude[0] = self.bos_id, True
    tokens[1:1 + length] = self.ids[start:start + length]
    exclude[1:1 + length] = self.exclude[start:start + length]
    mask = np.arange(self.seq_len) < length + 1
    return {"tokens": tokens, "mask": mask, "exclude": exclude}

  def windows(self, max_tokens: int | None = None) -> Windows:
    """All windows as one `Windows` (with `exclude`), the real positions
    trimmed to max_tokens as `windows_from_ids` does."""
    items = [self[i] for i in range(len(self))]
    tokens = np.stack([it["tokens"] for it in items])
    mask = np.stack([it["mask"] for it in items])
    exclude = np.stack([it["exclude"] for it in items])
    if max_tokens is not None and mask.sum() > max_tokens:
      flat = mask.reshape(-1)
      flat[np.flatnonzero(flat)[max_tokens:]] = False
      keep = mask.any(1)
      tokens = np.where(mask, tokens, 0)[keep]
      mask, exclude = mask[keep], (exclude & mask)[keep]
    return Windows(tokens, mask, exclude)

  def __repr__(self) -> str:
    return (f"ConversationWindowSource(conversations="
            f"{self.num_conversations}, num_tokens={self.ids.size}, "
            f"seq_len={self.seq_len}, num_windows={len(self)})")


def windows_from_conversations(tokenizer, files: Iterable[str | os.PathLike],
                               seq_len: int, max_tokens: int | None = None
                               ) -> Windows:
  """Windows of the conversations in JSONL `files` (the chat counterpart of
  `windows.windows_from_files`); `exclude` marks the template tokens."""
  source = ConversationWindowSource.from_files(tokenizer, files, seq_len,
                                               max_tokens=max_tokens)
  return source.windows(max_tokens)
