"""Findings of the session-36 reviews (code quality, tutorials, bad input)."""

from __future__ import annotations

import importlib
import logging
import re
import sys
from pathlib import Path

import pytest

from dspy_turbogepa.adapter import introspect
from dspy_turbogepa.adapter.run_identity import callable_identity


@pytest.fixture
def debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A module installed where Debian's python3-* packages go (``dist-packages``), which is not one of
    this interpreter's sysconfig paths."""
    root = tmp_path / "usr" / "lib" / "python3" / "dist-packages"
    root.mkdir(parents=True)
    (root / "zz_s36_debian_lib.py").write_text(
        "class Parsed:\n    def __init__(self, x):\n        self.x = x\n\n"
        "def normalise(text):\n    return text.strip().lower()\n\n"
        "def broken():\n    raise ValueError('inside the library')\n")
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module("zz_s36_debian_lib")
    yield module
    sys.modules.pop("zz_s36_debian_lib", None)


def test_one_answer_to_whose_code_it_is(debian_package):
    """Error attribution, the run key and JSON revival asked three different questions: the evaluator
    counted ``dist-packages`` and the user site as installed code, the run key and revival only the
    interpreter's sysconfig paths. So a Debian or ``pip install --user`` package was "library" when an
    error was attributed but "the user's" when its functions keyed a run (an upgrade of it refused the
    resume) or a class of it was rebuilt from its ``__dict__``."""
    module = debian_package
    path = module.__file__
    assert introspect.library_path(path)
    assert not introspect.users_file(path)
    assert introspect.library_class(module.Parsed)
    assert introspect.library_function(module.normalise)


def test_an_upgrade_of_an_installed_helper_does_not_change_the_run_key(debian_package):
    """A metric calling an installed helper is keyed by its own code, not the helper's: the helper's
    changes with an upgrade of the package, not with the user's edits, and must not refuse a resume.
    Before, a ``dist-packages`` helper counted as the user's code and its new body changed the key."""
    from dspy_turbogepa.adapter.trajectory_json import _plain_user_class

    namespace = {"normalise": debian_package.normalise}
    exec("def metric(gold, pred, trace=None):\n    return normalise(pred) == gold\n", namespace)
    before = callable_identity(namespace["metric"])
    Path(debian_package.__file__).write_text(
        "class Parsed:\n    pass\n\ndef normalise(text):\n    return ' '.join(text.split()).casefold()\n")
    namespace["normalise"] = importlib.reload(debian_package).normalise
    assert callable_identity(namespace["metric"]) == before
    assert not _plain_user_class(debian_package.Parsed)  # an installed class is not rebuilt from its fields


def test_a_users_file_is_still_the_users(tmp_path: Path):
    own = tmp_path / "project" / "metric.py"
    own.parent.mkdir()
    own.write_text("x = 1\n")
    assert introspect.users_file(str(own))
    assert not introspect.library_path(str(own))
    assert not introspect.users_file(introspect.__file__)  # this package's frames are not the user's


def test_a_callable_selector_sees_gepas_iteration_index():
    """GEPA_Advanced.md's ``alternating_half_selector`` picks a half on ``state.i % 2``. gepa calls the
    selector after ``state.i += 1`` (0 on the first iteration); ours saw ``i = commits - 1`` (the stop
    callbacks' value, -1 on the first), so it optimized the other half on every iteration. With
    dspy.GEPA's one-mutation-at-a-time flags, the selector now sees 0, 1, 2, ... as gepa's does, and
    a stop callback still sees -1 after the seed."""
    import dspy

    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

    task = TASKS["pipeline"]
    splits = task.splits(data_seed=0, n_train=12, n_val=6, n_test=0)
    seen: list[int] = []
    stops: list[int] = []

    def alternating_half_selector(state, trajectories, subsample_scores, candidate_idx, candidate):
        seen.append(state.i)
        components = list(candidate.keys())
        mid = len(components) // 2
        return components[:mid] if state.i % 2 == 0 else components[mid:]

    def stop(state):
        stops.append(state.i)
        return False

    opt = TurboGEPA(task.metric, max_metric_calls=80, num_threads=4, reflection_lm=make_reflection_lm(seed=0),
                    component_selector=alternating_half_selector, gepa_kwargs={"stop_callbacks": [stop]},
                    reflection_scouts=0, reflection_feedback_reuse=0, minibatch_sampling="epoch",
                    max_sibling_reflections=1, adaptive_proposal_mix=False, speculative_chaining=False,
                    max_mutations_in_flight=1, use_merge=False)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    assert len(seen) >= 3 and seen[:3] == [0, 1, 2]
    # an iteration skipped before its selector (its minibatch was solved) still counts, as in gepa
    assert all(a < b for a, b in zip(seen, seen[1:]))
    assert stops == list(range(-1, len(stops) - 1))  # between iterations: the last one finished
    assert set(seen) <= set(range(max(stops) + 2))


