"""Running a DSPy program on one example, with its trace, and scoring it with the user's metric.

Async programs (whose own class, not a DSPy base, defines ``aforward``) run as asyncio tasks through
``acall`` (or, once an LM turns out to have no async support, through their own ``forward`` if they
have one); others run in our own bounded thread pool, as dspy.GEPA runs them. DSPy's built-in modules
define ``aforward`` too, but a bare ``dspy.Predict`` / ``ChainOfThought`` / ``ReAct`` student is a sync
program to its user: its LM may implement only ``forward`` and its tools may block, and both would
break on (or stall) the one event loop. We deliberately avoid ``dspy.asyncify``: it funnels every call through a
process-wide limiter of ``async_max_workers`` (8 by default), which would silently cap ``num_threads``.
Each rollout gets its own ``dspy.context(trace=...)`` so concurrent traces never mix, and worker
threads run in a copy of the caller's context so a ``dspy.context(lm=...)`` set around ``compile()``
keeps working.

Rate limits are not failed evaluations. Rollouts run on retry-less copies of the LMs (the context LM
through ``dspy.context(lm=copy)``, per-predictor LMs on our own built programs; the user's objects are
never modified, see ``lm_copies.py``). A rollout whose failure has a 429 anywhere in its exception chain
is not scored: it waits (Retry-After, else exponential backoff with jitter) and runs again, behind an
AIMD concurrency window per LM endpoint (``engine/aimd.py``) that shrinks on 429s, grows back on
successes, and holds everyone back until the server's Retry-After has passed. Timeouts, 5xx and
dropped connections are retried the same way a few times, then scored as a program failure with their
cause. Systemic errors (bad key, unknown model, refused connection: the fatal set) are never retried.
After ``RATE_LIMIT_POLICY`` (10 retries or 5 minutes) a still rate-limited rollout is scored
``failure_score`` with the cause ``"rate_limited"`` (not raised): a provider that keeps refusing for
that long makes the systemic-failure rule stop the run if nothing succeeds, while an isolated give-up
costs one example.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import numbers
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import dspy

from dspy_turbogepa.adapter.introspect import defines_own_forward, runs_async, users_file
from dspy_turbogepa.adapter.lm_copies import (
    ROLLOUT_CLOSED,
    ROLLOUT_LM_ERRORS,
    ROLLOUT_USAGE,
    AnsweredEndpoints,
    EvaluatorClosedError,
    LMCopies,
    RolloutUsage,
    adapter_lms,
    current_rollout_usage,
    endpoint_key,
    endpoint_model,
    judge_usage_attached,
    raised_by_endpoint,
    rollout_usage,
)
from dspy_turbogepa.adapter.metric import read_metric_return
from dspy_turbogepa.adapter.program import PredictorNames, ProgramCodec, all_named_predictors
from dspy_turbogepa.adapter.ratelimit import (
    FATAL_ERROR_TYPES,
    FATAL_ONCE_ANSWERED,
    RATE_LIMIT_POLICY,
    TRANSIENT_POLICY,
    RateLimitStats,
    RetryPolicy,
    Verdict,
    classify,
)
from dspy_turbogepa.adapter.trajectory import DspyTrajectory, TraceStep
from dspy_turbogepa.engine.aimd import AimdRegistry
from dspy_turbogepa.engine.errors import USER_CODE_ERRORS, SystemicFailureError, cancelling
from dspy_turbogepa.engine.systemic import RESUME_ADVICE
from dspy_turbogepa.engine.types import EvalOutcome, Evaluator, FailureKind, Split
from dspy_turbogepa.log_once import FirstOfKind
from dspy_turbogepa.redaction import describe_error, error_attr, error_text, exception_chain
from dspy_turbogepa.workers import DaemonThreadPool

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 2000

#: DSPy's own default ``max_trace_size``: a rollout's trace holds every predictor call up to this many.
_DSPY_MAX_TRACE_SIZE = 10_000


def _traces_every_call(cap: Any) -> bool:
    """Whether a ``max_trace_size`` the user configured keeps a rollout's predictor calls for reflection
    (DSPy's default does; 0, 0.0 or a small cap drops them). Anything but a real number is left to DSPy
    to refuse, as it would without us."""
    return isinstance(cap, bool) or not isinstance(cap, numbers.Real) or float(cap) >= _DSPY_MAX_TRACE_SIZE


def lacks_async_support(error: BaseException) -> bool:
    """Whether ``error`` (or one of its causes) says an LM cannot be called asynchronously: DSPy's
    ``LMUnsupportedFeatureError`` (an engine given without ``async_engine=``) or the
    ``NotImplementedError`` of ``BaseLM.aforward`` (a custom LM that implements only ``forward``)."""
    unsupported = getattr(getattr(dspy, "utils", None), "exceptions", None)
    unsupported_type = getattr(unsupported, "LMUnsupportedFeatureError", None)
    seen: set[int] = set()
    cur: BaseException | None = error
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if unsupported_type is not None and isinstance(cur, unsupported_type) and "async" in str(cur):
            return True
        if isinstance(cur, NotImplementedError):
            tb = cur.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None and tb.tb_frame.f_code.co_name == "aforward" and isinstance(
                    tb.tb_frame.f_locals.get("self"), dspy.BaseLM):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


def _error_types(exc: BaseException) -> list[str]:
    """Names of the exception and its causes: LM errors often arrive wrapped."""
    names: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        names.append(type(cur).__name__)
        cur = cur.__cause__ or cur.__context__
    return names


def _describe(exc: BaseException) -> str:
    """The error as feedback text: masked at the source, since it reaches the reflection prompt, logs
    and a SystemicFailureError as well as the run store (a client error may quote a key)."""
    text = describe_error(exc).strip()  # sentences are appended to it ("... . Scored")
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + " ..."


def _lost_context_hint(exc: BaseException) -> str:
    """For DSPy's "No LM is loaded" while an LM is configured where the rollout runs: the predictor ran in
    a thread the program started, which does not inherit ``dspy.context``. The stop said to fix "the LM
    configuration" to a user who had configured one."""
    if dspy.settings.lm is None or not any("No LM is loaded" in error_text(e) for e in exception_chain(exc)):
        return ""
    return (" (An LM is configured around compile, but this predictor ran without it: probably in a thread the "
            "program started itself, which does not inherit dspy.context. Start such threads with "
            "contextvars.copy_context().run, or use dspy.Parallel.)")


#: what asyncio (Future, Event, Queue, Lock ...) and the clients built on them say when an object made on one
#: event loop is used on another
_FOREIGN_LOOP_TEXTS = ("bound to a different event loop", "attached to a different loop")


def _foreign_loop_hint(exc: BaseException) -> str:
    """For an async object of the user's (a pooled async client, a lock) made on their application's
    event loop: ``aforward`` runs on the engine's own loop, in a worker thread, where it cannot be used.
    Nothing in asyncio's message says which loops are meant."""
    if not any(text in error_text(e) for e in exception_chain(exc) for text in _FOREIGN_LOOP_TEXTS):
        return ""
    return (" (The program's aforward runs on TurboGEPA's own event loop, in a worker thread, not on the loop "
            "that made this object: create async clients and locks inside aforward, or lazily on each loop.)")


def _user_frame(exc: BaseException) -> str:
    """`` (at metric.py:12 in my_metric)``: the innermost frame of the user's own code in the error's
    traceback, or nothing. The outcome's message is all a user sees of an error in their metric or
    program (the first warning, the systemic stop), and without it they had to guess which line raised.
    It is not part of what the reflection reads (the trajectory's text): a location in code the
    reflection LM cannot see tells it nothing, and differs between a checkout and an install."""
    import os
    import traceback

    try:
        frames = traceback.extract_tb(exc.__traceback__)
    except Exception:  # noqa: BLE001 - a traceback that cannot be read: no location, the message stands
        return ""
    for frame in reversed(frames):
        if frame.filename.startswith("<") or not users_file(frame.filename):
            continue
        return f" (at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name})"
    return ""


@dataclass
class _Attempt:
    """One run of the program (and, unless it is to be retried, its score)."""

    outcome: EvalOutcome | None
    verdict: Verdict | None = None
    pred: Any = None
    raw_trace: list[Any] = field(default_factory=list)
    error: BaseException | None = None
    usage: RolloutUsage = field(default_factory=RolloutUsage)
    metric_retries: int = 0


@runtime_checkable
class ManagedEvaluator(Evaluator, Protocol):
    """What ``compile()`` asks of the evaluator it runs, beyond the engine's ``Evaluator``: its rate-limit
    counters and windows (for the progress display, MLflow and ``run_stats["rate_limits"]``; an empty
    dict is fine) and ``close()`` when the compile ends, however it ends. ``TurboGEPA._make_evaluator``
    returns one: the seam where an evaluator running rollouts elsewhere (Ray workers) plugs in."""

    def rate_limit_stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class DspyEvaluator:
    """Implements the engine's ``Evaluator`` protocol for a DSPy program and GEPA-protocol metric.

    ``window_limit`` (default ``max_workers``) is where every endpoint's AIMD window starts and the most
    it grows back to. ``rate_limit_policy`` / ``transient_policy`` say how often and how long a rollout
    is retried on 429s / on timeouts, 5xx and dropped connections. ``clock``/``sleep`` are injectable
    for tests. ``rate_limit_stats()`` reports the counters and the windows.
    """

    def __init__(
        self,
        codec: ProgramCodec,
        datasets: Mapping[Split, Sequence[dspy.Example]],
        metric: Callable[..., Any],
        failure_score: float,
        max_workers: int,
        keep_outputs: bool = False,
        use_async: bool | None = None,
        fatal_error_types: frozenset[str] | None = None,
        *,
        window_limit: int | None = None,
        rate_limit_policy: RetryPolicy = RATE_LIMIT_POLICY,
        transient_policy: RetryPolicy = TRANSIENT_POLICY,
        seed: int | None = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        price_table: Mapping[str, tuple[float, float]] | None = None,
        metric_probe_after: int = 32,
    ) -> None:
        self._codec = codec
        self._prices = dict(price_table or {})
        self._data = datasets
        self._metric = metric
        self._failure_score = failure_score
        self._keep_outputs = keep_outputs
        self._pool = DaemonThreadPool(max_workers=max_workers, thread_name_prefix="turbogepa-eval")
        self._context_key: tuple[Any, str] | None = None
        if use_async is None:
            use_async = runs_async(codec.student)
        self.use_async = use_async
        #: an async program that also has its own forward falls back to it when an LM cannot run async
        self._sync_fallback = bool(use_async) and defines_own_forward(codec.student)
        self._fatal = self._fatal_before_answers = (FATAL_ERROR_TYPES if fatal_error_types is None
                                                    else fatal_error_types)
        #: Once an endpoint has answered, a refused connection means a restart, not a wrong api_base.
        self._fatal_once_answered = self._fatal & FATAL_ONCE_ANSWERED
        #: the endpoint keys our LM copies saw answer (noted from whatever thread called them)
        self._answered = AnsweredEndpoints()
        self._rl_policy = rate_limit_policy
        self._tr_policy = transient_policy
        self._clock = clock
        self._sleep = sleep
        self._rng = random.Random(f"backoff:{seed}")
        self._copies = LMCopies(self._answered)
        self._windows = AimdRegistry(
            window_limit or max_workers, default_cooldown_s=rate_limit_policy.base_s,
            max_cooldown_s=rate_limit_policy.max_elapsed_s, clock=clock, sleep=sleep
        )
        self._stats = RateLimitStats()
        self._retry_logged = FirstOfKind()  # error types whose transient retry was logged at INFO
        self._output_noted = FirstOfKind()  # one-time warnings about what the program returned
        #: models already named as answering without token usage (shared with the reflections)
        self.usage_noted = FirstOfKind()
        #: Components some rollout of this compile called (see components_seen_running)
        self._ran: set[str] = set()
        self._components = set(codec.seed_texts())
        #: id(program) -> (program, endpoint keys of its predictor LMs, whether a predictor uses the context LM)
        self._prepared: OrderedDict[int, tuple[dspy.Module, frozenset[str], bool]] = OrderedDict()
        self._closed_event = threading.Event()
        self._warned_rate_limited = False
        self._metric_check = _MetricBreakCheck(max(1, metric_probe_after))
        #: At most ``max_workers`` metric calls at once, this evaluator's and the reflections' feedback calls
        #: together (``ReflectiveDatasetBuilder`` takes this gate too): dspy.GEPA never runs more than
        #: ``num_threads`` at once, and an LLM-judge metric's rate limit or connection pool is sized to that.
        self.metric_gate = threading.BoundedSemaphore(max_workers)

    def close(self) -> None:
        """Queued rollouts are cancelled; one already running cannot be (its LM call is on the wire), but
        its metric is not called: compile has returned (or raised), and the engine reads no more scores.
        Its answer is paid but not stored, so a rerun with the same log_dir asks for it again: at most
        one call per evaluation slot, the price of stopping at once (docs/errors.md)."""
        self._closed_event.set()  # and our LM copies start no new call for it (a second step, a retry)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def rate_limit_stats(self) -> dict[str, Any]:
        """Counters since construction: 429s seen, retries, give-ups, total backoff seconds (summed over
        rollouts), and per endpoint its current and smallest AIMD window (``endpoints``)."""
        return {**self._stats.snapshot(), "endpoints": self._windows.stats()}

    # ------------------------------------------------------------------ one evaluation
    async def evaluate(
        self, texts: Mapping[str, str], fingerprint: str, split: Split, example_id: int, capture_traces: bool
    ) -> EvalOutcome:
        example = self._data[split][example_id]
        built = self._codec.get(fingerprint, texts)
        pred_keys, uses_context = self._prepare(built.program)
        context_lm = dspy.settings.lm
        context_copy = None
        keys = set(pred_keys)
        if context_lm is not None:
            context_copy = self._copies.get(context_lm)
            if uses_context:
                keys.add(self._context_endpoint(context_lm))
        # the configured adapter's own LMs (TwoStepAdapter's extraction model) answer every rollout
        keys.update(endpoint_key(held) for held in adapter_lms(dspy.settings.adapter).values())
        usage = RolloutUsage()
        retries = {"rate_limited": 0, "transient": 0}
        # Each retry policy's time runs from its kind's first failure and leaves out the time spent queued
        # for a slot in the endpoints' windows: counted from the rollout's start, a rollout queued behind a
        # shrunken window gave up on its first 429 with no retry. An endpoint's cool-down after a 429 is
        # the rate-limit policy's own backing off, and none of the transient policy's: waiting out 429s
        # must not use up its time.
        first_failed: dict[str, tuple[float, float]] = {}  # kind -> (clock, time not counted so far) at its first
        uncounted = {"rate_limited": 0.0, "transient": 0.0}
        last: tuple[_Attempt, Verdict, PredictorNames] | None = None  # the failure being retried

        def elapsed(kind: str) -> float:
            """The seconds of ``kind``'s retry policy used so far."""
            since, uncounted_before = first_failed[kind]
            return self._clock() - since - (uncounted[kind] - uncounted_before)

        while True:
            asked = self._clock()
            # a 429's retry waits out the endpoints' cool-downs only for what is left of its policy: past
            # it, the retry could only be given up, after holding the slot that long
            left = (max(0.0, self._rl_policy.max_elapsed_s - elapsed("rate_limited"))
                    if last is not None and last[1].kind == "rate_limited" else None)
            tickets = await self._windows.acquire_all(keys, left)
            cooled = sum(t.cooldown_s for t in tickets)
            waited = max(0.0, self._clock() - asked)
            uncounted["rate_limited"] += max(0.0, waited - cooled)
            uncounted["transient"] += waited
            if last is not None:
                if any(t.cut_short for t in tickets):  # only a 429's retry is given a limit
                    self._windows.release_all(tickets)
                    why = (f"the endpoint stayed paused (a rate limit's Retry-After) past the "
                           f"{self._rl_policy.max_elapsed_s:.0f}s of the retry policy")
                    return self._give_up(last[0], last[1], retries["rate_limited"], elapsed("rate_limited"), usage,
                                         retries["rate_limited"], example, example_id, last[2], split,
                                         capture_traces, why=why)
                retried = last[1].kind
                assert retried is not None
                retries[retried] += 1  # counted as sent, not as planned: one given up above never was
                self._stats.count(retried, "retry")
            result, hint, only = "neutral", None, None
            try:
                program, names = built.for_call()
                attempt = await self._attempt(program, names, example, example_id, split, capture_traces,
                                              context_copy)
                usage.add(attempt.usage)
                verdict = attempt.verdict
                if verdict is None:
                    assert attempt.outcome is not None
                    # The endpoints answered (even if the metric or the parse then failed): the window may grow.
                    result = "neutral" if attempt.outcome.failure == "program_error" else "success"
                    if result == "success":
                        self._fatal = self._fatal_once_answered
                elif verdict.kind == "rate_limited":
                    result, hint = "rate_limited", verdict.retry_after
                    only = self._keys_of(verdict.model, keys, raised_by_endpoint(attempt.error)
                                         if attempt.error is not None else None)
            finally:
                self._windows.release_all(tickets, result, hint, only)  # type: ignore[arg-type]
            if verdict is None:
                assert attempt.outcome is not None
                return self._finish(attempt.outcome, usage, retries["rate_limited"] + attempt.metric_retries)
            kind = verdict.kind
            assert kind is not None
            rate_limited = kind == "rate_limited"
            policy = self._rl_policy if rate_limited else self._tr_policy
            done = retries[kind]
            self._stats.count(kind, "seen")
            first_failed.setdefault(kind, (self._clock(), uncounted[kind]))
            used = elapsed(kind)
            delay = policy.delay(done, verdict.retry_after, self._rng, used)
            if delay is None:
                return self._give_up(attempt, verdict, done, used, usage, retries["rate_limited"], example,
                                     example_id, names, split, capture_traces)
            self._stats.add(backoff_s=delay)
            last = (attempt, verdict, names)
            if not rate_limited:
                # once per error type at INFO (a flaky server made three of every four log lines these);
                # the counts are in run_stats["rate_limits"] (transient_retries) and the summary
                first = self._retry_logged.first(verdict.error_type)
                logger.log(logging.INFO if first else logging.DEBUG,
                           "Retrying a rollout in %.1fs after %s (retry %d of %d)%s", delay, verdict.error_type,
                           done + 1, policy.max_retries,
                           "; further retries after this error are logged at DEBUG" if first else "")
            await self._sleep(delay)

    def _give_up(
        self, attempt: _Attempt, verdict: Verdict, retries: int, elapsed: float, usage: RolloutUsage,
        rl_retries: int, example: dspy.Example, example_id: int, names: PredictorNames, split: Split, capture: bool,
        why: str | None = None,
    ) -> EvalOutcome:
        assert attempt.error is not None
        outcome, _ = self._score(example, example_id, None, attempt.raw_trace, attempt.error, names, split, capture)
        what = "rate limited" if verdict.kind == "rate_limited" else "failing transiently"
        policy = self._rl_policy if verdict.kind == "rate_limited" else self._tr_policy
        why = why or (f"the server asked to wait {verdict.retry_after:.0f}s (Retry-After), more than the "
                      f"{policy.max_elapsed_s - elapsed:.0f}s left of the retry policy's {policy.max_elapsed_s:.0f}s"
                      if policy.asks_too_long(verdict.retry_after, retries, elapsed)
                      else f"after {retries} retries over {elapsed:.0f}s")
        message = f"Still {what}; gave up: {why}. {outcome.message}"
        assert verdict.kind is not None
        self._stats.count(verdict.kind, "gave_up")
        if verdict.kind == "rate_limited":
            # The engine-level cause; the trajectory keeps "program_error" + the LM error type, which
            # reflection already skips as an infrastructure failure. A wait past the whole policy (a used-up
            # quota) is fatal: every later rollout would give up the same way, each scored as a failure.
            outcome = replace(outcome, failure="rate_limited", message=message,
                              fatal=policy.outlasted_by(verdict.retry_after))
            first, self._warned_rate_limited = not self._warned_rate_limited, True  # the event loop's thread
            logger.log(logging.WARNING if first else logging.DEBUG,
                       "A rollout stayed rate limited (%s); scoring it as failed (rate_limited)%s.", why,
                       "; further ones are counted in run_stats['failures'] and logged at DEBUG" if first else "")
        else:
            outcome = replace(outcome, message=message)
        return self._finish(outcome, usage, rl_retries)

    @staticmethod
    def _finish(outcome: EvalOutcome, usage: RolloutUsage, rl_retries: int) -> EvalOutcome:
        return replace(
            outcome,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost=usage.cost,
            lm_calls=usage.calls,
            rate_limit_retries=rl_retries,
            answered_by=frozenset(usage.answered),
        )

    # ------------------------------------------------------------------ LMs and endpoints
    def _context_endpoint(self, lm: Any) -> str:
        """``endpoint_key`` of the configured LM, asked for on every evaluation: kept per LM object."""
        hit = self._context_key
        if hit is None or hit[0] is not lm:
            hit = self._context_key = (lm, endpoint_key(lm))
        return hit[1]

    def _prepare(self, program: dspy.Module) -> tuple[frozenset[str], bool]:
        """Point the built program's per-predictor LMs at our retry-less copies (once per program
        object; the program is our own deep copy) and note which endpoints it uses."""
        hit = self._prepared.get(id(program))
        if hit is not None and hit[0] is program:
            self._prepared.move_to_end(id(program))
            return hit[1], hit[2]
        keys: set[str] = set()
        uses_context = False
        for name, pred in all_named_predictors(program):  # a frozen submodule's LM is the student's too
            try:
                original = self._codec.student_predictor(name).lm
            except KeyError:
                original = getattr(pred, "lm", None)
            if original is None:
                uses_context = True
                continue
            pred.lm = self._copies.get(original)
            keys.add(endpoint_key(original))
        self._prepared[id(program)] = (program, frozenset(keys), uses_context)
        while len(self._prepared) > 256:
            self._prepared.popitem(last=False)
        return frozenset(keys), uses_context

    @staticmethod
    def _keys_of(model: str | None, keys: set[str], endpoint: str | None = None) -> set[str] | None:
        """The endpoints a 429 is charged to: the one whose LM copy raised it, else those of the model the
        error names, else all of them."""
        if len(keys) <= 1:
            return None
        if endpoint in keys:
            return {endpoint}
        if not model:
            return None
        bare = model.rsplit("/", 1)[-1]
        hits = {k for k in keys if endpoint_model(k) == model or endpoint_model(k).rsplit("/", 1)[-1] == bare}
        return hits or None

    def _fatal_for(self, error: BaseException) -> frozenset[str]:
        """The fatal set for ``error``: a refused connection is a restart once the run's endpoints have
        answered, but not from an endpoint that never has (a second LM's wrong port, called only on some
        examples: its every call was retried as a restart and the run ended as "no progress")."""
        if self._fatal is not self._fatal_before_answers:
            endpoint = raised_by_endpoint(error)
            if endpoint is not None and endpoint not in self._answered:
                return self._fatal_before_answers
        return self._fatal

    def _verdict(self, error: BaseException | None) -> Verdict | None:
        if error is None:
            return None
        verdict = classify(error, self._fatal_for(error))
        return verdict if verdict.kind is not None else None

    # ------------------------------------------------------------------ one attempt
    async def _attempt(
        self, program: dspy.Module, names: PredictorNames, example: dspy.Example, example_id: int, split: Split,
        capture: bool, lm: Any,
    ) -> _Attempt:
        loop = asyncio.get_running_loop()
        if not self.use_async:
            ctx = contextvars.copy_context()
            return await loop.run_in_executor(
                self._pool, ctx.run, self._attempt_sync, program, names, example, example_id, split, capture, lm
            )
        with rollout_usage(self._prices, self.usage_noted) as usage:
            pred, raw_trace, error = await self._run_async(program, example, capture, lm)
            raw_trace = self._note_ran(names, raw_trace, capture)
            _attach_usage(pred, usage)
        if error is not None and self._sync_fallback and lacks_async_support(error):
            self._fall_back_to_sync(error)
            return await self._attempt(program, names, example, example_id, split, capture, lm)
        verdict = self._verdict(error)
        if verdict is not None:
            return _Attempt(None, verdict, pred, raw_trace, error, usage)
        ctx = contextvars.copy_context()
        outcome, metric_retries, metric_usage = await loop.run_in_executor(
            self._pool, ctx.run, self._score_tracked, example, example_id, pred, raw_trace, error, names, split,
            capture,
        )
        usage.add(metric_usage)
        return _Attempt(outcome, None, usage=usage, metric_retries=metric_retries)

    def _note_ran(self, names: PredictorNames, trace: list[Any], capture: bool) -> list[Any]:
        """Which components this rollout called (every rollout's trace is recorded by DSPy, captured or
        not); the trace itself is kept only when it is to be captured."""
        if not self._components <= self._ran:  # once every component has run, nothing more to learn
            ran = {name for entry in trace for name in names.names_of(entry[0])}
            if not ran <= self._ran:
                self._ran |= ran  # set.update under the GIL: worker threads may add at once
        return trace if capture else []

    def components_seen_running(self) -> frozenset[str]:
        """The components (predictor names) that some rollout of this compile, whatever its split,
        called where DSPy's trace saw it. A reflection with nothing to read on a component that never
        ran anywhere (the seed's validation included) points at a program that does not call it."""
        return frozenset(self._ran)

    def _fall_back_to_sync(self, error: BaseException) -> None:
        """The program defines ``aforward`` and ``forward``, and one of its LMs has no async support:
        run ``forward`` in threads from now on, as dspy.GEPA does (every rollout would fail otherwise).
        Called on the event loop's thread only."""
        if self.use_async:
            self.use_async = False
            logger.warning("The program defines aforward, but an LM it calls cannot run asynchronously (%s); "
                           "running its forward in worker threads instead, as dspy.GEPA does. Give the LM "
                           "async support (async_engine=, or an aforward) to run it through acall.",
                           describe_error(error))

    def _attempt_sync(
        self, program: dspy.Module, names: PredictorNames, example: dspy.Example, example_id: int, split: Split,
        capture: bool, lm: Any,
    ) -> _Attempt:
        with rollout_usage(self._prices, self.usage_noted) as usage:
            pred, raw_trace, error = self._run_sync(program, example, capture, lm)
            raw_trace = self._note_ran(names, raw_trace, capture)
            _attach_usage(pred, usage)
            verdict = self._verdict(error)
            if verdict is None:
                outcome, metric_retries = self._score(
                    example, example_id, pred, raw_trace, error, names, split, capture
                )
        if verdict is not None:
            return _Attempt(None, verdict, pred, raw_trace, error, usage)
        return _Attempt(outcome, None, usage=usage, metric_retries=metric_retries)

    def _rollout_settings(self, lm: Any) -> dict[str, Any]:
        """What the program runs under: a fresh trace and our retry-less copy of the configured LM; one
        ``dspy.context`` for both (it is entered on every rollout). The metric runs outside it, with the
        user's own settings. The trace is a list even when reflection will not read it: ``dspy.BestOfN``,
        ``dspy.Refine`` and user modules written like them extend ``dspy.settings.trace`` and would
        raise on ``None``."""
        settings: dict[str, Any] = {"trace": [], ROLLOUT_LM_ERRORS: [], ROLLOUT_USAGE: current_rollout_usage(),
                                    ROLLOUT_CLOSED: self._closed_event}
        if lm is not None:
            settings["lm"] = lm
        if not _traces_every_call(dspy.settings.get("max_trace_size")):
            # the user's cap is for their own traces (a server's memory); this list is ours, and a cap of 0
            # left reflection nothing to read: the run stopped as "no rollout called the predictors"
            settings["max_trace_size"] = _DSPY_MAX_TRACE_SIZE
        adapter = dspy.settings.adapter
        copied = self._copies.adapter(adapter)
        if copied is not adapter:  # its LMs are our retry-less copies too
            settings["adapter"] = copied
        return settings

    def _swallowed(self, error: BaseException | None) -> BaseException | None:
        """``error``, or a rate limit / service failure the program caught itself: such a rollout is
        retried or stopped as if it had raised, not scored. Also when the program then raised something
        of its own: ``dspy.Parallel`` that reaches ``max_errors`` raises a bare "Execution cancelled"
        with no cause, and that alone read as the program's failure (scored, shown to reflection, no
        429 retried or counted, a revoked key not fatal). A systemic one among them wins."""
        raised = [error] if error is not None and classify(error, self._fatal_for(error)).service_failure else []
        found = raised + [exc for exc in dspy.settings.get(ROLLOUT_LM_ERRORS) or ()
                          if classify(exc, self._fatal_for(exc)).service_failure]
        if not found:
            return error
        return next((exc for exc in found if classify(exc, self._fatal_for(exc)).fatal), found[0])

    async def _run_async(
        self, program: dspy.Module, example: dspy.Example, capture: bool, lm: Any = None
    ) -> tuple[Any, list[Any], BaseException | None]:
        with dspy.context(**self._rollout_settings(lm)):
            error: BaseException | None = None
            try:
                pred = await program.acall(**example.inputs())
            except asyncio.CancelledError as exc:
                if cancelling():  # the engine cancelled this evaluation (Ctrl-C): not the program's doing
                    raise
                pred, error = None, exc  # the program's own (a cancelled inner task): a failure like any other
            except Exception as exc:  # the user's program failed: retried or scored failure_score  # noqa: BLE001
                pred, error = None, exc
            error = self._swallowed(error)
            if self._sync_fallback and (error is None or not lacks_async_support(error)):
                error = self._unsupported_caught(error)
            trace = list(dspy.settings.trace or [])  # kept past _attempt only when captured
        return pred, trace, error

    @staticmethod
    def _unsupported_caught(error: BaseException | None) -> BaseException | None:
        """An LM's "no async support" that the program caught itself (an ``aforward`` that answers a
        default on any error), in place of ``error``: the fallback to ``forward`` must see it, or every
        rollout is scored on the program's default answer while dspy.GEPA runs ``forward``."""
        noted = dspy.settings.get(ROLLOUT_LM_ERRORS) or ()
        return next((exc for exc in noted if lacks_async_support(exc)), error)

    def _run_sync(
        self, program: dspy.Module, example: dspy.Example, capture: bool, lm: Any = None
    ) -> tuple[Any, list[Any], BaseException | None]:
        with dspy.context(**self._rollout_settings(lm)):
            try:
                pred = program(**example.inputs())
                error: BaseException | None = None
            except USER_CODE_ERRORS as exc:  # the user's program failed: retried or scored failure_score
                pred, error = None, exc
            error = self._swallowed(error)
            trace = list(dspy.settings.trace or [])  # kept past _attempt only when captured
        return pred, trace, error

    # ------------------------------------------------------------------ scoring
    def _score_tracked(self, *args: Any) -> tuple[EvalOutcome, int, RolloutUsage]:
        with rollout_usage(self._prices, self.usage_noted) as usage:
            outcome, retries = self._score(*args)
        return outcome, retries, usage

    def call_metric_for_feedback(self, example: dspy.Example, pred: Any, trace: Any, pred_name: str,
                                 pred_trace: Any, *, stop: threading.Event | None = None) -> Any:
        """The metric's feedback call (``pred_name`` set), for the reflective datasets: under the scoring
        calls' gate and retry policies. Without them a judge LM with ``num_retries=0`` (errors.md's advice)
        lost the example from the reflection at its first 429 (a review: an LLM writing the feedback, down
        for 8 s, ended the search as "no progress"). A judge still rate limited past the policy raises its
        own error, which the reflective dataset records as for any feedback call that raised. ``stop``
        (the reflections' stop: Ctrl-C, a stop callback or file) and the run's end cut a backoff short
        (``EvaluatorClosedError``), as the reflection LM's are: a stop must not wait minutes on a judge.
        Work in flight at a stop still makes its calls (it may finish in the grace period); once the run
        has ended none is made, so the judge is never paid after compile."""
        if self._closed_event.is_set():
            raise EvaluatorClosedError("the run has ended: the metric's feedback call is not made")
        try:
            return self._call_metric(example, pred, trace, pred_name, pred_trace, stop=stop)[0]
        except _JudgeGaveUp as gave_up:
            self._stats.count("rate_limited", "gave_up")
            error = gave_up.error
        raise error  # the judge's own error, as the metric raised it

    def _call_metric(self, example: dspy.Example, pred: Any, trace: Any = None, pred_name: str | None = None,
                     pred_trace: Any = None, stop: threading.Event | None = None) -> tuple[Any, int]:
        """The metric, re-run (in this worker thread) when it fails because its own LM was rate limited or
        failed transiently (a 5xx, a timeout, a dropped connection), under the rollouts' policies: a judge
        LM with ``num_retries=0`` (errors.md's advice, so that these policies bound its waits) would
        otherwise score the candidate ``failure_score`` for one 503. Returns the 429 retries made."""
        retries = {"rate_limited": 0, "transient": 0}
        started = time.monotonic()
        while True:
            try:
                with self.metric_gate, judge_usage_attached():  # not held through a retry's backoff
                    return self._metric(example, pred, trace, pred_name, pred_trace), retries["rate_limited"]
            except USER_CODE_ERRORS as exc:
                verdict = classify(exc, self._fatal_for(exc))
                if verdict.kind is None:
                    raise
                rate_limited = verdict.kind == "rate_limited"
                policy = self._rl_policy if rate_limited else self._tr_policy
                done = retries[verdict.kind]
                if rate_limited:
                    self._stats.add(rate_limited=1)  # every 429 once, as a rollout's (the last one too)
                else:
                    self._stats.add(transient_errors=1)
                delay = policy.delay(done, verdict.retry_after, self._rng, time.monotonic() - started)
                if delay is None:
                    if rate_limited:
                        raise _JudgeGaveUp(exc, verdict, done) from exc
                    self._stats.add(transient_gave_up=1)
                    raise  # scored metric_error, marked as the service's failure (a rerun scores it again)
                if rate_limited:
                    self._stats.add(metric_rate_limit_retries=1, backoff_s=delay)
                else:
                    self._stats.add(metric_transient_retries=1, backoff_s=delay)
                retries[verdict.kind] += 1
                # Woken by close(): the run is over, and the judge must not be called (and paid) again.
                if self._backoff_cut_short(delay, stop):
                    raise EvaluatorClosedError("the run ended while this rollout's metric was backing off; "
                                               "it is not scored") from exc

    def _backoff_cut_short(self, delay: float, stop: threading.Event | None) -> bool:
        """Wait ``delay`` seconds; True as soon as the run ends or ``stop`` is set (polled every 0.1 s: one
        event cannot wait on two)."""
        if stop is None:
            return self._closed_event.wait(delay)
        until = time.monotonic() + delay
        while not stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return False
            if self._closed_event.wait(min(0.1, left)):
                return True
        return True

    def _check_metric_still_works(self, error: BaseException | str) -> None:
        """After a streak of evaluations whose metric raised or returned no usable score (``None``, NaN, a
        string: ``metric_probe_after`` in a row, none scored between them), ask the metric once more about a
        prediction it scored earlier in this run. If it raises there too, or answers no usable score three
        times in a row, the metric broke mid-run (a service it calls gone, state it keeps gone bad):
        every later evaluation would be scored ``failure_score``, every child rejected, and the seed
        returned as if optimized, so the run stops. If it scores it, the failures are the candidates'
        (outputs it cannot take, examples it cannot score) and stay ordinary data, as in dspy.GEPA.
        One metric call per streak (up to three while it answers no usable score; an LLM judge's are
        paid), in this worker thread."""
        sample = self._metric_check.probe_due()
        if sample is None:
            return
        example, pred = sample
        first = error if isinstance(error, str) else _describe(error)
        # a judge that answers nothing usable now and then must not stop a run by chance: no usable score
        # is the verdict only when asked three times, whatever began the streak (a raise: at once)
        invalid: str | None = None
        try:
            for _ in range(3):
                ret, _ = self._call_metric(example, pred)
                invalid = read_metric_return(ret, self._failure_score).invalid
                if invalid is None:
                    break
        except (EvaluatorClosedError, _JudgeGaveUp):
            return  # the run ended, or the judge's LM is rate limited: nothing learned about the metric
        except USER_CODE_ERRORS as probe_error:
            if classify(probe_error, self._fatal_for(probe_error)).service_failure:
                return
            raise SystemicFailureError(
                f"Stopping: the metric broke mid-run: the last {self._metric_check.probe_after} evaluations in a "
                f"row had it fail (first: {first}), and it now raises on a prediction it scored "
                f"earlier in this run ({_describe(probe_error)}): a service it calls is gone, or state it keeps "
                "went bad. Fix it and rerun: this session's failed evaluations are scored again. "
                f"{RESUME_ADVICE}",
                failure="metric_error", error_type=type(probe_error).__name__,
            ) from probe_error
        finally:
            self._metric_check.probed()
        if invalid is not None:
            raise SystemicFailureError(
                f"Stopping: the metric broke mid-run: the last {self._metric_check.probe_after} evaluations in a "
                f"row had it fail (first: {first}), and for a prediction it scored earlier in this run it now "
                f"gives no usable score ({invalid}): a judge or service it calls answers nothing usable any more, "
                f"or state it keeps went bad. Fix it and rerun: this session's failed evaluations are scored "
                f"again. {RESUME_ADVICE}",
                failure="metric_invalid", error_type="metric_invalid",
            )

    def _metric_failed(
        self, example: dspy.Example, example_id: int, pred: Any, steps: list[TraceStep], raw_trace: list[Any],
        split: Split, capture: bool, exc: BaseException, message: str, kind: FailureKind, error_type: str,
        *, service: bool, fatal: bool,
    ) -> EvalOutcome:
        """The outcome of a scoring call that raised: ``failure_score``, the cause, and the trace so far."""
        trajectory = DspyTrajectory(example, pred, steps, raw_trace, message, error_type, kind,
                                    service_failure=service)
        return EvalOutcome(
            example_id, self._failure_score, failure=kind, message=message + _user_frame(exc),
            trajectory=trajectory if capture else None, error_type=error_type, fatal=fatal, service_failure=service,
            output=pred if self._keep_outputs and split == "val" else None,
            service_endpoint=raised_by_endpoint(exc) if service else None,
        )

    def _score(
        self,
        example: dspy.Example,
        example_id: int,
        pred: Any,
        raw_trace: list[Any],
        error: BaseException | None,
        names: PredictorNames,
        split: Split,
        capture: bool,
    ) -> tuple[EvalOutcome, int]:
        if self._closed_event.is_set():  # the run is over: a metric call now (an LLM judge's, paid) would go nowhere
            raise EvaluatorClosedError("the run ended while this rollout was running; it is not scored")
        steps = [
            TraceStep(name, p, dict(inputs), outputs, i)
            for i, (p, inputs, outputs) in enumerate(raw_trace) for name in names.names_of(p)
        ]
        if error is not None:
            types = _error_types(error)
            verdict = classify(error, self._fatal_for(error))
            fatal = verdict.error_type if verdict.fatal else None
            # fatal, a rate limit / transient error whose retries were given up (see _give_up), or an
            # answer the LM stack could not use
            service = verdict.service_failure
            # a parse error behind a service failure (ChatAdapter's JSON fallback call given up on a 503) is
            # the service's: counted as a format error, it pointed the user at the prompt during an outage
            failure: FailureKind = ("format_error" if "AdapterParseError" in types and not service
                                    else "program_error")
            message = _describe(error)
            # the parse error itself, wherever it is in the chain: a program that re-raises it as its own
            # error (or a JSON-mode retry that failed after it) keeps its signature and the model's answer
            parse_error = next((e for e in exception_chain(error) if type(e).__name__ == "AdapterParseError"), error)
            failed_signature = error_attr(parse_error, "signature")
            trajectory = DspyTrajectory(
                example, None, steps, raw_trace, message, fatal or types[0], failure,
                raw_completion=error_attr(parse_error, "lm_response"),
                failed_signature=failed_signature, service_failure=service,
                # by signature when one predictor has it, else by the frame it was raised in (two predictors
                # of one signature: only the traceback tells which failed)
                failed_predictor=(failed_signature is not None and names.signature_owner(failed_signature)
                                  or names.raised_in(error)),
            ) if capture else None
            return EvalOutcome(
                # the hint is the user's, not the reflection LM's (the trajectory keeps the plain message)
                example_id, self._failure_score, failure=failure,
                message=message + _user_frame(error) + _lost_context_hint(error)
                + (_foreign_loop_hint(error) if self.use_async else ""),
                trajectory=trajectory, error_type=fatal or types[0], fatal=fatal is not None, service_failure=service,
                service_endpoint=raised_by_endpoint(error) if service else None,
            ), 0
        if pred is None and self._output_noted.first("returned_none"):
            # Scored as the metric says, as dspy.GEPA does (a program may abstain on purpose), but a forward
            # without its `return` scores 0 everywhere while every predictor runs fine: nothing else says so.
            logger.warning("The program returned None (on %s example %d): the metric is called with pred=None, "
                           "as dspy.GEPA calls it. If forward has no `return`, every example scores like this and "
                           "no instruction can fix it.", split, example_id)
        try:
            ret, retries = self._call_metric(example, pred)
        except EvaluatorClosedError:  # the run ended during the metric's backoff: not the metric's failure
            raise
        except _JudgeGaveUp as gave_up:
            # The judge's LM stayed rate limited past the policy: the service's failure, as a rollout's would
            # be (reflection skips it, a rerun scores it again), and a wait past the whole policy (a used-up
            # quota) stops the run at once, with the quota advice, instead of after a window of metric errors.
            exc, error_type = gave_up.error, gave_up.verdict.error_type or type(gave_up.error).__name__
            self._stats.count("rate_limited", "gave_up")
            message = f"The metric's LM stayed rate limited; gave up: {_describe(exc)}"
            return self._metric_failed(example, example_id, pred, steps, raw_trace, split, capture, exc,
                                       message, "rate_limited", error_type, service=True,
                                       fatal=self._rl_policy.outlasted_by(gave_up.verdict.retry_after)), gave_up.retries
        except USER_CODE_ERRORS as exc:  # the user's metric failed: recorded and scored failure_score
            # An LLM-judge metric's own LM can fail the way the student's does: a bad key or an unknown
            # model there stops the run at once too, not after a window of failed evaluations.
            verdict = classify(exc, self._fatal_for(exc))
            fatal = verdict.error_type if verdict.fatal else None
            if fatal is None and not verdict.service_failure:
                self._check_metric_still_works(exc)
            return self._metric_failed(example, example_id, pred, steps, raw_trace, split, capture, exc,
                                       f"The metric raised {_describe(exc)}", "metric_error",
                                       fatal or type(exc).__name__, service=verdict.service_failure,
                                       fatal=fatal is not None), 0
        reading = read_metric_return(ret, self._failure_score)
        if reading.invalid is None:
            self._metric_check.scored(example, pred)
        else:  # part of a streak as an exception is: a judge that starts answering None has broken too
            self._check_metric_still_works(reading.invalid)
        trajectory = DspyTrajectory(example, pred, steps, raw_trace, metric_return=ret) if capture else None
        if reading.invalid is not None:
            if trajectory is not None:
                trajectory.failure, trajectory.error = "metric_invalid", reading.invalid
            return EvalOutcome(
                example_id, self._failure_score, failure="metric_invalid", message=reading.invalid,
                trajectory=trajectory, output=pred if self._keep_outputs and split == "val" else None,
            ), retries
        return EvalOutcome(
            example_id,
            reading.score,
            objective_scores=reading.objective_scores,
            trajectory=trajectory,
            output=pred if self._keep_outputs and split == "val" else None,
        ), retries


class _MetricBreakCheck:
    """The evaluations in a row whose metric raised or gave no usable score, and the last prediction it
    scored (the probe's sample); shared by the worker threads."""

    def __init__(self, probe_after: int) -> None:
        self.probe_after = probe_after
        self._lock = threading.Lock()
        self._streak = 0
        self._sample: tuple[dspy.Example, Any] | None = None
        self._probing = False

    def scored(self, example: dspy.Example, pred: Any) -> None:
        with self._lock:
            self._streak = 0
            self._sample = (example, pred)

    def probe_due(self) -> tuple[dspy.Example, Any] | None:
        """Count one more error; the sample to probe with when the streak is long enough (one probe at a time)."""
        with self._lock:
            self._streak += 1
            if self._streak < self.probe_after or self._probing or self._sample is None:
                return None
            self._probing = True
            return self._sample

    def probed(self) -> None:
        with self._lock:
            self._probing = False
            self._streak = 0


class _JudgeGaveUp(Exception):
    """The metric's own LM stayed rate limited past the retry policy (``_call_metric``): its last error, the
    verdict on it and the retries made, which the outcome reports as a rollout's would."""

    def __init__(self, error: BaseException, verdict: Verdict, retries: int) -> None:
        super().__init__(str(error))
        self.error, self.verdict, self.retries = error, verdict, retries


def _attach_usage(pred: Any, usage: RolloutUsage) -> None:
    """With ``dspy.configure(track_usage=True)``, DSPy attaches usage to the prediction, but only when no
    tracker is active; ours is, so attach it ourselves (a metric may read ``pred.get_lm_usage()``)."""
    if usage.tracker is None or not dspy.settings.track_usage:
        return
    if isinstance(pred, dspy.Prediction) and pred.get_lm_usage() is None:
        pred.set_lm_usage(usage.tracker.get_total_tokens())
