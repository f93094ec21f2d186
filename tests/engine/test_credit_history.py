"""Operator credit (which kind of reflection) and the commit history the adaptive width reads."""

from __future__ import annotations

import random

from dspy_turbogepa.engine.credit import CreditSnapshot
from dspy_turbogepa.engine.history import CommitHistory, CommitPoint


def test_rewriting_every_component_starts_pessimistic() -> None:
    """Beta(1, 9) for "all" against Beta(1, 1) for "one": about 1 reflection in 10 rewrites every
    component before any credit exists (GEPA's default is one at a time)."""
    picks = [CreditSnapshot().choose_reflection_kind(random.Random(s)) for s in range(2000)]
    assert 0.05 < picks.count("reflection_all") / len(picks) < 0.15


def test_attempt_lookback_is_the_latest_point_with_enough_fewer_attempts() -> None:
    history = CommitHistory([0])
    for attempted in range(5):
        history.record(CommitPoint(1, 0, 0, 0, attempted=attempted))
    assert history.attempt_lookback(4, 2) == 2
