"""The scripts in examples/ on the real model: each is loaded from its file
(they are not part of the package) and its function checked against the
library."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from gemscope_jax import models
from gemscope_jax.text.tokenizer import default_tokenizer
from gemscope_jax.text.windows import windows_from_files

pytestmark = pytest.mark.slow

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
  """The module examples/{name}.py, imported from its file."""
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_activation_tour_reports_the_models_own_loss(tmp_path, real_model):
  tour = _load("activation_tour")
  config, params = real_model
  stats = tour.run(max_tokens=256, seq_len=64, batch_size=4,
                   out_dir=str(tmp_path))
  files = stats["files"]
  windows = windows_from_files(default_tokenizer(), files, 64, 256)
  direct = models.forward(params, windows.tokens, windows.mask, config=config)
  assert stats["loss"] == pytest.approx(float(direct.loss), rel=1e-4)
  assert " question" in [t for t, _ in
                         stats["predictions"]["To be, or not to be, that is the"]]
  assert (tmp_path / "activation_norms.png").stat().st_size > 10_000
  norms = [r["resid_norm_mean"] for r in stats["layers"]]
  # The residual stream grows through the network: every block adds its
  # attention and MLP outputs to it, and Gemma 3's norms grow by more than
  # an order of magnitude from the first layer to the last.
  assert norms[-1] > 20 * norms[0]
