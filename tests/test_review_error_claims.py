"""A review of docs/errors.md rows that no other test pinned (tests/test_docs_examples.py parses the
"Arguments and data" table; tests/test_review_doc_claims.py pinned a first set), each checked on the
offline fake LMs with tiny splits, and retry policies shortened where a give-up is waited for.

A claim that holds is a plain test whose docstring quotes the row. Of the four found false, three were
fixed in the code (an LLM judge that stays rate limited is scored rate_limited and a used-up quota stops
the run at once; gepa_kwargs['display_progress_bar'] names verbose; a stop_callbacks entry that is not
callable is named by its index) and one in the doc (the async-def metric message names the fix).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from typing import Any

import dspy
import pytest
from dspy import lm15
from dspy.lm15 import Message, Response, TextPart, Usage

import dspy_turbogepa.teleprompter as teleprompter_module
from dspy_turbogepa import ConfigurationError, SystemicFailureError, TurboGEPA
from dspy_turbogepa.adapter.evaluator import DspyEvaluator
from dspy_turbogepa.adapter.lm_copies import EvaluatorClosedError
from dspy_turbogepa.adapter.ratelimit import RATE_LIMIT_POLICY, TRANSIENT_POLICY, RetryPolicy
from dspy_turbogepa.engine import orchestrator as orchestrator_module
from dspy_turbogepa.engine import systemic
from dspy_turbogepa.proposers.reflection import ReflectiveProposer
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
from dspy_turbogepa.testing.fake_lm import AsyncSimEngine, SimEngine, request_messages, sim_engine

from helpers import quick_compile as run

ROUTING = TASKS["routing"]
FAST_RL = RetryPolicy(max_retries=10, max_elapsed_s=30.0, base_s=0.002, cap_s=0.01)
FAST_TR = RetryPolicy(max_retries=3, max_elapsed_s=30.0, base_s=0.002, cap_s=0.01)


def splits(n_train: int = 12, n_val: int = 8, task=ROUTING):
    return task.splits(data_seed=0, n_train=n_train, n_val=n_val, n_test=0)


def make(**kw) -> TurboGEPA:
    kw.setdefault("max_metric_calls", 50)
    kw.setdefault("reflection_lm", make_reflection_lm())
    return TurboGEPA(kw.pop("metric", ROUTING.metric), **kw)


@pytest.fixture
def fast_retries(monkeypatch):
    """The evaluator's and the reflections' retry policies with millisecond backoffs (same retry counts)."""
    made: dict[str, Any] = {}

    class FastEvaluator(DspyEvaluator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("rate_limit_policy", FAST_RL)
            kwargs.setdefault("transient_policy", FAST_TR)
            super().__init__(*args, **kwargs)
            made["evaluator"] = self

    class FastReflections(ReflectiveProposer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, rate_limit_policy=FAST_RL, transient_policy=FAST_TR, **kwargs)
            made["reflector"] = self

    monkeypatch.setattr(teleprompter_module, "DspyEvaluator", FastEvaluator)
    monkeypatch.setattr(teleprompter_module, "ReflectiveProposer", FastReflections)
    return made


class _Garbled(SimEngine):
    """The fake student answering every request with text no adapter can parse."""

    def _respond(self, request):
        return Response(id="garbled", model=self.model_name, message=Message.assistant([TextPart("no idea")]),
                        finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1))


def garbled_lm() -> dspy.LM:
    engine = _Garbled("student")
    return dspy.LM("sim/sim-student", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)


def _always_raises(gold, pred, trace=None, pred_name=None, pred_trace=None):
    raise ValueError("metric is broken")


# ======================================================================================= Arguments and data
@pytest.mark.parametrize("kw,exc,name", [
    ({"max_metric_calls": None, "max_full_evals": 2.5}, TypeError, "max_full_evals"),
    ({"token_budget": -3}, ValueError, "token_budget"),
    ({"num_threads": True}, TypeError, "num_threads"),
    ({"max_merge_invocations": 2.5}, ValueError, "max_merge_invocations"),
    ({"reflection_feedback_reuse": 1.5}, ValueError, "reflection_feedback_reuse"),
    ({"reflection_scouts": None}, ValueError, "reflection_scouts"),
])
def test_non_integer_counts_are_refused_naming_the_argument(kw, exc, name):
    """errors.md: "non-positive or non-integer `max_metric_calls`, `max_full_evals`, `num_threads`, ...,
    `token_budget` | constructor | `ValueError` / `TypeError` | the argument"; "negative or non-integer
    `reflection_feedback_reuse`, `reflection_scouts`, `max_merge_invocations` | `ValueError`"."""
    with pytest.raises(exc, match=rf"^{name} must be"):
        make(**kw)


