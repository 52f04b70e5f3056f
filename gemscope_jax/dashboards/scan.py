"""The dashboard scan: what a latent dashboard shows, for every latent of a
dictionary, in two streaming passes over text.

Each chunk of `batch_size` windows runs Gemma up to the dictionary's input
hookpoint(s) and encodes the activations into (width, tokens) latents
(latent-major, as the encoder matmul writes them) inside one jitted step,
which folds them into running per-latent buffers; nothing of size tokens x
width outlives a chunk. Pass 2 encodes pass 1's activations again, read
back from a file (`_acts_file`: in `state_dir`, else an anonymous temporary
file) when they fit in `cache_bytes` (2 GiB: 819k tokens of a 640-wide
hookpoint) and on the disk, else it runs Gemma again; either way it sees
the same activations bit for bit.

  pass 1  firing count, sum (float32, Kahan-compensated), max, and the k
          largest activations.
  pass 2  (needs each latent's max) a histogram of the firing activations,
          and per quantile bin its count and a uniform random sample of
          `per_bin` firing tokens.

Bins: every bin is [lo, hi), the last one closed, as `np.histogram`; a
latent's histogram has `hist_bins` bins with edges 0, then `hist_bins`
log-spaced values from max * 1e-3 to max, so the first bin [0, max * 1e-3)
holds all small activations and the counts sum to the firing count.
Quantile bins are `quantile_bins` equal intervals of [0, max] (fractions of
the latent's max, as SAEDashboard shows them).

Examples are flat token indices, window * seq_len + position. Tie rule:
equal keys (activation in pass 1, sampling priority in pass 2) rank the
smaller flat index first, exactly: a chunk's candidates come from
`lax.top_k` (lower index first on ties; a chunk's local order is flat
order) and buffers merge with a lexicographic sort on (-key, index). The
sample's priority is a hash of (flat index, latent, seed), so a bin keeps a
uniform random subset of its tokens, the same whatever the chunking. Each
kept example carries the latent's activation at positions pos - before ...
pos + after of its window (0 outside the window and at tokens that are not
ordinary), gathered as it enters the buffer, so no third pass is needed.

Resuming: with `state_dir`, the buffers, the pass and the next window are
saved atomically (`safe_write.atomic_path`) every `save_every_s` seconds,
at the end of each pass and when the scan stops on an exception; a rerun
with the same inputs continues from there and returns what an uninterrupted
scan returns (the tests check it bit for bit at the same `batch_size`).
The activation file in `state_dir` is resumed with it: the state records
how many windows it held (synced to disk first) and a rerun truncates it
there; a scan whose file is missing or short runs Gemma for pass 2. Its
inputs are fingerprinted (token hash, dictionary hash, model name, settings); a
different scan in the same folder is refused.

Sharding: with a ('data', 'model') mesh (`parallel.make_mesh`), the latent
axis of the encoder and of every buffer lies on the mesh axis the rules map
'latent' to, and the chunk's windows on the one 'batch' maps to, as
training lays out a dictionary (`parallel.MeshPlan.rules`); Gemma's
parameters are used as placed.

Memory (device): width x (k + quantile_bins * per_bin) x (before + 1 +
after) floats of contexts (4096 wide: 37 MB at the defaults), plus
width x hist_bins counts, plus one chunk's (width, batch_size * seq_len)
latents and a few arrays of that size (pass 2 takes its quantile bins
one at a time: 156 MB of temporaries at 4096 latents x 1024 tokens, by
XLA's memory analysis). Host: a chunk or two of activations in flight
(pass 2 waits for each chunk before it queues the next); the activation
file lies in the page cache or on disk, not in the process. Gemma's
blocks after the dictionary's deepest input are never run: a caller can
load only `blocks_needed(...)` of them (`convert.pretrained.load_model(
..., num_blocks=)`, as `gemscope dashboard` does).

Where the peak was (peak RSS of `dashboards.build.build_site` on Gemma 3
270M in float32, 2 CPU cores; VmRSS / VmHWM read from /proc/self/status
between stages; GB = 2^30 bytes, as the benchmark prints). Before: Python
and JAX 0.17 GB; loading the model peaked at 2.16-2.18 GB, numpy copies
of the whole 1.0 GB cache file living beside the jax arrays until
collected, which alone set the peak of a small build (8192 tokens x 256
latents: 2.18 GB); after it, model and runtime 1.2 GB, tokenizer 0.05,
compiled steps and XLA's buffers about 0.3 GB, pass 2's temporaries
0.38 GB at 4096 latents (every quantile bin's keys at once), and the
in-RAM activation cache, 0.63 GB (671 MB) at 262,144 tokens: the
2.65 GB of the full build. Now the load reads the cache tensor by tensor
into buffers that XLA adopts without a copy (one copy of the model at
any time) and keeps 7 of 18 blocks for a layer-6 SAE (0.77 GB, not 1.0),
the activation cache is a file, pass 2 takes one bin at a time (0.15 GB)
and queues one chunk, and the logit lens takes 64 latents per matmul (64
MB of logits, not 256 MB): 4096 latents x 32,768 tokens measure 1.02 GB
after loading, 1.31 after pass 1 and 1.46 GB at the peak, in pass 2.
Full-size figures: benchmarks/dashboard_vs_saedashboard.py.

Caveat: the fingerprint does not hash Gemma's parameters (only the
model's name): resuming with other weights of the same size is not caught.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from gemscope_jax import errors, models, safe_write
from gemscope_jax.dashboards import _acts_file
from gemscope_jax.dashboards import _dictionary as dl
from gemscope_jax.dashboards import lens as lens_lib
from gemscope_jax.parallel.mesh import MeshPlan
from gemscope_jax.text.windows import Windows, ordinary_mask

STATE_FILE = "scan_state.npz"
ACTS_FILE = "activations.bin"   # pass 1's activations, beside the state
# How many blocks a scan needs (`convert.pretrained.load_model(num_blocks=)`).
blocks_needed = dl.blocks_needed
HIST_FLOOR = 1e-3          # lowest log-spaced histogram edge, x max
_SENTINEL = np.iinfo(np.int32).max   # flat index of an empty slot
_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ScanResult:
  """Everything a dashboard shows, per latent (see the module docstring).

  Empty example slots (a latent that fires fewer times than there are
  slots) have index -1 and value 0.

  Attributes:
    model, kind, hookpoints, width: what was scanned (`kind` one of
      'sae', 'transcoder', 'skip_transcoder', 'crosscoder', 'clt').
    seq_len, num_windows: the windows' shape.
    num_tokens: ordinary tokens scanned (`text.windows.ordinary_mask`).
    k, quantile_bins, per_bin, hist_bins, before, after, seed: settings.
    count: (width,) firing tokens.
    total: (width,) sum of activations.
    max: (width,) largest activation (0 for a dead latent).
    top_values, top_index: (width, k) largest activations, flat indices.
    top_context: (width, k, before + 1 + after) the latent around each.
    hist_edges: (width, hist_bins + 1); hist_counts: (width, hist_bins).
    quantile_edges: (width, quantile_bins + 1); quantile_counts:
      (width, quantile_bins).
    quantile_values, quantile_index: (width, quantile_bins, per_bin) the
      sample of each bin, ordered by sampling priority.
    quantile_context: (width, quantile_bins, per_bin, before + 1 + after).
    lens: `lens.Lens` or None.
    neighbours, input_neighbours: (ids, cosines), each (width, n), or None.
  """
  model: str
  kind: str
  hookpoints: tuple[str, ...]
  width: int
  seq_len: int
  num_windows: int
  num_tokens: int
  k: int
  quantile_bins: int
  per_bin: int
  hist_bins: int
  before: int
  after: int
  seed: int
  count: np.ndarray
  total: np.ndarray
  max: np.ndarray
  top_values: np.ndarray
  top_index: np.ndarray
  top_context: np.ndarray
  hist_edges: np.ndarray
  hist_counts: np.ndarray
  quantile_edges: np.ndarray
  quantile_counts: np.ndarray
  quantile_values: np.ndarray
  quantile_index: np.ndarray
  quantile_context: np.ndarray
  lens: lens_lib.Lens | None = None
  neighbours: tuple[np.ndarray, np.ndarray] | None = None
  input_neighbours: tuple[np.ndarray, np.ndarray] | None = None

  @property
  def density(self) -> np.ndarray:
    """(width,) firing fraction of the ordinary tokens scanned."""
    return self.count / max(self.num_tokens, 1)

  @property
  def mean(self) -> np.ndarray:
    """(width,) mean activation over the tokens where the latent fires."""
    return np.where(self.count > 0, self.total / np.maximum(self.count, 1),
                    0.0)

  @property
  def dead(self) -> np.ndarray:
    return self.count == 0

  def locate(self, index) -> tuple[np.ndarray, np.ndarray]:
    """(window, position) of flat token indices."""
    return np.divmod(np.asarray(index), self.seq_len)


# --- the jitted steps -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the compiled steps depend on besides array shapes."""
  spec: dl.Spec
  config: models.Gemma3Config
  dtype: Any
  k: int
  bins: int
  per_bin: int
  hist_bins: int
  before: int
  after: int
  seed: int
  mesh: Any = None
  latent_axis: str | None = None
  batch_axis: str | None = None


