"""dspy-turbogepa: a drop-in, streaming replacement for ``dspy.GEPA``.

    from dspy_turbogepa import TurboGEPA      # or: from dspy_turbogepa import GEPA
    optimized = TurboGEPA(metric, auto="light", reflection_lm=lm).compile(program, trainset=train, valset=val)

The DSPy-facing names are imported lazily, so ``import dspy_turbogepa.engine`` (which has no DSPy
dependency) does not load DSPy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["GEPA", "ConfigurationError", "SystemicFailureError", "TurboGEPA", "TurboGEPAResult", "__version__"]

if TYPE_CHECKING:
    from dspy_turbogepa.adapter.results import TurboGEPAResult
    from dspy_turbogepa.errors import ConfigurationError, SystemicFailureError
    from dspy_turbogepa.teleprompter import TurboGEPA

    GEPA = TurboGEPA


def __getattr__(name: str) -> Any:
    if name in ("TurboGEPA", "GEPA"):
        from dspy_turbogepa.teleprompter import TurboGEPA

        return TurboGEPA
    if name == "TurboGEPAResult":
        from dspy_turbogepa.adapter.results import TurboGEPAResult

        return TurboGEPAResult
    if name in ("ConfigurationError", "SystemicFailureError"):
        from dspy_turbogepa import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'dspy_turbogepa' has no attribute {name!r}")
