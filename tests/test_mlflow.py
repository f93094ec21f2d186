"""MLflow: autolog records TurboGEPA.compile in either import order, full-validation evaluations become
nested runs, and ``use_mlflow``'s tracker logs params / metrics / artifacts (sqlite and a real server),
never breaking a run when MLflow is unreachable.

MLflow is imported lazily (only by the tests that need it); ``mlflow.dspy.autolog`` is only ever turned
on in subprocesses, since it patches classes process-wide.

Until the teleprompter constructs the pump and the tracker itself, :func:`install_emulated_wiring`
wraps its collaborators so ``compile()`` does (the subprocess scenarios use it only when the real
wiring is absent). ``test_end_to_end_wiring`` uses no emulation at all.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dspy_turbogepa.engine.frontier import pareto_front_members
from dspy_turbogepa.tracking import (
    CompileThreadCallbackPump,
    MlflowRunTracker,
    loggable_params,
    sanitize_key,
)
from dspy_turbogepa.tracking.mlflow_tracking import (
    UPLOAD_HTTP_RETRIES,
    _few_http_retries,
    candidates_table,
    pareto_front_table,
    stats_metrics,
)

from helpers import quick_compile

TESTS_DIR = Path(__file__).parent
EXPERIMENT = "turbogepa-test"
BUDGET = 150
TRACKING_LOGGER = "dspy_turbogepa.tracking.mlflow_tracking"


# ---------------------------------------------------------------------------------------- shared helpers
def pump_is_wired(tp: Any) -> bool:
    return hasattr(tp, "CompileThreadCallbackPump")


def install_emulated_wiring(tp: Any, *, pump: bool = False, tracker_kwargs: dict | None = None,
                            setattr_fn=setattr) -> dict:
    """Make ``tp.TurboGEPA.compile`` build a pump and/or tracker the way the teleprompter wiring will.

    Returns a box that receives ``codec``, ``val``, ``pump``, ``tracker``, ``orchestrator`` and ``result``
    (the EngineResult). Set ``box["opt"]`` before compiling to pass the optimizer's params to the tracker.
    """
    box: dict[str, Any] = {}
    orig_eval, orig_orch, orig_run = tp.DspyEvaluator, tp.Orchestrator, tp.run_coroutine_in_thread

    class CapturingEvaluator(orig_eval):
        def __init__(self, codec, data, *args, **kwargs):
            super().__init__(codec, data, *args, **kwargs)
            box["codec"], box["train"], box["val"] = codec, data["train"], data["val"]
            box["evaluator"] = self

    def orchestrator(*args, observers=(), **kwargs):
        extra = []
        if pump:
            box["pump"] = CompileThreadCallbackPump(box["codec"].build, box["val"], instance=box.get("opt"))
            extra.append(box["pump"])
        if tracker_kwargs is not None:
            opt = box.get("opt")
            box["tracker"] = MlflowRunTracker(
                opt.get_params() if opt is not None else {},
                stats_provider=lambda: tp.live_run_stats(box["orchestrator"], box["evaluator"]),
                seed_texts=box["codec"].seed_texts(),
                trainset_size=len(box["train"]),
                valset_size=len(box["val"]),
                **tracker_kwargs,
            )
            extra.append(box["tracker"])
        box["orchestrator"] = orig_orch(*args, observers=[*observers, *extra], **kwargs)
        return box["orchestrator"]

    def run(make_coro, **kwargs):
        if "pump" in box:
            kwargs["on_tick"] = box["pump"].drain
        box["result"] = orig_run(make_coro, **kwargs)
        return box["result"]

    setattr_fn(tp, "DspyEvaluator", CapturingEvaluator)
    setattr_fn(tp, "Orchestrator", orchestrator)
    setattr_fn(tp, "run_coroutine_in_thread", run)
    return box


def run_small_compile(tp: Any, box: dict | None = None, budget: int = BUDGET, **kwargs):
    import dspy

    from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

    task = TASKS["pipeline"]
    splits = task.splits(data_seed=0, n_train=12, n_val=8, n_test=0)
    kwargs.setdefault("num_threads", 8)
    kwargs.setdefault("track_stats", True)
    opt = tp.TurboGEPA(task.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0), **kwargs)
    if box is not None:
        box["opt"] = opt
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        program = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    return opt, program, splits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tracking_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == TRACKING_LOGGER and r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _artifacts_stay_in_tmp(tmp_path, monkeypatch):
    """MLflow's default artifact root is ./mlruns: a test must not write into the checkout."""
    monkeypatch.chdir(tmp_path)




def fresh_db(template: Path, directory: Path, name: str = "mlflow.db") -> str:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, directory / name)
    return f"sqlite:///{directory / name}"


