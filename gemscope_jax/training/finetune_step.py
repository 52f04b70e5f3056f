"""The step of end-to-end (KL) fine-tuning: pure losses and one jitted update.

Gemma Scope 2 fine-tunes some dictionaries end to end with

  loss = (MSE + alpha * beta * KL) / (1 + beta) + sparsity,
  alpha = MSE / (KL + 1e-8), held constant (`jax.lax.stop_gradient`),

where MSE is the dictionary's usual reconstruction error (training units),
KL = KL(clean next-token distribution || the one with the reconstruction
spliced in at the dictionary's hookpoint), averaged over the ordinary
tokens of the batch, and sparsity is the dictionary's own penalty (for
JumpReLU the quadratic L0 penalty towards its target, so L0 stays put).
alpha rescales the KL term to the MSE's size at every step, so beta is the
ratio of the two terms' weights whatever their units. Differentiating alpha
would cancel the KL term's gradient almost exactly (alpha * KL = MSE *
KL / (KL + 1e-8) ~ MSE), which is why it is held constant.

`FinetuneStep.step` runs Gemma twice on a batch of token windows: a clean
pass (logits, and the hookpoint's activations for the MSE) and a pass with
the dictionary spliced in (`surgery.splice`), whose logits are
differentiated back through the later layers into the dictionary's
parameters; Gemma's weights are inputs, never differentiated. The update
is the trainer's (`update.apply_update`: decoder-row gradients projected,
unit decoder rows and thresholds >= 0 after Adam). With beta = 0 the step
skips the spliced pass and the logits (an MSE-only control costs one pass
up to the hookpoint).

Caveat (memory): both passes hold (windows, seq_len, vocab) float32 logits,
about 134 MB per window of 128 tokens for Gemma 3's 262k vocabulary, and
the spliced pass's backward holds as much again.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gemscope_jax import dictionaries, models
from gemscope_jax.surgery import splice as splice_lib
from gemscope_jax.training.state import TrainState
from gemscope_jax.training.update import apply_update

# Gemma Scope 2's guard against a zero KL in alpha = MSE / (KL + eps).
KL_EPS = 1e-8


def kl_divergence(clean_logits: jax.Array, spliced_logits: jax.Array,
                  mask: jax.Array) -> jax.Array:
  """KL(softmax(clean) || softmax(spliced)) in nats, averaged over `mask`.

  Args:
    clean_logits: (..., V) logits of the unmodified model.
    spliced_logits: (..., V) logits with the dictionary spliced in.
    mask: (...) bool, the positions that count (ordinary tokens).

  Returns:
    The mean over the True positions of sum_v p_v (log p_v - log q_v);
    0 when none is True.
  """
  log_p = jax.nn.log_softmax(clean_logits.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(spliced_logits.astype(jnp.float32), axis=-1)
  per_position = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  w = mask.astype(jnp.float32)
  return jnp.sum(per_position * w) / jnp.maximum(jnp.sum(w), 1.0)


def combined_loss(mse: jax.Array, kl: jax.Array, sparsity: jax.Array,
                  beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Gemma Scope 2's fine-tuning loss and its parts.

  Args:
    mse: the dictionary's reconstruction error (training units).
    kl: the spliced model's KL from the clean one (`kl_divergence`).
    sparsity: the dictionary's penalty, already times its coefficient.
    beta: the KL term's weight relative to the MSE's.

  Returns:
    (total, metrics): total = (mse + alpha * beta * kl) / (1 + beta) +
    sparsity with alpha = mse / (kl + KL_EPS) outside the gradient;
    metrics 'mse', 'kl', 'alpha', 'recon_loss' (the first term) and
    'sparsity'.
  """
  alpha = jax.lax.stop_gradient(mse / (kl + KL_EPS))
  recon = (mse + alpha * beta * kl) / (1.0 + beta)
  return recon + sparsity, {"mse": mse, "kl": kl, "alpha": alpha,
                            "recon_loss": recon, "sparsity": sparsity}


