"""Writing a run to the run store and reading it back for resume — the DSPy side of persistence.

The store (``dspy_turbogepa.store``) knows rows; this module knows what a DSPy trajectory is. What
reflection needs from a rollout (each predictor's inputs and outputs, the program's prediction, the
error) is stored as JSON, so a resumed run reflects on stored parents without re-running them. Typed
values (pydantic models, dataclasses, dates) are stored in their JSON form tagged with their type and
rebuilt on resume, so the metric's feedback calls see the objects a live run gives them; values JSON
cannot hold otherwise (images, custom types) are stored as their ``str()``.
"""

from __future__ import annotations

import dataclasses
import datetime
import dis
import enum
import functools
import hashlib
import inspect
import json
import logging
import os
import re
import sys
import sysconfig
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dspy

from dspy_turbogepa.adapter.evaluator import DspyTrajectory, TraceStep, in_dspy_package
from dspy_turbogepa.adapter.lm_copies import lm_api_base
from dspy_turbogepa.adapter.program import ProgramCodec
from dspy_turbogepa.engine.candidate import Candidate
from dspy_turbogepa.engine.observer import EngineObserver
from dspy_turbogepa.engine.records import CandidateRecord, MutationResult
from dspy_turbogepa.engine.systemic import PROPOSER_FAILURES
from dspy_turbogepa.engine.types import EvalKey, EvalOutcome, ProposalOutcome, Split
from dspy_turbogepa.redaction import (
    REDACTED,
    describe_error,
    endpoint_url,
    is_sensitive_key,
    mask_text,
    strip_userinfo,
)
from dspy_turbogepa.store import stable_hash
from dspy_turbogepa.store.sqlite_store import KEY_FORMAT_COMPONENT

logger = logging.getLogger(__name__)


