"""Review of 7c45e1c..c5592b1: ``all_of``'s error order and ``FailureFirstSampler``'s rounded-up gap (engine),
the benchmark harness's quiet dspy.GEPA, ``--kinds`` and ``--overhead --instructions`` (benchmarks/run.py), and
the rollout usage tracker shared with ``dspy.Parallel`` workers (adapter/lm_copies.py).

Each check is one test. A bug found is pinned as the correct behaviour and marked ``xfail(strict=True)``, its
reason saying what happens instead:

* lm_copies: a program that wraps its ``dspy.Parallel`` in its own ``dspy.track_usage()`` no longer has the
  branches' calls through our LM copies counted (0 tokens; counted before c5592b1, from the history entries);
* lm_copies: with ``track_usage=True`` an LLM-judge module that runs ``dspy.Parallel`` loses the judge's tokens
  (``_JudgeTracker`` is deep-copied into the workers, never merged back);
* lm_copies: a ``dspy.Parallel`` worker that outlives its Parallel call (cancelled after ``max_errors``) writes
  into the shared tracker while the rollout sums it: ``RuntimeError: dictionary changed size during iteration``;
* benchmarks/run.py: ``--resume`` / ``--aggregate-only`` never reuse an instruction-counted cell (the count
  overwrites the ``instructions: True`` config key that ``_load_cell`` compares);
* benchmarks/run.py: the out-of-process simulator outlives a cell process that is killed (a cell timeout);
* benchmarks/run.py: a count file missing after a clean exit crashes the whole run instead of failing the cell.

No valgrind is needed: the callgrind path is exercised with a stand-in for ``subprocess.run``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import dspy
import pytest

import dspy_turbogepa.adapter.lm_copies as lm_copies
from dspy_turbogepa.engine.errors import PaidCallRefused, all_of
from dspy_turbogepa.engine.sampling import (
    LIKELY_FAILING,
    SOLVED,
    UNKNOWN,
    EpochShuffledSampler,
    FailureFirstSampler,
)
from dspy_turbogepa.testing import TASKS, make_student_lm, sim_engine
from dspy_turbogepa.testing.fake_lm import AsyncSimEngine, SimEngine

from helpers import TwoParallelBranches, make_evaluator

ROOT = Path(__file__).resolve().parents[1]
ROUTING = TASKS["routing"]


# ============================================================================================ engine/errors.py


async def _steps(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _raises_when(event: asyncio.Event, error: BaseException | None, log: list[str], name: str):
    try:
        await event.wait()
    except asyncio.CancelledError:
        log.append(f"{name} cancelled")
        raise
    if error is not None:
        raise error
    return name


def _all_of_outcome(errors: dict[str, BaseException | None], finish_order: list[str]):
    """Run ``all_of`` over one task per key of ``errors`` (argument order = key order), letting them finish
    one by one in ``finish_order`` (a few loop steps apart); returns (raised or results, log)."""

    async def main():
        log: list[str] = []
        events = {name: asyncio.Event() for name in errors}
        run = asyncio.ensure_future(all_of(*(_raises_when(events[n], e, log, n) for n, e in errors.items())))
        await _steps()
        for name in finish_order:
            events[name].set()
            await _steps()
        try:
            return await run, log
        except BaseException as exc:  # the point of the test
            return exc, log

    return asyncio.run(main())


@pytest.mark.parametrize("late_order", list(itertools.permutations(["a", "b", "c"])))
def test_all_of_raises_the_first_late_error_in_argument_order_whatever_their_finishing_order(late_order):
    """errors.py all_of: after a cap's refusal the others finish, and "of several, the first in the order the
    awaitables were given, so the error a run reports does not depend on timing" (it read a set before)."""
    refusal = PaidCallRefused("token_budget")
    errors = {"a": None, "b": ValueError("b"), "c": KeyError("c"), "r": refusal}
    raised, log = _all_of_outcome(errors, ["r", *late_order])
    assert isinstance(raised, ValueError) and str(raised) == "b"
    assert not any("cancelled" in line for line in log)  # the refusal let every other one finish


