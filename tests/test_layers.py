"""The architecture's one hard rule: the engine does not import DSPy."""

from __future__ import annotations

import subprocess
import sys


def test_engine_imports_without_dspy():
    """Nor the layers above it: the adapter (DSPy), the store (SQLite), tracking (MLflow). Every engine
    module is imported (a module nothing else in the engine imports, such as aimd.py, counts too)."""
    code = (
        "import sys, importlib, pkgutil, dspy_turbogepa.engine as e;"
        "[importlib.import_module(m.name) for m in pkgutil.iter_modules(e.__path__, e.__name__ + '.')];"
        "bad = sorted(m for m in sys.modules if m == 'dspy' or m.startswith(('dspy.', 'litellm', 'sqlite3', 'mlflow',"
        " 'dspy_turbogepa.adapter', 'dspy_turbogepa.store', 'dspy_turbogepa.tracking', 'dspy_turbogepa.proposers')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "[]"  # it ran the check (every engine module imported)


def test_public_names():
    import dspy_turbogepa

    assert dspy_turbogepa.GEPA is dspy_turbogepa.TurboGEPA
    assert issubclass(dspy_turbogepa.ConfigurationError, AssertionError)


_MUTATING_METHODS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem",
                               "remove", "discard", "clear", "appendleft", "set", "__setitem__"})
#: Calls that make a value nobody can change (or, for ContextVar, one that is per context by design).
_IMMUTABLE_CALLS = frozenset({"logging.getLogger", "frozenset", "tuple", "re.compile", "MappingProxyType", "TypeVar",
                              "object", "Decimal", "getattr", "ContextVar", "RetryPolicy", "_DefaultSelector"})
#: Process-wide on purpose, with the reason: what they mirror is process-wide too.
_DELIBERATE = {
    ("redaction.py", "_ENV_SCAN"): "the last scan of os.environ, which is the process's",
    ("tracking/autolog.py", "_FAILURE_REPORTED"): "registering with MLflow autolog (process-wide) failed; said once",
    ("tracking/console_logs.py", "_VISIBLE_LOGS_LOCK"): "guards the logging configuration, which is the process's",
    ("store/locks.py", "_HELD_RUN_LOCKS"): "the run locks' descriptors, which fork() copies process-wide",
    ("tracking/mlflow_tracking.py", "_few_http_retries"): "overrides MLflow's HTTP variables, which are the process's",
    ("workers.py", "_SHUT_DOWN_POOLS"): "shut-down pools whose busy workers the exit waits for (the process's)",
}


def _base_name(node: object) -> str | None:
    """``_C`` for ``_C``, ``_C[k]``, ``_C[k].x`` ...: the name a write through an item lands in."""
    import ast

    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


_CONTAINER_CALLS = frozenset({"list", "dict", "set", "defaultdict", "collections.defaultdict", "deque",
                              "collections.deque", "Counter", "collections.Counter", "OrderedDict",
                              "collections.OrderedDict"})


def _module_statements(body: list) -> list:
    """Statements that run at import: the module's own, and those inside its ``if`` / ``try`` / ``with`` /
    ``for`` blocks (``try: import x; _CACHE = {}``), never inside a function or class."""
    import ast

    out = []
    for node in body:
        out.append(node)
        if isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.Try)):
            blocks = [node.body, node.orelse, getattr(node, "finalbody", [])]
            blocks += [h.body for h in getattr(node, "handlers", [])]
            out += _module_statements([n for b in blocks for n in b])
    return out


def _bindings(node: object) -> list[tuple[str, object]]:
    """(name, value) for each name an assignment binds: ``A, B = [], {}`` pairs them, ``A = B = []`` and
    ``A, B = f()`` give each name the whole value."""
    import ast

    if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
        return []
    out = []
    for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
        if isinstance(target, ast.Name):
            out.append((target.id, node.value))
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = node.value.elts if isinstance(node.value, (ast.Tuple, ast.List)) \
                and len(node.value.elts) == len(target.elts) else [node.value] * len(target.elts)
            out += [(t.id, v) for t, v in zip(target.elts, values) if isinstance(t, ast.Name)]
    return [(n, v) for n, v in out if n != "__all__"]