def _mix(h):
  """lowbias32: a uint32 -> uint32 hash with good avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def priority(flat_index: jax.Array, latent: jax.Array, seed: int
             ) -> jax.Array:
  """Sampling priority in [0, 1) of (latent (W,), flat index (N,)) pairs,
  (W, N) float32: 24 bits of a hash of (index, latent, seed)."""
  s = np.uint32(seed & 0xFFFFFFFF)
  a = _mix(flat_index.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) ^ s)
  b = _mix(latent.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
           + (s ^ jnp.uint32(0x27D4EB2F)))
  h = _mix(b[:, None] ^ a[None, :])
  return (h >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)


def _merge(key, index, payloads, c_key, c_index, c_payloads, m):
  """The m best of buffer + candidates per row: by key descending, then
  flat index ascending (the tie rule). Payloads follow their key."""
  keys = jnp.concatenate([key, c_key], axis=1)
  idx = jnp.concatenate([index, c_index], axis=1)
  order = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape)
  # -inf (empty) negates to +inf: empties sort last.
  _, _, order = jax.lax.sort((-keys, idx, order), dimension=1, num_keys=2)
  order = order[:, :m]
  take = lambda a: jnp.take_along_axis(  # noqa: E731
      a, order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
  return (take(keys), take(idx),
          tuple(take(jnp.concatenate([p, c], axis=1))
                for p, c in zip(payloads, c_payloads)))


def _contexts(f, local, t_len, before, after):
  """(W, m, C): each latent's values around its candidates `local` (W, m)
  (chunk-local flat indices) within their windows; f is (W, B * T)."""
  offsets = jnp.arange(-before, after + 1)
  tt = (local % t_len)[..., None] + offsets                # (W, m, C)
  ok = (tt >= 0) & (tt < t_len)
  n = jnp.clip(local[..., None] + offsets, 0, f.shape[1] - 1)
  values = jnp.take_along_axis(f, n.reshape(n.shape[0], -1), axis=1)
  return jnp.where(ok, values.reshape(n.shape), 0.0)


def _candidates(st, f, keys, m, w0, t_len):
  """The m best of one chunk per latent: (key, local index, flat index,
  context); keys and f are (W, B * T)."""
  c_key, local = jax.lax.top_k(keys, m)
  empty = c_key == -jnp.inf
  flat = jnp.where(empty, _SENTINEL, w0 * t_len + local)
  ctx = _contexts(f, local, t_len, st.before, st.after)
  return c_key, local, flat, jnp.where(empty[..., None], 0.0, ctx)


@functools.lru_cache(maxsize=16)
def _steps(st: _Static):
  """(pass1, pass2) jitted steps of one scan configuration."""

  def constrain(x, *axes):
    if st.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(st.mesh, PartitionSpec(*axes)))

  def acts_of(params, tokens, mask):
    """(B, T, n_hookpoints, d) activations at the dictionary's input."""
    out = models.forward(params, tokens, mask, config=st.config,
                         hookpoints=st.spec.hookpoints, logits=False,
                         loss=False, dtype=st.dtype)
    return jnp.stack([out.activations[h] for h in st.spec.hookpoints], 2)

  def latents(arrays, acts, keep):
    """(W, B * T) latents (0 off the ordinary tokens) and where they fire."""
    f = dl.latents(st.spec, arrays, {h: acts[:, :, i] for i, h in
                                     enumerate(st.spec.hookpoints)})
    f = jnp.where(keep.reshape(1, -1), f, 0.0)
    f = constrain(f, st.latent_axis, None)
    return f, f > 0

  def pass1(state, params, arrays, tokens, mask, keep, w0):
    """(state, the chunk's activations, for pass 2 to reuse)."""
    t_len = tokens.shape[1]
    acts = acts_of(params, tokens, mask)
    f, fired = latents(arrays, acts, keep)
    s = dict(state)
    s["count"] = state["count"] + fired.sum(1, dtype=jnp.int32)
    y = f.sum(1) - state["comp"]                       # Kahan summation
    t = state["sum"] + y
    s["comp"] = (t - state["sum"]) - y
    s["sum"] = t
    s["max"] = jnp.maximum(state["max"], f.max(1))
    keys = jnp.where(fired, f, -jnp.inf)
    c_key, _, c_idx, c_ctx = _candidates(st, f, keys, min(st.k, f.shape[1]),
                                         w0, t_len)
    s["top_value"], s["top_index"], (s["top_context"],) = _merge(
        state["top_value"], state["top_index"], (state["top_context"],),
        c_key, c_idx, (c_ctx,), st.k)
    return s, acts

  def pass2(state, params, arrays, tokens, mask, keep, w0, hist_edges,
            q_edges):
    return pass2_cached(state, acts_of(params, tokens, mask), arrays, keep,
                        w0, hist_edges, q_edges)

  def pass2_cached(state, acts, arrays, keep, w0, hist_edges, q_edges):
    t_len = keep.shape[1]
    f, fired = latents(arrays, acts, keep)
    s = dict(state)
    # A value's bin is the number of interior edges at or below it, by
    # comparisons with the exact edges (one fused pass); non-firing tokens
    # go to an extra bin that is dropped.
    width, hb = f.shape[0], st.hist_bins
    h = jnp.zeros(f.shape, jnp.int32)
    for j in range(1, hb):
      h = h + (f >= hist_edges[:, j:j + 1]).astype(jnp.int32)
    h = jnp.where(fired, h, hb)
    rows = jnp.broadcast_to(jnp.arange(width)[:, None], h.shape)
    s["hist"] = state["hist"] + jnp.zeros((width, hb + 1), jnp.int32).at[
        rows, h].add(1)[:, :hb]
    q = jnp.zeros(f.shape, jnp.int32)
    for j in range(1, st.bins):
      q = q + (f >= q_edges[:, j:j + 1]).astype(jnp.int32)
    n = f.shape[1]
    prio = priority(w0 * t_len + jnp.arange(n), jnp.arange(f.shape[0]),
                    st.seed)
    m = min(st.per_bin, n)

    # One bin at a time (lax.scan, not a Python loop): unrolled, XLA kept
    # every bin's (W, n) keys alive at once, 386 MB of temporaries at 4096
    # latents x 1024 tokens against 156 MB now, and ran slower.
    def one_bin(_, xs):
      """Bin b's count and merged sample."""
      b, key, idx, val, ctx = xs
      in_bin = fired & (q == b)
      c_key, local, c_idx, c_ctx = _candidates(
          st, f, jnp.where(in_bin, prio, -jnp.inf), m, w0, t_len)
      c_val = jnp.where(c_key == -jnp.inf, 0.0,
                        jnp.take_along_axis(f, local, axis=1))
      key, idx, (val, ctx) = _merge(key, idx, (val, ctx), c_key, c_idx,
                                    (c_val, c_ctx), st.per_bin)
      return None, (in_bin.sum(1, dtype=jnp.int32), key, idx, val, ctx)

    names = ("q_key", "q_index", "q_value", "q_context")
    _, (counts, *out) = jax.lax.scan(
        one_bin, None, (jnp.arange(st.bins),
                        *(jnp.moveaxis(state[k], 1, 0) for k in names)))
    s["q_count"] = state["q_count"] + counts.T
    for k, v in zip(names, out):
      s[k] = jnp.moveaxis(v, 0, 1)
    return s

  state_out = None
  if st.mesh is not None:
    state_out = NamedSharding(st.mesh, PartitionSpec(st.latent_axis))
  jit = lambda fn, out: (  # noqa: E731
      jax.jit(fn, donate_argnums=0) if st.mesh is None else
      jax.jit(fn, donate_argnums=0, out_shardings=out))
  rows = None if st.mesh is None else NamedSharding(
      st.mesh, PartitionSpec(st.batch_axis))
  return (jit(pass1, (state_out, rows)), jit(pass2, state_out),
          jit(pass2_cached, state_out))


