"""A review of precise claims in docs/deviations.md, docs/engine.md, docs/errors.md and README.md that no
other test pinned, each checked on a small compile with the offline fake LMs.

A claim that holds is a plain test whose docstring quotes it. The three claims the review found false
(stop callbacks of a capped run, a candidate's program past 64 others, one mutation at a time at 300
calls) were corrected in the docs, and their tests pin the corrected text.
"""

from __future__ import annotations

import logging
import random
import re

import dspy
import numpy as np
import pytest

from dspy_turbogepa import SystemicFailureError, TurboGEPA
from dspy_turbogepa.engine.config import EngineConfig
from dspy_turbogepa.testing import TASKS, make_reflection_lm, make_student_lm

from helpers import quick_compile as run
from helpers import recording_proposer

ROUTING = TASKS["routing"]


def splits(n_train: int = 12, n_val: int = 8):
    return ROUTING.splits(data_seed=0, n_train=n_train, n_val=n_val, n_test=0)


def _tie(gold, pred, trace=None, pred_name=None, pred_trace=None):
    """Every example scores 0.5 whatever the instruction: no child ever beats its parent on a minibatch."""
    return 0.5


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ============================================================================================ deviations.md
def test_deviations_a_gepa_candidate_selector_object_is_refused_listing_the_strings():
    """deviations.md: "`candidate_selection_strategy` as a gepa `CandidateSelector` object ... refused with a
    `ValueError` listing the accepted strings (`"pareto"`, `"current_best"`, `"epsilon_greedy"`,
    `"top_k_pareto"`)"."""
    from gepa.strategies.candidate_selector import ParetoCandidateSelector

    with pytest.raises(ValueError) as info:
        TurboGEPA(ROUTING.metric, max_metric_calls=50, reflection_lm=make_reflection_lm(),
                  candidate_selection_strategy=ParetoCandidateSelector(rng=random.Random(0)))
    for name in ("'pareto'", "'current_best'", "'epsilon_greedy'", "'top_k_pareto'"):
        assert name in str(info.value)


def test_deviations_the_scoring_call_passes_five_positionals():
    """deviations.md, "Metric call when scoring": "`metric(gold, pred, None, None, None)` (five
    positionals)"; the feedback call passes pred_name and pred_trace (not None)."""
    calls: set[tuple] = set()

    def metric(*args, **kwargs):
        calls.add((len(args), tuple(a is None for a in args[2:]), tuple(kwargs)))
        return ROUTING.metric(args[0], args[1])

    run(metric, budget=40)
    scoring = {c for c in calls if c[1][1]}  # pred_name is None
    assert scoring == {(5, (True, True, True), ())}, calls


def test_deviations_a_plain_dict_metric_is_read_like_a_prediction():
    """deviations.md: "Metric returning a plain dict `{"score": ..., "feedback": ...}` ... read like
    `dspy.Prediction(score=..., feedback=...)` (any mapping with those keys)"."""
    feedback: list = []

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        score = float(ROUTING.metric(gold, pred).score)
        return {"score": score, "feedback": f"dict feedback {score}"}

    dr = run(metric, instruction_proposer=recording_proposer(feedback, lambda rs: [r["Feedback"] for r in rs]),
             budget=60).detailed_results
    assert dr.run_stats["failures"] == {}
    assert any(s > 0 for s in dr.val_aggregate_scores)
    assert feedback and all(f.startswith("dict feedback ") for fs in feedback for f in fs)


def test_deviations_feedback_without_text_is_the_score_as_a_float():
    """deviations.md, "Feedback text a reflection reads": "with none, the score as a float ("... of 1.0")"
    (dspy.GEPA shows the raw return: `1`, `True`)."""
    feedback: list = []

    def bool_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return bool(ROUTING.metric(gold, pred).score >= 1.0)

    run(bool_metric, instruction_proposer=recording_proposer(feedback, lambda rs: [r["Feedback"] for r in rs]),
        budget=60)
    texts = {f for fs in feedback for f in fs}
    assert texts and texts <= {"This trajectory got a score of 0.0.", "This trajectory got a score of 1.0."}, texts


def test_deviations_scores_in_detailed_results_are_plain_floats():
    """deviations.md: "Score types in `detailed_results` (`val_aggregate_scores`, `val_subscores`, ...)":
    dspy.GEPA keeps "whatever the metric returned (`numpy.float32`, `bool`, ...)", here "plain `float`"."""
    def np_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return np.float32(ROUTING.metric(gold, pred).score)

    dr = run(np_metric, budget=60).detailed_results
    assert all(type(s) is float for s in dr.val_aggregate_scores)
    assert all(type(s) is float for subs in dr.val_subscores for s in subs.values())


