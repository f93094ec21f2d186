"""DSPy adapter semantics: errors become feedback, records are routed by predictor name, bad metric values."""

from __future__ import annotations

import itertools
import logging
import math
import threading

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.adapter.introspect import defines_own_aforward
from dspy_turbogepa.testing.fake_lm import make_student_lm, sim_engine

from helpers import FailsOnTracking, small_splits


class RecordingProposer:
    """A dspy.GEPA ProposalFn that records what it was given and appends a marker to each text."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, candidate, reflective_dataset, components_to_update):
        with self.lock:
            self.calls.append((dict(candidate), {k: list(v) for k, v in reflective_dataset.items()},
                               list(components_to_update)))
            n = len(self.calls)
        return {c: candidate[c] + f" v{n}" for c in components_to_update}


class TwinPipeline(dspy.Module):
    """Two predictors with *identical* signatures: dspy.GEPA would mix their trace records."""

    def __init__(self):
        super().__init__()
        self.first = dspy.Predict("text -> answer")
        self.second = dspy.Predict("text -> answer")

    def forward(self, text):
        a = self.first(text=text)
        return self.second(text=f"{text} | {a.answer}")


def twin_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    if pred_name is not None:
        assert pred_trace and pred_trace[0][1]["text"]
        return dspy.Prediction(score=0.0, feedback=f"feedback for {pred_name}")
    return 0.0


def _twin_lm():
    """A minimal fake task LM for TwinPipeline (dspy 3.4 engine API): always answers 'x'."""
    from dspy.lm15 import Message, Response, TextPart, Usage

    class Engine:
        def complete(self, request):
            text = "[[ ## answer ## ]]\nx\n\n[[ ## completed ## ]]"
            return Response(id=None, model="fake", message=Message.assistant([TextPart(text)]),
                            finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))

    class AEngine:
        def __init__(self, e):
            self.e = e

        async def complete(self, request):
            return self.e.complete(request)

    e = Engine()
    return dspy.LM("fake/twin", engine=e, async_engine=AEngine(e), cache=False)


def test_records_are_matched_by_predictor_name_not_signature():
    proposer = RecordingProposer()
    data = [dspy.Example(text=f"t{i}", answer="y").with_inputs("text") for i in range(6)]
    opt = TurboGEPA(twin_metric, max_metric_calls=40, instruction_proposer=proposer, num_threads=2,
                    reflection_minibatch_size=2, use_merge=False, skip_perfect_score=False,
                    component_selector="round_robin")
    with dspy.context(lm=_twin_lm()):
        opt.compile(TwinPipeline(), trainset=data, valset=data[:4])
    assert proposer.calls
    for _, dataset, components in proposer.calls:
        assert list(dataset) == components and len(components) == 1
        name = components[0]
        for rec in dataset[name]:
            assert set(rec) == {"Inputs", "Generated Outputs", "Feedback"}
            assert rec["Feedback"] == f"feedback for {name}"
            if name == "first":
                assert "|" not in rec["Inputs"]["text"]  # the second predictor's input never leaks in
            else:
                assert "|" in rec["Inputs"]["text"]
            assert isinstance(rec["Inputs"]["text"], str)  # custom proposers get strings, as in dspy.GEPA
    assert {c[2][0] for c in proposer.calls} == {"first", "second"}  # round robin over both


def test_program_exception_scores_failure_and_becomes_feedback(routing):
    proposer = RecordingProposer()
    splits = small_splits(routing, n_train=30, n_val=12)
    program = FailsOnTracking(routing.make_program())
    opt = TurboGEPA(routing.metric, max_metric_calls=120, instruction_proposer=proposer, num_threads=4,
                    failure_score=-1.0, use_merge=False, track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        optimized = opt.compile(program, trainset=splits.train, valset=splits.val)
    dr = optimized.detailed_results
    failing = [i for i, ex in enumerate(splits.val) if "tracking" in ex.ticket.lower()]
    assert failing, "the data should contain tracking tickets"
    for i in failing:
        assert dr.val_subscores[0][i] == -1.0
    assert dr.run_stats["failures"].get("program_error", 0) >= len(failing)
    error_records = [rec for _, ds, _ in proposer.calls for recs in ds.values() for rec in recs
                     if "CRM rejected" in rec["Feedback"]]
    assert error_records, "the program's error must reach the reflective dataset as feedback"
    # raised after the predictor answered: its record shows that answer, and the error as the feedback
    assert "RuntimeError" in error_records[0]["Feedback"] and set(error_records[0]["Generated Outputs"]) == {"queue"}


class NotFoundError(Exception):
    """The user's own error (a record-store miss), named like an LM client's 'unknown model'."""


ElasticNotFound = type("NotFoundError", (Exception,), {"__module__": "elasticsearch.exceptions"})


@pytest.mark.parametrize("error", [NotFoundError, ElasticNotFound], ids=["own", "elasticsearch"])
def test_a_programs_own_error_named_like_a_fatal_lm_error_is_an_ordinary_failure(routing, error):
    """Only the LM stack's AuthenticationError / NotFoundError / ... stop a run; a retrieval step's
    NotFoundError on some examples is scored failure_score, as in dspy.GEPA."""
    splits = small_splits(routing, n_train=30, n_val=12)
    program = FailsOnTracking(routing.make_program(), error=lambda: error("no CRM record for this ticket"))
    opt = TurboGEPA(routing.metric, max_metric_calls=120, instruction_proposer=RecordingProposer(), num_threads=4,
                    use_merge=False, track_stats=True, verbose=False)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        optimized = opt.compile(program, trainset=splits.train, valset=splits.val)
    dr = optimized.detailed_results
    failing = [i for i, ex in enumerate(splits.val) if "tracking" in ex.ticket.lower()]
    assert failing and all(dr.val_subscores[0][i] == 0.0 for i in failing)
    assert dr.run_stats["failures"]["program_error"] >= len(failing)
    assert dr.total_metric_calls >= 100  # the run went on to its budget instead of stopping


def test_a_seed_failing_on_most_of_a_small_valset_is_optimized_not_stopped(routing, reflection_lm):
    """8 of 12 validation examples raise (a data-dependent bug), and one thread evaluates them first:
    the first 8 evaluations all failed, which stopped the run as systemic. On a small valset the rule
    now waits for the whole seed pass, where 4 examples succeed."""
    splits = small_splits(routing, n_train=20, n_val=120)
    tracking = [ex for ex in splits.val if "tracking" in ex.ticket.lower()]
    others = [ex for ex in splits.val if "tracking" not in ex.ticket.lower()]
    assert len(tracking) >= 8 and len(others) >= 4
    valset = tracking[:8] + others[:4]  # the failing ones complete first
    opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=reflection_lm, num_threads=1,
                    track_stats=True, verbose=False)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        out = opt.compile(FailsOnTracking(routing.make_program()), trainset=splits.train, valset=valset)
    assert out.detailed_results.run_stats["failures"]["program_error"] >= 8


def test_a_programs_error_reaches_reflection_an_lm_services_does_not(routing):
    """A program's own DatabaseConnectionError is feedback (its name used to match 'Connection', a
    marker of LM-service errors, and was dropped); a 5xx the evaluator gave up on is the service's."""
    import random

    from dspy_turbogepa.adapter.program import ProgramCodec
    from dspy_turbogepa.adapter.reflective import ReflectiveDatasetBuilder
    from dspy_turbogepa.adapter.trajectory import DspyTrajectory

    class DatabaseConnectionError(Exception):
        pass

    proposer = RecordingProposer()
    splits = small_splits(routing, n_train=30, n_val=12)
    program = FailsOnTracking(routing.make_program(), error=lambda: DatabaseConnectionError("CRM database is down"))
    opt = TurboGEPA(routing.metric, max_metric_calls=120, instruction_proposer=proposer, num_threads=4,
                    use_merge=False, track_stats=True, verbose=False)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        optimized = opt.compile(program, trainset=splits.train, valset=splits.val)
    records = [rec for _, ds, _ in proposer.calls for recs in ds.values() for rec in recs]
    assert any("DatabaseConnectionError" in rec["Feedback"] for rec in records)
    assert optimized.detailed_results.run_stats["failures"]["program_error"] > 0

    codec = ProgramCodec(routing.make_program())
    builder = ReflectiveDatasetBuilder(codec, routing.metric, 0.0, False, False, False)
    ex = splits.train[0]
    service = DspyTrajectory(ex, None, [], [], "LMServerError: 503", "LMServerError", "program_error",
                             service_failure=True, failed_predictor="route")
    own = DspyTrajectory(ex, None, [], [], "DatabaseConnectionError: down", "DatabaseConnectionError",
                         "program_error", failed_predictor="route")
    data = builder.build(["route"], [service, own], [0.0, 0.0], random.Random(0))
    assert len(data["route"]) == 1 and "DatabaseConnectionError" in data["route"][0]["Generated Outputs"]
    assert builder.skipped["infrastructure_error"] == 1


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, "high", 10**400])
def test_invalid_metric_values_are_recorded_not_summed(routing, reflection_lm, bad):
    calls = {"n": 0}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            return bad
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    splits = small_splits(routing, n_train=20, n_val=12)
    opt = TurboGEPA(metric, max_metric_calls=60, reflection_lm=reflection_lm, num_threads=1, failure_score=0.0,
                    use_merge=False, track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        optimized = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    dr = optimized.detailed_results
    assert dr.run_stats["failures"]["metric_invalid"] >= 4
    assert all(math.isfinite(s) for subs in dr.val_subscores for s in subs.values())


@pytest.mark.parametrize("bad", [None, math.nan, "fast", object(), 10**400])
def test_invalid_objective_scores_are_recorded_not_raised(routing, reflection_lm, bad):
    """A bad objective value used to raise in the evaluation thread and end the compile."""
    from dspy_turbogepa.adapter.metric import read_metric_return

    reading = read_metric_return(dspy.Prediction(score=1.0, feedback="ok", objective_scores={"latency": bad}), 0.0)
    assert reading.invalid is not None and "objective_scores['latency']" in reading.invalid
    assert reading.score == 0.0
    good = read_metric_return({"score": 0.5, "objective_scores": {"latency": 2}}, 0.0)
    assert good.invalid is None and good.objective_scores == {"latency": 2.0}

    calls = {"n": 0}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls["n"] += 1
        base = routing.metric(gold, pred, trace, pred_name, pred_trace)
        score = base.score if hasattr(base, "score") else float(base)
        objective = bad if calls["n"] % 3 == 0 else 1.0
        return dspy.Prediction(score=score, feedback="fb", objective_scores={"latency": objective})

    splits = small_splits(routing, n_train=20, n_val=12)
    opt = TurboGEPA(metric, max_metric_calls=60, reflection_lm=reflection_lm, num_threads=2, failure_score=0.0,
                    use_merge=False, track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        optimized = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert optimized.detailed_results.run_stats["failures"]["metric_invalid"] >= 4


def test_metric_that_always_raises_stops_early(routing, reflection_lm):
    from dspy_turbogepa import SystemicFailureError

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise KeyError("answer_field")

    splits = small_splits(routing, n_train=20, n_val=16)
    opt = TurboGEPA(metric, max_metric_calls=500, reflection_lm=reflection_lm, num_threads=4)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)), \
            pytest.raises(SystemicFailureError, match="metric") as info:
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert "log_dir" not in str(info.value)  # no run store: nothing to say about reusing one


