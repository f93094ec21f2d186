"""Program <-> candidate: which predictors are components, and how a candidate becomes a program.

Only instructions change. Demos, per-predictor LMs, field prefixes and descriptions are carried over
from the student by ``deepcopy`` exactly as dspy.GEPA's ``build_program`` does, and the student itself
is never touched.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dspy
from dspy.primitives.base_module import BaseModule

logger = logging.getLogger(__name__)


class PredictorNames:
    """Which of a program's predictors made a trace step.

    By object identity first, which is exact and free. Modules such as ``dspy.BestOfN`` and
    ``dspy.Refine`` deep-copy the module they wrap on every call, so their trace steps hold copies no
    id matches; those fall back to signature equality, the rule dspy.GEPA applies to every step
    (``signature.equals``: same fields and instructions). A copy of one of several predictors with an
    equal signature cannot be told apart: the step goes to each of them, as dspy.GEPA gives it.
    """

    def __init__(self, program: dspy.Module) -> None:
        self._predictors = list(program.named_predictors())
        self._by_id = {id(pred): name for name, pred in self._predictors}

    def names_of(self, predictor: Any) -> list[str]:
        hit = self._by_id.get(id(predictor))
        if hit is not None:
            return [hit]
        return self._equal_signatures(getattr(predictor, "signature", None)) or ["?"]

    def _equal_signatures(self, signature: Any) -> list[str]:
        if signature is None:
            return []
        names = []
        for name, pred in self._predictors:
            try:
                if pred.signature.equals(signature):
                    names.append(name)
            except (AttributeError, TypeError):  # not a dspy Signature: no match by signature
                continue
        return names

    def signature_owner(self, signature: Any) -> str | None:
        """The one predictor whose signature equals ``signature`` (fields and instructions), else None.

        A parse failure names the signature it could not parse, not the predictor: two predictors with
        the same fields but other instructions must not both be blamed for it."""
        owners = self._equal_signatures(signature)
        return owners[0] if len(owners) == 1 else None


@dataclass
class _ModulePlan:
    """Which attributes of a module lead to modules that get their own copy per call."""

    attrs: list[tuple[str, _Plan]] = field(default_factory=list)


@dataclass
class _ContainerPlan:
    """A list, tuple or dict holding such modules: which of its items to replace."""

    items: list[tuple[Any, _Plan]]


_Plan = _ModulePlan | _ContainerPlan


def _copy_plan(value: Any, memo: dict[int, _ModulePlan]) -> _Plan | None:
    """None when ``value`` holds no module to copy. Predictors are shared: they keep no per-call state
    (``dspy.Evaluate`` runs one predictor in many threads) and their identity names trace steps."""
    if isinstance(value, dspy.Predict):
        return None
    if isinstance(value, BaseModule):
        if id(value) in memo:
            return memo[id(value)]
        plan = memo[id(value)] = _ModulePlan()
        for name, attr in list(getattr(value, "__dict__", {}).items()):
            sub = _copy_plan(attr, memo)
            if sub is not None:
                plan.attrs.append((name, sub))
        return plan
    if type(value) in (list, tuple):
        items = [(i, sub) for i, v in enumerate(value) if (sub := _copy_plan(v, memo)) is not None]
        return _ContainerPlan(items) if items else None
    if type(value) is dict:
        items = [(k, sub) for k, v in value.items() if (sub := _copy_plan(v, memo)) is not None]
        return _ContainerPlan(items) if items else None
    return None


def _apply_plan(plan: _Plan, value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(plan, _ContainerPlan):
        if type(value) is dict:
            new_map = dict(value)
            for key, sub in plan.items:
                new_map[key] = _apply_plan(sub, value[key], memo)
            return new_map
        new_seq = list(value)
        for index, sub in plan.items:
            new_seq[index] = _apply_plan(sub, value[index], memo)
        return tuple(new_seq) if type(value) is tuple else new_seq
    if id(value) in memo:  # a module reachable twice stays one object
        return memo[id(value)]
    try:
        new = copy.copy(value)  # as dspy's deepcopy does, through the module's own __getstate__
    except Exception as exc:  # noqa: BLE001 - an uncopyable module runs shared, as it did in every call before
        logger.debug("%s is not copied per call (%s: %s)", type(value).__name__, type(exc).__name__, exc)
        new = value
    memo[id(value)] = new
    if new is not value:
        attrs = new.__dict__
        for name, sub in plan.attrs:
            attrs[name] = _apply_plan(sub, attrs[name], memo)
    return new


@dataclass(frozen=True)
class BuiltProgram:
    """A candidate's program, built once, and how each call gets its own copy of it."""

    #: the built program; its predictors (and their LMs) are shared by every call's copy
    program: dspy.Module
    #: which of its predictors made a trace step
    names: PredictorNames
    _plan: _Plan | None = None

    def for_call(self) -> dspy.Module:
        """A copy of the program's modules for one call, its predictors and every other value shared.

        dspy.GEPA builds a fresh program for every evaluation batch: state a module keeps on itself
        lives for one batch (``dspy.BestOfN`` / ``dspy.Refine`` lower ``self.fail_count`` on every failed
        attempt, and raise once it runs out). Reusing one program for the whole run let that state pile
        up across every evaluation of a candidate, and made scores depend on the order evaluations
        finished in. One copy per call costs a shallow copy of each module (predictors and data are
        shared, so a large index held by the program is never duplicated)."""
        if self._plan is None:
            return self.program
        return _apply_plan(self._plan, self.program, {})


class ProgramCodec:
    """Builds (and caches) one program object per candidate fingerprint.

    Evaluations run on a per-call copy of it (:meth:`BuiltProgram.for_call`) whose predictors are the
    built program's own: DSPy predictors keep no per-call state (traces go to a context variable), as
    ``dspy.Evaluate`` relies on, while the modules around them may.
    """

    def __init__(self, student: dspy.Module, cache_size: int = 64) -> None:
        self._student = student
        self.component_names: list[str] = [name for name, _ in student.named_predictors()]
        self._student_predictors = dict(student.named_predictors())
        self._cache: OrderedDict[str, BuiltProgram] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def student(self) -> dspy.Module:
        return self._student

    def seed_texts(self) -> dict[str, str]:
        return {name: pred.signature.instructions for name, pred in self._student.named_predictors()}

    def student_predictor(self, name: str) -> dspy.Predict:
        """The original student's predictor, which dspy.GEPA passes in ``pred_trace`` to the metric."""
        return self._student_predictors[name]

    def build(self, texts: Mapping[str, str]) -> dspy.Module:
        """A fresh program carrying ``texts`` (never cached; callers may mutate it)."""
        program = self._student.deepcopy()
        for name, pred in program.named_predictors():
            if name in texts:
                pred.signature = pred.signature.with_instructions(texts[name])
        return program

    def get(self, fingerprint: str, texts: Mapping[str, str]) -> BuiltProgram:
        """The shared program for a candidate, and which of its predictors made a trace step."""
        with self._lock:
            hit = self._cache.get(fingerprint)
            if hit is not None:
                self._cache.move_to_end(fingerprint)
                return hit
        program = self.build(texts)
        entry = BuiltProgram(program, PredictorNames(program), _copy_plan(program, {}))
        with self._lock:
            self._cache[fingerprint] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return entry
