"""A thread pool whose workers do not hold the interpreter open: rollouts and reflections run on it.

Why not ``concurrent.futures.ThreadPoolExecutor``: Python joins its workers when the interpreter exits,
even after ``shutdown(wait=False)``. A compile aborted by a second Ctrl-C (or stopped after its grace
period) leaves LM calls on the wire in those workers, and the script could not exit until each returned:
up to the LM's timeout (litellm's default is 600 s). Their answers are not wanted any more (the run
closed its evaluator and proposer, which drop whatever arrives after), so these workers are daemon
threads, and the interpreter exits without waiting for them for long: at exit, the workers that
shut-down pools left running a task get up to :data:`EXIT_GRACE_S` seconds in all to finish (one wait
for every pool; a Ctrl-C cuts it short). A daemon thread still running Python code when the interpreter
finalizes is frozen where it stands, and one frozen while it held the import lock (a worker in litellm's
error handling, which imports lazily, after a systemic stop) hung the exit for good: litellm's
``AsyncHTTPHandler.__del__`` imports during finalization (a reviewer: about 1 in 25 litellm-engine runs
stopped by a 401 never exited; never on DSPy's own client). Most such workers are seconds from done; one
blocked on a slow LM call is frozen while it waits on the socket, which holds no lock.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

_Item = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]

#: At interpreter exit, how long (seconds, in all) the busy workers of shut-down pools get to finish.
EXIT_GRACE_S = 2.0

#: Pools shut down without waiting, whose busy workers the exit waits for (process-wide, as the exit is).
#: Weak: a pool whose workers have all finished is dropped (their threads no longer hold it).
_SHUT_DOWN_POOLS: weakref.WeakSet[DaemonThreadPool] = weakref.WeakSet()


class DaemonThreadPool(Executor):
    """``ThreadPoolExecutor``'s contract (``submit``, ``shutdown(wait, cancel_futures=...)``, workers started
    as work arrives, up to ``max_workers``), with daemon workers."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # workers waiting for work: one is used before another starts
        self._threads: list[threading.Thread] = []
        self._busy: set[threading.Thread] = set()  # workers running a task
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future[T] = Future()
            self._queue.put((future, fn, args, kwargs))
            if not self._idle.acquire(timeout=0) and len(self._threads) < self._max_workers:
                thread = threading.Thread(target=self._work, name=f"{self._prefix}_{len(self._threads)}",
                                          daemon=True)
                thread.start()
                self._threads.append(thread)
            return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:  # shut down: wake the next worker too
                self._queue.put(None)
                return
            me = threading.current_thread()
            with self._lock:
                self._busy.add(me)
            try:
                _run(*item)
            finally:
                with self._lock:
                    self._busy.discard(me)
            del item  # not kept alive while this worker waits for the next
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            self._queue.put(None)
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()
        else:  # its busy workers finish on their own; at exit they get a moment to (the module's docstring)
            _SHUT_DOWN_POOLS.add(self)

    def busy_workers(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._busy)


def _run(future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future, as the stdlib pool does
        future.set_exception(exc)
    else:
        future.set_result(result)


def _grace_at_exit() -> None:
    """Wait for the busy workers of shut-down pools, for :data:`EXIT_GRACE_S` seconds in all (read when the
    exit comes: a worker that took its task just as its pool shut down is busy by then)."""
    deadline = time.monotonic() + EXIT_GRACE_S
    try:
        for pool in list(_SHUT_DOWN_POOLS):
            for thread in pool.busy_workers():
                thread.join(max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # a Ctrl-C at exit: leave now, without a traceback
        return


atexit.register(_grace_at_exit)
