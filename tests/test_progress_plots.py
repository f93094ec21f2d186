"""Seeing the run: live progress (terminal bar / log lines), PNG plots, summary.json, serving example."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import logging
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.adapter.results import TurboGEPAResult
from dspy_turbogepa.engine.candidate import Candidate
from dspy_turbogepa.engine.frontier import ParetoFrontier, pareto_front_members
from dspy_turbogepa.engine.records import CandidateRecord, MutationPlan, MutationResult
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
from dspy_turbogepa.tracking.plots import plot_best_over_time, plot_lineage
from dspy_turbogepa.tracking.progress import (
    OrchestratorSource,
    ProgressDisplay,
    format_duration,
)
from dspy_turbogepa.tracking.summary import build_summary, write_summary

PROGRESS_LOGGER = "dspy_turbogepa.tracking.progress"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _a_known_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar fits the terminal's width, which a StringIO stream takes from the environment (COLUMNS,
    else the process's terminal): these tests read whole bars, so they must not depend on where they
    run (a runner with an 80-column terminal cut "retries 2" off)."""
    monkeypatch.setenv("COLUMNS", "100")


# ---------------------------------------------------------------------------------------- helpers
class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeSource:
    """A run of 3000 ticks (0.2 s apart): one metric call per tick, a new best every 60 ticks."""

    def __init__(self, budget: int = 3000) -> None:
        self.calls = 0
        self._budget = budget
        self.best_value = 0.2

    def metric_calls(self) -> int:
        return self.calls

    def budget(self) -> int:
        return self._budget

    def best(self) -> float:
        return self.best_value

    def frontier_size(self) -> int:
        return 4

    def evals_in_flight(self) -> int:
        return 16

    def mutations_running(self) -> int:
        return 5

    def backoffs(self) -> int:
        return 2


def drive(display: ProgressDisplay, source: FakeSource, clock: FakeClock, ticks: int, best_every: int = 60) -> None:
    for i in range(ticks):
        clock.t += 0.2
        source.calls += 1
        if best_every and i % best_every == 0:
            source.best_value += 0.01
        display.tick()


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]


def make_record(index: int, scores: dict[int, float], parents=(None,), kind="reflection",
                seconds: float = 0.0, calls: int = 0) -> CandidateRecord:
    cand = Candidate({"a": f"text {index}", "b": "b"}, kind="seed" if index == 0 else kind)
    return CandidateRecord(index, cand, list(parents), dict(scores), discovery_metric_calls=calls,
                           discovery_seconds=seconds)


def synthetic_records(n: int, seed: int = 0, n_val: int = 12, merges: bool = True) -> list[CandidateRecord]:
    rng = random.Random(seed)
    recs = [make_record(0, {v: float(rng.random() < 0.3) for v in range(n_val)}, kind="seed", seconds=0.4, calls=n_val)]
    t, calls = 0.4, n_val
    for i in range(1, n):
        t += rng.expovariate(1 / 2.0)
        calls += rng.randint(5, 40)
        if merges and i >= 4 and i % 7 == 0:
            parents, kind = sorted(rng.sample(range(i), 2)), "merge"
        else:
            parents, kind = [rng.randrange(i)], rng.choice(["reflection", "reflection", "reflection_all"])
        base = recs[parents[-1]].val_scores
        scores = {v: float(min(1.0, max(0.0, base[v] + (rng.random() < 0.2) - (rng.random() < 0.1))))
                  for v in range(n_val)}
        recs.append(make_record(i, scores, parents, kind, seconds=t, calls=calls))
    return recs


def mutation(status: str, rung_reached: int) -> MutationResult:
    plan = MutationPlan(seq=0, kind="reflection", parent=Candidate({"a": "x"}), parent_index=0, parent_val={},
                        minibatch=(), rng=random.Random(0), committed_at_launch=0, reservation=0)
    return MutationResult(plan=plan, status=status, rung_reached=rung_reached)  # type: ignore[arg-type]


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="dspy_turbogepa")
    return caplog


# ---------------------------------------------------------------------------------------- progress
def test_log_mode_emits_a_bounded_number_of_lines(info_logs: pytest.LogCaptureFixture) -> None:
    clock, source = FakeClock(), FakeSource()
    display = ProgressDisplay(source, interactive=False, clock=clock)
    drive(display, source, clock, ticks=3000)  # 10 simulated minutes, 50 new bests
    display.close(stop_reason="max_metric_calls")
    lines = progress_lines(info_logs)
    assert display.mode == "log"
    assert 50 <= len(lines) <= 130, len(lines)  # vs. 3000 ticks: no redraw storm in a log file
    assert lines[0].startswith("TurboGEPA: 1/3000 metric calls")
    assert sum("(new best)" in line for line in lines) >= 40
    last = lines[-1]
    assert last.startswith("TurboGEPA search ended (max_metric_calls): 3000/3000 metric calls (100%)")
    for part in ("best val 0.7", "frontier 4", "LM retries 2", "10m00s elapsed"):
        assert part in last, (part, last)
    mid = lines[len(lines) // 2]
    assert "in flight 16 evals / 5 mutations" in mid and "ETA" in mid


def test_elapsed_time_starts_when_the_display_is_bound_to_the_run(info_logs: pytest.LogCaptureFixture) -> None:
    """The display is built before MLflow is set up (a first import, a new database, a server that does
    not answer for 3 s): that time was shown as the search's, and the ETA and last line were off by it."""
    clock, source = FakeClock(), FakeSource()
    display = ProgressDisplay(interactive=False, clock=clock)
    clock.t += 30.0  # setting up the tracker
    display.bind(source)
    drive(display, source, clock, ticks=300)  # one simulated minute of search
    display.close(stop_reason="max_metric_calls")
    last = progress_lines(info_logs)[-1]
    assert "1m00s elapsed" in last, last


def test_what_the_compile_thread_prints_between_ticks_goes_around_the_bar(monkeypatch) -> None:
    """MLflow prints "View run ..." to stdout for each evaluation run autolog ends (replayed on the
    compile thread between ticks): it landed in the middle of the bar. With the bar shown it goes
    through tqdm.write, which clears the bar and draws it again below; without a bar, print is left alone."""
    import tqdm as tqdm_module

    written = []
    monkeypatch.setattr(tqdm_module.tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False:
                                                                written.append(s)))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # the bar's default stream
    clock, source = FakeClock(), FakeSource()
    display = ProgressDisplay(source, interactive=True, clock=clock)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    drive(display, source, clock, ticks=3)
    assert display.mode == "bar"
    with display.around_the_bar():
        print("View run eval_full_3 at: http://127.0.0.1:5000/#/experiments/1/runs/abc")
    assert "".join(written) == "View run eval_full_3 at: http://127.0.0.1:5000/#/experiments/1/runs/abc\n"
    assert sys.stdout is out and out.getvalue() == ""
    display.close(stop_reason="max_metric_calls")
    logs = ProgressDisplay(source, interactive=False, clock=clock)
    drive(logs, source, clock, ticks=3)
    with logs.around_the_bar():
        print("plain")
    assert out.getvalue() == "plain\n"


