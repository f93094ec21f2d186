"""Secondary budgets: wall clock and tokens stop launching and say which budget ended the run."""

from __future__ import annotations

import time

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

from helpers import small_splits


def _run(routing, call_seconds=0.005, **kw):
    splits = small_splits(routing, n_train=30, n_val=12)

    def slow(request):
        time.sleep(call_seconds)

    opt = TurboGEPA(routing.metric, max_metric_calls=5000, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    track_stats=True, **kw)
    with dspy.context(lm=make_student_lm(seed=0, noise=None, before_call=slow)):
        return opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results


def test_time_budget(routing):
    start = time.monotonic()
    dr = _run(routing, call_seconds=0.02, time_budget_seconds=1.0)  # slow enough not to finish the search first
    assert dr.stop_reason == "time_budget"
    assert time.monotonic() - start < 20
    assert dr.total_metric_calls < 5000


def test_reflection_token_budget_counts(routing):
    dr = _run(routing, token_budget=2000)
    assert dr.stop_reason == "token_budget"
    used = dr.run_stats["reflection_tokens"]["prompt"] + dr.run_stats["reflection_tokens"]["completion"] + \
        dr.run_stats["task_tokens"]["prompt"] + dr.run_stats["task_tokens"]["completion"]
    assert used >= 2000


@pytest.mark.parametrize("kw", [{"token_budget": 0}, {"cost_budget_usd": -1.0}, {"time_budget_seconds": "1"}])
def test_bad_secondary_budgets(routing, kw):
    with pytest.raises((ValueError, TypeError)):
        TurboGEPA(routing.metric, max_metric_calls=10, reflection_lm=make_reflection_lm(), **kw)


def test_price_table_prices_unknown_models_and_cost_budget_stops(routing):
    # the fake LM reports no cost; a price table makes its tokens cost money
    dr = _run(routing, price_table={"sim/sim-student": (1000.0, 1000.0)}, cost_budget_usd=5.0)
    assert dr.stop_reason == "cost_budget"
    tokens = dr.run_stats["task_tokens"]
    assert dr.run_stats["cost"]["task"] == pytest.approx((tokens["prompt"] + tokens["completion"]) * 1000.0 / 1e6,
                                                         rel=1e-6)
    with pytest.raises(ValueError, match="price_table"):
        TurboGEPA(routing.metric, max_metric_calls=10, reflection_lm=make_reflection_lm(), price_table={"x": 1.0})


def test_a_cost_budget_on_unpriced_lms_warns_that_it_cannot_apply(routing, caplog):
    """Local and custom models have no price: a dollar cap that can never trigger must say so once,
    not leave the user believing it is on."""
    import logging

    with caplog.at_level(logging.WARNING):
        dr = _run(routing, call_seconds=0.0, cost_budget_usd=0.01)
    assert dr.stop_reason != "cost_budget"
    warned = [r.getMessage() for r in caplog.records if "cost_budget_usd=0.01 is set" in r.getMessage()]
    assert len(warned) == 1 and "price_table" in warned[0]
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        _run(routing, call_seconds=0.0, price_table={"sim/sim-student": (1000.0, 1000.0)}, cost_budget_usd=5.0)
    assert not [r for r in caplog.records if "is set but" in r.getMessage()]


def test_a_score_above_perfect_score_is_warned_about_once(routing, student_lm, reflection_lm, caplog):
    """perfect_score also says which examples count as solved for failure-first sampling, scouts and
    feedback reuse (even with skip_perfect_score=False): a 0-10 metric under the default 1.0 treats a
    5/10 as solved, silently."""
    import logging

    def out_of_ten(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 10.0 * routing.metric(gold, pred, trace, pred_name, pred_trace).score

    splits = small_splits(routing, n_train=10, n_val=8)
    opt = TurboGEPA(out_of_ten, max_metric_calls=40, reflection_lm=reflection_lm, num_threads=4,
                    skip_perfect_score=False, verbose=False)
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"), dspy.context(lm=student_lm):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert caplog.text.count("above perfect_score=1.0") == 1
