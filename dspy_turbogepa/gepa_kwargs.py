"""What ``gepa_kwargs`` may hold, and what each key means here.

dspy.GEPA splats ``gepa_kwargs`` into ``gepa.optimize``. We accept every key that call accepts, so
existing code keeps working: keys with a meaning in this engine are mapped (and their values checked:
``acceptance_criterion`` takes gepa's two built-in criteria, ``stop_callbacks`` callables taking the
state), three are refused with ``ValueError`` as having no equivalent here (``max_reflection_cost``
and ``custom_candidate_proposer`` other than None, ``reflection_prompt_template``), and the rest are
ignored with one warning each, unless the value asks for nothing this engine does not do anyway.
Values gepa itself refuses next to dspy.GEPA's adapter (``task_lm``, ``evaluator``, an unknown
``frontier_type`` or ``val_evaluation_policy``, a custom ``batch_sampler`` beside a
``reflection_minibatch_size``) are refused here too, before any LM call. Keys dspy.GEPA already
passes itself raise ``TypeError`` in dspy.GEPA ("got multiple values"), and here too — but with a
message that names the constructor argument to use instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspy_turbogepa.adapter.protocols import check_call_protocol

logger = logging.getLogger(__name__)

#: Keys dspy.GEPA passes to gepa.optimize itself -> the dspy.GEPA argument that sets them ("": none does).
DSPY_OWNED_KEYS: dict[str, str] = {
    "seed_candidate": "the student program",
    "trainset": "compile(trainset=...)",
    "valset": "compile(valset=...)",
    "adapter": "",
    "reflection_lm": "reflection_lm",
    "candidate_selection_strategy": "candidate_selection_strategy",
    "skip_perfect_score": "skip_perfect_score",
    "reflection_minibatch_size": "reflection_minibatch_size",
    "module_selector": "component_selector",
    "perfect_score": "perfect_score",
    "use_merge": "use_merge",
    "max_merge_invocations": "max_merge_invocations",
    "max_metric_calls": "max_metric_calls",
    "logger": "",
    "run_dir": "log_dir",
    "use_wandb": "use_wandb",
    "wandb_api_key": "wandb_api_key",
    "wandb_init_kwargs": "wandb_init_kwargs",
    "use_mlflow": "use_mlflow",
    "track_best_outputs": "track_best_outputs",
    "display_progress_bar": "verbose (TurboGEPA's progress display)",
    "raise_on_exception": "",
    "seed": "seed",
}

#: Other gepa.optimize keys (gepa 0.1.4) that we accept but that have no effect in this engine.
IGNORED_KEYS: dict[str, str] = {
    "task_lm": "the program's own LMs are used",  # only None: gepa refuses a value next to an adapter
    "evaluator": "evaluation is done by the DSPy adapter",  # likewise
    "reflection_lm_kwargs": "configure the reflection dspy.LM instead",
    "frontier_type": "only the per-instance frontier ('instance') is implemented",
    "batch_sampler": "minibatches are chosen by minibatch_sampling (failure_first or epoch)",
    "merge_val_overlap_floor": "not used by this engine's merge",
    "callbacks": "gepa callbacks are not called; use the run store or MLflow tracking",
    "wandb_attach_existing": "wandb is not supported",
    "mlflow_attach_existing": ("an active MLflow run is always attached (a nested run is started if it already "
                               "holds a compile)"),
    "tracking_key_prefix": "not used",
    "use_cloudpickle": "nothing is pickled by this engine",
    "cache_evaluation": "evaluations are always cached by (candidate, example)",
    "val_evaluation_policy": "validation is spent in successive-halving rungs instead",
    "sampling_strategy": "the engine streams many proposals in parallel by design",
    "selection_strategy": "parents are selected by candidate_selection_strategy",
    "reflection_strategy": "reflection goes through instruction_proposer",
}

#: Values of ignored keys that ask for what this engine does anyway (or for nothing): no warning.
_NO_EFFECT_VALUES: dict[str, tuple[Any, ...]] = {
    "frontier_type": ("instance",),
    "cache_evaluation": (True,),
    "use_cloudpickle": (False,),
    "wandb_attach_existing": (False,),
    "mlflow_attach_existing": (True,),
    "callbacks": ((), []),
}

#: gepa's checks of values dspy.GEPA passes through, made here before any LM call (gepa makes some of
#: them only after the seed's evaluation).
_FRONTIER_TYPES = ("instance", "objective", "hybrid", "cartesian")

MAPPED_KEYS = ("stop_callbacks", "acceptance_criterion", "mlflow_tracking_uri", "mlflow_experiment_name")

#: Keys dspy.GEPA itself refuses (ValueError), with its reasons.
REFUSED_KEYS: dict[str, str] = {
    "max_reflection_cost": (
        "gepa_kwargs['max_reflection_cost'] is not supported (dspy.GEPA refuses it too: 'not supported by dspy.GEPA "
        "yet'). To cap what a run spends, pass cost_budget_usd=... to TurboGEPA: it caps the LM cost of the "
        "run, student and reflection calls (with price_table=... for models whose price dspy/litellm do not know)."
    ),
    "reflection_prompt_template": (
        "reflection_prompt_template cannot be passed via gepa_kwargs when using dspy.GEPA. DspyAdapter implements "
        "its own propose_new_texts, so reflection_prompt_template is unused. To customize the reflection prompt, pass "
        "instruction_proposer=InstructionProposer(base_instructions=...) instead."
    ),
    # gepa refuses it next to DspyAdapter's own propose_new_texts ("Cannot provide both ...")
    "custom_candidate_proposer": (
        "custom_candidate_proposer cannot be passed via gepa_kwargs when using dspy.GEPA: DspyAdapter proposes "
        "through its own propose_new_texts. Pass the same function as instruction_proposer=... instead (same "
        "signature: (candidate, reflective_dataset, components_to_update) -> dict[str, str])."
    ),
}


@dataclass(frozen=True)
class MappedGepaKwargs:
    stop_callbacks: tuple[Callable[[Any], bool], ...] = field(default_factory=tuple)
    accept_equal_on_minibatch: bool = False
    #: with ``use_mlflow=True``, as gepa: ``mlflow.set_tracking_uri`` / ``mlflow.set_experiment`` first (not
    #: while an MLflow run is already active: the compile then logs into that run; see docs/mlflow.md)
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_name: str | None = None


class GepaKwargsReader:
    """Reads ``gepa_kwargs`` again only when it changed: dspy.GEPA reads the attribute at compile time, so
    a change after the constructor must count, but an unchanged dict must not warn twice."""

    def __init__(self, *, minibatch_size_given: bool = True) -> None:
        self._minibatch_size_given = minibatch_size_given
        self._read: dict[str, Any] | None = None
        self._mapped = MappedGepaKwargs()

    def read(self, gepa_kwargs: Mapping[str, Any]) -> MappedGepaKwargs:
        current = _snapshot(gepa_kwargs)
        try:
            unchanged = self._read is not None and current == self._read
        except (TypeError, ValueError):  # a value whose == is not a bool (an array): read it again
            unchanged = False
        if not unchanged:
            self._mapped = interpret_gepa_kwargs(gepa_kwargs, minibatch_size_given=self._minibatch_size_given)
            self._read = current
        return self._mapped


def _snapshot(gepa_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What ``gepa_kwargs`` held: a list value is copied, so that appending to it later shows as a change."""
    return {k: list(v) if isinstance(v, list) else v for k, v in gepa_kwargs.items()}


