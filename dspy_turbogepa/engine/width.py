"""How wide the search runs: mutations at once, and reflections drawn at once on one parent.

Both follow the share of recent attempts that succeeded, and both are capped by what the remaining
budget can pay for. They are pure functions of counts read from the commit history at a planning
view (see ``history.py``), so a deterministic run plans the same widths whatever the timing of its LM
calls. Kept apart from the orchestrator, which only feeds them the counts: a strategy for how many
attempts to run in parallel, the way ``sampling.py`` is one for what a minibatch holds.
"""

from __future__ import annotations

import math

from dspy_turbogepa.engine.config import EngineConfig

#: The width floor leaves budget for this many generations of accepted children (see mutation_width).
GENERATIONS_TO_AFFORD = 4

__all__ = ["GENERATIONS_TO_AFFORD", "mutation_width", "sibling_count"]


def mutation_width(cfg: EngineConfig, accepted: int, attempts: int, remaining: int, val_size: int) -> int:
    """How many mutations may run at once: about one success's worth of attempts.

    While most mutations succeed, siblings launched from the same state mostly rediscover the same
    improvement and each pays for a validation pass; once successes get rare, many attempts at once
    find the next one sooner at no extra cost. So the width follows ``1 / p`` where ``p`` is the
    (Laplace-smoothed) share of recent mutations that produced a new candidate (``accepted`` of
    ``attempts``), within ``[min_mutations_in_flight, max_mutations_in_flight]``.

    Siblings planned from the same state buy speed with depth: when one of them is accepted, the
    others were planned from a parent that is no longer the best, and what they cost comes out of
    the generations left. So the width never exceeds what the ``remaining`` budget pays for at
    GENERATIONS_TO_AFFORD more generations of accepted children (a small budget runs one mutation at
    a time, as dspy.GEPA does; its evaluations still use every slot).
    """
    if not cfg.adaptive_width:
        return cfg.max_mutations_in_flight
    p = (accepted + 1) / (attempts + 2)
    per_child = 2 * cfg.reflection_minibatch_size + val_size
    affordable = max(1, remaining // (GENERATIONS_TO_AFFORD * per_child))
    floor = min(cfg.min_mutations_in_flight, affordable)
    return max(floor, min(cfg.max_mutations_in_flight, round(1 / p), affordable))


def sibling_count(cfg: EngineConfig, passed: int, tried: int, remaining: int, val_size: int) -> int:
    """How many reflections to draw at once on one parent and minibatch (best-of-k).

    Why: a step of the search is a reflection and then a validation pass, one after the other, and a
    failed reflection costs a whole reflection round-trip. Independent mutations in parallel hide that
    latency but each surviving sibling pays its own validation pass, while only one of them is usually
    needed. Drawing k reflections on the same parent and minibatch and sending only the child that does
    best there on to validation buys the latency back for ``k - 1`` extra minibatch evaluations. k is
    ``floor(1 / p)``, with ``p`` the (smoothed) share of recent children that beat their parent on the
    minibatch (``passed`` of ``tried``), so it stays 1 while most reflections succeed; and it shrinks
    when the ``remaining`` budget could no longer pay for GENERATIONS_TO_AFFORD more such steps.
    """
    if cfg.max_siblings <= 1:
        return 1
    p = (passed + 2) / (tried + 3)  # prior: 2 of 3 succeed, so a run starts with one reflection per step
    k = max(1, min(cfg.max_siblings, cfg.max_reflections_in_flight, math.floor(1 / p)))
    mb = cfg.reflection_minibatch_size
    while k > 1 and remaining < GENERATIONS_TO_AFFORD * ((k + 1) * mb + val_size):
        k -= 1
    return k