# ================================================================ bad input (session-36 review)
def _routing(n_train: int = 12, n_val: int = 8):
    from dspy_turbogepa.testing import TASKS

    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=n_train, n_val=n_val, n_test=0)
    return task, splits.train, splits.val


def _optimizer(metric, **kwargs):
    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing import make_reflection_lm

    kwargs.setdefault("max_metric_calls", 60)
    kwargs.setdefault("num_threads", 4)
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("reflection_lm", make_reflection_lm(seed=0))
    return TurboGEPA(metric, **kwargs)


def _calls(lm) -> int:
    from dspy_turbogepa.testing import sim_engine

    return sim_engine(lm).calls


def test_a_prediction_in_the_trainset_is_named_not_a_bare_attribute_error():
    """A dspy.Prediction is an Example subclass without input keys: ``.inputs()`` raised
    ``AttributeError: 'Prediction' object has no attribute '_input_keys'`` from our check."""
    import dspy

    from dspy_turbogepa.testing import make_student_lm

    task, train, val = _routing()
    lm = make_student_lm(seed=0)
    bad = [dspy.Prediction(**dict(ex)) for ex in train]
    with dspy.context(lm=lm), pytest.raises(TypeError, match=r"trainset\[0\] is a dspy.Prediction .*with_inputs"):
        _optimizer(task.metric).compile(task.make_program(), trainset=bad, valset=val)
    assert _calls(lm) == 0


def test_a_builtin_student_given_inputs_under_other_names_is_refused_before_any_call(caplog):
    """``dspy.Predict('ticket -> queue')`` takes ``**kwargs``, so binding passed; DSPy drops an input
    it does not know and calls the LM with every input empty (it only warns): 200 student and 88
    reflection calls, then the seed. dspy.GEPA does the same."""
    import dspy

    from dspy_turbogepa.testing import make_student_lm

    task, train, val = _routing()
    renamed = [dspy.Example(text=ex.ticket, queue=ex.queue).with_inputs("text") for ex in train]
    lm = make_student_lm(seed=0)
    for student in (dspy.Predict("ticket -> queue"), dspy.ChainOfThought("ticket -> queue")):
        with dspy.context(lm=lm), pytest.raises(TypeError, match=r"trainset's inputs \['text'\] are none of "
                                                              r"\w+'s input fields \['ticket'\]"):
            _optimizer(task.metric).compile(student, trainset=renamed, valset=val)
    assert _calls(lm) == 0
    # one of two inputs missing everywhere: a warning, and the run goes on
    partial = [dspy.Example(ticket=ex.ticket, queue=ex.queue).with_inputs("ticket") for ex in train]
    with dspy.context(lm=lm), caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        _optimizer(task.metric, max_metric_calls=30).compile(
            dspy.Predict("ticket, customer_tier -> queue"), trainset=partial, valset=partial[:4])
    assert any("customer_tier" in r.getMessage() and "without it" in r.getMessage() for r in caplog.records)