def test_a_run_past_its_budget_says_so(info_logs: pytest.LogCaptureFixture) -> None:
    """The last mutations may finish past max_metric_calls (as in dspy.GEPA): "142/120 (100%)" hid it."""
    clock, source = FakeClock(), FakeSource()
    source._budget = 120
    display = ProgressDisplay(source, interactive=False, clock=clock)
    drive(display, source, clock, ticks=142)
    display.close(stop_reason="max_metric_calls")
    last = progress_lines(info_logs)[-1]
    assert last.startswith("TurboGEPA search ended (max_metric_calls): 142/120 metric calls (118%)"), last
    out = io.StringIO()
    source.calls = 0
    bar = ProgressDisplay(source, interactive=True, stream=out, clock=clock)
    drive(bar, source, clock, ticks=142)
    bar.close(stop_reason="max_metric_calls")
    assert "120/120" in out.getvalue() and "142 metric calls, 22 past the budget" in out.getvalue()
    # why it stopped comes first on the final line: an 80-column terminal cut it off the end
    final = out.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert final.index("max_metric_calls") < final.index("past the budget") < final.index("best"), final


def test_log_mode_without_new_bests_slows_down(info_logs: pytest.LogCaptureFixture) -> None:
    clock, source = FakeClock(), FakeSource(budget=100_000)
    display = ProgressDisplay(source, interactive=False, clock=clock)
    drive(display, source, clock, ticks=18_000, best_every=0)  # one simulated hour
    lines = progress_lines(info_logs)
    assert len(lines) <= 130, len(lines)
    assert len(lines) >= 60


def test_log_mode_says_nothing_when_nothing_changes(info_logs: pytest.LogCaptureFixture) -> None:
    clock, source = FakeClock(), FakeSource()
    display = ProgressDisplay(source, interactive=False, clock=clock)
    drive(display, source, clock, ticks=10)

    def stall(seconds: float) -> int:
        for _ in range(int(seconds / 0.2)):
            clock.t += 0.2
            display.tick()
        return len(progress_lines(info_logs))

    n = stall(10)  # the last change gets its line
    assert stall(100) == n  # then a stalled run is quiet


def test_disabled_is_silent(info_logs: pytest.LogCaptureFixture) -> None:
    clock, source = FakeClock(), FakeSource()
    stream = io.StringIO()
    for interactive in (True, False):
        display = ProgressDisplay(source, enabled=False, interactive=interactive, stream=stream, clock=clock)
        drive(display, source, clock, ticks=100)
        display.close()
        assert display.mode is None
    assert stream.getvalue() == ""
    assert progress_lines(info_logs) == []


def test_silent_when_package_logger_is_above_info(caplog: pytest.LogCaptureFixture) -> None:
    pkg = logging.getLogger("dspy_turbogepa")
    old = pkg.level
    pkg.setLevel(logging.WARNING)
    try:
        clock, source = FakeClock(), FakeSource()
        for interactive in (True, False):
            stream = io.StringIO()
            display = ProgressDisplay(source, interactive=interactive, stream=stream, clock=clock)
            drive(display, source, clock, ticks=100)
            display.close()
            assert display.mode == "off"
            assert stream.getvalue() == ""
    finally:
        pkg.setLevel(old)
    assert progress_lines(caplog) == []


