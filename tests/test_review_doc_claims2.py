"""A second review of precise claims, in docs/run_store.md, docs/mlflow.md, README.md, docs/extending.md and
benchmarks/README.md, that no other test pinned; each checked on a small compile with the offline fake LMs
(or the benchmark harness's ``--smoke`` settings).

A claim that holds is a plain test whose docstring quotes it. The one found false (a masked output stored
without its ASCII escapes) was fixed in redaction.py:mask_json_text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import dspy
import pytest

from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.engine import fingerprint_texts
from dspy_turbogepa.store import RunStore, RunStoreMismatchError
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

from helpers import CountingMetric, recording_proposer
from helpers import quick_compile as run

ROOT = Path(__file__).resolve().parents[1]
ROUTING = TASKS["routing"]


def splits(n_train: int = 12, n_val: int = 8):
    return ROUTING.splits(data_seed=0, n_train=n_train, n_val=n_val, n_test=0)


def rows(log_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(Path(log_dir) / "run.sqlite3") as conn:
        return conn.execute(sql, params).fetchall()


def instructions(program: dspy.Module) -> dict[str, str]:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


def prompt_tokens(lm: dspy.LM) -> int:
    return sum((entry.get("usage") or {}).get("prompt_tokens") or 0 for entry in lm.history)


# ================================================================================================ README.md
def test_readme_reused_failures_call_the_metric_again_for_their_feedback():
    """README: "`reflection_feedback_reuse=3` failures already paid for, which call the metric again with
    `pred_name` for their feedback" (scouts off, so every example beyond the minibatch is a reused one)."""
    sizes: list[int] = []
    metric = CountingMetric(ROUTING.metric)
    dr = run(metric, instruction_proposer=recording_proposer(sizes, len), budget=150, data=splits(24, 8),
             num_threads=8, reflection_scouts=0).detailed_results
    assert dr.run_stats["feedback_reused"] > 0
    assert sum(sizes) > 3 * len(sizes)  # reflections read more than their 3-example minibatches
    assert metric.feedback == sum(sizes)  # one pred_name call per example read, the reused failures included
    assert metric.scoring == dr.total_metric_calls  # already paid for: no new scoring call


# ======================================================================================== docs/run_store.md
@pytest.fixture(scope="module")
def extended_run(tmp_path_factory):
    """A run of 80 calls, extended in the same log_dir to 100 with another minibatch size."""
    log_dir = tmp_path_factory.mktemp("extended")
    data = splits(16, 8)
    run(log_dir=str(log_dir), data=data, budget=80)
    stored = rows(log_dir, "SELECT COUNT(*) FROM evaluations")[0][0]
    again = run(log_dir=str(log_dir), data=data, budget=100, reflection_minibatch_size=2).detailed_results
    return SimpleNamespace(log_dir=log_dir, stored=stored, again=again)


def test_run_store_a_resume_with_other_search_settings_can_pass_its_own_budget_well_beyond_the_bound(extended_run):
    """run_store.md: "A session with other search settings (another minibatch size, say) may use few of the
    stored ones, so its total can pass its own `max_metric_calls` well beyond the overshoot bound of
    deviations.md: the budget counts `run_stats["metric_calls_executed"]` + `run_stats["metric_calls_replayed"]`"
    (the overshoot bound: 2 x minibatch + len(valset))."""
    again, stats = extended_run.again, extended_run.again.run_stats
    bound = 100 + 2 * 2 + 8
    assert 0 < stats["metric_calls_replayed"] < extended_run.stored  # only some of the stored ones were used
    assert stats["metric_calls_executed"] + stats["metric_calls_replayed"] < bound  # what the budget counted
    assert again.total_metric_calls == stats["metric_calls_executed"] + extended_run.stored > bound
    assert again.total_metric_calls == rows(extended_run.log_dir, "SELECT COUNT(*) FROM evaluations")[0][0]


