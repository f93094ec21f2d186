"""The per-predictor reflective dataset: what the proposer reads for each component it rewrites.

Records have dspy.GEPA's shape ({"Inputs", "Generated Outputs", "Feedback"}) so existing custom
proposers see the same data. Two deliberate differences from dspy.GEPA (listed in docs/deviations.md):
trace steps are matched to predictors by *name*, never by signature equality (two predictors with the
same signature no longer share records); and a rollout where the program raised contributes the
error as feedback to one predictor, instead of being dropped: the one it was raised in, else the last
one that ran before it (see ``_program_error_owner``).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import dspy
from dspy.adapters.chat_adapter import ChatAdapter
from dspy.adapters.types.base_type import Type as DspyType
from dspy.adapters.types.history import History
from dspy.teleprompt.gepa.gepa_utils import format_history_for_reflection

from dspy_turbogepa.adapter.lm_copies import EvaluatorClosedError, judge_usage_attached
from dspy_turbogepa.adapter.metric import default_feedback, read_metric_return
from dspy_turbogepa.adapter.program import ProgramCodec
from dspy_turbogepa.adapter.ratelimit import FATAL_ONCE_ANSWERED, fatal_error_name
from dspy_turbogepa.adapter.trajectory import DspyTrajectory
from dspy_turbogepa.engine.errors import USER_CODE_ERRORS
from dspy_turbogepa.log_once import FirstOfKind
from dspy_turbogepa.redaction import describe_error

logger = logging.getLogger(__name__)

ReflectiveRecord = dict[str, Any]


def with_trace_data(selector: Callable[..., Any]) -> Callable[..., Any]:
    """A user's ``component_selector`` sees the minibatch trajectories as dspy.GEPA's DspyAdapter
    hands them over: dicts of dspy's ``TraceData`` shape (``example_ind``, ``example``,
    ``prediction``, ``trace``, ``score``), so a selector written for dspy.GEPA (``t["trace"]``,
    ``t["score"].feedback``) works unchanged: ``score`` is what the metric returned, as in dspy's, and
    the float score where the metric did not score the rollout. Unlike dspy's, a rollout whose program
    raised is included, with prediction None.
    """

    @functools.wraps(selector)
    def call(state: Any, trajectories: Sequence[Any], subsample_scores: Sequence[float], candidate_idx: int,
             candidate: dict[str, str]) -> Any:
        data = [
            {"example_ind": j, "example": t.example, "prediction": t.prediction, "trace": list(t.raw_trace),
             "score": score if t.metric_return is None else t.metric_return}
            if isinstance(t, DspyTrajectory) else t
            for j, (t, score) in enumerate(zip(trajectories, subsample_scores))
        ]
        return selector(state, data, subsample_scores, candidate_idx, candidate)

    return call


class FeedbackMetricError(Exception):
    """Every record of a reflective dataset was lost because the metric raised when asked for feedback,
    or one feedback call failed with an error no retry can fix (``fatal``: the LM the metric calls refused
    its key or does not know its model), which stops the run as the same error on a scoring call does.
    ``error_type``: what the metric raised (the first of them), for ``SystemicFailureError.error_type``."""

    def __init__(self, message: str, error_type: str | None = None, fatal: bool = False) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.fatal = fatal


class ReflectiveDatasetBuilder:
    def __init__(
        self,
        codec: ProgramCodec,
        metric: Callable[..., Any],
        failure_score: float,
        add_format_failure_as_feedback: bool,
        warn_on_score_mismatch: bool,
        stringify: bool,
        metric_gate: AbstractContextManager[Any] | None = None,
        metric_call: Callable[..., Any] | None = None,
    ) -> None:
        """``metric_gate``: held around each feedback call; the evaluator's (``DspyEvaluator.metric_gate``),
        so that feedback calls and evaluations together run no more metric calls at once than
        ``num_threads``, as in dspy.GEPA, whose feedback calls never overlap its evaluations.
        ``metric_call``: makes each feedback call instead, holding that gate itself and retrying a judge's
        429s and transient failures as scoring calls are (``DspyEvaluator.call_metric_for_feedback``);
        called with ``stop=``, the event :meth:`stop` sets."""
        self._codec = codec
        self._metric_call = metric_call
        self._stopping = threading.Event()
        self._metric_gate: AbstractContextManager[Any] = metric_gate if metric_gate is not None else nullcontext()
        self._metric = metric
        self._failure_score = failure_score
        self._add_format_failures = add_format_failure_as_feedback
        self._warn_mismatch = warn_on_score_mismatch
        self._stringify = stringify
        self._lock = threading.Lock()
        self.skipped: Counter[str] = Counter()
        #: the metric's feedback calls (pred_name set), raised ones included: with an LLM-judge metric
        #: each is paid, and reflection makes more of them than dspy.GEPA (scouts, best-of-k siblings)
        self.feedback_calls = 0
        #: what was warned about already: one WARNING per kind (and per predictor), the rest at DEBUG
        self._warned = FirstOfKind()

    def stop(self) -> None:
        """The run is stopping: a feedback call backing off on its judge's 429s gives up (work in flight
        still makes its calls: it may finish in a Ctrl-C's grace period)."""
        self._stopping.set()

    def build(self, components: Sequence[str], trajectories: Sequence[DspyTrajectory | None],
              scores: Sequence[float], rng: random.Random,
              texts: Mapping[str, str] | None = None) -> dict[str, list[ReflectiveRecord]]:
        """``texts``: the instructions of the candidate that ran (the parent); a format failure's
        "Follow this structure" block shows them, as dspy.GEPA formats its built candidate, not the seed."""
        indexed = self.build_indexed(components, trajectories, scores, rng, texts)
        return {name: [record for _, record in items] for name, items in indexed.items()}

    def build_indexed(
        self,
        components: Sequence[str],
        trajectories: Sequence[DspyTrajectory | None],
        scores: Sequence[float],
        rng: random.Random,
        texts: Mapping[str, str] | None = None,
    ) -> dict[str, list[tuple[int, ReflectiveRecord]]]:
        """``build``, each record with the position of the trajectory it came from (its score is
        ``scores[position]``): what a reflection must cut to fit a context window is chosen by score."""
        dataset: dict[str, list[tuple[int, ReflectiveRecord]]] = {}
        feedback_errors: list[tuple[str, str]] = []  # (message, exception type)
        for name in components:
            items: list[tuple[int, ReflectiveRecord]] = []
            why_not: Counter[str] = Counter()
            for position, (traj, score) in enumerate(zip(trajectories, scores)):
                if traj is None:
                    why_not["no trace was kept"] += 1
                    continue
                record = self._record(name, traj, score, rng, feedback_errors, texts)
                if record is not None:
                    items.append((position, record))
                else:
                    why_not[_why_no_record(name, traj)] += 1
            if items:
                dataset[name] = items
            else:
                reasons = ", ".join(f"{n} {why}" for why, n in why_not.most_common()) or "no examples"
                self._log_once(("no_records", name), "No reflective examples for predictor %r in this minibatch "
                               "(%s): it is left out of this proposal (one with none for any predictor is counted "
                               "in run_stats['proposal_skips']; further ones are logged at DEBUG)", name, reasons)
        if not dataset and feedback_errors:
            # Not "nothing to reflect on": the metric's feedback call is broken, which the systemic
            # rule for proposals must see (a run would otherwise spin on free mutations, then return the seed).
            raise FeedbackMetricError(
                "the metric raised on every feedback call (with pred_name) of this minibatch: "
                f"{feedback_errors[0][0]}", error_type=feedback_errors[0][1],
            )
        return dataset

    # ------------------------------------------------------------------ one record
    def _record(self, name: str, traj: DspyTrajectory, score: float, rng: random.Random,
                feedback_errors: list[tuple[str, str]], texts: Mapping[str, str] | None = None,
                ) -> ReflectiveRecord | None:
        steps = [s for s in traj.steps if s.pred_name == name]
        if traj.failure in ("program_error", "format_error"):
            return self._error_record(name, traj, steps, texts)
        if traj.failure in ("metric_error", "metric_invalid"):
            # no score for this example (a metric that raised, or returned None for an unlabeled one): a
            # record would tell the reflection it failed
            self._count(traj.failure)
            return None
        if traj.failure == "rate_limited":  # an LLM judge's LM stayed rate limited: the service's failure
            self._count("infrastructure_error")
            return None
        if not steps:
            return None
        step = rng.choice(steps)
        with self._lock:
            self.feedback_calls += 1
        args = (traj.example, traj.prediction, traj.raw_trace, name,
                [(self._codec.student_predictor(name), step.inputs, step.outputs)])
        try:
            if self._metric_call is not None:
                ret = self._metric_call(*args, stop=self._stopping)
            else:
                with self._metric_gate, judge_usage_attached():
                    ret = self._metric(*args)
        except EvaluatorClosedError:  # stopped during its backoff, or the run ended: not the metric's failure
            return None
        except USER_CODE_ERRORS as exc:  # a metric bug must not kill the proposal: skip this record, say why
            message = describe_error(exc)
            fatal = fatal_error_name(exc, FATAL_ONCE_ANSWERED)
            if fatal is not None:  # a judge's revoked key: every later feedback call fails the same way
                raise FeedbackMetricError(
                    f"the metric's feedback call (pred_name={name!r}) failed with {fatal}, which retrying cannot "
                    f"fix: {message}", error_type=fatal, fatal=True,
                ) from exc
            self._log_once(("feedback_error", ""), "The metric raised while giving feedback for %r: %s (this example "
                           "is left out of the reflection; counted in run_stats['reflective_records_skipped'], "
                           "further ones are logged at DEBUG)", name, message)
            self._count("feedback_error")
            feedback_errors.append((message, type(exc).__name__))
            return None
        reading = read_metric_return(ret, self._failure_score)
        if reading.invalid is None or reading.feedback is not None:
            feedback = reading.feedback if reading.feedback is not None else default_feedback(reading.score)
        elif isinstance(ret, str):  # the feedback itself, returned bare: what the user meant the reflection to read
            self._log_once(("feedback_str", ""), "The metric's feedback call (pred_name=%r) returned a string; it is "
                           "read as the feedback. Return dspy.Prediction(score=..., feedback=...) instead.", name)
            feedback = ret
        else:
            # None: no feedback for this predictor (a metric that gives some only sometimes); anything else
            # unreadable is said once. Either way the reflection reads how the example scored.
            if ret is not None:
                self._log_once(("feedback_invalid", ""), "The metric's feedback call for %r gave no feedback and no "
                               "usable score (%s): the reflection reads the example's score instead", name,
                               reading.invalid)
            feedback = default_feedback(score)
        if reading.invalid is None and reading.score != score:
            self._maybe_warn_mismatch()
        return {
            "Inputs": self._inputs(step.inputs), "Generated Outputs": self._outputs(step.outputs), "Feedback": feedback
        }

    def _error_record(self, name: str, traj: DspyTrajectory, steps: list[Any],
                      texts: Mapping[str, str] | None = None) -> ReflectiveRecord | None:
        if traj.failure == "format_error":
            if steps and traj.failed_predictor != name:
                # this predictor produced its output; the failure happened elsewhere (but a predictor called
                # again, as ReAct's is at each step, may have answered once and then failed to parse)
                return None
        elif _program_error_owner(traj) != name:
            # raised in another predictor, or in the program's code after another one's output: only
            # that one can learn from it (a predictor that did not run, or never runs, cannot)
            return None
        if traj.service_failure:
            self._count("infrastructure_error")
            return None
        inputs = self._inputs(dict(traj.example.inputs()))
        if traj.failure != "format_error" and traj.failed_predictor != name and steps:
            # raised in the program's own code, after this predictor's output: that output may be the cause
            step = steps[-1]
            return {
                "Inputs": self._inputs(step.inputs), "Generated Outputs": self._outputs(step.outputs),
                "Feedback": (
                    f"The program failed with {traj.error} after this output, in the code that uses it. This "
                    f"example was scored {self._failure_score}. If this output caused the error, change the "
                    "instruction so that it does not happen again."
                ),
            }
        if traj.failure == "format_error":
            sig = traj.failed_signature
            if traj.failed_predictor is not None and traj.failed_predictor != name:
                return None  # another predictor's output failed to parse
            if traj.failed_predictor is None and sig is None:
                return None  # whose output it was is unknown: telling every predictor that did not run would
                # reach one that never runs (dspy.GEPA gives no predictor a record here either)
            if traj.failed_predictor is None and sig is not None and not _same_fields(
                    sig, self._codec.student_predictor(name).signature):
                return None
            raw = traj.raw_completion or ""
            outputs = (
                "Couldn't parse the output as per the expected output format. The model's raw response was:\n"
                f"```\n{raw}\n```\n\n"
            )
            if self._add_format_failures:
                signature = self._codec.student_predictor(name).signature
                if texts is not None and name in texts:
                    signature = signature.with_instructions(texts[name])
                structure = "".join(f"{m['role']}: {m['content']}\n" for m in ChatAdapter().format(signature, [], {}))
                feedback = "Your output failed to parse. Follow this structure:\n" + structure
            else:
                feedback = f"Your output failed to parse into the expected output fields: {traj.error}"
            return {"Inputs": inputs, "Generated Outputs": outputs, "Feedback": feedback}
        return {
            "Inputs": inputs,
            "Generated Outputs": f"The program raised an error before this step produced an output: {traj.error}",
            "Feedback": (
                f"The program failed with {traj.error}. This example was scored {self._failure_score}. "
                "If the instruction can prevent this error, change it so that it does not happen again."
            ),
        }

    # ------------------------------------------------------------------ formatting (as dspy.GEPA does)
    def _inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        history_key = next((k for k, v in inputs.items() if isinstance(v, History)), None)
        if history_key is not None:
            hist = inputs[history_key]
            out["Context"] = format_history_for_reflection(hist) if self._stringify else hist
        for key, value in inputs.items():
            if key == history_key:
                continue
            out[key] = value if (not self._stringify or isinstance(value, DspyType)) else str(value)
        return out

    def _outputs(self, outputs: Any) -> dict[str, Any] | str:
        if hasattr(outputs, "items"):
            return {k: (v if not self._stringify else str(v)) for k, v in outputs.items()}
        return str(outputs)

    def _count(self, reason: str) -> None:
        with self._lock:
            self.skipped[reason] += 1

    def skipped_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.skipped)

    def feedback_call_count(self) -> int:
        with self._lock:
            return self.feedback_calls

    def _log_once(self, kind: tuple[str, str], msg: str, *args: Any) -> None:
        """A WARNING the first time, DEBUG after: a broken feedback call would otherwise log a line per
        record (130 in a 200-call run)."""
        logger.log(logging.WARNING if self._warned.first(kind) else logging.DEBUG, msg, *args)

    def _maybe_warn_mismatch(self) -> None:
        with self._lock:
            if not self._warn_mismatch:
                return
            self._warn_mismatch = False
        logger.warning(
            "The score returned by the metric with pred_name differs from the score of the same example without "
            "pred_name. Either the metric is non-deterministic (LLM-as-judge, ...) or it returns predictor-level "
            "scores. TurboGEPA, like dspy.GEPA, uses only the feedback text from the pred_name call and keeps the "
            "program-level score. Set warn_on_score_mismatch=False to silence this warning."
        )


