"""Orchestrator decisions that a mutation run showed no other test pins down: the incumbent a rung
compares with, best-of-k reservations and tie-breaks, merge screening and its cap, the no-progress stop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping

from dspy_turbogepa.engine import Candidate, EvalOutcome, ProposalOutcome
from dspy_turbogepa.engine.records import MutationPlan, MutationResult

from .fakes import (
    FakeEvaluator,
    FakeReflector,
    Recorder,
    Setup,
    StopAfter,
    build,
    check_invariants,
    fixed_width,
    hard_setup,
    make_config,
    run,
    run_fakes,
)

# ---------------------------------------------------------------------------------------------- fakes

ScoreFn = Callable[[Mapping[str, str], str, int], float]


class TableEvaluator:
    """Scores from a function of (texts, split, example id): fractional validation scores on demand."""

    def __init__(self, score: ScoreFn) -> None:
        self.score = score
        self.calls: list[tuple[str, str, int]] = []

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces) -> EvalOutcome:
        self.calls.append((fingerprint, split, example_id))
        await asyncio.sleep(0)
        return EvalOutcome(example_id, self.score(texts, split, example_id))


class ScriptedReflector:
    """The ``n``-th reflection (0-based, call order) answers ``script(n)`` for the first component.

    Call order is launch order here: the fakes' evaluations all yield once, so the mutation launched first
    gets its parent's minibatch back first (tests that rely on it assert who got which answer)."""

    def __init__(self, script: Callable[[int], str]) -> None:
        self.script = script
        self.calls = 0

    async def reflect(self, parent_texts, components, outcomes, seed) -> ProposalOutcome:
        n = self.calls
        self.calls += 1
        await asyncio.sleep(0)
        return ProposalOutcome(texts={components[0]: self.script(n)}, reflection_calls=1)


# ---------------------------------------------------------------------------------------------- rungs (O17)


def test_a_rung_compares_the_child_with_the_current_best_not_its_stale_parent() -> None:
    """Mutations 0 and 1 are both planned from the seed. Mutation 0 brings in a child perfect on every
    validation example; mutation 1's child is better than the seed (its parent) but clearly behind that
    new best, and must be pruned at its first rung: only the frontier's current best tells that a
    sibling planned from an old state has nothing left to add (rungs.py, promotion_decision)."""

    def score(texts: Mapping[str, str], split: str, i: int) -> float:
        text = texts["instr"]
        if split == "train":
            return 1.0 if text in ("good", "fair") else 0.0
        return {"good": 1.0, "fair": 0.6}.get(text, 0.5)

    reflector = ScriptedReflector(lambda n: ("good", "fair")[n] if n < 2 else f"noise{n}")
    setup = Setup(seed_texts={"instr": "seed"})
    cfg = make_config(max_metric_calls=200, rung_fractions=(0.25, 0.5, 1.0), max_mutations_in_flight=2,
                      max_staleness=2, max_siblings=1, reflection_scouts=0, reflection_feedback_reuse=0,
                      **fixed_width())
    rec = Recorder()
    result, *_ = run_fakes(cfg, setup, evaluator=TableEvaluator(score), reflector=reflector,
                           observers=[rec, StopAfter(2)])
    first, second = sorted(rec.results, key=lambda r: r.plan.seq)[:2]
    assert first.plan.parent_index == second.plan.parent_index == 0  # both planned from the seed alone
    assert dict(first.child.texts) == {"instr": "good"} and first.status == "accepted"
    assert dict(second.child.texts) == {"instr": "fair"}
    assert second.status == "pruned", (second.status, second.detail)
    assert second.detail.startswith("rung 1:") and "behind the incumbent" in second.detail
    assert [dict(r.candidate.texts) for r in result.records] == [{"instr": "seed"}, {"instr": "good"}]


# ---------------------------------------------------------------------------------------------- best-of-k (O8, O14)


class _OneGoodSibling:
    """Per mutation, only one reflection in three finds a keyword, so k climbs to 3 and the best sibling
    still goes on to validation."""

    def __init__(self) -> None:
        self._by_seed: dict[int, int] = {}

    async def reflect(self, parent_texts, components, outcomes, seed):
        from .fakes import propose

        rank = self._by_seed.setdefault(seed, len(self._by_seed) % 3)
        mode = "add" if rank == 1 else "noise"
        return ProposalOutcome(texts=propose(parent_texts, components, outcomes, seed, mode), reflection_calls=1)


class ReservationWatch(Recorder):
    """Every mutation's metric calls (asked for, cache hits included) against what its plan reserved."""

    def __init__(self) -> None:
        super().__init__()
        self.over: list[tuple[int, int, int, int]] = []

    def on_mutation(self, result, status) -> None:
        super().on_mutation(result, status)
        if len(result.requested) > result.plan.reservation:
            self.over.append((result.plan.seq, result.plan.siblings, len(result.requested), result.plan.reservation))


