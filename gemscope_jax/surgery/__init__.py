"""Model surgery: dictionaries put into Gemma's forward pass as edits
(`models.EditFn` / `models.ReadingEdit` / `models.ContextEdit`): SAE
splices, transcoders in place of MLPs, cross-layer replacement models,
zero-ablations (`splice`); steering along directions and latents, latent
clamps and ablations (`steer`), and the `--steer` spec (`steer_spec`)."""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "Member": "gemscope_jax.surgery.splice",
    "edit_args": "gemscope_jax.surgery.splice",
    "member_args": "gemscope_jax.surgery.splice",
    "member_edits": "gemscope_jax.surgery.splice",
    "predict": "gemscope_jax.surgery.splice",
    "splice_edit": "gemscope_jax.surgery.splice",
    "stacked_inputs": "gemscope_jax.surgery.splice",
    "AddDirection": "gemscope_jax.surgery.steer",
    "AddLatent": "gemscope_jax.surgery.steer",
    "ClampLatents": "gemscope_jax.surgery.steer",
    "Positions": "gemscope_jax.surgery.steer",
    "ablate": "gemscope_jax.surgery.steer",
    "as_positions": "gemscope_jax.surgery.steer",
    "dictionary_hookpoints": "gemscope_jax.surgery.steer",
    "steering_edits": "gemscope_jax.surgery.steer",
    "SteerSpec": "gemscope_jax.surgery.steer_spec",
    "load_interventions": "gemscope_jax.surgery.steer_spec",
    "load_steer_source": "gemscope_jax.surgery.steer_spec",
    "parse_steer": "gemscope_jax.surgery.steer_spec",
    "to_intervention": "gemscope_jax.surgery.steer_spec",
}, submodules=("splice", "steer", "steer_spec"))
