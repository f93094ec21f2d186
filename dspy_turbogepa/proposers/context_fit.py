"""What the reflection LM's context window holds, and which reflective examples to show within it.

A reflection here reads more examples than dspy.GEPA's three (scouts and reused failures, see
docs/engine.md), so with long traces (retrieved passages, documents) its prompt can outgrow the
reflection LM's context window where dspy.GEPA's fits. The window is learned from refusals, per
call unit (one predictor for dspy's own proposer, all of them for a custom one), in characters of
the prompt's variable part (the current instructions and the examples; the proposer's own template
is the same every time). Sizes, not counts: one very long example, or one parent's very long
instruction, must not cut every later reflection down to one example.

- Until a refusal every example is shown, exactly as before.
- After one, a reflection shows what fits in a size bisected between the largest size that fitted
  and the smallest refused (half the refused size before anything fitted), failures first. A
  prompt above the smallest refusal that fits anyway (the window is in tokens, sizes in characters:
  a denser prompt was refused) moves that refusal up, just above it. Nothing above the refusal is
  asked on purpose, so it settles near the densest prompt seen: sparser prompts later show fewer
  examples than would fit (about 12% fewer in a simulation with 0.20-0.33 tokens a character), the
  price of not being refused again and again.
- Within one reflection each retry halves the gap between what it knows fits and the smallest size
  refused in it, whatever other reflections learn meanwhile, so it makes a logarithmic number of
  calls at most, and it gives up only when its smallest possible prompt (each predictor's
  instruction and shortest failure) was refused.
- A unit's size is shared so that a predictor whose examples fit keeps them all: each predictor
  first gets its smallest prompt, the rest goes to those that need more, smallest need first.

Which examples a reflection shows after a refusal depends on which refusals came first, so with a
reflection LM whose window is too small a run is not reproducible to the call (docs/engine.md,
"Reproducibility").
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Unit = tuple[str, ...]


@dataclass
class _Seen:
    """Per unit: the smallest size refused and the largest that fitted below it."""

    refused: int | None = None
    fitted: int | None = None


def example_size(record: Any) -> int:
    """Characters an example adds to a reflection prompt (its text, as the proposer renders it)."""
    return len(str(record))


class ContextFit:
    """Thread-safe: the reflection threads share what they learn. Keyed by unit: dspy's own proposer
    is asked one predictor at a time, so there a unit is one predictor; a custom proposer asked with
    several is one unit, whose total size is what a refusal says is too long."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[Unit, _Seen] = {}
        #: examples left out of reflections so far to fit the window
        self.left_out = 0

    def budget(self, unit: Unit) -> int | None:
        """Characters a reflection on ``unit`` may hold (instructions and examples; None: no refusal yet)."""
        with self._lock:
            seen = self._seen.get(unit)
            if seen is None or seen.refused is None:
                return None
            return seen.refused // 2 if seen.fitted is None else (seen.fitted + seen.refused) // 2

    def refused(self, unit: Unit, chars: int) -> None:
        with self._lock:
            seen = self._seen.setdefault(unit, _Seen())
            seen.refused = chars if seen.refused is None else min(seen.refused, chars)
            if seen.fitted is not None and seen.fitted >= seen.refused:
                seen.fitted = None  # the window is what the provider says now

    def fitted(self, unit: Unit, chars: int) -> None:
        with self._lock:
            seen = self._seen.setdefault(unit, _Seen())
            if seen.refused is not None and chars >= seen.refused:
                seen.refused = chars + 1  # it fits after all (the refused prompt was denser): move it up
            seen.fitted = chars if seen.fitted is None else max(seen.fitted, chars)

    def known_fit(self, unit: Unit) -> int:
        """The largest size seen to fit below the smallest refusal (0: none)."""
        with self._lock:
            seen = self._seen.get(unit)
            return 0 if seen is None or seen.fitted is None else seen.fitted

    def count_left_out(self, n: int) -> None:
        with self._lock:
            self.left_out += n


def floor_example(scores: Sequence[float], sizes: Sequence[int], perfect: float | None = None) -> int | None:
    """The example a reflection shows however small its budget: the shortest failure (below ``perfect``,
    the metric's perfect score; if none is, or it is unknown, below the best score shown, for a metric
    scored past it), or the shortest example if they score alike. The shortest example whatever its
    score could be a solved one: a prompt showing only that fits, is paid for, and has nothing to fix."""
    if not sizes:
        return None
    every = range(len(sizes))
    pool = ([i for i in every if scores[i] < perfect] if perfect is not None else []) \
        or [i for i in every if scores[i] < max(scores)] or list(every)
    return min(pool, key=lambda i: (sizes[i], i))


def choose(scores: Sequence[float], sizes: Sequence[int], budget: int | None,
           perfect: float | None = None) -> list[int]:
    """Positions of the examples to show, in their original order: all of them without a budget; else
    the failures first (lowest score, then earliest), each that still fits in ``budget`` characters of
    examples, and if none fits, the shortest failure (``floor_example``)."""
    if budget is None:
        return list(range(len(sizes)))
    chosen: list[int] = []
    used = 0
    for i in sorted(range(len(sizes)), key=lambda i: (scores[i], i)):
        if used + sizes[i] <= budget:
            chosen.append(i)
            used += sizes[i]
    if not chosen and (floor := floor_example(scores, sizes, perfect)) is not None:
        chosen = [floor]
    return sorted(chosen)


@dataclass(frozen=True)
class Example:
    """A reflective example as the plan sees it: its score (failures first) and its size."""

    score: float
    size: int


def plan(instructions: Mapping[str, int], examples: Mapping[str, Sequence[Example]],
         budget: int | None, perfect: float | None = None) -> dict[str, list[int]]:
    """Which examples of each predictor (positions) to show within ``budget`` characters of instructions
    and examples: all without a budget. Each predictor first gets its smallest prompt (instruction and
    shortest failure), then the rest is shared, smallest need first, so one that fits keeps them all."""
    if budget is None:
        return {name: list(range(len(shown))) for name, shown in examples.items()}
    names = list(examples)
    sizes = {name: [e.size for e in examples[name]] for name in names}
    shortest: dict[str, int] = {}
    for name in names:
        floor = floor_example([e.score for e in examples[name]], sizes[name], perfect)
        shortest[name] = 0 if floor is None else sizes[name][floor]
    smallest_prompt = sum(instructions.values()) + sum(shortest.values())
    extras = _share(max(0, budget - smallest_prompt), [sum(sizes[name]) - shortest[name] for name in names])
    return {name: choose([e.score for e in examples[name]], sizes[name], shortest[name] + extra, perfect)
            for name, extra in zip(names, extras)}


def _share(budget: int, needs: Sequence[int]) -> list[int]:
    """Water-filling: each need is met while an equal share of what is left covers it; the largest take
    the rest."""
    out = [0] * len(needs)
    left = budget
    for k, i in enumerate(sorted(range(len(needs)), key=lambda i: (needs[i], i))):
        out[i] = min(needs[i], left // (len(needs) - k))
        left -= out[i]
    return out
