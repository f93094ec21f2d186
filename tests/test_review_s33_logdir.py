"""Review (session 33): the ``log_dir`` run store and resume under situations users actually hit.

Killed (SIGKILL) and Ctrl-C'd runs at several points (LM calls counted on the rerun), a cwd that
changes under a relative ``log_dir``, edits the run key misses (a module-level constant, a decorated
metric, an LM's other sampling settings), damaged and truncated store files, deleted report files,
paths with spaces and non-ASCII characters, and the saved program loaded in a process that never
imports ``dspy_turbogepa``. The six bugs it found are fixed; their tests assert the correct behaviour.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.store import RunStoreError, RunStoreMismatchError
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm, sim_engine

from helpers import small_splits

pytestmark = pytest.mark.timeout(120)

ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
ROUTING = TASKS["routing"]


def _compile(log_dir, metric=None, budget: int = 60, student_kwargs=None, **kw):
    """A small routing compile on the in-process fake LMs; returns (program, student calls, reflection calls)."""
    data = small_splits(ROUTING, n_train=12, n_val=8, n_test=0)
    student, reflector = make_student_lm(noise=0.1, **(student_kwargs or {})), make_reflection_lm()
    kw.setdefault("num_threads", 2)
    opt = TurboGEPA(metric or ROUTING.metric, max_metric_calls=budget, reflection_lm=reflector, track_stats=True,
                    verbose=False, log_dir=None if log_dir is None else str(log_dir), **kw)
    with dspy.context(lm=student):
        program = opt.compile(ROUTING.make_program(), trainset=data.train, valset=data.val)
    return program, sim_engine(student).calls, sim_engine(reflector).calls


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory):
    """A log_dir holding a finished (cleanly closed) run, and that run's validation scores."""
    log_dir = tmp_path_factory.mktemp("finished") / "run"
    program, _, _ = _compile(log_dir)
    return log_dir, list(program.detailed_results.val_aggregate_scores)


def _copy(store_dir: Path, dest: Path) -> Path:
    shutil.copytree(store_dir, dest)
    return dest


# ------------------------------------------------------------------------------------------ kill -9

_KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    import dspy

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal
    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

    out, log_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=16, n_val=8, n_test=0)
    calls = {"student": 0, "reflect": 0}
    lock = threading.Lock()
    kind, _, at = mode.partition(":")

    def hook(name):
        def before(request):
            with lock:
                calls[name] += 1
                n = calls[name]
            if kind == "ctrl_c" and name == "student" and n == int(at):
                os.kill(os.getpid(), signal.SIGINT)
            if kind == name and n == int(at):
                committed("select count(*) from evaluations")
                os.kill(os.getpid(), signal.SIGKILL)
        return before

    def committed(count_sql):
        # Waits until the store holds such a row. It commits on its writer thread every 50 ms: on a loaded
        # machine the first 60 fast calls can all finish before its first commit, and a kill then tests
        # nothing (0 rows stored).
        import sqlite3
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(f"file:{log_dir}/run.sqlite3?mode=ro", uri=True) as db:
                    if db.execute(count_sql).fetchone()[0] > 0:
                        return
            except sqlite3.Error:
                pass  # not created yet
            time.sleep(0.01)

    if kind == "report":  # killed while the finished run writes summary.json (after the search)
        import dspy_turbogepa.tracking.summary as summary

        def killed(*args, **kwargs):
            time.sleep(float(at))
            # the search's rows are all committed once the run_finished event recorded after them is
            committed("select count(*) from events where kind = 'run_finished'")
            os.kill(os.getpid(), signal.SIGKILL)
        summary.write_summary = killed

    student = make_student_lm(seed=0, noise=0.1, before_call=hook("student"))
    reflector = make_reflection_lm(seed=0, before_call=hook("reflect"))
    opt = TurboGEPA(task.metric, max_metric_calls=120, reflection_lm=reflector, num_threads=4, track_stats=True,
                    log_dir=None if log_dir == "-" else log_dir, verbose=False)
    with dspy.context(lm=student):
        optimized = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    dr = optimized.detailed_results
    with open(out, "w") as f:
        json.dump({"stop_reason": dr.stop_reason, "metric_calls": dr.total_metric_calls, **calls,
                   "scores": list(dr.val_aggregate_scores),
                   "instructions": {n: p.signature.instructions for n, p in optimized.named_predictors()}}, f)
