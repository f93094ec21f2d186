"""Mutable run records kept beside the immutable candidates, and the engine's final result."""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from dspy_turbogepa.engine.candidate import Candidate, ProposalKind
from dspy_turbogepa.engine.types import EvalKey, EvalOutcome

MutationStatus = Literal[
    "accepted",  # passed every rung; joined the candidate pool with a full-validation score
    "rejected_rung0",  # did not beat its parent on the training minibatch (a merge: failed its screen)
    "pruned",  # dropped on a validation shard
    "duplicate",  # same texts as an existing candidate
    "no_proposal",  # the proposer returned nothing usable (recorded with its cause)
    "skipped_perfect",  # the parent was already perfect on the minibatch
    "cancelled",  # the run stopped before the mutation finished
    "budget_stopped",  # a token or dollar cap refused an LM call it needed (see errors.PaidCallRefused)
    "orphaned",  # chained on a child that passed rung 0 but then did not join the pool
    "after_stop",  # passed every rung after a stop callback returned True: not added (the state it saw is final)
]

StopReason = Literal[
    "max_metric_calls", "stop_file", "stop_callback", "interrupted", "no_progress_possible", "completed",
    "time_budget", "token_budget", "cost_budget",
]


def mean_in_id_order(scores: Mapping[int, float]) -> float:
    """The mean of per-validation-instance scores summed in id order, as the frontier (which picks the
    returned program) and gepa sum them: scores arrive in rung order, and a float sum in another order
    can differ in the last place, enough to make ``best_idx`` name another candidate than the one
    returned."""
    return sum(v for _, v in sorted(scores.items())) / max(1, len(scores))


@dataclass
class CandidateRecord:
    """A candidate that earned a full-validation score, in the order it was committed."""

    index: int
    candidate: Candidate
    parent_indices: list[int | None]
    val_scores: dict[int, float]
    val_objective_scores: dict[int, Mapping[str, float]] = field(default_factory=dict)
    val_outputs: dict[int, Any] = field(default_factory=dict)
    discovery_metric_calls: int = 0
    discovery_seconds: float = 0.0
    mutation_seq: int | None = None

    @functools.cached_property
    def aggregate(self) -> float:
        """Computed once: a record's scores never change after it is committed, and the merge search
        reads every common ancestor's aggregate on every plan (it sorted each record's scores hundreds
        of thousands of times in a long run)."""
        return mean_in_id_order(self.val_scores)

    @property
    def reported_discovery_calls(self) -> int:
        """Metric calls spent when it was found, as gepa reports them: 0 for the seed (found before the
        search spent anything; its own validation is the first spending), which every report of a run
        (``DspyGEPAResult``, the selector state, MLflow's table) must agree on."""
        return 0 if self.index == 0 else self.discovery_metric_calls


@dataclass
class MutationPlan:
    """Everything decided when a mutation is launched, from committed state only (reproducibility)."""

    seq: int
    kind: ProposalKind
    parent: Candidate
    parent_index: int
    parent_val: Mapping[int, float]
    minibatch: tuple[int, ...]
    rng: random.Random
    committed_at_launch: int
    reservation: int
    #: The commits the plan was made from (its planning view).
    view: int = 0
    components: list[str] = field(default_factory=list)
    child_counter: int = 0
    #: Round robin over several predictors: the turn is taken once the parent's minibatch is known not
    #: to be perfect (as gepa selects after its skip), in launch order; ``components`` is empty until then.
    turn_deferred: bool = False
    #: Merge only: the second parent, the merged texts and the validation ids it is screened on.
    other_parent_index: int | None = None
    other_parent_val: Mapping[int, float] | None = None
    child_texts: Mapping[str, str] | None = None
    screen_ids: tuple[int, ...] = ()
    #: Speculative chaining: if mutation ``chain_on``'s child survives rung 0, this mutation uses that
    #: child as its parent (``parent`` stays the fallback) and joins the pool only if the child does.
    chain_on: int | None = None
    chained: bool = False
    #: A chained mutation with deferred turns: the adopted child and its round-robin counter, whose turn
    #: it takes only after the perfect-minibatch skip (a skipped mutation uses no predictor's turn).
    chained_turn: tuple[str, int] | None = None
    #: Why a chained mutation's work is not kept (its parent did not join the pool, or joined it as a
    #: candidate the selection strategy would not pick); None while undecided or kept.
    orphan_reason: str | None = None
    #: Reflections drawn at once on this parent and minibatch; only the best child goes on (best-of-k).
    siblings: int = 1
    #: Training examples outside the minibatch that the parent already failed in committed
    #: evaluations: their traces join the reflection's feedback at no metric-call cost.
    feedback_ids: tuple[int, ...] = ()
    #: Scouting: training examples the parent is also evaluated on, in the same wave as its minibatch,
    #: so its reflection reads their failures; they are not part of the acceptance test.
    scout_ids: tuple[int, ...] = ()


