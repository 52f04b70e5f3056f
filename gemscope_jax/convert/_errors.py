"""The one error type every loader raises for a file it cannot use."""

from __future__ import annotations

import os


class CheckpointError(ValueError):
  """A checkpoint file is unreadable or does not fit the model.

  The message names the file, the tensor or field at fault, and why.
  """

  def __init__(self, source: str | os.PathLike, item: str | None,
               problem: str):
    self.source = str(source)
    self.item = item
    self.problem = problem
    where = f"{self.source}: {item}" if item else self.source
    super().__init__(f"{where}: {problem}")
