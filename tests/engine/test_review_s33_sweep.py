"""Regressions found by a 12,000-case run of the invariant sweep (tests/engine/test_invariants.py) in
session 33. The cases are frozen here, not referenced by sweep number, so a change to the sweep's case
generator cannot quietly turn them into other cases."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest

from .fakes import snapshot
from .test_invariants import check, one

_COMMON: dict[str, Any] = {
    "max_evals_in_flight": 5, "reflection_minibatch_size": 1, "deterministic": True, "strict_budget": False,
    "use_merge": True, "max_merge_invocations": 6, "reflection_scouts": 5, "reflection_feedback_reuse": 3,
    "skip_perfect_score": True, "perfect_score": 0.5, "minibatch_sampling": "epoch",
    "candidate_selection": "pareto", "adaptive_width": True, "speculative_chaining": True,
    "accept_equal_on_minibatch": False, "component_selector": "CALLABLE", "width_window": 1,
}

# A callable component_selector advances gepa's round-robin counters after its parent's minibatch; a merge
# read its parents' counters when it was planned, so whether an earlier mutation's selector had run by then
# depended on timing, and the merged child's counter (what the selector later sees) with it.
MERGE_WITH_CALLABLE_SELECTOR = [
    {"cfg": {**_COMMON, "max_metric_calls": 348, "max_mutations_in_flight": 2, "max_reflections_in_flight": 3,
             "rung_fractions": (0.5, 1.0), "seed": 656, "max_siblings": 2, "adaptive_components": True,
             "merge_subsample_size": 5, "promotion_z": 0.0, "min_mutations_in_flight": 1,
             "max_noop_mutations": 3, "max_paid_noop_mutations": 3},
     "train_n": 17, "val_n": 15, "ncomp": 2, "hidden_every": 2, "p_fail": 0.1, "fail_kind": "metric_error",
     "p_raise": 0.3, "p_skip": 0, "p_echo": 0, "mode": "replace", "num_keywords": 7, "shared": False,
     "ids": "range", "frac": True},
    {"cfg": {**_COMMON, "max_metric_calls": 157, "max_evals_in_flight": 6, "max_mutations_in_flight": 5,
             "max_reflections_in_flight": 4, "rung_fractions": (1.0,), "seed": 195, "max_siblings": 4,
             "adaptive_components": False, "merge_subsample_size": 4, "promotion_z": 2.0,
             "min_mutations_in_flight": 2, "max_noop_mutations": 5, "max_paid_noop_mutations": 2},
     "train_n": 29, "val_n": 7, "ncomp": 3, "hidden_every": 0, "p_fail": 0, "fail_kind": "metric_error",
     "p_raise": 0, "p_skip": 0, "p_echo": 0.1, "mode": "replace", "num_keywords": 2, "shared": False,
     "ids": "range", "frac": True},
]


@pytest.mark.parametrize("case", MERGE_WITH_CALLABLE_SELECTOR, ids=["seed656", "seed195"])
def test_merge_beside_a_callable_selector_is_reproducible_under_other_timing(case: dict[str, Any]) -> None:
    logging.disable(logging.CRITICAL)
    try:
        runs = []
        for sleep_seed in (7558, 7558 + 7777, 11265):
            result, orch, ev, refl, setup, systemic = one(copy.deepcopy(case), sleep_seed=sleep_seed)
            assert systemic is None, systemic
            assert not check(case, result, orch, ev, refl, setup)
            runs.append(result)
    finally:
        logging.disable(logging.NOTSET)
    assert any(r.candidate.kind == "merge" for r in runs[0].records), "the case no longer merges"
    first = runs[0]
    for other in runs[1:]:
        assert snapshot(other) == snapshot(first)
        assert (other.best_index, other.stop_reason, other.total_metric_calls) == \
            (first.best_index, first.stop_reason, first.total_metric_calls)