def test_failure_score_not_below_perfect_score_is_refused_only_with_skip_perfect_score():
    """errors.md: "`failure_score >= perfect_score` with `skip_perfect_score=True` (a failure would count
    as solved; dspy.GEPA accepts it) | `ConfigurationError` | both values and the fix"."""
    with pytest.raises(ConfigurationError) as info:
        make(failure_score=2.0)
    message = str(info.value)
    assert "failure_score=2.0" in message and "perfect_score=1.0" in message
    assert "Give failure_score the metric's worst score" in message
    make(failure_score=2.0, skip_perfect_score=False)  # only the combination is refused
    dspy.GEPA(ROUTING.metric, max_metric_calls=50, reflection_lm=make_reflection_lm(), failure_score=2.0)


def test_perfect_score_none_names_both_arguments_and_the_two_fixes():
    """errors.md: "`perfect_score=None` with `skip_perfect_score=True` (dspy.GEPA's default) |
    `ConfigurationError` | both arguments, and the two fixes"."""
    import inspect

    assert inspect.signature(dspy.GEPA.__init__).parameters["skip_perfect_score"].default is True
    with pytest.raises(ConfigurationError) as info:
        make(perfect_score=None)
    message = str(info.value)
    assert "perfect_score=None with skip_perfect_score=True" in message
    assert "Pass skip_perfect_score=False" in message and "the metric's maximum as perfect_score" in message
    make(perfect_score=None, skip_perfect_score=False)


async def _async_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return 1.0


def test_an_async_metric_is_refused_naming_the_fix():
    """errors.md: "metric ... is an `async def` | constructor | `TypeError` | ... (for an `async def`: the
    fix)"."""
    with pytest.raises(TypeError) as info:
        make(metric=_async_metric)
    assert "Define it with `def`" in str(info.value)  # the fix: named


def test_a_stop_callbacks_entry_that_cannot_be_called_is_named():
    """errors.md: "a `gepa_kwargs['stop_callbacks']` entry that cannot be called as `callback(state)` |
    constructor | `TypeError` | the entry, the call and its signature"."""
    from gepa.utils import MaxMetricCallsStopper

    with pytest.raises(TypeError) as info:
        make(gepa_kwargs={"stop_callbacks": [MaxMetricCallsStopper(10), None]})
    assert "gepa_kwargs['stop_callbacks'][1]" in str(info.value)


def test_display_progress_bar_in_gepa_kwargs_names_the_argument_to_use_instead():
    """errors.md: "`gepa_kwargs` key that dspy.GEPA sets itself ... | `TypeError` | the argument to use
    instead"; TurboGEPA's progress display is `verbose`."""
    with pytest.raises(TypeError) as info:
        make(gepa_kwargs={"display_progress_bar": False})
    assert "verbose" in str(info.value)


