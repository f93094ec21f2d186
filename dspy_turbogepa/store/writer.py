"""The run store's writer: rows queued from any thread, committed by one thread in small transactions.

A caller never waits on the disk (an evaluation finishing must not stall the engine), and a killed
process loses at most the rows queued since the last commit. It holds no reference to the store, so
an abandoned store can be collected and its finalizer can stop the writer.
"""

from __future__ import annotations

import logging
import queue
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from dspy_turbogepa.log_once import FirstOfKind
from dspy_turbogepa.store.errors import START_OVER, RunStoreError

__all__ = ["Writer", "connect", "encodable", "escape_surrogates", "sqlite_says"]

logger = logging.getLogger("dspy_turbogepa.store.sqlite_store")


def sqlite_says(exc: BaseException, codes: tuple[str, ...], messages: tuple[str, ...]) -> bool:
    """Whether SQLite itself reported ``exc`` with one of these result codes (``sqlite_errorname``,
    Python 3.11+) or, before 3.11, whose errors carry no name, a message holding one of these parts."""
    if not isinstance(exc, sqlite3.Error):
        return False
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        return name.startswith(codes)
    text = str(exc).lower()
    return any(part in text for part in messages)


def _damaged(exc: BaseException) -> bool:
    """SQLite's own verdict that the file is damaged (or not a database), not that the disk refused."""
    return sqlite_says(exc, ("SQLITE_CORRUPT", "SQLITE_NOTADB"), ("malformed", "not a database"))