""")


@pytest.fixture(scope="module")
def kill_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("kill") / "kill_run.py"
    path.write_text(_KILL_SCRIPT)
    ref = path.parent / "ref.json"
    subprocess.run([sys.executable, str(path), str(ref), "-", "none"], env=ENV, check=True, timeout=120,
                   capture_output=True)
    return path, json.loads(ref.read_text())


def _stored(log_dir: Path) -> tuple[int, int]:
    import sqlite3

    with sqlite3.connect(log_dir / "run.sqlite3") as db:
        return (db.execute("select count(*) from evaluations").fetchone()[0],
                db.execute("select count(*) from proposals").fetchone()[0])


@pytest.mark.parametrize("mode", ["student:60", "reflect:6", "report:0.5", "ctrl_c:45"],
                         ids=["during-evaluations", "during-a-reflection", "during-the-final-report", "ctrl-c"])
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_result_paying_only_what_was_not_stored(
        kill_script, tmp_path, mode):
    script, ref = kill_script
    log_dir = tmp_path / "run"
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "killed.json"), str(log_dir), mode],
                            env=ENV, timeout=120, capture_output=True)
    evaluations, proposals = _stored(log_dir)
    assert evaluations > 0
    if mode.startswith("ctrl_c"):  # compile returns the best so far, and every finished evaluation is stored
        assert killed.returncode == 0, killed.stderr[-2000:]
        interrupted = json.loads((tmp_path / "killed.json").read_text())
        assert interrupted["stop_reason"] == "interrupted"
        assert evaluations == interrupted["metric_calls"]
        assert 0 < proposals <= interrupted["reflect"]  # a reflection cut short by the Ctrl-C is not stored
        assert evaluations < ref["metric_calls"]
    else:
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "resumed.json"
    subprocess.run([sys.executable, str(script), str(out), str(log_dir), "none"], env=ENV, check=True, timeout=120,
                   capture_output=True)
    resumed = json.loads(out.read_text())
    assert resumed["instructions"] == ref["instructions"]
    assert resumed["scores"] == ref["scores"]
    assert resumed["metric_calls"] == ref["metric_calls"]
    # every stored evaluation and reflection was replayed, nothing else was
    assert resumed["student"] == ref["student"] - evaluations
    assert resumed["reflect"] == ref["reflect"] - proposals
    if mode.startswith("report"):  # the search had ended half a second before: everything was committed
        assert (resumed["student"], resumed["reflect"]) == (0, 0)


# ------------------------------------------------------------------------------- relative log_dir


def test_a_relative_log_dir_keeps_the_report_and_stop_file_beside_the_store_when_the_cwd_changes(
        tmp_path, monkeypatch):
    """A metric (or program) that changes the working directory while it runs (code-execution tasks do)
    must not split the run: the store was opened in ``<cwd at compile>/run``, so the report the docs
    promise "beside the store" and the stop file the run watches must be there too."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    store_dir = start / "run"
    calls = {"n": 0}
    lock = threading.Lock()

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:  # two threads: each call sees its own number
            calls["n"] += 1
            n = calls["n"]
        if n == 10:
            os.chdir(elsewhere)
        if n == 30:  # the user asks the run to stop, in the log_dir the store is in
            (store_dir / "gepa.stop").touch()
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    program, _, _ = _compile("run", metric=metric, budget=200)
    assert (store_dir / "run.sqlite3").exists()
    assert (store_dir / "summary.json").exists(), sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert not (elsewhere / "run").exists()
    assert program.detailed_results.total_metric_calls < 200  # the stop file was seen


# ---------------------------------------------------------------------------------- the metric's code

_SCORING_SRC = """
SCALE = {scale}


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    result = route_metric(gold, pred, trace, pred_name, pred_trace)
    return dspy.Prediction(score=result.score * SCALE, feedback=result.feedback)
"""


