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

Expected (40 steps of 4 x 127 tokens, lr 5e-5, beta 1, fresh Adam with
beta1 = 0), held-out english_heldout, the main job's evaluation:

                     before   after (KL)   after (control: :control)
  L0                 59.75    59.64        59.54
  FVU                0.0449   0.0460       0.0452
  delta LM loss      0.320    0.256        0.324
  loss recovered     97.80 %  98.24 %      97.77 %

Time: about 10 minutes of steps on a quiet 2-core CPU (15 s a step: two
full passes with the 262k-token unembedding and a backward pass through
layers 7-17) plus the 4-minute evaluation; measured with the cores shared
(load 5-9): 13.3 + 8.7 minutes, and 1.2 + 8.8 for the control (its steps
stop at layer 6). These settings fall short of halving the delta LM loss; more steps
give less each: `:tokens=101600` (200 steps, the same settings, 53
minutes with the cores shared) ends at L0 59.50, FVU 0.0460, delta LM
loss 0.217 (-32 %), 98.51 % recovered. Halved with `:beta=16,lr=2e-4,
tokens=243840` (480 steps, 69 minutes, -48.8 %) resumed to
`:beta=16,lr=2e-4,tokens=284480` (560 steps, 8.5 more minutes on quiet
cores, then 3 of evaluation): L0 59.76 -> 59.63, FVU 0.0451 -> 0.0601,
delta LM loss 0.321 -> 0.153 (-52.2 %), 98.94 % recovered, dead latents
0.85 % -> 18 % (a fresh main job on an AMD Zen 4).

Arguments after the colon:
  :control    the same run with beta = 0 (MSE and L0 penalty only)
  :runlocal   2 steps of 2 windows (a smoke run)
  :beta=3,lr=1e-4,tokens=40640   other settings (finetune.* shorthands;
                                 dotted paths work too)
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  return config_lib.finetune_config(arg, source="out/main")
