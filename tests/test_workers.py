"""The daemon thread pool rollouts and reflections run on (dspy_turbogepa/workers.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError

import pytest

from dspy_turbogepa.workers import DaemonThreadPool

SUB_ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


def test_results_errors_and_the_worker_cap():
    pool = DaemonThreadPool(max_workers=3, thread_name_prefix="t-pool")
    lock = threading.Lock()
    running = {"now": 0, "peak": 0}

    def work(i: int) -> int:
        with lock:
            running["now"] += 1
            running["peak"] = max(running["peak"], running["now"])
        time.sleep(0.02)
        with lock:
            running["now"] -= 1
        return i * i

    futures = [pool.submit(work, i) for i in range(12)]
    assert [f.result(10) for f in futures] == [i * i for i in range(12)]
    assert running["peak"] <= 3
    assert len(pool._threads) == 3 and all(t.daemon and t.name.startswith("t-pool_") for t in pool._threads)
    for _ in range(5):  # one at a time: the idle worker is reused, none is added
        pool.submit(work, 1).result(10)
    assert len(pool._threads) == 3

    def raises(exc: BaseException) -> None:
        raise exc

    with pytest.raises(ValueError, match="bad"):
        pool.submit(raises, ValueError("bad")).result(10)
    # what a KeyboardInterrupt raised in a worker does in the stdlib pool: handed to the future
    with pytest.raises(KeyboardInterrupt):
        pool.submit(raises, KeyboardInterrupt()).result(10)
    assert pool.submit(work, 3).result(10) == 9  # the worker survived both
    pool.shutdown(wait=True)
    assert not any(t.is_alive() for t in pool._threads)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(work, 1)


def test_shutdown_cancels_what_has_not_started_and_asyncio_runs_on_it():
    pool = DaemonThreadPool(max_workers=1, thread_name_prefix="t-pool")
    release = threading.Event()
    first = pool.submit(release.wait, 10)
    queued = [pool.submit(time.sleep, 0) for _ in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(CancelledError):
        queued[0].result(1)
    release.set()
    assert first.result(10) is True

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        other = DaemonThreadPool(max_workers=2, thread_name_prefix="t-loop")
        try:
            return list(await asyncio.gather(*(loop.run_in_executor(other, lambda: threading.current_thread().name)
                                               for _ in range(4))))
        finally:
            other.shutdown(wait=True)

    assert all(name.startswith("t-loop_") for name in asyncio.run(main()))


def test_the_interpreter_exits_without_waiting_for_a_call_on_the_wire():
    """The stdlib pool joins its workers at exit even after shutdown(wait=False): a script holding an LM
    call of 30 s could not exit for 30 s."""
    code = textwrap.dedent("""
        import time
        from dspy_turbogepa.workers import DaemonThreadPool
        pool = DaemonThreadPool(max_workers=2, thread_name_prefix="t")
        pool.submit(time.sleep, 30)
        pool.shutdown(wait=False, cancel_futures=True)
        print("LEAVING", flush=True)
    """)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=SUB_ENV)
    assert proc.returncode == 0 and "LEAVING" in proc.stdout, proc.stderr
    assert time.monotonic() - started < 20  # not the 30 s call (measured: well under a second)


def test_at_exit_a_busy_worker_of_a_shut_down_pool_gets_a_moment_to_finish():
    """A worker frozen at finalization while it held the import lock (litellm's error handling after a
    systemic stop imports lazily) hung the exit for good, since litellm's AsyncHTTPHandler.__del__ imports
    during finalization (a review: about 1 in 25 litellm-engine runs stopped by a 401). Busy workers now
    get up to EXIT_GRACE_S to finish, one wait for every pool (a compile has two; three here): one that
    takes longer is left, and the exit is not held past the grace."""
    code = textwrap.dedent("""
        import sys, threading, time
        from dspy_turbogepa import workers
        workers.EXIT_GRACE_S = 4.0
        seconds, path = float(sys.argv[1]), sys.argv[2]
        pools = [workers.DaemonThreadPool(max_workers=2, thread_name_prefix=f"t{i}") for i in range(3)]
        running = threading.Semaphore(0)

        def work(i):
            running.release()
            time.sleep(seconds)
            open(f"{path}-{i}", "w").write("finished")

        for i, pool in enumerate(pools):
            pool.submit(work, i)
        for _ in pools:
            running.acquire(timeout=10)
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)
        print("LEAVING", time.monotonic(), flush=True)
    """)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for seconds, finishes in ((0.5, True), (30.0, False)):
            path = os.path.join(tmp, f"done-{seconds}")
            proc = subprocess.run([sys.executable, "-c", code, str(seconds), path], capture_output=True, text=True,
                                  timeout=60, env=SUB_ENV)
            left = time.monotonic()
            assert proc.returncode == 0 and "LEAVING" in proc.stdout, proc.stderr
            assert [os.path.exists(f"{path}-{i}") for i in range(3)] == [finishes] * 3, seconds
            # one 4 s grace for the three pools, not 4 s each (12 s)
            assert left - float(proc.stdout.split()[1]) < 9, seconds


def test_a_script_aborted_by_a_second_ctrl_c_exits_without_waiting_for_its_lm_calls():
    """A review (session 41): after two Ctrl-Cs compile raised at once, but the script exited only once
    the student's calls in flight returned (22 s for 20 s calls; up to the LM's timeout with a real one)."""
    code = textwrap.dedent("""
        import _thread, logging, threading, time
        import dspy
        from dspy_turbogepa import TurboGEPA
        from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

        task = TASKS["routing"]
        splits = task.splits(data_seed=0, n_train=10, n_val=8, n_test=0)
        first_seen = threading.Event()

        class FirstSeen(logging.Handler):
            def emit(self, record):
                if record.getMessage().startswith("Interrupted: no new mutation"):
                    first_seen.set()

        logging.getLogger("dspy_turbogepa").addHandler(FirstSeen())
        started = threading.Event()

        def press_twice():
            _thread.interrupt_main()
            first_seen.wait(20)
            _thread.interrupt_main()

        def on_the_wire(request):
            if not started.is_set():
                started.set()
                threading.Thread(target=press_twice, daemon=True).start()
            time.sleep(40)

        opt = TurboGEPA(task.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0),
                        num_threads=4, verbose=False)
        try:
            with dspy.context(lm=make_student_lm(seed=0, before_call=on_the_wire)):
                opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
        except KeyboardInterrupt as exc:
            print("ABORTED", exc, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=SUB_ENV)
    try:
        line = proc.stdout.readline()  # the abort (the imports take a few seconds)
        aborted = time.monotonic()
        assert line.startswith("ABORTED Aborted by a second Ctrl-C"), line + proc.stderr.read()[-3000:]
        proc.wait(timeout=60)
        assert time.monotonic() - aborted < 20  # not the 40 s calls in flight (measured: well under a second)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
