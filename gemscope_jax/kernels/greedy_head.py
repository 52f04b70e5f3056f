"""The greedy next token without reading the whole unembedding in full
precision: an exact int8 screen, on the CPU.

At batch 1 a decode step of Gemma 3 270M reads 1.1 GB of float32 weights,
of which the tied 262,144 x 640 unembedding is 671 MB, read only to take an
argmax. `screen(table)` builds an int8 copy of the table (one scale per row,
168 MB) and a per-row error radius once per generation; `greedy_tokens`
then bounds every logit from the int8 copy and computes from the table
itself only the tokens that can still be the largest (2 to 40 of 262,144
on real text), falling back to every logit when more than `max_candidates`
remain. The result is the argmax of the table's logits (rounded to
bfloat16 first for a bfloat16 table, as that model's logits are), first
index on ties, NaN as +inf: what `generate.sampling.argmax` takes from the
full logits, up to the order of the f32 sums (see `greedy_head.cc` for the
bound and why it is exact).

On the CPU backend, when the handler builds (g++), it runs as
one C++ call; elsewhere the full logits' argmax gives the same tokens
(`reference`). The choice is made at lowering time.

Caveat: the custom call has no sharding rule; callers use it only in
programs that are not partitioned over several devices.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax.kernels import _build
from gemscope_jax.kernels import huge_pages

FFI_TARGET = "gemscope_greedy_head"
MAX_CANDIDATES = 4096

_LIBRARY = _build.gxx_library(
    pathlib.Path(__file__).with_name("greedy_head.cc"), FFI_TARGET,
    "GemscopeGreedyHead", what="the screened greedy-token CPU kernel",
    fallback=("Greedy decoding then reads the whole unembedding each token "
              "(the same tokens, slower on the CPU)."),
    headers=("simd_rows.h", "xla_pool.h"))


def available() -> bool:
  """Whether the kernel is built and loaded (the first call builds it)."""
  return _LIBRARY.load() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False, or None when the kernel is loaded."""
  return _LIBRARY.unavailable_reason()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Screen:
  """An int8 copy of a (V, D) table and the bound on what it misses.

  Attributes:
    packed: (ceil(V / 64), ceil(D / 4), 256) uint8: the int8 rows
      q = round(table / scale) plus 128, laid out for the kernel's byte
      dots (`pack`; `unpack` gives q back).
    scale: (V,) float32, max |row| / 127.
    qnorm: (V,) float32, at least scale ||q_v||: bounds what rounding h
      to int16 steps changes (`greedy_head.cc`).
    radius: (V,) float32: |table_v . h - scale_v (q_v . h)| <= ||h||
      radius_v for every h, including the rounding of the kernel's f32
      sums.
  """
  packed: jax.Array
  scale: jax.Array
  qnorm: jax.Array
  radius: jax.Array


def screen(table: jax.Array, block: int = 8192) -> Screen:
  """The int8 screen of a float32 or bfloat16 (V, D) table (jittable).

  The radius is ||row - scale q|| (Cauchy-Schwarz) plus the error of the
  kernel's f32 dot products, gamma_D sqrt(D) max|row| for the screen's sum
  and for the exact one (gamma_D = D u / (1 - D u), u = 2^-24) and u for
  the scale's product, with 1e-3 of slack for this function's own f32
  arithmetic. Built `block` rows at a time when V is a multiple of it, so
  its float32 temporaries stay small (the whole 270M table at once peaked
  about 1.3 GB above the weights).
  """
  v, d = table.shape
  if v > block and v % block == 0 and block % TILE_ROWS == 0:
    parts = jax.lax.map(_screen_rows, table.reshape(v // block, block, d))
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), parts)
  return _screen_rows(table)


def _screen_rows(table: jax.Array) -> Screen:
  t = table.astype(jnp.float32)
  d = t.shape[1]
  amax = jnp.max(jnp.abs(t), axis=1)
  scale = amax / 127.0
  safe = jnp.where(scale > 0, scale, 1.0)
  q = jnp.clip(jnp.round(t / safe[:, None]), -127, 127)
  resid = jnp.sqrt(jnp.sum(jnp.square(t - q * scale[:, None]), axis=1))
  u = 2.0 ** -24
  gamma = d * u / (1 - d * u)
  rounding = (2 * gamma + 2 * u) * np.sqrt(d) * amax
  radius = (resid + rounding) * (1 + 1e-3)
  qnorm = scale * jnp.sqrt(jnp.sum(jnp.square(q), axis=1)) * (1 + 1e-3)
  return Screen(pack(q.astype(jnp.int8)), scale, qnorm, radius)


TILE_ROWS = 64   # table rows per tile: 4 blocks of 16
GROUP = 4        # dimensions per byte dot


