"""Detecting failures that make a whole run pointless, before the budget is burnt on them.

Two signals: a failure the evaluator marks ``fatal`` (one that can never succeed on retry:
authentication, unknown model, refused connection) stops the run at its first occurrence; and if the
first ``window`` executed evaluations of a split all fail, whatever the cause, the run stops too,
naming the most common cause. Once an evaluation of a split has succeeded, isolated failures there are
ordinary data (scored ``failure_score``), as in dspy.GEPA.

The rule is per split because the splits are separate data: a trainset whose examples the program
cannot take (``with_inputs`` naming the label, a field the valset does not have) fails every training
rollout while the seed's validation pass succeeds. Judged together, that success would hide the broken
trainset, and the run would pay a reflection for every failed minibatch, then return the seed.

One cause is given a chance first: output that does not parse (``format_error``) is what a weak seed
instruction often produces and what reflection is shown and can fix (dspy.GEPA's
``add_format_failure_as_feedback`` exists for it). While every failure seen is a format error, the run
stops only once candidates reflected from them failed too (``FORMAT_ERROR_CANDIDATES`` in all,
the seed included), not on the seed's validation alone.

A third rule covers an LM service that stops answering mid-run (an outage, a quota used up): once
``outage_window`` evaluations in a row failed because the service did (``service_failure``: its
retries given up, or an answer it could not use; in a row per endpoint, when the evaluator says which
failed and which answered), over at least ``OUTAGE_MIN_SECONDS`` (two waves of
given-up retries take only ~15 s: a blip that long must not end a long run), the run stops, whatever
succeeded before; and so does a run that ends on its own (budget, no progress) while a streak twice
that long is open, however short in time (unusable answers fail in milliseconds and outran the two
minutes). Scored as ``failure_score`` they would be wrong data: children rejected for the service's
failures, reflections paid for candidates nobody can evaluate. The failed evaluations are run again on
resume.

Reflections get the same rules: a fatal proposer failure stops the run, and so do ``window``
failed reflections before the first usable one (a reflection LM that never answers usefully would
otherwise be called until the no-progress limit, returning the seed as if optimized); and, whatever
succeeded before, ``proposal_window`` reflections in a row whose retries on the reflection LM's 429s
or transient errors were given up, over at least ``OUTAGE_MIN_SECONDS``, with none it answered between
them (the reflection LM's outage: the run would otherwise spin on skipped proposals until the
no-progress limit and return as if it had finished). And ``proposal_window`` reflections before the
first usable one that had nothing to read because the program never called the components they were to
improve, in any rollout of the run (``ProposalOutcome.not_run``, which the proposer sets): a program
that does not call its predictors would otherwise skip every mutation until the no-progress limit.
After a usable reflection, failed ones are ordinary skips (a flaky proposer, a proposer that answers
nothing when it sees nothing to fix), but their streak is kept (:meth:`proposer_failure_streak`): when
the run ends on the no-progress limit with every reflection since the streak began failing, the
orchestrator says that the proposer stopped working instead of blaming perfect parents. One streak
stops the run instead: ``proposal_window`` reflections in a row, after usable ones, where the metric
raised on every feedback call, once its scoring calls have raised too since the last usable one
and none has scored since.
That is the metric broken mid-run (a service it calls gone), which its feedback calls show before
its scoring calls can (a mutation's minibatch is often served from the cache, so few scoring calls
are made); ended as "no progress", the run kept those scoring failures as data, and a rerun replayed
them. Feedback calls failing alone (a judge's blip, a bug in the feedback path) stay ordinary skips:
there is nothing to score again, and stopping would lose the program.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from dspy_turbogepa.engine.errors import SystemicFailureError
from dspy_turbogepa.engine.types import NOTHING_TO_REFLECT_ON, EvalOutcome, ProposalOutcome

#: At most this many failed reflections before the first usable one (fewer with a smaller window):
#: each is a reflection LM call, and a working reflection LM rarely fails even twice in a row.
MAX_PROPOSAL_WINDOW = 8

#: The outage rule's shortest streak, in seconds: the transient retry policy's own patience (a rollout
#: retries a 5xx for up to 2 minutes), so that an outage it would outwait never ends the run.
OUTAGE_MIN_SECONDS = 120.0

#: Candidates (the seed included) that must all fail to parse before format errors alone stop a run.
FORMAT_ERROR_CANDIDATES = 3

#: Skip reasons that mean the proposer itself failed (not "nothing to reflect on").
PROPOSER_FAILURES = frozenset({
    "proposer_error", "invalid_proposal", "empty_proposal", "reflective_dataset_error", "feedback_error",
    "unchanged_texts", "selector_error",
})


_PROPOSER_HINT = "Check reflection_lm (or instruction_proposer) and run again."
#: For a Retry-After past the retry policy: a quota used up until it resets.
#: The advice to resume, in every message that gives it: the compile swaps it for :data:`NO_STORE_ADVICE`
#: when the run had no log_dir (nothing was kept).
RESUME_ADVICE = "Finished evaluations are kept: rerun with the same log_dir (they are not paid again)."
NO_STORE_ADVICE = ("This run had no log_dir, so nothing was kept: set log_dir=... for the rerun, and a later rerun "
                   "with it will not pay again for what finished.")
QUOTA_HINT = ("Its quota is likely used up (or, on a 503 or 529, the service is down for maintenance) until the time "
              f"the server gave: rerun after that, or use another key or endpoint. {RESUME_ADVICE}")
_PROPOSER_HINTS = {
    "feedback_error": "Check what the metric does when called with pred_name (the feedback call) and run again.",
    "selector_error": "Check component_selector: it must return names of the program's predictors (it receives "
                      "a SelectorState, which holds part of gepa's GEPAState; the error names what it has).",
}


_SPLIT_NAMES = {"train": "trainset", "val": "valset"}


@dataclass
class _SplitWindow:
    """The first-N rule's account for one split, until its first success."""

    seen_success: bool = False
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[tuple[str, str], str] = field(default_factory=dict)
    count: int = 0
    failed_ids: set[int] = field(default_factory=set)
    candidates: set[str] = field(default_factory=set)
    #: Of ``count``, the failures that were the LM service's (``EvalOutcome.service_failure``).
    service: int = 0
    #: Executions of the split started so far (for a split judged in order, outcomes read), and which
    #: of the first ``window`` started are still running: the verdict waits for them (see
    #: :meth:`SystemicFailureDetector.launched`).
    launches: int = 0
    early_running: set[int] = field(default_factory=set)
    #: A success started after the first N that answered while some of them still ran: it does not decide
    #: their verdict, but once they have all answered it counts as the split's success (``_settle``).
    late_success: bool = False


