"""Training minibatches for reflection.

``EpochShuffledSampler`` is gepa's epoch-shuffled order as a pure function of the mutation number
(``minibatch_sampling="epoch"``). ``FailureFirstSampler`` (the default) walks the same shuffles but
draws the examples the parent is likely to fail first and the ones its lineage already solves last.
Both are reproducible with many mutations in flight: the first does not depend on launch order at
all, the second is drawn in launch order from the planning view.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Collection, Iterator, Sequence


def _checked(ids: Sequence[int], size: int) -> tuple[tuple[int, ...], int]:
    if not ids:
        raise ValueError("cannot sample minibatches from an empty training set")
    if len(set(ids)) != len(ids):  # an id is an example: twice would put it twice in one minibatch
        raise ValueError("training ids must be distinct")
    return tuple(ids), min(size, len(ids))


def epoch_order(ids: Sequence[int], seed: int, epoch: int) -> tuple[int, ...]:
    """Epoch ``epoch``'s shuffle of the training ids (the same one for both samplers)."""
    order = list(ids)
    random.Random(f"minibatch:{seed}:{epoch}").shuffle(order)
    return tuple(order)


class EpochShuffledSampler:
    def __init__(self, ids: Sequence[int], size: int, seed: int) -> None:
        self._ids, self._size = _checked(ids, size)
        self._seed = seed
        self._epochs: dict[int, tuple[int, ...]] = {}

    def _epoch(self, e: int) -> tuple[int, ...]:
        if e not in self._epochs:
            self._epochs[e] = epoch_order(self._ids, self._seed, e)
        return self._epochs[e]

    def batch(self, k: int) -> tuple[int, ...]:
        """The ``k``-th minibatch, never repeating an id within a batch.

        Each epoch is one shuffle of the ids, padded (as gepa pads) with ids from its own start up to a
        multiple of the minibatch size, so every id is drawn once per epoch and a few twice, and the
        batch of mutation ``k`` depends on nothing but ``k``.
        """
        n, size = len(self._ids), self._size
        per_epoch = -(-n // size)
        epoch, j = divmod(k, per_epoch)
        order = self._epoch(epoch)
        padded = order + order[: per_epoch * size - n]
        return tuple(padded[j * size : (j + 1) * size])


#: How a training example ranks for one parent's minibatch (lower is drawn first).
LIKELY_FAILING, UNKNOWN, SOLVED = 0, 1, 2


class FailureFirstSampler:
    """Minibatches that draw the examples a parent is likely to fail first, and its solved ones last.

    Why: reflection learns only from failures, and a minibatch the parent already solves is skipped
    after paying for its evaluation (GEPA's ``skip_perfect_score``). Late in a run most training
    examples are solved, so in plain epoch order most mutations are such skips: each costs a few
    metric calls and a round-trip on the critical path, and teaches nothing. Here each draw ranks the
    examples with what the run knows about the parent's lineage (``rank``: LIKELY_FAILING, UNKNOWN or
    SOLVED) and takes them in the order (rank, least recently drawn, position in the epoch's shuffle).
    Solved examples are drawn only when nothing else is eligible.

    An example is eligible again only ``gap`` draws (half an epoch's worth, rounded down, and at least
    2 from 3 draws an epoch on) after it was drawn, so an example no candidate can solve (label noise,
    a missing input) is drawn about twice as often as in plain epoch order (at most 2.5 times, with
    5 draws an epoch), not every time; the least-recently-drawn tie-break keeps the rest fair.

    Determinism: ``draw`` does not change the sampler, ``consume`` applies a draw. Drawn in launch
    order with ranks read from the planning view, a run's minibatches do not depend on timing.
    """

    def __init__(self, ids: Sequence[int], size: int, seed: int) -> None:
        self._ids, self._size = _checked(ids, size)
        self._seed = seed
        self._period = -(-len(self._ids) // self._size)  # draws in one epoch
        # Half an epoch of draws, rounded down: what the benchmark grid was measured with (rounding up,
        # 14 draws instead of 13 at 80 examples, made routing@800 1.6x faster than dspy.GEPA instead of
        # 2.4x, same session, 10 seeds); but at least every other draw from 3 draws an epoch on, where
        # rounding down gave 1: the unsolvable example in every minibatch.
        self._gap = max(2 if self._period >= 3 else 1, self._period // 2)
        self._draws = 0
        self._last: dict[int, int] = {}
        # the examples in the order draw() ranks them after the likely failures: never drawn ones (in
        # epoch order), then the drawn ones by their last draw (this dict is kept in that order)
        self._undrawn: set[int] = set(self._ids)
        self._by_last: dict[int, int] = {}
        self._order_epoch = -1
        self._order: tuple[int, ...] = ()
        self._position: dict[int, int] = {}

    def _positions(self) -> dict[int, int]:
        epoch = self._draws // self._period
        if epoch != self._order_epoch:
            self._order = epoch_order(self._ids, self._seed, epoch)
            self._position = {i: k for k, i in enumerate(self._order)}
            self._order_epoch = epoch
        return self._position

    def draw(
        self, rank: Callable[[int], int], size: int | None = None, exclude: Collection[int] = ()
    ) -> tuple[int, ...]:
        """The next minibatch (``size`` defaults to the minibatch size), skipping ``exclude``."""
        position = self._positions()
        never = -(self._gap + 1)

        def key(i: int) -> tuple[int, int, int]:
            last = self._last.get(i, never)
            eligible = self._draws - last >= self._gap
            r = rank(i) if eligible else SOLVED + 1
            return (r, last, position[i])

        n = self._size if size is None else size
        failing = getattr(rank, "failing", None)
        if failing is None:  # a rank that cannot say which examples may fail: every key is computed
            ids = [i for i in self._ids if i not in exclude] if exclude else self._ids
            return tuple(heapq.nsmallest(n, ids, key=key))  # stable, like sorted()[:size]
        # Why: a key per example made every plan O(training set) in Python (10 ms at 10,000 examples, on
        # the engine's loop), and so did one per example drawn before (every example, after an epoch).
        # The keys sort by (rank, last draw, position). Eligible likely failures come first: they are
        # among ``failing`` (the lineage's failures, few). The others follow in (last, position) order
        # by rank: eligible unknown ones, eligible solved ones, then the ineligible (drawn within the
        # gap, the most recent draws: at the end of that order). So a walk in that order stops once it
        # has enough unknown ones, or reaches the ineligible ones with enough. Keys are unique
        # (positions are), so the result is exactly the full scan's.
        def eligible(i: int) -> bool:
            return self._draws - self._last.get(i, never) >= self._gap

        first = [i for i in failing
                 if i in position and i not in exclude and eligible(i) and rank(i) == LIKELY_FAILING]
        if len(first) >= n:
            return tuple(heapq.nsmallest(n, first, key=key))
        need = n - len(first)
        unknown: list[int] = []
        solved: list[int] = []
        ineligible: list[int] = []
        for i in self._walk(position):
            if i in exclude:
                continue
            if not eligible(i):  # every one left is ineligible too
                if len(unknown) + len(solved) + len(ineligible) >= need:
                    break
                ineligible.append(i)
                continue
            r = rank(i)
            if r == UNKNOWN:
                unknown.append(i)
                if len(unknown) >= need:
                    break
            elif r == SOLVED:
                solved.append(i)
        return tuple(sorted(first, key=key) + (unknown + solved + ineligible)[:need])

    def _walk(self, position: dict[int, int]) -> Iterator[int]:
        """Every example in (last draw, position) order: the never drawn ones in epoch order, then the
        drawn ones by their last draw."""
        if len(self._undrawn) * 4 >= len(self._ids):
            yield from (i for i in self._order if i in self._undrawn)
        else:
            yield from sorted(self._undrawn, key=position.__getitem__)
        group: list[int] = []
        group_last: int | None = None
        for i, last in self._by_last.items():
            if last != group_last:
                yield from sorted(group, key=position.__getitem__)
                group, group_last = [], last
            group.append(i)
        yield from sorted(group, key=position.__getitem__)

    def explore(self, batch: Sequence[int], rank: Callable[[int], int]) -> tuple[int, ...]:
        """``batch`` with its last likely-failing example swapped for the next example the lineage has
        no score on, when ``batch`` holds none.

        Why: examples a lineage keeps failing rank first, and when no reflection can fix them (wrong
        labels, a missing input) and they are at least half an epoch's draws' worth, they fill every
        minibatch: the children can never beat the parent there, and the rest of the training set is
        never drawn. Scouting explores beside the minibatch; without scouts (``reflection_scouts=0``, or
        ``num_threads`` no larger than the minibatch) one slot of each minibatch does.
        """
        # an unknown example already in it, or a solved one (then no eligible unknown example was left)
        if len(batch) < 2 or any(rank(i) != LIKELY_FAILING for i in batch):
            return tuple(batch)
        never = -(self._gap + 1)
        unknown = [i for i in self.draw(rank, size=len(self._ids), exclude=batch)
                   if rank(i) == UNKNOWN and self._draws - self._last.get(i, never) >= self._gap]
        if not unknown:  # only recently drawn ones (an unlabeled row, say): not again before its turn
            return tuple(batch)
        return (*batch[:-1], unknown[0])  # the last of a draw is its least likely failure

    def consume(self, ids: Sequence[int]) -> None:
        for i in ids:
            self._last[i] = self._draws
            self._by_last.pop(i, None)
            self._by_last[i] = self._draws
            self._undrawn.discard(i)
        self._draws += 1


#: A solved example is trusted for this many generations (the parent and its nearest ancestors): an
#: edit further down the line may have broken it again, and reflection should then see that.
LINEAGE_DEPTH = 4


class LineageKnowledge:
    """Committed training scores per candidate, read back as ranks for :class:`FailureFirstSampler`.

    Scores come from the minibatch evaluations of committed mutations (the parent's and the child's),
    each stamped with its commit number, so a rank computed "as of commit n" is the same whenever it
    is computed: that is what keeps failure-first sampling reproducible with mutations in flight.
    """

    def __init__(self, perfect_score: float) -> None:
        self._perfect = perfect_score
        self._known: dict[str, dict[int, tuple[int, float]]] = {}
        #: per candidate, the examples it failed (at any commit): what a draw looks at first
        self._failing: dict[str, set[int]] = {}

    def record(self, fingerprint: str, example_id: int, score: float, commit: int) -> None:
        table = self._known.setdefault(fingerprint, {})
        if example_id not in table:
            table[example_id] = (commit, score)
            if score < self._perfect:
                self._failing.setdefault(fingerprint, set()).add(example_id)

    def ranker(self, lineage: Sequence[str], n_commits: int) -> Callable[[int], int]:
        """Rank of each example for a parent whose lineage (itself first) is ``lineage``."""
        tables = [self._known[fp] for fp in lineage[:LINEAGE_DEPTH] if fp in self._known]
        perfect = self._perfect

        def rank(example_id: int) -> int:
            for table in tables:
                hit = table.get(example_id)
                if hit is not None and hit[0] <= n_commits:
                    return LIKELY_FAILING if hit[1] < perfect else SOLVED
            return UNKNOWN

        # every example ranked LIKELY_FAILING is among these (a superset: rank() decides)
        failing = set().union(*(self._failing.get(fp, ()) for fp in lineage[:LINEAGE_DEPTH]))
        rank.failing = failing  # type: ignore[attr-defined]
        return rank

    def known(self, fingerprint: str, n_commits: int) -> set[int]:
        """The training examples this very candidate has a committed score on, as of ``n_commits``."""
        return {i for i, (commit, _) in self._known.get(fingerprint, {}).items() if commit <= n_commits}

    def failed(self, fingerprint: str, n_commits: int, exclude: Sequence[int]) -> list[int]:
        """The training examples this very candidate failed, as of commit ``n_commits``, newest first:
        evaluations already paid for, whose feedback a reflection can read again."""
        skip = set(exclude)
        hits = [
            (commit, example_id)
            for example_id, (commit, score) in self._known.get(fingerprint, {}).items()
            if commit <= n_commits and score < self._perfect and example_id not in skip
        ]
        hits.sort(key=lambda h: (-h[0], h[1]))
        return [example_id for _, example_id in hits]
