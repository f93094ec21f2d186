"""The crash-safe SQLite run store: round trips, resume checks, batching, SIGKILL safety, secrets."""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import dspy_turbogepa.redaction as redaction
import dspy_turbogepa.store as store_pkg
from dspy_turbogepa.store import (
    DB_FILENAME,
    REDACTED,
    SCHEMA_VERSION,
    RunStore,
    RunStoreError,
    RunStoreMismatchError,
    contains_secret,
    is_sensitive_key,
    mask_text,
    redact,
    stable_hash,
)

pytestmark = pytest.mark.timeout(60)

RUN_KEY = {"trainset": "t" * 32, "valset": "v" * 32, "student": "s" * 32, "seed": "0", "config": "c" * 32}


def _raw(log_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(log_dir / DB_FILENAME))


def _eval(store: RunStore, fp: str, example_id: int, score: float = 0.5, split: str = "val", **kw) -> None:
    fields = dict.fromkeys(
        ("objective_scores", "failure", "message", "error_type", "trajectory_json", "output_json", "tokens", "seconds")
    )
    fields.update(kw)
    store.record_evaluation(fp, split, example_id, score, **fields)


# Subprocess scripts import the store without the package __init__ (which pulls in DSPy and takes a
# second): the store needs none of it.
_PRELUDE = textwrap.dedent(
    """
    import json, sys, time, types
    pkg = types.ModuleType("dspy_turbogepa")
    pkg.__path__ = [sys.argv[1]]
    sys.modules["dspy_turbogepa"] = pkg
    from dspy_turbogepa.store import RunStore
    """
)


def _package_dir() -> str:
    return str(Path(store_pkg.__file__).resolve().parents[1])


# ----------------------------------------------------------------------------------- round trips


def test_open_creates_wal_database_with_schema_version(tmp_path: Path) -> None:
    log_dir = tmp_path / "nested" / "run"
    with RunStore.open(log_dir, RUN_KEY, {"model": "openai/gpt-4.1-mini"}) as store:
        assert not store.resumed
        assert store.session == 1
        assert store.meta == {"model": "openai/gpt-4.1-mini"}
        assert store.counts() == {"candidates": 0, "evaluations": 0, "proposals": 0, "events": 0}
    conn = _raw(log_dir)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        assert meta["schema_version"] == str(SCHEMA_VERSION)
        assert dict(conn.execute("SELECT component, value FROM run_key").fetchall()) == RUN_KEY
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_round_trip_of_every_record_kind(tmp_path: Path) -> None:
    traj = json.dumps({"inputs": {"q": "2+2?"}, "outputs": {"a": "4"}, "trace": [["predict", {"token": "x"}]]})
    with RunStore.open(tmp_path, RUN_KEY) as store:
        store.record_candidate("fp0", {"predict": "Answer.", "judge": "Judge."}, [], "seed", 1.5)
        store.record_candidate("fp1", {"predict": "Answer well.", "judge": "Judge."}, ["fp0"], "reflection", 2.5)
        store.record_evaluation(
            "fp0", "train", 3, 0.75, {"acc": 1.0, "len": 0.5}, None, "ok", None, traj, '{"a": "4"}', 120, 0.25
        )
        store.record_evaluation(
            "fp0", "val", 3, 0.0, None, "program_error", "boom", "ValueError", None, None, None, None
        )
        store.record_evaluation("fp1", "val", 0, float("nan"), None, "metric_invalid", None, None, None, None, 0, 0.0)
        store.record_evaluation("fp1", "val", 1, float("-inf"), None, None, None, None, None, None, None, None)
        assert store.record_proposal("k1", {"predict": "Answer well."}, None, None, 1)
        assert store.record_proposal("k2", {}, "proposer_error", "RateLimitError: slow down", 2)
        store.record_event("run_started", {"seed": 0, "ids": (1, 2), "path": Path("/x"), "tags": {"b", "a"}})
        store.record_event("stopped", {"reason": "max_metric_calls"})

        cands = store.load_candidates()
        assert [c.fingerprint for c in cands] == ["fp0", "fp1"]
        assert cands[1].texts == {"predict": "Answer well.", "judge": "Judge."}
        assert list(cands[1].texts) == ["predict", "judge"]  # component order is kept
        assert cands[1].parents == ("fp0",) and cands[1].kind == "reflection" and cands[1].created_at == 2.5

        evals = store.load_evaluations()
        assert [(e.fingerprint, e.split, e.example_id) for e in evals] == [
            ("fp0", "train", 3),
            ("fp0", "val", 3),
            ("fp1", "val", 0),
            ("fp1", "val", 1),
        ]
        e0 = evals[0]
        assert (e0.score, e0.objective_scores, e0.message, e0.tokens, e0.seconds) == (
            0.75,
            {"acc": 1.0, "len": 0.5},
            "ok",
            120,
            0.25,
        )
        assert json.loads(e0.trajectory_json) == json.loads(traj)  # a field named "token" is data, kept
        assert e0.output_json == '{"a": "4"}'
        assert (evals[1].failure, evals[1].error_type, evals[1].score) == ("program_error", "ValueError", 0.0)
        assert math.isnan(evals[2].score) and evals[2].failure == "metric_invalid"
        assert evals[3].score == float("-inf")
        assert all(e.session == 1 for e in evals)

        props = store.load_proposals()
        assert list(props) == ["k1", "k2"]
        assert props["k1"].texts == {"predict": "Answer well."} and props["k1"].skipped is None
        assert (props["k2"].skipped, props["k2"].message, props["k2"].reflection_calls) == (
            "proposer_error",
            "RateLimitError: slow down",
            2,
        )

        events = store.events()
        assert [e.kind for e in events] == ["run_started", "stopped"]
        assert events[0].payload == {"seed": 0, "ids": [1, 2], "path": "/x", "tags": ["a", "b"]}
        assert [e.payload for e in store.events("stopped")] == [{"reason": "max_metric_calls"}]
        assert store.events("nothing") == []
        assert store.counts() == {"candidates": 2, "evaluations": 4, "proposals": 2, "events": 2}


def test_a_later_record_replaces_an_evaluation_or_proposal_a_candidate_keeps_its_first(tmp_path: Path) -> None:
    """A resumed run re-records only what it re-executed instead of replaying (an LM-service failure,
    a failed proposer): the new result must replace the old row, or every later resume redoes it."""
    with RunStore.open(tmp_path, RUN_KEY) as store:
        _eval(store, "fp", 0, 0.25, message="first")
        _eval(store, "fp", 0, 0.75, message="second")
        _eval(store, "fp", 0, 0.5, split="train")  # another split is another row
        store.record_candidate("fp", {"p": "a"}, [], "seed", 1.0)
        store.record_candidate("fp", {"p": "a"}, [], "seed", 2.0)
        store.record_proposal("k", {"p": "first"}, None, None, 1)
        store.record_proposal("k", {"p": "second"}, None, None, 1)
        evals = store.load_evaluations()
        assert [(e.split, e.score, e.message) for e in evals] == [("val", 0.75, "second"), ("train", 0.5, None)]
        assert [c.created_at for c in store.load_candidates()] == [1.0]
        assert store.load_proposals()["k"].texts == {"p": "second"}
        assert store.write_stats == {"committed": 6, "ignored_duplicates": 1, "failed": 0}


