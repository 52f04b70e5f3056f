"""A cross-layer transcoder started from trained single-layer transcoders.

Gemma Scope 2 initialises its multi-layer dictionaries from single-layer
ones, "their Matryoshka prefixes, duplicates removed". With
`dictionary.init_from` naming one trained JumpReLU transcoder per CLT layer
(a workdir, an export folder, or a release name), layer n of a fresh CLT
takes transcoder n's first `init_prefix` latents, drops near-duplicates
among them (`duplicates`), and puts the k it keeps in its first k slots:

  encoder column, b_enc, threshold   the transcoder's
  decoder block to layer n           the transcoder's decoder row
  decoder blocks to later layers     0
  b_dec[n]                           the transcoder's b_dec

so that those latents and b_dec predict each layer's mlp_out from its own
mlp_in as the transcoder does. Slots past k keep the CLT's own init.

Units. A transcoder's export is in raw units (`fold_for_inference`: pre =
x_raw @ W_e + b_e, f = relu(pre) [pre > th], y_raw = f @ W_d + b_d); the CLT
trains on x_raw / s_in[n] and y_raw / s_out[n], its per-layer scales from
the first bucket (`state.init_args`). Taking each CLT latent as the
transcoder's divided by g = s_out[n] / |W_d row| gives

  w_enc = W_e s_in / g    b_enc = b_e / g    threshold = max(th, 0) / g
  w_dec[n, :, n] = W_d g / s_out  (unit rows, as the CLT keeps them)
  b_dec[n] = b_d / s_out

and pre_clt = pre / g (g > 0, so the same latents fire), f_clt = f / g,
y_raw = s_out (f_clt w_dec + b_dec) = f W_d + b_d. (A negative threshold
becomes 0: under the exported relu the two fire on the same positive
pre-activations.)

Caveat: the fresh latents in the slots past k fire at step 0 as any fresh
latents do and add their random writes, so the CLT equals its transcoders
at step 0 only when it is no wider than the latents it keeps. The
duplicate search compares every pair of taken latents (in blocks, two
(taken x taken) products per layer): seconds for 16k latents of width 640.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import numpy as np

from gemscope_jax import errors, interop, models
from gemscope_jax.parallel import distributed
from gemscope_jax.training import export as export_lib
from gemscope_jax.training import members

FIELD = members.INIT_FROM_FIELD


def _folder(path: str, layer: int) -> pathlib.Path:
  """Where a source's transcoder for `layer` is: a group run's member
  folder, a run's export, or the path itself."""
  p = pathlib.Path(path)
  for candidate in (p / "export" / "transcoder" / f"layer_{layer}",
                    p / "transcoder" / f"layer_{layer}", p / "export"):
    if candidate.is_dir():
      return candidate
  return p


def _weights_file(folder: pathlib.Path) -> pathlib.Path:
  for name in ("params.safetensors", "sae_weights.safetensors"):
    if (folder / name).exists():
      return folder / name
  return folder


def load(dictionary) -> list:
  """The transcoders `dictionary` (a `plans.DictionaryPlan` of a CLT with
  `init_from`) starts from, checked, as raw-unit `InferenceDictionary`s.

  Raises:
    errors.MissingInputError: a source that does not exist.
    errors.InputError: a source that is no JumpReLU transcoder of that
      layer's mlp_in -> mlp_out with d_model-wide activations, or has fewer
      latents than `init_prefix`; each names the field and the file.
    ValueError: `init_prefix` (or a transcoder's width) above the CLT's.
  """
  lay = dictionary.layout
  d_model, width = dictionary.config.d_in, dictionary.config.d_sae
  prefix = dictionary.init_prefix
  out = []
  for i, (path, hp_in, hp_out) in enumerate(zip(
      dictionary.init_from, lay.inputs, lay.targets)):
    layer = models.hooks.parse(hp_in).layer
    field = f"{FIELD}[{i}] (CLT layer {layer})"
    folder = _folder(path, layer)
    try:
      if (folder / "checkpoints").is_dir():  # a workdir not yet exported
        t = export_lib.from_workdir(folder)
      else:
        t = interop.load_dictionary(folder)
    except FileNotFoundError as e:
      raise errors.MissingInputError(f"{field}: {e}") from None
    except ValueError as e:
      raise errors.InputError(f"{field}: {e}") from None
    file = _weights_file(folder)

    def bad(message, file=file, field=field):
      return errors.InputError(f"{field}: {file}: {message}")
    if not isinstance(t, interop.InferenceDictionary):
      raise bad(f"a {t.kind} over {t.n_layers} layers, not a single-layer "
                "transcoder")
    if t.architecture != "jumprelu":
      raise bad(f"a {t.architecture} dictionary; a JumpReLU CLT starts "
                "from JumpReLU transcoders (thresholds)")
    if t.affine_skip is not None:
      raise bad("has an affine skip connection, which a CLT has no place "
                "for")
    if t.d_in != d_model or t.d_out != d_model:
      raise bad(f"w_enc has shape {t.w_enc.shape} and w_dec "
                f"{t.w_dec.shape}, expected ({d_model}, d_sae) and (d_sae, "
                f"{d_model}) (the CLT's mlp_in and mlp_out are {d_model} "
                "wide)")
    for what, got, want in (("reads", t.hookpoint, hp_in),
                            ("writes", t.hookpoint_out, hp_out)):
      if got is not None and got != want:
        raise bad(f"{what} {got}, but CLT layer {layer} {what} {want}")
    taken = t.d_sae if prefix is None else prefix
    if taken > t.d_sae:
      raise errors.InputError(
          f"config.dictionary.init_prefix: {prefix} latents, but {file} "
          f"({field}) has {t.d_sae}")
    if taken > width:
      raise ValueError(
          f"config.dictionary.init_prefix: {field}: {file} has {t.d_sae} "
          f"latents, more than dictionary.width={width}: set "
          f"dictionary.init_prefix to at most {width}")
    out.append(t.folded())
  return out


