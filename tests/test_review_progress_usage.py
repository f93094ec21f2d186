"""Review of the progress display's token / dollar usage and the ETA over the caps (commits 4747d45,
97d963e): formatting, resumed and capped runs, rate-limit pauses, the tqdm bar, custom sources.

Fake clocks wherever timing matters; compiles run on the in-process fake LMs (and the loopback simulator
for litellm's prices).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import re
import threading
from types import SimpleNamespace

import dspy
import pytest
from test_progress_plots import FakeClock, FakeSource

import dspy_turbogepa.teleprompter as teleprompter
from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.engine.records import RunStats
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
from dspy_turbogepa.tracking.progress import (
    OrchestratorSource,
    ProgressDisplay,
    ProgressSnapshot,
    _money,
    _short_count,
)

PROGRESS_LOGGER = "dspy_turbogepa.tracking.progress"


# ---------------------------------------------------------------------------------------- helpers
class Source(FakeSource):
    """A custom progress source: metric calls, tokens and dollars the test sets (no usage methods unless
    ``usage``), optional rate-limit pause, a fixed best score."""

    def __init__(self, budget: int = 1000) -> None:
        super().__init__(budget)
        self.tok = 0
        self.usd = 0.0
        self.pause = 0.0

    def best(self) -> float:
        return 0.8123

    def paused_seconds(self) -> float:
        return self.pause


class SpendingSource(Source):
    def tokens(self) -> int:
        return self.tok

    def cost_usd(self) -> float:
        return self.usd


def _snap(**kw) -> ProgressSnapshot:
    base = {"elapsed": 10.0, "metric_calls": 50, "budget": 1000, "best": None, "frontier_size": None,
            "candidates": 3, "evals_in_flight": None, "mutations_running": None, "rung_funnel": (),
            "backoffs": None, "eta_seconds": None}
    return ProgressSnapshot(**{**base, **kw})


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]


def _last_bar_line(stream: io.StringIO) -> str:
    return stream.getvalue().split("\r")[-1].strip()


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="dspy_turbogepa")
    return caplog


@pytest.fixture
def routing_splits():
    return TASKS["routing"].splits(data_seed=0, n_train=12, n_val=6, n_test=0)


def _compile(splits, *, verbose: bool = True, log_dir=None, **kw):
    task = TASKS["routing"]
    kw.setdefault("max_metric_calls", 400)
    opt = TurboGEPA(task.metric, reflection_lm=make_reflection_lm(seed=0), num_threads=4, track_stats=True,
                    verbose=verbose, log_dir=str(log_dir) if log_dir else None, **kw)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        return opt.compile(task.make_program(), trainset=splits.train, valset=splits.val).detailed_results


def _run_tokens(dr) -> int:
    rs = dr.run_stats
    return sum(rs["task_tokens"].values()) + sum(rs["reflection_tokens"].values())


def _shown_tokens(line: str) -> int:
    return int(re.search(r"([\d,]+)(?:/[\d,]+)? tokens", line).group(1).replace(",", ""))


# ---------------------------------------------------------------------------------------- formatting
def test_short_counts_and_money_as_documented() -> None:
    assert [_short_count(n) for n in (0, 950, 999, 1000, 12_345, 99_949, 999_499)] == \
        ["0", "950", "999", "1k", "12.3k", "99.9k", "999k"]
    # the k/M seam: 999,500 and up would read "1e+03k" with .3g, and is shown as 1M instead
    assert [_short_count(n) for n in (999_500, 999_999, 1_000_000, 4_560_000, 999_499_999)] == \
        ["1M", "1M", "1M", "4.56M", "999M"]
    assert [_money(v) for v in (0, 0.0999, 0.1, 0.42, 12.34)] == ["$0.00", "$0.0999", "$0.10", "$0.42", "$12.34"]


def test_a_billion_tokens_are_not_shown_in_scientific_notation() -> None:
    for n in (999_500_000, 1_234_567_890, 2_000_000_000):
        assert "e+" not in _short_count(n), _short_count(n)
    capped = _snap(tokens=1_234_567_890, token_budget=2_000_000_000).fields()
    assert not any("e+" in f for f in capped), capped


def test_a_tiny_nonzero_spend_is_not_shown_as_zero_dollars() -> None:
    assert _money(0.00004) != "$0.0000"
    fields = _snap(cost_usd=0.00004).fields()  # e.g. one 250-token gpt-4o-mini call
    assert "$0.0000" not in fields, fields


def test_a_cap_of_one_token_and_usage_far_past_it() -> None:
    assert "tok 0/1 (0%)" in _snap(tokens=0, token_budget=1).fields()
    snap = _snap(tokens=5, token_budget=1)
    assert "tok 5/1 (500%)" in snap.fields() and "5/1 tokens (500%)" in snap.log_line()
    big = _snap(tokens=12_345_678, token_budget=50_000_000, cost_usd=1234.5, cost_budget_usd=2000.0)
    assert "tok 12.3M/50M (25%)" in big.fields() and "12,345,678/50,000,000 tokens (25%)" in big.log_line()
    assert "$1234.50/$2000.00 (62%)" in big.fields()


def _optimizer(**kw) -> TurboGEPA:
    return TurboGEPA(TASKS["routing"].metric, reflection_lm=make_reflection_lm(), max_metric_calls=10, **kw)


def test_a_weird_price_table_is_refused_so_no_negative_or_nan_dollars_reach_the_display() -> None:
    for bad in ((-1.0, 1.0), (math.nan, 1.0), (1.0, -0.5)):
        with pytest.raises(ValueError, match="price_table"):
            _optimizer(price_table={"sim/x": bad})
    for bad_cap in (-1.0, math.nan, 0):
        with pytest.raises(ValueError, match="cost_budget_usd"):
            _optimizer(cost_budget_usd=bad_cap)


def test_an_infinite_price_is_refused_like_a_negative_one() -> None:
    with pytest.raises(ValueError, match="price_table"):
        _optimizer(price_table={"sim/x": (math.inf, 1.0)})


def test_an_infinite_dollar_cap_is_shown_as_no_cap() -> None:
    _optimizer(cost_budget_usd=math.inf)  # accepted: "no limit"
    clock, source = FakeClock(), SpendingSource()
    display = ProgressDisplay(source, interactive=False, clock=clock, cost_budget_usd=math.inf)
    source.calls, source.usd = 50, 0.21
    snap = display.snapshot()
    assert not any("inf" in f for f in snap.fields()), snap.fields()
    assert "$inf" not in snap.log_line() and "$0.21 spent" in snap.log_line()


# ---------------------------------------------------------------------------------------- ETA
def test_a_resumed_runs_tokens_start_from_the_earlier_sessions_and_stay_out_of_the_rate(info_logs) -> None:
    """RunStats starts from the stored usage: the first snapshot already shows it, and the ETA to the cap
    is the session's own rate (no jump, no division by a zero interval)."""
    clock, source = FakeClock(), SpendingSource(budget=100_000)
    source.tok = 40_000  # the earlier sessions'
    display = ProgressDisplay(source, interactive=False, clock=clock, token_budget=100_000)
    first = display.snapshot()
    assert "tok 40k/100k (40%)" in first.fields() and first.eta_seconds is None  # no interval yet
    for _ in range(50):  # 10 s at 600 tokens/s, 5 calls/s
        clock.t += 0.2
        source.calls += 1
        source.tok += 120
        display.tick()
    snap = display.snapshot()
    assert snap.tokens == 46_000
    assert snap.eta_seconds == pytest.approx(54_000 / 600, rel=0.03)


