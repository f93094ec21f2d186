"""SystemicFailureDetector and EngineConfig validation."""

from __future__ import annotations

import pytest

from dspy_turbogepa.engine.config import EngineConfig
from dspy_turbogepa.engine.errors import SystemicFailureError
from dspy_turbogepa.engine.systemic import SystemicFailureDetector
from dspy_turbogepa.engine.types import EvalOutcome, ProposalOutcome

from .fakes import make_config

OK = EvalOutcome(0, 1.0)


def fail(kind: str = "program_error", error_type: str | None = "ValueError", msg: str = "boom",
         fatal: bool = False, example_id: int = 0) -> EvalOutcome:
    return EvalOutcome(example_id, 0.0, failure=kind, error_type=error_type, message=msg,  # type: ignore[arg-type]
                       fatal=fatal)


def test_window_of_initial_failures_raises_with_most_common_cause() -> None:
    det = SystemicFailureDetector(5)
    for o in [fail("metric_error", "KeyError"), fail(), fail(), fail()]:
        det.observe(o)
    with pytest.raises(SystemicFailureError) as info:
        det.observe(fail(msg="the program broke"))
    err = info.value
    assert (err.failure, err.error_type) == ("program_error", "ValueError")
    # the message quotes the first example of the most common cause
    assert "first 5 evaluations" in str(err) and "4 of them" in str(err) and "boom" in str(err)


def test_a_success_makes_later_ordinary_failures_data() -> None:
    det = SystemicFailureDetector(3)
    det.observe(fail())
    det.observe(OK)
    for _ in range(50):
        det.observe(fail())


def test_fatal_failure_raises_at_once_even_after_success() -> None:
    det = SystemicFailureDetector(100)
    det.observe(OK)
    det.observe(fail(error_type="AuthenticationError"))  # the name alone decides nothing: the evaluator does
    with pytest.raises(SystemicFailureError) as info:
        det.observe(fail(error_type="AuthenticationError", msg="bad key", fatal=True))
    assert info.value.error_type == "AuthenticationError"
    assert "bad key" in str(info.value)


def test_a_resumed_run_remembers_the_successes_of_its_earlier_sessions() -> None:
    det = SystemicFailureDetector(2)
    det.resume(succeeded_splits={"val", "train"}, proposal_succeeded=True)
    for _ in range(10):  # replayed successes are cache hits, never observed: these are not "the first N"
        det.observe(fail(), split="val")
        det.observe(fail(), split="train")
        det.observe_proposal(ProposalOutcome(skipped="proposer_error", message="x"))
    fresh = SystemicFailureDetector(2)
    fresh.observe(fail())
    with pytest.raises(SystemicFailureError):
        fresh.observe(fail())
    only_val = SystemicFailureDetector(2)  # an earlier session's validation successes say nothing of the trainset
    only_val.resume(succeeded_splits={"val"}, proposal_succeeded=False)
    only_val.observe(fail(), split="val")
    only_val.observe(fail(), split="train")
    with pytest.raises(SystemicFailureError, match="evaluations on the trainset"):
        only_val.observe(fail(), split="train")