def pack(q: jax.Array) -> jax.Array:
  """(V, D) int8 -> (ceil(V / 64), ceil(D / 4), 256) uint8, the kernel's
  layout: in tile t, for dimension group g, block k's 16 rows r each give
  their 4 bytes q[64 t + 16 k + r, 4 g:4 g + 4] + 128 (rows and dimensions
  past the table's are q = 0)."""
  v, d = q.shape
  tiles, groups = -(-v // TILE_ROWS), -(-d // GROUP)
  q = jnp.pad(q, ((0, tiles * TILE_ROWS - v), (0, groups * GROUP - d)))
  u = jax.lax.bitcast_convert_type(q, jnp.uint8) ^ jnp.uint8(0x80)
  u = u.reshape(tiles, TILE_ROWS // 16, 16, groups, GROUP)
  return u.transpose(0, 3, 1, 2, 4).reshape(tiles, groups, TILE_ROWS * GROUP)


def unpack(packed: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """The (V, D) int8 rows `pack` laid out (`shape` = the table's)."""
  v, d = shape
  tiles, groups, _ = packed.shape
  u = packed.reshape(tiles, groups, TILE_ROWS // 16, 16, GROUP)
  u = u.transpose(0, 2, 3, 1, 4).reshape(tiles * TILE_ROWS, groups * GROUP)
  q = jax.lax.bitcast_convert_type(u ^ jnp.uint8(0x80), jnp.int8)
  return q[:v, :d]


_screen_jit = jax.jit(lambda table, dtype: screen(table.astype(dtype)),
                      static_argnames="dtype")
# id(table) -> (weak reference to it, dtype name, its screen).
_SCREENS: dict[int, tuple[weakref.ref, str, Screen]] = {}


def cached_screen(table: jax.Array, dtype) -> Screen:
  """`screen(table.astype(dtype))`, built once per table array and kept
  while that array lives (building it reads the whole table: about 0.2 s
  for Gemma 3 270M on 2 CPU cores)."""
  key, name = id(table), jnp.dtype(dtype).name
  hit = _SCREENS.get(key)
  if hit is not None and hit[0]() is table and hit[1] == name:
    return hit[2]

  def forget(ref, key=key):
    if key in _SCREENS and _SCREENS[key][0] is ref:
      del _SCREENS[key]

  scr = _screen_jit(table, dtype=jnp.dtype(dtype))
  huge_pages.advise(scr)
  _SCREENS[key] = (weakref.ref(table, forget), name, scr)
  return scr


def reference(h: jax.Array, table: jax.Array) -> jax.Array:
  """(B,) int32 greedy tokens from the full logits `table @ h` (each row's
  first largest, NaN as +inf), rounded to the table's dtype first."""
  logits = jax.lax.dot_general(table, h.astype(table.dtype),
                               (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
  logits = logits.T.astype(table.dtype).astype(jnp.float32)
  logits = jnp.where(jnp.isnan(logits), jnp.inf, logits)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _ffi(h, table, scr: Screen, *, max_candidates: int):
  b = h.shape[0]
  call = jax.ffi.ffi_call(
      FFI_TARGET, (jax.ShapeDtypeStruct((b,), jnp.int32),
                   jax.ShapeDtypeStruct((b,), jnp.int32)),
      vmap_method="sequential")
  return call(h.astype(jnp.float32), table, scr.packed, scr.scale, scr.qnorm,
              scr.radius,
              round_bf16=bool(table.dtype == jnp.bfloat16),
              max_candidates=np.int64(max_candidates))


def greedy_tokens(h: jax.Array, table: jax.Array, scr: Screen, *,
                  max_candidates: int = MAX_CANDIDATES,
                  use_kernel: bool = True) -> tuple[jax.Array, jax.Array]:
  """Greedy next tokens of final-normed rows `h` against `table`.

  Args:
    h: (B, D) the final norm's output (any float dtype; bfloat16 values
      are exact in float32).
    table: (V, D) float32 or bfloat16 unembedding, the model's dtype.
    scr: `screen(table)`.
    max_candidates: more tokens than this left after the screen: compute
      every logit of that row.
    use_kernel: allow the C++ kernel on the CPU.

  Returns:
    (tokens (B,) int32, candidates (B,) int32: how many logits were
    computed from the table; V where every one was, always V without the
    kernel).

  Raises:
    ValueError: on shapes that do not match.
  """
  packed_shape = (-(-table.shape[0] // TILE_ROWS), -(-table.shape[1] // GROUP),
                  TILE_ROWS * GROUP) if table.ndim == 2 else None
  if (h.ndim != 2 or table.ndim != 2 or h.shape[1] != table.shape[1]
      or scr.packed.shape != packed_shape
      or scr.scale.shape != table.shape[:1]
      or scr.radius.shape != table.shape[:1]
      or scr.qnorm.shape != table.shape[:1]):
    raise ValueError(
        f"greedy_tokens expects h (B, D), table (V, D) and its screen; got "
        f"h {h.shape}, table {table.shape}, packed {scr.packed.shape}, scale "
        f"{scr.scale.shape}, qnorm {scr.qnorm.shape}, radius "
        f"{scr.radius.shape}")
  if table.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"greedy_tokens: the table must be float32 or bfloat16,"
                     f" got {table.dtype}")
  full = jnp.full((h.shape[0],), table.shape[0], jnp.int32)

  def fallback(h, table, scr):
    return reference(h, table), full

  if not use_kernel or not available():
    return fallback(h, table, scr)
  return jax.lax.platform_dependent(
      h, table, scr,
      cpu=functools.partial(_ffi, max_candidates=max_candidates),
      default=fallback)
