"""Successive-halving rungs on nested validation shards, with a parent-relative promotion rule.

Rung 0 is the parent's training minibatch (GEPA's own acceptance test). Rungs 1..k are growing
prefixes of one fixed shuffle of the validation ids, so every rung reuses the scores of the rung
before and a promoted child never pays twice for an example. A child is compared with its parent *on
the same examples* (the parent, being on the frontier, has full-validation scores), and it is kept
when it is not clearly worse — or when it beats the frontier's best on any instance, because
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
    parent: Mapping[int, float],
    frontier_best: Mapping[int, float],
    z: float,
) -> PromotionDecision:
    """Keep a child that is statistically no worse than its parent, or best somewhere.

    The paired test uses the differences on the shard's examples: prune only when their sum is below
    ``-z`` times its standard error (sqrt of the sum of squared differences). With ``z = 1`` a child
    one example behind on a 13-example shard survives, two behind (and none ahead) does not.
    """
    ids = [i for i in child if i in parent]
    for i in child:
        best = frontier_best.get(i)
        if best is None or child[i] > best + SCORE_EPS:
            return PromotionDecision(True, f"new best on validation instance {i}")
    diffs = [child[i] - parent[i] for i in ids]
    total = sum(diffs)
    spread = math.sqrt(sum(d * d for d in diffs))
    if total >= -z * spread - SCORE_EPS:
        return PromotionDecision(True, f"no worse than parent (diff {total:+.3f}, se {spread:.3f})")
    return PromotionDecision(False, f"worse than parent (diff {total:+.3f}, se {spread:.3f})")
