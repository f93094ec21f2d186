"""An optimized program saves in DSPy's own JSON format and reloads into a fresh program unchanged.

What a production service does: optimize once, ``optimized.save("program.json")``, then in the
service build the program class fresh and ``.load()`` it. No pickle is involved anywhere, and the
reloaded program must answer exactly as the optimized object did.
"""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

from dspy_turbogepa import TurboGEPA
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

pytestmark = pytest.mark.timeout(120)


def _outputs(pred: dspy.Prediction) -> dict:
    return dict(pred.items())


@pytest.mark.parametrize("task_name", ["pipeline", "routing"])
def test_saved_program_is_json_and_reloads_identically(task_name: str, tmp_path: Path) -> None:
    task = TASKS[task_name]
    splits = task.splits(data_seed=0, n_train=30, n_val=16, n_test=40)
    student = make_student_lm(seed=0, noise=0.0)
    opt = TurboGEPA(task.metric, max_metric_calls=150, reflection_lm=make_reflection_lm(seed=0),
                    num_threads=8, track_stats=True, seed=0)
    with dspy.context(lm=student):
        optimized = opt.compile(task.make_program(), trainset=splits.train, valset=splits.val)

    optimized_instructions = {name: p.signature.instructions for name, p in optimized.named_predictors()}
    assert optimized_instructions != task.seed_instructions, "the run should have changed an instruction"

    path = tmp_path / "x.json"
    optimized.save(str(path))

    # DSPy's JSON state format: plain UTF-8 JSON, one entry per predictor holding its instructions.
    raw = path.read_bytes()
    assert raw.lstrip().startswith(b"{")
    assert not raw.startswith(b"\x80"), "pickle protocol header"
    state = json.loads(raw.decode("utf-8"))
    for name, instructions in optimized_instructions.items():
        assert state[name]["signature"]["instructions"] == instructions
    assert set(optimized_instructions) <= set(state) - {"metadata"}
    assert "detailed_results" not in json.dumps(state)  # run data is not part of the program state

    fresh = task.make_program()
    assert {n: p.signature.instructions for n, p in fresh.named_predictors()} == task.seed_instructions
    fresh.load(str(path))
    assert {n: p.signature.instructions for n, p in fresh.named_predictors()} == optimized_instructions
    assert fresh.dump_state() == optimized.dump_state()

    with dspy.context(lm=student):
        expected = [_outputs(optimized(**ex.inputs())) for ex in splits.test]
        got = [_outputs(fresh(**ex.inputs())) for ex in splits.test]
    assert got == expected
    # ... and the optimization is visible in what the reloaded program answers.
    seed_score = task.evaluate(task.make_program(), splits.test, lm=student)
    reloaded_score = task.evaluate(fresh, splits.test, lm=student)
    assert reloaded_score == task.evaluate(optimized, splits.test, lm=student)
    assert reloaded_score > seed_score


def test_detailed_results_pickle_as_dspys_own_result_class() -> None:
    """``save(dir, save_program=True)`` pickles the program with its ``detailed_results``: they must load
    where only dspy is installed (as after dspy.GEPA), while a copy in memory keeps every extra field."""
    import copy
    import pickle

    import cloudpickle  # what dspy's save_program uses (dspy programs do not pickle with pickle alone)
    from dspy.teleprompt.gepa.gepa import DspyGEPAResult

    from dspy_turbogepa import TurboGEPAResult

    result = TurboGEPAResult(
        candidates=[dspy.Predict("question -> answer")], parents=[[None]], val_aggregate_scores=[0.5],
        val_subscores=[{0: 1.0, 1: 0.0}], per_val_instance_best_candidates={0: {0}, 1: {0}},
        discovery_eval_counts=[0], total_metric_calls=2, seed=0, stop_reason="max_metric_calls",
        run_stats={"mutations": {"accepted": 1}},
    )
    blob = cloudpickle.dumps(result)
    assert b"dspy_turbogepa" not in blob
    loaded = pickle.loads(blob)
    assert type(loaded) is DspyGEPAResult
    assert loaded.val_subscores == result.val_subscores and loaded.total_metric_calls == 2
    copied = copy.deepcopy(result)
    assert type(copied) is TurboGEPAResult and copied.run_stats == result.run_stats
    assert copied.candidates[0] is not result.candidates[0]
