"""What the run store keeps of a rollout, as JSON and back: typed values, predictions, trajectories.

What reflection needs from a rollout (each predictor's inputs and outputs, the program's prediction, the
error) is stored as JSON, so a resumed run reflects on stored parents without re-running them. Typed
values (pydantic models, dataclasses, dates) are stored in their JSON form tagged with their type and
rebuilt on resume, so the metric's feedback calls see the objects a live run gives them; values JSON
cannot hold otherwise (images, custom types) are stored as their ``str()``. Nothing is unpickled or
evaluated: a type is rebuilt only if it is importable and of a kind this module knows how to build.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import json
import logging
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import dspy

from dspy_turbogepa.adapter.introspect import in_dspy_package, library_class
from dspy_turbogepa.adapter.program import ProgramCodec, all_named_predictors
from dspy_turbogepa.adapter.trajectory import DspyTrajectory, TraceStep
from dspy_turbogepa.redaction import is_sensitive_key

logger = logging.getLogger(__name__)


def to_json(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """JSON-able form of ``value``: primitives, mappings, lists and DSPy examples / predictions
    (``toDict``) are walked; anything else becomes ``leaf(value)``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {_key(k, leaf): to_json(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, leaf) for v in value]
    if hasattr(value, "toDict"):
        return to_json(value.toDict(), leaf)
    return leaf(value)


def _key(key: Any, leaf: Callable[[Any], Any]) -> str:
    """A mapping key as a string: a string as itself, another primitive with its type (``{1: "a"}`` and
    ``{"1": "a"}`` are other data: the run key took one for the other, and a rerun on the changed data
    replayed the old scores); anything else (a tuple, a frozenset, whose ``str()`` order follows the
    per-process string hash) through the same walk as values."""
    if type(key) is str:
        return key
    if key is None or isinstance(key, (bool, int, float, str)):  # a str or int Enum member: its repr names it
        return f"<{type(key).__name__}>{key!r}"
    return json.dumps(to_json(key, leaf), sort_keys=True, ensure_ascii=False, default=str)


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


def jsonable(value: Any, _walk: _Walk | None = None) -> Any:
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
    # numpy's float64 and str_ are a float and a str too: stored typed, so a metric's .item() or .round() works
    if value is None or (isinstance(value, (bool, int, float, str)) and type(value).__module__ != "numpy"):
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
                return {k: jsonable(v, walk) for k, v in value.items()}
            # other keys (ints, tuples) as typed pairs: JSON would make them strings, and the metric's
            # feedback call of a resumed run must get the mapping a live run gives it
            tag = "collections:OrderedDict" if type(value) is OrderedDict else "builtins:dict"
            return {_TYPE: tag, "value": [[jsonable(k, walk), jsonable(v, walk)] for k, v in value.items()]}
        if isinstance(value, list):
            return [jsonable(v, walk) for v in value]
        if isinstance(value, tuple):  # typed: JSON has only lists (a namedtuple keeps its class)
            kind = type(value)
            keep = kind is not tuple and (hasattr(kind, "_fields") or library_class(kind))
            tag = f"{kind.__module__}:{kind.__qualname__}" if keep else "builtins:tuple"
            return {_TYPE: tag, "value": [jsonable(v, walk) for v in value]}
        return _stored_leaf(value, walk)
    finally:
        walk.path.discard(key)


def _stored_leaf(value: Any, _walk: _Walk | None = None) -> Any:
    kind = type(value)
    tag = f"{kind.__module__}:{kind.__qualname__}"
    walk = _Walk() if _walk is None else _walk
    try:
        if isinstance(value, dspy.Example):  # items, not toDict(), which turns models into plain dicts
            stored = {_TYPE: tag, "value": {k: jsonable(v, walk) for k, v in value.items()}}
            input_keys = getattr(value, "_input_keys", None)
            if input_keys is not None:  # .with_inputs(...): a metric may call .inputs() / .labels() on it
                stored[_INPUT_KEYS] = sorted(str(k) for k in input_keys)
            return stored
        if isinstance(value, (datetime.date, datetime.time)):
            return {_TYPE: tag, "value": value.isoformat()}
        if kind.__module__ == "numpy":
            stored = _numpy_value(value)
            if stored is not None:
                return {_TYPE: tag, "value": stored}
        if isinstance(value, enum.Enum):
            return {_TYPE: tag, "value": jsonable(value.value, walk)}
        if isinstance(value, dspy.Tool):  # its function cannot be stored: what the LM is shown (see _rebuild)
            shown = {k: jsonable(getattr(value, k, None), walk) for k in ("name", "desc", "args", "arg_desc")}
            return {_TYPE: _TOOL, "value": {**shown, "text": str(value)}}
        fields = _shown_fields(value)
        if fields is not None:
            return {_TYPE: _findable_tag(kind, tuple(fields)),  # type: ignore[arg-type]  # a class is Hashable
                    "value": {name: jsonable(getattr(value, name), walk) for name in fields}}
        if isinstance(value, (set, frozenset)):
            return {_TYPE: "builtins:frozenset" if isinstance(value, frozenset) else "builtins:set",
                    "value": sorted((jsonable(v, walk) for v in value), key=repr)}
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


