"""Drop-in parity of the public surface, as a user switching a dspy.GEPA script meets it.

``detailed_results`` field by field (side by side with a real ``dspy.GEPA`` run on the same fake LMs,
and with validation rungs, where TurboGEPA evaluates some children on part of the valset only),
``compile()``'s arguments and what it leaves untouched, the constructor's attributes, and what a
custom ``instruction_proposer`` / ``component_selector`` is called with and whether its answer is used.

Tests marked ``xfail(strict=True, reason="BUG: ...")`` assert dspy.GEPA's behaviour where TurboGEPA
differs without saying so.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import random
import threading
from pathlib import Path

import dspy
import pytest
from dspy.teleprompt.gepa.gepa import DspyGEPAResult

from dspy_turbogepa import ConfigurationError, TurboGEPA, TurboGEPAResult
from dspy_turbogepa.testing import TASKS
from dspy_turbogepa.testing.fake_lm import make_reflection_lm, make_student_lm

RESULT_EXTRAS = {"discovery_seconds", "candidate_kinds", "stop_reason", "run_stats"}
RECORD_KEYS = {"Inputs", "Generated Outputs", "Feedback"}


def _metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return 1.0


def _perfect(gold, pred, trace=None, pred_name=None, pred_trace=None):
    return 1.0


def _texts(program: dspy.Module) -> dict[str, str]:
    return {name: p.signature.instructions for name, p in program.named_predictors()}


def _run(task_name: str = "routing", *, cls=TurboGEPA, budget: int = 100, n_train: int = 20, n_val: int = 12,
         data_seed: int = 0, noise: float | None = 0.0, lm=None, program=None, valset="split", **kw):
    """One compile on the offline fake LMs; returns (optimizer, optimized program, splits).
    ``valset=None`` validates on the trainset, as dspy.GEPA does."""
    task = TASKS[task_name]
    splits = task.splits(data_seed=data_seed, n_train=n_train, n_val=n_val, n_test=0)
    if "instruction_proposer" not in kw:
        kw.setdefault("reflection_lm", make_reflection_lm(seed=0))
    kw.setdefault("num_threads", 4)
    kw.setdefault("track_stats", True)
    if cls is TurboGEPA:
        kw.setdefault("verbose", False)
    opt = cls(kw.pop("metric", task.metric), max_metric_calls=budget, **kw)
    program = program if program is not None else task.make_program()
    val = splits.val if valset == "split" else valset
    with dspy.context(lm=lm if lm is not None else make_student_lm(seed=0, noise=noise)):
        optimized = opt.compile(program, trainset=splits.train, valset=val)
    return opt, optimized, splits


def _check_consistent(dr: DspyGEPAResult, optimized: dspy.Module, n_val: int) -> None:
    """Every invariant a DspyGEPAResult from dspy.GEPA satisfies."""
    n = len(dr.candidates)
    assert len(dr.parents) == len(dr.val_aggregate_scores) == len(dr.val_subscores) == n
    assert len(dr.discovery_eval_counts) == n
    assert dr.parents[0] == [None]
    for i, parents in enumerate(dr.parents[1:], 1):
        assert parents and all(isinstance(p, int) and 0 <= p < i for p in parents), (i, parents)
    for subs, agg in zip(dr.val_subscores, dr.val_aggregate_scores):
        assert list(subs) == list(range(n_val))  # whole valset, valset order
        assert agg == pytest.approx(sum(subs.values()) / n_val, abs=1e-12)
    assert list(dr.per_val_instance_best_candidates) == list(range(n_val))
    for vid, front in dr.per_val_instance_best_candidates.items():
        best = max(s[vid] for s in dr.val_subscores)
        assert front == {i for i, s in enumerate(dr.val_subscores) if s[vid] == best}
        assert dr.highest_score_achieved_per_val_task[vid] == best
    assert dr.discovery_eval_counts[0] == 0
    assert dr.discovery_eval_counts == sorted(dr.discovery_eval_counts)
    assert dr.discovery_eval_counts[-1] <= dr.total_metric_calls
    assert dr.num_full_val_evals == n
    assert dr.best_idx == max(range(n), key=lambda i: dr.val_aggregate_scores[i])
    assert _texts(dr.best_candidate) == _texts(optimized)
    assert dr.best_candidate is not optimized
    if dr.best_outputs_valset is not None:
        assert list(dr.best_outputs_valset) == list(range(n_val))
        for vid, items in dr.best_outputs_valset.items():
            assert [i for i, _ in items] == sorted(dr.per_val_instance_best_candidates[vid])
            assert all(isinstance(p, dspy.Prediction) for _, p in items)


# ---------------------------------------------------------------------------------------------- surface
def test_compile_has_dspy_gepas_signature():
    ours = inspect.signature(TurboGEPA.compile).parameters
    theirs = inspect.signature(dspy.GEPA.compile).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()]
    assert ours["trainset"].kind is inspect.Parameter.KEYWORD_ONLY


def test_every_attribute_dspy_gepa_sets_is_set_here_to_the_same_value():
    """Code that reads an optimizer's attributes (``opt.max_metric_calls``, ``opt.custom_instruction_proposer``,
    MLflow autolog's ``get_params()``) finds what dspy.GEPA keeps, for every argument."""
    lm = dspy.LM("openai/unused", api_key="x")

    def proposer(candidate, reflective_dataset, components_to_update):
        return {}

    for kw in (
        {"max_metric_calls": 100, "reflection_lm": lm},
        {"max_full_evals": 2, "instruction_proposer": proposer},
        {"auto": "light", "reflection_lm": lm, "num_threads": 3, "seed": 5, "failure_score": -1.0,
         "perfect_score": 2.0, "use_merge": False, "max_merge_invocations": 2, "log_dir": "/tmp/somewhere",
         "track_stats": True, "track_best_outputs": True, "wandb_api_key": "wk-0123456789abcdef",
         "wandb_init_kwargs": {"project": "p"}, "warn_on_score_mismatch": False,
         "candidate_selection_strategy": "current_best", "component_selector": "all", "skip_perfect_score": False,
         "add_format_failure_as_feedback": True, "reflection_minibatch_size": 5,
         "gepa_kwargs": {"acceptance_criterion": "improvement_or_equal"}},
    ):
        theirs, ours = vars(dspy.GEPA(_metric, **kw)), vars(TurboGEPA(_metric, **kw))
        for name, value in theirs.items():
            assert name in ours, name
            assert ours[name] is value or ours[name] == value, (name, value, ours[name])


