"""Review of what a user sees when a run stops on a whole-run token / dollar cap (commits 3beb2de..HEAD):
the final INFO lines and the progress display, MLflow autologging, ``log_dir``'s report (summary.json,
SVG plots), ``detailed_results`` and gepa stop callbacks combined with a cap, on fresh and resumed runs.

The review found two bugs, fixed and pinned here (a stop callback asked about the mutation a cap refused
took over the stop reason; the progress funnel left out a child scored before the cap refused its
validation); the other tests pin behaviour that was checked and holds. Fake in-process LMs only; MLflow
on a local sqlite store; no sleeps for ordering, no timing asserts.
"""

from __future__ import annotations

import json
import logging
import shutil

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.engine.records import MutationResult
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm, sim_engine
from dspy_turbogepa.tracking.progress import ProgressDisplay

from helpers import small_splits

#: $ per 1M tokens: a handful of calls reaches a dollar cap.
PRICES = {"sim/sim-student": (100.0, 100.0), "sim/sim-reflector": (100.0, 100.0)}


def _compile(task, splits, *, log_dir=None, verbose=False, **kw):
    lm, refl = make_student_lm(seed=0, noise=None), make_reflection_lm(seed=0)
    kw.setdefault("num_threads", 1)
    kw.setdefault("max_metric_calls", 400)
    opt = TurboGEPA(task.metric, reflection_lm=refl, track_stats=True, verbose=verbose,
                    log_dir=str(log_dir) if log_dir else None, **kw)
    with dspy.context(lm=lm):
        program = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    return program.detailed_results, lm, refl


def _tokens(dr) -> int:
    rs = dr.run_stats
    return sum(rs["task_tokens"].values()) + sum(rs["reflection_tokens"].values())


def _paid_calls(*lms) -> int:
    return sum(sim_engine(lm).calls for lm in lms)


def _lines(caplog, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


@pytest.fixture
def splits(routing):
    return small_splits(routing, n_train=16, n_val=8)


# ------------------------------------------------------------------ a cap reached by the seed's validation


def test_a_cap_reached_by_the_seeds_validation_reports_cleanly_and_a_resume_pays_nothing(
        routing, splits, tmp_path, caplog):
    """token_budget=1: the seed's validation (never refused) passes it, so every mutation ends
    budget_stopped. No crash in the report (real plots included), the cap is named in the progress
    display's last line, the result line and summary.json, and a resumed session pays nothing."""
    log_dir = tmp_path / "run"
    for session in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dspy_turbogepa"):
            dr, lm, refl = _compile(routing, splits, log_dir=log_dir, verbose=True, token_budget=1)
        assert dr.stop_reason == "token_budget"
        mutations = dr.run_stats["mutations"]
        assert set(mutations) == {"budget_stopped"} and mutations["budget_stopped"] >= 1
        assert dr.total_metric_calls == len(splits.val)  # only the seed's validation was charged
        if session == 2:
            assert _paid_calls(lm, refl) == 0
            assert "Resuming the run" in caplog.text
        ended = _lines(caplog, "TurboGEPA search ended")
        assert len(ended) == 1 and ended[0].startswith("TurboGEPA search ended (token_budget): ")
        assert "children per rung" not in ended[0]  # no child was scored on anything
        finished = _lines(caplog, "TurboGEPA finished")
        assert len(finished) == 1 and finished[0].startswith("TurboGEPA finished (token_budget): ")
        summary = json.loads((log_dir / "summary.json").read_text())
        assert summary["stop_reason"] == "token_budget" == summary["result"]["stop_reason"]
        assert summary["counts"]["mutations"] == mutations
        assert summary["budgets"]["token_budget"] == 1
        assert summary["result"]["run_stats"]["task_tokens"] == dr.run_stats["task_tokens"]
        for plot in ("best_over_time.svg", "lineage.svg"):
            assert (log_dir / plot).stat().st_size > 0


def test_a_resumed_session_of_a_dollar_capped_run_reports_the_whole_runs_cost(routing, splits, tmp_path, caplog):
    """The result line's "LM cost" and run_stats' cost are the whole run's on a resumed session whose cap
    was already reached (it pays nothing, and says the same total as the session that paid it)."""
    first, lm1, refl1 = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=60, cost_budget_usd=1.0,
                                 price_table=PRICES)
    assert first.stop_reason == "cost_budget"
    with caplog.at_level(logging.INFO, logger="dspy_turbogepa"):
        second, lm2, refl2 = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=150,
                                      cost_budget_usd=1.0, price_table=PRICES)
    assert second.stop_reason == "cost_budget" and _paid_calls(lm2, refl2) == 0
    total = second.run_stats["cost"]["task"] + second.run_stats["cost"]["reflection"]
    assert total == pytest.approx(first.run_stats["cost"]["task"] + first.run_stats["cost"]["reflection"])
    assert total >= 1.0
    (line,) = _lines(caplog, "TurboGEPA finished")
    assert line.startswith("TurboGEPA finished (cost_budget): ") and f"LM cost ${total:.4g}" in line
    assert json.loads((tmp_path / "summary.json").read_text())["stop_reason"] == "cost_budget"