@pytest.mark.parametrize("n_val", [None, 3])
def test_a_metric_that_always_raises_stops_the_run_on_tiny_data_too(routing, reflection_lm, n_val):
    """The systemic window (8 failed evaluations at least) could not fill with 4 training examples and
    valset=None (4 evaluations), or 4 + 3: compile returned the seed as if every failure were fine."""
    from dspy_turbogepa import SystemicFailureError

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise RuntimeError("metric is broken")

    splits = small_splits(routing, n_train=4, n_val=3)
    opt = TurboGEPA(metric, max_metric_calls=200, reflection_lm=reflection_lm, num_threads=4)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)), pytest.raises(SystemicFailureError, match="metric"):
        opt.compile(routing.make_program(), trainset=splits.train, valset=None if n_val is None else splits.val)


def test_a_failed_reflection_on_tiny_data_is_a_skip_not_a_systemic_stop(routing):
    """The evaluation window is capped at the examples there are; the reflection window took the same
    cap, so with one training example a single reflection LM hiccup stopped the run as systemic."""
    from dspy_turbogepa.testing.fake_lm import make_reflection_lm

    hiccups = {"left": 3}

    def before_call(request):
        if hiccups["left"] > 0:
            hiccups["left"] -= 1
            raise RuntimeError("reflection LM hiccup")

    splits = small_splits(routing, n_train=3, n_val=1)
    reflection_lm = make_reflection_lm(seed=0, before_call=before_call)
    opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=reflection_lm, num_threads=4, track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        dr = opt.compile(routing.make_program(), trainset=splits.train, valset=None).detailed_results
    assert dr.run_stats["proposal_skips"].get("proposer_error") == 3


