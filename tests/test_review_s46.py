"""Session 46's review findings: each test fails without its fix."""

from __future__ import annotations

import asyncio
import decimal
import logging

import dspy
import numpy as np
import pytest
from dspy.lm15 import Response, Usage

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.adapter.lm_copies import RolloutUsage, model_is_priced
from dspy_turbogepa.testing import make_reflection_lm, make_student_lm
from dspy_turbogepa.testing.fake_lm import AsyncSimEngine, SimEngine

from helpers import no_logging_configured, quick_compile, small_splits


class _AppLoopRouting(dspy.Module):
    """The routing program, waiting on an object of the application's own event loop (a connection pool's
    waiter warmed there) for tickets about refunds, in ``forward`` through an ``asyncio.run`` of its own
    (and in ``aforward`` in the subclass)."""

    def __init__(self, instructions, app_loop):
        super().__init__()
        self.route = dspy.Predict(dspy.Signature("ticket -> queue", instructions))
        self.app_loop = app_loop

    def forward(self, ticket):
        if "refund" in ticket.lower():
            async def wait():
                await self.app_loop.create_future()
            asyncio.run(wait())
        return self.route(ticket=ticket)


class _AppLoopRoutingAsync(_AppLoopRouting):
    async def aforward(self, ticket):
        if "refund" in ticket.lower():
            await self.app_loop.create_future()
        return await self.route.acall(ticket=ticket)


def _loop_warnings(program_type, routing, reflection_lm, caplog):
    """Compile ``program_type`` (waiting on another event loop's object) and return the run's failures and
    the warnings that quote asyncio's "attached to a different loop"."""
    app_loop = asyncio.new_event_loop()
    splits = small_splits(routing, n_train=20, n_val=12, n_test=0)
    opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=reflection_lm, num_threads=4,
                    track_stats=True, verbose=False)
    try:
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)), \
                caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
            out = opt.compile(program_type(routing.seed_instructions["route"], app_loop),
                              trainset=splits.train, valset=splits.val)
    finally:
        app_loop.close()
    warned = [r.getMessage() for r in caplog.records if "different loop" in r.getMessage()]
    return out.detailed_results.run_stats["failures"], warned


def test_an_async_object_of_another_event_loop_is_explained_in_the_failure(routing, reflection_lm, caplog):
    """A program whose aforward awaits something made on the application's own event loop (a pooled async
    client warmed there) fails on the engine's loop with asyncio's "attached to a different loop", which
    names neither loop: the failure says where aforward runs and what to do."""
    failures, warned = _loop_warnings(_AppLoopRoutingAsync, routing, reflection_lm, caplog)
    assert failures.get("program_error")
    assert warned and all("TurboGEPA's own event loop" in m for m in warned), warned


def test_the_event_loop_hint_is_not_given_to_a_program_without_aforward(routing, reflection_lm, caplog):
    """A sync program running asyncio itself on an object of another loop fails the same way under dspy.GEPA;
    it has no aforward, and the hint that blamed one pointed the wrong way."""
    _, warned = _loop_warnings(_AppLoopRouting, routing, reflection_lm, caplog)
    assert warned and not any("own event loop" in m for m in warned), warned



class _NoUsageEngine(SimEngine):
    """A simulated endpoint whose answers carry no token usage (some self-hosted servers and gateways)."""

    def _respond(self, request):
        answer = super()._respond(request)
        return Response(id=answer.id, model=answer.model, message=answer.message, finish_reason="stop", usage=Usage())


@pytest.mark.parametrize("names", [("student-x", "reflector-x"), ("shared-x", "shared-x")])
def test_an_lm_answering_without_token_usage_is_named_once(pipeline, caplog, names):
    """Its calls counted no tokens: token_budget=1000 let about 200x that be spent, and no line said so. One
    model serving both the program and the reflections is named once too."""

    def lm(role, name):
        engine = _NoUsageEngine(role)
        return dspy.LM(f"openai/{name}", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)

    splits = small_splits(pipeline, n_train=30, n_val=16, n_test=0)
    opt = TurboGEPA(pipeline.metric, max_metric_calls=120, reflection_lm=lm("reflector", names[1]), num_threads=8,
                    track_stats=True, verbose=False, token_budget=1000)
    with dspy.context(lm=lm("student", names[0])), caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        out = opt.compile(pipeline.make_program(), trainset=splits.train, valset=splits.val)
    assert out.detailed_results.stop_reason == "max_metric_calls"
    said = sorted(r.getMessage().split(" ", 1)[0] for r in caplog.records
                  if "answered without token usage" in r.getMessage())
    assert said == sorted({f"openai/{name}" for name in names}), said


