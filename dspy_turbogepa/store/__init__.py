"""Crash-safe persistence of a run (``log_dir``): candidates, evaluations, proposals and events.

Standard library only, and no DSPy import, so the engine can use it. See ``docs/run_store.md``.
"""

from dspy_turbogepa.store.redaction import (
    REDACTED,
    contains_secret,
    is_sensitive_key,
    mask_text,
    redact,
    run_secrets,
)
from dspy_turbogepa.store.sqlite_store import (
    DB_FILENAME,
    SCHEMA_VERSION,
    RunStore,
    RunStoreError,
    RunStoreMismatchError,
    StoredCandidate,
    StoredEvaluation,
    StoredEvent,
    StoredProposal,
    StoredSession,
    stable_hash,
)

__all__ = [
    "DB_FILENAME",
    "REDACTED",
    "SCHEMA_VERSION",
    "RunStore",
    "RunStoreError",
    "RunStoreMismatchError",
    "StoredCandidate",
    "StoredEvaluation",
    "StoredEvent",
    "StoredProposal",
    "StoredSession",
    "contains_secret",
    "is_sensitive_key",
    "mask_text",
    "redact",
    "run_secrets",
    "stable_hash",
]
