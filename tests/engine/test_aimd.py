"""AIMD windows per LM endpoint: deterministic, driven by a fake clock (no real sleeping)."""

from __future__ import annotations

import asyncio

import pytest

from dspy_turbogepa.engine.aimd import AimdRegistry, AimdWindow


class FakeClock:
    """``clock()`` reads the fake time; ``sleep(d)`` advances it by ``d`` and yields once."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


def window(limit: int = 8, **kw) -> tuple[AimdWindow, FakeClock]:
    clock = FakeClock()
    return AimdWindow("ep", limit, clock=clock, sleep=clock.sleep, **kw), clock


def run(coro):
    return asyncio.run(coro)


def test_starts_at_the_limit_and_queues_beyond_it():
    async def main():
        w, _ = window(4)
        tickets = [await w.acquire() for _ in range(4)]
        assert (w.window, w.in_use) == (4, 4)
        late = asyncio.ensure_future(w.acquire())
        await asyncio.sleep(0)
        assert not late.done() and w.waiting == 1
        w.release(tickets[0])
        last = await late
        assert last.key == "ep" and w.in_use == 4
        for t in tickets[1:] + [last]:
            w.release(t)
        assert w.in_use == 0

    run(main())


def test_a_burst_of_429s_halves_the_window_once():
    async def main():
        w, _ = window(8)
        tickets = [await w.acquire() for _ in range(8)]
        for t in tickets[:6]:  # six rollouts rejected together, all sent under the old window
            w.release(t, "rate_limited")
        assert w.window == 4 and w.decreases == 1 and w.rate_limited == 6
        fresh = await w.acquire()  # granted after the decrease: its 429 is news
        w.release(fresh, "rate_limited")
        assert w.window == 2 and w.decreases == 2
        for t in tickets[6:]:
            w.release(t, "rate_limited")  # stale: no further decrease
        assert w.window == 2 and w.min_seen == 2

    run(main())


def test_never_below_min_window():
    async def main():
        w, _ = window(8, min_window=1)
        for _ in range(10):
            w.release(await w.acquire(), "rate_limited")
        assert w.window == 1 and w.min_seen == 1
        w2, _ = window(8, min_window=3)
        for _ in range(10):
            w2.release(await w2.acquire(), "rate_limited")
        assert w2.window == 3

    run(main())


def test_additive_increase_one_per_window_of_successes_up_to_the_limit():
    async def main():
        w, _ = window(5)
        for _ in range(2):
            w.release(await w.acquire(), "rate_limited")
        assert w.window == 1  # 5 -> 2 -> 1
        history = []
        for _ in range(20):
            w.release(await w.acquire(), "success")
            history.append(w.window)
        # +1 after 1 success at window 1, after 2 at window 2, after 3 at 3, after 4 at 4; capped at 5
        assert history[:10] == [2, 2, 3, 3, 3, 4, 4, 4, 4, 5]
        assert max(history) == 5 and w.increases == 4

    run(main())


def test_neutral_release_neither_grows_nor_shrinks():
    async def main():
        w, _ = window(4)
        w.release(await w.acquire(), "rate_limited")
        for _ in range(10):
            w.release(await w.acquire(), "neutral")
        assert w.window == 2

    run(main())


def test_cooldown_until_retry_after_is_shared():
    async def main():
        w, clock = window(8)
        t = await w.acquire()
        clock.t = 10.0
        w.release(t, "rate_limited", retry_after=5.0)
        assert w.cooldown_until == 15.0
        t2 = await w.acquire()  # must wait the cool-down out before it may send
        assert clock.t == 15.0 and clock.sleeps == [5.0]
        assert w.cooldown_wait_s == 5.0
        w.release(t2, "success")
        t3 = await w.acquire()  # no cool-down any more
        assert clock.t == 15.0 and len(clock.sleeps) == 1
        w.release(t3)

    run(main())


def test_cooldown_without_retry_after_uses_the_default():
    async def main():
        w, clock = window(8, default_cooldown_s=0.5)
        w.release(await w.acquire(), "rate_limited")
        await w.acquire()
        assert clock.sleeps == [0.5]
        w0, clock0 = window(8)  # no default: no cool-down at all
        w0.release(await w0.acquire(), "rate_limited")
        await w0.acquire()
        assert clock0.sleeps == []

    run(main())


def test_later_retry_after_extends_never_shortens_the_cooldown():
    async def main():
        w, _ = window(8)
        a, b = await w.acquire(), await w.acquire()
        w.release(a, "rate_limited", retry_after=9.0)
        w.release(b, "rate_limited", retry_after=2.0)
        assert w.cooldown_until == 9.0

    run(main())


def test_fifo_handoff_no_barging():
    async def main():
        w, _ = window(1)
        first = await w.acquire()
        order: list[str] = []

        async def take(name):
            t = await w.acquire()
            order.append(name)
            await asyncio.sleep(0)
            w.release(t)

        tasks = [asyncio.ensure_future(take(n)) for n in "abc"]
        await asyncio.sleep(0)  # all three are queued
        w.release(first)  # handed straight to "a"
        tasks.append(asyncio.ensure_future(take("late")))  # arrives now: must queue behind b and c
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c", "late"]
        assert w.in_use == 0

    run(main())


def test_shrinking_below_in_use_stops_grants_until_enough_are_released():
    async def main():
        w, _ = window(4)
        tickets = [await w.acquire() for _ in range(4)]
        w.release(tickets.pop(), "rate_limited")  # window 2, in use 3
        waiter = asyncio.ensure_future(w.acquire())
        await asyncio.sleep(0)
        w.release(tickets.pop())  # in use 2 == window: still no grant
        await asyncio.sleep(0)
        assert not waiter.done()
        w.release(tickets.pop())  # in use 1 < 2: granted
        await asyncio.sleep(0)
        assert waiter.done() and w.in_use == 2

    run(main())


def test_cancelled_waiter_does_not_leak_a_slot():
    async def main():
        w, _ = window(1)
        t = await w.acquire()
        waiter = asyncio.ensure_future(w.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        w.release(t)
        assert w.in_use == 0
        # granted and cancelled in the same tick: the slot goes back too
        t = await w.acquire()
        waiter = asyncio.ensure_future(w.acquire())
        await asyncio.sleep(0)
        w.release(t)  # hands the slot to the waiter...
        waiter.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert w.in_use == 0
        w.release(await w.acquire())

    run(main())


def test_registry_acquires_in_sorted_order_and_charges_only_the_named_endpoint():
    async def main():
        clock = FakeClock()
        reg = AimdRegistry(8, clock=clock, sleep=clock.sleep)
        tickets = await reg.acquire_all(["b", "a", "b"])
        assert [t.key for t in tickets] == ["a", "b"]
        reg.release_all(tickets, "rate_limited", retry_after=1.0, only={"b"})
        stats = reg.stats()
        assert stats["a"]["window"] == 8 and stats["a"]["rate_limited"] == 0
        assert stats["b"]["window"] == 4 and stats["b"]["min_window"] == 4 and stats["b"]["rate_limited"] == 1
        assert stats["a"]["in_use"] == stats["b"]["in_use"] == 0

    run(main())


def test_same_events_same_windows():
    """Pure function of the event sequence: two replays give identical stats."""

    async def replay():
        w, clock = window(16)
        for i in range(60):
            t = await w.acquire()
            clock.t += 0.1
            w.release(t, "rate_limited" if i % 13 == 5 else "success", retry_after=0.3 if i % 13 == 5 else None)
        return w.stats()

    assert run(replay()) == run(replay())


def test_validation():
    with pytest.raises(ValueError):
        AimdWindow("x", 0)
    with pytest.raises(ValueError):
        AimdWindow("x", 4, decrease=1.0)
    with pytest.raises(ValueError):
        AimdWindow("x", 4, min_window=5)


def test_a_long_pause_is_said_once_per_endpoint(caplog):
    """A quota's pauses looked like a hang (nothing logged); said on every pause, a storm of 10 s
    Retry-Afters for 30 minutes logged 180 warnings. Said once, at the first long pause."""
    import logging

    async def main():
        w, clock = window(4, max_cooldown_s=300.0)
        for _ in range(20):  # a storm: each pause ends, the next rollout is refused again
            ticket = await w.acquire()
            w.release(ticket, "rate_limited", retry_after=200.0)
            assert w.cooldown_until == clock.t + 200.0
        ticket = await w.acquire()
        w.release(ticket, "rate_limited", retry_after=2.0)  # short pauses are not news

    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        run(main())
    said = [r for r in caplog.records if "is rate limited and" in r.getMessage()]
    assert [r.levelno for r in said].count(logging.WARNING) == 1 and len(said) == 20
    first = said[0].getMessage()
    assert "asked to wait 200s (Retry-After)" in first and "ep is rate limited" in first

    caplog.clear()

    async def no_header():
        w, _ = window(4, default_cooldown_s=15.0)
        ticket = await w.acquire()
        w.release(ticket, "rate_limited")

    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        run(no_header())
    assert "gave no Retry-After; pausing 15s" in caplog.records[0].getMessage()


def test_a_pause_past_the_policy_parks_no_rollout():
    """A Retry-After of a day (a used-up quota) parked every rollout of the endpoint for the policy's 300 s,
    and each new refusal parked them again: a run needed 15 minutes to stop on 8 failures. The rollout
    that saw it gives up and stops the run; the others go on at once (the window still shrinks)."""

    async def main():
        w, clock = window(4, max_cooldown_s=300.0)
        first, second = await w.acquire(), await w.acquire()
        w.release(first, "rate_limited", retry_after=86_400.0)
        assert w.cooldown_until < clock.t and w.window == 2
        w.release(second, "neutral")
        await asyncio.wait_for(w.acquire(), timeout=1.0)  # no wait
        assert clock.t == 0.0

    run(main())


def test_stats_can_be_read_from_another_thread_while_the_loop_queues_waiters():
    """The progress line reads the windows' stats from the compile thread while the engine's loop queues
    and grants waiters; counting the waiters walked the deque itself, which raised "deque mutated during
    iteration" (a review saw it 4 times in a short run; the progress line then dropped its 429 fields)."""
    import threading

    w = AimdWindow("k", 1)
    errors: list[BaseException] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                w.stats()
                reads += 1
            except RuntimeError as exc:
                errors.append(exc)
                return

    async def user() -> None:
        ticket = await w.acquire()
        await asyncio.sleep(0)
        w.release(ticket, "success")

    async def main() -> None:
        for _ in range(100):  # without the fix the first few rounds raise
            await asyncio.gather(*(user() for _ in range(200)))
            if errors:
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        run(main())
    finally:
        stop.set()
        thread.join()
    assert not errors and reads > 0
