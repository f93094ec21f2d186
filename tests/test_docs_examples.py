"""The user-facing documentation, checked against the code: README.md, docs/errors.md, docs/extending.md,
docs/mlflow.md, docs/run_store.md and examples/*.py (docs/benchmark.md and docs/deviations.md are not
covered here).

How snippets are checked:

* **Extracted at test time** (so a doc edit that breaks them fails here): the README's python block, the
  run_store.md block and the mlflow.md block are read out of the markdown and executed, with only the
  real model replaced by the offline fake LMs (``dspy_turbogepa.testing``) and paths put in a tmp dir;
  the errors.md "Arguments and data" table is parsed, and each case below checks the exception class
  *that table names* for the row it points at; run_store.md's schema tables are parsed and every
  documented column must exist; paths, modules and links the docs name must exist.
* **Restated**: the concrete claims of prose and table rows (what a run does, what is logged, what a
  message names) are restated as small runs on the fake LMs or the loopback simulator.
* **Examples** run as the commands their docstrings give, offline (the bundled simulator on 127.0.0.1),
  with a smaller budget and time scale than their defaults so the file stays fast.

A doc statement found wrong is pinned by a test asserting what the doc says, marked
``xfail(strict=True, reason="DOC: ...")``.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import re
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.teleprompt.gepa.gepa import DspyGEPAResult
from dspy.teleprompt.teleprompt import Teleprompter

import dspy_turbogepa
from dspy_turbogepa import ConfigurationError, SystemicFailureError, TurboGEPA
from dspy_turbogepa.store import (
    SCHEMA_VERSION,
    RunStore,
    RunStoreError,
    RunStoreMismatchError,
    mask_text,
    redact,
    stable_hash,
)
from dspy_turbogepa.testing import TASKS, SimConfig, SimServer, make_reflection_lm, make_student_lm
from dspy_turbogepa.testing.fake_lm import AsyncSimEngine, SimEngine, request_messages

from helpers import CountingMetric
from helpers import quick_compile as run

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dspy_turbogepa"
ROUTING = TASKS["routing"]
RULES = [r.id for r in ROUTING.rules_for("route")]
#: subprocesses: offline, and nothing but 127.0.0.1 (the simulator) is ever contacted
SUB_ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------------ helpers
def doc(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


def fenced(path: str, lang: str) -> list[str]:
    """The bodies of the ```lang fenced blocks of a markdown file."""
    return re.findall(rf"^```{lang}\n(.*?)^```", doc(path), re.S | re.M)


def splits(n_train: int = 12, n_val: int = 8):
    return ROUTING.splits(data_seed=0, n_train=n_train, n_val=n_val, n_test=0)


def instructions(program: dspy.Module) -> dict[str, str]:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


def near_perfect_program() -> dspy.Module:
    """The routing program knowing every rule but one: one reflection fixes it, then the run stops."""
    return ROUTING.make_program({"route": ROUTING.instruction_with_rules("route", RULES[:-1])})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=SUB_ENV, capture_output=True, text=True,
                          timeout=timeout)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ================================================================================================ README.md
def test_readme_snippet_runs_and_the_saved_program_loads(tmp_path, monkeypatch):
    """README's first block, extracted: only dspy.LM("openai/gpt-5", ...) becomes the fake reflection LM;
    "optimized.json" lands in a tmp cwd. Its comment says: load with Program().load(...)."""
    code = fenced("README.md", "python")[0]
    real_lm = re.search(r"dspy\.LM\(.*?\)", code, re.S).group(0)
    assert isinstance(eval(real_lm, {"dspy": dspy}), dspy.LM)  # the real LM as written is valid (no call made)
    code, n = re.subn(r"dspy\.LM\(.*?\)", "REFLECTION_LM", code, flags=re.S)
    assert n == 1, code
    data = splits()
    ns: dict[str, Any] = {"metric": ROUTING.metric, "program": ROUTING.make_program(), "train": data.train,
                          "val": data.val, "REFLECTION_LM": make_reflection_lm()}
    monkeypatch.chdir(tmp_path)
    with dspy.context(lm=make_student_lm()):
        exec(compile(code, "README.md", "exec"), ns)
    optimized = ns["optimized"]
    assert isinstance(ns["optimizer"], TurboGEPA) and ns["optimizer"].num_threads == 16
    assert (tmp_path / "optimized.json").is_file()
    json.loads((tmp_path / "optimized.json").read_text())  # "dspy's own format": JSON
    reloaded = ROUTING.make_program()
    reloaded.load("optimized.json")
    assert instructions(reloaded) == instructions(optimized)
    assert instructions(optimized) != instructions(ROUTING.make_program())  # it did optimize


def test_readme_gepa_alias_and_same_constructor_as_dspy_gepa():
    """"also importable as dspy_turbogepa.GEPA"; "every dspy.GEPA argument, same names and defaults"."""
    assert dspy_turbogepa.GEPA is TurboGEPA
    ours = inspect.signature(TurboGEPA.__init__).parameters
    for name, param in inspect.signature(dspy.GEPA.__init__).parameters.items():
        assert name in ours, name
        assert ours[name].kind == param.kind, name
        assert ours[name].default == param.default, (name, ours[name].default, param.default)


def test_readme_same_compile_as_dspy_gepa():
    ours, theirs = inspect.signature(TurboGEPA.compile), inspect.signature(dspy.GEPA.compile)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.parameters.values()]


def test_readme_a_duplicate_candidate_is_never_paid_for(tmp_path):
    """A proposer answering the same text every time: its evaluations are paid once, then served from the
    cache, and the run stops on its own long before the budget."""
    metric = CountingMetric(ROUTING.metric)
    same = {"route": "Route the support ticket. Payments owns refunds and invoices."}
    dr = run(metric, instruction_proposer=lambda candidate, reflective_dataset, components_to_update: same,
             budget=400, data=splits(24, 8), log_dir=str(tmp_path)).detailed_results
    with sqlite3.connect(tmp_path / "run.sqlite3") as conn:
        rows = conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    assert metric.scoring == rows == dr.total_metric_calls < 100
    assert dr.stop_reason == "no_progress_possible" and dr.run_stats["cache_hits"] > 0


def test_readme_defaults_it_names():
    """reflection_scouts=5, reflection_feedback_reuse=3, failure-first minibatches, max_reflections_in_flight
    a quarter of num_threads (4 at 16 threads), and the dspy.GEPA-like settings are all arguments."""
    from dspy_turbogepa.engine.config import default_reflections_in_flight

    params = inspect.signature(TurboGEPA.__init__).parameters
    assert params["reflection_scouts"].default == 5
    assert params["reflection_feedback_reuse"].default == 3
    assert params["minibatch_sampling"].default == "failure_first"
    assert params["max_sibling_reflections"].default == 4
    assert params["adaptive_proposal_mix"].default is True
    assert params["strict_budget"].default is False
    assert params["deterministic"].default is True  # extending.md: "deterministic=True (the default)"
    assert default_reflections_in_flight(16) == 4


def _dataset_sizes(**kw) -> list[int]:
    sizes: list[int] = []

    def proposer(candidate, reflective_dataset, components_to_update):
        sizes.extend(len(reflective_dataset[c]) for c in components_to_update)
        return {c: candidate[c] + f" Variant {len(sizes)}." for c in components_to_update}

    run(instruction_proposer=proposer, budget=120, data=splits(24, 8), num_threads=8, **kw)
    return sizes


def test_readme_gepa_like_settings_reflect_on_the_minibatch_alone():
    """By default a reflection reads more than its 3-example minibatch (scouts, reused failures); with
    reflection_scouts=0, reflection_feedback_reuse=0, minibatch_sampling="epoch", max_sibling_reflections=1,
    adaptive_proposal_mix=False each reads what dspy.GEPA's would: the minibatch."""
    assert max(_dataset_sizes()) > 3
    gepa_like = _dataset_sizes(reflection_scouts=0, reflection_feedback_reuse=0, minibatch_sampling="epoch",
                               max_sibling_reflections=1, adaptive_proposal_mix=False)
    assert gepa_like and set(gepa_like) == {3}


def test_readme_metric_protocol_and_detailed_results():
    """A metric returning a float works as well as one returning dspy.Prediction(score, feedback); with
    track_stats=True detailed_results *is* a DspyGEPAResult."""
    def float_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return float(ROUTING.metric(gold, pred).score)

    for metric in (float_metric, ROUTING.metric):
        optimized = run(metric, budget=40)
        assert isinstance(optimized.detailed_results, DspyGEPAResult)
    assert not hasattr(run(budget=30, track_stats=False), "detailed_results")


def test_readme_a_metric_that_always_raises_stops_the_run():
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise RuntimeError("judge is down")

    with pytest.raises(SystemicFailureError, match="judge is down") as info:
        run(metric)
    assert info.value.failure == "metric_error"


def test_readme_budget_rule_and_strict_budget():
    """dspy.GEPA's rule overshoots by less than 2 * minibatch + len(valset); strict_budget never passes."""
    data = splits(24, 8)
    loose = run(budget=100, data=data, num_threads=8).detailed_results.total_metric_calls
    assert loose < 100 + 2 * 3 + len(data.val)
    strict = run(budget=100, data=data, num_threads=8, strict_budget=True).detailed_results.total_metric_calls
    assert strict <= 100


def test_readme_never_pays_twice_for_a_candidate_example_pair(tmp_path):
    metric = CountingMetric(ROUTING.metric)
    optimized = run(metric, budget=120, data=splits(24, 8), num_threads=8, log_dir=str(tmp_path))
    with sqlite3.connect(tmp_path / "run.sqlite3") as conn:
        rows = conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    assert metric.scoring == rows == optimized.detailed_results.total_metric_calls


class _CrmError(RuntimeError):
    pass


class FailsOnTracking(dspy.Module):
    def __init__(self):
        super().__init__()
        self.inner = ROUTING.make_program()

    def forward(self, ticket):
        routed = self.inner(ticket=ticket)
        if "tracking" in ticket.lower():  # downstream: after the predictor answered
            raise _CrmError("downstream CRM rejected the tracking ticket")
        return routed


def test_readme_program_errors_become_reflection_feedback():
    """errors.md: "the program raises on an example: scored failure_score, counted as program_error, the
    error goes to reflection as feedback for the predictor it was raised in, else for the last one that ran
    before it"."""
    feedback: list[str] = []

    def proposer(candidate, reflective_dataset, components_to_update):
        feedback.extend(str(r["Feedback"]) for c in components_to_update for r in reflective_dataset[c])
        return {c: candidate[c] + f" Variant {len(feedback)}." for c in components_to_update}

    optimized = run(program=FailsOnTracking(), instruction_proposer=proposer, budget=120, data=splits(24, 8))
    assert optimized.detailed_results.run_stats["failures"]["program_error"] > 0
    assert any("downstream CRM rejected the tracking ticket" in f for f in feedback)


@pytest.mark.parametrize("page", ["README.md", "docs/errors.md", "docs/extending.md", "docs/mlflow.md",
                                  "docs/run_store.md"])
def test_relative_links_and_images_exist(page):
    base = (ROOT / page).parent
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc(page)):
        assert (base / link).exists(), (page, link)


def test_readme_paths_links_and_layout_exist():
    text = doc("README.md")
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / link).exists(), link
    layout = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S).group(1)
    for name in re.findall(r"^  (\S+)\s", layout, re.M):
        assert (PKG / name).exists(), name
    for name in re.findall(r"(\w+\.py)", layout):
        assert (PKG / name).exists() or (ROOT / "examples" / name).exists(), name
    assert (ROOT / "examples" / "quickstart.py").is_file() and (ROOT / "examples" / "serve_optimized.py").is_file()


def test_readme_version_pins_and_ci():
    """constraints.txt pins dspy 3.4.1, litellm 1.106.2, mlflow 3.17.2, mypy and ruff; the package
    accepts the ranges the README quotes; .ci/run installs .[test,plots] and runs the README's pytest command."""
    pins = dict(line.split("==") for line in doc("constraints.txt").splitlines() if "==" in line)
    assert (pins["dspy"], pins["litellm"], pins["mlflow"]) == ("3.4.1", "1.106.2", "3.17.2")
    assert "mypy" in pins and "ruff" in pins
    pyproject = doc("pyproject.toml")
    for spec in ('"dspy>=3.4.1,<3.5"', '"litellm>=1.100,<1.107', '"mlflow>=3.17,<3.18"'):
        assert spec in pyproject, spec
    assert "!=1.107.0" in pyproject
    ci = doc(".ci/run")
    assert '".[test,plots]"' in ci and "-c constraints.txt" in ci
    assert re.search(r"^python -m pytest -q -n 2 --dist loadfile$", ci, re.M)
    assert "python -m pytest -q -n 2 --dist loadfile" in fenced("README.md", "bash")[1]
    assert 'pip install -e ".[test]" -c constraints.txt' in fenced("README.md", "bash")[0]


# =============================================================================================== examples/
def test_examples_run_offline_as_their_docstrings_say(tmp_path):
    """README: `python examples/quickstart.py` prints the seed score and the optimized score, offline;
    serve_optimized.py serves a saved program (`--program`) and the pipeline task, with no failure (its exit
    code is 1 on any failed request). Smaller budget / time scale than the defaults, nothing else."""
    fast = ["--budget", "60", "--threads", "4", "--time-scale", "0.02"]
    saved = tmp_path / "program.json"

    def start(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=SUB_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    # the two independent commands at once (both mostly wait on the simulator's latencies)
    with socket.socket() as probe:  # a port of its own, so that the same command can resume the log_dir
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    resumable = ["--log-dir", str(tmp_path / "run"), "--port", port]
    quickstart = start(["examples/quickstart.py", *fast, "--out", str(saved), *resumable])
    pipeline = start(["examples/serve_optimized.py", "--task", "pipeline", "--requests", "200", "--concurrency",
                      "32", *fast])
    qs_out, qs_err = quickstart.communicate(timeout=180)
    pl_out, pl_err = pipeline.communicate(timeout=180)
    assert quickstart.returncode == 0, qs_err[-3000:]
    assert re.search(r"LM simulator listening on http://127\.0\.0\.1:\d+/v1", qs_out)
    assert re.search(r"seed score \d\.\d{3} -> optimized score \d\.\d{3} \(held-out test set\)", qs_out)
    assert f"saved to {saved}; reloaded program test score" in qs_out
    assert "route" in json.loads(saved.read_text())  # DSPy's own JSON state
    assert f"plots (open in a browser): {tmp_path / 'run' / 'best_over_time.svg'}, " in qs_out
    assert {"summary.json", "best_over_time.svg", "lineage.svg", "run.sqlite3"} <= set(os.listdir(tmp_path / "run"))
    again = run_script(["examples/quickstart.py", *fast, *resumable], ROOT)  # the same command: resumed
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"\((\d+) of them stored by earlier sessions\)", again.stdout + again.stderr), again.stderr[-2000:]
    assert pipeline.returncode == 0, pl_out + pl_err[-3000:]
    assert re.search(r"optimized in [\d.]+s \(60 metric calls max\); saved to ", pl_out)
    assert re.search(r"optimized program: 200 requests .* failures 0", pl_out)
    assert re.search(r"seed program: 200 requests .* failures 0", pl_out)

    served = run_script(["examples/serve_optimized.py", "--program", str(saved), "--requests", "20",
                         "--time-scale", "0.02"], ROOT)
    assert served.returncode == 0, served.stdout + served.stderr[-3000:]
    assert "optimized in" not in served.stdout  # --program: served as saved, no optimization step
    assert re.search(r"optimized program: 20 requests .* failures 0", served.stdout)


def test_quickstart_compare_never_calls_a_slower_run_faster(tmp_path, capsys):
    """Only the comparison line is under test: the optimizers and the task's evaluation are stubbed, and the
    clock says TurboGEPA took 10 s and dspy.GEPA 5 s."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("quickstart_example", ROOT / "examples" / "quickstart.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    class Task:
        metric = staticmethod(ROUTING.metric)

        def splits(self, **_):
            return ROUTING.splits(data_seed=0, n_train=2, n_val=2, n_test=1)

        def make_program(self):
            return ROUTING.make_program()

        def evaluate(self, program, examples, num_threads=8):
            return 0.5

    class Optimizer:
        def __init__(self, *args, **kwargs):
            pass

        def compile(self, program, trainset, valset):
            program.detailed_results = types.SimpleNamespace(total_metric_calls=1, candidates=[program],
                                                             val_aggregate_scores=[0.5], best_idx=0)
            return program

    ticks = iter([0.0, 10.0, 100.0, 105.0])
    example.time = types.SimpleNamespace(perf_counter=lambda: next(ticks))
    example.TASKS = {"routing": Task()}
    example.TurboGEPA = Optimizer
    example.dspy = types.SimpleNamespace(LM=dspy.LM, configure=lambda **_: None, GEPA=Optimizer)
    package_logger = logging.getLogger("dspy_turbogepa")
    level = package_logger.level
    try:
        assert example.main(["--compare", "--out", str(tmp_path / "p.json")]) == 0
    finally:
        package_logger.setLevel(level)  # main() sets it to INFO for the script's own run
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("dspy.GEPA:"))
    assert "TurboGEPA was 0.5x faster" not in line, line


def test_serve_optimized_functions_do_what_the_docstring_says(tmp_path):
    """serve_optimized.py, in process: the optimization step leaves no global LM behind (dspy.context), the
    service binds ONE LM with set_lm (no dspy.configure), and a semaphore caps the calls in flight."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_optimized", ROOT / "examples" / "serve_optimized.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    before = dspy.settings.lm
    with SimServer("test", seed=0) as server:
        path = example.optimize(ROUTING, server, tmp_path / "program.json", budget=40, threads=4, seed=0)
    assert dspy.settings.lm is before  # "scoped: nothing global is left behind"
    assert "route" in json.loads(path.read_text())  # DSPy's own JSON state
    with SimServer("benchmark", seed=0, time_scale=0.2) as server:  # latencies, so requests overlap
        lm = example.make_lm(server, temperature=0.0)
        program = example.load_program(ROUTING, path, lm)
        assert all(p.lm is lm for _, p in program.named_predictors())
        requests = ROUTING.splits(data_seed=0, n_train=0, n_val=0, n_test=24).test
        server.reset_stats()
        report = asyncio.run(example.serve(program, requests, concurrency=3))
        peak = server.stats()["models"]["sim-student"]["peak_concurrency"]
    assert report["failures"] == 0 and len(report["predictions"]) == 24
    assert 1 < peak <= 3, peak
    assert dspy.settings.lm is before


# ============================================================================================ docs/errors.md
def errors_table() -> list[tuple[str, str, list[str], str]]:
    """The "Arguments and data" rows: (mistake, raised by, exception names, message names)."""
    section = doc("docs/errors.md").split("## Arguments and data", 1)[1].split("## During the run", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # header off
    out = []
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, line
        out.append((cells[0], cells[1], re.findall(r"`(\w+)`", cells[2]), cells[3]))
    return out


def documented(row_key: str) -> tuple[str, list[str]]:
    """(raised by, exception names) of the errors.md row whose "mistake" cell contains ``row_key``."""
    rows = [r for r in errors_table() if row_key in r[0]]
    assert len(rows) == 1, (row_key, [r[0] for r in rows])
    return rows[0][1], rows[0][2]


def _ok_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)


def _two_args(gold, pred):
    return 1.0


async def _async_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return 1.0


class _Judge(dspy.Module):
    def forward(self, gold, pred):
        return 1.0


CTOR = "constructor"
#: (row key in errors.md, constructor kwargs (beside a valid metric / budget / reflection LM), message parts)
CONSTRUCTOR_CASES = [
    ("metric cannot take", {"metric": _two_args}, ["(gold, pred)", "def metric(gold, pred, trace=None"]),
    ("metric cannot take", {"metric": _async_metric}, ["async"]),
    ("metric cannot take", {"metric": _Judge()}, ["forward"]),
    ("not exactly one of", {"max_metric_calls": None},
     ["max_metric_calls=None, max_full_evals=None, auto=None", "For example"]),
    ("not exactly one of", {"auto": "light"}, ["max_metric_calls=50", "auto=light"]),
    ("`auto` not in", {"max_metric_calls": None, "auto": "fast"}, ["heavy", "light", "medium"]),
    ("non-positive or non-integer `max_metric_calls`", {"max_metric_calls": 0}, ["max_metric_calls"]),
    ("non-positive or non-integer `max_metric_calls`", {"max_metric_calls": 2.5}, ["max_metric_calls"]),
    ("non-positive or non-integer `max_metric_calls`", {"num_threads": 0}, ["num_threads"]),
    ("non-positive or non-integer `max_metric_calls`", {"num_threads": "4"}, ["num_threads"]),
    ("non-positive or non-integer `max_metric_calls`", {"reflection_minibatch_size": 0},
     ["reflection_minibatch_size"]),
    ("non-positive or non-integer `max_metric_calls`", {"max_mutations_in_flight": -1}, ["max_mutations_in_flight"]),
    ("non-positive or non-integer `max_metric_calls`", {"max_reflections_in_flight": 0},
     ["max_reflections_in_flight"]),
    ("non-positive or non-integer `max_metric_calls`", {"max_sibling_reflections": 0}, ["max_sibling_reflections"]),
    ("non-positive or non-integer `max_metric_calls`", {"token_budget": 0}, ["token_budget"]),
    ("negative or non-integer `reflection_feedback_reuse`", {"reflection_feedback_reuse": -1},
     ["reflection_feedback_reuse"]),
    ("negative or non-integer `reflection_feedback_reuse`", {"reflection_scouts": 1.5}, ["reflection_scouts"]),
    ("negative or non-integer `reflection_feedback_reuse`", {"max_merge_invocations": -1},
     ["max_merge_invocations"]),
    ("`log_dir` not a path", {"log_dir": 123}, ["int"]),
    ("not a number (`failure_score=None`)", {"failure_score": None}, ["failure_score", "failed example"]),
    ("not a number (`failure_score=None`)", {"perfect_score": "1"}, ["perfect_score", "maximum"]),
    ("NaN or infinite", {"failure_score": math.nan}, ["failure_score"]),
    ("NaN or infinite", {"perfect_score": -math.inf}, ["perfect_score"]),
    ("`perfect_score=None` with", {"perfect_score": None}, ["perfect_score", "skip_perfect_score=False"]),
    ("`failure_score >= perfect_score`", {"failure_score": 1.0}, ["failure_score=1.0", "perfect_score=1.0"]),
    ("`seed` not an integer", {"seed": "1"}, ["'1'"]),
    ("`price_table` not", {"price_table": {"m": (1.0,)}}, ["e.g."]),
    ("`price_table` not", {"price_table": {"m": (-1.0, 1.0)}}, ["per 1M"]),
    ("`plot_format` not", {"plot_format": "jpeg"}, ["'svg'", "'png'", "None"]),
    ("`reduction_factor` not", {"reduction_factor": 1}, ["reduction_factor"]),
    ("`reduction_factor` not", {"minibatch_sampling": "random"}, ["failure_first", "epoch"]),
    ("`gepa_kwargs` not a dict", {"gepa_kwargs": []}, ["gepa_kwargs"]),
    ("`gepa_kwargs` not a dict", {"instruction_proposer": 5}, ["instruction_proposer"]),
    ("`gepa_kwargs['stop_callbacks']` entry", {"gepa_kwargs": {"stop_callbacks": [lambda: True]}},
     ["gepa_kwargs['stop_callbacks'][0]", "callback(state)", "<lambda>()"]),
    ("non-positive `cost_budget_usd`", {"cost_budget_usd": 0}, ["cost_budget_usd"]),
    ("non-positive `cost_budget_usd`", {"time_budget_seconds": -1}, ["time_budget_seconds"]),
    ("`rung_fractions` empty", {"rung_fractions": []}, ["empty"]),
    ("`rung_fractions` empty", {"rung_fractions": [0.5, 0.25, 1.0]}, ["increasing"]),
    ("`rung_fractions` empty", {"rung_fractions": [0.0, 1.0]}, ["(0, 1]"]),
    ("`rung_fractions` empty", {"rung_fractions": [0.25, 0.5]}, ["end at 1.0"]),
    ("neither `reflection_lm` nor", {"reflection_lm": None}, ["reflection_lm", "instruction_proposer"]),
    ("`reflection_lm` not a `dspy.LM`", {"reflection_lm": "openai/gpt-4o"}, ["str"]),
    ("`track_best_outputs=True` without", {"track_best_outputs": True}, ["track_stats", "track_best_outputs"]),
    ("unknown `candidate_selection_strategy`", {"candidate_selection_strategy": "best"}, ["pareto", "current_best"]),
    ("unknown `candidate_selection_strategy`", {"component_selector": "random"}, ["round_robin", "all"]),
    ("`gepa_kwargs` key that dspy.GEPA sets itself", {"gepa_kwargs": {"seed": 1}}, ["Use seed instead"]),
    ("`gepa_kwargs` key that dspy.GEPA sets itself", {"gepa_kwargs": {"run_dir": "x"}}, ["Use log_dir instead"]),
    ("`gepa_kwargs` key that dspy.GEPA sets itself", {"gepa_kwargs": {"trainsett": 1}}, ["'trainsett'", "spelling"]),
    ("`gepa_kwargs` keys with no equivalent", {"gepa_kwargs": {"max_reflection_cost": 1.0}}, ["cost_budget_usd"]),
    ("`gepa_kwargs` keys with no equivalent", {"gepa_kwargs": {"reflection_prompt_template": "x"}},
     ["instruction_proposer"]),
    ("`gepa_kwargs` keys with no equivalent", {"gepa_kwargs": {"custom_candidate_proposer": print}},
     ["instruction_proposer"]),
    ("`use_wandb=True`", {"use_wandb": True}, ["use_wandb"]),
    ("`gepa_kwargs` values gepa refuses", {"gepa_kwargs": {"task_lm": "openai/x"}}, ["task_lm", "Remove it"]),
    ("`gepa_kwargs` values gepa refuses", {"gepa_kwargs": {"frontier_type": "bogus"}}, ["frontier_type", "'instance'"]),
    ("`gepa_kwargs` values gepa refuses", {"gepa_kwargs": {"batch_sampler": object()}},
     ["batch_sampler", "reflection_minibatch_size=None"]),
]


@pytest.mark.parametrize(("row", "kwargs", "message"), CONSTRUCTOR_CASES,
                         ids=[f"{i}-{'-'.join(map(str, c[1]))}" for i, c in enumerate(CONSTRUCTOR_CASES)])
def test_errors_md_constructor_rows(row, kwargs, message):
    raised_by, names = documented(row)
    assert raised_by == CTOR
    args = {"metric": _ok_metric, "max_metric_calls": 50, "reflection_lm": make_reflection_lm(), **kwargs}
    with pytest.raises(Exception) as info:
        TurboGEPA(**args)
    assert type(info.value).__name__ in names, (type(info.value).__name__, names, str(info.value))
    for part in message:
        assert part in str(info.value), (part, str(info.value))


def test_errors_md_during_the_run_callable_protocol_rows():
    """"a callable component_selector or instruction_proposer whose parameters cannot take gepa's call:
    TypeError from the constructor naming the argument, the call and its signature"."""
    base = {"max_metric_calls": 50, "reflection_lm": make_reflection_lm()}
    with pytest.raises(TypeError) as info:
        TurboGEPA(_ok_metric, component_selector=lambda state, trajectories: [], **base)
    for part in ("component_selector", "selector(state, trajectories, subsample_scores, candidate_idx, candidate)",
                 "(state, trajectories)"):
        assert part in str(info.value)
    with pytest.raises(TypeError) as info:
        TurboGEPA(_ok_metric, instruction_proposer=lambda candidate: {}, **base)
    for part in ("instruction_proposer", "candidate=..., reflective_dataset=..., components_to_update=...",
                 "(candidate)"):
        assert part in str(info.value)


def test_configuration_error_is_a_value_error_and_an_assertion_error():
    assert issubclass(ConfigurationError, ValueError) and issubclass(ConfigurationError, AssertionError)
    with pytest.raises(AssertionError):  # code written for dspy.GEPA's asserts keeps catching it
        TurboGEPA(_ok_metric, reflection_lm=make_reflection_lm())


class _NoPredictors(dspy.Module):
    def forward(self, ticket):
        return dspy.Prediction(queue="general")


class _WithFlex(dspy.Module):
    def __init__(self):
        super().__init__()
        self.route = ROUTING.make_program()
        self.post = dspy.Flex("queue -> label")

    def forward(self, ticket):
        return self.route(ticket=ticket)


def _relabel(examples, *inputs):
    return [dspy.Example(**ex.toDict()).with_inputs(*inputs) for ex in examples]


def _compile_cases(tmp: Path):
    data = splits(6, 4)
    not_a_db = tmp / "not_a_db"
    not_a_db.mkdir()
    (not_a_db / "run.sqlite3").write_text("this is not a database " * 50)
    foreign = tmp / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / "run.sqlite3") as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    prog = ROUTING.make_program
    return [
        # (row key, student, compile kwargs, constructor kwargs, message parts)
        ("no example's inputs can be passed", prog(), {"trainset": _relabel(data.train, "ticket", "queue")}, {},
         ["trainset[0]", "['queue', 'ticket']", "forward(ticket"]),
        ("no example's inputs can be passed", prog(), {"trainset": _relabel(data.train, "tikcet")}, {},
         ["trainset[0]", "['tikcet']", "forward(ticket"]),
        ("`dspy.Flex` submodules", _WithFlex(), {}, {}, ["post"]),
        ("empty or missing trainset", prog(), {"trainset": []}, {}, ["rainset"]),
        ("empty or missing trainset", prog(), {"trainset": None}, {}, ["rainset"]),
        ("`valset=[]`", prog(), {"valset": []}, {}, ["valset", "valset=None"]),
        ("not a `dspy.Example`", prog(), {"trainset": [ex.toDict() for ex in data.train]}, {},
         ["trainset[0]", ".with_inputs("]),
        ("not a `dspy.Example`", prog(), {"valset": [dspy.Example(**ex.toDict()) for ex in data.val]}, {},
         ["valset[0]", ".with_inputs("]),
        ("`teacher` given", prog(), {"teacher": prog()}, {}, ["eacher"]),
        ("a student with no predictors", _NoPredictors(), {}, {}, ["student"]),
        ("budget smaller than one seed evaluation", prog(), {}, {"max_metric_calls": 3}, ["(3 metric calls)",
                                                                                        "(4 examples)"]),
        ("`log_dir` not creatable", prog(), {}, {"log_dir": str(a_file)}, [str(a_file)]),
        ("the store is damaged or not ours", prog(), {}, {"log_dir": str(not_a_db)},
         [str(not_a_db), "file is not a database", "run.sqlite3*"]),
        ("`log_dir` holding a run with other data", prog(), {}, {"log_dir": str(foreign)}, ["not a run store"]),
    ]


def test_errors_md_compile_rows_raise_before_any_lm_call(tmp_path):
    data = splits(6, 4)
    for row, student, compile_kw, ctor_kw, message in _compile_cases(tmp_path):
        raised_by, names = documented(row)
        assert raised_by == "`compile`", row
        calls: list[Any] = []
        reflection = make_reflection_lm(before_call=calls.append)
        opt = TurboGEPA(_ok_metric, reflection_lm=reflection, verbose=False,
                        **{"max_metric_calls": 50, **ctor_kw})
        kwargs = {"trainset": data.train, "valset": data.val, **compile_kw}
        with pytest.raises(Exception) as info, dspy.context(lm=make_student_lm(before_call=calls.append)):
            opt.compile(student, **kwargs)
        assert type(info.value).__name__ in names, (row, type(info.value).__name__, names, str(info.value))
        for part in message:
            assert part in str(info.value), (row, part, str(info.value))
        assert calls == [], row


def test_errors_md_log_dir_in_use_names_the_running_pid(tmp_path):
    raised_by, names = documented("`log_dir` not creatable")
    assert "RunStoreError" in names and issubclass(RunStoreError, OSError)
    with RunStore.open(tmp_path, {"other": "run"}), pytest.raises(RunStoreError, match=f"pid {os.getpid()}"):
        run(log_dir=str(tmp_path), data=splits(6, 4), budget=30)


def test_errors_md_other_run_in_log_dir_is_refused_naming_what_changed(tmp_path):
    _, names = documented("`log_dir` holding a run with other data")
    assert "RunStoreMismatchError" in names and issubclass(RunStoreMismatchError, ValueError)
    data = splits(6, 4)
    run(log_dir=str(tmp_path), data=data, budget=30)
    with pytest.raises(RunStoreMismatchError) as info:
        run(log_dir=str(tmp_path), data=splits(6, 3), budget=30)
    assert info.value.changed == ("valset",) and "new log_dir" in str(info.value)


# ---- errors.md, "During the run"
def _partly(kind: str):
    """A metric misbehaving (``kind``) on every other example, fine on the rest."""
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        odd = int(hashlib.sha256(gold.ticket.encode()).hexdigest(), 16) % 2
        if odd:
            if kind == "raise":
                raise ValueError("bad gold label")
            if kind == "cancelled":
                raise asyncio.CancelledError()
            if kind == "objective":
                return dspy.Prediction(score=1.0, feedback="ok", objective_scores={"acc": "high"})
            return {"none": None, "nan": math.nan, "inf": math.inf, "string": "0.5"}[kind]
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)
    return metric


@pytest.mark.parametrize(("kind", "counted"), [("raise", "metric_error"), ("cancelled", "metric_error"),
                                               ("none", "metric_invalid"), ("nan", "metric_invalid"),
                                               ("inf", "metric_invalid"), ("string", "metric_invalid"),
                                               ("objective", "metric_invalid")])
def test_errors_md_metric_failures_are_scored_and_counted(kind, counted):
    failures = run(_partly(kind), budget=40).detailed_results.run_stats["failures"]
    assert set(failures) == {counted}, failures


def test_errors_md_feedback_call_failure_leaves_the_example_out(caplog):
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None and "tracking" in gold.ticket.lower():
            raise RuntimeError("judge down")
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        stats = run(metric, budget=150, data=splits(24, 8), num_threads=8).detailed_results.run_stats
    assert stats["reflective_records_skipped"]["feedback_error"] > 0
    assert sum("judge down" in w for w in warnings_of(caplog)) == 1  # one warning for the first


class NotFoundError(Exception):
    """A retrieval step's own NotFoundError: not the LM stack's."""


class _RetrievalFails(FailsOnTracking):
    def forward(self, ticket):
        if "tracking" in ticket.lower():
            raise NotFoundError("no such document in the index")
        return self.inner(ticket=ticket)


def test_errors_md_a_program_raising_an_lm_error_name_of_its_own_is_an_ordinary_failure():
    dr = run(program=_RetrievalFails(), budget=60, data=splits(24, 8)).detailed_results
    assert dr.stop_reason == "max_metric_calls" and dr.run_stats["failures"]["program_error"] > 0


class _GarbledOnTracking(SimEngine):
    """The fake student, answering tickets about tracking with text no adapter can parse."""

    def _respond(self, request):
        if "tracking" in request_messages(request)[-1]["content"].lower():
            return Response(id="garbled", model=self.model_name, message=Message.assistant([TextPart("no idea")]),
                            finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1))
        return super()._respond(request)


class _NoMessage(Exception):
    def __str__(self):
        raise RuntimeError("the SDK could not format its message")


class _RaisesWithoutMessage(FailsOnTracking):
    def forward(self, ticket):
        routed = self.inner(ticket=ticket)
        if "tracking" in ticket.lower():
            raise _NoMessage()
        return routed


def test_errors_md_unparsable_answers_and_unprintable_errors_are_ordinary_failures_shown_to_reflection():
    """"the LM answer does not parse: scored failure_score, counted as format_error, feedback to reflection";
    run_store.md: an exception whose str() raises is described as `<str() of this X raised Y>`, an ordinary
    failure."""
    feedback: list[str] = []

    def proposer(candidate, reflective_dataset, components_to_update):
        feedback.extend(str(r["Feedback"]) for c in components_to_update for r in reflective_dataset[c])
        return {c: candidate[c] + f" Variant {len(feedback)}." for c in components_to_update}

    engine = _GarbledOnTracking("student")
    garbled = dspy.LM("sim/sim-student", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)
    stats = run(lm=garbled, instruction_proposer=proposer, budget=80, data=splits(24, 8)).detailed_results.run_stats
    assert set(stats["failures"]) == {"format_error"}
    assert any("failed to parse" in f and "no idea" in f for f in feedback)
    feedback.clear()
    stats = run(program=_RaisesWithoutMessage(), instruction_proposer=proposer, budget=80,
                data=splits(24, 8)).detailed_results.run_stats
    assert set(stats["failures"]) == {"program_error"}
    assert any("<str() of this _NoMessage raised RuntimeError>" in f for f in feedback), feedback


def test_errors_md_systemic_failures_of_the_lm_stack_stop_at_once():
    """Bad key, unknown model (the program's LM), a bad key of the reflection LM (telling to check
    reflection_lm), a refused connection: SystemicFailureError naming the error."""
    config = dataclasses.replace(SimConfig.preset("test"), api_key="the-right-key-123")
    data = splits(6, 4)

    def lm(server, model, key):
        return dspy.LM(f"openai/{model}", api_base=server.base_url, api_key=key, cache=False, num_retries=0)

    with SimServer(config) as server:
        with pytest.raises(SystemicFailureError, match="Incorrect API key") as info:
            run(lm=lm(server, "sim-student", "wrong-key"), data=data)
        assert info.value.error_type == "LMAuthError"
        with pytest.raises(SystemicFailureError, match="no-such-model"):
            run(lm=lm(server, "no-such-model", "the-right-key-123"), data=data)
        with pytest.raises(SystemicFailureError, match="Check reflection_lm") as info:
            run(reflection_lm=lm(server, "sim-reflector", "wrong-key"), data=data)
        assert info.value.failure == "proposer_error"
    closed = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(SystemicFailureError, match="ConnectionRefusedError"):
        run(lm=dspy.LM("openai/sim-student", api_base=closed, api_key="k", cache=False), data=data)


def test_errors_md_proposer_and_selector_rows(caplog):
    data = splits(24, 8)
    # the first 8 reflections all fail: the most common cause is named
    with pytest.raises(SystemicFailureError, match="empty_proposal") as info:
        run(instruction_proposer=lambda candidate, reflective_dataset, components_to_update: {}, data=data,
            budget=150)
    assert info.value.failure == "empty_proposal"

    def raising(state, trajectories, subsample_scores, candidate_idx, candidate):
        raise RuntimeError("selector bug")

    with pytest.raises(SystemicFailureError, match="component_selector") as info:
        run(component_selector=raising, data=data, budget=150)
    assert info.value.failure == "selector_error"
    with pytest.raises(SystemicFailureError, match="component_selector") as info:
        run(component_selector=lambda state, trajectories, subsample_scores, candidate_idx, candidate: [],
            data=data, budget=150)
    assert info.value.failure == "no_components"

    # after a usable proposal, the same failures are skips counted by cause
    selections, proposals = iter(range(10**6)), iter(range(10**6))

    def flaky(state, trajectories, subsample_scores, candidate_idx, candidate):
        n = next(selections)
        if n in (1, 3):
            raise RuntimeError("selector bug")
        return [] if n in (2, 4) else list(candidate)

    def proposer(candidate, reflective_dataset, components_to_update):
        n = next(proposals)
        return {**{c: candidate[c] + f" Variant {n}." for c in components_to_update}, "no_such_component": "x"}

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        stats = run(component_selector=flaky, instruction_proposer=proposer, data=data, budget=120,
                    num_threads=8).detailed_results.run_stats
    assert stats["proposal_skips"]["selector_error"] >= 1 and stats["proposal_skips"]["no_components"] >= 1
    assert any("no_such_component" in w for w in warnings_of(caplog))  # unusable part ignored, with a warning
    assert stats["mutations"]  # the usable parts were evaluated


def test_errors_md_stop_callbacks_and_stop_file(tmp_path, caplog):
    from gepa.utils.stop_condition import MaxTrackedCandidatesStopper

    data = splits(24, 8)

    def broken(state):
        raise RuntimeError("stop boom")

    with pytest.raises(SystemicFailureError, match=re.escape("gepa_kwargs['stop_callbacks'][0]")):
        run(gepa_kwargs={"stop_callbacks": [broken]}, data=data)

    asked = iter(range(10**6))

    def later_broken(state):
        if next(asked) >= 2:
            raise RuntimeError("stop boom later")
        return False

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        dr = run(gepa_kwargs={"stop_callbacks": [later_broken]}, data=data, budget=400).detailed_results
    assert dr.stop_reason == "stop_callback"
    assert any("stop_callbacks'][0]" in w for w in warnings_of(caplog))

    dr = run(gepa_kwargs={"stop_callbacks": [MaxTrackedCandidatesStopper(3)]}, data=data, budget=2000,
             num_threads=8).detailed_results
    assert len(dr.candidates) == 3 and dr.stop_reason == "stop_callback"

    (tmp_path / "gepa.stop").touch()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        dr = run(log_dir=str(tmp_path), data=data).detailed_results
    assert len(dr.candidates) == 1 and dr.stop_reason == "stop_file"
    assert any("gepa.stop already exists" in w for w in warnings_of(caplog))


def test_errors_md_small_data_sets_the_systemic_window():
    """"4 training examples with valset=None make N = 4, a valset of 3 makes N = 3 there"."""
    with pytest.raises(SystemicFailureError, match="the first 3 evaluations on the valset all failed"):
        run(_partly_always_raising, data=splits(6, 3))
    with pytest.raises(SystemicFailureError, match="the first 4 evaluations all failed"), \
            dspy.context(lm=make_student_lm()):
        TurboGEPA(_partly_always_raising, max_metric_calls=40, reflection_lm=make_reflection_lm(),
                  verbose=False).compile(ROUTING.make_program(), trainset=splits(4, 1).train, valset=None)


def test_errors_md_only_some_examples_unbindable_is_a_warning(caplog):
    """"(only some examples: a warning; they fail and are scored, and the systemic-failure check leaves them
    out)"."""
    data = splits(24, 8)
    half = [_relabel([ex], "ticket", "queue")[0] if i % 2 else ex for i, ex in enumerate(data.train)]
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        dr = run(data=type(data)(train=half, val=data.val, test=[])).detailed_results
    assert any("12 of 24 examples will fail" in w for w in warnings_of(caplog))
    assert dr.run_stats["failures"]["program_error"] > 0 and dr.stop_reason == "max_metric_calls"


def test_errors_md_a_fixed_stop_callback_resumes_the_same_log_dir(tmp_path):
    """"with a log_dir, fix it and rerun with the same one: callbacks are not in the run key"."""
    def broken(state):
        raise RuntimeError("stop boom")

    with pytest.raises(SystemicFailureError, match="rerun with the same log_dir"):
        run(log_dir=str(tmp_path), gepa_kwargs={"stop_callbacks": [broken]})
    dr = run(log_dir=str(tmp_path), gepa_kwargs={"stop_callbacks": [lambda state: False]}).detailed_results
    assert dr.run_stats["metric_calls_replayed"] > 0


def _partly_always_raising(gold, pred, trace=None, pred_name=None, pred_trace=None):
    raise ValueError("always")


def test_errors_md_every_count_is_in_run_stats():
    stats = run(budget=40).detailed_results.run_stats
    for key in ("failures", "proposal_skips", "reflective_records_skipped", "mutations", "rate_limits"):
        assert key in stats, key


def test_errors_md_rate_limit_progress_line_quote():
    """errors.md quotes the progress line: `paused 42s by a rate limit (Retry-After)` and `a reflection waits
    1m08s on the reflection LM's rate limit`. Checked on the INFO progress line (no terminal)."""
    from dspy_turbogepa.tracking.progress import ProgressSnapshot

    snap = ProgressSnapshot(elapsed=10, metric_calls=5, budget=100, best=0.5, frontier_size=1, candidates=1,
                            evals_in_flight=0, mutations_running=1, rung_funnel=(), backoffs=0, eta_seconds=30,
                            paused_seconds=42, reflection_paused_seconds=68)
    text = doc("docs/errors.md")
    for quote in ("paused 42s by a rate limit (Retry-After)", "a reflection waits 1m08s on the reflection LM's rate "
                  "limit"):
        assert f"`{quote}`" in text
        assert quote in snap.log_line()