# ========================================================================================== During the run
def test_the_retry_and_stop_limits_are_the_documented_numbers():
    """errors.md: 429s "after 10 retries or 5 minutes"; reflection LM "transient: 3 retries or 2 minutes";
    "LM timeout, 5xx, connection reset | retried 3 times"; outage "over at least 2 minutes"; "the
    **first 8** reflections"; Ctrl-C "gets 10 s to finish"; format errors "once two candidates
    reflected from those failures fail to parse too" (three with the seed)."""
    import inspect

    from dspy_turbogepa.adapter.runner import run_coroutine_in_thread

    assert (RATE_LIMIT_POLICY.max_retries, RATE_LIMIT_POLICY.max_elapsed_s) == (10, 300.0)
    assert (TRANSIENT_POLICY.max_retries, TRANSIENT_POLICY.max_elapsed_s) == (3, 120.0)
    for cls in (DspyEvaluator, ReflectiveProposer):
        params = inspect.signature(cls.__init__).parameters
        assert params["rate_limit_policy"].default is RATE_LIMIT_POLICY
        assert params["transient_policy"].default is TRANSIENT_POLICY
    assert systemic.OUTAGE_MIN_SECONDS == 120.0 and systemic.MAX_PROPOSAL_WINDOW == 8
    assert systemic.FORMAT_ERROR_CANDIDATES == 3
    assert inspect.signature(run_coroutine_in_thread).parameters["grace_seconds"].default == 10.0


@pytest.mark.parametrize("threads,n_val,window,outage", [(16, 8, 8, 32), (2, 24, 24, 24)])
def test_the_outage_rule_waits_for_two_waves_and_at_least_n(monkeypatch, threads, n_val, window, outage):
    """errors.md: the LM service stops answering: "two waves of evaluations in a row (2 x `num_threads`,
    at least the N of the next row) fail"."""
    seen: list[tuple[int, int]] = []

    class Recording(systemic.SystemicFailureDetector):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.append((self.window, self.outage_window))

    monkeypatch.setattr(orchestrator_module, "SystemicFailureDetector", Recording)
    run(budget=n_val, data=splits(12, n_val), num_threads=threads)
    assert seen == [(window, outage)]


def test_the_first_n_window_is_at_most_32():
    """errors.md: "the **first N** executed evaluations of a split ... all fail ... (N = the valset size,
    at least 8 and at most 32 ...)": the verdict waits for the first 32 started, so failures that ended
    meanwhile are counted too (a few more than 32 with a wave in flight).

    One thread makes the count exact. With more, how many later evaluations end while one of the first
    32 is still running depends on the machine's load (CI counted 37 with 4 threads and two test
    workers on 2 cores), so only the window's floor is asserted there."""
    for threads in (1, 4):
        with pytest.raises(SystemicFailureError, match=r"the first (\d+) evaluations on the valset all failed") as info:
            run(_always_raises, data=splits(12, 40), budget=100, num_threads=threads)
        assert info.value.failure == "metric_error"
        first = int(re.search(r"the first (\d+)", str(info.value)).group(1))
        assert first == 32 if threads == 1 else first >= 32


def test_a_run_that_ends_on_its_own_with_only_parse_failures_raises_instead_of_returning_the_seed():
    """errors.md: "A run that ends on its own (budget, no progress possible) with every one of its
    evaluations failed and a window's worth of them ... stops with the same error instead of returning
    the seed"; while reflection may still fix them: "only once two candidates reflected from those
    failures fail to parse too"."""
    with pytest.raises(SystemicFailureError, match="the run ended before a reflection produced a candidate") as info:
        run(lm=garbled_lm(), budget=8)  # the seed's validation only
    assert info.value.failure == "format_error"
    with pytest.raises(SystemicFailureError, match="on the seed and 2 candidates reflected from its parse failures"):
        run(lm=garbled_lm(), budget=60)


def test_a_stop_file_returns_the_run_so_far_though_every_evaluation_failed(tmp_path):
    """errors.md: "a stop you asked for (Ctrl-C, a stop callback or file) returns the run so far"."""
    (tmp_path / "gepa.stop").touch()
    dr = run(lm=garbled_lm(), budget=8, log_dir=str(tmp_path)).detailed_results
    assert dr.stop_reason == "stop_file" and len(dr.candidates) == 1
    assert set(dr.run_stats["failures"]) == {"format_error"}


def _echo(calls: list):
    def proposer(candidate, reflective_dataset, components_to_update):
        calls.append(list(components_to_update))
        return {c: candidate[c] for c in components_to_update}
    return proposer