def _same_fields(a: Any, b: Any) -> bool:
    try:
        return list(a.input_fields) == list(b.input_fields) and list(a.output_fields) == list(b.output_fields)
    except AttributeError:
        return True


def is_builtin_proposer(proposer: Any) -> bool:
    return isinstance(proposer, dspy.teleprompt.gepa.InstructionProposer)


def _program_error_owner(traj: DspyTrajectory) -> str | None:
    """Who a program error is fed back to: the predictor it was raised inside, else the last one that
    ran before it (the failing code was likely using its output), else no one (it was raised before
    any predictor ran: no instruction could prevent it). dspy.GEPA feeds it to no one."""
    if traj.failed_predictor is not None:
        return traj.failed_predictor
    return traj.steps[-1].pred_name if traj.steps else None  # "?" or a frozen one: no component's


def _why_no_record(name: str, traj: DspyTrajectory) -> str:
    """Why an example gave a predictor no reflective record, as the warning says it: the same warning
    covered a predictor the program never called and a metric that raised on every example."""
    if traj.failure == "metric_error":
        return "where the metric raised"
    if traj.failure == "rate_limited":
        return "where the metric's LM stayed rate limited"
    if not any(step.pred_name == name for step in traj.steps):
        return "where it did not run"
    if traj.failure == "program_error" and not traj.service_failure and _program_error_owner(traj) != name:
        return "where the program failed outside it"
    if traj.failure == "format_error" and traj.failed_predictor != name:
        return "where another predictor's output failed to parse"
    return "whose feedback was unusable"