def duplicates(w_enc: np.ndarray, w_dec: np.ndarray, cosine: float,
               block: int = 2048) -> np.ndarray:
  """(m,) bool: which latents duplicate an earlier kept one.

  Latent j is dropped when some earlier latent i that is itself kept has
  both decoder-row cosine and encoder-column cosine with j above `cosine`
  (greedy in latent order, so the first of a group of near-copies stays:
  the one nearest the front of a Matryoshka ordering).

  Args:
    w_enc: (d_in, m) encoder columns.
    w_dec: (m, d_out) decoder rows.
    cosine: the threshold; >= 1 drops nothing.
    block: rows of the cosine matrices computed at once.
  """
  m = w_dec.shape[0]
  dropped = np.zeros(m, bool)
  if cosine >= 1 or m < 2:
    return dropped

  def unit(rows):
    rows = np.asarray(rows, np.float32)
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norm, np.finfo(np.float32).tiny)
  dec, enc = unit(w_dec), unit(np.asarray(w_enc).T)
  earlier: dict[int, list[int]] = {}
  for start in range(0, m, block):
    stop = min(start + block, m)
    near = ((dec[start:stop] @ dec[:stop].T > cosine)
            & (enc[start:stop] @ enc[:stop].T > cosine))
    for j, i in zip(*np.nonzero(near)):
      if i < start + j:
        earlier.setdefault(start + int(j), []).append(int(i))
  for j in sorted(earlier):
    dropped[j] = any(not dropped[i] for i in earlier[j])
  return dropped


def clt_params(params: dict[str, np.ndarray], transcoders: Sequence,
               norm_scale, target_scale, *, prefix: int | None = None,
               cosine: float = 0.95, sources: Sequence[str] = ()
               ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
  """A fresh CLT's parameters with each layer's first latents taken from
  its transcoder (see the module docstring for the formulas).

  Args:
    params: the fresh CLT's unboxed parameters (w_enc (n, d, s), w_dec (n,
      s, n, d), b_enc and threshold (n, s), b_dec (n, d)).
    transcoders: n raw-unit JumpReLU `InferenceDictionary`s, layer order.
    norm_scale, target_scale: (n,) the CLT's per-layer input and target
      scales.
    prefix: latents taken from each transcoder (None: all).
    cosine: the duplicate threshold (`duplicates`).
    sources: each transcoder's path, for the report.

  Returns:
    (new parameters as float32 numpy, one report per layer: 'taken',
    'duplicates' (how many dropped), 'kept', 'fresh' (slots left to the
    CLT's init), 'dropped_ids' (in the transcoder's numbering), 'source').
  """
  p = {k: np.array(v, np.float32) for k, v in params.items()}
  s_in = np.broadcast_to(np.asarray(norm_scale, np.float64),
                         (len(transcoders),))
  s_out = np.broadcast_to(np.asarray(target_scale, np.float64),
                          (len(transcoders),))
  width = p["b_enc"].shape[1]
  report = []
  for n, t in enumerate(transcoders):
    m = t.d_sae if prefix is None else prefix
    w_e, w_d = t.w_enc[:, :m], t.w_dec[:m]
    dropped = duplicates(w_e, w_d, cosine)
    keep = np.flatnonzero(~dropped)
    k = len(keep)
    row_norm = np.linalg.norm(w_d[keep].astype(np.float64), axis=1)
    g = s_out[n] / np.where(row_norm > 0, row_norm, 1.0)
    p["w_enc"][n, :, :k] = t.w_enc[:, keep] * (s_in[n] / g)
    p["b_enc"][n, :k] = t.b_enc[keep] / g
    p["threshold"][n, :k] = np.maximum(t.threshold[keep], 0.0) / g
    p["w_dec"][n, :k] = 0.0
    p["w_dec"][n, :k, n] = t.w_dec[keep] * (g / s_out[n])[:, None]
    p["b_dec"][n] = t.b_dec / s_out[n]
    report.append({"source": sources[n] if sources else None, "taken": m,
                   "duplicates": int(dropped.sum()), "kept": k,
                   "fresh": width - k,
                   "dropped_ids": np.flatnonzero(dropped).tolist()})
  return p, report


def apply(run, state, transcoders: Sequence) -> tuple[Any, list[dict]]:
  """`state` (a fresh CLT's, from `run.initial_state`) with its parameters
  started from `transcoders` (`load`'s result), placed as the run's state
  sharding; and the per-layer report (`clt_params`), layers named."""
  d = run.dictionary
  host = distributed.host_tree({"params": state.params,
                                "norm_scale": state.norm_scale,
                                "target_scale": state.target_scale})
  new, report = clt_params(host["params"], transcoders, host["norm_scale"],
                           host["target_scale"], prefix=d.init_prefix,
                           cosine=d.init_dedup_cosine, sources=d.init_from)
  shardings = run.state_sharding.params
  params = {k: jax.make_array_from_callback(
      v.shape, shardings[k], lambda idx, v=v: v[idx]) for k, v in new.items()}
  for r, hp in zip(report, d.layout.inputs):
    r["layer"] = models.hooks.parse(hp).layer
  return state.replace(params=params), report