def test_dspy_341_has_no_enable_tool_optimization_and_neither_does_turbogepa():
    """A script passing it fails the same way under both (no silent acceptance of an unknown argument)."""
    assert "enable_tool_optimization" not in inspect.signature(dspy.GEPA.__init__).parameters
    for cls in (dspy.GEPA, TurboGEPA):
        with pytest.raises(TypeError, match="enable_tool_optimization"):
            cls(_metric, max_metric_calls=10, reflection_lm=dspy.LM("openai/unused"), enable_tool_optimization=True)


def test_result_fields_are_dspy_gepas_in_order_plus_the_documented_extras():
    ours = [f.name for f in dataclasses.fields(TurboGEPAResult)]
    theirs = [f.name for f in dataclasses.fields(DspyGEPAResult)]
    assert ours[: len(theirs)] == theirs and set(ours[len(theirs):]) == RESULT_EXTRAS
    assert issubclass(TurboGEPAResult, DspyGEPAResult)
    # dspy's result has no from_dict (gepa's GEPAResult does); neither side invents one
    assert not hasattr(DspyGEPAResult, "from_dict") and not hasattr(TurboGEPAResult, "from_dict")


# ------------------------------------------------------------------------------------- detailed_results
def test_detailed_results_side_by_side_with_dspy_gepa():
    """The same student, data and deterministic fake LMs through dspy.GEPA and TurboGEPA: every field has
    dspy.GEPA's type and shape, the seed's scores are identical, and the result is self-consistent."""
    _, theirs_prog, splits = _run(cls=dspy.GEPA, budget=120, track_best_outputs=True)
    _, ours_prog, _ = _run(budget=120, track_best_outputs=True)
    theirs, ours = theirs_prog.detailed_results, ours_prog.detailed_results
    assert type(theirs) is DspyGEPAResult and isinstance(ours, DspyGEPAResult)
    for field in dataclasses.fields(DspyGEPAResult):
        a, b = getattr(theirs, field.name), getattr(ours, field.name)
        assert type(a) is type(b), (field.name, type(a), type(b))
    assert ours.log_dir is None and ours.seed == theirs.seed == 0
    assert ours.val_aggregate_subscores is None and ours.per_objective_best_candidates is None
    assert ours.objective_pareto_front is None
    # candidate 0 is the seed, scored as dspy.GEPA scores it
    assert _texts(ours.candidates[0]) == _texts(theirs.candidates[0]) == TASKS["routing"].seed_instructions
    assert ours.val_subscores[0] == theirs.val_subscores[0]
    assert ours.val_aggregate_scores[0] == theirs.val_aggregate_scores[0]
    for dr in (theirs, ours):
        assert all(type(k) is int and type(v) is float for s in dr.val_subscores for k, v in s.items())
        assert all(type(v) is float for v in dr.val_aggregate_scores)
        assert all(type(c) is int for c in dr.discovery_eval_counts)
        assert all(type(f) is set for f in dr.per_val_instance_best_candidates.values())
        assert all(type(item) is tuple and type(item[0]) is int for items in dr.best_outputs_valset.values()
                   for item in items)
        assert all(isinstance(c, type(TASKS["routing"].make_program())) for c in dr.candidates)
    _check_consistent(theirs, theirs_prog, len(splits.val))
    _check_consistent(ours, ours_prog, len(splits.val))
    d_theirs, d_ours = theirs.to_dict(), ours.to_dict()
    assert set(d_ours) == set(d_theirs) | RESULT_EXTRAS
    assert d_ours["best_idx"] == ours.best_idx and d_ours["candidates"][0] == d_theirs["candidates"][0]
    assert all(type(v) is list for v in d_ours["per_val_instance_best_candidates"].values())
    # apart from the outputs (Predictions, as in dspy.GEPA), the dict is strict JSON, extras included
    json.dumps({k: v for k, v in d_ours.items() if k != "best_outputs_valset"}, allow_nan=False)
    # copies keep the type and every field; pickling (save_program=True) is dspy's own class (tested elsewhere)
    for clone in (copy.copy(ours), copy.deepcopy(ours), dataclasses.replace(ours, seed=3)):
        assert type(clone) is TurboGEPAResult and clone.parents == ours.parents