def test_the_first_n_rule_is_per_split() -> None:
    """A trainset the program cannot take fails every training rollout while the seed's validation pass
    succeeds: that success must not hide it (the run would pay a reflection per failed minibatch)."""
    det = SystemicFailureDetector(4)
    for _ in range(10):
        det.observe(OK, "seed", split="val")
    for _ in range(3):
        det.observe(fail(msg="TypeError: forward() got an unexpected keyword argument 'queue'",
                         error_type="TypeError"), "seed", split="train")
    with pytest.raises(SystemicFailureError) as info:
        det.observe(fail(error_type="TypeError"), "seed", split="train")
    msg = str(info.value)
    assert "first 4 evaluations on the trainset all failed" in msg and "some on the valset succeeded" in msg
    assert "unexpected keyword argument 'queue'" in msg and "with_inputs" in msg
    # and the other way round, with the generic advice while no split has succeeded
    det = SystemicFailureDetector(2)
    det.observe(OK, split="train")
    det.observe(fail(), split="val")
    with pytest.raises(SystemicFailureError, match="on the valset all failed.*some on the trainset succeeded"):
        det.observe(fail(), split="val")
    det = SystemicFailureDetector(2)
    det.observe(fail(), split="train")
    with pytest.raises(SystemicFailureError, match="the first 2 evaluations all failed"):
        det.observe(fail(), split="train")
    # a split smaller than the window is judged once each of its examples has failed: repeats (a child
    # scored on its parent's minibatch) are no new evidence, and an untried example may be the one that works
    det = SystemicFailureDetector(8, split_sizes={"train": 3, "val": 20})
    det.observe(OK, split="val")
    for example_id in (0, 1, 0, 1, 1, 0):
        det.observe(fail(example_id=example_id), split="train")
    with pytest.raises(SystemicFailureError, match="first 7 evaluations on the trainset"):
        det.observe(fail(example_id=2), split="train")
    # failures of one split after its own first success stay data, whatever the other split does
    det = SystemicFailureDetector(2)
    det.observe(OK, split="train")
    det.observe(OK, split="val")
    for _ in range(20):
        det.observe(fail(), split="train")
        det.observe(fail(), split="val")


def test_format_errors_alone_wait_for_reflected_candidates() -> None:
    det = SystemicFailureDetector(4)
    for _ in range(20):
        det.observe(fail("format_error", "AdapterParseError"), "seed")
    det.observe(fail("format_error", "AdapterParseError"), "child-1")
    with pytest.raises(SystemicFailureError) as info:
        det.observe(fail("format_error", "AdapterParseError"), "child-2")
    assert "the first 22 evaluations all failed" in str(info.value)
    assert "on the seed and 2 candidates reflected" in str(info.value)
    mixed = SystemicFailureDetector(4)
    for kind in ("format_error", "format_error", "program_error"):
        mixed.observe(fail(kind), "seed")
    with pytest.raises(SystemicFailureError) as info:  # not only format errors: the window applies as before
        mixed.observe(fail("format_error"), "seed")
    assert "reflected" not in str(info.value)


def test_at_the_runs_end_a_run_whose_evaluations_all_failed_fails() -> None:
    """check_final: the format-error rule's wait for more candidates ends with the run; a split with too
    few evaluations to judge, or with a success, does not fail it."""
    det = SystemicFailureDetector(4)
    for i in range(6):
        det.observe(fail("format_error", "AdapterParseError", example_id=i), "seed" if i < 4 else "child-1")
    with pytest.raises(SystemicFailureError) as info:
        det.check_final()
    assert "no candidate that parses (1 reflected" in str(info.value)
    seed_only = SystemicFailureDetector(4)
    for i in range(4):
        seed_only.observe(fail("format_error", "AdapterParseError", example_id=i), "seed")
    with pytest.raises(SystemicFailureError, match="before a reflection produced a candidate"):
        seed_only.check_final()
    too_few = SystemicFailureDetector(8, split_sizes={"train": 20})
    too_few.observe(fail(example_id=0), split="train")
    too_few.observe(fail(example_id=1), split="train")
    too_few.check_final()  # 2 failures of 20 examples: no evidence
    succeeded = SystemicFailureDetector(2)
    succeeded.observe(OK)
    succeeded.observe(fail(example_id=1))
    succeeded.observe(fail(example_id=2))
    succeeded.check_final()
    # the seed never parses on the valset, but a reflected candidate parsed on the trainset (scoring 0, it
    # never reached validation): the setup works, and "the valset's examples break the program" is false
    elsewhere = SystemicFailureDetector(4)
    for i in range(4):
        elsewhere.observe(fail("format_error", "AdapterParseError", example_id=i), "seed", split="val")
    elsewhere.observe(EvalOutcome(0, 0.0), "child-1", split="train")
    elsewhere.check_final()


