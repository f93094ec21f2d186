"""``use_mlflow=True``: the run's params, live metrics and final artifacts in MLflow.

:class:`MlflowRunTracker` is an engine observer. On construction (on the compile thread) it attaches to
the active MLflow run — the one ``mlflow.dspy.autolog(log_compiles=True)`` opened for this compile, or
the user's own — or starts one, and ends only a run it started. Everything is logged through an
``MlflowClient`` and the captured ``run_id`` from a background thread: the engine's hooks only append to
a buffer, so a slow or dead tracking server never slows the search. MLflow missing, a server that does
not answer, or any logging error: one warning, and the run goes on.

Names (see docs/mlflow.md):

- params: the optimizer's JSON-able arguments (credentials dropped), ``trainset_size``, ``valset_size``,
  ``num_components``, ``seed_instructions/<predictor>``, and at the end ``best_instructions/<predictor>``;
- metrics, ``step`` = metric calls executed so far: ``best_val_score``, ``pareto_front_size``,
  ``pareto_front_agg``, ``num_candidates``, ``mutations_committed``, ``metric_calls``, ``cache_hits``,
  ``lm/*`` tokens and calls, ``cost/*_usd``, ``rate_limit_retries``, ``mutations/<status>``,
  ``failures/<kind>``, ``proposal_skips/<reason>``; ``candidate_val_score`` with ``step`` = candidate
  index; ``final/*`` at the end;
- artifacts under ``turbogepa/``: ``optimized_program.json``, ``candidates.json`` and
  ``pareto_front.json`` (MLflow tables), ``run_summary.json``, the best-score plot when asked for
  (``plot_path``), and any files passed to :meth:`MlflowRunTracker.finish` (``log_dir``'s reports).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import posixpath
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspy_turbogepa.engine.frontier import FrontierTally, pareto_front_members
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.redaction import (
    describe_error,
    is_sensitive_key,
    mask_json_text,
    mask_text,
    redact,
    strip_userinfo,
)
from dspy_turbogepa.tracking.imports import import_in_one_piece
from dspy_turbogepa.tracking.plots import PLOT_FORMATS

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

    from dspy_turbogepa.engine.records import (
        CandidateRecord,
        EngineResult,
        MutationResult,
    )

logger = logging.getLogger(__name__)

ARTIFACT_DIR = "turbogepa"
MAX_KEY_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_PARAM_VALUE_LENGTH = 6000  # MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_LENGTH = 8000
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
#: How long an aborted compile (an exception, a second Ctrl-C) waits for the last uploads.
ABORT_TIMEOUT = 5.0
#: After this many consecutive failed logging calls the tracker stops trying for the rest of the run.
MAX_CONSECUTIVE_FAILURES = 2
#: HTTP retries of each background upload (MLflow's default is 7, with backoff: minutes per call on a failing server)
UPLOAD_HTTP_RETRIES = 2

_PRIMITIVES = (bool, int, float, str)


# ---------------------------------------------------------------------------------------- keys
def sanitize_key(name: str, max_length: int = MAX_KEY_LENGTH) -> str:
    """A valid MLflow param/metric key for ``name`` (e.g. a predictor name such as ``subs[0].predict``).

    MLflow accepts alphanumerics, ``_ - . /``, spaces (and ``:`` except on Windows, so never used here),
    at most 250 characters, and a name must be its own normalised path (no ``a//b``, ``./x``, ``..``, no
    leading or trailing ``/``). Indexes become path-like: ``subs[0].predict`` -> ``subs.0.predict``.
    A credential-looking part is masked first (names are never redacted afterwards).
    """
    s = re.sub(r"\[(\d+)\]", r".\1", mask_text(str(name)))  # names hold endpoint URLs: never a key
    s = re.sub(r"[^A-Za-z0-9_.\- /]", "_", s).strip("/")
    parts = [p.strip() for p in s.split("/")]
    s = "/".join(p if p not in ("", ".", "..") else "_" for p in parts)
    s = s[:max_length].rstrip("/") or "_"
    if posixpath.normpath(s) != s or s.split("/")[-1] in (".", ".."):  # after the cut: it may end in "/."
        s = s.replace("/", "_")
    return s


class _KeyMap:
    """``sanitize_key`` plus de-duplication: two names never share a key."""

    def __init__(self) -> None:
        self._by_name: dict[str, str] = {}
        self._taken: set[str] = set()

    def __call__(self, prefix: str, name: str) -> str:
        full = f"{prefix}/{name}" if prefix else name
        if full in self._by_name:
            return self._by_name[full]
        base = sanitize_key(full, MAX_KEY_LENGTH - 4)
        key, i = base, 2
        while key in self._taken:
            key, i = f"{base}_{i}", i + 1
        self._taken.add(key)
        self._by_name[full] = key
        return key


def loggable_params(params: Mapping[str, Any]) -> dict[str, str]:
    """The JSON-able entries of ``params`` as MLflow param values; credentials never pass.

    Kept: bools, numbers, strings, and lists / tuples / dicts made only of those (as JSON). Dropped:
    ``None`` values, callables and objects, private names, and every key that names a credential
    (``api_key``, ``wandb_api_key``, ``*_token``, ...). Strings are masked for key-like substrings and the
    values of secret environment variables. An object with a string ``model`` attribute (an LM) is
    logged as that model name.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        if not isinstance(key, str) or key.startswith("_") or is_sensitive_key(key) or value is None:
            continue
        if isinstance(value, _PRIMITIVES):
            text = str(value)
        elif isinstance(value, (list, tuple, dict)) and _is_plain(value):
            text = json.dumps(redact(value), sort_keys=True, default=str)
        elif isinstance(getattr(value, "model", None), str):
            text = value.model
        else:
            continue
        out[key] = _truncate(mask_text(text), MAX_PARAM_VALUE_LENGTH)
    return out


