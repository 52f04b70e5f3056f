"""Runs circuit-tracer 0.5.0's `attribute` as the anchor for our attribution.

Run only with the interpreter of the separate environment that
`scripts/circuit_tracer_env.sh` builds (`.venv-circuit-tracer/bin/python`);
neither pytest nor gemscope_jax is ever imported here. Data crosses the
process boundary through files: a JSON spec in, one .npz per run out, and
one JSON line per run on stdout.

Subcommands:
  tokenizer SPM OUT [TEXT ...]
      writes a `GemmaTokenizerFast` folder built from the project's
      SentencePiece file SPM (`Tokenizer.save`) to OUT, with the whitespace-
      run pieces marked normalized=True (DESIGN.md section 8: otherwise runs
      of spaces tokenize differently from SentencePiece); prints the ids of
      each TEXT as JSON.
  attribute SPEC.json
      SPEC = {"model": folder from `gemscope export-model`,
              "tokenizer": a folder from the subcommand above,
              "transcoders": a folder holding either circuit-tracer's local
                format (config.yaml + layer_{i}.safetensors) or one Gemma
                Scope 2 params folder per layer (layer_{i}/params.safetensors),
              "runs": [{"tokens": [ids, BOS first], "max_feature_nodes":
                int or null (every active feature), "batch_size": int,
                "out": path of the .npz}]}
      loads the model once (nnsight backend, float32, CPU), then runs
      `circuit_tracer.attribute` per run and saves:
        adjacency (n, n) float32 [target, source], circuit-tracer's node order
          (selected features, L x T error nodes layer-major, T token nodes,
          logits);
        active_features (n_active, 3) (layer, pos, feature idx) and
          activation_values; selected (indices into active_features) and
          selected_features (n_selected, 3); n_active;
        logit_tokens, logit_probabilities;
        error_layer, error_pos (L * T,), token_pos (T,): the node layout;
        tokens; wall_s (the attribute call alone); peak_rss_gb (this
          process's ru_maxrss after the run: it never goes down, so a later
          run in the same process reports at least an earlier one's).

Everything runs with HF_HUB_OFFLINE=1: local paths only.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SPACE = "\u2581"  # SentencePiece's word-boundary mark


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_tokenizer(spm: str, out: str) -> None:
  """A GemmaTokenizerFast folder from a SentencePiece file (see module
  docstring)."""
  from transformers import GemmaTokenizerFast  # pylint: disable=import-outside-toplevel
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="ct-tok-"))
  GemmaTokenizerFast(vocab_file=spm, add_bos_token=True).save_pretrained(
      str(tmp))
  path = tmp / "tokenizer.json"
  spec = json.loads(path.read_text())
  # SentencePiece matches its user-defined whitespace pieces inside the
  # normalized text (spaces already replaced by the mark); as added tokens
  # that are not `normalized` they would be looked for in the raw text.
  for token in spec["added_tokens"]:
    if len(token["content"]) > 1 and set(token["content"]) == {_SPACE}:
      token["normalized"] = True
  path.write_text(json.dumps(spec, ensure_ascii=False))
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for f in tmp.iterdir():
    os.replace(f, out / f.name)
  tmp.rmdir()


def _model_folder(model: str, tokenizer: str) -> str:
  """A folder holding both the model's and the tokenizer's files.

  `NNSightReplacementModel.from_pretrained_and_transcoders` loads the
  tokenizer from the model's own name and passes no tokenizer through, so
  the two are joined by symlinks in a temporary folder.
  """
  joined = pathlib.Path(tempfile.mkdtemp(prefix="ct-model-"))
  atexit.register(shutil.rmtree, joined, ignore_errors=True)
  for source in (pathlib.Path(tokenizer), pathlib.Path(model)):
    for f in source.iterdir():
      link = joined / f.name
      if link.exists():
        link.unlink()
      link.symlink_to(f.resolve())
  return str(joined)


def load_transcoders(folder: str, n_layers: int):
  """circuit-tracer's TranscoderSet from either layout (module docstring)."""
  import yaml  # pylint: disable=import-outside-toplevel
  from circuit_tracer.transcoder import load_transcoder_set  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(folder)
  if (folder / "config.yaml").is_file():
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    paths = {i: str(folder / f"layer_{i}.safetensors")
             for i in range(n_layers)}
    return load_transcoder_set(
        paths, scan=cfg.get("scan", folder.name),
        feature_input_hook=cfg["feature_input_hook"],
        feature_output_hook=cfg["feature_output_hook"],
        lazy_encoder=False, lazy_decoder=False)
  paths = {i: str(folder / f"layer_{i}" / "params.safetensors")
           for i in range(n_layers)}
  return load_transcoder_set(
      paths, scan=folder.name, feature_input_hook="mlp.hook_in",
      feature_output_hook="hook_mlp_out", special_load_fn="gemma-scope-2",
      lazy_encoder=False, lazy_decoder=False)


