"""Data that crosses the boundary between the engine and the layers that know about DSPy.

The engine only ever sees ids, scores and opaque payloads; the adapter decides what a trajectory is.
This is what lets a second evaluation backend (for example a distributed one) plug in unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Split = Literal["train", "val"]

#: Causes of a failed evaluation, counted in the run summary. ``None`` means the evaluation succeeded.
FailureKind = Literal[
    "program_error",  # the user's program raised (including LM errors after retries)
    "format_error",  # the LM answer could not be parsed into the signature's outputs
    "metric_error",  # the metric raised
    "metric_invalid",  # the metric returned None, NaN, inf or something that is not a number
    "rate_limited",  # the LM kept answering 429 past the evaluation layer's retry policy
]

#: One evaluation's identity: (candidate fingerprint, split, example id).
EvalKey = tuple[str, Split, int]


@dataclass(frozen=True)
class EvalOutcome:
    """The result of running one candidate on one example and scoring it (one metric call)."""

    example_id: int
    score: float
    objective_scores: Mapping[str, float] | None = None
    failure: FailureKind | None = None
    message: str | None = None
    #: What reflection needs (inputs, outputs, per-predictor trace); opaque to the engine.
    trajectory: Any = None
    #: The program's output, kept only when the caller asked for best outputs.
    output: Any = None
    #: Error type name, for messages and counters (e.g. "AuthenticationError").
    error_type: str | None = None
    #: The evaluator judged the failure systemic (bad key, unknown model, refused connection): no
    #: retry or other candidate can fix it, so the run stops at once. Deciding that needs to know
    #: the LM stack, which the engine does not.
    fatal: bool = False
    #: The failure is the LM service's (fatal, rate-limit / transient retries given up, or an answer the
    #: LM stack could not use): it says nothing about the candidate, so no reflection should read it.
    service_failure: bool = False
    #: LM usage of this rollout (all LM calls the program made), for token and dollar budgets.
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    #: LM calls the rollout made (all its attempts).
    lm_calls: int = 0
    #: Rate-limit retries this rollout needed before it finished (not failures, not extra metric calls).
    rate_limit_retries: int = 0
    #: A stored outcome (resume) whose trajectory could not be restored as the live run had it (the
    #: store masks credential-shaped text): its score stands, and a reflection that would read it runs
    #: the evaluation again first (``EvaluationCache.with_trace``).
    trace_lost: bool = False
    #: For a service failure: the endpoint whose service failed, when the evaluator knows it (an opaque
    #: key); the outage rule keeps one streak per endpoint.
    service_endpoint: str | None = None
    #: The endpoints that answered during this rollout, when the evaluator knows them (empty: unknown).
    #: An answer breaks only their outage streaks: a program routing some examples to a second endpoint
    #: that is down for good was never stopped while the first one answered the others.
    answered_by: frozenset[str] = frozenset()


#: The one skip decided before the proposer runs (no traced record to reflect on): it costs nothing.
#: Every other proposal may have paid for calls the engine cannot see (a custom proposer calling its
#: vendor's SDK directly), so it counts as paid wherever repeated no-ops are bounded.
NOTHING_TO_REFLECT_ON = "no_reflective_data"


@dataclass(frozen=True)
class ProposalOutcome:
    """What a proposer returned for one mutation: new texts, or the reason there are none."""

    texts: Mapping[str, str] = field(default_factory=dict)
    #: Why no usable texts came back ("proposer_error", "empty_proposal", "no_reflective_data", ...).
    skipped: str | None = None
    message: str | None = None
    #: The proposer failed in a way no retry fixes (the reflection LM's key, model or endpoint): the
    #: run stops at once, as for a fatal evaluation. ``error_type`` names the error.
    fatal: bool = False
    error_type: str | None = None
    #: Fatal because the reflection LM's rate limit asks for a wait past the retry policy (a used-up quota).
    rate_limited: bool = False
    #: The reflection LM's service failed: its 429s or transient errors outlasted the retry policy. A
    #: streak of these is an outage (the systemic rule), one alone a skipped proposal.
    service_failure: bool = False
    #: Nothing to reflect on because the program ran to the end, on every example read, without calling
    #: any of the components to improve, and no rollout of the run so far called them either (a forward
    #: that calls an LM itself, a predictor held but never called): the systemic rule stops a run whose
    #: first reflections all say so.
    not_run: bool = False
    reflection_calls: int = 0
    reflection_prompt_tokens: int = 0
    reflection_completion_tokens: int = 0
    reflection_cost: float = 0.0


@runtime_checkable
class Evaluator(Protocol):
    """Runs a candidate on one example. Implementations must be safe to call concurrently."""

    async def evaluate(
        self, texts: Mapping[str, str], fingerprint: str, split: Split, example_id: int, capture_traces: bool
    ) -> EvalOutcome: ...


@runtime_checkable
class Reflector(Protocol):
    """Turns a parent and its traced minibatch outcomes into new texts for some of its components.

    A reflector may also define ``stop() -> None``: the engine calls it once the run stops launching
    work, so a reflection waiting on something (a rate-limit backoff) can give up instead of running on
    after the run has returned."""

    async def reflect(
        self,
        parent_texts: Mapping[str, str],
        components: Sequence[str],
        outcomes: Sequence[EvalOutcome],
        seed: int,
    ) -> ProposalOutcome: ...