@dataclass
class MutationResult:
    plan: MutationPlan
    status: MutationStatus
    child: Candidate | None = None
    val_outcomes: dict[int, EvalOutcome] = field(default_factory=dict)
    rung_reached: int = 0
    detail: str | None = None
    requested: set[EvalKey] = field(default_factory=set)
    #: (candidate fingerprint, training id, score) of the minibatch evaluations, for failure-first sampling.
    train_scores: list[tuple[str, int, float]] = field(default_factory=list)
    #: Children evaluated on the minibatch, and how many of them beat the parent there.
    children_tried: int = 0
    children_passed: int = 0
    #: Reflection LM calls its proposals made (stored ones included, so a resumed run stops where it did).
    reflection_calls: int = 0
    #: Proposals the proposer answered (texts, or a failure of its own), paid or not: all but
    #: NOTHING_TO_REFLECT_ON skips (stored ones included, as for reflection_calls).
    proposals_answered: int = 0
    #: Proposals (siblings included) made, and how many of them were replayed from an earlier session's
    #: run store: a resumed run's log says which reflections were not paid for again.
    proposals: int = 0
    proposals_from_store: int = 0


@dataclass(frozen=True)
class PriorUsage:
    """The LM usage earlier sessions of a run paid for (every stored evaluation and reflection, failed
    ones included). A resumed run's tokens and cost start from it, so ``run_stats`` and the token and
    dollar caps count the whole run; replaying a stored row adds nothing."""

    task_prompt_tokens: int = 0
    task_completion_tokens: int = 0
    task_cost: float = 0.0
    reflection_prompt_tokens: int = 0
    reflection_completion_tokens: int = 0
    reflection_cost: float = 0.0


