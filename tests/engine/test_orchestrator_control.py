"""Orchestrator control: streaming concurrency, stopping, interruption, systemic failures, termination."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from dspy_turbogepa.engine import Candidate, SystemicFailureError
from dspy_turbogepa.engine.selection import SelectorState
from dspy_turbogepa.engine.types import ProposalOutcome

from .fakes import (
    FakeEvaluator,
    FakeReflector,
    Recorder,
    StopAfter,
    build,
    check_invariants,
    fixed_width,
    hard_setup,
    make_config,
    run,
    run_fakes,
)

# ------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("deterministic", [True, False])
def test_streaming_many_mutations_evaluate_at_once(deterministic: bool) -> None:
    """12 training evaluations must be in flight together: only possible if >= 4 mutations overlap."""
    setup = hard_setup(train_n=30, val_n=8)
    state = {"waiting": 0, "released": False}
    event: dict[str, asyncio.Event] = {}

    async def gate(fp: str, split: str, example_id: int) -> None:
        if split != "train" or state["released"]:
            return
        ev = event.setdefault("e", asyncio.Event())
        state["waiting"] += 1
        if state["waiting"] >= 12:
            state["released"] = True
            ev.set()
        try:
            await asyncio.wait_for(ev.wait(), 2.0)
        except asyncio.TimeoutError:
            raise AssertionError(f"only {state['waiting']} evaluations ever waited together") from None

    cfg = make_config(max_metric_calls=400, max_evals_in_flight=16, max_mutations_in_flight=8,
                      max_reflections_in_flight=4, deterministic=deterministic, **fixed_width())
    ev = FakeEvaluator(setup.task, 1, gate=gate)
    result, orch, ev, _ = run_fakes(cfg, setup, evaluator=ev)
    assert state["released"]
    check_invariants(result, orch, ev, setup)
    assert result.stats.peak_evals_in_flight >= 12
    assert result.stats.peak_mutations_in_flight == 8


def test_evaluations_are_shared_between_concurrent_mutations() -> None:
    # Every mutation evaluates the seed on its minibatch; in-flight requests for the same pair are joined.
    setup = hard_setup(train_n=6, val_n=8)
    cfg = make_config(max_metric_calls=300, max_mutations_in_flight=6, reflection_minibatch_size=6)
    result, orch, ev, _ = run_fakes(cfg, setup, sleep_seed=2)
    check_invariants(result, orch, ev, setup)
    assert result.stats.cache_hits > 0


# ------------------------------------------------------------------------------------- stopping


class CreateFileAfter(Recorder):
    def __init__(self, path: Path, n: int) -> None:
        super().__init__()
        self.path, self.n = path, n

    def on_mutation(self, result, status) -> None:
        super().on_mutation(result, status)
        if len(self.mutations) == self.n:
            self.path.write_text("stop")


@pytest.mark.parametrize("deterministic", [True, False])
def test_stop_file_stops_the_run(tmp_path: Path, deterministic: bool) -> None:
    setup = hard_setup()
    stop = tmp_path / "STOP"
    obs = CreateFileAfter(stop, 3)
    cfg = make_config(max_metric_calls=2000, stop_file=stop, max_mutations_in_flight=2, deterministic=deterministic)
    result, orch, _ev, _ = run_fakes(cfg, setup, sleep_seed=1, observers=[obs])
    assert result.stop_reason == "stop_file"
    assert 3 <= len(obs.mutations) <= 3 + cfg.max_staleness
    assert result.total_metric_calls < 2000
    assert orch.budget.reserved == 0


def test_stop_file_present_before_the_run(tmp_path: Path) -> None:
    stop = tmp_path / "STOP"
    stop.touch()
    setup = hard_setup()
    result, _orch, _ev, refl = run_fakes(make_config(stop_file=stop), setup)
    assert result.stop_reason == "stop_file"
    assert len(result.records) == 1 and result.total_metric_calls == len(setup.val_ids)  # the seed only
    assert not refl.calls


def test_stop_callbacks_receive_selector_state_and_stop() -> None:
    views: list[SelectorState] = []

    def enough(state: SelectorState) -> bool:
        views.append(state)
        return len(state.program_candidates) >= 3

    def never(state: SelectorState) -> bool:
        return False

    setup = hard_setup()
    cfg = make_config(max_metric_calls=2000, stop_callbacks=(never, enough))
    result, _orch, _ev, _ = run_fakes(cfg, setup, sleep_seed=0)
    assert result.stop_reason == "stop_callback"
    assert 3 <= len(result.records) <= 3 + cfg.max_staleness
    assert result.total_metric_calls < 2000
    assert views and all(isinstance(v, SelectorState) for v in views)
    v = views[-1]
    assert v.list_of_named_predictors == ["instr"]
    assert v.program_candidates[0] == setup.task.seed_texts()
    assert len(v.program_full_scores_val_set) == len(v.program_candidates)
    assert len(v.named_predictor_id_to_update_next_for_program_candidate) == len(v.program_candidates)


def test_request_stop_from_another_thread() -> None:
    setup = hard_setup(train_n=30, val_n=8)
    reached = threading.Event()
    asked = threading.Event()

    def on_call(ev: FakeEvaluator, key) -> None:
        if len(ev.order) == 40:
            reached.set()
            asked.wait(10)  # the stopper thread's turn, however late a loaded machine schedules it

    def stop() -> None:
        if reached.wait(10):
            orch.request_stop()
        asked.set()

    ev = FakeEvaluator(setup.task, 3, real_sleep=0.002, on_call=on_call)
    cfg = make_config(max_metric_calls=5000)
    orch = build(cfg, ev, FakeReflector(3, real_sleep=0.002), setup)
    stopper = threading.Thread(target=stop, daemon=True)
    stopper.start()
    started = time.monotonic()
    result = run(orch, timeout=10)
    stopper.join(1)
    assert result.stop_reason == "interrupted"
    assert result.total_metric_calls < 400
    assert time.monotonic() - started < 5
    assert orch.budget.reserved == 0
    assert sum(result.stats.mutations.values()) == sum(result.stats.mutations_by_kind.values())


def test_request_stop_before_run_evaluates_only_the_seed() -> None:
    setup = hard_setup()
    ev = FakeEvaluator(setup.task)
    orch = build(make_config(), ev, FakeReflector(), setup)
    orch.request_stop("stop_callback")
    result = run(orch)
    assert result.stop_reason == "stop_callback"
    assert [r.index for r in result.records] == [0]


def test_control_calls_after_the_run_ended_are_harmless() -> None:
    """A Ctrl-C that lands after asyncio.run returned (its loop closed) but before compile noticed must
    not raise 'Event loop is closed' on the caller's thread and lose the finished result."""
    setup = hard_setup()
    orch = build(make_config(max_metric_calls=60), FakeEvaluator(setup.task), FakeReflector(), setup)
    result = run(orch)
    assert orch._loop is not None and orch._loop.is_closed()
    orch.request_stop()
    orch.cancel_in_flight()
    assert result.records