#: The most a stored string array wider than its strings may take once rebuilt (bytes).
_WIDEST_TEXT_ARRAY = 16 * 1024 * 1024


def _numpy_rebuilt(cls: type, value: Any) -> Any:
    import numpy as np

    if cls is np.ndarray and isinstance(value, dict):
        dtype = np.dtype(str(value["dtype"]))
        data = np.asarray(value["data"])  # as JSON gave it: the row's size bounds what is allocated
        # a string array may be wider than its longest string (np.array(["a"], dtype="U10")): allowed up to a
        # bound, so a row cannot make a tiny array allocate gigabytes
        wide_text = dtype.kind == "U" and dtype.itemsize * max(1, data.size) <= _WIDEST_TEXT_ARRAY
        if dtype.kind not in _NUMPY_KINDS or (dtype.itemsize > max(8, data.dtype.itemsize) and not wide_text):
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
    if in_dspy_package(cls) or library_class(cls) or issubclass(cls, (BaseException, dspy.Module, type)) \
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
#: Beside a stored DSPy example's fields: the keys ``.with_inputs(...)`` marked (rows written before it
#: was stored have none, and their examples come back with no inputs marked, as they always did).
_INPUT_KEYS = "input_keys"
#: The tag of a ``dspy.Tool`` in a trace input (a module passing its tools to a predictor): stored as
#: what the LM is shown (name, description, argument schema) and rebuilt as the candidate program's tool
#: that shows the same, else as a tool showing it whose function is not available. Its pydantic dump
#: held the function as text and came back a dict, so a resumed reflection read other text.
_TOOL = "dspy_turbogepa:tool"
#: The program a trajectory is being rebuilt for (see :func:`trajectory_from_json`): its tools.
_PROGRAM_TOOLS: ContextVar[_ProgramTools | None] = ContextVar("turbogepa_program_tools", default=None)


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
    if set(value) - {_INPUT_KEYS} == {_TYPE, "value"} and isinstance(value[_TYPE], str):
        rebuilt = _rebuild(value[_TYPE], _revive(value["value"]))
        keys = value.get(_INPUT_KEYS)
        if isinstance(rebuilt, dspy.Example) and isinstance(keys, list) and all(isinstance(k, str) for k in keys):
            return rebuilt.with_inputs(*keys)
        return rebuilt
    return {k: _revive(v) for k, v in value.items()}


def _class_named(tag: str) -> type | None:
    """The class a tag names, looked up among modules already loaded by their ``__dict__`` (no import,
    no module ``__getattr__``); None if there is none by that name."""
    module, _, qualname = tag.partition(":")
    cls: Any = sys.modules.get(module)
    for part in qualname.split("."):
        namespace = getattr(cls, "__dict__", None)
        cls = namespace.get(part) if isinstance(namespace, Mapping) else None
    return cls if isinstance(cls, type) else None


@functools.lru_cache(maxsize=256)
def _findable_tag(cls: type, fields: tuple[str, ...]) -> str:
    """The tag a model or dataclass is stored under: its own class when a resume can find it by name,
    else its nearest base class that can be found and declares every stored field. A class made at run
    time (``dspy.Code["python"]`` is ``Code_python``, made by ``Code.__class_getitem__``; a type from
    ``create_model``) has no name to be found by, and came back as a dict: as its base (``dspy.Code``)
    it keeps the fields and the methods a metric reads."""
    own = f"{cls.__module__}:{cls.__qualname__}"
    if _class_named(own) is cls:
        return own
    for base in cls.__mro__[1:]:
        declared = getattr(base, "model_fields", None)
        if not isinstance(declared, Mapping) and dataclasses.is_dataclass(base):
            declared = {f.name: f for f in dataclasses.fields(base)}
        if isinstance(declared, Mapping) and declared and set(fields) <= set(declared):
            tag = f"{base.__module__}:{base.__qualname__}"
            if _class_named(tag) is base:
                return tag
    return own