def test_a_forward_without_return_is_warned_about():
    """Every prediction None, every predictor running fine: the run paid 164 student and 128 reflection
    calls and stopped with 'no progress' and no failure to explain the 0.0. The metric still gets
    pred=None (dspy.GEPA's way; a program may abstain), and one warning says what happened."""
    import dspy

    from dspy_turbogepa.testing import make_student_lm

    task, train, val = _routing()

    class ReturnsNone(dspy.Module):
        def __init__(self):
            super().__init__()
            self.route = dspy.Predict(dspy.Signature("ticket -> queue", "Route the ticket."))

        def forward(self, ticket):
            self.route(ticket=ticket)

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return float(getattr(pred, "queue", None) == gold.queue)

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("dspy_turbogepa")
    log.addHandler(handler)
    try:
        with dspy.context(lm=make_student_lm(seed=0)):
            _optimizer(metric, max_metric_calls=30).compile(ReturnsNone(), trainset=train, valset=val)
    finally:
        log.removeHandler(handler)
    warned = [r.getMessage() for r in records if "returned None" in r.getMessage()]
    assert len(warned) == 1 and "`return`" in warned[0], warned


def test_predictors_the_program_never_calls_stop_the_run():
    """A forward that calls the LM itself: no reflection ever has a trace to read. The run skipped 204
    proposals as 'no_reflective_data' and stopped with 'the last mutations changed nothing', returning
    the seed. Now the first 8 such reflections stop it, naming the predictor and the cause."""
    import dspy

    from dspy_turbogepa import SystemicFailureError
    from dspy_turbogepa.testing import make_student_lm

    task, train, val = _routing()

    class Unused(dspy.Module):
        def __init__(self):
            super().__init__()
            self.route = dspy.Predict(dspy.Signature("ticket -> queue", "Route the ticket."))

        def forward(self, ticket):
            out = dspy.settings.lm(messages=[{"role": "user", "content": f"Route the ticket.\nticket: {ticket}"}])
            return dspy.Prediction(queue=str(out[0]).strip())

    lm = make_student_lm(seed=0)
    expected = r"the first 8 reflections had nothing to reflect on \(no usable trace records for route\): no rollout"
    with dspy.context(lm=lm), pytest.raises(SystemicFailureError, match=expected + ".*forward calls them"):
        _optimizer(task.metric, max_metric_calls=200).compile(Unused(), trainset=train, valset=val)
    assert _calls(lm) < 60


def test_a_predictor_holding_a_model_name_string_is_refused_before_any_call():
    import dspy

    from dspy_turbogepa.testing import make_student_lm

    task, train, val = _routing()
    program = task.make_program()
    name, predictor = next(iter(program.named_predictors()))
    predictor.lm = "openai/gpt-4o-mini"
    lm = make_student_lm(seed=0)
    with dspy.context(lm=lm), pytest.raises(TypeError, match=rf"predictor '{re.escape(name)}' has "
                                                             r"lm='openai/gpt-4o-mini', not a dspy.LM.*set_lm"):
        _optimizer(task.metric).compile(program, trainset=train, valset=val)
    assert _calls(lm) == 0


def test_a_misspelt_provider_on_the_reflection_lm_stops_at_its_first_call():
    """``dspy.LM("opneai/gpt-4o-mini")``: litellm refuses to route it before any request, every time.
    It was an ordinary failed reflection, so the run stopped only after 8 of them."""
    import dspy

    from dspy_turbogepa import SystemicFailureError
    from dspy_turbogepa.adapter.ratelimit import FATAL_ERROR_TYPES, classify
    from dspy_turbogepa.testing import make_student_lm

    task, train, val = _routing()
    with dspy.context(lm=make_student_lm(seed=0)), pytest.raises(
            SystemicFailureError, match=r"failed with an error retrying cannot fix.*LLM Provider NOT provided") as info:
        _optimizer(task.metric, reflection_lm=dspy.LM("opneai/gpt-4o-mini"), max_metric_calls=200).compile(
            task.make_program(), trainset=train, valset=val)
    assert info.value.error_type == "UnknownProviderError"
    assert not classify(ValueError("LLM Provider NOT provided"), FATAL_ERROR_TYPES).fatal  # not the user's own