def test_valset_none_validates_on_the_trainset_as_dspy_gepa_does():
    _, theirs, splits = _run(cls=dspy.GEPA, budget=80, valset=None)
    _, ours, _ = _run(budget=80, valset=None)
    n = len(splits.train)
    _check_consistent(ours.detailed_results, ours, n)
    assert list(theirs.detailed_results.val_subscores[0]) == list(range(n))
    assert ours.detailed_results.val_subscores[0] == theirs.detailed_results.val_subscores[0]


def test_with_validation_rungs_only_fully_validated_candidates_are_listed():
    """With a valset of 30 the default rungs validate children on a third of it first and drop some there.
    Those never appear: every listed candidate has a full-valset score, so val_aggregate_scores, the
    fronts and best_idx mean what they mean in dspy.GEPA, and the returned program is best_candidate;
    the partial evaluations are still counted in total_metric_calls."""
    _, optimized, _ = _run(budget=500, n_train=30, n_val=30, data_seed=2, noise=None, num_threads=8,
                                seed=2, reflection_lm=make_reflection_lm(seed=2), track_best_outputs=True)
    dr = optimized.detailed_results
    assert dr.run_stats["mutations"].get("pruned", 0) >= 1, dr.run_stats["mutations"]  # rungs were used
    assert len(dr.candidates) >= 3
    _check_consistent(dr, optimized, 30)
    texts = [tuple(sorted(_texts(c).items())) for c in dr.candidates]
    assert len(set(texts)) == len(texts)  # no duplicate candidates (documented)
    assert dr.total_metric_calls < 500 + 2 * 3 + 30  # GEPA's overshoot bound


def test_discovery_eval_counts_include_each_candidates_own_validation():
    """docs/deviations.md: counted when the candidate is committed, its own validation included (gepa
    counts before it). The seed is 0, as in gepa (the docs' rule would give it len(valset))."""
    _, optimized, splits = _run(budget=200, use_merge=False)
    dr = optimized.detailed_results
    n_val = len(splits.val)
    assert len(dr.candidates) >= 3
    assert dr.discovery_eval_counts[0] == 0
    assert dr.discovery_eval_counts[1] >= 2 * n_val  # the seed's validation and its own
    assert all(b - a >= n_val for a, b in zip(dr.discovery_eval_counts[1:], dr.discovery_eval_counts[2:]))