def _to_json(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """JSON-able form of ``value``: primitives, mappings, lists and DSPy examples / predictions
    (``toDict``) are walked; anything else becomes ``leaf(value)``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {_key(k, leaf): _to_json(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v, leaf) for v in value]
    if hasattr(value, "toDict"):
        return _to_json(value.toDict(), leaf)
    return leaf(value)


def _key(key: Any, leaf: Callable[[Any], Any]) -> str:
    """A mapping key as a string: a primitive as ``str()``; anything else (a tuple, a frozenset, whose
    ``str()`` order follows the per-process string hash) through the same walk as values."""
    if key is None or isinstance(key, (bool, int, float, str)):
        return str(key)
    return json.dumps(_to_json(key, leaf), sort_keys=True, ensure_ascii=False, default=str)


@dataclasses.dataclass
class _Walk:
    """One value being stored: the objects on the current path (a cycle), every object already stored
    (kept alive: a freed temporary's id may be reused), and how many values have been walked."""

    path: set[int] = dataclasses.field(default_factory=set)
    stored: dict[int, Any] = dataclasses.field(default_factory=dict)
    walked: int = 0


#: After this many values, an object met again is stored as a marker instead of walked again: a graph
#: (nodes linked both ways) has exponentially many paths (12 nodes stored 45 MB, 1.45 GB in a run).
_REPEATS_WALKED_UP_TO = 2_000


def _jsonable(value: Any, _walk: _Walk | None = None) -> Any:
    """For what is stored (see the module docstring): primitives, mappings and lists walked; a DSPy
    example or prediction, a pydantic model, a dataclass, a plain object of the user's own class or a
    date as its fields tagged with its type (see :func:`_revive`); a tuple, a set (sorted) and a
    mapping with keys other than strings tagged too, since JSON would read them back as a list or with
    string keys; anything else as its ``str()``.

    An object met inside itself (a parent link) is stored as a ``<see above: T>`` marker; one met
    again elsewhere (two fields holding the same model) is stored again, unless the value is large
    (see ``_REPEATS_WALKED_UP_TO``): then it is a marker too."""
    if isinstance(value, enum.Enum):  # before the primitives: a str / int enum member is one too
        return _stored_leaf(value, _walk)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    walk = _Walk() if _walk is None else _walk
    key = id(value)
    if key in walk.path or (key in walk.stored and walk.walked > _REPEATS_WALKED_UP_TO):
        return f"<see above: {type(value).__name__}>"
    walk.walked += 1
    walk.stored[key] = value
    walk.path.add(key)
    try:
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value):
                return {k: _jsonable(v, walk) for k, v in value.items()}
            # other keys (ints, tuples) as typed pairs: JSON would make them strings, and the metric's
            # feedback call of a resumed run must get the mapping a live run gives it
            tag = "collections:OrderedDict" if type(value) is OrderedDict else "builtins:dict"
            return {_TYPE: tag, "value": [[_jsonable(k, walk), _jsonable(v, walk)] for k, v in value.items()]}
        if isinstance(value, list):
            return [_jsonable(v, walk) for v in value]
        if isinstance(value, tuple):  # typed: JSON has only lists (a namedtuple keeps its class)
            kind = type(value)
            keep = kind is not tuple and (hasattr(kind, "_fields") or _library_class(kind))
            tag = f"{kind.__module__}:{kind.__qualname__}" if keep else "builtins:tuple"
            return {_TYPE: tag, "value": [_jsonable(v, walk) for v in value]}
        return _stored_leaf(value, walk)
    finally:
        walk.path.discard(key)


def _stored_leaf(value: Any, _walk: _Walk | None = None) -> Any:
    kind = type(value)
    tag = f"{kind.__module__}:{kind.__qualname__}"
    walk = _Walk() if _walk is None else _walk
    try:
        if isinstance(value, dspy.Example):  # items, not toDict(), which turns models into plain dicts
            return {_TYPE: tag, "value": {k: _jsonable(v, walk) for k, v in value.items()}}
        if isinstance(value, (datetime.date, datetime.time)):
            return {_TYPE: tag, "value": value.isoformat()}
        if kind.__module__ == "numpy":
            stored = _numpy_value(value)
            if stored is not None:
                return {_TYPE: tag, "value": stored}
        if isinstance(value, enum.Enum):
            return {_TYPE: tag, "value": _jsonable(value.value, walk)}
        fields = _shown_fields(value)
        if fields is not None:
            return {_TYPE: tag, "value": {name: _jsonable(getattr(value, name), walk) for name in fields}}
        if isinstance(value, (set, frozenset)):
            return {_TYPE: "builtins:frozenset" if isinstance(value, frozenset) else "builtins:set",
                    "value": sorted((_jsonable(v, walk) for v in value), key=repr)}
    except Exception as exc:  # noqa: BLE001 - an exotic object whose fields cannot be read: stored as text
        logger.debug("stored as text: %s could not be walked (%s)", kind.__name__, type(exc).__name__)
    return str(value)


#: numpy dtype kinds stored typed: booleans, integers, floats, strings (object arrays stay text).
_NUMPY_KINDS = "biufU"


def _numpy_value(value: Any) -> Any:
    """A numpy scalar's Python value, or an array's dtype, shape and nested lists; None for anything else
    (an object array, a datetime, a complex number), which is stored as text. The most common values
    a program computes outside JSON: as text, ``f"{pred.conf:.2f}"`` in a metric failed on resume."""
    import numpy as np

    if isinstance(value, np.generic) and value.dtype.kind in _NUMPY_KINDS:
        item = value.item()  # a longdouble stays a numpy value: text, as before
        return item if type(item) in (bool, int, float, str) else None
    if type(value) is np.ndarray and value.dtype.kind in _NUMPY_KINDS and (
            value.dtype.kind == "U" or value.dtype.itemsize <= 8):  # a subclass (matrix, memmap) stays text
        return {"dtype": value.dtype.str, "shape": list(value.shape), "data": value.tolist()}
    return None


def _numpy_rebuilt(cls: type, value: Any) -> Any:
    import numpy as np

    if cls is np.ndarray and isinstance(value, dict):
        dtype = np.dtype(str(value["dtype"]))
        data = np.asarray(value["data"])  # as JSON gave it: the row's size bounds what is allocated
        if dtype.kind not in _NUMPY_KINDS or dtype.itemsize > max(8, data.dtype.itemsize):
            raise ValueError(f"numpy dtype {dtype} is not stored typed")
        return data.astype(dtype).reshape([int(n) for n in value["shape"]])
    scalar = isinstance(value, (bool, int, float, str))
    if scalar and issubclass(cls, np.generic) and np.dtype(cls).kind in _NUMPY_KINDS:
        return cls(value)
    raise ValueError(f"not a stored numpy value: {cls.__name__}")


def _shown_fields(value: Any) -> list[str] | None:
    """The fields of a pydantic model or a dataclass instance that its ``repr`` shows and its dump keeps:
    one declared ``repr=False`` or ``exclude=True`` (often a key or a client) stays out of the store, as
    it stayed out of ``str()`` and ``model_dump()``. None for anything else. Fields are read one by
    one: ``dataclasses.asdict`` deep-copies every value and fails on a lock or a client."""
    model_fields = getattr(type(value), "model_fields", None)
    if isinstance(model_fields, Mapping) and callable(getattr(value, "model_dump", None)):
        return [name for name, info in model_fields.items()
                if getattr(info, "repr", True) is not False and getattr(info, "exclude", None) is not True]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f.name for f in dataclasses.fields(value) if f.repr]
    if _plain_user_class(type(value)):  # type: ignore[arg-type]  # mypy: a class is not Hashable
        # its fields (a property may read a _private one), but not a credential (db_password, api_key),
        # which stays out of the store like a pydantic field declared repr=False; a field called
        # "token" is an NLP object's data far more often than a secret
        return [name for name in vars(value) if not is_sensitive_key(name) or name.lower() in ("token", "tokens")]
    return None


