"""Review (session 33, scale): per-commit work that grows with the number of candidates.

``ParetoFrontier.best_index()`` takes ``min`` over every committed candidate's aggregate. The engine
asks for it on every validation rung a child climbs (``_climb_rungs``: the incumbent for the promotion
test) and twice per accepted commit (``_commit``: once for ``improved_best``, once only to fill an
INFO log line's argument, computed even when INFO is off). So each mutation costs O(candidates) there
and a run O(candidates^2). Measured with zero-latency fake LMs (routing, a proposer that always writes
a new text, ``acceptance_criterion="improvement_or_equal"``, cProfile): the key function of that
``min`` ran 1.74 times per metric call at 59 candidates and 6.85 times at 234 (one run of 3,000 and
one of 12,000 metric calls); ``best_index`` takes 122 us at 1,000 candidates.
Small next to the Pareto recomputation docs/engine.md already lists, but a cost per commit that
need not grow at all: the best index can be kept up to date in ``ParetoFrontier.add`` (O(1)).

The test counts the aggregates ``best_index`` reads, per metric call, in two runs whose candidate
counts differ about fourfold; it is the count, not a timing.
"""

from __future__ import annotations

import pytest

from dspy_turbogepa.engine.frontier import ParetoFrontier
from dspy_turbogepa.testing import TASKS, make_student_lm

from helpers import quick_compile, small_splits


class _Counter:
    def __init__(self) -> None:
        self.touched = 0  # aggregates read inside best_index()
        self.active = False


class _CountingAggregates(dict):
    """``ParetoFrontier._aggregate``, counting the entries read while ``counter.active`` (inside
    ``best_index``): whatever the implementation, reading every candidate counts every candidate."""

    def __init__(self, counter: _Counter, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._counter = counter

    def _note(self, n: int = 1) -> None:
        if self._counter.active:
            self._counter.touched += n

    def __getitem__(self, key):
        self._note()
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note()
        return super().get(key, default)

    def __iter__(self):
        for k in super().__iter__():
            self._note()
            yield k

    def keys(self):
        return list(iter(self))

    def values(self):
        self._note(len(self))
        return super().values()

    def items(self):
        self._note(len(self))
        return super().items()


def _run(budget: int, counter: _Counter, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    original_init, original_best = ParetoFrontier.__init__, ParetoFrontier.best_index

    def counting_init(self: ParetoFrontier, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        self._aggregate = _CountingAggregates(counter, self._aggregate)

    def counting_best_index(self: ParetoFrontier) -> int:
        counter.active = True
        try:
            return original_best(self)
        finally:
            counter.active = False

    monkeypatch.setattr(ParetoFrontier, "__init__", counting_init)
    monkeypatch.setattr(ParetoFrontier, "best_index", counting_best_index)
    n = [0]

    def variant(candidate, reflective_dataset, components_to_update):
        n[0] += 1
        return {c: candidate[c] + f" V{n[0]}." for c in components_to_update}

    task = TASKS["routing"]
    data = small_splits(task, n_train=200, n_val=8, n_test=0)
    out = quick_compile(budget=budget, data=data, lm=make_student_lm(noise=0.0), instruction_proposer=variant,
                        num_threads=8, gepa_kwargs={"acceptance_criterion": "improvement_or_equal"})
    dr = out.detailed_results
    monkeypatch.setattr(ParetoFrontier, "__init__", original_init)
    monkeypatch.setattr(ParetoFrontier, "best_index", original_best)
    return dr.total_metric_calls, len(dr.candidates)


def test_best_index_work_per_metric_call_does_not_grow_with_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    small, large = _Counter(), _Counter()
    calls_s, cands_s = _run(300, small, monkeypatch)
    calls_l, cands_l = _run(1200, large, monkeypatch)
    assert cands_l >= 3 * cands_s, (cands_s, cands_l)  # the setting really grows the pool
    per_call_s = small.touched / calls_s
    per_call_l = large.touched / calls_l
    # linear work (O(1) per commit) keeps this ratio near 1; today it follows the candidate count
    assert per_call_l <= 1.5 * per_call_s, (
        f"best_index read {per_call_s:.2f} candidates per metric call with {cands_s} candidates and "
        f"{per_call_l:.2f} with {cands_l}"
    )
