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
