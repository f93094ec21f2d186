"""Writing a run to the run store and reading it back for resume — the DSPy side of persistence.

The store (``dspy_turbogepa.store``) knows rows; this module turns the engine's events into rows
(``StoreObserver``) and stored rows back into the engine's caches (``load_known``). The JSON of a
trajectory is ``trajectory_json``'s; what a store is keyed by is ``run_identity``'s.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, get_args

import dspy

from dspy_turbogepa.adapter.program import ProgramCodec, valid_unicode
from dspy_turbogepa.adapter.trajectory_json import (
    prediction_dict,
    prediction_from,
    trajectory_from_json,
    trajectory_to_json,
)
from dspy_turbogepa.engine.candidate import Candidate
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.engine.records import CandidateRecord, MutationResult, PriorUsage
from dspy_turbogepa.engine.systemic import PROPOSER_FAILURES
from dspy_turbogepa.engine.types import EvalKey, EvalOutcome, FailureKind, ProposalOutcome, Split
from dspy_turbogepa.redaction import (
    REDACTED,
    describe_error,
)

logger = logging.getLogger(__name__)

FAILURE_KINDS = frozenset(get_args(FailureKind))


#: Failures after which the program's answer exists (the metric, not the program, failed).
_ANSWERED = (None, "metric_error", "metric_invalid")


class StoreObserver(EngineObserver):
    """Writes candidates, evaluations, proposals and commits to the store as they happen."""

    def __init__(self, store: Any, keeps_outputs: bool = False) -> None:
        """``keeps_outputs``: the evaluator keeps validation outputs (``track_best_outputs``); a program
        that answered ``None`` is then stored as a JSON null, not as "no output kept"."""
        self._store = store
        self._keeps_outputs = keeps_outputs
        # a resumed run's candidates are stored already: each replayed one was masked and encoded again, all
        # its texts (tens of MB with long instructions), for an insert the store ignores
        self._recorded: set[str] = store.candidate_fingerprints() if getattr(store, "resumed", False) else set()
        self._unstorable = 0

    def _candidate(self, c: Candidate) -> None:
        # Every evaluated candidate is stored (not only accepted ones): a resumed run needs the texts
        # behind each stored evaluation to rebuild its trajectory. created_at: when it was first stored
        # (Unix seconds), which is its first finished evaluation.
        if c.fingerprint not in self._recorded:
            self._recorded.add(c.fingerprint)
            self._store.record_candidate(c.fingerprint, dict(c.texts), list(c.parents), c.kind, time.time())

    def on_evaluation(self, candidate: Candidate, split: Split, outcome: EvalOutcome) -> None:
        self._candidate(candidate)
        try:
            if outcome.output is not None:
                output: str | None = json.dumps(prediction_dict(outcome.output))
            elif self._keeps_outputs and split == "val" and outcome.failure in _ANSWERED:
                output = "null"  # kept, and it was None: a resume with track_best_outputs must not run it again
            else:
                output = None
            # whatever carries a trajectory (train rows; every row when the valset is the trainset)
            trajectory = trajectory_to_json(outcome.trajectory)
        except (TypeError, ValueError, RecursionError) as exc:
            # A value the walk let through that JSON cannot write: the run goes on with the outcome in
            # memory; unstored, a resume runs the evaluation again instead of reading half of it.
            self._unstorable += 1
            if self._unstorable == 1:
                logger.warning("An evaluation's outputs could not be written to the run store (%s: %s); it is "
                               "kept for this run, and a resume will run it again. Further ones at DEBUG.",
                               type(exc).__name__, describe_error(exc))
            else:
                logger.debug("Evaluation not stored: %s", describe_error(exc))
            return
        self._store.record_evaluation(
            candidate.fingerprint, split, outcome.example_id, outcome.score,
            dict(outcome.objective_scores) if outcome.objective_scores else None,
            outcome.failure, outcome.message, outcome.error_type, trajectory,
            output, None, None, service_failure=outcome.service_failure,
            usage={"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                   "cost": outcome.cost},
        )

    def on_candidate(self, record: CandidateRecord) -> None:
        c = record.candidate
        self._candidate(c)
        self._store.record_event(
            "candidate_accepted",
            {"index": record.index, "fingerprint": c.fingerprint, "aggregate": record.aggregate,
             "parents": record.parent_indices, "metric_calls": record.discovery_metric_calls},
        )

    def on_proposal(self, key: str, proposal: ProposalOutcome) -> None:
        self._store.record_proposal(key, dict(proposal.texts), proposal.skipped, proposal.message,
                                    proposal.reflection_calls,
                                    usage={"prompt_tokens": proposal.reflection_prompt_tokens,
                                           "completion_tokens": proposal.reflection_completion_tokens,
                                           "cost": proposal.reflection_cost})

    def on_mutation(self, result: MutationResult, status: str) -> None:
        self._store.record_event(
            "mutation_committed",
            {"seq": result.plan.seq, "kind": result.plan.kind, "status": status, "detail": result.detail},
        )


def _used(usage: Mapping[str, float] | None, name: str) -> float:
    value = (usage or {}).get(name, 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def stored_usage(store: Any) -> PriorUsage:
    """What the stored sessions paid for, every row (failed evaluations and reflections too: the LM
    billed them, and a rerun that runs them again replaces the row, not the bill)."""
    totals = store.total_usage()
    task, reflection = totals["evaluations"], totals["proposals"]
    return PriorUsage(
        task_prompt_tokens=int(task["prompt_tokens"]), task_completion_tokens=int(task["completion_tokens"]),
        task_cost=task["cost"], reflection_prompt_tokens=int(reflection["prompt_tokens"]),
        reflection_completion_tokens=int(reflection["completion_tokens"]), reflection_cost=reflection["cost"],
    )


def last_committed_mutation(store: Any) -> int:
    """The highest mutation number an earlier session committed (-1 if none): a capped rerun replays
    the mutations up to it (Orchestrator's ``replay_through``)."""
    seqs = [e.payload.get("seq") for e in store.events("mutation_committed")]
    return max((s for s in seqs if isinstance(s, int)), default=-1)


#: The event each session records with the budgets it plans with, in turn (``{"budgets": [...]}``), and
#: the session-meta flag saying it was to record one (set at open, before anything can fail).
PLAN_BUDGETS_EVENT = "plan_budgets"


def earlier_budgets(store: Any) -> list[int]:
    """The budgets the newest earlier session that planned anything planned with, in turn (the engine's
    ``PlanLimits``): a resumed run plans with them before its own, so that what that session stored is
    asked for again, not planned past. Read from that session's record (every session writes one,
    ``PLAN_BUDGETS_EVENT``), not rebuilt from the sessions' budgets: a session of an earlier version
    planned with its own budget alone, and one that ran with ``deterministic=False`` with no earlier
    one. A session that committed no mutation and stored no proposal (stopped right after the seed, or
    as it set up) left no plan to replay and is passed over."""
    sessions = store.sessions()
    planned = {e.session for e in store.events("mutation_committed")} | store.proposal_sessions()
    recorded = {e.session: e.payload.get("budgets") for e in store.events(PLAN_BUDGETS_EVENT)}
    for session in reversed(sessions[:-1]):  # the newest earlier session that planned anything
        if session.id not in planned:
            continue
        if isinstance(recorded.get(session.id), list):
            budgets = recorded[session.id]
        elif session.meta.get(PLAN_BUDGETS_EVENT):
            continue  # it was to record them and ended first (killed as it opened): it planned nothing
        else:
            budgets = [session.meta.get("max_metric_calls")]  # an earlier version's: its own budget alone
        return [b for b in budgets if isinstance(b, int) and not isinstance(b, bool) and b >= 1]
    return []


def load_known(
    store: Any, codec: ProgramCodec, datasets: Mapping[Split, Sequence[dspy.Example]], seed_texts: Mapping[str, str],
    need_outputs: bool = False,
) -> tuple[dict[EvalKey, EvalOutcome], dict[str, ProposalOutcome]]:
    """Stored evaluations and proposals as the engine's caches. Proposals replay whichever reflection LM
    made them: what an earlier session did is the run's history, and a session with another reflection
    LM continues the run from it (its new reflections ask the new LM).

    ``need_outputs`` (``track_best_outputs=True``): a validation row stored without the program's
    output by a session that did not keep outputs is run again, once, with a warning; replayed, its
    example would have no entry in ``best_outputs_valset``.

    Not replayed: failures of the LM service, a failed proposer (often the reflection LM's key or
    endpoint), and every failure recorded by a session that stopped on a systemic failure — its error
    said "fix ... and run again", and the fixed setup must not be scored with the broken one's failures
    (a fix outside the run key's view: an environment variable, a file, a service the metric calls)."""
    systemic = {e.session for e in store.events("systemic_failure")}
    # Candidate texts are stored with credential-looking substrings masked: a masked text is another
    # program, and rebuilding a trajectory with it would cache that program under the real fingerprint.
    # Only texts that still hash to their fingerprint are used; the seed's come from the student.
    with store.decoding("a stored candidate"):  # a row of another shape (texts not a mapping): a damaged store
        texts_by_fp: dict[str, Mapping[str, str]] = {
            c.fingerprint: c.texts for c in store.load_candidates() if Candidate(c.texts).fingerprint == c.fingerprint
        }
    texts_by_fp[Candidate(seed_texts).fingerprint] = seed_texts
    with store.decoding("a stored proposal"):
        proposals = {
            key: ProposalOutcome(texts=dict(p.texts), skipped=p.skipped, message=p.message,
                                 reflection_calls=p.reflection_calls,
                                 reflection_prompt_tokens=int(_used(p.usage, "prompt_tokens")),
                                 reflection_completion_tokens=int(_used(p.usage, "completion_tokens")),
                                 reflection_cost=_used(p.usage, "cost"))
            for key, p in store.load_proposals().items()
            if p.skipped != "proposer_error" and not (p.skipped in PROPOSER_FAILURES and p.session in systemic)
            # a text no program can hold, stored by a version that did not refuse it: ask the proposer again
            and all(valid_unicode(t) for t in p.texts.values() if isinstance(t, str))
        }
    known: dict[EvalKey, EvalOutcome] = {}
    without_output = masked = 0
    for ev in store.load_evaluations():
        split: Split = "train" if ev.split == "train" else "val"
        if ev.failure is not None and ev.failure not in FAILURE_KINDS:
            # a damaged row: replayed as a failure, it would feed the run-stopping rules a cause nothing raised
            with store.decoding("a stored evaluation"):
                raise ValueError(f"unknown failure kind {ev.failure!r}")
        if ev.example_id >= len(datasets[split]) or ev.service_failure:
            continue  # the LM service's failure says nothing about the candidate: run it again
        if ev.failure and ev.session in systemic:
            continue
        if need_outputs and split == "val" and not ev.output_json and ev.failure in _ANSWERED:
            without_output += 1  # the program answered, but that session did not keep the answer
            continue
        if need_outputs and ev.output_json and REDACTED in ev.output_json:
            masked += 1  # best_outputs_valset would return the masked copy
            continue
        trajectory = None
        output = None
        with store.decoding("a stored evaluation's trace or output"):
            # a trace of a candidate whose stored texts were masked cannot be rebuilt: lost as a masked
            # trace is (run again if a reflection is to read it), not dropped from what reflections read
            trace_lost = _trace_masked(ev) or (bool(ev.trajectory_json) and ev.fingerprint not in texts_by_fp)
            if ev.trajectory_json and ev.fingerprint in texts_by_fp and not trace_lost:
                trajectory = trajectory_from_json(
                    ev.trajectory_json, datasets[split][ev.example_id], codec, ev.fingerprint,
                    texts_by_fp[ev.fingerprint],
                )
            if ev.output_json:
                output = prediction_from(json.loads(ev.output_json))
        known[(ev.fingerprint, split, ev.example_id)] = EvalOutcome(
            example_id=ev.example_id, score=ev.score,
            objective_scores=dict(ev.objective_scores) if ev.objective_scores else None,
            failure=ev.failure, message=ev.message, trajectory=trajectory, output=output, error_type=ev.error_type,
            prompt_tokens=int(_used(ev.usage, "prompt_tokens")),
            completion_tokens=int(_used(ev.usage, "completion_tokens")), cost=_used(ev.usage, "cost"),
            trace_lost=trace_lost,
        )
    if without_output:
        logger.warning("track_best_outputs=True: %d stored validation evaluations were written without their "
                       "outputs (by a session with track_best_outputs=False) and will be run again",
                       without_output)
    if masked:
        logger.warning("track_best_outputs=True: %d stored validation outputs held credential-shaped text, "
                       "stored masked: those evaluations will be run again (the masked copy is not what the "
                       "program answered)", masked)
    return known, proposals


def _trace_masked(ev: Any) -> bool:
    """Whether a stored row's trace lost text to masking.

    The store masks credential-shaped text (a secret-extraction task's inputs and answers, an error
    quoting a key). The score is what the metric said about the real values and is replayed; but the
    trace is what the metric's feedback call and the reflection read: a masked copy scores a right
    answer wrong and shows the reflection ``***REDACTED***``. The engine runs such an evaluation again
    only if a new reflection is to read it (``EvalOutcome.trace_lost``). What the metric returned is
    stored beside the trace for a ``component_selector`` and is not part of it: masked feedback there
    does not make the evaluation run (and be paid) again."""
    if not ev.trajectory_json:
        return False
    if ev.message and REDACTED in ev.message:
        return True
    if REDACTED not in ev.trajectory_json:
        return False
    data = json.loads(ev.trajectory_json)
    if isinstance(data, dict):
        data.pop("metric_return", None)
    return REDACTED in json.dumps(data, ensure_ascii=False)
