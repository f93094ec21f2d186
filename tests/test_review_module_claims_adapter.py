"""Review: behavioural claims in the internal module, class and function docstrings and comments of
``dspy_turbogepa/adapter/*.py``, ``dspy_turbogepa/store/*.py``, ``dspy_turbogepa/tracking/*.py`` (not
``progress.py``) and ``dspy_turbogepa/redaction.py``, each checked against the code by a direct unit test.

A claim that holds is a plain test whose docstring quotes it (``file:line``). A claim found false is a test of
the documented behaviour marked ``xfail(strict=True)`` whose reason says what the code does instead: three, the
usage of an LM the program holds itself called in ``dspy.Parallel`` branches (not counted: a real undercount of
the token and dollar budgets), the reflective module docstring's rule for program errors (out of date), and
``_tool_identity`` of ReAct's ``finish`` (not None). Everything runs offline: the fake LMs, tiny data, injected
sleeps, and at most a loopback HTTP server.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextvars
import copy
import dataclasses
import datetime
import enum
import http.server
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dspy
import numpy as np
import pydantic
import pytest
from dspy import lm15
from dspy.utils import exceptions as dspy_errors

from dspy_turbogepa import redaction
from dspy_turbogepa.adapter import lm_copies, ratelimit
from dspy_turbogepa.adapter import run_identity as ri
from dspy_turbogepa.adapter import trajectory_json as tj
from dspy_turbogepa.adapter.evaluator import DspyEvaluator, lacks_async_support
from dspy_turbogepa.adapter.introspect import runs_async
from dspy_turbogepa.adapter.lm_copies import (
    ROLLOUT_CLOSED,
    ROLLOUT_LM_ERRORS,
    EvaluatorClosedError,
    LMCopies,
    endpoint_key,
    judge_usage_attached,
    rollout_usage,
)
from dspy_turbogepa.adapter.metric import check_metric_signature, default_feedback, read_metric_return
from dspy_turbogepa.adapter.persistence import StoreObserver, last_committed_mutation, load_known, stored_usage
from dspy_turbogepa.adapter.program import PredictorNames, ProgramCodec, all_named_predictors
from dspy_turbogepa.adapter.protocols import check_call_protocol, check_inputs_reach
from dspy_turbogepa.adapter.ratelimit import (
    FATAL_ERROR_TYPES,
    FATAL_ONCE_ANSWERED,
    RATE_LIMIT_POLICY,
    TRANSIENT_POLICY,
    RateLimitStats,
    RateLimitWaits,
    RetryPolicy,
    classify,
    context_window_exceeded,
    retry_after_of,
)
from dspy_turbogepa.adapter.reflective import FeedbackMetricError, ReflectiveDatasetBuilder, with_trace_data
from dspy_turbogepa.adapter.results import build_result
from dspy_turbogepa.adapter.run_identity import (
    adapter_identity,
    callable_identity,
    data_identity,
    lm_identity,
    proposer_settings,
    readable_lm,
    run_key,
)
from dspy_turbogepa.adapter.runner import run_coroutine_in_thread
from dspy_turbogepa.adapter.trajectory import DspyTrajectory, TraceStep
from dspy_turbogepa.adapter.trajectory_json import (
    jsonable,
    prediction_dict,
    prediction_from,
    trajectory_from_json,
    trajectory_to_json,
)
from dspy_turbogepa.engine.candidate import Candidate
from dspy_turbogepa.engine.types import EvalOutcome
from dspy_turbogepa.redaction import (
    REDACTED,
    contains_secret,
    describe_error,
    endpoint_url,
    is_sensitive_key,
    mask_json_text,
    mask_text,
    redact,
    run_secrets,
    strip_userinfo,
    url_credentials,
    url_key_material,
)
from dspy_turbogepa.store import RunStore, RunStoreError, RunStoreMismatchError, locks, sqlite_store
from dspy_turbogepa.testing import TASKS, make_student_lm
from dspy_turbogepa.tracking import imports as tracking_imports
from dspy_turbogepa.tracking import mlflow_tracking as mt
from dspy_turbogepa.tracking import plots
from dspy_turbogepa.tracking.pump import CompileThreadCallbackPump, masked_program
from dspy_turbogepa.tracking.summary import build_summary, to_strict_json, write_summary

from helpers import make_evaluator, small_splits

ROUTING = TASKS["routing"]
KEY = "sk-abcdefghij0123456789xyz"  # key-shaped: masked wherever text is masked


# ============================================================================ shared test programs
class ErrorSource:
    """Raises ``make()`` for the first ``times`` calls (-1: always), then returns None; counts calls.
    Shared, not copied, by the codec's deep copies of the program holding it."""

    def __init__(self, make, times: int = -1) -> None:
        self.make, self.left, self.calls = make, times, 0

    def __call__(self) -> BaseException | None:
        self.calls += 1
        if self.left == 0:
            return None
        self.left -= 1
        return self.make()

    def __deepcopy__(self, memo):
        return self


class Raising(dspy.Module):
    """A one-predictor program raising what its ``ErrorSource`` makes, else answering "billing"."""

    def __init__(self, source: ErrorSource) -> None:
        super().__init__()
        self.predict = dspy.Predict("ticket -> queue")
        self.source = source

    def forward(self, ticket):
        error = self.source()
        if error is not None:
            raise error
        return dspy.Prediction(queue="billing")


class RaisesValueError(dspy.Module):
    def __init__(self, text: str = "bad input") -> None:
        super().__init__()
        self.predict = dspy.Predict("ticket -> queue")
        self.text = text

    def forward(self, ticket):
        raise ValueError(self.text)


SEEN: dict[str, Any] = {}
PROBE_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("probe_var", default="unset")