def test_a_best_of_k_mutation_never_asks_for_more_than_it_reserved() -> None:
    """The budget's guarantees (strict: never past the limit; GEPA: one mutation's overshoot at most)
    rest on each mutation reserving its worst case: the parent's minibatch, one minibatch per sibling,
    and the valset for the best one."""
    setup = hard_setup(train_n=24, val_n=8)
    watch = ReservationWatch()
    cfg = make_config(max_metric_calls=3000, max_siblings=3, max_reflections_in_flight=3, max_mutations_in_flight=1,
                      **fixed_width())
    result, orch, ev, _ = run_fakes(cfg, setup, reflector=_OneGoodSibling(), observers=[watch, StopAfter(12)])
    check_invariants(result, orch, ev, setup)
    # the run had what the check needs: three children tried on the minibatch, one of them validated
    assert any(r.plan.siblings == 3 and r.children_tried == 3 and any(s == "val" for _, s, _ in r.requested)
               for r in watch.results)
    assert not watch.over, watch.over


class _SiblingTags:
    """Reflection 0 learns nothing (so the next mutation draws two siblings); every later one learns every
    keyword its minibatch fails on, plus a tag naming the order it read the feedback in: siblings of one
    mutation score alike on the minibatch but are distinct programs, and the tag tells which one is
    sibling 0 (it reads the minibatch as drawn, see sibling_order)."""

    def __init__(self) -> None:
        self.calls = 0

    async def reflect(self, parent_texts, components, outcomes, seed) -> ProposalOutcome:
        n = self.calls
        self.calls += 1
        await asyncio.sleep(0)
        comp = components[0]
        if n == 0:
            return ProposalOutcome(texts={comp: parent_texts[comp] + " noise"}, reflection_calls=1)
        learnt = sorted({o.trajectory.keyword for o in outcomes
                         if o.score < 1.0 and o.trajectory.keyword is not None and o.trajectory.component == comp})
        order = "-".join(str(o.example_id) for o in outcomes)
        return ProposalOutcome(texts={comp: " ".join([parent_texts[comp], *learnt, f"order{order}"])},
                               reflection_calls=1)


def test_among_tied_siblings_the_first_draw_goes_on_to_validation() -> None:
    """Best-of-k breaks ties on the minibatch in favour of sibling 0, the reflection that read the minibatch
    as drawn: the same choice dspy.GEPA's single reflection would make, so best-of-k adds candidates to try
    without changing which one a tie keeps."""
    setup = hard_setup(train_n=24, val_n=8)
    rec = Recorder()
    cfg = make_config(max_metric_calls=500, max_siblings=2, max_reflections_in_flight=2, max_mutations_in_flight=1,
                      reflection_scouts=0, reflection_feedback_reuse=0, speculative_chaining=False, **fixed_width())
    run_fakes(cfg, setup, reflector=_SiblingTags(), observers=[rec, StopAfter(4)])
    tied = [r for r in rec.results if r.plan.siblings == 2 and r.children_tried == 2]
    assert tied, [(r.plan.siblings, r.children_tried, r.status) for r in rec.results]
    for r in tied:
        assert r.children_passed == 2  # both beat the parent, with the same minibatch score
        drawn = "-".join(str(i) for i in r.plan.minibatch)
        assert dict(r.child.texts)["instr"].endswith(f"order{drawn}"), (r.child.texts, r.plan.minibatch)


# ---------------------------------------------------------------------------------------------- merges (O16, O48, O11)


def _screen_merge(child_scores: Mapping[int, float]) -> MutationResult:
    """One merge mutation run on its own: the better parent scores 1 on validation ids 0 and 1, the other
    parent 0, and the merged child ``child_scores``; screened on ids (0, 1)."""
    better = Candidate({"a": "A", "b": "base"})
    other = Candidate({"a": "base", "b": "B"})
    merged = {"a": "A", "b": "B"}

    def score(texts: Mapping[str, str], split: str, i: int) -> float:
        return child_scores[i] if dict(texts) == merged else 0.0

    cfg = make_config(max_metric_calls=100, rung_fractions=(1.0,))
    orch = build(cfg, TableEvaluator(score), FakeReflector(), Setup(seed_texts={"a": "base", "b": "base"},
                                                                  train_ids=(0, 1), val_ids=(0, 1)))
    seed_rec = orch._add_record(Candidate({"a": "base", "b": "base"}),
                                [None], [EvalOutcome(0, 0.0), EvalOutcome(1, 0.0)], seq=None)
    better_rec = orch._add_record(better, [0], [EvalOutcome(0, 1.0), EvalOutcome(1, 1.0)], seq=None)
    other_rec = orch._add_record(other, [0], [EvalOutcome(0, 0.0), EvalOutcome(1, 0.0)], seq=None)
    assert seed_rec.index == 0
    plan = MutationPlan(
        seq=0, kind="merge", parent=better, parent_index=better_rec.index, parent_val=better_rec.val_scores,
        minibatch=(), rng=random.Random(0), committed_at_launch=3, reservation=2,
        other_parent_index=other_rec.index, other_parent_val=other_rec.val_scores, child_texts=merged,
        screen_ids=(0, 1),
    )
    result = MutationResult(plan=plan, status="no_proposal")

    async def go() -> None:
        orch._loop = asyncio.get_running_loop()
        await orch._merge(plan, result)

    asyncio.run(go())
    return result