def test_the_eta_right_after_a_resume_is_not_shortened_by_the_replay_burst(info_logs) -> None:
    stats = RunStats()
    stats.task_prompt_tokens = 40_000  # the earlier sessions' usage
    orch = SimpleNamespace(records=[], budget=SimpleNamespace(executed=0, limit=1000), in_flight=4,
                           mutations_in_flight=lambda: 1, stats=stats)
    clock = FakeClock()
    display = ProgressDisplay(OrchestratorSource(orch), interactive=False, clock=clock, token_budget=100_000)
    display.tick()
    clock.t += 0.2
    stats.replayed = 300  # the stored evaluations, replayed at once
    display.tick()
    for _ in range(50):  # then 10 s of new work: 5 calls/s, 600 tokens/s
        clock.t += 0.2
        orch.budget.executed += 1
        stats.task_prompt_tokens += 120
        display.tick()
    # the token cap is 90 s away (54,000 tokens at 600/s), the budget 130 s (650 calls at 5/s)
    assert display.snapshot().eta_seconds == pytest.approx(90, rel=0.1)


def test_the_eta_during_a_rate_limit_pause_uses_the_rates_from_before_it(info_logs) -> None:
    clock, source = FakeClock(), SpendingSource(budget=100_000)
    display = ProgressDisplay(source, interactive=False, clock=clock, token_budget=24_000)
    for _ in range(100):  # 20 s at 600 tokens/s: 12,000 of 24,000
        clock.t += 0.2
        source.calls += 1
        source.tok += 120
        display.tick()
    source.pause = 30.0
    for _ in range(50):  # 10 s into a 30 s pause: nothing moves
        clock.t += 0.2
        source.pause -= 0.2
        display.tick()
    snap = display.snapshot()
    assert snap.paused and snap.eta_seconds == pytest.approx(20 + 12_000 / 600, rel=0.03)
    assert "paused 20s (429)" in snap.fields() and "tok 12k/24k (50%)" in snap.fields()


