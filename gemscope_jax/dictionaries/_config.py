"""`DictConfig`: the validated description of one dictionary to build.

Experiment files hold plain ml_collections fields; the trainer turns them into
a `DictConfig`, which checks every field up front and names the bad one, so a
typo fails at launch rather than as a NaN or a shape error hours later.

Transcoders (`*_transcoder`: mlp_in -> mlp_out of one layer), crosscoders
(`*_crosscoder`: one site at `n_layers` layers) and cross-layer transcoders
(`*_clt`) are architectures like the others; their own fields (`affine_skip`,
`n_layers`, `causal`) are refused elsewhere.

Caveat: fields that an architecture does not use (k for JumpReLU, target_l0
for TopK) are accepted and ignored, but still range-checked when set.
"""

from __future__ import annotations

import dataclasses

SAES = ("jumprelu", "topk", "batchtopk", "relu")
TRANSCODERS = ("jumprelu_transcoder", "topk_transcoder")
CROSSCODERS = ("jumprelu_crosscoder", "topk_crosscoder")
CLTS = ("jumprelu_clt", "topk_clt")
MULTILAYER = CROSSCODERS + CLTS
ARCHITECTURES = SAES + TRANSCODERS + MULTILAYER
PENALTIES = ("l0", "quadratic")
DTYPES = ("float32", "bfloat16", "float16")


