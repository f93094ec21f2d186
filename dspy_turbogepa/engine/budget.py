"""Metric-call budget with reservations, so overspending is bounded and launches are reproducible.

A metric call is one program execution plus its metric on one example, as dspy.GEPA counts. A cache
hit executes nothing and costs nothing. Each mutation reserves its worst case when it is launched and
releases the reservation when its result is committed, so the real count of executions is bounded
however many mutations run at once:

* strict: a mutation starts only if its worst case fits, so the limit is never passed (the run may
  stop up to one mutation's cost below it);
* GEPA-compatible (the default): like dspy.GEPA, which checks the budget at the top of each
  iteration and lets that iteration finish, a mutation may start while the budget is not used up
  even if its worst case does not fit. Only one mutation can straddle the limit (its reservation
  uses up the rest), and only one whose worst case is at most ``overshoot`` (a standard mutation's:
  one minibatch for the parent, one for the child, the valset), so the overshoot stays below it.

Launch decisions use a count that does not depend on timing: an (candidate, example) pair is charged
to the first *committed* mutation that asked for it. Real executions are counted separately for
reporting.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable


def mutation_worst_case(minibatch: int, valset: int, children: int = 1) -> int:
    """The most metric calls a reflective mutation can charge: its parent and each child on a minibatch
    of ``minibatch`` examples, then a child on the valset (GEPA's bound on the overshoot, and what a
    strict budget must have room for before a mutation starts)."""
    return minibatch * (1 + children) + valset


class MetricBudget:
    def __init__(self, limit: int, overshoot: int = 0) -> None:
        if limit < 1:
            raise ValueError(f"the metric-call budget must be >= 1, got {limit}")
        if overshoot < 0:
            raise ValueError(f"overshoot must be >= 0, got {overshoot}")
        self.limit = limit
        #: How far past ``limit`` the last mutation may go (0 = strict).
        self.overshoot = overshoot
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

    def fits(self, used: int, amount: int, limit: int | None = None) -> bool:
        """Whether work costing up to ``amount`` may start when ``used`` calls are charged or reserved
        (against ``limit`` instead of the budget's own when given: a resumed run's plan limit, below it)."""
        limit = self.limit if limit is None else min(limit, self.limit)
        if self.overshoot == 0:
            return used + amount <= limit
        # Work that fits inside the limit may always start; only work of at most one mutation's
        # standard worst case may straddle it (a best-of-k mutation reserves more than that).
        return used < limit and (used + amount <= limit or amount <= self.overshoot)

    def try_reserve(self, amount: int) -> bool:
        if self.fits(self.committed + self._reserved, amount):
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
        if self.executed > self.limit + max(0, self.overshoot - 1):
            # The reservation arithmetic makes this impossible; failing loudly beats overspending.
            raise RuntimeError(f"metric-call budget exceeded: {self.executed} > {self.limit} "
                               f"(+ at most {max(0, self.overshoot - 1)})")


class PlanLimits:
    """The budget limits a resumed run plans with, one after another.

    How wide the search runs and how many scouts and siblings a mutation gets depend on the budget left
    (``width.py``), so a run resumed with a larger ``max_metric_calls`` planned with the new limit from
    its first mutation on: its plan parted from the stored one at once, most stored evaluations went
    unused and were paid for again, and the earlier session's best program could be lost. Instead the
    run plans as each earlier session did, in turn: with the first session's limit until the search
    under it ends (nothing in flight and nothing more fits), then with the next larger one, and so on
    up to this session's. Stored work then replays in full and the new budget continues from where the
    old one stopped. With a smaller limit than an earlier session's the run plans as that session did up
    to its own limit (launches are always checked against the budget's own limit too), where the
    mutations it refuses are planned again from later views: a few may be new work.
    """

    def __init__(self, earlier: Iterable[int], limit: int) -> None:
        chain: list[int] = []
        for budget in (*earlier, limit):
            if not chain or budget > chain[-1]:
                chain.append(budget)
        self._chain = tuple(chain)
        self._index = 0
        self._limit = limit

    @property
    def current(self) -> int:
        """The limit the plan now reads its budget left from."""
        return self._chain[self._index]

    def advance(self) -> bool:
        """Move to the next earlier session's limit (or this one's) once the search under the current one
        has ended; False when there is none the budget allows going on to."""
        if self._index + 1 >= len(self._chain) or self.current >= self._limit:
            return False
        self._index += 1
        return True
