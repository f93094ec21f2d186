"""Operator credit: which kind of proposal is paying off in this run, and the mix that follows.

Per proposal kind (reflection on one component, reflection on all components, merge) we count the
mutations that evaluated a child, the children that survived rung 0, those that reached the pool,
and those that became the new best. When the user left ``component_selector`` at its default, each
reflective mutation chooses between "one component" and "all components" by Thompson sampling on
the rate at which a kind's children became the new best: a Beta(1, 1) prior for one component, a
pessimistic Beta(1, 9) for all (so with no history "all" is drawn about one time in ten), and the
mix drifts toward what wins here. Counts are read from the commit history at the mutation's
planning view, so the choice is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KindCounts:
    attempts: int = 0
    survived_rung0: int = 0
    accepted: int = 0
    #: Accepted children that became the new best candidate (the reward the mix follows).
    improved_best: int = 0

    def win_rate(self) -> float:
        """Laplace-smoothed share of attempts that produced a new candidate."""
        return (self.accepted + 1) / (self.attempts + 2)

    def rung0_rate(self) -> float:
        return (self.survived_rung0 + 1) / (self.attempts + 2)


@dataclass(frozen=True)
class CreditSnapshot:
    counts: Mapping[str, KindCounts] = field(default_factory=dict)

    def get(self, kind: str) -> KindCounts:
        return self.counts.get(kind, KindCounts())

    def updated(self, kind: str, survived: bool, accepted: bool, improved_best: bool = False) -> CreditSnapshot:
        c = self.get(kind)
        new = KindCounts(c.attempts + 1, c.survived_rung0 + int(survived), c.accepted + int(accepted),
                         c.improved_best + int(improved_best))
        return CreditSnapshot({**self.counts, kind: new})

    def choose_reflection_kind(self, rng: random.Random) -> str:
        one, all_ = self.get("reflection"), self.get("reflection_all")
        # Reward: the child became the new best. Surviving rung 0 or joining the pool is a weaker signal:
        # rewriting every component at once gets accepted more often yet moves the best less (it
        # couples changes that merge could otherwise combine). "All" starts with a pessimistic prior,
        # as GEPA's default is one component at a time.
        draw_one = rng.betavariate(one.improved_best + 1, one.attempts - one.improved_best + 1)
        draw_all = rng.betavariate(all_.improved_best + 1, all_.attempts - all_.improved_best + 9)
        return "reflection_all" if draw_all > draw_one else "reflection"

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {
            kind: {"attempts": c.attempts, "survived_rung0": c.survived_rung0, "accepted": c.accepted,
                   "improved_best": c.improved_best,
                   "rung0_rate": round(c.rung0_rate(), 4), "win_rate": round(c.win_rate(), 4)}
            for kind, c in sorted(self.counts.items())
        }
