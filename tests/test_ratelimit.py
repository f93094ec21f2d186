"""Rate limits are not failed evaluations; transient LM errors are retried a few times; systemic ones stop.

Unit level: the evaluator on fake LMs that raise dspy.lm15 errors. Through HTTP: the loopback simulator
capped at 8 concurrent student requests (excess gets a 429 at once) while the optimizer asks for 32.
Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import time
from collections import Counter

import dspy
import pytest
from dspy import lm15

import dspy_turbogepa.teleprompter as teleprompter_module
from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.adapter.evaluator import DspyEvaluator
from dspy_turbogepa.adapter.program import ProgramCodec
from dspy_turbogepa.adapter.ratelimit import (
    FATAL_ERROR_TYPES,
    RetryPolicy,
    classify,
    fatal_error_name,
    retry_after_of,
)
from dspy_turbogepa.engine.systemic import SystemicFailureDetector
from dspy_turbogepa.testing import ModelConfig, SimConfig, SimServer
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

from helpers import TwoParallelBranches, small_splits
from helpers import make_evaluator as shared_evaluator

FAST_RL = RetryPolicy(max_retries=10, max_elapsed_s=30.0, base_s=0.005, cap_s=0.05)
FAST_TR = RetryPolicy(max_retries=3, max_elapsed_s=30.0, base_s=0.005, cap_s=0.05)


class Flaky:
    """A before_call hook raising ``make()`` for the first ``times`` calls (-1: always)."""

    def __init__(self, make, times: int) -> None:
        self.make, self.left, self.raised = make, times, 0
        self._lock = threading.Lock()

    def __call__(self, request) -> None:
        with self._lock:
            if self.left == 0:
                return
            if self.left > 0:
                self.left -= 1
            self.raised += 1
        raise self.make()


def flaky_lm(make, times, **kw):
    hook = Flaky(make, times)
    return make_student_lm(before_call=hook, async_before_call=hook, **kw), hook


def make_evaluator(task, program=None, n=4, **kw):
    """The shared evaluator, with retry policies fast enough for tests."""
    kw.setdefault("rate_limit_policy", FAST_RL)
    kw.setdefault("transient_policy", FAST_TR)
    return shared_evaluator(task, program, n=n, **kw)


def evaluate(ev, codec, lm, ids=(0,)):
    async def main():
        with dspy.context(lm=lm):
            return await asyncio.gather(
                *(ev.evaluate(codec.seed_texts(), "seed", "val", i, True) for i in ids)
            )

    try:
        return asyncio.run(main())
    finally:
        ev.close()


def rate_limit(retry_after=0.001):
    return lm15.RateLimitError("Too many requests", status=429, retry_after=retry_after)


# --------------------------------------------------------------------------- unit level
@pytest.mark.parametrize("async_forward", [False, True], ids=["sync", "async"])
def test_a_429_is_retried_not_scored(routing, async_forward):
    lm, hook = flaky_lm(rate_limit, 3)
    reference, _ = make_evaluator(routing, routing.make_program(async_forward=async_forward))
    (clean,) = evaluate(reference, reference._codec, make_student_lm())
    ev, codec = make_evaluator(routing, routing.make_program(async_forward=async_forward))
    (outcome,) = evaluate(ev, codec, lm)
    assert hook.raised == 3
    assert outcome.failure is None and outcome.score == clean.score
    assert outcome.rate_limit_retries == 3  # the LM's own retries were off: we saw every 429
    stats = ev.rate_limit_stats()
    assert stats["rate_limited"] == 3 and stats["rate_limit_retries"] == 3 and stats["rate_limit_gave_up"] == 0
    assert stats["backoff_seconds"] > 0
    (endpoint,) = stats["endpoints"].values()
    assert endpoint["min_window"] < 8 and endpoint["rate_limited"] == 3
    assert lm.num_retries == 3  # the user's LM is untouched


def test_a_429_wrapped_by_the_users_program_is_still_found(routing):
    class Wrapping(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = routing.make_program()

        def forward(self, **kw):
            try:
                return self.inner(**kw)
            except Exception as exc:
                raise RuntimeError("my pipeline failed") from exc

    lm, hook = flaky_lm(rate_limit, 2)
    ev, codec = make_evaluator(routing, Wrapping())
    (outcome,) = evaluate(ev, codec, lm)
    assert outcome.failure is None and outcome.rate_limit_retries == 2 and hook.raised == 2


@pytest.mark.parametrize("swallow", ["parallel", "parallel_gives_up", "try_except"])
def test_a_429_the_program_swallows_is_still_retried_not_scored(routing, swallow):
    """dspy.Parallel returns None for a failed branch (and a program may catch an LM error itself): with
    the LM's own retries off, the 429 must still reach the rate-limit retry, not become a wrong answer.
    Once its branches' errors reach ``max_errors``, dspy.Parallel raises a bare "Execution cancelled"
    with no cause: that was scored as the program's failure, the 429 neither retried nor counted."""

    class CatchesItself(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = routing.make_program()

        def forward(self, ticket):
            try:
                return self.inner(ticket=ticket)
            except Exception:  # the program's own fallback
                return dspy.Prediction(queue="")

    def Swallowing():
        if swallow == "try_except":
            return CatchesItself()
        return TwoParallelBranches(routing.make_program(), max_errors=1 if swallow == "parallel_gives_up" else None)

    clean = []
    for i in range(4):  # one at a time: concurrent dspy.Parallel instances race in tqdm's global instance set
        reference, _ = make_evaluator(routing, Swallowing())
        clean += evaluate(reference, reference._codec, make_student_lm(), ids=(i,))
    solved = next(o.example_id for o in clean if o.score == 1.0)  # a swallowed 429 would score it 0
    lm, hook = flaky_lm(rate_limit, 2)
    ev, codec = make_evaluator(routing, Swallowing())
    (outcome,) = evaluate(ev, codec, lm, ids=(solved,))
    assert hook.raised == 2
    assert outcome.failure is None and outcome.score == 1.0
    assert outcome.rate_limit_retries >= 1 and ev.rate_limit_stats()["rate_limited"] >= 1


def test_a_revoked_key_in_a_parallel_branch_that_gives_up_stops_the_run(routing):
    """dspy.Parallel at ``max_errors`` raises a bare Exception: the 401 noted under it is what the
    rollout failed of, and it is fatal (it read as one program's failure, and the run went on)."""
    from dspy import lm15

    lm, _ = flaky_lm(lambda: lm15.AuthError("invalid api key", status=401), -1)
    ev, codec = make_evaluator(routing, TwoParallelBranches(routing.make_program(), max_errors=1))
    (outcome,) = evaluate(ev, codec, lm)
    assert outcome.fatal and outcome.error_type == "LMAuthError", (outcome.error_type, outcome.message)


def test_time_queued_for_the_window_is_not_counted_as_backing_off(routing):
    """The policy's ``max_elapsed_s`` ran from before the rollout queued for its window slot: a rollout
    queued behind a slow one (a shrunken window) met its first 429 with the policy's time used up and
    gave up with no retry, scored as a failure."""
    calls = [0]
    lock = threading.Lock()

    def hook(request):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n == 1:
            time.sleep(0.5)  # the first rollout holds the only slot (a slow answer)
        elif n == 2:
            raise rate_limit(0.001)  # the queued rollout's first attempt: one ordinary 429

    policy = RetryPolicy(max_retries=10, max_elapsed_s=0.3, base_s=0.005, cap_s=0.05)
    ev, codec = make_evaluator(routing, window_limit=1, rate_limit_policy=policy, max_workers=2)
    outcomes = evaluate(ev, codec, make_student_lm(before_call=hook), ids=(0, 1))
    assert [o.failure for o in outcomes] == [None, None], [o.message for o in outcomes]
    assert sum(o.rate_limit_retries for o in outcomes) == 1


def _two_rollouts_around_a_cool_down(routing, slow_error, policy_kw):
    """Rollout 1's first call fails after 0.24 s; rollout 0's first, at once, with a 429 whose
    Retry-After pauses the endpoint to 0.7 s; rollout 1 waits that out (0.45 s), and its slow second
    call fails at 1.26 s. Returns both outcomes and rollout 1's call count."""
    from dspy_turbogepa.testing.fake_lm import request_messages

    ev, codec = make_evaluator(routing, window_limit=2, **policy_kw)
    slow_ticket = ev._data["val"][1].ticket
    calls = {"slow": 0, "fast": 0}
    lock = threading.Lock()

    def hook(request):
        mine = slow_ticket in " ".join(str(m.get("content", "")) for m in request_messages(request))
        with lock:
            calls["slow" if mine else "fast"] += 1
            n = calls["slow" if mine else "fast"]
        if mine and n <= 2:  # rollout 1: two slow calls that fail
            time.sleep(0.24 if n == 1 else 0.56)
            raise slow_error()
        if not mine and n == 1:
            raise rate_limit(0.7)

    outcomes = evaluate(ev, codec, make_student_lm(before_call=hook), ids=(0, 1))
    return outcomes, calls["slow"]


def test_an_endpoint_cool_down_counts_as_backing_off(routing):
    """Only the time queued for a slot is left out of the rate-limit policy's time: a cool-down another
    rollout's 429 imposed is a rate limit's wait. Rollout 1's second 429 comes 1.02 s into a 0.95 s
    policy and it gives up (with the cool-down counted as queueing, 0.57 s: it retried past the bound).
    0.95 s, not 0.8: rollout 0 retries after its 0.7 s Retry-After, and full suites on loaded cores
    (review helpers beside them) used up 0.8 twice; load only makes rollout 1's 1.02 s later."""
    outcomes, slow_calls = _two_rollouts_around_a_cool_down(
        routing, lambda: rate_limit(0.001), {"rate_limit_policy": RetryPolicy(10, 0.95, 0.001, 0.002)})
    assert outcomes[0].failure is None, outcomes[0].message
    assert outcomes[1].failure == "rate_limited" and slow_calls == 2, (outcomes[1].message, slow_calls)


def test_a_rate_limit_cool_down_is_no_part_of_the_transient_policy(routing):
    """The same wait, between two 503s: it is the rate limit's, not the 5xx policy's, whose 1.0 s then
    has 0.57 s used: the rollout is retried and answers (with the cool-down counted, 1.26 s: it would
    give up). 1.0 s, not 0.8: a full suite on two loaded cores used up 0.8 once."""
    outcomes, slow_calls = _two_rollouts_around_a_cool_down(
        routing, lambda: lm15.ServerError("upstream 503", status=503),
        {"transient_policy": RetryPolicy(3, 1.0, 0.001, 0.002),
         "rate_limit_policy": RetryPolicy(10, 5.0, 0.001, 0.002)})
    assert [o.failure for o in outcomes] == [None, None], [o.message for o in outcomes]
    assert slow_calls == 3


def test_waiting_out_rate_limits_does_not_use_up_the_transient_policy(routing):
    """Both policies ran on one clock from the rollout's start: after a long Retry-After, the first 5xx
    was given up at once (0 retries), its policy's time spent waiting out a 429."""
    errors = iter([rate_limit(0.4), lm15.ServerError("upstream 503", status=503)])

    def hook(request):
        error = next(errors, None)
        if error is not None:
            raise error

    ev, codec = make_evaluator(routing, transient_policy=RetryPolicy(3, 0.3, 0.005, 0.05))
    (outcome,) = evaluate(ev, codec, make_student_lm(before_call=hook))
    assert outcome.failure is None, outcome.message


def test_a_revoked_key_a_branch_caught_wins_over_a_429_the_program_raised(routing):
    """A systemic failure anywhere in the rollout stops the run, also when the program's own error is a
    retryable one: a retried 429 would hit the revoked key again, rollout after rollout."""
    from dspy import lm15

    class CatchesThenRaises(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = routing.make_program()

        def forward(self, ticket):
            with contextlib.suppress(Exception):  # the branch's 401, swallowed
                self.inner(ticket=ticket)
            raise lm15.RateLimitError("Too many requests", status=429, retry_after=0.001)

    lm, _ = flaky_lm(lambda: lm15.AuthError("invalid api key", status=401), -1)
    ev, codec = make_evaluator(routing, CatchesThenRaises())
    (outcome,) = evaluate(ev, codec, lm)
    assert outcome.fatal and outcome.error_type == "LMAuthError", (outcome.error_type, outcome.message)


def test_gives_up_after_the_cap_with_cause_rate_limited(routing):
    lm, hook = flaky_lm(rate_limit, -1)
    ev, codec = make_evaluator(routing, rate_limit_policy=RetryPolicy(2, 30.0, 0.001, 0.01))
    (outcome,) = evaluate(ev, codec, lm)
    assert hook.raised == 3  # first attempt + 2 retries
    assert outcome.failure == "rate_limited" and outcome.score == 0.0
    assert outcome.error_type == "LMRateLimitError" and "gave up" in outcome.message
    assert outcome.rate_limit_retries == 2
    assert outcome.trajectory.failure == "program_error"  # reflection skips it as an infrastructure error
    assert ev.rate_limit_stats()["rate_limit_gave_up"] == 1


def test_no_backoff_outlasts_the_policy_whatever_retry_after_says(routing, caplog):
    """A Retry-After of a day (a quota reset) was slept in full, holding the evaluation slot, and the
    endpoint's cool-down parked every other rollout as long. Now: give up at once when the server asks
    for more than the policy has left, never wait past it; a wait past the whole policy is fatal (the
    run stops on it) and parks no other rollout."""
    import random

    policy = RetryPolicy(max_retries=10, max_elapsed_s=300.0, base_s=0.5, cap_s=30.0)
    rng = random.Random(0)
    assert policy.delay(0, 86_400.0, rng) is None  # not worth waiting for
    assert policy.delay(0, 250.0, rng, elapsed_s=100.0) is None
    assert 250.0 <= policy.delay(0, 250.0, rng, elapsed_s=10.0) <= 290.0  # honoured, within what is left
    assert policy.delay(3, None, rng, elapsed_s=299.0) == pytest.approx(1.0)  # cut to the time left
    assert policy.delay(10, None, rng) is None and policy.delay(0, None, rng, elapsed_s=300.0) is None

    now = [0.0]
    sleeps: list[float] = []

    async def fake_sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    lm, hook = flaky_lm(lambda: rate_limit(86_400.0), 1)
    ev, codec = make_evaluator(routing, rate_limit_policy=policy, clock=lambda: now[0], sleep=fake_sleep)
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        (outcome,) = evaluate(ev, codec, lm)
    assert hook.raised == 1 and sleeps == [] and now[0] == 0.0
    assert outcome.failure == "rate_limited" and "gave up" in outcome.message
    assert "the server asked to wait 86400s (Retry-After), more than the 300s left" in outcome.message
    assert outcome.fatal and outcome.service_failure  # every later rollout would give up the same way
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("stayed rate limited" in m for m in warned) == 1
    window = ev._windows.window(next(iter(ev._windows._windows)))
    assert window.cooldown_until <= 0.0  # the next rollout to this endpoint does not wait
    # a wait the policy could still honour is an ordinary give-up, not a reason to stop the run
    lm2, _ = flaky_lm(lambda: rate_limit(250.0), -1)
    ev2, codec2 = make_evaluator(routing, rate_limit_policy=policy, clock=lambda: now[0], sleep=fake_sleep)
    (outcome2,) = evaluate(ev2, codec2, lm2)
    assert outcome2.failure == "rate_limited" and not outcome2.fatal


def test_a_rate_limited_judge_is_not_called_again_once_the_run_ended(routing):
    """The metric's own 429 backoff was a time.sleep: close() could not cut it short, and the judge was
    called (and paid) again after the run had ended."""
    calls: list[float] = []
    first_call = threading.Event()

    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls.append(time.monotonic())
        if len(calls) == 1:
            first_call.set()
            raise lm15.RateLimitError("judge quota", status=429, retry_after=20.0)
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    codec = ProgramCodec(routing.make_program())
    examples = small_splits(routing, n_train=2, n_val=2, n_test=0).val
    ev = DspyEvaluator(codec, {"train": examples, "val": examples}, judge, 0.0, max_workers=2)
    result: dict[str, object] = {}

    def run():
        async def main():
            with dspy.context(lm=make_student_lm()):
                return await ev.evaluate(codec.seed_texts(), "seed", "val", 0, True)

        try:
            result["outcome"] = asyncio.run(main())
        except BaseException as exc:  # inspected below
            result["error"] = exc

    thread = threading.Thread(target=run)
    started = time.monotonic()
    thread.start()
    assert first_call.wait(10)
    ev.close()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 10  # not the 20 s the judge asked for
    assert len(calls) == 1, "the judge was called again after close()"
    assert "outcome" not in result, result  # the rollout is not scored


@pytest.mark.parametrize(
    "make", [lambda: lm15.ServerError("boom", status=503), lambda: lm15.TimeoutError("slow"),
             lambda: lm15.TransportError("connection reset")],
    ids=["5xx", "timeout", "reset"],
)
def test_transient_errors_are_retried_then_scored_with_their_cause(routing, make, caplog):
    lm, hook = flaky_lm(make, 1)
    ev, codec = make_evaluator(routing)
    (healed,) = evaluate(ev, codec, lm)
    assert healed.failure is None and hook.raised == 1 and healed.rate_limit_retries == 0
    assert ev.rate_limit_stats()["transient_retries"] == 1

    lm, hook = flaky_lm(make, -1)
    ev, codec = make_evaluator(routing)
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        (outcome,) = evaluate(ev, codec, lm)
    assert hook.raised == 1 + FAST_TR.max_retries
    # one INFO line per error type (a flaky server made three of every four lines of a run's log these)
    retries = [r for r in caplog.records if r.getMessage().startswith("Retrying a rollout")]
    assert len(retries) == FAST_TR.max_retries >= 2
    assert [r.levelno for r in retries] == [logging.INFO] + [logging.DEBUG] * (len(retries) - 1)
    assert outcome.failure == "program_error" and outcome.error_type.startswith("LM")
    assert outcome.error_type not in FATAL_ERROR_TYPES
    assert ev.rate_limit_stats()["transient_gave_up"] == 1


@pytest.mark.parametrize(
    "make,error_type",
    [(lambda: lm15.AuthError("bad key", status=401), "LMAuthError"),
     (lambda: lm15.UnsupportedModelError("no such model", status=404), "LMUnsupportedModelError"),
     (lambda: lm15.BillingError("insufficient_quota", status=429), "LMBillingError")],
    ids=["401", "404", "quota-429"],
)
def test_systemic_errors_are_never_retried(routing, make, error_type):
    lm, hook = flaky_lm(make, -1)
    ev, codec = make_evaluator(routing)
    (outcome,) = evaluate(ev, codec, lm)
    assert hook.raised == 1
    assert outcome.failure == "program_error" and outcome.error_type == error_type
    with pytest.raises(SystemicFailureError):
        SystemicFailureDetector(window=5).observe(outcome)


def test_a_judge_metric_whose_lm_has_a_bad_key_stops_the_run_at_once(routing, student_lm, reflection_lm, caplog):
    """The metric's own LM failing with a 401 is as systemic as the student's: the run stops on the
    first such evaluation, naming the metric, not after a window of failed evaluations."""
    judge_lm, hook = flaky_lm(lambda: lm15.AuthError("invalid api key", status=401), -1, num_retries=0)

    class Judge(dspy.Module):
        def __init__(self):
            super().__init__()
            self.critique = dspy.Predict("ticket, queue -> critique")
            self.critique.lm = judge_lm

        def forward(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
            self.critique(ticket=gold.ticket, queue=pred.queue)
            return routing.metric(gold, pred)

    splits = small_splits(routing, n_train=10, n_val=30)
    dspy.configure(lm=student_lm)
    with pytest.raises(SystemicFailureError, match="metric failed with LMAuthError") as info, \
            caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        TurboGEPA(Judge(), max_metric_calls=80, reflection_lm=reflection_lm, num_threads=2,
                  verbose=False).compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert info.value.error_type == "LMAuthError"
    # no "Scored failure_score; further failures are counted" warning before the stop: it never came
    assert not [r for r in caplog.records if "Scored failure_score" in r.getMessage()]
    assert hook.raised <= 4  # the evaluations in flight (2 threads), not a window of 8-32


def test_user_lm_objects_are_never_modified(routing):
    context_lm, _ = flaky_lm(rate_limit, 2)
    pred_lm = make_student_lm(num_retries=5)
    program = routing.make_program()
    (name, pred), = program.named_predictors()
    pred.lm = pred_lm
    before = dict(vars(pred_lm))
    ev, codec = make_evaluator(routing, program)
    outcomes = evaluate(ev, codec, context_lm, ids=range(4))
    assert all(o.failure is None for o in outcomes)
    assert pred.lm is pred_lm and pred_lm.num_retries == 5 and context_lm.num_retries == 3
    assert {k: v for k, v in vars(pred_lm).items() if k != "history"} == \
        {k: v for k, v in before.items() if k != "history"}
    # the built program runs on our copy, which shares the user's history (lm.history keeps working)
    built = codec.get("seed", codec.seed_texts()).program
    copy = dict(built.named_predictors())[name].lm
    assert copy is not pred_lm and copy.num_retries == 0 and copy.history is pred_lm.history
    assert len(pred_lm.history) == 4
    assert list(ev.rate_limit_stats()["endpoints"]) == ["sim/sim-student"]


def test_retry_after_and_classification_on_both_client_paths():
    # native: parsed onto the exception
    native = lm15.RateLimitError("slow down", status=429, retry_after=1.5)
    assert retry_after_of(native) == 1.5
    # litellm: only in the response headers of causes
    class RateLimitError(Exception):
        def __init__(self, headers):
            super().__init__("429")
            self.litellm_response_headers = headers
            self.status_code = 429

    outer = dspy.utils.exceptions.LMRateLimitError("rate limited", status=429)
    try:
        try:
            raise RateLimitError({"Retry-After": "2", "x": "y"})
        except RateLimitError as inner:
            raise outer from inner
    except Exception as exc:
        caught = exc
    assert retry_after_of(caught) == 2.0
    assert classify(caught, FATAL_ERROR_TYPES).kind == "rate_limited"
    assert retry_after_of(RateLimitError({"retry-after-ms": "250"})) == 0.25
    assert 0 <= retry_after_of(RateLimitError({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    # refused connection through litellm is an LMServerError (5xx) caused by ConnectionRefusedError:
    # systemic, not transient
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as refused:
            raise dspy.utils.exceptions.LMServerError("Connection error", status=500) from refused
    except Exception as exc:
        caught = exc
    verdict = classify(caught, FATAL_ERROR_TYPES)
    assert verdict.kind is None and verdict.error_type == "ConnectionRefusedError" and verdict.fatal
    # once the endpoint has answered, the evaluator leaves it out of the fatal set: a restart, retried
    assert classify(caught, FATAL_ERROR_TYPES - {"ConnectionRefusedError"}).kind == "transient"


def test_a_429_of_an_error_type_we_do_not_know_is_a_rate_limit():
    """A gateway SDK or a judge's HTTP client raises its own error type (``HTTPStatusError``,
    ``QuotaExceeded``) with the status on it: a 429 is still a rate limit to wait out, not a failed
    evaluation scored failure_score (which a burst of them would turn into a systemic stop)."""

    class QuotaExceeded(Exception):
        def __init__(self, status_code):
            super().__init__("quota exceeded for this minute")
            self.status_code = status_code

    assert classify(QuotaExceeded(429), FATAL_ERROR_TYPES).kind == "rate_limited"
    assert classify(QuotaExceeded("429"), FATAL_ERROR_TYPES).kind == "rate_limited"
    try:
        try:
            raise QuotaExceeded(429)
        except QuotaExceeded as inner:
            raise RuntimeError("judge call failed") from inner
    except RuntimeError as exc:
        caught = exc
    verdict = classify(caught, FATAL_ERROR_TYPES)
    assert verdict.kind == "rate_limited" and verdict.error_type == "QuotaExceeded"
    assert classify(QuotaExceeded(400), FATAL_ERROR_TYPES).kind is None


def test_an_error_whose_properties_raise_is_classified_not_fatal_to_the_run():
    """getattr(exc, "status_code", None) only survives an AttributeError: an SDK error whose
    ``status_code``, ``headers`` or ``response`` property reads a missing response field raised a
    KeyError out of the classification, ending the compile."""
    from dspy_turbogepa.adapter.ratelimit import retry_after_of

    class BrokenSDKError(Exception):
        body: dict = {}

        def __getattr__(self, name):
            if name in ("status", "status_code", "headers", "response", "retry_after", "model", "signature",
                        "lm_response", "litellm_response_headers", "exceptions"):
                return self.body["error"][name]  # KeyError, not AttributeError
            raise AttributeError(name)

    verdict = classify(BrokenSDKError("upstream said no"), FATAL_ERROR_TYPES)
    assert verdict.kind is None and not verdict.fatal
    assert retry_after_of(BrokenSDKError("x")) is None


def test_only_the_lm_stack_raises_fatal_errors():
    assert {"AuthenticationError", "NotFoundError", "ConnectionRefusedError"} <= FATAL_ERROR_TYPES
    assert "APIConnectionError" not in FATAL_ERROR_TYPES  # litellm reports transient resets with it too

    def chain(inner):
        try:
            try:
                raise inner
            except Exception as exc:
                raise RuntimeError("my pipeline failed") from exc
        except Exception as exc:
            return exc

    def named(module):
        return type("NotFoundError", (Exception,), {"__module__": module})("missing")

    for module in ("litellm.exceptions", "openai", "dspy.utils.exceptions"):
        assert fatal_error_name(chain(named(module)), FATAL_ERROR_TYPES) == "NotFoundError", module
        verdict = classify(chain(named(module)), FATAL_ERROR_TYPES)
        assert verdict.fatal and verdict.kind is None and verdict.error_type == "NotFoundError"
    for module in ("__main__", "elasticsearch.exceptions", "my_app.store"):
        assert fatal_error_name(chain(named(module)), FATAL_ERROR_TYPES) is None, module
        verdict = classify(chain(named(module)), FATAL_ERROR_TYPES)
        assert verdict.kind is None and not verdict.fatal and verdict.error_type == "RuntimeError"
    assert fatal_error_name(ConnectionRefusedError(111, "refused"), FATAL_ERROR_TYPES) == "ConnectionRefusedError"


def test_a_refused_connection_after_the_endpoint_answered_is_retried(routing):
    """Before any answer a refused connection is a wrong api_base (fatal, see the HTTP test below);
    once the endpoint has answered it is a server restarting: retried, not a reason to stop."""
    def refused():
        err = lm15.TransportError("connect failed")  # the native client's chain for a refused connection
        err.__cause__ = ConnectionRefusedError(111, "Connection refused")
        return err

    lm, hook = flaky_lm(refused, 1)
    ev, codec = make_evaluator(routing)
    (first,) = evaluate(ev, codec, lm)
    assert first.failure == "program_error" and first.fatal and hook.raised == 1  # nothing answered yet

    ev, codec = make_evaluator(routing)

    async def main():
        with dspy.context(lm=lm):
            ok = await ev.evaluate(codec.seed_texts(), "seed", "val", 0, True)  # the endpoint answers
            hook.left = 1
            again = await ev.evaluate(codec.seed_texts(), "seed", "val", 1, True)
        return ok, again

    try:
        ok, again = asyncio.run(main())
    finally:
        ev.close()
    assert ok.failure is None
    assert again.failure is None and not again.fatal and hook.raised == 2
    assert ev.rate_limit_stats()["transient_retries"] == 1


# --------------------------------------------------------------------------- through HTTP
def _capped_config(median_s: float = 0.05) -> SimConfig:
    return SimConfig(
        models=(
            ModelConfig("sim-student", "student", median_s=median_s, sigma=0.3, max_concurrency=8, queue_timeout_s=0),
            ModelConfig("sim-reflector", "reflector", median_s=0.02),
        )
    )


@pytest.fixture
def recorded_evaluators(monkeypatch):
    made: list[DspyEvaluator] = []

    class Recording(DspyEvaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(teleprompter_module, "DspyEvaluator", Recording)
    return made


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
def test_compile_under_a_concurrency_cap_scores_no_rate_limit_failures(routing, engine, recorded_evaluators):
    splits = small_splits(routing, n_train=24, n_val=40, n_test=0)
    with SimServer(_capped_config(), seed=0) as srv:
        student = dspy.LM("openai/sim-student", api_base=srv.base_url, api_key="x", cache=False, **engine)
        reflector = dspy.LM("openai/sim-reflector", api_base=srv.base_url, api_key="x", cache=False,
                            temperature=1.0, max_tokens=4000, **engine)
        opt = TurboGEPA(routing.metric, max_metric_calls=240, reflection_lm=reflector, num_threads=32,
                        track_stats=True)
        started = time.perf_counter()
        with dspy.context(lm=student):
            optimized = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
        seconds = time.perf_counter() - started
        server = srv.stats()["models"]["sim-student"]
    (ev,) = recorded_evaluators
    stats = ev.rate_limit_stats()
    (window,) = stats["endpoints"].values()
    dr = optimized.detailed_results
    failures = dict(dr.run_stats["failures"])
    print(f"\n[{engine.get('engine', 'native')}] {seconds:.1f}s: server requests={server['requests']} "
          f"ok={server['ok']} 429s={server['http_429']} peak={server['peak_concurrency']}; "
          f"evaluator 429s={stats['rate_limited']} retries={stats['rate_limit_retries']} "
          f"gave_up={stats['rate_limit_gave_up']} backoff={stats['backoff_seconds']:.1f}s; window "
          f"final={window['window']} min={window['min_window']} limit={window['limit']}; failures={failures}; "
          f"val {dr.val_aggregate_scores[0]:.3f} -> {dr.val_aggregate_scores[dr.best_idx]:.3f}")
    assert server["http_429"] > 0  # the cap did bite
    assert server["peak_concurrency"] <= 8
    assert not failures.get("program_error") and not failures.get("rate_limited"), failures
    assert stats["rate_limited"] == server["http_429"] and stats["rate_limit_gave_up"] == 0
    assert window["limit"] == 32 and window["window"] < 32 and window["min_window"] < 32
    assert student.num_retries == 3 and reflector.num_retries == 3  # the user's objects as they were
    assert len(student.history) == server["ok"]  # our copies record into the user's history
    assert dr.val_aggregate_scores[dr.best_idx] > dr.val_aggregate_scores[0]
    # per-rollout usage and retries reach the run summary
    run_stats = dr.run_stats
    print(f"  run_stats: task_tokens={run_stats.get('task_tokens')} "
          f"rate_limit_retries={run_stats.get('rate_limit_retries')}")
    if "task_tokens" in run_stats:
        assert run_stats["task_tokens"]["prompt"] == server["prompt_tokens"]
        assert run_stats["task_tokens"]["completion"] == server["completion_tokens"]
    if "rate_limit_retries" in run_stats:
        assert run_stats["rate_limit_retries"] == stats["rate_limit_retries"]


@pytest.mark.http
def test_dspy_gepa_in_the_same_setting_scores_rate_limits_as_failures(routing):
    """For the record: dspy.GEPA relies on the LM's own retries (3, Retry-After apart), which a
    32-wide burst against 8 slots exhausts; those rollouts are scored failure_score."""
    errors: Counter[str] = Counter()

    class Counting(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = routing.make_program()

        def forward(self, **kw):
            try:
                return self.inner(**kw)
            except Exception as exc:
                errors[type(exc).__name__] += 1
                raise

    splits = small_splits(routing, n_train=24, n_val=40, n_test=0)
    raised = None
    with SimServer(_capped_config(), seed=0) as srv:
        student = dspy.LM("openai/sim-student", api_base=srv.base_url, api_key="x", cache=False)
        reflector = dspy.LM("openai/sim-reflector", api_base=srv.base_url, api_key="x", cache=False,
                            temperature=1.0, max_tokens=4000)
        opt = dspy.GEPA(metric=routing.metric, max_metric_calls=240, reflection_lm=reflector, num_threads=32)
        with dspy.context(lm=student):
            try:
                opt.compile(Counting(), trainset=splits.train, valset=splits.val)
            except Exception as exc:  # recorded, whatever it is
                raised = exc
        server = srv.stats()["models"]["sim-student"]
    print(f"\n[dspy.GEPA] server requests={server['requests']} ok={server['ok']} 429s={server['http_429']}; "
          f"rollouts failed={dict(errors)}; raised={type(raised).__name__ if raised else None}")
    assert server["http_429"] > 0
    if raised is None and not errors:  # timing-dependent: never fail the suite on dspy.GEPA's luck
        pytest.xfail("dspy.GEPA's own retries happened to absorb every 429 this time")
    assert raised is not None or errors["LMRateLimitError"] > 0


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
@pytest.mark.parametrize("cause", ["401", "404", "refused"])
def test_systemic_causes_stop_the_compile_at_once(routing, cause, engine):
    cfg = SimConfig(models=(ModelConfig("sim-student"), ModelConfig("sim-reflector", "reflector")), api_key="good")
    splits = small_splits(routing, n_train=12, n_val=8, n_test=0)
    with SimServer(cfg, seed=0) as srv:
        model, key, base = "openai/sim-student", "good", srv.base_url
        if cause == "401":
            key = "bad"
        elif cause == "404":
            model = "openai/no-such-model"
        else:
            base = f"http://127.0.0.1:{_dead_port()}/v1"
        student = dspy.LM(model, api_base=base, api_key=key, cache=False, **engine)  # default num_retries=3
        reflector = dspy.LM("openai/sim-reflector", api_base=srv.base_url, api_key="good", cache=False, **engine)
        opt = TurboGEPA(routing.metric, max_metric_calls=100, reflection_lm=reflector, num_threads=8)
        import litellm  # noqa: F401  (loaded before the clock starts: its first import can take seconds)

        reflector("warm up")  # and the client's first-use work (lazy imports, on a loaded machine 3-4 s)
        started = time.perf_counter()
        with dspy.context(lm=student), pytest.raises(SystemicFailureError) as info:
            opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
        seconds = time.perf_counter() - started
        stats = srv.stats()
    rejected = stats["bad_requests"] + stats["unknown_model"]
    expected = {"401": {"LMAuthError"}, "404": {"LMUnsupportedModelError"},
                "refused": {"ConnectionRefusedError", "APIConnectionError"}}[cause]
    print(f"\n[{cause}/{engine.get('engine', 'native')}] {seconds:.2f}s error_type={info.value.error_type}"
          f" rejected requests={rejected}")
    assert info.value.error_type in expected and info.value.error_type in str(info.value)
    assert seconds < 5.0  # no LM-level retries (1 + 2 + 4 s on the native client), no backoff of ours
    if cause != "refused":  # the server saw about one request per evaluation slot, not 1 + num_retries each
        assert 0 < rejected <= 2 * 8, rejected


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
def test_a_reflection_lm_with_a_bad_key_stops_the_compile(routing, engine, caplog):
    """It used to 'succeed': every reflection skipped as proposer_error, ~200 reflection calls, and
    the seed returned with stop_reason no_progress_possible. The stop's error is the one message: no
    warning first that the proposal "is skipped" and further failures "are counted"."""
    cfg = SimConfig(models=(ModelConfig("sim-student"), ModelConfig("sim-reflector", "reflector")), api_key="good")
    splits = small_splits(routing, n_train=12, n_val=8, n_test=0)
    with SimServer(cfg, seed=0) as srv:
        student = dspy.LM("openai/sim-student", api_base=srv.base_url, api_key="good", cache=False, **engine)
        reflector = dspy.LM("openai/sim-reflector", api_base=srv.base_url, api_key="bad", cache=False,
                            num_retries=0, **engine)
        opt = TurboGEPA(routing.metric, max_metric_calls=300, reflection_lm=reflector, num_threads=4, verbose=False)
        with dspy.context(lm=student), pytest.raises(SystemicFailureError, match="reflection_lm") as info, \
                caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
            opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
        reflector_requests = srv.stats()["models"]["sim-reflector"]["requests"]
    assert "Auth" in str(info.value)
    assert not [r for r in caplog.records if "proposal is skipped" in r.getMessage()]
    assert reflector_requests <= 8


class _ResettingServer:
    """Accepts connections and resets them (RST) as soon as a request arrives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import struct

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        # shutdown wakes the accept() blocked in _serve (close alone does not, on Linux): no thread and
        # listening socket left for the rest of the session
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


@pytest.mark.http
@pytest.mark.parametrize(
    "engine",
    [{}, {"engine": "litellm"}],
    ids=["native", "litellm"],
)
def test_a_connection_reset_is_transient_not_systemic(routing, engine):
    server = _ResettingServer()
    try:
        lm = dspy.LM("openai/sim-student", api_base=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                     cache=False, **engine)
        ev, codec = make_evaluator(routing)
        (outcome,) = evaluate(ev, codec, lm)
    finally:
        server.close()
    assert ev.rate_limit_stats()["transient_retries"] == FAST_TR.max_retries
    assert outcome.failure == "program_error" and outcome.error_type not in FATAL_ERROR_TYPES


def _run_with_a_flaky_reflector(routing, student_lm, monkeypatch, before_call, num_threads):
    """A compile whose reflection LM calls ``before_call`` first (fast retry policies); its run_stats."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    class FastRetries(ReflectiveProposer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, rate_limit_policy=FAST_RL, transient_policy=FAST_TR, **kwargs)

    monkeypatch.setattr(teleprompter_module, "ReflectiveProposer", FastRetries)
    reflector = make_reflection_lm(seed=0, before_call=before_call)
    splits = small_splits(routing, n_train=20, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=120, reflection_lm=reflector, num_threads=num_threads,
                    track_stats=True, verbose=False)
    with dspy.context(lm=student_lm):
        program = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert reflector.num_retries == 3  # the user's LM keeps its settings
    return program.detailed_results.run_stats


def test_a_burst_of_429s_from_the_reflection_lm_is_waited_out(routing, student_lm, monkeypatch):
    """Rate limits on the reflection LM became failed reflections: 0.2 s of 429s at the start (up to 8
    reflections start at once) stopped the run as "systemic", and no counter showed them."""
    started: list[float] = []
    lock = threading.Lock()

    def burst(request) -> None:
        with lock:
            started.append(time.monotonic())
            if time.monotonic() - started[0] < 0.2:
                raise lm15.RateLimitError("reflection quota", status=429, retry_after=0.01)

    stats = _run_with_a_flaky_reflector(routing, student_lm, monkeypatch, burst, num_threads=8)
    assert stats["rate_limits"]["reflection"]["rate_limited"] > 0
    assert stats["rate_limits"]["reflection"]["rate_limit_retries"] == stats["rate_limits"]["reflection"][
        "rate_limited"]
    assert "proposer_error" not in stats.get("proposal_skips", {})


def test_transient_failures_of_the_reflection_lm_are_retried_by_us(routing, student_lm, monkeypatch):
    """DSPy's retries are off on our copy of the reflection LM (they sleep whatever Retry-After says), so
    a 503, a timeout or a dropped connection must be retried by the proposer's own transient policy,
    not become a skipped reflection."""
    faults = iter([lm15.ServerError("boom", status=503), lm15.TimeoutError("slow"),
                   lm15.TransportError("connection reset")])
    lock = threading.Lock()

    def flaky(request) -> None:
        with lock:
            fault = next(faults, None)
        if fault is not None:
            raise fault

    stats = _run_with_a_flaky_reflector(routing, student_lm, monkeypatch, flaky, num_threads=4)
    assert next(faults, None) is None  # every fault was raised
    assert "proposer_error" not in stats.get("proposal_skips", {}), stats.get("proposal_skips")
    reflection = stats["rate_limits"]["reflection"]  # what run_stats, the summary and MLflow report
    assert reflection["transient_errors"] == 3 and reflection["transient_retries"] == 3, reflection
    assert reflection["transient_gave_up"] == 0 and reflection["rate_limited"] == 0


def test_the_live_stats_carry_the_reflection_lms_rate_limits():
    """MLflow charts live_run_stats over time: the reflection LM's 429s appeared only at the end."""
    from types import SimpleNamespace

    from dspy_turbogepa.teleprompter import live_run_stats

    orchestrator = SimpleNamespace(stats=SimpleNamespace(rate_limits={}))
    evaluator = SimpleNamespace(rate_limit_stats=lambda: {"rate_limited": 2, "endpoints": {}})
    reflector = SimpleNamespace(rate_limit_stats=lambda: {"rate_limited": 3, "rate_limit_retries": 3},
                                skipped_records=lambda: {"feedback_error": 4}, feedback_calls=lambda: 7)
    stats = live_run_stats(orchestrator, evaluator, reflector)
    assert stats.rate_limits["rate_limited"] == 2 and stats.rate_limits["reflection"]["rate_limited"] == 3
    assert stats.reflective_records_skipped == {"feedback_error": 4}  # charted live too
    assert stats.feedback_calls == 7


class _GatewayPageServer:
    """Answers every request with status 200 and an HTML page (a gateway or proxy in front of the LM)."""

    def __init__(self) -> None:
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b"<html><body><h1>Welcome to nginx!</h1></body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
def test_an_answer_the_lm_stack_cannot_use_is_the_services_failure(routing, engine):
    """DSPy's native client raises LMProviderError for a 200 with an HTML body (litellm a server error):
    scored as a failure of the LM service, not of the program — a reflection must not read a gateway's
    page as feedback on the instruction, and a resumed run must run the rollout again."""
    from dspy_turbogepa.adapter.reflective import ReflectiveDatasetBuilder

    server = _GatewayPageServer()
    try:
        lm = dspy.LM("openai/sim-student", api_base=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                     cache=False, num_retries=0, **engine)
        ev, codec = make_evaluator(routing)
        (outcome,) = evaluate(ev, codec, lm)
        # the same answer inside dspy.Parallel, which returns None for the failed branch: not the program's
        # answer either (the program would be scored on a fallback it never chose)
        caught_ev, caught_codec = make_evaluator(routing, TwoParallelBranches(routing.make_program()))
        (caught,) = evaluate(caught_ev, caught_codec, lm)
    finally:
        server.close()
    assert outcome.score == 0.0 and outcome.failure == "program_error" and not outcome.fatal
    assert outcome.service_failure, outcome.error_type
    assert caught.failure == "program_error" and caught.service_failure, (caught.failure, caught.error_type)
    builder = ReflectiveDatasetBuilder(codec, routing.metric, 0.0, add_format_failure_as_feedback=False,
                                       warn_on_score_mismatch=False, stringify=True)
    dataset = builder.build(list(codec.seed_texts()), [outcome.trajectory], [outcome.score], random.Random(0))
    assert not any(dataset.values()) and builder.skipped_counts() == {"infrastructure_error": 1}


def _quota_server(student_rpm: int | None, reflector_rpm: int | None) -> SimServer:
    """Requests past ``rpm`` get a 429 whose Retry-After is up to a (scaled) minute: with time_scale
    1000 that is hours, as a used-up daily quota answers. Latency stays zero."""
    return SimServer(SimConfig(models=(ModelConfig("sim-student", rpm=student_rpm),
                                       ModelConfig("sim-reflector", "reflector", rpm=reflector_rpm)),
                               time_scale=1000.0), seed=0)


@pytest.mark.http
@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
@pytest.mark.parametrize("who", ["student", "reflector"])
def test_a_used_up_quota_stops_the_run_at_once(routing, engine, who):
    """Student: a Retry-After of hours parked every rollout of the endpoint for the policy's 300 s, once
    per refusal (an 8-example valset needed 15 minutes to stop, showing '0s elapsed'). Reflector: its copy
    kept DSPy's retries, which sleep whatever Retry-After says (3 x the hours, silently; the process
    could not exit after Ctrl-C). Now the first call told to wait past the policy stops the run, naming
    the quota and the way to resume."""
    splits = small_splits(routing, n_train=12, n_val=8, n_test=0)
    limits = {"student_rpm": 6, "reflector_rpm": None} if who == "student" else {"student_rpm": None,
                                                                                 "reflector_rpm": 1}
    with _quota_server(**limits) as srv:
        student = dspy.LM("openai/sim-student", api_base=srv.base_url, api_key="x", cache=False, **engine)
        reflector = dspy.LM("openai/sim-reflector", api_base=srv.base_url, api_key="x", cache=False, **engine)
        opt = TurboGEPA(routing.metric, max_metric_calls=200, reflection_lm=reflector, num_threads=4, verbose=False)
        started = time.perf_counter()
        with dspy.context(lm=student), pytest.raises(SystemicFailureError) as info:
            opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
        seconds = time.perf_counter() - started
        reflector_requests = srv.stats()["models"]["sim-reflector"]["requests"]
    message = str(info.value)
    # no log_dir here: the message says nothing was kept (with one it says to rerun with the same log_dir)
    assert "quota" in message and "no log_dir, so nothing was kept" in message and "API key" not in message
    assert seconds < 30.0, seconds  # no 300 s pause; DSPy's own retries (which sleep the hours) are off
    assert student.num_retries == 3 and reflector.num_retries == 3  # the user's LMs are untouched
    if who == "student":
        assert info.value.failure == "rate_limited" and "Retry-After" in message
    else:
        assert "instruction proposer" in message
        assert reflector_requests <= 1 + 4, reflector_requests  # one answered, one refusal per reflection in flight
