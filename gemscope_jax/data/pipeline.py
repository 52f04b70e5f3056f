"""A grain pipeline from text files to shuffled, sharded batches of windows.

Text files are tokenized once (the ids are cached on disk), concatenated into
one token stream and served as BOS-led windows by a random-access source
(`TokenWindowSource`, the same layout as `windows.windows_from_ids`).
`make_window_dataset` turns that source into a `grain.MapDataset` of batches
that is sharded, shuffled per epoch, repeated and batched; the position of an
iterator over it can be saved and restored (`iterator_state`,
`restore_iterator`) beside a training loop's Orbax checkpoint.

Main caveat: the stream is the plain concatenation of the files, as in
`windows_from_files`, so a window may straddle two files; and shards are
fixed strided subsets of the windows (shard `i` holds windows `i, i + n, ...`)
that are shuffled within themselves, so with a window count that is not a
multiple of the shard count the shards differ in length by one window and may
yield one batch more or fewer (pass `drop_remainder=True` to keep hosts in
lockstep).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
from typing import Any, Iterable, Sequence

import grain
import numpy as np
import tqdm

from gemscope_jax import assets

# Bump when the cache file layout changes, so old files are never misread.
_CACHE_VERSION = 1


def _tokenizer_fingerprint(tokenizer) -> str:
  """A short hash of the tokenizer's vocabulary size and serialized model."""
  h = hashlib.sha256()
  h.update(str(int(tokenizer.vocab_size)).encode())
  h.update(b"\0")
  h.update(tokenizer.serialized())
  return h.hexdigest()


def _cache_key(path: pathlib.Path, stat: os.stat_result,
               tokenizer_fp: str) -> str:
  # Size and mtime stand in for the contents: hashing every file on every
  # run would cost as much as reading it.
  key = json.dumps([_CACHE_VERSION, str(path), stat.st_size, stat.st_mtime_ns,
                    tokenizer_fp])
  return hashlib.sha256(key.encode()).hexdigest()[:32]


PARQUET_SUFFIXES = (".parquet",)
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")


def read_documents(path: str | os.PathLike, *,
                   text_field: str = "text") -> str:
  """The text of one file: plain text, or the documents of a shard.

  A `.parquet` file contributes its `text_field` column and an
  array_record file (`.array_record`) its records, decoded as UTF-8; the
  documents are joined by blank lines. Anything else is read as UTF-8 text
  (undecodable bytes replaced).

  Raises:
    ValueError: a parquet file without `text_field` (the message names the
      file and its columns).
  """
  path = pathlib.Path(path)
  if path.suffix in PARQUET_SUFFIXES:
    try:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel  (optional: pyarrow, only for .parquet files)
    except ImportError as e:
      raise ImportError(f"{path}: reading parquet needs pyarrow "
                        "(pip install pyarrow)") from e
    schema = pq.read_schema(path)
    if text_field not in schema.names:
      raise ValueError(f"{path}: parquet file has no {text_field!r} column "
                       f"(columns: {', '.join(schema.names)})")
    docs = pq.read_table(path, columns=[text_field]).column(0).to_pylist()
    return "\n\n".join(d for d in docs if d)
  if path.suffix in ARRAY_RECORD_SUFFIXES:
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel  (optional: array_record, not a direct dependency, only for .array_record files)
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
      records = reader.read_all()
    finally:
      reader.close()
    return "\n\n".join(r.decode("utf-8", errors="replace") for r in records)
  return path.read_text(encoding="utf-8", errors="replace")


def _check_text_file(path: pathlib.Path) -> os.stat_result:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such text file")
  return path.stat()


