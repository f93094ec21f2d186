"""Errors the engine raises on purpose (everything else is a bug and propagates as is)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection
from typing import Any, TypeVar

T = TypeVar("T")

#: What the user's code (a program, a metric, a proposer) may raise that is recorded as its failure
#: instead of ending the run. ``asyncio.CancelledError`` is a ``BaseException``, but user code raises it
#: too (``asyncio.run`` of a coroutine whose task was cancelled, a client library's timeout); run in a
#: worker thread it is never the engine's own cancellation, which only ever cancels the engine's tasks.
USER_CODE_ERRORS: tuple[type[BaseException], ...] = (Exception, asyncio.CancelledError)


def cancelling() -> bool:
    """Whether the running task is being cancelled (by the engine), as opposed to user code raising
    ``CancelledError`` inside it. Before Python 3.11 this cannot be told: every one counts as ours."""
    task = asyncio.current_task()
    return task is None or not hasattr(task, "cancelling") or being_cancelled(task)


def being_cancelled(task: asyncio.Task[Any]) -> bool:
    """Whether a cancel of ``task`` is already pending (always False before Python 3.11, which cannot tell)."""
    probe = getattr(task, "cancelling", None)
    return probe is not None and probe() > 0


class SystemicFailureError(RuntimeError):
    """The run cannot make progress: an error no retry can fix (a bad key, an unknown model, ...), the
    first evaluations of a split all failing, the first reflections all failing, or a stop callback or
    component selector that cannot work. ``failure`` names the kind of cause, ``error_type`` the
    exception type when one was raised.

    dspy.GEPA scores failed evaluations as ``failure_score`` and "succeeds" with the seed program; we
    stop early instead, naming the cause, so no budget is burnt on a broken setup.
    """

    def __init__(self, message: str, *, failure: str | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.failure = failure
        self.error_type = error_type


class RunInterruptedError(RuntimeError):
    """The run was stopped and its in-flight work cancelled before the seed program's validation
    finished, so there is no evaluated program to return. Evaluations that did finish were reported
    to the observers (and so kept by a run store: a resumed run does not pay for them again)."""


class PaidCallRefused(Exception):
    """A token or dollar cap refused an LM call that had to be paid for (an evaluation or a reflection
    not in the run store). Raised inside a mutation, which then ends as ``budget_stopped``.

    Why at the call, not only before a launch: a cap checked before each launch lets the work in flight
    finish past it, and a resumed run would have to count the stored usage before replaying it, which
    stops it short of what the first session found. Refusing the paid call itself keeps the cap for
    every session (stored work replays for free, nothing new is paid past it).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the {reason.replace('_', ' ')} is used up")
        self.reason = reason


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a task's exception retrieved: its caller raises something else (the cancellation)."""
    if not task.cancelled():
        task.exception()


async def all_of(*awaitables: Awaitable[T]) -> list[T]:
    """Every result, in order; at the first error, the others are cancelled and it is raised, except a
    cap's refusal: then the others finish first (their calls already on the wire are paid for, and their
    answers are stored for a rerun) and another error they raise wins over the refusal (of several, the
    first in the order the awaitables were given, so the error a run reports does not depend on timing).

    Why not plain ``gather``: it raises at the first error and leaves the others running past the
    mutation's commit; a systemic failure must stop its siblings at once.
    """
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        # Cancelled (Ctrl-C's cancel_in_flight, or the run's own cleanup): the others are cancelled and
        # waited for, so no evaluation holds a slot or runs its cleanup after the run has returned. A second
        # cancel while waiting propagates: whoever sends it has stopped waiting too.
        for t in tasks:
            t.cancel()
        try:
            await asyncio.wait(tasks)
        finally:  # also when cancelled again meanwhile: no "Task exception was never retrieved" for the others
            for t in tasks:
                t.add_done_callback(_retrieve)  # runs at once (soon) for one already done
        raise
    def errors_in_order(finished: Collection[asyncio.Future[T]]) -> list[BaseException]:
        # done and pending are sets: read them in the awaitables' order
        return [e for t in tasks if t in finished and not t.cancelled() and (e := t.exception()) is not None]

    errors = errors_in_order(done)
    if pending and all(isinstance(e, PaidCallRefused) for e in errors):
        await asyncio.gather(*(t for t in tasks if t in pending), return_exceptions=True)
        errors = errors_in_order(tasks)
    elif pending:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if errors:  # another error (a systemic failure) wins over a refusal; min keeps the first of equals
        raise min(errors, key=lambda e: isinstance(e, PaidCallRefused))
    return [t.result() for t in tasks]
