"""The streaming loop: many mutations in flight, no barrier between them, one asyncio loop owning state.

Each mutation is one coroutine walking GEPA's steps (parent minibatch -> reflection -> child
minibatch -> validation rungs). The loop launches mutations while evaluation slots and budget allow,
and commits their results to the candidate pool and Pareto frontier.

Reproducibility: in deterministic mode (the default) results are committed in launch order and
mutation ``k`` is planned from the state after the first ``k - width + 1`` commits (or more when the
width changed: a view never goes back, so it is the later of that and the previous launch's), with its
own RNG stream (see ``history.py`` and docs/engine.md). With a deterministic LM, two runs with the same
seed return the same program, whatever the completion order of LM calls. Fast mode commits in completion
order instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from dspy_turbogepa.engine.budget import MetricBudget, PlanLimits, mutation_worst_case
from dspy_turbogepa.engine.candidate import Candidate, fingerprint_texts
from dspy_turbogepa.engine.config import EngineConfig
from dspy_turbogepa.engine.credit import CreditSnapshot
from dspy_turbogepa.engine.errors import (
    USER_CODE_ERRORS,
    PaidCallRefused,
    RunInterruptedError,
    SystemicFailureError,
    all_of,
    being_cancelled,
    cancelling,
)
from dspy_turbogepa.engine.evaluation import EvaluationCache
from dspy_turbogepa.engine.frontier import ParetoFrontier
from dspy_turbogepa.engine.history import CommitHistory, CommitPoint
from dspy_turbogepa.engine.merge import MergeProposal, find_merge
from dspy_turbogepa.engine.noop import NoopStreak
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.engine.records import (
    CandidateRecord,
    EngineResult,
    MutationPlan,
    MutationResult,
    PriorUsage,
    RunSnapshot,
    RunStats,
    StopReason,
    mean_in_id_order,
)
from dspy_turbogepa.engine.rungs import RungLadder, promotion_decision
from dspy_turbogepa.engine.sampling import LINEAGE_DEPTH, EpochShuffledSampler, FailureFirstSampler, LineageKnowledge
from dspy_turbogepa.engine.scheduling import PrioritySlots
from dspy_turbogepa.engine.selection import ComponentSelector, SelectorState
from dspy_turbogepa.engine.systemic import SystemicFailureDetector
from dspy_turbogepa.engine.types import (
    NOTHING_TO_REFLECT_ON,
    EvalKey,
    EvalOutcome,
    Evaluator,
    ProposalOutcome,
    Reflector,
)
from dspy_turbogepa.engine.width import mutation_width, sibling_count
from dspy_turbogepa.redaction import describe_error

logger = logging.getLogger(__name__)

#: Stops a user asked for: what they get back is the run so far, whatever it holds.
_STOPS_ASKED_FOR = frozenset({"interrupted", "stop_callback", "stop_file"})

#: Evaluations after which a dollar budget with nothing priced yet is reported as unenforceable.
UNPRICED_AFTER = 20


T = TypeVar("T")


def sibling_order(items: Sequence[T], j: int) -> list[T]:
    """The ``j``-th sibling's order of the minibatch: rotated by ``j``, reversed from the ``n``-th on, so
    up to ``2 * n`` siblings each see a distinct order when ``n >= 3`` (two items have only two orders;
    sibling 0 sees the minibatch as drawn)."""
    n = len(items)
    if n < 2 or j == 0:
        return list(items)
    rotated = list(items[j % n:]) + list(items[: j % n])
    return rotated[::-1] if (j // n) % 2 else rotated


def _replayed(result: MutationResult) -> str:
    """The log's note on a mutation whose reflection an earlier session paid for and stored."""
    replayed, made = result.proposals_from_store, result.proposals
    if not replayed:
        return ""
    if replayed >= made:
        return " (reflection replayed from the run store)"
    return f" ({replayed} of its {made} reflections replayed from the run store)"