@functools.lru_cache(maxsize=256)
def _plain_user_class(cls: type) -> bool:
    """A class of the user's own code whose instances are their ``__dict__`` (``class Answer: ...``
    returned by a ``forward``), so that a row can rebuild one without calling any of its code: no
    ``__slots__``, no ``__del__`` or pickling hooks, not a module, an LM or an exception. Library
    classes are never rebuilt this way."""
    if in_dspy_package(cls) or _library_class(cls) or issubclass(cls, (BaseException, dspy.Module, type)) \
            or cls.__module__.split(".")[0] == "dspy_turbogepa":  # ours: not user code, even installed editable
        return False
    for klass in cls.__mro__[:-1]:  # every class but object
        names = vars(klass)
        if "__slots__" in names or any(hook in names for hook in _OBJECT_HOOKS):
            return False
    return "__dict__" in dir(cls)


#: Methods that would run when an object is rebuilt or dropped: a class defining one is not rebuilt.
_OBJECT_HOOKS = ("__del__", "__setstate__", "__reduce__", "__reduce_ex__", "__new__", "__init_subclass__",
                 "__getattr__", "__getattribute__", "__setattr__")


#: Tags a stored typed value (see :func:`_stored_leaf`).
_TYPE = "__turbogepa_type__"


def _revive(value: Any) -> Any:
    """Stored JSON with its typed values rebuilt, so that a resumed run hands the metric's feedback calls
    the objects a live run gives them.

    What a row can make happen is bounded: the class is looked up among modules already loaded, by
    their ``__dict__`` (no import, no module ``__getattr__``), and only a DSPy example, a pydantic
    model, a dataclass, an enum member, a date, or an instance of a plain class of the user's own code
    (rebuilt from its fields without running any of its methods, see :func:`_plain_user_class`) is
    built (their own validation runs, as for any value of theirs); any other name, or a value that no
    longer validates, leaves the plain JSON. The run store
    is trusted as the user's own files are; nothing in it is executed as code."""
    if isinstance(value, list):
        return [_revive(v) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TYPE, "value"} and isinstance(value[_TYPE], str):
        return _rebuild(value[_TYPE], _revive(value["value"]))
    return {k: _revive(v) for k, v in value.items()}


def _rebuild(tag: str, value: Any) -> Any:
    import pydantic

    module, _, qualname = tag.partition(":")
    cls: Any = sys.modules.get(module)
    for part in qualname.split("."):
        namespace = getattr(cls, "__dict__", None)
        cls = namespace.get(part) if isinstance(namespace, Mapping) else None
    if not isinstance(cls, type):
        return value
    try:
        if module == "numpy":
            return _numpy_rebuilt(cls, value)
        if isinstance(value, list) and cls in (dict, OrderedDict):
            return _mapping_from_pairs(cls, value)
        if isinstance(value, list) and cls in _BUILTIN_CONTAINERS:
            return cls(value)
        if isinstance(value, list) and issubclass(cls, tuple):
            # a namedtuple (its generated _make), a library type such as struct_time; a user's own tuple
            # subclass comes back a plain tuple: its __new__ is not run on a row's values
            try:
                make = getattr(cls, "_make", None)
                if callable(make) and hasattr(cls, "_fields"):
                    return make(value)
                if _library_class(cls):
                    return cls(value)
            except Exception:  # noqa: BLE001 - its constructor wants something else: the plain tuple
                pass
            return tuple(value)
        if issubclass(cls, (datetime.date, datetime.time)) and isinstance(value, str):
            return cls.fromisoformat(value)
        if issubclass(cls, enum.Enum):
            try:
                return cls(value)
            except ValueError:
                if isinstance(value, list):  # a tuple value, read back from JSON as a list
                    return cls(_as_tuples(value))
                raise
        if issubclass(cls, dspy.Example) and isinstance(value, dict):
            return cls(**value)
        if issubclass(cls, pydantic.BaseModel) or dataclasses.is_dataclass(cls):
            return _adapter_for(cls).validate_python(value)
        if isinstance(value, dict) and _plain_user_class(cls):  # type: ignore[arg-type]  # (as above)
            obj = object.__new__(cls)  # no __init__: the fields are the stored ones
            obj.__dict__.update(value)
            return obj
    except Exception as exc:  # noqa: BLE001 - the class changed since the row was written: keep the JSON
        logger.debug("stored %s value not rebuilt (%s)", tag, type(exc).__name__)
    return value


#: Containers JSON cannot tell from a list, stored typed (see :func:`_jsonable`).
_BUILTIN_CONTAINERS = (tuple, set, frozenset)


def _mapping_from_pairs(cls: type, pairs: list[Any]) -> Any:
    """A mapping stored as ``[key, value]`` pairs (its keys were not all strings). A key that cannot be
    one any more (its class is gone, so it came back as plain JSON) is keyed by its JSON text, as all
    keys were before mappings were stored typed. ``cls`` is ``dict`` or ``OrderedDict``: any other
    mapping was stored as a dict."""
    items = []
    for pair in pairs:
        key, item = pair
        try:
            hash(key)
        except TypeError:
            key = json.dumps(key, sort_keys=True, ensure_ascii=False, default=str)
        items.append((key, item))
    return cls(items)


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=256)
def _adapter_for(cls: type) -> Any:
    import pydantic

    return pydantic.TypeAdapter(cls)