def test_window_is_at_least_one() -> None:
    det = SystemicFailureDetector(0)
    with pytest.raises(SystemicFailureError):
        det.observe(fail(error_type=None))


# --------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_metric_calls": 0},
        {"max_evals_in_flight": 0},
        {"max_mutations_in_flight": True},
        {"max_reflections_in_flight": 1.5},
        {"reflection_minibatch_size": 0},
        {"rung_fractions": (0.5,)},
        {"rung_fractions": ()},
        {"candidate_selection": "random"},
        {"component_selector": "first"},
        {"promotion_z": -0.1},
        {"max_mutations_in_flight": 4, "max_staleness": 3},
    ],
)
def test_config_rejects_bad_values(overrides: dict) -> None:
    with pytest.raises(ValueError):
        make_config(**overrides)


def test_config_defaults_and_normalisation() -> None:
    cfg = make_config(max_mutations_in_flight=3, rung_fractions=[0.5, 1])
    assert isinstance(cfg.max_staleness, int) and cfg.max_staleness >= 3  # defaulted from the mutations in flight
    assert cfg.rung_fractions == (0.5, 1.0)
    assert cfg.deterministic and cfg.skip_perfect_score and not cfg.accept_equal_on_minibatch
    assert make_config(component_selector=lambda *a: ["x"]).component_selector is not None
    cfg2 = EngineConfig(max_metric_calls=5, max_evals_in_flight=1, max_mutations_in_flight=1,
                        max_reflections_in_flight=1, max_staleness=1)
    assert cfg2.max_staleness == 1


def test_the_cause_is_named_once_when_the_message_already_starts_with_it() -> None:
    det = SystemicFailureDetector(2)
    det.observe(fail(msg="ValueError: No LM is loaded."))
    with pytest.raises(SystemicFailureError) as info:
        det.observe(fail(msg="ValueError: No LM is loaded."))
    assert "(2 of them with program_error / ValueError: No LM is loaded.)" in str(info.value)


def test_the_default_reflection_window_is_capped() -> None:
    """Each failed reflection is a reflection LM call: at most 8 before the run stops, whatever the window."""
    assert SystemicFailureDetector(window=20).proposal_window == 8


def test_after_a_systemic_stop_every_observer_gets_the_same_error() -> None:
    """Concurrent evaluations report one cause: a later success or another failure re-raises the first."""
    d = SystemicFailureDetector(window=8)
    with pytest.raises(SystemicFailureError) as first:
        d.observe(fail(error_type="AuthenticationError", msg="bad key", fatal=True))
    with pytest.raises(SystemicFailureError) as again:
        d.observe(OK)
    assert again.value is first.value


def test_examples_known_to_fail_never_fill_the_window() -> None:
    """Rows whose inputs cannot reach the program (warned about before the run) fail at once; they said
    nothing about the setup but filled the first-N window and stopped a working run."""
    det = SystemicFailureDetector(3, expected_failures={"val": {0, 1, 2, 3, 4}})
    for i in range(5):
        det.observe(fail(error_type="TypeError", example_id=i))
    for i in (5, 6):
        det.observe(fail(example_id=i))
    with pytest.raises(SystemicFailureError, match="first 3 evaluations"):
        det.observe(fail(example_id=7))  # the others still count: a broken setup is still caught


def test_a_small_split_is_judged_on_its_examples_not_known_to_fail() -> None:
    det = SystemicFailureDetector(8, split_sizes={"train": 4}, expected_failures={"train": {0, 1}})
    det.observe(fail(example_id=0), split="train")
    det.observe(fail(example_id=2), split="train")
    with pytest.raises(SystemicFailureError):
        det.observe(fail(example_id=3), split="train")  # every example that can run has failed


