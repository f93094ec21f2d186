"""Self-registration with ``mlflow.dspy.autolog`` (import-order robustness).

``mlflow.dspy.autolog()`` patches ``compile`` of the *direct* subclasses of ``Teleprompter`` that exist
when it is called. ``TurboGEPA`` is one, so autolog turned on *after* ``dspy_turbogepa`` is imported
records it by itself. When autolog was turned on *before* the import, the class did not exist yet:
:func:`register_with_mlflow_autolog` applies the same patch at import time.

It never imports MLflow (about 250 MB) unless MLflow is already imported, and never raises: the patch
uses private MLflow API (``mlflow.dspy.autolog._patched_compile``), so a failure only warns, once.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

FLAVOR_NAME = "dspy"
#: Set once the registration failure has been reported (it is the same failure for every import).
_FAILURE_REPORTED = threading.Event()


def dspy_autolog_enabled() -> bool:
    """Whether ``mlflow.dspy.autolog()`` (or ``mlflow.autolog()`` covering DSPy) is on. Never imports MLflow."""
    if "mlflow" not in sys.modules:
        return False
    try:
        from mlflow.utils.autologging_utils import autologging_is_disabled

        return not autologging_is_disabled(FLAVOR_NAME)
    except Exception:  # an MLflow internals change must not break an import
        logger.debug("Could not ask MLflow whether DSPy autologging is on", exc_info=True)
        return False


def register_with_mlflow_autolog(cls: type) -> bool:
    """Patch ``cls.compile`` the way ``mlflow.dspy.autolog`` patches Teleprompter subclasses.

    Does something only if MLflow is already imported and DSPy autologging is enabled; returns whether
    the patch was applied. Idempotent, and idempotent with later ``autolog()`` calls (MLflow re-patches
    from the original function, it never wraps a patch twice). Never raises; warns once on failure.
    """
    if not dspy_autolog_enabled():
        return False
    try:
        from mlflow.dspy.autolog import _patched_compile
        from mlflow.utils.autologging_utils import get_autologging_config, safe_patch

        safe_patch(
            FLAVOR_NAME,
            cls,
            "compile",
            _patched_compile,
            manage_run=bool(get_autologging_config(FLAVOR_NAME, "log_compiles", False)),
        )
        return True
    except Exception as exc:  # noqa: BLE001
        if not _FAILURE_REPORTED.is_set():
            _FAILURE_REPORTED.set()
            logger.warning(
                "Could not register %s.compile with mlflow.dspy.autolog (%s: %s); compiles will not be recorded "
                "as MLflow runs. Call mlflow.dspy.autolog(...) again after importing dspy_turbogepa to fix it.",
                getattr(cls, "__name__", cls), type(exc).__name__, exc,
            )
        return False


def _reset_warning_for_tests() -> None:
    _FAILURE_REPORTED.clear()


__all__: list[Any] = ["dspy_autolog_enabled", "register_with_mlflow_autolog"]
