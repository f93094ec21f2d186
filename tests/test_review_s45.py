"""Session 45's reviews: what the metric returns, against dspy.GEPA 3.4 (a score whose ``float()``
raises, a feedback call that returns a bare string or no usable score, examples the metric could not
score, Decimal scores, a metric adapted by a decorator), and where a relative log_dir is reported."""

from __future__ import annotations

import logging

import pytest

from dspy_turbogepa.testing import TASKS

from helpers import quick_compile, recording_proposer

ROUTING = TASKS["routing"]


class Tensorish:
    """A score object whose float() raises something else than TypeError/ValueError (a tensor on a
    device, say)."""

    def __float__(self) -> float:
        raise RuntimeError("tensor is on another device")


def test_a_score_whose_float_raises_mid_run_is_an_invalid_evaluation_not_the_end_of_the_run():
    """It stopped compile() with the bare RuntimeError, the evaluation unrecorded."""
    calls = {"n": 0}

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls["n"] += 1
        score = ROUTING.metric(gold, pred, trace, pred_name, pred_trace)
        if calls["n"] == 20 and pred_name is None:  # after the seed's validation
            import dspy
            return dspy.Prediction(score=Tensorish(), feedback="fine")
        return score

    dr = quick_compile(metric=metric, budget=60).detailed_results
    assert dr.run_stats["failures"].get("metric_invalid") == 1


def test_a_feedback_call_whose_score_float_raises_still_gives_its_feedback():
    """Outside the guarded call it was a reflective_dataset_error on every reflection, and the run stopped
    blaming the reflection LM; dspy.GEPA never reads that score."""
    import dspy

    seen: list = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        score = ROUTING.metric(gold, pred, trace, pred_name, pred_trace)
        if pred_name is None:
            return score
        return dspy.Prediction(score=Tensorish(), feedback=f"judge says {float(getattr(score, 'score', score))}")

    dr = quick_compile(metric=metric, budget=60, instruction_proposer=recording_proposer(seen)).detailed_results
    assert seen and all(r["Feedback"].startswith("judge says") for records in seen for r in records)
    assert dr.total_metric_calls >= 60


def test_a_feedback_call_that_returns_a_bare_string_is_read_as_the_feedback(caplog):
    """It was replaced by "This trajectory got a score of 0.0." without a word."""
    seen: list = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        score = ROUTING.metric(gold, pred, trace, pred_name, pred_trace)
        return score.score if pred_name is None else f"JUDGE: {score.feedback}"

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        quick_compile(metric=metric, budget=40, instruction_proposer=recording_proposer(seen))
    assert seen and all(r["Feedback"].startswith("JUDGE: ") for records in seen for r in records)
    assert sum("returned a string; it is read as the feedback" in r.getMessage() for r in caplog.records) == 1


def test_a_feedback_call_with_no_usable_score_reads_the_examples_score_and_says_so(caplog):
    """NaN (no feedback) from the feedback call was replaced by the default text without a word; None
    stays the quiet way to give no feedback for a predictor (test_adapter's fallback test)."""
    seen: list = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        score = ROUTING.metric(gold, pred, trace, pred_name, pred_trace)
        return score.score if pred_name is None else float("nan")

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        quick_compile(metric=metric, budget=40, instruction_proposer=recording_proposer(seen))
    records = [r for records in seen for r in records]
    assert records and all(r["Feedback"] in ("This trajectory got a score of 0.0.", "This trajectory got a score "
                                             "of 1.0.") for r in records)
    said = [r.getMessage() for r in caplog.records if "gave no feedback and no usable score" in r.getMessage()]
    assert len(said) == 1 and "non-finite score nan" in said[0]


def test_examples_the_metric_could_not_score_are_not_shown_to_the_reflection_as_failures():
    """A metric returning None for unlabeled examples: 71 of 141 records a review's reflections read were
    "This trajectory got a score of 0.0." for them (a metric that raised on the same examples: none)."""
    seen: list = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if len(gold.ticket) % 3 == 0:
            return None  # unlabeled
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    dr = quick_compile(metric=metric, budget=80, instruction_proposer=recording_proposer(seen)).detailed_results
    assert dr.run_stats["failures"].get("metric_invalid", 0) > 0
    records = [r for records in seen for r in records]
    assert records and not [r for r in records if r["Feedback"].startswith("This trajectory got a score")]


