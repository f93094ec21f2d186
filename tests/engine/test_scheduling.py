"""PrioritySlots: a counting semaphore serving the lowest priority value first."""

from __future__ import annotations

import asyncio

import pytest

from dspy_turbogepa.engine.scheduling import PrioritySlots


async def settle(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_capacity_is_respected_and_peak_tracked() -> None:
    async def main() -> tuple[int, int]:
        slots = PrioritySlots(3)
        active = peak = 0

        async def worker(i: int) -> None:
            nonlocal active, peak
            async with slots.slot(priority=i % 4):
                active += 1
                peak = max(peak, active)
                assert slots.in_use <= slots.capacity
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                active -= 1

        await asyncio.gather(*(worker(i) for i in range(20)))
        assert slots.in_use == 0 and slots.waiting == 0
        return peak, slots.peak_in_use

    assert asyncio.run(main()) == (3, 3)


def test_lowest_priority_value_served_first_fifo_among_equals() -> None:
    async def main() -> list[str]:
        slots = PrioritySlots(1)
        order: list[str] = []
        await slots.acquire(0)  # hold the only slot

        async def waiter(name: str, prio: float) -> None:
            async with slots.slot(prio):
                order.append(name)
                await asyncio.sleep(0)

        tasks = []
        for name, prio in [("p5", 5), ("p1a", 1), ("p3", 3), ("p1b", 1), ("pneg", -1)]:
            tasks.append(asyncio.create_task(waiter(name, prio)))
            await settle(1)
        assert slots.waiting == 5
        slots.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == ["pneg", "p1a", "p1b", "p3", "p5"]


def test_free_slot_is_taken_without_waiting() -> None:
    async def main() -> None:
        slots = PrioritySlots(2)
        await slots.acquire(100)
        await slots.acquire(100)
        assert slots.in_use == 2 and slots.waiting == 0
        slots.release()
        slots.release()
        assert slots.in_use == 0

    asyncio.run(main())


def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def main() -> None:
        slots = PrioritySlots(1)
        await slots.acquire(0)
        waiter = asyncio.create_task(slots.acquire(1))
        await settle()
        assert slots.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.waiting == 0
        slots.release()
        assert slots.in_use == 0
        await asyncio.wait_for(slots.acquire(2), 1.0)  # the slot is free again
        assert slots.in_use == 1

    asyncio.run(main())


def test_waiter_cancelled_after_being_granted_hands_the_slot_on() -> None:
    async def main() -> None:
        slots = PrioritySlots(1)
        await slots.acquire(0)
        granted = asyncio.create_task(slots.acquire(1))
        nxt = asyncio.create_task(slots.acquire(2))
        await settle()
        slots.release()  # grants `granted` (in_use back to 1) ...
        assert slots.in_use == 1
        granted.cancel()  # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await granted
        await asyncio.wait_for(nxt, 1.0)  # the slot went to the next waiter
        assert slots.in_use == 1 and slots.waiting == 0
        slots.release()
        assert slots.in_use == 0

    asyncio.run(main())


def test_cancelling_many_waiters_keeps_accounting_exact() -> None:
    async def main() -> None:
        slots = PrioritySlots(2)
        done: list[int] = []

        async def worker(i: int) -> None:
            async with slots.slot(i):
                await asyncio.sleep(0)
                done.append(i)

        tasks = [asyncio.create_task(worker(i)) for i in range(30)]
        await settle(1)
        for t in tasks[5::3]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert slots.in_use == 0 and slots.waiting == 0
        assert len(done) == 30 - len(tasks[5::3])
        await asyncio.wait_for(slots.acquire(0), 1.0)

    asyncio.run(main())


def test_set_capacity_grows_and_wakes_waiters() -> None:
    async def main() -> None:
        slots = PrioritySlots(1)
        await slots.acquire(0)
        waiters = [asyncio.create_task(slots.acquire(i)) for i in range(3)]
        await settle()
        assert slots.waiting == 3
        slots.set_capacity(3)
        await settle()
        assert slots.capacity == 3 and slots.in_use == 3
        assert sum(w.done() for w in waiters) == 2
        assert waiters[0].done() and waiters[1].done()  # lowest priorities first
        slots.set_capacity(4)
        await asyncio.wait_for(waiters[2], 1.0)
        assert slots.in_use == 4

    asyncio.run(main())


def test_set_capacity_shrinks_until_usage_drops() -> None:
    async def main() -> None:
        slots = PrioritySlots(3)
        for _ in range(3):
            await slots.acquire(0)
        slots.set_capacity(1)
        waiter = asyncio.create_task(slots.acquire(0))
        await settle()
        slots.release()  # 2 in use, capacity 1: still no room
        await settle()
        assert not waiter.done() and slots.in_use == 2
        slots.release()  # 1 in use: still full
        await settle()
        assert not waiter.done()
        slots.release()  # 0 in use: the waiter gets the only slot
        await asyncio.wait_for(waiter, 1.0)
        assert slots.in_use == 1
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slots.acquire(0), 0.01)
        slots.set_capacity(0)  # clamped to 1
        assert slots.capacity == 1

    asyncio.run(main())


