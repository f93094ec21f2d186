"""Review: statements in the public API docstrings (``help(TurboGEPA)``, the errors, the result object,
the package docstring) checked against the code. A statement that holds is a passing test quoting it; a
false one (SystemicFailureError.error_type was None when the reflection, feedback or selector hook raised) was
fixed in the code, and its test pins it."""

from __future__ import annotations

import copy
import inspect
import json
import math
import pickle
import random
import subprocess
import sys

import cloudpickle
import dspy
import pytest
from dspy.teleprompt.gepa.gepa import DspyGEPAResult

from dspy_turbogepa import ConfigurationError, SystemicFailureError, TurboGEPA, TurboGEPAResult
from dspy_turbogepa.testing import TASKS, make_reflection_lm
from tests.helpers import quick_compile

TASK = TASKS["routing"]


def make(**kw) -> TurboGEPA:
    kw.setdefault("max_metric_calls", 100)
    kw.setdefault("reflection_lm", make_reflection_lm())
    kw.setdefault("verbose", False)
    return TurboGEPA(TASK.metric, **kw)


def config(opt: TurboGEPA, num_threads: int = 8, val_size: int = 8):
    return opt._engine_config(100, num_threads, val_size)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("run")
    program = quick_compile(log_dir=str(log_dir))
    return program.detailed_results, log_dir


# ------------------------------------------------------------------ TurboGEPA class docstring
def test_own_parameter_defaults_match_the_docstring():
    """TurboGEPA docstring: reduction_factor "(default 3.0)", deterministic "(default True ...)",
    strict_budget "(default False ...)", adaptive_proposal_mix "(default True ...)", minibatch_sampling
    ``"failure_first"`` (default), max_sibling_reflections "(default 4 ...)", reflection_feedback_reuse
    "Default 3", reflection_scouts "Default 5"."""
    params = inspect.signature(TurboGEPA.__init__).parameters
    documented = {"reduction_factor": 3.0, "deterministic": True, "strict_budget": False,
                  "adaptive_proposal_mix": True, "minibatch_sampling": "failure_first",
                  "max_sibling_reflections": 4, "reflection_feedback_reuse": 3, "reflection_scouts": 5}
    assert {name: params[name].default for name in documented} == documented


def test_own_parameters_are_keyword_only_and_optional():
    """TurboGEPA docstring: "Parameters beyond dspy.GEPA's (all keyword-only, all optional)"."""
    theirs = set(inspect.signature(dspy.GEPA.__init__).parameters)
    own = [p for name, p in inspect.signature(TurboGEPA.__init__).parameters.items() if name not in theirs]
    assert len(own) >= 15
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in own)