def test_tty_mode_draws_one_bar_with_throttled_redraws(info_logs: pytest.LogCaptureFixture) -> None:
    clock, source = FakeClock(), FakeSource(budget=300)
    stream = io.StringIO()
    display = ProgressDisplay(source, interactive=True, stream=stream, clock=clock, refresh_interval=0.5)
    drive(display, source, clock, ticks=300)  # 60 simulated seconds, a tick every 0.2 s
    display.close(stop_reason="max_metric_calls")
    out = stream.getvalue()
    assert display.mode == "bar"
    redraws = out.count("\r")
    assert 60 <= redraws <= 60 / 0.5 + 5, redraws
    frames = [f for f in out.split("\r") if f.strip()]
    assert "TurboGEPA" in frames[-1] and "300/300" in frames[-1] and "max_metric_calls" in frames[-1]
    mid = frames[len(frames) // 2]
    for part in ("best 0.", "ETA", "front 4", "flight 16e/5m", "retries 2"):
        assert part in mid, (part, mid)
    assert out.endswith("\n")  # the bar is left on screen, the cursor on a fresh line
    assert out.count("\n") == 1
    assert progress_lines(info_logs) == []  # no log lines on top of the bar


def test_log_lines_shown_over_the_bar_keep_each_console_handlers_level_and_filters(capsys) -> None:
    """Under the bar, log lines go through tqdm.write so they do not tear it; tqdm's own redirect
    replaced every console handler by one that kept the first one's stream and filters but no level:
    DEBUG lines flooded a console set to WARNING, and a WARNING meant for stderr was filtered out."""
    pkg = logging.getLogger("dspy_turbogepa")
    out = logging.StreamHandler(sys.stdout)
    out.setLevel(logging.INFO)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    out.setFormatter(logging.Formatter("OUT %(levelname)s %(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("ERR %(levelname)s %(message)s"))
    old_level = pkg.level
    pkg.setLevel(logging.DEBUG)
    pkg.addHandler(out)
    pkg.addHandler(err)
    try:
        clock, source = FakeClock(), FakeSource(budget=300)
        display = ProgressDisplay(source, interactive=True, clock=clock, refresh_interval=0.5)
        drive(display, source, clock, ticks=20)
        assert display.mode == "bar"
        for level in (logging.DEBUG, logging.INFO, logging.WARNING):
            logging.getLogger("dspy_turbogepa.engine").log(level, "line at %s", logging.getLevelName(level))
        drive(display, source, clock, ticks=20)
        display.close(stop_reason="max_metric_calls")
        assert out.stream is sys.stdout and err.stream is sys.stderr  # given back
    finally:
        pkg.removeHandler(out)
        pkg.removeHandler(err)
        pkg.setLevel(old_level)
    captured = capsys.readouterr()
    assert "OUT INFO line at INFO" in captured.out and "WARNING" not in captured.out
    assert "ERR WARNING line at WARNING" in captured.err and "line at INFO" not in captured.err
    assert "line at DEBUG" not in captured.out + captured.err


def test_hooks_feed_best_frontier_and_rung_funnel_without_a_source(info_logs: pytest.LogCaptureFixture) -> None:
    display = ProgressDisplay(interactive=False, clock=FakeClock())
    display.on_candidate(make_record(0, {0: 0.0, 1: 1.0, 2: 0.0}))
    display.on_candidate(make_record(1, {0: 1.0, 1: 0.0, 2: 0.0}, parents=[0]))
    display.on_candidate(make_record(2, {0: 1.0, 1: 1.0, 2: 0.0}, parents=[1]))  # dominates both
    for status, rung in [("rejected_rung0", 0), ("pruned", 1), ("accepted", 2), ("after_stop", 2),
                         ("accepted", 2), ("skipped_perfect", 0), ("no_proposal", 0)]:
        display.on_mutation(mutation(status, rung), status)
    for _ in range(7):
        display.on_evaluation(None, "val", None)  # type: ignore[arg-type]
    snap = display.snapshot()
    assert snap.best == pytest.approx(2 / 3)
    assert snap.frontier_size == 1  # 0 and 1 are each tied with 2 on every instance they lead
    assert snap.rung_funnel == (5, 4, 3)  # children on a minibatch > on shard 1 > on the full valset
    assert snap.candidates == 3
    assert snap.metric_calls == 7  # counted from on_evaluation when no source is bound
    display.tick()
    assert "children per rung 5 > 4 > 3" in progress_lines(info_logs)[-1]  # an after_stop child was validated


def test_a_duplicate_known_before_evaluation_is_not_a_scored_child() -> None:
    """The funnel's first number is "children scored on a minibatch": a proposal recognised as a known
    candidate before any evaluation cost nothing and scored nothing, so counting it would make the
    search look busier than it was; a duplicate found out after its minibatch (rung >= 1) was scored."""
    display = ProgressDisplay(interactive=False, clock=FakeClock())
    display.on_mutation(mutation("accepted", 1), "accepted")
    display.on_mutation(mutation("duplicate", 0), "duplicate")
    display.on_mutation(mutation("duplicate", 0), "duplicate")
    assert display.snapshot().rung_funnel == (1, 1)
    display.on_mutation(mutation("duplicate", 1), "duplicate")
    assert display.snapshot().rung_funnel == (2, 2)


def test_orchestrator_source_reads_public_state() -> None:
    records: list[CandidateRecord] = []
    orch = SimpleNamespace(
        records=records,
        budget=SimpleNamespace(executed=40, limit=500),
        in_flight=7,
        mutations_in_flight=lambda: 3,
        stats=SimpleNamespace(rate_limit_retries=4, replayed=10),  # stored evaluations replayed count too
    )
    src = OrchestratorSource(orch)
    assert src.best() is None and src.frontier_size() is None
    records.append(make_record(0, {0: 0.0, 1: 1.0}))
    records.append(make_record(1, {0: 1.0, 1: 0.0}, parents=[0]))
    assert (src.metric_calls(), src.budget(), src.evals_in_flight(), src.mutations_running(), src.backoffs()) == \
        (50, 500, 7, 3, 4)
    assert src.best() == 0.5 and src.frontier_size() == 2
    records.append(make_record(2, {0: 1.0, 1: 1.0}, parents=[1]))
    assert src.best() == 1.0 and src.frontier_size() == 1

    assert OrchestratorSource(orch, frontier_size=lambda: 9).frontier_size() == 9
    # the reflection LM's rate-limit retries are backoffs too
    assert OrchestratorSource(orch, extra_backoffs=lambda: 3).backoffs() == 7
    # ... and so are the evaluator's transient retries (5xx, timeouts): a server failing 4 requests in
    # 10 made a run nine times slower while the line said "rate-limit backoffs 0"
    from dspy_turbogepa.teleprompter import _other_retries

    assert _other_retries({"rate_limit_retries": 9, "transient_retries": 5},
                          {"rate_limit_retries": 2, "transient_retries": 1, "backoff_seconds": 3.5}) == 8


class PausableSource(FakeSource):
    """A run whose endpoints (``pause``) or reflections (``wait``) may be waiting out a rate limit."""

    pause = 0.0
    wait = 0.0
    in_flight = 16

    def paused_seconds(self) -> float:
        return self.pause

    def reflection_paused_seconds(self) -> float:
        return self.wait

    def evals_in_flight(self) -> int:
        return self.in_flight


def paused_run() -> tuple[FakeClock, PausableSource, ProgressDisplay]:
    """A logging display 20 s into a 1,000-call run at 5 calls/s (100 done), nothing paused yet."""
    clock, source = FakeClock(), PausableSource(budget=1000)
    display = ProgressDisplay(source, interactive=False, clock=clock)
    drive(display, source, clock, ticks=100)
    return clock, source, display


def assert_the_eta_counts_down_through_a_pause(attr: str) -> None:
    """Through a 68 s pause (``source.<attr>``), the ETA is what is left of the pause plus the calls left at
    the rate from before it: the idle time must not enter the rate (it drove 208 s to 10,474 s by the
    59th second, then blank); once calls move again, the window runs on real time, pause included."""
    clock, source, display = paused_run()
    source.in_flight = 0
    etas = []
    for tick in range(300):  # 60 s at 0.2 s
        setattr(source, attr, max(0.0, 68.0 - 0.2 * tick))
        clock.t += 0.2
        display.tick()
        etas.append(display.snapshot().eta_seconds)
    for tick in (0, 150, 295):
        assert etas[tick] == pytest.approx(68.0 - 0.2 * tick + 900 / 5, rel=0.03), (tick, etas[tick])
    setattr(source, attr, 0.0)
    source.in_flight = 16
    drive(display, source, clock, ticks=100)  # 20 s more at 5 calls/s, 100 s into the run: 100 calls in the
    # rate's window, the run's last half (50 s), 30 s of it paused
    assert display.snapshot().eta_seconds == pytest.approx(800 / (100 / 50), rel=0.05)
    drive(display, source, clock, ticks=200)  # the pause has left the window
    assert display.snapshot().eta_seconds == pytest.approx(600 / 5, rel=0.05)


def test_a_pause_that_keeps_coming_back_is_in_the_rate(info_logs: pytest.LogCaptureFixture) -> None:
    """A requests-per-minute cap: 60 calls in 10 s, then a 429 with a 50 s Retry-After, every minute. The
    throughput is 1 call/s, in a burst or in a pause; an ETA that left every pause out of the rate read 6
    calls/s and said 300 s where 1,800 s were left."""
    clock, source = FakeClock(), PausableSource(budget=3000)
    display = ProgressDisplay(source, interactive=False, clock=clock)
    source.in_flight = 0
    for minute in range(20):
        for _ in range(50):  # the burst: 60 calls in 10 s
            clock.t += 0.2
            source.calls += 1.2
            display.tick()
        if minute == 19:
            mid_burst = display.snapshot()
        for tick in range(250):  # the pause
            source.pause = 50.0 - 0.2 * tick
            clock.t += 0.2
            display.tick()
            if minute == 19 and tick == 125:
                mid_pause = display.snapshot()
        source.pause = 0.0
    left = 3000 - 20 * 60
    assert mid_burst.eta_seconds == pytest.approx(left, rel=0.25)
    assert mid_pause.eta_seconds == pytest.approx(25 + left, rel=0.25)


@pytest.mark.parametrize("attr", ["pause", "wait"], ids=["endpoint", "reflection"])
def test_the_eta_counts_down_through_a_pause(attr: str, info_logs: pytest.LogCaptureFixture) -> None:
    assert_the_eta_counts_down_through_a_pause(attr)


def test_a_rate_limit_pause_shows_on_the_line_and_delays_the_eta(info_logs: pytest.LogCaptureFixture) -> None:
    """While a 429's Retry-After pauses the endpoints nothing moves: the line must say so (a falling rate
    alone looks like a hang), the ETA must count the wait, and the closing line must not show it."""

    clock, source, display = paused_run()
    calm = display.snapshot()
    assert not calm.paused and "paused" not in calm.log_line() and not any("paused" in f for f in calm.fields())
    source.pause = 0.4  # shorter than a refresh: not worth a field
    assert not display.snapshot().paused
    source.pause = 42.0
    snap = display.snapshot()
    assert snap.eta_seconds == pytest.approx(42 + 900 / 5, rel=0.02)
    assert "paused 42s by a rate limit (Retry-After)" in snap.log_line()
    assert "paused 42s (429)" in snap.fields()
    # in logs: the pause starting is worth a line though no count moved (every rollout waits)
    assert_a_pause_starting_logs_a_line(display, source, clock, info_logs, "pause", 42.0, "paused")


def assert_a_pause_starting_logs_a_line(display: ProgressDisplay, source: FakeSource, clock: FakeClock,
                                        info_logs: pytest.LogCaptureFixture, attr: str, seconds: float,
                                        said: str) -> None:
    """With no count moving, a pause starting (``source.<attr> = seconds``) still gets a log line of its
    own, which says ``said``; the closing line does not."""
    setattr(source, attr, 0.0)
    clock.t += 120.0
    display.tick()  # a line with the counts as they are
    lines = len(progress_lines(info_logs))
    setattr(source, attr, seconds)
    clock.t += 120.0
    display.tick()
    assert len(progress_lines(info_logs)) == lines + 1 and said in progress_lines(info_logs)[-1]
    display.close()
    assert said not in progress_lines(info_logs)[-1]


def test_a_reflection_waiting_on_a_rate_limit_shows_on_the_line(info_logs: pytest.LogCaptureFixture) -> None:
    """A reflection waiting out the reflection LM's Retry-After holds the search while nothing moves; it
    must be said (apart from the endpoints' pause: evaluations may go on), start a log line of its own,
    count in the ETA only while nothing else runs ("ETA 3s" sat beside a 68 s wait in a live run), and
    stay off the closing line."""

    clock, source, display = paused_run()
    calm = display.snapshot()
    assert not calm.reflection_paused and "reflection" not in calm.log_line()
    source.wait = 0.5  # shorter than a refresh
    assert not display.snapshot().reflection_paused
    source.wait = 75.0
    snap = display.snapshot()
    assert snap.reflection_paused and not snap.paused
    assert "a reflection waits 1m15s on the reflection LM's rate limit" in snap.log_line()
    assert "reflect paused 1m15s (429)" in snap.fields()
    assert snap.eta_seconds == pytest.approx(900 / 5, rel=0.02)  # other mutations' evaluations go on
    source.in_flight = 0  # the search waits on the reflection
    assert display.snapshot().eta_seconds == pytest.approx(75 + 900 / 5, rel=0.02)
    assert_a_pause_starting_logs_a_line(display, source, clock, info_logs, "wait", 75.0, "reflection LM")


def test_rate_limit_waits_report_the_longest_left_and_only_while_running() -> None:
    from dspy_turbogepa.adapter.ratelimit import RateLimitWaits

    clock = FakeClock()
    waits = RateLimitWaits(clock=clock)
    assert waits.remaining() == 0.0
    with waits.waiting(30.0):
        clock.t += 5.0
        with waits.waiting(10.0):
            assert waits.remaining() == pytest.approx(25.0)
        with waits.waiting(40.0):
            assert waits.remaining() == pytest.approx(40.0)
        assert waits.remaining() == pytest.approx(25.0)
        clock.t += 40.0
        assert waits.remaining() == 0.0  # overdue (a wait that ran long): nothing left to show
    assert waits.remaining() == 0.0
    with pytest.raises(RuntimeError), waits.waiting(20.0):
        raise RuntimeError("the waiter failed")
    assert waits.remaining() == 0.0


def test_the_pause_shown_is_the_longest_retry_after_left_on_an_endpoint() -> None:
    """Read from the evaluator's AIMD windows, as the teleprompter wires it."""
    import asyncio

    from dspy_turbogepa.engine.aimd import AimdRegistry
    from dspy_turbogepa.teleprompter import _pause_left

    clock = FakeClock()
    windows = AimdRegistry(4, clock=clock)
    assert _pause_left({"endpoints": windows.stats()}) == 0.0 and _pause_left({}) == 0.0

    async def limited(key: str, retry_after: float) -> None:
        tickets = await windows.acquire_all([key])
        windows.release_all(tickets, "rate_limited", retry_after)

    asyncio.run(limited("openai/a@http://127.0.0.1:1/v1", 30.0))
    asyncio.run(limited("openai/b@http://127.0.0.1:2/v1", 12.0))
    clock.t += 5.0
    assert _pause_left({"endpoints": windows.stats()}) == pytest.approx(25.0)
    clock.t += 30.0
    assert _pause_left({"endpoints": windows.stats()}) == 0.0


def _tiny_routing_compile() -> None:
    """A 30-call compile of the routing task (2 threads): enough for the wiring tests to see a run."""
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=8, n_val=6, n_test=0)
    opt = TurboGEPA(task.metric, max_metric_calls=30, reflection_lm=make_reflection_lm(seed=0), num_threads=2)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)


def test_compile_wires_the_rate_limit_pause_into_the_progress_source(monkeypatch) -> None:
    """Without the wiring the source says "unknown" (None) and the line never shows a pause."""
    import dspy_turbogepa.teleprompter as teleprompter_module

    bound: list[OrchestratorSource] = []

    class Recorded(OrchestratorSource):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            bound.append(self)

    monkeypatch.setattr(teleprompter_module, "OrchestratorSource", Recorded)
    _tiny_routing_compile()
    assert len(bound) == 1 and bound[0].paused_seconds() == 0.0
    assert bound[0].reflection_paused_seconds() == 0.0


def test_compile_starts_the_progress_clock_when_the_search_starts(monkeypatch, info_logs) -> None:
    """The display is built before the run's other parts (MLflow's setup among them: an import, a new
    database, a server that does not answer for seconds); compile binds it when the search starts, and
    the elapsed time counts from there. Here building the engine takes 1,000 s of a shifted clock."""
    import time as time_module

    import dspy_turbogepa.teleprompter as teleprompter_module

    shift = [0.0]

    def clock() -> float:
        return time_module.monotonic() + shift[0]

    class Display(ProgressDisplay):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, clock=clock, interactive=False, **kwargs)

    class SlowToBuild(teleprompter_module.Orchestrator):
        def __init__(self, *args, **kwargs) -> None:
            shift[0] += 1000.0
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(teleprompter_module, "ProgressDisplay", Display)
    monkeypatch.setattr(teleprompter_module, "Orchestrator", SlowToBuild)
    _tiny_routing_compile()
    last = progress_lines(info_logs)[-1]
    assert "elapsed" in last and "16m" not in last, last


