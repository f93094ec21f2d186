"""A review of docs/mlflow.md and README.md claims that no other test pinned (test_mlflow.py,
test_docs_examples.py and test_review_doc_claims2.py cover the rest), each on a small compile with the offline
fake LMs and a sqlite MLflow store, or on the tracker alone.

A claim that holds is a plain test whose docstring quotes it. The one found false (a program that cannot be
saved warned besides the tracker's one warning, unmasked) was fixed in tracking/mlflow_tracking.py.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import sqlite3
import statistics
import threading
from pathlib import Path
from types import SimpleNamespace

import dspy
import pytest

from dspy_turbogepa.testing import TASKS

from helpers import quick_compile as run

ROUTING = TASKS["routing"]
TRACKING_LOGGER = "dspy_turbogepa.tracking.mlflow_tracking"


@pytest.fixture
def sqlite_tracking(template_db, tmp_path, monkeypatch) -> str:
    """MLFLOW_TRACKING_URI -> a fresh copy of the template sqlite store; no run left active afterwards."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    monkeypatch.chdir(tmp_path)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


# ---------------------------------------------------------------------------------------- one tracked compile
@pytest.fixture(scope="module")
def tracked(template_db, tmp_path_factory):
    """One compile with use_mlflow=True (no log_dir), track_best_outputs=True, a DSPy callback of our own, some
    TurboGEPA-only constructor arguments set, and the plot function wrapped to see which thread draws it."""
    import mlflow
    from dspy.utils.callback import BaseCallback
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    import dspy_turbogepa.tracking.plots as plots

    where = tmp_path_factory.mktemp("tracked_review")
    shutil.copy(template_db, where / "mlflow.db")
    ends: list = []
    plot_threads: list[int] = []
    original_plot = plots.plot_best_over_time

    def plot(*args, **kwargs):
        plot_threads.append(threading.get_ident())
        return original_plot(*args, **kwargs)

    class Mine(BaseCallback):
        def on_evaluate_end(self, call_id, outputs, exception=None):
            ends.append(outputs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{where / 'mlflow.db'}")
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.setattr(tracking_utils, "_tracking_uri", None)
        mp.setattr(fluent, "_active_experiment_id", None)
        mp.setattr(plots, "plot_best_over_time", plot)
        mp.chdir(where)
        with dspy.context(callbacks=[Mine()]):
            optimized = run(use_mlflow=True, budget=80, track_best_outputs=True, rung_fractions=(0.5, 1.0),
                            token_budget=10**9, time_budget_seconds=600.0)
        assert mlflow.active_run() is None
        client = mlflow.MlflowClient()
        (mlrun,) = client.search_runs(["0"])
        rid = mlrun.info.run_id
        names = sorted(mlrun.data.metrics)
        history = {name: [(m.step, m.value) for m in client.get_metric_history(rid, name)] for name in names}
    return SimpleNamespace(dr=optimized.detailed_results, params=mlrun.data.params, metrics=mlrun.data.metrics,
                           history=history, ends=ends, plot_threads=plot_threads, compile_thread=threading.get_ident())


def test_mlflow_params_are_every_primitive_constructor_argument_rung_fractions_as_json(tracked):
    """mlflow.md, Params: "every constructor argument that is a bool, number, string, or a list / dict of those |
    e.g. ... `rung_fractions` (JSON)"; "Never logged: `None` values"."""
    params = tracked.params
    assert params["rung_fractions"] == "[0.5, 1.0]"
    assert params["token_budget"] == str(10**9) and params["time_budget_seconds"] == "600.0"
    assert params["strict_budget"] == "False" and params["reduction_factor"] == "3.0"
    assert params["component_selector"] == "round_robin" and params["track_best_outputs"] == "True"
    assert "log_dir" not in params and "cost_budget_usd" not in params  # None


def test_mlflow_final_metrics_are_logged_once_at_the_end(tracked):
    """mlflow.md, Metrics: "`final/best_val_score`, ..., `final/wall_seconds` | once, at the end"."""
    finals = [name for name in tracked.history if name.startswith("final/")]
    assert set(finals) == {"final/best_val_score", "final/seed_val_score", "final/best_candidate_idx",
                           "final/num_candidates", "final/total_metric_calls", "final/num_full_val_evals",
                           "final/wall_seconds"}
    assert all(len(tracked.history[name]) == 1 for name in finals)
    assert tracked.metrics["final/num_candidates"] == len(tracked.dr.candidates)


def test_mlflow_pareto_front_agg_is_the_mean_of_the_best_score_on_each_instance(tracked):
    """mlflow.md, Metrics: "`pareto_front_agg` | mean over validation instances of the best score on each"."""
    subscores = tracked.dr.val_subscores
    n_val = len(subscores[0])
    expected = statistics.fmean(max(s[i] for s in subscores) for i in range(n_val))
    assert tracked.metrics["pareto_front_agg"] == pytest.approx(expected)


def test_mlflow_counter_metrics_are_the_run_stats_counts(tracked):
    """mlflow.md, Metrics: "`mutations/<status>`, `failures/<kind>`, `proposal_skips/<reason>` ... | counts";
    "`evals_in_flight_peak`, `mutations_in_flight_peak` | concurrency reached"; `num_candidates`."""
    stats, metrics = tracked.dr.run_stats, tracked.metrics
    assert stats["mutations"] and {f"mutations/{k}": float(v) for k, v in stats["mutations"].items()}.items() \
        <= metrics.items()
    for prefix in ("failures", "proposal_skips"):
        assert {f"{prefix}/{k}": float(v) for k, v in stats[prefix].items()}.items() <= metrics.items()
    assert metrics["evals_in_flight_peak"] == stats["peak_evals_in_flight"] <= 4  # num_threads=4
    assert metrics["mutations_in_flight_peak"] == stats["peak_mutations_in_flight"] >= 1
    assert metrics["num_candidates"] == len(tracked.dr.candidates)


def test_mlflow_evaluation_rows_carry_predictions_with_track_best_outputs(tracked):
    """mlflow.md: "`result_table.json` has the examples and scores; the predictions are empty unless
    `track_best_outputs=True`" (with it, the rows handed to the callbacks hold the program's outputs)."""
    assert len(tracked.ends) == len(tracked.dr.candidates)
    for outputs in tracked.ends:
        assert outputs.results and all(dict(pred) for _, pred, _ in outputs.results)


def test_mlflow_the_plot_is_drawn_on_the_compile_thread(tracked):
    """mlflow.md, Threads: "compile thread (yours) | ... draws the plot"."""
    assert tracked.plot_threads == [tracked.compile_thread]


# ---------------------------------------------------------------------------------------- the tracker alone
def _result():
    from dspy_turbogepa.engine.candidate import Candidate
    from dspy_turbogepa.engine.records import CandidateRecord, EngineResult, RunStats

    def record(index, scores, parents, kind):
        return CandidateRecord(index=index, candidate=Candidate(texts={"p": f"instruction {index}"}, kind=kind),
                               parent_indices=list(parents), val_scores=dict(scores))

    records = [record(0, {0: 0.0, 1: 1.0}, [None], "seed"), record(1, {0: 1.0, 1: 1.0}, [0], "reflection")]
    return EngineResult(records=records, fronts={0: {1}, 1: {0, 1}}, best_index=1, stop_reason="max_metric_calls",
                        total_metric_calls=10, num_full_val_evals=2, wall_seconds=1.0, stats=RunStats(executed=10),
                        val_ids=(0, 1))


def test_mlflow_timeouts_and_intervals_the_page_quotes():
    """mlflow.md: "`finish()` waits up to 60 s for the uploads (5 s after an error ...)"; "a background thread
    sends it with `MlflowClient.log_batch` every second"; "`/health` does not answer within 3 s"; progress
    "at most once a second otherwise"."""
    from dspy_turbogepa.tracking import MlflowRunTracker
    from dspy_turbogepa.tracking.mlflow_tracking import ABORT_TIMEOUT, MAX_CONSECUTIVE_FAILURES

    params = inspect.signature(MlflowRunTracker.__init__).parameters
    assert params["finish_timeout"].default == 60.0 and ABORT_TIMEOUT == 5.0
    assert params["flush_interval"].default == 1.0 and params["sample_interval"].default == 1.0
    assert params["probe_timeout"].default == 3.0 and MAX_CONSECUTIVE_FAILURES == 2


def test_mlflow_two_consecutive_logging_failures_stop_the_tracker_after_one_warning(sqlite_tracking, monkeypatch,
                                                                                    caplog):
    """mlflow.md: "Any other logging error warns once; after two consecutive failures the tracker stops trying.
    Each tracker warns at most once"."""
    import mlflow

    from dspy_turbogepa.tracking import MlflowRunTracker

    calls: list[str] = []

    class Failing(mlflow.MlflowClient):
        def _fail(self, name):
            calls.append(name)
            raise RuntimeError(f"{name} refused")

        def log_batch(self, *a, **k):
            self._fail("log_batch")

        def log_param(self, *a, **k):
            self._fail("log_param")

        def set_tag(self, *a, **k):
            self._fail("set_tag")

        def log_table(self, *a, **k):
            self._fail("log_table")

        def log_dict(self, *a, **k):
            self._fail("log_dict")

        def log_text(self, *a, **k):
            self._fail("log_text")

    monkeypatch.setattr(mlflow, "MlflowClient", Failing)
    with caplog.at_level(logging.WARNING, logger=TRACKING_LOGGER):
        tracker = MlflowRunTracker({"seed": 0}, flush_interval=0.05)
        assert tracker.enabled
        tracker.finish(_result(), None)
    warnings = [r for r in caplog.records if r.name == TRACKING_LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert tracker._dead
    assert "log_table" not in calls and "log_dict" not in calls  # nothing tried after the second failure
    assert mlflow.active_run() is None


def test_mlflow_a_tracker_warns_at_most_once_also_when_saving_the_program_fails(sqlite_tracking, tmp_path, caplog):
    """mlflow.md: "Each tracker warns at most once; the rest goes to the debug log of
    `dspy_turbogepa.tracking.mlflow_tracking`" (here: the plot cannot be written, and the program cannot be
    saved)."""
    from dspy_turbogepa.tracking import MlflowRunTracker

    class Unsavable:
        def save(self, path):
            raise OSError("disk full")

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger=TRACKING_LOGGER):
        tracker = MlflowRunTracker({"seed": 0}, plot_path=blocker / "best_over_time.svg", flush_interval=0.05)
        tracker.finish(_result(), Unsavable())
    warnings = [r.getMessage() for r in caplog.records if r.name == TRACKING_LOGGER and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings


def test_mlflow_metric_names_and_predictor_keys_are_masked_sanitized_and_bounded():
    """mlflow.md: "Metric names are masked too (they hold endpoint names)"; predictor names: "any character other
    than letters, digits, `_ - . / space` becomes `_`; at most 250 characters; two names never share a key"
    (also with the `seed_instructions/` prefix and many long names alike)."""
    from dspy_turbogepa.tracking.mlflow_tracking import _KeyMap

    secret = "sk-proj-ENDPOINTleak0123456789abcdefXYZ"
    keys = _KeyMap()
    metric = keys("", f"rate_limits/endpoints/openai/gpt-x@https://h/v1?key={secret}/window")
    assert secret not in metric and metric.startswith("rate_limits/endpoints/")
    assert keys("seed_instructions", "é+x[ab]") == "seed_instructions/__x_ab_"
    long_keys = {keys("seed_instructions", "p" * 400 + str(i)) for i in range(30)}
    assert len(long_keys) == 30 and all(len(k) <= 250 for k in long_keys)


# ---------------------------------------------------------------------------------------- resume and the run store
@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("resume_review") / "run"
    first = run(budget=50, log_dir=str(log_dir)).detailed_results
    second = run(budget=80, log_dir=str(log_dir)).detailed_results
    return SimpleNamespace(log_dir=log_dir, first=first, second=second)


def test_mlflow_cache_hits_include_the_replayed_stored_evaluations(resumed):
    """mlflow.md, Metrics: "`metric_calls_replayed`, `cache_hits` | ... the replayed ones alone, and cache hits
    (the replayed stored evaluations included)"."""
    stats = resumed.second.run_stats
    assert stats["metric_calls_replayed"] > 0
    assert stats["cache_hits"] >= stats["metric_calls_replayed"]


def test_readme_the_run_store_is_sqlite_in_wal_mode_with_every_evaluation_and_proposal(resumed):
    """README, Layout: "store/ SQLite run store in log_dir (WAL): every evaluation and proposal, for resume"."""
    with sqlite3.connect(Path(resumed.log_dir) / "run.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        evaluations = conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
        proposals = conn.execute("SELECT COUNT(*) FROM proposals").fetchone()[0]
    assert evaluations == resumed.second.total_metric_calls  # every metric call of both sessions, once
    assert proposals > 0


def test_readme_compile_returns_a_new_program_and_leaves_the_student_alone():
    """README: "same `compile()`" as dspy.GEPA, which returns a new program; TurboGEPA.compile: "returns a new
    program (the student is not modified)"."""
    student = ROUTING.make_program()
    before = {n: p.signature.instructions for n, p in student.named_predictors()}
    optimized = run(program=student, budget=60)
    assert optimized is not student
    assert {n: p.signature.instructions for n, p in student.named_predictors()} == before
    assert {n: p.signature.instructions for n, p in optimized.named_predictors()} != before

