"""RungLadder shards and the parent-relative promotion rule; rung-fraction configuration helpers."""

from __future__ import annotations

import itertools
import math

import pytest

from dspy_turbogepa.engine.config import default_rung_fractions, validate_rung_fractions
from dspy_turbogepa.engine.rungs import RungLadder, promotion_decision

LADDER_CASES = [
    (n, fr)
    for n in (1, 2, 3, 7, 8, 13, 30, 72, 100)
    for fr in ((1.0,), (0.5, 1.0), (0.1, 0.2, 1.0), (1 / 9, 1 / 3, 1.0), default_rung_fractions(n) if n else (1.0,))
]


@pytest.mark.parametrize(("n", "fractions"), LADDER_CASES)
def test_ladder_shards_are_nested_and_cover_every_id_once(n: int, fractions: tuple[float, ...]) -> None:
    val_ids = [10 * i + 3 for i in range(n)]  # ids need not be 0..n-1
    ladder = RungLadder.build(val_ids, fractions, seed=5)
    assert sorted(ladder.order) == sorted(val_ids)
    cuts = ladder.cut_points
    assert all(b > a for a, b in itertools.pairwise(cuts)), cuts
    assert cuts[0] >= 1
    assert cuts[-1] == n
    assert ladder.num_rungs == len(cuts) <= len(fractions)
    increments = [ladder.new_ids(r) for r in range(ladder.num_rungs)]
    assert all(increments), increments
    flat = [i for inc in increments for i in inc]
    assert flat == list(ladder.order)  # each id exactly once, in ladder order
    for r in range(ladder.num_rungs):
        prefix = [i for inc in increments[: r + 1] for i in inc]
        assert prefix == list(ladder.order[: cuts[r]])  # shard r is a prefix: shards are nested


def test_ladder_cuts_follow_fractions() -> None:
    ladder = RungLadder.build(range(27), (1 / 9, 1 / 3, 1.0), seed=0)
    assert ladder.cut_points == (3, 9, 27)
    assert [len(ladder.new_ids(r)) for r in range(3)] == [3, 6, 18]


def test_ladder_collapses_fractions_too_fine_for_the_valset() -> None:
    assert RungLadder.build(range(3), (0.1, 0.2, 1.0), seed=0).cut_points == (1, 3)
    assert RungLadder.build(range(1), (0.5, 1.0), seed=0).cut_points == (1,)
    assert RungLadder.build(range(10), (0.99, 1.0), seed=0).cut_points == (10,)


def test_ladder_order_is_deterministic_per_seed() -> None:
    a = RungLadder.build(range(50), (0.2, 1.0), seed=3)
    b = RungLadder.build(list(range(50)), (0.2, 1.0), seed=3)
    c = RungLadder.build(range(50), (0.2, 1.0), seed=4)
    assert a == b
    assert a.order != c.order
    assert a.order != tuple(range(50))  # actually shuffled


# --------------------------------------------------------------------------- promotion decision
# promotion_decision(child, incumbent, frontier_best, z): promote a child that is best on some instance
# of the shard, or whose summed paired difference with the incumbent (the frontier's best candidate
# *now*) exceeds -z standard errors (sqrt of the summed squared differences). z = 0 (the default)
# means strictly ahead; a child merely equal to the incumbent is pruned.


def shard(values: list[float]) -> dict[int, float]:
    return dict(enumerate(values))


def test_new_best_on_an_instance_promotes_even_when_far_worse_elsewhere() -> None:
    incumbent = shard([1.0] * 10)
    frontier_best = shard([1.0] * 9 + [0.5])
    child = shard([0.0] * 9 + [0.6])
    decision = promotion_decision(child, incumbent, frontier_best)
    assert decision.promote
    assert "new best" in decision.reason and "9" in decision.reason


def test_tying_the_frontier_best_is_not_a_new_best() -> None:
    incumbent = shard([1.0] * 13)
    child = shard([0.0, 0.0] + [1.0] * 11)
    assert not promotion_decision(child, incumbent, incumbent, z=1.0).promote
    # within SCORE_EPS is still a tie: promoted (a tie with the incumbent), but not as a new best
    tie = promotion_decision({0: 1.0 + 1e-12}, {0: 1.0}, {0: 1.0})
    assert tie.promote and "new best" not in tie.reason


def test_instance_missing_from_frontier_best_counts_as_new_best() -> None:
    assert promotion_decision(shard([0.0] * 4), shard([1.0] * 4), {}).promote


def test_default_z_is_zero_ahead_promotes() -> None:
    incumbent = shard([1.0, 0.0, 0.0, 1.0])
    best = shard([1.0] * 4)
    ahead = shard([1.0, 1.0, 0.0, 1.0])
    assert promotion_decision(ahead, incumbent, best).promote
    d = promotion_decision(ahead, incumbent, best)
    assert "not behind the incumbent" in d.reason and "+1.000" in d.reason


