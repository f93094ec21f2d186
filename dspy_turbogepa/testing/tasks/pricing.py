"""Task ``pricing``: ``ChainOfThought(order -> total: float)`` computing an order total
with discounts, VAT and fees; 6 rules (fragile and member are rare).

Exercises the ``reasoning`` field, a dotted predictor name (``quote.predict``) and a
typed output. Implicit rules are inferable because each one changes the total by a
tell-tale factor (0.9, 0.95, 1.2) or amount (+12, +4, -5).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import dspy

from dspy_turbogepa.testing.tasks.base import (
    PredictorSpec,
    RawExample,
    Rule,
    Task,
    get_field,
    quote_output,
)

__all__ = ["AsyncPricingProgram", "PricingProgram", "PricingTask"]

# --------------------------------------------------------------------------------------
# task 3: pricing (ChainOfThought, typed float output)
# --------------------------------------------------------------------------------------

_Q = "pricing"
_QUOTE = "quote.predict"
_CATALOG = (
    ("notebook", "4.50"),
    ("pen", "0.80"),
    ("stapler", "7.25"),
    ("mug", "6.40"),
    ("lamp", "18.90"),
    ("folder", "2.35"),
)
_CENT = Decimal("0.01")
_ORDER_LINE_RE = re.compile(r"(\d+) x ([a-z]+) at (\d+\.\d{2})")

_PRICING_RULES = (
    Rule(
        f"{_Q}.vat",
        _QUOTE,
        ("add 20% vat for eu orders", "eu orders pay 20 percent vat", "apply 20% vat when the region is eu"),
        "Rubric: orders in the eu region include 20% VAT on the discounted amount.",
        True,
        0.40,
    ),
    Rule(
        f"{_Q}.coupon",
        _QUOTE,
        ("coupon save10 takes 10% off the subtotal", "save10 gives 10 percent off", "apply a 10% discount for save10"),
        "Rubric: the SAVE10 coupon takes 10% off the item subtotal.",
        True,
        0.30,
    ),
    Rule(
        f"{_Q}.express",
        _QUOTE,
        ("express shipping adds 12.00", "add a flat 12.00 fee for express", "express delivery costs 12.00 extra"),
        "Rubric: express shipping adds a flat fee of 12.00 after tax.",
        True,
        0.25,
    ),
    Rule(
        f"{_Q}.bulk",
        _QUOTE,
        (
            "orders of 10 or more units get 5.00 off",
            "take 5.00 off when there are at least 10 units",
            "bulk orders of ten units or more save 5.00",
        ),
        "Rubric: orders with 10 or more units get 5.00 off before other discounts.",
        False,
        0.20,
    ),
    Rule(
        f"{_Q}.fragile",
        _QUOTE,
        (
            "fragile items add a 4.00 handling fee",
            "charge 4.00 handling for fragile goods",
            "add 4.00 when the order contains fragile items",
        ),
        "Rubric: fragile orders pay a 4.00 handling fee after tax.",
        False,
        0.07,
    ),
    Rule(
        f"{_Q}.member",
        _QUOTE,
        ("gold members get 5% off", "give gold members a 5 percent discount", "members with gold status save 5%"),
        "Rubric: gold members get 5% off after the coupon.",
        False,
        0.06,
    ),
)
# For infer_rules: (rules, multiplicative factor) and (rules, additive amount), single and paired.
_PRICING_FACTORS = (
    (("coupon",), Decimal("0.9")),
    (("member",), Decimal("0.95")),
    (("vat",), Decimal("1.2")),
    (("coupon", "member"), Decimal("0.855")),
)
_PRICING_ADDONS = ((("express",), Decimal(12)), (("fragile",), Decimal(4)), (("express", "fragile"), Decimal(16)))


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
        (
            _QUOTE,
            (
                "Compute the total price of the order from its lines (quantity times unit price). "
                "Add 20% VAT for EU orders. Give the total with two decimals."
            ),
        ),
    )

    def make_example(self, rng: random.Random) -> RawExample:
        region = "eu" if rng.random() < 0.40 else rng.choice(("us", "uk", "ca"))
        member = "gold" if rng.random() < 0.06 else "standard"
        lines = [[rng.randint(1, 3), *rng.choice(_CATALOG)] for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.20:
            lines[0][0] = rng.randint(10, 14)
        parts = [
            f"[region: {region}] [member: {member}]",
            "Order: " + ", ".join(f"{q} x {item} at {price}" for q, item, price in lines) + ".",
        ]
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
        checks = {
            "vat": "[region: eu]" in low,
            "coupon": "coupon: save10" in low,
            "express": "shipping: express" in low,
            "bulk": units >= 10,
            "fragile": "fragile" in low,
            "member": "[member: gold]" in low,
        }
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
        raw = get_field(pred, "total")
        value = _to_decimal(raw)
        if value is not None and abs(value - Decimal(expected)) < Decimal("0.005"):
            return dspy.Prediction(score=1.0, feedback=f"Correct: the total '{expected}' is right.")
        got = _money(value) if value is not None else quote_output(raw)
        hints = [self.rule(rid).hint for rid in sorted(self._fired(gold.order)) if self.rule(rid).explicit]
        head = "The total is wrong." if value is not None else "The total is not a number."
        feedback = " ".join([head, *hints, f"Expected '{expected}' but got '{got}'."])
        return dspy.Prediction(score=0.0, feedback=feedback)