def service_fail(example_id: int = 0, msg: str = "LMServerError: 503") -> EvalOutcome:
    return EvalOutcome(example_id, 0.0, failure="program_error", error_type="LMServerError", message=msg,
                       service_failure=True)


def test_a_streak_of_service_failures_after_successes_stops_the_run() -> None:
    """An outage mid-run: the first-N rule is closed by the earlier successes; the outage rule is not."""
    det = SystemicFailureDetector(3, outage_window=6, outage_min_seconds=0.0)
    det.observe(OK)
    for i in range(5):
        det.observe(service_fail(i, msg="LMServerError: first of the outage" if i == 0 else "LMServerError: 503"))
    with pytest.raises(SystemicFailureError) as info:
        det.observe(service_fail(5), split="train")  # across splits: one service
    assert "last 6 evaluations" in str(info.value) and "first of the outage" in str(info.value)
    assert (info.value.failure, info.value.error_type) == ("program_error", "LMServerError")


@pytest.mark.parametrize("between", [OK, fail()], ids=["success", "program_failure"])
def test_an_evaluation_the_service_answered_breaks_the_streak(between: EvalOutcome) -> None:
    """Short outages stay ordinary failures: a success, or a failure of the program or the metric (the
    service answered), starts the count again."""
    det = SystemicFailureDetector(3, outage_window=4, outage_min_seconds=0.0)
    det.observe(OK)
    for _ in range(10):
        for i in range(3):
            det.observe(service_fail(i))
        det.observe(between)


def test_the_outage_window_defaults_to_the_first_n_window() -> None:
    assert SystemicFailureDetector(5).outage_window == 5
    assert SystemicFailureDetector(5, outage_window=0).outage_window == 1


def test_a_trainset_failing_on_the_service_is_not_blamed_for_it() -> None:
    """The first-N rule on the trainset after the valset succeeded: when every failure was the service's,
    the message says the service failed, not that the trainset's fields break the program."""
    det = SystemicFailureDetector(3, outage_window=100)
    det.observe(OK, split="val")
    det.observe(service_fail(0), split="train")
    det.observe(service_fail(1), split="train")
    with pytest.raises(SystemicFailureError) as info:
        det.observe(service_fail(2), split="train")
    assert "LM service" in str(info.value) and "with_inputs" not in str(info.value)
    # one failure of the data among them: the split's examples are suspect again
    det = SystemicFailureDetector(3, outage_window=100)
    det.observe(OK, split="val")
    det.observe(service_fail(0), split="train")
    det.observe(fail(example_id=1), split="train")
    with pytest.raises(SystemicFailureError, match="with_inputs"):
        det.observe(service_fail(2), split="train")


def test_a_streak_shorter_than_the_minimum_time_does_not_stop_the_run() -> None:
    """Two waves of given-up retries take ~15 s: an outage the retry policy itself would outwait (2
    minutes) must not end a long run; the same streak lasting that long does."""
    now = [0.0]
    det = SystemicFailureDetector(3, outage_window=4, clock=lambda: now[0], outage_min_seconds=120.0)
    det.observe(OK)
    for i in range(40):  # 40 failures in a row within 119 s: kept as ordinary failures
        now[0] = 1.0 + 3.0 * i
        det.observe(service_fail(i))
    now[0] = 121.0
    with pytest.raises(SystemicFailureError, match=r"last 41 evaluations \(over 120s\)"):
        det.observe(service_fail(41))


def _failed_reflection(reason: str = "proposer_error", message: str = "could not parse the answer",
                       **kw) -> ProposalOutcome:
    return ProposalOutcome(skipped=reason, message=message, error_type="AdapterParseError", **kw)