# ------------------------------------------------------------------ MLflow




@pytest.fixture
def local_mlflow(template_db, tmp_path, monkeypatch) -> str:
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's artifacts stay in tmp_path
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow.active_run() is None
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                               key=lambda m: (m.step, m.timestamp))]


def test_mlflow_of_a_capped_run_and_its_resume_names_the_cap_and_never_double_counts(
        routing, splits, tmp_path, local_mlflow):
    """Each session's MLflow run: tag turbogepa.stop_reason names the cap, mutations/budget_stopped is
    run_stats', and the token metrics end at run_stats' whole-run totals. The resumed session's token
    series starts from the first session's total (whole run, as documented) and never goes down."""
    import mlflow

    client = mlflow.MlflowClient()
    log_dir = tmp_path / "run"
    totals = []
    for tokens in (4000, 8000):
        dr, _, _ = _compile(routing, splits, log_dir=log_dir, token_budget=tokens, use_mlflow=True)
        assert dr.stop_reason == "token_budget"
        # every experiment: another test of the session may have set the process's active experiment
        run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        data = run.data
        assert data.tags["turbogepa.stop_reason"] == "token_budget"
        assert data.params["token_budget"] == str(tokens)
        assert data.metrics["mutations/budget_stopped"] == dr.run_stats["mutations"]["budget_stopped"]
        rs = dr.run_stats
        assert data.metrics["lm/task_prompt_tokens"] == rs["task_tokens"]["prompt"]
        assert data.metrics["lm/reflection_prompt_tokens"] == rs["reflection_tokens"]["prompt"]
        series = _history(client, run.info.run_id, "lm/task_prompt_tokens")
        values = [v for _, v in series]
        assert values == sorted(values)
        totals.append((rs["task_tokens"]["prompt"], series))
    (first_total, _), (_, resumed_series) = totals
    assert resumed_series[0][1] == first_total


# ------------------------------------------------------------------ gepa stop callbacks with a cap


def test_a_stop_callback_that_never_stops_leaves_the_caps_stop_reason(routing, splits):
    from gepa.utils import MaxMetricCallsStopper

    dr, _, _ = _compile(routing, splits, token_budget=4000,
                        gepa_kwargs={"stop_callbacks": [MaxMetricCallsStopper(10_000)]})
    assert dr.stop_reason == "token_budget" and dr.run_stats["mutations"]["budget_stopped"] >= 1
    assert _tokens(dr) >= 4000


def test_a_stop_callback_asked_after_the_cap_refused_does_not_take_over_the_stop_reason(routing, splits):
    """token_budget=1: the seed's validation passes the cap, so every mutation is refused before it pays
    anything. The cap stopped the run; a callback that stops after one iteration is asked once after the
    seed (i=-1, False), and, as gepa stops asking once the run is stopping, never again."""
    asked: list[int] = []

    def after_one_iteration(state) -> bool:
        asked.append(state.i)
        return state.i >= 0

    dr, lm, refl = _compile(routing, splits, token_budget=1,
                            gepa_kwargs={"stop_callbacks": [after_one_iteration]})
    assert set(dr.run_stats["mutations"]) == {"budget_stopped"}  # nothing was paid after the seed
    assert sim_engine(refl).calls == 0
    assert dr.stop_reason == "token_budget"
    assert asked == [-1]


# ------------------------------------------------------------------ progress display funnel


def test_a_budget_stopped_child_scored_on_its_minibatch_is_in_the_rung_funnel():
    display = ProgressDisplay(enabled=False)
    # what a token_budget=4000 routing run commits (num_threads=4): the child passed its minibatch,
    # then the cap refused its validation
    result = MutationResult(plan=None, status="budget_stopped", rung_reached=0,  # type: ignore[arg-type]
                            children_tried=1, children_passed=1)
    display.on_mutation(result, "budget_stopped")
    assert display.snapshot().rung_funnel == (1,)


def test_a_budget_stopped_mutation_that_scored_no_child_is_not_in_the_rung_funnel():
    display = ProgressDisplay(enabled=False)
    display.on_mutation(MutationResult(plan=None, status="budget_stopped"), "budget_stopped")  # type: ignore[arg-type]
    display.on_mutation(MutationResult(plan=None, status="rejected_rung0", children_tried=1),  # type: ignore[arg-type]
                        "rejected_rung0")
    assert display.snapshot().rung_funnel == (1,)
