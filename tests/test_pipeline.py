"""Tests of the grain pipeline: token cache, window source, shuffling,
sharding and resuming an iterator from its saved state."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from gemscope_jax import text
from gemscope_jax.data import pipeline
from gemscope_jax.text.windows import Windows, for_loss, windows_from_ids
from gemscope_jax.text.tokenizer import default_tokenizer

SEQ_LEN = 16
# Few prefetch threads: the suite shares a small machine.
READ = pipeline.grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@pytest.fixture(scope="module")
def tok():
  return default_tokenizer()


@pytest.fixture(scope="module")
def shakespeare_text():
  return text.read_text(text.shakespeare_files()[:1])[10000:14000]


@pytest.fixture
def text_files(tmp_path, shakespeare_text):
  files = []
  for i, piece in enumerate([shakespeare_text[:1500],
                             shakespeare_text[1500:4000]]):
    path = tmp_path / f"part{i}.txt"
    path.write_text(piece, encoding="utf-8")
    files.append(path)
  return files


@pytest.fixture
def ids():
  # 203 tokens: 203 = 13 * 15 + 8, so the last of 14 windows is padded.
  return np.random.default_rng(0).integers(3, 1000, 203).astype(np.int32)


def _epoch_rows(ds):
  """Window ids (the first real token) of every non-padding row, in order."""
  rows = []
  for i in range(len(ds)):
    batch = ds[i]
    for tokens, mask in zip(batch["tokens"], batch["mask"]):
      if mask.any():
        rows.append(int(tokens[1]))
  return rows


def _index_source(n):
  # Window w's first real token is w + 100, so rows name their window.
  stream = np.repeat(np.arange(n, dtype=np.int32) + 100, SEQ_LEN - 1)
  return pipeline.TokenWindowSource(stream, SEQ_LEN, bos_id=2)


def test_source_matches_windows_from_ids(ids):
  src = pipeline.TokenWindowSource(ids, SEQ_LEN, bos_id=2)
  ref = windows_from_ids(ids, SEQ_LEN, 2)
  assert len(src) == ref.tokens.shape[0] == 14
  for i in range(len(src)):
    item = src[i]
    assert item["tokens"].dtype == np.int32 and item["mask"].dtype == bool
    np.testing.assert_array_equal(item["tokens"], ref.tokens[i])
    np.testing.assert_array_equal(item["mask"], ref.mask[i])
  assert src[-1]["mask"].sum() == 9  # BOS + 8 tokens
  with pytest.raises(IndexError):
    src[len(src)]


def test_source_from_real_files_matches_windows_from_files(tok, text_files,
                                                           tmp_path):
  from gemscope_jax.text.windows import windows_from_files
  src = pipeline.TokenWindowSource.from_files(
      tok, text_files, SEQ_LEN, cache_dir=tmp_path / "cache")
  ref = windows_from_files(tok, text_files, SEQ_LEN)
  got = [src[i] for i in range(len(src))]
  np.testing.assert_array_equal(np.stack([g["tokens"] for g in got]),
                                ref.tokens)
  np.testing.assert_array_equal(np.stack([g["mask"] for g in got]), ref.mask)


def test_batches_are_stacked_windows_and_last_is_padded(ids):
  src = pipeline.TokenWindowSource(ids, SEQ_LEN, bos_id=2)
  ds = pipeline.make_window_dataset(src, batch_size=4, seed=0, shuffle=False)
  ref = windows_from_ids(ids, SEQ_LEN, 2)
  batches = list(ref.batches(4))
  assert len(ds) == len(batches) == 4
  for i, (tokens, mask) in enumerate(batches):
    assert ds[i]["tokens"].shape == (4, SEQ_LEN)
    np.testing.assert_array_equal(ds[i]["tokens"], tokens)
    np.testing.assert_array_equal(ds[i]["mask"], mask)
  dropped = pipeline.make_window_dataset(src, batch_size=4, seed=0,
                                         shuffle=False, drop_remainder=True)
  assert len(dropped) == 3
  short = pipeline.make_window_dataset(src, batch_size=4, seed=0,
                                       shuffle=False, pad_remainder=False)
  assert short[3]["tokens"].shape == (2, SEQ_LEN)


def test_shuffle_is_a_seeded_permutation():
  src = _index_source(37)
  a = _epoch_rows(pipeline.make_window_dataset(src, batch_size=5, seed=1))
  b = _epoch_rows(pipeline.make_window_dataset(src, batch_size=5, seed=1))
  c = _epoch_rows(pipeline.make_window_dataset(src, batch_size=5, seed=2))
  assert a == b
  assert a != c
  assert a != sorted(a)
  assert sorted(a) == sorted(c) == list(range(100, 137))


def test_each_epoch_is_a_new_permutation():
  src = _index_source(20)
  rows = _epoch_rows(pipeline.make_window_dataset(src, batch_size=4, seed=3,
                                                  num_epochs=3))
  epochs = [rows[i * 20:(i + 1) * 20] for i in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(100, 120))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


@pytest.mark.parametrize("num_epochs", [1, 2])
def test_shards_are_disjoint_and_cover_each_epoch(num_epochs):
  n, count = 23, 3
  src = _index_source(n)
  shards = [_epoch_rows(pipeline.make_window_dataset(
      src, batch_size=4, seed=5, num_epochs=num_epochs, shard_index=i,
      shard_count=count)) for i in range(count)]
  for epoch in range(num_epochs):
    parts = []
    for rows in shards:
      size = len(rows) // num_epochs
      parts.append(set(rows[epoch * size:(epoch + 1) * size]))
    for i in range(count):
      for j in range(i + 1, count):
        assert not parts[i] & parts[j]
    assert set().union(*parts) == set(range(100, 100 + n))
    assert sum(len(p) for p in parts) == n
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.make_window_dataset(src, batch_size=4, seed=5, shard_index=3,
                                 shard_count=3)


def test_resume_from_saved_state_gives_the_same_batches():
  src = _index_source(50)
  ds = pipeline.make_window_dataset(src, batch_size=3, seed=7, num_epochs=2)
  it = pipeline.iterate(ds, READ)
  for _ in range(5):
    next(it)
  state = pipeline.iterator_state(it)
  assert isinstance(state, bytes)
  # Enough batches to cross the epoch boundary (50 windows = 17 batches).
  expected = [next(it) for _ in range(15)]
  resumed = pipeline.restore_iterator(ds, state, READ)
  got = [next(resumed) for _ in range(15)]
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e["tokens"], g["tokens"])
    np.testing.assert_array_equal(e["mask"], g["mask"])
  # A fresh iterator without the state starts over, elsewhere.
  fresh = next(pipeline.iterate(ds, READ))
  assert not np.array_equal(fresh["tokens"], expected[0]["tokens"])


def test_token_cache_is_read_back(tok, text_files, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  first = pipeline.tokenize_files(tok, text_files, cache_dir=cache)
  direct = np.concatenate([
      np.asarray(tok.encode(f.read_text(encoding="utf-8"), add_bos=False))
      for f in text_files])
  np.testing.assert_array_equal(first, direct)
  assert first.dtype == np.int32
  assert len(list(cache.glob("*.npy"))) == 2
  assert not list(cache.glob("*.partial"))

  def refuse(*args, **kwargs):
    raise AssertionError("the tokenizer ran despite the cache")

  monkeypatch.setattr(tok, "encode", refuse)
  second = pipeline.tokenize_files(tok, text_files, cache_dir=cache)
  np.testing.assert_array_equal(second, first)


def test_changed_file_is_tokenized_again(tok, text_files, tmp_path,
                                         monkeypatch):
  cache = tmp_path / "cache"
  pipeline.tokenize_files(tok, text_files, cache_dir=cache)
  calls = []
  real_encode = tok.encode

  def counting(text, *args, **kwargs):
    calls.append(text)
    return real_encode(text, *args, **kwargs)

  monkeypatch.setattr(tok, "encode", counting)
  # New contents of a new size.
  text_files[1].write_text("To be, or not to be.", encoding="utf-8")
  ids = pipeline.tokenize_files(tok, text_files, cache_dir=cache)
  assert calls == ["To be, or not to be."]
  tail = real_encode("To be, or not to be.", add_bos=False)
  np.testing.assert_array_equal(ids[-len(tail):], tail)
  # Same size, only the mtime moves: still re-tokenized.
  st = text_files[0].stat()
  os.utime(text_files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  calls.clear()
  pipeline.tokenize_files(tok, text_files, cache_dir=cache)
  assert len(calls) == 1
  # cache=False never reads the cache.
  calls.clear()
  pipeline.tokenize_files(tok, text_files, cache=False, cache_dir=cache)
  assert len(calls) == 2


def test_errors_name_the_bad_file(tok, text_files, tmp_path):
  missing = tmp_path / "nowhere.txt"
  with pytest.raises(FileNotFoundError, match="nowhere.txt"):
    pipeline.tokenize_files(tok, [text_files[0], missing],
                            cache_dir=tmp_path / "cache")
  empty = tmp_path / "blank.txt"
  empty.write_text("  \n", encoding="utf-8")
  with pytest.raises(ValueError, match="blank.txt"):
    pipeline.tokenize_files(tok, [text_files[0], empty],
                            cache_dir=tmp_path / "cache")
  with pytest.raises(ValueError):
    pipeline.tokenize_files(tok, [], cache_dir=tmp_path / "cache")


def test_parquet_and_array_record_shards_read_as_their_documents(
    tok, tmp_path):
  """A shard's documents tokenize exactly like the same text in a file."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python import array_record_module
  docs = [text.read_text(text.shakespeare_files()[i:i + 1])[:3000]
          for i in (2, 5, 9)]
  joined = tmp_path / "joined.txt"
  joined.write_text("\n\n".join(docs), encoding="utf-8")
  parquet = tmp_path / "docs.parquet"
  pq.write_table(pa.table({"id": [1, 2, 3], "text": docs}), parquet)
  ar = tmp_path / "docs.array_record"
  writer = array_record_module.ArrayRecordWriter(str(ar), "group_size:1")
  for d in docs:
    writer.write(d.encode("utf-8"))
  writer.close()
  want = pipeline.tokenize_files(tok, [joined], cache=False, progress=False)
  assert want.size > 1000
  for shard in (parquet, ar):
    got = pipeline.tokenize_files(tok, [shard], cache=False, progress=False)
    np.testing.assert_array_equal(got, want)
  bad = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"content": docs}), bad)
  with pytest.raises(ValueError, match=r"bad\.parquet.*'text'.*content"):
    pipeline.read_documents(bad)


