"""A review of the behavioural claims in the module, class and function docstrings (and comments) of
``dspy_turbogepa/engine/*.py`` and ``dspy_turbogepa/proposers/*.py``.

Each test quotes the claim it pins and names file:line. Most test the module's functions and classes
directly (fake clocks, hand-built records, asyncio ordered by events and ``sleep(0)`` steps, never by
timing); a few run the Orchestrator on the pure-Python fakes of tests/engine (milliseconds each). A claim
found false is pinned as documented and marked ``xfail(strict=True)``, its reason saying what is true: the
Beta(1, 1) prior of the one/all mix (credit.py), which of several late errors ``all_of`` raises (errors.py),
"at most twice as often" for an unsolvable example (sampling.py), ``2 * n`` distinct sibling orders for
n = 2 (orchestrator.py), and "exactly ``k - width + 1``" commits with the adaptive width (orchestrator.py).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import logging
import math
import pickle
import random
import subprocess
import sys
import threading
from collections import Counter

import dspy
import pytest
from engine.fakes import (
    FakeEvaluator,
    FakeReflector,
    KeywordTask,
    Recorder,
    RunTimeout,
    Setup,
    StopAfter,
    build,
    hard_setup,
    make_config,
    run,
    run_fakes,
)

import dspy_turbogepa.engine.credit as credit_module
import dspy_turbogepa.engine.frontier as frontier_module
import dspy_turbogepa.engine.orchestrator as orchestrator_module
from dspy_turbogepa.engine import Candidate, EvalOutcome, ProposalOutcome, RunInterruptedError, SystemicFailureError
from dspy_turbogepa.engine.aimd import LONG_COOLDOWN_S, AimdRegistry, AimdWindow
from dspy_turbogepa.engine.budget import MetricBudget
from dspy_turbogepa.engine.candidate import fingerprint_texts
from dspy_turbogepa.engine.config import (
    MAX_RUNGS,
    EngineConfig,
    default_mutations_in_flight,
    default_reflections_in_flight,
    default_rung_fractions,
    validate_rung_fractions,
)
from dspy_turbogepa.engine.credit import CreditSnapshot, KindCounts
from dspy_turbogepa.engine.errors import USER_CODE_ERRORS, PaidCallRefused, all_of, cancelling
from dspy_turbogepa.engine.evaluation import EvaluationCache
from dspy_turbogepa.engine.frontier import FrontierTally, ParetoFrontier, pareto_front_members, record_on_front
from dspy_turbogepa.engine.history import CommitHistory, CommitPoint
from dspy_turbogepa.engine.merge import find_merge, merge_texts, stratified_subsample
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.engine.orchestrator import _PooledBefore, proposal_key, sibling_order
from dspy_turbogepa.engine.records import CandidateRecord, PriorUsage, RunStats, mean_in_id_order
from dspy_turbogepa.engine.rungs import RungLadder, promotion_decision
from dspy_turbogepa.engine.sampling import (
    LIKELY_FAILING,
    LINEAGE_DEPTH,
    SOLVED,
    UNKNOWN,
    EpochShuffledSampler,
    FailureFirstSampler,
    LineageKnowledge,
)
from dspy_turbogepa.engine.scheduling import PrioritySlots
from dspy_turbogepa.engine.selection import ComponentSelector, SelectorState
from dspy_turbogepa.engine.systemic import FORMAT_ERROR_CANDIDATES, MAX_PROPOSAL_WINDOW, SystemicFailureDetector
from dspy_turbogepa.engine.types import NOTHING_TO_REFLECT_ON, Evaluator, Reflector
from dspy_turbogepa.engine.width import GENERATIONS_TO_AFFORD, mutation_width, sibling_count
from dspy_turbogepa.proposers.context_fit import ContextFit, Example, _share, choose, plan

# ============================================================================================ helpers


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def steps(n: int = 1) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def record(index: int, texts: dict, parents: list, scores: dict) -> CandidateRecord:
    return CandidateRecord(index=index, candidate=Candidate(texts), parent_indices=parents, val_scores=dict(scores))


def cfg(**kw) -> EngineConfig:
    base = {"max_metric_calls": 1000, "max_evals_in_flight": 8, "max_mutations_in_flight": 4,
            "max_reflections_in_flight": 4}
    base.update(kw)
    return EngineConfig(**base)


# ============================================================================================ engine/__init__


def test_the_engine_package_imports_no_dspy():
    """engine/__init__.py:1: "Nothing in this package imports dspy." (every engine module, in a fresh
    interpreter)."""
    code = ("import sys, pkgutil, importlib, dspy_turbogepa.engine as e\n"
            "for m in pkgutil.iter_modules(e.__path__): importlib.import_module('dspy_turbogepa.engine.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n == 'dspy' or n.startswith('dspy.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# ============================================================================================ aimd.py


def test_aimd_window_starts_at_the_limit_and_a_burst_of_429s_shrinks_it_once_never_below_min_window():
    """aimd.py:6-11: "It starts at the engine's in-flight limit and shrinks multiplicatively on a rate limit
    (x decrease, at least min_window), at most once per round: ... a burst of simultaneous 429s halves
    the window once"."""
    clock = FakeClock()

    async def scenario():
        w = AimdWindow("k", 8, min_window=3, clock=clock, sleep=lambda s: steps())
        assert w.window == 8
        tickets = [await w.acquire() for _ in range(8)]
        for t in tickets:
            w.release(t, "rate_limited")
        assert (w.window, w.decreases, w.rate_limited) == (4, 1, 8)
        t = await w.acquire()  # a new round: it may shrink again, but never below min_window
        w.release(t, "rate_limited")
        assert w.window == 3 and w.min_seen == 3

    asyncio.run(scenario())


def test_aimd_window_grows_by_one_after_a_windows_worth_of_successes_up_to_the_limit():
    """aimd.py:12: "grows additively on success: +1 after a window's worth of successes, up to the limit";
    aimd.py:166-167: "``neutral`` neither"."""

    async def scenario():
        w = AimdWindow("k", 4, clock=FakeClock(), sleep=lambda s: steps())
        t = await w.acquire()
        w.release(t, "rate_limited")
        assert w.window == 2
        t = await w.acquire()
        w.release(t, "success")
        assert w.window == 2  # one success of a window of 2
        for _ in range(5):
            t = await w.acquire()
            w.release(t, "neutral")
        assert w.window == 2
        t = await w.acquire()
        w.release(t, "success")
        assert w.window == 3
        for _ in range(20):
            t = await w.acquire()
            w.release(t, "success")
        assert w.window == 4 and w.increases == 2

    asyncio.run(scenario())


def test_aimd_slots_are_handed_over_fifo_and_a_grant_during_a_cooldown_waits_it_out():
    """aimd.py:13-17: "after a 429, imposes a shared cool-down until the server's Retry-After has passed";
    "Slots are handed over FIFO (a release gives its slot straight to the oldest waiter: no barging), and a
    rollout granted a slot during a cool-down waits the cool-down out before it is told to go"."""
    clock = FakeClock()
    slept: list[float] = []

    async def fake_sleep(seconds):
        slept.append(seconds)
        clock.t += seconds
        await steps()

    async def scenario():
        w = AimdWindow("k", 1, clock=clock, sleep=fake_sleep)
        first = await w.acquire()
        granted: list[str] = []

        async def waiter(name):
            ticket = await w.acquire()
            granted.append(name)
            return ticket

        tasks = [asyncio.create_task(waiter(n)) for n in "abc"]
        await steps(3)
        assert w.waiting == 3 and not granted
        w.release(first, "rate_limited", retry_after=5.0)  # the slot goes to "a", which waits 5 s first
        await steps(3)
        assert granted == ["a"] and slept == [5.0] and clock.t == 5.0
        # the ticket says how long it waited out the cool-down: the evaluator's retry policy counts that as
        # backing off, unlike the time queued for the slot
        assert tasks[0].result().cooldown_s == 5.0
        for name in "bc":
            w.release(tasks["abc".index(granted[-1])].result(), "neutral")
            await steps(3)
            assert granted[-1] == name
        assert slept == [5.0]  # the cool-down was over for b and c
        assert tasks[1].result().cooldown_s == tasks[2].result().cooldown_s == 0.0
        w.release(tasks[2].result())

    asyncio.run(scenario())


def test_aimd_a_retry_after_past_max_cooldown_imposes_no_pause():
    """aimd.py:68-70: "``max_cooldown_s``: the longest pause a Retry-After may impose on the endpoint. A
    longer one ... imposes none"."""
    clock = FakeClock()

    async def scenario():
        w = AimdWindow("k", 2, max_cooldown_s=60.0, clock=clock, sleep=lambda s: pytest.fail("slept"))
        t = await w.acquire()
        w.release(t, "rate_limited", retry_after=3600.0)
        assert w.cooldown_until == -math.inf
        w.release(await w.acquire())
        w2 = AimdWindow("k2", 2, max_cooldown_s=60.0, clock=clock)
        t = await w2.acquire()
        w2.release(t, "rate_limited", retry_after=30.0)
        assert w2.cooldown_until == 30.0

    asyncio.run(scenario())


def test_aimd_a_long_cooldown_is_said_at_warning_the_first_time_then_at_debug(caplog):
    """aimd.py:38-39: "A cool-down at least this long is said at WARNING when it starts"; aimd.py:207: "at
    WARNING the first time ..., then DEBUG"."""
    clock = FakeClock()
    caplog.set_level(logging.DEBUG, logger="dspy_turbogepa.engine.aimd")

    async def scenario():
        w = AimdWindow("ep", 4, clock=clock, sleep=lambda s: steps())
        t = await w.acquire()
        w.release(t, "rate_limited", retry_after=LONG_COOLDOWN_S - 1)  # short: not said
        clock.t += 100
        t = await w.acquire()
        w.release(t, "rate_limited", retry_after=LONG_COOLDOWN_S)
        clock.t += 100
        t = await w.acquire()
        w.release(t, "rate_limited", retry_after=LONG_COOLDOWN_S * 3)

    asyncio.run(scenario())
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "rate limited and" in r.getMessage()]
    assert [level for level, _ in said] == [logging.WARNING, logging.DEBUG]


def test_aimd_registry_makes_windows_alike_takes_keys_in_sorted_order_and_charges_only_the_named():
    """aimd.py:233: "The windows of all endpoints, created on first use with the same settings";
    aimd.py:263: "One slot in each distinct window, taken in sorted key order"; aimd.py:280-281:
    "``outcome`` applies to the keys in ``only`` (all when None), the rest are released neutrally"."""
    clock = FakeClock()

    async def scenario():
        reg = AimdRegistry(4, decrease=0.25, min_window=1, clock=clock)
        tickets = await reg.acquire_all(["b", "a", "b", "c"])
        assert [t.key for t in tickets] == ["a", "b", "c"]
        assert all(w.limit == 4 and w.decrease == 0.25 for w in reg.windows().values())
        reg.release_all(tickets, "rate_limited", retry_after=7.0, only=["b"])
        windows = reg.windows()
        assert windows["b"].window == 1 and windows["b"].cooldown_until == 7.0
        assert windows["a"].window == windows["c"].window == 4
        assert windows["a"].cooldown_until == -math.inf and windows["a"].in_use == 0

    asyncio.run(scenario())


# ============================================================================================ budget.py


def test_a_strict_budget_starts_only_what_fits_and_is_never_passed():
    """budget.py:8-9: "strict: a mutation starts only if its worst case fits, so the limit is never passed"."""
    b = MetricBudget(10)
    assert b.try_reserve(6) and not b.try_reserve(5) and b.try_reserve(4) and not b.try_reserve(1)
    for _ in range(10):
        b.record_execution()
    with pytest.raises(RuntimeError, match="budget exceeded"):
        b.record_execution()


def test_a_gepa_budget_lets_one_mutation_of_at_most_the_overshoot_straddle_the_limit():
    """budget.py:10-14: "a mutation may start while the budget is not used up even if its worst case does
    not fit. Only one mutation can straddle the limit (its reservation uses up the rest), and only one whose
    worst case is at most ``overshoot`` ..., so the overshoot stays below it"."""
    b = MetricBudget(10, overshoot=5)
    assert b.try_reserve(8)
    assert not b.try_reserve(6)  # a worst case above the overshoot may not straddle
    assert b.try_reserve(5)  # one of at most the overshoot may
    assert not b.try_reserve(1)  # and then nothing else starts
    for _ in range(14):  # limit + overshoot - 1 executions at most
        b.record_execution()
    with pytest.raises(RuntimeError):
        b.record_execution()


def test_a_pair_is_charged_once_to_the_first_commit_that_asked_for_it():
    """budget.py:16-17: "an (candidate, example) pair is charged to the first *committed* mutation that
    asked for it"; budget.py:75: commit "returns how many were new"."""
    b = MetricBudget(10)
    assert b.commit([("f", "train", 1), ("f", "train", 2)]) == 2
    assert b.commit([("f", "train", 2), ("g", "train", 2)]) == 1
    assert b.committed == 3 and b.is_charged(("g", "train", 2))
    b.try_reserve(3)
    with pytest.raises(RuntimeError, match="more budget than reserved"):
        b.release(4)
    with pytest.raises(ValueError):
        MetricBudget(0)
    with pytest.raises(ValueError):
        MetricBudget(5, overshoot=-1)


