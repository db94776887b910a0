"""The one error type the recipes raise for bad input: a flag, a folder, a data file, a checkpoint.

The CLI prints an :class:`InputError` as one line, ``eggroll: error: <message>``, and exits 2
(``--debug`` adds the traceback). A message names the value received and what was expected,
in a single line; anything else that goes wrong is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input to a recipe, explained in one line (a ``ValueError``, as torch.optim raises)."""
