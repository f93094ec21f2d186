"""Reflective mutation: build each component's reflective dataset, then ask the proposer for new texts.

The proposer is any dspy.GEPA ``ProposalFn`` — by default dspy's own
``dspy.teleprompt.gepa.InstructionProposer``, used through import so the reflection prompt is exactly
dspy.GEPA's. It runs in a worker thread (proposers are synchronous DSPy code) under
``dspy.context(lm=reflection_lm)``, as dspy.GEPA runs it. A proposer that raises or answers with
nothing usable is recorded and skipped; it never ends the run.

A prompt the reflection LM refuses as longer than its context window is asked again with fewer
examples (``context_fit.py``). dspy's own proposer (or a subclass that keeps its ``__call__``; one
that overrides it may rewrite the predictors together) is asked one predictor at a time, as it asks
the LM anyway, so a refusal or a 429 for one predictor neither repeats nor shortens another's call;
a custom proposer is asked with every predictor at once, as always, and what fits is learned for the
call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dspy
from dspy.teleprompt.gepa.instruction_proposal import InstructionProposer
from dspy.utils.callback import BaseCallback

from dspy_turbogepa.adapter.lm_copies import LMCopies, rollout_usage
from dspy_turbogepa.adapter.program import valid_unicode
from dspy_turbogepa.adapter.ratelimit import (
    FATAL_ERROR_TYPES,
    FATAL_ONCE_ANSWERED,
    RATE_LIMIT_POLICY,
    TRANSIENT_POLICY,
    RateLimitStats,
    RateLimitWaits,
    RetryPolicy,
    classify,
    context_window_exceeded,
    fatal_error_name,
)
from dspy_turbogepa.adapter.reflective import FeedbackMetricError, ReflectiveDatasetBuilder
from dspy_turbogepa.engine.errors import USER_CODE_ERRORS
from dspy_turbogepa.engine.types import NOTHING_TO_REFLECT_ON, EvalOutcome, ProposalOutcome
from dspy_turbogepa.log_once import FirstOfKind
from dspy_turbogepa.proposers.context_fit import ContextFit, Example, example_size, plan
from dspy_turbogepa.redaction import describe_error, describe_traceback, error_text
from dspy_turbogepa.workers import DaemonThreadPool

logger = logging.getLogger(__name__)


class _LMCallCounter(BaseCallback):
    """Counts the LM calls answered while one proposal runs (installed per call through dspy.context).
    A refused request (a 429 asked again, a timeout, a prompt over the context window) is not counted:
    ``task_lm_calls`` counts the program's answered calls, and both are read side by side."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        if exception is not None:
            return
        with self._lock:
            self.calls += 1


