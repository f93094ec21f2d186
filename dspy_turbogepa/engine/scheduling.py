"""Evaluation slots: the one place where "evaluations in flight" is limited.

A plain semaphore serves waiters first-come-first-served. We serve the oldest mutation first
instead, so work that is closest to committing (and whose result the next parents depend on)
is never starved by a burst of fresh rung-0 evaluations.

The slots also keep the account behind "how much of the allowed concurrency was used while work
was available": the time integral of slots in use and of the demand (slots in use plus evaluations
waiting for one, capped at the window). A scheduler that leaves a slot idle while an evaluation
waits shows up as use below demand; a search that has little to evaluate does not.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotUse:
    """Slot-seconds over a run: ``busy`` = integral of slots in use, ``demand`` = integral of
    min(in use + waiting, window). ``busy / demand`` is the share of the allowed concurrency used
    while work was available (1.0 for a work-conserving scheduler, measured, not assumed)."""

    window: int
    busy_slot_seconds: float
    demand_slot_seconds: float
    seconds_with_demand: float

    @property
    def utilisation_while_work_available(self) -> float | None:
        return self.busy_slot_seconds / self.demand_slot_seconds if self.demand_slot_seconds > 0 else None

    def to_dict(self) -> dict[str, float | int | None]:
        util = self.utilisation_while_work_available
        return {
            "window": self.window,
            "busy_slot_seconds": round(self.busy_slot_seconds, 6),
            "demand_slot_seconds": round(self.demand_slot_seconds, 6),
            "seconds_with_demand": round(self.seconds_with_demand, 6),
            "utilisation_while_work_available": None if util is None else round(util, 6),
        }


class PrioritySlots:
    """A counting semaphore whose waiters are woken lowest priority value first."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._window = capacity  # the allowed concurrency, as configured (set_capacity may lower it)
        self._in_use = 0
        self._pending = 0  # acquirers not yet granted a slot
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()
        self.peak_in_use = 0
        self._clock = clock
        self._last: float | None = None
        self._busy = self._demand = self._with_demand = 0.0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return self._pending

    def use(self) -> SlotUse:
        """The slot-seconds so far (up to now)."""
        self._tick()
        return SlotUse(self._window, self._busy, self._demand, self._with_demand)

    def _tick(self) -> None:
        """Close the interval since the last change of in-use or waiting counts."""
        now = self._clock()
        if self._last is not None and now > self._last:
            demand = min(self._in_use + self._pending, self._window)
            if demand:
                dt = now - self._last
                self._busy += min(self._in_use, self._window) * dt
                self._demand += demand * dt
                self._with_demand += dt
        self._last = now

    def set_capacity(self, capacity: int) -> None:
        """Resize the window while the run goes on. The engine does not today (rate limits are
        handled per LM endpoint inside a slot, by the adapter's AIMD windows); the slot account
        measures use against the window configured at construction either way."""
        self._tick()
        self._capacity = max(1, capacity)
        self._wake()

    async def acquire(self, priority: float) -> None:
        if self._in_use < self._capacity and not self._pending:
            self._tick()
            self._take()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._counter), fut))
        self._tick()
        self._pending += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # We were granted a slot but cancelled before using it: hand it on.
                self.release()
            else:  # still waiting: no longer demand
                self._tick()
                self._pending -= 1
                # A slot freed between our cancellation and this handler found no live waiter to
                # wake, and an acquirer that came meanwhile queued behind us: hand it the slot now.
                self._wake()
            raise

    def _take(self) -> None:
        self._in_use += 1
        self.peak_in_use = max(self.peak_in_use, self._in_use)

    def release(self) -> None:
        self._tick()
        self._in_use -= 1
        self._wake()  # a waiter takes the freed slot at the same instant

    def _wake(self) -> None:
        """Grant free slots to waiters, lowest priority value first. Every caller has just closed
        the account's interval (``_tick``), so a grant changes the counts at that same instant."""
        while self._waiters and self._in_use < self._capacity:
            _, _, fut = heapq.heappop(self._waiters)
            if fut.done():
                continue
            self._pending -= 1
            self._take()
            fut.set_result(None)

    @asynccontextmanager
    async def slot(self, priority: float) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()
