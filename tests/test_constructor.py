"""The constructor accepts dspy.GEPA's exact surface and rejects bad input early and clearly."""

from __future__ import annotations

import functools
import inspect
import logging

import dspy
import pytest

from dspy_turbogepa import GEPA, ConfigurationError, TurboGEPA


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return 1.0


LM = dspy.LM("openai/unused", api_key="x")


def make(**kw):
    kw.setdefault("max_metric_calls", 100)
    kw.setdefault("reflection_lm", LM)
    return TurboGEPA(metric, **kw)


def test_same_parameters_and_defaults_as_dspy_gepa():
    ours = inspect.signature(TurboGEPA.__init__).parameters
    theirs = inspect.signature(dspy.GEPA.__init__).parameters
    for name, p in theirs.items():
        assert name in ours, f"missing dspy.GEPA parameter {name}"
        assert ours[name].default == p.default, f"default of {name} differs"
        assert ours[name].kind == p.kind, f"kind of {name} differs"
    assert list(ours)[: len(theirs)] == list(theirs)


def test_is_a_dspy_gepa_and_a_direct_teleprompter_subclass():
    opt = make()
    assert isinstance(opt, dspy.GEPA)
    assert TurboGEPA in dspy.teleprompt.Teleprompter.__subclasses__()
    assert GEPA is TurboGEPA


def test_attributes_use_dspy_names_and_get_params_is_a_copy():
    proposer = lambda candidate, reflective_dataset, components_to_update: {}  # noqa: E731
    opt = make(instruction_proposer=proposer)
    params = opt.get_params()
    for key in ("metric_fn", "custom_instruction_proposer", "custom_code_proposer", "gepa_kwargs", "max_metric_calls",
                "reflection_minibatch_size", "num_threads", "seed"):
        assert key in params
    assert params["metric_fn"] is metric and params["custom_instruction_proposer"] is proposer
    params["student"] = "polluted"
    assert "student" not in opt.__dict__


@pytest.mark.parametrize(
    "bad",
    [lambda g, p: 1.0, lambda g, p, **kw: 1.0, lambda g: 1.0],
)
def test_metric_that_cannot_take_five_arguments_is_a_type_error(bad):
    with pytest.raises(TypeError, match="five arguments"):
        TurboGEPA(bad, max_metric_calls=10, reflection_lm=LM)


class _TwoArgJudge(dspy.Module):
    def forward(self, gold, pred):
        return 1.0