@pytest.fixture
def local_tracking(template_db, tmp_path, monkeypatch) -> str:
    """MLFLOW_TRACKING_URI -> a fresh sqlite store in tmp_path; no run left active afterwards."""
    import mlflow

    uri = fresh_db(template_db, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow.active_run() is None
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


# ---------------------------------------------------------------------------------------- units
def test_sanitize_key_produces_valid_mlflow_names():
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    cases = {
        "subs[0].predict": "subs.0.predict",
        "seed_instructions/subs[0].predict": "seed_instructions/subs.0.predict",
        "a//b/../c:d": "a/_/b/_/c_d",
        "/leading/": "leading",
        "é-ü": "_-_",
        "": "_",
    }
    for name, expected in cases.items():
        key = sanitize_key(name)
        assert key == expected, (name, key)
        _validate_param_name(key)
        _validate_metric_name(key)
    assert len(sanitize_key("x" * 400)) == 250
    for cut_after in ("/.", "/.."):  # the 250-character cut can leave a relative path segment at the end
        pad = "y" * (250 - len("seed_instructions/") - len(cut_after))
        key = sanitize_key("seed_instructions/" + pad + cut_after + "tail")
        _validate_param_name(key)
        _validate_metric_name(key)


def test_predictor_names_that_sanitize_alike_keep_distinct_keys():
    """``subs[0].predict`` and ``subs.0.predict`` are two predictors but one sanitized key: sharing it, the
    second's instructions would overwrite (or be refused next to) the first's in the run's params. The
    same name must keep its key, so seed and best instructions of one predictor line up."""
    from dspy_turbogepa.tracking.mlflow_tracking import _KeyMap

    keys = _KeyMap()
    first = keys("seed_instructions", "subs[0].predict")
    second = keys("seed_instructions", "subs.0.predict")
    assert first == "seed_instructions/subs.0.predict" and second != first
    assert keys("seed_instructions", "subs[0].predict") == first
    assert keys("seed_instructions", "subs.0.predict") == second


def test_loggable_params_keep_primitives_and_drop_credentials(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-1234567890abcdef")

    class FakeLM:
        model = "openai/gpt-x"
        api_key = "sk-abcdefghijklmnopqrstuvwxyz0123456789"

    params = loggable_params({
        "max_metric_calls": 150, "seed": 0, "use_merge": True, "perfect_score": 1.0, "auto": None,
        "wandb_api_key": "sk-abcdefghijklmnopqrstuvwxyz0123456789", "api_key": "x" * 20,
        "metric_fn": lambda *a: 1.0, "reflection_lm": FakeLM(), "rung_fractions": (0.25, 1.0),
        "gepa_kwargs": {"acceptance_criterion": "strict_improvement", "mlflow_api_token": "abc"},
        "log_dir": "/runs/tok-1234567890abcdef", "_private": 1,
    })
    assert params["max_metric_calls"] == "150" and params["use_merge"] == "True" and params["seed"] == "0"
    assert params["reflection_lm"] == "openai/gpt-x"
    assert json.loads(params["rung_fractions"]) == [0.25, 1.0]
    assert "gepa_kwargs" not in params  # a dict naming a credential is not logged at all
    assert params["log_dir"] == "/runs/***REDACTED***"
    for gone in ("wandb_api_key", "api_key", "metric_fn", "auto", "_private"):
        assert gone not in params
    assert not any("sk-" in v or "tok-1234567890abcdef" in v for v in params.values())


def _record(index: int, scores: dict[int, float], parents=(None,), kind="seed", texts=None):
    from dspy_turbogepa.engine.candidate import Candidate
    from dspy_turbogepa.engine.records import CandidateRecord

    texts = texts or {"subs[0].predict": f"instruction {index}", "render": "render it"}
    return CandidateRecord(index=index, candidate=Candidate(texts=texts, kind=kind), parent_indices=list(parents),
                           val_scores=dict(scores), discovery_seconds=0.1 * index, discovery_metric_calls=10 * index)


def _synthetic_result():
    from dspy_turbogepa.engine.records import EngineResult, RunStats

    records = [_record(0, {0: 0.0, 1: 1.0, 2: 0.0}), _record(1, {0: 1.0, 1: 0.0, 2: 0.0}, [0], "reflection"),
               _record(2, {0: 1.0, 1: 1.0, 2: 0.0}, [0, 1], "merge")]
    stats = RunStats(executed=30, reflection_calls=2, task_prompt_tokens=100, task_cost=0.5, reflection_cost=0.25,
                     rate_limit_retries=3)
    stats.mutations.update({"accepted": 2, "rejected_rung0": 4})
    stats.rate_limits = {"rate_limited": 5, "backoff_seconds": 1.5, "windows": {"openai/gpt-x": 4}, "note": "x",
                         "endpoints": {"openai/gpt-x@http://127.0.0.1:9/v1": {"window": 3, "min_window": 1}}}
    return EngineResult(records=records, fronts={0: {1, 2}, 1: {0, 2}, 2: {0, 1, 2}}, best_index=2,
                        stop_reason="max_metric_calls", total_metric_calls=30, num_full_val_evals=3, wall_seconds=1.5,
                        stats=stats, val_ids=(0, 1, 2))


def test_tables_and_stats_metrics_from_a_result():
    result = _synthetic_result()
    cands = candidates_table(result)
    assert cands["id"] == [0, 1, 2] and cands["kind"] == ["seed", "reflection", "merge"]
    assert [json.loads(p) for p in cands["parents"]] == [[None], [0], [0, 1]]
    assert cands["front_instances"] == [2, 2, 3] and cands["is_best"] == [False, False, True]
    assert cands["instructions:subs[0].predict"][2] == "instruction 2"
    front = pareto_front_table(result)
    assert front["val_id"] == [0, 1, 2] and front["best_score"] == [1.0, 1.0, 0.0]
    assert [json.loads(c) for c in front["candidates"]] == [[1, 2], [0, 2], [0, 1, 2]]
    m = stats_metrics(result.stats)
    assert m["metric_calls"] == 30 and m["cost/total_usd"] == 0.75 and m["rate_limit_retries"] == 3
    assert m["mutations/accepted"] == 2 and m["lm/reflection_calls"] == 2
    assert m["rate_limits/rate_limited"] == 5 and m["rate_limits/backoff_seconds"] == 1.5
    assert m["rate_limits/windows/openai/gpt-x"] == 4 and "rate_limits/note" not in m
    # the in-flight window per endpoint, as the evaluator reports it (issue 5: "in-flight window")
    assert m["rate_limits/endpoints/openai/gpt-x@http://127.0.0.1:9/v1/window"] == 3


def test_run_summary_uploaded_to_mlflow_holds_no_endpoint_credential():
    """run_summary.json carries the run stats, whose rate-limit counters are keyed by endpoint: an endpoint
    URL with a key in its query string must be masked before it is uploaded as an artifact."""
    from dspy_turbogepa.tracking.mlflow_tracking import run_summary

    secret = "sk-proj-RUNSUMleak0123456789abcdefXYZ"
    result = _synthetic_result()
    result.stats.rate_limits["endpoints"][f"openai/x@https://h.example/v1?key={secret}"] = {"window": 2}
    summary = run_summary(result)
    assert secret not in json.dumps(summary)
    assert summary["best_candidate_idx"] == 2 and len(summary["run_stats"]["rate_limits"]["endpoints"]) == 2


class _RecordingCallback:
    def __init__(self, fail: bool = False):
        self.events: list[tuple] = []
        self.fail = fail

    def on_evaluate_start(self, call_id, instance, inputs):
        self.events.append(("start", call_id, instance, inputs))
        if self.fail:
            raise RuntimeError("callback broke")

    def on_evaluate_end(self, call_id, outputs, exception=None):
        self.events.append(("end", call_id, outputs, exception))


def test_pump_emits_evaluations_on_the_owner_thread_only(caplog):
    import dspy
    from dspy.evaluate.evaluate import EvaluationResult

    val = [dspy.Example(q=f"q{i}", a=f"a{i}").with_inputs("q") for i in range(3)]
    built = []
    good, bad = _RecordingCallback(), _RecordingCallback(fail=True)
    pump = CompileThreadCallbackPump(lambda texts: built.append(dict(texts)) or f"program{len(built)}", val,
                                     instance="opt", callbacks=[bad, good])
    rec = _record(0, {0: 1.0, 1: 0.5, 2: 0.0})
    rec.val_outputs[1] = dspy.Prediction(a="a1")
    # hooks arrive on the engine thread; a drain from any thread but the owner does nothing
    t = threading.Thread(target=lambda: (pump.on_candidate(rec), pump.on_candidate(_record(1, {0: 1.0, 1: 1.0,
                                                                                                   2: 1.0}))))
    t.start()
    t.join()
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(pump.drain()))
    t.start()
    t.join()
    assert other == [0] and pump.pending() == 2 and not good.events
    with caplog.at_level(logging.WARNING):
        assert pump.drain() == 2
    assert pump.drain() == 0 and pump.emitted == 2
    kinds = [e[0] for e in good.events]
    assert kinds == ["start", "end", "start", "end"]
    start, end = good.events[0], good.events[1]
    assert start[1] == end[1] and start[2] == "opt"
    assert start[3]["program"] == "program1" and start[3]["callback_metadata"] == {"metric_key": "eval_full"}
    out = end[2]
    assert isinstance(out, EvaluationResult) and out.score == 50.0 and end[3] is None
    assert [r[2] for r in out.results] == [1.0, 0.5, 0.0]
    assert out.results[1][1].a == "a1" and isinstance(out.results[0][1], dspy.Prediction)
    assert good.events[3][2].score == 100.0
    # the broken callback still got its end calls, and the failure was reported once
    assert [e[0] for e in bad.events] == ["start", "end", "start", "end"]
    assert len([r for r in caplog.records if "callback broke" in r.getMessage()]) == 1


def test_pump_ends_every_started_evaluation_when_ctrl_c_lands_in_between():
    """A KeyboardInterrupt during the callbacks' starts: the callbacks already started still get their
    end (MLflow's nested run is closed), and the interrupt goes on."""
    import dspy

    class Interrupting(_RecordingCallback):
        def on_evaluate_start(self, call_id, instance, inputs):
            super().on_evaluate_start(call_id, instance, inputs)
            raise KeyboardInterrupt

    first, second, third = _RecordingCallback(), Interrupting(), _RecordingCallback()
    pump = CompileThreadCallbackPump(lambda t: "p", [dspy.Example(q="q").with_inputs("q")],
                                     callbacks=[first, second, third])
    pump.on_candidate(_record(0, {0: 1.0}))
    with pytest.raises(KeyboardInterrupt):
        pump.drain()
    assert [e[0] for e in first.events] == ["start", "end"] and [e[0] for e in second.events] == ["start", "end"]
    assert not third.events  # never started, so never ended
    assert isinstance(first.events[1][3], KeyboardInterrupt) and first.events[1][2] is None


@pytest.mark.parametrize("where", ["start", "end"])
def test_a_ctrl_c_inside_mlflows_evaluation_callbacks_leaves_no_nested_run_open(where):
    """A review: a Ctrl-C landing inside MLflow's on_evaluate_start, after its start_run and before it
    notes the call, or inside its on_evaluate_end before its end_run, left the nested eval run on
    MLflow's stack: the compile run stayed RUNNING and active, and the next compile logged into it.
    Ctrl-C now waits for MLflow's callbacks; the interrupt still comes, once they are done."""
    import os
    import signal

    import dspy

    class MlflowCallback(_RecordingCallback):
        optimizer_stack_level = 1
        open_runs: set[str] = set()
        noted: dict[str, str] = {}

        def on_evaluate_start(self, call_id, instance, inputs):
            self.open_runs.add(call_id)  # start_run
            if where == "start":
                os.kill(os.getpid(), signal.SIGINT)
            self.noted[call_id] = call_id  # what its end reads to find the run

        def on_evaluate_end(self, call_id, outputs, exception=None):
            run = self.noted.pop(call_id, None)
            if where == "end":
                os.kill(os.getpid(), signal.SIGINT)
            self.open_runs.discard(run)  # end_run

    MlflowCallback.__module__ = "mlflow.dspy.callback"
    cb = MlflowCallback()
    pump = CompileThreadCallbackPump(lambda t: "p", [dspy.Example(q="q").with_inputs("q")], callbacks=[cb])
    pump.on_candidate(_record(0, {0: 1.0}))
    with pytest.raises(KeyboardInterrupt):
        pump.drain()
    assert not cb.open_runs and not cb.noted


def test_a_ctrl_c_in_a_users_own_callback_is_not_held_and_the_other_ends_still_run():
    """A review of the hold above: it covered every callback's end, so a user's callback taking 4 s held a
    Ctrl-C (pressed twice) for all of it. Only MLflow's callbacks are waited for, and a second press
    gets through even them."""
    import os
    import signal
    import time

    import dspy

    class Slow(_RecordingCallback):
        def on_evaluate_end(self, call_id, outputs, exception=None):
            super().on_evaluate_end(call_id, outputs, exception)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(4)

    class MlflowCallback(_RecordingCallback):
        optimizer_stack_level = 1

        def on_evaluate_end(self, call_id, outputs, exception=None):
            super().on_evaluate_end(call_id, outputs, exception)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the second press does not wait for MLflow
            time.sleep(4)

    MlflowCallback.__module__ = "mlflow.dspy.callback"
    slow, mlflow_cb, last = Slow(), MlflowCallback(), _RecordingCallback()
    pump = CompileThreadCallbackPump(lambda t: "p", [dspy.Example(q="q").with_inputs("q")],
                                     callbacks=[slow, mlflow_cb, last])
    pump.on_candidate(_record(0, {0: 1.0}))
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        pump.drain()
    assert time.monotonic() - started < 3
    assert [e[0] for e in last.events] == ["start", "end"]  # its end ran before the interrupt went on


def test_pump_skips_mlflow_callback_outside_a_recorded_compile():
    import dspy

    class MlflowCallback(_RecordingCallback):
        optimizer_stack_level = 0

    MlflowCallback.__module__ = "mlflow.dspy.callback"
    cb = MlflowCallback()
    pump = CompileThreadCallbackPump(lambda t: "p", [dspy.Example(q="q").with_inputs("q")], callbacks=[cb])
    pump.on_candidate(_record(0, {0: 1.0}))
    assert pump.drain() == 0 and not cb.events
    cb.optimizer_stack_level = 1
    pump.on_candidate(_record(0, {0: 1.0}))
    assert pump.drain() == 1 and len(cb.events) == 2


def test_the_evaluations_handed_to_mlflow_are_masked_and_other_callbacks_get_the_real_objects(tmp_path):
    """autolog's eval_full_<k> runs stored a predictor LM's x-api-key header and a key written into an
    instruction (params, model.json) and a key in an example field (result_table.json): the pump handed
    MLflow the raw program and rows. MLflow now gets them masked, as the run store keeps them; any
    other callback gets the objects themselves, as dspy.Evaluate hands them."""
    import dspy

    key, header_key = "sk-proj-PUMPleak0123456789abcdefXYZ", "hdr-secret-0123456789abcdef"

    def build(texts):
        program = dspy.Predict("q -> a")
        program.signature = program.signature.with_instructions(texts["self"])
        program.lm = dspy.LM("openai/x", api_key="k" * 24, extra_headers={"x-api-key": header_key})
        return program

    class MlflowCallback(_RecordingCallback):
        optimizer_stack_level = 1

        def on_evaluate_start(self, call_id, instance, inputs):  # what mlflow.dspy's callback reads
            super().on_evaluate_start(call_id, instance, inputs)
            inputs["program"].save(str(tmp_path / "model.json"))
            self.state = json.dumps(inputs["program"].dump_state())
            # mlflow.dspy.util.log_dspy_lm_state: the run's `lm_params` param (a review found the header there)
            self.lm_params = json.dumps(dspy.settings.lm.kwargs, default=str)

    MlflowCallback.__module__ = "mlflow.dspy.callback"
    mlflow_cb, plain = MlflowCallback(), _RecordingCallback()
    val = [dspy.Example(q=f"my key is {key}", a="x").with_inputs("q")]
    pump = CompileThreadCallbackPump(build, val, callbacks=[mlflow_cb, plain])
    rec = _record(0, {0: 1.0}, texts={"self": f"Answer. Use {key} for the lookup."})
    rec.val_outputs[0] = dspy.Prediction(a=f"echo {key}")
    pump.on_candidate(rec)
    settings_lm = dspy.LM("openai/y", extra_headers={"x-api-key": header_key})
    with dspy.context(lm=settings_lm):
        assert pump.drain() == 1
        assert dspy.settings.lm is settings_lm and settings_lm.kwargs["extra_headers"]["x-api-key"] == header_key
    rows = mlflow_cb.events[1][2].results
    assert "x-api-key" in mlflow_cb.lm_params  # the settings LM's headers were read, masked below
    logged = (mlflow_cb.state + (tmp_path / "model.json").read_text() + repr([(dict(e), dict(p)) for e, p, _ in rows])
              + mlflow_cb.lm_params)
    assert key not in logged and header_key not in logged
    assert "Answer. Use" in logged and "my key is" in logged  # masked, not dropped
    assert type(mlflow_cb.events[0][3]["program"]).__name__ == "Predict"  # MLflow's param names keep the class
    assert set(rows[0][0].inputs().keys()) == {"q"} and rows[0][2] == 1.0
    # the other callback got the real program and rows
    real = plain.events[0][3]["program"]
    assert key in real.signature.instructions and real.lm.kwargs["extra_headers"]["x-api-key"] == header_key
    assert key in plain.events[1][2].results[0][0].q


def test_eval_full_runs_are_numbered_by_candidate_when_another_compile_shares_mlflows_count(local_tracking,
                                                                                           monkeypatch):
    """autolog's callback is one object per process, with one count behind ``eval_full_<k>``: two compiles
    at once in threads took turns (one got eval_full_0, 3, 5 ..., the other 1, 2, 4 ...), and the step of
    ``eval_full`` on each compile run was not its candidate's index. The run and the step are renumbered."""
    import dspy
    import mlflow
    from mlflow.dspy import callback as mlflow_callback

    monkeypatch.setattr(mlflow_callback, "get_autologging_config", lambda flavor, key, default=None: True)
    cb = mlflow_callback.MlflowCallback()
    cb.optimizer_stack_level = 1  # inside a compile, as autolog's patched compile sets it
    cb._evaluation_counter["eval_full"] = 3  # another compile's candidates took 0-2

    def build(texts):
        program = dspy.Predict("q -> a")
        program.signature = program.signature.with_instructions(texts["self"])
        return program

    val = [dspy.Example(q="q", a="x").with_inputs("q")]
    pump = CompileThreadCallbackPump(build, val, callbacks=[cb])
    with mlflow.start_run() as parent:
        for index in (0, 1):
            pump.on_candidate(_record(index, {0: 1.0}, texts={"self": f"Answer {index}."}))
        assert pump.drain() == 2
    client = mlflow.MlflowClient()
    nested = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in nested) == ["eval_full_0", "eval_full_1"]
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "eval_full")) == [0, 1]