def test_failed_reflections_after_a_usable_one_are_ordinary_but_their_streak_is_described() -> None:
    """A reflection LM that answered usefully, then only with refusals or unparseable text: each failure is
    an ordinary skip (a flaky proposer must not end a run), but the streak is kept, so that the no-progress
    stop can say the proposer broke instead of blaming perfect parents (a review: 39 of 41 reflections
    failed, paid, and the log said the parents were perfect)."""
    det = SystemicFailureDetector(32)
    det.observe_proposal(ProposalOutcome(texts={"a": "better"}))
    det.observe_proposal(ProposalOutcome(texts={"a": "better still"}))
    assert det.proposer_failure_streak() is None and det.proposer_failures_in_a_row == 0
    for _ in range(40):
        det.observe_proposal(_failed_reflection())
    det.observe_proposal(_failed_reflection("empty_proposal", "a blank text"))
    assert det.proposer_failures_in_a_row == 41
    text = det.proposer_failure_streak()
    assert text is not None
    assert "the last 41 reflections all gave nothing usable (40 of them with proposer_error" in text
    assert "the first: could not parse the answer" in text and "after 2 usable ones" in text
    assert "Check reflection_lm" in text


def test_what_breaks_or_leaves_the_proposer_failure_streak() -> None:
    """A usable proposal or an echo of the parent (a sensible answer, drawn often near a search's end)
    breaks the streak; nothing to reflect on and the service's failures (the outage rule's) neither break
    nor extend it; before the first usable reflection the first-N rule applies instead."""
    det = SystemicFailureDetector(32)
    det.observe_proposal(ProposalOutcome(texts={"a": "x"}))
    for breaker in (ProposalOutcome(texts={"a": "y"}), ProposalOutcome(skipped="unchanged_texts")):
        for _ in range(5):
            det.observe_proposal(_failed_reflection())
        det.observe_proposal(breaker)
        assert det.proposer_failures_in_a_row == 0
    for _ in range(5):
        det.observe_proposal(_failed_reflection())
        det.observe_proposal(ProposalOutcome(skipped="no_reflective_data"))
        det.observe_proposal(_failed_reflection("proposer_error", "503", service_failure=True))
    assert det.proposer_failures_in_a_row == 5
    resumed = SystemicFailureDetector(32)  # usable ones in an earlier session count
    resumed.resume(succeeded_splits=(), proposal_succeeded=True)
    resumed.observe_proposal(_failed_reflection())
    assert "after usable ones in an earlier session" in (resumed.proposer_failure_streak() or "")
    fresh = SystemicFailureDetector(32)  # before any usable one: the first-N rule's, not this streak
    for _ in range(7):
        fresh.observe_proposal(_failed_reflection())
    assert fresh.proposer_failures_in_a_row == 0