class _Judge(dspy.Module):
    def forward(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 1.0


class _AsyncScorer:
    async def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        return 1.0


async def _async_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return 1.0


def test_metrics_that_can_never_work_are_refused_before_any_lm_call():
    """A dspy.Module judge's __call__ takes anything: its forward is what must take five arguments.
    An async metric would return an un-awaited coroutine from every call."""
    with pytest.raises(TypeError, match=r"five arguments.*forward"):
        TurboGEPA(_TwoArgJudge(), max_metric_calls=10, reflection_lm=LM)
    for bad in (_async_metric, _AsyncScorer(), functools.partial(_async_metric)):
        with pytest.raises(TypeError, match="async def"):
            TurboGEPA(bad, max_metric_calls=10, reflection_lm=LM)
    TurboGEPA(_Judge(), max_metric_calls=10, reflection_lm=LM)


def test_checking_a_judge_metric_does_not_make_dspy_warn(caplog):
    """Reading a dspy.Module's ``forward`` outside ``__call__`` makes DSPy log "calling
    module.forward(...) directly is discouraged"; checking the judge's signature did, twice."""
    class _StaticJudge(dspy.Module):
        forward = staticmethod(lambda gold, pred, trace=None, pred_name=None, pred_trace=None: 1.0)

    with caplog.at_level(logging.WARNING):
        TurboGEPA(_Judge(), max_metric_calls=10, reflection_lm=LM)
        TurboGEPA(_StaticJudge(), max_metric_calls=10, reflection_lm=LM)
        instance_judge = _TwoArgJudge()
        instance_judge.forward = lambda gold, pred, trace=None, pred_name=None, pred_trace=None: 1.0
        TurboGEPA(instance_judge, max_metric_calls=10, reflection_lm=LM)  # its own forward, not the class's
    assert "discouraged" not in caplog.text
    with pytest.raises(TypeError, match=r"five arguments.*forward"):
        TurboGEPA(_TwoArgJudge(), max_metric_calls=10, reflection_lm=LM)

    class _Delegating(dspy.Module):  # a wrapper whose forward is its inner judge's, via __getattr__
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            if name == "forward":
                return self.inner.forward
            return super().__getattr__(name)

    with pytest.raises(TypeError, match=r"five arguments.*forward"):
        TurboGEPA(_Delegating(_TwoArgJudge()), max_metric_calls=10, reflection_lm=LM)

    class _Dynamic(_TwoArgJudge):  # a class that answers attribute reads itself
        def __getattribute__(self, name):
            if name == "forward":
                return lambda gold, pred, trace=None, pred_name=None, pred_trace=None: 1.0
            return super().__getattribute__(name)

    TurboGEPA(_Dynamic(), max_metric_calls=10, reflection_lm=LM)


def test_varargs_metric_and_no_default_metric_are_accepted():
    TurboGEPA(lambda *a: 1.0, max_metric_calls=10, reflection_lm=LM)
    # dspy.GEPA accepts this and then fails every evaluation; we call the metric with 5 positionals.
    TurboGEPA(lambda g, p, t, n, pt: 1.0, max_metric_calls=10, reflection_lm=LM)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"max_metric_calls": 10, "auto": "light"},
        {"max_metric_calls": 10, "max_full_evals": 2},
        {"auto": "light", "max_full_evals": 2},
    ],
)
def test_exactly_one_budget_assertion(kw):
    with pytest.raises(AssertionError, match="Exactly one of max_metric_calls, max_full_evals, auto"):
        TurboGEPA(metric, reflection_lm=LM, **kw)
    with pytest.raises(ValueError):
        TurboGEPA(metric, reflection_lm=LM, **kw)


def test_unknown_auto_fails_at_construction_not_compile():
    with pytest.raises(ValueError, match="auto must be one of"):
        TurboGEPA(metric, auto="bogus", reflection_lm=LM)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"max_metric_calls": 0}, ValueError, "max_metric_calls must be >= 1"),
        ({"max_metric_calls": -5}, ValueError, "max_metric_calls"),
        ({"max_metric_calls": 2.5}, TypeError, "max_metric_calls must be a positive integer"),
        ({"max_metric_calls": None, "max_full_evals": 0}, ValueError, "max_full_evals"),
        ({"num_threads": 0}, ValueError, "num_threads"),
        ({"reflection_minibatch_size": 0}, ValueError, "reflection_minibatch_size"),
        ({"max_mutations_in_flight": 0}, ValueError, "max_mutations_in_flight"),
        ({"max_reflections_in_flight": 0}, ValueError, "max_reflections_in_flight"),
        ({"rung_fractions": [0.5, 0.3, 1.0]}, ValueError, "strictly increasing"),
        ({"rung_fractions": [0.3, 0.6]}, ValueError, "end at 1.0"),
        ({"rung_fractions": []}, ValueError, "must not be empty"),
        ({"reduction_factor": 1.0}, ValueError, "reduction_factor"),
        ({"reduction_factor": float("nan")}, ValueError, "reduction_factor must be a finite number > 1"),
        ({"reduction_factor": float("inf")}, ValueError, "reduction_factor must be a finite number > 1"),
        ({"reduction_factor": True}, ValueError, "reduction_factor must be a finite number > 1"),
        ({"candidate_selection_strategy": "best"}, ValueError, "candidate_selection_strategy"),
        ({"minibatch_sampling": "random"}, ValueError, "minibatch_sampling must be one of"),
        ({"max_sibling_reflections": 0}, ValueError, "max_sibling_reflections"),
        ({"max_sibling_reflections": 2.5}, TypeError, "max_sibling_reflections"),
        ({"max_merge_invocations": -1}, ValueError, "max_merge_invocations must be an integer >= 0"),
        ({"reflection_feedback_reuse": -1}, ValueError, "reflection_feedback_reuse must be an integer >= 0"),
        ({"reflection_feedback_reuse": True}, ValueError, "reflection_feedback_reuse"),
        ({"reflection_scouts": -1}, ValueError, "reflection_scouts must be an integer >= 0"),
        ({"reflection_scouts": 2.5}, ValueError, "reflection_scouts"),
        ({"seed": "x"}, TypeError, "seed"),
        ({"reflection_lm": "openai/gpt-4o"}, TypeError, "reflection_lm must be a dspy.LM"),
        ({"instruction_proposer": "not callable"}, TypeError, "instruction_proposer"),
        ({"failure_score": float("nan")}, ValueError, "failure_score must be finite"),
        ({"perfect_score": float("-inf")}, ValueError, "perfect_score must be finite or inf"),
        ({"failure_score": None}, TypeError, "failure_score must be a number.*0.0"),
        ({"perfect_score": None}, ConfigurationError, "skip_perfect_score=False"),
        ({"failure_score": 1.0}, ConfigurationError, "failure_score=1.0 is not below perfect_score=1.0"),
        ({"log_dir": 123}, TypeError, "log_dir must be a str or os.PathLike"),
    ],
)
def test_bad_arguments_name_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        make(**kw)


