"""The colab/ notebooks run top to bottom on CPU, and none is committed stale.

Each notebook is executed by nbclient in a fresh kernel of this Python (the
project's .venv), in a temporary directory; the explore notebook trains its
small SAE there, then writes a summary whose numbers this test checks: the
pure-PyTorch export must encode like the JAX dictionary.
"""

from __future__ import annotations

import json
import os
import pathlib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
  """Outputs are produced by running, never stored: nothing can go stale."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"{path.name} cell {i} has stored outputs"
      assert cell.execution_count is None, f"{path.name} cell {i}"


@pytest.mark.slow
def test_explore_notebook_runs_and_torch_matches_jax(tmp_path, monkeypatch):
  from nbclient import NotebookClient
  path = ROOT / "colab" / "explore_gemma3_270m.ipynb"
  nb = nbformat.read(path, as_version=4)
  monkeypatch.setenv("GEMSCOPE_WORKDIR", str(tmp_path))
  monkeypatch.delenv("GEMSCOPE_DICTIONARY", raising=False)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  summary = json.loads((tmp_path / "notebook_summary.json").read_text())
  assert summary["hookpoint"] == "layer_6/resid_post"
  assert summary["d_sae"] == 1024
  # fp32 rounding of two independent encoders on the same activations.
  assert summary["max_abs_diff"] <= 1e-5 * max(summary["max_latent"], 1.0)
  assert summary["active_agreement"] > 0.999
  assert 0 <= summary["silent_fraction"] < 1
  assert len(summary["picked_latents"]) == 4
  # The HTML of the top-activating snippets was rendered into the notebook.
  html = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if o.get("output_type") == "display_data"
          and "text/html" in o.get("data", {})]
  assert any("border-bottom" in o["data"]["text/html"] for o in html)
  pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if "image/png" in o.get("data", {})]
  assert pngs, "the frequency histogram was not drawn"
