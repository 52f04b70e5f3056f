"""Training sparse dictionaries: configs read once into plans, the gradient
steps, the sharded loop with Orbax checkpoints, and the export at the end.

  from gemscope_jax.training import config, trainer
  c = config.load("experiments/jumprelu_270m.py:runlocal")
  metrics = trainer.train(c, "out/run")
"""

from gemscope_jax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "train": "gemscope_jax.training.trainer",
    "evaluate_workdir": "gemscope_jax.training.trainer",
}, submodules=("checkpoints", "config", "export", "grads", "trainer"))
