"""Where a compile's log lines go on the console: shown at all when nothing is set up to show them,
named by compile when several run at once, and written through tqdm while a progress bar is up, so a
line never tears the bar.

Why its own module: these decide the process's logging configuration (process-wide, guarded by one
lock), which the progress display only borrows while its bar is shown.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, TypeGuard

__all__ = ["console_through_tqdm", "quiet_by_logging", "stdout_through_tqdm", "terminal_size", "visible_logs"]


def quiet_by_logging(log: logging.Logger) -> bool:
    """True when ``log`` or an ancestor below the root has an explicit level above INFO."""
    current: logging.Logger | None = log
    while current is not None and current is not logging.root:
        if current.level != logging.NOTSET:
            return current.level > logging.INFO
        current = current.parent
    return False


def terminal_size(stream: Any) -> tuple[int, int]:
    """(columns, rows) of the terminal behind ``stream``; (100, 24) when unknown. Some ptys report
    0 x 0, and tqdm hides a bar whose position is not above the reported row count."""
    import os
    import shutil

    try:
        size = os.get_terminal_size(stream.fileno())
        cols, rows = size.columns, size.lines
    except (AttributeError, OSError, ValueError):
        cols = rows = 0
    if not cols or not rows:
        fallback = shutil.get_terminal_size((100, 24))
        cols, rows = cols or fallback.columns or 100, rows or fallback.lines or 24
    return max(40, cols), max(2, rows)


def _is_console_handler(handler: logging.Handler) -> TypeGuard[logging.StreamHandler[Any]]:
    """A handler writing to the console: stdout, stderr, or dspy's own stream (which writes to stderr:
    dspy's log lines tore the bar)."""
    if not isinstance(handler, logging.StreamHandler):
        return False
    stream = getattr(handler, "stream", None)
    return stream in (sys.stdout, sys.stderr) or (stream is not None and stream is _dspy_stream())


class _TqdmStream:
    """A console stream whose writes go through ``tqdm.write``: a log line clears the bar, is written,
    and the bar is drawn again below it."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        #: progress bars shown that route this handler through tqdm (compiles in threads share handlers):
        #: the raw stream comes back when the last one closes
        self.bars = 1

    def write(self, text: str) -> int:
        from tqdm import tqdm

        if getattr(self.stream, "enabled", True) is False:  # dspy.disable_logging()
            return len(text)
        # dspy's stream writes to whatever sys.stderr is: tqdm must clear the bar drawn there
        file = sys.stderr if self.stream is _dspy_stream() else self.stream
        tqdm.write(text, file=file, end="")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def stdout_through_tqdm() -> contextlib.AbstractContextManager[Any]:
    """``print()`` output goes through ``tqdm.write`` while this is on: MLflow prints a "View run" line
    to stdout for every run autolog ends, which landed in the middle of the bar."""
    return contextlib.redirect_stdout(_TqdmStream(sys.stdout))


@contextmanager
def console_through_tqdm(loggers: Iterable[logging.Logger]) -> Iterator[None]:
    """Each console handler of ``loggers`` writes through tqdm while the bar is shown, and is given its
    stream back after. Only the stream is swapped: tqdm's ``logging_redirect_tqdm`` replaced the
    handlers by one of its own that kept the first one's stream and filters but not its level, so
    DEBUG lines reached a console set to WARNING, and a WARNING meant for stderr met stdout's filter."""
    routed: list[tuple[logging.StreamHandler[Any], _TqdmStream]] = []
    try:
        with _VISIBLE_LOGS_LOCK:
            for lg in loggers:
                for handler in lg.handlers:
                    if any(handler is h for h, _ in routed):
                        continue
                    current = getattr(handler, "stream", None)
                    if isinstance(current, _TqdmStream):  # another compile's bar routes it already
                        current.bars += 1
                        routed.append((handler, current))  # type: ignore[arg-type]  # a StreamHandler here
                    elif _is_console_handler(handler):
                        tqdm_stream = _TqdmStream(handler.stream)
                        handler.setStream(tqdm_stream)
                        routed.append((handler, tqdm_stream))
        yield
    finally:
        with _VISIBLE_LOGS_LOCK:
            for handler, tqdm_stream in reversed(routed):
                tqdm_stream.bars -= 1
                if tqdm_stream.bars == 0 and handler.stream is tqdm_stream:
                    handler.setStream(tqdm_stream.stream)