def test_cancel_during_the_seed_validation_ends_the_run_at_once() -> None:
    """After Ctrl-C's grace period the seed's validation is cancelled too (it could take minutes on a
    slow LM and a big valset); with no evaluated program the run says so instead of returning one."""
    from dspy_turbogepa.engine import RunInterruptedError

    setup = hard_setup(val_n=8)
    started = threading.Event()

    async def never_finishes(fp: str, split: str, example_id: int) -> None:
        started.set()
        await asyncio.sleep(60)

    orch = build(make_config(), FakeEvaluator(setup.task, gate=never_finishes), FakeReflector(), setup)
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(orch.run())
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    t0 = time.monotonic()
    thread.start()
    assert started.wait(5)
    orch.request_stop()
    orch.cancel_in_flight()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - t0 < 5
    assert isinstance(box.get("error"), RunInterruptedError), box


def test_a_cancel_before_the_run_has_a_loop_is_not_lost() -> None:
    """Ctrl-C early in compile: the grace period can expire before the engine thread has started its
    loop. The cancel must still end the run at once, not after the whole seed validation."""
    from dspy_turbogepa.engine import RunInterruptedError

    setup = hard_setup(val_n=8)
    calls: list[int] = []

    async def never_finishes(fp: str, split: str, example_id: int) -> None:
        calls.append(example_id)
        await asyncio.sleep(60)

    orch = build(make_config(), FakeEvaluator(setup.task, gate=never_finishes), FakeReflector(), setup)
    orch.request_stop()
    orch.cancel_in_flight()  # no loop yet: scheduling on it is impossible
    t0 = time.monotonic()
    with pytest.raises(RunInterruptedError):
        asyncio.run(orch.run())
    assert time.monotonic() - t0 < 5 and not calls


