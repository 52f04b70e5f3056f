"""Runs SAEDashboard 0.8.0 for benchmarks/dashboard_vs_saedashboard.py.

Runs inside .venv-saedashboard (scripts/saedashboard_env.sh), never in the
project's venv. Reads from --work: tokens.npy (int64 windows, BOS first),
sae.npz (w_enc, w_dec, b_enc, b_dec, threshold of a JumpReLU SAE on raw
layer-6 residuals, pre-encoder bias folded), tokenizer.model (the project's
SentencePiece proto) and model/ (a transformers folder from `gemscope
export-model`). Writes saedashboard_<name>.html there and prints one JSON
line: side, load/run/save seconds, peak RSS (GB), HTML size.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position


def load_sae(path: pathlib.Path, hook: str):
  from sae_lens import JumpReLUSAE, JumpReLUSAEConfig  # pylint: disable=import-outside-toplevel
  z = np.load(path)
  d_in, d_sae = z["w_enc"].shape
  cfg = JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32",
                          device="cpu", apply_b_dec_to_input=False)
  cfg.metadata.hook_name = hook
  cfg.metadata.model_name = "google/gemma-3-270m"
  sae = JumpReLUSAE(cfg)
  state = {"W_enc": z["w_enc"], "W_dec": z["w_dec"], "b_enc": z["b_enc"],
           "b_dec": z["b_dec"], "threshold": z["threshold"]}
  sae.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v,
                                                                np.float32))
                       for k, v in state.items()})
  sae.eval()
  return sae


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--work", required=True)
  ap.add_argument("--name", required=True)
  ap.add_argument("--batch", type=int, default=0,
                  help="latents per batch (0: SaeVisConfig's default)")
  ap.add_argument("--cache-dir", default="",
                  help="its activation cache (empty: none)")
  ap.add_argument("--hook", default="blocks.6.hook_resid_post")
  args = ap.parse_args()
  work = pathlib.Path(args.work)
  torch.set_grad_enabled(False)

  from transformers import AutoModelForCausalLM, GemmaTokenizerFast  # pylint: disable=import-outside-toplevel
  from sae_lens import HookedSAETransformer  # pylint: disable=import-outside-toplevel
  from sae_dashboard.data_writing_fns import save_feature_centric_vis  # pylint: disable=import-outside-toplevel
  from sae_dashboard.sae_vis_data import SaeVisConfig  # pylint: disable=import-outside-toplevel
  from sae_dashboard.sae_vis_runner import SaeVisRunner  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  # TransformerLens re-reads the tokenizer through its name_or_path, so it
  # must come from a folder (from_pretrained), with add_bos_token set.
  tok_dir = work / "tokenizer_hf"
  if not (tok_dir / "tokenizer.json").is_file():
    GemmaTokenizerFast(vocab_file=str(work / "tokenizer.model"),
                       add_bos_token=True).save_pretrained(str(tok_dir))
  tok = GemmaTokenizerFast.from_pretrained(str(tok_dir), add_bos_token=True)
  hf_model = AutoModelForCausalLM.from_pretrained(
      str(work / "model"), dtype=torch.float32)
  model = HookedSAETransformer.from_pretrained(
      "google/gemma-3-270m", hf_model=hf_model, tokenizer=tok, device="cpu",
      dtype=torch.float32)
  del hf_model
  sae = load_sae(work / "sae.npz", args.hook)
  tokens = torch.from_numpy(np.load(work / "tokens.npy")).long()
  kw = {}
  if args.batch:
    kw["minibatch_size_features"] = args.batch
  if args.cache_dir:
    # Its cache is keyed only by minibatch index: a stale one from other
    # tokens would be reused silently, so it starts empty.
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    kw["cache_dir"] = pathlib.Path(args.cache_dir)
  cfg = SaeVisConfig(hook_point=args.hook, features=list(range(sae.cfg.d_sae)),
                     device="cpu", dtype="float32", **kw)
  t1 = time.perf_counter()
  data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
  t2 = time.perf_counter()
  out = work / f"saedashboard_{args.name}.html"
  save_feature_centric_vis(sae_vis_data=data, filename=str(out))
  t3 = time.perf_counter()
  print(json.dumps({
      "side": args.name, "load_s": t1 - t0, "run_s": t2 - t1,
      "save_s": t3 - t2, "html_mb": out.stat().st_size / 2**20,
      "tokens": int(tokens.numel()), "width": int(sae.cfg.d_sae),
      "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
        flush=True)


if __name__ == "__main__":
  main()
