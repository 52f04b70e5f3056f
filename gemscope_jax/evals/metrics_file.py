"""Evaluation metrics written as strict JSON (`metrics.json`).

Keys become strings, numpy scalars Python numbers, and non-finite floats
(an undefined fvu or loss_recovered is NaN) become null, so any JSON reader
accepts the file. It is written under a temporary name and renamed.

Caveat: only top-level values are converted: null stands for NaN and
+/-inf alike there, while a non-finite float or numpy value nested in a
list or dict raises.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from gemscope_jax import assets


def _plain(value: Any) -> Any:
  # Strict JSON: numpy scalars to Python numbers, NaN/inf to null.
  if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
    return int(value)
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  return value


def write_metrics(metrics: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes `metrics` as JSON (NaN as null) under a temporary name, renamed.

  Args:
    metrics: {name: value}; top-level numbers are made plain (see the
      module docstring).
    path: the file to write (sorted keys, 2-space indent).
  """
  plain = {str(k): _plain(v) for k, v in metrics.items()}
  with assets.atomic_path(path) as tmp:
    tmp.write_text(json.dumps(plain, indent=2, sort_keys=True,
                              allow_nan=False) + "\n", encoding="utf-8")