def test_english_corpus_split_is_by_file_and_disjoint():
  from gemscope_jax.text import corpora as text_lib
  train = text_lib.english_files()
  heldout = text_lib.english_heldout_files()
  everything = text_lib.shakespeare_files() + text_lib.python_doc_files()
  assert not set(train) & set(heldout)
  assert set(train) | set(heldout) == set(everything)
  assert all(text_lib.is_heldout(f) for f in heldout)
  assert not any(text_lib.is_heldout(f) for f in train)
  # About one file in ten, decided by name alone (the same on any machine).
  assert 0.03 < len(heldout) / len(everything) < 0.2
  assert text_lib.is_heldout(pathlib.Path("/elsewhere") / heldout[0].name)


def test_spread_first_moves_evenly_spaced_windows_to_the_front():
  """Window w of a stream 0, 1, 2, ... starts with token w * (T - 1), so the
  order of the result says which windows went where."""
  body = SEQ_LEN - 1
  w = windows_from_ids(np.arange(40 * body - 5), SEQ_LEN, 2)
  w = Windows(w.tokens, w.mask, exclude=w.tokens % 3 == 0)
  origin = lambda v: v.tokens[:, 1] // body
  moved = w.spread_first(5)
  np.testing.assert_array_equal(origin(moved)[:5], [0, 10, 20, 29, 39])
  rest = [i for i in range(40) if i not in (0, 10, 20, 29, 39)]
  np.testing.assert_array_equal(origin(moved)[5:], rest)
  # The same windows, each with its own mask and exclude.
  order = origin(moved)
  np.testing.assert_array_equal(moved.mask, w.mask[order])
  np.testing.assert_array_equal(moved.exclude, w.exclude[order])
  assert moved.num_tokens == w.num_tokens
  assert w.spread_first(40) is w and w.spread_first(100) is w
  # for_loss: 'leading' leaves the windows alone; 'spread' moves as many
  # windows as loss_tokens positions need (ceil(33 / 16) = 3), rounded up
  # to whole batches.
  assert for_loss(w, 33, "leading") is w and for_loss(w, None, "spread") is w
  np.testing.assert_array_equal(origin(for_loss(w, 33, "spread"))[:3],
                                [0, 20, 39])
  np.testing.assert_array_equal(
      origin(for_loss(w, 33, "spread", batch_size=2))[:4], [0, 13, 26, 39])
  with pytest.raises(ValueError, match=r"loss_windows.*'leading', 'spread'"):
    for_loss(w, 33, "first")