def test_deviations_a_trainset_smaller_than_the_minibatch_is_read_once_each():
    """deviations.md: "A trainset smaller than `reflection_minibatch_size`": dspy.GEPA pads the minibatch
    with repeats; here "each example once"."""
    read: list = []
    run(instruction_proposer=recording_proposer(read, lambda rs: [str(r["Inputs"]) for r in rs]),
        data=splits(2, 8), budget=60)
    assert read and all(len(inputs) == len(set(inputs)) <= 2 for inputs in read), read


def test_deviations_num_threads_none_reads_dspy_settings(caplog):
    """deviations.md: "`num_threads=None` reads `dspy.settings.num_threads`"; engine.md: "Evaluations in
    flight never exceed `num_threads`"."""
    opt = TurboGEPA(ROUTING.metric, max_metric_calls=60, reflection_lm=make_reflection_lm(), track_stats=True,
                    verbose=False)
    data = splits()
    with caplog.at_level(logging.INFO, logger="dspy_turbogepa"), \
            dspy.context(lm=make_student_lm(), num_threads=2):
        dr = opt.compile(ROUTING.make_program(), trainset=data.train, valset=data.val).detailed_results
    assert any("in flight at most: evaluations 2," in m for m in caplog.messages), caplog.messages
    assert 1 <= dr.run_stats["peak_evals_in_flight"] <= 2


def test_engine_evaluations_in_flight_never_exceed_num_threads():
    """engine.md: "Evaluations in flight never exceed `num_threads`" (a wide run: 16 scouts' worth of slots
    demanded by several mutations at once)."""
    dr = run(budget=300, data=splits(40, 16), num_threads=6).detailed_results
    assert 1 <= dr.run_stats["peak_evals_in_flight"] <= 6


def test_deviations_stop_callbacks_are_asked_once_per_committed_mutation():
    """deviations.md: "Stop callbacks are called as gepa calls them, once per iteration: once after the
    seed's validation and once after each committed mutation, accepted or not"."""
    asked: list[int] = []

    def callback(state):
        asked.append(len(state.program_candidates))
        return False

    dr = run(gepa_kwargs={"stop_callbacks": [callback]}, budget=150, data=splits(24, 8),
             num_threads=8).detailed_results
    assert asked[0] == 1  # after the seed's validation
    assert len(asked) == 1 + sum(dr.run_stats["mutations"].values()), (len(asked), dr.run_stats["mutations"])


def test_deviations_stop_callbacks_are_not_asked_once_a_cap_stops_the_run():
    """deviations.md (stop_callbacks row): called once after the seed's validation and once after each committed
    mutation "until a token or dollar cap stops the run: from the first call the cap refuses, no later mutation
    is asked about" (a `budget_stopped` one is never asked about)."""
    asked: list[int] = []

    def callback(state):
        asked.append(len(state.program_candidates))
        return False

    dr = run(gepa_kwargs={"stop_callbacks": [callback]}, budget=400, data=splits(24, 8), num_threads=8,
             token_budget=20_000).detailed_results
    assert dr.stop_reason == "token_budget" and dr.run_stats["mutations"].get("budget_stopped", 0) >= 1
    assert asked[0] == 1  # after the seed's validation
    assert 1 <= len(asked) <= sum(dr.run_stats["mutations"].values()), (len(asked), dr.run_stats["mutations"])


#: The fields deviations.md lists for the state a selector or stop callback receives.
STATE_FIELDS = ("list_of_named_predictors", "program_candidates", "program_full_scores_val_set",
                "named_predictor_id_to_update_next_for_program_candidate", "total_num_evals", "i",
                "prog_candidate_val_subscores", "pareto_front_valset", "program_at_pareto_front_valset",
                "parent_program_for_candidate", "num_metric_calls_by_discovery")


def test_deviations_the_state_holds_the_listed_fields_and_names_them_for_another():
    """deviations.md: a stop callback gets "a `SelectorState` holding the fields gepa's stoppers and most
    user callbacks read (`program_candidates`, ..., `total_num_evals`, `i`, ...; reading another names what
    it holds)"."""
    read: dict[str, str] = {}

    def callback(state):
        for name in STATE_FIELDS:
            getattr(state, name)
            read[name] = "ok"
        try:
            state.full_program_trace
        except AttributeError as exc:
            read["other"] = str(exc)
        return False

    run(gepa_kwargs={"stop_callbacks": [callback]}, budget=40)
    assert all(read[name] == "ok" for name in STATE_FIELDS)
    assert "full_program_trace" in read["other"]
    assert all(name in read["other"] for name in STATE_FIELDS)


