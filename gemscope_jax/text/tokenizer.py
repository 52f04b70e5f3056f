"""The Gemma 3 tokenizer, rebuilt offline from a GGUF file's metadata.

A GGUF carries no `tokenizer.model`; it stores the SentencePiece vocabulary
as llama.cpp metadata (`tokenizer.ggml.*`: pieces, scores, token types and the
special ids). `Tokenizer.from_gguf` reads that metadata (`_gguf_metadata`),
turns it back into a SentencePiece `ModelProto` (BPE, byte fallback, identity
normalizer, no dummy prefix; `_sentencepiece_model`) and runs it with the
`sentencepiece` library, so no hub download is ever needed. The proto can be
serialized and cached, and official `tokenizer.model` files load through the
same class; `default_tokenizer()` is the default model's, cached on disk.

Main caveat: the rebuilt model is only as faithful as the GGUF metadata, and
it is verified only for Gemma 3 (tests/test_tokenizer.py); other SentencePiece
("llama") GGUFs load but are untested. It follows SentencePiece (and
llama.cpp), not transformers' GGUF tokenizer, where the two differ: Gemma's
user-defined whitespace pieces (runs of 2..31 spaces) are matched whole,
longest first, so a run of 32+ spaces splits as 31 + rest, whereas
transformers splits it by BPE merges; on all other text tested (Shakespeare,
the Python manual, unicode edge cases) the ids agree exactly. Control tokens
written literally in the text (`<start_of_turn>`, `<bos>`, ...) are encoded
as their single ids by default, as transformers and llama.cpp do; pass
`parse_special=False` to tokenize them as plain text. A literal U+2581 in the
text reads as a space (Gemma's own whitespace mark), so it does not survive
`decode(encode(text))`.
"""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from gemscope_jax import assets
from gemscope_jax.text import _gguf_metadata
from gemscope_jax.text import _sentencepiece_model


# --- the tokenizer ----------------------------------------------------------


