"""The engine's whole configuration as one validated, immutable object.

gepa's ``optimize()`` takes ~50 keyword arguments; here the teleprompter translates dspy.GEPA's
parameters once, derives our own knobs from ``num_threads`` and the data sizes, and hands the engine
this single object. Validation happens at construction so bad values fail before any LM call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CandidateSelection = Literal["pareto", "current_best", "epsilon_greedy", "top_k_pareto"]
CANDIDATE_SELECTIONS: tuple[str, ...] = ("pareto", "current_best", "epsilon_greedy", "top_k_pareto")
MinibatchSampling = Literal["failure_first", "epoch"]
MINIBATCH_SAMPLINGS: tuple[str, ...] = ("failure_first", "epoch")

#: Smallest validation shard worth a promotion decision; smaller shards are too noisy to prune on.
MIN_SHARD_SIZE = 8


#: The most validation shards below the full set that the default ladder builds.
MAX_RUNGS = 16


def default_rung_fractions(
    val_size: int, reduction_factor: float = 3.0, min_shard: int = MIN_SHARD_SIZE
) -> tuple[float, ...]:
    """ASHA-style geometric ladder of validation shards, ending at the full validation set.

    Shard k holds ``val_size / reduction_factor**k`` examples; shards smaller than ``min_shard`` are
    dropped because a decision on a handful of examples prunes good children by chance. At most
    ``MAX_RUNGS`` shards below the full set: a factor barely above 1 would otherwise build millions.
    """
    if not 1 < reduction_factor < math.inf:
        raise ValueError(f"reduction_factor must be a finite number > 1, got {reduction_factor}")
    fractions = [1.0]
    k = 1
    while k <= MAX_RUNGS and val_size / reduction_factor**k >= min_shard:
        fractions.append(1.0 / reduction_factor**k)
        k += 1
    return tuple(sorted(fractions))


def default_mutations_in_flight(num_threads: int) -> int:
    """Enough concurrent mutations to keep ``num_threads`` evaluation slots busy.

    A mutation spends much of its life waiting on the reflection LM (holding no evaluation slot), so
    we run about one mutation per two slots; more would only make parents staler.
    """
    return max(2, num_threads // 2)


def default_reflections_in_flight(num_threads: int) -> int:
    """A small separate cap: reflection models are slower, pricier and have tighter rate limits."""
    return max(1, min(8, math.ceil(num_threads / 4)))


def validate_rung_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    try:
        if isinstance(fractions, (str, bytes)):
            raise TypeError("a string")
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"rung_fractions must be a sequence of increasing fractions of the valset ending at 1.0, such as "
            f"(0.25, 0.5, 1.0), got {fractions!r}."
        ) from exc
    if not fr:
        raise ValueError(
            "rung_fractions must not be empty; use (1.0,) to evaluate children on the full valset at once."
        )
    if any(not (0.0 < f <= 1.0) for f in fr):
        raise ValueError(f"rung_fractions must lie in (0, 1], got {list(fr)}.")
    if any(b <= a for a, b in zip(fr, fr[1:])):
        raise ValueError(f"rung_fractions must be strictly increasing, got {list(fr)}.")
    if fr[-1] != 1.0:
        raise ValueError(f"rung_fractions must end at 1.0 (the full validation set), got {list(fr)}.")
    return fr


@dataclass(frozen=True)
class EngineConfig:
    """Everything the streaming engine needs to know; no DSPy objects in here."""

    max_metric_calls: int
    max_evals_in_flight: int
    max_mutations_in_flight: int
    max_reflections_in_flight: int
    reflection_minibatch_size: int = 3
    rung_fractions: tuple[float, ...] = (1.0,)
    #: Promotion margin at validation rungs, in standard errors of the paired differences with the
    #: incumbent: 0 promotes children not behind it (or best on some instance); larger is laxer.
    promotion_z: float = 0.0
    candidate_selection: CandidateSelection = "pareto"
    #: "failure_first" (default): examples the parent's lineage failed come first, then untried ones,
    #: solved ones only when nothing else is eligible (see sampling.FailureFirstSampler); "epoch":
    #: gepa's plain epoch-shuffled order.
    minibatch_sampling: MinibatchSampling = "failure_first"
    component_selector: str | Callable[..., Any] = "round_robin"
    #: GEPA's acceptance test on the minibatch: strict improvement unless this is set.
    accept_equal_on_minibatch: bool = False
    #: The user left component_selector at its default: operator credit chooses one or all components.
    adaptive_components: bool = False
    skip_perfect_score: bool = True
    perfect_score: float = 1.0
    seed: int = 0
    #: Commit mutation results in launch order so a run is reproducible (see docs/engine.md).
    deterministic: bool = True
    #: How many launches a mutation's view of the frontier may lag behind, in deterministic mode
    #: (fixed-width mode only; with ``adaptive_width`` it follows the width).
    max_staleness: int | None = None
    #: Adapt the number of mutations in flight to the recent success rate (see Orchestrator.width).
    adaptive_width: bool = True
    #: Speculative chaining: one extra mutation may start from the newest child that survived rung 0
    #: while that child is still being validated (see Orchestrator._next_view and _chain_target).
    speculative_chaining: bool = True
    #: Floor of the adaptive width. 1 (the default) lets the width follow the success rate alone: a
    #: floor of ``num_threads // 4`` kept more slots busy, but while most mutations succeed the extra
    #: siblings only rediscover what one of them brings in and spend the depth a fixed budget needs
    #: (simulator pricing, 800 calls, 5 seeds: median test 0.920 with it, 0.963 without, dspy.GEPA 0.963).
    min_mutations_in_flight: int = 1
    width_window: int = 16
    #: Best-of-k: up to this many reflections at once on one parent and minibatch, only the child that
    #: does best on the minibatch goes on to validation. k follows 1 / (share of children that beat
    #: their parent on the minibatch), so it is 1 while most reflections succeed. 1 disables it.
    max_siblings: int = 4
    #: Feedback reuse: a reflection also reads up to this many of the parent's own failures on
    #: training examples outside its minibatch, from evaluations already paid for (the minibatch
    #: that made it, earlier minibatches it was the parent on). 0 reads the minibatch only, as GEPA.
    reflection_feedback_reuse: int = 3
    #: Scouting: each reflection mutation also evaluates its parent on up to this many training
    #: examples beyond its minibatch (failure-first order, examples the parent has no score on), in
    #: the same wave, and the reflection reads their failures. The acceptance test stays on the
    #: minibatch. 0 turns it off; it needs ``minibatch_sampling="failure_first"``.
    reflection_scouts: int = 5
    use_merge: bool = False
    max_merge_invocations: int = 5
    merge_subsample_size: int = 5
    stop_file: Path | None = None
    stop_callbacks: tuple[Callable[[Any], bool], ...] = field(default_factory=tuple)
    #: Never pass ``max_metric_calls`` (stop up to one mutation's cost below it) instead of dspy.GEPA's
    #: rule, where the budget is checked before each mutation starts and the last one may finish.
    strict_budget: bool = False
    #: Secondary budgets (None = unlimited); the stop reason names the one that stopped the run. At
    #: ``max_seconds`` nothing new is launched and the work in flight finishes; ``max_tokens`` and
    #: ``max_cost`` cap the whole run (prior sessions' usage included) at each LM call it would pay for
    #: (Orchestrator._paid_call_refusal).
    max_seconds: float | None = None
    max_tokens: int | None = None
    max_cost: float | None = None
    #: Stop after this many consecutive mutations that evaluated nothing new and found nothing.
    max_noop_mutations: int = 200
    #: ... and after this many of them in a row whose proposer answered (a reflection that rebuilt a known
    #: candidate): paid, whether or not a DSPy LM call was seen (a custom proposer may call its vendor directly).
    max_paid_noop_mutations: int = 25
    #: Stop the run if this many consecutive evaluations at the start all fail (systemic failure).
    systemic_failure_window: int = 8
    #: ... or this many reflections before the first usable one (None: the evaluation window, at most 8).
    #: Not tied to the data: a run on 2 examples must not stop on 2 failed reflections.
    systemic_proposal_window: int | None = None

    @property
    def staleness_limit(self) -> int:
        """``max_staleness`` as set by ``__post_init__`` (``max_mutations_in_flight`` when left None)."""
        return self.max_mutations_in_flight if self.max_staleness is None else self.max_staleness

    def __post_init__(self) -> None:
        for name in ("max_metric_calls", "max_evals_in_flight", "max_mutations_in_flight", "max_reflections_in_flight",
                     "reflection_minibatch_size", "max_siblings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        object.__setattr__(self, "rung_fractions", validate_rung_fractions(self.rung_fractions))
        if self.candidate_selection not in CANDIDATE_SELECTIONS:
            raise ValueError(
                f"candidate_selection_strategy must be one of {list(CANDIDATE_SELECTIONS)}, "
                f"got {self.candidate_selection!r}."
            )
        if self.minibatch_sampling not in MINIBATCH_SAMPLINGS:
            raise ValueError(
                f"minibatch_sampling must be one of {list(MINIBATCH_SAMPLINGS)}, got {self.minibatch_sampling!r}."
            )
        if not callable(self.component_selector) and self.component_selector not in ("round_robin", "all"):
            raise ValueError(
                f"component_selector must be 'round_robin', 'all' or a callable, got {self.component_selector!r}."
            )
        for name in ("reflection_feedback_reuse", "reflection_scouts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if self.promotion_z < 0:
            raise ValueError(f"promotion_z must be >= 0, got {self.promotion_z}.")
        if self.max_staleness is None:
            object.__setattr__(self, "max_staleness", self.max_mutations_in_flight)
        if self.staleness_limit < self.max_mutations_in_flight:
            raise ValueError("max_staleness must be >= max_mutations_in_flight.")
        object.__setattr__(
            self, "min_mutations_in_flight", min(self.min_mutations_in_flight, self.max_mutations_in_flight)
        )