def _user_module(tmp_path: Path, name: str, source: str, monkeypatch) -> types.ModuleType:
    """The user's module ``name``, a file of theirs holding ``source``, as it reads after an edit."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    module.__dict__.update(dspy=dspy, route_metric=ROUTING.metric)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def _user_metric(tmp_path: Path, scale: float, monkeypatch):
    """``metric`` of the user's module ``user_scoring``, with ``SCALE = scale``."""
    return _user_module(tmp_path, "user_scoring", _SCORING_SRC.format(scale=scale), monkeypatch).metric


def test_an_edited_module_constant_of_the_metric_is_not_resumed_with_the_old_scores(tmp_path, monkeypatch):
    """``SCALE = 1.0`` edited to ``0.5`` in the metric's own module changes every score: the rerun must
    refuse the log_dir (the metric changed) or score again, never return the old scores."""
    first, _, _ = _compile(tmp_path / "run", metric=_user_metric(tmp_path, 1.0, monkeypatch))
    assert max(first.detailed_results.val_aggregate_scores) > 0.5
    try:
        again, _, _ = _compile(tmp_path / "run", metric=_user_metric(tmp_path, 0.5, monkeypatch))
    except RunStoreMismatchError as exc:
        assert "metric" in exc.changed
    else:
        assert max(again.detailed_results.val_aggregate_scores) <= 0.5, "the old metric's scores were replayed"


_DECORATED_SRC = {
    # a user's own decorator (timing, logging) written with functools.wraps, as decorators are
    "wraps_decorator": """
import functools


def logged(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        return fn(*args, **kwargs)
    return inner


@logged
def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    result = route_metric(gold, pred, trace, pred_name, pred_trace)
    return dspy.Prediction(score=result.score * {scale}, feedback=result.feedback)
""",
    # a helper the metric calls by name, memoised with functools.lru_cache
    "lru_cache_helper": """
import functools


@functools.lru_cache(maxsize=None)
def weight():
    return {scale}


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    result = route_metric(gold, pred, trace, pred_name, pred_trace)
    return dspy.Prediction(score=result.score * weight(), feedback=result.feedback)
""",
}


@pytest.mark.parametrize("shape", sorted(_DECORATED_SRC))
def test_an_edited_decorated_metric_is_not_resumed_with_the_old_scores(tmp_path, monkeypatch, shape):
    """run_store.md: the key holds the metric's code and "the user's module-level functions it calls".
    A decorator (a timer, a retry, a tracer such as ``mlflow.trace``) or a memoising ``lru_cache`` hides
    that code behind a wrapper: an edit of the metric's body must still refuse the log_dir or rescore."""

    def metric(scale):
        return _user_module(tmp_path, "user_decorated", _DECORATED_SRC[shape].format(scale=scale), monkeypatch).metric

    first, _, _ = _compile(tmp_path / "run", metric=metric(1.0))
    assert max(first.detailed_results.val_aggregate_scores) > 0.5
    try:
        again, _, _ = _compile(tmp_path / "run", metric=metric(0.5))
    except RunStoreMismatchError as exc:
        assert "metric" in exc.changed
    else:
        assert max(again.detailed_results.val_aggregate_scores) <= 0.5, "the old metric's scores were replayed"


_PROGRAM_SRC = """
import dspy

PREFIX = {prefix!r}


class Prog(dspy.Module):
    def __init__(self):
        super().__init__()
        self.route = dspy.Predict("ticket -> queue")

    def forward(self, ticket):
        return self.route(ticket=PREFIX + ticket)
"""


