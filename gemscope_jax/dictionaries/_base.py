"""What every sparse dictionary shares: outputs, parameters, the loss skeleton.

A dictionary maps an activation x (..., d_in) to latents (..., d_sae) and back
to a reconstruction (..., d_out). Parameters are named as in the Gemma Scope 2
files (`w_enc` (d_in, d_sae), `w_dec` (d_sae, d_out), `b_enc`, `b_dec`, plus
`threshold` for JumpReLU) and carry logical axis names ('embed', 'latent') so a
mesh can later shard the latent axis. Pure functions here (decoder
normalisation, gradient projection, folding for export) accept the parameter
dict either boxed (as `init` returns it) or unboxed (`nn.unbox`).

Multi-layer dictionaries (crosscoders, cross-layer transcoders) keep these
names with extra layer axes; their decoder "row" of a latent is everything
after the latent axis (`decoder_row_axes`), so unit norm is taken jointly over
all output layers, and a module's `masks()` (causal variants) are
re-applied after every update.

Caveat: a dense step costs about 12 * B * d_in * d_sae FLOPs and holds several
(B, d_sae) fp32 arrays; `decode` takes an optional (values, indices) form as
the hook for a later sparsity-aware decoder, but nothing here uses it yet.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

Params = dict[str, Any]

# Logical axis names; a mesh's rules map 'latent' to the model axis.
AXES = {
    "w_enc": ("embed", "latent"),
    "w_dec": ("latent", "embed"),
    "b_enc": ("latent",),
    "b_dec": ("embed",),
    "threshold": ("latent",),
    # Affine skip of a transcoder; its output axis is named apart from the
    # input's so a rule sharding 'embed' never names one mesh axis twice.
    "w_skip": ("embed", "embed_out"),
    # The rank-k dense path (`Dictionary.dense_rank`): replicated along
    # its small rank axis.
    "w_dense_in": ("embed", None),
    "w_dense_out": (None, "embed_out"),
}


@flax.struct.dataclass
class DictOutput:
  """One forward pass.

  Attributes:
    latents: (..., d_sae) fp32 sparse code.
    recon: (..., d_out) reconstruction in the module's compute dtype.
    pre_acts: (..., d_sae) fp32 encoder pre-activations (JumpReLU's L0
      estimator and the Matryoshka loss read them).
  """
  latents: jax.Array
  recon: jax.Array
  pre_acts: jax.Array


@flax.struct.dataclass
class LossOutput:
  """A scalar loss and its parts.

  Attributes:
    total: mse + sparsity; what the optimiser minimises.
    mse: squared error summed over features, averaged over tokens.
    sparsity: the architecture's penalty, already times `sparsity_coeff`.
    aux: metrics only (never added to `total`): 'l0' (mean nonzero latents
      per token), 'fvu' (fraction of variance unexplained over the batch),
      and architecture-specific entries.
  """
  total: jax.Array
  mse: jax.Array
  sparsity: jax.Array
  aux: dict[str, jax.Array]


def param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...],
          axes: tuple[str, ...] | None = None) -> jax.Array:
  """A float32 parameter carrying logical axis names (`axes`, else `AXES`)."""
  axes = AXES[name] if axes is None else axes
  return module.param(name, nn.with_logical_partitioning(init, axes),
                      shape, jnp.float32)


def mse_loss(target: jax.Array, recon: jax.Array) -> jax.Array:
  """Squared error summed over the last axis, averaged over the others."""
  err = recon.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.sum(jnp.square(err), axis=-1))


def fvu(target: jax.Array, recon: jax.Array) -> jax.Array:
  """Fraction of variance unexplained, pooled over every token of the batch."""
  t = target.astype(jnp.float32).reshape(-1, target.shape[-1])
  r = recon.astype(jnp.float32).reshape(-1, target.shape[-1])
  var = jnp.sum(jnp.square(t - jnp.mean(t, axis=0)))
  return jnp.sum(jnp.square(r - t)) / var


def _unit_rows_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """He-uniform, then every row scaled to unit L2 norm."""
  w = nn.initializers.he_uniform()(key, shape, dtype)
  return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


def _unit_columns_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """`_unit_rows_init` of the transposed shape, transposed: every column
  unit-norm."""
  return _unit_rows_init(key, shape[::-1], dtype).T


class Dictionary(nn.Module):
  """Shared parameters and forward pass; subclasses define `activate`/`penalty`.

  Attributes:
    d_in: input width.
    d_sae: number of latents.
    d_out: reconstruction width; None means d_in (an SAE). A transcoder sets it
      and should turn `pre_enc_bias` off.
    pre_enc_bias: subtract b_dec from x before the encoder (training-time
      form; `fold_for_inference` moves it into b_enc). Needs d_out == d_in.
    affine_skip: add a learned linear term `x @ w_skip` (w_skip (d_in,
      d_out), zero at init) to the reconstruction: Gemma Scope 2's affine
      transcoders (`affine_skip_connection`). `decode` alone leaves it out
      (it has no x); `__call__` adds it.
    dense_rank: k > 0 adds the rank-k linear path `(x @ w_dense_in) @
      w_dense_out` (w_dense_in (d_in, k) unit-norm He-uniform columns,
      w_dense_out (k, d_out) zero at init) to the reconstruction: a dense
      subspace (the residual stream's massive coordinates) that the
      latents then need not carry by firing on almost every token. Like the
      affine skip it reads x as given (no b_dec subtracted) and `__call__`
      adds it; `fold_for_inference` exports it as k antipodal latent pairs
      with threshold 0, so the exported dictionary is a plain one.
    dtype: compute dtype of the two matmuls' inputs; they accumulate in fp32
      and parameters are always stored in fp32.
  """
  d_in: int
  d_sae: int
  d_out: int | None = None
  pre_enc_bias: bool = True
  affine_skip: bool = False
  dense_rank: int = 0
  dtype: Any = jnp.float32

  # Whether the training loop should keep decoder rows at unit norm (and
  # project their gradients); the L1 SAE leaves norms free instead.
  unit_decoder: ClassVar[bool] = True

  @property
  def out_dim(self) -> int:
    return self.d_in if self.d_out is None else self.d_out

  @property
  def in_shape(self) -> tuple[int, ...]:
    """Trailing shape of one input token (what `init_params` feeds)."""
    return (self.d_in,)

  def setup(self):
    if self.pre_enc_bias and self.out_dim != self.d_in:
      raise ValueError(f"pre_enc_bias needs d_out == d_in, got d_out="
                       f"{self.out_dim}, d_in={self.d_in}")
    self.w_dec = param(self, "w_dec", _unit_rows_init,
                       (self.d_sae, self.out_dim))
    if self.out_dim == self.d_in:
      # Tied at init only (W_enc = W_dec^T); trained independently.
      w_dec = self.w_dec
      self.w_enc = param(self, "w_enc", lambda *_: w_dec.T,
                         (self.d_in, self.d_sae))
    else:
      # No transpose to tie to: unit-norm He-uniform columns instead.
      self.w_enc = param(self, "w_enc", _unit_columns_init,
                         (self.d_in, self.d_sae))
    self.b_enc = param(self, "b_enc", nn.initializers.zeros_init(),
                       (self.d_sae,))
    self.b_dec = param(self, "b_dec", nn.initializers.zeros_init(),
                       (self.out_dim,))
    if self.affine_skip:
      self.w_skip = param(self, "w_skip", nn.initializers.zeros_init(),
                          (self.d_in, self.out_dim))
    if self.dense_rank:
      self.w_dense_in = param(self, "w_dense_in", _unit_columns_init,
                              (self.d_in, self.dense_rank))
      self.w_dense_out = param(self, "w_dense_out",
                               nn.initializers.zeros_init(),
                               (self.dense_rank, self.out_dim))

  def pre_acts(self, x: jax.Array) -> jax.Array:
    """(..., d_in) -> (..., d_sae) fp32: (x - b_dec) @ w_enc + b_enc."""
    if self.pre_enc_bias:
      x = x.astype(jnp.float32) - self.b_dec
    return jnp.einsum("...d,dl->...l", x.astype(self.dtype),
                      self.w_enc.astype(self.dtype),
                      preferred_element_type=jnp.float32) + self.b_enc

  def activate(self, pre: jax.Array) -> jax.Array:
    """(..., d_sae) pre-activations -> fp32 latents. Per architecture."""
    raise NotImplementedError

  def penalty(self, out: DictOutput, sparsity_coeff
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(coeff * sparsity penalty, extra metrics). Per architecture."""
    raise NotImplementedError

  def encode(self, x: jax.Array) -> jax.Array:
    return self.activate(self.pre_acts(x))

  def decode(self, latents: jax.Array, indices: jax.Array | None = None
             ) -> jax.Array:
    """Latents -> reconstruction (..., d_out) in the compute dtype.

    Args:
      latents: dense (..., d_sae) code, or with `indices` the (..., k) values
        of the only nonzero latents.
      indices: optional (..., k) latent ids of `latents`: the form a
        sparsity-aware decoder will take. Here it is a plain gather, which
        materialises (..., k, d_out) rows; a fused kernel would not.
    """
    w_dec = self.w_dec.astype(self.dtype)
    if indices is None:
      recon = jnp.einsum("...l,ld->...d", latents.astype(self.dtype), w_dec,
                         preferred_element_type=jnp.float32)
    else:
      recon = jnp.einsum("...k,...kd->...d", latents.astype(self.dtype),
                         w_dec[indices], preferred_element_type=jnp.float32)
    return (recon + self.b_dec).astype(self.dtype)

  def skip(self, x: jax.Array) -> jax.Array:
    """(..., d_in) -> (..., d_out) fp32 affine skip term `x @ w_skip`."""
    return jnp.einsum("...d,de->...e", x.astype(self.dtype),
                      self.w_skip.astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def dense(self, x: jax.Array) -> jax.Array:
    """(..., d_in) -> (..., d_out) fp32 dense path `(x @ w_dense_in) @
    w_dense_out`."""
    h = jnp.einsum("...d,dk->...k", x.astype(self.dtype),
                   self.w_dense_in.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return jnp.einsum("...k,ke->...e", h.astype(self.dtype),
                      self.w_dense_out.astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, x: jax.Array) -> DictOutput:
    pre = self.pre_acts(x)
    latents = self.activate(pre)
    recon = self.decode(latents)
    if self.affine_skip:
      recon = (recon.astype(jnp.float32) + self.skip(x)).astype(self.dtype)
    if self.dense_rank:
      recon = (recon.astype(jnp.float32) + self.dense(x)).astype(self.dtype)
    return DictOutput(latents=latents, recon=recon, pre_acts=pre)

  def loss(self, x: jax.Array, out: DictOutput, *, sparsity_coeff,
           target: jax.Array | None = None) -> LossOutput:
    """Reconstruction + sparsity loss of one batch.

    Args:
      x: the input batch (normalised as in training).
      out: `self(x)` computed with the same parameters (so gradients flow).
      sparsity_coeff: penalty weight, already warmed up by the caller.
      target: what to reconstruct; None means x (a transcoder passes its
        output-site activations).
    """
    target = x if target is None else target
    mse = mse_loss(target, out.recon)
    sparsity, aux = self.penalty(out, sparsity_coeff)
    aux = {"fvu": fvu(target, out.recon), **aux}
    return LossOutput(total=mse + sparsity, mse=mse, sparsity=sparsity,
                      aux=aux)


def compute_loss(module: nn.Module, params: Params, x: jax.Array, *,
                 sparsity_coeff, target: jax.Array | None = None
                 ) -> tuple[LossOutput, DictOutput]:
  """Forward pass and loss in one call, differentiable in `params`.

  What a training step wraps in `jax.value_and_grad(..., has_aux=True)`:
  `lambda p: (lambda l, o: (l.total, (l, o)))(*compute_loss(module, p, x,
  sparsity_coeff=c))`.
  """
  variables = {"params": params}
  out = module.apply(variables, x)
  loss = module.apply(variables, x, out, sparsity_coeff=sparsity_coeff,
                      target=target, method="loss")
  return loss, out


def init_params(module: Dictionary, key: jax.Array, *,
                b_dec: jax.Array | None = None) -> Params:
  """Initial parameters (boxed with logical axis names), optionally b_dec.

  Args:
    module: any dictionary module (or the Matryoshka wrapper).
    key: PRNG key.
    b_dec: e.g. the (normalised) data mean; starting there matters where
      activations have a large constant offset (as Gemma's residual stream
      does).
  """
  in_shape = getattr(module, "in_shape", (module.d_in,))
  x = jnp.zeros((1, *in_shape), jnp.float32)
  params = module.init(key, x)["params"]
  if b_dec is not None:
    params = _replace(
        params, "b_dec",
        lambda old: jnp.asarray(b_dec, old.dtype).reshape(old.shape))
  return params


def leaf_value(leaf):
  """The array of a parameter leaf, boxed (`nn.LogicallyPartitioned`) or not."""
  return leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def _replace(params: Params, name: str, fn: Callable) -> Params:
  """params with params[name] replaced by fn(value), keeping any box."""
  leaf = params[name]
  if isinstance(leaf, nn.meta.AxisMetadata):
    new = leaf.replace_boxed(fn(leaf.unbox()))
  else:
    new = fn(leaf)
  return {**params, name: new}


def decoder_row_axes(ndim: int) -> tuple[int, ...]:
  """Axes of w_dec that form one latent's decoder "row", by w_dec's rank.

  (d_sae, d_out) SAE/transcoder: (-1,). (d_sae, n_layers, d) crosscoder and
  (n_layers_src, d_sae, n_layers_out, d) cross-layer transcoder: (-2, -1),
  i.e. a latent's writes to all output layers together have unit norm (as in
  Anthropic's crosscoders and CLTs); a latent may then write mostly to one
  layer, which a per-layer unit norm would forbid.
  """
  if ndim == 2:
    return (-1,)
  if ndim in (3, 4):
    return (-2, -1)
  raise ValueError(f"w_dec of rank {ndim}: expected 2, 3 or 4")


def _unit_rows(w: jax.Array) -> jax.Array:
  # A zero row stays zero instead of turning into NaN.
  norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=decoder_row_axes(w.ndim),
                          keepdims=True))
  return w / jnp.maximum(norm, jnp.finfo(w.dtype).tiny)


def normalize_decoder(params: Params) -> Params:
  """params with every latent's decoder row (all output layers jointly, see
  `decoder_row_axes`) scaled to unit norm (after each step)."""
  return _replace(params, "w_dec", _unit_rows)


def project_decoder_grads(params: Params, grads: Params) -> Params:
  """grads with each w_dec row's component parallel to that row removed.

  With unit-norm rows enforced after the step, the parallel component only
  fights the renormalisation; the optimiser should never see it.
  """
  unit = _unit_rows(leaf_value(params["w_dec"]))
  axes = decoder_row_axes(unit.ndim)
  def project(g):
    return g - jnp.sum(g * unit, axis=axes, keepdims=True) * unit
  return _replace(grads, "w_dec", project)


def unwrapped(module: nn.Module) -> nn.Module:
  """The dictionary a wrapper holds (a `Matryoshka`'s `dictionary`), whose
  parameters and attributes are the trained ones; else `module` itself."""
  return getattr(module, "dictionary", module)


def constrain(module: nn.Module, params: Params, *, unit_decoder: bool
              ) -> Params:
  """params with the dictionary's invariants restored after an update.

  A module with a `masks()` method (causal crosscoders, cross-layer
  transcoders) has its masked w_enc/w_dec blocks set back to exactly zero
  (their gradients are already zero, but an optimiser with weight decay or
  a stateful transform could otherwise move them); then, with
  `unit_decoder`, decoder rows go back to unit norm (after the masks, so
  rows are unit over their allowed blocks); a JumpReLU threshold is kept
  >= 0.
  """
  inner = unwrapped(module)
  masks = getattr(inner, "masks", None)
  if masks is not None:
    for name, mask in masks().items():
      if mask is not None:
        params = _replace(params, name,
                          lambda w, m=mask: w * jnp.asarray(m, w.dtype))
  if unit_decoder:
    params = normalize_decoder(params)
  if "threshold" in params:
    params = _replace(params, "threshold", lambda t: jnp.maximum(t, 0.0))
  return params


def has_unit_decoder(module: nn.Module, unit_decoder: bool | None = None
                     ) -> bool:
  """Whether `module`'s decoder rows are kept at unit norm: its class says
  so and `unit_decoder` (None: follow the class) does not turn it off."""
  inner = unwrapped(module)
  unit = type(inner).unit_decoder
  return unit and (unit_decoder is None or unit_decoder)


def fold_for_inference(params: Params, norm_scale, *, threshold,
                       pre_enc_bias: bool, out_norm_scale=None
                       ) -> dict[str, jax.Array]:
  """Gemma Scope 2 arrays for raw (un-normalised) activations.

  Training saw x / norm_scale and reconstructed target / out_norm_scale. The
  result satisfies the Gemma Scope 2 formulas `pre = x_raw @ w_enc + b_enc`,
  `f = relu(pre) * (pre > threshold)`, `recon_raw = f @ w_dec + b_dec`, with
  f = out_norm_scale * (training latents), so w_dec keeps the trained (unit)
  rows and thresholds come out in raw units.

  Args:
    params: trained parameters (boxed or not).
    norm_scale: the scalar the inputs were divided by.
    threshold: (d_sae,) training-unit threshold (or a scalar broadcast).
    pre_enc_bias: whether training subtracted b_dec before the encoder.
    out_norm_scale: the target's scalar if it differs (transcoders); None
      means norm_scale.

  An affine transcoder's `w_skip` comes out as `affine_skip_connection`
  (d_in, d_out) = w_skip * out_norm_scale / norm_scale, so that
  `recon_raw = f @ w_dec + b_dec + x_raw @ affine_skip_connection`.
  A dense path (`Dictionary.dense_rank` k) comes out as 2k more latents
  after the trained ones (`_with_dense_pairs`).
  """
  p = {k: jnp.asarray(leaf_value(v), jnp.float32) for k, v in params.items()}
  s_in = jnp.asarray(norm_scale, jnp.float32)
  s_out = s_in if out_norm_scale is None else jnp.asarray(out_norm_scale,
                                                          jnp.float32)
  b_enc = p["b_enc"]
  if pre_enc_bias:
    b_enc = b_enc - p["b_dec"] @ p["w_enc"]
  threshold = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32),
                               b_enc.shape)
  arrays = {
      "w_enc": p["w_enc"] * (s_out / s_in),
      "b_enc": b_enc * s_out,
      "w_dec": p["w_dec"],
      "b_dec": p["b_dec"] * s_out,
      "threshold": threshold * s_out,
  }
  if "w_skip" in p:
    arrays["affine_skip_connection"] = p["w_skip"] * (s_out / s_in)
  if "w_dense_in" in p:
    arrays = _with_dense_pairs(arrays, p["w_dense_in"], p["w_dense_out"],
                               s_out / s_in)
  return arrays