@pytest.mark.parametrize("task_name,asked", [("routing", 8), ("pipeline", 9)])
def test_an_echoing_proposer_stops_the_run_counted_from_the_nth_echo(task_name, asked):
    """errors.md: "the **first 8** reflections all fail (... the current instruction echoed back unchanged
    while what the reflection read ... held a failure — counted from the N-th echo (N components) ...)
    | run stops with `SystemicFailureError` naming the most common cause"."""
    task = TASKS[task_name]
    calls: list[list[str]] = []
    with pytest.raises(SystemicFailureError, match=re.escape("the first 8 reflections all failed (8 of them with "
                                                             "unchanged_texts")) as info:
        run(task=task, data=splits(24, 8, task=task), budget=400, instruction_proposer=_echo(calls),
            max_mutations_in_flight=1)  # one reflection at a time: none in flight when the 8th fails
    assert info.value.failure == "unchanged_texts" and len(calls) == asked


def test_a_resumed_run_asks_a_failed_proposer_again(tmp_path):
    """errors.md: first 8 reflections all fail ... "a resumed run asks a failed proposer again instead of
    replaying its failure"."""
    def down(request):
        raise RuntimeError("reflector down")

    with pytest.raises(SystemicFailureError) as info:
        run(data=splits(24, 8), budget=120, log_dir=str(tmp_path), reflection_lm=make_reflection_lm(before_call=down))
    assert info.value.failure == "proposer_error"
    reflection_lm = make_reflection_lm()
    dr = run(data=splits(24, 8), budget=120, log_dir=str(tmp_path), reflection_lm=reflection_lm).detailed_results
    assert sim_engine(reflection_lm).calls > 0 and dr.run_stats["metric_calls_replayed"] > 0
    assert "proposer_error" not in dr.run_stats["proposal_skips"] and len(dr.candidates) > 1


def test_after_a_stop_callback_a_validated_child_is_not_added():
    """errors.md: "after a stop callback, a child that finishes validation is not added (status
    `after_stop` in `run_stats["mutations"]`: the state the callback saw is final ...)"."""
    asked = itertools.count()
    seen: list[int] = []

    def second_ask_stops(state):
        seen.append(len(state.program_candidates))
        return next(asked) >= 1

    dr = run(data=splits(40, 24), budget=2000, num_threads=16, max_mutations_in_flight=8,
             gepa_kwargs={"stop_callbacks": [second_ask_stops]}).detailed_results
    assert dr.stop_reason == "stop_callback" and dr.run_stats["mutations"].get("after_stop", 0) >= 1
    assert len(dr.candidates) == seen[-1] == 2


def test_a_rollout_rate_limited_past_10_retries_is_scored_rate_limited(fast_retries):
    """errors.md: "the LM answers 429 | not a failure: the rollout is retried ...; after 10 retries or 5
    minutes it is scored `failure_score` as `rate_limited`"."""
    data = splits(12, 8)
    target = data.val[0].ticket
    refused = [0]
    lock = threading.Lock()

    def limited(request):
        if target in request_messages(request)[-1]["content"]:
            with lock:
                refused[0] += 1
            raise lm15.RateLimitError("slow down", status=429, retry_after=0.001)

    dr = run(data=data, budget=40, lm=make_student_lm(before_call=limited, async_before_call=limited)).detailed_results
    assert dr.run_stats["failures"]["rate_limited"] >= 1 and set(dr.run_stats["failures"]) == {"rate_limited"}
    gave_up = dr.run_stats["rate_limits"]["rate_limit_gave_up"]
    assert gave_up >= 1 and refused[0] == 11 * gave_up  # the first attempt and 10 retries, each time
    assert dr.val_subscores[0][0] == 0.0


