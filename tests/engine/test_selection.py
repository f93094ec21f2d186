"""ComponentSelector (round robin / all / callable) and Candidate identity."""

from __future__ import annotations

import pytest

from dspy_turbogepa.engine.candidate import Candidate, fingerprint_texts
from dspy_turbogepa.engine.selection import ComponentSelector, SelectorState


def test_round_robin_is_per_candidate_and_child_inherits_max() -> None:
    sel = ComponentSelector(["a", "b", "c"], "round_robin")
    texts = {"a": "", "b": "", "c": ""}
    picks = [sel.select("seed", texts, 0, (), (), None) for _ in range(4)]
    assert [p[0] for p in picks] == [["a"], ["b"], ["c"], ["a"]]
    assert [p[1] for p in picks] == [1, 2, 0, 1]  # the counter a child of that mutation inherits
    assert sel.counter("seed") == 1
    assert sel.select("other", texts, 1, (), (), None) == (["a"], 1)  # independent counter
    sel.inherit("child", 2)
    sel.inherit("child", 1)  # max over parents
    assert sel.counter("child") == 2
    assert sel.select("child", texts, 2, (), (), None)[0] == ["c"]


def test_all_returns_every_component_and_keeps_counter() -> None:
    sel = ComponentSelector(["a", "b"], "all")
    assert sel.select("p", {"a": "", "b": ""}, 0, (), (), None) == (["a", "b"], 0)
    assert sel.counter("p") == 0


def test_callable_receives_gepa_style_arguments() -> None:
    seen = []

    def policy(state, trajectories, scores, idx, candidate):
        seen.append((state, trajectories, scores, idx, candidate))
        return ["b"]

    sel = ComponentSelector(["a", "b"], policy)
    state = SelectorState(["a", "b"], [{"a": "x", "b": "y"}], [0.5])
    names, counter = sel.select("p", {"a": "x", "b": "y"}, 0, ("t1", "t2"), (0.0, 1.0), state)
    assert (names, counter) == (["b"], 0)
    assert seen == [(state, ["t1", "t2"], [0.0, 1.0], 0, {"a": "x", "b": "y"})]


def test_callable_returning_unknown_component_raises() -> None:
    sel = ComponentSelector(["a"], lambda *args: ["a", "zzz"])
    with pytest.raises(ValueError, match="zzz"):
        sel.select("p", {"a": ""}, 0, (), (), None)


def test_callable_returning_none_selects_nothing() -> None:
    sel = ComponentSelector(["a"], lambda *args: None)
    assert sel.select("p", {"a": ""}, 0, (), (), None) == ([], 0)


def test_no_components_rejected() -> None:
    with pytest.raises(ValueError):
        ComponentSelector([], "round_robin")


def test_fingerprint_depends_on_content_only() -> None:
    a = Candidate({"x": "1", "y": "2"})
    b = Candidate({"y": "2", "x": "1"}, parents=("zz",), kind="merge")
    assert a.fingerprint == b.fingerprint == fingerprint_texts({"x": "1", "y": "2"})
    assert a == Candidate({"x": "1", "y": "2"})
    assert Candidate({"x": "1", "y": "3"}).fingerprint != a.fingerprint
    assert Candidate({"x": "1 ", "y": "2"}).fingerprint != a.fingerprint


def test_candidate_texts_are_frozen_and_children_link_parents() -> None:
    src = {"x": "1", "y": "2"}
    c = Candidate(src)
    src["x"] = "changed"
    assert c.texts["x"] == "1"
    with pytest.raises(TypeError):
        c.texts["x"] = "2"  # type: ignore[index]
    child = c.with_updates({"y": "3"}, "reflection")
    assert dict(child.texts) == {"x": "1", "y": "3"}
    assert child.parents == (c.fingerprint,)
    assert child.kind == "reflection"
    assert child.changed_components(c) == {"y"}
    with pytest.raises(KeyError):
        c.with_updates({"nope": "1"}, "reflection")


