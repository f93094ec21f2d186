"""Hooks through which the run store, progress display and MLflow tracking watch the engine.

Observers are called on the engine's event loop thread, synchronously, so they must be quick; a
tracker that does I/O should hand work to its own thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dspy_turbogepa.engine.candidate import Candidate
    from dspy_turbogepa.engine.records import CandidateRecord, MutationResult
    from dspy_turbogepa.engine.types import EvalOutcome, ProposalOutcome, Split


class EngineObserver:
    """Base class with no-op hooks; subclasses override what they need."""

    def on_evaluation(self, candidate: Candidate, split: Split, outcome: EvalOutcome) -> None:
        """A program execution + metric call finished (never called for cache hits)."""

    def on_candidate(self, record: CandidateRecord) -> None:
        """A candidate earned a full-validation score and joined the pool."""

    def on_mutation(self, result: MutationResult, status: str) -> None:
        """A mutation was committed, whatever its outcome."""

    def on_proposal(self, key: str, proposal: ProposalOutcome) -> None:
        """A reflection finished (stored so a resumed run never pays for it again)."""