class Probe(dspy.Module):
    """Records what the rollout runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("ticket -> queue")

    def forward(self, ticket):
        SEEN.update(trace=dspy.settings.trace, lm=dspy.settings.lm, thread=threading.current_thread().name,
                    var=PROBE_VAR.get())
        return dspy.Prediction(queue="billing")


class TwoStep(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = dspy.Predict("ticket -> queue")
        self.b = dspy.Predict("queue -> team")

    def forward(self, ticket):
        queue = self.a(ticket=ticket).queue
        return self.b(queue=queue)


class Twins(dspy.Module):
    """Two predictors with equal signatures (fields and instructions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = dspy.Predict("ticket -> queue")
        self.b = dspy.Predict("ticket -> queue")

    def forward(self, ticket):
        return self.a(ticket=ticket)


def one(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return 1.0


class Sleeps:
    """An injected ``sleep``: records the delays, sleeps for none of them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def examples(n: int = 4):
    return small_splits(ROUTING, n_train=n, n_val=n, n_test=0).val


def run_evaluations(ev, codec, lm=None, ids=(0,), split="val", capture=True):
    async def main():
        return await asyncio.gather(*(ev.evaluate(codec.seed_texts(), "seed", split, i, capture) for i in ids))

    try:
        if lm is None:
            return asyncio.run(main())
        with dspy.context(lm=lm):
            return asyncio.run(main())
    finally:
        ev.close()


def rate_limit(retry_after=None):
    return lm15.RateLimitError("Too many requests", status=429, retry_after=retry_after)


# ============================================================================ adapter/evaluator.py
class OwnAsync(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = dspy.Predict("q -> a")

    def forward(self, q):
        return self.p(q=q)

    async def aforward(self, q):
        return await self.p.acall(q=q)


class OnlyForward(dspy.Predict):
    def forward(self, **kwargs):
        return super().forward(**kwargs)


class OwnCallFirst(OwnAsync):
    def __call__(self, **kwargs):
        return super().__call__(**kwargs)


def test_only_a_users_own_aforward_makes_a_program_async():
    """evaluator.py:3-8: "Async programs (whose own class, not a DSPy base, defines ``aforward``) run ... through
    ``acall`` ...; a bare ``dspy.Predict`` / ``ChainOfThought`` / ``ReAct`` student is a sync program"; :127-130 "a
    subclass of ``dspy.Predict`` inherits Predict's"; :140-142 not async "when the user's ``__call__`` is nearer in
    the MRO than any ``acall`` of theirs and a ``forward`` of theirs exists"."""
    assert runs_async(OwnAsync()) is True
    assert runs_async(dspy.Predict("q -> a")) is False
    assert runs_async(dspy.ChainOfThought("q -> a")) is False
    assert runs_async(dspy.ReAct("q -> a", tools=[])) is False
    assert runs_async(OnlyForward("q -> a")) is False
    assert runs_async(OwnCallFirst()) is False


def test_rollouts_run_in_worker_threads_in_the_callers_context_and_the_metric_with_the_users_settings():
    """evaluator.py:10-12: "worker threads run in a copy of the caller's context so a ``dspy.context(lm=...)`` set
    around ``compile()`` keeps working"; :14-16 "Rollouts run on retry-less copies of the LMs (the context LM through
    ``dspy.context(lm=copy)``...; the user's objects are never modified"; :545-549 "The metric runs outside it, with
    the user's own settings. The trace is a list even when reflection will not read it"."""
    seen_by_metric = {}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        seen_by_metric["lm"] = dspy.settings.lm
        return 1.0

    user_lm = make_student_lm()
    ev, codec = make_evaluator(ROUTING, Probe(), metric=metric)
    SEEN.clear()
    token = PROBE_VAR.set("the caller's")
    try:
        (outcome,) = run_evaluations(ev, codec, user_lm, capture=False)
    finally:
        PROBE_VAR.reset(token)
    assert outcome.score == 1.0
    assert SEEN["var"] == "the caller's" and SEEN["thread"].startswith("turbogepa-eval")
    assert isinstance(SEEN["trace"], list)
    assert SEEN["lm"] is not user_lm and SEEN["lm"].model == user_lm.model and SEEN["lm"].num_retries == 0
    assert seen_by_metric["lm"] is user_lm
    assert type(user_lm) is dspy.LM and user_lm.num_retries == 3


def test_a_429_anywhere_in_the_chain_waits_at_least_retry_after_and_runs_again():
    """evaluator.py:16-18: "A rollout whose failure has a 429 anywhere in its exception chain is not scored: it waits
    (Retry-After, else exponential backoff with jitter) and runs again"."""
    def wrapped():
        error = RuntimeError("my pipeline failed")
        error.__cause__ = rate_limit(retry_after=7.0)
        return error

    source, sleeps = ErrorSource(wrapped, times=1), Sleeps()
    ev, codec = make_evaluator(ROUTING, Raising(source), metric=one, sleep=sleeps)
    (outcome,) = run_evaluations(ev, codec)
    assert source.calls == 2 and outcome.failure is None and outcome.score == 1.0
    assert outcome.rate_limit_retries == 1
    assert len(sleeps.delays) == 1 and 7.0 <= sleeps.delays[0] <= 7.0 * 1.25


def test_transient_errors_are_retried_three_times_then_scored_as_a_program_failure_with_their_cause():
    """evaluator.py:19-21: "Timeouts, 5xx and dropped connections are retried the same way a few times, then scored
    as a program failure with their cause"; ratelimit.py:387 "a few retries (3)"."""
    source, sleeps = ErrorSource(lambda: dspy_errors.LMTimeoutError("read timed out")), Sleeps()
    ev, codec = make_evaluator(ROUTING, Raising(source), metric=one, failure_score=-1.0, sleep=sleeps)
    (outcome,) = run_evaluations(ev, codec)
    assert source.calls == 4 and len(sleeps.delays) == 3
    assert all(2.0 ** k <= delay <= 2.0 ** k * 1.25 for k, delay in enumerate(sleeps.delays))  # 1 s base, doubled
    assert outcome.failure == "program_error" and outcome.score == -1.0 and outcome.error_type == "LMTimeoutError"
    assert "gave up" in outcome.message and "read timed out" in outcome.message and not outcome.fatal


def test_systemic_errors_are_never_retried():
    """evaluator.py:21: "Systemic errors (bad key, unknown model, refused connection: the fatal set) are never
    retried"."""
    source, sleeps = ErrorSource(lambda: dspy_errors.LMAuthError("invalid api key")), Sleeps()
    ev, codec = make_evaluator(ROUTING, Raising(source), metric=one, sleep=sleeps)
    (outcome,) = run_evaluations(ev, codec)
    assert source.calls == 1 and sleeps.delays == []
    assert outcome.fatal and outcome.error_type == "LMAuthError"


def test_a_rollout_rate_limited_past_ten_retries_is_scored_failure_score_rate_limited_not_raised():
    """evaluator.py:22-25: "After ``RATE_LIMIT_POLICY`` (10 retries or 5 minutes) a still rate-limited rollout is
    scored ``failure_score`` with the cause ``"rate_limited"`` (not raised)"."""
    source, sleeps = ErrorSource(rate_limit), Sleeps()
    ev, codec = make_evaluator(ROUTING, Raising(source), metric=one, failure_score=-1.0, sleep=sleeps)
    (outcome,) = run_evaluations(ev, codec)
    assert source.calls == 11 and len(sleeps.delays) == 10
    assert outcome.failure == "rate_limited" and outcome.score == -1.0 and not outcome.fatal
    assert outcome.rate_limit_retries == 10 and ev.rate_limit_stats()["rate_limit_gave_up"] == 1


def test_a_retry_after_past_the_whole_policy_is_fatal_at_once():
    """evaluator.py:419-421: "A wait past the whole policy (a used-up quota) is fatal: every later rollout
    would give up the same way"; ratelimit.py:350-352 "and at once when the server asks it to wait past that"."""
    source, sleeps = ErrorSource(lambda: rate_limit(retry_after=1000.0)), Sleeps()
    ev, codec = make_evaluator(ROUTING, Raising(source), metric=one, sleep=sleeps)
    (outcome,) = run_evaluations(ev, codec)
    assert source.calls == 1 and sleeps.delays == []
    assert outcome.failure == "rate_limited" and outcome.fatal and "Retry-After" in outcome.message


def test_an_error_message_names_the_users_line_but_the_reflection_text_does_not():
    """evaluator.py:213-218: "`` (at metric.py:12 in my_metric)``: the innermost frame of the user's own code ...
    It is not part of what the reflection reads (the trajectory's text)"."""
    ev, codec = make_evaluator(ROUTING, RaisesValueError(), metric=one)
    (outcome,) = run_evaluations(ev, codec)
    assert outcome.failure == "program_error"
    assert outcome.message.startswith("ValueError: bad input")
    assert outcome.message.endswith(" in forward)") and "(at test_review_module_claims_adapter.py:" in outcome.message
    assert outcome.trajectory.error == "ValueError: bad input"


def test_an_error_text_is_masked_at_the_source_and_cut_at_2000_characters():
    """evaluator.py:206-210: "The error as feedback text: masked at the source"; ``MAX_MESSAGE_CHARS = 2000``, the rest
    replaced by " ..."."""
    ev, codec = make_evaluator(ROUTING, RaisesValueError(f"key {KEY} " + "x" * 3000), metric=one)
    (outcome,) = run_evaluations(ev, codec)
    text = outcome.trajectory.error
    assert KEY not in outcome.message and REDACTED in text
    assert len(text) == 2000 + len(" ...") and text.endswith("x ...")


def test_after_close_the_metric_is_not_called():
    """evaluator.py:327-330 (close): "one already running cannot be (its LM call is on the wire), but its metric is
    not called"; :650 "the run is over: a metric call now ... would go nowhere"."""
    calls = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls.append(1)
        return 1.0

    ev, codec = make_evaluator(ROUTING, metric=metric)
    ev.close()
    with pytest.raises(EvaluatorClosedError):
        ev._score(examples()[0], 0, dspy.Prediction(queue="x"), [], None, PredictorNames(codec.student), "val",
                  False)
    assert calls == []


@pytest.mark.parametrize("window_limit", [None, 3])
def test_the_aimd_window_starts_at_window_limit_defaulting_to_max_workers(window_limit):
    """evaluator.py:269-270: "``window_limit`` (default ``max_workers``) is where every endpoint's AIMD window starts
    and the most it grows back to"; :337-339 ``rate_limit_stats()`` reports "per endpoint its current and smallest
    AIMD window (``endpoints``)"."""
    ev, codec = make_evaluator(ROUTING, max_workers=6, window_limit=window_limit)
    run_evaluations(ev, codec, make_student_lm(), ids=(0, 1))
    (endpoint,) = ev.rate_limit_stats()["endpoints"].values()
    expected = window_limit or 6
    assert endpoint["limit"] == expected and endpoint["window"] == expected and endpoint["min_window"] == expected


def test_a_429_is_charged_to_the_endpoints_of_the_model_it_names():
    """evaluator.py:475-476: "The endpoints a 429 is charged to: those of the model the error names, else all of
    them"."""
    keys = {"openai/gpt-4o@https://a.example", "anthropic/claude-3@https://b.example"}
    assert DspyEvaluator._keys_of("openai/gpt-4o", keys) == {"openai/gpt-4o@https://a.example"}
    assert DspyEvaluator._keys_of("gpt-4o", keys) == {"openai/gpt-4o@https://a.example"}
    assert DspyEvaluator._keys_of("mistral/other", keys) is None and DspyEvaluator._keys_of(None, keys) is None


def test_a_metric_whose_lm_is_rate_limited_is_rerun_then_scored():
    """evaluator.py:603: "The metric, re-run (in this worker thread) when it fails because its own LM was rate
    limited"; :614 "every 429 once, as a rollout's"."""
    source = ErrorSource(rate_limit, times=1)

    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        error = source()
        if error is not None:
            raise error
        return 0.75

    ev, codec = make_evaluator(ROUTING, Raising(ErrorSource(rate_limit, times=0)), metric=judge,
                               rate_limit_policy=RetryPolicy(10, 30.0, 0.001, 0.001))
    (outcome,) = run_evaluations(ev, codec)
    assert outcome.score == 0.75 and outcome.failure is None and outcome.rate_limit_retries == 1
    stats = ev.rate_limit_stats()
    assert stats["metric_rate_limit_retries"] == 1 and stats["rate_limited"] == 1


@pytest.mark.parametrize("retry_after, fatal", [(None, False), (1000.0, True)])
def test_a_metric_that_stays_rate_limited_is_the_services_failure(retry_after, fatal):
    """evaluator.py:682-684: "The judge's LM stayed rate limited past the policy: the service's failure, as a
    rollout's would be ..., and a wait past the whole policy (a used-up quota) stops the run at once"."""
    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise rate_limit(retry_after)

    ev, codec = make_evaluator(ROUTING, Raising(ErrorSource(rate_limit, times=0)), metric=judge, failure_score=-1.0,
                               rate_limit_policy=RetryPolicy(1, 30.0, 0.001, 0.001))
    (outcome,) = run_evaluations(ev, codec)
    assert outcome.failure == "rate_limited" and outcome.service_failure and outcome.score == -1.0
    assert outcome.fatal is fatal and outcome.message.startswith("The metric's LM stayed rate limited; gave up")


def test_a_metric_raising_a_fatal_lm_error_stops_the_run():
    """evaluator.py:692-693: "An LLM-judge metric's own LM can fail the way the student's does: a bad key or an
    unknown model there stops the run at once too"."""
    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise dspy_errors.LMAuthError("invalid api key")

    ev, codec = make_evaluator(ROUTING, Raising(ErrorSource(rate_limit, times=0)), metric=judge)
    (outcome,) = run_evaluations(ev, codec)
    assert outcome.failure == "metric_error" and outcome.fatal and outcome.error_type == "LMAuthError"


def test_the_trajectory_keeps_what_the_metric_returned_and_none_when_it_did_not_score():
    """evaluator.py:114-117: "What the metric returned when it scored this rollout ... None when the metric did not
    score it (the program or the metric failed)"."""
    ret = dspy.Prediction(score=0.5, feedback="half right")
    ev, codec = make_evaluator(ROUTING, Raising(ErrorSource(rate_limit, times=0)),
                               metric=lambda *a, **k: ret)
    (scored,) = run_evaluations(ev, codec)
    assert scored.trajectory.metric_return is ret and scored.score == 0.5
    ev, codec = make_evaluator(ROUTING, RaisesValueError(), metric=lambda *a, **k: ret)
    (failed,) = run_evaluations(ev, codec)
    assert failed.trajectory.metric_return is None


def test_with_track_usage_the_prediction_and_a_judges_prediction_carry_their_usage():
    """evaluator.py:728-729: "With ``dspy.configure(track_usage=True)``, DSPy attaches usage to the prediction, but only
    when no tracker is active; ours is, so attach it ourselves"; lm_copies.py:177-186 (_JudgeUsage) "Gives each module
    the metric calls (an LLM judge) the usage of its own LM calls on its prediction ... the entries are then added to
    the tracker that was active (the rollout's), so the budgets still see them"."""
    judge_program, seen = ROUTING.make_program(), {}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        seen["pred"] = pred.get_lm_usage()
        seen["judge"] = judge_program(ticket="is this billing?").get_lm_usage()
        return 1.0

    ev, codec = make_evaluator(ROUTING, metric=metric)
    with dspy.context(track_usage=True):
        (outcome,) = run_evaluations(ev, codec, make_student_lm())
    assert seen["pred"] and seen["judge"]
    assert outcome.lm_calls == 2  # the program's call and the judge's, both counted for the budgets


class SyncOnlyLM(dspy.BaseLM):
    def forward(self, prompt=None, messages=None, **kwargs):
        raise AssertionError("not called")


def test_lacks_async_support_is_told_by_base_lm_aforwards_not_implemented_error():
    """evaluator.py:172-174: "Whether ``error`` (or one of its causes) says an LM cannot be called asynchronously: ...
    the ``NotImplementedError`` of ``BaseLM.aforward`` (a custom LM that implements only ``forward``)"."""
    with pytest.raises(NotImplementedError) as raised:
        asyncio.run(SyncOnlyLM("custom/model").aforward(prompt="hi"))
    assert lacks_async_support(raised.value)
    wrapped = RuntimeError("program failed")
    wrapped.__cause__ = raised.value
    assert lacks_async_support(wrapped)
    try:
        raise NotImplementedError("my own todo")
    except NotImplementedError as own:
        assert not lacks_async_support(own)


def test_one_call_matched_to_two_predictors_is_two_steps_of_one_trace_entry():
    """evaluator.py:90-91: "one call matched to several predictors (by signature) is several steps but one trace
    entry"."""
    ev, codec = make_evaluator(ROUTING, Twins(), metric=one)
    try:
        twin = copy.deepcopy(codec.student.a)  # a copy no id matches (what dspy.BestOfN traces)
        outcome, _ = ev._score(examples()[0], 0, dspy.Prediction(queue="x"),
                               [(twin, {"ticket": "t"}, dspy.Prediction(queue="x"))], None,
                               PredictorNames(codec.student), "train", True)
    finally:
        ev.close()
    steps = outcome.trajectory.steps
    assert sorted(s.pred_name for s in steps) == ["a", "b"] and [s.raw_index for s in steps] == [0, 0]


def test_concurrent_rollouts_keep_their_own_traces():
    """evaluator.py:10: "Each rollout gets its own ``dspy.context(trace=...)`` so concurrent traces never mix"."""
    data = examples()
    ev, codec = make_evaluator(ROUTING, max_workers=4)
    outcomes = run_evaluations(ev, codec, make_student_lm(), ids=(0, 1, 2, 3))
    for outcome in outcomes:
        (entry,) = outcome.trajectory.raw_trace
        assert entry[1]["ticket"] == data[outcome.example_id].ticket


# ============================================================================ adapter/lm_copies.py
def test_an_lm_copy_has_retries_off_and_shares_the_originals_history():
    """lm_copies.py:4-7: "each LM gets one copy (``lm.copy()`` ...) with ``num_retries = 0``. The copy also shares the
    original's ``history`` list, so ``lm.history`` ... keep seeing the optimization's calls"; :414-416 a class, not an
    instance attribute: "dspy.BestOfN copies the LM (deepcopy) per call"."""
    lm = make_student_lm()
    copies = LMCopies()
    mine = copies.get(lm)
    assert copies.get(lm) is mine and copies.originals() == [lm]
    assert mine is not lm and mine.num_retries == 0 and lm.num_retries == 3
    assert type(mine).__name__ == "LM" and isinstance(mine, dspy.LM) and type(lm) is dspy.LM
    assert mine.history is lm.history
    mine("hello")
    assert len(lm.history) == 1
    deep = copy.deepcopy(mine)
    assert type(deep) is type(mine) and deep.num_retries == 0


def test_an_lm_that_cannot_be_copied_is_used_unchanged():
    """lm_copies.py:405-412: "nothing we can switch off" for a non-LM; "an exotic LM subclass: use it as it is rather
    than fail the run" (with a warning)."""
    class Uncopyable(SyncOnlyLM):
        def copy(self, **kwargs):
            raise RuntimeError("no copies")

    odd = Uncopyable("custom/model")
    assert LMCopies().get(odd) is odd
    thing = object()
    assert LMCopies().get(thing) is thing


def test_a_copy_makes_no_new_call_once_the_run_is_closed():
    """lm_copies.py:285-287: "once set, our copies make no new call (compile has returned or raised ...)"."""
    lm = make_student_lm()
    mine = LMCopies().get(lm)
    closed = threading.Event()
    closed.set()
    with dspy.context(**{ROLLOUT_CLOSED: closed}), pytest.raises(EvaluatorClosedError):
        mine("hello")
    assert lm.engine.calls == 0


def test_a_copy_notes_every_error_in_the_rollouts_list_before_raising_it():
    """lm_copies.py:308-313: "``base`` noting every error of a call in the running rollout's list before raising it
    ... The evaluator reads the list after the rollout and treats a swallowed rate limit as if it had been raised"."""
    def refuse(request):
        raise rate_limit()

    lm = make_student_lm(before_call=refuse)
    mine = LMCopies().get(lm)
    noted: list[BaseException] = []
    with dspy.context(**{ROLLOUT_LM_ERRORS: noted}):
        try:
            mine("hello")
        except Exception as exc:  # the program swallowing it, as dspy.Parallel does
            raised = exc
    assert noted == [raised] and classify(raised, FATAL_ERROR_TYPES).kind == "rate_limited"


def test_an_answer_with_no_choices_is_a_provider_error_and_uncached_asks_again_only_through_the_cache():
    """lm_copies.py:347-354: "An answer with no choices (``"choices": []``) is the service's failure ... Raised as
    DSPy's provider error"; :366-369 "the plain provider error instead when DSPy's cache cannot have served it: caching
    off for the call"."""
    with pytest.raises(dspy_errors.LMProviderError):
        lm_copies._some_output(make_student_lm(), [])
    assert lm_copies._some_output(None, ["fine"]) == ["fine"]
    with pytest.raises(dspy_errors.LMProviderError) as plain:
        lm_copies._uncached(make_student_lm(cache=False), {}, "forward")
    assert type(plain.value) is dspy_errors.LMProviderError
    assert lm_copies._uncached(make_student_lm(cache=True), {"temperature": 0.0}, "forward") == {
        "temperature": 0.0, "cache": False}


def test_cache_hits_are_not_charged_and_a_price_table_overrides_the_reported_cost():
    """lm_copies.py:12-13: "cost is what DSPy records in the history entries of our copies ... cache hits, which carry
    no usage, are not charged"; :148-149 "for a model in the table its reported cost is ignored, so nothing is counted
    twice"."""
    with rollout_usage() as box:
        lm_copies._note_history_entry({"usage": {}, "cost": 0.5, "model": "x/y"})
    assert box.cost == 0.0
    with rollout_usage() as box:
        lm_copies._note_history_entry({"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "cost": 0.5,
                                       "model": "x/y"})
    assert box.cost == 0.5
    with rollout_usage({"x/y": (1.0, 2.0)}) as box:
        dspy.settings.usage_tracker.add_usage("x/y", {"prompt_tokens": 1000, "completion_tokens": 100})
        lm_copies._note_history_entry({"usage": {"prompt_tokens": 1000, "completion_tokens": 100}, "cost": 0.5,
                                       "model": "x/y"})
    assert box.cost == pytest.approx((1000 * 1.0 + 100 * 2.0) / 1e6)


def test_tokens_no_copy_reported_are_priced_from_dspys_model_metadata_once():
    """lm_copies.py:13-16: "Calls through an LM we did not copy ... leave no entry we see: their tokens (the tracker's
    minus our copies') are priced from DSPy's model metadata"."""
    rates = lm_copies._metadata_rates("openai/gpt-4o-mini")
    assert rates is not None
    with rollout_usage() as box:
        dspy.settings.usage_tracker.add_usage("openai/gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 100})
    assert box.cost == pytest.approx(1000 * rates[0] + 100 * rates[1]) and box.calls == 1
    with rollout_usage() as box:  # our copy reported these tokens' cost: not priced again
        dspy.settings.usage_tracker.add_usage("openai/gpt-4o-mini", {"prompt_tokens": 1000, "completion_tokens": 100})
        lm_copies._note_history_entry({"usage": {"prompt_tokens": 1000, "completion_tokens": 100}, "cost": 0.25,
                                       "model": "openai/gpt-4o-mini"})
    assert box.cost == pytest.approx(0.25)


def test_a_negative_token_count_counts_as_zero():
    """lm_copies.py:94-96: "A negative count (a misbehaving gateway ...) is 0 too: summed, it would lower the spend"."""
    with rollout_usage() as box:
        dspy.settings.usage_tracker.add_usage("x/y", {"prompt_tokens": 100, "completion_tokens": 10})
        dspy.settings.usage_tracker.add_usage("x/y", {"prompt_tokens": -500, "completion_tokens": -5})
    assert (box.prompt_tokens, box.completion_tokens, box.calls) == (100, 10, 2)


def test_judge_usage_is_attached_only_when_the_user_turned_track_usage_on():
    """lm_copies.py:220-221: "Around a metric call inside :func:`rollout_usage` ... Nothing is added unless the user
    turned ``track_usage`` on"."""
    with rollout_usage():
        before = list(dspy.settings.get("callbacks") or [])
        with judge_usage_attached():
            assert list(dspy.settings.get("callbacks") or []) == before
        with dspy.context(track_usage=True), judge_usage_attached():
            added = [cb for cb in dspy.settings.callbacks if cb not in before]
    assert [type(cb).__name__ for cb in added] == ["_JudgeUsage"]


def test_an_endpoint_key_never_holds_userinfo_query_or_a_token_path_segment():
    """lm_copies.py:268-270: "its model plus its api_base (when set), never the URL's userinfo, query or a path segment
    that could be a token"."""
    lm = SimpleNamespace(model="openai/gpt-4o", kwargs={
        "api_base": "https://alice:pw123456@gw.example.com/gw/a8Kd9fQ2xLm4Zp7Rt1Vb/v1?key=topsecretvalue1"})
    key = endpoint_key(lm)
    assert key.startswith("openai/gpt-4o@https://gw.example.com/gw/~") and key.endswith("/v1?~" + key[-8:])
    for secret in ("alice", "pw123456", "a8Kd9fQ2xLm4Zp7Rt1Vb", "topsecretvalue1"):
        assert secret not in key
    assert endpoint_key(SimpleNamespace(model="openai/gpt-4o", kwargs={})) == "openai/gpt-4o"


OTHER_LM = make_student_lm()  # an LM the program holds itself: never copied by the evaluator


class OwnLMBranches(dspy.Module):
    """``dspy.Parallel`` branches that call an LM of the program's own (``dspy.context(lm=other)`` in forward)."""

    def __init__(self, parallel: bool) -> None:
        super().__init__()
        self.inner = ROUTING.make_program()
        self.parallel = parallel

    def branch(self, ticket):
        with dspy.context(lm=OTHER_LM):
            return self.inner(ticket=ticket)

    def forward(self, ticket):
        calls = [(self.branch, {"ticket": ticket}), (self.branch, {"ticket": ticket + " "})]
        if not self.parallel:
            return [fn(**kw) for fn, kw in calls][0]
        return dspy.Parallel(num_threads=2, disable_progress_bar=True)(calls)[0]


def test_usage_counts_calls_on_worker_threads_and_reaches_an_outer_tracker():
    """lm_copies.py:9-11: "tokens come from DSPy's own contextvar-based tracker (..., so every LM the program calls is
    counted, on worker threads and in asyncio tasks alike; an outer tracker of the user's still receives everything)";
    :251-252 a ``dspy.Parallel`` worker's call through our copy "is counted from its history entry"; :13-15 "Calls
    through an LM we did not copy (... a ``dspy.context(lm=other)`` inside ``forward``)" are counted too."""
    from helpers import TwoParallelBranches

    ev, codec = make_evaluator(ROUTING)
    with dspy.track_usage() as outer:
        (plain,) = run_evaluations(ev, codec, make_student_lm())
    assert plain.lm_calls == 1 and [len(entries) for entries in outer.usage_data.values()] == [1]
    ev, codec = make_evaluator(ROUTING, TwoParallelBranches(ROUTING.make_program()))
    (parallel,) = run_evaluations(ev, codec, make_student_lm())
    assert parallel.lm_calls == 2 and parallel.prompt_tokens > 0
    ev, codec = make_evaluator(ROUTING, OwnLMBranches(parallel=False))
    (serial,) = run_evaluations(ev, codec, make_student_lm())
    assert serial.lm_calls == 2 and serial.prompt_tokens == parallel.prompt_tokens


def test_an_uncopied_lm_called_in_dspy_parallel_branches_is_counted():
    """lm_copies.py:9-16: "every LM the program calls is counted, on worker threads and in asyncio tasks alike ...
    Calls through an LM we did not copy (..., a ``dspy.context(lm=other)`` inside ``forward``) ...: their tokens ...
    are priced from DSPy's model metadata, so ``cost_budget_usd`` counts them too"."""
    ev, codec = make_evaluator(ROUTING, OwnLMBranches(parallel=True))
    with dspy.track_usage() as outer:
        (outcome,) = run_evaluations(ev, codec, make_student_lm())
    assert outcome.failure is None
    assert outcome.lm_calls == 2 and outcome.prompt_tokens > 0
    # as many as the same branches run one after the other, and the user's own tracker saw both calls
    ev, codec = make_evaluator(ROUTING, OwnLMBranches(parallel=False))
    (serial,) = run_evaluations(ev, codec, make_student_lm())
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (serial.prompt_tokens, serial.completion_tokens)
    assert sum(len(entries) for entries in outer.usage_data.values()) == 2


# ============================================================================ adapter/metric.py
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), "0.5", object(),
                                 dspy.Prediction(score=None, feedback="f")])
def test_an_unusable_score_is_metric_invalid_and_scored_failure_score(bad):
    """metric.py:3-5: "a ``None``, NaN, infinite or non-numeric score is not silently summed but recorded as
    ``metric_invalid`` and scored ``failure_score``"."""
    reading = read_metric_return(bad, -2.0)
    assert reading.invalid and reading.score == -2.0


