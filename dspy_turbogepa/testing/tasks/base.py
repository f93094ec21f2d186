"""Building blocks of the synthetic tasks: hashing helpers, rules, the ``Task`` base.

An instruction **knows** a rule iff it contains one of the rule's synonymous key
phrases (case-insensitive, whitespace-normalised); see the package docstring.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import dspy

__all__ = [
    "PredictorSpec",
    "RawExample",
    "Rule",
    "Splits",
    "Task",
    "get_field",
    "normalize_text",
    "quote_output",
    "stable_hash",
    "text_digest",
    "unit_random",
    "word_count",
]

# --------------------------------------------------------------------------------------
# deterministic helpers (no global RNG anywhere: reproducibility under concurrency)
# --------------------------------------------------------------------------------------


def stable_hash(*parts: object) -> int:
    """64-bit hash of ``parts`` that is stable across processes (unlike ``hash()``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def unit_random(*parts: object) -> float:
    """Deterministic pseudo-random number in [0, 1) keyed by ``parts``."""
    return stable_hash(*parts) / 2.0**64


def text_digest(text: str) -> str:
    """Short content hash used to key instructions, prompts and examples."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def normalize_text(text: str | None) -> str:
    """Lower-case and collapse whitespace, so phrase matching ignores layout."""
    return re.sub(r"\s+", " ", text or "").strip().lower()


def word_count(text: str | None) -> int:
    return len((text or "").split())


def _sentence(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:] + "."


def quote_output(value: object, limit: int = 160) -> str:
    """Render a model output for feedback so the ``'...'`` pair stays parseable."""
    text = re.sub(r"\s+", " ", "" if value is None else str(value)).strip().replace("'", "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def get_field(obj: Any, name: str) -> Any:
    """Read a field from a Prediction/Example/dict, or None if it is missing."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    try:
        return obj[name]
    except (KeyError, TypeError, IndexError):
        return getattr(obj, name, None)


# --------------------------------------------------------------------------------------
# rules, predictors, examples
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One hidden rule.

    ``id`` is globally unique (``"<task>.<name>"``). ``phrases`` are synonymous key
    phrases: an instruction knows the rule iff it contains one. ``hint`` is the rubric
    sentence the metric puts in feedback when an *explicit* rule was violated (pricing's
    metric, which sees only a wrong total, gives the hint of every explicit rule the order
    needs, applied or not); for implicit rules it is documentation only. ``rate`` is the approximate share of
    examples that need the rule.
    """

    id: str
    predictor: str
    phrases: tuple[str, ...]
    hint: str
    explicit: bool
    rate: float

    @property
    def task(self) -> str:
        return self.id.split(".", 1)[0]

    @property
    def short(self) -> str:
        return self.id.split(".", 1)[1]

    def sentence(self, variant: int = 0) -> str:
        """The rule stated as an instruction sentence, using phrase ``variant``."""
        return _sentence(self.phrases[variant % len(self.phrases)])

    def known_by(self, normalized_text: str) -> bool:
        """True if the (already normalised) text states this rule."""
        return any(normalize_text(p) in normalized_text for p in self.phrases)


@dataclass(frozen=True)
class PredictorSpec:
    """A predictor of a task program: its ``named_predictors()`` name and its fields.

    ``outputs`` excludes ChainOfThought's ``reasoning``; the responder identifies the
    (task, predictor) of a prompt from these field names.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    chain_of_thought: bool = False


@dataclass(frozen=True)
class RawExample:
    """A generated example before it becomes a ``dspy.Example``."""

    inputs: Mapping[str, str]
    gold: Mapping[str, str]
    rules: tuple[str, ...]


class Splits(NamedTuple):
    train: list[dspy.Example]
    val: list[dspy.Example]
    test: list[dspy.Example]


# --------------------------------------------------------------------------------------
# task base class
# --------------------------------------------------------------------------------------


class Task(ABC):
    """A synthetic task: rules, data, simulated student, DSPy program and GEPA metric.

    Subclasses only declare immutable class attributes and implement the abstract
    methods; instances carry no state, so one registry object can be shared by threads,
    the HTTP simulator and the fake LMs.
    """

    name: str = ""
    description: str = ""
    predictors: tuple[PredictorSpec, ...] = ()
    rules: tuple[Rule, ...] = ()
    input_fields: tuple[str, ...] = ()
    #: Default per-predictor-call probability that the simulated answer is corrupted.
    noise: float = 0.0
    #: Default "time to target" validation score for benchmarks.
    target_val: float = 0.85
    _seed_instructions: tuple[tuple[str, str], ...] = ()

    # ---- lookups ------------------------------------------------------------------

    @property
    def seed_instructions(self) -> dict[str, str]:
        """Predictor name -> the instruction the program starts with (a fresh dict)."""
        return dict(self._seed_instructions)

    @property
    def predictor_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.predictors)

    def predictor(self, name: str) -> PredictorSpec:
        for spec in self.predictors:
            if spec.name == name:
                return spec
        raise KeyError(f"task {self.name!r} has no predictor {name!r}; it has {list(self.predictor_names)}")

    def rule(self, rule_id: str) -> Rule:
        """Look a rule up by full id (``routing.urgent``) or short name (``urgent``)."""
        for r in self.rules:
            if rule_id in (r.id, r.short):
                return r
        raise KeyError(f"task {self.name!r} has no rule {rule_id!r}")

    def rules_for(self, predictor: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.predictor == predictor)

    def known_rules(self, instruction_text: str, predictor: str | None = None) -> frozenset[str]:
        """Ids of this task's rules that ``instruction_text`` states.

        With ``predictor`` only that predictor's rules count: a rule of another stage
        written into this predictor's instruction has no effect on its answers.
        """
        norm = normalize_text(instruction_text)
        pool = self.rules if predictor is None else self.rules_for(predictor)
        return frozenset(r.id for r in pool if r.known_by(norm))

    def instruction_with_rules(self, predictor: str, rule_ids: Iterable[str], variant: int = 0) -> str:
        """Seed instruction of ``predictor`` plus one sentence per rule it does not know yet."""
        text = self.seed_instructions[predictor]
        known = self.known_rules(text)
        extra = [self.rule(rid) for rid in rule_ids]
        return " ".join([text] + [r.sentence(variant) for r in extra if r.id not in known])

    def all_rules_instructions(self, variant: int = 0) -> dict[str, str]:
        """Predictor -> an instruction stating every rule of that predictor."""
        return {
            p: self.instruction_with_rules(p, [r.id for r in self.rules_for(p)], variant) for p in self.predictor_names
        }

    # ---- data ---------------------------------------------------------------------

    @abstractmethod
    def make_example(self, rng: random.Random) -> RawExample:
        """Draw one example (inputs, gold outputs, ids of the rules it needs)."""

    def splits(self, data_seed: int = 0, n_train: int = 80, n_val: int = 40, n_test: int = 300) -> Splits:
        """Deterministic train/val/test splits of ``dspy.Example`` (inputs marked).

        Each split has its own RNG stream, so a smaller split is a prefix of a larger
        one (``n_val=16`` gives the first 16 of ``n_val=40``); inputs are unique across
        splits. Each example carries ``_rules``: the ids of the rules it needs.
        """
        seen: set[str] = set()
        out: list[list[dspy.Example]] = []
        for split, size in (("train", n_train), ("val", n_val), ("test", n_test)):
            if size < 0:
                raise ValueError(f"n_{split} must be >= 0, got {size}")
            rng = random.Random(stable_hash(self.name, "split", split, data_seed))
            examples: list[dspy.Example] = []
            while len(examples) < size:
                raw = self.make_example(rng)
                key = "\x1f".join(raw.inputs[f] for f in self.input_fields)
                if key in seen:
                    continue
                seen.add(key)
                examples.append(
                    dspy.Example(**raw.inputs, **raw.gold, _rules=raw.rules).with_inputs(*self.input_fields)
                )
            out.append(examples)
        return Splits(*out)

    # ---- simulated student --------------------------------------------------------

    @abstractmethod
    def simulate(self, predictor: str, inputs: Mapping[str, str], known: Iterable[str]) -> dict[str, str]:
        """Answer of ``predictor`` on ``inputs`` when exactly the rules ``known`` are applied."""

    @abstractmethod
    def corrupt(self, predictor: str, outputs: Mapping[str, str], rng: random.Random) -> dict[str, str]:
        """A (most likely) wrong variant of ``outputs``: the simulator's noise model."""

    @abstractmethod
    def infer_rules(self, expected: str, got: str) -> frozenset[str]:
        """Rules a reflector could infer from an ``Expected 'X' but got 'Y'`` pair.

        Must return an empty set for pairs that are not in this task's format, since
        the reflector asks every task about every pair.
        """

    # ---- DSPy side ----------------------------------------------------------------

    @abstractmethod
    def _build_program(self, instructions: Mapping[str, str], async_forward: bool) -> dspy.Module: ...

    def make_program(
        self, instructions: Mapping[str, str] | None = None, *, async_forward: bool = False
    ) -> dspy.Module:
        """A fresh program with the seed instructions, overridden per predictor.

        ``async_forward=False`` (default) gives a sync-only module like most user code
        (``acall`` then raises AttributeError); ``True`` adds an ``aforward`` that awaits
        the predictors, for optimizers that prefer the async path.
        """
        merged = self.seed_instructions
        unknown = set(instructions or {}) - set(merged)
        if unknown:
            raise KeyError(f"task {self.name!r} has no predictor(s) {sorted(unknown)}")
        merged.update(instructions or {})
        return self._build_program(merged, async_forward)

    @abstractmethod
    def metric(
        self, gold: dspy.Example, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None
    ) -> dspy.Prediction:
        """GEPA-protocol metric: ``dspy.Prediction(score=float, feedback=str)``."""

    def score(self, gold: dspy.Example, pred: Any) -> float:
        return float(self.metric(gold, pred).score)

    def evaluate(
        self, program: dspy.Module, examples: Sequence[dspy.Example], *, lm: dspy.LM | None = None, num_threads: int = 8
    ) -> float:
        """Mean metric score of ``program`` on ``examples`` (0..1), via ``dspy.Evaluate``."""
        evaluator = dspy.Evaluate(
            devset=list(examples), metric=self.metric, num_threads=num_threads, display_progress=False
        )
        if lm is None:
            result = evaluator(program)
        else:
            with dspy.context(lm=lm):
                result = evaluator(program)
        # Average the raw per-example scores: EvaluationResult.score is a rounded percentage.
        scores = [float(score) for _, _, score in result.results]
        return sum(scores) / len(scores) if scores else 0.0

    def __repr__(self) -> str:
        return f"<Task {self.name}: {len(self.predictors)} predictor(s), {len(self.rules)} rules>"