def test_proposer_that_raises_or_returns_nothing_is_skipped(routing):
    state = {"n": 0}

    def proposer(candidate, reflective_dataset, components_to_update):
        state["n"] += 1
        if state["n"] % 3 == 1:
            raise RuntimeError("proposer exploded")
        if state["n"] % 3 == 2:
            return dict.fromkeys(components_to_update, "   ")
        return {c: candidate[c] + " Disputes over charges go to payments." for c in components_to_update}

    splits = small_splits(routing, n_train=30, n_val=12)
    opt = TurboGEPA(routing.metric, max_metric_calls=150, instruction_proposer=proposer, num_threads=4,
                    use_merge=False, track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        optimized = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    skips = optimized.detailed_results.run_stats["proposal_skips"]
    assert skips.get("proposer_error", 0) >= 1 and skips.get("empty_proposal", 0) >= 1


def _scripted_lm(answer_for):
    """A fake task LM (dspy 3.4 engine API) whose raw completion text is answer_for(last user message)."""
    from dspy.lm15 import Message, Response, TextPart, Usage

    class Engine:
        def complete(self, request):
            text = answer_for(request.messages[-1].text or "")
            return Response(id=None, model="fake", message=Message.assistant([TextPart(text)]), finish_reason="stop",
                            usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))

    class AEngine:
        def __init__(self, e):
            self.e = e

        async def complete(self, request):
            return self.e.complete(request)

    e = Engine()
    return dspy.LM("fake/scripted", engine=e, async_engine=AEngine(e), cache=False)


def _half_unparseable():
    """Six examples whose odd ones get an unparseable answer, the scripted LM, and a metric with feedback."""
    data = [dspy.Example(text=f"t{i}", answer="y").with_inputs("text") for i in range(6)]

    def answer_for(msg):
        if any(f"t{i}" in msg for i in (1, 3, 5)):
            return "no fields here"
        return "[[ ## answer ## ]]\ny\n\n[[ ## completed ## ]]"

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return dspy.Prediction(score=float(pred.answer == gold.answer), feedback="fine")

    return data, _scripted_lm(answer_for), metric


@pytest.mark.parametrize("flag", [True, False])
def test_format_failures_reach_reflection(flag):
    proposer = RecordingProposer()
    data, lm, metric = _half_unparseable()

    opt = TurboGEPA(metric, max_metric_calls=30, instruction_proposer=proposer, num_threads=2, use_merge=False,
                    add_format_failure_as_feedback=flag, skip_perfect_score=False, track_stats=True,
                    reflection_minibatch_size=6)
    with dspy.context(lm=lm):
        program = opt.compile(dspy.Predict("text -> answer"), trainset=data, valset=data[:4])
    assert program.detailed_results.run_stats["failures"]["format_error"] >= 1
    records = [r for _, ds, _ in proposer.calls for recs in ds.values() for r in recs]
    failed = [r for r in records if isinstance(r["Generated Outputs"], str)]
    assert failed and "no fields here" in failed[0]["Generated Outputs"]
    if flag:
        assert failed[0]["Feedback"].startswith("Your output failed to parse. Follow this structure:")
    else:
        assert "failed to parse" in failed[0]["Feedback"]


def test_format_failure_structure_shows_the_parents_instruction():
    """The "Follow this structure" block is the reflected candidate's own prompt, as dspy.GEPA formats
    its built candidate: it showed the seed's instruction in every reflection, pulling proposals back
    toward the seed."""
    proposer = RecordingProposer()
    data, lm, metric = _half_unparseable()

    # ties accepted, so children (whose texts do not change the answers) become parents
    opt = TurboGEPA(metric, max_metric_calls=60, instruction_proposer=proposer, num_threads=2, use_merge=False,
                    add_format_failure_as_feedback=True, skip_perfect_score=False,
                    reflection_minibatch_size=6, gepa_kwargs={"acceptance_criterion": "improvement_or_equal"})
    with dspy.context(lm=lm):
        opt.compile(dspy.Predict("text -> answer"), trainset=data, valset=data[:4])
    seed_text = dspy.Predict("text -> answer").signature.instructions
    checked = 0
    for candidate, dataset, _ in proposer.calls:
        for name, records in dataset.items():
            for record in records:
                if isinstance(record["Generated Outputs"], str):
                    assert f"{candidate[name]}\n" in record["Feedback"]
                    checked += candidate[name] != seed_text
    assert checked


def test_score_mismatch_warns_once(routing, caplog):
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        base = routing.metric(gold, pred, trace, pred_name, pred_trace)
        if pred_name is not None:
            return dspy.Prediction(score=0.123, feedback=base.feedback)  # predictor-level score differs
        return base

    splits = small_splits(routing, n_train=20, n_val=8)
    opt = TurboGEPA(metric, max_metric_calls=80, instruction_proposer=RecordingProposer(), num_threads=2,
                    use_merge=False)
    with caplog.at_level("WARNING"), dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert sum("differs from the score" in r.getMessage() for r in caplog.records) == 1
    opt2 = TurboGEPA(metric, max_metric_calls=80, instruction_proposer=RecordingProposer(), num_threads=2,
                     use_merge=False, warn_on_score_mismatch=False)
    caplog.clear()
    with caplog.at_level("WARNING"), dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        opt2.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert not any("differs from the score" in r.getMessage() for r in caplog.records)


class _OwnAsync(dspy.Module):
    def __init__(self):
        super().__init__()
        self.p = dspy.Predict("q -> a")

    async def aforward(self, q):
        return await self.p.acall(q=q)


class _PredictSubclass(dspy.Predict):
    pass


class _PredictSubclassOwnAsync(dspy.Predict):
    async def aforward(self, **kwargs):
        return await super().aforward(**kwargs)


class _SyncOverride(_OwnAsync):
    """Overrides only forward: the base's aforward no longer says what the program does."""

    def forward(self, q):
        return self.p(q=q)


class _BothOverride(_SyncOverride):
    async def aforward(self, q):
        return await self.p.acall(q=q)


