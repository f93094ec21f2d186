"""Streaming shown without timing: many LM calls are waiting at the same moment.

The proposer here never improves anything, so mutations keep failing and the adaptive width grows
(about 1/p mutations at once). After the seed's validation pass and 20 failed mutations, a gate holds
every student LM call until 12 calls are waiting at once, then opens for good. Under an in-flight
limit of 16 the streaming engine must get there; a loop that runs one reflective iteration at a time
(dspy.GEPA's) cannot, since its minibatches hold 3 calls. If the gate is never reached within the
timeout the test fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import random
import threading

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

from helpers import small_splits

TARGET = 12
TIMEOUT_S = 20.0
N_VAL = 16


class ThreadGate:
    """For sync programs: LM calls arrive on worker threads."""

    def __init__(self, target: int, arm_after: int) -> None:
        self.target = target
        self.arm_after = arm_after
        self.seen = 0
        self.waiting = 0
        self.peak = 0
        self.opened = threading.Event()
        self.timed_out = False
        self._cond = threading.Condition()

    def __call__(self, request) -> None:
        with self._cond:
            self.seen += 1
            if self.opened.is_set() or self.seen <= self.arm_after:
                return
            self.waiting += 1
            self.peak = max(self.peak, self.waiting)
            if self.waiting >= self.target:
                self.opened.set()
                self._cond.notify_all()
            else:
                if not self._cond.wait_for(self.opened.is_set, timeout=TIMEOUT_S):
                    self.timed_out = True
                    self.opened.set()
                    self._cond.notify_all()
            self.waiting -= 1


class AsyncGate:
    """For async programs: LM calls arrive as coroutines on the engine's loop."""

    def __init__(self, target: int, arm_after: int) -> None:
        self.target = target
        self.arm_after = arm_after
        self.seen = 0
        self.waiting = 0
        self.peak = 0
        self.opened = False
        self.timed_out = False
        self._event: asyncio.Event | None = None

    async def __call__(self, request) -> None:
        self.seen += 1
        if self.opened or self.seen <= self.arm_after:
            return
        if self._event is None:
            self._event = asyncio.Event()
        self.waiting += 1
        self.peak = max(self.peak, self.waiting)
        if self.waiting >= self.target:
            self.opened = True
            self._event.set()
        else:
            try:
                await asyncio.wait_for(self._event.wait(), TIMEOUT_S)
            except asyncio.TimeoutError:
                self.timed_out = True
                self.opened = True
                self._event.set()
        self.waiting -= 1


def _run(task, lm, budget=300, program=None, **kw):
    splits = small_splits(task, n_train=30, n_val=16)
    opt = TurboGEPA(task.metric, max_metric_calls=budget, reflection_lm=make_reflection_lm(seed=0), num_threads=16,
                    use_merge=False, track_stats=True, **kw)
    with dspy.context(lm=lm):
        return opt.compile(program or task.make_program(), trainset=splits.train, valset=splits.val)


@pytest.mark.parametrize("async_program", [False, True])
def test_twelve_calls_wait_at_once_under_a_limit_of_16(routing, async_program):
    arm_after = N_VAL + 20 * 2 * 3  # the seed's validation, then 20 failed mutations (two minibatches each)
    if async_program:
        gate = AsyncGate(TARGET, arm_after=arm_after)
        lm = make_student_lm(seed=0, noise=0.0, async_before_call=gate)
        program = routing.make_program(async_forward=True)
    else:
        gate = ThreadGate(TARGET, arm_after=arm_after)
        lm = make_student_lm(seed=0, noise=0.0, before_call=gate)
        program = routing.make_program()
    splits = small_splits(routing, n_train=30, n_val=N_VAL)
    counter = iter(range(10**6))

    def useless(candidate, reflective_dataset, components_to_update):  # never helps: mutations keep failing
        return {c: f"{candidate[c]} (note {next(counter)})" for c in components_to_update}

    opt = TurboGEPA(routing.metric, max_metric_calls=800, instruction_proposer=useless, num_threads=16,
                    use_merge=False, track_stats=True, rung_fractions=[1.0])
    with dspy.context(lm=lm):
        optimized = opt.compile(program, trainset=splits.train, valset=splits.val)
    assert not gate.timed_out, f"never had {TARGET} LM calls waiting at once (peak {gate.peak})"
    assert gate.peak >= TARGET
    assert optimized.detailed_results.run_stats["peak_evals_in_flight"] <= 16


