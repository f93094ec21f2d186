"""Program <-> candidate: which predictors are components, and how a candidate becomes a program.

Only instructions change. Demos, per-predictor LMs, field prefixes and descriptions are carried over
from the student by ``deepcopy`` exactly as dspy.GEPA's ``build_program`` does, and the student itself
is never touched.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import dspy


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


class ProgramCodec:
    """Builds (and caches) one program object per candidate fingerprint.

    A built program is shared by every concurrent evaluation of that candidate; DSPy predictors keep
    no per-call state on the module (traces go to a context variable), as ``dspy.Evaluate`` relies on.
    """

    def __init__(self, student: dspy.Module, cache_size: int = 64) -> None:
        self._student = student
        self.component_names: list[str] = [name for name, _ in student.named_predictors()]
        self._student_predictors = dict(student.named_predictors())
        self._cache: OrderedDict[str, tuple[dspy.Module, PredictorNames]] = OrderedDict()
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

    def get(self, fingerprint: str, texts: Mapping[str, str]) -> tuple[dspy.Module, PredictorNames]:
        """The shared program for a candidate, and which of its predictors made a trace step."""
        with self._lock:
            hit = self._cache.get(fingerprint)
            if hit is not None:
                self._cache.move_to_end(fingerprint)
                return hit
        program = self.build(texts)
        entry = (program, PredictorNames(program))
        with self._lock:
            self._cache[fingerprint] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return entry
