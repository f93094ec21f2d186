"""Seeing the run in MLflow (docs/mlflow.md).

- :func:`register_with_mlflow_autolog`: ``mlflow.dspy.autolog(log_compiles=True)`` records
  ``TurboGEPA.compile`` whether autolog was turned on before or after ``dspy_turbogepa`` was imported.
- :class:`CompileThreadCallbackPump`: each full-validation evaluation reaches DSPy's callbacks on the
  compile thread, so MLflow logs it as a nested run (``eval_full_<k>``) with an ``eval_full`` metric on
  the compile run.
- :class:`MlflowRunTracker`: ``use_mlflow=True`` — params, live metrics and final artifacts.

Importing this package never imports MLflow.
"""

from dspy_turbogepa.tracking.autolog import (
    dspy_autolog_enabled,
    register_with_mlflow_autolog,
)
from dspy_turbogepa.tracking.mlflow_tracking import (
    MlflowRunTracker,
    loggable_params,
    sanitize_key,
)
from dspy_turbogepa.tracking.pump import CompileThreadCallbackPump

__all__ = [
    "CompileThreadCallbackPump",
    "MlflowRunTracker",
    "dspy_autolog_enabled",
    "loggable_params",
    "register_with_mlflow_autolog",
    "sanitize_key",
]