@pytest.mark.parametrize("program, expected", [
    (_SyncOverride(), False),
    (_BothOverride(), True),
    (dspy.Predict("q -> a"), False),
    (dspy.ChainOfThought("q -> a"), False),
    (dspy.ReAct("q -> a", tools=[lambda x: x]), False),
    (_PredictSubclass("q -> a"), False),
    (TwinPipeline(), False),
    (_OwnAsync(), True),
    (_PredictSubclassOwnAsync("q -> a"), True),
])
def test_only_a_users_own_aforward_makes_a_program_async(program, expected):
    assert defines_own_aforward(program) is expected


def test_bare_predict_student_with_a_sync_only_lm_compiles(routing, reflection_lm):
    """A bare dspy.Predict defines aforward (DSPy's own); the user's local-model LM implements only
    forward(). dspy.GEPA runs it in threads; so must we (the async path failed every rollout)."""
    sim = make_student_lm(seed=0, noise=0.0)

    class SyncOnlyLM(dspy.BaseLM):
        def __init__(self):
            super().__init__(model="local/my-model", cache=False)

        def forward(self, prompt=None, messages=None, **kwargs):
            return sim.forward(prompt=prompt, messages=messages, **kwargs)

    splits = small_splits(routing, n_train=20, n_val=12, n_test=0)
    student = dspy.Predict(dspy.Signature("ticket -> queue", routing.seed_instructions["route"]))
    opt = TurboGEPA(routing.metric, max_metric_calls=100, reflection_lm=reflection_lm, num_threads=4,
                    track_stats=True, verbose=False)
    with dspy.context(lm=SyncOnlyLM()):
        out = opt.compile(student, trainset=splits.train, valset=splits.val)
    scores = out.detailed_results.val_aggregate_scores
    assert max(scores) > scores[0]


class _SyncAndAsync(dspy.Module):
    """A user program with both forward and aforward (dspy.GEPA calls forward)."""

    def __init__(self, instructions):
        super().__init__()
        self.route = dspy.Predict(dspy.Signature("ticket -> queue", instructions))

    def forward(self, ticket):
        return self.route(ticket=ticket)

    async def aforward(self, ticket):
        return await self.route.acall(ticket=ticket)


class _SyncAndDegradingAsync(_SyncAndAsync):
    """Its aforward answers a default queue when the call fails, whatever the error."""

    async def aforward(self, ticket):
        try:
            return await self.route.acall(ticket=ticket)
        except Exception:
            return dspy.Prediction(queue="general")


@pytest.mark.parametrize("program_type", [_SyncAndAsync, _SyncAndDegradingAsync])
@pytest.mark.parametrize("lm_kind", ["engine_without_async_engine", "base_lm_with_forward_only"])
def test_an_async_program_falls_back_to_its_forward_when_an_lm_cannot_run_async(routing, reflection_lm, lm_kind,
                                                                                   program_type, caplog):
    """A program defining aforward runs through acall; with an LM that has no async support (an engine
    passed without async_engine=, a BaseLM implementing only forward) every rollout failed and the run
    stopped as systemic, where dspy.GEPA (which calls forward) optimizes it. An aforward that catches the
    error itself must fall back too: it answered its default on every rollout (the run stopped as
    "nothing to reflect on"; with a second predictor it would have been scored on the default)."""
    sim = make_student_lm(seed=0, noise=0.0)
    if lm_kind == "engine_without_async_engine":
        lm = dspy.LM("sim/student", engine=sim_engine(sim), cache=False)
    else:
        class SyncOnlyLM(dspy.BaseLM):
            def __init__(self):
                super().__init__(model="local/my-model", cache=False)

            def forward(self, prompt=None, messages=None, **kwargs):
                return sim.forward(prompt=prompt, messages=messages, **kwargs)

        lm = SyncOnlyLM()
    splits = small_splits(routing, n_train=20, n_val=12, n_test=0)
    program = program_type(routing.seed_instructions["route"])
    assert defines_own_aforward(program)
    opt = TurboGEPA(routing.metric, max_metric_calls=100, reflection_lm=reflection_lm, num_threads=4,
                    track_stats=True, verbose=False)
    with dspy.context(lm=lm), caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        out = opt.compile(program, trainset=splits.train, valset=splits.val)
    dr = out.detailed_results
    assert dr.run_stats["failures"] == {}
    assert max(dr.val_aggregate_scores) > dr.val_aggregate_scores[0]
    assert sum("cannot run asynchronously" in r.getMessage() for r in caplog.records) == 1


def test_an_async_only_program_with_a_sync_only_lm_stops_with_the_cause(routing, reflection_lm):
    """Without a forward of its own there is nothing to fall back to: the run stops early, naming the fix."""
    from dspy_turbogepa import SystemicFailureError

    class AsyncOnly(dspy.Module):
        def __init__(self):
            super().__init__()
            self.route = dspy.Predict(dspy.Signature("ticket -> queue", routing.seed_instructions["route"]))

        async def aforward(self, ticket):
            return await self.route.acall(ticket=ticket)

    lm = dspy.LM("sim/student", engine=sim_engine(make_student_lm(seed=0, noise=0.0)), cache=False)
    splits = small_splits(routing, n_train=20, n_val=12, n_test=0)
    opt = TurboGEPA(routing.metric, max_metric_calls=100, reflection_lm=reflection_lm, num_threads=4)
    with dspy.context(lm=lm), pytest.raises(SystemicFailureError, match="async_engine"):
        opt.compile(AsyncOnly(), trainset=splits.train, valset=splits.val)


def test_a_parse_failure_is_fed_back_to_the_predictor_that_failed_only():
    """Two predictors with the same fields and other instructions: when the first one's output does not
    parse, the second never ran and must not be shown (nor rewritten for) the first one's failure."""
    from dspy_turbogepa import SystemicFailureError

    class TwoSteps(dspy.Module):
        def __init__(self):
            super().__init__()
            self.first = dspy.Predict(dspy.Signature("text -> answer", "Count the As."))
            self.second = dspy.Predict(dspy.Signature("text -> answer", "Count the Bs."))

        def forward(self, text):
            return self.second(text=f"{text} | {self.first(text=text).answer}")

    proposer = RecordingProposer()
    data = [dspy.Example(text=f"t{i}", answer="y").with_inputs("text") for i in range(8)]
    opt = TurboGEPA(lambda gold, pred, trace=None, pred_name=None, pred_trace=None: float(pred.answer == "y"),
                    max_metric_calls=60, instruction_proposer=proposer, num_threads=2, use_merge=False,
                    component_selector="all", add_format_failure_as_feedback=True)
    with dspy.context(lm=_scripted_lm(lambda msg: "no fields here")), pytest.raises(SystemicFailureError):
        opt.compile(TwoSteps(), trainset=data, valset=data)  # nothing ever parses: stops after 3 candidates
    assert proposer.calls
    for _, dataset, to_update in proposer.calls:
        # only the failing predictor gets records; both selected components are asked, as dspy.GEPA asks
        assert set(dataset) == {"first"} and to_update == ["first", "second"]


