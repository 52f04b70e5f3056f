"""The package's import structure, read from the source (no model loads).

Packages sit in layers (the table `LAYERS`, lowest first, as in
gemscope_jax/__init__.py's docstring); a module imports only from its own
layer or lower ones, and the import graph has no cycle. Function-local
imports are allowed only for optional or heavy third-party dependencies and
for the command line's start-up time, each with a trailing comment saying
which; a function-local import of the package itself only ever dodged a
cycle, so only gemscope_jax/cli.py may have one. Every lazy package face
(`_lazy.attach`) resolves every name it exports, and every module imports in
any order.

The graph: one node per module (a package is its `__init__`); an edge for
every `import` and `from ... import` of a gemscope_jax module, resolving
`from pkg import name` to the submodule `pkg.name` when there is one, and to
the module a lazy face maps `name` to when `pkg` is a lazy face. Importing
`a.b.c` also runs the `__init__` of `a.b`; such package edges are added too,
except to the importer's own packages (Python has begun running those before
the importer starts).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import io
import os
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "gemscope_jax"
SRC = ROOT / PACKAGE

# Layer of each top-level part of the package, lowest first; a module may
# import from its own layer or a lower one. "" is gemscope_jax/__init__.py.
LAYERS: dict[str, int] = {
    "": 0, "_lazy": 0, "assets": 0, "errors": 0, "safe_write": 0,
    "text": 1,
    "kernels": 2,
    "models": 3,
    "convert": 4, "parallel": 4, "dictionaries": 4,
    "surgery": 5, "data": 5, "interop": 5,
    "evals": 6, "generate": 6, "dashboards": 6, "circuits": 6,
    "training": 7,
    "cli": 8,
}
# Parts that import nothing of the package (torch_dictionary is pure
# PyTorch, to be copied on its own next to a dictionary release).
STANDALONE = frozenset({"torch_dictionary"})
# The only module whose function-local imports of the package are allowed
# (they keep `gemscope` quick to start).
LOCAL_PACKAGE_IMPORTS_OK = frozenset({f"{PACKAGE}.cli"})


@dataclasses.dataclass(frozen=True)
class Import:
  importer: str   # module name
  target: str     # a gemscope_jax module, resolved as the docstring says
  line: int
  local: bool     # inside a function
  text: str       # the source line, for messages

  def describe(self) -> str:
    where = "function-local" if self.local else "top-level"
    return (f"{self.importer} imports {self.target} ({where}, "
            f"{_path(self.importer)}:{self.line}: {self.text})")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules() -> dict[str, pathlib.Path]:
  """{module name: file} for every module of the package."""
  return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))
          if "__pycache__" not in p.parts}


def _path(module: str) -> str:
  return str(_modules()[module].relative_to(ROOT))


def _is_package(module: str) -> bool:
  return _modules()[module].name == "__init__.py"


def _part(module: str) -> str:
  """The top-level part of the package a module belongs to ("" the root)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _ancestors(module: str) -> list[str]:
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def _tree(module: str) -> ast.Module:
  return ast.parse(_modules()[module].read_text(), filename=_path(module))


@functools.cache
def _lazy_face(package: str) -> tuple[dict[str, str], tuple[str, ...]] | None:
  """(exports, submodules) of a package whose `__init__` calls
  `_lazy.attach`, read from its source; None for other modules."""
  if package not in _modules() or not _is_package(package):
    return None
  for node in ast.walk(_tree(package)):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "attach"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "_lazy"):
      args = list(node.args[1:])
      kwargs = {k.arg: k.value for k in node.keywords}
      exports = ast.literal_eval(args[0] if args else kwargs["exports"])
      sub = (args[1] if len(args) > 1 else kwargs.get("submodules"))
      return exports, tuple(ast.literal_eval(sub)) if sub else ()
  return None


def _local_nodes(tree: ast.Module) -> set[int]:
  """ids of the import nodes that sit inside a function."""
  out = set()
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          out.add(id(node))
  return out


