"""Offline LM simulator and synthetic tasks for tests, examples and benchmarks.

Nothing here talks to the internet or needs a real model:

* :mod:`.tasks` - synthetic tasks (``routing``, ``pipeline``, ``pricing``) whose score
  depends on which hidden rules the instructions state (plus optional seeded noise and a length
  penalty), with GEPA-protocol metrics;
* :mod:`.responder` - the simulated student and reflector (pure functions) and the
  simulator configuration;
* :mod:`.fake_lm` - the responder as in-process ``dspy.LM`` objects (custom engines);
* :mod:`.server` - the responder behind an OpenAI-compatible HTTP server on 127.0.0.1.

Typical test::

    from dspy_turbogepa.testing import TASKS, make_student_lm, make_reflection_lm

    task = TASKS["routing"]
    train, val, _ = task.splits(n_train=24, n_val=16, n_test=0)
    student = task.make_program()
    lm, reflection_lm = make_student_lm(), make_reflection_lm()
"""

from dspy_turbogepa.testing.fake_lm import (
    AsyncSimEngine,
    SimEngine,
    make_reflection_lm,
    make_student_lm,
    sim_engine,
)
from dspy_turbogepa.testing.responder import (
    Completion,
    ModelConfig,
    Responder,
    ResponderConfig,
    SimConfig,
    SimLMError,
)
from dspy_turbogepa.testing.server import SimServer
from dspy_turbogepa.testing.tasks import (
    ALL_RULES,
    TASKS,
    PredictorSpec,
    Rule,
    Splits,
    Task,
    find_rule,
    get_task,
    known_rules,
)

__all__ = [
    "ALL_RULES",
    "TASKS",
    "AsyncSimEngine",
    "Completion",
    "ModelConfig",
    "PredictorSpec",
    "Responder",
    "ResponderConfig",
    "Rule",
    "SimConfig",
    "SimEngine",
    "SimLMError",
    "SimServer",
    "Splits",
    "Task",
    "find_rule",
    "get_task",
    "known_rules",
    "make_reflection_lm",
    "make_student_lm",
    "sim_engine",
]