def test_deviations_the_no_progress_limits_are_engine_constants_not_arguments():
    """deviations.md, "Stopping before the budget": "200 mutations in a row that cost no metric call ..., or
    25 whose proposer answered ... Both limits are engine constants (`EngineConfig.max_noop_mutations` /
    `max_paid_noop_mutations`), not constructor arguments"."""
    import inspect

    params = inspect.signature(EngineConfig).parameters
    assert params["max_noop_mutations"].default == 200
    assert params["max_paid_noop_mutations"].default == 25
    ctor = inspect.signature(TurboGEPA.__init__).parameters
    assert "max_noop_mutations" not in ctor and "max_paid_noop_mutations" not in ctor


def test_deviations_the_users_lm_keeps_its_retries_and_its_history_sees_every_call():
    """deviations.md, "LM objects": the copies have `num_retries=0`, yours is not changed; "The copy shares
    `history` (so `lm.history` ... see every call)"."""
    lm, reflection_lm = make_student_lm(), make_reflection_lm()
    before = (lm.num_retries, reflection_lm.num_retries)
    stats = run(lm=lm, reflection_lm=reflection_lm, budget=100, data=splits(24, 8),
                num_threads=8).detailed_results.run_stats
    assert (lm.num_retries, reflection_lm.num_retries) == before
    assert len(lm.history) == stats["task_lm_calls"] > 0
    assert len(reflection_lm.history) == stats["reflection_calls"] > 0


def test_deviations_a_candidates_program_lives_while_it_is_among_the_64_used_most_recently():
    """deviations.md (State a module keeps on itself): "lives for the candidate while it is among the 64
    programs used most recently (a candidate unused while 64 others ran is built again ...)"."""
    from dspy_turbogepa.adapter.program import ProgramCodec

    codec = ProgramCodec(ROUTING.make_program())
    name = codec.component_names[0]
    first = codec.get("fp-0", {name: "text 0"})
    for i in range(1, 64):  # 63 others: the first is still among the 64 most recent
        codec.get(f"fp-{i}", {name: f"text {i}"})
    assert codec.get("fp-0", {name: "text 0"}).program is first.program
    for i in range(64, 128):  # 64 others since it was last used: built again
        codec.get(f"fp-{i}", {name: f"text {i}"})
    again = codec.get("fp-0", {name: "text 0"})
    assert again.program is not first.program
    assert next(iter(again.program.named_predictors()))[1].signature.instructions == "text 0"


# ================================================================================================ engine.md
@pytest.mark.parametrize(("kw", "most_per_mutation"), [({"minibatch_sampling": "epoch"}, 0), ({"num_threads": 3}, 0),
                                                       ({"num_threads": 4}, 1), ({"num_threads": 5}, 2)])
def test_engine_scouts_need_failure_first_and_fill_at_most_one_wave(kw, most_per_mutation):
    """engine.md, Scouting: "At most one wave (`num_threads` minus the minibatch); it needs
    `minibatch_sampling="failure_first"`"; deviations.md: `"epoch"` "turns scouting off"."""
    stats = run(budget=150, data=splits(24, 8), **kw).detailed_results.run_stats
    mutations = sum(stats["mutations"].values())
    assert stats["scouted"] <= most_per_mutation * mutations
    if most_per_mutation:
        assert stats["scouted"] > 0


def test_engine_a_reflection_reads_at_most_eleven_examples():
    """engine.md: "With scouts and feedback reuse a reflection reads up to 11 examples (3 + 5 + 3) where
    dspy.GEPA's reads 3"."""
    sizes: list[int] = []
    run(instruction_proposer=recording_proposer(sizes, len), budget=400, data=splits(40, 8), num_threads=16)
    assert max(sizes) == 11, sorted(set(sizes))


def test_engine_reflections_in_flight_default():
    """engine.md: "`max_reflections_in_flight`, default `min(max_mutations_in_flight, ceil(num_threads/4))`,
    at most 8"; README: "up to 4 at 16 threads"."""
    def reflections(num_threads, **kw):
        opt = TurboGEPA(ROUTING.metric, max_metric_calls=100, reflection_lm=make_reflection_lm(), **kw)
        return opt._engine_config(100, num_threads, 8).max_reflections_in_flight

    assert reflections(16) == 4
    assert reflections(13) == 4  # rounded up
    assert reflections(64) == 8
    assert reflections(16, max_mutations_in_flight=3) == 3
    assert reflections(16, max_reflections_in_flight=6) == 6


