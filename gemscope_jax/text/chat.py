"""The Gemma 3 chat format: conversations -> text -> token ids and a mask
of the tokens the template adds.

Instruction-tuned Gemma 3 reads a conversation as

  <bos><start_of_turn>user
  {system}\\n\\n{first user message}<end_of_turn>
  <start_of_turn>model
  {reply}<end_of_turn>
  ...
  <start_of_turn>model            (the generation prompt, when asked)

which is what the official chat template (google/gemma-3-*-it's
`tokenizer_config.json`, tests/data/gemma3_chat_template.jinja) renders:
role "assistant" is written "model", a leading system message is folded
into the first user turn, message text is trimmed (Python's `str.strip`,
as jinja's `trim`), and roles must alternate user / model starting with
user. `render` reproduces it character for character and `encode_chat`
token for token; `encode_chat` also returns `template_mask`, True at the
tokens that are not message content (BOS, `<start_of_turn>`, the role
names, the newlines and the "\\n\\n" after the system prompt that the
template adds, `<end_of_turn>`) and at any special token. Gemma Scope 2's
instruction-tuned dictionaries leave those out of training and evaluation.

Messages are what transformers accepts: {"role": ..., "content": str or
[{"type": "text", "text": ...}, ...]}.

Caveat: stricter than the template where it would silently produce odd
text: it rejects roles other than system / user / assistant (or "model"),
a system message anywhere but first, a system message with more than one
content part (the template keeps only the first), non-text parts (the
template writes `<start_of_image>` for images; this is a text-only
framework) and a conversation with no user or model turn. A token that
spans template text and content (e.g. a system prompt ending in "\\n"
merges with the "\\n\\n" after it) counts as content.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
GENERATION_PROMPT = START_OF_TURN + "model\n"
# Role as written in the turn header; "model" is accepted as a synonym of
# "assistant" because the template writes any role other than assistant
# verbatim.
ROLES = {"user": "user", "assistant": "model", "model": "model"}

Message = Mapping[str, Any]


def _content_text(content: Any, where: str, *, trim: bool) -> str:
  """The text of a message's content (a string or a list of text parts),
  each part trimmed when `trim`, as the template does."""
  if isinstance(content, str):
    return content.strip() if trim else content
  if isinstance(content, (list, tuple)):
    texts = []
    for j, part in enumerate(content):
      if not isinstance(part, Mapping) or "type" not in part:
        raise ValueError(f"{where}: content part {j} must be a dict with a "
                         f"'type', got {part!r:.80}")
      if part["type"] != "text":
        raise ValueError(f"{where}: content part {j} has type "
                         f"{part['type']!r}; only 'text' parts are supported")
      text = part.get("text")
      if not isinstance(text, str):
        raise ValueError(f"{where}: content part {j} needs a string 'text'")
      texts.append(text.strip() if trim else text)
    return "".join(texts)
  raise ValueError(f"{where}: content must be a string or a list of "
                   f"{{'type': 'text', 'text': ...}} parts, got "
                   f"{type(content).__name__}")


def _check_message(m: Any, i: int) -> str:
  if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
    raise ValueError(f"message {i} must be a dict with 'role' and "
                     f"'content', got {m!r:.80}")
  return m["role"]


def segments(messages: Sequence[Message], add_generation_prompt: bool = False
             ) -> list[tuple[str, bool]]:
  """The rendered conversation as (text, is_template) pieces, in order.

  Args:
    messages: the conversation (see the module docstring).
    add_generation_prompt: end with `<start_of_turn>model\\n`, the prompt
      for the model's next reply.

  Returns:
    Pieces whose concatenation is `render(messages, ...)`; is_template is
    False for message content (the system prompt included).

  Raises:
    ValueError: an empty conversation, a malformed message, an unknown
      role, or roles that do not alternate user / model starting with user.
  """
  messages = list(messages)
  if not messages:
    raise ValueError("the conversation has no messages")
  out: list[tuple[str, bool]] = [(BOS, True)]
  if _check_message(messages[0], 0) == "system":
    content = messages[0]["content"]
    if isinstance(content, (list, tuple)) and len(content) > 1:
      raise ValueError("message 0: a system message may have one content "
                       "part only (the chat template drops the others)")
    # The template folds the system prompt in untrimmed.
    system = _content_text(content, "message 0", trim=False)
    messages, offset = messages[1:], 1
    if not messages:
      raise ValueError("the conversation has a system message but no turns")
  else:
    system, offset = "", 0
  for k, m in enumerate(messages):
    i = k + offset
    role = _check_message(m, i)
    if role == "system":
      raise ValueError(f"message {i}: a system message may only come first")
    if role not in ROLES:
      raise ValueError(f"message {i}: unknown role {role!r}; expected "
                       "'system', 'user' or 'assistant'")
    if (role == "user") != (k % 2 == 0):
      raise ValueError(
          f"message {i}: conversation roles must alternate user/assistant/"
          f"user/assistant/... (after an optional system message); got "
          f"{role!r}")
    out.append((START_OF_TURN + ROLES[role] + "\n", True))
    if k == 0 and offset:
      # "\n\n" follows even an empty system prompt, as in the template.
      out += [(system, False), ("\n\n", True)]
    out.append((_content_text(m["content"], f"message {i}", trim=True),
                False))
    out.append((END_OF_TURN + "\n", True))
  if add_generation_prompt:
    out.append((GENERATION_PROMPT, True))
  return [(t, tpl) for t, tpl in out if t]


def render(messages: Sequence[Message],
           add_generation_prompt: bool = False) -> str:
  """The conversation as Gemma 3's chat template writes it (BOS included,
  as the literal `<bos>`); see `segments` for the arguments."""
  return "".join(t for t, _ in segments(messages, add_generation_prompt))


# --- tokens -----------------------------------------------------------------

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@functools.lru_cache(maxsize=4)
def _piece_bytes(tokenizer) -> np.ndarray:
  """UTF-8 bytes of input text each token id stands for (vocab_size,).

  Byte-fallback pieces are one byte, special tokens their literal text (the
  rendered conversation writes them literally), other pieces their text with
  U+2581 read as a space (the tokenizer reads a literal U+2581 as a space too,
  so offsets are counted on text with U+2581 replaced).
  """
  special = tokenizer.special_ids
  out = np.empty(tokenizer.vocab_size, np.int64)
  for i in range(tokenizer.vocab_size):
    piece = tokenizer.id_to_piece(i)
    if i not in special and _BYTE_PIECE.fullmatch(piece):
      out[i] = 1
    else:
      out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
  return out


def _template_mask(tokenizer, ids: np.ndarray,
                   pieces: list[tuple[str, bool]]) -> np.ndarray:
  """True at tokens lying wholly inside template text, or special."""
  lengths = [len(t.replace("\u2581", " ").encode("utf-8")) for t, _ in pieces]
  content = np.concatenate([np.full(n, not tpl, np.int64)
                            for n, (_, tpl) in zip(lengths, pieces)])
  ends = np.cumsum(_piece_bytes(tokenizer)[ids])
  if len(ids) and ends[-1] != len(content):
    # Only a tokenizer that normalizes its input breaks this accounting.
    raise RuntimeError(f"token pieces cover {ends[-1]} bytes of a "
                       f"{len(content)}-byte conversation; the tokenizer "
                       "does not keep its input text")
  starts = ends - _piece_bytes(tokenizer)[ids]
  seen = np.concatenate([[0], np.cumsum(content)])
  mask = seen[ends] - seen[starts] == 0
  return mask | np.isin(ids, np.fromiter(tokenizer.special_ids, np.int64))


def encode_chats(tokenizer, conversations: Iterable[Sequence[Message]],
                 add_generation_prompt: bool = False
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """`encode_chat` over many conversations, in one batched tokenizer call."""
  pieces = [segments(c, add_generation_prompt) for c in conversations]
  texts = ["".join(t for t, _ in p) for p in pieces]
  encoded = tokenizer.encode_batch(texts, add_bos=False)
  out = []
  for ids, p in zip(encoded, pieces):
    ids = np.asarray(ids, np.int32)
    out.append((ids, _template_mask(tokenizer, ids, p)))
  return out


def encode_chat(tokenizer, messages: Sequence[Message],
                add_generation_prompt: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of a conversation and the mask of its template tokens.

  The ids are exactly `tokenizer.encode(render(messages, ...),
  add_bos=False)` (the rendered text starts with `<bos>`), i.e. those of
  transformers' `apply_chat_template(..., tokenize=True)`.

  Args:
    tokenizer: a `text.tokenizer.Tokenizer` (literal control tokens are read
      as their single ids).
    messages: the conversation.
    add_generation_prompt: end with `<start_of_turn>model\\n`.

  Returns:
    (ids (N,) int32, template_mask (N,) bool): True at tokens the template
    adds (BOS, `<start_of_turn>`, role names, its newlines,
    `<end_of_turn>`) and at special tokens anywhere; False at message
    content.

  Raises:
    ValueError: as `segments`.
  """
  return encode_chats(tokenizer, [messages], add_generation_prompt)[0]


def stop_ids(tokenizer) -> tuple[int, ...]:
  """Ids that end a chat reply: `<end_of_turn>` (the model closes its turn
  with it) and EOS.

  Raises:
    ValueError: the tokenizer has no `<end_of_turn>` piece (not Gemma 3's).
  """
  end = tokenizer.piece_to_id(END_OF_TURN)
  if end == tokenizer.unk_id or tokenizer.id_to_piece(end) != END_OF_TURN:
    raise ValueError(f"{tokenizer!r} has no {END_OF_TURN} token")
  return (end, tokenizer.eos_id)