def test_cancel_in_flight_after_stop_keeps_the_budget() -> None:
    setup = hard_setup(train_n=30, val_n=8)
    holder: dict = {}

    def on_call(ev: FakeEvaluator, key) -> None:
        if len(ev.order) == 30:
            holder["orch"].request_stop()
            holder["orch"].cancel_in_flight()

    ev = FakeEvaluator(setup.task, 1, on_call=on_call)
    orch = build(make_config(max_metric_calls=1000, max_mutations_in_flight=4), ev, FakeReflector(1), setup)
    holder["orch"] = orch
    result = run(orch)
    assert result.stop_reason == "interrupted"
    assert result.stats.mutations["cancelled"] >= 1
    assert result.total_metric_calls == ev.unique_pairs <= 1000
    assert max(ev.calls.values()) == 1
    assert orch.budget.reserved == 0


# ------------------------------------------------------------------------------------- systemic failures


def always(kind: str = "program_error", error_type: str | None = "ValueError"):
    return lambda texts, split, i: (kind, error_type)


def run_until_error(orch, ev: FakeEvaluator, settle: float = 0.0):
    """Run; return the engine's error, the evaluator calls made when it was raised, and ``settle`` s later."""

    async def main():
        try:
            await orch.run()
        except SystemicFailureError as exc:
            at_raise = len(ev.order)
            await asyncio.sleep(settle)
            return exc, at_raise, len(ev.order)
        raise AssertionError("the run ended without SystemicFailureError")

    return asyncio.run(main())


@pytest.mark.parametrize("val_n", [12, 4])
def test_every_evaluation_failing_raises_after_the_window(val_n: int) -> None:
    setup = hard_setup(val_n=val_n)
    ev = FakeEvaluator(setup.task, fail=always())
    cfg = make_config(systemic_failure_window=8, max_evals_in_flight=1, max_mutations_in_flight=1)
    orch = build(cfg, ev, FakeReflector(), setup)
    err, calls, _ = run_until_error(orch, ev)
    assert (err.failure, err.error_type) == ("program_error", "ValueError")
    n = min(8, val_n)  # a split smaller than the window is judged once every example of it failed
    assert f"the first {n} evaluations on the valset all failed ({n} of them" in str(err)
    # one slot: evaluations run one at a time; only the few started while the error propagates follow it
    assert n <= calls <= n + 3
    assert orch.stats.failures["program_error"] >= n


def test_fewer_initial_failures_than_the_window_do_not_stop_the_run() -> None:
    setup = hard_setup(val_n=8)
    ev = FakeEvaluator(setup.task, 1)
    ev.fail = lambda texts, split, i: ("program_error", "ValueError") if len(ev.order) <= 7 else None
    cfg = make_config(max_metric_calls=150, systemic_failure_window=8, max_evals_in_flight=1)
    result = run(build(cfg, ev, FakeReflector(1), setup))
    assert result.stop_reason == "max_metric_calls"
    assert result.stats.failures["program_error"] == 7


def test_window_counts_failures_of_any_kind() -> None:
    setup = hard_setup(val_n=6)
    kinds = ["metric_error", "format_error", "metric_invalid"]
    ev = FakeEvaluator(setup.task, fail=lambda texts, split, i: (kinds[i % 3], None))
    cfg = make_config(systemic_failure_window=6, max_evals_in_flight=2)
    _err, calls, _ = run_until_error(build(cfg, ev, FakeReflector(), setup), ev)
    assert 6 <= calls <= 8