def test_a_metric_that_breaks_mid_run_is_told_by_its_feedback_calls() -> None:
    """After usable reflections, ``proposal_window`` in a row whose every feedback call raised, once the
    metric's scoring calls have raised too since the last usable one, is the metric broken mid-run (a
    service it calls gone): the run stops as systemic, so a rerun scores the session's failed
    evaluations again. Before, the run ended as "no progress" after 25 of them and kept the metric's
    failures as scores (a review: a rerun replayed them and found another program). Fewer in a row (a
    usable reflection or another failure between them) stay ordinary skips, and so do feedback calls
    failing alone (a second review: an LLM writing the feedback answered 429 for 8 s, the scoring in
    code never failed, and the run stopped, losing the program, with nothing to score again)."""
    feedback_error = _failed_reflection("feedback_error", "the metric raised on every feedback call (with "
                                        "pred_name) of this minibatch: ConnectionError: unreachable")
    scoring_error = fail("metric_error", "ConnectionError", "ConnectionError: unreachable")
    det = SystemicFailureDetector(32)
    det.observe(OK)
    det.observe_proposal(ProposalOutcome(texts={"a": "x"}))
    det.observe(scoring_error)
    for _ in range(7):
        det.observe_proposal(feedback_error)
    det.observe_proposal(ProposalOutcome(texts={"a": "y"}))  # a usable one: the metric works again
    for _ in range(7):
        det.observe_proposal(feedback_error)
    det.observe_proposal(feedback_error)  # 8 in a row, but no scoring call raised since the usable one
    det.observe(scoring_error)
    with pytest.raises(SystemicFailureError, match=r"the metric broke mid-run: the last 9 reflections") as info:
        det.observe_proposal(feedback_error)
    assert info.value.failure == "feedback_error" and info.value.error_type == "AdapterParseError"
    assert "ConnectionError: unreachable), and 1 of its scoring calls raised since" in str(info.value)

    feedback_only = SystemicFailureDetector(32)  # the judge writing feedback is down; the scoring works
    feedback_only.observe(OK)
    feedback_only.observe_proposal(ProposalOutcome(texts={"a": "x"}))
    for _ in range(30):
        feedback_only.observe_proposal(feedback_error)
        feedback_only.observe(OK)
        feedback_only.observe(EvalOutcome(0, 0.0, failure="metric_error", error_type="LMServerError",
                                          message="503", service_failure=True))  # the judge service's, not the metric's
    assert feedback_only.proposer_failures_in_a_row == 30  # the no-progress stop's to describe
    scored_since = SystemicFailureDetector(32)  # one candidate's output crashed the metric, later ones scored
    scored_since.observe(OK)
    scored_since.observe_proposal(ProposalOutcome(texts={"a": "x"}))
    scored_since.observe(scoring_error)
    scored_since.observe(OK)
    for _ in range(20):
        scored_since.observe_proposal(feedback_error)
    assert scored_since.proposer_failures_in_a_row == 20

    mixed = SystemicFailureDetector(32)
    mixed.observe(OK)
    mixed.observe_proposal(ProposalOutcome(texts={"a": "x"}))
    mixed.observe(scoring_error)
    for _ in range(5):
        for _ in range(7):
            mixed.observe_proposal(feedback_error)
        mixed.observe_proposal(_failed_reflection())  # the proposer failed on data it had: the metric answered
    assert mixed.proposer_failures_in_a_row == 40
    for _ in range(7):
        mixed.observe_proposal(feedback_error)
    with pytest.raises(SystemicFailureError, match="the last 8 reflections"):
        mixed.observe_proposal(feedback_error)
    smaller = SystemicFailureDetector(3)  # the window follows the valset's (here 3)
    smaller.observe(OK)
    smaller.observe_proposal(ProposalOutcome(texts={"a": "x"}))
    smaller.observe(scoring_error)
    smaller.observe_proposal(feedback_error)
    smaller.observe_proposal(feedback_error)
    with pytest.raises(SystemicFailureError, match="the last 3 reflections"):
        smaller.observe_proposal(feedback_error)


class _FastFailures:
    """Examples in ``failing`` fail at once, with no LM call (a tool's or a validation error); the others
    succeed after a round trip."""

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
        import asyncio

        if example_id in self.failing:
            await asyncio.sleep(0)
            return EvalOutcome(example_id, 0.0, failure="program_error", error_type="ValueError", message="bad input")
        await asyncio.sleep(0.02)
        return EvalOutcome(example_id, 1.0)


@pytest.mark.parametrize("failing_share", ["a third", "two thirds", "all"])
def test_the_first_n_rule_judges_the_first_evaluations_started_not_the_first_finished(failing_share) -> None:
    """An engine review: with 64 slots and 35% of a valset of 100 failing without an LM call, 17 of 20
    healthy runs stopped as systemic: the window of 32 filled with the fast failures before any success
    had answered. The verdict now waits for the first 32 started; a setup where every example fails
    still stops."""
    import asyncio

    from dspy_turbogepa.engine import Candidate, Orchestrator

    from .fakes import FakeReflector

    val = list(range(100))
    failing = {i for i in val if {"a third": i % 3 == 1, "two thirds": i % 3 != 0, "all": True}[failing_share]}
    config = make_config(max_metric_calls=150, max_evals_in_flight=64, systemic_failure_window=32)
    orch = Orchestrator(config, _FastFailures(failing), FakeReflector(), Candidate({"instr": "base"}),
                        list(range(20)), val)
    if failing_share == "all":
        with pytest.raises(SystemicFailureError, match="first 32 evaluations on the valset all failed"):
            asyncio.run(orch.run())
    else:
        result = asyncio.run(orch.run())
        assert result.stop_reason != "systemic_failure" and result.records[0].val_scores


