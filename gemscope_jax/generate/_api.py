"""`generate`: continue prompts with Gemma 3, with edits and recordings.

Prompts of different lengths are left-padded into one batch; the prompt
length is rounded up to a bucket (a power of two, at least 16) and the cache
length to a multiple of 128, so a session of similar prompts compiles the
prefill and the decode loop once per (batch, prompt bucket, cache length).

Memory: the cache holds `models.cache_bytes(config, B, cache_length)` bytes;
asking for per-step logits adds B x max_new x vocab float32 (1 MiB per token
and row for Gemma 3's 262k vocabulary).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import models
from gemscope_jax.generate import _loop
from gemscope_jax.generate.sampling import GREEDY, Sampling
from gemscope_jax.kernels import greedy_head

# Which tokens the edits act on: the prompt, the generated tokens, or both.
SCOPES = ("all", "prompt", "generated")


@dataclasses.dataclass
class Generation:
  """What `generate` returns, one entry per prompt.

  Attributes:
    prompt_tokens: the prompt's token ids (BOS first), without padding.
    tokens: the generated ids, up to and including a stop token.
    text: the generated text (stop tokens and specials dropped), if a
      tokenizer was available.
    stopped: True where the row ended on a stop token, False where it ran
      out of `max_new_tokens`.
    logits: per row (n, V) float32, the logits each generated token was
      drawn from (before temperature), if asked for.
    activations: {hookpoint: per row (prompt + n - 1, width)}, the recorded
      values over the prompt and every generated token fed back (the last
      one never is), if hookpoints were asked for; equal to a forward pass
      over the same tokens.
  """
  prompt_tokens: list[np.ndarray]
  tokens: list[np.ndarray]
  text: list[str] | None
  stopped: list[bool]
  logits: list[np.ndarray] | None = None
  activations: dict[str, list[np.ndarray]] = dataclasses.field(
      default_factory=dict)


def prompt_bucket(length: int) -> int:
  """The padded prompt length: the next power of two, at least 16."""
  return max(16, 1 << max(0, math.ceil(math.log2(max(length, 1)))))


def cache_bucket(prompt_length: int, max_new_tokens: int) -> int:
  """The cache length: prompt bucket + new tokens, rounded up to 128."""
  need = prompt_length + max_new_tokens
  return 128 * math.ceil(need / 128)


def stop_ids_of(tokenizer) -> tuple[int, ...]:
  """EOS and `<end_of_turn>` (when the vocabulary has it)."""
  ids = [tokenizer.eos_id]
  turn = tokenizer.piece_to_id("<end_of_turn>")
  if turn is not None and turn != tokenizer.unk_id:
    ids.append(turn)
  return tuple(ids)


def _as_ids(prompts, tokenizer, add_bos: bool) -> list[np.ndarray]:
  if isinstance(prompts, str) or (
      len(prompts) and isinstance(prompts[0], (int, np.integer))):
    prompts = [prompts]
  rows = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if tokenizer is None:
        raise ValueError("text prompts need a tokenizer (tokenizer=)")
      ids = tokenizer.encode(p, add_bos=add_bos)
    else:
      ids = [int(t) for t in p]
    if not ids:
      raise ValueError(f"prompt {i} is empty")
    rows.append(np.asarray(ids, np.int32))
  return rows


def left_pad(rows: Sequence[np.ndarray], length: int, pad_id: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, mask), each (B, length), real tokens flush right."""
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    tokens[i, length - len(r):] = r
    mask[i, length - len(r):] = True
  return tokens, mask


