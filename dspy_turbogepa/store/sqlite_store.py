"""Crash-safe SQLite run store: every candidate, evaluation, proposal and event of a run, as it happens.

Writes are queued by the caller (any thread, never blocking on disk) and committed by one writer
thread in small transactions (every ``commit_interval`` seconds or ``max_batch`` rows). The database
is in WAL mode with ``synchronous=NORMAL``: a killed process loses at most the rows queued since the
last commit, never a committed row, and never leaves half a row. See ``docs/run_store.md``.

Only the standard library is used, and only JSON is stored (no pickle).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import sqlite3
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dspy_turbogepa.redaction import (
    contains_secret,
    mask_json_text,
    mask_text,
    redact,
    secret_values,
)
from dspy_turbogepa.store.errors import START_OVER, RunStoreError, RunStoreMismatchError
from dspy_turbogepa.store.locks import RunLock
from dspy_turbogepa.store.writer import Writer, escape_surrogates, sqlite_says
from dspy_turbogepa.store.writer import connect as _connect

logger = logging.getLogger(__name__)

DB_FILENAME = "run.sqlite3"
SCHEMA_VERSION = 3  # 2: evaluations.service_failure; a later record of a key replaces the earlier;
#   3: usage_json (tokens, cost) of evaluations and proposals

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS run_key (
    component TEXT PRIMARY KEY,
    value     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id          INTEGER PRIMARY KEY,
    opened_at   REAL NOT NULL,
    closed_at   REAL,
    resumed     INTEGER NOT NULL,
    pid         INTEGER NOT NULL,
    meta_json   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS candidates (
    seq          INTEGER PRIMARY KEY,
    fingerprint  TEXT NOT NULL UNIQUE,
    texts_json   TEXT NOT NULL,
    parents_json TEXT NOT NULL,
    kind         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    session      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    seq                   INTEGER PRIMARY KEY,
    fingerprint           TEXT NOT NULL,
    split                 TEXT NOT NULL,
    example_id            INTEGER NOT NULL,
    score                 REAL,
    objective_scores_json TEXT,
    failure               TEXT,
    message               TEXT,
    error_type            TEXT,
    trajectory_json       TEXT,
    output_json           TEXT,
    tokens                INTEGER,
    seconds               REAL,
    service_failure       INTEGER NOT NULL DEFAULT 0,
    usage_json            TEXT,
    recorded_at           REAL NOT NULL,
    session               INTEGER NOT NULL,
    UNIQUE (fingerprint, split, example_id)
);
CREATE TABLE IF NOT EXISTS proposals (
    seq              INTEGER PRIMARY KEY,
    key              TEXT NOT NULL UNIQUE,
    texts_json       TEXT NOT NULL,
    skipped          TEXT,
    message          TEXT,
    reflection_calls INTEGER NOT NULL,
    usage_json       TEXT,
    recorded_at      REAL NOT NULL,
    session          INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    recorded_at  REAL NOT NULL,
    session      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, seq);
"""

_DATA_TABLES = ("candidates", "evaluations", "proposals", "events")

#: A row recorded again replaces the earlier one (below), but the LM billed both attempts: before the
#: replace, the earlier row's usage is kept as an event (``<table>_usage_replaced``, the usage as its
#: payload), so :meth:`RunStore.total_usage` counts every attempt. Triggers, not a schema change: a store
#: written before them gets them when it is opened (it only misses the usage of rows replaced until then).
_REPLACED_USAGE_TRIGGERS = tuple(
    f"""CREATE TRIGGER IF NOT EXISTS {table}_keep_replaced_usage BEFORE INSERT ON {table}
BEGIN
    INSERT INTO events (kind, payload_json, recorded_at, session)
    SELECT '{table}_usage_replaced', usage_json, NEW.recorded_at, NEW.session FROM {table}
    WHERE {match} AND usage_json IS NOT NULL;
END"""
    for table, match in (
        ("evaluations", "fingerprint = NEW.fingerprint AND split = NEW.split AND example_id = NEW.example_id"),
        ("proposals", "key = NEW.key"),
    )
)

