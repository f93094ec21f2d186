"""Which components a mutation rewrites: round robin (per candidate), all, or a user callable.

A user callable has gepa's ``ReflectionComponentSelector`` signature
``(state, trajectories, subsample_scores, candidate_idx, candidate) -> list[str]``. We cannot hand it
gepa's state object, so it receives :class:`SelectorState`, which carries the attributes gepa's own
selectors (and stop conditions) read; what it writes into the round-robin counters is kept, as
gepa's ``RoundRobinReflectionComponentSelector`` relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

from dspy_turbogepa.engine.frontier import record_on_front
from dspy_turbogepa.engine.records import CandidateRecord

#: gepa ``GEPAState`` attributes a state here answers, for the message that names them when a
#: user's callback reads another one.
GEPA_STATE_FIELDS = (
    "list_of_named_predictors", "program_candidates", "program_full_scores_val_set",
    "per_program_tracked_scores", "prog_candidate_val_subscores", "pareto_front_valset",
    "program_at_pareto_front_valset", "parent_program_for_candidate", "num_metric_calls_by_discovery",
    "named_predictor_id_to_update_next_for_program_candidate", "total_num_evals", "i",
)


@dataclass
class SelectorState:
    """The part of gepa's ``GEPAState`` that component selectors and stop conditions
    (``gepa_kwargs["stop_callbacks"]``: gepa's stoppers, and the user's own) read.

    The per-candidate fields gepa keeps beside the scores (validation subscores, the per-instance
    frontier, parents, discovery budget) are computed from ``records`` only when read: a stop
    callback is asked at every commit, and most read one count.
    """

    list_of_named_predictors: list[str]
    program_candidates: list[dict[str, str]]
    program_full_scores_val_set: list[float]
    named_predictor_id_to_update_next_for_program_candidate: list[int] = field(default_factory=list)
    #: Metric calls charged so far (gepa: ``total_num_evals``).
    total_num_evals: int = 0
    #: Proposal iterations finished, minus one (gepa's loop counter starts at -1).
    i: int = -1
    #: The committed candidates this state shows, in index order, read by the lazy fields below. Not a
    #: field: asdict(), comparisons and the repr show gepa's fields only.
    records: InitVar[Sequence[CandidateRecord]] = ()

    def __post_init__(self, records: Sequence[CandidateRecord]) -> None:
        self._records = tuple(records)
        self._front_cache: tuple[dict[int, float], dict[int, set[int]]] | None = None

    @property
    def per_program_tracked_scores(self) -> list[float]:
        return list(self.program_full_scores_val_set)

    @property
    def prog_candidate_val_subscores(self) -> list[dict[int, float]]:
        """Per candidate, its score on each validation example (gepa: keyed by the example's index)."""
        return [dict(r.val_scores) for r in self._records]

    @property
    def parent_program_for_candidate(self) -> list[list[int | None]]:
        return [list(r.parent_indices) for r in self._records]

    @property
    def num_metric_calls_by_discovery(self) -> list[int]:
        """Metric calls spent when each candidate was found (the seed: 0, as in gepa and our results)."""
        return [r.reported_discovery_calls for r in self._records]

    @property
    def pareto_front_valset(self) -> dict[int, float]:
        """The best score on each validation example."""
        return dict(self._fronts()[0])

    @property
    def program_at_pareto_front_valset(self) -> dict[int, set[int]]:
        """The candidates reaching that best score, per validation example."""
        return {vid: set(front) for vid, front in self._fronts()[1].items()}

    def _fronts(self) -> tuple[dict[int, float], dict[int, set[int]]]:
        # once per state: a gepa-style loop reads the front per validation example
        if self._front_cache is None:
            best: dict[int, float] = {}
            fronts: dict[int, set[int]] = {}
            for r in self._records:
                for vid, score in r.val_scores.items():
                    record_on_front(best, fronts, r.index, vid, score)
            self._front_cache = (best, fronts)
        return self._front_cache

    def __getattr__(self, name: str) -> Any:
        # only reached for a name the state does not have: a callback written against gepa's GEPAState
        # gets the list of what it can read instead of a bare AttributeError
        if name.startswith("_"):
            raise AttributeError(name)
        if name in GEPA_STATE_FIELDS:  # a property raised AttributeError inside: say so, not "no such field"
            raise AttributeError(f"SelectorState.{name} could not be computed (an AttributeError inside it)")
        raise AttributeError(
            f"TurboGEPA's state has no {name!r}: stop callbacks and component selectors receive a "
            f"SelectorState with gepa's {', '.join(GEPA_STATE_FIELDS)} (not the rest of gepa's GEPAState)."
        )


class ComponentSelector:
    """Owns the round-robin counters, keyed by candidate fingerprint."""

    def __init__(self, components: Sequence[str], policy: str | Callable[..., Any]) -> None:
        if not components:
            raise ValueError("a program needs at least one component to optimize")
        self.components = list(components)
        self.policy = policy
        self._next: dict[str, int] = {}
        #: Turns chained mutations took on a child before it joined the pool (see ``chained_turn``).
        self._taken_early: dict[str, int] = {}

    def counter(self, fingerprint: str) -> int:
        return self._next.get(fingerprint, 0)

    def inherit(self, child_fp: str, value: int) -> None:
        """A new candidate continues its parent's round robin (gepa: max over its parents), moved on by
        the turns chained mutations already took on it."""
        taken = self._taken_early.pop(child_fp, 0)
        self._next[child_fp] = (max(self._next.get(child_fp, 0), value) + taken) % len(self.components)

    def chained_turn(self, child_fp: str, counter: int) -> tuple[str, int]:
        """The turn of a mutation chained on ``child_fp``, a child whose round robin is at ``counter``:
        the component, and the counter that mutation's own child inherits. The turn is the child's,
        as gepa's parent's counter advances on every turn: a later mutation from it takes the next one."""
        n = len(self.components)
        if child_fp in self._next:
            # already in the pool: the turn is its live counter's (other mutations may have taken turns on
            # it since its rung 0: the counter captured then would repeat one predictor and skip another)
            idx = self._next[child_fp] % n
            self._next[child_fp] = (idx + 1) % n
        else:
            idx = (counter + self._taken_early.get(child_fp, 0)) % n
            self._taken_early[child_fp] = self._taken_early.get(child_fp, 0) + 1
        return self.components[idx], (idx + 1) % n

    def after(self, component: str) -> list[str]:
        """The other components in round-robin order, starting after ``component``."""
        i = self.components.index(component)
        return self.components[i + 1:] + self.components[:i]

    def counter_after(self, component: str) -> int:
        """The round-robin counter of a child made by rewriting ``component``."""
        return (self.components.index(component) + 1) % len(self.components)

    def select(
        self,
        parent_fp: str,
        parent_texts: Mapping[str, str],
        parent_index: int,
        trajectories: Sequence[Any],
        scores: Sequence[float],
        state: SelectorState | None,
    ) -> tuple[list[str], int]:
        """Return the components to update and the round-robin counter the child inherits."""
        if self.policy == "all":
            return list(self.components), self.counter(parent_fp)
        if self.policy == "round_robin":
            idx = self.counter(parent_fp) % len(self.components)
            self._next[parent_fp] = (idx + 1) % len(self.components)
            return [self.components[idx]], self._next[parent_fp]
        assert callable(self.policy)  # EngineConfig allows only the two named policies returned above
        chosen = self.policy(state, list(trajectories), list(scores), parent_index, dict(parent_texts))
        counters = state.named_predictor_id_to_update_next_for_program_candidate if state is not None else []
        if 0 <= parent_index < len(counters):  # the selector may advance the parent's round robin (gepa's does)
            self._next[parent_fp] = int(counters[parent_index])
        if isinstance(chosen, (str, bytes)):  # iterated, it would name its characters
            raise ValueError(f"component_selector returned the string {chosen!r}; return a list of component names "
                             f"(e.g. [{chosen!r}]); valid: {self.components}")
        try:
            chosen = [] if chosen is None else list(chosen)  # read once: a generator; never asked its truth (numpy)
        except TypeError as exc:
            raise ValueError(f"component_selector returned a value of type {type(chosen).__name__}, not a list of "
                             f"names; valid: {self.components}") from exc
        names = [c for c in chosen if c in parent_texts]
        unknown = [c for c in chosen if c not in parent_texts]
        if unknown:
            raise ValueError(f"component_selector returned unknown components {unknown}; valid: {self.components}")
        return names, self.counter(parent_fp)
