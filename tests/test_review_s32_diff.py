"""Review of the session-32 diff (f401842..HEAD): fault rules, cancellation, chaining turns, Pareto ties.

Driven without DSPy (tests/engine/fakes.py) except where noted. A divergence from what the docs or gepa say
is pinned as the correct behaviour and marked ``xfail(strict=True)`` with the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import dspy
import pytest
from engine.fakes import (
    FakeEvaluator,
    FakeReflector,
    Recorder,
    build,
    hard_setup,
    make_config,
    run,
    run_fakes,
)

from dspy_turbogepa.engine.errors import SystemicFailureError
from dspy_turbogepa.engine.systemic import SystemicFailureDetector
from dspy_turbogepa.engine.types import EvalOutcome, ProposalOutcome


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


# ============================================================================ the "metric broke mid-run" rule


def test_children_whose_outputs_crash_the_metric_do_not_stop_the_run_as_a_broken_metric():
    """errors.md: 'one candidate whose outputs the metric cannot take stays ordinary failures'; systemic.py: the
    rule is for 'a metric that breaks mid-run (a scoring service it calls goes away, state it keeps goes bad)'.
    Here the metric never breaks: it scores the seed on every example, every time. Only the reflected children
    answer in a form it cannot take (a metric doing int(pred.answer) and children told to explain their answer).
    Once the seed's minibatch evaluations are all cache hits (a small trainset), only the children's evaluations
    are observed, and after 3 such children the run stops with SystemicFailureError('the metric broke mid-run'),
    where dspy.GEPA (and this engine before the rule) scores them failure_score and returns the seed."""
    setup = hard_setup()  # 12 train / 8 val
    seed_texts = dict(setup.seed().texts)

    def fail(texts, split, example_id):
        return None if dict(texts) == seed_texts else ("metric_error", "ValueError")

    ev = FakeEvaluator(setup.task, 0, fail=fail)
    result, _orch, _ev, _refl = run_fakes(make_config(max_metric_calls=300), setup, evaluator=ev, sleep_seed=0)
    assert result.stop_reason in ("max_metric_calls", "no_progress_possible")  # never a systemic stop
    assert len(result.records) == 1  # the seed: no child ever scored


def test_a_metric_raising_on_a_fixed_half_of_the_trainset_does_not_stop_the_run():
    """errors.md: the metric raising on an example is 'scored failure_score, counted as metric_error'; the new
    rule is for a metric that 'raises on every call from some point on'. Here the metric raises on the same 15
    of 30 training rows from the start (their label field is missing) and scores every other row of every
    candidate. A metric_error is not 'informative' to failure-first sampling, so those rows stay UNKNOWN and
    fill the minibatches and scouts once the labeled failures are known; 16 of them in a row (and 3
    candidates) stop the run as 'the metric broke mid-run', which it did not."""
    setup = hard_setup(train_n=30, val_n=8)
    unlabeled = set(range(15, 30))

    def fail(texts, split, example_id):
        return ("metric_error", "KeyError") if split == "train" and example_id in unlabeled else None

    for sleep_seed in (0, 1):
        ev = FakeEvaluator(setup.task, sleep_seed, fail=fail)
        result, _o, _e, _r = run_fakes(make_config(max_metric_calls=600), setup, evaluator=ev, sleep_seed=sleep_seed)
        assert result.stop_reason in ("max_metric_calls", "no_progress_possible")  # never a systemic stop


class _Versioned(dspy.Module):
    """One predictor; the prediction carries the instruction it ran with, so a metric can depend on it."""

    def __init__(self) -> None:
        super().__init__()
        self.p = dspy.Predict(dspy.Signature("q -> a", "version 0"))

    def forward(self, q):
        return dspy.Prediction(a=self.p(q=q).a, instr=self.p.signature.instructions)


def _versioned_compile(metric, budget=150, n_train=24, n_val=8):
    from dspy.utils import DummyLM

    from dspy_turbogepa import TurboGEPA

    train = [dspy.Example(q=f"t{i}", i=i).with_inputs("q") for i in range(n_train)]
    val = [dspy.Example(q=f"v{i}", i=100 + i).with_inputs("q") for i in range(n_val)]
    calls = []

    def proposer(candidate, reflective_dataset, components_to_update):
        calls.append(1)
        return dict.fromkeys(components_to_update, f"version {len(calls)}")

    opt = TurboGEPA(metric, max_metric_calls=budget, instruction_proposer=proposer, num_threads=2, track_stats=True,
                    verbose=False, use_merge=False)
    with dspy.context(lm=DummyLM([{"a": "x"}] * 5000)):
        return opt.compile(_Versioned(), trainset=train, valset=val).detailed_results


def test_children_whose_outputs_the_metric_cannot_take_do_not_stop_the_run():
    """The adapter's probe (evaluator._check_metric_still_works): the metric scores the seed's predictions on
    every example, every time, and raises on every child's (outputs it cannot take). Streaks of failed
    evaluations happen, but the probe finds the metric scoring a prediction it scored before: ordinary
    failures, the run goes on to its budget (the engine-level streak rule this replaced stopped it)."""
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred.instr != "version 0":
            raise ValueError("cannot parse the answer")
        return 0.5

    dr = _versioned_compile(metric)
    assert dr.best_idx == 0 and dr.run_stats["failures"].get("metric_error", 0) > 8
    assert dr.total_metric_calls >= 150


def test_a_metric_raising_on_a_fixed_half_of_the_trainset_does_not_stop_the_run_through_dspy():
    """The metric raises on the same half of the training rows from the start (their label is missing) and
    scores the rest: the probe scores a labeled row, so the run goes on to its budget."""
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if gold.i < 100 and gold.i % 2:
            raise KeyError("label")
        return 0.5 if pred.instr == "version 0" else 0.6

    dr = _versioned_compile(metric)
    assert dr.run_stats["failures"].get("metric_error", 0) > 8
    assert dr.total_metric_calls >= 150


def test_a_metric_that_breaks_mid_run_stops_with_the_probes_error_and_the_rerun_scores_again(tmp_path):
    """The metric breaks after its 40th call (its scoring service gone): the probe re-scores a prediction it
    scored before, that raises too, and the run stops with SystemicFailureError naming a broken metric.
    Rerun with the same log_dir once it works again: the failed evaluations are scored again (none stays a
    stored failure), and no finished evaluation is run again."""
    from dspy.utils import DummyLM

    from dspy_turbogepa import TurboGEPA

    state = {"calls": 0, "broken_after": 40}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        state["calls"] += 1
        if state["broken_after"] is not None and state["calls"] > state["broken_after"]:
            raise RuntimeError("the scoring service's connection pool is closed")
        return 0.5 if pred.instr == "version 0" else 0.6

    train = [dspy.Example(q=f"t{i}", i=i).with_inputs("q") for i in range(24)]
    val = [dspy.Example(q=f"v{i}", i=100 + i).with_inputs("q") for i in range(8)]
    calls = []

    def proposer(candidate, reflective_dataset, components_to_update):
        calls.append(1)
        return dict.fromkeys(components_to_update, f"version {len(calls)}")

    def compile_once():
        opt = TurboGEPA(metric, max_metric_calls=150, instruction_proposer=proposer, num_threads=2,
                        track_stats=True, verbose=False, use_merge=False, log_dir=str(tmp_path))
        with dspy.context(lm=DummyLM([{"a": "x"}] * 5000)):
            return opt.compile(_Versioned(), trainset=train, valset=val)

    with pytest.raises(SystemicFailureError) as info:
        compile_once()
    assert info.value.failure == "metric_error" and "broke mid-run" in str(info.value)
    state["broken_after"] = None  # fixed (state the run key does not see)
    dr = compile_once().detailed_results
    assert dr.run_stats["failures"].get("metric_error", 0) == 0
    assert dr.run_stats["metric_calls_replayed"] > 0


@pytest.mark.parametrize("broken_after", [30, 50])
def test_a_metric_broken_mid_run_seen_first_by_its_feedback_calls_stops_the_run_and_the_rerun_scores_again(
        tmp_path, broken_after):
    """A review (session 41): the metric's service went down after its 30th call. Mutations' minibatches
    were mostly served from the cache, so its feedback calls failed first: 25 reflections lost their data,
    and the run ended as "no progress" with 6 scoring failures kept as scores; the rerun replayed them and
    found another program. Now 8 such reflections in a row stop the run as the metric broken mid-run, and
    the rerun once it works scores those evaluations again and finds what an unbroken run finds."""
    import threading

    from dspy_turbogepa.testing import TASKS

    from helpers import quick_compile

    task = TASKS["routing"]
    lock = threading.Lock()
    state = {"calls": 0, "broken_after": None}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:
            state["calls"] += 1
            down = state["broken_after"] is not None and state["calls"] > state["broken_after"]
        if down:
            raise ConnectionError("scoring service unreachable")
        return task.metric(gold, pred, trace, pred_name, pred_trace)

    def texts(program):
        return {name: p.signature.instructions for name, p in program.named_predictors()}

    reference = quick_compile(metric, budget=80, log_dir=str(tmp_path / "reference"))
    state.update(calls=0, broken_after=broken_after)
    with pytest.raises(SystemicFailureError, match="the metric broke mid-run") as info:
        quick_compile(metric, budget=80, log_dir=str(tmp_path / "run"))
    assert info.value.failure == "feedback_error" and "ConnectionError" in str(info.value)
    state["broken_after"] = None  # fixed (a service the run key does not see)
    again = quick_compile(metric, budget=80, log_dir=str(tmp_path / "run"))
    dr = again.detailed_results
    assert dr.run_stats["failures"].get("metric_error", 0) == 0 and dr.run_stats["metric_calls_replayed"] > 0
    assert texts(again) == texts(reference)
    assert dr.val_aggregate_scores == reference.detailed_results.val_aggregate_scores


def test_a_judges_given_up_transient_errors_feed_the_outage_rule_not_the_metric_rule():
    """evaluator._call_metric: a judge's 5xx retried past the policy is 'scored metric_error, marked as the
    service's failure'. Such outcomes must not make the 'metric broke' rule fire (that is the service's
    outage, with its own minimum duration)."""
    clock = [0.0]
    det = SystemicFailureDetector(4, split_sizes={"train": 20, "val": 10}, outage_window=8, clock=lambda: clock[0])
    det.observe(EvalOutcome(0, 1.0), "seed", "val")
    det.observe(EvalOutcome(19, 1.0), "seed", "train")
    for k in range(20):
        det.observe(EvalOutcome(k, 0.0, failure="metric_error", error_type="LMServerError", service_failure=True),
                    f"c{k % 3}", "train")  # within OUTAGE_MIN_SECONDS: no outage yet, and not the metric's fault


# ============================================================================ reflection outage rule


def test_the_reflection_outage_rule_needs_the_streak_and_the_duration_and_ignores_nothing_to_reflect_on():
    """systemic.py: 'proposal_window reflections in a row whose retries ... were given up, over at least
    OUTAGE_MIN_SECONDS, with none it answered between them'; a proposal with nothing to reflect on neither
    breaks nor extends the streak."""
    from dspy_turbogepa.engine.types import NOTHING_TO_REFLECT_ON

    clock = [0.0]
    det = SystemicFailureDetector(8, proposal_window=3, clock=lambda: clock[0], outage_min_seconds=100)
    det.observe_proposal(ProposalOutcome(texts={"a": "x"}))  # a usable one first: past the first-N rule
    down = ProposalOutcome(skipped="proposer_error", message="503", error_type="LMServerError", service_failure=True)
    det.observe_proposal(down)
    det.observe_proposal(down)
    det.observe_proposal(ProposalOutcome(skipped=NOTHING_TO_REFLECT_ON))
    clock[0] = 99.0
    det.observe_proposal(down)  # 3 in a row, but over 99 s
    det.observe_proposal(ProposalOutcome(skipped="invalid_proposal", message="x"))  # answered: starts over
    clock[0] = 500.0
    det.observe_proposal(down)
    det.observe_proposal(down)
    clock[0] = 601.0
    with pytest.raises(SystemicFailureError):
        det.observe_proposal(down)


# ============================================================================ Pareto tie-break vs gepa


def _gepa_fronts(subs):
    """Per-example fronts built the way gepa's GEPAState builds them: programs in index order, a better score
    replaces the front with ``{idx}``, an equal one ``add``s to it; read through get_pareto_front_mapping's
    ``set(front)`` copies."""
    best, fronts = {}, {}
    for p, row in enumerate(subs):
        for vid, s in enumerate(row):
            if vid not in best or s > best[vid]:
                best[vid], fronts[vid] = s, {p}
            elif s == best[vid]:
                fronts[vid].add(p)
    return {vid: set(f) for vid, f in fronts.items()}


def test_frontier_displays_and_selection_agree_on_the_members_with_string_ids():
    """pareto_front_members is 'the one definition of the frontier for parent selection, the progress display,
    summary.json, the plots and MLflow': the same fronts with ids as JSON strings ('10' < '2' as text) and with
    ints give the same members, and FrontierTally's size is that of ParetoFrontier's members."""
    from dspy_turbogepa.engine.frontier import FrontierTally, ParetoFrontier, pareto_front_members

    rng = random.Random(3)
    for _ in range(100):
        n, v = rng.randint(2, 12), rng.randint(2, 12)
        subs = [[rng.choice((0.0, 0.5, 1.0)) for _ in range(v)] for _ in range(n)]
        frontier, tally = ParetoFrontier(range(v)), FrontierTally()
        for p, row in enumerate(subs):
            frontier.add(p, dict(enumerate(row)))
            tally.add(p, dict(enumerate(row)))
        members = set(frontier.non_dominated_members())
        aggregates = {p: frontier.aggregate(p) for p in range(n)}
        as_json = {str(k): sorted(f) for k, f in frontier.fronts().items()}
        assert pareto_front_members(as_json, aggregates) == members
        assert tally.size == len(members)


# ============================================================================ cancellation inside a reflection


def test_cancel_in_flight_inside_a_reflection_ends_the_mutation_as_cancelled_not_as_a_proposer_error():
    """orchestrator._propose: 'the engine's own cancellation, not the proposer's failure'. A Ctrl-C's
    cancel_in_flight that lands while reflections wait on the LM returns at once, records no proposer_error
    skip (the systemic rule must not count it) and commits the interrupted mutations as cancelled."""
    setup = hard_setup(train_n=12, val_n=4)
    started = asyncio.Event()

    async def before(n):
        started.set()
        await asyncio.Event().wait()  # the reflection LM never answers

    refl = FakeReflector(before=before)
    rec = Recorder()
    orch = build(make_config(max_metric_calls=200), FakeEvaluator(setup.task), refl, setup, observers=[rec])

    async def main():
        task = asyncio.ensure_future(orch.run())
        await asyncio.wait_for(started.wait(), 5)
        orch.cancel_in_flight()
        return await asyncio.wait_for(task, 5)

    result = asyncio.run(main())
    assert result.stats.proposal_skips.get("proposer_error", 0) == 0, dict(result.stats.proposal_skips)
    assert result.stats.mutations.get("cancelled", 0) >= 1, dict(result.stats.mutations)
    assert orch.budget.reserved == 0


def test_all_of_cancelled_twice_leaves_no_unretrieved_task_exception():
    """errors.all_of: 'A second cancel while waiting propagates'. Children that end in an error after the
    second cancel must not be reported by asyncio as 'Task exception was never retrieved'."""
    from dspy_turbogepa.engine.errors import all_of

    reported: list = []

    async def child(i):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)
            raise RuntimeError(f"cleanup of {i} failed") from None

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx.get("message")))
        outer = asyncio.ensure_future(all_of(*(child(i) for i in range(3))))
        await asyncio.sleep(0.01)
        outer.cancel()
        await asyncio.sleep(0)
        outer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await outer
        await asyncio.sleep(0.05)

    asyncio.run(main())
    import gc

    gc.collect()
    assert not [m for m in reported if m and "never retrieved" in m], reported


def test_the_reflection_outage_rows_window_is_what_compile_configures():
    """errors.md: 'the reflection LM goes down mid-run: 8 reflections in a row (fewer with a smaller first-N
    window) ...'. compile() passes systemic_proposal_window=MAX_PROPOSAL_WINDOW whatever the data size
    (config.py: 'Not tied to the data: a run on 2 examples must not stop on 2 failed reflections'), so with 4
    examples (first-N window 4) the outage rule still needs 8 reflections in a row."""
    from pathlib import Path

    import dspy

    from dspy_turbogepa import TurboGEPA

    opt = TurboGEPA(lambda gold, pred, trace=None, pred_name=None, pred_trace=None: 1.0, max_metric_calls=100,
                    reflection_lm=dspy.LM("openai/never-called"))
    cfg = opt._engine_config(100, 4, 4, n_examples=4)
    det = SystemicFailureDetector(cfg.systemic_failure_window, cfg.systemic_proposal_window)
    assert cfg.systemic_failure_window == 4 and det.proposal_window == 8
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    row = next(line for line in doc.splitlines() if "reflection LM goes down mid-run" in line)
    assert "fewer with a smaller first-N window" not in row, row


# ============================================================================ chained round-robin turns


def test_a_deferred_chained_turn_never_repeats_a_turn_another_mutation_took_on_the_committed_child(monkeypatch):
    """engine.md step 2 / selection.chained_turn: 'the turn is the child's, as gepa's parent's counter advances
    on every turn: a later mutation from it takes the next one'. The diff defers a chained mutation's turn to
    after its parent's minibatch (_take_turn). With deterministic=False nothing orders that turn before those of
    mutations launched after the child commits: here (timing forced: the chained mutation's minibatch on the
    uncommitted child is slow, and the width grows from 1 to 3 once the child commits, as the adaptive width
    does when acceptances get rare) two later mutations take 'c' then 'a' on the child, then the chained one
    takes 'c' again from its stale counter, and the child's round robin skips 'b'. Before the diff the chained
    turn was taken at adoption, before the child could commit."""
    from dspy_turbogepa.engine import selection

    turns: list = []
    orig_select, orig_chained = selection.ComponentSelector.select, selection.ComponentSelector.chained_turn

    def select(self, parent_fp, *args, **kw):
        out = orig_select(self, parent_fp, *args, **kw)
        turns.append((parent_fp, out[0][0]))
        return out

    def chained_turn(self, child_fp, counter):
        out = orig_chained(self, child_fp, counter)
        turns.append((child_fp, out[0]))
        return out

    monkeypatch.setattr(selection.ComponentSelector, "select", select)
    monkeypatch.setattr(selection.ComponentSelector, "chained_turn", chained_turn)
    comps = ("a", "b", "c")
    setup = hard_setup(train_n=24, val_n=6, components=comps)
    seed_fp = setup.seed().fingerprint
    box: dict = {}

    async def gate(fp, split, example_id):  # a child's minibatch before it commits is slow
        if split == "train" and fp != seed_fp and fp not in box["orch"]._index_by_fp:
            await asyncio.sleep(0.3)

    cfg = make_config(max_metric_calls=120, deterministic=False, max_mutations_in_flight=3, max_siblings=1,
                      candidate_selection="current_best", adaptive_components=False, reflection_scouts=0)
    orch = build(cfg, FakeEvaluator(setup.task, None, gate=gate), FakeReflector(None), setup)
    box["orch"] = orch
    monkeypatch.setattr(orch, "width", lambda: 1 if len(orch._records) < 2 else 3)
    result = run(orch, timeout=30)
    assert result.stats.chaining.get("chained", 0) >= 1  # the case under test happened
    by_parent: dict = {}
    for fp, component in turns:
        by_parent.setdefault(fp, []).append(component)
    for fp, taken in by_parent.items():  # each parent's turns go round the predictors in order
        start = comps.index(taken[0])
        assert taken == [comps[(start + k) % len(comps)] for k in range(len(taken))], (fp[:6], taken)