_INSERT_CANDIDATE = (
    "INSERT OR IGNORE INTO candidates (fingerprint, texts_json, parents_json, kind, created_at, session) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
# Evaluations and proposals: a later record of a key replaces the earlier one. A key is recorded again
# only when a resumed run re-executes what it would not replay (an LM-service failure, a failed
# proposer); keeping the first record would re-execute it on every later resume.
_INSERT_EVALUATION = (
    "INSERT OR REPLACE INTO evaluations (fingerprint, split, example_id, score, objective_scores_json, failure, "
    "message, error_type, trajectory_json, output_json, tokens, seconds, service_failure, usage_json, recorded_at, "
    "session) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_PROPOSAL = (
    "INSERT OR REPLACE INTO proposals (key, texts_json, skipped, message, reflection_calls, usage_json, recorded_at, "
    "session) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_EVENT = "INSERT INTO events (kind, payload_json, recorded_at, session) VALUES (?, ?, ?, ?)"
_CLOSE_SESSION = "UPDATE sessions SET closed_at = (julianday('now') - 2440587.5) * 86400.0 WHERE id = ?"


#: The run-key component a caller bumps when it changes how the other components are computed: a log_dir
#: written the old way is then refused as "another version", not as "your data changed".
KEY_FORMAT_COMPONENT = "key_format"


@dataclass(frozen=True)
class StoredCandidate:
    fingerprint: str
    texts: dict[str, str]
    parents: tuple[str, ...]
    kind: str
    created_at: float
    session: int = 0


@dataclass(frozen=True)
class StoredEvaluation:
    fingerprint: str
    split: str
    example_id: int
    #: NaN when a non-finite NaN score was recorded (SQLite stores NaN as NULL).
    score: float
    objective_scores: dict[str, float] | None
    failure: str | None
    message: str | None
    error_type: str | None
    trajectory_json: str | None
    output_json: str | None
    tokens: int | None
    seconds: float | None
    #: The failure was the LM service's (the caller's judgement): not replayed on resume.
    service_failure: bool = False
    #: LM usage of the evaluation (``prompt_tokens``, ``completion_tokens``, ``cost``), when recorded:
    #: a resumed run counts it against its token and dollar budgets as the first session did.
    usage: dict[str, float] | None = None
    recorded_at: float = 0.0
    session: int = 0


@dataclass(frozen=True)
class StoredProposal:
    key: str
    texts: dict[str, str]
    skipped: str | None
    message: str | None
    reflection_calls: int
    #: the reflection LM's usage (``prompt_tokens``, ``completion_tokens``, ``cost``), when recorded
    usage: dict[str, float] | None = None
    recorded_at: float = 0.0
    session: int = 0


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    kind: str
    payload: dict[str, Any]
    recorded_at: float
    session: int = 0


@dataclass(frozen=True)
class StoredSession:
    id: int
    opened_at: float
    #: None when the session never closed cleanly (killed, crashed) or is still open.
    closed_at: float | None
    resumed: bool
    pid: int
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers


def stable_hash(obj: Any) -> str:
    """A short, stable content hash of a JSON-able value, for building ``run_key`` components.

    Raises ``TypeError`` for values JSON cannot represent (a repr would embed memory addresses and
    change on every run).
    """
    import hashlib

    payload = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    # surrogatepass: data decoded with surrogateescape is hashed, not refused; valid text hashes as before
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _jsonable(obj: Any, depth: int = 0) -> Any:
    """Best-effort conversion of an event payload to JSON types (never raises, never pickles)."""
    if depth > 50:
        return repr(obj)
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, str) else str(k)): _jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [_jsonable(v, depth + 1) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        return {name: _jsonable(getattr(obj, name), depth + 1) for name in obj.__dataclass_fields__}
    for caster in (operator.index, float):  # numpy scalars and friends
        try:
            return _jsonable(caster(obj), depth + 1)
        except (TypeError, ValueError):
            pass
    return repr(obj)


def _dumps(obj: Any) -> str:
    # a lone surrogate as its JSON escape: meta and events are written outside the writer
    return escape_surrogates(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def _score(value: float) -> float | None:
    score = float(value)
    return None if math.isnan(score) else score


def _usage_json(usage: Mapping[str, float] | None) -> str | None:
    """Usage numbers as JSON (finite numbers only; nothing else goes in)."""
    if not usage:
        return None
    clean = {str(k): float(v) for k, v in usage.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return json.dumps(clean, separators=(",", ":"), sort_keys=True) if clean else None


# ---- reading: a stored value of another type than this version writes is a damaged row. SQLite keeps
# whatever a row was given (a file edited by hand, another program), and such a value would otherwise
# surface as a bare TypeError deep in the run (a score compared, an id used as an index).


def _stored(value: Any, kinds: type | tuple[type, ...], column: str, *, optional: bool = False) -> Any:
    """``value`` as read, if it has the type this version writes to ``column``; else ``TypeError``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):  # JSON's true is no number, id or count
        raise TypeError(f"{column} holds {value!r}")
    return value


def _stored_index(value: Any, column: str) -> int:
    index: int = _stored(value, int, column)
    if index < 0:
        raise ValueError(f"{column} holds {value!r}, not an index")
    return index


def _stored_numbers(value: Any, column: str) -> dict[str, float] | None:
    """A JSON object of numbers by name (usage, objective scores), or None."""
    if value is None:
        return None
    _stored(value, dict, column)
    for number in value.values():
        _stored(number, (int, float), column)
    return value


def _opt_str(value: Any, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"{name} must be a str or None, not {type(value).__name__}")


def _texts(texts: Mapping[str, str], name: str) -> dict[str, str]:
    out = {}
    for key, value in texts.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{name} must map str to str, got {type(key).__name__} -> {type(value).__name__}")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------- store


class RunStore:
    """The persistent record of one run, in ``<log_dir>/run.sqlite3``.

    Use :meth:`open`. ``record_*`` methods are cheap (validation, redaction, JSON encoding and a
    queue put) and may be called from any thread; ``load_*`` first flush the queue, then read with
    a fresh connection, so they are also safe anywhere (but they block: call them at start-up, or
    through ``asyncio.to_thread``).
    """

    log_dir: Path
    #: ``<log_dir>/run.sqlite3``
    path: Path
    #: The run key as stored (values masked like any text).
    run_key: dict[str, str]
    #: True when the store already held rows (candidates, evaluations, proposals or events) at open.
    resumed: bool
    #: This open's id in the ``sessions`` table; every row written now carries it.
    session: int
    #: The (redacted) ``meta`` given when the store was created, not the one given to this open.
    meta: dict[str, Any]
    _lock: RunLock
    _finalizer: weakref.finalize
    #: the database file's (device, inode) when opened (see :meth:`gone`)
    _identity: tuple[int, int] | None

    def __init__(self, *_: Any, **__: Any) -> None:
        raise TypeError("use RunStore.open(log_dir, run_key, meta)")

    @classmethod
    def open(
        cls,
        log_dir: str | os.PathLike[str],
        run_key: Mapping[str, str],
        meta: Mapping[str, Any] | None = None,
        *,
        commit_interval: float = 0.05,
        max_batch: int = 500,
        session_parts: Collection[str] = (),
    ) -> RunStore:
        """Open (or create) the store in ``log_dir`` for the run identified by ``run_key``.

        ``run_key`` maps component names (``"trainset"``, ``"student"``, ``"config"``, ...) to hash
        strings. A new store records it; an existing one must hold exactly the same mapping, otherwise
        :class:`RunStoreMismatchError` names the components that changed. ``meta`` (free JSON, redacted)
        is saved with the session for humans; it is not compared.

        ``session_parts``: components of ``run_key`` that may change from one session to the next, because
        no stored score depends on them (TurboGEPA's reflection LM and proposer). They are not compared;
        each session records its values, and :meth:`sessions_sharing` says which sessions ran with this
        one's.
        """
        if commit_interval < 0 or max_batch < 1:
            raise ValueError("commit_interval must be >= 0 and max_batch >= 1")
        env_values = secret_values()
        key = _check_run_key(run_key, env_values)
        log_dir = Path(os.path.expanduser(os.fspath(log_dir)))
        _prepare_dir(log_dir)
        path = log_dir / DB_FILENAME
        meta_obj = redact(_jsonable(dict(meta or {})), env_values)
        per_session = {name: key[name] for name in session_parts if name in key}
        if per_session:  # hashes, which redaction leaves as they are
            meta_obj[SESSION_PARTS] = per_session
        meta_json = _dumps(meta_obj)

        self = object.__new__(cls)
        self.log_dir = log_dir
        self.path = path
        self.run_key = key
        lock = RunLock.acquire(log_dir)
        try:
            self._open(path, log_dir, key, meta_json, commit_interval, max_batch, frozenset(per_session))
            self._lock = lock
            self._finalizer = weakref.finalize(self, _shutdown, self._writer, self.session, lock)
        except BaseException:
            # a Ctrl-C after the writer started and before the finalizer owns it left its thread and
            # connection open for the life of the process
            writer = getattr(self, "_writer", None)
            if writer is not None:
                writer.stop(timeout=5.0)
            lock.release()
            raise
        self._identity = _file_identity(path)
        return self

    def gone(self) -> bool:
        """Whether the database file was deleted or replaced since this store opened it: the writer then
        commits into a file no path names (a ``rm -rf log_dir`` mid-run), and nothing of this session is
        kept. Read at the end of a run, so that it is said instead of reported as stored."""
        return _file_identity(self.path) != self._identity

    def _open(self, path: Path, log_dir: Path, key: dict[str, str], meta_json: str, commit_interval: float,
              max_batch: int, session_parts: frozenset[str] = frozenset()) -> None:
        try:
            conn = _connect(path)
        except sqlite3.Error as exc:
            raise _store_error(path, log_dir, exc) from exc
        try:
            self.resumed, self.session, self.meta = _patiently(
                conn, lambda: _initialise(conn, path, log_dir, key, meta_json, session_parts))
        except sqlite3.Error as exc:
            raise _store_error(path, log_dir, exc) from exc
        finally:
            conn.close()
        try:
            self._writer = Writer(path, commit_interval, max_batch)
        except sqlite3.Error as exc:
            raise RunStoreError(f"cannot open the run store {path} for writing: {exc}") from exc

    # ------------------------------------------------------------------ writing
    def record_candidate(
        self, fingerprint: str, texts: Mapping[str, str], parents: Sequence[str], kind: str, created_at: float
    ) -> None:
        """A candidate (program variant) was created. Later records of the same fingerprint are ignored."""
        env = secret_values()
        texts_d = {name: mask_text(text, env) for name, text in _texts(texts, "texts").items()}
        parents_l = [str(p) for p in parents]
        self._writer.put(
            _INSERT_CANDIDATE,
            (str(fingerprint), _dumps(texts_d), _dumps(parents_l), str(kind), float(created_at), self.session),
        )

    def record_evaluation(
        self,
        fingerprint: str,
        split: str,
        example_id: int,
        score: float,
        objective_scores: Mapping[str, float] | None,
        failure: str | None,
        message: str | None,
        error_type: str | None,
        trajectory_json: str | None,
        output_json: str | None,
        tokens: int | None,
        seconds: float | None,
        *,
        service_failure: bool = False,
        usage: Mapping[str, float] | None = None,
    ) -> None:
        """A program execution + metric call finished. A later record of (fingerprint, split, example)
        replaces the earlier one. ``service_failure``: the caller judged the failure the LM service's.
        ``usage``: its LM usage (numbers by name, e.g. ``prompt_tokens``, ``cost``)."""
        env = secret_values()
        objectives = None
        if objective_scores is not None:
            objectives = json.dumps({str(k): float(v) for k, v in objective_scores.items()}, separators=(",", ":"))
        message = _opt_str(message, "message")
        trajectory_json = _opt_str(trajectory_json, "trajectory_json")
        output_json = _opt_str(output_json, "output_json")
        self._writer.put(
            _INSERT_EVALUATION,
            (
                str(fingerprint),
                str(split),
                operator.index(example_id),
                _score(score),
                objectives,
                _opt_str(failure, "failure"),
                None if message is None else mask_text(message, env),
                _opt_str(error_type, "error_type"),
                None if trajectory_json is None else mask_json_text(trajectory_json, env),
                None if output_json is None else mask_json_text(output_json, env),
                None if tokens is None else operator.index(tokens),
                None if seconds is None else float(seconds),
                int(bool(service_failure)),
                _usage_json(usage),
                time.time(),
                self.session,
            ),
        )

    def record_proposal(
        self, key: str, texts: Mapping[str, str], skipped: str | None, message: str | None, reflection_calls: int,
        usage: Mapping[str, float] | None = None,
    ) -> bool:
        """A reflection (proposal) finished; ``key`` identifies its inputs. A later record of a key
        replaces the earlier one.

        Returns False, and stores nothing, when a proposed text contains something that looks like a
        credential: a masked text would replay as a different program, so that proposal is paid for
        again on resume instead.
        """
        env = secret_values()
        texts_d = _texts(texts, "texts")
        if any(contains_secret(text, env) for text in texts_d.values()):
            logger.warning("Run store: proposal %s contains what looks like a credential; not stored", key)
            usage_json = _usage_json(usage)
            if usage_json is not None:  # paid all the same: the run's totals and caps count it
                self.record_event("proposals_usage_unstored", json.loads(usage_json))
            return False
        message = _opt_str(message, "message")
        self._writer.put(
            _INSERT_PROPOSAL,
            (
                str(key),
                _dumps(texts_d),
                _opt_str(skipped, "skipped"),
                None if message is None else mask_text(message, env),
                operator.index(reflection_calls),
                _usage_json(usage),
                time.time(),
                self.session,
            ),
        )
        return True

    def record_event(self, kind: str, payload: Mapping[str, Any] | None = None) -> None:
        """Something notable happened (``run_started``, ``candidate_accepted``, ``stopped``...).

        The payload is converted to JSON types (unknown objects become their repr) and redacted.
        Events are an append-only log: a resumed run that replays appends them again (see ``session``).
        """
        body = _dumps(redact(_jsonable(dict(payload or {}))))
        self._writer.put(_INSERT_EVENT, (str(kind), body, time.time(), self.session))

    def flush(self, timeout: float | None = None) -> None:
        """Block until every row recorded so far is committed.

        Raises :class:`RunStoreError` if rows could not be written since the last flush (each failure
        is reported once; the store keeps working).
        """
        self._writer.flush(timeout)
        failed, errors = self._writer.take_errors()
        if failed:
            more = f" (and {failed - 3} more)" if failed > 3 else ""
            raise RunStoreError(
                f"{failed} row(s) could not be written to {self.path}: {'; '.join(errors[:3])}{more}"
            )

    def close(self) -> None:
        """Commit everything queued, mark the session closed and release the database. Idempotent."""
        if self._writer.closed or self._finalizer.detach() is None:  # detach: one of two closing threads
            return
        _shutdown(self._writer, self.session, self._lock)
        failed, errors = self._writer.take_errors()
        if failed:
            logger.warning("Run store %s: %d row(s) were not written: %s", self.path, failed, errors[0])

    @property
    def closed(self) -> bool:
        return self._writer.closed

    @property
    def write_stats(self) -> dict[str, int]:
        """Rows committed, ignored as duplicates, and lost to write errors in this session."""
        w = self._writer
        return {"committed": w.committed_rows, "ignored_duplicates": w.ignored_rows, "failed": w.failed_rows}

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"RunStore({str(self.log_dir)!r}, session={self.session}, resumed={self.resumed}, {state})"

    # ------------------------------------------------------------------ reading
    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        self._writer.flush()
        try:
            conn = _connect(self.path)
            try:
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise _store_error(self.path, self.log_dir, exc) from exc

    @contextlib.contextmanager
    def decoding(self, what: str) -> Iterator[None]:
        """Decode stored rows inside this: a damaged one is a :class:`RunStoreError` naming the store
        (errors.md: a damaged store, at open or while its results are read), not a bare decoder error."""
        try:
            yield
        except ROW_DECODE_ERRORS as exc:
            raise damaged_row_error(self.path, self.log_dir, what, exc) from exc

    def load_evaluations(self) -> list[StoredEvaluation]:
        """Every stored evaluation, in the order they were recorded."""
        rows = self._read(
            "SELECT fingerprint, split, example_id, score, objective_scores_json, failure, message, error_type, "
            "trajectory_json, output_json, tokens, seconds, recorded_at, session, service_failure, usage_json "
            "FROM evaluations ORDER BY seq"
        )
        with self.decoding("a stored evaluation"):
            return [
                StoredEvaluation(
                    fingerprint=_stored(r[0], str, "fingerprint"),
                    split=_stored(r[1], str, "split"),
                    example_id=_stored_index(r[2], "example_id"),
                    score=math.nan if r[3] is None else _stored(r[3], (int, float), "score"),
                    objective_scores=_stored_numbers(None if r[4] is None else json.loads(r[4]),
                                                     "objective_scores_json"),
                    failure=_stored(r[5], str, "failure", optional=True),
                    message=_stored(r[6], str, "message", optional=True),
                    error_type=_stored(r[7], str, "error_type", optional=True),
                    trajectory_json=_stored(r[8], str, "trajectory_json", optional=True),
                    output_json=_stored(r[9], str, "output_json", optional=True),
                    tokens=_stored(r[10], int, "tokens", optional=True),
                    seconds=_stored(r[11], (int, float), "seconds", optional=True),
                    recorded_at=_stored(r[12], (int, float), "recorded_at"),
                    session=_stored(r[13], int, "session"),
                    service_failure=bool(_stored(r[14], int, "service_failure")),
                    usage=_stored_numbers(None if r[15] is None else json.loads(r[15]), "usage_json"),
                )
                for r in rows
            ]

    def proposal_sessions(self) -> set[int]:
        """The sessions that stored a proposal (without decoding the proposals)."""
        return {r[0] for r in self._read("SELECT DISTINCT session FROM proposals") if isinstance(r[0], int)}

    def load_proposals(self) -> dict[str, StoredProposal]:
        """Every stored proposal by key (insertion order)."""
        rows = self._read(
            "SELECT key, texts_json, skipped, message, reflection_calls, recorded_at, session, usage_json "
            "FROM proposals ORDER BY seq"
        )
        with self.decoding("a stored proposal"):
            return {
                r[0]: StoredProposal(
                    key=_stored(r[0], str, "key"),
                    texts=_texts(json.loads(r[1]), "texts_json"),
                    skipped=_stored(r[2], str, "skipped", optional=True),
                    message=_stored(r[3], str, "message", optional=True),
                    reflection_calls=_stored_index(r[4], "reflection_calls"),
                    recorded_at=_stored(r[5], (int, float), "recorded_at"),
                    session=_stored(r[6], int, "session"),
                    usage=_stored_numbers(None if r[7] is None else json.loads(r[7]), "usage_json"),
                )
                for r in rows
            }

    def total_usage(self) -> dict[str, dict[str, float]]:
        """The summed usage (``prompt_tokens``, ``completion_tokens``, ``cost``) of every stored row of
        ``evaluations`` and of ``proposals``, failed ones and replaced ones included, and of proposals not
        stored (credential-shaped text): what the run's sessions so far paid for."""
        totals: dict[str, dict[str, float]] = {}
        for table in ("evaluations", "proposals"):
            sums = totals[table] = {"prompt_tokens": 0.0, "completion_tokens": 0.0, "cost": 0.0}
            rows = self._read(
                f"SELECT usage_json FROM {table} WHERE usage_json IS NOT NULL UNION ALL "
                "SELECT payload_json FROM events WHERE kind IN (?, ?)",
                (f"{table}_usage_replaced", f"{table}_usage_unstored"),
            )
            with self.decoding(f"the usage of a stored row of {table}"):
                for (usage_json,) in rows:
                    usage = _stored_numbers(json.loads(usage_json), "usage_json")
                    for name in sums:
                        sums[name] += float((usage or {}).get(name, 0.0))
        return totals

    def candidate_fingerprints(self) -> set[str]:
        """The fingerprints of every stored candidate (a resumed session need not encode them again)."""
        return {str(r[0]) for r in self._read("SELECT fingerprint FROM candidates")}

    def load_candidates(self) -> list[StoredCandidate]:
        """Every stored candidate, in the order first recorded."""
        rows = self._read(
            "SELECT fingerprint, texts_json, parents_json, kind, created_at, session FROM candidates ORDER BY seq"
        )
        with self.decoding("a stored candidate"):
            return [
                StoredCandidate(
                    fingerprint=_stored(r[0], str, "fingerprint"),
                    texts=_texts(json.loads(r[1]), "texts_json"),
                    parents=tuple(_stored(json.loads(r[2]), list, "parents_json")),
                    kind=_stored(r[3], str, "kind"),
                    created_at=_stored(r[4], (int, float), "created_at"),
                    session=_stored(r[5], int, "session"),
                )
                for r in rows
            ]

    def events(self, kind: str | None = None) -> list[StoredEvent]:
        """The event log (optionally one kind), oldest first."""
        sql = "SELECT seq, kind, payload_json, recorded_at, session FROM events"
        params: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            params = (kind,)
        rows = self._read(sql + " ORDER BY seq", params)
        with self.decoding("a stored event"):
            return [
                StoredEvent(seq=_stored(r[0], int, "seq"), kind=_stored(r[1], str, "kind"),
                            payload=_stored(json.loads(r[2]), dict, "payload_json"),
                            recorded_at=_stored(r[3], (int, float), "recorded_at"),
                            session=_stored(r[4], int, "session"))
                for r in rows
            ]

    def sessions_sharing(self, part: str) -> set[int]:
        """The sessions (this one included) that ran with this session's value of ``part``, a per-session
        run-key part (see :meth:`open`). A session that recorded no value ran with the value stored in the
        run key: the first session's, which every session had while the part was compared."""
        current = self.run_key.get(part)
        first = dict(self._read("SELECT component, value FROM run_key")).get(part)
        sharing = set()
        for session in self.sessions():
            recorded = session.meta.get(SESSION_PARTS)
            value = recorded.get(part, first) if isinstance(recorded, dict) else first
            if value == current:
                sharing.add(session.id)
        return sharing

    def sessions(self) -> list[StoredSession]:
        """Every time this store was opened; ``closed_at is None`` marks a session that did not close."""
        rows = self._read("SELECT id, opened_at, closed_at, resumed, pid, meta_json FROM sessions ORDER BY id")
        with self.decoding("a stored session"):
            return [
                StoredSession(id=_stored(r[0], int, "id"), opened_at=_stored(r[1], (int, float), "opened_at"),
                              closed_at=_stored(r[2], (int, float), "closed_at", optional=True),
                              resumed=bool(_stored(r[3], int, "resumed")), pid=_stored(r[4], int, "pid"),
                              meta=_stored(json.loads(r[5]), dict, "meta_json"))
                for r in rows
            ]

    def counts(self) -> dict[str, int]:
        """Rows per data table (after a flush)."""
        rows = self._read(" UNION ALL ".join(f"SELECT '{t}', COUNT(*) FROM {t}" for t in _DATA_TABLES))
        return dict(rows)


# --------------------------------------------------------------------------------------------- opening

#: SQLite result codes (``sqlite_errorname``, Python 3.11+) and, before 3.11, message parts that say the
#: disk or the file's permissions refused the store now, not that the file is damaged or not ours.
_ENVIRONMENT_CODES = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY",
                      "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_NOMEM", "SQLITE_AUTH")
_ENVIRONMENT_MESSAGES = ("disk is full", "disk i/o error", "database is locked", "table is locked", "readonly",
                         "unable to open", "permission", "out of memory")


def _environment_error(exc: sqlite3.Error) -> bool:
    return sqlite_says(exc, _ENVIRONMENT_CODES, _ENVIRONMENT_MESSAGES)


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _store_error(path: Path, log_dir: Path, exc: sqlite3.Error) -> RunStoreError:
    """What an SQLite error means for the user: a disk that cannot take the store now (full, failing,
    locked, read-only, no permission: the stored results are intact, and deleting them, as the advice
    for a damaged file says, would throw away paid work), or a damaged or foreign file (start over).
    By result code, not exception class: SQLite reports a wrong schema as an OperationalError too."""
    if _environment_error(exc):
        return RunStoreError(
            f"cannot use the run store {path} ({exc}). Its stored results are not lost: once the disk "
            f"can take it again (space freed, permissions fixed, no other program holding the file), run "
            f"again with the same log_dir."
        )
    return RunStoreError(f"{path} is not a readable run store ({exc}). {START_OVER.format(log_dir=log_dir)}")


#: What decoding a stored row raises when its text was damaged (SQLite keeps no checksum of a row's
#: text: a flipped byte reaches the JSON decoder) or has another shape than this version wrote.
ROW_DECODE_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError)


def damaged_row_error(path: Path, log_dir: Path, what: str, exc: BaseException) -> RunStoreError:
    """A stored row that cannot be decoded: the file is damaged (or written by hand), start over."""
    return RunStoreError(f"{path} is not a readable run store: {what} cannot be decoded "
                         f"({type(exc).__name__}: {exc}). {START_OVER.format(log_dir=log_dir)}")


def _shutdown(writer: Writer, session: int, lock: RunLock) -> None:
    """Close the session (the writer commits what is queued) and then release the log_dir.

    A writer still committing when the bounded wait ends (a stalled network disk) keeps the log_dir
    locked until it is done: a second compile let in beside it would pay again for what it has yet to
    commit. The process's exit releases the lock whatever happens."""
    try:
        writer.stop((_CLOSE_SESSION, (session,)))
    finally:
        if writer.thread.is_alive():
            try:
                threading.Thread(target=_release_after, args=(writer.thread, lock), daemon=True,
                                 name="dspy-turbogepa-run-store-unlock").start()
            except RuntimeError:  # at interpreter exit (a finalizer): the process's exit releases the lock
                logger.debug("Run store %s: its writer outlived close() at exit", writer.path)
        else:
            lock.release()


def _release_after(thread: threading.Thread, lock: RunLock) -> None:
    thread.join()
    lock.release()


def _prepare_dir(log_dir: Path) -> None:
    if log_dir.exists() and not log_dir.is_dir():
        raise RunStoreError(f"log_dir {str(log_dir)!r} is not a directory")
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunStoreError(f"log_dir {str(log_dir)!r} cannot be created: {exc}") from exc
    if not log_dir.is_dir():
        raise RunStoreError(f"log_dir {str(log_dir)!r} is not a directory")
    try:  # os.access lies for root and on some network file systems: really write a file
        with tempfile.TemporaryFile(dir=log_dir):
            pass
    except OSError as exc:
        raise RunStoreError(f"log_dir {str(log_dir)!r} is not writable: {exc}") from exc


def _check_run_key(run_key: Mapping[str, str], env_values: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(run_key, Mapping) or not run_key:
        raise ValueError("run_key must be a non-empty mapping of component name -> hash string")
    key = {}
    for name, value in run_key.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"run_key must map str to str, got {name!r}: {type(value).__name__}")
        key[name] = mask_text(value, env_values)
    return key


#: Key of a session's meta holding its values of the run key's per-session parts (RunStore.open's
#: ``session_parts``).
SESSION_PARTS = "session_run_key"

#: Key of the session meta holding readable forms of some run-key parts (see _readable_parts).
RUN_KEY_READABLE = "run_key_readable"
#: Of those readable forms, the Python version (``"3.11"``) the session ran under: code is keyed as
#: compiled, so a log_dir moved to another Python reads as another run, and its refusal says why.
RUN_KEY_PYTHON = "python"


def _readable_parts(conn: sqlite3.Connection, meta_json: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The readable forms of run-key parts (an LM's model and endpoint) the first session stored in its
    meta, and this one's: the key itself holds hashes, which tell a user nothing about what changed."""
    def parts(text: str | None) -> dict[str, Any]:
        try:
            found = json.loads(text).get(RUN_KEY_READABLE) if text else None
        except (ValueError, AttributeError):
            return {}
        return found if isinstance(found, dict) else {}

    row = conn.execute("SELECT value FROM meta WHERE key = 'run_meta'").fetchone()
    return parts(row[0] if row else None), parts(meta_json)


#: How long opening waits for a lock another process holds on the database, in short steps.
OPEN_PATIENCE_S = 30.0

T = TypeVar("T")


def _patiently(conn: sqlite3.Connection, fn: Callable[[], T]) -> T:
    """``fn()``, asked again while another process holds the database locked, up to OPEN_PATIENCE_S.

    SQLite's own busy wait sleeps in C, where a Ctrl-C cannot reach the program: a compile waiting on a
    locked store ignored it for up to 30 s. Here SQLite waits 100 ms at a time and Python between the
    attempts (``fn`` rolls back whatever it began before it raises, so asking again starts over).
    """
    conn.execute("PRAGMA busy_timeout = 100")
    deadline = time.monotonic() + OPEN_PATIENCE_S
    try:
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not sqlite_says(exc, ("SQLITE_BUSY", "SQLITE_LOCKED"), ("locked", "busy")) \
                        or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
    finally:
        conn.execute("PRAGMA busy_timeout = 30000")


def _looks_like_a_run_store(conn: sqlite3.Connection, tables: set[str]) -> bool:
    """A ``meta`` table with a ``schema_version`` row, and, at this version, every table of ours (the
    schema is created in one transaction: a store has all of them or none). An older or newer version's
    store passes, for the version check to name it."""
    if "meta" not in tables:
        return False
    try:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # a `meta` table of other columns
        return False
    if version is None:
        return False
    return version[0] != str(SCHEMA_VERSION) or {"run_key", "sessions", *_DATA_TABLES} <= tables


def _initialise(
    conn: sqlite3.Connection, path: Path, log_dir: Path, run_key: dict[str, str], meta_json: str,
    session_parts: frozenset[str] = frozenset(),
) -> tuple[bool, int, dict[str, Any]]:
    """Create or check the schema and the run key (but its ``session_parts``), and open a session; one
    transaction."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    # Checked before anything is written (WAL mode, tables): another application's database whose table
    # happens to be called `meta` was switched to WAL, and with a `schema_version` row filled with ours.
    if tables and not _looks_like_a_run_store(conn, tables):
        raise RunStoreMismatchError(
            f"{path} is an SQLite database but not a run store (tables: {sorted(tables)}). "
            f"{START_OVER.format(log_dir=log_dir)}",
            changed=["schema_version"],
        )
    if tables:
        # Reading the rows back (load_*) scans the tables but never the unique indexes every later write
        # goes through: a damaged index page let a resumed run pay for its whole search and store none of
        # it, rerun after rerun. SQLite's quick_check reads every page (about 1 s for 240 MB).
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise RunStoreError(f"{path} is damaged (SQLite's quick_check: {'; '.join(problems)}). "
                                f"{START_OVER.format(log_dir=log_dir)}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise RunStoreError(f"{path}: SQLite refused WAL mode (got {mode!r}); put log_dir on a local disk")
    conn.execute("BEGIN IMMEDIATE")
    try:
        existing = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" in existing:
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if version is None or version[0] != str(SCHEMA_VERSION):
                found = None if version is None else version[0]
                newer = found is not None and found.isdigit() and int(found) > SCHEMA_VERSION
                # a newer version's store holds that version's paid work: upgrading keeps it, deleting does not
                advice = ("Upgrade dspy-turbogepa to the version that wrote it (pip install -U dspy-turbogepa) "
                          "to resume it, or use a new log_dir." if newer else START_OVER.format(log_dir=log_dir))
                raise RunStoreMismatchError(
                    f"{path} was written with run store schema_version {found}, this version reads "
                    f"{SCHEMA_VERSION}. {advice}",
                    changed=["schema_version"],
                )
        elif existing:
            raise RunStoreMismatchError(
                f"{path} is an SQLite database but not a run store (tables: {sorted(existing)}). "
                f"{START_OVER.format(log_dir=log_dir)}",
                changed=["schema_version"],
            )
        # Statement by statement: executescript() would COMMIT the open transaction first.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        for trigger in _REPLACED_USAGE_TRIGGERS:
            conn.execute(trigger)
        now = time.time()
        stored = dict(conn.execute("SELECT component, value FROM run_key").fetchall())
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in stored.items()):
            raise damaged_row_error(path, log_dir, "the stored run key", TypeError(
                f"components and values are texts, found {sorted(map(repr, stored.items()))[:3]}"))
        if not stored:
            conn.executemany("INSERT INTO run_key (component, value) VALUES (?, ?)", sorted(run_key.items()))
            conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("created_at", repr(now)), ("run_meta", meta_json)],
            )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif any(stored.get(k) != run_key.get(k) for k in set(stored) | set(run_key) if k not in session_parts):
            changed = sorted(k for k in set(stored) | set(run_key)
                             if k not in session_parts and stored.get(k) != run_key.get(k))
            was, is_now = _readable_parts(conn, meta_json)

            def detail(k: str) -> str:
                if was.get(k) is not None and is_now.get(k) is not None and was[k] != is_now[k]:
                    return f"{k} (stored {was[k]} -> now {is_now[k]})"
                return (f"{k} ({'absent' if k not in stored else 'stored ' + stored[k][:12]} -> "
                        f"{'absent' if k not in run_key else 'now ' + run_key[k][:12]})")

            details = ", ".join(detail(k) for k in changed)
            python_was, python_now = was.get(RUN_KEY_PYTHON), is_now.get(RUN_KEY_PYTHON)
            moved = (f" It was written under Python {python_was}, and this is Python {python_now}: the run key holds "
                     "code (the metric's, the program's) as Python compiled it, which differs between Python "
                     "versions, so under another Python those parts read as changed though nothing was edited; "
                     f"if only they changed, resume it under Python {python_was}."
                     if python_was and python_now and python_was != python_now else "")
            if KEY_FORMAT_COMPONENT in changed:  # the key is computed another way: every part looks changed
                raise RunStoreMismatchError(
                    f"log_dir {str(log_dir)!r} was written by another version of dspy_turbogepa, whose run "
                    f"key is computed differently (format {stored.get(KEY_FORMAT_COMPONENT, 'before 2')}, "
                    f"this version {run_key.get(KEY_FORMAT_COMPONENT, 'before 2')}): its stored results "
                    f"cannot be matched to this run safely. {START_OVER.format(log_dir=log_dir)}",
                    changed=changed,
                )
            raise RunStoreMismatchError(
                f"log_dir {str(log_dir)!r} holds a different run: {', '.join(changed)} changed [{details}].{moved} "
                f"Reusing it would mix results of two runs. {START_OVER.format(log_dir=log_dir)}",
                changed=changed,
            )
        has_data = any(conn.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0] for t in _DATA_TABLES)
        session = conn.execute(
            "INSERT INTO sessions (opened_at, closed_at, resumed, pid, meta_json) VALUES (?, NULL, ?, ?, ?)",
            (now, int(has_data), os.getpid(), meta_json),
        ).lastrowid
        run_meta = conn.execute("SELECT value FROM meta WHERE key = 'run_meta'").fetchone()
        try:  # decoded before the commit: a refused open writes nothing (no session row)
            stored_meta = json.loads(run_meta[0]) if run_meta else {}
        except ROW_DECODE_ERRORS as exc:
            raise damaged_row_error(path, log_dir, "the run's stored settings (meta run_meta)", exc) from exc
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    assert session is not None  # an INSERT's rowid
    return bool(has_data), session, stored_meta