def test_errors_md_rate_limit_quote_also_on_the_progress_bar():
    from dspy_turbogepa.tracking.progress import ProgressSnapshot

    snap = ProgressSnapshot(elapsed=10, metric_calls=5, budget=100, best=0.5, frontier_size=1, candidates=1,
                            evals_in_flight=0, mutations_running=1, rung_funnel=(), backoffs=0, eta_seconds=30,
                            paused_seconds=42, reflection_paused_seconds=68)
    bar = ", ".join(snap.fields())
    text = doc("docs/errors.md")
    for quote in ("paused 42s (429)", "reflect paused 1m08s (429)"):
        assert f"the progress bar says `{quote}`" in text and quote in bar


# ========================================================================================= docs/run_store.md
def test_run_store_snippet_runs_as_written(tmp_path):
    """The block, extracted; its comments say what a fresh run loads ([] and {})."""
    code = fenced("docs/run_store.md", "python")[0]
    expected = {name: ast.literal_eval(value) for name, value in
                re.findall(r"^\s*(\w+) = store\.\w+\(\)\s+# (\S+) on a fresh run", code, re.M)}
    assert set(expected) == {"cached_evals", "cached_proposals"}
    ns: dict[str, Any] = {"train_rows": [{"q": "2+2?", "a": "4"}], "val_rows": [{"q": "3+3?", "a": "6"}],
                          "seed_texts": {"predict": "Answer."}, "seed": 0, "config_dict": {"minibatch": 3},
                          "log_dir": str(tmp_path)}
    exec(compile(code, "docs/run_store.md", "exec"), ns)
    for name, value in expected.items():
        assert ns[name] == value, name
    assert ns["store"].closed and not ns["store"].resumed
    assert ns["store"].meta == {"model": "openai/gpt-4.1-mini"}


