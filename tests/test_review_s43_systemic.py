"""Session 43's review of systemic-failure detection: a metric that starts answering no usable score
mid-run (a judge answering None) broke as one that starts raising does, and stops the run; one that
gives no score only for some candidates' outputs does not."""

from __future__ import annotations

import threading

import pytest

from dspy_turbogepa import SystemicFailureError
from dspy_turbogepa.testing import TASKS
from tests.helpers import quick_compile
from tests.test_review_s32_diff import _versioned_compile

ROUTING = TASKS["routing"]


def test_a_metric_that_starts_answering_none_mid_run_stops_the_run():
    lock = threading.Lock()
    calls = [0]

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n > 60:
            return None  # the judge behind it broke
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    with pytest.raises(SystemicFailureError) as info:
        quick_compile(metric=metric, budget=400)
    assert info.value.failure == "metric_invalid"
    assert "broke mid-run" in str(info.value) and "no usable score" in str(info.value)
    assert calls[0] < 200  # stopped, not run to the budget


def test_a_metric_that_gives_no_score_for_some_candidates_outputs_does_not_stop_the_run():
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 1.0 if pred.instr == "version 0" and gold.i % 2 == 0 else (0.0 if pred.instr == "version 0" else None)

    result = _versioned_compile(metric, budget=200)
    assert result.stop_reason in ("max_metric_calls", "no_progress_possible")
