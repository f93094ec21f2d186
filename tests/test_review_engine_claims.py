"""A review of precise claims in docs/engine.md that no other test pinned: budget reservations, the RNG
stream and planning views (Reproducibility), promotion at validation rungs, speculative chaining, feedback
reuse and scouting counters, the reflector's stop hook, and what run_stats reports.

Engine claims run the Orchestrator with the pure-Python fakes of tests/engine (or small evaluators and
reflectors of their own, ordered by asyncio events, never by sleeps); run_stats claims run small compiles
on the offline fake LMs. A claim that holds is a plain test whose docstring quotes it; the three found false
(an orphan's validation in fast mode, a merge's rung decision, what task_lm_calls counts) were corrected in
engine.md, and their tests pin the corrected text.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import random

import dspy
import pytest
from engine.fakes import (
    FakeEvaluator,
    FakeReflector,
    Recorder,
    StopAfter,
    build,
    hard_setup,
    make_config,
    run,
    run_fakes,
)

import dspy_turbogepa.engine.orchestrator as orchestrator_module
from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.engine import Candidate, EvalOutcome, Orchestrator, ProposalOutcome
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.engine.rungs import RungLadder, promotion_decision
from dspy_turbogepa.engine.width import mutation_width
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm, sim_engine

ROUTING = TASKS["routing"]


def _compile(metric=None, budget: int = 60, lm=None, n_train: int = 12, n_val: int = 8, **kw) -> dspy.Module:
    data = ROUTING.splits(data_seed=0, n_train=n_train, n_val=n_val, n_test=0)
    kw.setdefault("num_threads", 4)
    opt = TurboGEPA(metric or ROUTING.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(),
                    track_stats=True, verbose=False, **kw)
    with dspy.context(lm=lm or make_student_lm()):
        return opt.compile(ROUTING.make_program(), trainset=data.train, valset=data.val)


def _reflected(results) -> list:
    """The mutations that reached their reflection (the fakes' reflector always answers)."""
    return [r for r in results if r.plan.kind != "merge" and r.status != "skipped_perfect"]


# ============================================================================================ budget
def test_a_reflection_reserves_its_parent_and_k_children_minibatches_the_valset_and_its_scouts():
    """engine.md, One mutation, 1. Plan: "reserve the worst-case budget (`(1 + k) * minibatch + len(valset) +
    scouts`, with `k` best-of-k siblings; `2 * minibatch + len(valset)` for a single reflection without
    scouts"; "The reservation counts all `k` minibatches"."""
    setup = hard_setup(train_n=24, val_n=12)
    rec = Recorder()
    run_fakes(make_config(max_metric_calls=400, rung_fractions=(0.5, 1.0), max_evals_in_flight=8), setup,
              sleep_seed=1, observers=[rec])
    plans = [r.plan for r in rec.results if r.plan.kind != "merge"]
    assert any(p.siblings > 1 for p in plans) and any(p.scout_ids for p in plans)
    assert any(p.siblings == 1 and not p.scout_ids for p in plans)
    for p in plans:
        assert p.reservation == (1 + p.siblings) * len(p.minibatch) + len(setup.val_ids) + len(p.scout_ids)


# ==================================================================================== reproducibility
def test_mutation_k_draws_from_its_own_random_stream():
    """engine.md, Reproducibility: "mutation `k` gets its own RNG stream (`Random(f"mutation:{seed}:{k}")`)"
    (with current_best parents and epoch minibatches nothing else draws from it before the reflection's seed)."""
    setup = hard_setup(train_n=16, val_n=8)
    cfg = make_config(max_metric_calls=200, seed=7, candidate_selection="current_best", minibatch_sampling="epoch",
                      max_siblings=1)
    rec = Recorder()
    _, _, _, refl = run_fakes(cfg, setup, sleep_seed=2, observers=[rec])
    expected = sorted(random.Random(f"mutation:7:{r.plan.seq}").getrandbits(63) for r in _reflected(rec.results))
    assert len(expected) >= 5
    assert sorted(call.seed for call in refl.calls) == expected


class _CommitTable(EngineObserver):
    """Per commit count n: the metric calls charged and the candidates in the pool after n commits."""

    def __init__(self) -> None:
        self.orch: Orchestrator | None = None
        self.rows: list[tuple[int, int]] = []

    def on_mutation(self, result, status) -> None:
        assert self.orch is not None
        self.rows.append((self.orch.budget.committed, len(self.orch.records)))


def test_a_callable_selector_sees_the_state_of_its_planning_view_and_is_called_in_launch_order(monkeypatch):
    """engine.md, Reproducibility: "A callable `component_selector` is given gepa's state as of its mutation's
    planning view too (the candidates, scores, `total_num_evals` and `i` after exactly those commits) ... and
    the mutations call it in launch order"."""
    seq_of_task: contextvars.ContextVar[int] = contextvars.ContextVar("seq")
    original = Orchestrator._select

    async def select(self, plan, *args):
        seq_of_task.set(plan.seq)  # each mutation runs in its own task: a context of its own
        return await original(self, plan, *args)

    monkeypatch.setattr(Orchestrator, "_select", select)
    seen: list[tuple[int, int, int, int]] = []

    def selector(state, trajectories, subsample_scores, candidate_idx, candidate):
        seen.append((seq_of_task.get(), state.i, state.total_num_evals, len(state.program_candidates)))
        return list(candidate)[:1]

    setup = hard_setup(train_n=16, val_n=8, components=("a", "b"))
    table, rec = _CommitTable(), Recorder()
    orch = build(make_config(max_metric_calls=300, component_selector=selector), FakeEvaluator(setup.task, 3),
                 FakeReflector(3), setup, observers=[table, rec])
    table.orch = orch
    run(orch)
    charged_records = [(len(setup.val_ids), 1), *table.rows]  # after 0 commits: the seed alone
    views = {r.plan.seq: r.plan.view for r in rec.results}
    assert len(seen) >= 10
    assert [s for s, *_ in seen] == sorted(s for s, *_ in seen)  # launch order
    assert any(views[s] < s for s, *_ in seen)  # planned from a view older than its own launch
    for seq, i, total, candidates in seen:
        assert i == views[seq]  # gepa's state.i during an iteration: the iterations before it
        assert (total, candidates) == charged_records[views[seq]]


# ====================================================================================== stop hooks
class _StopCounting(FakeReflector):
    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


@pytest.mark.parametrize("how", ["stop_request", "stop_callback", "stop_file", "time_budget", "max_metric_calls"])
def test_the_reflector_is_told_to_stop_by_every_stop_but_the_metric_call_budget(how, tmp_path):
    """engine.md, top: "an optional `Reflector.stop()` is called (possibly more than once) when a stop request,
    a stop callback, the stop file or a secondary budget stops new launches ...; not when `max_metric_calls`
    runs out (the mutations in flight finish...)"."""
    kw: dict = {"max_metric_calls": 5000}
    observers = []
    if how == "stop_request":
        observers = [StopAfter(3)]
    elif how == "stop_callback":
        kw["stop_callbacks"] = (lambda state: state.i >= 2,)
    elif how == "stop_file":
        (tmp_path / "gepa.stop").touch()
        kw["stop_file"] = tmp_path / "gepa.stop"
    elif how == "time_budget":
        kw["max_seconds"] = 0.0
    else:
        kw["max_metric_calls"] = 150
    reflector = _StopCounting(1)
    result, *_ = run_fakes(make_config(**kw), hard_setup(), reflector=reflector, observers=observers)
    assert result.stop_reason == {"stop_request": "interrupted"}.get(how, how)
    if how == "max_metric_calls":
        assert reflector.stops == 0 and len(reflector.calls) > 3
    else:
        assert reflector.stops >= 1


# ======================================================================================== chaining
_VAL16, _TRAIN6 = tuple(range(16)), tuple(range(6))


class _SlowParentEvaluator:
    """Seed ``s``; its child ``c1`` (half the training set) ties the seed on the first validation shard and
    falls behind it on the second; ``c1``'s child ``c2`` solves the training set and ties the seed everywhere.
    With ``gate``, ``c1``'s second shard waits until ``c2`` asks for its own second shard (fast mode: ``c2``,
    chained on ``c1``, climbs while ``c1`` is still being validated)."""

    def __init__(self, second_shard: set[int], gate: bool) -> None:
        self.second_shard, self.gate = second_shard, gate
        self.c2_on_second_shard = asyncio.Event()

    async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
        text = texts["instr"]
        await asyncio.sleep(0)
        late = example_id in self.second_shard
        if split == "train":
            score = {"s": 0.0, "c1": 0.5, "c2": 1.0}.get(text, 0.0)
        else:
            if text == "c1" and late and self.gate:
                await self.c2_on_second_shard.wait()
            if text == "c2" and late:
                self.c2_on_second_shard.set()
            score = 1.0 if example_id % 2 == 0 and text in ("s", "c1", "c2") else 0.0
            if text == "c1" and late:
                score = 0.0
        return EvalOutcome(example_id, score, trajectory=("trace", example_id) if capture_traces else None)


class _ChainReflector:
    def __init__(self) -> None:
        self.n = 0

    async def reflect(self, parent_texts, components, outcomes, seed):
        self.n += 1
        await asyncio.sleep(0)
        text = {"s": "c1", "c1": "c2"}.get(parent_texts["instr"], f"x{self.n}")
        return ProposalOutcome(texts={"instr": text}, reflection_calls=1)


@pytest.mark.parametrize("deterministic", [True, False])
def test_an_orphaned_chained_mutation_pays_at_most_one_validation_shard(deterministic):
    """engine.md, Speculative chaining: "A chained child joins the pool only if its parent did: it is checked at
    its first rung decision and before it commits, and marked `orphaned` otherwise (it paid its minibatches and
    at most one validation shard in deterministic mode; with `deterministic=False` ... it may climb every shard
    before it is orphaned at its commit)"."""
    cfg = make_config(max_metric_calls=400, max_mutations_in_flight=1, rung_fractions=(0.25, 0.5, 1.0),
                      deterministic=deterministic, reflection_scouts=0, minibatch_sampling="epoch", max_siblings=1,
                      reflection_feedback_reuse=0)
    ladder = RungLadder.build(_VAL16, cfg.rung_fractions, cfg.seed)
    evaluator = _SlowParentEvaluator(set(ladder.new_ids(1)), gate=not deterministic)
    rec, stop = Recorder(), StopAfter(2)
    orch = Orchestrator(cfg, evaluator, _ChainReflector(), Candidate({"instr": "s"}), _TRAIN6, _VAL16,
                        observers=[rec, stop])
    stop.orchestrator = orch
    run(orch, timeout=10)
    orphans = [r for r in rec.results if r.status == "orphaned"]
    assert orphans
    for orphan in orphans:
        assert orphan.plan.chained and dict(orphan.child.texts) == {"instr": "c2"}
        assert next(r.status for r in rec.results if r.plan.seq == orphan.plan.chain_on) == "pruned"
        paid_on_validation = {i for _, split, i in orphan.requested if split == "val"}
        if deterministic:
            assert paid_on_validation <= set(ladder.new_ids(0)), (orphan.plan.seq, len(paid_on_validation))
        assert orphan.child.fingerprint not in {r.candidate.fingerprint for r in orch.records}


# ===================================================================================== rung promotion
_VAL12, _TRAIN6B = tuple(range(12)), tuple(range(6))


def test_a_merges_rung_decision_also_reads_its_screens_instances(monkeypatch):
    """engine.md, One mutation: "A merge is screened instead on up to 5 validation instances ..."; 3.
    "Validation rungs: ... Both tests read every validation instance the child has a score on, not only the
    shard's: a merge child also has the instances its screen evaluated ..., and a specialist there climbs on".

    Three reflections from the seed (one per component) join the pool: ``c`` is the incumbent, best on half the
    first shard; ``a`` and ``b`` are each best on two instances outside it. Their merges score 0 on the shard and
    1 outside it, so they pass the screen (where ``a`` and ``b`` win two instances each); on the shard alone
    they are behind the incumbent and best nowhere."""
    cfg = make_config(max_metric_calls=150, use_merge=True, rung_fractions=(0.5, 1.0), adaptive_width=False,
                      max_mutations_in_flight=3, reflection_scouts=0, reflection_feedback_reuse=0, max_siblings=1,
                      speculative_chaining=False, minibatch_sampling="epoch", reflection_minibatch_size=2)
    ladder = RungLadder.build(_VAL12, cfg.rung_fractions, cfg.seed)
    shard, outside = list(ladder.new_ids(0)), list(ladder.new_ids(1))
    best_of = {"a": set(outside[:2]), "b": set(outside[2:4]), "c": set(shard[:3])}

    def val_score(texts, i: int) -> float:
        changed = [c for c in "abc" if texts[c] != c + "0"]
        if len(changed) >= 2:  # a merge
            return float(i in outside)
        return float(len(changed) == 1 and i in best_of[changed[0]])

    class Evaluator:
        async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
            await asyncio.sleep(0)
            seed = all(texts[c] == c + "0" for c in "abc")
            known = all(v[1] in "01" and len(v) == 2 for v in texts.values())
            score = (0.0 if seed else float(known)) if split == "train" else val_score(texts, example_id)
            return EvalOutcome(example_id, score, trajectory=("trace", example_id) if capture_traces else None)

    class Reflector:
        def __init__(self) -> None:
            self.n = 0

        async def reflect(self, parent_texts, components, outcomes, seed):
            self.n += 1
            (c,) = components
            return ProposalOutcome(texts={c: c + "1" if parent_texts[c] == c + "0" else f"{c}x{self.n}"},
                                   reflection_calls=1)

    decisions: list[tuple[bool, bool]] = []

    def spy(child, incumbent, frontier_best, z=0.0):
        decision = promotion_decision(child, incumbent, frontier_best, z)
        on_shard = promotion_decision({i: s for i, s in child.items() if i in shard}, incumbent, frontier_best, z)
        decisions.append((decision.promote, on_shard.promote))
        return decision

    monkeypatch.setattr(orchestrator_module, "promotion_decision", spy)
    rec = Recorder()
    orch = Orchestrator(cfg, Evaluator(), Reflector(), Candidate({"a": "a0", "b": "b0", "c": "c0"}), _TRAIN6B,
                        _VAL12, observers=[rec])
    run(orch)
    merges = [r for r in rec.results if r.plan.kind == "merge"]
    assert merges and all(len(r.plan.screen_ids) == 5 for r in merges)
    assert len(decisions) >= 4
    assert any(promoted and not on_shard for promoted, on_shard in decisions), decisions


# ================================================================================ feedback and scouts
def test_feedback_reused_counts_each_mutations_reused_failures_once_and_none_for_a_chained_mutation():
    """engine.md, Feedback reuse: "a chained mutation that takes over the uncommitted child it chained on reads
    no reused failures: its minibatch and scouts only"; "Counter: `run_stats["feedback_reused"]` (per mutation,
    siblings share)"."""
    setup = hard_setup(train_n=24, val_n=12)
    rec = Recorder()
    result, *_ = run_fakes(make_config(max_metric_calls=400, rung_fractions=(0.5, 1.0), max_evals_in_flight=8),
                           setup, observers=[rec])
    reflected = _reflected(rec.results)
    assert result.stats.chaining["chained"] >= 1 and any(r.plan.siblings > 1 for r in reflected)
    assert all(r.plan.feedback_ids == () for r in reflected if r.plan.chained)
    assert 0 < result.stats.feedback_reused == sum(len(r.plan.feedback_ids) for r in reflected)


def test_scouted_counts_every_scout_evaluation_and_scout_failures_read_the_failing_ones_reflections_got():
    """engine.md, Scouting: "Counters: `run_stats["scouted"]` (evaluations) and
    `run_stats["scout_failures_read"]`"; "the reflection reads the ones the parent fails"."""
    setup = hard_setup(train_n=24, val_n=12)
    rec = Recorder()
    result, *_ = run_fakes(make_config(max_metric_calls=400, rung_fractions=(0.5, 1.0), max_evals_in_flight=8),
                           setup, sleep_seed=4, observers=[rec])
    assert result.stats.scouted == sum(len(r.plan.scout_ids) for r in rec.results) > 0
    failing = sum(setup.task.score(r.plan.parent.texts, "train", i) < 1.0
                  for r in _reflected(rec.results) for i in r.plan.scout_ids)
    assert 0 < result.stats.scout_failures_read == failing


def test_a_scouts_failure_is_reused_by_a_later_reflection_on_the_same_parent():
    """engine.md, Scouting: "Their scores are recorded like minibatch scores, so later draws and feedback reuse
    see them"."""
    setup = hard_setup(train_n=24, val_n=12)
    rec = Recorder()
    run_fakes(make_config(max_metric_calls=400, rung_fractions=(0.5, 1.0), max_evals_in_flight=8), setup,
              sleep_seed=4, observers=[rec])
    in_minibatch: dict[str, set[int]] = {}
    scouted: dict[str, set[int]] = {}
    for r in sorted(rec.results, key=lambda r: r.plan.seq):
        in_minibatch.setdefault(r.plan.parent.fingerprint, set()).update(r.plan.minibatch)
        scouted.setdefault(r.plan.parent.fingerprint, set()).update(r.plan.scout_ids)
        if r.child is not None:  # the child is scored on its creator's minibatch
            in_minibatch.setdefault(r.child.fingerprint, set()).update(r.plan.minibatch)
    reused_scouts = [i for r in rec.results for i in r.plan.feedback_ids
                     if i in scouted[r.plan.parent.fingerprint] - in_minibatch[r.plan.parent.fingerprint]]
    assert reused_scouts


# ============================================================================= width and defaults
def test_the_mutation_width_at_800_calls_on_the_benchmark_shape_starts_at_2_and_is_capped_at_4():
    """engine.md, How many mutations run at once: "`max_mutations_in_flight` (default `max(2, num_threads //
    2)`) is the ceiling"; "(`remaining // (4 * (2 * minibatch + len(valset)))`, at least 1)"; "800-call runs
    could go to 4, but start at 2 (`1/p` with the prior `p = 1/2`)" (40 validation examples, 16 threads)."""
    opt = TurboGEPA(ROUTING.metric, max_metric_calls=800, reflection_lm=make_reflection_lm())
    assert [opt._engine_config(800, n, 40).max_mutations_in_flight for n in (1, 2, 5, 16, 33)] == [2, 2, 2, 8, 16]
    cfg = opt._engine_config(800, 16, 40)
    remaining = 800 - 40  # after the seed's validation
    assert mutation_width(cfg, 0, 0, remaining, 40) == 2
    assert mutation_width(cfg, 0, 30, remaining, 40) == 4  # successes rare: the budget's cap, not 8
    assert mutation_width(cfg, 0, 30, 300 - 40, 40) == 1


@pytest.mark.parametrize("val_size", [8, 23, 24, 25, 40, 71, 72, 100, 216, 300])
def test_the_default_validation_ladder_is_geometric_by_3_with_shards_of_at_least_8(val_size):
    """engine.md, One mutation, 3: "growing prefixes of one fixed shuffle of the validation ids (default: a
    geometric ladder with `reduction_factor=3`, shards of at least 8 examples, ending at the full valset)"."""
    opt = TurboGEPA(ROUTING.metric, max_metric_calls=100, reflection_lm=make_reflection_lm())
    fractions = opt._engine_config(100, 4, val_size).rung_fractions
    cuts = RungLadder.build(range(val_size), fractions, 0).cut_points
    assert cuts[-1] == val_size and all(c >= 8 for c in cuts)
    assert all(abs(b / a - 3) < 0.5 for a, b in zip(fractions, fractions[1:]))
    assert len(cuts) == 1 + sum(val_size / 3**k >= 8 for k in range(1, 10))


# ========================================================================================= run_stats
#: The keys of engine.md's `run_stats` table ("every key").
_DOCUMENTED_KEYS = {
    "mutations", "mutations_by_kind", "survived_rung0_by_kind", "accepted_by_kind", "operator_credit", "failures",
    "proposal_skips", "reflective_records_skipped", "reflection_calls", "proposals_replayed", "reflection_tokens",
    "task_tokens", "task_lm_calls", "cost", "metric_calls_executed", "metric_calls_replayed", "cache_hits",
    "feedback_reused", "feedback_calls", "scouted", "scout_failures_read", "siblings", "chaining",
    "peak_evals_in_flight", "peak_mutations_in_flight", "rate_limit_retries", "rate_limits", "evaluation_slots",
}


def test_run_stats_has_exactly_the_documented_keys_also_in_summary_json(tmp_path):
    """engine.md, `run_stats`: "`detailed_results.run_stats` (also in `log_dir/summary.json`), every key:" (the
    table's 28 keys)."""
    program = _compile(budget=60, log_dir=str(tmp_path))
    assert set(program.detailed_results.run_stats) == _DOCUMENTED_KEYS
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["result"]["run_stats"]) == _DOCUMENTED_KEYS


