r"""The main job's SAE fine-tuned end to end with a KL term (Gemma Scope 2).

  gemscope train --config=experiments/jumprelu_270m.py --workdir=out/main
  gemscope finetune --config=experiments/jumprelu_270m_kl.py \
      --workdir=out/main_kl

Starts from the main job's newest checkpoint (finetune.source, default
out/main; `--from=DIR` for another) and minimises (MSE + alpha * beta * KL)
/ (1 + beta) plus the SAE's own quadratic L0 penalty, alpha = MSE / KL
held constant, KL = KL(clean next-token distribution || with the SAE
spliced in at layer_6/resid_post) over ordinary tokens of the training
text, the gradient flowing back through layers 7-17 of the frozen Gemma
(training/finetune.py). Then evaluates on the held-out text exactly as the
main job does (before: reused from out/main/metrics.json).

Only the `finetune` section of this config is read; the model, hookpoint,
dictionary, data and eval settings come from the source run.

FIGURES_PLACEHOLDER

Arguments after the colon:
  :control    the same run with beta = 0 (MSE and L0 penalty only)
  :runlocal   2 steps of 2 windows (a smoke run)
  :beta=3,lr=1e-4,tokens=40640   other settings (finetune.* shorthands;
                                 dotted paths work too)
"""

from gemscope_jax.training import config as config_lib

# This experiment's shorthands: finetune fields (other keys: dotted paths,
# e.g. finetune.beta1=0.9).
SHORTHANDS = {"beta": "finetune.beta", "lr": "finetune.lr",
              "tokens": "finetune.num_tokens",
              "windows": "finetune.windows_per_step",
              "source": "finetune.source"}


def get_config(arg=None):
  overrides = config_lib.parse_arg(arg)
  c = config_lib.default_config()
  f = c.finetune
  f.source = "out/main"
  if overrides.pop("control", False):
    f.beta = 0.0
  if overrides.pop("runlocal", False):
    f.num_tokens, f.windows_per_step = 2 * 2 * 127, 2
    f.checkpoint_every_steps = f.log_every_steps = 1
  renamed = config_lib.Overrides()
  for key, value in overrides.items():
    renamed[SHORTHANDS.get(key, key)] = value
  return config_lib.apply_overrides(c, renamed)
