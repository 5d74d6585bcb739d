"""The one error type users see: a bad input file, printed as a single line by the CLI."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """A user-supplied file is missing, unreadable, of the wrong kind, or holds no usable face.

    The CLI prints ``error: <path>: <problem>`` and exits with status 2, without a traceback.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class NoFaceError(InputError):
    """No face was found in an image or in any frame of a video."""