def test_a_seed_whose_output_never_parses_gets_reflected_on_not_stopped() -> None:
    """Format errors are what reflection can fix (dspy.GEPA's add_format_failure_as_feedback): a seed that
    fails to parse on every example is not a systemic failure until reflected candidates fail too."""
    setup = hard_setup(val_n=12)
    seed = setup.task.seed_texts()
    ev = FakeEvaluator(setup.task, 1)
    ev.fail = lambda texts, split, i: ("format_error", "AdapterParseError") if dict(texts) == dict(seed) else None
    cfg = make_config(max_metric_calls=150, systemic_failure_window=8, max_evals_in_flight=2)
    result = run(build(cfg, ev, FakeReflector(1), setup))
    assert result.stop_reason == "max_metric_calls"
    assert result.stats.failures["format_error"] >= 12
    assert max(r.aggregate for r in result.records) > result.records[0].aggregate == 0.0


def test_output_that_never_parses_stops_after_reflected_candidates_fail_too() -> None:
    setup = hard_setup(val_n=12)
    ev = FakeEvaluator(setup.task, fail=always("format_error", "AdapterParseError"))
    cfg = make_config(max_metric_calls=2000, systemic_failure_window=8, max_evals_in_flight=1,
                      max_mutations_in_flight=1)
    err, calls, _ = run_until_error(build(cfg, ev, FakeReflector(), setup), ev)
    assert err.failure == "format_error"
    assert "on the seed and 2 candidates reflected from its parse failures" in str(err)
    assert len({fp for fp, _, _ in ev.order}) == 3  # the seed and two children, then it stopped
    assert calls <= 12 + 2 * 2 * 3 + 3


def test_fatal_error_type_during_seed_stops_at_once() -> None:
    setup = hard_setup(val_n=12)
    ev = FakeEvaluator(setup.task, fail=lambda texts, split, i: ("program_error", "AuthenticationError", True) if i == 0
                       else None)
    cfg = make_config(max_evals_in_flight=1, systemic_failure_window=100)
    err, calls, _ = run_until_error(build(cfg, ev, FakeReflector(), setup), ev)
    assert err.error_type == "AuthenticationError"
    assert all(split == "val" for _, split, _ in ev.order)  # no mutation was launched
    assert calls <= 2


# regression: _evaluate_many once used asyncio.gather, which left sibling evaluations running after one raised
def test_no_evaluation_starts_after_run_raised() -> None:
    setup = hard_setup(val_n=12)
    ev = FakeEvaluator(setup.task, fail=always())
    cfg = make_config(systemic_failure_window=8, max_evals_in_flight=1)
    _, at_raise, later = run_until_error(build(cfg, ev, FakeReflector(), setup), ev, settle=0.05)
    assert later == at_raise, f"{later - at_raise} evaluations ran after run() raised"


@pytest.mark.parametrize("deterministic", [True, False])
def test_fatal_error_type_after_successes_stops_the_run(deterministic: bool) -> None:
    setup = hard_setup()
    seed_texts = setup.task.seed_texts()
    fatal = []

    def fail(texts, split, i):
        if dict(texts) != seed_texts:
            fatal.append(i)
            return ("program_error", "AuthenticationError", True)
        return None

    ev = FakeEvaluator(setup.task, 2, fail=fail)
    cfg = make_config(max_metric_calls=5000, max_mutations_in_flight=3, deterministic=deterministic)
    orch = build(cfg, ev, FakeReflector(2), setup)
    err, _, _ = run_until_error(orch, ev)
    assert err.error_type == "AuthenticationError"
    assert fatal
    # only mutations already in flight may still have reached their child's evaluation
    assert len(fatal) <= (cfg.max_staleness + 1) * cfg.reflection_minibatch_size
    assert not orch.records[1:]