def test_answers_from_dspys_cache_are_not_called_answers_without_usage(routing, caplog):
    """A cache hit's usage is emptied by DSPy on purpose; a rerun served by the cache must not be told that
    its LM reports no usage (a first version said so, and then the token cap it called inapplicable
    stopped the run)."""
    student = make_student_lm(seed=0, noise=0.0, cache=True)
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
            quick_compile(budget=40, lm=student)
        assert not [r for r in caplog.records if "without token usage" in r.getMessage()]


def test_a_price_table_key_with_the_provider_prices_an_lm_named_without_one():
    """dspy.LM("gpt-4o-mini") with price_table={"openai/gpt-4o-mini": ...}: the key was ignored and the calls
    priced at DSPy's own rate (575x lower in the review's case), or $0 for a model DSPy does not know."""
    table = {"openai/my-finetune": (100.0, 200.0)}
    assert model_is_priced("my-finetune", table)
    usage = RolloutUsage(prices=table)
    usage.add_tokens(10_000, 5_000, "my-finetune")
    assert usage.cost == pytest.approx(2.0)
    # of two providers' keys for the name, the dearer: a cap must not count less than the bill
    both = RolloutUsage(prices={"openai/my-finetune": (1.0, 1.0), "azure/my-finetune": (3.0, 3.0)})
    both.add_tokens(1_000_000, 0, "my-finetune")
    assert both.cost == pytest.approx(3.0)
    mixed = RolloutUsage(prices={"openai/m": (1.0, 10.0), "azure/m": (2.0, 1.0)})  # each rate the dearest
    mixed.add_tokens(1_000_000, 1_000_000, "m")
    assert mixed.cost == pytest.approx(12.0)
    # a prefixed model keeps matching only its own provider's key, or the bare name
    assert not model_is_priced("azure/my-finetune", table)


@pytest.mark.parametrize("value", [np.int64(5), np.float32(2.0), decimal.Decimal("0.5")])
def test_dollar_and_time_budgets_take_numpy_and_decimal_numbers(value, reflection_lm):
    """They were refused as "must be a positive number ... got np.int64(5)", while token_budget and
    max_metric_calls take NumPy integers; stored as floats (summary.json, the progress line)."""
    opt = TurboGEPA(lambda gold, pred, trace=None, pred_name=None, pred_trace=None: 1.0, max_metric_calls=10,
                    reflection_lm=reflection_lm, cost_budget_usd=value, time_budget_seconds=value,
                    price_table={"m": (np.float32(1.5), decimal.Decimal(2))})
    assert type(opt.cost_budget_usd) is float and opt.cost_budget_usd == float(value)
    assert type(opt.time_budget_seconds) is float and opt.time_budget_seconds == float(value)
    assert opt.price_table == {"m": (1.5, 2.0)}


def test_summary_json_is_streamed_not_built_as_one_string(tmp_path):
    """With every candidate's texts in it (30 predictors of 50 KB instructions: a 90 MB file) the whole
    indented file was one string plus its copy with the newline: the run's peak memory went from 356 to 621
    MB at the very end. Written as a stream, the report costs a small part of the file's size."""
    import json
    import tracemalloc

    from dspy_turbogepa.tracking.summary import write_summary

    base = {f"p{i}": f"Instruction {i}. " + "Answer yes or no about the question. " * 300 for i in range(10)}
    candidates = [base]
    for n in range(1, 40):  # each child changes one text and shares the others, as in memory
        child = dict(candidates[-1])
        child[f"p{n % 10}"] += f" Version {n}."
        candidates.append(child)

    class Result:
        val_aggregate_scores = [0.5] * len(candidates)
        best_idx = 0
        discovery_eval_counts = [0] * len(candidates)
        per_val_instance_best_candidates = {0: {0}}
        total_metric_calls = 100
        num_full_val_evals = len(candidates)

        def to_dict(self):
            return {"candidates": candidates, "val_aggregate_scores": self.val_aggregate_scores}

    tracemalloc.start()
    try:
        path = write_summary(tmp_path, Result())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert size > 4_000_000
    assert peak < size / 4, (peak, size)
    assert json.loads(path.read_text(encoding="utf-8"))["result"]["candidates"][-1] == candidates[-1]


