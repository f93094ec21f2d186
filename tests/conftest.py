"""Shared fixtures: offline fake LMs and small deterministic datasets from dspy_turbogepa.testing."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
import pytest

from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm
from dspy_turbogepa.testing.tasks import TASKS


@pytest.fixture
def student_lm() -> dspy.LM:
    return make_student_lm(seed=0, noise=0.0)


@pytest.fixture
def reflection_lm() -> dspy.LM:
    return make_reflection_lm(seed=0)


@pytest.fixture
def routing():
    return TASKS["routing"]


@pytest.fixture
def pipeline():
    return TASKS["pipeline"]


#: Process-wide DSPy settings a test may set with dspy.configure(...) and not undo.
_GLOBAL_SETTINGS = ("lm", "adapter", "callbacks", "track_usage")


@pytest.fixture(autouse=True)
def _dspy_settings_restored():
    """Each test starts with the process's DSPy settings as the previous one found them: a test that
    calls dspy.configure(lm=...) would otherwise hand its LM to every later test (one asserting that no
    LM is configured failed or passed by test order)."""
    before = {name: getattr(dspy.settings, name, None) for name in _GLOBAL_SETTINGS}
    yield
    if any(getattr(dspy.settings, name, None) is not value for name, value in before.items()):
        dspy.configure(**before)


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated MLflow sqlite database, copied by every test that tracks (migrating costs seconds).
    Created from its own directory: the default experiment's artifact root (./mlruns) is fixed at creation."""
    mlflow = pytest.importorskip("mlflow")
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    finally:
        os.chdir(here)
    return path


@pytest.fixture(autouse=True)
def _mlflow_process_state_cleared() -> Iterator[None]:
    """Each test starts without the tracking URI and active experiment MLflow keeps per process: a compile
    with gepa_kwargs' mlflow_tracking_uri / mlflow_experiment_name sets them (as gepa does; set_experiment
    exports MLFLOW_EXPERIMENT_ID too), and a later test's run would land there, in a store or an
    experiment that no longer exists. Cleared after the test too (not restored), so a module-scoped
    fixture set up between two tests does not see the last one's. Only when MLflow is loaded: most tests
    never import it."""
    _clear_mlflow_process_state()
    yield
    _clear_mlflow_process_state()


def _clear_mlflow_process_state() -> None:
    if "mlflow" not in sys.modules:
        return
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    tracking_utils._tracking_uri = None
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(autouse=True)
def _ctrl_c_raises_keyboard_interrupt() -> Iterator[None]:
    """Tests that press Ctrl-C (``os.kill(pid, SIGINT)``) expect Python's default handler, but a pytest
    started in the background inherits SIGINT ignored, and asyncio's ``remove_signal_handler`` installs
    the default handler rather than the one it replaced: two Ctrl-C tests passed only after an earlier
    test had changed it. Each test gets the default handler and leaves the process's as it found it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
