"""Ctrl-C during compile: stop launching, finish or cancel in-flight work, return the best so far."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "slow_compile.py"


@pytest.mark.parametrize("caller", ["script", "asyncio"])
def test_sigint_returns_best_program_so_far(tmp_path, caller):
    """``asyncio``: compile called from a coroutine run by ``asyncio.run`` (a review, session 41): the
    runner's SIGINT handler only cancels its main task, blocked in compile, so the first Ctrl-C did
    nothing, the search ran to its budget, and the cancellation then lost the program."""
    out = tmp_path / "out.json"
    log_dir = tmp_path / "run"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    # noise: the run must still have work when the signal lands (a noiseless task can be solved first)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out), str(log_dir), "5000", "0.2", caller],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 60
        for line in proc.stdout:
            if line.startswith("READY"):
                break
            assert time.time() < deadline
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "DONE" in stdout
    data = json.loads(out.read_text())
    assert data["stop_reason"] == "interrupted"
    assert data["metric_calls"] < 5000
    assert "Interrupted" in stderr and "Run interrupted: returning " in stderr
    assert f"Rerun with log_dir={str(log_dir)!r} to resume" in stderr  # how to go on, where it was missing
    finished = [line for line in stderr.splitlines() if "TurboGEPA finished (interrupted)" in line]
    assert finished and f"summary.json and plots in {log_dir}" in finished[-1]
    # the run store is consistent and was closed properly
    with sqlite3.connect(log_dir / "run.sqlite3") as db:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert db.execute("select count(*) from evaluations").fetchone()[0] >= data["metric_calls"] - 4
        assert db.execute("select count(*) from sessions where closed_at is null").fetchone()[0] == 0


def test_a_failing_compile_thread_hook_is_logged_once_and_never_ends_the_run(caplog):
    """on_tick (progress display, MLflow pump) runs every 0.2 s: a broken hook must not end the run,
    nor flood the log with a traceback per tick."""
    import asyncio
    import logging

    from dspy_turbogepa.adapter.runner import run_coroutine_in_thread

    calls = {"n": 0}

    def broken_hook() -> None:
        calls["n"] += 1
        raise ValueError("display broke")

    async def work() -> str:
        await asyncio.sleep(0.9)
        return "done"

    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa.adapter.runner"):
        assert run_coroutine_in_thread(work, on_tick=broken_hook) == "done"
    assert calls["n"] >= 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # with its traceback, masked, in the message (exc_info would print credentials a tracking error quotes)
    assert len(errors) == 1 and "Traceback" in errors[0].getMessage() and "display broke" in errors[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == calls["n"] - 1


def test_ctrl_c_during_the_seed_validation_raises_after_the_grace_period(monkeypatch):
    """A slow seed validation must not keep the user waiting past the grace period the log promises."""
    import _thread
    import functools
    import threading

    import dspy
    import pytest

    import dspy_turbogepa.teleprompter as tp
    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.adapter.runner import run_coroutine_in_thread
    from dspy_turbogepa.testing import TASKS
    from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=10, n_val=6, n_test=0)

    first_call: list[float] = []
    lock = threading.Lock()
    released = threading.Event()

    def slow_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:
            if not first_call:  # Ctrl-C lands once the seed validation is under way, however slow the setup
                first_call.append(time.monotonic())
                threading.Timer(0.1, _thread.interrupt_main).start()
        released.wait(30.0)  # 30 s, or until the test ends (the abandoned evaluations do not outlive it)
        return task.metric(gold, pred, trace, pred_name, pred_trace)

    monkeypatch.setattr(tp, "run_coroutine_in_thread", functools.partial(run_coroutine_in_thread, grace_seconds=0.2))
    try:  # SIGINT has Python's own handler in every test (conftest), as in a terminal
        opt = TurboGEPA(slow_metric, max_metric_calls=30, reflection_lm=make_reflection_lm(seed=0), num_threads=6)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)), \
                pytest.raises(KeyboardInterrupt, match="seed program") as info:
            opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
        elapsed = time.monotonic() - first_call[0]
    finally:
        released.set()
    assert "run store" not in str(info.value) and "log_dir=" in str(info.value)  # there is no store to resume
    assert elapsed < 10  # well before the seed's evaluations (30 s each) could finish; measured 0.3-0.4 s


def _small_compile_that_must_return(tmp_path, caplog, when: str):
    """A routing compile on the fake LMs (log_dir=tmp_path, WARNINGs captured) during which a test presses
    Ctrl-C somewhere after the search: the program must come back (a KeyboardInterrupt escaping would end
    the whole pytest session, so it fails the test instead)."""
    import dspy

    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm
    from dspy_turbogepa.testing.tasks import TASKS

    routing = TASKS["routing"]
    splits = routing.splits(data_seed=0, n_train=10, n_val=8, n_test=0)
    opt = TurboGEPA(routing.metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    log_dir=str(tmp_path), track_stats=True, verbose=False)
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"), dspy.context(lm=make_student_lm(seed=0)):
        try:
            return opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
        except KeyboardInterrupt:
            pytest.fail(f"a Ctrl-C {when} escaped compile and lost the program")


def test_a_ctrl_c_after_the_search_keeps_the_program(monkeypatch, tmp_path, caplog):
    """The reports (summary.json, plots, MLflow) take up to a second after the search; a Ctrl-C there,
    or in the last compile-thread tick, raised out of compile and lost the optimized program."""
    import asyncio

    import dspy_turbogepa.tracking.plots as plots
    from dspy_turbogepa.adapter.runner import run_coroutine_in_thread

    async def work() -> str:
        await asyncio.sleep(0.01)
        return "done"

    ticks = {"n": 0}

    def ctrl_c_at_the_end() -> None:
        ticks["n"] += 1
        if ticks["n"] == 2:  # the first tick is the loop's (the work takes 0.01 s), the second the last one
            raise KeyboardInterrupt

    try:  # a KeyboardInterrupt escaping would end the whole pytest session, not fail this test
        assert run_coroutine_in_thread(work, on_tick=ctrl_c_at_the_end) == "done"
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C in the last tick escaped with the run's result")

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_lineage", interrupted)
    program = _small_compile_that_must_return(tmp_path, caplog, "while writing the reports")
    assert program.detailed_results.total_metric_calls > 0
    assert "Interrupted while writing the run's reports" in caplog.text
    assert (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("where", ["store_flush", "display_close"])
def test_a_ctrl_c_between_the_search_and_the_program_keeps_the_program(monkeypatch, tmp_path, caplog, where):
    """A review (session 41): between the search's end and the program being built, the run closes (the
    progress line, the run store's last commit, up to 30 s on a slow disk, the final log line). A Ctrl-C
    there escaped compile() and lost the program, though everything was stored."""


    from dspy_turbogepa.store.sqlite_store import RunStore
    from dspy_turbogepa.tracking.progress import ProgressDisplay

    pressed = []
    if where == "store_flush":
        flush = RunStore.flush

        def ctrl_c_in_the_last_commit(self, timeout=None):
            if timeout == 30.0:  # the commit after the search (the writer's own flushes pass none)
                pressed.append(where)
                raise KeyboardInterrupt
            return flush(self, timeout)

        monkeypatch.setattr(RunStore, "flush", ctrl_c_in_the_last_commit)
    else:
        close = ProgressDisplay.close

        def ctrl_c_in_the_last_line(self, *args, **kwargs):
            close(self, *args, **kwargs)
            pressed.append(where)
            raise KeyboardInterrupt

        monkeypatch.setattr(ProgressDisplay, "close", ctrl_c_in_the_last_line)
    program = _small_compile_that_must_return(tmp_path, caplog, "while the run closed")
    assert pressed == [where]
    dr = program.detailed_results
    assert dr.stop_reason == "max_metric_calls"
    # its counts are whole (a second review: the press skipped what the engine does not count itself)
    assert dr.run_stats["feedback_calls"] > 0 and "reflection" in dr.run_stats["rate_limits"]
    assert "Interrupted after the search ended: returning the optimized program" in caplog.text


def test_a_ctrl_c_inside_an_import_of_the_reports_leaves_no_half_loaded_package(monkeypatch, tmp_path):
    """PNG reports import matplotlib, and numpy with it when nothing had: a Ctrl-C inside that import
    failed numpy's __init__ but left its finished submodules bound to the dead package, so numpy was
    broken for the rest of the process (every later plot, the user's own ``np.ravel``). A package
    standing for numpy here: its __init__ loads a submodule, then is interrupted in the next one."""
    import dspy

    import dspy_turbogepa.tracking.plots as plots
    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm
    from dspy_turbogepa.testing.tasks import TASKS

    pkg = tmp_path / "libs" / "halfpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import done\nfrom . import cut\n")
    (pkg / "done.py").write_text("import halfpkg as PARENT\n")
    (pkg / "cut.py").write_text("import os\nif os.environ.pop('HALFPKG_CTRL_C', None):\n    raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path / "libs"))
    monkeypatch.setenv("HALFPKG_CTRL_C", "1")

    def plot_importing(*_args, **_kwargs):
        import halfpkg  # noqa: F401  (interrupted: the Ctrl-C lands in halfpkg.cut)

    monkeypatch.setattr(plots, "plot_lineage", plot_importing)
    routing = TASKS["routing"]
    splits = routing.splits(data_seed=0, n_train=10, n_val=8, n_test=0)
    opt = TurboGEPA(routing.metric, max_metric_calls=30, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                    log_dir=str(tmp_path / "run"), track_stats=True, verbose=False)
    try:
        with dspy.context(lm=make_student_lm(seed=0)):
            try:
                program = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
            except KeyboardInterrupt:
                pytest.fail("a Ctrl-C while writing the reports escaped compile and lost the program")
        assert program.detailed_results.total_metric_calls > 0
        assert "halfpkg" not in sys.modules and "halfpkg.done" not in sys.modules
        import halfpkg

        assert halfpkg.done.PARENT is halfpkg  # loaded afresh, not the half-built package's leftovers
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "halfpkg"]:
            del sys.modules[name]


_CTRL_C_IN_NUMPY = """
import importlib.abc, logging, os, signal, sys
import dspy
from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm
from dspy_turbogepa.testing.tasks import TASKS
if "numpy" in sys.modules:
    print("PRELOADED")
    sys.exit(0)
logging.basicConfig(level=logging.WARNING)
# started in the background (nohup, `cmd &`), the process inherits SIGINT ignored and the Ctrl-C is lost
signal.signal(signal.SIGINT, signal.default_int_handler)

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "numpy.matrixlib":  # half-way through numpy's __init__, its C core loaded
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
routing = TASKS["routing"]
splits = routing.splits(data_seed=0, n_train=10, n_val=8, n_test=0)
opt = TurboGEPA(routing.metric, max_metric_calls=30, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                log_dir=sys.argv[1], track_stats=True, verbose=False, use_mlflow=sys.argv[2] == "mlflow",
                plot_format="png" if sys.argv[2] == "plots" else "svg")
try:
    with dspy.context(lm=make_student_lm(seed=0)):
        program = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    print("COMPILED", program.detailed_results.total_metric_calls > 0)
except KeyboardInterrupt:
    print("INTERRUPTED")
import numpy as np
print("NUMPY", np.ravel([[1, 2]]).tolist())
"""


@pytest.mark.parametrize("tracking", ["plots", "mlflow"])
def test_a_ctrl_c_during_a_heavy_first_import_waits_for_it_to_finish(tmp_path, tracking):
    """A real SIGINT landing inside numpy's first import (matplotlib's, for PNG plots; MLflow's at the
    start of compile with use_mlflow): dropping the leftovers cannot repair numpy (its C core refuses
    to load twice), so the Ctrl-C is held until the import is done, then acts as before (skips the
    reports; stops compile before the search); numpy works for the rest of the process."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_IN_NUMPY, str(tmp_path / "run"), tracking],
                          capture_output=True, text=True, timeout=180, env=env, check=False)
    if "PRELOADED" in proc.stdout:
        pytest.skip("numpy is imported before compile here: the tested import cannot be the first")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if tracking == "plots":
        assert "COMPILED True" in proc.stdout
        assert "Interrupted while writing the run's reports" in proc.stderr  # the Ctrl-C was not lost either
    else:
        assert "INTERRUPTED" in proc.stdout  # delivered once MLflow was imported: compile stopped
    assert "NUMPY [1, 2]" in proc.stdout, proc.stderr[-3000:]


