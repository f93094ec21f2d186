"""The user's DSPy configuration reaches every rollout as it would under dspy.GEPA.

Probes, on small real compiles with the in-process fake LMs: an adapter (``dspy.configure`` or
``dspy.context``), ``dspy.settings.callbacks``, callbacks on a module or an LM, ``track_usage``,
per-predictor LMs beside the context LM, and compile called from a thread other than the one that
configured dspy (or from a coroutine, or with only a context LM). Sync programs run in the evaluator's
worker threads, programs with their own ``aforward`` on the event loop: both paths are covered.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS, AsyncSimEngine, SimEngine, make_reflection_lm, sim_engine
from dspy_turbogepa.testing.fake_lm import make_student_lm, request_messages

ROUTING = TASKS["routing"]
PIPELINE = TASKS["pipeline"]
SYNC_ASYNC = pytest.mark.parametrize("async_forward", [False, True], ids=["sync", "async"])
JSON_MARK = "Outputs will be a JSON object"


@pytest.fixture(autouse=True)
def _restore_global_settings():
    """Every test here may call ``dspy.configure`` (from pytest's main thread, the config owner): put the
    keys it touches back, and start with no global LM so a context LM is the only one."""
    keys = ("lm", "adapter", "callbacks", "track_usage")
    saved = {k: dspy.settings.get(k) for k in keys}
    dspy.configure(lm=None, adapter=None, callbacks=[], track_usage=False)
    try:
        yield
    finally:
        dspy.configure(**saved)


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.WARNING, logger="dspy_turbogepa")


def _splits(task, n_train=6, n_val=4):
    return task.splits(n_train=n_train, n_val=n_val, n_test=0)


def _compile(program, task=ROUTING, metric=None, budget=20, splits=None):
    splits = splits or _splits(task)
    opt = TurboGEPA(metric=metric or task.metric, reflection_lm=make_reflection_lm(), max_metric_calls=budget,
                    num_threads=4, track_stats=True, verbose=False)
    return opt.compile(program, trainset=splits.train, valset=splits.val)


class _Recorder:
    """Each request a fake LM's engine received, and whether it came through the sync or the async engine."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, list[dict[str, str]]]] = []
        self._lock = threading.Lock()

    def sync(self, request) -> None:
        with self._lock:
            self.requests.append(("sync", request_messages(request)))

    async def aio(self, request) -> None:
        with self._lock:
            self.requests.append(("async", request_messages(request)))

    def paths(self) -> set[str]:
        return {path for path, _ in self.requests}

    def system_prompts(self) -> list[str]:
        return [msgs[0]["content"] for _, msgs in self.requests]


def _recorded_lm(name: str | None = None, **lm_kwargs) -> tuple[dspy.LM, _Recorder]:
    rec = _Recorder()
    if name is None:
        return make_student_lm(before_call=rec.sync, async_before_call=rec.aio, **lm_kwargs), rec
    engine = SimEngine("student", model_name=name, before_call=rec.sync)
    lm_kwargs.setdefault("cache", False)
    return dspy.LM(f"sim/{name}", engine=engine, async_engine=AsyncSimEngine(engine, before_call=rec.aio),
                   **lm_kwargs), rec


class _Counting(BaseCallback):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _add(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def on_module_start(self, call_id, instance, inputs):
        self._add(f"module:{type(instance).__name__}")

    def on_lm_start(self, call_id, instance, inputs):
        self._add(f"lm:{instance.model}")

    def on_adapter_format_start(self, call_id, instance, inputs):
        self._add(f"format:{type(instance).__name__}")


# ----------------------------------------------------------------------------------------------- adapter
@SYNC_ASYNC
@pytest.mark.parametrize("how", ["configure", "context"])
def test_a_configured_adapter_formats_every_rollout_on_both_execution_paths(async_forward, how):
    """``dspy.configure(adapter=JSONAdapter())`` and ``dspy.context(adapter=...)`` around compile reach the
    worker-thread rollouts of a sync program and the event-loop rollouts of one with ``aforward``."""
    lm, rec = _recorded_lm()
    program = ROUTING.make_program(async_forward=async_forward)
    if how == "configure":
        dspy.configure(lm=lm, adapter=dspy.JSONAdapter())
        _compile(program)
    else:
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            _compile(program)
    prompts = rec.system_prompts()
    assert len(prompts) == sim_engine(lm).calls > 4
    assert all(JSON_MARK in p for p in prompts)
    assert rec.paths() == {"async" if async_forward else "sync"}


def test_a_context_adapter_overrides_the_configured_one_for_rollouts():
    lm, rec = _recorded_lm()
    dspy.configure(lm=lm, adapter=dspy.ChatAdapter())
    with dspy.context(adapter=dspy.JSONAdapter()):
        _compile(ROUTING.make_program())
    assert rec.system_prompts() and all(JSON_MARK in p for p in rec.system_prompts())


# --------------------------------------------------------------------------------------------- callbacks
@SYNC_ASYNC
@pytest.mark.parametrize("how", ["configure", "context"])
def test_settings_callbacks_fire_for_every_rollout(async_forward, how):
    """A ``BaseCallback`` in ``dspy.settings.callbacks`` (global or from ``dspy.context``) sees each
    rollout's module, adapter and LM calls, as in dspy.GEPA's ``dspy.Evaluate`` worker threads."""
    lm = make_student_lm()
    cb = _Counting()
    program = ROUTING.make_program(async_forward=async_forward)
    if how == "configure":
        dspy.configure(lm=lm, callbacks=[cb])
        _compile(program)
    else:
        with dspy.context(lm=lm, callbacks=[cb]):
            _compile(program)
    calls = sim_engine(lm).calls
    assert calls > 4
    assert cb.counts[f"module:{type(program).__name__}"] == calls  # one program call per student LM call
    assert cb.counts["lm:sim/sim-student"] == calls
    assert cb.counts["format:ChatAdapter"] >= calls


def test_lm_callbacks_fire_on_the_users_callback_object_for_context_and_per_predictor_lms():
    """Callbacks given to ``dspy.LM(callbacks=[...])`` fire for rollouts on the user's own callback object
    (our ``lm.copy()`` copies the list, not its items). dspy.GEPA deep-copies a per-predictor LM with the
    student, callbacks included, so there the user's object never hears of those calls."""
    ctx_cb, pred_cb = _Counting(), _Counting()
    ctx_lm, _ = _recorded_lm("ctx", callbacks=[ctx_cb])
    pred_lm, _ = _recorded_lm("per", callbacks=[pred_cb])
    program = PIPELINE.make_program()
    program.render.lm = pred_lm
    with dspy.context(lm=ctx_lm):
        _compile(program, task=PIPELINE, budget=30)
    assert ctx_cb.counts["lm:sim/ctx"] == sim_engine(ctx_lm).calls > 4
    assert pred_cb.counts["lm:sim/per"] == sim_engine(pred_lm).calls > 4
    assert "lm:sim/per" not in ctx_cb.counts and "lm:sim/ctx" not in pred_cb.counts


@SYNC_ASYNC
def test_callbacks_given_to_the_students_modules_are_dropped_as_dspy_gepa_drops_them(async_forward):
    """``dspy.Predict(sig, callbacks=[...])`` / ``module.callbacks``: dspy's ``Module.deepcopy`` drops
    them (``__getstate__`` pops ``callbacks``), and dspy.GEPA's ``build_program`` and returned program are
    ``student.deepcopy()`` as ours are: neither the rollouts nor the optimized program fire them. Pinned so
    a change here is deliberate (a user who wants them must set them on the returned program)."""
    lm = make_student_lm()
    program = ROUTING.make_program(async_forward=async_forward)
    prog_cb, pred_cb = _Counting(), _Counting()
    program.callbacks = [prog_cb]
    program.route.callbacks = [pred_cb]
    assert program.deepcopy().callbacks == [] and program.deepcopy().route.callbacks == []  # dspy's own rule
    with dspy.context(lm=lm):
        optimized = _compile(program)
    assert sim_engine(lm).calls > 4
    assert prog_cb.counts == {} and pred_cb.counts == {}
    assert optimized.callbacks == [] and optimized.route.callbacks == []
    assert program.callbacks == [prog_cb] and program.route.callbacks == [pred_cb]  # the student untouched


# ------------------------------------------------------------------------------ per-predictor LMs, usage
def _stage(system_prompt: str) -> str:
    outputs = system_prompt.split("Your output fields are")[1].split("All interactions")[0]
    return "extract" if "`record`" in outputs else "render"


@SYNC_ASYNC
def test_a_per_predictor_lm_answers_its_predictor_and_the_context_lm_the_rest(async_forward):
    """``program.render.lm = per_lm`` beside a context LM: every rollout's render call goes to per_lm,
    every extract call to the context LM; the user's LMs' ``history`` sees them; the optimized program
    keeps its per-predictor LM (a plain ``dspy.LM`` with the user's settings, not our retry-less copy) and
    still routes each predictor's calls the same way."""
    ctx_lm, ctx_rec = _recorded_lm("ctx")
    per_lm, per_rec = _recorded_lm("per", num_retries=7)
    program = PIPELINE.make_program(async_forward=async_forward)
    program.render.lm = per_lm
    with dspy.context(lm=ctx_lm):
        optimized = _compile(program, task=PIPELINE, budget=30)
    assert Counter(map(_stage, ctx_rec.system_prompts())).keys() == {"extract"}
    assert Counter(map(_stage, per_rec.system_prompts())).keys() == {"render"}
    assert len(ctx_lm.history) == sim_engine(ctx_lm).calls > 4
    assert len(per_lm.history) == sim_engine(per_lm).calls > 4
    assert ctx_rec.paths() == per_rec.paths() == {"async" if async_forward else "sync"}

    assert program.render.lm is per_lm and program.extract.lm is None
    assert optimized.extract.lm is None
    assert type(optimized.render.lm) is dspy.LM
    assert optimized.render.lm.model == "sim/per" and optimized.render.lm.num_retries == 7
    for candidate in optimized.detailed_results.candidates:
        assert type(candidate.render.lm) is dspy.LM and candidate.render.lm.num_retries == 7
    ctx_rec.requests.clear()
    per_rec.requests.clear()
    with dspy.context(lm=ctx_lm):
        optimized(message=_splits(PIPELINE).val[0].message)
    assert list(map(_stage, ctx_rec.system_prompts())) == ["extract"]
    assert list(map(_stage, per_rec.system_prompts())) == ["render"]


@SYNC_ASYNC
def test_set_lm_on_the_student_wins_over_the_global_lm_and_stays_one_shared_lm(async_forward):
    """``student.set_lm(lm)`` (every predictor) beats ``dspy.configure(lm=other)`` in every rollout, as in
    dspy; the optimized program's predictors still share one LM (``get_lm()`` works, which
    ``dspy.BestOfN`` / ``dspy.Refine`` rely on)."""
    global_lm, global_rec = _recorded_lm("global")
    per_lm, per_rec = _recorded_lm("per")
    dspy.configure(lm=global_lm)
    program = PIPELINE.make_program(async_forward=async_forward)
    program.set_lm(per_lm)
    optimized = _compile(program, task=PIPELINE, budget=30)
    assert global_rec.requests == []
    assert Counter(map(_stage, per_rec.system_prompts())).keys() == {"extract", "render"}
    shared = optimized.get_lm()
    assert type(shared) is dspy.LM and shared.model == "sim/per"
    assert optimized.extract.lm is optimized.render.lm is shared


def test_a_context_lm_around_compile_overrides_the_globally_configured_one():
    global_lm, global_rec = _recorded_lm("global")
    ctx_lm, ctx_rec = _recorded_lm("ctx")
    dspy.configure(lm=global_lm)
    with dspy.context(lm=ctx_lm):
        _compile(ROUTING.make_program())
    assert global_rec.requests == []
    assert len(ctx_rec.requests) > 4


@SYNC_ASYNC
def test_track_usage_attaches_the_rollouts_usage_to_the_prediction_the_metric_scores(async_forward):
    """With ``dspy.configure(track_usage=True)``, dspy's ``Module.__call__`` attaches usage to the program's
    prediction (dspy.GEPA's ``Evaluate`` runs it so); our rollout tracker suppresses that, and the evaluator
    attaches it instead: per LM model, both LMs of a two-LM program."""
    usages = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is None:
            usages.append(pred.get_lm_usage())
        return PIPELINE.metric(gold, pred, trace, pred_name, pred_trace)

    ctx_lm, _ = _recorded_lm("ctx")
    per_lm, _ = _recorded_lm("per")
    program = PIPELINE.make_program(async_forward=async_forward)
    program.render.lm = per_lm
    dspy.configure(track_usage=True)
    with dspy.context(lm=ctx_lm):
        _compile(program, task=PIPELINE, metric=metric, budget=30)
    assert len(usages) > 4
    for usage in usages:
        assert set(usage) == {"sim/ctx", "sim/per"}
        assert all(u["prompt_tokens"] > 0 and u["completion_tokens"] > 0 for u in usage.values())


class _JudgedMetric:
    """The routing metric, after asking an LLM judge (a dspy program with its own LM) about the example;
    records whether the judge's prediction carries usage, per call kind (scoring / feedback)."""

    def __init__(self) -> None:
        self.judge = ROUTING.make_program()
        self.judge.set_lm(make_student_lm(seed=1))
        self.seen: Counter[tuple[str, bool]] = Counter()
        #: ticket -> the usage on the judge's prediction (the judge's prompt depends on the ticket only)
        self.usage: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        verdict = self.judge(ticket=gold.ticket)
        usage = verdict.get_lm_usage()
        with self._lock:
            self.seen[("feedback" if pred_name else "score", usage is not None)] += 1
            if usage is not None:
                self.usage[gold.ticket] = usage
        return ROUTING.metric(gold, pred, trace, pred_name, pred_trace)


def test_reference_dspy_evaluate_gives_a_metric_judges_prediction_its_usage():
    """What dspy.GEPA's evaluations (``dspy.Evaluate`` / ``bootstrap_trace_data``, worker threads with no
    usage tracker) give a metric that calls a dspy module under ``track_usage=True``: its usage."""
    metric = _JudgedMetric()
    dspy.configure(track_usage=True)
    with dspy.context(lm=make_student_lm()):
        dspy.Evaluate(devset=_splits(ROUTING).val, metric=metric, num_threads=2, display_progress=False)(
            ROUTING.make_program())
    assert metric.seen == {("score", True): 4}


@SYNC_ASYNC
def test_track_usage_a_metric_judges_prediction_gets_its_usage_as_under_dspy_gepa(async_forward):
    """Under ``dspy.configure(track_usage=True)`` a metric that calls a dspy module (an LLM judge) gets
    ``judge_pred.get_lm_usage()`` under dspy.GEPA (see the reference test above), and the same figures
    here, on every scoring and feedback (``pred_name``) call: the judge's own call only, not the
    rollout's student calls made before the metric ran. It was None here (found by this file's review):
    our per-rollout tracker is active while the metric runs, so DSPy never attaches usage itself."""
    reference = _JudgedMetric()
    dspy.configure(track_usage=True)
    with dspy.context(lm=make_student_lm()):
        dspy.Evaluate(devset=_splits(ROUTING).val, metric=reference, num_threads=2, display_progress=False)(
            ROUTING.make_program())
        metric = _JudgedMetric()
        _compile(ROUTING.make_program(async_forward=async_forward), metric=metric)
    assert metric.seen[("score", True)] > 4 and metric.seen[("feedback", True)] > 0
    assert metric.seen[("score", False)] == 0
    assert metric.seen[("feedback", False)] == 0
    assert reference.usage and set(reference.usage) <= set(metric.usage)
    assert {t: metric.usage[t] for t in reference.usage} == reference.usage


# ---------------------------------------------------------------------------------- threads, contexts
def _in_a_thread(work):
    """``work()`` run on a new thread (not dspy's configuration owner); its result, or its error raised."""
    box = {}

    def run():
        try:
            box["result"] = work()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert "error" not in box, box.get("error")
    return box["result"]


@SYNC_ASYNC
def test_compile_from_another_thread_uses_the_main_threads_configuration(async_forward):
    """dspy lets only the owner thread call ``dspy.configure``; compile never calls it, so a compile run
    from a worker thread (a web server's, a notebook's background job) works with the main thread's
    LM and adapter."""
    lm, rec = _recorded_lm()
    dspy.configure(lm=lm, adapter=dspy.JSONAdapter())
    program = _in_a_thread(lambda: _compile(ROUTING.make_program(async_forward=async_forward)))
    scores = program.detailed_results.val_aggregate_scores
    assert max(scores) > scores[0]
    assert len(rec.requests) > 4 and all(JSON_MARK in p for p in rec.system_prompts())


def test_compile_in_a_thread_with_only_that_threads_context_lm_and_adapter():
    """No global LM: a ``dspy.context(lm=..., adapter=...)`` opened in the compiling thread reaches its
    rollouts (sync and async programs, one after the other in that thread)."""
    lm, rec = _recorded_lm()

    def work():
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            return _compile(ROUTING.make_program()), _compile(ROUTING.make_program(async_forward=True))

    _in_a_thread(work)
    assert dspy.settings.lm is None
    assert rec.paths() == {"sync", "async"}
    assert all(JSON_MARK in p for p in rec.system_prompts())


def test_compile_called_inside_a_coroutine_keeps_the_coroutines_context():
    """compile() from ``async def`` code (FastAPI, Jupyter) inside ``dspy.context(lm=..., callbacks=...)``:
    the private loop's thread starts in a copy of that context, so the rollouts see both."""
    lm, rec = _recorded_lm()
    cb = _Counting()

    async def main():
        with dspy.context(lm=lm, callbacks=[cb]):
            return _compile(ROUTING.make_program(async_forward=True))

    optimized = asyncio.run(main())
    assert optimized.detailed_results.val_aggregate_scores
    assert rec.paths() == {"async"}
    assert cb.counts["lm:sim/sim-student"] == len(rec.requests) > 4


def test_two_concurrent_compiles_keep_their_own_context_lm_and_adapter():
    """Two compiles at once in two threads (a server optimizing two programs), each inside its own
    ``dspy.context(lm=..., adapter=...)``: no rollout of one reaches the other's LM or adapter."""
    a_lm, a_rec = _recorded_lm("a")
    b_lm, b_rec = _recorded_lm("b")
    splits = _splits(ROUTING, n_train=10, n_val=8)
    barrier = threading.Barrier(2)
    box = {}

    def work(name, lm, adapter, async_forward):
        try:
            with dspy.context(lm=lm, adapter=adapter):
                barrier.wait(timeout=30)
                box[name] = _compile(ROUTING.make_program(async_forward=async_forward), budget=60, splits=splits)
        except BaseException as exc:
            box[name] = exc

    threads = [threading.Thread(target=work, args=("a", a_lm, dspy.JSONAdapter(), False)),
               threading.Thread(target=work, args=("b", b_lm, dspy.ChatAdapter(), True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(isinstance(box.get(k), dspy.Module) for k in "ab"), box
    assert len(a_rec.requests) >= 8 and len(b_rec.requests) >= 8
    assert a_rec.paths() == {"sync"} and all(JSON_MARK in p for p in a_rec.system_prompts())
    assert b_rec.paths() == {"async"} and not any(JSON_MARK in p for p in b_rec.system_prompts())


@SYNC_ASYNC
def test_an_outer_track_usage_around_compile_receives_every_rollouts_tokens(async_forward):
    """``with dspy.track_usage() as t: compile(...)``: our per-rollout trackers are nested in the user's and
    roll up into it, so it counts every student and reflection token (dspy.GEPA's ``dspy.Evaluate``
    workers deep-copy the tracker and lose the rollouts')."""
    lm = make_student_lm()
    with dspy.track_usage() as outer, dspy.context(lm=lm):
        _compile(ROUTING.make_program(async_forward=async_forward))
    totals = outer.get_total_tokens()
    stats = sim_engine(lm).stats()
    assert stats["calls"] > 4
    assert totals["sim/sim-student"]["prompt_tokens"] == stats["prompt_tokens"]
    assert totals["sim/sim-student"]["completion_tokens"] == stats["completion_tokens"]
    assert totals["sim/sim-reflector"]["prompt_tokens"] > 0


@pytest.mark.parametrize("track", [False, True], ids=["untracked", "track_usage"])
def test_a_metric_judges_tokens_count_toward_the_rollout_with_or_without_track_usage(track):
    """The judge's usage is attached to its prediction under ``track_usage=True`` (the test above) and
    still counted in the rollout's tokens, which ``token_budget`` and ``cost_budget_usd`` read: the
    judge's engine and the student's together, exactly, either way."""
    from test_usage import run_all

    from helpers import make_evaluator

    metric = _JudgedMetric()
    student = make_student_lm()
    dspy.configure(track_usage=track)
    ev, codec = make_evaluator(ROUTING, ROUTING.make_program(), n=6, metric=metric)
    before = [sim_engine(lm).stats()["prompt_tokens"] for lm in (student, metric.judge.get_lm())]
    outcomes = run_all(ev, codec, student, range(6))
    ev.close()
    after = [sim_engine(lm).stats()["prompt_tokens"] for lm in (student, metric.judge.get_lm())]
    assert all(o.failure is None for o in outcomes)
    assert after[1] - before[1] > 0
    assert sum(o.prompt_tokens for o in outcomes) == (after[0] - before[0]) + (after[1] - before[1])
    assert metric.seen == {("score", track): 6}


@pytest.mark.parametrize("how", ["dspy.Parallel", "threads with copy_context"])
def test_judges_the_metric_runs_in_threads_each_get_their_own_usage(how):
    """Found by a review of the fix above: the outermost judge call was decided per metric call, not per
    thread, and its usage read from the rollout's tracker: two judges at once got ``{}`` / None, or one of
    them both judges' tokens. Each now gets exactly its own call's usage (as alone with no tracker), and
    the rollout still counts both."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from dspy_turbogepa.adapter.lm_copies import judge_usage_attached, rollout_usage

    dspy.configure(track_usage=True)
    ticket = _splits(ROUTING).val[0].ticket

    def judge():  # each call takes a while, so the two judges' calls overlap
        program = ROUTING.make_program()
        program.set_lm(make_student_lm(seed=1, before_call=lambda request: time.sleep(0.05)))
        return program

    alone = judge()(ticket=ticket).get_lm_usage()
    with rollout_usage() as box, judge_usage_attached():
        if how == "dspy.Parallel":
            example = dspy.Example(ticket=ticket).with_inputs("ticket")
            outs = dspy.Parallel(num_threads=2, disable_progress_bar=True)([(judge(), example), (judge(), example)])
        else:
            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(contextvars.copy_context().run, j, ticket=ticket) for j in (judge(), judge())]
                outs = [f.result() for f in futures]
    assert alone and [o.get_lm_usage() for o in outs] == [alone, alone]
    if how != "dspy.Parallel":  # dspy.Parallel's workers count into copies of the tracker (DSPy's own way)
        (model,) = alone
        assert box.prompt_tokens == 2 * alone[model]["prompt_tokens"]