def _is_container(value: object) -> bool:
    import ast

    return isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) or (
        isinstance(value, ast.Call) and ast.unparse(value.func) in _CONTAINER_CALLS)


def _writes_to(node: object, names: set[str], attr_of: object = None) -> list[str]:
    """What ``node`` (inside a function) writes to in ``names``: assigning an item or attribute of one, or
    calling a mutating method on one or on its items. With ``attr_of`` (a predicate on the node an
    attribute hangs off: ``self``, ``cls``, the class's name), ``names`` are attributes of that object."""
    import ast

    def base(t: object) -> str | None:
        if attr_of is None:
            return _base_name(t)
        while isinstance(t, (ast.Subscript, ast.Attribute)):
            if isinstance(t, ast.Attribute) and attr_of(t.value):
                return t.attr
            t = t.value
        return None

    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        if attr_of is not None:  # ``cls.x = ...`` rebinds the class attribute: a write too
            return [f"line {node.lineno}: writes {ast.unparse(t)}" for t in targets if base(t) in names]
        return [f"line {node.lineno}: writes {_base_name(t)}[...]" for t in targets
                if isinstance(t, (ast.Subscript, ast.Attribute)) and base(t) in names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in _MUTATING_METHODS and base(node.func.value) in names):
        return [f"line {node.lineno}: {ast.unparse(node.func)}(...)"]
    return []