def _rebuild(tag: str, value: Any) -> Any:
    import pydantic

    if tag == _TOOL and isinstance(value, dict):
        return _rebuilt_tool(value)

    module = tag.partition(":")[0]
    cls: Any = _class_named(tag)
    if cls is None:
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
                if library_class(cls):
                    return cls(value)
            except Exception as exc:  # noqa: BLE001 - its constructor wants something else: the plain tuple
                logger.debug("stored %s value comes back as a plain tuple (%s)", tag, type(exc).__name__)
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
            adapter = _adapter_for(cls)
            try:  # fields are stored by name: a field with an alias is validated by its name too
                return adapter.validate_python(value, by_name=True)
            except TypeError:  # pydantic before 2.11 has no by_name
                return adapter.validate_python(value)
        if isinstance(value, dict) and _plain_user_class(cls):
            obj = object.__new__(cls)  # no __init__: the fields are the stored ones
            obj.__dict__.update(value)
            return obj
    except Exception as exc:  # noqa: BLE001 - the class changed since the row was written: keep the JSON
        logger.debug("stored %s value not rebuilt (%s)", tag, type(exc).__name__)
    return value


#: Containers JSON cannot tell from a list, stored typed (see :func:`jsonable`).
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


def prediction_dict(pred: Any) -> dict[str, Any] | None:
    """A prediction's fields; a program that returns a plain value (a str, a list) is marked as such,
    so resume hands the metric the same kind of object."""
    if pred is None:
        return None
    if isinstance(pred, dspy.Example):  # its items, not toDict(), which turns models into plain dicts
        data = jsonable(dict(pred.items()))
        completions = getattr(pred, "_completions", None) if isinstance(pred, dspy.Prediction) else None
        count = _completion_count(completions)
        if count and completions is not None and isinstance(data, dict):
            # what pred.completions holds (a metric may read every one of n answers): one completion is
            # the fields themselves, several are kept whole
            data[_COMPLETIONS] = 1 if count == 1 else [
                jsonable({name: values[i] for name, values in completions.items()}) for i in range(count)]
        usage = getattr(pred, "_lm_usage", None) if isinstance(pred, dspy.Prediction) else None
        if usage and isinstance(data, dict):  # dspy's track_usage: a cost-aware metric reads get_lm_usage()
            data[_LM_USAGE] = jsonable(usage)
        return data
    if hasattr(pred, "toDict"):
        return jsonable(pred.toDict())
    if isinstance(pred, Mapping):
        return {_PLAIN: "mapping", "value": jsonable(dict(pred.items()))}
    return {_PLAIN: "value", "value": jsonable(pred)}


def _completion_count(completions: Any) -> int:
    """``len(completions)``, 0 for none: dspy's ``Completions`` with no field raises StopIteration."""
    if completions is None:
        return 0
    try:
        return len(completions)
    except (StopIteration, TypeError):
        return 0


#: Marks a stored prediction that was not a dspy.Prediction (absent in rows written before it existed).
_PLAIN = "__turbogepa_plain__"
#: A stored dspy.Prediction's completions: 1 (its fields), or the list of every completion's fields.
_COMPLETIONS = "__turbogepa_completions__"
#: A stored dspy.Prediction's LM usage (``get_lm_usage()``, with dspy's ``track_usage`` on).
_LM_USAGE = "__turbogepa_lm_usage__"


