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
    ("tracking/progress.py", "_VISIBLE_LOGS_LOCK"): "guards the logging configuration, which is the process's",
}


def _base_name(node: object) -> str | None:
    """``_C`` for ``_C``, ``_C[k]``, ``_C[k].x`` ...: the name a write through an item lands in."""
    import ast

    while isinstance(node, (ast.Subscript, ast.Attribute)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def module_state_violations(source: str, module: str = "") -> list[str]:
    """Module-level mutable state in ``source``: a ``global`` statement; a module-level container (list,
    dict, set, ...) that a function writes to, directly or through one of its items; or a module-level
    object made by a call not known to make an immutable value. Read-only lookup tables are fine, and so
    is filling one at import time; what functions write at module level is shared by every compile in the
    process (two islands, two threads, a notebook's second run): per-run state belongs on objects that
    ``compile()`` creates."""
    import ast

    tree = ast.parse(source)
    containers, found = set(), []
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
            continue
        value = node.value
        names = [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                 if isinstance(t, ast.Name) and t.id != "__all__"]
        if isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
            containers.update(names)
        elif isinstance(value, ast.Call) and ast.unparse(value.func) not in _IMMUTABLE_CALLS:
            containers.update(n for n in names if (module, n) not in _DELIBERATE)  # set(), a cache: writes named
            found += [f"line {node.lineno}: {n} = {ast.unparse(value.func)}(...)" for n in names
                      if (module, n) not in _DELIBERATE]
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    for node in (inner for fn in functions for inner in ast.walk(fn)):
        if isinstance(node, ast.Global):
            found.append(f"line {node.lineno}: global {', '.join(node.names)}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            found += [f"line {node.lineno}: writes {_base_name(t)}[...]" for t in targets
                      if isinstance(t, (ast.Subscript, ast.Attribute)) and _base_name(t) in containers]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in _MUTATING_METHODS and _base_name(node.func.value) in containers):
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}(...)")
    return sorted(set(found), key=lambda f: int(f.split()[1].rstrip(":")))


def test_no_module_level_mutable_state():
    """The design rule "no module-level mutable globals", checked on every module of the package.
    Not checked: class attributes changed at run time (``_CompileLogHandler.users`` counts the compiles
    sharing the process's log handler, on purpose) and ``functools.cache`` on pure functions."""
    from pathlib import Path

    import dspy_turbogepa

    root = Path(dspy_turbogepa.__file__).parent
    violations = {str(p.relative_to(root)): v for p in sorted(root.rglob("*.py"))
                  if (v := module_state_violations(p.read_text(encoding="utf-8"), p.relative_to(root).as_posix()))}
    assert not violations, violations


def test_the_module_state_check_catches_what_it_is_for():
    check = module_state_violations
    assert check("TABLE = {'a': 1}\nTABLE['b'] = 2\ndef f(k):\n    return TABLE[k]\n") == []  # filled at import
    assert check("_SEEN = set()\ndef f(k):\n    _SEEN.add(k)\n") == ["line 1: _SEEN = set(...)",
                                                                 "line 3: _SEEN.add(...)"]
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
