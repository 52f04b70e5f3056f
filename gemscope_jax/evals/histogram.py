"""The firing-frequency histogram of a dictionary's latents, as a PNG.

Frequencies come from `EvalResult.frequency` (or `TopExamples.frequency`):
the fraction of eval tokens on which each latent fired. The x axis is
log10 frequency, so dead latents (frequency 0) cannot be drawn and are
counted in an annotation instead.

Caveat: matplotlib is imported only when a histogram is drawn (it costs
about a second), through its Agg canvas, so no display or pyplot state is
touched.
"""

from __future__ import annotations

import math
import os

import numpy as np

from gemscope_jax import assets


def plot_frequency_histogram(freq, path: str | os.PathLike, *, title: str,
                             dense_threshold: float = 0.1) -> None:
  """Writes a PNG histogram of log10 firing frequency of the live latents.

  Dead latents (frequency 0, no logarithm) are counted in an annotation, and
  the dense threshold is drawn as a dashed line. The file is written under a
  temporary name and renamed into place.

  Args:
    freq: per-latent firing frequencies (any shape; flattened).
    path: the PNG to write.
    title: the plot's title.
    dense_threshold: frequency above which a latent counts as dense.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel  (optional: matplotlib)
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel  (optional: matplotlib)
  freq = np.asarray(freq, np.float64)
  live = freq[freq > 0]
  fig = Figure(figsize=(6.4, 4.0), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if live.size:
    ax.hist(np.log10(live), bins=50, color="tab:blue")
  ax.axvline(math.log10(dense_threshold), color="tab:red", linestyle="--",
             label=f"dense > {dense_threshold:g}")
  dead = int(freq.size - live.size)
  ax.text(0.02, 0.95, f"dead: {dead} / {freq.size} "
          f"({dead / max(freq.size, 1):.1%})", transform=ax.transAxes,
          va="top", ha="left",
          bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "gray"})
  ax.set_xlabel("log10 firing frequency")
  ax.set_ylabel("latents")
  ax.set_title(title)
  ax.legend(loc="upper right")
  fig.tight_layout()
  with assets.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png")
