"""Through the real stack: dspy.LM -> HTTP -> the loopback simulator, on both of dspy 3.4's client paths."""

from __future__ import annotations

import dspy
import pytest

from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.testing import SimServer

from helpers import small_splits

pytestmark = pytest.mark.http


@pytest.fixture
def server():
    with SimServer("test", seed=0) as srv:
        yield srv


def _lms(server, **engine):
    student = dspy.LM("openai/sim-student", api_base=server.base_url, api_key="sim-key", cache=False,
                      temperature=0.0, **engine)
    reflector = dspy.LM("openai/sim-reflector", api_base=server.base_url, api_key="sim-key", cache=False,
                        temperature=1.0, max_tokens=4000, **engine)
    return student, reflector


@pytest.mark.parametrize("engine", [{}, {"engine": "litellm"}], ids=["native", "litellm"])
def test_compile_over_http(server, routing, engine):
    student, reflector = _lms(server, **engine)
    splits = small_splits(routing, n_train=24, n_val=16, n_test=40)
    opt = TurboGEPA(routing.metric, max_metric_calls=200, reflection_lm=reflector, num_threads=8, track_stats=True)
    with dspy.context(lm=student):
        optimized = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
        seed_score = routing.evaluate(routing.make_program(), splits.test)
        final_score = routing.evaluate(optimized, splits.test)
    stats = server.stats()
    dr = optimized.detailed_results
    assert dr.val_aggregate_scores[dr.best_idx] > dr.val_aggregate_scores[0]
    assert final_score > seed_score
    models = stats["models"]
    assert models["sim-student"]["requests"] >= dr.total_metric_calls
    assert models["sim-reflector"]["requests"] >= 1


def test_unknown_model_stops_the_run_with_a_clear_error(server, routing):
    student = dspy.LM("openai/no-such-model", api_base=server.base_url, api_key="sim-key", cache=False,
                      num_retries=0)
    _, reflector = _lms(server)
    splits = small_splits(routing, n_train=12, n_val=8)
    opt = TurboGEPA(routing.metric, max_metric_calls=100, reflection_lm=reflector, num_threads=4)
    with dspy.context(lm=student), pytest.raises(SystemicFailureError) as info:
        opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val)
    assert "Stopping" in str(info.value)


@pytest.mark.parametrize("engine, style", [({}, "openai"), ({"engine": "litellm"}, "openai"), ({}, "message")],
                         ids=["native", "litellm", "native-message-only"])
def test_a_reflection_refused_as_too_long_by_the_server_is_asked_again_with_fewer_examples(routing, engine, style):
    """OpenAI's 400 ``context_length_exceeded`` reaches us as ContextWindowExceededError on both client
    paths (litellm recognises it by its own rules); a server that says it only in the message of a plain
    400 (vLLM) reaches the native client as an invalid request, told apart by its message. Either way the
    reflection is asked again with fewer examples."""
    from dataclasses import replace

    from dspy_turbogepa.testing.responder import SimConfig

    config = SimConfig.preset("test")
    config = replace(config, models=tuple(replace(m, context_window=800, context_error=style)
                                          if m.role == "reflector" else m for m in config.models))
    with SimServer(config, seed=0) as server:
        student, reflector = _lms(server, **engine)
        splits = small_splits(routing, n_train=30, n_val=16)
        opt = TurboGEPA(routing.metric, max_metric_calls=150, reflection_lm=reflector, num_threads=8,
                        track_stats=True)
        with dspy.context(lm=student):
            dr = opt.compile(routing.make_program(), trainset=splits.train, valset=splits.val).detailed_results
        refl = server.stats()["models"]["sim-reflector"]
    assert refl["context_refused"] >= 1 and refl["ok"] >= 1
    assert max(dr.val_aggregate_scores) > dr.val_aggregate_scores[0]
    assert dr.run_stats["reflective_records_skipped"]["context_window"] >= 1
    assert "proposer_error" not in dr.run_stats["proposal_skips"]