def _initial(width: int, k: int, bins: int, per_bin: int, hist_bins: int,
             ctx: int) -> tuple[dict, dict]:
  p1 = {"count": np.zeros(width, np.int32), "sum": np.zeros(width, np.float32),
        "comp": np.zeros(width, np.float32), "max": np.zeros(width, np.float32),
        "top_value": np.full((width, k), -np.inf, np.float32),
        "top_index": np.full((width, k), _SENTINEL, np.int32),
        "top_context": np.zeros((width, k, ctx), np.float32)}
  p2 = {"hist": np.zeros((width, hist_bins), np.int32),
        "q_count": np.zeros((width, bins), np.int32),
        "q_key": np.full((width, bins, per_bin), -np.inf, np.float32),
        "q_index": np.full((width, bins, per_bin), _SENTINEL, np.int32),
        "q_value": np.zeros((width, bins, per_bin), np.float32),
        "q_context": np.zeros((width, bins, per_bin, ctx), np.float32)}
  return p1, p2


def histogram_edges(max_: np.ndarray, hist_bins: int) -> np.ndarray:
  """(width, hist_bins + 1) float32: 0, then log-spaced max * 1e-3 .. max
  (all zeros for a dead latent)."""
  mx = np.asarray(max_, np.float64)[:, None]
  edges = np.zeros((len(mx), hist_bins + 1))
  edges[:, 1:] = mx * np.logspace(np.log10(HIST_FLOOR), 0, hist_bins)
  edges = edges.astype(np.float32)
  edges[:, -1] = max_
  return edges


