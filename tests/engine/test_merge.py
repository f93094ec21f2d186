"""Merge: which texts a merged child takes, and which pairs of candidates may be merged."""

from __future__ import annotations

import random

from dspy_turbogepa.engine.candidate import Candidate, fingerprint_texts
from dspy_turbogepa.engine.merge import find_merge, merge_texts
from dspy_turbogepa.engine.records import CandidateRecord


def test_a_merge_takes_the_side_that_changed_and_the_better_parent_on_a_conflict() -> None:
    rng = random.Random(0)
    ancestor = {"x": "0", "y": "0"}
    assert merge_texts(ancestor, {"x": "A", "y": "0"}, {"x": "0", "y": "B"}, 0.5, 0.6, rng) == {"x": "A", "y": "B"}
    assert merge_texts({"x": "0"}, {"x": "A"}, {"x": "B"}, 0.7, 0.6, rng) == {"x": "A"}
    assert merge_texts({"x": "0"}, {"x": "A"}, {"x": "B"}, 0.6, 0.7, rng) == {"x": "B"}


def _record(index: int, texts: dict[str, str], parents: list[int | None], score: float) -> CandidateRecord:
    return CandidateRecord(index=index, candidate=Candidate(texts=texts), parent_indices=parents,
                           val_scores={0: score, 1: score})


def _find(records: list[CandidateRecord], pool: list[int]):
    by_fingerprint = {fingerprint_texts(r.candidate.texts): r.index for r in records}
    return find_merge(records, pool, by_fingerprint, set(), random.Random(0), 2, fingerprint_texts)


def test_a_candidate_is_never_merged_with_its_own_descendant() -> None:
    records = [_record(0, {"x": "0", "y": "0"}, [None], 0.2), _record(1, {"x": "A", "y": "0"}, [0], 0.6),
               _record(2, {"x": "C", "y": "B"}, [1], 0.4)]  # a merge would build the new {"x": "A", "y": "B"}
    assert _find(records, [1, 2]) is None


def test_the_common_ancestor_must_be_no_better_than_either_parent() -> None:
    records = [_record(0, {"x": "0", "y": "0"}, [None], 0.9), _record(1, {"x": "A", "y": "0"}, [0], 0.4),
               _record(2, {"x": "0", "y": "B"}, [0], 0.6)]
    assert _find(records, [1, 2]) is None
    records[0] = _record(0, {"x": "0", "y": "0"}, [None], 0.1)
    assert _find(records, [1, 2]) is not None  # the same shape with a weaker ancestor merges


def test_a_long_run_computes_each_records_aggregate_once(monkeypatch) -> None:
    """The merge search read every common ancestor's aggregate on every plan, and each read sorted the
    record's validation scores: in a long one-component run (where no merge is ever possible) that
    grew the engine's CPU per metric call fivefold between 28 and 240 candidates (a profiling review)."""
    from dspy_turbogepa.engine import records as records_module

    from .fakes import hard_setup, make_config, run_fakes

    calls = [0]
    real = records_module.mean_in_id_order

    def counting(scores):
        calls[0] += 1
        return real(scores)

    monkeypatch.setattr(records_module, "mean_in_id_order", counting)
    setup = hard_setup(train_n=40, val_n=16, num_keywords=30)
    result, *_ = run_fakes(make_config(max_metric_calls=3000, use_merge=True, max_merge_invocations=1000), setup)
    assert len(result.records) >= 15, len(result.records)
    assert calls[0] <= len(result.records), (calls[0], len(result.records))


# Two siblings of record 1 that changed different components, and two usable common ancestors (0 and 1):
# through either one, merging 2 and 3 builds the same child {"x": "A2", "y": "B"}.
_TWO_ANCESTORS = [_record(0, {"x": "0", "y": "0"}, [None], 0.1), _record(1, {"x": "A", "y": "0"}, [0], 0.2),
                  _record(2, {"x": "A2", "y": "0"}, [1], 0.5), _record(3, {"x": "A", "y": "B"}, [1], 0.4)]


def test_a_merge_already_launched_for_the_pair_is_not_built_again_through_another_ancestor() -> None:
    """While the first merge is evaluated its child is not in the pool yet, so only ``planned`` (the
    children of merges launched) keeps a second plan from rebuilding it via the other ancestor."""
    pool = {fingerprint_texts(r.candidate.texts) for r in _TWO_ANCESTORS}
    tried: set[tuple[int, int, int]] = set()
    first = find_merge(_TWO_ANCESTORS, [2, 3], pool, tried, random.Random(0), 2, fingerprint_texts)
    assert first is not None and first.texts == {"x": "A2", "y": "B"}
    assert first.fingerprint == fingerprint_texts(first.texts)
    planned = {first.fingerprint}
    for seed in range(5):  # whichever ancestor is drawn, the only child there is has been launched
        assert find_merge(_TWO_ANCESTORS, [2, 3], pool, set(tried), random.Random(seed), 2, fingerprint_texts,
                          planned) is None
    # without it, the other ancestor gives the same child again (what a second plan in flight used to build)
    again = find_merge(_TWO_ANCESTORS, [2, 3], pool, set(tried), random.Random(1), 2, fingerprint_texts)
    assert again is not None and again.ancestor != first.ancestor and again.texts == first.texts