def test_nothing_ever_parses_and_reflection_repeats_itself_stops_with_an_error():
    """A reflection that answers the same text every time builds one new candidate, then only known ones:
    the format-error rule waited for a third candidate that never came, and the no-progress stop returned
    the seed (0.0, every evaluation failed) as if optimized, after 25 paid reflections."""
    from dspy_turbogepa import SystemicFailureError

    calls = []

    def same_text(candidate, reflective_dataset, components_to_update):
        calls.append(1)
        return dict.fromkeys(components_to_update, "Answer the question.")

    data = [dspy.Example(text=f"t{i}", answer="y").with_inputs("text") for i in range(8)]
    opt = TurboGEPA(lambda gold, pred, trace=None, pred_name=None, pred_trace=None: float(pred.answer == "y"),
                    max_metric_calls=2000, instruction_proposer=same_text, num_threads=2, use_merge=False,
                    add_format_failure_as_feedback=True)
    with dspy.context(lm=_scripted_lm(lambda msg: "no fields here")), \
            pytest.raises(SystemicFailureError, match="no candidate that parses") as info:
        opt.compile(dspy.Predict("text -> answer"), trainset=data, valset=data)
    assert "format_error" in str(info.value) and calls
    # a stop the user asked for returns the run so far, failures and all
    opt = TurboGEPA(lambda gold, pred, trace=None, pred_name=None, pred_trace=None: float(pred.answer == "y"),
                    max_metric_calls=2000, instruction_proposer=same_text, num_threads=2, use_merge=False,
                    track_stats=True, gepa_kwargs={"stop_callbacks": [lambda state: True]})
    with dspy.context(lm=_scripted_lm(lambda msg: "no fields here")):
        program = opt.compile(dspy.Predict("text -> answer"), trainset=data, valset=data)
    assert program.detailed_results.stop_reason == "stop_callback"


def test_the_first_failure_of_each_kind_is_logged_once(routing, reflection_lm, caplog):
    """A metric or program error must show in the log (dspy.GEPA logs every one): the first of each kind
    is a warning naming it, the rest are counted, not repeated."""
    import logging

    splits = small_splits(routing, n_train=30, n_val=12)

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if "refund" in gold.ticket.lower():
            raise KeyError("label_column")
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    opt = TurboGEPA(metric, max_metric_calls=80, reflection_lm=reflection_lm, num_threads=4, track_stats=True)
    with caplog.at_level(logging.WARNING), dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        out = opt.compile(FailsOnTracking(routing.make_program()), trainset=splits.train, valset=splits.val)
    failures = out.detailed_results.run_stats["failures"]
    assert failures["metric_error"] > 1 and failures["program_error"] > 1
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("An evaluation failed")]
    assert len(logged) == 2, logged
    assert any("metric_error" in m and "label_column" in m for m in logged)
    assert any("program_error" in m and "CRM rejected" in m for m in logged)


def test_a_trace_step_of_a_copied_predictor_goes_to_every_predictor_it_equals():
    """Per-call copies (BestOfN, Refine) are matched by signature; a copy of one of two predictors with
    equal signatures cannot be told apart, so its step goes to both, as dspy.GEPA gives it, not to the
    first only (which left the other without reflective data)."""
    import copy

    from dspy_turbogepa.adapter.program import PredictorNames

    class Two(dspy.Module):
        def __init__(self):
            super().__init__()
            self.draft = dspy.Predict("question -> answer")
            self.check = dspy.Predict("question -> answer")
            self.other = dspy.Predict(dspy.Signature("question -> answer", "Check twice."))

    program = Two()
    names = PredictorNames(program)
    assert names.names_of(program.check) == ["check"]  # the object itself: exact
    copied = copy.deepcopy(program)
    assert names.names_of(copied.check) == ["draft", "check"]
    assert names.names_of(copied.other) == ["other"]
    assert names.names_of(object()) == ["?"]
    assert names.signature_owner(copied.other.signature) == "other"
    assert names.signature_owner(copied.check.signature) is None  # ambiguous: judged by its fields


class _TwoEqualAndABestOfN(dspy.Module):
    def __init__(self):
        super().__init__()
        self.x = dspy.Predict("question -> answer")
        self.y = dspy.Predict("question -> answer")  # the same signature as x
        self.z = dspy.BestOfN(dspy.Predict("question -> other"), N=1, reward_fn=lambda a, p: 1.0, threshold=1.0)

    def forward(self, question):
        return dspy.Prediction(answer=self.x(question=question).answer,
                               answer2=self.y(question=question + " [for y]").answer,
                               other=self.z(question=question).other)


def test_predictors_outside_a_best_of_n_keep_their_own_trace_steps(reflection_lm):
    """A program holding a BestOfN runs each call on a copy; its steps were matched by signature even for
    predictors outside the BestOfN, so two predictors sharing a signature got each other's calls (and
    each other's per-predictor feedback). Copies are matched to names by identity through the copy."""
    from dspy_turbogepa.adapter.program import ProgramCodec

    built = ProgramCodec(_TwoEqualAndABestOfN()).get("seed", {})
    program, names = built.for_call()
    assert program is not built.program
    assert names.names_of(program.x) == ["x"] and names.names_of(program.y) == ["y"]
    assert built.names.names_of(program.x) == ["x", "y"]  # what matching by signature gave

    seen = []

    def proposer(candidate, reflective_dataset, components_to_update):
        seen.append({k: [r["Inputs"]["question"] for r in v] for k, v in reflective_dataset.items()})
        return {c: candidate[c] + " v2" for c in components_to_update if c in reflective_dataset}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 0.0

    data = [dspy.Example(question=f"question {i}", answer="a").with_inputs("question") for i in range(4)]
    opt = TurboGEPA(metric, max_metric_calls=12, reflection_lm=reflection_lm, num_threads=1,
                    component_selector="all", instruction_proposer=proposer, reflection_minibatch_size=2)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        opt.compile(_TwoEqualAndABestOfN(), trainset=data, valset=data)
    assert seen and all(ds["x"] for ds in seen)
    for ds in seen:
        assert not any("[for y]" in q for q in ds["x"]), ds
        assert all("[for y]" in q for q in ds["y"]), ds