def connect(path: Path) -> sqlite3.Connection:
    """A connection any thread may use (the writer's own thread, a reader's), autocommit (transactions
    are explicit), waiting up to 30 s on a lock another process holds."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def encodable(row: tuple[str, tuple[Any, ...]]) -> tuple[str, tuple[Any, ...]]:
    """``row`` with each lone surrogate in its text written as a JSON escape (``\\udce9``), which SQLite's
    UTF-8 can store. In a JSON column (every structured one: texts, outputs, traces) the escape sits
    inside a string literal and loads back as the same character, so nothing is lost; in a plain text
    column (a message) it reads as the escape. Only rows that failed are rewritten: the fast path
    never scans."""
    sql, params = row

    def escaped(value: Any) -> Any:
        if not isinstance(value, str) or value.isascii():
            return value
        return _LONE_SURROGATE.sub(_escape, value)

    return sql, tuple(escaped(v) for v in params)


def escape_surrogates(text: str) -> str:
    """``text`` with each lone surrogate as its JSON escape (see :func:`encodable`): for what is written
    outside the writer (meta, the session's row)."""
    return text if text.isascii() else _LONE_SURROGATE.sub(_escape, text)


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class _Stop(_Flush):
    __slots__ = ()


class Writer:
    """Owns the writing connection; batches queued rows into transactions on its own thread.

    Holds no reference to the :class:`RunStore`, so an abandoned store can be collected and its
    finalizer can stop the writer (also at interpreter exit).
    """

    def __init__(self, path: Path, commit_interval: float, max_batch: int) -> None:
        self.path = path
        self.commit_interval = commit_interval
        self.max_batch = max_batch
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.closed = False
        self.committed_rows = 0
        self.ignored_rows = 0
        self.failed_rows = 0
        self.unreported_errors: list[str] = []  # the first 100 messages since the last take_errors()
        self.unreported_rows = 0  # every row that failed since then
        #: error types already reported at WARNING (a full disk fails every row the same way)
        self.warned_errors = FirstOfKind()
        self.fatal: BaseException | None = None
        self.conn = connect(path)
        try:
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.thread = threading.Thread(target=self._run, name=f"turbogepa-run-store:{path}", daemon=True)
            self.thread.start()
        except BaseException:  # the store's open fails with this error: no connection or thread is left behind
            if getattr(self, "thread", None) is not None and self.thread.is_alive():
                self.queue.put(_Stop())  # the thread closes the connection as it ends
            else:
                self.conn.close()
            raise

    # -- caller side
    def put(self, sql: str, params: tuple[Any, ...]) -> None:
        with self.lock:
            if self.closed:
                raise RunStoreError(f"the run store at {self.path} is closed")
            if self.fatal is not None:
                raise RunStoreError(f"the run store writer for {self.path} died: {self.fatal!r}")
            self.queue.put((sql, params))

    def flush(self, timeout: float | None = None) -> None:
        with self.lock:
            if self.closed:
                return
            marker = _Flush()
            self.queue.put(marker)
        self._wait(marker, timeout)

    def stop(self, final: tuple[str, tuple[Any, ...]] | None = None, timeout: float | None = 30.0) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if final is not None:
                self.queue.put(final)
            marker = _Stop()
            self.queue.put(marker)
        try:
            self._wait_to_close(marker, timeout)
        except KeyboardInterrupt:
            # the wait is bounded: finish it, so what was queued is committed, then pass the Ctrl-C on (a
            # second one stops the waiting, and says what that leaves unstored)
            try:
                self._wait_to_close(marker, timeout)
                self._join(marker, timeout)
            except KeyboardInterrupt:
                if not marker.done.is_set():
                    logger.warning("Run store %s: stopped waiting for its last rows; about %d still queued are not "
                                   "stored (a rerun with this log_dir pays for them again)", self.path,
                                   max(0, self.queue.qsize() - 1))
                raise
            raise
        self._join(marker, timeout)

    def _join(self, marker: _Flush, timeout: float | None) -> None:
        """The thread ends right after it marks the stop done; if the wait gave up first (a stuck disk),
        joining it for as long again only doubled the end of a compile (30 s more, then 30 s at exit)."""
        self.thread.join(timeout if marker.done.is_set() else 0.1)

    def _wait_to_close(self, marker: _Flush, timeout: float | None) -> None:
        try:
            self._wait(marker, timeout)
        except RunStoreError as exc:  # also runs as a finalizer: report, never raise
            logger.warning("Run store %s did not close cleanly: %s", self.path, exc)

    def _wait(self, marker: _Flush, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not marker.done.wait(0.05):
            # the writer marks the marker done and then exits: between this wait's timeout and the check
            # it may have done both (a false "writer died: None" when everything was committed)
            if not self.thread.is_alive() and not marker.done.is_set():
                raise RunStoreError(f"the run store writer for {self.path} died: {self.fatal!r}")
            if deadline is not None and time.monotonic() > deadline:
                raise RunStoreError(f"timed out after {timeout}s waiting for the run store at {self.path}")

    def take_errors(self) -> tuple[int, list[str]]:
        """Rows that failed since the last call, and (at most 100 of) their messages."""
        with self.lock:
            errors, self.unreported_errors = self.unreported_errors, []
            rows, self.unreported_rows = self.unreported_rows, 0
        return rows, errors

    # -- writer thread
    def _run(self) -> None:
        try:
            stop = False
            while not stop:
                rows: list[tuple[str, tuple[Any, ...]]] = []
                markers: list[_Flush] = []
                item = self.queue.get()
                deadline = time.monotonic() + self.commit_interval
                while True:
                    if isinstance(item, _Flush):
                        markers.append(item)
                        stop = stop or isinstance(item, _Stop)
                        break  # somebody is waiting: commit now
                    rows.append(item)
                    if len(rows) >= self.max_batch:
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = self.queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if rows:
                    self._write(rows)
                for marker in markers:
                    marker.done.set()
        except BaseException as exc:  # pragma: no cover - a bug; surfaced by flush()/close()
            self.fatal = exc
            logger.exception("The run store writer for %s stopped", self.path)
        finally:
            try:
                self.conn.close()
            except sqlite3.Error:  # pragma: no cover - nothing left to lose, but say so
                logger.warning("Closing the run store %s failed", self.path, exc_info=True)

    def _write(self, rows: list[tuple[str, tuple[Any, ...]]]) -> None:
        try:
            self._transaction(rows)
            return
        except Exception as exc:  # noqa: BLE001 - sqlite3.Error, or OverflowError for an out-of-range integer
            self._rollback()
            if len(rows) == 1 and not isinstance(exc, UnicodeEncodeError):
                self._failed(rows, exc)
                return
        for row in rows:  # one bad row must not cost the whole batch
            try:
                self._transaction([encodable(row)])
            except Exception as exc:  # noqa: BLE001 - same as above
                self._rollback()
                self._failed([row], exc)

    def _transaction(self, rows: list[tuple[str, tuple[Any, ...]]]) -> None:
        conn = self.conn
        conn.execute("BEGIN")
        inserted = 0
        for sql, params in rows:
            inserted += conn.execute(sql, params).rowcount
        conn.execute("COMMIT")
        self.committed_rows += inserted
        self.ignored_rows += len(rows) - inserted

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:  # pragma: no cover - later writes will fail and be counted as lost rows
            logger.warning("Rolling back a failed write to the run store %s failed", self.path, exc_info=True)

    def _failed(self, rows: list[tuple[str, tuple[Any, ...]]], exc: Exception) -> None:
        table = rows[0][0].split(" INTO ")[-1].split(" ")[0] if " INTO " in rows[0][0] else "sessions"
        message = f"{type(exc).__name__}: {exc} (writing {table})"
        with self.lock:
            self.failed_rows += len(rows)
            self.unreported_rows += len(rows)
            if len(self.unreported_errors) < 100:
                self.unreported_errors.append(message)
        first = self.warned_errors.first(type(exc).__name__)
        # a damaged file, unlike a full disk, does not mend: say so, and what to do with it after the run
        damaged = _damaged(exc)
        logger.log(logging.WARNING if first else logging.DEBUG, "Run store %s: a row was not saved: %s%s%s",
                   self.path, message,
                   f". The database file is damaged: what this session finds is not kept; after the run, "
                   f"{START_OVER.format(log_dir=self.path.parent)}" if damaged else "",
                   " (further rows failing so are logged at DEBUG; the count is reported at the end)"
                   if first else "")