def test_numbers_dspy_gepa_takes_are_taken_as_ints():
    """dspy.GEPA accepts max_metric_calls=1e3, numpy integers and max_merge_invocations=0 (merging
    on, never invoked); code written for it must construct TurboGEPA unchanged."""
    import numpy as np

    opt = make(max_metric_calls=1e3, seed=np.int64(3), num_threads=np.int32(4), max_merge_invocations=0,
               reflection_scouts=np.int64(2))
    assert (opt.max_metric_calls, opt.seed, opt.num_threads, opt.max_merge_invocations) == (1000, 3, 4, 0)
    assert all(type(v) is int for v in (opt.max_metric_calls, opt.seed, opt.num_threads))
    assert make(max_metric_calls=np.int64(200)).max_metric_calls == 200
    scored = make(failure_score=np.float32(0.0), perfect_score=np.int64(1))
    assert (scored.failure_score, scored.perfect_score) == (0.0, 1.0)
    assert type(scored.failure_score) is float and type(scored.perfect_score) is float
    with pytest.raises(TypeError, match="failure_score must be a number"):
        make(failure_score=np.bool_(False))


def test_reflection_lm_or_proposer_required():
    with pytest.raises(AssertionError, match="reflection language model"):
        TurboGEPA(metric, max_metric_calls=10)
    TurboGEPA(metric, max_metric_calls=10, instruction_proposer=lambda **kw: {})


def test_track_best_outputs_requires_track_stats():
    with pytest.raises(AssertionError, match="track_stats must be True"):
        make(track_best_outputs=True)
    make(track_best_outputs=True, track_stats=True)


def test_unknown_component_selector_is_an_assertion_error():
    with pytest.raises(AssertionError, match="Unknown module_selector strategy"):
        make(component_selector="random")
    make(component_selector="all")
    make(component_selector=lambda state, traj, scores, idx, cand: list(cand)[:1])


@pytest.mark.parametrize("kw,message", [
    ({"time_budget_seconds": float("nan")}, "time_budget_seconds must be a positive number or None"),
    ({"cost_budget_usd": float("nan")}, "cost_budget_usd must be a positive number or None"),
    ({"rung_fractions": 0.5}, r"rung_fractions must be a sequence .* such as \(0.25, 0.5, 1.0\), got 0.5"),
    ({"rung_fractions": "0.5"}, r"rung_fractions must be a sequence .* got '0.5'"),
    ({"reflection_lm": "openai/gpt-4o"}, r"got str. Wrap the model name: reflection_lm=dspy.LM\('openai/gpt-4o'\)"),
    ({"reflection_lm": lambda prompt: "a new instruction"},
     r"got function. To write the new instructions with your own function, pass it as instruction_proposer="),
])
def test_values_that_slipped_through_or_got_raw_errors_are_named(kw, message):
    """NaN passed ``value <= 0`` (a time budget that never applied); a scalar rung_fractions raised
    Python's own "'float' object is not iterable", naming nothing."""
    with pytest.raises((ValueError, TypeError), match=message):
        make(**kw)
    make(time_budget_seconds=float("inf"), cost_budget_usd=float("inf"))  # no limit, as before


