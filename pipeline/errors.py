"""Errors the user can act on.

Anything raised as a :class:`PipelineError` is printed by the CLIs as one paragraph, without a
traceback (unless ``--debug``): the message must say what went wrong and what to do next.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix (bad recipe, missing upstream stage, bad data, ...)."""


class DataError(PipelineError):
    """A problem in an input data file; the message names the file and, where known, the line."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line