class _FirstAttemptFails(dspy.Module):
    """Raises under BestOfN's first rollout of a call (an even rollout id), answers under the second."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ticket):
        lm = self.inner.get_lm()
        if lm is not None and lm.kwargs.get("rollout_id", 0) % 2 == 0:
            raise ValueError("the first attempt fails")
        return self.inner(ticket=ticket)


def test_a_best_of_n_program_runs_each_evaluation_on_a_fresh_copy(routing, reflection_lm):
    """dspy.GEPA builds a fresh program per evaluation batch; one program object per candidate for the
    whole run let BestOfN's fail_count, lowered on every failed attempt, run out, and every later
    rollout whose first attempt failed raised (a solved seed looked broken). The student is never
    touched."""
    program = dspy.BestOfN(_FirstAttemptFails(routing.make_program()), N=3, reward_fn=lambda args, pred: 1.0,
                           threshold=1.0, fail_count=1)
    splits = small_splits(routing, n_train=12, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=reflection_lm, num_threads=4,
                    track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        optimized = opt.compile(program, trainset=splits.train, valset=splits.val)
    dr = optimized.detailed_results
    assert dr.run_stats["failures"].get("program_error", 0) == 0
    assert dr.total_metric_calls >= 60 and program.fail_count == 1


class _HoldsData(dspy.Module):
    """A BestOfN inside a module that also holds what must not be copied per call (a corpus, and with
    ``lock=True`` a lock, which deepcopy refuses) and a tool bound to the module."""

    def __init__(self, inner, lock: bool = False):
        super().__init__()
        if lock:
            self.lock = threading.Lock()
        self.corpus = {f"doc{i}": "text" for i in range(1000)}
        self.best = dspy.BestOfN(_FirstAttemptFails(inner), N=3, reward_fn=lambda args, pred: 1.0, threshold=1.0,
                                 fail_count=1)
        if not lock:  # (dspy's own deepcopy binds such a tool to the student when the module holds a lock)
            self.tools = [self.lookup]

    def lookup(self, key):
        return self.corpus.get(key)

    def forward(self, ticket):
        return self.best(ticket=ticket)


def test_a_best_of_n_copy_shares_data_locks_and_lms_and_rebinds_tools(routing, reflection_lm):
    """The per-call copy of a BestOfN program copied everything: a lock made it fail (and the program ran
    shared, fail_count running out again), and a corpus held by the program was copied per call."""
    from dspy_turbogepa.adapter.program import ProgramCodec

    built = ProgramCodec(_HoldsData(routing.make_program())).get("seed", {})
    first, second = built.for_call()[0], built.for_call()[0]
    assert first is not second and first.best is not built.program.best
    assert first.corpus is built.program.corpus and first.tools[0].__self__ is first  # shared / rebound
    program = _HoldsData(routing.make_program(), lock=True)
    built = ProgramCodec(program).get("seed", {})
    assert built.for_call()[0].lock is built.program.lock

    class Retriever:  # callable, like dspy.retrievers.Embeddings: data, not structure
        def __init__(self):
            self.lock = threading.Lock()
            self.corpus = ["passage"] * 1000

        def __call__(self, query):
            return self.corpus[:3]

    with_retriever = _HoldsData(routing.make_program())
    with_retriever.search = Retriever()
    with_retriever.tools = [with_retriever.search, dspy.Tool(with_retriever.search.__call__)]
    built = ProgramCodec(with_retriever).get("seed", {})
    copied = built.for_call()[0]
    assert copied is not built.program and copied.search is built.program.search  # shared, lock and all
    assert copied.tools[1].func.__self__ is built.program.tools[1].func.__self__  # a tool around data: shared
    two_holders = _HoldsData(routing.make_program())
    two_holders.helper = dspy.Module()
    two_holders.helper.tools = two_holders.tools  # one list of bound methods, held by two modules
    copied = ProgramCodec(two_holders).get("seed", {}).for_call()[0]
    assert copied.helper.tools is copied.tools and copied.tools[0].__self__ is copied  # copied once, for both
    splits = small_splits(routing, n_train=12, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=60, reflection_lm=reflection_lm, num_threads=4,
                    track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        dr = opt.compile(program, trainset=splits.train, valset=splits.val).detailed_results
    assert dr.run_stats["failures"].get("program_error", 0) == 0


def test_no_new_call_after_compile_raised(pipeline, reflection_lm):
    """A rollout still running when the run stops (here: on a systemic failure) cannot be recalled, but
    nothing new may start after compile raised: not its metric (nobody reads that score, and a judge
    metric's call is paid), nor the second step of a two-step program."""
    import time

    from dspy_turbogepa import SystemicFailureError
    from dspy_turbogepa.testing.fake_lm import request_messages

    splits = small_splits(pipeline, n_train=16, n_val=3)
    slow = [v for ex in splits.train[8:] for v in ex.inputs().values() if isinstance(v, str)]
    raised = threading.Event()
    late = {"lm": 0, "metric": 0}

    def before_call(request):
        if raised.is_set():
            late["lm"] += 1
        if any(v in repr(request_messages(request)) for v in slow):
            time.sleep(0.5)

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if raised.is_set():
            late["metric"] += 1
        raise RuntimeError("broken metric")

    opt = TurboGEPA(metric, max_metric_calls=300, reflection_lm=reflection_lm, num_threads=16)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0, before_call=before_call)), \
            pytest.raises(SystemicFailureError):
        opt.compile(pipeline.make_program(), trainset=splits.train, valset=splits.val)
    raised.set()
    time.sleep(1.5)  # the slow rollouts finish their first step meanwhile
    assert late == {"lm": 0, "metric": 0}


def test_an_error_message_ending_in_a_newline_gets_no_dangling_sentence():
    """LM clients end some messages with a newline: "...access\n. Scored failure_score" in the log."""
    from dspy_turbogepa.adapter.evaluator import _describe

    text = _describe(RuntimeError("Incorrect API key.\n  - Verify your account has access\n"))
    assert text == "RuntimeError: Incorrect API key.\n  - Verify your account has access"


def _users_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return {}["answer"]