def test_invalid_arguments_raise_in_the_caller(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, RUN_KEY) as store:
        with pytest.raises(TypeError):
            store.record_evaluation("fp", "val", 1.5, 0.0, None, None, None, None, None, None, None, None)
        with pytest.raises(TypeError):
            store.record_evaluation("fp", "val", 1, 0.0, None, None, None, None, {"not": "a string"}, None, None, None)
        with pytest.raises(ValueError):
            store.record_evaluation("fp", "val", 1, "high", None, None, None, None, None, None, None, None)
        with pytest.raises(TypeError):
            store.record_candidate("fp", {"p": 3}, [], "seed", 0.0)
        assert store.counts()["evaluations"] == 0
    with pytest.raises(TypeError):
        RunStore(tmp_path)
    with pytest.raises(ValueError):
        RunStore.open(tmp_path / "x", {})
    with pytest.raises(TypeError):
        RunStore.open(tmp_path / "y", {"seed": 0})


# ----------------------------------------------------------------------------------- resume


def test_reopen_resumes_and_checks_the_run_key(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, RUN_KEY, {"attempt": 1}) as store:
        _eval(store, "fp", 0, 1.0)
        store.record_proposal("k", {"p": "x"}, None, None, 1)

    with RunStore.open(tmp_path, dict(reversed(list(RUN_KEY.items()))), {"attempt": 2}) as store:  # order-free
        assert store.resumed
        assert store.session == 2
        assert store.meta == {"attempt": 1}  # the run's meta is the first session's
        assert [e.score for e in store.load_evaluations()] == [1.0]
        assert list(store.load_proposals()) == ["k"]
        _eval(store, "fp", 1, 0.0)
        sessions = store.sessions()
        assert [(s.id, s.resumed) for s in sessions] == [(1, False), (2, True)]
        assert sessions[0].closed_at is not None and sessions[1].closed_at is None
        assert sessions[1].meta == {"attempt": 2}

    changed = {**RUN_KEY, "trainset": "T" * 32, "config": "C" * 32}
    with pytest.raises(RunStoreMismatchError) as info:
        RunStore.open(tmp_path, changed)
    msg = str(info.value)
    assert info.value.changed == ("config", "trainset")
    assert "config" in msg and "trainset" in msg and "valset" not in msg and "student" not in msg
    assert "new log_dir" in msg and str(tmp_path) in msg

    extra = {**RUN_KEY, "reflection_lm": "r" * 32}
    with pytest.raises(RunStoreMismatchError, match="reflection_lm"):
        RunStore.open(tmp_path, extra)
    missing = {k: v for k, v in RUN_KEY.items() if k != "seed"}
    with pytest.raises(RunStoreMismatchError, match="seed"):
        RunStore.open(tmp_path, missing)

    # a key computed another way (a new key_format) is "another version", not "your data changed"
    newer = {**{k: v[::-1] for k, v in RUN_KEY.items()}, "key_format": "2"}
    with pytest.raises(RunStoreMismatchError, match="written by another version of dspy_turbogepa") as info:
        RunStore.open(tmp_path, newer)
    assert "format before 2, this version 2" in str(info.value) and "trainset" not in str(info.value)

    # A refused open changes nothing: the original run still opens, with its data and no new session.
    with RunStore.open(tmp_path, RUN_KEY) as store:
        assert store.resumed and store.session == 3
        assert store.counts()["evaluations"] == 2


def test_a_store_with_no_rows_is_not_a_resume(tmp_path: Path) -> None:
    RunStore.open(tmp_path, RUN_KEY).close()
    with RunStore.open(tmp_path, RUN_KEY) as store:
        assert not store.resumed


def test_schema_version_and_foreign_databases_are_refused(tmp_path: Path) -> None:
    RunStore.open(tmp_path / "a", RUN_KEY).close()
    conn = _raw(tmp_path / "a")
    with conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(RunStoreMismatchError, match="schema_version 999") as newer:
        RunStore.open(tmp_path / "a", RUN_KEY)
    # a newer version's store holds its paid work: upgrade, not delete (an older one: start over)
    assert "Upgrade dspy-turbogepa" in str(newer.value) and "delete" not in str(newer.value)
    conn = _raw(tmp_path / "a")
    with conn:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(RunStoreMismatchError, match="schema_version 1, .* delete"):
        RunStore.open(tmp_path / "a", RUN_KEY)

    (tmp_path / "b").mkdir()
    conn = _raw(tmp_path / "b")
    with conn:
        conn.execute("CREATE TABLE something (x)")
    conn.close()
    with pytest.raises(RunStoreMismatchError, match="not a run store"):
        RunStore.open(tmp_path / "b", RUN_KEY)

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / DB_FILENAME).write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(RunStoreError, match="not a readable run store"):
        RunStore.open(tmp_path / "c", RUN_KEY)


