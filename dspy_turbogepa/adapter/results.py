"""``detailed_results``: a real ``DspyGEPAResult`` (subclass), so ``isinstance`` checks keep passing."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import dspy
from dspy.teleprompt.gepa.gepa import DspyGEPAResult

from dspy_turbogepa.engine.records import EngineResult


@dataclass(frozen=True)
class TurboGEPAResult(DspyGEPAResult):
    """dspy.GEPA's result plus what a streaming run can tell on top.

    Extra fields: ``discovery_seconds`` (wall-clock seconds from the start of the search to when each
    candidate joined the pool, its full-validation score committed), ``candidate_kinds`` (how each
    was proposed), ``stop_reason`` and ``run_stats`` (mutation outcomes, failures by cause,
    reflection calls, cache hits, ...).
    """

    discovery_seconds: list[float] = field(default_factory=list)
    candidate_kinds: list[str] = field(default_factory=list)
    stop_reason: str | None = None
    run_stats: dict[str, Any] = field(default_factory=dict)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (``program.save(path, save_program=True)``, which pickles ``detailed_results`` with the
        program) as dspy's own ``DspyGEPAResult``, so the saved program loads where dspy_turbogepa is not
        installed, as one saved after dspy.GEPA does. The extra fields stay in ``log_dir/summary.json``."""
        return DspyGEPAResult, tuple(getattr(self, f.name) for f in fields(DspyGEPAResult))

    def __copy__(self) -> TurboGEPAResult:
        return replace(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> TurboGEPAResult:  # a copy keeps the type and every field
        return replace(self, **{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)})

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            discovery_seconds=self.discovery_seconds,
            candidate_kinds=self.candidate_kinds,
            stop_reason=self.stop_reason,
            run_stats=self.run_stats,
        )
        return out


def build_result(
    result: EngineResult,
    build_program: Callable[[Mapping[str, str]], dspy.Module],
    log_dir: str | None,
    seed: int | None,
    track_best_outputs: bool,
) -> TurboGEPAResult:
    records = result.records
    val_ids = result.val_ids
    # every per-example mapping in valset order, as dspy.GEPA's are (scores arrive in completion order,
    # and users pair them with the valset: zip(valset, subscores.values()))
    fronts = {vid: set(result.fronts[vid]) for vid in val_ids if vid in result.fronts}
    best_outputs = None
    if track_best_outputs:
        # A rollout that failed without an output (it raised): dspy.GEPA lists dspy.Evaluate's empty
        # Prediction, so every example has an entry (users read ``outs[0][1]`` per example). A program that
        # returned None is listed with None, as there. Outputs a resumed session did not keep, or masked,
        # were run again on resume: only such failures lack one.
        best_outputs = {
            vid: [(i, records[i].val_outputs.get(vid, dspy.Prediction())) for i in sorted(fronts.get(vid, ()))]
            for vid in val_ids
        }
    objective_names = sorted({k for r in records for scores in r.val_objective_scores.values() for k in scores})
    agg_sub = None
    per_obj_best = None
    obj_front = None
    if objective_names:
        agg_sub = []
        for r in records:
            # each objective averaged over the examples that report it, as gepa aggregates them (an
            # objective a metric reports only on some examples is not a 0 on the others)
            means = {}
            for k in objective_names:
                values = [s[k] for s in r.val_objective_scores.values() if k in s]
                if values:  # an objective no example reported is left out, as gepa leaves it out
                    means[k] = sum(values) / len(values)
            agg_sub.append(means)
        obj_front = {k: max(a[k] for a in agg_sub if k in a) for k in objective_names}
        per_obj_best = {k: {i for i, a in enumerate(agg_sub) if a.get(k) == obj_front[k]} for k in objective_names}
    return TurboGEPAResult(
        candidates=[build_program(r.candidate.texts) for r in records],
        parents=[list(r.parent_indices) for r in records],
        val_aggregate_scores=[r.aggregate for r in records],
        val_subscores=[{vid: r.val_scores[vid] for vid in val_ids if vid in r.val_scores} for r in records],
        per_val_instance_best_candidates=fronts,
        discovery_eval_counts=[r.reported_discovery_calls for r in records],
        best_outputs_valset=best_outputs,
        total_metric_calls=result.total_metric_calls,
        num_full_val_evals=result.num_full_val_evals,
        log_dir=log_dir,
        seed=seed,
        val_aggregate_subscores=agg_sub,
        per_objective_best_candidates=per_obj_best,
        objective_pareto_front=obj_front,
        discovery_seconds=[r.discovery_seconds for r in records],
        candidate_kinds=[r.candidate.kind for r in records],
        stop_reason=result.stop_reason,
        run_stats=result.stats.to_dict(),
    )
