"""The width policies on their own: counts in, a width out (the orchestrator only feeds them counts)."""

from __future__ import annotations

from dspy_turbogepa.engine.width import GENERATIONS_TO_AFFORD, mutation_width, sibling_count
from tests.engine.fakes import make_config

PLENTY = 10**6  # a remaining budget that caps nothing


def test_the_width_follows_one_over_the_recent_success_share_within_its_bounds() -> None:
    cfg = make_config(max_mutations_in_flight=8, min_mutations_in_flight=1)
    assert mutation_width(cfg, accepted=10, attempts=10, remaining=PLENTY, val_size=10) == 1  # p ~ 0.92
    assert mutation_width(cfg, accepted=2, attempts=10, remaining=PLENTY, val_size=10) == 4  # p = 3/12
    assert mutation_width(cfg, accepted=0, attempts=40, remaining=PLENTY, val_size=10) == 8  # 1/p = 42, capped
    floored = make_config(max_mutations_in_flight=8, min_mutations_in_flight=3)
    assert mutation_width(floored, accepted=10, attempts=10, remaining=PLENTY, val_size=10) == 3


def test_the_width_never_exceeds_what_the_remaining_budget_pays_for() -> None:
    cfg = make_config(max_mutations_in_flight=8, min_mutations_in_flight=4)
    per_child = 2 * cfg.reflection_minibatch_size + 10
    two_wide = 2 * GENERATIONS_TO_AFFORD * per_child
    assert mutation_width(cfg, accepted=0, attempts=40, remaining=two_wide, val_size=10) == 2
    assert mutation_width(cfg, accepted=0, attempts=40, remaining=two_wide - 1, val_size=10) == 1
    assert mutation_width(cfg, accepted=0, attempts=40, remaining=0, val_size=10) == 1  # never 0


def test_a_fixed_width_ignores_the_counts() -> None:
    cfg = make_config(max_mutations_in_flight=5, adaptive_width=False)
    assert mutation_width(cfg, accepted=10, attempts=10, remaining=0, val_size=10) == 5


def test_best_of_k_starts_at_one_and_widens_as_children_stop_beating_their_parent() -> None:
    cfg = make_config(max_siblings=4, max_reflections_in_flight=4)
    assert sibling_count(cfg, passed=0, tried=0, remaining=PLENTY, val_size=10) == 1  # prior 2 of 3
    assert sibling_count(cfg, passed=1, tried=7, remaining=PLENTY, val_size=10) == 3  # p = 3/10
    assert sibling_count(cfg, passed=0, tried=30, remaining=PLENTY, val_size=10) == 4  # capped by max_siblings
    assert sibling_count(make_config(max_siblings=4, max_reflections_in_flight=2), passed=0, tried=30,
                         remaining=PLENTY, val_size=10) == 2  # and by the reflections allowed at once
    assert sibling_count(make_config(max_siblings=1), passed=0, tried=30, remaining=PLENTY, val_size=10) == 1


def test_best_of_k_shrinks_when_the_budget_could_not_pay_for_more_such_steps() -> None:
    cfg = make_config(max_siblings=4, max_reflections_in_flight=4)
    mb = cfg.reflection_minibatch_size
    for k in (4, 3, 2):
        enough = GENERATIONS_TO_AFFORD * ((k + 1) * mb + 10)
        assert sibling_count(cfg, passed=0, tried=30, remaining=enough, val_size=10) == k
        assert sibling_count(cfg, passed=0, tried=30, remaining=enough - 1, val_size=10) == k - 1