def test_eta_follows_the_metric_call_rate_and_the_time_budget(info_logs: pytest.LogCaptureFixture) -> None:
    clock, source = FakeClock(), FakeSource(budget=1000)
    display = ProgressDisplay(source, interactive=False, clock=clock)
    drive(display, source, clock, ticks=100)  # 5 calls/s, 100 done
    assert display.snapshot().eta_seconds == pytest.approx(900 / 5, rel=0.02)
    limited = ProgressDisplay(source, interactive=False, clock=clock, time_budget_seconds=30)
    drive(limited, source, clock, ticks=50)  # 10 s into a 30 s budget
    assert limited.snapshot().eta_seconds == pytest.approx(20, abs=0.5)
    assert format_duration(42) == "42s" and format_duration(185) == "3m05s" and format_duration(3720) == "1h02m"


class SpendingSource(FakeSource):
    """FakeSource that also reports what the run spent: 120 tokens and $0.0006 per metric call."""

    def tokens(self) -> int:
        return 120 * self.calls

    def cost_usd(self) -> float:
        return 0.0006 * self.calls


def test_the_line_and_the_bar_show_tokens_and_dollars_against_their_caps(info_logs) -> None:
    clock, source = FakeClock(), SpendingSource(budget=1000)
    capped = ProgressDisplay(source, interactive=False, clock=clock, token_budget=50_000, cost_budget_usd=1.0)
    drive(capped, source, clock, ticks=100)  # 100 calls: 12,000 tokens, $0.06
    snap = capped.snapshot()
    assert "12,000/50,000 tokens (24%)" in snap.log_line() and "$0.0600/$1.00 (6%)" in snap.log_line()
    fields = snap.fields()
    # a cap may end the run: shown right after the ETA, before what a narrow terminal cuts
    assert fields[2:4] == ["tok 12k/50k (24%)", "$0.0600/$1.00 (6%)"], fields
    uncapped = ProgressDisplay(source, interactive=False, clock=clock).snapshot()
    assert uncapped.fields()[-2:] == ["tok 12k", "$0.0600"]
    assert "12,000 tokens" in uncapped.log_line() and "$0.0600 spent" in uncapped.log_line()


