"""Review of the session's changes since e054725 (program-error routing, the run lock's fork hook).

Each test shows a flaw a review found in that session's fixes (each failed before its fix).
"""

from __future__ import annotations

import os
import sys
import threading

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.adapter.program import PredictorNames

from helpers import engine_lm


class _Engine:
    """Answers ``x`` to every field named ``answer`` / ``verdict``."""

    def complete(self, request):
        text = "[[ ## answer ## ]]\nx\n\n[[ ## verdict ## ]]\nx\n\n[[ ## completed ## ]]"
        return Response(id=None, model="fake", message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))


def _lm() -> dspy.LM:
    engine = _Engine()
    return engine_lm(engine, "fake/review28")


def _metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    if pred_name is not None:
        return dspy.Prediction(score=0.0, feedback=f"feedback for {pred_name}")
    return 0.0


class _Recording:
    def __init__(self) -> None:
        self.calls: list = []
        self.lock = threading.Lock()

    def __call__(self, candidate, reflective_dataset, components_to_update):
        with self.lock:
            self.calls.append(dict(reflective_dataset))
            n = len(self.calls)
        return {c: candidate[c] + f" v{n}" for c in components_to_update}


# ------------------------------------------------------------------------- PredictorNames.raised_in


class _NotConfigured(Exception):
    pass


class _LazySettings:
    """What ``django.conf.settings`` is (a ``LazyObject``): ``__class__`` is proxied to the wrapped object,
    so reading it sets the object up, which raises while it is not configured."""

    _wrapped = None

    def _setup(self):
        raise _NotConfigured("settings are not configured")

    @property
    def __class__(self):  # as django.utils.functional.LazyObject
        if self._wrapped is None:
            self._setup()
        return type(self._wrapped)

    def __getattr__(self, name):
        if self._wrapped is None:
            self._setup()
        return getattr(self._wrapped, name)


_SETTINGS = _LazySettings()