def spliced_kl(members, gemma_params, batch, clean_logits, *, model_config,
               dtype: str) -> jax.Array:
  """The KL from the clean pass of a pass with `members` (`splice.Member`s)
  spliced in at every kept position of `batch`, each in its own mode."""
  keep = batch["keep"]
  zero = jnp.zeros_like(keep)
  edits, args = {}, {}
  for m in members:
    edits.update(splice_lib.member_edits(m))
    args.update(splice_lib.member_args(m, splice=keep, zero=zero))
  spliced = models.forward(
      gemma_params, batch["tokens"], batch["mask"], config=model_config,
      edits=edits, edit_args=args, logits=True, loss=False,
      dtype=jnp.dtype(dtype))
  return kl_divergence(clean_logits, spliced.logits, keep)


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What the compiled step depends on besides its array inputs.

  Attributes:
    hookpoint: where an SAE reads and is spliced (with no `layout`).
    beta: the KL term's weight (0: MSE and sparsity only, no spliced pass).
    sparsity_coeff: the sparsity penalty's coefficient (no warm-up: the
      dictionary is trained already).
    unit_decoder: keep decoder rows at unit norm (`update.apply_update`).
    dtype: Gemma's compute dtype name.
    layout: what the dictionary reads and predicts (`dictionaries.Layout`:
      an SAE, a transcoder, or a JumpReLU CLT spliced in the pass); None:
      an SAE at `hookpoint`.
  """
  hookpoint: str
  beta: float
  sparsity_coeff: float
  unit_decoder: bool = True
  dtype: str = "float32"
  layout: dictionaries.Layout | None = None

  @property
  def dictionary_layout(self) -> dictionaries.Layout:
    return self.layout or dictionaries.Layout("sae", (self.hookpoint,),
                                              (self.hookpoint,))


class FinetuneStep:
  """The jitted fine-tuning step of one dictionary: an SAE, a transcoder,
  or a JumpReLU CLT (`StepSettings.layout`).

  The spliced pass puts the dictionary in as `surgery.splice` does in its
  own mode: an SAE reconstructs its hookpoint, a transcoder replaces its
  mlp_out from the mlp_in its pass computed, and a CLT replaces every
  layer's mlp_out from the mlp_in of that layer and the earlier ones as
  its pass computed them (the replacement model: the KL's gradient
  reaches each layer's encoder through every later layer). The MSE is the
  dictionary's own on the clean pass's activations (summed over a CLT's
  layers, as it trains). Dictionaries spliced from the clean pass
  (crosscoders, TopK CLTs) are not taken.

  Attributes:
    module: the dictionary module (as trained: training units, b_dec
      subtracted before the encoder).
    tx: the optimiser (`optim.make_optimizer` of the fine-tuning schedule).
    model_config: Gemma's config.
    settings: a `StepSettings`.
    step: (state, gemma_params, batch) -> (state, metrics), two jitted
      programs (gradients, then the update, which donates the state);
      batch = {'tokens', 'mask', 'keep' (B, T), 'rows' (N,) int32 flat
      indices of the keep positions}.
    losses: jitted (params, norm_scale, gemma_params, batch[,
      target_scale]) -> metrics, the same losses without an update (to
      watch a fixed batch); target_scale defaults to norm_scale.
  """

  def __init__(self, module: nn.Module, tx: optax.GradientTransformation,
               model_config: models.Gemma3Config, settings: StepSettings):
    self.module = module
    self.tx = tx
    self.model_config = model_config
    self.settings = settings
    self.layout = settings.dictionary_layout
    if self.layout.kind not in ("sae", "transcoder", "clt") or (
        self._member(None, 1.0, 1.0).mode != "in_pass"):
      raise ValueError(
          f"fine-tuning splices a dictionary in the pass (an SAE, a "
          f"transcoder or a JumpReLU CLT); {self.layout.name} is a "
          f"{self.layout.kind} spliced from the clean pass")
    self._grads = jax.jit(self.grads_fn)
    self._update = jax.jit(self.update_fn, donate_argnums=0)
    self.losses = jax.jit(self.losses_fn)

  def _member(self, params, norm_scale, target_scale) -> splice_lib.Member:
    return splice_lib.Member(
        name=self.layout.name, layout=self.layout, module=self.module,
        params=params, norm_scale=norm_scale, target_scale=target_scale)

  def _clean(self, gemma_params, batch):
    """The clean pass: ({hookpoint: (B, T, d)}, logits or None)."""
    s = self.settings
    out = models.forward(gemma_params, batch["tokens"], batch["mask"],
                         config=self.model_config,
                         hookpoints=self.layout.hookpoints,
                         logits=s.beta > 0, loss=False,
                         dtype=jnp.dtype(s.dtype))
    return out.activations, out.logits

  def _rows(self, acts, batch, names, scale):
    """The kept rows of `names`' activations in training units: (N, d),
    or (N, n, d) for a multi-layer layout (scale (n,))."""
    rows = [acts[h].reshape(-1, acts[h].shape[-1])[batch["rows"]].astype(
        jnp.float32) for h in names]
    if self.layout.multilayer:
      return jnp.stack(rows, axis=1) / scale[:, None]
    return rows[0] / scale

  def _loss(self, params, norm_scale, target_scale, gemma_params, batch,
            acts, clean_logits):
    """(total, (metrics, dictionary output on the kept rows))."""
    s = self.settings
    lay = self.layout
    kw = {}
    if not lay.reconstructs_input:
      kw["target"] = self._rows(acts, batch, lay.targets, target_scale)
    lo, out = dictionaries.compute_loss(
        self.module, params, self._rows(acts, batch, lay.inputs, norm_scale),
        sparsity_coeff=s.sparsity_coeff, **kw)
    if s.beta > 0:
      kl = spliced_kl([self._member(params, norm_scale, target_scale)],
                      gemma_params, batch, clean_logits,
                      model_config=self.model_config, dtype=s.dtype)
      total, metrics = combined_loss(lo.mse, kl, lo.sparsity, s.beta)
    else:
      # No spliced pass, no KL: the dictionary's own loss.
      total, metrics = lo.total, {"mse": lo.mse, "recon_loss": lo.mse,
                                  "sparsity": lo.sparsity}
    metrics.update({k: v for k, v in lo.aux.items() if jnp.ndim(v) == 0})
    metrics["loss"] = total
    return total, (metrics, out)

  def losses_fn(self, params, norm_scale, gemma_params, batch,
                target_scale=None):
    """The step's losses and metrics at `params`, without an update."""
    acts, clean_logits = self._clean(gemma_params, batch)
    target_scale = norm_scale if target_scale is None else target_scale
    _, (metrics, _) = self._loss(params, norm_scale, target_scale,
                                 gemma_params, batch, acts, clean_logits)
    return metrics

  def grads_fn(self, state: TrainState, gemma_params, batch):
    """(metrics, latents fired in this batch, gradients) at the state."""
    acts, clean_logits = self._clean(gemma_params, batch)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (_, (metrics, out)), grads = grad_fn(state.params, state.norm_scale,
                                         state.target_scale, gemma_params,
                                         batch, acts, clean_logits)
    grad_norm = optax.global_norm(grads)
    metrics.update({
        "grad_norm": grad_norm,
        "finite": jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)})
    return metrics, jnp.any(out.latents > 0, axis=0), grads

  def update_fn(self, state: TrainState, grads, fired) -> TrainState:
    """The trainer's update of `state` by `grads`."""
    params, opt_state = apply_update(self.module, self.tx, state.params,
                                     state.opt_state, grads,
                                     unit_decoder=self.settings.unit_decoder)
    step = state.step + 1
    return state.replace(step=step, params=params, opt_state=opt_state,
                         last_fired=jnp.where(fired, step, state.last_fired))

  def step_fn(self, state: TrainState, gemma_params, batch):
    """One update, unjitted: `update_fn` after `grads_fn`."""
    metrics, fired, grads = self.grads_fn(state, gemma_params, batch)
    return self.update_fn(state, grads, fired), metrics

  def step(self, state: TrainState, gemma_params, batch):
    """One update as two jitted programs, the second donating the state.
    One program for both compiled to 20.7 GB of temporaries for an
    18-layer CLT of width 2048 (one window a step); apart, 5.3 GB (four
    windows) and 1.6 GB."""
    metrics, fired, grads = self._grads(state, gemma_params, batch)
    return self._update(state, grads, fired), metrics