def _prediction_dict(pred: Any) -> dict[str, Any] | None:
    """A prediction's fields; a program that returns a plain value (a str, a list) is marked as such,
    so resume hands the metric the same kind of object."""
    if pred is None:
        return None
    if isinstance(pred, dspy.Example):  # its items, not toDict(), which turns models into plain dicts
        return _jsonable(dict(pred.items()))
    if hasattr(pred, "toDict"):
        return _jsonable(pred.toDict())
    if isinstance(pred, Mapping):
        return {_PLAIN: "mapping", "value": _jsonable(dict(pred.items()))}
    return {_PLAIN: "value", "value": _jsonable(pred)}


#: Marks a stored prediction that was not a dspy.Prediction (absent in rows written before it existed).
_PLAIN = "__turbogepa_plain__"


def _prediction_from(data: Any) -> Any:
    if not isinstance(data, dict):
        return _revive(data)
    kind = data.get(_PLAIN)
    if kind == "value":
        return _revive(data.get("value"))
    if kind == "mapping":
        return _revive(dict(data.get("value") or {}))
    return dspy.Prediction(**_revive(data))


def trajectory_to_json(traj: DspyTrajectory | None) -> str | None:
    if traj is None:
        return None
    sig = traj.failed_signature
    payload = {
        "prediction": _prediction_dict(traj.prediction),
        "steps": [
            {"pred_name": s.pred_name, "inputs": _jsonable(s.inputs), "outputs": _prediction_dict(s.outputs),
             "raw": s.raw_index}
            for s in traj.steps
        ],
        "error": traj.error,
        "error_type": traj.error_type,
        "failure": traj.failure,
        "service_failure": traj.service_failure,
        "raw_completion": traj.raw_completion,
        "failed_predictor": traj.failed_predictor,
        "failed_fields": (
            [list(sig.input_fields), list(sig.output_fields)]
            if sig is not None and hasattr(sig, "input_fields") else None
        ),
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


class _FieldsOnly:
    """Stands in for a failed signature after a reload: only its field names are compared."""

    def __init__(self, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        self.input_fields = dict.fromkeys(inputs)
        self.output_fields = dict.fromkeys(outputs)


def trajectory_from_json(
    text: str | None, example: dspy.Example, codec: ProgramCodec, fingerprint: str, texts: Mapping[str, str]
) -> DspyTrajectory | None:
    if not text:
        return None
    data = json.loads(text)
    predictors = dict(codec.get(fingerprint, texts).program.named_predictors())
    steps: list[TraceStep] = []
    raw: list[tuple[Any, dict[str, Any], Any]] = []
    previous: Any = None
    for s in data.get("steps", []):
        pred = predictors.get(s["pred_name"])
        # One LM call matched to several predictors is one trace entry under consecutive steps with the
        # same "raw"; stores written before "raw" existed have an entry per step.
        stored = s.get("raw")
        index = stored if type(stored) is int and stored >= 0 else None
        if index is None or index != previous:
            raw.append((pred, _revive(dict(s.get("inputs") or {})),
                        dspy.Prediction(**_revive(s.get("outputs") or {}))))
        previous = index
        _, inputs, outputs = raw[-1]
        steps.append(TraceStep(s["pred_name"], pred, dict(inputs), outputs, len(raw) - 1))
    pred_data = data.get("prediction")
    fields = data.get("failed_fields")
    return DspyTrajectory(
        example=example,
        prediction=_prediction_from(pred_data) if pred_data is not None else None,
        steps=steps,
        raw_trace=raw,
        error=data.get("error"),
        error_type=data.get("error_type"),
        failure=data.get("failure"),
        raw_completion=data.get("raw_completion"),
        failed_signature=_FieldsOnly(*fields) if fields else None,
        failed_predictor=data.get("failed_predictor"),
        service_failure=bool(data.get("service_failure", False)),
    )


#: LM settings that change what a call answers (the rest, such as cache or retries, do not).
_ANSWER_KWARGS = ("temperature", "max_tokens", "max_completion_tokens", "top_p", "n", "stop", "seed",
                  "reasoning_effort", "response_format", "logprobs")


def lm_identity(lm: Any) -> Any:
    """What makes an LM answer the way it does, without its credentials: the model, the endpoint
    (userinfo stripped from the URL), and the sampling settings."""
    if lm is None:
        return None
    kwargs = getattr(lm, "kwargs", None)
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    base = lm_api_base(lm)
    return {
        "class": f"{type(lm).__module__}.{type(lm).__qualname__}",
        "model": getattr(lm, "model", None),
        "api_base": strip_userinfo(base) if base else None,
        **{k: _hashable(kwargs[k]) for k in _ANSWER_KWARGS if kwargs.get(k) is not None},
    }


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


def callable_identity(fn: Any) -> str:
    """A metric's or proposer's identity for the run key: an edited metric scores differently, and
    the stored scores must not be reused for it. A function is its name and its code (bytecode, the
    names it reads, its constants, nested functions); a ``functools.partial`` its function and bound
    arguments; a method or a callable object every function its class defines (``forward`` and the
    helpers of a ``dspy.Module`` judge, not only the ``__call__`` it inherits from DSPy). Stable across
    processes (no addresses, set literals sorted). State is not seen — a closure's captured values, an
    object's fields, globals read at call time — because run-time state (a call counter, a lock) would
    refuse every rerun; a metric whose behaviour changes only through state needs a new log_dir."""
    if fn is None:
        return "None"
    if isinstance(fn, functools.partial):
        return f"partial({callable_identity(fn.func)}, {stable_hash(_hashable([fn.args, fn.keywords]))})"
    if inspect.ismethod(fn):
        owner = type(fn.__self__)
        return (f"{owner.__module__}.{owner.__qualname__}.{callable_identity(fn.__func__)}"
                f":{stable_hash(_class_code(owner))}")
    name = f"{getattr(fn, '__module__', type(fn).__module__)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    code = getattr(fn, "__code__", None)
    if code is None:  # a callable object: the code of its class (and of its user-written bases)
        return f"{name}:{stable_hash(_class_code(type(fn)))}"
    return f"{name}:{_function_digest(fn, _called_user_functions(fn))}"


def _function_digest(fn: Any, helpers: Sequence[str] = ()) -> str:
    """A user function's code, the identities of the ``helpers`` it calls, and its default argument
    values (see :func:`_defaults_identity`)."""
    defaults = _defaults_identity(fn)
    return (_code_digest(fn.__code__) + (f"+{stable_hash(list(helpers))}" if helpers else "")
            + (f"+defaults:{defaults}" if defaults else ""))


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


def _default_value(name: str, value: Any) -> Any:
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
    if inspect.isfunction(value) and not _library_function(value):
        return f"{value.__qualname__}:{_function_digest(value)}"
    if isinstance(value, type):
        user = not (in_dspy_package(value) or _library_class(value))
        return f"class {value.__module__}.{value.__qualname__}" + (
            f":{stable_hash(_class_code(value))}" if user else "")
    if isinstance(value, dspy.BaseLM):
        return stable_hash(_hashable(lm_identity(value)))
    if isinstance(value, re.Pattern):
        return ["re", repr(value.pattern), value.flags]
    if callable(value) and isinstance(getattr(value, "__qualname__", None), str):  # str.lower, operator.eq
        return f"{getattr(value, '__module__', None) or type(value).__module__}.{value.__qualname__}"
    kind = type(value)
    return f"<{kind.__module__}.{kind.__qualname__}>"


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
        if not inspect.isfunction(target) or id(target) in seen or _library_function(target):
            continue
        seen.add(id(target))
        out.append(f"{name}={target.__qualname__}:{_function_digest(target)}")
        out += _called_user_functions(target, seen)
    return out


def global_names(code: Any) -> list[str]:
    """The global names a code object (and its nested ones) loads: not ``co_names``, which also holds
    attribute names (``self.summarize`` would key an unrelated global ``summarize()``)."""
    names = [ins.argval for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL"]
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names += global_names(const)
    return names


def _library_function(fn: Any) -> bool:
    module = getattr(fn, "__module__", None) or ""
    if module == "dspy" or module.startswith(("dspy.", "dspy_turbogepa")):
        return True
    path = getattr(sys.modules.get(module), "__file__", None)
    return isinstance(path, str) and os.path.realpath(path).startswith(_library_dirs())


def _class_code(cls: type) -> list[str]:
    """The identity of every function a user's class defines, its user-written bases included. Classes
    of DSPy, the standard library and installed packages are left out: their code changes with an
    upgrade (a pydantic-based scorer would key 50 pydantic functions), not with the user's edits."""
    out: list[str] = []
    for klass in cls.__mro__:
        if klass is object or in_dspy_package(klass) or _library_class(klass):
            continue
        for name, value in sorted(vars(klass).items()):
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if inspect.isfunction(fn):
                out.append(f"{name}={callable_identity(fn)}")
    return out


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib", "purelib", "platlib")
                  if paths.get(k)})


def _library_class(klass: type) -> bool:
    """Defined in the standard library or an installed (not editable) package. (A class built by
    ``exec`` without a ``__name__`` says it is from ``builtins``; it is the user's unless ``builtins``
    really holds it.)"""
    module = sys.modules.get(klass.__module__)
    if klass.__module__ in sys.builtin_module_names:
        return getattr(module, klass.__qualname__, None) is klass
    path = getattr(module, "__file__", None)
    return isinstance(path, str) and os.path.realpath(path).startswith(_library_dirs())


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


def _hashable(value: Any) -> Any:
    """Like ``_jsonable``, for the run key: the same value must give the same JSON in every process.

    ``str()`` of a plain object embeds its memory address, which would make every rerun "a different
    run"; and ``str()`` of a big table or array is abridged, which would hide a changed dataset. So:
    classes by name, LMs by :func:`lm_identity` (never their keys), sets sorted, arrays and images by
    a hash of their bytes, tables and models by their full dumps (``to_dict`` / ``model_dump`` /
    dataclass fields), an object whose ``str()`` is informative by that, any other by its fields.
    A reference cycle ends in a marker instead of a RecursionError: only the objects being walked into
    (the ancestors) count, so an object met again in a sibling (two examples sharing an array) is
    hashed by its content both times."""
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
            return sorted((_to_json(x, leaf) for x in v), key=repr)
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
                return {"__type__": kind, "items": _to_json(v.tolist(), leaf),
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
                return {"__type__": kind, "sha256": hashlib.sha256(v.tobytes()).hexdigest(),
                        "shape": str(getattr(v, "shape", None) or getattr(v, "size", None))}
            if callable(getattr(v, "model_dump", None)):
                return {"__type__": kind, **_to_json(v.model_dump(), leaf)}
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                return {"__type__": kind, **_to_json(dataclasses.asdict(v), leaf)}
            if callable(getattr(v, "to_dict", None)):
                return {"__type__": kind, "data": _to_json(v.to_dict(), leaf)}
        except Exception as exc:  # noqa: BLE001 - a dump that fails: fall back to the fields below
            logger.debug("run key: %s could not be dumped (%s); using its fields", kind, type(exc).__name__)
        text = str(v)
        if _ADDRESS.search(text) is None:
            return text
        fields = dict(vars(v)) if hasattr(v, "__dict__") else {}
        for slot in getattr(type(v), "__slots__", ()):
            if isinstance(slot, str) and hasattr(v, slot):
                fields[slot] = getattr(v, slot)
        if fields:
            return {"__type__": kind, **_to_json(fields, leaf)}
        return _ADDRESS.sub("", text)

    return _to_json(value, leaf)


#: Bumped whenever a component of :func:`run_key` is computed differently (2: examples keyed with their
#: input fields, metric objects by their class's code, the adapter and Predict.config keyed; 3: an
#: object shared by two examples hashed by its content both times; 4: modules' plain settings, tools,
#: and the user's module-level functions a forward, tool or metric calls; 5: those functions found by
#: LOAD_GLOBAL only, not every name the code reads, and a tool's closure values no longer keyed; 6: a
#: function's default argument values, seed=None keyed as the 0 it runs with, failure_score a part of its
#: own instead of the metric's). A pinned key in
#: tests/test_run_key_format.py fails when the computation changes and this is not bumped.
RUN_KEY_FORMAT = "6"


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
    structure: list[Any] = [
        # the code of the user's own modules, every method (a fixed forward(), aforward() or helper must
        # not replay the broken one's failures)
        sorted({code for _, m in student.named_sub_modules() if not in_dspy_package(type(m))
                for code in _class_code(type(m))})
    ]
    # what the modules around the predictors hold: their plain settings (a retriever's k, ReAct's
    # max_iters, a flag the user's forward reads) and the code of the tools and functions they call
    settings = ((name, _module_settings(module)) for name, module in student.named_sub_modules()
                if not isinstance(module, dspy.Predict))
    structure.append(sorted([name, held] for name, held in settings if held))
    for name, pred in student.named_predictors():
        state = {k: v for k, v in pred.dump_state().items() if k != "lm"}
        entry: tuple[Any, ...] = (name, list(pred.signature.input_fields), list(pred.signature.output_fields),
                                  state, lm_identity(getattr(pred, "lm", None)))
        config = getattr(pred, "config", None)  # dspy.Predict(sig, temperature=...): not in dump_state()
        if isinstance(config, Mapping) and config:
            entry += ({str(k): _hashable(v) for k, v in sorted(config.items(), key=lambda kv: str(kv[0]))},)
        structure.append(entry)
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
        "reflection": stable_hash(_hashable(reflection)),
    }


#: Plain fields of DSPy's own modules that change as they run (BestOfN / Refine lower ``fail_count``
#: on every failed attempt): running the student before compile must not make it "another run".
_DSPY_RUNTIME_FIELDS = frozenset({"fail_count"})


def _module_settings(module: Any) -> dict[str, Any]:
    """A module's public plain fields, and the identity of the tools and functions it holds (a list
    or dict of them included: ``ReAct.tools``). Other objects are run-time state (a client, a lock) and
    not seen: a module whose behaviour changes through them needs a new log_dir."""
    out: dict[str, Any] = {k: v for k, v in _plain_settings(module).items()
                           if not (k in _DSPY_RUNTIME_FIELDS and in_dspy_package(type(module)))}
    for key, value in sorted(vars(module).items()):
        if key.startswith("_"):
            continue
        items = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, (list, tuple)) \
            else [value]
        tools = [ident for item in items if (ident := _tool_identity(item)) is not None]
        if tools:
            out[key] = tools
    return out