# ------------------------------------------------------------------------------------------ constructor
def test_current_best_reflects_on_the_best_candidate_of_the_state_it_planned_from():
    """candidate_selection_strategy="current_best" (gepa: idxmax, the lowest index on ties): each
    reflective child's parent was the first best candidate at some point before the child joined (the
    plan may be a few commits old: mutations run at once)."""
    _, optimized, _ = _run(budget=250, candidate_selection_strategy="current_best", use_merge=False)
    dr = optimized.detailed_results
    agg = dr.val_aggregate_scores
    assert len(agg) >= 4
    for i, (parent,) in enumerate(dr.parents[1:], 1):
        firsts = {max(range(k), key=lambda j: agg[j]) for k in range(parent + 1, i + 1)}
        assert parent in firsts, (i, parent, agg)


def _specialist_proposer(task):
    """One lineage only ever fixes the first predictor it is asked about, the other the second: a merge
    of the two is better than both."""
    rules = task.all_rules_instructions()
    first: set[str] = set()

    def proposer(candidate, reflective_dataset, components_to_update):
        (name,) = components_to_update
        if name not in first:
            first.add(name)
            return {name: rules[name]}
        return {name: candidate[name] + " Keep it short."}

    return proposer


@pytest.mark.parametrize("kw, merges", [({}, 1), ({"use_merge": False}, 0), ({"max_merge_invocations": 0}, 0),
                                        ({"max_merge_invocations": None}, 1)])
def test_merge_switches_are_honoured(kw, merges, caplog):
    task = TASKS["pipeline"]
    with caplog.at_level(logging.INFO, logger="dspy_turbogepa.engine.orchestrator"):
        _, optimized, splits = _run("pipeline", budget=400, n_train=40, n_val=24, num_threads=8,
                                    instruction_proposer=_specialist_proposer(task), component_selector="round_robin",
                                    max_mutations_in_flight=2, **kw)
    dr = optimized.detailed_results
    merged = [i for i, p in enumerate(dr.parents) if len(p) == 2]
    assert len(merged) == merges, dr.parents
    # the log line of an accepted merge names both parents (it read "merge of candidate 6 on ")
    lines = [r.getMessage() for r in caplog.records if "(merge of candidates" in r.getMessage()]
    assert [f"merge of candidates {min(dr.parents[i])} and {max(dr.parents[i])}" in line
            for line, i in zip(lines, merged)] == [True] * merges, lines
    assert (dr.run_stats["mutations_by_kind"].get("merge", 0) > 0) == (merges > 0)
    assert [k for k in dr.candidate_kinds if k == "merge"] == ["merge"] * merges
    _check_consistent(dr, optimized, len(splits.val))


def test_an_all_perfect_seed_is_never_reflected_on_and_comes_back_as_a_new_program():
    calls: list[list[str]] = []

    def proposer(candidate, reflective_dataset, components_to_update):
        calls.append(list(components_to_update))
        return {c: candidate[c] + " Be brief." for c in components_to_update}

    task = TASKS["routing"]
    student = task.make_program()
    _, optimized, splits = _run(budget=200, metric=_perfect, instruction_proposer=proposer, program=student)
    dr = optimized.detailed_results
    assert calls == []  # skip_perfect_score=True: every minibatch is solved
    assert optimized is not student and _texts(optimized) == _texts(student) == task.seed_instructions
    assert dr.parents == [[None]] and dr.discovery_eval_counts == [0] and dr.num_full_val_evals == 1
    assert dr.best_idx == 0 and dr.val_aggregate_scores == [1.0]
    assert dr.stop_reason == "no_progress_possible"  # documented: no spinning on free no-ops
    # skip_perfect_score=False: the seed is reflected on, but a child can only tie it (not accepted)
    _, optimized, _ = _run(budget=200, metric=_perfect, instruction_proposer=proposer, skip_perfect_score=False)
    assert calls and len(optimized.detailed_results.candidates) == 1


def test_gepa_acceptance_criterion_improvement_or_equal_lets_ties_in():
    def proposer(candidate, reflective_dataset, components_to_update):
        proposer.n += 1
        return {c: f"{candidate[c]} Note {proposer.n}." for c in components_to_update}

    for criterion, joins in (("strict_improvement", False), ("improvement_or_equal", True)):
        proposer.n = 0
        _, optimized, _ = _run(budget=80, instruction_proposer=proposer, use_merge=False,
                               gepa_kwargs={"acceptance_criterion": criterion})
        dr = optimized.detailed_results
        assert (len(dr.candidates) > 1) == joins, (criterion, dr.run_stats["mutations"])
        assert proposer.n > 0
        _check_consistent(dr, optimized, 12)  # ties everywhere: best_idx and the program are the seed
        assert dr.best_idx == 0