def test_an_evaluation_launched_and_abandoned_is_not_waited_for() -> None:
    det = SystemicFailureDetector(window=2)
    first, second = det.launched("val"), det.launched("val")
    det.abandoned("val", first)  # cancelled: never answers
    det.observe(fail(example_id=5), split="val")
    with pytest.raises(SystemicFailureError):
        det.observe(fail(example_id=6), split="val", launch=second)


def test_a_proposer_that_breaks_mid_run_stops_it_though_its_mutations_still_pay_new_evaluations(caplog) -> None:
    """An engine review: after 3 usable reflections every one failed (``invalid_proposal``); each failed
    mutation still evaluated its parent on a new minibatch and scouts, which reset the paid no-op
    streak, so on 300 training examples the run paid 280 more metric calls and 210 reflections, and
    more with a larger trainset. It now stops after ``max_paid_noop_mutations`` failed reflections in a
    row, naming the proposer, and returns the best program so far."""
    import asyncio
    import logging

    from dspy_turbogepa.engine import Orchestrator

    from .fakes import FakeEvaluator, FakeReflector, hard_setup

    setup = hard_setup(train_n=300, val_n=20, num_keywords=40)
    reflector = FakeReflector(skip=lambda n: "invalid_proposal" if n >= 3 else None)
    config = make_config(max_metric_calls=1500, max_evals_in_flight=16, max_mutations_in_flight=4)
    orch = Orchestrator(config, FakeEvaluator(setup.task), reflector, setup.seed(), setup.train_ids, setup.val_ids)
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        result = asyncio.run(orch.run())
    assert result.stop_reason == "no_progress_possible"
    assert len(reflector.calls) < 3 + config.max_paid_noop_mutations + 10  # was 213
    assert result.total_metric_calls < 150  # was 329
    assert any("reflections all gave nothing usable" in r.getMessage() for r in caplog.records)


def test_the_first_n_verdict_names_the_split_when_there_are_two() -> None:
    """A review (session 41): a valset whose label field was misnamed stopped the run with "the first 8
    evaluations all failed", which did not say they were the valset's; with valset=None there is one
    split, and naming it "the valset" would puzzle."""
    two = SystemicFailureDetector(3, split_sizes={"train": 10, "val": 3})
    one = SystemicFailureDetector(3, split_sizes={"val": 10})
    for det, named in ((two, True), (one, False)):
        with pytest.raises(SystemicFailureError) as info:
            for i in range(3):
                det.observe(EvalOutcome(i, 0.0, failure="metric_error", message="AttributeError: reply",
                                        error_type="AttributeError"), "seed", "val")
        assert ("the first 3 evaluations on the valset all failed (3 of them with metric_error / "
                "AttributeError: reply). Fix" in str(info.value)) is named
        assert ("the first 3 evaluations all failed (" in str(info.value)) is not named
        assert "or the examples' fields" in str(info.value)


def test_a_success_started_after_the_first_n_does_not_decide_their_verdict() -> None:
    """A reproducibility review: whether the first N started all failing stopped the run depended on a
    success started later answering before the last of them (5 of 8 identical deterministic runs with
    0-20 ms of LM jitter stopped, 3 returned a program). The verdict is on the first N started alone."""
    for success_first in (True, False):
        det = SystemicFailureDetector(window=2)
        first, second, third = det.launched("train"), det.launched("train"), det.launched("train")
        if success_first:
            det.observe(EvalOutcome(9, 1.0), split="train", launch=third)
        det.observe(fail(example_id=5), split="train", launch=first)
        with pytest.raises(SystemicFailureError, match="first 2 evaluations"):
            det.observe(fail(example_id=6), split="train", launch=second)
            if not success_first:
                det.observe(EvalOutcome(9, 1.0), split="train", launch=third)