def test_engine_run_stats_counters_have_the_documented_keys():
    """engine.md, `run_stats`: `chaining` "(planned, chained, accepted, orphaned, and `other`)";
    `rate_limits["reflection"]` (errors.md: `rate_limited` / `rate_limit_retries` / `rate_limit_gave_up`,
    `transient_errors` / `transient_retries` / `transient_gave_up`, `backoff_seconds`); `operator_credit` per
    kind: attempts, survived rung 0, accepted, became the best, smoothed rates."""
    stats = run(budget=150, data=splits(24, 8), num_threads=8).detailed_results.run_stats
    assert stats["chaining"] and set(stats["chaining"]) <= {"planned", "chained", "accepted", "orphaned", "other"}
    assert set(stats["rate_limits"]["reflection"]) == {
        "rate_limited", "rate_limit_retries", "rate_limit_gave_up", "transient_errors", "transient_retries",
        "transient_gave_up", "backoff_seconds"}
    credit = stats["operator_credit"]["reflection"]
    assert {"attempts", "survived_rung0", "accepted", "improved_best"} <= set(credit)
    assert 0 < credit["attempts"] <= stats["mutations_by_kind"]["reflection"]


def test_engine_chaining_is_off_for_a_callable_selector():
    """engine.md, Speculative chaining: "it is off for a callable `component_selector`"."""
    def every(state, trajectories, subsample_scores, candidate_idx, candidate):
        return list(candidate)

    stats = run(budget=150, data=splits(24, 8), num_threads=8, component_selector=every).detailed_results.run_stats
    assert stats["chaining"] == {}
    assert sum(stats["mutations"].values()) > 3


@pytest.mark.parametrize(("kw", "most"), [({}, 4), ({"max_reflections_in_flight": 2}, 2),
                                          ({"max_sibling_reflections": 1}, 1)])
def test_engine_best_of_k_is_capped_by_siblings_and_reflections_in_flight(kw, most):
    """engine.md, Best-of-k: while reflections mostly fail, "k = floor(1 / p) ... at most
    `max_sibling_reflections` (default 4), at most `max_reflections_in_flight`"; "`max_sibling_reflections=1`
    is dspy.GEPA's one reflection per step"."""
    siblings = run(_tie, instruction_proposer=recording_proposer([]), budget=300, data=splits(40, 8),
                   num_threads=16, **kw).detailed_results.run_stats["siblings"]
    if most == 1:
        assert "best_of_k_mutations" not in siblings, siblings
        return
    assert siblings["best_of_k_mutations"] > 0
    assert siblings["best_of_k_children"] <= most * siblings["best_of_k_mutations"], siblings
    assert siblings["best_of_k_children"] > (most - 1) * siblings["best_of_k_mutations"], siblings


def test_engine_a_300_call_run_goes_one_mutation_at_a_time_plus_one_chained():
    """engine.md (How many mutations run at once): "with the cap, 300-call runs go one mutation at a time,
    plus one speculatively chained"; on the benchmark shape (40 validation examples, 16 threads)."""
    stats = run(budget=300, data=splits(60, 40), num_threads=16).detailed_results.run_stats
    assert stats["peak_mutations_in_flight"] <= 2, stats["chaining"]
    if stats["peak_mutations_in_flight"] == 2:
        assert stats["chaining"].get("planned", 0) >= 1, stats["chaining"]


# ================================================================================================ errors.md
def test_a_proposer_returning_a_prediction_is_applied_as_dspy_gepa_applies_it():
    """dspy.GEPA applies a proposer's answer with ``dict.update``, so a proposer written as a
    ``dspy.Module`` that returns ``dspy.Prediction(**{name: text})`` works there. It was refused here as
    ``invalid_proposal`` on every reflection, and the run stopped as systemic after 8."""
    asked: list[int] = []

    def proposer(candidate, reflective_dataset, components_to_update):
        asked.append(1)
        return dspy.Prediction(**{c: candidate[c] + f" Variant {len(asked)}." for c in components_to_update})

    optimized = run(instruction_proposer=proposer, data=splits(12, 8), budget=80)
    stats = optimized.detailed_results.run_stats
    assert asked and not stats["proposal_skips"], stats["proposal_skips"]
    assert stats["mutations"].get("rejected_rung0", 0) > 0, stats["mutations"]  # its texts became children