def test_floats_bools_and_score_feedback_predictions_are_read_as_dspy_gepa_reads_them():
    """metric.py:3: "dspy.GEPA accepts a float/int/bool or a ``dspy.Prediction(score=..., feedback=...)``. We accept the
    same"; :94-95 a bad objective "is recorded as ``metric_invalid`` instead of raising"; :149 default feedback."""
    assert read_metric_return(True, 0.0).score == 1.0 and read_metric_return(3, 0.0).score == 3.0
    reading = read_metric_return(dspy.Prediction(score=0.5, feedback="half", objective_scores={"acc": 1}), 0.0)
    assert (reading.score, reading.feedback, reading.objective_scores, reading.invalid) == (0.5, "half", {"acc": 1.0},
                                                                                            None)
    bad = read_metric_return(dspy.Prediction(score=1.0, objective_scores={"acc": float("nan")}), -1.0)
    assert bad.invalid and bad.score == -1.0
    assert read_metric_return(f"{KEY}", 0.0).invalid.count(REDACTED) == 1  # a string score's text is masked
    assert default_feedback(0.25) == "This trajectory got a score of 0.25."


class WrongJudge(dspy.Module):
    def forward(self, gold, pred):
        return 1.0


class RightJudge(dspy.Module):
    def forward(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 1.0


def test_metric_signature_checks(caplog):
    """metric.py:22-26: "a ``dspy.Module`` judge is checked through its ``forward`` (its ``__call__`` takes anything),
    and an ``async def`` metric is refused"; :41-42 "builtins without a signature: nothing to check up front"; :56-58
    the forward is read "past ``dspy.Module.__getattribute__``: that logs "calling module.forward(...) directly is
    discouraged""."""
    async def async_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 1.0

    class AsyncCall:
        async def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
            return 1.0

    for metric in (async_metric, AsyncCall()):
        with pytest.raises(TypeError, match="async"):
            check_metric_signature(metric)
    with pytest.raises(TypeError, match="five arguments.*for a dspy.Module judge: its `forward`"):
        check_metric_signature(WrongJudge())
    with pytest.raises(TypeError, match=r"def metric\(gold, pred, trace=None"):
        check_metric_signature(lambda gold, pred: 1.0)
    check_metric_signature(max)  # no readable signature
    with caplog.at_level(logging.WARNING):
        check_metric_signature(RightJudge())
    assert "discouraged" not in caplog.text


# ============================================================================ adapter/ratelimit.py
class WithAttrs(Exception):
    def __init__(self, **attrs) -> None:
        super().__init__("error with attributes")
        self.__dict__.update(attrs)


def test_retry_after_is_read_from_the_attribute_or_any_of_the_header_holders_in_the_chain():
    """ratelimit.py:8-13: "Retry-After is parsed into ``retry_after``"; with litellm "the header is only in
    ``litellm.RateLimitError.litellm_response_headers``, ``OpenAIError.headers`` and
    ``openai.RateLimitError.response.headers``"; :246 "wherever it is in the chain"."""
    from email.utils import format_datetime

    assert retry_after_of(rate_limit(retry_after=3.0)) == 3.0
    assert retry_after_of(WithAttrs(litellm_response_headers={"retry-after-ms": "1500"})) == 1.5
    assert retry_after_of(WithAttrs(headers={"Retry-After": "7"})) == 7.0
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=100)
    deep = RuntimeError("wrapped")
    deep.__cause__ = WithAttrs(response=SimpleNamespace(headers=[("retry-after", format_datetime(when))]))
    assert 90 <= retry_after_of(deep) <= 101
    assert retry_after_of(RuntimeError("no hint")) is None


def test_classify_rate_limits_transients_and_plain_failures():
    """ratelimit.py:3-25: 429s are rate limits (also as a status on an unknown class); timeouts, 5xx and dropped
    connections transient; :110-111 "a bare TimeoutError is the user's own and is not retried"; members of exception
    groups are looked at (:177)."""
    assert classify(rate_limit(), FATAL_ERROR_TYPES).kind == "rate_limited"
    assert classify(WithAttrs(status_code=429), FATAL_ERROR_TYPES).kind == "rate_limited"
    assert classify(dspy_errors.LMTimeoutError("t"), FATAL_ERROR_TYPES).kind == "transient"
    assert classify(WithAttrs(status=503), FATAL_ERROR_TYPES).kind == "transient"
    assert classify(ConnectionResetError(), FATAL_ERROR_TYPES).kind == "transient"
    assert classify(TimeoutError(), FATAL_ERROR_TYPES).kind is None
    group_type = getattr(builtins, "ExceptionGroup", None)  # Python >= 3.11
    if group_type is not None:
        assert classify(group_type("tasks", [ValueError("a"), rate_limit()]), FATAL_ERROR_TYPES).kind == "rate_limited"


class NotFoundError(Exception):
    """A user's own error named like a fatal LM error."""


def test_systemic_errors_win_anywhere_in_the_chain_only_when_the_lm_stack_raised_them():
    """ratelimit.py:16-24: "systemic (never retried ...): whatever is in the fatal set, checked first, when the LM
    stack raised it (``LM_STACK_PACKAGES``; a user's own ``NotFoundError`` is not systemic). A refused connection is
    systemic only until the endpoints have answered once ... it must be recognised by its cause, before any transient
    class is. An OpenAI ``insufficient_quota`` 429 arrives as ``LMBillingError`` and is systemic, not a rate limit";
    :324-325 "Anything systemic anywhere in the chain wins"."""
    refused = dspy_errors.LMServerError("server error") if hasattr(dspy_errors, "LMServerError") else RuntimeError()
    refused.__cause__ = ConnectionRefusedError("connection refused")
    verdict = classify(refused, FATAL_ERROR_TYPES)
    assert verdict.fatal and verdict.kind is None and verdict.error_type == "ConnectionRefusedError"
    assert classify(refused, FATAL_ONCE_ANSWERED).kind == "transient"
    billing = dspy_errors.LMBillingError("insufficient_quota", status=429)
    assert classify(billing, FATAL_ERROR_TYPES).fatal and classify(billing, FATAL_ERROR_TYPES).kind is None
    assert not classify(NotFoundError("no such row"), FATAL_ERROR_TYPES).fatal
    lm_stack_not_found = type("NotFoundError", (Exception,), {"__module__": "openai"})
    limited = rate_limit()
    limited.__cause__ = lm_stack_not_found("model not found")
    assert classify(limited, FATAL_ERROR_TYPES).fatal


def test_the_retry_policy_delay_formula_and_when_it_gives_up():
    """ratelimit.py:346-352: "The delay before retry ``k`` (0-based) is ``max(retry_after, min(cap_s, base_s * 2**k))``
    times a random factor in ``[1, 1 + jitter]`` ... gives up after ``max_retries`` retries, or once
    ``max_elapsed_s`` have passed ... and at once when the server asks it to wait past that ... no delay outlasts the
    policy"; :375-377 outlasted_by."""
    policy, rng = RetryPolicy(max_retries=5, max_elapsed_s=100.0, base_s=1.0, cap_s=4.0), random.Random(3)
    for k in range(5):
        exp = min(4.0, 2.0 ** k)
        assert exp <= policy.delay(k, None, rng) <= exp * 1.25
        assert 10.0 <= policy.delay(k, 10.0, rng) <= 12.5
    assert policy.delay(0, None, rng, elapsed_s=99.5) <= 0.5
    assert policy.delay(5, None, rng) is None and policy.delay(0, None, rng, elapsed_s=100.0) is None
    assert policy.delay(0, 50.0, rng, elapsed_s=60.0) is None
    assert policy.outlasted_by(101.0) and not policy.outlasted_by(100.0) and not policy.outlasted_by(None)


def test_the_two_default_policies():
    """ratelimit.py:385-388: "429s: generous ... (10 retries or 5 minutes)"; "Timeouts, 5xx, dropped connections: a few
    retries (3)" (and 2 minutes)."""
    assert (RATE_LIMIT_POLICY.max_retries, RATE_LIMIT_POLICY.max_elapsed_s) == (10, 300.0)
    assert (TRANSIENT_POLICY.max_retries, TRANSIENT_POLICY.max_elapsed_s) == (3, 120.0)


def test_rate_limit_stats_counters_and_waits():
    """ratelimit.py:418-421: "One failed attempt (``seen``), retry (after ``backoff_s``) or give-up ... in that kind's
    counter"; :450 "Counts as waiting for ``seconds`` from now, until the block ends"; :461 "Seconds left of the longest
    wait running; 0.0 when none is"."""
    stats = RateLimitStats()
    stats.count("rate_limited", "seen")
    stats.count("rate_limited", "retry", backoff_s=1.5)
    stats.count("transient", "gave_up")
    snap = stats.snapshot()
    assert (snap["rate_limited"], snap["rate_limit_retries"], snap["transient_gave_up"], snap["backoff_seconds"]) == (
        1, 1, 1, 1.5)
    now = [100.0]
    waits = RateLimitWaits(clock=lambda: now[0])
    assert waits.remaining() == 0.0
    with waits.waiting(5.0), waits.waiting(20.0):
        now[0] += 2.0
        assert waits.remaining() == 18.0
    assert waits.remaining() == 0.0


def test_context_window_errors_are_told_by_type_or_message_from_the_lm_stack_only():
    """ratelimit.py:311: "Whether the LM stack refused ``exc``'s request as longer than the model's context window";
    :304 "a parameter's own length limit (OpenAI's "user"), not the prompt's"."""
    assert context_window_exceeded(dspy_errors.ContextWindowExceededError(model="m"))
    assert context_window_exceeded(dspy_errors.LMInvalidRequestError("This model's maximum context length is 8192"))
    assert not context_window_exceeded(dspy_errors.LMInvalidRequestError(
        "string_above_max_length: this model's maximum context length is 8192"))
    assert not context_window_exceeded(ValueError("This model's maximum context length is 8192"))


def test_reading_an_error_attribute_never_raises():
    """ratelimit.py:167-169: "``getattr(obj, name, None)`` that also survives a property raising something else"."""
    class Odd(Exception):
        @property
        def status_code(self):
            raise KeyError("response")

    assert ratelimit.error_attr(Odd(), "status_code") is None
    assert classify(Odd("x"), FATAL_ERROR_TYPES).kind is None


def test_an_answer_the_lm_stack_cannot_use_is_the_services_failure_by_exact_class_name():
    """ratelimit.py:121-124: "Exception class names (exact: their subclasses say more) of an answer the LM stack could
    not use ... Not retried ..., but the LM service's failure, not the program's"; :161-162 service_failure: "nothing
    for a reflection to learn, and a resumed run runs the rollout again"."""
    unusable = classify(dspy_errors.LMProviderError("bad gateway page"), FATAL_ERROR_TYPES)
    assert unusable.kind is None and unusable.unusable_answer and unusable.service_failure and not unusable.fatal
    subclass = classify(dspy_errors.LMInvalidRequestError("bad request"), FATAL_ERROR_TYPES)
    assert not subclass.unusable_answer and not subclass.service_failure
    assert not classify(ValueError("x"), FATAL_ERROR_TYPES).service_failure


# ============================================================================ adapter/reflective.py


def reflective_builder(program, metric=one, warn_on_score_mismatch=True):
    codec = ProgramCodec(program)
    return ReflectiveDatasetBuilder(codec, metric, 0.0, False, warn_on_score_mismatch, True), codec


def program_error_after_a(codec, failed_predictor=None):
    """A TwoStep rollout: ``a`` answered, then the program raised before ``b`` ran."""
    a = codec.student_predictor("a")
    step = TraceStep("a", a, {"ticket": "t"}, dspy.Prediction(queue="billing"), 0)
    return DspyTrajectory(dspy.Example(ticket="t", team="x").with_inputs("ticket"), None, [step],
                          [(a, {"ticket": "t"}, dspy.Prediction(queue="billing"))], error="KeyError: 'billing'",
                          error_type="KeyError", failure="program_error", failed_predictor=failed_predictor)


def test_a_program_error_is_feedback_for_one_predictor_as_the_module_docstring_now_says():
    """reflective.py:5-7 (corrected after this review): a rollout where the program raised "contributes the error as
    feedback to one predictor ...: the one it was raised in, else the last one that ran before it". It said "to
    the predictors that did not produce an output"."""
    import dspy_turbogepa.adapter.reflective as reflective_module

    builder, codec = reflective_builder(TwoStep())
    dataset = builder.build(["a", "b"], [program_error_after_a(codec)], [0.0], random.Random(0))
    assert set(dataset) == {"a"}
    doc = " ".join((reflective_module.__doc__ or "").split())
    assert "to one predictor" in doc and "did not produce an output" not in doc


def test_a_program_error_goes_to_the_predictor_it_was_raised_in_else_the_last_that_ran_else_none():
    """reflective.py:292-295 (_program_error_owner): "Who a program error is fed back to: the predictor it was raised
    inside, else the last one that ran before it ..., else no one (it was raised before any predictor ran)"; :196
    "raised in the program's own code, after this predictor's output: that output may be the cause"."""
    builder, codec = reflective_builder(TwoStep())
    rng = random.Random(0)
    after_a = builder.build(["a", "b"], [program_error_after_a(codec)], [0.0], rng)
    assert set(after_a) == {"a"} and after_a["a"][0]["Generated Outputs"] == {"queue": "billing"}
    assert "after this output" in after_a["a"][0]["Feedback"]
    in_b = builder.build(["a", "b"], [program_error_after_a(codec, failed_predictor="b")], [0.0], rng)
    assert set(in_b) == {"b"} and "before this step produced an output" in in_b["b"][0]["Generated Outputs"]
    before_any = program_error_after_a(codec)
    before_any.steps, before_any.raw_trace = [], []
    assert builder.build(["a", "b"], [before_any], [0.0], rng) == {}


def test_records_have_dspy_gepas_shape_and_the_metrics_feedback():
    """reflective.py:3-4: "Records have dspy.GEPA's shape ({"Inputs", "Generated Outputs", "Feedback"})"; the feedback
    call passes ``pred_name`` and ``pred_trace``."""
    calls = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls.append((pred_name, pred_trace))
        return dspy.Prediction(score=1.0, feedback=f"fine for {pred_name}")

    builder, codec = reflective_builder(TwoStep(), metric)
    a = codec.student_predictor("a")
    step = TraceStep("a", a, {"ticket": "t"}, dspy.Prediction(queue="billing"), 0)
    traj = DspyTrajectory(dspy.Example(ticket="t").with_inputs("ticket"), dspy.Prediction(team="x"), [step],
                          [(a, {"ticket": "t"}, step.outputs)])
    dataset = builder.build(["a"], [traj], [1.0], random.Random(0))
    assert dataset == {"a": [{"Inputs": {"ticket": "t"}, "Generated Outputs": {"queue": "billing"},
                              "Feedback": "fine for a"}]}
    assert calls[0][0] == "a" and calls[0][1][0][0] is a


def test_a_metric_raising_on_every_feedback_call_is_a_feedback_metric_error():
    """reflective.py:63-64: "Every record of a reflective dataset was lost because the metric raised when asked for
    feedback. ``error_type``: what the metric raised"; :162 "a metric bug must not kill the proposal: skip this record,
    say why"."""
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            raise ZeroDivisionError("feedback broke")
        return 1.0

    builder, codec = reflective_builder(TwoStep(), metric)
    a = codec.student_predictor("a")
    step = TraceStep("a", a, {"ticket": "t"}, dspy.Prediction(queue="billing"), 0)
    traj = DspyTrajectory(dspy.Example(ticket="t").with_inputs("ticket"), dspy.Prediction(), [step], [])
    with pytest.raises(FeedbackMetricError, match="feedback broke") as raised:
        builder.build(["a"], [traj, traj], [1.0, 1.0], random.Random(0))
    assert raised.value.error_type == "ZeroDivisionError" and builder.skipped_counts() == {"feedback_error": 2}


def test_a_score_mismatch_is_warned_about_once(caplog):
    """reflective.py:276-285: one warning when the pred_name call's score differs ("Set warn_on_score_mismatch=False to
    silence this warning")."""
    builder, codec = reflective_builder(TwoStep(), lambda *a, **k: 0.25)
    a = codec.student_predictor("a")
    step = TraceStep("a", a, {"ticket": "t"}, dspy.Prediction(queue="billing"), 0)
    traj = DspyTrajectory(dspy.Example(ticket="t").with_inputs("ticket"), dspy.Prediction(), [step], [])
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        builder.build(["a"], [traj, traj], [1.0, 1.0], random.Random(0))
        builder.build(["a"], [traj], [1.0], random.Random(0))
    assert caplog.text.count("differs from the score") == 1


def test_a_selector_sees_dspys_trace_data_dicts():
    """reflective.py:40-46: "dicts of dspy's ``TraceData`` shape (``example_ind``, ``example``, ``prediction``,
    ``trace``, ``score``) ... ``score`` is what the metric returned ... and the float score where the metric did not
    score the rollout. Unlike dspy's, a rollout whose program raised is included, with prediction None"."""
    seen = {}

    def selector(state, trajectories, subsample_scores, candidate_idx, candidate):
        seen["data"] = trajectories
        return ["a"]

    ret = dspy.Prediction(score=1.0, feedback="ok")
    ex = dspy.Example(ticket="t").with_inputs("ticket")
    scored = DspyTrajectory(ex, dspy.Prediction(queue="q"), [], [("p", {}, "o")], metric_return=ret)
    raised = DspyTrajectory(ex, None, [], [], error="ValueError: x", failure="program_error")
    assert with_trace_data(selector)(None, [scored, raised], [1.0, 0.0], 0, {"a": "x"}) == ["a"]
    first, second = seen["data"]
    assert set(first) == {"example_ind", "example", "prediction", "trace", "score"}
    assert first["score"] is ret and first["trace"] == [("p", {}, "o")] and first["example_ind"] == 0
    assert second["prediction"] is None and second["score"] == 0.0


