"""Every way a user limits a run, end to end: what each budget counts, how far it can be passed, and
what it means across a resume with the same ``log_dir``.

Fake in-process LMs only (and the loopback simulator for litellm's prices). Wall-clock budgets are
driven by a fake clock handed to the engine, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re

import dspy
import gepa
import pytest

import dspy_turbogepa.teleprompter as teleprompter
from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.engine import Orchestrator
from dspy_turbogepa.errors import ConfigurationError
from dspy_turbogepa.testing import TASKS
from dspy_turbogepa.testing.fake_lm import AsyncSimEngine, SimEngine, make_reflection_lm, make_student_lm, sim_engine

from helpers import CountingMetric, small_splits

#: $ per 1M tokens: high enough that a handful of calls reaches a dollar budget.
PRICES = {"sim/sim-student": (100.0, 100.0), "sim/sim-reflector": (100.0, 100.0)}


def _paid_tokens(*lms: dspy.LM) -> int:
    return sum(sim_engine(lm).stats()["prompt_tokens"] + sim_engine(lm).stats()["completion_tokens"] for lm in lms)


def _counted_tokens(dr) -> int:
    rs = dr.run_stats
    return sum(rs["task_tokens"].values()) + sum(rs["reflection_tokens"].values())


def _paid_dollars(*lms: dspy.LM, prices=PRICES) -> float:
    total = 0.0
    for lm in lms:
        s = sim_engine(lm).stats()
        rate = prices[lm.model]
        total += (s["prompt_tokens"] * rate[0] + s["completion_tokens"] * rate[1]) / 1e6
    return total


def _instructions(program) -> dict[str, str]:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


def _compile(task, splits, *, log_dir=None, metric=None, lm=None, refl=None, valset="split", **kw):
    """One compile on fresh fake LMs (noise: the task's default, seeded); returns what the test reads."""
    lm = lm or make_student_lm(seed=0, noise=None)
    refl = refl or make_reflection_lm(seed=0)
    metric = metric or CountingMetric(task.metric)
    kw.setdefault("num_threads", 4)
    opt = TurboGEPA(metric, reflection_lm=refl, track_stats=True, verbose=False,
                    log_dir=str(log_dir) if log_dir else None, **kw)
    with dspy.context(lm=lm):
        program = opt.compile(task.make_program(), trainset=splits.train,
                              valset=splits.val if valset == "split" else valset)
    return program, program.detailed_results, metric, lm, refl


class _Clock:
    """The engine's clock, moved by the test (a jump past the time budget at a chosen LM call)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _jump_at_call(clock: _Clock, n: int, seconds: float = 1000.0):
    """A ``before_call`` hook moving the clock ``seconds`` ahead at the ``n``-th call of its LM."""
    calls = {"n": 0}

    def before(_request) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            clock.now += seconds

    return before


@pytest.fixture
def fake_clock(monkeypatch):
    """Give every engine this test builds a clock the test controls (TurboGEPA has no clock argument)."""
    clock = _Clock()
    monkeypatch.setattr(teleprompter, "Orchestrator", functools.partial(Orchestrator, clock=clock))
    return clock


# ------------------------------------------------------------------ which budget, from which arguments


class _Captured(Exception):
    pass


def _dspy_gepa_budget(task, kw, train, val) -> int:
    """The max_metric_calls dspy.GEPA's own compile hands to gepa.optimize (captured, nothing runs)."""
    seen = {}

    def optimize(**kwargs):
        seen["budget"] = kwargs["max_metric_calls"]
        raise _Captured

    with pytest.MonkeyPatch.context() as patch, pytest.raises(_Captured):
        patch.setattr(gepa, "optimize", optimize)
        dspy.GEPA(task.metric, reflection_lm=make_reflection_lm(), **kw).compile(
            task.make_program(), trainset=train, valset=val)
    return seen["budget"]


@pytest.mark.parametrize("given_valset", [True, False], ids=["valset", "valset_none"])
@pytest.mark.parametrize("kw", [{"auto": "light"}, {"auto": "medium"}, {"auto": "heavy"}, {"max_full_evals": 3}],
                         ids=["light", "medium", "heavy", "full_evals"])
@pytest.mark.parametrize("task_name", ["routing", "pipeline"])
def test_auto_and_max_full_evals_give_the_budget_dspy_gepas_compile_gives(
        tmp_path, caplog, task_name, kw, given_valset):
    """The budget a compile runs with (logged, in summary.json, on the optimizer) is the one dspy.GEPA's
    compile computes for the same data and number of predictors."""
    task = TASKS[task_name]
    splits = small_splits(task, n_train=10, n_val=6)
    val = splits.val if given_valset else None
    expected = _dspy_gepa_budget(task, kw, splits.train, val)
    opt = TurboGEPA(task.metric, reflection_lm=make_reflection_lm(), num_threads=4, verbose=False,
                    log_dir=str(tmp_path), gepa_kwargs={"stop_callbacks": [lambda state: True]}, **kw)
    assert opt.max_metric_calls == kw.get("max_metric_calls")  # resolved at compile, from the data
    with caplog.at_level(logging.INFO, logger="dspy_turbogepa"), dspy.context(lm=make_student_lm()):
        opt.compile(task.make_program(), trainset=splits.train, valset=val)
    assert opt.max_metric_calls == expected  # overwritten as dspy.GEPA overwrites it
    assert json.loads((tmp_path / "summary.json").read_text())["budgets"]["max_metric_calls"] == expected
    assert f"budget {expected} metric calls" in caplog.text


@pytest.mark.parametrize("kw,exc,match", [
    ({"token_budget": 10_000}, ConfigurationError, "Exactly one of max_metric_calls, max_full_evals, auto"),
    ({"time_budget_seconds": 60.0, "cost_budget_usd": 1.0}, ConfigurationError,
     r"Exactly one of .* TurboGEPA\(metric, auto='light'"),
    ({"max_metric_calls": 100, "token_budget": 2.5}, TypeError, "token_budget must be a positive integer"),
    ({"max_metric_calls": 100, "token_budget": True}, TypeError, "token_budget"),
    ({"max_metric_calls": 100, "cost_budget_usd": True}, ValueError, "cost_budget_usd must be a positive number"),
    ({"max_metric_calls": 100, "time_budget_seconds": -1}, ValueError, "time_budget_seconds must be a positive"),
    ({"max_full_evals": 1.5}, TypeError, "max_full_evals must be a positive integer"),
    ({"max_metric_calls": 100, "price_table": {"sim/x": (1.0,)}}, ValueError, r"price_table must map .* e\.g\."),
], ids=["token_budget_alone", "time_and_cost_alone", "float_tokens", "bool_tokens", "bool_dollars",
        "negative_seconds", "fractional_full_evals", "short_price"])
def test_budget_mistakes_fail_in_the_constructor_naming_the_argument(kw, exc, match):
    """A secondary budget never replaces the metric-call budget (dspy.GEPA's exactly-one rule), and a bad
    value is named at construction, with the fix where there is one."""
    with pytest.raises(exc, match=match):
        TurboGEPA(TASKS["routing"].metric, reflection_lm=make_reflection_lm(), **kw)


# ------------------------------------------------------------------ metric calls: what is counted, how far past


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "gepa_rule"])
@pytest.mark.parametrize("task_name,budget,threads", [
    ("routing", 45, 8), ("routing", 97, 4), ("pipeline", 60, 8), ("pipeline", 45, 2),
])
def test_metric_call_limit_counts_scouts_siblings_and_merges_never_feedback_calls(task_name, budget, threads, strict):
    """Scouts, best-of-k siblings and merges are real metric calls and count; the metric's feedback calls
    (pred_name set, from the minibatch and reused failures) do not, as in dspy.GEPA (engine.md, "Budget").
    strict_budget never passes max_metric_calls and stops less than one mutation below it; the default
    passes it by less than 2 * minibatch + len(valset), dspy.GEPA's bound."""
    task = TASKS[task_name]
    splits = small_splits(task, n_train=20, n_val=8)
    _, dr, metric, _, _ = _compile(task, splits, max_metric_calls=budget, strict_budget=strict, num_threads=threads,
                                   reflection_scouts=5, reflection_feedback_reuse=3, max_sibling_reflections=4,
                                   use_merge=True)
    one_mutation = 2 * 3 + len(splits.val)
    assert dr.total_metric_calls == metric.scoring == dr.run_stats["metric_calls_executed"]
    assert metric.feedback > 0  # made, and not counted
    if strict:
        assert metric.scoring <= budget
        if dr.stop_reason == "max_metric_calls":
            assert budget - metric.scoring < one_mutation
    else:
        assert metric.scoring < budget + one_mutation
        if dr.stop_reason == "max_metric_calls":
            assert metric.scoring >= budget


