"""Findings of the session-36 reviews (code quality, tutorials, bad input)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from dspy_turbogepa.adapter import introspect
from dspy_turbogepa.adapter.run_identity import callable_identity


@pytest.fixture
def debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A module installed where Debian's python3-* packages go (``dist-packages``), which is not one of
    this interpreter's sysconfig paths."""
    root = tmp_path / "usr" / "lib" / "python3" / "dist-packages"
    root.mkdir(parents=True)
    (root / "zz_s36_debian_lib.py").write_text(
        "class Parsed:\n    def __init__(self, x):\n        self.x = x\n\n"
        "def normalise(text):\n    return text.strip().lower()\n\n"
        "def broken():\n    raise ValueError('inside the library')\n")
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module("zz_s36_debian_lib")
    yield module
    sys.modules.pop("zz_s36_debian_lib", None)


def test_one_answer_to_whose_code_it_is(debian_package):
    """Error attribution, the run key and JSON revival asked three different questions: the evaluator
    counted ``dist-packages`` and the user site as installed code, the run key and revival only the
    interpreter's sysconfig paths. So a Debian or ``pip install --user`` package was "library" when an
    error was attributed but "the user's" when its functions keyed a run (an upgrade of it refused the
    resume) or a class of it was rebuilt from its ``__dict__``."""
    module = debian_package
    path = module.__file__
    assert introspect.library_path(path)
    assert not introspect.users_file(path)
    assert introspect.library_class(module.Parsed)
    assert introspect.library_function(module.normalise)
    assert introspect.library_dirs() == introspect.library_dirs()  # cached, one tuple


def test_an_upgrade_of_an_installed_helper_does_not_change_the_run_key(debian_package):
    """A metric calling an installed helper is keyed by its own code, not the helper's: the helper's
    changes with an upgrade of the package, not with the user's edits, and must not refuse a resume.
    Before, a ``dist-packages`` helper counted as the user's code and its new body changed the key."""
    from dspy_turbogepa.adapter.trajectory_json import _plain_user_class

    namespace = {"normalise": debian_package.normalise}
    exec("def metric(gold, pred, trace=None):\n    return normalise(pred) == gold\n", namespace)
    before = callable_identity(namespace["metric"])
    Path(debian_package.__file__).write_text(
        "class Parsed:\n    pass\n\ndef normalise(text):\n    return ' '.join(text.split()).casefold()\n")
    namespace["normalise"] = importlib.reload(debian_package).normalise
    assert callable_identity(namespace["metric"]) == before
    assert not _plain_user_class(debian_package.Parsed)  # an installed class is not rebuilt from its fields


def test_a_users_file_is_still_the_users(tmp_path: Path):
    own = tmp_path / "project" / "metric.py"
    own.parent.mkdir()
    own.write_text("x = 1\n")
    assert introspect.users_file(str(own))
    assert not introspect.library_path(str(own))
    assert not introspect.users_file(introspect.__file__)  # this package's frames are not the user's


def test_a_callable_selector_sees_gepas_iteration_index():
    """GEPA_Advanced.md's ``alternating_half_selector`` picks a half on ``state.i % 2``. gepa calls the
    selector after ``state.i += 1`` (0 on the first iteration); ours saw ``i = commits - 1`` (the stop
    callbacks' value, -1 on the first), so it optimized the other half on every iteration. With
    dspy.GEPA's one-mutation-at-a-time flags, the selector now sees 0, 1, 2, ... as gepa's does, and
    a stop callback still sees -1 after the seed."""
    import dspy

    from dspy_turbogepa import TurboGEPA
    from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

    task = TASKS["pipeline"]
    splits = task.splits(data_seed=0, n_train=12, n_val=6, n_test=0)
    seen: list[int] = []
    stops: list[int] = []

    def alternating_half_selector(state, trajectories, subsample_scores, candidate_idx, candidate):
        seen.append(state.i)
        components = list(candidate.keys())
        mid = len(components) // 2
        return components[:mid] if state.i % 2 == 0 else components[mid:]

    def stop(state):
        stops.append(state.i)
        return False

    opt = TurboGEPA(task.metric, max_metric_calls=80, num_threads=4, reflection_lm=make_reflection_lm(seed=0),
                    component_selector=alternating_half_selector, gepa_kwargs={"stop_callbacks": [stop]},
                    reflection_scouts=0, reflection_feedback_reuse=0, minibatch_sampling="epoch",
                    max_sibling_reflections=1, adaptive_proposal_mix=False, speculative_chaining=False,
                    max_mutations_in_flight=1, use_merge=False)
    with dspy.context(lm=make_student_lm(seed=0, noise=0.0)):
        opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)
    assert len(seen) >= 3 and seen[:3] == [0, 1, 2]
    # an iteration skipped before its selector (its minibatch was solved) still counts, as in gepa
    assert all(a < b for a, b in zip(seen, seen[1:]))
    assert stops == list(range(-1, len(stops) - 1))  # between iterations: the last one finished
    assert set(seen) <= set(range(max(stops) + 2))
