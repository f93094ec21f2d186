"""Minibatch samplers.

EpochShuffledSampler: minibatch k is a pure function of (seed, k) and walks epoch-shuffled ids.
FailureFirstSampler: likely failures first, solved ids last, no example drawn every time.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dspy_turbogepa.engine.sampling import (
    LIKELY_FAILING,
    LINEAGE_DEPTH,
    SOLVED,
    UNKNOWN,
    EpochShuffledSampler,
    FailureFirstSampler,
    LineageKnowledge,
)

SHAPES = [(n, size) for n in (1, 2, 3, 5, 7, 10, 12, 31) for size in (1, 2, 3, 4, 5) if size <= n]


def test_deterministic_per_seed_and_k_whatever_the_call_order() -> None:
    ids = list(range(20))
    a = EpochShuffledSampler(ids, 3, seed=11)
    b = EpochShuffledSampler(ids, 3, seed=11)
    forward = [a.batch(k) for k in range(30)]
    backward = [b.batch(k) for k in reversed(range(30))][::-1]
    assert forward == backward
    assert a.batch(17) == forward[17]  # asking again gives the same batch
    c = EpochShuffledSampler(ids, 3, seed=12)
    assert [c.batch(k) for k in range(30)] != forward


def test_batches_use_the_given_ids() -> None:
    ids = [101, 7, 55, 3, 42]
    s = EpochShuffledSampler(ids, 2, seed=0)
    assert {i for k in range(20) for i in s.batch(k)} == set(ids)


@pytest.mark.parametrize(("n", "size"), SHAPES)
def test_no_duplicate_ids_within_a_batch(n: int, size: int) -> None:
    for seed in range(15):
        s = EpochShuffledSampler(list(range(n)), size, seed)
        for k in range(4 * n):
            batch = s.batch(k)
            assert len(batch) == size
            assert len(set(batch)) == size, (seed, k, batch)


@pytest.mark.parametrize(("n", "size"), [(n, s) for n, s in SHAPES if n % s == 0])
def test_each_epoch_is_a_partition_when_the_size_divides_the_set(n: int, size: int) -> None:
    per_epoch = n // size
    for seed in range(10):
        s = EpochShuffledSampler(list(range(n)), size, seed)
        for epoch in range(4):
            ids = [i for k in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in s.batch(k)]
            assert sorted(ids) == list(range(n)), (seed, epoch)


@pytest.mark.parametrize(("n", "size"), SHAPES)
def test_first_epoch_covers_every_id(n: int, size: int) -> None:
    for seed in range(10):
        s = EpochShuffledSampler(list(range(n)), size, seed)
        first = [s.batch(k) for k in range(-(-n // size))]
        assert {i for b in first for i in b} == set(range(n))
        full = first[: n // size]  # batches entirely inside epoch 0 never repeat an id
        flat = [i for b in full for i in b]
        assert len(flat) == len(set(flat))


def test_epochs_are_reshuffled() -> None:
    s = EpochShuffledSampler(list(range(12)), 4, seed=0)
    epochs = [tuple(i for k in range(3 * e, 3 * e + 3) for i in s.batch(k)) for e in range(5)]
    assert len(set(epochs)) > 1


@pytest.mark.parametrize(("n", "size"), SHAPES)
def test_every_id_once_per_epoch_padding_from_the_epoch_start(n: int, size: int) -> None:
    # gepa's rule: an epoch is one shuffle padded up to a multiple of the minibatch size with ids from
    # its own start, so each id is drawn once per epoch and a few (fewer than a batch) twice.
    # (Regression: batches used to straddle epochs and skip ids, drawing one id in 2-3 batches in a row.)
    per_epoch = -(-n // size)
    for seed in range(10):
        s = EpochShuffledSampler(list(range(n)), size, seed)
        for epoch in range(3):
            drawn = [i for k in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in s.batch(k)]
            assert len(drawn) == per_epoch * size
            assert set(drawn) == set(range(n)), (seed, epoch)
            pad = per_epoch * size - n
            assert drawn[n:] == drawn[:pad]  # the padding repeats the epoch's first ids
            assert max(drawn.count(i) for i in range(n)) <= (2 if pad else 1)


def test_minibatch_larger_than_dataset_is_the_whole_set() -> None:
    s = EpochShuffledSampler([4, 5, 6], 10, seed=1)
    for k in range(6):
        batch = s.batch(k)
        assert sorted(batch) == [4, 5, 6]
    assert len({s.batch(k) for k in range(20)}) > 1  # still reshuffled per epoch


def test_empty_training_set_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        EpochShuffledSampler([], 3, seed=0)


# ------------------------------------------------------------------------------ failure-first sampling


def _drain(s: FailureFirstSampler, rank: Callable[[int], int], draws: int) -> list[tuple[int, ...]]:
    out = []
    for _ in range(draws):
        batch = s.draw(rank)
        s.consume(batch)
        out.append(batch)
    return out


def _unknown(_: int) -> int:
    return UNKNOWN


@pytest.mark.parametrize(("n", "size"), SHAPES)
def test_failure_first_without_knowledge_draws_every_id_once_per_epoch(n: int, size: int) -> None:
    per_epoch = -(-n // size)
    for seed in range(5):
        s = FailureFirstSampler(list(range(n)), size, seed)
        batches = _drain(s, _unknown, 3 * per_epoch)
        for b in batches:
            assert len(b) == size and len(set(b)) == size
        if n % size == 0:  # whole batches: each epoch's draws partition the ids
            for e in range(3):
                drawn = [i for b in batches[e * per_epoch : (e + 1) * per_epoch] for i in b]
                assert sorted(drawn) == list(range(n)), (seed, e)
        assert {i for b in batches[:per_epoch] for i in b} == set(range(n))


def test_failure_first_draw_does_not_change_the_sampler() -> None:
    s = FailureFirstSampler(list(range(20)), 3, seed=4)
    first = s.draw(_unknown)
    assert s.draw(_unknown) == first
    s.consume(first)
    assert not set(s.draw(_unknown)) & set(first)


def test_likely_failures_come_first_and_solved_ids_last() -> None:
    ids = list(range(30))
    failing, solved = {5, 17, 23, 29}, set(range(10)) - {5}
    ranks = {i: LIKELY_FAILING if i in failing else SOLVED if i in solved else UNKNOWN for i in ids}
    s = FailureFirstSampler(ids, 3, seed=0)
    batches = _drain(s, ranks.__getitem__, 7)
    flat = [i for b in batches for i in b]
    assert set(flat[:4]) == failing  # the likely failures, before anything else
    assert not set(flat) & solved  # 21 unsolved ids are enough for 7 draws: no solved one is needed
    gap = (30 // 3) // 2  # draws before an id is eligible again: half an epoch
    assert len(set(flat[: 3 * gap])) == 3 * gap  # no repeats within the gap
    assert failing <= set(flat[3 * gap :])  # after it, a failure not yet fixed is retried first
    # with the same ranks, plain epoch order would have spent draws on solved ids
    plain = EpochShuffledSampler(ids, 3, seed=0)
    assert {i for k in range(7) for i in plain.batch(k)} & solved


def test_an_unsolvable_example_is_not_drawn_every_time() -> None:
    # One example always fails (label noise): it is drawn again only after half an epoch of draws,
    # and every other example keeps its turn (no starvation).
    n, size = 24, 3
    s = FailureFirstSampler(list(range(n)), size, seed=1)
    batches = _drain(s, lambda i: LIKELY_FAILING if i == 7 else UNKNOWN, 40)
    hits = [k for k, b in enumerate(batches) if 7 in b]
    per_epoch = n // size
    assert hits[0] == 0
    assert all(b - a >= per_epoch // 2 for a, b in zip(hits, hits[1:]))
    assert len(hits) <= 2 * (len(batches) // per_epoch) + 1
    last_seen = {i: max(k for k, b in enumerate(batches) if i in b) for i in range(n)}
    assert min(last_seen.values()) >= len(batches) - 2 * per_epoch  # every id drawn recently


def test_when_everything_is_solved_the_batches_stay_full_and_distinct() -> None:
    s = FailureFirstSampler(list(range(10)), 4, seed=2)
    for b in _drain(s, lambda i: SOLVED, 12):
        assert len(b) == 4 and len(set(b)) == 4


def test_failure_first_minibatch_larger_than_dataset_is_the_whole_set() -> None:
    s = FailureFirstSampler([4, 5, 6], 10, seed=1)
    for b in _drain(s, _unknown, 5):
        assert sorted(b) == [4, 5, 6]


def test_failure_first_rejects_an_empty_training_set() -> None:
    with pytest.raises(ValueError, match="empty"):
        FailureFirstSampler([], 3, seed=0)


def test_lineage_knowledge_reads_the_nearest_ancestor_as_of_a_commit() -> None:
    k = LineageKnowledge(perfect_score=1.0)
    k.record("child", 1, 1.0, commit=5)
    k.record("parent", 1, 0.0, commit=2)
    k.record("parent", 2, 0.5, commit=2)
    k.record("parent", 3, 1.0, commit=3)
    k.record("child", 4, 0.0, commit=7)
    rank = k.ranker(["child", "parent"], n_commits=5)
    assert rank(1) == SOLVED  # the child itself beats what its parent did
    assert rank(2) == LIKELY_FAILING  # below the perfect score is a failure
    assert rank(3) == SOLVED  # inherited from the parent
    assert rank(4) == UNKNOWN  # committed after the planning view: not visible yet
    assert rank(9) == UNKNOWN
    assert k.ranker(["child", "parent"], n_commits=4)(1) == LIKELY_FAILING  # the child's score not yet committed
    assert k.ranker(["child", "parent"], n_commits=7)(4) == LIKELY_FAILING


def test_lineage_knowledge_expires_after_a_few_generations() -> None:
    k = LineageKnowledge(perfect_score=1.0)
    lineage = [f"g{d}" for d in range(LINEAGE_DEPTH + 2)]
    k.record(lineage[-1], 0, 1.0, commit=0)  # solved by a distant ancestor only
    k.record(lineage[LINEAGE_DEPTH - 1], 1, 1.0, commit=0)  # by the oldest generation still trusted
    rank = k.ranker(lineage, n_commits=10)
    assert rank(0) == UNKNOWN
    assert rank(1) == SOLVED


def test_lineage_knowledge_lists_a_candidates_own_failures_newest_first() -> None:
    k = LineageKnowledge(perfect_score=1.0)
    k.record("p", 1, 0.0, commit=1)
    k.record("p", 2, 0.5, commit=3)
    k.record("p", 3, 1.0, commit=3)  # solved: nothing to learn from
    k.record("p", 4, 0.0, commit=3)
    k.record("p", 5, 0.0, commit=6)  # after the planning view
    k.record("parent-of-p", 6, 0.0, commit=1)  # an ancestor's failure is not the candidate's
    assert k.failed("p", n_commits=5, exclude=()) == [2, 4, 1]
    assert k.failed("p", n_commits=5, exclude=(4,)) == [2, 1]  # the minibatch is read anyway
    assert k.failed("p", n_commits=6, exclude=()) == [5, 2, 4, 1]
    assert k.failed("unknown", n_commits=5, exclude=()) == []


def test_explore_swaps_one_stubborn_failure_for_an_unknown_example() -> None:
    """Failures no reflection can fix, half an epoch's draws' worth, would fill every minibatch for ever:
    without scouts, one slot of each minibatch goes to an example the lineage has no score on."""
    ids = list(range(20))
    stubborn = set(range(10))  # failed and re-failed: two minibatches' worth
    rank = lambda i: LIKELY_FAILING if i in stubborn else UNKNOWN  # noqa: E731
    s = FailureFirstSampler(ids, 5, seed=0)
    drawn: set[int] = set()
    for _ in range(8):
        batch = s.draw(rank)
        assert set(batch) <= stubborn  # on their own, the stubborn failures fill every minibatch
        batch = s.explore(batch, rank)
        assert len(set(batch)) == 5 and sum(i not in stubborn for i in batch) == 1
        drawn |= set(batch)
        s.consume(batch)
    assert len(drawn - stubborn) == 8  # a new unknown example in every minibatch
    # nothing to explore: a batch holding an unknown example, or no unknown example left, stays as drawn
    assert s.explore((0, 1, 12), rank) == (0, 1, 12)
    assert s.explore((0, 1, 2), lambda i: LIKELY_FAILING if i < 10 else SOLVED) == (0, 1, 2)
    # a batch holding a solved example means no eligible unknown one was left: it stays as drawn
    mixed = lambda i: LIKELY_FAILING if i == 0 else SOLVED if i in (15, 16) else UNKNOWN  # noqa: E731
    assert s.explore((0, 15, 16), mixed) == (0, 15, 16)
    # an unknown example drawn recently (an unlabeled row, say) is not swapped in again before its turn
    fresh = FailureFirstSampler(ids, 5, seed=0)
    only_unknown = lambda i: UNKNOWN if i == 19 else LIKELY_FAILING  # noqa: E731
    first = fresh.explore(fresh.draw(only_unknown), only_unknown)
    assert 19 in first
    fresh.consume(first)
    second = fresh.explore(fresh.draw(only_unknown), only_unknown)
    assert 19 not in second


def test_a_rank_that_names_its_failures_draws_exactly_what_the_full_scan_draws() -> None:
    """The sampler computes keys only for the lineage's failures and the examples it walks past in
    (last draw, position) order (a plan was O(training set) in Python: 10 ms at 10,000 examples, and
    O(examples drawn before), every one after an epoch); every draw must be the one the full scan makes."""
    import random

    rng = random.Random(7)
    for trial in range(150):
        n = rng.choice([5, 13, 40, 200])
        size = rng.choice([1, 3, 8])
        ids = rng.sample(range(3 * n), n)
        fast, slow = FailureFirstSampler(ids, size, seed=trial), FailureFirstSampler(ids, size, seed=trial)
        knowledge = LineageKnowledge(perfect_score=1.0)
        for step in range(rng.choice([3, 30, 90])):
            for i in rng.sample(ids, min(len(ids), rng.choice([0, 1, 4]))):
                knowledge.record(rng.choice(["a", "b"]), i, rng.choice([0.0, 1.0]), step + rng.choice([0, 1]))
            ranker = knowledge.ranker(["a", "b"], step + 1)
            assert ranker.failing is not None  # the fast path runs
            plain = lambda i, r=ranker: r(i)  # noqa: E731  (no `failing`: every key computed)
            exclude = set(rng.sample(ids, rng.choice([0, 0, 2])))
            want = rng.choice([None, 1, len(ids)])
            got = fast.draw(ranker, size=want, exclude=exclude)
            assert got == slow.draw(plain, size=want, exclude=exclude), (trial, step)
            assert fast.explore(got, ranker) == slow.explore(got, plain)
            batch = fast.draw(ranker)
            assert batch == slow.draw(plain)
            fast.consume(batch)
            slow.consume(batch)


def test_duplicate_training_ids_are_refused() -> None:
    """An id stands for one example: twice, it could come twice in one minibatch (and the failure-first
    sampler's fast path, which takes each drawn or known id once, would differ from the full scan)."""
    for sampler in (EpochShuffledSampler, FailureFirstSampler):
        with pytest.raises(ValueError, match="distinct"):
            sampler([0, 0, 1, 2], 3, seed=0)


def _ranked(failing: set[int]) -> Callable[[int], int]:
    return lambda i: LIKELY_FAILING if i in failing else UNKNOWN


def test_explore_never_swaps_away_a_one_example_minibatch() -> None:
    """With reflection_minibatch_size=1 the only failure is all the reflection has to read."""
    s = FailureFirstSampler(list(range(10)), 1, seed=0)
    assert s.explore((3,), _ranked({3})) == (3,)


def test_explore_replaces_the_least_likely_failure_the_last_slot() -> None:
    s = FailureFirstSampler(list(range(20)), 5, seed=0)
    rank = _ranked(set(range(10)))
    batch = s.draw(rank)
    out = s.explore(batch, rank)
    assert out[:4] == batch[:4] and out[4] not in range(10)
