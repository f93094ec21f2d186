"""Review of the benchmark harness: does benchmarks/run.py compute what benchmarks/README.md,
docs/benchmark.md and the README's headline section say it computes?

One test per claim; each docstring quotes the claim and names where it is made. A claim found
false is a test of the documented behaviour marked ``xfail(strict=True)`` with what is true instead.

The pure functions of run.py are tested on hand-made run dicts; a few smoke-sized cells run in
subprocesses against the loopback simulator (127.0.0.1 only); the published grid is checked from its
archive, docs/benchmark/runs.tar.gz.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "benchmarks" / "run.py"
ARCHIVE = ROOT / "docs" / "benchmark" / "runs.tar.gz"
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no model-metadata download


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run_review", RUN_PY)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_bench()


@pytest.fixture
def no_plot(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """aggregate() draws a PNG with matplotlib; the claims tested here are about the numbers."""
    monkeypatch.setattr(bench, "_plot", lambda *a, **k: None)


def _run(opt: str, seed: int, curve: list[tuple[float, float]], wall: float = 10.0, *, final_test: float = 0.8,
         s_calls: int = 100, r_calls: int = 10, timeline: list[list[float]] | None = None, **extra: Any) -> dict:
    """A grid cell as run_cell() writes it (only the keys aggregation reads)."""
    return {
        "mode": "grid", "task": "routing", "budget": 300, "optimizer": opt, "seed": seed, "seed_test": 0.3,
        "final_test": final_test, "final_val": max(v for _, v in curve), "best_val_curve": [list(p) for p in curve],
        "compile_wall_s": wall, "lm_calls_student": s_calls, "lm_calls_reflector": r_calls,
        "lm_timeline": timeline if timeline is not None else [[t, 10 * t, t // 5] for t in range(int(wall) + 1)],
        "harness_cpu_s": 1.0, "metric_calls": 300, "student_concurrency_utilisation": 0.5, "peak_rss_mb": 90.0,
        **extra,
    }


def _cell(tmp: Path, **cfg: Any) -> tuple[dict, str]:
    """Run one cell of run.py in a subprocess (as _run_cell_subprocess does); (result JSON, its output)."""
    out = tmp / f"{cfg.get('kind') or cfg['optimizer']}.json"
    cfg = {"seed": 0, "threads": 16, "n_train": 24, "n_val": 12, "n_test": 40, **cfg, "out": str(out)}
    proc = subprocess.run([sys.executable, str(RUN_PY), "--cell", json.dumps(cfg)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=ENV, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------
# time to target, LM calls to target, targets
# ---------------------------------------------------------------------------------------------------


def test_target_is_gepas_median_final_val_per_task_budget(bench: ModuleType, tmp_path: Path, no_plot: None) -> None:
    """benchmarks/README.md:60-61: "Target = dspy.GEPA's median final validation score for the
    task/budget" (run.py:684-690): one target per (task, budget), the median over seeds, not each
    seed's own gepa score, and the same target for every optimizer's row."""
    runs = [
        _run("gepa", 0, [(0.0, 0.3), (5.0, 0.5)]),
        _run("gepa", 1, [(0.0, 0.3), (6.0, 0.7)]),
        _run("gepa", 2, [(0.0, 0.3), (7.0, 0.9)]),
        *[_run("turbo", s, [(0.0, 0.3), (2.0, 0.7), (3.0, 0.8)]) for s in range(3)],
    ]
    bench.aggregate(runs, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["target"] for r in summary} == {0.7}
    reached = {(r["optimizer"], r["seed"]): r["reached_target"] for r in summary}
    # per-seed targets would make turbo miss seed 2 (gepa's 0.9) and gepa reach all three
    assert reached == {("gepa", 0): False, ("gepa", 1): True, ("gepa", 2): True,
                       ("turbo", 0): True, ("turbo", 1): True, ("turbo", 2): True}
    assert "| routing | 300 | 0.700 | gepa median final val (n=3) |" in (tmp_path / "table.md").read_text()


def test_without_gepa_the_target_is_the_tasks_target_val(bench: ModuleType, tmp_path: Path, no_plot: None) -> None:
    """run.py:661-662 (table.md's header): "Target = dspy.GEPA's median final validation score for the
    task/budget (task.target_val if gepa was not run)"."""
    from dspy_turbogepa.testing import TASKS

    bench.aggregate([_run("turbo", 0, [(0.0, 0.3), (2.0, 0.95)])], tmp_path)
    (r,) = json.loads((tmp_path / "summary.json").read_text())
    assert r["target"] == TASKS["routing"].target_val
    assert "task.target_val" in (tmp_path / "table.md").read_text()


def test_a_run_that_misses_counts_its_whole_compile_and_all_its_lm_calls(bench: ModuleType) -> None:
    """benchmarks/README.md:61-62: "runs that never reach it count their whole compile time and all
    their LM calls" (docs/benchmark.md:61-62 the same; run.py:801-807)."""
    miss = _run("gepa", 0, [(0.0, 0.3), (4.0, 0.6)], wall=37.5, s_calls=640, r_calls=21)
    assert bench._to_target(miss, 0.7) == (37.5, 661, False)


def test_time_and_lm_calls_to_target_are_read_at_the_same_moment(bench: ModuleType) -> None:
    """benchmarks/README.md:59-63: the curve is "the best-so-far" of full-validation scores; "LM calls
    come from the server's counters (polled every 50 ms for 'LM calls to target')": time to target is
    the first curve point at or above the target, and the LM calls (student + reflection) are the
    counters' first sample at or after that moment (run.py:616-623, 801-807)."""
    timeline = [[0.0, 0, 0], [1.0, 10, 1], [2.0, 25, 2], [3.0, 40, 3], [9.0, 90, 9]]
    run = _run("turbo", 0, [(0.0, 0.3), (0.9, 0.5), (1.5, 0.75), (2.5, 0.9)], wall=9.0, timeline=timeline,
               s_calls=90, r_calls=9)
    assert bench._to_target(run, 0.7) == (1.5, 25 + 2, True)
    assert bench._to_target(run, 0.75) == (1.5, 27, True)  # "reaches" includes equality
    assert bench._to_target(run, 0.9) == (2.5, 40 + 3, True)
    assert bench._lm_calls_at(run, 99.0) == (90, 9)  # past the last sample: the run's totals


def test_lm_counters_are_polled_every_50ms_from_compile_start(grid_cells: dict) -> None:
    """benchmarks/README.md:62-63: "LM calls come from the server's counters (polled every 50 ms for
    'LM calls to target')" (run.py:277-281). A short compile keeps every poll (the stored timeline is
    thinned to about 400 samples only for compiles over about 40 s)."""
    for r in grid_cells.values():
        tl = r["lm_timeline"]
        assert tl[0][0] < 0.05 and tl[0][1:] == [0, 0]  # starts with compile, counters at zero
        ts = [t for t, _, _ in tl[:-2]]  # the last two entries are the compile's end, appended
        assert len(ts) >= 3
        gaps = sorted(b - a for a, b in zip(ts, ts[1:]))
        assert gaps[0] >= 0.045 and gaps[len(gaps) // 2] < 0.2, ts  # never sooner than 50 ms, typically 50 ms
        assert tl[-1] == [r["compile_wall_s"], r["lm_calls_student"], r["lm_calls_reflector"]]


# ---------------------------------------------------------------------------------------------------
# medians, ratios, spread
# ---------------------------------------------------------------------------------------------------


def test_table_cells_are_median_min_max_over_seeds(bench: ModuleType) -> None:
    """benchmarks/README.md:39: "`table.md` (median [min, max] over seeds)"; table.md's header: "A
    column some runs lack ... is the median of the runs that have it, marked (n=...)" (run.py:631-644)."""
    assert bench._fmt([3.0, 1.0, 2.0, 10.0]) == "2.500 [1.000, 10.000]"
    assert bench._fmt([4.0], 1) == "4.0"
    assert bench._col([{"x": 1.0}, {"x": 5.0}, {"x": None}, {}], "x", 1) == "3.0 [1.0, 5.0] (n=2)"


def test_ratios_are_ratios_of_medians_at_each_baselines_own_target(bench: ModuleType, tmp_path: Path,
                                                                    no_plot: None) -> None:
    """benchmarks/README.md:44-50: "`## Ratios`, per task/budget and baseline ... from the medians over
    seeds: time-to-target speedup (baseline / turbo ...), LM calls to target (turbo / baseline ...),
    final test score difference (turbo − baseline) ... the median metric calls each used";
    docs/benchmark.md:60: "Each baseline is compared at its own median final validation score"
    (run.py:747-776)."""
    tl = [[t, 10 * t, 0] for t in range(41)]
    turbo = [_run("turbo", 0, [(0.0, 0.3), (2.0, 0.9)], 40, final_test=0.9, timeline=tl),
             _run("turbo", 1, [(0.0, 0.3), (4.0, 0.9)], 40, final_test=0.7, timeline=tl),
             _run("turbo", 2, [(0.0, 0.3), (9.0, 0.9)], 40, final_test=0.8, timeline=tl)]
    gepa = [_run("gepa", 0, [(0.0, 0.3), (8.0, 0.9)], 40, final_test=0.6, timeline=tl),
            _run("gepa", 1, [(0.0, 0.3), (6.0, 0.9)], 40, final_test=0.9, timeline=tl),
            _run("gepa", 2, [(0.0, 0.3), (30.0, 0.9)], 40, final_test=0.7, timeline=tl)]
    gepa4 = [_run("gepa4", s, [(0.0, 0.3), (t, 0.6)], 40, timeline=tl) for s, t in ((0, 3.0), (1, 5.0), (2, 7.0))]
    bench.aggregate(turbo + gepa + gepa4, tmp_path)
    rows = {r["baseline"]: r for r in json.loads((tmp_path / "ratios.json").read_text())}
    g = rows["gepa"]
    assert g["target"] == 0.9
    assert g["time_to_target_speedup"] == pytest.approx(8.0 / 4.0)  # median 8 / median 4; per-seed median: 3.33
    assert g["lm_calls_to_target_ratio"] == pytest.approx(40 / 80)
    assert g["final_test_diff"] == pytest.approx(0.8 - 0.7)
    assert (g["metric_calls_turbo"], g["metric_calls_baseline"]) == (300, 300)
    g4 = rows["gepa4"]
    assert g4["target"] == 0.6 and g4["time_to_target_speedup"] == pytest.approx(5.0 / 4.0)  # turbo hits 0.6 at 2/4/9


def test_misses_at_common_cap_count_the_longer_compile_of_the_seed(bench: ModuleType) -> None:
    """benchmarks/README.md:47-49: "the speedup with a seed's misses at the longer of its two compile
    times ('misses at common cap')" (run.py:864-868, 886-888)."""
    turbo = [_run("turbo", 0, [(0.0, 0.3), (1.0, 0.5)], wall=10.0)]  # misses, its compile ends at 10 s
    base = [_run("gepa", 0, [(0.0, 0.3), (15.0, 0.9)], wall=20.0)]  # reaches at 15 s, compile 20 s
    out = bench._paired_by_seed(turbo, base, 0.9)
    assert out["speedup_misses_at_common_cap"] == pytest.approx(15.0 / 20.0)  # the rule: 15 / 10
    assert out["seeds_sooner"] == 0


def test_bootstrap_resamples_seeds_keeping_each_seeds_pair(bench: ModuleType) -> None:
    """docs/benchmark.md:64-65 and table.md's Ratios text (run.py:730-733): "a 95% bootstrap interval of
    the speedup (seeds resampled with replacement, turbo and baseline of a seed kept together, 2,000
    draws)". With the baseline exactly twice as slow on every seed, a paired resample always gives 2."""
    times = [3.0, 5.0, 11.0, 17.0, 40.0]
    turbo = [_run("turbo", s, [(0.0, 0.3), (t, 0.9)], wall=100.0) for s, t in enumerate(times)]
    base = [_run("gepa", s, [(0.0, 0.3), (2 * t, 0.9)], wall=100.0) for s, t in enumerate(times)]
    lo, hi = bench._paired_by_seed(turbo, base, 0.9)["speedup_ci95"]
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)


def test_search_steps_reflection_calls_are_counted_until_the_hit(bench: ModuleType) -> None:
    """benchmarks/README.md:51-55: "the longest parent chain from the seed to the first candidate at
    the target ... the seconds per step, beside the reflection calls made until then"
    (run.py:810-849)."""
    run = _run("turbo", 0, [(0.0, 0.3), (1.0, 0.5), (6.0, 0.9)], wall=20.0,
               timeline=[[0.0, 0, 0], [6.0, 50, 7], [20.0, 90, 30]], s_calls=90, r_calls=30,
               reflector_mean_latency_s=0.5)
    run["best_val_curve"] = [[0.0, 0.3, 0], [1.0, 0.5, 1], [6.0, 0.9, 3]]
    (line,) = [x for x in bench._steps_section({("routing", 300): {"turbo": [run]}}, {("routing", 300): (0.8, "")})
               if x.startswith("| routing")]
    assert line == "| routing | 300 | turbo | 1/1 | 3.0 | 2.00 | 7 | 0.50 |"


# ---------------------------------------------------------------------------------------------------
# harness CPU, metric calls
# ---------------------------------------------------------------------------------------------------


def test_harness_cpu_is_process_cpu_minus_the_simulator_thread(bench: ModuleType) -> None:
    """benchmarks/README.md:63 and 113-114: "harness CPU = process CPU minus the simulator thread"
    (run.py:111-147). The simulator is one asyncio thread (testing/server.py:189), so subtracting that
    thread removes all of its CPU: a span where only the "simulator" burns CPU measures about zero."""
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            sum(range(200))

    sim = threading.Thread(target=burn, daemon=True)
    sim.start()
    try:
        meter = bench._HarnessMeter(SimpleNamespace(_thread=sim))
        control = bench._HarnessMeter(SimpleNamespace(_thread=None))  # a process-wide meter
        burned0 = bench._thread_cpu(sim.native_id)
        with meter.measure(), control.measure():
            # until the burner has had 0.15 s of CPU (a fixed 0.4 s sleep got it 0.08 s on a loaded machine)
            deadline = time.monotonic() + 30
            while bench._thread_cpu(sim.native_id) - burned0 < 0.15 and time.monotonic() < deadline:
                time.sleep(0.02)
        burned = bench._thread_cpu(sim.native_id) - burned0  # over a slightly wider window than the meters'
    finally:
        stop.set()
        sim.join()
    assert control.cpu_s >= 0.1, "the burner got no CPU: cannot tell"
    assert burned >= control.cpu_s - 0.03  # the process's CPU in the span was the burner's
    assert meter.cpu_s < 0.04 + 0.1 * control.cpu_s


def test_metric_calls_count_whole_program_rollouts_feedback_apart(bench: ModuleType) -> None:
    """benchmarks/README.md:64-65: "`metric_calls` counts whole-program rollouts (per-predictor
    feedback calls are reported separately as `feedback_metric_calls`)" (run.py:184-195, 249-260)."""
    task = SimpleNamespace(metric=lambda gold, pred, trace=None, pred_name=None, pred_trace=None: 1.0)
    metric, counters = bench._counting_metric(task)
    for _ in range(3):
        metric(None, None)
    metric(None, None, None, "predict", [])
    assert counters == {"metric_calls": 3, "feedback_calls": 1}


# ---------------------------------------------------------------------------------------------------
# live grid cells (smoke size, both optimizers)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid_cells(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("grid")
    return {opt: _cell(tmp, mode="grid", optimizer=opt, task="routing", budget=60, time_scale=0.02)[0]
            for opt in ("gepa", "turbo")}


def test_server_counters_cover_the_compile_only(grid_cells: dict) -> None:
    """benchmarks/README.md:68-70: "Its counters are reset just before `compile`" (run.py:272-294): the
    seed program's 40 test calls before compile and the 40 after it are not in the cell's LM calls."""
    for r in grid_cells.values():
        assert r["metric_calls"] <= r["lm_calls_student"] < r["metric_calls"] + r["n_test"], r


def test_student_util_is_mean_inflight_over_threads_and_busy_times_while_busy(grid_cells: dict,
                                                                              archive_runs: list) -> None:
    """benchmarks/README.md:69-75: "`student_concurrency_utilisation = student_mean_inflight / threads`
    ... It is the product of two columns ...: `student_busy_share` ... and `student_util_while_busy`"
    (run.py:298, 344-349). Checked on live cells and on all 180 cells of the published grid."""
    runs = list(grid_cells.values()) + archive_runs
    assert len(runs) == 182
    for r in runs:
        assert r["student_concurrency_utilisation"] == pytest.approx(r["student_mean_inflight"] / r["threads"])
        assert r["student_busy_share"] * r["student_util_while_busy"] == pytest.approx(
            r["student_concurrency_utilisation"], rel=1e-9)


def test_while_work_available_is_turbo_only(grid_cells: dict) -> None:
    """benchmarks/README.md:77-86: '"While work is available" (TurboGEPA only; dspy.GEPA keeps no such
    account)' (run.py:307-309, 350-353)."""
    g, t = grid_cells["gepa"], grid_cells["turbo"]
    assert (g["student_util_while_work_available_engine"], g["student_util_while_work_available_server"],
            g["eval_demand_share"]) == (None, None, None)
    assert 0 < t["student_util_while_work_available_server"] <= t["student_util_while_work_available_engine"] + 1e-6
    assert 0 < t["eval_demand_share"] <= 1


def test_curve_is_best_so_far_and_ends_at_the_optimizers_final_val(grid_cells: dict, archive_runs: list) -> None:
    """benchmarks/README.md:59-61: "A candidate's full-validation score is known when all its val
    examples have been scored; the best-so-far of those gives the curve. Target = dspy.GEPA's ... final
    validation score" (run.py:315-335): the harness's curve must end at the score the optimizer reports,
    or a target could be out of reach of the runs it came from. Live cells and the published grid."""
    for r in list(grid_cells.values()) + archive_runs:
        vals = [v for _, v, *_ in r["best_val_curve"]]
        times = [t for t, *_ in r["best_val_curve"]]
        assert vals == sorted(set(vals)) and times == sorted(times)
        assert vals[-1] == pytest.approx(r["final_val"]), (r["optimizer"], r["task"], r["budget"], r["seed"])


# ---------------------------------------------------------------------------------------------------
# the published grid (docs/benchmark/runs.tar.gz)
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("archive")
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(d, filter="data")
    return d


@pytest.fixture(scope="module")
def archive_runs(archive_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((archive_dir / "runs").glob("*.json"))]


@pytest.fixture(scope="module")
def rebuilt(bench: ModuleType, archive_dir: Path) -> Path:
    """`run.py --aggregate-only` over the archive, as docs/benchmark.md:26-28 gives it (the PNG left out)."""
    d = archive_dir
    saved = bench._plot
    bench._plot = lambda *a, **k: None
    try:
        rc = bench.main(["--optimizers", "turbo,gepa,gepa4", "--budgets", "300,800", "--seeds", "0,1,2,3,4,5,6,7,8,9",
                         "--threads", "16", "--time-scale", "0.5", "--aggregate-only", "--out-dir", str(d)])
    finally:
        bench._plot = saved
    assert rc == 0
    return d


def test_archive_rebuilds_the_published_table_exactly(rebuilt: Path) -> None:
    """docs/benchmark.md:25-28: "`python benchmarks/run.py --optimizers turbo,gepa,gepa4 --budgets
    300,800 --seeds 0,...,9 --threads 16 --time-scale 0.5 --aggregate-only --out-dir DIR` rebuilds
    table.md exactly (checked)"; its ratio and steps tables (docs/benchmark.md:74-87, 116-135) are rows
    of it."""
    table = (rebuilt / "table.md").read_text()
    assert table == (ROOT / "docs" / "benchmark" / "table.md").read_text()
    doc = (ROOT / "docs" / "benchmark.md").read_text().splitlines()
    rows = [x for x in doc if re.match(r"\| (routing|pipeline|pricing) \| (300|800) \| (turbo vs |gepa|turbo)", x)]
    assert len(rows) == 30 and all(x in table.splitlines() for x in rows)


def test_readme_headline_numbers_are_the_harness_figures(rebuilt: Path) -> None:
    """README.md:94-104: the headline row (pipeline@800: dspy.GEPA 52.7 s, 1590 LM calls, test 0.883,
    compile 60.5 s; TurboGEPA 20.8 s, ...) and the per-cell
    "speedup / LM calls to target / test diff" grid are what the harness computes from the grid."""
    table = (rebuilt / "table.md").read_text().splitlines()

    def cells(opt: str) -> list[str]:
        row = next(x for x in table if x.startswith(f"| pipeline | 800 | {opt} |"))
        c = [x.strip() for x in row.split("|")[1:-1]]
        return [c[8].split()[0], c[9].split()[0], c[10].split()[0], c[5].split()[0], c[11].split()[0]]

    assert cells("gepa") == ["5/10", "52.7", "1590", "0.883", "60.5"]
    assert cells("turbo") == ["9/10", "20.8", "1120", "0.957", "37.3"]
    ratios = {(r["task"], r["budget"]): r for r in json.loads((rebuilt / "ratios.json").read_text())
              if r["baseline"] == "gepa"}
    readme = (ROOT / "README.md").read_text()
    for budget in (300, 800):
        row = next(x for x in readme.splitlines() if x.startswith(f"| {budget} calls |"))
        for task, cell in zip(("routing", "pipeline", "pricing"), [x.strip() for x in row.split("|")[2:-1]]):
            r = ratios[(task, budget)]
            assert cell == (f"{r['time_to_target_speedup']:.2f}x / {r['lm_calls_to_target_ratio']:.2f}"
                            f" / {r['final_test_diff']:+.3f}"), (task, budget)
    speedups = [r["time_to_target_speedup"] for r in ratios.values()]
    assert f"{math.exp(sum(map(math.log, speedups)) / 6):.2f}x" == "1.95x"  # README.md


def test_outside_busy_share_includes_evaluations_client_side_work(archive_runs: list) -> None:
    """benchmarks/README.md: "`student_busy_share`, the share of the compile with at least one student
    request in flight (the rest is time with no student request on the wire: waiting on a reflection,
    the optimizer's own CPU, or evaluations' client-side work between requests)". Found by this review:
    it said the rest was time with no evaluation at all, but in every TurboGEPA cell of the published
    grid the share of the compile with evaluation demand (eval_demand_share, run.py) exceeds the busy
    share by 0.009-0.040: evaluations held slots with no request on the wire."""
    turbo = [r for r in archive_runs if r["optimizer"] == "turbo"]
    assert len(turbo) == 60
    assert all(r["eval_demand_share"] > r["student_busy_share"] for r in turbo)
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    assert "ran no evaluation at all" not in readme
    assert "evaluations' client-side work between requests" in " ".join(readme.split())


# ---------------------------------------------------------------------------------------------------
# overhead
# ---------------------------------------------------------------------------------------------------


def test_overhead_defaults_are_rounds_of_four_kinds(bench: ModuleType) -> None:
    """benchmarks/README.md:98-100: "task `routing` ..., threads 16, budget 800, seed 0, `--repeats`
    (default 3) rounds of four measurements, each in a fresh subprocess" (run.py:1054-1073)."""
    a = bench.parse_settings(["--overhead", "--out-dir", "/nonexistent"])
    cells = bench._cells(a, "overhead", Path("/nonexistent"))
    assert [(c["repeat"], c["kind"]) for c in cells] == [(r, k) for r in range(3)
                                                          for k in ("turbo", "gepa", "gepa_quiet", "floor")]
    assert {(c["task"], c["budget"], c["seed"], c["threads"], c["n_test"]) for c in cells} == {
        ("routing", 800, 0, 16, 300)}


def test_overhead_report_differences_and_paired_medians(bench: ModuleType, tmp_path: Path) -> None:
    """benchmarks/README.md:115-117: "`overhead.md` / `overhead.json` give the medians (and [min, max])
    per kind, each kind − floor in ms per metric call (also without turbo's reports, and as the median
    of per-round differences, `*_paired`)" (run.py:966-996)."""
    def cell(kind: str, rep: int, ms: float, excl: float | None = None) -> dict:
        return {"task": "routing", "budget": 800, "kind": kind, "repeat": rep, "metric_calls": 800,
                "cpu_ms_per_metric_call": ms, "cpu_ms_per_metric_call_excl_reports": ms if excl is None else excl}

    runs = [cell("floor", 0, 2.0), cell("floor", 1, 2.2), cell("floor", 2, 2.1),
            cell("turbo", 0, 3.0, 2.3), cell("turbo", 1, 3.5, 2.8), cell("turbo", 2, 2.4, 2.2),
            cell("gepa_quiet", 0, 2.5), cell("gepa_quiet", 1, 2.4), cell("gepa_quiet", 2, 2.6)]
    (row,) = bench.report_overhead(runs, tmp_path)["summary"]
    assert row["turbo_minus_floor_ms"] == pytest.approx(3.0 - 2.1)
    assert row["turbo_excl_reports_minus_floor_ms"] == pytest.approx(2.3 - 2.1)
    assert row["turbo_minus_floor_ms_paired"] == pytest.approx(1.0)  # median of 1.0, 1.3, 0.3
    assert row["gepa_quiet_minus_floor_ms_paired"] == pytest.approx(0.5)  # median of 0.5, 0.2, 0.5
    assert "| routing | 800 | turbo | 3 | 3.00 [2.40, 3.50] | +0.90 |" in (tmp_path / "overhead.md").read_text()


def test_floor_repeats_the_test_split_past_the_budget_after_an_unmeasured_warm_up(tmp_path: Path) -> None:
    """benchmarks/README.md:109-113: "`floor`: a plain `dspy.Evaluate(...)` of the seed program over
    the test split ..., repeated until it makes at least `budget` metric calls" and "Each subprocess
    first evaluates the seed on 16 examples (client warm-up, not measured)" (run.py:403-414)."""
    r, _ = _cell(tmp_path, mode="overhead", kind="floor", task="routing", budget=60, repeat=0)
    assert r["floor_passes"] == 2 and r["metric_calls"] == 80  # 40 test examples, twice: >= 60
    assert r["metric_calls"] <= r["lm_calls_student"] < r["metric_calls"] + 16  # the warm-up's 16 not counted
    assert r["lm_calls_reflector"] == 0


def test_gepa_quiet_draws_no_progress_output(tmp_path: Path) -> None:
    """benchmarks/README.md:107-108: "`gepa_quiet`: the same with those off (the dspy and gepa loggers at
    WARNING, `TQDM_DISABLE=1`), as quiet as `turbo`: the like-for-like comparison"; docs/benchmark.md:
    289-290 the same; run.py:384-390. Quiet means no progress bar is drawn during the compile."""
    r, out = _cell(tmp_path, mode="overhead", kind="gepa_quiet", task="routing", budget=60, repeat=0)
    assert r["metric_calls"] > 0
    assert " INFO " not in out and "GEPA Optimization" not in out  # what the smoke test checks: true
    bars = re.findall(r"\d+%\|", out)
    assert not bars, f"{len(bars)} progress-bar refreshes, e.g. {out.replace(chr(13), chr(10)).splitlines()[1]!r}"


def test_gepa4_and_common_settings(bench: ModuleType) -> None:
    """benchmarks/README.md:34-36: "`gepa4` = `dspy.GEPA` with `gepa_kwargs={"sampling_strategy":
    IndependentSampling(4)}`; all with `max_metric_calls=B, num_threads=T, track_stats=True, seed=S`"
    (run.py:160-181)."""
    import dspy
    from gepa.strategies.proposal_sampling import IndependentSampling

    refl = dspy.LM("openai/sim-reflector", api_base="http://127.0.0.1:9", api_key="x")
    common = bench._common_kwargs({"budget": 123, "threads": 7, "seed": 5}, refl)
    opt = bench._make_optimizer("gepa4", lambda *a, **k: 1.0, common)
    assert type(opt) is dspy.GEPA
    assert isinstance(opt.gepa_kwargs["sampling_strategy"], IndependentSampling)
    assert opt.gepa_kwargs["sampling_strategy"].n == 4
    assert (opt.max_metric_calls, opt.num_threads, opt.track_stats, opt.seed) == (123, 7, True, 5)


# ---------------------------------------------------------------------------------------------------
# memory, resume, cache check
# ---------------------------------------------------------------------------------------------------


def test_memory_growth_is_from_the_smallest_budget_and_short_runs_are_flagged(bench: ModuleType,
                                                                            tmp_path: Path) -> None:
    """benchmarks/README.md:126-133: "`max_metric_calls` 1000 and 5000 (`--budgets`) ... the peak RSS
    (`ru_maxrss`) and the growth from the smallest budget (MB, and KB per extra metric call) ... A run
    that makes fewer than 95 % of its budget's metric calls ... is flagged in `memory.md`"
    (run.py:1003-1046; defaults run.py:52-59)."""
    a = bench.parse_settings(["--memory"])
    assert (a.budgets, a.tasks, a.n_train, a.n_val, a.kinds) == ("1000,5000", "routing", 400, 40, "turbo,floor")

    def cell(budget: int, calls: int, peak: float) -> dict:
        return {"task": "routing", "seed": 0, "budget": budget, "metric_calls": calls, "peak_rss_mb": peak,
                "n_train": 80, "n_val": 40, "rss_before_compile_mb": 69.0, "stop_reason": "max_metric_calls"}

    data = bench.report_memory([cell(5000, 5024, 119.0), cell(1000, 1011, 88.0), cell(2000, 1800, 95.0)], tmp_path)
    by_budget = {s["budget"]: s for s in data["summary"]}
    assert by_budget[1000]["growth_mb"] == 0 and by_budget[5000]["growth_mb"] == pytest.approx(31.0)
    assert by_budget[5000]["kb_per_metric_call"] == pytest.approx(1024 * 31.0 / 4013)
    md = (tmp_path / "memory.md").read_text()
    assert "**Stopped early**" in md and "b=2000 (1800 calls" in md and "b=5000" not in md.split("**Stopped")[1]


def test_resume_reuses_only_cells_made_with_the_same_settings(bench: ModuleType, tmp_path: Path) -> None:
    """benchmarks/README.md:16-20: "`--resume` reuses every cell JSON already in `--out-dir/runs` that
    was made with the same settings (task, budget, seed, threads, time scale, split sizes) ... (a cell
    file made with other settings is run again and overwritten)" (run.py:561-574)."""
    cfg = {"mode": "grid", "optimizer": "turbo", "task": "routing", "budget": 60, "seed": 0, "threads": 16,
           "time_scale": 0.02, "n_train": 24, "n_val": 12, "n_test": 40, "out": str(tmp_path / "c.json")}
    Path(cfg["out"]).write_text(json.dumps({**cfg, "final_val": 0.5}))
    assert bench._load_cell(cfg)["final_val"] == 0.5
    for key, other in (("time_scale", 0.5), ("threads", 8), ("n_val", 40), ("n_test", 300)):
        assert bench._load_cell({**cfg, key: other}) is None, key


def test_gepa_cache_check_shows_5_of_8_wrong_with_the_cache(tmp_path: Path) -> None:
    """docs/benchmark.md:265-266: "`python benchmarks/gepa_cache_check.py` shows it: with the cache on,
    5 of 8 candidates' reported validation scores differ from a re-evaluation on the valset (0 of 8
    with it off)"."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gepa_cache_check.py")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("cache_evaluation=")]
    assert lines[0].startswith("cache_evaluation=False: 8 candidates; reported != re-evaluated validation score on 0:")
    assert lines[1].startswith("cache_evaluation=True: 8 candidates; reported != re-evaluated validation score on 5:")