def quantile_edges(max_: np.ndarray, bins: int) -> np.ndarray:
  """(width, bins + 1) float32: max * (0, 1/bins, ..., 1)."""
  edges = (np.asarray(max_, np.float64)[:, None]
           * np.arange(bins + 1) / bins).astype(np.float32)
  edges[:, -1] = max_
  return edges


# --- resuming ---------------------------------------------------------------

def _sha(*arrays) -> str:
  h = hashlib.sha1()
  for a in arrays:
    if a is not None:
      a = np.ascontiguousarray(a)
      h.update(str((a.dtype.str, a.shape)).encode())
      h.update(a.tobytes())
  return h.hexdigest()


def _save(path: pathlib.Path, fingerprint: dict, stage: int, next_window: int,
          p1: dict, p2: dict | None, cached: int = 0) -> None:
  arrays = {f"p1.{k}": np.asarray(v) for k, v in jax.device_get(p1).items()}
  if p2 is not None:
    arrays.update({f"p2.{k}": np.asarray(v)
                   for k, v in jax.device_get(p2).items()})
  meta = {"version": _STATE_VERSION, "fingerprint": fingerprint,
          "stage": stage, "next_window": next_window, "cached": cached}
  arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  with safe_write.atomic_path(path) as tmp:
    with open(tmp, "wb") as fh:
      np.savez(fh, **arrays)


