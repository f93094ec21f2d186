"""The architecture's one hard rule: the engine does not import DSPy."""

from __future__ import annotations

import subprocess
import sys


def test_engine_imports_without_dspy():
    """Nor the layers above it: the adapter (DSPy), the store (SQLite), tracking (MLflow)."""
    code = (
        "import sys, dspy_turbogepa.engine, dspy_turbogepa.engine.orchestrator, dspy_turbogepa.engine.merge;"
        "bad = sorted(m for m in sys.modules if m == 'dspy' or m.startswith(('dspy.', 'litellm', 'sqlite3', 'mlflow',"
        " 'dspy_turbogepa.adapter', 'dspy_turbogepa.store', 'dspy_turbogepa.tracking', 'dspy_turbogepa.proposers')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_names():
    import dspy_turbogepa

    assert dspy_turbogepa.GEPA is dspy_turbogepa.TurboGEPA
    assert issubclass(dspy_turbogepa.ConfigurationError, AssertionError)
