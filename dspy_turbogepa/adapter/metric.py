"""Calling the user's GEPA-protocol metric and reading what it returns.

dspy.GEPA accepts a float/int/bool or a ``dspy.Prediction(score=..., feedback=...)``. We accept the
same, and also make explicit what dspy.GEPA leaves to chance: a ``None``, NaN, infinite or non-numeric
score is not silently summed but recorded as ``metric_invalid`` and scored ``failure_score``.
"""

from __future__ import annotations

import array
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import dspy

from dspy_turbogepa.engine.errors import USER_CODE_ERRORS
from dspy_turbogepa.redaction import describe_error, mask_text


def check_metric_signature(metric: Callable[..., Any]) -> None:
    """Same check and exception type as dspy.GEPA, with a message that shows the fix; stricter where a
    metric can never work, so that it fails here and not after the seed's LM calls: a ``dspy.Module``
    judge is checked through its ``forward`` (``dspy.Module.__call__`` takes anything), unless its class
    defines its own ``__call__``, and an ``async def``
    metric is refused (GEPA calls the metric synchronously, from worker threads; it would return an
    un-awaited coroutine)."""
    if not callable(metric):
        raise TypeError(f"metric must be callable, got {type(metric).__name__}.")
    target: Any = metric
    if isinstance(metric, dspy.Module) and _calls_forward(type(metric)):
        forward = _judge_forward(metric)
        if callable(forward):
            target = forward
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(type(target), "__call__", None)):
        raise TypeError(
            "metric is an async function (`async def`); GEPA calls the metric synchronously, from worker "
            "threads. Define it with `def` (a judge program can call its predictors synchronously)."
        )
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check up front
    try:
        sig.bind(None, None, None, None, None)
    except TypeError as e:
        if _own_signature_takes_five(target):
            return
        name = (getattr(target, "__qualname__", None) or getattr(metric, "__name__", None)
                or f"{type(target).__qualname__}.__call__")  # a callable object
        raise TypeError(
            "GEPA metric must accept five arguments: (gold, pred, trace, pred_name, pred_trace). "
            f"Your metric's signature is {name}{sig}. "
            "Define it as `def metric(gold, pred, trace=None, pred_name=None, pred_trace=None)`"
            + (" (for a dspy.Module judge: its `forward`)." if target is not metric else ".")
        ) from e


def _own_signature_takes_five(target: Any) -> bool:
    """A ``functools.wraps`` decorator that adapts a two-argument scorer to GEPA's five names them in its
    own signature, while ``inspect.signature`` reports the wrapped scorer's (dspy.GEPA refuses such a
    metric). A wrapper taking ``*args`` / ``**kwargs`` says nothing of its own: the wrapped one decides."""
    try:
        own = inspect.signature(target, follow_wrapped=False)
        own.bind(None, None, None, None, None)
    except (TypeError, ValueError):
        return False
    return not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in own.parameters.values())


def _calls_forward(cls: type) -> bool:
    """Whether calling the judge runs ``dspy.Module.__call__`` (which hands everything to ``forward``):
    a judge class that defines its own ``__call__``, e.g. to adapt a two-argument ``forward`` to GEPA's
    five, is called through that, so that is the signature to check."""
    return inspect.getattr_static(cls, "__call__", None) is inspect.getattr_static(dspy.Module, "__call__")


def _judge_forward(judge: dspy.Module) -> Any:
    """The judge's ``forward``, read past ``dspy.Module.__getattribute__``: that logs "calling
    module.forward(...) directly is discouraged" on every read outside ``__call__``, and we only read
    its signature. An instance attribute comes as it is, a class attribute bound as Python would."""
    cls = type(judge)
    if cls.__getattribute__ is not dspy.Module.__getattribute__:
        return getattr(judge, "forward", None)  # the class decides what its attributes are
    own = getattr(judge, "__dict__", {})
    if "forward" in own:
        return own["forward"]
    raw = inspect.getattr_static(cls, "forward", _ABSENT)
    if raw is _ABSENT:
        return getattr(judge, "forward", None)  # through the class's __getattr__, if it has one
    bind = getattr(type(raw), "__get__", None)
    return bind(raw, judge, cls) if bind is not None else raw


_ABSENT = object()


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


def _keys(ret: Any) -> list[str]:
    """The keys of a structured metric return (a message names the first few)."""
    try:
        return sorted(str(k) for k in ret.keys())  # noqa: SIM118 - keys() is what marks it structured
    except Exception:  # noqa: BLE001 - an odd mapping: the message names no keys, the score is still failed
        return []


#: Text, which float() reads ("0.9", b"0.9", any buffer of those bytes) but which is no score: a judge's
#: answer not parsed, refused alike
TEXT_TYPES = (str, bytes, bytearray, memoryview, array.array)


def _objectives(obj: Mapping[Any, Any]) -> tuple[dict[str, float] | None, str | None]:
    """Objective scores as floats, or why one is unusable (checked like the main score, so a bad
    objective is recorded as ``metric_invalid`` instead of raising in the evaluation thread)."""
    out: dict[str, float] = {}
    for k, v in obj.items():
        if v is None or isinstance(v, TEXT_TYPES):
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
    """Turn a metric's return value into (score, feedback, objective scores).

    Never raises: what it reads is the user's object (a tensor whose ``float()`` raises, a mapping whose
    ``keys()`` does), and an error here came from the user's side of the call, so it is that
    evaluation's ``metric_invalid``, recorded and scored like any other, not the end of the run."""
    try:
        return _read(ret, failure_score)
    except USER_CODE_ERRORS as exc:
        return MetricReading(failure_score, None, None,
                             invalid=f"the metric's return value could not be read: {describe_error(exc)}")


def _read(ret: Any, failure_score: float) -> MetricReading:
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
    if raw is None and is_structured and "score" not in (keys := _keys(ret)):  # every key: a 9th may be it
        return MetricReading(
            failure_score, feedback, objectives,
            invalid=f"the metric returned a {type(ret).__name__} without a 'score' (its keys: {keys[:8]}); return "
                    f"dspy.Prediction(score=..., feedback=...) or a number")
    if raw is None:
        return MetricReading(failure_score, feedback, objectives, invalid="the metric returned no score (None)")
    if isinstance(raw, bool):
        return MetricReading(float(raw), feedback, objectives)
    if isinstance(raw, TEXT_TYPES):
        # a judge's text may quote anything, a key included: masked whole, then cut (cut first, a key
        # across the cut kept its head unmasked)
        shown = mask_text(repr(raw))
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        return MetricReading(failure_score, feedback, objectives, invalid=f"the metric returned a string score {shown}")
    try:
        score = float(raw)
    except OverflowError:
        return MetricReading(failure_score, feedback, objectives,
                             invalid=f"the metric returned a {type(raw).__name__} score too large for a float")
    except (TypeError, ValueError):
        return MetricReading(
            failure_score, feedback, objectives,
            invalid=f"the metric returned a non-numeric score of type {type(raw).__name__}"
        )
    except USER_CODE_ERRORS as exc:  # the score's own __float__ (a tensor's, say) failed: its feedback still reads
        return MetricReading(failure_score, feedback, objectives,
                             invalid=f"float() of the metric's {type(raw).__name__} score raised {describe_error(exc)}")
    if not math.isfinite(score):
        return MetricReading(
            failure_score, feedback, objectives, invalid=f"the metric returned a non-finite score {score}"
        )
    return MetricReading(score, feedback, objectives)


def default_feedback(score: float) -> str:
    """dspy.GEPA's fallback text, without its bug of printing a whole Prediction repr."""
    return f"This trajectory got a score of {score}."