def test_a_resumed_run_does_not_encode_its_stored_candidates_again(routing, tmp_path, monkeypatch):
    """Every replayed candidate was masked and JSON-encoded again, all its texts, for an insert the store
    then ignored (47.6 MB of text on a reviewer's 20-predictor resume, ~10% of its CPU)."""
    from dspy_turbogepa.store import RunStore

    quick_compile(budget=60, log_dir=str(tmp_path))
    recorded: list[str] = []
    original = RunStore.record_candidate

    def counting(self, fingerprint, *args, **kwargs):
        recorded.append(fingerprint)
        return original(self, fingerprint, *args, **kwargs)

    monkeypatch.setattr(RunStore, "record_candidate", counting)
    again = quick_compile(budget=60, log_dir=str(tmp_path))
    assert again.detailed_results.run_stats["metric_calls_executed"] == 0  # all replayed, nothing new
    assert recorded == []


def test_two_compiles_whose_log_dirs_end_in_the_same_name_are_told_apart(capsys, monkeypatch):
    """runs/pipeline/logs and runs/pricing/logs at once: both compiles' lines said ``[logs]``."""
    from dspy_turbogepa.tracking.console_logs import visible_logs

    log = logging.getLogger("dspy_turbogepa.labels_probe")
    with no_logging_configured(monkeypatch), visible_logs(True, label="logs"):
        log.info("first alone")
        with visible_logs(True, label="logs"):
            log.info("second")
        with visible_logs(True, label="other"):
            log.info("third")
        log.info("first")
    lines = capsys.readouterr().err.splitlines()
    said = {line.split(": ", 1)[1] for line in lines}
    assert said == {"first alone", "[logs#2] second", "[other] third", "first"}, lines


def test_a_keyboard_interrupt_raised_by_the_metric_is_not_called_a_second_ctrl_c(routing):
    """Nobody pressed anything: the metric raised KeyboardInterrupt in the run's thread, and compile said
    "Aborted by a second Ctrl-C". It still propagates, as under dspy.GEPA."""
    calls = [0]

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    with pytest.raises(KeyboardInterrupt) as raised:
        quick_compile(metric, budget=40)
    assert "not by Ctrl-C" in str(raised.value) and "second Ctrl-C" not in str(raised.value)