def test_seed_none_runs_as_seed_zero_and_is_reported_as_given():
    """docs/deviations.md: ``seed=None`` runs as seed 0 (dspy.GEPA: a different run each time);
    ``detailed_results.seed`` holds what was passed, as dspy.GEPA's does."""
    runs = {}
    for seed in (0, None, 1):
        _, optimized, _ = _run("pipeline", budget=150, seed=seed)
        dr = optimized.detailed_results
        assert dr.seed == seed
        runs[seed] = (_texts(optimized), dr.parents, dr.val_aggregate_scores, dr.discovery_eval_counts)
    assert runs[0] == runs[None]
    assert runs[1] != runs[0]  # "pass different seeds for different runs"


def test_same_seed_same_results_with_a_callable_selector_rungs_and_jittery_lms():
    """The determinism claim (same seed and num_threads, deterministic LMs) where a user's selector asks in
    turn, validation rungs prune, and both LMs answer in random order."""

    def jitter(seed, scale):
        rng, lock = random.Random(seed), threading.Lock()

        def wait(request):
            with lock:
                delay = rng.random() * scale
            threading.Event().wait(delay)

        return wait

    def selector(state, trajectories, subsample_scores, candidate_idx, candidate):
        return [sorted(candidate)[(len(state.program_candidates) + candidate_idx) % len(candidate)]]

    outs = []
    for latency_seed in (1, 2):
        _, optimized, _ = _run(budget=400, n_train=30, n_val=30, noise=None, num_threads=8, seed=3,
                               component_selector=selector,
                               lm=make_student_lm(seed=0, noise=None, before_call=jitter(latency_seed, 0.003)),
                               reflection_lm=make_reflection_lm(seed=0, before_call=jitter(latency_seed + 9, 0.01)))
        dr = optimized.detailed_results
        outs.append((dr.to_dict()["candidates"], dr.parents, dr.val_aggregate_scores, dr.discovery_eval_counts,
                     dr.total_metric_calls))
    assert len(outs[0][0]) >= 3
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------------ proposer and selector
def test_a_custom_proposer_is_called_as_dspy_gepa_calls_it_and_its_texts_become_the_children():
    """gepa's ProposalFn protocol: keywords candidate (the parent's every component), reflective_dataset
    (records of dspy.GEPA's shape, only for components being updated), components_to_update; run under
    dspy.context(lm=reflection_lm). Its answer is the child, an unknown component name in it ignored
    (documented) and the rest used."""
    task = TASKS["pipeline"]
    rules = task.all_rules_instructions()
    reflection_lm = make_reflection_lm(seed=0)
    calls = []

    def proposer(candidate, reflective_dataset, components_to_update):
        n = len(calls) + 1
        answer = {c: f"{rules[c]} (draft {n})" for c in components_to_update}
        calls.append((dict(candidate), reflective_dataset, list(components_to_update), dspy.settings.lm, answer))
        return {**answer, "no_such_predictor": "ignored"}

    _, optimized, splits = _run("pipeline", budget=150, instruction_proposer=proposer, reflection_lm=reflection_lm,
                                use_merge=False)
    dr = optimized.detailed_results
    assert calls and len(dr.candidates) >= 2
    names = set(task.predictor_names)
    for candidate, dataset, to_update, lm, _ in calls:
        assert set(candidate) == names and to_update and set(to_update) <= names
        assert dataset and set(dataset) <= set(to_update)
        for records in dataset.values():
            for record in records:
                assert set(record) == RECORD_KEYS and isinstance(record["Feedback"], str)
                assert all(isinstance(v, str) for v in record["Inputs"].values())  # strings, as dspy.GEPA's
        assert lm is not None and lm.model == reflection_lm.model  # (a copy: documented)
    # every reflective child is its parent with exactly the texts the proposer answered for that parent
    for i, (parent,) in enumerate(dr.parents[1:], 1):
        before, after = _texts(dr.candidates[parent]), _texts(dr.candidates[i])
        changed = {k: v for k, v in after.items() if v != before[k]}
        assert changed and any(c == before and all(a.get(k) == v for k, v in changed.items())
                               for c, _, _, _, a in calls), (i, changed)