def test_a_damaged_page_or_a_foreign_meta_table_is_a_run_store_error_naming_the_file(tmp_path: Path) -> None:
    """Bit rot in one data page (the header intact) surfaced as a bare sqlite3.DatabaseError half-way
    through loading the stored results. SQLite reports a wrong schema as an OperationalError, like a
    full disk: it must still get the advice for a file that is not ours, not "run again"."""
    store = RunStore.open(tmp_path / "a", RUN_KEY)
    for i in range(400):
        _eval(store, f"fp{i % 7}", i, message="x" * 200)
    store.close()
    db = tmp_path / "a" / DB_FILENAME
    page = 4096
    assert db.stat().st_size > 12 * page
    with db.open("r+b") as f:  # every third page from the fourth on: some of them hold evaluations
        for number in range(3, db.stat().st_size // page - 1, 3):
            f.seek(number * page)
            f.write(bytes(range(256)) * (page // 256))
    # every page is read at open (quick_check), so the damage is found there, before any stored row is read
    with pytest.raises(RunStoreError, match=r"(?s)is damaged \(SQLite's quick_check: .*btreeInitPage") as info:
        store = RunStore.open(tmp_path / "a", RUN_KEY)
        try:
            store.load_evaluations()
        finally:
            store.close()
    assert str(db) in str(info.value) and "delete" in str(info.value)  # a damaged store can only start over

    (tmp_path / "b").mkdir()
    conn = _raw(tmp_path / "b")
    with conn:
        conn.execute("CREATE TABLE meta (k TEXT)")  # someone else's database with a table of that name
    conn.close()
    with pytest.raises(RunStoreMismatchError, match="not a run store") as info:
        RunStore.open(tmp_path / "b", RUN_KEY)
    assert "not lost" not in str(info.value)


def test_a_full_or_failing_disk_is_not_called_a_damaged_store(tmp_path: Path, monkeypatch) -> None:
    """'database or disk is full' at open was reported as an unreadable store with the advice to delete
    it: the stored results were intact (freeing space resumed them with no LM call)."""
    store = RunStore.open(tmp_path, RUN_KEY)
    _eval(store, "fp", 0)
    store.close()
    real_connect = store_pkg.sqlite_store._connect

    class _Full:
        error: sqlite3.Error = sqlite3.OperationalError("database or disk is full")

        def __init__(self, conn: sqlite3.Connection) -> None:
            self._conn = conn

        def execute(self, sql: str, *args):
            if not sql.startswith("PRAGMA"):
                raise self.error
            return self._conn.execute(sql, *args)

        def __getattr__(self, name: str):
            return getattr(self._conn, name)

    monkeypatch.setattr(store_pkg.sqlite_store, "_connect", lambda path: _Full(real_connect(path)))
    with pytest.raises(RunStoreError, match="disk is full") as info:
        RunStore.open(tmp_path, RUN_KEY)
    assert "not lost" in str(info.value) and "delete" not in str(info.value)
    monkeypatch.setattr(store_pkg.sqlite_store, "_connect", real_connect)
    store = RunStore.open(tmp_path, RUN_KEY)
    try:  # reading later fails the same way: a RunStoreError naming the file, not a bare sqlite3 error
        monkeypatch.setattr(store_pkg.sqlite_store, "_connect", lambda path: _Full(real_connect(path)))
        with pytest.raises(RunStoreError, match=r"run\.sqlite3 \(database or disk is full\)"):
            store.sessions()
        _Full.error = sqlite3.DatabaseError("database disk image is malformed")  # a page gone bad since
        with pytest.raises(RunStoreError, match="not a readable run store .*malformed.*delete"):
            store.load_evaluations()
    finally:
        monkeypatch.setattr(store_pkg.sqlite_store, "_connect", real_connect)
        store.close()


def test_a_full_disk_is_reported_once_not_per_row(tmp_path: Path, monkeypatch, caplog) -> None:
    """A full log_dir logged one WARNING per row (217 in a small run); one says it, the rest go to DEBUG,
    and the count still reaches write_stats and a flush's error."""
    import logging

    store = RunStore.open(tmp_path, RUN_KEY)
    writer = store._writer

    def disk_full(rows):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(writer, "_transaction", disk_full)
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        for i in range(20):
            _eval(store, "fp", i)
        with pytest.raises(RunStoreError, match="20 row"):  # the count, for whoever waits on the store
            store.flush()
        store.close()
    per_row = [r for r in caplog.records if "a row was not saved" in r.getMessage()]
    # (closing writes the session's end row too, which fails the same way)
    assert [r.levelno for r in per_row].count(logging.WARNING) == 1 and len(per_row) >= 20
    assert store.write_stats["failed"] >= 20


def test_a_flush_counts_every_row_lost_not_the_messages_it_keeps(tmp_path: Path, monkeypatch) -> None:
    """Only the first 100 messages are kept; the count in the error used to be theirs, so 400 rows lost
    to a full disk were reported as 100."""
    store = RunStore.open(tmp_path, RUN_KEY)
    try:
        def disk_full(rows):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store._writer, "_transaction", disk_full)
        for i in range(150):
            _eval(store, "fp", i)
        with pytest.raises(RunStoreError, match=r"^150 row\(s\) could not be written.*\(and 147 more\)"):
            store.flush()
        store.flush()  # each failure is reported once
        assert store.write_stats["failed"] == 150
    finally:
        monkeypatch.undo()
        store.close()


def test_unusable_log_dir_is_named_in_the_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunStoreError, match="log_dir '.*file/run'"):
        RunStore.open(blocker / "run", RUN_KEY)  # parent is a file: cannot be created
    with pytest.raises(RunStoreError, match="log_dir '.*file'.*not a directory"):
        RunStore.open(blocker, RUN_KEY)
    assert isinstance(RunStoreError("x"), OSError)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_log_dir(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(RunStoreError, match="not writable"):
            RunStore.open(ro, RUN_KEY)
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------------- writer behaviour


def test_rows_are_committed_in_batches_by_the_writer(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path, RUN_KEY, commit_interval=30.0)
    conn = _raw(tmp_path)
    try:
        for i in range(10):
            _eval(store, "fp", i)
        time.sleep(0.1)
        # Held in the open batch: not committed yet (the caller never waited for the disk).
        assert conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 0
        store.flush()
        assert conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 10
        for i in range(10, 15):
            _eval(store, "fp", i)
        store.close()  # close commits what is queued
        assert conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 15
        closed_at = conn.execute("SELECT closed_at FROM sessions").fetchone()[0]
        assert closed_at is not None and abs(closed_at - time.time()) < 60
    finally:
        conn.close()


def test_rows_reach_disk_within_the_commit_interval_without_flush(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path, RUN_KEY, commit_interval=0.02, max_batch=7)
    conn = _raw(tmp_path)
    try:
        for i in range(100):
            _eval(store, "fp", i)
        deadline = time.monotonic() + 5
        while conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] < 100:
            assert time.monotonic() < deadline, "rows were not committed without a flush"
            time.sleep(0.01)
    finally:
        conn.close()
        store.close()


def test_many_rows_from_many_threads(tmp_path: Path) -> None:
    n_threads, per_thread = 8, 400
    with RunStore.open(tmp_path, RUN_KEY) as store:

        def work(t: int) -> None:
            for i in range(per_thread):
                _eval(store, f"fp{t}", i, i / per_thread, trajectory_json=json.dumps({"t": t, "i": i}))
                if i % 100 == 0:
                    store.record_event("tick", {"t": t, "i": i})
            store.flush()

        start = time.perf_counter()
        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - start
        evals = store.load_evaluations()
        assert len(evals) == n_threads * per_thread
        for t in range(n_threads):  # each thread's rows in its own order
            mine = [e.example_id for e in evals if e.fingerprint == f"fp{t}"]
            assert mine == list(range(per_thread))
        assert all(json.loads(e.trajectory_json)["i"] == e.example_id for e in evals)
        assert len(store.events("tick")) == n_threads * 4
        assert elapsed < 5, f"{n_threads * per_thread} rows took {elapsed:.1f}s"


def test_recording_does_not_wait_for_the_disk(tmp_path: Path, monkeypatch) -> None:
    """record_evaluation hands rows to the writer thread: with the writer stuck on the disk, 3,000 rows
    are still recorded (then all written once it is free). No wall-clock bound: the CPU the recording
    thread spends is measured instead, which a loaded machine does not inflate."""
    from dspy_turbogepa.store import writer

    inside, release = threading.Event(), threading.Event()
    transaction = writer.Writer._transaction

    def stuck_transaction(self, rows):
        if not inside.is_set():  # the first one holds the database's write lock until released
            self.conn.execute("BEGIN IMMEDIATE")
            inside.set()
            assert release.wait(60), "the test never released the writer"
            self.conn.execute("ROLLBACK")
        return transaction(self, rows)

    monkeypatch.setattr(writer.Writer, "_transaction", stuck_transaction)
    with RunStore.open(tmp_path, RUN_KEY) as store:
        traj = json.dumps({"inputs": {"q": "x" * 2000}, "outputs": {"a": "y" * 500}})
        _eval(store, "fp", -1, trajectory_json=traj, message="fine")
        assert inside.wait(30)  # the writer is now stuck inside a transaction
        cpu: list[float] = []

        def record() -> None:
            start = time.thread_time()
            for i in range(3000):
                _eval(store, "fp", i, trajectory_json=traj, message="fine")
            cpu.append(time.thread_time() - start)

        recorder = threading.Thread(target=record)
        recorder.start()
        recorder.join(timeout=20)
        finished_while_stuck = not recorder.is_alive() and not release.is_set()
        release.set()
        recorder.join()
        assert finished_while_stuck, "recording waited for the writer (the disk)"
        store.flush()
        assert store.counts()["evaluations"] == 3001
    assert cpu[0] / 3000 < 200e-6, f"record_evaluation took {cpu[0] / 3000 * 1e6:.0f} us of CPU per row"


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path, RUN_KEY)
    _eval(store, "fp", 0)
    store.close()
    store.close()
    assert store.closed
    with pytest.raises(RunStoreError, match="closed"):
        _eval(store, "fp", 1)
    store.flush()  # nothing to do
    assert [e.example_id for e in store.load_evaluations()] == [0]  # reading after close still works
    assert "closed" in repr(store)