@dataclasses.dataclass(frozen=True)
class GroupSettings:
  """`StepSettings` for a group.

  Attributes:
    beta, sparsity_coeff, unit_decoder, dtype: as `StepSettings`.
    alone: each member spliced alone into the clean model, one KL each,
      instead of every member at once (one KL of the replacement model).
  """
  beta: float
  sparsity_coeff: float
  unit_decoder: bool = True
  dtype: str = "float32"
  alone: bool = False


class GroupFinetuneStep:
  """The jitted fine-tuning step of a group (`group.GroupRun`): a
  transcoder per layer fine-tuned as one replacement model, or each on its
  own (`GroupSettings.alone`).

  The KL pass splices every member at once, each in its own mode
  (`splice.Member.mode`: a transcoder reads the `mlp_in` its pass computed,
  so each one reads what the earlier ones wrote): the gradient of the KL
  reaches every member through every later layer and every later member.
  The loss is `combined_loss` of the members' summed MSE and sparsity
  (each member's MSE on the clean pass's activations, in its own training
  units), which is the single-dictionary loss of each member with the
  shared KL term: sum_m (mse_m + alpha_m beta KL) / (1 + beta) with
  alpha_m = mse_m / KL. Each stack of same-shaped members updates as the
  trainer's stacks do (`update.apply_update` vmapped over the members).

  With `alone`, each member m is spliced alone into an otherwise clean
  pass (one pass per member, reading the clean inputs), and the loss is
  the sum of the members' own single-dictionary losses, sum_m (mse_m +
  alpha_m beta KL_m) / (1 + beta) + sparsity: what the members' held-out
  `spliced_loss` and circuit tracing's local replacement (each
  transcoder on clean inputs) measure, without the co-adaptation that the
  joint KL teaches. It costs one full pass (and a backward through the
  layers after the member) per member, and holds every pass's logits for
  the backward (members x windows x seq_len x 262k float32: 2.1 GB for
  four members at 4 x 128 tokens).

  Attributes:
    group: the `GroupRun` (stacks, members, modules).
    tx: the optimiser (one per member, vmapped).
    step: jitted, state-donating (state {stack: stacked TrainState},
      gemma_params, batch) -> (state, metrics); metrics: scalars, the
      means over members under plain names ('mse', 'l0', 'fvu',
      'sparsity'), 'kl', 'loss', 'grad_norm', 'finite', and each member's
      '{name}/l0' and '{name}/fvu' (names: `Layout.name`, as the group's
      training and evaluation metrics name them).
    losses: jitted (params {stack: stacked params}, scales {stack:
      (norm_scale, target_scale)}, gemma_params, batch) -> metrics.
  """

  def __init__(self, group, tx: optax.GradientTransformation,
               settings: GroupSettings):
    self.group = group
    self.tx = tx
    self.model_config = group.model_config
    self.settings = settings
    self.hookpoints = sorted({h for d in group.plan.dictionaries
                              for h in (*d.layout.inputs,
                                        *d.layout.targets)})
    self.step = jax.jit(self.step_fn, donate_argnums=0)
    self.losses = jax.jit(self.losses_fn)

  def _clean(self, gemma_params, batch):
    s = self.settings
    out = models.forward(gemma_params, batch["tokens"], batch["mask"],
                         config=self.model_config, hookpoints=self.hookpoints,
                         logits=s.beta > 0, loss=False,
                         dtype=jnp.dtype(s.dtype))
    return out.activations, out.logits

  def _members(self, params, scales):
    """Every member as a `splice.Member` over (traced) parameters."""
    out = []
    for key, stack in self.group.stacks.items():
      norm, target = scales[key]
      for i, member in enumerate(stack.members):
        out.append(splice_lib.Member(
            name=member.layout.name, layout=member.layout,
            module=stack.template.module,
            params=jax.tree.map(lambda a, i=i: a[i], params[key]),
            norm_scale=norm[i], target_scale=target[i]))
    return out

  def _spliced_kl(self, members, gemma_params, batch, clean_logits):
    return spliced_kl(members, gemma_params, batch, clean_logits,
                      model_config=self.model_config,
                      dtype=self.settings.dtype)

  def _loss(self, params, scales, gemma_params, batch, acts, clean_logits):
    """(total, (metrics, {stack: latents (members, N, S)}))."""
    s = self.settings
    mse, sparsity, per, latents = 0.0, 0.0, {}, {}
    for key, stack in self.group.stacks.items():
      norm, target = scales[key]
      rows = lambda h: acts[h].reshape(-1, acts[h].shape[-1])[  # noqa: E731
          batch["rows"]].astype(jnp.float32)
      x = jnp.stack([rows(m.layout.inputs[0]) for m in stack.members])
      x = x / norm[:, None, None]
      kw = {}
      if stack.template.layout.kind == "transcoder":
        y = jnp.stack([rows(m.layout.targets[0]) for m in stack.members])
        kw["target"] = y / target[:, None, None]

      def one(p, x, **kw):
        return dictionaries.compute_loss(stack.template.module, p, x,
                                         sparsity_coeff=s.sparsity_coeff,
                                         **kw)
      lo, out = jax.vmap(one)(params[key], x, **kw)
      mse = mse + jnp.sum(lo.mse)
      sparsity = sparsity + jnp.sum(lo.sparsity)
      latents[key] = out.latents
      for i, m in enumerate(stack.members):
        per[m.layout.name] = {"mse": lo.mse[i], **{
            k: v[i] for k, v in lo.aux.items() if jnp.ndim(v) == 1}}
    if s.beta > 0 and s.alone:
      total = sparsity
      for m in self._members(params, scales):
        kl = self._spliced_kl([m], gemma_params, batch, clean_logits)
        total = total + combined_loss(per[m.name]["mse"], kl, 0.0,
                                      s.beta)[0]
        per[m.name]["kl"] = kl          # their mean is metrics["kl"], below
      metrics = {"sparsity": sparsity}
    elif s.beta > 0:
      kl = self._spliced_kl(self._members(params, scales), gemma_params,
                            batch, clean_logits)
      total, metrics = combined_loss(mse, kl, sparsity, s.beta)
    else:
      total, metrics = mse + sparsity, {"mse": mse, "recon_loss": mse,
                                        "sparsity": sparsity}
    n = len(per)
    metrics["mse"] = mse / n
    metrics["sparsity"] = sparsity / n
    for k in ("l0", "fvu", "kl"):
      if all(k in p for p in per.values()):
        metrics[k] = sum(p[k] for p in per.values()) / n
        metrics.update({f"{h}/{k}": p[k] for h, p in per.items()})
    metrics["loss"] = total
    return total, (metrics, latents)

  def _scales(self, state):
    return {k: (st.norm_scale, st.target_scale) for k, st in state.items()}

  def losses_fn(self, params, scales, gemma_params, batch):
    """The step's losses and metrics at `params`, without an update."""
    acts, clean_logits = self._clean(gemma_params, batch)
    _, (metrics, _) = self._loss(params, scales, gemma_params, batch, acts,
                                 clean_logits)
    return metrics

  def step_fn(self, state: dict, gemma_params, batch):
    """One update of every member (unjitted; `step` is the jitted form)."""
    acts, clean_logits = self._clean(gemma_params, batch)
    params = {k: st.params for k, st in state.items()}
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (_, (metrics, latents)), grads = grad_fn(
        params, self._scales(state), gemma_params, batch, acts, clean_logits)
    new = {}
    for key, st in state.items():
      module = self.group.stacks[key].template.module
      update = functools.partial(apply_update, module, self.tx,
                                 unit_decoder=self.settings.unit_decoder)
      p, opt = jax.vmap(update)(st.params, st.opt_state, grads[key])
      step = st.step + 1
      fired = jnp.any(latents[key] > 0, axis=1)       # (members, S)
      new[key] = st.replace(
          step=step, params=p, opt_state=opt,
          last_fired=jnp.where(fired, step[:, None], st.last_fired))
    grad_norm = optax.global_norm(grads)
    metrics.update({
        "grad_norm": grad_norm,
        "finite": jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)})
    return new, metrics
