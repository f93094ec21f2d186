"""Say what broke once per kind of problem; the rest goes to DEBUG and the counters.

Why a module: a failing server, disk, metric or proposer fails the same way on every call, and each
layer that meets it (the evaluator's retries, the proposer, the reflective datasets, the run store)
would otherwise log one line per call. They log from worker threads, hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable


class FirstOfKind:
    """Which kinds of problem have been reported already."""

    def __init__(self) -> None:
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()

    def first(self, kind: Hashable) -> bool:
        """True the first time ``kind`` is asked about, False ever after."""
        with self._lock:
            if kind in self._seen:
                return False
            self._seen.add(kind)
            return True