def test_in_flight_limit_is_respected(routing):
    """Never more than num_threads program executions at once, even with jittery latencies."""
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}
    rng = random.Random(0)

    def jitter(request) -> None:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            delay = rng.random() * 0.004
        threading.Event().wait(delay)
        with lock:
            state["now"] -= 1

    lm = make_student_lm(seed=0, noise=0.0, before_call=jitter)
    splits = small_splits(routing)
    opt = TurboGEPA(routing.metric, max_metric_calls=200, reflection_lm=make_reflection_lm(seed=0), num_threads=5,
                    use_merge=False)
    with dspy.context(lm=lm):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert 1 < state["peak"] <= 5


def test_same_seed_same_program_despite_random_latencies(pipeline):
    """Completion order changes with latency; the result must not (deterministic mode)."""
    outs = []
    for latency_seed in (1, 2):
        rng = random.Random(latency_seed)
        lock = threading.Lock()

        def jitter(request, rng=rng, lock=lock) -> None:
            with lock:
                delay = rng.random() * 0.003
            threading.Event().wait(delay)

        lm = make_student_lm(seed=0, noise=0.0, before_call=jitter)
        optimized = _run(pipeline, lm, budget=250, seed=3)
        dr = optimized.detailed_results
        outs.append((list(dr.to_dict()["candidates"]), dr.parents, dr.val_aggregate_scores))
    assert outs[0] == outs[1]


def test_the_gate_discriminates_dspy_gepa_never_reaches_it(routing, monkeypatch):
    """The same gate on dspy.GEPA: its one-iteration-at-a-time loop peaks at a minibatch (3 calls)."""
    monkeypatch.setattr(__import__(__name__), "TIMEOUT_S", 1.5)
    gate = ThreadGate(TARGET, arm_after=N_VAL)
    lm = make_student_lm(seed=0, noise=0.0, before_call=gate)
    splits = small_splits(routing, n_train=30, n_val=N_VAL)
    opt = dspy.GEPA(routing.metric, max_metric_calls=N_VAL + 12, reflection_lm=make_reflection_lm(seed=0),
                    num_threads=16, use_merge=False)
    with dspy.context(lm=lm):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert gate.timed_out and gate.peak < TARGET


class _MetricInFlight:
    """The task's metric, counting its calls at once (scoring and feedback calls together) and how many
    feedback calls started while a scoring call was running; each call takes a few milliseconds, as an
    LLM judge's would take longer, so that calls overlap whenever the optimizer lets them."""

    def __init__(self, metric) -> None:
        self.metric = metric
        self.lock = threading.Lock()
        self.now = self.peak = self.scoring_now = 0
        self.feedback_beside_scoring = 0

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            if pred_name is None:
                self.scoring_now += 1
            elif self.scoring_now:
                self.feedback_beside_scoring += 1
        try:
            threading.Event().wait(0.004)
            return self.metric(gold, pred, trace, pred_name, pred_trace)
        finally:
            with self.lock:
                self.now -= 1
                if pred_name is None:
                    self.scoring_now -= 1


@pytest.mark.parametrize("num_threads", [2, 4])
def test_metric_calls_at_once_never_exceed_num_threads_feedback_calls_included(routing, num_threads):
    """dspy.GEPA runs at most num_threads metric calls at once (its feedback calls come one at a time,
    between evaluations), and an LLM-judge metric's rate limit is sized to that. Here reflections run
    beside evaluations, and their feedback calls (the metric with pred_name) take the evaluations' gate:
    without it a review measured 3 metric calls at once at num_threads=2 and 5 at 4."""
    metric = _MetricInFlight(routing.metric)
    splits = small_splits(routing, n_train=24, n_val=12, n_test=0)
    opt = TurboGEPA(metric, max_metric_calls=240, reflection_lm=make_reflection_lm(seed=0), num_threads=num_threads,
                    verbose=False, use_merge=False)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert metric.feedback_beside_scoring > 0, "no feedback call ran beside an evaluation: the test shows nothing"
    assert metric.peak == num_threads