@pytest.mark.parametrize("kind,fault,attempts", [
    ("rate_limit", lambda: lm15.RateLimitError("reflection quota", status=429, retry_after=0.001), 11),
    ("transient", lambda: lm15.ServerError("bad gateway", status=503), 4),
])
def test_a_reflection_failing_past_its_retries_is_a_proposer_error_skip(fast_retries, kind, fault, attempts):
    """errors.md: the reflection LM answers 429 or fails with a 5xx: "the proposal is asked again after
    Retry-After / backoff (429: 10 retries or 5 minutes; transient: 3 retries or 2 minutes; then a
    `proposer_error` skip ...), counted in `run_stats["rate_limits"]["reflection"]` (`rate_limited` /
    `rate_limit_retries` / `rate_limit_gave_up` for 429s, `transient_errors` / `transient_retries` /
    `transient_gave_up`, ...)"."""
    calls = itertools.count()

    def first_reflection_fails(request):
        if next(calls) < attempts:  # the first reflection's call and all its retries (one reflection at a time)
            raise fault()

    dr = run(data=splits(24, 8), budget=80, reflection_lm=make_reflection_lm(before_call=first_reflection_fails),
             ).detailed_results
    reflection = dr.run_stats["rate_limits"]["reflection"]
    seen, retried, gave_up = (("rate_limited", "rate_limit_retries", "rate_limit_gave_up") if kind == "rate_limit"
                              else ("transient_errors", "transient_retries", "transient_gave_up"))
    assert (reflection[seen], reflection[retried], reflection[gave_up]) == (attempts, attempts - 1, 1)
    assert dr.run_stats["proposal_skips"]["proposer_error"] == 1


def test_a_selector_choosing_no_component_is_warned_about_once(caplog):
    """errors.md: "a callable `component_selector` returns no component | that mutation is skipped
    (`proposal_skips["no_components"]`, one warning)"."""
    selections = itertools.count()

    def every_other(state, trajectories, subsample_scores, candidate_idx, candidate):
        return [] if next(selections) % 2 else list(candidate)

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        stats = run(component_selector=every_other, data=splits(24, 8), budget=150).detailed_results.run_stats
    assert stats["proposal_skips"]["no_components"] >= 2
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("component_selector returned no component" in w for w in warned) == 1


def test_blank_texts_of_a_proposal_are_ignored_with_a_warning_and_the_rest_evaluated(caplog):
    """errors.md: "a proposal with some usable texts and some blank ones or unknown component names | the
    unusable parts are ignored with a warning, the usable ones are evaluated"."""
    pipeline = TASKS["pipeline"]
    asked = itertools.count()

    def half_blank(candidate, reflective_dataset, components_to_update):
        first, *rest = components_to_update
        return {first: candidate[first] + f" Variant {next(asked)}.", **dict.fromkeys(rest, "   ")}

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        dr = run(task=pipeline, data=splits(24, 8, task=pipeline), budget=120, component_selector="all",
                 instruction_proposer=half_blank).detailed_results
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(w.startswith("Ignoring parts of a proposal: no usable instruction for") for w in warned)
    assert "empty_proposal" not in dr.run_stats["proposal_skips"]
    # each child (the usable text only) was evaluated on its parent's minibatch: judged at rung 0 or beyond
    assert set(dr.run_stats["mutations"]) & {"rejected_rung0", "pruned", "accepted"}, dr.run_stats["mutations"]


def test_an_llm_judges_429s_are_retried_inside_its_evaluation(fast_retries):
    """errors.md: "An LLM-judge metric's own 429s are retried the same way inside its evaluation once they
    reach us" (not scored as the metric's failure)."""
    refusals = itertools.count()

    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is None and next(refusals) < 2:
            raise lm15.RateLimitError("judge busy", status=429, retry_after=0.001)
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    dr = run(judge, budget=40).detailed_results
    assert "metric_error" not in dr.run_stats["failures"]
    assert dr.run_stats["rate_limits"]["metric_rate_limit_retries"] == 2