def test_all_of_with_only_refusals_raises_the_first_refusal_in_argument_order():
    first, second = PaidCallRefused("token_budget"), PaidCallRefused("cost_budget_usd")
    raised, _ = _all_of_outcome({"x": first, "y": second, "z": None}, ["y", "z", "x"])
    assert raised is first


def test_all_of_a_systemic_error_still_cancels_its_siblings_at_once():
    """errors.py all_of: "at the first error, the others are cancelled and it is raised" (unchanged)."""
    raised, log = _all_of_outcome({"a": None, "b": RuntimeError("systemic"), "c": None}, ["b"])
    assert isinstance(raised, RuntimeError) and sorted(log) == ["a cancelled", "c cancelled"]


def test_all_of_returns_every_result_in_argument_order():
    results, _ = _all_of_outcome({"a": None, "b": None, "c": None}, ["c", "a", "b"])
    assert results == ["a", "b", "c"]


# ============================================================================================ engine/sampling.py


def _draws_of(n: int, size: int, bad: int, draws: int, fast: bool) -> int:
    sampler = FailureFirstSampler(list(range(n)), size, seed=7)

    def rank(i: int) -> int:
        return LIKELY_FAILING if i == bad else (SOLVED if i % 2 else UNKNOWN)

    if fast:
        rank.failing = [bad]  # type: ignore[attr-defined]  # the planning view's fast path
    hits = 0
    for _ in range(draws):
        batch = sampler.draw(rank)
        sampler.consume(batch)
        hits += bad in batch
    return hits


