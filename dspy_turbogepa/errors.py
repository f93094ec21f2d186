"""Exceptions raised for bad arguments.

dspy.GEPA reports several argument errors with ``assert`` (``AssertionError``). Code written against
it may catch that type, so our configuration errors are *both* ``AssertionError`` and ``ValueError``:
old ``except AssertionError`` blocks keep working, new code can catch the more natural ``ValueError``,
and unlike an ``assert`` the check survives ``python -O``.
"""

from __future__ import annotations

from dspy_turbogepa.engine.errors import SystemicFailureError


class ConfigurationError(ValueError, AssertionError):
    """An argument of ``TurboGEPA(...)`` or ``compile(...)`` is invalid; the message names the fix."""


__all__ = ["ConfigurationError", "SystemicFailureError"]