def _with_dense_pairs(arrays: dict[str, jax.Array], w_in: jax.Array,
                      w_out: jax.Array, scale) -> dict[str, jax.Array]:
  """`arrays` with a dense path appended as 2k latents (k its rank).

  Raw units: x_raw @ (w_in @ w_out) * scale = sum_j (x_raw . u_j) v_j with
  v_j = w_out[j] / |w_out[j]| (a unit decoder row) and u_j = w_in[:, j] *
  |w_out[j]| * scale. Since relu(z) - relu(-z) = z, the pair (encoder u_j,
  decoder v_j) and (-u_j, -v_j), with b_enc 0 and threshold 0 (where
  JumpReLU is relu), adds exactly that term: latents d_sae + 2j and
  d_sae + 2j + 1. A direction whose w_out row is zero gets zero columns
  and rows (it never fires).
  """
  norms = jnp.linalg.norm(w_out, axis=-1)
  v = w_out / jnp.where(norms > 0, norms, 1.0)[:, None]
  u = w_in * (norms * scale)[None, :]
  k = norms.shape[0]
  # Interleave (+u_0, -u_0, +u_1, ...): column 2j is +, 2j + 1 is -.
  enc = jnp.stack([u, -u], axis=-1).reshape(u.shape[0], 2 * k)
  dec = jnp.stack([v, -v], axis=1).reshape(2 * k, v.shape[-1])
  zeros = jnp.zeros((2 * k,), jnp.float32)
  return {**arrays,
          "w_enc": jnp.concatenate([arrays["w_enc"], enc], axis=1),
          "w_dec": jnp.concatenate([arrays["w_dec"], dec], axis=0),
          "b_enc": jnp.concatenate([arrays["b_enc"], zeros]),
          "threshold": jnp.concatenate([arrays["threshold"], zeros])}