def _from_base(module: str, node: ast.ImportFrom) -> str:
  """The absolute module name of `from <base> import ...`."""
  if not node.level:
    return node.module or ""
  package = module if _is_package(module) else module.rpartition(".")[0]
  parts = package.split(".")
  base = parts[:len(parts) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _resolve(base: str, name: str) -> str:
  """The module `from base import name` runs, as far as it is ours."""
  if f"{base}.{name}" in _modules():
    return f"{base}.{name}"
  face = _lazy_face(base)
  if face is not None and name in face[0]:
    return face[0][name]
  return base


def _ours(name: str) -> bool:
  return name == PACKAGE or name.startswith(PACKAGE + ".")


@functools.cache
def _imports() -> tuple[Import, ...]:
  """Every import of a gemscope_jax module, with the package edges."""
  out = []
  for module in _modules():
    tree = _tree(module)
    lines = _modules()[module].read_text().splitlines()
    local = _local_nodes(tree)
    skip = {module, *_ancestors(module)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = _from_base(module, node)
        targets = [_resolve(base, a.name) if a.name != "*" else base
                   for a in node.names]
      else:
        continue
      for target in targets:
        if not _ours(target):
          continue
        for t in [*_ancestors(target), target]:
          if t in skip and t != target:
            continue
          if t == module:
            continue
          out.append(Import(module, t, node.lineno, id(node) in local,
                            lines[node.lineno - 1].strip()))
  return tuple(out)


def _find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """One cycle through each strongly connected component of more than one
  node (Tarjan), as [a, b, ..., a]."""
  index, low, on_stack, stack, sccs = {}, {}, set(), [], []
  counter = [0]

  def connect(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      scc = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        scc.add(w)
        if w == v:
          break
      if len(scc) > 1:
        sccs.append(scc)

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in sorted(edges):
    if v not in index:
      connect(v)

  cycles = []
  for scc in sccs:
    start = min(scc)
    # Shortest path from start back to start inside the component (BFS).
    parent = {start: None}
    queue, end = [start], None
    while queue and end is None:
      v = queue.pop(0)
      for w in sorted(edges.get(v, ())):
        if w not in scc:
          continue
        if w == start:
          end = v
          break
        if w not in parent:
          parent[w] = v
          queue.append(w)
    path = [start]
    v = end
    while v is not None and v != start:
      path.append(v)
      v = parent[v]
    path.append(start)
    cycles.append(path[:1] + path[1:-1][::-1] + path[-1:])
  return cycles


def _comments(module: str) -> dict[int, str]:
  """{line: comment text} of a module's source."""
  out = {}
  source = _modules()[module].read_text()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      out[tok.start[0]] = tok.string
  return out


_PYLINT = re.compile(r"pylint:\s*disable=[\w,-]+")


def _says_why(comment: str) -> bool:
  """Whether a comment explains itself beyond a pylint pragma."""
  return bool(re.search(r"\w", _PYLINT.sub("", comment.lstrip("#"))))


PARTS = sorted({_part(m) for m in _modules()})


# --------------------------------------------------------------------------


def test_the_layer_table_covers_every_part():
  unknown = [p for p in PARTS if p not in LAYERS and p not in STANDALONE]
  assert not unknown, (f"parts of {PACKAGE} with no layer: {unknown}; add "
                       "them to LAYERS in tests/test_imports.py")


def test_cycle_finder_names_the_cycle():
  edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"},
           "e2": {"e"}}
  assert _find_cycles(edges) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
  assert _find_cycles({"a": {"b"}, "b": set()}) == []


def test_resolution_of_from_imports():
  # A submodule, a lazy face's export, and a plain package attribute.
  assert _resolve(f"{PACKAGE}.convert", "pretrained") == \
      f"{PACKAGE}.convert.pretrained"
  assert _resolve(f"{PACKAGE}.models", "forward") == f"{PACKAGE}.models._api"
  assert _resolve(PACKAGE, "__version__") == PACKAGE


def test_top_level_imports_have_no_cycle():
  edges: dict[str, set[str]] = {m: set() for m in _modules()}
  for imp in _imports():
    if not imp.local:
      edges[imp.importer].add(imp.target)
  cycles = _find_cycles(edges)
  assert not cycles, "import cycles (top-level imports):\n" + "\n".join(
      "  " + " -> ".join(c) for c in cycles)


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p or PACKAGE)
def test_no_import_from_a_higher_layer(part):
  bad = []
  for imp in _imports():
    if _part(imp.importer) != part:
      continue
    target = _part(imp.target)
    if part in STANDALONE:
      bad.append(f"{imp.describe()}: {part} imports nothing of {PACKAGE}")
    elif part in LAYERS and target in LAYERS and \
        LAYERS[target] > LAYERS[part]:
      bad.append(f"{imp.describe()}: layer {LAYERS[part]} ({part or PACKAGE})"
                 f" imports layer {LAYERS[target]} ({target})")
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("part", PARTS, ids=lambda p: p or PACKAGE)
def test_function_local_imports(part):
  bad = []
  for module in _modules():
    if _part(module) != part:
      continue
    tree = _tree(module)
    local = _local_nodes(tree)
    comments = _comments(module)
    lines = _modules()[module].read_text().splitlines()
    for node in ast.walk(tree):
      if id(node) not in local:
        continue
      where = f"{_path(module)}:{node.lineno}: {lines[node.lineno - 1].strip()}"
      span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
      if not any(_says_why(comments.get(i, "")) for i in span):
        bad.append(f"{where}: a function-local import needs a trailing "
                   "comment saying why (optional or heavy dependency, CLI "
                   "start-up)")
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [_from_base(module, node)])
      if module not in LOCAL_PACKAGE_IMPORTS_OK and any(map(_ours, names)):
        bad.append(f"{where}: a function-local import of {PACKAGE} (only "
                   "gemscope_jax/cli.py may defer those; import at the top, "
                   "or move code so no cycle arises)")
  assert not bad, "\n".join(bad)