def test_a_cap_already_passed_gives_eta_zero_not_negative(info_logs) -> None:
    clock, source = FakeClock(), SpendingSource(budget=100_000)
    source.tok = 5_900
    display = ProgressDisplay(source, interactive=False, clock=clock, token_budget=6_000)
    for _ in range(20):  # the calls already on the wire pay past it
        clock.t += 0.2
        source.calls += 1
        source.tok += 50
        display.tick()
    snap = display.snapshot()
    assert snap.eta_seconds == 0.0 and "tok 6.9k/6k (115%)" in snap.fields()


# ---------------------------------------------------------------------------------------- log lines
def test_a_log_line_follows_spend_that_moves_without_metric_calls(info_logs) -> None:
    clock, source = FakeClock(), SpendingSource()
    display = ProgressDisplay(source, interactive=False, clock=clock, cost_budget_usd=1.0)
    source.calls, source.usd = 50, 0.10
    display.tick()
    for _ in range(300):  # 60 s of an expensive reflection LM: $0.01/s, no metric call
        clock.t += 0.2
        source.usd += 0.002
        display.tick()
    lines = _lines(info_logs)
    assert len(lines) >= 2 and "$0.10/$1.00" in lines[0], lines
    assert "$0.10/$1.00" not in lines[-1], lines


def test_a_custom_source_without_usage_methods_still_works(info_logs) -> None:
    clock, source = FakeClock(), Source()
    display = ProgressDisplay(source, interactive=False, clock=clock, token_budget=50_000, cost_budget_usd=1.0)
    for _ in range(100):
        clock.t += 0.2
        source.calls += 1
        display.tick()
    snap = display.snapshot()
    assert snap.tokens is None and snap.cost_usd is None
    assert not any("tok" in f or "$" in f for f in snap.fields()) and "token" not in snap.log_line()
    assert snap.eta_seconds == pytest.approx(900 / 5, rel=0.02)  # the budget's, as before
    display.close(stop_reason="max_metric_calls")
    assert _lines(info_logs)[-1].startswith("TurboGEPA search ended (max_metric_calls): 100/1000")

    class Broken(SpendingSource):
        def tokens(self) -> int:
            raise RuntimeError("no usage here")

    broken = Broken()
    broken.calls, broken.usd = 10, 0.5
    snap = ProgressDisplay(broken, interactive=False, clock=clock, token_budget=1000).snapshot()
    assert snap.tokens is None and snap.fields()[-1] == "$0.50"


def test_reading_run_stats_while_the_engine_thread_writes_them() -> None:
    """The compile thread reads RunStats unlocked: a read between two of the engine's updates is a valid
    intermediate total, never a fall."""
    stats = RunStats()
    src = OrchestratorSource(SimpleNamespace(stats=stats))
    done = threading.Event()

    def engine() -> None:
        for _ in range(20_000):
            stats.task_prompt_tokens += 3
            stats.task_completion_tokens += 2
            stats.task_cost += 0.001
            stats.reflection_prompt_tokens += 1
        done.set()

    writer = threading.Thread(target=engine)
    writer.start()
    seen = []
    while not done.is_set():
        seen.append((src.tokens(), src.cost_usd()))
    writer.join()
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(seen, seen[1:]))
    assert src.tokens() == 120_000 and src.cost_usd() == pytest.approx(20.0)


# ---------------------------------------------------------------------------------------- the bar
def _bar_run(monkeypatch, columns: int, **caps) -> tuple[ProgressDisplay, io.StringIO, SpendingSource, FakeClock]:
    monkeypatch.setenv("COLUMNS", str(columns))
    clock, source, stream = FakeClock(), SpendingSource(), io.StringIO()
    display = ProgressDisplay(source, interactive=True, stream=stream, clock=clock, **caps)
    for _ in range(50):  # 1,234 tokens and $0.0042 a call: 61.7k tokens, $0.21 after 50 calls
        clock.t += 0.2
        source.calls += 1
        source.tok += 1234
        source.usd += 0.0042
        display.tick()
    return display, stream, source, clock


def test_the_bar_shows_both_caps_right_after_the_eta_on_a_wide_terminal(monkeypatch) -> None:
    display, stream, _, _ = _bar_run(monkeypatch, 160, token_budget=500_000, cost_budget_usd=1.0)
    line = _last_bar_line(stream)
    # the nearest cap first: dollars at 21%, tokens at 12%
    assert re.search(r"best 0\.812, ETA \d+s, \$0\.21/\$1\.00 \(21%\), tok 60\.5k/500k \(12%\), front 4", line), line
    display.close(stop_reason="cost_budget")
    line = _last_bar_line(stream)
    assert "cost_budget, best 0.812, $0.21/$1.00 (21%), tok 61.7k/500k (12%)" in line and "ETA" not in line, line