class ReflectiveProposer:
    """Implements the engine's ``Reflector`` protocol."""

    def __init__(
        self,
        builder: ReflectiveDatasetBuilder,
        proposal_fn: Callable[..., Any],
        reflection_lm: dspy.LM | None,
        max_workers: int,
        price_table: Mapping[str, tuple[float, float]] | None = None,
        rate_limit_policy: RetryPolicy = RATE_LIMIT_POLICY,
        seed: int | None = 0,
        transient_policy: RetryPolicy = TRANSIENT_POLICY,
        components_seen_running: Callable[[], frozenset[str]] | None = None,
        perfect_score: float | None = None,
        usage_noted: FirstOfKind | None = None,
    ) -> None:
        """``usage_noted``: the compile's note of the models already named as answering without token
        usage (the evaluator's: a model that is also the task LM is named once).

        ``components_seen_running``: the components some rollout of the run called so far (the
        evaluator's); with it, a proposal with nothing to read on components that never ran anywhere
        says so (``ProposalOutcome.not_run``), which stops a run whose program does not call them.

        ``rate_limit_policy`` / ``transient_policy``: a proposal that fails with a rate limit (or a
        timeout, a 5xx, a dropped connection) is asked again after Retry-After / backoff, as a rollout is,
        instead of counting as a failed reflection: a short burst of 429s must not stop the run as
        "systemic". DSPy's own retries are off on our copy of the reflection LM: they sleep whatever
        Retry-After says (a day, for a used-up quota), where no wait may outlast the policy.

        ``perfect_score``: the metric's (None: unknown); under a tight context window the example every
        reflection shows is a failure, an example below it."""
        self._builder = builder
        self._seen_running = components_seen_running
        self._rl_policy = rate_limit_policy
        self._tr_policy = transient_policy
        #: Set when the run stops (or this proposer closes): a rate-limit backoff ends at once, so no
        #: reflection thread outlives compile() and calls the LM after it returned.
        self._stopping = threading.Event()
        #: Set when compile() is done with this proposer: a reflection still on the wire may fail after
        #: that (its server gone), and nothing it says reaches the run any more.
        self._closed = threading.Event()
        self._rng = random.Random(f"reflection-backoff:{seed}")
        self._rl_stats = RateLimitStats()
        self._rl_waits = RateLimitWaits()
        self._prices = dict(price_table or {})  # the same table the program's calls are priced with
        self._proposal_fn = proposal_fn
        self._reflection_lm = reflection_lm
        self._pool = DaemonThreadPool(max_workers=max_workers, thread_name_prefix="turbogepa-reflect")
        self._lm_copies = LMCopies()
        self._fatal = FATAL_ERROR_TYPES
        #: error types already reported at WARNING (a failing reflection LM fails the same way each time)
        self._reported_errors = FirstOfKind()
        self._usage_noted = usage_noted if usage_noted is not None else FirstOfKind()
        #: what the reflection LM's context window was seen to hold, per predictor
        self._fit = ContextFit()
        self._perfect = perfect_score
        #: dspy's own proposer asks the LM once per predictor, independently: it can be asked one at a time
        #: (so may a subclass that keeps its __call__; one that overrides it may rewrite the predictors together)
        self._per_component = getattr(type(proposal_fn), "__call__", None) is InstructionProposer.__call__

    def stop(self) -> None:
        """The run is stopping: reflections waiting out a rate limit give up (recorded as skipped), and so do
        the metric's feedback calls backing off."""
        self._stopping.set()
        stop_feedback = getattr(self._builder, "stop", None)  # a builder of another kind may have none
        if callable(stop_feedback):
            stop_feedback()

    def close(self) -> None:
        self._closed.set()
        self.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def skipped_records(self) -> dict[str, int]:
        """Traced examples the reflective datasets left out so far, by reason (``context_window``: left
        out of a reflection to fit the reflection LM's context window)."""
        counts = self._builder.skipped_counts()
        if self._fit.left_out:
            counts["context_window"] = self._fit.left_out
        return counts

    def feedback_calls(self) -> int:
        """The metric's feedback calls (``pred_name`` set) this session's reflections made: paid calls
        with an LLM-judge metric, and not metric calls of the budget (as in dspy.GEPA)."""
        return self._builder.feedback_call_count()

    def rate_limit_stats(self) -> dict[str, Any]:
        """The reflection LM's 429s and transient failures (timeouts, 5xx, dropped connections): seen,
        our retries, give-ups, and the backoff slept (DSPy's own retries are off on our copy of it)."""
        snap = self._rl_stats.snapshot()
        return {k: snap[k] for k in ("rate_limited", "rate_limit_retries", "rate_limit_gave_up", "transient_errors",
                                     "transient_retries", "transient_gave_up", "backoff_seconds")}

    def paused_seconds(self) -> float:
        """Seconds left of the longest rate-limit wait a reflection is in (Retry-After, else backoff):
        what the progress line shows as the reflections' pause."""
        return self._rl_waits.remaining()

    async def reflect(
        self, parent_texts: Mapping[str, str], components: Sequence[str], outcomes: Sequence[EvalOutcome], seed: int
    ) -> ProposalOutcome:
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, ctx.run, self._reflect_sync, dict(parent_texts), list(components), list(outcomes), seed
        )

    def _reflect_sync(
        self, parent_texts: dict[str, str], components: list[str], outcomes: list[EvalOutcome], seed: int
    ) -> ProposalOutcome:
        # The reflective dataset is built outside the reflection LM's context, as dspy.GEPA builds it: the
        # metric's feedback call (an LLM judge inside the metric) runs on the user's own LM settings. Its
        # tokens and cost still count toward the reflection's (token and dollar budgets must see them);
        # its calls are not reflection LM calls.
        with rollout_usage(self._prices, self._usage_noted) as judge:
            dataset = self._dataset(parent_texts, components, outcomes, random.Random(seed))
        if isinstance(dataset, ProposalOutcome):
            return dataclasses.replace(
                dataset, reflection_prompt_tokens=judge.prompt_tokens,
                reflection_completion_tokens=judge.completion_tokens, reflection_cost=judge.cost,
            )
        counter = _LMCallCounter()
        callbacks = [*dspy.settings.get("callbacks", []), counter]
        # Our copy of the reflection LM shares its history (and retries) but reports each call's cost,
        # which DSPy keeps only in history entries, to the usage box: cost_budget_usd counts reflections.
        lm = self._lm_copies.get(self._reflection_lm or dspy.settings.lm)
        with dspy.context(lm=lm, callbacks=callbacks), rollout_usage(self._prices, self._usage_noted) as usage:
            # every selected component, as dspy.GEPA asks (a custom proposer may rewrite one that has no
            # traces in this minibatch from other context; dspy's own proposer skips those itself)
            outcome = self._propose(parent_texts, dataset, [o.score for o in outcomes], list(components))
        # every return path, a proposer that raised after paying for calls included, carries its usage
        return dataclasses.replace(
            outcome, reflection_calls=counter.calls,
            reflection_prompt_tokens=usage.prompt_tokens + judge.prompt_tokens,
            reflection_completion_tokens=usage.completion_tokens + judge.completion_tokens,
            reflection_cost=usage.cost + judge.cost,
        )

    def _dataset(
        self, parent_texts: Mapping[str, str], components: list[str], outcomes: list[EvalOutcome], rng: random.Random
    ) -> dict[str, list[tuple[int, Any]]] | ProposalOutcome:
        """The reflective dataset (each record with its outcome's position), or the skipped proposal that
        says why there is none."""
        try:
            dataset = self._builder.build_indexed(
                components, [o.trajectory for o in outcomes], [o.score for o in outcomes], rng, parent_texts
            )
        except FeedbackMetricError as exc:
            return ProposalOutcome(skipped="feedback_error", message=error_text(exc), error_type=exc.error_type,
                                   fatal=exc.fatal)
        except Exception as exc:  # noqa: BLE001 - defensive: a broken trace must not end the run (logged)
            message = describe_error(exc)
            logger.warning("Building the reflective dataset failed: %s", message)
            logger.debug("Building the reflective dataset failed:\n%s", describe_traceback(exc))
            return ProposalOutcome(skipped="reflective_dataset_error", message=message)
        if not any(c in dataset for c in components):
            # not run: in no rollout read here (one that ran to the end), nor in any rollout of the run so far,
            # the seed's validation included (a cascade that calls its LM on a few examples only is fine)
            finished = [o.trajectory for o in outcomes if o.trajectory is not None and o.trajectory.error is None]
            not_run = (self._seen_running is not None and bool(finished)
                       and not any(step.pred_name in components for t in finished for step in t.steps)
                       and not set(components) & self._seen_running())
            return ProposalOutcome(skipped=NOTHING_TO_REFLECT_ON, message="no usable trace records for "
                                   + ", ".join(components), not_run=not_run)
        return dataset

    def _propose(
        self, parent_texts: dict[str, str], dataset: dict[str, list[tuple[int, Any]]], scores: list[float],
        to_update: list[str],
    ) -> ProposalOutcome:
        """Ask the proposer, in units whose prompts are refused or fit together; any other failure of a unit
        fails the whole proposal, as dspy.GEPA's does."""
        units = [[name] for name in to_update if name in dataset] if self._per_component else [to_update]
        retries = _Retries()  # one retry policy for the whole proposal, however many calls it takes
        texts: dict[str, str] = {}
        for unit in units:
            answer = self._ask_fitting(parent_texts, dataset, scores, unit, retries)
            if isinstance(answer, ProposalOutcome):
                return answer
            read = _as_mapping(answer)  # read once: a generator's answer is gone after one read
            if isinstance(read, str):
                return self._unusable(ProposalOutcome(skipped="invalid_proposal", message=read))
            texts.update(read)
        outcome = self._unusable(_validate_answer(texts, parent_texts))
        if outcome.skipped is None:
            self._fatal = FATAL_ONCE_ANSWERED  # a refused connection from now on is a restart
        return outcome

    def _unusable(self, outcome: ProposalOutcome) -> ProposalOutcome:
        """``outcome``, its unusable answer (or the parts of one that were dropped) said at WARNING the
        first time of each kind, later ones at DEBUG. Why: they were said at DEBUG only (or, for dropped
        parts, at WARNING on every proposal), so a proposer answering ``None`` on every other call wasted
        half the paid reflections with nothing shown; dspy.GEPA logs each at INFO."""
        if not outcome.message:
            return outcome
        kind = outcome.skipped or "ignored_parts"
        if self._reported_errors.first(("unusable", kind)) and not self._closed.is_set():
            if outcome.skipped:
                logger.warning("The instruction proposer's answer is unusable: %s (this proposal is skipped; "
                               "further ones are counted in run_stats['proposal_skips'][%r] and logged at "
                               "DEBUG)", outcome.message, kind)
            else:
                logger.warning("Ignoring parts of a proposal: %s (the rest is used; further ones are logged at "
                               "DEBUG)", outcome.message)
        else:
            logger.debug("Unusable proposal (%s): %s", kind, outcome.message)
        return outcome

    def _ask_fitting(
        self, parent_texts: dict[str, str], dataset: dict[str, list[tuple[int, Any]]], scores: list[float],
        unit: list[str], retries: _Retries,
    ) -> Any:
        """The proposer's answer for ``unit``, or the skipped proposal. A prompt refused as longer than the
        reflection LM's context window is asked again with fewer examples (``context_fit.py``)."""
        names = [name for name in unit if name in dataset]
        key = tuple(unit)  # the predictors asked, whether or not this minibatch gave each examples
        instructions = {name: len(parent_texts.get(name, "")) for name in unit}
        examples = {name: [Example(scores[pos], example_size(record)) for pos, record in dataset[name]]
                    for name in names}
        refused: _Refused | None = None
        # This reflection's own bisection: the smallest size refused in it, and what was known to fit when
        # it was first refused (dropped once not below that). Each retry asks at most their midpoint, so
        # the gap halves however what other reflections learn meanwhile moves the shared sizes.
        cap: int | None = None
        floor = 0
        while True:
            budget = self._fit.budget(key)
            if cap is not None:
                budget = (floor + cap) // 2 if budget is None else min(budget, (floor + cap) // 2)
            shown = plan(instructions, examples, budget, self._perfect)
            size = sum(instructions.values()) + sum(examples[name][i].size for name, picked in shown.items()
                                                    for i in picked)
            if refused is not None and cap is not None and size >= cap:  # the smallest prompt was refused
                return self._too_long(refused, shown)
            answer = self._ask(parent_texts, {name: [dataset[name][i][1] for i in picked]
                                              for name, picked in shown.items()}, unit, retries)
            if not isinstance(answer, _Refused):
                if not isinstance(answer, ProposalOutcome):
                    self._fit.fitted(key, size)
                self._fit.count_left_out(sum(len(dataset[name]) - len(picked) for name, picked in shown.items()))
                return answer
            self._fit.refused(key, size)
            if refused is None:  # what was known to fit when this reflection was first refused
                floor = self._fit.known_fit(key)
            refused, cap = answer, size if cap is None else min(cap, size)
            if floor >= cap:  # not below what this reflection saw refused: no floor after all
                floor = 0
            if self._stopping.is_set():  # the run is over: no more calls
                return self._too_long(refused, shown, stopped=True)
            logger.log(logging.WARNING if self._reported_errors.first(f"{_REFUSED}:{key}") else logging.DEBUG,
                       "The reflection LM refused a reflection on %s as longer than its context window (%s); asking "
                       "again with fewer examples (failures first). Later reflections on it start from what fits; "
                       "a reflection_lm with a longer context window lets them read more.",
                       _describe_shown(shown), refused.message)

    def _too_long(self, refused: _Refused, shown: Mapping[str, list[int]], stopped: bool = False) -> ProposalOutcome:
        message = (f"{refused.message}; the run stopped before a shorter reflection was asked" if stopped else
                   f"{refused.message}; even {_describe_shown(shown)} is longer than the reflection LM's context "
                   "window. Use a reflection_lm with a longer context window, shorten what the traces carry (the "
                   "inputs and outputs of each predictor call), or lower the reflection LM's max_tokens if the "
                   "provider counts it in the window")
        first = self._reported_errors.first(_REFUSED)
        logger.log(logging.WARNING if first and not stopped else logging.DEBUG, "A proposal is skipped: %s", message)
        return ProposalOutcome(skipped="proposer_error", message=message, error_type=refused.error_type)

    def _ask(self, parent_texts: dict[str, str], dataset: dict[str, Any], to_update: list[str],
             retries: _Retries) -> Any:
        """The proposer's raw answer, or the skipped proposal, or ``_Refused`` (the prompt is too long).
        Rate limits and transient failures are asked again here, within the proposal's retry policy."""
        while True:
            try:
                answer = self._proposal_fn(
                    candidate=dict(parent_texts), reflective_dataset=dataset, components_to_update=to_update
                )
                if inspect.isawaitable(answer):
                    answer = asyncio.run(_await(answer))
                return answer
            except USER_CODE_ERRORS as exc:
                if context_window_exceeded(exc):  # a shorter prompt may fit: _ask_fitting decides
                    # the first line: lm15 appends a "To fix:" list for humans, which the logs repeat
                    return _Refused(describe_error(exc).split("\n", 1)[0].strip(), type(exc).__name__)
                verdict = classify(exc, self._fatal)
                kind = verdict.kind
                if kind is None:
                    return self._failed(exc)
                policy = self._rl_policy if kind == "rate_limited" else self._tr_policy
                self._rl_stats.count(kind, "seen")
                delay = None if self._stopping.is_set() else policy.delay(
                    retries.done[kind], verdict.retry_after, self._rng, retries.elapsed(kind))
                if delay is None:
                    self._rl_stats.count(kind, "gave_up")
                    # a wait past the whole policy (a used-up quota) stops the run: every reflection would fail
                    return self._failed(exc, quota=kind == "rate_limited" and policy.outlasted_by(verdict.retry_after),
                                        service=not self._stopping.is_set())
                # one INFO line per kind of error (the progress line shows the pause), the rest at DEBUG
                first = self._reported_errors.first(("retry", kind, verdict.error_type))
                logger.log(logging.INFO if first else logging.DEBUG, "The reflection LM is %s; asking again in "
                           "%.1fs%s", "rate limited" if kind == "rate_limited"
                           else f"failing transiently ({verdict.error_type})", delay,
                           "; further retries after this error are logged at DEBUG" if first else "")
                self._rl_stats.count(kind, "retry", backoff_s=delay)
                retries.done[kind] += 1
                with self._rl_waits.waiting(delay) if kind == "rate_limited" else contextlib.nullcontext():
                    stopped = self._stopping.wait(delay)
                if stopped:  # the run stopped while we waited: do not call the LM again
                    self._rl_stats.count(kind, "gave_up")
                    return self._failed(exc)

    def _failed(self, exc: BaseException, quota: bool = False, service: bool = False) -> ProposalOutcome:
        """The proposer's failure, recorded; this proposal is skipped. ``quota``: the reflection LM asked
        for a wait past the retry policy, which stops the run; ``service``: its retries were given up (the
        service's failure, which a streak of makes an outage)."""
        message = describe_error(exc)
        fatal = fatal_error_name(exc, self._fatal)
        # a fatal one stops the run, and its error says so: no "skipped, counted" line; nor for a call that
        # fails once compile() is done with this proposer (its server may be gone by now)
        if fatal is None and not quota and not self._closed.is_set() \
                and self._reported_errors.first(type(exc).__name__):
            logger.warning("The instruction proposer raised %s (this proposal is skipped; further %s failures are "
                           "counted in run_stats['proposal_skips'] and logged at DEBUG)", message, type(exc).__name__)
        else:
            logger.debug("The instruction proposer raised %s", message)
        return ProposalOutcome(skipped="proposer_error", message=message, fatal=fatal is not None or quota,
                               error_type=fatal or type(exc).__name__, rate_limited=quota, service_failure=service)


