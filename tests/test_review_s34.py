"""Review (session 34): faults that only showed on a loaded CI machine."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest

from dspy_turbogepa.adapter import run_identity

RACE = "AST constructor recursion depth mismatch (before=120, after=121)"


def _module_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str):
    path = tmp_path / f"{name}.py"
    path.write_text("THRESHOLD = 0.8\n\n\ndef metric(x):\n    return x > THRESHOLD\n")
    module = types.ModuleType(name)
    module.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return module.metric


def _failing_parse(monkeypatch: pytest.MonkeyPatch, failures: int, message: str = RACE) -> list[int]:
    """``ast.parse`` raising ``SystemError(message)`` on its first ``failures`` parses of a user module
    (only those: pytest parses sources too when it reports a failure)."""
    calls: list[int] = []
    real = ast.parse

    def parse(*args, **kwargs):
        filename = str(kwargs.get("filename", args[1] if len(args) > 1 else ""))
        if "user_metric_" not in filename:
            return real(*args, **kwargs)
        calls.append(1)
        if len(calls) <= failures:
            raise SystemError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(ast, "parse", parse)
    return calls


def test_cpythons_ast_recursion_depth_race_does_not_change_the_run_key(tmp_path, monkeypatch):
    """CPython 3.11 (python/cpython#106905): a parse racing another thread's parse fails with a spurious
    SystemError. The metric's module constants are read with ast.parse when the run key is built: the
    race crashed compile() (seen in CI on the suite's own ast.parse); read as "no constants" it would
    change the key and refuse the resume. It is parsed again."""
    fn = _module_function(tmp_path, monkeypatch, "user_metric_race")
    calls = _failing_parse(monkeypatch, failures=2)
    assert run_identity._constants_read(fn) == [["THRESHOLD", 0.8]]
    assert len(calls) == 3


def test_another_system_error_from_ast_parse_is_not_hidden(tmp_path, monkeypatch):
    fn = _module_function(tmp_path, monkeypatch, "user_metric_broken")
    calls = _failing_parse(monkeypatch, failures=99, message="some other interpreter fault")
    with pytest.raises(SystemError, match="some other interpreter fault"):
        run_identity._constants_read(fn)
    assert len(calls) == 1
