"""A review of docs/deviations.md rows that no other test pinned, mostly their dspy.GEPA column, checked
against the installed dspy.GEPA (dspy 3.4.1, gepa 0.1.4) run on the same offline fake LMs, and a few of
their TurboGEPA column.

A claim that holds is a plain test whose docstring quotes the row. The four found false (three in
dspy.GEPA's column, one in ours) were corrected in deviations.md; their tests pin the corrected rows.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import warnings
from dataclasses import asdict

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
from dspy_turbogepa.testing.fake_lm import AsyncSimEngine, SimEngine, request_messages
from dspy_turbogepa.testing.responder import ResponderConfig

from helpers import FailsOnTracking

ROUTING = TASKS["routing"]


def _data():
    return ROUTING.splits(data_seed=0, n_train=12, n_val=8, n_test=0)


def _texts(program: dspy.Module) -> dict[str, str]:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


SEED_TEXTS = _texts(ROUTING.make_program())


def _compile(cls=dspy.GEPA, metric=None, *, budget: int = 40, program=None, lm=None, trainset=None,
             valset="split", **kw) -> dspy.Module:
    """One compile of the routing task (12 train / 8 val) on the fake LMs, track_stats on."""
    data = _data()
    if "instruction_proposer" not in kw:
        kw.setdefault("reflection_lm", make_reflection_lm(seed=0))
    kw.setdefault("num_threads", 4)
    kw.setdefault("track_stats", True)
    if cls is TurboGEPA:
        kw.setdefault("verbose", False)
    opt = cls(metric or ROUTING.metric, max_metric_calls=budget, **kw)
    with dspy.context(lm=lm if lm is not None else make_student_lm(seed=0, noise=0.0)):
        return opt.compile(program if program is not None else ROUTING.make_program(),
                           trainset=data.train if trainset is None else trainset,
                           valset=data.val if valset == "split" else valset)


class _Records(logging.Handler):
    """Collects records of a logger that does not propagate (dspy's)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def dspy_log():
    handler = _Records()
    logging.getLogger("dspy").addHandler(handler)
    yield handler
    logging.getLogger("dspy").removeHandler(handler)


class _Counting(dspy.Module):
    """The routing program, counting its executions (the count is shared by every copy)."""

    calls: list[int] = [0]
    lock = threading.Lock()

    def __init__(self):
        super().__init__()
        self.inner = ROUTING.make_program()

    def forward(self, ticket):
        with self.lock:
            self.calls[0] += 1
        return self.inner(ticket=ticket)


# ================================================================= Evaluation and the metric, dspy.GEPA column
@pytest.mark.parametrize("bad", [None, "bad", dspy.Prediction(score=None, feedback="x")],
                         ids=["none", "string", "score_none"])
def test_dspy_gepa_a_none_or_string_metric_value_crashes_at_the_seeds_validation(bad):
    """deviations.md, "Metric returning `None`, NaN, inf, or a string": "`None` or a string (bare or as
    `score=`) crashes `compile()` at the seed's validation (`TypeError` summing the scores)"."""
    lm = make_student_lm(seed=0, noise=0.0)
    with pytest.raises(TypeError):
        _compile(metric=lambda g, p, t=None, pn=None, pt=None: bad, lm=lm)
    assert 0 < len(lm.history) <= len(_data().val)  # during the seed's validation


def test_dspy_gepa_a_nan_metric_value_is_summed_into_a_nan_aggregate():
    """deviations.md, same row: "NaN and inf are summed (a NaN aggregate)"."""
    out = _compile(metric=lambda g, p, t=None, pn=None, pt=None: math.nan)
    assert math.isnan(out.detailed_results.val_aggregate_scores[0])


def test_dspy_gepa_a_non_numeric_string_as_score_crashes_with_a_value_error():
    """deviations.md, same row: "a non-numeric string as `score=`: `ValueError` from `float()`"."""
    with pytest.raises(ValueError, match="could not convert string to float"):
        _compile(metric=lambda g, p, t=None, pn=None, pt=None: dspy.Prediction(score="bad", feedback="x"))


def test_dspy_gepa_scores_with_two_or_three_positionals_so_a_metric_without_defaults_fails_everything():
    """deviations.md, "Metric call when scoring": dspy.GEPA calls "`metric(gold, pred)` or `metric(gold,
    pred, None)`"; "a metric written without defaults for `trace, pred_name, pred_trace` fails every
    evaluation under dspy.GEPA"."""
    extra: list[tuple] = []

    def recording(gold, pred, *rest):
        extra.append(rest)
        return ROUTING.metric(gold, pred, *rest)

    _compile(metric=recording)
    assert {len(rest) for rest in extra if len(rest) < 3} == {0, 1}
    assert all(rest == (None,) for rest in extra if len(rest) == 1)

    def strict(gold, pred, trace, pred_name, pred_trace):
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    out = _compile(metric=strict)  # constructed fine: dspy.GEPA binds five Nones
    assert out.detailed_results.val_aggregate_scores == [0.0] and _texts(out) == SEED_TEXTS


def test_dspy_gepa_an_async_metric_crashes_compile_summing_coroutines():
    """deviations.md, "an `async def` metric": dspy.GEPA "accepted; `compile()` crashes summing the
    coroutines it returns"."""
    async def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 1.0

    opt = dspy.GEPA(metric, max_metric_calls=40, reflection_lm=make_reflection_lm())  # accepted
    with warnings.catch_warnings():  # the coroutines nobody awaited, collected here, not in a later test
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(TypeError, match="coroutine"), dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            opt.compile(ROUTING.make_program(), trainset=_data().train, valset=_data().val)
        gc.collect()


def test_dspy_gepa_a_feedback_call_that_raises_aborts_the_whole_proposal():
    """deviations.md, "Metric feedback calls (`pred_name` set)": dspy.GEPA "abort[s] the whole proposal if
    the metric raises" (so with one that always raises, no proposal is ever made and the seed returns)."""
    asked: list[int] = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is not None:
            raise KeyError("feedback_column")
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    def proposer(candidate, reflective_dataset, components_to_update):
        asked.append(1)
        return {c: candidate[c] + " More." for c in components_to_update}

    out = _compile(metric=metric, budget=60, instruction_proposer=proposer)
    assert asked == [] and _texts(out) == SEED_TEXTS and len(out.detailed_results.candidates) == 1


def test_dspy_gepa_returns_the_seed_when_every_evaluation_fails():
    """deviations.md, "Every evaluation failing": dspy.GEPA's "compile "succeeds" and returns the seed"."""
    class Broken(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = ROUTING.make_program()

        def forward(self, ticket):
            self.inner(ticket=ticket)
            raise RuntimeError("downstream service is down")

    out = _compile(program=Broken(), budget=40)
    assert _texts(out) == {"inner." + k: v for k, v in SEED_TEXTS.items()}
    assert out.detailed_results.val_aggregate_scores == [0.0]


def test_dspy_gepa_an_unknown_component_ends_compile_and_a_blank_text_is_evaluated():
    """deviations.md, "A proposal naming an unknown component, or holding a blank text": "unknown name:
    `AssertionError` ends `compile()`; a blank text from a custom `instruction_proposer` is evaluated as
    the new instruction"."""
    with pytest.raises(AssertionError, match="bogus"):
        _compile(instruction_proposer=lambda candidate, reflective_dataset, components_to_update: {"bogus": "x"})

    seen: set[str] = set()
    lock = threading.Lock()

    class Watching(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = ROUTING.make_program()

        def forward(self, ticket):
            with lock:
                seen.add(self.inner.route.signature.instructions.strip())
            return self.inner(ticket=ticket)

    _compile(program=Watching(), budget=40,
             instruction_proposer=lambda candidate, reflective_dataset, components_to_update:
             dict.fromkeys(components_to_update, "   "))
    assert "" in seen  # the blank instruction ran


def test_duplicate_candidates_are_added_again_by_dspy_gepa_and_dropped_here():
    """deviations.md, "Duplicate candidates": dspy.GEPA "a child textually equal to an existing candidate
    is evaluated and added again"; TurboGEPA "recognised by fingerprint and dropped before evaluation"
    (ties accepted on the minibatch, so every reflection's child G passes there)."""
    def proposer(candidate, reflective_dataset, components_to_update):
        # from the seed, G; from G, the seed's text again: every child after the first is a duplicate
        # (whichever of the two tied candidates the selection keeps)
        return {c: SEED_TEXTS[c] + " Be careful." if candidate[c] == SEED_TEXTS[c] else SEED_TEXTS[c]
                for c in components_to_update}

    kw = {"budget": 80, "instruction_proposer": proposer,
          "gepa_kwargs": {"acceptance_criterion": "improvement_or_equal"}}
    theirs = [_texts(c)["route"] for c in _compile(**kw).detailed_results.candidates]
    assert len(theirs) >= 3 and len(set(theirs)) < len(theirs)
    ours = _compile(TurboGEPA, **kw).detailed_results
    assert [_texts(c)["route"] for c in ours.candidates] == [SEED_TEXTS["route"], SEED_TEXTS["route"] + " Be careful."]
    assert ours.run_stats["mutations"]["duplicate"] > 0


# ---------------------------------------------------------------------------------------------- logging
class _Garbling(SimEngine):
    """The exact student, answering tickets about tracking with text no adapter parses."""

    def _respond(self, request):
        if "tracking" in request_messages(request)[-1]["content"].lower():
            return Response(id="garbled", model=self.model_name, message=Message.assistant([TextPart("no idea")]),
                            finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1))
        return super()._respond(request)


def _garbling_lm() -> dspy.LM:
    engine = _Garbling("student", seed=0, config=ResponderConfig.from_dict({**asdict(ResponderConfig()), "noise": 0.0}))
    return dspy.LM("sim/garbling", engine=engine, async_engine=AsyncSimEngine(engine), cache=False)


def _tracking_runs() -> tuple[dspy.Module, list[int]]:
    """The routing program, counting its executions on tracking tickets (each one a failed evaluation)."""
    runs = [0]
    lock = threading.Lock()

    class Program(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = ROUTING.make_program()

        def forward(self, ticket):
            if "tracking" in ticket.lower():
                with lock:
                    runs[0] += 1
            return self.inner(ticket=ticket)

    return Program(), runs


def test_dspy_gepa_logs_an_error_line_for_every_program_error(dspy_log):
    """deviations.md, "Logging a failed evaluation": dspy.GEPA "an ERROR line for every one" (program
    errors)."""
    failed = [0]
    lock = threading.Lock()

    class Program(FailsOnTracking):
        def forward(self, ticket):
            try:
                return super().forward(ticket)
            except RuntimeError:
                with lock:
                    failed[0] += 1
                raise

    _compile(program=Program(ROUTING.make_program()), budget=60)
    errors = [r for r in dspy_log.records if r.levelno == logging.ERROR]
    assert failed[0] > 2 and len(errors) == failed[0]


def test_dspy_gepa_logs_no_error_line_for_a_parse_failure_on_a_minibatch(dspy_log):
    """deviations.md, "Logging a failed evaluation": dspy.GEPA logs "none for a parse failure on a reflection
    minibatch" (only full-valset parse failures get an ERROR line)."""
    program, runs = _tracking_runs()
    _compile(program=program, lm=_garbling_lm(), budget=60)
    errors = [r for r in dspy_log.records if r.levelno == logging.ERROR]
    assert runs[0] > 2 and 0 < len(errors) < runs[0]


def test_turbogepa_logs_each_failure_and_its_counts_in_the_final_line(caplog):
    """deviations.md, "Logging a failed evaluation": TurboGEPA "a WARNING for the first of each kind ...,
    every one at DEBUG, and the counts in `run_stats["failures"]` and the final log line"."""
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        out = _compile(TurboGEPA, program=FailsOnTracking(ROUTING.make_program()), budget=60)
    failures = out.detailed_results.run_stats["failures"]
    assert failures["program_error"] > 1
    failed = [r for r in caplog.records if r.getMessage().startswith("An evaluation failed (program_error)")]
    assert [r.levelno for r in failed] == [logging.WARNING] + [logging.DEBUG] * (failures["program_error"] - 1)
    final = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TurboGEPA finished")]
    assert len(final) == 1 and f"failed evaluations {dict(failures)}" in final[0]


# ==================================================================================== Arguments, dspy.GEPA
@pytest.mark.parametrize("kw,exc,match", [
    ({"auto": "bogus", "max_metric_calls": None}, KeyError, "bogus"),
    ({"gepa_kwargs": {"seed": 1}}, TypeError, "got multiple values for keyword argument 'seed'"),
    ({"gepa_kwargs": {"bogus_key": 1}}, TypeError, "unexpected keyword argument 'bogus_key'"),
    ({"gepa_kwargs": {"custom_candidate_proposer": lambda **kw: {}}}, ValueError, "custom_candidate_proposer"),
    ({"perfect_score": None}, ValueError, "perfect_score must be provided when skip_perfect_score is True"),
    ({"num_threads": -1}, ValueError, "max_workers"),
    ({"component_selector": "bogus"}, AssertionError, "Unknown module_selector strategy"),
    ({"trainset": "generator"}, TypeError, "has no len"),
], ids=["auto", "gepa_kwargs_seed", "gepa_kwargs_unknown", "custom_candidate_proposer", "perfect_score_none",
        "num_threads_negative", "selector_string", "generator"])
def test_dspy_gepa_accepts_then_fails_at_compile_before_any_lm_call(kw, exc, match):
    """deviations.md, Arguments, dspy.GEPA column: `auto="bogus"` "`KeyError` at compile"; a `gepa_kwargs`
    key dspy.GEPA already passes "`TypeError: got multiple values` at compile"; an unknown key "`TypeError`
    at compile"; `custom_candidate_proposer` "`ValueError` at compile"; `perfect_score=None` with
    `skip_perfect_score=True` "a `ValueError` at `compile()` (before any LM call)"; `num_threads=-1`
    "`ValueError` at compile"; a generator trainset: "`len()` fails"."""
    kw = dict(kw)
    data = _data()
    trainset = (ex for ex in data.train) if kw.pop("trainset", None) else data.train
    budget = kw.pop("max_metric_calls", 40)
    opt = dspy.GEPA(ROUTING.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(), **kw)  # accepted
    lm = make_student_lm(seed=0, noise=0.0)
    with pytest.raises(exc, match=match), dspy.context(lm=lm):
        opt.compile(ROUTING.make_program(), trainset=trainset, valset=data.val)
    assert len(lm.history) == 0


def test_dspy_gepa_an_unknown_selector_string_fails_before_any_lm_call():
    """deviations.md, Arguments: "an unknown selector string | ... `AssertionError` at compile before any LM
    call"."""
    lm = make_student_lm(seed=0, noise=0.0)
    with pytest.raises(AssertionError, match="Unknown module_selector strategy"):
        _compile(component_selector="bogus", lm=lm)
    assert len(lm.history) == 0


def test_dspy_gepa_a_selector_with_a_wrong_signature_fails_after_lm_calls():
    """deviations.md, Arguments: "a callable `component_selector` with a wrong signature | `TypeError` ...
    at compile (after LM calls)"."""
    lm = make_student_lm(seed=0, noise=0.0)
    with pytest.raises(TypeError, match="positional argument"):
        _compile(component_selector=lambda state: ["route"], lm=lm)
    assert len(lm.history) >= len(_data().val)


def test_dspy_gepa_an_empty_valset_silently_validates_on_the_trainset(dspy_log):
    """deviations.md, Arguments: "`valset=[]` | silently falls back to the trainset"."""
    out = _compile(valset=[], budget=30)
    assert list(out.detailed_results.val_subscores[0]) == list(range(len(_data().train)))
    assert not any(r.levelno >= logging.WARNING for r in dspy_log.records)


@pytest.mark.parametrize("kw,outcome", [
    ({"budget": 0}, "seed"), ({"budget": -5}, "seed"),
    ({"num_threads": 0}, "default"), ({"reflection_minibatch_size": 0}, "default"),
    ({"reflection_minibatch_size": -1}, "mid_run"),
])
def test_dspy_gepa_non_positive_budgets_threads_and_minibatch(kw, outcome):
    """deviations.md, Arguments, "non-positive budgets, threads, minibatch size": dspy.GEPA
    "`max_metric_calls=0` or negative: the seed is evaluated and returned; `num_threads=0` and
    `reflection_minibatch_size=0`: replaced by their defaults; ... `reflection_minibatch_size=-1`: fails
    mid-run" (`num_threads=-1` is in the compile-time test above)."""
    lm = make_student_lm(seed=0, noise=0.0)
    if outcome == "mid_run":
        with pytest.raises(ValueError):
            _compile(lm=lm, **kw)
        assert len(lm.history) > len(_data().val)
        return
    out = _compile(lm=lm, **kw)
    if outcome == "seed":
        assert _texts(out) == SEED_TEXTS and len(lm.history) == len(_data().val)
    else:
        default = _compile()
        assert [_texts(c) for c in out.detailed_results.candidates] == \
               [_texts(c) for c in default.detailed_results.candidates]


def test_dspy_gepa_a_model_name_or_a_non_callable_proposer_fails_every_reflection(dspy_log):
    """deviations.md, Arguments: `reflection_lm` given as a model name: dspy.GEPA "accepted; every
    reflection fails (logged at INFO) and the seed is returned after the whole budget"; a non-callable
    `instruction_proposer`: "accepted; every reflection fails and the seed is returned"."""
    for kw in ({"reflection_lm": "openai/gpt-4o-mini"}, {"instruction_proposer": object()}):
        dspy_log.records.clear()
        out = _compile(budget=40, **kw)
        assert _texts(out) == SEED_TEXTS and len(out.detailed_results.candidates) == 1
        assert out.detailed_results.total_metric_calls >= 40
        failed = [r for r in dspy_log.records if "reflection failed" in r.getMessage()]
        assert failed and {r.levelno for r in failed} == {logging.INFO}


def test_seed_and_max_full_evals_not_whole_numbers():
    """deviations.md, Arguments, "`seed` not an int, `max_full_evals` not a whole number (`1.5`)":
    dspy.GEPA "accepted (`1.5` becomes a fractional metric-call budget)"; TurboGEPA "`TypeError` in the
    constructor naming the argument"."""
    import gepa

    seen = {}

    class Captured(Exception):
        pass

    def optimize(**kwargs):
        seen.update(kwargs)
        raise Captured

    data = _data()
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Captured):
        patch.setattr(gepa, "optimize", optimize)
        dspy.GEPA(ROUTING.metric, max_full_evals=1.5, seed=1.5, reflection_lm=make_reflection_lm()).compile(
            ROUTING.make_program(), trainset=data.train[:11], valset=data.val)
    assert seen["max_metric_calls"] == 28.5 and seen["seed"] == 1.5
    for kw, name in (({"max_full_evals": 1.5}, "max_full_evals"), ({"max_metric_calls": 40, "seed": 1.5}, "seed")):
        with pytest.raises(TypeError, match=name):
            TurboGEPA(ROUTING.metric, reflection_lm=make_reflection_lm(), **kw)


def test_turbogepa_takes_a_whole_float_seed_and_refuses_a_fractional_one():
    """deviations.md, Arguments: "`seed` or `max_full_evals` not a whole number (`1.5`, `"x"`; `2.0` and numpy
    integers are taken as ints) ... `TypeError` in the constructor"."""
    assert TurboGEPA(ROUTING.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(), seed=2.0).seed == 2
    for bad in (1.5, "x"):
        with pytest.raises(TypeError, match="seed"):
            TurboGEPA(ROUTING.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(), seed=bad)


# ================================================================================= Search and budget rows
def test_max_merge_invocations_none_crashes_dspy_gepa_and_means_no_limit_here():
    """deviations.md, "`max_merge_invocations=None`": dspy.GEPA "crashes (`TypeError`)" (at its first
    accepted child); TurboGEPA "means "no limit""."""
    with pytest.raises(TypeError, match="'<' not supported"):
        _compile(budget=150, max_merge_invocations=None)
    out = _compile(TurboGEPA, budget=150, max_merge_invocations=None)
    assert len(out.detailed_results.candidates) > 1


def test_dspy_gepa_a_stop_callback_that_raises_ends_the_run_with_its_exception():
    """deviations.md, "`gepa_kwargs['stop_callbacks']`": dspy.GEPA "a callback that raises ends the run with
    the exception, losing what it found"."""
    asked = [0]

    def callback(state):
        asked[0] += 1
        if asked[0] >= 3:
            raise RuntimeError("quota service down")
        return False

    with pytest.raises(RuntimeError, match="quota service down"):
        _compile(budget=200, gepa_kwargs={"stop_callbacks": [callback]})
    assert asked[0] == 3


def test_dspy_gepa_a_selector_that_never_chooses_returns_the_seed():
    """deviations.md, "A callable `component_selector` that returns no component": dspy.GEPA "the
    iteration does nothing; one that always does returns the seed"."""
    reflector = make_reflection_lm(seed=0)
    out = _compile(budget=40, reflection_lm=reflector,
                   component_selector=lambda state, trajectories, scores, idx, candidate: [])
    assert _texts(out) == SEED_TEXTS and len(out.detailed_results.candidates) == 1
    assert len(reflector.history) == 0


def test_dspy_gepa_gives_the_same_program_for_the_same_seed_whatever_num_threads():
    """deviations.md, "The same `seed` with another `num_threads`": dspy.GEPA "the same program (one
    iteration at a time)"."""
    runs = [_compile(budget=100, num_threads=n).detailed_results for n in (1, 4, 16)]
    candidates = [[_texts(c) for c in dr.candidates] for dr in runs]
    assert len(candidates[0]) > 1 and candidates[0] == candidates[1] == candidates[2]
    assert runs[0].val_aggregate_scores == runs[1].val_aggregate_scores == runs[2].val_aggregate_scores


def test_dspy_gepa_does_not_read_perfect_score_without_skip_perfect_score():
    """deviations.md, "`perfect_score` with `skip_perfect_score=False`": dspy.GEPA "not read" (while with
    `skip_perfect_score=True` the same low perfect_score changes the run)."""
    def run(**kw):
        dr = _compile(budget=100, **kw).detailed_results
        return [_texts(c) for c in dr.candidates], dr.val_aggregate_scores, dr.total_metric_calls

    assert run(skip_perfect_score=False, perfect_score=1.0) == run(skip_perfect_score=False, perfect_score=0.0)
    assert run(perfect_score=1.0) != run(perfect_score=0.0)


# ========================================================================================= Results
@pytest.mark.parametrize("valset", ["split", None], ids=["valset", "valset_none"])
def test_total_metric_calls_counts_the_program_executions_that_happened(valset):
    """deviations.md, Results: "`total_metric_calls` counts program executions that really happened (cache
    hits excluded)"."""
    _Counting.calls[0] = 0
    dr = _compile(TurboGEPA, program=_Counting(), budget=80, valset=valset).detailed_results
    assert dr.run_stats["cache_hits"] > 0
    assert dr.total_metric_calls == _Counting.calls[0]
