"""A review of precise claims in docs/run_store.md not pinned elsewhere (store level: fast, no LM)."""

from __future__ import annotations

import inspect
import json
import math
import sqlite3
from pathlib import Path

import pytest

from dspy_turbogepa.store import (
    SCHEMA_VERSION,
    RunStore,
    RunStoreError,
    RunStoreMismatchError,
    mask_text,
    redact,
)

KEY = {"trainset": "t" * 16, "valset": "v" * 16, "student": "s" * 16, "seed": "0", "config": "c" * 16}


def _raw(log_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(log_dir / "run.sqlite3"))


def test_files_wal_and_shm_exist_while_open_and_a_clean_close_removes_them(tmp_path):
    """run_store.md, Files: "`run.sqlite3`, in WAL mode, so while a store is open ... there are also
    `run.sqlite3-wal` and `run.sqlite3-shm` ... A clean `close()` checkpoints the WAL into the main file and
    removes the other two." """
    store = RunStore.open(tmp_path, KEY)
    store.record_event("run_started", {})
    store.flush()
    assert (tmp_path / "run.sqlite3-wal").exists() and (tmp_path / "run.sqlite3-shm").exists()
    store.close()
    assert not (tmp_path / "run.sqlite3-wal").exists()
    assert not (tmp_path / "run.sqlite3-shm").exists()
    conn = _raw(tmp_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
    finally:
        conn.close()


def test_meta_holds_version_created_at_and_the_first_opens_redacted_meta(tmp_path):
    """run_store.md, meta: "`schema_version` (an integer as text; also in `PRAGMA user_version`), `created_at`,
    `run_meta` ... `run_meta` is the redacted `meta` JSON given at the first open"; sessions.meta_json: "the
    redacted `meta` passed to this open"."""
    with RunStore.open(tmp_path, KEY, meta={"model": "m1", "api_key": "abcdefgh1234"}):
        pass
    with RunStore.open(tmp_path, KEY, meta={"model": "m2"}) as store:
        assert store.meta == {"model": "m1", "api_key": "***REDACTED***"}
        sessions = store.sessions()
    assert [s.meta for s in sessions] == [{"model": "m1", "api_key": "***REDACTED***"}, {"model": "m2"}]
    conn = _raw(tmp_path)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        assert set(meta) == {"schema_version", "created_at", "run_meta"}
        assert meta["schema_version"] == "3" == str(SCHEMA_VERSION)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert float(meta["created_at"]) > 0
        assert json.loads(meta["run_meta"]) == {"model": "m1", "api_key": "***REDACTED***"}
    finally:
        conn.close()


def test_a_mismatch_names_added_removed_and_changed_components_and_the_fix(tmp_path):
    """run_store.md, run_key: "Every later open must pass exactly the same mapping (same names, same values, any
    order) or gets `RunStoreMismatchError`, whose `.changed` lists the components that differ (added and removed
    ones included) and whose message says to use a new `log_dir` or delete `run.sqlite3*`"."""
    with RunStore.open(tmp_path, KEY):
        pass
    with RunStore.open(tmp_path, dict(reversed(list(KEY.items())))):  # any order
        pass
    other = {k: v for k, v in KEY.items() if k != "config"} | {"seed": "1", "metric": "m" * 16}
    with pytest.raises(RunStoreMismatchError) as err:
        RunStore.open(tmp_path, other)
    assert sorted(err.value.changed) == ["config", "metric", "seed"]
    assert "new log_dir" in str(err.value) and "run.sqlite3*" in str(err.value)


def test_a_mismatch_shows_the_readable_form_of_a_changed_lm(tmp_path):
    """run_store.md, run_key: "the message shows it instead of the hash: `reflection (stored model=openai/gpt-4o,
    temperature=1.0 -> now model=openai/gpt-4o, temperature=0.9)`"."""
    was = {"run_key_readable": {"reflection": "model=openai/gpt-4o, temperature=1.0"}}
    now = {"run_key_readable": {"reflection": "model=openai/gpt-4o, temperature=0.9"}}
    with RunStore.open(tmp_path, KEY | {"reflection": "r" * 16}, meta=was):
        pass
    with pytest.raises(RunStoreMismatchError) as err:
        RunStore.open(tmp_path, KEY | {"reflection": "q" * 16}, meta=now)
    assert ("reflection (stored model=openai/gpt-4o, temperature=1.0 -> now model=openai/gpt-4o, "
            "temperature=0.9)") in str(err.value)
    assert "r" * 12 not in str(err.value)


def test_another_key_format_is_refused_as_written_by_another_version(tmp_path):
    """run_store.md, How resume uses it (1): "A `key_format` component names how the key is computed; a log_dir
    written by a version that computed it differently ... is refused as written by another version"."""
    with RunStore.open(tmp_path, KEY | {"key_format": "7"}):
        pass
    with pytest.raises(RunStoreMismatchError, match="written by another version") as err:
        RunStore.open(tmp_path, KEY | {"key_format": "8"})
    assert "key_format" in err.value.changed


def test_sessions_resumed_pid_and_closed_at(tmp_path):
    """run_store.md, sessions: "`closed_at` is NULL if the session never closed (... or still open)"; "`resumed`
    1 if the store already held data when this session opened"; "`pid` process id of the opener"."""
    import os

    with RunStore.open(tmp_path, KEY) as store:
        pass  # no rows: the next open is not a resume
    with RunStore.open(tmp_path, KEY) as store:
        assert not store.resumed
        store.record_event("run_started", {})  # an event alone is data
    with RunStore.open(tmp_path, KEY) as store:
        assert store.resumed
        sessions = store.sessions()
    assert [s.resumed for s in sessions] == [False, False, True]
    assert [s.pid for s in sessions] == [os.getpid()] * 3
    assert sessions[-1].closed_at is None and all(s.closed_at is not None for s in sessions[:-1])


def test_a_store_without_the_triggers_gets_them_when_reopened(tmp_path):
    """run_store.md, events: "(a store opened by an earlier version gets the triggers when reopened)"."""
    with RunStore.open(tmp_path, KEY):
        pass
    conn = _raw(tmp_path)
    conn.execute("DROP TRIGGER evaluations_keep_replaced_usage")
    conn.execute("DROP TRIGGER proposals_keep_replaced_usage")
    conn.commit()
    conn.close()
    with RunStore.open(tmp_path, KEY) as store:
        store.record_proposal("k", {"p": "Do it."}, None, None, 1, usage={"cost": 0.5})
        store.record_proposal("k", {"p": "Do it."}, None, None, 1, usage={"cost": 0.25})
        replaced = store.events("proposals_usage_replaced")
    assert [e.payload for e in replaced] == [{"cost": 0.5}]


def test_event_kind_is_indexed_and_seq_is_the_rowid(tmp_path):
    """run_store.md: "`seq` columns are SQLite rowids: the order rows were recorded in"; events.kind "(chosen by
    the caller; indexed)"."""
    with RunStore.open(tmp_path, KEY) as store:
        for kind in ("run_started", "mutation_committed", "run_finished"):
            store.record_event(kind, {})
        events = store.events()
    assert [e.kind for e in events] == ["run_started", "mutation_committed", "run_finished"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    conn = _raw(tmp_path)
    try:
        indexed = [r[2] for r in conn.execute("PRAGMA index_info(events_kind)")]
        rowids = conn.execute("SELECT seq, rowid FROM events").fetchall()
    finally:
        conn.close()
    assert indexed[0] == "kind"
    assert all(a == b for a, b in rowids)


def test_nan_score_is_null_and_non_finite_objectives_are_pythons_json(tmp_path):
    """run_store.md, evaluations: "`score` ... NULL stands for NaN ..., loaded back as `nan`";
    "`objective_scores_json` `{name: float}` or NULL (Python's JSON: non-finite floats as `NaN`/`Infinity`)"."""
    with RunStore.open(tmp_path, KEY) as store:
        store.record_evaluation("fp", "val", 0, math.nan, {"acc": math.inf, "len": math.nan}, None, None, None,
                                None, None, None, None)
        store.record_evaluation("fp", "val", 1, 1.0, None, None, None, None, None, None, None, None)
        rows = store.load_evaluations()
    assert math.isnan(rows[0].score) and rows[0].objective_scores["acc"] == math.inf
    conn = _raw(tmp_path)
    try:
        db = conn.execute("SELECT score, objective_scores_json FROM evaluations ORDER BY example_id").fetchall()
    finally:
        conn.close()
    assert db[0][0] is None and "Infinity" in db[0][1] and "NaN" in db[0][1]
    assert db[1] == (1.0, None)


def test_redact_key_names_none_and_booleans_kept_counters_kept():
    """run_store.md, Secrets: "values under keys such as `api_key`, `apiKey`, `x-api-key`, `X-Auth-Key`,
    `Helicone-Auth`, `Authorization`, `password`, `secret`, `token`, `*_token`, `*_secret` are replaced by
    `***REDACTED***` (None and booleans are kept; counters like `max_tokens` are not secrets)"."""
    secret_names = ["api_key", "apiKey", "x-api-key", "X-Auth-Key", "Helicone-Auth", "Authorization", "password",
                    "secret", "token", "refresh_token", "client_secret"]
    out = redact(dict.fromkeys(secret_names, "plain words") | {"max_tokens": 100, "prompt_tokens": 5})
    assert {k: out[k] for k in secret_names} == dict.fromkeys(secret_names, "***REDACTED***")
    assert out["max_tokens"] == 100 and out["prompt_tokens"] == 5
    assert redact({"api_key": None, "token": True, "password": False}) == {
        "api_key": None, "token": True, "password": False}


def test_environment_values_of_8_or_more_characters_are_masked_by_name(monkeypatch):
    """run_store.md, Secrets: "any substring equal to the value of an environment variable whose name contains KEY,
    TOKEN, SECRET, PASSWORD or PASSWD (values of 8+ characters, environment read at each call)"."""
    monkeypatch.setenv("DB_PASSWD", "hunter22x")
    monkeypatch.setenv("SHORT_TOKEN", "abc1234")  # 7 characters
    assert mask_text("pw hunter22x, t abc1234") == "pw ***REDACTED***, t abc1234"
    monkeypatch.setenv("DB_PASSWD", "changed99z")  # read at each call
    assert mask_text("pw changed99z") == "pw ***REDACTED***"


def test_key_shapes_need_a_digit_so_prose_is_left_alone():
    """run_store.md, Secrets: "substrings shaped like known keys (`sk-…`, ..., `AKIA…`, `xox?-…`, ...; the random
    part must contain a digit, so prose such as "sk-learn-compatible" is left alone)"."""
    assert mask_text("an sk-learn-compatible estimator") == "an sk-learn-compatible estimator"
    for key in ("sk-abcdefghij0123456789xyz", "AKIAABCDEFGHIJ012345", "xoxb-1234567890-abcdef",
                "ghp_" + "a1" * 18, "hf_" + "b2" * 16):
        assert key not in mask_text(f"use {key} here"), key


def test_event_payloads_are_redacted_and_unknown_objects_stored_as_repr(tmp_path):
    """run_store.md, events: "`payload_json` redacted JSON object; unknown objects were stored as their `repr`"."""
    class Thing:
        def __repr__(self) -> str:
            return "<Thing 7>"

    with RunStore.open(tmp_path, KEY) as store:
        store.record_event("run_started", {"obj": Thing(), "api_key": "whatever-1", "n": 3})
        (event,) = store.events("run_started")
    assert event.payload == {"obj": "<Thing 7>", "api_key": "***REDACTED***", "n": 3}


def test_error_classes_and_when_they_are_raised(tmp_path):
    """run_store.md, Errors: "`RunStoreMismatchError(ValueError)` ... an SQLite file that is not a run store";
    "`RunStoreError(OSError)` `log_dir` cannot be created or written (the message names it), the file is not a
    database, the store is closed"."""
    assert issubclass(RunStoreMismatchError, ValueError) and issubclass(RunStoreError, OSError)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    conn = sqlite3.connect(str(foreign / "run.sqlite3"))
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(RunStoreMismatchError, match="not a run store"):
        RunStore.open(foreign, KEY)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "run.sqlite3").write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(RunStoreError):
        RunStore.open(garbage, KEY)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(RunStoreError, match="a_file"):
        RunStore.open(a_file / "sub", KEY)
    store = RunStore.open(tmp_path / "ok", KEY)
    store.close()
    with pytest.raises(RunStoreError):
        store.record_event("late", {})


def test_writer_defaults_are_50_ms_and_500_rows():
    """run_store.md, Crash safety: "every `commit_interval` (default 50 ms) or `max_batch` rows (default 500)"."""
    params = inspect.signature(RunStore.open).parameters
    assert params["commit_interval"].default == 0.05 and params["max_batch"].default == 500


def test_the_run_key_holds_seed_none_as_0_and_key_format_11():
    """run_store.md, How resume uses it (1): "`seed` (`None` keyed as the 0 it runs with)"; format "11" is the
    current `key_format`; the components named: trainset, valset, seed, student, metric, failure_score, task_lm,
    reflection."""
    import dspy

    from dspy_turbogepa.adapter.run_identity import run_key

    student = dspy.Predict("question -> answer")
    data = [dspy.Example(question="q", answer="a").with_inputs("question")]
    k_none = run_key(student, data, data, None)
    assert k_none == run_key(student, data, data, 0)
    assert k_none["seed"] == "0" and k_none["key_format"] == "11"
    assert set(k_none) == {"key_format", "trainset", "valset", "seed", "student", "metric", "failure_score",
                           "task_lm", "reflection"}


def test_dict_keys_inside_trajectories_are_not_treated_as_sensitive(tmp_path):
    """run_store.md, Secrets: "JSON documents are masked string by string and stay valid JSON; dict keys inside
    trajectories are not treated as sensitive (a signature may have a field called `token`)"."""
    traj = json.dumps({"token": "a plain word", "note": "key sk-abcdefghij0123456789xyz"})
    with RunStore.open(tmp_path, KEY) as store:
        store.record_evaluation("fp", "train", 0, 1.0, None, None, None, None, traj, None, None, None)
        (row,) = store.load_evaluations()
    stored = json.loads(row.trajectory_json)
    assert stored == {"token": "a plain word", "note": "key ***REDACTED***"}


def test_lm_credentials_count_when_they_look_like_key_material():
    """run_store.md, Secrets: "An `api_key` or header value counts when it is 8+ characters with no whitespace
    (surrounding whitespace stripped) and not a placeholder: local servers are given words such as "anything",
    "lm-studio" or "sk-no-key-required" ... A URL password counts from 8 characters."; headers "ending in `key`
    such as ... `x-portkey-virtual-key`"."""
    import dspy

    from dspy_turbogepa.adapter.lm_discovery import lm_api_keys
    from dspy_turbogepa.store import run_secrets

    def keys(**kw):
        return lm_api_keys(dspy.Predict("q -> a"), dspy.LM("openai/x", **kw))

    assert keys(api_key="anything") == [] and keys(api_key="sk-no-key-required") == []
    assert keys(api_key="lm-studio") == [] and keys(api_key=" Abcdefghijkl ") == ["Abcdefghijkl"]
    assert keys(api_key="abc12345") == ["abc12345"]
    mixed = "AbcdefghijKlmnopqrstUvwxyz"
    assert keys(api_key=mixed) == [mixed]
    assert "vk1234567" in keys(api_key="anything", headers={"x-portkey-virtual-key": "vk1234567"})
    for password, masked in (("pw12345", False), ("pw123456", True)):
        found = keys(api_key="anything", api_base=f"http://user:{password}@localhost:8000/v1")
        with run_secrets(found):
            assert (password not in mask_text(f"echo {password}")) is masked, password