def test_slot_released_on_exception() -> None:
    async def main() -> None:
        slots = PrioritySlots(1)
        with pytest.raises(KeyError):
            async with slots.slot(0):
                raise KeyError("boom")
        assert slots.in_use == 0

    asyncio.run(main())


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PrioritySlots(0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slot_account_integrates_use_and_demand_capped_at_the_window() -> None:
    """2 slots, 3 evaluations wanting one: demand is capped at the window, and a waiter counts as
    demand until it is served; idle time (nothing in use or waiting) counts for neither."""

    async def main() -> None:
        clock = FakeClock()
        slots = PrioritySlots(2, clock)
        await slots.acquire(0)
        clock.now = 1.0  # 1 s: 1 in use, demand 1
        await slots.acquire(0)
        clock.now = 3.0  # 2 s: 2 in use, demand 2
        third = asyncio.create_task(slots.acquire(0))
        await settle()
        assert slots.waiting == 1
        clock.now = 4.0  # 1 s: 2 in use, 1 waiting -> demand capped at 2
        slots.release()  # the waiter takes the freed slot at once
        await asyncio.wait_for(third, 1.0)
        clock.now = 6.0  # 2 s: 2 in use
        slots.release()
        slots.release()
        clock.now = 100.0  # idle: neither use nor demand
        use = slots.use()
        assert use.window == 2
        assert use.busy_slot_seconds == pytest.approx(1 + 2 * 2 + 2 * 1 + 2 * 2)
        assert use.demand_slot_seconds == pytest.approx(use.busy_slot_seconds)
        assert use.seconds_with_demand == pytest.approx(6.0)
        assert use.utilisation_while_work_available == pytest.approx(1.0)

    asyncio.run(main())


async def one_in_use_one_waiting() -> tuple[FakeClock, PrioritySlots, asyncio.Task[None]]:
    """A window of 2 lowered to 1: one slot in use, one acquirer waiting, at t = 0."""
    clock = FakeClock()
    slots = PrioritySlots(2, clock)
    slots.set_capacity(1)
    await slots.acquire(0)
    waiter = asyncio.create_task(slots.acquire(0))
    await settle()
    return clock, slots, waiter


def test_slot_account_shows_a_lowered_window_leaving_work_waiting() -> None:
    """A window lowered below the configured one (set_capacity) while work waits is use below
    demand: the account is measured against the allowed window, not assumed to be full."""

    async def main() -> None:
        clock, slots, waiter = await one_in_use_one_waiting()
        clock.now = 2.0  # 2 s: 1 in use, 1 waiting -> demand 2
        slots.release()
        await asyncio.wait_for(waiter, 1.0)
        clock.now = 3.0  # 1 s: 1 in use, demand 1
        slots.release()
        use = slots.use()
        assert use.busy_slot_seconds == pytest.approx(3.0)
        assert use.demand_slot_seconds == pytest.approx(5.0)
        assert use.utilisation_while_work_available == pytest.approx(0.6)
        assert use.to_dict()["utilisation_while_work_available"] == pytest.approx(0.6)

    asyncio.run(main())


def test_a_cancelled_waiter_stops_counting_as_demand() -> None:
    async def main() -> None:
        clock, slots, waiter = await one_in_use_one_waiting()
        clock.now = 1.0  # 1 s: 1 in use, 1 waiting -> demand 2
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        clock.now = 5.0  # 4 s: 1 in use, nothing waiting -> demand 1
        slots.release()
        use = slots.use()
        assert use.busy_slot_seconds == pytest.approx(5.0) and use.demand_slot_seconds == pytest.approx(6.0)
        assert slots.waiting == 0

    asyncio.run(main())


def test_no_demand_means_no_utilisation_figure() -> None:
    assert PrioritySlots(4).use().utilisation_while_work_available is None


def test_a_slot_freed_while_a_cancelled_waiter_unwinds_goes_to_the_next_acquirer() -> None:
    """B waits for the only slot; B is cancelled and the slot released in the same step, and C
    asks for a slot before B's cancellation is handled: C must get the slot, not wait forever."""

    async def main() -> None:
        slots = PrioritySlots(1)
        await slots.acquire(0)  # A holds the slot
        b = asyncio.create_task(slots.acquire(0))
        await settle()

        def cancel_b_and_release() -> None:
            b.cancel()
            slots.release()

        # run order: the callback, then C's first step (scheduled before B's cancellation is), then B's handler
        asyncio.get_running_loop().call_soon(cancel_b_and_release)
        c = asyncio.create_task(slots.acquire(0))
        await asyncio.wait_for(c, 1.0)
        with pytest.raises(asyncio.CancelledError):
            await b
        assert slots.in_use == 1 and slots.waiting == 0

    asyncio.run(main())
