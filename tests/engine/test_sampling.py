"""EpochShuffledSampler: minibatch k is a pure function of (seed, k) and walks epoch-shuffled ids."""

from __future__ import annotations

import pytest

from dspy_turbogepa.engine.sampling import EpochShuffledSampler

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
