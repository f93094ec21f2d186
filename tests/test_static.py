"""The static checks the project keeps clean: mypy on the package, ruff on everything.

They run as tests so that CI (which runs only the README's pytest command) catches a type error or a
lint regression the same way it catches a failing behaviour. Both tools are pinned in constraints.txt
and configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_mypy_finds_no_errors_in_the_package(tmp_path):
    # the cache in tmp_path: no .mypy_cache left in the checkout, and no stale cache hiding an error
    proc = _run(["mypy", "--cache-dir", str(tmp_path / "mypy_cache")], ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


def test_ruff_finds_nothing():
    proc = _run(["ruff", "check", "--no-cache", "."], ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_package_ships_its_pep561_marker():
    """Without ``py.typed`` in the wheel, a user's mypy treats every dspy_turbogepa name as Any."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    assert (ROOT / "dspy_turbogepa" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["dspy_turbogepa"]
