"""Running a DSPy program on one example, with its trace, and scoring it with the user's metric.

Async programs (those defining ``aforward``) run as asyncio tasks through ``acall``; others run in our
own bounded thread pool. We deliberately avoid ``dspy.asyncify``: it funnels every call through a
process-wide limiter of ``async_max_workers`` (8 by default), which would silently cap ``num_threads``.
Each rollout gets its own ``dspy.context(trace=...)`` so concurrent traces never mix, and worker
threads run in a copy of the caller's context so a ``dspy.context(lm=...)`` set around ``compile()``
keeps working.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import dspy

from dspy_turbogepa.adapter.metric import read_metric_return
from dspy_turbogepa.adapter.program import ProgramCodec
from dspy_turbogepa.engine.types import EvalOutcome, FailureKind, Split

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 2000


@dataclass
class TraceStep:
    """One predictor call inside a rollout, matched to its predictor by name."""

    pred_name: str
    predictor: Any
    inputs: dict[str, Any]
    outputs: Any


@dataclass
class DspyTrajectory:
    """What reflection needs about one rollout."""

    example: dspy.Example
    prediction: Any
    steps: list[TraceStep] = field(default_factory=list)
    raw_trace: list[tuple[Any, dict[str, Any], Any]] = field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    failure: FailureKind | None = None
    raw_completion: str | None = None
    #: For a parse failure: the signature whose outputs could not be parsed.
    failed_signature: Any = None


def _error_types(exc: BaseException) -> list[str]:
    """Names of the exception and its causes: LM errors often arrive wrapped."""
    names: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        names.append(type(cur).__name__)
        cur = cur.__cause__ or cur.__context__
    return names


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + " ..."


class DspyEvaluator:
    """Implements the engine's ``Evaluator`` protocol for a DSPy program and GEPA-protocol metric."""

    def __init__(
        self,
        codec: ProgramCodec,
        datasets: Mapping[Split, Sequence[dspy.Example]],
        metric: Callable[..., Any],
        failure_score: float,
        max_workers: int,
        keep_outputs: bool = False,
        use_async: bool | None = None,
        fatal_error_types: frozenset[str] = frozenset(),
    ) -> None:
        self._codec = codec
        self._data = datasets
        self._metric = metric
        self._failure_score = failure_score
        self._keep_outputs = keep_outputs
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="turbogepa-eval")
        if use_async is None:
            use_async = callable(getattr(codec.student, "aforward", None))
        self.use_async = use_async
        self._fatal = fatal_error_types

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def evaluate(
        self, texts: Mapping[str, str], fingerprint: str, split: Split, example_id: int, capture_traces: bool
    ) -> EvalOutcome:
        example = self._data[split][example_id]
        program, names = self._codec.get(fingerprint, texts)
        loop = asyncio.get_running_loop()
        if self.use_async:
            pred, raw_trace, error = await self._run_async(program, example, capture_traces)
            ctx = contextvars.copy_context()
            return await loop.run_in_executor(
                self._pool, ctx.run, self._score, example, example_id, pred, raw_trace, error, names, split,
                capture_traces,
            )
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(
            self._pool, ctx.run, self._rollout_sync, program, names, example, example_id, split, capture_traces
        )

    async def _run_async(
        self, program: dspy.Module, example: dspy.Example, capture: bool
    ) -> tuple[Any, list[Any], BaseException | None]:
        with dspy.context(trace=[] if capture else None):
            try:
                pred = await program.acall(**example.inputs())
                error = None
            except Exception as exc:  # the user's program failed: scored failure_score below
                pred, error = None, exc
            trace = list(dspy.settings.trace or [])
        return pred, trace, error

    def _rollout_sync(
        self, program: dspy.Module, names: dict[int, str], example: dspy.Example, example_id: int, split: Split,
        capture: bool,
    ) -> EvalOutcome:
        with dspy.context(trace=[] if capture else None):
            try:
                pred = program(**example.inputs())
                error: BaseException | None = None
            except Exception as exc:  # the user's program failed: scored failure_score below
                pred, error = None, exc
            trace = list(dspy.settings.trace or [])
        return self._score(example, example_id, pred, trace, error, names, split, capture)

    def _score(
        self,
        example: dspy.Example,
        example_id: int,
        pred: Any,
        raw_trace: list[Any],
        error: BaseException | None,
        names: dict[int, str],
        split: Split,
        capture: bool,
    ) -> EvalOutcome:
        steps = [
            TraceStep(names.get(id(p), "?"), p, dict(inputs), outputs) for p, inputs, outputs in raw_trace
        ]
        if error is not None:
            types = _error_types(error)
            fatal = next((t for t in types if t in self._fatal), None)
            failure: FailureKind = "format_error" if "AdapterParseError" in types else "program_error"
            message = _describe(error)
            trajectory = DspyTrajectory(
                example, None, steps, raw_trace, message, fatal or types[0], failure,
                raw_completion=getattr(error, "lm_response", None),
                failed_signature=getattr(error, "signature", None),
            ) if capture else None
            return EvalOutcome(
                example_id, self._failure_score, failure=failure, message=message, trajectory=trajectory,
                error_type=fatal or types[0],
            )
        try:
            ret = self._metric(example, pred, None, None, None)
        except Exception as exc:  # the user's metric failed: recorded and scored failure_score
            message = f"The metric raised {_describe(exc)}"
            trajectory = DspyTrajectory(example, pred, steps, raw_trace, message, type(exc).__name__, "metric_error")
            return EvalOutcome(
                example_id, self._failure_score, failure="metric_error", message=message,
                trajectory=trajectory if capture else None, error_type=type(exc).__name__,
                output=pred if self._keep_outputs and split == "val" else None,
            )
        reading = read_metric_return(ret, self._failure_score)
        trajectory = DspyTrajectory(example, pred, steps, raw_trace) if capture else None
        if reading.invalid is not None:
            if trajectory is not None:
                trajectory.failure, trajectory.error = "metric_invalid", reading.invalid
            return EvalOutcome(
                example_id, self._failure_score, failure="metric_invalid", message=reading.invalid,
                trajectory=trajectory, output=pred if self._keep_outputs and split == "val" else None,
            )
        return EvalOutcome(
            example_id,
            reading.score,
            objective_scores=reading.objective_scores,
            trajectory=trajectory,
            output=pred if self._keep_outputs and split == "val" else None,
        )