def test_an_endpoint_down_for_good_that_only_some_examples_call_stops_the_run(routing, monkeypatch):
    """A program routing each example to one of two endpoints: the second goes down for good. Every answer
    of the first broke the run's one outage streak, so the run never stopped: the examples routed to the
    second were scored failure_score until the budget ended (92 of them in the reviewer's run), called
    program_error. The streak is per endpoint, and the stop names it."""
    import zlib

    from dspy.utils.exceptions import LMServerError

    import dspy_turbogepa.teleprompter as teleprompter_module
    from dspy_turbogepa import SystemicFailureError
    from dspy_turbogepa.adapter.evaluator import DspyEvaluator
    from dspy_turbogepa.adapter.ratelimit import RetryPolicy
    from dspy_turbogepa.engine import systemic

    class FastEvaluator(DspyEvaluator):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("transient_policy", RetryPolicy(max_retries=1, max_elapsed_s=5.0, base_s=0.001,
                                                              cap_s=0.002))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(teleprompter_module, "DspyEvaluator", FastEvaluator)
    monkeypatch.setattr(systemic, "OUTAGE_MIN_SECONDS", 0.0)
    calls_b = [0]

    def endpoint_b_down(request):
        calls_b[0] += 1
        if calls_b[0] > 6:  # it answered the seed's first calls, then went down
            raise LMServerError("Service Unavailable")

    class Router(dspy.Module):
        def __init__(self):
            super().__init__()
            self.route = dspy.Predict(dspy.Signature("ticket -> queue", routing.seed_instructions["route"]))
            self.route_b = dspy.Predict(dspy.Signature("ticket -> queue", routing.seed_instructions["route"]))

        def forward(self, ticket):
            return (self.route_b if zlib.crc32(ticket.encode()) % 2 else self.route)(ticket=ticket)

    def endpoint(name, before_call=None):  # two deployments of one model: two endpoint keys
        engine = SimEngine("student", seed=0, before_call=before_call)
        return dspy.LM(f"sim/{name}", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)

    program = Router()
    program.route.lm = endpoint("endpoint-a")
    program.route_b.lm = endpoint("endpoint-b", before_call=endpoint_b_down)
    splits = small_splits(routing, n_train=16, n_val=12, n_test=0)
    opt = TurboGEPA(routing.metric, max_metric_calls=300, reflection_lm=make_reflection_lm(), num_threads=4,
                    track_stats=True, verbose=False)
    with pytest.raises(SystemicFailureError, match="because the LM service did") as info:
        opt.compile(program, trainset=splits.train, valset=splits.val)
    assert "calling sim/endpoint-b " in str(info.value) and "endpoint-a" not in str(info.value)


def test_data_whose_mapping_keys_changed_type_is_another_run(routing, tmp_path):
    """A label {1: "a"} became {"1": "a"}: the run key read both as the same data, and the rerun with the
    same log_dir replayed the old scores on the new data."""
    from types import SimpleNamespace

    from dspy_turbogepa.adapter.run_identity import _hashable
    from dspy_turbogepa.store import RunStoreMismatchError

    assert _hashable({1: "a"}) != _hashable({"1": "a"})
    assert _hashable({True: "a"}) != _hashable({"True": "a"}) != _hashable({1: "a"})
    assert _hashable({"a": 1}) == _hashable({"a": 1})

    splits = small_splits(routing, n_train=12, n_val=8, n_test=0)

    def labelled(key):
        def with_label(examples):
            return [ex.copy(extra={key: "a"}) for ex in examples]
        return SimpleNamespace(train=with_label(splits.train), val=with_label(splits.val))

    quick_compile(budget=30, data=labelled(1), log_dir=str(tmp_path))
    with pytest.raises(RunStoreMismatchError, match="trainset|valset"):
        quick_compile(budget=30, data=labelled("1"), log_dir=str(tmp_path))


def test_a_step_input_that_is_the_examples_own_field_is_stored_by_name(routing, tmp_path):
    """Every evaluation's row held its steps' inputs in full: an image input (3 MB of base64) made the store
    grow by that at every metric call (117 MB after 40 calls). An input that is the example's field is
    stored by the field's name and read back from the example."""
    import sqlite3

    from dspy_turbogepa.adapter.trajectory_json import trajectory_from_json, trajectory_to_json

    from helpers import seed_trajectory

    live, codec = seed_trajectory(routing)
    text = trajectory_to_json(live)
    assert live.example.ticket not in text
    back = trajectory_from_json(text, live.example, codec, "seed", codec.seed_texts())
    assert back.steps[0].inputs == live.steps[0].inputs == {"ticket": live.example.ticket}
    assert back.raw_trace[0][1]["ticket"] is live.example.ticket

    # through a compile: no stored row repeats its example's input
    data = small_splits(routing, n_train=12, n_val=8, n_test=0)
    quick_compile(budget=40, data=data, log_dir=str(tmp_path))
    with sqlite3.connect(tmp_path / "run.sqlite3") as db:
        rows = [r[0] for r in db.execute("select trajectory_json from evaluations where trajectory_json is not null")]
    tickets = [ex.ticket for ex in [*data.train, *data.val]]
    assert rows and not any(t in row for row in rows for t in tickets)