def _load(path: pathlib.Path, fingerprint: dict):
  """(stage, next_window, p1, p2, cached) saved in `path`, or None if
  absent; `cached`: windows in the activation file (0 in older states)."""
  if not path.is_file():
    return None
  try:
    with np.load(path) as z:
      meta = json.loads(bytes(z["meta"]).decode())
      arrays = {k: z[k] for k in z.files if k != "meta"}
  except (OSError, ValueError, KeyError) as e:
    raise errors.InputError(f"{path}: not a readable scan state ({e}); "
                            "delete it to start over") from None
  saved = meta.get("fingerprint", {})
  if meta.get("version") != _STATE_VERSION or saved != fingerprint:
    diff = sorted(k for k in set(saved) | set(fingerprint)
                  if saved.get(k) != fingerprint.get(k))
    raise errors.UsageError(
        f"{path}: holds the state of a different scan (differs in "
        f"{', '.join(diff) or 'version'}); use another state_dir or delete "
        "it to start over")
  p1 = {k[3:]: v for k, v in arrays.items() if k.startswith("p1.")}
  p2 = {k[3:]: v for k, v in arrays.items() if k.startswith("p2.")} or None
  return meta["stage"], meta["next_window"], p1, p2, meta.get("cached", 0)


# --- the scan ---------------------------------------------------------------