if TYPE_CHECKING:
    _StreamHandler = logging.StreamHandler[Any]
else:  # logging.StreamHandler is subscriptable at run time only from Python 3.11
    _StreamHandler = logging.StreamHandler


@dataclass(frozen=True)
class _CompileLogs:
    """How the running compile's log records are shown by the shared handler."""

    label: str
    #: False for ``verbose=False``: its records below WARNING are not shown by the shared handler
    visible: bool


#: The running compile's :class:`_CompileLogs`, read by the shared handler's filter in whichever thread
#: logs (the engine thread and the worker pools run in copies of the compile's context).
_COMPILE_LOGS: ContextVar[_CompileLogs | None] = ContextVar("turbogepa_compile_logs", default=None)


class _CompileLogHandler(_StreamHandler):
    """The handler :func:`visible_logs` installs; compiles running at once in threads share it.

    While more than one compile uses it, each record names the compile that wrote it (``[#2]``, or the
    log_dir's name): two seeds of one program otherwise print the same lines. A ``verbose=False``
    compile's records below WARNING are dropped: alone, it shows nothing but warnings (Python's
    last-resort handler), and a verbose compile beside it must not change that."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        #: verbose compiles using it (it is removed when the last one ends)
        self.users = 0
        #: compiles running while it is installed, verbose or not (lines are labelled while more than one)
        self.active = 0
        #: compiles started while it was installed: their numbers
        self.started = 0
        #: the labels of the compiles running (two log_dirs may end in the same name: runs/a/logs, runs/b/logs)
        self.labels: Counter[str] = Counter()
        # dspy's line format and date format (dspy.utils.logging_utils), so our lines read like its own
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(turbogepa_compile)s%(message)s",
                                            datefmt="%Y/%m/%d %H:%M:%S"))
        self.addFilter(self._stamp)

    def _stamp(self, record: logging.LogRecord) -> bool:
        state = _COMPILE_LOGS.get()
        if state is not None and not state.visible and record.levelno < logging.WARNING:
            return False
        record.turbogepa_compile = f"[{state.label}] " if state is not None and self.active > 1 else ""
        return True


#: Guards the shared handler of :func:`visible_logs` (logging configuration is process-wide anyway).
_VISIBLE_LOGS_LOCK = threading.Lock()


def _dspy_stream() -> Any:
    """dspy's log stream (stderr, silenced by ``dspy.disable_logging()``), or None if it is gone."""
    try:
        from dspy.utils.logging_utils import DSPY_LOGGING_STREAM
    except ImportError:
        return None
    return DSPY_LOGGING_STREAM


class _LevelRaised(logging.NullHandler):
    """Marks, on this package's logger, that verbose compiles set it to INFO so that the user's root
    handler shows their progress, and counts them (the level is reset when the last one ends)."""

    def __init__(self) -> None:
        super().__init__()
        self.users = 0


def _root_handler_at_default_level(log: logging.Logger) -> bool:
    """``logging.basicConfig()`` and nothing else: a handler on the root, whose threshold is still the
    default WARNING, and nothing set on this package's loggers. dspy's INFO lines reach that handler
    (dspy sets its own logger to INFO), ours were dropped by the root's threshold: a notebook that called
    ``basicConfig()`` showed dspy.GEPA's progress and none of ours."""
    if log.level != logging.NOTSET or not log.propagate or log.handlers or logging.root.level != logging.WARNING:
        return False
    return bool(logging.root.handlers) and not any(
        sub.handlers or sub.level != logging.NOTSET for sub in _sub_loggers(log))