# regression: deterministic mode once only surfaced errors from the oldest uncommitted mutation
def test_fatal_error_stops_deterministic_run_while_an_older_mutation_is_slow() -> None:
    setup = hard_setup()
    seed_texts = setup.task.seed_texts()
    never: dict[str, asyncio.Event] = {}

    async def before(n: int) -> None:
        if n == 0:  # the first reflection hangs (a slow reflection LM)
            await never.setdefault("e", asyncio.Event()).wait()

    ev = FakeEvaluator(setup.task, fail=lambda t, s, i: None if dict(t) == seed_texts
                       else ("program_error", "AuthenticationError", True))
    orch = build(make_config(max_metric_calls=5000), ev, FakeReflector(before=before), setup)
    with pytest.raises(SystemicFailureError):
        run(orch, timeout=1.0)


def test_fatal_error_stops_fast_mode_run_while_an_older_mutation_is_slow() -> None:
    setup = hard_setup()
    seed_texts = setup.task.seed_texts()
    never: dict[str, asyncio.Event] = {}

    async def before(n: int) -> None:
        if n == 0:
            await never.setdefault("e", asyncio.Event()).wait()

    ev = FakeEvaluator(setup.task, fail=lambda t, s, i: None if dict(t) == seed_texts
                       else ("program_error", "AuthenticationError", True))
    orch = build(make_config(max_metric_calls=5000, deterministic=False), ev, FakeReflector(before=before), setup)
    with pytest.raises(SystemicFailureError):
        run(orch, timeout=2.0)


def test_failures_after_a_success_are_ordinary_data() -> None:
    setup = hard_setup(train_n=12, val_n=8)
    # every training example 5 fails for every candidate (a broken example, not a broken setup)
    ev = FakeEvaluator(setup.task, 1,
                       fail=lambda t, split, i: ("metric_error", "KeyError") if (split, i) == ("train", 5) else None)
    result, orch, ev, _ = run_fakes(make_config(max_metric_calls=200, systemic_failure_window=2), setup, evaluator=ev)
    check_invariants(result, orch, ev, setup)
    assert result.stats.failures["metric_error"] == sum(1 for k in ev.calls if k[2] == 5 and k[1] == "train") > 0
    assert result.stop_reason in ("max_metric_calls", "no_progress_possible")  # the search ran its course
    assert len(result.records) > 1


def test_evaluator_exception_propagates() -> None:
    setup = hard_setup()

    async def boom(fp: str, split: str, i: int) -> None:
        if split == "train":
            raise KeyError("evaluator bug")

    ev = FakeEvaluator(setup.task, gate=boom)
    with pytest.raises(KeyError, match="evaluator bug"):
        run(build(make_config(), ev, FakeReflector(), setup))


@pytest.mark.parametrize("skip", ["empty_proposal", "invalid_proposal", "reflective_dataset_error", "raise"])
def test_a_proposer_that_never_proposes_stops_the_run(skip: str) -> None:
    """A reflection LM that never yields a usable proposal: the run stops after the window instead of
    reflecting until the no-progress limit and returning the seed as if optimized."""
    setup = hard_setup()
    refl = FakeReflector(skip=None if skip == "raise" else (lambda n: skip),
                         raise_on=(lambda n: True) if skip == "raise" else None)
    cfg = make_config(max_metric_calls=5000, systemic_failure_window=6)
    orch = build(cfg, FakeEvaluator(setup.task, 1), refl, setup)
    err, _, _ = run_until_error(orch, orch._evaluator)
    assert "the first 6 reflections all failed" in str(err)
    assert len(refl.calls) <= 6 + cfg.max_mutations_in_flight * cfg.max_siblings + 2


def test_a_reflection_that_echoes_the_current_instruction_stops_the_run() -> None:
    """A reflection LM that answers with the instruction it was shown is a failed reflection: it stops
    after the window, instead of paying for reflections until the no-progress limit."""
    setup = hard_setup()
    refl = FakeReflector(fixed=setup.task.seed_texts())
    cfg = make_config(max_metric_calls=5000, systemic_failure_window=6)
    orch = build(cfg, FakeEvaluator(setup.task, 1), refl, setup)
    err, _, _ = run_until_error(orch, orch._evaluator)
    assert "the first 6 reflections all failed" in str(err) and "unchanged_texts" in str(err)
    assert len(refl.calls) <= 6 + cfg.max_mutations_in_flight * cfg.max_siblings + 2


