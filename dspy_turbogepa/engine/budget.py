"""Metric-call budget with reservations, so the limit is never exceeded and launches are reproducible.

A metric call is one program execution plus its metric on one example, as dspy.GEPA counts. A cache
hit executes nothing and costs nothing. Each mutation reserves its worst case when it is launched and
releases the reservation when its result is committed; the real count of executions can therefore
never pass the limit, however many mutations run at once.

Launch decisions use a count that does not depend on timing: an (candidate, example) pair is charged
to the first *committed* mutation that asked for it. Real executions are counted separately for
reporting.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable


class MetricBudget:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the metric-call budget must be >= 1, got {limit}")
        self.limit = limit
        self._charged: set[Hashable] = set()
        self._reserved = 0
        #: Program executions that actually happened (each one a metric call).
        self.executed = 0

    @property
    def committed(self) -> int:
        """Metric calls charged to committed work (deterministic)."""
        return len(self._charged)

    @property
    def reserved(self) -> int:
        return self._reserved

    def remaining(self) -> int:
        return self.limit - self.committed - self._reserved

    def try_reserve(self, amount: int) -> bool:
        if amount <= self.remaining():
            self._reserved += amount
            return True
        return False

    def release(self, amount: int) -> None:
        if amount > self._reserved:
            raise RuntimeError("releasing more budget than reserved")
        self._reserved -= amount

    def is_charged(self, key: Hashable) -> bool:
        return key in self._charged

    def commit(self, keys: Iterable[Hashable]) -> int:
        """Charge the pairs a committed mutation asked for; returns how many were new."""
        before = len(self._charged)
        self._charged.update(keys)
        return len(self._charged) - before

    def record_execution(self) -> None:
        self.executed += 1
        if self.executed > self.limit:
            # The reservation arithmetic makes this impossible; failing loudly beats overspending.
            raise RuntimeError(f"metric-call budget exceeded: {self.executed} > {self.limit}")