@dataclasses.dataclass
class _Retries:
    """A proposal's retries so far and when each kind first failed: the retry policies bound the
    proposal, not each of its calls (dspy's own proposer is asked one predictor at a time). Their time
    runs from the kind's first failure, as a rollout's does: counted from the proposal's start, a
    reflection call that took 2 minutes and then timed out was never asked again."""

    done: dict[str, int] = dataclasses.field(default_factory=lambda: {"rate_limited": 0, "transient": 0})
    first_failed: dict[str, float] = dataclasses.field(default_factory=dict)

    def elapsed(self, kind: str) -> float:
        """Seconds since ``kind`` first failed in this proposal (0 at its first failure)."""
        now = time.monotonic()
        return now - self.first_failed.setdefault(kind, now)


@dataclasses.dataclass(frozen=True)
class _Refused:
    """The reflection LM refused the prompt as longer than its context window."""

    message: str
    error_type: str


#: the key of the first refusal's WARNING (later ones at DEBUG)
_REFUSED = "context_window"


def _describe_shown(shown: Mapping[str, list[int]]) -> str:
    return ", ".join(f"{len(picked)} example{'s' if len(picked) != 1 else ''} of {name!r}"
                     for name, picked in shown.items())


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _as_mapping(answer: Any) -> Mapping[Any, Any] | str:
    """The answer as a mapping, if dspy.GEPA could apply it; else what is wrong with it (the proposal is
    skipped as ``invalid_proposal`` with that message). dspy.GEPA applies a proposer's answer with
    ``dict.update``, which takes an object with ``keys()`` and item access (a proposer written as a
    ``dspy.Module`` naturally returns a ``dspy.Prediction(**{name: text})``) or an iterable of pairs (a
    list of them, a pydantic model)."""
    if isinstance(answer, Mapping):
        return answer
    expected = f"the proposer returned {type(answer).__name__}, expected dict[str, str]"
    if answer is None or isinstance(answer, (str, bytes)):
        return expected
    try:
        keys = getattr(answer, "keys", None)
        return {k: answer[k] for k in keys()} if callable(keys) else dict(answer)
    except Exception as exc:  # noqa: BLE001 - the user's object would not read as texts: said, not raised
        return f"{expected} ({describe_error(exc)})"


