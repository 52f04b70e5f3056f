"""Model surgery: dictionaries put into Gemma's forward pass as edits
(`models.EditFn` / `models.ReadingEdit`): SAE splices, transcoders in place
of MLPs, cross-layer replacement models, zero-ablations."""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "Member": "gemscope_jax.surgery.splice",
    "edit_args": "gemscope_jax.surgery.splice",
    "member_args": "gemscope_jax.surgery.splice",
    "member_edits": "gemscope_jax.surgery.splice",
    "predict": "gemscope_jax.surgery.splice",
    "splice_edit": "gemscope_jax.surgery.splice",
    "stacked_inputs": "gemscope_jax.surgery.splice",
}, submodules=("splice",))