def test_no_record_for_a_metric_failure_or_a_rate_limited_judge_and_a_reparse_failure_is_its_own(caplog):
    """reflective.py:150-155: a ``metric_error`` rollout gives no record; "an LLM judge's LM stayed rate limited: the
    service's failure" (counted as ``infrastructure_error``); :184-185 "a predictor called again, as ReAct's is at each
    step, may have answered once and then failed to parse"; :304 the warning says why ("where the metric
    raised")."""
    builder, codec = reflective_builder(TwoStep())
    a = codec.student_predictor("a")
    step = TraceStep("a", a, {"ticket": "t"}, dspy.Prediction(queue="billing"), 0)
    ex = dspy.Example(ticket="t").with_inputs("ticket")
    judged = [DspyTrajectory(ex, dspy.Prediction(), [step], [], failure=kind) for kind in ("metric_error",
                                                                                           "rate_limited")]
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        assert builder.build(["a"], judged, [0.0, 0.0], random.Random(0)) == {}
    assert builder.skipped_counts() == {"metric_error": 1, "infrastructure_error": 1}
    assert "1 where the metric raised" in caplog.text
    reparse = DspyTrajectory(ex, None, [step], [], error="AdapterParseError: no queue", failure="format_error",
                             failed_predictor="a", raw_completion="garbage")
    records = builder.build(["a", "b"], [reparse], [0.0], random.Random(0))
    assert set(records) == {"a"} and "garbage" in records["a"][0]["Generated Outputs"]