def test_usage_is_left_out_when_nothing_is_counted_and_no_cap_is_set(info_logs) -> None:
    """An LM that reports no usage (or no price) would show "tok 0" and "$0.00" on every line."""
    clock, source = FakeClock(), FakeSource()
    source.tokens = lambda: 0  # type: ignore[attr-defined]
    source.cost_usd = lambda: 0.0  # type: ignore[attr-defined]
    display = ProgressDisplay(source, interactive=False, clock=clock)
    drive(display, source, clock, ticks=10)
    snap = display.snapshot()
    assert not any("tok" in f or "$" in f for f in snap.fields()) and "token" not in snap.log_line()
    capped = ProgressDisplay(source, interactive=False, clock=clock, token_budget=5000).snapshot()
    assert "tok 0/5k (0%)" in capped.fields() and "$" not in capped.log_line()


def test_the_eta_is_the_soonest_of_the_budget_and_the_caps(info_logs) -> None:
    """A token cap ends the run before the metric-call budget: the ETA that counts the budget alone
    promised minutes the run would never take."""
    clock, source = FakeClock(), SpendingSource(budget=1000)
    display = ProgressDisplay(source, interactive=False, clock=clock, token_budget=24_000)
    drive(display, source, clock, ticks=100)  # 5 calls/s = 600 tokens/s; 12,000 of 24,000 tokens used
    assert display.snapshot().eta_seconds == pytest.approx(12_000 / 600, rel=0.02)
    dollars = ProgressDisplay(source, interactive=False, clock=clock, cost_budget_usd=0.15)
    drive(dollars, source, clock, ticks=100)  # $0.12 of $0.15 used at $0.003/s
    assert dollars.snapshot().eta_seconds == pytest.approx(0.03 / 0.003, rel=0.02)
    plain = ProgressDisplay(source, interactive=False, clock=clock)
    drive(plain, source, clock, ticks=100)  # 300 calls of 1000 at 5/s
    assert plain.snapshot().eta_seconds == pytest.approx(700 / 5, rel=0.02)


def test_a_token_capped_compile_shows_the_runs_tokens_against_the_cap(info_logs, tmp_path) -> None:
    """Wiring: the closing progress line of a compile that a token cap stopped shows the tokens the run
    counted (run_stats) against the cap."""
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=12, n_val=6, n_test=0)
    opt = TurboGEPA(task.metric, max_metric_calls=400, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    token_budget=6000, track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        dr = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val).detailed_results
    assert dr.stop_reason == "token_budget"
    rs = dr.run_stats
    tokens = sum(rs["task_tokens"].values()) + sum(rs["reflection_tokens"].values())
    ended = [line for line in progress_lines(info_logs) if "search ended" in line]
    assert len(ended) == 1 and f"{tokens:,}/6,000 tokens" in ended[0], ended


def _dominated_by_restarting_loop(fronts, aggregates) -> set[int]:
    """gepa's rule as the engine once ran it: weakest first, restart after every drop (quadratic); equal
    aggregates in order of first appearance on the fronts (val-id order, each front ascending), as gepa's
    remove_dominated_programs orders them."""
    fronts = {vid: set(f) for vid, f in sorted(fronts.items()) if f}
    seen = list(dict.fromkeys(p for f in fronts.values() for p in sorted(f)))
    programs = sorted(seen, key=lambda p: aggregates[p])
    dominated: set[int] = set()
    changed = True
    while changed:
        changed = False
        for p in programs:
            if p in dominated:
                continue
            alive = set(programs) - dominated - {p}
            own = [f for f in fronts.values() if p in f]
            if own and all(f & alive for f in own):
                dominated.add(p)
                changed = True
                break
    return set(programs) - dominated


