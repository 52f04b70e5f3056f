"""Lazy package faces (PEP 562): a package lists what it exports and the
module each name comes from; a module is imported the first time one of its
names is used, so `import gemscope_jax.text` does not pull in JAX and the
command line starts quickly.

  __getattr__, __dir__, __all__ = _lazy.attach(__name__, {
      "Tokenizer": "gemscope_jax.text.tokenizer", ...},
      submodules=("corpora", "windows"))

Caveat: a name listed here that its module does not define fails only when
used; `tests/test_imports.py` resolves every export of every package.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable, Mapping


def attach(package: str, exports: Mapping[str, str],
           submodules: Iterable[str] = ()
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
  """(`__getattr__`, `__dir__`, `__all__`) for `package`'s `__init__`.

  Args:
    package: the package's `__name__`.
    exports: {public name: the module that defines it}.
    submodules: modules of the package reachable as attributes
      (`package.name`) without an explicit import.
  """
  exports = dict(exports)
  submodules = tuple(submodules)

  def __getattr__(name: str) -> Any:
    if name in exports:
      value = getattr(importlib.import_module(exports[name]), name)
    elif name in submodules:
      value = importlib.import_module(f"{package}.{name}")
    else:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    setattr(sys.modules[package], name, value)  # later lookups skip this
    return value

  def __dir__() -> list[str]:
    return sorted(set(exports) | set(submodules))

  return __getattr__, __dir__, sorted(exports)