def test_tracker_without_mlflow_warns_once_and_does_nothing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with caplog.at_level(logging.WARNING):
        tracker = MlflowRunTracker({"seed": 0})
        tracker.on_candidate(_record(0, {0: 1.0}))
        tracker.finish(_synthetic_result(), None)
    assert not tracker.enabled and tracker.run_id is None
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and "not installed" in warnings[0].getMessage()


class _BrokenMlflowInstall:
    """A meta-path finder under which ``import mlflow`` raises what a broken install raises (protobuf's
    ``TypeError: Descriptors cannot be created directly``), not an ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" or name.startswith("mlflow."):
            raise TypeError("Descriptors cannot be created directly.")
        return None


def test_a_broken_mlflow_install_warns_once_and_the_compile_returns(monkeypatch, caplog, routing):
    """docs/mlflow.md: MLflow missing or unreachable is never a failed compile. A review found an install
    whose import raised a TypeError ending compile() before any LM call."""
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenMlflowInstall(), *sys.meta_path])
    with caplog.at_level(logging.WARNING):
        optimized = quick_compile(budget=40, use_mlflow=True)
    assert optimized.detailed_results.total_metric_calls > 0
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1
    assert "failed to import (TypeError: Descriptors cannot be created directly.)" in warnings[0].getMessage()


def test_registration_failure_warns_once_and_never_raises(monkeypatch, caplog):
    pytest.importorskip("mlflow")
    from mlflow.utils import autologging_utils

    from dspy_turbogepa.tracking import autolog as registration

    class Dummy:
        def compile(self):
            return "original"

    assert registration.register_with_mlflow_autolog(Dummy) is False  # autolog is off in this process
    monkeypatch.setattr(registration, "dspy_autolog_enabled", lambda: True)
    monkeypatch.setattr(autologging_utils, "safe_patch", lambda *a, **k: 1 / 0)
    registration._reset_warning_for_tests()
    with caplog.at_level(logging.WARNING):
        assert registration.register_with_mlflow_autolog(Dummy) is False
        assert registration.register_with_mlflow_autolog(Dummy) is False
    assert len([r for r in caplog.records if "Could not register Dummy.compile" in r.getMessage()]) == 1
    assert Dummy().compile() == "original"
    registration._reset_warning_for_tests()


# ---------------------------------------------------------------------------------------- tracker, local sqlite
def _check_tracked_run(client, run_id: str, result, program, splits, tmp_path: Path, plot: bool) -> None:
    import dspy

    run = client.get_run(run_id)
    params = run.data.params
    assert params["max_metric_calls"] == str(BUDGET)
    assert params["trainset_size"] == str(len(splits.train)) and params["valset_size"] == str(len(splits.val))
    assert params["num_components"] == "2"
    assert {k for k in params if k.startswith("seed_instructions/")} == {"seed_instructions/extract",
                                                                            "seed_instructions/render"}
    best_texts = result.best.candidate.texts
    assert params["best_instructions/render"] == best_texts["render"][:6000]
    assert "wandb_api_key" not in params and "metric_fn" not in params
    assert run.data.tags["turbogepa.stop_reason"] == result.stop_reason

    n = len(result.records)
    best_hist = client.get_metric_history(run_id, "best_val_score")
    assert best_hist and best_hist[-1].value == pytest.approx(result.best.aggregate)
    values = [m.value for m in sorted(best_hist, key=lambda m: (m.step, m.timestamp))]
    assert values == sorted(values)  # best so far never decreases
    assert [m.step for m in client.get_metric_history(run_id, "candidate_val_score")] == list(range(n))
    calls = client.get_metric_history(run_id, "metric_calls")
    assert calls[-1].value == result.stats.executed and all(m.step == int(m.value) for m in calls)
    # the rate-limit counters chart over time with the rest (they were one point at the end)
    assert len(client.get_metric_history(run_id, "rate_limits/rate_limited")) == len(calls) > 1
    metrics = run.data.metrics
    assert metrics["lm/task_calls"] == result.stats.task_lm_calls >= result.stats.executed  # one call or more each
    for key in ("pareto_front_size", "pareto_front_agg", "num_candidates", "lm/task_prompt_tokens",
                "lm/reflection_calls", "cost/total_usd", "rate_limit_retries", "mutations/accepted",
                "final/best_val_score", "final/total_metric_calls"):
        assert key in metrics, key
    assert metrics["num_candidates"] == n and metrics["final/best_candidate_idx"] == result.best_index
    assert metrics["pareto_front_size"] == len(
        pareto_front_members(result.fronts, {r.index: r.aggregate for r in result.records}))

    artifacts = {a.path for a in client.list_artifacts(run_id, "turbogepa")}
    expected = {"turbogepa/optimized_program.json", "turbogepa/candidates.json", "turbogepa/pareto_front.json",
                "turbogepa/run_summary.json"} | ({"turbogepa/best_over_time.svg"} if plot else set())
    assert expected <= artifacts, artifacts
    local = Path(client.download_artifacts(run_id, "turbogepa", str(tmp_path / "dl")))
    from dspy_turbogepa.testing import TASKS

    restored = TASKS["pipeline"].make_program()
    restored.load(str(local / "optimized_program.json"))
    assert {k: p.signature.instructions for k, p in restored.named_predictors()} == dict(best_texts)
    cands = json.loads((local / "candidates.json").read_text())
    assert len(cands["data"]) == n and "parents" in cands["columns"] and "kind" in cands["columns"]
    front = json.loads((local / "pareto_front.json").read_text())
    assert len(front["data"]) == len(splits.val)
    summary = json.loads((local / "run_summary.json").read_text())
    assert summary["best_candidate_idx"] == result.best_index and len(summary["val_aggregate_scores"]) == n
    if plot:
        assert (local / "best_over_time.svg").read_text().startswith("<svg ")
    assert isinstance(program, dspy.Module)


def test_tracker_logs_params_metrics_and_artifacts_to_sqlite(local_tracking, tmp_path, monkeypatch, caplog):
    import mlflow

    import dspy_turbogepa.teleprompter as tp

    box = install_emulated_wiring(tp, tracker_kwargs={"plot_path": True, "flush_interval": 0.2, "sample_interval": 0.0},
                                  setattr_fn=monkeypatch.setattr)
    with caplog.at_level(logging.WARNING):
        _, program, splits = run_small_compile(tp, box, wandb_api_key="sk-abcdefghijklmnopqrstuvwxyz0123456789")
        tracker = box["tracker"]
        assert tracker.enabled and tracker.started_run and mlflow.active_run().info.run_id == tracker.run_id
        extra = tmp_path / "summary.json"
        extra.write_text("{}")
        tracker.finish(box["result"], program, program.detailed_results, artifacts=[extra, tmp_path / "missing.png"])
    assert not tracking_warnings(caplog), [r.getMessage() for r in tracking_warnings(caplog)]
    assert mlflow.active_run() is None  # it started the run, so it ended it
    client = mlflow.MlflowClient()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    _check_tracked_run(client, tracker.run_id, box["result"], program, splits, tmp_path, plot=True)
    assert "turbogepa/summary.json" in {a.path for a in client.list_artifacts(tracker.run_id, "turbogepa")}
    assert tracker._tmpdir is None  # the temporary plot directory is gone
    assert "sk-abcdefghijklmnopqrstuvwxyz0123456789" not in json.dumps(client.get_run(tracker.run_id).data.params)


def test_tracker_attaches_to_the_active_run_and_leaves_it_open(local_tracking, monkeypatch):
    import mlflow

    with mlflow.start_run(run_name="mine") as run:
        mlflow.log_param("max_metric_calls", "something else")  # a clash must not lose the other params
        tracker = MlflowRunTracker({"max_metric_calls": 10, "seed": 3},
                                   seed_texts={"subs[0].predict": "do it", "render": "render it"},
                                   flush_interval=0.1)
        assert tracker.enabled and not tracker.started_run and tracker.run_id == run.info.run_id
        result = _synthetic_result()
        for rec in result.records:
            tracker.on_candidate(rec)
        tracker.finish(result, None)
        assert mlflow.active_run().info.run_id == run.info.run_id
    data = mlflow.MlflowClient().get_run(run.info.run_id).data
    assert data.params["max_metric_calls"] == "something else" and data.params["seed"] == "3"
    assert data.params["seed_instructions/subs.0.predict"] == "do it"
    assert data.params["best_instructions/subs.0.predict"] == "instruction 2"
    assert data.metrics["best_val_score"] == pytest.approx(2 / 3)


def test_instructions_reaching_mlflow_are_masked(local_tracking, tmp_path, monkeypatch):
    """Instructions are free text: a key pasted into the seed prompt, or echoed by the reflection LM into a
    child, must not reach the run's params (seed and best instructions) or the candidates table, where
    everyone with access to the tracking server reads them."""
    import mlflow

    secret = "sk-proj-MLFLOWleak0123456789abcdefXYZ"
    env_secret = "envsecret-7f3a9c1b5d2e8f40"
    monkeypatch.setenv("MY_PROVIDER_API_KEY", env_secret)
    tracker = MlflowRunTracker({"seed": 0}, seed_texts={"subs[0].predict": f"call with {secret}", "render": "r"},
                               flush_interval=0.05)
    result = _synthetic_result()
    leaky = {"subs[0].predict": f"use key {env_secret}", "render": f"render with {secret}"}
    result.records[2] = _record(2, result.records[2].val_scores, [0, 1], "merge", texts=leaky)
    tracker.finish(result, None)
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient()
    params = client.get_run(tracker.run_id).data.params
    assert params["seed_instructions/subs.0.predict"].startswith("call with ")
    assert params["best_instructions/render"].startswith("render with ")
    table = Path(client.download_artifacts(tracker.run_id, "turbogepa/candidates.json", str(tmp_path / "dl")))
    uploaded = json.dumps(params) + table.read_text()
    assert secret not in uploaded and env_secret not in uploaded


def test_a_failing_stats_provider_is_warned_about_once(local_tracking, caplog):
    """A bug reading the live stats (rate-limit windows, skipped records) was logged at DEBUG only,
    so their charts went missing from MLflow without a word; now it is the tracker's one warning."""
    calls = []

    def broken() -> Any:
        calls.append(1)
        raise RuntimeError("stats went wrong")

    tracker = MlflowRunTracker({"seed": 0}, flush_interval=0.05)
    tracker.provide_stats(broken)
    result = _synthetic_result()
    for rec in result.records:
        tracker.on_candidate(rec)
    tracker.finish(result, None)
    messages = [r.getMessage() for r in tracking_warnings(caplog)]
    assert calls and len(messages) == 1, messages
    assert "could not read the run's live stats (RuntimeError: stats went wrong)" in messages[0]
    import mlflow

    assert mlflow.MlflowClient().get_run(tracker.run_id).info.status == "FINISHED"


