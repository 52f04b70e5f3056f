"""The tokenizer metadata of a GGUF file, read without gguf.GGUFReader.

A GGUF stores its SentencePiece vocabulary as llama.cpp metadata
(`tokenizer.ggml.*`: pieces, scores, token types, the special ids and a few
normalizer flags). `read_tokenizer_metadata` walks only the key/value section
of the file and keeps only those keys, far faster than gguf.GGUFReader;
`reader_tokenizer_metadata` gets the same values from a reader that is
already open, so a weight loader need not parse the file twice.

Main caveat: the parser reads only little-endian GGUF versions 2 and 3 (what
llama.cpp and the gguf package write); a big-endian or v1 file is rejected
with a ValueError, and the values of keys it skips are not validated.
"""

from __future__ import annotations

import mmap
import pathlib
import struct
from typing import Any

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

KEY_MODEL = "tokenizer.ggml.model"
KEY_TOKENS = "tokenizer.ggml.tokens"
KEY_SCORES = "tokenizer.ggml.scores"
KEY_TYPES = "tokenizer.ggml.token_type"
KEY_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}
KEY_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
KEY_REMOVE_SPACES = "tokenizer.ggml.remove_extra_whitespaces"
KEY_CHARSMAP = "tokenizer.ggml.precompiled_charsmap"
_WANTED_KEYS = frozenset(
    [KEY_MODEL, KEY_TOKENS, KEY_SCORES, KEY_TYPES, KEY_SPACE_PREFIX,
     KEY_REMOVE_SPACES, KEY_CHARSMAP, *KEY_IDS.values()])


def read_tokenizer_metadata(path: pathlib.Path) -> dict[str, Any]:
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


def reader_tokenizer_metadata(reader: Any) -> dict[str, Any]:
  """The wanted `tokenizer.ggml.*` values of an open gguf.GGUFReader."""
  import gguf  # pylint: disable=import-outside-toplevel  # heavy: ~0.15 s

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
        out[key] = np.concatenate(
            [np.asarray(field.parts[i]) for i in field.data])
      else:
        out[key] = np.zeros((0,), np.float32)
    else:
      out[key] = field.contents()
  return out