# ============================================================================================ candidate.py


def test_a_candidate_is_its_texts_and_its_fingerprint_cannot_drift():
    """candidate.py:3-6: "A candidate is only its component texts ... so the fingerprint can never drift from
    the content"; candidate.py:22: "equal texts give equal fingerprints, whatever their origin"; :24-25: a
    lone surrogate "is hashed instead of raising"."""
    source = {"b": "2", "a": "1"}
    c = Candidate(source)
    source["a"] = "changed"
    assert dict(c.texts) == {"a": "1", "b": "2"}
    assert c.fingerprint == Candidate({"a": "1", "b": "2"}, parents=("x",), kind="merge").fingerprint
    assert c.fingerprint == fingerprint_texts(c.texts)
    with pytest.raises(TypeError):
        c.texts["a"] = "x"  # type: ignore[index]
    assert len(fingerprint_texts({"a": "half \ud83d"})) == 32


def test_a_candidate_copies_and_pickles_as_its_plain_texts():
    """candidate.py:44-45: "Copied and pickled as its plain texts ...: a user's callback may deepcopy or pickle
    the state it is given"."""
    c = Candidate({"a": "1"}, parents=("p",), kind="reflection")
    for twin in (pickle.loads(pickle.dumps(c)), copy.deepcopy(c), copy.copy(c)):
        assert twin == c and twin.fingerprint == c.fingerprint and twin.parents == ("p",) and twin.kind == "reflection"


def test_with_updates_makes_a_child_differing_only_in_the_updated_components():
    """candidate.py:49: "A child that differs from this candidate only in the updated components" (unknown
    ones raise KeyError)."""
    parent = Candidate({"a": "1", "b": "2", "c": "3"})
    child = parent.with_updates({"b": "new"}, "reflection")
    assert dict(child.texts) == {"a": "1", "b": "new", "c": "3"}
    assert child.parents == (parent.fingerprint,) and child.kind == "reflection"
    assert child.changed_components(parent) == {"b"}
    with pytest.raises(KeyError, match="unknown components"):
        parent.with_updates({"zzz": "x"}, "reflection")


# ============================================================================================ config.py


def test_the_default_rung_ladder_is_geometric_drops_small_shards_and_is_capped():
    """config.py:34-36: "Shard k holds ``val_size / reduction_factor**k`` examples; shards smaller than
    ``min_shard`` are dropped ... At most ``MAX_RUNGS`` shards below the full set"; a factor that is not a
    finite number > 1 is refused."""
    assert default_rung_fractions(100) == (1 / 9, 1 / 3, 1.0)  # 100/27 < 8 dropped
    assert default_rung_fractions(23) == (1.0,) and default_rung_fractions(24) == (1 / 3, 1.0)
    assert default_rung_fractions(100, 2.0, min_shard=20) == (0.25, 0.5, 1.0)  # 100/8 < 20
    assert len(default_rung_fractions(10**9, 1.0001)) == MAX_RUNGS + 1
    for bad in (1.0, 0.5, math.inf):
        with pytest.raises(ValueError):
            default_rung_fractions(100, bad)


def test_the_default_in_flight_limits():
    """config.py:51-54: "we run about one mutation per two slots" (at least 2); config.py:58: reflections get
    "a small separate cap" (``max(1, min(8, ceil(n / 4)))``)."""
    assert [default_mutations_in_flight(n) for n in (1, 4, 5, 16, 64)] == [2, 2, 2, 8, 32]
    assert [default_reflections_in_flight(n) for n in (1, 4, 5, 16, 64)] == [1, 1, 2, 4, 8]


@pytest.mark.parametrize("fractions", ["0.5,1", [], [0.0, 1.0], [0.5, 1.5], [0.5, 0.5, 1.0], [0.25, 0.5], [None]])
def test_rung_fractions_are_validated(fractions):
    """config.py:5: "Validation happens at construction so bad values fail before any LM call" (rung
    fractions: increasing, in (0, 1], ending at 1.0)."""
    with pytest.raises(ValueError, match="rung_fractions"):
        validate_rung_fractions(fractions)
    with pytest.raises(ValueError):
        cfg(rung_fractions=fractions)


def test_engine_config_normalises_staleness_and_the_width_floor():
    """config.py:113-115 / 168: "``max_staleness`` as set by ``__post_init__`` (``max_mutations_in_flight``
    when left None)"; it must be >= max_mutations_in_flight; the width floor is clipped to the width;
    config.py:172-176: counts must be positive integers (a bool is not one)."""
    c = cfg(max_mutations_in_flight=5, min_mutations_in_flight=9)
    assert c.max_staleness == 5 == c.staleness_limit and c.min_mutations_in_flight == 5
    assert cfg(max_mutations_in_flight=2, max_staleness=6).staleness_limit == 6
    with pytest.raises(ValueError, match="max_staleness"):
        cfg(max_mutations_in_flight=4, max_staleness=3)
    for bad in ({"max_siblings": 0}, {"max_evals_in_flight": True}, {"reflection_scouts": -1},
                {"promotion_z": -0.1}, {"candidate_selection": "best"}, {"component_selector": "some"}):
        with pytest.raises(ValueError):
            cfg(**bad)


# ============================================================================================ credit.py


def test_credit_counts_are_immutable_snapshots_with_laplace_smoothed_rates():
    """credit.py:3-5: per kind "we count the mutations that evaluated a child, the children that survived
    rung 0, and those that reached the pool"; credit.py:29: win_rate is the "Laplace-smoothed share of
    attempts that produced a new candidate"."""
    empty = CreditSnapshot()
    s = empty.updated("reflection", survived=True, accepted=True, improved_best=True)
    s = s.updated("reflection", survived=True, accepted=False).updated("reflection", survived=False, accepted=False)
    assert empty.get("reflection") == KindCounts()
    assert s.get("reflection") == KindCounts(attempts=3, survived_rung0=2, accepted=1, improved_best=1)
    assert s.get("reflection").win_rate() == 2 / 5 and s.get("reflection").rung0_rate() == 3 / 5
    assert s.to_dict()["reflection"]["win_rate"] == 0.4


def test_the_reflection_mix_drifts_toward_the_kind_that_wins():
    """credit.py:5-8: each reflective mutation chooses "by Thompson sampling ..., so the mix drifts toward
    what wins here" (the reward: became the new best, credit.py:51)."""
    rng = random.Random(0)
    all_wins = CreditSnapshot({"reflection": KindCounts(attempts=20), "reflection_all": KindCounts(20, 20, 20, 15)})
    one_wins = CreditSnapshot({"reflection": KindCounts(20, 20, 20, 15), "reflection_all": KindCounts(attempts=20)})
    assert sum(all_wins.choose_reflection_kind(rng) == "reflection_all" for _ in range(400)) > 360
    assert sum(one_wins.choose_reflection_kind(rng) == "reflection_all" for _ in range(400)) < 40


def test_with_no_counts_the_pessimistic_prior_chooses_all_components_about_one_time_in_ten():
    """credit.py (module docstring, corrected after this review): "a Beta(1, 1) prior for one component, a
    pessimistic Beta(1, 9) for all (so with no history "all" is drawn about one time in ten)", rewarding
    children that "became the new best". It said Beta(1, 1) for both, on the survived/accepted counts."""
    rng = random.Random(0)
    chose_all = sum(CreditSnapshot().choose_reflection_kind(rng) == "reflection_all" for _ in range(4000))
    assert 0.07 < chose_all / 4000 < 0.13
    # survivals and acceptances without a new best do not move the choice; new bests do
    survived = CreditSnapshot({"reflection_all": KindCounts(20, 20, 20, 0)})
    assert sum(survived.choose_reflection_kind(rng) == "reflection_all" for _ in range(400)) < 40
    doc = credit_module.__doc__ or ""
    assert "Beta(1, 9)" in doc and "became the new best" in doc


# ============================================================================================ errors.py


def test_user_code_errors_include_cancelled_error_and_cancelling_tells_the_engines_cancellation_apart():
    """errors.py:12-15: "``asyncio.CancelledError`` is a ``BaseException``, but user code raises it too";
    errors.py:19-20: ``cancelling()``: "Whether the running task is being cancelled (by the engine), as
    opposed to user code raising ``CancelledError`` inside it" (Python >= 3.11)."""
    assert asyncio.CancelledError in USER_CODE_ERRORS and Exception in USER_CODE_ERRORS

    async def user_code_raises():
        try:
            raise asyncio.CancelledError  # e.g. asyncio.run of a cancelled coroutine, in the user's code
        except asyncio.CancelledError:
            return cancelling()

    async def cancelled_by_engine():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return cancelling()

    async def scenario():
        assert await asyncio.create_task(user_code_raises()) is False
        task = asyncio.create_task(cancelled_by_engine())
        await steps()
        task.cancel()
        return await task

    assert asyncio.run(scenario()) is True


def test_all_of_returns_every_result_in_order_and_cancels_the_others_at_the_first_error():
    """errors.py:64-65: "Every result, in order; at the first error, the others are cancelled and it is
    raised"."""
    cancelled: list[str] = []

    async def value(v, n):
        await steps(n)
        return v

    async def forever(name):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def boom():
        await steps()
        raise SystemicFailureError("stop", failure="program_error")

    async def scenario():
        assert await all_of(value("a", 5), value("b", 0), value("c", 2)) == ["a", "b", "c"]
        assert await all_of() == []
        with pytest.raises(SystemicFailureError):
            await all_of(forever("x"), boom(), forever("y"))
        assert sorted(cancelled) == ["x", "y"]

    asyncio.run(scenario())


def test_all_of_lets_the_others_finish_after_a_caps_refusal_and_another_error_wins_over_it():
    """errors.py:64-66: "except a cap's refusal: then the others finish first (their calls already on the wire
    are paid for ...) and the first other error they raise wins over the refusal"; errors.py:88: "a
    systemic failure that finished with the refusal wins too"."""
    finished: list[str] = []

    async def refuse():
        raise PaidCallRefused("token_budget")

    async def slow(name, n, exc=None):
        await steps(n)
        if exc is not None:
            raise exc
        finished.append(name)
        return name

    async def scenario():
        with pytest.raises(PaidCallRefused) as info:
            await all_of(refuse(), slow("a", 3), slow("b", 6))
        assert info.value.reason == "token_budget" and str(info.value) == "the token budget is used up"
        assert finished == ["a", "b"]  # not cancelled: they finished
        with pytest.raises(ValueError):
            await all_of(refuse(), slow("c", 2, ValueError("late")), slow("d", 4))
        assert "d" in finished
        with pytest.raises(KeyError):
            await all_of(slow("r", 1, PaidCallRefused("cost_budget")), slow("e", 1, KeyError("same step")))

    asyncio.run(scenario())


def test_all_of_raises_the_first_error_the_others_raise_after_a_refusal():
    """errors.py:64-66: after a cap's refusal "the others finish first ... and the first other error they
    raise wins over the refusal" (here the first to raise is also the first passed)."""

    async def refuse():
        raise PaidCallRefused("token_budget")

    async def late(n, exc):
        await steps(n)
        raise exc

    async def trial():
        try:
            await all_of(refuse(), late(2, ValueError("first")), late(8, KeyError("second")))
        except (ValueError, KeyError, PaidCallRefused) as exc:
            return type(exc).__name__

    ballast = []
    outcomes = Counter()
    for k in range(40):
        ballast.append([object() for _ in range(k % 7)])  # vary the tasks' addresses from trial to trial
        outcomes[asyncio.run(trial())] += 1
    assert outcomes == Counter({"ValueError": 40})


def test_systemic_failure_error_carries_its_failure_and_error_type():
    """errors.py:29-31: "``failure`` names the kind of cause, ``error_type`` the exception type when one was
    raised"."""
    exc = SystemicFailureError("m", failure="metric_error", error_type="KeyError")
    assert (str(exc), exc.failure, exc.error_type) == ("m", "metric_error", "KeyError")
    assert isinstance(exc, RuntimeError) and isinstance(RunInterruptedError("x"), RuntimeError)


# ============================================================================================ evaluation.py


class ScriptedEvaluator:
    """Each call recorded; ``outcome(key)`` decides the result, ``gate`` may hold a call on an event."""

    def __init__(self, outcome=None, gates=None) -> None:
        self.calls: list[tuple[str, str, int, bool]] = []
        self.cancelled: list[int] = []
        self.outcome = outcome or (lambda fp, split, i: EvalOutcome(i, 1.0, trajectory={"i": i}))
        self.gates = gates or {}

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
        self.calls.append((fingerprint, split, example_id, capture_traces))
        try:
            gate = self.gates.get(example_id)
            if gate is not None:
                await gate.wait()
            await steps()
        except asyncio.CancelledError:
            self.cancelled.append(example_id)
            raise
        return self.outcome(fingerprint, split, example_id)


class CountingObserver(EngineObserver):
    def __init__(self) -> None:
        self.evaluations: list[tuple[str, str, int]] = []

    def on_evaluation(self, candidate, split, outcome) -> None:
        self.evaluations.append((candidate.fingerprint, split, outcome.example_id))