def test_final_metrics_compare_the_seed_with_the_best_at_the_runs_last_step(local_tracking):
    """``final/*`` are what a user compares runs by: the seed's score next to the best one (the gain), at
    the step where the run ended (metric calls executed), so they line up with the end of the live charts
    instead of sitting at step 0."""
    import mlflow

    tracker = MlflowRunTracker({"seed": 0}, flush_interval=0.05)
    result = _synthetic_result()
    tracker.finish(result, None)
    client = mlflow.MlflowClient()
    metrics = client.get_run(tracker.run_id).data.metrics
    assert metrics["final/seed_val_score"] == pytest.approx(1 / 3)
    assert metrics["final/best_val_score"] == pytest.approx(2 / 3) and metrics["final/best_candidate_idx"] == 2
    for key in ("final/seed_val_score", "final/best_val_score", "final/total_metric_calls"):
        assert [m.step for m in client.get_metric_history(tracker.run_id, key)] == [result.stats.executed], key


def test_a_second_compile_in_the_users_run_gets_a_nested_run(local_tracking):
    """Two compiles in one `with mlflow.start_run():` mixed their params, histories and artefacts in one
    run; the second now logs to a run nested under the user's, which stays active."""
    import mlflow

    with mlflow.start_run(run_name="mine") as run:
        trackers = []
        for seed in (0, 7):
            tracker = MlflowRunTracker({"seed": seed}, flush_interval=0.1)
            result = _synthetic_result()
            for rec in result.records:
                tracker.on_candidate(rec)
            tracker.finish(result, None)
            trackers.append(tracker)
            assert mlflow.active_run().info.run_id == run.info.run_id
    first, second = trackers
    assert first.run_id == run.info.run_id and second.run_id != run.info.run_id
    nested = mlflow.MlflowClient().get_run(second.run_id)
    assert nested.data.tags["mlflow.parentRunId"] == run.info.run_id and nested.info.status == "FINISHED"
    assert nested.data.params["seed"] == "7"
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.params["seed"] == "0"


