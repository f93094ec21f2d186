"""MetricBudget: reservations, charging each (candidate, split, example) pair once, hard limit."""

from __future__ import annotations

import pytest

from dspy_turbogepa.engine.budget import MetricBudget, PlanLimits


def test_reservation_arithmetic() -> None:
    b = MetricBudget(10)
    assert (b.limit, b.committed, b.reserved, b.remaining()) == (10, 0, 0, 10)
    assert b.try_reserve(4)
    assert (b.reserved, b.remaining()) == (4, 6)
    assert not b.try_reserve(7)  # 4 + 7 > 10: refused, nothing reserved
    assert (b.reserved, b.remaining()) == (4, 6)
    assert b.try_reserve(6)  # exactly what is left
    assert b.remaining() == 0
    assert not b.try_reserve(1)
    assert b.try_reserve(0)
    b.release(6)
    assert b.commit([("fp", "val", 0), ("fp", "val", 1), ("fp", "train", 0)]) == 3
    # committed 3 + reserved 4 -> 3 left
    assert (b.committed, b.reserved, b.remaining()) == (3, 4, 3)
    b.release(4)
    assert (b.committed, b.reserved, b.remaining()) == (3, 0, 7)


def test_commit_charges_each_pair_once() -> None:
    b = MetricBudget(10)
    assert b.commit([("a", "val", 0), ("a", "val", 0)]) == 1
    assert b.commit([("a", "val", 0), ("a", "val", 1)]) == 1
    assert b.commit([]) == 0
    assert b.committed == 2
    assert b.is_charged(("a", "val", 1))
    assert not b.is_charged(("a", "train", 1))
    assert not b.is_charged(("b", "val", 0))


def test_release_more_than_reserved_raises_and_keeps_state() -> None:
    b = MetricBudget(10)
    with pytest.raises(RuntimeError, match="more budget than reserved"):
        b.release(1)
    b.try_reserve(3)
    with pytest.raises(RuntimeError):
        b.release(4)
    assert b.reserved == 3
    b.release(3)
    assert b.reserved == 0


def test_record_execution_raises_past_the_limit() -> None:
    b = MetricBudget(3)
    for _ in range(3):
        b.record_execution()
    assert b.executed == 3
    with pytest.raises(RuntimeError, match="budget exceeded: 4 > 3"):
        b.record_execution()


def test_executions_are_separate_from_charges() -> None:
    b = MetricBudget(5)
    b.record_execution()
    assert b.committed == 0 and b.remaining() == 5
    b.commit([("x", "val", 0)])
    assert b.executed == 1 and b.committed == 1


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(limit: int) -> None:
    with pytest.raises(ValueError):
        MetricBudget(limit)


def test_with_overshoot_only_a_standard_mutation_may_straddle_the_limit() -> None:
    """GEPA's semantics let the last mutation finish past the budget, by at most one standard mutation's
    worst case (``overshoot``); a larger reservation (best-of-k, scouts) must fit inside the limit."""
    b = MetricBudget(100, overshoot=10)
    assert b.fits(95, 10)  # straddles, within one standard mutation
    assert not b.fits(95, 11)  # more than that may not straddle
    assert b.fits(80, 20)  # inside the limit: always
    assert not b.fits(100, 1)  # used up


def test_the_last_resort_guard_allows_exactly_overshoot_minus_one_past_the_limit() -> None:
    b = MetricBudget(3, overshoot=2)
    for _ in range(4):
        b.record_execution()
    with pytest.raises(RuntimeError, match="budget exceeded"):
        b.record_execution()


def test_a_negative_overshoot_is_refused() -> None:
    with pytest.raises(ValueError, match="overshoot"):
        MetricBudget(10, overshoot=-1)


def test_plan_limits_follow_the_earlier_budgets_that_grew_then_this_one() -> None:
    limits = PlanLimits([100, 80, 250, 250], 400)  # 80 below 100 and the repeated 250 add nothing
    seen = [limits.current]
    while limits.advance():
        seen.append(limits.current)
    assert seen == [100, 250, 400]
    assert limits.current == 400 and not limits.advance()
    smaller = PlanLimits([300], 200)  # plans as the 300 session did; the budget's own limit stops it
    assert smaller.current == 300 and not smaller.advance()
    assert PlanLimits([], 50).current == 50


def test_fits_checks_a_plan_limit_below_the_budgets_own() -> None:
    budget = MetricBudget(400, overshoot=10)
    assert budget.fits(95, 10, limit=100) and not budget.fits(100, 1, limit=100)
    assert not budget.fits(95, 20, limit=100)  # straddles the plan limit by more than a standard mutation
    assert budget.fits(300, 50, limit=1000) and not budget.fits(400, 1, limit=1000)  # never past its own