def test_run_store_the_measured_reuse_when_the_pipeline_test_is_extended(tmp_path):
    """run_store.md (a measurement the page cites): "a 150-call run extended to 300 reuses all 167 stored
    evaluations and pays 27 new ones (it planned with 300 from the start before, reused 44 and paid 124
    again)" (test_resume.py's test_rerun_and_extension_never_pay_twice setup)."""
    pipeline = TASKS["pipeline"]
    data = pipeline.splits(data_seed=0, n_train=30, n_val=16, n_test=60)

    def session(budget: int):
        opt = TurboGEPA(pipeline.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=6, track_stats=True, log_dir=str(tmp_path), seed=0, verbose=False)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            return opt.compile(pipeline.make_program(), trainset=data.train, valset=data.val).detailed_results

    first = session(150)
    extended = session(300)
    assert first.total_metric_calls == 167
    assert extended.run_stats["metric_calls_replayed"] == 167
    assert extended.total_metric_calls == 167 + 27


def test_run_store_a_resume_appends_events_tagged_with_its_session_and_ignores_known_candidates(extended_run):
    """run_store.md, How resume uses it (4): "A candidate recorded again is ignored; ... events are a log and
    are appended again, tagged with the new `session`"."""
    log_dir = extended_run.log_dir
    assert rows(log_dir, "SELECT id, resumed FROM sessions") == [(1, 0), (2, 1)]
    events = rows(log_dir, "SELECT session, kind, payload_json FROM events")
    for session in (1, 2):
        kinds = {kind for s, kind, _ in events if s == session}
        assert {"run_started", "candidate_accepted", "mutation_committed", "run_finished"} <= kinds, kinds
    seed = [(s, json.loads(p)["fingerprint"]) for s, kind, p in events
            if kind == "candidate_accepted" and json.loads(p)["index"] == 0]
    assert [s for s, _ in seed] == [1, 2] and seed[0][1] == seed[1][1]  # the seed's event, logged again
    assert rows(log_dir, "SELECT session FROM candidates WHERE fingerprint = ?", (seed[0][1],)) == [(1,)]