def prediction_from(data: Any) -> Any:
    if isinstance(data, dict) and _LM_USAGE in data:
        usage = _revive(data[_LM_USAGE])
        pred = prediction_from({k: v for k, v in data.items() if k != _LM_USAGE})
        if isinstance(pred, dspy.Prediction) and isinstance(usage, dict):
            pred.set_lm_usage(usage)
        return pred
    if not isinstance(data, dict):
        return _revive(data)
    kind = data.get(_PLAIN)
    if kind == "value":
        return _revive(data.get("value"))
    if kind == "mapping":
        return _revive(dict(data.get("value") or {}))
    if _COMPLETIONS not in data:  # rows written before completions were kept, or by a module without them
        return dspy.Prediction(**_revive(data))
    fields = {k: v for k, v in data.items() if k != _COMPLETIONS}
    stored = data[_COMPLETIONS]
    revived = _revive(fields)
    completions = [_revive(c) for c in stored] if isinstance(stored, list) and stored else [revived]
    pred = dspy.Prediction.from_completions(completions)
    pred._store = dict(revived)  # the fields as the module returned them (it may have changed the first)
    return pred


def trajectory_to_json(traj: DspyTrajectory | None) -> str | None:
    if traj is None:
        return None
    sig = traj.failed_signature
    payload = {
        "prediction": prediction_dict(traj.prediction),
        "steps": [
            {"pred_name": s.pred_name, "inputs": _step_inputs(s.inputs, traj.example),
             "outputs": prediction_dict(s.outputs),
             "raw": s.raw_index, **_unnamed_signature(s)}
            for s in traj.steps
        ],
        "error": traj.error,
        "error_type": traj.error_type,
        "failure": traj.failure,
        "service_failure": traj.service_failure,
        "raw_completion": traj.raw_completion,
        "failed_predictor": traj.failed_predictor,
        "metric_return": prediction_dict(traj.metric_return),
        "failed_fields": (
            [list(sig.input_fields), list(sig.output_fields)]
            if sig is not None and hasattr(sig, "input_fields") else None
        ),
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


#: A step's input that is the example's own field, stored by the field's name: the examples are the run's
#: data, which a resume has; stored again in every evaluation's row, an image input (3 MB of base64) made
#: the store grow by its size at every metric call (117 MB after 40 calls; dspy.GEPA stores none).
_EXAMPLE_FIELD = "__turbogepa_example_field__"


def _step_inputs(inputs: Mapping[str, Any], example: Any) -> dict[str, Any]:
    store = getattr(example, "_store", None)
    if not isinstance(store, dict):
        return jsonable(dict(inputs))
    missing = object()
    return {name: {_EXAMPLE_FIELD: name} if store.get(name, missing) is value else jsonable(value)
            for name, value in inputs.items()}


def _example_fields(inputs: Mapping[str, Any], example: Any) -> dict[str, Any]:
    """The stored inputs with :data:`_EXAMPLE_FIELD` references read back from ``example``."""
    store = getattr(example, "_store", None)
    if not isinstance(store, dict):
        return dict(inputs)
    out = {}
    for name, value in inputs.items():
        field = value.get(_EXAMPLE_FIELD) if isinstance(value, dict) and len(value) == 1 else None
        out[name] = store[field] if isinstance(field, str) and field in store else value
    return out


def _unnamed_signature(step: Any) -> dict[str, Any]:
    """For a step of a predictor the program does not hold (one built inside ``forward``): its signature's
    field names and instructions, so a reload can hand the metric a stand-in predictor, not None."""
    sig = getattr(step.predictor, "signature", None) if step.pred_name == "?" else None
    if sig is None or not hasattr(sig, "input_fields"):
        return {}
    return {"signature": [list(sig.input_fields), list(sig.output_fields), str(sig.instructions or "")]}


def _stand_in(stored: Any, made: dict[tuple[Any, ...], Any]) -> Any:
    """A ``dspy.Predict`` with the stored signature's fields (typed ``str``) and instructions: what a
    metric reading ``trace[i][0].signature`` gets for a predictor the program does not hold. One per
    signature per trajectory, as the live trace held one object per predictor."""
    inputs, outputs, instructions = stored
    key = (tuple(inputs), tuple(outputs), instructions)
    if key not in made:
        made[key] = dspy.Predict(_stand_in_signature(*key))
    return made[key]


@functools.lru_cache(maxsize=256)
def _stand_in_signature(inputs: tuple[str, ...], outputs: tuple[str, ...], instructions: str) -> Any:
    """Making a Signature class costs about 0.6 ms; a resumed run rebuilds the same few for every stored
    trajectory of a program that calls one (``dspy.Refine``'s feedback step)."""
    fields = {name: (str, dspy.InputField()) for name in inputs}
    fields.update({name: (str, dspy.OutputField()) for name in outputs})
    return dspy.Signature(fields, instructions or None)


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
    program = codec.get(fingerprint, texts).program
    token = _PROGRAM_TOOLS.set(_ProgramTools(program))
    try:
        steps, raw = _steps_from_json(data, dict(all_named_predictors(program)), example)
        pred_data = data.get("prediction")
        prediction = prediction_from(pred_data) if pred_data is not None else None
        returned = data.get("metric_return")  # absent in rows written before it was stored
        metric_return = prediction_from(returned) if returned is not None else None
    finally:
        _PROGRAM_TOOLS.reset(token)
    fields = data.get("failed_fields")
    return DspyTrajectory(
        example=example,
        prediction=prediction,
        steps=steps,
        raw_trace=raw,
        error=data.get("error"),
        error_type=data.get("error_type"),
        failure=data.get("failure"),
        raw_completion=data.get("raw_completion"),
        failed_signature=_FieldsOnly(*fields) if fields else None,
        failed_predictor=data.get("failed_predictor"),
        service_failure=bool(data.get("service_failure", False)),
        metric_return=metric_return,
    )


def _steps_from_json(
    data: Mapping[str, Any], predictors: Mapping[str, Any], example: Any = None
) -> tuple[list[TraceStep], list[tuple[Any, dict[str, Any], Any]]]:
    steps: list[TraceStep] = []
    raw: list[tuple[Any, dict[str, Any], Any]] = []
    previous: Any = None
    made: dict[tuple[Any, ...], Any] = {}
    for s in data.get("steps", []):
        pred = predictors.get(s["pred_name"])
        if pred is None and s.get("signature"):  # absent in rows written before it was stored
            pred = _stand_in(s["signature"], made)
        # One LM call matched to several predictors is one trace entry under consecutive steps with the
        # same "raw"; stores written before "raw" existed have an entry per step.
        stored = s.get("raw")
        index = stored if type(stored) is int and stored >= 0 else None
        if index is None or index != previous:
            revived = _revive(dict(s.get("inputs") or {}))
            raw.append((pred, _example_fields(revived, example), prediction_from(dict(s.get("outputs") or {}))))
        previous = index
        _, inputs, outputs = raw[-1]
        steps.append(TraceStep(s["pred_name"], pred, dict(inputs), outputs, len(raw) - 1))
    return steps, raw


class _ProgramTools:
    """The ``dspy.Tool`` objects a program's modules hold (an attribute, or a list, tuple or dict of tools
    such as ReAct's ``tools``), found on first use: most stored trajectories hold no tool."""

    def __init__(self, program: dspy.Module) -> None:
        self._program = program
        self._tools: list[Any] | None = None

    def all(self) -> list[Any]:
        if self._tools is None:
            self._tools = []
            for _, module in self._program.named_sub_modules():
                for held in vars(module).values():
                    items = held_items(held)
                    # a container of tools is one of tools: its first item says so (a corpus of a
                    # million strings is not walked on every resumed evaluation)
                    if items and isinstance(items[0], dspy.Tool):
                        self._tools += [item for item in items if isinstance(item, dspy.Tool)]
        return self._tools


def held_items(value: Any) -> Sequence[Any]:
    """What a module attribute holds: a list or tuple itself (not copied: it may be a large corpus), the
    values of a dict (ReAct's ``tools``), else the value alone."""
    if isinstance(value, dict):
        return list(value.values())
    return value if isinstance(value, (list, tuple)) else [value]


def _unavailable(**kwargs: Any) -> Any:
    raise RuntimeError("this tool was rebuilt from the run store; its function is not available here")


def _rebuilt_tool(stored: Mapping[str, Any]) -> Any:
    """The program's tool that shows what the stored one showed (the same object the live trace held),
    else a tool showing the same name, description and argument schema whose function raises."""
    lookup = _PROGRAM_TOOLS.get()
    text = stored.get("text")
    for tool in lookup.all() if lookup is not None else ():
        if tool.name == stored.get("name") and str(tool) == text:
            return tool
    try:
        return dspy.Tool(_unavailable, name=stored.get("name"), desc=stored.get("desc"),
                         args=stored.get("args"), arg_desc=stored.get("arg_desc"))
    except Exception:  # noqa: BLE001 - a schema dspy no longer accepts: the text the LM was shown
        return text