@pytest.mark.parametrize("deterministic", [True, False])
def test_reflections_that_keep_rebuilding_known_candidates_stop_the_run_soon(deterministic: bool) -> None:
    """Mutations whose reflection rebuilds a known candidate cost no metric call (cache hits) but do pay
    for the reflection: max_paid_noop_mutations of them in a row stop the run, long before the 200 free
    no-ops allowed to mutations that reflect on nothing."""
    setup = hard_setup(train_n=6, val_n=4)
    seed = setup.task.seed_texts()
    refl = FakeReflector(fixed={c: t + " always the same" for c, t in seed.items()})
    cfg = make_config(max_metric_calls=5000, max_paid_noop_mutations=10, deterministic=deterministic,
                      **fixed_width())
    result, *_ = run_fakes(cfg, setup, reflector=refl)
    assert result.stop_reason == "no_progress_possible"
    assert len(refl.calls) <= 1 + 10 + cfg.max_mutations_in_flight * (cfg.max_siblings + 1)
    assert result.total_metric_calls < 200


def test_a_fatal_proposer_failure_stops_the_run_at_once() -> None:
    setup = hard_setup()
    refl = FakeReflector(skip=lambda n: "fatal" if n >= 3 else None)  # fatal even after successes
    orch = build(make_config(max_metric_calls=5000), FakeEvaluator(setup.task, 1), refl, setup)
    err, _, _ = run_until_error(orch, orch._evaluator)
    assert "reflection_lm" in str(err) and err.error_type == "AuthenticationError"


def test_proposer_failures_after_a_usable_proposal_are_ordinary() -> None:
    setup = hard_setup()
    refl = FakeReflector(skip=lambda n: "empty_proposal" if n > 0 else None)
    result, *_ = run_fakes(make_config(max_metric_calls=300, systemic_failure_window=3), setup, reflector=refl,
                           timeout=5.0)
    assert result.stop_reason in ("max_metric_calls", "no_progress_possible")


# ------------------------------------------------------------------------------------- termination


# regression: free no-op mutations (cached parent + skip) once made the run spin forever
@pytest.mark.parametrize("case", ["perfect_seed", "proposer_always_skips"])
def test_run_terminates_when_no_progress_is_possible(case: str) -> None:
    setup = hard_setup(train_n=6, val_n=4)
    if case == "perfect_seed":
        # the seed already knows every keyword: every minibatch is perfect and skipped
        setup.seed_texts = {"instr": "base " + " ".join(f"kw{k}" for k in range(6))}
        from .fakes import KeywordTask

        setup.task = KeywordTask()
        refl = FakeReflector()
    else:
        refl = FakeReflector(skip=lambda n: "no_reflective_data")  # nothing to reflect on: not the proposer's fault
    result, _orch, ev, _ = run_fakes(make_config(max_metric_calls=1000), setup, reflector=refl, timeout=3.0)
    assert result.stop_reason == "no_progress_possible"
    # nothing was paid beyond the seed's valset and the seed on each training example
    assert result.total_metric_calls == len(setup.val_ids) + len(setup.train_ids) == ev.unique_pairs
    assert len(result.records) == 1


def test_stop_after_observer_bounds_zero_cost_runs() -> None:
    # The harness itself: StopAfter is how the policy tests end runs made of free no-op mutations.
    setup = hard_setup(train_n=6, val_n=4)
    stop = StopAfter(25)
    result, _orch, _ev, refl = run_fakes(make_config(max_metric_calls=1000), setup,
                                       reflector=FakeReflector(skip=lambda n: "no_reflective_data"), observers=[stop])
    assert result.stop_reason == "interrupted"
    assert 25 <= sum(result.stats.mutations.values()) <= 25 + make_config().max_staleness
    assert result.total_metric_calls == len(setup.val_ids) + len(setup.train_ids)  # seed on val + all of train
    assert result.stats.proposal_skips["no_reflective_data"] == len(refl.calls)
    assert Candidate(setup.task.seed_texts()).fingerprint == result.records[0].candidate.fingerprint


