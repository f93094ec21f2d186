"""Errors the engine raises on purpose (everything else is a bug and propagates as is)."""

from __future__ import annotations


class SystemicFailureError(RuntimeError):
    """The run cannot make progress: every evaluation fails the same way (bad key, unknown model, ...).

    dspy.GEPA scores such failures as ``failure_score`` and "succeeds" with the seed program; we stop
    early instead, naming the cause, so no budget is burnt on a broken setup.
    """

    def __init__(self, message: str, *, failure: str | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.failure = failure
        self.error_type = error_type


class RunInterruptedError(RuntimeError):
    """The run was stopped and its in-flight work cancelled before the seed program's validation
    finished, so there is no evaluated program to return. Evaluations that did finish were reported
    to the observers (and so kept by a run store: a resumed run does not pay for them again)."""
