"""Jitted entry points: run Gemma 3, record hookpoints, edit activations.

`forward` is the one function behind harvesting activations, computing
logits and loss, and running the model with an activation replaced or edited
(splicing a dictionary in, ablation, steering). It is a pure function of the
parameters and inputs; the configuration, the hookpoints and the edit
functions are static, so each distinct combination compiles once. Pass the
same edit function objects each call (module-level functions or
`functools.partial` objects kept around) to reuse the compiled program; put
anything that changes between calls (dictionary weights, a steering vector)
into `edit_args`, which is traced.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from gemscope_jax.models import hooks as hooks_lib
from gemscope_jax.models._config import Gemma3Config
from gemscope_jax.models._transformer import Gemma3

Params = Mapping[str, Any]
# fn(activation, args) -> new activation, same shape.
EditFn = Callable[[jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class ReadingEdit:
  """An edit that also sees activations computed earlier in the same pass.

  `fn(x, args, seen)` gets `seen = {name: value}` for each hookpoint in
  `reads`, as the pass computed it (after any edit there): e.g. a
  transcoder replacing `layer_L/mlp_out` reads `layer_L/mlp_in`, so in a
  replacement model every layer's transcoder reads the replaced stream.
  Every name in `reads` must come before the edited hookpoint in the pass.
  """
  fn: Callable[[jax.Array, Any, dict[str, jax.Array]], jax.Array]
  reads: tuple[str, ...]

  def __call__(self, x, args, seen):
    return self.fn(x, args, seen)


@flax.struct.dataclass
class EditContext:
  """What a `ContextEdit` knows about the tokens of the pass it edits.

  Attributes:
    seen: {hookpoint: value} for each name in the edit's `reads`, as the pass
      computed it (after any edit there).
    positions: (B, T) int position of each token in its sequence (the count
      of real tokens before it, as RoPE uses; BOS is 0).
    generated: (B, T) bool, True for tokens the model generated (always
      False in `forward`; `generate` sets it during decoding).
    valid: (B, T) bool, True for real (non-padding) tokens.
  """
  seen: dict[str, jax.Array]
  positions: jax.Array
  generated: jax.Array
  valid: jax.Array


@dataclasses.dataclass(frozen=True)
class ContextEdit:
  """An edit that knows where its tokens are: `fn(x, args, ctx)`.

  `ctx` is an `EditContext`: earlier hookpoints named in `reads` (as for
  `ReadingEdit`), each token's position, and whether it was generated. This
  is how an edit limits itself to chosen positions, to the prompt or to the
  generated tokens, and it behaves the same in `forward` and in `generate`
  (where a decode step's `x` is (B, 1, width)). Keep `fn` hashable and
  stable across calls (module-level function or `functools.partial`).
  """
  fn: Callable[[jax.Array, Any, EditContext], jax.Array]
  reads: tuple[str, ...] = ()

  def __call__(self, x, args, ctx):
    return self.fn(x, args, ctx)


@flax.struct.dataclass
class Gemma3Output:
  """What one forward pass returns.

  Attributes:
    activations: {"layer_L/site": (B, T, width)} for each requested hookpoint,
      after any edit at that hookpoint has been applied.
    logits: (B, T, V) in the compute dtype, or None.
    loss: Mean next-token cross-entropy (nats) over pairs of real tokens, or
      None when no unembedding was run.
    token_loss: (B, T - 1) per-position loss (0 where masked), or None.
  """
  activations: dict[str, jax.Array]
  logits: jax.Array | None = None
  loss: jax.Array | None = None
  token_loss: jax.Array | None = None


def init_params(config: Gemma3Config, rng: jax.Array,
                dtype: jnp.dtype = jnp.float32) -> Params:
  """Random parameters (norm scales zero, weights N(0, 0.02)) in `dtype`."""
  tokens = jnp.ones((1, 1), jnp.int32)
  params = Gemma3(config).init(rng, tokens)["params"]
  return jax.tree.map(lambda x: x.astype(dtype), params)


def abstract_params(config: Gemma3Config,
                    dtype: jnp.dtype = jnp.float32) -> Params:
  """The parameter tree as ShapeDtypeStructs, without allocating memory."""
  return jax.eval_shape(
      functools.partial(init_params, config, dtype=dtype),
      jax.random.key(0))


def count_params(tree: Params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def next_token_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Mean and per-position cross-entropy of predicting tokens[:, 1:]."""
  # logsumexp minus the target's logit: no (B, T, V) log-probabilities array.
  logits = logits[:, :-1].astype(jnp.float32)
  target = tokens[:, 1:]
  picked = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - picked
  valid = mask[:, 1:] & mask[:, :-1]
  nll = jnp.where(valid, nll, 0.0)
  return nll.sum() / jnp.maximum(valid.sum(), 1), nll


def default_positions(mask: jax.Array) -> jax.Array:
  """(B, T) positions counting real tokens before each (left padding ok)."""
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def make_intervene(edit_fns: Mapping[str, Any], wanted: frozenset[str],
                   edit_args: Mapping[str, Any], positions: jax.Array,
                   generated: jax.Array, valid: jax.Array):
  """The `intervene(name, x)` callback of one traced pass, and its records.

  Applies `edit_fns[name]` (a plain `EditFn`, `ReadingEdit` or
  `ContextEdit`) at each hookpoint and records the (edited) value of each
  name in `wanted` into the returned dict, which the pass fills as it runs.
  `positions`, `generated` and `valid` are (B, T) and describe the tokens
  of this pass for `ContextEdit`s.
  """
  recorded = {}
  seen = {}  # every hookpoint so far (reading edits; unused ones vanish)

  def reads_of(name, fn):
    missing = [r for r in fn.reads if r not in seen]
    if missing:
      raise ValueError(f"edit at {name} reads {', '.join(missing)}, "
                       "which the pass has not computed before it")
    return {r: seen[r] for r in fn.reads}

  def intervene(name, x):
    if name in edit_fns:
      fn, dtype_in = edit_fns[name], x.dtype
      if isinstance(fn, ReadingEdit):
        x = fn(x, edit_args.get(name), reads_of(name, fn))
      elif isinstance(fn, ContextEdit):
        ctx = EditContext(seen=reads_of(name, fn), positions=positions,
                          generated=generated, valid=valid)
        x = fn(x, edit_args.get(name), ctx)
      else:
        x = fn(x, edit_args.get(name))
      x = x.astype(dtype_in)
    seen[name] = x
    if name in wanted:
      recorded[name] = x
    return x

  return intervene, recorded


@functools.partial(
    jax.jit,
    static_argnames=("config", "hookpoints", "edits", "unembed", "keep_logits",
                     "want_loss", "dtype"))
def _forward(params, tokens, mask, positions, edit_args, *, config, hookpoints,
             edits, unembed, keep_logits, want_loss, dtype):
  edit_fns = dict(edits)
  # Positions for ContextEdits; the model still gets `positions` as given
  # (None lets it gather RoPE from a small table: faster on CPU).
  token_positions = default_positions(mask) if positions is None else positions
  intervene, recorded = make_intervene(
      edit_fns, frozenset(hookpoints), edit_args, token_positions,
      jnp.zeros_like(mask), mask)

  needed = [hooks_lib.parse(n).layer for n in (*hookpoints, *edit_fns)]
  num_blocks = None if unembed else max(needed) + 1
  out = Gemma3(config, dtype).apply(
      {"params": params}, tokens, mask, positions, num_blocks=num_blocks,
      unembed=unembed, intervene=intervene)
  if not unembed:
    return Gemma3Output(activations=recorded)
  if not want_loss:
    return Gemma3Output(activations=recorded, logits=out)
  loss, token_loss = next_token_loss(out, tokens, mask)
  return Gemma3Output(activations=recorded,
                      logits=out if keep_logits else None,
                      loss=loss, token_loss=token_loss)


def forward(params: Params, tokens: jax.Array, mask: jax.Array | None = None,
            *, config: Gemma3Config,
            hookpoints: Iterable[str | hooks_lib.Hookpoint] = (),
            logits: bool = True, loss: bool | None = None,
            edits: Mapping[str, EditFn] | None = None,
            edit_args: Mapping[str, Any] | None = None,
            positions: jax.Array | None = None,
            dtype: jnp.dtype = jnp.float32) -> Gemma3Output:
  """Runs Gemma 3 once, recording and optionally editing hookpoints.

  Args:
    params: Parameter tree in the official layout.
    tokens: (B, T) int token ids.
    mask: (B, T) bool, True for real tokens; defaults to tokens != 0.
    config: The model's configuration.
    hookpoints: Names like "layer_6/resid_post" to record.
    logits: Return the logits. If neither logits nor loss is wanted, the pass
      stops after the last block that a hookpoint or edit needs.
    loss: Compute the next-token loss; defaults to the value of `logits`.
    edits: {hookpoint: fn(x, args) -> x} applied in the pass; downstream
      computation sees the edited value. A `ReadingEdit` also gets earlier
      hookpoints' values of the same pass; a `ContextEdit` also gets token
      positions (see `EditContext`).
    edit_args: {hookpoint: pytree} passed to the matching edit function.
    positions: (B, T) positions; defaults to counting real tokens before
      each one (left and right padding both work).
    dtype: Compute dtype, jnp.float32 or jnp.bfloat16.

  Returns:
    A Gemma3Output.
  """
  hps = tuple(p.name for p in hooks_lib.parse_all(hookpoints, config))
  edits = dict(edits or {})
  for name in edits:
    hooks_lib.parse(name).check(config)
  edit_key = tuple(sorted((hooks_lib.parse(k).name, v)
                          for k, v in edits.items()))
  edit_args = {hooks_lib.parse(k).name: v
               for k, v in (edit_args or {}).items()}
  loss = logits if loss is None else loss
  unembed = logits or loss
  if not unembed and not hps:
    raise ValueError("forward: nothing requested (no hookpoints, logits=False"
                     ", loss=False)")
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be (batch, time), got shape {tokens.shape}")
  if mask is None:
    mask = tokens != 0
  mask = jnp.asarray(mask, bool)
  if mask.shape != tokens.shape:
    raise ValueError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
  return _forward(params, tokens, mask, positions, edit_args, config=config,
                  hookpoints=hps, edits=edit_key, unembed=bool(unembed),
                  keep_logits=bool(logits), want_loss=bool(loss),
                  dtype=jnp.dtype(dtype))
