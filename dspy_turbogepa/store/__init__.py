"""Crash-safe persistence of a run (``log_dir``): candidates, evaluations, proposals and events.

Standard library only, and no DSPy import. The masking of credentials it applies lives in
``dspy_turbogepa.redaction`` (every layer masks: the engine its log lines, the adapter error texts),
re-exported here. See ``docs/run_store.md``.
"""

from dspy_turbogepa.redaction import (
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