# ============================================================================ adapter/program.py
class Frozen(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = dspy.Predict("x -> y")


class Holder(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = dspy.Predict("x -> y")
        self.frozen = Frozen()
        self.frozen._compiled = True
        self.nested = [[dspy.Predict("x -> z")]]


def test_all_named_predictors_lists_the_components_first_then_the_frozen_and_nested_ones():
    """program.py:27-30: "``named_predictors()`` first (the components, under dspy's names), then those it skips, under
    their path (``frozen.predict``): those in a submodule marked compiled ..., and those in a container nested in a
    container"."""
    holder = Holder()
    assert [n for n, _ in holder.named_predictors()] == ["main"]
    assert [n for n, _ in all_named_predictors(holder)] == ["main", "frozen.inner", "nested[0][0]"]


def test_a_build_changes_only_instructions_and_never_touches_the_student():
    """program.py:3-5: "Only instructions change. Demos, per-predictor LMs, field prefixes and descriptions are carried
    over from the student by ``deepcopy`` ..., and the student itself is never touched"; :283 "A fresh program carrying
    ``texts`` (never cached)"; :245-248 the ``detailed_results`` an earlier compile left "is the old run's result, wrong
    on the new program. ... the student itself keeps its attribute"."""
    student = TwoStep()
    student.a.demos = [dspy.Example(ticket="t", queue="billing")]
    student.a.lm = make_student_lm()
    student.detailed_results = "an earlier run's result"
    original = student.a.signature.instructions
    codec = ProgramCodec(student)
    built = codec.build({"a": "Route the ticket."})
    assert built.a.signature.instructions == "Route the ticket." and student.a.signature.instructions == original
    assert built.a.demos == student.a.demos and built.a.lm.model == student.a.lm.model
    assert built.b.signature.instructions == student.b.signature.instructions
    assert list(built.a.signature.output_fields) == ["queue"]
    assert "detailed_results" not in vars(built) and student.detailed_results == "an earlier run's result"
    assert codec.build({}) is not codec.build({})


def test_the_codec_caches_one_shared_program_per_fingerprint_lru():
    """program.py:235-238: "Builds (and caches) one program object per candidate fingerprint. A built program is shared
    by every concurrent evaluation of that candidate"."""
    codec = ProgramCodec(TwoStep(), cache_size=2)
    first = codec.get("f1", {"a": "one"})
    assert codec.get("f1", {"a": "one"}) is first and first.for_call()[0] is first.program
    codec.get("f2", {"a": "two"})
    codec.get("f3", {"a": "three"})
    assert codec.get("f1", {"a": "one"}) is not first  # evicted, least recently used


def test_the_search_programs_keep_no_module_history_but_the_lm_records_every_call():
    """program.py:222-228: "A module ``history`` that keeps nothing, for the programs the search evaluates ... the LM's
    own history and DSPy's global one still record every call, and the program returned to the user is built apart,
    with its own"."""
    codec = ProgramCodec(ROUTING.make_program())
    program = codec.get("seed", codec.seed_texts()).program
    lm = make_student_lm()
    with dspy.context(lm=lm):
        program(ticket=examples()[0].ticket)
    assert all(len(module.history) == 0 for _, module in program.named_sub_modules())
    assert len(lm.history) == 1
    returned = codec.build(codec.seed_texts())
    with dspy.context(lm=lm):
        returned(ticket=examples()[0].ticket)
    assert any(len(module.history) == 1 for _, module in returned.named_sub_modules())


class FailsInCode(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = dspy.Predict("ticket -> queue")
        self.b = dspy.Predict("queue -> team")

    def forward(self, ticket, where="code"):
        if where == "b":
            try:
                self.b(queue="billing")
            except Exception as exc:
                raise RuntimeError("the pipeline failed") from exc
        self.a(ticket=ticket)
        raise ValueError("after a: in the program's code")


def test_raised_in_reads_the_innermost_predictor_frame_or_the_cause():
    """program.py:99-101: "The predictor ``error`` was raised inside: the innermost frame of its traceback that is a
    method of one of the program's predictors. None when it was raised in the program's own code between predictor
    calls"; :108 "``raise X from e``: where ``e`` was raised"."""
    def refuse(request):
        if "queue" in str(request) and "team" in str(request):
            raise dspy_errors.LMProviderError("b's call failed")

    program = FailsInCode()
    names = PredictorNames(program)
    with dspy.context(lm=make_student_lm(before_call=refuse)):
        with pytest.raises(ValueError) as in_code:
            program(ticket="where is my refund?")
        with pytest.raises(RuntimeError) as from_b:
            program(ticket="where is my refund?", where="b")
    assert names.raised_in(in_code.value) is None
    assert names.raised_in(from_b.value) == "b"


def test_a_parse_failure_is_owned_only_by_the_one_predictor_with_that_signature():
    """program.py:134-137: "The one predictor whose signature equals ``signature`` (fields and instructions), else None
    ... two predictors with the same fields but other instructions must not both be blamed"; :84 an unknown predictor
    is "?"."""
    twins = PredictorNames(Twins())
    assert twins.signature_owner(Twins().a.signature) is None
    two = TwoStep()
    two.b.signature = dspy.Predict("ticket -> queue").signature.with_instructions("Other instructions.")
    names = PredictorNames(two)
    assert names.signature_owner(two.a.signature) == "a" and names.signature_owner(two.b.signature) == "b"
    assert names.names_of(dspy.Predict("other -> thing")) == ["?"]


# ============================================================================ adapter/protocols.py


def test_check_call_protocol_names_the_argument_and_lets_unreadable_signatures_through():
    """protocols.py:20-22: "Raise ``TypeError`` naming ``argument`` and the expected ``protocol`` when ``fn`` cannot be
    called with ``args`` / ``kwargs`` ... A callable without a readable signature (a builtin, some C extensions) is
    let through"; :31-33 a ``functools.wraps`` decorator supplying the first arguments is accepted, "a wrapper taking
    anything must not let a wrong signature through"."""
    import functools

    with pytest.raises(TypeError, match=r"instruction_proposer is called as proposer\(a, b, c\)"):
        check_call_protocol(lambda a, b: None, "instruction_proposer", "proposer(a, b, c)", args=(1, 2, 3))
    check_call_protocol(max, "x", "x(a, b, c, d, e)", args=(1, 2, 3, 4, 5))  # no readable signature

    def supplies_config(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn("config", *args, **kwargs)
        return wrapper

    @supplies_config
    def proposer(config, candidate, reflective_dataset, components_to_update):
        return {}

    check_call_protocol(proposer, "p", "p(3 args)", args=(1, 2, 3))

    def takes_anything(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    @takes_anything
    def wrong(candidate):
        return {}

    with pytest.raises(TypeError):
        check_call_protocol(wrong, "p", "p(3 args)", args=(1, 2, 3))


class NeedsQuestion(dspy.Module):
    def forward(self, question, context="none"):
        return dspy.Prediction(answer="x")


class TakesAnything(dspy.Module):
    def forward(self, **kwargs):
        return dspy.Prediction(answer="x")


def _strict_signature(fn):
    import functools
    import inspect

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                               inspect.Parameter("question", inspect.Parameter.POSITIONAL_OR_KEYWORD)])
    return wrapper


class HiddenKwargs(dspy.Module):
    @_strict_signature
    def forward(self, **kwargs):
        return dspy.Prediction(answer="x")


class OwnCall(dspy.Module):
    def __call__(self, **kwargs):
        return self.forward(**kwargs)

    def forward(self, question):
        return dspy.Prediction(answer="x")


def test_check_inputs_reach_refuses_only_what_certainly_fails(caplog):
    """protocols.py:47-58: "Refuse data whose inputs can never reach the program ... When only some examples cannot be
    bound, a warning, and their indices are returned ... An input the examples lack, with a default in the method, is
    fine; a ``with_inputs`` name no example holds is named ... What cannot be read is let through: ... a ``__call__``
    / ``acall`` of the user's own"."""
    good = dspy.Example(question="q").with_inputs("question")
    bad = dspy.Example(query="q").with_inputs("query")
    with pytest.raises(TypeError, match="no example's inputs fit"):
        check_inputs_reach(NeedsQuestion(), "trainset", [bad, bad])
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        assert check_inputs_reach(NeedsQuestion(), "valset", [good, bad, good]) == [1]
    assert "1 of 3 examples will fail" in caplog.text
    typo = dspy.Example(question="q").with_inputs("question", "contxt")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        assert check_inputs_reach(NeedsQuestion(), "trainset", [typo]) == []
    assert "['contxt']" in caplog.text and "typo" in caplog.text.lower()
    assert check_inputs_reach(TakesAnything(), "trainset", [bad]) == []
    assert check_inputs_reach(HiddenKwargs(), "trainset", [bad]) == []  # :126-127 **kwargs hidden by __signature__
    assert check_inputs_reach(OwnCall(), "trainset", [bad]) == []
    on_instance = NeedsQuestion()
    on_instance.forward = lambda **kw: dspy.Prediction(answer="x")
    assert check_inputs_reach(on_instance, "trainset", [bad]) == []


# ============================================================================ adapter/persistence.py

STORE_KEY = {"run": "review"}


class RecordingStore:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name):
        if name.startswith("record_"):
            return lambda *args, **kwargs: self.calls.append((name, args))
        raise AttributeError(name)


def test_every_evaluated_candidate_is_stored_once_and_a_kept_none_output_is_a_json_null():
    """persistence.py:54-56: "Every evaluated candidate is stored (not only accepted ones) ... created_at: when it was
    first stored"; :46-47 "``keeps_outputs``: ... a program that answered ``None`` is then stored as a JSON null, not as
    "no output kept""."""
    store = RecordingStore()
    observer = StoreObserver(store, keeps_outputs=True)
    cand = Candidate({"predict": "Route it."})
    observer.on_evaluation(cand, "val", EvalOutcome(0, 1.0))
    observer.on_evaluation(cand, "train", EvalOutcome(1, 0.0))
    kinds = [name for name, _ in store.calls]
    assert kinds == ["record_candidate", "record_evaluation", "record_evaluation"]
    assert store.calls[1][1][9] == "null" and store.calls[2][1][9] is None  # output_json: val kept, train not
    plain = RecordingStore()
    StoreObserver(plain, keeps_outputs=False).on_evaluation(cand, "val", EvalOutcome(0, 1.0))
    assert plain.calls[1][1][9] is None


def test_an_evaluation_json_cannot_hold_is_not_stored_and_warned_about_once(caplog):
    """persistence.py:73-74: "A value the walk let through that JSON cannot write: the run goes on with the outcome in
    memory; unstored, a resume runs the evaluation again"; one warning, "Further ones at DEBUG"."""
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    store = RecordingStore()
    observer = StoreObserver(store)
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        for i in range(2):
            observer.on_evaluation(Candidate({"p": "x"}), "val", EvalOutcome(i, 1.0, output=dspy.Prediction(a=deep)))
    assert [name for name, _ in store.calls] == ["record_candidate"]
    warnings = [r for r in caplog.records if "could not be written to the run store" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert any(r.levelno == logging.DEBUG and "Evaluation not stored" in r.getMessage() for r in caplog.records)


def test_stored_usage_counts_every_row_failed_and_replaced_ones_too(tmp_path):
    """persistence.py:121-122: "What the stored sessions paid for, every row (failed evaluations and reflections too:
    the LM billed them, and a rerun that runs them again replaces the row, not the bill)"; :133-134 "The highest
    mutation number an earlier session committed (-1 if none)"."""
    with RunStore.open(tmp_path, STORE_KEY) as store:
        assert last_committed_mutation(store) == -1
        usage = {"prompt_tokens": 10, "completion_tokens": 2, "cost": 0.5}
        store.record_evaluation("fp", "val", 0, 0.0, None, "program_error", "x", "ValueError", None, None, None, None,
                                usage=usage)
        store.record_evaluation("fp", "val", 0, 1.0, None, None, None, None, None, None, None, None, usage=usage)
        store.record_proposal("k", {"p": "text"}, "proposer_error", "failed", 1, usage=usage)
        for seq in (0, 3, 1):
            store.record_event("mutation_committed", {"seq": seq})
        prior = stored_usage(store)
        assert last_committed_mutation(store) == 3
    assert (prior.task_prompt_tokens, prior.task_completion_tokens, prior.task_cost) == (20, 4, 1.0)
    assert (prior.reflection_prompt_tokens, prior.reflection_cost) == (10, 0.5)


def routing_codec():
    codec = ProgramCodec(ROUTING.make_program())
    data = examples()
    return codec, {"train": data, "val": data}, codec.seed_texts()


def test_load_known_leaves_out_service_failures_failed_proposers_and_a_systemic_sessions_failures(tmp_path):
    """persistence.py:149-152: "Not replayed: failures of the LM service, a failed proposer ..., and every failure
    recorded by a session that stopped on a systemic failure"."""
    codec, datasets, seed = routing_codec()
    fp = Candidate(seed).fingerprint
    with RunStore.open(tmp_path, STORE_KEY) as store:  # session 1: stops on a systemic failure
        store.record_evaluation(fp, "val", 0, 1.0, None, None, None, None, None, None, None, None)
        store.record_evaluation(fp, "val", 2, 0.0, None, "program_error", "x", "E", None, None, None, None)
        store.record_proposal("p1", {}, "empty_proposal", "nothing", 1)
        store.record_proposal("p2", {}, "no_reflective_data", "nothing to read", 0)
        store.record_event("systemic_failure", {"cause": "bad key"})
    with RunStore.open(tmp_path, STORE_KEY) as store:  # session 2: an ordinary one
        store.record_evaluation(fp, "train", 0, 0.0, None, "program_error", "x", "E", None, None, None, None)
        store.record_evaluation(fp, "val", 1, 0.0, None, "program_error", "429", "E", None, None, None, None,
                                service_failure=True)
        store.record_proposal("p3", {}, "proposer_error", "boom", 1)
        store.record_proposal("p4", {"predict": "New text."}, None, None, 1)
        known, proposals = load_known(store, codec, datasets, seed)
    assert set(known) == {(fp, "val", 0), (fp, "train", 0)}
    assert set(proposals) == {"p2", "p4"}


def test_load_known_reruns_rows_whose_output_was_not_kept_or_was_masked(tmp_path, caplog):
    """persistence.py:145-147: "``need_outputs``: a validation row stored without the program's output by a session
    that did not keep outputs is run again, once, with a warning"; :181 "best_outputs_valset would return the masked
    copy"."""
    codec, datasets, seed = routing_codec()
    fp = Candidate(seed).fingerprint
    with RunStore.open(tmp_path, STORE_KEY) as store:
        store.record_evaluation(fp, "val", 0, 1.0, None, None, None, None, None, None, None, None)
        store.record_evaluation(fp, "val", 1, 1.0, None, None, None, None, None, json.dumps({"queue": KEY}), None,
                                None)
        store.record_evaluation(fp, "val", 2, 1.0, None, None, None, None, None, json.dumps({"queue": "ok"}), None,
                                None)
        with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
            known, _ = load_known(store, codec, datasets, seed, need_outputs=True)
        assert set(load_known(store, codec, datasets, seed)[0]) == {(fp, "val", i) for i in range(3)}
    assert set(known) == {(fp, "val", 2)} and known[(fp, "val", 2)].output.queue == "ok"
    assert "1 stored validation evaluations were written without their outputs" in caplog.text
    assert "1 stored validation outputs held credential-shaped text" in caplog.text


def test_a_masked_candidate_text_or_trace_is_not_rebuilt_but_masked_feedback_is_fine(tmp_path):
    """persistence.py:154-156: "Only texts that still hash to their fingerprint are used"; :216-221 (_trace_masked) "a
    masked copy scores a right answer wrong ... The engine runs such an evaluation again only if a new reflection is to
    read it (``EvalOutcome.trace_lost``). What the metric returned ... masked feedback there does not make the
    evaluation run (and be paid) again"."""
    codec, datasets, seed = routing_codec()
    (name,) = seed
    fp = Candidate(seed).fingerprint
    keyed = {name: f"Use {KEY} to route."}
    fp_keyed = Candidate(keyed).fingerprint
    pred = codec.student_predictor(name)

    def traj(ticket, feedback="fine"):
        step = TraceStep(name, pred, {"ticket": ticket}, dspy.Prediction(queue="billing"), 0)
        return trajectory_to_json(DspyTrajectory(datasets["val"][0], dspy.Prediction(queue="billing"), [step], [],
                                                 metric_return=dspy.Prediction(score=1.0, feedback=feedback)))

    with RunStore.open(tmp_path, STORE_KEY) as store:
        store.record_candidate(fp_keyed, keyed, [fp], "reflection", 0.0)
        store.record_evaluation(fp_keyed, "val", 0, 1.0, None, None, None, None, traj("t"), None, None, None)
        store.record_evaluation(fp, "val", 1, 1.0, None, None, None, None, traj(f"my key is {KEY}"), None, None, None)
        store.record_evaluation(fp, "val", 2, 1.0, None, None, None, None, traj("t", f"you leaked {KEY}"), None,
                                None, None)
        known, _ = load_known(store, codec, datasets, seed)
    assert known[(fp_keyed, "val", 0)].trajectory is None
    assert known[(fp, "val", 1)].trace_lost and known[(fp, "val", 1)].trajectory is None
    replayed = known[(fp, "val", 2)]
    assert not replayed.trace_lost and replayed.trajectory is not None
    assert replayed.trajectory.steps[0].predictor is not None


# ============================================================================ adapter/trajectory_json.py


class Color(enum.Enum):
    RED = "r"


@dataclasses.dataclass
class Point:
    x: int
    y: int
    secret: str = dataclasses.field(default="none", repr=False)


class Model(pydantic.BaseModel):
    a: int
    hidden: str = pydantic.Field(default="none", exclude=True)
    quiet: str = pydantic.Field(default="none", repr=False)


Pair = collections.namedtuple("Pair", "a b")
INITS: list[int] = []


class Answer:
    """A plain class of the user's own."""

    def __init__(self, text: str) -> None:
        INITS.append(1)
        self.text = text
        self.api_key = "k-3f9a8b7c6d5e"
        self.token = "word"


class Hooked:
    def __init__(self) -> None:
        self.x = 1

    def __setstate__(self, state):
        self.__dict__.update(state)


def round_trip(value):
    return tj._revive(json.loads(json.dumps(jsonable(value))))


def test_typed_values_come_back_as_the_objects_a_live_run_gave():
    """trajectory_json.py:4-8: "Typed values (pydantic models, dataclasses, dates) are stored in their JSON form tagged
    with their type and rebuilt on resume ...; values JSON cannot hold otherwise (images, custom types) are stored as
    their ``str()``"; :76-78 "a tuple, a set (sorted) and a mapping with keys other than strings tagged too"; :149-150
    numpy values typed."""
    INITS.clear()
    value = {"p": Point(1, 2), "m": Model(a=1), "d": datetime.date(2024, 1, 2), "t": (1, (2, 3)), "s": {3, 1, 2},
             "k": {1: "one", (2, 3): "pair"}, "o": collections.OrderedDict([(2, "b"), (1, "a")]), "e": Color.RED,
             "n": np.array([[1, 2], [3, 4]], dtype=np.int32), "f": np.float32(0.5), "nt": Pair(1, 2),
             "ans": Answer("hi"), "lock": threading.Lock(), "c": 1 + 2j, "ex": dspy.Example(m=Model(a=3))}
    back = round_trip(value)
    assert back["p"] == Point(1, 2) and back["m"] == Model(a=1) and back["d"] == datetime.date(2024, 1, 2)
    assert back["t"] == (1, (2, 3)) and back["s"] == {1, 2, 3} and back["k"] == {1: "one", (2, 3): "pair"}
    assert type(back["o"]) is collections.OrderedDict and list(back["o"]) == [2, 1]
    assert back["e"] is Color.RED and type(back["nt"]) is Pair and back["nt"] == Pair(1, 2)
    assert back["n"].dtype == np.int32 and back["n"].tolist() == [[1, 2], [3, 4]] and type(back["f"]) is np.float32
    assert type(back["ans"]) is Answer and back["ans"].text == "hi" and INITS == [1]  # rebuilt without __init__
    assert isinstance(back["lock"], str) and back["c"] == "(1+2j)"
    assert back["ex"].m == Model(a=3)  # :119 an example "items, not toDict(), which turns models into plain dicts"
    assert jsonable({3, 1, 2}) == {tj._TYPE: "builtins:set", "value": [1, 2, 3]}


def test_fields_kept_out_of_repr_or_dump_and_credential_fields_stay_out_of_the_store():
    """trajectory_json.py:178-181: "one declared ``repr=False`` or ``exclude=True`` (often a key or a client) stays out
    of the store"; :189-191 a plain class's fields "but not a credential (db_password, api_key) ...; a field called
    "token" is an NLP object's data far more often than a secret"; :200-201 "no ``__slots__``, no ``__del__`` or
    pickling hooks"."""
    text = json.dumps(jsonable([Point(1, 2, secret="s3cr3t-value"), Model(a=1, hidden="h1dden", quiet="qu1et"),
                                Answer("hi")]))
    for hidden in ("s3cr3t-value", "h1dden", "qu1et", "k-3f9a8b7c6d5e", "api_key"):
        assert hidden not in text
    assert '"token": "word"' in text
    assert isinstance(jsonable(Hooked()), str)


def test_an_object_inside_itself_is_a_marker_but_one_met_again_elsewhere_is_stored_again():
    """trajectory_json.py:80-82: "An object met inside itself (a parent link) is stored as a ``<see above: T>`` marker;
    one met again elsewhere (two fields holding the same model) is stored again"."""
    loop: list[Any] = [1]
    loop.append(loop)
    assert jsonable(loop) == [1, "<see above: list>"]
    shared = {"a": 1}
    assert jsonable([shared, shared]) == [{"a": 1}, {"a": 1}]


def test_a_stored_type_is_looked_up_only_among_loaded_modules_without_import_or_module_getattr(monkeypatch):
    """trajectory_json.py:232-237: "the class is looked up among modules already loaded, by their ``__dict__`` (no
    import, no module ``__getattr__``) ...; any other name ... leaves the plain JSON"."""
    asked = []
    fake = types.ModuleType("zz_review_lazy_module")
    fake.__getattr__ = lambda name: asked.append(name) or Point  # PEP 562: would hand back a class
    monkeypatch.setitem(sys.modules, "zz_review_lazy_module", fake)
    assert tj._revive({tj._TYPE: "zz_review_lazy_module:Missing", "value": {"x": 1, "y": 2}}) == {"x": 1, "y": 2}
    assert asked == []
    assert tj._revive({tj._TYPE: "zz_review_never_imported:Thing", "value": [1]}) == [1]
    assert "zz_review_never_imported" not in sys.modules


def test_a_class_built_by_exec_without_a_name_is_not_a_library_class():
    """introspect.py, library_class: "A class built by ``exec`` without a ``__name__`` says it is from
    ``builtins``; it is the user's unless ``builtins`` really holds it"."""
    namespace: dict[str, Any] = {}
    exec("class Made:\n    pass\n", namespace)
    made = namespace["Made"]
    from dspy_turbogepa.adapter.introspect import library_class

    assert made.__module__ == "builtins" and not library_class(made)
    assert library_class(int) and library_class(collections.OrderedDict) and not library_class(Answer)


def test_a_plain_value_or_mapping_prediction_comes_back_as_the_same_kind():
    """trajectory_json.py:334-335: "a program that returns a plain value (a str, a list) is marked as such, so resume
    hands the metric the same kind of object"."""
    for pred in ("an answer", [1, 2], {"queue": "billing"}):
        back = prediction_from(json.loads(json.dumps(prediction_dict(pred))))
        assert back == pred and type(back) is type(pred)
    back = prediction_from(json.loads(json.dumps(prediction_dict(dspy.Prediction(queue="billing")))))
    assert isinstance(back, dspy.Prediction) and back.queue == "billing"
    assert prediction_dict(None) is None


def search(query: str) -> str:
    """Look something up."""
    return query


class WithTool(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tools = [dspy.Tool(search)]
        self.predict = dspy.Predict("ticket -> queue")

    def forward(self, ticket):
        return self.predict(ticket=ticket)


def test_a_trajectory_round_trip_rebuilds_trace_entries_stand_ins_and_tools():
    """trajectory_json.py:469-470: "One LM call matched to several predictors is one trace entry under consecutive
    steps with the same "raw""; :398-400 a stand-in "for a predictor the program does not hold. One per signature per
    trajectory"; :516-517 "The program's tool that shows what the stored one showed (the same object the live trace
    held), else a tool showing the same name, description and argument schema whose function raises"; :418 a failed
    signature "after a reload: only its field names are compared"."""
    codec = ProgramCodec(Twins())
    texts = codec.seed_texts()
    program = codec.get("fp", texts).program
    twin = copy.deepcopy(program.a)
    inner = dspy.Predict("draft -> critique")
    out = dspy.Prediction(queue="billing")
    traj = DspyTrajectory(
        dspy.Example(ticket="t").with_inputs("ticket"), out,
        [TraceStep("a", twin, {"ticket": "t"}, out, 0), TraceStep("b", twin, {"ticket": "t"}, out, 0),
         TraceStep("?", inner, {"draft": "d"}, dspy.Prediction(critique="c"), 1),
         TraceStep("?", copy.deepcopy(inner), {"draft": "e"}, dspy.Prediction(critique="f"), 2)],
        failure="format_error", failed_signature=program.a.signature, error="AdapterParseError: x")
    back = trajectory_from_json(trajectory_to_json(traj), traj.example, codec, "fp", texts)
    assert len(back.raw_trace) == 3 and [s.raw_index for s in back.steps] == [0, 0, 1, 2]
    assert back.steps[0].predictor is program.a and back.steps[1].predictor is program.b
    stand_in = back.steps[2].predictor
    assert isinstance(stand_in, dspy.Predict) and back.steps[3].predictor is stand_in
    assert list(stand_in.signature.input_fields) == ["draft"]
    assert list(back.failed_signature.input_fields) == ["ticket"] and back.failure == "format_error"

    tool_codec = ProgramCodec(WithTool())
    tool_program = tool_codec.get("tp", tool_codec.seed_texts()).program
    step = TraceStep("predict", tool_program.predict, {"tools": list(tool_program.tools)}, out, 0)
    stored = trajectory_to_json(DspyTrajectory(traj.example, out, [step]))
    mine = trajectory_from_json(stored, traj.example, tool_codec, "tp", tool_codec.seed_texts())
    assert mine.steps[0].inputs["tools"][0] is tool_program.tools[0]
    other = trajectory_from_json(stored, traj.example, codec, "fp", texts)
    rebuilt = other.steps[0].inputs["tools"][0]
    assert isinstance(rebuilt, dspy.Tool) and rebuilt.name == "search"
    with pytest.raises(RuntimeError, match="rebuilt from the run store"):
        rebuilt.func(query="q")


def test_held_items_does_not_copy_a_list():
    """trajectory_json.py:504-505: "a list or tuple itself (not copied: it may be a large corpus), the values of a dict
    (ReAct's ``tools``), else the value alone"."""
    corpus = ["doc"] * 3
    assert tj.held_items(corpus) is corpus and tj.held_items({"a": 1}) == [1] and tj.held_items(5) == [5]


# ============================================================================ adapter/run_identity.py


def made(source: str, name: str = "metric", **globals_: Any):
    """A function compiled from ``source`` under this module's name: two versions of "the same" function."""
    namespace = {"__name__": __name__, **globals_}
    exec(source, namespace)
    return namespace[name]


def test_an_lm_is_identified_without_its_credentials():
    """run_identity.py:50-51: "What makes an LM answer the way it does, without its credentials: the model, the
    endpoint (userinfo stripped from the URL), and the sampling settings"; :44 "the rest, such as cache or retries, do
    not"; :66-68 readable_lm has "no credentials, and key-shaped text masked"."""
    def lm(key="sk-proj-abc123def456ghi789", **kw):
        kw.setdefault("temperature", 0.3)
        return dspy.LM("openai/gpt-4o-mini", api_key=key, api_base="https://u:pw12345678@h.example/v1", **kw)

    ident = lm_identity(lm())
    assert ident["api_base"] == "https://h.example/v1" and "sk-proj" not in json.dumps(ident)
    assert ident == lm_identity(lm(key="sk-proj-rotated999999999999")) == lm_identity(lm(cache=False, num_retries=9))
    assert ident != lm_identity(lm(temperature=0.9))
    shown = readable_lm(lm())
    assert "pw12345678" not in shown and "sk-proj" not in shown and "model=openai/gpt-4o-mini" in shown


def test_a_function_is_identified_by_its_code_not_by_its_closure_state():
    """run_identity.py:79-87: "A function is its name and its code (bytecode, the names it reads, its constants, nested
    functions); a ``functools.partial`` its function and bound arguments ... State is not seen — a closure's captured
    values"."""
    import functools

    v1 = made("def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):\n    return 1.0\n")
    v2 = made("def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):\n    return 0.5\n")
    assert callable_identity(v1) == callable_identity(made(
        "def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):\n    return 1.0\n"))
    assert callable_identity(v1) != callable_identity(v2)

    def closing(value):
        def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
            return value
        return metric

    assert callable_identity(closing(1)) == callable_identity(closing(2))
    assert callable_identity(functools.partial(v1, trace=1)) != callable_identity(functools.partial(v1, trace=2))


def test_default_values_are_keyed_but_a_credential_or_a_mutable_default_by_a_marker_or_type():
    """run_identity.py:112-118: "``def metric(..., lenient=False)`` edited to ``True`` scores differently ...; a
    mutable default (a memo dict) or an object ... by its type only ... A default that looks like a credential (by its
    parameter's name or its text) is keyed as a marker: a rotated key is the same run"; :131-132 "a default that merely
    looks like a key ("gpt-4o-mini-2024-07-18") is more often a model or a version, whose edit must count"."""
    def ident(default_src):
        return callable_identity(made(f"def metric(gold, pred, option={default_src}):\n    return 1.0\n"))

    assert ident("False") != ident("True")
    assert ident("'gpt-4o-mini-2024-07-18'") != ident("'gpt-4o-2024-08-06'")
    assert ident(f"'{KEY}'") == ident("'sk-rotatedabcdef0123456789'") and KEY not in ident(f"'{KEY}'")
    by_name = made("def metric(gold, pred, api_key='plain-words-here'):\n    return 1.0\n")
    assert callable_identity(by_name) == callable_identity(
        made("def metric(gold, pred, api_key='other-words-here'):\n    return 1.0\n"))
    assert ident("{}") == ident("{'memo': 1}")


def test_the_users_helper_functions_are_keyed_but_an_attribute_of_the_same_name_is_not():
    """run_identity.py:161-164: "The code of the user's own module-level functions ``fn`` names (and those they name):
    a fixed ``normalize()`` that ``forward`` or the metric calls changes the scores"; :182-183 "not ``co_names``, which
    also holds attribute names (``self.summarize`` would key an unrelated global ``summarize()``)"."""
    def metric_with(helper_src):
        helper = made(helper_src, name="normalize")
        return made("def metric(gold, pred, trace=None):\n    return normalize(pred)\n", normalize=helper)

    assert callable_identity(metric_with("def normalize(x):\n    return x\n")) != callable_identity(
        metric_with("def normalize(x):\n    return x.strip()\n"))

    def reader_with(summarize_src):
        summarize = made(summarize_src, name="summarize")
        return made("def metric(gold, pred, trace=None):\n    return pred.summarize()\n", summarize=summarize)

    assert callable_identity(reader_with("def summarize(x):\n    return 1\n")) == callable_identity(
        reader_with("def summarize(x):\n    return 2\n"))


class PydanticScorer(pydantic.BaseModel):
    weight: float = 1.0

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        return self.weight


def test_a_callable_object_is_keyed_by_its_own_classes_code_only():
    """run_identity.py:200-202: "The identity of every function a user's class defines, its user-written bases included.
    Classes of DSPy, the standard library and installed packages are left out ... (a pydantic-based scorer would key 50
    pydantic functions)"; :217-220 "A user's proposer object is keyed by its code only"."""
    codes = ri._class_code(PydanticScorer)
    assert [entry.split("=", 1)[0] for entry in codes] == ["__call__"]
    assert proposer_settings(PydanticScorer()) == "" and proposer_settings(one) == ""
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    # :215-217 "The settings of one of dspy's own proposer objects (``InstructionProposer(max_chars=...)``,
    # ``additional_instructions``, ...): they change what a reflection returns"
    default = proposer_settings(InstructionProposer())
    assert default and default == proposer_settings(InstructionProposer())
    assert default != proposer_settings(InstructionProposer(max_chars=500))
    assert default != proposer_settings(InstructionProposer(additional_instructions="Be brief."))


def test_the_run_key_hash_is_the_same_in_another_process(tmp_path):
    """run_identity.py:5-6: "The hash must be the same in every process for the same inputs"; :237-238 "A set literal
    is a frozenset constant whose repr order follows the per-process string hash: sorted here"."""
    script = tmp_path / "key.py"
    script.write_text(
        "import json, dspy\n"
        "from dspy_turbogepa.adapter.run_identity import callable_identity, data_identity\n"
        "ns = {'__name__': 'keyed'}\n"
        "exec(\"def metric(g, p, trace=None):\\n    return p in {'alpha', 'beta', 'gamma', 'delta'}\\n\", ns)\n"
        "data = [dspy.Example(q='x', tags={'red', 'green', 'blue', 'cyan'}).with_inputs('q')]\n"
        "print(json.dumps([hash('alpha'), callable_identity(ns['metric']), data_identity(data)]))\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr[-2000:]
    their_hash, their_metric, their_data = json.loads(done.stdout.strip().splitlines()[-1])
    if their_hash == hash("alpha"):
        pytest.skip("this process happens to use the same string hash")
    ns: dict[str, Any] = {"__name__": "keyed"}
    exec("def metric(g, p, trace=None):\n    return p in {'alpha', 'beta', 'gamma', 'delta'}\n", ns)
    data = [dspy.Example(q="x", tags={"red", "green", "blue", "cyan"}).with_inputs("q")]
    assert their_metric == callable_identity(ns["metric"]) and their_data == data_identity(data)


def test_hashable_values_by_content_sets_sorted_cycles_marked_siblings_hashed_by_content_both_times():
    """run_identity.py:258-265: "classes by name, LMs by :func:`lm_identity` (never their keys), sets sorted, arrays and
    images by a hash of their bytes ... an object whose ``str()`` is informative by that, any other by its fields. A
    reference cycle ends in a marker ...: an object met again in a sibling (two examples sharing an array) is hashed by
    its content both times"."""
    big = np.zeros(5000)
    changed = big.copy()
    changed[2500] = 1.0  # str() of both is the same abridged text
    assert str(big) == str(changed) and ri._hashable(big) != ri._hashable(changed)
    shared = np.arange(4)
    pair = ri._hashable([shared, shared])
    assert pair[0] == pair[1] and "sha256" in pair[0]
    assert ri._hashable({3, 1, 2}) == [1, 2, 3] and ri._hashable(Point) == f"class {__name__}.Point"

    class Node:
        def __init__(self) -> None:
            self.me = self
            self.k = 3

    node = ri._hashable(Node())
    assert node["k"] == 3 and node["me"].startswith("<cycle")
    lm = dspy.LM("openai/gpt-4o", api_key=KEY)
    assert KEY not in json.dumps(ri._hashable({"lm": lm}))


def student_key(student):
    data = [dspy.Example(x="1", y="2").with_inputs("x")]
    return run_key(student, data, data, 0)["student"]


class Retriever(dspy.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.lock = threading.Lock()
        self.predict = dspy.Predict("x -> y")

    def forward(self, x):
        return self.predict(x=x)


class Address(pydantic.BaseModel):
    street: str = "Main St"


class Address2(pydantic.BaseModel):
    street: str = "Elm St"


def test_the_student_key_follows_the_code_of_the_users_module_classes():
    """run_identity.py:432-433: "The code of the user's own module classes, every method (a fixed forward(), aforward()
    or helper must not replay the broken one's failures)"."""
    source = ("import dspy\n"
              "class Pipeline(dspy.Module):\n"
              "    def __init__(self):\n"
              "        super().__init__()\n"
              "        self.predict = dspy.Predict('x -> y')\n"
              "    def forward(self, x):\n"
              "        return self.predict(x=self.clean(x))\n"
              "    def clean(self, x):\n"
              "        return {body}\n")
    old, fixed, same = (made(source.format(body=body), name="Pipeline")() for body in ("x", "x.strip()", "x"))
    assert student_key(old) != student_key(fixed) and student_key(old) == student_key(same)


def test_the_student_key_follows_field_types_plain_settings_and_freezing_not_runtime_state():
    """run_identity.py:338-341: "an output retyped from ``int`` to ``bool`` ... the stored scores are another
    program's"; :362-363 "a changed default of a pydantic model's field is not seen"; :425-426 "Plain fields of DSPy's
    own modules that change as they run (BestOfN / Refine lower ``fail_count``) ...: running the student before compile
    must not make it "another run""; :434-436 "their plain settings (a retriever's k ...)"; :459-460 "Other objects
    are run-time state (a client, a lock) and not seen"; :446 "a predictor becoming frozen changes the key"."""
    assert student_key(dspy.Predict("x -> y: int")) != student_key(dspy.Predict("x -> y: bool"))
    Address2.__name__ = Address2.__qualname__ = "Address"
    def typed(output_type):
        return dspy.Predict(dspy.Signature({"x": (str, dspy.InputField()), "y": (output_type, dspy.OutputField())}))

    assert student_key(typed(Address)) == student_key(typed(Address2))
    best = dspy.BestOfN(module=dspy.Predict("x -> y"), N=3, reward_fn=lambda args, pred: 1.0, threshold=1.0)
    before = student_key(best)
    best.fail_count = 0
    assert student_key(best) == before
    assert student_key(Retriever(3)) != student_key(Retriever(5))
    relocked = Retriever(3)
    relocked.lock = threading.RLock()
    assert student_key(relocked) == student_key(Retriever(3))
    frozen = Retriever(3)
    frozen.predict = Holder().frozen  # the same predictor state, inside a compiled submodule
    unfrozen = Retriever(3)
    unfrozen.predict = Frozen()
    assert student_key(frozen) != student_key(unfrozen)


def test_react_finish_tool_is_keyed_by_name_description_and_schema_only():
    """run_identity.py _tool_identity (corrected after this review): "A ``dspy.Tool`` wrapping one of DSPy's own
    functions (ReAct's ``finish``) by its name, description and schema only; None for anything else, a plain DSPy
    function included". It said None for ReAct's finish."""
    finish = dspy.ReAct("q -> a", tools=[]).tools["finish"]
    key = ri._tool_identity(finish)
    assert key is not None and key.startswith("tool:finish:")
    assert ri._tool_identity(finish.func) is None
    assert "ReAct's ``finish``) by" in ri._tool_identity.__doc__


def test_tools_are_keyed_by_name_description_schema_and_function():
    """run_identity.py:473-475: "A ``dspy.Tool`` by its name, description, argument schema (shown to the LM with the
    tool) and function ...; a plain function by its code"; ReAct's finish keyed without its (DSPy) function."""
    def lookup(query: str) -> str:
        """Find it."""
        return query

    def lookup_v2(query: str, limit: int = 3) -> str:
        """Find it."""
        return query

    base = ri._tool_identity(dspy.Tool(lookup, name="lookup"))
    assert base.startswith("tool:lookup:Find it.:") and base != ri._tool_identity(dspy.Tool(lookup_v2, name="lookup"))
    assert base != ri._tool_identity(dspy.Tool(lookup, name="lookup", desc="Find it fast."))
    finish = ri._tool_identity(dspy.ReAct("q -> a", tools=[]).tools["finish"])
    assert finish.startswith("tool:finish:") and finish.count(":") == 3
    assert ri._tool_identity(lookup) == callable_identity(lookup) and ri._tool_identity(42) is None
    assert ri._tool_identity(dspy.settings.copy) is None  # a DSPy function


def test_an_adapter_is_keyed_by_class_settings_and_the_lms_it_calls():
    """run_identity.py:499-501: "its class, public plain settings and the LMs it calls itself (``TwoStepAdapter``'s
    extraction model reads every answer)"."""
    one_model = adapter_identity(dspy.TwoStepAdapter(extraction_model=dspy.LM("openai/gpt-4o")))
    assert one_model["class"] == "dspy.adapters.two_step_adapter.TwoStepAdapter"
    assert one_model["extraction_model"]["model"] == "openai/gpt-4o"
    assert one_model != adapter_identity(dspy.TwoStepAdapter(extraction_model=dspy.LM("openai/gpt-4o-mini")))


class Unreadable:
    def __str__(self) -> str:
        raise RuntimeError("no text")

    __repr__ = __str__


def test_data_identity_names_an_unreadable_example_and_keys_the_inputs():
    """run_identity.py:516-517: "A field whose value cannot be read (its ``__str__`` or ``__repr__`` raises) is a
    ``TypeError`` naming ``name[i]``"; :534-535 "the same fields with other inputs are other evaluations"."""
    rows = [dspy.Example(q="a"), dspy.Example(q=Unreadable())]
    with pytest.raises(TypeError, match=r"trainset\[1\] cannot be read"):
        data_identity(rows, "trainset")
    ex = dspy.Example(q="a", context="c")
    assert data_identity([ex.with_inputs("q")]) != data_identity([ex.with_inputs("q", "context")])


# ============================================================================ redaction.py


def test_url_userinfo_is_masked_when_it_holds_a_password_or_key_material_only():
    """redaction.py:12-13 / 126-129: "``scheme://user:password@``, ``scheme://TOKEN@`` with a key-like token as the only
    userinfo ... A password is masked whatever it looks like; a lone username only when it looks like key material
    (16+ characters, one a digit), so "ssh://git@host" or "https://alice@host" in an instruction stays as written"."""
    assert mask_text("clone https://bob:hunter2@example.com/x") == f"clone https://{REDACTED}@example.com/x"
    assert mask_text("use https://a1b2c3d4e5f6g7h8i9@gw.example.com") == f"use https://{REDACTED}@gw.example.com"
    for kept in ("ssh://git@github.com/me/repo", "https://alice@example.com"):
        assert mask_text(kept) == kept


def test_an_environment_secret_set_after_import_is_masked_exactly(monkeypatch):
    """redaction.py:13-14: "the exact value of an environment variable whose name contains KEY, TOKEN, SECRET or
    PASSWORD (values of at least 8 characters; the environment is read at every call, so keys set after import count)";
    :301-302 "an endpoint set through the environment (OPENAI_API_BASE, ...) may carry a credential ... in its userinfo,
    path or query"."""
    assert mask_text("value zq9-plain-looking-value") == "value zq9-plain-looking-value"
    monkeypatch.setenv("MY_SERVICE_SECRET", "zq9-plain-looking-value")
    assert mask_text("value zq9-plain-looking-value") == f"value {REDACTED}"
    monkeypatch.setenv("OPENAI_API_BASE", "https://gw.example.com/gw/Q7w8E9r0T1y2U3i4O5p6/v1?sig=abcdefgh1234")
    masked = mask_text("404 at /gw/Q7w8E9r0T1y2U3i4O5p6/v1?sig=abcdefgh1234 for gpt-4o-mini-2024-07-18")
    assert "Q7w8E9r0T1y2U3i4O5p6" not in masked and "abcdefgh1234" not in masked
    assert "gpt-4o-mini-2024-07-18" in masked


def test_run_secrets_are_masked_inside_the_block_in_this_context_only():
    """redaction.py:18-20: "keys handed to an LM object ... ``compile()`` declares them with :func:`run_secrets` for the
    duration of the run (a context variable, so concurrent compiles in one process each mask their own keys, and
    nothing is left behind afterwards)"; :259-260 "values shorter than :data:`MIN_ENV_SECRET_LENGTH` are ignored"."""
    mine, theirs, seen = "plainpass-alpha", "plainpass-omega", {}

    def other_compile():
        with run_secrets([theirs]):
            seen["other"] = mask_text(f"{mine} {theirs}")

    with run_secrets([mine, "short7x"]):
        worker = threading.Thread(target=other_compile)
        worker.start()
        worker.join()
        assert mask_text(f"{mine} {theirs} short7x") == f"{REDACTED} {theirs} short7x"
        ctx = contextvars.copy_context()
        seen["copied"] = ctx.run(mask_text, mine)
    assert seen == {"other": f"{mine} {REDACTED}", "copied": REDACTED}
    assert mask_text(mine) == mine


def test_sensitive_key_names_keep_counters_and_bare_key_suffixes():
    """redaction.py:64-68: "x-api-key", "OPENAI_API_KEY", "access_token", "aws_secret_access_key", "X-Authorization",
    "Ocp-Apim-Subscription-Key", "x-functions-key", "AccountKey", "ssh_passphrase" are sensitive; "A bare "key" suffix
    is not among them: it would drop "cache_key" or "primary_key"; and "token" only matches the singular, so counters
    ("max_tokens", "prompt_tokens", "token_count") are kept"."""
    for name in ("x-api-key", "OPENAI_API_KEY", "access_token", "aws_secret_access_key", "X-Authorization",
                 "Ocp-Apim-Subscription-Key", "x-functions-key", "AccountKey", "ssh_passphrase", "vertex_credentials"):
        assert is_sensitive_key(name), name
    for name in ("cache_key", "primary_key", "max_tokens", "prompt_tokens", "token_count", "tokens", 7):
        assert not is_sensitive_key(name), name


def test_endpoint_urls_and_url_key_material():
    """redaction.py:140-143: "no userinfo, and no part that could be a credential — a path segment that looks like key
    material ... and the query are replaced by a short digest of themselves, so two endpoints still get two names";
    :162-164 "a deployment name or an API version (``gpt-4o-mini-2024-07-18``, ``2024-08-01-preview``) ... is left
    alone"; :207-212 "the password, or the username when there is no password ... Percent-escapes are kept as written
    ... and also decoded"."""
    a = endpoint_url("https://gw.example.com/gw/Q7w8E9r0T1y2U3i4O5p6/v1")
    b = endpoint_url("https://gw.example.com/gw/Z9x8C7v6B5n4M3l2K1j0/v1")
    assert a != b and "Q7w8E9r0T1y2U3i4O5p6" not in a and a.startswith("https://gw.example.com/gw/~")
    assert endpoint_url("http://localhost:8000/v1/chat-completions") == "http://localhost:8000/v1/chat-completions"
    uuid = "123e4567-e89b-12d3-a456-426614174000"  # :192-193 "many digits: ``sk-proj-...``, a UUID"
    assert uuid not in endpoint_url(f"https://gw.example.com/{uuid}/v1")
    assert strip_userinfo("https://u:p@h/x") == "https://h/x"
    azure = "https://x.openai.azure.com/openai/deployments/gpt-4o-mini-2024-07-18/chat?api-version=2024-08-01-preview"
    assert url_key_material(azure) == []
    assert "s3cr3tvalue" in url_key_material("https://h/v1?key=s3cr3tvalue")
    assert url_credentials("https://user:p%40ss1234@h") == ["p%40ss1234", "p@ss1234"]
    assert url_credentials("https://TOKENabc123@h") == ["TOKENabc123"]
    assert url_credentials("https://alice@h", username_if=redaction._key_like) == []


def test_describing_an_error_never_raises_and_is_masked():
    """redaction.py:331-332 / 340: "``str(exc)``, or a placeholder when that raises ... describing a failure must never
    become a second, fatal one"; "``"Type: message"`` ... never raises, masked"."""
    class Broken(Exception):
        def __str__(self) -> str:
            raise AttributeError("response")

    assert describe_error(Broken()) == "Broken: <str() of this Broken raised AttributeError>"
    assert describe_error(ValueError(f"bad key {KEY}")) == f"ValueError: bad key {REDACTED}"


def test_redact_copies_containers_and_mask_json_text_keeps_valid_json():
    """redaction.py:357-361: "Mappings become dicts, tuples and sets become lists; other leaves ... unchanged";
    :391-396 "Mask credentials inside a JSON document, keeping it valid JSON. Only strings are touched, keys included
    ...: a key is never dropped for its name ... Text that is not valid JSON is masked as plain text"; :401-402 a value
    may appear escaped; :410 "an ASCII-escaped document ... stays escaped"; :323 contains_secret is "Whether
    :func:`mask_text` would change ``text``"."""
    out = redact({"a": (1, KEY), "b": {3, 1}, "n": None, "f": 1.5})
    assert out == {"a": [1, REDACTED], "b": [1, 3], "n": None, "f": 1.5}
    doc = json.dumps({"token": "plain", f"k {KEY}": [f"v {KEY}", 3]})
    masked = json.loads(mask_json_text(doc))
    assert masked == {"token": "plain", f"k {REDACTED}": [f"v {REDACTED}", 3]}
    assert mask_json_text('{"a": "plain"}') == '{"a": "plain"}'
    assert mask_json_text(f"not json {KEY}") == f"not json {REDACTED}"
    quoted = 'pass"wörd99'
    escaped = json.dumps({"note": f"is {quoted}"})  # ASCII-escaped: the value appears as pass\"w\u00f6rd99
    with run_secrets([quoted]):
        result = mask_json_text(escaped)
        assert contains_secret(quoted) and not contains_secret("nothing here")
    assert json.loads(result) == {"note": f"is {REDACTED}"} and result.isascii()


# ============================================================================ store/sqlite_store.py


def committed(path: Path, table: str = "events") -> int:
    conn = sqlite3.connect(str(path / "run.sqlite3"))
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def test_rows_are_committed_by_the_writer_every_max_batch_rows_without_a_flush(tmp_path):
    """sqlite_store.py:3-4: "Writes are queued by the caller (any thread, never blocking on disk) and committed by one
    writer thread in small transactions (every ``commit_interval`` seconds or ``max_batch`` rows)"."""
    import time

    store = RunStore.open(tmp_path, STORE_KEY, commit_interval=600.0, max_batch=2)
    try:
        for i in range(3):
            store.record_event("e", {"i": i})
        deadline = time.monotonic() + 20
        while committed(tmp_path) < 2 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        assert committed(tmp_path) == 2  # the third waits for its batch to fill or its interval to pass
        store.flush()
        assert committed(tmp_path) == 3
    finally:
        store.close()


def test_a_candidate_recorded_again_is_ignored(tmp_path):
    """sqlite_store.py:614 (record_candidate): "Later records of the same fingerprint are ignored"; write_stats counts
    "Rows committed, ignored as duplicates, and lost to write errors"."""
    with pytest.raises(TypeError):  # stable_hash, sqlite_store.py:242-243: "Raises ``TypeError`` for values JSON
        sqlite_store.stable_hash({"x": object()})  # cannot represent"
    with RunStore.open(tmp_path / "keyed", {"task_lm": f"openai@{KEY}"}) as keyed:  # :539 "values masked like any text"
        assert keyed.run_key == {"task_lm": f"openai@{REDACTED}"}
    with RunStore.open(tmp_path, STORE_KEY) as store:
        store.record_candidate("fp", {"p": "first"}, [], "seed", 1.0)
        store.record_candidate("fp", {"p": "second"}, [], "seed", 2.0)
        (cand,) = store.load_candidates()
        assert cand.texts == {"p": "first"} and store.write_stats["ignored_duplicates"] == 1
    store.close()  # "Idempotent" (close, sqlite_store.py:732)
    assert store.closed


def test_a_proposal_holding_a_credential_is_not_stored_but_its_usage_counts(tmp_path):
    """sqlite_store.py:680-684: "Returns False, and stores nothing, when a proposed text contains something that looks
    like a credential"; :689 "paid all the same: the run's totals and caps count it"; :824-826 total_usage counts
    "proposals not stored (credential-shaped text)"."""
    with RunStore.open(tmp_path, STORE_KEY) as store:
        assert store.record_proposal("k", {"p": f"Use {KEY}."}, None, None, 1, usage={"cost": 0.5}) is False
        assert store.record_proposal("k2", {"p": "Fine."}, None, None, 1, usage={"cost": 0.25}) is True
        assert set(store.load_proposals()) == {"k2"}
        assert store.total_usage()["proposals"]["cost"] == 0.75


def test_a_row_that_cannot_be_written_is_reported_once_by_flush_and_the_store_keeps_working(tmp_path):
    """sqlite_store.py:720-723 (flush): "Raises :class:`RunStoreError` if rows could not be written since the last flush
    (each failure is reported once; the store keeps working)"; :487 "one bad row must not cost the whole batch"."""
    with RunStore.open(tmp_path, STORE_KEY, commit_interval=600.0, max_batch=500) as store:
        store.record_event("before", {})
        store.record_evaluation("fp", "val", 2**70, 1.0, None, None, None, None, None, None, None, None)
        store.record_event("after", {})
        with pytest.raises(RunStoreError, match="1 row"):
            store.flush()
        store.flush()
        store.record_event("later", {})
        assert [e.kind for e in store.events()] == ["before", "after", "later"]
        assert store.write_stats["failed"] == 1


def test_a_lone_surrogate_is_stored_as_its_json_escape(tmp_path):
    """sqlite_store.py:290-293: "``row`` with each lone surrogate in its text written as a JSON escape ... In a JSON
    column ... loads back as the same character, so nothing is lost; in a plain text column (a message) it reads as the
    escape"."""
    odd = "caf\udce9"
    with RunStore.open(tmp_path, STORE_KEY) as store:
        store.record_evaluation("fp", "val", 0, 1.0, None, "program_error", f"failed on {odd}", "E",
                                json.dumps({"text": odd}, ensure_ascii=False), None, None, None)
        (row,) = store.load_evaluations()
    assert json.loads(row.trajectory_json) == {"text": odd}
    assert row.message == "failed on caf\\udce9"


def test_a_foreign_database_is_refused_before_it_is_switched_to_wal(tmp_path):
    """sqlite_store.py:1079: "checked before switching someone else's database to WAL"."""
    conn = sqlite3.connect(str(tmp_path / "run.sqlite3"))
    conn.execute("CREATE TABLE theirs (x)")
    conn.commit()
    conn.close()
    with pytest.raises(RunStoreMismatchError):
        RunStore.open(tmp_path, STORE_KEY)
    conn = sqlite3.connect(str(tmp_path / "run.sqlite3"))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        conn.close()


def test_a_second_compile_of_the_run_is_refused_and_a_forked_child_does_not_keep_the_lock(tmp_path):
    """sqlite_store.py:956-958: "Two compiles of one run in one log_dir at once ... the second is refused"; :921-924
    "a worker forked during the run ... kept the log_dir locked after the compile was killed ... A forked child now
    closes its copies"."""
    import warnings

    lock = locks.RunLock.acquire(tmp_path)
    with pytest.raises(RunStoreError, match="in use by another compile"):
        locks.RunLock.acquire(tmp_path)
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a process with threads
        pid = os.fork()
    if pid == 0:  # the child (its fork hooks have run): hold on, as a metric's pool worker would, until told to go
        os.close(write_end)
        os.write(ready_write, b"r")
        os.read(read_end, 1)
        os._exit(0)
    try:
        os.close(read_end)
        os.close(ready_write)
        assert os.read(ready_read, 1) == b"r"
        os.close(ready_read)
        os.close(lock._fd)  # the parent dies without unlocking: only the child's copy could keep the lock
        os.close(lock._dir_fd)
        lock._fd = lock._dir_fd = None
        again = locks.RunLock.acquire(tmp_path)
        again.release()
    finally:
        os.write(write_end, b"x")
        os.close(write_end)
        os.waitpid(pid, 0)


def test_store_errors_from_the_disk_are_not_called_damage():
    """sqlite_store.py:904-907: "a disk that cannot take the store now (full, failing, locked, read-only, no permission:
    the stored results are intact ...), or a damaged or foreign file (start over). By result code, not exception
    class"."""
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"
    damaged = sqlite3.OperationalError("file is not a database")
    damaged.sqlite_errorname = "SQLITE_NOTADB"
    assert "are not lost" in str(sqlite_store._store_error(Path("/x/run.sqlite3"), Path("/x"), full))
    assert "not a readable run store" in str(sqlite_store._store_error(Path("/x/run.sqlite3"), Path("/x"), damaged))


# ============================================================================ adapter/runner.py


def test_the_engine_runs_on_a_private_thread_in_a_copy_of_the_callers_context_and_ticks_on_the_caller():
    """runner.py:3-4: "The engine always gets a private event loop in a dedicated thread, started in a copy of the
    caller's context"; :35-36 "``on_tick`` runs on the *calling* thread every ~0.2 s and once at the end"; an error is
    "handed back to the calling thread and re-raised there"."""
    ticks: list[int] = []

    async def engine():
        return PROBE_VAR.get(), threading.current_thread().name, threading.get_ident()

    token = PROBE_VAR.set("compile's")
    try:
        var, name, ident = run_coroutine_in_thread(engine, on_tick=lambda: ticks.append(threading.get_ident()))
    finally:
        PROBE_VAR.reset(token)
    assert (var, name) == ("compile's", "turbogepa-engine") and ident != threading.get_ident()
    assert ticks and set(ticks) == {threading.get_ident()}

    async def failing():
        raise LookupError("from the engine")

    with pytest.raises(LookupError, match="from the engine"):
        run_coroutine_in_thread(failing)


def test_a_failing_hook_never_ends_the_run_and_is_logged_in_full_once(caplog):
    """runner.py:103-104: "Run the hook; a display or tracking failure never ends the run. The first failure is logged
    with its traceback, later ones ... only at debug level"."""
    three = threading.Event()
    calls = []

    def hook():
        calls.append(1)
        if len(calls) >= 3:
            three.set()
        raise RuntimeError("display broke")

    async def engine():
        await asyncio.to_thread(three.wait, 60)
        return "done"

    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa.adapter.runner"):
        assert run_coroutine_in_thread(engine, on_tick=hook) == "done"
    failures = [r for r in caplog.records if "hook" in r.getMessage()]
    # its traceback is in the message, masked (exc_info would print a tracking server's credentials as they are)
    assert failures[0].levelno == logging.ERROR and "Traceback" in failures[0].getMessage()
    assert 'raise RuntimeError("display broke")' in failures[0].getMessage()
    assert all(r.levelno == logging.DEBUG for r in failures[1:]) and len(failures) == len(calls) >= 4


def test_ctrl_c_hands_over_to_on_interrupt_a_second_one_aborts_and_a_late_one_keeps_the_result(caplog):
    """runner.py:6-7: "a KeyboardInterrupt stops launching new work, lets in-flight calls finish for a short grace
    period, then cancels the rest and returns what was found"; :61-63 a second Ctrl-C is raised; :78 "the run has
    ended: its result is returned, not lost to a late Ctrl-C"."""
    stop, grace, interrupts = threading.Event(), [], []

    def first_tick_is_ctrl_c():
        if not interrupts:
            interrupts.append("tick")
            raise KeyboardInterrupt

    async def engine():
        await asyncio.to_thread(stop.wait, 60)
        return "what was found"

    def on_interrupt():
        interrupts.append("on_interrupt")

    result = run_coroutine_in_thread(engine, on_interrupt=on_interrupt, on_grace_expired=lambda: (grace.append(1),
                                     stop.set()), grace_seconds=0.05, on_tick=first_tick_is_ctrl_c)
    assert result == "what was found" and interrupts == ["tick", "on_interrupt"] and grace == [1]

    stop2 = threading.Event()

    async def engine2():
        await asyncio.to_thread(stop2.wait, 60)
        return "x"

    def always_ctrl_c():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        try:
            run_coroutine_in_thread(engine2, grace_seconds=30.0, on_tick=always_ctrl_c)
        finally:
            stop2.set()

    def late(*_):
        if sys._getframe(2).f_code.co_name == "run_coroutine_in_thread":  # the tick after the run finished
            raise KeyboardInterrupt

    async def quick():
        return "kept"

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa.adapter.runner"):
        assert run_coroutine_in_thread(quick, on_tick=late) == "kept"
    assert "Interrupted after the run ended: returning its result." in caplog.text


# ============================================================================ adapter/results.py


def engine_record(index, val_scores, outputs=None, objectives=None, parents=()):
    from dspy_turbogepa.engine.candidate import Candidate
    from dspy_turbogepa.engine.records import CandidateRecord

    candidate = Candidate({"p": f"text {index}"}, kind="seed" if not index else "reflection")
    return CandidateRecord(index=index, candidate=candidate, parent_indices=list(parents), val_scores=val_scores,
                           val_objective_scores=objectives or {}, val_outputs=outputs or {},
                           discovery_metric_calls=7 * index + 3, discovery_seconds=float(index))


def test_build_result_orders_by_valset_lists_failed_outputs_and_averages_objectives_where_reported():
    """results.py:63-64: "every per-example mapping in valset order, as dspy.GEPA's are (scores arrive in completion
    order ...)"; :68-71 "A rollout that failed without an output (it raised): dspy.GEPA lists dspy.Evaluate's empty
    Prediction ... A program that returned None is listed with None"; :83-88 "each objective averaged over the
    examples that report it ... an objective no example reported is left out"."""
    seed = engine_record(0, {2: 0.0, 0: 1.0, 1: 0.0}, outputs={0: dspy.Prediction(q="a"), 2: None},
                         objectives={0: {"acc": 1.0, "len": 0.5}, 2: {"acc": 0.0}})
    child = engine_record(1, {1: 1.0, 0: 1.0, 2: 1.0}, parents=[0], objectives={1: {"acc": 1.0}})
    engine = SimpleNamespace(records=[seed, child], val_ids=[0, 1, 2], fronts={0: [0, 1], 1: [1], 2: [1]},
                             total_metric_calls=20, num_full_val_evals=2, stop_reason="budget",
                             stats=SimpleNamespace(to_dict=lambda: {"cache_hits": 0}))
    result = build_result(engine, lambda texts: texts, None, None, track_best_outputs=True)
    assert [list(s) for s in result.val_subscores] == [[0, 1, 2], [0, 1, 2]]
    outs = result.best_outputs_valset
    assert outs[0][0] == (0, seed.val_outputs[0]) and outs[0][1][0] == 1 and outs[0][1][1] == dspy.Prediction()
    assert result.val_aggregate_subscores == [{"acc": 0.5, "len": 0.5}, {"acc": 1.0}]
    assert result.objective_pareto_front == {"acc": 1.0, "len": 0.5}
    assert result.discovery_eval_counts == [0, 10] and result.candidate_kinds == ["seed", "reflection"]

    seed_none = engine_record(0, {0: 0.0}, outputs={0: None})
    none_run = SimpleNamespace(records=[seed_none], val_ids=[0], fronts={0: [0]}, total_metric_calls=1,
                               num_full_val_evals=1, stop_reason=None, stats=SimpleNamespace(to_dict=dict))
    assert build_result(none_run, dict, None, 0, True).best_outputs_valset == {0: [(0, None)]}


# ============================================================================ tracking/imports.py


def test_ctrl_c_is_held_during_the_block_and_each_press_delivered_after_in_order():
    """imports.py:36-42: "Hold SIGINT for the block; then give each press, in order, to the handler that was there
    before. Only the main thread receives signals; SIGINT ignored ... is left alone. A Python-level handler is called
    directly ... The handler is put back"."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    presses: list[str] = []

    def handler(signum, frame):
        presses.append("handled")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with tracking_imports.ctrl_c_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            presses.append("block done")
        assert presses == ["block done", "handled", "handled"]
        assert signal.getsignal(signal.SIGINT) is handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with tracking_imports.ctrl_c_held():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        seen_in_thread = []
        worker = threading.Thread(target=lambda: seen_in_thread.append(
            tracking_imports.ctrl_c_held().__enter__() is None))
        worker.start()
        worker.join()
        assert seen_in_thread == [True]
    finally:
        signal.signal(signal.SIGINT, previous)
    with pytest.raises(ImportError):
        tracking_imports.import_in_one_piece("zz_review_no_such_module_anywhere")


def test_drop_cut_short_imports_drops_orphans_and_keeps_other_new_modules(monkeypatch):
    """imports.py:78-80: "Dropped: every module new since ``before`` with an enclosing package no longer loaded;
    whatever another thread imported meanwhile ... is kept"."""
    before = set(sys.modules)
    monkeypatch.setitem(sys.modules, "zz_review_pkg.half_done", types.ModuleType("zz_review_pkg.half_done"))
    monkeypatch.setitem(sys.modules, "zz_review_other", types.ModuleType("zz_review_other"))
    tracking_imports.drop_cut_short_imports(before)
    assert "zz_review_pkg.half_done" not in sys.modules and "zz_review_other" in sys.modules


# ============================================================================ tracking/autolog.py, imports kept light
def test_importing_the_store_and_tracking_loads_neither_dspy_mlflow_nor_pyplot(tmp_path):
    """store/__init__.py:3 / sqlite_store.py:8: "Standard library only, and no DSPy import"; tracking/__init__.py:10
    "Importing this package never imports MLflow"; autolog.py:8 "It never imports MLflow ... unless MLflow is already
    imported"; the SVG plots need no matplotlib at all, and png.py: "a bare ``Figure``... Never pyplot"."""
    script = tmp_path / "light.py"
    script.write_text(
        "import json, sys\n"
        "import dspy_turbogepa.store\n"
        "out = {'dspy_after_store': 'dspy' in sys.modules}\n"
        "import dspy_turbogepa.tracking, dspy_turbogepa.tracking.plots\n"
        "from dspy_turbogepa.tracking.autolog import dspy_autolog_enabled, register_with_mlflow_autolog\n"
        "out['autolog'] = [dspy_autolog_enabled(), register_with_mlflow_autolog(type('C', (), {}))]\n"
        "out['mlflow'] = 'mlflow' in sys.modules\n"
        "out['matplotlib_on_import'] = 'matplotlib' in sys.modules\n"
        "from types import SimpleNamespace as NS\n"
        "from dspy_turbogepa.tracking.plots import plot_best_over_time, plot_lineage\n"
        "res = NS(val_aggregate_scores=[0.2, 0.5], parents=[[], [0]], candidate_kinds=['seed', 'reflection'],\n"
        "         discovery_seconds=[0.0, 1.0], discovery_eval_counts=[0, 10], val_subscores=[{0: 0.2}, {0: 0.5}],\n"
        "         per_val_instance_best_candidates={0: {1}})\n"
        "plot_best_over_time(res, sys.argv[1] + '/best.svg')\n"
        "plot_lineage(res, None, sys.argv[1] + '/lineage.svg')\n"
        "out['matplotlib_for_svg'] = 'matplotlib' in sys.modules\n"
        "plot_best_over_time(res, sys.argv[1] + '/best.png')\n"
        "plot_lineage(res, None, sys.argv[1] + '/lineage.png')\n"
        "out['pyplot'] = 'matplotlib.pyplot' in sys.modules\n"
        "out['mlflow_at_end'] = 'mlflow' in sys.modules\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "dspy_after_store": False, "autolog": [False, False], "mlflow": False, "matplotlib_on_import": False,
        "matplotlib_for_svg": False, "pyplot": False, "mlflow_at_end": False}
    assert (tmp_path / "best.png").stat().st_size > 0 and (tmp_path / "lineage.png").stat().st_size > 0


def test_a_failed_autolog_registration_warns_once_and_never_raises(monkeypatch, caplog):
    """autolog.py:8-9 / 75: "never raises: the patch uses private MLflow API ..., so a failure only warns, once"."""
    from dspy_turbogepa.tracking import autolog

    monkeypatch.setattr(autolog, "dspy_autolog_enabled", lambda: True)
    monkeypatch.setitem(sys.modules, "mlflow.dspy.autolog", None)  # importing it fails at once
    autolog._reset_warning_for_tests()
    try:
        with caplog.at_level(logging.WARNING, logger="dspy_turbogepa.tracking.autolog"):
            assert autolog.register_with_mlflow_autolog(type("C", (), {})) is False
            assert autolog.register_with_mlflow_autolog(type("D", (), {})) is False
    finally:
        autolog._reset_warning_for_tests()
    assert caplog.text.count("Could not register") == 1


# ============================================================================ tracking/pump.py


class Recorder:
    def __init__(self, fail_start: BaseException | None = None) -> None:
        self.starts: list[dict] = []
        self.ends: list[dict] = []
        self.fail_start = fail_start

    def on_evaluate_start(self, call_id, instance, inputs):
        self.starts.append(inputs)
        if self.fail_start is not None:
            raise self.fail_start

    def on_evaluate_end(self, call_id, outputs, exception=None):
        self.ends.append({"outputs": outputs, "exception": exception})


MlflowCallback = type("MlflowCallback", (Recorder,), {"__module__": "mlflow.dspy.callback"})


def pump_record(texts=None):
    return SimpleNamespace(index=1, candidate=SimpleNamespace(texts=texts or {"predict": "Route it."}),
                           val_scores={0: 1.0, 1: 0.0, 7: 1.0}, val_outputs={0: dspy.Prediction(queue="billing")},
                           aggregate=0.5)


def test_the_pump_emits_on_its_own_thread_only_with_dspy_evaluate_shaped_results():
    """pump.py:51-52: "Must be constructed on the thread that will call :meth:`drain` ...; a drain from any other
    thread does nothing"; :46-47 ``metric_key`` default "eval_full"; :124 "dspy.Evaluate puts an empty Prediction
    where there is no output"; a record's validation ids index the valset."""
    cb = Recorder()
    valset = examples(2)
    pump = CompileThreadCallbackPump(lambda texts: ROUTING.make_program(), valset, callbacks=[cb])
    pump.on_candidate(pump_record())
    elsewhere = []
    worker = threading.Thread(target=lambda: elsewhere.append(pump.drain()))
    worker.start()
    worker.join()
    assert elsewhere == [0] and pump.pending() == 1
    assert pump.drain() == 1 and pump.emitted == 1
    (inputs,) = cb.starts
    assert inputs["callback_metadata"] == {"metric_key": "eval_full"} and inputs["devset"] == list(valset)
    (end,) = cb.ends
    assert end["outputs"].score == 50.0 and end["exception"] is None
    rows = end["outputs"].results
    assert [r[2] for r in rows] == [1.0, 0.0] and rows[1][1] == dspy.Prediction()


def test_a_failing_callback_is_warned_about_and_ctrl_c_still_ends_every_started_callback(caplog):
    """pump.py:84-86: "Never raises an ``Exception``. A ``KeyboardInterrupt`` is not swallowed"; :157-159 "Every
    started callback gets its end, as dspy does, even when Ctrl-C lands in between"."""
    broken = Recorder(fail_start=RuntimeError("callback bug"))
    pump = CompileThreadCallbackPump(lambda texts: ROUTING.make_program(), examples(2), callbacks=[broken])
    pump.on_candidate(pump_record())
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa.tracking.pump"):
        assert pump.drain() == 1
    assert "on_evaluate_start failed" in caplog.text and len(broken.ends) == 1
    first, interrupting = Recorder(), Recorder(fail_start=KeyboardInterrupt())
    pump = CompileThreadCallbackPump(lambda texts: ROUTING.make_program(), examples(2),
                                     callbacks=[first, interrupting])
    pump.on_candidate(pump_record())
    with pytest.raises(KeyboardInterrupt):
        pump.drain()
    for cb in (first, interrupting):
        (end,) = cb.ends
        assert end["outputs"] is None and isinstance(end["exception"], KeyboardInterrupt)


def test_mlflows_callback_gets_masked_copies_only_inside_a_recorded_compile():
    """pump.py:129-131: "MLflow ... gets a masked program and masked rows, as the run store does. Other callbacks get
    the objects themselves"; :187-190 "Same class name, so MLflow's param names stay ``<YourModule>.<path>``"; :226
    "MLflow's callback only nests evaluation runs inside a compile it recorded (``optimizer_stack_level > 0``)"."""
    built: list[Any] = []

    def build(texts):
        program = ROUTING.make_program()
        built.append(program)
        for _, pred in program.named_predictors():
            pred.signature = pred.signature.with_instructions(texts["predict"])
        return program

    outside = MlflowCallback()
    outside.optimizer_stack_level = 0
    pump = CompileThreadCallbackPump(build, examples(2), callbacks=[outside])
    pump.on_candidate(pump_record())
    assert pump.drain() == 0 and outside.starts == []

    mlflow_cb, plain = MlflowCallback(), Recorder()
    mlflow_cb.optimizer_stack_level = 1
    valset = [dspy.Example(ticket=f"my key is {KEY}", queue="billing").with_inputs("ticket"), examples(1)[0]]
    pump = CompileThreadCallbackPump(build, valset, callbacks=[mlflow_cb, plain])
    pump.on_candidate(pump_record({"predict": f"Route it; key {KEY}."}))
    assert pump.drain() == 1
    shown = mlflow_cb.starts[0]["program"]
    assert type(shown).__name__ == type(built[-1]).__name__ and shown is not built[-1]
    assert KEY not in json.dumps(shown.dump_state()) and REDACTED in json.dumps(shown.dump_state())
    assert plain.starts[0]["program"] is built[-1] and KEY in json.dumps(built[-1].dump_state())
    masked_row = mlflow_cb.ends[0]["outputs"].results[0][0]
    assert masked_row.ticket == f"my key is {REDACTED}" and set(masked_row.inputs().keys()) == {"ticket"}
    assert plain.ends[0]["outputs"].results[0][0] is valset[0]
    assert masked_program("not a module") == "not a module"


# ============================================================================ tracking/summary.py


def test_to_strict_json_makes_plain_strict_json():
    """summary.py:10-12: "Strict JSON: NaN and infinities become null, sets become sorted lists, tuples lists,
    non-string keys strings, objects with ``toDict()`` / ``model_dump()`` (DSPy predictions, pydantic) plain dicts,
    anything else its ``repr``"."""
    out = to_strict_json({"nan": float("nan"), "inf": float("-inf"), "set": {3, 1}, "tuple": (1, 2), 1: "int key",
                          None: "none key", "pred": dspy.Prediction(a=1), "model": Model(a=2), "obj": Color.RED,
                          "np": np.float64(0.5), "path": Path("/x")})
    assert out == {"nan": None, "inf": None, "set": [1, 3], "tuple": [1, 2], "1": "int key", "null": "none key",
                   "pred": {"a": 1}, "model": {"a": 2, "quiet": "none"}, "obj": repr(Color.RED), "np": 0.5,
                   "path": "/x"}
    json.dumps(out, allow_nan=False)


def summary_result(texts):
    return SimpleNamespace(
        to_dict=lambda: {"candidates": [texts, texts], "val_aggregate_scores": [0.1, float("nan")]},
        val_aggregate_scores=[0.1, 0.9], best_idx=1, discovery_seconds=[0.0, 2.0], discovery_eval_counts=[0, 12],
        candidate_kinds=["seed", "reflection"], per_val_instance_best_candidates={0: {1}},
        run_stats={"mutations": {"accepted": 1}, "cache_hits": 3}, stop_reason="budget", total_metric_calls=12,
        num_full_val_evals=2)


def test_the_summary_masks_strings_and_merges_redacted_extra_dict_into_dict(tmp_path):
    """summary.py:5-8: "``extra`` ... is merged in at the top level, dict into dict, after
    :func:`dspy_turbogepa.redaction.redact` ... Strings of the result (instructions, outputs) are masked the same
    way"; :156 "Write ``log_dir/summary.json`` atomically (temp file + rename)"; :166 "created with the process umask
    ... (mkstemp would make it 0600)"; :170-171 "a lone surrogate ... is written as its JSON escape"."""
    summary = build_summary(summary_result({"p": f"Use {KEY}."}),
                            {"timings": {"wall_seconds": 3.0}, "config": {"api_key": "plain-secret", "n": 1}})
    assert summary["best"]["instructions"] == {"p": f"Use {REDACTED}."} and summary["best"]["index"] == 1
    assert summary["timings"] == {"best_found_seconds": 2.0, "last_candidate_seconds": 2.0, "wall_seconds": 3.0}
    assert summary["config"] == {"api_key": REDACTED, "n": 1}
    assert summary["result"]["val_aggregate_scores"] == [0.1, None]
    old = os.umask(0o022)
    try:
        path = write_summary(tmp_path, summary_result({"p": "caf\udce9"}))
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert json.loads(path.read_text(encoding="utf-8"))["best"]["instructions"] == {"p": "caf\udce9"}


# ============================================================================ tracking/mlflow_tracking.py


def test_loggable_params_keep_plain_values_and_never_credentials():
    """mlflow_tracking.py:123-127: "Kept: bools, numbers, strings, and lists / tuples / dicts made only of those (as
    JSON). Dropped: ``None`` values, callables and objects, private names, and every key that names a credential ...
    Strings are masked ... An object with a string ``model`` attribute (an LM) is logged as that model name"."""
    params = mt.loggable_params({
        "num_threads": 4, "flag": True, "name": f"run {KEY}", "fractions": [0.25, 0.5], "cfg": {"a": 1},
        "none": None, "fn": one, "obj": object(), "_private": 1, "wandb_api_key": "plain", "refresh_token": "t",
        "reflection_lm": SimpleNamespace(model="openai/gpt-4o"), "nested": {"api_key": "x"}})
    assert params == {"num_threads": "4", "flag": "True", "name": f"run {REDACTED}", "fractions": "[0.25, 0.5]",
                      "cfg": '{"a": 1}', "reflection_lm": "openai/gpt-4o"}


def test_key_map_never_gives_two_names_one_key():
    """mlflow_tracking.py:101: "``sanitize_key`` plus de-duplication: two names never share a key"."""
    keys = mt._KeyMap()
    first, second = keys("seed_instructions", "subs[0].predict"), keys("seed_instructions", "subs.0.predict")
    assert first == "seed_instructions/subs.0.predict" and second != first
    assert keys("seed_instructions", "subs[0].predict") == first


def test_stats_metrics_and_the_budget_x_axis():
    """mlflow_tracking.py:746-750: "Metric calls counted against this session's budget: executed now, plus stored ones
    replayed. The x-axis of every progress metric"; :740 "depth 3: rate_limits/endpoints/<endpoint>/window"; cost
    totals."""
    stats = SimpleNamespace(executed=10, replayed=5, task_cost=0.5, reflection_cost=0.25, cache_hits=2,
                            failures={"program_error": 3}, rate_limits={"rate_limited": 1, "endpoints": {
                                "m@x": {"window": 4, "deep": {"too": 1}}}})
    out = mt.stats_metrics(stats)
    assert out["metric_calls"] == 15.0 and out["cost/total_usd"] == 0.75 and out["failures/program_error"] == 3.0
    assert out["rate_limits/endpoints/m@x/window"] == 4.0 and "rate_limits/endpoints/m@x/deep/too" not in out
    assert mt.budget_metric_calls(SimpleNamespace(executed=True)) is None


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_tracking_server_probe_counts_5xx_as_down_and_4xx_as_up():
    """mlflow_tracking.py:683-687: "``None`` if ``uri`` is not an HTTP server, or one that can take calls; else what
    went wrong. A 5xx answer counts as down ... A 4xx (a server without ``/health``, or one that wants auth for it)
    counts as up"; :678 _safe_uri "The URI without credentials"; :636-637 the retries setting is restored after."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _Health.status = 503
        assert "HTTP 503" in mt._probe_tracking_server(uri, 5.0)
        _Health.status = 404
        assert mt._probe_tracking_server(uri, 5.0) is None
    finally:
        server.shutdown()
        server.server_close()
    assert mt._probe_tracking_server("sqlite:///x.db", 0.1) is None
    assert mt._safe_uri("https://me:pw@mlflow.example") == "https://mlflow.example"
    before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    with mt._few_http_retries(True, retries=1):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == before


def test_tables_and_summary_mask_texts_and_the_saved_program_masks_lm_settings():
    """mlflow_tracking.py:791 candidates_table (texts masked); run_summary redacted; :769 "The program as dspy saves it,
    credentials masked"; :775-777 "DSPy's save writes a predictor LM's settings (extra_headers, ...), leaving out only
    api_key: those settings are redacted by field name"."""
    rec = SimpleNamespace(index=0, parent_indices=[], aggregate=1.0, val_scores={0: 1.0}, discovery_seconds=0.0,
                          discovery_metric_calls=0, reported_discovery_calls=0, mutation_seq=None,
                          candidate=SimpleNamespace(texts={"p": f"Use {KEY}"}, kind="seed", fingerprint="f"))
    result = SimpleNamespace(records=[rec], fronts={0: [0]}, best_index=0, best=rec, stop_reason=f"odd {KEY}",
                             total_metric_calls=1, num_full_val_evals=1, wall_seconds=1.0,
                             stats=SimpleNamespace(to_dict=dict))
    assert mt.candidates_table(result)["instructions:p"] == [f"Use {REDACTED}"]
    assert mt.run_summary(result)["stop_reason"] == f"odd {REDACTED}"
    assert mt.pareto_front_table(result) == {"val_id": [0], "best_score": [1.0], "num_candidates": [1],
                                             "candidates": ["[0]"]}
    program = dspy.Predict("q -> a")
    program.lm = dspy.LM("openai/gpt-4o", api_key="plain-key-value", extra_headers={"x-api-key": "hdr-value-1"})
    text, error = mt._program_json(program)
    assert error is None and "hdr-value-1" not in text and "plain-key-value" not in text and REDACTED in text


def test_a_tracking_server_that_does_not_answer_costs_one_warning_and_the_run_goes_on(monkeypatch, caplog):
    """mlflow_tracking.py:7-8: "MLflow missing, a server that does not answer, or any logging error: one warning, and
    the run goes on"; :163 "Never raises and never blocks the engine"."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa.tracking.mlflow_tracking"):
        tracker = mt.MlflowRunTracker({"max_metric_calls": 10}, probe_timeout=2.0)
        tracker.on_candidate(SimpleNamespace(index=0, aggregate=1.0, val_scores={0: 1.0}))
        tracker.finish(SimpleNamespace(records=[]))
    assert not tracker.enabled and tracker.run_id is None and tracker.finished
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()


# ============================================================================ tracking/plots.py


def test_plot_helpers_seed_wins_ties_deepest_parent_and_no_recursion_on_long_chains():
    """plots.py:134 "Highest score, lowest index on ties (the seed wins ties, as in dspy.GEPA)"; :242-243 "The parent a
    node hangs under in the tree: the deepest one (one generation up), lowest index on ties"; :260 "Post-order walk,
    iterative (a long chain of improvements must not hit the recursion limit)"; :62 records / EngineResult /
    detailed_results all normalise to nodes ordered by index."""
    def node(i, score, parents=()):
        return plots._Node(i, "seed" if not parents else "reflection", score, tuple(parents), None, None)

    assert plots._best_index([node(0, 0.5), node(1, 0.5), node(2, 0.4)]) == 0
    gen = {0: 0, 1: 1, 2: 2, 3: 1}
    assert plots._primary_parent(node(4, 0.1, (3, 2)), gen) == 2
    assert plots._primary_parent(node(4, 0.1, (3, 1)), gen) == 1
    chain = [node(0, 0.0)] + [node(i, 0.0, (i - 1,)) for i in range(1, 5000)]
    gen, row = plots._layout(chain)
    assert gen[4999] == 4999 and row[0] == 0.0
    records = [SimpleNamespace(index=1, aggregate=0.7, parent_indices=[0], candidate=SimpleNamespace(kind="merge"),
                               discovery_seconds=1.0, discovery_metric_calls=5, val_scores={0: 0.7}),
               SimpleNamespace(index=0, aggregate=0.5, parent_indices=[], candidate=SimpleNamespace(kind="seed"),
                               discovery_seconds=0.0, discovery_metric_calls=0, val_scores={0: 0.5})]
    as_records = plots._nodes(records)
    assert [n.index for n in as_records] == [0, 1] and as_records[1].kind == "merge"
    assert plots._nodes(SimpleNamespace(records=records)) == as_records


def test_a_plot_is_written_to_a_temporary_file_and_renamed(tmp_path):
    """plots.py: "Written to a temporary file and renamed, as summary.json is: a full disk or a Ctrl-C leaves
    the previous plot (or none), never a truncated file"."""
    class FailingDrawing:
        def to_svg(self):
            raise OSError("disk full")

    target = tmp_path / "best.svg"
    target.write_bytes(b"the previous plot")
    with pytest.raises(OSError, match="disk full"):
        plots._save(FailingDrawing(), target)
    assert target.read_bytes() == b"the previous plot" and [p.name for p in tmp_path.iterdir()] == ["best.svg"]
