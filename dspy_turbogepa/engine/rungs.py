"""Successive-halving rungs on nested validation shards, with a parent-relative promotion rule.

Rung 0 is the parent's training minibatch (GEPA's own acceptance test). Rungs 1..k are growing
prefixes of one fixed shuffle of the validation ids, so every rung reuses the scores of the rung
before and a promoted child never pays twice for an example. A child is compared *on
the same examples*, not with its possibly stale parent but with the frontier's current best, and
it is kept unless it is behind — or whenever it beats the frontier's best on any instance, because
per-instance specialists are exactly what GEPA's Pareto search lives on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dspy_turbogepa.engine.frontier import SCORE_EPS


@dataclass(frozen=True)
class RungLadder:
    """Incremental validation shards: ``shards[k]`` holds the ids added at rung ``k + 1``."""

    order: tuple[int, ...]
    cut_points: tuple[int, ...]

    @classmethod
    def build(cls, val_ids: Sequence[int], fractions: Sequence[float], seed: int) -> RungLadder:
        order = list(val_ids)
        random.Random(f"rungs:{seed}").shuffle(order)
        n = len(order)
        cuts: list[int] = []
        for f in fractions:
            c = max(1, min(n, round(n * f)))
            if not cuts or c > cuts[-1]:
                cuts.append(c)
        if cuts[-1] != n:
            cuts.append(n)
        return cls(order=tuple(order), cut_points=tuple(cuts))

    @property
    def num_rungs(self) -> int:
        return len(self.cut_points)

    def new_ids(self, rung: int) -> tuple[int, ...]:
        """Ids evaluated when a child enters validation rung ``rung`` (0-based among validation rungs)."""
        start = 0 if rung == 0 else self.cut_points[rung - 1]
        return self.order[start : self.cut_points[rung]]


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str


def promotion_decision(
    child: Mapping[int, float],
    incumbent: Mapping[int, float],
    frontier_best: Mapping[int, float],
    z: float = 0.0,
) -> PromotionDecision:
    """Keep a child that is best somewhere, or better than the incumbent on the same examples.

    ``incumbent`` holds the full-validation scores of the frontier's best candidate *now* (not the
    child's parent, which may be many commits old: with many mutations in flight, a parent's other
    children have often moved the frontier on). ``frontier_best`` holds the best score seen on each
    instance. A child is promoted when

    * it beats the frontier's best on some instance of the shard (a specialist, which GEPA's
      per-instance Pareto search lives on), or
    * the sum of its paired differences with the incumbent is at least ``-z`` standard errors (with
      the default ``z = 0``: it is not behind the incumbent on the shard).

    Ties are promoted on purpose: an improvement often touches examples a small shard does not
    contain (a rule needed by 5% of the inputs, or a first-stage fix a second stage cannot show
    yet), and pruning ties cost far more quality than it saved budget in our measurements. What the
    rungs prune is a child clearly behind the current best — typically a sibling planned from an older
    state, whose improvement another child has already brought in.
    """
    for i in child:
        best = frontier_best.get(i)
        if best is None or child[i] > best + SCORE_EPS:
            return PromotionDecision(True, f"new best on validation instance {i}")
    diffs = [child[i] - incumbent[i] for i in child if i in incumbent]
    total = sum(diffs)
    spread = math.sqrt(sum(d * d for d in diffs))
    if total >= -z * spread - SCORE_EPS:
        return PromotionDecision(True, f"not behind the incumbent (diff {total:+.3f}, se {spread:.3f})")
    return PromotionDecision(False, f"behind the incumbent (diff {total:+.3f}, se {spread:.3f})")
