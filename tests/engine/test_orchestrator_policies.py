"""Orchestrator policies: proposer skips, dedupe, perfect scores, minibatch acceptance, component and
candidate selection."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import pytest

from dspy_turbogepa.engine import Candidate, SystemicFailureError, fingerprint_texts
from dspy_turbogepa.engine.frontier import ParetoFrontier, pareto_front_members
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.engine.orchestrator import Orchestrator
from dspy_turbogepa.engine.selection import SelectorState
from dspy_turbogepa.engine.types import NOTHING_TO_REFLECT_ON, ProposalOutcome

from .fakes import (
    FakeEvaluator,
    FakeReflector,
    KeywordTask,
    Recorder,
    ReflectCall,
    Setup,
    StopAfter,
    Trajectory,
    build,
    check_invariants,
    fixed_width,
    hard_setup,
    make_config,
    run,
    run_fakes,
    snapshot,
    with_hidden,
)

# ------------------------------------------------------------------------------------- proposer skips


def test_proposer_skips_are_counted_and_the_run_continues() -> None:
    setup = hard_setup()
    refl = FakeReflector(1, skip=lambda n: ("empty_proposal", "no_reflective_data", None)[n % 3])
    rec = Recorder()
    result, orch, ev, refl = run_fakes(make_config(max_metric_calls=250, max_siblings=1), setup, reflector=refl,
                                      observers=[rec])
    check_invariants(result, orch, ev, setup)
    n = len(refl.calls)
    assert result.stats.proposal_skips["empty_proposal"] == len(range(0, n, 3))
    assert result.stats.proposal_skips["no_reflective_data"] == len(range(1, n, 3))
    assert result.stats.mutations["no_proposal"] == len(range(0, n, 3)) + len(range(1, n, 3))
    assert len(result.records) > 1 and result.stop_reason == "max_metric_calls"
    skipped = [r for r in rec.results if r.status == "no_proposal"]
    assert all(r.child is None and r.detail.split(":")[0] in ("empty_proposal", "no_reflective_data")
               for r in skipped)
    # a skipped proposal costs only the parent's minibatch
    assert all({split for _, split, _ in r.requested} == {"train"} for r in skipped)


def test_unchanged_texts_are_a_skip() -> None:
    class EchoAfterFirst(FakeReflector):  # one usable proposal, then the parent's own texts
        async def reflect(self, parent_texts, components, outcomes, seed):
            out = await super().reflect(parent_texts, components, outcomes, seed)
            if len(self.calls) == 1:
                return out
            return ProposalOutcome(texts={c: parent_texts[c] for c in components}, reflection_calls=1)

    setup = hard_setup()
    result, _orch, _ev, refl = run_fakes(make_config(max_metric_calls=1000), setup, reflector=EchoAfterFirst(),
                                       observers=[StopAfter(10)])
    assert result.stats.proposal_skips["unchanged_texts"] == len(refl.calls) - 1 >= 9
    assert len(result.records) <= 2


def test_reflection_calls_are_summed() -> None:
    class TwoCalls(FakeReflector):
        async def reflect(self, *args, **kwargs):
            out = await super().reflect(*args, **kwargs)
            return type(out)(texts=out.texts, skipped=out.skipped, reflection_calls=2)

    setup = hard_setup()
    result, _orch, _ev, refl = run_fakes(make_config(max_metric_calls=120), setup, reflector=TwoCalls(1))
    assert result.stats.reflection_calls == 2 * len(refl.calls) > 0


# regression: a raising Reflector used to kill the run
def test_proposer_exception_is_recorded_and_the_run_continues() -> None:
    setup = hard_setup()
    refl = FakeReflector(1, raise_on=lambda n: n % 3 == 1)
    result, orch, ev, refl = run_fakes(make_config(max_metric_calls=250), setup, reflector=refl)
    assert result.stats.proposal_skips["proposer_error"] == len(range(1, len(refl.calls), 3)) > 0
    assert result.stop_reason == "max_metric_calls"
    check_invariants(result, orch, ev, setup)


def test_a_reflector_error_quoting_a_key_is_masked_in_the_log_and_the_outcome(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-live-0123456789abcdefghij"
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", secret)

    class Leaky(FakeReflector):
        async def reflect(self, *args, **kwargs):
            outcome = await super().reflect(*args, **kwargs)
            if len(self.calls) % 2 == 0:  # every other reflection (all failing would stop the run)
                raise RuntimeError(f"401 from provider: request headers {{'Authorization': 'Bearer {secret}'}}")
            return outcome

    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        result, _orch, _ev, _refl = run_fakes(make_config(max_metric_calls=60), hard_setup(), reflector=Leaky(1),
                                              observers=[rec])
    assert result.stats.proposal_skips["proposer_error"] > 0
    assert "the reflector raised RuntimeError" in caplog.text and secret not in caplog.text
    details = [r.detail for r in rec.results if r.detail]
    assert details and all(secret not in d for d in details)


# ------------------------------------------------------------------------------------- dedupe


@pytest.mark.parametrize("deterministic", [True, False])
def test_duplicate_children_are_counted_and_not_added(deterministic: bool) -> None:
    setup = hard_setup(train_n=12, val_n=8)
    # every proposal is the same program: a specialist that trades kw0 for kw1 and kw2, so the seed
    # stays on the frontier and keeps being picked as a parent, re-proposing a known child
    fixed = {"instr": "base kw1 kw2"}
    refl = FakeReflector(3, fixed=fixed)
    cfg = make_config(max_metric_calls=1000, max_mutations_in_flight=4, deterministic=deterministic)
    rec = Recorder()
    result, orch, ev, refl = run_fakes(cfg, setup, reflector=refl, sleep_seed=3, observers=[rec, StopAfter(30)])
    check_invariants(result, orch, ev, setup)
    fp = Candidate(fixed).fingerprint
    assert [r.candidate.fingerprint for r in result.records][1:] == [fp]  # added exactly once
    assert result.stats.mutations["accepted"] == 1
    dups = [r for r, (_, status) in zip(rec.results, rec.mutations) if status == "duplicate"]
    assert len(dups) == result.stats.mutations["duplicate"] >= 3
    assert all(r.child is not None and r.child.fingerprint == fp for r in dups)
    early = [r for r in dups if r.plan.committed_at_launch >= 2]
    assert len(early) >= 2
    for r in early:  # the child was in the pool when the mutation was planned: dropped before evaluating it
        assert r.status == "duplicate"
        assert not {k for k in r.requested if k[0] == fp}
    # the duplicate's evaluations were never paid twice
    assert all(n == 1 for k, n in ev.calls.items() if k[0] == fp)


def test_two_mutations_finding_the_same_child_in_flight_commit_one() -> None:
    # max_staleness == mutations in flight, all four launched from the seed alone: several find the
    # same child concurrently; exactly one commit adds it, the others are counted duplicate.
    setup = Setup(task=KeywordTask(num_keywords=2), train_ids=tuple(range(4)), val_ids=tuple(range(8)))
    setup.task = KeywordTask(num_keywords=2, hidden=frozenset({("train", 3)}))
    cfg = make_config(max_metric_calls=1000, max_mutations_in_flight=4, max_staleness=4,
                      reflection_minibatch_size=4, **fixed_width())
    rec = Recorder()
    result, _orch, ev, _refl = run_fakes(cfg, setup, reflector=FakeReflector(fixed={"instr": "base kw0 kw1"}),
                                       observers=[rec, StopAfter(4)])
    first_four = [s for seq, s in rec.mutations if seq < 4]
    assert first_four.count("accepted") == 1 and first_four.count("duplicate") == 3
    assert len(result.records) == 2
    assert max(ev.calls.values()) == 1


# ------------------------------------------------------------------------------------- perfect scores


def perfect_setup() -> Setup:
    task = KeywordTask()
    return Setup(task=task, seed_texts={"instr": "base " + " ".join(f"kw{k}" for k in range(task.num_keywords))})


def test_skip_perfect_score_skips_perfect_parents() -> None:
    setup = perfect_setup()
    rec = Recorder()
    result, _orch, ev, refl = run_fakes(make_config(max_metric_calls=1000), setup, observers=[rec, StopAfter(12)])
    assert not refl.calls
    assert set(result.stats.mutations) == {"skipped_perfect"}
    assert len(result.records) == 1
    assert {split for _, split, _ in ev.calls} == {"val", "train"}
    assert all(k[0] == result.records[0].candidate.fingerprint for k in ev.calls)  # only the seed ran


def test_without_skip_perfect_score_perfect_parents_are_reflected_on() -> None:
    setup = perfect_setup()
    cfg = make_config(max_metric_calls=120, skip_perfect_score=False, max_siblings=1)
    result, _orch, _ev, refl = run_fakes(cfg, setup)
    assert refl.calls
    assert "skipped_perfect" not in result.stats.mutations
    assert result.stats.mutations["rejected_rung0"] == len(refl.calls)  # noise children tie: strict rule rejects
    assert result.stop_reason == "max_metric_calls"


def test_perfect_score_threshold_is_configurable() -> None:
    setup = perfect_setup()
    result, _orch, _ev, refl = run_fakes(make_config(max_metric_calls=120, perfect_score=2.0), setup)
    assert refl.calls and "skipped_perfect" not in result.stats.mutations
    # with a lower threshold a merely partial parent counts as perfect
    setup2 = hard_setup()
    setup2.seed_texts = {"instr": "base " + " ".join(f"kw{k}" for k in range(6))}
    result2, _, _, refl2 = run_fakes(make_config(max_metric_calls=1000, perfect_score=0.0), setup2,
                                     observers=[StopAfter(8)])
    assert not refl2.calls and set(result2.stats.mutations) == {"skipped_perfect"}


# ------------------------------------------------------------------------------------- minibatch acceptance


@pytest.mark.parametrize("accept_equal", [False, True])
def test_accept_equal_on_minibatch(accept_equal: bool) -> None:
    setup = hard_setup()
    cfg = make_config(max_metric_calls=200, accept_equal_on_minibatch=accept_equal, rung_fractions=(1.0,),
                      max_siblings=1)
    rec = Recorder()
    result, orch, ev, refl = run_fakes(cfg, setup, reflector=FakeReflector(2, mode="noise"), observers=[rec])
    check_invariants(result, orch, ev, setup)
    seed_scores = result.records[0].val_scores
    if accept_equal:
        assert result.stats.mutations["accepted"] >= 2
        assert all(r.val_scores == seed_scores for r in result.records)  # equal children joined the pool
        assert "rejected_rung0" not in result.stats.mutations
    else:
        assert len(result.records) == 1
        assert set(result.stats.mutations) <= {"rejected_rung0", "skipped_perfect"}
        assert result.stats.mutations["rejected_rung0"] == len(refl.calls) > 0
        for r in rec.results:  # a rejected child costs its minibatch and nothing on validation
            if r.status == "rejected_rung0":
                assert {split for f, split, _ in r.requested if f == r.child.fingerprint} == {"train"}


def test_worse_child_rejected_on_minibatch() -> None:
    # the seed knows kw0..kw2; replace-mode children know one keyword: never better on the minibatch
    setup = hard_setup()
    setup.seed_texts = {"instr": "base kw0 kw1 kw2 kw3 kw4"}
    rec = Recorder()
    result, _orch, _ev, _refl = run_fakes(make_config(max_metric_calls=150), setup,
                                       reflector=FakeReflector(1, mode="replace"), observers=[rec])
    for r in rec.results:
        if r.status == "rejected_rung0":
            child_sum = sum(setup.task.score(r.child.texts, "train", i) for i in r.plan.minibatch)
            parent_sum = sum(setup.task.score(r.plan.parent.texts, "train", i) for i in r.plan.minibatch)
            assert child_sum <= parent_sum
        if r.status == "accepted":
            child_sum = sum(setup.task.score(r.child.texts, "train", i) for i in r.plan.minibatch)
            parent_sum = sum(setup.task.score(r.plan.parent.texts, "train", i) for i in r.plan.minibatch)
            assert child_sum > parent_sum
    assert result.stats.mutations["rejected_rung0"] > 0


# ------------------------------------------------------------------------------------- component selection

TWO = ("a", "b")


def two_component_setup() -> Setup:
    task = KeywordTask(components=TWO, hidden=frozenset(("train", i) for i in range(12) if i % 4 == 3))
    return Setup(task=task, train_ids=tuple(range(12)), val_ids=tuple(range(8)))


def test_round_robin_alternates_components_on_the_same_parent() -> None:
    setup = two_component_setup()
    cfg = make_config(max_metric_calls=150, max_mutations_in_flight=1, max_staleness=1, max_siblings=1,
                      candidate_selection="current_best")
    result, _orch, _ev, refl = run_fakes(cfg, setup, reflector=FakeReflector(mode="noise"))
    assert len(result.records) == 1  # the seed is always the parent
    comps = [c.components for c in refl.calls]
    assert len(comps) >= 6
    rec_plans_all_reflected = len(comps) == sum(result.stats.mutations.values())
    assert rec_plans_all_reflected, dict(result.stats.mutations)
    assert comps == [("a",), ("b",)] * (len(comps) // 2) + [("a",)] * (len(comps) % 2)


@dataclass(frozen=True)
class OnlyLiveTask(KeywordTask):
    """Every example is about the "live" component: the program never runs "dead" (a router's branch)."""

    def needs(self, split: str, example_id: int) -> tuple[str, str]:
        return "live", f"kw{(example_id + (0 if split == 'val' else 1)) % self.num_keywords}"


class TracesOnlyReflector(FakeReflector):
    """dspy's reflector: a component that ran on none of the examples read has nothing to reflect on."""

    async def reflect(self, parent_texts, components, outcomes, seed):
        if not any(o.trajectory is not None and o.trajectory.component in components for o in outcomes):
            self.calls.append(ReflectCall(dict(parent_texts), tuple(components), tuple(outcomes), seed))
            return ProposalOutcome(skipped=NOTHING_TO_REFLECT_ON, message="no usable trace records")
        return await super().reflect(parent_texts, components, outcomes, seed)


@pytest.mark.parametrize("siblings", [1, 3])
def test_a_round_robin_turn_on_a_component_that_never_ran_passes_to_the_next_on_the_same_minibatch(
    siblings: int,
) -> None:
    task = OnlyLiveTask(components=("dead", "live"), hidden=frozenset(("train", i) for i in range(12) if i % 4 == 3))
    setup = Setup(task=task, train_ids=tuple(range(12)), val_ids=tuple(range(8)))
    cfg = make_config(max_metric_calls=300, max_siblings=siblings, **fixed_width())
    refl = TracesOnlyReflector(mode="add")
    rec = Recorder()
    result, orch, ev, _ = run_fakes(cfg, setup, reflector=refl, observers=[rec])
    check_invariants(result, orch, ev, setup)
    dead_turns = [i for i, c in enumerate(refl.calls) if c.components == ("dead",)]
    assert dead_turns, "no round-robin turn fell on the dead component: the test proves nothing"
    for i in dead_turns:  # each is followed by a reflection on "live" reading the same failures
        follow = refl.calls[i + 1: i + 1 + siblings + len(dead_turns)]
        assert any(c.components == ("live",) and {o.example_id for o in c.outcomes}
                   == {o.example_id for o in refl.calls[i].outcomes} for c in follow)
    assert result.stats.mutations["no_proposal"] == 0, dict(result.stats.mutations)
    assert result.stats.proposal_skips[NOTHING_TO_REFLECT_ON] >= len(dead_turns)
    for r in rec.results:  # what the mutation rewrote, and the round robin its child continues from
        if r.plan.kind == "reflection" and r.child is not None:
            assert r.plan.components == ["live"] and r.plan.child_counter == 0
    assert result.best.aggregate == 1.0


def test_a_proposer_that_echoes_is_caught_in_a_program_with_a_component_that_never_runs() -> None:
    # The echo rule waits until every component offered so far has been echoed (a proposer rightly
    # keeps the ones a failure is not about); a component with nothing to reflect on can never echo,
    # so it kept the rule from ever firing, and the echoing proposer was paid until the no-op limit.
    task = OnlyLiveTask(components=("dead", "live"), hidden=frozenset(("train", i) for i in range(12) if i % 4 == 3))
    setup = Setup(task=task, train_ids=tuple(range(12)), val_ids=tuple(range(8)))
    refl = TracesOnlyReflector(fixed=task.seed_texts())
    cfg = make_config(max_metric_calls=5000, systemic_failure_window=6, **fixed_width())
    with pytest.raises(SystemicFailureError, match="unchanged_texts"):
        run(build(cfg, FakeEvaluator(setup.task), refl, setup))
    assert sum(c.components == ("live",) for c in refl.calls) <= 6 + cfg.max_mutations_in_flight * cfg.max_siblings


def test_round_robin_counters_are_per_candidate_and_inherited() -> None:
    setup = two_component_setup()
    cfg = make_config(max_metric_calls=400, max_mutations_in_flight=1, max_staleness=1,
                      candidate_selection="current_best", speculative_chaining=False)
    rec = Recorder()
    result, _orch, _ev, _refl = run_fakes(cfg, setup, reflector=FakeReflector(4), observers=[rec])
    counters: Counter[str] = Counter()
    reused_child = False
    for r, (seq, status) in zip(rec.results, rec.mutations):
        p = r.plan.parent.fingerprint
        assert r.plan.components == [TWO[counters[p] % 2]], (seq, r.plan.components, counters[p])
        counters[p] = (counters[p] + 1) % 2
        reused_child |= r.plan.parent_index > 0
        if status == "accepted":
            counters[r.child.fingerprint] = max(counters[r.child.fingerprint], counters[p])
            assert dict(r.child.texts)[r.plan.components[0]] != dict(r.plan.parent.texts)[r.plan.components[0]]
    assert reused_child and len(result.records) >= 3


@pytest.mark.parametrize("deterministic", [True, False])
def test_component_selector_all_updates_every_component(deterministic: bool) -> None:
    setup = two_component_setup()
    cfg = make_config(max_metric_calls=200, component_selector="all", deterministic=deterministic)
    result, orch, ev, refl = run_fakes(cfg, setup, sleep_seed=1)
    check_invariants(result, orch, ev, setup)
    assert refl.calls and all(c.components == TWO for c in refl.calls)
    assert all(r.candidate.kind == "reflection_all" for r in result.records[1:]) and len(result.records) > 1
    assert result.stats.accepted_by_kind == Counter({"reflection_all": len(result.records) - 1})
    assert set(result.stats.survived_rung0_by_kind) == {"reflection_all"}


# regression: launches were counted as "reflection" before the kind became "reflection_all"
def test_mutations_by_kind_matches_accepted_by_kind_for_all() -> None:
    setup = two_component_setup()
    result, *_ = run_fakes(make_config(max_metric_calls=200, component_selector="all"), setup, sleep_seed=1)
    assert set(result.stats.mutations_by_kind) == {"reflection_all"}


def test_callable_selector_receives_selector_state() -> None:
    setup = two_component_setup()
    seen: list[tuple] = []

    def selector(state, trajectories, scores, candidate_idx, candidate):
        seen.append((state, trajectories, scores, candidate_idx, candidate))
        return ["b"]

    cfg = make_config(max_metric_calls=200, component_selector=selector)
    rec = Recorder()
    result, orch, ev, refl = run_fakes(cfg, setup, sleep_seed=2, observers=[rec])
    check_invariants(result, orch, ev, setup)
    assert seen and refl.calls and all(c.components == ("b",) for c in refl.calls)
    for state, trajectories, scores, idx, candidate in seen:
        assert isinstance(state, SelectorState)
        assert state.list_of_named_predictors == ["a", "b"]
        assert state.program_candidates[0] == setup.task.seed_texts()
        assert len(state.program_full_scores_val_set) == len(state.program_candidates)
        assert len(state.named_predictor_id_to_update_next_for_program_candidate) == len(state.program_candidates)
        assert candidate == state.program_candidates[idx]
        assert len(trajectories) == len(scores) == cfg.reflection_minibatch_size
        assert all(isinstance(t, Trajectory) and t.split == "train" for t in trajectories)
        assert scores == [t.score for t in trajectories]
    assert all(dict(r.candidate.texts)["a"] == "base kw0" for r in result.records)  # only "b" ever changed


def test_a_callable_selector_reading_the_state_gives_the_same_run_whatever_the_timing() -> None:
    """In a deterministic run a callable selector sees the state of its mutation's planning view, not
    whatever had committed by the time the parent's minibatch came back (timing)."""
    setup = two_component_setup()

    def selector(state, trajectories, scores, candidate_idx, candidate):
        return [["a", "b"][(state.i + len(state.program_candidates) + state.total_num_evals) % 2]]

    cfg = make_config(max_metric_calls=300, component_selector=selector, max_mutations_in_flight=4, **fixed_width())
    runs = {
        sleep_seed: [dict(r.candidate.texts) for r in run_fakes(cfg, setup, sleep_seed=sleep_seed)[0].records]
        for sleep_seed in (1, 2, 3, 4)
    }
    assert len(runs[1]) > 2
    assert all(texts == runs[1] for texts in runs.values())


def test_callable_selector_choosing_nothing_is_a_skip() -> None:
    setup = two_component_setup()
    calls = {"n": 0}

    def sometimes(*args):
        calls["n"] += 1
        return [] if calls["n"] % 2 else ["a"]

    cfg = make_config(max_metric_calls=1000, component_selector=sometimes)
    result, _orch, _ev, refl = run_fakes(cfg, setup, observers=[StopAfter(6)])
    assert refl.calls
    assert result.stats.proposal_skips["no_components"] >= 3


def test_a_selector_that_never_chooses_stops_the_run_naming_it() -> None:
    """It returned the seed as "no progress possible" (an INFO line blaming perfect minibatches), where a
    selector that raises stopped the run naming it."""
    cfg = make_config(max_metric_calls=1000, component_selector=lambda *args: [], systemic_failure_window=6)
    with pytest.raises(SystemicFailureError, match="component_selector returned no component on each of its "
                                                   "first 6 selections.*this program's: a, b"):
        run(build(cfg, FakeEvaluator(two_component_setup().task), FakeReflector(), two_component_setup()))


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_selector_that_chooses_every_other_time_is_not_stopped_however_slow_the_reflections(
        deterministic: bool) -> None:
    """Empty selections were counted at once and a chosen one only when its reflection answered: with
    many mutations in flight and slow reflections, a selector choosing half the time was stopped as one
    that never chooses (and in deterministic mode only when the LM was slow)."""
    calls = {"n": 0}

    def alternating(*args):
        calls["n"] += 1
        return ["instr"] if calls["n"] % 2 == 0 else []

    setup = hard_setup()
    cfg = make_config(max_metric_calls=2000, component_selector=alternating, max_mutations_in_flight=16,
                      deterministic=deterministic, **fixed_width())
    result = run(build(cfg, FakeEvaluator(setup.task, 0), FakeReflector(0, real_sleep=0.05), setup,
                       observers=[StopAfter(30)]), timeout=60)
    assert result.stats.proposal_skips["no_components"] >= 8 and len(result.records) > 1


def test_a_failing_selector_skips_its_mutation_and_one_that_always_fails_stops_the_run() -> None:
    """dspy.GEPA skips an iteration whose selector failed; an unknown name raised out of compile here,
    losing the run. A selector that never works stops it, naming the cause."""
    setup = two_component_setup()
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        return ["c"] if calls["n"] <= 2 else ["a"]

    result, *_ = run_fakes(make_config(max_metric_calls=300, component_selector=flaky), setup, sleep_seed=1)
    assert result.stats.proposal_skips["selector_error"] == 2 and len(result.records) > 1
    cfg = make_config(component_selector=lambda *args: ["c"], systemic_failure_window=6)
    with pytest.raises(SystemicFailureError, match="unknown components"):
        run(build(cfg, FakeEvaluator(setup.task), FakeReflector(), setup))


# ------------------------------------------------------------------------------------- candidate selection


@pytest.mark.parametrize("strategy", ["pareto", "current_best", "epsilon_greedy", "top_k_pareto"])
def test_parent_selection_follows_the_strategy(strategy: str) -> None:
    setup = hard_setup(train_n=24, val_n=12)
    # (chaining off: a chained mutation takes its predecessor's child instead of drawing a parent)
    cfg = make_config(max_metric_calls=500, candidate_selection=strategy, max_mutations_in_flight=3,
                      speculative_chaining=False)
    rec = Recorder()
    result, orch, ev, _refl = run_fakes(cfg, setup, sleep_seed=5, reflector=FakeReflector(5, mode="replace"),
                                       observers=[rec])
    check_invariants(result, orch, ev, setup)
    assert len(result.records) >= 4
    parents = Counter()
    for r in rec.results:
        n = r.plan.committed_at_launch  # the parent was chosen from the pool as it was then
        known = result.records[:n]
        f = ParetoFrontier(setup.val_ids)
        for k in known:
            f.add(k.index, k.val_scores)
        p = r.plan.parent_index
        assert 0 <= p < n
        parents[p] += 1
        members = set().union(*f.non_dominated().values())
        if strategy == "current_best":
            assert p == f.best_index()
        elif strategy == "pareto":
            assert p in members
        elif strategy == "top_k_pareto":
            # gepa's TopKParetoCandidateSelector(k=5): the raw fronts restricted to the top 5, then the
            # dominated dropped among them
            top5 = set(sorted(range(n), key=lambda i: (-known[i].aggregate, i))[:5])
            kept = {vid: front & top5 for vid, front in f.fronts().items() if front & top5}
            allowed = pareto_front_members(kept, {k.index: k.aggregate for k in known})
            assert p in allowed or (not allowed and p == f.best_index())
    if strategy != "current_best":
        assert len(parents) > 1


# ------------------------------------------------------------------------------------- operator credit


class KindReflector(FakeReflector):
    """Learns a keyword only when rewriting the winning kind's components ("one" or "all"); the other
    kind proposes noise that never improves anything."""

    def __init__(self, winner: str, sleep_seed: int | None = None) -> None:
        super().__init__(sleep_seed)
        self.winner = winner
        self._noise = FakeReflector(sleep_seed, mode="noise")

    async def reflect(self, parent_texts, components, outcomes, seed):  # type: ignore[no-untyped-def]
        if ("all" if len(components) > 1 else "one") == self.winner:
            return await super().reflect(parent_texts, components, outcomes, seed)
        return await self._noise.reflect(parent_texts, components, outcomes, seed)


@pytest.mark.parametrize("winner", ["one", "all"])
def test_adaptive_mix_shifts_toward_the_kind_that_wins(winner: str) -> None:
    """With the default selector the mix follows operator credit: whichever of "one component" and
    "all components" keeps producing new best candidates gets most of the later mutations."""
    task = KeywordTask(components=("a", "b", "c"), num_keywords=9,
                       hidden=frozenset(("train", i) for i in range(40) if i % 5 == 4))
    setup = Setup(task=task, train_ids=tuple(range(40)), val_ids=tuple(range(12)))
    cfg = make_config(max_metric_calls=900, adaptive_components=True, max_mutations_in_flight=4)
    rec = Recorder()
    result, orch, ev, _refl = run_fakes(cfg, setup, sleep_seed=2, reflector=KindReflector(winner, 2), observers=[rec])
    check_invariants(result, orch, ev, setup)
    credit = result.stats.operator_credit
    kinds = [r.plan.kind for r in rec.results if r.plan.kind != "merge" and r.status != "skipped_perfect"]
    late = kinds[len(kinds) // 2:]
    share_all = sum(k == "reflection_all" for k in late) / len(late)
    if winner == "all":
        assert credit["reflection_all"]["improved_best"] > credit.get("reflection", {}).get("improved_best", 0)
        assert share_all > 0.5, (share_all, credit)
    else:
        assert credit["reflection"]["improved_best"] > credit.get("reflection_all", {}).get("improved_best", 0)
        assert share_all < 0.2, (share_all, credit)


def test_no_new_proposals_while_the_evaluation_queue_is_full() -> None:
    """Back-pressure: when the evaluations already waiting fill every slot, no mutation is launched."""
    setup = hard_setup(train_n=40, val_n=16)
    cfg = make_config(max_metric_calls=500, max_evals_in_flight=2, max_mutations_in_flight=8, **fixed_width())
    holder: dict = {}
    violations: list[tuple[int, int]] = []
    waiting_seen: list[int] = []

    class Watch(Recorder):
        def on_evaluation(self, candidate, split, outcome) -> None:  # type: ignore[no-untyped-def]
            super().on_evaluation(candidate, split, outcome)
            waiting_seen.append(holder["orch"]._eval_slots.waiting)

    orch = build(cfg, FakeEvaluator(setup.task, 3), FakeReflector(3, mode="noise"), setup, [Watch()])
    holder["orch"] = orch
    original = orch._launch

    def launch(plan):  # type: ignore[no-untyped-def]
        slots = orch._eval_slots
        if slots.waiting >= slots.capacity:
            violations.append((slots.waiting, slots.capacity))
        original(plan)

    orch._launch = launch  # type: ignore[method-assign]
    result = run(orch)
    assert not violations
    # the queue did fill up (so the rule was exercised) and the run still finished its budget
    assert max(waiting_seen) >= cfg.max_evals_in_flight
    assert result.stop_reason == "max_metric_calls"


def _skips_when_most_examples_are_solved(mode: str, seed: int) -> tuple[int, list[tuple[int, ...]]]:
    """24 mutations on a seed that solves 20 of 24 training examples; the other 4 never get solved."""
    train = tuple(range(24))
    task = with_hidden(KeywordTask(num_keywords=6), train, every=6)
    setup = Setup(task=task, train_ids=train, val_ids=tuple(range(8)),
                  seed_texts={"instr": "base kw0 kw1 kw2 kw3 kw4 kw5"})
    cfg = make_config(max_metric_calls=10_000, minibatch_sampling=mode, seed=seed, max_mutations_in_flight=1,
                      **fixed_width())
    stop, rec = StopAfter(24), Recorder()
    orch = build(cfg, FakeEvaluator(setup.task, seed), FakeReflector(seed, mode="noise"), setup, [stop, rec])
    stop.orchestrator = orch
    result = run(orch)
    return result.stats.mutations["skipped_perfect"], [r.plan.minibatch for r in rec.results]


def test_failure_first_sampling_skips_fewer_all_perfect_minibatches() -> None:
    # Plain epoch order spends most mutations on minibatches the parent already solves; failure-first
    # draws the examples the parent was seen failing first, without drawing one of them every time.
    epoch = [_skips_when_most_examples_are_solved("epoch", s)[0] for s in range(5)]
    first = [_skips_when_most_examples_are_solved("failure_first", s) for s in range(5)]
    assert all(f <= e for (f, _), e in zip(first, epoch)), (first, epoch)
    assert sum(f for f, _ in first) <= 0.6 * sum(epoch), (first, epoch)
    hidden = {5, 11, 17, 23}
    for _, batches in first:
        for i in hidden:  # an unsolvable example waits at least half an epoch (4 draws) between draws
            hits = [k for k, b in enumerate(batches) if i in b]
            assert all(b - a >= 4 for a, b in zip(hits, hits[1:])), (i, hits)


# ------------------------------------------------------------------------------------- best-of-k siblings


def test_siblings_grow_while_reflections_fail_and_stay_one_while_they_succeed() -> None:
    setup = hard_setup(train_n=24, val_n=8)
    # every child equals its parent in score: k climbs to its cap (max_siblings, within the reflection slots)
    rec = Recorder()
    cfg = make_config(max_metric_calls=2000, max_siblings=3, max_reflections_in_flight=4, max_mutations_in_flight=1,
                      **fixed_width())
    result, _orch, _ev, refl = run_fakes(cfg, setup, reflector=FakeReflector(0, mode="noise"),
                                         observers=[rec, StopAfter(30)])
    plans = [r.plan for r in rec.results]
    assert plans[0].siblings == 1  # nothing known yet: p = 1/2
    assert max(p.siblings for p in plans) == 3
    reflected = [r for r in rec.results if r.status != "skipped_perfect"]
    assert len(refl.calls) == sum(r.plan.siblings for r in reflected)
    assert all(r.children_passed == 0 for r in rec.results)
    multi = [r for r in rec.results if r.plan.siblings > 1 and r.children_tried]
    assert result.stats.siblings["best_of_k_mutations"] == len(multi) > 0
    assert result.stats.siblings["children_tried"] == sum(r.children_tried for r in rec.results)
    assert result.stats.siblings["children_passed"] == 0
    # the cap is also the reflection slots
    rec2 = Recorder()
    cfg2 = make_config(max_metric_calls=2000, max_siblings=4, max_reflections_in_flight=2, max_mutations_in_flight=1,
                       **fixed_width())
    run_fakes(cfg2, setup, reflector=FakeReflector(0, mode="noise"), observers=[rec2, StopAfter(30)])
    assert max(r.plan.siblings for r in rec2.results) == 2
    # a reflector that always finds a keyword of the minibatch: children keep beating their parents, k
    # stays 1 (without feedback reuse or scouts: a keyword learnt from a failure outside the minibatch does
    # not show on the minibatch)
    rec3 = Recorder()
    solvable = Setup(task=KeywordTask(num_keywords=12), train_ids=tuple(range(36)), val_ids=tuple(range(12)))
    run_fakes(make_config(max_metric_calls=400, max_siblings=4, max_reflections_in_flight=4,
                          reflection_feedback_reuse=0, reflection_scouts=0), solvable, observers=[rec3])
    reflected3 = [r for r in rec3.results if r.children_tried]
    assert len(reflected3) >= 5 and all(r.children_passed == r.children_tried for r in reflected3)
    assert all(r.plan.siblings == 1 for r in rec3.results)


class _OneGoodSibling:
    """Per mutation, only the second reflection (by seed order) finds the keyword; the others add noise."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self._by_seed: dict[int, int] = {}

    async def reflect(self, parent_texts, components, outcomes, seed):
        from dspy_turbogepa.engine import ProposalOutcome

        from .fakes import propose
        self.calls.append((seed, len(outcomes)))
        rank = self._by_seed.setdefault(seed, len(self._by_seed) % 3)
        mode = "add" if rank == 1 else "noise"
        return ProposalOutcome(texts=propose(parent_texts, components, outcomes, seed, mode), reflection_calls=1)


def test_only_the_best_sibling_goes_on_to_validation() -> None:
    setup = hard_setup(train_n=24, val_n=8)
    rec = Recorder()
    cfg = make_config(max_metric_calls=3000, max_siblings=3, max_reflections_in_flight=3, max_mutations_in_flight=1,
                      **fixed_width())
    result, orch, ev, _ = run_fakes(cfg, setup, reflector=_OneGoodSibling(), observers=[rec, StopAfter(12)])
    multi = [r for r in rec.results if r.plan.siblings == 3 and r.children_tried == 3]
    assert multi, "no mutation drew three siblings"
    for r in multi:
        train_children = {fp for fp, i, _ in r.train_scores if fp != r.plan.parent.fingerprint}
        assert len(train_children) == 3  # all three children were tried on the minibatch
        val_children = {fp for fp, split, _ in r.requested if split == "val"}
        assert val_children <= {r.child.fingerprint} if r.child is not None else not val_children
        if r.status == "accepted":
            assert r.children_passed >= 1
            assert r.child.texts["instr"].split()[-1].startswith("kw")  # the sibling that learnt, not noise
    assert any(r.status == "accepted" for r in multi)
    accepted = [r for r in rec.results if r.status == "accepted"]
    assert accepted and all(r.child is not None for r in accepted)
    check_invariants(result, orch, ev, setup)


def test_best_of_k_runs_are_reproducible_whatever_the_completion_order() -> None:
    setup = hard_setup(train_n=24, val_n=12)
    snaps, sibling_counts = [], []
    for sleep_seed in (None, 1, 2, 3):
        rec = Recorder()
        cfg = make_config(max_metric_calls=500, max_siblings=3, max_reflections_in_flight=3, rung_fractions=(0.5, 1.0))
        result, orch, ev, _ = run_fakes(cfg, setup, sleep_seed=sleep_seed,
                                        reflector=FakeReflector(sleep_seed, mode="replace", max_yields=40),
                                        evaluator=FakeEvaluator(setup.task, sleep_seed, max_yields=20), observers=[rec])
        check_invariants(result, orch, ev, setup)
        snaps.append([(r.candidate.fingerprint, r.parent_indices) for r in result.records])
        sibling_counts.append([r.plan.siblings for r in rec.results])
    assert all(s == snaps[0] for s in snaps)
    assert all(c == sibling_counts[0] for c in sibling_counts)
    assert max(sibling_counts[0]) > 1, "no mutation drew siblings: the test proves nothing"


def test_each_sibling_reads_the_minibatch_in_its_own_order() -> None:
    from itertools import permutations

    from dspy_turbogepa.engine.orchestrator import sibling_order

    items = ["a", "b", "c"]
    orders = [tuple(sibling_order(items, j)) for j in range(6)]
    assert orders[0] == ("a", "b", "c")  # the first sibling sees the minibatch as drawn, as dspy.GEPA does
    assert sorted(orders) == sorted(permutations(items))  # 2n siblings, all distinct
    assert sibling_order(["x"], 3) == ["x"] and sibling_order([], 2) == []


# ------------------------------------------------------------------------------------- feedback reuse


def _reflections(reuse: int, sampling: str = "failure_first", train_n: int = 36) -> tuple[object, list[object], object]:
    setup = Setup(task=KeywordTask(num_keywords=12), train_ids=tuple(range(train_n)), val_ids=tuple(range(12)))
    rec = Recorder()
    cfg = make_config(max_metric_calls=300, reflection_feedback_reuse=reuse, reflection_scouts=0,
                      minibatch_sampling=sampling)
    result, _orch, ev, refl = run_fakes(cfg, setup, reflector=FakeReflector(0), observers=[rec])
    return result, rec.results, (ev, refl)


@pytest.mark.parametrize("sampling,train_n", [("failure_first", 36), ("epoch", 8)])  # 8: minibatches overlap
def test_reflections_reread_the_parents_paid_failures_outside_the_minibatch(sampling: str, train_n: int) -> None:
    result, results, (ev, refl) = _reflections(reuse=2, sampling=sampling, train_n=train_n)
    plans = {(r.plan.parent.fingerprint, frozenset(r.plan.minibatch + r.plan.feedback_ids)): r.plan
             for r in results if r.plan.kind != "merge"}
    reused = 0
    per_mutation: dict[int, int] = {}  # siblings share one mutation's reused failures
    for call in refl.calls:
        fp = fingerprint_texts(call.parent_texts)
        ids = [o.example_id for o in call.outcomes]
        assert len(ids) == len(set(ids))  # the minibatch is not read twice
        plan = plans[(fp, frozenset(ids))]
        assert not set(plan.feedback_ids) & set(plan.minibatch)
        per_mutation[plan.seq] = len(plan.feedback_ids)
        assert len(call.outcomes) == len(plan.minibatch) + len(plan.feedback_ids) and len(plan.feedback_ids) <= 2
        for o in call.outcomes:
            if o.example_id in plan.minibatch:
                continue
            assert o.example_id in plan.feedback_ids and o.score < 1.0
            assert o.trajectory is not None and o.trajectory.example_id == o.example_id
            assert ev.calls[(fp, "train", o.example_id)] == 1  # evaluated once, before: read, not re-run
            reused += 1
    assert reused >= sum(per_mutation.values()) > 0
    if sampling == "failure_first":
        assert reused > sum(per_mutation.values())  # some mutations drew siblings: the test covers them
    reflected = [r for r in results if r.plan.kind != "merge" and r.status != "skipped_perfect"]
    assert result.stats.feedback_reused == sum(len(r.plan.feedback_ids) for r in reflected)  # once per mutation
    assert result.stats.to_dict()["feedback_reused"] == result.stats.feedback_reused


def test_feedback_reuse_zero_reflects_on_the_minibatch_alone() -> None:
    result, results, (_ev, refl) = _reflections(reuse=0)
    assert refl.calls and all(len(c.outcomes) == 3 for c in refl.calls)
    assert all(r.plan.feedback_ids == () for r in results) and result.stats.feedback_reused == 0


def test_feedback_reuse_skips_failures_that_teach_nothing() -> None:
    # A metric that raised (or a rate limit) is scored as a failure, but its trace has no feedback for the
    # instruction: it must not take one of the reused slots.
    setup = Setup(task=KeywordTask(num_keywords=12), train_ids=tuple(range(36)), val_ids=tuple(range(12)))
    broken = {1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34}
    ev = FakeEvaluator(setup.task, fail=lambda t, split, i: ("metric_error", "KeyError")
                       if split == "train" and i in broken else None)
    rec = Recorder()
    result, _orch, _ev, _refl = run_fakes(make_config(max_metric_calls=300, reflection_feedback_reuse=3), setup,
                                         evaluator=ev, observers=[rec])
    reused = [i for r in rec.results for i in r.plan.feedback_ids]
    assert reused and not set(reused) & broken
    assert result.stats.failures["metric_error"] > 0


# ------------------------------------------------------------------------------------------- scouting


def _scouted(scouts: int, **overrides: object) -> tuple[object, list[object], FakeEvaluator, FakeReflector, Setup]:
    setup = Setup(task=KeywordTask(num_keywords=12), train_ids=tuple(range(36)), val_ids=tuple(range(12)))
    rec = Recorder()
    cfg = make_config(**{"max_metric_calls": 300, "reflection_feedback_reuse": 0, "reflection_scouts": scouts,
                         **overrides})
    result, orch, ev, refl = run_fakes(cfg, setup, reflector=FakeReflector(0), observers=[rec])
    check_invariants(result, orch, ev, setup)
    return result, rec.results, ev, refl, setup


def test_reflections_read_the_parents_failing_scouts_and_acceptance_stays_on_the_minibatch() -> None:
    result, results, _ev, refl, setup = _scouted(4)
    reflected = [r for r in results if r.plan.kind != "merge" and r.status != "skipped_perfect"]
    assert any(r.plan.scout_ids for r in reflected)
    for r in results:
        plan = r.plan
        assert len(plan.scout_ids) <= 4 and not set(plan.scout_ids) & set(plan.minibatch)
        parent = plan.parent.fingerprint
        # the parent is evaluated on its scouts in this mutation (asked for, recorded for later draws) ...
        assert all((parent, "train", i) in r.requested for i in plan.scout_ids)
        assert {i for fp, i, _ in r.train_scores if fp == parent} == set(plan.minibatch) | set(plan.scout_ids)
        # ... and the child only on the minibatch: the acceptance test ignores the scouts
        assert {i for fp, split, i in r.requested if fp != parent and split == "train"} <= set(plan.minibatch)
    read_scouts = 0
    for call in refl.calls:  # siblings read the same feedback in another order
        fp = fingerprint_texts(call.parent_texts)
        ids = [o.example_id for o in call.outcomes]
        assert len(ids) == len(set(ids))
        plans = [r.plan for r in reflected if r.plan.parent.fingerprint == fp and set(r.plan.minibatch) <= set(ids)]
        assert plans
        beyond = sorted(set(ids) - set(plans[0].minibatch))
        # every failing scout, and no solved one
        assert any(beyond == sorted(i for i in p.scout_ids if setup.task.score(call.parent_texts, "train", i) < 1.0)
                   for p in plans)
        read_scouts += len(beyond)
    assert read_scouts > 0
    # the acceptance test sums the parent's minibatch scores, not the scouts'
    rejected = [r for r in results if r.status == "rejected_rung0" and r.children_tried == 1]
    assert rejected
    for r in rejected:
        parent_sum = sum(sc for fp, i, sc in r.train_scores
                         if fp == r.plan.parent.fingerprint and i in r.plan.minibatch)
        assert r.detail.endswith(f"parent {parent_sum:.3f}"), (r.detail, parent_sum)
    assert result.stats.scouted == sum(len(r.plan.scout_ids) for r in results if r.plan.kind != "merge")
    assert result.stats.to_dict()["scout_failures_read"] == result.stats.scout_failures_read > 0


def test_scouts_are_examples_the_parent_has_no_score_on() -> None:
    # One mutation at a time, so each is planned from every earlier commit.
    _result, results, _ev, _refl, _setup = _scouted(6, max_mutations_in_flight=1, speculative_chaining=False)
    seen: dict[str, set[int]] = {}  # committed training scores per candidate, in commit order
    scouted = 0
    for r in sorted(results, key=lambda r: r.plan.seq):
        if r.plan.kind != "merge":
            assert not set(r.plan.scout_ids) & seen.get(r.plan.parent.fingerprint, set())
            scouted += bool(r.plan.scout_ids) and r.plan.parent.fingerprint in seen
        for fp, i, _ in r.train_scores:
            seen.setdefault(fp, set()).add(i)
    assert scouted  # some parents already had scores: the test covers the exclusion


def test_a_perfect_minibatch_is_skipped_whatever_the_scouts_show() -> None:
    # GEPA's skip_perfect_score looks at the minibatch: a failing scout does not make the parent worth a
    # reflection whose child could never beat it there. The scout's score is still recorded.
    setup = Setup(task=KeywordTask(num_keywords=2), train_ids=tuple(range(36)), val_ids=tuple(range(12)))
    results = []
    for seed in range(8):  # the seed solves half the examples: some minibatches are perfect, scouts not
        rec = Recorder()
        cfg = make_config(max_metric_calls=300, reflection_scouts=5, max_mutations_in_flight=1,
                          speculative_chaining=False, seed=seed)
        run_fakes(cfg, setup, reflector=FakeReflector(0), observers=[rec])
        results += rec.results
    checked = 0
    for r in results:
        if r.plan.kind == "merge" or not r.plan.scout_ids:
            continue
        texts = r.plan.parent.texts
        perfect = all(setup.task.score(texts, "train", i) >= 1.0 for i in r.plan.minibatch)
        scouts_fail = any(setup.task.score(texts, "train", i) < 1.0 for i in r.plan.scout_ids)
        assert (r.status == "skipped_perfect") == perfect
        if perfect and scouts_fail:
            checked += 1
            assert {i for _, i, _ in r.train_scores} >= set(r.plan.scout_ids)
    assert checked  # the run had such a mutation, so the test covers it


@pytest.mark.parametrize("overrides", [{"reflection_scouts": 0}, {"minibatch_sampling": "epoch"}])
def test_no_scouts_when_off_or_with_epoch_sampling(overrides: dict) -> None:
    scouts = overrides.get("reflection_scouts", 5)
    rest = {k: v for k, v in overrides.items() if k != "reflection_scouts"}
    result, results, _ev, refl, _setup = _scouted(scouts, **rest)
    assert results and all(r.plan.scout_ids == () for r in results)
    assert result.stats.scouted == 0 and refl.calls and all(len(c.outcomes) == 3 for c in refl.calls)


def test_scouts_never_make_a_mutation_straddle_the_budget() -> None:
    # Near the end of the budget a mutation's scouts shrink to what is left, so only a standard mutation
    # (minibatch, child, valset) may still straddle the limit, as in dspy.GEPA.
    for budget in (90, 130, 170):
        # 16 slots: one wave has room for all 8 scouts, so fewer means the budget cut them
        result, results, _ev, _refl, _setup = _scouted(8, max_metric_calls=budget, max_evals_in_flight=16)
        plans = [r.plan for r in results if r.plan.kind != "merge"]
        assert len(plans[0].scout_ids) == 8
        assert any(len(p.scout_ids) < 8 for p in plans), budget  # the last mutations could not pay for all
        assert result.total_metric_calls <= budget + 2 * 3 + 12 - 1


class _Proposals(EngineObserver):
    def __init__(self) -> None:
        self.by_key: dict[str, object] = {}

    def on_proposal(self, key: str, proposal: object) -> None:
        self.by_key[key] = proposal


def test_a_resume_replays_scouted_reflections_only_with_the_same_scouts() -> None:
    # The proposal key covers the scouts the reflection read: the same settings replay every stored
    # reflection (none is paid again); other scout settings ask for new ones (a different prompt).
    setup = Setup(task=KeywordTask(num_keywords=12), train_ids=tuple(range(36)), val_ids=tuple(range(12)))

    def once(scouts: int, proposals: dict | None = None, evaluations: dict | None = None):
        cfg = make_config(max_metric_calls=200, reflection_scouts=scouts)
        obs, refl = _Proposals(), FakeReflector(0)
        ev = FakeEvaluator(setup.task)
        orch = Orchestrator(cfg, ev, refl, setup.seed(), setup.train_ids, setup.val_ids, observers=[obs],
                            known_evaluations=evaluations, known_proposals=proposals)
        result = run(orch)
        return result, obs.by_key, refl, orch

    first, stored, refl1, orch1 = once(5)
    assert refl1.calls and first.stats.scouted > 0
    again, _, refl2, _ = once(5, stored, dict(orch1._evaluations.done))
    assert not refl2.calls and again.stats.proposals_replayed == len(refl1.calls)
    assert snapshot(again) == snapshot(first)
    other, _, refl3, _ = once(0, stored, dict(orch1._evaluations.done))
    assert refl3.calls and other.stats.proposals_replayed == 0  # the same parent and minibatch, other prompts


def test_a_stored_outcome_whose_trace_was_lost_runs_again_only_for_a_reflection_that_reads_it() -> None:
    # The run store masks credential-shaped text, so a resumed run may hold a score without its trace
    # (trace_lost). Replayed reflections need no trace: nothing runs again. A reflection that must be
    # asked again reads the real trace: its evaluations run first, and the run is the live one again.
    from dataclasses import replace

    setup = Setup(task=KeywordTask(num_keywords=12), train_ids=tuple(range(36)), val_ids=tuple(range(12)))

    def once(proposals: dict | None = None, evaluations: dict | None = None):
        obs, refl, ev = _Proposals(), FakeReflector(0), FakeEvaluator(setup.task)
        orch = Orchestrator(make_config(max_metric_calls=200), ev, refl, setup.seed(), setup.train_ids,
                            setup.val_ids, observers=[obs], known_evaluations=evaluations, known_proposals=proposals)
        return run(orch), obs.by_key, refl, ev, orch

    first, stored, refl1, _, orch1 = once()
    lost = {key: replace(o, trajectory=None, trace_lost=True) if o.trajectory is not None else o
            for key, o in orch1._evaluations.done.items()}
    assert refl1.calls and any(o.trace_lost for o in lost.values())

    replayed, _, refl2, ev2, _ = once(stored, dict(lost))
    assert not refl2.calls and not ev2.calls  # every reflection replayed: no trace read, nothing paid
    assert snapshot(replayed) == snapshot(first)

    asked, _, refl3, ev3, orch3 = once({}, dict(lost))  # no stored proposal: every reflection asked again
    assert len(refl3.calls) == len(refl1.calls)
    assert all(o.trajectory is not None for call in refl3.calls for o in call.outcomes)
    assert snapshot(asked) == snapshot(first)  # the reflections read what the live run's read
    read = {(fp, split, i) for fp, split, i in ev3.calls}
    assert read and all(lost[key].trace_lost for key in read)  # only lost traces ran again ...
    assert orch3.budget.committed == orch1.budget.committed  # ... and the budget was not charged twice
    assert asked.stats.executed == len(ev3.calls) < first.stats.executed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_scouts_unfixable_failures_do_not_fill_every_minibatch(seed: int) -> None:
    """Most of the training set can never be fixed (hidden keywords, like wrong labels) and the wave
    has no room for scouts (num_threads <= minibatch size): failure-first minibatches came to hold only
    those examples, every child was rejected, and the rest of the training set was never drawn. One
    exploring slot per minibatch reaches all of it."""
    from dataclasses import replace


    train = tuple(range(20))
    task = replace(KeywordTask(), hidden=frozenset(("train", i) for i in train if i % 5 != 0))
    setup = hard_setup(train_n=20, val_n=8)
    setup.task = task
    cfg = make_config(max_metric_calls=250, reflection_minibatch_size=5, max_evals_in_flight=4, seed=seed)
    outcomes = {}
    for explore in (False, True):
        ev = FakeEvaluator(task)
        orch = build(cfg, ev, FakeReflector(), setup)
        if not explore:
            orch._scouting = True  # what the engine did before: no exploring slot without scouts
        result = run(orch)
        outcomes[explore] = (result.best.aggregate, {i for _, split, i in ev.order if split == "train"})
    best, drawn = outcomes[True]
    assert drawn == set(train)
    assert best == 0.75  # every keyword the training set shows was learnt
    assert outcomes[False][0] < best and len(outcomes[False][1]) < len(train)  # the stuck search it replaces


def test_examples_whose_metric_raised_are_not_ranked_as_failures() -> None:
    """A metric that raises (an unlabeled row) says nothing about the candidate and gives reflection
    nothing to read: such rows must not rank "likely failing" and crowd the minibatches."""
    setup = hard_setup(train_n=20, val_n=8)
    unlabeled = {i for i in range(20) if i % 3 == 0}
    ev = FakeEvaluator(setup.task, fail=lambda texts, split, i: ("metric_error", "KeyError")
                       if split == "train" and i in unlabeled else None)
    orch = build(make_config(max_metric_calls=150), ev, FakeReflector(), setup)
    run(orch)
    assert any(split == "train" and i in unlabeled for _, split, i in ev.order)  # they were evaluated
    seen = {i for table in orch._knowledge._known.values() for i in table}
    assert seen and not seen & unlabeled


class _Unprintable(Exception):
    """An SDK-style error whose ``__str__`` reads a response field that is not there."""

    def __str__(self) -> str:
        raise KeyError("error")


def test_a_reflector_or_selector_error_whose_str_raises_is_skipped_like_any_other() -> None:
    """Describing the failure (for the log and the outcome) raised a second error out of the engine."""

    class Unprintable(FakeReflector):
        async def reflect(self, *args, **kwargs):
            outcome = await super().reflect(*args, **kwargs)
            if len(self.calls) % 2 == 0:
                raise _Unprintable()
            return outcome

    rec = Recorder()
    result, *_ = run_fakes(make_config(max_metric_calls=60), hard_setup(), reflector=Unprintable(1), observers=[rec])
    assert result.stats.proposal_skips["proposer_error"] > 0
    assert any("<str() of this _Unprintable raised KeyError>" in (r.detail or "") for r in rec.results)

    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise _Unprintable()
        return ["a"]

    result, *_ = run_fakes(make_config(max_metric_calls=300, component_selector=flaky), two_component_setup(),
                           sleep_seed=1)
    assert result.stats.proposal_skips["selector_error"] == 2 and len(result.records) > 1
