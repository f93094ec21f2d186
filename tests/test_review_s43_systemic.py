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


def test_an_outage_the_budget_outran_stops_the_run_instead_of_returning():
    """The student's endpoint starts answering what cannot be used (a gateway's page: not retried, so each
    failure takes milliseconds) after 40 calls; the budget ends long before the outage rule's two minutes.
    The run returned as finished, its program chosen on failed evaluations."""
    from dspy.utils.exceptions import LMProviderError

    from dspy_turbogepa.testing import make_student_lm

    lock = threading.Lock()
    calls = [0]

    def gateway_page(request):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n > 40:
            raise LMProviderError("<html>502 Bad Gateway</html>", model="openai/sim-student")

    lm = make_student_lm(before_call=gateway_page, async_before_call=gateway_page)
    with pytest.raises(SystemicFailureError) as info:
        quick_compile(budget=150, lm=lm)
    assert "LM service" in str(info.value), str(info.value)


def test_a_short_blip_as_a_healthy_run_ends_does_not_stop_it():
    """One window of service failures at the end may be a blip; it takes two to call it an outage."""
    from dspy_turbogepa.engine.systemic import SystemicFailureDetector
    from dspy_turbogepa.engine.types import EvalOutcome

    now = [0.0]
    detector = SystemicFailureDetector(window=4, outage_window=4, split_sizes={"val": 4, "train": 4},
                                       clock=lambda: now[0])
    for i in range(500):
        now[0] += 1
        detector.observe(EvalOutcome(i % 4, 1.0), split="val")

    def blip(n):
        for i in range(n):
            now[0] += 1
            detector.observe(EvalOutcome(i % 4, 0.0, failure="program_error", service_failure=True,
                                         error_type="LMServerError", message="gave up"), split="val")

    blip(4)
    detector.check_final()  # returns
    blip(4)
    with pytest.raises(SystemicFailureError):
        detector.check_final()


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine", [None, "litellm"])
def test_a_second_lm_that_never_answered_refusing_connections_stops_the_run(engine):
    """Its predictor runs only on some examples, after other rollouts succeeded: a refused connection there
    was retried as an endpoint restarting, and the run ended as "no progress" after minutes."""
    import dspy

    from dspy_turbogepa.testing import make_student_lm

    extra = {"engine": engine} if engine else {}
    second = dspy.LM("openai/second", api_base=f"http://127.0.0.1:{_dead_port()}/v1", api_key="x", cache=False,
                     **extra)
    calls = [0]

    class TwoStage(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = ROUTING.make_program()
            self.check = dspy.Predict("ticket, queue -> verdict")
            self.check.set_lm(second)

        def forward(self, ticket):
            out = self.inner(ticket=ticket)
            calls[0] += 1
            if calls[0] > 12 and len(ticket) % 2 == 0:
                self.check(ticket=ticket, queue=out.queue)
            return out

    with pytest.raises(SystemicFailureError) as info:
        quick_compile(program=TwoStage(), budget=200, lm=make_student_lm())
    assert info.value.error_type == "ConnectionRefusedError", str(info.value)


def test_an_lm_copy_notes_its_answers_from_any_thread_and_after_a_copy_to_another_endpoint():
    """A thread the program starts does not see DSPy's settings; a copy made with lm.copy(api_base=...)
    keeps the attributes of the one it was made from."""
    import dspy

    from dspy_turbogepa.adapter.lm_copies import AnsweredEndpoints, LMCopies, endpoint_key
    from dspy_turbogepa.testing import make_student_lm

    answered = AnsweredEndpoints()
    original = make_student_lm()
    copy = LMCopies(answered).get(original)
    worker = threading.Thread(target=lambda: copy("Which queue?"))
    worker.start()
    worker.join()
    assert endpoint_key(original) in answered
    moved = copy.copy()  # a copy keeps the attributes of the one it was made from
    moved.model = "openai/elsewhere"  # as lm.copy(model=...) / (api_base=...) would for an HTTP LM
    moved("Which queue?")
    assert endpoint_key(moved) in answered and endpoint_key(moved) != endpoint_key(original)
    assert isinstance(moved, dspy.BaseLM)


def test_the_metric_probe_asks_three_times_before_calling_a_metric_broken_whatever_began_the_streak():
    from dspy_turbogepa.adapter.evaluator import DspyEvaluator  # noqa: F401 - the class under test
    from tests.helpers import make_evaluator

    answers: list = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return answers.pop(0)

    ev, _codec = make_evaluator(ROUTING, metric=metric)
    try:
        example = ev._data["val"][0]
        ev._metric_check.probe_after = 1
        for began in (RuntimeError("judge down"), "the metric returned no score (None)"):
            answers[:] = [None, 0.5]  # noisy: one None, then a score
            ev._metric_check.scored(example, object())
            ev._check_metric_still_works(began)  # does not stop
            answers[:] = [None, None, None]
            ev._metric_check.scored(example, object())
            with pytest.raises(SystemicFailureError) as info:
                ev._check_metric_still_works(began)
            assert info.value.failure == "metric_invalid"
    finally:
        ev.close()
