"""Emitting DSPy's evaluation callbacks for full-validation scores, on the thread that called compile.

dspy.GEPA runs every full-validation evaluation through ``dspy.Evaluate``, which fires
``on_evaluate_start`` / ``on_evaluate_end`` on ``dspy.settings.callbacks``. MLflow's ``MlflowCallback``
(``mlflow.dspy.autolog(log_evals=True)``) turns each one into a nested run under the compile run and
logs the score on the parent as a step metric — but only when the callback fires on the thread that
owns the active run. TurboGEPA's engine evaluates in a worker thread, so it hands each full-validation
result to :class:`CompileThreadCallbackPump`, and the compile thread emits the callbacks from
:meth:`CompileThreadCallbackPump.drain` (the runner's ``on_tick`` hook, every ~0.2 s and once at the end).

Result with autolog: nested runs ``eval_full_0`` (the seed), ``eval_full_1``, ... under the compile run,
each with metric ``eval``, ``model.json`` and ``result_table.json``; the compile run gets an ``eval_full``
metric history with one step per candidate (step ``k`` = candidate ``k``).
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.redaction import describe_error, describe_traceback
from dspy_turbogepa.tracking.imports import ctrl_c_held

if TYPE_CHECKING:
    import dspy

    from dspy_turbogepa.engine.records import CandidateRecord

logger = logging.getLogger(__name__)

DEFAULT_METRIC_KEY = "eval_full"

#: How often MLflow's tracking server is asked whether it answers, while candidates are reported, and
#: how long it has to answer (MLflow's own client waits 120 s a request: a slow server is not a dead one).
PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 10.0


class CompileThreadCallbackPump(EngineObserver):
    """Queues full-validation results on the engine thread; :meth:`drain` emits them on the compile thread.

    Args:
        build_program: candidate texts (predictor name -> instruction) -> a ``dspy.Module`` carrying them
            (``ProgramCodec.build``). Called on the compile thread, once per emitted evaluation.
        valset: the validation examples; a record's validation ids index this list.
        instance: passed to the callbacks as ``instance`` (the optimizer).
        metric_key: ``callback_metadata["metric_key"]``, the name MLflow gives the nested runs and the
            parent metric (default ``"eval_full"``, as dspy.GEPA).
        callbacks: the callbacks to call; by default ``dspy.settings.callbacks`` as seen by the compile
            thread at each drain (so ``dspy.context(callbacks=...)`` around compile applies).

    Must be constructed on the thread that will call :meth:`drain` (the compile thread); a drain from
    any other thread does nothing, since MLflow's active run is thread-local.
    """

    def __init__(
        self,
        build_program: Callable[[Mapping[str, str]], dspy.Module],
        valset: Sequence[Any],
        *,
        instance: Any = None,
        metric_key: str = DEFAULT_METRIC_KEY,
        callbacks: Sequence[Any] | None = None,
    ) -> None:
        self._build_program = build_program
        self._valset = list(valset)
        self._instance = instance
        self._metric_key = metric_key
        self._callbacks = list(callbacks) if callbacks is not None else None
        self._queue: queue.SimpleQueue[CandidateRecord] = queue.SimpleQueue()
        self._owner = threading.get_ident()
        self._warned = False
        #: A Ctrl-C came through the callbacks: nothing more is emitted (see drain)
        self._interrupted = False
        #: Called at the first Ctrl-C held while MLflow's callback runs (the teleprompter's stop request):
        #: the press itself waits for the callback, the search need not
        self.on_press: Callable[[], None] | None = None
        #: Why MLflow's tracking server is taken for down (its callback is no longer called), or None
        self._mlflow_down: str | None = None
        self._last_probe = -math.inf
        #: Evaluations emitted so far (one per candidate with a full-validation score).
        self.emitted = 0

    # ------------------------------------------------------------------ engine thread
    def on_candidate(self, record: CandidateRecord) -> None:
        self._queue.put(record)

    # ------------------------------------------------------------------ compile thread
    def pending(self) -> int:
        return self._queue.qsize()

    def drain(self) -> int:
        """Emit the callbacks for every queued evaluation; returns how many. Never raises an ``Exception``.

        A ``KeyboardInterrupt`` is not swallowed: the runner's wait loop treats it as Ctrl-C.
        """
        if threading.get_ident() != self._owner or self._interrupted:
            return 0
        n = 0
        while True:
            try:
                record = self._queue.get_nowait()
            except queue.Empty:
                return n
            try:
                if self._emit(record):
                    n += 1
            except Exception as exc:  # noqa: BLE001
                self._warn(f"could not report candidate {getattr(record, 'index', '?')} to the DSPy callbacks", exc)
            except KeyboardInterrupt:
                # nothing more is handed to the callbacks: the run is stopping, and each evaluation would
                # hold the next press again (the one meant to abort at once) while MLflow answers
                self._interrupted = True
                raise

    def _current_callbacks(self) -> list[Any]:
        if self._callbacks is not None:
            callbacks = self._callbacks
        else:
            import dspy

            callbacks = list(dspy.settings.get("callbacks") or [])
        wanted = [cb for cb in callbacks if _wants_evaluations(cb)]
        if any(map(is_mlflow_callback, wanted)) and not self._mlflow_alive():
            wanted = [cb for cb in wanted if not is_mlflow_callback(cb)]
        return wanted

    def _mlflow_alive(self) -> bool:
        """Whether MLflow's tracking server still answers (asked at most every PROBE_INTERVAL_S; a
        store that is not an HTTP server always does). Why: MLflow's callback catches its own errors,
        after retrying each of its ~14 requests per evaluation for minutes, so a server that died
        mid-run held compile() for over 15 minutes replaying the queued candidates, and said nothing
        (a review). Once down it stays down for this run, said in one WARNING."""
        if self._mlflow_down is not None:
            return False
        now = time.monotonic()
        if now - self._last_probe < PROBE_INTERVAL_S:
            return True
        self._last_probe = now
        import mlflow

        from dspy_turbogepa.tracking.mlflow_tracking import _probe_tracking_server, _safe_uri

        uri = mlflow.get_tracking_uri()
        problem = _probe_tracking_server(uri, PROBE_TIMEOUT_S)
        if problem is None:
            return True
        self._mlflow_down = problem
        logger.warning("MLflow tracking server %s stopped answering (%s): autolog's evaluation runs are not "
                       "logged for the rest of this compile; the search goes on.", _safe_uri(uri), problem)
        return False

    def _emit(self, record: CandidateRecord) -> bool:
        callbacks = self._current_callbacks()
        if not callbacks:
            return False
        import dspy
        from dspy.evaluate.evaluate import EvaluationResult

        program = self._build_program(record.candidate.texts)
        results = []
        for vid in sorted(record.val_scores):
            if not 0 <= vid < len(self._valset):
                continue
            pred = record.val_outputs.get(vid)
            # dspy.Evaluate puts an empty Prediction where there is no output (MLflow's result table needs one).
            results.append((self._valset[vid], pred if pred is not None else dspy.Prediction(), record.val_scores[vid]))
        score = round(100.0 * record.aggregate, 2)
        call_id = uuid.uuid4().hex

        # MLflow writes what it is given to the tracking store (params, model.json, result_table.json):
        # it gets a masked program and masked rows, as the run store does. Other callbacks get the
        # objects themselves, as dspy.Evaluate hands them.
        plain = (program, results)
        masked = (masked_program(program), masked_results(results)) if any(map(is_mlflow_callback, callbacks)) \
            else plain

        def view(cb: Any) -> tuple[Any, list[Any]]:
            return masked if is_mlflow_callback(cb) else plain

        started: list[Any] = []
        ended = False
        interrupted: BaseException | None = None
        mlflow_cut_short = False  # a press got through while MLflow's start ran (a second one: it was held)
        try:
            for cb in callbacks:
                started.append(cb)
                shown, rows = view(cb)
                inputs = {"program": shown, "devset": [ex for ex, _, _ in rows],
                          "callback_metadata": {"metric_key": self._metric_key}}
                try:
                    if is_mlflow_callback(cb):
                        # MLflow's start logs dspy.settings.lm's kwargs as the run's `lm_params` (extra_headers
                        # and all): it reads a masked copy, as it reads a masked program. Ctrl-C waits for it:
                        # cut short after its start_run and before it notes the call, its nested run could
                        # not be ended, and the compile run would stay RUNNING and active
                        with dspy.context(lm=masked_lm(dspy.settings.lm)), \
                                ctrl_c_held(second_press_escapes=True, on_first_press=self.on_press):
                            try:
                                cb.on_evaluate_start(call_id=call_id, instance=self._instance, inputs=inputs)
                                _numbered_as_candidate(cb, call_id, record.index)
                            except KeyboardInterrupt:  # inside the hold: the second press got through
                                mlflow_cut_short = True
                                raise
                    else:
                        cb.on_evaluate_start(call_id=call_id, instance=self._instance, inputs=inputs)
                except Exception as exc:  # noqa: BLE001 - as dspy's with_callbacks: warn, keep going
                    self._warn(f"{type(cb).__name__}.on_evaluate_start failed", exc)
            ended = True
        except BaseException as exc:  # Ctrl-C between the starts and the ends: the ends must still run
            interrupted = exc
            raise
        finally:
            # Every started callback gets its end, as dspy does, even when Ctrl-C lands in between:
            # MLflow's nested evaluation run would otherwise stay on its active-run stack, and autolog's
            # end_run would close it instead of the compile run, leaving the compile run RUNNING. A press
            # during MLflow's end waits for it (one cut short before its end_run is that same failure; a
            # second press does not wait: a tracking server that hangs must not hold Ctrl-C for minutes),
            # and the other callbacks' ends still run before the interrupt goes on.
            pressed: BaseException | None = None
            for cb in started:
                outputs = EvaluationResult(score=score, results=view(cb)[1]) if ended else None
                # after a second press got through its start (a hung server), its end is not waited for either;
                # a press that landed in another callback is a first one: MLflow's end is held as ever
                hold = is_mlflow_callback(cb) and not mlflow_cut_short
                try:
                    with ctrl_c_held(second_press_escapes=True, on_first_press=self.on_press) if hold \
                            else nullcontext():
                        cb.on_evaluate_end(call_id=call_id, outputs=outputs, exception=interrupted)
                except Exception as exc:  # noqa: BLE001
                    self._warn(f"{type(cb).__name__}.on_evaluate_end failed", exc)
                except KeyboardInterrupt as exc:
                    pressed = pressed or exc
            if pressed is not None and interrupted is None:
                raise pressed
        self.emitted += 1
        return True

    def _warn(self, what: str, exc: BaseException) -> None:
        # masked: a callback's error may quote its endpoint with credentials (MLflow's "API request to
        # http://user:pw@host/... failed") or a key
        if not self._warned:
            self._warned = True
            logger.warning("%s (%s); the run continues (further failures are logged at debug level).",
                           what, describe_error(exc))
        else:
            logger.debug("%s:\n%s", what, describe_traceback(exc))


def _numbered_as_candidate(cb: Any, call_id: str, index: int) -> None:
    """Give the ``eval_full_<k>`` run MLflow just started, and the step of its score on the compile run,
    the candidate's index. MLflow numbers them from one count per process (its autolog callback is one
    object): two compiles at once in threads took turns (0, 3, 5 ... and 1, 2, 4 ...), where the docs
    promise ``k`` = candidate. Reads MLflow's own bookkeeping (the tested 3.17 line); absent, nothing
    is renamed."""
    steps = getattr(cb, "_call_id_to_metric_key", None)
    started = getattr(cb, "_eval_runs_started", ())
    if not isinstance(steps, dict):
        return
    held = steps.get(call_id)
    if not (isinstance(held, tuple) and len(held) == 2) or held[1] == index or call_id not in started:
        return
    import mlflow

    steps[call_id] = (held[0], index)
    mlflow.set_tag("mlflow.runName", f"{held[0]}_{index}")  # the nested run it started is this thread's active one


def is_mlflow_callback(cb: Any) -> bool:
    """MLflow's ``MlflowCallback`` (autolog's), told by name so that MLflow is never imported here."""
    return type(cb).__name__ == "MlflowCallback" and type(cb).__module__.startswith("mlflow.")


def masked_program(program: Any) -> Any:
    """A shallow copy of ``program`` whose ``dump_state()`` (and so ``save()``) gives its state masked as
    the run store masks what it keeps: credential-named keys (an LM's ``api_key``, ``extra_headers``
    such as ``x-api-key``) and key-shaped or environment-secret strings (in instructions, demos).
    Same class name, so MLflow's param names stay ``<YourModule>.<path>``."""
    import copy

    if not callable(getattr(program, "dump_state", None)):
        return program  # not a module: no state for MLflow to log
    clone = copy.copy(program)
    clone.__class__ = _masked_class(type(program))  # type: ignore[arg-type]  # mypy: a class is not Hashable
    return clone