def test_params_mlflow_refuses_in_the_users_run_are_warned_about_by_name(local_tracking, caplog):
    """The user's run already has seed=42: MLflow refuses this compile's seed=0, and the run shows 42.
    That was logged at DEBUG only, so the run misstated the compile's configuration silently."""
    import mlflow

    with mlflow.start_run() as run:
        mlflow.log_params({"seed": 42})
        with caplog.at_level(logging.DEBUG, logger=TRACKING_LOGGER):
            tracker = MlflowRunTracker({"seed": 0, "num_threads": 4}, flush_interval=0.1)
            tracker.finish(_synthetic_result(), None)
    params = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    assert params["seed"] == "42" and params["num_threads"] == "4"  # the others are still logged
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and "refused the params seed:" in warnings[0].getMessage(), warnings


def test_the_upload_override_keeps_the_users_timeout_and_never_raises_their_retries(monkeypatch):
    """The uploads' override set a 10 s timeout over a user's 300 s for a slow server, and 2 retries over
    a user's 0; it only lowers the retries now (the run's creation still bounds both: a dead server)."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "10")
    with _few_http_retries(True, retries=UPLOAD_HTTP_RETRIES, timeout=None):
        assert tuple(os.environ.get(n) for n in names) == (str(UPLOAD_HTTP_RETRIES), "300")
    assert tuple(os.environ.get(n) for n in names) == ("10", "300")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    with _few_http_retries(True, retries=UPLOAD_HTTP_RETRIES, timeout=None):
        assert tuple(os.environ.get(n) for n in names) == ("0", None)
    assert tuple(os.environ.get(n) for n in names) == ("0", None)


def test_overlapping_http_retry_overrides_put_the_users_values_back():
    """MLflow reads its HTTP retries from the environment, which is the process's. Two compiles on two
    threads each saved and restored it: the second saved the first's override and wrote it back
    last, so the process kept 1 retry and a 10 s timeout for good."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {n: os.environ.get(n) for n in names}
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "120"  # the user's own
    os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    during: list[tuple[str | None, ...]] = []

    def first():
        with _few_http_retries(True, retries=1, timeout=10):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with _few_http_retries(True, retries=0, timeout=5):
            b_in.set()
            a_out.wait(5)
            during.append(tuple(os.environ.get(n) for n in names))

    try:
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert during == [("0", "5")]  # the first one's window ended: the second's own values
        assert os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") == "120"
        assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def test_tracker_abort_ends_its_own_run_as_failed(local_tracking):
    import mlflow

    tracker = MlflowRunTracker({"seed": 0}, flush_interval=0.1)
    tracker.on_candidate(_record(0, {0: 0.5}))
    tracker.abort(KeyboardInterrupt())
    tracker.finish(_synthetic_result(), None)  # no-op after abort
    assert mlflow.active_run() is None
    run = mlflow.MlflowClient().get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["turbogepa.stop_reason"] == "error: KeyboardInterrupt"
    assert run.data.metrics["best_val_score"] == 0.5


@pytest.mark.parametrize("where", ["start_run", "worker"])
def test_ctrl_c_while_the_tracker_is_set_up_leaves_no_run_active_and_no_worker(local_tracking, monkeypatch, where):
    """A review: a Ctrl-C in the first ~0.1 s of a use_mlflow compile, after start_run returned and before
    the tracker noted it (or once its worker had started), left the run RUNNING and active and the
    worker alive; the next compile attached to it as if it were the user's run."""
    import mlflow

    from dspy_turbogepa.tracking import mlflow_tracking

    if where == "start_run":
        real = mlflow.start_run

        def start_run(*args, **kw):
            real(*args, **kw)
            raise KeyboardInterrupt  # before _start_or_attach could note the run as its own

        monkeypatch.setattr(mlflow, "start_run", start_run)
    else:
        def interrupted(params):
            raise KeyboardInterrupt  # the worker is running by now

        monkeypatch.setattr(mlflow_tracking, "loggable_params", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MlflowRunTracker({"seed": 0}, flush_interval=0.1)
    assert mlflow.active_run() is None
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]
    deadline = time.monotonic() + 5
    while any(t.name == "turbogepa-mlflow" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "turbogepa-mlflow"]


