"""Shared fixtures: offline fake LMs and small deterministic datasets from dspy_turbogepa.testing."""

from __future__ import annotations

import os

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