def test_an_error_raised_by_the_users_code_names_the_line_that_raised(routing):
    """The outcome's message is all a user sees of their metric's or program's error (the first warning,
    the systemic stop); it named the error but not where, and the traceback showed only internal
    frames. The reflection does not read the location: code it cannot see, a text that differs between
    a checkout and an install."""
    import json

    from dspy_turbogepa.adapter.evaluator import _user_frame

    _, run = _unit_evaluator(routing, _users_metric)
    outcome = run(split="train")
    line = _users_metric.__code__.co_firstlineno + 1
    assert outcome.failure == "metric_error"
    assert outcome.message == f"The metric raised KeyError: 'answer' (at test_adapter.py:{line} in _users_metric)"
    assert outcome.trajectory.error == "The metric raised KeyError: 'answer'"
    try:  # raised inside a library called from the user's code: the user's line that called it
        json.loads("{")
    except ValueError as exc:
        assert _user_frame(exc).endswith("in test_an_error_raised_by_the_users_code_names_the_line_that_raised)")
        assert "decoder.py" not in _user_frame(exc)
    assert _user_frame(RuntimeError("never raised: no traceback, no location")) == ""


# --------------------------------------------------------------------------- evaluator and metric, unit level
def _unit_evaluator(routing, metric, program=None, failure_score=0.0, **kw):
    import asyncio

    from helpers import make_evaluator

    ev, codec = make_evaluator(routing, program, metric=metric, failure_score=failure_score, max_workers=2, **kw)

    def run(split="val", example_id=0, lm=None):
        async def main():
            with dspy.context(lm=lm or make_student_lm(seed=0, noise=0.0)):
                return await ev.evaluate(codec.seed_texts(), "seed", split, example_id, True)

        return asyncio.run(main())

    return ev, run


@pytest.mark.parametrize("bad", [None, math.nan, "high", object()], ids=["none", "nan", "str", "object"])
def test_an_invalid_metric_value_scores_the_users_failure_score(bad):
    """A user who sets failure_score=-1.0 ranks a candidate whose metric gave no usable score below any
    real score, 0.0 included; scoring it 0.0 would rank it with the honest zeros."""
    from dspy_turbogepa.adapter.metric import read_metric_return

    reading = read_metric_return(bad, -1.0)
    assert reading.invalid is not None and reading.score == -1.0
    structured = read_metric_return(dspy.Prediction(score=bad, feedback="judge said nothing"), -1.0)
    assert structured.invalid is not None and structured.score == -1.0
    assert structured.feedback == "judge said nothing"


def test_a_metric_that_raises_scores_the_users_failure_score(routing):
    """failure_score=-1.0 tells failures apart from wrong answers (0.0); a raising metric is a failure."""

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise KeyError("label_column")

    ev, run = _unit_evaluator(routing, metric, failure_score=-1.0)
    try:
        outcome = run()
    finally:
        ev.close()
    assert outcome.failure == "metric_error" and "label_column" in outcome.message
    assert outcome.score == -1.0


def test_the_scoring_metric_call_passes_no_trace(routing):
    """DSPy metrics commonly return a bool when bootstrapping (``trace is not None``) and the float score
    otherwise; GEPA scores with trace=None, pred_name=None, pred_trace=None, so the float is what counts."""
    seen = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        seen.append((trace, pred_name, pred_trace))
        score = 0.7
        return score >= 0.5 if trace is not None else score

    ev, run = _unit_evaluator(routing, metric)
    try:
        outcome = run()
    finally:
        ev.close()
    assert seen == [(None, None, None)]
    assert outcome.failure is None and outcome.score == 0.7


def test_best_outputs_are_kept_for_validation_examples_only(routing):
    """track_best_outputs reports outputs per validation example; keeping every training rollout's
    prediction too would hold (and store) outputs nobody reads, for the whole run."""

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 1.0

    ev, run = _unit_evaluator(routing, metric, keep_outputs=True)
    try:
        val, train = run("val"), run("train")
    finally:
        ev.close()
    assert val.failure is None and isinstance(val.output, dspy.Prediction)
    assert train.failure is None and train.output is None


def test_no_metric_call_for_a_single_step_rollout_that_finishes_after_close(routing):
    """A one-call program's LM answer may arrive after compile raised; the metric must not run then (a
    judge metric's call is paid, and nobody reads the score)."""
    from dspy_turbogepa.adapter.lm_copies import EvaluatorClosedError

    calls = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls.append(1)
        return 1.0

    program = dspy.Predict(dspy.Signature("ticket -> queue", routing.seed_instructions["route"]))
    ev, run = _unit_evaluator(routing, metric, program=program)
    lm = make_student_lm(seed=0, noise=0.0, before_call=lambda request: ev.close())  # closed mid-call
    with pytest.raises(EvaluatorClosedError):
        run(lm=lm)
    assert calls == []


@pytest.mark.parametrize("raised_in", ["second", None], ids=["in_second", "in_the_programs_code"])
def test_a_program_error_is_fed_back_to_the_predictor_it_came_from_only(raised_in):
    """step1 produced its output, then the program raised. Raised inside step2 (its LM call, its own
    code): the error is feedback for step2 only; giving it to step1 too would make the proposer rewrite
    an instruction that worked. Raised in the program's code between them (``int(a.answer)``): for
    step1 only, with its output, which the failing code was using; step2 never ran on it. Before,
    every predictor without a step got it, also one the program never calls (a wasted reflection)."""
    import random

    from dspy_turbogepa.adapter.program import ProgramCodec
    from dspy_turbogepa.adapter.reflective import ReflectiveDatasetBuilder
    from dspy_turbogepa.adapter.trajectory import DspyTrajectory, TraceStep

    program = TwinPipeline()
    builder = ReflectiveDatasetBuilder(ProgramCodec(program), twin_metric, 0.0, False, False, False)
    ex = dspy.Example(text="t0", answer="y").with_inputs("text")
    ran = TraceStep("first", program.first, {"text": "t0"}, dspy.Prediction(answer="x"))
    traj = DspyTrajectory(ex, None, [ran], [(program.first, {"text": "t0"}, dspy.Prediction(answer="x"))],
                          "RuntimeError: CRM is down", "RuntimeError", "program_error", failed_predictor=raised_in)
    data = builder.build(["first", "second"], [traj], [0.0], random.Random(0))
    if raised_in == "second":
        assert set(data) == {"second"}
        assert "CRM is down" in data["second"][0]["Generated Outputs"]
    else:
        assert set(data) == {"first"}
        (record,) = data["first"]
        assert record["Inputs"] == {"text": "t0"} and record["Generated Outputs"] == {"answer": "x"}
        assert "CRM is down" in record["Feedback"] and "after this output" in record["Feedback"]