def test_task_lm_calls_and_tokens_count_the_programs_and_an_llm_judges_scoring_calls():
    """engine.md, `run_stats`: "`task_lm_calls` counts the program's calls (and an LLM-judge metric's scoring
    calls)"; "`task_tokens` ... the program (and an LLM-judge metric's scoring calls ...)" (the routing program
    makes one LM call per evaluation; the metric here asks a judge LM of its own once per scoring call)."""
    judge_lm, judge = make_student_lm(), dspy.Predict("ticket -> verdict")

    def judged(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is None:
            with dspy.context(lm=judge_lm):
                judge(ticket=gold.ticket)
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    student = make_student_lm()
    stats = _compile(judged, budget=40, lm=student).detailed_results.run_stats
    assert sim_engine(judge_lm).calls == stats["metric_calls_executed"] > 0  # the judge was asked
    assert stats["task_lm_calls"] == sim_engine(student).calls + sim_engine(judge_lm).calls


def test_task_lm_calls_and_tokens_leave_dspy_cache_hits_out(monkeypatch):
    """engine.md, `run_stats`: "`task_lm_calls` counts the program's calls DSPy's usage tracker saw (cache hits
    and answers without usage left out)" (the same compile twice on a caching student LM)."""
    from dspy.clients.cache import Cache

    monkeypatch.setattr(dspy, "cache", Cache(enable_disk_cache=False, enable_memory_cache=True,
                                             disk_cache_dir=None, memory_max_entries=10_000))
    first, second = (_compile(budget=40, lm=make_student_lm(cache=True)).detailed_results.run_stats
                     for _ in range(2))
    assert first["task_lm_calls"] == first["metric_calls_executed"] > 0 and first["task_tokens"]["prompt"] > 0
    assert second["metric_calls_executed"] == first["metric_calls_executed"]  # cache hits are still executions
    assert second["task_lm_calls"] == 0 and second["task_tokens"] == {"prompt": 0, "completion": 0}


def test_a_resumed_run_counts_replayed_evaluations_and_their_failures(tmp_path):
    """engine.md, `run_stats`: "`failures` | failed evaluations by kind (...), replayed ones included";
    "`metric_calls_executed`, `metric_calls_replayed`, `cache_hits` | evaluations run now, stored ones used on
    resume, evaluations served from the cache"."""
    data = ROUTING.splits(data_seed=0, n_train=16, n_val=8, n_test=0)
    unlabeled = {ex.ticket for ex in data.train[::4]}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if gold.ticket in unlabeled:
            raise ValueError("unlabeled row")
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    first, second = (_compile(metric, budget=80, n_train=16, log_dir=str(tmp_path)).detailed_results.run_stats
                     for _ in range(2))
    assert first["failures"]["metric_error"] > 0 and first["metric_calls_replayed"] == 0
    assert second["failures"] == first["failures"]
    assert second["metric_calls_executed"] == 0
    assert second["metric_calls_replayed"] == first["metric_calls_executed"]
    assert second["cache_hits"] >= second["metric_calls_replayed"]