def test_a_proposer_or_selector_that_cannot_take_gepas_call_is_refused_before_any_lm_call():
    """They failed on first use, after the seed's validation and a reflection were paid for."""
    with pytest.raises(TypeError, match=r"instruction_proposer is called as proposer\(candidate=.*"
                                        r"unexpected keyword argument 'components_to_update'"):
        make(instruction_proposer=lambda candidate, reflective_dataset: {})
    with pytest.raises(TypeError, match=r"component_selector is called as selector\(state, trajectories, "
                                        r"subsample_scores, candidate_idx, candidate\).*too many positional"):
        make(component_selector=lambda state, trajectories: [])

    class Proposer:
        def __call__(self, candidate, reflective_dataset, components_to_update, extra=None):
            return {}

    make(instruction_proposer=Proposer())  # every way gepa's protocols can be met is accepted
    make(instruction_proposer=lambda **kw: {})
    make(component_selector=lambda *args: [])
    from gepa.strategies.component_selector import RoundRobinReflectionComponentSelector

    make(component_selector=RoundRobinReflectionComponentSelector())

    def with_client(fn):  # a decorator supplying the first argument: gepa's keyword call works
        @functools.wraps(fn)
        def wrapper(**kwargs):
            return fn("client", **kwargs)

        return wrapper

    @with_client
    def decorated(client, candidate, reflective_dataset, components_to_update):
        return {}

    make(instruction_proposer=decorated)

    def passthrough(fn):  # a wrapper taking anything must not let a wrong signature through
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)

        return wrapper

    with pytest.raises(TypeError, match="instruction_proposer is called as"):
        make(instruction_proposer=passthrough(lambda candidate, reflective_dataset: {}))
    with pytest.raises(TypeError, match="component_selector is called as"):
        make(component_selector=passthrough(lambda state, trajectories: []))
    make(instruction_proposer=dspy.teleprompt.gepa.instruction_proposal.MultiModalInstructionProposer())


@pytest.mark.parametrize("kw,name", [({"use_wandb": True}, "use_wandb")])
def test_unimplemented_features_raise_not_implemented(kw, name):
    with pytest.raises(NotImplementedError, match=name):
        make(**kw)


def test_gepa_kwargs_refused_like_dspy():
    with pytest.raises(ValueError, match="max_reflection_cost.*cost_budget_usd="):  # names what to use instead
        make(gepa_kwargs={"max_reflection_cost": 3.0})
    with pytest.raises(ValueError, match="reflection_prompt_template"):
        make(gepa_kwargs={"reflection_prompt_template": "x"})


def test_gepa_kwargs_duplicate_of_dspy_argument_is_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="Use seed instead"):
        make(gepa_kwargs={"seed": 3})
    with pytest.raises(TypeError, match="Use component_selector instead"):
        make(gepa_kwargs={"module_selector": "all"})
    with pytest.raises(TypeError, match=r"Use verbose \(TurboGEPA's progress display\) instead"):
        make(gepa_kwargs={"display_progress_bar": False})
    for key in ("adapter", "logger", "raise_on_exception"):  # no argument of ours sets them
        with pytest.raises(TypeError, match=rf"gepa_kwargs\['{key}'\] is set by dspy.GEPA itself .*\. Remove it\.$"):
            make(gepa_kwargs={key: True})


def test_gepa_kwargs_unknown_key_is_type_error():
    with pytest.raises(TypeError, match="not a parameter of gepa.optimize"):
        make(gepa_kwargs={"frobnicate": 1})