@pytest.fixture(scope="module")
def first_session(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("first_session")
    run(log_dir=str(log_dir), data=splits(24, 8), budget=100, num_threads=8)
    return log_dir


@pytest.mark.parametrize(("kw", "pays_reflections"), [
    ({}, False), ({"reflection_scouts": 2}, True), ({"reflection_feedback_reuse": 0}, True),
    ({"candidate_selection_strategy": "current_best"}, True)])
def test_run_store_resuming_with_other_reflection_inputs_pays_the_reflections_again(first_session, tmp_path, kw,
                                                                                   pays_reflections):
    """run_store.md: "resuming with another `reflection_feedback_reuse` or `reflection_scouts` ... pays those
    reflections again instead of replaying answers to a different prompt"; "resuming with another
    `candidate_selection_strategy` (which draws differently) pays the reflections again too, even where the
    prompt would have been the same; the evaluations are still replayed"."""
    log_dir = tmp_path / "run"
    shutil.copytree(first_session, log_dir)  # each case resumes its own copy of the same first session
    stats = run(log_dir=str(log_dir), data=splits(24, 8), budget=100, num_threads=8,
                **kw).detailed_results.run_stats
    assert (stats["reflection_calls"] > 0) == pays_reflections, stats["reflection_calls"]
    if "reflection_scouts" not in kw and "reflection_feedback_reuse" not in kw:
        assert stats["metric_calls_executed"] == 0 and stats["metric_calls_replayed"] > 0


_FLAKY = {"fail_calls": {1}, "calls": 0}


def _flaky_proposer(candidate, reflective_dataset, components_to_update):
    _FLAKY["calls"] += 1
    if _FLAKY["calls"] in _FLAKY["fail_calls"]:
        raise RuntimeError("reflection service down")
    return {c: candidate[c] + f" Variant {len(reflective_dataset[c])}." for c in components_to_update}


def test_run_store_a_failed_proposer_is_paid_again_once_and_then_replayed(tmp_path):
    """run_store.md, How resume uses it (2): "failed proposers are not replayed ... Their new results replace
    the old rows, so the next resume replays them"; proposals table: `texts_json` "(empty when skipped)",
    `skipped` "(`proposer_error`, ...)"."""
    data = splits(16, 8)

    def session(fail_calls: set[int]):
        _FLAKY.update(fail_calls=fail_calls, calls=0)
        stats = run(instruction_proposer=_flaky_proposer, log_dir=str(tmp_path), data=data,
                    budget=80).detailed_results.run_stats
        return _FLAKY["calls"], stats

    _, first = session({1})
    assert first["proposal_skips"] == {"proposer_error": 1}
    ((key, texts, message),) = rows(tmp_path, "SELECT key, texts_json, message FROM proposals "
                                              "WHERE skipped = 'proposer_error'")
    assert texts == "{}" and "reflection service down" in message
    calls, _ = session(set())
    assert calls == 1  # only the failed reflection is asked again
    ((skipped, texts, session_id),) = rows(tmp_path, "SELECT skipped, texts_json, session FROM proposals "
                                                     "WHERE key = ?", (key,))
    assert skipped is None and json.loads(texts) and session_id == 2  # the new result replaced the row
    calls, third = session(set())
    assert calls == 0 and third["metric_calls_executed"] == 0


def test_run_store_a_refused_open_leaves_the_refused_openers_pid_in_run_lock(tmp_path):
    """run_store.md, run_key: "A refused open writes nothing to the database (`run.lock` gets the refused
    opener's pid)"."""
    with RunStore.open(tmp_path, {"trainset": "a"}) as store:
        store.record_event("run_started")
    assert (tmp_path / "run.lock").read_text() == str(os.getpid())
    before = (tmp_path / "run.sqlite3").read_bytes()
    code = ("import os, sys\n"
            "from dspy_turbogepa.store import RunStore, RunStoreMismatchError\n"
            "try:\n"
            "    RunStore.open(sys.argv[1], {'trainset': 'b'})\n"
            "except RunStoreMismatchError:\n"
            "    print(os.getpid())\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused_pid = proc.stdout.strip()
    assert refused_pid.isdigit() and refused_pid != str(os.getpid())
    assert (tmp_path / "run.lock").read_text() == refused_pid
    assert (tmp_path / "run.sqlite3").read_bytes() == before
    with pytest.raises(RunStoreMismatchError):  # and the run is still the first one's
        RunStore.open(tmp_path, {"trainset": "b"})


def test_run_store_output_json_is_ascii_escaped_also_when_masked(tmp_path):
    """run_store.md, Schema: "All JSON columns hold JSON text ..., `output_json` and `objective_scores_json`
    ASCII-escaped (`\\uXXXX`)"."""
    outputs = [json.dumps({"answer": "café"}), json.dumps({"answer": "café, key sk-abcdefghijklmnop1234"})]
    with RunStore.open(tmp_path, {"k": "v"}) as store:
        for i, output in enumerate(outputs):
            store.record_evaluation("fp", "val", i, 1.0, None, None, None, None, None, output, None, None)
    stored = [text for (text,) in rows(tmp_path, "SELECT output_json FROM evaluations ORDER BY example_id")]
    assert "sk-abcdefghijklmnop1234" not in stored[1] and "***REDACTED***" in stored[1]
    assert [json.loads(text)["answer"][:4] for text in stored] == ["café", "café"]
    assert all(text.isascii() for text in stored), stored


def test_run_store_reports_come_from_sessions_that_return_a_program_and_are_never_read(tmp_path):
    """run_store.md, Files: "At the end of each session that returns a program, the compile also writes a
    report beside the store: `summary.json` ... and two plots ... They are not read on resume"."""
    reports = ("summary.json", "best_over_time.svg", "lineage.svg")

    def judge_down(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise RuntimeError("judge is down")

    failed = tmp_path / "failed"
    with pytest.raises(SystemicFailureError):
        run(judge_down, log_dir=str(failed), data=splits(6, 4), budget=30)
    assert (failed / "run.sqlite3").is_file() and not any((failed / name).exists() for name in reports)

    done = tmp_path / "done"
    data = splits(6, 4)
    first = run(log_dir=str(done), data=data, budget=30).detailed_results
    for name in reports:  # garbage where the reports were: a resume must not read them
        (done / name).write_text("not a report")
    again = run(log_dir=str(done), data=data, budget=30).detailed_results
    assert again.run_stats["metric_calls_executed"] == 0 and again.total_metric_calls == first.total_metric_calls
    assert json.loads((done / "summary.json").read_text())["stop_reason"] == again.stop_reason
    assert (done / "lineage.svg").read_text().startswith("<svg ")


# ======================================================================================== docs/extending.md
def test_extending_partial_scores_of_pruned_candidates_are_in_the_run_store_only(tmp_path):
    """extending.md (Thompson router row): "`detailed_results` and `log_dir/summary.json` hold the
    per-validation-example scores of every candidate that reached the full valset ...; the partial scores of
    candidates dropped at an earlier rung are in the run store (`run.sqlite3`) only"."""
    n_val = 24
    dr = run(log_dir=str(tmp_path), data=splits(24, n_val), budget=200, num_threads=8).detailed_results
    assert dr.run_stats["mutations"].get("pruned", 0) >= 1
    val_rows = dict(rows(tmp_path, "SELECT fingerprint, COUNT(*) FROM evaluations WHERE split = 'val' "
                                   "GROUP BY fingerprint"))
    partial = {fp for fp, n in val_rows.items() if n < n_val}
    full = {fp for fp, n in val_rows.items() if n == n_val}
    reported = {fingerprint_texts(instructions(program)) for program in dr.candidates}
    assert partial and reported == full and not partial & reported
    summary = json.loads((tmp_path / "summary.json").read_text())["result"]
    assert len(summary["val_subscores"]) == len(dr.candidates)
    assert all(len(scores) == n_val for scores in [*summary["val_subscores"], *dr.val_subscores])


# =========================================================================================== docs/mlflow.md
LONG_SEED = ROUTING.instruction_with_rules("route", []) + " Read the whole ticket first." * 250


@pytest.fixture(scope="module")
def tracked(template_db, tmp_path_factory):
    """One compile with use_mlflow=True (no log_dir) into a fresh sqlite store, an LLM judge as the metric (one
    judge LM for scoring calls, another for feedback calls), a seed instruction past 6000 characters."""
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    where = tmp_path_factory.mktemp("tracked")
    shutil.copy(template_db, where / "mlflow.db")
    lms = SimpleNamespace(student=make_student_lm(), reflection=make_reflection_lm(), judge_score=make_student_lm(),
                          judge_feedback=make_student_lm())
    judges = []
    for lm in (lms.judge_score, lms.judge_feedback):
        judge = ROUTING.make_program()
        judge.set_lm(lm)
        judges.append(judge)
    threads: set[tuple[str, bool]] = set()

    def judged(gold, pred, trace=None, pred_name=None, pred_trace=None):
        judges[pred_name is not None](ticket=gold.ticket)
        threads.update((t.name, t.daemon) for t in threading.enumerate())
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{where / 'mlflow.db'}")
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.setattr(tracking_utils, "_tracking_uri", None)
        mp.setattr(fluent, "_active_experiment_id", None)
        mp.chdir(where)
        dr = run(judged, program=ROUTING.make_program({"route": LONG_SEED}), lm=lms.student,
                 reflection_lm=lms.reflection, use_mlflow=True, budget=80, data=splits(16, 8)).detailed_results
        assert mlflow.active_run() is None
        client = mlflow.MlflowClient()
        (mlrun,) = client.search_runs(["0"])
        history = {name: [m.value for m in client.get_metric_history(mlrun.info.run_id, name)]
                   for name in ("num_candidates",)}
    return SimpleNamespace(dr=dr, lms=lms, threads=threads, params=mlrun.data.params, metrics=mlrun.data.metrics,
                           history=history)


def test_mlflow_instructions_params_hold_at_most_6000_characters(tracked):
    """mlflow.md, Params: "`seed_instructions/<predictor>`, `best_instructions/<predictor>` | the instructions
    (at most 6000 characters)"."""
    assert len(LONG_SEED) > 6000
    seed = tracked.params["seed_instructions/route"]
    assert len(seed) == 6000 and seed.startswith(LONG_SEED[:5900])
    assert len(tracked.params["best_instructions/route"]) <= 6000


def test_mlflow_uploads_run_on_a_daemon_thread_named_turbogepa_mlflow(tracked):
    """mlflow.md, Threads: "`turbogepa-mlflow` (daemon) | the tracker's logging calls"."""
    assert ("turbogepa-mlflow", True) in tracked.threads


def test_mlflow_progress_is_sampled_on_each_new_candidate(tracked):
    """mlflow.md, Metrics: "Progress, sampled on each new candidate and at most once a second otherwise" (the
    `num_candidates` series holds every count from the seed to the last candidate)."""
    n = len(tracked.dr.candidates)
    assert n >= 3
    assert sorted(set(tracked.history["num_candidates"])) == [float(k) for k in range(1, n + 1)]


def test_mlflow_lm_metrics_split_the_program_the_judge_and_the_reflection(tracked):
    """mlflow.md, Metrics: `lm/task_calls` "LM calls the program (and an LLM-judge metric) made in executed
    evaluations"; `lm/reflection_calls`, `lm/reflection_prompt_tokens` "the reflection LM, plus the tokens of
    the metric's feedback calls (an LLM judge; `lm/reflection_calls` counts reflection calls only)"."""
    lms, metrics = tracked.lms, tracked.metrics
    assert len(lms.judge_feedback.history) > 0 and len(lms.reflection.history) > 0
    assert metrics["lm/task_calls"] == len(lms.student.history) + len(lms.judge_score.history)
    assert metrics["lm/task_prompt_tokens"] == prompt_tokens(lms.student) + prompt_tokens(lms.judge_score)
    assert metrics["lm/reflection_calls"] == len(lms.reflection.history)
    assert metrics["lm/reflection_prompt_tokens"] == prompt_tokens(lms.reflection) + prompt_tokens(lms.judge_feedback)


def test_mlflow_rate_limit_metrics_per_endpoint_and_for_the_reflection_lm(tracked):
    """mlflow.md, Metrics: "`rate_limits/endpoints/<endpoint>/<counter>` per LM endpoint (`window`: its AIMD
    in-flight window), `rate_limits/reflection/<counter>` for the reflection LM"."""
    names = set(tracked.metrics)
    assert {f"rate_limits/reflection/{counter}" for counter in tracked.dr.run_stats["rate_limits"]["reflection"]} \
        <= names
    assert any(re.fullmatch(r"rate_limits/endpoints/.+/window", name) for name in names), sorted(names)


def test_mlflow_a_resumed_runs_tokens_are_the_whole_runs_and_its_call_counts_this_sessions(
        template_db, tmp_path, monkeypatch):
    """mlflow.md, Metrics: "tokens and cost are the whole run's, so a resumed run's series starts at what earlier
    sessions paid (the call counts below are this session's)"; `cache_hits` "(the replayed stored evaluations
    included)"."""
    mlflow = pytest.importorskip("mlflow")
    shutil.copy(template_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    log_dir, data = str(tmp_path / "run"), splits(16, 8)
    first = run(log_dir=log_dir, data=data, budget=60).detailed_results.run_stats
    again = run(log_dir=log_dir, data=data, budget=60, use_mlflow=True).detailed_results.run_stats
    assert again["metric_calls_executed"] == 0 and again["reflection_calls"] == 0
    (mlrun,) = mlflow.MlflowClient().search_runs(["0"])
    metrics = mlrun.data.metrics
    assert metrics["lm/task_prompt_tokens"] == first["task_tokens"]["prompt"] > 0
    assert metrics["lm/reflection_prompt_tokens"] == first["reflection_tokens"]["prompt"] > 0
    assert metrics["lm/task_calls"] == 0 and metrics["lm/reflection_calls"] == 0
    assert metrics["cache_hits"] >= metrics["metric_calls_replayed"] > 0


# ==================================================================================== benchmarks/README.md
def _bench():
    """benchmarks/run.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("bench_run_review2", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _harness(out_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--optimizers", "turbo", "--out-dir",
         str(out_dir), *args], capture_output=True, text=True, timeout=180, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_smoke")
    _harness(out)
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_benchmarks_outputs_and_the_provenance_of_a_cell(smoke_dir):
    """benchmarks/README.md: "Outputs in `--out-dir`: `runs/<opt>_<task>_b<B>_s<S>.json` (+ `.log`),
    `summary.json`, `table.md` (median [min, max] over seeds), `ratios.json` and `best_val_vs_time.png`. Every
    cell JSON records what made it (`provenance`: the commit, `+dirty` with uncommitted changes, the dspy, gepa
    and litellm versions, the host and the time)"; `feedback_metric_calls`, `student_peak_inflight`,
    `reflector_mean_inflight` and `reflector_peak_inflight` are in the cell JSON."""
    for name in ("runs/turbo_routing_b60_s0.json", "runs/turbo_routing_b60_s0.log", "summary.json", "table.md",
                 "ratios.json", "best_val_vs_time.png"):
        assert (smoke_dir / name).is_file(), name
    assert "Median [min, max] over seeds" in (smoke_dir / "table.md").read_text()
    cell = json.loads((smoke_dir / "runs" / "turbo_routing_b60_s0.json").read_text())
    for key in ("feedback_metric_calls", "student_peak_inflight", "reflector_mean_inflight",
                "reflector_peak_inflight"):
        assert key in cell, key
    prov = cell["provenance"]
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert prov["commit"] == _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    assert all(prov["versions"][name] for name in ("dspy", "gepa", "litellm"))
    assert prov["host"] == platform.node() and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", prov["utc"])


def test_benchmarks_resume_runs_a_cell_made_with_other_settings_again_and_overwrites_it(smoke_dir, tmp_path):
    """benchmarks/README.md: "`--resume` reuses every cell JSON already in `--out-dir/runs` that was made with
    the same settings (task, budget, seed, threads, time scale, split sizes) and runs only the missing cells (a
    cell file made with other settings is run again and overwritten ...)"."""
    out = tmp_path / "bench"
    shutil.copytree(smoke_dir, out)
    cell_path = out / "runs" / "turbo_routing_b60_s0.json"
    cell = json.loads(cell_path.read_text())
    cell["n_val"] += 1  # another split size
    cell_path.write_text(json.dumps(cell))
    proc = _harness(out, "--resume")
    assert "[stored]" not in proc.stdout
    assert "ignoring turbo_routing_b60_s0.json: made with different settings" in proc.stderr
    rewritten = json.loads(cell_path.read_text())
    assert rewritten["n_val"] == cell["n_val"] - 1 and rewritten["out"] == str(cell_path)
    assert _harness(out, "--resume").stdout.count("[stored]") == 1  # now it matches: reused


def test_benchmarks_overhead_and_memory_defaults():
    """benchmarks/README.md, Overhead: "task `routing` (change with `--tasks`), threads 16, budget 800, seed 0,
    `--repeats` (default 3)", the floor over "the test split (`--n-test`, 300)"; Memory: "task `routing` (400
    train / 40 val ...), `max_metric_calls` 1000 and 5000 (`--budgets`)"."""
    bench = _bench()
    overhead = bench.parse_settings(["--overhead"])
    assert (overhead.tasks, overhead.threads, overhead.budgets, overhead.seeds, overhead.repeats, overhead.n_test) \
        == ("routing", 16, "800", "0", 3, 300)
    memory = bench.parse_settings(["--memory"])
    assert (memory.tasks, memory.n_train, memory.n_val, memory.budgets) == ("routing", 400, 40, "1000,5000")
    assert bench.parse_settings(["--overhead", "--tasks", "pricing"]).tasks == "pricing"


def test_benchmarks_memory_flags_a_run_short_of_95_percent_of_its_budget(tmp_path):
    """benchmarks/README.md, Memory: "A run that makes fewer than 95 % of its budget's metric calls (e.g.
    `no_progress_possible` after a perfect score) is flagged in `memory.md`"."""
    bench = _bench()

    def cell(budget: int, calls: int, stop: str) -> dict:
        return {"mode": "memory", "task": "routing", "seed": 0, "n_train": 80, "n_val": 40, "budget": budget,
                "metric_calls": calls, "stop_reason": stop, "candidates": 3, "rss_before_compile_mb": 100.0,
                "peak_rss_mb": 120.0 + budget / 1000}

    bench.report_memory([cell(1000, 950, "max_metric_calls"), cell(5000, 4749, "no_progress_possible")], tmp_path)
    flagged = (tmp_path / "memory.md").read_text().split("**Stopped early**", 1)[1]
    assert "routing b=5000 (4749 calls, no_progress_possible)" in flagged
    assert "b=1000" not in flagged  # 95 % of its budget: not flagged