def _counting_sigint_handler():
    calls: list[object] = []

    def handler(signum, frame):
        calls.append(frame)

    return handler, calls


def test_a_held_ctrl_c_reaches_the_previous_handler_once_per_press():
    from dspy_turbogepa.tracking.imports import ctrl_c_held

    handler, calls = _counting_sigint_handler()
    previous = signal.signal(signal.SIGINT, handler)
    try:
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert calls == []  # held while the block runs
        assert len(calls) == 2 and signal.getsignal(signal.SIGINT) is handler
        with ctrl_c_held():
            pass
        assert len(calls) == 2
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_sigint_handler_is_put_back_when_another_signal_interrupts_the_swap(monkeypatch):
    """A second signal's handler that raises (a SIGALRM timeout, sys.exit on SIGTERM) can fire inside
    signal.signal itself: the holding handler stayed installed for good and swallowed every Ctrl-C."""
    from dspy_turbogepa.tracking import imports

    handler, _calls = _counting_sigint_handler()
    previous = signal.signal(signal.SIGINT, handler)
    real = signal.signal
    fired = {"n": 0}

    def swap_then_alarm(signum, new):
        old = real(signum, new)
        if new is handler and fired["n"] == 0:  # the restore went through, then an alarm's handler raised
            fired["n"] += 1
            raise TimeoutError("alarm")
        return old

    def alarm_then_swap(signum, new):
        if new is handler and fired["n"] == 0:  # an alarm's handler raised before the restore
            fired["n"] += 1
            raise TimeoutError("alarm")
        return real(signum, new)

    try:
        for fake in (swap_then_alarm, alarm_then_swap):
            fired["n"] = 0
            monkeypatch.setattr(imports.signal, "signal", fake)
            with pytest.raises(TimeoutError), imports.ctrl_c_held():
                pass
            monkeypatch.setattr(imports.signal, "signal", real)
            assert signal.getsignal(signal.SIGINT) is handler, fake.__name__
    finally:
        real(signal.SIGINT, previous)