def _bad(field: str, message: str, value) -> ValueError:
  return ValueError(f"DictConfig.{field}: {message}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DictConfig:
  """One sparse dictionary.

  Attributes:
    d_in: input width (activations), e.g. 640 for Gemma 3 270M resid_post.
    d_sae: number of latents (the width: 16384 for "16k").
    d_out: reconstruction width; None means d_in (an SAE, not a transcoder).
      Multi-layer dictionaries: None or d_in (d_in is one layer's width).
    architecture: a key of `DICTIONARIES`: jumprelu, topk, batchtopk, relu,
      {jumprelu,topk}_{transcoder,crosscoder,clt}.
    bandwidth: JumpReLU straight-through kernel width, in normalised input
      units (inputs scaled to unit mean squared norm).
    target_l0: JumpReLU quadratic penalty's target L0 (latents per token;
      a CLT's total over its layers).
    k: TopK latents per token (a CLT's total over its layers); BatchTopK's
      mean latents per token.
    sparsity_penalty: JumpReLU's 'l0' (Gemma Scope 1) or 'quadratic'
      (Gemma Scope 2).
    pre_enc_bias: subtract b_dec before the encoder in training; None means
      the architecture's default (True for SAEs, False otherwise; transcoders
      and multi-layer dictionaries refuse True).
    dtype: compute dtype name of the matmul inputs; parameters stay float32.
    matryoshka_prefixes: increasing prefix sizes ending at d_sae to train
      with the Matryoshka loss, or None.
    preact_coeff: JumpReLU pre-activation loss weight (revives silent
      latents; 0 is the published recipe).
    l0_preact_bandwidth: JumpReLU: > 0, the L0 penalty's straight-through
      estimator also reaches the pre-activations, with a kernel of this
      width (`jumprelu.step`); 0: published.
    freq_coeff: JumpReLU: weight, relative to the L0 penalty's, of the
      high-frequency term sum_i (relu(freq_i - max_freq) / max_freq)^2
      (`jumprelu.frequency_penalty`); 0: off.
    max_freq: JumpReLU: the firing frequency above which `freq_coeff`
      penalises a latent.
    affine_skip: transcoders only: learn the affine skip `x @ w_skip`.
    dense_rank: single-layer JumpReLU SAEs and transcoders without the
      affine skip: k > 0 adds the rank-k linear path `Dictionary.dense`
      to the reconstruction; 0: off.
    n_layers: crosscoders and CLTs only (required): layers read/written.
    l0_targets: JumpReLU CLTs only: one target L0 per layer (n_layers
      floats), each layer's quadratic penalty on its own L0; None: one
      penalty on the total (`target_l0`), which layers may share as they
      like.
    causal: crosscoders only: weakly causal masks (see `Crosscoder`).
  """

  d_in: int
  d_sae: int
  d_out: int | None = None
  architecture: str = "jumprelu"
  bandwidth: float = 0.001
  target_l0: float | None = None
  k: int | None = None
  sparsity_penalty: str = "quadratic"
  pre_enc_bias: bool | None = None
  dtype: str = "float32"
  matryoshka_prefixes: tuple[int, ...] | None = None
  preact_coeff: float = 0.0
  l0_preact_bandwidth: float = 0.0
  freq_coeff: float = 0.0
  max_freq: float = 0.1
  affine_skip: bool = False
  dense_rank: int = 0
  n_layers: int | None = None
  causal: bool = False
  l0_targets: tuple[float, ...] | None = None

  def __post_init__(self):
    for name in ("d_in", "d_sae"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise _bad(name, "must be a positive int", value)
    if self.d_out is not None and (not isinstance(self.d_out, int)
                                   or self.d_out <= 0):
      raise _bad("d_out", "must be None or a positive int", self.d_out)
    if self.architecture not in ARCHITECTURES:
      raise _bad("architecture", f"must be one of {ARCHITECTURES}",
                 self.architecture)
    if self.dtype not in DTYPES:
      raise _bad("dtype", f"must be one of {DTYPES}", self.dtype)
    arch = self.architecture
    multi = arch in MULTILAYER
    if self.pre_enc_bias is None:
      object.__setattr__(self, "pre_enc_bias", arch in SAES)
    if self.pre_enc_bias and arch not in SAES:
      raise _bad("pre_enc_bias", f"must be off for architecture={arch!r}",
                 self.pre_enc_bias)
    if self.affine_skip and arch not in TRANSCODERS:
      raise _bad("affine_skip", f"needs a transcoder architecture "
                 f"{TRANSCODERS}, not {arch!r}", self.affine_skip)
    if (not isinstance(self.dense_rank, int) or isinstance(
        self.dense_rank, bool) or not 0 <= self.dense_rank < self.d_in):
      raise _bad("dense_rank", f"must be an int in [0, d_in={self.d_in}) "
                 "(0: off)", self.dense_rank)
    if self.dense_rank and (arch not in ("jumprelu", "jumprelu_transcoder")
                            or self.affine_skip
                            or self.matryoshka_prefixes is not None):
      raise _bad("dense_rank", "needs architecture 'jumprelu' or "
                 "'jumprelu_transcoder' without affine_skip (which is "
                 f"full rank already) or matryoshka_prefixes, not {arch!r}",
                 self.dense_rank)
    if multi:
      if not isinstance(self.n_layers, int) or self.n_layers < 1:
        raise _bad("n_layers", f"must be a positive int for {arch!r}",
                   self.n_layers)
      if self.d_out not in (None, self.d_in):
        raise _bad("d_out", f"must be None or d_in={self.d_in} for {arch!r}",
                   self.d_out)
    elif self.n_layers is not None:
      raise _bad("n_layers", f"only for {MULTILAYER}, not {arch!r}",
                 self.n_layers)
    if self.causal and arch not in CROSSCODERS:
      raise _bad("causal", f"only for {CROSSCODERS} (CLTs are always causal),"
                 f" not {arch!r}", self.causal)
    if self.causal and self.d_sae < self.n_layers:
      raise _bad("causal", f"needs d_sae >= n_layers={self.n_layers}",
                 self.causal)
    if self.pre_enc_bias and self.d_out not in (None, self.d_in):
      raise _bad("pre_enc_bias", f"needs d_out == d_in={self.d_in} (turn it "
                 f"off for transcoders; d_out={self.d_out})", self.pre_enc_bias)
    if not self.bandwidth > 0:
      raise _bad("bandwidth", "must be > 0", self.bandwidth)
    if not self.l0_preact_bandwidth >= 0:
      raise _bad("l0_preact_bandwidth", "must be >= 0 (0: off)",
                 self.l0_preact_bandwidth)
    if not self.freq_coeff >= 0:
      raise _bad("freq_coeff", "must be >= 0 (0: off)", self.freq_coeff)
    if not 0 < self.max_freq < 1:
      raise _bad("max_freq", "must be in (0, 1) (a fraction of tokens)",
                 self.max_freq)
    if self.freq_coeff and not arch.startswith("jumprelu"):
      raise _bad("freq_coeff", f"needs a jumprelu architecture, not {arch!r}",
                 self.freq_coeff)
    if not self.preact_coeff >= 0:
      raise _bad("preact_coeff", "must be >= 0", self.preact_coeff)
    if self.sparsity_penalty not in PENALTIES:
      raise _bad("sparsity_penalty", f"must be one of {PENALTIES}",
                 self.sparsity_penalty)
    # A CLT's budget is over all n_layers * d_sae latents.
    n_latents = self.d_sae * self.n_layers if arch in CLTS else self.d_sae
    if self.target_l0 is not None and not 0 < self.target_l0 < n_latents:
      raise _bad("target_l0", f"must be in (0, {n_latents}) (latents per "
                 "token)", self.target_l0)
    if self.l0_targets is not None:
      if arch != "jumprelu_clt" or self.sparsity_penalty != "quadratic":
        raise _bad("l0_targets", "only for a jumprelu_clt with the quadratic "
                   f"penalty, not {arch!r} / {self.sparsity_penalty!r}",
                   self.l0_targets)
      t = tuple(self.l0_targets)
      if (len(t) != self.n_layers
          or not all(isinstance(v, (int, float)) and 0 < v < self.d_sae
                     for v in t)):
        raise _bad("l0_targets", f"must be {self.n_layers} numbers in (0, "
                   f"{self.d_sae}), one per layer", self.l0_targets)
      object.__setattr__(self, "l0_targets", tuple(float(v) for v in t))
    if (arch.startswith("jumprelu") and self.sparsity_penalty == "quadratic"
        and self.target_l0 is None and self.l0_targets is None):
      raise _bad("target_l0", "is required by sparsity_penalty='quadratic'",
                 None)
    if self.k is not None and (not isinstance(self.k, int)
                               or not 1 <= self.k <= n_latents):
      raise _bad("k", f"must be an int in [1, {n_latents}] (latents per "
                 "token)", self.k)
    if arch.startswith(("topk", "batchtopk")) and self.k is None:
      raise _bad("k", f"is required by architecture={arch!r}", None)
    if self.matryoshka_prefixes is not None and (multi or self.affine_skip):
      raise _bad("matryoshka_prefixes", "is not supported for multi-layer "
                 "dictionaries or affine skip transcoders",
                 self.matryoshka_prefixes)
    if self.matryoshka_prefixes is not None:
      p = tuple(self.matryoshka_prefixes)
      if (not p or p[-1] != self.d_sae
          or any(a >= b for a, b in zip((0,) + p, p))):
        raise _bad("matryoshka_prefixes", "must increase strictly from > 0 "
                   f"to d_sae={self.d_sae}", self.matryoshka_prefixes)
      # A list from a config file would make the frozen config unhashable.
      object.__setattr__(self, "matryoshka_prefixes", p)
