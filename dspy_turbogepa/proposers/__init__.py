"""How new candidates are made: reflective mutation (and, later, merge)."""

from dspy_turbogepa.proposers.reflection import ReflectiveProposer

__all__ = ["ReflectiveProposer"]