class _ReadsSettings(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = dspy.Predict("text -> answer")

    def forward(self, text):
        a = self.first(text=text)
        if text.endswith("3"):  # the program's own error, on one example
            return dspy.Prediction(answer=_SETTINGS.ANSWER)
        return a


@pytest.mark.parametrize("with_log_dir", [False, True])
def test_a_program_error_raised_inside_a_lazy_proxy_is_scored_not_fatal_to_the_compile(with_log_dir, tmp_path):
    """Also the proxy ``forward`` names as a global: looking for LMs to mask (every compile) and keying the
    run (with a log_dir) read it, and each raised from its ``__class__`` / ``__getattr__``."""
    data = [dspy.Example(text=f"t{i}", answer="y").with_inputs("text") for i in range(6)]
    opt = TurboGEPA(_metric, max_metric_calls=30, instruction_proposer=_Recording(), num_threads=2,
                    reflection_minibatch_size=2, use_merge=False, skip_perfect_score=False, track_stats=True,
                    log_dir=str(tmp_path / "run") if with_log_dir else None)
    with dspy.context(lm=_lm()):
        program = opt.compile(_ReadsSettings(), trainset=data, valset=data)
    assert program.detailed_results.run_stats["failures"]["program_error"] > 0


def _metric_with_settings(gold, pred, trace=None, pred_name=None, pred_trace=None, cfg=_SETTINGS):
    return _metric(gold, pred, trace, pred_name, pred_trace)


@pytest.mark.parametrize("how", ["default argument", "partial"])
def test_a_lazy_proxy_bound_to_the_metric_does_not_stop_a_compile_with_a_log_dir(how, tmp_path):
    """The run key reads a metric's default arguments and a partial's bound ones: each raised from the
    proxy (django's settings, not configured in a notebook) before any LM call."""
    import functools

    metric = _metric_with_settings if how == "default argument" else functools.partial(
        lambda gold, pred, trace=None, pred_name=None, pred_trace=None, cfg=None:
        _metric(gold, pred, trace, pred_name, pred_trace), cfg=_SETTINGS)
    data = [dspy.Example(text=f"t{i}", answer="y").with_inputs("text") for i in range(6)]
    opt = TurboGEPA(metric, max_metric_calls=20, instruction_proposer=_Recording(), num_threads=2,
                    reflection_minibatch_size=2, use_merge=False, skip_perfect_score=False, track_stats=True,
                    log_dir=str(tmp_path / "run"))
    with dspy.context(lm=_lm()):
        program = opt.compile(_ReadsSettings(), trainset=data, valset=data)
    assert program.detailed_results.total_metric_calls > 0


class _Refusing(dspy.Predict):
    def forward(self, **kwargs):
        raise ValueError("the content filter refused this input")


class _WrapsTheVerifiersError(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = dspy.Predict("text -> answer")
        self.second = _Refusing("text -> verdict")

    def forward(self, text):
        a = self.first(text=text)
        try:
            return self.second(text=a.answer)
        except ValueError as exc:  # the common "add context and re-raise" idiom
            raise RuntimeError("the verification step failed") from exc


def test_an_error_raised_from_one_raised_inside_a_predictor_is_fed_back_to_that_predictor():
    program = _WrapsTheVerifiersError()
    with dspy.context(lm=_lm()), pytest.raises(RuntimeError) as info:
        program(text="t0")
    assert PredictorNames(program).raised_in(info.value) == "second"


# ------------------------------------------------------------------------- the run lock in a forked child


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork and flock")
def test_a_forked_child_releasing_the_run_lock_leaves_its_own_files_alone(tmp_path):
    from dspy_turbogepa.store.sqlite_store import RunStore

    key = {"trainset": "t" * 32, "valset": "v" * 32, "student": "s" * 32, "seed": "0", "config": "c" * 32}
    store = RunStore.open(tmp_path / "run", key)
    try:
        number = store._lock._fd
        assert number is not None
        pid = os.fork()
        if pid == 0:  # the child: only os._exit leaves it
            code = 3
            try:
                # the child opens a file of its own, which gets the number the fork hook freed
                mine = os.open(tmp_path / "childs_own_file", os.O_RDWR | os.O_CREAT, 0o644)
                if mine != number:
                    os.dup2(mine, number)
                    os.close(mine)
                store._finalizer()  # what runs at the child's exit (weakref.finalize's atexit hook)
                try:
                    os.fstat(number)
                    code = 0  # the child's own file is still open
                except OSError:
                    code = 1  # closed by the parent's lock release
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the child's release closed the child's own file"
    finally:
        store.close()


# ------------------------------------------------------------------------- round robin, chained mutations


def test_a_chained_mutations_turn_moves_its_adopted_parents_round_robin():
    import asyncio
    import random

    from engine.fakes import FakeEvaluator, FakeReflector, KeywordTask, Setup, build, make_config

    from dspy_turbogepa.engine.records import MutationPlan

    setup = Setup(task=KeywordTask(components=("a", "b")))
    orch = build(make_config(), FakeEvaluator(setup.task, None), FakeReflector(None), setup)
    seed = setup.seed()
    # mutation 0 rewrote "a" on the seed: its child survived rung 0 and continues the round robin at "b"
    child = seed.with_updates({"a": "base kw0 kw1"}, "reflection")

    async def chained_mutation_1() -> MutationPlan:
        survivor = asyncio.get_running_loop().create_future()
        survivor.set_result((child, 1))
        orch._rung0_futs[0] = survivor
        plan = MutationPlan(seq=1, kind="reflection", parent=seed, parent_index=0, parent_val={},
                            minibatch=(0, 1, 2), rng=random.Random(0), committed_at_launch=1, reservation=0,
                            chain_on=0, turn_deferred=True)
        await orch._adopt_chained_parent(plan)
        assert plan.chained and plan.components == []  # the turn waits for the perfect-minibatch check
        await orch._take_turn(plan)  # its minibatch was not perfect: the turn is taken now
        return plan

    plan = asyncio.run(chained_mutation_1())
    assert plan.chained and plan.components == ["b"]  # mutation 1 reflects "b" on the child
    orch._selector.inherit(child.fingerprint, 1)  # mutation 0 commits: the child joins the pool
    later, _ = orch._selector.select(child.fingerprint, child.texts, 1, (), (), None)
    assert later == ["a"], "a later mutation from the child reflected 'b' again, the turn mutation 1 took"
