"""The architecture's one hard rule: the engine does not import DSPy."""

from __future__ import annotations

import subprocess
import sys


def test_engine_imports_without_dspy():
    """Nor the layers above it: the adapter (DSPy), the store (SQLite), tracking (MLflow)."""
    code = (
        "import sys, dspy_turbogepa.engine, dspy_turbogepa.engine.orchestrator, dspy_turbogepa.engine.merge;"
        "bad = sorted(m for m in sys.modules if m == 'dspy' or m.startswith(('dspy.', 'litellm', 'sqlite3', 'mlflow',"
        " 'dspy_turbogepa.adapter', 'dspy_turbogepa.store', 'dspy_turbogepa.tracking', 'dspy_turbogepa.proposers')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_names():
    import dspy_turbogepa

    assert dspy_turbogepa.GEPA is dspy_turbogepa.TurboGEPA
    assert issubclass(dspy_turbogepa.ConfigurationError, AssertionError)


_MUTATING_METHODS = frozenset({"append", "extend", "insert", "add", "update", "setdefault", "pop", "popitem",
                               "remove", "discard", "clear", "appendleft", "__setitem__"})


def module_state_violations(source: str) -> list[str]:
    """Module-level mutable state in ``source``: a ``global`` statement, or a module-level container
    (list, dict, set) that the module writes to. Read-only lookup tables are fine; what is written at
    module level is shared by every compile in the process (two islands, two threads, a notebook's
    second run) — per-run state belongs on objects that ``compile()`` creates."""
    import ast

    tree = ast.parse(source)
    containers = set()
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value
            mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id in {"list", "dict", "set", "defaultdict", "Counter", "OrderedDict", "deque"})
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            containers |= {t.id for t in targets if mutable and isinstance(t, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"line {node.lineno}: global {', '.join(node.names)}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in containers:
                    found.append(f"line {node.lineno}: writes {t.value.id}[...]")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in _MUTATING_METHODS and isinstance(node.func.value, ast.Name)
              and node.func.value.id in containers):
            found.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}(...)")
    return found


def test_no_module_level_mutable_state():
    """The design rule "no module-level mutable globals", checked on every module of the package."""
    from pathlib import Path

    import dspy_turbogepa

    root = Path(dspy_turbogepa.__file__).parent
    violations = {str(p.relative_to(root)): v for p in sorted(root.rglob("*.py"))
                  if (v := module_state_violations(p.read_text(encoding="utf-8")))}
    assert not violations, violations


def test_the_module_state_check_catches_what_it_is_for():
    assert module_state_violations("TABLE = {'a': 1}\ndef f(k):\n    return TABLE[k]\n") == []
    assert module_state_violations("_SEEN = set()\ndef f(k):\n    _SEEN.add(k)\n") == ["line 3: _SEEN.add(...)"]
    assert module_state_violations("_CACHE: dict = {}\ndef f(k, v):\n    _CACHE[k] = v\n") == [
        "line 3: writes _CACHE[...]"]
    assert module_state_violations("_N = 0\ndef f():\n    global _N\n    _N += 1\n") == ["line 3: global _N"]
    assert module_state_violations("def f():\n    seen = set()\n    seen.add(1)\n") == []  # a local is fine