def _is_plain(value: Any, depth: int = 0) -> bool:
    if depth > 4:
        return False
    if value is None or isinstance(value, _PRIMITIVES):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and not is_sensitive_key(k) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------- tracker
class MlflowRunTracker(EngineObserver):
    """Logs a TurboGEPA run to MLflow. Never raises and never blocks the engine.

    Args:
        params: the optimizer's parameters (``optimizer.get_params()``); filtered by :func:`loggable_params`.
        stats_provider: returns the live ``RunStats`` (``lambda: orchestrator.stats``); called only on the
            engine thread, from the hooks. It can also be given later with :meth:`provide_stats`, once
            the engine it reads exists.
        seed_texts: the seed program's instructions, logged as ``seed_instructions/<predictor>`` params.
        trainset_size, valset_size: logged as params.
        tracking_uri: if given, ``mlflow.set_tracking_uri`` (as gepa's ``mlflow_tracking_uri``); otherwise
            the current one.
        experiment_name: if given and a run must be started, ``mlflow.set_experiment`` first.
        run_name: name of a run this tracker starts (default ``"turbogepa"``).
        plot_path: where to draw the best-score-over-time plot (``tracking.plots.plot_best_over_time``; a
            name ending in ``.svg``, or ``.png`` with matplotlib) that is also logged under its file name;
            ``True``: a temporary file ``best_over_time.<plot_format>``; ``None`` (default): no plot.
        plot_format: ``"svg"`` (default) or ``"png"``, for ``plot_path=True``.
        flush_interval: seconds between metric batches sent by the background thread.
        sample_interval: least seconds between two progress samples (a new candidate always samples).
        finish_timeout: how long :meth:`finish` waits for the background thread to upload everything.
        probe_timeout: seconds to wait for an ``http(s)://`` tracking server's ``/health`` before giving up.
        extra_tags: tags set on the run.

    Construct it on the thread that calls ``compile`` (it may start the active run there).
    """

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        *,
        stats_provider: Callable[[], Any] | None = None,
        seed_texts: Mapping[str, str] | None = None,
        trainset_size: int | None = None,
        valset_size: int | None = None,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        plot_path: str | os.PathLike[str] | bool | None = None,
        plot_format: str = "svg",
        flush_interval: float = 1.0,
        sample_interval: float = 1.0,
        finish_timeout: float = 60.0,
        probe_timeout: float = 3.0,
        extra_tags: Mapping[str, str] | None = None,
    ) -> None:
        self.enabled = False
        self.run_id: str | None = None
        self.started_run = False
        self.finished = False
        self._stats_provider = stats_provider
        self._tmpdir: str | None = None
        if plot_format not in ("svg", "png"):
            raise ValueError(f"plot_format={plot_format!r}: use 'svg' or 'png'")
        if isinstance(plot_path, (str, os.PathLike)) and Path(plot_path).suffix.lower() not in PLOT_FORMATS:
            raise ValueError(f"plot_path={os.fspath(plot_path)!r}: the best-score plot is written as SVG or PNG, "
                             "by the file name; give a name ending in .svg or .png, True for a temporary one, "
                             "or None for no plot")
        if plot_path is True:
            self._tmpdir = tempfile.mkdtemp(prefix="turbogepa-mlflow-")
            plot_path = Path(self._tmpdir) / f"best_over_time.{plot_format}"
        self._plot_path = Path(plot_path) if isinstance(plot_path, (str, os.PathLike)) else None
        budget = (params or {}).get("max_metric_calls")
        self._budget = budget if isinstance(budget, int) and not isinstance(budget, bool) else None
        self._flush_interval = max(0.05, float(flush_interval))
        self._sample_interval = float(sample_interval)
        self._finish_timeout = float(finish_timeout)
        self._warned = False
        self._dead = False
        self._run_ended = False
        self._consecutive_failures = 0
        self._keys = _KeyMap()
        self._owner = threading.get_ident()
        # progress state (engine thread)
        self._mutations = 0
        self._best = -math.inf
        self._n_candidates = 0
        self._frontier = FrontierTally()
        self._last_sample = -math.inf
        self._metrics: list[Any] = []
        self._metrics_lock = threading.Lock()
        self._ops: queue.Queue[Any] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._client: Any = None
        self._server_uri: str | None = None
        self._probe_timeout = float(probe_timeout)
        self._last_probe = time.monotonic()  # just probed when the run is started
        self._Metric: Any = None

        try:
            import_in_one_piece("mlflow")  # ~1 s, numpy with it: a Ctrl-C inside would break numpy
            import mlflow
            from mlflow import MlflowClient
            from mlflow.entities import Metric
        except ImportError:
            self._warn("use_mlflow=True but MLflow is not installed (pip install mlflow); the run is not tracked")
            return
        except Exception as exc:  # noqa: BLE001  a broken install (protobuf's "Descriptors cannot be created
            # directly" TypeError, a plugin failing at import) must not fail a compile that tracking only watches
            self._warn(f"use_mlflow=True but MLflow failed to import ({describe_error(exc)}); the run is not "
                       "tracked. Check the install: python -c 'import mlflow'")
            return
        self._Metric = Metric
        before = mlflow.active_run()
        try:
            self._start(mlflow, MlflowClient, tracking_uri, run_name, experiment_name, probe_timeout, params,
                        seed_texts, extra_tags, trainset_size, valset_size)
        except BaseException as exc:  # Ctrl-C while setting up (errors are caught inside): nothing left running
            self._abandon_setup(mlflow, before.info.run_id if before is not None else None, exc)
            raise

    def _start(self, mlflow: Any, client_cls: Any, tracking_uri: str | None, run_name: str | None,
               experiment_name: str | None, probe_timeout: float, params: Mapping[str, Any] | None,
               seed_texts: Mapping[str, str] | None, extra_tags: Mapping[str, Any] | None,
               trainset_size: int | None, valset_size: int | None) -> None:
        """Start or attach to the run and the worker thread; a failure costs a warning, not the compile."""
        try:
            if tracking_uri and mlflow.active_run() is not None and tracking_uri != mlflow.get_tracking_uri():
                # The URI is process-wide: switching it under the user's active run would make their own
                # log calls and the end of their `with mlflow.start_run()` fail, and leave it RUNNING.
                self._warn(f"gepa_kwargs['mlflow_tracking_uri'] ({_safe_uri(tracking_uri)}) is not applied: an MLflow "
                           f"run is active in {_safe_uri(mlflow.get_tracking_uri())}, and this compile logs into it "
                           "there; set the tracking URI before starting your run to log elsewhere")
            elif tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)
            uri = mlflow.get_tracking_uri()
            problem = _probe_tracking_server(uri, probe_timeout)
            if problem is not None:
                self._warn(f"MLflow tracking server {_safe_uri(uri)} is unreachable ({problem}); the run is not "
                           "tracked")
                return
            self._client = client_cls(tracking_uri=uri)
            # On the compile thread, before the search: a server whose /health answers but whose API fails
            # (its database down) must cost a warning, not MLflow's minutes of retries.
            with _few_http_retries(uri.startswith(("http://", "https://")), retries=1, timeout=10):
                self.run_id = self._start_or_attach(mlflow, run_name, experiment_name)
            self._server_uri = uri if uri.startswith(("http://", "https://")) else None
        except Exception as exc:  # noqa: BLE001
            self._warn(f"could not start or attach to an MLflow run ({type(exc).__name__}: {exc}); the run is not "
                       "tracked")
            if self.started_run:
                self._end_started_run("FAILED")
            return
        self.enabled = True
        # in a copy of this context: the run's secrets (store.run_secrets) are masked in its messages too
        self._worker = threading.Thread(target=contextvars.copy_context().run, args=(self._work,),
                                        name="turbogepa-mlflow", daemon=True)
        self._worker.start()

        from dspy_turbogepa import __version__

        tags = {"turbogepa.version": __version__, **{str(k): str(v) for k, v in (extra_tags or {}).items()}}
        run_params = loggable_params(params or {})
        for name, value in (("trainset_size", trainset_size), ("valset_size", valset_size)):
            if value is not None:
                run_params[name] = str(value)
        if seed_texts:
            run_params["num_components"] = str(len(seed_texts))
            for comp, text in seed_texts.items():
                run_params[self._keys("seed_instructions", comp)] = _truncate(mask_text(str(text)),
                                                                              MAX_PARAM_VALUE_LENGTH)
        self._submit("params", lambda c: self._log_params(c, run_params, tags))

    def _abandon_setup(self, mlflow: Any, before: str | None, exc: BaseException) -> None:
        """Ctrl-C while the tracker was being set up, before the compile could register its abort: end the run
        it started (one whose ``start_run`` had returned but was not noted yet too: the active run is another
        than the one before) and stop its worker, or the run stayed RUNNING and active, and the next compile
        in the process attached to it as if it were the user's."""
        if self.enabled:
            self.abort(exc)
            return
        try:
            active = mlflow.active_run()
            if active is not None and (self.started_run or active.info.run_id != before):
                mlflow.end_run(status="FAILED")
        except Exception as end_exc:  # noqa: BLE001 - the interrupt goes on; the run may stay RUNNING
            logger.debug("Could not end the MLflow run started before the interrupt: %s", describe_error(end_exc))
        self._cleanup()

    def provide_stats(self, provider: Callable[[], Any]) -> None:
        """Where the live stats come from, once the engine exists: the tracker is made first, so that a
        compile failing while it is wired up still ends its MLflow run as FAILED."""
        self._stats_provider = provider

    # ------------------------------------------------------------------ engine hooks (engine thread)
    def on_candidate(self, record: CandidateRecord) -> None:
        if not self.enabled or self._dead:
            return
        try:
            idx = record.index
            self._n_candidates += 1
            self._best = max(self._best, record.aggregate)
            self._frontier.add(idx, record.val_scores)
            now = _now_ms()
            self._add_metrics({"candidate_val_score": record.aggregate}, step=idx, timestamp=now)
            self._sample(force=True)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"could not record candidate progress ({type(exc).__name__}: {exc})")

    def on_mutation(self, result: MutationResult, status: str) -> None:
        if not self.enabled or self._dead:
            return
        self._mutations += 1
        try:
            self._sample(force=False)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"could not record progress ({type(exc).__name__}: {exc})")

    def _sample(self, force: bool, stats: Any = None) -> None:
        now = time.monotonic()
        if not force and now - self._last_sample < self._sample_interval:
            return
        self._last_sample = now
        if stats is None and self._stats_provider is not None:
            try:
                stats = self._stats_provider()
            except Exception as exc:  # noqa: BLE001 - a bug reading the stats costs their charts, not the run
                self._warn(f"could not read the run's live stats ({type(exc).__name__}: {exc})")
                stats = None
        values: dict[str, float] = {
            "num_candidates": self._n_candidates,
            "mutations_committed": self._mutations,
        }
        if self._n_candidates:
            values["best_val_score"] = self._best
        front_agg = self._frontier.front_agg
        if front_agg is not None:
            values["pareto_front_size"] = self._frontier.size
            values["pareto_front_agg"] = front_agg
        step = self._mutations
        if stats is not None:
            values.update(stats_metrics(stats))
            step = int(values.get("metric_calls", step))
        self._add_metrics(values, step=step, timestamp=_now_ms())

    # ------------------------------------------------------------------ end of the run (compile thread)
    def finish(self, result: EngineResult, program: Any = None, detailed_results: Any = None,
               artifacts: Iterable[str | os.PathLike[str]] = ()) -> None:
        """Final metrics, params and artifacts; waits (at most ``finish_timeout``) for the uploads, then ends
        the run if this tracker started it. Idempotent; never raises.

        ``artifacts``: more files to upload under ``turbogepa/`` (e.g. ``log_dir``'s ``summary.json`` and
        plots); missing ones are skipped. ``detailed_results`` is accepted for symmetry and not needed.
        """
        if self.finished:
            return
        self.finished = True
        if not self.enabled:
            self._cleanup()
            return
        # The final burst of uploads asks /health first, however recent the last probe: a server that died
        # since would otherwise meet the burst's first call with MLflow's own retries (a minute here).
        self._last_probe = -math.inf
        try:
            try:
                self._finish(result, program)
                for path in artifacts:
                    if Path(path).is_file():
                        self._submit(f"artifact {Path(path).name}", _log_artifact(self.run_id, str(path)))
            except Exception as exc:  # noqa: BLE001
                self._warn(f"could not prepare the final MLflow logs ({type(exc).__name__}: {exc})")
            self._close("FINISHED")
        except BaseException:  # Ctrl-C while finishing: the run must not stay RUNNING (and active) behind
            self._dead = True
            self._ops.put(_STOP)  # the uploader ends after its current call (a second stop is harmless)
            if self.started_run:
                self._end_started_run("KILLED")
            raise

    def abort(self, error: BaseException | None = None) -> None:
        """The compile failed: take a last sample of the live stats, flush what is buffered and end a run this
        tracker started as FAILED."""
        if self.finished:
            return
        self.finished = True
        if not self.enabled:
            self._cleanup()
            return
        # the charts end where the run did, not at the last periodic sample (maybe the seed's)
        self._sample(force=True)
        reason = type(error).__name__ if error is not None else "aborted"
        self._submit("tags", lambda c: c.set_tag(self.run_id, "turbogepa.stop_reason", f"error: {reason}"))
        self._close("FAILED", timeout=min(self._finish_timeout, ABORT_TIMEOUT))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.abort(exc)

    def _finish(self, result: EngineResult, program: Any) -> None:
        records = result.records
        # the last progress sample, from the final stats and every accepted candidate (the engine's
        # frontier is built from the same records, in the same order)
        self._frontier = FrontierTally()
        for r in records:
            self._frontier.add(r.index, r.val_scores)
        self._n_candidates = len(records)
        self._best = max((r.aggregate for r in records), default=self._best)
        self._sample(force=True, stats=result.stats)
        best = records[result.best_index]
        final = {
            "final/best_val_score": best.aggregate,
            "final/seed_val_score": records[0].aggregate if records else 0.0,
            "final/best_candidate_idx": result.best_index,
            "final/num_candidates": len(records),
            "final/total_metric_calls": result.total_metric_calls,
            "final/num_full_val_evals": result.num_full_val_evals,
            "final/wall_seconds": result.wall_seconds,
        }
        self._add_metrics(final, step=budget_metric_calls(result.stats) or result.total_metric_calls,
                          timestamp=_now_ms())
        best_params = {self._keys("best_instructions", comp): _truncate(mask_text(str(text)), MAX_PARAM_VALUE_LENGTH)
                       for comp, text in best.candidate.texts.items()}
        tags = {"turbogepa.stop_reason": str(result.stop_reason)}
        self._submit("final params", lambda c: self._log_params(c, best_params, tags))

        if program is not None:
            program_json, error = _program_json(program)
            if error is not None:  # through _warn: once per tracker, masked
                self._warn(f"could not save the optimized program ({error})")
            if program_json is not None:
                self._submit("optimized program", lambda c: c.log_text(
                    self.run_id, program_json, f"{ARTIFACT_DIR}/optimized_program.json"))
        candidates = candidates_table(result)
        self._submit("candidates table", lambda c: c.log_table(
            self.run_id, candidates, f"{ARTIFACT_DIR}/candidates.json"))
        front = pareto_front_table(result)
        self._submit("pareto front table", lambda c: c.log_table(
            self.run_id, front, f"{ARTIFACT_DIR}/pareto_front.json"))
        summary = run_summary(result)
        self._submit("run summary", lambda c: c.log_dict(self.run_id, summary, f"{ARTIFACT_DIR}/run_summary.json"))
        if self._plot_path is not None:
            written = self._write_plot(result)
            if written is not None:
                self._submit("score plot", lambda c: c.log_artifact(self.run_id, str(written), ARTIFACT_DIR))

    def _close(self, status: str, timeout: float | None = None) -> None:
        timeout = self._finish_timeout if timeout is None else timeout
        self._ops.put(_STOP)
        worker = self._worker
        if worker is not None:
            worker.join(timeout=timeout)
            if worker.is_alive():  # it removes the temporary directory itself when its upload returns
                self._dead = True
                self._warn(f"MLflow uploads did not finish within {timeout:.0f}s; giving up on the rest")
        else:
            self._cleanup()
        if self.started_run:
            self._end_started_run(status)

    def _cleanup(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _start_or_attach(self, mlflow: Any, run_name: str | None, experiment_name: str | None) -> str:
        """The run to log to: the user's active run, a nested one when it already holds a compile, or a new one."""
        assert self._client is not None
        active = mlflow.active_run()
        if active is not None and "turbogepa.version" in self._client.get_run(active.info.run_id).data.tags:
            # The user's run already holds a compile: a second one logged into it would mix params,
            # metric histories and artefacts of both. It gets a run of its own, nested under it.
            logger.info("MLflow run %s already holds a TurboGEPA compile; this one logs to a nested run",
                        active.info.run_id)
            active = mlflow.start_run(run_name=run_name or "turbogepa", nested=True,
                                      tags={"turbogepa.tracker": "MlflowRunTracker"})
            self.started_run = True
        elif active is None:
            experiment_id = None
            if experiment_name:
                # set process-wide as gepa does, but the run is started in it by id: another compile's
                # set_experiment between the two calls would otherwise put this run in its experiment
                experiment_id = mlflow.set_experiment(experiment_name).experiment_id
            active = mlflow.start_run(run_name=run_name or "turbogepa", experiment_id=experiment_id,
                                      tags={"turbogepa.tracker": "MlflowRunTracker"})
            self.started_run = True
        return str(active.info.run_id)

    def _end_started_run(self, status: str) -> None:
        """End the run this tracker started; a dead server gets no retries (it would block for minutes)."""
        if self._run_ended:
            return
        self._run_ended = True
        try:
            import mlflow

            with _few_http_retries(self._dead or not self.enabled):
                active = mlflow.active_run()
                if active is not None and active.info.run_id == self.run_id and threading.get_ident() == self._owner:
                    mlflow.end_run(status=status)
                elif self.run_id is not None and self._client is not None:
                    self._client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"could not end the MLflow run ({type(exc).__name__}: {exc})")

    # ------------------------------------------------------------------ background thread
    def _add_metrics(self, values: Mapping[str, float], step: int, timestamp: int) -> None:
        metrics = []
        for name, value in values.items():
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            metrics.append(self._Metric(key=self._keys("", name), value=v, timestamp=timestamp, step=int(step)))
        with self._metrics_lock:
            self._metrics.extend(metrics)

    def _submit(self, what: str, fn: Callable[[Any], None]) -> None:
        if self.enabled and not self._dead:
            self._ops.put((what, fn))

    def _work(self) -> None:
        while True:
            try:
                op = self._ops.get(timeout=self._flush_interval)
            except queue.Empty:
                op = None
            self._flush_metrics()
            if op is _STOP:
                self._flush_metrics()
                self._cleanup()  # here, not in _close: after a timeout the worker may still be uploading a plot
                return
            if op is not None:
                self._call(op[0], op[1])

    def _flush_metrics(self) -> None:
        with self._metrics_lock:
            metrics, self._metrics = self._metrics, []
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            chunk = metrics[i: i + METRICS_PER_BATCH]
            self._call("metrics", _log_metrics(self.run_id, chunk))

    def _call(self, what: str, fn: Callable[[Any], None]) -> None:
        if self._dead or not self._server_alive():
            return
        try:
            # MLflow retries a 5xx 7 times with backoff, minutes per call: a server whose backend fails
            # while its /health still answers (a database gone) held compile() at close for the whole
            # upload wait. A few retries let the failure count stop the uploads instead.
            with _few_http_retries(self._server_uri is not None, retries=UPLOAD_HTTP_RETRIES, timeout=None):
                fn(self._client)
            self._consecutive_failures = 0
        except Exception as exc:  # noqa: BLE001
            self._consecutive_failures += 1
            if _looks_unreachable(exc):
                self._last_probe = -math.inf  # the next call asks /health first instead of retrying blind
            self._warn(f"MLflow logging failed ({what}: {type(exc).__name__}: {_short(exc)}); the run continues")
            if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                self._dead = True
                logger.debug("MLflow tracking stopped after %d consecutive failures", self._consecutive_failures)

    def _server_alive(self) -> bool:
        """For an HTTP store, a quick ``/health`` check (at most once per flush interval) before MLflow calls:
        a dead server then costs one short timeout, not MLflow's retries with backoff (minutes per call)."""
        if self._server_uri is None:
            return True
        now = time.monotonic()
        if now - self._last_probe < self._flush_interval:
            return True
        self._last_probe = now
        problem = _probe_tracking_server(self._server_uri, self._probe_timeout)
        if problem is None:
            return True
        self._dead = True
        self._warn(f"MLflow tracking server {_safe_uri(self._server_uri)} stopped answering ({problem}); nothing "
                   "more is logged for this run")
        return False

    def _log_params(self, client: Any, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        """One batch when possible; else one by one, skipping what MLflow refuses (e.g. a key the user
        already logged with another value) — a refused param must not lose the others."""
        from mlflow.entities import Param, RunTag

        items = [Param(k, v) for k, v in params.items()]
        tag_items = [RunTag(k, _truncate(v, MAX_TAG_VALUE_LENGTH)) for k, v in tags.items()]
        try:
            for i in range(0, max(len(items), 1), PARAMS_PER_BATCH):
                client.log_batch(self.run_id, params=items[i: i + PARAMS_PER_BATCH],
                                 tags=tag_items if i == 0 else [])
            return
        except Exception as exc:
            if _looks_unreachable(exc):
                raise
            # masked: the refusal may quote a value of the user's own params
            logger.debug("MLflow refused a param batch (%s); logging params one by one", describe_error(exc))
        refused: list[str] = []
        for p in items:
            try:
                client.log_param(self.run_id, p.key, p.value)
            except Exception as exc:
                if _looks_unreachable(exc):
                    raise
                refused.append(p.key)
                logger.debug("MLflow refused param %s: %s", p.key, describe_error(exc))
        if refused:  # the run now shows another value for them: say so, or it misstates this compile
            self._warn(f"MLflow refused the params {', '.join(refused)}: already logged in this run with other "
                       "values (the run shows those, not this compile's), or invalid (not logged)")
        for t in tag_items:
            client.set_tag(self.run_id, t.key, t.value)

    def _write_plot(self, result: EngineResult) -> Path | None:
        """Drawn on the calling (compile) thread, so the SVG exists before the worker uploads it."""
        assert self._plot_path is not None
        try:
            from dspy_turbogepa.tracking.plots import plot_best_over_time

            return Path(plot_best_over_time(result, self._plot_path, budget=self._budget))
        except ImportError:
            self._warn("matplotlib is not installed, so there is no PNG best-score plot (pip install matplotlib, "
                       "or draw it as .svg)")
        except Exception as exc:  # noqa: BLE001
            self._warn(f"could not draw the best-score plot ({type(exc).__name__}: {exc})")
        return None

    # ------------------------------------------------------------------ misc
    def _warn(self, message: str) -> None:
        message = mask_text(message)  # error texts may quote URIs or headers with credentials
        if not self._warned:
            self._warned = True
            logger.warning("MLflow tracking: %s. (Further MLflow problems in this run are logged at debug level.)",
                           message)
        else:
            logger.debug("MLflow tracking: %s", message)


_STOP = object()


class _HttpRetryOverride:
    """MLflow reads its HTTP retries and timeout from the environment, which is the process's: two
    compiles on two threads that each saved and restored the variables left the second one's saved
    copy (the first one's override) in place for good, and the user's later MLflow calls got one
    retry. So the override is shared: the first entry saves the user's values, the last exit puts
    them back, and while several are on the most lenient of them applies."""

    _NAMES = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: list[tuple[int, int | None]] = []
        self._saved: dict[str, str | None] = {}

    @contextlib.contextmanager
    def __call__(self, enabled: bool, retries: int = 0, timeout: int | None = 5) -> Iterator[None]:
        if not enabled:
            yield
            return
        entry = (retries, timeout)
        with self._lock:
            if not self._active:
                self._saved = {name: os.environ.get(name) for name in self._NAMES}
            self._active.append(entry)
            self._apply()
        try:
            yield
        finally:
            with self._lock:
                self._active.remove(entry)
                self._apply()

    def _apply(self) -> None:
        retries_name, timeout_name = self._NAMES
        if not self._active:
            for name in self._NAMES:
                self._put_back(name)
            return
        retries = max(r for r, _ in self._active)
        user_retries = self._saved.get(retries_name)
        if user_retries is not None and user_retries.strip().isdigit():  # fewer, never more, than the user's
            retries = min(retries, int(user_retries))
        os.environ[retries_name] = str(retries)
        timeouts = [t for _, t in self._active if t is not None]
        if timeouts:
            os.environ[timeout_name] = str(max(timeouts))
        else:
            self._put_back(timeout_name)

    def _put_back(self, name: str) -> None:
        previous = self._saved.get(name)
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


#: MLflow's HTTP retries with backoff take minutes against a server that answers 5xx: while this is on,
#: it retries ``retries`` times at most (fewer if the user set fewer), each request waiting ``timeout``
#: seconds (None: the user's or MLflow's timeout). Process-wide, as MLflow reads them from the environment.
_few_http_retries = _HttpRetryOverride()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _log_artifact(run_id: str | None, path: str) -> Callable[[Any], None]:
    """One queued MLflow client call, its arguments bound now (a loop's lambda would see the last)."""
    return lambda client: client.log_artifact(run_id, path, ARTIFACT_DIR)


def _log_metrics(run_id: str | None, metrics: list[Any]) -> Callable[[Any], None]:
    return lambda client: client.log_batch(run_id, metrics=metrics)


def _short(exc: BaseException | str, limit: int = 300) -> str:
    """Masked, then cut: cut first, a credential across the cut kept its head unmasked."""
    return _truncate(mask_text(str(exc)).replace("\n", " "), limit)


def _looks_unreachable(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("ConnectionError", "Max retries exceeded", "Connection refused", "Timeout",
                                   "timed out", "Failed to establish"))


def _safe_uri(uri: str) -> str:
    """The URI without credentials (``https://user:pass@host`` -> ``https://host``)."""
    return mask_text(strip_userinfo(uri))


def _mlflow_tls_settings(uri: str) -> dict[str, Any]:
    """``requests`` arguments for the TLS settings MLflow's own client uses (``MLFLOW_TRACKING_INSECURE_TLS``,
    ``_SERVER_CERT_PATH``, ``_CLIENT_CERT_PATH``, read by MLflow itself): a server behind a private CA or
    asking for a client certificate, which MLflow reaches, must not look down to the health check (it
    did, and nothing was tracked)."""
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    out: dict[str, Any] = {"verify": creds.verify}
    if creds.client_cert_path:
        out["cert"] = creds.client_cert_path
    return out


def _probe_tracking_server(uri: str, timeout: float) -> str | None:
    """``None`` if ``uri`` is not an HTTP server, or one that can take calls; else what went wrong.

    A 5xx answer counts as down: a proxy in front of a dead MLflow backend answers, and MLflow's own
    client would then retry every call for minutes on the compile thread. A 4xx (a server without
    ``/health``, or one that wants auth for it) counts as up: the real calls will tell."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        import requests

        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout, **_mlflow_tls_settings(uri))
    except Exception as exc:  # noqa: BLE001
        hint = (" (MLflow's TLS settings are honoured: MLFLOW_TRACKING_SERVER_CERT_PATH for a private CA, "
                "MLFLOW_TRACKING_INSECURE_TLS=true to skip verification)"
                if "SSL" in type(exc).__name__ or "CERTIFICATE" in str(exc) else "")
        return f"{type(exc).__name__}: {_short(mask_text(str(exc)), 200)}{hint}"
    if response.status_code >= 500:
        return f"HTTP {response.status_code} from {_safe_uri(uri)}/health"
    return None


def stats_metrics(stats: Any) -> dict[str, float]:
    """Metrics from a ``RunStats`` (attributes read defensively: fields may be added or renamed)."""
    def g(name: str) -> Any:
        return getattr(stats, name, None)

    out: dict[str, float] = {}
    calls = budget_metric_calls(stats)
    if calls is not None:
        out["metric_calls"] = float(calls)
    simple = {
        "metric_calls_replayed": "replayed",
        "cache_hits": "cache_hits",
        "rate_limit_retries": "rate_limit_retries",
        "lm/reflection_calls": "reflection_calls",
        "lm/reflection_prompt_tokens": "reflection_prompt_tokens",
        "lm/reflection_completion_tokens": "reflection_completion_tokens",
        "lm/task_prompt_tokens": "task_prompt_tokens",
        "lm/task_completion_tokens": "task_completion_tokens",
        "lm/task_calls": "task_lm_calls",
        "metric_feedback_calls": "feedback_calls",
        "cost/task_usd": "task_cost",
        "cost/reflection_usd": "reflection_cost",
        "evals_in_flight_peak": "peak_evals_in_flight",
        "mutations_in_flight_peak": "peak_mutations_in_flight",
    }
    for metric, attr in simple.items():
        value = g(attr)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric] = float(value)
    if "cost/task_usd" in out or "cost/reflection_usd" in out:
        out["cost/total_usd"] = out.get("cost/task_usd", 0.0) + out.get("cost/reflection_usd", 0.0)
    for prefix, attr in (("mutations", "mutations"), ("failures", "failures"), ("proposal_skips", "proposal_skips"),
                         ("reflective_records_skipped", "reflective_records_skipped")):
        counter = g(attr)
        if isinstance(counter, Mapping):
            for k, v in counter.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{prefix}/{k}"] = float(v)
    rate_limits = g("rate_limits")  # filled by the evaluation layer: 429s, retries, backoff seconds, ...
    if isinstance(rate_limits, Mapping):
        # depth 3: rate_limits/endpoints/<endpoint>/window (the in-flight window) and its other counters
        out.update(_numeric_leaves(rate_limits, "rate_limits", depth=3))
    return out


def budget_metric_calls(stats: Any) -> int | None:
    """Metric calls counted against this session's budget: executed now, plus stored ones replayed.

    The x-axis of every progress metric: a resumed run's curves continue where the budget stands (on
    ``executed`` alone they all sat at step 0 when everything was replayed), as the progress display
    counts."""
    executed, replayed = getattr(stats, "executed", None), getattr(stats, "replayed", 0)
    if not isinstance(executed, int) or isinstance(executed, bool):
        return None
    return executed + (replayed if isinstance(replayed, int) and not isinstance(replayed, bool) else 0)


def _numeric_leaves(data: Mapping[Any, Any], prefix: str, depth: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in data.items():
        key = f"{prefix}/{k}"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, Mapping) and depth > 1:
            out.update(_numeric_leaves(v, key, depth - 1))
    return out


def _program_json(program: Any) -> tuple[str | None, str | None]:
    """The program as dspy saves it, credentials masked; or None and why it could not be saved."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "program.json"
            program.save(str(path))
            state = json.loads(path.read_text(encoding="utf-8"))
            # DSPy's save writes a predictor LM's settings (extra_headers, aws_secret_access_key, ...),
            # leaving out only api_key: those settings are redacted by field name; the rest (demos may
            # have a field called "token") only where a string looks like a credential
            for entry in ([state] if "lm" in state else state.values() if isinstance(state, dict) else []):
                if isinstance(entry, dict) and isinstance(entry.get("lm"), dict):
                    entry["lm"] = redact(entry["lm"])
            return mask_json_text(json.dumps(state, ensure_ascii=False, indent=2)), None
    except Exception as exc:  # noqa: BLE001  # reported by the caller: a report is never worth the run
        return None, f"{type(exc).__name__}: {exc}"


