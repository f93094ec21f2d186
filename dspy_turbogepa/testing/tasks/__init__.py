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

* ``routing``  - one ``Predict(ticket -> queue)``; 8 rules, 3 of them rare.
* ``pipeline`` - ``extract(message -> record)`` then ``render(record -> reply)``; 4 + 4
  rules; feedback is routed by ``pred_name`` so per-predictor credit matters.
* ``pricing``  - one ``ChainOfThought(order -> total: float)``; 6 rules; exercises the
  ``reasoning`` field, a dotted predictor name (``quote.predict``) and a typed output.

Everything here is pure and immutable: the HTTP simulator and the in-process fake LM
import the same objects, so gold labels, student behaviour and metric cannot drift.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from dspy_turbogepa.testing.tasks.base import (
    PredictorSpec,
    RawExample,
    Rule,
    Splits,
    Task,
    normalize_text,
    stable_hash,
    text_digest,
    unit_random,
    word_count,
)
from dspy_turbogepa.testing.tasks.pipeline import PipelineTask
from dspy_turbogepa.testing.tasks.pricing import PricingTask
from dspy_turbogepa.testing.tasks.routing import RoutingTask

__all__ = [
    "ALL_RULES",
    "TASKS",
    "PipelineTask",
    "PredictorSpec",
    "PricingTask",
    "RawExample",
    "RoutingTask",
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