def test_cancelling_run_is_not_swallowed() -> None:
    setup = hard_setup(train_n=30, val_n=8)
    holder: dict = {}

    def on_call(ev: FakeEvaluator, key) -> None:
        if len(ev.order) == 30:
            holder["task"].cancel()
            holder["calls_at_cancel"] = len(ev.order)

    ev = FakeEvaluator(setup.task, 1, on_call=on_call)
    # regression: run() once swallowed its own cancellation when it arrived while awaiting a mutation
    cfg = make_config(max_metric_calls=3000, max_mutations_in_flight=2, max_staleness=2)
    orch = build(cfg, ev, FakeReflector(1), setup)

    async def main() -> asyncio.Task:
        task = asyncio.ensure_future(orch.run())
        holder["task"] = task
        await asyncio.wait({task}, timeout=5)
        return task

    task = asyncio.run(main())
    assert task.done()
    assert task.cancelled(), (
        f"run() ignored its cancellation: it returned stop_reason={task.result().stop_reason!r} after "
        f"{len(ev.order)} evaluations (cancelled at {holder['calls_at_cancel']})"
    )


@pytest.mark.skipif("max_noop_mutations" not in make_config().__dataclass_fields__, reason="engine without the knob")
def test_max_noop_mutations_bounds_the_free_streak() -> None:
    setup = hard_setup(train_n=6, val_n=4)
    rec = Recorder()
    cfg = make_config(max_metric_calls=1000, max_noop_mutations=5, **fixed_width())
    result, *_ = run_fakes(cfg, setup, reflector=FakeReflector(skip=lambda n: "no_reflective_data"), observers=[rec])
    assert result.stop_reason == "no_progress_possible"
    # the streak only counts mutations that charged nothing: the first epoch pays for the seed's minibatches
    assert 5 <= len(rec.mutations) <= 5 + len(setup.train_ids) + cfg.max_mutations_in_flight


def test_an_echo_of_a_solved_minibatch_is_not_a_failed_reflection() -> None:
    """With skip_perfect_score=False a reflection on a minibatch the parent solves may rightly keep the
    instruction: that must not count toward the systemic first-8-reflections rule."""
    setup = hard_setup()
    seed = setup.task.seed_texts()
    ev = FakeEvaluator(setup.task, 1)
    ev.fail = None
    cfg = make_config(max_metric_calls=300, systemic_failure_window=6, skip_perfect_score=False,
                      perfect_score=0.0)  # every score counts as perfect: nothing to fix anywhere
    result, *_ = run_fakes(cfg, setup, evaluator=ev, reflector=FakeReflector(fixed=seed))
    assert result.stop_reason in ("max_metric_calls", "no_progress_possible")
    assert result.stats.proposal_skips["unchanged_texts"] >= 6


class _KeepsAllButOne(FakeReflector):
    """Rewrites only the component ``target``; answers every other one with its current text, as a
    discerning reflection does for predictors the failures are not about."""

    def __init__(self, target: str, **kw) -> None:
        super().__init__(**kw)
        self.target = target

    async def reflect(self, parent_texts, components, outcomes, seed):
        if self.target in components:
            return await super().reflect(parent_texts, components, outcomes, seed)
        self.calls.append(None)
        return ProposalOutcome(texts={c: parent_texts[c] for c in components})