def _front_sets(result: EngineResult) -> dict[int, set[int]]:
    return {vid: set(f) for vid, f in result.fronts.items()}


def candidates_table(result: EngineResult) -> dict[str, list[Any]]:
    """One row per candidate: id, parents, kind, scores, discovery, whether on the Pareto front, texts."""
    fronts = _front_sets(result)
    on_front: dict[int, int] = {}
    for members in fronts.values():
        for i in members:
            on_front[i] = on_front.get(i, 0) + 1
    comps: list[str] = []
    for r in result.records:
        comps.extend(c for c in r.candidate.texts if c not in comps)
    table: dict[str, list[Any]] = {k: [] for k in (
        "id", "parents", "kind", "val_score", "num_val", "front_instances", "is_best", "discovery_seconds",
        "discovery_metric_calls", "mutation_seq", "fingerprint", "val_subscores")}
    for comp in comps:
        table[f"instructions:{comp}"] = []
    for r in result.records:
        table["id"].append(r.index)
        table["parents"].append(json.dumps(list(r.parent_indices)))
        table["kind"].append(r.candidate.kind)
        table["val_score"].append(r.aggregate)
        table["num_val"].append(len(r.val_scores))
        table["front_instances"].append(on_front.get(r.index, 0))
        table["is_best"].append(r.index == result.best_index)
        table["discovery_seconds"].append(round(r.discovery_seconds, 3))
        table["discovery_metric_calls"].append(r.reported_discovery_calls)
        table["mutation_seq"].append(-1 if r.mutation_seq is None else r.mutation_seq)
        table["fingerprint"].append(r.candidate.fingerprint)
        table["val_subscores"].append(json.dumps({str(k): v for k, v in sorted(r.val_scores.items())}))
        for comp in comps:
            table[f"instructions:{comp}"].append(mask_text(str(r.candidate.texts.get(comp, ""))))
    return table


