"""The one error type every loader raises for a file it cannot use."""

from __future__ import annotations

import os

from gemscope_jax import errors


class CheckpointError(errors.InputError):
  """A checkpoint file is unreadable or does not fit the model.

  The message names the file, the tensor or field at fault, and why. An
  `errors.InputError` (a ValueError): exit code 3 on the command line.
  """

  def __init__(self, source: str | os.PathLike, item: str | None,
               problem: str):
    self.source = str(source)
    self.item = item
    self.problem = problem
    where = f"{self.source}: {item}" if item else self.source
    super().__init__(f"{where}: {problem}")