@pytest.mark.parametrize("z", [0.0, 1.0, 5.0])
def test_child_equal_to_the_incumbent_is_promoted(z: float) -> None:
    # a tie may hide an improvement on examples the shard does not hold: it climbs to the next rung
    incumbent = shard([1.0, 0.0, 0.5, 1.0])
    best = shard([1.0, 1.0, 1.0, 1.0])
    d = promotion_decision(dict(incumbent), incumbent, best, z=z)
    assert d.promote and "not behind" in d.reason


def test_z0_prunes_any_net_loss_and_trades() -> None:
    incumbent = shard([1.0] * 13)
    assert not promotion_decision(shard([0.0] + [1.0] * 12), incumbent, incumbent).promote
    inc2, best2 = shard([1.0, 0.0, 1.0]), shard([1.0, 1.0, 1.0])
    trade = shard([0.0, 1.0, 1.0])  # +1 and -1: a tie, not behind
    assert promotion_decision(trade, inc2, best2).promote
    assert not promotion_decision(shard([0.0, 0.0, 1.0]), inc2, best2).promote


def test_paired_test_arithmetic_on_13_examples() -> None:
    incumbent = shard([1.0] * 13)
    best = dict(incumbent)
    one_behind = shard([0.0] + [1.0] * 12)  # sum -1, se 1
    two_behind = shard([0.0, 0.0] + [1.0] * 11)  # sum -2, se sqrt(2)
    # one behind sits exactly on the z=1 boundary, which is inclusive
    assert promotion_decision(one_behind, incumbent, best, z=1.0).promote
    assert not promotion_decision(one_behind, incumbent, best, z=0.99).promote
    assert not promotion_decision(two_behind, incumbent, best, z=1.0).promote
    assert not promotion_decision(two_behind, incumbent, best, z=math.sqrt(2) - 1e-6).promote
    assert promotion_decision(two_behind, incumbent, best, z=1.5).promote  # -2 > -1.5 * 1.414


def test_paired_test_arithmetic_with_mixed_differences() -> None:
    incumbent = shard([0.5] * 8)
    best = shard([1.0] * 8)
    # diffs +0.5, -0.5, -0.5, -0.5, 0 x4: sum -1.0, se sqrt(4 * 0.25) = 1.0
    child = shard([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    assert promotion_decision(child, incumbent, best, z=1.0).promote
    assert not promotion_decision(child, incumbent, best, z=0.99).promote
    # diffs -0.5 x3: sum -1.5, se sqrt(0.75)
    child2 = shard([0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    threshold = 1.5 / math.sqrt(0.75)
    assert not promotion_decision(child2, incumbent, best, z=threshold - 1e-6).promote
    assert promotion_decision(child2, incumbent, best, z=threshold + 1e-6).promote


def test_comparison_uses_only_the_shard_examples() -> None:
    incumbent = shard([1.0] * 3 + [0.0] * 10)  # weak outside the shard: irrelevant
    best = shard([1.0] * 13)
    assert not promotion_decision({0: 0.0, 1: 1.0, 2: 1.0}, incumbent, best).promote
    assert promotion_decision({0: 1.0, 1: 1.0, 2: 1.0, 3: 0.5}, incumbent, best).promote


# --------------------------------------------------------------------------- fractions helpers


def test_default_rung_fractions() -> None:
    assert default_rung_fractions(7) == (1.0,)
    assert default_rung_fractions(24) == pytest.approx((1 / 3, 1.0))
    assert default_rung_fractions(72) == pytest.approx((1 / 9, 1 / 3, 1.0))
    assert default_rung_fractions(100, reduction_factor=2.0) == pytest.approx((1 / 8, 1 / 4, 1 / 2, 1.0))
    with pytest.raises(ValueError):
        default_rung_fractions(10, reduction_factor=1.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            default_rung_fractions(10, reduction_factor=bad)
    # a factor barely above 1 asked for ~10^9 rungs (and looped as long): the ladder stops at 16
    ladder = default_rung_fractions(1000, reduction_factor=1 + 1e-9)
    assert len(ladder) == 17 and ladder[-1] == 1.0 and ladder[0] < 1.0


@pytest.mark.parametrize("bad", [(), (0.5,), (0.0, 1.0), (0.5, 0.5, 1.0), (0.6, 0.3, 1.0), (1.0, 1.5)])
def test_validate_rung_fractions_rejects(bad: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        validate_rung_fractions(bad)


def test_validate_rung_fractions_accepts() -> None:
    assert validate_rung_fractions([0.25, 0.5, 1]) == (0.25, 0.5, 1.0)
