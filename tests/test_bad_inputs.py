"""Wrong inputs a newcomer would type, for every command, table-driven.

Each row runs one `gemscope` command line in-process and asserts the exit
code (`gemscope_jax.errors`: 2 usage, 3 input, 4 output, 5 run), that
stderr is exactly one line naming the file, field, flag or shape, and that
nothing around it changed: every file under the row's sandbox and under
the shared fixtures is hashed before and after. Further tests check the
overwrite rules (only what the tool writes is replaced), `--out .`, and
writers killed with SIGKILL just before their rename (export,
export-model, and the activation scan): no partial output, and the next
run removes the stray temporary.

One tiny training run (24 steps of layer-1 activations on the real Gemma
3 270M), a tiny random Gemma in a transformers folder, and tiny random
transcoders and CLT (for `gemscope attribute`) are shared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from typing import Callable

import jax
import numpy as np
import pytest

from gemscope_jax import cli, errors, interop, models
from gemscope_jax.convert import save_hf

ROOT = pathlib.Path(__file__).resolve().parents[1]
GEMSCOPE = [sys.executable, "-m", "gemscope_jax.cli"]
KILL_ENV = "GEMSCOPE_TEST_KILL_BEFORE_RENAME"

# A run of 24 steps of 256 layer-1 activations (as tests/test_training.py).
TINY_RUN = ("runlocal,layer=1,width=256,tokens=6144,batch=256,"
            "data.bucket_tokens=2048,data.seq_len=64,"
            "train.checkpoint_every_steps=8,train.log_every_steps=4,"
            "train.sparsity_warmup_steps=8,train.lr_warmup_steps=4")
CONFIG = f"--config={ROOT}/experiments/jumprelu_270m.py:{TINY_RUN}"

TINY_MODEL = models.Gemma3Config(
    name="gemma3_custom", num_layers=2, d_model=32, mlp_dim=64, num_heads=2,
    num_kv_heads=1, head_dim=16, vocab_size=256, sliding_window=4,
    global_every=2, query_pre_attn_scalar=16.0)

pytestmark = pytest.mark.slow


@dataclasses.dataclass
class World:
  root: pathlib.Path
  run: pathlib.Path        # a finished tiny training workdir
  model: pathlib.Path      # a tiny random Gemma, transformers layout
  llama: pathlib.Path      # the same files, config.json says "llama"
  sae: pathlib.Path        # the run exported as a SAELens folder
  narrow: pathlib.Path     # a SAELens folder of width 64 at layer 1
  transcoders: pathlib.Path  # layer_0/, layer_1/: transcoders of the tiny
  wide: pathlib.Path       # a width-64 transcoder at layer 1 (tiny is 32)
  clt: pathlib.Path        # a CLT of 3 layers (tiny has 2)
  text: pathlib.Path
  binary: pathlib.Path
  no_get_config: pathlib.Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
  root = tmp_path_factory.mktemp("world")
  run = root / "run"
  assert cli.main(["train", CONFIG, f"--workdir={run}", "--no-eval",
                   "--quiet"]) == 0
  model = root / "model"
  params = models.init_params(TINY_MODEL, jax.random.key(0))
  save_hf(TINY_MODEL, params, model)
  llama = root / "llama"
  shutil.copytree(model, llama)
  cfg = json.loads((llama / "config.json").read_text())
  cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
  (llama / "config.json").write_text(json.dumps(cfg))
  sae = root / "sae"
  assert cli.main(["export", f"--workdir={run}", "--format=saelens",
                   f"--out={sae}"]) == 0
  rng = np.random.default_rng(0)
  d = interop.load_dictionary(sae)
  narrow = root / "narrow"
  interop.save_saelens(d.replace(
      w_enc=rng.normal(size=(64, 8)).astype(np.float32),
      w_dec=rng.normal(size=(8, 64)).astype(np.float32),
      b_enc=np.zeros(8, np.float32), b_dec=np.zeros(64, np.float32),
      threshold=np.zeros(8, np.float32)), narrow)
  tiny = TINY_MODEL.d_model
  transcoders = root / "transcoders"
  for l in range(TINY_MODEL.num_layers):
    interop.save_gemmascope2(_transcoder(rng, tiny, l),
                             transcoders / f"layer_{l}", release_layout=False)
  wide = root / "wide"
  interop.save_gemmascope2(_transcoder(rng, 64, 1), wide,
                           release_layout=False)
  clt = root / "clt"
  interop.save_multilayer_gemmascope2(interop.MultiLayerInference(
      kind="clt", w_enc=np.ones((3, tiny, 8), np.float32),
      w_dec=np.ones((3, 8, 3, tiny), np.float32),
      b_enc=np.zeros((3, 8), np.float32), b_dec=np.zeros((3, tiny), np.float32),
      threshold=np.zeros((3, 8), np.float32)), clt)
  text = root / "ok.txt"
  text.write_text("To be, or not to be, that is the question. " * 20)
  binary = root / "blob.txt"
  binary.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
  no_get_config = root / "no_get_config.py"
  no_get_config.write_text("CONFIG = {}\n")
  return World(root, run, model, llama, sae, narrow, transcoders, wide, clt,
               text, binary, no_get_config)


def _transcoder(rng, d: int, layer: int) -> interop.InferenceDictionary:
  """A random JumpReLU transcoder of width 8 at `layer`, d -> d."""
  return interop.InferenceDictionary(
      w_enc=rng.normal(size=(d, 8)).astype(np.float32),
      w_dec=rng.normal(size=(8, d)).astype(np.float32),
      b_enc=np.zeros(8, np.float32), b_dec=np.zeros(d, np.float32),
      threshold=np.zeros(8, np.float32), hookpoint=f"layer_{layer}/mlp_in",
      hookpoint_out=f"layer_{layer}/mlp_out")


def _tree(*roots: pathlib.Path) -> dict[str, str]:
  """{path: sha256 (or 'dir')} of everything under `roots`, hidden too."""
  out = {}
  for r in roots:
    for p in sorted(r.rglob("*")):
      out[str(p)] = ("dir" if p.is_dir() else
                     hashlib.sha256(p.read_bytes()).hexdigest())
  return out


def _sandbox(base: pathlib.Path) -> pathlib.Path:
  """A folder a user works in: their files, a non-empty and an empty
  folder, and a plain file where a folder might be expected."""
  box = base / "box"
  (box / "full" / "sub").mkdir(parents=True)
  (box / "full" / "user.txt").write_text("my notes")
  (box / "full" / "sub" / "data.csv").write_text("a,b\n1,2\n")
  (box / "empty").mkdir()
  (box / "file").write_text("not a folder")
  return box


@dataclasses.dataclass(frozen=True)
class Row:
  id: str
  argv: Callable[[World, pathlib.Path], list[str]]
  rc: int
  says: tuple[str, ...]        # substrings of the one stderr line
  own: str | None = None       # a sandbox path the tool may write (its own)


U, I, O, R = errors.USAGE, errors.INPUT, errors.OUTPUT, errors.RUN


def _attribute(w: World, b: pathlib.Path, *flags: str) -> list[str]:
  """`gemscope attribute` of 'Hi' through the tiny model's transcoders to
  a new file, with `flags` added (a flag given again wins)."""
  return ["attribute", "--prompt=Hi", f"--model={w.model}",
          f"--dictionaries={w.transcoders}", f"--out={b}/g.json", *flags]


ROWS = [
    # --- train: overrides (one typed parser for --set and FILE:ARG)
    Row("train-set-key-without-value",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/wd", "--set",
                      "train.lr"],
        U, ("train.lr", "needs a value", "a number")),
    Row("train-set-bool-for-int",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/wd", "--set",
                      "train.batch_size=True"],
        U, ("train.batch_size", "takes an integer")),
    Row("train-set-text-for-float",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/wd", "--set",
                      "train.lr=fast"],
        U, ("train.lr=fast", "takes a number")),
    Row("train-set-int-for-bool",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/wd", "--set",
                      "train.unit_decoder=1"],
        U, ("train.unit_decoder", "boolean")),
    Row("train-set-typo",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/wd", "--set",
                      "trian.lr=1e-3"],
        U, ("'trian'", "did you mean 'train'")),
    Row("train-set-section",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/wd", "--set",
                      "dictionary=4"],
        U, ("dictionary", "is a section")),
    Row("train-config-arg-key-without-value",
        lambda w, b: ["train", CONFIG + ",lr", f"--workdir={b}/wd"],
        U, ("train.lr", "needs a value")),
    Row("train-config-arg-bad-layer",
        lambda w, b: ["train", CONFIG + ",layer=x", f"--workdir={b}/wd"],
        U, ("layer='x'", "integer")),
    Row("train-config-missing",
        lambda w, b: ["train", f"--config={b}/nope.py", f"--workdir={b}/wd"],
        I, ("--config", "nope.py", "no such config file")),
    Row("train-config-without-get-config",
        lambda w, b: ["train", f"--config={w.no_get_config}",
                      f"--workdir={b}/wd"],
        I, ("no_get_config.py", "get_config")),
    Row("train-config-bad-value",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/wd", "--set",
                      "train.lr=-1.0"],
        U, ("config.train.lr", "> 0")),
    # --- train: text and workdir
    Row("train-text-missing",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/wd", "--set",
                      f"data.text={b}/missing.txt"],
        I, ("config.data.text", "missing.txt")),
    Row("train-text-binary",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/wd", "--set",
                      f"data.text={w.binary}"],
        I, ("blob.txt", "not a UTF-8 text file")),
    Row("train-workdir-is-a-file",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/file"],
        O, ("--workdir", "is a file")),
    Row("train-workdir-inside-a-file",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/file/wd"],
        O, ("--workdir", "file")),
    Row("train-workdir-holds-user-files",
        lambda w, b: ["train", CONFIG, f"--workdir={b}/full"],
        O, ("--workdir", "not a gemscope workdir", "user.txt")),
    Row("train-workdir-read-only",
        lambda w, b: ["train", CONFIG, "--workdir=/sys/gemscope_wd"],
        O, ("--workdir", "/sys/gemscope_wd")),
    # --- eval
    Row("eval-workdir-missing",
        lambda w, b: ["eval", f"--workdir={b}/nope"],
        I, ("--workdir", "no such training workdir")),
    Row("eval-workdir-without-checkpoint",
        lambda w, b: ["eval", f"--workdir={b}/empty"],
        I, ("--workdir", "no checkpoint to evaluate")),
    Row("eval-workdir-with-model-flag",
        lambda w, b: ["eval", f"--workdir={w.run}", "--model", "default"],
        U, ("--model", "--dictionary")),
    Row("eval-workdir-binary-text",
        lambda w, b: ["eval", f"--workdir={w.run}", "--text", str(w.binary)],
        I, ("blob.txt", "not a UTF-8 text file")),
    Row("eval-num-tokens-zero",
        lambda w, b: ["eval", f"--workdir={w.run}", "--num-tokens", "0"],
        U, ("--num-tokens", "positive integer")),
    Row("eval-dictionary-with-set",
        lambda w, b: ["eval", f"--dictionary={w.sae}", "--set",
                      "eval.num_tokens=5"],
        U, ("--set", "--workdir")),
    Row("eval-dictionary-missing",
        lambda w, b: ["eval", f"--dictionary={b}/nope"],
        I, ("--dictionary", "no such dictionary folder")),
    Row("eval-dictionary-not-a-dictionary",
        lambda w, b: ["eval", f"--dictionary={b}/full"],
        I, ("full", "params.safetensors", "sae_weights.safetensors")),
    Row("eval-dictionary-width-does-not-fit",
        lambda w, b: ["eval", f"--dictionary={w.narrow}", "--quiet"],
        I, ("width is 64", "layer_1/resid_post", "640")),
    # --- export
    Row("export-out-holds-user-files",
        lambda w, b: ["export", f"--workdir={w.run}", "--format=saelens",
                      f"--out={b}/full"],
        O, ("--out", "not empty", "--overwrite")),
    Row("export-out-is-a-file",
        lambda w, b: ["export", f"--workdir={w.run}", "--format=saelens",
                      f"--out={b}/file"],
        O, ("--out", "is a file")),
    Row("export-out-inside-a-file",
        lambda w, b: ["export", f"--workdir={w.run}",
                      "--format=gemmascope2", f"--out={b}/file/rel"],
        O, ("--out", "is a file")),
    Row("export-out-read-only",
        lambda w, b: ["export", f"--workdir={w.run}", "--format=saelens",
                      "--out=/sys/gemscope_out"],
        O, ("--out", "not writable")),
    Row("export-workdir-missing",
        lambda w, b: ["export", f"--workdir={b}/nope", "--format=saelens",
                      f"--out={b}/out"],
        I, ("--workdir", "no such training workdir")),
    Row("export-workdir-without-checkpoint",
        lambda w, b: ["export", f"--workdir={b}/empty", "--format=saelens",
                      f"--out={b}/out"],
        I, ("no checkpoint to export",)),
    # --- export-model
    Row("export-model-out-holds-user-files",
        lambda w, b: ["export-model", f"--model={w.model}",
                      f"--out={b}/full"],
        O, ("--out", "not empty", "--overwrite")),
    Row("export-model-out-is-a-file",
        lambda w, b: ["export-model", f"--model={w.model}",
                      f"--out={b}/file"],
        O, ("--out", "is a file")),
    Row("export-model-llama-folder",
        lambda w, b: ["export-model", f"--model={w.llama}",
                      f"--out={b}/out"],
        I, ("llama",)),
    Row("export-model-missing-model",
        lambda w, b: ["export-model", f"--model={b}/nope.gguf",
                      f"--out={b}/out"],
        I, ("nope.gguf",)),
    Row("export-model-shard-size-zero",
        lambda w, b: ["export-model", f"--model={w.model}",
                      f"--out={b}/out", "--max-shard-mb", "0"],
        U, ("--max-shard-mb", "positive integer")),
    # --- activations
    Row("activations-max-tokens-zero",
        lambda w, b: ["activations", f"--text-file={w.text}", "--hookpoint",
                      "layer_1/resid_post", "--max-tokens", "0",
                      f"--out={b}/a.safetensors"],
        U, ("--max-tokens", "positive integer, got 0")),
    Row("activations-seq-len-one",
        lambda w, b: ["activations", f"--text-file={w.text}", "--hookpoint",
                      "layer_1/resid_post", "--seq-len", "1",
                      f"--out={b}/a.safetensors"],
        U, ("--seq-len", "at least 2")),
    Row("activations-out-exists",
        lambda w, b: ["activations", f"--text-file={w.text}", "--hookpoint",
                      "layer_1/resid_post", f"--out={b}/file"],
        O, ("--out", "already exists", "--overwrite")),
    Row("activations-out-is-a-folder",
        lambda w, b: ["activations", f"--text-file={w.text}", "--hookpoint",
                      "layer_1/resid_post", f"--out={b}/empty"],
        O, ("--out", "is a folder")),
    Row("activations-binary-text",
        lambda w, b: ["activations", f"--text-file={w.binary}",
                      "--hookpoint", "layer_1/resid_post",
                      f"--out={b}/a.safetensors"],
        I, ("--text-file", "blob.txt", "not a UTF-8 text file")),
    Row("activations-missing-text",
        lambda w, b: ["activations", f"--text-file={b}/nope.txt",
                      "--hookpoint", "layer_1/resid_post",
                      f"--out={b}/a.safetensors"],
        I, ("--text-file", "nope.txt", "no such text file")),
    # --- generate (checked before the model runs)
    Row("generate-steer-bad-latent",
        lambda w, b: ["generate", "--prompt", "Hi", "--steer", "sae:abc+1"],
        U, ("--steer", "'abc'", "latent index")),
    Row("generate-steer-missing-dictionary",
        lambda w, b: ["generate", "--prompt", "Hi", f"--model={w.model}",
                      "--steer", f"{b}/nope:3+1"],
        I, ("nope",)),
    Row("generate-steer-width-does-not-fit",
        lambda w, b: ["generate", "--prompt", "Hi", f"--model={w.model}",
                      "--steer", f"{w.narrow}:layer_1/resid_post:0+4"],
        U, ("width 64", "width 32")),
    Row("generate-model-vocabulary-too-small",
        lambda w, b: ["generate", "--prompt", "Hi", f"--model={w.model}"],
        I, ("--model", "256 tokens", "262,144")),
    Row("generate-out-exists",
        lambda w, b: ["generate", "--prompt", "Hi", f"--out={b}/file"],
        O, ("--out", "already exists", "--overwrite")),
    Row("generate-out-is-a-folder",
        lambda w, b: ["generate", "--prompt", "Hi", f"--out={b}/empty"],
        O, ("--out", "is a folder")),
    Row("generate-top-p-zero",
        lambda w, b: ["generate", "--prompt", "Hi", "--temperature", "1",
                      "--top-p", "0"],
        U, ("--top-p", "top_p must be in (0, 1]")),
    Row("generate-system-without-chat",
        lambda w, b: ["generate", "--prompt", "Hi", "--system", "Be brief"],
        U, ("--system", "--chat")),
    Row("generate-max-new-tokens-zero",
        lambda w, b: ["generate", "--prompt", "Hi", "--max-new-tokens", "0"],
        U, ("--max-new-tokens", "positive integer, got 0")),
    # --- dashboard and serve
    Row("dashboard-out-holds-user-files",
        lambda w, b: ["dashboard", f"--dictionary={w.sae}", f"--out={b}/full"],
        O, ("--out", "not empty", "--overwrite")),
    Row("dashboard-out-is-a-file",
        lambda w, b: ["dashboard", f"--dictionary={w.sae}", f"--out={b}/file"],
        O, ("--out", "is a file")),
    Row("dashboard-hookpoint-not-in-model",
        lambda w, b: ["dashboard", f"--dictionary={w.sae}",
                      f"--model={w.model}", "--hookpoint=layer_9/resid_post",
                      f"--out={b}/site"],
        I, ("layer_9",)),
    Row("dashboard-width-does-not-fit",
        lambda w, b: ["dashboard", f"--dictionary={w.sae}",
                      f"--model={w.model}", f"--out={b}/site"],
        I, ("640", "32")),
    Row("dashboard-text-missing",
        lambda w, b: ["dashboard", f"--dictionary={w.sae}",
                      f"--text={b}/nope.txt", f"--out={b}/site"],
        I, ("--text", "nope.txt")),
    Row("dashboard-workdir-missing",
        lambda w, b: ["dashboard", f"--workdir={b}/nope", f"--out={b}/site"],
        I, ("nope",)),
    Row("serve-not-a-site",
        lambda w, b: ["serve", f"{b}/empty"],
        I, ("not a dashboard site",)),
    # --- attribute: flags and outputs (checked before the model loads)
    Row("attribute-out-exists",
        lambda w, b: _attribute(w, b, f"--out={b}/file"),
        O, ("--out", "already exists", "--overwrite")),
    Row("attribute-out-is-a-folder",
        lambda w, b: _attribute(w, b, f"--out={b}/empty"),
        O, ("--out", "is a folder")),
    Row("attribute-out-inside-a-file",
        lambda w, b: _attribute(w, b, f"--out={b}/file/g.json"),
        O, ("--out", "is a file")),
    Row("attribute-html-exists",
        lambda w, b: _attribute(w, b, f"--html={b}/file"),
        O, ("--html", "already exists", "--overwrite")),
    Row("attribute-html-is-a-folder",
        lambda w, b: _attribute(w, b, f"--html={b}/empty"),
        O, ("--html", "is a folder")),
    Row("attribute-html-is-the-out-file",
        lambda w, b: _attribute(w, b, f"--html={b}/g.json", "--overwrite"),
        U, ("--html", "the same file as --out")),
    Row("attribute-dashboard-without-html",
        lambda w, b: _attribute(w, b, f"--dashboard={b}/full"),
        U, ("--dashboard", "--html")),
    Row("attribute-dashboard-missing",
        lambda w, b: _attribute(w, b, f"--html={b}/g.html",
                                f"--dashboard={b}/nope"),
        I, ("--dashboard", "nope", "no such folder", "a URL")),
    Row("attribute-prompt-empty",
        lambda w, b: _attribute(w, b, "--prompt="),
        U, ("--prompt", "give some text")),
    Row("attribute-max-feature-nodes-zero",
        lambda w, b: _attribute(w, b, "--max-feature-nodes=0"),
        U, ("--max-feature-nodes", "positive integer, got 0")),
    Row("attribute-max-feature-nodes-negative",
        lambda w, b: _attribute(w, b, "--max-feature-nodes", "-3"),
        U, ("--max-feature-nodes", "positive integer, got -3")),
    Row("attribute-node-threshold-zero",
        lambda w, b: _attribute(w, b, "--node-threshold=0"),
        U, ("--node-threshold", "(0, 1]", "got 0.0")),
    Row("attribute-edge-threshold-above-one",
        lambda w, b: _attribute(w, b, "--edge-threshold=1.5"),
        U, ("--edge-threshold", "(0, 1]", "got 1.5")),
    Row("attribute-batch-size-zero",
        lambda w, b: _attribute(w, b, "--batch-size=0"),
        U, ("--batch-size", "positive integer, got 0")),
    # --- attribute: --dictionaries and --model (the tiny model)
    Row("attribute-dictionaries-missing",
        lambda w, b: _attribute(w, b, f"--dictionaries={b}/nope"),
        I, ("--dictionaries", "nope", "no such dictionary folder")),
    Row("attribute-dictionaries-holds-none",
        lambda w, b: _attribute(w, b, f"--dictionaries={b}/full"),
        I, ("--dictionaries", "full", "holds no dictionary folder")),
    Row("attribute-dictionaries-is-a-file",
        lambda w, b: _attribute(w, b, f"--dictionaries={b}/file"),
        I, ("--dictionaries", "file", "params.safetensors",
            "sae_weights.safetensors")),
    Row("attribute-dictionaries-empty",
        lambda w, b: _attribute(w, b, "--dictionaries=,"),
        U, ("--dictionaries", "give a folder")),
    Row("attribute-dictionaries-unknown-release",
        lambda w, b: _attribute(
            w, b, "--dictionaries=gemma-scope-2-270m-pt-transcoderz/"
            "layer_{L}_width_16k_l0_medium"),
        U, ("--dictionaries", "unknown release alias 'transcoderz'",
            "transcoders")),
    Row("attribute-dictionaries-not-transcoders",
        lambda w, b: _attribute(w, b, f"--dictionaries={w.narrow}"),
        I, ("--dictionaries", "narrow", "layer_1/resid_post",
            "layer_L/mlp_in")),
    Row("attribute-dictionaries-width-does-not-fit",
        lambda w, b: _attribute(w, b, f"--dictionaries={w.wide}"),
        I, ("--dictionaries", "wide", "64 -> 64", "32 -> 32")),
    Row("attribute-dictionaries-clt-does-not-fit",
        lambda w, b: _attribute(w, b, f"--dictionaries={w.clt}"),
        I, ("--dictionaries", "clt", "3 layers", "the model has 2")),
    Row("attribute-dictionaries-clt-and-transcoders",
        lambda w, b: _attribute(
            w, b, f"--dictionaries={w.clt},{w.transcoders}/layer_0"),
        U, ("--dictionaries", "one cross-layer transcoder")),
    Row("attribute-dictionaries-two-for-one-layer",
        lambda w, b: _attribute(
            w, b, f"--dictionaries={w.transcoders}/layer_0,"
            f"{w.transcoders}/layer_0"),
        U, ("--dictionaries", "two transcoders for layer 0")),
    Row("attribute-model-vocabulary-too-small",
        lambda w, b: _attribute(w, b),
        I, ("--model", "256 tokens", "262,144")),
    Row("attribute-model-missing",
        lambda w, b: _attribute(w, b, f"--model={b}/nope.gguf"),
        I, ("nope.gguf", "no such model")),
    # --- the command line itself
    Row("missing-required-flag", lambda w, b: ["train", CONFIG],
        U, ("--workdir",)),
    Row("unknown-command", lambda w, b: ["trian"], U, ("invalid choice",)),
    Row("unknown-flag",
        lambda w, b: ["export", f"--workdir={w.run}", "--format=saelens",
                      f"--out={b}/o", "--overwrit"],
        U, ("unrecognized arguments: --overwrit",)),
    Row("bad-format-choice",
        lambda w, b: ["export", f"--workdir={w.run}", "--format=sae",
                      f"--out={b}/o"],
        U, ("--format", "invalid choice")),
]


def _run(argv: list[str], capsys) -> tuple[int, str]:
  try:
    rc = cli.main(argv)
  except SystemExit as e:  # argparse
    rc = e.code
  return rc, capsys.readouterr().err


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input_gets_one_line_and_changes_nothing(row, world, tmp_path,
                                                     capsys):
  box = _sandbox(tmp_path)
  before = _tree(box, world.root)
  rc, err = _run(row.argv(world, box), capsys)
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == row.rc, err
  assert len(lines) == 1, err
  assert lines[0].startswith("gemscope"), err
  for s in row.says:
    assert s in lines[0], f"{s!r} not in {lines[0]!r}"
  assert _tree(box, world.root) == before


def test_every_checkpoint_unreadable_stops_unless_restart(world, tmp_path,
                                                          capsys):
  wd = tmp_path / "wd"
  shutil.copytree(world.run / "checkpoints", wd / "checkpoints")
  for f in (wd / "checkpoints").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])  # truncated, as by a full disk
  argv = ["train", CONFIG, f"--workdir={wd}", "--no-eval", "--quiet"]
  rc = cli.main(argv)
  out = capsys.readouterr()
  assert rc == R, out.err
  assert out.err.count("\n") == 1 and "--restart" in out.err
  warnings = [l for l in out.out.splitlines() if "unreadable" in l]
  assert len(warnings) == 2  # one line per checkpoint, no tracebacks
  assert sorted(p.name.split("-")[0] for p in (wd / "corrupt").iterdir()
                ) == ["16", "24"]  # kept, not deleted
  # Still refused on a rerun (the checkpoints are gone, corrupt/ is not).
  assert cli.main(argv) == R
  assert "starting again" not in capsys.readouterr().out


def test_export_refuses_then_overwrites_only_its_own(world, tmp_path,
                                                      capsys):
  box = _sandbox(tmp_path)
  user = _tree(box / "full")
  argv = ["export", f"--workdir={world.run}", "--format=saelens",
          f"--out={box}/full"]
  assert cli.main(argv) == O
  assert cli.main(argv + ["--overwrite"]) == 0
  held = sorted(p.name for p in (box / "full").iterdir())
  assert held == ["cfg.json", "sae_weights.safetensors", "sub", "user.txt"]
  assert {k: v for k, v in _tree(box / "full").items() if k in user} == user
  assert cli.main(argv + ["--overwrite"]) == 0  # a rerun replaces its own
  # A Gemma Scope 2 release root may hold other dictionaries; the same
  # dictionary folder twice is refused.
  rel = ["export", f"--workdir={world.run}", "--format=gemmascope2",
         f"--out={box}/full"]
  assert cli.main(rel) == 0
  assert cli.main(rel) == O
  assert "--overwrite" in capsys.readouterr().err.splitlines()[-1]
  assert {k: v for k, v in _tree(box / "full").items() if k in user} == user
  assert not [p for p in box.rglob(".*")]  # no temporaries left


def test_export_to_dot(world, tmp_path, monkeypatch, capsys):
  box = _sandbox(tmp_path)
  monkeypatch.chdir(box)
  before = _tree(box)
  argv = ["export", f"--workdir={world.run}", "--format=saelens", "--out=."]
  assert cli.main(argv) == O  # the user's folder is not empty
  assert _tree(box) == before  # and no stray hidden folder either
  monkeypatch.chdir(box / "empty")
  assert cli.main(argv) == 0
  assert sorted(os.listdir(".")) == ["cfg.json", "sae_weights.safetensors"]
  capsys.readouterr()


def test_export_model_overwrite_keeps_user_files(world, tmp_path):
  out = tmp_path / "hf"
  argv = ["export-model", f"--model={world.model}", f"--out={out}"]
  assert cli.main(argv) == 0
  assert cli.main(argv) == O
  (out / "README.md").write_text("mine")
  stale = out / "model-00001-of-00009.safetensors"  # an older sharded export
  stale.write_bytes(b"old")
  assert cli.main(argv + ["--overwrite"]) == 0
  assert sorted(p.name for p in out.iterdir()) == [
      "README.md", "config.json", "model.safetensors"]
  assert (out / "README.md").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path):
  with pytest.raises(errors.MissingInputError, match="no such training"):
    cli.main(["eval", f"--workdir={tmp_path}/nope", "--debug"])


def test_hints_name_python_arguments_outside_the_command_line(tmp_path):
  (tmp_path / "x").write_text("mine")
  with pytest.raises(errors.OutputError, match=r"overwrite=True"):
    save_hf(TINY_MODEL, models.init_params(
        TINY_MODEL, jax.random.key(0)), tmp_path)


def _killed(argv: list[str], target: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", KILL_ENV: target}
  return subprocess.run(GEMSCOPE + argv, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["export", "export-model", "activations"])
def test_killed_writer_leaves_no_output_and_rerun_cleans_up(
    command, world, tmp_path, capsys):
  box = _sandbox(tmp_path)
  user = _tree(box)
  argv = {
      "export": ["export", f"--workdir={world.run}", "--format=saelens",
                 f"--out={box}/new"],
      "export-model": ["export-model", f"--model={world.model}",
                       f"--out={box}/new", "--max-shard-mb=1"],
      "activations": ["activations", f"--text-file={world.text}",
                      "--hookpoint=layer_1/resid_post", "--max-tokens=64",
                      "--seq-len=32", f"--out={box}/new"],
  }[command]
  proc = _killed(argv, "new")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert not (box / "new").exists()  # nothing that looks finished
  stray = [p.name for p in box.iterdir() if p.name.startswith(".new.")]
  assert len(stray) == 1 and stray[0].endswith(".partial"), stray
  assert cli.main(argv) == 0
  assert (box / "new").exists()
  assert not [p for p in box.iterdir() if p.name.startswith(".")]
  after = _tree(box)
  assert {k: v for k, v in after.items() if k in user} == user
  capsys.readouterr()


def test_killed_dashboard_scan_resumes_to_the_same_site(world, tmp_path):
  """`gemscope dashboard` killed while scanning (its state saved after every
  chunk) leaves no site; the same command rerun continues the scan and
  writes the site an uninterrupted run writes."""
  import time
  from gemscope_jax import dashboards
  from gemscope_jax.dashboards import build
  argv = lambda out: ["dashboard", f"--workdir={world.run}",
                      f"--text={world.text}", "--num-tokens=2048",
                      "--seq-len=64", "--batch-size=2", "--k=5",
                      "--checkpoint-every=0", "--quiet", f"--out={out}"]
  out = tmp_path / "site"
  state = build.state_dir_for(out)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(GEMSCOPE + argv(out), cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while not list(state.glob("*.npz")) and time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    time.sleep(0.05)
  proc.kill()
  proc.wait()
  assert list(state.glob("*.npz")), "no scan state was saved"
  assert not out.exists()  # no site that looks complete
  assert cli.main(argv(out)) == 0
  assert not state.exists()  # cleaned up once the site is whole
  ref = tmp_path / "ref"
  assert cli.main(argv(ref)) == 0
  got, want = dashboards.read_site(out), dashboards.read_site(ref)
  assert got["meta"]["width"] == want["meta"]["width"] == 256
  for i in range(0, 256, 17):
    a, b = dashboards.read_latent(out, i), dashboards.read_latent(ref, i)
    assert a == b, i


def test_eval_workdir_honours_the_dictionary_flags(world, tmp_path, capsys):
  """`eval --workdir` with --num-tokens / --loss-tokens evaluates that many
  tokens (the flags are the run's eval fields, not accepted and
  ignored), and says so in metrics.json."""
  run = tmp_path / "run"
  shutil.copytree(world.run, run)
  got = {}
  for n in (256, 512):
    assert cli.main(["eval", f"--workdir={run}", f"--num-tokens={n}",
                     "--loss-tokens=64", "--quiet"]) == 0
    got[n] = json.loads((run / "metrics.json").read_text())
  capsys.readouterr()
  assert got[256]["num_tokens"] != got[512]["num_tokens"]
  assert 0 < got[256]["num_tokens"] <= 256 < got[512]["num_tokens"] <= 512
