"""The config read once: `plans.make` against the ConfigDict it reads, and
no jitted train step closing over a ConfigDict (fast: no model loads)."""

from __future__ import annotations

import dataclasses
import pathlib
import types

import jax
import ml_collections
import pytest

from gemscope_jax.training import config as config_lib
from gemscope_jax.training import group, plans
from gemscope_jax.training.step import Run

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = "runlocal,width=256,checkpoint=random"


def _config(experiment: str = "jumprelu_270m.py", extra: str = ""):
  arg = SMALL + (f",{extra}" if extra else "")
  return config_lib.load(f"{ROOT}/experiments/{experiment}:{arg}")


def _reachable_configdicts(fn, limit: int = 20000) -> list[str]:
  """Paths to every ConfigDict reachable from `fn`: through closures,
  bound `__self__`, `__wrapped__` (jit, vmap, partial), object and
  dataclass attributes and containers; modules and classes are leaves."""
  found, seen = [], set()
  todo = [(fn, "fn")]
  while todo and len(seen) < limit:
    obj, path = todo.pop()
    if id(obj) in seen or isinstance(obj, (type, types.ModuleType, str,
                                           bytes, int, float, bool)):
      continue
    seen.add(id(obj))
    if isinstance(obj, (ml_collections.ConfigDict,
                        ml_collections.FrozenConfigDict)):
      found.append(path)
      continue
    if isinstance(obj, dict):
      todo += [(v, f"{path}[{k!r}]") for k, v in obj.items()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
      todo += [(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    for name in ("__wrapped__", "__self__", "__func__", "func", "fun"):
      child = getattr(obj, name, None)
      if child is not None and not isinstance(obj, type):
        todo.append((child, f"{path}.{name}"))
    for i, cell in enumerate(getattr(obj, "__closure__", None) or ()):
      try:
        todo.append((cell.cell_contents, f"{path}.<closure {i}>"))
      except ValueError:  # an empty cell
        pass
    if dataclasses.is_dataclass(obj):
      todo += [(getattr(obj, f.name), f"{path}.{f.name}")
               for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__") and not callable(obj) or isinstance(
        obj, (Run, group.GroupRun, group.Stack)):
      todo += [(v, f"{path}.{k}") for k, v in vars(obj).items()]
  return found


def test_the_detector_finds_a_configdict_in_a_closure():
  """The check below can fail: a jitted function closing over a config."""
  c = _config()

  def step(x):
    return x * c.train.lr

  assert _reachable_configdicts(jax.jit(step)) == ["fn.__wrapped__.<closure 0>"]
  run = Run.from_config(c, devices=jax.devices()[:1])
  run.c = c  # as the trainer's Run held it before the redesign
  assert _reachable_configdicts(run.step) == ["fn.__wrapped__.__self__.c"]


@pytest.mark.parametrize("experiment, extra", [
    ("jumprelu_270m.py", ""),
    ("jumprelu_270m.py", "step=sparse"),
    ("transcoder_270m.py", "skip"),
    ("clt_270m.py", "clt_layers=1-2"),
])
def test_jitted_steps_close_over_plans_not_the_config(experiment, extra):
  run = Run.from_config(_config(experiment, extra),
                        devices=jax.devices()[:1])
  assert _reachable_configdicts(run.step) == []
  assert _reachable_configdicts(run.init) == []
  assert isinstance(run.plan, plans.Plan)


def test_group_steps_close_over_plans_not_the_config():
  run = group.GroupRun(plans.make(_config(extra="layers=1-3")),
                       devices=jax.devices()[:1])
  for stack in run.stacks.values():
    assert _reachable_configdicts(stack.step) == []
    assert _reachable_configdicts(stack.init) == []


def test_plans_are_frozen_and_detached_from_the_config():
  c = _config()
  plan = plans.make(c)
  with pytest.raises(dataclasses.FrozenInstanceError):
    plan.optimizer.lr = 1.0  # type: ignore[misc]
  lr, width = plan.optimizer.lr, plan.dictionaries[0].config.d_sae
  c.train.lr, c.dictionary.width = 0.5, 64
  assert (plan.optimizer.lr, plan.dictionaries[0].config.d_sae) == (lr, width)
  assert plans.make(c).optimizer.lr == 0.5


def test_plan_reads_every_field_the_step_uses():
  """Each plan field equals the config field it comes from."""
  c = _config(extra="train.grad_clip_norm=0.5,train.unit_decoder=False,"
              "train.sparse_capacity=64,train.dead_after_tokens=777,"
              "train.l0_target_decay_steps=9,train.l0_target_start=2.5")
  p = plans.make(c)
  t = c.train
  assert p.step == plans.StepPlan(
      grads=t.step, sparse_capacity=64, sparsity_coeff=t.sparsity_coeff,
      sparsity_warmup_steps=t.sparsity_warmup_steps, unit_decoder=False,
      dead_after_tokens=777, batch_size=t.batch_size,
      num_steps=t.num_tokens // t.batch_size, l0_target_decay_steps=9,
      l0_target_start=2.5)
  assert p.optimizer == plans.OptimizerPlan(
      lr=t.lr, lr_warmup_steps=t.lr_warmup_steps,
      lr_decay_fraction=t.lr_decay_fraction, beta1=t.beta1, beta2=t.beta2,
      grad_clip_norm=0.5, num_steps=t.num_tokens // t.batch_size)
  assert p.mesh.rules == tuple(tuple(r) for r in c.mesh.rules)
  assert p.eval.num_tokens == c.eval.num_tokens
  assert p.data.bucket_tokens == c.data.bucket_tokens
  assert p.dictionaries[0].init_norm == t.init_norm
  assert p.config_json == config_lib.to_json(c)


def test_one_validation_pass_names_the_field():
  for override, field in {"train.lr=-1": "config.train.lr",
                          "width=0": "config.dictionary.width",
                          "layer=40": "config.hookpoint",
                          "train.step=fast": "config.train.step",
                          "mesh.gemma=zero3": "config.mesh.gemma"}.items():
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
      plans.make(_config(extra=override))


def test_clt_l0_targets_from_the_config():
  """dictionary.l0_targets: 'even' splits target_l0 over the CLT's layers;
  a list sets each layer's target (and the total); a wrong length, a
  crosscoder or a bad word are refused naming the field."""
  def dict_config(extra):
    c = config_lib.load(f"experiments/clt_270m.py:runlocal,{extra}")
    return plans.make(c).dictionaries[0].config
  even = dict_config("dictionary.l0_targets=even")
  assert even.l0_targets == (60.0,) * 4 and even.target_l0 == 240.0
  assert dict_config("dictionary.l0_targets=[100,60,40,20]").l0_targets == (
      100.0, 60.0, 40.0, 20.0)
  assert dict_config("dictionary.l0_targets=[100,60,40,20]").target_l0 == 220
  assert dict_config("dictionary.width=1024").l0_targets is None
  for bad in ("dictionary.l0_targets=[1,2]", "dictionary.l0_targets=half"):
    with pytest.raises(ValueError, match=r"config\.dictionary\.l0_targets"):
      dict_config(bad)


def test_l0_preact_bandwidth_needs_jumprelu_and_an_autodiff_step():
  """The option runs on autodiff: the sparse step and TopK are refused
  naming the field; with the dense step the trainer falls back."""
  for extra in ("dictionary.l0_preact_bandwidth=0.1,train.step=sparse",
                "dictionary.l0_preact_bandwidth=0.1,arch=topk,k=8"):
    with pytest.raises(ValueError,
                       match=r"config\.dictionary\.l0_preact_bandwidth"):
      plans.make(_config(extra=extra))
  with pytest.raises(ValueError, match=r"l0_preact_bandwidth"):
    plans.make(_config(extra="dictionary.l0_preact_bandwidth=-1.0"))
  plan = plans.make(_config(extra="dictionary.l0_preact_bandwidth=0.1"))
  assert plan.dictionaries[0].config.l0_preact_bandwidth == 0.1