def test_a_stop_callback_sees_charged_calls_never_more_than_were_made(routing):
    """gepa's MaxMetricCallsStopper reads total_num_evals: never above the metric calls really made when
    it is asked, and the run's own count is the real one."""
    from gepa.utils.stop_condition import MaxMetricCallsStopper

    splits = small_splits(routing, n_train=16, n_val=8)
    metric = CountingMetric(routing.metric)
    seen: list[tuple[int, int]] = []
    stopper = MaxMetricCallsStopper(40)

    def watching(state) -> bool:
        seen.append((state.total_num_evals, metric.scoring))
        return stopper(state)

    _, dr, _, _, _ = _compile(routing, splits, metric=metric, max_metric_calls=400,
                              gepa_kwargs={"stop_callbacks": [watching]})
    assert dr.stop_reason == "stop_callback"
    assert all(charged <= made for charged, made in seen)
    assert [c for c, _ in seen] == sorted(c for c, _ in seen)
    assert seen[-1][0] >= 40 and dr.total_metric_calls == metric.scoring


# ------------------------------------------------------------------ tokens and dollars: what is counted


def test_tokens_and_price_table_cover_the_program_an_llm_judge_and_reflection(routing):
    """token_budget / cost_budget_usd count the program's calls, an LLM-judge metric's own calls (scoring
    and feedback) and reflection; price_table prices each model by its own rates."""
    splits = small_splits(routing, n_train=12, n_val=6)
    engine = SimEngine("student", seed=1, model_name="sim-judge")
    judge = dspy.LM("sim/sim-judge", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)

    def judged(gold, pred, trace=None, pred_name=None, pred_trace=None):
        judge(f"Is {pred.queue} right for {gold.ticket}?")
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    metric = CountingMetric(judged)
    prices = {**PRICES, "sim/sim-judge": (5.0, 6.0)}
    _, dr, metric, lm, refl = _compile(routing, splits, metric=metric, max_metric_calls=40, price_table=prices)
    assert metric.feedback > 0 and sim_engine(judge).calls == metric.scoring + metric.feedback
    assert _counted_tokens(dr) == _paid_tokens(lm, refl, judge)
    cost = dr.run_stats["cost"]
    assert cost["task"] + cost["reflection"] == pytest.approx(_paid_dollars(lm, refl, judge, prices=prices), abs=2e-6)


@pytest.mark.http
def test_cost_budget_with_litellms_prices_over_http(routing):
    """Models litellm's cost map prices (served by the loopback simulator): the dollar budget stops the run
    and counts exactly what DSPy recorded for the student's and the reflection LM's calls."""
    from dspy_turbogepa.testing import ModelConfig, SimConfig, SimServer

    splits = small_splits(routing, n_train=12, n_val=6)
    cfg = SimConfig(models=(ModelConfig("gpt-4o-mini", "student"), ModelConfig("gpt-4.1", "reflector")))
    with SimServer(cfg, seed=0) as srv:
        lm = dspy.LM("openai/gpt-4o-mini", api_base=srv.base_url, api_key="x", cache=False)
        refl = dspy.LM("openai/gpt-4.1", api_base=srv.base_url, api_key="x", cache=False)
        opt = TurboGEPA(routing.metric, max_metric_calls=300, reflection_lm=refl, num_threads=4, track_stats=True,
                        verbose=False, cost_budget_usd=0.004)
        with dspy.context(lm=lm):
            dr = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results
    assert dr.stop_reason == "cost_budget"
    recorded = sum(h["cost"] for h in lm.history) + sum(h["cost"] for h in refl.history)
    cost = dr.run_stats["cost"]
    assert cost["task"] > 0 and cost["reflection"] > 0
    assert cost["task"] + cost["reflection"] == pytest.approx(recorded, abs=2e-6)
    assert recorded >= 0.004 and dr.total_metric_calls < 300


def test_a_cost_budget_warns_about_an_lm_it_cannot_price_even_when_another_is_priced(routing, caplog):
    splits = small_splits(routing, n_train=16, n_val=8)
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        _, dr, _, _, refl = _compile(routing, splits, max_metric_calls=150, cost_budget_usd=100.0,
                                     price_table={"sim/sim-student": (1.0, 1.0)})
    assert dr.run_stats["cost"]["task"] > 0
    assert sum(dr.run_stats["reflection_tokens"].values()) > 0 and sim_engine(refl).calls > 0
    assert dr.run_stats["cost"]["reflection"] == 0.0  # nothing prices it...
    warned = [r.getMessage() for r in caplog.records if "no price is known" in r.getMessage()]
    assert len(warned) == 1 and "sim-reflector" in warned[0]  # ...and the user is told which LM, once
    assert "sim-student" not in warned[0]  # the priced one is not named


# ------------------------------------------------------------------ wall clock


def test_a_time_budget_reached_during_the_seeds_validation_returns_the_scored_seed(routing, fake_clock):
    """The clock runs from the start of the search: the seed's validation finishes (the program returned
    needs a score), then nothing is launched."""
    splits = small_splits(routing, n_train=16, n_val=8)
    lm = make_student_lm(seed=0, noise=None, before_call=_jump_at_call(fake_clock, 1))
    program, dr, metric, _, refl = _compile(routing, splits, lm=lm, max_metric_calls=200, time_budget_seconds=60.0)
    assert dr.stop_reason == "time_budget"
    assert metric.scoring == dr.total_metric_calls == len(splits.val)
    assert sim_engine(refl).calls == 0 and len(dr.candidates) == 1
    assert _instructions(program) == _instructions(routing.make_program())


def test_a_time_budget_keeps_the_work_in_flight_and_is_per_session_on_resume(routing, fake_clock, tmp_path, caplog):
    """At the deadline nothing new starts, but the mutations already running finish and their children join
    the pool and the run store. Resumed (same arguments), nothing stored is paid again or counted twice, and
    the session gets a new time budget (deviations.md: time_budget_seconds is per session)."""
    splits = small_splits(routing, n_train=16, n_val=8)

    def session():
        fake_clock.now = 0.0
        refl = make_reflection_lm(seed=0, before_call=_jump_at_call(fake_clock, 1))  # deadline at its 1st call
        return _compile(routing, splits, refl=refl, log_dir=tmp_path, max_metric_calls=400, time_budget_seconds=60.0)

    _, first, metric1, _, refl1 = session()
    assert first.stop_reason == "time_budget"
    reflections = sim_engine(refl1).calls
    assert reflections >= 1
    assert sum(first.run_stats["mutations"].values()) == reflections  # each one launched was committed
    assert len(first.candidates) >= 2  # a child found after the deadline is kept

    with caplog.at_level(logging.INFO, logger="dspy_turbogepa"):
        _, second, metric2, _, _ = session()
    assert second.stop_reason == "time_budget"
    assert metric2.scoring > 0  # a new session, a new time budget: the search went on
    assert second.run_stats["metric_calls_replayed"] == metric1.scoring  # all of the first session, none again
    assert second.run_stats["metric_calls_executed"] == metric2.scoring
    assert second.total_metric_calls == metric1.scoring + metric2.scoring
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("TurboGEPA finished"))
    assert re.search(rf"{second.total_metric_calls} metric calls \({metric1.scoring} of them stored", line)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["budgets"]["metric_calls_used"] == second.total_metric_calls


# ------------------------------------------------------------------ across resume


@pytest.mark.parametrize("stop", ["time", "tokens", "dollars"])
def test_a_run_stopped_by_a_secondary_budget_resumes_to_the_uninterrupted_run(routing, fake_clock, tmp_path, stop):
    """Stopped by its time, token or dollar budget, then resumed without it: the same program and the same
    metric and reflection calls in total as one uninterrupted run (nothing paid twice)."""
    splits = small_splits(routing, n_train=16, n_val=8)
    priced = {"price_table": {"sim/sim-student": (50.0, 50.0)}}
    program, _, metric, _, refl = _compile(routing, splits, max_metric_calls=150, **priced)
    reference = (_instructions(program), metric.scoring, sim_engine(refl).calls)

    extra = {"time": {"time_budget_seconds": 60.0}, "tokens": {"token_budget": 9000},
             "dollars": {"cost_budget_usd": 0.5}}[stop]
    refl = make_reflection_lm(seed=0, before_call=_jump_at_call(fake_clock, 3) if stop == "time" else None)
    _, first, metric1, _, refl1 = _compile(routing, splits, refl=refl, log_dir=tmp_path, max_metric_calls=150,
                                           **priced, **extra)
    assert first.stop_reason == {"time": "time_budget", "tokens": "token_budget", "dollars": "cost_budget"}[stop]
    program, second, metric2, _, refl2 = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=150, **priced)
    assert second.stop_reason == "max_metric_calls"
    assert (_instructions(program), metric1.scoring + metric2.scoring,
            sim_engine(refl1).calls + sim_engine(refl2).calls) == reference
    assert second.total_metric_calls == reference[1]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "gepa_rule"])
def test_a_rerun_with_the_same_budget_pays_nothing_and_returns_the_same_program(pipeline, tmp_path, strict):
    splits = small_splits(pipeline, n_train=16, n_val=8)
    budgets = {"max_metric_calls": 60, "strict_budget": strict, "price_table": PRICES}
    program1, first, metric1, lm1, refl1 = _compile(pipeline, splits, log_dir=tmp_path, **budgets)
    program2, second, metric2, lm2, refl2 = _compile(pipeline, splits, log_dir=tmp_path, **budgets)
    assert (metric2.scoring, sim_engine(lm2).calls, sim_engine(refl2).calls) == (0, 0, 0)
    assert _instructions(program2) == _instructions(program1)
    assert [_instructions(c) for c in second.candidates] == [_instructions(c) for c in first.candidates]
    assert second.stop_reason == first.stop_reason == "max_metric_calls"
    assert second.total_metric_calls == first.total_metric_calls == metric1.scoring
    assert second.run_stats["metric_calls_replayed"] == metric1.scoring
    # the stored usage is counted once, as the first session counted it
    assert second.run_stats["cost"] == first.run_stats["cost"]
    assert _counted_tokens(second) == _counted_tokens(first) == _paid_tokens(lm1, refl1)
    if strict:
        assert second.total_metric_calls <= budgets["max_metric_calls"]


@contextlib.contextmanager
def _second_mutation_reflects_after_the_third_launches():
    """Mutation 1's reflection waits until mutation 2 has been launched (5 s at most), as a slow reflection LM
    makes it: the first session decides that launch while mutation 1's tokens are partly counted."""
    launch, reflect = Orchestrator._launch, Orchestrator._reflect

    def event(orchestrator) -> asyncio.Event:
        return orchestrator.__dict__.setdefault("_test_third_launched", asyncio.Event())

    def launching(self, plan):
        launch(self, plan)
        if plan.seq == 2:
            event(self).set()

    async def reflecting(self, plan, *args):
        if plan.seq == 1:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event(self).wait(), 5)
        return await reflect(self, plan, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Orchestrator, "_launch", launching)
        patch.setattr(Orchestrator, "_reflect", reflecting)
        yield


