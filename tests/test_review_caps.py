"""Review of the whole-run token / dollar caps checked at each paid LM call (commits 13120d8, 832f6ed,
f784a60): ``PaidCallRefused``, ``all_of``, the paid gate in ``EvaluationCache.one`` and ``_propose``, and
a resumed run's usage starting from every stored row (``RunStore.total_usage``).

The review found bugs, each pinned by a test here that failed before its fix: a rerun of a capped run
returning less than the run found; usage of re-run rows lost from the third session on; a refusal hiding a
systemic failure; refused calls charged as metric calls; a masked trace re-run raising KeyError in another
mutation's feedback reuse. The other tests pin behaviour that was checked and holds. Fake in-process LMs
and the engine's pure-Python fakes only; no sleeps for ordering.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from typing import Any

import dspy
import pytest
from engine.fakes import (
    FakeEvaluator,
    FakeReflector,
    KeywordTask,
    RunTimeout,
    Setup,
    make_config,
    run,
    with_hidden,
)

from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.engine import EngineObserver, Orchestrator
from dspy_turbogepa.engine.errors import PaidCallRefused, all_of
from dspy_turbogepa.engine.records import PriorUsage
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm, sim_engine

from helpers import CountingMetric, small_splits

# ------------------------------------------------------------------ helpers


def _tokens(*lms: dspy.LM) -> int:
    return sum(sim_engine(lm).stats()["prompt_tokens"] + sim_engine(lm).stats()["completion_tokens"] for lm in lms)


def _counted(dr) -> int:
    rs = dr.run_stats
    return sum(rs["task_tokens"].values()) + sum(rs["reflection_tokens"].values())


def _instructions(program) -> dict[str, str]:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


def _compile(task, splits, *, log_dir=None, **kw):
    lm, refl = make_student_lm(seed=0, noise=None), make_reflection_lm(seed=0)
    kw.setdefault("num_threads", 4)
    opt = TurboGEPA(CountingMetric(task.metric), reflection_lm=refl, track_stats=True, verbose=False,
                    log_dir=str(log_dir) if log_dir else None, **kw)
    with dspy.context(lm=lm):
        program = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    return program, program.detailed_results, lm, refl


class _TokEval(FakeEvaluator):
    """The engine fakes' evaluator, billing ``tokens`` prompt tokens per evaluation."""

    def __init__(self, *args: Any, tokens: int = 1, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.tokens, self.paid = tokens, 0

    async def evaluate(self, *args: Any, **kw: Any):
        outcome = await super().evaluate(*args, **kw)
        self.paid += self.tokens
        return dataclasses.replace(outcome, prompt_tokens=self.tokens)


class _TokRefl(FakeReflector):
    def __init__(self, *args: Any, tokens: int = 1, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.tokens, self.paid = tokens, 0

    async def reflect(self, *args: Any, **kw: Any):
        proposal = await super().reflect(*args, **kw)
        self.paid += self.tokens
        return dataclasses.replace(proposal, reflection_prompt_tokens=self.tokens)


class _Store(EngineObserver):
    """What a run store keeps of a session, handed to the next one as known outcomes and prior usage."""

    def __init__(self) -> None:
        self.evals: dict = {}
        self.props: dict = {}

    def copy(self) -> _Store:
        other = _Store()
        other.evals, other.props = dict(self.evals), dict(self.props)
        return other

    def on_evaluation(self, candidate, split, outcome) -> None:
        self.evals[(candidate.fingerprint, split, outcome.example_id)] = outcome

    def on_proposal(self, key, proposal) -> None:
        self.props[key] = proposal

    def prior(self) -> PriorUsage:
        return PriorUsage(task_prompt_tokens=sum(o.prompt_tokens for o in self.evals.values()),
                          reflection_prompt_tokens=sum(p.reflection_prompt_tokens for p in self.props.values()))


def _session(config, setup, store, *, resume, evaluator=None, reflector=None, observers=()):
    evaluator = evaluator or _TokEval(setup.task)
    reflector = reflector or _TokRefl()
    orch = Orchestrator(config, evaluator, reflector, setup.seed(), setup.train_ids, setup.val_ids,
                        observers=[store, *observers],
                        known_evaluations=dict(store.evals) if resume else None,
                        known_proposals=dict(store.props) if resume else None,
                        prior_usage=store.prior() if resume else None)
    return run(orch, timeout=10), orch, evaluator, reflector


# ------------------------------------------------------------------ 1. a rerun of a finished capped run


_RUN_MUTATION, _REFLECT = Orchestrator._run_mutation, Orchestrator._reflect


@contextlib.contextmanager
def _mutation_1_reflects_after_mutation_2_finished(seen: dict):
    """Mutation 1 reaches its reflection only once mutation 2 has finished (5 s at most), as when mutation
    1's parent minibatch is slow on the wire; ``seen["tokens"]`` is the run's total when it asks."""

    def done_event(orch) -> asyncio.Event:
        return orch.__dict__.setdefault("_review_m2_done", asyncio.Event())

    async def running(self, plan):
        try:
            return await _RUN_MUTATION(self, plan)
        finally:
            if plan.seq == 2:
                done_event(self).set()

    async def reflecting(self, plan, *args):
        if plan.seq == 1:
            try:
                await asyncio.wait_for(done_event(self).wait(), 5)
            except asyncio.TimeoutError:
                seen["timeout"] = True
            st = self.stats
            seen["tokens"] = (st.task_prompt_tokens + st.task_completion_tokens + st.reflection_prompt_tokens
                              + st.reflection_completion_tokens)
        return await _REFLECT(self, plan, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Orchestrator, "_run_mutation", running)
        patch.setattr(Orchestrator, "_reflect", reflecting)
        yield


def test_a_rerun_of_a_capped_run_returns_the_program_the_first_session_found(routing, tmp_path):
    """Session 1: mutation 1's parent minibatch is slow, so mutation 2 launches, finishes and is accepted
    while mutation 1 waits; then the cap refuses mutation 1's reflection. The rerun replays everything
    stored at once and meets that refusal before mutation 2 has launched: mutation 2 (stored, free to
    replay) must still run, or the rerun returns less than the run found (it returned the seed)."""
    splits = small_splits(routing, n_train=16, n_val=8)
    kw = {"max_metric_calls": 400, "num_threads": 2, "max_mutations_in_flight": 2}
    seen: dict = {}
    with _mutation_1_reflects_after_mutation_2_finished(seen):
        _compile(routing, splits, **kw)  # uncapped: the run's tokens when mutation 1 reflects
    assert not seen.get("timeout")
    cap = seen["tokens"]  # reached exactly then: mutation 1's reflection is refused
    with _mutation_1_reflects_after_mutation_2_finished({}):
        program1, first, _, _ = _compile(routing, splits, log_dir=tmp_path, token_budget=cap, **kw)
    assert first.stop_reason == "token_budget" and first.run_stats["mutations"]["budget_stopped"] >= 1
    assert first.val_aggregate_scores[first.best_idx] > first.val_aggregate_scores[0]  # mutation 2 found more
    program2, second, lm2, refl2 = _compile(routing, splits, log_dir=tmp_path, token_budget=cap, **kw)
    assert (sim_engine(lm2).calls, sim_engine(refl2).calls) == (0, 0)
    assert second.stop_reason == "token_budget"
    assert second.val_aggregate_scores[second.best_idx] == first.val_aggregate_scores[first.best_idx]
    assert _instructions(program2) == _instructions(program1)


# ------------------------------------------------------------------ 2. usage of rows a later session re-ran


def test_whole_run_tokens_survive_a_session_that_reruns_stored_rows(routing, tmp_path):
    """Session 2 (track_best_outputs=True) runs again the validation rows session 1 stored without their
    outputs, replacing them; session 3 must still count what session 1 paid for them."""
    splits = small_splits(routing, n_train=16, n_val=8)
    paid = 0
    for session, keep in enumerate((False, True, True), 1):
        _, dr, lm, refl = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=60, track_best_outputs=keep)
        paid += _tokens(lm, refl)
        assert _counted(dr) == paid, session


def test_a_token_cap_reached_before_a_third_session_is_not_paid_past(routing, tmp_path):
    splits = small_splits(routing, n_train=16, n_val=8)
    paid = 0
    for keep in (False, True):
        _, _, lm, refl = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=60, track_best_outputs=keep)
        paid += _tokens(lm, refl)
    _, third, lm, refl = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=200, track_best_outputs=True,
                                  token_budget=paid)
    assert (sim_engine(lm).calls, sim_engine(refl).calls) == (0, 0)
    assert third.stop_reason == "token_budget" and _counted(third) == paid