class Tokenizer:
  """A SentencePiece tokenizer with Gemma's special-token conventions.

  Build it with one of the `from_*` classmethods. Control and unknown tokens
  written literally in text are split out and encoded as their own ids
  (matching transformers); `decode` drops pad/bos/eos and writes every other
  special token back as its literal text, so `decode(encode(t)) == t` unless
  `t` holds a literal `<bos>`, `<eos>`, `<pad>` or U+2581.
  """

  def __init__(self, data: bytes, source: str = "<serialized>"):
    """Wraps a serialized SentencePiece ModelProto.

    Args:
      data: the ModelProto bytes (the content of a `.model` file).
      source: where they came from, for error messages.
    """
    self._data = bytes(data)
    self._source = source
    self._sp = _sentencepiece_model.load_processor(self._data, source)
    sp = self._sp
    n = sp.GetPieceSize()
    special = [i for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i)]
    self._special_ids = frozenset(special)
    self._special_pieces = {sp.IdToPiece(i): i for i in special}
    # Longest match first, so `<unused12>` wins over a hypothetical `<unused1>`.
    self._special_lengths = sorted({len(p) for p in self._special_pieces},
                                   reverse=True)
    self._special_starts = frozenset(p[0] for p in self._special_pieces)
    self._skipped_on_decode = frozenset(
        i for i in (sp.pad_id(), sp.bos_id(), sp.eos_id()) if i >= 0)

  # -- constructors --

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
    """Builds the tokenizer embedded in a GGUF file's metadata.

    Args:
      path: a GGUF file holding `tokenizer.ggml.*` SentencePiece metadata.

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: not a GGUF, no tokenizer fields, or a non-SentencePiece
        tokenizer; the message names the file and the field.
    """
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"GGUF file not found: {path}")
    meta = _gguf_metadata.read_tokenizer_metadata(path)
    return cls(_sentencepiece_model.proto_from_metadata(meta, str(path)),
               str(path))

  @classmethod
  def from_gguf_reader(cls, reader: Any,
                       path: str | os.PathLike | None = None) -> Tokenizer:
    """Builds the tokenizer from an already open `gguf.GGUFReader`.

    Args:
      reader: the open reader (the weight loader's, to avoid a second parse).
      path: the file it reads, only for error messages; defaults to the file
        name of the reader's memory map.

    Returns:
      The tokenizer.
    """
    if path is None:
      # GGUFReader keeps no path of its own, but its np.memmap does.
      path = getattr(getattr(reader, "data", None), "filename", None)
    source = str(path) if path is not None else "<GGUFReader>"
    meta = _gguf_metadata.reader_tokenizer_metadata(reader)
    return cls(_sentencepiece_model.proto_from_metadata(meta, source), source)

  @classmethod
  def from_model_file(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a SentencePiece `.model` file (e.g. Gemma's `tokenizer.model`).

    Args:
      path: the model file.

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: the file is not a SentencePiece model.
    """
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"SentencePiece model file not found: {path}")
    return cls(path.read_bytes(), str(path))

  @classmethod
  def from_serialized(cls, data: bytes) -> Tokenizer:
    """Rebuilds a tokenizer from `serialized()` bytes."""
    return cls(data)

  # -- persistence --

  def serialized(self) -> bytes:
    """The SentencePiece ModelProto bytes, i.e. the `.model` file content."""
    return self._data

  def save(self, path: str | os.PathLike) -> None:
    """Writes the `.model` file atomically (temp file + rename).

    Args:
      path: destination; its parent directory is created if needed.
    """
    with assets.atomic_path(path) as tmp:
      tmp.write_bytes(self._data)

  # -- vocabulary --

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def special_ids(self) -> frozenset[int]:
    """Ids of control and unknown tokens (what activation harvesting drops)."""
    return self._special_ids

  def id_to_piece(self, i: int) -> str:
    """The vocabulary piece of id `i` (spaces appear as U+2581)."""
    self._check_id(i)
    return self._sp.IdToPiece(int(i))

  def piece_to_id(self, s: str) -> int:
    """The id of piece `s`; the unk id when `s` is not in the vocabulary."""
    return self._sp.PieceToId(s)

  def _check_id(self, i: int) -> None:
    if not 0 <= int(i) < self.vocab_size:
      raise ValueError(f"token id {i} outside the vocabulary "
                       f"[0, {self.vocab_size})")

  # -- encoding --

  def _split_special(self, text: str) -> list[str | int]:
    """Cuts `text` into plain strings and ids of literal special tokens."""
    out: list[str | int] = []
    start = pos = 0
    end = len(text)
    starts = self._special_starts
    pieces = self._special_pieces
    lengths = self._special_lengths
    while pos < end:
      if text[pos] in starts:
        for n in lengths:
          hit = pieces.get(text[pos:pos + n])
          if hit is not None:
            if start < pos:
              out.append(text[start:pos])
            out.append(hit)
            pos += n
            start = pos
            break
        else:
          pos += 1
      else:
        pos += 1
    if start < end:
      out.append(text[start:])
    return out

  def _encode_many(self, texts: Sequence[str], add_bos: bool, add_eos: bool,
                   parse_special: bool) -> list[list[int]]:
    texts = list(texts)
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f"expected str, got {type(t).__name__}")
    if parse_special and self._special_pieces:
      parts = [self._split_special(t) if any(c in t for c in
                                             self._special_starts) else [t]
               for t in texts]
    else:
      parts = [[t] for t in texts]
    # One batched call for all plain segments: sentencepiece releases the GIL
    # and loops in C++.
    plain = [p for ps in parts for p in ps if isinstance(p, str)]
    encoded = iter(self._sp.EncodeAsIds(plain) if plain else [])
    out = []
    for ps in parts:
      ids = [self.bos_id] if add_bos and self.bos_id >= 0 else []
      for p in ps:
        if isinstance(p, int):
          ids.append(p)
        else:
          ids.extend(next(encoded))
      if add_eos and self.eos_id >= 0:
        ids.append(self.eos_id)
      out.append(ids)
    return out

  def encode(self, text: str, add_bos: bool = True, add_eos: bool = False,
             *, parse_special: bool = True) -> list[int]:
    """Token ids of `text`.

    Args:
      text: the text.
      add_bos: prepend the bos id (Gemma expects it).
      add_eos: append the eos id.
      parse_special: encode control tokens written in the text
        (`<start_of_turn>`, `<bos>`, ...) as their single ids, as transformers
        and llama.cpp do; if False they are tokenized as ordinary characters.

    Returns:
      The ids.
    """
    return self._encode_many([text], add_bos, add_eos, parse_special)[0]

  def encode_batch(self, texts: Iterable[str], add_bos: bool = True,
                   add_eos: bool = False, *,
                   parse_special: bool = True) -> list[list[int]]:
    """`encode` over many texts in one batched sentencepiece call.

    Args:
      texts: the texts.
      add_bos: prepend the bos id to each.
      add_eos: append the eos id to each.
      parse_special: as in `encode`.

    Returns:
      One id list per text.
    """
    return self._encode_many(list(texts), add_bos, add_eos, parse_special)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, dropping pad/bos/eos.

    Other special tokens (`<start_of_turn>`, `<unk>`, ...) are written as their
    literal piece, so text holding them round-trips through `encode`.

    Args:
      ids: token ids (a list, tuple or integer array).

    Returns:
      The text.
    """
    ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
    out: list[str] = []
    run: list[int] = []
    for i in ids:
      self._check_id(i)
      if i in self._special_ids:
        # Byte-fallback pieces only fuse into characters within one decode
        # call, so plain ids are decoded in runs between special tokens.
        if run:
          out.append(self._sp.DecodeIds(run))
          run = []
        if i not in self._skipped_on_decode:
          out.append(self._sp.IdToPiece(i))
      else:
        run.append(i)
    if run:
      out.append(self._sp.DecodeIds(run))
    return "".join(out)

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, source={self._source!r})")


# --- the default model's tokenizer -----------------------------------------

_default_lock = threading.Lock()
_default: Tokenizer | None = None


def default_tokenizer() -> Tokenizer:
  """The tokenizer of the default Gemma 3 270M GGUF, built once and cached.

  The first call anywhere builds it from the GGUF metadata and writes the
  SentencePiece proto to `assets.cache_dir()`, keyed by the GGUF's sha256;
  later processes load that file, and later calls in this process reuse the
  same object.

  Returns:
    The shared tokenizer.
  """
  global _default  # pylint: disable=global-statement
  with _default_lock:
    if _default is not None:
      return _default
    target = (assets.cache_dir() /
              f"tokenizer-{assets.default_gguf_sha256()[:16]}.model")
    tok = None
    if target.is_file():
      try:
        tok = Tokenizer.from_model_file(target)
      except ValueError:
        tok = None  # a damaged cache file is rebuilt below
    if tok is None:
      tok = Tokenizer.from_gguf(assets.default_gguf_path())
      with assets.atomic_path(target) as tmp:
        tmp.write_bytes(tok.serialized())
    _default = tok
    return tok