@pytest.mark.parametrize("selector, expect", [
    ("all", lambda names: [names]),
    ("round_robin", lambda names: [[n] for n in names]),
    (lambda state, trajectories, subsample_scores, candidate_idx, candidate: [sorted(candidate)[-1]],
     lambda names: [[sorted(names)[-1]]]),
    ("gepa_all", lambda names: [names]),
], ids=["all", "round_robin", "callable", "gepa_all_selector_object"])
def test_component_selector_decides_what_the_proposer_is_asked_to_rewrite(selector, expect):
    if selector == "gepa_all":
        from gepa.strategies.component_selector import AllReflectionComponentSelector

        selector = AllReflectionComponentSelector()
    asked: list[list[str]] = []

    def proposer(candidate, reflective_dataset, components_to_update):
        asked.append(list(components_to_update))
        return {c: candidate[c] + " Keep it short." for c in components_to_update}

    names = list(TASKS["pipeline"].predictor_names)
    _run("pipeline", budget=80, instruction_proposer=proposer, component_selector=selector, use_merge=False)
    assert asked
    assert all(a in expect(names) for a in asked), asked
    if selector == "round_robin":  # an explicit round robin is never mixed with all-component rewrites
        assert {tuple(a) for a in asked} == {(n,) for n in names}


def test_a_custom_selector_gets_gepas_arguments():
    """gepa calls ``selector(state, trajectories, subsample_scores, candidate_idx, candidate)``: the index
    names the candidate in the state, one trajectory and score per minibatch example."""
    seen = []

    def selector(state, trajectories, subsample_scores, candidate_idx, candidate):
        seen.append((list(state.program_candidates), list(state.program_full_scores_val_set),
                     list(state.named_predictor_id_to_update_next_for_program_candidate),
                     list(state.list_of_named_predictors), trajectories, list(subsample_scores), candidate_idx,
                     dict(candidate)))
        return [list(candidate)[len(seen) % len(candidate)]]

    _, optimized, _ = _run("pipeline", budget=120, component_selector=selector, use_merge=False)
    dr = optimized.detailed_results
    assert seen
    names = list(TASKS["pipeline"].predictor_names)
    for cands, scores, counters, predictors, trajectories, sub, idx, candidate in seen:
        assert type(idx) is int and 0 <= idx < len(cands) and cands[idx] == candidate
        assert len(scores) == len(counters) == len(cands) and predictors == names
        assert scores[idx] == dr.val_aggregate_scores[idx]
        assert len(trajectories) == len(sub) == 3
        assert [t["example_ind"] for t in trajectories] == [0, 1, 2]
        assert all(set(t) == {"example_ind", "example", "prediction", "trace", "score"} for t in trajectories)
        assert all(isinstance(s, float) for s in sub)


def test_a_custom_selectors_trajectory_score_is_what_the_metric_returned_as_in_dspy_gepa(tmp_path):
    feedback: dict[str, list] = {"GEPA": [], "TurboGEPA": [], "first": [], "resumed": []}

    def selector_for(name):
        def selector(state, trajectories, subsample_scores, candidate_idx, candidate):
            feedback[name] += [getattr(t["score"], "feedback", None) for t in trajectories]
            return [list(candidate)[0]]
        return selector

    _run("pipeline", cls=dspy.GEPA, budget=40, component_selector=selector_for("GEPA"), use_merge=False)
    assert feedback["GEPA"] and all(isinstance(f, str) and f for f in feedback["GEPA"])  # dspy.GEPA: yes
    _run("pipeline", budget=40, component_selector=selector_for("TurboGEPA"), use_merge=False)
    assert feedback["TurboGEPA"]
    assert all(isinstance(f, str) and f for f in feedback["TurboGEPA"]), feedback["TurboGEPA"][:3]
    # on resume the selector reads the stored trajectories: what the metric returned comes back with them
    metric_calls = []

    def counting(gold, pred, trace=None, pred_name=None, pred_trace=None):
        metric_calls.append(pred_name)
        return TASKS["pipeline"].metric(gold, pred, trace, pred_name, pred_trace)

    _run("pipeline", budget=40, component_selector=selector_for("first"), use_merge=False, log_dir=str(tmp_path),
         metric=counting)
    metric_calls.clear()
    _run("pipeline", budget=40, component_selector=selector_for("resumed"), use_merge=False, log_dir=str(tmp_path),
         metric=counting)
    assert feedback["resumed"] == feedback["first"] and all(isinstance(f, str) and f for f in feedback["resumed"])
    assert None not in metric_calls  # nothing scored again: the selector read the stored rows


