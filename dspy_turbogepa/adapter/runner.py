"""Running the engine's coroutine from a synchronous ``compile()``, wherever compile is called.

The engine always gets a private event loop in a dedicated thread, started in a copy of the caller's
context (so ``dspy.context(lm=...)`` set around ``compile()`` still applies). This works the same from a
script, from Jupyter or FastAPI (where the calling thread already runs a loop), and it keeps the
calling thread free to notice Ctrl-C: a KeyboardInterrupt stops launching new work, lets in-flight
calls finish for a short grace period, then cancels the rest and returns what was found.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from dspy_turbogepa.redaction import describe_error, describe_traceback
from dspy_turbogepa.tracking.imports import ctrl_c_held

logger = logging.getLogger(__name__)

T = TypeVar("T")


@contextlib.contextmanager
def sigint_raises_keyboard_interrupt() -> Iterator[None]:
    """Let Ctrl-C raise KeyboardInterrupt in the calling thread for the block, when ``asyncio.run`` (or an
    ``asyncio.Runner``) holds SIGINT.

    Why: a compile called from a coroutine run by ``asyncio.run`` blocks the loop's thread, and the
    runner's handler only cancels its main task, which cannot run until compile returns: the first
    Ctrl-C did nothing, the search ran to its budget, and the cancellation then lost the program it
    returned. With Python's own handler back for the block, Ctrl-C stops the search as it does in a
    script; the runner's handler is put back after, unless code that ran on the compile thread meanwhile
    (a DSPy callback, a tracking hook; the program and the metric run on worker threads, which cannot)
    installed a handler of its own, which stays, as asyncio's runner does it. Any other
    handler (the user's own) is left alone.
    """
    handler = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    # the runner's handler is functools.partial(runner._on_sigint, main_task=...) (Python 3.11+; 3.10's
    # asyncio.run installs none)
    runner_class = getattr(asyncio, "Runner", None)
    bound_to = getattr(getattr(handler, "func", None), "__self__", None)
    if runner_class is None or not isinstance(handler, functools.partial) or not isinstance(bound_to, runner_class):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, handler)


#: Set on a KeyboardInterrupt that the run's own thread raised (the program, the metric or a callback
#: raised it; Ctrl-C lands in the calling thread): not a second press, whatever it says.
RAISED_IN_RUN = "_turbogepa_raised_in_run"


def run_coroutine_in_thread(
    make_coro: Callable[[], Coroutine[Any, Any, T]],
    on_interrupt: Callable[[], None] | None = None,
    on_grace_expired: Callable[[], None] | None = None,
    grace_seconds: float = 10.0,
    on_tick: Callable[[], None] | None = None,
) -> T:
    """Run ``make_coro()`` on a private loop in a worker thread; the calling thread waits.

    ``on_tick`` runs on the *calling* thread every ~0.2 s and once at the end: work that must happen
    on the thread that called compile (MLflow's active run is thread-local; a progress bar redraws
    there) is handed to it.
    """
    ctx = contextvars.copy_context()
    box: dict[str, Any] = {}

    finished = threading.Event()

    def target() -> None:
        try:
            box["result"] = ctx.run(asyncio.run, make_coro())
        except BaseException as exc:  # handed back to the calling thread and re-raised there  # noqa: BLE001
            box["error"] = exc
        finally:
            finished.set()

    thread = threading.Thread(target=target, name="turbogepa-engine", daemon=True)
    started = False
    interrupted = False
    hook_failures = [0]
    # Wait on an Event, not Thread.join: a KeyboardInterrupt that lands inside join() can leave the
    # thread looking finished while it still runs (CPython gh-90882).
    while not finished.is_set():
        try:
            if not started:
                # Ctrl-C held while the thread starts, then handled below as the first press: landing in
                # start() (which waits for the new thread to run, and under load the run may already be
                # evaluating) it escaped as an abort, said to be a second Ctrl-C, with no grace period
                with ctrl_c_held():
                    thread.start()
                    started = True
            _wait_ticking(finished, on_tick, hook_failures)
        except KeyboardInterrupt:
            if interrupted or not started:  # a second press; or one before the run started: nothing to keep
                raise
            interrupted = True
            logger.warning(
                "Interrupted: no new mutation will start; the work already under way (its queued evaluations, "
                "and the seed program's validation, included) gets up to %.0fs to finish (press Ctrl-C again to "
                "abort at once).", grace_seconds,
            )
            if on_interrupt is not None:
                on_interrupt()
            _wait_ticking(finished, on_tick, hook_failures, until=time.monotonic() + grace_seconds)
            if not finished.is_set() and on_grace_expired is not None:
                on_grace_expired()
    if on_tick is not None:
        try:
            _tick(on_tick, hook_failures)
        except KeyboardInterrupt:  # the run has ended: its result is returned, not lost to a late Ctrl-C
            if interrupted:
                raise
            logger.warning("Interrupted after the run ended: returning its result.")
    if "error" in box:
        if isinstance(box["error"], KeyboardInterrupt):  # the user's code raised it there: no press
            setattr(box["error"], RAISED_IN_RUN, True)
        raise box["error"]
    return box["result"]


def _wait_ticking(finished: threading.Event, on_tick: Callable[[], None] | None, failures: list[int],
                  until: float = math.inf) -> None:
    """Wait until the run finishes or ``until`` passes, in 0.2 s slices with the hook between them.

    Why slices: an interrupt that is not an OS signal (``_thread.interrupt_main``, an IDE's stop button)
    is seen only when Python code runs, so one long wait made a second Ctrl-C wait out the whole grace
    period; and the progress display keeps drawing meanwhile.
    """
    while not finished.wait(timeout=max(0.0, min(0.2, until - time.monotonic()))):
        if time.monotonic() >= until:
            return
        if on_tick is not None:
            _tick(on_tick, failures)


def _tick(on_tick: Callable[[], None], failures: list[int]) -> None:
    """Run the hook; a display or tracking failure never ends the run. The first failure is logged
    with its traceback, later ones (a broken hook fails every 0.2 s) only at debug level."""
    try:
        on_tick()
    except Exception as exc:  # noqa: BLE001 - a display or tracking failure never ends the run (logged below)
        failures[0] += 1
        if failures[0] == 1:  # the traceback masked: a tracking server's error may quote its credentials
            logger.error("A compile-thread hook (progress / tracking) failed; later failures are logged "
                         "at debug level:\n%s", describe_traceback(exc))
        else:
            logger.debug("A compile-thread hook failed again (%d times): %s", failures[0], describe_error(exc))
