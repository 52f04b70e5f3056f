"""Held-out evaluation of any dictionary, trained or imported: L0, FVU,
dead/dense latents, LM loss spliced in against clean and zeroed, and the
top-activating examples of latents.

The one-dictionary `evaluate` function is reached as
`evals.evaluate.evaluate` (the name `evaluate` here is its module)."""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "evaluate_dictionary": "gemscope_jax.evals.dictionary",
    "plot_frequency_histogram": "gemscope_jax.evals.histogram",
    "TopExamples": "gemscope_jax.evals.latents",
    "render_html": "gemscope_jax.evals.latents",
    "save_html": "gemscope_jax.evals.latents",
    "top_examples": "gemscope_jax.evals.latents",
    "EvalResult": "gemscope_jax.evals.members",
    "evaluate_members": "gemscope_jax.evals.members",
    "write_metrics": "gemscope_jax.evals.metrics_file",
    "MemberStats": "gemscope_jax.evals.reconstruction",
}, submodules=("dictionary", "evaluate", "histogram", "latents", "members",
                "metrics_file", "reconstruction"))