def test_an_llm_judges_429s_on_feedback_calls_are_retried_too(fast_retries):
    """A review (session 41): the metric's feedback calls (pred_name set) had no retry: with the judge LM's
    ``num_retries=0`` (errors.md's advice) each 429 lost the example from the reflection, and an LLM that
    writes the feedback, down for 8 s, ended the search as "no progress". They are retried under the
    scoring calls' policies now; one still refused past them is left out of the reflection, as before."""
    lock = threading.Lock()
    seen: dict[str, int] = {"feedback": 0, "refused": 0}

    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            with lock:
                seen["feedback"] += 1
                refuse = seen["feedback"] % 2 == 1 and seen["refused"] < 6  # every other call, six times
                seen["refused"] += refuse
            if refuse:
                raise lm15.RateLimitError("judge busy", status=429, retry_after=0.001)
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    dr = run(judge, budget=80).detailed_results
    assert seen["refused"] == 6
    assert "feedback_error" not in dr.run_stats["reflective_records_skipped"]
    assert "feedback_error" not in dr.run_stats["proposal_skips"]
    assert dr.run_stats["rate_limits"]["metric_rate_limit_retries"] == 6
    assert dr.run_stats["feedback_calls"] == seen["feedback"] - 6  # a retried call is one feedback call


def test_a_stop_cuts_a_feedback_calls_backoff_short_and_none_is_made_after_the_run():
    """A review (session 41): feedback calls retried under the 5-minute 429 policy held a Ctrl-C's stop
    (its whole grace period) and paid the judge after compile returned. The reflections' stop, and the
    run's end, cut the backoff short; work in flight at a stop still makes its calls (it may finish in
    the grace period), none is made once the run has ended."""
    from helpers import make_evaluator

    calls: list[float] = []

    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls.append(time.monotonic())
        raise lm15.RateLimitError("judge busy", status=429, retry_after=60.0)

    ev, codec = make_evaluator(ROUTING, metric=judge)
    example = dspy.Example(ticket="where is my parcel", queue="shipping").with_inputs("ticket")
    pred = dspy.Prediction(queue="shipping")
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(EvaluatorClosedError):
        ev.call_metric_for_feedback(example, pred, [], "route", [], stop=stop)
    assert time.monotonic() - started < 10 and len(calls) == 1  # not the 60 s Retry-After
    started = time.monotonic()
    with pytest.raises(EvaluatorClosedError):  # after the stop: asked once, no backoff
        ev.call_metric_for_feedback(example, pred, [], "route", [], stop=stop)
    assert time.monotonic() - started < 10 and len(calls) == 2
    ev.close()
    with pytest.raises(EvaluatorClosedError):  # the run ended: the same without a stop event
        ev.call_metric_for_feedback(example, pred, [], "route", [])
    assert len(calls) == 2


def test_an_llm_judge_that_stays_rate_limited_is_scored_rate_limited_not_a_metric_error(fast_retries):
    """errors.md 429 row: "after 10 retries or 5 minutes it is scored `failure_score` as `rate_limited`",
    for a judge's 429s too ("retried the same way"): it was scored `metric_error`, which reflection reads as
    the metric's failure, and `rate_limit_gave_up` did not count it."""
    busy = {ex.ticket for ex in splits().train[:2]}

    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is None and gold.ticket in busy:
            raise lm15.RateLimitError("judge busy", status=429, retry_after=0.001)
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    dr = run(judge, budget=60).detailed_results
    failures, limits = dr.run_stats["failures"], dr.run_stats["rate_limits"]
    assert "metric_error" not in failures and failures.get("rate_limited", 0) >= 1, failures
    assert limits["rate_limit_gave_up"] == failures["rate_limited"], limits
    assert limits["metric_rate_limit_retries"] == 10 * failures["rate_limited"], limits


def test_an_llm_judge_whose_quota_is_used_up_stops_the_run_at_the_first_rollout(caplog):
    """errors.md: "A Retry-After longer than the whole 5 minutes (a quota that resets in hours) stops the run
    with `SystemicFailureError` (`failure="rate_limited"`) at the first rollout told so ... An LLM-judge
    metric's own 429s are retried the same way inside its evaluation"."""
    calls = itertools.count()

    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        next(calls)
        raise lm15.RateLimitError("daily quota used up", status=429, retry_after=86_400.0)

    with caplog.at_level(logging.CRITICAL), pytest.raises(SystemicFailureError) as info:
        run(judge, budget=60, data=splits(12, 24))
    assert info.value.failure == "rate_limited" and "quota" in str(info.value)
    # the first rollouts told so (those of the first waves in flight, 4 threads), not a window of 24
    assert next(calls) <= 8
