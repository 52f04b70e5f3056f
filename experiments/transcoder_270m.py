r"""JumpReLU transcoders on Gemma 3 270M: mlp_in -> mlp_out of one layer,
or of every layer at once (a replacement model for all 18 MLPs).

  gemscope train --config=experiments/transcoder_270m.py --workdir=out/tc
  gemscope train --config=experiments/transcoder_270m.py:skip \
      --workdir=out/tc_skip                     with the affine skip
  gemscope train --config=experiments/transcoder_270m.py:layers=all \
      --workdir=out/tc_all                      one per layer, one pass

The published JumpReLU recipe adapted to transcoders: no
pre-encoder bias, mlp_in and mlp_out each divided by their own scalar,
b_dec started at the mean of mlp_out, quadratic L0 penalty towards 60.
metrics.json holds the FVU of mlp_out, L0, dead/dense latents and the LM
loss with the transcoder replacing layer 6's MLP (against the MLP's output
zeroed); with `layers=...` also `replacement_*`: every layer's transcoder
replacing its MLP at once.

Expected: see the tables in README ("Transcoders, crosscoders and CLTs").
`layers=2+6+12+16` with `--set data.cache_dir=DIR --set
train.num_tokens=327680` (640 steps, one cached Gemma pass) landed within
12 % of L0 60 at all four layers, recovering 49 / 72 / 76 / 32 % of the
loss on held-out text (an hour on 2 shared cores, most of it the harvest
and the first evaluation's compiles); `runlocal` is a 2-minute smoke run
(layer 6: L0 57, FVU 0.24, about 50 % recovered).

Then fine-tune each transcoder alone with the KL term (README, "Transcoders,
crosscoders and cross-layer transcoders"):

  gemscope finetune --from=out/tc_4 --workdir=out/tc_4_kl \
      --set finetune.splice=alone --set finetune.beta=4 \
      --set finetune.lr=2e-4 --set finetune.num_tokens=30480

At `target_l0=20` this took layers 2/6/12/16 from 59/75/76/31 % to
87/88/84/68 % of the loss recovered and L0 24.5/20.8/32.1/18.3 to
20.0/19.8/23.7/16.0 (60 steps, 17 minutes on 2 quiet cores). At L0* 60,
layer 16 alone (`layer=16`) with `finetune.beta=16` went from 32 % to
71 % at L0 50.7 (60 steps, 11 minutes on shared cores). Those figures are
on the held-out stream's first 32k tokens, all Python documentation; on a
sample that holds the training mix (`gemscope eval --dictionary
DIR/export --num-tokens 131072 --loss-tokens 16384 --loss-windows
spread`) layer 16 recovers 58-66 % with its L0 within 20 % of target.
With `skip` at `target_l0=20`, the same fine-tuning took layers 2/6/12
to 78/88/89 % at L0 19.3/19.3/18.3.

Layer 16 needs longer training: three epochs of a one-layer cache

  gemscope train --config=experiments/transcoder_270m.py:skip,layer=16,\
target_l0=20,tokens=983040 --set data.cache_dir=DIR \
      --set data.cache_tokens=327680 --workdir=out/tc16

(the harvest, one Gemma pass, is most of it; 4 minutes of steps), then 120 KL
steps (`--set finetune.num_tokens=60960`, beta 4, lr 2e-4; 11 minutes on
quiet cores) land it at L0 17.5 and 77.5 % of the loss recovered on the
mix; the same recipe gives 75.7 % at L0 51.8 (skip, L0* 60), 76.7 % at
L0 60.0 (plain, L0* 60) and 72.3 % at L0 19.0 (plain, L0* 20).
"""

from gemscope_jax.training import config as config_lib


def get_config(arg=None):
  overrides = config_lib.parse_arg(arg)
  c = config_lib.preset("gemma3_270m")
  c.hookpoint = "layer_6/mlp_in"
  c.dictionary.architecture = "jumprelu_transcoder"
  if overrides.pop("topk", False):
    c.dictionary.architecture = "topk_transcoder"
    c.dictionary.k = 60
    c.train.sparsity_coeff = 0.0
  if overrides.pop("skip", False):
    c.dictionary.affine_skip = True
  return config_lib.apply_overrides(c, overrides)