@dataclass
class RunStats:
    mutations: Counter[str] = field(default_factory=Counter)
    mutations_by_kind: Counter[str] = field(default_factory=Counter)
    accepted_by_kind: Counter[str] = field(default_factory=Counter)
    survived_rung0_by_kind: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    proposal_skips: Counter[str] = field(default_factory=Counter)
    reflection_calls: int = 0
    proposals_replayed: int = 0
    #: Feedback reuse: traced failures from earlier evaluations that reflections read again.
    feedback_reused: int = 0
    #: The metric's feedback calls (pred_name set) made by this session's reflections (filled by the
    #: reflection layer): not counted in the budget, as in dspy.GEPA, but paid with an LLM-judge metric.
    feedback_calls: int = 0
    scouted: int = 0
    scout_failures_read: int = 0
    cache_hits: int = 0
    executed: int = 0
    #: Evaluations stored by an earlier session of the run (resume) that this session used.
    replayed: int = 0
    peak_evals_in_flight: int = 0
    peak_mutations_in_flight: int = 0
    reflection_prompt_tokens: int = 0
    reflection_completion_tokens: int = 0
    reflection_cost: float = 0.0
    task_prompt_tokens: int = 0
    task_completion_tokens: int = 0
    task_cost: float = 0.0
    #: LM calls the program (and an LLM-judge metric) made in executed evaluations, as DSPy's usage
    #: tracker saw them (answered calls; cache hits carry no usage and are not counted).
    task_lm_calls: int = 0
    rate_limit_retries: int = 0
    #: Speculative chaining: mutations planned to chain, those that did, and those orphaned.
    chaining: Counter[str] = field(default_factory=Counter)
    #: Best-of-k: mutations that drew more than one reflection, the reflections they drew, and the
    #: children of every mutation tried on a minibatch and passed there.
    siblings: Counter[str] = field(default_factory=Counter)
    #: Filled by the evaluation layer: 429s seen, retries, backoff seconds, AIMD windows per endpoint.
    rate_limits: dict[str, object] = field(default_factory=dict)
    #: Filled by the reflection layer: traced examples left out of reflective datasets, by reason
    #: (``feedback_error``: the metric raised on its feedback call; ...). The proposal went on without them.
    reflective_records_skipped: Counter[str] = field(default_factory=Counter)
    #: Per proposal kind: attempts, children surviving rung 0, accepted, Laplace-smoothed rates.
    operator_credit: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Evaluation-slot account at the end of the run (scheduling.SlotUse.to_dict): slot-seconds in
    #: use and demanded, and their ratio, the share of the window used while work was available.
    evaluation_slots: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Every LM token counted: the program's and reflection's, prompt and completion."""
        return (self.task_prompt_tokens + self.task_completion_tokens + self.reflection_prompt_tokens
                + self.reflection_completion_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mutations": dict(self.mutations),
            "mutations_by_kind": dict(self.mutations_by_kind),
            "accepted_by_kind": dict(self.accepted_by_kind),
            "survived_rung0_by_kind": dict(self.survived_rung0_by_kind),
            "failures": dict(self.failures),
            "proposal_skips": dict(self.proposal_skips),
            "reflection_calls": self.reflection_calls,
            "proposals_replayed": self.proposals_replayed,
            "feedback_reused": self.feedback_reused,
            "feedback_calls": self.feedback_calls,
            "scouted": self.scouted,
            "scout_failures_read": self.scout_failures_read,
            "cache_hits": self.cache_hits,
            "metric_calls_executed": self.executed,
            "metric_calls_replayed": self.replayed,
            "peak_evals_in_flight": self.peak_evals_in_flight,
            "peak_mutations_in_flight": self.peak_mutations_in_flight,
            "chaining": dict(self.chaining),
            "siblings": dict(self.siblings),
            "reflection_tokens": {"prompt": self.reflection_prompt_tokens,
                                  "completion": self.reflection_completion_tokens},
            "task_tokens": {"prompt": self.task_prompt_tokens, "completion": self.task_completion_tokens},
            "task_lm_calls": self.task_lm_calls,
            "cost": {"task": round(self.task_cost, 6), "reflection": round(self.reflection_cost, 6)},
            "rate_limit_retries": self.rate_limit_retries,
            "operator_credit": self.operator_credit,
            "rate_limits": self.rate_limits,
            "reflective_records_skipped": dict(self.reflective_records_skipped),
            "evaluation_slots": self.evaluation_slots,
        }


@dataclass(frozen=True)
class RunSnapshot:
    """What a run has found so far (copies), for a report drawn while it runs."""

    records: list[CandidateRecord]
    fronts: dict[int, set[int]]
    wall_seconds: float
    total_metric_calls: int


@dataclass
class EngineResult:
    records: list[CandidateRecord]
    fronts: dict[int, set[int]]
    best_index: int
    stop_reason: StopReason
    total_metric_calls: int
    num_full_val_evals: int
    wall_seconds: float
    stats: RunStats
    val_ids: tuple[int, ...] = ()

    @property
    def best(self) -> CandidateRecord:
        return self.records[self.best_index]