@dataclass
class _Streak:
    """An outage rule's account: failures in a row of the service, by cause, since when, and the first."""

    causes: Counter[tuple[str, str]] = field(default_factory=Counter)
    since: float = 0.0
    first: str = ""

    @property
    def count(self) -> int:
        return sum(self.causes.values())

    def extend(self, cause: tuple[str, str], message: str | None, now: float) -> float:
        """One more failure; the seconds the streak has lasted."""
        if not self.causes:
            self.since, self.first = now, message or ""
        self.causes[cause] += 1
        return now - self.since


class SystemicFailureDetector:
    def __init__(self, window: int, proposal_window: int | None = None,
                 split_sizes: Mapping[str, int] | None = None,
                 expected_failures: Mapping[str, Collection[int]] | None = None,
                 outage_window: int | None = None, clock: Callable[[], float] = time.monotonic,
                 outage_min_seconds: float | None = None) -> None:
        """``split_sizes``: the distinct examples of each split. A split smaller than ``window`` is
        judged once every one of its examples has failed (4 training examples whose failures give
        reflection nothing to read are never evaluated 8 times). ``expected_failures``: per split, the
        examples known before the run to fail (their inputs cannot reach the program; the user was
        warned): their failures say nothing about the setup, so they never fill the first-N window.
        ``outage_window``: consecutive service failures that stop the run (None: ``window``); give it
        room for a wave of evaluations in flight, which a short outage fails all at once. They must also
        span ``outage_min_seconds`` (None: :data:`OUTAGE_MIN_SECONDS`) of ``clock``."""
        self.window = max(1, window)
        self.outage_window = max(1, window if outage_window is None else outage_window)
        #: the outage rule's streaks, by endpoint (None: failures whose endpoint the evaluator did not say)
        self._service_streaks: dict[str | None, _Streak] = {}
        #: whether the evaluator says which endpoints answered or failed (see _observe_service)
        self._endpoints_said = False
        self._clock = clock
        self._outage_min_seconds = OUTAGE_MIN_SECONDS if outage_min_seconds is None else outage_min_seconds
        self._expected = {split: frozenset(ids) for split, ids in (expected_failures or {}).items()}
        self._split_sizes = {split: n - len(self._expected.get(split, ())) for split, n in (split_sizes or {}).items()}
        self.proposal_window = max(1, min(window, MAX_PROPOSAL_WINDOW) if proposal_window is None else proposal_window)
        self._splits: dict[str, _SplitWindow] = {}
        #: splits whose first-N rule reads outcomes in an order given by the caller (judge_in_order)
        self._in_order: set[str] = set()
        self._raised: SystemicFailureError | None = None
        self._seen_proposal = False
        self._proposal_outage = _Streak()  # reflections in a row the reflection LM's service failed
        self._broken_proposer = _Streak()  # after a usable reflection, failed ones in a row (not the service's)
        self._usable_proposals = 0
        self._feedback_lost = 0  # of that streak, the last reflections in a row whose feedback calls all raised
        self._feedback_first = ""
        #: scoring calls of the metric that raised (not the service's failures) since the last usable
        #: reflection and the last scored evaluation: whether the metric broke, or only its feedback path
        #: (a judge's blip, a bug there; one candidate's output the metric cannot take, then scored ones)
        self._scoring_errors_since_usable = 0
        self._proposer_failures: Counter[str] = Counter()
        self._proposer_examples: dict[str, str] = {}
        self._proposer_error_types: dict[str, str] = {}
        self._nothing_read = 0  # reflections before the first usable one that had nothing to reflect on
        self._nothing_example = ""

    def resume(self, succeeded_splits: Iterable[str], proposal_succeeded: bool) -> None:
        """What an earlier session of the run already saw: after a success in a split there, the first-N
        rule does not apply to that split again (a resumed run's fresh failures are ordinary data, as they
        would have been)."""
        for split in succeeded_splits:
            self._window(split).seen_success = True
        self._seen_proposal = self._seen_proposal or proposal_succeeded

    def _window(self, split: str) -> _SplitWindow:
        window = self._splits.get(split)
        if window is None:
            window = self._splits[split] = _SplitWindow()
        return window

    def observe_proposal(self, outcome: ProposalOutcome, unchanged: bool = False) -> None:
        """Like :meth:`observe`, for a reflection's outcome. ``unchanged``: it answered with the parent's
        own texts, which counts as a failed reflection (a reflection LM that echoes its input)."""
        if unchanged and outcome.skipped is None:
            outcome = ProposalOutcome(skipped="unchanged_texts", message="the proposal repeated the current "
                                      "instructions unchanged", fatal=False)
        self._sticky(lambda: self._observe_proposal(outcome))

    def _sticky(self, check: Callable[[], None]) -> None:
        """Run ``check``; once anything raised, every later call re-raises the same error, so
        concurrent evaluations and reflections report one and the same cause."""
        if self._raised is not None:
            raise self._raised
        try:
            check()
        except SystemicFailureError as exc:
            self._raised = exc
            raise

    def _observe_proposal(self, outcome: ProposalOutcome) -> None:
        self._observe_proposal_service(outcome)
        self._observe_broken_proposer(outcome)
        if outcome.skipped is None:
            self._seen_proposal = True
            return
        if outcome.fatal and outcome.skipped == "feedback_error":
            raise SystemicFailureError(
                f"Stopping: {outcome.message}. Check the LM your metric calls when asked for feedback: its model "
                "name, api_base and API key.",
                failure="feedback_error",
                error_type=outcome.error_type,
            )
        if outcome.fatal:
            hint = QUOTA_HINT if outcome.rate_limited else "Check reflection_lm's model name, api_base and API key."
            raise SystemicFailureError(
                f"Stopping: the instruction proposer failed with an error retrying cannot fix: {outcome.message}. "
                f"{hint}",
                failure="proposer_error",
                error_type=outcome.error_type,
            )
        if not self._seen_proposal and outcome.skipped == NOTHING_TO_REFLECT_ON and outcome.not_run:
            self._no_predictor_ran(outcome)
        if self._seen_proposal or outcome.skipped not in PROPOSER_FAILURES:
            return
        self._proposer_failures[outcome.skipped] += 1
        self._proposer_examples.setdefault(outcome.skipped, outcome.message or "")
        if outcome.error_type is not None:  # what the user's code raised, per reason (its first)
            self._proposer_error_types.setdefault(outcome.skipped, outcome.error_type)
        n = sum(self._proposer_failures.values())
        if n >= self.proposal_window:
            reason, count = self._proposer_failures.most_common(1)[0]
            raise SystemicFailureError(
                f"Stopping: the first {n} reflections all failed ({count} of them with {reason}: "
                f"{self._proposer_examples[reason]}). {_PROPOSER_HINTS.get(reason, _PROPOSER_HINT)}",
                failure=reason,
                error_type=self._proposer_error_types.get(reason),
            )

    def _no_predictor_ran(self, outcome: ProposalOutcome) -> None:
        """``proposal_window`` reflections before the first usable one, each reading rollouts that ran to
        the end without calling the predictors it was to improve (``ProposalOutcome.not_run``): the
        program does not call them (a forward that calls an LM directly, or another module's
        predictors). Every later mutation would be skipped the same way until the no-progress limit,
        which returned the seed as if the search had ended. Other reasons for nothing to reflect on (the
        program failed outside the predictors on the examples read) are left to the other rules."""
        self._nothing_read += 1
        self._nothing_example = self._nothing_example or outcome.message or ""
        if self._nothing_read < self.proposal_window:
            return
        raise SystemicFailureError(
            f"Stopping: the first {self._nothing_read} reflections had nothing to reflect on "
            f"({self._nothing_example}): no rollout of the run so far, the seed's validation included, called "
            "the predictors being optimized where DSPy's trace sees it. Check that the program's forward "
            "calls them (only the predictors of student.named_predictors() are optimized, and one the "
            "program holds but never calls cannot be), and not in threads started without copying the "
            "context (contextvars.copy_context), whose calls DSPy does not trace.",
            failure=NOTHING_TO_REFLECT_ON,
        )

    def _observe_broken_proposer(self, outcome: ProposalOutcome) -> None:
        """Keeps :meth:`proposer_failure_streak`. A usable proposal or an echo (the proposer answered
        sensibly) breaks the streak; nothing to reflect on and the service's failures (the outage rule's)
        neither break nor extend it."""
        streak = self._broken_proposer
        if outcome.skipped is None or outcome.skipped == "unchanged_texts":
            self._usable_proposals += outcome.skipped is None
            streak.causes.clear()
            self._feedback_lost = 0
            self._scoring_errors_since_usable = 0
            return
        if not self._seen_proposal or outcome.skipped not in PROPOSER_FAILURES or outcome.service_failure:
            return
        streak.extend((outcome.skipped, outcome.error_type or ""), outcome.message, self._clock())
        self._feedback_lost = self._feedback_lost + 1 if outcome.skipped == "feedback_error" else 0
        if self._feedback_lost == 1:
            self._feedback_first = outcome.message or ""
        if self._feedback_lost >= self.proposal_window and self._scoring_errors_since_usable:
            raise SystemicFailureError(
                f"Stopping: the metric broke mid-run: the last {self._feedback_lost} reflections, after usable "
                f"ones, all lost their data to it (first: {self._feedback_first}), and "
                f"{self._scoring_errors_since_usable} of its scoring calls raised since: a service it calls is "
                f"gone, or state it keeps went bad. Fix it and rerun. {RESUME_ADVICE}",
                failure="feedback_error",
                error_type=outcome.error_type,
            )

    def proposer_failure_streak(self) -> str | None:
        """After a usable reflection, the reflections since that all gave nothing usable, described for a
        log line (how many, the most common reason, the first one's message, the usable ones before);
        None when there are none."""
        streak = self._broken_proposer
        if not streak.count:
            return None
        (reason, _), count = streak.causes.most_common(1)[0]
        earlier = (f"after {self._usable_proposals} usable ones in this session" if self._usable_proposals
                   else "after usable ones in an earlier session of the run")
        return (f"the last {streak.count} reflections all gave nothing usable ({count} of them with {reason}; the "
                f"first: {streak.first}), {earlier}. {_PROPOSER_HINTS.get(reason, _PROPOSER_HINT)} (An answer cut "
                "short by the reflection LM's max_tokens as instructions grow fails this way too.)")

    @property
    def proposer_failures_in_a_row(self) -> int:
        """The length of :meth:`proposer_failure_streak` (0 when there is none)."""
        return self._broken_proposer.count

    def _observe_proposal_service(self, outcome: ProposalOutcome) -> None:
        """The outage rule for reflections: a streak of proposals the reflection LM's service failed,
        broken by any the proposer answered (usable or not). A proposal with nothing to reflect on made
        no call: it neither breaks nor extends the streak."""
        if outcome.skipped == NOTHING_TO_REFLECT_ON:
            return
        streak = self._proposal_outage
        if not outcome.service_failure or outcome.fatal:
            streak.causes.clear()
            return
        lasted = streak.extend((outcome.skipped or "", outcome.error_type or ""), outcome.message, self._clock())
        if streak.count < self.proposal_window or lasted < self._outage_min_seconds:
            return
        raise SystemicFailureError(
            f"Stopping: the last {streak.count} reflections (over {lasted:.0f}s) all failed because the "
            "reflection LM's service did (its retries on rate limits or transient errors given up; first: "
            f"{streak.first}): the endpoint is down, overloaded or out of quota. Rerun once it "
            f"answers. {RESUME_ADVICE}",
            failure="proposer_error",
            error_type=outcome.error_type,
        )

    def judge_in_order(self, split: str) -> None:
        """From now on ``split``'s first-N rule reads only what :meth:`observe_in_order` is given, in an
        order that does not depend on timing (the trainset's, in a deterministic run: each mutation's
        evaluations at its commit). Why: which evaluations start first depends on the LM's timing when
        mutations compete for slots (a child whose reflection answered early takes a slot before the next
        mutation's parent), so the verdict on "the first N started" stopped one run and not the same run
        again (a review: 10 stops in 16 identical runs). :meth:`observe` still applies the fatal and
        outage rules to its evaluations as they end."""
        self._in_order.add(split)

    def launched(self, split: str = "val", example_id: int | None = None) -> int | None:
        """An execution on ``split`` starts: its launch number, to pass to :meth:`observe` (or
        :meth:`abandoned`) when it ends; None when it takes no place in the first-N rule (an example
        known to fail, a split judged in order).

        Why: evaluations finish in another order than they start. Examples that fail without an LM call
        (a tool's or a validation error) finish in a millisecond, those that succeed after a round trip,
        so with many slots the first N *finished* were all failures of a healthy run (a review: 17 of
        20 runs stopped with 64 slots and 35% of examples failing so). The first-N rule judges the first
        N *started*: its verdict waits until those have ended, and what started later neither rescues
        them nor counts among them."""
        if split in self._in_order or (example_id is not None and example_id in self._expected.get(split, ())):
            return None
        window = self._window(split)
        launch = window.launches
        window.launches += 1
        if launch < self.window and not window.seen_success:
            window.early_running.add(launch)
        return launch

    def abandoned(self, split: str, launch: int) -> None:
        """A launched execution ended without an outcome (cancelled, refused): not waited for."""
        window = self._window(split)
        window.early_running.discard(launch)
        self._settle(window)

    @staticmethod
    def _settle(window: _SplitWindow) -> None:
        """Once the first N have all answered (and not stopped the run), a success started after them is
        the split's success: a verdict still waiting (the format rule, the end of the run) must see it."""
        if window.late_success and not window.early_running:
            window.seen_success = True

    def observe(self, outcome: EvalOutcome, candidate: str | None = None, split: str = "val",
                launch: int | None = None) -> None:
        """Raise SystemicFailureError when the run must stop (see :meth:`_sticky`). ``candidate``
        (a fingerprint) tells format errors of the seed from those of its reflected children; ``split``
        names the data the evaluation ran on (one split when the valset is the trainset); ``launch`` is
        what :meth:`launched` returned for it (None: not tracked)."""
        if launch is not None:
            self._window(split).early_running.discard(launch)
        self._sticky(lambda: self._observe(outcome, candidate, split, launch))
        self._settle(self._window(split))

    def first_n_passed(self, split: str) -> bool:
        """Whether an evaluation of ``split`` succeeded: its first-N rule can no longer stop the run."""
        return self._window(split).seen_success

    def observe_in_order(self, outcome: EvalOutcome, candidate: str | None, split: str) -> None:
        """The first-N rule for a split judged in order (:meth:`judge_in_order`): ``outcome`` is its next
        evaluation in that order, and takes the next place."""
        def check() -> None:
            window = self._window(split)
            if window.seen_success or outcome.example_id in self._expected.get(split, ()):
                return
            place = window.launches
            window.launches += 1
            if outcome.failure is None:
                window.seen_success = True  # one of the first N, or after them (they all answered)
                return
            self._count(split, window, outcome, candidate, late=place >= self.window)

        self._sticky(check)

    def _observe(self, outcome: EvalOutcome, candidate: str | None, split: str, launch: int | None) -> None:
        window = self._window(split)
        self._observe_service(outcome)
        in_order = split in self._in_order
        if outcome.failure is None:
            # a success started after the first N does not decide their verdict while they still run:
            # whether it answered before the last of them (its LM's timing) stopped one run and not the
            # same run again (a review: 5 of 8 identical deterministic runs stopped)
            if not in_order:  # (a split judged in order reads observe_in_order)
                if launch is None or launch < self.window or not window.early_running:
                    window.seen_success = True
                else:
                    window.late_success = True
            self._scoring_errors_since_usable = 0  # the metric scores: it is not broken
            return
        if outcome.fatal and outcome.failure == "rate_limited":
            raise SystemicFailureError(
                "Stopping: an LM is rate limited (or overloaded) for longer than the retry policy waits: "
                f"{outcome.message}. "
                f"{QUOTA_HINT}",
                failure=outcome.failure,
                error_type=outcome.error_type,
            )
        if outcome.fatal:
            who, lm = ("the metric", "the LM your metric calls") if outcome.failure == "metric_error" else (
                "the program", "the LM")
            raise SystemicFailureError(
                f"Stopping: {who} failed with {outcome.error_type}, which retrying cannot fix: "
                f"{outcome.message}. Check {lm}: its model name, api_base and API key.",
                failure=outcome.failure,
                error_type=outcome.error_type,
            )
        if outcome.failure == "metric_error" and not outcome.service_failure:
            self._scoring_errors_since_usable += 1
        if in_order or window.seen_success or outcome.example_id in self._expected.get(split, ()):
            return
        self._count(split, window, outcome, candidate, late=launch is not None and launch >= self.window)

    def _count(self, split: str, window: _SplitWindow, outcome: EvalOutcome, candidate: str | None,
               late: bool) -> None:
        """A failure for the first-N rule. One after the first N (``late``) is not among them, nor in the
        count the message gives (which said 8, 9 or 10 for the same run), but a format error there is one
        more candidate that failed to parse: the format rule waits for reflected candidates, which come
        later."""
        if late and not (candidate is not None and outcome.failure == "format_error"):
            return
        if not late:
            key = (outcome.failure or "", outcome.error_type or "")
            window.failures[key] += 1
            window.examples.setdefault(key, outcome.message or "")
            window.count += 1
            window.failed_ids.add(outcome.example_id)
            window.service += outcome.service_failure
        if candidate is not None:
            window.candidates.add(candidate)
        error = self._judge(split, window, final=False)
        if error is not None:
            raise error

    def _observe_service(self, outcome: EvalOutcome) -> None:
        """The outage rule: a streak of service failures per endpoint, broken by an evaluation that endpoint
        answered (a success, or a failure of the program or the metric). Failures whose endpoint is unknown
        share one streak (key None), which any answer breaks. From an evaluator that never says which
        endpoints answered, any answer breaks every streak; from one that does, an evaluation that names
        none (it failed, or ended, before any LM call) breaks only the unknown one: a program error raised
        before the call, between the failures of an endpoint down for good, kept the run going."""
        streaks = self._service_streaks
        failed = outcome.failure is not None and outcome.service_failure and not outcome.fatal
        self._endpoints_said = self._endpoints_said or bool(outcome.answered_by) or outcome.service_endpoint is not None
        if not outcome.answered_by and not failed:
            if self._endpoints_said:
                streaks.pop(None, None)
            else:
                streaks.clear()
            return
        if outcome.answered_by:
            for key in (*outcome.answered_by, None):
                if not (failed and key == outcome.service_endpoint):  # it answered, then failed
                    streaks.pop(key, None)
        if not failed:
            return
        streak = streaks.setdefault(outcome.service_endpoint, _Streak())
        lasted = streak.extend((outcome.failure or "", outcome.error_type or ""), outcome.message, self._clock())
        if streak.count < self.outage_window or lasted < self._outage_min_seconds:
            return
        raise self._outage_error(outcome.service_endpoint, streak, lasted)

    @staticmethod
    def _outage_error(endpoint: str | None, streak: _Streak, lasted: float) -> SystemicFailureError:
        (failure, error_type), _ = streak.causes.most_common(1)[0]
        calling = f" calling {endpoint}" if endpoint else ""
        return SystemicFailureError(
            f"Stopping: the last {streak.count} evaluations{calling} (over {lasted:.0f}s) all failed "
            "because the LM service did (its retries given up "
            f"or its answer unusable; first: {streak.first}): the endpoint is down, overloaded or out "
            f"of quota. Rerun once it answers (the failed evaluations are run again). {RESUME_ADVICE}",
            failure=failure,
            error_type=error_type or None,
        )

    def check_final(self) -> None:
        """The run ended on its own (budget, no progress possible) and every evaluation of it failed: the
        first-N rule stops the run even where it was still waiting for reflection to fix a format error
        (a reflection LM that answers the same text each time builds no third candidate). Returning the
        seed as optimized would hide it. The evidence asked for is unchanged (a full window, or every
        example of a small split), and one success anywhere (another candidate, another split) means the
        setup can work: then the run returns as usual.

        Also when it ended in an outage shorter than the outage rule waits for, two windows of service
        failures in a row (one window may be a blip at the end of a healthy run): failures the service
        does not retry (an HTML page for an answer) come in milliseconds, and the budget or the
        no-progress limit ended the run first, returning a program chosen on failed evaluations as if
        the run had finished."""
        longest = max(self._service_streaks.items(), key=lambda item: item[1].count, default=None)
        if longest is not None and longest[1].count >= 2 * self.outage_window:
            endpoint, streak = longest
            lasted = self._clock() - streak.since

            def outage() -> None:
                raise self._outage_error(endpoint, streak, lasted)

            self._sticky(outage)
        if any(w.seen_success for w in self._splits.values()):
            return

        def check() -> None:
            for split, window in self._splits.items():
                error = self._judge(split, window, final=True)
                if error is not None:
                    raise error

        self._sticky(check)

    def _judge(self, split: str, window: _SplitWindow, final: bool) -> SystemicFailureError | None:
        """The error that stops the run for ``split``, or None while the evidence is not enough."""
        if window.seen_success or not window.count:
            return None
        if not final and window.early_running:
            return None  # one of the first evaluations started has not answered yet: it may succeed
        only_format = all(f == "format_error" for f, _ in window.failures)
        if not final and only_format and 0 < len(window.candidates) < FORMAT_ERROR_CANDIDATES:
            return None  # reflection has not yet had its chance to fix the output format
        size = self._split_sizes.get(split)
        # a split smaller than the window: once each of its examples has failed (repeats, such as a child
        # scored on its parent's minibatch, are no new evidence)
        if not (window.count >= self.window or (size is not None and len(window.failed_ids) >= max(1, size))):
            return None
        (failure, error_type), n = window.failures.most_common(1)[0]
        example = window.examples[(failure, error_type)]
        cause = f"{failure} / {example}" if error_type and example.startswith(f"{error_type}:") else (
            f"{failure}{' / ' + error_type if error_type else ''}: {example}")
        note = self._format_note(window, only_format, final)
        small = ""
        if size is not None and window.count < self.window and failure == "program_error":
            # stopped by the small-split rule: every example failing is all the evidence a tiny split gives
            small = (f" On a split of {size} example{'s' if size != 1 else ''}, that is every one: if better "
                     "instructions would avoid this error (the program raising on the LM's answer), catch it in "
                     "forward() and return a prediction the metric scores low, so that reflection can read it, "
                     "or add examples.")
        others = sorted(name for name, w in self._splits.items() if name != split and w.seen_success)
        if others and window.service == window.count:
            # not the split's data: the service stopped answering after the other split's evaluations
            return SystemicFailureError(
                f"Stopping: the first {window.count} evaluations on the {_SPLIT_NAMES.get(split, repr(split))} "
                f"all failed because the LM service did ({n} of them with {cause}), after those on the "
                f"{' and '.join(_SPLIT_NAMES.get(o, repr(o)) for o in others)} succeeded: the endpoint is down, "
                f"overloaded or out of quota. Rerun once it answers. {RESUME_ADVICE}",
                failure=failure,
                error_type=error_type or None,
            )
        if others:
            what = _SPLIT_NAMES.get(split, f"{split!r}")
            return SystemicFailureError(
                f"Stopping: the first {window.count} evaluations on the {what} all failed ({n} of them "
                f"with {cause}{note}), while some on the "
                f"{' and '.join(_SPLIT_NAMES.get(o, repr(o)) for o in others)} succeeded: something in the "
                f"{what}'s examples may break the program or the metric. Compare their fields and "
                "with_inputs(...) with the other split's (a label passed as an input, a field missing) "
                f"and run again.{small}",
                failure=failure,
                error_type=error_type or None,
            )
        # named when there are two (with valset=None the trainset is the valset: "the valset" would puzzle)
        where = f" on the {_SPLIT_NAMES[split]}" if split in _SPLIT_NAMES and len(self._split_sizes) > 1 else ""
        return SystemicFailureError(
            f"Stopping: the first {window.count} evaluations{where} all failed ({n} of them with {cause}){note}. "
            f"Fix the program, the metric, the LM configuration or the examples' fields and run again.{small}",
            failure=failure,
            error_type=error_type or None,
        )

    @staticmethod
    def _format_note(window: _SplitWindow, only_format: bool, final: bool = False) -> str:
        if not only_format:
            return ""
        if len(window.candidates) >= FORMAT_ERROR_CANDIDATES:
            return (f", on the seed and {len(window.candidates) - 1} candidates reflected from its parse "
                    "failures: the LM's output does not parse whatever the instruction says")
        if final:
            reflected = len(window.candidates) - 1
            return (f"; the run ended with no candidate that parses ({reflected} reflected from the seed's "
                    "parse failures)" if reflected > 0 else "; the run ended before a reflection produced a candidate")
        return ""
