"""Released dictionaries in foreign formats: Gemma Scope 2 and SAELens.

Every reader returns, and every writer takes, one `InferenceDictionary`
(raw-unit arrays and the encode/decode they define); `as_module` turns it
into one of our Flax modules for `training.evaluate`, and
`from_state`/`from_workdir` produce it from a training run.

Caveat: writers refuse non-finite weights and write atomically (a folder
built beside the destination, then renamed), but they replace an existing
destination folder whole.
"""

from __future__ import annotations

from gemscope_jax.interop._inference import (FormatError, InferenceDictionary,
                                             as_module)
from gemscope_jax.interop.gemmascope2 import (folder_name, load_gemmascope2,
                                              save_gemmascope2)
from gemscope_jax.interop.load import (detect_format, evaluate_dictionary,
                                       load_dictionary)
from gemscope_jax.interop.multilayer import (MultiLayerInference,
                                             load_multilayer_gemmascope2,
                                             save_multilayer_gemmascope2)
from gemscope_jax.interop.saelens import load_saelens, save_saelens
from gemscope_jax.interop.workdir import from_state, from_workdir

FORMATS = {"gemmascope2": save_gemmascope2, "saelens": save_saelens}

__all__ = [
    "FORMATS", "FormatError", "InferenceDictionary", "as_module",
    "detect_format", "evaluate_dictionary", "folder_name", "from_state",
    "from_workdir", "load_dictionary", "load_gemmascope2", "load_saelens",
    "save_gemmascope2", "save_saelens", "MultiLayerInference",
    "load_multilayer_gemmascope2", "save_multilayer_gemmascope2",
]
