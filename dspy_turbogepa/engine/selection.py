"""Which components a mutation rewrites: round robin (per candidate), all, or a user callable.

A user callable has gepa's ``ReflectionComponentSelector`` signature
``(state, trajectories, subsample_scores, candidate_idx, candidate) -> list[str]``. We cannot hand it
gepa's state object, so it receives :class:`SelectorState`, which carries the attributes gepa's own
selectors (and stop conditions) read; what it writes into the round-robin counters is kept, as
gepa's ``RoundRobinReflectionComponentSelector`` relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SelectorState:
    """The subset of gepa's ``GEPAState`` that component selectors and gepa's stop conditions
    (``gepa_kwargs["stop_callbacks"]``: MaxMetricCallsStopper, MaxCandidateProposalsStopper, ...) read."""

    list_of_named_predictors: list[str]
    program_candidates: list[dict[str, str]]
    program_full_scores_val_set: list[float]
    named_predictor_id_to_update_next_for_program_candidate: list[int] = field(default_factory=list)
    #: Metric calls charged so far (gepa: ``total_num_evals``).
    total_num_evals: int = 0
    #: Proposal iterations finished, minus one (gepa's loop counter starts at -1).
    i: int = -1


class ComponentSelector:
    """Owns the round-robin counters, keyed by candidate fingerprint."""

    def __init__(self, components: Sequence[str], policy: str | Callable[..., Any]) -> None:
        if not components:
            raise ValueError("a program needs at least one component to optimize")
        self.components = list(components)
        self.policy = policy
        self._next: dict[str, int] = {}

    def counter(self, fingerprint: str) -> int:
        return self._next.get(fingerprint, 0)

    def inherit(self, child_fp: str, value: int) -> None:
        """A new candidate continues its parent's round robin (gepa: max over its parents)."""
        self._next[child_fp] = max(self._next.get(child_fp, 0), value)

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
        names = [c for c in (chosen or []) if c in parent_texts]
        unknown = [c for c in (chosen or []) if c not in parent_texts]
        if unknown:
            raise ValueError(f"component_selector returned unknown components {unknown}; valid: {self.components}")
        return names, self.counter(parent_fp)
