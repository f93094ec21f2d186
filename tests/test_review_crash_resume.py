"""Review: hard crashes and Ctrl-C at chosen moments, then a rerun with the same log_dir.

Found with a crash fuzzer (a child process compiling against the loopback simulator, killed with
SIGKILL / SIGTERM / SIGINT at random moments and at hooked points, then rerun). Each test here kills at
a chosen point through a hook, so it is deterministic.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.store import RunStore, RunStoreError
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

from helpers import small_splits

_FORKS_THEN_DIES = textwrap.dedent("""
    import multiprocessing, os, signal, sys, time
    from dspy_turbogepa.store import RunStore

    store = RunStore.open(sys.argv[1], {"data": "d1"})
    store.record_event("run_started", {})
    store.flush()
    # what a metric or program may do during compile: a worker process started with fork (Linux's
    # default start method before Python 3.14: multiprocessing.Pool, ProcessPoolExecutor)
    def linger():
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)  # let the test's pipe reach EOF
        os.dup2(null, 2)
        time.sleep(30)

    worker = multiprocessing.get_context("fork").Process(target=linger, daemon=False)
    worker.start()
    print(worker.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the compile crashes (OOM killer, kill -9)
""")


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_a_killed_run_whose_forked_worker_lives_on_leaves_no_stale_lock(tmp_path):
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    proc = subprocess.run([sys.executable, "-c", _FORKS_THEN_DIES, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    worker = int(proc.stdout.split()[0])
    try:
        # the process that opened the store is gone (docs/run_store.md: "The kernel releases the lock when the
        # process ends, however it ends, so a killed run leaves nothing stale")
        opener = int((tmp_path / "run.lock").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(opener, 0)
        try:
            store = RunStore.open(tmp_path, {"data": "d1"})
        except RunStoreError as exc:
            pytest.fail(f"the rerun is refused after the crashed compile (pid {opener}) is gone: {exc}")
        store.close()
    finally:
        _kill_quietly(worker)


def _ctrl_c() -> None:
    """Ctrl-C as the terminal sends it: SIGINT to this process, handled by the main thread."""
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("where", ["building_the_result", "closing_the_store"])
def test_a_ctrl_c_after_the_search_never_loses_the_finished_program(routing, tmp_path, monkeypatch, where):
    from dspy_turbogepa import teleprompter
    from dspy_turbogepa.store import sqlite_store, writer

    assert threading.current_thread() is threading.main_thread()  # where SIGINT is delivered
    fired: list[str] = []
    if where == "building_the_result":
        build = teleprompter.build_result

        def build_result(*args, **kwargs):
            fired.append(where)
            _ctrl_c()
            return build(*args, **kwargs)

        monkeypatch.setattr(teleprompter, "build_result", build_result)
    else:
        write = writer.Writer._write

        def _write(self, rows):  # the writer commits the session's close while compile() waits for it
            if not fired and any(sql == sqlite_store._CLOSE_SESSION for sql, _ in rows):
                fired.append(where)
                _ctrl_c()
                time.sleep(0.2)  # the main thread is still waiting in close() when the signal is handled
            return write(self, rows)

        monkeypatch.setattr(writer.Writer, "_write", _write)
    splits = small_splits(routing, n_train=20, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    track_stats=True, log_dir=str(tmp_path), verbose=False)
    try:
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            program = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    except KeyboardInterrupt:
        pytest.fail(f"one Ctrl-C while {where.replace('_', ' ')} after a finished search lost the program")
    assert fired == [where]
    assert program.detailed_results.stop_reason in ("max_metric_calls", "no_progress_possible")
