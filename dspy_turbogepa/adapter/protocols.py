"""Checking, before any LM call, that a user's callable can be called the way GEPA will call it.

A proposer or selector with the wrong parameters otherwise fails on its first use, after the seed's
validation pass and a reflection have been paid for (50 student calls in a reported case).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any


def check_call_protocol(
    fn: Any, argument: str, protocol: str, *, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> None:
    """Raise ``TypeError`` naming ``argument`` and the expected ``protocol`` when ``fn`` cannot be
    called with ``args`` / ``kwargs`` (placeholders: only their number and names matter). A callable
    without a readable signature (a builtin, some C extensions) is let through: nothing to check."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    kwargs = dict(kwargs or {})
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        try:  # ``functools.wraps`` shows the wrapped function, whose first arguments the decorator may
            # supply: accepted when the wrapper takes the call and the wrapped function takes all of it
            # but those (a wrapper taking anything must not let a wrong signature through)
            inspect.signature(fn, follow_wrapped=False).bind(*args, **kwargs)
            sig.bind_partial(*args, **kwargs)
            return
        except (TypeError, ValueError):
            pass
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        raise TypeError(
            f"{argument} is called as {protocol}, but its signature is {name}{sig} ({exc}). "
            f"Give it those parameters."
        ) from exc
