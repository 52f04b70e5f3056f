"""The Gemma 3 tokenizer, rebuilt offline from a GGUF file's metadata.

A GGUF carries no `tokenizer.model`; it stores the SentencePiece vocabulary
as llama.cpp metadata (`tokenizer.ggml.*`: pieces, scores, token types and the
special ids). This module turns that metadata back into a SentencePiece
`ModelProto` (BPE, byte fallback, identity normalizer, no dummy prefix) and
runs it with the `sentencepiece` library, so no hub download is ever needed.
The proto can be serialized and cached, and official `tokenizer.model` files
load through the same class.

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

import mmap
import os
import pathlib
import struct
import threading
from typing import Any, Iterable, Sequence

import numpy as np

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)  # v1 used 32-bit lengths; nothing current writes it

# GGUF metadata value types with a fixed width, as numpy dtypes.
_GGUF_SCALAR = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"),
    3: np.dtype("<i2"), 4: np.dtype("<u4"), 5: np.dtype("<i4"),
    6: np.dtype("<f4"), 7: np.dtype("?"), 10: np.dtype("<u8"),
    11: np.dtype("<i8"), 12: np.dtype("<f8"),
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9

# llama.cpp's token types, which are SentencePiece's piece types by number.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_KEY_MODEL = "tokenizer.ggml.model"
_KEY_TOKENS = "tokenizer.ggml.tokens"
_KEY_SCORES = "tokenizer.ggml.scores"
_KEY_TYPES = "tokenizer.ggml.token_type"
_KEY_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}
_KEY_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
_KEY_REMOVE_SPACES = "tokenizer.ggml.remove_extra_whitespaces"
_KEY_CHARSMAP = "tokenizer.ggml.precompiled_charsmap"
_WANTED_KEYS = frozenset(
    [_KEY_MODEL, _KEY_TOKENS, _KEY_SCORES, _KEY_TYPES, _KEY_SPACE_PREFIX,
     _KEY_REMOVE_SPACES, _KEY_CHARSMAP, *_KEY_IDS.values()])

_SPIECE_SPACE = "\u2581"


def _sentencepiece():
  # Imported lazily: the model code must stay importable without it.
  import sentencepiece  # pylint: disable=import-outside-toplevel
  return sentencepiece


def _model_pb2():
  try:
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # the generated module needs protobuf
    raise ImportError(
        "building a SentencePiece model from GGUF metadata needs the "
        "'protobuf' package") from e
  return sentencepiece_model_pb2


# --- GGUF metadata ---------------------------------------------------------


def _read_gguf_tokenizer_metadata(path: pathlib.Path) -> dict[str, Any]:
  """Reads only the `tokenizer.ggml.*` metadata of a GGUF file.

  gguf.GGUFReader also indexes every tensor and builds one numpy view per
  string (~13 s on the Gemma 3 GGUF); walking the key/value section alone
  takes a fraction of a second.

  Args:
    path: the GGUF file.

  Returns:
    The wanted keys present in the file: strings as str, numeric arrays as
    numpy arrays, string arrays as lists of str, scalars as Python values.

  Raises:
    ValueError: the file is not a GGUF v2/v3 file or is truncated.
  """
  with open(path, "rb") as f:
    try:
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError as e:  # an empty file cannot be mapped
      raise ValueError(f"{path} is not a GGUF file (it is empty)") from e
  try:
    return _parse_metadata(buf, path)
  except struct.error as e:
    raise ValueError(f"{path}: GGUF metadata is truncated or corrupt") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: GGUF metadata holds a string that is not "
                     f"UTF-8 ({e})") from e
  finally:
    buf.close()


def _parse_metadata(buf: mmap.mmap, path: pathlib.Path) -> dict[str, Any]:
  if buf[:4] != _GGUF_MAGIC:
    raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes)")
  version, _, kv_count = struct.unpack_from("<IQQ", buf, 4)
  if version not in _GGUF_VERSIONS:
    raise ValueError(f"{path} is GGUF version {version}; only versions "
                     f"{_GGUF_VERSIONS} are supported")
  unpack_len = struct.Struct("<Q").unpack_from
  size = len(buf)

  def read_str(pos: int) -> tuple[str, int]:
    (n,) = unpack_len(buf, pos)
    pos += 8
    if pos + n > size:
      raise struct.error("string runs past the end of the file")
    return buf[pos:pos + n].decode("utf-8"), pos + n

  def skip_or_read(pos: int, vtype: int, keep: bool) -> tuple[Any, int]:
    if vtype in _GGUF_SCALAR:
      dt = _GGUF_SCALAR[vtype]
      value = np.frombuffer(buf, dt, 1, pos)[0].item() if keep else None
      return value, pos + dt.itemsize
    if vtype == _GGUF_STRING:
      if keep:
        return read_str(pos)
      return None, pos + 8 + unpack_len(buf, pos)[0]
    if vtype == _GGUF_ARRAY:
      etype, count = struct.unpack_from("<IQ", buf, pos)
      pos += 12
      if etype in _GGUF_SCALAR:
        dt = _GGUF_SCALAR[etype]
        if pos + count * dt.itemsize > size:
          raise struct.error("array runs past the end of the file")
        value = np.frombuffer(buf, dt, count, pos).copy() if keep else None
        return value, pos + count * dt.itemsize
      if etype == _GGUF_STRING:
        items = []
        for _ in range(count):
          if keep:
            s, pos = read_str(pos)
            items.append(s)
          else:
            pos += 8 + unpack_len(buf, pos)[0]
        return (items if keep else None), pos
      # Nested arrays are legal GGUF but no tokenizer key uses them.
      values = []
      for _ in range(count):
        v, pos = skip_or_read(pos, etype, keep)
        values.append(v)
      return (values if keep else None), pos
    raise ValueError(f"{path}: unknown GGUF metadata value type {vtype}")

  pos = 24
  out: dict[str, Any] = {}
  for _ in range(kv_count):
    key, pos = read_str(pos)
    (vtype,) = struct.unpack_from("<I", buf, pos)
    keep = key in _WANTED_KEYS
    value, pos = skip_or_read(pos + 4, vtype, keep)
    if keep:
      out[key] = value
  return out


def _reader_metadata(reader: Any) -> dict[str, Any]:
  """The wanted `tokenizer.ggml.*` values of an open gguf.GGUFReader."""
  import gguf  # pylint: disable=import-outside-toplevel

  out: dict[str, Any] = {}
  for key in _WANTED_KEYS:
    field = reader.fields.get(key)
    if field is None:
      continue
    types = list(field.types)
    if types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
      # One bytes() per part is far cheaper than field.contents(), which
      # goes through generic per-item conversion.
      out[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    elif types and types[0] == gguf.GGUFValueType.ARRAY:
      if field.data:
        out[key] = np.concatenate([np.asarray(field.parts[i]) for i in field.data])
      else:
        out[key] = np.zeros((0,), np.float32)
    else:
      out[key] = field.contents()
  return out


# --- building the SentencePiece model -------------------------------------


def _require(meta: dict[str, Any], key: str, source: str) -> Any:
  if key not in meta:
    raise ValueError(f"{source} has no tokenizer metadata field '{key}' "
                     "(not a GGUF with an embedded SentencePiece tokenizer?)")
  return meta[key]


def _proto_from_metadata(meta: dict[str, Any], source: str) -> bytes:
  """Serialized SentencePiece ModelProto equivalent to the GGUF metadata."""
  model = _require(meta, _KEY_MODEL, source)
  if model != "llama":
    raise ValueError(
        f"{source}: field '{_KEY_MODEL}' is {model!r}; only 'llama' "
        "(a SentencePiece BPE vocabulary, as Gemma uses) is supported")
  tokens = _require(meta, _KEY_TOKENS, source)
  scores = np.asarray(_require(meta, _KEY_SCORES, source), np.float32)
  types = np.asarray(_require(meta, _KEY_TYPES, source), np.int64)
  n = len(tokens)
  if n == 0:
    raise ValueError(f"{source}: field '{_KEY_TOKENS}' is empty")
  if len(scores) != n or len(types) != n:
    raise ValueError(
        f"{source}: fields '{_KEY_TOKENS}' ({n}), '{_KEY_SCORES}' "
        f"({len(scores)}) and '{_KEY_TYPES}' ({len(types)}) differ in length")
  bad = ~np.isin(types, [_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED,
                         _UNUSED, _BYTE])
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{source}: field '{_KEY_TYPES}' has unknown token type "
                     f"{int(types[i])} at id {i}")

  ids = {}
  for name, key in _KEY_IDS.items():
    value = meta.get(key)
    if value is not None and not 0 <= int(value) < n:
      raise ValueError(f"{source}: field '{key}' = {value} is outside the "
                       f"vocabulary of {n} tokens")
    ids[name] = -1 if value is None else int(value)
  if ids["unk"] < 0:
    # SentencePiece needs exactly one unknown piece; fall back on the type.
    unknown = np.flatnonzero(types == _UNKNOWN)
    if len(unknown) != 1:
      raise ValueError(f"{source} has no tokenizer metadata field "
                       f"'{_KEY_IDS['unk']}' and no single unknown token")
    ids["unk"] = int(unknown[0])
  types = types.copy()
  # llama.cpp's Gemma conversion marks <unk> as CONTROL; SentencePiece insists
  # the unk id carry the UNKNOWN type, and any other UNKNOWN would be a second.
  others = np.flatnonzero(types == _UNKNOWN)
  others = others[others != ids["unk"]]
  if len(others):
    raise ValueError(f"{source}: field '{_KEY_TYPES}' marks ids "
                     f"{others[:5].tolist()} unknown besides the unk id "
                     f"{ids['unk']}")
  types[ids["unk"]] = _UNKNOWN

  # llama.cpp's add_space_prefix defaults to on for SentencePiece vocabularies.
  add_prefix = bool(meta.get(_KEY_SPACE_PREFIX, True))

  pb2 = _model_pb2()
  proto = pb2.ModelProto()
  trainer = proto.trainer_spec
  trainer.model_type = pb2.TrainerSpec.BPE
  trainer.vocab_size = n
  trainer.byte_fallback = bool((types == _BYTE).any())
  # Encoding reads only byte_fallback and treat_whitespace_as_suffix here;
  # the other trainer fields just record what the vocabulary is like.
  trainer.treat_whitespace_as_suffix = False
  trainer.allow_whitespace_only_pieces = True
  trainer.split_digits = True
  for name in ("unk", "bos", "eos", "pad"):
    setattr(trainer, f"{name}_id", ids[name])
    if ids[name] >= 0:
      setattr(trainer, f"{name}_piece", tokens[ids[name]])
  trainer.vocabulary_output_piece_score = True
  trainer.hard_vocab_limit = True

  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = add_prefix
  norm.remove_extra_whitespaces = bool(meta.get(_KEY_REMOVE_SPACES, False))
  norm.escape_whitespaces = True
  charsmap = meta.get(_KEY_CHARSMAP)
  if charsmap is not None and len(charsmap):
    # The same blob SentencePiece keeps in its normalizer spec (Gemma has none).
    norm.name = "precompiled"
    norm.precompiled_charsmap = np.asarray(charsmap, np.uint8).tobytes()

  seen: dict[str, int] = {}
  type_list = types.tolist()
  score_list = scores.tolist()
  for i, (piece, kind, score) in enumerate(zip(tokens, type_list, score_list)):
    if kind == _USER_DEFINED and " " in piece:
      # llama.cpp's converter writes U+2581 in user pieces back as spaces
      # (Gemma's runs of 2..31 spaces), but SentencePiece matches user pieces
      # in the escaped text, where every space is U+2581.
      piece = piece.replace(" ", _SPIECE_SPACE)
    if not piece:
      raise ValueError(f"{source}: field '{_KEY_TOKENS}' has an empty token "
                       f"at id {i}")
    if piece in seen:
      raise ValueError(f"{source}: field '{_KEY_TOKENS}' has {piece!r} at ids "
                       f"{seen[piece]} and {i}")
    seen[piece] = i
    sp = proto.pieces.add()
    sp.piece = piece
    sp.score = score
    sp.type = kind
  return proto.SerializeToString()


def _load_processor(data: bytes, source: str):
  spm = _sentencepiece()
  proc = spm.SentencePieceProcessor()
  try:
    proc.LoadFromSerializedProto(data)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"{source}: not a valid SentencePiece model ({e})") from e
  return proc


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
    self._sp = _load_processor(self._data, source)
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
    meta = _read_gguf_tokenizer_metadata(path)
    return cls(_proto_from_metadata(meta, str(path)), str(path))

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
    meta = _reader_metadata(reader)
    return cls(_proto_from_metadata(meta, source), source)

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
    from gemscope_jax import assets  # pylint: disable=import-outside-toplevel
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
  from gemscope_jax import assets  # pylint: disable=import-outside-toplevel
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
