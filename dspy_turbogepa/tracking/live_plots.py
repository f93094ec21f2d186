"""The run's SVG plots in ``log_dir``, redrawn while it runs, so a long run can be watched in a browser.

Why: the end-of-run plots come when the run is over; a run of an hour (or one that crashes) showed
nothing until then. Drawing is cheap now (milliseconds for tens of candidates, 0.15 s for 700), so
the plots are redrawn after a new candidate, at most every ``interval`` seconds, on the engine's loop
thread, from a copy of what the run has found. Drawings are spaced further apart when one would take
more than about 1% of the loop's time (judged by the last drawing's cost, or by the number of
candidates before the first). Nothing is copied while nothing is new. Any failure turns the live
plots off with one warning: a report is never worth the run. The end-of-run report overwrites them
with the final ones; their titles say they are live, in case it cannot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.engine.records import CandidateRecord, MutationResult, RunSnapshot

__all__ = ["LivePlots"]

logger = logging.getLogger(__name__)

#: Drawing takes at most this share of the loop's time: the wait grows with the drawing's cost.
_MAX_SHARE = 0.01

#: A drawing's cost per candidate, measured at 700-3,000 candidates (0.15-0.7 s), so that the first
#: drawing of a big run (a resumed one replays every stored candidate) is spaced out before it is timed.
_SECONDS_PER_CANDIDATE = 0.00025

#: Least seconds between two drawings, unless given.
LIVE_PLOT_INTERVAL = 30.0


class LivePlots(EngineObserver):
    """Redraws ``best_over_time.svg`` and ``lineage.svg`` in ``directory`` during the run."""

    def __init__(self, directory: Path, *, budget: int | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._directory = Path(directory)
        self._budget = budget
        self._interval = float(LIVE_PLOT_INTERVAL if interval is None else interval)
        self._clock = clock
        self._source: Callable[[], RunSnapshot] | None = None
        self._last_draw: float | None = None
        self._last_cost = 0.0  # seconds the last drawing took, its snapshot included
        self._candidates = 0  # found so far (replayed ones included), counted as they come
        self._drawn_count = 0  # candidates in the last drawing
        self._enabled = True
        self.draws = 0

    def bind(self, source: Callable[[], RunSnapshot]) -> None:
        """``source`` returns what the run has found so far (``Orchestrator.snapshot``); until it is
        given, nothing is drawn."""
        self._source = source
        self._last_draw = self._clock()  # the first drawing comes one interval into the run

    def on_candidate(self, record: CandidateRecord) -> None:
        self._candidates += 1
        self._maybe_draw()

    def on_mutation(self, result: MutationResult, status: str) -> None:
        self._maybe_draw()  # a candidate that came inside the interval is drawn once it has passed

    def _wait(self) -> float:
        """Seconds between drawings: the interval, or longer when a drawing costs more than 1% of it."""
        expected = max(self._last_cost, self._candidates * _SECONDS_PER_CANDIDATE)
        return max(self._interval, expected / _MAX_SHARE)

    def _maybe_draw(self) -> None:
        if not self._enabled or self._source is None or self._last_draw is None:
            return
        if self._candidates == self._drawn_count:
            return  # nothing new to show: not even the snapshot is taken
        now = self._clock()
        if now - self._last_draw < self._wait():
            return
        try:
            run = self._source()
            self._draw(run)
        except Exception as exc:  # noqa: BLE001 - a plot is never worth the run
            self._enabled = False
            logger.warning("Live plots in %s are off for the rest of this run: %s: %s (the end-of-run plots "
                           "are still drawn).", self._directory, type(exc).__name__, exc)
            return
        self._last_draw = self._clock()
        self._last_cost = self._last_draw - now
        self._drawn_count = self._candidates
        self.draws += 1

    def _draw(self, run: RunSnapshot) -> None:
        """Titled as live: a run that crashes, or whose end-of-run plots fail, leaves these behind. The
        seconds are the run's own clock, the one its time axis reads."""
        from dspy_turbogepa.tracking.plots import plot_best_over_time, plot_lineage

        note = f"live, {run.wall_seconds:.0f} s into the run"
        plot_best_over_time(run, self._directory / "best_over_time.svg", budget=self._budget, note=note)
        plot_lineage(run.records, run.fronts, self._directory / "lineage.svg", note=note)