def generate(params: Any,
             prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             config: models.Gemma3Config,
             tokenizer=None,
             max_new_tokens: int = 64,
             sampling: Sampling = GREEDY,
             key: jax.Array | None = None,
             stop_tokens: Iterable[int] | None = None,
             edits: Mapping[str, Any] | None = None,
             edit_args: Mapping[str, Any] | None = None,
             edit_scope: str = "all",
             hookpoints: Iterable[str] = (),
             return_logits: bool = False,
             dtype: jnp.dtype = jnp.float32,
             add_bos: bool = True,
             cache_length: int | None = None,
             cache_sharding: Callable[[int, int], Any] | None = None,
             on_token: Callable[[int, np.ndarray, np.ndarray], None] | None
             = None) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    params: Gemma 3 parameters (official layout), possibly sharded.
    prompts: a string, a list of strings (tokenized with BOS), or lists of
      token ids (used as given).
    config: the model's configuration.
    tokenizer: a `text.Tokenizer`, for text prompts, stop tokens and the
      returned text.
    max_new_tokens: most tokens to generate per prompt (>= 1).
    sampling: greedy (default) or temperature / top-k / top-p.
    key: PRNG key for sampling; required unless greedy.
    stop_tokens: ids that end a row (kept in its output); defaults to EOS and
      `<end_of_turn>` from the tokenizer, else EOS id 1.
    edits, edit_args: as in `models.forward`: {hookpoint: edit} applied at
      every pass (prefill and each decode step).
    edit_scope: "all", "prompt" (edits only while reading the prompt) or
      "generated" (only while feeding generated tokens back).
    hookpoints: names to record over the prompt and generated tokens.
    return_logits: keep each step's logits (B x steps x vocab float32).
    dtype: compute dtype (float32 or bfloat16); the cache uses it too.
    add_bos: prepend BOS when tokenizing text prompts.
    cache_length: override the cache bucket (>= prompt bucket + new tokens).
    cache_sharding: with sharded `params`, a function (batch size, cache
      length) -> `KVCache` of shardings that lays the cache out, e.g.
      `functools.partial(parallel.gemma_layout.cache_shardings, config,
      mesh, "fsdp")`; None leaves the layout to XLA.
    on_token: called on the host after every step as
      `on_token(step, tokens (B,), done (B,))`, in order (for streaming).

  Returns:
    A `Generation`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if edit_scope not in SCOPES:
    raise ValueError(f"edit_scope must be one of {', '.join(SCOPES)}, got "
                     f"{edit_scope!r}")
  if not sampling.greedy and key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key (key=)")
  key = jax.random.key(0) if key is None else key
  rows = _as_ids(prompts, tokenizer, add_bos)
  for i, r in enumerate(rows):
    if r.max() >= config.vocab_size or r.min() < 0:
      raise ValueError(f"prompt {i}: token ids must lie in [0, "
                       f"{config.vocab_size}), got {r.min()}..{r.max()}")
  t0 = prompt_bucket(max(len(r) for r in rows))
  length = cache_length or cache_bucket(t0, max_new_tokens)
  if length < t0 + max_new_tokens - 1:
    raise ValueError(f"cache_length {length} is shorter than the prompt "
                     f"bucket {t0} + {max_new_tokens} new tokens")
  if stop_tokens is None:
    stop_tokens = stop_ids_of(tokenizer) if tokenizer is not None else (1,)
  stop = jnp.asarray(sorted(set(int(t) for t in stop_tokens)) or [-1],
                     jnp.int32)

  hps = tuple(p.name for p in models.hooks.parse_all(hookpoints, config))
  edits = {models.hooks.parse(k).check(config).name: v
           for k, v in (edits or {}).items()}
  edit_args = {models.hooks.parse(k).name: v
               for k, v in (edit_args or {}).items()}
  key_of = lambda d: tuple(sorted(d.items()))
  prompt_edits = key_of(edits) if edit_scope in ("all", "prompt") else ()
  new_edits = key_of(edits) if edit_scope in ("all", "generated") else ()

  tokens, mask = left_pad(rows, t0)
  dtype = jnp.dtype(dtype)
  layout = (None if cache_sharding is None
            else cache_sharding(len(rows), length))
  logits, cache, prompt_acts = _loop.prefill(
      params, jnp.asarray(tokens), jnp.asarray(mask), edit_args,
      config=config, dtype=dtype, cache_length=length, edits=prompt_edits,
      hookpoints=hps, cache_sharding=layout)
  _loop._STREAM["fn"] = on_token  # pylint: disable=protected-access
  try:
    out = _loop.decode(
        params, cache, logits, key, jnp.int32(max_new_tokens), stop,
        edit_args, config=config, dtype=dtype, sampling=sampling,
        num_slots=length - t0, edits=new_edits, hookpoints=hps,
        keep_logits=return_logits, stream=on_token is not None,
        cache_sharding=layout,
        screen=(greedy_head.cached_screen(
            params["embedder"]["input_embedding"], dtype)
                if _loop.screens_greedy(sampling, return_logits, layout,
                                        len(rows), dtype)
                else None))
    del cache  # donated to decode, which returns it updated
    out = jax.device_get({k: v for k, v in out.items() if k != "cache"})
  finally:
    _loop._STREAM["fn"] = None  # pylint: disable=protected-access
  return _collect(rows, t0, out, jax.device_get(prompt_acts), tokenizer,
                  set(int(s) for s in np.asarray(stop)))


def _collect(rows, t0, out, prompt_acts, tokenizer, stop) -> Generation:
  count = int(out["count"])
  gen, stopped, n_taken = [], [], []
  for b in range(len(rows)):
    ids = out["tokens"][b, :count]
    hit = np.flatnonzero(np.isin(ids, list(stop)))
    n = int(hit[0]) + 1 if hit.size else count
    gen.append(ids[:n].copy())
    stopped.append(bool(hit.size))
    n_taken.append(n)
  text = None
  if tokenizer is not None:
    text = [tokenizer.decode([int(t) for t in g if int(t) not in stop])
            for g in gen]
  logits = None
  if "logits" in out:
    logits = [out["logits"][b, :n] for b, n in enumerate(n_taken)]
  acts = {}
  for name, prompt_values in prompt_acts.items():
    acts[name] = [
        np.concatenate([prompt_values[b, t0 - len(rows[b]):],
                        out["activations"][name][b, :n - 1]], axis=0)
        for b, n in enumerate(n_taken)]
  return Generation(prompt_tokens=list(rows), tokens=gen, text=text,
                    stopped=stopped, logits=logits, activations=acts)