def test_reflection_lm_none_with_a_proposer_runs_it_under_the_callers_lm():
    """dspy.GEPA runs a custom proposer under ``dspy.context(lm=reflection_lm or dspy.settings.lm)``."""
    lms = []

    def proposer(candidate, reflective_dataset, components_to_update):
        lms.append(dspy.settings.lm)
        return {c: candidate[c] + " Keep it short." for c in components_to_update}

    student_lm = make_student_lm(seed=0, noise=0.0)
    _run(budget=40, instruction_proposer=proposer, lm=student_lm)
    assert lms and all(lm is not None and lm.model == student_lm.model for lm in lms)
    # no LM configured at all (each predictor holds its own): None, as under dspy.GEPA
    lms.clear()
    program = TASKS["routing"].make_program()
    for _, pred in program.named_predictors():
        pred.lm = student_lm
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=20, n_val=12, n_test=0)
    with dspy.context(lm=None):  # an earlier test may have left an LM configured for the process
        TurboGEPA(task.metric, max_metric_calls=40, instruction_proposer=proposer, num_threads=4,
                  verbose=False).compile(program, trainset=splits.train, valset=splits.val)
    assert lms and all(lm is None for lm in lms)


def test_settings_that_make_reflection_read_what_dspy_gepas_reads():
    """README: with reflection_scouts=0, reflection_feedback_reuse=0, minibatch_sampling="epoch",
    max_sibling_reflections=1, adaptive_proposal_mix=False each reflection reads the minibatch only
    (at most reflection_minibatch_size records per predictor), one component at a time; by default it
    reads more (documented)."""
    gepa_like = {"reflection_scouts": 0, "reflection_feedback_reuse": 0, "minibatch_sampling": "epoch",
                 "max_sibling_reflections": 1, "adaptive_proposal_mix": False}
    for kw, limit in ((gepa_like, 3), ({**gepa_like, "reflection_minibatch_size": 2}, 2), ({}, None)):
        sizes: list[int] = []
        widths: list[int] = []

        def proposer(candidate, reflective_dataset, components_to_update):
            sizes.extend(len(v) for v in reflective_dataset.values())
            widths.append(len(components_to_update))
            return {c: candidate[c] + " Keep it short." for c in components_to_update}

        _, optimized, _ = _run("pipeline", budget=100, num_threads=8, instruction_proposer=proposer, **kw)
        assert sizes
        if limit is None:
            assert max(sizes) > 3
        else:
            assert max(sizes) <= limit and set(widths) == {1}, (kw, sizes, widths)
            assert optimized.detailed_results.run_stats["scouted"] == 0


# -------------------------------------------------------------------------------------- compile() args
def test_teacher_and_an_empty_valset_are_refused_before_any_lm_call():
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=6, n_val=4, n_test=0)
    lm = make_student_lm(seed=0, noise=0.0)
    reflection_lm = make_reflection_lm(seed=0)
    opt = TurboGEPA(task.metric, max_metric_calls=50, reflection_lm=reflection_lm, verbose=False)
    with dspy.context(lm=lm):
        with pytest.raises(AssertionError, match="Teacher"):  # dspy.GEPA: AssertionError too
            opt.compile(task.make_program(), trainset=splits.train, teacher=task.make_program())
        with pytest.raises(ConfigurationError, match="valset"):
            opt.compile(task.make_program(), trainset=splits.train, valset=[])
        with pytest.raises(AssertionError, match="Trainset"):
            opt.compile(task.make_program(), trainset=[])
        with pytest.raises(TypeError):  # trainset is keyword-only, as in dspy.GEPA
            opt.compile(task.make_program(), splits.train)
    assert lm.history == [] and reflection_lm.history == []


def test_compile_leaves_the_student_its_lms_the_data_and_the_optimizer_alone():
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=20, n_val=12, n_test=0)
    student_lm = make_student_lm(seed=0, noise=0.0, num_retries=3)
    reflection_lm = make_reflection_lm(seed=0, num_retries=4)
    lm_kwargs, reflection_kwargs = dict(student_lm.kwargs), dict(reflection_lm.kwargs)
    student = task.make_program()
    for _, pred in student.named_predictors():
        pred.lm = student_lm
    state = copy.deepcopy(student.dump_state())
    train_ids, train_rows = [id(e) for e in splits.train], [dict(e) for e in splits.train]
    opt = TurboGEPA(task.metric, max_metric_calls=100, reflection_lm=reflection_lm, num_threads=4, track_stats=True,
                    verbose=False)
    params = {k: v for k, v in opt.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))}
    optimized = opt.compile(student, trainset=splits.train, valset=splits.val)
    assert optimized is not student and student.dump_state() == state
    assert all(pred.lm is student_lm for _, pred in student.named_predictors())
    assert not hasattr(student, "detailed_results")
    assert [id(e) for e in splits.train] == train_ids and [dict(e) for e in splits.train] == train_rows
    # the user's LM objects keep their settings (retries included); their history sees every call
    assert student_lm.kwargs == lm_kwargs and student_lm.num_retries == 3
    assert reflection_lm.kwargs == reflection_kwargs and reflection_lm.num_retries == 4
    stats = optimized.detailed_results.run_stats
    assert len(reflection_lm.history) == stats["reflection_calls"] > 0
    assert len(student_lm.history) == stats["task_lm_calls"] > 0
    # the returned program's predictors hold a copy of the user's LM as dspy.GEPA's deepcopy makes it,
    # not the retry-less one the optimizer ran with
    for _, pred in optimized.named_predictors():
        assert pred.lm.model == student_lm.model and pred.lm.num_retries == 3
    assert {k: v for k, v in opt.get_params().items() if k in params} == params
    assert dspy.settings.lm is None