def test_every_gepa_optimize_parameter_has_a_meaning_here():
    """A gepa_kwargs key that gepa.optimize takes must never get "not a parameter of gepa.optimize"."""
    import gepa

    from dspy_turbogepa.gepa_kwargs import (
        DSPY_OWNED_KEYS,
        IGNORED_KEYS,
        MAPPED_KEYS,
        REFUSED_KEYS,
    )

    known = set(DSPY_OWNED_KEYS) | set(IGNORED_KEYS) | set(MAPPED_KEYS) | set(REFUSED_KEYS)
    assert set(inspect.signature(gepa.optimize).parameters) <= known
    with pytest.raises(ValueError, match="instruction_proposer"):
        make(gepa_kwargs={"custom_candidate_proposer": lambda candidate, reflective_dataset, components_to_update: {}})


def test_valid_but_unused_gepa_kwargs_warn_once_each(caplog):
    with caplog.at_level(logging.WARNING):
        make(gepa_kwargs={"use_cloudpickle": True, "frontier_type": "objective", "callbacks": [object()]})
    msgs = [r.getMessage() for r in caplog.records if "gepa_kwargs" in r.getMessage()]
    assert len(msgs) == 3
    assert any("use_cloudpickle" in m for m in msgs)


def test_gepa_kwargs_mapped_keys():
    stop = lambda state: False  # noqa: E731
    opt = make(gepa_kwargs={"stop_callbacks": [stop], "acceptance_criterion": "improvement_or_equal"})
    cfg = opt._engine_config(budget=100, num_threads=4, val_size=10)
    assert cfg.stop_callbacks == (stop,)
    assert cfg.accept_equal_on_minibatch is True
    with pytest.raises(ValueError, match="acceptance_criterion"):
        make(gepa_kwargs={"acceptance_criterion": "sometimes"})
    from gepa.strategies.acceptance import ImprovementOrEqualAcceptance, StrictImprovementAcceptance

    for criterion, accept_equal in ((ImprovementOrEqualAcceptance(), True), (StrictImprovementAcceptance(), False)):
        cfg = make(gepa_kwargs={"acceptance_criterion": criterion})._engine_config(budget=100, num_threads=4,
                                                                                   val_size=10)
        assert cfg.accept_equal_on_minibatch is accept_equal

    class Custom(StrictImprovementAcceptance):
        pass

    with pytest.raises(ValueError, match="custom AcceptanceCriterion"):
        make(gepa_kwargs={"acceptance_criterion": Custom()})
    with pytest.raises(TypeError, match="stop_callbacks"):
        make(gepa_kwargs={"stop_callbacks": 3})


def test_every_stop_callback_reaches_the_engine_in_either_form():
    """gepa.optimize takes stop_callbacks as one callable or a list: a single stopper, or the second of
    two, silently dropped would let the run go on to its full budget."""
    first = lambda state: False  # noqa: E731
    second = lambda state: True  # noqa: E731
    single = make(gepa_kwargs={"stop_callbacks": second})._engine_config(budget=100, num_threads=4, val_size=10)
    assert single.stop_callbacks == (second,)
    both = make(gepa_kwargs={"stop_callbacks": [first, second]})._engine_config(budget=100, num_threads=4,
                                                                               val_size=10)
    assert both.stop_callbacks == (first, second)


def test_a_stop_callback_that_cannot_take_the_state_is_refused_before_any_lm_call():
    """`lambda: False` failed with a bare TypeError after the seed's validation had been paid for."""
    from gepa.utils import MaxMetricCallsStopper, NoImprovementStopper

    with pytest.raises(TypeError, match=r"gepa_kwargs\['stop_callbacks'\]\[1\] is called as callback\(state\)"):
        make(gepa_kwargs={"stop_callbacks": [lambda state: False, lambda: False]})
    make(gepa_kwargs={"stop_callbacks": [NoImprovementStopper(3), MaxMetricCallsStopper(10)]})  # gepa's own


def test_gepa_kwargs_max_reflection_cost_none_is_accepted():
    """Only a set max_reflection_cost is refused (dspy.GEPA's rule): code that passes it as None runs."""
    make(gepa_kwargs={"max_reflection_cost": None})