def test_an_80_column_bar_closing_on_the_dollar_cap_shows_the_dollars(monkeypatch) -> None:
    display, stream, _, _ = _bar_run(monkeypatch, 80, token_budget=500_000, cost_budget_usd=1.0)
    display.close(stop_reason="cost_budget")
    assert "$0.21/$1.00" in _last_bar_line(stream), _last_bar_line(stream)


def test_an_80_column_bar_shows_the_nearest_cap(monkeypatch) -> None:
    display, stream, _, _ = _bar_run(monkeypatch, 80, token_budget=500_000, cost_budget_usd=1.0)
    assert "$0.21/$1.00 (21%)" in _last_bar_line(stream), _last_bar_line(stream)
    display.close()


def test_one_cap_fits_an_80_column_bar(monkeypatch) -> None:
    display, stream, _, _ = _bar_run(monkeypatch, 80, cost_budget_usd=1.0)
    assert "$0.21/$1.00 (21%)" in _last_bar_line(stream), _last_bar_line(stream)
    display.close(stop_reason="cost_budget")
    assert "cost_budget, best 0.812, $0.21/$1.00 (21%)" in _last_bar_line(stream)


# ---------------------------------------------------------------------------------------- compiles
def test_a_token_capped_compile_closes_its_bar_on_the_runs_tokens(monkeypatch, routing_splits) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    stream = io.StringIO()
    monkeypatch.setattr(teleprompter, "ProgressDisplay",
                        functools.partial(ProgressDisplay, interactive=True, stream=stream))
    dr = _compile(routing_splits, token_budget=6000)
    assert dr.stop_reason == "token_budget"
    line = _last_bar_line(stream)
    tokens = _run_tokens(dr)
    assert line.startswith("TurboGEPA") and "[" in line and "token_budget, best" in line, line
    assert f"tok {_short_count(tokens)}/6k ({100 * tokens / 6000:.0f}%)" in line, line


def test_a_resumed_capped_run_shows_the_earlier_sessions_tokens_from_its_first_line(info_logs, tmp_path,
                                                                                     routing_splits) -> None:
    first = _compile(routing_splits, log_dir=tmp_path, max_metric_calls=30, token_budget=1_000_000)
    before = _run_tokens(first)
    info_logs.clear()
    second = _compile(routing_splits, log_dir=tmp_path, max_metric_calls=140, token_budget=1_000_000)
    lines = _lines(info_logs)
    assert before > 0 and lines and all("/1,000,000 tokens" in line for line in lines), lines
    assert _shown_tokens(lines[0]) >= before, (before, lines[0])  # the whole run's, as the cap counts
    assert "search ended" in lines[-1] and _shown_tokens(lines[-1]) == _run_tokens(second) > before


def test_verbose_false_shows_no_progress_even_with_caps(info_logs, routing_splits) -> None:
    dr = _compile(routing_splits, verbose=False, token_budget=6000, cost_budget_usd=100.0,
                  price_table={"sim/sim-student": (1.0, 1.0), "sim/sim-reflector": (1.0, 1.0)})
    assert dr.stop_reason == "token_budget"
    assert _lines(info_logs) == []


@pytest.mark.http
def test_the_closing_line_shows_litellm_priced_dollars_against_the_cap(info_logs) -> None:
    from dspy_turbogepa.testing import ModelConfig, SimConfig, SimServer

    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=12, n_val=6, n_test=0)
    cfg = SimConfig(models=(ModelConfig("gpt-4o-mini", "student"), ModelConfig("gpt-4.1", "reflector")))
    with SimServer(cfg, seed=0) as srv:
        lm = dspy.LM("openai/gpt-4o-mini", api_base=srv.base_url, api_key="x", cache=False)
        refl = dspy.LM("openai/gpt-4.1", api_base=srv.base_url, api_key="x", cache=False)
        opt = TurboGEPA(task.metric, max_metric_calls=300, reflection_lm=refl, num_threads=4, track_stats=True,
                        cost_budget_usd=0.004)
        with dspy.context(lm=lm):
            dr = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val).detailed_results
    assert dr.stop_reason == "cost_budget"
    cost = dr.run_stats["cost"]["task"] + dr.run_stats["cost"]["reflection"]
    ended = [line for line in _lines(info_logs) if "search ended (cost_budget)" in line]
    assert len(ended) == 1 and f"{_money(cost)}/$0.0040 ({100 * cost / 0.004:.0f}%)" in ended[0], (cost, ended)
