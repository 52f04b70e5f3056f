"""Training and evaluating sparse dictionaries: configs, the sharded loop,
Orbax checkpoints and held-out evaluation.

  from gemscope_jax.training import config, trainer
  c = config.load("experiments/jumprelu_270m.py:runlocal")
  metrics = trainer.train(c, "out/run")
"""
