"""AIMD concurrency windows, one per LM endpoint: back off on rate limits, probe upwards on success.

Pure (no DSPy, no I/O): the clock and the sleep are injected, so tests drive it with a fake clock.

A window is the number of rollouts allowed to run at once against one endpoint (model + api_base).
It starts at the engine's in-flight limit and

- shrinks multiplicatively on a rate limit (``x decrease``, at least ``min_window``), at most once per
  "round": a 429 from a rollout that started before the last decrease was sent under the old, larger
  window and says nothing new, so a burst of simultaneous 429s halves the window once, not 24 times
  (TCP's one reduction per round trip);
- grows additively on success: +1 after a window's worth of successes, up to the limit;
- after a 429, imposes a shared cool-down until the server's Retry-After has passed, so the other
  rollouts do not keep hammering an endpoint that has just said "not now".

Slots are handed over FIFO (a release gives its slot straight to the oldest waiter: no barging), and
a rollout granted a slot during a cool-down waits the cool-down out before it is told to go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]
Outcome = Literal["success", "rate_limited", "neutral"]

logger = logging.getLogger(__name__)

#: A cool-down at least this long is said at WARNING when it starts: every rollout of the endpoint waits
#: it out, and nothing else shows on the progress line (a quota that resets in minutes looks like a hang).
LONG_COOLDOWN_S = 10.0

__all__ = ["AimdRegistry", "AimdWindow", "Ticket"]


@dataclass(frozen=True)
class Ticket:
    """Proof of one acquired slot: which window, the decrease epoch it was granted in, how long it
    waited out a cool-down once it had the slot (a rate limit's pause, which a retry policy counts), and
    whether the cool-down outlasted the wait the caller allowed (it must not send, then)."""

    key: str
    epoch: int
    cooldown_s: float = 0.0
    cut_short: bool = False


class AimdWindow:
    """The concurrency window of one endpoint. Use from a single event loop; :meth:`stats` may also be read
    from another thread (the progress line reads it from the compile thread)."""

    def __init__(
        self,
        key: str,
        limit: int,
        *,
        decrease: float = 0.5,
        min_window: int = 1,
        default_cooldown_s: float = 0.0,
        max_cooldown_s: float = math.inf,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """``max_cooldown_s``: the longest pause a Retry-After may impose on the endpoint. A longer one
        (a quota reset a day away) imposes none: the rollout that saw it gives up at once and stops the
        run (see DspyEvaluator), which parking every other rollout first would only delay."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        if not 0.0 < decrease < 1.0:
            raise ValueError(f"decrease must be in (0, 1), got {decrease}")
        if not 1 <= min_window <= limit:
            raise ValueError(f"min_window must be in [1, limit], got {min_window}")
        self.key = key
        self.limit = limit
        self.decrease = decrease
        self.min_window = min_window
        self.default_cooldown_s = max(0.0, default_cooldown_s)
        self.max_cooldown_s = max(0.0, max_cooldown_s)
        self._long_pause_reported = False
        self._clock = clock
        self._sleep = sleep
        self._window = limit
        self._in_use = 0
        self._epoch = 0
        self._successes = 0
        self._cooldown_until = -math.inf
        self._waiters: deque[asyncio.Future[None]] = deque()
        # counters
        self.min_seen = limit
        self.rate_limited = 0
        self.decreases = 0
        self.increases = 0
        self.grants = 0
        self.cooldown_wait_s = 0.0

    # ------------------------------------------------------------------ state
    @property
    def window(self) -> int:
        return self._window

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        # tuple() copies the deque in one step under the GIL: a generator over the deque itself raises
        # "deque mutated during iteration" when the loop adds or grants a waiter meanwhile
        return sum(1 for w in tuple(self._waiters) if not w.done())

    @property
    def cooldown_until(self) -> float:
        return self._cooldown_until

    def stats(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "window": self._window,
            "min_window": self.min_seen,
            "limit": self.limit,
            "in_use": self._in_use,
            "waiting": self.waiting,
            "rate_limited": self.rate_limited,
            "decreases": self.decreases,
            "increases": self.increases,
            "grants": self.grants,
            "cooldown_wait_s": self.cooldown_wait_s,
            "cooldown_remaining_s": max(0.0, self._cooldown_until - now),
        }

    # ------------------------------------------------------------------ acquire / release
    async def acquire(self, max_cooldown_s: float | None = None) -> Ticket:
        """Wait for a slot (FIFO), then for the end of any cool-down, or ``max_cooldown_s`` of it (a retry
        with that much left of its policy: waiting longer would outlast the policy, so the ticket comes
        back ``cut_short``); returns the ticket to release."""
        if self._in_use < self._window and not self._waiters:
            self._in_use += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._give_back()  # the slot was handed to us just before the cancellation
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):  # already handed over and removed
                        self._waiters.remove(waiter)
                raise
        # We hold a slot. A cool-down (from a 429 seen by anyone) must pass before we may send.
        cooled = 0.0
        cut_short = False
        try:
            while True:
                remaining = self._cooldown_until - self._clock()
                if remaining <= 0:
                    break
                if max_cooldown_s is not None:
                    if cooled >= max_cooldown_s:
                        cut_short = True
                        break
                    remaining = min(remaining, max_cooldown_s - cooled)
                self.cooldown_wait_s += remaining
                cooled += remaining
                await self._sleep(remaining)
        except BaseException:
            self._give_back()
            raise
        self.grants += 1
        return Ticket(self.key, self._epoch, cooled, cut_short)

    def release(self, ticket: Ticket, outcome: Outcome = "neutral", retry_after: float | None = None) -> None:
        """Give the slot back, recording what the rollout saw: ``success`` grows the window,
        ``rate_limited`` shrinks it (once per round) and starts a cool-down, ``neutral`` neither."""
        if ticket.key != self.key:
            raise ValueError(f"ticket for {ticket.key!r} released on window {self.key!r}")
        if outcome == "success":
            self._on_success()
        elif outcome == "rate_limited":
            self._on_rate_limit(ticket, retry_after)
        elif outcome != "neutral":
            raise ValueError(f"unknown outcome {outcome!r}")
        self._give_back()

    # ------------------------------------------------------------------ internals
    def _on_success(self) -> None:
        self._successes += 1
        if self._successes >= self._window:
            self._successes = 0
            if self._window < self.limit:
                self._window += 1
                self.increases += 1

    def _on_rate_limit(self, ticket: Ticket, retry_after: float | None) -> None:
        self.rate_limited += 1
        if ticket.epoch == self._epoch:
            new = max(self.min_window, int(self._window * self.decrease))
            if new < self._window:
                self.decreases += 1
            self._window = new
            self.min_seen = min(self.min_seen, new)
            self._epoch += 1
            self._successes = 0
        pause = retry_after if retry_after is not None and retry_after >= 0 else self.default_cooldown_s
        if pause > self.max_cooldown_s:
            # A wait past every rollout's policy (a quota that resets tomorrow): the rollout that saw it gives
            # up at once and the run stops on it; parking the others first would only delay that stop.
            logger.debug("%s asked to wait %.0fs (Retry-After), past the %.0fs a rollout may wait: no pause",
                         self.key, pause, self.max_cooldown_s)
            return
        if pause > 0:
            now = self._clock()
            if pause >= LONG_COOLDOWN_S and self._cooldown_until <= now:  # a new pause, not one extended
                # at WARNING the first time (a storm of 10 s pauses would say it every 10 s), then DEBUG
                first, self._long_pause_reported = not self._long_pause_reported, True
                asked = (f"asked to wait {pause:.0f}s (Retry-After)" if retry_after is not None and retry_after >= 0
                         else f"gave no Retry-After; pausing {pause:.0f}s")
                logger.log(
                    logging.WARNING if first else logging.DEBUG,
                    "%s is rate limited and %s: its rollouts pause until then%s.", self.key, asked,
                    " (further long pauses of this endpoint are logged at DEBUG; see "
                    "run_stats['rate_limits'])" if first else "")
            self._cooldown_until = max(self._cooldown_until, now + pause)

    def _give_back(self) -> None:
        self._in_use -= 1
        self._grant()

    def _grant(self) -> None:
        """Hand free slots to the oldest live waiters (they are counted in use from here on)."""
        while self._waiters and self._in_use < self._window:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._in_use += 1
            waiter.set_result(None)


