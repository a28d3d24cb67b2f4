"""The coordinator's one exception: the run cannot go on."""
from __future__ import annotations


class RunFailed(RuntimeError):
    """The run cannot continue (no clients, too few replies after every attempt). ``resumable``
    failures (the run directory could not be written) leave the clients waiting for a resume."""

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable
