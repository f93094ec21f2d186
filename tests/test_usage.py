"""LM usage per rollout (tokens and cost on EvalOutcome), on the thread-pool and the acall paths, concurrently."""

from __future__ import annotations

import asyncio

import dspy
import pytest
from dspy.utils.usage_tracker import track_usage

from dspy_turbogepa.adapter.lm_copies import _metadata_rates, _note_history_entry, rollout_usage
from dspy_turbogepa.testing import ModelConfig, SimConfig, SimServer
from dspy_turbogepa.testing.fake_lm import make_student_lm, sim_engine

from helpers import TwoParallelBranches, make_evaluator, small_splits


def run_all(ev, codec, lm, ids, *, concurrent=True, **context):
    async def main():
        with dspy.context(lm=lm, **context):
            calls = [ev.evaluate(codec.seed_texts(), "seed", "val", i, True) for i in ids]
            if concurrent:
                return list(await asyncio.gather(*calls))
            return [await c for c in calls]

    return asyncio.run(main())


@pytest.mark.parametrize("async_forward", [False, True], ids=["threads", "acall"])
@pytest.mark.parametrize("task_name", ["routing", "pipeline"])
def test_tokens_per_rollout_match_the_lm_and_survive_concurrency(task_name, async_forward):
    from dspy_turbogepa.testing import TASKS

    task = TASKS[task_name]
    lm = make_student_lm()
    engine = sim_engine(lm)
    ev, codec = make_evaluator(task, task.make_program(async_forward=async_forward), n=16)
    # one at a time: each rollout's usage is exactly what the engine counted for it
    sequential = []
    for i in range(16):
        before = engine.stats()
        (outcome,) = run_all(ev, codec, lm, [i], concurrent=False)
        after = engine.stats()
        assert outcome.failure is None
        assert outcome.prompt_tokens == after["prompt_tokens"] - before["prompt_tokens"] > 0
        assert outcome.completion_tokens == after["completion_tokens"] - before["completion_tokens"] > 0
        assert outcome.cost == 0.0  # the fake engine has no price
        sequential.append((outcome.prompt_tokens, outcome.completion_tokens))
    # all at once: nothing leaks between concurrent rollouts
    before = engine.stats()
    outcomes = run_all(ev, codec, lm, range(16))
    after = engine.stats()
    ev.close()
    assert [(o.prompt_tokens, o.completion_tokens) for o in outcomes] == sequential
    assert sum(o.prompt_tokens for o in outcomes) == after["prompt_tokens"] - before["prompt_tokens"]


def test_an_outer_usage_tracker_still_sees_everything(routing):
    lm = make_student_lm()
    ev, codec = make_evaluator(routing, routing.make_program(), n=6)

    async def main():
        with dspy.context(lm=lm), track_usage() as outer:
            outcomes = await asyncio.gather(*(ev.evaluate(codec.seed_texts(), "s", "val", i, False) for i in range(6)))
        return outcomes, outer.get_total_tokens()

    outcomes, totals = asyncio.run(main())
    ev.close()
    (usage,) = totals.values()
    assert usage["prompt_tokens"] == sum(o.prompt_tokens for o in outcomes) > 0
    assert usage["completion_tokens"] == sum(o.completion_tokens for o in outcomes)


def test_prediction_usage_is_attached_when_track_usage_is_on(routing):
    seen = {}  # by ticket: the three evaluations run concurrently and finish in any order

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        seen[gold.ticket] = pred.get_lm_usage()
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    lm = make_student_lm()
    ev, codec = make_evaluator(routing, routing.make_program(), n=3, metric=metric)
    outcomes = run_all(ev, codec, lm, range(3), track_usage=True)
    ev.close()
    examples = small_splits(routing, n_train=3, n_val=3, n_test=0).val  # make_evaluator's examples
    assert len(seen) == 3 and all(seen.values())
    for outcome in outcomes:
        (per_lm,) = seen[examples[outcome.example_id].ticket].values()
        assert per_lm["prompt_tokens"] == outcome.prompt_tokens


def test_rollout_tokens_sum_every_entry_as_dspys_tracker_would():
    """Counts are summed per model before rounding; entries without a count, with None, a flag or a
    non-count value add nothing and do not spoil the rest; the prices table prices the sums."""
    with rollout_usage({"m": (1.0, 2.0)}) as box:
        tracker = dspy.settings.usage_tracker
        tracker.add_usage("m", {"prompt_tokens": 1.5, "completion_tokens": 10})
        tracker.add_usage("m", {"prompt_tokens": 1.5, "completion_tokens": None})
        tracker.add_usage("m", {"prompt_tokens": "7", "completion_tokens": True, "details": {"x": 1}})
        tracker.add_usage("other/model", {"prompt_tokens": 4, "completion_tokens": 5})
    assert (box.calls, box.prompt_tokens, box.completion_tokens) == (4, 3 + 4, 10 + 5)
    assert box.cost == pytest.approx((3 * 1.0 + 10 * 2.0) / 1e6)


def test_cache_hits_are_not_charged():
    with rollout_usage() as box:
        _note_history_entry({"usage": {}, "cost": 1.0})  # a cache hit: DSPy empties its usage
        _note_history_entry({"usage": {"prompt_tokens": 3}, "cost": 0.25})
        _note_history_entry({"usage": {"prompt_tokens": 3}, "cost": None})  # price unknown
    assert box.cost == 0.25
    _note_history_entry({"usage": {"prompt_tokens": 3}, "cost": 9.0})  # outside any rollout: ignored
    assert box.cost == 0.25


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
@pytest.mark.parametrize("async_forward", [False, True], ids=["threads", "acall"])
def test_tokens_and_cost_over_http(routing, engine, async_forward):
    """A priced model name (gpt-4o-mini) served by the simulator: DSPy prices each call, we sum per rollout."""
    cfg = SimConfig(models=(ModelConfig("gpt-4o-mini", "student"),))
    with SimServer(cfg, seed=0) as srv:
        lm = dspy.LM("openai/gpt-4o-mini", api_base=srv.base_url, api_key="x", cache=False, **engine)
        ev, codec = make_evaluator(routing, routing.make_program(async_forward=async_forward), n=12)
        outcomes = run_all(ev, codec, lm, range(12))
        ev.close()
        server = srv.stats()["models"]["gpt-4o-mini"]
    assert all(o.failure is None for o in outcomes)
    assert sum(o.prompt_tokens for o in outcomes) == server["prompt_tokens"]
    assert sum(o.completion_tokens for o in outcomes) == server["completion_tokens"]
    assert all(o.cost > 0 for o in outcomes)
    assert sum(o.cost for o in outcomes) == pytest.approx(sum(h["cost"] for h in lm.history))
    assert len(lm.history) == 12  # recorded in the user's LM history, as dspy.GEPA would


@pytest.mark.http
@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
def test_tokens_and_cost_of_calls_inside_dspy_parallel_are_counted(routing, engine):
    """dspy.Parallel runs branches on worker threads with a deep copy of DSPy's usage tracker that is never
    merged back: the branches' tokens and cost must still reach the rollout (token and dollar budgets)."""

    cfg = SimConfig(models=(ModelConfig("gpt-4o-mini", "student"),))
    with SimServer(cfg, seed=0) as srv:
        lm = dspy.LM("openai/gpt-4o-mini", api_base=srv.base_url, api_key="x", cache=False, **engine)
        ev, codec = make_evaluator(routing, TwoParallelBranches(routing.make_program()), n=6)
        # one rollout at a time: concurrent dspy.Parallel instances race in tqdm's global instance set
        # (a KeyError on a tqdm weakref, DSPy's and tqdm's, not ours)
        outcomes = run_all(ev, codec, lm, range(6), concurrent=False)
        ev.close()
        server = srv.stats()["models"]["gpt-4o-mini"]
    assert all(o.failure is None for o in outcomes), [(o.failure, o.message) for o in outcomes]
    assert server["requests"] == 12
    assert sum(o.prompt_tokens for o in outcomes) == server["prompt_tokens"]
    assert sum(o.completion_tokens for o in outcomes) == server["completion_tokens"]
    assert sum(o.cost for o in outcomes) == pytest.approx(sum(h["cost"] for h in lm.history)) and lm.history


class _OnAnotherModel(dspy.Module):
    """Runs its predictor under ``dspy.context(lm=big)``: an LM the optimizer never sees or copies."""

    def __init__(self, inner, big):
        super().__init__()
        self.inner = inner
        self.big = big

    def forward(self, ticket):
        with dspy.context(lm=self.big):
            return self.inner(ticket=ticket)


@pytest.mark.http
def test_the_cost_of_lms_the_optimizer_does_not_hold_is_counted(routing):
    """An LLM-judge metric's own LM, or a dspy.context(lm=...) inside forward: their tokens were counted
    but their dollars were not (a cost_budget_usd blown 4-12 times over). Priced from DSPy's model
    metadata, as DSPy prices its own calls."""
    cfg = SimConfig(models=(ModelConfig("gpt-4o-mini", "student"), ModelConfig("gpt-4.1", "student")))
    with SimServer(cfg, seed=0) as srv:
        small = dspy.LM("openai/gpt-4o-mini", api_base=srv.base_url, api_key="x", cache=False)
        big = dspy.LM("openai/gpt-4.1", api_base=srv.base_url, api_key="x", cache=False)

        def judged(gold, pred, trace=None, pred_name=None, pred_trace=None):
            big(messages=[{"role": "user", "content": f"Is {pred.queue} right? " + "context " * 50}])
            return routing.metric(gold, pred, trace, pred_name, pred_trace)

        def spent() -> tuple[int, float]:
            """The big model's requests, and every token the server served priced at DSPy's own rates."""
            models = srv.stats()["models"]
            return models["gpt-4.1"]["requests"], sum(
                models[name]["prompt_tokens"] * _metadata_rates(f"openai/{name}")[0]
                + models[name]["completion_tokens"] * _metadata_rates(f"openai/{name}")[1]
                for name in ("gpt-4o-mini", "gpt-4.1"))

        bare = dspy.LM("gpt-4.1", api_base=srv.base_url, api_key="x", cache=False)  # no provider prefix

        def judged_bare(gold, pred, trace=None, pred_name=None, pred_trace=None):
            bare(messages=[{"role": "user", "content": f"Is {pred.queue} right? " + "context " * 50}])
            return routing.metric(gold, pred, trace, pred_name, pred_trace)

        for program, metric in ((routing.make_program(), judged),
                                (_OnAnotherModel(routing.make_program(), big), routing.metric),
                                (routing.make_program(), judged_bare)):
            requests, dollars = spent()
            ev, codec = make_evaluator(routing, program, n=6, metric=metric)
            outcomes = run_all(ev, codec, small, range(6))
            ev.close()
            assert all(o.failure is None for o in outcomes), [(o.failure, o.message) for o in outcomes]
            now_requests, now_dollars = spent()
            assert now_requests - requests == 6
            assert sum(o.cost for o in outcomes) == pytest.approx(now_dollars - dollars, rel=1e-6)


def test_a_priced_models_reported_cost_is_not_added_to_the_table_price():
    """price_table overrides what the provider (or litellm's guess) reports: for a model in the table
    the call is priced from the table only. Adding the reported cost on top counted it twice and ended a
    cost_budget_usd run early."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 500}
    with rollout_usage({"openai/my-finetune": (1.0, 2.0)}) as box:
        dspy.settings.usage_tracker.add_usage("openai/my-finetune", dict(usage))
        _note_history_entry({"model": "openai/my-finetune", "usage": dict(usage), "cost": 0.5})
    assert box.cost == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    with rollout_usage({"my-finetune": (1.0, 2.0)}) as box:  # listed without its provider prefix
        _note_history_entry({"model": "openai/my-finetune", "usage": dict(usage), "cost": 0.5})
    # priced from the table (our copy's call is counted from its history entry), never from "cost"
    assert box.cost == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6) and box.calls == 1


def test_run_stats_count_the_metrics_feedback_calls_of_this_session(tmp_path):
    """The metric's feedback calls (pred_name set) are not metric calls of the budget, as in dspy.GEPA,
    but each is paid with an LLM-judge metric, and reflections here read more examples than dspy.GEPA's:
    ``run_stats["feedback_calls"]`` counts them, raised ones included; a resume that replays every stored
    reflection makes none."""
    import json
    import threading

    from dspy_turbogepa.testing import TASKS

    from helpers import quick_compile

    task = TASKS["pipeline"]
    lock = threading.Lock()
    seen = {"feedback": 0}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            with lock:
                seen["feedback"] += 1
                if seen["feedback"] % 7 == 0:
                    raise RuntimeError("judge hiccup")  # left out of the reflection, still a call made
        return task.metric(gold, pred, trace, pred_name, pred_trace)

    data = small_splits(task, n_train=24, n_val=8, n_test=0)
    first = quick_compile(metric, task=task, data=data, budget=150, log_dir=str(tmp_path)).detailed_results
    stats = first.run_stats
    assert stats["feedback_calls"] == seen["feedback"] > 20
    assert stats["reflective_records_skipped"]["feedback_error"] == seen["feedback"] // 7
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["result"]["run_stats"]["feedback_calls"] == seen["feedback"]
    seen["feedback"] = 0
    again = quick_compile(metric, task=task, data=data, budget=150, log_dir=str(tmp_path)).detailed_results
    assert seen["feedback"] == 0 and again.run_stats["feedback_calls"] == 0
    # engine.md, after the run_stats table: tokens and cost are the whole run's, the other counts this session's
    rs = again.run_stats
    assert rs["reflection_calls"] == rs["task_lm_calls"] == rs["metric_calls_executed"] == 0
    assert rs["reflection_tokens"] == stats["reflection_tokens"] and rs["task_tokens"] == stats["task_tokens"]
    assert rs["reflection_tokens"]["prompt"] > 0 and rs["metric_calls_replayed"] > 0
    assert again.total_metric_calls == first.total_metric_calls
    # the search's own counts describe the search as replayed, the first session's steps included
    assert rs["mutations"] == stats["mutations"] and rs["scouted"] == stats["scouted"]
    assert rs["feedback_reused"] == stats["feedback_reused"] and rs["failures"] == stats["failures"]
