"""Task ``routing``: one ``Predict(ticket -> queue)`` composing a label
``[ent-]<team>[+p1][+l10n]``; 8 rules, 3 of them rare (5-7 % of tickets).

The seed instruction knows only ``payments``. Explicit rules (rubric sentence in
feedback): payments, shipping, hazard, urgent, locale. Implicit (expected/got only):
access, compliance, enterprise.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from typing import Any

import dspy

from dspy_turbogepa.testing.tasks.base import (
    PredictorSpec,
    RawExample,
    Rule,
    Task,
    get_field,
    normalize_text,
    quote_output,
)

__all__ = ["AsyncRoutingProgram", "RoutingProgram", "RoutingTask"]

# --------------------------------------------------------------------------------------
# task 1: routing
# --------------------------------------------------------------------------------------

_R = "routing"
_ROUTE = "route"

_TEAM_SNIPPETS: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    (
        "payments",
        0.24,
        (
            "my card was billed twice this month",
            "I am still waiting for the refund you promised",
            "the amount on my invoice does not match my plan",
        ),
    ),
    (
        "access",
        0.20,
        (
            "the password reset link has expired again",
            "I keep getting locked out when I sign in",
            "the verification code never reaches my phone",
        ),
    ),
    (
        "shipping",
        0.18,
        (
            "the tracking page has not updated in a week",
            "the box arrived empty",
            "the courier marked the package as delivered but nothing came",
        ),
    ),
    (
        "compliance",
        0.07,
        (
            "please erase all personal data you hold on me under GDPR",
            "our lawyer needs a copy of the data you store about us",
            "we received a court order concerning one of your users",
        ),
    ),
    (
        "hazard",
        0.05,
        (
            "the power adapter gets too hot to touch",
            "the battery has started to bulge",
            "there was a burning smell coming from the device",
        ),
    ),
)
_NO_TEAM = (
    "I would love a dark mode in the app",
    "what are your support hours on weekends",
    "just wanted to say the new update looks great",
    "can I change the language of the newsletter",
)
_URGENT = ("this is blocking our whole team", "our service is down right now", "we need this fixed today")
_GREETINGS = ("Hello,", "Hi there,", "Good afternoon,", "Dear support,", "Hey,")
_SIGNOFFS = ("Thanks.", "Kind regards.", "Thank you in advance.", "Cheers.", "Best.")
_ASIDES = (
    "I have been a customer for two years.",
    "This is my second message about it.",
    "I am writing from the web form.",
    "A colleague saw the same thing.",
    "I already restarted everything.",
)
_TEAMS = ("payments", "access", "shipping", "compliance", "hazard", "general")
_LABEL_RE = re.compile(r"^(ent-)?(payments|access|shipping|compliance|hazard|general)(\+p1)?(\+l10n)?$")

_ROUTING_RULES = (
    Rule(
        f"{_R}.payments",
        _ROUTE,
        (
            "billing disputes and refunds go to payments",
            "send charges, refunds and invoices to payments",
            "payments owns refunds and invoices",
        ),
        "Rubric: refunds, double charges and invoice problems belong to the payments team.",
        True,
        0.24,
    ),
    Rule(
        f"{_R}.access",
        _ROUTE,
        (
            "sign-in and password problems go to access",
            "login trouble belongs in the access queue",
            "send lockouts and verification codes to access",
        ),
        "Rubric: password, login and verification-code problems belong to the access team.",
        False,
        0.20,
    ),
    Rule(
        f"{_R}.shipping",
        _ROUTE,
        (
            "delivery and tracking issues go to shipping",
            "send parcel and courier problems to shipping",
            "the shipping queue handles lost packages",
        ),
        "Rubric: tracking, courier and missing-parcel problems are handled by the shipping team, not general.",
        True,
        0.18,
    ),
    Rule(
        f"{_R}.compliance",
        _ROUTE,
        (
            "gdpr, legal and court requests go to compliance",
            "send data-erasure and lawyer requests to compliance",
            "compliance handles privacy and legal demands",
        ),
        "Rubric: GDPR, lawyer and court-order requests belong to the compliance team.",
        False,
        0.07,
    ),
    Rule(
        f"{_R}.hazard",
        _ROUTE,
        (
            "overheating, burning or bulging batteries go to hazard",
            "send fire and heat risks to the hazard queue",
            "hazard handles overheating devices",
        ),
        "Rubric: any report of heat, burning smells or swollen batteries must be routed to the hazard team.",
        True,
        0.05,
    ),
    Rule(
        f"{_R}.urgent",
        _ROUTE,
        (
            "append +p1 when service is down or blocked",
            "outages and same-day demands get the +p1 suffix",
            "add +p1 for urgent outages",
        ),
        "Rubric: tickets reporting an outage, a blocked team or a same-day deadline need the +p1 suffix.",
        True,
        0.15,
    ),
    Rule(
        f"{_R}.enterprise",
        _ROUTE,
        (
            "prefix ent- for enterprise plan customers",
            "enterprise customers get the ent- prefix",
            "put ent- in front for the enterprise plan",
        ),
        "Rubric: customers on the enterprise plan get the ent- prefix.",
        False,
        0.06,
    ),
    Rule(
        f"{_R}.locale",
        _ROUTE,
        (
            "append +l10n when locale is not en",
            "non-english locales get the +l10n suffix",
            "add +l10n for tickets whose locale is not en",
        ),
        "Rubric: tickets whose locale header is not en must carry the +l10n suffix.",
        True,
        0.12,
    ),
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
        (
            _ROUTE,
            (
                "Route the support ticket to a single queue label. Billing disputes and refunds go to payments. "
                "Anything else goes to general."
            ),
        ),
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
        return {
            "queue": _routing_label(
                f["enterprise"] and f"{_R}.enterprise" in known,
                team,
                f["urgent"] and f"{_R}.urgent" in known,
                f["locale"] and f"{_R}.locale" in known,
            )
        }

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
        got = quote_output(get_field(pred, "queue"))
        if normalize_text(got) == expected:
            return dspy.Prediction(score=1.0, feedback=f"Correct: the queue '{expected}' is right.")
        exp_parts = _routing_parse_label(expected)
        assert exp_parts is not None  # simulate() always returns a well-formed label
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
