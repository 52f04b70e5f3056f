"""Shared fixtures. Real-model fixtures are session-scoped: loading costs
tens of seconds, so every test that needs the real Gemma 3 270M shares one."""

from __future__ import annotations

import ctypes
import gc
import os
import pathlib

import numpy as np
import pytest

# Tests run on the CPU; keep XLA from grabbing every core for one op.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Test modules that start several Gemma processes of their own (two of
# 4.6 GB each at once): run first, while this process is small. Late in
# the suite the session fixtures and compiled programs hold 8-10 GB here,
# and on a 24 GB machine the three together came within 5 GB of the limit.
_SPAWNING_FIRST = ("test_multihost.py",)


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.path.name not in _SPAWNING_FIRST)


@pytest.fixture(scope="module", autouse=True)
def _return_freed_memory():
  """After each test module, hand the memory its tests freed back to the
  system (glibc keeps freed heap pages mapped otherwise): the suite runs
  in one process next to tests that start Gemma in subprocesses, and on a
  24 GB machine the parent's high-water mark is what they compete with."""
  yield
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


@pytest.fixture(scope="session")
def real_model():
  """(config, params) of the real Gemma 3 270M, float32, as jax arrays."""
  from gemscope_jax.convert import pretrained
  return pretrained.load_model("default")


@pytest.fixture(scope="session")
def real_gguf_path():
  from gemscope_jax import assets
  return assets.default_gguf_path()


@pytest.fixture(scope="session")
def hf_real_model(real_gguf_path):
  """transformers' own Gemma3ForCausalLM read from the same GGUF, float32."""
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(real_gguf_path.parent), gguf_file=real_gguf_path.name,
      dtype=torch.float32, attn_implementation="eager")
  return model.eval()


@pytest.fixture(scope="session")
def real_text_tokens():
  """(tokens, mask): 4 windows of 64 real English tokens, BOS first, the
  last window right-padded, from Shakespeare and the Python docs."""
  from gemscope_jax import text
  from gemscope_jax.text.tokenizer import default_tokenizer
  tok = default_tokenizer()
  texts = [text.read_text(text.shakespeare_files()[:1])[5000:7000],
           text.read_text(text.shakespeare_files()[7:8])[20000:22000]]
  if text.available("python_docs"):
    texts.append(text.read_text(text.python_doc_files()[40:41])[:2000])
  else:
    texts.append(text.read_text(text.shakespeare_files()[12:13])[9000:11000])
  texts.append("The capital of France is Paris. It lies on the Seine.")
  t = 64
  tokens = np.zeros((len(texts), t), np.int32)
  for i, text in enumerate(texts):
    ids = tok.encode(text)[:t]
    tokens[i, :len(ids)] = ids
  return tokens, tokens != 0