def test_a_program_error_raised_before_any_predictor_ran_is_fed_back_to_none():
    """No instruction can prevent an error raised before any predictor ran (dspy.GEPA feeds program
    errors to no predictor at all)."""
    import random

    from dspy_turbogepa.adapter.program import ProgramCodec
    from dspy_turbogepa.adapter.reflective import ReflectiveDatasetBuilder
    from dspy_turbogepa.adapter.trajectory import DspyTrajectory

    program = TwinPipeline()
    builder = ReflectiveDatasetBuilder(ProgramCodec(program), twin_metric, 0.0, False, False, False)
    ex = dspy.Example(text="t0", answer="y").with_inputs("text")
    traj = DspyTrajectory(ex, None, [], [], "KeyError: 'tenant'", "KeyError", "program_error")
    assert builder.build(["first", "second"], [traj], [0.0], random.Random(0)) == {}


def test_the_predictor_an_error_was_raised_in_is_read_from_its_traceback():
    """The evaluator names the predictor a program error came from by the traceback's innermost frame of
    one of the program's predictors; an error raised in the program's own code names none."""
    from dspy_turbogepa.adapter.program import PredictorNames

    class Refusing(dspy.Predict):
        def forward(self, **kwargs):
            raise ValueError("the content filter refused this input")

    class Pipeline(dspy.Module):
        def __init__(self, second):
            super().__init__()
            self.first = dspy.Predict("text -> answer")
            self.second = second

        def forward(self, text):
            a = self.first(text=text)
            if self.second is None:
                return int(a.answer)  # the program's own code fails on first's output
            return self.second(text=f"{text} | {a.answer}")

    for second, expected in ((Refusing("text -> answer"), "second"), (None, None)):
        program = Pipeline(second)
        with dspy.context(lm=_twin_lm()), pytest.raises(ValueError) as info:
            program(text="t0")
        assert PredictorNames(program).raised_in(info.value) == expected


def test_no_feedback_from_the_pred_name_call_falls_back_to_the_programs_score(routing):
    """A metric that gives feedback only sometimes (None with pred_name) still lets reflection read how
    the example scored: the program-level score, not failure_score, which would tell the proposer a
    good answer failed."""
    import random

    from dspy_turbogepa.adapter.program import ProgramCodec
    from dspy_turbogepa.adapter.reflective import ReflectiveDatasetBuilder
    from dspy_turbogepa.adapter.trajectory import DspyTrajectory, TraceStep

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return None if pred_name is not None else 0.7

    program = routing.make_program()
    codec = ProgramCodec(program)
    (name, predictor), = program.named_predictors()
    ex = small_splits(routing, n_train=1, n_val=1, n_test=0).train[0]
    inputs, outputs = dict(ex.inputs()), dspy.Prediction(queue="billing")
    traj = DspyTrajectory(ex, outputs, [TraceStep(name, predictor, inputs, outputs)], [(predictor, inputs, outputs)])
    builder = ReflectiveDatasetBuilder(codec, metric, -1.0, False, False, False)
    data = builder.build([name], [traj], [0.7], random.Random(0))
    assert data[name][0]["Feedback"] == "This trajectory got a score of 0.7."


def test_a_candidate_text_reaches_the_program_as_dspy_gepa_sets_it(routing):
    """The proposer's text is the candidate: the built (and returned) program must carry it as
    dspy.GEPA's build_program does, through ``with_instructions`` alone. Stripping it on top changed
    what was run and returned (here a Markdown hard line break, two trailing spaces) from the text
    scored and stored under that candidate's fingerprint."""
    from dspy_turbogepa.adapter.program import ProgramCodec

    student = routing.make_program()
    codec = ProgramCodec(student)
    (name, seed_pred), = student.named_predictors()
    text = "Route each ticket to one queue.  \nRefunds go to billing.  "
    expected = seed_pred.signature.with_instructions(text).instructions
    assert expected.endswith("billing.  ")  # DSPy keeps a last line's trailing spaces
    for program in (codec.build({name: text}), codec.get("fp", {name: text}).program):
        (_, pred), = program.named_predictors()
        assert pred.signature.instructions == expected


class UnprintableError(Exception):
    """Like many SDK errors: ``__str__`` and properties read fields of the response body, which it lacks."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def __str__(self):
        return self.body["error"]["message"]

    @property
    def status_code(self):  # read by the rate-limit classification
        return self.body["error"]["code"]

    @property
    def signature(self):  # read to name the predictor that failed
        return self.body["error"]["signature"]


def test_an_exception_whose_str_raises_is_an_ordinary_failure_everywhere(routing):
    """Describing a failure must never become a second, fatal one: raised by the program, by the scoring
    metric call and by the feedback (pred_name) call, it is scored failure_score, recorded and skipped
    like any other exception, and the run finishes."""

    feedback_calls = itertools.count()

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if "refund" in gold.ticket.lower():
            raise UnprintableError({"detail": "judge overloaded"})
        if pred_name is not None and next(feedback_calls) % 2:
            raise UnprintableError({"detail": "judge overloaded"})
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    proposer = RecordingProposer()
    splits = small_splits(routing, n_train=30, n_val=16)
    program = FailsOnTracking(routing.make_program(), error=lambda: UnprintableError({"detail": "CRM down"}))
    opt = TurboGEPA(metric, max_metric_calls=150, instruction_proposer=proposer, num_threads=4,
                    failure_score=-1.0, use_merge=False, track_stats=True)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        optimized = opt.compile(program, trainset=splits.train, valset=splits.val)
    dr = optimized.detailed_results
    assert dr.run_stats["failures"]["program_error"] >= 1
    assert dr.run_stats["failures"]["metric_error"] >= 1
    assert dr.run_stats["reflective_records_skipped"].get("feedback_error", 0) >= 1
    assert proposer.calls, "reflections still ran"
    feedback = [rec["Feedback"] for _, ds, _ in proposer.calls for recs in ds.values() for rec in recs]
    assert any("<str() of this UnprintableError raised KeyError>" in f for f in feedback)
    for i, ex in enumerate(splits.val):
        if "tracking" in ex.ticket.lower() or "refund" in ex.ticket.lower():
            assert dr.val_subscores[0][i] == -1.0