def _place(tree, mesh, axis, lead: bool = True):
  """device_put with the latent axis (leading, or last for encoder arrays
  when lead=False) on `axis`."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, tree)

  def spec(path, a):
    a = np.asarray(a)
    name = getattr(path[-1], "key", None) if path else None
    if a.ndim == 0 or name == "b_dec":   # b_dec is (d,): no latent axis
      return NamedSharding(mesh, PartitionSpec())
    axes = [None] * a.ndim
    axes[0 if lead else -1] = axis
    return NamedSharding(mesh, PartitionSpec(*axes))

  return jax.tree_util.tree_map_with_path(
      lambda p, a: jax.device_put(a, spec(p, a)), tree)


def scan(config: models.Gemma3Config, params, dictionary, windows: Windows,
         tokenizer, *, hookpoint: str | None = None, k: int = 20,
         quantile_bins: int = 10, per_bin: int = 5, hist_bins: int = 50,
         before: int = 24, after: int = 8, batch_size: int = 16,
         dtype=jnp.float32, mesh=None,
         rules: tuple[tuple[str, str | None], ...] | None = None,
         seed: int = 0, lens: bool = True, lens_tokens: int = 10,
         num_neighbours: int = 10, progress: bool = True,
         state_dir: str | pathlib.Path | None = None,
         save_every_s: float = 300.0, cache_bytes: int = 2 << 30,
         on_chunk: Callable[[int, int], None] | None = None) -> ScanResult:
  """Scans `windows` and returns every latent's dashboard statistics.

  Args:
    config, params: the Gemma 3 model.
    dictionary: an `interop.InferenceDictionary` (SAE, transcoder, skip
      transcoder) or `interop.MultiLayerInference` (crosscoder, CLT).
    windows: token windows (`text.windows`).
    tokenizer: gives the special ids; only ordinary tokens are scanned.
    hookpoint: where an `InferenceDictionary` reads, overriding its own.
    k: top examples per latent.
    quantile_bins, per_bin: quantile bins and examples sampled per bin.
    hist_bins: histogram bins (module docstring).
    before, after: context positions kept around each example.
    batch_size: windows per chunk (one compiled program).
    dtype: Gemma's compute dtype.
    mesh: a ('data', 'model') `jax.sharding.Mesh`, or None (default device).
    rules: logical-axis rules ('latent' and 'batch' are read); default
      `parallel.MeshPlan().rules`.
    seed: of the quantile samples.
    lens: also compute the logit lens and the neighbour tables (`lens`).
    lens_tokens, num_neighbours: their sizes.
    progress: show a progress bar per pass (tokens/s and ETA).
    state_dir: a folder to save progress in and resume from.
    save_every_s: seconds between saves (also saved at each pass's end and
      when an exception stops the scan).
    cache_bytes: file space for pass 1's activations at the hookpoint(s)
      (in `state_dir`, else a temporary file in `tempfile.gettempdir()`),
      which pass 2 then reads and encodes again instead of running Gemma
      twice; a scan whose activations need more (or 0, or more than the
      disk has free) runs Gemma in both passes. Not process memory: the
      file is read and written, never mapped.
    on_chunk: called as on_chunk(pass_number, next_window) after each chunk
      (and its save, if one was due).

  Returns:
    A `ScanResult`.

  Raises:
    UsageError: bad settings, a mesh that does not divide the width or the
      batch, or a state_dir holding another scan.
    InputError: a dictionary that does not fit the model (unknown
      hookpoint, wrong width), or windows without ordinary tokens.
  """
  for name, value in (("k", k), ("quantile_bins", quantile_bins),
                      ("per_bin", per_bin), ("hist_bins", hist_bins),
                      ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise errors.UsageError(f"scan: {name} must be an int >= 1, got "
                              f"{value!r}")
  if hist_bins < 2:
    raise errors.UsageError(f"scan: hist_bins must be >= 2, got {hist_bins}")
  if min(before, after) < 0:
    raise errors.UsageError(f"scan: before and after must be >= 0, got "
                            f"{before}, {after}")
  src = dl.source(dictionary, config, hookpoint)
  width = src.spec.width
  tokens_all = np.asarray(windows.tokens, np.int32)
  if tokens_all.ndim != 2 or tokens_all.shape[0] == 0:
    raise errors.InputError(f"scan: no windows to scan (tokens of shape "
                            f"{tokens_all.shape})")
  n_windows, seq_len = tokens_all.shape
  if n_windows * seq_len >= _SENTINEL:
    raise errors.UsageError(f"scan: {n_windows} windows x {seq_len} exceed "
                            "the int32 flat token index; scan fewer")
  keep_all = ordinary_mask(tokenizer, tokens_all, windows.mask,
                           windows.exclude)
  num_tokens = int(keep_all.sum())
  if num_tokens == 0:
    raise errors.InputError("scan: the windows hold no ordinary tokens "
                            "(empty text, or only special tokens)")
  batch_size = min(batch_size, n_windows)
  latent_axis = batch_axis = None
  if mesh is not None:
    r = dict(rules or MeshPlan().rules)
    latent_axis, batch_axis = r.get("latent"), r.get("batch")
    per_layer = src.arrays["b_enc"].shape[-1]     # a CLT's per-layer width
    for axis, size, what in ((latent_axis, per_layer, "width per layer"),
                             (batch_axis, batch_size, "batch_size")):
      if axis is not None and size % mesh.shape[axis]:
        raise errors.UsageError(
            f"scan: {what} {size} does not divide over the mesh axis "
            f"{axis!r} ({mesh.shape[axis]} devices)")
  st = _Static(src.spec, config, jnp.dtype(dtype), k, quantile_bins, per_bin,
               hist_bins, before, after, seed, mesh, latent_axis, batch_axis)
  pass1, pass2, pass2_cached = _steps(st)
  arrays = _place(src.arrays, mesh, latent_axis, lead=False)
  ctx = before + 1 + after
  p1, p2 = _initial(width, k, quantile_bins, per_bin, hist_bins, ctx)

  fingerprint = {
      "model": config.name, "kind": src.spec.kind,
      "hookpoints": list(src.spec.hookpoints), "width": width,
      "tokens": _sha(tokens_all, windows.mask, windows.exclude, keep_all),
      "dictionary": _sha(*(src.arrays[k] for k in sorted(src.arrays))),
      "architecture": src.spec.architecture, "top_k": k,
      "quantile_bins": quantile_bins, "per_bin": per_bin,
      "hist_bins": hist_bins, "before": before, "after": after,
      "seed": seed, "dtype": jnp.dtype(dtype).name}
  path = None if state_dir is None else pathlib.Path(state_dir) / STATE_FILE
  stage, next_window, cached = 1, 0, 0
  if path is not None:
    safe_write.check_workdir(path.parent)
    loaded = _load(path, fingerprint)
    if loaded is not None:
      stage, next_window, p1, saved_p2, cached = loaded
      p2 = saved_p2 if saved_p2 is not None else p2

  real = windows.mask.sum(axis=1)
  state = {1: p1, 2: p2}
  last_save = time.monotonic()
  window_shape = (seq_len, len(src.spec.hookpoints),
                  src.arrays["w_enc"].shape[-2])
  acts_file = _open_acts(path, stage, next_window, cached, n_windows,
                         window_shape, jnp.dtype(dtype), cache_bytes)

  def drop_acts(e: OSError) -> None:
    """Gives up the activation file (pass 2 runs Gemma) on an I/O error."""
    nonlocal acts_file
    if acts_file is not None:
      print(f"[gemscope] dashboard scan: activation file dropped ({e}); "
            "pass 2 runs Gemma again", file=sys.stderr, flush=True)
      acts_file.close(remove=True)
      acts_file = None

  def save(stage_, window_):
    nonlocal last_save
    if path is not None:
      n_cached = 0
      if acts_file is not None:
        try:
          acts_file.sync()     # durable before the state that counts it
          n_cached = acts_file.windows
        except OSError as e:
          drop_acts(e)
      _save(path, fingerprint, stage_, window_, state[1],
            state[2] if stage_ >= 2 else None, n_cached)
      last_save = time.monotonic()

  rows = None if mesh is None else NamedSharding(mesh,
                                                 PartitionSpec(batch_axis))

  def chunk_of(w0):
    stop = min(w0 + batch_size, n_windows)
    out = []
    for a in (tokens_all, windows.mask, keep_all):
      pad = np.zeros((batch_size, seq_len), a.dtype)
      pad[:stop - w0] = a[w0:stop]
      out.append(pad if rows is None else jax.device_put(pad, rows))
    return stop, out

  ahead = {}     # the next chunk's activations, read while one runs

  def cached_acts(w0, stop):
    """The chunk's activations from the file, or None (then from Gemma)."""
    if w0 in ahead:
      return ahead.pop(w0)
    if acts_file is None or acts_file.windows < n_windows:
      return None
    try:
      acts = acts_file.read(w0, stop, batch_size)
    except OSError as e:
      drop_acts(e)
      return None
    return acts if rows is None else jax.device_put(acts, rows)

  try:
    for number in (1, 2):
      if stage > number:
        continue
      start = next_window if stage == number else 0
      state[number] = _place(state[number], mesh, latent_axis)
      edges = ()
      if number == 2:
        mx = np.asarray(jax.device_get(state[1]["max"]))
        edges = (_place(histogram_edges(mx, hist_bins), mesh, latent_axis),
                 _place(quantile_edges(mx, quantile_bins), mesh,
                        latent_axis))
      bar = tqdm(total=int(real.sum()), initial=int(real[:start].sum()),
                 unit="tok", unit_scale=True, disable=not progress,
                 desc=f"dashboard scan {number}/2", dynamic_ncols=True)
      done = start
      try:
        for w0 in range(start, n_windows, batch_size):
          stop, (tokens, mask, keep) = chunk_of(w0)
          if number == 1:
            state[1], acts = pass1(state[1], params, arrays, tokens, mask,
                                   keep, np.int32(w0))
            if acts_file is not None:
              try:
                acts_file.put(w0, stop - w0, acts)
              except OSError as e:
                drop_acts(e)
          elif (acts := cached_acts(w0, stop)) is not None:
            state[2] = pass2_cached(state[2], acts, arrays, keep,
                                    np.int32(w0), *edges)
            # One chunk in flight: reading runs far ahead of encoding, and
            # every chunk queued would hold its activations (pass 1 waits
            # for each chunk's as it copies them out).
            if stop < n_windows:
              ahead[stop] = cached_acts(stop, min(stop + batch_size,
                                                  n_windows))
            jax.block_until_ready(state[2])
          else:
            state[2] = pass2(state[2], params, arrays, tokens, mask, keep,
                             np.int32(w0), *edges)
          done = stop
          bar.update(int(real[w0:stop].sum()))
          if time.monotonic() - last_save >= save_every_s:
            save(number, done)
          if on_chunk is not None:
            on_chunk(number, done)
        if acts_file is not None:
          try:
            acts_file.flush()
          except OSError as e:
            drop_acts(e)
      except BaseException:
        bar.close()
        try:
          save(number, done)
        except RuntimeError:  # a donated buffer the failed step consumed
          pass
        raise
      bar.close()
      stage, next_window = number + 1, 0
      save(stage, 0)
    if acts_file is not None:
      acts_file.close(remove=True)     # the scan is complete
      acts_file = None
  finally:
    if acts_file is not None:
      acts_file.close()                # kept for a rerun to resume
  if path is not None and stage > 2:
    (path.parent / ACTS_FILE).unlink(missing_ok=True)

  r1 = {k_: np.asarray(v) for k_, v in jax.device_get(state[1]).items()}
  r2 = {k_: np.asarray(v) for k_, v in jax.device_get(state[2]).items()}
  extras = {}
  if lens:
    extras = lens_lib.compute(src, config, params, n_tokens=lens_tokens,
                              n_neighbours=num_neighbours)
  return _result(st, src, r1, r2, n_windows, seq_len, num_tokens, extras)