def test_ctrl_c_while_finishing_kills_the_run_and_leaves_nothing_active(local_tracking, monkeypatch):
    """Ctrl-C while finish() waits for the uploads: the run must not stay RUNNING and active in the
    process (a notebook's next compile logged into it; the user's next start_run failed)."""
    import mlflow

    tracker = MlflowRunTracker({"seed": 0}, flush_interval=0.1)
    tracker.on_candidate(_record(0, {0: 0.5}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tracker, "_close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracker.finish(_synthetic_result(), None)
    assert mlflow.active_run() is None
    assert mlflow.MlflowClient().get_run(tracker.run_id).info.status == "KILLED"


@pytest.mark.parametrize("status, down", [(503, True), (502, True), (404, False), (200, False)])
def test_a_server_answering_5xx_counts_as_down(status, down):
    """A proxy in front of a dead MLflow answers 503; MLflow's client would retry each call for minutes."""
    import http.server

    from dspy_turbogepa.tracking.mlflow_tracking import _probe_tracking_server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # the http.server protocol names it
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        problem = _probe_tracking_server(f"http://127.0.0.1:{server.server_address[1]}", 2.0)
    finally:
        server.shutdown()
    assert (problem is not None) == down, problem


def _database_down_server(calls: list[str]) -> Any:
    """A tracking server whose /health answers 200 while every API call gets a 503 (its database is
    down); the API paths called are appended to ``calls``. Stop it with ``shutdown()``."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):  # the http.server protocol names it do_GET / do_POST
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/health"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"OK")
                return
            calls.append(self.path)
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "database down"}')

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_server_whose_api_fails_behind_a_healthy_health_check_costs_one_retry(monkeypatch, caplog):
    """/health answers 200 but the API answers 503 (the server's database is down): creating the run is
    tried twice at most, then one warning, instead of MLflow's retries with backoff (minutes)."""
    pytest.importorskip("mlflow")
    creates: list[str] = []
    server = _database_down_server(creates)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    # through the environment (as a user would): tracking_uri= would set MLflow's process-wide URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with caplog.at_level(logging.WARNING):
            tracker = MlflowRunTracker({"seed": 0})
    finally:
        server.shutdown()
        server.server_close()
    assert not tracker.enabled
    assert 1 <= len(creates) <= 4, creates  # experiment lookup / run create, at most one retry each
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the setting is put back
    assert len(tracking_warnings(caplog)) == 1


def test_an_upload_to_a_server_whose_api_fails_mid_run_retries_twice_not_seven_times(local_tracking, monkeypatch):
    """Its /health still answers while its API fails (the database gone mid-run): MLflow's default of 7
    retries with backoff per call held compile() for the whole 60 s upload wait at the end."""
    import mlflow

    posts: list[str] = []
    server = _database_down_server(posts)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # the retries, not their waits, are counted
    tracker = MlflowRunTracker({"seed": 0})  # created on the local store, working
    tracker.finish(_synthetic_result(), None)  # its uploader thread gone: the one call below is all there is
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        tracker._server_uri, tracker._client = uri, mlflow.MlflowClient(tracking_uri=uri)  # then its API fails
        tracker._dead, tracker._consecutive_failures = False, 0
        tracker._call("metrics", lambda client: client.log_batch(tracker.run_id, metrics=[
            tracker._Metric(key="x", value=1.0, timestamp=0, step=0)]))
    finally:
        server.shutdown()
        server.server_close()
    assert len(posts) == 1 + 2, posts  # the call and its two retries
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the user's setting is put back


def test_the_health_check_honours_mlflows_tls_settings(monkeypatch):
    """A server behind a private CA (or asking for a client certificate) that MLflow reaches through
    MLFLOW_TRACKING_SERVER_CERT_PATH / _CLIENT_CERT_PATH / _INSECURE_TLS failed the health check with
    CERTIFICATE_VERIFY_FAILED, and nothing was tracked."""
    import requests

    from dspy_turbogepa.tracking import mlflow_tracking as mt

    seen = []

    class Ok:
        status_code = 200

    def get(url, **kwargs):
        seen.append(kwargs)
        if kwargs.get("verify", True) is True:
            raise requests.exceptions.SSLError("certificate verify failed: CERTIFICATE_VERIFY_FAILED")
        return Ok()

    monkeypatch.setattr(requests, "get", get)
    for name in ("INSECURE_TLS", "SERVER_CERT_PATH", "CLIENT_CERT_PATH"):
        monkeypatch.delenv(f"MLFLOW_TRACKING_{name}", raising=False)
    problem = mt._probe_tracking_server("https://mlflow.internal.example", 1.0)
    assert problem is not None and "MLFLOW_TRACKING_SERVER_CERT_PATH" in problem  # says what to set
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", "/etc/ssl/private-ca.pem")
    monkeypatch.setenv("MLFLOW_TRACKING_CLIENT_CERT_PATH", "/etc/ssl/client.pem")
    assert mt._probe_tracking_server("https://mlflow.internal.example", 1.0) is None
    assert seen[-1]["verify"] == "/etc/ssl/private-ca.pem" and seen[-1]["cert"] == "/etc/ssl/client.pem"
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    assert mt._probe_tracking_server("https://mlflow.internal.example", 1.0) is None
    assert seen[-1]["verify"] is False


def test_unreachable_server_warns_once_and_the_run_completes(monkeypatch, caplog):
    pytest.importorskip("mlflow")
    import dspy_turbogepa.teleprompter as tp

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    box = install_emulated_wiring(tp, tracker_kwargs={"probe_timeout": 2.0}, setattr_fn=monkeypatch.setattr)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        _, program, _ = run_small_compile(tp, box)
        box["tracker"].finish(box["result"], program)
    assert time.monotonic() - start < 30
    assert not box["tracker"].enabled
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage(), [w.getMessage() for w in warnings]
    assert program.detailed_results.val_aggregate_scores


# ---------------------------------------------------------------------------------------- real mlflow server
@pytest.fixture
def mlflow_server(tmp_path):
    pytest.importorskip("mlflow")
    port = free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server_artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (it has worker children)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    try:
        import requests

        deadline = time.monotonic() + 60
        while True:
            try:
                # /version, not /health: a simulator of another test worker that took the port between
                # free_port() and the server's bind answers /health too
                answer = requests.get(f"{url}/version", timeout=1)
                if answer.status_code == 200 and answer.text.strip()[:1].isdigit() and proc.poll() is None:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"mlflow server did not start within 60 s: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)
        yield url, stop
    finally:
        stop()


@pytest.mark.mlflow_server
def test_tracker_against_a_real_mlflow_server(mlflow_server, tmp_path, monkeypatch, caplog):
    """Params, metric histories and artifacts read back from a real server; then the server dies mid-run."""
    import mlflow

    import dspy_turbogepa.teleprompter as tp

    url, stop_server = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    box = install_emulated_wiring(tp, tracker_kwargs={"run_name": "server-run", "flush_interval": 0.2,
                                                      "sample_interval": 0.0}, setattr_fn=monkeypatch.setattr)
    try:
        with caplog.at_level(logging.WARNING):
            _, program, splits = run_small_compile(tp, box)
            tracker = box["tracker"]
            tracker.finish(box["result"], program)
        assert not tracking_warnings(caplog), [r.getMessage() for r in tracking_warnings(caplog)]
        client = mlflow.MlflowClient(tracking_uri=url)
        run = client.get_run(tracker.run_id)
        assert run.info.run_name == "server-run" and run.info.status == "FINISHED"
        _check_tracked_run(client, tracker.run_id, box["result"], program, splits, tmp_path, plot=False)

        # the server dies during a run: one warning each, finish returns at once, the run is no longer active
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            dying = MlflowRunTracker({"seed": 0}, flush_interval=0.2, run_name="server-dies")
            assert dying.enabled and dying.started_run
            # dies just as compile finishes, long before this tracker's next /health probe was due: the
            # final burst met MLflow's own retries (finish took its whole 60 s timeout)
            at_finish = MlflowRunTracker({"seed": 0}, flush_interval=30.0, run_name="server-dies-at-finish")
            deadline = time.monotonic() + 30  # the params went out (the trackers upload from their own threads)
            while not all(client.get_run(t.run_id).data.params for t in (dying, at_finish)):
                assert time.monotonic() < deadline, "the trackers never uploaded their params"
                time.sleep(0.05)
            stop_server()
            start = time.monotonic()
            at_finish.finish(box["result"], program)
            assert time.monotonic() - start < 15
            time.sleep(0.3)
            start = time.monotonic()
            for rec in box["result"].records:
                dying.on_candidate(rec)
            dying.finish(box["result"], program)
        assert time.monotonic() - start < 15
        warnings = tracking_warnings(caplog)
        assert len(warnings) == 2 and all("stopped answering" in w.getMessage() for w in warnings), [
            w.getMessage() for w in warnings]
        assert mlflow.active_run() is None
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()


# ---------------------------------------------------------------------------------------- autolog, subprocesses
SCENARIO = r'''
import json, os, sys
mode, uri, out, tests_dir = sys.argv[1:5]
sys.path.insert(0, tests_dir)
report = {"mode": mode}
import logging
class _Collect(logging.Handler):
    def emit(self, record):
        report.setdefault("turbogepa_warnings", []).append(record.getMessage())
_handler = _Collect(level=logging.WARNING)
logging.getLogger("dspy_turbogepa.tracking").addHandler(_handler)
if mode == "no_mlflow_import":
    import dspy_turbogepa.teleprompter as tp
    from dspy_turbogepa.tracking import CompileThreadCallbackPump, register_with_mlflow_autolog
    report["registered"] = register_with_mlflow_autolog(tp.TurboGEPA)
    CompileThreadCallbackPump(lambda texts: None, []).drain()
    report["mlflow_imported"] = "mlflow" in sys.modules
else:
    import dspy, mlflow
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("@EXPERIMENT@")
    autolog = lambda: mlflow.dspy.autolog(log_compiles=True, log_evals=True, log_traces_from_compile=True)
    if mode in ("before", "e2e"):
        autolog()
    import dspy_turbogepa.teleprompter as tp
    import test_mlflow as T
    if mode == "before":  # what the teleprompter does at import once wired; idempotent
        from dspy_turbogepa.tracking import register_with_mlflow_autolog
        report["registered"] = register_with_mlflow_autolog(tp.TurboGEPA)
    if mode == "after":
        autolog()
    box = {}
    if mode != "e2e" and not T.pump_is_wired(tp):
        box = T.install_emulated_wiring(tp, pump=True)
    opt, program, splits = T.run_small_compile(tp, box, **({"use_mlflow": True} if mode == "e2e" else {}))
    dr = program.detailed_results
    report.update(scores=dr.val_aggregate_scores, optimizer_attrs=sorted(vars(opt)))
logging.getLogger("dspy_turbogepa.tracking").removeHandler(_handler)
with open(out, "w") as f:
    json.dump(report, f)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # skip flushing MLflow's async trace export queue at exit (seconds; the traces are not checked)
'''.replace("@EXPERIMENT@", EXPERIMENT)


@pytest.fixture(scope="module")
def autolog_scenarios(template_db, tmp_path_factory):
    """Runs every scenario in its own process, all at once; returns {mode: (report | None, db uri, stderr)}."""
    root = tmp_path_factory.mktemp("autolog")
    script = root / "scenario.py"
    script.write_text(SCENARIO)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": os.pathsep.join(
        [str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = {}
    for mode in ("before", "after", "e2e", "no_mlflow_import"):
        uri = fresh_db(template_db, root / mode)
        out = root / mode / "report.json"
        # Tracing every program call costs more than the compile itself; the traces are not checked, so
        # the import-order scenarios keep a fifth of them (the end-to-end one keeps all).
        mode_env = {**env, "MLFLOW_TRACE_SAMPLING_RATIO": "0.2"} if mode in ("before", "after") else env
        procs[mode] = (subprocess.Popen([sys.executable, str(script), mode, uri, str(out), str(TESTS_DIR)],
                                        env=mode_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        cwd=root / mode),  # MLflow's artifacts (./mlruns) stay there
                       uri, out)
    results = {}
    for mode, (proc, uri, out) in procs.items():
        try:
            _, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        report = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else None
        results[mode] = (report, uri, stderr)
    return results


def _scenario(autolog_scenarios, mode):
    report, uri, stderr = autolog_scenarios[mode]
    assert report is not None, f"scenario {mode} failed:\n{stderr[-4000:]}"
    return report, uri


def _autolog_runs(uri: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, runs


def _read_table(client, run_id: str, path: str) -> dict:
    """An MLflow table artifact as {"columns": [...], "data": [[...], ...]}.

    (``MlflowClient.load_table`` searches runs through the *global* tracking URI, so it cannot be used
    with a client pointed elsewhere.)
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


def _check_autolog_structure(report: dict, uri: str) -> tuple[Any, Any]:

    client, runs = _autolog_runs(uri)
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1, [(r.info.run_name, r.data.tags.get("mlflow.parentRunId")) for r in runs]
    parent = top[0]
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.data.tags.get("mlflow.autologging") == "dspy"
    artifacts = {a.path for a in client.list_artifacts(pid)}
    assert {"best_model.json", "trainset.json", "valset.json"} <= artifacts, artifacts
    assert "lm_params" in parent.data.params
    train = _read_table(client, pid, "trainset.json")
    assert len(train["data"]) == 12

    scores = report["scores"]
    nested = sorted((r for r in runs if r.info.run_id != pid), key=lambda r: int(r.info.run_name.rsplit("_", 1)[1]))
    assert [r.info.run_name for r in nested] == [f"eval_full_{k}" for k in range(len(scores))]
    assert all(r.data.tags["mlflow.parentRunId"] == pid for r in nested)
    assert [r.data.metrics["eval"] for r in nested] == pytest.approx([round(100 * s, 2) for s in scores])
    assert {"model.json", "result_table.json"} <= {a.path for a in client.list_artifacts(nested[-1].info.run_id)}
    table = _read_table(client, nested[0].info.run_id, "result_table.json")
    assert len(table["data"]) == 8 and "score" in table["columns"]
    history = sorted(client.get_metric_history(pid, "eval_full"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(len(scores)))
    assert [m.value for m in history] == pytest.approx([round(100 * s, 2) for s in scores])
    # get_params() returns a copy: autolog's params.update(inputs) did not add student/trainset to the optimizer
    assert not {"student", "trainset", "valset"} & set(report["optimizer_attrs"])
    assert not report.get("turbogepa_warnings"), report["turbogepa_warnings"]
    return client, parent


@pytest.mark.parametrize("order", ["before", "after"])
def test_autolog_records_compile_and_nested_full_evaluations(autolog_scenarios, order):
    report, uri = _scenario(autolog_scenarios, order)
    if order == "before":
        assert report["registered"] is True
    _check_autolog_structure(report, uri)


def test_tracking_imports_never_import_mlflow(autolog_scenarios):
    report, _ = _scenario(autolog_scenarios, "no_mlflow_import")
    assert report == {"mode": "no_mlflow_import", "registered": False, "mlflow_imported": False}, report


def test_end_to_end_wiring(autolog_scenarios):
    """autolog on before import, no explicit registration, no emulation, use_mlflow=True: one run holds it all."""
    report, uri = _scenario(autolog_scenarios, "e2e")
    client, parent = _check_autolog_structure(report, uri)
    pid = parent.info.run_id
    artifacts = {a.path for a in client.list_artifacts(pid, "turbogepa")}
    assert {"turbogepa/optimized_program.json", "turbogepa/candidates.json", "turbogepa/pareto_front.json",
            "turbogepa/run_summary.json"} <= artifacts
    assert "turbogepa/best_over_time.svg" in artifacts  # no log_dir: drawn for MLflow (SVG: no dependency)
    metrics = parent.data.metrics
    assert metrics["best_val_score"] == pytest.approx(max(report["scores"]))
    assert metrics["final/num_candidates"] == len(report["scores"])
    assert parent.data.params["max_metric_calls"] == str(BUDGET)
    assert not math.isnan(metrics["metric_calls"])


@pytest.mark.parametrize("where", ["engine", "result"])
def test_failed_compile_ends_its_mlflow_run_and_closes_the_store(local_tracking, tmp_path, monkeypatch, where,
                                                                 caplog):
    """A failure before the run (building the engine) or after it (building the result) must not leave
    the MLflow run RUNNING, the run store open or the store's writer thread alive. Nor does the tracker's
    last sample read stats from an engine that was never built (it is given them once the engine exists)."""
    import threading

    import mlflow

    import dspy_turbogepa.teleprompter as tp

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected failure in {where}")

    monkeypatch.setattr(tp, "Orchestrator" if where == "engine" else "build_result", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_small_compile(tp, use_mlflow=True, log_dir=str(tmp_path / "run"))
    assert mlflow.active_run() is None
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not tracking_warnings(caplog), [r.getMessage() for r in tracking_warnings(caplog)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        t.name.startswith(("turbogepa-run-store", "turbogepa-mlflow")) for t in threading.enumerate()
    ):
        time.sleep(0.05)
    alive = [t.name for t in threading.enumerate() if t.name.startswith(("turbogepa-run-store", "turbogepa-mlflow"))]
    assert not alive, alive


def test_log_dir_reports_are_uploaded_to_the_mlflow_run(local_tracking, tmp_path):
    """use_mlflow with log_dir: the run's summary.json and plots are written there and uploaded under
    ``turbogepa/``, so the MLflow run holds the same reports as the directory."""
    import mlflow

    import dspy_turbogepa.teleprompter as tp

    log_dir = tmp_path / "run"
    run_small_compile(tp, use_mlflow=True, log_dir=str(log_dir))
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "turbogepa")}
    assert "turbogepa/summary.json" in artifacts, artifacts
    uploaded = Path(client.download_artifacts(run.info.run_id, "turbogepa/summary.json", str(tmp_path / "dl")))
    assert json.loads(uploaded.read_text()) == json.loads((log_dir / "summary.json").read_text())
    assert {"turbogepa/best_over_time.svg", "turbogepa/lineage.svg"} <= artifacts, artifacts


def test_a_resumed_runs_curves_continue_where_the_budget_stands(local_tracking, tmp_path):
    """Every progress metric's step is the metric calls counted against the budget. On a resumed
    log_dir everything replayed had executed 0 calls, so the whole second run's curves sat at step 0
    and ``metric_calls`` read 0 while the budget (and the progress display) stood at the stored count."""
    import mlflow

    import dspy_turbogepa.teleprompter as tp

    log_dir = str(tmp_path / "run")
    _, first, _ = run_small_compile(tp, use_mlflow=True, log_dir=log_dir)
    _, again, _ = run_small_compile(tp, use_mlflow=True, log_dir=log_dir)
    stats = again.detailed_results.run_stats
    assert stats["metric_calls_executed"] == 0 and stats["metric_calls_replayed"] > 0
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time DESC"])
    second = runs[0].info.run_id
    calls = sorted(client.get_metric_history(second, "metric_calls"), key=lambda m: (m.step, m.timestamp))
    assert calls[-1].value == stats["metric_calls_replayed"] and all(m.step == int(m.value) for m in calls)
    best = client.get_metric_history(second, "best_val_score")
    assert max(m.step for m in best) > 0
    (final,) = client.get_metric_history(second, "final/total_metric_calls")
    assert final.step == calls[-1].step
    assert client.get_metric_history(second, "metric_calls_replayed")[-1].value == stats["metric_calls_replayed"]


def test_upload_timeout_still_removes_the_temporary_plot_directory(local_tracking, caplog):
    tracker = MlflowRunTracker({"seed": 0}, plot_path=True, flush_interval=0.05, finish_timeout=0.2)
    tmpdir = tracker._tmpdir
    assert tmpdir is not None and Path(tmpdir).is_dir()
    tracker._submit("slow upload", lambda c: time.sleep(1.0))
    with caplog.at_level(logging.WARNING):
        tracker.finish(_synthetic_result(), None)
    assert any("did not finish" in r.getMessage() for r in caplog.records)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(tmpdir).exists():
        time.sleep(0.05)
    assert not Path(tmpdir).exists()


def test_upload_errors_are_masked_with_the_runs_secrets(local_tracking, caplog):
    """The upload worker is a thread of its own: it must still see the keys compile() declared."""
    from dspy_turbogepa.store import run_secrets

    key = "prov-0a9b8c7d6e5f4a3b2c1d"

    def failing_upload(client):
        raise RuntimeError(f"proxy rejected key {key}")

    with run_secrets([key]), caplog.at_level(logging.DEBUG, logger=TRACKING_LOGGER):
        tracker = MlflowRunTracker({"seed": 0}, flush_interval=0.05)
        tracker._submit("upload", failing_upload)
        tracker.finish(_synthetic_result(), None)
    messages = [r.getMessage() for r in caplog.records]
    assert any("proxy rejected key ***REDACTED***" in m for m in messages), messages
    assert not any(key in m for m in messages)


def test_a_systemic_failure_still_logs_the_last_stats_to_mlflow(local_tracking):
    """A run that ends with SystemicFailureError is marked FAILED: its charts must end where the run did
    (they ended at the last periodic sample, which can be the seed's, so the paid calls were not shown)."""
    import dspy
    import mlflow

    import dspy_turbogepa.teleprompter as tp
    from dspy_turbogepa import SystemicFailureError
    from dspy_turbogepa.testing import TASKS, make_student_lm

    task = TASKS["pipeline"]
    splits = task.splits(data_seed=0, n_train=12, n_val=8, n_test=0)
    calls = []

    def proposer(candidate, reflective_dataset, components_to_update):
        raise RuntimeError("this proposer always fails")

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is None:
            calls.append(1)
        return task.metric(gold, pred, trace, pred_name, pred_trace)

    opt = tp.TurboGEPA(metric, max_metric_calls=400, instruction_proposer=proposer, num_threads=8, use_mlflow=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)), pytest.raises(SystemicFailureError):
        opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    assert mlflow.active_run() is None
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "metric_calls")
    assert history and max(m.value for m in history) == len(calls) > len(splits.val)  # beyond the seed's


def test_gepa_kwargs_tracking_uri_never_switches_the_store_under_the_users_active_run(
        local_tracking, template_db, tmp_path, caplog):
    """Inside the user's `with mlflow.start_run()` in store A, mlflow_tracking_uri=B switched the
    process-wide URI: nothing was logged, the user's next log_metric and the end of their block raised,
    and their run stayed RUNNING in A. Now the URI is left alone, with a warning, and the compile logs
    into the active run."""
    import mlflow

    import dspy_turbogepa.teleprompter as tp

    other = fresh_db(template_db, tmp_path / "other")
    with caplog.at_level(logging.WARNING), mlflow.start_run() as users:
        run_small_compile(tp, use_mlflow=True, gepa_kwargs={"mlflow_tracking_uri": other})
        assert mlflow.get_tracking_uri() == local_tracking
        mlflow.log_metric("users_own", 1.0)  # raised MlflowException: the run was looked up in B
    warned = [r.getMessage() for r in tracking_warnings(caplog)]
    assert len(warned) == 1 and "is not applied" in warned[0], warned
    run = mlflow.MlflowClient(tracking_uri=local_tracking).get_run(users.info.run_id)
    assert run.info.status == "FINISHED" and "users_own" in run.data.metrics and "best_val_score" in run.data.metrics


def test_gepa_kwargs_tracking_uri_and_experiment_are_honoured(local_tracking, template_db, tmp_path):
    """dspy.GEPA routes use_mlflow to gepa_kwargs' mlflow_tracking_uri / mlflow_experiment_name; they
    were ignored with a warning and the run landed in the process's default store and experiment."""
    import dspy
    import mlflow

    import dspy_turbogepa.teleprompter as tp

    other = fresh_db(template_db, tmp_path / "other")
    try:
        run_small_compile(tp, use_mlflow=True, gepa_kwargs={"mlflow_tracking_uri": other,
                                                            "mlflow_experiment_name": "turbo-routed"})
    finally:
        mlflow.set_tracking_uri(None)  # gepa's setting is process-wide, as in gepa: undo it for the next tests
    routed = mlflow.MlflowClient(tracking_uri=other)
    experiment = routed.get_experiment_by_name("turbo-routed")
    assert experiment is not None
    runs = routed.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "best_val_score" in runs[0].data.metrics
    assert mlflow.MlflowClient(tracking_uri=local_tracking).search_runs(["0"]) == []
    with pytest.raises(TypeError, match="mlflow_tracking_uri"):
        tp.TurboGEPA(lambda g, p, t=None, n=None, pt=None: 1.0, auto="light", reflection_lm=dspy.LM("openai/x"),
                     gepa_kwargs={"mlflow_tracking_uri": 5})


def test_after_a_ctrl_c_through_the_callbacks_the_pump_emits_nothing_more():
    """A review: after two presses got out of MLflow's hold, the runner's grace period kept draining the
    queued evaluations, and each held the next press (the one meant to abort at once) again."""
    import dspy

    class Interrupting(_RecordingCallback):
        def on_evaluate_start(self, call_id, instance, inputs):
            super().on_evaluate_start(call_id, instance, inputs)
            raise KeyboardInterrupt

    cb = Interrupting()
    pump = CompileThreadCallbackPump(lambda t: "p", [dspy.Example(q="q").with_inputs("q")], callbacks=[cb])
    for i in range(3):
        pump.on_candidate(_record(i, {0: 1.0}))
    with pytest.raises(KeyboardInterrupt):
        pump.drain()
    assert pump.drain() == 0 and [e[0] for e in cb.events] == ["start", "end"]


def test_a_second_press_in_a_hold_goes_to_the_handler_that_was_there():
    """A review: the second press raised KeyboardInterrupt itself, so a user's own SIGINT handler got
    neither press."""
    import os
    import signal

    from dspy_turbogepa.tracking.imports import ctrl_c_held

    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        with ctrl_c_held(second_press_escapes=True):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert got == [signal.SIGINT, signal.SIGINT]  # both, at the second press, inside the block
        assert got == [signal.SIGINT, signal.SIGINT]  # and none again after it
    finally:
        signal.signal(signal.SIGINT, previous)