FACES = sorted(m for m in _modules() if _lazy_face(m) is not None)


@pytest.mark.parametrize("package", FACES)
def test_lazy_face_resolves_every_name(package):
  exports, submodules = _lazy_face(package)
  own = sorted(m.rpartition(".")[2] for m in _modules()
               if m.rpartition(".")[0] == package)
  clashes = sorted(set(exports) & set(own))
  assert not clashes, (f"{package} exports names that are also its "
                       f"submodules: {clashes} (once the submodule is "
                       "imported, the attribute is the module)")
  missing = sorted(set(submodules) - set(own))
  assert not missing, f"{package} lists submodules it lacks: {missing}"
  face = importlib.import_module(package)
  if "__all__" in vars(face):  # the root face keeps its names unlisted
    assert sorted(face.__all__) == sorted(exports)
  bad = []
  for name in sorted(exports):
    try:
      getattr(face, name)
    except Exception as e:  # pylint: disable=broad-except
      bad.append(f"{package}.{name} (from {exports[name]}): "
                 f"{type(e).__name__}: {e}")
  for name in submodules:
    try:
      getattr(face, name)
    except Exception as e:  # pylint: disable=broad-except
      bad.append(f"{package}.{name} (submodule): {type(e).__name__}: {e}")
  assert not bad, "names that do not resolve:\n" + "\n".join(bad)
  assert set(dir(face)) >= set(exports) | set(submodules)


_IMPORT_ALL = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
  try:
    importlib.import_module(name)
  except BaseException:
    failed.append(name)
    print(f"FAILED {name}:", traceback.format_exc(limit=-3), sep="\\n")
sys.exit(1 if failed else 0)
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600,
                        check=False)


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_any_order(order):
  names = sorted(_modules(), reverse=order == "reversed")
  r = _run(_IMPORT_ALL, *names)
  assert r.returncode == 0, (f"importing every module in {order} order:\n"
                             f"{r.stdout}{r.stderr[-3000:]}")


_NO_JAX = """
import importlib, sys
for name in sys.argv[1:]:
  importlib.import_module(name)
from gemscope_jax import cli
cli.build_parser()
heavy = sorted(m for m in ("jax", "flax", "numpy", "torch", "orbax")
               if m in sys.modules)
print(" ".join(heavy))
"""


def test_text_lazy_faces_and_cli_import_no_jax():
  """`text` is below JAX; a lazy face and `gemscope --help` load nothing
  heavy."""
  names = [m for m in _modules()
           if _part(m) == "text" or m in FACES or m == PACKAGE]
  r = _run(_NO_JAX, *sorted(names))
  assert r.returncode == 0, r.stderr[-3000:]
  loaded = r.stdout.split()
  assert "jax" not in loaded and "flax" not in loaded, (
      f"importing {sorted(names)} and gemscope_jax.cli loaded {loaded}")
