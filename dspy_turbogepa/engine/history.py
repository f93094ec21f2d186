"""What the run looked like after each commit, so launches can be planned reproducibly.

In deterministic mode mutation ``k`` is planned from the state after the first ``k - staleness + 1``
commits (or the previous launch's view, if later: views never go back), however many more commits
have happened by the time it is launched. Records are
append-only, so that state is just a few counters per commit plus a frontier that lags the live one;
nothing is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dspy_turbogepa.engine.credit import CreditSnapshot
from dspy_turbogepa.engine.frontier import ParetoFrontier
from dspy_turbogepa.engine.records import CandidateRecord


@dataclass(frozen=True)
class CommitPoint:
    records: int  # candidates in the pool after this commit
    charged: int  # metric calls charged to committed work
    merges_granted: int  # merge attempts earned by new reflective candidates
    merges_failed: int  # merges committed without being accepted
    accepted: int = 0  # mutations that produced a new candidate, cumulative
    attempted: int = 0  # mutations that evaluated a child (accepted, rejected or pruned), cumulative
    credit: CreditSnapshot = field(default_factory=CreditSnapshot)  # operator credit after this commit
    children_tried: int = 0  # children evaluated on their minibatch, cumulative
    children_passed: int = 0  # of those, children that beat their parent there, cumulative


class CommitHistory:
    def __init__(self, val_ids: Sequence[int]) -> None:
        self._points: list[CommitPoint] = []
        self._val_ids = tuple(val_ids)
        self._lagging = ParetoFrontier(self._val_ids)
        self._lagging_size = 0
        self._reservations: list[int] = []  # by mutation seq
        self._reservation_prefix: list[int] = [0]

    def record(self, point: CommitPoint) -> None:
        """Call once after the seed (point 0) and once after every commit."""
        self._points.append(point)

    def __len__(self) -> int:
        return len(self._points)

    def at(self, n_commits: int) -> CommitPoint:
        return self._points[n_commits]

    def attempt_lookback(self, n_commits: int, attempts: int) -> int:
        """The latest commit count at or before ``n_commits`` with at least ``attempts`` fewer attempts."""
        target = self._points[n_commits].attempted - attempts
        lo, hi = 0, n_commits
        if self._points[0].attempted > target:
            return 0
        while lo < hi:  # attempted is non-decreasing: binary search the last point with attempted <= target
            mid = (lo + hi + 1) // 2
            if self._points[mid].attempted <= target:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def frontier_at(self, n_commits: int, records: Sequence[CandidateRecord]) -> ParetoFrontier:
        """The frontier as it was after ``n_commits`` commits (calls must not go backwards in time)."""
        target = self._points[n_commits].records
        if target < self._lagging_size:
            raise RuntimeError("the lagging frontier cannot move back in time")
        for rec in records[self._lagging_size : target]:
            self._lagging.add(rec.index, rec.val_scores)
        self._lagging_size = target
        return self._lagging

    def note_reservation(self, seq: int, amount: int) -> None:
        if seq != len(self._reservations):
            raise RuntimeError("reservations must be noted in launch order")
        self._reservations.append(amount)
        self._reservation_prefix.append(self._reservation_prefix[-1] + amount)

    def reserved_since(self, first_seq: int) -> int:
        """Sum of the reservations of mutations launched at or after ``first_seq``."""
        first_seq = min(first_seq, len(self._reservations))
        return self._reservation_prefix[-1] - self._reservation_prefix[first_seq]