def test_reoptimizing_an_optimized_program_never_hands_on_its_old_detailed_results():
    """docs/deviations.md, Results: dspy.GEPA copies the student's old result into every candidate (and,
    with track_stats=False, into the returned program); here no built program carries it, and the student
    keeps its own."""
    task = TASKS["routing"]
    splits = task.splits(data_seed=0, n_train=20, n_val=12, n_test=0)
    lm = make_student_lm(seed=0, noise=0.0)

    def compile_(program, track_stats):
        opt = TurboGEPA(task.metric, max_metric_calls=60, reflection_lm=make_reflection_lm(seed=0), num_threads=4,
                        track_stats=track_stats, verbose=False)
        with dspy.context(lm=lm):
            return opt.compile(program, trainset=splits.train, valset=splits.val)

    first = compile_(task.make_program(), True)
    old = first.detailed_results
    again = compile_(first, False)
    assert not hasattr(again, "detailed_results")
    assert first.detailed_results is old
    tracked = compile_(first, True)
    assert tracked.detailed_results is not old
    assert not any(hasattr(c, "detailed_results") for c in tracked.detailed_results.candidates)
    assert _texts(tracked.detailed_results.candidates[0]) == _texts(first)


def test_the_results_log_dir_names_where_the_files_are(tmp_path, monkeypatch):
    """``log_dir="~/runs/x"`` writes under the home directory (as the run store opens it), and
    ``detailed_results.log_dir`` said "~/runs/x", a path nothing can open by that string."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _, optimized, _ = _run(budget=40, log_dir="~/runs/x")
    log_dir = optimized.detailed_results.log_dir
    assert log_dir == str(tmp_path / "runs" / "x") and (Path(log_dir) / "run.sqlite3").exists()


def test_a_rerun_on_the_same_log_dir_returns_the_same_result_and_never_writes_the_wandb_key(tmp_path, caplog):
    """docs/deviations.md: a resumed run returns what the first session did, paying nothing again;
    ``wandb_api_key`` (accepted, use_wandb=False) reaches no file, log line or error message."""
    key = "wk-7f3a9c2e5b1d4a6f8e0c"
    with pytest.raises(NotImplementedError) as info:
        TurboGEPA(_metric, max_metric_calls=10, reflection_lm=dspy.LM("openai/unused"), use_wandb=True,
                  wandb_api_key=key)
    assert key not in str(info.value)
    results = []
    with caplog.at_level(logging.DEBUG, logger="dspy_turbogepa"):
        for _ in range(2):
            _, optimized, splits = _run(budget=100, log_dir=str(tmp_path), wandb_api_key=key,
                                        track_best_outputs=True)
            results.append(optimized.detailed_results)
    first, second = results
    for name in ("parents", "val_aggregate_scores", "val_subscores", "per_val_instance_best_candidates",
                 "discovery_eval_counts", "total_metric_calls", "num_full_val_evals", "log_dir", "seed"):
        assert getattr(first, name) == getattr(second, name), name
    assert first.log_dir == str(tmp_path)
    assert second.run_stats["metric_calls_executed"] == 0
    assert second.run_stats["metric_calls_replayed"] == first.total_metric_calls
    assert ({v: [(i, dict(p)) for i, p in o] for v, o in first.best_outputs_valset.items()}
            == {v: [(i, dict(p)) for i, p in o] for v, o in second.best_outputs_valset.items()})
    _check_consistent(second, optimized, len(splits.val))
    assert key not in caplog.text
    for path in Path(tmp_path).rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
