"""Checking what compile() is given to learn from, before any LM call: the examples and the student.

Each check turns what would fail on every evaluation (a dict where an example goes, a student whose
predictors DSPy hides) into an error naming the argument and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import dspy

__all__ = [
    "as_examples", "check_examples", "check_predictor_lms", "compiled_submodules", "flex_submodules", "same_examples",
]

logger = logging.getLogger(__name__)


def same_examples(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """The same examples in the same order, with the same inputs: the same objects, or the same content
    by the run key's own hash (an Example's ``==`` ignores the inputs and raises on NumPy fields). A
    value known only by its ``str()`` counts as the same only if it is the same object: two valsets of
    ``Blob`` objects whose ``str()`` is "Blob" read as the trainset, and the run validated on it."""
    if len(a) != len(b):
        return False
    if all(x is y for x, y in zip(a, b)):
        return True
    from dspy_turbogepa.adapter.run_identity import data_identity

    try:
        return data_identity(a, "trainset", "identity") == data_identity(b, "valset", "identity")
    except TypeError as exc:  # a field that cannot be read (an ORM row's repr needing its session): this
        # only saves evaluations when the sets are equal copies, so the run goes on as for two sets
        logger.debug("Could not compare the trainset and the valset by content (%s): taken as different", exc)
        return False


def compiled_submodules(student: dspy.Module) -> list[str]:
    """Attribute paths of submodules marked ``_compiled`` (``named_parameters`` skips their predictors):
    a program whose inner module came out of BootstrapFewShot has, to DSPy, nothing to optimize."""
    found: list[str] = []
    stack: list[tuple[str, Any, int]] = [("", student, 0)]
    seen: set[int] = set()
    while stack:
        path, obj, depth = stack.pop()
        if id(obj) in seen or depth > 8:
            continue
        seen.add(id(obj))
        items = (obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple))
                 else vars(obj).items() if isinstance(obj, dspy.Module) else ())
        for key, value in items:
            sub = f"{path}.{key}" if isinstance(key, str) and not isinstance(obj, dict) else f"{path}[{key!r}]"
            sub = sub.lstrip(".")
            if isinstance(value, dspy.Module) and getattr(value, "_compiled", False):
                found.append(sub)
            elif isinstance(value, (dspy.Module, list, tuple, dict)):
                stack.append((sub, value, depth + 1))
    return sorted(found)


def flex_submodules(student: dspy.Module) -> list[str]:
    """Names of the student's ``dspy.Flex`` submodules (code components for dspy.GEPA); none on a DSPy
    without Flex."""
    try:
        from dspy.teleprompt.gepa.gepa_flex_utils import enumerate_flex_submodules
    except ImportError:
        return []
    return list(enumerate_flex_submodules(student))




def as_examples(name: str, examples: Any) -> Any:
    """A list of any other iterable (a generator, a dataset view); a mapping or a string is refused, since
    iterating it yields keys or characters, not examples."""
    if examples is None or isinstance(examples, Sequence) and not isinstance(examples, str):
        return examples
    kind = type(examples)
    if isinstance(examples, dspy.Example):  # iterable too (its keys), which blamed its field names
        raise TypeError(
            f"{name} must be a list of dspy.Example, got a single dspy.Example: wrap it in a list, [example].")
    if kind.__name__ == "DataFrame":  # pandas / polars: iterating gives the column names
        raise TypeError(
            f"{name} must be a list of dspy.Example, got a {kind.__module__.split('.')[0]} DataFrame. Convert its "
            f"rows: [dspy.Example(**row).with_inputs(...) for row in df.to_dict('records')] (pandas)."
        )
    if isinstance(examples, (Mapping, str, bytes)) or not isinstance(examples, Iterable):
        raise TypeError(f"{name} must be a list of dspy.Example, got {kind.__name__}.")
    return list(examples)


def check_examples(name: str, examples: Sequence[Any]) -> None:
    for i, ex in enumerate(examples):
        if isinstance(ex, dspy.Prediction) and not getattr(ex, "_input_keys", None):
            # an Example subclass born without input keys: .inputs() raised a bare AttributeError
            raise TypeError(
                f"{name}[{i}] is a dspy.Prediction (what a program returns) with no input fields marked. Build "
                f"the example from its fields: dspy.Example(**{name}[{i}]).with_inputs(<its input field names>).")
        if not isinstance(ex, dspy.Example):
            build = ("dspy.Example(**row).with_inputs(<its input field names>)" if isinstance(ex, Mapping) else
                     "dspy.Example(question=..., answer=...).with_inputs('question')")
            raise TypeError(f"{name}[{i}] is a {type(ex).__name__}, not a dspy.Example. Build each example as "
                            f"{build}.")
        try:
            ex.inputs()
        except ValueError as e:
            raise ValueError(
                f"{name}[{i}] has no input fields set. Mark them with .with_inputs(...), e.g. "
                f"dspy.Example(question=..., answer=...).with_inputs('question').") from e


def check_predictor_lms(predictors: Iterable[tuple[str, Any]]) -> None:
    """Refuse a predictor whose ``lm`` DSPy would refuse on every call, by DSPy's own rule
    (``Predict.forward``): a model-name string, or neither a ``BaseLM`` nor a decision-request client
    (``supports_decision_requests``). Left alone, every rollout through it fails and the run pays for
    the other predictors' calls until the systemic stop."""
    for name, predictor in predictors:
        lm = getattr(predictor, "lm", None)
        if isinstance(lm, str) or (lm is not None and not isinstance(lm, dspy.BaseLM)
                                   and getattr(lm, "supports_decision_requests", False) is not True):
            shown, model = (repr(lm), repr(lm)) if isinstance(lm, str) else (type(lm).__name__, "...")
            where = "program" if name == "self" else f"program.{name}"  # a bare Predict student is "self"
            raise TypeError(
                f"The student's predictor {name!r} has lm={shown}, not a dspy.LM: every call of it would fail. "
                f"Set an LM object, e.g. {where}.set_lm(dspy.LM({model})).")
