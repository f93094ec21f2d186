"""Live progress of a run: one tqdm bar on a terminal, a few plain INFO lines in a log file.

Threads. The engine calls the observer hooks (``on_evaluation``, ``on_candidate``, ``on_mutation``)
on its event-loop thread; they only bump counters or append to a deque (O(1)). Everything else —
reading the engine, formatting, drawing, logging — happens in :meth:`ProgressDisplay.tick`, which the
thread that called ``compile()`` runs every ~0.2-1 s (``run_coroutine_in_thread(on_tick=...)``), and
in :meth:`ProgressDisplay.close` at the end.

Wiring (the display must exist before the orchestrator, which needs its observers)::

    display = ProgressDisplay(enabled=verbose, time_budget_seconds=...)
    orch = Orchestrator(..., observers=[*observers, display])
    display.bind(OrchestratorSource(orch))
    try:
        result = run_coroutine_in_thread(orch.run, ..., on_tick=display.tick)
    finally:
        display.close(stop_reason=...)

Output. When ``stream`` (default ``sys.stderr``) is a terminal, or in Jupyter, one tqdm bar whose
postfix is updated in place (at most every ``refresh_interval`` seconds), and console log handlers
are routed through ``tqdm.write`` while it is shown so log lines do not tear it. Otherwise one INFO
line on the ``dspy_turbogepa.tracking.progress`` logger when the best score improves (at most one a
second) or every ``log_interval`` seconds while something changes; the interval grows with the run
(elapsed / 20, at most ``max_log_interval``), so an hour-long run logs about a hundred lines.

Silence. ``enabled=False``, or a level above INFO on the ``dspy_turbogepa`` logger (or on this
module's logger, or any logger in between), e.g. ``logging.getLogger("dspy_turbogepa").setLevel(
logging.WARNING)``. An unconfigured hierarchy (only the root logger has a level) still shows the bar
on a terminal; log lines then follow the root logger's level as usual.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

from dspy_turbogepa.engine.frontier import SCORE_EPS, FrontierTally
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.tracking.console_logs import (
    console_through_tqdm,
    quiet_by_logging,
    stdout_through_tqdm,
    terminal_size,
)

if TYPE_CHECKING:
    from dspy_turbogepa.engine.candidate import Candidate
    from dspy_turbogepa.engine.records import CandidateRecord, MutationResult
    from dspy_turbogepa.engine.types import EvalOutcome, Split

logger = logging.getLogger(__name__)

__all__ = [
    "OrchestratorSource", "ProgressDisplay", "ProgressSnapshot", "ProgressSource", "format_duration",
]

#: The ETA's shortest rate window, in seconds: shorter, one reflection's wait swings the rate.
MIN_ETA_WINDOW_S = 5.0

#: Statuses of mutations whose child was scored on a minibatch (or a merge screen): the funnel's first
#: entry. A "duplicate" counts only when it was found out after evaluation (rung_reached > 0), a
#: "budget_stopped" one only when its child was scored before a token or dollar cap refused a call.
_TRIED_STATUSES = frozenset({"accepted", "rejected_rung0", "pruned", "duplicate", "after_stop", "budget_stopped"})


@runtime_checkable
class ProgressSource(Protocol):
    """What the display reads from a running engine. Called on the compile thread only.

    Any method may return None for "unknown"; the display then omits the field (or, for ``best`` and
    ``frontier_size``, falls back to what it saw through ``on_candidate``). Optionally also
    ``paused_seconds()``: how long the LM endpoints are still paused by a rate limit's Retry-After, and
    ``reflection_paused_seconds()``: how long a reflection still waits out the reflection LM's rate limit;
    ``tokens()`` and ``cost_usd()``: the LM tokens and dollars the run has used (every session of its
    ``log_dir``, as the token and dollar caps count them), ``replayed_calls()``: the metric calls a
    resume replayed from its store (kept out of the ETA's rate), and ``failed_calls()``: those of the
    metric calls whose evaluation failed (scored ``failure_score``).
    """

    def metric_calls(self) -> int | None: ...

    def budget(self) -> int | None: ...

    def best(self) -> float | None: ...

    def frontier_size(self) -> int | None: ...

    def evals_in_flight(self) -> int | None: ...

    def mutations_running(self) -> int | None: ...

    def backoffs(self) -> int | None: ...


class OrchestratorSource:
    """:class:`ProgressSource` over an ``engine.Orchestrator``'s public attributes.

    Metric calls are the orchestrator's executed and replayed evaluations: a resumed run's stored
    evaluations count as the budget counts them, when replayed.
    ``frontier_size``: a callable returning the frontier size, if the caller has a cheaper or more
    exact one; by default it is computed from ``orchestrator.records`` (new records only, per call):
    the number of candidates on GEPA's Pareto frontier, i.e. per-instance front members that are not
    dominated (the programs parents are drawn from; with ties on easy instances nearly every
    candidate is a raw front member, which says little).
    ``extra_backoffs``: retries the engine's evaluations do not report (transient errors: 5xx, timeouts,
    dropped connections; the reflection LM's 429s and transient errors). A flaky server that made a run
    nine times slower showed "rate-limit backoffs 0" throughout.
    ``paused``: seconds left of the longest pause a rate limit's Retry-After imposes on an endpoint.
    Why: during such a pause nothing moves, and a line that only shows the metric-call rate falling
    (and its ETA growing) looks like a hang.
    ``reflection_paused``: seconds left of the longest wait a reflection is in because the reflection LM
    answered 429: the search waits on it, though evaluations of other mutations may go on.
    """

    def __init__(
        self, orchestrator: Any, *, frontier_size: Callable[[], int] | None = None,
        extra_backoffs: Callable[[], int] | None = None, paused: Callable[[], float] | None = None,
        reflection_paused: Callable[[], float] | None = None,
    ) -> None:
        self._orch = orchestrator
        self._frontier_fn = frontier_size
        self._extra_backoffs = extra_backoffs
        self._paused = paused
        self._reflection_paused = reflection_paused
        self._tracker = FrontierTally()
        self._seen = 0

    def _catch_up(self) -> None:
        records = self._orch.records
        n = len(records)
        if n > self._seen:
            for record in records[self._seen:n]:  # slicing a list is atomic under the GIL
                self._tracker.add(record.index, record.val_scores)
            self._seen = n

    def metric_calls(self) -> int:
        """Metric calls counted against this session's budget: executed, plus stored ones replayed."""
        return int(self._orch.budget.executed + self._orch.stats.replayed)

    def budget(self) -> int:
        return self._orch.budget.limit

    def best(self) -> float | None:
        self._catch_up()
        return self._tracker.best

    def frontier_size(self) -> int | None:
        if self._frontier_fn is not None:
            return int(self._frontier_fn())
        self._catch_up()
        return self._tracker.size if self._seen else None

    def evals_in_flight(self) -> int:
        return int(self._orch.in_flight)

    def mutations_running(self) -> int:
        return int(self._orch.mutations_in_flight())

    def backoffs(self) -> int | None:
        value = getattr(getattr(self._orch, "stats", None), "rate_limit_retries", None)
        if value is None:
            return None
        return int(value) + (int(self._extra_backoffs()) if self._extra_backoffs is not None else 0)

    def paused_seconds(self) -> float | None:
        return None if self._paused is None else float(self._paused())

    def reflection_paused_seconds(self) -> float | None:
        return None if self._reflection_paused is None else float(self._reflection_paused())

    def tokens(self) -> int:
        """Every LM token the run used (the program's and the reflections'), earlier sessions' included:
        what ``token_budget`` caps."""
        return int(self._orch.stats.tokens)

    def failed_calls(self) -> int:
        """Evaluations scored ``failure_score`` because the program, the metric or the LM failed: shown
        while the run goes, since a run where half the examples fail looked healthy on every line (one
        warning per failure kind, the counts only in the final line)."""
        return sum(list(self._orch.stats.failures.values()))  # a copy: the engine's thread adds to it

    def replayed_calls(self) -> int:
        """Stored evaluations replayed this session: a resume replays them in a burst, which is not the
        rate the run goes at (they stay out of the ETA's rate, not out of the count)."""
        return int(self._orch.stats.replayed)

    def cost_usd(self) -> float:
        """Dollars the run spent, earlier sessions' included: what ``cost_budget_usd`` caps."""
        stats = self._orch.stats
        return float(stats.task_cost + stats.reflection_cost)


@dataclass(frozen=True)
class ProgressSnapshot:
    elapsed: float
    metric_calls: int
    budget: int | None
    best: float | None
    frontier_size: int | None
    candidates: int
    evals_in_flight: int | None
    mutations_running: int | None
    rung_funnel: tuple[int, ...]
    backoffs: int | None
    eta_seconds: float | None
    #: seconds left of a rate limit's pause (Retry-After) on the LM endpoints; None or 0 when none
    paused_seconds: float | None = None
    #: seconds left of the longest wait a reflection is in on the reflection LM's rate limit; in the ETA
    #: only while no evaluation is in flight (otherwise other mutations' evaluations go on meanwhile)
    reflection_paused_seconds: float | None = None
    #: LM tokens and dollars used by the run (every session); the caps, when set
    tokens: int | None = None
    cost_usd: float | None = None
    token_budget: int | None = None
    cost_budget_usd: float | None = None
    #: of ``metric_calls``, the evaluations that failed (scored failure_score)
    failed: int | None = None

    @property
    def paused(self) -> bool:
        """A pause worth showing: a second or more (shorter ones pass between two refreshes)."""
        return _worth_showing(self.paused_seconds)

    @property
    def reflection_paused(self) -> bool:
        return _worth_showing(self.reflection_paused_seconds)

    @property
    def fraction(self) -> float | None:
        """Of the budget, not capped: the last mutations may finish past it, as in dspy.GEPA, and
        "142/120 (100%)" would hide the 18% more the run paid."""
        if not self.budget:
            return None
        return self.metric_calls / self.budget

    def usage_parts(self, short: bool) -> tuple[list[str], list[str]]:
        """(capped, uncapped) usage parts: tokens and dollars, against their cap when one is set. A cap is
        what may end the run, so the bar shows it early, the nearest first (a narrow terminal cuts the
        tail); plain usage goes last. Nothing for a count that is zero with no cap (an LM that reports no
        usage, or no price)."""
        capped: list[tuple[float, str]] = []
        plain: list[str] = []
        count = _short_count if short else (lambda n: f"{n:,}")
        if self.tokens is not None and (self.tokens or self.token_budget is not None):
            if self.token_budget is not None:
                share, pct = _share(self.tokens, self.token_budget)
                used = f"{count(self.tokens)}/{count(self.token_budget)}"
                capped.append((share, f"tok {used}{pct}" if short else f"{used} tokens{pct}"))
            else:
                plain.append(f"tok {count(self.tokens)}" if short else f"{count(self.tokens)} tokens")
        if self.cost_usd is not None and (self.cost_usd or self.cost_budget_usd is not None):
            if self.cost_budget_usd is not None:
                share, pct = _share(self.cost_usd, self.cost_budget_usd)
                capped.append((share, f"{_money(self.cost_usd)}/{_money(self.cost_budget_usd)}{pct}"))
            else:
                plain.append(_money(self.cost_usd) if short else f"{_money(self.cost_usd)} spent")
        capped.sort(key=lambda share_part: -share_part[0])  # stable: tokens first on a tie
        return [part for _, part in capped], plain

    def fields(self) -> list[str]:
        """Short ``name value`` parts for the bar, most useful first (a narrow terminal cuts the tail)."""
        parts: list[str] = []
        capped, plain = self.usage_parts(short=True)
        if self.best is not None:
            parts.append(f"best {self.best:.3f}")
        if self.failed:
            parts.append(f"failed {self.failed}")
        if self.eta_seconds is not None:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        parts.extend(capped)
        if self.paused:
            parts.append(f"paused {format_duration(self.paused_seconds or 0.0)} (429)")
        if self.reflection_paused:
            parts.append(f"reflect paused {format_duration(self.reflection_paused_seconds or 0.0)} (429)")
        if self.frontier_size is not None:
            parts.append(f"front {self.frontier_size}")
        if self.evals_in_flight is not None or self.mutations_running is not None:
            parts.append(f"flight {_num(self.evals_in_flight)}e/{_num(self.mutations_running)}m")
        if self.backoffs:
            parts.append(f"retries {self.backoffs}")
        if self.rung_funnel:
            parts.append("rungs " + ">".join(str(n) for n in self.rung_funnel))
        parts.append(f"cands {self.candidates}")
        parts.extend(plain)
        return parts

    def log_line(self) -> str:
        calls = f"{self.metric_calls}/{self.budget}" if self.budget else str(self.metric_calls)
        pct = f" ({100 * self.fraction:.0f}%)" if self.fraction is not None else ""
        parts = [f"{calls} metric calls{pct}"]
        if self.failed:
            parts.append(f"{self.failed} failed ({100 * self.failed / max(1, self.metric_calls):.0f}%)")
        parts.append(f"{format_duration(self.elapsed)} elapsed")
        if self.best is not None:
            parts.append(f"best val {self.best:.4f}")
        if self.frontier_size is not None:
            parts.append(f"frontier {self.frontier_size}")
        parts.append(f"{self.candidates} candidates")
        if self.rung_funnel:
            parts.append("children per rung " + " > ".join(str(n) for n in self.rung_funnel))
        if self.evals_in_flight is not None or self.mutations_running is not None:
            parts.append(f"in flight {_num(self.evals_in_flight)} evals / {_num(self.mutations_running)} mutations")
        if self.backoffs is not None:
            parts.append(f"LM retries {self.backoffs}")
        capped, plain = self.usage_parts(short=False)
        parts.extend(capped + plain)
        if self.eta_seconds is not None:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        if self.paused:
            parts.append(f"paused {format_duration(self.paused_seconds or 0.0)} by a rate limit (Retry-After)")
        if self.reflection_paused:
            parts.append(f"a reflection waits {format_duration(self.reflection_paused_seconds or 0.0)} on the "
                         "reflection LM's rate limit")
        return ", ".join(parts)


def _worth_showing(pause: float | None) -> bool:
    return pause is not None and pause >= 1.0


def _num(value: int | None) -> str:
    return "?" if value is None else str(value)


def _short_count(n: int) -> str:
    """``950``, ``12.3k``, ``4.56M``, ``1.23G``: a token count that fits a bar (never ``1e+03M``)."""
    if n < 1000:
        return str(n)
    if n < 999_500:
        return f"{n / 1000:.3g}k"
    if n < 999_500_000:
        return f"{n / 1e6:.3g}M"
    giga = n / 1e9
    return f"{giga:.3g}G" if giga < 999.5 else f"{giga:,.0f}G"


def _money(usd: float) -> str:
    """``$12.34``, ``$0.0042``: cents where they are enough, four decimals below ten cents, and
    ``<$0.0001`` for less (a cheap model's first calls are not free)."""
    if usd >= 0.1 or usd == 0:
        return f"${usd:.2f}"
    return f"${usd:.4f}" if usd >= 0.0001 else "<$0.0001"


def _share(used: float, cap: float) -> tuple[float, str]:
    """How much of a cap is used, and the `` (25%)`` that says it (nothing for a cap of zero)."""
    if cap <= 0:
        return math.inf, ""
    return used / cap, f" ({100 * used / cap:.0f}%)"


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


class ProgressDisplay(EngineObserver):
    """Live progress of a TurboGEPA run (see the module docstring for threads and wiring).

    Args:
        source: what to read the engine state from (:class:`OrchestratorSource`, or any object with
            the :class:`ProgressSource` methods); can be given later with :meth:`bind`.
        enabled: False makes every method a no-op (map ``verbose=False`` here).
        interactive: force the tqdm bar (True) or log lines (False); default: ``stream.isatty()``,
            or running under Jupyter.
        stream: where the bar is drawn (default ``sys.stderr``); log lines always go through logging.
        log_interval / max_log_interval: bounds of the gap between periodic log lines (seconds).
        best_log_gap: minimum gap between two "new best" log lines (seconds).
        refresh_interval: minimum gap between two redraws of the bar (seconds).
        time_budget_seconds: the run's wall-clock budget, if any: the ETA never exceeds what is left.
        token_budget / cost_budget_usd: the run's token and dollar caps, if any: shown against what the run
            used (every session of its ``log_dir``), and the ETA never exceeds the time to reach them at
            the recent rate.
        eta_window_seconds: the metric-call rate behind the ETA is measured over this recent window (over
            the last half of the run while that is shorter, but not under ``MIN_ETA_WINDOW_S`` unless this
            is).
        log: the logger for log lines (default: this module's).
        clock: monotonic clock (tests inject a fake one). Elapsed time counts from construction, so
            build the display right before the run starts.
        desc: the label in front of the bar and of each log line.

    Shown: metric calls / budget, best full-validation score, Pareto-frontier size, candidates,
    children per rung (scored on a minibatch > on each validation shard > on the full valset, over
    committed mutations), evaluations / mutations in flight, LM retries, tokens and dollars used
    (against their caps when set), ETA.
    """

    def __init__(
        self,
        source: ProgressSource | None = None,
        *,
        enabled: bool = True,
        interactive: bool | None = None,
        stream: IO[str] | None = None,
        log_interval: float = 5.0,
        max_log_interval: float = 60.0,
        best_log_gap: float = 1.0,
        refresh_interval: float = 0.5,
        time_budget_seconds: float | None = None,
        token_budget: int | None = None,
        cost_budget_usd: float | None = None,
        eta_window_seconds: float = 60.0,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        desc: str = "TurboGEPA",
    ) -> None:
        self._source = source
        self._enabled = bool(enabled)
        self._interactive = interactive
        self._stream = stream
        self._log_interval = float(log_interval)
        self._max_log_interval = max(float(max_log_interval), self._log_interval)
        self._best_log_gap = float(best_log_gap)
        self._refresh_interval = float(refresh_interval)
        self._time_budget = time_budget_seconds
        self._token_budget = token_budget
        # inf is the constructor's "no limit": not a cap to show
        self._cost_budget = cost_budget_usd if cost_budget_usd is not None and math.isfinite(cost_budget_usd) else None
        self._eta_window = float(eta_window_seconds)
        self._log = log or logger
        self._clock = clock
        self._desc = desc
        self._t0 = clock()

        # Written on the engine thread by the hooks (single writer), read on the compile thread.
        self._evaluations = 0
        self._candidate_count = 0
        self._pending: deque[CandidateRecord] = deque()
        self._funnel: list[int] = []

        # Compile-thread state.
        self._tracker = FrontierTally()
        #: (time, metric calls executed this session, tokens, dollars) over the ETA window
        self._samples: deque[tuple[float, float, float, float]] = deque()
        #: metric calls, tokens and dollars per second when the rate-limit pause now holding the run began
        #: (None: no pause)
        self._rates_before_pause: tuple[float | None, ...] | None = None
        self._closed = False
        self._mode: str | None = None  # "bar", "log" or "off", decided at the first tick
        self._bar: Any = None
        self._exit = ExitStack()
        self._last_refresh = -math.inf
        self._last_line = -math.inf
        self._last_line_key: tuple[Any, ...] | None = None
        self._logged_best: float | None = None
        self._lock = threading.Lock()  # tick() and close() may race if a caller calls both from two threads
        self.lines_emitted = 0

    # ------------------------------------------------------------------ wiring
    def bind(self, source: ProgressSource) -> None:
        """Set the engine-state source (when it could not exist before the display). The run starts now:
        what came between the display and its source (setting up MLflow: an import, a new database, a
        server that does not answer for seconds) is not the search's elapsed time."""
        self._source = source
        if self._mode is None:
            self._t0 = self._clock()

    def around_the_bar(self) -> AbstractContextManager[Any]:
        """For code run on the compile thread between ticks (the evaluations replayed to MLflow's
        autolog): what it prints goes above the bar instead of through it."""
        if self._mode != "bar" or self._stream is not None:
            return nullcontext()
        return stdout_through_tqdm()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def mode(self) -> str | None:
        """``"bar"``, ``"log"`` or ``"off"`` once the first tick decided; None before."""
        return self._mode

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ engine-thread hooks (O(1))
    def on_evaluation(self, candidate: Candidate, split: Split, outcome: EvalOutcome) -> None:
        self._evaluations += 1

    def on_candidate(self, record: CandidateRecord) -> None:
        self._candidate_count += 1
        self._pending.append(record)

    def on_mutation(self, result: MutationResult, status: str) -> None:
        if status not in _TRIED_STATUSES:
            return
        reached = int(getattr(result, "rung_reached", 0) or 0)
        if status == "duplicate" and reached == 0:
            return  # known before it was evaluated: no child was scored
        if status == "budget_stopped" and not getattr(result, "children_tried", 0):
            return  # refused before a child was scored
        funnel = self._funnel
        while len(funnel) < reached + 1:  # at most the number of rungs: O(1) in practice
            funnel.append(0)
        for k in range(reached + 1):
            funnel[k] += 1

    # ------------------------------------------------------------------ compile thread
    def snapshot(self) -> ProgressSnapshot:
        """The current state (compile thread). Also feeds the ETA estimate."""
        now = self._clock()
        while self._pending:
            record = self._pending.popleft()
            self._tracker.add(record.index, record.val_scores)
        src = self._source
        calls = _safe(src, "metric_calls")
        if calls is None:
            calls = self._evaluations
        budget = _safe(src, "budget")
        best = _safe(src, "best")
        if best is None:
            best = self._tracker.best
        front = _safe(src, "frontier_size")
        if front is None and self._tracker.best is not None:
            front = self._tracker.size
        elapsed = now - self._t0
        paused = _safe(src, "paused_seconds")
        reflection_paused = _safe(src, "reflection_paused_seconds")
        in_flight = _safe(src, "evals_in_flight")
        tokens = _safe(src, "tokens")
        cost = _safe(src, "cost_usd")
        # the rates leave out what a resume replayed (in a burst at its start), the counts do not
        replayed = _safe(src, "replayed_calls") or 0
        now_sample = (now, float(calls - replayed), float(tokens or 0), float(cost or 0.0))
        used = (float(calls), float(tokens or 0), float(cost or 0.0))
        # a reflection's wait holds the ETA back only when nothing else runs meanwhile: the search waits on it
        held = max(paused or 0.0, (reflection_paused or 0.0) if in_flight == 0 else 0.0)
        # While a rate limit holds the run, the ETA is what is left of the pause plus the budget left at the
        # rate measured just before it: the pause's idle seconds filling the window drove a 208 s ETA to
        # 10,474 s. Once it ends the window runs on real time again, so a pause that keeps coming back (a
        # requests-per-minute cap) is in the rate, as it is in the throughput.
        if held <= 0.0:
            self._rates_before_pause = None
        elif self._rates_before_pause is None:
            self._rates_before_pause = self._rates(now_sample)
        self._samples.append(now_sample)
        # The window is at most the last half of the run: a search's throughput falls as it goes from the
        # seed's full-valset waves to minibatches that wait on reflections (a review measured 32 calls/s
        # falling to 16-20), and a 60 s window over a 40 s run kept the seed's burst in the rate, every
        # ETA a third short. It only grows, so no sample it drops is wanted again.
        window = min(self._eta_window, max(MIN_ETA_WINDOW_S, elapsed / 2))
        while len(self._samples) > 2 and now - self._samples[0][0] > window:
            self._samples.popleft()
        return ProgressSnapshot(
            elapsed=elapsed,
            metric_calls=int(calls),
            budget=None if budget is None else int(budget),
            best=None if best is None else float(best),
            frontier_size=None if front is None else int(front),
            candidates=self._candidate_count,
            evals_in_flight=in_flight,
            mutations_running=_safe(src, "mutations_running"),
            rung_funnel=tuple(self._funnel),
            backoffs=_safe(src, "backoffs"),
            eta_seconds=self._eta(now_sample, used, budget, elapsed, held),
            paused_seconds=None if paused is None else float(paused),
            reflection_paused_seconds=None if reflection_paused is None else float(reflection_paused),
            tokens=None if tokens is None else int(tokens),
            cost_usd=None if cost is None else float(cost),
            token_budget=self._token_budget,
            cost_budget_usd=self._cost_budget,
            failed=_safe(src, "failed_calls"),
        )

    def _rates(self, sample: tuple[float, float, float, float]) -> tuple[float | None, ...]:
        """Metric calls, tokens and dollars per second over the window; each None until a second has
        passed in which it grew."""
        if not self._samples:
            return (None, None, None)
        old = self._samples[0]
        dt = sample[0] - old[0]
        return tuple((new - was) / dt if dt >= 1.0 and new > was else None
                     for new, was in zip(sample[1:], old[1:], strict=True))

    def _eta(self, sample: tuple[float, float, float, float], used: tuple[float, float, float], budget: int | None,
             elapsed: float, paused: float = 0.0) -> float | None:
        """What is left of the budget, and of the token and dollar caps, at the recent rates (during a rate
        limit's pause, the rates from just before it), after what is left of the pause; never past the
        time budget. The soonest of them ends the run."""
        etas: list[float] = []
        rates = self._rates(sample) if self._rates_before_pause is None else self._rates_before_pause
        for limit, so_far, rate in zip((budget, self._token_budget, self._cost_budget), used, rates, strict=True):
            if limit and rate:
                etas.append(max(0.0, paused) + max(0.0, limit - so_far) / rate)
        if self._time_budget is not None:
            etas.append(max(0.0, self._time_budget - elapsed))
        return min(etas) if etas else None

    def tick(self) -> None:
        """Read the engine and update the display. Call on the compile thread, every ~0.2-1 s."""
        if not self._enabled or self._closed:
            return
        with self._lock:
            if self._mode is None:
                self._mode = self._choose_mode()
            if self._mode == "off":
                return
            now = self._clock()
            if self._mode == "bar":
                if now - self._last_refresh >= self._refresh_interval:
                    self._draw(self.snapshot())
                    self._last_refresh = now
            else:
                self._maybe_log(now)

    def close(self, stop_reason: str | None = None) -> None:
        """Final update: the bar is completed and left on screen; in logs, one closing line. Idempotent."""
        if not self._enabled or self._closed:
            return
        with self._lock:
            self._closed = True
            try:
                if self._mode is None:
                    self._mode = self._choose_mode()
                if self._mode == "off":
                    return
                snap = self.snapshot()
                snap = ProgressSnapshot(**{**snap.__dict__, "eta_seconds": None, "paused_seconds": None,
                                           "reflection_paused_seconds": None, "evals_in_flight": None,
                                           "mutations_running": None})
                if self._mode == "bar":
                    self._draw(snap, final_note=stop_reason)
                elif self._log.isEnabledFor(logging.INFO):
                    # "search ended", not "finished": the compile's result line, logged next, is the one
                    # that says the run finished (two "finished" lines read as two runs)
                    reason = f" ({stop_reason})" if stop_reason else ""
                    self._emit(f"{self._desc} search ended{reason}: {snap.log_line()}")
            finally:
                if self._bar is not None:
                    self._bar.close()
                    self._bar = None
                self._exit.close()

    # ------------------------------------------------------------------ internals
    def _choose_mode(self) -> str:
        if quiet_by_logging(self._log):
            return "off"
        interactive = self._interactive
        if interactive is None:
            stream = self._stream if self._stream is not None else sys.stderr
            try:
                interactive = bool(stream.isatty()) or _in_notebook()
            except (AttributeError, ValueError):
                interactive = False
        return "bar" if interactive else "log"

    def _draw(self, snap: ProgressSnapshot, final_note: str | None = None) -> None:
        if self._bar is None:
            self._bar = self._make_bar(snap.budget)
        bar = self._bar
        bar.ncols, bar.nrows = terminal_size(self._stream if self._stream is not None else sys.stderr)
        if snap.budget and bar.total != snap.budget:
            bar.total = snap.budget
        bar.n = min(snap.metric_calls, snap.budget) if snap.budget else snap.metric_calls
        parts = snap.fields()
        if snap.budget and snap.metric_calls > snap.budget:  # past it tqdm drops the total: say it instead
            parts.insert(0, f"{snap.metric_calls} metric calls, {snap.metric_calls - snap.budget} past the budget")
        if final_note:  # first: a narrow terminal cuts the end of the line, and why it stopped matters most
            parts.insert(0, final_note)
        bar.set_postfix_str(", ".join(parts), refresh=False)
        bar.refresh()

    def _make_bar(self, total: int | None) -> Any:
        from tqdm import tqdm

        stream = self._stream if self._stream is not None else sys.stderr
        if self._stream is None:
            # Log records written to the console while the bar is shown would tear it: route them
            # through tqdm.write (which clears and redraws the bar) until close().
            self._exit.enter_context(console_through_tqdm(
                (logging.root, logging.getLogger("dspy_turbogepa"), logging.getLogger("dspy"))))
        cols, rows = terminal_size(stream)
        return tqdm(
            total=total,
            file=stream,
            desc=self._desc,
            unit="call",
            ncols=cols,
            nrows=rows,
            leave=True,
            mininterval=0,  # we throttle ourselves (refresh_interval)
            smoothing=0,
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
            if total else "{desc} {n_fmt} calls [{elapsed}{postfix}]",
        )

    def _maybe_log(self, now: float) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        snap = self.snapshot()
        since = now - self._last_line
        new_best = snap.best is not None and (self._logged_best is None or snap.best > self._logged_best + SCORE_EPS)
        first = self.lines_emitted == 0
        interval = min(self._max_log_interval, max(self._log_interval, snap.elapsed / 20.0))
        # spend moves without metric calls too (reflections): it is worth a line on its way to a cap
        key = (snap.metric_calls, snap.best, snap.frontier_size, snap.candidates, snap.backoffs, snap.paused,
               snap.reflection_paused, snap.tokens, snap.cost_usd)
        if first and snap.metric_calls == 0 and snap.best is None:
            return  # nothing to say yet
        if new_best and (first or since >= self._best_log_gap):
            note = "" if self._logged_best is None else " (new best)"
            self._emit(f"{self._desc}{note}: {snap.log_line()}")
        elif since >= interval and key != self._last_line_key:
            self._emit(f"{self._desc}: {snap.log_line()}")
        else:
            return
        self._last_line = now
        self._last_line_key = key
        if snap.best is not None:
            self._logged_best = snap.best

    def _emit(self, line: str) -> None:
        self._log.info("%s", line)
        self.lines_emitted += 1


def _safe(source: Any, name: str) -> Any:
    """``source.name()``; None when there is no source, no such method, or it failed (never raise)."""
    if source is None:
        return None
    fn = getattr(source, name, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception:  # a display must never end the run
        logger.debug("progress source %s() failed", name, exc_info=True)
        return None