def test_engine_knobs_derive_from_num_threads():
    opt = make(num_threads=16)
    cfg = opt._engine_config(budget=800, num_threads=16, val_size=40)
    assert cfg.max_evals_in_flight == 16
    assert cfg.max_mutations_in_flight == 8
    assert 1 <= cfg.max_reflections_in_flight <= 8
    assert cfg.rung_fractions[-1] == 1.0 and len(cfg.rung_fractions) == 2
    small = make(num_threads=2)._engine_config(budget=100, num_threads=2, val_size=10)
    assert small.max_mutations_in_flight == 2 and small.rung_fractions == (1.0,)
    explicit = make(rung_fractions=[0.25, 1.0], max_mutations_in_flight=3)._engine_config(100, 16, 40)
    assert explicit.rung_fractions == (0.25, 1.0) and explicit.max_mutations_in_flight == 3
    assert cfg.minibatch_sampling == "failure_first"
    assert make(minibatch_sampling="epoch")._engine_config(100, 16, 40).minibatch_sampling == "epoch"
    assert cfg.max_siblings == 4 and make(max_sibling_reflections=1)._engine_config(100, 16, 40).max_siblings == 1
    assert cfg.reflection_feedback_reuse == 3
    assert make(reflection_feedback_reuse=0)._engine_config(100, 16, 40).reflection_feedback_reuse == 0
    assert cfg.reflection_scouts == 5 and make(reflection_scouts=0)._engine_config(100, 16, 40).reflection_scouts == 0


def test_is_configuration_error_both_assertion_and_value_error():
    assert issubclass(ConfigurationError, AssertionError) and issubclass(ConfigurationError, ValueError)


@pytest.mark.parametrize("bad", ["abc", [], [("stop_callbacks", [])]], ids=["str", "empty-list", "pairs"])
def test_gepa_kwargs_that_is_not_a_dict_is_a_type_error(bad):
    """An empty list would otherwise pass as "no options" and a string fail later with a message about
    its characters; both are a mistake in how gepa_kwargs was written, said at construction."""
    with pytest.raises(TypeError, match="gepa_kwargs must be a dict"):
        make(gepa_kwargs=bad)


@pytest.mark.parametrize("bad", [(-0.15, 0.6), (0.15, "0.6"), ("free", 0.0), (0.15, None)],
                         ids=["negative", "string", "word", "none"])
def test_price_table_with_a_negative_or_non_numeric_price_is_refused(bad):
    """A negative price would lower the run's spend (a cost budget never reached), a string one fail
    mid-run when the first rollout is priced: both are refused before any LM call."""
    with pytest.raises(ValueError, match="price_table"):
        make(price_table={"openai/my-finetune": bad})
    make(price_table={"openai/my-finetune": (0.15, 0), "other": [0, 0.6]})  # zero is a price (a free model)


def test_a_proposer_whose_signature_cannot_be_read_is_let_through():
    """Some callables (builtins, C extensions) have no readable signature: nothing can be checked, so
    construction must not fail on them; the call protocol is checked only where it can be."""
    from dspy_turbogepa.adapter.protocols import check_call_protocol

    check_call_protocol(max, "component_selector", "selector(...)", args=(None,) * 5)
    make(instruction_proposer=max)
    make(component_selector=getattr)


def test_a_copied_or_unpickled_optimizer_keeps_the_default_selector_adaptive():
    """A sweep or a worker process copies the configured optimizer: the copy must run the same search.
    The default component_selector is recognised so operator credit may adapt the one/all mix; an
    explicit "round_robin" (equal as a string) must not be."""
    import copy
    import pickle

    opt = make()
    assert opt._engine_config(100, 4, 10).adaptive_components
    for clone in (copy.deepcopy(opt), copy.copy(opt), pickle.loads(pickle.dumps(make(reflection_lm=None,
                                                                                       instruction_proposer=_Proposer())))):
        assert clone.component_selector == "round_robin"
        assert clone._engine_config(100, 4, 10).adaptive_components
    assert not make(component_selector="round_robin")._engine_config(100, 4, 10).adaptive_components
    assert not make(adaptive_proposal_mix=False)._engine_config(100, 4, 10).adaptive_components


class _Proposer:
    """A picklable instruction proposer (module level), so the optimizer pickles without an LM."""

    def __call__(self, candidate, reflective_dataset, components_to_update):
        return {}
