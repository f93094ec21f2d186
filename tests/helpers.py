"""Small helpers shared by the DSPy-level tests."""

from __future__ import annotations

import contextlib

import dspy


def small_splits(task, n_train: int = 30, n_val: int = 16, n_test: int = 60, data_seed: int = 0):
    return task.splits(data_seed=data_seed, n_train=n_train, n_val=n_val, n_test=n_test)


def make_evaluator(task, program=None, *, n: int = 4, metric=None, failure_score: float = 0.0,
                   max_workers: int = 8, **kw):
    """A ``DspyEvaluator`` over ``n`` of the task's examples (the same rows as train and val), and its
    codec: the adapter's evaluation path without an engine around it."""
    from dspy_turbogepa.adapter.evaluator import DspyEvaluator
    from dspy_turbogepa.adapter.program import ProgramCodec

    codec = ProgramCodec(program if program is not None else task.make_program())
    examples = small_splits(task, n_train=n, n_val=n, n_test=0).val
    ev = DspyEvaluator(codec, {"train": examples, "val": examples}, metric or task.metric, failure_score,
                       max_workers=max_workers, **kw)
    return ev, codec


def seed_trajectory(task, program=None):
    """The seed program's traced trajectory on the first training example (the evaluator's own path,
    on the fake student LM), and the codec to rebuild it with."""
    import asyncio

    from dspy_turbogepa.testing import make_student_lm

    ev, codec = make_evaluator(task, program, max_workers=2)

    async def main():
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            return await ev.evaluate(codec.seed_texts(), "seed", "train", 0, True)

    try:
        return asyncio.run(main()).trajectory, codec
    finally:
        ev.close()


@contextlib.contextmanager
def no_logging_configured(monkeypatch):
    """A process that configured no logging (pytest's capture handler on the root logger is one): no
    root or package handler, the root at WARNING. Levels set through setLevel, which clears the loggers'
    cached thresholds, and put back the same way."""
    import logging

    package = logging.getLogger("dspy_turbogepa")
    monkeypatch.setattr(logging.root, "handlers", [])
    monkeypatch.setattr(package, "handlers", [])
    levels = {logging.root: logging.root.level, package: package.level}
    logging.root.setLevel(logging.WARNING)
    package.setLevel(logging.NOTSET)
    try:
        yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)


class CountingMetric:
    """Wraps a GEPA metric and counts scoring calls (no pred_name) and feedback calls separately."""

    def __init__(self, metric):
        self.metric = metric
        self.scoring = 0
        self.feedback = 0

    def __call__(self, gold, pred, trace=None, pred_name=None, pred_trace=None):
        if pred_name is None:
            self.scoring += 1
        else:
            self.feedback += 1
        return self.metric(gold, pred, trace, pred_name, pred_trace)


class FailsOnTracking(dspy.Module):
    """The routing program, raising ``error()`` on tickets about tracking (a downstream failure)."""

    def __init__(self, inner, error=lambda: RuntimeError("downstream CRM rejected the tracking ticket")):
        super().__init__()
        self.inner = inner
        self.error = error

    def forward(self, ticket):
        routed = self.inner(ticket=ticket)
        if "tracking" in ticket.lower():  # raised after the predictor answered: fed back to it
            raise self.error()
        return routed


class TwoParallelBranches(dspy.Module):
    """``inner`` run twice per example in ``dspy.Parallel`` branches (worker threads; a failed branch
    comes back as None), the first branch's answer returned."""

    def __init__(self, inner, max_errors: int | None = None):
        super().__init__()
        self.inner = inner
        self.par = dspy.Parallel(num_threads=2, max_errors=max_errors, disable_progress_bar=True)

    def forward(self, ticket):
        first, _ = self.par([(self.inner, {"ticket": ticket}), (self.inner, {"ticket": ticket + " "})])
        return first if first is not None else dspy.Prediction(queue="")


def quick_compile(metric=None, program=None, budget: int = 60, data=None, lm=None, task=None, **kw) -> dspy.Module:
    """A small compile on the fake LMs (track_stats on, quiet; routing, 12 train / 8 val by default): the
    setting the doc-claim reviews check most claims on."""
    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

    task = task or TASKS["routing"]
    data = data or small_splits(task, n_train=12, n_val=8, n_test=0)
    kw.setdefault("num_threads", 4)
    kw.setdefault("track_stats", True)
    kw.setdefault("verbose", False)
    if "instruction_proposer" not in kw:
        kw.setdefault("reflection_lm", make_reflection_lm())
    opt = TurboGEPA(metric or task.metric, max_metric_calls=budget, **kw)
    with dspy.context(lm=lm or make_student_lm()):
        return opt.compile(program or task.make_program(), trainset=data.train, valset=data.val)


def recording_proposer(sink: list, what=lambda records: records):
    """A gepa ProposalFn that records ``what(records)`` of each predictor's reflective dataset and appends a
    numbered sentence to each text (every child is new)."""
    def proposer(candidate, reflective_dataset, components_to_update):
        for c in components_to_update:
            sink.append(what(reflective_dataset[c]))
        return {c: candidate[c] + f" Variant {len(sink)}." for c in components_to_update}
    return proposer


class _AsyncOf:
    """The async side of a sync fake engine: awaits the same answer."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def complete(self, request):
        return self.engine.complete(request)


def engine_lm(engine, model: str = "fake/test") -> dspy.LM:
    """A ``dspy.LM`` (cache off) answered by ``engine``, an object with ``complete(request)``, whichever way
    DSPy calls it (sync, or async for an async program)."""
    return dspy.LM(model, engine=engine, async_engine=_AsyncOf(engine), cache=False)
