"""Synthetic tasks whose score depends only on which hidden rules an instruction states.

Why synthetic: optimizer tests and benchmarks need a "prompt quality" signal that is
cheap, deterministic and offline, yet behaves like the real thing for GEPA-style
search (reflection from feedback, per-predictor credit assignment, rare cases that
only some examples reveal). Here every task has a handful of hidden *rules*. An
instruction **knows** a rule iff it contains one of the rule's synonymous key phrases
(case-insensitive, whitespace-normalised). The simulated student (see
``responder.py``) answers by applying only the rules its instruction knows; an unknown
rule yields a naive, wrong value. So an example is answered correctly iff its
instruction knows every rule the example needs.

Feedback is written for a reflector: some rules are *explicit* (a rubric sentence in
the feedback names them), others are *implicit* (only ``Expected 'X' but got 'Y'``
pairs reveal them, and :meth:`Task.infer_rules` maps such a pair back to rules).

Tasks:

* ``routing``  – one ``Predict(ticket -> queue)``; 8 rules, 3 of them rare.
* ``pipeline`` – ``extract(message -> record)`` then ``render(record -> reply)``; 4 + 4
  rules; feedback is routed by ``pred_name`` so per-predictor credit matters.
* ``pricing``  – one ``ChainOfThought(order -> total: float)``; 6 rules; exercises the
  ``reasoning`` field, a dotted predictor name (``quote.predict``) and a typed output.

Everything here is pure and immutable: the HTTP simulator and the in-process fake LM
import the same objects, so gold labels, student behaviour and metric cannot drift.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, NamedTuple

import dspy

__all__ = [
    "ALL_RULES",
    "TASKS",
    "PredictorSpec",
    "RawExample",
    "Rule",
    "Splits",
    "Task",
    "find_rule",
    "get_task",
    "known_rules",
    "normalize_text",
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


def _quote(value: object, limit: int = 160) -> str:
    """Render a model output for feedback so the ``'...'`` pair stays parseable."""
    text = re.sub(r"\s+", " ", "" if value is None else str(value)).strip().replace("'", "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get(obj: Any, name: str) -> Any:
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
    sentence the metric puts in feedback when an *explicit* rule was violated; for
    implicit rules it is documentation only. ``rate`` is the approximate share of
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


def _set_instructions(program: dspy.Module, instructions: Mapping[str, str]) -> dspy.Module:
    for name, predictor in program.named_predictors():
        if name in instructions:
            predictor.signature = predictor.signature.with_instructions(instructions[name])
    return program


# --------------------------------------------------------------------------------------
# task 1: routing
# --------------------------------------------------------------------------------------

_R = "routing"
_ROUTE = "route"

_TEAM_SNIPPETS: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ("payments", 0.24, ("my card was billed twice this month", "I am still waiting for the refund you promised",
                        "the amount on my invoice does not match my plan")),
    ("access", 0.20, ("the password reset link has expired again", "I keep getting locked out when I sign in",
                      "the verification code never reaches my phone")),
    ("shipping", 0.18, ("the tracking page has not updated in a week", "the box arrived empty",
                        "the courier marked the package as delivered but nothing came")),
    ("compliance", 0.07, ("please erase all personal data you hold on me under GDPR",
                          "our lawyer needs a copy of the data you store about us",
                          "we received a court order concerning one of your users")),
    ("hazard", 0.05, ("the power adapter gets too hot to touch", "the battery has started to bulge",
                      "there was a burning smell coming from the device")),
)
_NO_TEAM = ("I would love a dark mode in the app", "what are your support hours on weekends",
            "just wanted to say the new update looks great", "can I change the language of the newsletter")
_URGENT = ("this is blocking our whole team", "our service is down right now", "we need this fixed today")
_GREETINGS = ("Hello,", "Hi there,", "Good afternoon,", "Dear support,", "Hey,")
_SIGNOFFS = ("Thanks.", "Kind regards.", "Thank you in advance.", "Cheers.", "Best.")
_ASIDES = ("I have been a customer for two years.", "This is my second message about it.",
           "I am writing from the web form.", "A colleague saw the same thing.", "I already restarted everything.")
_TEAMS = ("payments", "access", "shipping", "compliance", "hazard", "general")
_LABEL_RE = re.compile(r"^(ent-)?(payments|access|shipping|compliance|hazard|general)(\+p1)?(\+l10n)?$")

_ROUTING_RULES = (
    Rule(f"{_R}.payments", _ROUTE,
         ("billing disputes and refunds go to payments", "send charges, refunds and invoices to payments",
          "payments owns refunds and invoices"),
         "Rubric: refunds, double charges and invoice problems belong to the payments team.", True, 0.24),
    Rule(f"{_R}.access", _ROUTE,
         ("sign-in and password problems go to access", "login trouble belongs in the access queue",
          "send lockouts and verification codes to access"),
         "Rubric: password, login and verification-code problems belong to the access team.", False, 0.20),
    Rule(f"{_R}.shipping", _ROUTE,
         ("delivery and tracking issues go to shipping", "send parcel and courier problems to shipping",
          "the shipping queue handles lost packages"),
         "Rubric: tracking, courier and missing-parcel problems are handled by the shipping team, not general.",
         True, 0.18),
    Rule(f"{_R}.compliance", _ROUTE,
         ("gdpr, legal and court requests go to compliance", "send data-erasure and lawyer requests to compliance",
          "compliance handles privacy and legal demands"),
         "Rubric: GDPR, lawyer and court-order requests belong to the compliance team.", False, 0.07),
    Rule(f"{_R}.hazard", _ROUTE,
         ("overheating, burning or bulging batteries go to hazard", "send fire and heat risks to the hazard queue",
          "hazard handles overheating devices"),
         "Rubric: any report of heat, burning smells or swollen batteries must be routed to the hazard team.",
         True, 0.05),
    Rule(f"{_R}.urgent", _ROUTE,
         ("append +p1 when service is down or blocked", "outages and same-day demands get the +p1 suffix",
          "add +p1 for urgent outages"),
         "Rubric: tickets reporting an outage, a blocked team or a same-day deadline need the +p1 suffix.", True, 0.15),
    Rule(f"{_R}.enterprise", _ROUTE,
         ("prefix ent- for enterprise plan customers", "enterprise customers get the ent- prefix",
          "put ent- in front for the enterprise plan"),
         "Rubric: customers on the enterprise plan get the ent- prefix.", False, 0.06),
    Rule(f"{_R}.locale", _ROUTE,
         ("append +l10n when locale is not en", "non-english locales get the +l10n suffix",
          "add +l10n for tickets whose locale is not en"),
         "Rubric: tickets whose locale header is not en must carry the +l10n suffix.", True, 0.12),
)


def _routing_label(enterprise: bool, team: str, urgent: bool, locale: bool) -> str:
    return ("ent-" if enterprise else "") + team + ("+p1" if urgent else "") + ("+l10n" if locale else "")


def _routing_parse_label(label: str) -> tuple[bool, str, bool, bool] | None:
    m = _LABEL_RE.match(normalize_text(label))
    if not m:
        return None
    return bool(m.group(1)), m.group(2), bool(m.group(3)), bool(m.group(4))


def _routing_features(ticket: str) -> dict[str, Any]:
    low = ticket.lower()
    team = next((t for t, _, snippets in _TEAM_SNIPPETS if any(s.lower() in low for s in snippets)), None)
    locale = re.search(r"\[locale: ([a-z]{2})\]", low)
    return {
        "team": team,
        "urgent": any(s.lower() in low for s in _URGENT),
        "enterprise": "[plan: enterprise]" in low,
        "locale": bool(locale and locale.group(1) != "en"),
    }


class RoutingProgram(dspy.Module):
    """``route = Predict(ticket -> queue)``; sync-only like most user programs."""

    def __init__(self, instruction: str) -> None:
        super().__init__()
        self.route = dspy.Predict(dspy.Signature("ticket -> queue", instruction))

    def forward(self, ticket: str) -> dspy.Prediction:
        return self.route(ticket=ticket)


class AsyncRoutingProgram(RoutingProgram):
    async def aforward(self, ticket: str) -> dspy.Prediction:
        return await self.route.acall(ticket=ticket)


class RoutingTask(Task):
    """Route a support ticket to a composed queue label ``[ent-]<team>[+p1][+l10n]``."""

    name = _R
    description = "single Predict(ticket -> queue); 8 rules (3 rare); label composition"
    predictors = (PredictorSpec(_ROUTE, ("ticket",), ("queue",)),)
    rules = _ROUTING_RULES
    input_fields = ("ticket",)
    noise = 0.03
    _seed_instructions = (
        (_ROUTE, "Route the support ticket to a single queue label. Billing disputes and refunds go to payments. "
                 "Anything else goes to general."),
    )

    def make_example(self, rng: random.Random) -> RawExample:
        u, acc, team = rng.random(), 0.0, None
        for t, p, _ in _TEAM_SNIPPETS:
            acc += p
            if u < acc:
                team = t
                break
        urgent = rng.random() < 0.15
        enterprise = rng.random() < 0.06
        foreign = rng.random() < 0.12
        plan = "enterprise" if enterprise else rng.choice(("free", "pro", "team"))
        locale = rng.choice(("de", "fr", "es", "ja")) if foreign else "en"
        topic = rng.choice(next(s for t, _, s in _TEAM_SNIPPETS if t == team)) if team else rng.choice(_NO_TEAM)
        parts = [f"[plan: {plan}] [locale: {locale}]", rng.choice(_GREETINGS)]
        if rng.random() < 0.6:
            parts.append(rng.choice(_ASIDES))
        parts.append(topic[0].upper() + topic[1:] + ".")
        if urgent:
            u_text = rng.choice(_URGENT)
            parts.append(u_text[0].upper() + u_text[1:] + ".")
        parts += [rng.choice(_SIGNOFFS), f"(case {rng.randint(10000, 99999)})"]
        inputs = {"ticket": " ".join(parts)}
        needed = ([f"{_R}.{team}"] if team else []) + [
            f"{_R}.{k}" for k, on in (("urgent", urgent), ("enterprise", enterprise), ("locale", foreign)) if on
        ]
        gold = self.simulate(_ROUTE, inputs, [r.id for r in self.rules])
        return RawExample(inputs, gold, tuple(needed))

    def simulate(self, predictor: str, inputs: Mapping[str, str], known: Iterable[str]) -> dict[str, str]:
        known = set(known)
        f = _routing_features(str(inputs.get("ticket", "")))
        team = f["team"] if f["team"] and f"{_R}.{f['team']}" in known else "general"
        return {"queue": _routing_label(
            f["enterprise"] and f"{_R}.enterprise" in known, team,
            f["urgent"] and f"{_R}.urgent" in known, f["locale"] and f"{_R}.locale" in known)}

    def corrupt(self, predictor: str, outputs: Mapping[str, str], rng: random.Random) -> dict[str, str]:
        ent, team, urgent, locale = _routing_parse_label(outputs.get("queue", "")) or (False, "general", False, False)
        choice = rng.randrange(3)
        if choice == 0:
            team = rng.choice([t for t in _TEAMS if t != team])
        elif choice == 1:
            urgent = not urgent
        else:
            locale = not locale
        return {"queue": _routing_label(ent, team, urgent, locale)}

    def infer_rules(self, expected: str, got: str) -> frozenset[str]:
        exp = _routing_parse_label(expected)
        if exp is None:
            return frozenset()
        have = _routing_parse_label(got) or (False, "", False, False)
        out = set()
        if exp[0] and not have[0]:
            out.add(f"{_R}.enterprise")
        if exp[1] != "general" and exp[1] != have[1]:
            out.add(f"{_R}.{exp[1]}")
        if exp[2] and not have[2]:
            out.add(f"{_R}.urgent")
        if exp[3] and not have[3]:
            out.add(f"{_R}.locale")
        return frozenset(out)

    def _build_program(self, instructions: Mapping[str, str], async_forward: bool) -> dspy.Module:
        cls = AsyncRoutingProgram if async_forward else RoutingProgram
        return cls(instructions[_ROUTE])

    def metric(
        self, gold: dspy.Example, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None
    ) -> dspy.Prediction:
        # Single predictor: pred_name does not change the feedback.
        expected = self.simulate(_ROUTE, {"ticket": gold.ticket}, [r.id for r in self.rules])["queue"]
        got = _quote(_get(pred, "queue"))
        if normalize_text(got) == expected:
            return dspy.Prediction(score=1.0, feedback=f"Correct: the queue '{expected}' is right.")
        exp_parts = _routing_parse_label(expected)
        have = _routing_parse_label(got) or (False, "", False, False)
        f = _routing_features(gold.ticket)
        violated = []
        if f["team"] and have[1] != exp_parts[1]:
            violated.append(f"{_R}.{f['team']}")
        for idx, key in ((2, "urgent"), (0, "enterprise"), (3, "locale")):
            if f[key] and not have[idx]:
                violated.append(f"{_R}.{key}")
        hints = [self.rule(rid).hint for rid in violated if self.rule(rid).explicit]
        feedback = " ".join(["The queue label is wrong.", *hints, f"Expected '{expected}' but got '{got}'."])
        return dspy.Prediction(score=0.0, feedback=feedback)


# --------------------------------------------------------------------------------------
# task 2: pipeline (room booking: extract -> render)
# --------------------------------------------------------------------------------------

_P = "pipeline"
_EXTRACT, _RENDER = "extract", "render"
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday")
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
                 11: "eleven", 12: "twelve", 14: "fourteen", 15: "fifteen", 16: "sixteen", 18: "eighteen",
                 20: "twenty"}
_WORD_NUMBERS = {w: n for n, w in _NUMBER_WORDS.items()}
_RECORD_KEYS = ("day", "start", "minutes", "people", "extras", "note")
_TAGS = (("AV", f"{_P}.av"), ("LARGE", f"{_P}.large"), ("LATE", f"{_P}.late"), ("EXEC", f"{_P}.exec"))
_MSG_RE = re.compile(
    r"book a room on (?P<day>\w+) at (?P<time>noon|\d{1,2}pm|\d{2}:\d{2}) for (?P<dur>\d+) (?P<unit>minutes|hours?) "
    r"for (?P<people>\w+) people", re.I)
_REPLY_RE = re.compile(r"^BOOKED (\S+) (\S+) for (\S+) min, (\S+) people((?: \[[A-Z-]+\])*)$")

_PIPELINE_RULES = (
    Rule(f"{_P}.clock", _EXTRACT,
         ("write start times on the 24-hour clock", "convert am/pm times to 24-hour hh:mm", "use 24-hour time for start"),
         "Rubric: start must use the 24-hour HH:MM clock (3pm is 15:00).", True, 0.52),
    Rule(f"{_P}.hours", _EXTRACT,
         ("convert durations in hours to minutes", "minutes must be hours times 60", "express hour durations as minutes"),
         "Rubric: minutes must count minutes, so a duration given in hours is multiplied by 60.", True, 0.25),
    Rule(f"{_P}.words", _EXTRACT,
         ("write spelled-out numbers as digits", "people must be a numeral, not a word", "convert number words to digits"),
         "Rubric: people must be written with digits.", False, 0.20),
    Rule(f"{_P}.noon", _EXTRACT,
         ("noon means 12:00", "treat noon as 12:00", "a start at noon is 12:00"),
         "Rubric: noon is 12:00.", False, 0.06),
    Rule(f"{_P}.av", _RENDER,
         ("projector bookings get the [av] tag", "add [av] when a projector is requested", "tag projector requests with [av]"),
         "Rubric: bookings with extras=projector must end with the [AV] tag.", True, 0.35),
    Rule(f"{_P}.large", _RENDER,
         ("add [large] for 10 or more people", "groups of ten or more get the [large] tag",
          "tag bookings with people >= 10 as [large]"),
         "Rubric: a booking for 10 or more people must carry the [LARGE] tag.", True, 0.25),
    Rule(f"{_P}.late", _RENDER,
         ("add [late] for starts at 17:00 or later", "evening bookings from 17:00 get the [late] tag",
          "tag starts from 17:00 onwards with [late]"),
         "Rubric: bookings starting at 17:00 or later carry the [LATE] tag.", False, 0.17),
    Rule(f"{_P}.exec", _RENDER,
         ("add [exec] for board meetings", "note=board bookings get the [exec] tag", "tag board meetings with [exec]"),
         "Rubric: board meetings carry the [EXEC] tag.", False, 0.07),
)


def _parse_record(text: str | None) -> dict[str, str]:
    record: dict[str, str] = {}
    for part in re.split(r"[;\n]", text or ""):
        if "=" in part:
            key, value = part.split("=", 1)
            record[key.strip().lower()] = value.strip()
    return record


def _format_record(record: Mapping[str, str]) -> str:
    return "; ".join(f"{k}={record.get(k, '')}" for k in _RECORD_KEYS)


def _as_int(value: str | None) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _render_reply(record: Mapping[str, str], known: Iterable[str]) -> str:
    known = set(known)
    people, start = _as_int(record.get("people")), str(record.get("start", ""))
    hour = _as_int(start.split(":")[0]) if re.fullmatch(r"\d{1,2}:\d{2}", start) else None
    fires = {
        f"{_P}.av": record.get("extras") == "projector",
        f"{_P}.large": people is not None and people >= 10,
        f"{_P}.late": hour is not None and hour >= 17,
        f"{_P}.exec": record.get("note") == "board",
    }
    tags = "".join(f" [{tag}]" for tag, rid in _TAGS if fires[rid] and rid in known)
    return (f"BOOKED {record.get('day', '?')} {record.get('start', '?')} for {record.get('minutes', '?')} min, "
            f"{record.get('people', '?')} people{tags}")


def _parse_reply(text: str) -> tuple[tuple[str, ...], frozenset[str]] | None:
    m = _REPLY_RE.match(re.sub(r"\s+", " ", text or "").strip())
    if not m:
        return None
    return m.groups()[:4], frozenset(re.findall(r"\[([A-Z-]+)\]", m.group(5)))


class BookingPipeline(dspy.Module):
    """``extract(message -> record)`` then ``render(record -> reply)``; returns both."""

    def __init__(self, extract_instruction: str, render_instruction: str) -> None:
        super().__init__()
        self.extract = dspy.Predict(dspy.Signature("message -> record", extract_instruction))
        self.render = dspy.Predict(dspy.Signature("record -> reply", render_instruction))

    def forward(self, message: str) -> dspy.Prediction:
        record = self.extract(message=message).record
        reply = self.render(record=record).reply
        return dspy.Prediction(record=record, reply=reply)


class AsyncBookingPipeline(BookingPipeline):
    async def aforward(self, message: str) -> dspy.Prediction:
        record = (await self.extract.acall(message=message)).record
        reply = (await self.render.acall(record=record)).reply
        return dspy.Prediction(record=record, reply=reply)


class PipelineTask(Task):
    """Two-stage room booking. The metric judges the final reply only, but with
    ``pred_name`` set it explains *that* stage: extraction is judged on the record it
    produced, rendering on what it made of the record it actually received."""

    name = _P
    description = "extract(message -> record) -> render(record -> reply); 4 + 4 rules; pred_name-routed feedback"
    predictors = (PredictorSpec(_EXTRACT, ("message",), ("record",)), PredictorSpec(_RENDER, ("record",), ("reply",)))
    rules = _PIPELINE_RULES
    input_fields = ("message",)
    noise = 0.02
    _seed_instructions = (
        (_EXTRACT, "Turn the room-booking message into a record of the form day=<day>; start=<HH:MM>; "
                   "minutes=<n>; people=<n>; extras=<projector|none>; note=<board|none>. "
                   "Write start times on the 24-hour clock."),
        (_RENDER, "Write a one-line confirmation of the form BOOKED <day> <start> for <minutes> min, "
                  "<people> people, followed by any tags. Projector bookings get the [AV] tag."),
    )

    def make_example(self, rng: random.Random) -> RawExample:
        day = rng.choice(_DAYS)
        u = rng.random()
        if u < 0.06:
            time_text = "noon"
        elif u < 0.58:
            time_text = f"{rng.randint(1, 6)}pm"
        else:
            time_text = f"{rng.randint(8, 16):02d}:{rng.choice(('00', '30'))}"
        if rng.random() < 0.25:
            hours = rng.randint(1, 4)
            duration = f"{hours} hour" + ("s" if hours > 1 else "")
        else:
            duration = f"{rng.choice((30, 45, 60, 90))} minutes"
        people = rng.randint(10, 20) if rng.random() < 0.25 else rng.randint(2, 9)
        in_words = rng.random() < 0.20 and people in _NUMBER_WORDS
        projector, board = rng.random() < 0.35, rng.random() < 0.07
        parts = [rng.choice(("Hi,", "Hello,", "Good morning,", "Hey team,")),
                 f"could you book a room on {day.capitalize()} at {time_text} for {duration} "
                 f"for {_NUMBER_WORDS[people] if in_words else people} people?"]
        if projector:
            parts.append(rng.choice(("We will need a projector.", "Please make sure there is a projector.")))
        if board:
            parts.append("It is for the board meeting.")
        parts.append(f"Thanks! (ref B-{rng.randint(10000, 99999)})")
        inputs = {"message": " ".join(parts)}
        all_ids = [r.id for r in self.rules]
        record = self.simulate(_EXTRACT, inputs, all_ids)["record"]
        reply = self.simulate(_RENDER, {"record": record}, all_ids)["reply"]
        needed = self._needed(inputs["message"], record)
        return RawExample(inputs, {"record": record, "reply": reply}, needed)

    def _needed(self, message: str, gold_record: str) -> tuple[str, ...]:
        m = _MSG_RE.search(message)
        rec = _parse_record(gold_record)
        out = []
        if m and m.group("time").lower().endswith("pm"):
            out.append(f"{_P}.clock")
        if m and m.group("unit").lower().startswith("hour"):
            out.append(f"{_P}.hours")
        if m and not m.group("people").isdigit():
            out.append(f"{_P}.words")
        if m and m.group("time").lower() == "noon":
            out.append(f"{_P}.noon")
        full = _render_reply(rec, [r.id for r in self.rules])
        parsed = _parse_reply(full)
        tags = parsed[1] if parsed else frozenset()
        out += [rid for tag, rid in _TAGS if tag in tags]
        return tuple(out)

    def simulate(self, predictor: str, inputs: Mapping[str, str], known: Iterable[str]) -> dict[str, str]:
        known = set(known)
        if predictor == _RENDER:
            return {"reply": _render_reply(_parse_record(inputs.get("record")), known)}
        if predictor != _EXTRACT:
            raise KeyError(f"task {self.name!r} has no predictor {predictor!r}")
        message = str(inputs.get("message", ""))
        m = _MSG_RE.search(message)
        if not m:
            return {"record": _format_record({"day": "?", "start": "?", "minutes": "?", "people": "?",
                                              "extras": "none", "note": "none"})}
        time_text = m.group("time").lower()
        if time_text == "noon":
            start = "12:00" if f"{_P}.noon" in known else "noon"
        elif time_text.endswith("pm"):
            start = f"{int(time_text[:-2]) + 12}:00" if f"{_P}.clock" in known else time_text
        else:
            start = time_text
        minutes = int(m.group("dur"))
        if m.group("unit").lower().startswith("hour") and f"{_P}.hours" in known:
            minutes *= 60
        people = m.group("people").lower()
        if not people.isdigit() and f"{_P}.words" in known:
            people = str(_WORD_NUMBERS.get(people, people))
        low = message.lower()
        return {"record": _format_record({
            "day": m.group("day").lower(), "start": start, "minutes": str(minutes), "people": people,
            "extras": "projector" if "projector" in low else "none", "note": "board" if "board meeting" in low else "none",
        })}

    def corrupt(self, predictor: str, outputs: Mapping[str, str], rng: random.Random) -> dict[str, str]:
        if predictor == _EXTRACT:
            rec = _parse_record(outputs.get("record"))
            key = rng.choice(("day", "minutes", "people"))
            if key == "day":
                rec["day"] = rng.choice([d for d in _DAYS if d != rec.get("day")])
            else:
                rec[key] = str((_as_int(rec.get(key)) or 0) + rng.choice((1, 15)))
            return {"record": _format_record(rec)}
        parsed = _parse_reply(outputs.get("reply", ""))
        if parsed is None:
            return {"reply": str(outputs.get("reply", "")) + " [X]"}
        (day, start, minutes, people), tags = parsed
        tag = rng.choice([t for t, _ in _TAGS])
        tags = tags - {tag} if tag in tags else tags | {tag}
        suffix = "".join(f" [{t}]" for t, _ in _TAGS if t in tags)
        return {"reply": f"BOOKED {day} {start} for {minutes} min, {people} people{suffix}"}

    def infer_rules(self, expected: str, got: str) -> frozenset[str]:
        out: set[str] = set()
        exp_reply, got_reply = _parse_reply(expected), _parse_reply(got)
        if exp_reply is not None:
            (_, e_start, e_min, e_people), e_tags = exp_reply
            (_, g_start, g_min, g_people), g_tags = got_reply or (("", "", "", ""), frozenset())
            out |= self._field_rules(e_start, e_min, e_people, g_start, g_min, g_people)
            out |= {rid for tag, rid in _TAGS if tag in e_tags and tag not in g_tags}
            return frozenset(out)
        exp_rec = _parse_record(expected)
        if not {"day", "start", "minutes", "people"} <= set(exp_rec):
            return frozenset()
        got_rec = _parse_record(got)
        return frozenset(self._field_rules(exp_rec["start"], exp_rec["minutes"], exp_rec["people"],
                                           got_rec.get("start", ""), got_rec.get("minutes", ""),
                                           got_rec.get("people", "")))

    @staticmethod
    def _field_rules(e_start: str, e_min: str, e_people: str, g_start: str, g_min: str, g_people: str) -> set[str]:
        out = set()
        if e_start != g_start:
            if g_start.lower() == "noon":
                out.add(f"{_P}.noon")
            elif g_start.lower().endswith(("am", "pm")):
                out.add(f"{_P}.clock")
        if e_min != g_min and g_min.isdigit() and e_min.isdigit() and int(e_min) == 60 * int(g_min):
            out.add(f"{_P}.hours")
        if e_people != g_people and g_people.isalpha():
            out.add(f"{_P}.words")
        return out

    def _build_program(self, instructions: Mapping[str, str], async_forward: bool) -> dspy.Module:
        cls = AsyncBookingPipeline if async_forward else BookingPipeline
        return cls(instructions[_EXTRACT], instructions[_RENDER])

    def _violations(self, message: str, produced_record: Mapping[str, str], reference_record: Mapping[str, str],
                    produced_reply: str, reference_reply: str, stages: set[str]) -> list[str]:
        """Explicit-or-not rules that this output visibly violates, in rule order."""
        m = _MSG_RE.search(message)
        out = []
        if _EXTRACT in stages and m:
            t, unit, people = m.group("time").lower(), m.group("unit").lower(), m.group("people")
            if t.endswith("pm") and produced_record.get("start") != reference_record.get("start"):
                out.append(f"{_P}.clock")
            if unit.startswith("hour") and produced_record.get("minutes") != reference_record.get("minutes"):
                out.append(f"{_P}.hours")
            if not people.isdigit() and produced_record.get("people") != reference_record.get("people"):
                out.append(f"{_P}.words")
            if t == "noon" and produced_record.get("start") != reference_record.get("start"):
                out.append(f"{_P}.noon")
        if _RENDER in stages:
            ref = _parse_reply(reference_reply)
            got = _parse_reply(produced_reply)
            ref_tags = ref[1] if ref else frozenset()
            got_tags = got[1] if got else frozenset()
            out += [rid for tag, rid in _TAGS if tag in ref_tags and tag not in got_tags]
        return out

    def _feedback(self, head: str, violated: Sequence[str], expected: str, got: str) -> str:
        hints = [self.rule(rid).hint for rid in violated if self.rule(rid).explicit]
        return " ".join([head, *hints, f"Expected '{expected}' but got '{got}'."])

    def metric(
        self, gold: dspy.Example, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None
    ) -> dspy.Prediction:
        all_ids = [r.id for r in self.rules]
        message = str(gold.message)
        gold_record = self.simulate(_EXTRACT, {"message": message}, all_ids)["record"]
        gold_reply = self.simulate(_RENDER, {"record": gold_record}, all_ids)["reply"]
        got_reply = _quote(_get(pred, "reply"))
        score = 1.0 if got_reply == gold_reply else 0.0

        # The trace of this predictor's call if GEPA gave us one, else the program output.
        call_inputs: Any = None
        call_outputs: Any = pred
        if pred_trace:
            _, call_inputs, call_outputs = pred_trace[0]

        if pred_name == _EXTRACT:
            got_record = _quote(_get(call_outputs, "record"))
            if _parse_record(got_record) == _parse_record(gold_record):
                return dspy.Prediction(score=score, feedback="Correct: the extracted record is right.")
            violated = self._violations(message, _parse_record(got_record), _parse_record(gold_record),
                                        "", "", {_EXTRACT})
            return dspy.Prediction(score=score, feedback=self._feedback(
                "The extracted record is wrong.", violated, gold_record, got_record))

        if pred_name == _RENDER:
            received = _get(call_inputs, "record") if call_inputs is not None else _get(pred, "record")
            produced = _quote(_get(call_outputs, "reply"))
            expected = _render_reply(_parse_record(received), all_ids)
            if produced == expected:
                return dspy.Prediction(score=score, feedback=(
                    "Correct: the rendering is right for the record it received; "
                    + ("the final reply is right." if score else "any remaining error comes from an earlier stage.")))
            violated = self._violations(message, {}, {}, produced, expected, {_RENDER})
            return dspy.Prediction(score=score, feedback=self._feedback(
                "The rendering of the received record is wrong.", violated, expected, produced))

        # No pred_name (plain scoring) or an unknown one: mixed, end-to-end feedback.
        if score:
            return dspy.Prediction(score=1.0, feedback=f"Correct: the reply '{gold_reply}' is right.")
        violated = self._violations(message, _parse_record(_get(pred, "record")), _parse_record(gold_record),
                                    got_reply, gold_reply, {_EXTRACT, _RENDER})
        return dspy.Prediction(score=0.0, feedback=self._feedback("The reply is wrong.", violated, gold_reply, got_reply))


# --------------------------------------------------------------------------------------
# task 3: pricing (ChainOfThought, typed float output)
# --------------------------------------------------------------------------------------

_Q = "pricing"
_QUOTE = "quote.predict"
_CATALOG = (("notebook", "4.50"), ("pen", "0.80"), ("stapler", "7.25"), ("mug", "6.40"), ("lamp", "18.90"),
            ("folder", "2.35"))
_CENT = Decimal("0.01")
_ORDER_LINE_RE = re.compile(r"(\d+) x ([a-z]+) at (\d+\.\d{2})")

_PRICING_RULES = (
    Rule(f"{_Q}.vat", _QUOTE,
         ("add 20% vat for eu orders", "eu orders pay 20 percent vat", "apply 20% vat when the region is eu"),
         "Rubric: orders in the eu region include 20% VAT on the discounted amount.", True, 0.40),
    Rule(f"{_Q}.coupon", _QUOTE,
         ("coupon save10 takes 10% off the subtotal", "save10 gives 10 percent off", "apply a 10% discount for save10"),
         "Rubric: the SAVE10 coupon takes 10% off the item subtotal.", True, 0.30),
    Rule(f"{_Q}.express", _QUOTE,
         ("express shipping adds 12.00", "add a flat 12.00 fee for express", "express delivery costs 12.00 extra"),
         "Rubric: express shipping adds a flat fee of 12.00 after tax.", True, 0.25),
    Rule(f"{_Q}.bulk", _QUOTE,
         ("orders of 10 or more units get 5.00 off", "take 5.00 off when there are at least 10 units",
          "bulk orders of ten units or more save 5.00"),
         "Rubric: orders with 10 or more units get 5.00 off before other discounts.", False, 0.20),
    Rule(f"{_Q}.fragile", _QUOTE,
         ("fragile items add a 4.00 handling fee", "charge 4.00 handling for fragile goods",
          "add 4.00 when the order contains fragile items"),
         "Rubric: fragile orders pay a 4.00 handling fee after tax.", False, 0.07),
    Rule(f"{_Q}.member", _QUOTE,
         ("gold members get 5% off", "give gold members a 5 percent discount", "members with gold status save 5%"),
         "Rubric: gold members get 5% off after the coupon.", False, 0.06),
)
# For infer_rules: (rules, multiplicative factor) and (rules, additive amount), single and paired.
_PRICING_FACTORS = (({"coupon"}, Decimal("0.9")), ({"member"}, Decimal("0.95")), ({"vat"}, Decimal("1.2")),
                    ({"coupon", "member"}, Decimal("0.855")))
_PRICING_ADDONS = (({"express"}, Decimal("12")), ({"fragile"}, Decimal("4")), ({"express", "fragile"}, Decimal("16")))


def _to_decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    match = re.search(r"-?\d+(?:\.\d+)?", str(value).replace(",", ""))
    if not match:
        return None
    try:
        return Decimal(match.group(0))
    except InvalidOperation:
        return None


def _money(value: Decimal) -> str:
    return str(value.quantize(_CENT, rounding=ROUND_HALF_UP))


class PricingProgram(dspy.Module):
    """``quote = ChainOfThought(order -> total: float)``; its predictor is ``quote.predict``."""

    def __init__(self, instruction: str) -> None:
        super().__init__()
        self.quote = dspy.ChainOfThought(dspy.Signature("order -> total: float", instruction))

    def forward(self, order: str) -> dspy.Prediction:
        return self.quote(order=order)


class AsyncPricingProgram(PricingProgram):
    async def aforward(self, order: str) -> dspy.Prediction:
        return await self.quote.acall(order=order)


class PricingTask(Task):
    """Compute an order total with discounts, tax and fees, through ChainOfThought."""

    name = _Q
    description = "ChainOfThought(order -> total: float); 6 rules (2 rare); reasoning field and typed output"
    predictors = (PredictorSpec(_QUOTE, ("order",), ("total",), chain_of_thought=True),)
    rules = _PRICING_RULES
    input_fields = ("order",)
    noise = 0.03
    _seed_instructions = (
        (_QUOTE, "Compute the total price of the order from its lines (quantity times unit price). "
                 "Add 20% VAT for EU orders. Give the total with two decimals."),
    )

    def make_example(self, rng: random.Random) -> RawExample:
        region = "eu" if rng.random() < 0.40 else rng.choice(("us", "uk", "ca"))
        member = "gold" if rng.random() < 0.06 else "standard"
        lines = [[rng.randint(1, 3), *rng.choice(_CATALOG)] for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.20:
            lines[0][0] = rng.randint(10, 14)
        parts = [f"[region: {region}] [member: {member}]",
                 "Order: " + ", ".join(f"{q} x {item} at {price}" for q, item, price in lines) + "."]
        if rng.random() < 0.30:
            parts.append("Coupon: SAVE10.")
        parts.append("Shipping: express." if rng.random() < 0.25 else "Shipping: standard.")
        if rng.random() < 0.07:
            parts.append("Note: fragile items, handle with care.")
        parts.append(f"(order {rng.randint(10000, 99999)})")
        inputs = {"order": " ".join(parts)}
        fired = self._fired(inputs["order"])
        gold = self.simulate(_QUOTE, inputs, [r.id for r in self.rules])
        return RawExample(inputs, gold, tuple(sorted(fired, key=[r.id for r in self.rules].index)))

    @staticmethod
    def _fired(order: str) -> set[str]:
        low = order.lower()
        units = sum(int(q) for q, _, _ in _ORDER_LINE_RE.findall(low))
        checks = {"vat": "[region: eu]" in low, "coupon": "coupon: save10" in low, "express": "shipping: express" in low,
                  "bulk": units >= 10, "fragile": "fragile" in low, "member": "[member: gold]" in low}
        return {f"{_Q}.{k}" for k, on in checks.items() if on}

    def simulate(self, predictor: str, inputs: Mapping[str, str], known: Iterable[str]) -> dict[str, str]:
        order = str(inputs.get("order", ""))
        apply = self._fired(order) & set(known)
        total = sum((int(q) * Decimal(p) for q, _, p in _ORDER_LINE_RE.findall(order.lower())), Decimal(0))
        if f"{_Q}.bulk" in apply:
            total -= 5
        if f"{_Q}.coupon" in apply:
            total *= Decimal("0.9")
        if f"{_Q}.member" in apply:
            total *= Decimal("0.95")
        if f"{_Q}.vat" in apply:
            total *= Decimal("1.2")
        if f"{_Q}.express" in apply:
            total += 12
        if f"{_Q}.fragile" in apply:
            total += 4
        return {"total": _money(total)}

    def corrupt(self, predictor: str, outputs: Mapping[str, str], rng: random.Random) -> dict[str, str]:
        value = _to_decimal(outputs.get("total")) or Decimal(0)
        delta = Decimal(rng.choice(("0.50", "1.00", "2.50", "10.00"))) * rng.choice((-1, 1))
        return {"total": _money(value + delta)}

    def infer_rules(self, expected: str, got: str) -> frozenset[str]:
        if not re.fullmatch(r"-?\d+\.\d{2}", expected.strip()) or not re.fullmatch(r"-?\d+(\.\d+)?", got.strip()):
            return frozenset()
        e, g = Decimal(expected.strip()), Decimal(got.strip())
        tol = Decimal("0.011")
        for offset in (Decimal(0), Decimal(4), Decimal(12), Decimal(16)):  # fees the student already added
            if g - offset <= 0:
                continue
            for names, factor in _PRICING_FACTORS:
                if abs((e - offset) - (g - offset) * factor) <= tol:
                    return frozenset(f"{_Q}.{n}" for n in names)
        for names, amount in _PRICING_ADDONS:
            if abs((e - g) - amount) <= tol:
                return frozenset(f"{_Q}.{n}" for n in names)
        if Decimal("-6.01") <= e - g <= Decimal("-4.27"):  # 5.00 off, scaled by coupon/member/VAT
            return frozenset({f"{_Q}.bulk"})
        return frozenset()

    def _build_program(self, instructions: Mapping[str, str], async_forward: bool) -> dspy.Module:
        cls = AsyncPricingProgram if async_forward else PricingProgram
        return cls(instructions[_QUOTE])

    def metric(
        self, gold: dspy.Example, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None
    ) -> dspy.Prediction:
        expected = self.simulate(_QUOTE, {"order": gold.order}, [r.id for r in self.rules])["total"]
        raw = _get(pred, "total")
        value = _to_decimal(raw)
        if value is not None and abs(value - Decimal(expected)) < Decimal("0.005"):
            return dspy.Prediction(score=1.0, feedback=f"Correct: the total '{expected}' is right.")
        got = _money(value) if value is not None else _quote(raw)
        hints = [self.rule(rid).hint for rid in sorted(self._fired(gold.order)) if self.rule(rid).explicit]
        head = "The total is wrong." if value is not None else "The total is not a number."
        feedback = " ".join([head, *hints, f"Expected '{expected}' but got '{got}'."])
        return dspy.Prediction(score=0.0, feedback=feedback)


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------

TASKS: Mapping[str, Task] = MappingProxyType({t.name: t for t in (RoutingTask(), PipelineTask(), PricingTask())})
ALL_RULES: tuple[Rule, ...] = tuple(r for t in TASKS.values() for r in t.rules)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None


def find_rule(rule_id: str) -> Rule:
    for r in ALL_RULES:
        if r.id == rule_id:
            return r
    raise KeyError(f"unknown rule {rule_id!r}")


def known_rules(instruction_text: str, rules: Iterable[Rule] = ALL_RULES) -> frozenset[str]:
    """Ids of all rules (of any task) that ``instruction_text`` states."""
    norm = normalize_text(instruction_text)
    return frozenset(r.id for r in rules if r.known_by(norm))