def proposal_key(parent_fp: str, components: Sequence[str], minibatch: Sequence[int], seed: int) -> str:
    """Identity of a reflection request: same parent, components, minibatch and seed -> same proposal."""
    payload = json.dumps([parent_fp, list(components), list(minibatch), seed], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class _PooledBefore:
    """The fingerprints of the pool's first ``n`` candidates, as a container (the view a plan sees)."""

    __slots__ = ("_index_by_fp", "_n")

    def __init__(self, index_by_fp: Mapping[str, int], n: int) -> None:
        self._index_by_fp, self._n = index_by_fp, n

    def __contains__(self, fingerprint: object) -> bool:
        index = self._index_by_fp.get(fingerprint) if isinstance(fingerprint, str) else None
        return index is not None and index < self._n


def _served_sums(parent_outs: Sequence[EvalOutcome], child_outs: Sequence[EvalOutcome]) -> tuple[float, float]:
    """The parent's and a child's minibatch sums over the examples the LM service answered for both. A
    service failure says nothing of either program, and stays in the cache for the run: a parent's
    failure during a burst of 503s made every later child tried on that example look better."""
    kept = [(p.score, c.score) for p, c in zip(parent_outs, child_outs, strict=True)
            if not (p.service_failure or c.service_failure)]
    return sum(p for p, _ in kept), sum(c for _, c in kept)


class Orchestrator:
    def __init__(
        self,
        config: EngineConfig,
        evaluator: Evaluator,
        reflector: Reflector,
        seed_candidate: Candidate,
        train_ids: Sequence[int],
        val_ids: Sequence[int],
        observers: Sequence[EngineObserver] = (),
        clock: Callable[[], float] = time.monotonic,
        known_evaluations: Mapping[EvalKey, EvalOutcome] | None = None,
        known_proposals: Mapping[str, ProposalOutcome] | None = None,
        shared_splits: bool = False,
        expected_failures: Mapping[str, Collection[int]] | None = None,
        prior_usage: PriorUsage | None = None,
        replay_through: int = -1,
        earlier_budgets: Sequence[int] = (),
    ) -> None:
        """``known_evaluations`` / ``known_proposals`` come from a run store when a run is resumed: they
        are served as cache hits (charged to the budget as the first run was, never executed again).
        ``shared_splits``: ``val_ids`` name the same examples as ``train_ids`` (no separate valset), so
        an evaluation on either serves both (see :class:`EvaluationCache`). ``expected_failures``: examples
        known to fail before the run starts, left out of the systemic-failure check (see
        :class:`SystemicFailureDetector`). ``prior_usage``: what earlier sessions of the run paid for; the
        run's tokens and cost start from it (a token or dollar cap counts it: :meth:`_paid_call_refusal`).
        ``replay_through``: the last mutation an earlier session committed; after a cap refusal, mutations
        up to it are still launched (see :meth:`_secondary_budget_exhausted`). ``earlier_budgets``: the
        budgets the last earlier session that planned anything planned with, in order; a deterministic
        run plans with each in turn before its own (see :class:`PlanLimits`)."""
        self.config = config
        self._evaluator = evaluator
        self._reflector = reflector
        self._seed = seed_candidate
        self._train_ids = tuple(train_ids)
        self._val_ids = tuple(val_ids)
        self._observers = list(observers)
        self._clock = clock

        # GEPA-compatible budgets let the last mutation finish: at most one mutation's worst case.
        overshoot = 0 if config.strict_budget else mutation_worst_case(config.reflection_minibatch_size,
                                                                       len(self._val_ids))
        self._budget = MetricBudget(config.max_metric_calls, overshoot)
        self._plan_limits = PlanLimits(earlier_budgets if config.deterministic else (), config.max_metric_calls)
        self._frontier = ParetoFrontier(self._val_ids)
        self._ladder = RungLadder.build(self._val_ids, config.rung_fractions, config.seed)
        self._sampler = EpochShuffledSampler(self._train_ids, config.reflection_minibatch_size, config.seed)
        self._failure_first = (
            FailureFirstSampler(self._train_ids, config.reflection_minibatch_size, config.seed)
            if config.minibatch_sampling == "failure_first" else None
        )
        self._knowledge = LineageKnowledge(config.perfect_score)
        #: Whether reflections can have scouts at all (a wave of num_threads has room beside the minibatch).
        self._scouting = (self._failure_first is not None and config.reflection_scouts > 0
                          and config.max_evals_in_flight > config.reflection_minibatch_size)
        self._selector = ComponentSelector(list(seed_candidate.texts), config.component_selector)
        self._eval_slots = PrioritySlots(config.max_evals_in_flight, clock)
        self._reflection_slots = asyncio.Semaphore(config.max_reflections_in_flight)
        self._systemic = SystemicFailureDetector(
            config.systemic_failure_window, config.systemic_proposal_window,
            split_sizes={"val": len(set(self._val_ids))} if shared_splits else
            {"train": len(set(self._train_ids)), "val": len(set(self._val_ids))},
            expected_failures=expected_failures,
            # two waves of evaluations: a short outage fails every evaluation in flight at once
            outage_window=max(config.systemic_failure_window, 2 * config.max_evals_in_flight), clock=clock,
        )
        #: deterministic mode: the trainset's first-N rule reads each mutation's evaluations at its commit
        #: (see _judge_in_commit_order); the keys it has read
        self._train_in_order = config.deterministic and not shared_splits
        if self._train_in_order:
            self._systemic.judge_in_order("train")
        self._judged: set[EvalKey] = set()
        self._systemic.resume({"val" if shared_splits else key[1]
                               for key, o in (known_evaluations or {}).items() if o.failure is None},
                              any(p.skipped is None for p in (known_proposals or {}).values()))
        self.stats = RunStats()
        for usage in dataclasses.fields(PriorUsage):  # the run's usage starts from the earlier sessions'
            setattr(self.stats, usage.name, getattr(prior_usage or PriorUsage(), usage.name))
        self._evaluations = EvaluationCache(evaluator, self._eval_slots, self._budget, self.stats, self._observers,
                                            self._systemic, known_evaluations, shared_splits,
                                            perfect_score=config.perfect_score)

        self._records: list[CandidateRecord] = []
        self._index_by_fp: dict[str, int] = {}
        #: the cap that refused a paid LM call (then nothing more is launched past _replay_through)
        self._refused: StopReason | None = None
        self._replay_through = replay_through
        self._known_proposals: dict[str, ProposalOutcome] = dict(known_proposals or {})
        #: stored proposals not replayed yet in this session (each is counted as replayed once)
        self._unreplayed_proposals: set[str] = set(self._known_proposals)
        self._tasks: dict[int, asyncio.Task[MutationResult]] = {}
        self._mutations_running = 0
        self._seed_task: asyncio.Future[None] | None = None
        self._cancelled_in_flight = False
        self._plans: dict[int, MutationPlan] = {}
        self._merges_launched = 0
        self._merges_granted = 0
        self._merges_failed = 0
        self._merge_tried: set[tuple[int, int, int]] = set()
        #: the child fingerprint of every merge launched, whatever became of it
        self._merges_planned: set[str] = set()
        self._merge_budget_short = False
        self._history = CommitHistory(self._val_ids)
        self._turn_waiters: dict[int, asyncio.Future[None]] = {}
        # Speculative chaining: per mutation, its rung-0 survivor (or None) and its commit; what each
        # mutation planned (kind, parent index), kept after commit; the chain decision per seq.
        self._rung0_futs: dict[int, asyncio.Future[tuple[Candidate, int] | None]] = {}
        #: Deterministic runs with a callable component selector: per mutation in flight, resolved once it
        #: has called the selector (or ended without); selectors are called in launch order (see _select).
        self._selector_turns: dict[int, asyncio.Future[None]] = {}
        #: reflections' outcomes held for the systemic check until their mutation commits (deterministic)
        self._deferred_proposals: dict[int, list[tuple[ProposalOutcome, bool]]] = {}
        #: Reflections that answered with the current texts, the components they echoed, and every
        #: component a reflection has been asked about (see _propose).
        self._echoes = 0
        self._echoed: set[str] = set()
        self._offered: set[str] = set()
        #: Components that had nothing to reflect on (never ran on what was read) / that had something:
        #: one only ever in the first cannot echo, so the echo rule does not wait for it.
        self._unread: set[str] = set()
        self._read: set[str] = set()
        self._commit_futs: dict[int, asyncio.Future[None]] = {}
        self._planned: dict[int, tuple[str, int, int | None]] = {}
        #: Per committed mutation: the pool index of its rung-0 survivor, -1 if the survivor did not
        #: join the pool, None if nothing survived rung 0 (what a mutation chained on it started from).
        self._survivor_index: dict[int, int | None] = {}
        self._chain_decisions: dict[int, int | None] = {}
        self._view_floor = 0
        self._accepted = 0
        self._attempted = 0
        self._credit = CreditSnapshot()
        self._noop = NoopStreak()
        self._warned_unpriced = False
        #: Deterministic mode: the commit at which the no-op stop was decided (see _main_loop).
        self._drain_view: int | None = None
        self._next_seq = 0
        self._committed = 0
        self._stop_reason: StopReason | None = None
        self._external_stop: StopReason | None = None
        self._warned_empty_selection = False
        self._selector_chose = False  # a callable selector returned a component at least once
        self._empty_selections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._start = 0.0

    # ------------------------------------------------------------------ public control
    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` (or a stop from outside the run) was called."""
        return self._external_stop is not None

    def request_stop(self, reason: StopReason = "interrupted") -> None:
        """Stop launching new work. Safe to call from any thread (e.g. a KeyboardInterrupt handler)."""
        self._external_stop = reason
        if self._wake is not None:
            self._call_on_loop(self._wake.set)

    def _tell_reflector_stopping(self) -> None:
        """A reflector may wait (a rate-limit backoff of up to minutes, on a worker thread the event loop
        cannot cancel): once nothing new will launch, tell it to stop waiting. Optional for reflectors."""
        stop = getattr(self._reflector, "stop", None)
        if callable(stop):
            stop()

    def cancel_in_flight(self) -> None:
        """Cancel every running mutation (used after the grace period of an interrupt); nothing new starts.

        Why stop too: a cancelled mutation is not charged (it committed nothing), and evaluations it had
        started ran anyway; launching more work would spend that budget a second time.
        """

        # Flags first, from this thread: before the loop exists ``_call_on_loop`` is a no-op, and run()
        # checks the flag once its seed task exists (a Ctrl-C early in compile was otherwise lost and
        # the user waited for the whole seed validation).
        self._cancelled_in_flight = True
        if self._external_stop is None:
            self._external_stop = "interrupted"

        def _cancel() -> None:
            if self._seed_task is not None:
                self._seed_task.cancel()  # a slow seed validation must not outlast the grace period
            for task in self._tasks.values():
                task.cancel()

        self._call_on_loop(_cancel)

    def _call_on_loop(self, fn: Callable[[], None]) -> None:
        """Schedule ``fn`` on the engine's loop from another thread; a no-op once the loop is closed.

        A Ctrl-C can land after the run has returned but before the caller has noticed: the loop is
        then closed, and raising there would lose the finished result.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # closed between the check and the call: the run is over, nothing to do
            logger.debug("The engine loop closed before a control call could be scheduled")

    @property
    def records(self) -> list[CandidateRecord]:
        return self._records

    @property
    def budget(self) -> MetricBudget:
        return self._budget

    @property
    def in_flight(self) -> int:
        return self._eval_slots.in_use

    def mutations_in_flight(self) -> int:
        """Readable from any thread (the progress display): a counter, not a walk over the task dict."""
        return self._mutations_running

    def _mutation_done(self, _task: asyncio.Task[MutationResult]) -> None:
        self._mutations_running -= 1

    # ------------------------------------------------------------------ run
    async def run(self) -> EngineResult:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._start = self._clock()
        try:
            self._seed_task = asyncio.ensure_future(self._evaluate_seed())
            if self._cancelled_in_flight:  # cancel_in_flight() came before the loop existed
                self._seed_task.cancel()
            try:
                await self._seed_task
            except asyncio.CancelledError:
                if self._cancelled_in_flight and self._seed_task.cancelled():
                    raise RunInterruptedError(
                        "Stopped before the seed program's validation finished: there is no evaluated "
                        "program to return."
                    ) from None
                raise
            self._run_stop_callbacks()
            await self._main_loop()
            if self._stop_reason not in _STOPS_ASKED_FOR:
                self._systemic.check_final()  # the run ended on its own: never return an all-failed seed
        finally:
            for task in self._tasks.values():
                if not being_cancelled(task):  # a second cancel would cut short its wait for its evaluations
                    task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        return self._result()

    async def _evaluate_seed(self) -> None:
        n = len(self._val_ids)
        if n > self._budget.limit or not self._budget.try_reserve(n):
            raise ValueError(
                f"max_metric_calls={self._budget.limit} cannot pay for the seed's full-validation evaluation "
                f"({n} metric calls). Raise the budget or pass a smaller valset."
            )
        requested: set[EvalKey] = set()
        outcomes = await self._evaluations.many(self._seed, "val", self._val_ids, priority=-1.0, requested=requested)
        self._budget.commit(requested)
        self._budget.release(n)
        if self.config.max_tokens is not None or self.config.max_cost is not None:
            self._evaluations.paid_gate = self._paid_call_refusal  # not on the hot path without a cap
        record = self._add_record(self._seed, [None], outcomes, seq=None)
        self._history.record(CommitPoint(len(self._records), self._budget.committed, 0, 0, 0))
        for obs in self._observers:
            obs.on_candidate(record)
        logger.info("Seed program: validation score %.4f over %d examples", record.aggregate, n)

    # ------------------------------------------------------------------ the loop
    def _should_stop(self) -> StopReason | None:
        if self._stop_reason is not None:
            return self._stop_reason
        exhausted = self._secondary_budget_exhausted()
        if self._external_stop is not None:
            self._stop_reason = self._external_stop
        elif exhausted is not None:
            logger.info("Stopping: the %s is used up", exhausted.replace("_", " "))
            self._stop_reason = exhausted
        elif self.config.stop_file is not None and Path(self.config.stop_file).exists():
            logger.info("Stop file %s found: stopping gracefully", self.config.stop_file)
            self._stop_reason = "stop_file"
        return self._stop_reason

    def _run_stop_callbacks(self) -> None:
        """Ask gepa's stop callbacks, once per iteration as gepa does: once before the first mutation
        (gepa checks before its first iteration) and after each committed mutation, whatever its outcome.

        Not on every scheduler pass: stateful stoppers count calls (NoImprovementStopper counts calls
        without improvement) and would trip after a few passes. The view is the committed state, and a
        deterministic run commits in launch order, so the callbacks see the same states every time.
        """
        if not self.config.stop_callbacks or self._external_stop is not None:
            return
        if self._cap_stopping():
            return  # its refused mutations are no iterations
        # gepa stops calling them once the run is stopping; but the drain after a no-progress stop still
        # commits children (gepa would have gone on iterating, asking them), and a callback's "stop at N
        # candidates" must hold there too
        if self._stop_reason is not None and not (self._stop_reason == "no_progress_possible" and self._draining()):
            return
        view = self.selector_state()
        first_ask = self._committed == 0  # asked once before the first mutation, then after each commit
        for i, cb in enumerate(self.config.stop_callbacks):
            try:
                stop = bool(cb(view))
            except USER_CODE_ERRORS as exc:
                where = f"gepa_kwargs['stop_callbacks'][{i}] ({getattr(cb, '__qualname__', type(cb).__qualname__)})"
                if first_ask:  # broken from the start: an error now, not a run that ignores the user's rule
                    raise SystemicFailureError(
                        f"Stopping: {where} raised when first asked, before any mutation: {describe_error(exc)}. "
                        "Fix the callback and run again.",
                        failure="stop_callback_error", error_type=type(exc).__name__,
                    ) from exc
                # The rule can no longer be checked: stop as if it had asked to (never spend past a limit the
                # user set), keeping what the run found; dspy.GEPA would have crashed and lost it.
                logger.warning("%s raised: %s. Stopping the run as if it had asked to; the best program found so "
                               "far is returned.", where, describe_error(exc))
                stop = True
            if stop:
                logger.info("Stop callback %r asked to stop", cb)
                self._stop_reason = "stop_callback"
                # no more of the drain: as after any stop callback, what had launched finishes (its
                # children are not added) and nothing more starts
                self._drain_view = None
                return

    def _draining(self) -> bool:
        """After a deterministic no-progress stop, mutations planned from views up to the stopping commit
        still launch (see _commit), unless something else asked to stop since."""
        return (
            self._drain_view is not None and self._external_stop is None and not self._cancelled_in_flight
            and self._secondary_budget_exhausted() is None
            and not (self.config.stop_file is not None and Path(self.config.stop_file).exists())
        )

    def _secondary_budget_exhausted(self) -> StopReason | None:
        """Wall-clock budget: checked before every launch (work in flight finishes). Token and dollar caps:
        once one has refused a paid LM call (see _paid_call_refusal), nothing more is launched, except,
        on a resumed run, the mutations an earlier session got to: its stored work replays at once, so a
        refusal can come before a mutation that session launched (while the refused one was on the wire)
        has launched here, and that mutation's stored work, free to replay, is what it found."""
        cfg, st = self.config, self.stats
        if cfg.max_seconds is not None and self._elapsed() >= cfg.max_seconds:
            return "time_budget"
        if self._cap_stopping():
            return self._refused
        if cfg.max_cost is not None:
            tokens, cost = st.tokens, st.task_cost + st.reflection_cost
            if cost == 0.0 and tokens > 0 and st.executed >= UNPRICED_AFTER and not self._warned_unpriced:
                self._warned_unpriced = True
                logger.warning(
                    "cost_budget_usd=%s is set but %d evaluations that used %d tokens cost $0: no price is known "
                    "for these LMs (litellm's table does not list them). The dollar cap cannot apply; pass "
                    "price_table={model: (usd per 1M prompt tokens, usd per 1M completion tokens)}, or a token budget.",
                    cfg.max_cost, st.executed, tokens)
        return None

    def _cap_stopping(self) -> bool:
        """A token or dollar cap refused a paid call, and no mutation an earlier session committed is left
        to replay: the cap stops the run."""
        return self._refused is not None and self._next_seq > self._replay_through

    def _paid_call_refusal(self) -> StopReason | None:
        """Asked before every LM call this session would pay for (an evaluation or a reflection that is not
        stored): the cap it would go past, counting every session's usage, or None.

        Why not at launch only: a cap checked before each launch lets the mutations in flight pay past
        it, and a resumed run (its stored work replays at once) would either stop short of what the first
        session found or pay again past the cap. Checked per paid call, stored work replays for free
        and nothing new is paid once the run's total reaches the cap; the overshoot is what was
        already on the wire.
        """
        cfg, st = self.config, self.stats  # every session's usage (the prior sessions' from the store)
        if self._refused is not None:
            return self._refused
        if cfg.max_tokens is not None and st.tokens >= cfg.max_tokens:
            self._refused = "token_budget"
        elif cfg.max_cost is not None and st.task_cost + st.reflection_cost >= cfg.max_cost:
            self._refused = "cost_budget"
        if self._refused is not None and self._wake is not None:
            self._wake.set()  # the loop stops launching now, not after the next commit
        return self._refused

    def _running(self) -> list[asyncio.Task[MutationResult]]:
        return [t for t in self._tasks.values() if not t.done()]

    def width(self) -> int:
        """How many mutations may run at once now (see ``width.mutation_width``), from the commit history
        at the last planning view, so it is reproducible."""
        cfg = self.config
        n = min(self._view_floor, self._committed) if cfg.deterministic else self._committed
        now = self._history.at(n)
        # Recent attempts: look back over the last `width_window` commits that evaluated a child.
        past = self._history.at(self._history.attempt_lookback(n, cfg.width_window))
        return mutation_width(cfg, now.accepted - past.accepted, now.attempted - past.attempted,
                              self._plan_limits.current - now.charged, len(self._val_ids))

    def siblings(self, n_commits: int) -> int:
        """How many reflections to draw at once on one parent and minibatch (see ``width.sibling_count``),
        read from the planning view: reproducible."""
        cfg = self.config
        now = self._history.at(n_commits)
        past = self._history.at(max(0, n_commits - cfg.width_window))
        return sibling_count(cfg, now.children_passed - past.children_passed, now.children_tried - past.children_tried,
                             self._plan_limits.current - now.charged, len(self._val_ids))

    def _view_commits(self, seq: int, width: int) -> int | None:
        """How many commits mutation ``seq`` is planned from, or None if it has to wait for more."""
        if not self.config.deterministic:
            return self._committed
        staleness = self.config.staleness_limit if not self.config.adaptive_width else width
        needed = max(0, seq - (staleness or 1) + 1, self._view_floor)
        return needed if self._committed >= needed else None

    def _next_view(self, seq: int, running: int, width: int) -> tuple[int | None, int | None]:
        """The view mutation ``seq`` is planned from, and the mutation it chains on (or None).

        Speculative chaining: when the width is 1 (the search is sequential, because most mutations
        succeed or the budget is small), mutation ``seq - 1`` is still running and ``seq`` would pick
        the same parent, ``seq`` is planned one commit earlier and chains on ``seq - 1``: it starts
        from ``seq - 1``'s child as soon as that child survives rung 0, while the child is still being
        validated (see _mutate), so the next reflection overlaps the validation instead of waiting
        for it. It takes one slot beyond the width. Whether a mutation chains is decided from the
        state at that earlier view only, so it is reproducible; otherwise the mutation is planned as
        usual, from the usual view, within the width.
        """
        chain_view = self._chain_view(seq, width)
        if chain_view is not None:
            if self._committed < chain_view:
                return None, None
            if seq not in self._chain_decisions:
                self._chain_decisions[seq] = self._chain_target(seq, chain_view)
            if self._chain_decisions[seq] is not None:
                return (chain_view, seq - 1) if running <= width else (None, None)
        if running >= width:
            return None, None
        return self._view_commits(seq, width), None

    def _chain_view(self, seq: int, width: int) -> int | None:
        cfg = self.config
        if (not cfg.speculative_chaining or not cfg.adaptive_width or callable(cfg.component_selector) or seq == 0
                or width != 1):
            return None
        if not cfg.deterministic:
            prev = self._tasks.get(seq - 1)
            return self._committed if prev is not None and not prev.done() else None
        view = max(0, seq - 1, self._view_floor)
        return view if view <= seq - 1 else None

    def _chain_target(self, seq: int, view: int) -> int | None:
        """``seq - 1`` if it is a reflection that ``seq`` would repeat from the same parent, else None.

        "The same parent" is the parent ``seq - 1`` really starts from: if it chains itself, the child
        it chained on (known by now: that mutation is committed in the view) or its planned parent.
        """
        prev = self._planned.get(seq - 1)
        if prev is None or prev[0] == "merge":
            return None
        _kind, parent, prev_chain = prev
        if prev_chain is not None:
            if prev_chain not in self._survivor_index:
                return None  # fast mode: not settled yet
            survivor = self._survivor_index[prev_chain]
            if survivor is not None:
                if survivor < 0:
                    return None  # seq - 1 will be orphaned: do not build on it
                parent = survivor
        # Replay _plan's draws on a copy of the state: a merge it would plan instead, then the parent.
        frontier = self._history.frontier_at(view, self._records) if self.config.deterministic else self._frontier
        rng = self._plan_rng(seq)
        if self._merge_wanted(view) and self._find_merge(view, frontier, rng, set(self._merge_tried)) is not None:
            return None
        parent_index = frontier.select_parent(rng, self.config.candidate_selection)
        return seq - 1 if parent_index == parent else None

    def _lineage(self, index: int) -> list[str]:
        """Fingerprints of candidate ``index`` and its first-parent ancestors, nearest first."""
        out: list[str] = []
        current: int | None = index
        while current is not None and current >= 0 and len(out) < LINEAGE_DEPTH:
            record = self._records[current]
            out.append(record.candidate.fingerprint)
            current = next((p for p in record.parent_indices if p is not None), None)
        return out

    def _plan_rng(self, seq: int) -> random.Random:
        return random.Random(f"mutation:{self.config.seed}:{seq}")

    async def _main_loop(self) -> None:
        """Launch while slots and budget allow; commit what finished; wait; repeat."""
        assert self._wake is not None
        while True:
            await self._commit_finished()
            budget_blocked = False
            blocked_view = 0
            saturated = self._eval_slots.waiting >= self._eval_slots.capacity
            running = len(self._running())
            width = self.width()  # once per pass: it only changes when a launch moves the view
            stop = self._should_stop()
            if stop is not None and not self._draining():
                self._tell_reflector_stopping()
            if (stop is None or self._draining()) and running <= width and not saturated:
                view, chain_on = self._next_view(self._next_seq, running, width)
                if view is not None and stop is not None and view >= self._drain_view:  # type: ignore[operator]
                    view = None
                if view is not None:
                    plan = self._plan(self._next_seq, view, chain_on)
                    if plan is not None:
                        self._view_floor = view
                        self._launch(plan)
                        continue
                    budget_blocked, blocked_view = True, view
                    if self.config.deterministic:
                        # Retry from one commit later: the first view at which the budget fits is
                        # reproducible, however many commits have happened meanwhile.
                        self._view_floor = view + 1
                        if self._committed >= self._view_floor:
                            continue
            if not self._tasks:
                if budget_blocked and self._should_stop() is None:
                    ended_under = self._plan_limits.current
                    if self._plan_limits.advance():
                        logger.info("The search has reached where an earlier session's budget (%d metric calls) "
                                    "ended it; it goes on planning with %d", ended_under, self._plan_limits.current)
                        self._view_floor = blocked_view  # the refused plan, asked again under the next limit
                        continue
                if budget_blocked or self._should_stop() is not None:
                    return
                # nothing in flight and nothing could be launched: only possible if planning is impossible
                self._stop_reason = "no_progress_possible"
                return
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            # a time budget or a stop file is noticed within a second even when every mutation is waiting
            # (a reflection in a rate-limit backoff finishes nothing that would wake the loop)
            poll = 1.0 if self.config.max_seconds is not None or self.config.stop_file is not None else None
            await asyncio.wait([*self._running(), waiter], timeout=poll, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def _commit_finished(self) -> None:
        """Commit finished mutations: in launch order (deterministic mode) or as they finish."""
        if self.config.deterministic:
            # A mutation that raised (a systemic failure) ends the run at once, whatever its position.
            for task in self._tasks.values():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            while self._committed in self._tasks and self._tasks[self._committed].done():
                self._commit(await self._await_task(self._committed))
        else:
            for seq in sorted(s for s, t in self._tasks.items() if t.done()):
                self._commit(await self._await_task(seq))

    async def _await_task(self, seq: int) -> MutationResult:
        task = self._tasks.pop(seq)
        try:
            return await task
        except asyncio.CancelledError:
            if task.cancelled():
                return self._cancelled_result(seq)
            raise

    def _cancelled_result(self, seq: int) -> MutationResult:
        plan = self._plans[seq]
        return MutationResult(plan=plan, status="cancelled", requested=set())

    async def _my_turn(self, seq: int) -> None:
        """Deterministic mode: wait until every earlier mutation is committed, so decisions that read the
        live frontier see exactly the commits before this one."""
        if not self.config.deterministic or self._committed >= seq:
            return
        fut = self._turn_waiters.get(seq)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._turn_waiters[seq] = fut
        await fut

    # ------------------------------------------------------------------ planning
    def _plan(self, seq: int, n_commits: int, chain_on: int | None = None) -> MutationPlan | None:
        """Decide mutation ``seq`` from the state after ``n_commits`` commits, or None if the budget is short."""
        rng = self._plan_rng(seq)
        point = self._history.at(n_commits)
        frontier = self._history.frontier_at(n_commits, self._records) if self.config.deterministic else self._frontier
        if self._merge_wanted(n_commits):
            merge_plan = self._plan_merge(seq, rng, n_commits, frontier)
            if merge_plan is not None or self._merge_budget_short:
                return merge_plan
        parent_index = frontier.select_parent(rng, self.config.candidate_selection)
        parent = self._records[parent_index]
        draw = ranker = None
        if self._failure_first is not None:
            ranker = self._knowledge.ranker(self._lineage(parent_index), n_commits)
            draw = self._failure_first.draw(ranker)
            if not self._scouting:  # then the minibatch itself must explore (see FailureFirstSampler.explore)
                draw = self._failure_first.explore(draw, ranker)
            minibatch = draw
        else:
            minibatch = self._sampler.batch(seq)
        feedback_ids = self._reusable_failures(parent.candidate.fingerprint, n_commits, minibatch)
        scouts = self._scouts(parent.candidate.fingerprint, n_commits, ranker, minibatch)
        # The parent's minibatch is reserved whole: whether its pairs are already charged depends on
        # commits after the planning view (timing), and a reservation must not.
        siblings = self.siblings(n_commits)
        worst_case = mutation_worst_case(len(minibatch), len(self._val_ids), children=siblings)
        # Scouts only where the budget has room for them: they never make a mutation straddle the limit.
        limit = min(self._plan_limits.current, self._budget.limit)
        scouts = scouts[: max(0, limit - self._budget_used(n_commits) - worst_case)]
        worst_case += len(scouts)
        if not self._reserve(seq, n_commits, worst_case):
            return None
        if draw is not None:
            assert self._failure_first is not None
            self._failure_first.consume(draw)
        plan = MutationPlan(
            seq=seq,
            kind="reflection",
            parent=parent.candidate,
            parent_index=parent_index,
            parent_val=parent.val_scores,
            minibatch=minibatch,
            rng=rng,
            committed_at_launch=point.records,
            view=n_commits,
            reservation=worst_case,
            chain_on=chain_on,
            siblings=siblings,
            feedback_ids=feedback_ids,
            scout_ids=scouts,
        )
        if not callable(self.config.component_selector):
            # The user left the selector at its default: let operator credit pick one or all.
            every = (self.config.adaptive_components and len(self._selector.components) > 1
                     and self._history.at(n_commits).credit.choose_reflection_kind(rng) == "reflection_all")
            if self._turns_deferred():
                # A mutation skipped because its minibatch is perfect must not use up a predictor's turn:
                # the turn is taken after that check (_take_turn), in launch order (reproducible).
                plan.turn_deferred = True
                if every:
                    plan.kind = "reflection_all"
                return plan
            plan.components, plan.child_counter = self._selector.select(
                parent.candidate.fingerprint, parent.candidate.texts, parent_index, (), (), None
            )
            if every:
                plan.components = list(self._selector.components)
            if len(plan.components) > 1:
                plan.kind = "reflection_all"
        return plan

    def _budget_used(self, n_commits: int) -> int:
        """Metric calls charged or reserved, as the launch decision of a plan from ``n_commits`` sees them."""
        if self.config.deterministic:
            return self._history.at(n_commits).charged + self._history.reserved_since(n_commits)
        return self._budget.committed + self._budget.reserved

    def _reserve(self, seq: int, n_commits: int, amount: int) -> bool:
        """Reserve budget; in deterministic mode the decision uses only timing-independent counts.

        The bound (charges after ``n_commits`` commits + every reservation since) is never below the
        real usage, so when it fits the real reservation fits too.
        """
        if self.config.deterministic:
            bound = self._budget_used(n_commits)
            if not self._budget.fits(bound, amount, self._plan_limits.current):
                logger.debug("Mutation %d not launched: needs up to %d metric calls", seq, amount)
                return False
            if not self._budget.try_reserve(amount):  # pragma: no cover - guarded by the bound above
                raise RuntimeError("deterministic budget bound was below the real usage")
            return True
        if not self._budget.try_reserve(amount):
            logger.debug("Mutation %d not launched: needs up to %d metric calls, %d left", seq, amount,
                         self._budget.remaining())
            return False
        return True

    def _merge_wanted(self, n_commits: int) -> bool:
        cfg = self.config
        if not cfg.use_merge:
            return False
        point = self._history.at(n_commits)
        possibly_accepted = self._merges_launched - point.merges_failed
        return self._merges_launched < point.merges_granted and possibly_accepted < cfg.max_merge_invocations

    def _find_merge(
        self, n_commits: int, frontier: ParetoFrontier, rng: random.Random, tried: set[tuple[int, int, int]]
    ) -> MergeProposal | None:
        n_records = self._history.at(n_commits).records
        # Searched at every plan while merges are wanted (and again to decide chaining), so nothing here
        # walks the pool: the members are cached per frontier change, the pool is asked, not copied.
        existing = _PooledBefore(self._index_by_fp, n_records)
        return find_merge(self._records[:n_records], frontier.non_dominated_members(), existing, tried, rng,
                          self.config.merge_subsample_size, fingerprint_texts, self._merges_planned)

    def _plan_merge(
        self, seq: int, rng: random.Random, n_commits: int, frontier: ParetoFrontier
    ) -> MutationPlan | None:
        self._merge_budget_short = False
        n_records = self._history.at(n_commits).records
        records = self._records[:n_records]
        proposal = self._find_merge(n_commits, frontier, rng, self._merge_tried)
        if proposal is None:
            return None
        worst_case = len(self._val_ids)  # screening ids are validation ids; only the child is evaluated
        if not self._reserve(seq, n_commits, worst_case):
            self._merge_budget_short = True
            # not tried yet: found again once budget frees up (find_merge marked it when it proposed it)
            self._merge_tried.discard((proposal.first, proposal.second, proposal.ancestor))
            return None
        self._merges_planned.add(proposal.fingerprint)
        first, second = records[proposal.first], records[proposal.second]
        better, other = (first, second) if first.aggregate >= second.aggregate else (second, first)
        self._merges_launched += 1
        plan = MutationPlan(
            seq=seq,
            kind="merge",
            parent=better.candidate,
            parent_index=better.index,
            parent_val=better.val_scores,
            minibatch=(),
            rng=rng,
            committed_at_launch=n_records,
            view=n_commits,
            reservation=worst_case,
            other_parent_index=other.index,
            other_parent_val=other.val_scores,
            child_texts=proposal.texts,
            screen_ids=proposal.screen_ids,
        )
        if self._turns_deferred() or callable(self.config.component_selector):
            # the parents' counters are read after the turns launched before it (a callable selector
            # advances them too, after its parent's minibatch: read now, they would depend on timing)
            plan.turn_deferred = True
        else:
            plan.child_counter = max(self._selector.counter(first.candidate.fingerprint),
                                     self._selector.counter(second.candidate.fingerprint))
        logger.debug("Mutation %d: merge of %d and %d via ancestor %d", seq, proposal.first, proposal.second,
                     proposal.ancestor)
        return plan

    def _launch(self, plan: MutationPlan) -> None:
        self._plans[plan.seq] = plan
        loop = asyncio.get_running_loop()
        self._rung0_futs[plan.seq] = loop.create_future()
        self._commit_futs[plan.seq] = loop.create_future()
        if self.config.deterministic and (callable(self.config.component_selector) or plan.turn_deferred):
            self._selector_turns[plan.seq] = loop.create_future()
        self._planned[plan.seq] = (plan.kind, plan.parent_index, plan.chain_on)
        self._planned.pop(plan.seq - 2, None)
        self._chain_decisions.pop(plan.seq, None)
        if plan.chain_on is not None:
            self.stats.chaining["planned"] += 1
        self._history.note_reservation(plan.seq, plan.reservation)
        task = asyncio.create_task(self._run_mutation(plan), name=f"mutation-{plan.seq}")
        self._tasks[plan.seq] = task
        self._mutations_running += 1
        task.add_done_callback(self._mutation_done)
        self._next_seq += 1
        self.stats.peak_mutations_in_flight = max(self.stats.peak_mutations_in_flight, len(self._running()))

    # ------------------------------------------------------------------ one mutation
    async def _run_mutation(self, plan: MutationPlan) -> MutationResult:
        result = MutationResult(plan=plan, status="no_proposal")
        try:
            await self._mutate(plan, result)
        except PaidCallRefused as exc:
            logger.debug("Mutation %d: stopped, %s", plan.seq, exc)
            result.status, result.detail = "budget_stopped", str(exc)
            result.child = None
        finally:
            self._resolve_rung0(plan.seq, None)
            self._pass_selector_turn(plan.seq)
            if self._wake is not None:
                self._wake.set()
        return result

    def _pass_selector_turn(self, seq: int) -> None:
        fut = self._selector_turns.pop(seq, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _select(self, plan: MutationPlan, parent: Candidate, parent_outs: list[EvalOutcome],
                      parent_scores: list[float]) -> bool:
        """Ask a callable component selector, after the parent's traced minibatch. gepa's round-robin
        selector reads and advances the parent's counter: in a deterministic run the mutations ask in
        launch order (whichever parent minibatch returns first must not take the next component)."""
        earlier = [f for s, f in self._selector_turns.items() if s < plan.seq and not f.done()]
        if earlier:
            await asyncio.gather(*(asyncio.shield(f) for f in earlier))
        try:
            plan.components, plan.child_counter = self._selector.select(
                parent.fingerprint, parent.texts, plan.parent_index,
                [o.trajectory for o in parent_outs], parent_scores,
                self.selector_state(plan.view if self.config.deterministic else None, in_iteration=True),
            )
        except USER_CODE_ERRORS as exc:  # the user's selector (or its answer) failed: skip this mutation
            message = describe_error(exc)
            logger.warning("Mutation %d: the component selector failed: %s", plan.seq, message)
            self.stats.proposal_skips["selector_error"] += 1
            # a selector that always fails stops the run like a proposer that always fails
            self._observe_proposal(plan.seq, ProposalOutcome(skipped="selector_error", message=message,
                                                             error_type=type(exc).__name__))
            return False
        finally:
            self._pass_selector_turn(plan.seq)
        if plan.components:
            self._selector_chose = True
        return True

    def _turns_deferred(self) -> bool:
        """Whether round-robin turns are taken after the parent's minibatch (_take_turn), not at launch."""
        return (not callable(self.config.component_selector) and self._selector.policy == "round_robin"
                and len(self._selector.components) > 1)

    async def _take_turn(self, plan: MutationPlan) -> None:
        """The round robin's turn for a mutation whose parent's minibatch was not perfect, in launch order
        in a deterministic run (as a callable selector's); for a merge, its parents' counters as those
        turns left them. A chained mutation takes the turn of the child it adopted, here too: a chained
        mutation skipped as perfect uses no turn either."""
        try:
            earlier = [f for s, f in self._selector_turns.items() if s < plan.seq and not f.done()]
            if earlier:
                await asyncio.gather(*(asyncio.shield(f) for f in earlier))
            if plan.chained:
                if plan.chained_turn is not None:
                    component, plan.child_counter = self._selector.chained_turn(*plan.chained_turn)
                    plan.components = [component]
            elif plan.kind == "merge":
                other = self._records[plan.other_parent_index].candidate.fingerprint \
                    if plan.other_parent_index is not None else plan.parent.fingerprint
                plan.child_counter = max(self._selector.counter(plan.parent.fingerprint),
                                         self._selector.counter(other))
                return
            else:
                plan.components, plan.child_counter = self._selector.select(
                    plan.parent.fingerprint, plan.parent.texts, plan.parent_index, (), (), None
                )
            if plan.kind == "reflection_all":  # operator credit chose every predictor (the turn still moves)
                plan.components = list(self._selector.components)
        finally:
            self._pass_selector_turn(plan.seq)

    def _note_empty_selection(self, seq: int) -> None:
        """A callable selector chose no component. Now and then that is its choice; on every one of the first
        selections it is a selector that can never propose, which would end the run as "no progress
        possible" with the seed. Counted per selection, apart from the proposer's failures: a selection
        that chose waits for its reflection to count as a success there, and selections run in launch
        order (deterministic mode), so the decision does not depend on the LM's timing."""
        if not self._warned_empty_selection:
            self._warned_empty_selection = True
            logger.warning("Mutation %d: component_selector returned no component to rewrite; the mutation is "
                           "skipped (counted in run_stats['proposal_skips']['no_components'])", seq)
        if self._selector_chose:
            return
        self._empty_selections += 1
        if self._empty_selections >= self.config.systemic_failure_window:
            raise SystemicFailureError(
                f"Stopping: component_selector returned no component on each of its first {self._empty_selections} "
                "selections, so nothing can be proposed. It must return the names of the predictors to rewrite "
                f"(this program's: {', '.join(self._seed.texts)}), at least now and then.",
                failure="no_components", error_type=None,
            )

    def _resolve_rung0(self, seq: int, survivor: tuple[Candidate, int] | None) -> None:
        """Publish mutation ``seq``'s rung-0 survivor (the child and its round-robin counter), or None."""
        fut = self._rung0_futs.get(seq)
        if fut is not None and not fut.done():
            fut.set_result(survivor)

    async def _adopt_chained_parent(self, plan: MutationPlan) -> None:
        """Wait for the rung-0 outcome of the mutation this one chains on; take its child as parent."""
        assert plan.chain_on is not None
        fut = self._rung0_futs.get(plan.chain_on)
        survivor = await asyncio.shield(fut) if fut is not None else None
        if survivor is None:
            return  # no survivor: the planned (fallback) parent stands
        child, counter = survivor
        plan.chained = True
        plan.parent, plan.parent_index, plan.parent_val = child, -1, {}
        plan.feedback_ids = ()  # the planned parent's failures; the child's own are not committed yet
        if plan.kind != "reflection_all":
            if plan.turn_deferred:  # taken in _take_turn, once the minibatch is known not to be perfect
                plan.chained_turn = (child.fingerprint, counter)
            else:
                component, plan.child_counter = self._selector.chained_turn(child.fingerprint, counter)
                plan.components = [component]
        elif plan.turn_deferred:  # every predictor: the child keeps its parent's counter
            plan.child_counter = counter
        self.stats.chaining["chained"] += 1

    def _chain_settled(self, plan: MutationPlan) -> bool | None:
        """For a chained mutation: None while its parent's mutation is uncommitted, else whether the
        parent joined the pool as a candidate the selection strategy could pick (then its index is
        filled in; otherwise ``plan.orphan_reason`` says why). A chained mutation builds on its parent
        before anyone knows that: kept only if so, its lineage is one gepa's selection can produce.

        Decided once, at the first ask after the parent's commit; in a deterministic run that ask waits
        for every earlier commit, so the verdict reads the state right after the parent's commit."""
        if plan.orphan_reason is not None:
            return False
        if plan.parent_index >= 0:
            return True
        fut = self._commit_futs.get(plan.chain_on) if plan.chain_on is not None else None
        if fut is not None and not fut.done():
            return None
        index = self._index_by_fp.get(plan.parent.fingerprint)
        if index is None:
            plan.orphan_reason = "the child it chained on did not join the pool"
            return False
        if not self._frontier.could_select(index, self.config.candidate_selection):
            plan.orphan_reason = ("the child it chained on joined the pool, but candidate_selection_strategy="
                                  f"{self.config.candidate_selection!r} would not pick it as a parent")
            return False
        plan.parent_index, plan.parent_val = index, self._records[index].val_scores
        return True

    async def _mutate(self, plan: MutationPlan, result: MutationResult) -> None:
        if plan.kind == "merge":
            await self._merge(plan, result)
            return
        cfg = self.config
        if plan.chain_on is not None:
            await self._adopt_chained_parent(plan)
        parent = plan.parent
        wave = plan.minibatch + plan.scout_ids  # one wave: scouting adds no round-trip
        wave_outs = await self._evaluations.many(parent, "train", wave, plan.seq, result.requested)
        result.train_scores.extend((parent.fingerprint, i, o.score) for i, o in zip(wave, wave_outs)
                                   if self._informative(o))
        parent_outs, scout_outs = wave_outs[: len(plan.minibatch)], wave_outs[len(plan.minibatch):]
        parent_scores = [o.score for o in parent_outs]
        self.stats.scouted += len(scout_outs)
        if cfg.skip_perfect_score and all(s >= cfg.perfect_score for s in parent_scores):
            result.status = "skipped_perfect"
            return

        if plan.turn_deferred:
            await self._take_turn(plan)
        # A user selector sees the parent's traced minibatch, so it can only run now.
        if callable(cfg.component_selector):
            parent_outs = await self._with_traces(parent, parent_outs, plan.seq)
            if not await self._select(plan, parent, parent_outs, parent_scores):
                result.detail = "component selector failed"
                return
        components = plan.components
        if not components:
            result.detail = "component selector chose no component"
            self.stats.proposal_skips["no_components"] += 1
            if callable(cfg.component_selector):
                self._note_empty_selection(plan.seq)
            return
        if len(components) > 1 and set(components) == set(self._selector.components):
            plan.kind = "reflection_all"  # a custom selector's subset (or a name twice) stays a "reflection"

        scouted = [o for o in scout_outs if self._teaches(o)]
        self.stats.scout_failures_read += len(scouted)
        feedback = parent_outs + scouted + self._reused_feedback(parent, plan)
        seeds = [plan.rng.getrandbits(63) for _ in range(plan.siblings)]
        proposals = await self._reflect(plan, result, parent, components, feedback, seeds)
        # A round-robin turn on a predictor that did not run on any example read (a router's branch, a
        # predictor the program never calls) passes to the next predictor, on the same minibatch. Left
        # wasted, such turns fall into step with the sampler's draws, and the other predictors can see
        # the same few examples turn after turn until the search stalls (a reviewer's two-predictor
        # program stopped at 0.5 where dspy.GEPA reached 1.0). Deterministic: it reads only traces.
        if not callable(cfg.component_selector) and len(components) == 1:
            for other in self._selector.after(components[0]):
                if not all(p.skipped == NOTHING_TO_REFLECT_ON for p in proposals):
                    break
                self.stats.proposal_skips[NOTHING_TO_REFLECT_ON] += len(proposals)
                components = plan.components = [other]
                plan.child_counter = self._selector.counter_after(other)
                proposals = await self._reflect(plan, result, parent, components, feedback, seeds)
        result.proposals_answered += sum(p.skipped != NOTHING_TO_REFLECT_ON or p.reflection_calls > 0
                                         for p in proposals)
        result.proposals = len(proposals)
        children: list[Candidate] = []
        unusable: list[str] = []
        for proposal in proposals:
            updates = {k: v for k, v in proposal.texts.items() if k in parent.texts and v != parent.texts[k]}
            if proposal.skipped or not updates:
                reason = proposal.skipped or "unchanged_texts"
                self.stats.proposal_skips[reason] += 1
                unusable.append(f"{reason}: {proposal.message}" if proposal.message else reason)
                continue
            child = parent.with_updates(updates, plan.kind)
            if all(child.fingerprint != c.fingerprint for c in children):
                children.append(child)
        if not children:
            result.detail = unusable[0]
            # debug: the proposer warned about the first skip of each kind, and run_stats counts them all
            logger.debug("Mutation %d: no usable proposal (%s)%s", plan.seq, result.detail, _replayed(result))
            return
        fresh = [c for c in children if not self._known_in_view(c, plan)]
        if not fresh:
            self._claim_child(children[0], plan, result)  # every child rebuilt a known candidate
            return

        if len(fresh) == 1:
            outs_per_child = [
                await self._evaluations.many(fresh[0], "train", plan.minibatch, plan.seq, result.requested)
            ]
        else:
            outs_per_child = await all_of(
                *(self._evaluations.many(c, "train", plan.minibatch, plan.seq, result.requested) for c in fresh)
            )
        pairs = [_served_sums(parent_outs, outs) for outs in outs_per_child]
        for c, outs in zip(fresh, outs_per_child):
            result.train_scores.extend((c.fingerprint, i, o.score) for i, o in zip(plan.minibatch, outs)
                                       if self._informative(o))
        result.children_tried = len(fresh)
        result.children_passed = sum(self._beats_parent(child_total, parent_total)
                                     for parent_total, child_total in pairs)
        # the earliest draw wins ties; by margin when two children's sums leave out different examples
        same_parent = len({parent_total for parent_total, _ in pairs}) == 1
        best = max(range(len(fresh)), key=lambda j: (pairs[j][1] - (0.0 if same_parent else pairs[j][0]), -j))
        child, (parent_sum, child_sum) = fresh[best], pairs[best]
        self._claim_child(child, plan, result)
        if not self._beats_parent(child_sum, parent_sum):
            result.status = "rejected_rung0"
            result.detail = f"minibatch {child_sum:.3f} <= parent {parent_sum:.3f}"
            if len(fresh) > 1:
                result.detail += f" (best of {len(fresh)} children)"
            return
        self.stats.survived_rung0_by_kind[plan.kind] += 1
        self._resolve_rung0(plan.seq, (child, plan.child_counter))
        await self._climb_rungs(plan, child, result, {})

    def _reusable_failures(self, fingerprint: str, n_commits: int, minibatch: Sequence[int]) -> tuple[int, ...]:
        """Feedback reuse: the candidate's committed failures outside ``minibatch`` that a reflection can
        learn from (traced; a metric that raised or a rate limit teaches the instruction nothing), newest
        first. Committed outcomes never change, so this does not depend on timing either."""
        limit = self.config.reflection_feedback_reuse
        if limit <= 0:
            return ()
        usable = []
        for example_id in self._knowledge.failed(fingerprint, n_commits, minibatch):
            outcome = self._evaluations.get((fingerprint, "train", example_id))
            if outcome is not None and self._teaches(outcome):
                usable.append(example_id)
                if len(usable) == limit:
                    break
        return tuple(usable)

    @staticmethod
    def _informative(outcome: EvalOutcome) -> bool:
        """Whether a training score says something about the candidate, for failure-first sampling: a
        metric that raised (an unlabeled example) or the LM service's failure does not, and ranking
        such an example "likely failing" would fill minibatches with rows no reflection can read (nor one
        it scored None, NaN or a non-number: ``metric_invalid``)."""
        return not outcome.service_failure and outcome.failure not in ("metric_error", "metric_invalid")

    def _teaches(self, outcome: EvalOutcome) -> bool:
        """A failure a reflection can learn from: traced, not a metric that raised, and not the LM
        service's (``service_failure``: a bad key, rate-limit or transient retries given up, an unusable answer)."""
        return outcome.score < self.config.perfect_score and (outcome.trajectory is not None or outcome.trace_lost) \
            and self._informative(outcome)

    def _scouts(
        self, fingerprint: str, n_commits: int, ranker: Callable[[int], int] | None, minibatch: Sequence[int]
    ) -> tuple[int, ...]:
        """Scouting: the training examples the parent is also evaluated on with its minibatch, drawn in
        failure-first order (``ranker`` is None with epoch sampling: no scouts) among those it has no
        committed score on (up to ``reflection_feedback_reuse`` of those it failed are reused for free).
        Why: in a wave of ``num_threads`` evaluation slots a minibatch of 3 leaves most of them
        idle, and a reflection that reads more failures fixes more per step; the steps (reflect, then
        validate) are the critical path. Scouts are not consumed by the sampler, so a later minibatch
        may still test a descendant on them."""
        n = self.config.reflection_scouts
        if n <= 0 or ranker is None or self._failure_first is None:
            return ()
        n = min(n, max(0, self.config.max_evals_in_flight - len(minibatch)))  # one wave
        exclude = set(minibatch) | self._knowledge.known(fingerprint, n_commits)
        return self._failure_first.draw(ranker, size=n, exclude=exclude)

    def _reused_feedback(self, parent: Candidate, plan: MutationPlan) -> list[EvalOutcome]:
        """The outcomes of plan.feedback_ids (chosen at planning, see _reusable_failures)."""
        reused = [self._evaluations.done[self._evaluations.key(parent.fingerprint, "train", i)]
                  for i in plan.feedback_ids]
        self.stats.feedback_reused += len(reused)
        return reused

    def _add_reflection_usage(self, proposal: ProposalOutcome) -> None:
        self.stats.reflection_prompt_tokens += proposal.reflection_prompt_tokens
        self.stats.reflection_completion_tokens += proposal.reflection_completion_tokens
        self.stats.reflection_cost += proposal.reflection_cost

    async def _reflect(
        self, plan: MutationPlan, result: MutationResult, parent: Candidate, components: list[str],
        feedback: list[EvalOutcome], seeds: list[int],
    ) -> list[ProposalOutcome]:
        """One proposal per seed (best-of-k siblings), their reflection calls added to ``result``."""
        ids = plan.minibatch + plan.scout_ids + plan.feedback_ids
        keys = [proposal_key(parent.fingerprint, components, ids, seed) for seed in seeds]
        if any(key not in self._known_proposals for key in keys):
            feedback = await self._with_traces(parent, feedback, plan.seq)  # a reflection will read them
        if len(seeds) == 1:
            proposals = [await self._propose(plan, result, parent, components, feedback, seeds[0], keys[0])]
        else:
            # Each sibling reads its feedback in another order: a reflection LM that answers the same
            # prompt the same way (temperature 0, or DSPy's cache) would otherwise give k equal children.
            proposals = await all_of(
                *(self._propose(plan, result, parent, components, sibling_order(feedback, j), seed, key)
                  for j, (seed, key) in enumerate(zip(seeds, keys)))
            )
        result.reflection_calls += sum(p.reflection_calls for p in proposals)
        return proposals

    async def _with_traces(self, parent: Candidate, outcomes: list[EvalOutcome], priority: float) -> list[EvalOutcome]:
        """``outcomes`` with every stored one whose trace was lost (masked in the run store) run again:
        only what a reflection or a selector actually reads is paid again on resume."""
        lost = [o.example_id for o in outcomes if o.trace_lost]
        if not lost:
            return outcomes
        fresh = await all_of(*(self._evaluations.with_trace(parent, "train", i, priority) for i in lost))
        by_id = dict(zip(lost, fresh))
        return [by_id.get(o.example_id, o) if o.trace_lost else o for o in outcomes]

    async def _propose(
        self, plan: MutationPlan, result: MutationResult, parent: Candidate, components: list[str],
        parent_outs: list[EvalOutcome], seed: int, key: str,
    ) -> ProposalOutcome:
        """One reflection (or its stored replay on resume, by ``key``); a proposer failure becomes a skipped
        proposal."""
        proposal = self._known_proposals.get(key)
        if proposal is not None:
            self.stats.proposals_replayed += 1
            if key in self._unreplayed_proposals:  # a stored one (its usage is in the prior sessions')
                self._unreplayed_proposals.discard(key)
                result.proposals_from_store += 1
            return proposal
        self._offered.update(components)
        async with self._reflection_slots:
            refusal = self._paid_call_refusal()
            if refusal is not None:
                raise PaidCallRefused(refusal)
            try:
                # a plain dict: a remote reflector sends the texts as JSON, which a read-only view is not
                proposal = await self._reflector.reflect(dict(parent.texts), components, parent_outs, seed)
            except USER_CODE_ERRORS as exc:  # a proposer failure skips this proposal, recorded; the run goes on
                if isinstance(exc, asyncio.CancelledError) and cancelling():
                    raise  # the engine's own cancellation, not the proposer's failure (errors.USER_CODE_ERRORS)
                # An LM client's error can quote a request, key included: mask before it reaches a log.
                message = describe_error(exc)
                logger.warning("Mutation %d: the reflector raised %s", plan.seq, message)
                proposal = ProposalOutcome(skipped="proposer_error", message=message, error_type=type(exc).__name__)
        self.stats.reflection_calls += proposal.reflection_calls
        (self._unread if proposal.skipped == NOTHING_TO_REFLECT_ON else self._read).update(components)
        self._add_reflection_usage(proposal)
        self._known_proposals[key] = proposal
        for obs in self._observers:
            obs.on_proposal(key, proposal)
        # an echo counts as a failed reflection only when there was something to fix: with
        # skip_perfect_score=False a reflection on a solved minibatch may rightly keep the instruction
        unchanged = proposal.skipped is None and any(o.score < self.config.perfect_score for o in parent_outs) and all(
            parent.texts.get(k) == v for k, v in proposal.texts.items() if k in parent.texts)
        if unchanged:
            # ... and only once it is clear the proposer echoes whatever it is offered: at least N echoes
            # (N components) and every component offered so far echoed. In a many-predictor program a
            # proposer rightly keeps the instructions of the predictors a failure is not about (round
            # robin: up to N - 1 echoes before the faulty one's turn; many mutations in flight: echoes of
            # the others while the faulty one is being rewritten), and a subset selector offers only some.
            # Until then an echo is neither a failure nor a success.
            self._echoes += 1
            self._echoed.update(components)
            if self._echoes < len(self._seed.texts) or not self._echoed >= self._offered - (self._unread - self._read):
                return proposal
        self._observe_proposal(plan.seq, proposal, unchanged=unchanged)
        return proposal

    def _observe_proposal(self, seq: int, proposal: ProposalOutcome, unchanged: bool = False) -> None:
        """The systemic check's view of a reflection. A deterministic run shows it the reflections in launch
        order, at each mutation's commit: "the first 8 reflections all failed" must not depend on which
        reflection answered first (a slow usable one and eight fast failures launched after it stopped one
        run and not the next). A fatal one (a revoked key) stops the run at once, in any order."""
        if self.config.deterministic and not proposal.fatal:
            self._deferred_proposals.setdefault(seq, []).append((proposal, unchanged))
            return
        self._systemic.observe_proposal(proposal, unchanged=unchanged)

    def _judge_in_commit_order(self, result: MutationResult) -> None:
        """Deterministic mode: the trainset's first-N rule reads the mutation's training evaluations now,
        at its commit (commits come in launch order), the parent's first, then by candidate and example;
        each evaluation once, at the first commit that asked for it (a stored one too: the uninterrupted
        run read it). Which evaluations start first depends on the LM's timing, and so did the verdict.
        It comes at the commit that completes the first N: after that mutation's reflection and children,
        a few calls later than a verdict as evaluations end (the price of the same verdict every run)."""
        if not self._train_in_order or self._systemic.first_n_passed("train"):
            return  # (decided: nothing more to read, and the keys read need not be kept)
        parent = result.plan.parent.fingerprint
        done = self._evaluations.done
        for key in sorted((k for k in result.requested if k[1] == "train" and k not in self._judged),
                          key=lambda k: (k[0] != parent, k[0], k[2])):
            outcome = done.get(key)
            if outcome is not None:
                self._judged.add(key)
                self._systemic.observe_in_order(outcome, key[0], "train")

    def _beats_parent(self, child_sum: float, parent_sum: float) -> bool:
        """GEPA's rung-0 test: strictly better on the minibatch (or tied, with accept_equal_on_minibatch)."""
        return child_sum > parent_sum or (child_sum == parent_sum and self.config.accept_equal_on_minibatch)

    def _known_in_view(self, child: Candidate, plan: MutationPlan) -> bool:
        known = self._index_by_fp.get(child.fingerprint)
        return known is not None and known < plan.committed_at_launch

    def _claim_child(self, child: Candidate, plan: MutationPlan, result: MutationResult) -> bool:
        """Record the child; True if it duplicates a candidate the mutation's planning view already had
        (judged against that view, not the live pool, so the outcome does not depend on timing)."""
        result.child = child
        if self._known_in_view(child, plan):
            result.status = "duplicate"
            return True
        return False

    async def _merge(self, plan: MutationPlan, result: MutationResult) -> None:
        assert plan.child_texts is not None and plan.other_parent_val is not None
        other_fp = self._records[plan.other_parent_index].candidate.fingerprint if plan.other_parent_index is not None \
            else ""
        child = Candidate(texts=plan.child_texts, parents=(plan.parent.fingerprint, other_fp), kind="merge")
        if plan.turn_deferred:
            await self._take_turn(plan)
        if self._claim_child(child, plan, result):
            return
        outs = await self._evaluations.many(child, "val", plan.screen_ids, plan.seq, result.requested)
        child_sum = sum(o.score for o in outs)
        best_parent = max(sum(plan.parent_val[i] for i in plan.screen_ids),
                          sum(plan.other_parent_val[i] for i in plan.screen_ids))
        if child_sum < best_parent:
            result.status = "rejected_rung0"
            result.detail = f"merge screen {child_sum:.3f} < best parent {best_parent:.3f}"
            return
        self.stats.survived_rung0_by_kind[plan.kind] += 1
        await self._climb_rungs(plan, child, result, {o.example_id: o for o in outs})

    async def _climb_rungs(
        self, plan: MutationPlan, child: Candidate, result: MutationResult, val: dict[int, EvalOutcome]
    ) -> None:
        cfg = self.config
        for rung in range(self._ladder.num_rungs):
            ids = [i for i in self._ladder.new_ids(rung) if i not in val]
            outs = await self._evaluations.many(child, "val", ids, plan.seq, result.requested)
            val.update({o.example_id: o for o in outs})
            result.rung_reached = rung + 1
            if rung == self._ladder.num_rungs - 1:
                break
            await self._my_turn(plan.seq)
            if plan.chained and self._chain_settled(plan) is False:
                result.status, result.detail = "orphaned", plan.orphan_reason
                return
            incumbent = self._records[self._frontier.best_index()]
            decision = promotion_decision(
                {i: o.score for i, o in val.items()}, incumbent.val_scores, self._frontier.best_scores(),
                cfg.promotion_z,
            )
            if not decision.promote:
                result.status = "pruned"
                result.detail = f"rung {rung + 1}: {decision.reason}"
                return
        if plan.chained and self._chain_settled(plan) is None:
            fut = self._commit_futs.get(plan.chain_on)  # type: ignore[arg-type]
            if fut is not None:
                await asyncio.shield(fut)
        if plan.chained and not self._chain_settled(plan):
            result.status, result.detail = "orphaned", plan.orphan_reason
            return
        result.val_outcomes = val
        result.status = "accepted"

    # ------------------------------------------------------------------ commit
    def _commit(self, result: MutationResult) -> None:
        plan = result.plan
        self._plans.pop(plan.seq, None)
        for proposal, unchanged in self._deferred_proposals.pop(plan.seq, ()):  # in launch order (deterministic)
            self._systemic.observe_proposal(proposal, unchanged=unchanged)
        self._judge_in_commit_order(result)
        newly_charged = self._budget.commit(result.requested)
        self._budget.release(plan.reservation)
        self._committed += 1
        status = result.status
        for fingerprint, example_id, score in result.train_scores:
            self._knowledge.record(fingerprint, example_id, score, self._committed)
        self.stats.siblings["children_tried"] += result.children_tried
        self.stats.siblings["children_passed"] += result.children_passed
        if plan.siblings > 1 and result.children_tried:
            self.stats.siblings["best_of_k_mutations"] += 1
            self.stats.siblings["best_of_k_children"] += result.children_tried
        # The no-progress limit (engine/noop.py). Paid: the proposer answered, not "made a DSPy LM call": a
        # custom proposer calling its vendor's SDK pays for calls no DSPy callback sees.
        self._noop.record(not (newly_charged or status == "accepted"), status, result.proposals_answered,
                          result.detail)
        # A proposer that stopped working (every reflection since a usable one failed) also stops the run
        # when its mutations still charge new evaluations (each evaluates its parent on a new minibatch and
        # scouts): the paid streak above only starts once the parents have been evaluated on every training
        # example (a review: 280 metric calls and 210 paid reflections after the reflection LM broke).
        proposer_dead = self._systemic.proposer_failures_in_a_row >= self.config.max_paid_noop_mutations
        if self._stop_reason is None and (self._noop.length >= self.config.max_noop_mutations or proposer_dead
                                          or self._noop.paid >= self.config.max_paid_noop_mutations):
            broken = self._systemic.proposer_failure_streak()
            if broken is not None and (proposer_dead or
                                       self._systemic.proposer_failures_in_a_row >= self._noop.paid > 0):
                # not a search that ran out of ideas: the proposer stopped working (a reflection LM answering
                # refusals or unparseable text); the best program so far is returned, and the user must hear why
                logger.warning("Stopping (no_progress_possible): %s The best program found so far is returned.",
                               broken)
            else:
                logger.log(*self._noop.describe(self.stats.failures, self.stats.executed + self.stats.replayed))
            self._stop_reason = "no_progress_possible"
            if self.config.deterministic:
                # Mutations planned from views before this commit still run: whether the loop launched
                # them before this commit depended on timing, and the run must not. None planned from
                # this commit's view: in every timing it could only have launched after this decision.
                self._drain_view = self._committed
        if status == "accepted" and result.child is not None and result.child.fingerprint in self._index_by_fp:
            status = "duplicate"  # an earlier commit brought the same texts in while this one ran
        elif status == "accepted" and self._stop_reason == "stop_callback":
            # gepa's state is final once a stop callback returned True (MaxTrackedCandidatesStopper(3)
            # means 3 candidates); a mutation that was in flight (a chained one, a sibling) keeps its
            # stored evaluations for a rerun, but its child is not added
            status = "after_stop"
        if status in ("accepted", "rejected_rung0", "pruned"):
            self._attempted += 1
            improved = False
            if status == "accepted" and result.val_outcomes:
                child_mean = mean_in_id_order({i: o.score for i, o in result.val_outcomes.items()})
                improved = child_mean > self._records[self._frontier.best_index()].aggregate
            self._credit = self._credit.updated(plan.kind, survived=status != "rejected_rung0",
                                                accepted=status == "accepted", improved_best=improved)
        self.stats.mutations[status] += 1
        self.stats.mutations_by_kind[plan.kind] += 1  # counted at commit: the kind is final by then
        if status == "accepted" and result.child is not None:
            self._accepted += 1
            if plan.parent_index < 0:  # pragma: no cover - _climb_rungs settles a chained parent first
                raise RuntimeError(f"mutation {plan.seq} was accepted with an unsettled chained parent")
            parents: list[int | None] = [plan.parent_index]
            if plan.kind == "merge":
                parents = [*sorted([plan.parent_index, plan.other_parent_index or 0])]
            elif self.config.use_merge:
                self._merges_granted += 1  # GEPA: each new reflective candidate schedules one merge attempt
            record = self._add_record(result.child, parents, list(result.val_outcomes.values()), seq=plan.seq)
            self._selector.inherit(result.child.fingerprint, plan.child_counter)
            self.stats.accepted_by_kind[plan.kind] += 1
            origin = (f"merge of candidates {plan.parent_index} and {plan.other_parent_index}" if plan.kind == "merge"
                      else f"{plan.kind} of candidate {plan.parent_index} on {','.join(plan.components)}")
            logger.info(
                "Mutation %d (%s): new candidate %d, validation %.4f (best %.4f)%s",
                plan.seq, origin, record.index,
                record.aggregate, self._records[self._frontier.best_index()].aggregate, _replayed(result),
            )
            for obs in self._observers:
                obs.on_candidate(record)
        else:
            logger.debug("Mutation %d: %s %s", plan.seq, status, result.detail or "")
            if plan.kind == "merge":
                self._merges_failed += 1
        self._history.record(
            CommitPoint(len(self._records), self._budget.committed, self._merges_granted, self._merges_failed,
                        self._accepted, self._attempted, self._credit,
                        self.stats.siblings["children_tried"], self.stats.siblings["children_passed"])
        )
        if plan.chained:
            self.stats.chaining[status if status in ("accepted", "orphaned") else "other"] += 1
        # A task cancelled before its first step never ran its finally: release anyone chained on it.
        self._resolve_rung0(plan.seq, None)
        survived = result.status in ("accepted", "pruned", "orphaned") and result.child is not None
        self._survivor_index[plan.seq] = (
            self._index_by_fp.get(result.child.fingerprint, -1) if survived and result.child is not None else None
        )
        self._survivor_index.pop(plan.seq - 3, None)
        done = self._commit_futs.get(plan.seq)
        if done is not None and not done.done():
            done.set_result(None)
        # mutation seq - 1's futures served only mutation seq, which is now committed
        self._rung0_futs.pop(plan.seq - 1, None)
        self._commit_futs.pop(plan.seq - 1, None)
        waiter = self._turn_waiters.pop(self._committed, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._run_stop_callbacks()  # one committed mutation is one gepa iteration
        for obs in self._observers:
            obs.on_mutation(result, status)

    def _add_record(
        self, candidate: Candidate, parents: list[int | None], outcomes: Sequence[EvalOutcome], seq: int | None
    ) -> CandidateRecord:
        index = len(self._records)
        record = CandidateRecord(
            index=index,
            candidate=candidate,
            parent_indices=parents,
            val_scores={o.example_id: o.score for o in outcomes},
            val_objective_scores={o.example_id: o.objective_scores for o in outcomes if o.objective_scores},
            # a program that answered None answered; a failure without an output has none
            val_outputs={o.example_id: o.output for o in outcomes if o.output is not None or not o.failure},
            discovery_metric_calls=self._budget.committed,
            discovery_seconds=self._elapsed(),
            mutation_seq=seq,
        )
        self._records.append(record)
        self._index_by_fp[candidate.fingerprint] = index
        self._frontier.add(index, record.val_scores)
        return record

    # ------------------------------------------------------------------ views
    def _elapsed(self) -> float:
        return self._clock() - self._start

    def snapshot(self) -> RunSnapshot:
        """The candidates, fronts, time and metric calls so far, copied: called on the loop thread. The
        calls are counted as the candidates' own are (committed work, a resumed run's stored work
        included), or as executed when more have run."""
        calls = max(self._budget.executed, self._budget.committed)
        return RunSnapshot(list(self._records), self._frontier.fronts(), self._elapsed(), calls)

    def selector_state(self, view: int | None = None, *, in_iteration: bool = False) -> SelectorState:
        """gepa's state as a selector or stop callback reads it: now, or as of ``view`` commits (what a
        callable component selector sees in a deterministic run, so its choice does not depend on how
        many other mutations happened to commit while this one evaluated its parent).

        ``i``: gepa starts it at -1 and adds 1 at the top of each iteration. A stop callback is asked
        between iterations (``i`` is the last finished one: commits - 1); a component selector during
        one (``in_iteration``: its own index, the commits before it), so that a selector alternating on
        ``state.i % 2`` starts on the half gepa's does."""
        if view is None:
            records, charged, commits = self._records, self._budget.committed, self._committed
        else:
            point = self._history.at(view)
            records, charged, commits = self._records[: point.records], point.charged, view
        return SelectorState(
            list_of_named_predictors=list(self._seed.texts),
            program_candidates=[dict(r.candidate.texts) for r in records],
            program_full_scores_val_set=[r.aggregate for r in records],
            named_predictor_id_to_update_next_for_program_candidate=[
                self._selector.counter(r.candidate.fingerprint) for r in records
            ],
            total_num_evals=charged,
            i=commits if in_iteration else commits - 1,
            records=tuple(records),  # a view: later commits must not show through a kept state
        )

    def _result(self) -> EngineResult:
        reason: StopReason = self._stop_reason or "max_metric_calls"
        self.stats.operator_credit = self._credit.to_dict()
        self.stats.evaluation_slots = self._eval_slots.use().to_dict()
        return EngineResult(
            records=list(self._records),
            fronts=self._frontier.fronts(),
            best_index=self._frontier.best_index(),
            stop_reason=reason,
            total_metric_calls=self._budget.executed,
            num_full_val_evals=len(self._records),
            wall_seconds=self._elapsed(),
            stats=self.stats,
            val_ids=self._val_ids,
        )

