"""What the reflection LM's context window holds, and which reflective examples to show within it.

A reflection here reads more examples than dspy.GEPA's three (scouts and reused failures, see
docs/engine.md), so with long traces (retrieved passages, documents) its prompt can outgrow the
reflection LM's context window where dspy.GEPA's fits. The window is learned from refusals, per
call unit (one predictor for dspy's own proposer, all of them for a custom one), in characters of
the prompt's variable part (the current instructions and the examples; the proposer's own template
is the same every time): after a refusal a reflection shows what fits in a size bisected between
the largest that fitted and the smallest refused, failures first; a unit's size is shared so that
a predictor whose examples fit keeps them all, and after a run of fits the ceiling is relaxed (the
window is in tokens, sizes in characters, and one dense prompt must not cap the run for good).
Sizes, not counts: one very long example, or one parent's very long instruction, must not cut every
later reflection down to one example. Until a refusal every example is shown, exactly as before.

Which examples a reflection shows after a refusal depends on which refusals came first, so with a
reflection LM whose window is too small a run is not reproducible to the call (docs/engine.md,
"Reproducibility").
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Fits in a row at a ceiling that then relaxes it by RELAX: a ceiling learned from one unusually dense
#: prompt (the window is in tokens, sizes are in characters) must not cap the run for good. A relaxed
#: ceiling that was right costs one refusal every RELAX_AFTER reflections.
RELAX_AFTER = 8
RELAX = 1.25


@dataclass
class _Seen:
    """Per unit (the predictors asked in one call): the smallest size refused, the largest that fitted
    below it (a later refusal below a size that once fitted forgets it: the window is what the
    provider says now), and the fits since the last refusal."""

    refused: int | None = None
    fitted: int | None = None
    fits_in_a_row: int = 0


def example_size(record: Any) -> int:
    """Characters an example adds to a reflection prompt (its text, as the proposer renders it)."""
    return len(str(record))


Unit = tuple[str, ...]


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
        """Characters a reflection on ``unit`` may hold (instructions and examples; None: no refusal yet).
        A bisection between the largest size that fitted and the smallest refused (half the refused size
        before anything fitted): each refusal lowers the upper end and each fit raises the lower one, so
        the sizes tried converge on the window (the proposer's own template is unknown, so half a
        refusal alone would undershoot it, for good)."""
        with self._lock:
            seen = self._seen.get(unit)
            if seen is None or seen.refused is None:
                return None
            return seen.refused // 2 if seen.fitted is None else (seen.fitted + seen.refused) // 2

    def refused(self, unit: Unit, chars: int) -> None:
        with self._lock:
            seen = self._seen.setdefault(unit, _Seen())
            seen.refused = chars if seen.refused is None else min(seen.refused, chars)
            seen.fits_in_a_row = 0
            if seen.fitted is not None and seen.fitted >= seen.refused:
                seen.fitted = None

    def fitted(self, unit: Unit, chars: int) -> None:
        with self._lock:
            seen = self._seen.get(unit)
            if seen is None or seen.refused is None:
                return  # nothing refused yet: every example is shown anyway
            if chars >= seen.refused:  # it fits after all: the refusal was a denser prompt, or is stale
                seen.refused = int(chars * RELAX) + 1
            seen.fitted = chars if seen.fitted is None else max(seen.fitted, chars)
            seen.fits_in_a_row += 1
            if seen.fits_in_a_row >= RELAX_AFTER:
                seen.refused, seen.fits_in_a_row = int(seen.refused * RELAX) + 1, 0

    def count_left_out(self, n: int) -> None:
        with self._lock:
            self.left_out += n


def share(budget: int, needs: Sequence[int]) -> list[int]:
    """``budget`` characters shared among predictors asked together: each gets what it needs while its
    equal share covers that, the largest take the rest (one predictor's long traces must not cut a
    predictor whose examples fit whole)."""
    out = [0] * len(needs)
    left = budget
    for k, i in enumerate(sorted(range(len(needs)), key=lambda i: (needs[i], i))):
        out[i] = min(needs[i], left // (len(needs) - k))
        left -= out[i]
    return out


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