def test_a_held_ctrl_c_runs_an_asyncio_signal_callback_once():
    """asyncio's add_signal_handler hears the signal through a wakeup fd, written by the real press;
    delivering the held press with signal.raise_signal wrote it again and ran the callback twice."""
    import asyncio

    from dspy_turbogepa.tracking.imports import ctrl_c_held

    async def main() -> int:
        loop = asyncio.get_running_loop()
        seen: list[int] = []
        loop.add_signal_handler(signal.SIGINT, seen.append, 1)
        try:
            with ctrl_c_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
            await asyncio.sleep(0.1)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        return len(seen)

    assert asyncio.run(main()) == 1


def test_a_second_ctrl_c_without_an_os_signal_aborts_during_the_grace_period():
    """``_thread.interrupt_main`` (an IDE's stop button, a watchdog) is seen only when Python code runs on
    the calling thread: a single blocking wait for the whole grace period held the second Ctrl-C back
    until the grace period ended, and stopped the progress display meanwhile."""
    import _thread
    import asyncio
    import threading

    from dspy_turbogepa.adapter.runner import run_coroutine_in_thread

    release = threading.Event()
    ticks_after_first: list[int] = []
    events: list[str] = []

    async def slow() -> str:  # ignores the interrupt, as in-flight LM calls do during the grace period
        while not release.is_set():
            await asyncio.sleep(0.05)
        return "done"

    def on_interrupt() -> None:
        events.append("interrupt")

    ticks_before: list[int] = []

    def on_tick() -> None:
        if not events:
            ticks_before.append(1)
            if len(ticks_before) == 1:
                # the first Ctrl-C, once the wait is under way (a timer from before the call landed in
                # Thread.start() on a loaded machine, before the wait could catch it)
                threading.Timer(0.05, _thread.interrupt_main).start()
            return
        ticks_after_first.append(1)
        if len(ticks_after_first) == 1:
            # the second Ctrl-C, from the first tick after the first: a single blocking wait for the
            # grace period has no tick, so the old behaviour still fails (events end with "expired")
            threading.Timer(0.05, _thread.interrupt_main).start()

    try:
        with pytest.raises(KeyboardInterrupt):
            run_coroutine_in_thread(slow, on_interrupt=on_interrupt, on_grace_expired=lambda: events.append("expired"),
                                    grace_seconds=5.0, on_tick=on_tick)
    finally:
        release.set()
    assert events == ["interrupt"]  # aborted by the second Ctrl-C, not by the grace period's end
    assert ticks_after_first  # the display kept drawing while in-flight calls were given their time