def _validate_answer(answer: Any, parent: Mapping[str, str]) -> ProposalOutcome:
    """Texts for components the proposer was not asked about are kept, as dspy.GEPA applies them.

    A text is kept as DSPy will read it (``Signature.instructions`` is ``inspect.cleandoc`` of it): a
    parent's text with a newline added, or indented, builds the parent's program again, and was paid for
    as a new candidate instead of being seen as an echo."""
    mapping = _as_mapping(answer)
    if isinstance(mapping, str):
        return ProposalOutcome(skipped="invalid_proposal", message=mapping)
    texts: dict[str, str] = {}
    problems: list[str] = []
    for name, text in mapping.items():
        if name not in parent:
            problems.append(f"unknown component {name!r}")
        elif not isinstance(text, str):
            problems.append(f"no usable instruction for {name!r} (a {type(text).__name__}, expected str)")
        elif not text.strip():
            problems.append(f"no usable instruction for {name!r} (blank text)")
        elif not valid_unicode(text):  # a lone surrogate (a cut "\ud83d" escape): no program can be built with it
            problems.append(f"no usable instruction for {name!r} (not valid Unicode: a lone surrogate)")
        else:
            cleaned = inspect.cleandoc(text)
            texts[name] = parent[name] if cleaned == inspect.cleandoc(parent[name]) else cleaned
    if not texts:
        return ProposalOutcome(
            skipped="empty_proposal", message="; ".join(problems) or "the proposer returned no text",
        )
    return ProposalOutcome(texts=texts, message="; ".join(problems) or None)
