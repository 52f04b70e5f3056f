"""The sparse step's pair list: the set entries of a boolean mask, by rank.

The (tokens, latents) mask of a batch is bit-packed into uint32 words (one
fused pass), the words' popcounts are prefix-summed, and each output slot
finds its word by binary search and its bit by a 5-step popcount bisection.
On XLA CPU this is ~15x faster than `jnp.nonzero(size=...)` (whose
cumsum+scatter over 67M entries takes about a second). The list comes out
in row-major order, i.e. sorted by token.

`select_slots` finds the entries of any ranks; `compact` those of the
first ones.

Caveat: positions are int32, so the mask may hold at most 2^31 entries
(e.g. 4096 tokens x 18 layers x 16k latents is 1.2e9).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def pack(mask: jax.Array):
  """Bit-packed words of the flat mask, their popcounts and inclusive cumsum."""
  flat = mask.reshape(-1)
  pad = (-flat.size) % 32
  if pad:
    flat = jnp.concatenate([flat, jnp.zeros((pad,), flat.dtype)])
  shifts = jnp.arange(32, dtype=jnp.uint32)
  words = jnp.sum(flat.reshape(-1, 32).astype(jnp.uint32) << shifts, axis=-1,
                  dtype=jnp.uint32)
  counts = lax.population_count(words).astype(jnp.int32)
  return words, counts, jnp.cumsum(counts)


def select_slots(packed, slot: jax.Array) -> jax.Array:
  """The set-bit positions of ranks `slot` (int32) in packed words (0 for a
  rank past the last set bit)."""
  words, counts, incl = packed
  word = jnp.minimum(jnp.searchsorted(incl, slot, side="right"),
                     words.size - 1).astype(jnp.int32)
  rank = slot - (incl[word] - counts[word])
  bits = words[word]
  pos = jnp.zeros_like(slot)
  for width in (16, 8, 4, 2, 1):
    low = (bits >> pos.astype(jnp.uint32)) & jnp.uint32((1 << width) - 1)
    c = lax.population_count(low).astype(jnp.int32)
    high = rank >= c
    rank = jnp.where(high, rank - c, rank)
    pos = jnp.where(high, pos + width, pos)
  return jnp.where(slot < incl[-1], word * 32 + pos, 0)


def select(packed, capacity: int) -> jax.Array:
  """The first `capacity` set-bit positions of packed words (0 past the end)."""
  return select_slots(packed, jnp.arange(capacity, dtype=jnp.int32))


def compact(mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Flat indices of the first `capacity` True entries of `mask`, and the count.

  Same result as `jnp.nonzero(mask.ravel(), size=capacity, fill_value=0)`,
  but through bit-packed words (see the module docstring).

  Args:
    mask: boolean array (its flat form is padded to a multiple of 32).
    capacity: length of the returned index list.

  Returns:
    (idx, total): (capacity,) int32 flat indices in increasing order (0 past
    the end of the list), and the int32 number of True entries (may exceed
    `capacity`).
  """
  packed = pack(mask)
  return select(packed, capacity), packed[2][-1]
