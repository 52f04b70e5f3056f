"""Putting trained dictionaries into Gemma's forward pass.

A `Member` is one trained dictionary with what it reads and predicts (a
`dictionaries.Layout`), its parameters and its normalisation scales. For each
hookpoint a member predicts, `member_edits` gives a static edit for
`models.forward` and `member_args` its traced arguments: (B, T) masks of
the positions to replace by the dictionary's prediction (`splice`) or by
zeros (`zero`); other positions keep the model's own value. Clean, spliced
and zeroed passes all run the same program with different masks, so they
share one compilation and the same rounding.

Where the prediction comes from:
- in the pass (`mode == 'in_pass'`): an SAE reconstructs the value at its
  own hookpoint; a transcoder reads its input hookpoint (e.g. mlp_in) as
  the pass computed it and replaces its target (mlp_out); a JumpReLU
  cross-layer transcoder replacing mlp_out of layer o reads mlp_in of every
  layer n <= o of the same pass. With several members spliced at once this
  is the replacement model: each dictionary reads the stream the earlier
  replacements produced.
- from the clean pass (`mode == 'clean'`): an acausal crosscoder needs
  later layers to reconstruct earlier ones, and a TopK CLT selects over all
  layers, so their prediction is computed from the clean pass's inputs
  (`predict`) and passed in `member_args(..., recon=)`.
`splice_edit` / `edit_args` are the same splice for one SAE without a
`Member` (an edit keyed by the module alone).

Caveat: a CLT edit recomputes the encoders of layers <= o at each layer o
(XLA merges the identical ones it finds); a clean-mode member costs one
extra pass (the clean one) before it can be spliced.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemscope_jax import dictionaries
from gemscope_jax import models


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
  """One dictionary to splice or evaluate.

  Attributes:
    name: how metrics name it (e.g. 'layer_6/resid_post').
    layout: a `dictionaries.Layout` (kind, inputs, targets).
    module: the training module.
    params: its parameters (unboxed), trained on normalised activations.
    norm_scale: () or (n_layers,) the inputs were divided by.
    target_scale: () or (n_layers,) the targets were divided by.
  """
  name: str
  layout: dictionaries.Layout
  module: nn.Module
  params: Any
  norm_scale: Any
  target_scale: Any

  def __post_init__(self):
    object.__setattr__(self, "params", nn.meta.unbox(self.params))
    for field in ("norm_scale", "target_scale"):
      object.__setattr__(self, field,
                         jnp.asarray(getattr(self, field), jnp.float32))

  @property
  def mode(self) -> str:
    """'in_pass' or 'clean' (see the module docstring)."""
    inner = dictionaries.unwrapped(self.module)
    if self.layout.kind == "crosscoder" or (
        self.layout.kind == "clt" and inner.activation != "jumprelu"):
      return "clean"
    return "in_pass"


def _per_layer(scale: jax.Array, multilayer: bool) -> jax.Array:
  return scale[:, None] if multilayer else scale


def _predict(module, params, norm_scale, target_scale, x, *, multilayer):
  x = x.astype(jnp.float32) / _per_layer(norm_scale, multilayer)
  out = module.apply({"params": params}, x)
  recon = out.recon.astype(jnp.float32) * _per_layer(target_scale,
                                                     multilayer)
  return recon, out.latents


# Jitted for use outside a pass; edits trace `_predict` inline, so XLA sees
# one program and rounds a bf16 model's activations the same in every pass.
predict = jax.jit(_predict, static_argnames=("module", "multilayer"))
predict.__doc__ = """(prediction, latents) of raw inputs x: (..., d) or
(..., n, d) -> raw-unit prediction of the targets, fp32."""


def _place(x, args, recon):
  """x with `splice` positions replaced by recon and `zero` ones by 0."""
  recon = recon.astype(x.dtype)
  x = jnp.where(args["zero"][..., None], jnp.zeros_like(x), x)
  return jnp.where(args["splice"][..., None], recon, x)


def _own_edit(module, x, args):
  """SAE: the reconstruction of the value at the edited hookpoint."""
  # One scale in and out: XLA then rounds a bf16 model's spliced and clean
  # passes alike (an exact dictionary gives exactly the clean loss).
  s = args["norm_scale"]
  recon, _ = _predict(module, args["params"], s, s, x, multilayer=False)
  return _place(x, args, recon)


def _read_edit(module, source, x, args, seen):
  """Transcoder: the prediction from `source`, read in the same pass."""
  recon, _ = _predict(module, args["params"], args["norm_scale"],
                      args["target_scale"], seen[source], multilayer=False)
  return _place(x, args, recon)


def _clt_edit(out_layer, sources, x, args, seen):
  """JumpReLU CLT at output layer `out_layer`: latents of each layer n <=
  out_layer from its mlp_in in this pass, decoded into out_layer."""
  p = args["params"]
  s_in, s_out = args["norm_scale"], args["target_scale"]
  recon = p["b_dec"][out_layer]
  for n, source in enumerate(sources):
    xn = seen[source].astype(jnp.float32) / s_in[n]
    pre = xn @ p["w_enc"][n] + p["b_enc"][n]
    f = pre * (pre > p["threshold"][n]).astype(pre.dtype)
    recon = recon + f @ p["w_dec"][n, :, out_layer]
  return _place(x, args, recon * s_out[out_layer])


def _given_edit(x, args):
  """Clean mode: the prediction passed in `args['recon']`."""
  return _place(x, args, args["recon"])


@functools.lru_cache(maxsize=256)
def _edit_for(module, kind: str, mode: str, index: int,
              inputs: tuple[str, ...]):
  # Cached so that equal requests return the same (hashable) objects and
  # `models.forward` reuses its compiled program.
  if mode == "clean":
    return _given_edit
  if kind == "sae":
    return functools.partial(_own_edit, module)
  if kind == "transcoder":
    return models.ReadingEdit(functools.partial(_read_edit, module,
                                                inputs[0]), (inputs[0],))
  sources = inputs[:index + 1]
  return models.ReadingEdit(functools.partial(_clt_edit, index, sources),
                            sources)


def splice_edit(module: nn.Module) -> models.EditFn:
  """The `EditFn` that splices SAE `module` at its own hookpoint.

  Its arguments are `edit_args(...)` (`member_edits` does the same for any
  dictionary). Cached per (hashable, field-equal) module, so evaluating
  same-shaped dictionaries again reuses the compiled forward pass.

  Args:
    module: the SAE module (it reconstructs its own input).

  Returns:
    The edit for `models.forward(edits={hookpoint: ...})`.
  """
  return _edit_for(module, "sae", "in_pass", 0, ())


def edit_args(params, norm_scale, *, splice: jax.Array, zero: jax.Array
              ) -> dict[str, Any]:
  """Arguments of `splice_edit(module)`.

  Args:
    params: the SAE's parameters (boxed or not).
    norm_scale: the scalar its inputs were divided by in training (the
      reconstruction is multiplied back by it).
    splice: (B, T) bool mask of the positions to reconstruct.
    zero: (B, T) bool mask of the positions to zero (neither: left as they
      are).

  Returns:
    The edit's arguments for `models.forward(edit_args={hookpoint: ...})`.
  """
  s = jnp.asarray(norm_scale, jnp.float32)
  return {"params": nn.meta.unbox(params), "norm_scale": s,
          "target_scale": s, "splice": jnp.asarray(splice, bool),
          "zero": jnp.asarray(zero, bool)}


def member_edits(member: Member, mode: str | None = None) -> dict[str, Any]:
  """{target hookpoint: edit} for `models.forward(edits=...)`; `mode`
  'clean' forces predictions from the clean pass (default: member.mode)."""
  lay = member.layout
  mode = mode or member.mode
  return {t: _edit_for(member.module, lay.kind, mode, i, lay.inputs)
          for i, t in enumerate(lay.targets)}


def member_args(member: Member, *, splice, zero, recon=None,
                mode: str | None = None) -> dict[str, Any]:
  """{target hookpoint: args} for `models.forward(edit_args=...)`.

  Args:
    member: the dictionary.
    splice, zero: (B, T) bool masks applied at every target of the member.
    recon: clean mode only: the raw prediction, (B, T, d) or (B, T, n, d)
      (`predict` on the clean pass's inputs); None means zeros.
    mode: as `member_edits`.
  """
  splice = jnp.asarray(splice, bool)
  zero = jnp.asarray(zero, bool)
  lay = member.layout
  out = {}
  for i, t in enumerate(lay.targets):
    if (mode or member.mode) == "clean":
      if recon is None:
        r = jnp.zeros((*splice.shape, _width(member)), jnp.float32)
      else:
        r = recon[..., i, :] if lay.multilayer else recon
      out[t] = {"recon": r, "splice": splice, "zero": zero}
    else:
      out[t] = {"params": member.params, "norm_scale": member.norm_scale,
                "target_scale": member.target_scale, "splice": splice,
                "zero": zero}
  return out


def _width(member: Member) -> int:
  w_dec = member.params["w_dec"]
  return int(np.shape(w_dec)[-1])


def stacked_inputs(member: Member, activations: dict[str, jax.Array]):
  """The member's inputs and targets from recorded activations: (B, T, d)
  each, or (B, T, n, d) stacked for multi-layer layouts."""
  lay = member.layout
  def gather(names):
    if not lay.multilayer:
      return activations[names[0]]
    return jnp.stack([activations[h] for h in names], axis=-2)
  return gather(lay.inputs), gather(lay.targets)