def tokenize_files(tokenizer, files: Iterable[str | os.PathLike], *,
                   cache: bool = True,
                   cache_dir: str | os.PathLike | None = None,
                   progress: bool | None = None) -> np.ndarray:
  """Tokenizes text files in order into one token stream (no BOS).

  Each file's ids are cached as a `.npy` file keyed by a hash of the file's
  absolute path, size and mtime and of the tokenizer (vocabulary size and
  serialized model), so a second run reads the cache and an edited file or a
  different tokenizer is tokenized afresh. Cache files are written atomically.

  Args:
    tokenizer: a `gemscope_jax.tokenizer.Tokenizer` (needs `encode`,
      `vocab_size` and `serialized`).
    files: text files (UTF-8, undecodable bytes replaced) or parquet /
      array_record shards of documents (see `read_documents`).
    cache: whether to read and write the token cache.
    cache_dir: where the cache lives; `assets.cache_dir() / "tokens"` if None.
    progress: show a tqdm bar over the files with the token rate; None shows
      it only on a terminal.

  Returns:
    The int32 ids of all files, concatenated in order.

  Raises:
    FileNotFoundError: a file does not exist (the message names it).
    ValueError: a file holds no text, or `files` is empty.
  """
  paths = [pathlib.Path(f).resolve() for f in files]
  if not paths:
    raise ValueError("tokenize_files needs at least one text file")
  # Fail on a missing file before spending minutes on the ones before it.
  stats = [_check_text_file(p) for p in paths]
  root = pathlib.Path(cache_dir) if cache_dir is not None else (
      assets.cache_dir() / "tokens")
  fingerprint = _tokenizer_fingerprint(tokenizer) if cache else ""

  parts: list[np.ndarray] = []
  n_tokens = 0
  start = time.perf_counter()
  bar = tqdm.tqdm(paths, desc="tokenizing", unit="file",
                  disable=(None if progress is None else not progress))
  for path, stat in zip(bar, stats):
    target = root / f"{_cache_key(path, stat, fingerprint)}.npy"
    ids = None
    if cache and target.is_file():
      try:
        ids = np.load(target, allow_pickle=False)
      except (OSError, ValueError):
        ids = None  # a damaged cache file is rewritten below
    if ids is None:
      text = read_documents(path)
      if not text.strip():
        raise ValueError(f"{path}: the text file is empty")
      ids = np.asarray(tokenizer.encode(text, add_bos=False), np.int32)
      if cache:
        with assets.atomic_path(target) as tmp:
          # np.save appends ".npy" to a name without it; a file object keeps
          # the temporary name exactly.
          with open(tmp, "wb") as f:
            np.save(f, ids, allow_pickle=False)
    if ids.size == 0:
      raise ValueError(f"{path}: the text file is empty")
    parts.append(ids.astype(np.int32, copy=False))
    n_tokens += ids.size
    elapsed = max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(tokens=n_tokens, tok_per_s=f"{n_tokens / elapsed:,.0f}")
  bar.close()
  return np.concatenate(parts)