def _schema_doc() -> tuple[int, dict[str, list[str]]]:
    text = doc("docs/run_store.md")
    version = int(re.search(r"## Schema \(`schema_version` (\d+)\)", text).group(1))
    section = text.split("## Schema", 1)[1].split("## How resume uses it", 1)[0]
    tables: dict[str, list[str]] = {}
    for match in re.finditer(r"^### `(\w+)`.*\n((?:\|.*\n)+)", section, re.M):
        rows = match.group(2).splitlines()[2:]
        tables[match.group(1)] = [col for row in rows for col in re.findall(r"`(\w+)`", row.split("|")[1])]
    return version, tables


def test_run_store_files_schema_and_sessions(tmp_path):
    version, tables = _schema_doc()
    assert version == SCHEMA_VERSION
    key = {"trainset": stable_hash([1]), "seed": "0"}
    store = RunStore.open(tmp_path, key, meta={"model": "m"})
    assert {"run.sqlite3", "run.sqlite3-wal", "run.sqlite3-shm", "run.lock"} <= set(os.listdir(tmp_path))
    assert (tmp_path / "run.lock").read_text() == str(os.getpid())
    store.record_evaluation("fp", "val", 0, math.nan, None, None, None, None, None, None, None, None)
    assert math.isnan(store.load_evaluations()[0].score)  # NULL stands for NaN, loaded back as nan
    store.close()
    store.close()  # idempotent
    with pytest.raises(RunStoreError):
        store.record_event("too_late")
    assert set(os.listdir(tmp_path)) == {"run.sqlite3", "run.lock"}  # the WAL checkpointed, -wal/-shm removed
    with sqlite3.connect(tmp_path / "run.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == version
        assert {r[0] for r in conn.execute("SELECT key FROM meta")} == {"schema_version", "created_at", "run_meta"}
        for table, columns in tables.items():
            actual = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            assert actual, table
            assert set(columns) <= actual, (table, set(columns) - actual)
    assert set(tables) == {"meta", "run_key", "sessions", "candidates", "evaluations", "proposals", "events"}
    again = RunStore.open(tmp_path, dict(reversed(list(key.items()))))  # same mapping, any order
    assert again.resumed
    sessions = again.sessions()
    assert [s.id for s in sessions] == [1, 2] and sessions[0].closed_at is not None and sessions[1].closed_at is None
    assert sessions[1].resumed and sessions[0].pid == os.getpid()
    assert again.counts()["evaluations"] == 1
    with pytest.raises(RunStoreError, match=f"pid {os.getpid()}"):  # a second open while this one is open
        RunStore.open(tmp_path, key)
    again.close()


def test_run_store_refused_open_writes_nothing(tmp_path):
    key = {"trainset": "a", "seed": "0"}
    with RunStore.open(tmp_path, key) as store:
        store.record_event("run_started", {})
    before = (tmp_path / "run.sqlite3").read_bytes()
    with pytest.raises(RunStoreMismatchError) as info:
        RunStore.open(tmp_path, {"trainset": "b", "extra": "x"})
    assert info.value.changed == ("extra", "seed", "trainset")
    assert "new log_dir" in str(info.value) and "run.sqlite3*" in str(info.value)
    assert (tmp_path / "run.sqlite3").read_bytes() == before


def test_run_store_failed_row_is_raised_by_the_next_flush(tmp_path):
    with RunStore.open(tmp_path, {"k": "v"}) as store:
        store.record_event("a")
        store.record_evaluation("fp", "val", 2**70, 1.0, None, None, None, None, None, None, None, None)
        store.record_event("b")
        with pytest.raises(RunStoreError):
            store.flush()
        assert store.write_stats["failed"] == 1
        assert [e.kind for e in store.events()] == ["a", "b"]  # the rest of the batch was written
        store.flush()  # raised once


def test_run_store_secrets(monkeypatch, tmp_path):
    payload = {"api_key": "x", "apiKey": "x", "x-api-key": "x", "X-Auth-Key": "x", "Helicone-Auth": "x",
               "Authorization": "x", "password": "x", "secret": "x", "token": "x", "hf_token": "x",
               "client_secret": "x", "max_tokens": 5, "flag": True, "nested": {"password": None}}
    red = redact(payload)
    assert all(red[k] == "***REDACTED***" for k in list(payload)[:11])
    assert red["max_tokens"] == 5 and red["flag"] is True and red["nested"] == {"password": None}
    monkeypatch.setenv("MY_SERVICE_TOKEN", "abcdefgh12345")
    monkeypatch.setenv("SHORT_KEY", "abc1")
    assert "abcdefgh12345" not in mask_text("the value abcdefgh12345 leaked")
    assert mask_text("short abc1 here") == "short abc1 here"  # under 8 characters
    for shaped in ("sk-abcdefghijklmnop1234", "AIzaSyA1234567890abcdefghijklmnopqrstu",
                   "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "hf_abcdefghijklmnopqrstuvwxyz12345",
                   "AKIAIOSFODNN7EXAMPLE", "xoxb-1234567890-abcdefghij", "https://user:password123@host/v1"):
        assert "***REDACTED***" in mask_text(f"see {shaped} here"), shaped
    assert mask_text("sk-learn-compatible estimators") == "sk-learn-compatible estimators"
    with RunStore.open(tmp_path, {"k": "v"}) as store:
        assert store.record_proposal("p", {"route": "use sk-abcdefghijklmnop1234"}, None, None, 1) is False
        assert store.load_proposals() == {}


def test_run_store_imports_nothing_from_dspy():
    code = "import sys, dspy_turbogepa.store; assert 'dspy' not in sys.modules, 'dspy imported'"
    proc = run_script(["-c", code], ROOT)
    assert proc.returncode == 0, proc.stderr


def test_run_store_resume_key_and_reports(tmp_path):
    """A rerun replays without paying; summary.json and the plots are written; the run key holds the
    documented parts (key format "8"); settings that only steer the search, seed=None vs 0 and another
    budget resume; a changed program, data, metric or task LM is refused naming it; a changed reflection
    LM continues the run: what was stored replays, and new reflections ask it."""
    from dspy_turbogepa.engine import fingerprint_texts

    log_dir = str(tmp_path)
    data = splits(16, 8)
    # a callable object as the metric: its class's code is keyed, its state (the counters) is not
    first = run(CountingMetric(ROUTING.metric), log_dir=log_dir, data=data, budget=80).detailed_results
    assert {"summary.json", "best_over_time.svg", "lineage.svg", "run.sqlite3", "run.lock"} <= set(os.listdir(log_dir))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == first.stop_reason
    for key in ("val_subscores", "parents", "candidate_kinds", "per_val_instance_best_candidates", "run_stats"):
        assert len(summary["result"][key]) or key == "run_stats", key
    assert len(summary["result"]["val_subscores"]) == len(first.candidates)

    store = RunStore.open(log_dir, _stored_key(tmp_path))
    try:
        assert set(store.run_key) == {"trainset", "valset", "seed", "student", "metric", "failure_score", "task_lm",
                                      "reflection", "key_format"}
        assert store.run_key["key_format"] == re.search(r'format "(\d+)" since', doc("docs/run_store.md")).group(1)
        for cand in store.load_candidates():
            assert cand.fingerprint == fingerprint_texts(cand.texts)
            assert cand.kind in ("seed", "reflection", "reflection_all", "merge")
        kinds = {e.kind for e in store.events()}
        assert {"run_started", "run_finished", "candidate_accepted", "mutation_committed"} <= kinds
    finally:
        store.close()

    metric = CountingMetric(ROUTING.metric)
    again = run(metric, log_dir=log_dir, data=data, budget=80, seed=None).detailed_results
    assert metric.scoring == 0 and again.total_metric_calls == first.total_metric_calls
    assert again.run_stats["metric_calls_executed"] == 0
    run(CountingMetric(ROUTING.metric), log_dir=log_dir, data=data, budget=100, reflection_minibatch_size=2,
        candidate_selection_strategy="current_best")  # accepted: not in the key

    def refused(**kw) -> RunStoreMismatchError:
        with pytest.raises(RunStoreMismatchError) as info:
            run(log_dir=log_dir, **{"metric": CountingMetric(ROUTING.metric), "data": data, "budget": 80, **kw})
        return info.value

    assert refused(program=ROUTING.make_program({"route": "Route it."})).changed == ("student",)
    assert refused(data=splits(16, 7)).changed == ("valset",)
    assert refused(metric=_ok_metric).changed == ("metric",)
    assert refused(lm=make_student_lm(temperature=0.5)).changed == ("task_lm",)

    reflector = make_reflection_lm(temperature=0.9)
    metric = CountingMetric(ROUTING.metric)
    swapped = run(metric, log_dir=log_dir, data=data, budget=80, reflection_lm=reflector).detailed_results
    assert swapped.run_stats["metric_calls_executed"] == 0 and metric.scoring == 0  # the stored run replays
    assert not reflector.history
    longer = run(metric, log_dir=log_dir, data=data, budget=200, reflection_lm=reflector).detailed_results
    assert longer.run_stats["metric_calls_replayed"] > 0 and reflector.history  # and continues with it


def _stored_key(log_dir: Path) -> dict[str, str]:
    with sqlite3.connect(log_dir / "run.sqlite3") as conn:
        return dict(conn.execute("SELECT component, value FROM run_key"))


def test_run_store_readable_task_lm_change_in_the_documented_form(tmp_path):
    """run_store.md: `task_lm (stored model=openai/gpt-4o-mini, temperature=0.0; adapter: none configured
    (DSPy's ChatAdapter) -> now model=openai/gpt-4o-mini, temperature=0.7; adapter: none configured (DSPy's
    ChatAdapter))`."""
    data = splits(6, 4)
    run(log_dir=str(tmp_path), data=data, budget=30, lm=make_student_lm(temperature=0.0))
    with pytest.raises(RunStoreMismatchError) as info:
        run(log_dir=str(tmp_path), data=data, budget=30, lm=make_student_lm(temperature=0.7))
    # (the simulated LM's custom engine follows as one token; a plain dspy.LM has none)
    none, said = re.escape("; adapter: none configured (DSPy's ChatAdapter)"), str(info.value)
    assert re.search(r"task_lm \(stored model=sim/sim-student, temperature=0\.0, engine=SimEngine#\w+, "
                     rf"async_engine=AsyncSimEngine#\w+{none} -> now model=sim/sim-student, temperature=0\.7, "
                     rf"engine=SimEngine#\w+, async_engine=AsyncSimEngine#\w+{none}\)", said), said


def test_run_store_simserver_port_and_rotated_key(tmp_path):
    """"a local server ... restarted on another port is another endpoint, and the rerun is refused with the old
    and new URL. Give such a server a fixed port (SimServer(..., port=8765))"; "a rotated key resumes"."""
    data = splits(6, 4)
    port = free_port()

    def compile_on(server, key="sim-key-1"):
        lm = dspy.LM("openai/sim-student", api_base=server.base_url, api_key=key, cache=False)
        return run(lm=lm, log_dir=str(tmp_path), data=data, budget=30).detailed_results

    with SimServer("test", port=port) as server:
        assert server.base_url == f"http://127.0.0.1:{port}/v1"
        assert compile_on(server).run_stats["metric_calls_executed"] > 0
    with SimServer("test") as other, pytest.raises(RunStoreMismatchError) as info:
        compile_on(other)
    assert f"127.0.0.1:{port}/v1" in str(info.value) and other.base_url in str(info.value)
    with SimServer("test", port=port) as server:  # restarted on its fixed port, with another key
        assert compile_on(server, key="sim-key-2").run_stats["metric_calls_executed"] == 0


def test_run_store_dspy_gepa_checkpoint_is_not_resumed(tmp_path, caplog):
    (tmp_path / "gepa_state.bin").write_bytes(b"pickle")
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        run(log_dir=str(tmp_path), data=splits(6, 4), budget=30)
    assert any("gepa_state.bin" in w and "starts this run from the student" in w for w in warnings_of(caplog))


# =========================================================================================== docs/mlflow.md
MLFLOW_SCRIPT = textwrap.dedent('''
    import json, os, re, socket, sys
    root, out = sys.argv[1], sys.argv[2]
    import dspy
    from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=12, n_val=8, n_test=0)
    rules = [r.id for r in task.rules_for("route")]
    def near_perfect():
        return task.make_program({"route": task.instruction_with_rules("route", rules[:-1])})
    dspy.configure(lm=make_student_lm())
    snippet = re.search(r"```python\\n(.*?)```", open(os.path.join(root, "docs", "mlflow.md")).read(), re.S).group(1)
    ns = dict(metric=task.metric, lm=make_reflection_lm(), program=near_perfect(), train=splits.train,
              val=splits.val)
    exec(compile(snippet, "docs/mlflow.md", "exec"), ns)
    import mlflow
    from mlflow import MlflowClient
    client = MlflowClient()
    def info(r):
        return {"name": r.info.run_name, "status": r.info.status, "parent": r.data.tags.get("mlflow.parentRunId"),
                "id": r.info.run_id, "params": r.data.params, "metrics": sorted(r.data.metrics),
                "tags": {k: v for k, v in r.data.tags.items() if k.startswith("turbogepa")},
                "artifacts": [a.path for a in client.list_artifacts(r.info.run_id)]}
    report = {"mlflow_in_modules_before": None, "runs": [info(r) for r in client.search_runs(["0"])]}
    top = [r for r in report["runs"] if r["parent"] is None]
    report["top"] = top[0]["id"] if len(top) == 1 else None
    rid = report["top"]
    report["turbogepa_artifacts"] = [a.path for a in client.list_artifacts(rid, "turbogepa")]
    report["eval_full"] = [(m.step, m.value) for m in client.get_metric_history(rid, "eval_full")]
    report["candidate_val_score"] = sorted((m.step, m.value) for m in client.get_metric_history(rid,
                                           "candidate_val_score"))
    report["best_val_score_steps"] = [m.step for m in client.get_metric_history(rid, "best_val_score")]
    path = client.download_artifacts(rid, "turbogepa/optimized_program.json", out)
    fresh = task.make_program()
    fresh.load(path)
    get = lambda p: [x.signature.instructions for _, x in p.named_predictors()]
    report["loaded_equal"] = get(fresh) == get(ns["optimized"])
    report["resolved_budget"] = ns["opt"].max_metric_calls
    report["run_summary"] = json.load(open(client.download_artifacts(rid, "turbogepa/run_summary.json", out)))
    report["isinstance_gepa"] = isinstance(ns["opt"], dspy.GEPA)
    for table in ("candidates", "pareto_front"):
        data = json.load(open(client.download_artifacts(rid, f"turbogepa/{table}.json", out)))
        report[f"{table}_columns"] = data["columns"]
    mlflow.dspy.autolog(disable=True)
    from dspy_turbogepa import TurboGEPA
    def small(metric=task.metric, **kw):
        return TurboGEPA(metric, max_metric_calls=40, reflection_lm=ns["lm"], use_mlflow=True, verbose=False, **kw)
    known = {r["id"] for r in report["runs"]}
    small().compile(near_perfect(), trainset=splits.train, valset=splits.val)   # no active run: its own
    def boom(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise RuntimeError("boom")
    try:
        small(boom).compile(near_perfect(), trainset=splits.train, valset=splits.val)
    except Exception as exc:
        report["boom"] = type(exc).__name__
    with mlflow.start_run(run_name="mine") as mine:
        for _ in range(2):
            small().compile(near_perfect(), trainset=splits.train, valset=splits.val)
    report["mine"] = mine.info.run_id
    report["later"] = [info(r) for r in client.search_runs(["0"]) if r.info.run_id not in known]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    mlflow.set_tracking_uri(f"http://127.0.0.1:{closed}")
    import logging
    seen = []
    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.levelno, record.getMessage()))
    logging.getLogger("dspy_turbogepa").addHandler(Keep())
    program = small().compile(near_perfect(), trainset=splits.train, valset=splits.val)
    report["unreachable_warnings"] = [m for lvl, m in seen if lvl >= logging.WARNING and "MLflow" in m]
    json.dump(report, open(os.path.join(out, "report.json"), "w"))
''')


def test_mlflow_snippet_autolog_and_use_mlflow(tmp_path):
    """mlflow.md's block, extracted and run as written (a sqlite tracking store in tmp; the fake LMs), then
    what the page says is recorded; plus the tracker's own run, a failed compile, a second compile in one
    `with mlflow.start_run():` and an unreachable tracking server."""
    script = tmp_path / "scenario.py"
    script.write_text(MLFLOW_SCRIPT)
    env = {**SUB_ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, str(script), str(ROOT), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())
    runs = report["runs"]
    top = next(r for r in runs if r["id"] == report["top"])
    nested = sorted((r for r in runs if r["parent"] == top["id"]), key=lambda r: r["name"])
    # both write to the same run: autolog's artifacts and ours
    assert {"best_model.json", "trainset.json", "valset.json", "turbogepa"} <= set(top["artifacts"])
    assert "lm_params" in top["params"]
    assert set(report["turbogepa_artifacts"]) == {f"turbogepa/{f}" for f in (
        "optimized_program.json", "candidates.json", "pareto_front.json", "run_summary.json", "best_over_time.svg")}
    assert report["loaded_equal"]  # "Program().load(path) restores it"
    assert report["candidates_columns"] == ["id", "parents", "kind", "val_score", "num_val", "front_instances",
                                            "is_best", "discovery_seconds", "discovery_metric_calls", "mutation_seq",
                                            "fingerprint", "val_subscores", "instructions:route"]
    assert report["pareto_front_columns"] == ["val_id", "best_score", "num_candidates", "candidates"]
    # eval_full_<k> nested runs, k the candidate index; the eval_full history is val scores times 100
    scores = report["run_summary"]["val_aggregate_scores"]
    assert [r["name"] for r in nested] == [f"eval_full_{k}" for k in range(len(scores))]
    for r in nested:
        assert r["metrics"] == ["eval"] and {"model.json", "result_table.json"} <= set(r["artifacts"])
        assert any(p.endswith("instructions") for p in r["params"])
    assert report["eval_full"] == [[k, pytest.approx(100 * s)] for k, s in enumerate(scores)]
    assert report["candidate_val_score"] == [[k, pytest.approx(s)] for k, s in enumerate(scores)]
    steps = report["best_val_score_steps"]
    assert steps == sorted(steps) and steps[-1] <= report["run_summary"]["total_metric_calls"]
    # params
    params = top["params"]
    assert params["max_metric_calls"] == str(report["resolved_budget"])  # resolved for auto
    assert params["reflection_lm"] == "sim/sim-reflector"
    assert params["gepa_kwargs"] == "{}" and params["price_table"] == "{}"
    for name in ("trainset_size", "valset_size", "num_components", "seed_instructions/route",
                 "best_instructions/route", "reflection_minibatch_size", "seed", "use_merge"):
        assert name in params, name
    assert "num_threads" not in params and "wandb_api_key" not in params  # None values are never logged
    for metric in ("best_val_score", "pareto_front_size", "pareto_front_agg", "num_candidates",
                   "mutations_committed", "metric_calls", "metric_calls_replayed", "cache_hits",
                   "lm/task_prompt_tokens", "lm/task_completion_tokens", "lm/task_calls", "lm/reflection_calls",
                   "cost/total_usd", "rate_limit_retries", "evals_in_flight_peak", "mutations_in_flight_peak",
                   "candidate_val_score", "final/best_val_score", "final/seed_val_score", "final/best_candidate_idx",
                   "final/num_candidates", "final/total_metric_calls", "final/num_full_val_evals",
                   "final/wall_seconds", "eval_full"):
        assert metric in top["metrics"], metric
    assert top["tags"]["turbogepa.stop_reason"] and top["tags"]["turbogepa.version"] == dspy_turbogepa.__version__
    assert "turbogepa.tracker" not in top["tags"]  # autolog's run, not one the compile started
    assert report["isinstance_gepa"]
    # use_mlflow=True and no active run: a run named turbogepa, ended FINISHED; FAILED when compile raises
    later = report["later"]
    own = [r for r in later if r["name"] == "turbogepa" and r["parent"] is None]
    assert sorted(r["status"] for r in own) == ["FAILED", "FINISHED"], later
    assert all(r["tags"]["turbogepa.tracker"] == "MlflowRunTracker" for r in own)
    assert report["boom"] == "SystemicFailureError"
    assert next(r for r in own if r["status"] == "FAILED")["tags"]["turbogepa.stop_reason"].startswith("error: ")
    # a second compile inside one `with mlflow.start_run():` gets a nested run
    mine = next(r for r in later if r["id"] == report["mine"])
    assert "best_instructions/route" in mine["params"]
    assert [r["status"] for r in later if r["parent"] == report["mine"]] == ["FINISHED"]
    # an unreachable tracking server: one warning, the compile still returns
    assert len(report["unreachable_warnings"]) == 1, report["unreachable_warnings"]


def test_mlflow_is_not_imported_unless_used_and_missing_mlflow_only_warns():
    code = textwrap.dedent('''
        import logging, sys
        import dspy
        import dspy_turbogepa.tracking, dspy_turbogepa.tracking.autolog, dspy_turbogepa.tracking.pump
        import dspy_turbogepa.tracking.mlflow_tracking
        from dspy_turbogepa import TurboGEPA
        from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
        task = TASKS["routing"]
        sp = task.splits(data_seed=0, n_train=6, n_val=4, n_test=0)
        def go(**kw):
            with dspy.context(lm=make_student_lm()):
                return TurboGEPA(task.metric, max_metric_calls=20, reflection_lm=make_reflection_lm(),
                                 verbose=False, **kw).compile(task.make_program(), trainset=sp.train, valset=sp.val)
        go()
        assert "mlflow" not in sys.modules, "mlflow imported"
        sys.modules["mlflow"] = None  # as if not installed
        seen = []
        class Keep(logging.Handler):
            def emit(self, record):
                seen.append(record)
        logging.getLogger("dspy_turbogepa").addHandler(Keep())
        go(use_mlflow=True)
        warnings = [r.getMessage() for r in seen if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "not installed" in warnings[0], warnings
    ''')
    proc = run_script(["-c", code], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_mlflow_own_callbacks_get_the_evaluations_on_the_compile_thread(caplog):
    """"Your own DSPy callbacks get the same calls, on the compile thread"; instance is the optimizer, the
    program and devset are in inputs, metric_key eval_full, an EvaluationResult; predictions empty without
    track_best_outputs; a callback reading instance.devset fails with a warning, never ending the run."""
    from dspy.evaluate.evaluate import EvaluationResult
    from dspy.utils.callback import BaseCallback

    calls: list[tuple] = []

    class Mine(BaseCallback):
        def on_evaluate_start(self, call_id, instance, inputs):
            calls.append(("start", threading.get_ident(), instance, inputs))

        def on_evaluate_end(self, call_id, outputs, exception=None):
            calls.append(("end", threading.get_ident(), outputs, exception))

    class ReadsDevset(BaseCallback):
        def on_evaluate_start(self, call_id, instance, inputs):
            return instance.devset  # dspy.Evaluate has one; the optimizer does not

    opt = TurboGEPA(ROUTING.metric, max_metric_calls=80, reflection_lm=make_reflection_lm(), verbose=False,
                    track_stats=True)
    data = splits()
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"), \
            dspy.context(lm=make_student_lm(), callbacks=[Mine(), ReadsDevset()]):
        optimized = opt.compile(ROUTING.make_program(), trainset=data.train, valset=data.val)
    n = len(optimized.detailed_results.candidates)
    starts = [c for c in calls if c[0] == "start"]
    ends = [c for c in calls if c[0] == "end"]
    assert len(starts) == len(ends) == n
    assert {c[1] for c in calls} == {threading.get_ident()}
    assert all(c[2] is opt for c in starts)
    assert all(set(c[3]) >= {"program", "devset"} and c[3]["callback_metadata"] == {"metric_key": "eval_full"}
               for c in starts)
    assert all(isinstance(c[2], EvaluationResult) for c in ends)
    assert [c[2].score for c in ends] == pytest.approx([100 * s for s in optimized.detailed_results
                                                        .val_aggregate_scores])
    assert all(dict(row[1]) == {} for row in ends[0][2].results)  # predictions empty
    assert any("ReadsDevset.on_evaluate_start failed" in w for w in warnings_of(caplog))


def test_mlflow_keys_params_and_class_shape():
    from dspy_turbogepa.tracking import loggable_params, sanitize_key
    from dspy_turbogepa.tracking.mlflow_tracking import _KeyMap

    assert sanitize_key("subs[0].predict") == "subs.0.predict"
    assert sanitize_key("a:b") == "a_b" and sanitize_key("a b-c_d.e/f") == "a b-c_d.e/f"
    assert len(sanitize_key("x" * 400)) <= 250
    keys = _KeyMap()
    assert keys("", "a:b") != keys("", "a_b")  # two names never share a key
    logged = loggable_params({"none": None, "fn": print, "obj": object(), "wandb_api_key": "k", "hf_token": "t",
                              "api_key": "k", "n": 3, "lst": [1, 2], "lm": make_reflection_lm()})
    assert logged == {"n": "3", "lst": "[1, 2]", "lm": "sim/sim-reflector"}
    assert loggable_params({"note": "key sk-abcdefghijklmnop1234 here"}) == {"note": "key ***REDACTED*** here"}
    assert TurboGEPA.__bases__ == (dspy.GEPA, Teleprompter)
    opt = TurboGEPA(_ok_metric, max_metric_calls=10, reflection_lm=make_reflection_lm())
    params = opt.get_params()
    params.update(student=1, trainset=2)
    assert not hasattr(opt, "student") and not hasattr(opt, "trainset")  # get_params() returns a copy
    assert opt.get_params()["gepa_kwargs"] == {} and opt.get_params()["price_table"] == {}
    theirs = dspy.GEPA(_ok_metric, max_metric_calls=10, reflection_lm=make_reflection_lm())
    assert theirs.get_params() is theirs.__dict__  # "(it does on dspy.GEPA)"


def test_mlflow_md_code_paths_exist():
    text = doc("docs/mlflow.md")
    for name in ("autolog.py", "pump.py", "mlflow_tracking.py", "plots.py"):
        assert (PKG / "tracking" / name).is_file(), name
    assert "`dspy_turbogepa/tracking/`" in text
    from dspy_turbogepa.tracking import register_with_mlflow_autolog  # noqa: F401 - named in the page


# ========================================================================================= docs/extending.md
def test_extending_paths_and_names_exist():
    text = doc("docs/extending.md")
    for path in set(re.findall(r"`((?:engine|adapter|store|tracking|proposers)/\w+\.py)`", text)):
        assert (PKG / path).is_file(), path
    for path in ("teleprompter.py", "gepa_kwargs.py", "engine/frontier.py"):
        assert (PKG / path).is_file(), path
    assert (ROOT / "tests" / "test_layers.py").is_file()
    from dspy_turbogepa.adapter import trajectory_json
    from dspy_turbogepa.adapter.evaluator import DspyEvaluator
    from dspy_turbogepa.engine.evaluation import EvaluationCache  # noqa: F401
    from dspy_turbogepa.engine.records import CandidateRecord

    assert "codec" in inspect.signature(trajectory_json.trajectory_from_json).parameters
    assert callable(DspyEvaluator.rate_limit_stats) and callable(DspyEvaluator.close)
    assert "val_objective_scores" in {f.name for f in dataclasses.fields(CandidateRecord)}


def test_extending_evaluator_protocol_is_the_documented_call():
    """`async evaluate(texts, fingerprint, split, example_id, capture_traces) -> EvalOutcome`; EvalOutcome holds
    objective_scores, per-evaluation tokens and cost, and no duration."""
    from dspy_turbogepa.engine import EvalOutcome, Evaluator

    documented_call = re.search(r"`async evaluate\(([^)]*)\) -> EvalOutcome`", doc("docs/extending.md")).group(1)
    sig = inspect.signature(Evaluator.evaluate)
    assert inspect.iscoroutinefunction(Evaluator.evaluate)
    assert [p for p in sig.parameters if p != "self"] == [p.strip() for p in documented_call.split(",")]
    assert sig.return_annotation in (EvalOutcome, "EvalOutcome")
    fields = {f.name for f in dataclasses.fields(EvalOutcome)}
    assert {"objective_scores", "prompt_tokens", "completion_tokens", "cost"} <= fields
    assert not any("duration" in f or "latency" in f or "seconds" in f for f in fields)


def test_extending_a_custom_evaluation_backend_drives_the_engine_without_dspy():
    """The seam: an object with that one async call (and a reflector) runs the engine on plain data, with no
    DSPy imported; components are opaque strings, so a "<predictor>::lm" component holding JSON settings is
    selected, merged, fingerprinted like any other."""
    code = textwrap.dedent('''
        import asyncio, json, sys
        from dspy_turbogepa.engine import (Candidate, EngineConfig, EvalOutcome, Evaluator, Orchestrator,
                                           ProposalOutcome, Reflector, fingerprint_texts)
        KEYWORDS = ["alpha", "beta", "gamma", "delta"]
        class KeywordEvaluator:  # e.g. a RayEvaluator would send this call to a worker
            async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
                await asyncio.sleep(0)
                word = KEYWORDS[example_id % len(KEYWORDS)]
                has_word = word in texts["instr"].split()
                score = 0.5 * has_word + 0.5 * (json.loads(texts["instr::lm"])["temperature"] < 0.5)
                return EvalOutcome(example_id=example_id, score=score,
                                   trajectory={"missing": None if has_word else word} if capture_traces else None)
        class Rewrite:
            async def reflect(self, parent_texts, components, outcomes, seed):
                missing = sorted({o.trajectory["missing"] for o in outcomes
                                  if o.trajectory and o.trajectory["missing"]})
                new = {}
                for c in components:
                    if c == "instr" and missing:
                        new[c] = parent_texts[c] + " " + missing[0]
                    elif c == "instr::lm":
                        new[c] = json.dumps({**json.loads(parent_texts[c]), "temperature": 0.2})
                return ProposalOutcome(texts=new) if new else ProposalOutcome(skipped="empty_proposal")
        assert isinstance(KeywordEvaluator(), Evaluator) and isinstance(Rewrite(), Reflector)
        config = EngineConfig(max_metric_calls=600, max_evals_in_flight=4, max_mutations_in_flight=2,
                              max_reflections_in_flight=1, use_merge=True)
        seed = Candidate({"instr": "base", "instr::lm": json.dumps({"temperature": 0.9})})
        result = asyncio.run(Orchestrator(config, KeywordEvaluator(), Rewrite(), seed, range(8), range(8)).run())
        assert result.records[0].aggregate == 0.0 and result.best.aggregate == 1.0, result.best
        best = result.best.candidate
        assert json.loads(best.texts["instr::lm"])["temperature"] < 0.5
        assert best.fingerprint == fingerprint_texts(dict(best.texts))
        assert "dspy" not in sys.modules
    ''')
    proc = run_script(["-c", code], ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_extending_objective_scores_are_validated_stored_and_reported(tmp_path, caplog):
    """Also: frontier_type="objective" / "hybrid" is accepted and ignored with a warning."""
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        r = ROUTING.metric(gold, pred, trace, pred_name, pred_trace)
        return dspy.Prediction(score=r.score, feedback=r.feedback,
                               objective_scores={"accuracy": float(r.score), "brevity": 1 / (1 + len(pred.queue))})

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        dr = run(metric, log_dir=str(tmp_path), gepa_kwargs={"frontier_type": "hybrid"}).detailed_results
    assert any("frontier_type" in w and "no effect" in w for w in warnings_of(caplog))
    assert dr.val_aggregate_subscores and set(dr.val_aggregate_subscores[0]) == {"accuracy", "brevity"}
    assert set(dr.objective_pareto_front) == {"accuracy", "brevity"}
    with sqlite3.connect(tmp_path / "run.sqlite3") as conn:
        stored = [json.loads(r[0]) for r in conn.execute("SELECT objective_scores_json FROM evaluations")]
    assert stored and all(set(s) == {"accuracy", "brevity"} for s in stored)


def test_extending_a_saved_program_loads_as_a_seed_student_and_runs_reproduce(tmp_path):
    data = splits()
    first = run(data=data, budget=80)
    again = run(data=data, budget=80)  # deterministic=True: same seed, same fake LMs, same program
    assert instructions(first) == instructions(again)
    assert first.detailed_results.val_aggregate_scores == again.detailed_results.val_aggregate_scores
    first.save(str(tmp_path / "best.json"))
    seed = ROUTING.make_program()
    seed.load(str(tmp_path / "best.json"))
    resumed = run(program=seed, data=data, budget=40).detailed_results
    best = first.detailed_results
    assert resumed.val_aggregate_scores[0] == best.val_aggregate_scores[best.best_idx]
    assert resumed.run_stats["peak_evals_in_flight"] <= 4  # slots cap evaluations in flight at num_threads