def test_a_merge_that_matches_the_better_parent_on_the_screen_goes_on() -> None:
    """GEPA screens a merged child on a few validation ids where the parents differ: it must match the
    better parent there (merge.py). Matching is enough: a merge usually combines improvements that show
    on different examples, so on the screen it ties the better parent and gains elsewhere."""
    result = _screen_merge({0: 1.0, 1: 1.0})
    assert result.status == "accepted", (result.status, result.detail)


def test_a_merge_behind_the_better_parent_on_the_screen_is_rejected() -> None:
    """... and only matching the better parent counts: beating the worse one says nothing (the better
    parent is already in the pool)."""
    result = _screen_merge({0: 0.5, 1: 0.5})
    assert result.status == "rejected_rung0", (result.status, result.detail)
    assert result.detail == "merge screen 1.000 < best parent 2.000"


def test_a_merge_search_skips_a_program_already_in_the_pool_as_of_its_view() -> None:
    """A merge that would rebuild a program the pool holds is not proposed (dspy.GEPA pays to evaluate
    such duplicates), and "holds" is read at the plan's view: a program added after it does not count,
    or a plan would depend on the timing of commits after its view."""
    from dspy_turbogepa.engine.frontier import ParetoFrontier
    from dspy_turbogepa.engine.history import CommitPoint

    cfg = make_config(max_metric_calls=100, rung_fractions=(1.0,), use_merge=True)
    orch = build(cfg, TableEvaluator(lambda texts, split, i: 0.0), FakeReflector(),
                 Setup(seed_texts={"a": "base", "b": "base"}, train_ids=(0, 1), val_ids=(0, 1)))
    rows = [({"a": "base", "b": "base"}, [None], (0.0, 0.0)), ({"a": "A", "b": "base"}, [0], (1.0, 0.0)),
            ({"a": "base", "b": "B"}, [0], (0.0, 1.0)), ({"a": "A", "b": "B"}, [1], (0.0, 0.0))]
    frontier = ParetoFrontier((0, 1))
    for texts, parents, (s0, s1) in rows:
        rec = orch._add_record(Candidate(texts), parents, [EvalOutcome(0, s0), EvalOutcome(1, s1)], seq=None)
        orch._history.record(CommitPoint(rec.index + 1, 0, 0, 0))
        if rec.index in (1, 2):  # the two specialists: the frontier a merge draws from
            frontier.add(rec.index, rec.val_scores)
    before = orch._find_merge(2, frontier, random.Random(0), set())  # the view of 3 records
    assert before is not None and before.texts == {"a": "A", "b": "B"} and {before.first, before.second} == {1, 2}
    assert orch._find_merge(3, frontier, random.Random(0), set()) is None  # 4 records: it exists


MERGE_SETUP = hard_setup(train_n=16, val_n=12, components=("a", "b", "c"))


def _merge_run(max_merges: int) -> object:
    # four mutations at a time planned from the same view: children that fixed different components of
    # one parent sit side by side on the frontier, and merging them pays (seed 7: five merges if allowed)
    cfg = make_config(max_metric_calls=300, seed=7, use_merge=True, max_merge_invocations=max_merges,
                      rung_fractions=(0.5, 1.0), max_mutations_in_flight=4, max_staleness=4, **fixed_width())
    result, orch, ev, _ = run_fakes(cfg, MERGE_SETUP)
    check_invariants(result, orch, ev, MERGE_SETUP)
    return result


def test_max_merge_invocations_caps_the_merges() -> None:
    """``max_merge_invocations`` bounds the merges that bring in a candidate (dspy.GEPA's
    max_merge_invocations); 0 must turn merging off even with ``use_merge``."""
    many = _merge_run(5)
    assert many.stats.accepted_by_kind["merge"] >= 2  # this run merges more than once when allowed to
    none = _merge_run(0)
    assert none.stats.mutations_by_kind["merge"] == 0, dict(none.stats.mutations_by_kind)
    one = _merge_run(1)
    assert one.stats.mutations_by_kind["merge"] >= 1
    assert one.stats.accepted_by_kind["merge"] == 1 == sum(r.candidate.kind == "merge" for r in one.records)


# ---------------------------------------------------------------------------------------------- no-progress stop (O19)


