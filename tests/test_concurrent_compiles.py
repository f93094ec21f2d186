"""Two or more compiles running at once in one process (threads: a notebook, a web service, and later
"islands"), and a compile started while another one's Ctrl-C or stop is being handled.

Small real compiles on the in-process fake LMs (and the loopback ``SimServer`` for rate limits). Each
probe compares a compile run beside another with the same compile run alone (deterministic mode), or
checks that what one compile counts, stores, logs or tracks is its own.

Five tests pin bugs found this way (each failed before its fix, 2026-12-05): two compiles' log lines
could not be told apart; a ``verbose=False`` compile printed its INFO lines through a verbose one's
handler; the first progress bar to close un-routed the log lines of a bar still shown; one optimizer
compiled twice at once tracked a run with the other's budget; two runs could land in one MLflow
experiment.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dspy
import pytest

from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.store.sqlite_store import RunStoreError
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm, sim_engine

PIPELINE = TASKS["pipeline"]
PRICING = TASKS["pricing"]
ROUTING = TASKS["routing"]

#: run_stats entries that are wall-clock measurements (timing-dependent by design, engine.md)
_TIMING_STATS = ("evaluation_slots",)


# ------------------------------------------------------------------------------------------ helpers
def _splits(task, n_train: int = 16, n_val: int = 10):
    return task.splits(data_seed=0, n_train=n_train, n_val=n_val, n_test=0)


def _compile(task=PIPELINE, *, seed: int = 1, budget: int = 300, lm=None, reflection_lm=None, metric=None,
             splits=None, program=None, **kw) -> dspy.Module:
    splits = splits or _splits(task)
    kw.setdefault("num_threads", 4)
    kw.setdefault("track_stats", True)
    kw.setdefault("verbose", False)
    opt = TurboGEPA(metric or task.metric, max_metric_calls=budget,
                    reflection_lm=reflection_lm or make_reflection_lm(seed=0), seed=seed, **kw)
    with dspy.context(lm=lm or make_student_lm(seed=0, noise=None)):
        return opt.compile(program or task.make_program(), trainset=splits.train, valset=splits.val)


def _fingerprint(program: dspy.Module) -> dict[str, Any]:
    """Everything a deterministic run decides: the program, the candidates and their scores, the stop
    reason, the metric calls, and every run_stats entry but the wall-clock ones."""
    dr = program.detailed_results
    return {
        "instructions": {name: p.signature.instructions for name, p in program.named_predictors()},
        "candidates": [{n: p.signature.instructions for n, p in c.named_predictors()} for c in dr.candidates],
        "val_aggregate_scores": dr.val_aggregate_scores,
        "parents": dr.parents,
        "total_metric_calls": dr.total_metric_calls,
        "stop_reason": dr.stop_reason,
        "run_stats": {k: v for k, v in dr.run_stats.items() if k not in _TIMING_STATS},
    }


def _diff(alone: dict[str, Any], beside: dict[str, Any]) -> list[str]:
    out = [k for k in alone if k != "run_stats" and alone[k] != beside[k]]
    rs_a, rs_b = alone["run_stats"], beside["run_stats"]
    out += [f"run_stats[{k!r}]: {rs_a.get(k)!r} != {rs_b.get(k)!r}"
            for k in sorted(set(rs_a) | set(rs_b)) if rs_a.get(k) != rs_b.get(k)]
    return out


def _at_once(*works, timeout: float = 60.0) -> list[Any]:
    """Run each ``work()`` on its own thread, all released together by a barrier; their results in
    order (an exception is returned, not raised, so the other's result is still seen)."""
    barrier = threading.Barrier(len(works))
    box: dict[int, Any] = {}

    def run(i, work):
        try:
            barrier.wait(timeout=30)
            box[i] = work()
        except BaseException as exc:  # handed back to the test
            box[i] = exc

    threads = [threading.Thread(target=run, args=(i, w), name=f"compile-{i}") for i, w in enumerate(works)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a compile did not finish"
    return [box[i] for i in range(len(works))]


def _tokens(program: dspy.Module) -> tuple[int, int]:
    rs = program.detailed_results.run_stats
    return (rs["task_tokens"]["prompt"] + rs["task_tokens"]["completion"],
            rs["reflection_tokens"]["prompt"] + rs["reflection_tokens"]["completion"])


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.WARNING, logger="dspy_turbogepa")


# ------------------------------------------------------------------------------------------ results
def test_two_different_compiles_at_once_each_return_what_it_returns_alone():
    """A two-predictor pipeline (seed 1) and a pricing program (seed 2) compiled at once in two threads:
    each returns the program, candidates, scores, metric calls, stop reason and run_stats (tokens, cache
    hits, mutations, rate-limit windows) it returns when run alone."""
    alone = [_fingerprint(_compile(PIPELINE, seed=1)), _fingerprint(_compile(PRICING, seed=2))]
    beside = _at_once(lambda: _compile(PIPELINE, seed=1), lambda: _compile(PRICING, seed=2))
    assert all(isinstance(p, dspy.Module) for p in beside), beside
    for a, b in zip(alone, map(_fingerprint, beside)):
        assert _diff(a, b) == []


def test_two_identical_compiles_on_the_same_lm_objects_share_no_cache_and_count_only_their_own_calls():
    """The same student object, data and seed compiled twice at once through ONE student LM and ONE
    reflection LM (``dspy.configure(lm=...)`` once, two requests of a web service): a shared evaluation cache would
    make the second one's metric calls cache hits; shared usage counting would double the tokens. Each
    must be the run alone, and the two token counts must add up to what the shared LMs answered."""
    alone = _fingerprint(_compile(PIPELINE, seed=1, budget=200))
    lm, refl = make_student_lm(seed=0, noise=None), make_reflection_lm(seed=0)
    student = PIPELINE.make_program()  # one student object too
    state = json.dumps(student.dump_state(), sort_keys=True, default=str)
    beside = _at_once(*[lambda: _compile(PIPELINE, seed=1, budget=200, lm=lm, reflection_lm=refl,
                                         program=student)] * 2)
    for program in beside:
        assert _diff(alone, _fingerprint(program)) == []
    assert beside[0] is not beside[1] and all(p is not student for p in beside)
    assert json.dumps(student.dump_state(), sort_keys=True, default=str) == state  # the student is untouched
    task_lm, refl_lm = sim_engine(lm).stats(), sim_engine(refl).stats()
    assert sum(_tokens(p)[0] for p in beside) == task_lm["prompt_tokens"] + task_lm["completion_tokens"]
    assert sum(_tokens(p)[1] for p in beside) == refl_lm["prompt_tokens"] + refl_lm["completion_tokens"]
    assert sum(p.detailed_results.run_stats["task_lm_calls"] for p in beside) == task_lm["calls"]


# ------------------------------------------------------------------------------------------ budgets
def test_a_token_budget_counts_only_its_own_compiles_tokens_on_a_shared_lm():
    """Compile A has a token budget, B none; both call the same LM objects. A must stop on its own tokens
    only (where exactly is timing-dependent by a mutation, engine.md), never early because of B's calls;
    B must be the run it is alone."""
    budget_tokens = 20_000
    lm, refl = make_student_lm(seed=0, noise=None), make_reflection_lm(seed=0)
    a, b = _at_once(lambda: _compile(PIPELINE, seed=1, budget=400, token_budget=budget_tokens, lm=lm,
                                     reflection_lm=refl),
                    lambda: _compile(PRICING, seed=2, budget=300, lm=lm, reflection_lm=refl))
    assert a.detailed_results.stop_reason == "token_budget" and b.detailed_results.stop_reason != "token_budget"
    # A stopped only once ITS OWN tokens passed the budget (B's ~85k tokens would have stopped it at once)
    assert sum(_tokens(a)) >= budget_tokens, _tokens(a)
    # ... and what each counted is its own: the two counts add up to what the shared LMs answered
    task_lm, refl_lm = sim_engine(lm).stats(), sim_engine(refl).stats()
    assert _tokens(a)[0] + _tokens(b)[0] == task_lm["prompt_tokens"] + task_lm["completion_tokens"]
    assert _tokens(a)[1] + _tokens(b)[1] == refl_lm["prompt_tokens"] + refl_lm["completion_tokens"]
    assert _diff(_fingerprint(_compile(PRICING, seed=2, budget=300)), _fingerprint(b)) == []


def test_a_time_budget_runs_from_its_own_compiles_start():
    """B starts first and keeps running; A starts later with ``time_budget_seconds``: A's clock starts
    with A's search (not B's, not the process's), and B is not stopped by A's budget."""
    def slow(task, seconds=0.01):
        def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
            time.sleep(seconds)
            return task.metric(gold, pred, trace, pred_name, pred_trace)
        return metric

    box: dict[str, Any] = {}
    b_thread = threading.Thread(target=lambda: box.setdefault("b", _compile(PRICING, seed=2, budget=250,
                                                                              metric=slow(PRICING))))
    b_thread.start()
    time.sleep(0.6)
    started = time.monotonic()
    # slow enough that A's search (~170 calls, then no_progress_possible) outlasts 0.8 s on a fast machine
    a = _compile(PIPELINE, seed=1, budget=5000, metric=slow(PIPELINE, 0.03), time_budget_seconds=0.8)
    a_seconds = time.monotonic() - started
    b_thread.join(timeout=60)
    assert a.detailed_results.stop_reason == "time_budget"
    assert a_seconds >= 0.8  # B's 0.6 s head start was not charged to A
    assert box["b"].detailed_results.stop_reason in ("max_metric_calls", "no_progress_possible")


# ------------------------------------------------------------------------------------------ failures
def test_a_compile_that_raises_a_systemic_failure_leaves_the_other_unaffected():
    """A's metric raises on every example (a broken setup: SystemicFailureError after the first window of
    failed evaluations) while B runs on the same LM objects: B returns what it returns alone."""
    def broken_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise KeyError("label")

    alone = _fingerprint(_compile(PIPELINE, seed=1, budget=200))
    lm, refl = make_student_lm(seed=0, noise=None), make_reflection_lm(seed=0)
    a, b = _at_once(lambda: _compile(PRICING, seed=2, metric=broken_metric, lm=lm, reflection_lm=refl),
                    lambda: _compile(PIPELINE, seed=1, budget=200, lm=lm, reflection_lm=refl))
    assert isinstance(a, SystemicFailureError) and a.failure == "metric_error", a
    assert isinstance(b, dspy.Module), b
    assert _diff(alone, _fingerprint(b)) == []


# ------------------------------------------------------------------------------------------ logging
#: Run in a fresh interpreter: a process that configured no logging (pytest's own handlers would count
#: as a logging setup, and no handler of ours would be installed). Scenarios are separated on stderr by
#: "=== <name>" lines; facts the script observed go to stdout as one JSON object.
_LOGGING_SCRIPT = r'''
import json, logging, os, sys, threading, time, types
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import dspy
from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

facts = {}
log = logging.getLogger("dspy_turbogepa")


def compile_(task_name, *, seed=0, budget=120, verbose=True, metric=None, **kw):
    task = TASKS[task_name]
    splits = task.splits(data_seed=0, n_train=16, n_val=10, n_test=0)
    opt = TurboGEPA(metric or task.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0),
                    num_threads=4, seed=seed, verbose=verbose, **kw)
    with dspy.context(lm=make_student_lm(seed=0, noise=None)):
        return opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)


def gated(task_name, at, before=None, wait_for=None, then=None):
    """task's metric; on its at-th call: set `before`, wait for `wait_for`, call `then`."""
    task = TASKS[task_name]
    lock, n = threading.Lock(), [0]

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:
            n[0] += 1
            k = n[0]
        if k == at:
            if before is not None:
                before.set()
            if wait_for is not None:
                wait_for.wait(30)
            if then is not None:
                then()
        return task.metric(gold, pred, trace, pred_name, pred_trace)
    return metric


def in_threads(*works):
    threads = [threading.Thread(target=w) for w in works]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def streams():
    return [type(h.stream).__name__ for h in log.handlers]


def scene(name):
    print(f"=== {name}", file=sys.stderr, flush=True)


# 1. the same program with two seeds at once (a seed sweep in threads), both verbose
scene("labels")
in_threads(lambda: compile_("pipeline", seed=0), lambda: compile_("pipeline", seed=1))

# 2. A verbose=True runs; B (verbose=False, budget 97) runs start to end meanwhile
scene("quiet")
a_running, b_done = threading.Event(), threading.Event()
a = threading.Thread(target=lambda: compile_("pricing", metric=gated("pricing", 1, a_running, b_done)))
a.start()
a_running.wait(30)
compile_("pipeline", budget=97, verbose=False)
b_done.set()
a.join(120)

# 3. A raises SystemicFailureError while B (verbose) still runs: B's lines and result still show
scene("raises")
a_raised = threading.Event()
def broken(gold, pred, trace=None, pred_name=None, pred_trace=None):
    raise KeyError("label")
def a_work():
    try:
        compile_("pricing", metric=broken)
    except SystemicFailureError:
        facts["a_raised"] = True
    finally:
        a_raised.set()
in_threads(a_work, lambda: compile_("pipeline", seed=1, metric=gated("pipeline", 3, wait_for=a_raised)))
facts["handlers_after_raises"] = len(log.handlers)

# 4. Jupyter (the progress bar mode): A's bar is up first, then B's; A ends while B's bar is still shown
scene("bars")
sys.modules.setdefault("ipykernel", types.ModuleType("ipykernel"))
a_bar_up, b_bar_up, a_done = threading.Event(), threading.Event(), threading.Event()
def b_after_a():
    time.sleep(0.6)  # B's compile thread ticks every 0.2 s: its bar is drawn by now
    facts["while_both_bars"] = streams()
    b_bar_up.set()
    a_done.wait(30)
    time.sleep(0.3)
    facts["b_bar_after_a_ended"] = streams()
def a_work4():
    compile_("pricing", metric=gated("pricing", 3, wait_for=b_bar_up))
    a_done.set()
a4 = threading.Thread(target=a_work4)
a4.start()
deadline = time.time() + 20
while streams() != ["_TqdmStream"] and time.time() < deadline:  # A's bar routes the console through tqdm
    time.sleep(0.02)
facts["a_bar_first"] = streams()
b4 = threading.Thread(target=lambda: compile_("pipeline", seed=1, metric=gated("pipeline", 3, then=b_after_a)))
b4.start()
a4.join(120)
b4.join(120)

# 5. logging.basicConfig() alone (a notebook's first line): the progress reaches the user's root handler
sys.modules.pop("ipykernel", None)
scene("basicconfig")
logging.basicConfig(stream=sys.stderr, format="USER %(levelname)s %(name)s: %(message)s")
compile_("pipeline", budget=60)
facts["after_basicconfig"] = [len(log.handlers), log.level]


def level_during(**kw):
    """dspy_turbogepa's level while a compile runs (read by a stop callback), and after it."""
    seen = []
    compile_("pipeline", budget=40, gepa_kwargs={"stop_callbacks": [lambda state: seen.append(log.level)]}, **kw)
    return [max(seen), log.level]


# 6. the same, where the user decided otherwise: the level is left alone
scene("basicconfig_decided")
facts["level_quiet"] = level_during(verbose=False)
logging.getLogger("dspy_turbogepa.engine").setLevel(logging.WARNING)
facts["level_sub_logger_set"] = level_during()
logging.getLogger("dspy_turbogepa.engine").setLevel(logging.NOTSET)
log.propagate = False
facts["level_no_propagate"] = level_during()
log.propagate = True
logging.root.setLevel(logging.ERROR)
facts["level_root_error"] = level_during()
logging.root.setLevel(logging.WARNING)
facts["level_default"] = level_during()
scene("end")
facts["after"] = [len(log.handlers), log.level]
print(json.dumps(facts))
'''


@pytest.fixture(scope="module")
def unconfigured_logging_run(tmp_path_factory) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The scenarios of ``_LOGGING_SCRIPT``: stderr lines per scenario, and the facts it observed."""
    script = tmp_path_factory.mktemp("logging") / "run.py"
    script.write_text(_LOGGING_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": root}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-5000:]
    scenes: dict[str, list[str]] = {}
    current = None
    for line in done.stderr.splitlines():
        if line.startswith("=== "):
            current = line[4:].strip()
            scenes[current] = []
        elif current is not None:
            scenes[current].append(line)
    return scenes, json.loads(done.stdout.strip().splitlines()[-1])


_DSPY_STAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ")


def _message(line: str) -> str:
    """A log line without its timestamp (dspy's ``2026/01/01 10:00:00 ``)."""
    return _DSPY_STAMP.sub("", line)


def test_the_compiles_log_lines_are_stamped_as_dspys_own(unconfigured_logging_run):
    """deviations.md: the handler shows the progress "in dspy's format". The date was logging's default
    (``2026-12-06 15:14:36,378``) beside dspy's own lines (``2026/12/06 15:14:18``)."""
    scenes, _ = unconfigured_logging_run
    ours = [line for line in scenes["labels"] if " dspy_turbogepa." in line]
    assert ours and all(_DSPY_STAMP.match(line) and " INFO dspy_turbogepa." in line[:60] for line in ours
                        if " INFO " in line[:30]), ours[:5]


def test_the_shared_stderr_handler_outlives_a_compile_that_raises_while_another_still_logs(
        unconfigured_logging_run):
    """No logging set up: A stops with SystemicFailureError while B runs; B's progress and result lines
    still reach stderr through the handler they share, which is gone (and the level reset) once both end."""
    scenes, facts = unconfigured_logging_run
    assert facts["a_raised"] is True
    lines = scenes["raises"]
    ended = [i for i, line in enumerate(lines) if "search ended (stopped: " in line and "metric_error" in line]  # A's
    finished = [i for i, line in enumerate(lines) if "TurboGEPA finished (" in line]  # B's result (A has none)
    assert len(ended) == 1 and len(finished) == 1 and finished[0] > ended[0], lines
    assert any("Mutation " in line for line in lines[ended[0]:])  # B's progress after A's end
    assert facts["handlers_after_raises"] == 0 and facts["after"] == [0, 0]


def test_the_progress_lines_of_two_compiles_at_once_say_which_compile_they_belong_to(unconfigured_logging_run):
    """A seed sweep in threads (one program, seeds 0 and 1, verbose=True, no logging set up): the seed's
    validation line, the start line and the progress lines of the two compiles are word for word the same
    (only the timestamp differs), so a user cannot tell whose progress or result a line reports."""
    scenes, _ = unconfigured_logging_run
    lines = scenes["labels"]
    seed_lines = [_message(line) for line in lines if "Seed program: validation score" in line]
    start_lines = [_message(line) for line in lines if "TurboGEPA: budget" in line]
    assert len(seed_lines) == 2 and len(start_lines) == 2, lines
    assert seed_lines[0] != seed_lines[1], seed_lines
    assert start_lines[0] != start_lines[1], start_lines


def test_after_basicconfig_the_progress_reaches_the_users_handler(unconfigured_logging_run):
    """``logging.basicConfig()`` leaves the root at WARNING: dspy.GEPA's progress still shows (dspy sets
    its logger to INFO) but ours was dropped, start to finish (a tutorial migration found 61 lines
    against 0). Our logger is now at INFO for the compile, so the lines reach the user's handler, in the
    user's format, once each; the level is reset after."""
    scenes, facts = unconfigured_logging_run
    lines = scenes["basicconfig"]
    ours = [line for line in lines if line.startswith("USER INFO dspy_turbogepa")]
    assert any("TurboGEPA finished (" in line for line in ours), lines[-10:]
    assert any("Seed program: validation score" in line for line in ours), lines[:10]
    assert not [line for line in lines if _DSPY_STAMP.match(line) and " dspy_turbogepa." in line]  # no 2nd copy
    assert facts["after_basicconfig"] == [0, 0]
    # where the user decided (a quiet compile, a level on a sub-logger, propagation off, the root above
    # WARNING), the level is left alone; at the default it is INFO for the compile, and reset after
    assert facts["level_default"] == [logging.INFO, logging.NOTSET]
    for key in ("level_quiet", "level_sub_logger_set", "level_no_propagate", "level_root_error"):
        assert facts[key] == [logging.NOTSET, logging.NOTSET], (key, facts[key])


def test_a_verbose_false_compile_stays_quiet_beside_a_verbose_one(unconfigured_logging_run):
    """Run alone in a process with no logging set up, ``verbose=False`` prints nothing (tests in
    test_progress_plots.py pin it). Beside a verbose compile it prints its start line, its seed score,
    every new candidate and its result: its output depends on what else runs."""
    scenes, _ = unconfigured_logging_run
    lines = scenes["quiet"]
    assert any("TurboGEPA: budget 120 metric calls" in line for line in lines), lines  # A's own, shown
    assert not [line for line in lines if "TurboGEPA: budget 97 metric calls" in line], lines


def test_a_progress_bar_still_shown_keeps_log_lines_routed_through_tqdm_after_another_bar_closes(
        unconfigured_logging_run):
    """Jupyter (bar mode), two compiles in threads: A's bar routes the console handlers through tqdm.write
    (so a log line does not tear the bar); B's bar finds them routed already and routes nothing itself.
    When A's bar closes it puts the raw stream back although B's bar is still drawn: B's log lines then
    tear it, which the routing exists to prevent."""
    _, facts = unconfigured_logging_run
    assert facts["a_bar_first"] == ["_TqdmStream"]
    assert facts["while_both_bars"] == ["_TqdmStream"]
    assert facts["b_bar_after_a_ended"] == ["_TqdmStream"], facts


# ------------------------------------------------------------------------------------------ log_dir
def _store_facts(log_dir: Path) -> dict[str, Any]:
    with sqlite3.connect(log_dir / "run.sqlite3") as db:
        return {
            "integrity": db.execute("pragma integrity_check").fetchone()[0],
            "sessions": db.execute("select count(*) from sessions").fetchone()[0],
            "open_sessions": db.execute("select count(*) from sessions where closed_at is null").fetchone()[0],
            "evaluations": db.execute("select count(*) from evaluations").fetchone()[0],
            "run_started_budgets": [json.loads(p)["budget"] for (p,) in db.execute(
                "select payload_json from events where kind = 'run_started' order by seq")],
        }


def test_two_compiles_with_their_own_log_dirs_at_once_keep_their_own_stores_and_reports(tmp_path):
    """Each compile's store holds its own evaluations only, is closed and intact; each summary.json
    reports its own run; each program is the one it returns alone; no thread of either is left behind."""
    alone = [_fingerprint(_compile(PIPELINE, seed=1, budget=150)), _fingerprint(_compile(PRICING, seed=2, budget=130))]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    threads_before = {t.ident for t in threading.enumerate()}
    a, b = _at_once(lambda: _compile(PIPELINE, seed=1, budget=150, log_dir=str(a_dir)),
                    lambda: _compile(PRICING, seed=2, budget=130, log_dir=str(b_dir)))
    # pools and store writers are closed when compile returns; their threads end now (within ms; a loaded
    # machine may take longer, but never forever)
    deadline = time.monotonic() + 10
    while True:
        left = [t.name for t in threading.enumerate()
                if t.ident not in threads_before and t.name.startswith("turbogepa")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert left == []
    for before, program, log_dir, budget in ((alone[0], a, a_dir, 150), (alone[1], b, b_dir, 130)):
        assert _diff(before, _fingerprint(program)) == []
        dr = program.detailed_results
        facts = _store_facts(log_dir)
        assert facts == {"integrity": "ok", "sessions": 1, "open_sessions": 0, "evaluations": dr.total_metric_calls,
                         "run_started_budgets": [budget]}
        summary = json.loads((log_dir / "summary.json").read_text())
        assert summary["budgets"]["max_metric_calls"] == budget
        assert summary["result"]["val_aggregate_scores"] == dr.val_aggregate_scores
        assert summary["result"]["total_metric_calls"] == dr.total_metric_calls
        assert summary["result"]["log_dir"] == str(log_dir)


def test_a_second_compile_on_a_log_dir_in_use_is_refused_and_the_first_is_unaffected(tmp_path):
    """While A runs in ``log_dir``, B (the very same compile, as a double-clicked notebook cell would start)
    is refused before any LM call with a RunStoreError naming the directory and the running compile's pid;
    A returns what it returns alone, its store intact with one closed session; and a rerun once A ended
    resumes that store without paying for anything again."""
    alone = _fingerprint(_compile(PIPELINE, seed=1, budget=150))
    log_dir = tmp_path / "run"
    a_running, b_refused = threading.Event(), threading.Event()

    def a_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if not a_running.is_set():
            a_running.set()
            b_refused.wait(30)  # A is mid-run (its seed validation under way) while B tries
        return PIPELINE.metric(gold, pred, trace, pred_name, pred_trace)

    box: dict[str, Any] = {}
    a_thread = threading.Thread(target=lambda: box.setdefault("a", _compile(
        PIPELINE, seed=1, budget=150, metric=a_metric, log_dir=str(log_dir))))
    a_thread.start()
    assert a_running.wait(30)
    b_lm, b_refl = make_student_lm(seed=0, noise=None), make_reflection_lm(seed=0)
    try:
        with pytest.raises(RunStoreError, match=r"in use by another compile that is still running \(pid ") as info:
            _compile(PIPELINE, seed=1, budget=150, log_dir=str(log_dir), lm=b_lm, reflection_lm=b_refl)
    finally:
        b_refused.set()
    a_thread.join(timeout=60)
    assert str(log_dir) in str(info.value) and str(os.getpid()) in str(info.value)
    assert sim_engine(b_lm).calls == 0 and sim_engine(b_refl).calls == 0
    assert _diff(alone, _fingerprint(box["a"])) == []
    facts = _store_facts(log_dir)
    assert facts["integrity"] == "ok" and facts["sessions"] == 1 and facts["open_sessions"] == 0
    assert facts["evaluations"] == box["a"].detailed_results.total_metric_calls

    again = _compile(PIPELINE, seed=1, budget=150, metric=a_metric, log_dir=str(log_dir))
    assert again.detailed_results.run_stats["metric_calls_executed"] == 0
    assert _fingerprint(again)["instructions"] == alone["instructions"]


def test_a_stop_file_in_one_log_dir_stops_only_that_compile(tmp_path):
    """A's metric drops ``gepa.stop`` into A's log_dir after 30 calls: A stops (stop_file); B, in its own
    log_dir, runs on as it runs alone."""
    alone = _fingerprint(_compile(PRICING, seed=2, budget=200))
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    calls, lock = [0], threading.Lock()

    def a_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:
            calls[0] += 1
            if calls[0] == 30:
                (a_dir / "gepa.stop").touch()
        return PIPELINE.metric(gold, pred, trace, pred_name, pred_trace)

    a, b = _at_once(lambda: _compile(PIPELINE, seed=1, budget=2000, metric=a_metric, log_dir=str(a_dir)),
                    lambda: _compile(PRICING, seed=2, budget=200, log_dir=str(b_dir)))
    assert a.detailed_results.stop_reason == "stop_file" and a.detailed_results.total_metric_calls < 200
    assert _diff(alone, _fingerprint(b)) == []
    assert not (b_dir / "gepa.stop").exists()


# ------------------------------------------------------------------------------------------ MLflow


@pytest.fixture
def mlflow_tracking(template_db, tmp_path, monkeypatch) -> Any:
    """MLFLOW_TRACKING_URI -> a fresh sqlite store under tmp_path (artifacts too); an MlflowClient on it."""
    import shutil

    import mlflow

    monkeypatch.chdir(tmp_path)
    shutil.copy(template_db, tmp_path / "mlflow.db")
    # mlflow.set_experiment (gepa_kwargs' mlflow_experiment_name) is process-wide (a global and the
    # MLFLOW_EXPERIMENT_ID variable): undone after the test
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    saved_env = {name: os.environ.get(name) for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.active_run() is None
    yield mlflow.MlflowClient()
    while mlflow.active_run() is not None:
        mlflow.end_run()
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _runs(client) -> list[Any]:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_two_use_mlflow_compiles_at_once_log_two_separate_complete_runs(mlflow_tracking):
    """use_mlflow=True in two compiles at once: two FINISHED runs, each holding only its own compile's
    params, candidate scores, metric-call curve, final numbers and best instructions; no run is left
    active; each program is the one it returns alone."""
    import mlflow

    alone = [_fingerprint(_compile(PIPELINE, seed=1, budget=120)), _fingerprint(_compile(PRICING, seed=2, budget=100))]
    a, b = _at_once(lambda: _compile(PIPELINE, seed=1, budget=120, use_mlflow=True),
                    lambda: _compile(PRICING, seed=2, budget=100, use_mlflow=True))
    assert _diff(alone[0], _fingerprint(a)) == [] and _diff(alone[1], _fingerprint(b)) == []
    runs = _runs(mlflow_tracking)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    by_seed = {r.data.params["seed"]: r for r in runs}
    assert set(by_seed) == {"1", "2"}
    for program, run, budget in ((a, by_seed["1"], 120), (b, by_seed["2"], 100)):
        dr = program.detailed_results
        params, metrics = run.data.params, run.data.metrics
        assert params["max_metric_calls"] == str(budget)
        assert {k.split("/", 1)[1] for k in params if k.startswith("best_instructions/")} == {
            name for name, _ in program.named_predictors()}
        for name, pred in program.named_predictors():
            assert params[f"best_instructions/{name}"] == pred.signature.instructions[:6000]
        assert metrics["final/total_metric_calls"] == dr.total_metric_calls
        assert run.data.tags["turbogepa.stop_reason"] == dr.stop_reason
        scores = mlflow_tracking.get_metric_history(run.info.run_id, "candidate_val_score")
        assert [m.value for m in sorted(scores, key=lambda m: m.step)] == pytest.approx(dr.val_aggregate_scores)
        calls = mlflow_tracking.get_metric_history(run.info.run_id, "metric_calls")
        assert max(m.value for m in calls) == dr.run_stats["metric_calls_executed"]
    assert mlflow.active_run() is None


def test_one_optimizer_compiled_twice_at_once_tracks_each_run_with_its_own_budget(mlflow_tracking):
    """A web service holding one configured optimizer (``max_full_evals=2``) compiles two requests at once:
    A with a valset (budget 2 x (12 + 8) = 40), B without (2 x 12 = 24). Both engines use their own budget,
    but B's MLflow run says ``max_metric_calls=40`` once A resolved its budget after B and before B's
    tracker started. (The interleaving is forced by holding B on the "No valset provided" warning it logs
    between the two points until A is running: any thread switch there does the same.)"""
    splits = _splits(ROUTING, n_train=12, n_val=8)
    a_running = threading.Event()

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        a_running.set()  # B makes no metric call before it is let go: only A's calls get here first
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    class HoldB(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("No valset provided"):
                a_running.wait(30)

    opt = TurboGEPA(metric, max_full_evals=2, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    track_stats=True, verbose=False, use_mlflow=True)
    lm = make_student_lm(seed=0, noise=None)
    box: dict[str, Any] = {}

    def work(name, valset):
        with dspy.context(lm=lm):
            box[name] = opt.compile(ROUTING.make_program(), trainset=splits.train, valset=valset)

    hold = HoldB(level=logging.WARNING)
    tp_logger = logging.getLogger("dspy_turbogepa.teleprompter")
    tp_logger.addHandler(hold)
    try:
        b = threading.Thread(target=work, args=("b", None), name="b")
        b.start()
        time.sleep(0.2)  # B is held on its warning
        work("a", splits.val)
        b.join(timeout=60)
    finally:
        tp_logger.removeHandler(hold)
    assert isinstance(box.get("b"), dspy.Module)
    runs = {r.data.params["valset_size"]: r for r in _runs(mlflow_tracking)}
    assert set(runs) == {"8", "12"}  # A's valset; B validates on its 12 training examples
    assert runs["8"].data.params["max_metric_calls"] == "40"
    assert runs["12"].data.params["max_metric_calls"] == "24"


def test_two_compiles_with_their_own_mlflow_experiment_at_once_each_log_into_its_own(mlflow_tracking, monkeypatch):
    """docs/mlflow.md: with ``gepa_kwargs={"mlflow_experiment_name": ...}`` the tracker "starts its run in
    that experiment". Two compiles at once, experiments "exp-a" and "exp-b": the thread switch between one
    compile's ``set_experiment`` and its ``start_run`` (both are database round trips) is forced here by
    letting both set theirs before either starts its run; one run then lands in the other's experiment."""
    import mlflow

    barrier = threading.Barrier(2)
    original = mlflow.set_experiment

    def set_then_switch(*args, **kwargs):
        experiment = original(*args, **kwargs)
        with contextlib.suppress(threading.BrokenBarrierError):  # a fix that no longer calls it in both threads
            barrier.wait(timeout=5)
        return experiment

    monkeypatch.setattr(mlflow, "set_experiment", set_then_switch)
    a, b = _at_once(
        lambda: _compile(ROUTING, seed=1, budget=40, use_mlflow=True, splits=_splits(ROUTING, 8, 6),
                         gepa_kwargs={"mlflow_experiment_name": "exp-a"}),
        lambda: _compile(ROUTING, seed=2, budget=40, use_mlflow=True, splits=_splits(ROUTING, 8, 6),
                         gepa_kwargs={"mlflow_experiment_name": "exp-b"}))
    assert isinstance(a, dspy.Module) and isinstance(b, dspy.Module), (a, b)
    names = {e.experiment_id: e.name for e in mlflow_tracking.search_experiments()}
    where = {r.data.params["seed"]: names[r.info.experiment_id] for r in _runs(mlflow_tracking)}
    assert where == {"1": "exp-a", "2": "exp-b"}


# ------------------------------------------------------------------------------------------ rate limits
@pytest.mark.http
def test_two_compiles_rate_limited_on_one_shared_endpoint_retry_their_own_429s_and_score_none(monkeypatch):
    """Two compiles at once against ONE loopback endpoint capped at 4 concurrent student requests (a
    request over the cap gets a 429 at once), each asking for 8. Neither crashes or scores a rate limit
    as a failure; each returns the program it returns alone on an uncapped server; every 429 the server
    sent is counted by exactly one compile. AIMD state is per compile (each evaluator has its own
    windows, granting only its own rollouts: executed + retried), not shared by the process: the two
    adapt independently, which is why together they draw more 429s than either alone (docs/extending.md
    calls the windows "per process")."""
    import dspy_turbogepa.teleprompter as tp
    from dspy_turbogepa.adapter.evaluator import DspyEvaluator
    from dspy_turbogepa.adapter.ratelimit import RetryPolicy
    from dspy_turbogepa.testing import ModelConfig, SimConfig, SimServer

    made: list[DspyEvaluator] = []

    class FastRetries(DspyEvaluator):  # the real policy waits 0.5 s and more per retry
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("rate_limit_policy", RetryPolicy(max_retries=10, max_elapsed_s=30.0, base_s=0.005,
                                                               cap_s=0.05))
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(tp, "DspyEvaluator", FastRetries)

    def config(cap):
        return SimConfig(models=(
            ModelConfig("sim-student", "student", median_s=0.01, sigma=0.3, max_concurrency=cap, queue_timeout_s=0),
            ModelConfig("sim-reflector", "reflector", median_s=0.005)))

    def run(srv, task, seed):
        student = dspy.LM("openai/sim-student", api_base=srv.base_url, api_key="x", cache=False)
        reflector = dspy.LM("openai/sim-reflector", api_base=srv.base_url, api_key="x", cache=False,
                            temperature=1.0, max_tokens=4000)
        return _compile(task, seed=seed, budget=90, lm=student, reflection_lm=reflector, num_threads=8,
                        splits=_splits(task, 12, 10))

    with SimServer(config(None), seed=0) as free:
        alone = [_fingerprint(run(free, ROUTING, 1)), _fingerprint(run(free, PIPELINE, 2))]
    made.clear()
    with SimServer(config(4), seed=0) as capped:
        a, b = _at_once(lambda: run(capped, ROUTING, 1), lambda: run(capped, PIPELINE, 2))
        server = capped.stats()["models"]["sim-student"]
    assert isinstance(a, dspy.Module) and isinstance(b, dspy.Module), (a, b)
    assert server["http_429"] > 0 and server["peak_concurrency"] <= 4
    # usage and rate-limit counters are timing-dependent under 429s (a retried two-step rollout pays its
    # first step twice); what the run decided is not
    timing = ("rate_limit_retries", "rate_limits", "task_lm_calls", "task_tokens", "cost")
    for before, program in zip(alone, (a, b)):
        diff = [d for d in _diff(before, _fingerprint(program)) if not d.startswith(tuple(f"run_stats[{k!r}]"
                                                                                       for k in timing))]
        assert diff == []
        assert not program.detailed_results.run_stats["failures"], program.detailed_results.run_stats["failures"]
    assert len(made) == 2 and made[0]._windows is not made[1]._windows
    limits = [p.detailed_results.run_stats["rate_limits"] for p in (a, b)]
    assert sum(lim["rate_limited"] for lim in limits) == server["http_429"]
    assert all(lim["rate_limit_gave_up"] == 0 for lim in limits)
    for program, lim in zip((a, b), limits):
        (window,) = lim["endpoints"].values()
        rs = program.detailed_results.run_stats
        assert window["limit"] == 8
        assert window["grants"] == rs["metric_calls_executed"] + lim["rate_limit_retries"] + lim["transient_retries"]


# ------------------------------------------------------------------------------------------ Ctrl-C
def test_a_compile_started_while_another_handles_its_ctrl_c_runs_as_alone_and_the_first_keeps_its_log_dir(
        tmp_path):
    """A compiles on the main thread (where Ctrl-C lands) with a log_dir. A Ctrl-C arrives; while A's
    in-flight work finishes (the grace period), C asks for A's log_dir and is refused (A still holds it),
    and B, another compile, starts and runs to its end in a thread. Only A is interrupted (it returns
    its best so far); B returns what it returns alone."""
    alone_b = _fingerprint(_compile(PRICING, seed=2, budget=150))
    log_dir = tmp_path / "a"
    interrupted, b_done = threading.Event(), threading.Event()
    box: dict[str, Any] = {}

    class SeesTheInterrupt(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Interrupted: no new mutation"):
                interrupted.set()

    def during_a_grace_period():
        if not interrupted.wait(30):
            return
        try:
            _compile(PIPELINE, seed=1, budget=150, log_dir=str(log_dir))
        except RunStoreError as exc:
            box["c"] = exc
        try:
            box["b"] = _compile(PRICING, seed=2, budget=150)
        finally:
            b_done.set()

    calls, lock = [0], threading.Lock()

    def a_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:
            calls[0] += 1
            k = calls[0]
        if k == 40:
            threading.Timer(0.05, _thread.interrupt_main).start()
        if k >= 40:  # A's work in flight outlasts B's whole compile (well within the 10 s grace)
            interrupted.wait(10)
            b_done.wait(8)
        return PIPELINE.metric(gold, pred, trace, pred_name, pred_trace)

    runner_log = logging.getLogger("dspy_turbogepa.adapter.runner")
    handler = SeesTheInterrupt(level=logging.WARNING)
    runner_log.addHandler(handler)
    watcher = threading.Thread(target=during_a_grace_period)
    watcher.start()
    try:
        a = _compile(PIPELINE, seed=1, budget=2000, metric=a_metric, log_dir=str(log_dir))
    finally:
        runner_log.removeHandler(handler)
        interrupted.set()
        watcher.join(timeout=60)
    assert a.detailed_results.stop_reason == "interrupted"
    assert b_done.is_set()
    assert isinstance(box.get("c"), RunStoreError) and "in use by another compile" in str(box["c"])
    assert _diff(alone_b, _fingerprint(box["b"])) == []
    facts = _store_facts(log_dir)
    assert facts["integrity"] == "ok" and facts["sessions"] == 1 and facts["open_sessions"] == 0


def test_every_compile_sharing_the_log_handler_is_numbered_a_quiet_one_too(capsys, monkeypatch):
    """Found by a review: a ``verbose=False`` compile was neither numbered nor counted, so beside one
    verbose compile neither's lines were labelled, and beside two its warnings said ``[#0]``."""
    from dspy_turbogepa.tracking.console_logs import visible_logs

    from helpers import no_logging_configured

    log = logging.getLogger("dspy_turbogepa.labels_probe")
    with no_logging_configured(monkeypatch):
        for n_verbose in (1, 2):
            go, logged = threading.Barrier(n_verbose + 2), threading.Barrier(n_verbose + 2)
            entered, done = threading.Event(), threading.Event()

            def run(verbose):
                with visible_logs(verbose):
                    entered.set()
                    go.wait()
                    log.warning("from verbose=%s", verbose)
                    logged.wait()
                    done.wait()

            threads = [threading.Thread(target=run, args=(v,)) for v in [True] * n_verbose + [False]]
            threads[0].start()
            assert entered.wait(10)  # the first verbose compile installs the handler before the others start
            for t in threads[1:]:
                t.start()
            go.wait()
            logged.wait()  # every thread has logged while every compile still holds the handler
            done.set()
            for t in threads:
                t.join()
            lines = [line for line in capsys.readouterr().err.splitlines() if "from verbose=" in line]
            labels = sorted(line.split(": ", 1)[1].split("]")[0] + "]" for line in lines)
            assert labels == sorted(f"[#{i}]" for i in range(1, n_verbose + 2)), lines