def interpret_gepa_kwargs(gepa_kwargs: Mapping[str, Any], *, minibatch_size_given: bool = True) -> MappedGepaKwargs:
    """``minibatch_size_given``: whether ``reflection_minibatch_size`` was set (not None), which gepa
    refuses beside a batch sampler of the user's own."""
    for key in gepa_kwargs:
        if key in REFUSED_KEYS and (key == "reflection_prompt_template" or gepa_kwargs[key] is not None):
            raise ValueError(REFUSED_KEYS[key])
        if key in DSPY_OWNED_KEYS:
            instead = f"Use {DSPY_OWNED_KEYS[key]} instead." if DSPY_OWNED_KEYS[key] else "Remove it."
            raise TypeError(
                f"gepa_kwargs[{key!r}] is set by dspy.GEPA itself (dspy.GEPA fails with 'optimize() got multiple "
                f"values for keyword argument {key!r}'). {instead}"
            )
        if key not in IGNORED_KEYS and key not in MAPPED_KEYS and key not in REFUSED_KEYS:
            raise TypeError(
                f"gepa_kwargs[{key!r}] is not a parameter of gepa.optimize (dspy.GEPA would fail with "
                "'optimize() got an unexpected keyword argument'). Check the spelling."
            )
    _check_passed_values(gepa_kwargs, minibatch_size_given)
    for key, value in gepa_kwargs.items():
        if key in IGNORED_KEYS and value is not None and not _asks_for_nothing(key, value):
            logger.warning("gepa_kwargs[%r] is accepted but has no effect in TurboGEPA: %s.", key, IGNORED_KEYS[key])

    stops = gepa_kwargs.get("stop_callbacks")
    if stops is None:
        callbacks: tuple[Callable[[Any], bool], ...] = ()
    elif callable(stops):
        callbacks = (stops,)
    elif isinstance(stops, Sequence) and not isinstance(stops, str):
        for i, entry in enumerate(stops):
            if not callable(entry):
                raise TypeError(
                    f"gepa_kwargs['stop_callbacks'][{i}] is {entry!r}, not a callable: each entry is called as "
                    "callback(state) -> bool after every iteration (a gepa StopperProtocol, e.g. "
                    "gepa.utils.MaxMetricCallsStopper(100)).")
        callbacks = tuple(stops)
    else:
        raise TypeError("gepa_kwargs['stop_callbacks'] must be a callable or a list of callables (state) -> bool.")
    for i, callback in enumerate(callbacks):  # gepa calls each with the state, positionally
        check_call_protocol(callback, f"gepa_kwargs['stop_callbacks'][{i}]", "callback(state)", args=(None,))

    acceptance = _builtin_acceptance(gepa_kwargs.get("acceptance_criterion", "strict_improvement"))
    if acceptance not in ("strict_improvement", "improvement_or_equal"):
        raise ValueError(
            "gepa_kwargs['acceptance_criterion'] must be 'strict_improvement', 'improvement_or_equal' or one of "
            "gepa's StrictImprovementAcceptance() / ImprovementOrEqualAcceptance() (custom AcceptanceCriterion "
            f"objects are not supported), got {acceptance!r}."
        )
    mlflow_settings = {key: gepa_kwargs.get(key) for key in ("mlflow_tracking_uri", "mlflow_experiment_name")}
    for key, value in mlflow_settings.items():
        if value is not None and not isinstance(value, str):
            raise TypeError(f"gepa_kwargs[{key!r}] must be a string, got {type(value).__name__}.")
    return MappedGepaKwargs(stop_callbacks=callbacks, accept_equal_on_minibatch=acceptance == "improvement_or_equal",
                            **mlflow_settings)


