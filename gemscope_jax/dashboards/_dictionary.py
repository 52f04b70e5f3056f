"""What the dashboard scan needs from a dictionary, whatever its kind.

`Source` reads an `interop.InferenceDictionary` (SAE, transcoder, skip
transcoder) or an `interop.MultiLayerInference` (crosscoder, CLT) into:
the hookpoint(s) it reads, its kind and flat width, its encoder as arrays
plus a pure function (`latents`) to jit, and the vectors the logit lens and
the neighbour tables compare (`decoder_rows`, `encoder_columns`,
`write_rows`).

A CLT's latents are flattened layer-major: latent `i * d_sae + j` is latent
j of the layer-i encoder (the flat width is n_layers * d_sae, as Gemma Scope
2's config calls `width`).

Caveat: `decoder_rows` of a CLT or crosscoder are (width, n_layers * d)
copies in host memory (a 262k-wide CLT over 18 layers of 640 is 12 GB).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import errors, models
from gemscope_jax.interop._inference import InferenceDictionary
from gemscope_jax.interop.multilayer import MultiLayerInference

KINDS = ("sae", "transcoder", "skip_transcoder", "crosscoder", "clt")

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static (hashable) part of a dictionary's encoder.

  Attributes:
    kind: one of `KINDS`.
    architecture: 'jumprelu', 'topk' or 'relu'.
    k: latents kept per token (topk).
    hookpoints: the input hookpoint(s), in the order the encoder reads them.
    width: flat number of latents.
    pre_enc_bias: subtract b_dec from the input first (an SAE from SAELens).
  """
  kind: str
  architecture: str
  k: int | None
  hookpoints: tuple[str, ...]
  width: int
  pre_enc_bias: bool = False

  @property
  def multilayer(self) -> bool:
    return self.kind in ("crosscoder", "clt")


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """A dictionary as the scan reads it: `spec` and its encoder `arrays`
  (numpy float32: w_enc, b_enc, optional threshold and b_dec), plus the
  dictionary itself for the lens."""
  spec: Spec
  arrays: dict[str, np.ndarray]
  dictionary: Any


def kind_of(d) -> str:
  """'sae', 'transcoder', 'skip_transcoder', 'crosscoder' or 'clt'."""
  if isinstance(d, MultiLayerInference):
    return d.kind
  if d.affine_skip is not None:
    return "skip_transcoder"
  return "transcoder" if d.is_transcoder else "sae"


def source(d, config: models.Gemma3Config,
           hookpoint: str | None = None) -> Source:
  """Reads `d` for a scan of the model `config`.

  Args:
    d: an `InferenceDictionary` or `MultiLayerInference`.
    config: the model it will read from.
    hookpoint: where an `InferenceDictionary` reads; overrides its own
      `hookpoint` (needed where that is None).

  Raises:
    UsageError: not a dictionary, or no hookpoint known.
    InputError: a hookpoint the model does not have, or an input width
      that is not the hookpoint's.
  """
  if isinstance(d, MultiLayerInference):
    if d.hookpoints is None:
      raise errors.UsageError(
          f"scan: this {d.kind} does not say which hookpoints it reads "
          "(MultiLayerInference.hookpoints is None)")
    hps = tuple(d.hookpoints)
    if len(hps) != d.n_layers:
      raise errors.InputError(
          f"scan: the {d.kind} has {d.n_layers} layers but names "
          f"{len(hps)} hookpoints ({', '.join(hps)})")
    width = d.d_sae * (d.n_layers if d.kind == "clt" else 1)
    arrays = {"w_enc": d.w_enc, "b_enc": d.b_enc,
              "threshold": d.threshold}
    spec = Spec(d.kind, d.architecture, d.k, _check_hookpoints(hps, config,
                                                              d.d_in), width)
    return Source(spec, arrays, d)
  if not isinstance(d, InferenceDictionary):
    raise errors.UsageError(
        f"scan: expected an interop.InferenceDictionary or "
        f"MultiLayerInference, got {type(d).__name__}")
  hp = hookpoint or d.hookpoint
  if hp is None:
    raise errors.UsageError(
        "scan: the dictionary does not say where it reads; pass "
        + errors.option("hookpoint='layer_L/site'", "--hookpoint"))
  arrays = {"w_enc": d.w_enc, "b_enc": d.b_enc}
  if d.threshold is not None:
    arrays["threshold"] = d.threshold
  if d.pre_enc_bias:
    arrays["b_dec"] = d.b_dec
  spec = Spec(kind_of(d), d.architecture, d.k,
              _check_hookpoints((hp,), config, d.d_in), d.d_sae,
              d.pre_enc_bias)
  return Source(spec, arrays, d)


def _check_hookpoints(hps, config, d_in) -> tuple[str, ...]:
  names = []
  for hp in hps:
    try:
      point = models.hooks.parse(hp).check(config)
    except ValueError as e:
      raise errors.InputError(f"scan: the dictionary reads {hp!r}, which "
                              f"{config.name} does not have: {e}") from None
    if point.width(config) != d_in:
      raise errors.InputError(
          f"scan: the dictionary reads {d_in}-wide inputs but {point.name} "
          f"of {config.name} is {point.width(config)} wide")
    names.append(point.name)
  return tuple(names)