def test_an_example_known_to_fail_takes_no_place_among_the_first_n() -> None:
    """A determinism review: expected failures (examples whose inputs the program cannot take) took two of
    the first 8 launch numbers and were then not counted, so the rule judged 6 evaluations and filled up with
    later ones, stopping runs that had a success among the first 8 that count."""
    det = SystemicFailureDetector(window=2, expected_failures={"train": {5}})
    assert det.launched("train", 5) is None
    first, second = det.launched("train", 1), det.launched("train", 2)
    assert (first, second) == (0, 1)
    det.observe(fail(example_id=5), split="train", launch=None)
    det.observe(fail(example_id=1), split="train", launch=first)
    det.observe(EvalOutcome(2, 1.0), split="train", launch=second)  # a success among the first 2 that count
    det.observe(fail(example_id=3), split="train", launch=det.launched("train", 3))
    det.check_final()  # no stop


def test_failures_started_after_the_first_n_are_not_counted_among_them() -> None:
    """The same stop said "the first 9", "10" or "11 evaluations all failed" in identical runs: failures started
    after the first N that answered before the last of them were counted too."""
    det = SystemicFailureDetector(window=2)
    first, second, late = det.launched("train", 1), det.launched("train", 2), det.launched("train", 3)
    det.observe(fail(example_id=3), split="train", launch=late)
    det.observe(fail(example_id=1), split="train", launch=first)
    with pytest.raises(SystemicFailureError, match=r"first 2 evaluations .*\(2 of them"):
        det.observe(fail(example_id=2), split="train", launch=second)


def test_a_split_judged_in_order_reads_only_what_it_is_given_in_that_order() -> None:
    """Deterministic runs judge the trainset in commit order: the evaluations as they end feed only the
    fatal and outage rules; the first-N rule reads observe_in_order, a success among the first N ends it."""
    det = SystemicFailureDetector(window=2)
    det.judge_in_order("train")
    assert det.launched("train", 1) is None
    for i in range(4):  # as they end: not the first-N rule's
        det.observe(fail(example_id=i), split="train", launch=None)
    with pytest.raises(SystemicFailureError, match="retrying cannot fix"):  # a fatal one still stops at once
        det.observe(fail(fatal=True), split="train", launch=None)
    det = SystemicFailureDetector(window=2)
    det.judge_in_order("train")
    det.observe_in_order(fail(example_id=1), "c0", "train")
    with pytest.raises(SystemicFailureError, match="first 2 evaluations all failed"):
        det.observe_in_order(fail(example_id=2), "c0", "train")
    det = SystemicFailureDetector(window=2)
    det.judge_in_order("train")
    det.observe_in_order(fail(example_id=1), "c0", "train")
    det.observe_in_order(EvalOutcome(2, 1.0), "c1", "train")
    det.observe_in_order(fail(example_id=3), "c0", "train")
    det.check_final()


def test_a_success_started_after_the_first_n_counts_once_they_have_all_answered() -> None:
    """A review of 0d2da7f: a success started after the first N that answered while one of them still ran
    was forgotten for good, so a verdict that waits (the format rule, the end of the run) stopped a run
    whose seed had parsed: a valset of 40 stopped where it returned the seed before."""
    det = SystemicFailureDetector(window=2)
    a, b, late = det.launched("val", 0), det.launched("val", 1), det.launched("val", 2)
    det.observe(fail("format_error", None, example_id=0), "seed", "val", a)
    det.observe(EvalOutcome(2, 1.0), "seed", "val", late)
    det.observe(fail("format_error", None, example_id=1), "seed", "val", b)
    det.check_final()  # the seed parsed on example 2: the run returns as usual