def pareto_front_table(result: EngineResult) -> dict[str, list[Any]]:
    """One row per validation instance: the best score on it and the candidates that reach it."""
    fronts = _front_sets(result)
    table: dict[str, list[Any]] = {"val_id": [], "best_score": [], "num_candidates": [], "candidates": []}
    for vid in sorted(fronts):
        members = sorted(fronts[vid])
        best = max((result.records[i].val_scores.get(vid, 0.0) for i in members), default=0.0)
        table["val_id"].append(vid)
        table["best_score"].append(best)
        table["num_candidates"].append(len(members))
        table["candidates"].append(json.dumps(members))
    return table


def run_summary(result: EngineResult) -> dict[str, Any]:
    fronts = _front_sets(result)
    stats = result.stats.to_dict() if hasattr(result.stats, "to_dict") else {}
    return redact({
        "stop_reason": result.stop_reason,
        "best_candidate_idx": result.best_index,
        "best_val_score": result.best.aggregate,
        "val_aggregate_scores": [r.aggregate for r in result.records],
        "parents": [list(r.parent_indices) for r in result.records],
        "candidate_kinds": [r.candidate.kind for r in result.records],
        "pareto_front_candidates": sorted(pareto_front_members(fronts, {r.index: r.aggregate for r in result.records})),
        "per_val_instance_best_candidates": {str(k): sorted(v) for k, v in sorted(fronts.items())},
        "total_metric_calls": result.total_metric_calls,
        "num_full_val_evals": result.num_full_val_evals,
        "wall_seconds": result.wall_seconds,
        "run_stats": stats,
    })


__all__ = [
    "ARTIFACT_DIR",
    "MlflowRunTracker",
    "candidates_table",
    "loggable_params",
    "pareto_front_table",
    "run_summary",
    "sanitize_key",
    "stats_metrics",
]
