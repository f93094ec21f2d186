"""Evaluation slots: the one place where "evaluations in flight" is limited.

A plain semaphore serves waiters first-come-first-served. We serve the oldest mutation first
instead, so work that is closest to committing (and whose result the next parents depend on)
is never starved by a burst of fresh rung-0 evaluations.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PrioritySlots:
    """A counting semaphore whose waiters are woken lowest priority value first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._in_use = 0
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()
        self.peak_in_use = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, f in self._waiters if not f.done())

    def set_capacity(self, capacity: int) -> None:
        """Resize the window (rate-limit control shrinks and grows it while the run goes on)."""
        self._capacity = max(1, capacity)
        self._wake()

    async def acquire(self, priority: float) -> None:
        if self._in_use < self._capacity and not self._waiters:
            self._take()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._counter), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # We were granted a slot but cancelled before using it: hand it on.
                self.release()
            raise

    def _take(self) -> None:
        self._in_use += 1
        self.peak_in_use = max(self.peak_in_use, self._in_use)

    def release(self) -> None:
        self._in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._capacity:
            _, _, fut = heapq.heappop(self._waiters)
            if fut.done():
                continue
            self._take()
            fut.set_result(None)

    @asynccontextmanager
    async def slot(self, priority: float) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()
