"""`gemscope dashboard`: scan a dictionary over text and write its site.

`build_site` is the whole job: the destination is checked first (an
existing non-empty folder is refused unless `overwrite`), then the text is
read into windows, the scan runs with its state in a hidden folder beside
the destination (`.SITE.scan/`), so a killed job rerun with the same
arguments continues where it stopped, and the site is written atomically;
the scan state is removed once the site is complete.

Memory (peak RSS, GB = 2^30 bytes): the caller's model (Gemma 3 270M in
float32: 0.77 GB with the 7 blocks a layer-6 SAE needs, 1.0 GB whole),
Python, JAX and the tokenizer (0.2 GB), the compiled steps and XLA's
buffers (about 0.3 GB), pass 2's temporaries (0.15 GB at 4096 latents)
and the per-latent buffers; pass 1's activations wait for pass 2 in a
file in the state folder, not in memory. 262,144 tokens x 4096 latents
peak at 1.47 GB (2.65 GB before issue 16's changes; the `scan` module
docstring says where it went, benchmarks/dashboard_vs_saedashboard.py
records the runs).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time
from typing import Any

import jax.numpy as jnp

from gemscope_jax import errors, safe_write
from gemscope_jax.dashboards import records as records_lib
from gemscope_jax.dashboards import scan as scan_lib
from gemscope_jax.dashboards import site as site_lib
from gemscope_jax.text.corpora import text_files
from gemscope_jax.text.windows import windows_from_files


def state_dir_for(out: str | os.PathLike) -> pathlib.Path:
  """Where the scan of a site bound for `out` keeps its resumable state."""
  out = pathlib.Path(out).absolute()
  return out.parent / f".{out.name}.scan"


def build_site(dictionary: Any, out: str | os.PathLike, *, config, params,
               tokenizer, text: str = "english_heldout",
               num_tokens: int = 262_144, seq_len: int = 128,
               batch_size: int = 16, k: int = 20, hookpoint: str | None = None,
               dtype=jnp.float32, title: str | None = None,
               overwrite: bool = False, progress: bool = True,
               model_name: str = "", save_every_s: float = 300.0
               ) -> dict[str, Any]:
  """Scans `dictionary` over `num_tokens` of `text` and writes the site.

  Args:
    dictionary: an `interop.InferenceDictionary` or `MultiLayerInference`.
    out: the site folder.
    config, params, tokenizer: the model. `params` may hold only the
      blocks the scan needs (`scan.blocks_needed(dictionary, hookpoint)`
      of them, as `convert.pretrained.load_model(..., num_blocks=)` loads
      them and `gemscope dashboard` does).
    text: a corpus name or files (`text.corpora.text_files`).
    num_tokens, seq_len: how much text, in BOS-led windows of this length.
    batch_size: windows per scan chunk.
    k: top examples per latent.
    hookpoint: where the dictionary reads, if its config does not say.
    dtype: Gemma's compute dtype.
    title: the site's title.
    overwrite: replace a site already at `out` (only its own files).
    progress: progress bars.
    model_name: how the pages name the model.
    save_every_s: seconds between saves of the scan's state.

  Returns:
    {"out", "width", "tokens", "dead", "scan_s", "write_s"}.
  """
  flag = errors.option("out", "--out")
  safe_write.check_dir_output(out, overwrite=overwrite, flag=flag)
  files = text_files(text, errors.option("text", "--text"))
  windows = windows_from_files(tokenizer, files, seq_len, num_tokens)
  if windows.tokens.size == 0:
    raise errors.InputError(f"{errors.option('text', '--text')} {text}: no "
                            "tokens to scan")
  state = state_dir_for(out)
  t0 = time.perf_counter()
  result = scan_lib.scan(config, params, dictionary, windows, tokenizer,
                         hookpoint=hookpoint, k=k, batch_size=batch_size,
                         dtype=dtype, progress=progress, state_dir=state,
                         save_every_s=save_every_s)
  t1 = time.perf_counter()
  meta, recs = records_lib.records(result, windows, tokenizer, title=title,
                                   text_source=text)
  if model_name:
    meta["model"] = model_name
  path = site_lib.write_site(out, meta, recs, overwrite=overwrite, flag=flag)
  shutil.rmtree(state, ignore_errors=True)
  return {"out": str(path), "width": result.width,
          "tokens": result.num_tokens,
          "dead": int((result.count == 0).sum()),
          "scan_s": t1 - t0, "write_s": time.perf_counter() - t1}
