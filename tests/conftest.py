"""Shared fixtures: offline fake LMs and small deterministic datasets from dspy_turbogepa.testing."""

from __future__ import annotations

import os
import sys
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
def _mlflow_process_state_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the tracking URI and active experiment MLflow keeps per process: a compile
    with gepa_kwargs' mlflow_tracking_uri / mlflow_experiment_name sets them (as gepa does; set_experiment
    exports MLFLOW_EXPERIMENT_ID too), and a later test's run would land there, in a store or an
    experiment that no longer exists. Only when MLflow is loaded already: most tests never import it."""
    if "mlflow" not in sys.modules:
        return
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
