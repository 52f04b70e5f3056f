r"""The 18 transcoders of one Gemma pass fine-tuned end to end as one
replacement model (Gemma Scope 2's KL term, every MLP replaced at once).

  gemscope train --config=experiments/transcoder_270m.py:layers=all,width=2048,tokens=327680 \
      --workdir=out/tc_all --no-eval
  gemscope finetune --config=experiments/replacement_270m_kl.py \
      --workdir=out/tc_all_kl --set eval.num_tokens=16384 --set eval.loss_tokens=2048

Starts from the group's newest checkpoint (finetune.source, default
out/tc_all; `--from=DIR` for another) and minimises (sum of the members'
MSE + alpha * beta * KL) / (1 + beta) plus each member's quadratic L0
penalty, alpha = MSE / KL held constant, KL = KL(clean next-token
distribution || the replacement model's), where the replacement model has
every transcoder writing its MLP's output from the mlp_in the earlier
transcoders produced (training/finetune_step.py, `GroupFinetuneStep`).
The gradient flows back through all 18 layers and every later
transcoder. Then evaluates on the held-out text as the group's training
does, `replacement_loss` beside each member's own figures.

Why: trained on clean activations alone, the transcoders extrapolate badly
to the inputs their predecessors hand them (layer 3: FVU 0.31 on clean
inputs, 32.5 with layers 0-2 replaced, its encoder firing 297 latents a
token instead of 59): the in-pass replacement model diverges to 480 nats
(all MLPs zeroed: 10.17). See the README's transcoder tables.

Expected (the measured run's settings are this file's defaults; 16,384
held-out tokens, LM loss on 2,048, as the source was evaluated): the
in-pass replacement model from 480.25 nats (all 18 MLPs zeroed: 10.17,
clean 3.24) to 5.72, 64.2 % of the loss recovered; mean L0 59.0, FVU
0.216; but each early transcoder alone, and all 18 from clean inputs,
do worse than before (they co-adapt: README). About 45 minutes of steps
and 10-15 of evaluation on 2 shared CPU cores.

The same file fine-tunes a JumpReLU CLT's replacement model (every
layer's mlp_out from the CLT, each layer's latents read from the mlp_in
its pass computed; `finetune_step.FinetuneStep`):

  gemscope finetune --config=experiments/replacement_270m_kl.py:source=out/clt_all \
      --workdir=out/clt_all_kl

Measured on the 18-layer CLT of width 2048 a layer at the transcoders'
total L0 (README): the in-pass replacement model from 446.4 nats to 5.66
(65.0 %) after 80 steps (`--set finetune.num_tokens=40640`), where the
transcoders were at 57.8 %; about 55-60 s a step, peak 15.6 GB.

Arguments after the colon (the same shorthands as jumprelu_270m_kl.py):
  :control     beta = 0 (the members' own MSE and L0 penalty only)
  :runlocal    2 steps of 2 windows (a smoke run)
  :beta=2,lr=1e-4,tokens=40640,source=out/other   other settings
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  return config_lib.finetune_config(
      arg, source="out/tc_all", beta=4.0, lr=2e-4,
      num_tokens=120 * 4 * 127,   # 120 steps of 4 windows of 128 tokens
      windows_per_step=4, log_every_steps=5, checkpoint_every_steps=40)
