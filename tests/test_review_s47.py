"""Session 47's review findings: each test fails without its fix."""

from __future__ import annotations

import dspy
import pytest

from dspy_turbogepa.testing import TASKS

from helpers import quick_compile, small_splits


@pytest.mark.parametrize("cap", [0, 1])
def test_a_users_max_trace_size_does_not_starve_reflection(cap):
    """``dspy.configure(max_trace_size=0)`` (a memory cap people set for servers) left every rollout's
    trace empty: the run stopped as "no rollout called the predictors being optimized". A cap of 1 kept
    only the pipeline's last predictor, so ``extract`` was never reflected on. The rollout's trace is the
    optimizer's own list; the user's cap is theirs, and is there again after compile."""
    pipeline = TASKS["pipeline"]
    with dspy.context(max_trace_size=cap):
        out = quick_compile(task=pipeline, data=small_splits(pipeline, n_train=12, n_val=8, n_test=0),
                            budget=120)
        assert dspy.settings.max_trace_size == cap
    proposed = {name for cand in out.detailed_results.candidates[1:]
                for name, pred in cand.named_predictors()
                if pred.signature.instructions != pipeline.seed_instructions[name]}
    assert proposed == {"extract", "render"}, proposed
    assert out.detailed_results.best_idx > 0


@pytest.mark.parametrize("first, then", [(None, dspy.ChatAdapter()), (dspy.ChatAdapter(), dspy.JSONAdapter())])
def test_a_log_dir_refused_for_another_adapter_names_the_adapter(tmp_path, first, then):
    """The adapter is keyed with the task LM; a rerun that only configured another adapter was refused as
    "task_lm changed", showing the same model on both sides."""
    from dspy_turbogepa.store import RunStoreMismatchError

    with dspy.context(adapter=first):
        quick_compile(budget=30, log_dir=str(tmp_path))
    with dspy.context(adapter=then), pytest.raises(RunStoreMismatchError, match="task_lm changed") as info:
        quick_compile(budget=30, log_dir=str(tmp_path))
    message = str(info.value)
    stored, now = message.split(" -> now ", 1)
    assert f"adapter={type(then).__name__}(" in now
    assert ("adapter: none configured" if first is None else f"adapter={type(first).__name__}(") in stored