def test_what_dict_update_takes_is_a_proposal_and_nothing_else_is():
    """dict.update also takes an iterable of pairs (a list of them, a pydantic model): dspy.GEPA applies
    those; text, None and objects that do not read as pairs stay invalid_proposal."""
    import pydantic

    from dspy_turbogepa.proposers.reflection import _validate_answer

    class Texts(pydantic.BaseModel):
        a: str

    parent = {"a": "old"}
    for answer in ({"a": "new"}, dspy.Prediction(a="new"), [("a", "new")], Texts(a="new")):
        outcome = _validate_answer(answer, parent)
        assert outcome.skipped is None and dict(outcome.texts) == {"a": "new"}, answer
    for answer in ("a", None, 3, [1, 2], b"ab"):
        assert _validate_answer(answer, parent).skipped == "invalid_proposal", answer

    def breaks():  # a generator that fails part-way: said, with the error, not read again
        yield ("a", "new")
        raise RuntimeError("the proposer's stream broke")

    outcome = _validate_answer(breaks(), parent)
    assert outcome.skipped == "invalid_proposal" and "stream broke" in outcome.message, outcome.message


def test_errors_a_proposer_returning_none_stops_after_the_first_8_reflections():
    """errors.md: "the **first 8** reflections all fail (raise, nothing usable, ...) ... run stops with
    `SystemicFailureError` naming the most common cause"; deviations.md: "an `instruction_proposer` that
    always ... returns `None`"."""
    asked: list[int] = []

    def proposer(candidate, reflective_dataset, components_to_update):
        asked.append(1)
        return None

    with pytest.raises(SystemicFailureError, match=re.escape("the first 8 reflections all failed (8 of them with "
                                                             "invalid_proposal")) as info:
        run(instruction_proposer=proposer, data=splits(24, 8), budget=300)
    assert info.value.failure == "invalid_proposal"
    # The stop is decided by the first 8 in launch order; a deterministic run checks them as their mutations
    # commit (in launch order), so a mutation launched meanwhile may have asked already: a loaded machine saw 9.
    assert 8 <= len(asked) < 16  # the extra ones: reflections of mutations already in flight


def test_errors_a_selector_naming_an_unknown_component_skips_that_mutation(caplog):
    """errors.md: "a callable `component_selector` raises or names an unknown component | that mutation is
    skipped (`proposal_skips["selector_error"]`, a warning)"."""
    calls = iter(range(10**6))

    def sometimes_unknown(state, trajectories, subsample_scores, candidate_idx, candidate):
        return ["no_such_predictor"] if next(calls) % 3 == 2 else list(candidate)

    with caplog.at_level(logging.WARNING, logger="dspy_turbogepa"):
        stats = run(component_selector=sometimes_unknown, budget=150, data=splits(24, 8),
                    num_threads=8).detailed_results.run_stats
    assert stats["proposal_skips"]["selector_error"] >= 1
    assert any("no_such_predictor" in w for w in warnings_of(caplog))


def test_errors_a_selector_that_never_chooses_or_always_raises_stops_the_run_after_its_window():
    """errors.md: a callable `component_selector` returning no component "on each of its first N selections
    (... N is the valset's size within [8, 32] ...): `SystemicFailureError` naming `component_selector`"; one
    that raises: "a selector that fails on each of the first 8 reflective mutations stops the run"."""
    def never(state, trajectories, subsample_scores, candidate_idx, candidate):
        return []

    def broken(state, trajectories, subsample_scores, candidate_idx, candidate):
        raise RuntimeError("selector bug")

    data = splits(24, 16)
    with pytest.raises(SystemicFailureError, match="component_selector returned no component on each of its "
                                                   "first 16 selections") as info:
        run(component_selector=never, data=data, budget=300, num_threads=8)
    assert info.value.failure == "no_components"
    with pytest.raises(SystemicFailureError, match=re.escape("the first 8 reflections all failed (8 of them with "
                                                             "selector_error")) as info:
        run(component_selector=broken, data=data, budget=300, num_threads=8)
    assert "component_selector" in str(info.value)


def test_deviations_new_arguments_lists_every_argument_dspy_gepa_lacks():
    """deviations.md "New arguments": every constructor argument dspy.GEPA does not have is named there
    (a review found `speculative_chaining` missing: it changes the search, and a user reading the list
    would not know it can be turned off)."""
    import inspect
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "deviations.md").read_text()
    section = text.split("## New arguments", 1)[1].split("\n## ", 1)[0]
    ours = set(inspect.signature(TurboGEPA.__init__).parameters) - {"self"}
    theirs = set(inspect.signature(dspy.GEPA.__init__).parameters)
    missing = sorted(name for name in ours - theirs if f"`{name}`" not in section)
    assert not missing, f"deviations.md 'New arguments' does not name: {missing}"