@pytest.mark.parametrize("fast", [False, True], ids=["full-scan", "failing-hint"])
def test_an_unsolvable_example_is_drawn_about_twice_per_epoch_for_every_size(fast):
    """sampling.py FailureFirstSampler: "eligible again only ``gap`` draws (half an epoch's worth, rounded down,
    and at least 2 from 3 draws an epoch on) after it was drawn, so an example no candidate can solve ... is
    drawn about twice as often as in plain epoch order (at most 2.5 times, with 5 draws an epoch), not every
    time", for every (n, size), size dividing n or not. (This review's commit had rounded the gap up; a
    same-session benchmark showed the search slower with it, so the gap rounds down again, never below 2
    from 3 draws an epoch on, and the docstring says so.)"""
    for n in range(1, 26):
        for size in range(1, n + 1):
            period = -(-n // size)
            gap = max(2 if period >= 3 else 1, period // 2)
            epochs = 5
            for bad in {0, n - 1}:
                hits = _draws_of(n, size, bad, epochs * period, fast)
                epoch = EpochShuffledSampler(list(range(n)), size, seed=7)
                in_epoch_order = sum(bad in epoch.batch(k) for k in range(epochs * period))
                assert in_epoch_order >= epochs  # once per epoch at least (padding adds a few)
                if period >= 3:
                    assert hits <= -(-(epochs * period) // gap), (n, size, bad, hits)  # at most once per gap
                    assert hits <= 2.5 * epochs + 1 and hits < epochs * period, (n, size, bad, hits)


def test_a_three_draw_epoch_no_longer_draws_the_unsolvable_example_every_time():
    """The commit's case: 3 draws an epoch (period // 2 was 1: drawn every time); now every other draw (the
    gap is at least 2 from 3 draws an epoch on)."""
    assert _draws_of(3, 1, 0, 12, fast=False) == 6
    assert _draws_of(9, 3, 4, 12, fast=True) == 6


# ============================================================================================ benchmarks/run.py


def _bench():
    spec = importlib.util.spec_from_file_location("bench_run_review31", ROOT / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


QUIET_CHILD = r"""
import contextlib, importlib.util, io, json, re, sys
spec = importlib.util.spec_from_file_location("bench_run", sys.argv[2])
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
try:  # the kind's setup runs, then the unknown task stops the cell
    b.run_overhead_cell({"kind": sys.argv[1], "task": "no-such-task", "n_train": 1, "n_val": 1, "n_test": 1,
                         "threads": 2, "seed": 0, "budget": 1})
except KeyError:
    pass
import dspy
from dspy.utils.parallelizer import ParallelExecutor
flag = ParallelExecutor(num_threads=2, disable_progress_bar=False).disable_progress_bar
buf = io.StringIO()
with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
    dspy.Evaluate(devset=[dspy.Example(x=str(i)).with_inputs("x") for i in range(3)], metric=lambda g, p, t=None: 1.0,
                  num_threads=2, display_progress=True)(lambda x: dspy.Prediction(y=x))
print(json.dumps({"disabled": flag, "bar": bool(re.search(r"\d+%\|", buf.getvalue()))}))
"""


@pytest.mark.parametrize("kind, quiet", [("gepa", False), ("gepa_quiet", True)])
def test_gepa_quiet_turns_off_dspys_parallel_executor_bars_and_gepa_keeps_them(kind, quiet):
    """run.py run_overhead_cell: gepa_quiet patches ParallelExecutor so Evaluate(display_progress=True) draws no
    bar (TQDM_DISABLE does not reach an explicit disable=False); gepa keeps DSPy's defaults."""
    proc = subprocess.run([sys.executable, "-c", QUIET_CHILD, kind, str(ROOT / "benchmarks" / "run.py")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"disabled": quiet, "bar": not quiet}


def _instruction_cell(bench, tmp_path: Path) -> dict:
    a = bench.parse_settings(["--overhead", "--kinds", "turbo", "--repeats", "1", "--out-dir", str(tmp_path)])
    a.instructions = True  # parse_settings insists on valgrind being installed: set it as it would
    (cfg,) = bench._cells(a, "overhead", tmp_path)
    Path(cfg["out"]).parent.mkdir(parents=True, exist_ok=True)
    return cfg


class FakeValgrind:
    """``subprocess.run`` for ``_run_cell_subprocess``: writes the cell's JSON as ``main(--cell)`` does, and
    the count file as callgrind does at exit (unless told otherwise)."""

    def __init__(self, rc: int = 0, write_counts: bool = True, total: int = 5_000_000) -> None:
        self.rc, self.write_counts, self.total = rc, write_counts, total
        self.commands: list[list[str]] = []

    def run(self, command, **kwargs):
        self.commands.append(list(command))
        assert command[:3] == ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        counts = Path(next(c.split("=", 1)[1] for c in command if c.startswith("--callgrind-out-file=")))
        cfg = json.loads(command[command.index("--cell") + 1])
        Path(cfg["out"]).write_text(json.dumps({**cfg, "metric_calls": 10, "cpu_ms_per_metric_call": 1.0}))
        if self.write_counts:
            counts.write_text(f"version: 1\nevents: Ir\nsummary: {self.total}\nfn=x\n1 5\ntotals: {self.total}\n")
        return subprocess.CompletedProcess(command, self.rc)


def _fake_subprocess(fake: FakeValgrind) -> SimpleNamespace:
    return SimpleNamespace(run=fake.run, STDOUT=subprocess.STDOUT)


def test_an_instruction_cell_runs_under_callgrind_and_its_count_is_read(tmp_path, monkeypatch):
    """run.py _run_cell_subprocess: the cell runs under ``valgrind --tool=callgrind --instr-atstart=no`` and
    its JSON gets the totals line, per metric call too."""
    bench = _bench()
    cfg = _instruction_cell(bench, tmp_path)
    fake = FakeValgrind()
    monkeypatch.setattr(bench, "subprocess", _fake_subprocess(fake))
    r = bench._run_cell_subprocess(cfg, 10.0)
    assert r["instructions_per_metric_call"] == 500_000 and r["metric_calls"] == 10
    assert json.loads(Path(cfg["out"]).read_text())["instructions_per_metric_call"] == 500_000
    assert Path(cfg["out"]).with_suffix(".callgrind").exists()  # kept for callgrind_annotate


def test_a_cell_whose_valgrind_died_is_failed_not_read(tmp_path, monkeypatch, capsys):
    """valgrind dying (non-zero exit) after the cell wrote its JSON: the cell is FAILED, the run goes on."""
    bench = _bench()
    cfg = _instruction_cell(bench, tmp_path)
    monkeypatch.setattr(bench, "subprocess", _fake_subprocess(FakeValgrind(rc=139, write_counts=False)))
    assert bench._run_cell_subprocess(cfg, 10.0) is None
    assert "FAILED" in capsys.readouterr().err


def test_a_cell_without_its_count_file_is_failed_and_the_run_goes_on(tmp_path, monkeypatch):
    bench = _bench()
    cfg = _instruction_cell(bench, tmp_path)
    monkeypatch.setattr(bench, "subprocess", _fake_subprocess(FakeValgrind(write_counts=False)))
    assert bench._run_cell_subprocess(cfg, 10.0) is None


def test_resume_reuses_an_instruction_counted_cell(tmp_path, monkeypatch):
    bench = _bench()
    cfg = _instruction_cell(bench, tmp_path)
    fake = FakeValgrind()
    monkeypatch.setattr(bench, "subprocess", _fake_subprocess(fake))
    a = argparse.Namespace(resume=True, aggregate_only=False, timeout=10.0)
    runs, failed = bench._collect([cfg], a, bench._describe)
    assert failed == 0 and len(fake.commands) == 1
    runs, failed = bench._collect([cfg], a, bench._describe)
    assert len(runs) == 1 and len(fake.commands) == 1  # stored: not run again


def test_the_meter_switches_instrumentation_on_for_the_measured_span_only(monkeypatch):
    """run.py _HarnessMeter.count_instructions: ``callgrind_control --instr=on|off <pid>`` around the span;
    nothing at all when not counting."""
    bench = _bench()
    seen: list[list[str]] = []
    monkeypatch.setattr(bench, "subprocess", SimpleNamespace(run=lambda cmd, **kw: seen.append(cmd)))
    meter = bench._HarnessMeter(SimpleNamespace(), instructions=True)
    with contextlib.suppress(ZeroDivisionError), meter.measure():
        seen.append(["span"])
        raise ZeroDivisionError  # the span raising still switches it off
    pid = str(os.getpid())
    assert seen == [["callgrind_control", "--instr=on", pid], ["span"], ["callgrind_control", "--instr=off", pid]]
    seen.clear()
    with bench._HarnessMeter(SimpleNamespace()).measure():
        pass
    assert seen == []


def test_the_external_simulator_serves_stats_and_a_failed_start_raises(tmp_path):
    """run.py _ExternalSim: READY <port> read, /stats served on 127.0.0.1, stopped on exit; a simulator that
    cannot start raises at once (not a hang)."""
    bench = _bench()
    with bench._ExternalSim("overhead", 0, 0.0) as sim:
        assert sim.url.startswith("http://127.0.0.1:") and sim.base_url.endswith("/v1")
        assert bench._lm_requests(sim) == (0, 0)
        proc = sim._proc
    assert proc.poll() is not None
    with pytest.raises(RuntimeError, match="did not start"):
        bench._ExternalSim("no-such-preset", 0, 0.0)


SIM_CHILD = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("bench_run", sys.argv[1])
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
sim = b._ExternalSim("overhead", 0, 0.0)
print(sim._proc.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_external_simulator_does_not_outlive_a_killed_cell():
    cell = subprocess.Popen([sys.executable, "-c", SIM_CHILD, str(ROOT / "benchmarks" / "run.py")],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    sim_pid = None
    try:
        sim_pid = int(cell.stdout.readline())
        cell.kill()  # what subprocess.run(timeout=...) does to the cell
        cell.wait()
        deadline = time.monotonic() + 5
        while _alive(sim_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(sim_pid)
    finally:
        cell.kill()
        cell.wait()
        cell.stdout.close()
        if sim_pid is not None and _alive(sim_pid):
            os.kill(sim_pid, signal.SIGTERM)  # the simulator this test started


def test_paired_excl_reports_differences_pair_each_repeat_with_its_floor(tmp_path):
    """run.py report_overhead: ``*_excl_reports_minus_floor_ms_paired`` is the median of per-repeat
    differences to that repeat's floor; a repeat without a floor, or without the value, is left out."""
    bench = _bench()

    def cell(kind, rep, cpu, excl):
        return {"task": "routing", "budget": 800, "kind": kind, "repeat": rep, "metric_calls": 800,
                "cpu_ms_per_metric_call": cpu, "cpu_ms_per_metric_call_excl_reports": excl}

    runs = [cell("floor", 0, 1.0, 1.0), cell("floor", 1, 3.0, 3.0),
            cell("turbo", 0, 2.5, 2.0), cell("turbo", 1, 4.5, 3.5), cell("turbo", 2, 9.0, 9.0),
            cell("gepa", 0, 2.0, None)]
    (row,) = bench.report_overhead(runs, tmp_path)["summary"]
    assert row["turbo_excl_reports_minus_floor_ms_paired"] == pytest.approx(0.75)  # median of 1.0 and 0.5
    assert row["turbo_minus_floor_ms_paired"] == pytest.approx(1.5)
    assert row["gepa_excl_reports_minus_floor_ms_paired"] is None


def test_instruction_report_without_a_floor_has_no_difference(tmp_path):
    """--kinds may leave the floor out: the report has no '− floor' then, and does not fail."""
    bench = _bench()
    runs = [{"task": "routing", "budget": 800, "kind": "turbo", "repeat": 0, "metric_calls": 800,
             "instructions": True, "instruction_count": 8e9, "instructions_per_metric_call": 1e7}]
    (row,) = bench.report_overhead_instructions(runs, tmp_path)["summary"]
    assert row["turbo_instructions_per_metric_call"] == 1e7 and row["turbo_minus_floor_instructions"] is None


# ============================================================================================ adapter/lm_copies.py


def _evaluate(program, lm, *, metric=None, ids=(0,), **kw):
    ev, codec = make_evaluator(ROUTING, program, metric=metric, **kw)

    async def main():
        return await asyncio.gather(*(ev.evaluate(codec.seed_texts(), "seed", "val", i, True) for i in ids))

    try:
        with dspy.context(lm=lm):
            return asyncio.run(main())
    finally:
        ev.close()


def _entries(tracker) -> int:
    return sum(len(entries) for entries in tracker.usage_data.values())


class CostedLM(dspy.LM):
    """A metadata-priced model whose calls report a cost (as litellm's do) in their history entries."""

    def update_history(self, entry):
        if isinstance(entry, dict) and entry.get("usage"):
            entry["cost"] = 0.001
        super().update_history(entry)


def _costed_lm() -> dspy.LM:
    engine = SimEngine("student", seed=0)
    return CostedLM("openai/gpt-4o-mini", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)


def _other_lm(model_name: str = "sim-student") -> dspy.LM:
    engine = SimEngine("student", seed=0, model_name=model_name)
    return dspy.LM(f"sim/{model_name}", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)


@pytest.mark.parametrize("depth", [1, 2], ids=["parallel", "nested-parallel"])
def test_our_copy_called_in_parallel_workers_is_counted_once(depth):
    """lm_copies.py: a dspy.Parallel worker's call through our copy reaches the shared rollout tracker (tokens)
    and its history entry (cost), each once: the entry's cost is not priced again from DSPy's model table
    (gpt-4o-mini is in it), and the user's outer tracker receives each call once."""
    program = ROUTING.make_program()
    for _ in range(depth):
        program = TwoParallelBranches(program)
    lm = _costed_lm()
    with dspy.track_usage() as outer:
        (outcome,) = _evaluate(program, lm)
    engine = sim_engine(lm).stats()
    assert outcome.failure is None and outcome.lm_calls == engine["calls"] == 2 ** depth
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (engine["prompt_tokens"], engine["completion_tokens"])
    assert outcome.cost == pytest.approx(0.001 * 2 ** depth)
    assert _entries(outer) == 2 ** depth


def test_a_price_table_prices_parallel_calls_once():
    """With ``price_table`` the reported cost is ignored and the tracker's tokens are priced once."""
    lm = make_student_lm()
    (outcome,) = _evaluate(TwoParallelBranches(ROUTING.make_program()), lm, price_table={"sim/sim-student": (1e6, 1e6)})
    engine = sim_engine(lm).stats()
    assert outcome.cost == pytest.approx(engine["prompt_tokens"] + engine["completion_tokens"])


def test_many_parallel_workers_append_to_the_shared_tracker_without_losing_an_entry():
    """_SharedTracker: "Appending to one list from several threads is safe under the GIL" (16 branches on 8
    threads, two models, every entry counted)."""
    other = _other_lm("sim-other")

    class Many(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = ROUTING.make_program()

        def branch(self, ticket, own):
            if own:
                with dspy.context(lm=other):
                    return self.inner(ticket=ticket)
            return self.inner(ticket=ticket)

        def forward(self, ticket):
            calls = [(self.branch, {"ticket": f"{ticket} {i}", "own": i % 2 == 1}) for i in range(16)]
            return dspy.Parallel(num_threads=8, disable_progress_bar=True)(calls)[0]

    lm = make_student_lm()
    with dspy.track_usage() as outer:
        (outcome,) = _evaluate(Many(), lm)
    assert outcome.failure is None and outcome.lm_calls == 16
    assert outcome.prompt_tokens == sim_engine(lm).stats()["prompt_tokens"] + sim_engine(other).stats()["prompt_tokens"]
    assert {m: len(e) for m, e in outer.usage_data.items()} == {"sim/sim-student": 8, "sim/sim-other": 8}


def test_an_async_program_with_asyncio_tasks_is_counted_once():
    """lm_copies.py: "on worker threads and in asyncio tasks alike" (acall in two tasks, two rollouts: four
    calls, each once in the user's tracker)."""
    own = _other_lm()

    class AsyncTasks(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = ROUTING.make_program()

        def forward(self, ticket):
            raise AssertionError("runs through aforward")

        async def aforward(self, ticket):
            async def mine(t):
                return await self.inner.route.acall(ticket=t)

            async def theirs(t):
                with dspy.context(lm=own):
                    return await self.inner.route.acall(ticket=t)

            first, _ = await asyncio.gather(asyncio.create_task(mine(ticket)), asyncio.create_task(theirs(ticket)))
            return first

    with dspy.track_usage() as outer:
        outcomes = _evaluate(AsyncTasks(), make_student_lm(), ids=(0, 1), use_async=True,
                             price_table={"sim/sim-student": (1e6, 0.0)})
    assert [o.lm_calls for o in outcomes] == [2, 2] and _entries(outer) == 4
    assert [o.cost for o in outcomes] == [o.prompt_tokens for o in outcomes]


def test_a_metric_running_judges_in_dspy_parallel_counts_each_once_with_track_usage():
    """_JudgeUsage with the shared tracker: each judge call in a Parallel worker gets its own usage on its
    prediction, and its entries roll up into the rollout's tracker (and the user's) exactly once."""
    judge_lm, judge = _other_lm(), ROUTING.make_program()
    usages = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with dspy.context(lm=judge_lm):
            outs = dspy.Parallel(num_threads=2, disable_progress_bar=True)(
                [(judge, {"ticket": gold.ticket}), (judge, {"ticket": gold.ticket + " "})])
        usages.extend(o.get_lm_usage() for o in outs)
        return 1.0

    with dspy.context(track_usage=True), dspy.track_usage() as outer:
        (outcome,) = _evaluate(ROUTING.make_program(), make_student_lm(), metric=metric)
    assert outcome.failure is None and outcome.lm_calls == 3 and _entries(outer) == 3
    per_call = sim_engine(judge_lm).stats()["prompt_tokens"] / 2
    assert [u["sim/sim-student"]["prompt_tokens"] for u in usages] == [per_call, per_call]


class JudgeWithBranches(dspy.Module):
    """An LLM judge module that asks two questions in dspy.Parallel branches."""

    def __init__(self, lm):
        super().__init__()
        self.inner = ROUTING.make_program()
        self.lm = lm

    def forward(self, ticket):
        with dspy.context(lm=self.lm):
            outs = dspy.Parallel(num_threads=2, disable_progress_bar=True)(
                [(self.inner, {"ticket": ticket}), (self.inner, {"ticket": ticket + " "})])
        return outs[0]


@pytest.mark.parametrize("track_usage", [False, True])
def test_a_judge_module_running_dspy_parallel_is_counted(track_usage):
    judge_lm = _other_lm()
    judge = JudgeWithBranches(judge_lm)

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        judge(ticket=gold.ticket)
        return 1.0

    with dspy.context(track_usage=track_usage), dspy.track_usage() as outer:
        (outcome,) = _evaluate(ROUTING.make_program(), make_student_lm(), metric=metric)
    assert sim_engine(judge_lm).stats()["calls"] == 2
    assert outcome.failure is None and outcome.lm_calls == 3 and _entries(outer) == 3


class TrackedBranches(dspy.Module):
    """The program logs its own usage: ``with dspy.track_usage()`` around a dspy.Parallel (our copy's calls)."""

    def __init__(self):
        super().__init__()
        self.inner = ROUTING.make_program()
        self.seen = []

    def forward(self, ticket):
        with dspy.track_usage() as mine:
            outs = dspy.Parallel(num_threads=2, disable_progress_bar=True)(
                [(self.inner, {"ticket": ticket}), (self.inner, {"ticket": ticket + " "})])
        self.seen.append(_entries(mine))
        return outs[0]


def test_our_copy_in_parallel_under_the_programs_own_tracker_is_still_counted():
    lm = make_student_lm()
    (outcome,) = _evaluate(TrackedBranches(), lm, price_table={"sim/sim-student": (1e6, 0.0)})
    engine = sim_engine(lm).stats()
    assert outcome.failure is None and engine["calls"] == 2
    assert outcome.lm_calls == 2 and outcome.prompt_tokens == engine["prompt_tokens"]
    assert outcome.cost == pytest.approx(engine["prompt_tokens"])


def test_a_straggling_parallel_worker_cannot_break_the_rollouts_sum(monkeypatch):
    other = _other_lm("sim-other")
    started, go, done = threading.Event(), threading.Event(), threading.Event()

    class Straggler(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = ROUTING.make_program()

        def fail(self, ticket):
            started.wait(10)
            raise ValueError("this branch failed")

        def late(self, ticket):
            started.set()
            go.wait(10)
            try:
                with dspy.context(lm=other):
                    return self.inner(ticket=ticket)
            finally:
                done.set()

        def forward(self, ticket):
            with contextlib.suppress(Exception):  # "Execution cancelled due to errors or interruption."
                dspy.Parallel(num_threads=2, max_errors=1, disable_progress_bar=True)(
                    [(self.fail, {"ticket": ticket}), (self.late, {"ticket": ticket})])
            return self.inner(ticket=ticket)

    metadata_cost = lm_copies._metadata_cost

    def summing(model, prompt, completion):  # the straggler's call lands while the rollout sums its tracker
        go.set()
        done.wait(10)
        return metadata_cost(model, prompt, completion)

    monkeypatch.setattr(lm_copies, "_metadata_cost", summing)
    logger = __import__("logging").getLogger("dspy.utils.parallelizer")
    monkeypatch.setattr(logger, "disabled", True)
    try:
        (outcome,) = _evaluate(Straggler(), make_student_lm())
    finally:  # the straggler ends inside this test, not as a stray thread calling an LM in a later one
        started.set()
        go.set()
        done.wait(15)
    assert outcome.failure is None and outcome.lm_calls >= 1
