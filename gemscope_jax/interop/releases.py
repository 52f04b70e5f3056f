"""Gemma Scope 2 dictionaries by name, fetched from the Hugging Face Hub.

The release is ten repos, `google/gemma-scope-2-{size}-{pt|it}`, each holding
one folder per dictionary (see `FAMILIES` and DESIGN.md section 4). Names
accepted by `resolve` (an optional `@revision` may follow the repo part):

- SAELens's release names,
  `gemma-scope-2-270m-pt-res/layer_12_width_16k_l0_medium`, i.e.
  `gemma-scope-2-{size}-{pt|it}-{alias}/{folder}` with the aliases of
  `ALIASES` (`res`, `att`, `mlp`, `transcoders`, each also `-all`, plus
  `clt` and `crosscoder`); the folder may repeat its family
  (`...-transcoders/transcoder/layer_9_...`, as SAELens's ids do);
- the repo and folder,
  `google/gemma-scope-2-270m-pt/resid_post/layer_12_width_16k_l0_medium`
  (`google/` may be left out);
- any other repo: `owner/name/sub/folder`, fetched as given, unchecked (a
  mirror, or one's own uploads).

Folder names: `layer_{L}_width_{W}_l0_{N}[_affine][_seed_{S}]` for the
single-layer families, `width_{W}_l0_{N}[_affine]` for `clt`, and
`layer_{L1}_{L2}_..._width_{W}_l0_{N}` for `crosscoder`; widths `WIDTHS`,
L0 labels `L0_LABELS`, layers below the size's layer count. Which
combinations a family publishes (`FAMILIES`) is only a hint in the error
for a folder the repo lacks: the Hub is the authority.

`fetch` downloads one folder with huggingface_hub (`snapshot_download` with
`allow_patterns=[folder + "/*"]`, so its cache, `HF_HUB_OFFLINE` and tokens
apply) and returns its local path.

Caveat: the published-combination hints come from SAELens 6.54's registry
and the technical report; CLT widths and L0 labels are the least certain.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from gemscope_jax import errors
from gemscope_jax.convert import hub

OWNER = "google"
REPO_PREFIX = "gemma-scope-2-"
# Model size -> (its Gemma 3 repo, number of layers, the four "sweep" layers
# at about 25/50/65/85 % depth that get the non-`_all` families).
SIZES = {
    "270m": ("google/gemma-3-270m", 18, (5, 9, 12, 15)),
    "1b": ("google/gemma-3-1b-pt", 26, (7, 13, 17, 22)),
    "4b": ("google/gemma-3-4b-pt", 34, (9, 17, 22, 29)),
    "12b": ("google/gemma-3-12b-pt", 48, (12, 24, 31, 41)),
    "27b": ("google/gemma-3-27b-pt", 62, (16, 31, 40, 53)),
}
VARIANTS = ("pt", "it")
WIDTHS = ("16k", "65k", "262k", "524k", "1m")
L0_LABELS = ("small", "medium", "big")

_SWEEP = {"widths": ("16k", "65k", "262k"), "l0": L0_LABELS, "layers": "sweep"}
_ALL = {"widths": ("16k", "262k"), "l0": ("small", "big"), "layers": "all"}
# Folder family -> what it publishes: widths, L0 labels, which layers, and
# whether it has `_affine` (skip-connection) variants.
FAMILIES = {
    "resid_post": {**_SWEEP, "widths": ("16k", "65k", "262k", "1m")},
    "attn_out": _SWEEP,
    "mlp_out": _SWEEP,
    "transcoder": {**_SWEEP, "affine": True},
    "resid_post_all": _ALL,
    "attn_out_all": _ALL,
    "mlp_out_all": _ALL,
    "transcoder_all": {**_ALL, "affine": True},
    "clt": {"widths": ("262k", "524k"), "l0": ("medium", "big"),
            "layers": "every layer, one folder", "affine": True},
    "crosscoder": {"widths": ("65k", "262k", "1m"), "l0": ("medium", "big"),
                   "layers": "sweep, all four in one folder"},
}
# SAELens release suffix -> folder family.
ALIASES = {
    "res": "resid_post", "att": "attn_out", "mlp": "mlp_out",
    "transcoders": "transcoder",
    "res-all": "resid_post_all", "att-all": "attn_out_all",
    "mlp-all": "mlp_out_all", "transcoders-all": "transcoder_all",
    "clt": "clt", "crosscoder": "crosscoder",
}

_REV = r"(?:@(?P<rev>[^\s@/]+))?"
_ALIAS_NAME = re.compile(rf"{REPO_PREFIX}(?P<size>[^-/@]+)-(?P<variant>[^-/@]+)"
                         rf"-(?P<alias>[^/@]+){_REV}/(?P<folder>.+)")
_REPO_NAME = re.compile(rf"(?:{OWNER}/)?{REPO_PREFIX}(?P<size>[^-/@]+)"
                        rf"-(?P<variant>[^-/@]+){_REV}/(?P<family>[^/]+)"
                        r"/(?P<folder>.+)")
_OTHER_NAME = re.compile(rf"(?P<repo>[^/@]+/[^/@]+){_REV}/(?P<folder>.+)")
_W, _N = r"(?P<width>[^_]+)", r"(?P<l0>[^_]+)"
_FOLDERS = {
    "single": re.compile(rf"layer_(?P<layer>\d+)_width_{_W}_l0_{_N}"
                         r"(?P<affine>_affine)?(?:_seed_\d+)?"),
    "clt": re.compile(rf"width_{_W}_l0_{_N}(?P<affine>_affine)?"),
    "crosscoder": re.compile(rf"layer_(?P<layers>\d+(?:_\d+)+)_width_{_W}"
                             rf"_l0_{_N}"),
}


@dataclasses.dataclass(frozen=True)
class Resolved:
  """Where a named dictionary lives.

  Attributes:
    repo: Hub repo id.
    revision: branch, tag or commit; None for the default branch.
    folder: the folder inside the repo
      ("resid_post/layer_12_width_16k_l0_medium").
    family: its folder family (a key of FAMILIES), None for another repo.
    size: the Gemma 3 size ("270m"), None for another repo.
  """
  repo: str
  revision: str | None
  folder: str
  family: str | None = None
  size: str | None = None

  @property
  def ref(self) -> hub.RepoRef:
    return hub.RepoRef(self.repo, self.revision)


def grammar() -> str:
  """What `resolve` accepts, for error messages."""
  return (
      f"a dictionary name is '{REPO_PREFIX}<size>-<pt|it>-<alias>/<folder>' "
      f"or '{OWNER}/{REPO_PREFIX}<size>-<pt|it>/<family>/<folder>' "
      "(optionally '@revision' after the repo part), or 'owner/repo/folder'; "
      f"sizes {', '.join(SIZES)}; aliases {', '.join(ALIASES)}; families "
      f"{', '.join(FAMILIES)}; folders 'layer_<L>_width_<W>_l0_<N>[_affine]', "
      "'width_<W>_l0_<N>[_affine]' (clt) or "
      "'layer_<L1>_<L2>_..._width_<W>_l0_<N>' (crosscoder) with widths "
      f"{', '.join(WIDTHS)} and L0 labels {', '.join(L0_LABELS)}")


def _refuse(name: str, problem: str) -> errors.UsageError:
  return errors.UsageError(f"{name}: {problem}; {grammar()}")


def _check(name: str, size: str, variant: str, family: str,
           folder: str) -> None:
  """Raises ValueError naming the first unknown part of a release name."""
  if size not in SIZES:
    raise _refuse(name, f"unknown model size {size!r} (valid: "
                  f"{', '.join(SIZES)})")
  if variant not in VARIANTS:
    raise _refuse(name, f"unknown variant {variant!r} (valid: "
                  f"{', '.join(VARIANTS)})")
  if family not in FAMILIES:
    raise _refuse(name, f"unknown family {family!r} (valid: "
                  f"{', '.join(FAMILIES)})")
  kind = family if family in ("clt", "crosscoder") else "single"
  m = _FOLDERS[kind].fullmatch(folder)
  if m is None:
    raise _refuse(name, f"folder {folder!r} is not a {family} folder name")
  if m.group("width") not in WIDTHS:
    raise _refuse(name, f"unknown width {m.group('width')!r} (valid: "
                  f"{', '.join(WIDTHS)})")
  if m.group("l0") not in L0_LABELS:
    raise _refuse(name, f"unknown L0 label {m.group('l0')!r} (valid: "
                  f"{', '.join(L0_LABELS)})")
  if "affine" in m.groupdict() and m.group("affine") and not FAMILIES[
      family].get("affine"):
    raise _refuse(name, f"only transcoder families have _affine folders, "
                  f"not {family}")
  n_layers = SIZES[size][1]
  layers = ([int(m.group("layer"))] if kind == "single" else
            [int(x) for x in m.group("layers").split("_")]
            if kind == "crosscoder" else [])
  bad = [l for l in layers if l >= n_layers]
  if bad:
    raise _refuse(name, f"layer {bad[0]} does not exist in Gemma 3 {size} "
                  f"(layers 0-{n_layers - 1})")


def resolve(name: str) -> Resolved:
  """The repo, revision and folder a dictionary name stands for.

  Raises:
    errors.UsageError: (a ValueError) not a dictionary name, or an unknown
      size, variant, family alias, width, L0 label or layer (the message
      lists the valid ones).
  """
  name = str(name).strip().strip("/")
  m = _ALIAS_NAME.fullmatch(name)
  if m:
    alias = m.group("alias")
    if alias not in ALIASES:
      raise _refuse(name, f"unknown release alias {alias!r} (valid: "
                    f"{', '.join(ALIASES)})")
    family, folder = ALIASES[alias], m.group("folder")
    # SAELens's transcoder ids repeat the family: "transcoder/layer_9_...".
    folder = folder.removeprefix(family + "/")
  else:
    m = _REPO_NAME.fullmatch(name)
    if m:
      family, folder = m.group("family"), m.group("folder")
  if m:
    size, variant = m.group("size"), m.group("variant")
    _check(name, size, variant, family, folder)
    return Resolved(f"{OWNER}/{REPO_PREFIX}{size}-{variant}", m.group("rev"),
                    f"{family}/{folder}", family, size)
  m = _OTHER_NAME.fullmatch(name)
  if m is None or hub.parse_repo_id(m.group("repo")) is None:
    raise _refuse(name, "not a dictionary name")
  if m.group("repo").startswith(f"{OWNER}/{REPO_PREFIX}"):
    raise _refuse(name, "not a Gemma Scope 2 repo (google/gemma-scope-2-"
                  "<size>-<pt|it>)")
  return Resolved(m.group("repo"), m.group("rev"), m.group("folder"))


def is_name(text: str) -> bool:
  """Whether `text` looks like a dictionary name rather than a local path
  (it may still fail `resolve`'s checks)."""
  text = str(text)
  if text.startswith(("/", ".", "~")) or "\\" in text:
    return False
  return text.startswith(REPO_PREFIX) or _OTHER_NAME.fullmatch(
      text.strip("/")) is not None


def _published(r: Resolved) -> str:
  if r.family is None:
    return ""
  f = FAMILIES[r.family]
  _, n_layers, sweep = SIZES[r.size]
  layers = (f"layers {', '.join(map(str, sweep))}" if f["layers"] == "sweep"
            else f"layers 0-{n_layers - 1}" if f["layers"] == "all"
            else f["layers"])
  return (f"; {r.family} publishes widths {', '.join(f['widths'])}, L0 "
          f"{', '.join(f['l0'])}, {layers}"
          f"{', with and without _affine' if f.get('affine') else ''}")


def fetch(name: str) -> pathlib.Path:
  """Downloads (or finds in the local cache) one dictionary folder.

  Args:
    name: a dictionary name (module docstring).

  Returns:
    The local folder (inside huggingface_hub's cache).

  Raises:
    errors.UsageError: an unknown name (see `resolve`).
    errors.MissingInputError: (a FileNotFoundError) no such repo or
      revision, not cached while offline, or the repo has no such folder
      (the message names repo and folder).
    errors.InputError: a gated repo without access.
  """
  r = resolve(name)
  what = f"folder {r.folder}"
  folder = hub.snapshot(r.ref, [r.folder + "/*"], what) / r.folder
  if not folder.is_dir() or not any(folder.iterdir()):
    raise errors.MissingInputError(
        f"{r.ref}: the repo has no {what}{_published(r)}")
  return folder
