"""The no-progress limit: mutations that changed nothing, counted in a row, and what the stop says.

Cache hits are free, so a run whose parents are all perfect on every minibatch could spin forever on
free no-op mutations; the run stops once that has clearly happened (``max_noop_mutations``). Those
whose proposer answered (it rebuilt a known candidate) are not free: a reflection LM that keeps
answering with known texts stops the run much sooner (``max_paid_noop_mutations``; dspy.GEPA, which
pays metric calls for every iteration, would have run out of budget).

The streak also keeps what its mutations were, because the stop's message must name the cause: a run
where half the examples fail (the metric or the program raising on them) ends here too, every
mutation finding nothing to reflect on, and was told its parents were perfect, at INFO, as if the
search had converged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from dspy_turbogepa.engine.types import NOTHING_TO_REFLECT_ON

#: What a no-op mutation was, as the stop message words it (by its status, or ``nothing_to_reflect_on``).
_WHAT = {
    "skipped_perfect": "had a parent perfect on the minibatch drawn",
    "nothing_to_reflect_on": "had nothing to reflect on (no imperfect example with a usable trace)",
    "no_proposal": "got no usable proposal",
    "duplicate": "rebuilt a known candidate",
    "rejected_rung0": "made a child rejected on scores already known",
    "pruned": "made a child pruned on scores already known",
}


@dataclass
class NoopStreak:
    """Mutations in a row that changed nothing and charged no new evaluation."""

    #: Of the streak, those since the last free one whose proposer answered (a paid reflection).
    paid: int = 0
    #: What the streak's mutations were: their status, or ``nothing_to_reflect_on``.
    kinds: Counter[str] = field(default_factory=Counter)

    @property
    def length(self) -> int:
        return sum(self.kinds.values())

    def record(self, noop: bool, status: str, proposals_answered: int, detail: str | None = None) -> None:
        """One committed mutation; ``detail`` is why a ``no_proposal`` one had none."""
        if not noop:
            self.paid = 0
            self.kinds.clear()
            return
        if proposals_answered:
            self.paid += 1
        starved = status == "no_proposal" and (detail or "").startswith(NOTHING_TO_REFLECT_ON)
        self.kinds["nothing_to_reflect_on" if starved else status] += 1

    def describe(self, failures: Mapping[str, int], evaluations: int) -> tuple[int, str]:
        """The stop's log level and message. A WARNING when most of the streak had nothing to reflect on
        while evaluations failed: the search did not converge, failing examples starved it (an example
        that fails has no trace worth reading). Other streaks (perfect parents, known candidates
        rebuilt) are the search running out of ideas, whatever else failed on the way: the failures are
        said, not blamed."""
        parts = ", ".join(f"{n} {_WHAT.get(kind, f'ended {kind}')}" for kind, n in self.kinds.most_common())
        head = (f"Stopping: none of the last {self.length} mutations changed anything or cost a metric call "
                f"({parts}; {self.paid} of them paid for a reflection)")
        failed = sum(failures.values())
        if not failed:
            return logging.INFO, head
        counts = (f"{failed} of {evaluations} evaluations failed "
                  f"({', '.join(f'{kind} {n}' for kind, n in Counter(failures).most_common())})")
        if self.kinds["nothing_to_reflect_on"] * 2 > self.length:
            return logging.WARNING, (
                f"{head}. {counts}: a failed example scores failure_score and gives reflection nothing to "
                "learn from, so the search stalled on the failures rather than converged. The first warning "
                "of each failure kind names its cause; fix it and run again. The best program found so far "
                "is returned.")
        return logging.INFO, f"{head}; {counts}"