@pytest.mark.parametrize("stored", [True, False])
def test_a_second_ctrl_c_during_compile_says_what_was_kept(tmp_path, stored):
    """A review (session 41): two Ctrl-Cs aborted compile with a bare KeyboardInterrupt; the grace period's
    end says what was kept and how to resume, and so does the abort now."""
    import _thread
    import threading

    import dspy

    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm
    from dspy_turbogepa.testing.tasks import TASKS

    routing = TASKS["routing"]
    release = threading.Event()
    started = threading.Event()
    first_seen = threading.Event()

    class FirstSeen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Interrupted: no new mutation"):
                first_seen.set()

    def press_twice() -> None:
        _thread.interrupt_main()
        first_seen.wait(10)  # two presses before the first is handled would be one
        _thread.interrupt_main()

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        if not started.is_set():
            started.set()
            threading.Thread(target=press_twice, daemon=True).start()
        release.wait(30)  # in flight until the test ends: only the second Ctrl-C ends compile
        return routing.metric(gold, pred, trace, pred_name, pred_trace)

    splits = routing.splits(data_seed=0, n_train=10, n_val=8, n_test=0)
    opt = TurboGEPA(metric, max_metric_calls=40, reflection_lm=make_reflection_lm(seed=0), num_threads=2,
                    log_dir=str(tmp_path) if stored else None, verbose=False)
    handler = FirstSeen()
    logging.getLogger("dspy_turbogepa").addHandler(handler)
    try:
        with dspy.context(lm=make_student_lm(seed=0)), pytest.raises(KeyboardInterrupt) as info:
            opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    finally:
        release.set()
        logging.getLogger("dspy_turbogepa").removeHandler(handler)
    assert first_seen.is_set()
    assert str(info.value).startswith("Aborted by a second Ctrl-C: the work under way was cancelled.")
    assert ("rerun with the same log_dir" if stored else "Set log_dir=...") in str(info.value)