def _tool_identity(obj: Any) -> str | None:
    """A ``dspy.Tool`` by its name, description and function; a plain function by its code. None for
    anything else, and for DSPy's own functions (ReAct's ``finish``)."""
    if isinstance(obj, dspy.Tool):
        fn = obj.func
        if inspect.isfunction(fn) and _library_function(fn):
            return f"tool:{obj.name}:{obj.desc}"
        return f"tool:{obj.name}:{obj.desc}:{callable_identity(fn)}"
    if (inspect.isfunction(obj) or inspect.ismethod(obj)) and not _library_function(getattr(obj, "__func__", obj)):
        return callable_identity(obj)
    return None


def adapter_identity(adapter: Any) -> dict[str, Any]:
    """A configured DSPy adapter (``dspy.configure(adapter=JSONAdapter())``) formats every prompt and
    parses every answer: its class and public plain settings."""
    return {"class": f"{type(adapter).__module__}.{type(adapter).__qualname__}", **_plain_settings(adapter)}


def _plain_settings(obj: Any) -> dict[str, Any]:
    """An object's public fields holding plain values (its settings; run-time state is seldom plain)."""
    return {k: v for k, v in sorted(vars(obj).items())
            if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}


def data_identity(examples: Sequence[dspy.Example], name: str = "examples") -> str:
    """A dataset's content hash: every example's fields and inputs, in order (arrays, tables and models
    by content, see :func:`_hashable`); the same in every process.

    A field whose value cannot be read (its ``__str__`` or ``__repr__`` raises) is a ``TypeError`` naming
    ``name[i]`` before any LM call; it was a bare error from deep inside the hashing."""
    try:
        return stable_hash(_hashable([_example_identity(ex) for ex in examples]))
    except Exception as exc:  # find which example, hashed alone (the hash itself is unchanged: run keys stay)
        for i, ex in enumerate(examples):
            try:
                _hashable(_example_identity(ex))
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


