"""Gemma 3 text decoder in Flax: configs, the module, and jitted entry points."""

from gemscope_jax.models import hooks
from gemscope_jax.models._api import (EditFn, Gemma3Output, ReadingEdit,
                                      abstract_params,
                                      count_params, forward, init_params,
                                      next_token_loss)
from gemscope_jax.models._config import (CONFIGS, AttentionKind, Gemma3Config,
                                         Gemma3_1B, Gemma3_4B, Gemma3_12B,
                                         Gemma3_27B, Gemma3_270M, get_config)
from gemscope_jax.models._transformer import Gemma3
from gemscope_jax.models.hooks import SITES, Hookpoint

__all__ = [
    "AttentionKind", "CONFIGS", "EditFn", "ReadingEdit", "Gemma3", "Gemma3Config",
    "Gemma3Output", "Gemma3_1B", "Gemma3_4B", "Gemma3_12B", "Gemma3_27B",
    "Gemma3_270M", "Hookpoint", "SITES", "abstract_params", "count_params",
    "forward", "get_config", "hooks", "init_params", "next_token_loss",
]