class SpyDetector(SystemicFailureDetector):
    def __init__(self) -> None:
        super().__init__(8)
        self.seen: list[int] = []

    def observe(self, outcome, candidate=None, split="val", launch=None) -> None:
        self.seen.append(outcome.example_id)
        super().observe(outcome, candidate, split, launch)


def make_cache(evaluator, capacity=4, known=None, shared=False, perfect=None):
    stats, observer, detector = RunStats(), CountingObserver(), SpyDetector()
    slots = PrioritySlots(capacity)
    cache = EvaluationCache(evaluator, slots, MetricBudget(100), stats, [observer], detector, known=known,
                            shared_splits=shared, perfect_score=perfect)
    return cache, stats, observer, detector, slots


def test_an_evaluation_runs_at_most_once_in_flight_or_done_and_only_executions_are_reported():
    """evaluation.py:1: "each (candidate, split, example) is executed at most once per run"; :5-7: "a cached
    or in-flight result is never paid again, ... every execution is counted and reported to the observers
    and the systemic-failure detector"; observer.py:21: on_evaluation is "never called for cache hits"."""
    ev = ScriptedEvaluator()
    cache, stats, observer, detector, _ = make_cache(ev)
    cand = Candidate({"a": "x"})

    async def scenario():
        req: set = set()
        outs = await asyncio.gather(*(cache.one(cand, "train", i % 3, 0.0, req) for i in range(9)))
        again = await cache.many(cand, "train", [0, 1, 2], 0.0, req)
        return outs, again, req

    outs, again, req = asyncio.run(scenario())
    assert len(ev.calls) == 3 and stats.executed == 3 and stats.cache_hits == 9
    assert sorted(observer.evaluations) == sorted((cand.fingerprint, "train", i) for i in range(3))
    assert sorted(detector.seen) == [0, 1, 2]
    assert [o.example_id for o in outs] == [i % 3 for i in range(9)] and [o.example_id for o in again] == [0, 1, 2]
    assert req == {(cand.fingerprint, "train", i) for i in range(3)}


def test_a_cache_hit_takes_no_evaluation_slot():
    """evaluation.py:5-6: "a slot of ``max_evals_in_flight`` is taken only for a real execution"."""
    cand = Candidate({"a": "x"})
    known = {(cand.fingerprint, "val", 0): EvalOutcome(0, 0.5)}
    cache, stats, *_, slots = make_cache(ScriptedEvaluator(), capacity=1, known=known)

    async def scenario():
        await slots.acquire(0.0)  # every slot is busy
        task = asyncio.create_task(cache.one(cand, "val", 0, 5.0, set()))
        await steps()
        assert task.done() and task.result().score == 0.5
        slots.release()

    asyncio.run(scenario())


def test_an_evaluation_that_raises_a_systemic_failure_cancels_its_siblings():
    """evaluation.py:7-8: "an evaluation that raises (a systemic failure) cancels its siblings instead of
    leaving them running"; :88-90 (``many``)."""
    blocked = asyncio.Event  # created inside the loop below

    def outcome(fp, split, i):
        return EvalOutcome(i, 0.0, failure="program_error", fatal=True, error_type="AuthenticationError")

    async def scenario():
        gates = {1: blocked(), 2: blocked()}
        ev = ScriptedEvaluator(outcome, gates)
        cache, *_ = make_cache(ev)
        with pytest.raises(SystemicFailureError):
            await cache.many(Candidate({"a": "x"}), "val", [0, 1, 2], 0.0, set())
        return ev

    ev = asyncio.run(scenario())
    assert sorted(ev.cancelled) == [1, 2]


def test_stored_outcomes_are_served_as_cache_hits_counted_as_replayed_once_and_add_no_usage():
    """evaluation.py:46: "``known``: outcomes stored by an earlier session of the run (resume), served as
    cache hits"; :65-66: "the first use of each counts as a metric call of this run ..., and its failure is
    counted as if it had run now"; records.py:132: "replaying a stored row adds nothing"."""
    cand = Candidate({"a": "x"})
    known = {(cand.fingerprint, "train", 0): EvalOutcome(0, 0.0, failure="program_error", prompt_tokens=100,
                                                         lm_calls=2),
             (cand.fingerprint, "train", 1): EvalOutcome(1, 1.0, prompt_tokens=100)}
    ev = ScriptedEvaluator()
    cache, stats, observer, *_ = make_cache(ev, known=known)

    async def scenario():
        for _ in range(3):
            await cache.many(cand, "train", [0, 1], 0.0, set())

    asyncio.run(scenario())
    assert ev.calls == [] and observer.evaluations == []
    assert stats.replayed == 2 and stats.cache_hits == 6 and stats.failures == Counter({"program_error": 1})
    assert stats.task_prompt_tokens == 0 and stats.task_lm_calls == 0


def test_with_shared_splits_one_execution_serves_both_and_captures_its_trace():
    """evaluation.py:47-49: "``shared_splits``: ... one execution serves both: every evaluation runs as
    ``"val"`` and captures its trace, which a minibatch needs"."""
    ev = ScriptedEvaluator()
    cache, stats, *_ = make_cache(ev, shared=True)
    cand = Candidate({"a": "x"})

    async def scenario():
        await cache.one(cand, "train", 3, 0.0, set())
        await cache.one(cand, "val", 3, 0.0, set())

    asyncio.run(scenario())
    assert ev.calls == [(cand.fingerprint, "val", 3, True)] and stats.cache_hits == 1
    plain = ScriptedEvaluator()
    cache, *_ = make_cache(plain)
    asyncio.run(cache.one(cand, "val", 3, 0.0, set()))
    asyncio.run(cache.one(cand, "train", 3, 0.0, set()))
    assert [(s, t) for _, s, _, t in plain.calls] == [("val", False), ("train", True)]


def test_with_trace_runs_a_lost_trace_again_while_the_stored_outcome_stays_served():
    """evaluation.py:94-101: "The outcome of ``candidate`` on an example, run again if its stored trace was
    lost. ... The stored outcome stays served until the new one replaces it"."""
    cand = Candidate({"a": "x"})
    stored = EvalOutcome(0, 0.0, trace_lost=True)
    known = {(cand.fingerprint, "train", 0): stored, (cand.fingerprint, "train", 1): EvalOutcome(1, 0.0,
                                                                                                 trajectory="t")}

    async def scenario():
        gate = asyncio.Event()
        ev = ScriptedEvaluator(lambda fp, s, i: EvalOutcome(i, 0.0, trajectory="fresh"), {0: gate})
        cache, stats, *_ = make_cache(ev, known=known)
        rerun = asyncio.create_task(cache.with_trace(cand, "train", 0, 0.0))
        await steps(2)
        assert len(ev.calls) == 1
        meanwhile = await cache.one(cand, "train", 0, 0.0, set())
        assert meanwhile is stored and cache.get((cand.fingerprint, "train", 0)) is stored
        gate.set()
        fresh = await rerun
        assert fresh.trajectory == "fresh" and cache.get((cand.fingerprint, "train", 0)) is fresh
        kept = await cache.with_trace(cand, "train", 1, 0.0)  # its trace was not lost: not run again
        assert kept.trajectory == "t" and len(ev.calls) == 1 and stats.executed == 1

    asyncio.run(scenario())


def test_the_paid_gate_is_asked_only_before_executions_and_a_refused_key_leaves_requested():
    """evaluation.py:69: paid_gate is "Asked before every execution (not a stored or shared result)";
    evaluation.py:112-114: the key "is added to ``requested``, and taken out again if a cap refuses the call:
    a mutation is charged only for the evaluations it got"."""
    cand = Candidate({"a": "x"})
    known = {(cand.fingerprint, "val", 0): EvalOutcome(0, 1.0)}
    ev = ScriptedEvaluator()
    cache, stats, *_ = make_cache(ev, known=known)
    asked: list[int] = []
    answers = iter([None, "cost_budget"])

    def gate():
        asked.append(len(ev.calls))
        return next(answers)

    cache.paid_gate = gate

    async def scenario():
        req: set = set()
        await cache.one(cand, "val", 0, 0.0, req)  # stored: not asked
        await cache.one(cand, "val", 1, 0.0, req)  # executed: asked
        with pytest.raises(PaidCallRefused):
            await cache.one(cand, "val", 2, 0.0, req)
        return req

    req = asyncio.run(scenario())
    assert asked == [0, 1] and len(ev.calls) == 1 and stats.executed == 1
    assert req == {(cand.fingerprint, "val", 0), (cand.fingerprint, "val", 1)}