#: Failures after which the program's answer exists (the metric, not the program, failed).
_ANSWERED = (None, "metric_error", "metric_invalid")


class StoreObserver(EngineObserver):
    """Writes candidates, evaluations, proposals and commits to the store as they happen."""

    def __init__(self, store: Any, keeps_outputs: bool = False) -> None:
        """``keeps_outputs``: the evaluator keeps validation outputs (``track_best_outputs``); a program
        that answered ``None`` is then stored as a JSON null, not as "no output kept"."""
        self._store = store
        self._keeps_outputs = keeps_outputs
        self._recorded: set[str] = set()
        self._unstorable = 0

    def _candidate(self, c: Candidate, created_at: float) -> None:
        # Every evaluated candidate is stored (not only accepted ones): a resumed run needs the texts
        # behind each stored evaluation to rebuild its trajectory.
        if c.fingerprint not in self._recorded:
            self._recorded.add(c.fingerprint)
            self._store.record_candidate(c.fingerprint, dict(c.texts), list(c.parents), c.kind, created_at)

    def on_evaluation(self, candidate: Candidate, split: Split, outcome: EvalOutcome) -> None:
        self._candidate(candidate, 0.0)
        try:
            if outcome.output is not None:
                output: str | None = json.dumps(_prediction_dict(outcome.output))
            elif self._keeps_outputs and split == "val" and outcome.failure in _ANSWERED:
                output = "null"  # kept, and it was None: a resume with track_best_outputs must not run it again
            else:
                output = None
            # whatever carries a trajectory (train rows; every row when the valset is the trainset)
            trajectory = trajectory_to_json(outcome.trajectory)
        except (TypeError, ValueError, RecursionError) as exc:
            # A value the walk let through that JSON cannot write: the run goes on with the outcome in
            # memory; unstored, a resume runs the evaluation again instead of reading half of it.
            self._unstorable += 1
            if self._unstorable == 1:
                logger.warning("An evaluation's outputs could not be written to the run store (%s: %s); it is "
                               "kept for this run, and a resume will run it again. Further ones at DEBUG.",
                               type(exc).__name__, describe_error(exc))
            else:
                logger.debug("Evaluation not stored: %s", describe_error(exc))
            return
        self._store.record_evaluation(
            candidate.fingerprint, split, outcome.example_id, outcome.score,
            dict(outcome.objective_scores) if outcome.objective_scores else None,
            outcome.failure, outcome.message, outcome.error_type, trajectory,
            output, None, None, service_failure=outcome.service_failure,
            usage={"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                   "cost": outcome.cost},
        )

    def on_candidate(self, record: CandidateRecord) -> None:
        c = record.candidate
        self._candidate(c, record.discovery_seconds)
        self._store.record_event(
            "candidate_accepted",
            {"index": record.index, "fingerprint": c.fingerprint, "aggregate": record.aggregate,
             "parents": record.parent_indices, "metric_calls": record.discovery_metric_calls},
        )

    def on_proposal(self, key: str, proposal: ProposalOutcome) -> None:
        self._store.record_proposal(key, dict(proposal.texts), proposal.skipped, proposal.message,
                                    proposal.reflection_calls,
                                    usage={"prompt_tokens": proposal.reflection_prompt_tokens,
                                           "completion_tokens": proposal.reflection_completion_tokens,
                                           "cost": proposal.reflection_cost})

    def on_mutation(self, result: MutationResult, status: str) -> None:
        self._store.record_event(
            "mutation_committed",
            {"seq": result.plan.seq, "kind": result.plan.kind, "status": status, "detail": result.detail},
        )


def _used(usage: Mapping[str, float] | None, name: str) -> float:
    value = (usage or {}).get(name, 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def load_known(
    store: Any, codec: ProgramCodec, datasets: Mapping[Split, Sequence[dspy.Example]], seed_texts: Mapping[str, str],
    need_outputs: bool = False,
) -> tuple[dict[EvalKey, EvalOutcome], dict[str, ProposalOutcome]]:
    """Stored evaluations and proposals as the engine's caches.

    ``need_outputs`` (``track_best_outputs=True``): a validation row stored without the program's
    output by a session that did not keep outputs is run again, once, with a warning; replayed, its
    example would have no entry in ``best_outputs_valset``.

    Not replayed: failures of the LM service, a failed proposer (often the reflection LM's key or
    endpoint), and every failure recorded by a session that stopped on a systemic failure — its error
    said "fix ... and run again", and the fixed setup must not be scored with the broken one's failures
    (a fix outside the run key's view: an environment variable, a file, a service the metric calls)."""
    systemic = {e.session for e in store.events("systemic_failure")}
    # Candidate texts are stored with credential-looking substrings masked: a masked text is another
    # program, and rebuilding a trajectory with it would cache that program under the real fingerprint.
    # Only texts that still hash to their fingerprint are used; the seed's come from the student.
    texts_by_fp: dict[str, Mapping[str, str]] = {
        c.fingerprint: c.texts for c in store.load_candidates() if Candidate(c.texts).fingerprint == c.fingerprint
    }
    texts_by_fp[Candidate(seed_texts).fingerprint] = seed_texts
    proposals = {
        key: ProposalOutcome(texts=dict(p.texts), skipped=p.skipped, message=p.message,
                             reflection_calls=p.reflection_calls,
                             reflection_prompt_tokens=int(_used(p.usage, "prompt_tokens")),
                             reflection_completion_tokens=int(_used(p.usage, "completion_tokens")),
                             reflection_cost=_used(p.usage, "cost"))
        for key, p in store.load_proposals().items()
        if p.skipped != "proposer_error" and not (p.skipped in PROPOSER_FAILURES and p.session in systemic)
    }
    known: dict[EvalKey, EvalOutcome] = {}
    without_output = masked = 0
    for ev in store.load_evaluations():
        split: Split = "train" if ev.split == "train" else "val"
        if ev.example_id >= len(datasets[split]) or ev.service_failure:
            continue  # the LM service's failure says nothing about the candidate: run it again
        if ev.failure and ev.session in systemic:
            continue
        if need_outputs and split == "val" and not ev.output_json and ev.failure in _ANSWERED:
            without_output += 1  # the program answered, but that session did not keep the answer
            continue
        if need_outputs and ev.output_json and REDACTED in ev.output_json:
            masked += 1  # best_outputs_valset would return the masked copy
            continue
        trajectory = None
        trace_lost = _trace_masked(ev)
        if ev.trajectory_json and ev.fingerprint in texts_by_fp and not trace_lost:
            trajectory = trajectory_from_json(
                ev.trajectory_json, datasets[split][ev.example_id], codec, ev.fingerprint, texts_by_fp[ev.fingerprint]
            )
        output = None
        if ev.output_json:
            output = _prediction_from(json.loads(ev.output_json))
        known[(ev.fingerprint, split, ev.example_id)] = EvalOutcome(
            example_id=ev.example_id, score=ev.score,
            objective_scores=dict(ev.objective_scores) if ev.objective_scores else None,
            failure=ev.failure, message=ev.message, trajectory=trajectory, output=output, error_type=ev.error_type,
            prompt_tokens=int(_used(ev.usage, "prompt_tokens")),
            completion_tokens=int(_used(ev.usage, "completion_tokens")), cost=_used(ev.usage, "cost"),
            trace_lost=trace_lost,
        )
    if without_output:
        logger.warning("track_best_outputs=True: %d stored validation evaluations were written without their "
                       "outputs (by a session with track_best_outputs=False) and will be run again",
                       without_output)
    if masked:
        logger.warning("track_best_outputs=True: %d stored validation outputs held credential-shaped text, "
                       "stored masked: those evaluations will be run again (the masked copy is not what the "
                       "program answered)", masked)
    return known, proposals


def _trace_masked(ev: Any) -> bool:
    """Whether a stored row's trace lost text to masking.

    The store masks credential-shaped text (a secret-extraction task's inputs and answers, an error
    quoting a key). The score is what the metric said about the real values and is replayed; but the
    trace is what the metric's feedback call and the reflection read: a masked copy scores a right
    answer wrong and shows the reflection ``***REDACTED***``. The engine runs such an evaluation again
    only if a new reflection is to read it (``EvalOutcome.trace_lost``)."""
    return bool(ev.trajectory_json and (REDACTED in ev.trajectory_json or (ev.message and REDACTED in ev.message)))
