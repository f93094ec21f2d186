"""Calling the user's GEPA-protocol metric and reading what it returns.

dspy.GEPA accepts a float/int/bool or a ``dspy.Prediction(score=..., feedback=...)``. We accept the
same, and also make explicit what dspy.GEPA leaves to chance: a ``None``, NaN, infinite or non-numeric
score is not silently summed but recorded as ``metric_invalid`` and scored ``failure_score``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


def check_metric_signature(metric: Callable[..., Any]) -> None:
    """Same check and exception type as dspy.GEPA, with a message that shows the fix."""
    if not callable(metric):
        raise TypeError(f"metric must be callable, got {type(metric).__name__}.")
    try:
        sig = inspect.signature(metric)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check up front
    try:
        sig.bind(None, None, None, None, None)
    except TypeError as e:
        raise TypeError(
            "GEPA metric must accept five arguments: (gold, pred, trace, pred_name, pred_trace). "
            f"Your metric's signature is {metric.__name__ if hasattr(metric, '__name__') else 'metric'}{sig}. "
            "Define it as `def metric(gold, pred, trace=None, pred_name=None, pred_trace=None)`."
        ) from e


@dataclass(frozen=True)
class MetricReading:
    score: float
    feedback: str | None
    objective_scores: Mapping[str, float] | None
    #: Why the return value was unusable, if it was.
    invalid: str | None = None


def _field(ret: Any, name: str) -> Any:
    if isinstance(ret, Mapping):
        return ret.get(name)
    try:
        return ret[name]  # dspy.Prediction supports item access
    except (KeyError, TypeError, IndexError, AttributeError):
        return getattr(ret, name, None)


def _objectives(obj: Mapping[Any, Any]) -> tuple[dict[str, float] | None, str | None]:
    """Objective scores as floats, or why one is unusable (checked like the main score, so a bad
    objective is recorded as ``metric_invalid`` instead of raising in the evaluation thread)."""
    out: dict[str, float] = {}
    for k, v in obj.items():
        if v is None or isinstance(v, str):
            return None, f"the metric returned objective_scores[{k!r}] = {v!r}, not a number"
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            return None, f"the metric returned objective_scores[{k!r}] of type {type(v).__name__}, not a number"
        if not math.isfinite(f):
            return None, f"the metric returned a non-finite objective_scores[{k!r}] = {f}"
        out[str(k)] = f
    return out, None


def read_metric_return(ret: Any, failure_score: float) -> MetricReading:
    """Turn a metric's return value into (score, feedback, objective scores)."""
    feedback: str | None = None
    objectives: Mapping[str, float] | None = None
    raw: Any = ret
    is_structured = isinstance(ret, Mapping) or (
        hasattr(ret, "keys") and callable(ret.keys) and not isinstance(ret, str)
    )
    if is_structured:
        raw = _field(ret, "score")
        fb = _field(ret, "feedback")
        feedback = None if fb is None else str(fb)
        obj = _field(ret, "objective_scores")
        if isinstance(obj, Mapping) and obj:
            objectives, bad = _objectives(obj)
            if bad is not None:
                return MetricReading(failure_score, feedback, None, invalid=bad)
    if raw is None:
        return MetricReading(failure_score, feedback, objectives, invalid="the metric returned no score (None)")
    if isinstance(raw, bool):
        return MetricReading(float(raw), feedback, objectives)
    if isinstance(raw, str):
        return MetricReading(failure_score, feedback, objectives, invalid=f"the metric returned a string score {raw!r}")
    try:
        score = float(raw)
    except (TypeError, ValueError, OverflowError):
        return MetricReading(
            failure_score, feedback, objectives,
            invalid=f"the metric returned a non-numeric score of type {type(raw).__name__}"
        )
    if not math.isfinite(score):
        return MetricReading(
            failure_score, feedback, objectives, invalid=f"the metric returned a non-finite score {score}"
        )
    return MetricReading(score, feedback, objectives)


def default_feedback(score: float) -> str:
    """dspy.GEPA's fallback text, without its bug of printing a whole Prediction repr."""
    return f"This trajectory got a score of {score}."