# ------------------------------------------------------------------ 3. a refusal and a systemic failure at once


async def _refused() -> int:
    raise PaidCallRefused("token_budget")


async def _broken() -> int:
    raise SystemicFailureError("the key was refused")


async def _slow() -> int:
    await asyncio.sleep(0.001)
    return 1


def test_all_of_never_lets_a_refusal_hide_a_systemic_failure():
    async def once(order: int) -> str:
        coros = [_refused(), _broken(), _slow()] if order else [_broken(), _refused(), _slow()]
        try:
            await all_of(*coros)
        except (PaidCallRefused, SystemicFailureError) as exc:
            return type(exc).__name__
        return "returned"

    async def trials() -> collections.Counter:
        return collections.Counter([await once(i % 2) for i in range(60)])

    assert asyncio.run(trials()) == {"SystemicFailureError": 60}


def test_a_fatal_evaluation_at_the_cap_still_stops_the_run_as_systemic():
    task = KeywordTask()
    setup = Setup(task=task, train_ids=tuple(range(12)), val_ids=tuple(range(8)))
    outcomes: collections.Counter = collections.Counter()
    for _ in range(40):
        # the seed's 8 validation evaluations bill 8 tokens; the first training evaluation reaches 9
        config = make_config(max_metric_calls=200, max_evals_in_flight=1, max_mutations_in_flight=1,
                             max_reflections_in_flight=1, reflection_scouts=0, reflection_feedback_reuse=0,
                             minibatch_sampling="epoch", max_tokens=9)
        evaluator = _TokEval(task, fail=lambda texts, split, i: ("program_error", "AuthenticationError", True)
                             if split == "train" else None)
        try:
            result, *_ = _session(config, setup, _Store(), resume=False, evaluator=evaluator)
            outcomes[result.stop_reason] += 1
        except SystemicFailureError:
            outcomes["systemic"] += 1
    assert outcomes == {"systemic": 40}


