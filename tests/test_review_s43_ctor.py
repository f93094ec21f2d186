"""Session 43's review of the constructor and gepa_kwargs against dspy.GEPA 3.4: inputs dspy.GEPA takes
that were refused here, inputs it refuses that were accepted here, and gepa_kwargs read at compile."""

from __future__ import annotations

import logging
import math

import dspy
import pytest

from dspy_turbogepa import ConfigurationError, TurboGEPA
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm
from tests.helpers import quick_compile, small_splits

ROUTING = TASKS["routing"]


def _metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)


def make(**kw):
    kw.setdefault("max_metric_calls", 60)
    kw.setdefault("reflection_lm", make_reflection_lm())
    kw.setdefault("verbose", False)
    return TurboGEPA(kw.pop("metric", _metric), **kw)


class _CallAdapts(dspy.Module):
    """A judge whose own ``__call__`` adapts a two-argument ``forward`` to GEPA's five."""

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        return self.forward(gold, pred)

    def forward(self, gold, pred):
        return ROUTING.metric(gold, pred)


class _CallTooNarrow(dspy.Module):
    def __call__(self, gold, pred):
        return self.forward(gold, pred)

    def forward(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        return ROUTING.metric(gold, pred)


def test_a_judge_with_its_own_call_is_checked_through_that_call():
    student = make_student_lm()
    data = small_splits(ROUTING, n_train=12, n_val=8, n_test=0)
    opt = make(metric=_CallAdapts(), max_metric_calls=30)
    with dspy.context(lm=student):
        opt.compile(ROUTING.make_program(), trainset=data.train, valset=data.val)
    with pytest.raises(TypeError, match=r"five arguments.*__call__\(gold, pred\)"):
        make(metric=_CallTooNarrow())


def test_reflection_minibatch_size_none_is_gepas_default_3():
    opt = make(reflection_minibatch_size=None)
    assert opt.reflection_minibatch_size == 3
    assert opt._engine_config(60, 4, 8).reflection_minibatch_size == 3


def test_perfect_score_inf_is_a_threshold_never_reached():
    opt = make(perfect_score=math.inf)
    assert opt._engine_config(60, 4, 8).perfect_score == math.inf
    program = quick_compile(perfect_score=math.inf, budget=40)
    assert isinstance(program, dspy.Module)
    for bad in (-math.inf, math.nan):
        with pytest.raises(ValueError, match="perfect_score must be finite or inf"):
            make(perfect_score=bad)


def test_gepa_kwargs_none_values_are_gepas_defaults(caplog):
    with caplog.at_level(logging.WARNING):
        make(gepa_kwargs={"custom_candidate_proposer": None, "task_lm": None, "evaluator": None,
                          "frontier_type": "instance", "cache_evaluation": True, "callbacks": [],
                          "use_cloudpickle": False, "val_evaluation_policy": None})
    assert not [r for r in caplog.records if "gepa_kwargs" in r.getMessage()]


@pytest.mark.parametrize("kwargs,match", [
    ({"task_lm": "openai/x"}, "task_lm.*Remove it"),
    ({"evaluator": lambda *a: 1.0}, "evaluator.*Remove it"),
    ({"frontier_type": "bogus"}, "frontier_type.*'instance'"),
    ({"val_evaluation_policy": "bogus"}, "val_evaluation_policy.*'full_eval'"),
    ({"batch_sampler": object()}, "batch_sampler.*reflection_minibatch_size=None"),
])
def test_gepa_kwargs_values_gepa_refuses_are_refused_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(gepa_kwargs=kwargs)


def test_a_custom_batch_sampler_with_minibatch_size_none_is_accepted_and_warned_about(caplog):
    with caplog.at_level(logging.WARNING):
        make(reflection_minibatch_size=None, gepa_kwargs={"batch_sampler": object()})
    assert any("batch_sampler" in r.getMessage() and "no effect" in r.getMessage() for r in caplog.records)


def test_gepa_kwargs_changed_after_the_constructor_are_read_at_compile():
    opt = make()
    assert not opt._engine_config(60, 4, 8).accept_equal_on_minibatch
    opt.gepa_kwargs["acceptance_criterion"] = "improvement_or_equal"
    assert opt._engine_config(60, 4, 8).accept_equal_on_minibatch

    student = make_student_lm()
    data = small_splits(ROUTING, n_train=12, n_val=8, n_test=0)
    opt.gepa_kwargs["seed"] = 3  # dspy.GEPA: TypeError (multiple values) at compile
    with dspy.context(lm=student), pytest.raises(TypeError, match="Use seed instead"):
        opt.compile(ROUTING.make_program(), trainset=data.train, valset=data.val)
    assert student.engine.calls == 0


def test_unchanged_gepa_kwargs_warn_once(caplog):
    with caplog.at_level(logging.WARNING):
        opt = make(gepa_kwargs={"use_cloudpickle": True})
        opt._engine_config(60, 4, 8)
        opt._engine_config(60, 4, 8)
    assert len([r for r in caplog.records if "use_cloudpickle" in r.getMessage()]) == 1


def test_code_proposer_is_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        opt = make(code_proposer=lambda **kw: {})
    assert opt.custom_code_proposer is not None
    assert any("code_proposer" in r.getMessage() and "no effect" in r.getMessage() for r in caplog.records)


def test_empty_log_dir_is_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick_compile(log_dir="", budget=30)
    assert (tmp_path / "run.sqlite3").exists()


def test_no_model_to_reflect_with_is_refused_before_any_lm_call():
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    student_lm = make_student_lm()
    program = ROUTING.make_program()
    program.set_lm(student_lm)
    data = small_splits(ROUTING, n_train=12, n_val=8, n_test=0)
    opt = make(reflection_lm=None, instruction_proposer=InstructionProposer())
    with dspy.context(lm=None), pytest.raises(ConfigurationError, match="reflection_lm"):
        opt.compile(program, trainset=data.train, valset=data.val)
    assert student_lm.engine.calls == 0


@pytest.mark.parametrize("auto", [["light"], {"light": 1}])
def test_an_unhashable_auto_names_the_argument(auto):
    with pytest.raises(ValueError, match="auto must be one of"):
        TurboGEPA(_metric, auto=auto, reflection_lm=make_reflection_lm())


class _DetachedRow:
    """An ORM row whose repr needs a live database session."""

    def __repr__(self):
        raise RuntimeError("DetachedInstanceError: not bound to a session")

    __str__ = __repr__


def test_a_field_that_cannot_be_read_does_not_refuse_a_run_without_log_dir():
    """Comparing a valset as long as the trainset by content only saves evaluations: it must not refuse the
    run (dspy.GEPA runs it)."""
    data = small_splits(ROUTING, n_train=8, n_val=8, n_test=0)
    train = [ex.copy(meta=_DetachedRow()) for ex in data.train]
    val = [ex.copy(meta=_DetachedRow()) for ex in data.val]
    opt = make(max_metric_calls=30)
    with dspy.context(lm=make_student_lm()):
        assert isinstance(opt.compile(ROUTING.make_program(), trainset=train, valset=val), dspy.Module)


class _OptionalContext(dspy.Module):
    def __init__(self):
        super().__init__()
        self.route = ROUTING.make_program()

    def forward(self, ticket, context=None):
        return self.route(ticket=ticket)


def test_an_optional_input_no_example_gives_is_not_called_a_typo(caplog):
    data = small_splits(ROUTING, n_train=6, n_val=6, n_test=0)
    with_context = [ex.with_inputs("ticket", "context") for ex in data.train]
    from dspy_turbogepa.adapter.protocols import check_inputs_reach

    with caplog.at_level(logging.WARNING):
        assert check_inputs_reach(_OptionalContext(), "trainset", with_context) == []
    assert not [r for r in caplog.records if "which no example has" in r.getMessage()]
    with caplog.at_level(logging.WARNING):  # a name the program cannot take is still one
        check_inputs_reach(ROUTING.make_program(), "trainset", [ex.with_inputs("ticket", "contxt")
                                                                for ex in data.train])
    assert [r for r in caplog.records if "which no example has" in r.getMessage()]


def test_a_subclass_of_dspys_proposer_bringing_its_own_lm_is_not_refused():
    from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer

    reflector = make_reflection_lm()

    class OwnLM(InstructionProposer):
        def __call__(self, *args, **kwargs):
            with dspy.context(lm=reflector):
                return super().__call__(*args, **kwargs)

    student_lm = make_student_lm()
    program = ROUTING.make_program()
    program.set_lm(student_lm)
    data = small_splits(ROUTING, n_train=8, n_val=8, n_test=0)
    opt = make(reflection_lm=None, instruction_proposer=OwnLM(), max_metric_calls=30)
    with dspy.context(lm=None):
        assert isinstance(opt.compile(program, trainset=data.train, valset=data.val), dspy.Module)


def test_a_systemic_stop_says_which_error_stopped_the_search(caplog):
    """The end-of-search line read "stopped: program_error" for a refused API key, as if the program
    were at fault; it names the error's type first."""
    from dspy import lm15

    from dspy_turbogepa import SystemicFailureError

    def refuse(request):
        raise lm15.AuthError("invalid api key", status=401)

    data = small_splits(ROUTING, n_train=8, n_val=8, n_test=0)
    opt = make(max_metric_calls=30, verbose=True)  # the progress display writes the line
    lm = make_student_lm(before_call=refuse, async_before_call=refuse)
    with (caplog.at_level(logging.INFO, logger="dspy_turbogepa"), pytest.raises(SystemicFailureError) as info,
          dspy.context(lm=lm)):
        opt.compile(ROUTING.make_program(), trainset=data.train, valset=data.val)
    ended = [r.getMessage() for r in caplog.records if "search ended (stopped: " in r.getMessage()]
    assert ended and info.value.error_type and f"stopped: {info.value.error_type}" in ended[0], ended
