"""EvaluationCache rules that no orchestrator test pins down (found by mutation): what a resumed run with
valset=None serves from its stored evaluations, and how concurrent requests for one evaluation count."""

from __future__ import annotations

import asyncio

from dspy_turbogepa.engine import Candidate, EvalOutcome
from dspy_turbogepa.engine.budget import MetricBudget
from dspy_turbogepa.engine.evaluation import EvaluationCache
from dspy_turbogepa.engine.records import RunStats
from dspy_turbogepa.engine.scheduling import PrioritySlots
from dspy_turbogepa.engine.systemic import SystemicFailureDetector


class CountingEvaluator:
    """Each (fingerprint, split, example) it runs, and a score that is the example id over ten."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, bool]] = []

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces) -> EvalOutcome:
        self.calls.append((fingerprint, split, example_id, capture_traces))
        await asyncio.sleep(0.01)
        return EvalOutcome(example_id, example_id / 10, trajectory={"trace": example_id} if capture_traces else None,
                           prompt_tokens=100, completion_tokens=10, cost=0.5, lm_calls=3, rate_limit_retries=2)


def make_cache(evaluator, known=None, shared_splits=False) -> tuple[EvaluationCache, RunStats]:
    stats = RunStats()
    cache = EvaluationCache(evaluator, PrioritySlots(4), MetricBudget(100), stats, [], SystemicFailureDetector(8),
                            known=known, shared_splits=shared_splits)
    return cache, stats


def test_a_resumed_shared_split_run_keeps_the_stored_outcome_that_has_a_trace():
    """valset=None: a training and a validation evaluation of one example are one cache entry. Resuming,
    the store may hold both, the validation one without a trace: the one with the trace must be kept,
    or a minibatch served from the cache gives the reflection nothing to read for that example."""
    fp = Candidate({"a": "x"}).fingerprint
    known = {(fp, "val", 0): EvalOutcome(0, 0.0), (fp, "train", 0): EvalOutcome(0, 0.0, trajectory={"trace": 0})}
    cache, _ = make_cache(CountingEvaluator(), known=known, shared_splits=True)
    assert cache.get((fp, "train", 0)).trajectory == {"trace": 0}
    assert cache.get((fp, "val", 0)).trajectory == {"trace": 0}


def test_concurrent_requests_for_one_evaluation_run_it_once_and_count_the_rest_as_cache_hits():
    """Two mutations asking for the same (candidate, example) at once: one metric call is paid, both get
    its outcome, and the second counts as a cache hit (run_stats' cache_hits, the summary and MLflow
    report it); a later request is served from the cache without running again. The execution's tokens,
    LM calls and rate-limit retries (part of the progress line's "retries") are counted once."""
    evaluator = CountingEvaluator()
    cache, stats = make_cache(evaluator)
    cand = Candidate({"a": "x"})

    async def scenario():
        requested: set = set()
        first, second = await asyncio.gather(cache.one(cand, "train", 3, 0.0, requested),
                                             cache.one(cand, "train", 3, 0.0, requested))
        third = await cache.one(cand, "train", 3, 0.0, requested)
        return first, second, third, requested

    first, second, third, requested = asyncio.run(scenario())
    assert first is second is third and first.score == 0.3
    assert len(evaluator.calls) == 1 and stats.executed == 1
    assert stats.cache_hits == 2
    assert requested == {(cand.fingerprint, "train", 3)}
    assert (stats.task_prompt_tokens, stats.task_completion_tokens, stats.task_cost) == (100, 10, 0.5)
    assert stats.task_lm_calls == 3 and stats.rate_limit_retries == 2


class _Recorder:
    """An observer keeping every evaluation it is told about (what a run store would keep)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_evaluation(self, candidate, split, outcome) -> None:
        self.seen.append(outcome.example_id)

    def on_candidate(self, record) -> None:
        pass


def test_a_cap_that_refuses_an_evaluation_lets_the_batch_already_on_the_wire_finish_and_be_kept():
    """Two slots, four evaluations: the first two start; once they are on the wire the cap is reached, so the
    two waiting for a slot are refused (never run) while the two already running finish, are counted and
    reach the observers (paid for, so stored for a rerun), and the batch raises PaidCallRefused."""
    import pytest

    from dspy_turbogepa.engine.errors import PaidCallRefused

    class Staggered(CountingEvaluator):
        async def evaluate(self, texts, fingerprint, split, example_id, capture_traces) -> EvalOutcome:
            outcome = await super().evaluate(texts, fingerprint, split, example_id, capture_traces)
            await asyncio.sleep(0.05 * example_id)  # example 1 is still on the wire when 2 is refused
            return outcome

    evaluator, recorder, stats = Staggered(), _Recorder(), RunStats()
    cache = EvaluationCache(evaluator, PrioritySlots(2), MetricBudget(100), stats, [recorder],
                            SystemicFailureDetector(8))
    cache.paid_gate = lambda: "token_budget" if len(evaluator.calls) >= 2 else None
    cand = Candidate({"a": "x"})
    requested: set = set()
    with pytest.raises(PaidCallRefused, match="token budget"):
        asyncio.run(cache.many(cand, "val", [0, 1, 2, 3], 0.0, requested))
    assert sorted(e for _, _, e, _ in evaluator.calls) == [0, 1]
    assert sorted(recorder.seen) == [0, 1] and stats.executed == 2
    assert (stats.task_prompt_tokens, stats.task_completion_tokens, stats.task_cost) == (200, 20, 1.0)
    assert requested == {(cand.fingerprint, "val", i) for i in (0, 1)}  # the refused are not charged
    assert cache.get((cand.fingerprint, "val", 2)) is None  # refused: a rerun runs it (or refuses it again)


def test_an_evaluation_whose_observer_raises_is_not_waited_for_by_the_first_n_rule():
    """A review of the launch tracking: an observer raising after an evaluation ended (the run store's
    writer died) skipped both ``observe`` and ``abandoned``, so the first-N verdict would have waited for
    that launch for the rest of the run."""
    import pytest

    class Raising:
        def on_evaluation(self, candidate, split, outcome):
            raise RuntimeError("the writer died")

    detector = SystemicFailureDetector(8)
    cache = EvaluationCache(CountingEvaluator(), PrioritySlots(4), MetricBudget(100), RunStats(), [Raising()],
                            detector)
    with pytest.raises(RuntimeError, match="writer died"):
        asyncio.run(cache.one(Candidate({"a": "x"}), "val", 1, 0.0, set()))
    assert not detector._window("val").early_running
