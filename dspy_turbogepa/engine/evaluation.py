"""Evaluations with a cache: each (candidate, split, example) is executed at most once per run.

Why a module of its own: every part of the search (the seed, minibatches, scouts, children, merge
screens, validation rungs) asks for evaluations, and all of them must share one rule set: a cached
or in-flight result is never paid again, a slot of ``max_evals_in_flight`` is taken only for an
execution (oldest mutation first; a call a token or dollar cap then refuses has taken one too), every
execution is counted and reported to the observers and the systemic-failure detector, and an
evaluation that raises (a systemic failure) cancels its siblings instead of leaving them running.
The budget is charged elsewhere, per mutation at commit, from the keys a mutation *requested*:
whether a request hit the cache depends on timing, what it asked for does not.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence

from dspy_turbogepa.engine.budget import MetricBudget
from dspy_turbogepa.engine.candidate import Candidate
from dspy_turbogepa.engine.errors import PaidCallRefused, all_of, cancelling
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.engine.records import RunStats
from dspy_turbogepa.engine.scheduling import PrioritySlots
from dspy_turbogepa.engine.systemic import SystemicFailureDetector
from dspy_turbogepa.engine.types import EvalKey, EvalOutcome, Evaluator, Split

logger = logging.getLogger(__name__)


class EvaluationCache:
    """The engine's only way to run an evaluation."""

    def __init__(
        self,
        evaluator: Evaluator,
        slots: PrioritySlots,
        budget: MetricBudget,
        stats: RunStats,
        observers: Sequence[EngineObserver],
        systemic: SystemicFailureDetector,
        known: Mapping[EvalKey, EvalOutcome] | None = None,
        shared_splits: bool = False,
        perfect_score: float | None = None,
    ) -> None:
        """``known``: outcomes stored by an earlier session of the run (resume), served as cache hits.
        ``shared_splits``: the validation examples are the training examples (dspy.GEPA's
        ``valset=None``), so one execution serves both: every evaluation runs as ``"val"`` and captures
        its trace, which a minibatch needs."""
        self._evaluator = evaluator
        self._slots = slots
        self._budget = budget
        self._stats = stats
        self._observers = observers
        self._systemic = systemic
        self._shared = shared_splits
        self._perfect = perfect_score
        self._warned_above_perfect = False
        self._done: dict[EvalKey, EvalOutcome] = {}
        for key, outcome in (known or {}).items():
            key = self.key(*key)
            held = self._done.get(key)
            if held is None or (held.trajectory is None and outcome.trajectory is not None):
                self._done[key] = outcome
        #: Stored outcomes not used yet: the first use of each counts as a metric call of this run
        #: (paid by an earlier session), and its failure is counted as if it had run now.
        self._unreplayed: set[EvalKey] = set(self._done)
        self._pending: dict[EvalKey, asyncio.Future[EvalOutcome]] = {}
        #: Asked before every execution (not a stored or shared result): a reason to refuse it, or None.
        #: Set by the orchestrator, with a token or dollar cap, once the seed is evaluated (never refused).
        self.paid_gate: Callable[[], str | None] | None = None

    @property
    def done(self) -> Mapping[EvalKey, EvalOutcome]:
        """Every finished outcome (read-only view)."""
        return self._done

    def key(self, fingerprint: str, split: Split, example_id: int) -> EvalKey:
        """The cache key of an evaluation (with shared splits, a training example is a validation one)."""
        return (fingerprint, "val" if self._shared else split, example_id)

    def get(self, key: EvalKey) -> EvalOutcome | None:
        return self._done.get(self.key(*key))

    async def many(
        self, candidate: Candidate, split: Split, ids: Sequence[int], priority: float, requested: set[EvalKey]
    ) -> list[EvalOutcome]:
        """``candidate`` on every example of ``ids`` at once; the keys are added to ``requested``. One that
        raises a systemic failure cancels the others; a cap's refusal lets those on the wire finish
        (see :func:`all_of`)."""
        return await all_of(*(self.one(candidate, split, i, priority, requested) for i in ids))

    async def with_trace(self, candidate: Candidate, split: Split, example_id: int, priority: float) -> EvalOutcome:
        """The outcome of ``candidate`` on an example, run again if its stored trace was lost.

        Why: the run store masks credential-shaped text, so a stored trace may not be what the program
        produced; its score was served, but a reflection must read the real trace. The budget is not
        charged again: the key was requested, and charged, when its score was first served. The stored
        outcome stays served until the new one replaces it (another mutation may read it meanwhile, and
        a cap may refuse the new execution).
        """
        key = self.key(candidate.fingerprint, split, example_id)
        done = self._done.get(key)
        if done is None or not done.trace_lost:
            return await self.one(candidate, split, example_id, priority, set())
        self._unreplayed.discard(key)
        return await self._one(candidate, key, priority, rerun=True)

    async def one(
        self, candidate: Candidate, split: Split, example_id: int, priority: float, requested: set[EvalKey]
    ) -> EvalOutcome:
        """The outcome of ``candidate`` on one example (stored, shared with a request in flight, or
        executed); its key is added to ``requested``, and taken out again if a cap refuses the call:
        a mutation is charged only for the evaluations it got."""
        key = self.key(candidate.fingerprint, split, example_id)
        requested.add(key)
        try:
            return await self._one(candidate, key, priority)
        except PaidCallRefused:
            requested.discard(key)
            raise

    async def _one(self, candidate: Candidate, key: EvalKey, priority: float, rerun: bool = False) -> EvalOutcome:
        _, split, example_id = key
        done = None if rerun else self._done.get(key)
        if done is not None:
            self._stats.cache_hits += 1
            if key in self._unreplayed:
                self._unreplayed.discard(key)
                self._stats.replayed += 1
                if done.failure:
                    self._stats.failures[done.failure] += 1
            return done
        pending = self._pending.get(key)
        if pending is not None:
            self._stats.cache_hits += 1
            return await asyncio.shield(pending)
        fut: asyncio.Future[EvalOutcome] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        launch: int | None = None
        try:
            async with self._slots.slot(priority):
                refusal = self.paid_gate() if self.paid_gate is not None else None
                if refusal is not None:
                    raise PaidCallRefused(refusal)
                self._stats.peak_evals_in_flight = max(self._stats.peak_evals_in_flight, self._slots.in_use)
                self._budget.record_execution()
                self._stats.executed += 1
                launch = self._systemic.launched(split, example_id)
                outcome = await self._own_evaluation(candidate, split, example_id)
        except BaseException as exc:
            if launch is not None:
                self._systemic.abandoned(split, launch)
            self._pending.pop(key, None)
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        self._pending.pop(key, None)
        self._done[key] = outcome
        fut.set_result(outcome)
        try:
            self._count(outcome)
            for obs in self._observers:
                obs.on_evaluation(candidate, split, outcome)
        except BaseException:
            if launch is not None:  # ended: the first-N verdict must not wait for it forever
                self._systemic.abandoned(split, launch)
            raise
        self._systemic.observe(outcome, candidate.fingerprint, split, launch)
        return outcome

    async def _own_evaluation(self, candidate: Candidate, split: Split, example_id: int) -> EvalOutcome:
        """The evaluator's answer. A ``CancelledError`` it raises itself, not the engine's cancel, becomes an
        error: passed on as is, its mutation would look cancelled by the engine and go uncharged, though the
        evaluation ran, and later launches would spend that budget a second time."""
        try:
            # a plain dict: a backend that ships the texts to another process or machine (pickle, JSON)
            # cannot send the candidate's read-only view
            outcome = await self._evaluator.evaluate(
                dict(candidate.texts), candidate.fingerprint, split, example_id,
                capture_traces=split == "train" or self._shared,
            )
        except asyncio.CancelledError as exc:
            if cancelling():
                raise
            raise RuntimeError(
                f"The evaluator raised CancelledError on its own ({split} example {example_id}); an evaluator "
                "must return a failed outcome for its program's or metric's errors, not raise them"
            ) from exc
        # A remote backend that mixes up its results, or a metric's NaN passed on as a score, would be
        # recorded as this example's score and corrupt every comparison after it: refused here, by name.
        if outcome.example_id != example_id:
            raise ValueError(
                f"The evaluator {type(self._evaluator).__name__} returned the outcome of {split} example_id "
                f"{outcome.example_id} when asked for example_id {example_id}: an evaluator must answer for the "
                "example it was asked about"
            )
        if not math.isfinite(outcome.score):
            raise ValueError(
                f"The evaluator {type(self._evaluator).__name__} returned a non-finite score ({outcome.score!r}) "
                f"for {split} example {example_id}: a metric's invalid answer must come back as a failed outcome "
                "(failure='metric_invalid', with failure_score as its score)"
            )
        return outcome

    def _add_usage(self, outcome: EvalOutcome) -> None:
        self._stats.task_prompt_tokens += outcome.prompt_tokens
        self._stats.task_completion_tokens += outcome.completion_tokens
        self._stats.task_cost += outcome.cost

    def _count(self, outcome: EvalOutcome) -> None:
        stats = self._stats
        if self._perfect is not None and outcome.score > self._perfect + 1e-9 and not self._warned_above_perfect:
            # Once per run: which examples count as solved (failure-first sampling, scouts, feedback
            # reuse, skip_perfect_score) is read from perfect_score, whatever skip_perfect_score says.
            self._warned_above_perfect = True
            logger.warning("The metric returned %s, above perfect_score=%s: every score >= perfect_score counts "
                           "as solved, so failures below the metric's maximum are not looked for. Pass the "
                           "metric's maximum as perfect_score.", outcome.score, self._perfect)
        if outcome.failure:
            stats.failures[outcome.failure] += 1
            if stats.failures[outcome.failure] == 1 and not outcome.fatal:
                # Once per kind and run (dspy.GEPA logs every one): the first tells what broke; the
                # counts are in run_stats["failures"] and the final log line, every one at DEBUG. A fatal
                # one stops the run, whose error says it (this line promised counts that never came).
                logger.warning("An evaluation failed (%s): %s. Scored failure_score; further %s failures are "
                               "counted in the final log line and run_stats['failures'].", outcome.failure,
                               outcome.message, outcome.failure)
            else:
                logger.debug("An evaluation failed (%s): %s", outcome.failure, outcome.message)
        self._add_usage(outcome)
        stats.task_lm_calls += outcome.lm_calls
        stats.rate_limit_retries += outcome.rate_limit_retries