def test_a_str_enum_key_is_not_its_value():
    """Keys of a (str, Enum) hashed as the plain string of their value would make {Lang.EN: x} the data
    {"en": x}: the collision the typed keys remove, brought back by a str subclass."""
    import enum

    from dspy_turbogepa.adapter.run_identity import _hashable

    class Lang(str, enum.Enum):
        EN = "en"

    assert _hashable({Lang.EN: "x"}) != _hashable({"en": "x"})


def test_a_parents_service_failure_on_the_minibatch_does_not_make_its_child_look_better():
    """A service failure stays in the run's cache: a parent's 503 during a burst scored failure_score on that
    example for the rest of the run, and every child tried on it then gained a point there, whatever it was
    (dspy.GEPA evaluates the parent again on each minibatch). The rung-0 test leaves out the examples the
    service failed for either side: children that change nothing are never passed."""
    from engine.fakes import FakeEvaluator, FakeReflector, Setup, make_config, run_fakes

    from dspy_turbogepa.engine import EvalOutcome

    setup = Setup()
    seed_fp = setup.seed().fingerprint

    class SeedUnservedOnOneExample(FakeEvaluator):
        async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
            outcome = await super().evaluate(texts, fingerprint, split, example_id, capture_traces)
            if fingerprint == seed_fp and split == "train" and example_id == 5:  # the seed answers it right
                return EvalOutcome(example_id, 0.0, failure="program_error", error_type="LMServerError",
                                   message="503 Service Unavailable", service_failure=True)
            return outcome

    evaluator = SeedUnservedOnOneExample(setup.task)
    _, orch, _, _ = run_fakes(make_config(max_metric_calls=150, minibatch_sampling="epoch"), setup, evaluator=evaluator,
                              reflector=FakeReflector(mode="noise"))
    assert any(key == (seed_fp, "train", 5) for key in evaluator.calls)  # a minibatch held it
    assert sum(orch.stats.survived_rung0_by_kind.values()) == 0


def test_an_evaluation_that_called_no_lm_does_not_break_a_down_endpoints_streak():
    """Once the evaluator says which endpoints answer, an evaluation that names none (an example routed to
    no LM, a program error raised before the call) broke every streak: one such evaluation per round between
    the failures of an endpoint down for good, and the run never stopped."""
    from dspy_turbogepa.engine import EvalOutcome, SystemicFailureError
    from dspy_turbogepa.engine.systemic import SystemicFailureDetector

    now = [0.0]
    detector = SystemicFailureDetector(8, outage_window=4, clock=lambda: now[0], outage_min_seconds=0.0)
    detector.observe(EvalOutcome(0, 1.0, answered_by=frozenset({"a"})), split="train")
    with pytest.raises(SystemicFailureError, match="calling b "):
        for _ in range(12):
            now[0] += 1
            detector.observe(EvalOutcome(1, 0.0, failure="program_error", service_failure=True, service_endpoint="b",
                                         error_type="LMServerError", message="503"), split="train")
            detector.observe(EvalOutcome(2, 1.0, answered_by=frozenset({"a"})), split="train")
            detector.observe(EvalOutcome(3, 0.0, failure="program_error", error_type="ValueError"), split="train")
    # an evaluator that never names endpoints keeps the one streak any answer breaks
    legacy = SystemicFailureDetector(8, outage_window=4, clock=lambda: now[0], outage_min_seconds=0.0)
    legacy.observe(EvalOutcome(0, 1.0), split="train")
    for _ in range(12):
        legacy.observe(EvalOutcome(1, 0.0, failure="program_error", service_failure=True, message="503"),
                       split="train")
        legacy.observe(EvalOutcome(2, 1.0), split="train")


def test_a_score_setting_too_large_for_a_float_is_refused_as_not_finite(reflection_lm):
    """perfect_score=10**400 raised OverflowError from math.isfinite, not the argument's message."""
    with pytest.raises(ValueError, match="perfect_score must be finite"):
        TurboGEPA(lambda gold, pred, trace=None, pred_name=None, pred_trace=None: 1.0, max_metric_calls=10,
                  reflection_lm=reflection_lm, perfect_score=10**400)