def test_max_mutations_in_flight_default_formula():
    """TurboGEPA docstring, max_mutations_in_flight: "(default ``max(2, n // 2)``, n = ``num_threads``,
    else ``dspy.settings.num_threads``, else 8)" (the formula; the fallback is checked below)."""
    for n in (1, 3, 4, 5, 16, 40):
        assert config(make(num_threads=n), num_threads=n).max_mutations_in_flight == max(2, n // 2)


def test_max_mutations_in_flight_falls_back_to_dspy_settings_num_threads(caplog):
    """TurboGEPA docstring, max_mutations_in_flight: "n = ``num_threads``, else
    ``dspy.settings.num_threads``" (with num_threads=None, dspy.settings.num_threads=12: 6 mutations)."""
    with caplog.at_level("INFO", logger="dspy_turbogepa"), dspy.context(num_threads=12):
        quick_compile(num_threads=None, budget=30)
    assert "evaluations 12, mutations 6," in caplog.text


def test_max_reflections_in_flight_default():
    """TurboGEPA docstring, max_reflections_in_flight: "(default ``ceil(num_threads / 4)``, at most 8 and
    at most ``max_mutations_in_flight``)"."""
    for n in (1, 4, 5, 16, 40, 64):
        assert config(make(num_threads=n), num_threads=n).max_reflections_in_flight == min(
            8, math.ceil(n / 4), max(2, n // 2))
    assert config(make(num_threads=32, max_mutations_in_flight=3), num_threads=32).max_reflections_in_flight == 3


def test_a_valset_under_24_examples_gets_no_halving():
    """TurboGEPA docstring, rung_fractions: "shards under 8 examples dropped, so a valset under 24
    examples gets ``(1.0,)``: no halving"."""
    opt = make()
    assert config(opt, val_size=23).rung_fractions == (1.0,)
    assert config(opt, val_size=24).rung_fractions == pytest.approx((1 / 3, 1.0))


def test_max_merge_invocations_none_means_no_limit():
    """TurboGEPA docstring: "``max_merge_invocations=None`` means no limit"."""
    assert config(make(max_merge_invocations=None)).max_merge_invocations >= 10**9


def test_candidate_selection_extra_strategies_but_no_selector_object():
    """TurboGEPA docstring: "``candidate_selection_strategy`` also takes ``"epsilon_greedy"`` and
    ``"top_k_pareto"`` but not a gepa ``CandidateSelector`` object"."""
    for name in ("epsilon_greedy", "top_k_pareto"):
        assert config(make(candidate_selection_strategy=name)).candidate_selection == name
    from gepa.strategies.candidate_selector import ParetoCandidateSelector

    with pytest.raises(ValueError, match="CandidateSelector"):
        make(candidate_selection_strategy=ParetoCandidateSelector(random.Random(0)))


def test_perfect_score_none_needs_skip_perfect_score_false():
    """TurboGEPA docstring: "``perfect_score=None`` needs ``skip_perfect_score=False``"."""
    with pytest.raises(ConfigurationError, match="skip_perfect_score"):
        make(perfect_score=None)
    assert make(perfect_score=None, skip_perfect_score=False).perfect_score is None


def test_use_wandb_raises_not_implemented_and_code_proposer_has_no_effect():
    """TurboGEPA docstring: "``use_wandb=True`` raises ``NotImplementedError`` (``code_proposer`` has no
    effect: a student with ``dspy.Flex`` submodules is refused by ``compile``)"."""
    with pytest.raises(NotImplementedError):
        make(use_wandb=True)
    assert make(code_proposer=lambda *a, **k: {}).custom_code_proposer is not None


def test_an_explicit_component_selector_always_wins_over_the_adaptive_mix():
    """TurboGEPA docstring, adaptive_proposal_mix: "when ``component_selector`` is left at its default
    ... (default True; an explicit ``component_selector`` always wins; False keeps dspy.GEPA's round
    robin)"."""
    assert config(make()).adaptive_components is True
    assert config(make(component_selector="round_robin")).adaptive_components is False
    assert config(make(component_selector="all")).adaptive_components is False
    off = config(make(adaptive_proposal_mix=False))
    assert off.adaptive_components is False and off.component_selector == "round_robin"


def test_siblings_are_at_most_max_reflections_in_flight():
    """TurboGEPA docstring, max_sibling_reflections: "k is ``floor(1 / p)`` ... (default 4, at most
    ``max_reflections_in_flight``; 1 = dspy.GEPA's one reflection per step)"."""
    from dspy_turbogepa.engine.width import sibling_count

    # p is small (no child beat its parent in 100 tries): floor(1/p) is far above every cap
    narrow = config(make(num_threads=16, max_reflections_in_flight=2), num_threads=16)
    assert sibling_count(narrow, passed=0, tried=100, remaining=10**6, val_size=8) == 2
    wide = config(make(num_threads=32), num_threads=32)
    assert sibling_count(wide, passed=0, tried=100, remaining=10**6, val_size=8) == 4
    one = config(make(num_threads=32, max_sibling_reflections=1), num_threads=32)
    assert sibling_count(one, passed=0, tried=100, remaining=10**6, val_size=8) == 1


def test_no_scouts_when_num_threads_is_not_larger_than_the_minibatch():
    """TurboGEPA docstring, reflection_scouts: "At most ``num_threads - reflection_minibatch_size`` (none
    when ``num_threads`` is not larger than the minibatch)"."""
    assert quick_compile(num_threads=3).detailed_results.run_stats["scouted"] == 0
    assert quick_compile(num_threads=4).detailed_results.run_stats["scouted"] > 0  # the control


def test_epoch_sampling_does_no_scouting():
    """TurboGEPA docstring, minibatch_sampling: "``"epoch"``: dspy.GEPA's plain epoch-shuffled
    minibatches, and no scouting (...``reflection_scouts`` is not used)"."""
    assert quick_compile(minibatch_sampling="epoch").detailed_results.run_stats["scouted"] == 0


def test_feedback_reuse_zero_reads_the_minibatch_only():
    """TurboGEPA docstring, reflection_feedback_reuse: "Default 3; 0 = dspy.GEPA's reflection on the
    minibatch only"."""
    assert quick_compile(reflection_feedback_reuse=0).detailed_results.run_stats["feedback_reused"] == 0


def test_token_budget_is_named_by_stop_reason_and_the_seed_validation_still_runs():
    """TurboGEPA docstring, token_budget: "With ``track_stats=True`` ``detailed_results.stop_reason``
    names the one that stopped the run" and "(and by the seed program's validation, which always
    runs)"."""
    dr = quick_compile(token_budget=1).detailed_results
    assert dr.stop_reason == "token_budget"
    assert len(dr.val_subscores[0]) == 8  # the seed scored on the whole valset


def test_time_budget_is_named_by_stop_reason_and_the_seed_validation_still_runs():
    """TurboGEPA docstring, time_budget_seconds: "detailed_results.stop_reason names the one that stopped
    the run"; "At the time budget nothing new is launched and the work in flight finishes"."""
    dr = quick_compile(time_budget_seconds=1e-6).detailed_results
    assert dr.stop_reason == "time_budget"
    assert len(dr.candidates) == 1 and len(dr.val_subscores[0]) == 8


def test_mutations_in_flight_stay_within_the_bound_plus_one_speculative():
    """TurboGEPA docstring, max_mutations_in_flight: "the most mutations running at once; the engine
    adapts the number between 1 and this bound ... and speculative chaining may run one more"."""
    for bound in (1, 2):
        stats = quick_compile(max_mutations_in_flight=bound, budget=120).detailed_results.run_stats
        assert 1 <= stats["peak_mutations_in_flight"] <= bound + 1


def test_deterministic_runs_give_the_same_program():
    """TurboGEPA docstring, deterministic: "commit results in launch order so the same seed,
    ``num_threads`` and in-flight limits with a deterministic LM give the same program (default True)"."""
    first, second = (quick_compile(budget=100, num_threads=8) for _ in range(2))
    assert first.dump_state() == second.dump_state()
    assert first.detailed_results.val_aggregate_scores == second.detailed_results.val_aggregate_scores

def test_price_table_key_matches_provider_model_or_model():
    """TurboGEPA docstring, price_table: "a key matches ``"provider/model"`` or ``"model"``"."""
    from dspy_turbogepa.adapter.lm_copies import model_is_priced

    assert model_is_priced("acme/secret-ft-1", {"acme/secret-ft-1": (1.0, 2.0)})
    assert model_is_priced("acme/secret-ft-1", {"secret-ft-1": (1.0, 2.0)})
    assert not model_is_priced("acme/secret-ft-1", {"other-ft": (1.0, 2.0)})


# ------------------------------------------------------------------ errors
def test_systemic_failure_names_the_failure_and_the_error_type_of_a_raising_metric():
    """SystemicFailureError docstring: "``failure`` names the kind of cause, ``error_type`` the exception
    type when one was raised" (a metric raising on every example)."""
    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        raise ZeroDivisionError("boom")

    with pytest.raises(SystemicFailureError) as info:
        quick_compile(metric=metric)
    assert info.value.failure == "metric_error" and info.value.error_type == "ZeroDivisionError"


def _raising_proposer(candidate, reflective_dataset, components_to_update):
    raise ValueError("proposer is broken")


def _metric_raising_on_feedback(gold, pred, trace=None, pred_name=None, pred_trace=None):
    if pred_name is not None:
        raise KeyError("no feedback")
    return TASK.metric(gold, pred, trace)


def _raising_selector(state, trajectories, subsample_scores, candidate_idx, candidate):
    raise RuntimeError("selector is broken")


@pytest.mark.parametrize("kw, failure, error_type", [
    ({"instruction_proposer": _raising_proposer}, "proposer_error", "ValueError"),
    ({"metric": _metric_raising_on_feedback}, "feedback_error", "KeyError"),
    ({"component_selector": _raising_selector}, "selector_error", "RuntimeError"),
], ids=["proposer", "feedback_metric", "component_selector"])
def test_systemic_failure_names_the_error_type_of_a_raising_reflection_hook(kw, failure, error_type):
    """SystemicFailureError docstring: "the first reflections all failing, or a stop callback or component
    selector that cannot work. ``failure`` names the kind of cause, ``error_type`` the exception type when
    one was raised"."""
    with pytest.raises(SystemicFailureError) as info:
        quick_compile(**kw)
    assert info.value.failure == failure
    assert info.value.error_type == error_type


# ------------------------------------------------------------------ result object, package
def test_result_is_a_dspy_result_with_the_extra_fields(logged_run):
    """TurboGEPAResult / results.py: "a real ``DspyGEPAResult`` (subclass), so ``isinstance`` checks
    keep passing"; extra fields ``discovery_seconds`` (from the start of the search to when each
    candidate joined the pool), ``candidate_kinds`` (how each was proposed), ``stop_reason``, ``run_stats``
    (mutation outcomes, failures by cause, reflection calls, cache hits, ...)."""
    dr, _ = logged_run
    assert isinstance(dr, TurboGEPAResult) and isinstance(dr, DspyGEPAResult)
    n = len(dr.candidates)
    assert len(dr.discovery_seconds) == n and all(s >= 0 for s in dr.discovery_seconds)
    assert dr.candidate_kinds[0] == "seed" and set(dr.candidate_kinds[1:]) <= {"reflection", "reflection_all",
                                                                             "merge"}
    assert dr.stop_reason == "max_metric_calls"
    assert {"mutations", "failures", "reflection_calls", "cache_hits"} <= set(dr.run_stats)


def test_result_copies_and_pickles_as_documented(logged_run):
    """TurboGEPAResult: "a copy keeps the type and every field"; pickled "as dspy's own
    ``DspyGEPAResult``"; "The extra fields stay in ``log_dir/summary.json``"."""
    dr, log_dir = logged_run
    for clone in (copy.copy(dr), copy.deepcopy(dr)):
        assert type(clone) is TurboGEPAResult and clone.to_dict().keys() == dr.to_dict().keys()
        assert clone.run_stats == dr.run_stats and clone.candidate_kinds == dr.candidate_kinds
    assert type(pickle.loads(cloudpickle.dumps(dr))) is DspyGEPAResult  # as program.save pickles it
    result = json.loads((log_dir / "summary.json").read_text())["result"]
    assert {"discovery_seconds", "candidate_kinds", "stop_reason", "run_stats"} <= set(result)
    assert result["candidate_kinds"] == dr.candidate_kinds and result["stop_reason"] == dr.stop_reason


def test_gepa_alias_and_lazy_dspy_import():
    """dspy_turbogepa docstring: "from dspy_turbogepa import TurboGEPA  # or: from dspy_turbogepa import
    GEPA"; "The DSPy-facing names are imported lazily"."""
    from dspy_turbogepa import GEPA

    assert GEPA is TurboGEPA
    code = ("import sys, dspy_turbogepa; assert 'dspy' not in sys.modules; "
            "from dspy_turbogepa import ConfigurationError; assert issubclass(ConfigurationError, ValueError)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