def test_a_metric_return_without_a_score_names_its_keys():
    import dspy

    from dspy_turbogepa.adapter.metric import read_metric_return

    reading = read_metric_return({"feedback": "ok", "value": 1.0}, 0.0)
    assert reading.invalid is not None and "dict without a 'score'" in reading.invalid
    assert "['feedback', 'value']" in reading.invalid and "dspy.Prediction(score=" in reading.invalid
    assert "Prediction without a 'score'" in (read_metric_return(dspy.Prediction(metric=1.0), 0.0).invalid or "")
    assert read_metric_return(dspy.Prediction(score=None, feedback="f"), 0.0).invalid == \
        "the metric returned no score (None)"


def test_a_budget_of_exactly_the_valset_is_warned_about(caplog):
    import dspy

    from dspy_turbogepa.testing import make_student_lm

    task, train, val = _routing()
    with dspy.context(lm=make_student_lm(seed=0)), caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        _optimizer(task.metric, max_metric_calls=len(val)).compile(task.make_program(), trainset=train, valset=val)
    assert any("covers only the seed's validation" in r.getMessage() for r in caplog.records)


def test_a_submodule_compiled_by_another_optimizer_is_named():
    """DSPy hides the predictors of a submodule marked ``_compiled`` (BootstrapFewShot's result):
    'no predictors' said nothing about why."""
    import dspy

    task, train, val = _routing()

    class Outer(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = task.make_program()
            self.inner._compiled = True

        def forward(self, ticket):
            return self.inner(ticket=ticket)

    with pytest.raises(ValueError, match=r"no predictors .*compiled \(inner: .*_compiled = False"):
        _optimizer(task.metric).compile(Outer(), trainset=train, valset=val)


def test_a_class_given_for_an_instance_says_pass_an_instance():
    from dspy.teleprompt.gepa.instruction_proposal import MultiModalInstructionProposer
    from gepa.strategies.component_selector import RoundRobinReflectionComponentSelector

    task, _, _ = _routing()
    with pytest.raises(TypeError, match=r"component_selector is the class RoundRobinReflectionComponentSelector, "
                                        r"not an instance of it: pass RoundRobinReflectionComponentSelector\(\)"):
        _optimizer(task.metric, component_selector=RoundRobinReflectionComponentSelector)
    with pytest.raises(TypeError, match=r"pass MultiModalInstructionProposer\(\) instead"):
        _optimizer(task.metric, instruction_proposer=MultiModalInstructionProposer)
    _optimizer(task.metric, component_selector=RoundRobinReflectionComponentSelector(),
               instruction_proposer=MultiModalInstructionProposer())


def test_an_evaluator_of_ones_own_plugs_in_through_make_evaluator():
    """extending.md's Ray row: compile() always built a DspyEvaluator, so an evaluator running rollouts
    elsewhere had no seam short of copying ``_run``. ``_make_evaluator`` is the seam, and
    ``ManagedEvaluator`` says what compile() asks of it (evaluate, rate_limit_stats, close)."""
    import dspy

    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.adapter.evaluator import ManagedEvaluator
    from dspy_turbogepa.testing import make_reflection_lm, make_student_lm

    task, train, val = _routing()
    seen: dict[str, int] = {"evaluate": 0, "closed": 0}

    class Remote:
        """Stands in for an evaluator on workers: delegates, and counts."""

        def __init__(self, inner):
            self.inner = inner

        async def evaluate(self, texts, fingerprint, split, example_id, capture_traces):
            seen["evaluate"] += 1
            return await self.inner.evaluate(texts, fingerprint, split, example_id, capture_traces)

        def rate_limit_stats(self):
            return {}

        def close(self):
            seen["closed"] += 1
            self.inner.close()

    class OnWorkers(TurboGEPA):
        def _make_evaluator(self, codec, data, config, num_threads):
            made = Remote(super()._make_evaluator(codec, data, config, num_threads))
            assert isinstance(made, ManagedEvaluator)
            return made

    opt = OnWorkers(task.metric, max_metric_calls=40, num_threads=4, verbose=False, track_stats=True,
                    reflection_lm=make_reflection_lm(seed=0))
    with dspy.context(lm=make_student_lm(seed=0)):
        program = opt.compile(task.make_program(), trainset=train, valset=val)
    assert seen["evaluate"] == program.detailed_results.run_stats["metric_calls_executed"] > 0
    assert seen["closed"] == 1


# ================================================ false positives of the new checks (a review of the diff)
def test_the_input_check_reads_only_students_that_hand_their_keywords_to_a_signature(caplog):
    """The check took any DSPy class without a forward of the user's for a built-in: BestOfN / Refine
    around the user's module (``forward(url)`` calling ``Predict('document -> summary')``) were refused,
    MultiChainComparison was warned about the attempts its forward builds, and a defaulted input about
    what DSPy fills in."""
    import dspy

    from dspy_turbogepa.adapter.protocols import check_inputs_reach

    class Summarize(dspy.Module):
        def __init__(self):
            super().__init__()
            self.summarize = dspy.Predict("document -> summary")

        def forward(self, url):
            return self.summarize(document=f"text of {url}")

    urls = [dspy.Example(url=f"u{i}", summary="s").with_inputs("url") for i in range(3)]
    questions = [dspy.Example(question=f"q{i}", answer="a").with_inputs("question") for i in range(3)]

    class Defaulted(dspy.Signature):
        question: str = dspy.InputField()
        style: str = dspy.InputField(default="concise")
        answer: str = dspy.OutputField()

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        for wrapper in (dspy.BestOfN(Summarize(), N=2, reward_fn=lambda args, pred: 1.0, threshold=1.0),
                        dspy.Refine(Summarize(), N=2, reward_fn=lambda args, pred: 1.0, threshold=1.0)):
            assert check_inputs_reach(wrapper, "trainset", urls) == []
        assert check_inputs_reach(dspy.MultiChainComparison("question -> answer"), "trainset", questions) == []
        assert check_inputs_reach(dspy.Predict(Defaulted), "trainset", questions) == []
    assert not [r for r in caplog.records if "no example gives" in r.getMessage()]
    # the students it is for are still checked
    with pytest.raises(TypeError, match=r"are none of ChainOfThought's input fields \['document'\]"):
        check_inputs_reach(dspy.ChainOfThought("document -> summary"), "trainset", urls)


def test_a_prediction_with_its_inputs_marked_is_an_example():
    import dspy

    from dspy_turbogepa.adapter.data import check_examples

    check_examples("trainset", [dspy.Prediction(ticket="t", queue="billing").with_inputs("ticket")])
    with pytest.raises(TypeError, match="no input fields marked"):
        check_examples("trainset", [dspy.Prediction(ticket="t", queue="billing")])


def test_a_decision_request_client_is_an_lm_dspy_accepts():
    """DSPy's Predict calls a non-BaseLM whose ``supports_decision_requests`` is True; the new check
    refused it. A top-level predictor's fix names ``program.set_lm``, not ``program.self``."""
    import dspy

    from dspy_turbogepa.adapter.data import check_predictor_lms

    class Client:
        supports_decision_requests = True

    predictor = dspy.Predict("ticket -> queue")
    predictor.lm = Client()
    check_predictor_lms([("route", predictor)])
    predictor.lm = "openai/gpt-4o-mini"
    with pytest.raises(TypeError, match=r"program\.set_lm\(dspy\.LM\('openai/gpt-4o-mini'\)\)"):
        check_predictor_lms(predictor.named_predictors())
    predictor.lm = object()
    with pytest.raises(TypeError, match=r"lm=object, not a dspy.LM"):
        check_predictor_lms([("route", predictor)])


def test_a_score_of_none_among_many_keys_is_read_as_no_score():
    from dspy_turbogepa.adapter.metric import read_metric_return

    ret = dict.fromkeys("abcdefgh", 1) | {"score": None}
    assert read_metric_return(ret, 0.0).invalid == "the metric returned no score (None)"


def test_a_cascade_that_calls_its_lm_on_a_few_examples_is_not_stopped():
    """A rule answers most tickets and the predictor runs on one training example and two validation
    examples: the first reflections read minibatches where it did not run, and the new rule stopped
    3 of 8 seeds as "the program ran without calling" it. The seed's validation had seen it run."""
    import dspy

    from dspy_turbogepa.testing import TASKS, make_student_lm

    task = TASKS["routing"]
    for seed in (2, 3):
        splits = task.splits(data_seed=seed, n_train=24, n_val=8, n_test=0)
        lm_tickets = {splits.train[0].ticket} | {ex.ticket for ex in splits.val[:2]}
        inner = task.make_program()

        class Cascade(dspy.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, ticket):
                if ticket not in lm_tickets:
                    return dspy.Prediction(queue="cache-miss")
                return self.inner(ticket=ticket)

        with dspy.context(lm=make_student_lm(seed=0)):
            _optimizer(task.metric, max_metric_calls=300, seed=seed).compile(
                Cascade(), trainset=splits.train, valset=splits.val)


# ======================================= assertions a mutation audit of today's tests asked for
def test_the_standard_library_and_this_package_are_never_the_users_code():
    import logging as stdlib_logging
    import os

    assert introspect.library_path(os.__file__) and not introspect.users_file(stdlib_logging.__file__)
    assert introspect.library_function(introspect.users_file)  # ours: never keyed by code, even editable


def test_a_class_whose_call_does_not_fit_is_not_told_to_pass_an_instance():
    """Only a class whose *instances* take the call is told "pass X()"; one whose constructor takes it
    and whose instances do not is a signature mismatch like any other."""
    from dspy_turbogepa.adapter.protocols import check_call_protocol

    class Backwards:
        def __init__(self, state, trajectories, subsample_scores, candidate_idx, candidate):
            pass

        def __call__(self):
            return []

    check_call_protocol(Backwards, "component_selector", "selector(...)", args=(None,) * 5)  # the class fits

    class Neither:
        def __call__(self):
            return []

    with pytest.raises(TypeError) as info:
        check_call_protocol(Neither, "component_selector", "selector(...)", args=(None,) * 5)
    assert "not an instance" not in str(info.value)


def test_react_is_checked_and_wrappers_of_a_bare_predict_are_not():
    import dspy

    from dspy_turbogepa.adapter.protocols import check_inputs_reach

    renamed = [dspy.Example(text=f"t{i}", queue="q").with_inputs("text") for i in range(3)]
    with pytest.raises(TypeError, match=r"are none of ReAct's input fields \['ticket'\]"):
        check_inputs_reach(dspy.ReAct("ticket -> queue", tools=[]), "trainset", renamed)
    docs = [dspy.Example(url=f"u{i}", summary="s").with_inputs("url") for i in range(3)]
    check_inputs_reach(dspy.Refine(dspy.Predict("document -> summary"), N=2, reward_fn=lambda a, p: 1.0,
                                   threshold=1.0), "trainset", docs)


def test_compiled_submodules_are_named_wherever_they_sit():
    import dspy

    from dspy_turbogepa.adapter.data import compiled_submodules

    def compiled():
        module = dspy.ChainOfThought("q -> a")
        module._compiled = True
        return module

    class Middle(dspy.Module):
        def __init__(self):
            super().__init__()
            self.inner = compiled()

    class Outer(dspy.Module):
        def __init__(self):
            super().__init__()
            self.a = Middle()
            self.stages = [compiled()]
            self.by_name = {"x": compiled()}

    assert compiled_submodules(Outer()) == ["a.inner", "by_name['x']", "stages[0]"]


def test_a_predictor_the_program_skips_beside_one_it_calls_does_not_stop_the_run():
    """The nothing-to-reflect rule counts only before the first usable proposal, and only components
    that never ran: a program calling one of its two predictors optimizes that one."""
    import dspy

    from dspy_turbogepa.testing import make_student_lm

    task, train, val = _routing()

    class HalfUsed(dspy.Module):
        def __init__(self):
            super().__init__()
            self.route = task.make_program()
            self.unused = dspy.Predict("ticket -> queue")

        def forward(self, ticket):
            return self.route(ticket=ticket)

    with dspy.context(lm=make_student_lm(seed=0)):
        program = _optimizer(task.metric, max_metric_calls=200, track_stats=True).compile(
            HalfUsed(), trainset=train, valset=val)
    assert len(program.detailed_results.candidates) > 1


def test_not_run_needs_rollouts_that_finished_without_the_component():
    """A rollout that raised before reaching a predictor says nothing about whether the program calls
    it; nor does a minibatch with no finished rollout at all."""
    import random

    import dspy

    from dspy_turbogepa.adapter.trajectory import DspyTrajectory
    from dspy_turbogepa.engine.types import EvalOutcome
    from dspy_turbogepa.proposers.reflection import ReflectiveProposer

    class NoRecords:
        def build_indexed(self, *args, **kwargs):
            return {}

    proposer = ReflectiveProposer(NoRecords(), lambda **kw: {}, None, max_workers=1,
                                  components_seen_running=lambda: frozenset())
    example = dspy.Example(ticket="t", queue="q").with_inputs("ticket")
    raised = EvalOutcome(0, 0.0, trajectory=DspyTrajectory(example, None, error="boom"))
    finished = EvalOutcome(1, 0.0, trajectory=DspyTrajectory(example, dspy.Prediction(queue="x")))
    rng = random.Random(0)
    assert proposer._dataset({"route": "r"}, ["route"], [raised], rng).not_run is False
    assert proposer._dataset({"route": "r"}, ["route"], [raised, finished], rng).not_run is True
    proposer.close()


def test_an_async_program_reports_the_predictors_it_ran():
    """The async path (acall) feeds components_seen_running too: a cascade with an aforward is not stopped."""
    import dspy

    from dspy_turbogepa.adapter.evaluator import DspyEvaluator
    from dspy_turbogepa.adapter.program import ProgramCodec
    from dspy_turbogepa.testing import make_student_lm

    task, train, val = _routing()
    route = dict(task.make_program().named_predictors())["route"]

    class AsyncCascade(dspy.Module):
        def __init__(self):
            super().__init__()
            self.route = route

        def forward(self, ticket):
            return self.route(ticket=ticket)

        async def aforward(self, ticket):
            return await self.route.acall(ticket=ticket)

    codec = ProgramCodec(AsyncCascade())
    evaluator = DspyEvaluator(codec, {"train": train, "val": val}, task.metric, 0.0, max_workers=2)
    assert evaluator.use_async
    import asyncio

    with dspy.context(lm=make_student_lm(seed=0)):
        outcome = asyncio.run(evaluator.evaluate(codec.seed_texts(), "seed", "val", 0, False))
    evaluator.close()
    assert outcome.failure is None and outcome.trajectory is None  # ran to the end, trace not captured
    assert evaluator.components_seen_running() == frozenset({"route"})


def test_a_metric_return_whose_keys_cannot_be_read_is_still_no_score():
    from dspy_turbogepa.adapter.metric import read_metric_return

    class Odd:
        def keys(self):
            raise RuntimeError("no keys today")

        def __getitem__(self, name):
            raise KeyError(name)

    assert "without a 'score' (its keys: [])" in (read_metric_return(Odd(), 0.0).invalid or "")


def test_an_unknown_provider_is_fatal_only_where_the_fatal_set_says_so():
    import litellm

    from dspy_turbogepa.adapter.ratelimit import FATAL_ERROR_TYPES, fatal_error_name

    exc = litellm.BadRequestError("LLM Provider NOT provided. You passed model=opneai/x", "opneai/x", "opneai")
    assert fatal_error_name(exc, FATAL_ERROR_TYPES) == "UnknownProviderError"
    assert fatal_error_name(exc, frozenset()) is None