def _save(graph, n_layers: int, wall: float, out: str) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  tokens = graph.input_tokens.cpu().numpy()
  T = len(tokens)
  active = graph.active_features.cpu().numpy().astype(np.int64)
  selected = graph.selected_features.cpu().numpy().astype(np.int64)
  ll, pp = np.meshgrid(np.arange(n_layers), np.arange(T), indexing="ij")
  logit_tokens = np.asarray([t.vocab_idx for t in graph.logit_targets],
                            np.int64)
  report = {"n_active": int(len(active)), "n_selected": int(len(selected)),
            "n_logits": int(len(logit_tokens)), "tokens": int(T),
            "wall_s": wall, "peak_rss_gb": _peak_rss_gb()}
  np.savez(
      out, adjacency=graph.adjacency_matrix.cpu().numpy().astype(np.float32),
      active_features=active,
      activation_values=graph.activation_values.cpu().numpy().astype(
          np.float32),
      selected=selected, selected_features=active[selected],
      n_active=report["n_active"], logit_tokens=logit_tokens,
      logit_probabilities=graph.logit_probabilities.cpu().numpy().astype(
          np.float32),
      error_layer=ll.ravel(), error_pos=pp.ravel(), token_pos=np.arange(T),
      tokens=tokens.astype(np.int64), wall_s=wall,
      peak_rss_gb=report["peak_rss_gb"])
  return report


def attribute(spec_path: str) -> None:
  """The `attribute` subcommand (module docstring)."""
  import torch  # pylint: disable=import-outside-toplevel
  from circuit_tracer import ReplacementModel, attribute as ct_attribute  # pylint: disable=import-outside-toplevel
  from transformers import AutoConfig  # pylint: disable=import-outside-toplevel
  spec = json.loads(pathlib.Path(spec_path).read_text())
  t0 = time.perf_counter()
  folder = _model_folder(spec["model"], spec["tokenizer"])
  n_layers = AutoConfig.from_pretrained(folder).num_hidden_layers
  transcoders = load_transcoders(spec["transcoders"], n_layers)
  model = ReplacementModel.from_pretrained_and_transcoders(
      folder, transcoders, backend="nnsight", device=torch.device("cpu"),
      dtype=torch.float32)
  load_s = time.perf_counter() - t0
  for run in spec["runs"]:
    tokens = torch.tensor(run["tokens"], dtype=torch.long)
    start = time.perf_counter()
    graph = ct_attribute(tokens, model,
                         max_feature_nodes=run.get("max_feature_nodes"),
                         batch_size=int(run.get("batch_size", 512)))
    wall = time.perf_counter() - start
    if graph.input_tokens.tolist() != run["tokens"]:
      raise SystemExit("circuit-tracer changed the tokens: "
                       f"{graph.input_tokens.tolist()[:8]}...")
    report = _save(graph, n_layers, wall, run["out"])
    report["load_s"] = load_s
    print(json.dumps(report), flush=True)


def main(argv: list[str]) -> None:
  if len(argv) >= 3 and argv[0] == "tokenizer":
    build_tokenizer(argv[1], argv[2])
    from transformers import GemmaTokenizerFast  # pylint: disable=import-outside-toplevel
    tok = GemmaTokenizerFast.from_pretrained(argv[2])
    print(json.dumps([tok(t).input_ids for t in argv[3:]]), flush=True)
  elif len(argv) == 2 and argv[0] == "attribute":
    attribute(argv[1])
  else:
    raise SystemExit(__doc__)


if __name__ == "__main__":
  main(sys.argv[1:])