def test_the_one_pass_frontier_equals_the_restarting_loop() -> None:
    """One definition of the frontier serves parent selection, progress, summary, plots and MLflow."""
    for trial in range(300):
        rng = random.Random(trial)
        n_val, n = rng.randint(1, 10), rng.randint(1, 20)
        frontier = ParetoFrontier(range(n_val))
        for i in range(n):
            frontier.add(i, {v: rng.choice([0.0, 0.5, 1.0]) for v in range(n_val)})
        aggregates = {i: frontier.aggregate(i) for i in range(n)}
        expected = _dominated_by_restarting_loop(frontier.fronts(), aggregates)
        assert pareto_front_members(frontier.fronts(), aggregates) == expected
        assert set().union(*frontier.non_dominated().values()) == expected


# ---------------------------------------------------------------------------------------- plots
def assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


@pytest.mark.parametrize("n", [1, 8, 45])
def test_plots_from_records(tmp_path: Path, n: int) -> None:
    records = synthetic_records(n)
    fronts = {v: {i for i, r in enumerate(records) if r.val_scores[v] == max(x.val_scores[v] for x in records)}
              for v in range(12)}
    assert_png(plot_best_over_time(records, tmp_path / "best.png", total_seconds=records[-1].discovery_seconds + 3,
                                   total_metric_calls=records[-1].discovery_metric_calls + 20, budget=2000))
    assert_png(plot_lineage(records, fronts, tmp_path / "lineage.png"))
    assert_png(plot_lineage(records, None, tmp_path / "lineage_computed.png"))  # frontier from the scores


def test_lineage_with_merges_of_two_parents(tmp_path: Path) -> None:
    records = synthetic_records(30, seed=3)
    merges = [r for r in records if r.candidate.kind == "merge"]
    assert merges and all(len(r.parent_indices) == 2 for r in merges)
    out = plot_lineage(records, {0, 5, 12}, tmp_path / "deep" / "lineage.png")  # a member set works too
    assert_png(out)
    # the engine's result object works as well
    result = SimpleNamespace(records=records, fronts={0: {1}}, wall_seconds=80.0, total_metric_calls=900)
    assert_png(plot_best_over_time(result, tmp_path / "best.png"))