def _asks_for_nothing(key: str, value: Any) -> bool:
    return any(type(value) is type(same) and value == same for same in _NO_EFFECT_VALUES.get(key, ()))


def _check_passed_values(gepa_kwargs: Mapping[str, Any], minibatch_size_given: bool) -> None:
    """The values gepa refuses when dspy.GEPA passes them on (with its adapter), refused here too, before
    any LM call: accepting them with a "no effect" warning would let code run here that fails there."""
    for key in ("task_lm", "evaluator"):
        if gepa_kwargs.get(key) is not None:
            raise ValueError(
                f"gepa_kwargs[{key!r}] has no meaning with DSPy: the program's own LMs and the metric are used "
                f"(dspy.GEPA fails too: gepa requires {key}=None when an adapter is given). Remove it.")
    frontier = gepa_kwargs.get("frontier_type")
    if frontier is not None and frontier not in _FRONTIER_TYPES:
        raise ValueError(f"gepa_kwargs['frontier_type'] must be one of {list(_FRONTIER_TYPES)}, got {frontier!r}.")
    policy = gepa_kwargs.get("val_evaluation_policy")
    if policy is not None and policy != "full_eval" and not _is_evaluation_policy(policy):
        raise ValueError(
            "gepa_kwargs['val_evaluation_policy'] must be 'full_eval', None or a gepa EvaluationPolicy, got "
            f"{policy!r} (it has no effect in TurboGEPA, which validates in successive-halving rungs).")
    sampler = gepa_kwargs.get("batch_sampler")
    if sampler is not None and sampler != "epoch_shuffled" and minibatch_size_given:
        raise ValueError(
            "gepa_kwargs['batch_sampler'] is a sampler of your own, which gepa accepts only with "
            "reflection_minibatch_size=None (dspy.GEPA fails: 'reflection_minibatch_size only accepted if "
            "batch_sampler is 'epoch_shuffled''). It has no effect in TurboGEPA (minibatches are drawn by "
            "minibatch_sampling): remove it, or pass reflection_minibatch_size=None.")


def _is_evaluation_policy(value: Any) -> bool:
    try:
        from gepa.strategies.eval_policy import EvaluationPolicy
    except ImportError:  # a gepa without evaluation policies: nothing to tell them by
        return True
    return isinstance(value, EvaluationPolicy)


def _builtin_acceptance(value: Any) -> Any:
    """gepa's own two criterion classes as the strings they stand for (gepa accepts both forms); a
    subclass may override ``should_accept``, so only the exact classes are mapped."""
    try:
        from gepa.strategies.acceptance import ImprovementOrEqualAcceptance, StrictImprovementAcceptance
    except ImportError:  # an older gepa without these classes: nothing to map
        return value
    if type(value) is StrictImprovementAcceptance:
        return "strict_improvement"
    if type(value) is ImprovementOrEqualAcceptance:
        return "improvement_or_equal"
    return value