def test_a_rerun_of_a_finished_token_budget_run_returns_the_program_the_run_found(routing, tmp_path):
    splits = small_splits(routing, n_train=30, n_val=8)
    budgets = {"max_metric_calls": 500, "token_budget": 7000, "num_threads": 16}
    with _second_mutation_reflects_after_the_third_launches():
        program1, first, _, _, _ = _compile(routing, splits, log_dir=tmp_path, **budgets)
    assert first.stop_reason == "token_budget"
    program2, second, metric2, lm2, refl2 = _compile(routing, splits, log_dir=tmp_path, **budgets)
    assert (metric2.scoring, sim_engine(lm2).calls, sim_engine(refl2).calls) == (0, 0, 0)  # holds
    assert len(second.candidates) == len(first.candidates)
    assert second.val_aggregate_scores[second.best_idx] == first.val_aggregate_scores[first.best_idx]
    assert _instructions(program2) == _instructions(program1)


def _largest_call(lm: dspy.LM) -> int:
    """The most tokens one call of ``lm`` used (our copies share the original's history)."""
    return max(int(e["usage"].get("prompt_tokens") or 0) + int(e["usage"].get("completion_tokens") or 0)
               for e in lm.history if e.get("usage"))


def test_a_token_cap_is_passed_only_by_the_calls_already_on_the_wire(routing):
    """A cap refuses every LM call it would have to pay for once the run's tokens reach it, including those
    of mutations already running (their validation, their reflection): with one evaluation and one
    reflection in flight at a time, the run pays at most one call of each past the cap."""
    splits = small_splits(routing, n_train=16, n_val=8)
    _, dr, _, lm, refl = _compile(routing, splits, max_metric_calls=400, token_budget=6000, num_threads=1)
    assert dr.stop_reason == "token_budget"
    paid = _paid_tokens(lm, refl)
    assert 6000 <= paid <= 6000 + _largest_call(lm) + _largest_call(refl)
    assert dr.run_stats["mutations"]["budget_stopped"] >= 1  # the mutation the cap cut short
    assert _counted_tokens(dr) == paid


def test_a_token_cap_raised_on_resume_counts_what_earlier_sessions_paid(routing, tmp_path):
    """The cap is the run's, every session's: resumed with a higher one, the run pays up to the new cap in
    total (not the new cap again on top of what is stored), and replays what it stored for free."""
    splits = small_splits(routing, n_train=16, n_val=8)
    _, first, _, lm1, refl1 = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=400,
                                       token_budget=4000, num_threads=1)
    _, second, metric2, lm2, refl2 = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=400,
                                              token_budget=8000, num_threads=1)
    assert first.stop_reason == second.stop_reason == "token_budget"
    paid = _paid_tokens(lm1, refl1) + _paid_tokens(lm2, refl2)
    assert metric2.scoring > 0 and 8000 <= paid <= 8000 + _largest_call(lm2) + _largest_call(refl2)
    assert _counted_tokens(second) == paid


def test_tokens_and_cost_after_extending_a_run_are_the_whole_runs(routing, tmp_path):
    splits = small_splits(routing, n_train=16, n_val=8)
    _, first, metric1, lm1, refl1 = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=60,
                                             price_table=PRICES)
    _, second, metric2, lm2, refl2 = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=150,
                                              price_table=PRICES)
    assert second.total_metric_calls == metric1.scoring + metric2.scoring  # the metric-call count is the run's
    assert _counted_tokens(second) == _paid_tokens(lm1, refl1) + _paid_tokens(lm2, refl2)
    cost = second.run_stats["cost"]
    assert cost["task"] + cost["reflection"] == pytest.approx(
        _paid_dollars(lm1, refl1) + _paid_dollars(lm2, refl2), abs=2e-6)


def test_a_dollar_cap_already_reached_is_not_spent_past_when_the_run_is_extended(routing, tmp_path):
    splits = small_splits(routing, n_train=16, n_val=8)
    _, first, _, lm1, refl1 = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=60, cost_budget_usd=1.0,
                                       price_table=PRICES)
    assert first.stop_reason == "cost_budget" and _paid_dollars(lm1, refl1) >= 1.0
    _, second, metric2, lm2, refl2 = _compile(routing, splits, log_dir=tmp_path, max_metric_calls=150,
                                              cost_budget_usd=1.0, price_table=PRICES)
    assert second.stop_reason == "cost_budget"
    assert (metric2.scoring, sim_engine(lm2).calls, sim_engine(refl2).calls) == (0, 0, 0)
