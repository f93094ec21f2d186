"""What one rollout leaves behind for reflection: each predictor call's inputs and outputs, the
prediction, and what went wrong. Its own module because the evaluator writes it, the reflective
dataset reads it and the run store keeps it as JSON, and none of them should import the others for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dspy

from dspy_turbogepa.engine.types import FailureKind

__all__ = ["DspyTrajectory", "TraceStep"]


@dataclass
class TraceStep:
    """One predictor call inside a rollout, matched to its predictor by name."""

    pred_name: str
    predictor: Any
    inputs: dict[str, Any]
    outputs: Any
    #: Which entry of the rollout's raw trace this step came from: one call matched to several
    #: predictors (by signature) is several steps but one trace entry, and a reload must rebuild it once.
    raw_index: int | None = None


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
    #: For a parse failure: the signature whose outputs could not be parsed, and the predictor it
    #: belongs to when exactly one has that signature (None: unknown, judged by its fields). For
    #: another error: the predictor it was raised inside (None: raised in the program's own code).
    failed_signature: Any = None
    failed_predictor: str | None = None
    #: The LM service failed (see ``EvalOutcome.service_failure``): nothing for reflection to learn.
    service_failure: bool = False
    #: What the metric returned when it scored this rollout (a float, or ``dspy.Prediction(score=...,
    #: feedback=...)``): a ``component_selector`` written for dspy.GEPA reads it as ``t["score"]``
    #: (``t["score"].feedback``). None when the metric did not score it (the program or the metric failed).
    metric_return: Any = None