def test_an_abandoned_store_commits_on_collection(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path, RUN_KEY, commit_interval=30.0)
    for i in range(5):
        _eval(store, "fp", i)
    del store
    gc.collect()
    conn = _raw(tmp_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == 5
        assert conn.execute("SELECT closed_at FROM sessions").fetchone()[0] is not None
    finally:
        conn.close()


def test_interpreter_exit_without_close_commits_the_queue(tmp_path: Path) -> None:
    script = _PRELUDE + textwrap.dedent(
        """
        store = RunStore.open(sys.argv[2], {"run": "exit"}, commit_interval=30.0)
        for i in range(50):
            store.record_event("tick", {"i": i})
        """
    )
    subprocess.run([sys.executable, "-c", script, _package_dir(), str(tmp_path)], check=True, timeout=30)
    conn = _raw(tmp_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 50
        assert conn.execute("SELECT closed_at FROM sessions").fetchone()[0] is not None
    finally:
        conn.close()


def test_a_failing_row_is_reported_and_does_not_cost_its_batch(tmp_path: Path) -> None:
    with RunStore.open(tmp_path, RUN_KEY, commit_interval=30.0) as store:
        conn = _raw(tmp_path)
        with conn:
            conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON evaluations WHEN NEW.example_id = 13 "
                "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )
        conn.close()
        for i in range(20):
            _eval(store, "fp", i)
        with pytest.raises(RunStoreError, match="1 row.*disk on fire.*evaluations"):
            store.flush()
        store.flush()  # reported once
        assert [e.example_id for e in store.load_evaluations()] == [i for i in range(20) if i != 13]
        assert store.write_stats["failed"] == 1
        _eval(store, "fp", 21)  # the store keeps working
        assert store.counts()["evaluations"] == 20


def test_text_with_a_lone_surrogate_is_stored_and_read_back_unchanged(tmp_path: Path) -> None:
    """Text decoded with ``surrogateescape`` (bytes from a file or a subprocess) holds lone surrogates,
    which SQLite's UTF-8 refuses: such rows were dropped with a warning, so a resume paid for them again.
    JSON columns come back as they were; a plain message keeps the character as its escape."""
    odd = "caf\udce9 \ud83d"
    assert stable_hash({"x": odd}) == stable_hash({"x": odd}) != stable_hash({"x": "cafe"})
    with RunStore.open(tmp_path, RUN_KEY, {"log_dir": f"/runs/{odd}"}, commit_interval=30.0) as store:
        store.record_event("note", {"odd": odd})  # events and meta are written outside the row writer
        store.record_candidate("c1", {"p": odd}, [], "seed", 0.0)
        _eval(store, "c1", 0, output_json=json.dumps({"answer": odd}), message=f"failed on {odd}",
              trajectory_json=json.dumps({"steps": [odd]}))
        _eval(store, "c1", 1)  # in the same batch: it is not lost with the other
        store.flush()
        assert store.write_stats["failed"] == 0
    with RunStore.open(tmp_path, RUN_KEY) as store:
        assert store.meta == {"log_dir": f"/runs/{odd}"}
        assert [e.payload for e in store.events("note")] == [{"odd": odd}]
        assert store.load_candidates()[0].texts == {"p": odd}
        ev = {e.example_id: e for e in store.load_evaluations()}
        assert sorted(ev) == [0, 1]
        assert json.loads(ev[0].output_json) == {"answer": odd}
        assert json.loads(ev[0].trajectory_json) == {"steps": [odd]}
        assert ev[0].message == "failed on caf\\udce9 \\ud83d"


# ----------------------------------------------------------------------------------- SIGKILL

_WRITER_SCRIPT = _PRELUDE + textwrap.dedent(
    """
    store = RunStore.open(sys.argv[2], {"run": "kill-test"}, commit_interval=0.003, max_batch=64)
    i = len(store.events("tick"))  # resume after the last fully recorded unit
    print("start", i, store.resumed, flush=True)
    pad = "x" * 400
    while True:
        store.record_candidate(f"c{i}", {"p": f"text {i} " + pad}, [f"c{i - 1}"], "reflection", float(i))
        store.record_evaluation(f"c{i}", "val", i, i / 1000, {"acc": float(i)}, None, f"m{i}", None,
                                json.dumps({"i": i, "pad": pad}), None, i, 0.0)
        store.record_event("tick", {"i": i})
        i += 1
        if i % 20 == 0:
            time.sleep(0.001)  # like an event loop awaiting I/O: lets the writer thread run
    """
)


def _write_until_killed(log_dir: Path, min_evals: int) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, _package_dir(), str(log_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("start"), proc.stderr.read()
        start = int(line.split()[1])
        conn = sqlite3.connect(str(log_dir / DB_FILENAME))
        try:
            deadline = time.monotonic() + 20
            while conn.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] < start + min_evals:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the writer subprocess made no progress"
                time.sleep(0.005)
        finally:
            conn.close()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:  # pragma: no cover - only if an assertion fired above
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    return start


def _check_consistent_prefix(log_dir: Path) -> int:
    conn = sqlite3.connect(str(log_dir / DB_FILENAME))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    with RunStore.open(log_dir, {"run": "kill-test"}) as store:
        assert store.resumed
        cands = store.load_candidates()
        evals = store.load_evaluations()
        ticks = [e.payload["i"] for e in store.events("tick")]
    n_c, n_e, n_t = len(cands), len(evals), len(ticks)
    # Rows commit in recording order (candidate i, evaluation i, tick i, candidate i+1, ...): what
    # survives is a prefix of that sequence, with no gap and no row from after a lost one.
    assert ticks == list(range(n_t))
    assert [e.example_id for e in evals] == list(range(n_e))
    assert [c.fingerprint for c in cands] == [f"c{i}" for i in range(n_c)]
    assert n_t <= n_e <= n_t + 1 and n_e <= n_c <= n_e + 1
    for e in evals:  # every field of every row is whole
        i = e.example_id
        assert (e.fingerprint, e.score, e.objective_scores, e.message, e.tokens) == (
            f"c{i}",
            i / 1000,
            {"acc": float(i)},
            f"m{i}",
            i,
        )
        assert json.loads(e.trajectory_json) == {"i": i, "pad": "x" * 400}
    for i, c in enumerate(cands):
        assert c.texts == {"p": f"text {i} " + "x" * 400} and c.parents == (f"c{i - 1}",)
    return n_t


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_sigkill_leaves_a_consistent_prefix(tmp_path: Path) -> None:
    log_dir = tmp_path / "killed"
    start = _write_until_killed(log_dir, min_evals=300)
    assert start == 0
    first = _check_consistent_prefix(log_dir)
    assert first >= 299  # everything the parent saw committed survived the kill

    # Kill a resumed writer too: the second session continues the first one's prefix.
    start = _write_until_killed(log_dir, min_evals=300)
    assert start == first
    second = _check_consistent_prefix(log_dir)
    assert second >= first + 299

    with RunStore.open(log_dir, {"run": "kill-test"}) as store:
        sessions = store.sessions()
    assert [s.resumed for s in sessions] == [False, True, True, True, True]
    killed = [s.id for s in sessions if s.closed_at is None and s.id != sessions[-1].id]
    assert killed == [1, 3]  # the killed writers never closed; the checking opens did


# ----------------------------------------------------------------------------------- secrets

FAKE_KEY = "tgq-FAKE-9f8e7d6c5b4a3210-do-not-store"
FAKE_SK = "sk-proj-Abc123Def456Ghi789Jkl012Mno345"
FAKE_BEARER = "Bearer eyJhbGciOiJIUzI1NiJ9.e30.ZRrHA1JJJW8opsbCGfG_HACGpVUMN_a9IV7pAx_Zmeo"


def test_secrets_never_reach_the_database_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOGEPA_TEST_API_KEY", FAKE_KEY)
    log_dir = tmp_path / "run"
    meta = {
        "api_key": FAKE_KEY,
        "lm": {"model": "openai/gpt-4.1", "kwargs": {"apiKey": FAKE_SK, "headers": {"Authorization": FAKE_BEARER}}},
        "note": f"configured with {FAKE_KEY} and visible-meta-marker",
        "list": [FAKE_SK, "fine"],
    }
    run_key = {**RUN_KEY, "student": f"student-{FAKE_KEY}"}
    store = RunStore.open(log_dir, run_key, meta)
    store.record_event(
        "run_started",
        {
            "request": {"headers": {"x-api-key": FAKE_KEY}},
            "cmd": f"curl -H '{FAKE_BEARER}'",
            "m": "visible-event-marker",
        },
    )
    store.record_event("error", {"text": f"AuthenticationError: Incorrect API key provided: {FAKE_SK}"})
    store.record_evaluation(
        "fp",
        "val",
        0,
        0.0,
        None,
        "program_error",
        f"AuthenticationError: invalid key {FAKE_KEY} (visible-message-marker)",
        "AuthenticationError",
        json.dumps({"inputs": {"q": f"use {FAKE_KEY}"}, "note": "visible-trajectory-marker", "sk": FAKE_SK}),
        json.dumps({"answer": FAKE_KEY}),
        None,
        None,
    )
    store.record_candidate("fp", {"p": f"Instruction with {FAKE_KEY} visible-candidate-marker"}, [], "seed", 0.0)
    assert store.record_proposal("k-ok", {"p": "clean"}, "proposer_error", f"failed with {FAKE_SK}", 1)
    assert not store.record_proposal("k-secret", {"p": f"leaks {FAKE_KEY}"}, None, None, 1)
    store.flush()

    def raw_bytes() -> bytes:
        files = sorted(log_dir.glob(DB_FILENAME + "*"))
        assert log_dir / DB_FILENAME in files
        return b"".join(f.read_bytes() for f in files)

    data = raw_bytes()
    assert (log_dir / (DB_FILENAME + "-wal")).exists()  # rows are still only in the WAL: it was searched
    for marker in ("meta", "event", "message", "trajectory", "candidate"):
        assert f"visible-{marker}-marker".encode() in data  # the search would find a stored string
    for secret in (FAKE_KEY, FAKE_SK, FAKE_BEARER, FAKE_BEARER.split()[1]):
        assert secret.encode() not in data, f"{secret[:12]}... was persisted"
    assert REDACTED.encode() in data

    # What was stored is still usable.
    ev = store.load_evaluations()[0]
    assert json.loads(ev.trajectory_json)["note"] == "visible-trajectory-marker"
    assert json.loads(ev.output_json) == {"answer": REDACTED}
    assert list(store.load_proposals()) == ["k-ok"]
    assert store.meta["api_key"] == REDACTED and store.meta["lm"]["model"] == "openai/gpt-4.1"
    store.close()
    for secret in (FAKE_KEY, FAKE_SK, FAKE_BEARER):
        assert secret.encode() not in raw_bytes()
    # The run key is compared masked, so the same run still opens.
    with RunStore.open(log_dir, run_key) as again:
        assert again.resumed


def test_redact_keys_and_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-value-123456")
    monkeypatch.setenv("SHORT_KEY", "short")  # < 8 characters: not treated as a secret
    monkeypatch.setenv("HOME_DIR_FOR_TEST", "plain-value-not-secret")  # name has no secret marker
    obj = {
        "API_KEY": "anything",
        "x-api-key": "anything",
        "Authorization": "anything",
        "password": 12345678,
        "client_secret": ["a", "b"],
        "access_token": "abc",
        "api_key_unset": None,
        "apikey": None,
        "secret": True,
        "max_tokens": 1000,
        "tokens": 55,
        "prompt_tokens": 3,
        "model": "openai/gpt-4.1",
        "nested": [{"token": "t"}, ("uses tok-value-123456 here", "short", "plain-value-not-secret")],
        "text": f"call with {FAKE_SK}, then Bearer abcdefgh12345678ijkl",
    }
    out = redact(obj)
    for key in ("API_KEY", "x-api-key", "Authorization", "password", "client_secret", "access_token"):
        assert out[key] == REDACTED, key
    assert out["apikey"] is None and out["secret"] is True  # None/bool say nothing secret
    assert (out["max_tokens"], out["tokens"], out["prompt_tokens"]) == (1000, 55, 3)
    assert out["model"] == "openai/gpt-4.1"
    assert out["nested"] == [{"token": REDACTED}, [f"uses {REDACTED} here", "short", "plain-value-not-secret"]]
    assert out["text"] == f"call with {REDACTED}, then {REDACTED}"
    assert obj["API_KEY"] == "anything"  # the input is not modified
    assert redact("tok-value-123456") == REDACTED  # a value equal to a secret env var
    monkeypatch.setenv("MY_SERVICE_TOKEN", "a-rotated-value-99")  # env changes are seen at once
    assert redact("tok-value-123456") == "tok-value-123456"
    assert redact("a-rotated-value-99") == REDACTED


def test_json_masking_finds_escaped_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = 'pä"ss\\wörd-123'
    monkeypatch.setenv("ODD_PASSWORD", odd)
    for ensure_ascii in (True, False):
        doc = json.dumps({"a": [f"x {odd} y"], "b": 1}, ensure_ascii=ensure_ascii)
        assert odd not in doc  # only its escaped spelling is in the text
        masked = redaction.mask_json_text(doc)
        assert json.loads(masked) == {"a": [f"x {REDACTED} y"], "b": 1}
    assert redaction.mask_json_text("not json " + odd) == "not json " + REDACTED


def test_text_masking_leaves_prose_alone() -> None:
    prose = (
        "Use sk-learn-compatible-estimator style. The task-specific instructions mention a Bearer "
        "instrument and the token budget. ask-questions-about-the-document."
    )
    assert not contains_secret(prose)
    assert mask_text(prose) == prose
    for key in (
        FAKE_SK,
        "sk-ant-api03-AbCdEf0123456789xyz",
        "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv",
        "ghp_" + "A1b2" * 9,
        "github_pat_11AB" + "cD3_" * 8,
        "hf_" + "aB3d" * 9,
        "AKIAIOSFODNN7EXAMPLE",
        "xoxb-1234567890-abcdef",
    ):
        assert mask_text(f"key={key};") == f"key={REDACTED};", key
    assert is_sensitive_key("OPENAI_API_KEY") and is_sensitive_key("aws_secret_access_key")
    assert not is_sensitive_key("max_tokens") and not is_sensitive_key("keywords") and not is_sensitive_key(3)


# ----------------------------------------------------------------------------------- misc


def test_stable_hash() -> None:
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash("x")) == 32
    with pytest.raises(TypeError):
        stable_hash(object())


def test_store_code_uses_json_only_and_no_dspy() -> None:
    package = Path(store_pkg.__file__).parent
    for source in [*package.glob("*.py"), Path(redaction.__file__)]:
        text = source.read_text()
        for forbidden in (
            "import pickle",
            "pickle.",
            " eval(",
            "exec(",
            "import dspy",
            "from dspy import",
            "from dspy.",
        ):
            assert forbidden not in text, f"{forbidden!r} in {source.name}"


def test_run_secrets_are_masked_only_inside_their_context() -> None:
    import contextvars

    from dspy_turbogepa.redaction import REDACTED, mask_text
    from dspy_turbogepa.store import run_secrets

    key, other, short = "prov-0a9b8c7d6e5f4a3b", "zz-999888777666", "abc"
    text = f"error: {key} / {other} / {short}"
    assert mask_text(text) == text
    with run_secrets([key, short, None]):
        assert mask_text(text) == f"error: {REDACTED} / {other} / {short}"  # too short to be a key: kept
        with run_secrets([other]):  # nested (a compile inside a compile): both masked
            assert mask_text(text) == f"error: {REDACTED} / {REDACTED} / {short}"
        copied = contextvars.copy_context()  # what the engine thread and DSPy's workers run in
        assert copied.run(mask_text, text) == f"error: {REDACTED} / {other} / {short}"
    assert mask_text(text) == text  # nothing left behind


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_deleting_the_lock_file_by_hand_does_not_let_a_second_compile_in(tmp_path: Path) -> None:
    """Removing a "stale" run.lock is a common habit: the next compile then locked a new file and opened
    the store beside the running one, paying for its evaluations twice. The directory is locked too."""
    from dspy_turbogepa.store.locks import LOCK_FILENAME

    first = RunStore.open(tmp_path, RUN_KEY)
    (tmp_path / LOCK_FILENAME).unlink()
    with pytest.raises(RunStoreError, match="in use by another compile.*pid unknown"):
        RunStore.open(tmp_path, RUN_KEY)
    code = textwrap.dedent(f"""
        from dspy_turbogepa.store import RunStore, RunStoreError
        try:
            RunStore.open({str(tmp_path)!r}, {RUN_KEY!r})
        except RunStoreError as exc:
            print("refused:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "refused:" in out.stdout and "in use by another compile" in out.stdout, out.stdout + out.stderr
    first.close()
    with RunStore.open(tmp_path, RUN_KEY) as again:
        assert again.session == 2


def test_a_log_dir_in_use_by_a_running_session_is_refused_until_it_closes(tmp_path: Path) -> None:
    """Two compiles of one run at once would each replay the store as it was and pay twice: the second
    open is refused while the first session is open, in this process or another, and a killed process
    leaves no stale lock."""
    first = RunStore.open(tmp_path, RUN_KEY)
    with pytest.raises(RunStoreError, match=f"in use by another compile.*pid {os.getpid()}"):
        RunStore.open(tmp_path, RUN_KEY)
    first.close()
    with RunStore.open(tmp_path, RUN_KEY) as again:
        assert again.session == 2

    code = textwrap.dedent(f"""
        import sys, time
        from dspy_turbogepa.store import RunStore
        store = RunStore.open({str(tmp_path)!r}, {RUN_KEY!r})
        print("open", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        with pytest.raises(RunStoreError, match=f"pid {proc.pid}"):
            RunStore.open(tmp_path, RUN_KEY)
    finally:
        proc.kill()
        proc.wait()
    with RunStore.open(tmp_path, RUN_KEY) as after_kill:  # the kernel released the dead process's lock
        assert after_kill.session == 4


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    """flock failing for another reason than contention (ENOLCK on some NFS / FUSE mounts) must not
    make the log_dir unusable: the store opens unlocked and says so."""
    import errno
    import fcntl
    import logging

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING), RunStore.open(tmp_path, RUN_KEY) as store:
        assert store.session == 1
    assert any("Cannot lock" in r.getMessage() for r in caplog.records)


def test_the_usage_of_a_replaced_evaluation_or_proposal_still_counts(tmp_path: Path) -> None:
    """A row recorded again replaces the earlier one, but the LM billed both attempts (a resumed run re-runs
    an LM-service failure, a failed proposer, a validation row kept without its output): total_usage, from
    which a resumed run's tokens, cost and caps start, counts both."""
    with RunStore.open(tmp_path, RUN_KEY) as store:
        for cost in (1.0, 2.0):
            store.record_evaluation("fp", "val", 0, 0.5, None, None, None, None, None, None, None, None,
                                    usage={"prompt_tokens": 10, "completion_tokens": 1, "cost": cost})
            store.record_proposal("k", {"p": "x"}, None, None, 1,
                                  usage={"prompt_tokens": 100, "completion_tokens": 5, "cost": cost})
        store.record_evaluation("fp", "train", 0, 0.5, None, None, None, None, None, None, None, None)  # no usage
        store.flush()
        assert store.total_usage() == {
            "evaluations": {"prompt_tokens": 20, "completion_tokens": 2, "cost": 3.0},
            "proposals": {"prompt_tokens": 200, "completion_tokens": 10, "cost": 3.0},
        }
        assert [(e.score, e.usage) for e in store.load_evaluations() if e.split == "val"] == [
            (0.5, {"prompt_tokens": 10.0, "completion_tokens": 1.0, "cost": 2.0})]  # the row is the last attempt


def test_a_per_session_part_may_change_and_each_session_records_its_value(tmp_path):
    """``session_parts`` (TurboGEPA's reflection): not compared at open; each session records its value,
    and sessions_sharing names the sessions that ran with this one's, a session that recorded none (a
    store written before) counting with the run key's stored value. Every other part is still compared."""
    key_a = {**RUN_KEY, "reflection": "a" * 32}
    key_b = {**RUN_KEY, "reflection": "b" * 32}
    old = RunStore.open(tmp_path, key_a)  # an earlier version's session: nothing recorded per session
    old.close()
    for key in (key_a, key_b):
        s = RunStore.open(tmp_path, key, session_parts=("reflection",))
        s.close()
    s = RunStore.open(tmp_path, key_b, session_parts=("reflection",))
    try:
        assert s.session == 4 and s.sessions_sharing("reflection") == {3, 4}
        assert s.sessions()[3].meta["session_run_key"] == {"reflection": "b" * 32}
    finally:
        s.close()
    s = RunStore.open(tmp_path, key_a, session_parts=("reflection",))
    try:
        assert s.sessions_sharing("reflection") == {1, 2, 5}
    finally:
        s.close()
    with pytest.raises(RunStoreMismatchError) as info:  # without session_parts the part is compared
        RunStore.open(tmp_path, key_b)
    assert info.value.changed == ("reflection",)
    with pytest.raises(RunStoreMismatchError) as info:
        RunStore.open(tmp_path, {**key_b, "seed": "1"}, session_parts=("reflection",))
    assert info.value.changed == ("seed",)


def test_a_lock_file_that_cannot_be_opened_is_not_advice_to_delete_the_results(tmp_path: Path) -> None:
    """A store review: ``run.lock`` owned by another user (here: a directory) was refused with the advice to
    delete ``run.sqlite3*``, which throws away the paid results and leaves the lock file as it was."""
    RunStore.open(tmp_path, RUN_KEY).close()
    (tmp_path / "run.lock").unlink()
    (tmp_path / "run.lock").mkdir()
    with pytest.raises(RunStoreError, match="lock file") as refused:
        RunStore.open(tmp_path, RUN_KEY)
    assert "run.sqlite3" not in str(refused.value) and "not affected" in str(refused.value)


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    """A store review: ``run.lock`` linked to a file outside the log_dir was followed, and the file it
    pointed to truncated to the pid (a link planted in a shared log_dir)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("someone else's data\n")
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    (log_dir / "run.lock").symlink_to(victim)
    with pytest.raises(RunStoreError, match="lock file") as refused:
        RunStore.open(log_dir, RUN_KEY)
    assert "not affected" in str(refused.value)
    assert victim.read_text() == "someone else's data\n"


def test_a_writer_still_committing_after_close_gave_up_waiting_keeps_the_log_dir_locked(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """A store review: close() waits a bounded time for the writer; on a stalled disk it released the
    log_dir while the writer was still committing, so a second compile could start beside it and pay
    again for the rows not yet committed. The lock now goes when the writer is done."""
    from dspy_turbogepa.store import writer as writer_mod
    from dspy_turbogepa.store.locks import RunLock

    stalled, transaction = threading.Event(), writer_mod.Writer._transaction

    def stalling(self, rows):
        stalled.wait(30)
        return transaction(self, rows)

    stop = writer_mod.Writer.stop
    monkeypatch.setattr(writer_mod.Writer, "_transaction", stalling)
    monkeypatch.setattr(writer_mod.Writer, "stop", lambda self, final=None, timeout=30.0: stop(self, final, 0.2))
    store = RunStore.open(tmp_path, RUN_KEY)
    _eval(store, "fp", 0)
    store.close()  # gives up waiting after 0.2 s
    with pytest.raises(RunStoreError, match="this process: .* run store still committing"):
        RunLock.acquire(tmp_path)
    stalled.set()
    deadline = time.monotonic() + 10
    while True:  # released once the writer has committed
        try:
            RunLock.acquire(tmp_path).release()
            break
        except RunStoreError:
            assert time.monotonic() < deadline, "the lock was never released"
            time.sleep(0.05)
    monkeypatch.undo()
    with RunStore.open(tmp_path, RUN_KEY) as again:
        assert len(list(again.load_evaluations())) == 1


def test_a_writer_that_finished_as_the_wait_timed_out_is_not_reported_dead() -> None:
    """A store review: ``close()`` warned "the run store writer ... died: None" on 8 of 300 closes under
    load, with every row committed: the writer marks the stop done and exits between the wait's timeout
    and the is_alive() check."""
    import threading
    import types

    from dspy_turbogepa.store.writer import Writer, _Stop

    class LateEvent(threading.Event):
        def wait(self, timeout=None):  # times out, and the writer marks it done right after
            if self.is_set():
                return True
            self.set()
            return False

    marker = _Stop()
    marker.done = LateEvent()
    finished = threading.Thread(target=lambda: None)
    finished.start()
    finished.join()
    Writer._wait(types.SimpleNamespace(thread=finished, path="x", fatal=None), marker, 1.0)  # type: ignore[arg-type]


def test_a_damaged_index_page_is_refused_at_open(tmp_path: Path) -> None:
    """A store review: 64 bytes overwritten in the evaluations' unique index went unnoticed at open (the
    rows are read back by table scans): the resumed run paid for its whole search, every row failed with
    "database disk image is malformed", and every rerun did the same. quick_check reads every page."""
    import random
    import sqlite3

    with RunStore.open(tmp_path, RUN_KEY) as store:
        for i in range(2000):  # an index of many pages: the open reads its first one
            _eval(store, f"candidate-{i // 10:04d}-" + "f" * 40, i)
    db = tmp_path / "run.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    name = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'evaluations' AND sql IS "
                        "NULL").fetchone()[0]  # the UNIQUE constraint's own index
    pages = [p for (p,) in conn.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' "
                                        "ORDER BY pageno", (name,))]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    assert len(pages) > 3, pages
    with open(db, "r+b") as fh:
        fh.seek((pages[-1] - 1) * page_size)
        fh.write(bytes(random.Random(1).randrange(256) for _ in range(64)))
    with pytest.raises(RunStoreError, match=r"(?s)is damaged \(SQLite's quick_check: .*Use a new log_dir"):
        RunStore.open(tmp_path, RUN_KEY)


@pytest.mark.parametrize("meta", [
    "CREATE TABLE meta (key TEXT, value TEXT)",
    "CREATE TABLE meta (name TEXT, content TEXT)",
    "CREATE TABLE meta (key TEXT, value TEXT); INSERT INTO meta VALUES ('schema_version', '3')",
], ids=["no-version", "other-columns", "our-version"])
def test_another_applications_database_with_a_meta_table_is_refused_untouched(tmp_path: Path, meta: str) -> None:
    """A store review: a foreign database whose table is called `meta` was switched to WAL before being
    refused (with "schema_version None", or "no such column: value"), and with a `schema_version` row of
    ours the run store's tables were created inside it and the compile ran there."""
    tmp_path.joinpath("x").mkdir()
    conn = _raw(tmp_path / "x")
    conn.executescript(f"{meta}; CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine');")
    conn.close()
    before = (tmp_path / "x" / DB_FILENAME).read_bytes()
    with pytest.raises(RunStoreMismatchError, match="not a run store"):
        RunStore.open(tmp_path / "x", RUN_KEY)
    assert (tmp_path / "x" / DB_FILENAME).read_bytes() == before
    assert not (tmp_path / "x" / f"{DB_FILENAME}-wal").exists()


def test_opening_a_store_another_process_holds_waits_in_steps_a_ctrl_c_can_reach(tmp_path: Path) -> None:
    """A store review: SQLite's busy wait sleeps in C, so a compile waiting on a store another program held
    ignored Ctrl-C for up to 30 s (SIGINT at 8.3 s, KeyboardInterrupt at 38.5 s). The open now waits in
    100 ms steps: here a Ctrl-C (SIGALRM standing in for it) lands within one, and once the other side
    lets go the open goes through."""
    import signal
    import threading
    import time

    RunStore.open(tmp_path, RUN_KEY).close()
    holder = sqlite3.connect(str(tmp_path / DB_FILENAME), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            RunStore.open(tmp_path, RUN_KEY)
        assert time.monotonic() - started < 3.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    release = threading.Timer(0.5, lambda: holder.execute("ROLLBACK"))
    release.start()
    try:
        store = RunStore.open(tmp_path, RUN_KEY)
        store.close()
    finally:
        release.join()
        holder.close()


def test_a_writer_stop_that_gave_up_waiting_does_not_wait_as_long_again_to_join(tmp_path: Path) -> None:
    """A store review: on a stuck store the end of a compile took ~90 s (the flush's 30 s, the close's
    30 s, then 30 s more joining the writer whose wait had already given up)."""
    import time

    from dspy_turbogepa.store.writer import Writer

    RunStore.open(tmp_path, RUN_KEY).close()
    holder = sqlite3.connect(str(tmp_path / DB_FILENAME), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    writer = Writer(tmp_path / DB_FILENAME, 0.01, 10)
    joins: list[float | None] = []
    real_join = writer.thread.join
    writer.thread.join = lambda timeout=None: (joins.append(timeout), real_join(timeout))  # type: ignore[method-assign]
    writer.put("INSERT INTO events (kind, payload_json, recorded_at, session) VALUES ('x', '{}', 0, 1)", ())
    time.sleep(0.1)  # the writer is inside SQLite's busy wait now
    writer.stop(timeout=0.3)
    assert joins == [0.1]
    holder.execute("ROLLBACK")
    holder.close()
    real_join(35)
    assert not writer.thread.is_alive()


def test_a_ctrl_c_as_the_store_opens_leaves_no_writer_thread_or_lock_behind(tmp_path: Path, monkeypatch) -> None:
    """A review: a Ctrl-C after the writer's thread started and before the store's finalizer owned it left
    the thread and its connection open for the life of the process (the log_dir still usable)."""
    import threading
    import weakref

    from dspy_turbogepa.store import sqlite_store

    real_finalize = weakref.finalize
    calls = {"n": 0}

    def interrupted_finalize(*args, **kwargs):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(sqlite_store.weakref, "finalize", interrupted_finalize)
    with pytest.raises(KeyboardInterrupt):
        RunStore.open(tmp_path, RUN_KEY)
    monkeypatch.setattr(sqlite_store.weakref, "finalize", real_finalize)
    assert calls["n"] == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("turbogepa-run-store:") and
                str(tmp_path) in t.name and t.is_alive()]
    RunStore.open(tmp_path, RUN_KEY).close()  # the lock was released


def test_a_row_lost_to_a_damaged_file_says_to_start_over_and_one_lost_to_a_full_disk_does_not(
        tmp_path: Path, caplog) -> None:
    """A store review: corruption found mid-run was warned like a full disk (which mends once space is
    freed), with no word that the file is damaged and the session's work is not kept."""
    import logging

    from dspy_turbogepa.store.writer import Writer

    RunStore.open(tmp_path, RUN_KEY).close()
    writer = Writer(tmp_path / DB_FILENAME, 0.01, 10)
    row = [("INSERT INTO events (kind, payload_json, recorded_at, session) VALUES (?, ?, ?, ?)", ("x", "{}", 0, 1))]
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        writer._failed(row, sqlite3.OperationalError("database or disk is full"))
        writer._failed(row, sqlite3.DatabaseError("database disk image is malformed"))
    writer.stop()
    full, damaged = [r.getMessage() for r in caplog.records if "a row was not saved" in r.getMessage()]
    assert "The database file is damaged" not in full and "Use a new log_dir" not in full
    assert "The database file is damaged" in damaged and "Use a new log_dir" in damaged
    from dspy_turbogepa.store.writer import _damaged

    assert not _damaged(ValueError("malformed node or string"))  # not SQLite's verdict
    assert _damaged(sqlite3.DatabaseError("file is not a database"))


def test_a_second_ctrl_c_while_the_store_closes_says_what_it_leaves_unstored(tmp_path: Path, caplog,
                                                                             monkeypatch) -> None:
    """A store review: three presses at the end of a compile on a stuck store returned at once with 52 of
    64 evaluations unstored, and nothing said so."""
    import logging

    from dspy_turbogepa.store.writer import Writer

    RunStore.open(tmp_path, RUN_KEY).close()
    holder = sqlite3.connect(str(tmp_path / DB_FILENAME), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    writer = Writer(tmp_path / DB_FILENAME, 0.01, 1)
    for i in range(5):
        writer.put("INSERT INTO events (kind, payload_json, recorded_at, session) VALUES ('x', '{}', ?, 1)", (i,))

    def pressed(marker, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_wait_to_close", pressed)
    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"), pytest.raises(KeyboardInterrupt):
        writer.stop()
    said = [r.getMessage() for r in caplog.records if "stopped waiting for its last rows" in r.getMessage()]
    holder.execute("ROLLBACK")
    holder.close()
    writer.thread.join(35)
    assert len(said) == 1 and "still queued are not stored" in said[0], said
