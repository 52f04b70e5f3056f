"""Gemma 3 checkpoints by Hugging Face Hub name: `google/gemma-3-1b-it`.

`load_model` hands any string that is not an existing path and reads as a
repo id (`owner/name`, optionally `owner/name@revision`) to `download_model`,
which fetches only what `hf.load_hf` reads: `config.json` first (a model of
another architecture is refused before any weight is downloaded), then
`model.safetensors`, or, for sharded checkpoints, the shards the index
names for text-decoder tensors. Shards that hold only the vision tower of a
multimodal 4B-27B checkpoint are never downloaded.

huggingface_hub does the fetching, so its cache (`HF_HOME`, `HF_HUB_CACHE`),
offline mode (`HF_HUB_OFFLINE=1`: only the local cache is read), tokens
(`HF_TOKEN`, `hf auth login`; Gemma repos are gated) and endpoint settings
apply unchanged; `snapshot` turns its errors into the package's own
(`errors.MissingInputError`, a FileNotFoundError, or `errors.InputError`)
naming the repo and what was looked for.

Caveat: huggingface_hub is imported only when a name is fetched; it is not a
core dependency (`pip install huggingface_hub`). In offline mode a cache that
lacks a requested file is only detected when huggingface_hub kept the repo's
file listing; otherwise the caller's own check (a missing config.json,
shard or folder) names it.
"""

from __future__ import annotations

import pathlib
import re
from typing import NamedTuple, Sequence

from gemscope_jax import errors
from gemscope_jax.convert import hf

# Hub repo ids: `owner/name` of letters, digits, `-`, `_`, `.` (at most 96
# characters, no `--` or `..`: huggingface_hub's own rule), then an optional
# `@revision` (branch, tag or commit).
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/"
                      r"[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[^\s@/]+))?")


class RepoRef(NamedTuple):
  """A repo id and the revision asked for (None: the default branch)."""
  repo: str
  revision: str | None = None

  def __str__(self) -> str:
    return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_repo_id(name: str) -> RepoRef | None:
  """`RepoRef` of 'owner/name[@revision]', or None if `name` is not one."""
  m = _REPO_ID.fullmatch(str(name))
  if not m:
    return None
  repo = m.group("repo")
  if (len(repo) > 96 or "--" in repo or ".." in repo
      or repo.endswith((".git", "."))):
    return None
  return RepoRef(repo, m.group("rev"))


def _hub():
  try:
    # Submodules by name: the package's face loads them lazily.
    import huggingface_hub  # pylint: disable=import-outside-toplevel  (optional: only loading by Hub name needs it)
    import huggingface_hub.constants  # pylint: disable=import-outside-toplevel  (optional: only loading by Hub name needs it)
    import huggingface_hub.errors  # pylint: disable=import-outside-toplevel  (optional: only loading by Hub name needs it)
  except ImportError as e:
    raise ImportError("loading by Hub name needs huggingface_hub "
                      "(pip install huggingface_hub)") from e
  return huggingface_hub


def snapshot(ref: RepoRef, patterns: Sequence[str], what: str
             ) -> pathlib.Path:
  """The local snapshot folder of `ref` holding the files matching `patterns`.

  Args:
    ref: the repo and revision.
    patterns: huggingface_hub `allow_patterns` (fnmatch, `*` crosses `/`).
    what: what the caller looks for, named in error messages
      ("config.json", "folder resid_post/layer_12_width_16k_l0_medium").

  Returns:
    The snapshot folder (files that do not exist in the repo are absent: the
    caller checks for what it needs).

  Raises:
    errors.MissingInputError: (a FileNotFoundError) no such repo or
      revision, or not in the local cache while offline (the message names
      the repo and `what`).
    errors.InputError: a gated repo without an accepted licence or token.
    errors.UsageError: an invalid repo id.
  """
  hub = _hub()
  hub_errors = hub.errors
  missing = errors.MissingInputError
  where = f"{ref}: {what}"
  try:
    return pathlib.Path(hub.snapshot_download(
        ref.repo, revision=ref.revision, allow_patterns=list(patterns)))
  except hub_errors.GatedRepoError as e:
    raise errors.InputError(
        f"{where}: the repo is gated; accept its licence on the Hub with your "
        "account, then set HF_TOKEN or run `hf auth login`") from e
  except hub_errors.RepositoryNotFoundError as e:
    raise missing(
        f"{where}: no such repo on the Hub (or it is private and no valid "
        "token is set: HF_TOKEN or `hf auth login`)") from e
  except hub_errors.RevisionNotFoundError as e:
    raise missing(f"{where}: the repo has no revision {ref.revision!r}"
                  ) from e
  except hub_errors.IncompleteSnapshotError as e:
    raise missing(f"{where}: the local cache holds only part of it and the "
                  f"Hub cannot be reached ({e})") from e
  except hub_errors.LocalEntryNotFoundError as e:
    cache = hub.constants.HF_HUB_CACHE
    offline = " (HF_HUB_OFFLINE is set)" if hub.constants.HF_HUB_OFFLINE else ""
    raise missing(f"{where}: not in the local Hugging Face cache {cache} and "
                  f"the Hub cannot be reached{offline}") from e
  except hub_errors.HFValidationError as e:
    raise errors.UsageError(f"{ref}: not a valid Hub repo id ({e})") from e


def download_model(name: str | RepoRef) -> pathlib.Path:
  """Fetches what `hf.load_hf` reads of a Gemma 3 repo; returns the folder.

  Args:
    name: 'owner/name[@revision]' or a `RepoRef`.

  Returns:
    The snapshot folder: config.json plus model.safetensors, or the index
    and the shards holding text-decoder tensors.

  Raises:
    errors.MissingInputError: see `snapshot`; or the repo has no
      config.json, or no safetensors weights (only .safetensors are read).
    CheckpointError: config.json names another architecture or is invalid.
  """
  ref = name if isinstance(name, RepoRef) else parse_repo_id(name)
  if ref is None:
    raise errors.UsageError(f"{name}: not a Hub repo id "
                            "('owner/name[@revision]')")
  folder = snapshot(ref, [hf.CONFIG, hf.INDEX], f"{hf.CONFIG}")
  # Later calls ask for the commit just fetched: one consistent snapshot
  # even if the branch moves meanwhile, and no second revision lookup.
  commit = RepoRef(ref.repo, folder.name)
  if not (folder / hf.CONFIG).is_file():
    raise errors.MissingInputError(f"{ref}: the repo has no {hf.CONFIG} (not a "
                            "transformers model repo?)")
  config = hf.config_from_hf(hf.read_hf_config(folder / hf.CONFIG),
                             str(folder / hf.CONFIG))
  index = folder / hf.INDEX
  if index.is_file():
    weight_map = hf.read_index(index)
    shards = sorted({weight_map[k] for k in hf.needed_keys(weight_map,
                                                            config)})
    snapshot(commit, shards, f"{len(shards)} weight shard(s) named by "
             f"{hf.INDEX}")
  else:
    snapshot(commit, [hf.SINGLE], hf.SINGLE)
    if not (folder / hf.SINGLE).is_file():
      raise errors.MissingInputError(
          f"{ref}: the repo has neither {hf.SINGLE} nor {hf.INDEX} (only "
          "safetensors weights are read)")
  return folder

