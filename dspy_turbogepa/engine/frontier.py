"""GEPA's per-validation-instance Pareto frontier, fed only by full-validation scores.

For each validation instance we keep the best score seen and every candidate reaching it. A child
that is best on even one rare instance stays on the frontier, which is what lets GEPA combine
specialists later. Only candidates evaluated on the *whole* validation set enter: a partial-shard
mean can neither become "best" nor push anyone off the frontier.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

from dspy_turbogepa.engine.config import CandidateSelection
from dspy_turbogepa.engine.records import mean_in_id_order

#: Scores closer than this are ties (metric floats such as 0.1 + 0.2 should not split a front).
SCORE_EPS = 1e-9


def record_on_front(best: dict[Any, float], fronts: dict[Any, set[int]], index: int, vid: Any, score: float) -> None:
    """GEPA's per-instance front: a better score starts the front anew, an equal one (within
    ``SCORE_EPS``) joins it."""
    current = best.get(vid)
    if current is None or score > current + SCORE_EPS:
        best[vid] = score
        fronts[vid] = {index}
    elif abs(score - current) <= SCORE_EPS:
        fronts[vid].add(index)


class ParetoFrontier:
    """Per-instance fronts over candidate indices (0 = seed, then in commit order)."""

    def __init__(self, val_ids: Iterable[int]) -> None:
        self._val_ids: tuple[int, ...] = tuple(sorted(val_ids))
        self._best: dict[int, float] = {}
        self._fronts: dict[int, set[int]] = {i: set() for i in self._val_ids}
        self._aggregate: dict[int, float] = {}
        self._best_index: int | None = None
        # non_dominated() is asked for at every plan and merge search, the frontier changes only at a
        # commit: computed once per change
        self._non_dominated: dict[int, set[int]] | None = None
        self._non_dominated_members: tuple[int, ...] = ()
        #: select_parent's weighted list per strategy, also computed once per change: rebuilt at every
        #: plan it cost O(valset x front size) (0.9 ms a plan at 1,000 validation examples)
        self._weighted: dict[str, list[int]] = {}

    @property
    def val_ids(self) -> tuple[int, ...]:
        return self._val_ids

    def add(self, index: int, scores: Mapping[int, float]) -> None:
        missing = set(self._val_ids) - set(scores)
        if missing:
            raise ValueError(f"candidate {index} lacks full-validation scores for {len(missing)} instances")
        if index in self._aggregate:
            # each candidate joins once, with its full-validation scores: a second add would leave its old
            # place on the fronts and the old best scores behind
            raise ValueError(f"candidate {index} is already on the frontier")
        aggregate = self._aggregate[index] = sum(scores[i] for i in self._val_ids) / max(1, len(self._val_ids))
        best = self._best_index
        if best is not None and (-aggregate, index) < (-self._aggregate[best], best):
            self._best_index = index
        self._non_dominated = None
        self._weighted.clear()
        for vid in self._val_ids:
            record_on_front(self._best, self._fronts, index, vid, scores[vid])

    def best_scores(self) -> dict[int, float]:
        return dict(self._best)

    def fronts(self) -> dict[int, set[int]]:
        return {vid: set(front) for vid, front in self._fronts.items()}

    def aggregate(self, index: int) -> float:
        return self._aggregate[index]

    def best_index(self) -> int:
        """Highest mean score; the lowest index wins ties, so the seed wins ties (as in dspy.GEPA)."""
        # kept up to date by add(): asked at every validation rung and commit, a scan of every candidate
        # made the run quadratic in its candidates
        if self._best_index is None:
            self._best_index = min(self._aggregate, key=lambda i: (-self._aggregate[i], i))
        return self._best_index

    def members(self) -> set[int]:
        return set().union(*self._fronts.values()) if self._fronts else set()

    def _computed(self) -> dict[int, set[int]]:
        if self._non_dominated is None:
            fronts = {vid: set(f) for vid, f in self._fronts.items() if f}
            survivors = pareto_front_members(fronts, self._aggregate)
            self._non_dominated = {vid: f & survivors for vid, f in fronts.items()}
            self._non_dominated_members = tuple(sorted(survivors))
        return self._non_dominated

    def non_dominated(self) -> dict[int, set[int]]:
        """Fronts without the dominated candidates (see :func:`pareto_front_members`); a copy."""
        return {vid: set(f) for vid, f in self._computed().items()}

    def non_dominated_members(self) -> tuple[int, ...]:
        """The candidates on some front of :meth:`non_dominated`, ascending: what the merge search draws
        from at every plan, so computed once per change, not copied out of the fronts each time."""
        self._computed()
        return self._non_dominated_members

    def select_parent(self, rng: random.Random, strategy: CandidateSelection) -> int:
        if not self._aggregate:
            raise RuntimeError("the frontier is empty; evaluate the seed first")
        if strategy == "current_best":
            return self.best_index()
        if strategy == "epsilon_greedy":
            if rng.random() < 0.1:
                return rng.choice(sorted(self._aggregate))
            return self.best_index()
        weighted = self._weighted_members(strategy)
        if not weighted:
            return self.best_index()
        return rng.choice(weighted)

    def could_select(self, index: int, strategy: CandidateSelection) -> bool:
        """Whether :meth:`select_parent` can return ``index`` now. Speculative chaining builds on a child
        before it is committed; its work is kept only if the strategy could have picked that child, so
        every lineage a run reports is one the strategy can produce (a child the seed dominates, say,
        is never a parent under gepa's selection)."""
        if index not in self._aggregate:
            return False
        if strategy == "current_best":
            return index == self.best_index()
        if strategy == "epsilon_greedy":
            return True
        weighted = self._weighted_members(strategy)
        return index in weighted if weighted else index == self.best_index()

    def _weighted_members(self, strategy: CandidateSelection) -> list[int]:
        """A Pareto strategy's candidates, each once per front it is on (the draw's weights)."""
        weighted = self._weighted.get(strategy)
        if weighted is None:
            if strategy == "top_k_pareto":
                # gepa's TopKParetoCandidateSelector(k=5): the raw fronts restricted to the top 5 first, then
                # the dominated dropped among those (one dominated only by a candidate outside stays)
                top = set(sorted(self._aggregate, key=lambda i: (-self._aggregate[i], i))[:5])
                kept = {vid: f & top for vid, f in self._fronts.items() if f & top}
                survivors = pareto_front_members(kept, self._aggregate)
                fronts = {vid: f & survivors for vid, f in kept.items()}
            else:
                fronts = self._computed()
            weighted = [p for vid in sorted(fronts) for p in sorted(fronts[vid])]
            self._weighted[strategy] = weighted
        return weighted


def pareto_front_members(fronts: Mapping[Any, Iterable[int]], aggregates: Mapping[int, float]) -> set[int]:
    """Candidates on GEPA's Pareto frontier: per-instance front members that are not dominated.

    Weakest first (lowest aggregate; among equal aggregates, first seen first, reading the fronts in
    validation-id order and each front's members ascending, as gepa's ``remove_dominated_programs``
    orders them while the indices are below a front's hash-table size: beyond, gepa reads a front in
    Python's set order, which we do not imitate), a candidate is dropped when every instance front
    holding it also holds another surviving candidate, so between two candidates covering the same
    instances the stronger one survives, and of two equal ones the one seen later, usually the newer
    (dropping the newer instead sent the search back to the seed on ties, where dspy.GEPA follows the
    newest). Dropping one only makes the others harder to drop, so one pass gives the same set as
    re-examining everyone after each drop (gepa's loop), in time linear in the fronts' sizes instead of
    quadratic. The one definition of "the frontier" for parent selection, the progress display,
    summary.json, the plots and MLflow.
    """
    own: dict[int, list[Any]] = {}  # insertion order: first seen first
    alive: dict[Any, int] = {}
    for vid in sorted(fronts, key=_id_order):  # whatever order the caller's mapping holds them in
        members = sorted(set(fronts[vid]))
        if not members:
            continue
        alive[vid] = len(members)
        for p in members:
            own.setdefault(p, []).append(vid)
    survivors = set(own)
    for p in sorted(own, key=lambda q: aggregates.get(q, 0.0)):  # stable: ties stay first seen first
        if all(alive[v] >= 2 for v in own[p]):
            survivors.discard(p)
            for v in own[p]:
                alive[v] -= 1
    return survivors


def _id_order(vid: Any) -> tuple[int, Any]:
    """Validation ids in numeric order, also when a JSON round trip made them strings."""
    if isinstance(vid, int):
        return (0, vid)
    if isinstance(vid, str) and vid.isdigit():
        return (0, int(vid))
    return (1, str(vid))


class FrontierTally:
    """Best aggregate and GEPA's Pareto frontier, fed one candidate at a time, for the displays
    (progress, MLflow) that watch a run from outside: the same per-instance rule as
    :class:`ParetoFrontier`, without its fixed set of validation ids.

    ``add`` costs O(validation size); the frontier size is recomputed lazily (O(sum of front sizes)),
    at most once per read after new candidates arrived.
    """

    def __init__(self) -> None:
        self.best: float | None = None
        self.count = 0
        self._inst_best: dict[Any, float] = {}
        self._fronts: dict[Any, set[int]] = {}
        self._aggregates: dict[int, float] = {}
        self._size: int | None = None

    def add(self, index: int, val_scores: Mapping[Any, float]) -> None:
        self.count += 1
        agg = mean_in_id_order(val_scores)
        self._aggregates[index] = agg
        self.best = agg if self.best is None else max(self.best, agg)
        for vid, score in val_scores.items():
            record_on_front(self._inst_best, self._fronts, index, vid, score)
        self._size = None

    @property
    def size(self) -> int:
        """How many candidates are on the frontier (see :func:`pareto_front_members`)."""
        if self._size is None:
            self._size = len(pareto_front_members(self._fronts, self._aggregates))
        return self._size

    @property
    def front_agg(self) -> float | None:
        """Mean over validation instances of the best score on each (gepa's ``valset_pareto_front_agg``)."""
        return sum(self._inst_best.values()) / len(self._inst_best) if self._inst_best else None
