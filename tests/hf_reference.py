"""transformers as the independent reference: hookpoint capture on HF Gemma 3.

Imported by tests only. Each of our hookpoints maps to a module input or
output of `Gemma3ForCausalLM` (the table `HF_HOOKS` in
gemscope_jax/models/hooks.py); forward hooks record them.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def _first(x):
  return x[0] if isinstance(x, tuple) else x


@contextlib.contextmanager
def capture(model, layers):
  """Records {"layer_L/site": np.ndarray} for the given layers while active."""
  store = {}
  handles = []

  def keep(name):
    def fn(value):
      store[name] = _first(value).detach().float().numpy().copy()
    return fn

  def pre(name):
    k = keep(name)
    def hook(_module, args, kwargs):
      k(args[0] if args else kwargs["hidden_states"])
    return hook

  def post(name):
    k = keep(name)
    return lambda _module, _args, output: k(output)

  for l in layers:
    layer = model.model.layers[l]
    handles += [
        layer.register_forward_pre_hook(pre(f"layer_{l}/resid_pre"),
                                        with_kwargs=True),
        layer.self_attn.o_proj.register_forward_pre_hook(
            pre(f"layer_{l}/attn_out"), with_kwargs=True),
        layer.pre_feedforward_layernorm.register_forward_pre_hook(
            pre(f"layer_{l}/resid_mid"), with_kwargs=True),
        layer.pre_feedforward_layernorm.register_forward_hook(
            post(f"layer_{l}/mlp_in")),
        layer.post_feedforward_layernorm.register_forward_hook(
            post(f"layer_{l}/mlp_out")),
        layer.register_forward_hook(post(f"layer_{l}/resid_post")),
    ]
  try:
    yield store
  finally:
    for h in handles:
      h.remove()


def run(model, tokens: np.ndarray, mask: np.ndarray | None = None,
        layers=()) -> tuple[np.ndarray, dict]:
  """(logits float32, hookpoints) of the HF model on int tokens (B, T)."""
  ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  kwargs = {}
  if mask is not None:
    kwargs["attention_mask"] = torch.as_tensor(np.asarray(mask),
                                               dtype=torch.long)
  with capture(model, layers) as store, torch.no_grad():
    logits = model(input_ids=ids, **kwargs).logits.float().numpy()
  return logits, store