def test_an_edited_module_constant_the_programs_forward_reads_changes_the_run_key(tmp_path, monkeypatch):
    """The same gap on the program side: ``forward`` prepending ``PREFIX`` to every ticket sends other
    prompts once ``PREFIX`` is edited, so the stored evaluations are not this program's."""
    from dspy_turbogepa.adapter.run_identity import run_key

    def student(prefix):
        path = tmp_path / "user_program_s33.py"
        path.write_text(_PROGRAM_SRC.format(prefix=prefix))
        module = types.ModuleType("user_program_s33")
        module.__file__ = str(path)
        exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
        monkeypatch.setitem(sys.modules, "user_program_s33", module)
        return module.Prog()

    data = [dspy.Example(ticket="my parcel is lost", queue="shipping").with_inputs("ticket")]

    def key(program):
        return run_key(program, data, data, 0, metric=ROUTING.metric, failure_score=0.0, context_lm=None,
                       reflection_lm=None, proposer=None, add_format_failure_as_feedback=False, adapter=None)

    assert key(student("URGENT: ")) == key(student("URGENT: "))  # stable for the same code
    assert key(student("URGENT: ")) != key(student(""))


@pytest.mark.parametrize("before, after", [
    ({"top_k": 20}, {"top_k": 1}),
    ({"presence_penalty": 0.0}, {"presence_penalty": 1.5}),
], ids=["top_k", "presence_penalty"])
def test_a_task_lm_with_other_sampling_settings_does_not_replay_the_old_scores(tmp_path, before, after):
    """run_store.md: an LM's identity is its model, endpoint "and sampling settings (temperature,
    max_tokens, ...)". ``top_k`` and ``presence_penalty`` are sampling settings (and
    ``extra_body={"chat_template_kwargs": {"enable_thinking": False}}`` on a vLLM Qwen3, left out the
    same way, answers very differently): the rerun must be refused (task_lm changed) or evaluate again."""
    _compile(tmp_path / "run", student_kwargs=before)
    try:
        _, student_calls, _ = _compile(tmp_path / "run", student_kwargs=after)
    except RunStoreMismatchError as exc:
        assert "task_lm" in exc.changed
    else:
        assert student_calls > 0, "the scores of the LM with the old settings were replayed"


# ------------------------------------------------------------------------------ damaged store files


def test_a_store_with_a_damaged_row_is_a_run_store_error_naming_it(finished_store, tmp_path):
    """SQLite has no page checksums: a bad sector or a bit flip inside a row's text goes unnoticed by
    SQLite and reaches the JSON decoder. errors.md: a damaged store, at open or while its results are
    read, is a ``RunStoreError`` with the path and the advice to start over."""
    log_dir = _copy(finished_store[0], tmp_path / "run")
    db = log_dir / "run.sqlite3"
    raw = db.read_bytes()
    assert b'{"prediction":' in raw
    db.write_bytes(raw.replace(b'{"prediction":', b'{"prediction"#'))  # same length: only the text is hurt
    with pytest.raises(RunStoreError, match="run.sqlite3"):
        _compile(log_dir)