class TokenWindowSource:
  """Random-access windows of one token stream (grain's data source protocol).

  Window `i` is BOS followed by stream tokens `[i * (T - 1), (i + 1) * (T - 1))`;
  the last window is right-padded with 0 and its mask marks the real tokens,
  exactly as `windows.windows_from_ids(ids, T, bos_id)` lays them out. Windows
  are cut on access, so the source holds only the stream itself.
  """

  def __init__(self, ids: np.ndarray, seq_len: int, bos_id: int):
    """Wraps a token stream.

    Args:
      ids: the token stream, without BOS.
      seq_len: T, positions per window (BOS included); at least 2.
      bos_id: the BOS id written at position 0 of every window.

    Raises:
      ValueError: seq_len < 2, or the stream is empty or not 1-D.
    """
    if seq_len < 2:
      raise ValueError(f"seq_len must be at least 2 (BOS + 1 token), got "
                       f"{seq_len}")
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1 or ids.size == 0:
      raise ValueError(f"the token stream must be a non-empty 1-D array, got "
                       f"shape {ids.shape}")
    self.ids = ids
    self.seq_len = int(seq_len)
    self.bos_id = int(bos_id)

  @classmethod
  def from_files(cls, tokenizer, files: Iterable[str | os.PathLike],
                 seq_len: int, **tokenize_kwargs) -> TokenWindowSource:
    """Tokenizes `files` (see `tokenize_files`) and windows the stream."""
    ids = tokenize_files(tokenizer, files, **tokenize_kwargs)
    return cls(ids, seq_len, tokenizer.bos_id)

  def __len__(self) -> int:
    return -(-self.ids.size // (self.seq_len - 1))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    index = int(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"window {index} out of range for {n} windows")
    body = self.seq_len - 1
    chunk = self.ids[index * body:(index + 1) * body]
    tokens = np.zeros(self.seq_len, np.int32)
    tokens[0] = self.bos_id
    tokens[1:1 + chunk.size] = chunk
    mask = np.arange(self.seq_len) < chunk.size + 1
    return {"tokens": tokens, "mask": mask}

  def __repr__(self) -> str:
    return (f"TokenWindowSource(num_tokens={self.ids.size}, "
            f"seq_len={self.seq_len}, num_windows={len(self)})")


def _stack_padded(batch_size: int):
  """A grain batch_fn that stacks windows and pads a short batch.

  Padding rows are empty windows (tokens 0, mask all False), so every batch
  has the same shape and a jitted step compiles once; consumers must weight
  by the mask, as they already do for the padded tail of the last window.
  """

  def stack(items: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    # Every field of the items ("exclude" too, for conversation windows),
    # zero (False) on the padding rows.
    out = {k: np.zeros((batch_size, *v.shape), v.dtype)
           for k, v in items[0].items()}
    for row, item in enumerate(items):
      for k, v in item.items():
        out[k][row] = v
    return out

  return stack


def make_window_dataset(source: TokenWindowSource | Sequence[Any], *,
                        batch_size: int, seed: int, shuffle: bool = True,
                        num_epochs: int | None = 1,
                        drop_remainder: bool = False,
                        pad_remainder: bool = True,
                        shard_index: int = 0,
                        shard_count: int = 1) -> grain.MapDataset:
  """A `grain.MapDataset` of dict batches tokens (B, T) int32, mask (B, T) bool
  (and exclude (B, T) bool when the source's items have it).

  The order is shard, shuffle, repeat, batch: each shard is a fixed strided
  subset of the windows and every epoch is a fresh permutation of it (grain's
  `repeat` reseeds the shuffle directly below it per epoch), so shards are
  disjoint by construction and need no agreement on the seed. Shuffling
  before slicing would mix windows across shards between epochs, but its
  disjointness would rest on how grain's slice maps repeated indices.

  Batches run across epoch boundaries, so only the very last batch of a
  finite run can be short. It is dropped with `drop_remainder`; otherwise,
  with `pad_remainder` (the default), it is padded to `batch_size` with empty
  windows (mask all False) so the batch shape never changes, and without it it
  has fewer rows.

  Args:
    source: a `TokenWindowSource` (or any random-access sequence of such
      dicts, e.g. `text.conversations.ConversationWindowSource`).
    batch_size: windows per batch.
    seed: the shuffle seed; the same seed gives the same order on every host.
    shuffle: whether to shuffle the windows (per epoch).
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a final short batch.
    pad_remainder: pad a final short batch with empty windows (ignored when
      drop_remainder is set).
    shard_index: this process's shard, in [0, shard_count).
    shard_count: number of shards (e.g. `jax.process_count()`).

  Returns:
    The batched dataset; `iter(ds.to_iter_dataset())` gives a checkpointable
    iterator (see `iterator_state`).

  Raises:
    ValueError: a bad batch size, epoch count or shard, or an empty shard.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}), got "
                     f"{shard_index}")
  ds = grain.MapDataset.source(source)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"shard {shard_index} of {shard_count} holds no windows "
                     f"(the source has {len(source)})")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  batch_fn = (_stack_padded(batch_size)
              if pad_remainder and not drop_remainder else None)
  return ds.batch(batch_size, drop_remainder=drop_remainder,
                  batch_fn=batch_fn)


def iterate(dataset: grain.MapDataset | grain.IterDataset,
            read_options: grain.ReadOptions | None = None
            ) -> grain.DatasetIterator:
  """A checkpointable iterator over `dataset`.

  Args:
    dataset: a MapDataset (converted with `to_iter_dataset`) or IterDataset.
    read_options: grain's prefetch threads and buffer; grain's default (16
      threads, 500 elements) is generous for small machines.

  Returns:
    A `grain.DatasetIterator` with `get_state` / `set_state`.
  """
  if isinstance(dataset, grain.MapDataset):
    dataset = dataset.to_iter_dataset(read_options)
  return iter(dataset)


def iterator_state(it: grain.DatasetIterator) -> bytes:
  """The iterator's position as JSON bytes, to store beside a checkpoint.

  grain's state is a small JSON-able dict (for a MapDataset iterator,
  `{"next_index": n}`: the batches already handed out, not those prefetched).
  Bytes fit any store; with Orbax one can instead pass
  `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` as an item
  of a composite checkpoint.
  """
  return json.dumps(it.get_state(), sort_keys=True).encode("utf-8")


def restore_iterator(dataset: grain.MapDataset | grain.IterDataset,
                     state: bytes | str | dict[str, Any],
                     read_options: grain.ReadOptions | None = None
                     ) -> grain.DatasetIterator:
  """A fresh iterator over `dataset` that resumes at a saved position.

  Args:
    dataset: the same dataset (same source, seed, shard and batch size) the
      state was taken from; grain does not check this.
    state: `iterator_state`'s bytes (or the decoded dict of `get_state`).
    read_options: as in `iterate`.

  Returns:
    An iterator whose next batch is the one after the last saved one.
  """
  if isinstance(state, (bytes, str)):
    state = json.loads(state)
  it = iterate(dataset, read_options)
  it.set_state(state)
  return it