def test_a_callable_selector_gives_the_same_run_whatever_the_timing() -> None:
    """gepa's round-robin selector reads and advances the parent's counter when the parent's traced
    minibatch returns: the mutation whose minibatch came back first took the next component, so two
    runs with the same seed differed (1 run in 5 with a jittery LM)."""
    from gepa.strategies.component_selector import RoundRobinReflectionComponentSelector

    from .fakes import fixed_width, hard_setup, make_config, run_fakes, snapshot

    snaps = []
    for sleep_seed in range(5):
        cfg = make_config(max_metric_calls=300, max_mutations_in_flight=4, deterministic=True,
                          component_selector=RoundRobinReflectionComponentSelector(), **fixed_width())
        result, *_ = run_fakes(cfg, hard_setup(components=("a", "b", "c")), sleep_seed=sleep_seed)
        snaps.append(snapshot(result))
    assert all(s == snaps[0] for s in snaps[1:])


def test_a_callable_selector_that_advances_gepas_counters_is_kept() -> None:
    """gepa's round-robin selector object writes named_predictor_id_to_update_next_for_program_candidate;
    the write must carry to the next call, or it picks the same component every time."""
    def round_robin(state, trajectories, scores, idx, candidate):
        k = state.named_predictor_id_to_update_next_for_program_candidate[idx]
        state.named_predictor_id_to_update_next_for_program_candidate[idx] = (k + 1) % 2
        return [["a", "b"][k]]

    sel = ComponentSelector(["a", "b"], round_robin)
    picks = []
    for _ in range(3):
        state = SelectorState(["a", "b"], [{"a": "", "b": ""}], [0.0], [sel.counter("p")])
        picks.append(sel.select("p", {"a": "", "b": ""}, 0, (), (), state)[0])
    assert picks == [["a"], ["b"], ["a"]]


def test_a_callable_may_return_any_iterable_of_names_read_once() -> None:
    """A numpy array of two names stopped the run (its truth value is ambiguous), and a generator was used
    up by the first read so an unknown name in it went unreported; dspy.GEPA takes both."""
    import numpy as np

    sel = ComponentSelector(["a", "b", "c"], lambda *args: np.array(["a", "b", "c"])[[0, 2]])
    assert sel.select("p", {"a": "", "b": "", "c": ""}, 0, (), (), None)[0] == ["a", "c"]
    sel = ComponentSelector(["a", "b"], lambda *args: (c for c in ["b", "typo"]))
    with pytest.raises(ValueError, match=r"unknown components \['typo'\]"):
        sel.select("p", {"a": "", "b": ""}, 0, (), (), None)
    sel = ComponentSelector(["a", "b"], lambda *args: 3)
    with pytest.raises(ValueError, match="returned a value of type int, not a list of names"):
        sel.select("p", {"a": "", "b": ""}, 0, (), (), None)


def test_a_callable_returning_one_name_as_a_string_is_told_to_return_a_list() -> None:
    sel = ComponentSelector(["pa", "pb"], lambda *args: "pa")
    with pytest.raises(ValueError, match=r"returned the string 'pa'; return a list of component names \(e.g. \['pa'\]"):
        sel.select("p", {"pa": "", "pb": ""}, 0, (), (), None)


def test_a_custom_selectors_subset_is_a_reflection_not_a_reflection_on_all() -> None:
    from .fakes import hard_setup, make_config, run_fakes

    cfg = make_config(max_metric_calls=120, component_selector=lambda state, traj, scores, idx, cand: ["a", "b"])
    result, *_ = run_fakes(cfg, hard_setup(components=("a", "b", "c")))
    assert result.stats.mutations_by_kind.get("reflection", 0) > 0
    assert "reflection_all" not in result.stats.mutations_by_kind
    cfg = make_config(max_metric_calls=120, component_selector=lambda state, traj, scores, idx, cand: ["c", "b", "a"])
    result, *_ = run_fakes(cfg, hard_setup(components=("a", "b", "c")))
    assert result.stats.mutations_by_kind.get("reflection_all", 0) > 0