def test_the_no_progress_stop_comes_right_after_max_noop_mutations_free_mutations() -> None:
    """One mutation at a time, so the streak is exact: the run decides to stop at the commit that makes
    the ``max_noop_mutations``-th free no-op in a row, not one later."""
    setup = hard_setup(train_n=6, val_n=4)

    class Streak(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.orch = None
            self.charged = len(setup.val_ids)  # the seed's validation
            self.streak = 0
            self.streak_at_stop: int | None = None
            self.mutations_at_stop: int | None = None

        def on_mutation(self, result, status) -> None:
            super().on_mutation(result, status)
            charged = self.orch.budget.committed
            noop = charged == self.charged and status != "accepted"
            self.charged = charged
            self.streak = self.streak + 1 if noop else 0
            if self.streak_at_stop is None and self.orch._stop_reason == "no_progress_possible":
                self.streak_at_stop = self.streak
                self.mutations_at_stop = len(self.mutations)

    obs = Streak()
    cfg = make_config(max_metric_calls=1000, max_noop_mutations=5, max_mutations_in_flight=1, max_staleness=1,
                      **fixed_width())
    obs.orch = build(cfg, FakeEvaluator(setup.task), FakeReflector(skip=lambda n: "no_reflective_data"), setup,
                     observers=[obs])
    result = run(obs.orch, timeout=5)
    assert result.stop_reason == "no_progress_possible"
    assert obs.streak_at_stop == 5, obs.streak_at_stop
    # one at a time, nothing was planned before the deciding commit that had not run: the drain launches
    # nothing (a mutation planned from the deciding commit's view could only start after the decision)
    assert len(obs.mutations) == obs.mutations_at_stop, (len(obs.mutations), obs.mutations_at_stop)


def test_merges_in_flight_side_by_side_never_build_the_same_child_twice() -> None:
    """Four mutations in flight: a merge planned while another merge of the same pair is evaluated used to
    pick the pair's other common ancestor (or another pair) and build the identical child, which then
    committed as a duplicate after holding a mutation slot, a merge grant and a validation-sized reservation."""
    setup = hard_setup(train_n=24, val_n=12, components=("a", "b", "c"), num_keywords=8)
    rec = Recorder()
    cfg = make_config(max_metric_calls=1500, use_merge=True, max_merge_invocations=5, seed=0,
                      max_mutations_in_flight=4)
    result, orch, ev, _ = run_fakes(cfg, setup, observers=[rec], sleep_seed=0, timeout=60)
    check_invariants(result, orch, ev, setup)
    children = [r.child.fingerprint for r in rec.results if r.plan.kind == "merge" and r.child is not None]
    assert len(children) >= 2, children  # without the check: 4 merge children, one of them a duplicate
    assert len(set(children)) == len(children), children
    assert not [r for r in rec.results if r.plan.kind == "merge" and r.status == "duplicate"]


def test_a_merge_refused_for_want_of_budget_is_found_again_once_budget_frees_up() -> None:
    """A merge found while in-flight reservations left too little budget used to be marked tried before
    the reservation was refused, so it was never tried again: only a launched merge counts as tried."""
    from dspy_turbogepa.engine.frontier import ParetoFrontier
    from dspy_turbogepa.engine.history import CommitPoint

    cfg = make_config(max_metric_calls=100, rung_fractions=(1.0,), use_merge=True)
    orch = build(cfg, TableEvaluator(lambda texts, split, i: 0.0), FakeReflector(),
                 Setup(seed_texts={"a": "base", "b": "base"}, train_ids=(0, 1), val_ids=(0, 1)))
    rows = [({"a": "base", "b": "base"}, [None], (0.0, 0.0)), ({"a": "A", "b": "base"}, [0], (1.0, 0.0)),
            ({"a": "base", "b": "B"}, [0], (0.0, 1.0))]
    frontier = ParetoFrontier((0, 1))
    for texts, parents, (s0, s1) in rows:
        rec = orch._add_record(Candidate(texts), parents, [EvalOutcome(0, s0), EvalOutcome(1, s1)], seq=None)
        orch._history.record(CommitPoint(rec.index + 1, 0, 0, 0))
        if rec.index:
            frontier.add(rec.index, rec.val_scores)
    orch._reserve = lambda seq, n_commits, amount: False  # type: ignore[method-assign]
    assert orch._plan_merge(0, random.Random(0), 2, frontier) is None and orch._merge_budget_short
    del orch._reserve  # the budget freed up
    plan = orch._plan_merge(0, random.Random(0), 2, frontier)
    assert plan is not None and plan.child_texts == {"a": "A", "b": "B"}
    # once launched it counts as tried: the only merge there is is not proposed a second time
    assert orch._plan_merge(1, random.Random(0), 2, frontier) is None and not orch._merge_budget_short
