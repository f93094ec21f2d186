"""gepa's stop callbacks are asked once per iteration, as gepa asks them: once before the first mutation
and once per committed mutation, not on every scheduler pass (stateful stoppers count their calls)."""

from __future__ import annotations

import pytest
from gepa.utils import NoImprovementStopper

from dspy_turbogepa.engine.selection import SelectorState

from .fakes import FakeReflector, Recorder, Setup, fixed_width, hard_setup, make_config, run_fakes


class Logged:
    """Records the view of every call, then answers like ``inner`` (never stops without one)."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.views: list[tuple[int, int, float]] = []  # (i, total_num_evals, best validation score)
        self.answers: list[bool] = []

    def __call__(self, state: SelectorState) -> bool:
        self.views.append((state.i, state.total_num_evals, max(state.program_full_scores_val_set)))
        answer = bool(self.inner(state)) if self.inner is not None else False
        self.answers.append(answer)
        return answer


@pytest.mark.parametrize("deterministic", [True, False])
def test_called_once_before_the_search_and_once_per_committed_mutation(deterministic: bool) -> None:
    cb, obs = Logged(), Recorder()
    cfg = make_config(max_metric_calls=300, stop_callbacks=(cb,), deterministic=deterministic)
    result, _orch, _ev, _ = run_fakes(cfg, hard_setup(), sleep_seed=1, observers=[obs])
    assert result.stop_reason == "max_metric_calls"
    assert len(obs.mutations) >= 5
    # gepa: once before iteration 1 (state.i == -1), then after each iteration; a mutation is an iteration
    assert len(cb.views) == 1 + len(obs.mutations)
    assert [i for i, _, _ in cb.views] == list(range(-1, len(obs.mutations)))
    assert [n for _, n, _ in cb.views] == sorted(n for _, n, _ in cb.views)  # committed state only


def test_the_calls_are_reproducible_in_deterministic_mode() -> None:
    runs = []
    for sleep_seed in (0, 1, 2):
        cb = Logged()
        run_fakes(make_config(max_metric_calls=300, stop_callbacks=(cb,)), hard_setup(), sleep_seed=sleep_seed)
        runs.append(cb.views)
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("deterministic", [True, False])
def test_not_called_again_once_one_asked_to_stop(deterministic: bool) -> None:
    first = Logged(lambda state: state.i >= 1)  # stops after the second committed mutation
    second = Logged()
    obs = Recorder()
    cfg = make_config(max_metric_calls=2000, stop_callbacks=(first, second), deterministic=deterministic)
    result, _orch, _ev, _ = run_fakes(cfg, hard_setup(), sleep_seed=0, observers=[obs])
    assert result.stop_reason == "stop_callback"
    assert first.answers == [False, False, True]  # the mutations still in flight commit without a call
    assert len(second.views) == 2  # gepa's composite stopper short-circuits too
    assert len(obs.mutations) >= 2


def test_a_callback_that_stops_at_once_leaves_only_the_seed() -> None:
    cb = Logged(lambda state: True)
    setup = hard_setup()
    result, _orch, _ev, refl = run_fakes(make_config(stop_callbacks=(cb,)), setup)
    assert result.stop_reason == "stop_callback"
    assert cb.views == [(-1, len(setup.val_ids), result.records[0].aggregate)]
    assert len(result.records) == 1 and not refl.calls


@pytest.mark.parametrize("deterministic", [True, False])
def test_no_improvement_stopper_waits_for_that_many_mutations_without_improvement(deterministic: bool) -> None:
    """Nothing ever improves: NoImprovementStopper(3) stops after exactly 3 committed mutations (it
    tripped after 3 scheduler passes, before any mutation had committed)."""
    cb, obs = Logged(NoImprovementStopper(3)), Recorder()
    cfg = make_config(max_metric_calls=2000, stop_callbacks=(cb,), deterministic=deterministic)
    result, _orch, _ev, _ = run_fakes(cfg, hard_setup(), reflector=FakeReflector(0, mode="noise"), observers=[obs])
    assert result.stop_reason == "stop_callback"
    assert [i for i, _, _ in cb.views] == [-1, 0, 1, 2]
    assert cb.answers == [False, False, False, True]
    assert len(obs.mutations) >= 3


@pytest.mark.parametrize("deterministic", [True, False])
def test_no_improvement_stopper_lets_an_improving_search_go_on(deterministic: bool) -> None:
    cb, obs = Logged(NoImprovementStopper(3)), Recorder()
    cfg = make_config(max_metric_calls=2000, stop_callbacks=(cb,), deterministic=deterministic)
    result, _orch, _ev, _ = run_fakes(cfg, hard_setup(), sleep_seed=0, observers=[obs])
    assert result.stop_reason == "stop_callback"
    assert len(result.records) > 1  # the search found better programs before the stopper gave up
    best = [b for _, _, b in cb.views]
    assert best[-1] > best[0]
    # it stopped at the third committed mutation in a row that left the best score where it was
    assert best[-5] < best[-4] == best[-3] == best[-2] == best[-1]
    assert [i for i, _, _ in cb.views] == list(range(-1, len(cb.views) - 1))


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("cap", [2, 4])
@pytest.mark.parametrize("width", ["adaptive", "one", "fixed"])
def test_a_candidate_cap_is_never_exceeded_by_work_in_flight(deterministic: bool, cap: int, width: str) -> None:
    """gepa's MaxTrackedCandidatesStopper(n) means n candidates: mutations still in flight when it
    fired (a chained one at width 1, siblings at a fixed width) committed up to 3 more."""
    from gepa.utils.stop_condition import MaxTrackedCandidatesStopper

    overrides = {"adaptive": {}, "one": {"max_mutations_in_flight": 1}, "fixed": fixed_width()}[width]
    obs = Recorder()
    cfg = make_config(max_metric_calls=2000, stop_callbacks=(MaxTrackedCandidatesStopper(cap),),
                      deterministic=deterministic, **overrides)
    result, orch, _ev, _ = run_fakes(cfg, Setup(), sleep_seed=1, observers=[obs])
    assert result.stop_reason == "stop_callback"
    assert len(result.records) == cap
    late = [seq for seq, status in obs.mutations if status == "after_stop"]
    assert orch.stats.mutations["after_stop"] == len(late)


def test_a_stop_at_n_candidates_holds_through_the_drain_after_a_no_progress_stop() -> None:
    """After a deterministic no-progress stop, the mutations planned before it still run (reproducibility)
    and may add children; the callbacks were no longer asked there, so gepa's MaxTrackedCandidatesStopper(2)
    ended a run with 3 candidates. They are asked after each of those commits too."""
    from dspy_turbogepa.engine import Orchestrator

    from .fakes import FakeEvaluator, KeywordTask, run, with_hidden

    ids = tuple(range(12))
    task = with_hidden(KeywordTask(), ids)
    setup = Setup(task=task, train_ids=ids, val_ids=ids)
    cfg = make_config(max_metric_calls=400, deterministic=True, max_mutations_in_flight=4, max_noop_mutations=1,
                      reflection_scouts=0, stop_callbacks=(lambda state: len(state.program_candidates) >= 2,),
                      **fixed_width())
    # mutation 0's reflection gives nothing and its minibatch was paid by the seed's validation (valset is
    # the trainset): a free no-op, so the run stops at commit 1 with mutations 1-3, planned before, to drain
    # (no timing noise: the skip goes by call order, which then is launch order)
    reflector = FakeReflector(None, skip=lambda n: "empty_proposal" if n == 0 else None)
    orch = Orchestrator(cfg, FakeEvaluator(task, None), reflector, setup.seed(), ids, ids, shared_splits=True)
    result = run(orch)
    assert result.stop_reason == "stop_callback"
    assert len(result.records) == 2


def test_a_callback_written_for_gepas_state_reads_its_per_candidate_fields() -> None:
    """A stopper reading GEPAState's frontier or subscores (`len(s.pareto_front_valset)`) crashed the run
    with an AttributeError after paid calls, losing it; dspy.GEPA ran it fine."""
    seen: list[SelectorState] = []

    def gepa_style(state) -> bool:
        seen.append(state)
        return len(state.prog_candidate_val_subscores) >= 3 and len(state.pareto_front_valset) > 0

    setup = hard_setup()
    result, *_ = run_fakes(make_config(max_metric_calls=2000, stop_callbacks=(gepa_style,)), setup, sleep_seed=0)
    assert result.stop_reason == "stop_callback"
    state = seen[-1]
    records = result.records[: len(state.program_candidates)]
    assert state.prog_candidate_val_subscores == [r.val_scores for r in records]
    assert state.parent_program_for_candidate == [r.parent_indices for r in records]
    # gepa counts the seed as found at 0 calls (our results and MLflow too), a child when its validation ended
    assert state.num_metric_calls_by_discovery == [0] + [r.discovery_metric_calls for r in records[1:]]
    assert state.per_program_tracked_scores == state.program_full_scores_val_set
    for vid in setup.val_ids:  # gepa's per-instance front: the best score and every candidate reaching it
        best = max(r.val_scores[vid] for r in records)
        assert state.pareto_front_valset[vid] == best
        assert state.program_at_pareto_front_valset[vid] == {r.index for r in records if r.val_scores[vid] == best}
    # a kept state is a view: later commits do not show through it
    assert len(seen[0].prog_candidate_val_subscores) == 1
    # and a user may copy or pickle it, as gepa's (a mappingproxy in the candidates refused both)
    import copy
    import dataclasses
    import pickle

    for twin in (copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert twin.program_at_pareto_front_valset == state.program_at_pareto_front_valset
        assert twin.prog_candidate_val_subscores == state.prog_candidate_val_subscores
    assert set(dataclasses.asdict(state)) == {f.name for f in dataclasses.fields(state)}  # gepa's fields only
    assert "records" not in repr(state)


def test_reading_a_field_the_state_lacks_names_what_it_has() -> None:
    state = SelectorState(["a"], [{"a": "x"}], [0.5])
    with pytest.raises(AttributeError, match=r"no 'full_program_trace'.*pareto_front_valset"):
        _ = state.full_program_trace
    # a field it has, whose computation failed inside, is not reported as missing
    broken = SelectorState(["a"], [{"a": "x"}], [0.5], records=[object()])  # type: ignore[list-item]
    with pytest.raises(AttributeError, match=r"SelectorState.pareto_front_valset could not be computed"):
        _ = broken.pareto_front_valset


def test_a_callback_broken_from_the_start_stops_before_any_mutation() -> None:
    from dspy_turbogepa.engine.errors import SystemicFailureError

    def broken(state) -> bool:
        raise KeyError("budget")

    setup = hard_setup()
    with pytest.raises(SystemicFailureError, match=r"gepa_kwargs\['stop_callbacks'\]\[1\] \(.*broken\) raised when "
                       r"first asked.*KeyError") as info:
        run_fakes(make_config(stop_callbacks=(lambda state: False, broken)), setup)
    assert info.value.failure == "stop_callback_error"


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_callback_that_raises_later_stops_the_run_and_keeps_what_it_found(
        deterministic: bool, caplog: pytest.LogCaptureFixture) -> None:
    """dspy.GEPA crashes and the run is lost; here the rule that can no longer be checked stops the run
    as if it had asked to, with a warning, and the best program so far is returned."""
    def flaky(state) -> bool:
        if state.i >= 2:
            raise RuntimeError("lost my database connection")
        return False

    cfg = make_config(max_metric_calls=2000, stop_callbacks=(flaky,), deterministic=deterministic)
    with caplog.at_level("WARNING"):
        result, *_ = run_fakes(cfg, hard_setup(), sleep_seed=0)
    assert result.stop_reason == "stop_callback"
    assert len(result.records) >= 2 and result.total_metric_calls < 2000
    assert any("stop_callbacks'][0]" in r.getMessage() and "lost my database connection" in r.getMessage()
               and r.levelname == "WARNING" for r in caplog.records)
