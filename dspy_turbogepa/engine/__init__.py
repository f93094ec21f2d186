"""The streaming ASHA/Pareto engine. Nothing in this package imports dspy."""

from dspy_turbogepa.engine.candidate import Candidate, fingerprint_texts
from dspy_turbogepa.engine.config import EngineConfig
from dspy_turbogepa.engine.errors import RunInterruptedError, SystemicFailureError
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.engine.orchestrator import Orchestrator
from dspy_turbogepa.engine.records import CandidateRecord, EngineResult, RunStats
from dspy_turbogepa.engine.types import EvalOutcome, Evaluator, ProposalOutcome, Reflector

__all__ = [
    "Candidate",
    "CandidateRecord",
    "EngineConfig",
    "EngineObserver",
    "EngineResult",
    "EvalOutcome",
    "Evaluator",
    "Orchestrator",
    "ProposalOutcome",
    "Reflector",
    "RunStats",
    "RunInterruptedError",
    "SystemicFailureError",
    "fingerprint_texts",
]
