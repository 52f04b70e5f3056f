"""The two compiled programs of generation: prefill, and the decode loop.

`prefill` runs the left-padded prompts once, fills a fresh `KVCache` and
returns the next-token logits of the last column. `decode` is one
`lax.while_loop` that samples a token, stops rows that emitted a stop
token, and feeds the token back through the model with the cache, until
every row stopped or `max_new` tokens were taken: one dispatch for the whole
generation, not one per token or per layer.

Both are jitted with everything static that changes the program (config,
dtype, edits, hookpoints, sampling rule, what to keep, the cache's
shardings); shapes come from the
(batch, prompt bucket, cache length) bucket, and `max_new` is traced, so a
bucket compiles once whatever the number of new tokens. Edits are the same
objects `models.forward` takes; `ContextEdit`s see `generated=True` while
decoding. Greedy decoding on one CPU program may take each token through
`kernels.greedy_head` (an exact int8 screen of the unembedding) rather than
the full logits (`screens_greedy`).

With sharded weights, `cache_sharding` (a `KVCache` of shardings, e.g.
`parallel.gemma_layout.cache_shardings`) pins the cache's layout: the fresh
cache, prefill's output and the loop's carried cache are constrained to it,
rather than left to XLA's propagation (which may replicate it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gemscope_jax import models
from gemscope_jax.generate.sampling import Sampling, sample
from gemscope_jax.kernels import greedy_head


# The host function that `decode(stream=True)` calls with (step, tokens,
# done) after each token. A module-level slot rather than a static argument,
# so that a new callback per call does not recompile the loop.
_STREAM: dict[str, Callable[[Any, Any, Any], None] | None] = {"fn": None}


def _emit(step, tokens, done):
  fn = _STREAM["fn"]
  if fn is not None:
    fn(step, tokens, done)


def _intervene(edits, hookpoints, edit_args, positions, generated, valid):
  return models.make_intervene(dict(edits), frozenset(hookpoints), edit_args,
                               positions, generated, valid)


@functools.partial(
    jax.jit,
    static_argnames=("config", "dtype", "cache_length", "edits", "hookpoints",
                     "cache_sharding"))
def prefill(params, tokens, mask, edit_args, *, config, dtype, cache_length,
            edits=(), hookpoints=(), cache_sharding=None):
  """Runs left-padded prompts (B, T) into a new cache.

  Returns:
    (last logits (B, V) float32, cache, {hookpoint: (B, T, width)}).
  """
  b = tokens.shape[0]
  cache = _constrain(models.init_cache(config, b, cache_length, dtype),
                     cache_sharding)
  positions = models.default_positions(mask)
  intervene, recorded = _intervene(edits, hookpoints, edit_args, positions,
                                   jnp.zeros_like(mask), mask)
  logits, cache = models.Gemma3(config, dtype).apply(
      {"params": params}, tokens, mask, cache=cache, intervene=intervene,
      last_only=True)
  return (logits[:, -1].astype(jnp.float32), _constrain(cache, cache_sharding),
          recorded)


def _constrain(cache, cache_sharding):
  if cache_sharding is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, cache_sharding)


def decode_step(params, cache, tokens, edit_args, *, config, dtype,
                edits=(), hookpoints=(), unembed: bool = True):
  """One token per row through the model: (logits (B, V), cache, records).

  With `unembed=False`, the final norm's output (B, D) in the compute
  dtype takes the logits' place (what `greedy_head` reads).

  Not jitted on its own: it is the body of `decode`'s loop (and is what a
  memory plan compiles for one step).
  """
  b = tokens.shape[0]
  positions = (cache.length - cache.start)[:, None]
  ones = jnp.ones((b, 1), bool)
  intervene, recorded = _intervene(edits, hookpoints, edit_args, positions,
                                   ones, ones)
  model = models.Gemma3(config, dtype)
  out, cache = model.apply(
      {"params": params}, tokens[:, None], cache=cache, decode=True,
      intervene=intervene, unembed=unembed)
  if not unembed:
    normed = model.apply({"params": params}, out[:, 0],
                         method=lambda m, x: m.final_norm(x))
    return normed, cache, recorded
  return out[:, 0].astype(jnp.float32), cache, recorded


def screens_greedy(sampling: Sampling, keep_logits: bool, cache_sharding,
                   batch: int, dtype) -> bool:
  """Whether `decode` takes greedy tokens through `greedy_head`'s int8
  screen: greedy, no logits kept, one unpartitioned CPU program, the kernel
  built, and a batch where the screen is the faster (the full unembedding
  against the screen, measured on 2 cores: float32 23.6 / 11.2 ms at batch
  1, 47.7 / 33.5 at batch 8; bfloat16, on oneDNN, 14 / 12.5 ms at batch 1
  but 24 / 33.7 at batch 8)."""
  fits = batch <= 8 if jnp.dtype(dtype) == jnp.float32 else batch == 1
  return (sampling.greedy and not keep_logits and cache_sharding is None
          and fits and jax.default_backend() == "cpu"
          and greedy_head.available())


@functools.partial(
    jax.jit, donate_argnames=("cache",),
    static_argnames=("config", "dtype", "sampling", "edits", "hookpoints",
                     "num_slots", "keep_logits", "stream", "pad_id",
                     "cache_sharding"))
def decode(params, cache, logits, key, max_new, stop_ids, edit_args, *,
           config, dtype, sampling: Sampling, num_slots: int,
           edits=(), hookpoints=(), keep_logits: bool = False,
           stream: bool = False, pad_id: int = 0, cache_sharding=None,
           screen: greedy_head.Screen | None = None):
  """Samples up to `max_new` (<= num_slots) tokens per row, starting from
  the prompt's next-token `logits` (B, V).

  Returns:
    dict with "tokens" (B, num_slots) int32 (pad after a row's stop token,
    which is kept), "count" () the tokens taken, "done" (B,) rows that
    stopped, "logits" (B, num_slots, V) float32 if kept (the logits each
    token was drawn from), and {hookpoint: (B, num_slots, width)} under
    "activations": the values while feeding each generated token back (the
    last token taken is never fed back, so its slot stays zero), and the
    final "cache": the input `cache` is donated and returned, so that the
    loop updates it in place rather than in a copy of it.

  With `screen` (`greedy_head.cached_screen` of the embedding table in
  `dtype`; greedy only, see `screens_greedy`), each token after the first
  is `greedy_head.greedy_tokens` of the step's final-norm output: the same
  argmax without reading the whole table in full precision.
  """
  b = logits.shape[0]
  if screen is not None and not sampling.greedy:
    raise ValueError("the int8 screen takes greedy tokens only")
  table = (None if screen is None
           else params["embedder"]["input_embedding"].astype(dtype))

  def take(i, logits, key, out, done, chosen=None):
    key, sub = jax.random.split(key)
    if chosen is None:
      chosen = sample(logits, sub, sampling)
    tok = jnp.where(done, pad_id, chosen)
    out = dict(out, tokens=out["tokens"].at[:, i].set(tok))
    if keep_logits:
      out["logits"] = out["logits"].at[:, i].set(logits)
    if stream:
      jax.debug.callback(_emit, i, tok, done, ordered=True)
    done = done | jnp.isin(tok, stop_ids)
    return tok, key, out, done

  out = {"tokens": jnp.full((b, num_slots), pad_id, jnp.int32)}
  if keep_logits:
    out["logits"] = jnp.zeros((b, num_slots, logits.shape[-1]), jnp.float32)
  acts = jax.eval_shape(
      lambda c, t: decode_step(params, c, t, edit_args, config=config,
                               dtype=dtype, edits=edits,
                               hookpoints=hookpoints)[2],
      cache, jnp.zeros((b,), jnp.int32))
  out["activations"] = {k: jnp.zeros((b, num_slots, *v.shape[2:]), v.dtype)
                        for k, v in acts.items()}
  tok, key, out, done = take(0, logits, key, out, jnp.zeros((b,), bool))

  def cond(state):
    i, _, _, _, _, done = state
    return (i < max_new) & ~jnp.all(done)

  def body(state):
    i, cache, tok, key, out, done = state
    logits, cache, recorded = decode_step(
        params, cache, tok, edit_args, config=config, dtype=dtype,
        edits=edits, hookpoints=hookpoints, unembed=screen is None)
    chosen = None
    if screen is not None:
      chosen, _ = greedy_head.greedy_tokens(logits, table, screen)
    cache = _constrain(cache, cache_sharding)
    out = dict(out, activations={
        k: out["activations"][k].at[:, i - 1].set(v[:, 0])
        for k, v in recorded.items()})
    tok, key, out, done = take(i, logits, key, out, done, chosen)
    return i + 1, cache, tok, key, out, done

  count, cache, _, _, out, done = jax.lax.while_loop(
      cond, body, (jnp.int32(1), _constrain(cache, cache_sharding), tok,
                   key, out, done))
  return dict(out, count=count, done=done, cache=cache)
