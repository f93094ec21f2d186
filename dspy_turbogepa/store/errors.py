"""The run store's errors, and the one piece of advice most of them end with."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["START_OVER", "RunStoreError", "RunStoreMismatchError"]

#: How to start over when a store cannot be used (formatted with ``log_dir``).
START_OVER = ("Use a new log_dir, or delete {log_dir}/run.sqlite3* (the database and its -wal/-shm files) to "
              "start over.")


class RunStoreError(OSError):
    """The run store cannot be opened or written (unwritable ``log_dir``, corrupt file, disk full...)."""


class RunStoreMismatchError(ValueError):
    """``log_dir`` holds a different run (another dataset, program, seed or configuration)."""

    def __init__(self, message: str, *, changed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.changed = tuple(changed)