def latents(spec: Spec, arrays: dict[str, jax.Array],
            acts: dict[str, jax.Array]) -> jax.Array:
  """(width, tokens) float32 latents, latent-major, from the recorded
  hookpoints' (..., d) activations (flattened over the leading axes), with
  the arithmetic of `InferenceDictionary.encode` /
  `MultiLayerInference.encode` (float32, highest matmul precision).

  Latent-major because everything downstream reduces over tokens per
  latent: the encoder matmul writes that layout directly, where a
  transpose of a (tokens, width) array would cost as much as a top-k.
  """
  if not spec.multilayer:
    x = acts[spec.hookpoints[0]].astype(jnp.float32)
    x = x.reshape(-1, x.shape[-1])                          # (N, d)
    if spec.pre_enc_bias:
      x = x - arrays["b_dec"]
    pre = jnp.einsum("dw,nd->wn", arrays["w_enc"], x, precision=_HIGHEST
                     ) + arrays["b_enc"][:, None]
    f = jax.nn.relu(pre)
    if spec.architecture == "jumprelu":
      return f * (pre > arrays["threshold"][:, None]).astype(f.dtype)
    if spec.architecture == "topk":
      return _topk_per_token(f, spec.k, strict=True)
    return f
  x = jnp.stack([acts[h].astype(jnp.float32) for h in spec.hookpoints],
                axis=-2)                                    # (..., n, d)
  x = x.reshape(-1, *x.shape[-2:])                          # (N, n, d)
  if spec.kind == "clt":
    pre = jnp.einsum("nds,Nnd->nsN", arrays["w_enc"], x, precision=_HIGHEST
                     ) + arrays["b_enc"][..., None]
  else:
    pre = jnp.einsum("nds,Nnd->sN", arrays["w_enc"], x, precision=_HIGHEST
                     ) + arrays["b_enc"][:, None]
  f = jax.nn.relu(pre)
  if spec.architecture == "jumprelu":
    f = f * (pre > arrays["threshold"][..., None]).astype(f.dtype)
  f = f.reshape(spec.width, -1)             # a CLT's layers, layer-major
  if spec.architecture == "topk":
    f = _topk_per_token(f, spec.k, strict=False)
  return f


def _topk_per_token(f, k, strict):
  """Keeps each token's (column's) k largest latents: exactly k by
  position (`InferenceDictionary`, strict) or every latent >= the k-th
  largest (`MultiLayerInference`)."""
  ft = f.T
  values, idx = jax.lax.top_k(ft, k)
  if strict:
    keep = jnp.put_along_axis(jnp.zeros_like(ft), idx,
                              jnp.ones(idx.shape, ft.dtype), axis=-1,
                              inplace=False)
  else:
    keep = (ft >= values[:, -1:]).astype(ft.dtype)
  return (ft * keep).T


# --- the vectors the lens and the neighbour tables compare ------------------

def decoder_rows(src: Source) -> np.ndarray:
  """(width, D) each latent's whole decoder row: a CLT's or crosscoder's
  writes to every output layer concatenated (the row that training keeps
  at unit norm jointly), zeros where a CLT latent cannot write."""
  d = src.dictionary
  if src.spec.kind == "clt":
    n, s, _, dd = d.w_dec.shape
    return d.w_dec.reshape(n * s, n * dd)
  if src.spec.kind == "crosscoder":
    return d.w_dec.reshape(d.w_dec.shape[0], -1)
  return d.w_dec


def encoder_columns(src: Source) -> np.ndarray:
  """(width, D) each latent's encoder column: a CLT latent's column in the
  concatenated input space of all layers (zeros but for its own layer, so
  latents of different layers have cosine 0)."""
  d = src.dictionary
  if src.spec.kind == "clt":
    n, dd, s = d.w_enc.shape
    cols = np.zeros((n, s, n, dd), np.float32)
    for i in range(n):
      cols[i, :, i] = d.w_enc[i].T
    return cols.reshape(n * s, n * dd)
  if src.spec.kind == "crosscoder":
    return d.w_enc.transpose(2, 0, 1).reshape(d.w_enc.shape[2], -1)
  return d.w_enc.T


def write_rows(src: Source, config: models.Gemma3Config, params
               ) -> np.ndarray:
  """(width, d_model) what each latent adds to the residual stream, as the
  logit lens reads it (see `lens`): an SAE's or transcoder's decoder row
  (an `attn_out` row times the attention output projection, skipping the
  post-attention norm); a CLT latent's writes summed over its output
  layers (all add into the stream); a crosscoder's row at its last layer.
  """
  d = src.dictionary
  if src.spec.kind == "clt":
    return d.w_dec.sum(axis=2).reshape(src.spec.width, -1)
  if src.spec.kind == "crosscoder":
    return d.w_dec[:, -1]
  out = d.hookpoint_out or src.spec.hookpoints[0]
  point = models.hooks.parse(out)
  if point.site == "attn_out":
    w_o = np.asarray(params[f"layer_{point.layer}"]["attn"]["attn_vec_einsum"]
                     ["w"], np.float32)
    return d.w_dec @ w_o.reshape(-1, config.d_model)
  return d.w_dec


def blocks_needed(d, hookpoint: str | None = None) -> int | None:
  """How many of Gemma's blocks a scan of `d` runs or reads, the lens
  included: 1 + the deepest layer among its input hookpoints and, for an
  `attn_out` writer, the block whose output projection `write_rows` reads.
  None where the hookpoints are unknown or unreadable (the scan reports
  those). `convert.pretrained.load_model(..., num_blocks=)` takes it.

  Args:
    d: an `InferenceDictionary` or `MultiLayerInference`.
    hookpoint: where an `InferenceDictionary` reads, overriding its own.
  """
  parse = models.hooks.parse
  try:
    if isinstance(d, MultiLayerInference):
      points = [parse(n) for n in d.hookpoints]
    elif isinstance(d, InferenceDictionary):
      points = [parse(hookpoint or d.hookpoint)]
      if d.hookpoint_out and parse(d.hookpoint_out).site == "attn_out":
        points.append(parse(d.hookpoint_out))
    else:
      return None
  except (ValueError, TypeError, AttributeError):  # None, unparsable
    return None
  return 1 + max(p.layer for p in points) if points else None
