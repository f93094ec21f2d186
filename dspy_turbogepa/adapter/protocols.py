"""Checking, before any LM call, that a user's callable can be called the way GEPA will call it.

A proposer or selector with the wrong parameters otherwise fails on its first use, after the seed's
validation pass and a reflection have been paid for (50 student calls in a reported case).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import dspy

from dspy_turbogepa.adapter.evaluator import defines_own_aforward


def check_call_protocol(
    fn: Any, argument: str, protocol: str, *, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> None:
    """Raise ``TypeError`` naming ``argument`` and the expected ``protocol`` when ``fn`` cannot be
    called with ``args`` / ``kwargs`` (placeholders: only their number and names matter). A callable
    without a readable signature (a builtin, some C extensions) is let through: nothing to check."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    kwargs = dict(kwargs or {})
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        try:  # ``functools.wraps`` shows the wrapped function, whose first arguments the decorator may
            # supply: accepted when the wrapper takes the call and the wrapped function takes all of it
            # but those (a wrapper taking anything must not let a wrong signature through)
            inspect.signature(fn, follow_wrapped=False).bind(*args, **kwargs)
            sig.bind_partial(*args, **kwargs)
            return
        except (TypeError, ValueError):
            pass
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        raise TypeError(
            f"{argument} is called as {protocol}, but its signature is {name}{sig} ({exc}). "
            f"Give it those parameters."
        ) from exc


def check_inputs_reach(student: Any, name: str, examples: Sequence[Any]) -> None:
    """Refuse data whose inputs can never reach the program, before any LM call: every evaluation would
    fail the same way, and the run would pay for the seed's validation and for reflections trying to
    "fix" a TypeError before the systemic-failure check stopped it (dspy.GEPA returns the seed).

    Only what certainly fails: inputs the method the evaluator calls (``aforward`` for a program with an
    ``aforward`` of its own, else ``forward``, reached through ``dspy.Module.__call__`` / ``acall``)
    cannot be bound to, when it takes no ``**kwargs``. An input the examples lack, with a default in the
    method, is fine; a ``with_inputs`` name no example holds is named in the error (a typo there is the
    usual cause) and otherwise warned about, since nothing is passed for it.
    """
    marked: set[str] = set()
    present: set[str] = set()
    for ex in examples:
        marked |= set(getattr(ex, "_input_keys", None) or ())
        present |= set(getattr(ex, "_store", {}))
    absent = sorted(marked - present)
    hint = (f" .with_inputs(...) marks {absent}, which no example in {name} has (its fields: {sorted(present)}):"
            " fix the names passed to .with_inputs(...)." if absent else "")
    method_name = "aforward" if defines_own_aforward(student) else "forward"
    entry = "acall" if method_name == "aforward" else "__call__"
    target = _bindable(type(student), method_name, student)
    if getattr(type(student), entry, None) is not getattr(dspy.Module, entry, None) or target is None:
        target = None  # a custom __call__ / acall may map the inputs itself; a method we cannot read
    if target is not None:
        sig, plain, first = target
        for i, ex in enumerate(examples):
            inputs = dict(ex.inputs())  # what `program(**example.inputs())` passes
            try:
                sig.bind(*first, **inputs)
                continue
            except TypeError as exc:
                try:
                    plain.bind(*first, **inputs)  # a decorator's wrapper may take what the wrapped one cannot
                    continue
                except TypeError:
                    pass
                shown = sig.replace(parameters=list(sig.parameters.values())[len(first):])
                raise TypeError(
                    f"{name}[{i}]'s inputs {sorted(inputs)} cannot be passed to {type(student).__name__}."
                    f"{method_name}{shown} ({exc}): every evaluation would fail.{hint or ''} Mark the inputs it "
                    "takes with .with_inputs(...) (the label is not an input), or rename the fields or its "
                    "parameters to match.") from exc
    if absent:
        logging.getLogger("dspy_turbogepa").warning(
            "%s: .with_inputs(...) marks %s, which no example has, so nothing is passed for it (the examples' "
            "fields: %s). A typo in with_inputs?", name, absent, sorted(present))


def _bindable(cls: type, method_name: str, instance: Any) -> tuple[inspect.Signature, inspect.Signature,
                                                                     tuple[Any, ...]] | None:
    """The signatures to bind a call of ``instance.<method_name>`` against, and the arguments Python
    supplies first (``self``); None for what cannot be told (no such method, a classmethod, a callable
    object, no **kwargs-free signature)."""
    raw = inspect.getattr_static(cls, method_name, None)  # from the class: dspy warns on reading it off the module
    first: tuple[Any, ...]
    if isinstance(raw, staticmethod):
        func, first = raw.__func__, ()
    elif inspect.isfunction(raw):
        func, first = raw, (instance,)
    else:
        return None
    try:
        sig = inspect.signature(func)
        plain = inspect.signature(func, follow_wrapped=False)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in (*sig.parameters.values(), *plain.parameters.values())):
        return None
    return sig, plain, first