def _class_state_violations(cls: object, module: str) -> list[str]:
    """A class attribute every instance shares, written at run time: a container in the class body that a
    method fills through ``self`` (no ``self.x = ...`` gives an instance its own), or any class attribute
    rebound through ``cls`` / the class's name. Pydantic models and dataclasses copy their defaults."""
    import ast

    bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in cls.bases}
    decorators = {ast.unparse(d).split("(")[0].rsplit(".", 1)[-1] for d in cls.decorator_list}
    if bases & {"BaseModel", "TypedDict", "NamedTuple", "Enum", "IntEnum", "StrEnum"} or "dataclass" in decorators:
        return []
    attrs = {n for stmt in cls.body for n, _ in _bindings(stmt)}
    shared = {n for stmt in cls.body for n, v in _bindings(stmt) if _is_container(v)}
    methods = [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = [node for fn in methods for node in ast.walk(fn)]
    own = {t.attr for node in inner if isinstance(node, (ast.Assign, ast.AnnAssign))
           for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
           if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    shared -= own
    found = []
    for node in inner:
        found += [f for f in _writes_to(node, shared, lambda v: isinstance(v, ast.Name) and v.id == "self")
                  if "writes self." not in f or "[" in f.split("writes ", 1)[1]]
        found += _writes_to(node, attrs, lambda v: isinstance(v, ast.Name) and v.id in ("cls", cls.name))
    return [f.replace(": ", f": {cls.name}: ", 1) for f in found if (module, f"{cls.name}") not in _DELIBERATE]


def module_state_violations(source: str, module: str = "") -> list[str]:
    """Module-level mutable state in ``source``: a ``global`` statement; a module-level container (list,
    dict, set, ...) that a function writes to, directly or through one of its items; a module-level
    object made by a call not known to make an immutable value; a class attribute shared by every
    instance and written at run time. Read-only lookup tables are fine, and so is filling one at import
    time; what functions write at module level is shared by every compile in the process (two islands,
    two threads, a notebook's second run): per-run state belongs on objects that ``compile()`` creates."""
    import ast

    from dspy_turbogepa.adapter.run_identity import parse_source

    tree = parse_source(source, module or "<source>")
    containers, found = set(), []
    statements = _module_statements(tree.body)
    for node in statements:
        for name, value in _bindings(node):
            if _is_container(value):
                containers.add(name)
            elif isinstance(value, ast.Call) and ast.unparse(value.func) not in _IMMUTABLE_CALLS \
                    and (module, name) not in _DELIBERATE:
                containers.add(name)  # set(), a cache: its writes are named too
                found.append(f"line {node.lineno}: {name} = {ast.unparse(value.func)}(...)")
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    for node in (inner for fn in functions for inner in ast.walk(fn)):
        if isinstance(node, ast.Global):
            found.append(f"line {node.lineno}: global {', '.join(node.names)}")
        else:
            found += _writes_to(node, containers)
    for cls in (n for n in statements if isinstance(n, ast.ClassDef)):
        found += _class_state_violations(cls, module)
    return sorted(set(found), key=lambda f: int(f.split()[1].rstrip(":")))


def test_no_module_level_mutable_state():
    """The design rule "no module-level mutable globals", checked on every module of the package.
    Not checked: a class attribute written from outside its class, and ``functools.cache`` /
    ``lru_cache`` (each memoises a pure function of a name or a class here)."""
    from pathlib import Path

    import dspy_turbogepa

    root = Path(dspy_turbogepa.__file__).parent
    violations = {str(p.relative_to(root)): v for p in sorted(root.rglob("*.py"))
                  if (v := module_state_violations(p.read_text(encoding="utf-8"), p.relative_to(root).as_posix()))}
    assert not violations, violations


def test_the_module_state_check_catches_what_it_is_for():
    check = module_state_violations
    assert check("TABLE = {'a': 1}\nTABLE['b'] = 2\ndef f(k):\n    return TABLE[k]\n") == []  # filled at import
    assert check("_SEEN = set()\ndef f(k):\n    _SEEN.add(k)\n") == ["line 3: _SEEN.add(...)"]
    assert check("_CACHE: dict = {}\ndef f(k, v):\n    _CACHE[k] = v\n") == ["line 3: writes _CACHE[...]"]
    assert check("_BY = {'a': []}\ndef f(v):\n    _BY['a'].append(v)\n") == ["line 3: _BY['a'].append(...)"]
    assert check("_N = 0\ndef f():\n    global _N\n    _N += 1\n") == ["line 3: global _N"]
    assert check("_ONCE = FirstOfKind()\n") == ["line 1: _ONCE = FirstOfKind(...)"]
    assert check("_DONE = threading.Event()\n") == ["line 1: _DONE = threading.Event(...)"]
    # an allowance holds in its own module only
    assert check("_ENV_SCAN = _EnvScan()\n", "redaction.py") == []
    assert check("_ENV_SCAN = _EnvScan()\n", "engine/orchestrator.py") == ["line 1: _ENV_SCAN = _EnvScan(...)"]
    assert check("log = logging.getLogger(__name__)\nRX = re.compile('a')\n") == []
    assert check("def f():\n    seen = set()\n    seen.add(1)\n") == []  # a local is fine
    # tuple targets, and what a module-level if / try block binds
    assert check("_A, _B = [], 0\ndef f(v):\n    _A.append(v)\n") == ["line 3: _A.append(...)"]
    assert check("_A = _B = {}\ndef f(v):\n    _B[v] = 1\n") == ["line 3: writes _B[...]"]
    assert check("try:\n    import x\nexcept ImportError:\n    _C = {}\ndef f(v):\n    _C[v] = 1\n") \
        == ["line 6: writes _C[...]"]
    assert check("if True:\n    _D = Registry()\n") == ["line 2: _D = Registry(...)"]
    # a class attribute every instance shares
    shared = "class K:\n    seen = []\n    def f(self, v):\n        self.seen.append(v)\n"
    assert check(shared) == ["line 4: K: self.seen.append(...)"]
    assert check("class K:\n    by = {}\n    def f(self, k):\n        self.by[k] = 1\n") \
        == ["line 4: K: writes self.by[k]"]
    assert check("class K:\n    n = 0\n    @classmethod\n    def f(cls):\n        cls.n += 1\n") \
        == ["line 5: K: writes cls.n"]
    assert check("class K:\n    n = 0\ndef f():\n    K.n = 2\n") == []  # outside the class: not seen
    assert check("class K:\n    n = 0\n    def f(self):\n        K.n = 2\n") == ["line 4: K: writes K.n"]
    own = "class K:\n    seen = []\n    def __init__(self):\n        self.seen = []\n" \
          "    def f(self, v):\n        self.seen.append(v)\n"
    assert check(own) == []  # each instance has its own
    assert check("class K:\n    n = 0\n    def f(self):\n        self.n += 1\n") == []  # an instance attribute
    assert check("class M(BaseModel):\n    xs: list = []\n    def f(self, v):\n        self.xs.append(v)\n") \
        == []  # pydantic copies the default per instance
