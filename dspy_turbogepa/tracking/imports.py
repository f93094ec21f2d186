"""Heavy optional imports (MLflow for tracking, with numpy), made in one piece.

Why: an import cut short by Ctrl-C cannot always be undone. MLflow pulls numpy in when the program
never did, and numpy's C core refuses to load twice in a process: a KeyboardInterrupt half-way through
numpy's ``__init__`` left numpy broken for the rest of the process (the user's own code too), whatever
was dropped from ``sys.modules`` afterwards. So the first import runs with Ctrl-C held, and a press is
delivered as soon as it is done, to the handler that was there before.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["drop_cut_short_imports", "import_in_one_piece"]


def import_in_one_piece(*modules: str) -> None:
    """Import ``modules`` (an ImportError propagates) with Ctrl-C held while any is new."""
    missing = [name for name in modules if name not in sys.modules]
    if not missing:
        return
    with ctrl_c_held():
        for name in missing:
            importlib.import_module(name)


@contextmanager
def ctrl_c_held(second_press_escapes: bool = False,
                on_first_press: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold SIGINT for the block; then give each press, in order, to the handler that was there before.
    ``second_press_escapes``: a second press while one is held hands both to that handler at once, inside
    the block (for a block that waits on the network: a hung server must not hold Ctrl-C for minutes).
    ``on_first_press``: called (from the signal handler) when the first press is held, for what must not
    wait for the block: a search told to stop at once spends no more of the budget while it runs.

    Only the main thread receives signals; SIGINT ignored, or handled outside Python, is left alone.
    A Python-level handler is called directly (``signal.raise_signal`` would also write the signal
    to a wakeup fd a second time, and an asyncio ``add_signal_handler`` callback would run twice);
    the default action (SIG_DFL) is raised as the signal. The handler is put back even when another
    signal's handler raises while it is being swapped.
    """
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None or previous is signal.SIG_IGN:
        yield
        return
    held: list[FrameType | None] = []

    def hold(_signum: int, frame: FrameType | None) -> None:
        if second_press_escapes and held:
            # both presses go to the handler that was there, now (the default one raises KeyboardInterrupt
            # here, inside the block): none is delivered again after it
            frames = [*held, frame]
            held.clear()
            _deliver(previous, frames)
            return
        held.append(frame)
        if on_first_press is not None and len(held) == 1:
            on_first_press()

    try:
        signal.signal(signal.SIGINT, hold)
        yield
    finally:
        try:
            signal.signal(signal.SIGINT, previous)
        finally:
            if signal.getsignal(signal.SIGINT) is not previous:  # the swap itself was cut short
                signal.signal(signal.SIGINT, previous)
        _deliver(previous, held)


def _deliver(handler: Any, frames: list[FrameType | None]) -> None:
    for frame in frames:
        if callable(handler):
            handler(signal.SIGINT, frame)  # the default handler raises KeyboardInterrupt here
        else:
            signal.raise_signal(signal.SIGINT)


def drop_cut_short_imports(before: set[str]) -> None:
    """Forget the modules an interrupted import left behind, so that the next import loads them afresh.

    Why: a Ctrl-C inside an import fails the packages whose ``__init__`` was running (Python removes
    those), but their submodules that had finished stay in ``sys.modules`` bound to the dead package
    object, and a later import of the package picks them up half-wired. Dropped: every module new
    since ``before`` with an enclosing package no longer loaded; whatever another thread imported
    meanwhile (the user's pyplot) is kept. MLflow's own first import, with numpy, which cannot be
    repaired this way, is made with Ctrl-C held (:func:`import_in_one_piece`).
    """
    for name in sorted(set(sys.modules) - before):
        parts = name.split(".")
        if any(".".join(parts[:i]) not in sys.modules for i in range(1, len(parts))):
            sys.modules.pop(name, None)