def masked_lm(lm: Any) -> Any:
    """A shallow copy of ``lm`` whose ``kwargs`` (where DSPy keeps ``api_key``, ``api_base`` and
    ``extra_headers``) are masked as the run store masks them; None stays None."""
    import copy

    from dspy_turbogepa.redaction import redact

    if lm is None or not isinstance(getattr(lm, "kwargs", None), dict):
        return lm
    clone = copy.copy(lm)
    clone.kwargs = redact(lm.kwargs)
    return clone


@functools.cache
def _masked_class(cls: type) -> type:
    """``cls`` whose ``dump_state()`` is masked (one class per module class, not per evaluation)."""
    from dspy_turbogepa.redaction import redact

    def dump_state(self: Any, *args: Any, **kwargs: Any) -> Any:
        return redact(cls.dump_state(self, *args, **kwargs))  # type: ignore[attr-defined]

    return type(cls.__name__, (cls,), {"dump_state": dump_state, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def masked_results(results: list[Any]) -> list[Any]:
    """``(example, prediction, score)`` rows with every field masked (MLflow's result table)."""
    import dspy

    from dspy_turbogepa.redaction import redact

    rows = []
    for example, pred, score in results:
        masked_example = dspy.Example(**redact(dict(example.items(include_dspy=True))))
        inputs = example._input_keys  # dspy keeps the input names only there
        if inputs:
            masked_example = masked_example.with_inputs(*inputs)
        rows.append((masked_example, dspy.Prediction(**redact(dict(pred.items(include_dspy=True)))), score))
    return rows


def _wants_evaluations(cb: Any) -> bool:
    """MLflow's callback only nests evaluation runs inside a compile it recorded (``optimizer_stack_level > 0``).

    Outside one (autolog's compile patch missing), it would open a top-level run per evaluation, or log
    into whatever run is active, which is the mess dspy.GEPA makes from worker threads; skip it then.
    Read without importing MLflow.
    """
    if is_mlflow_callback(cb):
        return getattr(cb, "optimizer_stack_level", 1) > 0
    return hasattr(cb, "on_evaluate_start") and hasattr(cb, "on_evaluate_end")


__all__ = ["DEFAULT_METRIC_KEY", "CompileThreadCallbackPump"]
