"""Review of the session's changes (9bc2527..HEAD): an LLM judge's 429s scored rate_limited, error_type on
proposal failures, ASCII-escaped masked JSON, progress usage. Each finding pinned as a plain test; the three
bugs found (a judge's rate-limited example read by reflection, its retries and its last 429 uncounted) were
fixed in adapter/reflective.py and adapter/evaluator.py, their tests failing before."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import dspy
import pytest
from dspy import lm15

import dspy_turbogepa.teleprompter as teleprompter_module
from dspy_turbogepa import SystemicFailureError
from dspy_turbogepa.adapter.evaluator import DspyEvaluator
from dspy_turbogepa.adapter.ratelimit import RetryPolicy
from dspy_turbogepa.adapter.reflective import ReflectiveDatasetBuilder
from dspy_turbogepa.engine.systemic import SystemicFailureDetector
from dspy_turbogepa.engine.types import EvalOutcome, ProposalOutcome
from dspy_turbogepa.redaction import REDACTED, mask_json_text
from dspy_turbogepa.testing import TASKS, make_student_lm

from helpers import make_evaluator, quick_compile, small_splits

ROUTING = TASKS["routing"]
FAST_RL = RetryPolicy(max_retries=10, max_elapsed_s=30.0, base_s=0.001, cap_s=0.002)
FAST_TR = RetryPolicy(max_retries=3, max_elapsed_s=30.0, base_s=0.001, cap_s=0.002)


def _busy(gold: Any) -> bool:
    return "tracking" in gold.ticket.lower() or "refund" in gold.ticket.lower()


def _judge_429(pred_name_too: bool = False, retry_after: float = 0.001):
    """A judge whose LM answers 429 on the scoring call (and, if asked, on the feedback call) for 'busy'
    examples; the routing metric otherwise. Records (pred_name, ticket) of every call."""
    calls: list[tuple[str | None, str]] = []

    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls.append((pred_name, gold.ticket))
        if _busy(gold) and (pred_name is None or pred_name_too):
            raise lm15.RateLimitError("judge busy", status=429, retry_after=retry_after)
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    judge.calls = calls  # type: ignore[attr-defined]
    return judge


def _unit(metric, n: int = 4):
    ev, codec = make_evaluator(ROUTING, metric=metric, n=n, max_workers=2, rate_limit_policy=FAST_RL,
                               transient_policy=FAST_TR)

    def run(example_id: int, split: str = "train") -> EvalOutcome:
        async def main():
            with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
                return await ev.evaluate(codec.seed_texts(), "seed", split, example_id, True)
        return asyncio.run(main())

    return ev, codec, run


def _busy_id(examples) -> int:
    return next(i for i, ex in enumerate(examples) if _busy(ex))


def _score_busy(judge) -> tuple[EvalOutcome, dict[str, Any], Any]:
    """One evaluation of an example the judge refuses, on a fresh evaluator: (outcome, its rate-limit stats,
    the codec)."""
    ev, codec, run = _unit(judge, n=8)
    try:
        out = run(_busy_id(small_splits(ROUTING, n_train=8, n_val=8, n_test=0).val))
        return out, ev.rate_limit_stats(), codec
    finally:
        ev.close()


@pytest.fixture
def fast_evaluator(monkeypatch):
    class Fast(DspyEvaluator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("rate_limit_policy", FAST_RL)
            kwargs.setdefault("transient_policy", FAST_TR)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(teleprompter_module, "DspyEvaluator", Fast)


# --------------------------------------------------------------------------- (2) judge rate_limited
def test_judge_rate_limited_outcome_is_a_service_failure_with_failure_score():
    judge = _judge_429()
    out, stats, codec = _score_busy(judge)
    assert out.failure == "rate_limited" and out.service_failure and not out.fatal
    assert out.score == 0.0 and out.trajectory is not None and out.trajectory.failure == "rate_limited"
    assert out.trajectory.service_failure
    assert stats["rate_limit_gave_up"] == 1
    assert stats["metric_rate_limit_retries"] == 10


def test_reflection_skips_a_judge_rate_limited_trajectory_without_calling_the_judge():
    judge = _judge_429()
    out, stats, codec = _score_busy(judge)
    assert out.failure == "rate_limited"
    builder = ReflectiveDatasetBuilder(codec, judge, 0.0, False, False, True)
    before = len(judge.calls)
    name = next(iter(codec.seed_texts()))
    dataset = builder.build([name], [out.trajectory], [out.score], random.Random(0))
    assert len(judge.calls) == before, "the judge was asked for feedback on a service failure"
    assert dataset == {}


def test_a_compile_asks_no_feedback_on_a_judge_rate_limited_example(fast_evaluator):
    judge = _judge_429()
    quick_compile(judge, data=small_splits(ROUTING, n_train=12, n_val=6, n_test=0), budget=60)
    scored_limited = {t for name, t in judge.calls
                      if name is None and ("tracking" in t.lower() or "refund" in t.lower())}
    assert scored_limited
    asked = [t for name, t in judge.calls if name is not None and t in scored_limited]
    assert asked == []


def test_a_judges_retries_before_giving_up_count_in_the_outcomes_rate_limit_retries():
    judge = _judge_429()
    out, stats, codec = _score_busy(judge)
    assert out.failure == "rate_limited"
    assert out.rate_limit_retries == 10


def test_every_judge_429_counts_once_in_rate_limited_as_a_rollouts_do():
    judge = _judge_429()
    out, stats, codec = _score_busy(judge)
    assert stats["rate_limit_gave_up"] == 1
    assert stats["rate_limited"] == 11  # the first attempt and its 10 retries, each a 429 seen


def test_a_judges_used_up_quota_is_fatal_rate_limited_and_stops_with_quota_advice():
    judge = _judge_429(retry_after=86_400.0)
    out, stats, codec = _score_busy(judge)
    assert out.failure == "rate_limited" and out.fatal and out.service_failure
    assert out.error_type == "RateLimitError"
    with pytest.raises(SystemicFailureError) as info:
        SystemicFailureDetector(8).observe(out, "fp", "train")
    assert info.value.failure == "rate_limited" and "quota" in str(info.value)
    assert info.value.error_type == "RateLimitError"


def test_a_judges_non_rate_limit_error_stays_metric_error():
    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise KeyError("label")

    ev, codec, run = _unit(judge)
    try:
        out = run(0)
    finally:
        ev.close()
    assert out.failure == "metric_error" and not out.service_failure and not out.fatal


def test_failure_score_is_kept_for_a_judge_rate_limited_outcome():
    judge = _judge_429()
    ev, codec = make_evaluator(ROUTING, metric=judge, n=8, failure_score=-1.0, max_workers=2,
                               rate_limit_policy=FAST_RL, transient_policy=FAST_TR)
    bid = _busy_id(small_splits(ROUTING, n_train=8, n_val=8, n_test=0).val)

    async def main():
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            return await ev.evaluate(codec.seed_texts(), "seed", "val", bid, False)
    try:
        out = asyncio.run(main())
    finally:
        ev.close()
    assert out.failure == "rate_limited" and out.score == -1.0


def test_the_outage_rule_counts_judge_rate_limited_as_service_failures():
    det = SystemicFailureDetector(8, outage_window=3, outage_min_seconds=0.0)
    det.resume(["train"], True)  # the first-N rule is out of the way
    out = EvalOutcome(0, 0.0, failure="rate_limited", message="The metric's LM stayed rate limited",
                      error_type="RateLimitError", service_failure=True)
    det.observe(out, "fp", "train")
    det.observe(out, "fp", "train")
    with pytest.raises(SystemicFailureError) as info:
        det.observe(out, "fp", "train")
    assert info.value.failure == "rate_limited" and info.value.error_type == "RateLimitError"


def test_resume_runs_a_judge_rate_limited_evaluation_again(tmp_path, fast_evaluator):
    """A stored judge rate_limited row is a service failure: the resumed session scores it again (not
    replayed), and the judge, answering now, gives the real score."""
    data = small_splits(ROUTING, n_train=8, n_val=6, n_test=0)
    busy_val = [ex.ticket for ex in data.val if _busy(ex)]
    state = {"limited": True}
    calls: list[tuple[bool, str]] = []

    def judge(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is None:
            calls.append((state["limited"], gold.ticket))
            if state["limited"] and _busy(gold):
                raise lm15.RateLimitError("judge busy", status=429, retry_after=0.001)
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    first = quick_compile(judge, data=data, budget=14, log_dir=str(tmp_path), seed=0).detailed_results
    assert busy_val and first.run_stats["failures"].get("rate_limited", 0) >= 1
    state["limited"] = False
    dr = quick_compile(judge, data=data, budget=14, log_dir=str(tmp_path), seed=0).detailed_results
    assert set(busy_val) <= {t for limited, t in calls if not limited}  # re-run, not replayed
    assert "rate_limited" not in dr.run_stats["failures"]


# --------------------------------------------------------------------------- (3) error_type on proposals
def test_proposal_window_error_type_is_that_of_the_most_common_reason():
    det = SystemicFailureDetector(8, proposal_window=3)
    det.observe_proposal(ProposalOutcome(skipped="proposer_error", message="boom", error_type="ValueError"))
    det.observe_proposal(ProposalOutcome(skipped="feedback_error", message="fb", error_type="KeyError"))
    with pytest.raises(SystemicFailureError) as info:
        det.observe_proposal(ProposalOutcome(skipped="feedback_error", message="fb2", error_type="TypeError"))
    assert info.value.failure == "feedback_error" and info.value.error_type == "KeyError"
    assert "fb" in str(info.value)


def test_feedback_error_type_names_the_judges_429_on_the_feedback_call(fast_evaluator):
    """A judge 429 on the feedback call (pred_name set) is retried under the rollouts' policy (since
    session 41), then the record is left out (errors.md), and when every feedback call fails the run
    stops naming RateLimitError."""
    def always(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            raise lm15.RateLimitError("judge busy", status=429, retry_after=0.001)
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    with pytest.raises(SystemicFailureError) as info:
        quick_compile(always, data=small_splits(ROUTING, n_train=12, n_val=4, n_test=0), budget=200)
    assert info.value.failure == "feedback_error" and info.value.error_type == "RateLimitError"


def test_replayed_skipped_proposals_are_not_observed_by_the_systemic_rule():
    """A resume's replayed proposals return before observe_proposal (orchestrator._propose), so a stored
    skip (no error_type) never mixes with live ones in the detector."""
    import inspect

    from dspy_turbogepa.engine.orchestrator import Orchestrator

    src = inspect.getsource(Orchestrator._propose)
    replay = src.index("self._known_proposals.get(key)")
    ret = src.index("return proposal", replay)
    assert ret < src.index("observe_proposal")


# --------------------------------------------------------------------------- (5) masked JSON
def test_masked_ascii_output_keeps_escapes_and_round_trips(monkeypatch):
    secret = "sk-" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    doc = json.dumps({"answer": f"caf\u00e9 {secret}", "note": "\u2603"})
    assert doc.isascii()
    masked = mask_json_text(doc, (secret,))
    assert masked.isascii() and REDACTED in masked and secret not in masked
    assert json.loads(masked) == {"answer": f"caf\u00e9 {REDACTED}", "note": "\u2603"}


def test_masked_non_ascii_trajectory_stays_raw_and_trace_masked_detects_it():
    from dspy_turbogepa.adapter.persistence import _trace_masked

    secret = "sk-" + "Z9y8X7w6V5u4T3s2R1q0P9o8N7m6"
    doc = json.dumps({"steps": [{"out": f"r\u00e9sum\u00e9 {secret}"}], "metric_return": "x"},
                     ensure_ascii=False, separators=(",", ":"))
    masked = mask_json_text(doc, (secret,))
    assert not masked.isascii() and "r\u00e9sum\u00e9" in masked and secret not in masked

    class Row:
        trajectory_json = masked
        message = None

    assert _trace_masked(Row())


def test_masked_ascii_doc_with_a_lone_surrogate_escape_stays_storable():
    """ensure_ascii for ASCII input also keeps a lone surrogate escaped (raw, SQLite could not encode it)."""
    secret = "sk-" + "Q1w2E3r4T5y6U7i8O9p0A1s2D3f4"
    doc = '{"a": "\\ud83d ' + secret + '"}'
    masked = mask_json_text(doc, (secret,))
    masked.encode("utf-8")  # no UnicodeEncodeError
    assert "\\ud83d" in masked


# --------------------------------------------------------------------------- (6) price_table
@pytest.mark.parametrize("price", [float("nan"), float("inf"), True, -1.0])
def test_price_table_refuses_non_finite_bool_and_negative_prices(price):
    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing import make_reflection_lm

    with pytest.raises(ValueError, match="finite and non-negative"):
        TurboGEPA(ROUTING.metric, max_metric_calls=10, reflection_lm=make_reflection_lm(),
                  price_table={"m": (price, 0.1)})
