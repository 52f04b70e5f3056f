"""`InferenceDictionary`: a trained dictionary in raw activation units.

Both foreign formats (Gemma Scope 2, SAELens) read into and write from this
one object. It holds float32 numpy arrays named as in Gemma Scope 2
(`w_enc` (d_in, d_sae), `w_dec` (d_sae, d_out), `b_enc`, `b_dec`, optional
`threshold` (d_sae,) and `affine_skip` (d_in, d_out)) and computes
  pre = (x - b_dec if pre_enc_bias else x) @ w_enc + b_enc
  f   = relu(pre) * (pre > threshold)   jumprelu
        relu(pre)                       relu
        the k largest of relu(pre)      topk (per token)
  recon = f @ w_dec + b_dec (+ x @ affine_skip)
on raw (un-normalised) activations. `as_module` rebuilds one of our Flax
modules with the same arithmetic so the evaluation code (`evals`) can splice
it into Gemma.

Also here: the checks every reader shares (`FormatError`, shapes, finiteness)
(writers build their output folder beside its destination with
`assets.atomic_dir` and rename it into place).

Caveat: arrays are held in host memory as numpy (a 1m-wide 27B dictionary is
several GB); `encode`/`decode` convert them to device arrays on every call,
which is fine for tests and small batches but not for a hot loop (use
`as_module` and jit there).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import dictionaries, errors

ARCHITECTURES = ("jumprelu", "topk", "relu")

_HIGHEST = jax.lax.Precision.HIGHEST


class FormatError(errors.InputError):
  """A dictionary file that does not say what its format requires (an
  `errors.InputError`, a ValueError: exit code 3 on the command line)."""


def check_shape(file: str, key: str, got: tuple[int, ...],
                expected: tuple[int, ...], why: str) -> None:
  """Raises FormatError naming file, key and both shapes unless equal."""
  if tuple(got) != tuple(expected):
    raise FormatError(f"{file}: {key} has shape {tuple(got)}, expected "
                      f"{tuple(expected)} ({why})")


def _pre_acts(x, w_enc, b_enc, shift):
  """Pre-activations of fp32 x: (x - shift) @ w_enc + b_enc (no shift when
  None: the SAELens input subtraction is folded away or absent)."""
  if shift is not None:
    x = x - shift
  return jnp.matmul(x, w_enc, precision=_HIGHEST) + b_enc


def _as_input(x):
  """x for a jitted function: a JAX array as it is, anything else as a
  NumPy array (jit takes it without the per-shape program that
  `jnp.asarray` compiles outside a trace)."""
  return x if isinstance(x, jax.Array) else np.asarray(x)


@functools.partial(jax.jit, static_argnames=("architecture", "k"))
def _encode(x, w_enc, b_enc, shift, threshold, *, architecture, k):
  """`InferenceDictionary.encode` as one program per input shape (run op by
  op, its five operations compiled five programs on first use: a third of
  a second of a short attribution's first call). x comes in any float
  dtype and is cast here: `jnp.asarray` outside jit compiles a program
  of its own per shape."""
  pre = _pre_acts(x.astype(jnp.float32), w_enc, b_enc, shift)
  acts = jax.nn.relu(pre)
  if architecture == "jumprelu":
    return acts * (pre > threshold).astype(acts.dtype)
  if architecture == "topk":
    _, idx = jax.lax.top_k(acts, k)
    mask = jnp.put_along_axis(jnp.zeros_like(acts), idx,
                              jnp.ones(idx.shape, acts.dtype), axis=-1,
                              inplace=False)
    return acts * mask
  return acts


def check_finite(file: str, arrays: dict[str, np.ndarray]) -> None:
  """Raises FormatError naming file and key of the first non-finite array."""
  for key, value in arrays.items():
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
    if bad:
      raise FormatError(f"{file}: {key} holds {bad} non-finite (NaN/Inf) "
                        f"value(s)")


def require_keys(file: str, arrays: dict[str, Any], keys) -> None:
  """Raises FormatError naming file, the missing keys and those present."""
  missing = [k for k in keys if k not in arrays]
  if missing:
    raise FormatError(f"{file}: missing key(s) {', '.join(missing)} (holds "
                      f"{', '.join(sorted(arrays)) or 'nothing'})")


def _f32(name: str, value) -> np.ndarray:
  if value is None:
    raise ValueError(f"InferenceDictionary.{name}: required")
  return np.asarray(value, np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class InferenceDictionary:
  """A sparse dictionary for raw activations (see the module docstring).

  Attributes:
    w_enc: (d_in, d_sae) encoder.
    w_dec: (d_sae, d_out) decoder.
    b_enc: (d_sae,) encoder bias.
    b_dec: (d_out,) decoder bias.
    threshold: (d_sae,) JumpReLU thresholds; None for topk and relu.
    affine_skip: (d_in, d_out) linear skip term of an affine transcoder.
    architecture: 'jumprelu', 'topk' or 'relu'.
    k: latents kept per token (topk only).
    pre_enc_bias: subtract b_dec from x before the encoder (SAELens's
      `apply_b_dec_to_input`); `folded()` removes it.
    hookpoint: where it reads, in our naming ("layer_6/resid_post"), if known.
    hookpoint_out: where a transcoder writes; None for an SAE.
    model_name: the model it was trained on, as its source file names it.
    metadata: anything else the source said (plain JSON values).
  """
  w_enc: np.ndarray
  w_dec: np.ndarray
  b_enc: np.ndarray
  b_dec: np.ndarray
  threshold: np.ndarray | None = None
  affine_skip: np.ndarray | None = None
  architecture: str = "jumprelu"
  k: int | None = None
  pre_enc_bias: bool = False
  hookpoint: str | None = None
  hookpoint_out: str | None = None
  model_name: str | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name in ("w_enc", "w_dec", "b_enc", "b_dec"):
      object.__setattr__(self, name, _f32(name, getattr(self, name)))
    for name in ("threshold", "affine_skip"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, _f32(name, getattr(self, name)))
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"InferenceDictionary.architecture: must be one of "
                       f"{ARCHITECTURES}, got {self.architecture!r}")
    if self.w_enc.ndim != 2 or self.w_dec.ndim != 2:
      raise ValueError(f"InferenceDictionary: w_enc {self.w_enc.shape} and "
                       f"w_dec {self.w_dec.shape} must be matrices")
    d_in, d_sae = self.w_enc.shape
    d_out = self.w_dec.shape[1]
    want = {"w_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
            "threshold": (d_sae,), "affine_skip": (d_in, d_out)}
    for name, shape in want.items():
      value = getattr(self, name)
      if value is not None:
        check_shape("InferenceDictionary", name, value.shape, shape,
                    f"w_enc is {self.w_enc.shape}, w_dec {self.w_dec.shape}")
    if (self.architecture == "jumprelu") != (self.threshold is not None):
      raise ValueError("InferenceDictionary.threshold: jumprelu needs one, "
                       f"{self.architecture} takes none")
    if self.architecture == "topk":
      if not isinstance(self.k, int) or not 1 <= self.k <= d_sae:
        raise ValueError(f"InferenceDictionary.k: topk needs an int in "
                         f"[1, {d_sae}], got {self.k!r}")
    if self.pre_enc_bias and d_out != d_in:
      raise ValueError("InferenceDictionary.pre_enc_bias: needs d_out == d_in")

  @property
  def d_in(self) -> int:
    return int(self.w_enc.shape[0])

  @property
  def d_sae(self) -> int:
    return int(self.w_enc.shape[1])

  @property
  def d_out(self) -> int:
    return int(self.w_dec.shape[1])

  @property
  def is_transcoder(self) -> bool:
    return (self.hookpoint_out is not None or self.d_out != self.d_in
            or self.affine_skip is not None)

  def replace(self, **changes) -> InferenceDictionary:
    return dataclasses.replace(self, **changes)

  def folded(self) -> InferenceDictionary:
    """The same map with b_dec's input subtraction moved into b_enc."""
    if not self.pre_enc_bias:
      return self
    b_enc = (self.b_enc.astype(np.float64)
             - self.b_dec.astype(np.float64) @ self.w_enc.astype(np.float64))
    return self.replace(b_enc=b_enc.astype(np.float32), pre_enc_bias=False)

  def pre_acts(self, x) -> jax.Array:
    """(..., d_in) raw activations -> (..., d_sae) fp32 pre-activations."""
    return _pre_acts(jnp.asarray(x, jnp.float32), self.w_enc, self.b_enc,
                     self._shift)

  def encode(self, x) -> jax.Array:
    """(..., d_in) raw activations -> (..., d_sae) fp32 latents."""
    return _encode(_as_input(x), self.w_enc, self.b_enc,
                   self._shift, self.threshold,
                   architecture=self.architecture, k=self.k)

  def encode_numpy(self, x) -> np.ndarray:
    """`encode` in NumPy, float32: no program to compile, for callers whose
    activations are on the host already (a short attribution's first call
    spent a quarter of a second compiling `encode` for one small input)."""
    x = np.asarray(x, np.float32)
    if self._shift is not None:
      x = x - self._shift
    pre = np.matmul(x, self.w_enc) + self.b_enc
    acts = np.maximum(pre, np.float32(0))
    if self.architecture == "jumprelu":
      return acts * (pre > self.threshold)
    if self.architecture == "topk":
      top = np.argpartition(-acts, self.k - 1, axis=-1)[..., :self.k]
      keep = np.zeros(acts.shape, bool)
      np.put_along_axis(keep, top, True, axis=-1)
      return acts * keep
    return acts

  @property
  def _shift(self) -> np.ndarray | None:
    """What the encoder subtracts from its input first (b_dec with
    `pre_enc_bias`), or None."""
    return self.b_dec if self.pre_enc_bias else None

  def decode(self, latents, x=None) -> jax.Array:
    """Latents -> (..., d_out) reconstruction; an affine transcoder also
    needs its input x for the skip term."""
    recon = jnp.matmul(jnp.asarray(latents, jnp.float32), self.w_dec,
                       precision=_HIGHEST) + self.b_dec
    if self.affine_skip is not None:
      if x is None:
        raise ValueError("decode: this transcoder has an affine skip "
                         "connection; pass its input x")
      recon = recon + jnp.matmul(jnp.asarray(x, jnp.float32),
                                 self.affine_skip, precision=_HIGHEST)
    return recon

  def __call__(self, x) -> jax.Array:
    return self.decode(self.encode(x), x)


def as_module(d: InferenceDictionary):
  """(module, params, norm_scale) of one of our Flax modules computing `d`.

  The module reads activations divided by norm_scale = 1, so
  `evals.evaluate.evaluate(module=..., params=..., norm_scale=...)` runs
  it unchanged. Transcoders become our transcoder modules (the affine skip
  as `w_skip`); a ReLU transcoder has no module here.

  Args:
    d: the dictionary (a transcoder with `pre_enc_bias` is folded first).

  Returns:
    (module, params, 1.0): an unbound module, its unboxed parameters as
    device arrays, and the norm_scale to evaluate it with.

  Raises:
    ValueError: a ReLU transcoder.
  """
  transcoder = d.is_transcoder
  common = dict(d_in=d.d_in, d_sae=d.d_sae,
                d_out=None if d.d_out == d.d_in else d.d_out,
                pre_enc_bias=d.pre_enc_bias)
  if transcoder:
    d = d.folded()
    common.update(pre_enc_bias=False, affine_skip=d.affine_skip is not None)
  params = {k: jnp.asarray(getattr(d, k))
            for k in ("w_enc", "w_dec", "b_enc", "b_dec")}
  if d.affine_skip is not None:
    params["w_skip"] = jnp.asarray(d.affine_skip)
  if d.architecture == "jumprelu":
    cls = dictionaries.JumpReLUTranscoder if transcoder else (
        dictionaries.JumpReLU)
    module = cls(**common, sparsity_penalty="l0")
    params["threshold"] = jnp.asarray(d.threshold)
  elif d.architecture == "topk":
    cls = dictionaries.TopKTranscoder if transcoder else dictionaries.TopK
    module = cls(**common, k=d.k)
  elif transcoder:
    raise ValueError("as_module: no ReLU transcoder module")
  else:
    module = dictionaries.ReLU(**common)
  return module, params, 1.0
