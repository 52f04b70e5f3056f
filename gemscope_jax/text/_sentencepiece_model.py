"""A SentencePiece model rebuilt from GGUF tokenizer metadata.

`proto_from_metadata` turns the `tokenizer.ggml.*` values that
`_gguf_metadata` reads back into a serialized SentencePiece `ModelProto`
(BPE, byte fallback, identity normalizer, the dummy prefix as the metadata
says), the same bytes as a `tokenizer.model` file; `load_processor` runs such
bytes with the `sentencepiece` library.

Main caveat: only `tokenizer.ggml.model == "llama"` (a SentencePiece
vocabulary) is accepted, and the rebuilt model is only as faithful as the
metadata; it is verified for Gemma 3 alone. Two of llama.cpp's conversions
are undone here: its `<unk>` marked CONTROL is typed UNKNOWN again, and the
spaces it writes in user-defined pieces become U+2581 again. Building the
proto needs the `protobuf` package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sentencepiece

from gemscope_jax.text import _gguf_metadata

# llama.cpp's token types, which are SentencePiece's piece types by number.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SPIECE_SPACE = "\u2581"

_KEY_MODEL = _gguf_metadata.KEY_MODEL
_KEY_TOKENS = _gguf_metadata.KEY_TOKENS
_KEY_SCORES = _gguf_metadata.KEY_SCORES
_KEY_TYPES = _gguf_metadata.KEY_TYPES
_KEY_IDS = _gguf_metadata.KEY_IDS
_KEY_SPACE_PREFIX = _gguf_metadata.KEY_SPACE_PREFIX
_KEY_REMOVE_SPACES = _gguf_metadata.KEY_REMOVE_SPACES
_KEY_CHARSMAP = _gguf_metadata.KEY_CHARSMAP


def _model_pb2():
  try:
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel  # heavy: protobuf
  except ImportError as e:  # the generated module needs protobuf
    raise ImportError(
        "building a SentencePiece model from GGUF metadata needs the "
        "'protobuf' package") from e
  return sentencepiece_model_pb2


def _require(meta: dict[str, Any], key: str, source: str) -> Any:
  if key not in meta:
    raise ValueError(f"{source} has no tokenizer metadata field '{key}' "
                     "(not a GGUF with an embedded SentencePiece tokenizer?)")
  return meta[key]


def proto_from_metadata(meta: dict[str, Any], source: str) -> bytes:
  """Serialized SentencePiece ModelProto equivalent to the GGUF metadata.

  Args:
    meta: the `tokenizer.ggml.*` values, as `_gguf_metadata` returns them.
    source: the file they came from, for error messages.

  Returns:
    The ModelProto bytes (what a `.model` file holds).

  Raises:
    ValueError: a field is missing or inconsistent, or the vocabulary is not
      a SentencePiece one; the message names `source` and the field.
    ImportError: the `protobuf` package is missing.
  """
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


def load_processor(data: bytes,
                   source: str) -> sentencepiece.SentencePieceProcessor:
  """A SentencePiece processor running serialized ModelProto `data`.

  Args:
    data: the ModelProto bytes.
    source: where they came from, for error messages.

  Returns:
    The loaded processor.

  Raises:
    ValueError: `data` is not a valid SentencePiece model.
  """
  proc = sentencepiece.SentencePieceProcessor()
  try:
    proc.LoadFromSerializedProto(data)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"{source}: not a valid SentencePiece model ({e})") from e
  return proc