def _open_acts(path, stage, next_window, cached, n_windows, window_shape,
               dtype, cache_bytes) -> _acts_file.ActivationFile | None:
  """The activation file for this scan, or None when pass 2 must run
  Gemma: too big for `cache_bytes` or the free disk, or (resuming) missing
  windows that pass 1 has gone past."""
  if stage > 2:
    return None
  keep = next_window if stage == 1 else n_windows
  if cached < keep:     # saved without (all of) them: cannot be rebuilt
    return None
  window_bytes = int(np.prod(window_shape)) * dtype.itemsize
  where = tempfile.gettempdir() if path is None else path.parent
  need = (n_windows - keep) * window_bytes
  if (n_windows * window_bytes > cache_bytes
      or need > shutil.disk_usage(where).free):
    return None
  try:
    return _acts_file.ActivationFile(
        None if path is None else path.parent / ACTS_FILE, window_shape,
        dtype, keep)
  except OSError:
    return None


def _result(st, src, r1, r2, n_windows, seq_len, num_tokens, extras
            ) -> ScanResult:
  def index(a):
    return np.where(a == _SENTINEL, -1, a.astype(np.int64))

  def value(v, idx):
    return np.where(idx < 0, 0.0, v).astype(np.float32)

  top_index, q_index = index(r1["top_index"]), index(r2["q_index"])
  total = r1["sum"].astype(np.float64) - r1["comp"].astype(np.float64)
  return ScanResult(
      model=st.config.name, kind=src.spec.kind,
      hookpoints=src.spec.hookpoints, width=src.spec.width, seq_len=seq_len,
      num_windows=n_windows, num_tokens=num_tokens, k=st.k,
      quantile_bins=st.bins, per_bin=st.per_bin, hist_bins=st.hist_bins,
      before=st.before, after=st.after, seed=st.seed,
      count=r1["count"].astype(np.int64), total=total,
      max=r1["max"].astype(np.float32),
      top_values=value(r1["top_value"], top_index), top_index=top_index,
      top_context=r1["top_context"],
      hist_edges=histogram_edges(r1["max"], st.hist_bins),
      hist_counts=r2["hist"].astype(np.int64),
      quantile_edges=quantile_edges(r1["max"], st.bins),
      quantile_counts=r2["q_count"].astype(np.int64),
      quantile_values=value(r2["q_value"], q_index), quantile_index=q_index,
      quantile_context=r2["q_context"],
      lens=extras.get("lens"), neighbours=extras.get("neighbours"),
      input_neighbours=extras.get("input_neighbours"))
