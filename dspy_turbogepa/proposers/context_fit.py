"""What the reflection LM's context window holds, and which reflective examples to show within it.

A reflection here reads more examples than dspy.GEPA's three (scouts and reused failures, see
docs/engine.md), so with long traces (retrieved passages, documents) its prompt can outgrow the
reflection LM's context window where dspy.GEPA's fits. The window is learned from refusals, per
predictor, in characters of the prompt's variable part (the predictor's current instruction and the
examples; the proposer's own template is the same every time): after a refusal a reflection shows
what fits in a size bisected between the largest that fitted and the smallest refused, failures
first. Sizes, not counts: one very long example, or one parent's very long instruction, must not
cut every later reflection down to one example. Until a refusal every example is shown, exactly as
before.

Which examples a reflection shows after a refusal depends on which refusals came first, so with a
reflection LM whose window is too small a run is not reproducible to the call (docs/engine.md,
"Reproducibility").
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class _Seen:
    """Per predictor: the smallest size refused, and the largest that fitted below it (a later refusal
    below a size that once fitted forgets it: the window is what the provider says now)."""

    refused: int | None = None
    fitted: int | None = None


def example_size(record: Any) -> int:
    """Characters an example adds to a reflection prompt (its text, as the proposer renders it)."""
    return len(str(record))


class ContextFit:
    """Thread-safe: the reflection threads share what they learn."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, _Seen] = {}
        #: examples left out of reflections so far to fit the window
        self.left_out = 0

    def budget(self, name: str) -> int | None:
        """Characters a reflection on ``name`` may hold (instruction and examples; None: no refusal yet).
        A bisection between the largest size that fitted and the smallest refused (half the refused size
        before anything fitted): each refusal lowers the upper end and each fit raises the lower one, so
        the sizes tried converge on the window from both sides (the proposer's own template is unknown,
        so half a refusal alone would undershoot it, for good)."""
        with self._lock:
            seen = self._seen.get(name)
            if seen is None or seen.refused is None:
                return None
            return seen.refused // 2 if seen.fitted is None else (seen.fitted + seen.refused) // 2

    def refused(self, name: str, chars: int) -> None:
        with self._lock:
            seen = self._seen.setdefault(name, _Seen())
            seen.refused = chars if seen.refused is None else min(seen.refused, chars)
            if seen.fitted is not None and seen.fitted >= seen.refused:
                seen.fitted = None

    def fitted(self, name: str, chars: int) -> None:
        with self._lock:
            seen = self._seen.get(name)
            if seen is None or seen.refused is None or chars >= seen.refused:
                return  # nothing refused yet: every example is shown anyway
            seen.fitted = chars if seen.fitted is None else max(seen.fitted, chars)

    def count_left_out(self, n: int) -> None:
        with self._lock:
            self.left_out += n


def choose(scores: Sequence[float], sizes: Sequence[int], budget: int | None) -> list[int]:
    """Positions of the examples to show, in their original order: all of them without a budget; else
    the failures first (lowest score, then earliest), each that still fits in ``budget`` characters of
    examples, and if none fits, the shortest one."""
    if budget is None:
        return list(range(len(sizes)))
    chosen: list[int] = []
    used = 0
    for i in sorted(range(len(sizes)), key=lambda i: (scores[i], i)):
        if used + sizes[i] <= budget:
            chosen.append(i)
            used += sizes[i]
    if not chosen and sizes:
        chosen = [min(range(len(sizes)), key=lambda i: (sizes[i], i))]
    return sorted(chosen)