def _logging_configured(log: logging.Logger) -> bool:
    """Whether the user set up anything that decides what this package's logs show: a handler on its
    path or on one of its sub-loggers, a level on it, propagation off, or a root threshold above the
    default."""
    if log.hasHandlers() or log.level != logging.NOTSET or not log.propagate or logging.root.level > logging.WARNING:
        return True
    return any(sub.handlers for sub in _sub_loggers(log))


def _sub_loggers(log: logging.Logger) -> list[logging.Logger]:
    """The loggers created under ``log`` (placeholders left out)."""
    prefix = log.name + "."
    return [other for name, other in list(logging.root.manager.loggerDict.items())
            if name.startswith(prefix) and isinstance(other, logging.Logger)]


@contextmanager
def visible_logs(enabled: bool = True, label: str | None = None) -> Iterator[None]:
    """While a compile runs: show this package's INFO logs on stderr if nothing is configured to.

    dspy.GEPA's progress and result reach a process that never set up logging (a script run under
    nohup, CI, a batch job) because dspy gives its own logger a handler at import. Ours live under
    ``dspy_turbogepa``, where such a process shows only warnings (Python's last-resort handler): the
    progress lines and the final result were silent, and warnings written by that handler tore the
    progress bar. So when nothing is set up (see :func:`_logging_configured`) this logger gets a
    handler for the compile, in dspy's format and on dspy's stream (``dspy.disable_logging()``
    silences it too), removed when the last compile using it ends.

    ``label`` names this compile's lines while several share the handler (default ``#n``, in the order
    they started); ``enabled=False`` keeps this compile's INFO lines off a handler another one installed.

    After ``logging.basicConfig()`` alone (see :func:`_root_handler_at_default_level`) no handler is
    added: this logger is set to INFO for the compile, as dspy's is, so the progress reaches the user's
    own handler in their format. (A ``verbose=False`` compile running beside a verbose one then shows
    its INFO lines there too.)
    """
    log = logging.getLogger("dspy_turbogepa")
    raised: _LevelRaised | None = None
    number = 0
    with _VISIBLE_LOGS_LOCK:
        handler = next((h for h in log.handlers if isinstance(h, _CompileLogHandler)), None)
        existing = next((h for h in log.handlers if isinstance(h, _LevelRaised)), None)
        if enabled and handler is None and (existing is not None or _root_handler_at_default_level(log)):
            raised = existing
            if raised is None:
                raised = _LevelRaised()
                log.addHandler(raised)
                log.setLevel(logging.INFO)
            raised.users += 1
        if enabled and handler is None and raised is None and not _logging_configured(log):
            handler = _CompileLogHandler(_dspy_stream() or sys.stderr)
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        if handler is not None:  # a quiet compile is numbered and counted too: its warnings show there
            handler.active += 1
            handler.started += 1
            number = handler.started
            if enabled:
                handler.users += 1
            if label is not None and handler.labels[label]:  # named like one running: numbered too
                label = f"{label}#{number}"
            handler.labels[label or f"#{number}"] += 1
    shown = label or (f"#{number}" if number else "quiet")
    token = _COMPILE_LOGS.set(_CompileLogs(shown, enabled))
    try:
        yield
    finally:
        _COMPILE_LOGS.reset(token)
        if raised is not None:
            with _VISIBLE_LOGS_LOCK:
                raised.users -= 1
                if raised.users == 0:
                    log.removeHandler(raised)
                    if log.level == logging.INFO:  # unless the user changed it meanwhile
                        log.setLevel(logging.NOTSET)
        if handler is not None:
            with _VISIBLE_LOGS_LOCK:
                handler.active -= 1
                handler.users -= int(enabled)
                handler.labels[shown] -= 1
                if enabled and handler.users == 0:
                    log.removeHandler(handler)
                    if log.level == logging.INFO:  # unless the user changed it meanwhile
                        log.setLevel(logging.NOTSET)