def test_a_truncated_store_is_a_run_store_error_before_any_lm_call_and_an_emptied_one_a_fresh_run(
        finished_store, tmp_path, monkeypatch):
    store_dir, scores = finished_store
    half = _copy(store_dir, tmp_path / "half")
    with open(half / "run.sqlite3", "r+b") as f:
        f.truncate((half / "run.sqlite3").stat().st_size // 2 + 100)
    calls = []
    monkeypatch.setattr(dspy.LM, "forward", lambda *a, **k: calls.append(1))  # never reached
    with pytest.raises(RunStoreError, match="not a readable run store"):
        _compile(half)
    assert calls == []
    monkeypatch.undo()
    empty = _copy(store_dir, tmp_path / "empty")
    (empty / "run.sqlite3").write_bytes(b"")
    program, student_calls, _ = _compile(empty)
    assert student_calls > 0 and list(program.detailed_results.val_aggregate_scores) == scores


def test_a_finished_run_resumed_after_its_report_files_were_deleted_pays_nothing(finished_store, tmp_path):
    log_dir = _copy(finished_store[0], tmp_path / "run")
    for name in ("summary.json", "best_over_time.svg", "lineage.svg", "run.lock"):
        (log_dir / name).unlink()  # each must have been there: a renamed report would skip the case
    program, student_calls, reflection_calls = _compile(log_dir)
    assert (student_calls, reflection_calls) == (0, 0)
    assert list(program.detailed_results.val_aggregate_scores) == finished_store[1]
    assert (log_dir / "summary.json").exists()


def test_a_path_with_spaces_and_non_ascii_resumes_without_paying_again(tmp_path):
    log_dir = tmp_path / "my runs ü 日本 %20 ?x#y" / "file:z"
    first, student_calls, _ = _compile(log_dir)
    assert student_calls > 0
    again, student_calls, reflection_calls = _compile(log_dir)
    assert (student_calls, reflection_calls) == (0, 0)
    assert again.detailed_results.val_aggregate_scores == first.detailed_results.val_aggregate_scores
    assert {"run.sqlite3", "summary.json"} <= set(os.listdir(log_dir))


def test_a_log_dir_that_is_a_file_is_refused_before_any_lm_call(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    with pytest.raises(RunStoreError, match="not a directory"):
        _compile(blocker)
    assert blocker.read_text() == "not a directory"


# ------------------------------------------------------------------------ the saved program elsewhere

_USER_PROGRAM = """
import dspy


class Router(dspy.Module):
    def __init__(self, instructions):
        super().__init__()
        self.route = dspy.Predict(dspy.Signature("ticket -> queue", instructions))

    def forward(self, ticket):
        return self.route(ticket=ticket)
"""

_LOAD_ELSEWHERE = """
import json, sys


class NoTurbo:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "dspy_turbogepa":
            raise ImportError("dspy_turbogepa must not be needed to load a saved program")
        return None


sys.meta_path.insert(0, NoTurbo())
import dspy
from user_program import Router

program_json, base_url, tickets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
program = Router("placeholder")
program.load(program_json)
lm = dspy.LM("openai/sim-student", api_base=base_url, api_key="sim-key", cache=False, temperature=0.0)
with dspy.context(lm=lm):
    answers = [program(ticket=t).queue for t in tickets]
print(json.dumps({"instructions": program.route.signature.instructions, "answers": answers,
                  "turbo_loaded": any(m.startswith("dspy_turbogepa") for m in sys.modules)}))
"""


def test_the_saved_program_loads_and_answers_in_a_process_without_dspy_turbogepa(tmp_path, monkeypatch, request):
    from dspy_turbogepa.testing import SimServer

    (tmp_path / "user_program.py").write_text(_USER_PROGRAM)
    (tmp_path / "load_elsewhere.py").write_text(_LOAD_ELSEWHERE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_program", None)
    request.addfinalizer(lambda: sys.modules.pop("user_program", None))
    from user_program import Router

    data = small_splits(ROUTING, n_train=16, n_val=8, n_test=6)
    with SimServer("test", seed=0) as server:
        student = dspy.LM("openai/sim-student", api_base=server.base_url, api_key="sim-key", cache=False,
                          temperature=0.0)
        reflector = dspy.LM("openai/sim-reflector", api_base=server.base_url, api_key="sim-key", cache=False,
                            temperature=1.0, max_tokens=4000)
        opt = TurboGEPA(ROUTING.metric, max_metric_calls=80, reflection_lm=reflector, num_threads=4,
                        log_dir=str(tmp_path / "run"), verbose=False)
        with dspy.context(lm=student):
            optimized = opt.compile(Router(ROUTING.seed_instructions["route"]), trainset=data.train,
                                    valset=data.val)
            tickets = [ex.ticket for ex in data.test]
            expected = [optimized(ticket=t).queue for t in tickets]
        assert optimized.route.signature.instructions != ROUTING.seed_instructions["route"]
        optimized.save(str(tmp_path / "program.json"))
        out = subprocess.run([sys.executable, str(tmp_path / "load_elsewhere.py"), str(tmp_path / "program.json"),
                              server.base_url, json.dumps(tickets)], env={**ENV, "PYTHONPATH": str(tmp_path)},
                             cwd=tmp_path, check=True, timeout=120, capture_output=True, text=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["turbo_loaded"] is False
    assert loaded["instructions"] == optimized.route.signature.instructions
    assert loaded["answers"] == expected
