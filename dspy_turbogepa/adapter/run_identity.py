"""What identifies a run: the key a ``log_dir`` is bound to, so a resume never reads a wrong value.

Everything a stored evaluation's score or a stored reflection's text depends on is hashed here: the
student's predictor state, the data, the LMs (by model, endpoint and sampling settings, never their
credentials), the metric's and proposer's code, the adapter. The hash must be the same in every process
for the same inputs, which is why values are rendered without memory addresses or abridged reprs.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import dis
import enum
import functools
import hashlib
import inspect
import logging
import os
import re
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Literal

import dspy

from dspy_turbogepa.adapter.introspect import in_dspy_package, is_a, library_class, library_function
from dspy_turbogepa.adapter.lm_copies import adapter_lms, lm_api_base
from dspy_turbogepa.adapter.program import all_named_predictors
from dspy_turbogepa.adapter.trajectory_json import held_items, to_json
from dspy_turbogepa.redaction import (
    describe_error,
    endpoint_url,
    is_credential_setting,
    is_sensitive_key,
    mask_text,
    redact,
    strip_userinfo,
)
from dspy_turbogepa.store import stable_hash
from dspy_turbogepa.store.sqlite_store import KEY_FORMAT_COMPONENT

logger = logging.getLogger(__name__)


#: LM settings that do not change what a call answers: how it is sent, retried, cached or authenticated
#: (credential-named settings are left out too, by :func:`is_credential_setting`). Every other setting is keyed:
#: ``top_k``, ``presence_penalty``, ``extra_body={"chat_template_kwargs": {"enable_thinking": False}}``
#: change the answers as much as ``temperature`` (an allowlist missed them).
_TRANSPORT_KWARGS = frozenset({"api_base", "base_url", "cache", "num_retries", "max_retries", "timeout",
                               "request_timeout", "callbacks", "extra_headers", "headers", "default_headers",
                               "http_client", "client",
                               # labels for logging and tracing (a trace id set per process would refuse
                               # every rerun), and OpenAI's end-user id: none changes the answer
                               "metadata", "litellm_metadata", "tags", "litellm_session_id", "litellm_trace_id",
                               "user"})


def lm_identity(lm: Any) -> Any:
    """What makes an LM answer the way it does, without its credentials: the model, the endpoint
    (userinfo stripped from the URL), and the sampling settings."""
    if lm is None:
        return None
    kwargs = getattr(lm, "kwargs", None)
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    base = lm_api_base(lm)
    identity = {
        "class": f"{type(lm).__module__}.{type(lm).__qualname__}",
        "model": getattr(lm, "model", None),
        "api_base": strip_userinfo(base) if base else None,
        **{k: redact(_hashable(v), env_values=()) for k, v in sorted(kwargs.items(), key=lambda kv: str(kv[0]))
           if v is not None and k not in _TRANSPORT_KWARGS and not is_credential_setting(str(k))},
    }
    # What else shapes the answers, each only where it differs from DSPy's default (so a plain LM keeps
    # its key): the prompt's form, and the code that answers. A user-written LM class or a custom
    # ``engine=`` is keyed by its code and by the state it declares with ``dump_state()`` (DSPy's own
    # protocol for saving them: a system prompt, a seed, a config); its fields are not read (a call
    # counter would refuse the next compile).
    model_type = getattr(lm, "model_type", "chat")
    if isinstance(model_type, str) and model_type != "chat":
        identity["model_type"] = model_type
    if getattr(lm, "use_developer_role", False) is True:
        identity["use_developer_role"] = True
    code = _class_code(type(lm))
    if code:
        identity["code"] = stable_hash([code, _declared_state(lm)])
    for spec in ("_engine_spec", "_async_engine_spec"):
        engine = getattr(lm, spec, None)
        if engine is not None and not isinstance(engine, str):
            # one short token, so that a refused rerun's message stays readable ("engine=SimEngine#1a2b...")
            digest = stable_hash([f"{type(engine).__module__}.{type(engine).__qualname__}",
                                  _class_code(type(engine)), _declared_state(engine)])
            identity[spec.strip("_").removesuffix("_spec")] = f"{type(engine).__qualname__}#{digest[:12]}"
    return identity


def _dspy_lm_state(lm: Any) -> Mapping[str, Any]:
    """What DSPy's own ``BaseLM.dump_state`` holds for ``lm``; empty for a subclass that never ran
    ``BaseLM.__init__`` (no ``kwargs``): its own dump is then keyed whole, not dropped."""
    try:
        return dspy.BaseLM.dump_state(lm)
    except Exception:  # noqa: BLE001 - a partly set-up LM
        return {}


def _declared_state(obj: Any) -> Any:
    """What ``obj.dump_state()`` says it is, where the user's code (not DSPy's) defines that method; None
    otherwise. Credentials are masked (a rotated key is the same run)."""
    owner = next((k for k in type(obj).__mro__ if "dump_state" in vars(k)), None)
    if owner is None or in_dspy_package(owner):
        return None
    try:
        state = obj.dump_state()
        if isinstance(state, Mapping):
            # A user LM's dump_state() usually extends DSPy's ({**super().dump_state(), ...}): what DSPy's
            # holds (the model, how calls are sent, every kwarg) is keyed above or deliberately not
            # (transport, credentials); the LM's own additions are what this adds.
            base = _dspy_lm_state(obj) if isinstance(obj, dspy.BaseLM) else {}
            state = {k: v for k, v in state.items()
                     if k not in base and not (isinstance(k, str) and is_credential_setting(k))}
        return redact(_hashable(state), env_values=())
    except Exception as exc:  # noqa: BLE001 - a dump that fails: keyed by its code alone
        logger.debug("run key: %s.dump_state() failed (%s)", type(obj).__qualname__, type(exc).__name__)
        return None


def readable_lm(lm: Any) -> str:
    """An LM's identity as a person reads it (model, endpoint, sampling settings; no credentials, and
    key-shaped text masked): a log_dir refused because "reflection changed" says what changed, where
    the run key holds only hashes."""
    identity = lm_identity(lm)
    if identity is None:
        return "none"
    base = lm_api_base(lm)
    if base:  # as logs and MLflow show it: key-like path parts and the query as digests (a UUID token too)
        identity["api_base"] = endpoint_url(base)
    parts = [f"{k}={v}" for k, v in identity.items() if k != "class" and v is not None]
    return mask_text(", ".join(parts))


def readable_task_lm(lm: Any, adapter: Any) -> str:
    """The run key's ``task_lm`` part as a person reads it: the LM and the configured adapter, which is
    keyed with it. A log_dir refused because only the adapter changed said "task_lm changed" and showed
    the same LM on both sides."""
    if adapter is None:
        return f"{readable_lm(lm)}; adapter: none configured (DSPy's ChatAdapter)"
    settings = [f"{k}={v}" for k, v in _plain_settings(adapter).items()]
    settings += [f"{k}=[{readable_lm(held)}]" for k, held in adapter_lms(adapter).items()]  # keyed too
    return mask_text(f"{readable_lm(lm)}; adapter={type(adapter).__qualname__}({', '.join(settings)})")


def callable_identity(fn: Any) -> str:
    """A metric's or proposer's identity for the run key: an edited metric scores differently, and
    the stored scores must not be reused for it. A function is its name and its code (bytecode, the
    names it reads, its constants, nested functions); a ``functools.partial`` its function and bound
    arguments; a method or a callable object every function its class defines (``forward`` and the
    helpers of a ``dspy.Module`` judge, not only the ``__call__`` it inherits from DSPy). Stable across
    processes (no addresses, set literals sorted). Decorators are seen through (``__wrapped__``), and a
    module-level constant assigned a literal is keyed by that literal (:func:`_constants_read`). State is
    not seen — a closure's captured values, an object's fields, other globals read at call time — because
    run-time state (a call counter, a lock) would refuse every rerun; a metric whose behaviour changes only
    through state needs a new log_dir."""
    if fn is None:
        return "None"
    if isinstance(fn, functools.partial):
        try:
            bound = stable_hash(_hashable([[_unless_credential("", v) for v in fn.args],
                                           {k: _unless_credential(k, v) for k, v in fn.keywords.items()}],
                                          credentials=True))
        except Exception:  # noqa: BLE001 - an argument that cannot say what it is (a lazy proxy): by types
            bound = stable_hash([_type_key(v) for v in [*fn.args, *fn.keywords.values()]])
        return f"partial({callable_identity(fn.func)}, {bound})"
    if inspect.ismethod(fn):
        owner = type(fn.__self__)
        return (f"{owner.__module__}.{owner.__qualname__}.{callable_identity(fn.__func__)}"
                f":{stable_hash(_class_code(owner))}")
    name = f"{getattr(fn, '__module__', type(fn).__module__)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    code = getattr(fn, "__code__", None)
    wrapped = _wrapped_identity(fn)
    if code is None:  # a callable object: the code of its class (and of its user-written bases)
        return f"{name}:{stable_hash(_class_code(type(fn)))}{wrapped}"
    return f"{name}:{_function_digest(fn, _called_user_functions(fn))}{wrapped}"


def _wrapped(fn: Any) -> Any:
    """What a decorator written with ``functools.wraps`` (a timer, a retry, ``lru_cache``) wraps, or None."""
    try:
        inner = getattr(fn, "__wrapped__", None)
    except Exception:  # noqa: BLE001 - a lazy proxy (django's settings) raises on any attribute until set up
        return None
    return inner if callable(inner) and inner is not fn else None


def _wrapped_identity(fn: Any) -> str:
    """The identity of the function under ``fn``'s decorators: the wrapper's code is the decorator's, the
    scores come from the code it wraps. Empty when nothing is wrapped (an undecorated function keeps the
    key it had)."""
    layers = _decorated_layers(fn)[1:]
    if not layers:
        return ""
    parts = [f"{getattr(layer, '__qualname__', type(layer).__qualname__)}:" + _layer_identity(layer)
             for layer in layers]
    return f"+wrapped:{stable_hash(parts)}"


def _layer_identity(layer: Any) -> str:
    """One layer under a decorator: a function by its code; a bound method (``traced(Scorer().score)``) or
    a ``partial`` as :func:`callable_identity` keys it (its class's code, its function and arguments);
    another callable object by its class's code."""
    if inspect.isfunction(layer):
        return _function_digest(layer, _called_user_functions(layer))
    if inspect.ismethod(layer) or isinstance(layer, functools.partial):
        return callable_identity(layer)
    return stable_hash(_class_code(type(layer)))


def _function_digest(fn: Any, helpers: Sequence[str] = ()) -> str:
    """A user function's code, the identities of the ``helpers`` it calls, and its default argument
    values (see :func:`_defaults_identity`)."""
    defaults = _defaults_identity(fn)
    constants = _constants_read(fn)
    return (_code_digest(fn.__code__) + (f"+{stable_hash(list(helpers))}" if helpers else "")
            + (f"+defaults:{defaults}" if defaults else "")
            + (f"+constants:{stable_hash(constants)}" if constants else ""))


def _constants_read(fn: Any) -> list[list[Any]]:
    """The module-level constants ``fn`` reads, by the literal its module's source assigns them:
    ``THRESHOLD = 0.8`` edited to ``0.5`` scores differently, yet the code that reads it is the same.
    Only a name bound once at the top of the module, to a literal, and never declared ``global`` in a
    function (a counter is run-time state, which would refuse every rerun); read from the source file,
    so what the process changed at run time is not seen. A constant named like a credential is a marker."""
    code = getattr(fn, "__code__", None)
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if code is None or not isinstance(path, str) or not path.endswith(".py"):
        return []
    names = set(global_names(code))
    if not names:
        return []
    try:
        stat = os.stat(path)
    except OSError:  # a module whose file is gone (a notebook's __main__ has none): its constants are not seen
        return []
    return [[name, "<credential>" if is_sensitive_key(name) else _literal_identity(name, value)]
            for name, value in _module_constants(path, stat.st_mtime_ns, stat.st_size) if name in names]


def _literal_identity(name: str, value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        return _default_value(name, value)
    return redact(_hashable(value), env_values=())  # _hashable first: it orders sets the same in every process


def parse_source(source: bytes | str, path: str, attempts: int = 5) -> ast.Module:
    """``ast.parse``, asked again on CPython 3.11's spurious "AST constructor recursion depth mismatch".

    That ``SystemError`` is a race in the interpreter (python/cpython#106905): the AST builder's depth
    counter is shared by every thread, so a parse in another thread at the same moment (DSPy's
    ``ast.literal_eval`` of outputs, ``inspect.signature`` of a builtin) can fail ours. Returning "no
    constants" instead would change the run key and refuse the resume; the race does not repeat."""
    for attempt in range(attempts - 1):
        try:
            return ast.parse(source, filename=path)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
            logger.debug("ast.parse(%s) hit CPython's recursion-depth race; parsing again", path)
            time.sleep(0.001 * (attempt + 1))
    return ast.parse(source, filename=path)


@functools.lru_cache(maxsize=64)
def _module_constants(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, Any], ...]:
    """``(name, value)`` of the literal constants a module file assigns at its top level (see
    :func:`_constants_read`); keyed by the file's modification time and size, so an edited file is read
    again. A file that cannot be read or parsed has none."""
    try:
        with open(path, "rb") as source:
            tree = parse_source(source.read(), path)
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return ()
    bound: dict[str, int] = {}
    literals: dict[str, Any] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name):
                    bound[leaf.id] = bound.get(leaf.id, 0) + 1
        single = targets[0] if len(targets) == 1 and isinstance(targets[0], ast.Name) else None
        value = getattr(node, "value", None)
        if single is not None and value is not None and not isinstance(node, ast.AugAssign):
            # not a literal (a call, an f-string, a name): state or a derived value, not keyed
            with contextlib.suppress(ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                literals[single.id] = ast.literal_eval(value)
    declared_global = {name for node in ast.walk(tree) if isinstance(node, ast.Global) for name in node.names}
    return tuple((name, value) for name, value in sorted(literals.items())
                 if bound.get(name) == 1 and name not in declared_global)


def _defaults_identity(fn: Any) -> str:
    """A function's default argument values: ``def metric(..., lenient=False)`` edited to ``True``
    scores differently, yet its code (defaults are not code constants) is the same. Immutable plain
    values are keyed by value and a user's function by its code; anything else by its type only: a
    mutable default (a memo dict) or an object (a judge, a client) holds run-time state, like a
    closure, which would refuse every rerun. A default that looks like a credential (by its parameter's
    name or its text) is keyed as a marker: a rotated key is the same run."""
    code = getattr(fn, "__code__", None)
    defaults = tuple(getattr(fn, "__defaults__", None) or ())
    kwdefaults = getattr(fn, "__kwdefaults__", None) or {}
    if code is None or not (defaults or kwdefaults):
        return ""
    positional = code.co_varnames[:code.co_argcount]
    named = [*zip(positional[len(positional) - len(defaults):], defaults), *sorted(kwdefaults.items())]
    return stable_hash([[name, _default_value(name, value)] for name, value in named])


def _unless_credential(name: str, value: Any) -> Any:
    """``value`` with what is a credential in it masked, so that a rotated key is the same run (the value
    refused the rerun as "metric changed" / "student changed", whose advice deletes the paid work). Under
    a credential's name (``api_key=``, ``self.search_api_key``): a marker for an object, or a string that
    is key-shaped or long without spaces. Elsewhere key-shaped text is masked in place (a URL's host still
    counts). By shape only, never by the environment's secrets: a key read from a file in one session and
    from the environment in the next is the same run. ``eos_token="</s>"`` or ``password="hunter2"``
    count as themselves (a short credential is keyed by its value: rotating it needs a new log_dir)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        masked = mask_text(value, env_values=())  # by shape only: the environment differs between sessions
        if is_credential_setting(name) and (masked != value or (len(value) >= 16
                                                                 and not any(c.isspace() for c in value))):
            return "<credential>"
        return masked
    return "<credential>" if is_credential_setting(name) else value


def _type_key(value: Any) -> str:
    """A value by its type only, read without ``__class__`` (which a lazy proxy, django's ``settings``,
    sets itself up for, raising while it is not configured)."""
    kind = type(value)
    return f"<{kind.__module__}.{kind.__qualname__}>"


def _default_value(name: str, value: Any) -> Any:
    """A default argument's part of a function's identity; by its type when it cannot be read."""
    try:
        return _readable_default(name, value)
    except Exception:  # noqa: BLE001 - a lazy proxy raises on any look until set up: not the compile's failure
        return _type_key(value)


def _readable_default(name: str, value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        text = value if isinstance(value, str) else value.decode("utf-8", "replace")
        # by the parameter's name or a secret the environment holds: a default that merely looks like a
        # key ("gpt-4o-mini-2024-07-18") is more often a model or a version, whose edit must count
        if is_sensitive_key(name) or mask_text(text) != text:
            return "<credential>"
    if isinstance(value, enum.Enum):  # by name: a member's repr may show an object's address
        return f"{type(value).__qualname__}.{value.name}"
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if type(value) in (tuple, frozenset):
        parts = [_default_value(name, v) for v in value]
        return parts if type(value) is tuple else sorted(parts, key=repr)
    if isinstance(value, functools.partial):
        return callable_identity(value)
    if inspect.isfunction(value) and not library_function(value):
        return f"{value.__qualname__}:{_function_digest(value)}"
    if isinstance(value, type):
        user = not (in_dspy_package(value) or library_class(value))
        return f"class {value.__module__}.{value.__qualname__}" + (
            f":{stable_hash(_class_code(value))}" if user else "")
    if isinstance(value, dspy.BaseLM):
        return stable_hash(_hashable(lm_identity(value)))
    if isinstance(value, re.Pattern):
        return ["re", repr(value.pattern), value.flags]
    if callable(value) and isinstance(getattr(value, "__qualname__", None), str):  # str.lower, operator.eq
        return f"{getattr(value, '__module__', None) or type(value).__module__}.{value.__qualname__}"
    return _type_key(value)


def _called_user_functions(fn: Any, seen: set[int] | None = None) -> list[str]:
    """The code of the user's own module-level functions ``fn`` names (and those they name): a fixed
    ``normalize()`` that ``forward`` or the metric calls changes the scores as much as an edited
    ``forward``. Library functions are left out (they change with an upgrade, not with the user's edits)."""
    seen = set() if seen is None else seen
    seen.add(id(fn))
    namespace = getattr(fn, "__globals__", None)
    code = getattr(fn, "__code__", None)
    if not isinstance(namespace, dict) or code is None:
        return []
    out: list[str] = []
    for name in global_names(code):
        target = namespace.get(name)
        for depth, layer in enumerate(_decorated_layers(target)):  # the helper, then what its decorators wrap
            if not is_a(layer, types.FunctionType) or id(layer) in seen or library_function(layer):
                continue
            seen.add(id(layer))
            out.append(f"{name}{'~' * depth}={layer.__qualname__}:{_function_digest(layer)}")
            out += _called_user_functions(layer, seen)
    return out


def _decorated_layers(fn: Any) -> list[Any]:
    """``fn`` and the functions under its decorators (``functools.wraps`` / ``lru_cache`` set
    ``__wrapped__``), outermost first; a wrapper that loops back ends the walk."""
    layers: list[Any] = []
    while fn is not None and len(layers) < 32 and all(fn is not seen for seen in layers):
        layers.append(fn)
        fn = _wrapped(fn)
    return layers


def global_names(code: Any) -> list[str]:
    """The global names a code object (and its nested ones) loads: not ``co_names``, which also holds
    attribute names (``self.summarize`` would key an unrelated global ``summarize()``)."""
    names = [ins.argval for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL"]
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names += global_names(const)
    return names


def _class_code(cls: type) -> list[str]:
    """The identity of every function a user's class defines, its user-written bases included. Classes
    of DSPy, the standard library and installed packages are left out: their code changes with an
    upgrade (a pydantic-based scorer would key 50 pydantic functions), not with the user's edits."""
    out: list[str] = []
    for klass in cls.__mro__:
        if klass is object or in_dspy_package(klass) or library_class(klass):
            continue
        for name, value in sorted(vars(klass).items()):
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if inspect.isfunction(fn):
                out.append(f"{name}={callable_identity(fn)}")
    return out


def proposer_settings(proposer: Any) -> str:
    """The settings of one of dspy's own proposer objects (``InstructionProposer(max_chars=...)``,
    ``additional_instructions``, ...): they change what a reflection returns, and their classes keep no
    run-time state in public fields. A user's proposer object is keyed by its code only (see
    :func:`callable_identity`)."""
    if proposer is None or inspect.isfunction(proposer) or not in_dspy_package(type(proposer)):
        return ""
    fields = _plain_settings(proposer)
    fields.update({k: type(v).__qualname__ for k, v in sorted(vars(proposer).items())
                   if k == "adapter" and v is not None})
    # other public settings (``skills=(...)``), when set: a non-empty one changes the reflection prompt
    fields.update({k: _hashable(v) for k, v in sorted(vars(proposer).items())
                   if not k.startswith("_") and k != "adapter" and k not in fields and v and not callable(v)})
    return stable_hash(_hashable(fields))


def _code_digest(code: Any) -> str:
    if code is None:
        return "-"
    return hashlib.sha256(repr(_code_parts(code)).encode()).hexdigest()[:16]


def _code_parts(code: Any) -> list[Any]:
    """Bytecode, names read, and constants of a code object and its nested ones. A set literal is a
    frozenset constant whose repr order follows the per-process string hash: sorted here."""
    consts: list[Any] = []
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            consts.append(_code_parts(c))
        elif isinstance(c, frozenset):
            consts.append(sorted(repr(x) for x in c))
        else:
            consts.append(repr(c))
    return [code.co_code.hex(), list(code.co_names), consts]


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _hashable(value: Any, opaque: Literal["text", "identity"] = "text", credentials: bool = False) -> Any:
    """Like ``jsonable``, for the run key: the same value must give the same JSON in every process.

    ``str()`` of a plain object embeds its memory address, which would make every rerun "a different
    run"; and ``str()`` of a big table or array is abridged, which would hide a changed dataset. So:
    classes by name, LMs by :func:`lm_identity` (never their keys), sets sorted, arrays and images by
    a hash of their bytes, tables and models by their full dumps (``to_dict`` / ``model_dump`` /
    dataclass fields), an object whose ``str()`` is informative by that, any other by its fields.
    A reference cycle ends in a marker instead of a RecursionError: only the objects being walked into
    (the ancestors) count, so an object met again in a sibling (two examples sharing an array) is
    hashed by its content both times.

    ``opaque`` says what stands for an object of the user's own class with attributes known only by an
    address-free ``str()``, which may say little (a class whose ``__str__`` is its name): "text" that
    text, the same in every process; "identity" the object itself, for comparing datasets alive in this
    process (equal only if the same object). Library and standard types (dates, paths, UUIDs, pandas'
    values) are their text either way. Their attributes are not read instead: a uuid, a memo cache or
    a logger among them would give equal data other keys (every resume refused), and a graph of them
    hashes in exponential time.

    ``credentials``: an object's fields named like a credential are masked (:func:`_unless_credential`),
    for what a metric binds (a judge's client); data is hashed whole."""
    seen: set[int] = set()

    def leaf(v: Any) -> Any:
        kind = f"{type(v).__module__}.{type(v).__qualname__}"
        if isinstance(v, type):
            return f"class {v.__module__}.{v.__qualname__}"
        if isinstance(v, dspy.BaseLM):
            return lm_identity(v)
        if inspect.isfunction(v) or inspect.ismethod(v) or isinstance(v, functools.partial):
            return callable_identity(v)
        if isinstance(v, (set, frozenset)):
            return sorted((to_json(x, leaf) for x in v), key=repr)
        if id(v) in seen:
            return f"<cycle {kind}>"
        seen.add(id(v))
        try:
            return walked(v, kind)
        finally:
            seen.discard(id(v))

    def walked(v: Any, kind: str) -> Any:
        try:
            if getattr(getattr(v, "dtype", None), "kind", None) == "O" and callable(getattr(v, "tolist", None)):
                # an object array's bytes are pointers to its elements: walk the elements instead
                return {"__type__": kind, "items": to_json(v.tolist(), leaf),
                        "shape": str(getattr(v, "shape", None))}
            dtype = getattr(v, "dtype", None)
            dtype_kind, itemsize = getattr(dtype, "kind", None), getattr(dtype, "itemsize", 0)
            if dtype_kind in ("f", "c") and itemsize > 8 * (1 + (dtype_kind == "c")) \
                    and callable(getattr(v, "tolist", None)):
                # a long double's bytes hold padding that is not initialised (another key in every
                # process): hash its values' text instead
                return {"__type__": kind, "sha256": hashlib.sha256(repr(v.tolist()).encode()).hexdigest(),
                        "shape": str(getattr(v, "shape", None))}
            if callable(getattr(v, "tobytes", None)):
                # with its dtype: uint8 255 and int8 -1 are the same bytes
                return {"__type__": kind, "sha256": hashlib.sha256(v.tobytes()).hexdigest(),
                        "shape": str(getattr(v, "shape", None) or getattr(v, "size", None)),
                        "dtype": str(dtype) if dtype is not None else None}
            if callable(getattr(v, "model_dump", None)):
                return {"__type__": kind, **to_json(v.model_dump(), leaf)}
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                return {"__type__": kind, **to_json(dataclasses.asdict(v), leaf)}
            if callable(getattr(v, "to_dict", None)):
                return {"__type__": kind, "data": to_json(v.to_dict(), leaf)}
            # pyarrow tables and arrays, pandas indexes: their str() is abridged, so a changed value in
            # the middle would not be seen
            for dump in ("to_pydict", "to_pylist", "tolist"):
                if callable(getattr(v, dump, None)):
                    return {"__type__": kind, "data": to_json(getattr(v, dump)(), leaf)}
        except Exception as exc:  # noqa: BLE001 - a dump that fails: fall back to the fields below
            logger.debug("run key: %s could not be dumped (%s); using its fields", kind, type(exc).__name__)
        text = str(v)
        if _ADDRESS.search(text) is None:
            if opaque == "identity" and not library_class(type(v)) and _fields_of(v):
                return {"__opaque__": kind, "id": id(v)}
            return text
        fields = _fields_of(v)
        if fields:  # ``credentials``: a client bound into a partial, whose api_key field is one (not data's fields)
            if credentials:
                fields = {k: _unless_credential(str(k), f) for k, f in fields.items()}
            return {"__type__": kind, **to_json(fields, leaf)}
        return _ADDRESS.sub("", text)

    return to_json(value, leaf)


def _fields_of(value: Any) -> dict[str, Any]:
    """An object's own attributes: its ``__dict__`` and its class's ``__slots__`` that are set."""
    fields = dict(vars(value)) if hasattr(value, "__dict__") else {}
    for slot in getattr(type(value), "__slots__", ()):
        if isinstance(slot, str) and hasattr(value, slot):
            fields[slot] = getattr(value, slot)
    return fields


def _predictor_entry(name: str, pred: Any) -> tuple[Any, ...]:
    """A predictor's part of the student key: its fields, state (instructions, prefixes, demos), LM and
    ``config``."""
    state = {k: v for k, v in pred.dump_state().items() if k != "lm"}
    signature = pred.signature
    entry: tuple[Any, ...] = (name, _fields_identity(signature.input_fields),
                              _fields_identity(signature.output_fields), state,
                              lm_identity(getattr(pred, "lm", None)))
    config = getattr(pred, "config", None)  # dspy.Predict(sig, temperature=...): not in dump_state()
    if isinstance(config, Mapping) and config:
        entry += ({str(k): _hashable(v) for k, v in sorted(config.items(), key=lambda kv: str(kv[0]))},)
    return entry


def _fields_identity(fields: Mapping[str, Any]) -> list[Any]:
    """A signature's fields by name and type: an output retyped from ``int`` to ``bool`` (or a Literal
    given other choices, a pydantic model other fields) parses the same answers differently, so the
    stored scores are another program's. A type by its text and, where pydantic can describe it, by
    its JSON schema (a model's text is only its name)."""
    return [[name, _annotation_identity(getattr(field, "annotation", None))] for name, field in fields.items()]


def _annotation_identity(annotation: Any) -> Any:
    if annotation is None:
        return None
    if annotation is str:
        return "str"
    text = _ADDRESS.sub("", repr(annotation))
    try:
        import pydantic

        schema = pydantic.TypeAdapter(annotation).json_schema()
    except Exception as exc:  # noqa: BLE001 - a type pydantic cannot describe: its text is the identity
        logger.debug("run key: no JSON schema for %s (%s)", text, type(exc).__name__)
        return text
    return [text, to_json(_without_samples(schema), str)]


#: JSON-schema keywords holding sample values, which pydantic writes in a set's iteration order (another
#: order in every process with another PYTHONHASHSEED). Left out of the key: a changed default of a
#: pydantic model's field is not seen (a new log_dir is needed for it).
_SAMPLE_KEYWORDS = frozenset({"default", "examples"})


def _without_samples(schema: Any, names: bool = False) -> Any:
    """``schema`` without its default and example values. ``names``: ``schema`` maps property names to
    schemas (a property called ``default`` is kept)."""
    if isinstance(schema, dict):
        return {k: _without_samples(v, names=k in ("properties", "$defs", "definitions") and not names)
                for k, v in schema.items() if names or k not in _SAMPLE_KEYWORDS}
    if isinstance(schema, list):
        return [_without_samples(v) for v in schema]
    return schema


#: Bumped whenever a component of :func:`run_key` is computed differently (2: examples keyed with their
#: input fields, metric objects by their class's code, the adapter and Predict.config keyed; 3: an
#: object shared by two examples hashed by its content both times; 4: modules' plain settings, tools,
#: and the user's module-level functions a forward, tool or metric calls; 5: those functions found by
#: LOAD_GLOBAL only, not every name the code reads, and a tool's closure values no longer keyed; 6: a
#: function's default argument values, seed=None keyed as the 0 it runs with, failure_score a part of its
#: own instead of the metric's; 7: a tool's argument schema, and for a module used as a tool its code,
#: settings, tools and predictors; 8: each signature field's type, and the LMs an adapter holds;
#: 9: every LM setting but transport and credentials, the functions under decorators, and the literal
#: module constants the user's functions read; 10: credentials in a module's or adapter's settings, a
#: ``partial``'s arguments and the objects bound into it masked, an array's dtype, pyarrow and pandas
#: containers by their values, an LM's model_type, developer role, custom engine and user-written class;
#: 11: a mapping's keys other than plain strings hashed with their type: {1: x} was {"1": x}).
#: A pinned key in tests/test_run_key_format.py fails when the computation changes and this is not bumped.
RUN_KEY_FORMAT = "11"

#: The run key's part for what a reflection's answer depends on (the reflection LM, the proposer, ...):
#: per session (``RunStore.open``'s ``session_parts``): no stored score depends on it, and the proposals
#: earlier sessions made are the run's history, which a session with another reflection LM continues.
REFLECTION_PART = "reflection"


def run_key(
    student: dspy.Module, trainset: Sequence[dspy.Example], valset: Sequence[dspy.Example], seed: int | None,
    *, metric: Callable[..., Any] | None = None, failure_score: float = 0.0, context_lm: Any = None,
    reflection_lm: Any = None, proposer: Any = None, add_format_failure_as_feedback: bool = False,
    adapter: Any = None,
) -> dict[str, str]:
    """What must not change under an existing log_dir: everything a stored evaluation's score or a
    stored reflection's text depends on (the budget may change: a larger one continues the run).

    The student is keyed by its whole predictor state (instructions, field prefixes and
    descriptions, demos) and the LMs by ``lm_identity`` (never their keys: a rotated key is the same
    run). Constructor settings that only steer the search (minibatch size, selection, ...) are left
    out: a different plan misses the cache, it does not read a wrong value from it."""
    structure = _module_key(student)
    # settings appended only when set, so the key of a run without them is what earlier versions wrote
    reflection = [lm_identity(reflection_lm), callable_identity(proposer)]
    extra = proposer_settings(proposer)
    if extra:
        reflection.append(extra)
    if add_format_failure_as_feedback:  # what reflections read about parse failures
        reflection.append("add_format_failure_as_feedback")
    return {
        KEY_FORMAT_COMPONENT: RUN_KEY_FORMAT,
        "trainset": data_identity(trainset, "trainset"),
        "valset": data_identity(valset, "valset"),
        "student": stable_hash(_hashable(structure)),
        "seed": str(0 if seed is None else seed),  # None runs as seed 0 (dspy.GEPA's default)
        "metric": stable_hash([callable_identity(metric)]),
        "failure_score": repr(float(failure_score)),  # its own part: a mismatch names it, not "metric"
        "task_lm": stable_hash(_hashable(lm_identity(context_lm) if adapter is None
                                         else [lm_identity(context_lm), adapter_identity(adapter)])),
        REFLECTION_PART: stable_hash(_hashable(reflection)),
    }


#: Plain fields of DSPy's own modules that change as they run (BestOfN / Refine lower ``fail_count``
#: on every failed attempt): running the student before compile must not make it "another run".
_DSPY_RUNTIME_FIELDS = frozenset({"fail_count"})


def _module_key(module: Any) -> list[Any]:
    """What a module's answers depend on: the student's part of the run key, and a module used as a
    tool's. The code of the user's own module classes, every method (a fixed forward(), aforward() or
    helper must not replay the broken one's failures); what the modules around the predictors hold:
    their plain settings (a retriever's k, ReAct's max_iters, a flag the user's forward reads) and the
    code of the tools and functions they call; and every predictor's state, the components' first."""
    structure: list[Any] = [
        sorted({code for _, m in module.named_sub_modules() if not in_dspy_package(type(m))
                for code in _class_code(type(m))})
    ]
    settings = ((name, _module_settings(sub)) for name, sub in module.named_sub_modules()
                if not isinstance(sub, dspy.Predict))
    structure.append(sorted([name, held] for name, held in settings if held))
    components = module.named_predictors()
    structure += [_predictor_entry(name, pred) for name, pred in components]
    # predictors named_predictors() skips (in a submodule marked compiled, or in a container nested in a
    # container): not optimized, but they answer; apart, so that a predictor becoming frozen changes the key
    frozen = all_named_predictors(module)[len(components):]
    if frozen:
        structure.append(["frozen", [_predictor_entry(name, pred) for name, pred in frozen]])
    return structure


#: Modules being keyed as tools in this context: a module that holds itself as a tool is keyed once.
_KEYING_TOOLS: ContextVar[frozenset[int]] = ContextVar("turbogepa_keying_tools", default=frozenset())


def _module_settings(module: Any) -> dict[str, Any]:
    """A module's public plain fields, and the identity of the tools and functions it holds (a list
    or dict of them included: ``ReAct.tools``). Other objects are run-time state (a client, a lock) and
    not seen: a module whose behaviour changes through them needs a new log_dir."""
    out: dict[str, Any] = {k: v for k, v in _plain_settings(module).items()
                           if not (k in _DSPY_RUNTIME_FIELDS and in_dspy_package(type(module)))}
    for key, value in sorted(vars(module).items()):
        if key.startswith("_"):
            continue
        tools = [ident for item in held_items(value) if (ident := _tool_identity(item)) is not None]
        if tools:
            out[key] = tools
    return out


def _tool_identity(obj: Any) -> str | None:
    """A ``dspy.Tool`` by its name, description, argument schema (shown to the LM with the tool) and
    function, and for a module used as a tool (an agent as a tool) its predictors' state too; a plain
    function by its code. A ``dspy.Tool`` wrapping one of DSPy's own functions (ReAct's ``finish``) by
    its name, description and schema only; None for anything else, a plain DSPy function included."""
    if isinstance(obj, dspy.Tool):
        fn = obj.func
        schema = stable_hash(_hashable([getattr(obj, "args", None), getattr(obj, "arg_desc", None)]))
        if inspect.isfunction(fn) and library_function(fn):
            return f"tool:{obj.name}:{obj.desc}:{schema}"
        identity = f"tool:{obj.name}:{obj.desc}:{schema}:{callable_identity(fn)}"
        if isinstance(fn, dspy.Module) and id(fn) not in _KEYING_TOOLS.get():
            # an agent used as a tool: what the student's own key holds, for the sub-agent (its code,
            # settings, its own tools, every predictor's state)
            token = _KEYING_TOOLS.set(_KEYING_TOOLS.get() | {id(fn)})
            try:
                inner = _module_key(fn)
            finally:
                _KEYING_TOOLS.reset(token)
            identity += ":" + stable_hash(_hashable(inner))
        return identity
    if (inspect.isfunction(obj) or inspect.ismethod(obj)) and not library_function(getattr(obj, "__func__", obj)):
        return callable_identity(obj)
    return None


def adapter_identity(adapter: Any) -> dict[str, Any]:
    """A configured DSPy adapter (``dspy.configure(adapter=JSONAdapter())``) formats every prompt and
    parses every answer: its class, public plain settings and the LMs it calls itself
    (``TwoStepAdapter``'s extraction model reads every answer)."""
    lms = {k: lm_identity(v) for k, v in adapter_lms(adapter).items()}
    return {"class": f"{type(adapter).__module__}.{type(adapter).__qualname__}", **_plain_settings(adapter), **lms}


def _plain_settings(obj: Any) -> dict[str, Any]:
    """An object's public fields holding plain values (its settings; run-time state is seldom plain), a
    credential among them as a marker (``self.search_api_key = os.environ[...]``: a rotated key resumes)."""
    return {k: _unless_credential(k, v) for k, v in sorted(vars(obj).items())
            if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}


def data_identity(examples: Sequence[dspy.Example], name: str = "examples",
                  opaque: Literal["text", "identity"] = "text") -> str:
    """A dataset's content hash: every example's fields and inputs, in order (arrays, tables and models
    by content, see :func:`_hashable`); the same in every process (with ``opaque="identity"``, only for
    comparing datasets in this one).

    A field whose value cannot be read (its ``__str__`` or ``__repr__`` raises) is a ``TypeError`` naming
    ``name[i]`` before any LM call; it was a bare error from deep inside the hashing."""
    try:
        return stable_hash(_hashable([_example_identity(ex) for ex in examples], opaque))
    except Exception as exc:  # find which example, hashed alone (the hash itself is unchanged: run keys stay)
        for i, ex in enumerate(examples):
            try:
                _hashable(_example_identity(ex), opaque)
            except Exception as inner:  # re-raised with the example named
                raise TypeError(
                    f"{name}[{i}] cannot be read to identify the run's data ({describe_error(inner)}). TurboGEPA "
                    "hashes every field of every example to recognise the run (caching, resume): give that field "
                    "a value whose str() / repr() works, or leave it out of the example.") from inner
        raise exc


def _example_identity(example: dspy.Example) -> list[Any]:
    """An example's fields and which of them are inputs: ``.with_inputs(...)`` decides what the program
    is called with, so the same fields with other inputs are other evaluations."""
    inputs = getattr(example, "_input_keys", None)
    return [example.toDict(), sorted(inputs) if inputs is not None else None]
