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
  # The dashboard scan and evals.latents are separate implementations of
  # the same statistics on the same windows.
  assert summary["dashboard_max"] == pytest.approx(
      summary["top_examples_max"], rel=1e-4)
  assert summary["dashboard_density"] == pytest.approx(
      summary["top_examples_frequency"], rel=1e-4, abs=1e-6)
  # The HTML of the top-activating snippets was rendered into the notebook.
  html = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if o.get("output_type") == "display_data"
          and "text/html" in o.get("data", {})]
  assert any("border-bottom" in o["data"]["text/html"] for o in html)
  pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if "image/png" in o.get("data", {})]
  assert pngs, "the frequency histogram was not drawn"


@pytest.mark.slow
def test_steering_notebook_runs_and_steers(tmp_path, monkeypatch):
  """The steering notebook picks a latent that fires on one word, and its
  edits do what they claim on the real 270M: coefficient 0 changes nothing,
  the row's logit-lens tokens gain probability with the coefficient, and the
  clamp shifts the residual stream by value - f where the addition shifts it
  by the coefficient."""
  import numpy as np
  from nbclient import NotebookClient
  path = ROOT / "colab" / "steering.ipynb"
  nb = nbformat.read(path, as_version=4)
  monkeypatch.setenv("GEMSCOPE_WORKDIR", str(tmp_path))
  monkeypatch.delenv("GEMSCOPE_DICTIONARY", raising=False)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  s = json.loads((tmp_path / "steering_summary.json").read_text())
  assert s["hookpoint"] == "layer_6/resid_post"
  # The chosen latent fires, on one word, in (nearly) all its top examples,
  # and on the last token of the prompt cut from its top example.
  assert s["agreement"] >= 6 and len(s["top_values"]) == s["k"] == 8
  assert min(s["top_values"]) > 0
  assert any(c.isalpha() for c in s["word"])
  assert s["latent_at_fire"] > 0
  # Coefficient 0 is the unsteered generation, token for token; the largest
  # coefficient changes it.
  assert s["coefs"][0] == 0 and len(s["coefs"]) >= 3
  assert s["coef0_identical"] is True
  assert s["texts"]["0"] == s["unsteered"]
  largest = s["texts"][f"{s['coefs'][-1]:g}"]
  assert sum(a != b for a, b in zip(largest, s["unsteered"])) >= 2
  # The logit-lens tokens of the row gain probability at every step of the
  # sweep (about 50x over it on the smoke SAE); the distribution moves away
  # from the unsteered one, not at all at 0.
  p, kl = np.asarray(s["promoted_prob"]), np.asarray(s["kl"])
  assert s["sweep"][0] == 0 and len(p) == len(kl) == len(s["sweep"]) >= 5
  assert np.all(np.diff(p) > 0), p
  assert p[-1] > 5 * p[0], p
  assert kl[0] <= 1e-6 and np.all(np.diff(kl) > 0) and kl[-1] > 0.1, kl
  # Recorded shifts along the row: coef everywhere for the addition,
  # value - f for the clamp, -f for the ablation (fp32 on ~3e3 norms).
  tol = 1e-3 * max(abs(s["clamp_value"]), 1.0)
  assert s["add_shift_error"] <= tol
  assert s["clamp_shift_error"] <= tol
  assert s["ablate_shift_error"] <= tol
  # So the two differ by f where the latent fires (the prompt's last token
  # at least), and that moves the next token's distribution.
  assert s["fires_at"] and s["latent_at_fire"] > 0.1 * abs(s["clamp_value"])
  assert s["clamp_vs_add_kl"] > 1e-3
  # What the notebook shows: the highlighted examples, the tables, the plot.
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  html = [o["data"]["text/html"] for o in outputs
          if "text/html" in o.get("data", {})]
  assert any("border-bottom" in h for h in html)
  assert sum("<table" in h for h in html) >= 3
  assert any("image/png" in o.get("data", {}) for o in outputs)