def test_echoes_of_the_predictors_not_at_fault_are_not_a_broken_proposer() -> None:
    """Round robin over 9 components, only the last one's instruction wrong: a correct proposer keeps the
    other 8 as they are, and those 8 echoes stopped the run as "the first 8 reflections all failed"."""
    names = tuple(f"c{i}" for i in range(9))
    setup = hard_setup(components=names)
    cfg = make_config(max_metric_calls=600, systemic_failure_window=8, component_selector="round_robin",
                      adaptive_components=False, max_mutations_in_flight=1, **fixed_width())
    result, *_ = run_fakes(cfg, setup, reflector=_KeepsAllButOne("c8", sleep_seed=1))
    assert len(result.records) > 1


@pytest.mark.parametrize("sleep_seed", [0, 1, 2])
def test_echoes_of_the_others_while_many_mutations_are_in_flight_are_not_a_broken_proposer(sleep_seed: int) -> None:
    """16 mutations in flight from the seed: the echoes of the two components not at fault arrive before
    the first rewrite of the third, and counting every echo from the N-th on stopped a correct run."""
    setup = hard_setup(components=("c0", "c1", "c2"))
    cfg = make_config(max_metric_calls=400, systemic_failure_window=8, component_selector="round_robin",
                      max_mutations_in_flight=16, max_reflections_in_flight=8, **fixed_width())
    result, *_ = run_fakes(cfg, setup, reflector=_KeepsAllButOne("c2", sleep_seed=sleep_seed), timeout=60)
    assert len(result.records) > 1


def test_a_proposer_that_echoes_every_component_still_stops_the_run() -> None:
    names = tuple(f"c{i}" for i in range(3))
    setup = hard_setup(components=names)
    refl = FakeReflector(fixed=setup.task.seed_texts())
    cfg = make_config(max_metric_calls=5000, systemic_failure_window=6, component_selector="round_robin")
    orch = build(cfg, FakeEvaluator(setup.task, 1), refl, setup)
    err, _, _ = run_until_error(orch, orch._evaluator)
    assert "reflections all failed" in str(err) and "unchanged_texts" in str(err)


def test_a_proposer_that_echoes_what_a_subset_selector_offers_still_stops_the_run() -> None:
    """Counting echoes only once every component had been echoed never counted one when the selector
    offers a subset: an echoing proposer then paid 30 reflections and returned the seed silently."""
    names = tuple(f"c{i}" for i in range(3))
    setup = hard_setup(components=names)
    refl = FakeReflector(fixed=setup.task.seed_texts())
    cfg = make_config(max_metric_calls=5000, systemic_failure_window=6, component_selector=lambda *args: ["c0"],
                      deterministic=False)
    orch = build(cfg, FakeEvaluator(setup.task, 1), refl, setup)
    err, _, _ = run_until_error(orch, orch._evaluator)
    assert "reflections all failed" in str(err) and "unchanged_texts" in str(err)


class _WaitsUntilStopped(FakeReflector):
    """A reflection that waits (as one in a long rate-limit backoff does) until the engine says stop."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: asyncio.Event | None = None

    async def reflect(self, parent_texts, components, outcomes, seed):
        self.stopped = self.stopped or asyncio.Event()
        self.calls.append(None)
        await self.stopped.wait()
        return ProposalOutcome(skipped="proposer_error", message="gave up: the run stopped")

    def stop(self) -> None:
        if self.stopped is not None:
            self.stopped.set()


@pytest.mark.parametrize("how", ["time_budget", "stop_file"])
def test_a_stop_is_noticed_while_every_mutation_waits_on_its_reflection(how: str, tmp_path: Path) -> None:
    """Nothing finishing means nothing woke the loop: a time budget or a stop file went unnoticed while
    reflections sat in rate-limit backoffs (a 3 s time budget took 196 s)."""
    stop_file = tmp_path / "gepa.stop"
    kw = {"max_seconds": 1.0} if how == "time_budget" else {"stop_file": stop_file}
    refl = _WaitsUntilStopped()
    cfg = make_config(max_metric_calls=5000, **kw)
    if how == "stop_file":
        threading.Timer(1.0, stop_file.touch).start()
    started = time.monotonic()
    result, *_ = run_fakes(cfg, hard_setup(), reflector=refl, timeout=20.0)
    assert result.stop_reason == how and refl.calls
    assert time.monotonic() - started < 8.0