class AimdRegistry:
    """The windows of all endpoints, created on first use with the same settings."""

    def __init__(
        self,
        limit: int,
        *,
        decrease: float = 0.5,
        min_window: int = 1,
        default_cooldown_s: float = 0.0,
        max_cooldown_s: float = math.inf,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.limit = limit
        self._kwargs: dict[str, Any] = {
            "decrease": decrease, "min_window": min_window, "default_cooldown_s": default_cooldown_s,
            "max_cooldown_s": max_cooldown_s, "clock": clock, "sleep": sleep,
        }
        self._windows: dict[str, AimdWindow] = {}

    def window(self, key: str) -> AimdWindow:
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = AimdWindow(key, self.limit, **self._kwargs)
        return w

    def windows(self) -> dict[str, AimdWindow]:
        return dict(self._windows)

    async def acquire_all(self, keys: Iterable[str], max_cooldown_s: float | None = None) -> list[Ticket]:
        """One slot in each distinct window, taken in sorted key order (no lock-order deadlock); their
        cool-downs together waited out for at most ``max_cooldown_s``."""
        tickets: list[Ticket] = []
        try:
            for key in sorted(set(keys)):
                left = None if max_cooldown_s is None else max(0.0, max_cooldown_s - sum(t.cooldown_s for t in tickets))
                tickets.append(await self.window(key).acquire(left))
        except BaseException:
            self.release_all(tickets)
            raise
        return tickets

    def release_all(
        self,
        tickets: Sequence[Ticket],
        outcome: Outcome = "neutral",
        retry_after: float | None = None,
        only: Iterable[str] | None = None,
    ) -> None:
        """Release every ticket; ``outcome`` applies to the keys in ``only`` (all when None), the rest
        are released neutrally."""
        chosen = set(only) if only is not None else None
        for t in tickets:
            hit = chosen is None or t.key in chosen
            self.window(t.key).release(t, outcome if hit else "neutral", retry_after if hit else None)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {key: w.stats() for key, w in sorted(self._windows.items())}