def test_a_metric_adapted_to_five_arguments_by_a_wraps_decorator_is_accepted():
    """inspect.signature follows __wrapped__ to the two-argument scorer: the metric was refused as
    `exact(gold, pred)` (dspy.GEPA refuses it too) though it takes GEPA's five. A wrapper taking anything
    still lets the wrapped signature decide."""
    import functools

    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing import make_reflection_lm

    def gepa_metric(fn):
        @functools.wraps(fn)
        def wrapper(gold, pred, trace=None, pred_name=None, pred_trace=None):
            return fn(gold, pred)
        return wrapper

    def passthrough(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    def exact(gold, pred):
        return float(gold.queue == pred.queue)

    TurboGEPA(gepa_metric(exact), max_metric_calls=10, reflection_lm=make_reflection_lm())
    with pytest.raises(TypeError, match=r"Your metric's signature is .*exact\(gold, pred\)"):
        TurboGEPA(passthrough(exact), max_metric_calls=10, reflection_lm=make_reflection_lm())


def test_decimal_failure_and_perfect_scores_are_taken_as_dspy_gepa_takes_them():
    from decimal import Decimal

    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing import make_reflection_lm

    opt = TurboGEPA(ROUTING.metric, max_metric_calls=10, reflection_lm=make_reflection_lm(),
                    failure_score=Decimal("0"), perfect_score=Decimal("1"))
    assert (opt.failure_score, opt.perfect_score) == (0.0, 1.0)
    assert type(opt.failure_score) is float and type(opt.perfect_score) is float
    with pytest.raises(ValueError, match="too large for a float"):  # not "never reached" (inf) by overflow
        TurboGEPA(ROUTING.metric, max_metric_calls=10, reflection_lm=make_reflection_lm(),
                  perfect_score=Decimal("1e400"))
    for nan in ("NaN", "sNaN"):  # a signaling NaN raised from float() and from == (InvalidOperation)
        with pytest.raises(ValueError, match="failure_score must be finite"):
            TurboGEPA(ROUTING.metric, max_metric_calls=10, reflection_lm=make_reflection_lm(),
                      failure_score=Decimal(nan))
        with pytest.raises(ValueError, match="perfect_score must be finite or inf"):
            TurboGEPA(ROUTING.metric, max_metric_calls=10, reflection_lm=make_reflection_lm(),
                      perfect_score=Decimal(nan))


def test_a_relative_log_dir_is_reported_where_the_store_is_after_the_program_changes_directory(tmp_path,
                                                                                                monkeypatch):
    """A store review: the files of log_dir="runs/a" are where compile started, but after the metric's
    chdir detailed_results.log_dir ("runs/a") named another, missing directory (and so did the rerun
    advice, which in a notebook would have started a fresh store and paid again)."""
    import os

    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "start")

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        os.chdir(tmp_path / "elsewhere")
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    dr = quick_compile(metric=metric, budget=30, log_dir="runs/a").detailed_results
    assert dr.log_dir == str(tmp_path / "start" / "runs" / "a")
    assert (tmp_path / "start" / "runs" / "a" / "run.sqlite3").exists()


def test_a_log_dir_deleted_mid_run_is_said_not_reported_as_stored(tmp_path, caplog):
    """A store review: after `rm -rf log_dir` mid-run the writer committed into the unlinked file, the
    reports recreated the directory, and the last line said "run store, summary.json and plots in ..."
    while nothing of the session was kept (the rerun paid for it all again)."""
    import shutil

    calls = {"n": 0}
    log_dir = tmp_path / "run"

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        calls["n"] += 1
        if calls["n"] == 20:
            shutil.rmtree(log_dir)
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)

    with caplog.at_level(logging.INFO, logger="dspy_turbogepa"):
        quick_compile(metric=metric, budget=40, log_dir=str(log_dir))
    said = [r.getMessage() for r in caplog.records]
    assert sum("was deleted or replaced during the run: nothing this session did is kept" in m for m in said) == 1
    finished = [m for m in said if m.startswith("TurboGEPA finished")]
    assert finished and "(the run store was lost)" in finished[0] and "run store, summary.json" not in finished[0]


def test_a_students_own_deepcopy_still_gets_the_history_of_compile_start_and_entries_pickle_plain():
    """A review of RunHistoryEntry: through a student whose __deepcopy__ drops the memo, the built programs
    kept every entry of the run (245 against the snapshot's 1: the run's entries left out, the copy was
    no longer "grown"); and the user's lm.history pickled with a reference to this package."""
    import copy
    import pickle

    import dspy

    from dspy_turbogepa.adapter.lm_copies import RunHistoryEntry
    from dspy_turbogepa.testing import make_student_lm

    task = TASKS["pipeline"]
    lm = make_student_lm(seed=0, noise=0.0)
    before = {"note": "before"}
    lm.history.append(before)
    inner = task.make_program()
    inner.set_lm(lm)

    class Wrap(dspy.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

        def __deepcopy__(self, memo):  # does not pass the memo on
            new = Wrap.__new__(Wrap)
            for k, v in self.__dict__.items():
                new.__dict__[k] = copy.deepcopy(v)
            return new

    optimized = quick_compile(program=Wrap(inner), task=task, budget=60, lm=lm)
    assert len(lm.history) > 20
    for prog in [optimized, *optimized.detailed_results.candidates]:
        assert [p.lm.history for _, p in prog.named_predictors()] == [[before], [before]]
    run_entries = [e for e in lm.history if isinstance(e, RunHistoryEntry)]
    assert run_entries and type(copy.deepcopy(run_entries[0])) is RunHistoryEntry
    assert b"dspy_turbogepa" not in pickle.dumps(lm.history)
    assert type(pickle.loads(pickle.dumps(run_entries[0]))) is dict


def test_a_score_given_as_bytes_is_refused_as_a_string_score_is():
    """A review: float() reads b"0.9" as it reads "0.9", so bytes were taken as a score while the string
    was refused (a judge's text is not a score)."""
    import array

    import dspy

    from dspy_turbogepa.adapter.metric import read_metric_return

    for raw in ("0.9", b"0.9", bytearray(b"0.9"), memoryview(b"0.9"), array.array("b", b"0.9")):
        reading = read_metric_return(raw, 0.0)
        assert reading.score == 0.0 and "string score" in (reading.invalid or ""), (raw, reading)
        reading = read_metric_return(dspy.Prediction(score=0.5, objective_scores={"a": raw}), 0.0)
        assert reading.invalid is not None and "objective_scores['a']" in reading.invalid, (raw, reading)
    assert read_metric_return(0.9, 0.0).score == 0.9
