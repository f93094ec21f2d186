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

from dspy_turbogepa.adapter.introspect import runs_async, user_defines


def check_call_protocol(
    fn: Any, argument: str, protocol: str, *, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> None:
    """Raise ``TypeError`` naming ``argument`` and the expected ``protocol`` when ``fn`` cannot be
    called with ``args`` / ``kwargs`` (placeholders: only their number and names matter). A callable
    without a readable signature (a builtin, some C extensions) is let through: nothing to check.

    A class whose instances take the call (``MultiModalInstructionProposer``,
    ``RoundRobinReflectionComponentSelector``) is refused with "pass X()": calling the class would build
    an instance instead of an answer (a ``Protocol`` subclass takes any arguments, so nothing else would
    catch it before the run), and "give it those parameters" sent users to edit the class."""
    if inspect.isclass(fn) and any("__call__" in vars(klass) for klass in fn.__mro__[:-1]):
        try:
            inspect.signature(fn.__call__).bind(None, *args, **dict(kwargs or {}))
        except (TypeError, ValueError):
            pass
        else:
            raise TypeError(f"{argument} is the class {fn.__qualname__}, not an instance of it: pass "
                            f"{fn.__qualname__}() instead.")
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


def check_inputs_reach(student: Any, name: str, examples: Sequence[Any]) -> list[int]:
    """Refuse data whose inputs can never reach the program, before any LM call: every evaluation would
    fail the same way, and the run would pay for the seed's validation and for reflections trying to
    "fix" a TypeError before the systemic-failure check stopped it (dspy.GEPA returns the seed).

    Only what certainly fails: inputs that no example's call of the method the evaluator runs
    (``aforward`` for a program that runs async, see ``runs_async``, else ``forward``, reached through
    ``dspy.Module.__call__`` / ``acall``) can be bound to, when it takes no ``**kwargs``. When only some
    examples cannot be bound, a warning, and their indices are returned: they fail and are scored, as
    in dspy.GEPA, and the systemic-failure check leaves them out. An input the examples lack, with a
    default in the method, is fine; a ``with_inputs`` name no example holds is named (a typo there is
    the usual cause), unless the method names it or takes ``**kwargs`` (an optional input). What cannot
    be read is let through: a method set on the instance, a classmethod, a callable object, a
    ``__call__`` / ``acall`` of the user's own.
    """
    marked: set[str] = set()
    present: set[str] = set()
    for ex in examples:
        marked |= set(getattr(ex, "_input_keys", None) or ())
        present |= set(getattr(ex, "_store", {}))
    absent = sorted(marked - present)
    hint = (f" .with_inputs(...) marks {absent}, which no example in {name} has (its fields: {sorted(present)}):"
            " fix the names passed to .with_inputs(...)." if absent else "")
    log = logging.getLogger("dspy_turbogepa")
    method_name = "aforward" if runs_async(student) else "forward"
    entry = "acall" if method_name == "aforward" else "__call__"
    target = None
    if not user_defines(type(student), entry) and method_name not in vars(student):
        target = _bindable(type(student), method_name, student)
    failed: list[int] = []
    first_error: tuple[int, list[str], TypeError] | None = None
    if target is not None:
        sig, plain, first = target
        verdicts: dict[tuple[str, ...], TypeError | None] = {}  # binding depends only on the names passed
        for i, ex in enumerate(examples):
            names = tuple(sorted(dict(ex.inputs())))  # what `program(**example.inputs())` passes
            if names not in verdicts:
                verdicts[names] = _bind_error(sig, plain, first, dict.fromkeys(names))
            error = verdicts[names]
            if error is not None:
                failed.append(i)
                if first_error is None:
                    first_error = (i, list(names), error)
    if first_error is not None:
        i, shown_names, exc = first_error
        shown = sig.replace(parameters=list(sig.parameters.values())[len(first):])  # without self
        where = (f"{name}[{i}]'s inputs {shown_names} cannot be passed to "
                 f"{type(student).__name__}.{method_name}{shown} ({exc})")
        sync = _bindable(type(student), "forward", student) if method_name == "aforward" else None
        if sync is not None and _bind_error(*sync, dict.fromkeys(shown_names)) is None:
            where += " (TurboGEPA runs an async program through its own aforward; its forward would take them: make" \
                     " the two take the same inputs)"
        if len(failed) == len(examples):
            raise TypeError(f"{where}: no example's inputs fit, so every evaluation would fail.{hint} Mark the "
                            "inputs it takes with .with_inputs(...) (the label is not an input), or rename the fields "
                            "or its parameters to match.") from exc
        log.warning("%s: %d of %d examples will fail and be scored as failures (the systemic-failure check leaves "
                    "them out); %s.", name, len(failed), len(examples), where)
    if absent and target is not None:
        # an optional input the method names with a default, or may take through **kwargs: meant to be
        # left out by these examples (dspy.GEPA says nothing either), not a typo
        params = target[0].parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            absent = []
        absent = [a for a in absent if a not in params]
    if absent:
        log.warning("%s: .with_inputs(...) marks %s, which no example has, so nothing is passed for it (the "
                    "examples' fields: %s). A typo in with_inputs?", name, absent, sorted(present))
    fields = _builtin_input_fields(student)
    if fields and examples:
        given = set().union(*(dict(ex.inputs()) for ex in examples))
        never = [f for f in fields if f not in given]
        described = f"{type(student).__name__}'s input fields {fields}"
        if len(never) == len(fields):
            raise TypeError(
                f"{name}'s inputs {sorted(given)} are none of {described}: DSPy would call the LM with every "
                f"input empty on every example.{hint} Mark the inputs with .with_inputs(...) under the "
                f"signature's names, or rename the examples' fields to match.")
        if never:
            log.warning("%s: no example gives %s, of %s, so the LM is always called without it (the examples' "
                        "inputs: %s).", name, never, described, sorted(given))
    return failed


def _builtin_input_fields(student: Any) -> list[str] | None:
    """The required input fields of a ``dspy.Predict``, ``dspy.ChainOfThought`` or ``dspy.ReAct``
    student, whose ``forward(**kwargs)`` hands its keywords to its signature: binding says nothing, and
    an input under another name is dropped, the LM called without it (DSPy only warns). None for any
    other module: the user's own maps its inputs as it likes, and other DSPy modules build some inputs
    themselves (MultiChainComparison's attempts) or wrap a module of the user's (BestOfN, Refine). A
    field with a default is not required: DSPy fills it in."""
    kind = type(student)  # exactly these classes: a subclass (the user's) may map its inputs otherwise
    if kind is dspy.ChainOfThought:
        signature = student.predict.signature
    elif kind in (dspy.Predict, dspy.ReAct):
        signature = student.signature
    else:
        return None
    required = [name for name, info in signature.input_fields.items() if info.is_required()]
    return required or None


def _bind_error(sig: inspect.Signature, plain: inspect.Signature, first: tuple[Any, ...],
                inputs: Mapping[str, Any]) -> TypeError | None:
    try:
        sig.bind(*first, **inputs)
        return None
    except TypeError as exc:
        try:
            plain.bind(*first, **inputs)  # a decorator's wrapper may take what the wrapped one cannot
            return None
        except TypeError:
            return exc


def _bindable(cls: type, method_name: str, instance: Any) -> tuple[inspect.Signature, inspect.Signature,
                                                                     tuple[Any, ...]] | None:
    """The signatures to bind a call of ``instance.<method_name>`` against, and the arguments Python
    supplies first (``self``); None for what cannot be told (no such method, a classmethod, a callable
    object, a signature that cannot be read, ``**kwargs`` anywhere along the wrapper chain: a decorator
    may set a ``__signature__`` that hides them)."""
    raw = inspect.getattr_static(cls, method_name, None)  # from the class: dspy warns on reading it off the module
    first: tuple[Any, ...]
    if isinstance(raw, staticmethod):
        func, first = raw.__func__, ()
    elif inspect.isfunction(raw):
        func, first = raw, (instance,)
    else:
        return None
    chain: Any = func
    seen = 0
    while chain is not None and seen < 16:  # the code objects say whether **kwargs exist, whatever __signature__ says
        code = getattr(chain, "__code__", None)
        if code is not None and code.co_flags & inspect.CO_VARKEYWORDS:
            return None
        chain, seen = getattr(chain, "__wrapped__", None), seen + 1
    try:
        sig = inspect.signature(func)
        plain = inspect.signature(func, follow_wrapped=False)
    except Exception:  # noqa: BLE001 - an unreadable signature (a NameError from a lazy annotation too): not ours to judge
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in (*sig.parameters.values(), *plain.parameters.values())):
        return None
    return sig, plain, first
