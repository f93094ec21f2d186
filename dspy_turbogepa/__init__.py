"""dspy-turbogepa: a drop-in, streaming replacement for ``dspy.GEPA``.

    from dspy_turbogepa import TurboGEPA      # or: from dspy_turbogepa import GEPA
    optimized = TurboGEPA(metric, auto="light", reflection_lm=lm).compile(program, trainset=train, valset=val)
"""

from dspy_turbogepa.adapter.results import TurboGEPAResult
from dspy_turbogepa.errors import ConfigurationError, SystemicFailureError
from dspy_turbogepa.teleprompter import TurboGEPA

GEPA = TurboGEPA

__version__ = "0.1.0"

__all__ = ["GEPA", "ConfigurationError", "SystemicFailureError", "TurboGEPA", "TurboGEPAResult", "__version__"]