def test_the_evaluation_warnings_are_said_once(caplog):
    """evaluation.py:175-176: a score above perfect_score is warned about "Once per run"; evaluation.py:184-186:
    a failure is said at WARNING "Once per kind and run ..., every one at DEBUG. A fatal one stops the run"
    (and is said at DEBUG only)."""
    caplog.set_level(logging.DEBUG, logger="dspy_turbogepa.engine.evaluation")
    scores = {0: (2.0, None), 1: (3.0, None), 2: (0.0, "metric_error"), 3: (0.0, "metric_error"),
              4: (0.0, "program_error")}

    def outcome(fp, split, i):
        score, failure = scores[i]
        return EvalOutcome(i, score, failure=failure, fatal=i == 4, message=f"m{i}")

    cache, *_ = make_cache(ScriptedEvaluator(outcome), perfect=1.0)

    async def scenario():
        for i in range(4):
            await cache.one(Candidate({"a": "x"}), "val", i, 0.0, set())
        with pytest.raises(SystemicFailureError):
            await cache.one(Candidate({"a": "x"}), "val", 4, 0.0, set())

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("above perfect_score" in m for m in warnings) == 1
    assert sum("evaluation failed (metric_error)" in m for m in warnings) == 1
    assert not any("program_error" in m for m in warnings)
    assert any("(program_error)" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


# ============================================================================================ frontier.py


def test_only_full_validation_scores_enter_the_frontier_and_near_ties_join_a_front():
    """frontier.py:5-6: "Only candidates evaluated on the *whole* validation set enter"; frontier.py:22-23:
    "a better score starts the front anew, an equal one (within ``SCORE_EPS``) joins it"."""
    f = ParetoFrontier([0, 1])
    with pytest.raises(ValueError, match="lacks full-validation scores"):
        f.add(0, {0: 1.0})
    f.add(0, {0: 0.3, 1: 0.5})
    f.add(1, {0: 0.1 + 0.2, 1: 0.4})
    f.add(2, {0: 0.2, 1: 0.6})
    assert f.fronts() == {0: {0, 1}, 1: {2}}
    best, fronts = {}, {}
    record_on_front(best, fronts, 5, "v", 0.5)
    record_on_front(best, fronts, 6, "v", 0.5 + 1e-12)
    record_on_front(best, fronts, 7, "v", 0.49)
    assert fronts == {"v": {5, 6}}


def test_the_best_index_is_the_highest_mean_with_the_lowest_index_on_ties():
    """frontier.py:73: "Highest mean score; the lowest index wins ties, so the seed wins ties"."""
    f = ParetoFrontier([0, 1])
    f.add(0, {0: 1.0, 1: 0.0})
    f.add(1, {0: 0.0, 1: 1.0})
    f.add(2, {0: 0.4, 1: 0.4})
    assert f.best_index() == 0
    f.add(3, {0: 0.6, 1: 0.6})
    assert f.best_index() == 3


def test_the_non_dominated_fronts_are_computed_once_per_change_and_handed_out_as_copies(monkeypatch):
    """frontier.py:40-42: "non_dominated() is asked for at every plan and merge search, the frontier changes
    only at a commit: computed once per change"; frontier.py:88: "a copy"."""
    calls = [0]
    real = frontier_module.pareto_front_members

    def counting(fronts, aggregates):
        calls[0] += 1
        return real(fronts, aggregates)

    monkeypatch.setattr(frontier_module, "pareto_front_members", counting)
    f = ParetoFrontier([0, 1])
    f.add(0, {0: 0.5, 1: 0.5})
    f.add(1, {0: 0.6, 1: 0.4})
    first = f.non_dominated()
    first[0].add(99)
    assert f.non_dominated() == {0: {1}, 1: {0}} and f.non_dominated_members() == (0, 1)
    f.select_parent(random.Random(0), "pareto")
    assert calls[0] == 1
    f.add(2, {0: 0.7, 1: 0.7})
    assert f.non_dominated_members() == (2,) and calls[0] == 2


def test_the_one_pass_pareto_members_equal_gepas_restarting_loop():
    """frontier.py:122-126: "Weakest first (lowest aggregate, then highest index), a candidate is dropped when
    every instance front holding it also holds another surviving candidate ... one pass gives the same set as
    re-examining everyone after each drop (gepa's loop)"."""
    gepa_utils = pytest.importorskip("gepa.gepa_utils")
    rng = random.Random(7)
    for _ in range(300):
        n, v = rng.randint(1, 9), rng.randint(1, 8)
        aggregates = dict(zip(range(n), rng.sample(range(1000), n)))  # distinct: gepa breaks ties otherwise
        fronts = {vid: set(rng.sample(range(n), rng.randint(0, n))) for vid in range(v)}
        expected = set().union(*gepa_utils.remove_dominated_programs(fronts, aggregates).values())
        assert pareto_front_members(fronts, aggregates) == expected


def test_the_frontier_tally_follows_the_same_rule_as_the_frontier():
    """frontier.py:148-150 / 182: FrontierTally: "the same per-instance rule as :class:`ParetoFrontier`"; its size
    (see pareto_front_members); front_agg: "Mean over validation instances of the best score on each"."""
    rng = random.Random(3)
    frontier, tally = ParetoFrontier(range(6)), FrontierTally()
    assert tally.size == 0 and tally.front_agg is None and tally.best is None
    for index in range(12):
        scores = {i: rng.choice([0.0, 0.5, 1.0]) for i in range(6)}
        frontier.add(index, scores)
        tally.add(index, scores)
        assert tally.size == len(frontier.non_dominated_members())
        assert tally.best == max(frontier.aggregate(i) for i in range(index + 1))
        assert tally.front_agg == pytest.approx(sum(frontier.best_scores().values()) / 6)
    assert tally.count == 12


def test_select_parent_strategies():
    """frontier.py:97-116: an empty frontier raises; current_best is the best index; top_k_pareto draws only
    among the five best by aggregate."""
    f = ParetoFrontier(range(8))
    with pytest.raises(RuntimeError, match="empty"):
        f.select_parent(random.Random(0), "pareto")
    for index in range(8):  # candidate k is the only one best on instance k; its aggregate grows with k
        f.add(index, {i: (1.0 if i == index else 0.0) + index / 100 for i in range(8)})
    rng = random.Random(0)
    assert {f.select_parent(rng, "current_best") for _ in range(20)} == {7}
    assert {f.select_parent(rng, "top_k_pareto") for _ in range(300)} == {3, 4, 5, 6, 7}
    assert {f.select_parent(rng, "pareto") for _ in range(300)} == set(range(8))


# ============================================================================================ history.py


def test_attempt_lookback_is_the_latest_commit_with_at_least_that_many_fewer_attempts():
    """history.py:52: "The latest commit count at or before ``n_commits`` with at least ``attempts`` fewer
    attempts" (0 when there is none)."""
    attempted = [0, 0, 1, 1, 3, 4, 4, 7, 8, 8]
    h = CommitHistory([0])
    for a in attempted:
        h.record(CommitPoint(1, 0, 0, 0, attempted=a))
    for n in range(len(attempted)):
        for k in range(10):
            fits = [m for m in range(n + 1) if attempted[m] <= attempted[n] - k]
            assert h.attempt_lookback(n, k) == (max(fits) if fits else 0), (n, k)


def test_the_lagging_frontier_never_moves_back_and_reservations_are_noted_in_launch_order():
    """history.py:66: "The frontier as it was after ``n_commits`` commits (calls must not go backwards in
    time)"; history.py:77: reservations "must be noted in launch order"; reserved_since (:82): "Sum of the
    reservations of mutations launched at or after ``first_seq``"."""
    records = [record(i, {"a": str(i)}, [None], {0: i / 10}) for i in range(3)]
    h = CommitHistory([0])
    for n in (1, 2, 3):
        h.record(CommitPoint(n, 0, 0, 0))
    assert h.frontier_at(0, records).best_index() == 0  # one record after the seed's point
    assert h.frontier_at(1, records).best_index() == 1
    with pytest.raises(RuntimeError, match="back in time"):
        h.frontier_at(0, records)
    for seq, amount in enumerate([5, 7, 11]):
        h.note_reservation(seq, amount)
    with pytest.raises(RuntimeError, match="launch order"):
        h.note_reservation(5, 1)
    assert [h.reserved_since(s) for s in range(5)] == [23, 18, 11, 0, 0]


# ============================================================================================ merge.py


def test_merge_texts_take_the_side_that_changed_and_the_better_parent_on_a_conflict():
    """merge.py:4-5: the child "takes, for each component, the side that changed it since the ancestor (the
    better parent's text where both changed it)"."""
    anc = {"a": "a0", "b": "b0", "c": "c0", "d": "d0"}
    first = {"a": "a1", "b": "b0", "c": "c1", "d": "same"}
    second = {"a": "a0", "b": "b2", "c": "c2", "d": "same"}
    rng = random.Random(0)
    assert merge_texts(anc, first, second, 0.4, 0.6, rng) == {"a": "a1", "b": "b2", "c": "c2", "d": "same"}
    assert merge_texts(anc, first, second, 0.7, 0.6, rng)["c"] == "c1"
    assert {merge_texts(anc, first, second, 0.5, 0.5, random.Random(s))["c"] for s in range(20)} == {"c1", "c2"}


def test_the_merge_screen_is_drawn_evenly_from_where_each_parent_wins_and_where_they_tie():
    """merge.py:71: "Up to ``size`` validation ids, balanced between where each parent wins and where they
    tie"."""
    first = dict(enumerate([1, 1, 1, 0, 0, 0, 0.5, 0.5, 0.5]))
    second = dict(enumerate([0, 0, 0, 1, 1, 1, 0.5, 0.5, 0.5]))
    for seed in range(10):
        screen = stratified_subsample(first, second, 3, random.Random(seed))
        assert len(screen) == 3 and sorted(i // 3 for i in screen) == [0, 1, 2]
        six = stratified_subsample(first, second, 6, random.Random(seed))
        assert Counter(i // 3 for i in six) == Counter({0: 2, 1: 2, 2: 2})
    assert stratified_subsample(first, second, 20, random.Random(0)) == tuple(range(9))


def test_find_merge_pairs_non_ancestors_through_a_weaker_common_ancestor_and_never_rebuilds_a_program():
    """merge.py:3-4: "pick two non-dominated candidates that are not ancestors of one another, find a common
    ancestor no better than either"; merge.py:10: "a merge never produces a program that already exists or
    is one of its parents"; merge.py:95: "or None when none is worth trying"."""
    records = [record(0, {"a": "a0", "b": "b0"}, [None], {0: 0.1}),
               record(1, {"a": "a1", "b": "b0"}, [0], {0: 0.5}),
               record(2, {"a": "a0", "b": "b1"}, [0], {0: 0.6})]
    proposal = find_merge(records, [1, 2], set(), set(), random.Random(0), 5, fingerprint_texts)
    assert (proposal.first, proposal.second, proposal.ancestor) == (1, 2, 0)
    assert proposal.texts == {"a": "a1", "b": "b1"} and proposal.screen_ids == (0,)
    existing = {fingerprint_texts({"a": "a1", "b": "b1"})}
    assert find_merge(records, [1, 2], existing, set(), random.Random(0), 5, fingerprint_texts) is None
    chain = records[:2] + [record(2, {"a": "a1", "b": "b1"}, [1], {0: 0.6})]  # 1 is 2's ancestor
    assert find_merge(chain, [1, 2], set(), set(), random.Random(0), 5, fingerprint_texts) is None
    better_ancestor = [record(0, {"a": "a0", "b": "b0"}, [None], {0: 0.9})] + records[1:]
    assert find_merge(better_ancestor, [1, 2], set(), set(), random.Random(0), 5, fingerprint_texts) is None
    assert find_merge(records, [1], set(), set(), random.Random(0), 5, fingerprint_texts) is None


def test_on_a_one_component_program_no_merge_is_ever_possible():
    """merge.py:109-110: "on a one-component program it never passes (the two parents' only texts differ from
    each other and from any ancestor they share)"."""
    records = [record(0, {"p": "s"}, [None], {0: 0.1}), record(1, {"p": "x"}, [0], {0: 0.5}),
               record(2, {"p": "y"}, [0], {0: 0.6}), record(3, {"p": "z"}, [1], {0: 0.7})]
    for seed in range(20):
        assert find_merge(records, [1, 2, 3], set(), set(), random.Random(seed), 5, fingerprint_texts) is None


@pytest.mark.parametrize("child_matches_better_parent", [False, True])
def test_a_merge_child_must_match_the_better_parent_on_its_screen_before_the_rungs(monkeypatch,
                                                                                   child_matches_better_parent):
    """merge.py:5-8: the child "is screened on a few validation instances ... and must match the better parent
    there before it climbs the validation rungs" (orchestrator._merge: a tie passes, a lower sum is rejected
    before any other validation example is paid for)."""
    merged: dict[str, dict[int, float]] = {}
    real = orchestrator_module.find_merge

    def recording(records, candidates, existing, tried, rng, size, fingerprint, planned=()):
        proposal = real(records, candidates, existing, tried, rng, size, fingerprint, planned)
        if proposal is not None:
            a, b = records[proposal.first].val_scores, records[proposal.second].val_scores
            better = a if sum(a[i] for i in proposal.screen_ids) >= sum(b[i] for i in proposal.screen_ids) else b
            merged[fingerprint(proposal.texts)] = dict(better) if child_matches_better_parent else {}
        return proposal

    monkeypatch.setattr(orchestrator_module, "find_merge", recording)

    class MergeAwareEvaluator(FakeEvaluator):
        async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
            outcome = await super().evaluate(texts, fingerprint, split, example_id, capture_traces)
            if fingerprint in merged and split == "val":
                return EvalOutcome(example_id, merged[fingerprint].get(example_id, 0.0))
            return outcome

    setup = hard_setup(train_n=24, val_n=12, components=("a", "b"), num_keywords=8)
    rec = Recorder()
    evaluator = MergeAwareEvaluator(setup.task, 3)
    run_fakes(make_config(max_metric_calls=3000, use_merge=True, max_merge_invocations=10, seed=3), setup,
              evaluator=evaluator, observers=[rec, StopAfter(60)])
    merges = [r for r in rec.results if r.plan.kind == "merge" and r.status not in ("duplicate", "cancelled")]
    assert merges
    for r in merges:
        child_val_keys = {i for fp, split, i in r.requested if fp == r.child.fingerprint and split == "val"}
        if child_matches_better_parent:
            assert r.status != "rejected_rung0"
        else:
            assert r.status == "rejected_rung0" and "merge screen" in r.detail
            assert child_val_keys == set(r.plan.screen_ids)  # no rung paid for


# ============================================================================================ records.py


def test_aggregates_sum_in_id_order_and_a_records_aggregate_is_computed_once():
    """records.py:35-39: "The mean of per-validation-instance scores summed in id order"; records.py:58-59:
    "Computed once: a record's scores never change after it is committed"."""
    scores = {0: 1e16, 2: -1e16, 1: 1.0}  # in insertion order the sum is 1.0, in id order 0.0
    assert sum(scores.values()) == 1.0 and mean_in_id_order(scores) == 0.0
    r = record(0, {"a": "x"}, [None], {0: 0.5, 1: 1.0})
    assert r.aggregate == 0.75
    r.val_scores[0] = 0.0
    assert r.aggregate == 0.75


def test_run_stats_tokens_add_up_every_lm_token():
    """records.py:190: "Every LM token counted: the program's and reflection's, prompt and completion"."""
    stats = RunStats(task_prompt_tokens=1, task_completion_tokens=20, reflection_prompt_tokens=300,
                     reflection_completion_tokens=4000)
    assert stats.tokens == 4321


def test_a_resumed_runs_usage_starts_from_the_prior_sessions():
    """records.py:129-132: PriorUsage: "A resumed run's tokens and cost start from it, so ``run_stats`` and the
    token and dollar caps count the whole run"."""
    prior = PriorUsage(task_prompt_tokens=10, task_completion_tokens=2, task_cost=0.5, reflection_prompt_tokens=7,
                       reflection_completion_tokens=3, reflection_cost=0.25)
    orch = orchestrator_module.Orchestrator(make_config(), FakeEvaluator(KeywordTask()), FakeReflector(),
                                            Candidate({"instr": "base"}), range(4), range(4), prior_usage=prior)
    assert dataclasses.asdict(prior) == {f.name: getattr(orch.stats, f.name) for f in dataclasses.fields(PriorUsage)}
    assert orch.stats.tokens == 22


# ============================================================================================ rungs.py


def test_validation_rungs_are_growing_prefixes_of_one_fixed_shuffle():
    """rungs.py:3-5: "Rungs 1..k are growing prefixes of one fixed shuffle of the validation ids, so every rung
    reuses the scores of the rung before and a promoted child never pays twice for an example"."""
    ids = list(range(100, 140))
    ladder = RungLadder.build(ids, (0.1, 0.25, 0.5, 1.0), seed=4)
    shards = [ladder.new_ids(r) for r in range(ladder.num_rungs)]
    assert [len(s) for s in shards] == [4, 6, 10, 20]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == 40 and set(flat) == set(ids) and tuple(flat) == ladder.order
    assert RungLadder.build(ids, (0.1, 0.25, 0.5, 1.0), seed=4) == ladder
    assert RungLadder.build(ids, (0.1, 0.25, 0.5, 1.0), seed=5).order != ladder.order


def test_promotion_keeps_specialists_and_ties_and_prunes_a_child_behind_the_incumbent_by_z_standard_errors():
    """rungs.py:6-9 / 68-76: a child "is kept unless it is behind — or whenever it beats the frontier's best
    on any instance"; promoted when "the sum of its paired differences with the incumbent is at least ``-z``
    standard errors"; "Ties are promoted on purpose"."""
    incumbent = {0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}
    best = {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.5}
    assert promotion_decision({0: 0.0, 1: 0.0, 3: 1.0}, incumbent, best).promote  # a specialist on instance 3
    assert promotion_decision({0: 1.0, 1: 0.0, 2: 1.0}, incumbent, best).promote  # a tie with the incumbent
    behind = {0: 1.0, 1: 0.0, 2: 0.0}  # diff -1, se 1
    assert not promotion_decision(behind, incumbent, best).promote
    assert not promotion_decision(behind, incumbent, best, z=0.99).promote
    assert promotion_decision(behind, incumbent, best, z=1.0).promote


# ============================================================================================ sampling.py


@pytest.mark.parametrize("n,size", [(7, 3), (9, 3), (10, 4), (5, 5), (11, 2)])
def test_epoch_minibatches_repeat_no_id_in_a_batch_draw_every_id_each_epoch_and_depend_only_on_k(n, size):
    """sampling.py:44-48: "The ``k``-th minibatch, never repeating an id within a batch. Each epoch is one
    shuffle of the ids, padded ... with ids from its own start up to a multiple of the minibatch size, so
    every id is drawn once per epoch and a few twice, and the batch of mutation ``k`` depends on nothing but
    ``k``"."""
    ids = list(range(50, 50 + n))
    s = EpochShuffledSampler(ids, size, seed=2)
    per_epoch = -(-n // size)
    batches = [s.batch(k) for k in range(3 * per_epoch)]
    for b in batches:
        assert len(b) == size and len(set(b)) == size
    for e in range(3):
        drawn = Counter(i for b in batches[e * per_epoch:(e + 1) * per_epoch] for i in b)
        assert set(drawn) == set(ids) and sum(c - 1 for c in drawn.values()) == per_epoch * size - n
    fresh = EpochShuffledSampler(ids, size, seed=2)
    assert [fresh.batch(k) for k in reversed(range(3 * per_epoch))] == batches[::-1]


def test_failure_first_draws_in_rank_recency_position_order_and_draw_does_not_change_the_sampler():
    """sampling.py:69-71: examples are taken "in the order (rank, least recently drawn, position in the epoch's
    shuffle). Solved examples are drawn only when nothing else is eligible"; sampling.py:73: "An example is
    eligible again only ``gap`` draws (half an epoch's worth) after it was drawn"; sampling.py:77: "``draw``
    does not change the sampler, ``consume`` applies a draw"."""
    ids = list(range(16))
    s = FailureFirstSampler(ids, 2, seed=0)  # 8 draws an epoch: gap 4
    failing, solved = {3, 9}, set(range(8, 16)) - {9}

    def rank(i):
        return LIKELY_FAILING if i in failing else SOLVED if i in solved else UNKNOWN

    first = s.draw(rank)
    assert s.draw(rank) == first and set(first) == failing
    s.consume(first)
    history = [first]
    for _ in range(5):
        b = s.draw(rank)
        s.consume(b)
        history.append(b)
    # the failures come back once 4 draws have passed; in between, unknown ones; solved ones never yet
    assert set(history[4]) == failing
    assert all(set(b) <= set(range(8)) - failing for b in history[1:4])
    assert not any(set(b) & solved for b in history)


def test_a_rank_that_names_its_likely_failures_draws_exactly_what_the_full_scan_draws():
    """sampling.py:122-129: "So a walk in that order stops once it has enough unknown ones, or reaches the
    ineligible ones with enough. Keys are unique (positions are), so the result is exactly the full scan's"
    (a randomised comparison, with exclusions and sizes as scouts ask)."""
    rng = random.Random(11)
    for trial in range(40):
        n = rng.randint(3, 30)
        size = rng.randint(1, 5)
        fast, full = FailureFirstSampler(range(n), size, trial), FailureFirstSampler(range(n), size, trial)
        for _ in range(rng.randint(1, 3 * n)):
            ranks = {i: rng.choice([LIKELY_FAILING, UNKNOWN, UNKNOWN, SOLVED]) for i in range(n)}

            def plain(i, ranks=ranks):
                return ranks[i]

            def named(i, ranks=ranks):
                return ranks[i]

            named.failing = {i for i, r in ranks.items() if r == LIKELY_FAILING} | set(rng.sample(range(n), 2 % n))
            exclude = set(rng.sample(range(n), rng.randint(0, n // 3)))
            want = rng.choice([None, rng.randint(1, n)])
            got = fast.draw(named, size=want, exclude=exclude)
            assert got == full.draw(plain, size=want, exclude=exclude)
            fast.consume(got)
            full.consume(got)


def test_an_unsolvable_example_is_drawn_at_most_twice_as_often_as_in_epoch_order():
    """sampling.py FailureFirstSampler: "eligible again only ``gap`` draws (half an epoch's worth, rounded down,
    and at least 2 from 3 draws an epoch on) ... drawn about twice as often as in plain epoch order ..., not
    every time" (9 training examples, minibatches of 3: the default minibatch size; 3 draws an epoch, where the
    gap was 1 before this review: drawn every time)."""
    ids = list(range(9))
    s = FailureFirstSampler(ids, 3, seed=0)

    def rank(i):
        return LIKELY_FAILING if i == 0 else UNKNOWN

    rank.failing = {0}
    draws = 30
    hits = 0
    for _ in range(draws):
        b = s.draw(rank)
        hits += 0 in b
        s.consume(b)
    plain = EpochShuffledSampler(ids, 3, seed=0)
    plain_hits = sum(0 in plain.batch(k) for k in range(draws))
    assert plain_hits == 10
    assert hits < draws and hits <= 2 * plain_hits


def test_explore_swaps_the_last_likely_failure_for_an_unknown_example_only_when_the_batch_holds_none():
    """sampling.py:175-176: "``batch`` with its last likely-failing example swapped for the next example the
    lineage has no score on, when ``batch`` holds none"."""
    s = FailureFirstSampler(range(12), 3, seed=0)
    failing = {0, 1, 2, 3}

    def rank(i):
        return LIKELY_FAILING if i in failing else UNKNOWN

    rank.failing = failing
    batch = s.draw(rank)
    assert set(batch) <= failing
    explored = s.explore(batch, rank)
    assert explored[:2] == batch[:2] and rank(explored[2]) == UNKNOWN
    mixed = (batch[0], batch[1], 7)
    assert s.explore(mixed, rank) == mixed  # an unknown example already in it


def test_lineage_knowledge_ranks_as_of_a_commit_from_the_nearest_generations():
    """sampling.py:211-213: "Scores ... each stamped with its commit number, so a rank computed "as of commit
    n" is the same whenever it is computed"; sampling.py:203-204: "A solved example is trusted for this many
    generations (the parent and its nearest ancestors)"; sampling.py:247-252: known / failed ("newest
    first")."""
    k = LineageKnowledge(perfect_score=1.0)
    k.record("child", 1, 0.0, commit=5)
    k.record("child", 1, 1.0, commit=6)  # the first committed score stands
    k.record("parent", 1, 1.0, commit=2)
    k.record("parent", 2, 1.0, commit=2)
    k.record("parent", 3, 0.0, commit=3)
    k.record("parent", 4, 0.5, commit=4)
    as_of_4 = k.ranker(["child", "parent"], 4)
    as_of_5 = k.ranker(["child", "parent"], 5)
    assert [as_of_4(i) for i in (1, 2, 3, 9)] == [SOLVED, SOLVED, LIKELY_FAILING, UNKNOWN]
    assert as_of_5(1) == LIKELY_FAILING  # the nearest generation first
    assert {1, 3, 4} <= as_of_5.failing
    far = k.ranker(["x"] * LINEAGE_DEPTH + ["parent"], 9)
    assert far(2) == UNKNOWN  # beyond LINEAGE_DEPTH generations: not trusted
    assert k.known("parent", 3) == {1, 2, 3} and k.failed("parent", 9, exclude=[]) == [4, 3]
    assert k.failed("parent", 3, exclude=[3]) == []


# ============================================================================================ scheduling.py


def test_priority_slots_wake_the_lowest_priority_value_first_and_fifo_among_equals():
    """scheduling.py:3-5: "We serve the oldest mutation first"; scheduling.py:51: "A counting semaphore whose
    waiters are woken lowest priority value first"."""
    order: list[str] = []

    async def scenario():
        slots = PrioritySlots(1)
        await slots.acquire(0)

        async def waiter(name, priority):
            async with slots.slot(priority):
                order.append(name)

        tasks = [asyncio.create_task(waiter(n, p)) for n, p in [("p5", 5), ("p1a", 1), ("p3", 3), ("p1b", 1)]]
        await steps(2)
        assert slots.waiting == 4
        slots.release()
        await asyncio.gather(*tasks)
        assert slots.in_use == 0 and slots.peak_in_use == 1

    asyncio.run(scenario())
    assert order == ["p1a", "p1b", "p3", "p5"]


def test_the_slot_account_integrates_use_and_demand_against_the_configured_window():
    """scheduling.py:7-11 / 26-28: "``busy`` = integral of slots in use, ``demand`` = integral of min(in use +
    waiting, window)"; "1.0 for a work-conserving scheduler"; scheduling.py:97-99: "the slot account measures
    use against the window configured at construction" (set_capacity notwithstanding)."""
    clock = FakeClock()

    async def scenario():
        slots = PrioritySlots(2, clock=clock)
        await slots.acquire(0)
        clock.t = 10
        await slots.acquire(0)
        clock.t = 20
        waiting = asyncio.create_task(slots.acquire(0))
        await steps()
        clock.t = 30
        slots.release()
        await waiting
        clock.t = 40
        slots.release()
        slots.release()
        clock.t = 50  # nothing in use or wanted: not counted
        use = slots.use()
        assert (use.busy_slot_seconds, use.demand_slot_seconds, use.seconds_with_demand) == (70, 70, 40)
        assert use.utilisation_while_work_available == 1.0
        slots.set_capacity(1)
        assert slots.use().window == 2 and slots.capacity == 1

    asyncio.run(scenario())


# ============================================================================================ selection.py


def test_the_selector_state_shows_gepas_fields_computes_the_rest_lazily_and_names_what_it_lacks():
    """selection.py:34-37: "The per-candidate fields ... are computed from ``records`` only when read";
    selection.py:47-48: records is "Not a field: asdict(), comparisons and the repr show gepa's fields only";
    selection.py:96-105: an unknown name lists what a state has; a property that raised says so."""
    records = [record(0, {"p": "s"}, [None], {0: 0.0, 1: 1.0}), record(1, {"p": "c"}, [0], {0: 1.0, 1: 1.0})]
    records[1].discovery_metric_calls = 17
    records[0].discovery_metric_calls = 5
    state = SelectorState(["p"], [{"p": "s"}, {"p": "c"}], [0.5, 1.0], [0, 0], total_num_evals=30, i=3,
                          records=records)
    assert set(dataclasses.asdict(state)) == {f.name for f in dataclasses.fields(SelectorState)}
    assert "records" not in dataclasses.asdict(state) and "records" not in repr(state)
    assert state._front_cache is None
    assert state.pareto_front_valset == {0: 1.0, 1: 1.0}
    assert state.program_at_pareto_front_valset == {0: {1}, 1: {0, 1}} and state._front_cache is not None
    assert state.num_metric_calls_by_discovery == [0, 17]
    assert state.parent_program_for_candidate == [[None], [0]]
    assert state.per_program_tracked_scores == [0.5, 1.0]
    records.append(record(2, {"p": "later"}, [1], {0: 1.0, 1: 1.0}))
    assert len(state.prog_candidate_val_subscores) == 2  # a view: later commits do not show through
    with pytest.raises(AttributeError, match="TurboGEPA's state has no 'rng1'"):
        state.rng1
    broken = SelectorState(["p"], [], [], records=[object()])
    with pytest.raises(AttributeError, match="could not be computed"):
        broken.prog_candidate_val_subscores


def test_the_round_robin_turns_per_candidate_inheritance_and_chained_turns():
    """selection.py:1: round robin "(per candidate)" (counters keyed by fingerprint); selection.py:123-124: "A new
    candidate continues its parent's round robin (gepa: max over its parents), moved on by the turns chained
    mutations already took on it"; selection.py:129-131: chained_turn; selection.py:140 / 145: after /
    counter_after."""
    sel = ComponentSelector(["a", "b", "c"], "round_robin")
    assert sel.select("p", {}, 0, (), (), None) == (["a"], 1)
    assert sel.select("p", {}, 0, (), (), None) == (["b"], 2)
    assert sel.select("q", {}, 1, (), (), None) == (["a"], 1)  # another candidate's own counter
    assert sel.chained_turn("child", 1) == ("b", 2)  # not in the pool yet: taken early
    sel.inherit("child", 1)
    assert sel.counter("child") == 2  # 1, moved on by the chained turn
    assert sel.chained_turn("child", sel.counter("child")) == ("c", 0) and sel.counter("child") == 0
    sel.inherit("child", 0)
    assert sel.counter("child") == 0  # max(0, 0)
    assert sel.after("b") == ["c", "a"] and sel.counter_after("c") == 0
    assert ComponentSelector(["a", "b"], "all").select("p", {}, 0, (), (), None) == (["a", "b"], 0)
    with pytest.raises(ValueError, match="at least one component"):
        ComponentSelector([], "round_robin")


def test_what_a_callable_selector_writes_into_the_counters_is_kept_and_unknown_names_raise():
    """selection.py:6-8: "what it writes into the round-robin counters is kept, as gepa's
    ``RoundRobinReflectionComponentSelector`` relies on"."""
    seen = []

    def selector(state, trajectories, scores, idx, candidate):
        seen.append((trajectories, scores, idx, candidate))
        state.named_predictor_id_to_update_next_for_program_candidate[idx] = 1
        return ["b"]

    sel = ComponentSelector(["a", "b"], selector)
    state = SelectorState(["a", "b"], [{"a": "1", "b": "2"}], [0.0], [0])
    assert sel.select("fp", {"a": "1", "b": "2"}, 0, ["t"], [0.5], state) == (["b"], 1)
    assert sel.counter("fp") == 1 and seen == [(["t"], [0.5], 0, {"a": "1", "b": "2"})]
    bad = ComponentSelector(["a"], lambda *args: ["zzz"])
    with pytest.raises(ValueError, match="unknown components"):
        bad.select("fp", {"a": "1"}, 0, [], [], state)


# ============================================================================================ systemic.py


def failed(i=0, failure="program_error", **kw) -> EvalOutcome:
    return EvalOutcome(i, 0.0, failure=failure, message=f"{failure} on {i}", **kw)


def test_a_fatal_failure_stops_at_once_and_the_error_is_sticky():
    """systemic.py:3-4: "a failure the evaluator marks ``fatal`` ... stops the run at its first occurrence";
    systemic.py:148-149: "once anything raised, every later call re-raises the same error"."""
    d = SystemicFailureDetector(8)
    d.observe(EvalOutcome(0, 1.0))
    with pytest.raises(SystemicFailureError) as info:
        d.observe(failed(1, fatal=True, error_type="AuthenticationError"))
    assert info.value.failure == "program_error" and info.value.error_type == "AuthenticationError"
    with pytest.raises(SystemicFailureError) as again:
        d.observe(EvalOutcome(2, 1.0))
    assert again.value is info.value
    with pytest.raises(SystemicFailureError) as third:
        d.observe_proposal(ProposalOutcome(texts={"a": "x"}))
    assert third.value is info.value


def test_the_first_window_of_a_split_all_failing_stops_naming_the_most_common_cause_per_split():
    """systemic.py:4-7: "if the first ``window`` executed evaluations of a split all fail, whatever the cause,
    the run stops too, naming the most common cause. Once an evaluation of a split has succeeded, isolated
    failures there are ordinary data"; systemic.py:9: "The rule is per split"."""
    d = SystemicFailureDetector(3)
    d.observe(failed(0, "metric_error", error_type="KeyError"), split="train")
    d.observe(failed(1), split="train")
    with pytest.raises(SystemicFailureError) as info:
        d.observe(failed(2, "metric_error", error_type="KeyError"), split="train")
    assert info.value.failure == "metric_error" and info.value.error_type == "KeyError"
    d = SystemicFailureDetector(3)
    d.observe(EvalOutcome(0, 1.0), split="val")
    for i in range(20):
        d.observe(failed(i), split="val")  # ordinary data once the split has a success
    d.observe(failed(0), split="train")
    d.observe(failed(1), split="train")
    with pytest.raises(SystemicFailureError, match="trainset"):
        d.observe(failed(2), split="train")  # the valset's success does not hide a broken trainset


def test_format_errors_alone_wait_for_candidates_reflected_from_them():
    """systemic.py:16-18: "While every failure seen is a format error, the run stops only once candidates
    reflected from them failed too (``FORMAT_ERROR_CANDIDATES`` in all, the seed included)"."""
    d = SystemicFailureDetector(3)
    for i in range(10):
        d.observe(failed(i, "format_error"), candidate="seed")
    for i in range(10):
        d.observe(failed(i, "format_error"), candidate="child1")
    with pytest.raises(SystemicFailureError) as info:
        d.observe(failed(0, "format_error"), candidate="child2")
    assert FORMAT_ERROR_CANDIDATES == 3 and info.value.failure == "format_error"


def test_an_outage_stops_the_run_after_a_long_enough_streak_whatever_succeeded_before():
    """systemic.py:20-25: "once ``outage_window`` evaluations in a row failed because the service did ..., over
    at least ``OUTAGE_MIN_SECONDS`` ..., the run stops, whatever succeeded before"; systemic.py:229-230: "a
    streak of service failures, broken by any evaluation the service answered (a success, or a failure of
    the program or the metric)"."""
    clock = FakeClock()
    d = SystemicFailureDetector(3, outage_window=4, clock=clock, outage_min_seconds=100.0)
    d.observe(EvalOutcome(0, 1.0))
    for t in (0, 50, 99, 99.5, 99.9):  # 5 in a row, but within 100 s
        clock.t = t
        d.observe(failed(1, service_failure=True))
    clock.t = 101
    d.observe(failed(1))  # the program's own failure: the service answered
    for t in (102, 150, 200):
        clock.t = t
        d.observe(failed(1, service_failure=True))
    clock.t = 202
    with pytest.raises(SystemicFailureError, match="because the LM service did"):
        d.observe(failed(1, service_failure=True))  # 4 in a row over 100 s


def test_reflections_stop_the_run_when_fatal_or_when_the_first_ones_all_fail():
    """systemic.py:28-30: "a fatal proposer failure stops the run, and so do ``window`` failed reflections
    before the first usable one"; systemic.py:54: PROPOSER_FAILURES: "Skip reasons that mean the proposer
    itself failed (not "nothing to reflect on")"; observe_proposal: an unchanged answer "counts as a failed
    reflection"; config.py:162: the proposal window defaults to "the evaluation window, at most 8"."""
    assert SystemicFailureDetector(20).proposal_window == MAX_PROPOSAL_WINDOW == 8
    assert SystemicFailureDetector(3).proposal_window == 3
    d = SystemicFailureDetector(3)
    with pytest.raises(SystemicFailureError) as info:
        d.observe_proposal(ProposalOutcome(skipped="proposer_error", fatal=True, error_type="AuthenticationError"))
    assert info.value.failure == "proposer_error" and info.value.error_type == "AuthenticationError"
    d = SystemicFailureDetector(3)
    for _ in range(10):
        d.observe_proposal(ProposalOutcome(skipped=NOTHING_TO_REFLECT_ON))
    d.observe_proposal(ProposalOutcome(skipped="empty_proposal"))
    d.observe_proposal(ProposalOutcome(texts={"a": "x"}), unchanged=True)
    with pytest.raises(SystemicFailureError) as info:
        d.observe_proposal(ProposalOutcome(texts={"a": "y"}), unchanged=True)
    assert info.value.failure == "unchanged_texts"
    d = SystemicFailureDetector(3)
    d.observe_proposal(ProposalOutcome(skipped="proposer_error"))
    d.observe_proposal(ProposalOutcome(texts={"a": "x"}))
    for _ in range(10):
        d.observe_proposal(ProposalOutcome(skipped="proposer_error"))  # after a usable one: never


def test_small_splits_expected_failures_resume_and_the_final_check():
    """systemic.py:100-104: "A split smaller than ``window`` is judged once every one of its examples has
    failed"; expected failures "never fill the first-N window"; systemic.py:126-128: after a success in an
    earlier session "the first-N rule does not apply to that split again"; systemic.py:252-258: check_final
    stops "even where it was still waiting for reflection to fix a format error", and "one success anywhere
    ... means the setup can work"."""
    d = SystemicFailureDetector(8, split_sizes={"train": 3}, expected_failures={"train": [2]})
    for _ in range(5):
        d.observe(failed(0), split="train")  # repeats are no new evidence
        d.observe(failed(2), split="train")  # known to fail: not counted
    with pytest.raises(SystemicFailureError):
        d.observe(failed(1), split="train")  # every example not known to fail has failed
    d = SystemicFailureDetector(2)
    d.resume(["train"], proposal_succeeded=False)
    for i in range(10):
        d.observe(failed(i), split="train")
    d = SystemicFailureDetector(2)
    d.observe(failed(0, "format_error"), candidate="seed")
    d.observe(failed(1, "format_error"), candidate="seed")
    with pytest.raises(SystemicFailureError, match="format_error"):
        d.check_final()
    d = SystemicFailureDetector(2)
    d.observe(failed(0, "format_error"), candidate="seed", split="train")
    d.observe(EvalOutcome(0, 1.0), split="val")
    d.check_final()


# ============================================================================================ types.py


def test_the_rate_limit_cap_is_10_retries_or_5_minutes_and_the_protocols_are_runtime_checkable():
    """types.py:21: "rate_limited: the LM kept answering 429 past the retry cap (10 retries / 5 minutes)";
    types.py:91 / 100: Evaluator and Reflector are (runtime-checkable) protocols."""
    from dspy_turbogepa.adapter.ratelimit import RATE_LIMIT_POLICY

    assert (RATE_LIMIT_POLICY.max_retries, RATE_LIMIT_POLICY.max_elapsed_s) == (10, 300.0)
    assert isinstance(FakeEvaluator(KeywordTask()), Evaluator) and isinstance(FakeReflector(), Reflector)
    assert not isinstance(object(), Evaluator)


# ============================================================================================ width.py


def test_the_mutation_width_follows_one_over_the_success_rate_within_its_bounds_and_the_budget():
    """width.py:27-35: the width "follows ``1 / p`` ... within ``[min_mutations_in_flight,
    max_mutations_in_flight]``"; "the width never exceeds what the ``remaining`` budget pays for at
    GENERATIONS_TO_AFFORD more generations of accepted children (a small budget runs one mutation at a
    time)"; width.py:37: fixed when adaptive_width is off."""
    c = cfg(max_mutations_in_flight=8, min_mutations_in_flight=2, reflection_minibatch_size=3)
    big = 10**6
    assert mutation_width(c, 9, 10, big, 10) == 2  # p = 10/12: floor 2
    assert mutation_width(c, 2, 10, big, 10) == 4  # p = 3/12
    assert mutation_width(c, 0, 40, big, 10) == 8  # capped
    per_child = 2 * 3 + 10
    assert mutation_width(c, 0, 40, 3 * GENERATIONS_TO_AFFORD * per_child, 10) == 3
    assert mutation_width(c, 0, 40, 10, 10) == 1  # below the floor when the budget is small
    assert mutation_width(cfg(max_mutations_in_flight=5, adaptive_width=False), 0, 40, 1, 10) == 5


def test_siblings_start_at_one_follow_the_pass_rate_and_shrink_with_the_budget():
    """width.py:53-56: "k is ``floor(1 / p)`` ... so it stays 1 while most reflections succeed; and it shrinks
    when the ``remaining`` budget could no longer pay for GENERATIONS_TO_AFFORD more such steps"; width.py:60:
    "prior: 2 of 3 succeed, so a run starts with one reflection per step"; capped by max_siblings and the
    reflections in flight; config.py:129: "1 disables it"."""
    c = cfg(max_siblings=4, max_reflections_in_flight=3, reflection_minibatch_size=3)
    big = 10**6
    assert sibling_count(c, 0, 0, big, 10) == 1
    assert sibling_count(c, 1, 7, big, 10) == 3  # p = 3/10 -> 3
    assert sibling_count(c, 0, 30, big, 10) == 3  # capped by the reflections in flight
    assert sibling_count(cfg(max_siblings=4, max_reflections_in_flight=8), 0, 30, big, 10) == 4
    assert sibling_count(c, 0, 30, GENERATIONS_TO_AFFORD * (3 * 3 + 10), 10) == 2
    assert sibling_count(c, 0, 30, GENERATIONS_TO_AFFORD * (3 * 3 + 10) - 1, 10) == 1
    assert sibling_count(cfg(max_siblings=1), 0, 30, big, 10) == 1


# ============================================================================================ orchestrator.py


def test_sibling_orders_are_distinct_for_up_to_two_n_siblings_and_the_first_is_as_drawn():
    """orchestrator.py:82-83: "The ``j``-th sibling's order of the minibatch: rotated by ``j``, reversed from the
    ``n``-th on, so up to ``2 * n`` siblings each see a distinct order (sibling 0 sees the minibatch as
    drawn)" (n >= 3)."""
    for n in (3, 4, 5, 8):
        items = list(range(n))
        orders = [tuple(sibling_order(items, j)) for j in range(2 * n)]
        assert orders[0] == tuple(items) and len(set(orders)) == 2 * n


def test_two_item_minibatches_give_two_distinct_sibling_orders_as_documented():
    """orchestrator.py sibling_order (corrected after this review): "up to ``2 * n`` siblings each see a
    distinct order when ``n >= 3`` (two items have only two orders ...)". It claimed 2 * n for any n."""
    assert len({tuple(sibling_order(["x", "y"], j)) for j in range(4)}) == 2
    assert "n >= 3" in " ".join((sibling_order.__doc__ or "").split())


def test_a_proposal_key_names_parent_components_minibatch_and_seed_and_the_pooled_view_is_a_prefix():
    """orchestrator.py:102: "same parent, components, minibatch and seed -> same proposal" (and any change, a
    different one); orchestrator.py:108: _PooledBefore holds "The fingerprints of the pool's first ``n``
    candidates"."""
    key = proposal_key("fp", ["a"], [1, 2], 7)
    assert key == proposal_key("fp", ("a",), (1, 2), 7)
    assert len({key, proposal_key("fp2", ["a"], [1, 2], 7), proposal_key("fp", ["b"], [1, 2], 7),
                proposal_key("fp", ["a"], [2, 1], 7), proposal_key("fp", ["a"], [1, 2], 8)}) == 5
    view = _PooledBefore({"x": 0, "y": 1, "z": 2}, 2)
    assert "x" in view and "y" in view and "z" not in view and "w" not in view and 3 not in view


def test_a_fixed_width_run_plans_mutation_k_from_the_first_k_minus_width_plus_one_commits():
    """orchestrator.py:7-9 (and history.py:3-4): "in deterministic mode ... mutation ``k`` is planned from the
    state after exactly the first ``k - width + 1`` commits"; observer.py:27: on_mutation is called when "A
    mutation was committed, whatever its outcome"."""
    rec = Recorder()
    setup = hard_setup(train_n=24, val_n=8)
    result, *_ = run_fakes(make_config(max_metric_calls=2000, max_mutations_in_flight=3, adaptive_width=False,
                                       rung_fractions=(0.5, 1.0)), setup, sleep_seed=5,
                           observers=[rec, StopAfter(15)])
    assert len(rec.results) >= 15 and len({r.status for r in rec.results}) >= 2
    assert [r.plan.view for r in rec.results] == [max(0, r.plan.seq - 2) for r in rec.results]
    assert [r.plan.seq for r in rec.results] == list(range(len(rec.results)))
    assert len(rec.results) == sum(result.stats.mutations.values())


def test_with_the_default_adaptive_width_mutation_k_is_planned_from_at_least_k_minus_width_plus_one(monkeypatch):
    """orchestrator.py:7-10 (corrected after this review): mutation ``k`` is planned from the state after "the
    first ``k - width + 1`` commits (or more when the width changed: a view never goes back, so it is the
    later of that and the previous launch's)". It said "exactly"; here mutation 57 at width 6 was planned
    from 53 commits. Chained mutations, planned one commit earlier on purpose, left out."""
    planned: list[tuple[int, int, int, int | None]] = []
    real = orchestrator_module.Orchestrator._plan

    def recording(self, seq, n_commits, chain_on=None):
        planned.append((seq, n_commits, self.width(), chain_on))
        return real(self, seq, n_commits, chain_on)

    monkeypatch.setattr(orchestrator_module.Orchestrator, "_plan", recording)
    setup = hard_setup(train_n=40, val_n=16, num_keywords=12)
    run_fakes(make_config(max_metric_calls=3000, max_mutations_in_flight=8, rung_fractions=(0.5, 1.0)), setup,
              sleep_seed=4, observers=[StopAfter(60)])
    unchained = [(seq, view, width) for seq, view, width, chain_on in planned if chain_on is None]
    assert len(unchained) > 50 and len({width for _, _, width in unchained}) > 1
    floors = [max(0, seq - width + 1) for seq, _, width in unchained]
    views = [view for _, view, _ in unchained]
    assert all(view >= floor for view, floor in zip(views, floors))
    assert views == sorted(views)  # never goes back
    assert views != floors  # the width changed and a view stayed ahead of its floor
    assert all(view == max(floor, prev) for view, floor, prev in zip(views[1:], floors[1:], views))


def test_stop_callbacks_are_asked_once_before_the_first_mutation_and_after_each_commit():
    """orchestrator.py:385-387: "Ask gepa's stop callbacks, once per iteration as gepa does: once before the
    first mutation ... and after each committed mutation, whatever its outcome"."""
    seen: list[int] = []

    def stopper(state):
        seen.append(state.i)
        return len(seen) >= 7

    result, *_ = run_fakes(make_config(max_metric_calls=2000, stop_callbacks=(stopper,)), hard_setup(), sleep_seed=2)
    assert seen == [-1, 0, 1, 2, 3, 4, 5] and result.stop_reason == "stop_callback"


def test_a_stop_callback_raising_at_its_first_ask_is_systemic_and_later_stops_the_run_as_if_it_asked():
    """orchestrator.py:407-418: a callback that raised "when first asked, before any mutation" is a
    SystemicFailureError (failure stop_callback_error); later, "The rule can no longer be checked: stop as if
    it had asked to ..., keeping what the run found"."""

    def broken(state):
        raise ZeroDivisionError("bad rule")

    with pytest.raises(SystemicFailureError) as info:
        run_fakes(make_config(stop_callbacks=(broken,)), hard_setup())
    assert (info.value.failure, info.value.error_type) == ("stop_callback_error", "ZeroDivisionError")

    def breaks_later(state):
        if state.i >= 2:
            raise ZeroDivisionError("bad rule")
        return False

    result, *_ = run_fakes(make_config(max_metric_calls=2000, stop_callbacks=(breaks_later,)), hard_setup(),
                           sleep_seed=1)
    assert result.stop_reason == "stop_callback" and result.records


def test_the_time_budget_launches_nothing_after_it_and_lets_the_work_in_flight_finish(monkeypatch):
    """config.py:148-149: "At ``max_seconds`` nothing new is launched and the work in flight finishes"
    (orchestrator.py:431: "checked before every launch"); the stop reason names it."""
    clock = FakeClock()
    launched_at: list[float] = []
    real_launch = orchestrator_module.Orchestrator._launch

    def launch(self, plan):
        launched_at.append(clock.t)
        real_launch(self, plan)

    monkeypatch.setattr(orchestrator_module.Orchestrator, "_launch", launch)

    def tick(evaluator, key):
        clock.t += 1.0  # every evaluation takes a second

    setup = hard_setup()
    rec = Recorder()
    orch = orchestrator_module.Orchestrator(make_config(max_metric_calls=5000, max_seconds=40.0),
                                            FakeEvaluator(setup.task, 1, on_call=tick), FakeReflector(1),
                                            setup.seed(), setup.train_ids, setup.val_ids, observers=[rec], clock=clock)
    result = run(orch)
    assert result.stop_reason == "time_budget" and clock.t > 40.0
    assert launched_at and max(launched_at) < 40.0
    assert len(rec.results) == len(launched_at) and "cancelled" not in {r.status for r in rec.results}


def test_a_proposer_that_keeps_rebuilding_known_candidates_stops_the_run_after_max_paid_noop_mutations():
    """config.py:155-158: "Stop after this many consecutive mutations that evaluated nothing new and found
    nothing. ... and after this many of them in a row whose proposer answered (a reflection that rebuilt a
    known candidate)"."""
    setup = hard_setup(train_n=6, val_n=4)
    rec = Recorder()
    reflector = FakeReflector(fixed={"instr": "base kw0 kw1"})
    config = make_config(max_metric_calls=100_000, max_paid_noop_mutations=6, max_noop_mutations=1000)
    result, *_ = run_fakes(config, setup, sleep_seed=1, reflector=reflector, observers=[rec])
    assert result.stop_reason == "no_progress_possible"
    # after the one accepted child every answer rebuilds a known candidate (paid, nothing new)
    noop = [r.status not in ("accepted",) and r.proposals_answered > 0 for r in rec.results]
    streak = max(len(list(g)) for k, g in itertools.groupby(noop) if k)
    assert streak >= 6 and len(rec.results) <= 6 + 2 + config.max_mutations_in_flight  # not max_noop_mutations


def test_cancel_in_flight_before_the_loop_exists_interrupts_the_seed_and_a_late_stop_is_a_no_op():
    """orchestrator.py:273-275: "Flags first ...: before the loop exists ``_call_on_loop`` is a no-op, and run()
    checks the flag once its seed task exists"; errors.py:43-44 (RunInterruptedError); orchestrator.py:289:
    ``_call_on_loop`` is "a no-op once the loop is closed"."""
    setup = Setup()
    early = build(make_config(), FakeEvaluator(setup.task), FakeReflector(), setup)
    early.cancel_in_flight()
    with pytest.raises(RunInterruptedError):
        run(early)
    done = build(make_config(max_metric_calls=len(setup.val_ids)), FakeEvaluator(setup.task), FakeReflector(), setup)
    assert run(done).records
    done.request_stop()
    done.cancel_in_flight()


def test_a_budget_below_the_seeds_validation_is_refused():
    """orchestrator.py:351-356 (_evaluate_seed): a budget that "cannot pay for the seed's full-validation
    evaluation" raises ValueError before anything is evaluated."""
    setup = Setup()
    ev = FakeEvaluator(setup.task)
    with pytest.raises(ValueError, match="cannot pay for the seed's full-validation"):
        run(build(make_config(max_metric_calls=len(setup.val_ids) - 1), ev, FakeReflector(), setup))
    assert ev.unique_pairs == 0


def test_a_records_outputs_keep_a_none_answer_and_skip_a_failure_without_one():
    """orchestrator.py:1410: "a program that answered None answered; a failure without an output has none"."""

    class OutputEvaluator:
        async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
            await steps()
            return {0: EvalOutcome(0, 1.0, output=None), 1: EvalOutcome(1, 0.0, failure="program_error"),
                    2: EvalOutcome(2, 0.0, failure="format_error", output="partial")}[example_id]

    setup = Setup(val_ids=(0, 1, 2))
    result = run(build(make_config(max_metric_calls=3), OutputEvaluator(), FakeReflector(), setup))
    assert result.records[0].val_outputs == {0: None, 2: "partial"}


def test_which_outcomes_inform_sampling_teach_a_reflection_and_beat_a_parent():
    """orchestrator.py:1104-1107 (_informative): "a metric that raised ... or the LM service's failure does
    not"; orchestrator.py:1110-1111 (_teaches): "A failure a reflection can learn from: traced, not a metric
    that raised, and not the LM service's"; orchestrator.py:1225: "GEPA's rung-0 test: strictly better on the
    minibatch (or tied, with accept_equal_on_minibatch)"."""
    setup = Setup()
    strict = build(make_config(), FakeEvaluator(setup.task), FakeReflector(), setup)
    lax = build(make_config(accept_equal_on_minibatch=True), FakeEvaluator(setup.task), FakeReflector(), setup)
    informative = strict._informative
    assert informative(failed(0)) and informative(EvalOutcome(0, 0.3))
    assert not informative(failed(0, "metric_error")) and not informative(failed(0, service_failure=True))
    teaches = strict._teaches
    assert teaches(EvalOutcome(0, 0.5, trajectory="t")) and teaches(EvalOutcome(0, 0.0, trace_lost=True))
    assert not teaches(EvalOutcome(0, 1.0, trajectory="t")) and not teaches(EvalOutcome(0, 0.0))
    assert not teaches(failed(0, "metric_error", trajectory="t"))
    assert not teaches(failed(0, service_failure=True, trajectory="t"))
    assert strict._beats_parent(2.0, 1.0) and not strict._beats_parent(1.0, 1.0)
    assert lax._beats_parent(1.0, 1.0) and not lax._beats_parent(0.9, 1.0)


def test_a_round_robin_turn_on_a_predictor_with_nothing_to_reflect_on_passes_to_the_next_one():
    """orchestrator.py:1021-1024: "A round-robin turn on a predictor that did not run on any example read ...
    passes to the next predictor, on the same minibatch"."""

    class BlindToA(FakeReflector):
        async def reflect(self, parent_texts, components, outcomes, seed):
            if tuple(components) == ("a",):
                asked.append((tuple(components), seed))
                return ProposalOutcome(skipped=NOTHING_TO_REFLECT_ON, message="no trace of a")
            asked.append((tuple(components), seed))
            return await super().reflect(parent_texts, components, outcomes, seed)

    asked: list[tuple[tuple[str, ...], int]] = []
    setup = hard_setup(components=("a", "b"))
    result, *_ = run_fakes(make_config(max_metric_calls=2000, max_siblings=1), setup, sleep_seed=1,
                           reflector=BlindToA(1), observers=[StopAfter(12)])
    turns_on_a = [k for k, (comps, _) in enumerate(asked) if comps == ("a",)]
    assert turns_on_a
    for k in turns_on_a:  # the same reflection (same seed) is asked again about "b"
        assert any(comps == ("b",) and seed == asked[k][1] for comps, seed in asked[k + 1:])
    assert result.stats.proposal_skips[NOTHING_TO_REFLECT_ON] == len(turns_on_a)


def test_a_mutation_that_raises_ends_a_deterministic_run_whatever_its_position():
    """orchestrator.py:635: "A mutation that raised (a systemic failure) ends the run at once, whatever its
    position" (mutation 1 fails fatally while mutation 0 is still waiting on its evaluations)."""
    train_calls = [0]
    never = {}

    async def gate(fp, split, example_id):
        if split != "train":
            return
        train_calls[0] += 1
        if train_calls[0] <= 3:  # mutation 0's minibatch: held forever
            never.setdefault("event", asyncio.Event())
            await never["event"].wait()

    def fail(texts, split, example_id):
        return ("program_error", "AuthenticationError", True) if split == "train" else None

    setup = hard_setup(train_n=12)
    ev = FakeEvaluator(setup.task, gate=gate, fail=fail)
    config = make_config(max_mutations_in_flight=2, adaptive_width=False, minibatch_sampling="epoch")
    try:
        with pytest.raises(SystemicFailureError) as info:
            run(build(config, ev, FakeReflector(), setup), timeout=10)
    except RunTimeout:  # pragma: no cover - the failure this test exists for
        pytest.fail("the run waited for mutation 0 instead of ending on mutation 1's systemic failure")
    assert info.value.error_type == "AuthenticationError" and train_calls[0] >= 4


# ============================================================================================ proposers/context_fit.py


def test_the_context_window_is_bisected_between_what_fitted_and_what_was_refused():
    """context_fit.py:11-16: "Until a refusal every example is shown ... After one, a reflection shows what fits
    in a size bisected between the largest size that fitted and the smallest refused (half the refused size
    before anything fitted) ... A prompt above the smallest refusal that fits anyway ... moves that refusal
    up, just above it"; context_fit.py:88: known_fit "(0: none)"; a new smaller refusal forgets what
    fitted above it (context_fit.py:78)."""
    fit, unit = ContextFit(), ("p",)
    assert fit.budget(unit) is None and fit.known_fit(unit) == 0
    fit.refused(unit, 1000)
    assert fit.budget(unit) == 500
    fit.fitted(unit, 400)
    assert fit.budget(unit) == 700 and fit.known_fit(unit) == 400
    fit.refused(unit, 1200)  # not the smallest: the smallest refusal stands
    assert fit.budget(unit) == 700
    fit.fitted(unit, 1100)  # above the refusal and fitted: the refusal moves just above it
    assert fit.budget(unit) == 1100 and fit.known_fit(unit) == 1100
    fit.refused(unit, 900)
    assert fit.budget(unit) == 450 and fit.known_fit(unit) == 0
    assert fit.budget(("other",)) is None


def test_choose_shows_every_example_without_a_budget_else_failures_first_that_fit_else_the_shortest():
    """context_fit.py:99-101: "Positions of the examples to show, in their original order: all of them without
    a budget; else the failures first (lowest score, then earliest), each that still fits in ``budget``
    characters of examples, and if none fits, the shortest one"."""
    assert choose([1.0, 0.0, 0.5], [10, 10, 10], None) == [0, 1, 2]
    assert choose([1.0, 0.0, 0.5, 0.0], [10, 10, 10, 10], 25) == [1, 3]
    assert choose([0.0, 0.5, 1.0], [30, 10, 5], 20) == [1, 2]  # a later, shorter one still fits
    assert choose([0.0, 0.0, 0.0], [10, 7, 9], 5) == [1]


def test_a_shared_size_gives_each_predictor_its_smallest_prompt_then_the_smallest_needs_first():
    """context_fit.py:23-24 / 126-127: "each predictor first gets its smallest prompt, the rest goes to those
    that need more, smallest need first", "so one that fits keeps them all"; context_fit.py:140-141
    (_share): "each need is met while an equal share of what is left covers it; the largest take the rest"."""
    assert _share(300, [10, 100, 1000]) == [10, 100, 190]
    assert _share(300, [1000, 10, 100]) == [190, 10, 100]
    assert _share(30, [100, 100, 100]) == [10, 10, 10]
    examples = {"a": [Example(0.0, 100)] * 3, "b": [Example(0.0, 5), Example(1.0, 5)]}
    instructions = {"a": 10, "b": 10}
    assert plan(instructions, examples, None) == {"a": [0, 1, 2], "b": [0, 1]}
    shown = plan(instructions, examples, 150)  # smallest prompt 125: b needs 5 more, a gets the other 20
    assert shown["b"] == [0, 1] and len(shown["a"]) == 1
    assert plan(instructions, examples, 0) == {"a": [0], "b": [0]}  # at least the smallest prompt


def _records(n: int, size: int):
    return [(i, {"Inputs": {"x": "y" * size}, "Feedback": f"wrong {i}"}) for i in range(n)]


@pytest.mark.parametrize("window", [60_000, 20_000, 5_000, 1_200])
def test_a_refused_reflection_retries_a_logarithmic_number_of_times_and_gives_up_only_on_its_smallest_prompt(
        window):
    """context_fit.py:19-22: "Within one reflection each retry halves the gap between what it knows fits and the
    smallest size refused in it ..., so it makes a logarithmic number of calls at most, and it gives up only
    when its smallest possible prompt (each predictor's instruction and shortest example) was refused"."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    sizes: list[int] = []

    def proposal_fn(candidate, reflective_dataset, components_to_update):
        size = len(candidate["p"]) + sum(len(str(r)) for r in reflective_dataset["p"])
        sizes.append(size)
        if size > window:
            raise dspy.ContextWindowExceededError(model="m", message="maximum context length exceeded")
        return {"p": candidate["p"] + " better"}

    dataset = {"p": _records(64, 1_000)}
    smallest = len("instr") + min(len(str(r)) for _, r in dataset["p"])
    proposer = ReflectiveProposer(None, proposal_fn, None, max_workers=1)
    try:
        outcome = proposer._propose({"p": "instr"}, dataset, [0.0] * 64, ["p"])
    finally:
        proposer.close()
    assert len(sizes) <= math.ceil(math.log2(sizes[0])) + 2
    if smallest <= window:
        assert outcome.skipped is None and sizes[-1] <= window
    else:
        assert outcome.skipped == "proposer_error" and "even 1 example" in outcome.message
        assert min(sizes) == smallest


# ============================================================================================ proposers/reflection.py


class FakeBuilder:
    """A ReflectiveDatasetBuilder stand-in: one record per traced outcome, for every component."""

    def __init__(self, raise_exc=None) -> None:
        self.raise_exc = raise_exc
        self.lm_seen: list = []

    def build_indexed(self, components, trajectories, scores, rng, texts=None):
        self.lm_seen.append(dspy.settings.lm)
        if self.raise_exc is not None:
            raise self.raise_exc
        return {c: [(k, {"trace": t, "score": s}) for k, (t, s) in enumerate(zip(trajectories, scores))
                    if t is not None] for c in components if any(t is not None for t in trajectories)}

    def skipped_counts(self):
        return {}


def test_dspys_proposer_and_subclasses_keeping_its_call_are_asked_per_predictor_others_all_at_once():
    """reflection.py:10-14: "dspy's own proposer (or a subclass that keeps its ``__call__``; one that overrides
    it may rewrite the predictors together) is asked one predictor at a time ...; a custom proposer is asked
    with every predictor at once"."""
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    class Keeps(InstructionProposer):
        pass

    class Overrides(InstructionProposer):
        def __call__(self, candidate, reflective_dataset, components_to_update):
            return {}

    expected = {InstructionProposer(): True, Keeps(): True, Overrides(): False, (lambda **kw: {}): False}
    for proposal_fn, per_component in expected.items():
        proposer = ReflectiveProposer(None, proposal_fn, None, max_workers=1)
        proposer.close()
        assert proposer._per_component is per_component, proposal_fn

    asked: list[list[str]] = []

    def custom(candidate, reflective_dataset, components_to_update):
        asked.append(list(components_to_update))
        return {c: candidate[c] + "!" for c in components_to_update}

    proposer = ReflectiveProposer(None, custom, None, max_workers=1)
    outcome = proposer._propose({"a": "A", "b": "B"}, {"a": _records(2, 5), "b": _records(2, 5)}, [0.0, 0.0],
                                ["a", "b"])
    proposer.close()
    assert asked == [["a", "b"]] and dict(outcome.texts) == {"a": "A!", "b": "B!"}


def test_per_predictor_a_failing_unit_fails_the_whole_proposal():
    """reflection.py:210-211 (_propose): "Ask the proposer, in units ...; any other failure of a unit fails the
    whole proposal, as dspy.GEPA's does"."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    asked: list[list[str]] = []

    def fn(candidate, reflective_dataset, components_to_update):
        asked.append(list(components_to_update))
        if components_to_update == ["b"]:
            raise ValueError("bad answer for b")
        return {c: candidate[c] + "!" for c in components_to_update}

    proposer = ReflectiveProposer(None, fn, None, max_workers=1)
    proposer._per_component = True  # as for dspy's own proposer
    outcome = proposer._propose({"a": "A", "b": "B"}, {"a": _records(1, 5), "b": _records(1, 5)}, [0.0], ["a", "b"])
    proposer.close()
    assert asked == [["a"], ["b"]]
    assert outcome.skipped == "proposer_error" and not outcome.texts and outcome.error_type == "ValueError"


def test_a_proposer_that_raises_or_answers_nothing_usable_is_recorded_and_skipped():
    """reflection.py:6-7: "A proposer that raises or answers with nothing usable is recorded and skipped; it
    never ends the run" (unknown components and empty texts are dropped, with a note)."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer, _validate_answer

    assert _validate_answer("text", {"a": "x"}).skipped == "invalid_proposal"
    assert _validate_answer({"a": "  "}, {"a": "x"}).skipped == "empty_proposal"
    assert _validate_answer({}, {"a": "x"}).skipped == "empty_proposal"
    partial = _validate_answer({"a": "new", "zzz": "y", "b": 3}, {"a": "x", "b": "y"})
    assert partial.skipped is None and dict(partial.texts) == {"a": "new"} and "zzz" in partial.message

    def raising(**kwargs):
        raise KeyError("the proposer broke")

    proposer = ReflectiveProposer(None, raising, None, max_workers=1)
    outcome = proposer._propose({"a": "x"}, {"a": _records(1, 5)}, [0.0], ["a"])
    proposer.close()
    assert outcome.skipped == "proposer_error" and outcome.error_type == "KeyError" and not outcome.fatal


def test_a_reflection_runs_on_a_worker_thread_under_the_reflection_lm_and_its_dataset_outside_it():
    """reflection.py:4-5: "It runs in a worker thread (proposers are synchronous DSPy code) under
    ``dspy.context(lm=reflection_lm)``"; reflection.py:157-159: "The reflective dataset is built outside the
    reflection LM's context, as dspy.GEPA builds it: the metric's feedback call ... runs on the user's own LM
    settings"."""
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer
    from dspy_turbogepa.testing import make_reflection_lm, make_student_lm

    student, reflection_lm = make_student_lm(), make_reflection_lm()
    seen = {}

    def fn(candidate, reflective_dataset, components_to_update):
        seen["thread"] = threading.current_thread().name
        seen["lm"] = dspy.settings.lm
        return {"a": "improved"}

    builder = FakeBuilder()
    proposer = ReflectiveProposer(builder, fn, reflection_lm, max_workers=1)
    try:
        with dspy.context(lm=student):
            outcome = asyncio.run(proposer.reflect({"a": "x"}, ["a"], [EvalOutcome(0, 0.0, trajectory="t")], 1))
    finally:
        proposer.close()
    assert dict(outcome.texts) == {"a": "improved"}
    assert seen["thread"].startswith("turbogepa-reflect") and seen["thread"] != threading.current_thread().name
    assert seen["lm"].model == reflection_lm.model != student.model
    assert builder.lm_seen == [student]


@pytest.mark.parametrize("builder, skipped", [
    (lambda: FakeBuilder(), NOTHING_TO_REFLECT_ON),
    (lambda: FakeBuilder(RuntimeError("broken trace")), "reflective_dataset_error"),
    ("feedback", "feedback_error"),
], ids=["no-traces", "builder-raises", "feedback-raises"])
def test_a_reflection_without_a_usable_dataset_is_skipped_with_its_cause(builder, skipped):
    """reflection.py:188-189 (_dataset): "The reflective dataset ..., or the skipped proposal that says why there
    is none": no usable trace records -> NOTHING_TO_REFLECT_ON ("it costs nothing", types.py:64), the metric's
    feedback call raising -> feedback_error, anything else -> reflective_dataset_error."""
    from dspy_turbogepa.adapter.reflective import FeedbackMetricError
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    if builder == "feedback":
        made = FakeBuilder(FeedbackMetricError("metric raised", error_type="KeyError"))
    else:
        made = builder()
    called = []
    proposer = ReflectiveProposer(made, lambda **kw: called.append(kw) or {}, None, max_workers=1)
    outcomes = [EvalOutcome(0, 0.0, trajectory=None)] if skipped == NOTHING_TO_REFLECT_ON else \
        [EvalOutcome(0, 0.0, trajectory="t")]
    outcome = proposer._dataset({"a": "x"}, ["a"], outcomes, random.Random(0))
    proposer.close()
    assert isinstance(outcome, ProposalOutcome) and outcome.skipped == skipped and not called
    if skipped == "feedback_error":
        assert outcome.error_type == "KeyError"


def test_once_the_run_stops_a_rate_limited_reflection_gives_up_instead_of_waiting():
    """reflection.py:117: stop(): "The run is stopping: reflections waiting out a rate limit give up (recorded as
    skipped)"; reflection.py:287: "Rate limits and transient failures are asked again here, within the
    proposal's retry policy" (not once the run stopped)."""
    from dspy import lm15

    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    calls = [0]

    def limited(**kwargs):
        calls[0] += 1
        raise lm15.RateLimitError("slow down", status=429, retry_after=0.0)

    proposer = ReflectiveProposer(None, limited, None, max_workers=1)
    proposer.stop()
    outcome = proposer._propose({"a": "x"}, {"a": _records(1, 5)}, [0.0], ["a"])
    stats = proposer.rate_limit_stats()
    proposer.close()
    assert calls[0] == 1 and outcome.skipped == "proposer_error" and not outcome.fatal
    assert stats["rate_limited"] == 1 and stats["rate_limit_retries"] == 0 and stats["rate_limit_gave_up"] == 1