# ------------------------------------------------------------------ 4. refused calls charged as metric calls


def test_calls_a_cap_refused_are_not_charged_as_metric_calls():
    task = KeywordTask()
    setup = Setup(task=task, train_ids=tuple(range(12)), val_ids=tuple(range(8)))
    seen: list[int] = []

    def watching(state) -> bool:
        seen.append(state.total_num_evals)
        return False

    # one slot: the first of mutation 0's three minibatch evaluations reaches the cap, the other two are refused
    config = make_config(max_metric_calls=200, max_evals_in_flight=1, max_mutations_in_flight=1,
                         max_reflections_in_flight=1, reflection_scouts=0, reflection_feedback_reuse=0,
                         minibatch_sampling="epoch", max_tokens=9, stop_callbacks=(watching,))
    result, _, evaluator, _ = _session(config, setup, _Store(), resume=False)
    assert result.stop_reason == "token_budget" and result.stats.mutations["budget_stopped"] >= 1
    made = sum(evaluator.calls.values())
    assert made == 9
    assert max(seen) <= made


# ------------------------------------------------------------------ 5. what holds


@pytest.mark.parametrize("extra", [
    {}, {"use_merge": True}, {"deterministic": False}, {"max_siblings": 4}, {"adaptive_width": False},
    {"component_selector": "all"},
], ids=["default", "merge", "fast_mode", "siblings", "fixed_width", "all_components"])
@pytest.mark.parametrize("slots", [1, 4, 16])
def test_a_cap_is_passed_by_at_most_the_calls_on_the_wire_and_usage_is_exact(slots, extra):
    """Every evaluation bills 10 tokens and every reflection 25: past the cap, the run pays at most one
    evaluation per slot and one reflection per reflection slot; run_stats count exactly what was billed.
    Checked over many caps and jittered completion orders, with merges, fast mode, best-of-k and chaining."""
    task = with_hidden(KeywordTask(components=("a", "b"), num_keywords=6), range(24), every=3)
    setup = Setup(task=task, train_ids=tuple(range(24)), val_ids=tuple(range(8)))
    reflections = 2
    for cap in (81, 150, 333, 500):
        for sleep_seed in (None, 1, 2):
            config = make_config(max_metric_calls=400, max_evals_in_flight=slots, max_mutations_in_flight=4,
                                 max_reflections_in_flight=reflections, max_tokens=cap, **extra)
            evaluator = _TokEval(task, sleep_seed, tokens=10)
            reflector = _TokRefl(sleep_seed, tokens=25)
            result, *_ = _session(config, setup, _Store(), resume=False, evaluator=evaluator, reflector=reflector)
            paid = evaluator.paid + reflector.paid
            st = result.stats
            assert st.task_prompt_tokens + st.reflection_prompt_tokens == paid
            if result.stop_reason == "token_budget":
                assert paid >= cap
                assert paid < cap + 10 * slots + 25 * reflections


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("stop_at", [10, 25, 40])
def test_a_stop_and_cancel_racing_a_refusal_never_hang(deterministic, stop_at):
    """Ctrl-C's two steps (request_stop, then cancel_in_flight) at the evaluation a cap refuses around,
    with merges, chaining, best-of-k and a callable component selector: every run ends."""
    task = with_hidden(KeywordTask(components=("a", "b"), num_keywords=6), range(24), every=3)
    setup = Setup(task=task, train_ids=tuple(range(24)), val_ids=tuple(range(8)))

    def selector(state, trajectories, subsample_scores, candidate_idx, candidate):
        return ["a"] if state.i % 2 else ["b"]

    class CtrlC(EngineObserver):
        def __init__(self) -> None:
            self.n, self.orch = 0, None

        def on_evaluation(self, candidate, split, outcome) -> None:
            self.n += 1
            if self.n == stop_at and self.orch is not None:
                self.orch.request_stop()
                self.orch.cancel_in_flight()

    for component_selector in ("round_robin", selector):
        for sleep_seed in (None, 1, 2):
            config = make_config(max_metric_calls=300, max_evals_in_flight=4, max_mutations_in_flight=4,
                                 max_reflections_in_flight=2, deterministic=deterministic, use_merge=True,
                                 max_siblings=4, component_selector=component_selector, max_tokens=stop_at + 3,
                                 stop_callbacks=(lambda state: False,))
            ctrl_c = CtrlC()
            orch = Orchestrator(config, _TokEval(task, sleep_seed), _TokRefl(sleep_seed), setup.seed(),
                                setup.train_ids, setup.val_ids, observers=[ctrl_c])
            ctrl_c.orch = orch
            try:
                result = run(orch, timeout=10)
            except RunTimeout:  # pragma: no cover - the failure this test looks for
                pytest.fail("the run hung")
            assert result.stop_reason in ("interrupted", "token_budget")


# ------------------------------------------------------------------ 6. found on the way (not from this change)


def test_reused_feedback_of_a_masked_trace_rerun_by_another_mutation_does_not_crash():
    task = with_hidden(KeywordTask(num_keywords=6), range(24), every=3)
    setup = Setup(task=task, train_ids=tuple(range(24)), val_ids=tuple(range(8)))
    config = make_config(max_metric_calls=400, max_evals_in_flight=4, max_mutations_in_flight=4,
                         max_reflections_in_flight=2, adaptive_width=False, speculative_chaining=False,
                         reflection_scouts=0, reflection_feedback_reuse=3, max_siblings=1, max_tokens=40)
    store = _Store()
    _session(config, setup, store, resume=False)
    # every stored training trace masked, as the run store masks credential-shaped text (trace_lost on load)
    store.evals = {k: dataclasses.replace(o, trajectory=None, trace_lost=True) if k[1] == "train" else o
                   for k, o in store.evals.items()}
    result, *_ = _session(dataclasses.replace(config, max_tokens=None), setup, store.copy(), resume=True)
    assert result.stop_reason == "max_metric_calls"