def test_a_plot_cut_short_leaves_the_previous_file_not_a_truncated_one(tmp_path: Path, monkeypatch) -> None:
    """A full disk left a 0-byte best_over_time.png that MLflow then uploaded: plots are written to a
    temporary file and renamed, as summary.json is."""
    from matplotlib.figure import Figure

    records = synthetic_records(5)
    target = tmp_path / "best.png"
    assert_png(plot_best_over_time(records, target))
    before = target.read_bytes()

    def disk_full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space"):
        plot_best_over_time(records, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.png"]


def test_only_this_sessions_reports_are_uploaded(compiled_routing, tmp_path: Path, monkeypatch) -> None:
    """A resumed session that could not draw its plots uploaded the earlier session's plots (2 candidates)
    as this run's, beside its own candidates (6)."""
    import dspy_turbogepa.tracking.plots as plots

    (tmp_path / "lineage.svg").write_bytes(b"an earlier session's plot")
    opt = TurboGEPA(TASKS["routing"].metric, max_metric_calls=200, reflection_lm=make_reflection_lm(seed=0),
                    log_dir=str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("cannot draw")

    monkeypatch.setattr(plots, "plot_lineage", broken)
    dr = compiled_routing.detailed_results
    result = SimpleNamespace(records=synthetic_records(6), fronts=None, wall_seconds=3.0, total_metric_calls=200)
    written = opt._write_reports(dr, result, 200)
    assert sorted(p.name for p in written) == ["best_over_time.svg", "summary.json"]
    assert (tmp_path / "lineage.svg").read_bytes() == b"an earlier session's plot"  # left, not uploaded


def test_plot_module_imports_matplotlib_lazily() -> None:
    code = ("import sys, dspy_turbogepa.tracking.plots, dspy_turbogepa.tracking.progress, "
            "dspy_turbogepa.tracking.summary; print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_plots_leave_the_users_matplotlib_alone(tmp_path: Path) -> None:
    """A compile in a notebook draws its plots: the user's backend, pyplot's open figures and whether
    pyplot is loaded at all must be as they were (matplotlib.use("Agg") used to switch the backend)."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import matplotlib
from test_progress_plots import synthetic_records
from dspy_turbogepa.tracking.plots import plot_best_over_time, plot_lineage
records = synthetic_records(12)
plot_best_over_time(records, {str(tmp_path / "a.png")!r})
print("pyplot loaded:", "matplotlib.pyplot" in sys.modules)
matplotlib.use("pdf")
import matplotlib.pyplot as plt
plt.figure()
plot_lineage(records, None, {str(tmp_path / "b.png")!r})
print("backend:", matplotlib.get_backend(), "figures:", plt.get_fignums())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["pyplot loaded: False", "backend: pdf figures: [1]"]
    assert_png(tmp_path / "a.png")
    assert_png(tmp_path / "b.png")


@pytest.fixture(scope="module")
def compiled_routing():
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=30, n_val=16, n_test=0)
    opt = TurboGEPA(task.metric, max_metric_calls=200, reflection_lm=make_reflection_lm(seed=0), num_threads=8,
                    track_stats=True, track_best_outputs=True, seed=0)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        return opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)


def test_plots_from_detailed_results(compiled_routing, tmp_path: Path) -> None:
    dr = compiled_routing.detailed_results
    assert_png(plot_best_over_time(dr, tmp_path / "best.png", budget=200))
    assert_png(plot_lineage(dr, None, tmp_path / "lineage.png"))


# ---------------------------------------------------------------------------------------- summary
SECRET = "sk-proj-TESTonlyAbCdEf0123456789xyzXYZ"


def strict_loads(text: str):
    def refuse(name: str):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_summary_of_a_real_run_is_strict_json_without_secrets(compiled_routing, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MY_PROVIDER_API_KEY", SECRET)
    dr = compiled_routing.detailed_results
    extra = {
        "timings": {"wall_seconds": 3.25, "compile_seconds": float("nan")},
        "budgets": {"max_metric_calls": 200, "time_budget_seconds": None, "cost_budget_usd": float("inf")},
        "config": {"reflection_lm": {"model": "openai/gpt-x", "api_key": SECRET}, "num_threads": 8},
        "note": f"called with key {SECRET}",
        "val_ids": {3, 1, 2},
    }
    path = write_summary(tmp_path / "logs", dr, extra)
    assert path == tmp_path / "logs" / "summary.json"
    text = path.read_text(encoding="utf-8")
    data = strict_loads(text)
    assert SECRET not in text and "TESTonly" not in text
    assert data["config"]["reflection_lm"]["api_key"] == "***REDACTED***"
    assert data["config"]["reflection_lm"]["model"] == "openai/gpt-x"
    for key in ("schema", "stop_reason", "best", "counts", "timings", "budgets", "result"):
        assert key in data, key
    assert data["stop_reason"] == dr.stop_reason
    assert data["timings"]["wall_seconds"] == 3.25 and data["timings"]["compile_seconds"] is None
    assert "best_found_seconds" in data["timings"]
    assert data["budgets"] == {"metric_calls_used": dr.total_metric_calls, "max_metric_calls": 200,
                               "time_budget_seconds": None, "cost_budget_usd": None}
    assert data["val_ids"] == [1, 2, 3]
    assert data["best"]["index"] == dr.best_idx
    assert data["best"]["val_score"] == dr.val_aggregate_scores[dr.best_idx]
    assert data["best"]["instructions"] == {
        name: p.signature.instructions for name, p in compiled_routing.named_predictors()}
    assert data["counts"]["candidates"] == len(dr.candidates)
    assert data["counts"]["total_metric_calls"] == dr.total_metric_calls
    assert data["result"]["candidates"] == dr.to_dict()["candidates"]  # candidates as texts
    assert data["result"]["run_stats"]["mutations"] == dr.run_stats["mutations"]
    assert data["result"]["best_outputs_valset"]  # predictions became plain dicts
    assert not list(tmp_path.glob("logs/.summary.*"))  # no temp file left behind
    # created with the process umask, like the store and the PNGs beside it
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "logs" / "summary.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_summary_converts_non_finite_numbers_and_odd_types(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SOME_SERVICE_TOKEN", SECRET)
    task = TASKS["routing"]
    dr = TurboGEPAResult(
        candidates=[task.make_program(), task.make_program({"route": f"Route it. token={SECRET}"})],
        parents=[[None], [0]],
        val_aggregate_scores=[0.25, 0.5],
        val_subscores=[{0: 0.0, 1: 0.5}, {0: float("nan"), 1: 1.0}],
        per_val_instance_best_candidates={0: {0, 1}, 1: {1}},
        discovery_eval_counts=[0, 12],
        best_outputs_valset={0: [(1, dspy.Prediction(queue="billing"))]},
        total_metric_calls=40,
        num_full_val_evals=2,
        discovery_seconds=[0.1, math.inf],
        candidate_kinds=["seed", "reflection"],
        stop_reason="max_metric_calls",
        run_stats={"mutations": {"accepted": 1}},
    )
    data = strict_loads(write_summary(tmp_path, dr, {"path": tmp_path, "pair": (1, 2)}).read_text())
    assert SECRET not in json.dumps(data)
    assert data["result"]["val_subscores"][1] == {"0": None, "1": 1.0}
    assert data["result"]["best_outputs_valset"] == {"0": [[1, {"queue": "billing"}]]}
    assert data["best"]["discovered_at_seconds"] is None
    assert data["counts"]["pareto_frontier"] == 1
    assert data["path"] == str(tmp_path) and data["pair"] == [1, 2]
    assert build_summary(None, {"x": 1})["x"] == 1


def test_summary_numbers_name_the_best_candidate_and_the_seed(tmp_path: Path, monkeypatch) -> None:
    """The numbers a user reads first in summary.json: the seed's score next to the best's (the gain),
    when the last candidate was found (not the best's time), and no secret in any key of the result
    (an endpoint name with a key in its query string, as rate-limit stats are keyed)."""
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", SECRET)
    task = TASKS["routing"]
    dr = TurboGEPAResult(
        candidates=[task.make_program(), task.make_program({"route": "Route it."}),
                    task.make_program({"route": "Route it well."})],
        parents=[[None], [0], [1]],
        val_aggregate_scores=[0.25, 0.75, 0.5],
        val_subscores=[{0: 0.0, 1: 0.5}, {0: 1.0, 1: 0.5}, {0: 0.5, 1: 0.5}],
        per_val_instance_best_candidates={0: {1}, 1: {0, 1, 2}},
        discovery_eval_counts=[0, 12, 30],
        total_metric_calls=40,
        num_full_val_evals=3,
        discovery_seconds=[0.5, 2.0, 7.5],
        candidate_kinds=["seed", "reflection", "reflection"],
        stop_reason="max_metric_calls",
        run_stats={"rate_limits": {"endpoints": {f"openai/x@https://h.example/v1?key={SECRET}": {"window": 3}}}},
    )
    summary = build_summary(dr)
    assert summary["best"]["index"] == 1 and summary["best"]["val_score"] == 0.75
    assert summary["best"]["seed_val_score"] == 0.25
    assert summary["best"]["discovered_at_seconds"] == 2.0 and summary["best"]["discovered_at_metric_calls"] == 12
    assert summary["timings"] == {"best_found_seconds": 2.0, "last_candidate_seconds": 7.5}
    assert summary["counts"]["pareto_frontier"] == 1
    assert SECRET not in json.dumps(summary)
    (endpoint,) = summary["result"]["run_stats"]["rate_limits"]["endpoints"]
    assert endpoint.startswith("openai/x@https://h.example/v1")


# ---------------------------------------------------------------------------------------- serving example
def load_example():
    spec = importlib.util.spec_from_file_location("serve_optimized", ROOT / "examples" / "serve_optimized.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.mark.http
def test_serve_optimized_example_runs_small(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example()
    global_lm = dspy.settings.lm
    args = ["--requests", "16", "--concurrency", "8", "--budget", "80", "--threads", "8", "--time-scale", "0.05"]
    assert example.main(args) == 0
    out = capsys.readouterr().out
    assert "optimized program: 16 requests" in out and "req/s" in out and "accuracy" in out
    saved = Path(out.split("saved to ")[1].split()[0])
    state = json.loads(saved.read_text())
    assert all("signature" in state[name] for name in TASKS["routing"].predictor_names)

    # serving a saved program skips the optimization step and answers the same way
    again = example.run(["--program", str(saved), "--requests", "16", "--time-scale", "0.05"])
    assert "optimized in" not in capsys.readouterr().out
    assert again["optimized"]["failures"] == 0
    assert dspy.settings.lm is global_lm  # nothing global was configured


_UNCONFIGURED = """
import os, sys, logging, threading, time
sys.path.insert(0, sys.argv[1])
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import dspy
from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
task = TASKS["routing"]
train, val, _ = task.splits(data_seed=0, n_train=12, n_val=8, n_test=0)
mode = sys.argv[3] if len(sys.argv) > 3 else "plain"
if mode == "child":  # the user's own handler, on a sub-logger only
    mine = logging.StreamHandler(sys.stdout)
    mine.setFormatter(logging.Formatter("USER %(message)s"))
    logging.getLogger("dspy_turbogepa.engine").addHandler(mine)
if mode == "disable":
    dspy.disable_logging()

def compile_once(budget, delay=0.0):
    time.sleep(delay)
    opt = TurboGEPA(task.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    verbose=sys.argv[2] == "1")
    with dspy.context(lm=make_student_lm(seed=0)):
        opt.compile(task.make_program(), trainset=train, valset=val)

if mode == "threads":  # a short compile ends while a longer one, started later, still runs
    threads = [threading.Thread(target=compile_once, args=(40,)),
               threading.Thread(target=compile_once, args=(90, 0.05))]
    for t in threads: t.start()
    for t in threads: t.join()
else:
    compile_once(40)
log = logging.getLogger("dspy_turbogepa")
print("after:", len(log.handlers), log.level)
"""


@pytest.mark.parametrize("verbose", [True, False])
def test_a_process_that_never_set_up_logging_sees_the_progress_and_the_result(tmp_path, verbose: bool) -> None:
    """dspy.GEPA's progress reaches a plain script's stderr (dspy gives its logger a handler at import);
    ours lives under another logger, where an unconfigured process shows warnings only: a run under
    nohup or CI printed nothing at all, not even its result. verbose=False keeps it quiet."""
    script = tmp_path / "run.py"
    script.write_text(_UNCONFIGURED)
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, str(script), root, "1" if verbose else "0"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    finished = [line for line in done.stderr.splitlines() if "TurboGEPA finished (" in line]
    if verbose:
        assert finished and "INFO dspy_turbogepa" in finished[-1], done.stderr
    else:
        assert not finished, done.stderr
    assert "after: 0 0" in done.stdout  # the handler was the compile's only


@pytest.mark.parametrize("mode", ["threads", "child", "disable"])
def test_the_compile_log_handler_respects_concurrent_compiles_and_the_users_setup(tmp_path, mode: str) -> None:
    """Two compiles at once: the first to end removed the handler and the second went silent. A user's
    handler on a sub-logger, or dspy.disable_logging(), is a setup of theirs: no handler of ours (lines
    came twice, or printed despite the silence asked for)."""
    script = tmp_path / "run.py"
    script.write_text(_UNCONFIGURED)
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, str(script), root, "1", mode], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    # "[#1] " names the compile while two share the handler
    ours = [line for line in done.stderr.splitlines()
            if "INFO dspy_turbogepa.teleprompter: " in line and "TurboGEPA finished (" in line]
    if mode == "threads":
        assert len(ours) == 2, done.stderr  # each compile's result, once
    else:
        assert not ours, done.stderr
    assert "INFO dspy_turbogepa" not in done.stderr or mode == "threads"  # no handler of ours beside theirs
    assert "after: 0 0" in done.stdout


def test_dspys_own_log_lines_go_through_the_bar_and_its_silence_holds() -> None:
    """dspy's handler writes to its own stream (stderr at write time), which was not seen as a console:
    its warnings were glued to the end of the bar line."""
    from dspy.utils.logging_utils import DSPY_LOGGING_STREAM

    from dspy_turbogepa.tracking.console_logs import _is_console_handler, _TqdmStream

    assert _is_console_handler(logging.StreamHandler(DSPY_LOGGING_STREAM))
    assert not _is_console_handler(logging.StreamHandler(io.StringIO()))
    captured = io.StringIO()
    real = sys.stderr
    try:
        sys.stderr = captured
        _TqdmStream(DSPY_LOGGING_STREAM).write("shown\n")
        dspy.disable_logging()
        _TqdmStream(DSPY_LOGGING_STREAM).write("silenced\n")
    finally:
        dspy.enable_logging()
        sys.stderr = real
    assert "shown" in captured.getvalue() and "silenced" not in captured.getvalue()


def test_failed_evaluations_show_on_the_progress_lines(caplog):
    """A run where the metric raises on some examples looked healthy on every progress line (one warning
    per failure kind, the counts only in the teleprompter's final line): the lines and the bar now count
    the failed evaluations."""
    from helpers import quick_compile

    task = TASKS["routing"]
    bad = set()

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if len(bad) < 3 or gold.ticket in bad:
            bad.add(gold.ticket)
            raise ValueError("judge could not parse the gold label")
        return task.metric(gold, pred, trace, pred_name, pred_trace)

    caplog.set_level(logging.INFO, logger="dspy_turbogepa")
    optimized = quick_compile(metric=metric, budget=60, verbose=True)
    failed = sum(optimized.detailed_results.run_stats["failures"].values())
    assert failed >= 3
    lines = [r.getMessage() for r in caplog.records if r.name == "dspy_turbogepa.tracking.progress"]
    ended = [line for line in lines if line.startswith("TurboGEPA search ended")]
    calls = optimized.detailed_results.total_metric_calls
    assert len(ended) == 1 and f" metric calls ({100 * calls / 60:.0f}%), {failed} failed " in ended[0], ended
    from dspy_turbogepa.tracking.progress import ProgressSnapshot

    snap = ProgressSnapshot(elapsed=3.0, metric_calls=40, budget=60, best=0.5, frontier_size=1, candidates=2,
                            evals_in_flight=0, mutations_running=0, rung_funnel=(), backoffs=0, eta_seconds=None,
                            failed=10)
    assert "40/60 metric calls (67%), 10 failed (25%), 3s elapsed" in snap.log_line()
    assert "failed 10" in snap.fields()
    calm = dataclasses.replace(snap, failed=0)
    assert "failed" not in calm.log_line() and not any("failed" in f for f in calm.fields())


def test_the_eta_rate_leaves_out_the_first_half_of_a_short_run():
    """A search's throughput falls as it goes (the seed's full-valset waves, then minibatches that wait on
    reflections): a 60 s window over a 40 s run kept the first burst in the rate, and the ETA was a third
    short throughout (a review: "ETA 35s" with 113 s left). The rate is that of the run's last half."""
    clock, source = FakeClock(), PausableSource(budget=2000)
    display = ProgressDisplay(source, interactive=False, clock=clock)
    for i in range(200):  # 10 s at 5 calls/s (0.2 s a tick), then 30 s at 2.5 calls/s
        clock.t += 0.2
        source.calls += 1 if i < 50 else i % 2
        display.snapshot()  # what each tick reads when it logs
    left = 2000 - source.calls
    assert display.snapshot().eta_seconds == pytest.approx(left / 2.5, rel=0.05)  # not left / (125 / 40)
    # a run's first seconds: the window is never under MIN_ETA_WINDOW_S
    early_clock, early_source = FakeClock(), PausableSource(budget=2000)
    early = ProgressDisplay(early_source, interactive=False, clock=early_clock)
    for _ in range(30):
        early_clock.t += 0.2
        early_source.calls += 1
        early.snapshot()
    assert early.snapshot().eta_seconds == pytest.approx((2000 - 30) / 5, rel=0.05)