def test_ctrl_c_during_the_seed_validation_returns_the_seed_if_it_finishes_within_the_grace_period():
    """The seed's validation is work under way: its queued evaluations still start after Ctrl-C, and if
    they finish within the grace period the seed program is returned instead of an error."""
    import _thread
    import threading

    import dspy

    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing import TASKS
    from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=10, n_val=6, n_test=0)
    lock = threading.Lock()
    calls = {"n": 0}
    seen = threading.Event()

    class SeesTheInterrupt(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Interrupted: no new mutation"):
                seen.set()

    def slow_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        with lock:
            calls["n"] += 1
            n = calls["n"]
            if n == 1:  # Ctrl-C once the seed validation is under way
                threading.Timer(0.05, _thread.interrupt_main).start()
        if n > 1:  # the seed validation stays under way until the Ctrl-C is seen, however loaded the machine
            seen.wait(30)
        time.sleep(0.3)
        return task.metric(gold, pred, trace, pred_name, pred_trace)

    handler = SeesTheInterrupt()
    logging.getLogger("dspy_turbogepa").addHandler(handler)
    try:
        opt = TurboGEPA(slow_metric, max_metric_calls=60, reflection_lm=make_reflection_lm(seed=0), num_threads=2,
                        track_stats=True)
        with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
            program = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    finally:
        logging.getLogger("dspy_turbogepa").removeHandler(handler)
    dr = program.detailed_results
    assert seen.is_set()
    assert dr.stop_reason == "interrupted" and len(dr.candidates) == 1 and dr.total_metric_calls == len(splits.val)
    assert program.route.signature.instructions == task.make_program().route.signature.instructions


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.run holds SIGINT from Python 3.11 (asyncio.Runner)")
def test_the_sigint_swap_under_asyncio_run_and_what_it_leaves_alone():
    """adapter/runner.py sigint_raises_keyboard_interrupt: under asyncio.run (whose runner holds SIGINT)
    Python's own handler is in place for the block and the runner's is put back after; a handler the
    block installed itself stays (a second review); outside asyncio.run, or off the main thread, nothing
    is swapped."""
    import asyncio
    import functools
    import threading

    from dspy_turbogepa.adapter.runner import sigint_raises_keyboard_interrupt

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # conftest: as in a terminal
    seen: dict[str, object] = {}

    async def main() -> None:
        runner_handler = signal.getsignal(signal.SIGINT)
        assert isinstance(runner_handler, functools.partial)  # asyncio.Runner._on_sigint
        with sigint_raises_keyboard_interrupt():
            seen["inside"] = signal.getsignal(signal.SIGINT)
        seen["after"] = signal.getsignal(signal.SIGINT) is runner_handler

        def own(signum, frame):  # installed by the program or the metric while compile ran
            pass

        with sigint_raises_keyboard_interrupt():
            signal.signal(signal.SIGINT, own)
        seen["own_kept"] = signal.getsignal(signal.SIGINT) is own
        signal.signal(signal.SIGINT, runner_handler)  # asyncio.run puts the default back only from its own

        def off_main() -> None:
            with sigint_raises_keyboard_interrupt():
                seen["off_main"] = signal.getsignal(signal.SIGINT) is runner_handler

        worker = threading.Thread(target=off_main)
        worker.start()
        worker.join()

    asyncio.run(main())
    assert seen == {"inside": signal.default_int_handler, "after": True, "own_kept": True, "off_main": True}
    with sigint_raises_keyboard_interrupt():  # no runner: nothing to set aside
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
